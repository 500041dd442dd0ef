"""stream.py: audio in pieces, frames out as soon as their audio arrived. The frames equal the
file path's (inference_328's LipSyncModel.frames) for the same audio; any chunking (1 sample to
1 s) gives the same frames; less look-ahead makes frames sooner; silence fed while no audio
arrives closes the mouth without a jump; memory stays flat over a long stream; the silence gate's
stream (vad.GateStream) equals the file's levels exactly."""
import os
import subprocess
import sys

import numpy as np
import pytest

import inference_328 as inf
import media_io
import stream
import synthetic
import templates
import utils
import vad
from compose import LIVE_GUIDANCE, RenderOptions
from test_inference import bank_checkpoint, random_light_checkpoint

# Frames may differ by float rounding only: the mel of a shorter segment goes through a matrix
# product that rounds differently (~1e-6 relative, tests/test_inference.py), which can move a
# U-Net output pixel across a rounding boundary: at most 1 grey level, at a few pixels.
MAX_LEVELS, MAX_SHARE = 1, 1e-3


@pytest.fixture(scope="module")
def live(tiny_dataset, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stream")
    old_cache = os.environ.get("LIPSYNC_CACHE")
    os.environ["LIPSYNC_CACHE"] = str(tmp / "cache")        # exported graphs stay in the test's temp dir
    ckpt = random_light_checkpoint(tmp / "last.pth")
    model = inf.LipSyncModel(ckpt, "cpu")
    template = templates.open_template("tiny", tiny_dataset.parent)
    wav = synthetic.synth_speech(1.6, seed=5, lead_silence=0.3)
    n = media_io.num_frames(len(wav))
    shift = vad.level_shift(vad.frame_loudness_db(wav, n))
    whole = list(model.frames(wav, template, RenderOptions(guidance=LIVE_GUIDANCE)))   # the file path at live's defaults
    yield dict(model=model, template=template, wav=wav, shift=shift, whole=whole, ckpt=ckpt, tmp=tmp,
               data_root=tiny_dataset.parent)
    if old_cache is None:
        os.environ.pop("LIPSYNC_CACHE", None)
    else:
        os.environ["LIPSYNC_CACHE"] = old_cache


def run(live, chunks, lookahead=stream.LOOKAHEAD, **kw):
    """Frames of a stream fed `chunks` (sizes in samples, cycled), made as soon as ready."""
    sess = stream.LiveSession(live["model"], live["template"], lookahead=lookahead,
                              level_shift=kw.pop("level_shift", live["shift"]), **kw)
    wav, frames, i, c = live["wav"], [], 0, 0
    while i < len(wav):
        size = chunks[c % len(chunks)]
        sess.push(wav[i:i + size])
        i, c = i + size, c + 1
        while (f := sess.next()) is not None:
            frames.append(f)
    sess.finish()
    while (f := sess.next()) is not None:
        frames.append(f)
    assert sess.done()
    return frames


def same(a, b):
    d = np.abs(a.astype(int) - b.astype(int))
    return d.max() <= MAX_LEVELS and (d > 0).mean() <= MAX_SHARE


def test_stream_frames_equal_the_file_paths(live):
    frames = run(live, [3200])
    assert [f.index for f in frames] == list(range(len(live["whole"])))
    assert [f.time for f in frames] == [k / utils.FPS for k in range(len(frames))]
    assert all(same(f.image, w) for f, w in zip(frames, live["whole"]))
    moved = np.abs(frames[10].image.astype(int) - live["whole"][20]).max()
    assert moved > 10                                   # frames differ from each other: the check can fail


def test_any_chunking_gives_the_same_frames(live):
    base = run(live, [16000])                           # 1 s
    for chunks in ([1] * 4000 + [4000], [320], [7, 1999, 641], [16000 * 2]):
        got = run(live, chunks)
        assert len(got) == len(base)
        assert all(same(a.image, b.image) for a, b in zip(got, base)), chunks


def test_audio_references_stream_as_the_file_path(live):
    model = inf.LipSyncModel(bank_checkpoint(live["tmp"] / "bank.pth")[0], "cpu")
    opts = RenderOptions(reference="audio")
    whole = list(model.frames(live["wav"], live["template"], opts))
    got = run(dict(live, model=model), [1200], opts=opts)
    assert len(got) == len(whole) and all(same(f.image, w) for f, w in zip(got, whole))


def test_less_look_ahead_gives_frames_sooner(live):
    m, t = live["model"], live["template"]
    delays = [stream.LiveSession(m, t, lookahead=L).delay() for L in (0, 3, 7)]
    assert delays[0] < delays[1] < delays[2] <= 0.45
    assert abs(delays[2] - 0.4125) < 0.01               # 7 frames + the mel window's 0.1 s (+ its half STFT)
    wav = live["wav"][:utils.SR]
    made = []
    for L in (0, 7):
        s = stream.LiveSession(m, t, lookahead=L)
        s.push(wav)
        made.append(s.ready())
    assert made[0] - made[1] == 7
    # the frames still differ from the full look-ahead's only where the window reads past k + L
    short = run(live, [3200], lookahead=0)
    assert len(short) == len(live["whole"])
    assert not all(same(a.image, b) for a, b in zip(short, live["whole"]))
    with pytest.raises(utils.UserError, match="lookahead"):
        stream.LiveSession(m, t, lookahead=8)
    with pytest.raises(utils.UserError, match="--band_push reads the whole clip"):   # not silently ignored
        stream.LiveSession(m, t, RenderOptions(band_push=0.1))
    with pytest.raises(utils.UserError, match="--closures reads the whole clip"):
        stream.LiveSession(m, t, RenderOptions(closures=1.0))


def test_idle_closes_the_mouth_and_the_timeline_goes_on(live):
    m, t = live["model"], live["template"]
    sess = stream.LiveSession(m, t, level_shift=live["shift"])
    sess.push(live["wav"])
    frames = [f for f in iter(sess.next, None)]
    n_speech = len(frames)
    sess.idle(1.0)
    frames += [f for f in iter(sess.next, None)]
    assert [f.index for f in frames] == list(range(len(frames)))          # no jump, no gap
    assert len(frames) >= n_speech + 20
    levels = np.asarray(sess.gate.levels)
    assert (levels[n_speech + 12:len(frames)] < RenderOptions.silence_db).all()   # silence: the gate closes the mouth
    # in silence the mouth is the closed reference's: the mouth box barely changes from frame to frame
    idle = [f.image for f in frames[n_speech + 12:]]
    talk = [f.image for f in frames[5:n_speech - 8]]

    def motion(seq):
        return np.mean([np.abs(a.astype(int) - b).mean() for a, b in zip(seq, seq[1:])])
    assert motion(idle) < motion(talk)
    sess.push(live["wav"][:utils.SR // 2])                                 # talking again: the timeline goes on
    more = [f for f in iter(sess.next, None)]
    assert more and more[0].index == frames[-1].index + 1


def test_memory_stays_flat_over_a_long_stream(live):
    sess = stream.LiveSession(live["model"], live["template"], RenderOptions(vad="off"))
    second = live["wav"][:utils.SR]
    sizes = []
    for i in range(90):                                 # 90 s pushed; frames skipped (no U-Net) but consumed
        sess.push(second)
        while sess.skip() is not None:
            pass
        sizes.append((len(sess.wav), len(sess.feats), len(sess._buf)))
    assert sess.k >= 90 * utils.FPS - 12 and sess.dropped == sess.k
    assert max(s[0] for s in sizes[30:]) <= 3 * utils.SR          # < 3 s of audio held
    assert sizes[-1][2] == sizes[30][2] <= 10 * utils.SR          # the buffer stopped growing
    assert max(s[1] for s in sizes) <= utils.FEAT_WIN
    f = sess.next() if sess.ready() else None
    assert f is None or f.image.shape == live["whole"][0].shape


def test_gate_stream_equals_the_files_levels():
    wav = synthetic.synth_speech(3.0, seed=2, lead_silence=0.5)
    for cut in (0, 300, 100):                            # audio ends mid-frame, either side of its half
        w = wav[:len(wav) - cut]
        n = media_io.num_frames(len(w))
        for with_vad in ((False, True) if vad.available() else (False,)):
            want = vad.gate_loudness_db(w, n, with_vad)
            shift = vad.level_shift(vad.frame_loudness_db(w, n))
            for size in (1, 777, 16000):
                g = vad.GateStream(with_vad, shift=shift)
                for i in range(0, len(w), size):
                    g.push(w[i:i + size])
                    assert len(g.levels) <= n
                assert len(g.levels) >= n - 3
                g.finish(n)
                assert np.array_equal(np.asarray(g.levels, np.float32), want), (cut, with_vad, size)


def test_pcm_formats_and_bad_chunks():
    x = np.array([0, 16384, -32768], np.int16)
    assert np.allclose(stream.to_float(x), [0, 0.5, -1])
    assert np.allclose(stream.to_float(x.tobytes()), [0, 0.5, -1])
    with pytest.raises(utils.UserError, match="2-byte"):
        stream.to_float(b"\x00\x01\x02")


def test_a_cached_model_runs_without_pytorch(live):
    """The second load of a checkpoint takes its graphs (U-Net and mel audio encoder, checked against
    PyTorch when they were exported) from the cache: PyTorch is never imported, frames are the same."""
    import audio_features
    import runner
    from unet_328 import fold_bn
    kind = live["model"].runner.kind                # ONNX Runtime, or OpenVINO where its bf16 passed the check
    assert kind in runner.GRAPH_KINDS and isinstance(live["model"].audio_encoder, runner.OrtAudio)
    _, enc, _ = runner.load_generator(live["ckpt"])
    want = audio_features.encode_audio(live["wav"], fold_bn(enc))
    got = live["model"].features(live["wav"])
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    out = live["tmp"] / "frames.npy"
    code = ("import sys, numpy as np, inference_328 as inf, templates, synthetic, compose\n"
            "m = inf.LipSyncModel(sys.argv[1], 'cpu')\n"
            "t = templates.open_template('tiny', sys.argv[2])\n"
            "w = synthetic.synth_speech(1.6, seed=5, lead_silence=0.3)\n"
            "np.save(sys.argv[3], np.stack(list(m.frames(w, t, compose.RenderOptions(guidance=1.0)))))\n"
            "print('torch' in sys.modules, m.runner.kind, type(m.audio_encoder).__name__)\n")
    r = subprocess.run([sys.executable, "-c", code, str(live["ckpt"]), str(live["data_root"]), str(out)],
                       capture_output=True, text=True, cwd=utils.REPO, env=dict(os.environ))
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["False", kind, "OrtAudio"]
    frames = np.load(out)
    assert len(frames) == len(live["whole"]) and all(same(a, b) for a, b in zip(frames, live["whole"]))


def test_cli_streams_stdin_into_a_fragmented_mp4(live):
    """inference_328.py --stream --audio_path - : PCM on stdin -> a fragmented mp4 (moof boxes, so it
    plays while it grows) with both streams, one frame per 40 ms of audio."""
    out = live["tmp"] / "live.mp4"
    pcm = (np.clip(live["wav"], -1, 1) * 32767).astype("<i2").tobytes()
    cmd = [sys.executable, "inference_328.py", "--name", "tiny", "--data_root", str(live["data_root"]),
           "--checkpoint", str(live["ckpt"]), "--audio_path", "-", "--stream", "--out", str(out), "--lookahead", "3"]
    r = subprocess.run(cmd, input=pcm, capture_output=True, cwd=utils.REPO, env=dict(os.environ))
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    info = media_io.probe(out)
    assert info["video"]["codec"] == "h264" and info["audio"]["codec"] == "aac"
    assert abs(info["duration"] - len(live["wav"]) / utils.SR) < 0.1
    data = out.read_bytes()
    assert b"moof" in data and b"mfra" not in data[:1000]
    n = sum(1 for _ in media_io.iter_frames(out, info["video"]["width"], info["video"]["height"]))
    assert n == media_io.num_frames(len(live["wav"]))
    back = media_io.load_audio(out)                      # the audio lines up with the frames: no AAC delay
    a, b = live["wav"][2000:20000], back[:len(live["wav"])]
    lag = int(np.argmax([np.dot(a, b[2000 + d:20000 + d]) for d in range(-800, 800)])) - 800
    assert abs(lag) <= 8 and abs(len(back) - len(live["wav"])) <= 160
    r = subprocess.run(cmd[:-5] + ["--out", str(out)], input=pcm, capture_output=True, cwd=utils.REPO)
    assert r.returncode == 2 and r.stderr.decode().strip().splitlines()[-1].startswith("error: --audio_path -")
    r = subprocess.run(cmd, input=b"", capture_output=True, cwd=utils.REPO, env=dict(os.environ))
    assert r.returncode == 2 and "no audio arrived" in r.stderr.decode().strip().splitlines()[-1]
    assert not out.exists()                              # nothing half-written is left behind
