"""Audio feature sources (audio_features.py): the frozen speech embedding is aligned with the
video frames, its encoder head feeds the SyncNet and the generator like the mel AudioEncoder, and
a missing wheel is one clear error."""
import numpy as np
import pytest
import torch

import audio_features as af
import media_io
import syncnet_model
import unet_328
from utils import FPS, SR, UserError


def burst(seconds=4.0, frames=(40, 50), seed=0):
    """Silence with a noise burst over video frames [a, b)."""
    wav = np.zeros(int(seconds * SR), np.float32)
    a, b = (int(f * SR / FPS) for f in frames)
    wav[a:b] = np.random.default_rng(seed).normal(0, 0.3, b - a).astype(np.float32)
    return wav


def test_speech_embeddings_are_centred_on_their_frames():
    wav = burst()
    emb = af.speech_embeddings(wav)
    assert emb.shape == (media_io.num_frames(len(wav)), unet_328.SPEECH_DIM) and emb.dtype == np.float32
    quiet = af.speech_embeddings(np.zeros_like(wav))
    assert np.allclose(quiet, quiet[0], atol=1e-4)            # silence: the same vector everywhere
    d = np.linalg.norm(emb - quiet, axis=1)
    # each embedding sees 0.76 s (19 frames) centred on its frame: the burst (frames 40-49) moves
    # the frames within ~9 of it, symmetrically, and leaves the far ones alone
    moved = np.flatnonzero(d > 1e-3)
    assert len(moved) == moved[-1] - moved[0] + 1 and abs(len(moved) - (10 + 19)) <= 3, moved
    assert abs((moved[0] + moved[-1]) / 2 - 44.5) <= 1.0, moved        # no offset: video frame k <-> audio at k


def test_speech_embeddings_pad_audio_shorter_than_the_frames():
    wav = burst(1.0, (5, 10))
    assert af.speech_embeddings(wav, n_frames=40).shape == (40, unet_328.SPEECH_DIM)
    np.testing.assert_allclose(af.speech_embeddings(wav, n_frames=40)[:20], af.speech_embeddings(wav)[:20], atol=1e-4)


@pytest.mark.parametrize("source,dim", [("speech", unet_328.SPEECH_DIM), ("both", unet_328.BOTH_DIM)])
def test_speech_source_feeds_encoder_syncnet_and_features(source, dim):
    torch.manual_seed(0)
    net = syncnet_model.SyncNet(widths=(4, 4, 4, 4, 4), emb_dim=8, T=5, audio_k=3, audio_source=source)
    wav = burst(2.0, (10, 20))
    inputs = af.sync_inputs(wav, source)                        # (50, 96) | (50, 1376)
    assert inputs.shape == (50, dim)
    x = syncnet_model.audio_input(inputs, np.array([0, 25, 49]), syncnet_model.audio_offsets(3))
    assert x.shape == (3, 3, dim)
    np.testing.assert_array_equal(x[1, 1], inputs[25])
    np.testing.assert_array_equal(x[0, 0], inputs[0])           # before the audio: the edge frame
    a, v = net(torch.rand(3, 15, 320, 320), torch.from_numpy(x))
    assert a.shape == v.shape == (3, 8)
    # the SyncNet's head is the generator's feature encoder, found again from its state dict
    enc = af.encoder_from_state(net.state_dict(), source)
    assert af.source_of(enc) == source and af.encoder_id(enc) == af.encoder_id(net.audio_encoder)
    feats = af.encode_audio(wav, enc)
    assert feats.shape == (50, 512) and (feats >= 0).all()
    if source == "both":     # its inputs: frame k's mel window (as the mel source's) beside its speech embedding
        mel = media_io.mel_windows(media_io.melspectrogram(wav), np.arange(50)).reshape(50, -1)
        np.testing.assert_array_equal(inputs[:, :unet_328.MEL_FLAT], mel)
        np.testing.assert_allclose(inputs[:, unet_328.MEL_FLAT:], af.speech_embeddings(wav), atol=1e-5)
    with torch.no_grad():
        want = net.audio_encoder.eval()(torch.from_numpy(inputs)).numpy()
    np.testing.assert_allclose(feats, want, atol=1e-5)


