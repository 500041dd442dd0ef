"""Templates: where the frames, landmarks and crop boxes of a lip-sync output come from -- the
avatar's own processed frames (played forward then backward), a still photo, or another video.

    python inference_328.py --name anna --audio_path a.wav                          # the avatar's frames
    python inference_328.py --name anna --audio_path a.wav --template portrait.png  # a still photo
    python inference_328.py --name anna --audio_path a.wav --template other.mp4     # another video

Used by inference_328 (rendering), evaluate (the template baseline) and the server's generate jobs.
Frames are decoded as they are needed; a video template is decoded once into a temp folder.
"""
import shutil
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np

import geometry
import landmarks
import media_io
import utils
from utils import FPS, UserError

MIN_TEMPLATE_BOX = 80             # px: a template face whose crop box is smaller would be upscaled > 4x


def mouth_opening(lms):
    """Inner-lip gap (mean of the 3 vertical inner-lip distances) over the mouth width, per frame.
    lms [N, 68, 2] -> [N]; about 0 for a closed mouth, 0.3+ wide open."""
    lms = np.asarray(lms, np.float32)
    gap = np.linalg.norm(lms[:, [61, 62, 63]] - lms[:, [67, 66, 65]], axis=-1).mean(1)
    width = np.linalg.norm(lms[:, 64] - lms[:, 60], axis=-1)
    return gap / np.maximum(width, 1e-6)


def robust_z(x):
    """Each value's distance from the median in robust standard deviations (1.4826 x the median
    absolute deviation; the plain sd, else 1, where that is 0). [N] -> float64 [N]."""
    x = np.asarray(x, np.float64)
    med = np.median(x)
    scale = 1.4826 * np.median(np.abs(x - med)) or (np.std(x) or 1.0)
    return (x - med) / scale


def dataset_landmarks320(ds_dir, n=None):
    """A processed dataset's 68 landmarks per frame in its 320 crop's pixels, float [N, 68, 2]
    (the first n frames); UserError when landmarks.npz holds none."""
    ds = Path(ds_dir)
    z = utils.load_npy(ds / utils.LANDMARKS)
    if "lms" not in z:
        raise UserError(f"{ds}/landmarks.npz holds no landmarks; re-run: python process.py VIDEO --name {ds.name} --overwrite")
    return geometry.to_crop_coords(z["lms"][:n], z["crop_boxes"][:n])


def typical_box(boxes):
    """[N, 4] crop boxes -> [N] bool: side within 10% of the median (not an odd pose or a bad detection)."""
    side = np.asarray(boxes, np.float64)[:, 2] - np.asarray(boxes, np.float64)[:, 0]
    return np.abs(side / np.median(side) - 1) < 0.1


def closed_score(lms, boxes):
    """How suitable each frame is as a closed-mouth reference, lower = better: its mouth opening,
    plus 10 for a crop box more than 10% off the median size (an odd pose or a bad detection).
    [N, 68, 2], [N, 4] -> [N]. Inference's default reference is the argmin; training's
    `--reference closed` draws from the lowest share of it."""
    return mouth_opening(lms) + 10.0 * ~typical_box(boxes)


def open_score(lms, boxes, q=0.9):
    """How suitable each frame is as an open-mouth reference (the inner mouth and teeth in view),
    lower = better: the distance of its opening from the q-quantile of the typical frames' (wide,
    not the widest), plus 10 for an atypical crop box as in closed_score. [N, 68, 2], [N, 4] -> [N]."""
    opening, typical = mouth_opening(lms), typical_box(boxes)
    target = np.quantile(opening[typical] if typical.any() else opening, q)
    return np.abs(opening - target) + 10.0 * ~typical


def pingpong(k, n):
    """Template frame index of output frame k: 0, 1, .., n-1, n-2, .., 1, 0, 1, ..."""
    if n <= 1:
        return 0
    p = k % (2 * n - 2)
    return p if p < n else 2 * n - 2 - p


class FolderTemplate:
    """A folder of frames/NNNNNN.jpg with smoothed landmarks (a processed dataset), played
    forward then backward; frames are decoded as they are needed."""

    def __init__(self, folder, lms, boxes, size, crops=None, what=None):
        self.folder, self.lms, self.boxes, self.size = Path(folder), lms, boxes, size
        self.n, self.what = len(boxes), what or str(folder)
        self._crops = crops                     # optional [N, 328, 328, 3] cache (memmap)

    @classmethod
    def from_dataset(cls, ds):
        ds = Path(ds)
        meta = utils.load_meta(ds)
        if not (ds / utils.LANDMARKS).is_file() or not (ds / utils.FRAMES_DIR).is_dir():
            raise UserError(f"dataset {ds} is incomplete (no landmarks.npz or frames/); run process.py again with --overwrite")
        z = utils.load_npy(ds / utils.LANDMARKS)
        crops = None
        if (ds / utils.CROPS).is_file():
            crops = utils.load_npy(ds / utils.CROPS, mmap=True)
            if len(crops) != len(z["crop_boxes"]):
                crops = None
        return cls(ds / utils.FRAMES_DIR, z["lms"], z["crop_boxes"], (meta["width"], meta["height"]), crops, what=f"dataset {ds}")

    def read(self, j):
        frame = cv2.imread(str(utils.frame_file(self.folder, j)))
        if frame is None:
            raise UserError(f"{self.what}: frame {j} ({utils.frame_file(self.folder, j)}) is missing or unreadable")
        return frame

    def crop(self, j):
        """The 328 face crop of template frame j (from the crop cache when there is one)."""
        if self._crops is not None:
            return np.asarray(self._crops[j])
        return geometry.crop_face(self.read(j), self.boxes[j])

    def first_still(self):
        """Frame 0 alone, held still as a photo is (inference --template PHOTO): evaluate.py's photo-mode pass."""
        return FolderTemplate(self.folder, self.lms[:1], self.boxes[:1], self.size,
                              None if self._crops is None else self._crops[:1], self.what)

    def stream(self, start, count):
        """(template index, BGR frame, crop box) for `count` output frames from `start`."""
        if not 0 <= start < self.n:
            raise UserError(f"--start_frame {start} is outside the template's {self.n} frames (0..{self.n - 1})")
        for k in range(count):
            j = pingpong(start + k, self.n)
            yield j, self.read(j), self.boxes[j]

    def close(self):
        pass


