"""The generator of a checkpoint file and the runtimes that run it (SPEC §11): loading the U-Net
and the AudioEncoder a checkpoint holds; running the U-Net through OpenVINO (bf16, on CPUs with
bf16 units), ONNX Runtime, torch.compile or eager PyTorch, whichever is the fastest for the device
that reproduces eager PyTorch (to MATCH_TOL in float32, BF16_PSNR in bf16), the exported ONNX graph
cached per checkpoint file (LIPSYNC_CACHE, default ~/.cache/lipsync).
Used by inference_328.LipSyncModel (and so by the server and evaluate.py) and bench_inference.py.

    python bench_inference.py --widths light --seconds 2 --long_seconds 0 --mid_seconds 0 --no-compile --iters 3   # each runtime's speed and error
"""
import functools
import hashlib
import os
import sys
from pathlib import Path

import numpy as np

import utils
from utils import INNER, UserError

MATCH_TOL = 1e-3                  # a faster float32 U-Net runtime is used only if it equals eager this closely
BF16_PSNR = 45.0                  # dB: OpenVINO computes in bf16 on CPUs with bf16 units; used if its output is this near eager's
BACKENDS = {"cpu": ("ov", "ort", "eager"), "cuda": ("eager",), "mps": ("eager",)}   # tried in this order for backend=auto
GRAPH_KINDS = ("ort", "ov")       # runtimes that run the exported ONNX graph
ONNX_OPSET = 17                   # ONNX operator set of the exported U-Net
ONNX_CACHE_KEEP = 8               # exported U-Net graphs kept in the cache folder (~50 MB each at full widths)


# ----------------------------------------------------------------------------------------------
# The generator of a checkpoint file
def load_generator(path):
    """A generator checkpoint file (train_328.py) -> (unet, audio_encoder, info) on the CPU: the
    UNet328 of its widths, base and stem and the audio encoder that made its training features, weights
    loaded, BatchNorm not yet folded; info = widths, step, config, mask (the area it repaints:
    bool (320, 320), None = MASK_RECT), guidance and guidance_photo (guidance_fit's, None when not fitted). A file that does not hold them is one UserError."""
    from audio_features import encoder_from_state
    from unet_328 import UNet328
    path = Path(path)
    ckpt = utils.load_checkpoint(path, "cpu")
    widths = _widths_of(ckpt, path)
    try:
        config = ckpt.get("config") or {}
        unet = UNet328(widths, base=config.get("base", "none"), stem=config.get("stem", "conv"), audio_film=config.get("audio_film", False))
    except ValueError as e:
        raise UserError(f"{path}: {e}; it was written by a newer train_328.py") from None
    try:
        unet.load_state_dict(ckpt["model"])
    except (RuntimeError, TypeError, AttributeError) as e:
        raise UserError(f"{path} does not hold a UNet328 of widths {widths} "
                        f"(wrong architecture or damaged: {str(e).splitlines()[0][:160]})") from None
    if not ckpt.get("audio_encoder"):
        raise UserError(f"{path} has no 'audio_encoder' entry; it was not written by train_328.py "
                        "(a generator checkpoint carries the audio encoder its features came from)")
    try:
        enc = encoder_from_state(ckpt["audio_encoder"], ckpt.get("audio_source", "mel"))
    except (ValueError, RuntimeError, TypeError, AttributeError) as e:
        raise UserError(f"{path}: its audio encoder does not load ({str(e)[:160]})") from None
    bank = ckpt.get("ref_bank")    # train_328 --reference audio: (crops, keys) for inference --reference audio
    info = dict(widths=widths, step=ckpt.get("step"), config=ckpt.get("config") or {}, mask=utils.checkpoint_mask(ckpt),
                guidance=ckpt.get("guidance"), guidance_photo=ckpt.get("guidance_photo"),
                ref_bank=None if not bank else (np.asarray(bank["crops"]), np.asarray(bank["keys"], np.float32)))
    return unet, enc, info


