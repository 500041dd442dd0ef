"""Crop, mask and paste geometry (SPEC §3): the face box from landmarks, landmarks in crop
coordinates, the mouth box (of one face, or fixed over a clip), the mouth-and-jaw area the silence
gate closes, the generator's masked area (jaw or rectangle), the feathered paste back into the frame
and the colour match. One home for each rule; training, inference, evaluation and the server import
them from here.

    python -c "import geometry; print(geometry.rect_mask().mean())"
"""
import cv2
import numpy as np

from utils import BORDER, CROP, INNER, JAW_GROW, JAW_OUTLINE, JAW_SHARE, MASK_RECT, MOUTH, MOUTH_MARGIN


# ----------------------------------------------------------------------------------------------
# Crop / mask / paste geometry (SPEC §3). Boxes are (x0, y0, x1, y1) half-open, in frame pixels.
def crop_box(lm68):
    """Square box from 68-point landmarks: contour points 1 and 15 give the sides, nose point 29
    the top; the box is as tall as it is wide, so it reaches past the chin."""
    lm = np.asarray(lm68, np.float64)
    x0, x1 = lm[1, 0], lm[15, 0]
    y0 = lm[29, 1]
    w = max(x1 - x0, 8.0)
    return np.array([round(x0), round(y0), round(x0) + round(w), round(y0) + round(w)], np.int64)


def to_crop_coords(lms, boxes):
    """Landmarks in frame pixels [N, K, 2] + crop boxes [N, 4] -> landmarks in 320-crop pixels."""
    lms, boxes = np.asarray(lms, np.float64), np.asarray(boxes, np.float64)
    scale = CROP / (boxes[:, 2] - boxes[:, 0])                       # (N,) crop px per frame px
    return (lms - boxes[:, None, :2]) * scale[:, None, None] - BORDER


def mouth_box(lm320, margin=MOUTH_MARGIN, size=INNER):
    """Box (x0, y0, x1, y1), half-open ints inside the 320 crop, around the 20 mouth points of
    one face's 68 landmarks in crop coordinates, grown by `margin` x mouth width each side."""
    m = np.asarray(lm320, np.float64)[MOUTH]
    return grow_box(m.min(0), m.max(0), margin, size)


def mouth_extent(lm320, lo=5, hi=95):
    """Where the mouth lies over a clip: 68-point landmarks [N, 68, 2] in crop coordinates ->
    (x, y) of its top-left corner (the lo-th percentile over the frames of each frame's smallest
    mouth x and y) and of its bottom-right (the hi-th of the largest), so a few bad frames do not
    stretch it."""
    m = np.asarray(lm320, np.float64)[:, MOUTH]                        # (N, 20, 2)
    return np.percentile(m.min(1), lo, axis=0), np.percentile(m.max(1), hi, axis=0)


def mouth_box_of_clip(lm320, margin=MOUTH_MARGIN, size=INNER):
    """One fixed mouth box for a clip of face-aligned crops (the mouth stays put in them): its
    mouth_extent over landmarks [N, 68, 2] in crop coordinates, grown as mouth_box grows."""
    return grow_box(*mouth_extent(lm320), margin, size)


def grow_box(lo, hi, margin, size=INNER):
    """The box from corner lo = (x, y) to hi, grown by `margin` x its width each side, as half-open
    ints inside a crop of `size`, at least 8 px each way."""
    lo, hi = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
    pad = margin * (hi[0] - lo[0])
    x0, y0 = np.floor(lo - pad).astype(int)
    x1, y1 = np.ceil(hi + pad).astype(int) + 1
    x0, y0 = max(x0, 0), max(y0, 0)
    x1, y1 = min(max(x1, x0 + 8), size), min(max(y1, y0 + 8), size)   # >= 8 px: SSIM's window fits
    return int(x0), int(y0), int(x1), int(y1)


# Where the mouth and jaw sit in the 320 crop when no landmarks say (the crop rule puts the nose
# near the top; averaged over six real datasets): centre x, top of the upper lip, half width, chin.
DEFAULT_MOUTH = (150.0, 80.0, 80.0, 240.0)
CHIN = 8                 # iBUG-68 point at the bottom of the chin


def mouth_region(lm320):
    """(centre x, top, half width, chin y) of the mouth-and-jaw area in 320-crop pixels over the
    frames of a clip (68-point landmarks [N, 68, 2] in crop coordinates): the mouth_extent's
    centre, top and half width, and the median chin."""
    (x0, top), (x1, _) = mouth_extent(lm320)
    chin = np.median(np.asarray(lm320, np.float64)[:, CHIN, 1])
    return float((x0 + x1) / 2), float(top), float((x1 - x0) / 2), float(chin)


_MOUTH_ALPHA = {}


