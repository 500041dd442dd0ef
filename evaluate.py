"""Measure lip sync offline on a real held-out video of the same person (self-reenactment).

    python evaluate.py --name anna --video heldout.mp4                    # table + result/eval/anna_heldout/
    python evaluate.py --name anna --video heldout.mp4 --audio other.wav  # an unseen voice: no ground truth
    python evaluate.py --name tiny --video clip.mp4 --baseline template --max_frames 50   # CPU smoke run, no model

The held-out video is processed like training data (process.py, into a temp data root); the model
regenerates its frames from their own audio, with the held-out frames as templates and the
reference crop chosen exactly as inference chooses it, and the result is compared with the truth:
image quality (PSNR/SSIM on the 320 crop and the mouth box), mouth landmarks (LMD), mouth opening
over time against the truth (Pearson r, lag), the same with the audio of another moment (the
ablation gap: a model that ignores audio scores ~0), mouth closed in silence, jitter, the paste
seam, identity (dlib face descriptor) and, when trained, our SyncNet's confidence.

`--baseline template` replaces the model by one that ignores audio: the reference crop it would be
given is pasted back unchanged on every frame; its opening r and ablation gap come out ~0 (and it
is "perfect" at silence, which is why no single number is enough). `--baseline copy` pastes the
template crop itself back (here that is the truth): r ~1 but ablation gap ~0 -- the failure of a
model that copies the template mouth, caught only by the gap.

inference_328's silence gate (a loudness rule that closes the mouth in silence) is OFF here by
default: it correlates the mouth with the audio by itself (a 27-step, untrained model scored an
ablation gap of 0.43 with it and 0.04 without), so with it on the sync numbers credit the rule, not
the network. `--silence_gate` measures the product as it ships.

Every metric is a pure numpy function of arrays, in metrics.py.
Conventions: lag > 0 means the generated mouth moves LATER than the truth (or than the audio).
"""
import json
import math
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

import templates
import geometry
import media_io
import utils
from metrics import (CLOSED_SHARE, JITTER_MARGIN, SEAM_PAD, SILENCE_CONTRAST_DB, SILENCE_FLOOR_DB,
                     SILENCE_HOLD, SILENCE_MIN_DB, best_lag, chance_r, closed_threshold, cosine,
                     gradient_energy, jitter_ratio, lmd, load_syncnet, loudness_db, mean_finite,
                     mouth_opening, pearson, psnr, seam_band, silence_score, silent_frames, speech_frames,
                     ssim, sync_confidence, width_ratio)
from utils import FPS, INNER, MOUTH, MOUTH_MARGIN, SR, UserError
from geometry import mouth_box, to_crop_coords


@dataclass
class Config:
    name: str = ""                 # avatar (checkpoint) name
    video: str = ""                # held-out video of the same person (never used in training), or a folder process.py made from one
    audio: str = ""                # optional other audio (unseen voice): the held-out frames become templates, no ground truth
    json: str = ""                 # metrics JSON; default OUT_DIR/metrics.json
    out_dir: str = ""              # where metrics, plot and side-by-side mp4 go; default result/eval/NAME_VIDEO[_AUDIO][_BASELINE]
    checkpoint: str = ""           # generator checkpoint; default CKPT_ROOT/NAME/best.pth, else last.pth
    ckpt_root: str = str(utils.CHECKPOINT_DIR)  # where checkpoints live (SyncNet: CKPT_ROOT/NAME/syncnet_best.pth)
    eval_root: str = ""            # where the held-out video is processed; "" = a temp folder, removed at the end; an existing copy there is reused
    max_frames: int = 0            # [0..] evaluate only the first N frames (0 = all)
    baseline: str = ""             # "" = the model; template = paste the reference back (ignores audio); copy = paste the template back
    device: str = "auto"           # auto (cuda -> mps -> cpu), cpu, cuda, mps
    backend: str = "auto"          # U-Net runtime for inference (auto, ort, compile, eager)
    reference: str = "closed"      # reference crop rule, as in inference_328 (closed or random)
    feather: int = 16              # [0..64] paste feather, px in the 328 crop (as inference)
    color_match: bool = True       # colour-match the generated crop near the seam (as inference)
    silence_gate: bool = False     # inference's silence gate; off so the metrics judge the network (--silence_gate: the product as shipped)
    ablation_shift: float = 0.5    # [>0..1] the "other moment" audio: rolled by this share of the clip
    max_lag: int = 10              # [1..] frames searched each way for the best opening lag
    id_frames: int = 12            # [0..] frames (evenly spaced) on which identity descriptors are computed (~0.15 s each)
    syncnet: str = "auto"          # SyncNet checkpoint for the secondary score; auto = CKPT_ROOT/NAME/syncnet_best.pth if present; off
    plot: bool = True              # write plot.png (opening over time + truth|generated strip) and strip.png (the strip at full size)
    video_out: bool = True         # write side_by_side.mp4 (truth | generated, with the audio)
    seed: int = 0                  # [0..] seed of a random reference choice


