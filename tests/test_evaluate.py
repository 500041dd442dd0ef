"""evaluate.py: every metric gives its known answer on constructed cases (identical frames are
perfect, a delayed track is found at its delay, an untouched frame has seam ratio 1, the same face
has identity ~1), and a model that ignores audio (the template baseline) scores ~0 on the opening
correlation and the audio-ablation gap, end to end on the synthetic dataset."""
import json
from dataclasses import replace
import math

import cv2
import numpy as np
import pytest

import evaluate as ev
import metrics
import geometry
import media_io
import utils


def smooth_track(rng, n=200):
    """A speech-like opening track: smoothed noise, positive."""
    x = np.convolve(rng.normal(size=n + 10), np.ones(5) / 5, mode="same")[5:n + 5]
    return x - x.min() + 0.05


# ---------------------------------------------------------------------------------------------- images
def test_identical_frames_are_perfect(rng):
    img = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert metrics.psnr(img, img) == math.inf
    assert metrics.ssim(img, img) == pytest.approx(1.0)
    noisy = np.clip(img.astype(int) + rng.integers(-10, 11, img.shape), 0, 255).astype(np.uint8)
    assert 25 < metrics.psnr(img, noisy) < 40 and metrics.ssim(img, noisy) < 1
    assert metrics.mean_finite([math.inf, 30.0, 40.0]) == 35.0 and metrics.mean_finite([math.inf]) == math.inf


def test_psnr_known_value():
    a = np.zeros((10, 10, 3), np.uint8)
    b = np.full((10, 10, 3), 255, np.uint8)
    assert metrics.psnr(a, b) == pytest.approx(0.0)                  # mse = 255^2
    assert metrics.psnr(a, a + 1) == pytest.approx(10 * np.log10(255 ** 2))


def test_lmd_and_crop_coordinates(rng):
    lms = rng.uniform(100, 200, (5, 68, 2))
    assert metrics.lmd(lms, lms) == 0.0
    assert metrics.lmd(lms, lms + [7.0, -3.0]) == pytest.approx(0.0, abs=1e-9)   # placement does not count
    moved = lms.copy()
    moved[:, 66, 1] += 20.0                                      # lower inner lip 20 px down
    # mean-centring spreads the 20 px: point 66 moves 19 px, each of the other 19 points 1 px
    assert metrics.lmd(moved, lms) == pytest.approx((19 + 19 * 1) / 20)
    box = np.array([[100, 50, 264, 214]])                        # 164 px -> 328: 2x
    pts = np.array([[[100 + 2, 50 + 2], [182, 132]]], np.float64)
    out = geometry.to_crop_coords(pts, box)[0]
    assert np.allclose(out[0], [0, 0]) and np.allclose(out[1], [160, 160])   # (2 px -> 4 px) - 4 px border


def test_mouth_box_is_inside_the_crop():
    lm = np.zeros((68, 2))
    lm[48:68] = [[150, 220], [190, 240]] * 10
    x0, y0, x1, y1 = geometry.mouth_box(lm)
    assert (x0, x1) == (150 - 12, 190 + 12 + 1) and y0 == 220 - 12 and y1 == 240 + 12 + 1
    lm[48:68] = [[0, 300], [319, 319]] * 10
    assert geometry.mouth_box(lm) == (0, 204, 320, 320)


def test_one_mouth_box_and_region_for_a_clip(rng):
    """A clip's fixed mouth box is the 5-95 percentile extent of its mouth, grown as a frame's box
    is grown: one bad frame in 40 does not stretch it. The silence gate's mouth region (centre,
    top, half width, chin) reads the same extent, and its soft area covers the lips."""
    lm = np.zeros((40, 68, 2))
    lm[:, 48:68] = [[150, 220], [190, 240]] * 10
    lm[:, 8] = [170, 300]                                         # the chin
    assert geometry.mouth_box_of_clip(lm) == geometry.mouth_box(lm[0])
    lm[7, 48:68] += 60                                            # one bad frame
    assert geometry.mouth_box_of_clip(lm, 0.1) == geometry.mouth_box(lm[0], 0.1)
    assert geometry.mouth_region(lm) == (170.0, 220.0, 20.0, 300.0)
    alpha = geometry.mouth_alpha(geometry.mouth_region(lm))[..., 0]
    assert alpha[230, 150:191].min() > 0.9 and alpha[10, 10] == 0


