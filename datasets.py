"""Training samples for the generator, read from a processed dataset (dataset/NAME/).

    python datasets.py --name anchor                      # benchmark: crop cache vs JPEG, samples/s
    python -c "import datasets as d; print(d.split_frames(500))"      # the held-out split

A sample for frame i (SPEC §3, contract "Training sample"): the 320 inner crop of a reference
frame that is NOT i nor one of its neighbours (so the mouth cannot be copied from it, as at
inference where the template is another frame), the masked 320 crop of frame i, the true 320 crop
of frame i, and the audio-feature window [32, 16, 16] of frame i (with `voice_aug`, sometimes of an
augmented copy of the audio). BGR end to end; float in [0, 1], CHW. With `clip=T` a sample is T
consecutive frames, one reference, the mel window centred on the clip (SyncNet's sync loss).

Every random choice (reference frame, augmentation) is a pure function of (seed, epoch, frame), and
`StepBatches` makes the batch order a pure function of (seed, step): a resumed run sees exactly the
batches an uninterrupted one would, without replaying anything.

The crop cache pays, modestly: crops.npy (memmap) vs decoding frames/*.jpg, `python datasets.py
--name NAME` on a 2-core Xeon (one thread, batch 8, load 6-10: CPU ms are the figures to trust):
512x512 video (german_anchor_20s) 3.2-3.6 vs 5.3-6.7 CPU
ms/sample (194 vs 123 samples/s wall in the quieter run); 256x256 video (feifei_clip1_10s)
3.4-3.7 vs 4.4-4.8. What is left in the cached path is float conversion and batching; the JPEG
cost grows with the source resolution (1080p decodes ~8x the pixels of 512x512), the cache's
does not. On CPU neither is the bottleneck (a light batch-8 step costs ~6.7 CPU s,
bench_train.py); on a GPU a full batch-8 step of tens of ms needs a few hundred samples/s: the
cache and a couple of workers.
"""
import json
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

import audio_features
import syncnet_model
import templates
import geometry
import media_io
import utils
from utils import UserError

REF_GAP = utils.REF_GAP   # frames: a reference is more than this far from every frame of its sample (0.2 s)
AUG_GAIN = 0.1       # augmentation: brightness gain in 1 +- this (same for the whole sample)
AUG_BIAS = 0.04      # augmentation: brightness offset in +- this, in [0, 1] units


