"""The server's job routes (list, status, cancel, delete, the result mp4), /health with the page, and
what every route shares: the dependencies (settings, job store, worker, API key), a job's JSON and
the token of a result_url.

    python server.py                               # serves these routes (server.create_app includes them)
    python -m pytest tests/test_server.py -k "jobs or cancel or dependency"

Routes reach the settings and the store only through get_settings / get_store (FastAPI Depends),
so a test can swap either with app.dependency_overrides.
"""
import hmac
import re
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Literal, Optional

from fastapi import APIRouter, Depends, Header, HTTPException, Query, Request
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field

import utils
from jobs import ACTIVE, JobStore, Worker

STATIC = utils.REPO / "static"
JOB_ID = re.compile(r"^[0-9a-f]{32}$")
# Training presets for new avatars (routes_avatars.py); a request's `steps` / `syncnet_steps` override them.
PRESETS = {
    # CPU: narrow widths, batch 4 (RESULTS.md rounds 12-13: at equal minutes level with or better than light)
    "quick": dict(widths="narrow", steps=400, syncnet_steps=300, batch_size=4),    # a first look (light's 300 steps' time), not a finished avatar
    "standard": dict(widths="narrow", steps=8900, syncnet_steps=2000, batch_size=4, stem="s2d4l"),   # the 30-minute point: round 13's 4500 steps, 5300 in the same minutes since round 21, 7600 of the cheaper s2d4 stem since round 33, 8900 of s2d4l since round 35
    "full": dict(widths="full", steps=30000, syncnet_steps=5000, batch_size=8, stem="s2d"),    # the reference size: a GPU job (s2d: the stem measured on a GPU, round 26)
}


# ----------------------------------------------------------------------------------------------
# Response models (the OpenAPI schema at /docs)
class JobOut(BaseModel):
    id: str
    kind: Literal["avatar", "generate"]
    avatar: str
    status: Literal["queued", "running", "done", "failed", "cancelled"]
    stage: str = Field(description="what the job is doing now")
    progress: float = Field(description="percent, 0-100")
    eta_s: Optional[float] = Field(None, description="estimated seconds left while running")
    queue_position: Optional[int] = Field(None, description="1 = next to run, while queued")
    error: Optional[str] = Field(None, description="one-line reason when failed or cancelled")
    created: float
    started: Optional[float] = None
    finished: Optional[float] = None
    request: dict = Field(description="the job's options as submitted")
    result_url: Optional[str] = Field(None, description="the mp4 (Range requests supported), when done")


class HealthOut(BaseModel):
    """With an API key set and not sent, only status and auth_required (the rest says what runs where)."""
    status: str
    auth_required: bool
    device: Optional[str] = None
    versions: Optional[dict] = None
    queue_length: Optional[int] = None
    running: Optional[str] = None
    tts: Optional[bool] = Field(None, description="text input is accepted (an offline voice is installed)")
    limits: Optional[dict] = None
    presets: Optional[dict] = None


# ----------------------------------------------------------------------------------------------
# Dependencies: server.create_app puts the settings and the lifespan's running parts on app.state
def get_settings(request: Request):
    """The server's Config."""
    return request.app.state.settings


def get_state(request: Request) -> dict:
    """What the lifespan started: store, worker, tts (and /health's facts, found once)."""
    return request.app.state.jobs


def get_store(state: dict = Depends(get_state)) -> JobStore:
    return state["store"]


def get_worker(state: dict = Depends(get_state)) -> Worker:
    return state["worker"]


def key_ok(s, x_api_key):
    """The server has no API key, or this is it (compared in constant time)."""
    return not s.api_key or bool(x_api_key and hmac.compare_digest(x_api_key.encode(), s.api_key.encode()))


def require_key(x_api_key: Optional[str] = Header(None, description="required when the server has an API key"),
                s=Depends(get_settings)):
    if not key_ok(s, x_api_key):
        raise HTTPException(401, "missing or wrong API key: send it in the X-API-Key header")


