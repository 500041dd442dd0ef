"""The generator (SPEC §4) and the audio encoder (SPEC §5): nn.Modules and pure helpers only.

UNet328 maps [reference crop, masked current crop] (6 x 320 x 320, values in [0, 1]) plus the
audio features of a frame (32 x 16 x 16) to the painted 320 x 320 crop. AudioEncoder is the
Wav2Lip sync-expert audio tower (mel window 1 x 80 x 16 -> 512); it loads the original
SyncTalk_2D `audio_visual_encoder.pth` when a user has one. fold_bn makes a BatchNorm-free copy
for CPU inference (with channels_last, ~2x faster than eager on the 2-core box, SPEC §11).

    python -c "import unet_328 as u; m = u.UNet328(); print(u.count_params(m))"
    python -c "import torch, unet_328 as u; m = u.fold_bn(u.UNet328(u.WIDTHS['light'])); print(m(torch.rand(1, 6, 320, 320), torch.randn(1, 32, 16, 16)).shape)"
"""
import copy
from collections.abc import Mapping

import torch
import torch.nn as nn

from utils import FEAT_DIM, FEAT_WIN, INNER, MEL_WIN, N_MELS

# Encoder widths at 320, 160, 80, 40, 20, 10 px. "full" is the reference design (~12.2 M params);
# "light" keeps the geometry and the input/output shapes at about a quarter of the FLOPs, for CPU.
# "narrow" is light with a narrower top: with the s2d stem its 160 px level is 16 wide instead of 32,
# the level that costs most of a CPU step (a step 0.75x light's); budget A's CPU recipe (RESULTS.md round 12).
WIDTHS = {"full": (32, 32, 64, 128, 256, 512), "light": (16, 16, 32, 64, 128, 256),
          "narrow": (8, 16, 32, 64, 128, 256)}
EXPAND = 2                      # inverted-residual expansion; 2 gives the reference 12.2 M params
IMG_CHANNELS = 6                # reference crop (3) + masked current crop (3)
BASES = ("none", "ref")         # what the output starts from: nothing (paint the whole crop) or the reference in the hole
STEMS = ("conv", "s2d", "s2d4", "s2d4l")   # the first level: 320 px convolutions (reference), or 2 x 2 (4 x 4) pixels folded into channels
FOLD = {"conv": 1, "s2d": 2, "s2d4": 4, "s2d4l": 4}   # pixels per side folded into channels by each stem
LEAN_TOP = ("s2d4l",)           # stems whose top-level (80 px) inverted residuals do not expand (UNet328)
AUDIO_SHAPE = (32, 16, 16)      # FEAT_WIN vectors of FEAT_DIM, reshaped (SPEC §5)
STRIDE = 32                     # one bottleneck cell = 32 x 32 px of the crop (five stride-2 stages)
assert AUDIO_SHAPE[0] * AUDIO_SHAPE[1] * AUDIO_SHAPE[2] == FEAT_WIN * FEAT_DIM


def check_shape(x, expected, name):
    """Raise ValueError unless x is (B, *expected); shapes are part of the contract (STYLE 5)."""
    if x.dim() != len(expected) + 1 or tuple(x.shape[1:]) != tuple(expected):
        raise ValueError(f"{name}: expected shape (B, {', '.join(map(str, expected))}), "
                         f"got {tuple(x.shape)}")


