"""SyncNet training (syncnet_328.py): real off-sync negatives, a held-out split that beats chance
on a learnable toy clip, features written for the generator, exact resume and clear user errors.
CPU, under a minute.

    /work/venv/bin/python -m pytest -q tests/test_syncnet.py
"""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import audio_features
import syncnet_328 as sn
import syncnet_data as sd
import syncnet_model as sm
import geometry
import media_io
import utils
from unet_328 import AudioEncoder

N_FRAMES = 200          # 8 s toy clip
TOY = dict(widths="8,8,16,16,32", face_size=(32, 32), emb_dim=32, batch_size=16, group_size=4,
           aug_variants=1, lr=3e-3, warmup_steps=5, write_features=True, seed=0)


def add_toy_landmarks(ds, open_px):
    """landmarks.npz for a toy dataset: 68 points per frame whose inner lips part by open_px [n] px
    (frame pixels, crop box = the whole 328 crop), 100 px wide: the mouth opening is open_px / 100."""
    n = len(open_px)
    lms = np.tile(np.linspace(40, 280, 68)[None, :, None], (n, 1, 2))
    lms[:, 60], lms[:, 64] = (115, 250), (215, 250)
    for top, bottom, x in ((61, 67, 140), (62, 66, 165), (63, 65, 190)):
        lms[:, top] = np.stack([np.full(n, x), 250 - open_px / 2], 1)
        lms[:, bottom] = np.stack([np.full(n, x), 250 + open_px / 2], 1)
    np.savez(ds / utils.LANDMARKS, lms=lms.astype(np.float32), crop_boxes=np.tile([[0, 0, utils.CROP, utils.CROP]], (n, 1)))


def make_toy_dataset(root, name="toy", n=N_FRAMES, seed=0):
    """A processed-looking dataset whose lower face brightens with the audio loudness: loudness
    steps every 2-5 frames, so audio shifted by >= 5 frames no longer matches the face."""
    rng = np.random.default_rng(seed)
    levels = []
    while len(levels) < n:
        levels += [0.0 if rng.random() < 0.35 else rng.uniform(0.3, 1.0)] * int(rng.integers(2, 6))
    env = np.array(levels[:n], np.float32)                               # (n,) loudness per frame
    hop = utils.SR // utils.FPS
    wav = (np.repeat(env, hop) * rng.normal(0, 0.3, n * hop) + rng.normal(0, 1e-3, n * hop)).astype(np.float32)
    crops = np.broadcast_to(rng.integers(60, 200, (1, utils.CROP, utils.CROP, 3), dtype=np.uint8),
                            (n, utils.CROP, utils.CROP, 3)).copy()
    mouth = (40 + 200 * env[:, None, None, None] + rng.normal(0, 8, (n, 1, 1, 1))).clip(0, 255)
    crops[:, 200:300, 80:250] = mouth.astype(np.uint8)                   # the mouth area, lower half
    ds = root / name
    ds.mkdir(parents=True)
    add_toy_landmarks(ds, 2 + 40 * env + rng.normal(0, 0.5, n))         # and the lips part with it
    np.save(ds / "crops.npy", crops)
    media_io.write_wav(ds / "aud.wav", wav)
    np.save(ds / "mel.npy", media_io.melspectrogram(wav))
    (ds / "meta.json").write_text(json.dumps({"name": name, "fps": utils.FPS, "frames": n,
                                              "audio_samples": len(wav), "sample_rate": utils.SR}))
    return ds


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The toy nets are tiny: one thread is as fast, and it cannot spin against other processes
    on a shared 2-core machine (with 2 threads a busy box made this file 4x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_thread):
    """One short training run on the toy clip (the expensive part, shared by the tests)."""
    root = tmp_path_factory.mktemp("sync")
    ds = make_toy_dataset(root / "data")
    cfg = sn.Config(name="toy", data_root=str(root / "data"), ckpt_root=str(root / "ckpt"),
                    max_steps=60, val_every=30, **TOY)
    return cfg, ds, root / "ckpt" / "toy", sn.main(cfg)


