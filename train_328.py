"""Train the person-specific generator (SPEC §7) on dataset/NAME, writing checkpoint/NAME/.

    python train_328.py --name anna                                   # GPU: full widths, batch 8
    python train_328.py --name anna --batch_size 64 --lr 2e-3 --warmup_steps 100 --max_steps 2460 --stem s2d --num_workers 12 --perceptual msssim_y   # 8 min on an H200 (README, budget B)
    python train_328.py --name anna --widths light --batch_size 2 --max_steps 20 --device cpu   # CPU smoke run
    torchrun --nproc_per_node 4 train_328.py --name anna             # multi-GPU (DDP)

Each step: a batch of single frames (reference = another frame, masked crop, audio window; with --context_swap a share
of them wear a nearby frame's face around the hole), plus, with --sync_weight > 0 and a SyncNet checkpoint,
`sync_clips` clips of T (5) consecutive frames whose predictions the frozen SyncNet judges against the clip's mel
windows. Loss = L1 + perceptual_weight x perceptual (VGG19 conv3_3 if its ImageNet weights are on disk, else MS-SSIM
of the luma) + sync weight x sync BCE (off by default). Writes last.pth (every save_every steps and at the end),
best.pth (lowest held-out L1; inference uses last.pth unless told), step_XXXXXX.pth (every snapshot_every), config.json, log.txt and previews/ (reference |
masked | prediction | truth). `--resume auto` continues exactly where last.pth left off: data order, references and
the lr schedule are pure functions of (seed, step). Ctrl-C loses at most save_every steps. Speed: bench_train.py.
"""
import dataclasses
import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import guidance_fit
import syncnet_model
import utils
from runlog import RunLog, save_preview
from losses import (PERCEPTUAL_WEIGHT, Adversary, Objective, OpeningHead, check_window, cut_window, ema_update, make_perceptual,
                    mask_box, pick_window, train_step, validate)
from datasets import (LipDataset, StepBatches, feature_encoder, generator_mask, opening_weights, read_feature_info,
                      reference_pool, split_frames)
from unet_328 import BASES, STEMS, WIDTHS, UNet328, count_params
from utils import UserError


