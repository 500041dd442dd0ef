"""Media in and out: ffmpeg (probe, decode, encode), audio loading and the mel features (SPEC §5),
the frame <-> audio index mapping, and the streaming video reader/writer. Used by processing,
training, inference, evaluation and the server alike.

    python -c "import media_io; print(media_io.ffmpeg_exe())"
"""
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from utils import (FEAT_WIN, FMAX, FMIN, FPS, HOP, MEL_FPS, MEL_MAX, MEL_WIN, MIN_DB, N_FFT, N_MELS, PREEMPH, REF_DB, SR, WIN,
                   UserError)


# ----------------------------------------------------------------------------------------------
# ffmpeg: the binary from imageio-ffmpeg unless FFMPEG_BINARY points elsewhere; argument lists only.
def ffmpeg_exe():
    exe = os.environ.get("FFMPEG_BINARY")
    if exe:
        return exe
    try:
        import imageio_ffmpeg
        return imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError) as e:
        raise UserError(f"no ffmpeg found ({e}); pip install imageio-ffmpeg or set FFMPEG_BINARY") from None


def run_ffmpeg(args, what="ffmpeg", stdin=None):
    """Run ffmpeg with an argument list (stdin: bytes for `-i -`); on failure raise UserError with ffmpeg's last line."""
    r = subprocess.run([ffmpeg_exe(), "-hide_banner", "-nostdin", "-y", *map(str, args)], input=stdin,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if r.returncode != 0:
        lines = [l for l in r.stderr.decode(errors="replace").strip().splitlines() if l.strip()]
        raise UserError(f"{what} failed: {lines[-1] if lines else 'ffmpeg exit ' + str(r.returncode)}")
    return r


def probe(path):
    """Facts about a media file from `ffmpeg -i` (imageio-ffmpeg ships no ffprobe)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"file not found: {path}")
    if path.is_dir():
        raise UserError(f"{path} is a folder, not a media file")
    if path.stat().st_size == 0:
        raise UserError(f"{path} is empty (0 bytes)")
    r = subprocess.run([ffmpeg_exe(), "-hide_banner", "-nostdin", "-i", str(path)],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    text = r.stderr.decode(errors="replace")
    info = {"path": str(path), "duration": None, "video": None, "audio": None}
    m = re.search(r"Duration: (\d+):(\d+):(\d+(?:\.\d+)?)", text)
    if m:
        info["duration"] = int(m.group(1)) * 3600 + int(m.group(2)) * 60 + float(m.group(3))
    for line in text.splitlines():
        if "Stream #" in line and "Video:" in line and info["video"] is None:
            if "attached pic" in line:
                continue
            size = re.search(r", (\d{2,5})x(\d{2,5})", line)
            fps = re.search(r"([\d.]+) fps", line)
            tbr = re.search(r"([\d.]+)k? tbr", line)
            info["video"] = {"codec": line.split("Video:")[1].split()[0].strip(","),
                             "width": int(size.group(1)) if size else None,
                             "height": int(size.group(2)) if size else None,
                             "fps": float(fps.group(1)) if fps else None,
                             "tbr": float(tbr.group(1)) if tbr else None, "rotation": 0}
        elif "Stream #" in line and "Audio:" in line and info["audio"] is None:
            rate = re.search(r"(\d+) Hz", line)
            info["audio"] = {"codec": line.split("Audio:")[1].split()[0].strip(","),
                             "rate": int(rate.group(1)) if rate else None,
                             "channels": 1 if " mono" in line else 2 if "stereo" in line else None}
    rot = re.search(r"rotation of (-?[\d.]+) degrees", text)
    if rot and info["video"]:
        info["video"]["rotation"] = int(round(float(rot.group(1)))) % 360
    if info["video"] is None and info["audio"] is None:
        last = [l for l in text.strip().splitlines() if l.strip()]
        why = last[-1].split(": ")[-1] if last else "unknown format"
        raise UserError(f"{path} is not a readable video or audio file ({why})")
    return info


def load_audio(path, sr=SR):
    """Any audio ffmpeg reads (wav/mp3/m4a/video, any rate, stereo) -> float32 mono at `sr`."""
    info = probe(path)
    if info["audio"] is None:
        raise UserError(f"{path} has no audio track")
    r = run_ffmpeg(["-i", path, "-vn", "-ac", "1", "-ar", sr, "-f", "f32le", "-"], what=f"decoding audio of {path}")
    wav = np.frombuffer(r.stdout, np.float32).copy()
    if wav.size == 0:
        raise UserError(f"{path}: the audio track is empty (0 samples)")
    return wav


def resample(wav, sr_in, sr=SR):
    """float32 mono at sr_in -> float32 mono at sr, by ffmpeg (the project's one resampler)."""
    wav = np.ascontiguousarray(wav, np.float32)
    if sr_in == sr or wav.size == 0:
        return wav.copy()
    r = run_ffmpeg(["-f", "f32le", "-ar", sr_in, "-ac", 1, "-i", "-", "-ar", sr, "-f", "f32le", "-"],
                   what="resampling audio", stdin=wav.tobytes())
    return np.frombuffer(r.stdout, np.float32).copy()


def write_wav(path, wav, sr=SR):
    import soundfile as sf
    sf.write(str(path), np.asarray(wav, np.float32), sr, subtype="PCM_16")


def is_silent(wav, thresh_db=-60.0):
    return wav.size == 0 or 20 * np.log10(np.sqrt(np.mean(wav.astype(np.float64) ** 2)) + 1e-12) < thresh_db


# ----------------------------------------------------------------------------------------------
# Mel features (SPEC §5), in plain numpy: no torch/scipy import and no librosa JIT warm-up on the
# hot path (importing librosa.filters alone costs ~5 s here). tests/test_utils.py checks the
# filterbank and the spectrogram against librosa's.
_MEL_BASIS = None


def _hz_to_mel(f):
    """Slaney mel scale (librosa's default): linear below 1 kHz, logarithmic above."""
    f = np.asarray(f, np.float64)
    lin = f / (200.0 / 3)
    return np.where(f >= 1000, 15 + np.log(np.maximum(f, 1e-10) / 1000) / (np.log(6.4) / 27), lin)


def _mel_to_hz(m):
    m = np.asarray(m, np.float64)
    return np.where(m >= 15, 1000 * np.exp((np.log(6.4) / 27) * (m - 15)), m * (200.0 / 3))


def mel_basis():
    """[80, 401] triangular filters between FMIN and FMAX, area-normalised (slaney)."""
    global _MEL_BASIS
    if _MEL_BASIS is None:
        fft_f = np.linspace(0, SR / 2, N_FFT // 2 + 1)
        pts = _mel_to_hz(np.linspace(_hz_to_mel(FMIN), _hz_to_mel(FMAX), N_MELS + 2))
        lower = (fft_f[None] - pts[:-2, None]) / np.diff(pts)[:-1, None]
        upper = (pts[2:, None] - fft_f[None]) / np.diff(pts)[1:, None]
        w = np.maximum(0, np.minimum(lower, upper)) * (2.0 / (pts[2:] - pts[:-2]))[:, None]
        _MEL_BASIS = w.astype(np.float32)
    return _MEL_BASIS


def melspectrogram(wav):
    """float32 mono 16 kHz wav [S] -> normalised log-mel [80, S // 200 + 1] in [-4, 4]."""
    x = np.asarray(wav, np.float32)
    x = np.concatenate([x[:1], x[1:] - PREEMPH * x[:-1]])      # pre-emphasis
    x = np.pad(x, N_FFT // 2)                                  # centred frames, zero padding
    n = 1 + (len(x) - N_FFT) // HOP
    frames = np.lib.stride_tricks.sliding_window_view(x, N_FFT)[::HOP][:n]   # (T, 800)
    window = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(WIN) / WIN)).astype(np.float32)  # periodic hann
    spec = np.abs(np.fft.rfft(frames * window, axis=1)).T      # (401, T)
    db = 20 * np.log10(np.maximum(mel_basis() @ spec, 1e-5)) - REF_DB
    mel = np.clip(2 * MEL_MAX * (db - MIN_DB) / -MIN_DB - MEL_MAX, -MEL_MAX, MEL_MAX)
    return mel.astype(np.float32)


def num_frames(n_samples, sr=SR):
    """Video frames that cover n_samples of audio at FPS."""
    return int(round(n_samples * FPS / sr))


def mel_window_starts(frames):
    """First mel frame of the 0.2 s window centred on each video frame (frame k spans k/25..k+1/25 s)."""
    frames = np.asarray(frames)
    return np.round((frames + 0.5) * MEL_FPS / FPS).astype(np.int64) - MEL_WIN // 2


def mel_windows(mel, frames):
    """mel [80, T], frame indices [N] -> windows [N, 1, 80, 16]; outside the audio reads as silence."""
    starts = mel_window_starts(frames)
    idx = starts[:, None] + np.arange(MEL_WIN)[None]          # (N, 16)
    valid = (idx >= 0) & (idx < mel.shape[1])
    out = mel[:, np.clip(idx, 0, mel.shape[1] - 1)]          # (80, N, 16)
    out = np.where(valid[None], out, -MEL_MAX).transpose(1, 0, 2)
    return np.ascontiguousarray(out[:, None], dtype=np.float32)


def feature_window(feats, i):
    """Audio-encoder vectors feats [T, 512] -> generator input [32, 16, 16] for frame i: the vectors
    of frames i-8 .. i+7, zero outside the audio (SPEC §5)."""
    idx = np.arange(i - FEAT_WIN // 2, i + FEAT_WIN // 2)
    valid = (idx >= 0) & (idx < len(feats))
    w = np.zeros((FEAT_WIN, feats.shape[1]), np.float32)
    w[valid] = feats[idx[valid]]
    return w.reshape(32, 16, 16)


KEY_SPAN = 2   # frames each side: an audio key averages the vectors of frames i-2 .. i+2 (0.2 s)


def audio_key(windows):
    """Generator audio windows (B, 32, 16, 16) (feature_window) -> unit vectors (B, 512): the mean of
    the vectors of frames i-KEY_SPAN .. i+KEY_SPAN. Two frames whose keys are near sound alike; the
    --reference audio bank is searched with them, in training and at inference."""
    w = np.asarray(windows, np.float32).reshape(len(windows), FEAT_WIN, -1)
    k = w[:, FEAT_WIN // 2 - KEY_SPAN:FEAT_WIN // 2 + KEY_SPAN + 1].mean(axis=1)
    return k / np.maximum(np.linalg.norm(k, axis=1, keepdims=True), 1e-8)


def iter_frames(path, width, height, fps=None):
    """Decode a video as BGR uint8 frames (height, width, 3), streamed through one ffmpeg pipe;
    `fps` resamples the timeline (duplicating/dropping frames) when given."""
    args = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-i", str(path)]
    if fps:
        args += ["-vf", f"fps={fps}"]
    args += ["-an", "-f", "rawvideo", "-pix_fmt", "bgr24", "-"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=width * height * 3 * 4)
    n = width * height * 3
    try:
        while True:
            buf = proc.stdout.read(n)
            if len(buf) < n:
                break
            yield np.frombuffer(buf, np.uint8).reshape(height, width, 3)
    finally:
        proc.stdout.close()
        err = proc.stderr.read().decode(errors="replace").strip()
        proc.stderr.close()
        rc = proc.wait()
        if rc not in (0, -15) and err and not err.endswith("Broken pipe"):
            raise UserError(f"decoding {path} failed: {err.splitlines()[-1]}")


class _Writer:
    """`with` a writer: close() (finish and rename into place) on success, abort() (remove) on an error."""

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()


class VideoWriter(_Writer):
    """Frames in, one H.264 (+AAC) mp4 out through a single ffmpeg process, no intermediate video.
    Written to a temp file beside `path` and renamed on close(); abort() (or an exception inside
    `with`) removes it, so a failed run leaves no partial output."""

    def __init__(self, path, width, height, audio=None, fps=FPS, crf=18, preset="veryfast"):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.stem}.tmp-", suffix=".mp4", dir=self.path.parent)
        os.close(fd)
        os.chmod(tmp, 0o644)            # as atomic_file: an output video is an ordinary file, not owner-only
        self.tmp = Path(tmp)
        self.size = (width, height)
        args = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-y",
                "-f", "rawvideo", "-pix_fmt", "bgr24", "-s", f"{width}x{height}", "-r", str(fps), "-i", "-"]
        if audio is not None:
            args += ["-i", str(audio)]
        # even sizes for yuv420p; +faststart so a browser can play while downloading
        args += ["-vf", "pad=ceil(iw/2)*2:ceil(ih/2)*2", "-c:v", "libx264", "-preset", preset, "-crf", str(crf),
                 "-pix_fmt", "yuv420p", "-movflags", "+faststart"]
        if audio is not None:
            args += ["-c:a", "aac", "-b:a", "160k", "-shortest"]
        args += [str(self.tmp)]
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stderr=subprocess.PIPE)
        self.frames = 0

    def write(self, frame):
        assert frame.shape[1::-1] == self.size, f"frame {frame.shape[1::-1]} != writer size {self.size}"
        try:
            self.proc.stdin.write(np.ascontiguousarray(frame, np.uint8).tobytes())
        except BrokenPipeError:
            err = self.proc.stderr.read().decode(errors="replace").strip()
            self.abort()
            raise UserError(f"writing {self.path} failed: {err.splitlines()[-1] if err else 'ffmpeg stopped'}") from None
        self.frames += 1

    def close(self):
        self.proc.stdin.close()
        err = self.proc.stderr.read().decode(errors="replace").strip()
        if self.proc.wait() != 0 or self.frames == 0:
            self.abort()
            raise UserError(f"writing {self.path} failed: {err.splitlines()[-1] if err else 'no frames'}")
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.tmp.exists():
            self.tmp.unlink()


def check_output(out_path):
    """Fail early (before minutes of inference) when the output cannot be written."""
    p = Path(out_path)
    if p.suffix.lower() not in (".mp4", ".mov"):
        raise UserError(f"output {p} must end in .mp4 (or .mov)")
    if p.is_dir():
        raise UserError(f"output {p} is a folder; give a file path ending in .mp4")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, probe_file = tempfile.mkstemp(prefix=".write-test-", dir=p.parent)
        os.close(fd)
        os.unlink(probe_file)
    except OSError as e:
        raise UserError(f"cannot write the output {p}: {e.strerror or e}; choose another --out") from None
    return p


def readable(path):
    """Give a finished output the usual permissions: temp files are created owner-only (0600)."""
    umask = 0o022
    try:
        umask = int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("Umask:")), 8)
    except (OSError, StopIteration, ValueError):
        pass
    try:
        os.chmod(path, 0o666 & ~umask)
    except OSError:
        pass