# ---------------------------------------------------------------------------------------------- time series
def test_pearson_and_lag(rng):
    a = smooth_track(rng)
    assert metrics.pearson(a, a) == pytest.approx(1.0)
    assert metrics.pearson(a, -a) == pytest.approx(-1.0)
    assert metrics.pearson(a, np.full_like(a, 0.2)) == 0.0            # a mouth that never moves scores 0
    late = np.roll(a, 3)                                         # late[t] = a[t - 3]
    assert metrics.best_lag(late, a, 10)[0] == 3
    assert metrics.best_lag(a, late, 10)[0] == -3
    lags, r = metrics.lag_curve(late, a, 10)
    assert len(lags) == 21 and r[lags == 3][0] == pytest.approx(1.0)


def test_width_ratio_says_how_wide_the_mouth_moves(rng):
    a = smooth_track(rng)
    assert metrics.width_ratio(a, a) == pytest.approx(1.0)
    assert metrics.width_ratio(a.mean() + (a - a.mean()) / 3, a) == pytest.approx(1 / 3)   # opens a third as wide
    assert metrics.width_ratio(np.roll(a, 7), a) == pytest.approx(1.0)                    # late but as wide
    assert math.isnan(metrics.width_ratio(a, np.full_like(a, 0.2)))                       # a still truth: undefined


def test_mouth_opening_closed_and_open():
    lm = np.zeros((2, 68, 2))
    lm[:, 60], lm[:, 64] = [0, 0], [40, 0]                        # inner corners 40 px apart
    lm[1, [67, 66, 65], 1] = 10                                   # second frame: inner lips 10 px apart
    assert metrics.mouth_opening(lm) == pytest.approx([0.0, 0.25])


def test_silence_detection_and_score():
    db = np.concatenate([np.full(20, -80.0), np.full(20, -20.0), np.full(20, -80.0)])
    silent, thresh = metrics.silent_frames(db)
    assert thresh == pytest.approx(-60 + metrics.SILENCE_FLOOR_DB)
    # quiet frames 0-19 and 40-59, minus SILENCE_HOLD frames next to the speech
    expect = np.zeros(60, bool)
    expect[:20 - metrics.SILENCE_HOLD] = True
    expect[40 + metrics.SILENCE_HOLD:] = True
    assert np.array_equal(silent, expect)
    opening = np.where(np.arange(60) < 30, 0.05, 0.4)            # closed in the first pause, open in the second
    assert metrics.silence_score(opening, silent, 0.1) == pytest.approx(18 / 36)
    assert math.isnan(metrics.silence_score(opening, np.zeros(60, bool), 0.1))
    flat = np.full(60, -30.0)                                    # no contrast: no silence measured
    assert not metrics.silent_frames(flat)[0].any()


def test_speech_frames_exclude_pauses():
    db = np.array([-80.0, -20.0, -50.0, -20.0])
    assert metrics.speech_frames(db, -54.0).tolist() == [False, True, True, True]
    assert metrics.speech_frames(db, math.nan).all()                  # no silence threshold: every frame


def test_closed_threshold_from_truth():
    o = np.concatenate([np.full(50, 0.1), np.full(50, 0.5)])
    assert metrics.closed_threshold(o) == pytest.approx(0.1 + metrics.CLOSED_SHARE * 0.4)


def test_loudness_of_silence_and_tone():
    t = np.arange(utils.SR) / utils.SR
    wav = np.where(t < 0.5, 0.0, 0.5 * np.sin(2 * np.pi * 200 * t)).astype(np.float32)
    db = metrics.loudness_db(wav, 25)
    assert db[:11].max() < -100 and db[14:].min() == pytest.approx(20 * np.log10(0.5 / np.sqrt(2)), abs=0.1)


