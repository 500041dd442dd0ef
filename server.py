"""FastAPI server and web page for the whole job: make an avatar from a video, make it say any audio.

    python server.py                                         # http://127.0.0.1:8000 (page + API, docs at /docs)
    python server.py --host 0.0.0.0 --port 8080 --api_key SECRET --data_dir /srv/lipsync
    python server.py --port 8001 --data_dir /tmp/lipsync-srv --device cpu --max_upload_mb 50   # CPU smoke run

One worker thread (jobs.py) runs the jobs, one at a time, so two jobs never fight over the device; models
are loaded in that thread on first use and the last `cache_models` avatars stay loaded; it runs
at a lower CPU priority so that status polling stays fast while a job computes (bench_server.py). Jobs live
in SQLite (data_dir/jobs.db): a restart re-queues queued jobs, resumes generator training that
had saved a checkpoint, marks any other job that was running as failed ("interrupted by server
restart") and keeps every finished result downloadable.
Avatar job: process.py -> syncnet_328.py -> train_328.py (a preset: light widths and a few hundred
steps by default, steps settable per request). Generate job: inference_328.LipSyncModel.render(audio -> mp4). Uploads are probed with
ffmpeg before a job is queued (422 with the reason), capped in size (413) and duration (422).
The routes are in routes_avatars.py and routes_jobs.py (with the training PRESETS), the upload checks in uploads.py.
Live lip sync (a WebSocket: speech in, frames out at 25 fps) is routes_live.py, with its own frame thread.
"""
import dataclasses
import functools
import json
import os
import sys
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles

import utils
from jobs import ACTIVE, AVATAR_STAGES, JobStore, Worker, json_object, sweep_litter
from routes_avatars import avatars_router, generate_router
from routes_jobs import STATIC, jobs_router, prune, results_router, status_router
from routes_live import LiveHub, live_router
from speech import tts_available
from uploads import MB, UploadLimit, upload_limit
from utils import UserError

API_KEY_ENV = "LIPSYNC_API_KEY"


@dataclass
class Config:
    host: str = "127.0.0.1"         # bind address; loopback keeps the server private to this machine
    port: int = 8000                # TCP port
    data_dir: str = str(utils.REPO / "server_data")   # jobs.db, uploads/, results/ (git-ignored)
    data_root: str = str(utils.DATASET_DIR)      # avatars' datasets (process.py output)
    ckpt_root: str = str(utils.CHECKPOINT_DIR)   # avatars' checkpoints (train_328.py output)
    api_key: str = ""               # when set (or env LIPSYNC_API_KEY), /api/* needs header X-API-Key
    max_upload_mb: float = 500.0    # largest uploaded file, MB (bigger -> 413)
    max_audio_s: float = 600.0      # longest audio a generate job accepts, s (longer -> 422)
    max_video_s: float = 1200.0     # longest training video an avatar job accepts, s (longer -> 422)
    max_text_chars: int = 2000      # longest text for speech synthesis (when piper is installed)
    max_train_steps: int = 200000   # largest generator step count a request may ask for
    train_extra: str = ""           # JSON object of further train_328.Config fields for avatar jobs, e.g. '{"perceptual": "off"}'
    syncnet_extra: str = ""         # JSON object of further syncnet_328.Config fields for avatar jobs
    device: str = "auto"            # auto (cuda -> mps -> cpu), cpu, cuda, mps: where jobs run
    backend: str = "auto"           # inference U-Net runtime (inference_328 --backend)
    cache_models: int = 2           # avatars kept loaded between generate jobs (LRU; the live streams keep as many)
    max_live: int = 4               # live streams (/api/live) at once; each needs a frame every 40 ms of the device
    job_nice: int = 10              # niceness of the job thread (Linux): requests are served first, jobs use the rest
    threads: int = 0                # torch CPU threads while serving (0 = torch's default: all cores; 1 on a shared CPU)
    train_workers: int = 0          # DataLoader workers in server training (0: no fork inside a threaded server)
    keep_results_days: float = 0.0  # [0..] ended jobs and their results are deleted this many days after they ended (0 = kept)
    token_hours: float = 24.0       # [>0..] a result_url's token (for <video src> with an API key) is valid this long
    keep_alive_s: int = 30          # idle keep-alive connections close after this (longer than any page's poll interval)
    log_level: str = "info"         # uvicorn log level


PRUNE_EVERY = 3600.0            # s between retention passes (keep_results_days)


# ----------------------------------------------------------------------------------------------
# The app: the routes live in routes_avatars.py and routes_jobs.py, the upload checks in uploads.py
def _short(value, limit=80):
    """An invalid input as a 422 may quote it: at most `limit` characters of its text."""
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def user_error(request, exc):
    return JSONResponse({"detail": str(exc)}, status_code=422)


