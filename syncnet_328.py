"""Train the SyncNet (syncnet_model.py, SPEC §6) of one person: is this audio window in sync with
these mouth frames? Unlike the reference, it is trained with off-sync negatives. Its
`audio_encoder` is the encoder whose 512-d outputs become the generator's audio features.

Training: in-sync vs >= 5-frame-shifted audio on one person's dataset, best
checkpoint by held-out accuracy on the clip's tail (its decision threshold, fitted on those
held-out pairs, is folded into the logit bias), then dataset/NAME/aud_feat.npy.

    python syncnet_328.py --name anna                        # train, then write dataset/anna/aud_feat.npy
    python syncnet_328.py --name anna --max_steps 20 --val_every 10 --batch_size 8   # CPU smoke run
    python syncnet_328.py --name anna --eval_only --eval_on anna_take2                # accuracy on another clip
    python syncnet_328.py --name anna --features_only --reference_encoder audio_visual_encoder.pth
"""
import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import media_io
import utils
from audio_features import SOURCE_REFERENCE, load_reference_encoder, read_wav, write_features
from syncnet_model import (AUDIO_K, AUDIO_STRIDE, EMB_DIM, MAX_SCALE, SYNC_T, SYNC_WIDTHS, SyncNet, audio_offsets,
                           downscale_face, load_syncnet)
from utils import BORDER, INNER, N_MELS, UserError

# --- training ---
# Trains the SyncNet of one person on dataset/NAME (crops.npy + aud.wav) with real off-sync
# negatives, picks the best checkpoint on a held-out tail of the clip, then writes the audio
# features the generator trains on (aud_feat.npy) through audio_features.py, THE audio -> features
# path for training, inference and the server alike.
@dataclass
class Config:
    name: str = ""                  # dataset name: reads dataset/NAME, writes checkpoint/NAME
    data_root: str = str(utils.DATASET_DIR)      # folder holding the datasets
    ckpt_root: str = str(utils.CHECKPOINT_DIR)   # folder holding the checkpoints
    widths: str = "light"           # face-tower widths: light, full, or a comma list of 5 ints
    region: tuple = (32, 288, 32, 288)  # (y0, y1, x0, x1) of the 320 crop the face tower sees: nose to chin, mouth centred; "()" = all of it
    face_size: tuple = (80, 80)     # (h, w) face-tower input, px: that region area-downscaled (CPU speed)
    lower_half: bool = False        # with region (): only the crop's lower half (the Wav2Lip habit; our crop starts at the nose, so it misses the mouth)
    motion_only: bool = True        # the face tower sees each frame minus the window's mean frame (pose/light cues out: less memorising)
    emb_dim: int = EMB_DIM          # [1..] embedding size of both towers
    frames: int = SYNC_T            # [2..] video frames per sample (13 with --audio_windows 3: 0.52 s; see SYNC_T)
    audio_windows: int = AUDIO_K    # [1..] 0.2 s mel windows per sample, each through the AudioEncoder
    audio_stride: int = AUDIO_STRIDE  # [1..] frames between those windows
    max_steps: int = 400            # [0..] optimizer steps (0 = only --epochs limits)
    epochs: int = 0                 # [0..] passes over the training windows (0 = only --max_steps limits); the smaller limit wins
    batch_size: int = 32            # [2..] face windows per step, each with its in-sync audio window
    group_size: int = 4             # [1..] windows per group, min_shift..max_shift apart: each other's shifted negatives
    lr: float = 1e-3                # [>0..] peak learning rate (AdamW)
    lr_min_frac: float = 0.05       # [0..1] cosine decay ends at lr * this
    lr_decay_steps: int = 0         # [0..] steps of the cosine decay (0 = the total steps of this run)
    warmup_steps: int = 30          # [0..] linear warmup, steps
    weight_decay: float = 1e-4      # [0..] AdamW weight decay
    grad_clip: float = 5.0          # [0..] max gradient norm
    val_frac: float = 0.15          # [>0..0.5] held-out contiguous tail of the clip (neighbouring frames are near-duplicates)
    val_every: int = 50             # [1..] steps between held-out evaluations and syncnet_last.pth saves
    val_pairs: int = 400            # [2..] at most this many held-out pairs (half in sync, half shifted), fixed by the seed
    min_shift: int = 5              # [1..] off-sync negatives are at least this many frames away (0.2 s)
    max_shift: int = 50             # [1..] shifted negatives are at most this many frames away (2 s)
    inbatch_negatives: bool = True  # also score audio of the other groups (>= min_shift away) as negatives
    aug_variants: int = 4           # [0..] augmented copies of the whole wav (gain, noise, speed) besides the clean one
    gain_db: float = 6.0            # [0..] random gain within +- this, dB
    snr_db: tuple = (20, 40)        # additive white noise, SNR range in dB
    speed: tuple = (0.9, 1.1)       # resampling factor range (tempo and pitch together)
    spec_mask: int = 8              # [0..80] per sample, up to this many adjacent mel bands masked (SpecAugment), bands
    tilt: float = 1.0               # [0..] per sample, a random spectral tilt of up to +- this (mel units, [-4, 4] scale) across the bands: another microphone/voice
    jitter: float = 0.1             # [0..1] face brightness / contrast jitter, fraction
    shift_px: int = 2               # [0..] face translation jitter, px at face_size
    flip: bool = True               # random horizontal flip of face windows (a mirrored mouth is still in sync)
    device: str = "auto"            # auto (cuda -> mps -> cpu), cpu, cuda, cuda:1, mps
    num_workers: int = 0            # [0..] batch-building worker processes (batches are cheap; 0 is usually fastest)
    threads: int = 0                # [0..] torch CPU threads; 0 = auto: 1 on a <= 2-core CPU (2 spinning OpenMP threads ran ~7x slower on a busy 2-core box), else torch's default
    seed: int = 0                   # [0..] seeds init, batches, augmentation and the held-out pairs
    resume: str = ""                # "" new run; "auto" (or a bare --resume) syncnet_last.pth if any; "last" or a path: must exist
    reference_encoder: str = ""     # SyncTalk_2D audio_visual_encoder.pth: initialise the audio tower from it
    write_features: bool = True     # at the end, write dataset/NAME/aud_feat.npy with the best audio encoder
    features_only: bool = False     # no training: write features with syncnet_best.pth (or --reference_encoder)
    eval_on: str = ""               # comma list of other datasets of the same person: evaluate the best checkpoint on them
    eval_only: bool = False         # no training, no features: only the --eval_on evaluation


