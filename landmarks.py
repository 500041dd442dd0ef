"""68-point facial landmarks (iBUG layout) per frame, with one consistently chosen main face.

Two backends give the same output format:
  dlib            HOG face detector + the 68-point shape predictor of face_recognition_models
                  (default; works offline; the model's training data is non-commercial only)
  face_alignment  S3FD detector + 2DFAN4 (face-alignment package), used only when its weights
                  are already in $TORCH_HOME/hub/checkpoints: this module never downloads.

Video tracking runs the (slow) detector every few frames only; in between, the (fast) landmark
fit runs on the last detection's box moved with the previous frame's landmarks.

  python landmarks.py ../shared/media/german_anchor_20s.mp4            # benchmark: frames/s
  python landmarks.py ../shared/media/andrew_clip1_25s.mp4 --detect-every 1
"""
import argparse
import functools
import importlib.metadata
import importlib.util
import os
import time
from pathlib import Path
from urllib.parse import urlparse

import cv2
import numpy as np

BACKENDS = ("dlib", "face_alignment")

# tracking settings: process.py (the avatar's frames) and templates.py (a template video) track
# with these, so a template is tracked exactly like the frames the model was trained on
DETECT_EVERY = 8          # run the face detector every N frames, track in between (0.3 s at 25 fps)
DETECT_MAX_SIDE = 384     # px: detect on a copy downscaled to this longer side (landmarks use full size)
MAX_GAP = 12              # frames: faceless gaps up to this long are interpolated (0.5 s)
SMOOTH_SIGMA = 1.0        # frames: temporal gaussian on the landmarks (removes crop jitter)

# tracking parameters
UPSAMPLE_BELOW = 400      # px: HOG misses faces under ~70 px, so in detection images smaller
                          # than this retry at 2x when nothing is found (4x the cost)
MIN_IOU = 0.3             # a detection is the main face only if it overlaps its last box this much
TRACK_MIN_IOU = 0.5       # tracked box vs previous frame's box: below this the fit is distrusted
TRACK_MAX_SCALE = 1.2     # landmark extent's width/height vs the last detection's: beyond this
                          # (either way) the fit is distrusted; a collapsing fit squashes one axis
TRACK_MIN_NCC = 0.4       # face patch vs the last detection's (normalised correlation): below
                          # this the face is gone or occluded (a cut, a hand); real clips: >= 0.6
PATCH = 24                # px, side of the grey patch compared for TRACK_MIN_NCC
RIGID = slice(27, 48)     # nose and eyes: they move with the head, not with the mouth or brows


class LandmarkError(Exception):
    """A problem the user must fix (missing package or weights, unknown backend)."""


# --- boxes -------------------------------------------------------------------------------------
def _area(box):
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])


def iou(a, b) -> float:
    """Intersection over union of two x0,y0,x1,y1 boxes."""
    inter = _area((max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])))
    union = _area(a) + _area(b) - inter
    return inter / union if union > 0 else 0.0


def _track_box(anchor_box, anchor_lm, lm):
    """The last detection's box moved with the rigid landmarks from anchor_lm to lm [68,2].

    The box keeps the detector's size: a box re-derived from the fitted landmarks' extent
    feeds the fit's own scale errors back into the next fit and drifts (measured: +20% in
    3 frames); detections every few frames update the size instead."""
    shift = lm[RIGID].mean(0) - anchor_lm[RIGID].mean(0)
    return anchor_box + np.tile(shift, 2)


# --- backends ----------------------------------------------------------------------------------
class Detector:
    """Face detector + 68-point landmark fit. A backend defines
      name: str
      prepare(frame_bgr) -> img          the frame in the form its models read, converted once
      boxes(img, max_side) -> [F,4]      face boxes in full-frame pixels, found on a copy scaled
                                         down so its longer side is at most max_side
      fit(img, box [4]) -> [68,2]        float32 landmarks in full-frame pixels
    """

    def detect(self, frame_bgr: np.ndarray, max_side=None) -> list:
        """All faces in a frame: list of (lm68 [68,2], box [4]) float32, largest box first."""
        img = self.prepare(frame_bgr)
        faces = [(self.fit(img, b), b) for b in self.boxes(img, max_side)]
        return sorted(faces, key=lambda f: -_area(f[1]))


