"""The lip-sync metrics of evaluate.py: pure numpy functions of arrays (image quality, mouth
landmarks, opening tracks against the truth, silence, jitter, the paste seam) and our SyncNet's
confidence on a clip. Conventions: lag > 0 means the generated mouth moves LATER than the truth
(or than the audio)."""
import math

import cv2
import numpy as np

import templates
import geometry
import utils
from utils import MOUTH

# ----------------------------------------------------------------------------------------------
# Thresholds of the metrics (documented once, used by the functions below)
JITTER_MARGIN = 0.1      # the same for the one fixed jitter box (its extent already spans the whole clip's motion)
CHANCE_SHIFT = 25        # frames: circular shifts at least this far (1 s) give the chance level of an r
SILENCE_FLOOR_DB = 6.0   # a frame is silent when its loudness is within this many dB of the clip's noise floor...
SILENCE_MIN_DB = -60.0   # ... (the floor is the 2nd percentile, taken as at least this dBFS: digital silence is not a floor)...
SILENCE_CONTRAST_DB = 15.0  # ... and at least this far below the loud speech (95th percentile); clips without that contrast have no silence
SILENCE_HOLD = 2         # frames: a silent frame also needs silence this many frames each side (lips move before/after sound)
CLOSED_SHARE = 0.25      # mouth counts as closed below p10 + this x (p90 - p10) of the TRUE opening track
SEAM_PAD = 3             # px (328 crop): the seam band = the paste alpha's transition zone grown by this much
SYNC_MAX_OFFSET = 15     # frames: SyncNet offsets searched each way
SYNC_STRETCH_S = 1.0     # s: the stretch over which sync is judged for stretch_acc
SYNC_MIN_SHIFT = 5       # frames: the smallest audio shift stretch_acc compares against (0.2 s, as SyncNet training)


# ----------------------------------------------------------------------------------------------
# Metrics: pure numpy functions of arrays
def psnr(a, b, data_range=255.0):
    """PSNR (dB) of two images of the same shape; inf when identical."""
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return math.inf if mse == 0 else float(10 * np.log10(data_range ** 2 / mse))


def ssim(a, b, data_range=255.0):
    """SSIM (scikit-image, 7x7 window, averaged over the colour channels) of two (H, W, 3) images."""
    from skimage.metrics import structural_similarity
    return float(structural_similarity(a, b, channel_axis=-1, data_range=data_range))


def mean_finite(values):
    """Mean over frames of a per-frame score, ignoring inf (identical frames) unless all are."""
    v = np.asarray(values, np.float64)
    fin = v[np.isfinite(v)]
    return float(fin.mean()) if len(fin) else (float(v[0]) if len(v) else math.nan)


def lmd(gen_lms, true_lms):
    """Landmark distance of the mouth: mean Euclidean distance of points 48-67, each frame's set
    mean-centred first (so head placement does not count), in the landmarks' pixels.
    [N, 68, 2] (or [N, 20, 2]) each -> float."""
    g, t = (np.asarray(x, np.float64) for x in (gen_lms, true_lms))
    if g.shape[-2] == 68:
        g, t = g[..., MOUTH, :], t[..., MOUTH, :]
    g = g - g.mean(-2, keepdims=True)
    t = t - t.mean(-2, keepdims=True)
    return float(np.linalg.norm(g - t, axis=-1).mean())


def mouth_opening(lms):
    """Inner-lip gap over mouth width per frame, [N, 68, 2] -> [N] (the definition inference uses)."""
    return np.asarray(templates.mouth_opening(lms), np.float64)


