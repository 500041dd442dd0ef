"""Measure lip sync offline on a real held-out video of the same person (self-reenactment).

    python evaluate.py --name anna --video heldout.mp4                    # table + result/eval/anna_heldout/
    python evaluate.py --name anna --video heldout.mp4 --audio other.wav  # an unseen voice: no ground truth
    python evaluate.py --name anna --video heldout.mp4 --audio dataset/bob  # bob's voice; his own mouth is the truth
    python evaluate.py --name tiny --video clip.mp4 --baseline template --max_frames 50   # CPU smoke run, no model

The held-out video is processed like training data (process.py, into a temp data root); the model
regenerates its frames from their own audio (held-out frames as templates, the reference crop as
inference picks it) against the truth: PSNR/SSIM (320 crop, mouth box), mouth landmarks (LMD), the
opening over time (Pearson r, lag), the same with the audio of another moment whose loudness is
unrelated to the real one (the ablation gap: ~0 for a model that ignores audio), photo mode (the
first frame alone animated by the clip's audio: the opening against the truth's), mouth closed in
silence, jitter, the paste seam, identity (dlib descriptor) and, when trained, our SyncNet's check.
With another person's dataset as --audio, their own mouth opening is the truth of the opening.

`--baseline template` pastes back the reference crop the model would get (it ignores audio): r and
gap ~0, "perfect" at silence, so no single number is enough. `--baseline copy` pastes the template
crop (the truth): r ~1, gap ~0, the failure of a model that copies the template mouth.

inference_328's silence gate (closes the mouth in silence) is OFF here by default: it correlates
the mouth with the audio by itself (an untrained model's gap: 0.43 with it, 0.04 without), so the
numbers would credit the rule. `--silence_gate` measures the product as it ships.

Every metric is a pure numpy function of arrays, in metrics.py; the generation passes they are
computed from (the model or a baseline, measured frame by frame) are in eval_passes.py.
Conventions: lag > 0 means the generated mouth moves LATER than the truth (or than the audio).
"""
import json
import math
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import cv2
import numpy as np

import geometry
import media_io
import templates
import utils
from audio_features import sync_inputs
from compose import RenderOptions
from eval_passes import detector_boxes, make_generator, measure_generated, prepare_heldout, run_pass
from geometry import to_crop_coords
from metrics import (CLOSED_SHARE, JITTER_MARGIN, SEAM_PAD, SILENCE_CONTRAST_DB, SILENCE_FLOOR_DB,
                     SILENCE_HOLD, SILENCE_MIN_DB, best_lag, chance_r, closed_threshold, cosine,
                     jitter_ratio, lmd, load_syncnet, loudness_db, mean_finite, mouth_opening, pearson,
                     region_sharpness, seam_band, sharpness_ratio, silence_score, silent_frames, speech_frames,
                     sync_confidence, truth_sync_warning, uncorrelated_shift, width_ratio)
from utils import FPS, INNER, MOUTH_MARGIN, SR, UserError