# ----------------------------------------------------------------------------------------------
STRIP_FRAMES = 6         # sample frames in the plot's strip, chosen from closed to wide open
SIDE_MAX_H = 512         # px: the side-by-side mp4 is scaled down to this height when taller


# ----------------------------------------------------------------------------------------------
# Generators: the trained model, or a baseline that ignores audio
class Baseline:
    """A stand-in with LipSyncModel.frames()'s signature. template: the reference crop the model
    would be given, pasted back unchanged (the output of a generator that ignores audio); copy: the
    template frame's own crop pasted back (a model that copies the template mouth)."""

    def __init__(self, kind):
        if kind not in ("template", "copy"):
            raise UserError(f"--baseline {kind!r}: choose template or copy (or leave it empty for the model)")
        self.kind, self.step, self.mask = kind, None, None   # pastes over MASK_RECT
        import inference_328 as inf
        self.vad = inf.use_vad("auto")                       # the same silence gate as the model's

    def frames(self, wav, template, start_frame=0, feather=16, color_match=True, reference="closed",
               silence_gate=True, silence_db=-45.0, speech_db=-35.0, seed=0, stats=None):
        import inference_328 as inf
        n = media_io.num_frames(len(wav))
        loud = inf.gate_loudness_db(wav, n, self.vad)
        refs = inf.References(template, reference, seed)
        copy = self.kind == "copy"
        for k, (j, frame, box) in enumerate(template.stream(start_frame, n)):
            crop = geometry.crop_face(frame, box)
            gen = np.ascontiguousarray(geometry.inner(crop)) if copy else refs.crop(k, j)
            yield inf.compose((frame, box, crop, gen, refs.closed, loud[k]), feather,
                              color_match and not copy, silence_gate and not copy, silence_db, speech_db)


# ----------------------------------------------------------------------------------------------
# Measuring one generation pass against the truth (or the templates)
def prepare_heldout(cfg, work):
    """process.py on the held-out video (first max_frames only) -> dataset folder. A folder
    given as --video is taken as an already processed dataset."""
    import process
    if Path(cfg.video).is_dir():
        utils.load_meta(cfg.video)                       # a clear error when it is not a dataset
        return Path(cfg.video)
    root = Path(cfg.eval_root) if cfg.eval_root else work / "data"
    name = utils.safe_stem(cfg.video) + (f"_first{cfg.max_frames}" if cfg.max_frames else "")
    ds = root / name
    src = Path(cfg.video).resolve()
    stamp = {"video": str(src), "bytes": src.stat().st_size, "mtime": src.stat().st_mtime, "max_frames": cfg.max_frames}
    marker = ds / "eval_source.json"
    if marker.is_file() and (ds / utils.CROPS).is_file() and json.loads(marker.read_text()) == stamp:
        print(f"held-out data: reusing {ds}")
        return ds
    video = src
    if cfg.max_frames:
        video = work / f"{name}.mp4"
        media_io.run_ffmpeg(["-i", src, "-t", f"{cfg.max_frames / FPS:.3f}", "-vf", f"fps={FPS}", "-c:v", "libx264",
                          "-crf", "17", "-preset", "veryfast", "-pix_fmt", "yuv420p", "-c:a", "aac", video],
                         what="cutting the held-out video")
    process.main(process.Config(video=str(video), name=name, data_root=str(root), overwrite=True, min_frames=1))
    marker.write_text(json.dumps(stamp))
    return ds


