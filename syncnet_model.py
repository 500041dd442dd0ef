"""The SyncNet for the 320 crop (SPEC §6), nn.Modules only: is this audio window in sync with these
mouth frames? Trained by syncnet_328.py; its `audio_encoder` makes the generator's audio features.

A face tower embeds T (5) consecutive 320x320 crops (the nose-to-chin part, as motion), an
audio tower embeds the matching 0.2 s of audio: K (1) mel windows of 0.2 s, 4 frames apart,
each through the Wav2Lip AudioEncoder (or, with audio_source "speech", K frozen speech embeddings
through the SpeechEncoder head; with "both", K [mel window | speech embedding] rows through both, summed;
audio_features.py), joined by a small head. Both embeddings are L2-normalised
and their scaled cosine is a logit for BCE-with-logits.

    python -c "import torch, syncnet_model as s; a, v = s.SyncNet()(torch.rand(2, 15, 320, 320), torch.randn(2, 1, 1, 80, 16)); print(a.shape, v.shape)"
"""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import media_io
import utils
from unet_328 import BOTH_DIM, SPEECH_DIM, Conv2dBlock, check_shape, make_audio_encoder
from utils import FEAT_DIM, INNER, MEL_WIN, N_MELS, UserError

# Face-tower widths, one stride-2 stage each: 160x320 -> 80x160 -> 40x80 -> 20x40 -> 10x20 -> 5x10.
SYNC_WIDTHS = {"full": (32, 64, 128, 256, 512), "light": (16, 32, 64, 128, 256)}
SYNC_T = 5           # consecutive video frames per sample (0.2 s at 25 fps = one 16-frame mel window)
AUDIO_K = 1          # mel windows per sample, AUDIO_STRIDE frames apart, each through the AudioEncoder
AUDIO_STRIDE = 4     # frames between them: 3 windows 4 frames apart span the same 0.52 s as 13 frames
# Longer samples (--frames 13 --audio_windows 3) were measured against these defaults on
# andrew_clip1 -> andrew_clip2, 2 seeds each: held-out accuracy 0.665 vs 0.672, pair accuracy
# 0.736 vs 0.719 -- no better within the noise, at twice the cost (and 13 generated frames per
# sync clip in train_328). Kept as options for longer recordings.
EMB_DIM = 256        # embedding size of both towers
INIT_SCALE = 10.0    # initial logit scale: cosines in [-1, 1] need stretching to reach confident logits
MAX_SCALE = 100.0    # cap on the learned scale, so the logits cannot blow up
MOTION_GAIN = 4.0    # motion_only: frame-minus-mean differences are small; stretch them toward the pixel range


def sync_logits(a_emb, v_emb, scale, bias=0.0):
    """Unit embeddings (B, D), (B, D) -> in-sync logits (B,) = scale * cosine + bias."""
    return scale * (a_emb * v_emb).sum(dim=1) + bias