def split_frames(n, held_out=0.1, block=25):
    """Frames 0..n-1 -> (train_idx, val_idx) with a contiguous held-out TAIL: neighbouring frames
    are near duplicates, so random held-out frames would be memorised through their neighbours.
    The tail is rounded down to whole blocks of `block` frames (1 s) when it is that long."""
    if n < 2:
        raise UserError(f"the dataset has {n} frame(s); training needs at least 2")
    k = int(round(n * held_out))
    if k >= block:
        k = k // block * block
    if held_out > 0:
        k = min(max(k, 1), n // 2)
    return np.arange(n - k), np.arange(n - k, n)


def _check_dataset(ds):
    for f in (utils.CROPS, utils.META, utils.LANDMARKS):
        if not (ds / f).is_file():
            raise UserError(f"{ds} has no {f}: it is not a processed dataset; run: python process.py VIDEO --name {ds.name}")
    for f in (utils.AUD_FEAT, utils.AUD_FEAT_INFO):
        if not (ds / f).is_file():
            raise UserError(f"{ds} has no {f} (audio features); run: python syncnet_328.py --name {ds.name} first")


def read_feature_info(ds_dir):
    """aud_feat.json of a dataset (encoder_id, source, ...), with the same errors as LipDataset."""
    ds = Path(ds_dir)
    _check_dataset(ds)
    return json.loads((ds / utils.AUD_FEAT_INFO).read_text())


def feature_encoder(ds, info):
    """(state dict, id, feature source) of the audio encoder named as aud_feat.npy's maker
    (aud_feat.json "source": a SyncNet checkpoint or "reference:PATH"). The generator checkpoint
    carries it, so inference computes exactly the features the generator was trained on."""
    ds = Path(ds)
    src = str(info.get("source", ""))
    ref = src.startswith(audio_features.SOURCE_REFERENCE + ":")
    path = Path(src.split(":", 1)[1] if ref else src)
    if not src or not path.is_file():
        raise UserError(f"{ds}/aud_feat.json names audio encoder source {src!r}, which is missing; "
                        f"re-run: python syncnet_328.py --name {ds.name}")
    if ref:
        enc = audio_features.load_reference_encoder(path)
    else:
        ckpt = utils.load_checkpoint(path)
        try:
            enc = audio_features.encoder_from_state(ckpt["model"], syncnet_source(ckpt))
        except ValueError as e:
            raise UserError(f"{path} holds no usable audio encoder ({e})") from None
    return enc.state_dict(), audio_features.encoder_id(enc), audio_features.source_of(enc)


def syncnet_source(ckpt):
    """The audio feature source of a SyncNet checkpoint (those from before sources: mel)."""
    return ckpt.get("config", {}).get("model_args", {}).get("audio_source", "mel")


class LipDataset(torch.utils.data.Dataset):
    """Item k -> dict(ref, masked, target: float [3, 320, 320] in [0, 1] (BGR), audio [32, 16, 16],
    index: frame number, ref_index: the reference's frame number) for the k-th frame of `frames`.
    mouth: its mouth box (x0, y0, x1, y1) in the 320 crop; opening: its mouth opening (templates.mouth_opening). With clip=T > 1 the item is frames
    k..k+T-1: masked/target (T, 3, 320, 320), audio (T, 32, 16, 16), mouth (T, 4), mel (K, 1, 80,
    16) (a speech SyncNet's: (K, 96)): the SyncNet's audio windows (centre frame + mel_offsets), one shared ref. An item may be
    given as (k, epoch) so DataLoader workers need no shared epoch state. `mask`: the generator's
    masked area (geometry.jaw_mask), None = MASK_RECT."""

    def __init__(self, ds_dir, frames=None, seed=0, augment=False, expected_encoder_id=None,
                 clip=1, ref_frames=None, ref_gap=REF_GAP, mel_offsets=(0,), mask=None, audio_source="mel",
                 ref_by_audio=False, voice_aug=0.0, context_swap=0.0):
        ds = Path(ds_dir)
        self.ds = ds
        info = read_feature_info(ds)
        if expected_encoder_id is not None and info.get("encoder_id") != expected_encoder_id:
            raise UserError(f"{ds}/aud_feat.npy was made by audio encoder {info.get('encoder_id')}, not "
                            f"{expected_encoder_id}; re-run: python syncnet_328.py --name {ds.name}")
        self.encoder_id = info.get("encoder_id")
        n = utils.load_npy(ds / utils.CROPS, mmap=True).shape[0]   # header only; workers reopen lazily
        self.feats = utils.load_npy(ds / utils.AUD_FEAT).astype(np.float32, copy=False)   # (>=N, 512)
        if self.feats.ndim != 2 or len(self.feats) < n:
            raise UserError(f"{ds}/aud_feat.npy has shape {self.feats.shape}, fewer rows than the {n} "
                            f"frames; re-run: python syncnet_328.py --name {ds.name}")
        self.voice_aug, z = voice_aug, utils.load_npy(ds / utils.AUD_FEAT_AUG) if voice_aug > 0 else None  # share of items heard in another voice
        if z is not None and (str(z["encoder_id"]) != self.encoder_id or z["feats"].shape[1] < n):
            raise UserError(f"{ds}/{utils.AUD_FEAT_AUG} was not made with aud_feat.npy's encoder; re-run: "
                            f"python syncnet_328.py --name {ds.name} --features_only --feature_variants 4")
        self.variants = None if z is None else z["feats"]                                 # (K, >=N, 512) float16
        frames = np.arange(n) if frames is None else np.asarray(frames, np.int64)
        if len(frames) and (frames.min() < 0 or frames.max() >= n):
            raise ValueError(f"frames outside 0..{n - 1}")
        self.n, self.clip, self.seed, self.augment, self.ref_gap = n, clip, seed, augment, ref_gap
        long = n >= utils.LONG_RECORDING_S * utils.FPS     # -1 = auto: swap on recordings of a minute or more (as the speech source)
        self.context_swap, self.swap_auto = (CONTEXT_AUTO * long if context_swap < 0 else context_swap), context_swap < 0
        self.mel_offsets = tuple(mel_offsets)
        lm320 = templates.dataset_landmarks320(ds, n)   # per-frame mouth boxes in the 320 crop, for held-out metrics
        self.mouth = np.array([geometry.mouth_box(lm) for lm in lm320], np.int64)   # (N, 4) x0, y0, x1, y1
        self.opening = templates.mouth_opening(lm320).astype(np.float32)          # (N,) inner-lip gap / width
        self.partners = context_partners(lm320, frames) if self.context_swap > 0 else None   # (N, CONTEXT_TOPK) lenders
        self.mask = None if mask is None else np.asarray(mask, bool)             # (320, 320); None = MASK_RECT
        # Clip starts: every frame of the clip must be in the subset (e.g. stay inside the train split).
        inset = np.zeros(n + clip, bool)
        inset[frames] = True
        self.items = np.array([i for i in frames if inset[i:i + clip].all()], np.int64)
        self.ref_pool = np.sort(np.asarray(frames if ref_frames is None else ref_frames, np.int64))
        if len(self.ref_pool) < 2:
            raise UserError(f"{ds}: need at least 2 frames to draw reference frames from")
        self.pool_keys = frame_keys(self.feats, self.ref_pool) if ref_by_audio else None   # (P, 512): --reference audio
        self.mel = None
        if clip > 1 and audio_source != "mel":      # a speech/both SyncNet reads per-frame inputs, not the mel alone
            self.mel = audio_features.sync_inputs(audio_features.read_wav(ds), audio_source)  # (n_frames, 96 | 1376)
        elif clip > 1:
            if not (ds / utils.MEL).is_file():
                raise UserError(f"{ds} has no mel.npy; run: python process.py VIDEO --name {ds.name}")
            self.mel = utils.load_npy(ds / utils.MEL)                  # (80, T_mel)
        self.epoch = 0
        self._crops = None

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.items)

    @property
    def crops(self):
        if self._crops is None:   # opened per process: a memmap must not be pickled into workers
            self._crops = utils.load_npy(self.ds / utils.CROPS, mmap=True)   # (N, 328, 328, 3) uint8 BGR
        return self._crops

    def __getstate__(self):
        return {**self.__dict__, "_crops": None}

    def pick_reference(self, i, rng):
        """A frame of the reference pool at least ref_gap frames from every frame of sample i (with
        pool keys: one of the BANK_TOPK that sound most like the sample's middle frame)."""
        pool, lo, hi = self.ref_pool, i - self.ref_gap, i + self.clip - 1 + self.ref_gap
        if self.pool_keys is not None:
            sim = self.pool_keys @ frame_keys(self.feats, [i + self.clip // 2])[0]
            sim[(pool >= lo) & (pool <= hi)] = -np.inf
            top = np.argsort(-sim, kind="stable")[:BANK_TOPK]
            top = top[np.isfinite(sim[top])]
            if len(top):
                return int(pool[top[rng.integers(len(top))]])
        for _ in range(32):
            j = int(pool[rng.integers(len(pool))])
            if j < lo or j > hi:
                return j
        far = pool[(pool < lo) | (pool > hi)]   # tiny pools: fall back to any allowed frame
        if len(far):
            return int(far[rng.integers(len(far))])
        return int(pool[np.argmax(np.abs(pool - i))])

    def bank(self):
        """The reference pool as a checkpoint's ref_bank (--reference audio): frame index (P,), inner
        320 crops (P, 320, 320, 3) uint8 BGR and audio keys (P, 512), as tensors."""
        keys = self.pool_keys if self.pool_keys is not None else frame_keys(self.feats, self.ref_pool)
        crops = np.stack([geometry.inner(self.load_crop(int(j))) for j in self.ref_pool])
        return dict(index=torch.from_numpy(self.ref_pool.copy()), crops=torch.from_numpy(np.ascontiguousarray(crops)),
                    keys=torch.from_numpy(np.ascontiguousarray(keys)))

    def load_crop(self, i):
        """Frame i's 328 crop (uint8 BGR); the JPEG benchmark overrides this."""
        return self.crops[i]

    def swap_note(self):
        """'; context swap ...' for the training log: the share of frames that have a lender."""
        if self.partners is None:
            return f"; no context swap (auto: the recording is under {utils.LONG_RECORDING_S:g} s)" if self.swap_auto else ""
        return (f"; context swap {self.context_swap:g} of the samples of the {(self.partners[self.items] >= 0).any(1).mean():.0%}"
                f" of frames with a lender (0.16-1 s away, the head within {CONTEXT_FIT:g} px)")

    def swap_context(self, cur, i, rng, light=None):
        """--context_swap: frame i's crop (1, 320, 320, 3) with everything outside the masked area
        taken from one of its context_partners (the mouth still frame i's), so that what the
        network sees around the hole tells it nothing of how far this mouth is open, as at
        inference, where the template frame's surroundings belong to another moment."""
        lenders = self.partners[i][self.partners[i] >= 0]
        if not len(lenders):
            return cur
        c = int(lenders[rng.integers(len(lenders))])
        ctx = geometry.inner(self.load_crop(c))
        if light is not None:
            ctx = np.clip(ctx * light[0] + light[1], 0, 255).astype(np.uint8)
        hole = geometry.rect_mask() if self.mask is None else self.mask
        return np.where(hole[None, ..., None], cur, ctx[None])

    def __getitem__(self, item):
        k, epoch = item if isinstance(item, tuple) else (item, self.epoch)
        i = int(self.items[k])
        rng = np.random.default_rng([self.seed, epoch, i])
        j = self.pick_reference(i, rng)
        ref = geometry.inner(self.load_crop(j))                                                # (320, 320, 3)
        cur = np.stack([geometry.inner(self.load_crop(f)) for f in range(i, i + self.clip)])  # (T, 320, 320, 3)
        if self.augment:   # a lighting change of the whole scene, applied before masking as at inference
            gain = np.float32(1 + rng.uniform(-AUG_GAIN, AUG_GAIN))
            bias = np.float32(255 * rng.uniform(-AUG_BIAS, AUG_BIAS) + 0.5)   # + 0.5: round, not floor
            ref, cur = (np.clip(x * gain + bias, 0, 255).astype(np.uint8) for x in (ref, cur))
        if self.clip == 1 and self.context_swap > 0 and rng.random() < self.context_swap:
            cur = self.swap_context(cur, i, rng, (gain, bias) if self.augment else None)
        masked = geometry.mask_inner(cur, self.mask)
        feats = self.feats if self.variants is None or rng.random() >= self.voice_aug else \
            self.variants[rng.integers(len(self.variants))]           # the same words in another voice
        audio = np.stack([media_io.feature_window(feats, f) for f in range(i, i + self.clip)])  # (T, 32, 16, 16)
        out = dict(ref=_tensor(ref), masked=_tensor(masked), target=_tensor(cur), audio=torch.from_numpy(audio),
                   mouth=torch.from_numpy(self.mouth[i:i + self.clip]),
                   opening=torch.from_numpy(self.opening[i:i + self.clip]), index=i, ref_index=j)
        if self.clip == 1:
            out.update(masked=out["masked"][0], target=out["target"][0], audio=out["audio"][0], mouth=out["mouth"][0],
                       opening=out["opening"][0])
        else:   # the SyncNet's mel windows around the clip's middle frame
            out["mel"] = torch.from_numpy(syncnet_model.audio_input(self.mel, [i + self.clip // 2], self.mel_offsets)[0])  # (K, 1, 80, 16)
        return out


def generator_mask(ds_dir, frames, kind):
    """The masked area (bool (320, 320), or None for MASK_RECT) a generator of mask `kind` trains
    and runs with, from the landmarks of the dataset's `frames` (geometry.jaw_mask)."""
    if kind not in utils.MASKS:
        raise UserError(f"--mask {kind!r}: choose {' or '.join(utils.MASKS)}")
    if kind == "rect":
        return None
    z = utils.load_npy(Path(ds_dir) / utils.LANDMARKS)
    idx = np.asarray(frames, np.int64)
    return geometry.jaw_mask(geometry.to_crop_coords(z["lms"][idx], z["crop_boxes"][idx]), up=0.0 if kind == "under_nose" else None)


CONTEXT_AUTO = 0.25                # --context_swap -1 (auto): the share on recordings of utils.LONG_RECORDING_S or more, else 0
CONTEXT_GAP = (4, 25)              # --context_swap: frames (0.16-1 s) between a sample and the frame lending its surroundings
CONTEXT_TOPK = 3                   # ... one of the this many in that window whose head sits nearest the sample's
CONTEXT_FIT = 2.0                  # ... and within this mean distance (px in the 320 crop) of its brows, nose, eye corners


def context_partners(lm320, frames, gap=CONTEXT_GAP, k=CONTEXT_TOPK, fit=CONTEXT_FIT):
    """--context_swap's lenders: for each frame i of `frames`, the k frames of `frames` gap[0]..gap[1]
    away whose brows, nose and eye corners (utils.UPPER_FACE) lie nearest frame i's in the crop, and
    no farther than `fit` px on average, so the borrowed surroundings fit the head's pose (a random neighbour
    of a moving head does not: RESULTS.md round 42). int64 (N, k) over all N frames, -1 where fewer qualify."""
    frames, n, up = np.asarray(frames, np.int64), len(lm320), np.asarray(lm320, np.float64)[:, utils.UPPER_FACE]
    inset, out = np.zeros(n + gap[1] + 1, bool), np.full((n, k), -1, np.int64)
    inset[frames] = True
    offsets = np.concatenate([-np.arange(gap[1], gap[0] - 1, -1), np.arange(gap[0], gap[1] + 1)])
    for i in frames:
        c = (i + offsets)[inset[i + offsets]]       # i + offsets < 0 wraps to the padded, unset tail
        dist = np.linalg.norm(up[c] - up[i], axis=-1).mean(-1)
        best = c[np.argsort(dist, kind="stable")[:k]][np.sort(dist)[:k] <= fit]
        out[i, :len(best)] = best
    return out
REFERENCES = ("random", "closed", "audio")   # training's reference pool: any training frame, the closed-mouth share, or the audio bank
CLOSED_SHARE = 0.1                 # --reference closed: the 10% of training frames with the most closed mouth
BANK_SIZE = 64                     # --reference audio: training frames in the bank (k-means of their audio keys; saved in the checkpoint)
BANK_TOPK = 3                      # --reference audio: a training sample's reference is one of the bank's this many nearest in sound


def frame_keys(feats, frames):
    """media_io.audio_key of each of `frames` (int array) of audio-encoder vectors feats (T, 512) -> (len, 512)."""
    frames = np.asarray(frames, np.int64)
    out = np.zeros((len(frames), feats.shape[1]), np.float32)
    for s in range(0, len(frames), 512):
        out[s:s + 512] = media_io.audio_key(np.stack([media_io.feature_window(feats, int(f)) for f in frames[s:s + 512]]))
    return out


def audio_bank(keys, size=BANK_SIZE, seed=0, iters=20):
    """Indices (sorted, unique) into `keys` (N, 512 unit vectors) of up to `size` frames that cover
    the sounds: spherical k-means, then each cluster's frame nearest its centre."""
    n = len(keys)
    if n <= size:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    cent = keys[rng.choice(n, size, replace=False)]
    for _ in range(iters):
        lab = np.argmax(keys @ cent.T, axis=1)
        for c in range(size):
            members = keys[lab == c]
            if len(members):
                m = members.sum(0)
                cent[c] = m / max(float(np.linalg.norm(m)), 1e-8)
    return np.unique(np.argmax(keys @ cent.T, axis=0))


def reference_pool(ds_dir, frames, kind):
    """The frames a training sample's reference is drawn from: all `frames` (random, the reference
    design), the CLOSED_SHARE of them that templates.closed_score ranks best (closed), so that
    training sees references like inference's default one (the template's most closed mouth), or
    the BANK_SIZE of them that cover the sounds (audio: audio_bank; a sample's reference is then
    one that sounds like it, and inference --reference audio picks from the same bank)."""
    if kind not in REFERENCES:
        raise UserError(f"--reference {kind!r}: choose {' or '.join(REFERENCES)}")
    frames = np.asarray(frames, np.int64)
    if kind == "random":
        return frames
    if kind == "audio":
        return np.sort(frames[audio_bank(frame_keys(utils.load_npy(Path(ds_dir) / utils.AUD_FEAT), frames))])
    z = utils.load_npy(Path(ds_dir) / utils.LANDMARKS)
    score = templates.closed_score(z["lms"][frames], z["crop_boxes"][frames])
    keep = max(2, int(round(CLOSED_SHARE * len(frames))))
    return np.sort(frames[np.argsort(score, kind="stable")[:keep]])


def _tensor(a):
    """(..., H, W, 3) uint8 -> (..., 3, H, W) float in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(a)).movedim(-1, -3).float().div_(255)


class JpegLipDataset(LipDataset):
    """The same samples decoded from frames/*.jpg and cropped on the fly (benchmark baseline)."""

    def __init__(self, ds_dir, *args, **kw):
        super().__init__(ds_dir, *args, **kw)
        self.boxes = np.load(self.ds / utils.LANDMARKS)["crop_boxes"]

    def load_crop(self, i):
        return geometry.crop_face(cv2.imread(str(utils.frame_file(self.ds / utils.FRAMES_DIR, i))), self.boxes[i])


class StepBatches(torch.utils.data.Sampler):
    """Endless batch sampler: the batch of step s is a pure function of (seed, s), so a resumed run
    starts at any step without replaying. Each epoch is a fresh permutation of the items; a global
    batch of batch_size * world items is cut per step (the incomplete tail is dropped) and rank r
    takes its slice (this replaces DistributedSampler, whose order cannot be entered mid-epoch).
    Yields lists of (item, epoch) for LipDataset."""

    def __init__(self, n_items, batch_size, seed=0, start_step=0, rank=0, world=1, salt=0, weights=None):
        self.n, self.b, self.seed, self.start, self.rank, self.world, self.salt = \
            n_items, batch_size, seed, start_step, rank, world, salt
        self.p = None if weights is None else np.asarray(weights, np.float64) / np.sum(weights)
        self.per_epoch = n_items // (batch_size * world)
        if self.per_epoch < 1:
            raise UserError(f"{n_items} training samples are fewer than one batch of {batch_size} x "
                            f"{world} process(es); lower --batch_size or use a longer video")

    def batch(self, step):
        epoch, pos = divmod(step, self.per_epoch)
        if self.p is not None:          # weighted: drawn with replacement, still a pure function of the step
            g = np.random.default_rng([self.seed, self.salt, 2, step]).choice(self.n, self.b * self.world, p=self.p)
            return [(int(k), epoch) for k in g[self.rank * self.b:(self.rank + 1) * self.b]]
        perm = np.random.default_rng([self.seed, self.salt, epoch]).permutation(self.n)
        g = perm[pos * self.b * self.world:(pos + 1) * self.b * self.world]
        return [(int(k), epoch) for k in g[self.rank * self.b:(self.rank + 1) * self.b]]

    def __iter__(self):
        step = self.start
        while True:
            yield self.batch(step)
            step += 1


def opening_weights(opening, w):
    """Sampling weights of training frames by their mouth opening: 1 + w x |z|, z the opening's
    distance from its median in robust standard deviations (capped at 3), so the wide-open and
    the tightly closed frames, the extremes an L1-trained mouth under-shoots, come up more often."""
    return 1.0 + w * np.minimum(np.abs(templates.robust_z(opening)), 3.0)


# ----------------------------------------------------------------------------------------------
# Benchmark: the crop cache vs decoding JPEG frames.
@dataclass
class Config:
    name: str = ""                          # dataset name under --data_root (aud_feat.npy is faked if absent)
    data_root: str = str(utils.DATASET_DIR)  # where datasets live
    samples: int = 200                      # samples read per variant
    num_workers: int = 0                    # DataLoader workers; 0 = in-process, so CPU time per sample is measurable
    batch_size: int = 8                     # DataLoader batch size


def _rate(ds, cfg):
    """(samples/s wall, CPU ms per sample in this process) over cfg.samples samples."""
    loader = torch.utils.data.DataLoader(ds, batch_sampler=StepBatches(len(ds), cfg.batch_size),
                                         num_workers=cfg.num_workers)
    it, n = iter(loader), 0
    next(it)                                # worker start-up and first file opens are not part of the rate
    t0, c0 = time.perf_counter(), time.process_time()
    while n < cfg.samples:
        n += len(next(it)["index"])
    return n / (time.perf_counter() - t0), 1e3 * (time.process_time() - c0) / n


def main(cfg):
    import tempfile
    ds = utils.dataset_path(cfg.name, cfg.data_root)
    meta = utils.load_meta(ds)
    with tempfile.TemporaryDirectory() as tmp:
        if not (ds / utils.AUD_FEAT).is_file():   # the benchmark reads crops, features may be random
            n = np.load(ds / utils.CROPS, mmap_mode="r").shape[0]
            fake = Path(tmp) / ds.name
            fake.mkdir()
            for f in (utils.CROPS, utils.META, utils.LANDMARKS, utils.FRAMES_DIR):
                (fake / f).symlink_to(ds / f)
            np.save(fake / utils.AUD_FEAT, np.zeros((n, utils.FEAT_DIM), np.float32))
            (fake / utils.AUD_FEAT_INFO).write_text(json.dumps({"encoder_id": "none"}))
            ds = fake
        torch.set_num_threads(1)            # as in a DataLoader worker
        (cache, cache_ms), (jpeg, jpeg_ms) = _rate(LipDataset(ds), cfg), _rate(JpegLipDataset(ds), cfg)
    print(utils.hardware(torch.device("cpu")))
    print(f"{cfg.num_workers} worker(s), {meta.get('width')}x{meta.get('height')} video, {meta.get('frames')} frames, "
          f"batch {cfg.batch_size}")
    cpu = lambda ms: f", {ms:5.1f} CPU ms/sample" if cfg.num_workers == 0 else ""
    print(f"crops.npy cache : {cache:7.1f} samples/s{cpu(cache_ms)}")
    print(f"frames/*.jpg    : {jpeg:7.1f} samples/s{cpu(jpeg_ms)}   (the cache is {cache / jpeg:.1f}x faster)")


if __name__ == "__main__":
    utils.run_main(main, utils.parse_config(Config, description=__doc__.split("\n")[0]))
