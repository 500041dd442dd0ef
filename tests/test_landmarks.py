"""Behaviour of landmarks.py: detection on a real portrait, main-face tracking, gap filling and
temporal smoothing (synthetic tracks with known answers), and the offline face_alignment check."""
import cv2
import numpy as np
import pytest

import landmarks as L
from conftest import media


@pytest.fixture(scope="module")
def portrait():
    return cv2.imread(str(media("portrait.png")))      # (474, 474, 3) BGR, one frontal face


@pytest.fixture(scope="module", params=["portrait", "astronaut"])
def face(request):
    """One frontal face, BGR: the real portrait, or the photo bundled with scikit-image (so
    these tests also run where ../shared/media is absent)."""
    if request.param == "portrait":
        return cv2.imread(str(media("portrait.png")))
    from skimage import data
    return np.ascontiguousarray(data.astronaut()[:, :, ::-1])  # (512, 512, 3), face ~90 px


@pytest.fixture(scope="module")
def detector():
    return L.make_detector("dlib")


def shifted(img, dx, dy):
    """img translated by (dx, dy) pixels, borders repeated."""
    m = np.float32([[1, 0, dx], [0, 1, dy]])
    return cv2.warpAffine(img, m, (img.shape[1], img.shape[0]), borderMode=cv2.BORDER_REPLICATE)


def two_faces(img, small_scale=0.75):
    """The portrait at full size on the left and scaled down on the right, on one canvas."""
    small = cv2.resize(img, None, fx=small_scale, fy=small_scale, interpolation=cv2.INTER_AREA)
    canvas = np.full((img.shape[0], img.shape[1] + small.shape[1], 3), 128, np.uint8)
    canvas[:, :img.shape[1]] = img
    canvas[:small.shape[0], img.shape[1]:] = small
    return canvas


# --- detection on one image -----------------------------------------------------------------

def test_detect_gives_68_plausible_points(face, detector):
    faces = detector.detect(face)
    assert len(faces) == 1
    lm, box = faces[0]
    assert lm.shape == (68, 2) and lm.dtype == np.float32
    assert box.shape == (4,) and box.dtype == np.float32
    h, w = face.shape[:2]
    assert (lm >= 0).all() and (lm[:, 0] < w).all() and (lm[:, 1] < h).all()
    # iBUG layout: the mouth (48-67) lies below the nose (27-35)
    assert lm[48:68, 1].mean() > lm[27:36, 1].mean()
    assert lm[48:68, 1].min() > lm[27:31, 1].max()      # below the whole nose bridge


def test_blank_image_has_no_face(detector):
    assert detector.detect(np.full((300, 400, 3), 127, np.uint8)) == []


def test_two_faces_largest_first(portrait, detector):
    canvas = two_faces(portrait)
    faces = detector.detect(canvas)
    assert len(faces) == 2
    (lm_big, box_big), (lm_small, box_small) = faces
    assert L._area(box_big) > L._area(box_small)
    assert box_big[2] <= portrait.shape[1] < box_small[0]   # the big face is the left one


def test_tiny_face_in_small_frame_is_found(portrait, detector):
    # a ~70 px face box in a 190 px frame: needs the detector's upsampled retry
    tiny = cv2.resize(portrait, None, fx=0.4, fy=0.4, interpolation=cv2.INTER_AREA)
    faces = detector.detect(tiny)
    assert len(faces) == 1
    assert faces[0][0][48:68, 1].mean() > faces[0][0][27:36, 1].mean()


def test_unknown_backend_is_a_landmark_error():
    with pytest.raises(L.LandmarkError):
        L.make_detector("nope")


def test_face_alignment_without_weights_raises_one_line(tmp_path, monkeypatch):
    pytest.importorskip("face_alignment")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))     # an empty hub: no weights there
    with pytest.raises(L.LandmarkError) as e:
        L.make_detector("face_alignment")
    msg = str(e.value)
    assert "\n" not in msg
    assert str(tmp_path / "hub" / "checkpoints") in msg
    _, names, _ = L.fan_weight_files()
    assert all(n in msg for n in names) and any(n.startswith("s3fd") for n in names)
    assert not (tmp_path / "hub" / "checkpoints").exists()  # nothing created, nothing downloaded


