"""The measurement protocol in one command: process -> SyncNet -> generator -> evaluate.py on a
held-out video, beside the template baseline, with the training speed.

    python protocol.py                                            # CPU, budget A: grid_s1_5min -> grid_s1_heldout_1min
    python protocol.py --device cuda --widths full --batch_size 64 --lr 2e-3 --warmup_steps 100 --steps 2460 --sync_steps 2000 --stem s2d   # GPU: the measured 8-minute H200 recipe (RESULTS.md round 26)
    python protocol.py --device cuda --widths full --batch_size 0 --steps 6000   # GPU: batch sized to the card
    python protocol.py --train_video a.mp4 --heldout_video b.mp4 --sync_steps 8 --steps 4 --eval_frames 60   # CPU smoke run

Datasets and the SyncNet are made once under OUT_DIR and reused by later runs (same videos, same
--sync_steps); each generator run goes to OUT_DIR/checkpoint/NAME/runs/LABEL. The table compares
the model with the template baseline (the reference crop pasted back: it ignores audio) on the
held-out video; summary.json beside it holds every figure, the commands' configs and the times.
Steps are fixed, never minutes: a result must not depend on how busy the machine is.
"""
import dataclasses
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import syncnet_328
import syncnet_data
import train_328
import utils
from utils import UserError

MEDIA = utils.REPO.parent / "shared" / "media"
SPEAKERS = ("andrew_clip2_27s.mp4", "feifei_clip2_15s.mp4", "german_anchor_20s.mp4", "aoc_hdtf_8s.mp4", "outdoor_7s.mp4")  # --voices shared: other people, filmed
UNSEEN = ("andrew_clip1_25s.mp4", "feifei_clip1_10s.mp4", "fps30_6s.mp4", "vfr_22fps_6s.mp4")  # --voices unseen: four more, no setting was chosen on them (RESULTS.md round 59)


