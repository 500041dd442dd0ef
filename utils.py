"""Shared pieces of the pipeline: the design constants, the files of a dataset and a checkpoint
folder, config/CLI, errors, device, names, atomic files and checkpoint I/O. Media (ffmpeg, audio,
mel) lives in media_io.py and crop/mask/paste geometry in geometry.py. Training, inference,
evaluation and the server all import these; nothing here is copied anywhere else.

    python -c "import utils; print(utils.get_device())"
"""
import argparse
import ast
import dataclasses
import inspect
import json
import math
import os
import re
import sys
import tempfile
import textwrap
import zipfile
from contextlib import contextmanager, nullcontext
from functools import lru_cache
from pathlib import Path

import numpy as np

# ----------------------------------------------------------------------------------------------
# Constants of the design (SPEC §3, §5). Named once; everything else refers to these.
FPS = 25                 # video frames per second of every dataset and output
LONG_RECORDING_S = 55.0  # a minute, give or take: from here on the speech source and the context swap pay (RESULTS.md rounds 30, 42)
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
UPPER_FACE = list(range(17, 36)) + [36, 39, 42, 45]   # iBUG-68: brows, nose, eye corners: where the head is (the mouth moves them little)
JAW_GROW = 0.04          # the jaw mask is grown by this share of the 320 crop (13 px) beyond the outline
JAW_SHARE = 0.02         # ... after uniting the outlines of all frames, each pixel covered by >= this share of them
MASKS = ("jaw", "under_nose", "rect")  # the generator's masked area: jaw = jaw_mask of the avatar's landmarks; under_nose = the same not grown upwards; rect = MASK_RECT
MOUTH_MARGIN = 0.3       # mouth box = landmark extent of points 48-67 grown by this share of the mouth width each side
CKPT_VERSION = 1         # bumped when the checkpoint dict changes shape
REPO = Path(__file__).resolve().parent
# The files of a dataset folder (dataset/NAME/, written by process.py and syncnet_328.py) and of a
# checkpoint folder (checkpoint/NAME/), named once.
META = "meta.json"               # facts of the recording and of the processing
FRAMES_DIR = "frames"            # the full frames, 000000.jpg ...
CROPS = "crops.npy"              # (N, 328, 328, 3) uint8 BGR face crops
MEL = "mel.npy"                  # (80, T) log-mel of the whole wav, 80 frames per second
LANDMARKS = "landmarks.npz"      # lms (N, 68, 2) smoothed, crop_boxes (N, 4), found (N,)
AUDIO_WAV = "aud.wav"            # the recording's audio, 16 kHz mono
AUD_FEAT, AUD_FEAT_INFO = "aud_feat.npy", "aud_feat.json"   # (N, 512) audio features, one per frame (syncnet_328.py); which encoder made them
AUD_FEAT_AUG = "aud_feat_aug.npz"   # feats (K, N, 512) of K augmented copies of the audio, encoder_id (syncnet_328 --feature_variants)
SYNCNET_BEST, SYNCNET_LAST = "syncnet_best.pth", "syncnet_last.pth"
BEST, LAST = "best.pth", "last.pth"     # the generator's checkpoints


def frame_file(folder, i):
    """Frame i of a frames folder (dataset/NAME/frames or a template's): 000123.jpg."""
    return Path(folder) / f"{i:06d}.jpg"


# ---------------------------------------------------------------- errors a user can cause: one line, no traceback
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
        h = helps.get(f.name, "").replace("%", "%%")     # argparse %-formats help texts
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


@lru_cache(maxsize=1)
def cpu_bf16():
    """True where the CPU has bf16 units (AVX512-BF16, AMX; torch's private probes, absent = no): bf16 ~2x fp32 there."""
    import torch
    return any(getattr(torch.cpu, f, lambda: False)() for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def gpu_bf16():
    """True where the GPU has bf16 units (Ampere on; torch's default answer counts emulation): else fp16 + loss scaling."""
    import torch
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


def autocast(device, enabled=True, cpu=False):
    """Mixed precision: GPU bf16 where native (else fp16); CPU bf16 for training loops (cpu=True) if cpu_bf16()."""
    import torch
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16 if gpu_bf16() else torch.float16)
    on_cpu = enabled and device.type == "cpu" and cpu and cpu_bf16()
    return torch.autocast("cpu", dtype=torch.bfloat16) if on_cpu else nullcontext()


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
    return (re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(path).stem).strip("._-") or "video")[:64]


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


