"""Training speed of train_328.py: samples/s and ms per step, split into data wait and compute,
for each U-Net widths preset, with the hardware it ran on. Runs the real training loop (L1 +
the perceptual term train_328 picks; sync loss off) on a synthetic dataset unless --name is given.

    python bench_train.py                                   # this machine, batch 8, full + light
    python bench_train.py --name anna --device cuda --steps 20
    python bench_train.py --widths light --steps 2 --batch_size 2   # CPU smoke run

The first step (worker start-up, allocator warm-up) is not counted. Outputs go to a temp folder.
"compute CPU ms" is the training process's CPU time per step (all its threads): on a shared,
busy machine it is steadier than wall time; on an idle one it is about threads x compute ms.
"""
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

import synthetic
import train_328
import utils


@dataclass
class Config:
    name: str = ""                           # dataset under --data_root; "" = a synthetic 80-frame dataset
    data_root: str = str(utils.DATASET_DIR)   # where datasets live
    widths: str = "full,light"               # comma list of U-Net width presets to measure; six ints in a row are one custom widths ("narrow,8,16,32,96,192,384")
    stem: str = train_328.Config.stem        # the U-Net's first level: conv (320 px) or s2d (train_328 --stem)
    audio_film: bool = train_328.Config.audio_film   # the audio also modulates the decoder levels (train_328 --audio_film)
    batch_size: int = 8                      # frames per step (reference: 8)
    steps: int = 3                           # measured steps per preset (after one warm-up step)
    num_workers: int = train_328.Config.num_workers   # DataLoader workers; -1 = train_328's auto (0 on a CPU, 2 on a GPU)
    device: str = "auto"                     # auto (cuda -> mps -> cpu), cpu, cuda
    threads: int = 0                         # torch CPU threads (0 = torch's default)
    channels_last: bool = True               # NHWC layout, as train_328's default
    amp: bool = True                         # mixed precision as train_328's default (CPU: bf16 only with bf16 units)


def width_list(text):
    """--widths -> the widths to measure: presets by name, and every run of six integers as one custom widths."""
    out, run = [], []
    for tok in (t.strip() for t in text.split(",") if t.strip()):
        if tok.isdigit():
            run.append(tok)
            if len(run) == 6:
                out.append(",".join(run))
                run = []
        elif run:
            raise utils.UserError(f"--widths: {','.join(run)} is not six integers; give a preset name or six widths")
        else:
            out.append(tok)
    if run:
        raise utils.UserError(f"--widths: {','.join(run)} is not six integers; give a preset name or six widths")
    return out


def main(cfg):
    device = utils.get_device(cfg.device)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root, name = (Path(cfg.data_root), cfg.name) if cfg.name else (Path(tmp) / "data", "fake")
        if not cfg.name:
            synthetic.write_fake_dataset(root / name, n=80)
        for preset in width_list(cfg.widths):
            res = train_328.main(train_328.Config(
                name=name, data_root=str(root), out_dir=str(Path(tmp) / f"ck_{preset}"), widths=preset, stem=cfg.stem, audio_film=cfg.audio_film,
                batch_size=cfg.batch_size, max_steps=cfg.steps + 1, num_workers=cfg.num_workers, device=cfg.device,
                channels_last=cfg.channels_last, amp=cfg.amp, held_out=0.0, sync_weight=0.0, log_every=10 ** 9,
                preview_every=10 ** 9, save_every=10 ** 9, snapshot_every=0, overwrite=True))
            rows.append((preset, res["timing"]))
    print(utils.hardware(device))
    print(f"stem {cfg.stem}{', audio_film' if cfg.audio_film else ''}, batch {cfg.batch_size}, {cfg.steps} measured steps, {train_328.loader_workers(cfg.num_workers, device)} workers, device {device}, "
          f"channels_last {cfg.channels_last}, amp {cfg.amp}, dataset {cfg.name or 'synthetic'}")
    wide = max([8] + [len(p) for p, _ in rows])
    print(f"{'widths':{wide}s} {'samples/s':>10s} {'ms/step':>9s} {'data ms':>9s} {'compute ms':>11s} {'compute CPU ms':>15s}")
    for preset, t in rows:
        print(f"{preset:{wide}s} {t['samples_per_s']:10.2f} {t['data_ms'] + t['compute_ms']:9.0f} "
              f"{t['data_ms']:9.1f} {t['compute_ms']:11.0f} {t['compute_cpu_ms']:15.0f}")
    return rows


if __name__ == "__main__":
    utils.run_main(main, utils.parse_config(Config, description=__doc__.split("\n")[0]))
