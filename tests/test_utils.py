"""Shared geometry, audio features, config CLI and file safety: the pieces every script uses."""
import dataclasses
from pathlib import Path

import cv2
import numpy as np
import pytest

import geometry
import media_io
import utils
from utils import CROP, INNER, MASK_RECT, UserError


def face_landmarks(x0=100, y0=80, w=120):
    """A plausible 68-point layout: contour 1 at x0, contour 15 at x0+w, nose 29 at y0."""
    lm = np.zeros((68, 2), np.float32)
    lm[:, 0] = x0 + w / 2
    lm[:, 1] = y0 + 20
    lm[1] = (x0, y0 - 5)
    lm[15] = (x0 + w, y0 - 5)
    lm[29] = (x0 + w / 2, y0)
    return lm


def test_crop_box_rule_is_square_from_contour_and_nose():
    box = geometry.crop_box(face_landmarks(100, 80, 120))
    assert box.tolist() == [100, 80, 220, 200]


def test_crop_then_paste_back_round_trips(rng):
    frame = rng.integers(0, 255, (300, 400, 3), dtype=np.uint8)
    frame = np.ascontiguousarray(np.repeat(np.repeat(frame[::10, ::10], 10, 0), 10, 1))  # smooth-ish blocks
    box = geometry.crop_box(face_landmarks(100, 80, 164))          # 164 px box, resized to 328 (x2)
    crop = geometry.crop_face(frame, box)
    assert crop.shape == (CROP, CROP, 3)
    out = geometry.paste_back(frame, box, crop, feather=16)
    outside = np.ones(frame.shape[:2], bool)
    outside[box[1]:box[3], box[0]:box[2]] = False
    assert np.array_equal(out[outside], frame[outside])        # nothing outside the box changes
    inside = out[box[1]:box[3], box[0]:box[2]].astype(int) - frame[box[1]:box[3], box[0]:box[2]]
    assert np.abs(inside).mean() < 6                            # crop -> paste is near identity


def test_crop_outside_frame_is_edge_padded_and_paste_clips():
    frame = np.full((100, 100, 3), 77, np.uint8)
    box = np.array([-20, 50, 60, 130])
    crop = geometry.crop_face(frame, box)
    assert crop.shape == (CROP, CROP, 3) and (crop == 77).all()
    gen = np.zeros((CROP, CROP, 3), np.uint8)
    out = geometry.paste_back(frame, box, gen, feather=0)
    assert out.shape == frame.shape and out[:50].min() == 77    # rows above the box untouched
    assert out[90, 20].max() == 0                              # inside the masked rectangle: generated


def test_mask_is_exactly_the_rectangle():
    img = np.full((INNER, INNER, 3), 200, np.uint8)
    m = geometry.mask_inner(img)
    x0, y0, x1, y1 = MASK_RECT
    assert (m[y0:y1, x0:x1] == 0).all()
    keep = np.ones((INNER, INNER), bool)
    keep[y0:y1, x0:x1] = False
    assert (m[keep] == 200).all() and (img == 200).all()       # input not modified
    assert abs((~keep).mean() - 0.923) < 0.01                   # 310 x 305 of 320 x 320 is masked