def detector_boxes(ds):
    """Detector-style face boxes [N, 4] of a processed dataset, gaps filled with the nearest box."""
    import landmarks
    z = utils.load_npy(Path(ds) / utils.LANDMARKS)
    boxes = z["boxes"].astype(np.float32)
    ok = np.isfinite(boxes).all(1)
    if not ok.any():
        raise UserError(f"{ds}: no face box in any frame")
    return landmarks.fill_gaps(boxes, ok, len(boxes))[0]


def jitter_box(lms, crop_boxes):
    """One fixed mouth box in the 320 crop for the whole clip (the crops are face-aligned, so the
    mouth stays put): the 5-95 percentile extent of the mouth points, grown by JITTER_MARGIN."""
    m = to_crop_coords(np.asarray(lms)[:, MOUTH], crop_boxes)        # (N, 20, 2)
    lo = np.percentile(m.min(1), 5, axis=0)
    hi = np.percentile(m.max(1), 95, axis=0)
    fake = np.zeros((68, 2))
    fake[MOUTH] = np.concatenate([np.repeat(lo[None], 10, 0), np.repeat(hi[None], 10, 0)])
    return mouth_box(fake, JITTER_MARGIN)


def run_pass(gen_frames, template, det_boxes, n, *, detector, describer=None, truth=None, full=True,
             id_idx=(), strip_idx=(), jbox=None, band=None, writer=None, keep_crops=None, desc="measure"):
    """Consume n generated frames; per frame fit landmarks on the generated (and, first time, the
    true/template) frame inside the truth's detector box and collect what the metrics need.
    `truth`: a previous pass's result whose true-side values are reused. Returns a dict of arrays."""
    from tqdm import tqdm
    r = {k: [] for k in ("gen_lms", "true_lms", "psnr", "ssim", "psnr_m", "ssim_m", "seam_g", "seam_t")}
    r.update(gen_reg=[], true_reg=[], gen_id=[], true_id=[], strip={})
    id_idx, strip_idx = set(id_idx), set(strip_idx)
    for k, gen in enumerate(tqdm(gen_frames, total=n, desc=desc, unit="f", dynamic_ncols=True, leave=False)):
        if k >= n:
            break
        j = templates.pingpong(k, template.n)
        true = template.read(j)
        img = detector.prepare(gen)
        r["gen_lms"].append(detector.fit(img, det_boxes[j]))
        if truth is None:
            r["true_lms"].append(detector.fit(detector.prepare(true), det_boxes[j]))
        if not full:
            continue
        box = template.boxes[j]
        g328, t328 = geometry.crop_face(gen, box), geometry.crop_face(true, box)
        g, t = geometry.inner(g328), geometry.inner(t328)
        r["psnr"].append(psnr(g, t))
        r["ssim"].append(ssim(g, t))
        tl = truth["true_lms"][k] if truth is not None else r["true_lms"][-1]
        x0, y0, x1, y1 = mouth_box(to_crop_coords(tl[None], box[None])[0])
        r["psnr_m"].append(psnr(g[y0:y1, x0:x1], t[y0:y1, x0:x1]))
        r["ssim_m"].append(ssim(g[y0:y1, x0:x1], t[y0:y1, x0:x1]))
        r["seam_g"].append(gradient_energy(g328, band))
        r["seam_t"].append(gradient_energy(t328, band))
        x0, y0, x1, y1 = jbox
        r["gen_reg"].append(g[y0:y1, x0:x1].copy())
        r["true_reg"].append(t[y0:y1, x0:x1].copy())
        if describer is not None and k in id_idx:
            r["gen_id"].append(describer(gen, r["gen_lms"][-1]))
            r["true_id"].append(describer(true, tl))
        if k in strip_idx:
            r["strip"][k] = (t.copy(), g.copy())
        if keep_crops is not None:
            keep_crops[0][k] = g
            keep_crops[1][k] = t
        if writer is not None:
            writer(true, gen)
    for k in ("gen_lms", "true_lms"):
        r[k] = np.array(r[k], np.float64).reshape(-1, 68, 2)
    if truth is not None:
        r["true_lms"] = truth["true_lms"]
    if len(r["gen_lms"]) < n:
        raise UserError(f"the generator produced {len(r['gen_lms'])} frames for {n} video frames of audio")
    return r