@dataclass
class Config:
    name: str = ""                  # dataset name: reads DATA_ROOT/NAME, writes CKPT_ROOT/NAME
    dataset: str = ""               # dataset folder; overrides data_root/name (alias --dataset_dir)
    out_dir: str = ""               # checkpoint folder; overrides ckpt_root/name (alias --save_dir)
    data_root: str = str(utils.DATASET_DIR)     # where datasets live
    ckpt_root: str = str(utils.CHECKPOINT_DIR)  # where checkpoints live
    resume: str = ""                # "" new run; "auto" (or a bare --resume) last.pth if any; "last" or a path: must exist
    overwrite: bool = False         # start a new run even where out_dir already holds one
    widths: str = "full"            # U-Net widths: full (12.2 M params), light or narrow (CPU; narrow: a cheaper top level, budget A's recipe), or 6 ints "16,16,32,64,128,256"
    batch_size: int = 8             # [1..] frames per step per process (reference: 8)
    held_out: float = 0.1           # [0..0.5] share of frames held out for validation (a contiguous tail)
    augment: bool = True            # random brightness gain/offset, the same on reference and target
    stem: str = "s2d4l"             # s2d4l: s2d4 whose 80 px blocks do not expand (a narrow step ~0.84x s2d4's; budget A, equal minutes: LMD 2.405 / 2.423 vs 2.535 / 2.444, RESULTS.md round 35); s2d4: the U-Net folds 4 x 4 pixels into channels, levels 80 .. 10 px (a narrow step ~0.7x s2d's, better at equal minutes: round 33); s2d: 2 x 2 pixels, every level at half the resolution (CPU steps ~2x cheaper than conv's, better at equal time: round 11; the measured GPU recipe's); conv: its first level convolves the 320 px crop (the reference design). A resumed run keeps its checkpoint's
    base: str = "none"              # none: the U-Net paints the whole crop (reference); ref: it paints a change over the reference in the hole (unet_328.UNet328)
    reference: str = "random"       # random: a sample's reference crop is any training frame (reference design); closed: one of the tenth of them with the most closed mouth, like inference's default reference; audio: one of a bank of 64 training frames that sounds like the sample (the bank is saved for inference --reference audio)
    audio_film: bool = False        # the audio also scales and shifts every decoder level, not only the bottleneck (unet_328.UNet328): better on grid's own audio, worse on andrew's 25 s and on other voices (RESULTS.md round 46)
    mask: str = "under_nose"        # area the U-Net repaints: under_nose (the lower face under the nose, from the avatar's landmarks, grown 13 px down and sideways, not up: the nose stays the frame's; RESULTS.md round 25), jaw (the same grown up too) or rect (the reference's whole-crop rectangle)
    mouth_weight: float = 0.0       # [0..] extra L1 weight inside each frame's mouth box (0 = plain L1 over the crop)
    edge_weight: float = 0.0        # [0..] weight of an L1 on neighbouring pixels' differences (losses.edge_l1: edges such as the lips' contour count more; 0 = off)
    window: int = 0                 # [0..320] px; > 0: the first window_share of the steps train on a random WINDOW x WINDOW part of each crop (a multiple of 32, >= 192 with MS-SSIM; ~2.6x cheaper steps on CPU at 192), the rest on whole crops. 0 = whole crops throughout (measured better at equal CPU time, RESULTS.md round 4)
    window_share: float = 0.8       # [0..1] share of the steps (the first ones) that train on windows when --window > 0
    open_weight: float = 0.0        # [0..] draw training frames with weight 1 + W x |mouth opening's robust z-score| (the wide-open and tight-shut extremes more often; 0 = uniform, each epoch a permutation)
    audio_lr_mult: float = 1.0      # [>0..] the U-Net's audio branch learns at lr x this (1 = one rate for all)
    ema: float = 0.99               # [0..0.9999] > 0: keep an exponential moving average of the weights (this decay per step, less in the first steps: ema_update); checkpoints' model and the held-out check use it (0 = off; RESULTS.md round 9)
    voice_aug: float = 0.0          # [0..1] share of training samples whose audio features come from an augmented copy of the recording (another pitch/formants, gain, noise: aud_feat_aug.npz, syncnet_328 --feature_variants): the words in other voices
    context_swap: float = -1.0      # [-1..1] share of training samples whose surroundings of the masked area come from a frame 0.16-1 s away where the head sits as it does (datasets.context_partners; frames without one keep their own), so the mouth follows the audio, not the face around it: with audio that is not the template frames' own (every inference) the mouth opens wider and truer (RESULTS.md rounds 41, 42); 0 = the target frame's own; -1 = auto: 0.25 on recordings of a minute or more (utils.LONG_RECORDING_S), 0 on shorter ones, where it cost mouth PSNR and LMD (round 42)
    opening_weight: float = 0.0     # [0..] weight of an auxiliary loss: a linear head on the U-Net's audio branch predicts the frame's mouth opening (from its landmarks), so the audio path learns how far the mouth opens from the first steps (0 = off)
    num_workers: int = -1           # [-1..] DataLoader worker processes per loader and process; -1 = auto: 0 on a CPU (a worker's process slows the training threads more than it saves: 1.27x the steps/s at 2 threads, RESULTS.md round 22), 2 on a GPU
    seed: int = 0                   # [0..] seeds the weights, data order, reference choice, augmentation
    epochs: int = 100               # [1..] passes over the training frames (reference: 100); used when max_steps is 0
    max_steps: int = 0              # [0..] optimizer steps; 0 = epochs x steps per epoch
    lr: float = 4e-3                # [>0..] Adam peak learning rate (reference: 1e-3; with a 50-step warm-up 2e-3 and then 4e-3 measured better at 500 CPU steps, RESULTS.md, rounds 2-3)
    warmup_steps: int = 50          # [0..] linear lr warm-up, steps (before: 200)
    min_lr_frac: float = 0.1        # [0..1] the cosine decay ends at lr x this
    grad_clip: float = 1.0          # [0..] gradient-norm clip (0 = off): guards against sync-loss spikes
    perceptual: str = "auto"        # auto | vgg | msssim | msssim_y (MS-SSIM of the luma only) | off; auto = VGG19 conv3_3 when its weights are on disk, else msssim_y (a resume keeps the checkpoint's)
    perceptual_weight: float = -1.0  # weight of the perceptual term; < 0 = the kind's default (VGG 0.01, MS-SSIM 0.5)
    sync_weight: float = 0.0        # [0..] SyncNet loss weight; 0 = off. The reference's 10 only worked because its SyncNet had learned nothing (loss ~0); against ours it swamps L1 (see README, section 3)
    sync_ramp: int = 2000           # [0..] steps over which the sync weight rises from 0: a face must exist before its sync matters
    sync_start: float = 0.0         # [0..1] share of the steps trained before the sync loss starts (its clips are drawn, and its ramp counts, from there)
    adv_weight: float = 0.0         # [0..] weight of an adversarial term: a patch critic on the repainted area (losses.Adversary) against the blur that L1 leaves; 0 = off
    adv_start: float = 0.5          # [0..1] share of the steps trained before the adversarial term starts (a face must exist first)
    adv_ramp: int = 100             # [0..] steps over which its weight rises from 0
    adv_lr: float = 1e-3            # [>0..] the critic's Adam learning rate (constant)
    sync_clips: int = 2             # [0..] clips of the SyncNet's T (5) consecutive frames per step for the sync loss (also in L1)
    syncnet: str = ""               # SyncNet checkpoint; default CKPT_ROOT/NAME/syncnet_best.pth (alias --syncnet_checkpoint)
    device: str = "auto"            # auto (cuda -> mps -> cpu), cpu, cuda, cuda:1, mps
    threads: int = 0                # [0..] torch CPU threads (0 = torch's default; 1 is faster on a busy machine)
    amp: bool = True                # mixed precision: bf16 (else fp16 + loss scaling) on GPU; bf16 on CPUs with bf16 units (AVX512-BF16/AMX: ~2x faster steps), else fp32
    compile: bool = False           # torch.compile the U-Net (minutes of compiling, then faster steps)
    channels_last: bool = True      # NHWC memory layout: faster convolutions (SPEC §11)
    log_every: int = 10             # [1..] steps between log lines
    val_every: int = 500            # [1..] steps between held-out L1 evaluations (also at the end)
    val_frames: int = 64            # [1..] held-out frames per evaluation (evenly spaced over the tail)
    preview_every: int = 500        # [1..] steps between preview PNGs (also at the end)
    save_every: int = 500           # [1..] steps between last.pth saves (also at the end)
    save_minutes: float = 0.0       # [0..] also save last.pth once this many minutes passed since the last save (0 = off): a killed job loses at most that
    snapshot_every: int = 5000      # [0..] steps between kept step_XXXXXX.pth copies (0 = none)
    tensorboard: bool = False       # also log to OUT_DIR/tb (needs the tensorboard package)
    fit_guidance: bool = True       # at the end, fit the guidance inference gives this model (guidance_fit.py: how wide it opens on the held-out tail; ~20 s on CPU)


