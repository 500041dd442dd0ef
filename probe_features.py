"""How much of a mouth can audio features tell, for this voice and for others? A linear read-out:
ridge regression from each frame's features (with +-context frames) to the mouth opening of the
training clip (inner-lip gap / width, from its landmarks), then Pearson r between the read-out and
the true opening on other processed datasets -- the held-out minute, or videos of other people
(their own mouths are the truth). A minute on a CPU, no generator needed: it tells whether an
audio encoder carries what another voice needs before a generator is trained on it.

    python probe_features.py --name anna --on dataset/anna_heldout,dataset/bob --syncnet checkpoint/anna/syncnet_best.pth
    python probe_features.py --name anna --on dataset/bob --raw mel+speech     # the frozen inputs, no encoder

Prints one row per ridge strength: r on the training clip (fitted), on each --on dataset, their mean.
"""
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import audio_features
import media_io
import metrics
import templates
import utils
from utils import UserError

RAW = ("mel", "speech")     # frozen inputs --raw can join with "+": flattened 0.2 s mel windows, speech embeddings


@dataclass
class Config:
    name: str = ""                   # training dataset under --data_root (the voice the read-out is fitted on)
    data_root: str = str(utils.DATASET_DIR)   # where it lives
    on: str = ""                     # comma list of processed dataset folders to read out on (held-out clips, other people)
    syncnet: str = ""                # SyncNet checkpoint whose audio encoder makes the features (the generator's features)
    raw: str = ""                    # instead of --syncnet: frozen inputs, mel, speech or mel+speech
    context: int = 2                 # [0..] neighbouring frames each side joined to a frame's features
    ridge: str = "10,100,1000"       # comma list of ridge strengths (per 100 frames, on standardised features)
    threads: int = 2                 # [0..] torch CPU threads (0 = torch's default)


def opening(ds):
    """The dataset's mouth opening per frame (the definition evaluate.py and inference use)."""
    return metrics.mouth_opening(templates.dataset_landmarks320(ds))


def features(ds, cfg, encoder=None):
    """Per-frame features [n, D] of the dataset's aud.wav, n = its landmark frames."""
    wav, n = audio_features.read_wav(ds), len(opening(ds))
    if encoder is not None:
        return audio_features.encode_audio(wav, encoder, n_frames=n)
    parts = []
    for kind in cfg.raw.split("+"):
        if kind == "mel":
            parts.append(media_io.mel_windows(media_io.melspectrogram(wav), np.arange(n)).reshape(n, -1))
        else:
            parts.append(audio_features.speech_embeddings(wav, n))
    return np.concatenate(parts, axis=1)


def with_context(feats, c):
    """[n, D] -> [n, (2c + 1) D]: each frame beside its c neighbours on each side (edges repeat)."""
    idx = np.clip(np.arange(len(feats))[:, None] + np.arange(-c, c + 1)[None], 0, len(feats) - 1)
    return feats[idx].reshape(len(feats), -1)


def fit_readout(x, y, ridge):
    """Ridge regression on standardised x -> predict(x') for other features."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    z = (x - mu) / sd
    w = np.linalg.solve(z.T @ z + ridge * len(z) / 100 * np.eye(z.shape[1]), z.T @ (y - y.mean()))
    return lambda x2: ((x2 - mu) / sd) @ w + y.mean()


def check(cfg):
    if bool(cfg.syncnet) == bool(cfg.raw):
        raise UserError("give either --syncnet CHECKPOINT (its audio encoder's features) or --raw mel|speech|mel+speech")
    if cfg.raw and any(k not in RAW for k in cfg.raw.split("+")):
        raise UserError(f"--raw {cfg.raw}: use mel, speech or mel+speech")
    if not cfg.name or not cfg.on:
        raise UserError("give --name (the dataset to fit on) and --on (comma list of datasets to read out on)")
    dirs = [Path(cfg.data_root) / cfg.name] + [Path(p) for p in cfg.on.split(",") if p.strip()]
    for d in dirs:
        if not (d / utils.AUDIO_WAV).is_file() or not (d / utils.LANDMARKS).is_file():
            raise UserError(f"{d} is not a processed dataset (no {utils.AUDIO_WAV} / {utils.LANDMARKS}); run process.py on its video")
    return dirs


def main(cfg):
    dirs = check(cfg)
    import torch
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    encoder = None
    if cfg.syncnet:
        import syncnet_model
        encoder = syncnet_model.load_syncnet(cfg.syncnet)[0].audio_encoder
    x = {d: with_context(features(d, cfg, encoder).astype(np.float64), cfg.context) for d in dirs}
    y = {d: opening(d) for d in dirs}
    rows = []
    for ridge in (float(v) for v in cfg.ridge.split(",")):
        predict = fit_readout(x[dirs[0]], y[dirs[0]], ridge)
        r = {d.name: metrics.pearson(predict(x[d]), y[d]) for d in dirs}
        rows.append(dict(ridge=ridge, r=r, mean_on=float(np.mean([r[d.name] for d in dirs[1:]]))))
    what = cfg.syncnet or f"raw {cfg.raw}"
    print(f"read-out of the mouth opening from {what} (+-{cfg.context} frames), fitted on {dirs[0].name}")
    print("| ridge | " + " | ".join(f"{d.name}{' (fit)' if i == 0 else ''}" for i, d in enumerate(dirs)) + " | mean of --on |")
    print("|---" * (len(dirs) + 2) + "|")
    for row in rows:
        print(f"| {row['ridge']:g} | " + " | ".join(f"{row['r'][d.name]:.3f}" for d in dirs) + f" | {row['mean_on']:.3f} |")
    return rows


if __name__ == "__main__":
    utils.run_main(main, utils.parse_config(Config, description=__doc__.split("\n")[0]))