def side_by_side_writer(vw, size, left="truth"):
    """A callable writing truth | generated frames, scaled to SIDE_MAX_H and labelled."""
    def write(true, gen):
        pair = []
        for img, label in ((true, left), (gen, "generated")):
            img = geometry.resize(img, size) if img.shape[1::-1] != size else img.copy()
            cv2.putText(img, label, (8, 22), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (255, 255, 255), 2, cv2.LINE_AA)
            pair.append(img)
        vw.write(np.concatenate(pair, 1))
    return write


# ----------------------------------------------------------------------------------------------
# Reports
def write_strip(path, strip):
    """The strip's 320 crops at full size: the truth (or template) on top, the generated below,
    frames from closed to wide open left to right."""
    items = [v for _, v in sorted(strip.items())]
    if not items:
        return
    img = np.concatenate([np.concatenate([v[row] for v in items], 1) for row in (0, 1)], 0)
    with utils.atomic_file(path) as tmp:
        cv2.imwrite(str(tmp), img)


def write_plot(path, t_open, g_open, other_open, db, silent, thresh, strip, labels):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n = len(g_open)
    t = np.arange(n) / FPS
    cols = max(len(strip), 1)
    fig = plt.figure(figsize=(12, 7.5))
    gs = fig.add_gridspec(3, cols, height_ratios=[2.2, 1, 1])
    ax = fig.add_subplot(gs[0, :])
    if silent.any():
        ax.fill_between(t, 0, 1, where=silent, transform=ax.get_xaxis_transform(), color="0.9", label="silent")
    if t_open is not None:
        ax.plot(t, t_open, color="k", lw=1.4, label=labels[0])
    ax.plot(t, g_open, color="tab:red", lw=1.2, label=labels[1])
    if other_open is not None:
        ax.plot(t, other_open, color="tab:blue", lw=0.8, alpha=0.6, label=labels[2])
    ax.axhline(thresh, color="0.5", ls=":", lw=1, label="closed threshold")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("mouth opening (inner gap / width)")
    ax2 = ax.twinx()
    ax2.plot(t, db, color="tab:green", lw=0.7, alpha=0.6, label="audio loudness")
    ax2.set_ylabel("audio loudness (dBFS)", color="tab:green")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="upper left", fontsize=8, ncol=6)
    ax.set_xlim(0, n / FPS)
    for c, (k, (tr, ge)) in enumerate(sorted(strip.items())):
        for row, (img, what) in enumerate(((tr, labels[0]), (ge, labels[1]))):
            a = fig.add_subplot(gs[1 + row, c])
            a.imshow(img[:, :, ::-1])
            a.set_xticks([]); a.set_yticks([])
            if c == 0:
                a.set_ylabel(what, fontsize=8)
            if row == 0:
                a.set_title(f"{k / FPS:.2f} s", fontsize=8)
    fig.tight_layout()
    with utils.atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)


def _fmt(v, nd=3):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return f"{v:.{nd}f}" if isinstance(v, float) else str(v)