def mouth_alpha(region=DEFAULT_MOUTH):
    """Soft weight (320, 320, 1) over the lips and the jaw below them (an open mouth drops the
    chin), from a mouth_region: the area the silence gate takes from the closed reference."""
    key = tuple(round(v) for v in region)
    if key not in _MOUTH_ALPHA:
        cx, top, half, chin = key
        a = np.zeros((INNER, INNER), np.float32)
        # the lips with their corners (an ellipse around the mouth), united with the jaw below
        cv2.ellipse(a, (cx, round(top + 0.4 * half)), (round(1.5 * half), round(0.9 * half)), 0, 0, 360, 1.0, -1)
        jaw_top = top + 0.4 * half
        cv2.ellipse(a, (cx, round((jaw_top + chin) / 2)), (round(1.2 * half), max(round((chin - jaw_top) / 2), 1)),
                    0, 0, 360, 1.0, -1)
        _MOUTH_ALPHA[key] = cv2.GaussianBlur(a, (0, 0), max(half * 0.1, 1.0))[..., None]
    return _MOUTH_ALPHA[key]


def resize(img, size):
    """The one resize convention of the project: INTER_AREA when shrinking, INTER_CUBIC when
    enlarging (the reference mixed linear and cubic between training and inference)."""
    h, w = img.shape[:2]
    tw, th = size
    interp = cv2.INTER_AREA if tw * th < w * h else cv2.INTER_CUBIC
    return cv2.resize(img, (tw, th), interpolation=interp)


def _region(frame, box):
    """Pixels of `box`, edge-replicated where the box leaves the frame."""
    h, w = frame.shape[:2]
    x0, y0, x1, y1 = (int(v) for v in box)
    pad = max(0, -x0, -y0, x1 - w, y1 - h)
    if pad:
        frame = cv2.copyMakeBorder(frame, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
    return frame[y0 + pad:y1 + pad, x0 + pad:x1 + pad]


def crop_face(frame, box):
    """Full frame (H, W, 3) + box -> the 328x328 face crop."""
    return resize(_region(frame, box), (CROP, CROP))


def inner(crop):
    """328 crop -> the 320 centre the network sees."""
    return crop[BORDER:BORDER + INNER, BORDER:BORDER + INNER]


def rect_mask():
    """The reference's masked area as a bool (320, 320) map: MASK_RECT, nearly the whole crop."""
    m = np.zeros((INNER, INNER), bool)
    x0, y0, x1, y1 = MASK_RECT
    m[y0:y1, x0:x1] = True
    return m


def jaw_mask(lm320, grow=JAW_GROW, share=JAW_SHARE, max_frames=600, up=None):
    """The area a generator repaints for one avatar, a bool (320, 320) map: the lower face under
    the nose (outline JAW_OUTLINE) in the frames' 320-crop landmarks [N, 68, 2], united over the
    frames (a pixel counts when >= `share` of them cover it, so a few bad landmarks do not widen
    it), grown by `grow` x 320 px (upwards only by `up` x 320 px when given: 0 leaves the nose
    bottom where the landmarks put it) and kept inside MASK_RECT. One fixed map for all frames: a mask
    that followed each frame's chin would tell the network how far the jaw is open."""
    lm = np.asarray(lm320, np.float64)
    if lm.ndim == 2:
        lm = lm[None]
    lm = lm[np.linspace(0, len(lm) - 1, min(len(lm), max_frames)).round().astype(int)]
    acc = np.zeros((INNER, INNER), np.float32)
    one = np.zeros((INNER, INNER), np.uint8)
    for p in lm:
        one[:] = 0
        cv2.fillPoly(one, [np.round(p[JAW_OUTLINE]).astype(np.int32)], 1)
        acc += one
    m = (acc >= max(1.0, share * len(lm))).astype(np.uint8)
    g = max(int(round(grow * INNER)), 1)
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * g + 1, 2 * g + 1))
    if up is not None:     # grow upwards by at most `up` x 320 px (a kernel row below the anchor lifts the mask's top)
        k[g + int(round(up * INNER)) + 1:] = 0
    m = cv2.dilate(m, k)
    return (m > 0) & rect_mask()


def mask_inner(img320, mask=None):
    """Copy of a 320 crop (H, W, C) or batch (..., H, W, C) with the generator's masked area zeroed:
    `mask` a bool (320, 320) map (jaw_mask), None = MASK_RECT."""
    if mask is None:
        out = np.array(img320, copy=True)
        x0, y0, x1, y1 = MASK_RECT
        out[..., y0:y1, x0:x1, :] = 0
        return out
    key = mask_key(mask)
    if key not in _KEEP:     # a multiply by a 0/1 map: ~3x cheaper than boolean indexing (RESULTS.md round 47)
        _KEEP[key] = (~np.asarray(mask, bool))[..., None].astype(np.uint8)
    img = np.asarray(img320)
    return np.multiply(img, _KEEP[key], dtype=img.dtype)


_KEEP = {}      # mask key -> its complement as a (320, 320, 1) uint8 map (mask_inner)
_ALPHA = {}     # (feather, mask key) -> paste_alpha
_SIZED = {}     # (feather, mask key, w, h) -> paste_alpha resized to a box, and 1 minus it
_SUPPORT = {}   # (feather, mask key, grow) -> paste_support