RESUME_NOTE = ("lr", "max_steps", "batch_size", "warmup_steps", "min_lr_frac", "seed", "held_out", "augment", "perceptual", "perceptual_weight", "sync_weight", "world_size", "mouth_weight", "edge_weight", "opening_weight", "reference", "window", "window_share", "audio_lr_mult", "ema", "adv_weight", "adv_start")   # worth a line when a resume changes them
ALIASES = {"dataset_dir": "dataset", "save_dir": "out_dir", "batchsize": "batch_size", "syncnet_checkpoint": "syncnet"}


# ---------------------------------------------------------------------------------------------- helpers
def lr_at(step, cfg, max_steps):
    """Linear warm-up, then cosine decay to lr x min_lr_frac: a pure function of step."""
    return utils.warmup_cosine(step, cfg.lr, cfg.warmup_steps, max_steps, cfg.min_lr_frac)


def loader_workers(n, device, gpu=2):
    """DataLoader workers: n, or for n < 0 none on a CPU (their processes slow the training threads more than they save) and `gpu` on a GPU."""
    return n if n >= 0 else (gpu if device.type == "cuda" else 0)


def parse_widths(text):
    return utils.parse_widths(text, WIDTHS, count=6, least=2)


def rng_state(device):   # on a GPU the device in use only: a resume may see fewer GPUs
    cuda = {"cuda": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {}
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(), **cuda}