ROWS = [  # key, label, ideal / reading
    ("psnr_crop", "PSNR 320 crop (dB)", "higher"),
    ("ssim_crop", "SSIM 320 crop", "1"),
    ("psnr_mouth", "PSNR mouth box (dB)", "higher"),
    ("ssim_mouth", "SSIM mouth box", "1"),
    ("lmd_mouth_px", "LMD mouth (px, 320 crop)", "0"),
    ("opening_r", "opening r vs truth (lag 0)", "1"),
    ("opening_r_chance", "  chance level of r (1 sd, shifted truth)", "small"),
    ("opening_lag", "best lag (frames, + = late)", "0"),
    ("opening_width_ratio", "opening width ratio (sd gen / sd truth)", "1"),
    ("opening_r_other_audio", "opening r, audio of another moment", "~0"),
    ("ablation_gap", "ablation gap r(real) - r(other)", "high"),
    ("speech_frames", "speech frames (louder than silence)", ""),
    ("opening_r_speech", "opening r vs truth, speech frames only", "1"),
    ("ablation_gap_speech", "ablation gap, speech frames only", "high"),
    ("env_r_gen", "opening r vs audio loudness (gen)", "~truth's"),
    ("env_lag_gen", "lag vs audio loudness (gen, frames)", "~truth's"),
    ("env_r_true", "opening r vs audio loudness (truth/template)", ""),
    ("env_lag_true", "lag vs audio loudness (truth/template)", ""),
    ("silent_frames", "silent frames", ""),
    ("silence_gen", "mouth closed in silence (gen)", "~truth's"),
    ("silence_true", "mouth closed in silence (truth/template)", ""),
    ("jitter_ratio", "jitter gen / truth", "1"),
    ("seam_ratio", "seam gradient gen / truth", "1"),
    ("identity_cos", "identity cosine gen vs truth", "1"),
    ("sync_conf_gen", "SyncNet confidence (gen)", "~truth's"),
    ("sync_offset_gen", "SyncNet offset (gen, frames)", "0"),
    ("sync_stretch_acc_gen", "SyncNet 1 s sync check (gen)", "1 (0.5 = chance)"),
    ("sync_stretch_acc_true", "SyncNet 1 s sync check (truth/template)", ""),
    ("sync_conf_true", "SyncNet confidence (truth/template)", ""),
    ("sync_offset_true", "SyncNet offset (truth/template)", ""),
]


def format_table(metrics, title):
    lines = [title, f"{'metric':<46} {'value':>10}  ideal"]
    for key, label, ideal in ROWS:
        if key in metrics:
            lines.append(f"{label:<46} {_fmt(metrics[key]):>10}  {ideal}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
def default_out_dir(cfg):
    parts = [cfg.name or "model", utils.safe_stem(cfg.video)]
    if cfg.audio:
        parts.append(utils.safe_stem(cfg.audio))
    if cfg.baseline:
        parts.append(f"baseline-{cfg.baseline}")
    return utils.REPO / "result" / "eval" / "_".join(parts)


def make_generator(cfg):
    """-> (generator with .frames(), description, step)."""
    if cfg.baseline:
        return Baseline(cfg.baseline), f"baseline {cfg.baseline}", None, None
    import inference_328 as inf
    ckpt = inf.resolve_checkpoint(cfg.name, cfg.ckpt_root, cfg.checkpoint)
    model = inf.LipSyncModel(ckpt, cfg.device, cfg.backend)
    return model, f"model {ckpt} (step {model.step})", model.step, str(ckpt)


def main(cfg):
    utils.check_config(cfg)
    import landmarks
    t_start = time.time()
    if not cfg.video:
        raise UserError("no held-out video given: python evaluate.py --name NAME --video HELDOUT.mp4")
    if not cfg.name and not (cfg.baseline or cfg.checkpoint):
        raise UserError("no avatar given: python evaluate.py --name NAME --video HELDOUT.mp4 (or --checkpoint / --baseline)")
    if cfg.name:
        utils.check_name(cfg.name, "avatar name")
    if not Path(cfg.video).is_dir():
        media_io.probe(cfg.video)
    if cfg.audio:
        media_io.probe(cfg.audio)
    out_dir = Path(cfg.out_dir) if cfg.out_dir else default_out_dir(cfg)
    gen_model, gen_desc, step, ckpt_path = make_generator(cfg)   # fails fast on a missing checkpoint
    timing = {}
    created = not out_dir.exists()      # a refused or failed evaluation leaves no folder it made behind
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="lipsync-eval-"))
    try:
        t = time.time()
        ds = prepare_heldout(cfg, work)
        timing["process_s"] = round(time.time() - t, 1)
        result = _evaluate(cfg, ds, gen_model, gen_desc, out_dir, work, timing, landmarks)
    except BaseException:
        if created:
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    timing["total_s"] = round(time.time() - t_start, 1)
    result.update(step=step, checkpoint=ckpt_path, timing=timing)
    json_path = Path(cfg.json) if cfg.json else out_dir / "metrics.json"
    with utils.atomic_file(json_path) as tmp:
        tmp.write_text(json.dumps(result, indent=1, default=_json_default))
    title = (f"{gen_desc} | {'self-reenactment of' if not cfg.audio else 'unseen audio ' + cfg.audio + ' on'} "
             f"{cfg.video} | {result['frames']} frames")
    print(format_table(result["metrics"], title))
    print(f"metrics: {json_path}")
    for k, v in result["outputs"].items():
        print(f"{k}: {v}")
    return result


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def _clean(v):
    """JSON-safe float: inf stays a string 'inf', nan becomes None."""
    if isinstance(v, float):
        return None if math.isnan(v) else ("inf" if math.isinf(v) else round(v, 4))
    return v


