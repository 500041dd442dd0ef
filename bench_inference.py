"""Benchmark of inference_328.py: end-to-end frames/s with per-stage times and peak memory, and
the U-Net alone in each runtime (eager, BN-folded, torch.compile, ONNX Runtime) with its error.

    python bench_inference.py                         # full widths, random weights, anchor clip + 8 s speech, 10 min
    python bench_inference.py --name anna --no-compile --long_seconds 0
    python bench_inference.py --widths light --seconds 2 --long_seconds 30 --no-compile --iters 3   # CPU smoke run

Every case runs in its own fresh process (so peak RSS is that case's, and the glibc malloc
settings can be switched per process). Without --name, the German anchor clip (512x512) from
../shared/media is processed once into --work with process.py: the reference's measurement setup
(SPEC §11: 199 frames in ~118 s, 1.7 frames/s). The long case (10 min of audio, the 8 s speech
looped) checks that memory does not grow with the audio: by default its U-Net is replaced by a
pass-through (--long_model stub) so it measures everything else in minutes, not the ~40 min the
real model needs here; --long_model real runs it for real.
"""
import copy
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import templates
import media_io
from compose import RenderOptions
import utils
from utils import SR, UserError

MEDIA = utils.REPO.parent / "shared" / "media"


@dataclass
class Config:
    name: str = ""                 # avatar dataset to use; default: the anchor clip processed into --work
    data_root: str = str(utils.DATASET_DIR)   # where --name lives
    work: str = "/tmp/bench_inference"        # scratch folder (dataset, checkpoint, audio, outputs)
    widths: str = "full"           # U-Net widths: full, light or narrow (unet_328.WIDTHS)
    stem: str = "s2d"              # the U-Net's first level: s2d (train_328's default since round 11) or conv (320 px, models trained before)
    seconds: float = 8.0           # length of the short end-to-end case, s
    long_seconds: float = 600.0    # length of the long (memory) case, s; 0 skips it
    mid_seconds: float = 30.0      # a middle case for the memory comparison, s; 0 skips it
    long_model: str = "stub"       # U-Net in the long cases: stub (pass-through) or real
    backend: str = "auto"          # U-Net runtime for the end-to-end cases (see runner.BACKENDS)
    guidance: float = -1.0         # [-1..4] inference_328 --guidance of the end-to-end cases (a second U-Net pass when != 1); -1 = a file's default
    iters: int = 10                # timed U-Net calls per runtime
    compile: bool = True           # include torch.compile in the U-Net comparison (~1-2 min to compile)
    malloc_compare: bool = True    # also run the U-Net and the short case without the malloc settings
    part: str = ""                 # internal: the case a child process runs
    arg: str = ""                  # internal: the child's argument (json)


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb():
    try:
        return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return float("nan")


# ----------------------------------------------------------------------------------------------
# Fixtures: a random checkpoint, a dataset, audio
def random_checkpoint(path, widths="full", seed=0, stem="conv"):
    """UNet328 + AudioEncoder with random weights and BatchNorm statistics measured on random
    inputs (so activations keep a realistic scale), saved as train_328.py would."""
    import torch
    import unet_328
    torch.manual_seed(seed)
    unet, enc = unet_328.UNet328(unet_328.WIDTHS[widths], stem=stem), unet_328.AudioEncoder()
    for m in list(unet.modules()) + list(enc.modules()):
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    with torch.no_grad():
        unet.train()(torch.rand(2, 6, utils.INNER, utils.INNER), torch.randn(2, 32, 16, 16))
        enc.train()(torch.rand(16, 1, 80, 16) * 8 - 4)
    utils.save_checkpoint(dict(model=unet.state_dict(), config=dict(widths=list(unet_328.WIDTHS[widths]), stem=stem),
                               audio_encoder=enc.state_dict(), step=0, epoch=0), path)
    return Path(path)