def set_rng_state(s):
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"].cpu())
    t, k = s.get("cuda"), torch.cuda.current_device() if torch.cuda.is_available() else -1
    t = t[k] if isinstance(t, (list, tuple)) and 0 <= k < len(t) else t   # older checkpoints: a state per visible GPU
    if k >= 0 and isinstance(t, torch.Tensor):
        torch.cuda.set_rng_state(t.cpu())


def resolve_paths(cfg):
    if not (cfg.name or cfg.dataset):
        raise UserError("no dataset given: python train_328.py --name NAME (a folder made by process.py)")
    ds = Path(cfg.dataset) if cfg.dataset else utils.dataset_path(cfg.name, cfg.data_root)
    name = utils.check_name(cfg.name or ds.name, "dataset name")
    out = Path(cfg.out_dir) if cfg.out_dir else Path(cfg.ckpt_root) / name
    return ds, name, out


def resume_point(cfg, out, ds, widths, enc_id):
    """The checkpoint --resume names (None for a new run), checked against this run's widths, base
    and audio features; a UserError when out_dir holds a run that neither --resume nor --overwrite
    addresses."""
    ckpt = utils.resume_checkpoint(cfg.resume, out / utils.LAST, "cpu", existing="replace" if cfg.overwrite else "error")
    if ckpt is None:
        return None
    got = ckpt.get("config", {}).get("widths")
    if got is not None and list(got) != widths:
        raise UserError(f"the checkpoint was trained with --widths {','.join(map(str, got))}, not "
                        f"{','.join(map(str, widths))}; pass the same --widths or start a new run")
    got = ckpt.get("config", {}).get("audio_lr_mult", 1.0)
    if (got != 1) != (cfg.audio_lr_mult != 1):     # one Adam group or two: the optimizer state must fit
        raise UserError(f"the checkpoint was trained with --audio_lr_mult {got:g}; resume with a multiplier "
                        f"{'other than' if got != 1 else 'of'} 1, or start a new run")
    got = ckpt.get("config", {}).get("base", "none")
    if got != cfg.base:
        raise UserError(f"the checkpoint was trained with --base {got}, not {cfg.base}; pass the same --base or start a new run")
    if ckpt.get("encoder_id") != enc_id:
        raise UserError(f"{ds}/aud_feat.npy was remade (encoder {enc_id}) since the checkpoint (encoder "
                        f"{ckpt.get('encoder_id')}); its audio features changed: start a new run with --overwrite")
    return ckpt


# ---------------------------------------------------------------------------------------------- main
def main(cfg, progress=None, should_stop=None):
    """Train; returns dict(step, losses, val_l1, best_loss, last, best, out_dir, stopped, timing).
    progress(step, max_steps, losses) is called after every step; should_stop() ends the run
    cleanly (last.pth saved) when it returns True (single-process only)."""
    utils.check_config(cfg)
    ds, name, out = resolve_paths(cfg)
    utils.load_meta(ds)
    info = read_feature_info(ds)
    widths = parse_widths(cfg.widths)
    if cfg.base not in BASES:
        raise UserError(f"--base {cfg.base!r}: choose {' or '.join(BASES)}")
    if cfg.stem not in STEMS:
        raise UserError(f"--stem {cfg.stem!r}: choose {' or '.join(STEMS)}")
    ddp = int(os.environ.get("WORLD_SIZE", 1)) > 1
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
    device = utils.get_device(cfg.device)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    cfg = dataclasses.replace(cfg, num_workers=loader_workers(cfg.num_workers, device))
    if ddp:
        import torch.distributed as dist
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    master = rank == 0
    try:
        res = _train(cfg, ds, name, out, info, widths, device, rank, world, master, progress, should_stop)
        if master and cfg.fit_guidance and not res["stopped"]:
            guidance_fit.fit_run(out, ds, cfg.held_out, device, RunLog(out, True).line)
        return res
    except torch.cuda.OutOfMemoryError:
        raise UserError(f"out of {device.type} memory at --batch_size {cfg.batch_size}; try --batch_size "
                        f"{max(1, cfg.batch_size // 2)} (or --widths light)") from None
    finally:
        if ddp:
            dist.destroy_process_group()