def _widths_of(ckpt, path):
    """UNet328 widths from the checkpoint's config, else recognised from the weights' shapes."""
    from unet_328 import WIDTHS
    w = (ckpt.get("config") or {}).get("widths")
    if isinstance(w, str):
        if w not in WIDTHS:
            raise UserError(f"{path}: unknown widths {w!r} in its config (known: {', '.join(WIDTHS)})")
        return WIDTHS[w]
    if w is not None:
        return tuple(int(x) for x in w)
    sd = ckpt["model"]
    first = sd.get("inc.block.0.conv.6.weight")   # (w0, hidden, 1, 1): the first block's projection
    for v in WIDTHS.values():
        if first is not None and first.shape[0] == v[0]:
            return v
    raise UserError(f"{path}: cannot tell the generator's widths (no config['widths']); it is not a UNet328 checkpoint")


# ----------------------------------------------------------------------------------------------
# Its runtimes
def fresh_inputs(batch, seed=0):
    """Random U-Net inputs on the CPU: img (batch, 6, 320, 320) in [0, 1), audio (batch, 32, 16, 16)."""
    import torch
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 6, INNER, INNER, generator=g), torch.randn(batch, 32, 16, 16, generator=g)


class UNetRunner:
    """Runs the (BN-folded) U-Net on numpy batches: img (B, 6, 320, 320), audio (B, 32, 16, 16)
    float32 -> (B, 3, 320, 320) float32. `kind` says which runtime: eager, compile or ort."""

    def __init__(self, model, device, kind, graph=None):
        self.device, self.kind, self.model = device, kind, model
        self.fixed_batch = None
        if str(device) == "cpu":
            single_thread_blas()
        if kind in GRAPH_KINDS:
            self.graph = graph if graph is not None else export_onnx(model)
            self.session = ort_session(self.graph) if kind == "ort" else ov_request(self.graph)
            return
        import torch
        if kind == "compile":
            self.fn = torch.compile(model, dynamic=False)
        elif kind != "eager":
            raise UserError(f"unknown --backend {kind!r}; choose auto, ov, ort, compile or eager")

    def __call__(self, img, audio):
        if self.kind == "ort":
            return self.session.run(None, {"img": img, "audio": audio})[0]
        if self.kind == "ov":           # the request reuses its output buffer: copy
            return np.array(self.session.infer({"img": img, "audio": audio})[0], np.float32, copy=True)
        import torch
        n = len(img)
        if self.fixed_batch and n < self.fixed_batch:     # compiled graphs are shape-specialised: pad
            pad = self.fixed_batch - n
            img = np.concatenate([img, np.repeat(img[-1:], pad, 0)])
            audio = np.concatenate([audio, np.repeat(audio[-1:], pad, 0)])
        x = torch.from_numpy(img).to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        a = torch.from_numpy(audio).to(self.device, non_blocking=True)
        with torch.inference_mode(), utils.autocast(self.device):
            out = (self.fn if self.kind == "compile" else self.model)(x, a)
        return out.float().cpu().numpy()[:n]


@functools.lru_cache(maxsize=1)
def single_thread_blas():
    """Keep numpy's BLAS (OpenBLAS) to one thread in a process whose cores belong to the U-Net's
    runtime. After each numpy matmul (the mel filterbank of every audio chunk) OpenBLAS's idle
    threads spin for a while, and beside OpenVINO that doubled the U-Net's time per frame in a live
    stream (light widths: 14 -> 26 ms; README section 4). -> the threadpoolctl limiter, or None
    where threadpoolctl is missing (the limit then stays as numpy set it)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return None
    return threadpool_limits(1, user_api="blas")


def _threads():
    """As many threads as torch would use (its --threads), or the cores this process may run on
    when torch is not loaded (the torch-free path)."""
    torch = sys.modules.get("torch")
    return torch.get_num_threads() if torch is not None else len(os.sched_getaffinity(0))


def ort_session(graph):
    """An ONNX Runtime CPU session (float32) with _threads() threads."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = _threads()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")   # idle threads sleep: the paste and the audio get the cores between calls
    return ort.InferenceSession(graph, so, providers=["CPUExecutionProvider"])