# ---------------------------------------------------------------------------------------------- jitter, seam, identity
def test_jitter_ratio(rng):
    regs = rng.integers(0, 256, (10, 20, 30, 3), dtype=np.uint8)
    assert metrics.jitter_ratio(regs, regs) == pytest.approx(1.0)
    still = np.repeat(regs[:1], 10, 0)
    assert metrics.jitter_ratio(still, regs) == 0.0
    half = (regs.astype(np.float32) * 0.5).astype(np.uint8)
    assert metrics.motion_energy(half) < metrics.motion_energy(regs)


def test_sharpness_ratio_falls_with_blur(rng):
    """A blurred copy of the truth's mouth regions scores below 1, the truth itself exactly 1."""
    regs = rng.integers(0, 256, (4, 24, 40, 3), dtype=np.uint8)
    blurred = np.stack([cv2.GaussianBlur(r, (0, 0), 1.5) for r in regs])
    sharp, soft = metrics.region_sharpness(regs), metrics.region_sharpness(blurred)
    assert sharp.shape == (4,) and (soft < 0.2 * sharp).all()
    assert metrics.sharpness_ratio(sharp, sharp) == pytest.approx(1.0)
    assert metrics.sharpness_ratio(soft, sharp) < 0.2
    assert metrics.sharpness_ratio(sharp, soft) > 5


def test_seam_ratio(rng):
    import cv2
    band = metrics.seam_band(16)
    assert band.shape == (utils.CROP, utils.CROP) and 0.05 < band.mean() < 0.5
    x0, y0, x1, y1 = (v + utils.BORDER for v in utils.MASK_RECT)
    hard = metrics.seam_band(0)
    assert hard[y0, x0 + 100] and hard[y0 - 3, x0 + 100] and not hard[y0 + 10, x0 + 100]
    true = cv2.GaussianBlur(rng.integers(0, 256, (utils.CROP, utils.CROP, 3), dtype=np.uint8), (0, 0), 4)
    assert metrics.seam_ratio(true, true, band) == 1.0
    assert metrics.seam_ratio(np.stack([true, true]), np.stack([true, true]), band) == 1.0
    pasted = true.copy()
    pasted[y0:y1, x0:x1] = np.clip(pasted[y0:y1, x0:x1].astype(int) + 60, 0, 255)   # a hard, brighter rectangle
    assert metrics.seam_ratio(pasted, true, hard) > 2


def test_identity_of_the_same_face():
    import landmarks
    import synthetic
    face = synthetic.default_face()
    lm = landmarks.make_detector("dlib").detect(face)[0][0]
    import landmarks
    describe = landmarks.FaceDescriber()
    d = describe(face, lm)
    assert d.shape == (128,)
    assert metrics.cosine(d, d) == pytest.approx(1.0)
    brighter = np.clip(face.astype(int) + 15, 0, 255).astype(np.uint8)
    assert metrics.cosine(describe(brighter, lm), d) > 0.98
    assert metrics.cosine(np.stack([d, d]), np.stack([d, -d])) == pytest.approx([1.0, -1.0])