@dataclass
class Config:
    train_video: str = str(MEDIA / "grid_s1_5min.mp4")            # what a user records (5 min of one man)
    heldout_video: str = str(MEDIA / "grid_s1_heldout_1min.mp4")  # the next minute, never trained on
    out_dir: str = str(utils.REPO / "result" / "protocol")         # datasets, checkpoints, evaluations
    label: str = ""                # name of this generator run; "" = built from the settings
    sync_steps: int = 400          # [1..] SyncNet optimizer steps (syncnet_328.py's default)
    steps: int = 2300              # [1..] generator optimizer steps (budget A on CPU with the narrow widths and the s2d4l stem: the minutes of round 12's 1350 s2d steps, 1930 s2d4 ones; RESULTS.md rounds 33, 35)
    widths: str = "narrow"         # U-Net widths: narrow (or light) on CPU, full on a GPU
    batch_size: int = 4            # [0..] generator frames per step; 0 = sized to the GPU's memory (auto_batch)
    lr: float = train_328.Config.lr            # [>0..] generator peak learning rate (train_328's default)
    warmup_steps: int = train_328.Config.warmup_steps   # [0..] generator lr warm-up steps (train_328's default)
    min_lr_frac: float = train_328.Config.min_lr_frac   # [0..1] where the generator's cosine decay ends, x lr (train_328 --min_lr_frac)
    stem: str = train_328.Config.stem          # the U-Net's first level (train_328 --stem)
    base: str = train_328.Config.base          # what the U-Net's output starts from (train_328 --base)
    reference: str = train_328.Config.reference  # training's reference pool (train_328 --reference)
    audio_source: str = "auto"     # audio features: mel, speech, both or auto (syncnet_328 --audio_source: speech for recordings of a minute or more); the mel SyncNet in --out_dir (or --judge) judges every run, and is trained for that when the source is another
    sync_opening_weight: float = syncnet_328.Config.opening_weight  # [-1..] the SyncNet's auxiliary mouth-opening loss (syncnet_328 --opening_weight; -1 = auto: on from 2000 steps)
    open_weight: float = 0.0       # [0..] sampling weight of extreme mouth openings (train_328 --open_weight)
    audio_lr_mult: float = 1.0     # [>0..] audio-branch learning-rate multiplier (train_328 --audio_lr_mult)
    sync_weight: float = 0.0       # [0..] SyncNet loss weight, against the run's SyncNet (train_328 --sync_weight); judge with --judge another one
    sync_start: float = 0.0        # [0..1] share of the steps before the sync loss starts (train_328 --sync_start)
    sync_ramp: int = 50            # [0..] steps over which it rises to its weight (train_328 --sync_ramp)
    sync_clips: int = 1            # [1..] clips of 5 frames per step for it (train_328 --sync_clips)
    amp: bool = True               # mixed precision (train_328 --amp: bf16 on GPUs and on CPUs with bf16 units)
    ema: float = train_328.Config.ema          # [0..0.9999] moving average of the generator's weights (train_328 --ema)
    opening_weight: float = 0.0    # [0..] auxiliary mouth-opening loss on the audio branch (train_328 --opening_weight)
    voice_aug: float = 0.0         # [0..1] share of samples heard through an augmented copy's features (train_328 --voice_aug; the copies are made once: syncnet_328 --feature_variants 4)
    context_swap: float = train_328.Config.context_swap   # [-1..1] share of samples whose surroundings of the hole come from another moment; -1 = auto (train_328 --context_swap)
    audio_film: bool = train_328.Config.audio_film   # the audio also modulates the decoder levels (train_328 --audio_film)
    mask: str = train_328.Config.mask          # generator mask (train_328 --mask)
    mouth_weight: float = 0.0      # [0..] extra L1 weight in the mouth box (train_328 --mouth_weight)
    edge_weight: float = 0.0       # [0..] L1 on neighbouring pixels' differences (train_328 --edge_weight)
    adv_weight: float = 0.0        # [0..] adversarial term's weight (train_328 --adv_weight)
    adv_start: float = train_328.Config.adv_start        # [0..1] share of the steps before it starts (train_328 --adv_start)
    perceptual: str = train_328.Config.perceptual        # perceptual term (train_328 --perceptual)
    perceptual_weight: float = -1.0  # its weight; < 0 = the kind's default (train_328 --perceptual_weight)
    window: int = train_328.Config.window                # [0..320] training windows, px (train_328 --window)
    window_share: float = train_328.Config.window_share  # [0..1] share of the steps on windows (train_328 --window_share)
    device: str = "auto"           # auto (cuda -> mps -> cpu), cpu, cuda
    threads: int = 0               # [0..] torch CPU threads (0 = torch's default)
    num_workers: int = -1          # [-1..] DataLoader workers; -1 = 0 on a CPU (train_328 --num_workers), 6 on a GPU
    eval_frames: int = 0           # [0..] evaluate only the first N held-out frames (0 = all)
    judge: str = ""                # SyncNet checkpoint (or the folder holding its syncnet_best.pth) that scores every run's sync check; "" = the run's mel SyncNet (OUT_DIR/checkpoint/NAME): pass a fixed one to compare runs whose SyncNets differ
    baseline: bool = True          # also evaluate the template baseline
    video_out: bool = False        # write evaluate.py's side-by-side mp4s
    voices: str = ""               # other voices the trained model also speaks (evaluate.py --audio over the held-out frames): comma list of audio files or videos of other people (processed once; their own mouth becomes the truth of the opening: speaker r), "shared" = MEDIA/speech_*.wav + SPEAKERS, "unseen" = UNSEEN (both: "shared,unseen"); "" = none
    seed: int = 0                  # [0..] seeds SyncNet and generator


ROWS = ("psnr_mouth", "ssim_mouth", "lmd_mouth_px", "opening_r", "opening_width_ratio", "ablation_gap",
        "opening_r_other_own", "opening_width_other", "opening_r_photo", "opening_width_photo", "lmd_photo_px", "sync_stretch_acc_gen", "silence_gen", "silence_true",
        "seam_ratio", "sharpness_ratio", "identity_cos")