def _downscale(img, max_side):
    """Image resized so its longer side is <= max_side, and the factor back to full size."""
    side = max(img.shape[:2])
    if not max_side or side <= max_side:
        return img, 1.0
    s = max_side / side
    small = cv2.resize(img, (round(img.shape[1] * s), round(img.shape[0] * s)),
                       interpolation=cv2.INTER_AREA)
    return small, side / max(small.shape[:2])


@functools.cache
def _dlib_models():
    """(HOG detector, 68-point shape predictor, package version), loaded once per process."""
    try:
        import dlib
    except ImportError as e:
        raise LandmarkError(f"dlib backend needs dlib: pip install dlib-bin ({e})") from None
    # Not `import face_recognition_models`: its __init__ needs pkg_resources (gone from new
    # setuptools), so locate the package's data folder without executing it.
    spec = importlib.util.find_spec("face_recognition_models")
    path = spec and Path(spec.submodule_search_locations[0]) / "models" / \
        "shape_predictor_68_face_landmarks.dat"
    if not path or not path.is_file():
        raise LandmarkError("dlib backend needs its model: pip install face-recognition-models")
    return (dlib.get_frontal_face_detector(), dlib.shape_predictor(str(path)),
            importlib.metadata.version("face_recognition_models"))


class DlibDetector(Detector):
    def __init__(self):
        import dlib
        self._rect = dlib.rectangle
        self._hog, self._predictor, version = _dlib_models()
        self.name = f"dlib-68 (face_recognition_models {version})"

    def prepare(self, frame_bgr):
        # Both dlib models work on intensity; grey is 3x less to convert and read.
        return cv2.cvtColor(frame_bgr, cv2.COLOR_BGR2GRAY)

    def boxes(self, img, max_side=None):
        small, s = _downscale(img, max_side)
        rects = self._hog(small, 0)
        if len(rects) == 0 and max(small.shape) < UPSAMPLE_BELOW:
            rects = self._hog(small, 1)
        out = np.array([[r.left(), r.top(), r.right(), r.bottom()] for r in rects], np.float32)
        return out.reshape(-1, 4) * s

    def fit(self, img, box):
        shape = self._predictor(img, self._rect(*(int(round(float(v))) for v in box)))
        return np.array([[p.x, p.y] for p in shape.parts()], np.float32)  # [68,2]


def fan_weight_files() -> tuple:
    """(checkpoints dir, [file names], [URLs]) of the S3FD and 2DFAN4 weights face_alignment
    looks for; read from the installed package so they follow its version."""
    try:
        import torch
        from face_alignment.api import models_urls as fan_urls
        from face_alignment.detection.sfd.sfd_detector import models_urls as sfd_urls
    except ImportError as e:
        raise LandmarkError(f"face_alignment backend needs: pip install face-alignment ({e})") \
            from None
    urls = [sfd_urls["s3fd"], fan_urls["2DFAN-4"]]
    names = [Path(urlparse(u).path).name for u in urls]
    return Path(torch.hub.get_dir()) / "checkpoints", names, urls


class FanDetector(Detector):
    def __init__(self, device="cpu"):
        ckpt, names, urls = fan_weight_files()
        missing = [n for n in names if not (ckpt / n).is_file()]
        if missing:
            # Checked before FaceAlignment(), which would try to download them (no network here).
            raise LandmarkError(
                f"face_alignment weights missing: put {', '.join(missing)} into {ckpt} "
                f"(from {', '.join(u for u, n in zip(urls, names) if n in missing)}) "
                f"or use the 'dlib' backend")
        import face_alignment
        # compile=False: torch.compile's warm-up takes minutes on a CPU for a once-per-dataset pass.
        self._fa = face_alignment.FaceAlignment(face_alignment.LandmarksType.TWO_D, device=device,
                                                face_detector="sfd", compile=False)
        self.name = f"face_alignment {face_alignment.__version__} (s3fd + 2DFAN4)"

    def prepare(self, frame_bgr):
        return cv2.cvtColor(frame_bgr, cv2.COLOR_BGR2RGB)

    def boxes(self, img, max_side=None):
        small, s = _downscale(img, max_side)
        found = self._fa.face_detector.detect_from_image(small.copy())
        out = np.array([b[:4] for b in found], np.float32).reshape(-1, 4)
        return out * s

    def fit(self, img, box):
        lms = self._fa.get_landmarks_from_image(img, detected_faces=[np.asarray(box, np.float32)])
        return np.asarray(lms[0][:, :2], np.float32)


