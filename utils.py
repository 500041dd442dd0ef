"""Shared pieces of the pipeline: config/CLI, errors, device, ffmpeg, audio + mel, crop/mask/paste
geometry, frame<->audio index mapping and checkpoint I/O. Training, inference, evaluation and the
server all import these; nothing here is copied anywhere else.

    python -c "import utils; print(utils.ffmpeg_exe())"
"""
import argparse
import ast
import dataclasses
import inspect
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import textwrap
import zipfile
from contextlib import contextmanager, nullcontext
from pathlib import Path

import cv2
import numpy as np

# ----------------------------------------------------------------------------------------------
# Constants of the design (SPEC §3, §5). Named once; everything else refers to these.
FPS = 25                 # video frames per second of every dataset and output
SR = 16000               # audio sample rate, Hz
N_FFT = 800              # STFT size, samples (50 ms)
HOP = 200                # STFT hop, samples (12.5 ms) -> 80 mel frames per second
WIN = 800                # STFT window, samples
N_MELS = 80              # mel bands
FMIN, FMAX = 55, 7600    # mel band limits, Hz
PREEMPH = 0.97           # pre-emphasis coefficient
REF_DB = 20              # dB subtracted after amplitude->dB
MIN_DB = -100            # dB floor before normalisation
MEL_MAX = 4.0            # mel normalised symmetrically to [-MEL_MAX, MEL_MAX]
MEL_FPS = SR // HOP      # 80 mel frames per second
MEL_WIN = 16             # mel frames per audio window (0.2 s)
FEAT_WIN = 16            # audio-encoder vectors per generator input (frames i-8 .. i+7)
FEAT_DIM = 512           # audio-encoder output size
CROP = 328               # face crop side, px
INNER = 320              # the part of the crop the network sees and paints
BORDER = (CROP - INNER) // 2          # 4 px ring that always stays original
MASK_RECT = (5, 5, 315, 310)          # x0, y0, x1, y1 (half-open) of the masked area in the 320 inner crop
MOUTH = slice(48, 68)    # iBUG-68 mouth points
REF_GAP = 5              # frames: a reference crop is MORE than this far from every frame it stands beside (training and inference)
JAW_OUTLINE = list(range(2, 15)) + [35, 34, 33, 32, 31]   # iBUG-68: jaw line cheek to cheek, back along the nose bottom
JAW_GROW = 0.04          # the jaw mask is grown by this share of the 320 crop (13 px) beyond the outline
JAW_SHARE = 0.02         # ... after uniting the outlines of all frames, each pixel covered by >= this share of them
MASKS = ("jaw", "rect")  # the generator's masked area: jaw = jaw_mask of the avatar's landmarks; rect = MASK_RECT
MOUTH_MARGIN = 0.3       # mouth box = landmark extent of points 48-67 grown by this share of the mouth width each side
CKPT_VERSION = 1         # bumped when the checkpoint dict changes shape
REPO = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------------------------
# Errors a user can cause end as one line, never a traceback.
class UserError(Exception):
    """A problem the user can fix; the message is one line saying what and how."""


def run_main(main, *args):
    """Run a script's main(); user errors print one line and exit 2, as the last line: progress
    bars still open are closed first, so the line is neither glued to a bar nor followed by one."""
    try:
        return main(*args)
    except UserError as e:
        _close_bars()
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        _close_bars()
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def _close_bars():
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", None) or []):
        try:
            bar.close()
        except Exception:   # a bar whose stream is gone: nothing more to print
            pass
    sys.stdout.flush()
    sys.stderr.flush()


# ----------------------------------------------------------------------------------------------
# Config: a dataclass at the top of each script; the command line is generated from it.
def _field_comments(cls):
    """Trailing `# comment` of each dataclass field line, used as --help text."""
    try:
        src = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    out = {}
    for line in src.splitlines():
        m = re.match(r"\s*(\w+)\s*:[^=]*=.*?#\s*(.*)$", line)
        if m:
            out[m.group(1)] = m.group(2).strip()
    return out


_RANGE_RE = re.compile(r"^\[(>?)([-+0-9.e]*)\.\.([-+0-9.e]*)\]\s*")


def _field_ranges(cls):
    """{field: (lo, hi, lo_exclusive)} from a leading `[lo..hi]` in a field's comment (either end
    may be empty; `[>0..]` excludes the lower end): the range a numeric setting must lie in."""
    out = {}
    for name, text in _field_comments(cls).items():
        m = _RANGE_RE.match(text)
        if m:
            out[name] = (float(m.group(2)) if m.group(2) else None, float(m.group(3)) if m.group(3) else None,
                         bool(m.group(1)))
    return out