def test_training_writes_checkpoints_and_features(trained):
    cfg, ds, ck, result = trained
    for f in ("syncnet_best.pth", "syncnet_last.pth", "syncnet_config.json", "syncnet_log.txt"):
        assert (ck / f).is_file(), f
    last = utils.load_checkpoint(ck / "syncnet_last.pth")
    assert last["step"] == 60 and {"model", "optimizer", "config", "rng", "best_acc"} <= set(last)
    feats = np.load(ds / "aud_feat.npy")
    assert feats.shape == (N_FRAMES, utils.FEAT_DIM) and feats.dtype == np.float32
    info = json.loads((ds / "aud_feat.json").read_text())
    model, _ = sm.load_syncnet(ck / "syncnet_best.pth")
    assert info["encoder_id"] == audio_features.encoder_id(model.audio_encoder) and len(info["encoder_id"]) == 12
    assert info["source"].endswith("syncnet_best.pth") and info["num_frames"] == N_FRAMES


def test_heldout_accuracy_beats_chance(trained):
    cfg, ds, ck, result = trained
    best = utils.load_checkpoint(ck / "syncnet_best.pth")
    assert best["best_acc"] == result["best"]["acc"] > 0.6, result["best"]
    assert result["val"]["pairs"] >= 40                     # held-out in-sync + shifted pairs
    # the same metric from the public evaluation function, over the whole toy clip
    r = sn.evaluate_sync(ck / "syncnet_best.pth", ds)
    assert r["acc"] > 0.6 and abs(r["offset"]) <= 2, {k: r[k] for k in ("acc", "offset")}
    assert r["stretch_pair_acc"] > 0.7 and r["stretches"] > 20 and r["stretch_s"] == 1.0, r["stretch_pair_acc"]


def test_video_sync_check_with_own_and_unrelated_audio(trained):
    """metrics.sync_confidence, the video-level judge: the toy clip with its own audio is in sync
    at offset ~0 and passes the 1 s check; the same frames with another clip's audio do not."""
    import metrics
    cfg, ds, ck, result = trained
    net, _ = sm.load_syncnet(ck / "syncnet_best.pth")
    crops = np.load(ds / "crops.npy")[:, utils.BORDER:utils.BORDER + utils.INNER, utils.BORDER:utils.BORDER + utils.INNER]
    own = metrics.sync_confidence(net, crops, np.load(ds / "mel.npy"), "cpu")
    other_ds = make_toy_dataset(ds.parent.parent / "other", seed=11)
    other = metrics.sync_confidence(net, crops, np.load(other_ds / "mel.npy"), "cpu")
    assert abs(own["offset"]) <= 2 and own["stretch_acc"] > 0.9 and own["stretches"] > 40, own
    assert other["stretch_acc"] < 0.75 and other["conf"] < own["conf"], (other, own)


def test_stretch_accuracy_averages_out_per_window_noise():
    """A noisy scorer that is only slightly better than chance per window becomes reliable over a
    1 s stretch; one that ignores the audio stays at chance; every shift stays in the clip and is
    at least min_shift frames."""
    n, T = 400, 5
    centres = np.arange(n - T + 1) + T // 2
    noise = np.random.default_rng(0).normal(0, 2.0, (len(centres), n))      # fixed per (window, audio frame)
    seen = []

    def informed(w, f):
        seen.append(f - centres[w])
        assert f.min() >= 0 and f.max() < n
        return torch.from_numpy((f == centres[w]) + noise[w, f])

    per_window = np.mean([informed(np.array([i]), centres[[i]]) > informed(np.array([i]), centres[[i]] + 7)
                          for i in range(len(centres) - 7)])
    seen.clear()
    acc, count = sn.stretch_pair_acc(informed, len(centres), centres, n, 25, 5, 50, seed=0)
    shifts = np.concatenate([d for d in seen if d.any()])
    assert 0.55 < per_window < 0.75 and acc > 0.9 and count > 100, (per_window, acc, count)
    assert np.all(np.abs(shifts) >= 5) and np.all(np.abs(shifts) <= 50) and (shifts < 0).any() and (shifts > 0).any()
    deaf, _ = sn.stretch_pair_acc(lambda w, f: torch.from_numpy(noise[w, 0]), len(centres), centres, n, 25, 5, 50, 0)
    assert deaf == 0.0         # equal means: "in sync scores higher" never holds for a scorer that ignores audio