# reference, feather, color_match and seed take inference's defaults (compose.RenderOptions); the
# silence gate is off here on purpose (see above)
@dataclass
class Config:
    name: str = ""                                 # avatar (checkpoint) name
    video: str = ""                                # held-out video of the same person (never used in training), or a folder process.py made from one
    audio: str = ""                                # optional other audio (unseen voice): the held-out frames become templates; a folder process.py made from another person's video: its aud.wav drives, that person's own mouth is the opening's truth (speaker_r)
    json: str = ""                                 # metrics JSON; default OUT_DIR/metrics.json
    out_dir: str = ""                              # where metrics, plot and side-by-side mp4 go; default result/eval/NAME_VIDEO[_AUDIO][_BASELINE]
    checkpoint: str = ""                           # generator checkpoint; default CKPT_ROOT/NAME/last.pth, else best.pth
    ckpt_root: str = str(utils.CHECKPOINT_DIR)     # where checkpoints live (SyncNet: CKPT_ROOT/NAME/syncnet_best.pth)
    eval_root: str = ""                            # where the held-out video is processed; "" = a temp folder, removed at the end; an existing copy there is reused
    max_frames: int = 0                            # [0..] evaluate only the first N frames (0 = all)
    baseline: str = ""                             # "" = the model; template = paste the reference back (ignores audio); copy = paste the template back
    copy_shift: float = 0.0                        # [0..16] px: the copy baseline's crop moved this far right and down (a perfect mouth misplaced: LMD's sensitivity, README section 5)
    device: str = "auto"                           # auto (cuda -> mps -> cpu), cpu, cuda, mps
    backend: str = "auto"                          # U-Net runtime for inference (auto, ov, ort, compile, eager)
    reference: str = RenderOptions.reference       # reference crop rule, as in inference_328 (closed, open, random or audio)
    feather: int = RenderOptions.feather           # [0..64] paste feather, px in the 328 crop (as inference)
    color_match: bool = RenderOptions.color_match  # colour-match the generated crop near the seam (as inference)
    silence_gate: bool = False                     # inference's silence gate; off so the metrics judge the network (--silence_gate: the product as shipped)
    ablation_shift: float = 0.0                    # [0..1] the "other moment" audio: rolled by this share of the clip; 0 = the shift in 0.25..0.75 whose loudness is least like the clip's own
    max_lag: int = 10                              # [1..] frames searched each way for the best opening lag
    id_frames: int = 12                            # [0..] frames (evenly spaced) on which identity descriptors are computed (~0.15 s each)
    syncnet: str = "auto"                          # SyncNet checkpoint for the secondary score; auto = CKPT_ROOT/NAME/syncnet_best.pth if present; off
    plot: bool = True                              # write plot.png (opening over time + truth|generated strip) and strip.png (the strip at full size)
    video_out: bool = True                         # write side_by_side.mp4 (truth | generated, with the audio)
    guidance: float = -1.0                         # [-1..4] the painted mouth moved this many times as far from what the frame paints with silence (as inference); -1 = the checkpoint's fitted guidance (1.25 when it holds none)
    guidance_photo: float = -1.0                   # [-1..4] the same for the photo-mode pass; -1 = what inference gives a photo: --guidance when given, else the checkpoint's fitted photo guidance
    band_push: float = RenderOptions.band_push     # [-1..1] each frame's guidance times 1 + W x its 1-5 kHz energy's z-score (as inference; -1 = auto)
    closures: float = RenderOptions.closures       # [-1..1] the guidance times 1 - W where the audio's lips shut for a p, b or m, half for f, v, w, u, 1 + W / 4 for open vowels (as inference; -1 = auto)
    seed: int = RenderOptions.seed                 # [0..] seed of a random reference choice
    sharpen: float = RenderOptions.sharpen         # [0..4] unsharp-mask amount on the painted mouth (as inference)
    lookahead: int = 7                             # [0..7] frames of audio past each frame the model may read: 7 = the file path; less = a live stream's (stream.py), fed 40 ms at a time


STRIP_FRAMES = 6         # sample frames in the plot's strip, chosen from closed to wide open


