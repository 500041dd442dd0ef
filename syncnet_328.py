"""Train the SyncNet (syncnet_model.py, SPEC §6) of one person: is this audio window in sync with
these mouth frames? Unlike the reference, it is trained with off-sync negatives. Its
`audio_encoder` is the encoder whose 512-d outputs become the generator's audio features.

Training: in-sync vs >= 5-frame-shifted audio on one person's dataset, best
checkpoint by held-out accuracy on the clip's tail (its decision threshold, fitted on those
held-out pairs, is folded into the logit bias), then dataset/NAME/aud_feat.npy.

    python syncnet_328.py --name anna                        # train, then write dataset/anna/aud_feat.npy
    python syncnet_328.py --name anna --max_steps 20 --val_every 10 --batch_size 8   # CPU smoke run
    python syncnet_328.py --name anna --opening_weight 0     # sync loss only (default: the opening head from 2000 steps)
    python syncnet_328.py --name anna --eval_only --eval_on anna_take2                # accuracy on another clip
    python syncnet_328.py --name anna --features_only --reference_encoder audio_visual_encoder.pth
"""
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import utils
from audio_features import SOURCE_REFERENCE, SOURCES, load_reference_encoder, write_features
from syncnet_data import (Clip, StepBatches, check_dataset, clip_audio, eval_pairs, face_windows, resolve_opening,
                          resolve_source, training_data, write_feature_variants)
from syncnet_model import AUDIO_K, AUDIO_STRIDE, EMB_DIM, MAX_SCALE, SYNC_T, SYNC_WIDTHS, SyncNet, load_syncnet
from utils import INNER, UserError

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
    opening_weight: float = -1.0    # [-1..] weight of an auxiliary loss: a linear head reads the frame's mouth opening (robust z of its landmarks) off the centre window's 512-d audio vector, so the features the generator gets say how far the mouth opens (0 = off, the sync loss alone; -1 = auto: 1 for runs of 2000 steps or more, else 0; RESULTS.md rounds 19-20)
    audio_source: str = "auto"      # audio feature source: mel (the AudioEncoder learns from scratch), speech (frozen pretrained speech embedding + a small head), both (the two summed; audio_features.py) or auto: speech for recordings of a minute or more, else mel (syncnet_data.SPEECH_AUTO_S; RESULTS.md round 30)
    max_steps: int = -1             # [-1..] optimizer steps; 0 = only --epochs limits; -1 = auto: syncnet_data.auto_length: 20 passes, at least 2000 and at most 4000 steps (5 minutes ~4000, 25 s 2000); in bf16 (GPU, CPU with bf16 units) 30 passes, at most 6000 (README section 2)
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
    amp: bool = True                # mixed precision: bf16 (else fp16) on GPU, bf16 on CPUs with bf16 units (AVX512-BF16/AMX), else fp32
    num_workers: int = 0            # [0..] batch-building worker processes (batches are cheap; 0 is usually fastest)
    threads: int = 0                # [0..] torch CPU threads; 0 = torch's default (the usable cores: on an idle 2-core EPYC a step at 2 threads is 1.6x faster than at 1, RESULTS.md round 23)
    seed: int = 0                   # [0..] seeds init, batches, augmentation and the held-out pairs
    resume: str = ""                # "" new run; "auto" (or a bare --resume) syncnet_last.pth if any; "last" or a path: must exist
    reference_encoder: str = ""     # SyncTalk_2D audio_visual_encoder.pth: initialise the audio tower from it
    write_features: bool = True     # at the end, write dataset/NAME/aud_feat.npy with the best audio encoder
    feature_variants: int = 0       # [0..] with the features, also those of this many augmented copies of the audio (other pitch/formants, gain, noise: aud_feat_aug.npz) for train_328 --voice_aug
    features_only: bool = False     # no training: write features with syncnet_best.pth (or --reference_encoder)
    eval_on: str = ""               # comma list of other datasets of the same person: evaluate the best checkpoint on them
    eval_only: bool = False         # no training, no features: only the --eval_on evaluation


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
                "aug_variants", "gain_db", "snr_db", "speed", "audio_source", "opening_weight")