def check_config(cfg):
    """UserError naming the first numeric setting of `cfg` (a config dataclass) outside the range
    its comment gives. Scripts call it at the start of main(), so the server and other callers
    are checked as the command line is."""
    for name, (lo, hi, excl) in _field_ranges(type(cfg)).items():
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        fmt = lambda x: f"{x:g}"
        if lo is not None and (v <= lo if excl else v < lo) or hi is not None and v > hi:
            want = " and ".join(([f"{'>' if excl else '>='} {fmt(lo)}"] if lo is not None else []) +
                                ([f"<= {fmt(hi)}"] if hi is not None else []))
            raise UserError(f"--{name} {v}: must be {want}")


def _parse_value(kind, text):
    if kind is int:
        return int(float(text)) if re.fullmatch(r"[-+]?\d+(\.0*)?([eE]\+?\d+)?", text) else int(text)
    if kind is float:
        return float(text)
    if kind in (tuple, list):
        return tuple(ast.literal_eval(text)) if text.strip().startswith(("(", "[")) else \
            tuple(int(x) if x.strip().lstrip("-").isdigit() else x.strip() for x in text.split(","))
    return text


def parse_config(cls, argv=None, description=None, positional=(), aliases=None, bare=None):
    """Build `cls` (a dataclass) from defaults + command line. `--key value` for every field,
    `--flag/--no-flag` for booleans, `positional` fields may be given bare; unknown keys fail.
    `bare` {field: value}: the value a field takes when its option is given without one
    (`--resume` alone = auto)."""
    bare = bare or {}
    helps = _field_comments(cls)
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    aliases = aliases or {}
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        names = [f"--{f.name}"] + [f"--{a}" for a, t in aliases.items() if t == f.name]
        h = helps.get(f.name, "")
        if f.name in positional:
            p.add_argument(f.name, nargs="?", default=default, help=h)
            continue
        if isinstance(default, bool):
            p.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction, default=default, help=h)
        else:
            kind = type(default) if default is not None else str
            extra = dict(nargs="?", const=bare[f.name]) if f.name in bare else {}
            p.add_argument(*names, dest=f.name, default=default, help=h, metavar=kind.__name__.upper(),
                           type=lambda s, k=kind: _parse_value(k, s), **extra)
    ns = p.parse_args(argv)
    cfg = cls(**vars(ns))
    try:
        check_config(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    return cfg


def save_config(cfg, path):
    Path(path).write_text(json.dumps(dataclasses.asdict(cfg), indent=2, default=str))


# ----------------------------------------------------------------------------------------------
# Device and precision: one helper, cuda -> mps -> cpu, overridable.
def get_device(name="auto"):
    import torch
    if name in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return dev


def autocast(device, enabled=True):
    """Mixed precision on GPU only: bf16 where supported, else fp16. On CPU, a no-op (bf16 is far
    slower than fp32 on CPUs without bf16 units, SPEC §11)."""
    import torch
    if not enabled or device.type != "cuda":
        return nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


# ----------------------------------------------------------------------------------------------
# Names and files
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def parse_widths(text, presets, count=None, least=1):
    """--widths of a network: a preset name, or comma-separated ints (a list or tuple is taken as
    it is) -> list of ints. count: how many (None = any number); least: the smallest width allowed."""
    if isinstance(text, (tuple, list)):
        w = [int(x) for x in text]
    elif text in presets:
        w = list(presets[text])
    else:
        try:
            w = [int(x) for x in str(text).replace("(", "").replace(")", "").split(",")]
        except ValueError:
            w = []
    if not w or (count is not None and len(w) != count) or min(w) < least:
        raise UserError(f"--widths {text!r}: use {' or '.join(presets)} or {count or 'some'} comma-separated ints >= {least}")
    return w


def check_name(name, what="name"):
    """Avatar/dataset names become folder names: no path tricks, no odd characters."""
    if not isinstance(name, str) or not _NAME_RE.match(name) or ".." in name:
        raise UserError(f"{what} {name!r} is not allowed: use 1-64 letters, digits, '_', '-' or '.', "
                        "starting with a letter or digit (no '/', '..' or spaces)")
    return name


def safe_stem(path):
    """A valid dataset name made from a file name."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(path).stem).strip("._-") or "video"
    return stem[:64]


@contextmanager
def atomic_dir(final):
    """Build a folder in a temp sibling and rename it into place only when the body succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        import shutil
        shutil.rmtree(final)
    os.replace(tmp, final)


@contextmanager
def atomic_file(final):
    """Yield a temp path next to `final`; it replaces `final` only when the body succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.stem}.tmp-", suffix=final.suffix, dir=final.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)            # mkstemp makes owner-only files; outputs are ordinary files
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


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


def run_ffmpeg(args, what="ffmpeg"):
    """Run ffmpeg with an argument list; on failure raise UserError with ffmpeg's last line."""
    r = subprocess.run([ffmpeg_exe(), "-hide_banner", "-nostdin", "-y", *map(str, args)],
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


# ----------------------------------------------------------------------------------------------
# Crop / mask / paste geometry (SPEC §3). Boxes are (x0, y0, x1, y1) half-open, in frame pixels.
def crop_box(lm68):
    """Square box from 68-point landmarks: contour points 1 and 15 give the sides, nose point 29
    the top; the box is as tall as it is wide, so it reaches past the chin."""
    lm = np.asarray(lm68, np.float64)
    x0, x1 = lm[1, 0], lm[15, 0]
    y0 = lm[29, 1]
    w = max(x1 - x0, 8.0)
    return np.array([round(x0), round(y0), round(x0) + round(w), round(y0) + round(w)], np.int64)


def to_crop_coords(lms, boxes):
    """Landmarks in frame pixels [N, K, 2] + crop boxes [N, 4] -> landmarks in 320-crop pixels."""
    lms, boxes = np.asarray(lms, np.float64), np.asarray(boxes, np.float64)
    scale = CROP / (boxes[:, 2] - boxes[:, 0])                       # (N,) crop px per frame px
    return (lms - boxes[:, None, :2]) * scale[:, None, None] - BORDER


def mouth_box(lm320, margin=MOUTH_MARGIN, size=INNER):
    """Box (x0, y0, x1, y1), half-open ints inside the 320 crop, around the 20 mouth points of
    one face's 68 landmarks in crop coordinates, grown by `margin` x mouth width each side."""
    m = np.asarray(lm320, np.float64)[MOUTH]
    lo, hi = m.min(0), m.max(0)
    pad = margin * (hi[0] - lo[0])
    x0, y0 = np.floor(lo - pad).astype(int)
    x1, y1 = np.ceil(hi + pad).astype(int) + 1
    x0, y0 = max(x0, 0), max(y0, 0)
    x1, y1 = min(max(x1, x0 + 8), size), min(max(y1, y0 + 8), size)   # >= 8 px: SSIM's window fits
    return int(x0), int(y0), int(x1), int(y1)


def resize(img, size):
    """The one resize convention of the project: INTER_AREA when shrinking, INTER_CUBIC when
    enlarging (the reference mixed linear and cubic between training and inference)."""
    h, w = img.shape[:2]
    tw, th = size
    interp = cv2.INTER_AREA if tw * th < w * h else cv2.INTER_CUBIC
    return cv2.resize(img, (tw, th), interpolation=interp)


def _region(frame, box):
    """Pixels of `box`, edge-replicated where the box leaves the frame."""
    h, w = frame.shape[:2]
    x0, y0, x1, y1 = (int(v) for v in box)
    pad = max(0, -x0, -y0, x1 - w, y1 - h)
    if pad:
        frame = cv2.copyMakeBorder(frame, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
    return frame[y0 + pad:y1 + pad, x0 + pad:x1 + pad]


def crop_face(frame, box):
    """Full frame (H, W, 3) + box -> the 328x328 face crop."""
    return resize(_region(frame, box), (CROP, CROP))


def inner(crop):
    """328 crop -> the 320 centre the network sees."""
    return crop[BORDER:BORDER + INNER, BORDER:BORDER + INNER]


def rect_mask():
    """The reference's masked area as a bool (320, 320) map: MASK_RECT, nearly the whole crop."""
    m = np.zeros((INNER, INNER), bool)
    x0, y0, x1, y1 = MASK_RECT
    m[y0:y1, x0:x1] = True
    return m


def jaw_mask(lm320, grow=JAW_GROW, share=JAW_SHARE, max_frames=600):
    """The area a generator repaints for one avatar, a bool (320, 320) map: the lower face under
    the nose (outline JAW_OUTLINE) in the frames' 320-crop landmarks [N, 68, 2], united over the
    frames (a pixel counts when >= `share` of them cover it, so a few bad landmarks do not widen
    it), grown by `grow` x 320 px and kept inside MASK_RECT. One fixed map for all frames: a mask
    that followed each frame's chin would tell the network how far the jaw is open."""
    lm = np.asarray(lm320, np.float64)
    if lm.ndim == 2:
        lm = lm[None]
    lm = lm[np.linspace(0, len(lm) - 1, min(len(lm), max_frames)).round().astype(int)]
    acc = np.zeros((INNER, INNER), np.float32)
    one = np.zeros((INNER, INNER), np.uint8)
    for p in lm:
        one[:] = 0
        cv2.fillPoly(one, [np.round(p[JAW_OUTLINE]).astype(np.int32)], 1)
        acc += one
    m = (acc >= max(1.0, share * len(lm))).astype(np.uint8)
    g = max(int(round(grow * INNER)), 1)
    m = cv2.dilate(m, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * g + 1, 2 * g + 1)))
    return (m > 0) & rect_mask()


def mask_inner(img320, mask=None):
    """Copy of a 320 crop (H, W, C) or batch (..., H, W, C) with the generator's masked area zeroed:
    `mask` a bool (320, 320) map (jaw_mask), None = MASK_RECT."""
    out = np.array(img320, copy=True)
    if mask is None:
        x0, y0, x1, y1 = MASK_RECT
        out[..., y0:y1, x0:x1, :] = 0
    else:
        out[..., np.asarray(mask, bool), :] = 0
    return out


_ALPHA = {}


def mask_key(mask):
    """A hashable key of a mask (None = MASK_RECT) for caches."""
    return None if mask is None else hash(np.packbits(np.asarray(mask, bool)).tobytes())


def paste_alpha(feather, mask=None):
    """Soft blend weights on the 328 crop: 1 inside the masked area (`mask`, None = MASK_RECT)
    shrunk by `feather` px, falling smoothly to 0 at its edge (a hard edge leaves visible seams);
    0 outside it, where the crop keeps its original pixels."""
    key = (int(max(feather, 0)), mask_key(mask))
    if key not in _ALPHA:
        m = np.zeros((CROP, CROP), np.uint8)
        m[BORDER:BORDER + INNER, BORDER:BORDER + INNER] = rect_mask() if mask is None else np.asarray(mask, bool)
        f = key[0]
        a = m.astype(np.float32)
        if f:
            k = 2 * f + 1
            a = cv2.erode(m, np.ones((k, k), np.uint8)).astype(np.float32)
            a = cv2.GaussianBlur(a, (k, k), f / 2.0) * m
        _ALPHA[key] = a
    return _ALPHA[key]


def paste_back(frame, box, crop328, feather=16, mask=None):
    """Blend a generated 328 crop into the frame in place of `box` (returns a new frame); only
    the generator's masked area (`mask`, None = MASK_RECT) is taken from it, feathered."""
    h, w = frame.shape[:2]
    x0, y0, x1, y1 = (int(v) for v in box)
    bw, bh = x1 - x0, y1 - y0
    gen = resize(crop328, (bw, bh)).astype(np.float32)
    alpha = resize(paste_alpha(feather, mask), (bw, bh))[..., None]
    # clip the box to the frame; the generated crop is clipped the same way
    cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    if cx0 >= cx1 or cy0 >= cy1:
        return frame.copy()
    out = frame.copy()
    sub = out[cy0:cy1, cx0:cx1].astype(np.float32)
    g = gen[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0]
    a = alpha[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0]
    out[cy0:cy1, cx0:cx1] = np.clip(a * g + (1 - a) * sub + 0.5, 0, 255).astype(np.uint8)
    return out


def match_color(src, ref, mask=None):
    """Shift `src` (uint8 BGR) to the per-channel mean/std of `ref` in Lab, measured where mask>0.5."""
    s = cv2.cvtColor(src, cv2.COLOR_BGR2LAB)
    r = cv2.cvtColor(ref, cv2.COLOR_BGR2LAB)
    m = None if mask is None else (np.asarray(mask) > 0.5).astype(np.uint8)
    # cv2.meanStdDev: the same statistics as numpy's mean/std over s[m], ~5x faster per frame
    sm, ss = cv2.meanStdDev(s, mask=m)
    rm, rs = cv2.meanStdDev(r, mask=m)
    # contrast is matched only within a factor of 1.5: a flat (blurry, early-training) crop has a
    # tiny std, and an unbounded ratio would blow its colours up into saturated blobs
    scale = np.clip((rs.ravel() + 1e-3) / (ss.ravel() + 1e-3), 1 / 1.5, 1.5).astype(np.float32)
    shift = (rm.ravel() - sm.ravel() * scale).astype(np.float32)
    out = s.astype(np.float32) * scale + shift
    return cv2.cvtColor(np.clip(out, 0, 255).astype(np.uint8), cv2.COLOR_LAB2BGR)


# ----------------------------------------------------------------------------------------------
# Checkpoints: one dict, written atomically, loaded with map_location.
def save_checkpoint(obj, path):
    import torch
    obj = dict(obj, format_version=CKPT_VERSION)
    with atomic_file(path) as tmp:
        torch.save(obj, tmp)


def load_checkpoint(path, device="cpu", mmap=False):
    """`mmap=True` maps the tensors instead of reading them: cheap when only the metadata is needed."""
    import torch
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=False, mmap=mmap)
    except Exception as e:  # torch raises many types for a damaged file
        raise UserError(f"checkpoint {path} cannot be read ({type(e).__name__}); it is damaged or not a checkpoint") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise UserError(f"{path} is not a checkpoint of this project (no 'model' entry)")
    if ckpt.get("format_version", 0) > CKPT_VERSION:
        raise UserError(f"{path} was written by a newer version of this project; update the code")
    return ckpt