def make_detector(backend: str = "dlib", device: str = "cpu") -> Detector:
    """A Detector for one of BACKENDS (device is used by face_alignment only)."""
    if backend == "dlib":
        return DlibDetector()
    if backend == "face_alignment":
        return FanDetector(device)
    raise LandmarkError(f"unknown landmark backend {backend!r}; choose one of {BACKENDS}")


# --- video tracking ----------------------------------------------------------------------------
def _pick_main(boxes, last_box):
    """Index of the main face among detections [F,4], or None. The first time (no last box)
    the largest face; afterwards only a face overlapping the main face's last box."""
    if len(boxes) == 0:
        return None
    if last_box is None:
        return int(np.argmax([_area(b) for b in boxes]))
    overlaps = [iou(b, last_box) for b in boxes]
    best = int(np.argmax(overlaps))
    return best if overlaps[best] >= MIN_IOU else None


def _patch(img, box):
    """Zero-mean, unit-norm grey [PATCH,PATCH] view of box [4] in img (zeros if flat/outside)."""
    x0, y0 = (max(0, int(v)) for v in box[:2])
    x1, y1 = int(min(box[2], img.shape[1])), int(min(box[3], img.shape[0]))
    if x1 - x0 < 2 or y1 - y0 < 2:
        return np.zeros((PATCH, PATCH), np.float32)
    p = cv2.resize(img[y0:y1, x0:x1], (PATCH, PATCH), interpolation=cv2.INTER_AREA)
    p = p.mean(2) if p.ndim == 3 else p.astype(np.float32)
    p -= p.mean()
    return p / max(float(np.linalg.norm(p)), 1e-3)


def _plausible_step(box, prev_box, lm, patch, anchor_lm, anchor_patch) -> bool:
    """Whether a tracked fit is a believable move from the previous frame's box [4], and its
    landmarks [68,2] span about as much, and its face patch looks like, at the last detection."""
    scale = np.ptp(lm, 0) / np.maximum(np.ptp(anchor_lm, 0), 1e-6)    # [2] width, height ratio
    return (iou(box, prev_box) >= TRACK_MIN_IOU
            and bool(np.all((scale >= 1 / TRACK_MAX_SCALE) & (scale <= TRACK_MAX_SCALE)))
            and float((patch * anchor_patch).sum()) >= TRACK_MIN_NCC)


def track_video(frames, detector, detect_every: int = DETECT_EVERY, max_side: int = DETECT_MAX_SIDE,
                progress=None) -> dict:
    """Landmarks of one main face through a video.

    frames: iterable of BGR uint8 frames. The detector runs every `detect_every` frames, when the
    face is lost, and when a tracked fit jumps, changes size or stops looking like the face (a
    cut); other frames fit landmarks in a box predicted from the previous frame. progress: optional callable given 1 after each frame
    (e.g. a tqdm bar's update). Returns
      lms [N,68,2] float32 (NaN where not found), boxes [N,4] float32 detector-style boxes,
      found [N] bool, n_faces [N] int (faces the detector saw; -1 where it did not run),
      main_face: dict(first_frame, first_box, detections, forced_redetections, refused).
    """
    lms, boxes, found, n_faces = [], [], [], []
    last_box = None        # [4] main face's most recent box, kept while it is lost
    prev_lm = None         # [68,2] previous frame's landmarks, None when not found there
    anchor_box = anchor_lm = anchor_patch = None   # main face at the latest detection
    since_detect = 0
    info = dict(first_frame=None, first_box=None, detections=0, forced_redetections=0, refused=0)
    for i, frame in enumerate(frames):
        img = detector.prepare(frame)
        lm, box, n = None, None, -1
        if prev_lm is not None and since_detect < detect_every:
            lm = detector.fit(img, _track_box(anchor_box, anchor_lm, prev_lm))
            box = _track_box(anchor_box, anchor_lm, lm)
            if not _plausible_step(box, last_box, lm, _patch(img, box), anchor_lm, anchor_patch):
                lm, box = None, None
                info["forced_redetections"] += 1
        if lm is None:
            detections = detector.boxes(img, max_side)
            n, since_detect = len(detections), 0
            info["detections"] += 1
            k = _pick_main(detections, last_box)
            if k is not None:
                box = detections[k]
                lm = detector.fit(img, box)
                anchor_box, anchor_lm, anchor_patch = box, lm, _patch(img, box)
                if info["first_frame"] is None:
                    info["first_frame"], info["first_box"] = i, box.tolist()
            elif n > 0:
                info["refused"] += 1  # faces seen, none of them the main one: never switch person
        since_detect += 1
        prev_lm, last_box = lm, (box if lm is not None else last_box)
        lms.append(lm if lm is not None else np.full((68, 2), np.nan, np.float32))
        boxes.append(box if box is not None else np.full(4, np.nan, np.float32))
        found.append(lm is not None)
        n_faces.append(n)
        if progress is not None:
            progress(1)
    return dict(lms=np.array(lms, np.float32).reshape(-1, 68, 2),
                boxes=np.array(boxes, np.float32).reshape(-1, 4),
                found=np.array(found, bool), n_faces=np.array(n_faces, int), main_face=info)