def count_params(m):
    """Number of trainable parameters of a module."""
    return sum(p.numel() for p in m.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------------------------
# Building blocks. Every Conv2d that is followed by a BatchNorm2d sits next to it inside one
# nn.Sequential, so fold_bn can find the pairs in execution order.
class StridedDepthwise(nn.Conv2d):
    """The 3x3 depthwise conv of a strided block. Under CPU autocast it computes in fp32: oneDNN's
    bf16 kernels for strided depthwise convs are 3-17x slower than its fp32 ones (forward +
    backward at batch 4, 1 thread: 13.6 against 0.8 ms for 256 channels at 20 px), while at stride
    1 bf16 stays the faster (RESULTS.md round 21). Same weights, same state-dict
    keys; elsewhere (GPU, fp32, export) a plain Conv2d."""

    def forward(self, x):
        if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            with torch.autocast("cpu", enabled=False):
                return super().forward(x.float())
        return super().forward(x)


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise (carries the stride), 1x1 linear project.
    Most of the FLOPs sit in the 1x1 convs; the depthwise conv gives the spatial context."""

    def __init__(self, cin, cout, stride=1, expand=EXPAND):
        super().__init__()
        hidden = cin * expand
        self.residual = stride == 1 and cin == cout
        self.conv = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
            (StridedDepthwise if stride > 1 else nn.Conv2d)(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
            # No ReLU after the projection: a narrow ReLU bottleneck would destroy information.
            nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout),
        )

    def forward(self, x):  # (B, cin, H, W) -> (B, cout, H / stride, W / stride)
        out = self.conv(x)
        return x + out if self.residual else out


class DoubleConv(nn.Module):
    """One (possibly strided) inverted residual that changes width, then one residual one."""

    def __init__(self, cin, cout, stride=1, expand=(EXPAND, EXPAND)):
        super().__init__()
        self.block = nn.Sequential(InvertedResidual(cin, cout, stride, expand[0]), InvertedResidual(cout, cout, expand=expand[1]))

    def forward(self, x):  # (B, cin, H, W) -> (B, cout, H / stride, W / stride)
        return self.block(x)


class Conv2dBlock(nn.Module):
    """Conv + BN (+ input) + ReLU, the Wav2Lip block. The attribute name `conv_block` and the
    conv bias are kept so that state dicts in the Wav2Lip layout load unchanged."""

    def __init__(self, cin, cout, kernel, stride, padding, residual=False):
        super().__init__()
        self.conv_block = nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, padding), nn.BatchNorm2d(cout))
        self.residual = residual
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):  # (B, cin, H, W) -> (B, cout, H', W')
        out = self.conv_block(x)
        if self.residual:
            out = out + x
        return self.act(out)


class Up(nn.Module):
    """Bilinear x2 upsample, concat the encoder skip, DoubleConv to the next width."""

    def __init__(self, cin, cskip, cout, expand=(EXPAND, EXPAND)):
        super().__init__()
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.conv = DoubleConv(cin + cskip, cout, expand=expand)

    def forward(self, x, skip):  # (B, cin, H, W), (B, cskip, 2H, 2W) -> (B, cout, 2H, 2W)
        return self.conv(torch.cat([self.up(x), skip], dim=1))


# ----------------------------------------------------------------------------------------------
# The generator.
class UNet328(nn.Module):
    """[reference | masked] crop (B, 6, 320, 320) in [0, 1] + audio (B, 32, 16, 16)
    -> painted crop (B, 3, 320, 320) in (0, 1).

    base "none": the last conv paints the whole crop (the reference design). base "ref": the last
    conv's output is added, in logit space, to a base image: the masked crop with its hole (the
    pixels that are 0 in all channels) filled from the reference crop, colour-matched (base_logit). The last conv starts at
    zero, so an untrained model already returns the reference's skin and texture in the hole and
    training learns what must change there (the mouth) instead of repainting everything.
    stem "conv": the first level convolves the 320 px crop (the reference design); "s2d": it
    starts from 2 x 2 pixel blocks folded into channels (train_328 --stem); "s2d4" from 4 x 4 blocks,
    so its levels are 80 .. 10 px; "s2d4l" is s2d4 whose 80 px inverted residuals do not expand.
    audio_film: the audio branch's map also scales and shifts every decoder level (train_328 --audio_film)."""

    def __init__(self, widths=WIDTHS["full"], audio_channels=AUDIO_SHAPE[0], base="none", stem="conv", audio_film=False):
        super().__init__()
        if len(widths) != 6:
            raise ValueError(f"widths: need 6 encoder widths (320 .. 10 px), got {widths}")
        if base not in BASES:
            raise ValueError(f"base: choose one of {BASES}, got {base!r}")
        if stem not in STEMS:
            raise ValueError(f"stem: choose one of {STEMS}, got {stem!r}")
        w0, w1, w2, w3, w4, w5 = widths
        self.widths, self.audio_channels, self.base, self.stem, self.audio_film = tuple(widths), audio_channels, base, stem, audio_film
        # The encoder's levels: 320, 160, 80, 40, 20, 10 px (conv), or with stem s2d each 2 x 2 pixel
        # block folded into channels (pixel_unshuffle) so the levels are 160 .. 10 px, the 160 px one
        # max(2 w0, w1) wide; the output is painted as 4 sub-pixels a position (pixel_shuffle). The
        # 320 px level is most of a CPU step's time (memory-bound BatchNorm and ReLU): a light s2d
        # training step at batch 4 takes about half the time (0.43 against 0.84 s on 2 cores).
        # s2d4 folds 4 x 4 blocks: its levels are 80 .. 10 px, the 80 px one max(2 w1, w2) wide.
        # s2d4l is s2d4 whose blocks at 80 px do not expand (expand 1: a CPU step ~0.84x s2d4's).
        levels = {"conv": tuple(widths), "s2d": (max(2 * w0, w1), w2, w3, w4, w5)}.get(stem, (max(2 * w1, w2), w3, w4, w5))
        self.fold = FOLD[stem]
        top = (1, 1) if stem in LEAN_TOP else (EXPAND, EXPAND)      # the expansions of the top level's two blocks
        self.inc = DoubleConv(IMG_CHANNELS * self.fold ** 2, levels[0], expand=top)
        self.down = nn.ModuleList([DoubleConv(a, b, stride=2, expand=(top[0] if i == 0 else EXPAND, EXPAND))
                                   for i, (a, b) in enumerate(zip(levels[:-1], levels[1:]))])
        # Audio branch 16 -> 10 px: three valid (unpadded) 3x3 convs shrink 16 -> 14 -> 12 -> 10,
        # each followed by a residual IR; two more IRs at the bottleneck width.
        a1, a2 = w5 // 4, w5 // 2
        self.audio_branch = nn.Sequential(
            Conv2dBlock(audio_channels, a1, 3, 1, 0), InvertedResidual(a1, a1),   # (B, w5/4, 14, 14)
            Conv2dBlock(a1, a2, 3, 1, 0), InvertedResidual(a2, a2),               # (B, w5/2, 12, 12)
            Conv2dBlock(a2, w5, 3, 1, 0), InvertedResidual(w5, w5),               # (B, w5, 10, 10)
            InvertedResidual(w5, w5),
        )
        # Fusion at the bottleneck: [image | audio] 2*w5 -> w5 -> w4.
        self.fuse = nn.Sequential(DoubleConv(2 * w5, w5), DoubleConv(w5, w4))
        # Decoder: widths back up, each level concatenating the encoder skip of its resolution
        # (conv: 10 -> 20 -> 40 -> 80 -> 160 -> 320 px, ending w0 / 2 wide; s2d: up to 160 px; s2d4: up to 80 px).
        outs = levels[-3::-1] + ((w0 // 2,) if stem == "conv" else (levels[0],))
        self.up = nn.ModuleList([Up(c, c, o, expand=top if i == len(outs) - 1 else (EXPAND, EXPAND))
                                 for i, (c, o) in enumerate(zip(levels[-2::-1], outs))])
        self.outc = nn.Conv2d(outs[-1], 3 * self.fold ** 2, 1)
        # audio_film: every decoder level is also scaled and shifted, channel by channel and place by place,
        # by a 1 x 1 projection of the audio branch's 10 px map, upsampled to it (zero at the start: the plain U-Net).
        self.film = nn.ModuleList([nn.Conv2d(w5, 2 * o, 1) for o in outs]) if audio_film else None
        for f in self.film or ():
            nn.init.zeros_(f.weight)
            nn.init.zeros_(f.bias)
        if base == "ref":
            nn.init.zeros_(self.outc.weight)
            nn.init.zeros_(self.outc.bias)

    def forward(self, img, audio, offset=None):
        """offset (y, x): img is the window of the 320 crop at that offset (sides and offset in
        multiples of STRIDE), and the audio map is cut to the same bottleneck cells, so a window
        sees exactly what it would see inside the whole crop but for its borders (training on
        windows, train_328 --window). None: img is the whole crop."""
        if offset is None:
            check_shape(img, (IMG_CHANNELS, INNER, INNER), "UNet328 image")
        else:
            check_window(img, offset)
        check_shape(audio, (self.audio_channels, AUDIO_SHAPE[1], AUDIO_SHAPE[2]), "UNet328 audio")
        skips = [self.inc(img if self.fold == 1 else nn.functional.pixel_unshuffle(img, self.fold))]   # (B, w0, 320, 320) / s2d (B, 2 w0, 160, 160)
        for down in self.down:
            skips.append(down(skips[-1]))           # ... (B, w5, 10, 10)
        a = self.audio_branch(audio)                # (B, w5, 10, 10)
        if offset is not None:
            (cy, cx), (h, w) = (o // STRIDE for o in offset), skips[-1].shape[2:]
            a = a[:, :, cy:cy + h, cx:cx + w]       # (B, w5, h, w): the window's cells
        x = self.fuse(torch.cat([skips.pop(), a], dim=1))   # (B, w4, 10, 10)
        for i, up in enumerate(self.up):
            x = up(x, skips.pop())                  # (B, w3, 20, 20) ... (B, w0/2, 320, 320)
            if self.film is not None:
                gain, shift = nn.functional.interpolate(self.film[i](a), scale_factor=2 ** (i + 1), mode="bilinear",
                                                        align_corners=False).chunk(2, dim=1)   # 10 px -> this level
                x = x * (1 + gain) + shift
        y = self.outc(x) if self.fold == 1 else nn.functional.pixel_shuffle(self.outc(x), self.fold)
        if self.base == "ref":
            return torch.sigmoid(y + base_logit(img))
        return torch.sigmoid(y)                     # (B, 3, 320, 320)


def check_window(img, offset):
    """Raise ValueError unless img (B, 6, h, w) is a STRIDE-aligned window of the 320 crop at offset (y, x)."""
    h, w = img.shape[2:] if img.dim() == 4 else (0, 0)
    y, x = offset
    if (img.dim() != 4 or img.shape[1] != IMG_CHANNELS or min(h, w) < STRIDE or
            any(v % STRIDE for v in (h, w, y, x)) or y < 0 or x < 0 or y + h > INNER or x + w > INNER):
        raise ValueError(f"UNet328 window: expected (B, {IMG_CHANNELS}, h, w) with h, w and offset {offset} "
                         f"multiples of {STRIDE} inside the {INNER} crop, got {tuple(img.shape)}")


def base_logit(img, eps=1.0 / 512):
    """img (B, 6, H, W) = [reference | masked] -> logit of the base image (B, 3, H, W): the masked
    crop, its hole (0 in all three channels) filled from the reference, whose colours are first
    mapped to the current frame's (per channel: mean and spread over the pixels both show, gain
    kept in 1/2..2), so a reference from another light or white balance does not tint the hole."""
    ref, masked = img[:, :3], img[:, 3:]
    hole = masked.amax(dim=1, keepdim=True) <= 0                       # (B, 1, H, W)
    w = (~hole).to(img.dtype)
    n = w.sum(dim=(2, 3), keepdim=True).clamp_min(1.0)

    def stats(x):
        m = (x * w).sum(dim=(2, 3), keepdim=True) / n
        return m, (((x - m) * w).square().sum(dim=(2, 3), keepdim=True) / n).add(1e-6).sqrt()
    (m_r, s_r), (m_c, s_c) = stats(ref), stats(masked)
    matched = (ref - m_r) * (s_c / s_r).clamp(0.5, 2.0) + m_c
    b = torch.where(hole, matched, masked).clamp(eps, 1 - eps)
    return torch.log(b) - torch.log1p(-b)


# ----------------------------------------------------------------------------------------------
# The audio encoder (Wav2Lip sync-expert audio tower).
# (cin, cout, kernel, stride, padding, residual); the mel window shrinks 80x16 -> 27x16 -> 9x6
# -> 3x3 -> 1x1, so the output is one 512-vector per window.
AUDIO_ENCODER_LAYERS = [
    (1, 32, 3, 1, 1, False), (32, 32, 3, 1, 1, True), (32, 32, 3, 1, 1, True),
    (32, 64, 3, (3, 1), 1, False), (64, 64, 3, 1, 1, True), (64, 64, 3, 1, 1, True),
    (64, 128, 3, 3, 1, False), (128, 128, 3, 1, 1, True), (128, 128, 3, 1, 1, True),
    (128, 256, 3, (3, 2), 1, False), (256, 256, 3, 1, 1, True),
    (256, 512, 3, 1, 0, False), (512, 512, 1, 1, 0, False),
]
_FIRST_KEY = "0.conv_block.0.weight"   # locates the tower inside foreign state dicts


class AudioEncoder(nn.Module):
    """Mel window (B, 1, 80, 16) -> (B, 512). State dict keys follow Wav2Lip's layout
    (`audio_encoder.<i>.conv_block.<0|1>.*`)."""
    source = "mel"           # the audio feature source whose per-frame inputs it reads (audio_features.py)
    input_shape = (1, N_MELS, MEL_WIN)     # one frame's input

    def __init__(self):
        super().__init__()
        self.audio_encoder = nn.Sequential(*[Conv2dBlock(*spec) for spec in AUDIO_ENCODER_LAYERS])

    def forward(self, mel):
        check_shape(mel, (1, N_MELS, MEL_WIN), "AudioEncoder mel")
        return self.audio_encoder(mel).flatten(1)   # (B, 512, 1, 1) -> (B, 512)

    def load_reference_state_dict(self, sd):
        """Load Wav2Lip-layout weights: the raw SyncTalk_2D `audio_visual_encoder.pth` (bare
        `0.conv_block...` keys), our own state dict, a whole SyncNet's, with or without a DDP
        `module.` prefix, possibly nested under "state_dict" / "model". ValueError on mismatch."""
        while isinstance(sd, Mapping) and any(isinstance(sd.get(k), Mapping) for k in ("state_dict", "model")):
            sd = sd["state_dict"] if isinstance(sd.get("state_dict"), Mapping) else sd["model"]
        if not isinstance(sd, Mapping):
            raise ValueError(f"audio encoder weights: expected a state dict, got {type(sd).__name__}")
        sd = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}
        own = self.audio_encoder.state_dict()
        # The tower's prefix is whatever precedes a first-conv key of the right shape; a face
        # tower in the same dict (Wav2Lip SyncNet) has a differently shaped first conv.
        prefixes = [k[:-len(_FIRST_KEY)] for k, v in sd.items() if k.endswith(_FIRST_KEY)
                    and (k == _FIRST_KEY or k.endswith("." + _FIRST_KEY))
                    and getattr(v, "shape", None) == own[_FIRST_KEY].shape]
        if len(prefixes) != 1:
            raise ValueError(f"audio encoder weights: found {len(prefixes)} Wav2Lip audio towers "
                             f"(keys ending in {_FIRST_KEY} of shape {tuple(own[_FIRST_KEY].shape)}), need 1")
        p = prefixes[0]
        sub = {k[len(p):]: v for k, v in sd.items() if k.startswith(p)}
        # Older checkpoints lack BatchNorm's num_batches_tracked; it does not affect eval outputs.
        missing = [k for k in own if k not in sub and not k.endswith("num_batches_tracked")]
        unexpected = [k for k in sub if k not in own]
        wrong = [k for k in own if k in sub and tuple(getattr(sub[k], "shape", ())) != tuple(own[k].shape)]
        if missing or unexpected or wrong:
            example = (missing or unexpected or wrong)[0]
            raise ValueError(f"audio encoder weights (prefix {p!r}) do not match the Wav2Lip layout: "
                             f"{len(missing)} missing, {len(unexpected)} unexpected, {len(wrong)} "
                             f"wrongly shaped keys (first: {example})")
        self.audio_encoder.load_state_dict(sub, strict=False)
        return self


SPEECH_DIM = 96              # size of the frozen speech embedding the "speech" source reads


class SpeechEncoder(nn.Module):
    """The trainable head of the "speech" feature source: a frozen pretrained speech embedding of
    the 0.76 s around a frame (B, 96) -> (B, 512), the size the generator reads. Small on purpose:
    the pretrained part carries what a few minutes of one voice cannot teach."""
    source = "speech"
    input_shape = (SPEECH_DIM,)

    def __init__(self, dim=SPEECH_DIM, hidden=FEAT_DIM):
        super().__init__()
        # the embedding's values spread to +-70: the LayerNorm puts them on the scale of the rest
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.ReLU(inplace=True),
                                 nn.Linear(hidden, FEAT_DIM), nn.ReLU(inplace=True))

    def forward(self, emb):
        check_shape(emb, (SPEECH_DIM,), "SpeechEncoder embedding")
        return self.net(emb)


MEL_FLAT = N_MELS * MEL_WIN  # a mel window, flattened
BOTH_DIM = MEL_FLAT + SPEECH_DIM   # one frame's input of the "both" source: [mel window | speech embedding]


class BothEncoder(nn.Module):
    """The "both" source: a frame's mel window through the AudioEncoder plus its speech embedding
    through a SpeechEncoder, the two 512-vectors summed. (B, 1376) = [flattened 80x16 mel | 96]
    -> (B, 512). The mel carries the timing of this voice, the pretrained embedding what carries
    over to other voices (a linear read-out of the mouth opening from both: README section 2)."""
    source = "both"
    input_shape = (BOTH_DIM,)

    def __init__(self):
        super().__init__()
        self.mel = AudioEncoder()
        self.speech = SpeechEncoder()

    def forward(self, x):
        check_shape(x, (BOTH_DIM,), "BothEncoder input")
        return self.mel(x[:, :MEL_FLAT].reshape(-1, 1, N_MELS, MEL_WIN)) + self.speech(x[:, MEL_FLAT:])


AUDIO_ENCODERS = {"mel": AudioEncoder, "speech": SpeechEncoder, "both": BothEncoder}   # feature source -> its trainable encoder


def make_audio_encoder(source="mel"):
    if source not in AUDIO_ENCODERS:
        raise ValueError(f"audio feature source {source!r}: use one of {', '.join(AUDIO_ENCODERS)}")
    return AUDIO_ENCODERS[source]()


# ----------------------------------------------------------------------------------------------
# Inference helper.
def _fold(conv, bn):
    """Conv2d with BN's affine map and running statistics folded into its weight and bias."""
    if bn.running_mean is None:
        raise ValueError("fold_bn: BatchNorm2d without running statistics cannot be folded")
    fused = copy.deepcopy(conv)
    scale = bn.running_var.add(bn.eps).rsqrt()                                   # (C,)
    if bn.weight is not None:
        scale = scale * bn.weight
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    bias = (bias - bn.running_mean) * scale
    if bn.bias is not None:
        bias = bias + bn.bias
    fused.weight = nn.Parameter(conv.weight * scale.reshape(-1, 1, 1, 1))      # (Cout, Cin/g, k, k)
    fused.bias = nn.Parameter(bias)
    return fused


@torch.no_grad()
def fold_bn(model):
    """Eval-mode copy of `model` with every Conv2d -> BatchNorm2d pair inside an nn.Sequential
    fused into one conv and the BN replaced by nn.Identity. Outputs match model.eval() to float
    rounding; the original is untouched. Pair with channels_last for CPU speed (SPEC §11)."""
    model = copy.deepcopy(model).eval()
    for seq in model.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        for i in range(len(seq) - 1):
            if isinstance(seq[i], nn.Conv2d) and isinstance(seq[i + 1], nn.BatchNorm2d):
                seq[i] = _fold(seq[i], seq[i + 1])
                seq[i + 1] = nn.Identity()
    return model