def resume_checkpoint(mode, last_path, device="cpu", existing="error"):
    """The checkpoint a trainer's --resume names, loaded; None for a new run. The one convention of
    train_328.py and syncnet_328.py: "" a new run; "auto" (a bare --resume) last_path when it
    exists, else a new run; "last" (or True, the old yes/no flag) last_path, which must exist;
    anything else a path, which must exist. A new run where last_path exists: existing="error"
    refuses (train_328 without --overwrite), "note" says its checkpoints will be replaced, "replace"
    replaces them quietly (train_328 --overwrite)."""
    assert existing in ("error", "note", "replace"), existing
    mode, last = ("last" if mode is True else str(mode or "")), Path(last_path)
    path = last if mode in ("auto", "last") else Path(mode)
    if mode and (mode != "auto" or path.is_file()):
        if not path.is_file():
            raise UserError(f"--resume last: checkpoint not found: {path}; start without --resume" if mode == "last"
                            else f"--resume: checkpoint not found: {path}")
        return load_checkpoint(path, device)
    if last.is_file() and existing == "error":
        raise UserError(f"{last.parent} already holds a run; pass --resume auto to continue it or --overwrite to start again")
    if last.is_file() and existing == "note":
        print(f"note: starting fresh; the checkpoints in {last.parent} will be replaced (--resume continues them)")
    return None


def checkpoint_mask(ckpt):
    """The masked area a generator checkpoint was trained with: bool (320, 320), None = MASK_RECT
    (checkpoints from before --mask hold none and were trained with the rectangle)."""
    m = ckpt.get("mask")
    return None if m is None else np.asarray(m.numpy() if hasattr(m, "numpy") else m, bool)


GEN_CHECKPOINTS = (LAST, BEST)   # a generator folder's default checkpoint, in order of preference (RESULTS.md round 53)


def default_generator_checkpoint(folder):
    """The checkpoint a generator folder is used through when none is named: last.pth (the end of training, what
    every figure measures; best.pth scored lower: RESULTS.md round 53), else best.pth; None when it holds neither."""
    for f in GEN_CHECKPOINTS:
        if (Path(folder) / f).is_file():
            return Path(folder) / f
    return None


def package_version(dist):
    """Installed version of a distribution, or None."""
    from importlib import metadata
    return next((d.version for d in metadata.distributions(name=dist)), None)


def warmup_cosine(step, lr, warmup, end, min_frac):
    """Learning rate at `step`: linear warm-up over `warmup` steps, then cosine decay to lr x min_frac
    at step `end` (flat after it). A pure function of the step: a resumed run continues the curve."""
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
    meta = ds / META
    if not meta.is_file():
        raise UserError(f"no processed dataset at {ds}; run: python process.py VIDEO --name {ds.name}")
    try:
        out = json.loads(meta.read_text())
    except (ValueError, UnicodeDecodeError):
        out = None
    if not isinstance(out, dict):
        raise UserError(f"{meta} is damaged; rebuild the dataset: python process.py VIDEO --name {ds.name} --overwrite")
    return out


_REBUILD = {AUD_FEAT: "python syncnet_328.py --name {name} --features_only",   # what rebuilds a damaged file
            AUD_FEAT_AUG: "python syncnet_328.py --name {name} --features_only --feature_variants 4"}


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


def hardware(device=None):
    """One line naming the machine a benchmark ran on (CPU model, cores, threads, GPU, load)."""
    import platform
    import torch
    info = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []
    cpu = next((l.split(":", 1)[1].strip() for l in info if l.startswith("model name")), platform.processor() or platform.machine())
    cuda = (device is None or getattr(device, "type", "") == "cuda") and torch.cuda.is_available()
    gpu = torch.cuda.get_device_name(device if device is not None else 0) if cuda else "no GPU"
    return (f"{cpu}{' (bf16 units)' if cpu_bf16() else ''}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), {gpu}, "
            f"Python {platform.python_version()}, load avg {os.getloadavg()[0]:.1f}")   # other processes share the CPU
