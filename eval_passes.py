"""evaluate.py's generation passes: the generators it measures (the trained model, or a baseline
that ignores audio), the held-out video prepared as a dataset, and one pass of generated frames
measured against the truth (landmarks, image quality, the side-by-side mp4). The metrics
themselves are pure functions in metrics.py; evaluate.py turns the passes into them.

    python evaluate.py --name tiny --video clip.mp4 --baseline template --max_frames 50   # CPU smoke run, no model
"""
import json
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np

import geometry
import media_io
import templates
import utils
import vad
from compose import References, RenderOptions, compose
from metrics import gradient_energy, psnr, ssim
from utils import FPS, UserError

SIDE_MAX_H = 512         # px: the side-by-side mp4 is scaled down to this height when taller


# ----------------------------------------------------------------------------------------------
# Generators: the trained model, or a baseline that ignores audio
def make_generator(cfg):
    """-> (generator with .frames() and .mask, description, training step, checkpoint path)."""
    if cfg.baseline:
        shift = f", shifted {cfg.copy_shift:g} px" if cfg.baseline == "copy" and cfg.copy_shift else ""
        return Baseline(cfg.baseline, cfg.copy_shift), f"baseline {cfg.baseline}{shift}", None, None
    import inference_328 as inf
    ckpt = inf.resolve_checkpoint(cfg.name, cfg.ckpt_root, cfg.checkpoint)
    model = inf.LipSyncModel(ckpt, cfg.device, cfg.backend)
    import stream
    if cfg.lookahead < stream.LOOKAHEAD:
        return (Live(model, cfg.lookahead), f"model {ckpt} (step {model.step}), live look-ahead {cfg.lookahead}",
                model.step, str(ckpt))
    return model, f"model {ckpt} (step {model.step})", model.step, str(ckpt)


class Live:
    """The model as a live stream makes its frames (stream.LiveSession): the audio arrives one frame
    (40 ms) at a time and each frame is made as soon as it can be, so it sees `lookahead` frames of
    audio ahead. The gate's level shift is the whole recording's, as the file path's, so only the
    look-ahead differs."""

    def __init__(self, model, lookahead):
        self.model, self.lookahead, self.mask, self.step, self.guidance = model, lookahead, model.mask, model.step, model.guidance
        self.guidance_photo = model.guidance_photo

    def frames(self, wav, template, opts=RenderOptions(), stats=None):
        import stream
        n = media_io.num_frames(len(wav))
        sess = stream.LiveSession(self.model, template, opts, self.lookahead,
                                  level_shift=vad.level_shift(vad.frame_loudness_db(wav, n)))
        hop = utils.SR // FPS
        for i in range(0, len(wav), hop):
            sess.push(wav[i:i + hop])
            yield from (f.image for f in iter(sess.next, None))
        sess.finish()
        yield from (f.image for f in iter(sess.next, None))


class Baseline:
    """A stand-in with LipSyncModel.frames()'s signature. template: the reference crop the model
    would be given, pasted back unchanged (the output of a generator that ignores audio); copy: the
    template frame's own crop pasted back (a model that copies the template mouth), moved by `shift`
    px right and down (bilinear) when given: a perfect mouth drawn that far from where the truth's is."""

    def __init__(self, kind, shift=0.0):
        if kind not in ("template", "copy"):
            raise UserError(f"--baseline {kind!r}: choose template or copy (or leave it empty for the model)")
        self.kind, self.step, self.mask, self.shift = kind, None, None, float(shift)   # pastes over MASK_RECT

    def frames(self, wav, template, opts=RenderOptions(), stats=None):
        n = media_io.num_frames(len(wav))
        loud = vad.gate_loudness_db(wav, n, vad.use_vad(opts.vad))    # the same silence gate as the model's
        refs = References(template, opts.reference, opts.seed)
        copy = self.kind == "copy"
        opts = replace(opts, sharpen=0.0)   # real pixels: the unsharp mask is for the network's blur
        if copy:                    # the template's own crop is pasted back as it is
            opts = replace(opts, color_match=False, silence_gate=False)
        for k, (j, frame, box) in enumerate(template.stream(opts.start_frame, n)):
            crop = geometry.crop_face(frame, box)
            gen = np.ascontiguousarray(geometry.inner(crop)) if copy else refs.crop(k, j)
            if copy and self.shift:
                gen = cv2.warpAffine(gen, np.float32([[1, 0, self.shift], [0, 1, self.shift]]), gen.shape[1::-1],
                                     flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
            yield compose((frame, box, crop, gen, refs.closed, loud[k]), opts)   # no mouth region: the gate uses DEFAULT_MOUTH


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
        x0, y0, x1, y1 = geometry.mouth_box(geometry.to_crop_coords(tl[None], box[None])[0])
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


def measure_generated(cfg, gen_model, wav, template, det_boxes, n, self_mode, out_dir, work, outputs, opts, **kw):
    """The frames gen_model makes with RenderOptions `opts`, measured against the truth (run_pass,
    with **kw), the side-by-side mp4 written on the way when --video_out (removed again if the pass fails)."""
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
        stats = {}        # the model's render stats: the band push and closures it used (auto's choice, RenderOptions)
        result = run_pass(gen_model.frames(wav, template, opts, stats), template, det_boxes, n,
                          writer=writer, desc="generate+measure", **kw)
        result["band_push"], result["closures"] = stats.get("band_push"), stats.get("closures")
        if vw is not None:
            vw.close()
            outputs["side_by_side"] = str(out_dir / "side_by_side.mp4")
        return result
    except BaseException:
        if vw is not None:
            vw.abort()
        raise