# ---------------------------------------------------------------------------------------------- end to end
def test_template_baseline_end_to_end(tiny_dataset, tmp_path):
    """A 'model' that pastes its reference back ignores the audio: no opening correlation and no
    ablation gap, while the truth's own opening follows the audio."""
    out = tmp_path / "eval"
    cfg = ev.Config(name="tiny", video=str(tiny_dataset), baseline="template", out_dir=str(out),
                    max_frames=75, id_frames=4, syncnet="off")
    res = ev.main(cfg)
    m = res["metrics"]
    assert res["frames"] == 75 and res["mode"] == "self-reenactment"
    assert abs(m["opening_r"]) < 0.3 and abs(m["ablation_gap"]) < 0.1 and abs(m["ablation_gap_speech"]) < 0.1
    assert m["env_r_true"] > 0.5                                 # the synthetic actor's jaw follows loudness
    assert m["identity_cos"] > 0.9 and m["silence_gen"] == 1.0
    assert 0.5 < m["seam_ratio"] < 1.5 and m["jitter_ratio"] < 0.5
    assert 18 <= m["ablation_shift_frames"] <= 57 and abs(m["ablation_audio_r"]) < 0.3   # another moment, unlike this one
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["metrics"]["ablation_gap"] == m["ablation_gap"]
    assert m["opening_width_ratio"] < 0.5                       # a pasted still mouth hardly moves
    for f in ("plot.png", "strip.png", "side_by_side.mp4", "tracks.npz"):
        assert (out / f).stat().st_size > 0
    info = media_io.probe(out / "side_by_side.mp4")
    assert info["audio"] is not None and abs(info["duration"] - 3.0) < 0.2
    tracks = np.load(out / "tracks.npz")                         # the landmarks behind LMD, frame by frame
    g, t = tracks["gen_lms320"], tracks["true_lms320"]
    assert g.shape == t.shape == (75, 68, 2) and 0 < g[:, 48:].min() and g[:, 48:].max() < 320   # mouth in the crop
    assert abs(np.mean([metrics.lmd(g[i:i + 1], t[i:i + 1]) for i in range(75)]) - m["lmd_mouth_px"]) < 1e-4


def test_copy_baseline_needs_the_gap(tiny_dataset, tmp_path):
    """Copying the template mouth (here: the truth) gives r ~1, yet the ablation gap stays ~0."""
    cfg = ev.Config(name="tiny", video=str(tiny_dataset), baseline="copy", out_dir=str(tmp_path),
                    max_frames=40, id_frames=2, syncnet="off", plot=False, video_out=False)
    m = ev.main(cfg)["metrics"]
    assert m["opening_r"] > 0.9 and abs(m["ablation_gap"]) < 0.05
    # photo mode (the first frame alone) catches the copy: the photo's own mouth never moves
    assert m["opening_width_photo"] < 0.2 and not m["opening_r_photo"] > 0.5
    assert m["lmd_photo_px"] > 2 * m["lmd_mouth_px"]             # the photo's still lips, away from the truth's (1.4 vs 6.1 px)
    moved = ev.main(replace(cfg, copy_shift=1.0, out_dir=str(tmp_path / "moved")))["metrics"]   # the same mouth, 1 px off
    assert moved["psnr_mouth"] < m["psnr_mouth"] - 3 and moved["opening_r"] > 0.9
    with pytest.raises(utils.UserError, match="add --baseline copy"):
        ev.main(replace(cfg, baseline="", copy_shift=1.0))


def test_user_errors(tiny_dataset, tmp_path):
    with pytest.raises(utils.UserError, match="no held-out video"):
        ev.main(ev.Config(name="tiny"))
    with pytest.raises(utils.UserError, match="baseline"):
        ev.main(ev.Config(name="tiny", video=str(tiny_dataset), baseline="nonsense", out_dir=str(tmp_path)))
    with pytest.raises(utils.UserError, match="checkpoint"):
        ev.main(ev.Config(name="tiny", video=str(tiny_dataset), ckpt_root=str(tmp_path / "none"), out_dir=str(tmp_path / "a")))
    with pytest.raises(utils.UserError, match="only 5 frames"):
        ev.main(ev.Config(name="tiny", video=str(tiny_dataset), baseline="template", max_frames=5, syncnet="off",
                          out_dir=str(tmp_path / "b")))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()    # refused: no folder left behind


def test_chance_level_of_r(rng):
    a, b = smooth_track(rng, 300), smooth_track(rng, 300)
    c = metrics.chance_r(a, b)
    assert 0.02 < c < 0.3                                        # smooth series: r of unrelated tracks spreads
    assert math.isnan(metrics.chance_r(a[:40], b[:40]))               # too short for shifts of >= 1 s