def _data(cfg, ds, ckpt, enc_id):
    """A contiguous held-out tail; the mask to repaint (a resumed run keeps its checkpoint's); the
    reference pool; the training set. -> (cfg, note, train_idx, val_idx, mask, refs, train_set)."""
    n = utils.load_npy(ds / utils.CROPS, mmap=True).shape[0]
    train_idx, val_idx = split_frames(n, cfg.held_out)
    note = ""
    if ckpt is not None:
        got = ckpt.get("config", {}).get("mask", "rect")   # checkpoints from before --mask: the rectangle
        if got != cfg.mask:
            note = f"; it keeps the checkpoint's --mask {got} (not {cfg.mask})"
            cfg = dataclasses.replace(cfg, mask=got)
        mask = utils.checkpoint_mask(ckpt)
        for key, old in (("stem", "conv"), ("audio_film", False)):   # the U-Net's shape; checkpoints from before the option: old
            got = ckpt.get("config", {}).get(key, old)
            if got != getattr(cfg, key):
                note += f"; it keeps the checkpoint's --{key} {got} (not {getattr(cfg, key)})"
                cfg = dataclasses.replace(cfg, **{key: got})
        got = ckpt.get("config", {}).get("perceptual", "msssim")   # auto resumes the checkpoint's kind
        cfg = dataclasses.replace(cfg, perceptual=got) if cfg.perceptual == "auto" and got in PERCEPTUAL_WEIGHT else cfg
    else:
        mask = generator_mask(ds, train_idx, cfg.mask)
    refs = reference_pool(ds, train_idx, cfg.reference)
    train_set = LipDataset(ds, train_idx, cfg.seed, cfg.augment, expected_encoder_id=enc_id, mask=mask, ref_frames=refs,
                           ref_by_audio=cfg.reference == "audio", voice_aug=cfg.voice_aug, context_swap=cfg.context_swap)
    return cfg, note, train_idx, val_idx, mask, refs, train_set


def _objective(cfg, out, name, device, mask, max_steps, world):
    """The loss terms: perceptual kind and weight, the optional frozen SyncNet, the optional
    adversary on the mask's box. -> (Objective, perceptual kind, SyncNet path, a line for the log)."""
    sync_path = Path(cfg.syncnet) if cfg.syncnet else out / utils.SYNCNET_BEST
    syncnet, sync_weight = None, cfg.sync_weight
    if sync_weight > 0 and cfg.sync_clips > 0 and (cfg.syncnet or sync_path.is_file()):
        syncnet = syncnet_model.load_syncnet(sync_path, device)[0].requires_grad_(False)   # frozen, eval mode
    elif sync_weight > 0:
        sync_weight = 0.0
    sync_note = (f"sync loss weight {sync_weight} (SyncNet {sync_path}, from {cfg.sync_start:.0%} of the steps, ramp {cfg.sync_ramp} steps)" if syncnet is not None
                 else f"sync loss OFF: no SyncNet checkpoint at {sync_path} (python syncnet_328.py --name {name})"
                 if cfg.sync_weight > 0 and cfg.sync_clips > 0 else "sync loss OFF (--sync_weight 0 or --sync_clips 0)")
    perc_kind, perc_fn = make_perceptual(cfg.perceptual, device)
    perc_weight = PERCEPTUAL_WEIGHT[perc_kind] if cfg.perceptual_weight < 0 else cfg.perceptual_weight
    adversary, adv_note = None, ""
    if cfg.adv_weight > 0:
        if world > 1:
            raise UserError("--adv_weight trains its critic in one process; train on one GPU (or pass --adv_weight 0)")
        adversary = Adversary(cfg.adv_weight, round(cfg.adv_start * max_steps), cfg.adv_ramp, mask_box(mask), device, cfg.adv_lr, cfg.seed)
        adv_note = f"; adversarial weight {cfg.adv_weight} from step {adversary.start} (ramp {cfg.adv_ramp}), critic on rows:cols {adversary.box}"
    objective = Objective(perc_fn, perc_weight, cfg.mouth_weight, None, cfg.opening_weight, syncnet, sync_weight, cfg.sync_ramp,
                          edge_weight=cfg.edge_weight, adversary=adversary)
    return objective, perc_kind, sync_path, f"perceptual: {perc_kind} (weight {perc_weight}); {sync_note}{adv_note}"