# ----------------------------------------------------------------------------------------------
# Reports
def write_strip(path, strip):
    """The strip's 320 crops at full size: truth (or template) above, generated below, closed to wide open."""
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
    n = len(g_open); t = np.arange(n) / FPS
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
    ax.set(xlabel="time (s)", ylabel="mouth opening (inner gap / width)", xlim=(0, n / FPS))
    ax2 = ax.twinx()
    ax2.plot(t, db, color="tab:green", lw=0.7, alpha=0.6, label="audio loudness")
    ax2.set_ylabel("audio loudness (dBFS)", color="tab:green")
    (h1, l1), (h2, l2) = ax.get_legend_handles_labels(), ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="upper left", fontsize=8, ncol=6)
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
    return ("inf" if math.isinf(v) else f"{v:.{nd}f}") if isinstance(v, float) else str(v)


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
    ("ablation_shift_frames", "  other audio: rolled by (frames)", ""),
    ("ablation_audio_r", "  its loudness vs the real audio's (r)", "~0"),
    ("opening_r_other_own", "  other-audio opening vs the truth of its audio's moment", "~opening r"),
    ("opening_width_other", "  its width ratio (the audio not the frames' own)", "~1"),
    ("lmd_other_px", "  its LMD against that truth (px, 320 crop)", "0"),
    ("opening_r_photo", "photo mode (frame 0 alone, the clip's audio): r", "~opening r"),
    ("opening_width_photo", "  its width ratio", "~1"),
    ("lmd_photo_px", "  its LMD against the truth (px, 320 crop)", "0"),
    ("speech_frames", "speech frames (louder than silence)", ""),
    ("opening_r_speech", "opening r vs truth, speech frames only", "1"),
    ("ablation_gap_speech", "ablation gap, speech frames only", "high"),
    ("speaker_r", "opening r vs the speaker's own (--audio DATASET)", "1"),
    ("band_push", "band push used (auto: 0.1 for another voice)", "-"),
    ("closures", "closures used (auto: 1 for another voice)", "-"),
    ("speaker_r_at_lag", "  at its best lag", "1"),
    ("speaker_lag", "  that lag (frames, + = late)", "0"),
    ("speaker_r_template", "  the template frames' opening vs the speaker's", "~0"),
    ("env_r_gen", "opening r vs audio loudness (gen)", "~truth's"),
    ("env_lag_gen", "lag vs audio loudness (gen, frames)", "~truth's"),
    ("env_r_true", "opening r vs audio loudness (truth/template)", ""),
    ("env_lag_true", "lag vs audio loudness (truth/template)", ""),
    ("silent_frames", "silent frames", ""),
    ("silence_gen", "mouth closed in silence (gen)", "~truth's"),
    ("silence_true", "mouth closed in silence (truth/template)", ""),
    ("jitter_ratio", "jitter gen / truth", "1"),
    ("sharpness_ratio", "mouth sharpness gen / truth", "1"),
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
    parts = [cfg.name or "model", utils.safe_stem(cfg.video)] + ([utils.safe_stem(cfg.audio)] if cfg.audio else [])
    parts += [f"baseline-{cfg.baseline}"] if cfg.baseline else []
    return utils.REPO / "result" / "eval" / "_".join(parts)


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
    if cfg.copy_shift and cfg.baseline != "copy":
        raise UserError(f"--copy_shift {cfg.copy_shift:g} moves the copy baseline's crop: add --baseline copy, or drop it")
    if not Path(cfg.video).is_dir():
        media_io.probe(cfg.video)
    if cfg.audio and Path(cfg.audio).is_dir():    # another person's processed video: its audio and landmarks
        if not all((Path(cfg.audio) / f).is_file() for f in (utils.AUDIO_WAV, utils.LANDMARKS)):
            raise UserError(f"--audio {cfg.audio}: a folder must be one process.py made (aud.wav, landmarks.npz)")
    elif cfg.audio:
        media_io.probe(cfg.audio)
    out_dir = Path(cfg.out_dir) if cfg.out_dir else default_out_dir(cfg)
    gen_model, gen_desc, step, ckpt_path = make_generator(cfg)   # fails fast on a missing checkpoint
    if cfg.guidance_photo < 0:                                   # what inference gives a photo (guidance_fit.py)
        cfg = replace(cfg, guidance_photo=cfg.guidance if cfg.guidance >= 0 else getattr(gen_model, "guidance_photo", RenderOptions.guidance))
    if cfg.guidance < 0:                                         # what inference gives a file: the model's fitted guidance
        cfg = replace(cfg, guidance=getattr(gen_model, "guidance", RenderOptions.guidance))
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
    print("\n".join(f"{k}: {v}" for k, v in result["outputs"].items()))
    if not cfg.audio and (warn := truth_sync_warning(result["metrics"])):   # a held-out clip whose own audio is off
        print(warn, file=sys.stderr)
    return result