def invalid_request(request, exc):
    """FastAPI's 422 without echoing the whole input back (a 5000-character field came back whole)."""
    return JSONResponse({"detail": [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", ""))[:200],
                                     **({"input": _short(e["input"])} if "input" in e else {})}
                                    for e in exc.errors()[:20]]}, status_code=422)


def _recover(s, data, store, worker):
    """Settle what the last run left: resumable training is queued again, other running jobs
    failed, their litter removed; the queue goes back to the worker."""
    def resumable(job):                  # generator training with a saved step continues after a restart
        return (job["kind"] == "avatar" and job["stage"] == AVATAR_STAGES[2][0]
                and (Path(s.ckpt_root) / job["avatar"] / utils.LAST).is_file())

    queue = store.recover(resumable)
    swept = sweep_litter(data, set(queue))   # what a killed server left: old uploads, partial results, tmp/
    if swept:
        print(f"start-up: removed {len(swept)} leftover upload(s)/partial file(s) of interrupted jobs", file=sys.stderr)
    for job_id in queue:
        worker.submit(job_id)


@asynccontextmanager
async def lifespan(app):
    """Open the job store, settle interrupted jobs, start the worker and the hourly retention pass;
    at shutdown stop the worker (a job it cannot stop is marked failed) and close the store."""
    s, state = app.state.settings, app.state.jobs
    data = Path(s.data_dir).resolve()
    for sub in ("uploads", "results"):
        (data / sub).mkdir(parents=True, exist_ok=True)
    store = JobStore(data / "jobs.db")
    worker = Worker(s, store)
    live = LiveHub(s)
    state.update(store=store, worker=worker, live=live, tts=tts_available(), prune=functools.partial(prune, s, store))
    _recover(s, data, store, worker)
    pruning = threading.Event()

    def prune_hourly():
        while True:
            state["prune"]()
            if pruning.wait(PRUNE_EVERY):
                return

    threading.Thread(target=prune_hourly, daemon=True, name="retention").start()
    worker.start()
    live.start()
    try:
        yield
    finally:
        pruning.set()
        live.stop()
        running = worker.current
        if not worker.stop() and running:   # a stage that cannot be interrupted (process.py): settle it now
            store.transition(running, ACTIVE, status="failed", finished=time.time(),
                             error="interrupted by server shutdown; submit it again")
        store.close()


def create_app(settings=None):
    """The FastAPI app for `settings` (a Config). Nothing starts until the lifespan runs: then the
    job store opens, interrupted jobs are settled, queued ones re-enqueued and the worker started.
    Routes read the settings and the store through routes_jobs.get_settings / get_store, which
    tests may replace with app.dependency_overrides."""
    s = dataclasses.replace(settings or Config())
    s.api_key = s.api_key or os.environ.get(API_KEY_ENV, "")
    json_object(s.train_extra, "train_extra")       # a bad override fails at start, not in the first avatar job
    json_object(s.syncnet_extra, "syncnet_extra")
    limit_bytes, limit_msg = upload_limit(s)
    app = FastAPI(title="Lip-sync avatar server", version="1.0", lifespan=lifespan,
                  description="Make a person-specific talking-head avatar from a video, then make it say any audio. "
                              "Jobs run one at a time; poll GET /api/jobs/{id}. Errors return JSON {\"detail\": text}.")
    app.state.settings = s
    app.state.jobs = {}                  # store, worker, live, tts, prune: filled by the lifespan
    # the whole request may carry two files (audio + photo) and form fields
    app.add_middleware(UploadLimit, max_bytes=2 * limit_bytes + MB, message=limit_msg)
    app.add_exception_handler(UserError, user_error)
    app.add_exception_handler(RequestValidationError, invalid_request)
    for router in (status_router, avatars_router, generate_router, jobs_router, results_router, live_router):
        app.include_router(router)
    if STATIC.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def main(cfg):
    import uvicorn
    os.environ.setdefault("TQDM_DISABLE", "1")   # job progress is in the API, not progress bars in the log
    utils.get_device(cfg.device)                 # a device that is not there fails now, not in the first job
    if cfg.host not in ("127.0.0.1", "localhost", "::1") and not (cfg.api_key or os.environ.get(API_KEY_ENV)):
        print(f"warning: listening on {cfg.host} without an API key: anyone who can reach it can run jobs "
              f"(set --api_key or {API_KEY_ENV})", file=sys.stderr)
    uvicorn.run(create_app(cfg), host=cfg.host, port=cfg.port, log_level=cfg.log_level,
                timeout_keep_alive=cfg.keep_alive_s)


if __name__ == "__main__":
    utils.run_main(main, utils.parse_config(Config, description=__doc__.split("\n")[0]))