def _model(cfg, widths, device, ckpt, opening):
    """U-Net (+ the opening head when --opening_weight > 0, from the training frames' `opening`),
    Adam, the loss scaler, the weights' moving average (--ema; updated by each optimizer step),
    restored from ckpt when resuming. -> (model, head, optimizer, scaler, ema or None, step, best loss)."""
    torch.manual_seed(cfg.seed)
    model = UNet328(widths, base=cfg.base, stem=cfg.stem, audio_film=cfg.audio_film).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    head = OpeningHead(widths[-1], opening.mean(), opening.std()).to(device) if cfg.opening_weight > 0 else None
    audio = list(model.audio_branch.parameters()) if cfg.audio_lr_mult != 1 else []
    ids = {id(q) for q in audio}
    rest = [p for p in model.parameters() if id(p) not in ids] + (list(head.parameters()) if head is not None else [])
    groups = [dict(params=rest)] + ([dict(params=audio, lr_mult=cfg.audio_lr_mult)] if audio else [])
    # fused: one kernel for all parameters; on CPU the per-tensor paths are far slower with channels_last
    optimizer = torch.optim.Adam(groups, lr=cfg.lr, fused=device.type in ("cuda", "cpu"))
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and cfg.amp and not utils.gpu_bf16())
    step, best_loss = 0, float("inf")
    ema = None
    if cfg.ema > 0:
        ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=ema_update(cfg.ema), use_buffers=True)
        optimizer.register_step_post_hook(lambda *_: ema.update_parameters(model))
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt.get("train_model") or ckpt["model"])   # with --ema, "model" holds the average
            if ema is not None:
                ema.module.load_state_dict(ckpt["model"])
                ema.n_averaged.fill_(int(ckpt["step"]))
            if head is not None and ckpt.get("opening_head") is not None:
                head.load_state_dict(ckpt["opening_head"])
            optimizer.load_state_dict(ckpt["optimizer"])
            for g in optimizer.param_groups[1:]:
                g["lr_mult"] = cfg.audio_lr_mult       # the saved groups carry the old multiplier
        except (RuntimeError, ValueError, KeyError) as e:
            raise UserError(f"the checkpoint does not fit this U-Net ({str(e).splitlines()[0][:150]})") from None
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        step, best_loss = int(ckpt["step"]), float(ckpt.get("best_loss", float("inf")))
        if "rng" in ckpt:
            set_rng_state(ckpt["rng"])
    if head is not None:
        head.watch(model)
    return model, head, optimizer, scaler, ema, step, best_loss


def _loaders(cfg, ds, train_set, train_idx, val_idx, refs, mask, syncnet, step, rank, world, device, master, syncnet_from=0):
    """The step-indexed training batches (from `step` on), the SyncNet's clips when the sync loss is
    on, and the held-out loader (master only). -> (batches, clips or None, val_loader or None)."""
    def loader(dataset, batch_sampler):
        return torch.utils.data.DataLoader(dataset, batch_sampler=batch_sampler, num_workers=cfg.num_workers,
                                           pin_memory=device.type == "cuda", persistent_workers=False)
    weights = opening_weights(train_set.opening[train_idx], cfg.open_weight) if cfg.open_weight > 0 else None
    batches = iter(loader(train_set, StepBatches(len(train_set), cfg.batch_size, cfg.seed, step, rank, world, weights=weights)))
    clips = None
    if syncnet is not None:
        clip_set = LipDataset(ds, train_idx, cfg.seed, cfg.augment, clip=syncnet.T, ref_frames=refs,
                              mel_offsets=syncnet.audio_offsets, mask=mask, audio_source=syncnet.audio_source,
                              ref_by_audio=cfg.reference == "audio")
        first = max(step, syncnet_from)    # step-indexed from where the sync loss starts (a resume draws the same clips)
        clips = iter(loader(clip_set, StepBatches(len(clip_set), cfg.sync_clips, cfg.seed, first, rank, world, salt=1)))
    if not (master and len(val_idx)):
        return batches, clips, None
    val_sub = val_idx[np.linspace(0, len(val_idx) - 1, min(cfg.val_frames, len(val_idx))).round().astype(int)]
    val_set = LipDataset(ds, val_sub, cfg.seed, ref_frames=refs, mask=mask,   # references never show held-out mouths
                         ref_by_audio=cfg.reference == "audio")
    return batches, clips, torch.utils.data.DataLoader(val_set, batch_size=cfg.batch_size)


