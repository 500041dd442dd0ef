"""What the generator minimises, and one optimizer step of it (train_328.py's inner loop).

Loss = L1 over the crop + mouth_weight x L1 inside each frame's mouth box + perceptual weight x
(VGG19 conv3_3 L1, or 1 - MS-SSIM) + edge_weight x L1 of the horizontal and vertical pixel
differences (edge_l1) + opening_weight x the opening head's MSE + the ramped sync
weight x the frozen SyncNet's BCE on clips of T consecutive predicted frames + the ramped
adversarial weight x a patch discriminator's least-squares loss on the repainted area (Adversary). `Objective` holds the
terms a run uses; `train_step` runs forward, loss, backward, clip and optimizer step on one batch;
`validate` measures held-out frames (L1, and how much the mouth follows the audio).
"""
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import utils
from unet_328 import STRIDE
from utils import UserError

PERCEPTUAL_WEIGHT = {"vgg": 0.01, "msssim": 0.5, "msssim_y": 0.5, "off": 0.0}
VGG_FILE = "vgg19-dcbb9e9d.pth"    # torchvision's ImageNet VGG19; never downloaded here
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)   # RGB


class VGGLoss(torch.nn.Module):
    """L1 between frozen VGG19 conv3_3 (after ReLU) features of prediction and target."""

    def __init__(self, weights_file):
        import torchvision
        super().__init__()
        vgg = torchvision.models.vgg19()
        vgg.load_state_dict(torch.load(weights_file, map_location="cpu", weights_only=True))
        self.features = vgg.features[:16].eval().requires_grad_(False)   # up to relu3_3
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, pred, target):   # (B, 3, H, W) BGR in [0, 1]
        f = lambda x: self.features((x.flip(1) - self.mean) / self.std)   # VGG wants RGB
        with torch.no_grad():
            t = f(target)
        return F.l1_loss(f(pred), t)


MSSSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)   # the five scales' exponents (Wang et al. 2003)
MSSSIM_WIN, MSSSIM_SIGMA, MSSSIM_K = 11, 1.5, (0.01, 0.03)   # Gaussian window (px, sigma) and the stabilising constants
_GAUSS = {}


def _gauss_blur(t):
    """Valid (unpadded) separable Gaussian blur of every channel of t (N, C, H, W): two depthwise
    convolutions in channels-last layout (about 2x faster on a CPU than NCHW)."""
    key = (t.device, t.shape[1])
    if key not in _GAUSS:
        x = torch.arange(MSSSIM_WIN, dtype=torch.float32) - MSSSIM_WIN // 2
        g = torch.exp(-x ** 2 / (2 * MSSSIM_SIGMA ** 2))
        g = (g / g.sum()).to(t.device)
        _GAUSS[key] = (g.view(1, 1, 1, -1).expand(t.shape[1], 1, 1, -1).contiguous(),
                       g.view(1, 1, -1, 1).expand(t.shape[1], 1, -1, 1).contiguous())
    gw, gh = _GAUSS[key]
    t = F.conv2d(t.contiguous(memory_format=torch.channels_last), gw, groups=t.shape[1])
    return F.conv2d(t, gh, groups=t.shape[1])


def ms_ssim(x, y, data_range=1.0):
    """Multi-scale SSIM of x against y (N, C, H, W; the smaller side > 160 px), averaged over
    images and channels: the standard five scales, an 11 px Gaussian of sigma 1.5, valid
    filtering, 2 x 2 average pooling between scales (the same figure as pytorch_msssim.ms_ssim).
    The filters run once per scale over x's three maps stacked as channels, and y's two outside
    autograd (y gets no gradient): ~2.5x cheaper than filtering map by map."""
    c1, c2 = (MSSSIM_K[0] * data_range) ** 2, (MSSSIM_K[1] * data_range) ** 2
    C, levels = x.shape[1], []
    x, y = (t.contiguous(memory_format=torch.channels_last) for t in (x, y))   # one layout throughout: no copies between ops
    for s in range(len(MSSSIM_WEIGHTS)):
        mx, xx, xy = _gauss_blur(torch.cat([x, x * x, x * y], 1)).split(C, 1)
        with torch.no_grad():
            my, yy = _gauss_blur(torch.cat([y, y * y], 1)).split(C, 1)
        cs = (2 * (xy - mx * my) + c2) / (xx - mx * mx + yy - my * my + c2)
        if s < len(MSSSIM_WEIGHTS) - 1:
            levels.append(torch.relu(cs.mean((-2, -1))))
            pad = [x.shape[-2] % 2, x.shape[-1] % 2]
            x, y = F.avg_pool2d(x, 2, padding=pad), F.avg_pool2d(y, 2, padding=pad)
        else:
            levels.append(torch.relu((((2 * mx * my + c1) / (mx * mx + my * my + c1)) * cs).mean((-2, -1))))
    w = torch.tensor(MSSSIM_WEIGHTS, device=x.device).view(-1, 1, 1)
    return torch.prod(torch.stack(levels) ** w, 0).mean()