BEFORE = {"opening_weight": 0.0, "audio_source": "mel"}   # checkpoints older than the setting trained without it / on the mel


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
    if cfg.opening_weight < 0 and cfg.opening_weight != -1:
        raise UserError(f"--opening_weight {cfg.opening_weight}: give 0 (off), a positive weight such as 1, or -1 (auto)")
    if cfg.audio_source not in SOURCES or (cfg.reference_encoder and cfg.audio_source != "mel"):
        raise UserError(f"--audio_source {cfg.audio_source}: use {', '.join(SOURCES)} or auto (--reference_encoder needs mel)")
    return dict(widths=parse_widths(cfg.widths), emb_dim=cfg.emb_dim, T=cfg.frames, lower_half=cfg.lower_half,
                face_size=face_size, region=region, motion_only=cfg.motion_only,
                audio_k=cfg.audio_windows, audio_stride=cfg.audio_stride, audio_source=cfg.audio_source,
                opening_head=cfg.opening_weight > 0)


def lr_at(step, cfg, total):
    """Linear warmup, then cosine decay to lr * lr_min_frac at lr_decay_steps (default: the end)."""
    return utils.warmup_cosine(step, cfg.lr, cfg.warmup_steps, cfg.lr_decay_steps or total, cfg.lr_min_frac)


def resume_point(cfg, last_path, device):
    """The checkpoint --resume names (utils.resume_checkpoint; None: a new run, replacing any
    checkpoints there with a note) and the config with the checkpoint's RESUME_FIXED values."""
    ckpt = utils.resume_checkpoint(cfg.resume, last_path, device, existing="note")
    if ckpt is None:
        return cfg, None
    # a setting newer than the checkpoint has the value it had before it existed (BEFORE, else the default)
    fixed = {k: ckpt["config"].get(k, BEFORE.get(k, getattr(Config, k))) for k in RESUME_FIXED}
    changed = {k: (getattr(cfg, k), v) for k, v in fixed.items() if getattr(cfg, k) != v}
    if changed:
        print(f"note: --resume keeps the checkpoint's {', '.join(f'{k}={v[1]}' for k, v in changed.items())}")
    return dataclasses.replace(cfg, **fixed), ckpt


def make_model(cfg, device, ckpt):
    """The seeded SyncNet (a new run's audio tower from --reference_encoder) and AdamW, without
    weight decay on biases, BN and the logit scale/bias. -> (model, model_args, optimizer)."""
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
    return model, model_args, opt


def train(cfg, ds_dir, ckpt_dir, device, progress=None, should_stop=None):
    """The training run; returns dict(best, val, best_path, last_path, steps, stopped)."""
    last_path, best_path = ckpt_dir / utils.SYNCNET_LAST, ckpt_dir / utils.SYNCNET_BEST
    check_dataset(ds_dir)
    asked = cfg.audio_source
    cfg, ckpt = resume_point(resolve_opening(resolve_source(cfg, ds_dir), ds_dir), last_path, device)
    model, model_args, opt = make_model(cfg, device, ckpt)
    t0 = time.time()
    data = training_data(cfg, ds_dir, model)
    step, best = 0, {"acc": -1.0, "loss": float("inf")}
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        step, best = ckpt["step"], ckpt["best"]
        torch.set_rng_state(ckpt["rng"].cpu())   # loaded onto the device; the CPU generator takes a CPU ByteTensor
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    utils.save_config(cfg, ckpt_dir / "syncnet_config.json")
    with open(ckpt_dir / "syncnet_log.txt", "a") as log_file:
        def log(line):
            tqdm.write(line)
            log_file.write(line + "\n")
            log_file.flush()

        clip = data.clip
        log(f"syncnet {cfg.name}: {clip.n} frames, train [0, {data.train_hi}) val [{data.val_lo}, {clip.n}) "
            f"({data.val_pairs[0].size * 2} fixed pairs), audio {cfg.audio_source}{' (auto)' if asked == 'auto' else ''}, "
            f"{len(clip.windows)} audio variants, face {model.face_size}, "
            f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M params, device {device}, "
            f"steps {step}->{data.total}, data ready in {time.time() - t0:.1f} s")

        def save(step, best, val, improved):
            state = {"model": utils.unwrap(model).state_dict(), "optimizer": opt.state_dict(), "step": step,
                     "epoch": step / data.steps_per_epoch, "config": dict(dataclasses.asdict(cfg), model_args=model_args),
                     "rng": torch.get_rng_state(), "best": best, "best_acc": best["acc"], "val": val}
            utils.save_checkpoint(state, last_path)
            if improved:   # syncnet_best.pth keeps the held-out threshold in its bias
                calibrated = dict(state["model"], logit_bias=state["model"]["logit_bias"] - val["threshold"])
                utils.save_checkpoint(dict(state, model=calibrated), best_path)

        step, best, val, stopped = fit(model, opt, cfg, data, step, best, save, log, device, progress, should_stop)
        log(f"done: best val acc {best['acc']:.3f} (loss {best['loss']:.4f}) at step {best.get('step')}, "
            f"{(time.time() - t0) / 60:.1f} min -> {best_path}")
    return {"best": best, "val": val, "best_path": best_path, "last_path": last_path, "steps": step, "stopped": stopped}