# ----------------------------------------------------------------------------------------------
# Jobs, their files and result tokens
def result_token(key, job_id, hours, now=None):
    """A token for result_url (a <video src> cannot send a header): expiry time + HMAC of job and expiry."""
    exp = int((time.time() if now is None else now) + 3600 * hours)
    return f"{exp:x}-" + hmac.new(key.encode(), f"{job_id}:{exp}".encode(), "sha256").hexdigest()[:32]


def token_ok(key, job_id, token, now=None):
    """True for a result_token of this job that has not expired."""
    exp_hex, _, _ = (token or "").partition("-")
    try:
        exp = int(exp_hex, 16)
    except ValueError:
        return False
    good = f"{exp:x}-" + hmac.new(key.encode(), f"{job_id}:{exp}".encode(), "sha256").hexdigest()[:32]
    return hmac.compare_digest(token, good) and (time.time() if now is None else now) < exp


def job_out(job, s, store, positions=None):
    """A job row as the API shows it: percent, ETA, queue position, result_url (with a token when keyed)."""
    p, eta = job["progress"], None
    if job["status"] == "running" and job["started"] and p > 0.01:
        eta = round((time.time() - job["started"]) * (1 - p) / p, 1)
    url = None
    if job["status"] == "done" and job["result"]:
        url = f"/api/jobs/{job['id']}/result" + (f"?token={result_token(s.api_key, job['id'], s.token_hours)}"
                                                 if s.api_key else "")
    pos = None
    if job["status"] == "queued":
        positions = positions if positions is not None else {j: i for i, j in enumerate(store.queued_ids())}
        pos = positions.get(job["id"], 0) + 1
    return JobOut(id=job["id"], kind=job["kind"], avatar=job["avatar"], status=job["status"], stage=job["stage"],
                  progress=round(100 * p, 1), eta_s=eta, queue_position=pos, error=job["error"],
                  created=job["created"], started=job["started"], finished=job["finished"],
                  request=job["request"], result_url=url)


def get_job(store, job_id):
    job = store.get(job_id) if JOB_ID.match(job_id) else None
    if job is None:
        raise HTTPException(404, f"no job {job_id!r}")
    return job


def data_dir(s):
    return Path(s.data_dir).resolve()


def new_job_dir(s):
    """(job id, its fresh uploads folder)."""
    job_id = uuid.uuid4().hex
    d = data_dir(s) / "uploads" / job_id
    d.mkdir(parents=True)
    return job_id, d


def remove_job_files(s, job):
    data = data_dir(s)
    shutil.rmtree(data / "uploads" / job["id"], ignore_errors=True)
    if job["result"]:
        path = (data / job["result"]).resolve()
        if data in path.parents:
            path.unlink(missing_ok=True)


def prune(s, store):
    """Retention: ended jobs older than keep_results_days go, with their results."""
    if s.keep_results_days > 0:
        for job in store.ended_before(time.time() - 86400 * s.keep_results_days):
            remove_job_files(s, job)
            store.delete(job["id"])


# ----------------------------------------------------------------------------------------------
# Routes
status_router = APIRouter(tags=["status"])
jobs_router = APIRouter(tags=["jobs"], dependencies=[Depends(require_key)])
results_router = APIRouter(tags=["jobs"])      # the key or result_url's token (checked in the route)


@status_router.get("/", include_in_schema=False)
def index():
    return FileResponse(STATIC / "index.html", media_type="text/html")