def msssim_loss(pred, target):
    """1 - MS-SSIM, always in fp32: SSIM's variances (E[x^2] - E[x]^2) cancel catastrophically in
    bf16, and under autocast its Gaussian filters would run in bf16 (measured: loss 4x off, gradient
    uncorrelated with the true one; full-width training on an H200 collapsed to a dark frame)."""
    with torch.autocast(pred.device.type, enabled=False):
        return 1 - ms_ssim(pred.float(), target.float().detach())


LUMA_BGR = (0.114, 0.587, 0.299)   # BT.601 luma of a BGR pixel


def msssim_y_loss(pred, target):
    """1 - MS-SSIM of the luma (Y) of BGR pred and target: one channel instead of three (colour is
    left to the L1), ~3x less filtering."""
    with torch.autocast(pred.device.type, enabled=False):
        w = torch.tensor(LUMA_BGR, device=pred.device).view(1, 3, 1, 1)
        return 1 - ms_ssim((pred.float() * w).sum(1, keepdim=True), (target.float().detach() * w).sum(1, keepdim=True))


def make_perceptual(kind, device):
    """-> (name, loss fn or None). auto picks VGG only when its weights are already on disk, else
    the luma's MS-SSIM (level with the RGB one at budget A and the standard preset, ~15% cheaper a step: RESULTS.md round 23)."""
    vgg_path = Path(torch.hub.get_dir()) / "checkpoints" / VGG_FILE
    if kind == "auto":
        kind = "vgg" if vgg_path.is_file() else "msssim_y"
    if kind == "vgg":
        if not vgg_path.is_file():
            raise UserError(f"--perceptual vgg needs {vgg_path} (torchvision's ImageNet VGG19); use --perceptual msssim")
        return kind, VGGLoss(vgg_path).to(device)
    if kind == "msssim":
        return kind, msssim_loss
    if kind == "msssim_y":
        return kind, msssim_y_loss
    if kind == "off":
        return kind, None
    raise UserError(f"--perceptual {kind!r}: choose auto, vgg, msssim, msssim_y or off")


def mouth_l1(pred, target, boxes):
    """Mean L1 inside each sample's mouth box (x0, y0, x1, y1) of the 320 crop: (B, 3, H, W) x2, (B, 4)."""
    h, w = pred.shape[-2:]
    ys, xs = torch.arange(h, device=pred.device), torch.arange(w, device=pred.device)
    b = boxes.to(pred.device)
    inside = (((ys[None, :, None] >= b[:, 1, None, None]) & (ys[None, :, None] < b[:, 3, None, None])) &
              ((xs[None, None, :] >= b[:, 0, None, None]) & (xs[None, None, :] < b[:, 2, None, None])))   # (B, H, W)
    inside = inside[:, None].float()
    return ((pred - target).abs() * inside).sum() / (3 * inside.sum()).clamp(min=1)


def edge_l1(pred, target):
    """Mean L1 between the neighbour differences (x and y) of prediction and target (B, 3, H, W):
    it weighs where edges are (lip contours, teeth) more than flat skin, which plain L1 averages away."""
    d = pred - target
    return (d[..., :, 1:] - d[..., :, :-1]).abs().mean() + (d[..., 1:, :] - d[..., :-1, :]).abs().mean()