def pearson(a, b):
    """Pearson r of two equal-length series; 0.0 when either is constant (no linear relation can
    be seen: a mouth that never moves scores 0, not NaN)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) < 3:
        return 0.0
    a, b = a - a.mean(), b - b.mean()
    den = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / den) if den > 1e-12 * len(a) else 0.0


def width_ratio(gen, true):
    """How wide the generated mouth moves against the truth: sd of its opening track over the sd
    of the true one (1 = as wide; an L1-averaged mouth that barely opens scores well below 1)."""
    sg, st = np.nanstd(np.asarray(gen, np.float64)), np.nanstd(np.asarray(true, np.float64))
    return float(sg / st) if st > 1e-12 else math.nan


def lag_curve(a, b, max_lag):
    """Pearson r of a[t] against b[t - L] for L = -max_lag..max_lag -> (lags [2m+1], r [2m+1])."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    n = min(len(a), len(b))
    m = max(0, min(int(max_lag), n - 3))
    lags = np.arange(-m, m + 1)
    r = np.array([pearson(a[L:n], b[:n - L]) if L >= 0 else pearson(a[:n + L], b[-L:n]) for L in lags])
    return lags, r


def uncorrelated_shift(series, lo=0.25, hi=0.75):
    """The circular shift (frames) between lo and hi x the length whose shifted copy of `series`
    correlates least with it (smallest |r|). Speech with a steady speak-pause rhythm lines up
    with itself at some shifts (the grid clip's loudness at half its length: r 0.76), so audio
    rolled by such a shift is not "another moment" at all; this picks one that is."""
    x = np.asarray(series, np.float64)
    n = len(x)
    if n < 4:
        return max(1, n // 2)
    shifts = np.arange(max(1, int(lo * n)), int(hi * n) + 1)
    r = np.array([abs(pearson(np.roll(x, s), x)) for s in shifts])
    return int(shifts[int(np.argmin(r))])


def chance_r(a, b, min_shift=CHANCE_SHIFT):
    """Chance level of pearson(a, b) for these two series: the standard deviation of r between `a`
    and `b` circularly shifted by min_shift .. len - min_shift frames (shifts that break any real
    relation but keep both series' smoothness). An r or a gap within ~2x this is noise."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    n = min(len(a), len(b))
    shifts = np.arange(min_shift, n - min_shift + 1)
    if len(shifts) < 3:
        return math.nan
    return float(np.std([pearson(a[:n], np.roll(b[:n], s)) for s in shifts]))


def best_lag(a, b, max_lag):
    """(L, r): the shift maximising the correlation of a[t] with b[t - L]; L > 0 = `a` is late."""
    lags, r = lag_curve(a, b, max_lag)
    k = int(np.argmax(r))
    return int(lags[k]), float(r[k])


def loudness_db(wav, n):
    """Loudness (dBFS) of each video frame's audio, max-pooled over +-1 frame (the silence gate's rule)."""
    from vad import frame_loudness_db
    return np.asarray(frame_loudness_db(np.asarray(wav, np.float32), n), np.float64)


def silent_frames(db):
    """Silent frames from per-frame loudness [N] dB -> (mask [N] bool, threshold dB or nan).
    Threshold: noise floor (2nd percentile, at least SILENCE_MIN_DB) + SILENCE_FLOOR_DB, and only
    when that is SILENCE_CONTRAST_DB below the loud speech (95th percentile); a frame must also
    have SILENCE_HOLD silent frames each side. Relative, because real recordings have a noise floor
    anywhere from -90 to -40 dBFS."""
    db = np.asarray(db, np.float64)
    if len(db) == 0:
        return np.zeros(0, bool), math.nan
    floor = max(np.percentile(db, 2), SILENCE_MIN_DB)
    thresh = floor + SILENCE_FLOOR_DB
    if np.percentile(db, 95) - thresh < SILENCE_CONTRAST_DB:
        return np.zeros(len(db), bool), math.nan
    quiet = db <= thresh
    mask = quiet.copy()
    for d in range(1, SILENCE_HOLD + 1):                     # erosion: quiet d frames each side too
        mask[d:] &= quiet[:-d]
        mask[:-d] &= quiet[d:]
    return mask, float(thresh)


def speech_frames(db, silence_db):
    """Frames louder than the silence threshold [N] bool (all frames when there is no threshold).
    Correlations over these alone judge articulation, not a speech/silence switch: a model whose
    output merely changes look between speech and pauses moves the landmarks with the truth's
    pauses and earns a high whole-clip r without opening the mouth on a single syllable."""
    db = np.asarray(db, np.float64)
    return np.ones(len(db), bool) if not np.isfinite(silence_db) else db > silence_db


def closed_threshold(true_opening):
    """Opening below which a mouth counts as closed, from the TRUE track: its closed level (10th
    percentile) plus CLOSED_SHARE of its range (90th - 10th percentile)."""
    o = np.asarray(true_opening, np.float64)
    lo, hi = np.percentile(o, 10), np.percentile(o, 90)
    return float(lo + CLOSED_SHARE * (hi - lo))


def silence_score(opening, silent, thresh):
    """Share of silent frames whose mouth opening is below `thresh`; nan when none is silent."""
    silent = np.asarray(silent, bool)
    if not silent.any():
        return math.nan
    return float((np.asarray(opening, np.float64)[silent] < thresh).mean())


def motion_energy(regions):
    """Mean absolute frame-to-frame change (0-255 units) of a region's pixels [N, h, w, C]."""
    r = np.asarray(regions, np.float32)
    return float(np.abs(np.diff(r, axis=0)).mean()) if len(r) > 1 else 0.0


