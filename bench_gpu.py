"""Budget B on a lent GPU machine that has PyTorch but not this project's setup (no dlib, no
ffmpeg, no test media, no network, and at most ~64 MiB carried in and 8 files of 16 MiB out):
pack what the generator's training reads, rebuild it there, train at full widths for a fixed
number of steps, and bring the weights back in pieces to be fitted and evaluated here.

    # here: a processed dataset with its SyncNet's features -> .gpu/NAME (~32 MB, git-ignored)
    python bench_gpu.py pack --dataset result/protocol/dataset/grid_s1_5min
    # there, one device call carrying .gpu: rebuild the crops, train, print samples/s, pieces -> $OUT
    python3 bench_gpu.py train --steps 2460 --out $OUT
    # here: the pieces -> a checkpoint (the guidance fitted on the dataset's held-out tail), then evaluate.py
    python bench_gpu.py unpack --parts FILES_AT --out result/gpu/grid_s1_5min/last.pth

The crops are not carried (2.3 GB for five minutes): the video is, with each frame's crop box, and
the crops are cut again as process.py cut them (every frame through JPEG at its quality, then the
box), so training sees the same pixels up to the two decoders' rounding; `train` prints how far the
rebuilt crops are from three the pack keeps. The features and the SyncNet audio encoder that made
them travel as they are, so the model comes back with the encoder inference needs."""
import hashlib
import io
import json
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

import datasets
import geometry
import train_328
import utils
from utils import UserError

CARRIED = ("video.mp4", utils.LANDMARKS, utils.META, utils.AUD_FEAT)   # what training reads besides the crops
ENCODER = "audio_encoder.pth"     # the features' audio encoder, as a SyncNet checkpoint holding it alone
PACK_INFO = "pack.json"
CHECKS = "check_crops.npz"        # three of the dataset's own crops: how exactly the rebuild matches
MANIFEST = "model.json"           # the pieces' names, sizes and SHA-256, the run's figures
PART = "model.part{:02d}"
PART_BYTES = 15 * 2 ** 20         # under the device tool's 16 MiB a file
PACK_LIMIT = 56 * 2 ** 20         # the code travels too, within 64 MiB
DROPPED = ("optimizer", "train_model", "scaler", "rng", "adversary", "audio_encoder")   # not needed to evaluate; the encoder is in the pack


@dataclass
class Config:
    action: str = "pack"            # pack (here) | train (on the GPU machine) | unpack (here)
    dataset: str = ""               # pack: a processed dataset folder whose aud_feat.npy a SyncNet wrote
    pack: str = ".gpu"              # the packed folder: pack writes PACK/NAME, train and unpack read it (name it in the device call's carry)
    name: str = ""                  # train, unpack: which packed dataset; "" = the only one in --pack
    jpeg_quality: int = 95          # [1..100] pack: the frames' JPEG quality process.py used (process.py --jpeg_quality)
    out: str = ""                   # train: the folder the pieces go to ($OUT); unpack: the checkpoint file to write
    parts: str = ""                 # unpack: the folder holding the pieces that came back
    work: str = ""                  # train: where the rebuilt dataset and the run go; "" = a temp folder, removed
    steps: int = 2460               # [1..] train: generator steps (round 26: 2460 at batch 64 filled 8.2 minutes of an H200 with the s2d stem)
    widths: str = "full"            # train: U-Net widths (train_328 --widths)
    stem: str = train_328.Config.stem   # train: the U-Net's first level (train_328 --stem)
    batch_size: int = 64            # [1..] train: frames per step
    lr: float = 2e-3                # [>0..] train: peak learning rate (round 26's)
    warmup_steps: int = 100         # [0..] train: linear warm-up steps
    num_workers: int = 8            # [0..] train: DataLoader workers (the GPU machines have 16 cores)
    seed: int = 0                   # [0..] train: seeds the weights, data order and augmentation
    deadline_s: float = 520.0       # [0..] train: a safety net, not a budget: stop and ship what there is this many seconds after the action began (a device call ends at 600 s and then returns nothing); 0 = none
    device: str = "cuda"            # train: cuda, cpu (a smoke run here)
    extra: str = "{}"               # train: further train_328 options as JSON, e.g. '{"audio_film": true}'
    fit_guidance: bool = True       # unpack: fit the checkpoint's guidance on the packed dataset's source (guidance_fit.py)