@functools.lru_cache(maxsize=1)
def ov_bf16():
    """Whether OpenVINO is installed and computes in bf16 on this CPU (AVX512-BF16 or AMX units):
    there it runs the U-Net ~2x faster than ONNX Runtime's float32; elsewhere it is no faster."""
    import importlib.util
    if importlib.util.find_spec("openvino") is None:
        return False
    import openvino
    return "BF16" in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def ov_request(graph):
    """An OpenVINO infer request for the ONNX graph on the CPU: bf16 where the CPU has bf16 units,
    _threads() threads, one stream, any batch (a new batch size costs one slower first call)."""
    import openvino
    core = openvino.Core()
    compiled = core.compile_model(core.read_model(graph), "CPU", {
        "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1, "INFERENCE_NUM_THREADS": _threads(),
        "INFERENCE_PRECISION_HINT": "bf16" if ov_bf16() else "f32"})
    return compiled.create_infer_request()


def psnr01(a, b):
    """PSNR (dB) of two arrays of values in [0, 1]."""
    mse = float(np.mean((np.asarray(a, np.float64) - b) ** 2))
    return 10 * np.log10(1 / mse) if mse > 0 else float("inf")


class OrtAudio:
    """The mel AudioEncoder (BN folded) in ONNX Runtime: mel windows (B, 1, 80, 16) -> (B, 512)."""
    source = "mel"

    def __init__(self, graph):
        self.graph, self.session = graph, ort_session(graph)

    def __call__(self, windows):
        return self.session.run(None, {"mel": np.ascontiguousarray(windows, np.float32)})[0]