def mask_key(mask):
    """A hashable key of a mask (None = MASK_RECT) for caches."""
    return None if mask is None else hash(np.packbits(np.asarray(mask, bool)).tobytes())


def paste_alpha(feather, mask=None):
    """Soft blend weights on the 328 crop: 1 inside the masked area (`mask`, None = MASK_RECT)
    shrunk by `feather` px, falling smoothly to 0 at its edge (a hard edge leaves visible seams);
    0 outside it, where the crop keeps its original pixels."""
    key = (int(max(feather, 0)), mask_key(mask))
    if key not in _ALPHA:
        m = np.zeros((CROP, CROP), np.uint8)
        m[BORDER:BORDER + INNER, BORDER:BORDER + INNER] = rect_mask() if mask is None else np.asarray(mask, bool)
        f = key[0]
        a = m.astype(np.float32)
        if f:
            k = 2 * f + 1
            a = cv2.erode(m, np.ones((k, k), np.uint8)).astype(np.float32)
            a = cv2.GaussianBlur(a, (k, k), f / 2.0) * m
        _ALPHA[key] = a
    return _ALPHA[key]


def paste_support(feather, mask=None, grow=4):
    """(y0, y1, x0, x1): the 328 crop's box around where paste_alpha is > 0, grown by `grow` px (a
    resize reaches that far), inside which paste_back takes the crop's pixels; none are used outside."""
    key = (int(max(feather, 0)), mask_key(mask), grow)
    if key not in _SUPPORT:
        ys, xs = np.nonzero(paste_alpha(feather, mask) > 0)
        if not len(ys):
            _SUPPORT[key] = (0, 0, 0, 0)
        else:
            _SUPPORT[key] = (max(int(ys.min()) - grow, 0), min(int(ys.max()) + 1 + grow, CROP),
                             max(int(xs.min()) - grow, 0), min(int(xs.max()) + 1 + grow, CROP))
    return _SUPPORT[key]


def _sized_alpha(feather, mask, bw, bh):
    """paste_alpha resized to a (bw, bh) box, and 1 minus it (float32), cached: the box keeps its
    size over many frames."""
    key = (int(max(feather, 0)), mask_key(mask), bw, bh)
    if key not in _SIZED:
        if len(_SIZED) > 64:
            _SIZED.clear()
        a = resize(paste_alpha(feather, mask), (bw, bh)).clip(0, 1)
        _SIZED[key] = (a, 1.0 - a)
    return _SIZED[key]


def paste_back(frame, box, crop328, feather=16, mask=None):
    """Blend a generated 328 crop into the frame in place of `box` (returns a new frame); only
    the generator's masked area (`mask`, None = MASK_RECT) is taken from it, feathered."""
    h, w = frame.shape[:2]
    x0, y0, x1, y1 = (int(v) for v in box)
    bw, bh = x1 - x0, y1 - y0
    # clip the box to the frame; the generated crop is clipped the same way
    cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    out = frame.copy()
    if cx0 >= cx1 or cy0 >= cy1:
        return out
    a, na = _sized_alpha(feather, mask, bw, bh)
    gen = resize(crop328, (bw, bh))
    ys, xs = slice(cy0 - y0, cy1 - y0), slice(cx0 - x0, cx1 - x0)
    # one fused pass: a x generated + (1 - a) x frame, rounded (a is 0 outside the mask: unchanged)
    out[cy0:cy1, cx0:cx1] = cv2.blendLinear(np.ascontiguousarray(gen[ys, xs]), np.ascontiguousarray(out[cy0:cy1, cx0:cx1]),
                                            np.ascontiguousarray(a[ys, xs]), np.ascontiguousarray(na[ys, xs]))
    return out


def match_color(src, ref, mask=None):
    """Shift `src` (uint8 BGR) to the per-channel mean/std of `ref` in Lab, measured where mask>0.5."""
    s = cv2.cvtColor(src, cv2.COLOR_BGR2LAB)
    r = cv2.cvtColor(ref, cv2.COLOR_BGR2LAB)
    m = None if mask is None else (np.asarray(mask) > 0.5).astype(np.uint8)
    # cv2.meanStdDev: the same statistics as numpy's mean/std over s[m], ~5x faster per frame
    sm, ss = cv2.meanStdDev(s, mask=m)
    rm, rs = cv2.meanStdDev(r, mask=m)
    # contrast is matched only within a factor of 1.5: a flat (blurry, early-training) crop has a
    # tiny std, and an unbounded ratio would blow its colours up into saturated blobs
    scale = np.clip((rs.ravel() + 1e-3) / (ss.ravel() + 1e-3), 1 / 1.5, 1.5).astype(np.float32)
    shift = (rm.ravel() - sm.ravel() * scale).astype(np.float32)
    # per channel s x scale + shift, rounded and saturated to uint8, in one pass
    out = cv2.transform(s, np.hstack([np.diag(scale), shift[:, None]]).astype(np.float32))
    return cv2.cvtColor(out, cv2.COLOR_LAB2BGR)