def test_encode_audio_equals_written_features(trained):
    cfg, ds, ck, result = trained
    enc = sm.load_syncnet(ck / "syncnet_best.pth")[0].audio_encoder
    written = np.load(ds / "aud_feat.npy")
    from_path = audio_features.encode_audio(ds / "aud.wav", enc, "cpu")
    from_wav = audio_features.encode_audio(audio_features.read_wav(ds), enc, "cpu", batch=64)
    assert from_path.shape == written.shape
    np.testing.assert_allclose(from_path, written, atol=1e-5)
    np.testing.assert_allclose(from_wav, written, atol=1e-5)


def test_negatives_are_really_shifted():
    rng = np.random.default_rng(0)
    centres = rng.integers(0, 300, 2000)
    neg = sd.shifted_frames(rng, centres, 0, 300, 5, 50)
    shift = neg - centres
    assert np.all(np.abs(shift) >= 5) and np.all(np.abs(shift) <= 50)
    assert np.all((neg >= 0) & (neg < 300))
    assert (shift < 0).any() and (shift > 0).any()           # both directions
    # training groups: every two windows of a group are 5..50 frames apart (each other's negatives)
    g = sd.group_frames(rng, 500, 4, 2, 298, 5, 50).reshape(500, 4)
    d = np.abs(g[:, :, None] - g[:, None, :])[:, ~np.eye(4, dtype=bool)]
    assert d.min() >= 5 and d.max() <= 50 and g.min() >= 2 and g.max() < 298
    # the held-out set is fixed by the seed and shifted the same way
    a, b = sd.eval_pairs(100, 200, 60, 7, 5, 50), sd.eval_pairs(100, 200, 60, 7, 5, 50)
    assert all(np.array_equal(x, y) for x, y in zip(a, b)) and len(a[0]) == 30
    assert np.all(np.abs(a[2] - a[1]) >= 5) and np.all((a[2] >= 100) & (a[2] < 200))