@status_router.get("/health", response_model=HealthOut, response_model_exclude_none=True)
def health(x_api_key: Optional[str] = Header(None, description="with the server's API key: the full answer"),
           s=Depends(get_settings), state: dict = Depends(get_state), store: JobStore = Depends(get_store),
           worker: Worker = Depends(get_worker)):
    """Liveness, the compute device, versions, the queue, limits and options (with an API key set:
    only liveness and auth_required unless the key is sent)."""
    if not key_ok(s, x_api_key):
        return HealthOut(status="ok", auth_required=True)
    if "versions" not in state:          # once: torch's import and the package metadata scan are slow
        state["device"] = str(utils.get_device(s.device))
        state["versions"] = {"python": sys.version.split()[0],
                             **{d: utils.package_version(d) for d in ("torch", "fastapi", "uvicorn", "onnxruntime", "numpy")}}
    return HealthOut(status="ok", device=state["device"], versions=state["versions"],
                     queue_length=store.count("queued"), running=worker.current,
                     auth_required=bool(s.api_key), tts=state["tts"],
                     limits={"max_upload_mb": s.max_upload_mb, "max_audio_s": s.max_audio_s,
                             "max_video_s": s.max_video_s, "max_text_chars": s.max_text_chars,
                             "max_train_steps": s.max_train_steps},
                     presets=PRESETS)


@jobs_router.get("/api/jobs", response_model=list[JobOut])
def list_jobs(limit: int = Query(50, ge=1, le=1000),
              status: Optional[Literal["queued", "running", "done", "failed", "cancelled"]] = None,
              avatar: Optional[str] = None, s=Depends(get_settings), store: JobStore = Depends(get_store)):
    """Jobs, newest first."""
    positions = {j: i for i, j in enumerate(store.queued_ids())}
    return [job_out(j, s, store, positions) for j in store.list(limit, status, avatar)]


@jobs_router.get("/api/jobs/{job_id}", response_model=JobOut)
def job_status(job_id: str, s=Depends(get_settings), store: JobStore = Depends(get_store)):
    """Status, progress %, stage, ETA and error of one job."""
    return job_out(get_job(store, job_id), s, store)


@jobs_router.post("/api/jobs/{job_id}/cancel", response_model=JobOut)
def cancel_job(job_id: str, s=Depends(get_settings), store: JobStore = Depends(get_store),
               worker: Worker = Depends(get_worker)):
    """Cancel a queued job at once, or ask a running one to stop (it ends as 'cancelled')."""
    get_job(store, job_id)
    if store.transition(job_id, ("queued",), status="cancelled", error="cancelled by user", finished=time.time()):
        shutil.rmtree(data_dir(s) / "uploads" / job_id, ignore_errors=True)
    elif (job := get_job(store, job_id))["status"] == "running":
        worker.cancel(job_id)
    else:
        raise HTTPException(409, f"job {job_id} already ended ({job['status']})")
    return job_out(get_job(store, job_id), s, store)


@jobs_router.delete("/api/jobs/{job_id}", status_code=204)
def delete_job(job_id: str, s=Depends(get_settings), store: JobStore = Depends(get_store)):
    """Delete an ended job with its result and uploads (a queued or running one: cancel it first)."""
    job = get_job(store, job_id)
    if job["status"] in ACTIVE:
        raise HTTPException(409, f"job {job_id} is {job['status']}; cancel it first")
    remove_job_files(s, job)
    store.delete(job_id)


@results_router.get("/api/jobs/{job_id}/result",
                    responses={200: {"content": {"video/mp4": {}}, "description": "the mp4; Range requests supported"}})
def job_result(job_id: str, token: Optional[str] = Query(None, description="result_url's token (for <video src>)"),
               x_api_key: Optional[str] = Header(None), s=Depends(get_settings),
               store: JobStore = Depends(get_store)):
    """The finished mp4. With an API key, the header or the token from result_url is needed."""
    if s.api_key and not token_ok(s.api_key, job_id, token):
        require_key(x_api_key, s)
    job = get_job(store, job_id)
    if job["status"] != "done" or not job["result"]:
        raise HTTPException(409, f"job {job_id} has no result ({job['status']})")
    data = data_dir(s)
    path = (data / job["result"]).resolve()
    if data not in path.parents:          # a result path must never point outside data_dir
        raise HTTPException(404, "result not available")
    if not path.is_file():
        raise HTTPException(410, f"the result of job {job_id} was deleted from the server")
    return FileResponse(path, media_type="video/mp4", filename=f"{job['avatar']}_{job_id[:8]}.mp4",
                        content_disposition_type="inline")
