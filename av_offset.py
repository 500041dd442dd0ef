"""The audio-video offset of a recording, measured from the recording alone (no pretrained model):
the shift of the audio that best predicts the person's mouth opening.

Real recordings come with offsets (one of our test clips has its audio ~10 frames late), and a
generator trained on them learns to open the mouth at the wrong moment. process.py measures the
offset of every video it turns into a dataset, records it in meta.json and, with --av_offset auto
(the default), shifts the audio when the offset is clear.

How: per video frame, log-mel bands (20, plus their frame-to-frame change) over +-CONTEXT frames
are mapped by ridge regression to the mouth opening (templates.mouth_opening) and, separately, to
its change from frame to frame, each fitted on 4/5 of the recording and scored (Pearson r) on the
held-out fifth, for every audio shift from -MAX_LAG to +MAX_LAG frames; the two r are averaged.
Speech predicts the mouth only when the two are aligned, so the held-out r peaks at the true
offset. The opening alone peaks broadly (a speaker's slow speak-pause rhythm fits at many shifts);
its change peaks sharply. A shift is trusted when the peak beats shift 0 by more than chance
would on a recording that short (MIN_GAIN, GAIN_SCALE / sqrt(frames)).

Measured on windows of real clips in sync (grid, andrew, the German anchor, feifei) and the same
windows with their audio made 6 frames late or 5 early (RESULTS.md round 40), share of windows
left 2 frames or more off after the correction, in sync / moved, by the window's length:
6 s 0.03 / 0.61, 10 s 0 / 0.36, 15 s 0 / 0.24, 30 s 0 / 0.05 (the estimator before, the opening
alone at ridge 0.1 and a fixed gain of 0.10: 0.21 / 0.79, 0.04 / 0.52, 0 / 0.60, 0 / 0.50). Whole
clips (frames, + = audio late): outdoor_7s +8, the others 0 or +-1 or unclear, left as recorded.

    python av_offset.py dataset/anna          # the offset of a processed dataset
"""
import sys
from pathlib import Path

import numpy as np

import templates
import media_io
import utils
from utils import FPS, MEL_FPS, SR

MAX_LAG = 15        # frames searched each way (0.6 s)
CONTEXT = 2         # audio frames each side of the shifted frame in the regression
BANDS = 20          # log-mel bands (the 80 averaged in groups of 4)
FOLDS = 5           # contiguous folds of the cross-validation
RIDGE = 1.0         # ridge penalty per training frame, on standardised features
MIN_R = 0.35        # a peak below this held-out r is not trusted (too little clear speech)
MIN_GAIN = 0.05     # ... nor one that beats shift 0 by less than this
GAIN_SCALE = 2.0    # ... or by less than this / sqrt(frames): 0.16 for 6 s, 0.10 for 15 s, 0.07 for 30 s
WARN_FRAMES = 2     # offsets this large (or larger) are reported, and shifted by --av_offset auto


def frame_features(mel, n):
    """Mel [80, T] -> per video frame [n, 2 * BANDS]: mean log-mel bands over the frame's 40 ms and
    their change from the previous frame."""
    per = MEL_FPS / FPS
    idx = np.minimum((np.arange(int(np.ceil(n * per))) / per).astype(int), n - 1)   # mel frame -> video frame
    m = np.asarray(mel, np.float64)[:, :len(idx)]
    f = np.zeros((n, m.shape[0]))
    np.add.at(f, idx[:m.shape[1]], m.T)
    f /= np.maximum(np.bincount(idx[:m.shape[1]], minlength=n), 1)[:, None]
    f = f.reshape(n, BANDS, -1).mean(2)
    return np.concatenate([f, np.diff(f, axis=0, prepend=f[:1])], 1)