def _train(cfg, ds, name, out, info, widths, device, rank, world, master, progress, should_stop):
    """Set the run up (resume point, data, loss terms, model, loaders, run record), then train it."""
    audio_encoder, enc_id, audio_source = feature_encoder(ds, info)
    ckpt = resume_point(cfg, out, ds, widths, enc_id)
    cfg, mask_note, train_idx, val_idx, mask, refs, train_set = _data(cfg, ds, ckpt, enc_id)
    per_epoch = StepBatches(len(train_set), cfg.batch_size, world=world).per_epoch
    max_steps = cfg.max_steps or cfg.epochs * per_epoch
    objective, perc_kind, sync_path, loss_note = _objective(cfg, out, name, device, mask, max_steps, world)
    if objective.adversary is not None and ckpt is not None and ckpt.get("adversary"):
        objective.adversary.load_state_dict(ckpt["adversary"])
    objective.sync_from = int(round(cfg.sync_start * max_steps))
    check_window(cfg, perc_kind, objective.syncnet is not None)
    raw_model, opening_head, optimizer, scaler, ema, step, best_loss = _model(cfg, widths, device, ckpt, train_set.opening[train_idx])
    objective.opening_head = opening_head
    model = torch.compile(raw_model) if cfg.compile else raw_model
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    batches, clips, val_loader = _loaders(cfg, ds, train_set, train_idx, val_idx, refs, mask, objective.syncnet,
                                          step, rank, world, device, master, objective.sync_from)
    resolved = dict(dataclasses.asdict(cfg), name=name, dataset=str(ds), out_dir=str(out), widths=widths,   # the run record
                    widths_preset=cfg.widths if cfg.widths in WIDTHS else "custom", perceptual=perc_kind,
                    perceptual_weight=objective.perc_weight, sync_weight=objective.sync_weight, syncnet=str(sync_path) if objective.syncnet else "",
                    max_steps=max_steps, steps_per_epoch=per_epoch, world_size=world,
                    train_frames=len(train_idx), val_frames=int(len(val_idx)), encoder_id=enc_id)
    if master:
        out.mkdir(parents=True, exist_ok=True)
        with utils.atomic_file(out / "config.json") as tmp:
            tmp.write_text(json.dumps(resolved, indent=2))
    run_log = RunLog(out, master, cfg.tensorboard)
    bank = train_set.bank() if cfg.reference == "audio" else None   # inference --reference audio picks from it

    def save(path, step, best_loss, val_l1=None):
        utils.save_checkpoint(dict(model=(ema.module if ema is not None else raw_model).state_dict(), optimizer=optimizer.state_dict(),
                                   train_model=raw_model.state_dict() if ema is not None else None,
                                   scaler=scaler.state_dict(), step=step, epoch=step // per_epoch,
                                   config=resolved, rng=rng_state(device), best_loss=best_loss, val_l1=val_l1,
                                   audio_encoder=audio_encoder, audio_source=audio_source, encoder_id=enc_id,
                                   opening_head=opening_head.state_dict() if opening_head is not None else None,
                                   mask=None if mask is None else torch.from_numpy(mask), ref_bank=bank,
                                   adversary=objective.adversary.state_dict() if objective.adversary is not None else None), path)

    run_log.line(f"{name}: {len(train_idx)} train / {len(val_idx)} held-out frames, U-Net {widths} "
                 f"({count_params(raw_model) / 1e6:.2f} M params) on {device} x{world}, batch {cfg.batch_size}, "
                 f"{per_epoch} steps/epoch, steps {step} -> {max_steps}" + train_set.swap_note())
    run_log.line(loss_note)
    if ckpt is not None:
        old = ckpt.get("config", {})
        changed = [f"{k} {old[k]} -> {resolved[k]}" for k in RESUME_NOTE if k in old and old[k] != resolved[k]]
        run_log.line(f"resumed from step {step}" + (f"; changed since: {', '.join(changed)}" if changed else "") + mask_note)
    validate_fn = (lambda: validate(ema.module if ema is not None else raw_model, val_loader, device, cfg)) if val_loader is not None else None
    return _loop(cfg, model, objective, optimizer, scaler, batches, clips, validate_fn, save, run_log, out,
                 device, world, master, step, best_loss, max_steps, per_epoch, progress, should_stop)