# ---- data ------------------------------------------------------------------------------------
def check_dataset(ds_dir):
    meta = utils.load_meta(ds_dir)
    for f in (utils.CROPS, utils.AUDIO_WAV):
        if not (Path(ds_dir) / f).is_file():
            raise UserError(f"dataset {ds_dir} has no {f}; re-run: python process.py VIDEO --name {Path(ds_dir).name} --overwrite")
    return meta


def augment_wav(wav, rng, cfg):
    """One augmented copy of the whole wav: speed (resample), gain, white noise at a random SNR.
    Returns (wav, speed factor) -- audio at original time t now sits at t / speed."""
    from scipy.signal import resample_poly
    lo, hi = (float(v) for v in cfg.speed)
    down = int(round(100 * rng.uniform(lo, hi)))
    out = resample_poly(wav, 100, down).astype(np.float32)             # length S * 100 / down
    out *= 10 ** (rng.uniform(-cfg.gain_db, cfg.gain_db) / 20)
    power = float(np.mean(out.astype(np.float64) ** 2)) + 1e-12
    snr = rng.uniform(*(float(v) for v in cfg.snr_db))
    out += rng.normal(0, np.sqrt(power / 10 ** (snr / 10)), out.shape).astype(np.float32)
    return np.clip(out, -1, 1), down / 100


def audio_windows(wav, n, speed=1.0):
    """Mel windows [n, 1, 80, 16] centred on video frames 0..n-1 of a wav played `speed` times
    faster: the window centre stays on the frame, the window spans 0.2 s * speed of the original."""
    frames = (np.arange(n) + 0.5) / speed - 0.5                        # fractional frames in the resampled audio
    return media_io.mel_windows(media_io.melspectrogram(wav), frames)


def face_inputs(crops_path, model, chunk=64):
    """crops.npy [N, 328, 328, 3] -> uint8 [N, 3, h, w] face-tower inputs of `model` (its part of
    the 320 crop, area-downscaled by its own downscale_face), computed once and kept in memory."""
    crops = utils.load_npy(crops_path, mmap=True)
    out = np.empty((len(crops), 3, *model.face_size), np.uint8)
    for s in tqdm(range(0, len(crops), chunk), desc="faces", unit="chunk", leave=False):
        x = torch.from_numpy(np.ascontiguousarray(crops[s:s + chunk, BORDER:BORDER + INNER, BORDER:BORDER + INNER]))
        x = x.permute(0, 3, 1, 2).float() / 255                                  # (b, 3, 320, 320) BGR
        y = downscale_face(x, model.face_size, model.lower_half, model.region)  # (b, 3, h, w)
        out[s:s + chunk] = (y * 255).round().clamp(0, 255).to(torch.uint8).numpy()
    return out