def _json_default(o):
    return o.item() if isinstance(o, (np.floating, np.integer)) else o.tolist() if isinstance(o, np.ndarray) else str(o)


def _clean(v):
    """JSON-safe float: inf stays a string 'inf', nan becomes None."""
    if isinstance(v, float):
        return None if math.isnan(v) else ("inf" if math.isinf(v) else round(v, 4))
    return v


def _audio(cfg, ds, template):
    """The audio to drive the model (the held-out clip's own, or --audio) cut to the frames measured
    -> (wav, n frames, self-reenactment?, the speaker's own opening [n] when --audio is their dataset, else None)."""
    self_mode = not cfg.audio
    speaker = Path(cfg.audio) if cfg.audio and Path(cfg.audio).is_dir() else None     # another person's dataset
    wav = media_io.load_audio(cfg.audio if cfg.audio and not speaker else (speaker or ds) / utils.AUDIO_WAV)
    n = media_io.num_frames(len(wav))
    s_open = mouth_opening(templates.dataset_landmarks320(speaker)) if speaker else None   # the speaker's own opening
    if self_mode or speaker:
        n = min(n, template.n if self_mode else len(s_open))
    if cfg.max_frames:
        n = min(n, cfg.max_frames)
    if n < 2 * cfg.max_lag + 3:
        raise UserError(f"only {n} frames to evaluate; give at least {2 * cfg.max_lag + 3} ({(2 * cfg.max_lag + 3) / FPS:.1f} s)")
    return wav[:n * SR // FPS], n, self_mode, None if s_open is None else s_open[:n]


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


def _self_metrics(cfg, m, main_pass, template, tmpl_idx, g_open, t_open, db, silence_db, other_pass):
    """Self-reenactment only (the truth is known): image and landmark quality, the opening track
    against the truth, and the ablation (other_pass() = the same frames with another moment's
    audio) -> the other opening track."""
    true320 = to_crop_coords(main_pass["true_lms"], template.boxes[tmpl_idx])
    gen320 = to_crop_coords(main_pass["gen_lms"], template.boxes[tmpl_idx])
    m.update(psnr_crop=mean_finite(main_pass["psnr"]), ssim_crop=float(np.mean(main_pass["ssim"])),
             psnr_mouth=mean_finite(main_pass["psnr_m"]), ssim_mouth=float(np.mean(main_pass["ssim_m"])),
             lmd_mouth_px=lmd(gen320, true320))
    main_pass["lms320"] = (gen320, true320)      # kept in tracks.npz: per-frame analyses of the landmarks
    m.update(opening_r=pearson(g_open, t_open), opening_r_chance=chance_r(g_open, t_open), opening_width_ratio=width_ratio(g_open, t_open))
    m["opening_lag"], m["opening_r_at_lag"] = best_lag(g_open, t_open, cfg.max_lag)
    n = len(db)
    shift = (int(round(cfg.ablation_shift * n)) % n or n // 2) if cfg.ablation_shift > 0 else uncorrelated_shift(db)
    m["ablation_shift_frames"], m["ablation_audio_r"] = shift, pearson(np.roll(db, shift), db)
    other_open = mouth_opening(other := other_pass()["gen_lms"])
    m["opening_r_other_audio"] = pearson(other_open, t_open)
    m["opening_r_other_own"] = pearson(other_open, np.roll(t_open, shift))
    m["opening_width_other"] = width_ratio(other_open, np.roll(t_open, shift))   # the product's case: audio not the frames' own
    m["lmd_other_px"] = lmd(to_crop_coords(other, template.boxes[tmpl_idx]), np.roll(true320, shift, axis=0))
    photo = mouth_opening(ph := other_pass(photo=True)["gen_lms"])      # photo mode: the first frame alone, the clip's audio
    m.update(opening_r_photo=pearson(photo, t_open), opening_width_photo=width_ratio(photo, t_open),
             lmd_photo_px=lmd(to_crop_coords(ph, template.boxes[tmpl_idx * 0]), true320))
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
    mel = sync_inputs(wav, net.audio_source)         # what its audio tower reads: the mel or speech embeddings
    for side, crops in (("gen", keep[0]), ("true", keep[1])):
        s = sync_confidence(net, crops, mel, device)
        if s is not None:
            sync[side] = s
            m[f"sync_conf_{side}"], m[f"sync_offset_{side}"] = s["conf"], s["offset"]
            m[f"sync_p_{side}"], m[f"sync_stretch_acc_{side}"] = s["p_sync"], s["stretch_acc"]
    timing["syncnet_s"] = round(time.time() - t, 1)
    return sync


def _thresholds(cfg, silence_db, thresh, jbox):
    """The thresholds and rules behind the metrics, as metrics.json reports them."""
    return {"silence_db": _clean(silence_db), "closed_opening": round(thresh, 4),
            "silence_rule": f"loudness <= noise floor (p2, >= {SILENCE_MIN_DB} dBFS) + {SILENCE_FLOOR_DB} dB, "
                            f">= {SILENCE_CONTRAST_DB} dB below p95, held {SILENCE_HOLD} frames each side",
            "closed_rule": f"opening < p10 + {CLOSED_SHARE} x (p90 - p10) of the truth/template opening",
            "mouth_box_margin": MOUTH_MARGIN, "seam_band": f"paste alpha transition +- {SEAM_PAD} px",
            "jitter_box_320": list(jbox), "max_lag": cfg.max_lag}


def _evaluate(cfg, ds, gen_model, gen_desc, out_dir, work, timing, landmarks):
    template = templates.FolderTemplate.from_dataset(ds)
    det_boxes = detector_boxes(ds)
    wav, n, self_mode, s_open = _audio(cfg, ds, template)
    detector = landmarks.make_detector("dlib")
    try:
        describer = landmarks.FaceDescriber()
    except landmarks.LandmarkError as e:
        raise UserError(str(e)) from None
    jbox = geometry.mouth_box_of_clip(to_crop_coords(template.lms, template.boxes), JITTER_MARGIN)   # one fixed box: the crops are face-aligned
    tmpl_idx = np.array([templates.pingpong(k, template.n) for k in range(n)])
    opening_prior = mouth_opening(template.lms[tmpl_idx])           # smoothed dataset landmarks, for picking the strip
    strip_idx = sorted({int(i) for i in np.argsort(opening_prior)[np.linspace(0, n - 1, STRIP_FRAMES).astype(int)]})
    id_idx = set(np.linspace(0, n - 1, min(cfg.id_frames, n)).astype(int).tolist())
    opts = RenderOptions.from_config(cfg)          # the render options evaluate.py sets; the rest as inference's defaults
    sync_path = _syncnet_path(cfg)
    keep = None if sync_path is None else tuple(   # the generated and true 320 crops the SyncNet reads
        np.lib.format.open_memmap(work / f"{side}320.npy", "w+", np.uint8, (n, INNER, INNER, 3)) for side in ("gen", "true"))

    outputs = {}
    t = time.time()
    main_pass = measure_generated(cfg, gen_model, wav, template, det_boxes, n, self_mode, out_dir, work, outputs,
                                  opts=opts, detector=detector, describer=describer, id_idx=id_idx, strip_idx=strip_idx,
                                  jbox=jbox, band=seam_band(cfg.feather, mask=gen_model.mask), keep_crops=keep)
    timing["main_pass_s"] = round(time.time() - t, 1)

    g_open = mouth_opening(main_pass["gen_lms"])
    t_open = mouth_opening(main_pass["true_lms"])
    db = loudness_db(wav, n)
    silent, silence_db = silent_frames(db)
    thresh = closed_threshold(t_open)
    m, other_open = {"band_push": main_pass["band_push"], "closures": main_pass["closures"]}, None   # what the main pass used (auto: by the voice)
    if self_mode:
        def other_pass(photo=False):   # the frames driven by another moment's audio; photo: frame 0 alone, by their own
            shift, t, tmpl = 0 if photo else m["ablation_shift_frames"], time.time(), template.first_still() if photo else template
            o = replace(opts, guidance=cfg.guidance_photo) if photo else opts
            other = run_pass(gen_model.frames(np.roll(wav, shift * SR // FPS), tmpl, o), tmpl, det_boxes, n, detector=detector,
                             truth=main_pass, full=False, desc="photo mode" if photo else "ablation (other audio)")
            timing["photo_pass_s" if photo else "ablation_pass_s"] = round(time.time() - t, 1)
            return other
        other_open = _self_metrics(cfg, m, main_pass, template, tmpl_idx, g_open, t_open, db, silence_db, other_pass)
    m["env_lag_gen"], m["env_r_gen"] = best_lag(g_open, db, cfg.max_lag)
    m["env_lag_true"], m["env_r_true"] = best_lag(t_open, db, cfg.max_lag)
    if s_open is not None:      # the opening against the speaker's own (r at lag 0, best lag); the template frames' as chance
        m.update(speaker_r=pearson(g_open, s_open), speaker_r_template=pearson(t_open, s_open))
        m["speaker_lag"], m["speaker_r_at_lag"] = best_lag(g_open, s_open, cfg.max_lag)
    m["silent_frames"] = int(silent.sum())
    m["silence_gen"], m["silence_true"] = silence_score(g_open, silent, thresh), silence_score(t_open, silent, thresh)
    m["jitter_ratio"] = jitter_ratio(np.stack(main_pass["gen_reg"]), np.stack(main_pass["true_reg"]))
    sharp = region_sharpness(main_pass["gen_reg"]), region_sharpness(main_pass["true_reg"])
    m["sharpness_ratio"] = sharpness_ratio(*sharp)
    eg, et = np.sum(main_pass["seam_g"]), np.sum(main_pass["seam_t"])
    m["seam_ratio"] = float(eg / et) if et > 0 else math.nan
    if main_pass["gen_id"]:
        m["identity_cos"] = float(np.mean(cosine(np.stack(main_pass["gen_id"]), np.stack(main_pass["true_id"]))))
    sync = _sync_metrics(cfg, m, sync_path, keep, wav, timing) if keep is not None else {}
    if cfg.plot:
        labels = ("truth", "generated", "generated, other audio") if self_mode else ("template", "generated", "the speaker's own")
        write_plot(out_dir / "plot.png", t_open, g_open, other_open if s_open is None else s_open, db, silent, thresh,
                   main_pass["strip"], labels)
        outputs["plot"] = str(out_dir / "plot.png")
        write_strip(out_dir / "strip.png", main_pass["strip"])
        outputs["strip"] = str(out_dir / "strip.png")
    tracks = dict(gen_opening=g_open, true_opening=t_open, loudness_db=db, silent=silent, other_opening=other_open,
                  speaker_opening=s_open, gen_sharpness=sharp[0], true_sharpness=sharp[1])
    tracks = {k: v for k, v in tracks.items() if v is not None}
    if "lms320" in main_pass:                    # (N, 68, 2) each, in the 320 crop's pixels
        tracks["gen_lms320"], tracks["true_lms320"] = main_pass["lms320"]
    np.savez(out_dir / "tracks.npz", **tracks)
    outputs["tracks"] = str(out_dir / "tracks.npz")
    return {
        "mode": "self-reenactment" if self_mode else "unseen-audio",
        "generator": gen_desc, "video": str(cfg.video), "audio": cfg.audio or None, "frames": int(n),
        "metrics": {k: _clean(v) for k, v in m.items()},
        "thresholds": _thresholds(cfg, silence_db, thresh, jbox),
        "syncnet": {"checkpoint": str(sync_path) if sync_path else None, **sync},
        "config": asdict(cfg), "outputs": outputs,
    }


if __name__ == "__main__":
    utils.run_main(main, utils.parse_config(Config, description=__doc__.split("\n")[0]))