class ImageTemplate(FolderTemplate):
    """A still image: landmarks detected once, the head held still."""

    def __init__(self, path):
        img = cv2.imread(str(path))
        if img is None:
            raise UserError(f"template {path} is not a readable image")
        faces = landmarks.make_detector("dlib").detect(img)
        if not faces:
            raise UserError(f"no face found in template {path}; use a frontal, well-lit photo")
        if len(faces) > 1:
            print(f"note: {len(faces)} faces in template {path}; animating the largest one", file=sys.stderr)
        lm = np.asarray(faces[0][0], np.float32)
        box = geometry.crop_box(lm)
        if box[2] - box[0] < MIN_TEMPLATE_BOX:
            raise UserError(f"the face in template {path} is too small: its crop is {box[2] - box[0]} px wide, at least "
                            f"{MIN_TEMPLATE_BOX} px are needed (a face about {MIN_TEMPLATE_BOX * 5 // 4} px wide); "
                            "use a larger or closer photo")
        self.image = img
        super().__init__(Path(path).parent, lm[None], box[None], (img.shape[1], img.shape[0]),
                         what=f"template {path}")

    def read(self, j):
        return self.image


class VideoTemplate(FolderTemplate):
    """Another video as template: decoded at 25 fps once into a temp folder of JPEGs with
    tracked, gap-filled and smoothed landmarks: the process.py recipe and settings (landmarks.DETECT_EVERY,
    DETECT_MAX_SIDE, MAX_GAP, SMOOTH_SIGMA) without the training cache."""

    def __init__(self, path, max_gap=landmarks.MAX_GAP, smooth_sigma=landmarks.SMOOTH_SIGMA):
        info = media_io.probe(path)
        v = info["video"]
        if v is None or not v["width"]:
            raise UserError(f"template {path} has no video stream")
        tmp = Path(tempfile.mkdtemp(prefix="lipsync-template-"))
        try:
            w, h = v["width"], v["height"]
            if v.get("rotation") in (90, 270):
                w, h = h, w

            def frames():
                for i, f in enumerate(media_io.iter_frames(path, w, h, fps=FPS)):
                    cv2.imwrite(str(utils.frame_file(tmp, i)), f, [cv2.IMWRITE_JPEG_QUALITY, 95])
                    yield f

            tr = landmarks.track_video(frames(), landmarks.make_detector("dlib"), detect_every=landmarks.DETECT_EVERY,
                                       max_side=landmarks.DETECT_MAX_SIDE)
            if len(tr["found"]) == 0 or not tr["found"].any():
                raise UserError(f"no face found in template video {path}")
            lms, _, _ = landmarks.clean_track(tr["lms"], tr["found"], max_gap, smooth_sigma)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        super().__init__(tmp, lms, np.stack([geometry.crop_box(l) for l in lms]), (w, h), what=f"template {path}")

    def close(self):
        shutil.rmtree(self.folder, ignore_errors=True)


IMAGE_EXT = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}


SAME_PERSON = 0.6        # dlib face-descriptor distance below which two faces are the same person (dlib's own rule)


def open_template(name=None, data_root=None, template="", other_person=False):
    """The template source: --template (image or video) when given, else the avatar's dataset.
    A template face that looks like another person than the avatar's is refused (a person-specific
    generator paints its own person's lower face: over another face, a smear), or with
    other_person rendered with a warning."""
    if template:
        p = Path(template)
        if not p.is_file():
            raise UserError(f"template not found: {p}")
        t = ImageTemplate(p) if p.suffix.lower() in IMAGE_EXT else VideoTemplate(p)
        ds = utils.dataset_path(name, data_root) if name else None
        if ds is not None and (ds / utils.LANDMARKS).is_file():
            d = identity_distance(t, FolderTemplate.from_dataset(ds))
            if d is not None and d > SAME_PERSON:
                msg = (f"the face in {p} looks like another person than avatar {name}'s (face descriptor distance "
                       f"{d:.2f} > {SAME_PERSON}): the avatar's model paints only its own person's mouth, so the lower face "
                       f"would be a smear")
                if not other_person:
                    t.close()
                    raise UserError(f"{msg}; animate a photo or video of that person, or render it anyway with "
                                    f"--other_person (the server's other_person)")
                print(f"warning: {msg}", file=sys.stderr)
        return t
    return FolderTemplate.from_dataset(utils.dataset_path(name, data_root))


def identity_distance(a, b, k=3):
    """Distance between the mean dlib face descriptors of k frames of template a and of b (same
    person: < SAME_PERSON); None when the descriptor model is not installed."""
    try:
        describe = landmarks.FaceDescriber()
    except landmarks.LandmarkError:
        return None
    mean = lambda t: np.mean([describe(t.read(j), t.lms[j]) for j in np.linspace(0, t.n - 1, min(k, t.n)).astype(int)], 0)
    return float(np.linalg.norm(mean(a) - mean(b)))