def test_face_alignment_backend_plumbing(tmp_path, monkeypatch):
    # The real weights are not available offline: stand-in files and a stub FaceAlignment check
    # the checks pass, colours are RGB, and boxes found on the downscaled copy come back in
    # full-frame pixels.
    fa = pytest.importorskip("face_alignment")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    ckpt, names, _ = L.fan_weight_files()
    ckpt.mkdir(parents=True)
    for name in names:
        (ckpt / name).touch()

    class StubFA:
        def __init__(self, *args, **kwargs):
            self.face_detector = self

        def detect_from_image(self, rgb):
            assert rgb.shape == (256, 512, 3) and (rgb[0, 0] == [0, 0, 255]).all()
            return [np.array([10, 20, 110, 120, 0.99])]

        def get_landmarks_from_image(self, rgb, detected_faces):
            assert rgb.shape == (512, 1024, 3)
            return [np.tile(detected_faces[0][:2], (68, 1))]

    monkeypatch.setattr(fa, "FaceAlignment", StubFA)
    frame = np.zeros((512, 1024, 3), np.uint8)
    frame[..., 0] = 255                                  # blue in BGR
    [(lm, box)] = L.make_detector("face_alignment").detect(frame, max_side=512)
    np.testing.assert_allclose(box, [20, 40, 220, 240])
    np.testing.assert_allclose(lm, np.tile([20, 40], (68, 1)))


# --- tracking a video -------------------------------------------------------------------------

def test_track_follows_a_moving_face(face, detector):
    # 20 frames, the face moves 2 px right and 1 px down per frame
    frames = [shifted(face, 2 * i, i) for i in range(20)]
    calls = []
    r = L.track_video(frames, detector, detect_every=5, progress=calls.append)
    assert r["found"].all() and sum(calls) == 20
    assert r["lms"].shape == (20, 68, 2) and r["boxes"].shape == (20, 4)
    # the detector ran on frames 0, 5, 10, 15 only (it sometimes also sees a false face in the
    # astronaut photo); the rest were tracked
    assert (r["n_faces"][::5] >= 1).all() and (np.delete(r["n_faces"], np.s_[::5]) == -1).all()
    assert r["main_face"]["detections"] == 4 and r["main_face"]["first_frame"] == 0
    motion = (r["lms"] - r["lms"][:1]).mean(axis=1)                      # [20,2]
    expected = np.stack([2 * np.arange(20), np.arange(20)], 1)
    assert np.abs(motion - expected).max() < 2.0


def test_track_keeps_the_main_face_and_never_switches(portrait, detector):
    both = two_faces(portrait)
    only_small = both.copy()
    only_small[:, :portrait.shape[1]] = 128                  # the big (main) face leaves
    frames = [both] * 3 + [only_small] * 3 + [both] * 3
    r = L.track_video(frames, detector, detect_every=5, max_side=None)
    assert r["found"].tolist() == [True] * 3 + [False] * 3 + [True] * 3
    assert np.isnan(r["lms"][3:6]).all() and np.isnan(r["boxes"][3:6]).all()
    assert (r["boxes"][[0, 8], 2] <= portrait.shape[1]).all()  # the left face, before and after
    assert (r["n_faces"][3:6] == 1).all() and r["main_face"]["refused"] == 3


def test_track_empty_video(detector):
    blank = np.zeros((64, 64, 3), np.uint8)
    r = L.track_video([blank] * 3, detector)
    assert not r["found"].any() and r["lms"].shape == (3, 68, 2) and (r["n_faces"] == 0).all()
    assert r["main_face"]["first_frame"] is None


# --- gap filling (synthetic tracks) -----------------------------------------------------------

def linear_track(n=30):
    """[n,68,2] landmarks moving linearly: frame t = base + t * velocity."""
    rng = np.random.default_rng(0)
    base, vel = rng.uniform(50, 200, (68, 2)), rng.uniform(-2, 2, (68, 2))
    return (base + np.arange(n)[:, None, None] * vel).astype(np.float32)


def test_short_gap_is_filled_exactly_by_linear_interpolation():
    truth = linear_track()
    found = np.ones(30, bool)
    found[10:14] = False
    lms = truth.copy()
    lms[~found] = np.nan
    out, filled = L.fill_gaps(lms, found, max_gap=4)
    np.testing.assert_allclose(out, truth, atol=1e-4)
    assert filled.tolist() == (~found).tolist()


def test_long_gap_stays_nan_and_edges_take_the_nearest_frame():
    truth = linear_track()
    found = np.ones(30, bool)
    found[:2] = False          # edge gap of 2: filled with frame 2
    found[10:16] = False       # inner gap of 6 > max_gap: stays missing
    found[-1] = False          # edge gap of 1: filled with frame 28
    lms = truth.copy()
    lms[~found] = np.nan
    out, filled = L.fill_gaps(lms, found, max_gap=3)
    assert np.isnan(out[10:16]).all() and not filled[10:16].any()
    np.testing.assert_array_equal(out[:2], truth[[2, 2]])
    np.testing.assert_array_equal(out[-1], truth[28])
    assert filled.sum() == 3
    np.testing.assert_array_equal(out[found], truth[found])     # found frames untouched


