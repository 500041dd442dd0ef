"""The awkward-but-valid half of the input sweep (issue 15), kept as tests: videos in other codecs,
shapes and names, two faces in the picture, audio in every common format and rate, and Ctrl-C
during inference. Each must work (or stop cleanly) with nothing half-written left behind. The bad
half (damaged files, wrong values) is in test_bad_inputs.py, test_process.py, test_inference.py.
Built from the synthetic clip cut to 3 s; about a minute of CPU."""
import json
import signal
import subprocess
import sys

import numpy as np
import pytest

import inference_328 as inf
import media_io
import utils
from conftest import ROOT
from test_inference import random_light_checkpoint


def ffmpeg(*args):
    subprocess.run([media_io.ffmpeg_exe(), "-loglevel", "error", "-y", *map(str, args)], check=True)


@pytest.fixture(scope="module")
def clips(synthetic_clip, tmp_path_factory):
    d = tmp_path_factory.mktemp("sweep")
    cut = ["-t", "3"]
    ffmpeg("-i", synthetic_clip, *cut, "-c:v", "libx265", "-x265-params", "log-level=error", "-pix_fmt", "yuv420p",
           "-c:a", "aac", d / "hevc.mp4")
    ffmpeg("-i", synthetic_clip, *cut, "-c:v", "libvpx-vp9", "-deadline", "realtime", "-cpu-used", "8",
           "-c:a", "libopus", d / "vp9.webm")
    ffmpeg("-i", synthetic_clip, *cut, "-vf", "pad=iw:ih*16/9:0:(oh-ih)/2", "-c:v", "libx264", "-c:a", "aac",
           d / "vertical.mp4")
    # a second, smaller face beside the speaker: the larger one is tracked
    w, h = (media_io.probe(synthetic_clip)["video"][k] for k in ("width", "height"))
    ffmpeg("-i", synthetic_clip, *cut, "-filter_complex",
           f"[0:v]split[a][b];[b]scale={w * 3 // 4}:{h * 3 // 4},pad={w}:{h}:0:0[c];[a][c]hstack",
           "-c:v", "libx264", "-c:a", "aac", d / "two_faces.mp4")
    ffmpeg("-i", synthetic_clip, *cut, "-c", "copy", d / "-my talk (ü).mp4")
    return d


def process_cli(video, root, *args):
    r = subprocess.run([sys.executable, str(ROOT / "process.py"), str(video), "--data_root", str(root), *args],
                       capture_output=True, text=True, timeout=300)
    return r.returncode, r.stdout, r.stderr


@pytest.mark.parametrize("clip", ["hevc.mp4", "vp9.webm", "vertical.mp4", "two_faces.mp4", "-my talk (ü).mp4"])
def test_awkward_videos_become_datasets(clips, clip, tmp_path):
    rc, out, err = process_cli(clips / clip, tmp_path, "--name", "sweep")
    assert rc == 0, err[-800:]
    ds = tmp_path / "sweep"
    meta = json.loads((ds / "meta.json").read_text())
    assert abs(meta["frames"] - 75) <= 2 and meta["no_face_frames"] == 0
    assert [p.name for p in tmp_path.iterdir()] == ["sweep"]               # no temp folder left
    boxes = np.load(ds / "landmarks.npz")["crop_boxes"]
    if clip == "two_faces.mp4":
        assert "faces in a frame; kept the largest one" in out
        assert (boxes[:, 2] <= meta["width"] * 0.6).all()                  # the speaker on the left, not the small copy
    if clip == "vertical.mp4":
        assert meta["height"] > meta["width"]


def test_a_truncated_video_gives_what_it_holds_with_a_warning(synthetic_clip, tmp_path):
    data = synthetic_clip.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[:int(len(data) * 0.75)])                       # a download that stopped early
    rc, out, err = process_cli(cut, tmp_path / "d", "--name", "cut")
    assert rc == 0, err[-800:]
    meta = json.loads((tmp_path / "d" / "cut" / "meta.json").read_text())
    assert 65 <= meta["frames"] < 140 and meta["frames_announced"] == 150
    assert "looks truncated" in err
    whole_rc, _, whole_err = process_cli(synthetic_clip, tmp_path / "e", "--name", "whole")
    assert whole_rc == 0 and "truncated" not in whole_err


def test_an_odd_file_name_gives_a_safe_dataset_name(clips, tmp_path):
    rc, out, err = process_cli(clips / "-my talk (ü).mp4", tmp_path)
    assert rc == 0, err[-800:]
    (made,) = list(tmp_path.iterdir())
    assert (made / "meta.json").is_file() and utils.check_name(made.name) == made.name


@pytest.fixture(scope="module")
def avatar(tiny_dataset, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep_inf")
    ckpt = random_light_checkpoint(tmp / "ck" / "tiny" / "last.pth")
    return tiny_dataset.parent, ckpt, tmp


@pytest.mark.parametrize("name,args", [
    ("a.mp3", ["-ar", "44100", "-ac", "2", "-c:a", "libmp3lame"]),
    ("a.m4a", ["-ar", "48000", "-c:a", "aac"]),
    ("a.ogg", ["-ar", "22050", "-c:a", "libvorbis"]),
    ("a.flac", ["-ar", "8000", "-c:a", "flac"]),
    ("a48k.wav", ["-ar", "48000", "-ac", "2", "-c:a", "pcm_s16le"]),
    ("a.opus", ["-ar", "48000", "-c:a", "libopus"]),
])
def test_audio_in_any_common_format_and_rate(avatar, name, args, tmp_path):
    import synthetic
    root, ckpt, _ = avatar
    src = tmp_path / "src.wav"
    media_io.write_wav(src, synthetic.synth_speech(1.5, seed=2, lead_silence=0.2))
    ffmpeg("-i", src, *args, tmp_path / name)
    out = tmp_path / "out.mp4"
    inf.main(inf.Config(name="tiny", audio_path=str(tmp_path / name), checkpoint=str(ckpt), out=str(out),
                        data_root=str(root), device="cpu", backend="eager", malloc_tune=False))
    info = media_io.probe(out)
    assert info["video"] and info["audio"] and abs(info["duration"] - 1.5) <= 0.1, info
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["src.wav", name, "out.mp4"])


def test_ctrl_c_during_inference_leaves_no_video(avatar, tmp_path):
    """SIGINT while frames are being made: exit 130, last line `interrupted`, no mp4 and no
    partial file at the output folder."""
    import synthetic
    root, ckpt, _ = avatar
    media_io.write_wav(tmp_path / "long.wav", synthetic.synth_speech(20.0, seed=4))
    out_dir = tmp_path / "out"
    p = subprocess.Popen([sys.executable, str(ROOT / "inference_328.py"), "--name", "tiny", "--audio_path",
                          str(tmp_path / "long.wav"), "--checkpoint", str(ckpt), "--out", str(out_dir / "v.mp4"),
                          "--data_root", str(root), "--device", "cpu", "--backend", "eager"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))   # a background CI job ignores SIGINT
    err = b""
    while err.count(b"lip-sync:") < 3 and p.poll() is None:             # frames are being made (the bar moved)
        err += p.stderr.read1(4096)
    p.send_signal(signal.SIGINT)
    err = (err + p.communicate(timeout=120)[1]).decode(errors="replace")
    assert p.returncode == 130 and err.strip().splitlines()[-1] == "interrupted", err[-600:]
    assert not out_dir.exists() or list(out_dir.iterdir()) == []