def pack(cfg):
    """PACK/NAME: the carried files, the audio encoder, three check crops and pack.json."""
    src = Path(cfg.dataset)
    if not cfg.dataset or not src.is_dir():
        raise UserError(f"--dataset {cfg.dataset!r} is not a folder; give a processed dataset, e.g. result/protocol/dataset/grid_s1_5min")
    info = datasets.read_feature_info(src)
    state, enc_id, source = datasets.feature_encoder(src, info)
    if enc_id != info.get("encoder_id"):
        raise UserError(f"{src}/aud_feat.npy was made by encoder {info.get('encoder_id')}, but its source now holds "
                        f"{enc_id}; re-run: python syncnet_328.py --name {src.name} --features_only")
    crops = utils.load_npy(src / utils.CROPS, mmap=True)
    boxes = utils.load_npy(src / utils.LANDMARKS)["crop_boxes"]
    if len(boxes) != len(crops) or not (src / "video.mp4").is_file():
        raise UserError(f"{src} has no video.mp4 or its crop boxes do not match its crops; re-run process.py on the video")
    with utils.atomic_dir(Path(cfg.pack) / src.name) as tmp:
        for f in CARRIED:
            shutil.copyfile(src / f, tmp / f)
        utils.save_checkpoint({"model": state, "config": {"model_args": {"audio_source": source}}}, tmp / ENCODER)
        (tmp / utils.AUD_FEAT_INFO).write_text(json.dumps(dict(info, source=ENCODER), indent=1))
        idx = np.linspace(0, len(crops) - 1, 3).round().astype(np.int64)
        np.savez_compressed(tmp / CHECKS, index=idx, crops=np.asarray(crops[idx]))
        (tmp / PACK_INFO).write_text(json.dumps(dict(name=src.name, dataset=str(src.absolute()), frames=len(crops),
                                                     jpeg_quality=cfg.jpeg_quality, encoder_id=enc_id,
                                                     audio_source=source), indent=1))
        size = sum(p.stat().st_size for p in tmp.iterdir())
        if size > PACK_LIMIT:
            raise UserError(f"the pack of {src} would be {size / 2 ** 20:.0f} MiB, over the {PACK_LIMIT / 2 ** 20:.0f} "
                            f"MiB a device call carries beside the code; pack a shorter recording")
    print(f"packed {src.name}: {len(crops)} frames, {source} features ({enc_id}), {size / 2 ** 20:.1f} MiB "
          f"-> {Path(cfg.pack) / src.name}")
    return Path(cfg.pack) / src.name


def packed(cfg):
    """The packed dataset folder train and unpack read, and its pack.json."""
    root = Path(cfg.pack)
    names = sorted(p.parent.name for p in root.glob(f"*/{PACK_INFO}")) if root.is_dir() else []
    name = cfg.name or (names[0] if len(names) == 1 else "")
    if not name or name not in names:
        found = ", ".join(names) or "nothing"
        raise UserError(f"--pack {root} holds {found}; "
                        + ("give --name" if len(names) > 1 else "run: python bench_gpu.py pack --dataset DATASET"))
    return root / name, json.loads((root / name / PACK_INFO).read_text())


def _cut(frame, box, quality):
    """process.py's crop of one decoded frame: through JPEG at its quality, then the box."""
    ok, buf = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise UserError("OpenCV here cannot encode JPEG, which the crops' rebuild needs")
    return geometry.crop_face(cv2.imdecode(buf, cv2.IMREAD_COLOR), box)


