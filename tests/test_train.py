"""Behaviour of generator training: the sample a step sees, the held-out split, the checkpoint a
run leaves, exact resume, the one-line errors, and a 2-process torchrun on CPU. Built on a small
synthetic dataset folder written here (synthetic.write_fake_dataset), so it does not wait for
process.py or SyncNet training. CPU, about a minute.

    /work/venv/bin/python -m pytest -q tests/test_train.py
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import audio_features
import datasets
import geometry
import losses
import media_io
import syncnet_model
import synthetic
import templates
import train_328
import utils
from unet_328 import WIDTHS, AudioEncoder, UNet328

ROOT = Path(__file__).resolve().parents[1]
TINY = "4,4,8,8,16,16"     # a U-Net small enough for many CPU steps; same code paths as light


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: a second thread costs more in synchronisation than it saves (and far more on
    a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    synthetic.write_fake_dataset(root / "fake", n=40)
    return root


def config(data_root, out, **kw):
    base = dict(name="fake", data_root=str(data_root), out_dir=str(out), widths=TINY, batch_size=2,
                device="cpu", num_workers=0, max_steps=2, log_every=1, val_every=1000, val_frames=2,
                preview_every=1000, save_every=1000, warmup_steps=2)
    return train_328.Config(**{**base, **kw})


def fake_syncnet(path):
    """A random light SyncNet checkpoint, so the sync-loss path runs (3 mel windows); clips of T=2 frames keep it cheap."""
    torch.manual_seed(1)
    args = dict(widths=syncnet_model.SYNC_WIDTHS["light"], face_size=(80, 160), T=2, audio_k=3)
    net = syncnet_model.SyncNet(**args)
    utils.save_checkpoint({"model": net.state_dict(), "config": {"model_args": args}, "step": 0}, path)


@pytest.fixture(scope="module")
def light_run(data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("ck") / "fake"
    res = train_328.main(config(data_root, out, widths="light"))
    return out, res


# ---------------------------------------------------------------------------------------------- data
def test_bench_train_reads_presets_and_custom_widths():
    import bench_train
    assert bench_train.width_list("narrow, 8,16,32,96,192,384,light") == ["narrow", "8,16,32,96,192,384", "light"]
    for bad in ("narrow,8,16", "8,16,32,64,128,light"):
        with pytest.raises(utils.UserError, match="six integers"):
            bench_train.width_list(bad)


def test_split_is_a_contiguous_tail():
    tr, va = datasets.split_frames(500, 0.1)
    assert len(va) == 50 and va[0] == tr[-1] + 1 and va[-1] == 499
    tr, va = datasets.split_frames(40, 0.1)
    assert list(va) == [36, 37, 38, 39] and list(tr) == list(range(36))
    assert len(datasets.split_frames(40, 0.0)[1]) == 0


def test_sample_shapes_mask_and_reference(data_root):
    ds = datasets.LipDataset(data_root / "fake", frames=range(30), seed=3)
    s = ds[7]
    assert s["ref"].shape == s["masked"].shape == s["target"].shape == (3, 320, 320)
    assert s["audio"].shape == (32, 16, 16) and s["index"] == 7
    assert 0 <= s["target"].min() and s["target"].max() <= 1
    x0, y0, x1, y1 = utils.MASK_RECT
    assert s["masked"][:, y0:y1, x0:x1].abs().max() == 0                       # the lower face is hidden
    assert torch.equal(s["masked"][:, :y0], s["target"][:, :y0])                # the rest is the truth
    crop = np.load(data_root / "fake" / "crops.npy", mmap_mode="r")
    assert torch.equal(s["target"], torch.from_numpy(np.ascontiguousarray(geometry.inner(crop[7]))).permute(2, 0, 1) / 255)
    assert torch.equal(s["audio"], torch.from_numpy(media_io.feature_window(np.load(data_root / "fake" / "aud_feat.npy"), 7)))
    for k in range(0, len(ds), 3):   # the reference is never the frame itself nor a near neighbour
        i, j = ds[k]["index"], ds[k]["ref_index"]
        assert abs(i - j) > utils.REF_GAP and j < 30


def test_samples_are_a_pure_function_of_seed_epoch_index(data_root):
    a = datasets.LipDataset(data_root / "fake", seed=0, augment=True)
    b = datasets.LipDataset(data_root / "fake", seed=0, augment=True)
    for k in (0, 5, 17):
        sa, sb = a[(k, 2)], b[(k, 2)]
        assert sa["ref_index"] == sb["ref_index"] and torch.equal(sa["target"], sb["target"])
    x0, y0, x1, y1 = utils.MASK_RECT                                             # augmented: still black as at inference
    assert sa["masked"][:, y0:y1, x0:x1].abs().max() == 0 and torch.equal(sa["masked"][:, :y0], sa["target"][:, :y0])
    refs = lambda d, e: [d[(k, e)]["ref_index"] for k in range(0, len(d), 4)]
    assert refs(a, 0) != refs(a, 1)                                              # new references each epoch
    b.set_epoch(1)
    assert [b[k]["ref_index"] for k in range(0, len(b), 4)] == refs(a, 1)
    sampler = datasets.StepBatches(36, 4, seed=5)
    assert sampler.batch(12) == datasets.StepBatches(36, 4, seed=5, start_step=12).batch(12)
    epoch0 = sorted(k for s in range(sampler.per_epoch) for k, _ in sampler.batch(s))
    assert epoch0 == list(range(36))                                             # an epoch sees every item once


def test_context_swap_takes_the_surroundings_of_the_hole_from_another_moment(data_root, monkeypatch):
    crop = np.load(data_root / "fake" / "crops.npy", mmap_mode="r")
    plain = datasets.LipDataset(data_root / "fake", frames=range(36), seed=3)
    swap = datasets.LipDataset(data_root / "fake", frames=range(36), seed=3, context_swap=1.0)
    hole = geometry.rect_mask()
    for k in (2, 17, 33):
        s, p = swap[k], plain[k]
        assert torch.equal(s["target"][:, hole], p["target"][:, hole])           # the mouth is frame k's
        assert torch.equal(s["masked"][:, ~hole], s["target"][:, ~hole])         # the input shows what the target does
        assert s["masked"][:, hole].abs().max() == 0
        around = s["target"][:, ~hole]           # the surroundings: one other frame's, 4-25 frames away, inside the set
        lenders = [c for c in range(36) if torch.equal(around, torch.from_numpy(
            np.ascontiguousarray(geometry.inner(crop[c]))).permute(2, 0, 1)[:, ~hole] / 255)]
        assert lenders and all(datasets.CONTEXT_GAP[0] <= abs(c - k) <= datasets.CONTEXT_GAP[1] for c in lenders)
        assert set(lenders) & set(swap.partners[k].tolist())      # one of the frames whose head sits nearest
        assert s["index"] == k and torch.equal(s["audio"], p["audio"])
    assert plain.swap_note() == "" and "context swap 1 of the samples of the 100% of frames" in swap.swap_note()
    auto = datasets.LipDataset(data_root / "fake", frames=range(36), seed=3, context_swap=-1)   # 36 frames: too short
    assert auto.context_swap == 0 and auto.partners is None and "no context swap (auto" in auto.swap_note()
    assert train_328.Config().context_swap == -1
    monkeypatch.setattr(utils, "LONG_RECORDING_S", 36 / utils.FPS)                          # a minute long, as it were
    auto = datasets.LipDataset(data_root / "fake", frames=range(36), seed=3, context_swap=-1)
    assert auto.context_swap == datasets.CONTEXT_AUTO == 0.25 and "context swap 0.25" in auto.swap_note()
    assert torch.equal(datasets.LipDataset(data_root / "fake", frames=range(36), seed=3, context_swap=0.0)[5]["target"],
                       plain[5]["target"])


def test_context_partners_are_the_nearby_frames_where_the_head_sits_as_it_does():
    n = 60
    lm = np.zeros((n, 68, 2))
    sway = 10 * np.sin(np.arange(n) / 3.0)                   # the head sways left and right
    lm[:, :, 0] += sway[:, None]
    lm[:, 48:68, 1] += 5 * (np.arange(n) % 7)[:, None]      # the mouth does something else, and must not matter
    frames = np.arange(0, 50)                                # frames 50.. are held out: never lenders
    part = datasets.context_partners(lm, frames, gap=(4, 25), k=2)
    assert part.shape == (n, 2) and (part[50:] == -1).all()
    for i in (0, 20, 49):
        cand = [c for c in frames if 4 <= abs(c - i) <= 25]
        want = sorted(cand, key=lambda c: abs(sway[c] - sway[i]))[:2]
        assert sorted(part[i].tolist()) == sorted(want)
        assert all(abs(sway[c] - sway[i]) < 1.5 for c in part[i])   # a random neighbour is up to 20 px off
    one = datasets.context_partners(lm, [0, 1, 2], gap=(4, 25), k=2)   # no frame far enough: none
    assert (one == -1).all()
    tight = datasets.context_partners(lm, frames, gap=(4, 25), k=2, fit=0.5)   # only heads within 0.5 px
    for i in frames:
        assert all(abs(sway[c] - sway[i]) <= 0.5 + 1e-9 for c in tight[i] if c >= 0)
    assert (tight[:50] == -1).any() and (tight[:50] >= 0).any()


def test_clip_samples_feed_syncnet(data_root):
    ds = datasets.LipDataset(data_root / "fake", frames=range(36), clip=5)
    assert len(ds) == 32                                                         # clips stay inside the frames
    s = ds[3]
    assert s["masked"].shape == s["target"].shape == (5, 3, 320, 320) and s["audio"].shape == (5, 32, 16, 16)
    assert s["mel"].shape == (1, 1, 80, 16) and abs(s["ref_index"] - 3) > utils.REF_GAP
    mel = np.load(data_root / "fake" / "mel.npy")   # the 0.2 s window centred on the middle frame, as SyncNet learnt
    assert torch.equal(s["mel"][0], torch.from_numpy(media_io.mel_windows(mel, [3 + 5 // 2])[0]))
    # a 3-window SyncNet gets its 3 windows around the clip's middle frame
    s = datasets.LipDataset(data_root / "fake", frames=range(36), clip=5, mel_offsets=(-4, 0, 4))[3]
    assert s["mel"].shape == (3, 1, 80, 16)
    assert torch.equal(s["mel"][2, 0], torch.from_numpy(media_io.mel_windows(mel, [3 + 5 // 2 + 4])[0, 0]))
    assert s["mouth"].shape == (5, 4)


def test_mouth_boxes_follow_the_landmarks(data_root):
    ds = datasets.LipDataset(data_root / "fake", frames=range(36))
    x0, y0, x1, y1 = ds[0]["mouth"].tolist()
    # the fake mouth is an ellipse centred at (164, 240) of the 328 crop, 60 px half-width: (160, 236) in the 320 crop
    assert x0 < 160 - 60 < 160 + 60 < x1 and y0 < 236 < y1 and 0 <= x0 and x1 <= utils.INNER
    heights = [ds[k]["mouth"][3] - ds[k]["mouth"][1] for k in range(len(ds))]
    assert max(heights) - min(heights) > 30                  # it opens and closes with the fake audio
    openings = np.array([float(ds[k]["opening"]) for k in range(len(ds))])   # what the opening head learns
    assert np.corrcoef(openings, heights)[0, 1] > 0.9 and openings.min() >= 0 and openings.max() > 0.2


def test_unprocessed_dataset_is_a_user_error(tmp_path, data_root):
    (tmp_path / "raw").mkdir()
    with pytest.raises(utils.UserError, match="process.py"):
        datasets.LipDataset(tmp_path / "raw")
    with pytest.raises(utils.UserError, match="process.py"):
        train_328.main(config(tmp_path, tmp_path / "out", name="raw"))
    nofeat = tmp_path / "nofeat"
    nofeat.mkdir()
    for f in ("crops.npy", "meta.json", "landmarks.npz"):
        (nofeat / f).symlink_to(data_root / "fake" / f)
    with pytest.raises(utils.UserError, match="syncnet_328.py --name nofeat"):
        train_328.main(config(tmp_path, tmp_path / "out", name="nofeat"))
    with pytest.raises(utils.UserError, match="audio encoder"):
        datasets.LipDataset(data_root / "fake", expected_encoder_id="0123456789ab")
    stale = tmp_path / "stale"                  # the encoder file changed after the features were made
    stale.mkdir()
    for f in ("crops.npy", "meta.json", "landmarks.npz", "aud_feat.npy", "aud_feat.json", "mel.npy"):
        (stale / f).symlink_to(data_root / "fake" / f)
    (stale / "aud_feat.json").unlink()
    info = datasets.read_feature_info(data_root / "fake")
    (stale / "aud_feat.json").write_text(json.dumps(dict(info, source=str(tmp_path / "other.pth"))))
    utils.save_checkpoint({"model": AudioEncoder().state_dict()}, tmp_path / "other.pth")
    with pytest.raises(utils.UserError, match="syncnet_328.py --name stale"):
        train_328.main(config(tmp_path, tmp_path / "out", name="stale"))


# ---------------------------------------------------------------------------------------------- training
def test_two_steps_leave_a_complete_checkpoint(light_run):
    out, res = light_run
    assert res["step"] == 2 and not res["stopped"] and set(res["losses"]) >= {"l1", "total"}
    ck = utils.load_checkpoint(out / "last.pth")
    assert ck["step"] == 2 and ck["config"]["widths"] == list(WIDTHS["light"])
    assert {"model", "optimizer", "scaler", "epoch", "rng", "best_loss", "audio_encoder", "encoder_id",
            "format_version"} <= set(ck)
    enc = AudioEncoder()
    enc.load_state_dict(ck["audio_encoder"])                                     # inference needs only this file
    assert ck["encoder_id"] == audio_features.encoder_id(enc)
    assert (out / "config.json").is_file() and (out / "best.pth").is_file()
    assert (out / "previews" / "step_000002.png").is_file()
    assert ck["config"]["mask"] == "under_nose"                                  # the default: the lower face only
    mask = datasets.generator_mask(ck["config"]["dataset"],
                                   range(ck["config"]["train_frames"]), "under_nose")
    assert torch.equal(ck["mask"], torch.from_numpy(mask))                      # inference masks exactly this area
    assert "guidance" not in ck and "the default guidance" in (out / "log.txt").read_text()   # a 4-frame tail: not fitted


def test_jaw_mask_samples_hide_the_lower_face_only(data_root):
    mask = datasets.generator_mask(data_root / "fake", range(36), "jaw")
    assert datasets.generator_mask(data_root / "fake", range(36), "rect") is None
    s = datasets.LipDataset(data_root / "fake", frames=range(36), mask=mask)[7]
    m = torch.from_numpy(mask)
    assert s["masked"][:, m].abs().max() == 0 and torch.equal(s["masked"][:, ~m], s["target"][:, ~m])
    with np.load(data_root / "fake" / "landmarks.npz") as z:                   # every lip point of every frame is repainted
        lips = geometry.to_crop_coords(z["lms"], z["crop_boxes"])[:, utils.MOUTH].reshape(-1, 2).round().astype(int)
    assert m[lips[:, 1], lips[:, 0]].all()
    low = datasets.generator_mask(data_root / "fake", range(36), "under_nose")   # not grown over the nose: a smaller area
    assert low[lips[:, 1], lips[:, 0]].all() and not (low & ~mask).any() and low.sum() < mask.sum()
    with pytest.raises(utils.UserError, match="--mask"):
        datasets.generator_mask(data_root / "fake", range(36), "oval")


def test_closed_reference_pool_matches_inference_choice(data_root):
    frames = np.arange(36)
    assert np.array_equal(datasets.reference_pool(data_root / "fake", frames, "random"), frames)
    pool = datasets.reference_pool(data_root / "fake", frames, "closed")
    with np.load(data_root / "fake" / "landmarks.npz") as z:
        score = templates.closed_score(z["lms"][:36], z["crop_boxes"][:36])
    assert len(pool) == 4 and score[pool].max() <= np.delete(score, pool).min()      # the most closed 10%
    assert int(np.argmin(score)) in pool                                             # inference's default reference
    s = datasets.LipDataset(data_root / "fake", frames=frames, ref_frames=pool)
    assert {s[k]["ref_index"] for k in range(36)} <= set(pool.tolist())
    with pytest.raises(utils.UserError, match="--reference"):
        datasets.reference_pool(data_root / "fake", frames, "open")


def test_audio_reference_bank(data_root, tmp_path):
    """--reference audio: the bank covers the sounds (a frame of each cluster of keys); a sample's
    reference is one of the BANK_TOPK bank frames that sound most like it (outside the gap); the
    checkpoint carries the bank's crops and keys for inference --reference audio."""
    rng = np.random.default_rng(0)
    keys = np.repeat(np.eye(3, 512, dtype=np.float32), 10, axis=0) + rng.normal(0, 0.01, (30, 512)).astype(np.float32)
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    assert sorted(int(b) // 10 for b in datasets.audio_bank(keys, size=3)) == [0, 1, 2]
    assert np.array_equal(datasets.audio_bank(keys, size=40), np.arange(30))
    frames = np.arange(36)
    pool = datasets.reference_pool(data_root / "fake", frames, "audio")
    assert np.array_equal(pool, frames)                                   # fewer frames than BANK_SIZE: all of them
    s = datasets.LipDataset(data_root / "fake", frames=frames, ref_frames=pool, ref_by_audio=True)
    k = datasets.frame_keys(s.feats, pool)
    assert np.allclose(np.linalg.norm(k, axis=1), 1, atol=1e-5)
    for i in (3, 17, 30):
        sim = k @ k[i]
        sim[max(0, i - datasets.REF_GAP):i + datasets.REF_GAP + 1] = -np.inf
        assert s[i]["ref_index"] in set(np.argsort(-sim)[:datasets.BANK_TOPK].tolist())
    picks = {s[(17, e)]["ref_index"] for e in range(12)}                  # more than one of them over epochs
    assert len(picks) > 1
    train_328.main(config(data_root, tmp_path / "out", reference="audio"))
    bank = utils.load_checkpoint(tmp_path / "out" / "last.pth")["ref_bank"]
    train = np.arange(utils.load_checkpoint(tmp_path / "out" / "last.pth")["config"]["train_frames"])
    assert np.array_equal(bank["index"].numpy(), train)
    crops = utils.load_npy(data_root / "fake" / utils.CROPS)
    assert np.array_equal(bank["crops"][5].numpy(), geometry.inner(crops[train[5]]))
    assert np.allclose(bank["keys"].numpy(), datasets.frame_keys(s.feats, train))


def test_loader_workers_default_to_none_on_cpu(data_root, tmp_path, monkeypatch):
    # worker processes compete with the training threads for a CPU's cores (RESULTS.md round 22): in-process there
    seen, real = [], torch.utils.data.DataLoader
    monkeypatch.setattr(torch.utils.data, "DataLoader", lambda *a, **kw: seen.append(kw.get("num_workers", 0)) or real(*a, **kw))
    train_328.main(config(data_root, tmp_path / "fake", num_workers=train_328.Config.num_workers, fit_guidance=False))
    assert train_328.Config.num_workers == -1 and seen and set(seen) == {0}
    assert train_328.loader_workers(-1, torch.device("cuda")) == 2 and train_328.loader_workers(-1, torch.device("cuda"), gpu=6) == 6
    assert train_328.loader_workers(3, torch.device("cpu")) == 3


def test_resume_is_exact(data_root, tmp_path):
    """4 steps straight == 2 steps, stop, resume 2 steps: same losses, same weights and weight
    average (sync loss, opening head and --ema on)."""
    def run(out, stop=None, **kw):
        seen = {}
        res = train_328.main(config(data_root, out, max_steps=4, sync_weight=0.1, sync_clips=1, sync_ramp=1,
                                    opening_weight=0.5, ema=0.5, **kw),
                             progress=lambda s, n, losses: seen.__setitem__(s, losses), should_stop=stop)
        return seen, res
    for d in ("a", "b"):
        fake_syncnet(tmp_path / d / "syncnet_best.pth")
    straight, _ = run(tmp_path / "a")
    assert "sync" in straight[1] and "opening" in straight[1]
    calls = iter(range(100))
    _, first = run(tmp_path / "b", stop=lambda: next(calls) >= 1)              # "killed" after step 2
    assert first["stopped"] and first["step"] == 2
    assert utils.load_checkpoint(tmp_path / "b" / "last.pth")["step"] == 2
    resumed, res = run(tmp_path / "b", resume="auto")
    assert sorted(resumed) == [3, 4] and res["step"] == 4
    for s in (3, 4):
        for k, v in straight[s].items():
            assert abs(resumed[s][k] - v) <= 1e-6, (s, k, v, resumed[s][k])
    wa = utils.load_checkpoint(tmp_path / "a" / "last.pth")["model"]
    wb = utils.load_checkpoint(tmp_path / "b" / "last.pth")["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    ta = utils.load_checkpoint(tmp_path / "a" / "last.pth")["train_model"]
    tb = utils.load_checkpoint(tmp_path / "b" / "last.pth")["train_model"]
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    assert any(not torch.equal(ta[k], wa[k]) for k in wa if wa[k].is_floating_point())   # "model" is the average
    ha = utils.load_checkpoint(tmp_path / "a" / "last.pth")["opening_head"]
    hb = utils.load_checkpoint(tmp_path / "b" / "last.pth")["opening_head"]
    assert set(ha) == {"fc.weight", "fc.bias", "mean", "std"} and all(torch.equal(ha[k], hb[k]) for k in ha)


def test_auto_perceptual_is_luma_msssim_and_a_resume_keeps_the_checkpoints_kind(data_root, tmp_path):
    """--perceptual auto (the default) trains a new run on the luma's MS-SSIM (VGG only with its
    weights on disk); resumed with the default, a run started on RGB MS-SSIM goes on with it."""
    kind = lambda out: json.loads((out / "config.json").read_text())["perceptual"]
    vgg = (Path(torch.hub.get_dir()) / "checkpoints" / losses.VGG_FILE).is_file()
    train_328.main(config(data_root, tmp_path / "new", max_steps=1))
    assert kind(tmp_path / "new") == ("vgg" if vgg else "msssim_y")
    train_328.main(config(data_root, tmp_path / "old", max_steps=1, perceptual="msssim"))
    res = train_328.main(config(data_root, tmp_path / "old", max_steps=2, resume="auto"))
    assert res["step"] == 2 and kind(tmp_path / "old") == "msssim"
    assert utils.load_checkpoint(tmp_path / "old" / "last.pth")["config"]["perceptual"] == "msssim"


def test_time_based_saves_leave_a_resumable_checkpoint_early(data_root, tmp_path):
    """save_minutes: a job killed long before save_every still finds a last.pth (the server's case)."""
    seen = []
    out = tmp_path / "t"
    train_328.main(config(data_root, out, max_steps=3, save_every=1000, save_minutes=1e-6),
                   progress=lambda s, n, losses: seen.append((s, (out / "last.pth").is_file() and
                                                              utils.load_checkpoint(out / "last.pth")["step"])))
    assert seen[0] == (1, False) and seen[1] == (2, 1)        # saved right after step 1, before save_every
    seen.clear()
    train_328.main(config(data_root, tmp_path / "u", max_steps=3, save_every=1000),
                   progress=lambda s, n, losses: seen.append((tmp_path / "u" / "last.pth").is_file()))
    assert seen == [False, False, False]                       # off: only at the end


def test_resume_errors_are_one_line(light_run, data_root, tmp_path):
    out, _ = light_run
    with pytest.raises(utils.UserError, match="checkpoint not found"):
        train_328.main(config(data_root, tmp_path / "x", resume=str(tmp_path / "missing.pth")))
    with pytest.raises(utils.UserError, match="widths"):
        train_328.main(config(data_root, tmp_path / "x", resume=str(out / "last.pth"), widths=TINY))
    ck = utils.load_checkpoint(out / "last.pth")
    ck["model"] = {k: v for k, v in ck["model"].items() if not k.startswith("outc")}
    utils.save_checkpoint(ck, tmp_path / "broken.pth")
    with pytest.raises(utils.UserError, match="does not fit"):
        train_328.main(config(data_root, tmp_path / "x", resume=str(tmp_path / "broken.pth"), widths="light"))
    stem, film = (utils.load_checkpoint(out / "last.pth")["config"][k] for k in ("stem", "audio_film"))
    other = "conv" if stem == "s2d" else "s2d"
    res = train_328.main(config(data_root, tmp_path / "y", resume=str(out / "last.pth"), widths="light", mask="rect",
                                stem=other, audio_film=not film, max_steps=3))   # a resume keeps the checkpoint's mask and U-Net
    ck = utils.load_checkpoint(tmp_path / "y" / "last.pth")
    assert res["step"] == 3 and ck["config"]["mask"] == "under_nose" and ck["mask"] is not None and ck["config"]["stem"] == stem
    assert ck["config"]["audio_film"] == film and any(k.startswith("film.") for k in ck["model"]) == film
    log = (tmp_path / "y" / "log.txt").read_text()
    assert "keeps the checkpoint's --mask under_nose (not rect)" in log and f"keeps the checkpoint's --stem {stem} (not {other})" in log
    assert f"keeps the checkpoint's --audio_film {film} (not {not film})" in log
    with pytest.raises(utils.UserError, match="--stem 's4d'"):
        train_328.main(config(data_root, tmp_path / "z", stem="s4d"))
    with pytest.raises(utils.UserError, match="--resume auto"):                # no silent overwrite of a run
        train_328.main(config(data_root, out, widths="light"))
    with pytest.raises(utils.UserError, match="--base"):                       # a model that starts from another base
        train_328.main(config(data_root, tmp_path / "z", resume=str(out / "last.pth"), widths="light",
                              base="ref" if ck["config"]["base"] == "none" else "none"))
    with pytest.raises(utils.UserError, match="--base 'template'"):
        train_328.main(config(data_root, tmp_path / "z", base="template"))


def test_reference_flags_are_accepted():
    cfg = utils.parse_config(train_328.Config, ["--dataset_dir", "d/x", "--save_dir", "c/x", "--batchsize", "3",
                                                "--no-augment"], aliases=train_328.ALIASES)
    assert (cfg.dataset, cfg.out_dir, cfg.batch_size, cfg.augment) == ("d/x", "c/x", 3, False)


def test_torchrun_two_cpu_processes(data_root, tmp_path):
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "train_328.py", "--name", "fake", "--data_root", str(data_root), "--save_dir", str(out),
                        "--max_steps", "2", "--widths", TINY, "--device", "cpu", "--batch_size", "2",
                        "--num_workers", "0", "--val_frames", "2", "--resume"],   # a bare --resume = auto: a new run here
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    ck = utils.load_checkpoint(out / "last.pth")
    assert ck["step"] == 2 and ck["config"]["world_size"] == 2
    assert sorted(p.name for p in out.glob("*.pth")) == ["best.pth", "last.pth"]   # rank 0 alone saves
    assert (out / "log.txt").read_text().count("done: step 2") == 1


def test_held_out_audio_effect_is_zero_only_for_a_model_that_ignores_audio(data_root):
    from unet_328 import UNet328
    cfg = config(data_root, "unused", val_frames=6)
    val = datasets.LipDataset(data_root / "fake", frames=range(30, 40))
    loader = torch.utils.data.DataLoader(val, batch_size=4)

    class Deaf(torch.nn.Module):            # paints the masked input back, whatever the audio
        def forward(self, x, audio):
            return x[:, 3:]
    l1, effect = losses.validate(Deaf(), loader, torch.device("cpu"), cfg)
    assert effect == 0.0 and 0 < l1 < 1
    torch.manual_seed(0)
    l1, effect = losses.validate(UNet328(train_328.parse_widths(TINY)).eval(), loader, torch.device("cpu"), cfg)
    assert effect > 0 and 0 < l1 < 1        # audio reaches the mouth box, in 0-255 levels


def test_ms_ssim_matches_the_reference_implementation():
    """losses.ms_ssim (the maps stacked, channels-last filters, the target outside autograd) gives
    pytorch_msssim's figure and gradient, including odd sizes where the pooling pads."""
    from pytorch_msssim import ms_ssim
    g = torch.Generator().manual_seed(0)
    for shape in ((2, 3, 176, 200), (1, 3, 161, 193)):
        target = torch.rand(*shape, generator=g)
        pred = (target + 0.1 * torch.randn(*shape, generator=g)).clamp(0, 1)
        ours, ref = pred.clone().requires_grad_(True), pred.clone().requires_grad_(True)
        v_ours, v_ref = losses.ms_ssim(ours, target), ms_ssim(ref, target, data_range=1.0)
        (v_ours + v_ref).backward()
        assert 0.5 < v_ref.item() < 0.99
        assert abs(v_ours.item() - v_ref.item()) < 1e-5
        assert float((ours.grad - ref.grad).norm() / ref.grad.norm()) < 1e-3
    blurred = torch.nn.functional.avg_pool2d(target, 3, 1, 1)
    assert losses.ms_ssim(target, target).item() > 0.9999 > losses.ms_ssim(blurred, target).item()


def test_msssim_loss_is_exact_under_bf16_autocast():
    """Mixed precision must not reach the MS-SSIM term: in bf16 its variances cancel and its
    gradient points anywhere (a full-width GPU run collapsed to a dark frame)."""
    g = torch.Generator().manual_seed(0)
    target = torch.rand(2, 3, 1, 1, generator=g) * 0.5 + 0.25 + 0.05 * torch.rand(2, 3, 200, 200, generator=g)
    blur = torch.nn.functional.avg_pool2d(target, 5, 1, 2, count_include_pad=False)
    grads = []
    for bf16 in (False, True):
        pred = blur.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = losses.msssim_loss(pred.to(torch.bfloat16) if bf16 else pred, target)
        assert loss.dtype == torch.float32
        loss.backward()
        grads.append((loss.item(), pred.grad.flatten()))
    (l32, g32), (l16, g16) = grads
    assert 0.001 < l32 < 0.5
    assert abs(l16 - l32) < 0.02 * l32 + 1e-3        # only the bf16 rounding of the input remains
    assert float(torch.nn.functional.cosine_similarity(g16, g32, 0)) > 0.9


def test_msssim_y_judges_the_luma_and_leaves_colour_to_the_l1():
    """--perceptual msssim_y: 1 - MS-SSIM of the BT.601 luma, in fp32 under autocast. A change of
    colour at the same luma costs it nothing (the RGB term sees it); a blur costs both."""
    g = torch.Generator().manual_seed(1)
    target = torch.rand(2, 3, 176, 176, generator=g) * 0.6 + 0.2
    w = torch.tensor(losses.LUMA_BGR).view(1, 3, 1, 1)
    assert losses.make_perceptual("msssim_y", "cpu")[0] == "msssim_y" and losses.PERCEPTUAL_WEIGHT["msssim_y"] == 0.5
    # move B up and R down so that 0.114 dB - 0.299 dR = 0: same luma, another colour (a per-pixel amount)
    d = 0.1 * torch.rand(2, 1, 176, 176, generator=g)
    recoloured = target + torch.cat([d, torch.zeros_like(d), d * 0.114 / 0.299 * -1], 1)
    assert torch.allclose((recoloured * w).sum(1), (target * w).sum(1), atol=1e-6)
    assert losses.msssim_y_loss(recoloured, target).item() < 1e-5 < losses.msssim_loss(recoloured, target).item()
    blurred = torch.nn.functional.avg_pool2d(target, 3, 1, 1)
    pred = blurred.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = losses.msssim_y_loss(pred, target)
    assert loss.dtype == torch.float32 and loss.item() > 0.05
    want = 1 - losses.ms_ssim((blurred * w).sum(1, keepdim=True), (target * w).sum(1, keepdim=True))
    assert abs(loss.item() - want.item()) < 1e-6
    loss.backward()
    assert pred.grad.abs().sum() > 0 and torch.isfinite(pred.grad).all()


def test_edge_l1_counts_edges_not_offsets():
    """edge_l1 is 0 for a prediction that is the target moved by a constant (no edge differs), and
    for a blurred step edge it is what the blur took off the edge, while plain L1 sees less."""
    target = torch.zeros(1, 3, 16, 16)
    target[..., 8:] = 1.0                                                  # a vertical step edge
    assert float(losses.edge_l1(target + 0.1, target)) == pytest.approx(0.0, abs=1e-7)
    blur = torch.nn.functional.avg_pool2d(target, (1, 3), 1, (0, 1), count_include_pad=False)   # 0, .33, .67, 1 across x = 6..9
    e, l1 = float(losses.edge_l1(blur, target)), float((blur - target).abs().mean())
    assert e == pytest.approx((1 / 3 + 2 / 3 + 1 / 3) / 15, abs=1e-6)      # per row: blur - target is 1/3 at x 7, -1/3 at x 8: x steps 1/3, 2/3, 1/3 of 15; no y steps
    assert l1 == pytest.approx(2 / 3 / 16, abs=1e-6) and e > l1
    obj = losses.Objective(edge_weight=2.0)
    loss, terms = obj(blur, target, step=0)
    assert float(loss) == pytest.approx(l1 + 2.0 * e, abs=1e-6) and "edge" in terms


def test_sync_start_adds_the_sync_loss_late_and_resumes_exactly(data_root, tmp_path):
    """--sync_start 0.5 of 4 steps: steps 1-2 train without the SyncNet's clips, steps 3-4 with
    them (the ramp counting from step 3); a run stopped at the start resumes to the same losses."""
    def run(out, stop=None, **kw):
        seen = {}
        res = train_328.main(config(data_root, out, max_steps=4, sync_weight=0.1, sync_clips=1, sync_ramp=2,
                                    sync_start=0.5, **kw),
                             progress=lambda s, n, losses: seen.__setitem__(s, losses), should_stop=stop)
        return seen, res
    for d in ("a", "b"):
        fake_syncnet(tmp_path / d / "syncnet_best.pth")
    straight, _ = run(tmp_path / "a")
    assert [("sync" in straight[s]) for s in (1, 2, 3, 4)] == [False, False, True, True]
    # the ramp counts from the start: half the weight at step 3, all of it at step 4
    for s, w in ((3, 0.05), (4, 0.1)):
        rest = straight[s]["l1"] + 0.5 * straight[s].get("perc", 0.0)
        assert abs(straight[s]["total"] - (rest + w * straight[s]["sync"])) < 1e-4
    calls = iter(range(100))
    _, first = run(tmp_path / "b", stop=lambda: next(calls) >= 1)              # stopped after step 2
    assert first["step"] == 2
    resumed, _ = run(tmp_path / "b", resume="auto")
    for s in (3, 4):
        for k, v in straight[s].items():
            assert abs(resumed[s][k] - v) <= 1e-6, (s, k, v, resumed[s][k])


def test_objective_sums_its_weighted_terms():
    g = torch.Generator().manual_seed(2)
    pred, target = torch.rand(2, 3, 320, 320, generator=g), torch.rand(2, 3, 320, 320, generator=g)
    mouth = torch.tensor([[100, 200, 220, 260], [90, 190, 230, 270]])
    loss, terms = losses.Objective(mouth_weight=2.0)(pred, target, step=0, mouth=mouth)
    l1 = (pred - target).abs().mean()
    inside = torch.cat([(pred - target)[i, :, y0:y1, x0:x1].abs().flatten() for i, (x0, y0, x1, y1) in enumerate(mouth.tolist())]).mean()
    assert set(terms) == {"l1", "l1_mouth"}
    assert torch.allclose(terms["l1"], l1) and torch.allclose(terms["l1_mouth"], inside, atol=1e-6)
    assert torch.allclose(loss, l1 + 2.0 * inside, atol=1e-6)


def test_train_step_fits_a_fixed_batch(data_root):
    """train_step is the whole optimizer step: repeated on one batch, the L1 it reports falls."""
    ds = datasets.LipDataset(data_root / "fake", frames=range(30), seed=0)
    b = torch.utils.data.default_collate([ds[k] for k in (3, 11)])
    torch.manual_seed(0)
    model = UNet328(train_328.parse_widths(TINY)).to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    objective = losses.Objective()
    seen = []
    for step in range(12):
        pred, terms = losses.train_step(model, objective, opt, scaler, b, None, step, torch.device("cpu"))
        seen.append(terms["l1"].item())
    assert pred.shape == (2, 3, 320, 320) and set(terms) == {"l1", "total"}
    assert seen[-1] < 0.7 * seen[0], seen


def test_window_forward_is_the_crop_forward_at_full_size_and_cuts_the_audio_cells():
    """A 320 window at (0, 0) is the whole crop; a smaller window's bottleneck is joined with the
    audio map's cells under that window (the audio branch's map, cut at offset / 32)."""
    torch.manual_seed(0)
    model = UNet328(train_328.parse_widths(TINY)).eval()
    img, audio = torch.rand(1, 6, 320, 320), torch.randn(1, 32, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(img, audio), model(img, audio, (0, 0)))
        seen = []
        hook = model.fuse.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
        out = model(img[:, :, 64:256, 32:224], audio, (64, 32))
        full_map = model.audio_branch(audio)                      # (1, 16, 10, 10)
        hook.remove()
    assert out.shape == (1, 3, 192, 192)
    w5 = full_map.shape[1]
    assert torch.equal(seen[0][:, w5:], full_map[:, :, 2:8, 1:7])   # rows 64/32.., cols 32/32..
    for bad in ((16, 0), (0, 160)):                                  # off the grid / past the crop
        with pytest.raises(ValueError, match="window"):
            model(img[:, :, :192, :192], audio, bad)


def test_pick_window_is_aligned_deterministic_and_covers_the_offsets():
    offs = [losses.pick_window(3, s, 192) for s in range(400)]
    assert offs == [losses.pick_window(3, s, 192) for s in range(400)]          # a pure function of (seed, step)
    assert offs != [losses.pick_window(4, s, 192) for s in range(400)]
    assert {o for pair in offs for o in pair} == {0, 32, 64, 96, 128}           # every aligned offset, none past the crop
    assert losses.pick_window(0, 5, 320) == (0, 0)


def test_window_share_splits_the_steps_between_windows_and_whole_crops(data_root, tmp_path):
    """--window: the first window_share of the steps see windows (the previews show them), the rest
    whole crops; bad values are one-line errors."""
    res = train_328.main(config(data_root, tmp_path / "w", max_steps=8, window=192, window_share=0.5,
                                perceptual="msssim", preview_every=4, lr=1e-2))
    prev = sorted((tmp_path / "w" / "previews").glob("*.png"))
    import cv2
    shapes = [cv2.imread(str(p)).shape for p in prev]
    assert shapes == [(2 * 192, 4 * 192, 3), (2 * 320, 4 * 320, 3)]            # step 4: windows; step 8: whole crops
    assert res["step"] == 8 and np.isfinite(res["losses"]["total"])
    for kw, msg in ((dict(window=100), "multiple of 32"), (dict(window=160, perceptual="msssim"), "at least 192"),
                    (dict(window=192, sync_weight=0.1, sync_clips=1), "whole crops")):
        if "sync_weight" in kw:
            fake_syncnet(tmp_path / "e" / "syncnet_best.pth")
        with pytest.raises(utils.UserError, match=msg):
            train_328.main(config(data_root, tmp_path / "e", overwrite=True, **kw))


def test_train_step_on_a_window_fits_its_window(data_root):
    ds = datasets.LipDataset(data_root / "fake", frames=range(30), seed=0)
    b = torch.utils.data.default_collate([ds[k] for k in (3, 11)])
    torch.manual_seed(0)
    model = UNet328(train_328.parse_widths(TINY))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    objective = losses.Objective(mouth_weight=1.0)
    seen = []
    for step in range(12):
        pred, terms = losses.train_step(model, objective, opt, scaler, b, None, step, torch.device("cpu"),
                                        channels_last=False, window=((96, 64), 192))
        seen.append(terms["l1"].item())
    target = b["target"][:, :, 96:288, 64:256]
    assert pred.shape == (2, 3, 192, 192)
    assert abs((pred.detach() - target).abs().mean().item() - seen[-1]) < 0.05      # the loss is the window's
    assert seen[-1] < 0.7 * seen[0], seen


def test_open_weight_draws_extreme_openings_more_often():
    """--open_weight: frames far from the median opening (either way) are drawn more often, and the
    batch of a step stays a pure function of (seed, step), so a resumed run draws the same."""
    from datasets import StepBatches, opening_weights
    opening = np.concatenate([np.full(80, 0.1), np.linspace(0.0, 0.6, 20)])      # mostly one shape, a few extremes
    w = opening_weights(opening, 2.0)
    assert w.min() == 1.0 and w.max() == 7.0                                        # capped at 3 robust sd
    sb = StepBatches(len(opening), 4, seed=3, weights=w)
    drawn = np.concatenate([[k for k, _ in sb.batch(s)] for s in range(2000)])
    share = np.isin(drawn, np.arange(80, 100)).mean()
    assert share > 0.35                                                             # uniform would give 0.20
    assert sb.batch(1234) == StepBatches(len(opening), 4, seed=3, start_step=1234, weights=w).batch(1234)
    assert StepBatches(len(opening), 4, seed=3).batch(7) != sb.batch(7)


def test_audio_lr_mult_gives_the_audio_branch_its_own_rate_and_resumes(data_root, tmp_path):
    """--audio_lr_mult M: the U-Net's audio branch is a second Adam group stepped at M x the
    schedule's rate (the rest at 1 x), kept through a resume."""
    out = tmp_path / "alr"
    train_328.main(config(data_root, out, audio_lr_mult=4.0, max_steps=1))
    ck = utils.load_checkpoint(out / "last.pth")
    groups = ck["optimizer"]["param_groups"]
    n_audio = len(list(UNet328(train_328.parse_widths(TINY)).audio_branch.parameters()))
    assert len(groups) == 2 and groups[1]["lr_mult"] == 4.0 and len(groups[1]["params"]) == n_audio
    assert groups[1]["lr"] == pytest.approx(4 * groups[0]["lr"]) and groups[0]["lr"] > 0
    res = train_328.main(config(data_root, out, audio_lr_mult=4.0, max_steps=2, resume="auto"))
    assert res["step"] == 2
    groups = utils.load_checkpoint(out / "last.pth")["optimizer"]["param_groups"]
    assert len(groups) == 2
    res = train_328.main(config(data_root, out, audio_lr_mult=2.0, max_steps=3, resume="auto"))   # a new multiplier is used
    assert utils.load_checkpoint(out / "last.pth")["optimizer"]["param_groups"][1]["lr_mult"] == 2.0
    with pytest.raises(utils.UserError, match="--audio_lr_mult 2"):                               # one group cannot take two
        train_328.main(config(data_root, out, max_steps=4, resume="auto"))


def test_ema_update_fades_the_first_weights_fast_then_keeps_its_decay():
    update = losses.ema_update(0.9)
    avg, new = [torch.zeros(3)], [torch.ones(3)]
    update(avg, new, torch.tensor(1))                 # second update: decay 2/11, mostly the new weights
    assert torch.allclose(avg[0], torch.full((3,), 1 - 2 / 11))
    avg = [torch.zeros(3)]
    update(avg, new, torch.tensor(1000))              # later: the configured decay
    assert torch.allclose(avg[0], torch.full((3,), 0.1))


def test_adversarial_term_starts_late_ramps_and_resumes_exactly(data_root, tmp_path):
    """--adv_weight 0.2 --adv_start 0.5 of 4 steps: steps 1-2 train without the critic, steps 3-4
    with it (its weight ramping from step 3); a run stopped inside that phase resumes to the same
    losses, so the critic and its optimizer travel in last.pth."""
    def run(out, stop=None, **kw):
        seen = {}
        res = train_328.main(config(data_root, out, max_steps=4, adv_weight=0.2, adv_start=0.5, adv_ramp=2, **kw),
                             progress=lambda s, n, losses: seen.__setitem__(s, losses), should_stop=stop)
        return seen, res
    straight, _ = run(tmp_path / "a")
    assert [("adv" in straight[s], "critic" in straight[s]) for s in (1, 2, 3, 4)] == [(False, False)] * 2 + [(True, True)] * 2
    for s, w in ((3, 0.1), (4, 0.2)):
        rest = straight[s]["l1"] + 0.5 * straight[s].get("perc", 0.0)
        assert abs(straight[s]["total"] - (rest + w * straight[s]["adv"])) < 1e-4
    ck = utils.load_checkpoint(tmp_path / "a" / "last.pth")
    assert set(ck["adversary"]) == {"critic", "optimizer"} and ck["adversary"]["optimizer"]["state"]
    calls = iter(range(100))
    _, first = run(tmp_path / "b", stop=lambda: next(calls) >= 2)              # stopped after step 3
    assert first["step"] == 3
    resumed, _ = run(tmp_path / "b", resume="auto")
    assert sorted(resumed) == [4]
    for k, v in straight[4].items():
        assert abs(resumed[4][k] - v) <= 1e-6, (k, v, resumed[4][k])


def test_critic_learns_to_tell_blur_from_texture():
    """Trained on sharp textures (real) against their blurred copies (fake), the critic's loss
    falls and the generator's adversarial loss is then higher for the blur than for the texture."""
    torch.manual_seed(0)
    adv = losses.Adversary(1.0, 0, 1, (0, 64, 0, 64), torch.device("cpu"), lr=1e-3)
    sharp = torch.rand(4, 3, 320, 320)
    blur = torch.nn.functional.avg_pool2d(sharp, 5, 1, 2)
    first = adv.critic_step(blur, sharp).item()
    for _ in range(40):
        last = adv.critic_step(blur, sharp).item()
    assert last < 0.5 * first, (first, last)
    assert adv.generator_loss(blur).item() > adv.generator_loss(sharp).item() + 0.2
    assert all(p.grad is None or p.requires_grad for p in adv.critic.parameters())


def test_mask_box_bounds_the_mask_on_an_aligned_grid():
    m = np.zeros((320, 320), bool)
    m[131:300, 45:277] = True
    assert losses.mask_box(m) == (128, 304, 40, 280)
    assert losses.mask_box(None) == (0, 320, 0, 320)


def test_adversarial_term_refuses_windows(data_root, tmp_path):
    with pytest.raises(utils.UserError, match="--adv_weight 0"):
        train_328.main(config(data_root, tmp_path / "w", adv_weight=0.1, window=192))


def test_resume_restores_the_cuda_generator_of_the_device_in_use(monkeypatch):
    """A CUDA run's checkpoint keeps the RNG state of its own device only, and one from before that
    (a state per visible GPU) restores on a machine that sees fewer GPUs instead of failing."""
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda t, device="cuda": restored.append(t.clone()))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: pytest.fail("restores every GPU's state"))
    base = train_328.rng_state(torch.device("cpu"))
    assert "cuda" not in base
    one = torch.arange(16, dtype=torch.uint8)
    train_328.set_rng_state(dict(base, cuda=one))
    old = [torch.full((16,), k, dtype=torch.uint8) for k in (7, 8, 9)]    # saved on a 3-GPU node
    train_328.set_rng_state(dict(base, cuda=old))
    assert len(restored) == 2 and torch.equal(restored[0], one) and torch.equal(restored[1], old[0])
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 5)           # device 5 of a bigger node: none saved
    train_328.set_rng_state(dict(base, cuda=old))
    assert len(restored) == 2


def test_gpus_without_native_bf16_train_in_fp16_with_loss_scaling(monkeypatch):
    """torch's default bf16 answer counts emulation; a card without bf16 units (V100, T4) must get
    fp16 under autocast and the loss scaler, an Ampere or later card bf16."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    asked = []

    def supported(including_emulation=True):
        asked.append(including_emulation)
        return including_emulation          # emulated only
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", supported)
    assert utils.gpu_bf16() is False and asked == [False]
    with utils.autocast(torch.device("cuda")) as ctx:
        assert ctx.fast_dtype == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert utils.gpu_bf16() is True