def train_step(model, opt, cfg, lr, batch, device):
    """One AdamW step on one batch of train_batch. -> (loss, accuracy) tensors."""
    face, mel, frames, groups, opening = batch
    for g in opt.param_groups:
        g["lr"] = lr
    model.train()
    amp = cfg.amp and (device.type != "cuda" or utils.gpu_bf16())   # fp16 (older GPUs) would need loss scaling: fp32 there
    with utils.autocast(device, amp, cpu=True):
        a, feat = model.embed_audio(mel.to(device), with_feature=True)   # (B, D), (B, 512)
        v = model.embed_face(face.to(device))                          # (B, D)
    loss, acc = sync_loss(model, a.float(), v.float(), frames.to(device), groups.to(device),
                          cfg.min_shift, cfg.inbatch_negatives)
    if model.opening_head is not None and cfg.opening_weight > 0:   # the features also say how far the mouth opens
        loss = loss + cfg.opening_weight * F.mse_loss(model.opening_head(feat.float()).squeeze(1), opening.to(device))
    opt.zero_grad(set_to_none=True)             # the reference never cleared its gradients
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    return loss, acc


def fit(model, opt, cfg, data, step, best, save, log, device, progress, should_stop):
    """Steps `step`..data.total; every val_every steps, at the end and when should_stop() asks: the
    held-out check, best chosen on accuracy at the held-out threshold, save(step, best, val,
    improved) and a log line. -> (step, best, last held-out metrics, stopped)."""
    loader = torch.utils.data.DataLoader(StepBatches(data.clip, cfg, data.train_hi, step, data.total), batch_size=None,
                                         num_workers=cfg.num_workers)
    bar = tqdm(total=data.total, initial=step, desc="syncnet", unit="step")
    run = {"loss": 0.0, "acc": 0.0, "n": 0, "samples": 0, "time": 0.0}
    val, stopped = None, False
    tic = time.time()
    for batch in loader:
        lr = lr_at(step, cfg, data.total)
        loss, acc = train_step(model, opt, cfg, lr, batch, device)
        step += 1
        run["loss"] += loss.item()
        run["acc"] += acc.item()
        run["n"] += 1
        run["samples"] += len(batch[0])
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{acc.item():.2f}")
        if progress is not None:
            progress(step, data.total, {"loss": loss.item(), "acc": acc.item()})
        stopped = should_stop is not None and bool(should_stop())
        if step % cfg.val_every == 0 or step == data.total or stopped:
            run["time"] += time.time() - tic
            val = sync_metrics(model, data.clip, data.val_pairs, device)
            improved = val["cal_acc"] > best["acc"] or (val["cal_acc"] == best["acc"] and val["loss"] < best["loss"])
            if improved:
                best = {"acc": val["cal_acc"], "loss": val["loss"], "step": step, "threshold": val["threshold"],
                        "uncalibrated_acc": val["acc"]}
            save(step, best, val, improved)
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
    return step, best, val, stopped


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
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
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
        if cfg.feature_variants:
            write_feature_variants(ds_dir, encoder, cfg, cfg.feature_variants, device)
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