def checkpoint_mask(ckpt):
    """The masked area a generator checkpoint was trained with: bool (320, 320), None = MASK_RECT
    (checkpoints from before --mask hold none and were trained with the rectangle)."""
    m = ckpt.get("mask")
    return None if m is None else np.asarray(m.numpy() if hasattr(m, "numpy") else m, bool)


GEN_CHECKPOINTS = ("best.pth", "last.pth")   # a generator folder's default checkpoint, in order of preference


def default_generator_checkpoint(folder):
    """The checkpoint a generator folder is used through when none is named: best.pth (lowest
    held-out L1), else last.pth; None when it holds neither."""
    for f in GEN_CHECKPOINTS:
        if (Path(folder) / f).is_file():
            return Path(folder) / f
    return None


def package_version(dist):
    """Installed version of a distribution, or None."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def warmup_cosine(step, lr, warmup, end, min_frac):
    """Learning rate at `step`: linear warm-up over `warmup` steps, then cosine decay to
    lr x min_frac at step `end` (flat after it). A pure function of the step, so a resumed run
    continues the same curve."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, end - warmup))
    return lr * (min_frac + (1 - min_frac) * 0.5 * (1 + math.cos(math.pi * t)))


def unwrap(model):
    """The plain module under DDP / torch.compile wrappers, for saving."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


# ----------------------------------------------------------------------------------------------
# Dataset layout (written by process.py, read by everything else)
DATASET_DIR = REPO / "dataset"
CHECKPOINT_DIR = REPO / "checkpoint"


def dataset_path(name, root=None):
    return Path(root or DATASET_DIR) / check_name(name, "dataset name")


def load_meta(ds):
    ds = Path(ds)
    meta = ds / "meta.json"
    if not meta.is_file():
        raise UserError(f"no processed dataset at {ds}; run: python process.py VIDEO --name {ds.name}")
    try:
        out = json.loads(meta.read_text())
    except (ValueError, UnicodeDecodeError):
        out = None
    if not isinstance(out, dict):
        raise UserError(f"{meta} is damaged; rebuild the dataset: python process.py VIDEO --name {ds.name} --overwrite")
    return out


# What rebuilds each file of a dataset, for the error that names a damaged one.
_REBUILD = {"aud_feat.npy": "python syncnet_328.py --name {name} --features_only"}


def load_npy(path, mmap=False):
    """np.load of a dataset's .npy/.npz file; a truncated or damaged one is a UserError naming the
    file and the command that rebuilds it (process.py for most, syncnet_328.py for aud_feat.npy)."""
    path = Path(path)
    fix = _REBUILD.get(path.name, "python process.py VIDEO --name {name} --overwrite").format(name=path.parent.name)
    try:
        out = np.load(path, mmap_mode="r" if mmap else None)
        if isinstance(out, np.lib.npyio.NpzFile):
            out = {k: out[k] for k in out.files}   # read now: a damaged member fails here, not later
    except FileNotFoundError:
        raise UserError(f"{path} is missing; rebuild it: {fix}") from None
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise UserError(f"{path} is damaged ({str(e).splitlines()[0][:80]}); rebuild it: {fix}") from None
    return out



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



class VideoWriter:
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

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()


def hardware(device=None):
    """One line naming the machine a benchmark ran on (CPU model, cores, threads, GPU, load)."""
    import platform
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    cuda = (device is None or getattr(device, "type", "") == "cuda") and torch.cuda.is_available()
    gpu = torch.cuda.get_device_name(device if device is not None else 0) if cuda else "no GPU"
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), {gpu}, "
            f"Python {platform.python_version()}, load avg {os.getloadavg()[0]:.1f}")   # other processes share the CPU