class OpeningHead(torch.nn.Module):
    """Training-only probe: the U-Net's audio-branch map (B, C, 10, 10) -> the frame's mouth opening,
    standardised over the training frames. Its loss teaches the audio path the quantity the
    painted mouth must follow; inference never runs it."""

    def __init__(self, channels, mean, std):
        super().__init__()
        self.fc = torch.nn.Linear(channels, 1)
        self.register_buffer("mean", torch.tensor(float(mean)))
        self.register_buffer("std", torch.tensor(max(float(std), 1e-6)))

    def loss(self, audio_map, opening):   # (B, C, h, w), (B,) -> scalar MSE in standard units
        pred = self.fc(audio_map.float().mean(dim=(2, 3)))[:, 0]
        return F.mse_loss(pred, (opening.float() - self.mean) / self.std)

    def watch(self, model):
        """Hook the U-Net's audio branch: each training forward leaves its map in self.maps."""
        self.maps = []
        model.audio_branch.register_forward_hook(lambda mod, inp, out: self.maps.append(out) if mod.training else None)
        return self


class PatchCritic(torch.nn.Module):
    """A small PatchGAN: (B, 3, H, W) in [0, 1] -> (B, 1, H/8 - 2, W/8 - 2) realness scores, one per
    ~46 px patch; spectral norm on every convolution keeps it from overpowering the generator. It
    sees only the fine detail, the image minus its 5 x 5 local mean (x HP_GAIN): on raw pixels
    neither it nor a critic without spectral norm told grid's true crops from copies blurred by a
    Gaussian of sigma 0.8-3 (150-500 steps), on the detail both tell sigma 0.8 apart within 300."""

    HP_GAIN = 4.0

    def __init__(self, width=32):
        super().__init__()
        sn = torch.nn.utils.parametrizations.spectral_norm
        layers, c = [], 3
        for w, stride in ((width, 2), (2 * width, 2), (4 * width, 2)):
            layers += [sn(torch.nn.Conv2d(c, w, 4, stride, 1)), torch.nn.LeakyReLU(0.2, inplace=True)]
            c = w
        layers.append(sn(torch.nn.Conv2d(c, 1, 3, 1, 0)))
        self.net = torch.nn.Sequential(*layers)

    def forward(self, x):
        detail = x - torch.nn.functional.avg_pool2d(x, 5, 1, 2, count_include_pad=False)
        return self.net(self.HP_GAIN * detail)


class Adversary:
    """The adversarial term: a PatchCritic learns to tell the repainted area (the mask's bounding
    box, `box` = (y0, y1, x0, x1) of the 320 crop) of predictions from the true frames'
    (least-squares GAN), and the generator is pushed towards what it calls real, which plain L1
    averages away (the texture of skin, the edges of teeth and lips). It starts at step `start`
    and its weight rises over `ramp` steps."""

    def __init__(self, weight, start, ramp, box, device, lr=1e-3, seed=0):
        self.weight, self.start, self.ramp, self.box = weight, int(start), int(ramp), tuple(int(v) for v in box)
        dev = torch.device(device)                   # its own seed: the run's random streams (the GPU's too) stay as without it
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            torch.manual_seed(seed + 7)
            self.critic = PatchCritic().to(device)
        self.optimizer = torch.optim.Adam(self.critic.parameters(), lr=lr, betas=(0.5, 0.999))

    def active(self, step):
        return self.weight > 0 and step >= self.start

    def scale(self, step):
        return self.weight * min(1.0, (step - self.start + 1) / max(self.ramp, 1))

    def region(self, x):
        y0, y1, x0, x1 = self.box
        return x[..., y0:y1, x0:x1].float()

    def generator_loss(self, pred):
        """How far the critic finds the prediction from real (its weights do not learn here)."""
        self.critic.requires_grad_(False)
        with torch.autocast(pred.device.type, enabled=False):      # fp32, as its own steps
            loss = ((self.critic(self.region(pred)) - 1) ** 2).mean()
        self.critic.requires_grad_(True)
        return loss

    def critic_step(self, pred, target):
        """One step of the critic on the batch's predictions (detached) and true frames -> its loss."""
        with torch.autocast(pred.device.type, enabled=False):
            real, fake = self.critic(self.region(target)), self.critic(self.region(pred.detach()))
            loss = 0.5 * ((real - 1) ** 2).mean() + 0.5 * (fake ** 2).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def state_dict(self):
        return {"critic": self.critic.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state):
        self.critic.load_state_dict(state["critic"])
        self.optimizer.load_state_dict(state["optimizer"])