def _held_out_r(x, y):
    """Pearson r of each column of y [n, k] with its ridge prediction from x, each fold predicted by
    the other folds (one solve for all k targets: they share the features) -> [k]."""
    n, pred = len(y), np.zeros(y.shape)
    edges = np.linspace(0, n, FOLDS + 1).astype(int)
    for a, b in zip(edges[:-1], edges[1:]):
        tr = np.r_[0:a, b:n]
        mu, sd = x[tr].mean(0), x[tr].std(0) + 1e-6
        xt, ym = (x[tr] - mu) / sd, y[tr].mean(0)
        w = np.linalg.solve(xt.T @ xt + RIDGE * len(tr) * np.eye(x.shape[1]), xt.T @ (y[tr] - ym))
        pred[a:b] = ((x[a:b] - mu) / sd) @ w + ym
    return np.array([0.0 if p.std() < 1e-12 or v.std() < 1e-12 else float(np.corrcoef(p, v)[0, 1])
                     for p, v in zip(pred.T, y.T)])


def offset_curve(opening, mel, max_lag=MAX_LAG):
    """-> (lags [2m+1], held-out r [2m+1]): how well the audio shifted by each lag (the opening of
    frame t against the audio around frame t + lag) predicts the opening and its change (the mean
    of the two r)."""
    y = np.asarray(opening, np.float64)
    ys = np.stack([y, np.gradient(y) if len(y) > 1 else y], 1)     # (n, 2): the opening and its change
    n = len(y)
    feats = frame_features(mel, n)
    m = max(0, min(int(max_lag), (n - 2 * CONTEXT) // 4))
    lags, r = np.arange(-m, m + 1), []
    for d in lags:
        t = np.arange(max(0, CONTEXT - d), min(n, n - d - CONTEXT))
        x = np.concatenate([feats[t + d + c] for c in range(-CONTEXT, CONTEXT + 1)], 1)
        r.append(float(_held_out_r(x, ys[t]).mean()) if len(t) >= 5 * FOLDS else 0.0)
    return lags, np.array(r)


def measure(opening, mel):
    """-> dict(frames: the offset, + = audio late, or None when there is no clear peak; r: held-out r
    at the peak; r_at_0: at no shift; peak: the best lag even when not trusted)."""
    lags, r = offset_curve(opening, mel)
    if len(lags) == 0:
        return {"frames": None, "r": 0.0, "r_at_0": 0.0, "peak": 0}
    k = int(np.argmax(r))
    r0 = float(r[lags == 0][0])
    gain = max(MIN_GAIN, GAIN_SCALE / np.sqrt(max(len(opening), 1)))
    clear = r[k] >= MIN_R and (lags[k] == 0 or r[k] - r0 >= gain or abs(lags[k]) < WARN_FRAMES)
    return {"frames": int(lags[k]) if clear else None, "r": round(float(r[k]), 3), "r_at_0": round(r0, 3),
            "peak": int(lags[k])}


def shift_audio(wav, frames):
    """Move the audio `frames` video frames earlier (audio that was late by that much; negative:
    later), keeping its length: the start is cut and silence padded at the end, or the reverse."""
    s = int(round(frames * SR / FPS))
    wav = np.asarray(wav, np.float32)
    if s == 0 or len(wav) == 0:
        return wav.copy()
    s = max(-len(wav), min(len(wav), s))
    pad = np.zeros(abs(s), np.float32)
    return np.concatenate([wav[s:], pad]) if s > 0 else np.concatenate([pad, wav[:s]])


def measure_dataset(ds_dir):
    """The offset of a processed dataset (its aud.wav against its landmarks)."""
    ds = Path(ds_dir)
    z = utils.load_npy(ds / utils.LANDMARKS)
    import audio_features
    return measure(templates.mouth_opening(z["lms"]), media_io.melspectrogram(audio_features.read_wav(ds)))


if __name__ == "__main__":
    for d in sys.argv[1:] or ["-h"]:
        if d in ("-h", "--help"):
            print(__doc__.strip().splitlines()[-1].strip())
            break
        print(d, measure_dataset(d))