def test_paste_alpha_is_soft_and_zero_outside_the_mask():
    a = geometry.paste_alpha(16)
    x0, y0, x1, y1 = (v + utils.BORDER for v in MASK_RECT)
    assert a.shape == (CROP, CROP) and a.max() == pytest.approx(1.0) and a.min() == 0
    assert a[:y0].max() == 0 and a[:, :x0].max() == 0 and a[y1:].max() == 0
    ramp = a[CROP // 2, x0:x0 + 40]
    assert (np.diff(ramp) >= -1e-6).all() and 0.05 < ramp[8] < 0.95   # a gradual edge, not a step


def jaw_track(n=30):
    """[n, 68, 2] 320-crop landmarks of a face whose chin drops up to 30 px as the mouth opens."""
    t = np.pi - np.pi * np.arange(17) / 16
    lm = np.zeros((n, 68, 2))
    for i, o in enumerate(np.linspace(0, 1, n)):
        lm[i, :17, 0], lm[i, :17, 1] = 160 + 140 * np.cos(t), 120 + (110 + 30 * o) * np.sin(t)
        lm[i, 31:36] = np.stack([np.linspace(135, 185, 5), np.full(5, 90.0)], 1)
        ang = np.linspace(0, 2 * np.pi, 20, endpoint=False)
        lm[i, 48:68] = np.stack([160 + 45 * np.cos(ang), 150 + (5 + 25 * o) * np.sin(ang)], 1)
    return lm


def test_jaw_mask_covers_every_frames_mouth_and_chin_but_not_the_nose():
    lm = jaw_track()
    m = geometry.jaw_mask(lm)
    assert m.shape == (INNER, INNER) and m.dtype == bool
    for p in lm:                                                # the widest-open chin and every lip point are hidden
        for x, y in np.round(p[list(range(2, 15)) + list(range(48, 68))]).astype(int):
            assert m[min(y, MASK_RECT[3] - 1), x]
    assert not m[:60].any()                                     # the nose (above its bottom at y 90, less the margin) stays visible
    assert not (m & ~geometry.rect_mask()).any()                   # never outside the reference's rectangle
    assert 0.3 < m.mean() < geometry.rect_mask().mean()
    low = geometry.jaw_mask(lm, up=0.0)                         # not grown upwards: the nose bottom (y 90) stays the frame's
    assert not low[:90].any() and low[90:].sum() > 0.9 * m[90:].sum() and not (low & ~m).any()
    assert np.array_equal(low[200:], m[200:])                   # the chin's margin is the same
    lm = jaw_track(100)                                         # (>= 2% of frames must agree)
    m, bad = geometry.jaw_mask(lm), lm.copy()
    bad[0, :17, 1] += 150                                       # one frame with wild landmarks does not widen it
    assert np.array_equal(geometry.jaw_mask(bad), m)


def test_mask_inner_and_paste_alpha_follow_a_given_mask():
    m = geometry.jaw_mask(jaw_track())
    img = np.full((2, INNER, INNER, 3), 200, np.uint8)
    out = geometry.mask_inner(img, m)
    assert (out[:, m] == 0).all() and (out[:, ~m] == 200).all()
    a = geometry.paste_alpha(16, m)
    inner = a[utils.BORDER:utils.BORDER + INNER, utils.BORDER:utils.BORDER + INNER]
    assert inner[~m].max() == 0 and a.max() == pytest.approx(1.0)   # outside the mask the frame keeps its pixels
    edge = m & ~cv2.erode(m.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    assert inner[150, 160] > 0.99 and inner[edge].max() < 0.1  # 1 over the mouth, fading to ~0 at the mask's edge
    assert np.array_equal(geometry.paste_alpha(16, None), geometry.paste_alpha(16, geometry.rect_mask()))


def test_paste_back_is_the_feathered_blend_and_colour_match_needs_only_the_pasted_area(rng):
    """paste_back's one-pass blend (cached alpha, cv2.blendLinear) equals a x generated + (1 - a) x
    frame within rounding, for a box partly outside the frame; compose's colour match, done only
    on paste_support, gives the frame the whole-crop match gives."""
    import compose
    m = geometry.jaw_mask(jaw_track())
    frame = rng.integers(0, 255, (300, 360, 3), dtype=np.uint8)
    for box in (np.array([40, 60, 277, 297]), np.array([200, 150, 400, 350])):   # inside; leaving the frame
        gen = rng.integers(0, 255, (CROP, CROP, 3), dtype=np.uint8)
        out = geometry.paste_back(frame, box, gen, feather=16, mask=m)
        x0, y0, x1, y1 = box
        a = geometry.resize(geometry.paste_alpha(16, m), (x1 - x0, y1 - y0))[..., None]
        g = geometry.resize(gen, (x1 - x0, y1 - y0)).astype(np.float32)
        want = frame.astype(np.float32).copy()
        h, w = min(y1, 300) - y0, min(x1, 360) - x0
        want[y0:y0 + h, x0:x0 + w] = a[:h, :w] * g[:h, :w] + (1 - a[:h, :w]) * want[y0:y0 + h, x0:x0 + w]
        assert np.abs(out.astype(np.float32) - want).max() <= 1.0
        assert np.array_equal(out[:y0], frame[:y0]) and np.array_equal(out[:, :x0], frame[:, :x0])
    y0, y1, x0, x1 = geometry.paste_support(16, m)
    a = geometry.paste_alpha(16, m)
    assert (a[:y0] == 0).all() and (a[y1:] == 0).all() and (a[:, :x0] == 0).all() and (a[:, x1:] == 0).all()
    assert (y1 - y0) * (x1 - x0) < 0.9 * CROP * CROP                # the jaw mask leaves the top of the crop out
    crop = geometry.crop_face(frame, box)
    gen = np.clip(geometry.inner(crop) * 0.8 + 40, 0, 255).astype(np.uint8)   # another tint: the match matters
    item = (frame, box, crop, gen, gen, -10.0)
    whole = crop.copy()
    whole[utils.BORDER:utils.BORDER + INNER, utils.BORDER:utils.BORDER + INNER] = gen
    whole = geometry.match_color(whole, crop, compose.seam_mask(16, m))
    ref = geometry.paste_back(frame, box, whole, 16, m)
    got = compose.compose(item, compose.RenderOptions(silence_gate=False, sharpen=0.0), m)
    assert np.array_equal(got, ref)
    tiny = np.zeros((INNER, INNER), bool)
    tiny[150:160, 150:160] = True                                      # a mask the feather erodes away: nothing to paste
    assert geometry.paste_support(64, tiny) == (0, 0, 0, 0)
    assert np.array_equal(compose.compose(item, compose.RenderOptions(feather=64, silence_gate=False, sharpen=0.0), tiny), frame)


def test_sharpen_restores_edges_at_the_frames_scale(rng):
    """compose's unsharp mask: amount 0 is the network's output untouched; a positive amount puts
    back gradient energy a blur took away, more for a larger amount, saturating at 0..255; compose
    sizes its blur to one pixel of the frame, so a small face (the crop enlarged from it) is
    sharpened at a coarser scale of the crop than a large one."""
    import compose
    import metrics
    sharp = cv2.resize(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8), (INNER, INNER), interpolation=cv2.INTER_NEAREST)
    soft = cv2.GaussianBlur(sharp, (0, 0), 2.0)
    energy = lambda img: metrics.region_sharpness(img[None])[0]
    assert compose.sharpen(soft, 0.0) is soft
    e0, e1, e2 = energy(soft), energy(compose.sharpen(soft, 0.5, 2.0)), energy(compose.sharpen(soft, 1.0, 2.0))
    assert e0 < e1 < e2 < energy(sharp) * 2 and e2 > 1.5 * e0
    assert compose.sharpen(soft, 4.0, 2.0).dtype == np.uint8
    frame = rng.integers(0, 255, (400, 400, 3), dtype=np.uint8)
    crop = np.zeros((CROP, CROP, 3), np.uint8)
    outs = {}
    for side in (100, 328):                                          # a face box of 100 px, then of 328
        box = np.array([20, 20, 20 + side, 20 + side])
        item = (frame, box, crop, soft, soft, -10.0)
        plain = compose.compose(item, compose.RenderOptions(silence_gate=False, color_match=False, feather=0, sharpen=0.0), None)
        crisp = compose.compose(item, compose.RenderOptions(silence_gate=False, color_match=False, feather=0, sharpen=0.5), None)
        want = compose.sharpen(soft, 0.5, compose.SHARPEN_SIGMA * max(1.0, CROP / side))
        outs[side] = want
        got = geometry.crop_face(crisp, box)[utils.BORDER:utils.BORDER + INNER, utils.BORDER:utils.BORDER + INNER]
        assert not np.array_equal(plain, crisp)
        if side == 328:                                              # one crop pixel per frame pixel: the paste is exact
            assert np.abs(got[40:-40, 40:-40].astype(int) - want[40:-40, 40:-40]).max() <= 1
    assert not np.array_equal(outs[100], outs[328])


def test_resize_uses_one_convention():
    img = np.zeros((100, 100, 3), np.uint8)
    img[:, 50:] = 255
    up, down = geometry.resize(img, (200, 200)), geometry.resize(img, (50, 50))
    assert up.shape == (200, 200, 3) and down.shape == (50, 50, 3)
    assert down[:, 24].mean() < 128 < down[:, 26].mean()


def test_frame_audio_index_mapping():
    assert media_io.num_frames(8 * utils.SR) == 200
    starts = media_io.mel_window_starts(np.arange(3))
    assert list(starts) == [-6, -3, 0]                          # centred on each frame
    assert media_io.mel_window_starts(np.array([25]))[0] + 8 == 82  # 1.02 s = frame 25's centre
    mel = np.arange(80 * 100, dtype=np.float32).reshape(80, 100)
    w = media_io.mel_windows(mel, np.array([0, 10, 40]))
    assert w.shape == (3, 1, 80, 16)
    assert (w[0, 0, :, :6] == -utils.MEL_MAX).all()             # before the audio: silence
    assert np.array_equal(w[1, 0], mel[:, 26:42])
    assert (w[2, 0, :, -1] == -utils.MEL_MAX).all()             # past the end: silence


def test_feature_window_zero_pads():
    feats = np.arange(8 * 512, dtype=np.float32).reshape(8, 512) + 1
    w = media_io.feature_window(feats, 2)
    assert w.shape == (32, 16, 16)
    flat = w.reshape(16, 512)
    assert (flat[:6] == 0).all() and np.array_equal(flat[6], feats[0]) and (flat[-1] == 0).all()


def test_mel_matches_librosa_and_spec():
    librosa = pytest.importorskip("librosa")
    wav = (np.random.default_rng(0).standard_normal(16000) * 0.1).astype(np.float32)
    mel = media_io.melspectrogram(wav)
    assert mel.shape == (80, 16000 // 200 + 1)                  # 80 mel frames per second
    assert mel.min() >= -4 and mel.max() <= 4
    basis = librosa.filters.mel(sr=16000, n_fft=800, n_mels=80, fmin=55, fmax=7600)
    assert np.allclose(basis, media_io.mel_basis(), atol=1e-7)
    x = np.concatenate([wav[:1], wav[1:] - 0.97 * wav[:-1]])
    spec = np.abs(librosa.stft(x, n_fft=800, hop_length=200, win_length=800))
    ref = np.clip(8 * (20 * np.log10(np.maximum(1e-5, basis @ spec)) - 20 + 100) / 100 - 4, -4, 4)
    assert np.abs(ref - mel).max() < 1e-3
    assert media_io.melspectrogram(np.zeros(1600, np.float32)).max() == -4   # silence is the floor


@dataclasses.dataclass
class _Cfg:
    name: str = "x"          # a name
    lr: float = 1e-3         # learning rate
    steps: int = 10          # steps
    amp: bool = True         # mixed precision
    widths: tuple = (1, 2)   # widths


def test_parse_config_overrides_flags_and_rejects_unknown(capsys):
    cfg = utils.parse_config(_Cfg, ["--lr", "1e-4", "--steps", "2e3", "--no-amp", "--widths", "3,4"])
    assert (cfg.lr, cfg.steps, cfg.amp, cfg.widths, cfg.name) == (1e-4, 2000, False, (3, 4), "x")
    with pytest.raises(SystemExit):
        utils.parse_config(_Cfg, ["--nope", "1"])
    with pytest.raises(SystemExit):
        utils.parse_config(_Cfg, ["--help"])
    assert "learning rate" in capsys.readouterr().out


@dataclasses.dataclass
class _Ranged:
    batch: int = 8           # [1..] frames per step
    share: float = 0.1       # [0..0.5] held-out share
    lr: float = 1e-3         # [>0..] learning rate
    resume: str = ""         # "" new run, auto, last or a path


def test_numeric_settings_are_checked_against_the_range_in_their_comment(capsys):
    utils.check_config(_Ranged())
    for argv, msg in ((["--batch", "0"], "--batch 0: must be >= 1"), (["--share", "0.6"], "--share 0.6: must be >= 0 and <= 0.5"),
                      (["--lr", "0"], "--lr 0.0: must be > 0")):
        with pytest.raises(SystemExit) as e:
            utils.parse_config(_Ranged, argv)
        assert e.value.code == 2 and capsys.readouterr().err.strip().splitlines()[-1] == f"error: {msg}"
    assert "[1..] frames per step" in utils._field_comments(_Ranged)["batch"]    # the range shows in --help
    import train_328
    with pytest.raises(UserError, match="--max_steps -5: must be >= 0"):      # callers other than the CLI too
        train_328.main(train_328.Config(name="x", max_steps=-5))
    assert utils.parse_config(_Ranged, ["--resume"], bare={"resume": "auto"}).resume == "auto"
    assert utils.parse_config(_Ranged, ["--resume", "last"], bare={"resume": "auto"}).resume == "last"


def test_resume_resolves_one_way_for_both_trainers(tmp_path, capsys):
    """utils.resume_checkpoint: the --resume convention of train_328.py and syncnet_328.py."""
    last = tmp_path / "run" / "last.pth"
    assert utils.resume_checkpoint("", last) is None                         # a new run
    assert utils.resume_checkpoint("auto", last) is None                     # auto, nothing to continue: a new run
    with pytest.raises(UserError, match=r"--resume last: checkpoint not found: .*last\.pth; start without --resume"):
        utils.resume_checkpoint("last", last)
    with pytest.raises(UserError, match="--resume: checkpoint not found: .*other.pth"):
        utils.resume_checkpoint(str(tmp_path / "other.pth"), last)
    utils.save_checkpoint({"model": {}, "step": 7}, last)
    other = tmp_path / "other.pth"
    utils.save_checkpoint({"model": {}, "step": 3}, other)
    assert utils.resume_checkpoint("auto", last)["step"] == 7                # auto with a last file: continue it
    assert utils.resume_checkpoint("last", last)["step"] == 7
    assert utils.resume_checkpoint(True, last)["step"] == 7                  # the old yes/no flag = last
    assert utils.resume_checkpoint(str(other), last)["step"] == 3            # a path: that file
    # a new run where a run already is: refused, noted or quiet, as the trainer asks
    with pytest.raises(UserError, match="already holds a run; pass --resume auto"):
        utils.resume_checkpoint("", last)
    capsys.readouterr()
    assert utils.resume_checkpoint("", last, existing="note") is None
    assert "will be replaced" in capsys.readouterr().out
    assert utils.resume_checkpoint("", last, existing="replace") is None and capsys.readouterr().out == ""
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="damaged"):
        utils.resume_checkpoint(str(tmp_path / "bad.pth"), last)


def test_an_error_under_a_progress_bar_is_the_last_line():
    import subprocess
    import sys
    code = ("import utils, tqdm\n"
            "def main():\n"
            "    bar = tqdm.tqdm(total=10, desc='lip-sync')\n"
            "    bar.update(3)\n"
            "    raise utils.UserError('the audio is damaged; re-export it')\n"
            "utils.run_main(main)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=utils.REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.rstrip().split("\n")[-1] == "error: the audio is damaged; re-export it"
    assert "lip-sync" in r.stderr and "\rerror" not in r.stderr      # the bar was closed, on its own line


@pytest.mark.parametrize("bad", ["../x", "a/b", "/abs", "", "x y", ".hidden", "a" * 70, "a..b"])
def test_check_name_refuses_path_tricks(bad):
    with pytest.raises(UserError):
        utils.check_name(bad)


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    with pytest.raises(RuntimeError):
        with utils.atomic_dir(tmp_path / "ds") as d:
            (d / "half").write_text("x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with utils.atomic_dir(tmp_path / "ds") as d:
        (d / "whole").write_text("x")
    assert [p.name for p in tmp_path.iterdir()] == ["ds"] and (tmp_path / "ds" / "whole").exists()


def test_checkpoint_round_trip_and_errors(tmp_path):
    torch = pytest.importorskip("torch")
    obj = {"model": {"w": torch.arange(3.0)}, "step": 7, "config": {"widths": [1]}}
    utils.save_checkpoint(obj, tmp_path / "c.pth")
    back = utils.load_checkpoint(tmp_path / "c.pth")
    assert back["step"] == 7 and back["format_version"] == utils.CKPT_VERSION
    assert torch.equal(back["model"]["w"], obj["model"]["w"])
    assert [p.name for p in tmp_path.iterdir()] == ["c.pth"]   # no temp file left
    with pytest.raises(UserError, match="not found"):
        utils.load_checkpoint(tmp_path / "missing.pth")
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="damaged"):
        utils.load_checkpoint(tmp_path / "bad.pth")


def test_video_writer_round_trip_and_abort(tmp_path):
    wav = np.zeros(utils.SR * 2, np.float32)
    wav[::50] = 0.3
    media_io.write_wav(tmp_path / "a.wav", wav)
    with media_io.VideoWriter(tmp_path / "v.mp4", 66, 50, audio=tmp_path / "a.wav") as w:
        for i in range(50):
            w.write(np.full((50, 66, 3), i * 5, np.uint8))
    assert (tmp_path / "v.mp4").stat().st_mode & 0o777 == 0o644      # readable by others, like every output
    info = media_io.probe(tmp_path / "v.mp4")
    assert info["video"]["fps"] == 25 and info["audio"] is not None
    assert abs(info["duration"] - 2.0) < 0.1
    frames = list(media_io.iter_frames(tmp_path / "v.mp4", 66, 50))
    assert len(frames) == 50 and abs(int(frames[40].mean()) - 200) < 4
    with pytest.raises(ValueError):
        with media_io.VideoWriter(tmp_path / "x.mp4", 66, 50) as w:
            w.write(np.zeros((50, 66, 3), np.uint8))
            raise ValueError("stop")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.wav", "v.mp4"]


def test_probe_and_load_audio_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        media_io.probe(tmp_path / "nope.mp4")
    (tmp_path / "empty.wav").write_bytes(b"")
    with pytest.raises(UserError, match="empty"):
        media_io.load_audio(tmp_path / "empty.wav")
    (tmp_path / "junk.wav").write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.raises(UserError, match="not a readable"):
        media_io.load_audio(tmp_path / "junk.wav")
    media_io.write_wav(tmp_path / "s.wav", np.zeros(8000, np.float32), sr=8000)
    wav = media_io.load_audio(tmp_path / "s.wav")                 # resampled to 16 kHz
    assert wav.dtype == np.float32 and abs(len(wav) - 16000) < 50 and media_io.is_silent(wav)


def test_warmup_cosine_schedule():
    lr = [utils.warmup_cosine(s, 1e-3, 10, 110, 0.05) for s in range(130)]
    assert lr[0] == pytest.approx(1e-4) and lr[9] == pytest.approx(1e-3)         # linear warm-up
    assert lr[10] == pytest.approx(1e-3) and lr[60] == pytest.approx(1e-3 * (0.05 + 0.95 * 0.5))
    assert all(a >= b for a, b in zip(lr[10:], lr[11:]))                       # then only down
    assert lr[110] == lr[129] == pytest.approx(5e-5)                            # flat at lr x min_frac after the end


def test_autocast_is_bf16_on_cpu_only_for_training_on_cpus_with_bf16_units():
    import torch
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else None
    if flags is not None:
        assert utils.cpu_bf16() == any(f in flags.split() for f in ("avx512_bf16", "amx_bf16", "amx_tile"))
    conv, x, cpu = torch.nn.Conv2d(3, 4, 3), torch.rand(1, 3, 8, 8), torch.device("cpu")
    with utils.autocast(cpu, True, cpu=True):                # training: bf16 where the units exist
        assert conv(x).dtype == (torch.bfloat16 if utils.cpu_bf16() else torch.float32)
    with utils.autocast(cpu, True):                          # inference on CPU stays fp32
        assert conv(x).dtype == torch.float32
    with utils.autocast(cpu, False, cpu=True):               # --no-amp
        assert conv(x).dtype == torch.float32