def test_nothing_found_leaves_all_nan():
    out, filled = L.fill_gaps(np.full((5, 68, 2), np.nan), np.zeros(5, bool), max_gap=10)
    assert np.isnan(out).all() and not filled.any()


# --- smoothing (synthetic tracks) -------------------------------------------------------------

def test_smoothing_keeps_constant_and_linear_tracks_exactly():
    const = np.broadcast_to(linear_track()[:1], (30, 68, 2))
    np.testing.assert_allclose(L.smooth_landmarks(const, 2.0), const, atol=1e-3)
    # a steadily moving face is not pulled back at the first or last frame (no edge shrink)
    ramp = linear_track()
    np.testing.assert_allclose(L.smooth_landmarks(ramp, 3.0), ramp, atol=1e-3)


def test_smoothing_reduces_noise():
    rng = np.random.default_rng(1)
    truth = linear_track(200)
    noisy = truth + rng.normal(0, 1.0, truth.shape).astype(np.float32)
    out = L.smooth_landmarks(noisy, 2.0)
    assert out.shape == noisy.shape and out.dtype == np.float32
    err_before, err_after = (noisy - truth).std(), (out - truth).std()
    assert err_after < 0.5 * err_before
    # the ends are smoothed too, not just copied
    ends = [0, -1]
    assert np.abs(out[ends] - truth[ends]).mean() < np.abs(noisy[ends] - truth[ends]).mean()


def test_smoothing_leaves_nan_gaps_out():
    x = linear_track(40)
    x[15:25] = np.nan                                    # a gap fill_gaps left open
    out = L.smooth_landmarks(x, 2.0)
    assert np.isnan(out[15:25]).all() and np.isfinite(np.delete(out, np.s_[15:25], 0)).all()
    np.testing.assert_allclose(out[:15], x[:15], atol=1e-3)   # still linear on each side
    np.testing.assert_allclose(out[25:], x[25:], atol=1e-3)


def test_sigma_zero_is_a_copy():
    x = linear_track(5)
    out = L.smooth_landmarks(x, 0)
    np.testing.assert_array_equal(out, x)
    assert out is not x


def test_clean_track_interpolates_short_gaps_and_holds_long_ones():
    n = 40
    lms = np.tile(np.arange(n, dtype=np.float32)[:, None, None], (1, 68, 2))   # x = y = frame index
    found = np.ones(n, bool)
    found[5:8] = False                      # 3 frames: interpolated
    found[20:36] = False                    # 16 frames: bridged, flagged
    lms[~found] = np.nan
    smooth, filled, held = L.clean_track(lms, found, max_gap=12, sigma=0)
    assert not np.isnan(smooth).any() and smooth.dtype == np.float32
    assert filled[5:8].all() and not filled[:5].any() and np.allclose(smooth[5:8, 0, 0], [5, 6, 7])
    assert held[20:36].all() and held.sum() == 16
    assert np.allclose(smooth[20:36, 0, 0], np.arange(20, 36))          # a straight line across it


def test_synthetic_actor_moves_only_inside_its_jaw_outline(detector):
    """The demo's actor opens its jaw by warping the photo: the picture may change only inside the
    jaw outline (and just under the chin), the area the generator repaints; elsewhere an open jaw
    would show the model how far it is open without the audio (RESULTS.md demo runs 20-22)."""
    import synthetic
    import utils
    face = synthetic.default_face()
    lm = detector.detect(face)[0][0]
    closed, wide = (synthetic.render_frame(face, lm, o).astype(np.int16) for o in (0.0, 1.0))
    changed = np.abs(wide - closed).max(-1) > 2
    mw = np.ptp(lm[48:68, 0])
    allowed = np.zeros(face.shape[:2], np.uint8)
    cv2.fillPoly(allowed, [np.round(lm[utils.JAW_OUTLINE]).astype(np.int32)], 1)
    k = np.zeros((2 * int(0.1 * mw) + 1, 1), np.uint8)
    k[:int(0.1 * mw) + 1] = 1
    allowed = cv2.dilate(allowed, k).astype(bool)
    assert changed.sum() > 0.1 * allowed.sum()              # the jaw does open
    assert not (changed & ~allowed).any(), f"{(changed & ~allowed).sum()} pixels changed outside the jaw"