def rebuild(src, info, dst):
    """A training dataset at dst from a pack: its files, and crops.npy cut again from video.mp4."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in CARRIED + (ENCODER,):
        shutil.copyfile(src / f, dst / f)
    feat = json.loads((src / utils.AUD_FEAT_INFO).read_text())
    (dst / utils.AUD_FEAT_INFO).write_text(json.dumps(dict(feat, source=str(dst / ENCODER)), indent=1))
    boxes, n = utils.load_npy(dst / utils.LANDMARKS)["crop_boxes"], info["frames"]
    crops = np.lib.format.open_memmap(dst / utils.CROPS, mode="w+", dtype=np.uint8, shape=(n, utils.CROP, utils.CROP, 3))
    cap, i, t0 = cv2.VideoCapture(str(dst / "video.mp4")), 0, time.time()

    def cut(k, frame):
        crops[k] = _cut(frame, boxes[k], info["jpeg_quality"])

    with ThreadPoolExecutor(8) as pool:
        batch = []
        while i < n:
            ok, frame = cap.read()
            if not ok:
                break
            batch.append(pool.submit(cut, i, frame))
            i += 1
            if len(batch) >= 256:   # bounded: decoded frames do not pile up ahead of the cutting
                [f.result() for f in batch]
                batch = []
        [f.result() for f in batch]
    cap.release()
    if i < n:
        raise UserError(f"{dst}/video.mp4 decoded to {i} frames, the pack says {n}; OpenCV here cannot read it fully")
    crops.flush()
    z = np.load(src / CHECKS)
    diff = np.abs(np.asarray(crops[z["index"]], np.int16) - z["crops"].astype(np.int16))
    check = dict(mean_abs=float(diff.mean()), max_abs=int(diff.max()), seconds=round(time.time() - t0, 1))
    print(f"rebuilt {n} crops in {check['seconds']} s; against the dataset's own: mean |diff| {check['mean_abs']:.3f}, "
          f"max {check['max_abs']} grey levels")
    return check


def ship(run_dir, out, figures):
    """The run's weights (without the optimizer and the training copy) in pieces under out, with MANIFEST."""
    ckpt = utils.load_checkpoint(run_dir / utils.LAST)
    buf = io.BytesIO()
    torch.save({k: v for k, v in ckpt.items() if k not in DROPPED}, buf)
    data = buf.getvalue()
    out.mkdir(parents=True, exist_ok=True)
    names = []
    for k in range(0, len(data), PART_BYTES):
        names.append(PART.format(len(names)))
        (out / names[-1]).write_bytes(data[k:k + PART_BYTES])
    (out / MANIFEST).write_text(json.dumps(dict(figures, parts=names, bytes=len(data),
                                                sha256=hashlib.sha256(data).hexdigest()), indent=1))
    shutil.copyfile(run_dir / "log.txt", out / "train_log.txt")
    print(f"{len(names)} pieces, {len(data) / 2 ** 20:.1f} MiB -> {out}")


def train(cfg):
    """On the GPU machine: rebuild, train cfg.steps, print the speed, ship the weights to cfg.out."""
    if not cfg.out:
        raise UserError("--out is required: the folder the pieces go to ($OUT on the device machine)")
    src, info = packed(cfg)
    try:
        extra = json.loads(cfg.extra)
    except json.JSONDecodeError as e:
        raise UserError(f"--extra is not JSON ({e.msg}); e.g. --extra '{{\"audio_film\": true}}'") from None
    work, began = Path(cfg.work) if cfg.work else Path(tempfile.mkdtemp(prefix="bench_gpu-")), time.time()
    late = (lambda: time.time() - began > cfg.deadline_s) if cfg.deadline_s > 0 else None
    try:
        check = rebuild(src, info, work / "data" / info["name"])
        t0 = time.time()
        res = train_328.main(train_328.Config(**{**dict(
            name=info["name"], data_root=str(work / "data"), out_dir=str(work / "run"), widths=cfg.widths,
            stem=cfg.stem, batch_size=cfg.batch_size, lr=cfg.lr, warmup_steps=cfg.warmup_steps, max_steps=cfg.steps,
            num_workers=cfg.num_workers, seed=cfg.seed, device=cfg.device, fit_guidance=False, overwrite=True,
            snapshot_every=0), **extra}), should_stop=late)
        wall = time.time() - t0
        t = res["timing"]
        if res["stopped"]:
            print(f"warning: stopped at step {res['step']} of {cfg.steps} by --deadline_s {cfg.deadline_s:g} (its learning rate "
                  f"had not decayed); ask for fewer --steps next time")
        figures = dict(hardware=utils.hardware(utils.get_device(cfg.device)), steps=res["step"], stopped=res["stopped"], train_s=round(wall, 1),
                       samples_per_s=round(t["samples_per_s"], 1), ms_per_step=round(t["data_ms"] + t["compute_ms"], 1),
                       data_ms=round(t["data_ms"], 1), val_l1=res["val_l1"], rebuild=check,
                       peak_gpu_gib=round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if torch.cuda.is_available() else None,
                       config={k: v for k, v in vars(cfg).items() if k not in ("out", "work")})
        print(figures["hardware"])
        print(f"{res['step']} steps of {cfg.batch_size} in {wall:.0f} s: {figures['samples_per_s']} samples/s, "
              f"{figures['ms_per_step']} ms a step (data wait {figures['data_ms']} ms), held-out L1 {res['val_l1']}")
        ship(work / "run", Path(cfg.out), figures)
    finally:
        if not cfg.work:
            shutil.rmtree(work, ignore_errors=True)
    return figures