def lift_bf16_check(ckpt):
    """For a checkpoint of random weights (random_checkpoint's random_*.pth) lift OpenVINO's bf16
    check (runner.BF16_PSNR): such weights drift in bf16 far more than trained ones (~25 dB from
    float32 against 55-60 dB for a trained light model), and speed is all a benchmark measures."""
    if Path(ckpt).name.startswith("random_"):
        import runner
        runner.BF16_PSNR = float("-inf")


def ensure_dataset(cfg):
    if cfg.name:
        return cfg.name, cfg.data_root
    root = Path(cfg.work) / "dataset"
    if not (root / "anchor" / utils.META).is_file():
        clip = MEDIA / "german_anchor_20s.mp4"
        if not clip.is_file():
            raise UserError(f"{clip} is absent: pass --name NAME of a processed dataset")
        print(f"processing {clip} into {root}/anchor (once) ...", flush=True)
        r = subprocess.run([sys.executable, str(utils.REPO / "process.py"), str(clip), "--name", "anchor",
                            "--data_root", str(root)], capture_output=True, text=True)
        if r.returncode != 0:
            raise UserError(f"process.py failed on {clip}: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
    return "anchor", str(root)


def speech(seconds, work):
    """A wav of `seconds`: the 8 s English speech looped (or synthetic speech without the media)."""
    path = Path(work) / f"speech_{seconds:g}s.wav"
    if not path.is_file():
        src = MEDIA / "speech_en_radio_8s.wav"
        if src.is_file():
            base = media_io.load_audio(src)
        else:
            import synthetic
            base = synthetic.synth_speech(8.0)
        n = int(seconds * SR)
        media_io.write_wav(path, np.resize(base, n))
    return path


# ----------------------------------------------------------------------------------------------
# Child cases
def case_unet(arg):
    """The U-Net alone at batch 1 in each runtime: frames/s and max |out - eager|."""
    import torch
    import runner
    import unet_328
    load0 = os.getloadavg()[0]
    unet = runner.load_generator(arg["ckpt"])[0].eval()      # its widths, base and stem, as inference builds it
    x, a = runner.fresh_inputs(1, seed=2)
    xn, an = x.numpy(), a.numpy()
    res = {}

    def timeit(fn, n):
        """frames/s by the wall clock, and CPU seconds per frame (all threads): the second is what
        the work costs when other processes share the cores and stretch the wall clock."""
        fn()
        t, c = time.perf_counter(), time.process_time()
        for _ in range(n):
            fn()
        return n / (time.perf_counter() - t), (time.process_time() - c) / n

    # copies made outside inference_mode: the ONNX exporter cannot trace inference tensors
    folded = unet_328.fold_bn(unet).to(memory_format=torch.channels_last)
    unfolded_cl = copy.deepcopy(unet).eval().to(memory_format=torch.channels_last)   # the same U-Net (widths, stem, base, film)
    xc = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        ref = unet(x, a).numpy()
        res["eager"] = (timeit(lambda: unet(x, a), max(2, arg["iters"] // 2)), 0.0)
        res["eager channels_last"] = (timeit(lambda: unfolded_cl(xc, a), max(2, arg["iters"] // 2)),
                                      float(np.abs(unfolded_cl(xc, a).numpy() - ref).max()))
        r = runner.UNetRunner(folded, torch.device("cpu"), "eager")
        res["BN folded + channels_last"] = (timeit(lambda: r(xn, an), arg["iters"]), float(np.abs(r(xn, an) - ref).max()))
    try:
        t0 = time.perf_counter()
        r = runner.UNetRunner(folded, torch.device("cpu"), "ort")
        setup = time.perf_counter() - t0
        res[f"onnxruntime (BN folded; export {setup:.0f} s)"] = (timeit(lambda: r(xn, an), arg["iters"]),
                                                                 float(np.abs(r(xn, an) - ref).max()))
    except Exception as e:
        res["onnxruntime"] = ((float("nan"),) * 2, f"unavailable: {type(e).__name__}: {str(e)[:80]}")
    try:
        t0 = time.perf_counter()
        r = runner.UNetRunner(folded, torch.device("cpu"), "ov")
        setup = time.perf_counter() - t0
        res[f"OpenVINO, {'bf16' if runner.ov_bf16() else 'float32'} (BN folded; export {setup:.0f} s)"] = (
            timeit(lambda: r(xn, an), arg["iters"]), float(np.abs(r(xn, an) - ref).max()))
    except Exception as e:
        res["OpenVINO"] = ((float("nan"),) * 2, f"unavailable: {type(e).__name__}: {str(e)[:80]}")
    if arg["compile"]:
        try:
            r = runner.UNetRunner(folded, torch.device("cpu"), "compile")
            t0 = time.perf_counter()
            out = r(xn, an)
            setup = time.perf_counter() - t0
            res[f"torch.compile (BN folded + channels_last; compile {setup:.0f} s)"] = (
                timeit(lambda: r(xn, an), arg["iters"]), float(np.abs(out - ref).max()))
        except Exception as e:
            res["torch.compile"] = ((float("nan"),) * 2, f"unavailable: {type(e).__name__}: {str(e)[:80]}")
    return {"unet": res, "peak_rss_mb": peak_rss_mb(), "load": (load0, os.getloadavg()[0])}


class StubRunner:
    """Pass-through 'U-Net': returns the reference crop, so the long case measures the rest."""
    kind = "stub"

    def __call__(self, img, audio):
        return img[:, :3]


def case_e2e(arg):
    """One full render (load audio, features, decode, model, paste, encode) in this process."""
    import inference_328 as inf
    import importlib
    importlib.import_module("torch")          # imported before the baseline memory is measured
    load0, rss0 = os.getloadavg()[0], current_rss_mb()
    lift_bf16_check(arg["ckpt"])
    t0 = time.perf_counter()
    model = inf.LipSyncModel(arg["ckpt"], "auto", arg["backend"])
    if arg["stub"]:
        model.runner = StubRunner()
    load = time.perf_counter() - t0
    template = templates.open_template(arg["name"], arg["data_root"])
    stats, rss1 = {}, peak_rss_mb()
    t0, c0 = time.perf_counter(), time.process_time()
    opts = RenderOptions(guidance=arg["guidance"]) if arg["guidance"] >= 0 else RenderOptions()
    model.render(arg["audio"], arg["out"], template, opts, stats=stats)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    n = stats.pop("frames")
    return {"frames": n, "wall_s": wall, "fps": n / wall, "cpu_s_per_frame": cpu / n, "model_load_s": load,
            "runtime": model.runner.kind, "stages_s": stats, "rss_after_imports_mb": rss0, "peak_rss_after_load_mb": rss1,
            "peak_rss_mb": peak_rss_mb(), "out_mb": Path(arg["out"]).stat().st_size / 2**20,
            "load": (load0, os.getloadavg()[0])}


def child(part, arg, malloc=True):
    """Run one case in a fresh interpreter; returns its json result."""
    import inference_328 as inf
    env = dict(os.environ)
    for k, v in inf.MALLOC_ENV.items():
        if malloc:
            env[k] = v
        else:
            env.pop(k, None)
    r = subprocess.run([sys.executable, __file__, "--part", part, "--arg", json.dumps(arg)], env=env,
                       stdout=subprocess.PIPE, text=True)
    if r.returncode != 0:
        raise UserError(f"benchmark case {part} failed (exit {r.returncode})")
    return json.loads(r.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------
def print_unet(title, res):
    print(f"\nU-Net alone, batch 1 ({title}; load avg {res['load'][0]:.1f} -> {res['load'][1]:.1f}):")
    print(f"  {'runtime':66s} {'frames/s':>9s} {'cpu s/f':>8s} {'max|diff|':>10s}")
    for k, ((fps, cpu), diff) in res["unet"].items():
        d = f"{diff:10.1e}" if isinstance(diff, float) else f"  {diff}"
        print(f"  {k:66s} {fps:9.2f} {cpu:8.2f} {d}")


def print_e2e(title, r):
    st = r["stages_s"]
    print(f"\n{title}: {r['frames']} frames in {r['wall_s']:.1f} s = {r['fps']:.2f} frames/s end to end, "
          f"{r['cpu_s_per_frame']:.2f} CPU s/frame in this process (runtime {r['runtime']}, model load "
          f"{r['model_load_s']:.1f} s; load avg {r['load'][0]:.1f} -> {r['load'][1]:.1f})")
    print(f"  RSS: {r['rss_after_imports_mb']:.0f} MB after imports, peak {r['peak_rss_after_load_mb']:.0f} MB "
          f"after loading the model, peak {r['peak_rss_mb']:.0f} MB at the end")
    order = ["load audio", "audio features", "decode+crop", "model", "paste", "encode"]
    print("  stage times (s; decode runs in a reader thread, paste+encode in a writer thread, so they overlap the model):")
    print("  " + "  ".join(f"{k} {st.get(k, 0):.1f} ({1000 * st.get(k, 0) / r['frames']:.1f} ms/f)" for k in order))


def main(cfg):
    if cfg.part:
        arg = json.loads(cfg.arg)
        out = case_unet(arg) if cfg.part == "unet" else case_e2e(arg)
        print(json.dumps(out))
        return out
    import inference_328 as inf
    work = Path(cfg.work)
    work.mkdir(parents=True, exist_ok=True)
    print(f"hardware: {utils.hardware()}")
    name, root = ensure_dataset(cfg)
    ckpt = work / f"random_{cfg.widths}{'' if cfg.stem == 'conv' else '_' + cfg.stem}.pth"
    if not ckpt.is_file():
        random_checkpoint(ckpt, cfg.widths, stem=cfg.stem)
    print(f"model: UNet328 {cfg.widths} widths, stem {cfg.stem}, random weights; dataset {root}/{name}; "
          f"malloc settings {' '.join(f'{k}={v}' for k, v in inf.MALLOC_ENV.items())}", flush=True)

    res = child("unet", {"ckpt": str(ckpt), "iters": cfg.iters, "compile": cfg.compile})
    print_unet("with the malloc settings", res)
    if cfg.malloc_compare:
        print_unet("default glibc malloc", child("unet", {"ckpt": str(ckpt), "iters": cfg.iters, "compile": False}, malloc=False))

    def e2e(seconds, stub, malloc=True):
        audio = speech(seconds, work)
        return child("e2e", {"ckpt": str(ckpt), "name": name, "data_root": root, "audio": str(audio),
                             "out": str(work / f"out_{seconds:g}s.mp4"), "backend": cfg.backend, "stub": stub,
                             "guidance": cfg.guidance}, malloc)

    g = cfg.guidance if cfg.guidance >= 0 else RenderOptions().guidance
    print_e2e(f"end to end, {cfg.seconds:g} s of speech, guidance {g:g}", e2e(cfg.seconds, False))
    if cfg.malloc_compare:
        print_e2e(f"end to end, {cfg.seconds:g} s, default glibc malloc", e2e(cfg.seconds, False, malloc=False))
    stub = cfg.long_model != "real"
    what = "U-Net replaced by a pass-through" if stub else "real U-Net"
    for s in (cfg.mid_seconds, cfg.long_seconds):
        if s:
            print_e2e(f"end to end, {s:g} s of speech ({what})", e2e(s, stub))
    print(f"\nhardware: {utils.hardware()}")


if __name__ == "__main__":
    utils.run_main(main, utils.parse_config(Config, description=__doc__.split("\n")[0]))