def jitter_ratio(gen_regions, true_regions):
    """Frame-to-frame change of the generated mouth region over the truth's: 1 = as steady as
    the real person, > 1 = flicker/chatter, < 1 = stiffer than life."""
    t = motion_energy(true_regions)
    return motion_energy(gen_regions) / t if t > 0 else math.nan


def region_sharpness(regions):
    """Per-frame mean squared grey-level gradient (Sobel) of BGR uint8 regions [N, h, w, 3] -> [N]:
    the fine detail (teeth, lip edges) each frame's mouth box holds."""
    return np.array([gradient_energy(r, np.ones(r.shape[:2], bool)) for r in regions], np.float64)


def sharpness_ratio(gen_sharpness, true_sharpness):
    """Generated mouth regions' gradient energy over the truth's (region_sharpness of each, summed
    over frames): 1 = as much fine detail as the real person, < 1 = blurred, > 1 = sharper or
    noisier than life."""
    t = float(np.sum(true_sharpness))
    return float(np.sum(gen_sharpness)) / t if t > 0 else math.nan


def seam_band(feather, pad=SEAM_PAD, mask=None):
    """Bool [328, 328]: where a paste seam can show -- the paste alpha's transition zone (or its
    edge, for a hard paste) grown by `pad` px each way; `mask`: the generator's masked area."""
    a = geometry.paste_alpha(feather, mask)
    k = np.ones((2 * pad + 1, 2 * pad + 1), np.uint8)
    outer = cv2.dilate((a > 1e-3).astype(np.uint8), k)
    core = cv2.erode((a > 1 - 1e-3).astype(np.uint8), k)
    return (outer > 0) & ~(core > 0)