def unpack(cfg):
    """Here: the pieces -> one checkpoint with the pack's audio encoder; its guidance fitted."""
    src, info = packed(cfg)
    parts = Path(cfg.parts)
    if not (parts / MANIFEST).is_file():
        raise UserError(f"--parts {cfg.parts!r} holds no {MANIFEST}; give the folder the device call's files came back to")
    if not cfg.out:
        raise UserError("--out is required: the checkpoint file to write, e.g. result/gpu/grid_s1_5min/last.pth")
    man = json.loads((parts / MANIFEST).read_text())
    missing = [p for p in man["parts"] if not (parts / p).is_file()]
    if missing:
        raise UserError(f"{parts} lacks {', '.join(missing)}; fetch every file the device call returned")
    data = b"".join((parts / p).read_bytes() for p in man["parts"])
    if len(data) != man["bytes"] or hashlib.sha256(data).hexdigest() != man["sha256"]:
        raise UserError(f"the pieces in {parts} do not add up to the model the device sent (size or SHA-256 differ); fetch them again")
    ckpt = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    enc = utils.load_checkpoint(src / ENCODER)
    if ckpt.get("encoder_id") != info["encoder_id"]:
        raise UserError(f"the model was trained on features of encoder {ckpt.get('encoder_id')}, the pack holds "
                        f"{info['encoder_id']}; unpack with the pack it was trained from")
    ckpt["audio_encoder"] = enc["model"]
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    utils.save_checkpoint(ckpt, out)
    (out.parent / "gpu_run.json").write_text(json.dumps(man, indent=1))
    print(f"{out}: step {ckpt['step']}, trained on {man['hardware']}: {man['samples_per_s']} samples/s, {man['train_s']} s")
    if cfg.fit_guidance:
        import guidance_fit
        ds = Path(info["dataset"])
        if datasets.read_feature_info(ds).get("encoder_id") != info["encoder_id"]:   # the fit reads the dataset's own features
            raise UserError(f"{ds}'s features are no longer the packed ones ({info['encoder_id']}); the checkpoint "
                            f"is written: fit it with features of that encoder, or unpack with --no-fit_guidance")
        guidance_fit.main(guidance_fit.Config(name=ds.name, data_root=str(ds.parent), checkpoint=str(out), device="cpu"))
    print(f"next: python evaluate.py --checkpoint {out} --video HELDOUT --syncnet JUDGE --out_dir {out.parent / 'eval'}")
    return out


ACTIONS = dict(pack=pack, train=train, unpack=unpack)


def main(cfg):
    if cfg.action not in ACTIONS:
        raise UserError(f"action {cfg.action!r}: choose pack, train or unpack")
    return ACTIONS[cfg.action](cfg)


if __name__ == "__main__":
    utils.run_main(main, utils.parse_config(Config, description=__doc__.split("\n")[0], positional=("action",)))