def _loop(cfg, model, objective, optimizer, scaler, batches, clips, validate_fn, save, run_log, out,
          device, world, master, step, best_loss, max_steps, per_epoch, progress, should_stop):
    """Steps `step`..max_steps. The master logs every log_every steps, writes previews, checks the
    held-out frames with validate_fn() (best.pth when their L1 improves), saves last.pth and
    snapshots; all of them also at the end and when should_stop() asks."""
    last, losses, val_l1, audio_effect, stopped = out / utils.LAST, {}, None, None, False
    first_step, t_saved = step, time.perf_counter()
    run_log._window(step)
    bar = tqdm(total=max_steps, initial=step, disable=not master, desc="train", unit="step", dynamic_ncols=True)
    model.train()
    while step < max_steps:
        lr = lr_at(step, cfg, max_steps)
        for g in optimizer.param_groups:
            g["lr"] = lr * g.get("lr_mult", 1.0)
        t0 = time.perf_counter()
        b = next(batches)
        c = next(clips) if clips is not None and step >= objective.sync_from else None
        t1, c1 = time.perf_counter(), time.process_time()
        window = (pick_window(cfg.seed, step, cfg.window), cfg.window) if cfg.window and step < cfg.window_share * max_steps else None
        pred, terms = train_step(model, objective, optimizer, scaler, b, c, step, device, cfg.amp, cfg.channels_last, cfg.grad_clip, window)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        step += 1
        run_log.add(terms, t1 - t0, time.perf_counter() - t1, time.process_time() - c1, len(pred) * world, step > first_step + 1)
        bar.update(1)
        stopped = should_stop is not None and bool(should_stop())
        end = step == max_steps or stopped
        if progress is not None or step % cfg.log_every == 0 or end:
            losses = {k: v.item() for k, v in terms.items()}
        if progress is not None:
            progress(step, max_steps, losses)
        if master and (step % cfg.log_every == 0 or end):
            run_log.report(step, max_steps, per_epoch, lr)
        if master and (step % cfg.preview_every == 0 or end):
            (out / "previews").mkdir(exist_ok=True)
            shown = [b[k] if window is None else cut_window(b[k], *window) for k in ("ref", "masked", "target")]
            save_preview(out / "previews" / f"step_{step:06d}.png", shown[0], shown[1], pred, shown[2])
        if master and validate_fn is not None and (step % cfg.val_every == 0 or end):
            val_l1, audio_effect = validate_fn()
            run_log.line(f"step {step}: held-out L1 {val_l1:.4f}, audio effect {audio_effect:.2f} (mean |own - other audio| "
                         f"in the mouth box, 0-255)" + (" (best)" if val_l1 < best_loss else ""))
            run_log.scalars("val", {"l1": val_l1, "audio_effect": audio_effect}, step)
            if val_l1 < best_loss:
                best_loss = val_l1
                save(out / utils.BEST, step, best_loss, val_l1)
        if master and (step % cfg.save_every == 0 or end or
                       cfg.save_minutes > 0 and time.perf_counter() - t_saved > 60 * cfg.save_minutes):
            save(last, step, best_loss, val_l1)
            t_saved = time.perf_counter()
        if master and cfg.snapshot_every and step % cfg.snapshot_every == 0:
            save(out / f"step_{step:06d}.pth", step, best_loss, val_l1)
        if stopped:
            run_log.line(f"stopped at step {step}; continue with --resume auto")
            break
    bar.close()
    if world > 1:
        torch.distributed.barrier()
    run_log.line(f"done: step {step}, last {last}" + (f", best held-out L1 {best_loss:.4f}" if validate_fn is not None else ""))
    run_log.close()
    return dict(step=step, losses=losses, val_l1=val_l1, audio_effect=audio_effect, best_loss=best_loss, last=str(last),
                timing=run_log.summary(), best=str(out / utils.BEST) if (out / utils.BEST).is_file() else None,
                out_dir=str(out), stopped=stopped)


if __name__ == "__main__":
    utils.run_main(main, utils.parse_config(Config, description=__doc__.split("\n")[0], aliases=ALIASES,
                                            bare={"resume": "auto"}))