class Clip:
    """One dataset in memory for SyncNet: faces uint8 [N, 3, h, w] and audio windows
    [V, n, 1, 80, 16] (the clean audio first, then augmented copies); n = frames covered by both
    the video and the audio, so every index below n has a face and its audio."""

    def __init__(self, ds_dir, model, aug_variants=0, aug_cfg=None, seed=0):
        self.ds_dir = Path(ds_dir)
        self.meta = check_dataset(ds_dir)
        self.faces = face_inputs(self.ds_dir / utils.CROPS, model)
        wav = read_wav(ds_dir)
        self.n = min(len(self.faces), media_io.num_frames(len(wav)))
        rng = np.random.default_rng([seed, 1])
        wins = [audio_windows(wav, self.n)]
        for _ in range(aug_variants):
            aug, speed = augment_wav(wav, rng, aug_cfg)
            wins.append(audio_windows(aug, self.n, speed))
        self.windows = np.stack(wins)                                        # (V, n, 1, 80, 16)


def face_windows(faces, starts, T=SYNC_T):
    """faces [N, 3, h, w], window starts [B] -> [B, 3T, h, w]: frames start..start+T-1, oldest first."""
    x = faces[np.asarray(starts)[:, None] + np.arange(T)]                   # (B, T, 3, h, w)
    return x.reshape(len(x), -1, *faces.shape[2:])


def shifted_frames(rng, centres, lo, hi, min_shift, max_shift):
    """For each centre frame, an audio frame min_shift..max_shift frames away (either direction,
    whichever fit) inside [lo, hi): the off-sync negatives."""
    out = np.empty(len(centres), np.int64)
    for k, c in enumerate(np.asarray(centres)):
        room = {-1: min(c - lo, max_shift), 1: min(hi - 1 - c, max_shift)}   # largest shift each way
        dirs = [d for d in (-1, 1) if room[d] >= min_shift]
        if not dirs:
            raise ValueError(f"no frame {min_shift}..{max_shift} away from {c} inside [{lo}, {hi})")
        d = dirs[rng.integers(len(dirs))]
        out[k] = c + d * rng.integers(min_shift, room[d] + 1)
    return out


def augment_faces(x, rng, jitter, shift_px, flip):
    """uint8 windows (B, 3T, h, w) -> float32 tensor in [0, 1]; one random translation (edge
    padded), flip and brightness/contrast per window, shared by its T frames (a camera effect,
    not motion)."""
    B, _, h, w = x.shape
    x = torch.from_numpy(x).float().div_(255)
    if shift_px:
        s = shift_px
        pad = F.pad(x, (s, s, s, s), mode="replicate")
        dy, dx = rng.integers(0, 2 * s + 1, (2, B))
        x = torch.stack([pad[b, :, dy[b]:dy[b] + h, dx[b]:dx[b] + w] for b in range(B)])
    if flip:
        m = torch.from_numpy(rng.random(B) < 0.5)
        x[m] = x[m].flip(-1)
    contrast = torch.from_numpy(1 + rng.uniform(-jitter, jitter, (B, 1, 1, 1))).float()
    bright = torch.from_numpy(rng.uniform(-jitter, jitter, (B, 1, 1, 1))).float()
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return ((x - mean) * contrast + mean + bright).clamp_(0, 1)


def group_frames(rng, n_groups, k, lo, hi, min_shift, max_shift):
    """n_groups groups of k centre frames in [lo, hi) -> [n_groups * k]: inside a group every two
    frames are min_shift..max_shift apart, so each one's audio is the others' shifted negative."""
    span = min(max_shift, hi - 1 - lo)                  # the largest distance inside a group
    free = span - (k - 1) * min_shift                    # slack left after the minimum gaps
    if free < 0:
        raise ValueError(f"{k} frames {min_shift} apart do not fit in [{lo}, {hi}) within {max_shift}")
    start = rng.integers(lo, hi - span, n_groups)                                # (G,)
    offs = np.sort(rng.integers(0, free + 1, (n_groups, k)), axis=1) + np.arange(k) * min_shift
    return (start[:, None] + offs).reshape(-1)


def augment_mel(mel, rng, spec_mask, tilt):
    """Mel windows (B, K, 1, 80, 16) -> a copy with one random spectral tilt (a linear ramp across
    the bands, as another microphone or voice colours the spectrum) and one masked band run per
    sample, shared by its K windows."""
    B = len(mel)
    ramp = np.linspace(-1, 1, N_MELS, dtype=np.float32)[:, None]                 # (80, 1)
    mel = mel + rng.uniform(-tilt, tilt, (B, 1, 1, 1, 1)).astype(np.float32) * ramp
    if spec_mask:
        width = rng.integers(0, spec_mask + 1, B)
        first = rng.integers(0, N_MELS - width + 1)
        for b in range(B):
            mel[b, :, :, first[b]:first[b] + width[b]] = mel[b].mean()
    return mel.clip(-utils.MEL_MAX, utils.MEL_MAX)


