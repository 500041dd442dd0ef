"""guidance_fit: the guidance a model gets by default, fitted from how wide it paints the mouth on
its training video's held-out tail, stored in its checkpoint and used by inference, evaluation and
the server unless a guidance is given."""
import shutil

import numpy as np
import pytest

import geometry
import guidance_fit
import inference_328 as inf
import utils
from compose import GUIDANCE, LIVE_GUIDANCE, RenderOptions
from test_inference import random_light_checkpoint

# Tail widths measured on the grid protocol's models (RESULTS.md round 14): narrow 4500 steps, narrow 1350 steps.
LONG = {1.0: 0.753, 1.05: 0.813, 1.1: 0.892, 1.15: 0.951, 1.2: 1.021, 1.25: 1.067}
SHORT = {1.0: 0.611, 1.05: 0.661, 1.1: 0.712, 1.15: 0.772, 1.2: 0.811, 1.25: 0.844}


def test_choose_interpolates_to_the_target_within_the_grid():
    assert guidance_fit.choose(LONG) == 1.11          # 1.1 + 0.05 x (0.9 - 0.892) / (0.951 - 0.892)
    assert guidance_fit.choose(LONG, target=0.8) == 1.04
    assert guidance_fit.choose(SHORT) == GUIDANCE     # never reaches 0.9: the full default push
    assert guidance_fit.choose({1.0: 0.95, 1.1: 1.1}) == 1.0   # opens wide enough by itself


def test_tail_frames_are_the_training_runs_held_out_tail():
    from datasets import split_frames
    f = guidance_fit.tail_frames(7500, 0.1)
    assert len(f) == guidance_fit.MAX_FRAMES and f[0] == 6750 and f[-1] == 7499 and np.all(np.diff(f) > 0)
    assert np.array_equal(guidance_fit.tail_frames(1000, 0.1), split_frames(1000, 0.1)[1])


class Painter:
    """A stand-in generator whose audio pass paints `share` of the way from the closed reference to
    the true frame (1 = the truth itself) and whose silent pass paints the reference: its mouth
    moves `share` as far as the truth's."""
    mask = None

    def __init__(self, share):
        self.share, self.runner = share, lambda img, audio: img

    def truth(self, crops, audio):      # the mouth it paints at full share
        return np.stack([geometry.inner(c) for c in crops])

    def paint(self, crops, refs, audio, guidance):
        truth = self.truth(crops, audio).astype(np.float32) / 255
        still = np.stack(refs).astype(np.float32) / 255
        for x in (still + np.float32(self.share) * (truth - still), still):
            self.runner(np.ascontiguousarray(x.transpose(0, 3, 1, 2)), audio)


@pytest.fixture(scope="module")
def tail_dataset(tiny_dataset, tmp_path_factory):
    """The synthetic talking clip's dataset with (zero) audio features: the Painter ignores them."""
    ds = tmp_path_factory.mktemp("gf") / "tiny"
    shutil.copytree(tiny_dataset, ds)
    n = len(utils.load_npy(ds / utils.LANDMARKS)["crop_boxes"])
    np.save(ds / utils.AUD_FEAT, np.zeros((n, utils.FEAT_DIM), np.float32))
    return ds, n


def test_widths_measure_how_far_the_painted_mouth_opens(tail_dataset):
    ds, n = tail_dataset
    frames = np.arange(0, n, 2)
    full, r = guidance_fit.tail_widths(Painter(1.0), ds, frames)
    assert full[1.0] == pytest.approx(1.0, abs=0.02) and r > 0.98      # the truth repainted: as wide as the truth
    assert guidance_fit.choose(full) == 1.0
    half, _ = guidance_fit.tail_widths(Painter(0.5), ds, frames)
    assert half[1.0] < 0.8 * full[1.0]                                  # half the motion: a narrower opening
    assert half[1.25] > half[1.0] + 0.05                                # which guidance widens
    assert guidance_fit.choose(half) > 1.0


class AudioPainter(Painter):
    """A Painter whose full share is the true mouth of the frame whose audio it hears (audio_dataset's
    features carry the frame index), over whatever crop it is given: a model that follows the audio alone."""

    def __init__(self, ds, share):
        import templates
        super().__init__(share)
        self.template = templates.FolderTemplate.from_dataset(ds)

    def truth(self, crops, audio):
        heard = np.rint(np.asarray(audio).reshape(len(audio), 16, -1)[:, 8, 0]).astype(int) - 1   # the window's centre frame
        return np.stack([geometry.inner(self.template.crop(j)) for j in heard])


