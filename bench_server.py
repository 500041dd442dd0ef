"""Load check of server.py on loopback: many clients polling while generate jobs queue up.

    python bench_server.py                                # 50 pollers, 10 jobs, tiny random-weight avatar
    python bench_server.py --clients 20 --jobs 3 --audio_s 0.5    # CPU smoke run, ~30 s
    python bench_server.py --name anna --data_root dataset --ckpt_root checkpoint   # a real avatar

Starts `python server.py` as a subprocess on a free 127.0.0.1 port with a fresh data_dir, builds a
tiny avatar unless --name is given (a synthetic talking clip through process.py plus a
random-weight light generator checkpoint: the pictures are noise, the work is real), queues the
jobs, then `clients` concurrent clients poll /health, /api/jobs and /api/jobs/{id} until every job
has ended or max_seconds pass. Prints requests, 5xx count, p50/p95/max latency, job throughput,
and fails (exit 1) on any 5xx, any job lost (not ended) or any job failed without a reason.
"""
import asyncio
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import media_io
import utils
from utils import UserError


@dataclass
class Config:
    clients: int = 50               # concurrent polling clients
    jobs: int = 10                  # generate jobs queued at the start
    audio_s: float = 1.0            # seconds of speech per job (25 output frames per second)
    max_seconds: float = 600.0      # give up (and fail) after this long
    poll_interval: float = 0.2      # s each client waits between its requests
    baseline_s: float = 10.0        # first, this long with the same clients and no job running (the API's own cost)
    name: str = ""                  # existing avatar to use; default: build a tiny one in a temp folder
    data_root: str = ""             # with --name: where its dataset lives
    ckpt_root: str = ""             # with --name: where its checkpoints live
    backend: str = "eager"          # server's inference runtime (eager, ort: ort exports the model first, ~15 s)
    device: str = "cpu"             # server's device
    threads: int = 1                # server's torch threads (1: the server and these clients share the CPU)
    keep: bool = False              # keep the temp folder (server log, results)


# ----------------------------------------------------------------------------------------------
# A tiny avatar (also used by tests/test_server.py and tests/test_browser.py)
TINY_WIDTHS = (4, 4, 8, 8, 16, 16)   # a U-Net of the right shapes at ~1/10 of "light"'s time per frame


def write_random_checkpoint(folder, widths=TINY_WIDTHS, seed=0, step=0):
    """A generator checkpoint in the contract's format with random weights: folder/last.pth.
    `widths`: a WIDTHS name or 6 ints."""
    import torch

    from audio_features import encoder_id
    from unet_328 import WIDTHS, AudioEncoder, UNet328
    widths = WIDTHS[widths] if isinstance(widths, str) else tuple(widths)
    torch.manual_seed(seed)
    enc = AudioEncoder()
    path = Path(folder) / utils.LAST
    utils.save_checkpoint(dict(model=UNet328(widths).state_dict(), optimizer=None, scaler=None, step=step,
                               epoch=0, config={"widths": list(widths)}, rng=None, best_loss=None,
                               audio_encoder=enc.state_dict(), encoder_id=encoder_id(enc)), path)
    return path


def make_tiny_avatar(root, name="tiny", seconds=4.0):
    """root/dataset/NAME from a synthetic talking clip + root/checkpoint/NAME/last.pth (random, tiny widths)."""
    import process
    import synthetic
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    clip = synthetic.make_talking_clip(root / "clip.mp4", seconds=seconds, seed=1)
    process.main(process.Config(video=str(clip), name=name, data_root=str(root / "dataset"), overwrite=True))
    write_random_checkpoint(root / "checkpoint" / name)
    return root / "dataset", root / "checkpoint"


