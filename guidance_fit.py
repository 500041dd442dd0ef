"""The guidance a generator needs, fitted to it: how far its painted mouth opens against the truth
on its training video's held-out tail, at each guidance from GRID, and the least guidance at which
that width ratio reaches TARGET_WIDTH (never above compose.GUIDANCE). A model trained briefly paints an
averaged, half-open mouth and keeps the full push; one trained for longer opens by itself and gets
less, which costs it less sharpness (RESULTS.md round 14). train_328.py fits it at
the end of a run and stores it in the checkpoint ("guidance"); inference, evaluation and the server
use it unless told otherwise (--guidance G). A photo (a template of one frame) is fitted apart
("guidance_photo", from PHOTO_GRID, up to 1.75): the tail's most closed frame held still and painted
with each tail frame's audio. Its unmoving lower face keeps the mouth nearer shut, so it needs more
push (RESULTS.md round 44).

    python guidance_fit.py --name anna                                  # refit checkpoint/anna/best.pth and last.pth
    python guidance_fit.py --name anna --checkpoint path/to/last.pth    # one file
"""
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import geometry
import media_io
import metrics
import templates
import utils
from compose import GUIDANCE, References
from utils import UserError

GRID = (1.0, 1.05, 1.1, 1.15, 1.2, 1.25)   # guidances measured; the fitted one lies between two of them
PHOTO_GRID = (1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.75)   # the same for a photo (one frame held still): it needs more push
TARGET_WIDTH = 0.9      # sd of the painted opening / sd of the true one to reach (issue #16's 30-minute target)
MIN_FRAMES = 100        # a held-out tail shorter than this (4 s) is too noisy to fit: the default stays
MAX_FRAMES = 200        # tail frames measured, evenly spaced (~20 s of CPU for a narrow model)


def choose(widths, target=TARGET_WIDTH):
    """{guidance: width ratio} -> the least guidance whose width reaches `target`, linearly
    interpolated between neighbouring guidances; the least of them if it already does, the
    largest if none does."""
    gs = sorted(widths)
    if widths[gs[0]] >= target:
        return gs[0]
    for lo, hi in zip(gs, gs[1:]):
        if widths[hi] >= target:
            t = (target - widths[lo]) / max(widths[hi] - widths[lo], 1e-9)
            return round(lo + t * (hi - lo), 2)
    return gs[-1]


def tail_frames(n, held_out, max_frames=MAX_FRAMES):
    """The training run's held-out tail (datasets.split_frames), at most max_frames of it, evenly spaced."""
    from datasets import split_frames
    _, tail = split_frames(n, held_out)
    if len(tail) > max_frames:
        tail = tail[np.linspace(0, len(tail) - 1, max_frames).round().astype(int)]
    return tail


def tail_widths(model, ds, frames, grid=GRID, batch=8, still=None):
    """Width ratio of the painted mouth opening against the true one on dataset frames `frames`,
    for each guidance of `grid`, and r at guidance 1: the model paints each frame (its closed reference, its own
    audio, as inference does) and dlib fits landmarks to the painted and the true crop in the same box.
    `still`: a frame index held still as a photo is, painted with each frame's audio instead (photo mode)."""
    import landmarks
    from eval_passes import detector_boxes
    template = templates.FolderTemplate.from_dataset(ds)
    feats = utils.load_npy(Path(ds) / utils.AUD_FEAT)
    boxes, crop_boxes = detector_boxes(ds).astype(np.float64), template.boxes.astype(np.float64)
    ref = References(template, "closed").fixed
    alpha = geometry.paste_alpha(0, model.mask)[utils.BORDER:utils.BORDER + utils.INNER, utils.BORDER:utils.BORDER + utils.INNER, None]
    det = landmarks.make_detector("dlib")
    true, gen = [], {g: [] for g in grid}

    def opening(crop, box):
        return float(templates.mouth_opening(det.fit(det.prepare(crop), box)[None])[0])

    def box_of(j):      # frame j's detector box in its 328 crop's pixels
        return geometry.to_crop_coords(boxes[j].reshape(1, 2, 2), crop_boxes[j][None])[0].ravel() + utils.BORDER

    passes, run = [], model.runner
    model.runner = lambda img, audio: passes.append(run(img, audio)) or passes[-1]   # keeps both passes' raw outputs
    try:
        for s in range(0, len(frames), batch):
            idx = frames[s:s + batch]
            crops = [template.crop(j) for j in idx]
            bases = crops if still is None else [template.crop(still)] * len(idx)   # what is painted over
            passes.clear()
            model.paint(bases, [ref] * len(idx), np.stack([media_io.feature_window(feats, j) for j in idx]), 2.0)
            out, silent = (np.asarray(p, np.float32).transpose(0, 2, 3, 1) * 255 for p in passes)   # its audio; silence
            for i, j in enumerate(idx):
                true.append(opening(crops[i], box_of(j)))
                inner = geometry.inner(bases[i]).astype(np.float32)
                for g in grid:
                    painted = np.clip(silent[i] + np.float32(g) * (out[i] - silent[i]), 0, 255)
                    c = bases[i].copy()
                    c[utils.BORDER:utils.BORDER + utils.INNER, utils.BORDER:utils.BORDER + utils.INNER] = \
                        (inner + alpha * (painted - inner) + 0.5).astype(np.uint8)
                    gen[g].append(opening(c, box_of(j if still is None else still)))
    finally:
        model.runner = run
    return {g: metrics.width_ratio(gen[g], true) for g in grid}, metrics.pearson(gen[1.0], true)