def auto_batch(widths, device, stem="conv", amp=True, start=4, limit=256):
    """Largest power-of-two batch (<= limit) whose training step fits in the GPU's memory, halved
    for headroom (the perceptual loss and the data stream need some too)."""
    import torch
    from unet_328 import UNet328
    model = UNet328(widths, stem=stem).to(device, memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters())
    b, ok = start, 0
    while b <= limit:
        try:
            x = torch.rand(b, 6, utils.INNER, utils.INNER, device=device).contiguous(memory_format=torch.channels_last)
            with utils.autocast(device, amp):
                loss = model(x, torch.randn(b, 32, 16, 16, device=device)).float().mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            ok, b = b, 2 * b
        except RuntimeError as e:   # torch.cuda.OutOfMemoryError, or cuDNN failing to get its workspace
            if not isinstance(e, torch.cuda.OutOfMemoryError) and "CUDNN" not in str(e).upper():
                raise
            break
        finally:
            x = loss = None
            torch.cuda.empty_cache()
    del model, opt
    torch.cuda.empty_cache()
    return max(ok // 2, 1)


def prepare(video, data_root):
    """process.py once per video: -> its dataset folder."""
    import process
    name = utils.safe_stem(video)
    ds = Path(data_root) / name
    if not (ds / utils.CROPS).is_file():
        process.main(process.Config(video=str(video), name=name, data_root=str(data_root)))
    return ds


def check_inputs(cfg):
    """Videos, voices and judge that are not there: said before anything runs. -> cfg, its judge a file."""
    for v in (cfg.train_video, cfg.heldout_video):
        if not Path(v).is_file():
            raise UserError(f"video not found: {v} (give --train_video and --heldout_video)")
    voice_files(cfg.voices) if cfg.voices else None
    import audio_features
    if cfg.audio_source not in (*audio_features.SOURCES, "auto"):
        raise UserError(f"--audio_source {cfg.audio_source}: use {', '.join(audio_features.SOURCES)} or auto")
    return dataclasses.replace(cfg, judge=judge_file(cfg.judge))


def judge_file(judge):
    """--judge: "" (the run's own mel SyncNet), a checkpoint, or a folder holding syncnet_best.pth -> the file."""
    if not judge:
        return ""
    path = Path(judge) / utils.SYNCNET_BEST if Path(judge).is_dir() else Path(judge)
    if not path.is_file():
        raise UserError(f"--judge {judge}: no SyncNet checkpoint there (give a {utils.SYNCNET_BEST} or the folder holding one)")
    return str(path)


def train_syncnet(cfg, source, train_ds, root, times, features=True):
    """The SyncNet of one audio source in ROOT/NAME, trained once per (video, steps, seed, source):
    a stamp file says what the checkpoint there is. -> (its folder, its syncnet_328.Config)."""
    name, data_root = train_ds.name, train_ds.parent
    sync_dir = root / name
    sync_cfg = syncnet_data.resolve_opening(syncnet_328.Config(
        name=name, data_root=str(data_root), ckpt_root=str(root), device=cfg.device, seed=cfg.seed,
        max_steps=cfg.sync_steps, audio_source=source, opening_weight=cfg.sync_opening_weight,
        write_features=features), train_ds)
    ow = sync_cfg.opening_weight
    stamp = dict(steps=cfg.sync_steps, seed=cfg.seed, **({} if source == "mel" else {"audio_source": source}),
                 **({"opening_weight": ow} if ow else {}))
    stamp_file = sync_dir / "protocol_syncnet.json"
    t = time.time()
    if not (stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp):
        syncnet_328.main(sync_cfg)
        stamp_file.write_text(json.dumps(stamp))
        times["syncnet_s" if features else "judge_s"] = round(time.time() - t, 1)
    else:
        print(f"SyncNet: reusing {sync_dir / utils.SYNCNET_BEST} ({cfg.sync_steps} steps, {source})")
    return sync_dir, sync_cfg


def syncnet_stage(cfg, train_ds, ckpt_root, times):
    """The SyncNet of the run's audio source (--audio_source auto resolved by the recording's
    length, syncnet_data.resolve_source) and the train dataset's aud_feat.npy made by it (rewritten
    when another source's run left its own). The mel SyncNet lives in CKPT_ROOT/NAME, where
    evaluate.py finds it as the judge of every run, whatever its source: a speech or both run
    without --judge trains it too (no features); their own SyncNet lives in CKPT_ROOT/SOURCE/NAME.
    -> (the SyncNet's folder, the source)."""
    source = syncnet_data.resolve_source(cfg, train_ds).audio_source
    if source != cfg.audio_source:
        print(f"--audio_source auto: {source} for this {utils.load_meta(train_ds).get('frames', 0) / utils.FPS:.0f} s recording")
    if source != "mel" and not cfg.judge:
        train_syncnet(cfg, "mel", train_ds, ckpt_root, times, features=False)    # the judge of the sync check
    root = ckpt_root if source == "mel" else ckpt_root / source
    sync_dir, sync_cfg = train_syncnet(cfg, source, train_ds, root, times)
    info = train_ds / utils.AUD_FEAT_INFO
    made_by = json.loads(info.read_text()).get("source") if info.is_file() and (train_ds / utils.AUD_FEAT).is_file() else None
    aug = train_ds / utils.AUD_FEAT_AUG     # --voice_aug: the copies' features, by the same encoder
    stale = cfg.voice_aug > 0 and (not aug.is_file() or made_by != str(sync_dir / utils.SYNCNET_BEST)
                                   or str(utils.load_npy(aug)["encoder_id"]) != json.loads(info.read_text()).get("encoder_id"))
    if made_by != str(sync_dir / utils.SYNCNET_BEST) or stale:
        syncnet_328.main(dataclasses.replace(sync_cfg, features_only=True, feature_variants=4 if cfg.voice_aug > 0 else 0))
    return sync_dir, source


def main(cfg):
    utils.check_config(cfg)
    import torch
    import evaluate
    cfg = check_inputs(cfg)
    device = utils.get_device(cfg.device)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out_dir)
    data_root, ckpt_root = out / "dataset", out / "checkpoint"
    times = {}
    t = time.time()
    train_ds, held_ds = prepare(cfg.train_video, data_root), prepare(cfg.heldout_video, data_root)
    voices = voice_inputs(cfg.voices, data_root) if cfg.voices else []   # filmed speakers processed before any training
    times["process_s"] = round(time.time() - t, 1)
    name = train_ds.name

    sync_dir, source = syncnet_stage(cfg, train_ds, ckpt_root, times)

    # the generator
    widths = train_328.parse_widths(cfg.widths)
    batch = cfg.batch_size or (auto_batch(widths, device, cfg.stem, cfg.amp) if device.type == "cuda" else 4)
    label = cfg.label or (f"{cfg.widths.replace(',', '-')}_b{batch}_s{cfg.steps}_{cfg.mask}_lr{cfg.lr:g}" + (f"_mw{cfg.mouth_weight:g}" if cfg.mouth_weight else "") + (f"_ew{cfg.edge_weight:g}" if cfg.edge_weight else "")
                          + (f"_ow{cfg.opening_weight:g}" if cfg.opening_weight else "") + (f"_va{cfg.voice_aug:g}" if cfg.voice_aug else "") + (f"_cs{cfg.context_swap:g}" if cfg.context_swap != train_328.Config.context_swap else "")
                          + (f"_sw{cfg.open_weight:g}" if cfg.open_weight else "")
                          + (f"_alr{cfg.audio_lr_mult:g}" if cfg.audio_lr_mult != 1 else "") + ("" if cfg.amp else "_fp32") + (f"_ema{cfg.ema:g}" if cfg.ema else "")
                          + (f"_wu{cfg.warmup_steps}" if cfg.warmup_steps != train_328.Config.warmup_steps else "")
                          + (f"_mlr{cfg.min_lr_frac:g}" if cfg.min_lr_frac != train_328.Config.min_lr_frac else "")
                          + (f"_base{cfg.base}" if cfg.base != "none" else "") + (f"_{cfg.stem}" if cfg.stem != "conv" else "") + (f"_ref{cfg.reference}" if cfg.reference != "random" else "") + ("_film" if cfg.audio_film else "")
                          + (f"_{source}" if source != "mel" else "")
                          + (f"_win{cfg.window}x{cfg.window_share:g}" if cfg.window else "")
                          + (f"_perc{cfg.perceptual}" if cfg.perceptual != train_328.Config.perceptual else "")
                          + (f"_pw{cfg.perceptual_weight:g}" if cfg.perceptual_weight >= 0 else "")
                          + (f"_sync{cfg.sync_weight:g}from{cfg.sync_start:g}c{cfg.sync_clips}" if cfg.sync_weight else "")
                          + (f"_adv{cfg.adv_weight:g}from{cfg.adv_start:g}" if cfg.adv_weight else ""))
    run = sync_dir / "runs" / utils.check_name(label, "--label")
    workers = train_328.loader_workers(cfg.num_workers, device, gpu=6)
    quarter = -(-cfg.steps // 4)   # held-out checks, previews and saves 4 times, the last at the end (not 2 steps before it as well)
    t = time.time()
    tr = train_328.main(train_328.Config(
        name=name, data_root=str(data_root), out_dir=str(run), widths=cfg.widths, batch_size=batch, max_steps=cfg.steps,
        lr=cfg.lr, warmup_steps=cfg.warmup_steps, min_lr_frac=cfg.min_lr_frac, base=cfg.base, stem=cfg.stem, reference=cfg.reference, audio_film=cfg.audio_film, mask=cfg.mask, mouth_weight=cfg.mouth_weight, edge_weight=cfg.edge_weight, opening_weight=cfg.opening_weight, voice_aug=cfg.voice_aug, context_swap=cfg.context_swap, open_weight=cfg.open_weight, audio_lr_mult=cfg.audio_lr_mult, amp=cfg.amp, ema=cfg.ema, device=cfg.device, threads=cfg.threads,
        sync_weight=cfg.sync_weight, sync_start=cfg.sync_start, sync_ramp=cfg.sync_ramp, sync_clips=cfg.sync_clips, syncnet=str(sync_dir / utils.SYNCNET_BEST),
        window=cfg.window, window_share=cfg.window_share, perceptual=cfg.perceptual, perceptual_weight=cfg.perceptual_weight,
        adv_weight=cfg.adv_weight, adv_start=cfg.adv_start, num_workers=workers, seed=cfg.seed, overwrite=True, val_every=quarter,
        preview_every=quarter, save_every=quarter))
    times["train_s"] = round(time.time() - t, 1)

    # evaluate.py on the held-out video: the model, then the template baseline
    ev = dict(name=name, video=str(held_ds), ckpt_root=str(ckpt_root), device=cfg.device, max_frames=cfg.eval_frames,
              video_out=cfg.video_out, syncnet=cfg.judge or "auto")
    t = time.time()
    res = evaluate.main(evaluate.Config(**ev, checkpoint=str(run / utils.LAST), out_dir=str(run / "eval"),   # a bank-trained model picks from its bank
                                        reference="audio" if cfg.reference == "audio" else evaluate.Config.reference))
    times["eval_s"] = round(time.time() - t, 1)
    base = None
    if cfg.baseline:
        bdir = ckpt_root / name / "eval_baseline_template"
        bfile = bdir / "metrics.json"
        old = json.loads(bfile.read_text()) if bfile.is_file() else {}
        same = lambda a, b: a is not None and b is not None and Path(a).resolve() == Path(b).resolve()
        if old.get("frames") == res["frames"] and same(old.get("syncnet", {}).get("checkpoint"), res["syncnet"]["checkpoint"]):
            base = old
        else:
            base = evaluate.main(evaluate.Config(**ev, baseline="template", out_dir=str(bdir)))

    voices = voice_checks(cfg, ev, run, voices) if voices else None
    summary = dict(label=label, device=utils.hardware(device), load_average=os.getloadavg(), batch_size=batch,
                   widths=widths, train_steps=tr["step"], samples_per_s=round(tr["timing"]["samples_per_s"], 2),
                   ms_per_step=round(tr["timing"]["compute_ms"] + tr["timing"]["data_ms"]), times=times,
                   guidance=res["config"]["guidance"],       # what evaluate.py painted with: the model's fitted guidance
                   guidance_photo=res["config"]["guidance_photo"],   # and its photo-mode pass: the fitted photo guidance
                   metrics=res["metrics"], baseline=base["metrics"] if base else None, voices=voices, config=asdict(cfg))
    with utils.atomic_file(run / "summary.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=1, default=str))
    print(format_summary(summary))
    print(f"summary: {run / 'summary.json'}; strip: {res['outputs'].get('strip')}")
    return summary


def voice_files(spec):
    """--voices -> the audio files (checked before any training)."""
    named = {"shared": lambda: sorted(MEDIA.glob("speech_*.wav")) + [MEDIA / v for v in SPEAKERS],
             "unseen": lambda: [MEDIA / v for v in UNSEEN]}
    files = [f for v in map(str.strip, spec.split(",")) if v for f in (named[v]() if v in named else [Path(v)])]
    missing = [str(f) for f in files if not f.is_file()]
    if missing or not files:
        raise UserError(f"--voices {spec}: {'not found: ' + ', '.join(missing) if missing else 'no audio files'}")
    return files


def voice_inputs(spec, data_root):
    """--voices -> [(file, what evaluate.py --audio gets)]: an audio file as it is, a video of another
    person as the dataset process.py makes of it in DATA_ROOT (once)."""
    import media_io
    return [(f, prepare(f, data_root) if media_io.probe(f)["video"] else f) for f in voice_files(spec)]


def voice_checks(cfg, ev, run, voices):
    """The trained model driven by voices it never heard (voice_inputs), over the held-out frames
    (evaluate.py --audio; no image truth): -> {file name: loudness r of the painted opening, the
    judge's 1 s sync check, sd of the painted opening over the speech frames and, for a filmed
    speaker, r of the painted opening vs their own}. The held-out minute's own audio scores the same
    figures in the main table (env_r_gen, sync_stretch_acc_gen)."""
    import evaluate
    import numpy as np
    out = {}
    for f, audio in voices:
        r = evaluate.main(evaluate.Config(**{**ev, "video_out": False}, audio=str(audio), checkpoint=str(run / utils.LAST),
                                          out_dir=str(run / "voices" / utils.safe_stem(f)),
                                          reference="audio" if cfg.reference == "audio" else evaluate.Config.reference))
        with np.load(r["outputs"]["tracks"]) as z:
            speech = ~z["silent"].astype(bool)
            sd = float(z["gen_opening"][speech].std()) if speech.any() else None
        out[f.name] = dict(env_r_gen=r["metrics"].get("env_r_gen"), sync_stretch_acc_gen=r["metrics"].get("sync_stretch_acc_gen"),
                           opening_sd_gen=sd, speaker_r=r["metrics"].get("speaker_r"),
                           speaker_r_at_lag=r["metrics"].get("speaker_r_at_lag"), speaker_lag=r["metrics"].get("speaker_lag"))
    return out


def format_summary(s):
    lines = [f"{s['label']}: {s['train_steps']} steps, batch {s['batch_size']}, {s['samples_per_s']} samples/s, "
             f"{s['ms_per_step']} ms/step; guidance {s.get('guidance')} (photo {s.get('guidance_photo')}); {s['device']}; load {s['load_average'][0]:.1f}; "
             f"times {s['times']}",
             "| metric | model | template baseline |", "|---|---|---|"]
    for k in ROWS:
        m, b = s["metrics"].get(k), (s["baseline"] or {}).get(k)
        lines.append(f"| {k} | {evaluate_fmt(m)} | {evaluate_fmt(b)} |")
    if s.get("voices"):
        lines += ["", "| voice it never heard | opening vs loudness r | sync check | opening sd | vs the speaker's own opening: r (best lag) |",
                  "|---|---|---|---|---|"]
        lines += [f"| {v} | {evaluate_fmt(f['env_r_gen'])} | {evaluate_fmt(f['sync_stretch_acc_gen'])} | {evaluate_fmt(f['opening_sd_gen'])} | "
                  + (f"{f['speaker_r']:.3f} ({f.get('speaker_r_at_lag', 0):.3f} at {f.get('speaker_lag')})" if f.get("speaker_r") is not None else "")
                  + " |" for v, f in s["voices"].items()]
        rs = [f["speaker_r"] for f in s["voices"].values() if f.get("speaker_r") is not None]
        lines += [f"filmed voices: mean r vs their own opening {sum(rs) / len(rs):.3f} over {len(rs)}"] if rs else []
    return "\n".join(lines)


def evaluate_fmt(v):
    return "" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


if __name__ == "__main__":
    utils.run_main(main, utils.parse_config(Config, description=__doc__.split("\n")[0]))