def mask_box(mask, size=utils.INNER, align=8):
    """The bounding box (y0, y1, x0, x1) of a generator mask (bool (320, 320); None = the whole
    crop), widened to multiples of `align` px."""
    if mask is None or not np.asarray(mask).any():
        return 0, size, 0, size
    ys, xs = np.nonzero(np.asarray(mask))
    lo = lambda v: int(v) // align * align
    hi = lambda v: min(size, -(-(int(v) + 1) // align) * align)
    return lo(ys.min()), hi(ys.max()), lo(xs.min()), hi(xs.max())


def check_window(cfg, perc_kind, sync_loss):
    """UserError unless train_328's --window fits the U-Net's grid, the perceptual term and the loss terms."""
    if cfg.window and cfg.adv_weight > 0:
        raise UserError("--window trains on parts of the crop, but the adversarial term judges the whole repainted area: pass --window 0 or --adv_weight 0")
    if cfg.window and (cfg.window % STRIDE or not STRIDE <= cfg.window <= utils.INNER):
        raise UserError(f"--window {cfg.window}: a multiple of {STRIDE} from {STRIDE} to {utils.INNER} px, or 0 for whole crops")
    if cfg.window and perc_kind.startswith("msssim") and cfg.window < 192:
        raise UserError(f"--window {cfg.window}: MS-SSIM needs windows of at least 192 px; pass --window 192 or --perceptual off")
    if cfg.window and sync_loss:
        raise UserError("--window trains on parts of the crop, but the SyncNet loss needs whole crops: pass --window 0 or --sync_weight 0")


def ema_update(decay):
    """The moving average's step: decay min(decay, (1 + n) / (10 + n)) after n updates, so the
    random initial weights fade within tens of steps (a flat 0.99 kept 13% of them at step 200)."""
    def update(avg, new, n):
        d = min(decay, (1.0 + float(n)) / (10.0 + float(n)))
        if avg[0].is_floating_point():
            torch._foreach_lerp_(avg, new, 1.0 - d)
        else:                                      # BatchNorm's step counters: the newest
            torch._foreach_copy_(avg, new)
    return update


@dataclass
class Objective:
    """The loss terms of a run (train_328.Config's weights, the perceptual fn, optional heads)."""
    perc_fn: object = None            # (pred, target) -> scalar, or None
    perc_weight: float = 0.0
    mouth_weight: float = 0.0
    opening_head: OpeningHead = None  # with opening_weight > 0; it must watch() the U-Net
    opening_weight: float = 0.0
    syncnet: object = None            # frozen SyncNet for the sync term, or None
    sync_weight: float = 0.0
    sync_ramp: int = 0
    sync_from: int = 0                # the step the sync term starts at (its ramp counts from there)
    edge_weight: float = 0.0
    adversary: Adversary = None       # with adv_weight > 0

    def __call__(self, pred, target, step, mouth=None, opening=None, clip_mel=None, n_clips=0):
        """pred/target (B, 3, 320, 320); the last n_clips x T rows of the batch are clip frames
        -> (total loss, {term: value})."""
        terms = {"l1": (pred.float() - target).abs().mean()}
        if self.mouth_weight > 0:
            terms["l1_mouth"] = mouth_l1(pred.float(), target, mouth)
        if self.perc_fn is not None:
            terms["perc"] = self.perc_fn(pred, target)
        if self.edge_weight > 0:
            terms["edge"] = edge_l1(pred.float(), target)
        loss = (terms["l1"] + self.mouth_weight * terms.get("l1_mouth", 0.0) + self.perc_weight * terms.get("perc", 0.0)
                + self.edge_weight * terms.get("edge", 0.0))
        if self.adversary is not None and self.adversary.active(step):
            terms["adv"] = self.adversary.generator_loss(pred)
            loss = loss + self.adversary.scale(step) * terms["adv"]
        if self.opening_head is not None:
            terms["opening"] = self.opening_head.loss(self.opening_head.maps.pop(), opening.to(pred.device))
            loss = loss + self.opening_weight * terms["opening"]
        if n_clips:
            T = self.syncnet.T
            face = pred[-n_clips * T:].reshape(n_clips, T * 3, *pred.shape[2:])
            a_emb, v_emb = self.syncnet(face, clip_mel.to(pred.device))        # face (C, 3T, 320, 320), oldest first
            logits = self.syncnet.logits(a_emb, v_emb).float()
            terms["sync"] = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))
            loss = loss + self.sync_weight * min(1.0, (step - self.sync_from + 1) / max(self.sync_ramp, 1)) * terms["sync"]
        return loss, terms