def test_face_downscale_matches_the_resize_convention():
    crop = np.random.default_rng(1).integers(0, 256, (utils.INNER, utils.INNER, 3), dtype=np.uint8)
    want = geometry.resize(crop[utils.INNER // 2:], (160, 80)).astype(np.float32) / 255   # INTER_AREA
    x = torch.from_numpy(crop).permute(2, 0, 1)[None].float() / 255
    got = sm.downscale_face(x, (80, 160))[0].permute(1, 2, 0).numpy()
    assert np.abs(got - want).max() <= 1 / 255 + 1e-6
    net = sm.SyncNet(sm.SYNC_WIDTHS["light"], face_size=(80, 160)).eval()
    with torch.no_grad():   # full 320 crops and prepared inputs give the same embedding
        full = torch.rand(2, 3 * net.T, 320, 320)
        assert torch.allclose(net.embed_face(full), net.embed_face(net.prepare_face(full)), atol=1e-6)




@pytest.mark.parametrize("kw", [dict(region=(32, 288, 32, 288)), dict(lower_half=True), dict(lower_half=False)])
def test_face_inputs_read_only_the_box_and_match_downscale_face(tmp_path, kw):
    """face_inputs cuts the face box out of the uint8 crops before converting: the same bytes as
    downscale_face of the whole 320 crop, for the default region, the lower half and the whole crop."""
    crops = np.random.default_rng(2).integers(0, 256, (5, utils.CROP, utils.CROP, 3), dtype=np.uint8)
    np.save(tmp_path / "crops.npy", crops)
    net = sm.SyncNet(sm.SYNC_WIDTHS["light"], face_size=(80, 80), **kw)
    got = sd.face_inputs(tmp_path / "crops.npy", net, chunk=2)
    b, n = utils.BORDER, utils.INNER
    x = torch.from_numpy(crops[:, b:b + n, b:b + n]).permute(0, 3, 1, 2).float() / 255
    want = (sm.downscale_face(x, (80, 80), net.lower_half, net.region) * 255).round().clamp(0, 255).to(torch.uint8).numpy()
    assert got.shape == (5, 3, 80, 80) and np.array_equal(got, want)
    assert sm.face_box(**kw) == (kw.get("region") or ((160 if kw["lower_half"] else 0), 320, 0, 320))
def test_threads_default_to_torchs_and_apply_to_every_stage(tmp_path, monkeypatch):
    """--threads 0 on a 2-core CPU: face inputs, training steps and features all at both cores (an
    idle 2-core EPYC steps 1.6x faster than at 1); --threads 1 applies to all of them; the caller's
    count comes back either way."""
    ds_root = tmp_path / "data"
    make_toy_dataset(ds_root, n=160, seed=3)
    seen = {}
    spy = lambda key, fn: (lambda *a, **k: (seen.setdefault(key, set()).add(torch.get_num_threads()), fn(*a, **k))[1])
    monkeypatch.setattr(sd, "face_inputs", spy("faces", sd.face_inputs))
    monkeypatch.setattr(sn, "train_step", spy("step", sn.train_step))
    monkeypatch.setattr(sn, "write_features", spy("features", sn.write_features))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        sn.main(sn.Config(**dict(TOY, name="toy", data_root=str(ds_root), ckpt_root=str(tmp_path / "ck"), max_steps=2,
                                 val_every=2, device="cpu")))
        assert seen == {"faces": {2}, "step": {2}, "features": {2}} and torch.get_num_threads() == 2
        seen.clear()
        sn.main(sn.Config(**dict(TOY, name="toy", data_root=str(ds_root), ckpt_root=str(tmp_path / "ck2"), max_steps=2,
                                 val_every=2, device="cpu", threads=1)))
        assert seen == {"faces": {1}, "step": {1}, "features": {1}} and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_stop_then_resume_is_exact(tmp_path):
    ds_root = tmp_path / "data"
    make_toy_dataset(ds_root, n=160, seed=3)
    common = dict(TOY, name="toy", data_root=str(ds_root), val_every=3, max_steps=4, batch_size=8,
                  write_features=False)
    sn.main(sn.Config(ckpt_root=str(tmp_path / "a"), **common))
    seen = []                                   # a server job asked to stop after step 2
    r = sn.main(sn.Config(ckpt_root=str(tmp_path / "b"), **common),
                progress=lambda step, total, losses: seen.append((step, total)), should_stop=lambda: len(seen) >= 2)
    assert r["stopped"] and seen == [(1, 4), (2, 4)] and not (ds_root / "toy" / "aud_feat.npy").exists()
    sn.main(sn.Config(ckpt_root=str(tmp_path / "b"), resume="auto", **common))
    a = utils.load_checkpoint(tmp_path / "a" / "toy" / "syncnet_last.pth")
    b = utils.load_checkpoint(tmp_path / "b" / "toy" / "syncnet_last.pth")
    assert a["step"] == b["step"] == 4
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k


def test_user_errors(tmp_path):
    ds_root = tmp_path / "data"
    make_toy_dataset(ds_root, n=120, seed=4)
    base = dict(TOY, data_root=str(ds_root), ckpt_root=str(tmp_path / "ck"))
    with pytest.raises(utils.UserError, match="--resume"):
        sn.main(sn.Config(name="toy", resume="last", **base))
    with pytest.raises(utils.UserError, match="process.py"):
        sn.main(sn.Config(name="never_processed", **base))
    with pytest.raises(utils.UserError, match="no trained SyncNet"):
        sn.main(sn.Config(name="toy", features_only=True, **base))
    with pytest.raises(utils.UserError, match="reference_encoder"):
        sn.main(sn.Config(name="toy", features_only=True, reference_encoder=str(tmp_path / "nope.pth"), **base))
    # from the shell: one line, exit status 2, no traceback
    r = subprocess.run([sys.executable, str(utils.REPO / "syncnet_328.py"), "--name", "never_processed",
                        "--data_root", str(ds_root)], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().startswith("error:") and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_features_from_the_reference_encoder(tmp_path):
    ds = make_toy_dataset(tmp_path / "data", n=120, seed=5)
    enc = AudioEncoder().eval()
    bare = {k[len("audio_encoder."):]: v for k, v in enc.state_dict().items()}   # SyncTalk_2D file layout
    torch.save(bare, tmp_path / "audio_visual_encoder.pth")
    sn.main(sn.Config(name="toy", data_root=str(tmp_path / "data"), ckpt_root=str(tmp_path / "ck"),
                      features_only=True, reference_encoder=str(tmp_path / "audio_visual_encoder.pth")))
    info = json.loads((ds / "aud_feat.json").read_text())
    assert info["encoder_id"] == audio_features.encoder_id(enc) and info["source"].startswith(audio_features.SOURCE_REFERENCE)
    np.testing.assert_allclose(np.load(ds / "aud_feat.npy"), audio_features.encode_audio(audio_features.read_wav(ds), enc), atol=1e-5)


def test_threshold_is_the_best_cut_between_the_two_kinds():
    rng = np.random.default_rng(2)
    lp, ln = rng.normal(1.0, 1.0, 300), rng.normal(-1.0, 1.0, 200)
    t, acc = sn.best_threshold(lp, ln)
    assert acc == pytest.approx(0.5 * ((lp > t).mean() + (ln <= t).mean()))
    # no other cut does better (brute force over a fine grid)
    grid = np.linspace(-5, 5, 2001)
    assert acc >= max(0.5 * ((lp > g).mean() + (ln <= g).mean()) for g in grid) - 1e-12
    assert -1.0 < t < 1.0 and 0.8 < acc < 0.9                # two unit Gaussians 2 apart: ~0.84
    t, acc = sn.best_threshold([3.0, 4.0], [-2.0, 1.0])      # separable: the cut lies between them
    assert acc == 1.0 and 1.0 < t < 3.0


def test_audio_input_is_k_windows_around_the_centre():
    mel = np.random.default_rng(3).uniform(-4, 4, (utils.N_MELS, 400)).astype(np.float32)
    offs = sm.audio_offsets(3, 4)
    assert offs == (-4, 0, 4) and sm.audio_offsets(1, 4) == (0,)
    x = sm.audio_input(mel, np.array([10, 50]), offs)
    assert x.shape == (2, 3, 1, utils.N_MELS, utils.MEL_WIN) and x.dtype == np.float32
    for k, o in enumerate(offs):
        np.testing.assert_array_equal(x[1, k], media_io.mel_windows(mel, [50 + o])[0])
    net = sm.SyncNet(sm.SYNC_WIDTHS["light"], T=13, face_size=(32, 32), audio_k=3).eval()
    with torch.no_grad():
        a, v = net(torch.rand(2, 39, utils.INNER, utils.INNER), torch.from_numpy(x))
        assert a.shape == v.shape == (2, sm.EMB_DIM)
        assert torch.allclose(a.norm(dim=1), torch.ones(2)) and torch.allclose(v.norm(dim=1), torch.ones(2))
        with pytest.raises(ValueError, match="SyncNet audio"):
            net.embed_audio(torch.from_numpy(x[:, :1]))       # one window for a 3-window net
        one = sm.SyncNet(sm.SYNC_WIDTHS["light"], T=5, face_size=(32, 32), audio_k=1).eval()
        w = torch.from_numpy(x[:, 1])                         # (2, 1, 80, 16): the K = 1 shape of old checkpoints
        assert torch.equal(one.embed_audio(w), one.embed_audio(w[:, None]))


def test_mel_augmentation_keeps_shape_and_range():
    mel = np.random.default_rng(4).uniform(-4, 4, (6, 3, 1, utils.N_MELS, utils.MEL_WIN)).astype(np.float32)
    a = sd.augment_mel(mel, np.random.default_rng([0, 9]), 8, 1.0)
    b = sd.augment_mel(mel, np.random.default_rng([0, 9]), 8, 1.0)
    assert a.shape == mel.shape and a.dtype == np.float32 and np.array_equal(a, b)   # a pure function of the rng
    assert a.min() >= -utils.MEL_MAX and a.max() <= utils.MEL_MAX and not np.allclose(a, mel)
    np.testing.assert_array_equal(sd.augment_mel(mel, np.random.default_rng(0), 0, 0.0), mel)   # both off: unchanged


def test_best_checkpoint_carries_its_held_out_threshold(trained):
    cfg, ds, ck, result = trained
    best = utils.load_checkpoint(ck / "syncnet_best.pth")
    model, _ = sm.load_syncnet(ck / "syncnet_best.pth")
    clip = sd.Clip(ds, model)
    train_hi, val_lo = sd.split(clip.n, cfg)
    pairs = sd.eval_pairs(val_lo, clip.n, cfg.val_pairs, cfg.seed, cfg.min_shift, cfg.max_shift, cfg.frames)
    m = sn.sync_metrics(model, clip, pairs, "cpu")
    # its plain "logit > 0" rule reproduces the accuracy it was chosen on: the threshold is in the bias
    assert m["acc"] == pytest.approx(best["best_acc"], abs=1e-6) and abs(m["threshold"]) < 1e-4


def test_checkpoints_from_before_audio_windows_still_load(tmp_path):
    args = dict(widths=sm.SYNC_WIDTHS["light"], face_size=(32, 32), T=5)     # no audio_k: one mel window
    net = sm.SyncNet(**args, audio_k=1).eval()
    utils.save_checkpoint({"model": net.state_dict(), "config": {"model_args": args}, "step": 1}, tmp_path / "old.pth")
    old, _ = sm.load_syncnet(tmp_path / "old.pth")
    assert old.audio_offsets == (0,) and old.T == 5
    mel = torch.randn(2, 1, utils.N_MELS, utils.MEL_WIN)
    with torch.no_grad():
        assert torch.equal(old.embed_audio(mel), net.embed_audio(mel))


def test_default_step_count_is_passes_over_the_clip_capped(tmp_path, monkeypatch):
    """--max_steps -1 (the default): syncnet_data.auto_length's passes over the training windows, at
    least AUTO_MIN_STEPS (a short recording's passes are too few), at most its step cap (more where it
    trains in bf16) -- a long recording trains longer than a short one; an explicit count is exact."""
    make_toy_dataset(tmp_path / "data", n=120, seed=5)
    base = dict(TOY, name="toy", data_root=str(tmp_path / "data"), val_every=1000, write_features=False, device="cpu")
    assert sn.Config().max_steps == -1 and sd.AUTO_MIN_STEPS == 2000
    monkeypatch.setattr(sd, "AUTO_MIN_STEPS", 0)              # the passes alone (the toy clip's 2000 steps would be slow)
    auto = sn.main(sn.Config(**base, ckpt_root=str(tmp_path / "a")))
    passes, cap = sd.auto_length(sn.Config(**base))
    assert (passes, cap) == (sd.AUTO_BF16 if utils.cpu_bf16() else (sd.AUTO_EPOCHS, sd.AUTO_STEPS))   # bf16 units: more
    assert sd.auto_length(sn.Config(**base, amp=False)) == (sd.AUTO_EPOCHS, sd.AUTO_STEPS)     # --no-amp: the fp32 counts
    per_epoch = auto["steps"] // passes
    assert auto["steps"] == passes * per_epoch and 0 < auto["steps"] < cap
    n = int(utils.load_meta(tmp_path / "data" / "toy")["frames"])
    monkeypatch.setattr(sd, "AUTO_MIN_STEPS", auto["steps"] + 7)  # a floor above the passes lifts them ...
    assert sd.run_length(sn.Config(**base), n) == (per_epoch, auto["steps"] + 7)
    monkeypatch.setattr(sd, "AUTO_MIN_STEPS", 10 * cap)           # ... up to the cap
    assert sd.run_length(sn.Config(**base), n) == (per_epoch, cap)
    assert sd.run_length(sn.Config(**base, epochs=2), n) == (per_epoch, 2 * per_epoch)   # --epochs: no floor
    assert sn.main(sn.Config(**base, ckpt_root=str(tmp_path / "b"), epochs=2))["steps"] == 2 * per_epoch
    assert sn.main(sn.Config(**base, ckpt_root=str(tmp_path / "c"), max_steps=3))["steps"] == 3


def test_opening_head_learns_the_mouth_opening_from_the_audio(tmp_path):
    """--opening_weight: the clip's targets are the robust z of its landmarks' opening; the head
    (on the centre window's 512-d vector, the generator's feature) learns to read it off the audio,
    the checkpoint records it, and features are still the plain encoder's."""
    ds = make_toy_dataset(tmp_path / "data")                              # its lips part with the loudness
    lm = np.load(ds / utils.LANDMARKS)["lms"]
    open_px = lm[:, 66, 1] - lm[:, 62, 1]
    cfg = sn.Config(name="toy", data_root=str(tmp_path / "data"), ckpt_root=str(tmp_path / "ckpt"),
                    max_steps=60, val_every=30, opening_weight=1.0, audio_source="mel", **TOY)
    model = sm.SyncNet(**sn.model_args_from(cfg))
    clip = sd.Clip(ds, model, opening=True)
    o = open_px / 100
    z = (o - np.median(o)) / (1.4826 * np.median(np.abs(o - np.median(o))))
    np.testing.assert_allclose(clip.opening, np.clip(z, -3, 3), rtol=1e-4, atol=1e-4)
    assert sd.Clip(ds, model).opening is None
    assert sn.model_args_from(sn.Config(opening_weight=0, audio_source="mel"))["opening_head"] is False
    batch = sd.train_batch(clip, 3, cfg, 150)
    np.testing.assert_array_equal(batch[4].numpy(), clip.opening[batch[2].numpy()])   # the centres' targets
    sn.main(cfg)
    best, ck = sm.load_syncnet(tmp_path / "ckpt" / "toy" / "syncnet_best.pth")
    assert ck["config"]["model_args"]["opening_head"] is True and best.opening_head is not None
    mel = torch.from_numpy(media_io.mel_windows(media_io.melspectrogram(media_io.load_audio(ds / "aud.wav")), np.arange(N_FRAMES)))
    with torch.no_grad():
        emb, feat = best.embed_audio(mel, with_feature=True)
        pred = best.opening_head(feat).squeeze(1).numpy()
    assert torch.equal(emb, best.embed_audio(mel))
    np.testing.assert_allclose(feat.numpy(), np.load(ds / "aud_feat.npy"), rtol=1e-4, atol=1e-4)   # the written features
    assert np.corrcoef(pred, o)[0, 1] > 0.6, np.corrcoef(pred, o)[0, 1]
    with pytest.raises(utils.UserError, match="--opening_weight"):
        sn.model_args_from(sn.Config(opening_weight=-0.5))
    # a checkpoint from before the setting existed resumes without the head, whatever the default
    ck["config"].pop("opening_weight")
    ck["config"].pop("audio_source")            # nor a source: those ran on the mel, whatever auto would pick now
    (tmp_path / "old" / "toy").mkdir(parents=True)
    torch.save(ck, tmp_path / "old" / "toy" / utils.SYNCNET_LAST)
    kept, _ = sn.resume_point(sn.Config(**{**vars(cfg), "resume": "auto", "audio_source": "speech"}),
                              tmp_path / "old" / "toy" / utils.SYNCNET_LAST, "cpu")
    assert kept.opening_weight == 0.0 and kept.audio_source == "mel"


def test_opening_weight_auto_follows_the_run_length(tmp_path):
    """--opening_weight -1 (the default): the head on for runs of OPENING_AUTO[1] steps or more
    (by --max_steps, or by --epochs over this clip), off for shorter ones; explicit weights stay."""
    ds = make_toy_dataset(tmp_path / "data")
    base = dict(name="toy", data_root=str(tmp_path / "data"), **TOY)
    assert sn.Config().opening_weight == -1
    on_from = sd.OPENING_AUTO[1]
    assert sd.resolve_opening(sn.Config(**base, max_steps=on_from), ds).opening_weight == sd.OPENING_AUTO[0] == 1.0
    assert sd.resolve_opening(sn.Config(**base, max_steps=on_from - 1), ds).opening_weight == 0.0
    per_pass = sd.run_length(sn.Config(**base), N_FRAMES)[0]
    passes = -(-on_from // per_pass)
    assert sd.resolve_opening(sn.Config(**base, max_steps=0, epochs=passes), ds).opening_weight == 1.0
    assert sd.resolve_opening(sn.Config(**base, max_steps=0, epochs=passes - 1), ds).opening_weight == 0.0
    assert sd.resolve_opening(sn.Config(**base, max_steps=60, opening_weight=0.5), ds).opening_weight == 0.5
    assert sd.resolve_opening(sn.Config(**base, max_steps=on_from, opening_weight=0), ds).opening_weight == 0.0
    assert sn.model_args_from(sn.Config(**base, audio_source="mel"))["opening_head"] is False   # unresolved: no head yet


def test_audio_source_auto_follows_the_recording_length(tmp_path, monkeypatch, capsys):
    """--audio_source auto (the default): speech for recordings of SPEECH_AUTO_S seconds or more,
    mel for shorter ones, without the speech wheel, or with a mel --reference_encoder; explicit
    sources stay."""
    ds = make_toy_dataset(tmp_path / "data")
    base = dict(name="toy", data_root=str(tmp_path / "data"), **TOY)
    seconds = N_FRAMES / utils.FPS
    assert sn.Config().audio_source == "auto" and seconds < sd.SPEECH_AUTO_S == 55
    assert sd.resolve_source(sn.Config(**base), ds).audio_source == "mel"            # a short clip
    monkeypatch.setattr(sd, "SPEECH_AUTO_S", seconds)
    assert sd.resolve_source(sn.Config(**base), ds).audio_source == "speech"         # long enough
    assert sd.resolve_source(sn.Config(**base, audio_source="mel"), ds).audio_source == "mel"
    assert sd.resolve_source(sn.Config(**base, audio_source="both"), ds).audio_source == "both"
    assert sd.resolve_source(sn.Config(**base, reference_encoder="ref.pth"), ds).audio_source == "mel"
    monkeypatch.setattr(audio_features, "speech_available", lambda: False)
    capsys.readouterr()
    assert sd.resolve_source(sn.Config(**base), ds).audio_source == "mel"
    assert "speech source's wheel is not installed" in capsys.readouterr().out
    monkeypatch.setattr(sd, "SPEECH_AUTO_S", seconds + 0.04)                         # one frame short: no note
    assert sd.resolve_source(sn.Config(**base), ds).audio_source == "mel" and capsys.readouterr().out == ""
    with pytest.raises(utils.UserError, match="--audio_source loud: use mel, speech, both or auto"):
        sn.model_args_from(sn.Config(**base, audio_source="loud"))


def test_feature_variants_feed_the_generator_other_voices(trained):
    """--features_only --feature_variants 2: the features of two augmented copies of the audio (another
    pitch and formants, gain, noise) by the same encoder, frame-aligned with the clean ones; a
    LipDataset with voice_aug 1 reads its audio windows from them, and refuses copies made by
    another encoder."""
    import dataclasses
    from datasets import LipDataset
    cfg, ds, ck, result = trained
    sn.main(dataclasses.replace(cfg, features_only=True, feature_variants=2))
    z = np.load(ds / utils.AUD_FEAT_AUG)
    clean = np.load(ds / "aud_feat.npy")
    assert z["feats"].shape == (2, N_FRAMES, utils.FEAT_DIM) and z["feats"].dtype == np.float16
    assert str(z["encoder_id"]) == json.loads((ds / "aud_feat.json").read_text())["encoder_id"]
    for v in z["feats"].astype(np.float32):      # the same loudness steps, heard differently
        assert 0.01 < np.abs(v - clean).mean() / np.abs(clean).mean() < 1.0
        r = np.corrcoef(v.mean(1), clean.mean(1))[0, 1]
        assert r > 0.5, r
    plain, aug = LipDataset(ds), LipDataset(ds, voice_aug=1.0)
    k = 100
    a, b = plain[k]["audio"].numpy(), aug[k]["audio"].numpy()
    assert np.allclose(a, media_io.feature_window(clean, k)) and not np.allclose(a, b)
    assert any(np.allclose(b, media_io.feature_window(v, k)) for v in z["feats"])
    np.savez(ds / utils.AUD_FEAT_AUG, feats=z["feats"], encoder_id="000000000000")
    with pytest.raises(utils.UserError, match="--feature_variants"):
        LipDataset(ds, voice_aug=0.5)