@pytest.fixture(scope="module")
def audio_dataset(tail_dataset, tmp_path_factory):
    """tail_dataset whose audio feature of frame j holds j + 1 (AudioPainter reads it back)."""
    ds = tmp_path_factory.mktemp("gfa") / "tiny"
    shutil.copytree(tail_dataset[0], ds)
    feats = np.zeros((tail_dataset[1], utils.FEAT_DIM), np.float32)
    feats[:, 0] = np.arange(1, len(feats) + 1)
    np.save(ds / utils.AUD_FEAT, feats)
    return ds, tail_dataset[1]


def test_photo_mode_holds_one_frame_still_and_its_mouth_follows_the_audio(audio_dataset):
    ds, n = audio_dataset
    frames, grid = np.arange(0, n, 2), guidance_fit.PHOTO_GRID
    copy, _ = guidance_fit.tail_widths(Painter(1.0), ds, frames, grid, still=0)
    assert copy[1.0] < 0.1 and copy[1.75] < 0.1            # repainting the still frame's own mouth: it never moves
    full, r = guidance_fit.tail_widths(AudioPainter(ds, 1.0), ds, frames, grid, still=0)
    assert full[1.0] == pytest.approx(1.0, abs=0.15) and r > 0.7    # each frame's true mouth over the still face (another pose)
    half, _ = guidance_fit.tail_widths(AudioPainter(ds, 0.5), ds, frames, grid, still=0)
    assert half[1.0] < 0.8 * full[1.0] and half[1.75] > half[1.0] + 0.15
    assert 1.0 < guidance_fit.choose(half) <= max(grid)


def test_a_short_tail_keeps_the_default_and_leaves_the_checkpoint_alone(tail_dataset, tmp_path):
    ds, n = tail_dataset
    path = random_light_checkpoint(tmp_path / "last.pth")
    before = path.read_bytes()
    res = guidance_fit.fit_checkpoint(path, ds, 0.1)                    # 6 s of video: a 15-frame tail
    assert res["value"] is None and res["frames"] < guidance_fit.MIN_FRAMES and "default guidance" in res["note"]
    assert path.read_bytes() == before
    assert inf.LipSyncModel(path, "cpu", "eager").guidance == GUIDANCE


def test_a_fitted_guidance_is_every_paths_default(tmp_path):
    path = random_light_checkpoint(tmp_path / "last.pth")
    guidance_fit.store(path, dict(value=1.1, frames=200, note="test"))
    model = inf.LipSyncModel(path, "cpu", "eager")
    assert model.guidance == 1.1 and utils.load_checkpoint(path)["guidance_fit"]["frames"] == 200
    cfg = inf.Config(guidance=-1.0)
    assert RenderOptions.from_config(cfg, default=model.guidance).guidance == 1.1      # a file
    assert RenderOptions.from_config(inf.Config(guidance=1.3), default=model.guidance).guidance == 1.3   # asked for
    assert RenderOptions.from_config(cfg).guidance == GUIDANCE
    assert model.guidance_photo == 1.1                    # a fit without a photo's (older files): the frames' guidance


def test_a_photo_gets_its_own_fitted_guidance(tmp_path, tiny_dataset):
    import templates
    path = random_light_checkpoint(tmp_path / "last.pth")
    guidance_fit.store(path, dict(value=1.1, frames=200, note="test", photo=dict(value=1.45)))
    model = inf.LipSyncModel(path, "cpu", "eager")
    frames = templates.FolderTemplate.from_dataset(tiny_dataset)
    photo = frames.first_still()
    assert photo.n == 1 and np.array_equal(photo.crop(0), frames.crop(0))
    assert (model.guidance_for(frames), model.guidance_for(photo)) == (1.1, 1.45)
    assert RenderOptions.from_config(inf.Config(guidance=-1.0), default=model.guidance_for(photo)).guidance == 1.45
    import stream        # live: the frames' one U-Net pass a frame; a photo keeps its push (its silent pass is painted once)
    assert (model.guidance_for(frames, live=True), model.guidance_for(photo, live=True)) == (LIVE_GUIDANCE, 1.45)
    assert (stream.LiveSession(model, frames).opts.guidance, stream.LiveSession(model, photo).opts.guidance) == (LIVE_GUIDANCE, 1.45)


