"""Single-image mode: a still photo as the template. Each user error is one clear UserError."""
import cv2
import numpy as np
import pytest

import synthetic
import templates
from utils import UserError


@pytest.fixture(scope="module")
def face():
    return synthetic.default_face(384)


def test_photo_template_holds_the_head_still(face, tmp_path):
    cv2.imwrite(str(tmp_path / "p.png"), face)
    t = templates.ImageTemplate(tmp_path / "p.png")
    items = list(t.stream(0, 5))
    assert t.n == 1 and len(items) == 5
    assert all(np.array_equal(f, face) for _, f, _ in items)          # the photo itself, unmoved
    assert all(np.array_equal(b, items[0][2]) for _, _, b in items)   # one box for every frame
    x0, y0, x1, y1 = items[0][2]
    assert x1 - x0 >= templates.MIN_TEMPLATE_BOX and 0 <= x0 < x1 <= face.shape[1]


def test_unreadable_image(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    with pytest.raises(UserError, match="not a readable image"):
        templates.open_template(template=str(tmp_path / "bad.png"))


def test_no_face(tmp_path):
    cv2.imwrite(str(tmp_path / "wall.png"), np.full((300, 300, 3), 128, np.uint8))
    with pytest.raises(UserError, match="no face found"):
        templates.open_template(template=str(tmp_path / "wall.png"))


def test_face_too_small_says_the_minimum(face, tmp_path):
    cv2.imwrite(str(tmp_path / "small.png"), cv2.resize(face, (96, 96), interpolation=cv2.INTER_AREA))
    with pytest.raises(UserError, match=f"at least {templates.MIN_TEMPLATE_BOX} px") as e:
        templates.open_template(template=str(tmp_path / "small.png"))
    assert "\n" not in str(e.value)


def test_several_faces_pick_the_largest_and_say_so(face, tmp_path, capsys):
    small = cv2.resize(face, (256, 256), interpolation=cv2.INTER_AREA)
    canvas = np.full((384, 384 + 256, 3), 200, np.uint8)
    canvas[:, :384] = face
    canvas[64:320, 384:] = small
    cv2.imwrite(str(tmp_path / "two.png"), canvas)
    t = templates.open_template(template=str(tmp_path / "two.png"))
    assert "2 faces" in capsys.readouterr().err
    assert t.boxes[0][2] <= 384                                       # the big face, on the left


def test_a_photo_of_another_person_is_refused_unless_asked_for(face, tiny_dataset, tmp_path, capsys):
    """A person-specific model over another person's face paints a smear (RESULTS.md round 55): refused
    with one line saying what to do; --other_person renders it with a warning."""
    from conftest import media
    cv2.imwrite(str(tmp_path / "same.png"), face)                      # the avatar's own face (the synthetic actor)
    t = templates.open_template("tiny", tiny_dataset.parent, str(tmp_path / "same.png"))
    assert t.n == 1 and "another person" not in capsys.readouterr().err
    other = media("portrait.png")                                       # a real, different person
    with pytest.raises(UserError, match="portrait.png looks like another person than avatar tiny's") as e:
        templates.open_template("tiny", tiny_dataset.parent, str(other))
    assert "\n" not in str(e.value) and "--other_person" in str(e.value)
    t = templates.open_template("tiny", tiny_dataset.parent, str(other), other_person=True)
    assert t.n == 1
    err = capsys.readouterr().err
    assert err.startswith("warning: the face in ") and "portrait.png looks like another person than avatar tiny's" in err


def test_a_video_template_is_tracked_like_the_avatars_own_frames(synthetic_clip, tiny_dataset):
    """process.py and a video template track with the same settings (landmarks.DETECT_EVERY,
    DETECT_MAX_SIDE, MAX_GAP, SMOOTH_SIGMA), so the same video gives the same landmarks both ways
    (with track_video's old defaults, 5 / 512 px, they were up to 2.4 px apart)."""
    import inspect

    import landmarks
    import process
    cfg, track = process.Config(), inspect.signature(landmarks.track_video).parameters
    assert (cfg.detect_every, cfg.max_side, cfg.max_gap, cfg.smooth_sigma) == (
        landmarks.DETECT_EVERY, landmarks.DETECT_MAX_SIDE, landmarks.MAX_GAP, landmarks.SMOOTH_SIGMA) == (8, 384, 12, 1.0)
    assert (track["detect_every"].default, track["max_side"].default) == (cfg.detect_every, cfg.max_side)
    t = templates.VideoTemplate(synthetic_clip)
    try:
        np.testing.assert_array_equal(t.lms, np.load(tiny_dataset / "landmarks.npz")["lms"])
    finally:
        t.close()