def test_mel_source_is_unchanged():
    torch.manual_seed(0)
    enc = unet_328.AudioEncoder()
    wav = burst(1.0, (5, 10))
    assert af.source_of(enc) == "mel"
    np.testing.assert_array_equal(af.sync_inputs(wav, "mel"), media_io.melspectrogram(wav))
    with torch.no_grad():
        want = enc.eval()(torch.from_numpy(media_io.mel_windows(media_io.melspectrogram(wav), np.arange(25)))).numpy()
    np.testing.assert_array_equal(af.encode_audio(wav, enc), want)


def test_missing_speech_wheel_is_one_line(monkeypatch):
    monkeypatch.setattr(af, "_SPEECH", {})
    monkeypatch.setattr(af.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match=r"pip install --no-deps openwakeword==0\.5\.1"):
        af.speech_embeddings(np.zeros(SR, np.float32))


def test_speech_embeddings_are_local():
    """A frame's embedding depends on the 0.76 s around it only, not on louder audio elsewhere: the
    same from the whole wav or from a slice starting on the 80 ms chunk grid (24 frames = 0.96 s)."""
    wav = burst(4.0, (20, 30)) + 3 * burst(4.0, (80, 90), seed=1)
    full = af.speech_embeddings(wav)
    part = af.speech_embeddings(wav[int(0.96 * SR):])
    np.testing.assert_allclose(part[20:50], full[44:74], atol=1e-3)


@pytest.mark.parametrize("source", ["speech", "both"])
def test_speech_syncnet_learns_and_writes_speech_features(tmp_path, source):
    """syncnet_328 --audio_source speech (and both) on the toy clip of test_syncnet (the lower face brightens
    with the loudness): it beats chance on the held-out pairs, its checkpoint and aud_feat.json name
    the source, and the written features are its head's outputs."""
    import json

    import syncnet_328 as sn
    from test_syncnet import TOY, make_toy_dataset
    torch.set_num_threads(1)
    ds = make_toy_dataset(tmp_path / "data")
    cfg = sn.Config(name="toy", data_root=str(tmp_path / "data"), ckpt_root=str(tmp_path / "ckpt"),
                    max_steps=60, val_every=30, audio_source=source, opening_weight=0, **TOY)   # sync alone (the opening head: test_syncnet)
    result = sn.main(cfg)
    assert result["best"]["acc"] > 0.6, result["best"]
    net, ckpt = syncnet_model.load_syncnet(tmp_path / "ckpt" / "toy" / "syncnet_best.pth")
    assert net.audio_source == source and ckpt["config"]["audio_source"] == source
    info = json.loads((ds / "aud_feat.json").read_text())
    assert info["features"] == source and info["encoder_id"] == af.encoder_id(net.audio_encoder)
    feats = np.load(ds / "aud_feat.npy")
    np.testing.assert_allclose(feats, af.encode_audio(af.read_wav(ds), net.audio_encoder), atol=1e-5)
    r = sn.evaluate_sync(tmp_path / "ckpt" / "toy" / "syncnet_best.pth", ds)
    assert r["acc"] > 0.6 and abs(r["offset"]) <= 2, {k: r[k] for k in ("acc", "offset")}


@pytest.mark.parametrize("source", ["speech", "both"])
def test_generator_with_speech_features_renders_in_chunks(tmp_path, source):
    """A generator checkpoint whose features come from the speech source: inference rebuilds that
    encoder from the checkpoint, and features of any frame range equal the whole wav's."""
    import inference_328 as inf
    import utils
    from unet_328 import UNet328
    torch.manual_seed(0)
    enc = unet_328.make_audio_encoder(source)
    path = tmp_path / "last.pth"
    utils.save_checkpoint(dict(model=UNet328((4, 4, 8, 8, 16, 16)).state_dict(), step=0, config={"widths": [4, 4, 8, 8, 16, 16]},
                               audio_encoder=enc.state_dict(), audio_source=source, encoder_id=af.encoder_id(enc)), path)
    model = inf.LipSyncModel(path, device="cpu", backend="eager")
    assert af.source_of(model.audio_encoder) == source
    rng = np.random.default_rng(0)
    wav = (rng.normal(0, 0.2, 5 * SR) * np.repeat(rng.uniform(0, 1, 50), SR // 10)).astype(np.float32)
    whole = model.features(wav)
    np.testing.assert_allclose(whole, af.encode_audio(wav, enc), atol=1e-5)
    for a, b in ((0, 7), (3, 40), (37, 90), (101, 125)):
        np.testing.assert_allclose(model.features(wav, a, b), whole[a:b], atol=1e-4, err_msg=f"frames {a}..{b}")