# --- temporal post-processing (pure numpy) -----------------------------------------------------
def fill_gaps(lms, found, max_gap: int):
    """Fill runs of missing frames of length <= max_gap: linearly between the found frames
    around an inner gap, with the nearest found frame at the ends of the video. Longer gaps
    stay NaN. lms [N,...], found [N] bool -> (filled lms [N,...] float32, filled [N] bool)."""
    out = np.array(lms, np.float32, copy=True)
    found = np.asarray(found, bool)
    filled = np.zeros(len(found), bool)
    if not found.any():
        return out, filled
    missing = np.flatnonzero(~found)
    # split the missing frames into runs of consecutive indices
    for run in np.split(missing, np.flatnonzero(np.diff(missing) > 1) + 1):
        if len(run) == 0 or len(run) > max_gap:
            continue
        a, b = run[0] - 1, run[-1] + 1          # found neighbours (may be outside the video)
        if a < 0:
            out[run] = out[b]
        elif b >= len(found):
            out[run] = out[a]
        else:
            t = ((run - a) / (b - a)).reshape(-1, *[1] * (out.ndim - 1))
            out[run] = (1 - t) * out[a] + t * out[b]
        filled[run] = True
    return out, filled


def smooth_landmarks(lms, sigma: float):
    """Temporal Gaussian smoothing of each coordinate; lms [N,...], sigma in frames (0: copy).

    A Gaussian-weighted local *linear* fit rather than a plain weighted mean: in the middle of
    the video the two are identical (symmetric weights), but at the ends a plain mean only sees
    one side and pulls a moving face back (the "edge shrink"); the linear fit keeps constant and
    linearly moving tracks exactly, first and last frame included. Frames holding NaN (gaps
    longer than fill_gaps' limit) stay NaN and are left out like frames beyond the ends."""
    x = np.asarray(lms, np.float64)
    n = len(x)
    if sigma <= 0 or n < 2:
        return x.astype(np.float32)
    flat = x.reshape(n, -1)                      # [N, C]
    valid = np.isfinite(flat).all(1)             # [N]
    flat = np.where(valid[:, None], flat, 0.0)
    radius = max(1, int(np.ceil(4 * sigma)))
    s0, s1, s2 = np.zeros((n, 1)), np.zeros((n, 1)), np.zeros((n, 1))
    x0, x1 = np.zeros_like(flat), np.zeros_like(flat)
    t = np.arange(n)
    for d in range(-radius, radius + 1):         # offset of the neighbour frame t + d
        k = np.clip(t + d, 0, n - 1)
        w = (np.exp(-0.5 * (d / sigma) ** 2) * ((t + d >= 0) & (t + d < n) & valid[k]))[:, None]
        s0 += w; s1 += w * d; s2 += w * d * d
        x0 += w * flat[k]; x1 += w * d * flat[k]
    # weighted least squares x(t + d) ~ a + b d; the estimate at d = 0 is a. With (almost) one
    # usable frame the slope is undetermined and a is the weighted mean.
    det = s0 * s2 - s1 * s1
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(det > 1e-12 * s0 * s0, (s2 * x0 - s1 * x1) / det, x0 / s0)
    out[~valid] = np.nan
    return out.reshape(x.shape).astype(np.float32)