def gradient_energy(img, mask):
    """Mean squared Sobel gradient magnitude of a BGR uint8 image's grey values inside mask."""
    g = cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_BGR2GRAY).astype(np.float32)
    gx = cv2.Sobel(g, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(g, cv2.CV_32F, 0, 1, ksize=3)
    return float((gx * gx + gy * gy)[mask].mean())


def seam_ratio(gen_crops, true_crops, band):
    """Gradient energy in the seam band of generated 328 crops over the same band of the true
    crops (summed over frames): 1.0 = no added edges; a hard pasted rectangle scores well above 1.
    Takes one crop (328, 328, 3) or a batch [N, 328, 328, 3] of each."""
    g = np.asarray(gen_crops)
    t = np.asarray(true_crops)
    g, t = (g[None], t[None]) if g.ndim == 3 else (g, t)
    eg = sum(gradient_energy(x, band) for x in g)
    et = sum(gradient_energy(x, band) for x in t)
    return eg / et if et > 0 else math.nan


def cosine(a, b):
    """Row-wise cosine similarity of descriptors [N, D] (or two vectors) -> [N] (or float)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    c = (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-12)
    return float(c) if np.ndim(c) == 0 else c


# ----------------------------------------------------------------------------------------------
# SyncNet confidence (secondary: our SyncNet was trained on this person, so it is not independent)
def load_syncnet(path, device):
    """syncnet_model's loader -> the SyncNet in eval mode."""
    import syncnet_model
    net = syncnet_model.load_syncnet(path, device)
    return net[0] if isinstance(net, tuple) else net


def sync_confidence(net, crops320, mel, device, max_offset=SYNC_MAX_OFFSET, batch=16):
    """Our SyncNet on clips of T consecutive 320 crops [N, 320, 320, 3] uint8 BGR against the mel
    windows centred on each clip, shifted by -max_offset..max_offset frames. Returns dict:
    offset (the best shift; > 0 = the mouth is late), conf (mean logit at the best shift minus the
    median over shifts, as SyncNet papers report), p_sync (mean in-sync probability at shift 0),
    stretch_acc (share of SYNC_STRETCH_S stretches whose own audio scores higher than the same
    stretch's audio shifted by SYNC_MIN_SHIFT..max_offset frames: 0.5 is chance, 1 always in sync)."""
    import torch

    import syncnet_328
    import syncnet_model
    T = net.T
    n = len(crops320)
    starts = np.arange(0, n - T + 1)
    if len(starts) < 2 * max_offset + 2:
        return None
    v, a = [], []
    with torch.inference_mode():
        for s in range(0, len(starts), batch):
            idx = starts[s:s + batch]
            clip = np.stack([np.concatenate([crops320[i + t] for t in range(T)], -1) for i in idx])  # (B, 320, 320, 3T)
            face = torch.from_numpy(clip).permute(0, 3, 1, 2).float().div_(255).to(device)      # (B, 3T, 320, 320)
            v.append(net.embed_face(face))
            mel_w = torch.from_numpy(syncnet_model.audio_input(mel, idx + T // 2, net.audio_offsets)).to(device)  # (B, K, 1, 80, 16)
            a.append(net.embed_audio(mel_w))
        v, a = torch.cat(v), torch.cat(a)
        lags = np.arange(-max_offset, max_offset + 1)
        curve, p0 = [], None
        for L in lags:            # video clip s against audio of clip s - L
            lo, hi = max(0, L), min(len(starts), len(starts) + L)
            lg = net.logits(a[lo - L:hi - L], v[lo:hi])
            curve.append(float(lg.mean()))
            if L == 0:
                p0 = float(torch.sigmoid(lg).mean())
        # a[i] is the audio centred on clip i's middle frame: shifting the index shifts the audio
        stretch = max(min(int(round(SYNC_STRETCH_S * utils.FPS)), len(starts) // 2), 1)
        idx = np.arange(len(starts))
        stretch_acc, stretches = syncnet_328.stretch_pair_acc(
            lambda w, f: net.logits(a[f], v[w]), len(idx), idx, len(idx), stretch, SYNC_MIN_SHIFT, max_offset, seed=0)
    curve = np.array(curve)
    k = int(np.argmax(curve))
    return {"offset": int(lags[k]), "conf": float(curve[k] - np.median(curve)), "p_sync": p0,
            "stretch_acc": stretch_acc, "stretches": stretches, "stretch_s": stretch / utils.FPS,
            "curve": [round(float(c), 3) for c in curve]}


def truth_sync_warning(m, min_offset=2, max_acc=0.8):
    """A warning line when our SyncNet finds the held-out truth itself out of step with its audio
    (offset >= min_offset frames and sync check below max_acc), else None: its audio was shifted
    wrongly (or not at all) and every timing figure is then measured against a moved truth."""
    off, acc = m.get("sync_offset_true"), m.get("sync_stretch_acc_true")
    if off is None or acc is None or abs(off) < min_offset or acc >= max_acc:
        return None
    return (f"warning: our SyncNet finds the held-out video's own audio {off:+d} frames off its lips (sync check "
            f"{acc:.2f}): the timing figures (opening r, sync, LMD) are measured against a moved truth; see the shift "
            f"its meta.json records (av_offset), process the clip again with --av_offset N (0 = as recorded) and pass that dataset as --video")