def test_a_photos_silent_pass_is_painted_once(tmp_path, tiny_dataset, rng):
    import media_io
    import templates
    from compose import StillCache
    model = inf.LipSyncModel(random_light_checkpoint(tmp_path / "last.pth"), "cpu", "eager")
    crop = templates.FolderTemplate.from_dataset(tiny_dataset).first_still().crop(0)
    feats = rng.normal(size=(40, utils.FEAT_DIM)).astype(np.float32)
    wins = np.stack([media_io.feature_window(feats, j) for j in range(40)])
    calls, run = [], model.runner
    model.runner = lambda img, audio: calls.append(len(img)) or run(img, audio)

    def render(stills):
        calls.clear()
        return np.concatenate([model.paint([crop], [geometry.inner(crop)], wins[j:j + 1], 1.4, stills) for j in range(40)])
    plain = render(None)
    assert sum(calls) == 80                                       # two passes a frame
    cached = render(StillCache())
    assert np.array_equal(cached, plain)                          # the same frames
    assert sum(calls) == 40 + 16    # one a frame, and a silent pass for each window with frames outside the audio (8 + 7) and one for the rest


def test_fit_run_stores_a_fitted_guidance_in_both_checkpoints(tail_dataset, tmp_path, monkeypatch):
    ds, n = tail_dataset
    monkeypatch.setattr(guidance_fit, "MIN_FRAMES", 10)          # the 6 s clip's 15-frame tail, for speed
    out = tmp_path / "run"
    random_light_checkpoint(out / "last.pth")
    (out / "best.pth").write_bytes((out / "last.pth").read_bytes())
    lines = []
    guidance_fit.fit_run(out, ds, 0.1, log=lines.append)
    fits = [utils.load_checkpoint(out / f) for f in ("last.pth", "best.pth")]
    assert fits[0]["guidance"] == fits[1]["guidance"] and 1.0 <= fits[0]["guidance"] <= GUIDANCE
    assert fits[0]["guidance_fit"]["frames"] == 15 and set(fits[0]["guidance_fit"]["widths"]) == {str(g) for g in guidance_fit.GRID}
    assert len(lines) == 2 and all("opening width ratio on 15 held-out frames" in s for s in lines)
    photo = fits[0]["guidance_fit"]["photo"]
    assert fits[0]["guidance_photo"] == photo["value"] and 1.0 <= photo["value"] <= max(guidance_fit.PHOTO_GRID)
    assert set(photo["widths"]) == {str(g) for g in guidance_fit.PHOTO_GRID} and photo["still"] in range(n - 15, n)
    assert all("for a photo" in s for s in lines)
    model = inf.LipSyncModel(out / "best.pth", "cpu", "eager")
    assert model.guidance == fits[0]["guidance"] and model.guidance_photo == photo["value"]


def test_fit_run_logs_a_fit_it_cannot_make_and_keeps_the_checkpoint(tail_dataset, tmp_path, monkeypatch):
    import landmarks
    ds, n = tail_dataset
    monkeypatch.setattr(guidance_fit, "MIN_FRAMES", 10)

    def no_model(*a, **k):
        raise landmarks.LandmarkError("dlib backend needs its model: pip install face-recognition-models")
    monkeypatch.setattr(landmarks, "make_detector", no_model)
    path = random_light_checkpoint(tmp_path / "run" / "last.pth")
    before, lines = path.read_bytes(), []
    guidance_fit.fit_run(path.parent, ds, 0.1, log=lines.append)
    assert path.read_bytes() == before and len(lines) == 1
    assert "guidance not fitted (dlib backend needs its model" in lines[0] and "default 1.25 applies" in lines[0]


def test_evaluate_paints_its_photo_pass_with_the_photo_guidance(tmp_path, tiny_dataset):
    import evaluate as ev
    path = random_light_checkpoint(tmp_path / "ck" / "tiny" / "last.pth")
    guidance_fit.store(path, dict(value=1.1, frames=200, note="test", photo=dict(value=1.45)))
    cfg = ev.Config(name="tiny", video=str(tiny_dataset), ckpt_root=str(tmp_path / "ck"), checkpoint=str(path),
                    out_dir=str(tmp_path / "eval"), max_frames=30, id_frames=2, syncnet="off", plot=False, video_out=False)
    res = ev.main(cfg)
    assert (res["config"]["guidance"], res["config"]["guidance_photo"]) == (1.1, 1.45)
    assert 0 <= res["metrics"]["opening_width_photo"] < 5
    asked = ev.main(ev.Config(**{**vars(cfg), "guidance": 1.3, "out_dir": str(tmp_path / "eval2")}))
    assert (asked["config"]["guidance"], asked["config"]["guidance_photo"]) == (1.3, 1.3)   # --guidance: a photo's too