def write_speech(path, seconds, seed=0):
    import synthetic
    media_io.write_wav(path, synthetic.synth_speech(seconds, seed, lead_silence=min(0.2, seconds / 4)))
    return path


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(data_dir, data_root, ckpt_root, port, log, **opts):
    """server.py in a subprocess on 127.0.0.1:port; returns the Popen once /health answers."""
    import httpx
    args = [sys.executable, str(utils.REPO / "server.py"), "--host", "127.0.0.1", "--port", str(port),
            "--data_dir", str(data_dir), "--data_root", str(data_root), "--ckpt_root", str(ckpt_root)]
    for k, v in opts.items():
        args += [f"--{k}", str(v)]
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=utils.REPO,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    deadline = time.time() + 60
    while time.time() < deadline:
        if proc.poll() is not None:
            raise UserError(f"server.py exited with {proc.returncode} at start; see {log.name}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.terminate()
    raise UserError(f"server.py did not answer /health within 60 s; see {log.name}")


# ----------------------------------------------------------------------------------------------
# The load
async def run_load(base, cfg, job_ids, seconds):
    """`clients` pollers until every job in job_ids has ended (or `seconds` pass): /health,
    /api/jobs and /api/jobs/{id} in turn. -> (latencies s, {status code: count}, ended jobs)."""
    import httpx
    lat, codes, t_end = [], {}, time.time() + seconds
    ended = {}

    async def client(i, http):
        k = 0
        while time.time() < t_end and (not job_ids or len(ended) < len(job_ids)):
            k += 1
            url = ("/health" if k % 3 == 0 or not job_ids and k % 3 == 2 else "/api/jobs?limit=20" if k % 3 == 1
                   else f"/api/jobs/{job_ids[(i + k) % len(job_ids)]}")
            t = time.perf_counter()
            try:
                r = await http.get(url)
                code = r.status_code
            except httpx.HTTPError as e:
                code = type(e).__name__
            lat.append(time.perf_counter() - t)
            codes[code] = codes.get(code, 0) + 1
            if code == 200 and url.startswith("/api/jobs/"):
                j = r.json()
                if j["status"] in ("done", "failed", "cancelled"):
                    ended.setdefault(j["id"], (j, time.time()))
            await asyncio.sleep(cfg.poll_interval)

    limits = httpx.Limits(max_connections=cfg.clients + 5)
    async with httpx.AsyncClient(base_url=base, timeout=30, limits=limits) as http:
        await asyncio.gather(*(client(i, http) for i in range(cfg.clients)))
    return lat, codes, ended


def main(cfg):
    import httpx
    tmp = Path(tempfile.mkdtemp(prefix="bench-server-"))
    if cfg.name:
        if not (cfg.data_root and cfg.ckpt_root):
            raise UserError("--name needs --data_root and --ckpt_root")
        name, data_root, ckpt_root = utils.check_name(cfg.name, "avatar name"), cfg.data_root, cfg.ckpt_root
    else:
        print("building a tiny avatar (synthetic clip, random-weight tiny-width generator)...")
        name = "tiny"
        data_root, ckpt_root = make_tiny_avatar(tmp / "avatar", name)
    audio = write_speech(tmp / "speech.wav", cfg.audio_s)
    port = free_port()
    log = open(tmp / "server.log", "w")
    proc = start_server(tmp / "server_data", data_root, ckpt_root, port, log, device=cfg.device, backend=cfg.backend,
                        threads=cfg.threads, log_level="warning")
    base = f"http://127.0.0.1:{port}"
    try:
        base_lat, base_codes, _ = asyncio.run(run_load(base, cfg, [], cfg.baseline_s)) if cfg.baseline_s > 0 else ([], {}, {})
        t0 = time.time()
        job_ids = []
        with httpx.Client(base_url=base, timeout=60) as http:
            for k in range(cfg.jobs):
                with open(audio, "rb") as f:
                    r = http.post("/api/generate", data={"avatar": name}, files={"audio": ("speech.wav", f, "audio/wav")})
                if r.status_code != 202:
                    raise UserError(f"POST /api/generate answered {r.status_code}: {r.text[:200]}")
                job_ids.append(r.json()["id"])
        t_sub = time.time() - t0
        lat, codes, ended = asyncio.run(run_load(base, cfg, job_ids, cfg.max_seconds))
        wall = time.time() - t0
        with httpx.Client(base_url=base, timeout=60) as http:
            final = {j: http.get(f"/api/jobs/{j}").json() for j in job_ids}
            listed = {j["id"] for j in http.get("/api/jobs?limit=1000").json()}
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
    for k, v in base_codes.items():        # the idle phase counts towards the 5xx / error verdict too
        codes[k] = codes.get(k, 0) + v
    lat = np.array(lat) * 1e3
    base_lat = np.array(base_lat) * 1e3
    n5xx = sum(v for k, v in codes.items() if isinstance(k, int) and k >= 500)
    errors = sum(v for k, v in codes.items() if not isinstance(k, int))
    status = {}
    for j in final.values():
        status[j["status"]] = status.get(j["status"], 0) + 1
    lost = [j for j in job_ids if final[j]["status"] not in ("done", "failed", "cancelled") or j not in listed]
    silent = [j for j, v in final.items() if v["status"] == "failed" and not v["error"]]
    done_t = sorted(v["finished"] for v in final.values() if v["finished"])
    first_start = min((v["started"] for v in final.values() if v["started"]), default=None)
    print(f"hardware: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
          f"server device {cfg.device}, backend {cfg.backend}")
    print(f"load: {cfg.clients} clients polling every {cfg.poll_interval} s, {cfg.jobs} generate jobs of "
          f"{cfg.audio_s:g} s speech ({media_io.num_frames(int(cfg.audio_s * utils.SR))} frames each); submitted in {t_sub:.1f} s")
    if len(base_lat):
        print(f"no job running : {len(base_lat)} requests in {cfg.baseline_s:g} s ({len(base_lat) / cfg.baseline_s:.0f}/s), "
              f"latency ms p50 {np.percentile(base_lat, 50):.1f}  p95 {np.percentile(base_lat, 95):.1f}  max {base_lat.max():.1f}")
    if len(lat):
        print(f"jobs running   : {len(lat)} requests in {wall:.1f} s ({len(lat) / wall:.0f}/s), "
              f"latency ms p50 {np.percentile(lat, 50):.1f}  p95 {np.percentile(lat, 95):.1f}  max {lat.max():.1f}")
    print(f"all requests: status codes {dict(sorted(codes.items(), key=str))}, 5xx {n5xx}, connection errors {errors}")
    if done_t and first_start:
        span = done_t[-1] - first_start
        print(f"jobs: {status}; {len(done_t)} ended in {span:.1f} s after the first started "
              f"({len(done_t) / span * 60:.1f} jobs/min, {span / len(done_t):.2f} s/job)")
    for j, v in final.items():
        if v["status"] == "failed":
            print(f"  failed {j[:8]}: {v['error']}")
    print(f"lost jobs: {len(lost)}; failed without a reason: {len(silent)}; server log: {tmp / 'server.log'}")
    ok = n5xx == 0 and errors == 0 and not lost and not silent
    if not cfg.keep and ok:
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    if not ok:
        print("FAIL", file=sys.stderr)
        sys.exit(1)
    print("OK")


if __name__ == "__main__":
    utils.run_main(main, utils.parse_config(Config, description=__doc__.split("\n")[0]))