def _tail(ds, held_out, max_frames=MAX_FRAMES):
    """(tail frames to measure, None) or (None, fit()'s dict saying why none are)."""
    n = len(utils.load_npy(Path(ds) / utils.LANDMARKS)["crop_boxes"])
    frames = tail_frames(n, held_out, max_frames)
    if len(frames) < MIN_FRAMES:
        return None, dict(value=None, frames=len(frames), note=f"held-out tail of {len(frames)} frames, fewer than "
                          f"{MIN_FRAMES}: the default guidance {GUIDANCE:g} applies")
    return frames, None


def fit(model, ds, held_out, max_frames=MAX_FRAMES):
    """dict(value, widths, frames, r, photo, note) for a loaded LipSyncModel trained on dataset `ds` with
    train_328's --held_out share (photo: the same for a photo, dict(value, widths, still, r)); value None
    (the default applies) when the tail is too short or its true mouth never moves."""
    frames, short = _tail(ds, held_out, max_frames)
    if short:
        return short
    widths, r = tail_widths(model, ds, frames)
    if not all(np.isfinite(w) for w in widths.values()):
        return dict(value=None, frames=len(frames), note="the true mouth does not move on the held-out tail: "
                    f"the default guidance {GUIDANCE:g} applies")
    g = choose(widths)
    t = templates.FolderTemplate.from_dataset(ds)
    still = int(frames[np.argmin(templates.closed_score(t.lms[frames], t.boxes[frames]))])    # the tail's most closed frame as the photo
    p_widths, p_r = tail_widths(model, ds, frames, PHOTO_GRID, still=still)
    photo = dict(value=choose(p_widths), widths={str(k): round(w, 4) for k, w in p_widths.items()}, still=still, r=round(p_r, 4))

    def shown(w):
        return ", ".join(f"{k:g}: {v:.3f}" for k, v in w.items())
    return dict(value=g, widths={str(k): round(w, 4) for k, w in widths.items()}, frames=len(frames), r=round(r, 4), photo=photo,
                note=f"guidance {g:g} (opening width ratio on {len(frames)} held-out frames by guidance: {shown(widths)}; target "
                     f"{TARGET_WIDTH:g}); for a photo {photo['value']:g} (frame {still} held still: {shown(p_widths)})")


def fit_checkpoint(path, ds, held_out, device="cpu"):
    """Fit the generator checkpoint file `path` and store the result in it (rewritten atomically;
    its ONNX cache is keyed by the file's mtime, so it is rebuilt); a file that cannot be fitted is
    left as it is. Returns fit()'s dict."""
    import inference_328
    result = _tail(ds, held_out)[1] or fit(inference_328.LipSyncModel(path, device, "eager"), ds, held_out)
    store(path, result)
    return result


def store(path, result):
    """Write fit()'s result into checkpoint file `path` (a result with no value changes nothing)."""
    if result["value"] is not None:
        ckpt = utils.load_checkpoint(path)
        ckpt["guidance"], ckpt["guidance_fit"] = result["value"], result
        ckpt["guidance_photo"] = result.get("photo", {}).get("value")   # None: a photo gets "guidance" (an older fit)
        utils.save_checkpoint(ckpt, path)


def fit_run(out, ds, held_out, device="cpu", log=print):
    """After a training run: fit last.pth and best.pth of run folder `out` (best.pth's result is
    reused when it holds the same step). A fit that cannot run (no landmark model, say) is logged, not
    raised: the training itself succeeded, and the default guidance applies."""
    from landmarks import LandmarkError
    done = {}
    for f in (utils.LAST, utils.BEST):
        path = Path(out) / f
        if not path.is_file():
            continue
        step = utils.load_checkpoint(path, mmap=True).get("step")
        try:
            if step in done:
                store(path, done[step])
            else:
                done[step] = fit_checkpoint(path, ds, held_out, device)
        except (UserError, LandmarkError) as e:
            log(f"{f} (step {step}): guidance not fitted ({e}); the default {GUIDANCE:g} applies "
                f"(python guidance_fit.py refits it)")
            continue
        log(f"{f} (step {step}): {done[step]['note']}")


@dataclass
class Config:
    name: str = ""                  # avatar: reads dataset/NAME, fits checkpoint/NAME/best.pth and last.pth
    data_root: str = str(utils.DATASET_DIR)      # folder holding the datasets
    ckpt_root: str = str(utils.CHECKPOINT_DIR)   # folder holding the checkpoints
    checkpoint: str = ""            # one checkpoint file to fit instead of the avatar's two
    device: str = "cpu"             # cpu, cuda, auto


def main(cfg):
    utils.check_config(cfg)
    if not cfg.name:
        raise UserError("no avatar given: python guidance_fit.py --name NAME [--checkpoint FILE]")
    utils.check_name(cfg.name, "avatar name")
    ds = utils.dataset_path(cfg.name, cfg.data_root)
    if not ds.is_dir():
        raise UserError(f"no dataset {ds}: run python process.py --name {cfg.name} first")
    if cfg.checkpoint:
        held_out = utils.load_checkpoint(cfg.checkpoint, mmap=True).get("config", {}).get("held_out", 0.1)
        print(f"{cfg.checkpoint}: {fit_checkpoint(cfg.checkpoint, ds, held_out, cfg.device)['note']}")
        return
    out = Path(cfg.ckpt_root) / cfg.name
    last = utils.default_generator_checkpoint(out)
    if last is None:
        raise UserError(f"no generator checkpoint in {out}: run python train_328.py --name {cfg.name} first")
    held_out = utils.load_checkpoint(last, mmap=True).get("config", {}).get("held_out", 0.1)
    fit_run(out, ds, held_out, cfg.device)


if __name__ == "__main__":
    utils.run_main(main, utils.parse_config(Config, description=__doc__.split("\n")[0]))