AAC_DELAY = 1024                  # samples of encoder delay at the start of an AAC track


class StreamWriter(_Writer):
    """A fragmented mp4 that grows as frames and audio arrive (playable while it is written): BGR
    frames and s16le 16 kHz mono audio, each fed by its own thread into one ffmpeg (video on its
    stdin, audio through a named pipe), so neither stream can block the other. H.264 with a key
    frame every second (one fragment per second), AAC. abort() (or an exception inside `with`)
    removes the file."""

    def __init__(self, path, width, height, fps=FPS, crf=18, preset="veryfast"):
        import queue
        import threading
        self.path, self.size, self.frames = Path(path), (width, height), 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._dir = Path(tempfile.mkdtemp(prefix="lipsync-live-"))
        fifo = self._dir / "audio.pcm"
        os.mkfifo(fifo)
        args = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-y",
                "-f", "rawvideo", "-pix_fmt", "bgr24", "-s", f"{width}x{height}", "-r", str(fps), "-i", "pipe:0",
                "-f", "s16le", "-ar", str(SR), "-ac", "1", "-i", str(fifo),
                "-vf", "pad=ceil(iw/2)*2:ceil(ih/2)*2", "-c:v", "libx264", "-preset", preset, "-tune", "zerolatency",
                "-crf", str(crf), "-g", str(fps), "-pix_fmt", "yuv420p",
                # AAC starts with AAC_DELAY samples of encoder delay, which a fragmented mp4 (no edit list)
                # plays: the audio would come 64 ms late. Those first input samples are dropped instead,
                # so the decoded track lines up with the frames (measured: 0 samples off).
                "-af", f"atrim=start_sample={AAC_DELAY},asetpts=N/SR/TB", "-c:a", "aac", "-b:a", "128k",
                # negative_cts_offsets: frame k starts at k / fps (without it the first frame lasts 104 ms)
                "-movflags", "frag_keyframe+empty_moov+default_base_moof+negative_cts_offsets", "-f", "mp4", str(self.path)]
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stderr=subprocess.PIPE)
        self._q = {"video": queue.Queue(), "audio": queue.Queue()}
        self._err = []
        self._threads = [threading.Thread(target=self._feed, args=(k, dest), daemon=True, name=f"mp4-{k}")
                         for k, dest in (("video", None), ("audio", fifo))]
        for t in self._threads:
            t.start()

    def _feed(self, kind, fifo):
        try:
            out = self.proc.stdin if fifo is None else self._open_fifo(fifo)
            with out:
                while (data := self._q[kind].get()) is not None:
                    out.write(data)
                    out.flush()
        except (BrokenPipeError, OSError) as e:
            self._err.append(e)
            while self._q[kind].get() is not None:      # drain: the producer never blocks
                pass

    def _open_fifo(self, fifo):
        """Open the audio pipe once ffmpeg reads it; a plain open would wait forever if ffmpeg died."""
        import time
        while True:
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
                os.set_blocking(fd, True)
                return os.fdopen(fd, "wb")
            except OSError:                     # ENXIO: no reader yet
                if self.proc.poll() is not None:
                    raise BrokenPipeError("ffmpeg stopped before reading the audio") from None
                time.sleep(0.02)

    def write(self, frame):
        assert frame.shape[1::-1] == self.size, f"frame {frame.shape[1::-1]} != writer size {self.size}"
        self._q["video"].put(np.ascontiguousarray(frame, np.uint8).tobytes())
        self.frames += 1

    def write_audio(self, pcm):
        """s16le bytes (or float32 samples in [-1, 1]) of 16 kHz mono audio."""
        if not isinstance(pcm, (bytes, bytearray)):
            pcm = (np.clip(np.asarray(pcm, np.float32), -1, 1) * 32767).astype("<i2").tobytes()
        self._q["audio"].put(bytes(pcm))

    def close(self):
        for q in self._q.values():
            q.put(None)
        for t in self._threads:
            t.join()
        err = self.proc.stderr.read().decode(errors="replace").strip()
        rc = self.proc.wait()
        shutil.rmtree(self._dir, ignore_errors=True)
        if rc != 0 or self.frames == 0:
            self.abort()
            raise UserError(f"writing {self.path} failed: {err.splitlines()[-1] if err else 'no frames'}")
        return self.path

    def abort(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for t in self._threads:
            t.join(timeout=1)
        shutil.rmtree(self._dir, ignore_errors=True)
        self.path.unlink(missing_ok=True)