def export_onnx(model):
    """The U-Net as ONNX bytes (dynamic batch), exported on CPU from a float32 copy."""
    import copy
    import io
    import warnings
    import torch
    buf = io.BytesIO()
    cpu_model = copy.deepcopy(model).to("cpu", memory_format=torch.contiguous_format).float().eval()
    x, a = fresh_inputs(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the legacy exporter's deprecation and tracer notes
        torch.onnx.export(cpu_model, (x, a), buf, dynamo=False, opset_version=ONNX_OPSET,
                          input_names=["img", "audio"], output_names=["out"],
                          dynamic_axes={"img": {0: "b"}, "audio": {0: "b"}, "out": {0: "b"}})
    return buf.getvalue()


def export_audio_onnx(encoder):
    """The (BN-folded) mel AudioEncoder as ONNX bytes, dynamic batch."""
    import copy
    import io
    import warnings
    import torch
    buf = io.BytesIO()
    enc = copy.deepcopy(encoder).to("cpu").float().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(enc, (torch.zeros(2, 1, utils.N_MELS, utils.MEL_WIN),), buf, dynamo=False,
                          opset_version=ONNX_OPSET, input_names=["mel"], output_names=["feat"],
                          dynamic_axes={"mel": {0: "b"}, "feat": {0: "b"}})
    return buf.getvalue()


def onnx_cache_path(checkpoint, part="unet"):
    """Where the exported graphs of a checkpoint file are kept (the export takes 5-15 s here): keyed
    by the file's path, size and mtime and the library versions (read without importing them), so
    any change re-exports. part: unet (.onnx), audio (.onnx), info (.json), ov (.json: OpenVINO's
    check, see ov_psnr), mask (.npy), bank (.npz)."""
    p = Path(checkpoint).resolve()
    st = p.stat()
    key = f"{p}|{st.st_size}|{st.st_mtime_ns}|{_version('torch')}|{_version('onnxruntime')}|{ONNX_OPSET}"
    root = Path(os.environ.get("LIPSYNC_CACHE") or Path.home() / ".cache" / "lipsync")
    ext = {"info": ".json", "ov": ".json", "mask": ".npy", "bank": ".npz"}.get(part, ".onnx")
    return root / f"{part}-{hashlib.sha1(key.encode()).hexdigest()[:16]}{ext}"


def _version(package):
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(package)
    except PackageNotFoundError:
        return "-"


def ov_psnr(checkpoint):
    """How near eager's (PSNR dB) this checkpoint's U-Net came out of OpenVINO when make_runner
    checked it with the OpenVINO installed now; None when it was not checked with it."""
    import json
    try:
        mark = json.loads(onnx_cache_path(checkpoint, "ov").read_text())
        return float(mark["psnr_db"]) if mark.get("openvino") == _version("openvino") else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _prune_cache(folder, keep=ONNX_CACHE_KEEP):
    files = sorted(Path(folder).glob("unet-*.onnx"), key=lambda f: f.stat().st_mtime, reverse=True)
    for f in files[keep - 1:]:
        for part in ("unet-*.onnx", "audio-*.onnx", "info-*.json", "ov-*.json", "mask-*.npy", "bank-*.npz"):
            for g in Path(folder).glob(part.replace("*", f.stem.split("-", 1)[1])):
                g.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------
# The torch-free path: U-Net and audio encoder from the cache, no PyTorch in the process
def torch_free(device, backend):
    """Whether this request may run without PyTorch: ONNX Runtime or OpenVINO on a CPU, by choice or
    by default (device auto on a machine without an NVIDIA driver or Apple GPU)."""
    import importlib.util
    if backend not in ("auto", *GRAPH_KINDS) or importlib.util.find_spec("onnxruntime") is None:
        return False
    gpu = Path("/proc/driver/nvidia/version").exists() or sys.platform == "darwin"
    return str(device) == "cpu" or (str(device) in ("auto", "") and not gpu)


def cached_generator(checkpoint, backend="auto"):
    """(U-Net runner, OrtAudio, info) of a checkpoint whose graphs a previous run cached (see
    cache_generator), loaded without PyTorch; None when any part is missing, or when OpenVINO is to
    be tried (backend ov, or auto on a CPU with bf16 units) and was not checked on it yet. The
    U-Net runs in OpenVINO where its check passed and backend allows it, else in ONNX Runtime."""
    import json
    paths = {k: onnx_cache_path(checkpoint, k) for k in ("unet", "audio", "info")}
    want_ov = backend == "ov" or (backend == "auto" and ov_bf16())
    checked = ov_psnr(checkpoint) if want_ov else None
    ov = checked is not None and checked >= BF16_PSNR
    if not all(p.is_file() for p in paths.values()) or (want_ov and checked is None) or (backend == "ov" and not ov):
        return None
    info = json.loads(paths["info"].read_text())
    info["widths"] = tuple(info["widths"])
    info["mask"] = np.load(onnx_cache_path(checkpoint, "mask")) if info.pop("has_mask") else None
    info["ref_bank"] = None
    if info.pop("has_bank", False):
        with np.load(onnx_cache_path(checkpoint, "bank")) as z:
            info["ref_bank"] = (z["crops"], z["keys"])
    r = UNetRunner(None, "cpu", "ov" if ov else "ort", paths["unet"].read_bytes())
    r.max_abs_diff = None                             # checked when it was cached
    return r, OrtAudio(paths["audio"].read_bytes()), info


def cache_generator(checkpoint, encoder, info):
    """After the U-Net's graph passed its check (make_runner): export the mel audio encoder, check
    it against PyTorch (MATCH_TOL), and cache it with the info and mask, so the next load of this
    checkpoint needs no PyTorch. Speech-source encoders are not cached (they stay in PyTorch)."""
    import json
    import torch
    from audio_features import source_of
    if source_of(encoder) != "mel":
        return
    graph = export_audio_onnx(encoder)
    x = torch.randn(8, 1, utils.N_MELS, utils.MEL_WIN, generator=torch.Generator().manual_seed(3)) * 2
    with torch.inference_mode():
        ref = encoder.eval()(x).numpy()
    if float(np.abs(OrtAudio(graph)(x.numpy()) - ref).max()) > MATCH_TOL * max(1.0, float(np.abs(ref).max())):
        return
    meta = dict(widths=list(info["widths"]), step=info["step"], config=info["config"], has_mask=info["mask"] is not None,
                guidance=info.get("guidance"), guidance_photo=info.get("guidance_photo"), has_bank=info.get("ref_bank") is not None)
    try:
        if meta["has_bank"]:
            with utils.atomic_file(onnx_cache_path(checkpoint, "bank")) as tmp:
                with open(tmp, "wb") as f:
                    np.savez(f, crops=info["ref_bank"][0], keys=info["ref_bank"][1])
        if info["mask"] is not None:
            with utils.atomic_file(onnx_cache_path(checkpoint, "mask")) as tmp:
                with open(tmp, "wb") as f:
                    np.save(f, np.asarray(info["mask"]))
        with utils.atomic_file(onnx_cache_path(checkpoint, "audio")) as tmp:
            tmp.write_bytes(graph)
        with utils.atomic_file(onnx_cache_path(checkpoint, "info")) as tmp:     # last: it marks the set complete
            tmp.write_text(json.dumps(meta, default=str))
    except OSError:
        pass                                          # an unwritable cache only costs PyTorch next time


def make_runner(model, device, backend="auto", batch=1, checkpoint=None):
    """The fastest runtime for `device` that reproduces eager PyTorch (float32 runtimes to MATCH_TOL,
    OpenVINO in bf16 to BF16_PSNR), tried in the order of BACKENDS; a runtime that is missing, fails
    or disagrees falls back to the next (OpenVINO is skipped quietly on CPUs without bf16 units,
    where it is no faster). An ONNX graph that passed this check is cached per checkpoint file and
    reused unchecked."""
    kinds = BACKENDS.get(device.type, ("eager",)) if backend == "auto" else (backend,)
    eager = UNetRunner(model, device, "eager")
    ref = exported = None
    for kind in kinds:
        if kind == "eager":
            return eager
        if kind == "ov" and backend == "auto" and not ov_bf16():
            continue
        try:
            cache = onnx_cache_path(checkpoint) if kind in GRAPH_KINDS and checkpoint else None
            graph = cache.read_bytes() if cache is not None and cache.is_file() else None
            checked = ov_psnr(checkpoint) if kind == "ov" and checkpoint else None
            if checked is not None and checked < BF16_PSNR:
                print(f"note: U-Net runtime ov differed from eager when checked ({checked:.1f} dB < {BF16_PSNR} dB); "
                      "not used", file=sys.stderr)
                continue
            if graph is not None and (kind == "ort" or checked is not None):
                r = UNetRunner(model, device, kind, graph)
                r.max_abs_diff = None                 # checked when it was cached
                return r
            r = UNetRunner(model, device, kind, graph if graph is not None else exported)
            exported = getattr(r, "graph", exported)  # one export serves both graph runtimes
            r.fixed_batch = batch if kind == "compile" else None
            if ref is None:
                x, a = (t.numpy() for t in fresh_inputs(batch, seed=1))
                ref = eager(x, a)
            out = r(x, a)
            diff, psnr = float(np.abs(out - ref).max()), psnr01(out, ref)
        except UserError:
            raise
        except Exception as e:   # a runtime that is not installed or cannot take this graph
            print(f"note: U-Net runtime {kind} unavailable ({type(e).__name__}: {str(e)[:120]}); trying the next",
                  file=sys.stderr)
            continue
        passed = (psnr >= BF16_PSNR) if kind == "ov" else (diff <= MATCH_TOL)
        if cache is not None:
            _cache_graph(cache, r.graph if passed else None, psnr if kind == "ov" else None, checkpoint)
        if passed:
            r.max_abs_diff = diff
            return r
        limit = f"{psnr:.1f} dB < {BF16_PSNR} dB" if kind == "ov" else f"{diff:.2e} > {MATCH_TOL}"
        print(f"note: U-Net runtime {kind} differs from eager ({limit}); not used", file=sys.stderr)
    if backend != "auto":
        raise UserError(f"--backend {backend} is not usable here (see the note above); use --backend auto")
    return eager


def _cache_graph(cache, graph, ov_psnr_db, checkpoint):
    """Keep a U-Net graph that passed its check (graph None: it did not), and for OpenVINO how near
    eager's its output came (dB), so later loads need not check again."""
    import json
    try:
        if graph is not None and not cache.is_file():
            _prune_cache(cache.parent)
            with utils.atomic_file(cache) as tmp:
                tmp.write_bytes(graph)
        if ov_psnr_db is not None:
            with utils.atomic_file(onnx_cache_path(checkpoint, "ov")) as tmp:
                tmp.write_text(json.dumps({"psnr_db": round(float(ov_psnr_db), 2), "openvino": _version("openvino")}))
    except OSError:
        pass                      # an unwritable cache only costs the export next time