def clip_audio(clip, variants, centres, offsets):
    """Precomputed windows of audio variants [B] around centre frames [B] -> (B, K, 1, 80, 16);
    windows past the clip's ends repeat its first/last window."""
    frames = np.clip(np.asarray(centres)[:, None] + np.asarray(offsets)[None], 0, clip.n - 1)   # (B, K)
    return clip.windows[np.asarray(variants)[:, None], frames]


def train_batch(clip, step, cfg, hi):
    """The batch of `step`, a pure function of (seed, step) so that resume and worker processes
    replay it exactly: batch_size face windows in [0, hi) in groups of group_size, each with its
    in-sync audio windows (centred on the middle frame) from a random audio variant, SpecAugmented.
    Returns face (B, 3T, h, w), mel (B, K, 1, 80, 16), centre frames (B,), groups (B,)."""
    rng = np.random.default_rng([cfg.seed, 2, step])
    T = cfg.frames
    k = cfg.group_size
    n_groups = max(cfg.batch_size // k, 1)
    centres = group_frames(rng, n_groups, k, T // 2, hi - T + T // 2 + 1, cfg.min_shift, cfg.max_shift)
    mel = clip_audio(clip, rng.integers(0, len(clip.windows), len(centres)), centres,
                     audio_offsets(cfg.audio_windows, cfg.audio_stride))         # (B, K, 1, 80, 16)
    mel = augment_mel(mel, rng, cfg.spec_mask, cfg.tilt)
    face = augment_faces(face_windows(clip.faces, centres - T // 2, T), rng, cfg.jitter, cfg.shift_px, cfg.flip)
    groups = np.repeat(np.arange(n_groups), k)
    return face, torch.from_numpy(mel), torch.from_numpy(centres), torch.from_numpy(groups)


class StepBatches(torch.utils.data.Dataset):
    """Item k = the batch of step first + k (lets a DataLoader build batches in workers)."""

    def __init__(self, clip, cfg, hi, first, total):
        self.clip, self.cfg, self.hi, self.first, self.total = clip, cfg, hi, first, total

    def __len__(self):
        return self.total - self.first

    def __getitem__(self, k):
        return train_batch(self.clip, self.first + k, self.cfg, self.hi)


# ---- loss and metrics ------------------------------------------------------------------------
def sync_loss(model, a, v, frames, groups, min_shift, inbatch=True):
    """a, v (B, D): audio and face embeddings of the same B centre frames. Balanced BCE-with-logits
    on the B x B logits: half the weight on the B in-sync pairs (diagonal), half on negatives --
    the shifted pairs inside each group and, with inbatch, all pairs across groups >= min_shift
    frames apart (audio from other moments). Pairs closer than min_shift are not scored."""
    scale = model.logit_scale.exp().clamp(max=MAX_SCALE)
    logits = scale * v @ a.t() + model.logit_bias                           # (B, B): face i, audio j
    pos = logits.diagonal()
    far = (frames[:, None] - frames[None]).abs() >= min_shift                # (B, B)
    same = groups[:, None] == groups[None]
    hard, other = logits[far & same], logits[far & ~same]
    negs = [t for t in (hard, other if inbatch else other[:0]) if t.numel()]   # the two kinds weigh the same
    loss = 0.5 * F.softplus(-pos).mean() + 0.5 * sum(F.softplus(t).mean() for t in negs) / max(len(negs), 1)
    acc = 0.5 * (pos > 0).float().mean() + 0.5 * ((negs[0] < 0).float().mean() if negs else 0.0)
    return loss, acc


@torch.no_grad()
def embed_clip(model, clip, starts, frames, device, batch=128):
    """Unit face embeddings of windows `starts` and audio embeddings of the clean audio centred on `frames`."""
    v = [model.embed_face(torch.from_numpy(face_windows(clip.faces, starts[s:s + batch], model.T)).to(device).float() / 255)
         for s in range(0, len(starts), batch)]
    a = [model.embed_audio(torch.from_numpy(clip_audio(clip, np.zeros(len(frames[s:s + batch]), np.int64),
                                                       frames[s:s + batch], model.audio_offsets)).to(device))
         for s in range(0, len(frames), batch)]
    return torch.cat(v).float(), torch.cat(a).float()


def eval_pairs(lo, hi, n_pairs, seed, min_shift, max_shift, T=SYNC_T):
    """A fixed, seeded held-out set in [lo, hi): face windows (evenly spread, at most n_pairs / 2),
    each with its in-sync audio frame and one frame shifted by min_shift..max_shift."""
    starts = np.arange(lo, hi - T + 1)
    if len(starts) > n_pairs // 2:
        starts = starts[np.linspace(0, len(starts) - 1, max(n_pairs // 2, 1)).round().astype(np.int64)]
    centres = starts + T // 2
    return starts, centres, shifted_frames(np.random.default_rng([seed, 3]), centres, lo, hi, min_shift, max_shift)


def best_threshold(lp, ln):
    """In-sync logits lp [P] and off-sync logits ln [Q] -> (threshold, balanced accuracy of the
    rule logit > threshold): the decision threshold that separates them best, midway between
    neighbouring logits. Unseen frames score lower than the training frames the bias was fitted
    on, so the threshold is chosen on held-out pairs (a validation set, as for any classifier)."""
    lp, ln = (np.asarray(x, np.float64).ravel() for x in (lp, ln))
    cand = np.unique(np.concatenate([lp, ln]))
    cuts = np.concatenate([[cand[0] - 1], (cand[1:] + cand[:-1]) / 2, [cand[-1] + 1]])        # (C,)
    acc = 0.5 * ((lp[None] > cuts[:, None]).mean(1) + (ln[None] <= cuts[:, None]).mean(1))
    k = int(np.argmax(acc))
    return float(cuts[k]), float(acc[k])


@torch.no_grad()
def sync_metrics(model, clip, pairs, device):
    """Held-out balanced BCE and accuracy (sigmoid > 0.5 means "in sync") on fixed pairs, plus
    pair_acc: how often the in-sync audio scores above the shifted one for the same face, and
    cal_acc: the accuracy at the best threshold on these pairs (threshold: that logit)."""
    starts, pos, neg = pairs
    was_training = model.training
    model.eval()
    frames, inv = np.unique(np.concatenate([pos, neg]), return_inverse=True)
    v, a = embed_clip(model, clip, starts, frames, device)
    lp = model.logits(a[inv[:len(pos)]], v)
    ln = model.logits(a[inv[len(pos):]], v)
    model.train(was_training)
    threshold, cal_acc = best_threshold(lp.cpu().numpy(), ln.cpu().numpy())
    return {"loss": float(0.5 * F.softplus(-lp).mean() + 0.5 * F.softplus(ln).mean()),
            "cal_acc": cal_acc, "threshold": threshold,
            "acc": float(((lp > 0).float().mean() + (ln < 0).float().mean()) / 2),
            "pos_acc": float((lp > 0).float().mean()), "neg_acc": float((ln < 0).float().mean()),
            "pair_acc": float((lp > ln).float().mean()), "pairs": 2 * len(pos)}


def stretch_pair_acc(logit, n_windows, centres, n, length, min_shift, max_shift, seed, stride=5):
    """How often, over a stretch of `length` consecutive windows, the in-sync audio scores higher
    on average than the same stretch's audio shifted by one constant min_shift..max_shift frames
    (either direction): the per-window pair test, judged over a whole stretch as a sync check of a
    video does. logit(face window indices, audio frames) -> logits. Returns (accuracy, stretches)."""
    rng = np.random.default_rng([seed, 4])
    wins = []
    for s in range(0, n_windows - length + 1, stride):
        w = np.arange(s, s + length)
        c = centres[w]
        in_sync = None
        for d in (-1, 1):
            room = (c[0] if d < 0 else n - 1 - c[-1])            # the largest shift that stays in the clip
            if room >= min_shift:
                shift = d * int(rng.integers(min_shift, min(room, max_shift) + 1))
                in_sync = float(logit(w, c).mean()) if in_sync is None else in_sync
                wins.append(in_sync > float(logit(w, c + shift).mean()))
    return (float(np.mean(wins)) if wins else float("nan")), len(wins)


@torch.no_grad()
def evaluate_sync(ckpt, ds_dir, device="cpu", seed=0, max_offset=15, stretch_s=1.0):
    """Accuracy of a SyncNet checkpoint (path or model) on every window of another dataset:
    in-sync vs >= min_shift-frame-shifted pairs, per window and over stretch_s-second stretches
    (`stretch_pair_acc`), plus the mean logit for audio offsets -max_offset..max_offset frames
    (a clip in sync peaks at 0; `offset` is the peak)."""
    model, ck = load_syncnet(ckpt, device) if isinstance(ckpt, (str, Path)) else (ckpt.eval(), None)
    conf = (ck or {}).get("config", {})
    min_shift, max_shift = conf.get("min_shift", 5), conf.get("max_shift", 50)
    clip = Clip(ds_dir, model)
    if clip.n < model.T + 2 * min_shift:
        raise UserError(f"dataset {ds_dir} is too short to evaluate ({clip.n} frames)")
    out = sync_metrics(model, clip, eval_pairs(0, clip.n, 10 ** 9, seed, min_shift, max_shift, model.T), device)
    starts = np.arange(0, clip.n - model.T + 1)
    v, a = embed_clip(model, clip, starts, np.arange(clip.n), device)
    centres = starts + model.T // 2
    curve = {}
    for o in range(-max_offset, max_offset + 1):
        ok = (centres + o >= 0) & (centres + o < clip.n)
        curve[o] = float(model.logits(a[centres[ok] + o], v[ok]).mean())
    length = max(int(round(stretch_s * utils.FPS)), 1)
    out["stretch_pair_acc"], out["stretches"] = stretch_pair_acc(
        lambda w, f: model.logits(a[f], v[w]), len(starts), centres, clip.n, length, min_shift, max_shift, seed)
    out["stretch_s"] = length / utils.FPS
    out["offset"] = max(curve, key=curve.get)
    out["offset_curve"] = curve
    return out


# ---- training --------------------------------------------------------------------------------
# Fixed by the checkpoint on --resume: they shape the model, the data stream or the held-out set.
RESUME_FIXED = ("widths", "face_size", "lower_half", "region", "motion_only", "emb_dim", "frames", "audio_windows",
                "audio_stride", "seed", "val_frac", "val_pairs", "min_shift", "max_shift",
                "aug_variants", "gain_db", "snr_db", "speed")


def parse_widths(w):
    return tuple(utils.parse_widths(w, SYNC_WIDTHS))


def model_args_from(cfg):
    """SyncNet constructor arguments from the config (stored in the checkpoint as model_args)."""
    try:
        region = tuple(int(v) for v in cfg.region) or None
        face_size = tuple(int(v) for v in cfg.face_size)
    except (TypeError, ValueError):
        raise UserError(f"--region {cfg.region} / --face_size {cfg.face_size}: give comma lists of ints") from None
    if region and (len(region) != 4 or not (0 <= region[0] < region[1] <= INNER and 0 <= region[2] < region[3] <= INNER)):
        raise UserError(f"--region {cfg.region}: give y0,y1,x0,x1 with 0 <= y0 < y1 <= {INNER} and 0 <= x0 < x1 <= {INNER}")
    if len(face_size) != 2 or min(face_size) < 8:
        raise UserError(f"--face_size {cfg.face_size}: give h,w of at least 8 px each, e.g. 80,80")
    if cfg.frames < 1 or cfg.audio_windows < 1 or cfg.audio_stride < 1:
        raise UserError(f"--frames {cfg.frames} --audio_windows {cfg.audio_windows} --audio_stride {cfg.audio_stride}: all must be >= 1")
    return dict(widths=parse_widths(cfg.widths), emb_dim=cfg.emb_dim, T=cfg.frames, lower_half=cfg.lower_half,
                face_size=face_size, region=region, motion_only=cfg.motion_only,
                audio_k=cfg.audio_windows, audio_stride=cfg.audio_stride)


def lr_at(step, cfg, total):
    """Linear warmup, then cosine decay to lr * lr_min_frac at lr_decay_steps (default: the end)."""
    return utils.warmup_cosine(step, cfg.lr, cfg.warmup_steps, cfg.lr_decay_steps or total, cfg.lr_min_frac)


def split(n, cfg):
    """Train frames [0, train_hi), held-out frames [val_lo, n): a contiguous tail, with a gap of
    T frames so that no window or audio frame of one side touches the other."""
    T = max(cfg.frames, 2 * max(audio_offsets(cfg.audio_windows, cfg.audio_stride)) + 1)
    need_val, need_train = 2 * (cfg.min_shift + T), 4 * (cfg.min_shift + T)
    n_val = max(int(round(cfg.val_frac * n)), need_val)
    train_hi = n - n_val - T
    if train_hi < need_train:
        raise UserError(f"the clip has only {n} frames ({n / utils.FPS:.1f} s); SyncNet training needs at least "
                        f"{need_train + n_val + T} (minutes of video are better)")
    return train_hi, n - n_val


def train(cfg, ds_dir, ckpt_dir, device, progress=None, should_stop=None):
    """The training run; returns dict(best, val, best_path, last_path, steps, stopped)."""
    last_path, best_path = ckpt_dir / utils.SYNCNET_LAST, ckpt_dir / utils.SYNCNET_BEST
    ckpt = None
    mode = "last" if cfg.resume is True else str(cfg.resume or "")   # True: the old yes/no flag
    path = last_path if mode in ("auto", "last") else Path(mode)
    if mode and (mode != "auto" or path.is_file()):      # train_328's convention
        if not path.is_file():
            raise UserError(f"--resume {mode}: no checkpoint at {path}; start without --resume")
        ckpt = utils.load_checkpoint(path, device)
        changed = {k: (getattr(cfg, k), ckpt["config"][k]) for k in RESUME_FIXED if getattr(cfg, k) != ckpt["config"][k]}
        if changed:
            print(f"note: --resume keeps the checkpoint's {', '.join(f'{k}={v[1]}' for k, v in changed.items())}")
        cfg = dataclasses.replace(cfg, **{k: ckpt["config"][k] for k in RESUME_FIXED})
    elif last_path.exists() and not mode:
        print(f"note: starting fresh; the checkpoints in {ckpt_dir} will be replaced (--resume continues them)")
    check_dataset(ds_dir)
    torch.manual_seed(cfg.seed)
    model_args = model_args_from(cfg)
    model = SyncNet(**model_args)
    if cfg.reference_encoder and ckpt is None:
        model.audio_encoder.load_state_dict(load_reference_encoder(cfg.reference_encoder).state_dict())
    model.to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]         # biases, BN, logit scale/bias
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)

    t0 = time.time()
    clip = Clip(ds_dir, model, cfg.aug_variants, cfg, cfg.seed)
    train_hi, val_lo = split(clip.n, cfg)
    if cfg.group_size < 1 or (cfg.group_size - 1) * cfg.min_shift > min(cfg.max_shift, train_hi - cfg.frames):
        raise UserError(f"--group_size {cfg.group_size}: {cfg.group_size} windows {cfg.min_shift} frames apart "
                        f"do not fit within --max_shift {cfg.max_shift}; use a smaller group")
    if cfg.group_size == 1 and not cfg.inbatch_negatives:
        raise UserError("--group_size 1 with --no-inbatch_negatives leaves no negatives; use a group of 2 or more")
    val_pairs = eval_pairs(val_lo, clip.n, cfg.val_pairs, cfg.seed, cfg.min_shift, cfg.max_shift, cfg.frames)
    steps_per_epoch = math.ceil((train_hi - cfg.frames + 1) / cfg.batch_size)
    limits = [x for x in (cfg.max_steps, cfg.epochs * steps_per_epoch) if x > 0]
    if not limits:
        raise UserError("--max_steps and --epochs are both 0: set one of them")
    total = min(limits)
    step, best = 0, {"acc": -1.0, "loss": float("inf")}
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        step, best = ckpt["step"], ckpt["best"]
        torch.set_rng_state(ckpt["rng"].cpu())   # loaded onto the device; the CPU generator takes a CPU ByteTensor
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    utils.save_config(cfg, ckpt_dir / "syncnet_config.json")
    log_file = open(ckpt_dir / "syncnet_log.txt", "a")

    def log(line):
        tqdm.write(line)
        log_file.write(line + "\n")
        log_file.flush()

    log(f"syncnet {cfg.name}: {clip.n} frames, train [0, {train_hi}) val [{val_lo}, {clip.n}) "
        f"({val_pairs[0].size * 2} fixed pairs), {len(clip.windows)} audio variants, face {model.face_size}, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M params, device {device}, "
        f"steps {step}->{total}, data ready in {time.time() - t0:.1f} s")
    loader = torch.utils.data.DataLoader(StepBatches(clip, cfg, train_hi, step, total), batch_size=None,
                                         num_workers=cfg.num_workers)
    bar = tqdm(total=total, initial=step, desc="syncnet", unit="step")
    run = {"loss": 0.0, "acc": 0.0, "n": 0, "samples": 0, "time": 0.0}
    val, stopped = None, False
    tic = time.time()
    for face, mel, frames, groups in loader:
        lr = lr_at(step, cfg, total)
        for g in opt.param_groups:
            g["lr"] = lr
        model.train()
        with utils.autocast(device):
            a = model.embed_audio(mel.to(device))                          # (B, D)
            v = model.embed_face(face.to(device))                          # (B, D)
        loss, acc = sync_loss(model, a.float(), v.float(), frames.to(device), groups.to(device),
                              cfg.min_shift, cfg.inbatch_negatives)
        opt.zero_grad(set_to_none=True)             # the reference never cleared its gradients
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        run["loss"] += loss.item()
        run["acc"] += acc.item()
        run["n"] += 1
        run["samples"] += len(face)
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{acc.item():.2f}")
        if progress is not None:
            progress(step, total, {"loss": loss.item(), "acc": acc.item()})
        stopped = should_stop is not None and bool(should_stop())
        if step % cfg.val_every == 0 or step == total or stopped:
            run["time"] += time.time() - tic
            val = sync_metrics(model, clip, val_pairs, device)
            # chosen on accuracy at the held-out threshold; syncnet_best.pth keeps that threshold in its bias
            improved = val["cal_acc"] > best["acc"] or (val["cal_acc"] == best["acc"] and val["loss"] < best["loss"])
            if improved:
                best = {"acc": val["cal_acc"], "loss": val["loss"], "step": step, "threshold": val["threshold"],
                        "uncalibrated_acc": val["acc"]}
            state = {"model": utils.unwrap(model).state_dict(), "optimizer": opt.state_dict(), "step": step,
                     "epoch": step / steps_per_epoch, "config": dict(dataclasses.asdict(cfg), model_args=model_args),
                     "rng": torch.get_rng_state(), "best": best, "best_acc": best["acc"], "val": val}
            utils.save_checkpoint(state, last_path)
            if improved:
                calibrated = dict(state["model"], logit_bias=state["model"]["logit_bias"] - val["threshold"])
                utils.save_checkpoint(dict(state, model=calibrated), best_path)
            log(f"step {step:6d}  train loss {run['loss'] / run['n']:.4f} acc {run['acc'] / run['n']:.3f}  "
                f"val loss {val['loss']:.4f} acc {val['acc']:.3f} / {val['cal_acc']:.3f} at logit {val['threshold']:+.2f} "
                f"(pair {val['pair_acc']:.3f})  lr {lr:.2e}  "
                f"{run['samples'] / max(run['time'], 1e-9):.1f} samples/s{'  *best' if improved else ''}")
            run.update(loss=0.0, acc=0.0, n=0, samples=0, time=0.0)
            tic = time.time()
        if stopped:
            log(f"stopped at step {step}; continue with --resume")
            break
    bar.close()
    log(f"done: best val acc {best['acc']:.3f} (loss {best['loss']:.4f}) at step {best.get('step')}, "
        f"{(time.time() - t0) / 60:.1f} min -> {best_path}")
    log_file.close()
    return {"best": best, "val": val, "best_path": best_path, "last_path": last_path, "steps": step, "stopped": stopped}


def main(cfg, progress=None, should_stop=None):
    """Train (or --features_only / --eval_only); returns dict(best, val, features, eval, ...).
    progress(step, total, {"loss", "acc"}) is called after every step; should_stop() returning
    True ends training cleanly (syncnet_last.pth saved, no features written)."""
    utils.check_config(cfg)
    if not cfg.name:
        raise UserError("no dataset given: python syncnet_328.py --name NAME (the --name given to process.py)")
    ds_dir = utils.dataset_path(cfg.name, cfg.data_root)
    ckpt_dir = Path(cfg.ckpt_root) / cfg.name
    best_path = ckpt_dir / utils.SYNCNET_BEST
    device = utils.get_device(cfg.device)
    check_dataset(ds_dir)
    before = torch.get_num_threads()                # torch's default: the usable cores
    threads = cfg.threads or (1 if device.type == "cpu" and before <= 2 else 0)
    if threads:
        torch.set_num_threads(threads)
    try:
        return _run(cfg, ds_dir, ckpt_dir, best_path, device, progress, should_stop)
    finally:
        torch.set_num_threads(before)           # callers in the same process (server) keep theirs


def _run(cfg, ds_dir, ckpt_dir, best_path, device, progress, should_stop):
    others = [n.strip() for n in cfg.eval_on.split(",") if n.strip()]
    if cfg.eval_only and not others:
        raise UserError("--eval_only needs --eval_on OTHER_NAME[,...]")
    result = {}
    if cfg.features_only or cfg.eval_only:
        if cfg.reference_encoder and not cfg.eval_only:
            encoder, source = load_reference_encoder(cfg.reference_encoder), f"{SOURCE_REFERENCE}:{cfg.reference_encoder}"
        elif best_path.is_file():
            encoder, source = load_syncnet(best_path, device)[0].audio_encoder, best_path
        else:
            raise UserError(f"no trained SyncNet at {best_path}; train it first (python syncnet_328.py "
                            f"--name {cfg.name}) or pass --reference_encoder PATH")
    else:
        result = train(cfg, ds_dir, ckpt_dir, device, progress, should_stop)
        if result["stopped"]:
            return result
        encoder, source = load_syncnet(best_path, device)[0].audio_encoder, best_path
    if cfg.write_features and not cfg.eval_only:
        feats, info = write_features(ds_dir, encoder, source, device)
        print(f"features: {ds_dir / 'aud_feat.npy'} {feats.shape}, encoder {info['encoder_id']} from {source}")
        result["features"] = info
    for other in others:
        if not best_path.is_file():
            raise UserError(f"--eval_on needs a trained SyncNet at {best_path}")
        r = evaluate_sync(best_path, utils.dataset_path(other, cfg.data_root), device, seed=cfg.seed)
        print(f"eval on {other}: acc {r['acc']:.3f} (in sync {r['pos_acc']:.3f}, shifted {r['neg_acc']:.3f}), "
              f"pair acc {r['pair_acc']:.3f}, loss {r['loss']:.4f}, {r['pairs']} pairs; over {r['stretch_s']:g} s stretches: "
              f"pair acc {r['stretch_pair_acc']:.3f} ({r['stretches']}); best offset {r['offset']:+d} frames")
        result.setdefault("eval", {})[other] = r
    return result


if __name__ == "__main__":
    utils.run_main(main, utils.parse_config(Config, description=__doc__.split("\n")[0],
                                            aliases={"data": "data_root", "steps": "max_steps"}, bare={"resume": "auto"}))