def clean_track(lms, found, max_gap=MAX_GAP, sigma=SMOOTH_SIGMA):
    """The one recipe from raw tracked landmarks to crop-ready ones, shared by process.py and
    video templates: interpolate gaps <= max_gap frames; bridge longer ones the same way (so the
    geometry stays defined; at the clip's ends the nearest face is held) but flag them, so callers
    can report them; then smooth in time.
    Returns (smoothed [N,68,2] float32, interpolated [N] bool, long-gap [N] bool)."""
    lms, filled = fill_gaps(lms, found, max_gap)
    held = np.isnan(lms[:, 0, 0])
    if held.any():
        lms, _ = fill_gaps(lms, ~held, len(lms))
    return smooth_landmarks(lms, sigma).astype(np.float32), filled, held


# --- benchmark ---------------------------------------------------------------------------------

def _read_video(path):
    cap = cv2.VideoCapture(str(path))
    while (frame := cap.read()[1]) is not None:
        yield frame


def main():
    p = argparse.ArgumentParser(description="Benchmark landmark tracking on a video.")
    p.add_argument("video")
    p.add_argument("--backend", default="dlib", choices=BACKENDS)
    p.add_argument("--device", default="cpu")
    p.add_argument("--detect-every", type=int, default=DETECT_EVERY, help="frames between detector runs")
    p.add_argument("--max-side", type=int, default=DETECT_MAX_SIDE, help="px, longer side of detection image")
    args = p.parse_args()
    det = make_detector(args.backend, args.device)
    frames = list(_read_video(args.video))       # decoded first so only landmark work is timed
    if not frames:
        raise SystemExit(f"no frames could be read from {args.video}")
    t, cpu = time.perf_counter(), time.process_time()
    r = track_video(frames, det, args.detect_every, args.max_side)
    dt, n, info = time.perf_counter() - t, len(frames), r["main_face"]
    cpu = time.process_time() - cpu              # CPU seconds: robust to other jobs' load
    print(f"{det.name} | {args.video} {frames[0].shape[1]}x{frames[0].shape[0]}, {n} frames | "
          f"detect_every {args.detect_every} | {os.cpu_count()} CPU cores")
    print(f"{n / dt:.1f} frames/s ({1000 * dt / n:.2f} ms/frame; {n / cpu:.1f} per CPU-second), "
          f"found {r['found'].sum()}/{n}, "
          f"detector runs {info['detections']} (forced {info['forced_redetections']}), "
          f"max faces {r['n_faces'].max()}, refused {info['refused']}")


if __name__ == "__main__":
    main()


# ----------------------------------------------------------------------------------------------
# Identity
class FaceDescriber:
    """128-d dlib face descriptors of a face given its 68 landmarks (no detection needed)."""

    def __init__(self):
        import importlib.util
        import dlib
        spec = importlib.util.find_spec("face_recognition_models")
        path = spec and Path(spec.submodule_search_locations[0]) / "models" / "dlib_face_recognition_resnet_model_v1.dat"
        if not path or not path.is_file():
            raise LandmarkError("face descriptors need dlib_face_recognition_resnet_model_v1.dat: pip install face-recognition-models")
        self.dlib, self.net = dlib, dlib.face_recognition_model_v1(str(path))

    def __call__(self, frame_bgr, lm68):
        d = self.dlib
        lm = np.asarray(lm68, np.float64)
        rect = d.rectangle(*(int(round(v)) for v in (*lm.min(0), *lm.max(0))))
        shape = d.full_object_detection(rect, [d.point(int(round(x)), int(round(y))) for x, y in lm])
        rgb = np.ascontiguousarray(frame_bgr[:, :, ::-1])
        return np.array(self.net.compute_face_descriptor(rgb, shape), np.float64)   # (128,)