def _audio(cfg, ds, template):
    """The audio to drive the model (the held-out clip's own, or --audio) cut to the frames measured
    -> (wav, n frames, self-reenactment?)."""
    self_mode = not cfg.audio
    wav = media_io.load_audio(cfg.audio) if cfg.audio else media_io.load_audio(ds / utils.AUDIO_WAV)
    n = media_io.num_frames(len(wav))
    if self_mode:
        n = min(n, template.n)
    if cfg.max_frames:
        n = min(n, cfg.max_frames)
    if n < 2 * cfg.max_lag + 3:
        raise UserError(f"only {n} frames to evaluate; give at least {2 * cfg.max_lag + 3} ({(2 * cfg.max_lag + 3) / FPS:.1f} s)")
    return wav[:n * SR // FPS], n, self_mode


def _syncnet_path(cfg):
    """--syncnet: auto = CKPT_ROOT/NAME/syncnet_best.pth if present; off/""; or a file that must exist."""
    if cfg.syncnet == "auto":
        p = Path(cfg.ckpt_root) / cfg.name / utils.SYNCNET_BEST if cfg.name else None
        return p if p is not None and p.is_file() else None
    if cfg.syncnet in ("", "off"):
        return None
    if not Path(cfg.syncnet).is_file():
        raise UserError(f"--syncnet {cfg.syncnet}: file not found (use --syncnet off to skip the SyncNet score)")
    return Path(cfg.syncnet)


def _main_pass(cfg, gen_model, wav, template, det_boxes, n, self_mode, out_dir, work, outputs, **kw):
    """The generated frames measured against the truth, the side-by-side mp4 written on the way
    when --video_out (removed again if the pass fails)."""
    vw, writer = None, None
    if cfg.video_out:
        w, h = template.size
        s = min(1.0, SIDE_MAX_H / h)
        size = (int(round(w * s)) // 2 * 2, int(round(h * s)) // 2 * 2)
        audio_wav = work / "audio.wav"
        media_io.write_wav(audio_wav, wav)
        vw = media_io.VideoWriter(out_dir / "side_by_side.mp4", 2 * size[0], size[1], audio=audio_wav)
        writer = side_by_side_writer(vw, size, "truth" if self_mode else "template")
    try:
        main_pass = run_pass(gen_model.frames(wav, template, **kw.pop("gen_kw")), template, det_boxes, n,
                             writer=writer, desc="generate+measure", **kw)
        if vw is not None:
            vw.close()
            outputs["side_by_side"] = str(out_dir / "side_by_side.mp4")
        return main_pass
    except BaseException:
        if vw is not None:
            vw.abort()
        raise


def _self_metrics(cfg, m, main_pass, template, tmpl_idx, g_open, t_open, db, silence_db, other_pass):
    """Self-reenactment only (the truth is known): image and landmark quality, the opening track
    against the truth, and the ablation (other_pass() = the same frames with another moment's
    audio) -> the other opening track."""
    true320 = to_crop_coords(main_pass["true_lms"], template.boxes[tmpl_idx])
    gen320 = to_crop_coords(main_pass["gen_lms"], template.boxes[tmpl_idx])
    m.update(psnr_crop=mean_finite(main_pass["psnr"]), ssim_crop=float(np.mean(main_pass["ssim"])),
             psnr_mouth=mean_finite(main_pass["psnr_m"]), ssim_mouth=float(np.mean(main_pass["ssim_m"])),
             lmd_mouth_px=lmd(gen320, true320))
    m["opening_r"] = pearson(g_open, t_open)
    m["opening_lag"], m["opening_r_at_lag"] = best_lag(g_open, t_open, cfg.max_lag)
    m["opening_r_chance"] = chance_r(g_open, t_open)
    m["opening_width_ratio"] = width_ratio(g_open, t_open)
    other_open = mouth_opening(other_pass()["gen_lms"])
    m["opening_r_other_audio"] = pearson(other_open, t_open)
    m["ablation_gap"] = m["opening_r"] - m["opening_r_other_audio"]
    sp = speech_frames(db, silence_db)
    m["speech_frames"] = int(sp.sum())
    m["opening_r_speech"] = pearson(g_open[sp], t_open[sp])
    m["ablation_gap_speech"] = m["opening_r_speech"] - pearson(other_open[sp], t_open[sp])
    return other_open


def _sync_metrics(cfg, m, sync_path, keep, wav, timing):
    """Our SyncNet on the kept generated and true 320 crops -> its per-side readings (also into m)."""
    sync = {}
    t = time.time()
    device = utils.get_device(cfg.device)
    net = load_syncnet(sync_path, device)
    mel = media_io.melspectrogram(wav)
    for side, crops in (("gen", keep[0]), ("true", keep[1])):
        s = sync_confidence(net, crops, mel, device)
        if s is not None:
            sync[side] = s
            m[f"sync_conf_{side}"], m[f"sync_offset_{side}"] = s["conf"], s["offset"]
            m[f"sync_p_{side}"], m[f"sync_stretch_acc_{side}"] = s["p_sync"], s["stretch_acc"]
    timing["syncnet_s"] = round(time.time() - t, 1)
    return sync


def _evaluate(cfg, ds, gen_model, gen_desc, out_dir, work, timing, landmarks):
    template = templates.FolderTemplate.from_dataset(ds)
    det_boxes = detector_boxes(ds)
    wav, n, self_mode = _audio(cfg, ds, template)
    detector = landmarks.make_detector("dlib")
    try:
        describer = landmarks.FaceDescriber()
    except landmarks.LandmarkError as e:
        raise UserError(str(e)) from None
    jbox = jitter_box(template.lms, template.boxes)
    tmpl_idx = np.array([templates.pingpong(k, template.n) for k in range(n)])
    opening_prior = mouth_opening(template.lms[tmpl_idx])           # smoothed dataset landmarks, for picking the strip
    strip_idx = sorted({int(i) for i in np.argsort(opening_prior)[np.linspace(0, n - 1, STRIP_FRAMES).astype(int)]})
    id_idx = set(np.linspace(0, n - 1, min(cfg.id_frames, n)).astype(int).tolist())
    gen_kw = dict(start_frame=0, feather=cfg.feather, color_match=cfg.color_match, reference=cfg.reference,
                  silence_gate=cfg.silence_gate, seed=cfg.seed)
    sync_path = _syncnet_path(cfg)
    keep = None
    if sync_path is not None:
        shape = (n, INNER, INNER, 3)
        keep = (np.lib.format.open_memmap(work / "gen320.npy", "w+", np.uint8, shape),
                np.lib.format.open_memmap(work / "true320.npy", "w+", np.uint8, shape))

    outputs = {}
    t = time.time()
    main_pass = _main_pass(cfg, gen_model, wav, template, det_boxes, n, self_mode, out_dir, work, outputs, gen_kw=gen_kw,
                           detector=detector, describer=describer, id_idx=id_idx, strip_idx=strip_idx, jbox=jbox,
                           band=seam_band(cfg.feather, mask=gen_model.mask), keep_crops=keep)
    timing["main_pass_s"] = round(time.time() - t, 1)

    g_open = mouth_opening(main_pass["gen_lms"])
    t_open = mouth_opening(main_pass["true_lms"])
    db = loudness_db(wav, n)
    silent, silence_db = silent_frames(db)
    thresh = closed_threshold(t_open)
    m = {}
    other_open = None
    if self_mode:
        def other_pass():   # the same frames driven by the audio of another moment of the clip
            shift = int(round(cfg.ablation_shift * n)) % n or n // 2
            t = time.time()
            other = run_pass(gen_model.frames(np.roll(wav, shift * SR // FPS), template, **gen_kw), template, det_boxes, n,
                             detector=detector, truth=main_pass, full=False, desc="ablation (other audio)")
            timing["ablation_pass_s"] = round(time.time() - t, 1)
            return other
        other_open = _self_metrics(cfg, m, main_pass, template, tmpl_idx, g_open, t_open, db, silence_db, other_pass)
    m["env_lag_gen"], m["env_r_gen"] = best_lag(g_open, db, cfg.max_lag)
    m["env_lag_true"], m["env_r_true"] = best_lag(t_open, db, cfg.max_lag)
    m["silent_frames"] = int(silent.sum())
    m["silence_gen"] = silence_score(g_open, silent, thresh)
    m["silence_true"] = silence_score(t_open, silent, thresh)
    m["jitter_ratio"] = jitter_ratio(np.stack(main_pass["gen_reg"]), np.stack(main_pass["true_reg"]))
    eg, et = np.sum(main_pass["seam_g"]), np.sum(main_pass["seam_t"])
    m["seam_ratio"] = float(eg / et) if et > 0 else math.nan
    if main_pass["gen_id"]:
        m["identity_cos"] = float(np.mean(cosine(np.stack(main_pass["gen_id"]), np.stack(main_pass["true_id"]))))
    sync = _sync_metrics(cfg, m, sync_path, keep, wav, timing) if keep is not None else {}
    if cfg.plot:
        labels = ("truth", "generated", "generated, other audio") if self_mode else ("template", "generated", "")
        write_plot(out_dir / "plot.png", t_open, g_open, other_open, db, silent, thresh, main_pass["strip"], labels)
        outputs["plot"] = str(out_dir / "plot.png")
        write_strip(out_dir / "strip.png", main_pass["strip"])
        outputs["strip"] = str(out_dir / "strip.png")
    tracks = dict(gen_opening=g_open, true_opening=t_open, loudness_db=db, silent=silent)
    if other_open is not None:
        tracks["other_opening"] = other_open
    np.savez(out_dir / "tracks.npz", **tracks)
    outputs["tracks"] = str(out_dir / "tracks.npz")
    return {
        "mode": "self-reenactment" if self_mode else "unseen-audio",
        "generator": gen_desc, "video": str(cfg.video), "audio": cfg.audio or None, "frames": int(n),
        "metrics": {k: _clean(v) for k, v in m.items()},
        "thresholds": {"silence_db": _clean(silence_db), "closed_opening": round(thresh, 4),
                       "silence_rule": f"loudness <= noise floor (p2, >= {SILENCE_MIN_DB} dBFS) + {SILENCE_FLOOR_DB} dB, "
                                       f">= {SILENCE_CONTRAST_DB} dB below p95, held {SILENCE_HOLD} frames each side",
                       "closed_rule": f"opening < p10 + {CLOSED_SHARE} x (p90 - p10) of the truth/template opening",
                       "mouth_box_margin": MOUTH_MARGIN, "seam_band": f"paste alpha transition +- {SEAM_PAD} px",
                       "jitter_box_320": list(jbox), "max_lag": cfg.max_lag},
        "syncnet": {"checkpoint": str(sync_path) if sync_path else None, **sync},
        "config": asdict(cfg), "outputs": outputs,
    }


if __name__ == "__main__":
    utils.run_main(main, utils.parse_config(Config, description=__doc__.split("\n")[0]))