def test_ablation_shift_avoids_a_rhythm_that_lines_up():
    """A speak-pause rhythm of period 150 frames in 1500: rolled by half the clip it lines up with
    itself (r 1); the chosen shift leaves it unrelated (|r| < 0.05), within 0.25..0.75 of the clip."""
    t = np.arange(1500)
    loud = np.where((t % 150) < 100, -20.0, -60.0) + np.sin(t * 0.3)
    assert metrics.pearson(np.roll(loud, 750), loud) > 0.95
    s = metrics.uncorrelated_shift(loud)
    assert 375 <= s <= 1125 and abs(metrics.pearson(np.roll(loud, s), loud)) < 0.05


def test_unseen_audio_mode(tiny_dataset, tmp_path):
    """--audio: the held-out frames become templates; no ground truth, so only opening vs audio,
    silence, jitter, seam and identity are reported."""
    import synthetic
    wav = tmp_path / "other.wav"
    media_io.write_wav(wav, synthetic.synth_speech(1.6, seed=7, lead_silence=0.4))
    res = ev.main(ev.Config(name="tiny", video=str(tiny_dataset), audio=str(wav), baseline="template",
                            out_dir=str(tmp_path / "out"), id_frames=2, syncnet="off", video_out=False))
    m = res["metrics"]
    assert res["mode"] == "unseen-audio" and res["frames"] == 40
    assert "opening_r" not in m and "ablation_gap" not in m and "psnr_crop" not in m
    assert abs(m["env_r_gen"]) < 0.5 and m["silent_frames"] > 0 and m["silence_gen"] == 1.0
    assert (tmp_path / "out" / "plot.png").is_file()


def test_another_speakers_dataset_as_audio(tiny_dataset, tmp_path):
    """--audio DATASET: that person's audio drives the model and their own mouth opening is the truth
    of the opening track. The clip's own dataset as the speaker: pasting the template (= the
    speaker's frames) back follows them (r ~1 at lag 0); a pasted still reference does not."""
    cfg = ev.Config(name="tiny", video=str(tiny_dataset), audio=str(tiny_dataset), baseline="copy", max_frames=60,
                    out_dir=str(tmp_path / "copy"), id_frames=2, syncnet="off", plot=False, video_out=False)
    m = ev.main(cfg)["metrics"]
    assert m["speaker_r"] > 0.9 and m["speaker_lag"] == 0 and m["speaker_r_template"] > 0.9
    assert "opening_r" not in m                                   # no image truth: the frames are templates
    still = ev.main(replace(cfg, baseline="template", out_dir=str(tmp_path / "still")))["metrics"]
    assert abs(still["speaker_r"]) < 0.3 < m["speaker_r"] - 0.5
    tracks = np.load(tmp_path / "still" / "tracks.npz")
    assert tracks["speaker_opening"].shape == tracks["gen_opening"].shape == (60,)
    (tmp_path / "empty").mkdir()
    with pytest.raises(utils.UserError, match="a folder must be one process.py made"):
        ev.main(replace(cfg, audio=str(tmp_path / "empty"), out_dir=str(tmp_path / "none")))
    assert not (tmp_path / "none").exists()


def test_a_held_out_truth_out_of_step_with_its_audio_is_warned_about():
    """Round 40: a 6 s held-out clip shifted 3 frames by a false offset scored the truth's own sync
    check 0.46 at offset 3; evaluate.py then says so instead of reporting timing figures silently."""
    from metrics import truth_sync_warning
    w = truth_sync_warning({"sync_offset_true": 3, "sync_stretch_acc_true": 0.458})
    assert w.startswith("warning:") and "+3 frames" in w and "0.46" in w and "--av_offset N" in w
    assert truth_sync_warning({"sync_offset_true": 0, "sync_stretch_acc_true": 0.78}) is None     # a weak judge, in step
    assert truth_sync_warning({"sync_offset_true": -4, "sync_stretch_acc_true": 0.979}) is None   # a confident check
    assert truth_sync_warning({"sync_offset_true": 1, "sync_stretch_acc_true": 0.3}) is None
    assert truth_sync_warning({}) is None                                                          # no SyncNet judge