def step_inputs(b, c, T, device, channels_last):
    """A batch of single frames b (+ clips c of T frames, each sharing one reference) -> the U-Net's
    inputs and the loss's per-row extras: x (B, 6, 320, 320), target, audio, mouth, opening, n_clips."""
    ref, masked, target, audio, mouth, opening = (b[k] for k in ("ref", "masked", "target", "audio", "mouth", "opening"))
    n_clips = 0
    if c is not None:
        n_clips = len(c["ref"])
        ref = torch.cat([ref, c["ref"].repeat_interleave(T, 0)])
        masked, target, audio, mouth, opening = (torch.cat([x, c[k].flatten(0, 1)]) for x, k in (
            (masked, "masked"), (target, "target"), (audio, "audio"), (mouth, "mouth"), (opening, "opening")))
    x = torch.cat([ref.to(device, non_blocking=True), masked.to(device, non_blocking=True)], 1)   # (B, 6, 320, 320); pinned halves copy asynchronously
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, target.to(device, non_blocking=True), audio.to(device, non_blocking=True), mouth, opening, n_clips


def pick_window(seed, step, side, size=utils.INNER):
    """The (y, x) offset of step's training window of side px in the size crop: uniform over the
    STRIDE-aligned offsets, a pure function of (seed, step) so a resumed run draws the same ones.
    For sides of 192 px and more every offset holds the crop's centre, where the mouth is; the
    borders are seen less often."""
    n = (size - side) // STRIDE + 1
    rng = np.random.default_rng([seed, step, 11])
    return tuple(int(v) * STRIDE for v in rng.integers(0, n, 2))


def cut_window(t, offset, side):
    """(..., H, W) -> the (..., side, side) window at offset (y, x)."""
    y, x = offset
    return t[..., y:y + side, x:x + side]


def train_step(model, objective, optimizer, scaler, b, c, step, device, amp=True, channels_last=True, grad_clip=1.0,
               window=None):
    """One optimizer step on batch b (+ sync clips c): forward under autocast, loss, backward,
    gradient clip, step. window ((y, x), side): train on that window of every crop (pick_window;
    not with sync clips, whose SyncNet needs whole crops). -> (pred, {term: value, "total": loss})."""
    T = objective.syncnet.T if c is not None else 0
    x, target, audio, mouth, opening, n_clips = step_inputs(b, c, T, device, channels_last)
    offset = None
    if window is not None:
        (offset, side), (y0, x0) = window, window[0]
        x, target = cut_window(x, offset, side), cut_window(target, offset, side)
        mouth = (mouth - torch.tensor([x0, y0, x0, y0])).clamp(0, side)
    with utils.autocast(device, amp, cpu=True):
        pred = model(x, audio, offset)                               # (B, 3, 320, 320) or the window
        loss, terms = objective(pred, target, step, mouth, opening, c["mel"] if c is not None else None, n_clips)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], grad_clip)
    scaler.step(optimizer)
    scaler.update()
    if objective.adversary is not None and objective.adversary.active(step):
        terms["critic"] = objective.adversary.critic_step(pred, target)
    terms["total"] = loss
    return pred, terms


@torch.no_grad()
def validate(model, loader, device, cfg):
    """Held-out frames (eval-mode BatchNorm) -> (mean L1, audio effect): the mean |prediction with
    the frame's own audio - prediction with the audio of the held-out frame half the set away|
    inside each frame's mouth box, in 0-255 levels. A generator that ignores audio scores 0; with
    a single held-out frame there is no other audio and the effect is nan."""
    model.eval()
    batches = list(loader)
    other = torch.cat([b["audio"] for b in batches])
    other = other.roll(len(other) // 2, 0)                  # (V, 32, 16, 16): another moment's audio

    def predict(x, audio):
        with utils.autocast(device, cfg.amp):
            return model(x, audio.to(device)).float()        # (B, 3, 320, 320)
    l1, effect, n = 0.0, 0.0, 0
    for b in batches:
        x = torch.cat([b["ref"], b["masked"]], 1).to(device)
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        pred = predict(x, b["audio"])
        l1 += (pred - b["target"].to(device)).abs().mean(dim=(1, 2, 3)).sum().item()
        diff = (pred - predict(x, other[n:n + len(pred)])).abs().mean(dim=1)   # (B, 320, 320)
        for d, (x0, y0, x1, y1) in zip(diff, b["mouth"].tolist()):
            effect += 255 * d[y0:y1, x0:x1].mean().item()
        n += len(pred)
    model.train()
    return l1 / max(n, 1), (effect / n if n > 1 else float("nan"))