def audio_offsets(k=AUDIO_K, stride=AUDIO_STRIDE):
    """Frame offsets of the k mel windows around a sample's centre frame, e.g. (-4, 0, 4)."""
    return tuple((i - k // 2) * stride for i in range(k))


def audio_input(inputs, centres, offsets):
    """What audio_features.sync_inputs gives for a whole wav, centre frames [N], offsets [K] ->
    SyncNet audio input for frames centre + offset. From a mel [80, T]: [N, K, 1, 80, 16], the 0.2 s
    windows centred on those frames (silence outside the audio); from speech embeddings [T, 96]:
    [N, K, 96] (frames outside the audio read the nearest edge frame, whose window is mostly the
    silence around it). THE audio geometry of the sync expert, shared by generator training and
    evaluation."""
    frames = np.asarray(centres)[:, None] + np.asarray(offsets)[None]          # (N, K)
    if inputs.ndim == 2 and inputs.shape[1] in (SPEECH_DIM, BOTH_DIM) and inputs.shape[0] != N_MELS:   # per-frame inputs
        return inputs[np.clip(frames, 0, len(inputs) - 1)]
    return media_io.mel_windows(inputs, frames.reshape(-1)).reshape(len(frames), len(offsets), 1, N_MELS, MEL_WIN)


def face_box(lower_half=True, region=None):
    """The part of the 320 crop the face tower sees: (y0, y1, x0, x1), half-open."""
    if region:
        return tuple(region)
    return (INNER // 2 if lower_half else 0, INNER, 0, INNER)


def downscale_face(face, face_size, lower_half=True, region=None):
    """320 crops (B, C, 320, 320), any C -> (B, C, *face_size): the rows/cols `region` = (y0, y1,
    x0, x1) of the crop if given, else its lower half when lower_half (face_box), then an area
    downscale. A face already cut to that box: pass lower_half=False and no region."""
    y0, y1, x0, x1 = face_box(lower_half, region)
    face = face[:, :, y0:y1, x0:x1]
    if tuple(face.shape[2:]) != tuple(face_size):
        face = F.interpolate(face, size=tuple(face_size), mode="area")
    return face


class SyncNet(nn.Module):
    """forward(face (B, 3T, 320, 320) in [0, 1], audio (B, K, 1, 80, 16); with audio_source "speech"
    (B, K, 96), "both" (B, K, 1376)) -> (a_emb, v_emb), each
    (B, emb_dim) with unit L2 norm. Frames are stacked along channels, oldest first; the K mel
    windows are centred on the middle frame + audio_offsets(K, stride) (audio_input builds them;
    with K = 1 a plain (B, 1, 80, 16) window is accepted too). Each window goes through the
    AudioEncoder; the head joins their 512-d vectors. The face
    tower sees `region` of the crop (default: its lower half, or all of it with lower_half=False)
    area-downscaled to `face_size`; with motion_only, each frame minus the window's mean frame."""

    def __init__(self, widths=SYNC_WIDTHS["full"], emb_dim=EMB_DIM, T=SYNC_T, lower_half=True, face_size=None,
                 region=None, motion_only=False, audio_k=AUDIO_K, audio_stride=AUDIO_STRIDE, audio_source="mel",
                 opening_head=False):
        super().__init__()
        self.audio_source = audio_source
        self.T, self.lower_half, self.motion_only = T, lower_half, motion_only
        self.audio_offsets = audio_offsets(audio_k, audio_stride)
        # region (y0, y1, x0, x1): the part of the 320 crop the face tower sees (overrides lower_half).
        self.region = tuple(int(v) for v in region) if region else None
        # (h, w) the face tower sees; None = that part at full resolution. A smaller size (e.g.
        # (80, 160)) is an area downscale, for CPU training speed.
        full = ((self.region[1] - self.region[0], self.region[3] - self.region[2]) if self.region else
                (INNER // 2, INNER) if lower_half else (INNER, INNER))
        self.face_size = tuple(int(v) for v in face_size) if face_size else full
        # Stride-2 conv stages; the middle ones also get a residual 3x3 conv (cheap there, at
        # <= 40x80 px), the widest stage none to keep the parameter count down.
        layers, cin = [], 3 * T
        for i, w in enumerate(widths):
            layers.append(Conv2dBlock(cin, w, 3, 2, 1))
            if 1 <= i < len(widths) - 1:
                layers.append(Conv2dBlock(w, w, 3, 1, 1, residual=True))
            cin = w
        self.face_encoder = nn.Sequential(*layers)
        # Averaging over the last map keeps the head small; by then each cell sees the whole mouth.
        self.face_head = nn.Linear(cin, emb_dim)
        self.audio_encoder = make_audio_encoder(audio_source)   # mel: Wav2Lip AudioEncoder; speech: SpeechEncoder head; both: the two
        self.audio_head = nn.Sequential(nn.Linear(FEAT_DIM * audio_k, FEAT_DIM), nn.ReLU(inplace=True),
                                        nn.Linear(FEAT_DIM, emb_dim))
        # Learned as a log so it stays positive; the bias lets "in sync" start at any cosine.
        self.logit_scale = nn.Parameter(torch.tensor(math.log(INIT_SCALE)))
        self.logit_bias = nn.Parameter(torch.zeros(()))
        # opening_head: a linear read-out of the mouth opening from the centre window's 512-d vector
        # (the per-frame feature the generator gets), trained beside the sync loss (--opening_weight)
        self.opening_head = nn.Linear(FEAT_DIM, 1) if opening_head else None

    def prepare_face(self, face):
        """Full crops (B, 3T, 320, 320) -> face-tower input (B, 3T, *face_size): the region (or
        lower half), area-downscaled (integer factors: the same pixels as geometry.resize's INTER_AREA)."""
        check_shape(face, (3 * self.T, INNER, INNER), "SyncNet face")
        return downscale_face(face, self.face_size, self.lower_half, self.region)

    def embed_face(self, face):
        """face: full crops (B, 3T, 320, 320) or prepare_face output (B, 3T, *face_size)."""
        if face.dim() != 4 or tuple(face.shape[2:]) != self.face_size:
            face = self.prepare_face(face)
        check_shape(face, (3 * self.T, *self.face_size), "SyncNet face")
        if self.motion_only:
            # each frame minus the window's mean frame: the static look (pose, light) is gone
            B = face.shape[0]
            f = face.reshape(B, self.T, 3, *self.face_size)
            face = (f - f.mean(dim=1, keepdim=True)).reshape(B, 3 * self.T, *self.face_size) * MOTION_GAIN
        x = self.face_encoder(face)                         # (B, C, h/32, w/32)
        return F.normalize(self.face_head(x.mean(dim=(2, 3))), dim=1)   # (B, emb_dim)

    def embed_audio(self, mel, with_feature=False):
        """-> (B, emb_dim) unit embeddings; with_feature: also the centre window's 512-d encoder vector."""
        K = len(self.audio_offsets)
        one = tuple(self.audio_encoder.input_shape)
        if K == 1 and mel.dim() == len(one) + 1:
            mel = mel[:, None]                                                  # (B, 1, *one)
        check_shape(mel, (K, *one), "SyncNet audio")
        e = self.audio_encoder(mel.flatten(0, 1)).reshape(len(mel), K * FEAT_DIM)   # (B, K * 512)
        emb = F.normalize(self.audio_head(e), dim=1)                            # (B, emb_dim)
        return (emb, e[:, (K // 2) * FEAT_DIM:(K // 2 + 1) * FEAT_DIM]) if with_feature else emb

    def forward(self, face, mel):
        return self.embed_audio(mel), self.embed_face(face)

    def logits(self, a_emb, v_emb):
        """In-sync logits (B,) with the learned scale and bias, for BCE-with-logits."""
        return sync_logits(a_emb, v_emb, self.logit_scale.exp().clamp(max=MAX_SCALE), self.logit_bias)


def load_syncnet(path, device="cpu"):
    """Checkpoint path -> (SyncNet in eval mode on device, checkpoint dict)."""
    ckpt = utils.load_checkpoint(path, device)
    if "model_args" not in ckpt.get("config", {}):
        raise UserError(f"{path} is not a SyncNet checkpoint (no config.model_args)")
    model = SyncNet(**{"audio_k": 1, **ckpt["config"]["model_args"]})   # checkpoints before audio_k had one window
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt
