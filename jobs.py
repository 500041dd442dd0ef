"""The server's jobs: a SQLite queue that survives restarts, and the one worker thread that runs
them through the same functions the scripts use.

    python server.py            # the web server that owns a JobStore and a Worker (see server.py)

Avatar job: process.main -> syncnet_328.main -> train_328.main, with progress and cancel.
Generate job: inference_328.LipSyncModel.render (audio, or text spoken by the offline piper voice,
-> mp4). Nothing here imports torch at import time: the worker thread loads it on first use.
Tested through the server (tests/test_server.py).
"""
import contextlib
import dataclasses
import inspect
import json
import os
import queue
import re
import shutil
import sqlite3
import threading
import time
import traceback
from collections import OrderedDict
from pathlib import Path

import media_io
import templates
from compose import TEXT_BAND_PUSH, RenderOptions
import utils
from speech import synthesize_speech
from utils import UserError

# Share of an avatar job's progress bar per stage (rough time shares on CPU).
AVATAR_STAGES = (("processing video", 0.10), ("training SyncNet", 0.25), ("training generator", 0.65))
PROGRESS_EVERY = 0.5            # s between progress writes to the database
STOP_WAIT = 15.0                # s the shutdown waits for the running job to stop
SAVE_MINUTES = 1.0              # an avatar job saves last.pth at least this often: a server killed mid-training resumes

# ----------------------------------------------------------------------------------------------
# Jobs in SQLite
SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, kind TEXT NOT NULL, avatar TEXT NOT NULL, status TEXT NOT NULL,
    stage TEXT NOT NULL DEFAULT '', progress REAL NOT NULL DEFAULT 0, error TEXT,
    request TEXT NOT NULL DEFAULT '{}', inputs TEXT NOT NULL DEFAULT '{}', result TEXT,
    created REAL NOT NULL, started REAL, finished REAL);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status);
"""
ACTIVE = ("queued", "running")


class JobStore:
    """The jobs table. One connection shared by all threads behind a lock: each statement takes
    microseconds, far less than the HTTP request around it. WAL keeps the file consistent when the
    process dies mid-write. `request` is what the user asked (shown), `inputs` the server-side
    paths (never shown)."""

    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        self.conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self.conn.row_factory = sqlite3.Row
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=NORMAL")
        self.conn.execute("PRAGMA busy_timeout=5000")
        self.conn.executescript(SCHEMA)

    def _exec(self, sql, args=()):
        with self.lock:
            if self.conn is None:        # closed at shutdown; a worker still finishing writes nothing
                return []
            return self.conn.execute(sql, args).fetchall()

    @staticmethod
    def _row(r):
        d = dict(r)
        d["request"], d["inputs"] = json.loads(d["request"]), json.loads(d["inputs"])
        return d

    def add(self, job_id, kind, avatar, request, inputs):
        self._exec("INSERT INTO jobs (id, kind, avatar, status, stage, request, inputs, created) "
                   "VALUES (?, ?, ?, 'queued', 'queued', ?, ?, ?)",
                   (job_id, kind, avatar, json.dumps(request), json.dumps(inputs), time.time()))
        return self.get(job_id)

    def get(self, job_id):
        rows = self._exec("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return self._row(rows[0]) if rows else None

    def list(self, limit=100, status=None, avatar=None):
        where, args = [], []
        if status:
            where.append("status = ?")
            args.append(status)
        if avatar:
            where.append("avatar = ?")
            args.append(avatar)
        sql = "SELECT * FROM jobs" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY rowid DESC LIMIT ?"
        return [self._row(r) for r in self._exec(sql, (*args, limit))]

    def count(self, status):
        return self._exec("SELECT COUNT(*) FROM jobs WHERE status = ?", (status,))[0][0]

    def queued_ids(self):
        return [r[0] for r in self._exec("SELECT id FROM jobs WHERE status = 'queued' ORDER BY rowid")]

    def active_for(self, kind, avatar):
        rows = self._exec("SELECT id FROM jobs WHERE kind = ? AND avatar = ? AND status IN ('queued', 'running') "
                          "ORDER BY rowid", (kind, avatar))
        return rows[0][0] if rows else None

    def update(self, job_id, **fields):
        cols = ", ".join(f"{k} = ?" for k in fields)
        self._exec(f"UPDATE jobs SET {cols} WHERE id = ?", (*fields.values(), job_id))

    def transition(self, job_id, from_status, **fields):
        """Set fields only if the job is still in one of `from_status`; True when it was."""
        cols = ", ".join(f"{k} = ?" for k in fields)
        marks = ", ".join("?" * len(from_status))
        with self.lock:
            if self.conn is None:
                return False
            cur = self.conn.execute(f"UPDATE jobs SET {cols} WHERE id = ? AND status IN ({marks})",
                                    (*fields.values(), job_id, *from_status))
            return cur.rowcount == 1

    def recover(self, resumable=lambda job: False):
        """After a restart: a job left 'running' goes back to the queue when `resumable(job)` (it
        continues from its checkpoint), else fails with a reason. Returns the queue, in order."""
        for r in self._exec("SELECT * FROM jobs WHERE status = 'running' ORDER BY rowid"):
            job = self._row(r)
            if resumable(job):
                self.update(job["id"], status="queued", stage="queued (resumes training)",
                            inputs=json.dumps(dict(job["inputs"], resume=True)))
            else:
                self.update(job["id"], status="failed", error="interrupted by server restart", finished=time.time())
        return self.queued_ids()

    def delete(self, job_id):
        """Remove an ended job's row; False when it is queued or running (or unknown)."""
        with self.lock:
            if self.conn is None:
                return False
            cur = self.conn.execute("DELETE FROM jobs WHERE id = ? AND status NOT IN ('queued', 'running')", (job_id,))
            return cur.rowcount == 1

    def ended_before(self, t):
        """Ended jobs that finished before time t (for the results' retention)."""
        return [self._row(r) for r in self._exec("SELECT * FROM jobs WHERE status NOT IN ('queued', 'running') "
                                                 "AND finished IS NOT NULL AND finished < ?", (t,))]

    def close(self):
        with self.lock:
            if self.conn is not None:
                self.conn.close()
                self.conn = None


# ----------------------------------------------------------------------------------------------
# Start-up clean-up
def sweep_litter(data_dir, keep_ids):
    """Remove what jobs killed with the server left in data_dir (call at start-up, before the worker
    runs): uploads of jobs not in `keep_ids` (the queue), partial results (.NAME.tmp-*) and the
    scratch folder tmp/. Returns the removed paths."""
    data = Path(data_dir)
    gone = [p for p in (data / "uploads").iterdir() if p.name not in keep_ids] if (data / "uploads").is_dir() else []
    gone += list((data / "results").glob(".*.tmp-*")) + (list((data / "tmp").iterdir()) if (data / "tmp").is_dir() else [])
    for p in gone:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return gone


# ----------------------------------------------------------------------------------------------
# The pipeline, as the scripts expose it (imported lazily: torch loads in the worker, not at import)
def _script_config(module, **values):
    """module.Config() with `values`; a key the script does not have is an error, never ignored."""
    fields = {f.name for f in dataclasses.fields(module.Config)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise UserError(f"{module.__name__}.Config has no field(s) {', '.join(unknown)} "
                        "(check the server settings train_extra / syncnet_extra)")
    return module.Config(**values)


def json_object(text, what):
    try:
        obj = json.loads(text) if text.strip() else {}
    except ValueError as e:
        raise UserError(f"--{what} is not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise UserError(f"--{what} must be a JSON object like '{{\"batch_size\": 4}}'")
    return obj


def _call_main(fn, cfg, progress=None, should_stop=None):
    """fn(cfg), passing progress/should_stop where the script accepts them."""
    params = inspect.signature(fn).parameters
    kw = {k: v for k, v in (("progress", progress), ("should_stop", should_stop)) if k in params and v is not None}
    return fn(cfg, **kw)


@contextlib.contextmanager
def torch_threads(n):
    """torch's CPU threads set to n inside the block (process-wide in torch) and restored after;
    n <= 0 leaves them as they are (and torch unimported)."""
    if n <= 0:
        yield
        return
    import torch
    prev = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


class Stopped(Exception):
    """The worker was asked to stop the running job (cancel or shutdown)."""


class Progress:
    """progress(done, total, *_) for one stage of a job -> overall percent in the database, written
    at most every PROGRESS_EVERY seconds."""

    def __init__(self, store, job_id):
        self.store, self.job_id = store, job_id
        self.lo, self.hi, self.last = 0.0, 1.0, 0.0

    def stage(self, name, lo, hi):
        self.lo, self.hi, self.last = lo, hi, time.monotonic()
        self.store.update(self.job_id, stage=name, progress=lo)

    def __call__(self, done, total, *_):
        now = time.monotonic()
        if now - self.last >= PROGRESS_EVERY or done >= total:
            self.last = now
            frac = min(max(done / total, 0.0), 1.0) if total else 0.0
            self.store.update(self.job_id, progress=self.lo + (self.hi - self.lo) * frac)


class Worker:
    """The one thread that runs jobs, in queue order."""

    def __init__(self, settings, store):
        self.s, self.store = settings, store
        self.q = queue.Queue()
        self.models = OrderedDict()          # (checkpoint path, mtime) -> LipSyncModel, LRU order
        self.current = None                  # id of the running job
        self.cancel_event = threading.Event()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="job-worker", daemon=True)

    def start(self):
        self.thread.start()

    def submit(self, job_id):
        self.q.put(job_id)

    def cancel(self, job_id):
        if self.current == job_id:
            self.cancel_event.set()

    def stop(self, timeout=STOP_WAIT):
        self.stopping.set()
        self.cancel_event.set()
        self.q.put(None)
        self.thread.join(timeout)
        return not self.thread.is_alive()

    def should_stop(self):
        return self.cancel_event.is_set()

    def check_stop(self):
        if self.cancel_event.is_set():
            raise Stopped

    def _loop(self):
        if self.s.job_nice and hasattr(os, "setpriority"):
            # Linux schedules threads separately: only this thread and the ones it starts (template
            # reader, video writer) yield the CPU to the request threads, so polling stays quick
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.s.job_nice)
        with torch_threads(self.s.threads):     # process-wide in torch: restored when the worker ends
            self._serve()

    def _serve(self):
        while not self.stopping.is_set():
            job_id = self.q.get()
            if job_id is None:
                break
            # `current` is set before the job turns 'running', so a cancel can never fall between the two
            self.current = job_id
            self.cancel_event.clear()
            if not self.store.transition(job_id, ("queued",), status="running", started=time.time(), stage="starting"):
                self.current = None                        # cancelled while queued
                continue
            try:
                self._run(job_id)
            finally:
                self.current = None

    def _run(self, job_id):
        job = self.store.get(job_id)
        prog = Progress(self.store, job_id)
        try:
            run = self.run_avatar if job["kind"] == "avatar" else self.run_generate
            result = run(job, prog)
            if self.cancel_event.is_set():                 # a script that returns early when asked to stop
                raise Stopped
            self.store.transition(job_id, ACTIVE, status="done", progress=1.0, stage="done",
                                  result=result, finished=time.time())
        except Exception as e:
            stopped = isinstance(e, Stopped) or (self.cancel_event.is_set() and isinstance(e, UserError))
            if stopped and self.stopping.is_set():
                status, msg = "failed", "interrupted by server shutdown; submit it again"
            elif stopped:
                status, msg = "cancelled", "cancelled by user"
            elif isinstance(e, UserError):
                status, msg = "failed", self.scrub(str(e), job)
            else:                                           # a bug: full trace in the log, one line for the user
                traceback.print_exc()
                status, msg = "failed", f"internal error ({type(e).__name__}: {self.scrub(str(e), job)[:300]}); see the server log"
            self.store.transition(job_id, ACTIVE, status=status, error=msg, finished=time.time())
        finally:
            shutil.rmtree(Path(self.s.data_dir) / "uploads" / job_id, ignore_errors=True)

    def scrub(self, msg, job):
        """Server paths in an error message -> the names the user uploaded."""
        for path, shown in job["inputs"].get("shown", {}).items():
            msg = msg.replace(path, shown)
        return msg.replace(str(Path(self.s.data_dir).resolve()), "<data>").splitlines()[0] if msg else "failed"

    # -- avatar: video -> dataset -> SyncNet + features -> generator --------------------------
    def run_avatar(self, job, prog):
        import process
        import syncnet_328
        import train_328
        s, req, name = self.s, job["request"], job["avatar"]
        spans, lo = [], 0.0
        for stage, share in AVATAR_STAGES:
            spans.append((stage, lo, lo + share))
            lo += share
        resume = bool(job["inputs"].get("resume"))         # restarted mid-training: continue from last.pth
        if not resume:
            prog.stage(*spans[0])
            process.main(_script_config(process, video=job["inputs"]["video"], name=name, data_root=s.data_root,
                                        overwrite=True))
            self.check_stop()
            prog.stage(*spans[1])
            _call_main(syncnet_328.main, _script_config(syncnet_328, **{
                **dict(name=name, data_root=s.data_root, ckpt_root=s.ckpt_root, widths=req["widths"],
                       max_steps=req["syncnet_steps"], audio_source=req.get("audio_source", "auto"),   # older jobs: auto
                       device=s.device, num_workers=s.train_workers),
                **json_object(s.syncnet_extra, "syncnet_extra")}), progress=prog, should_stop=self.should_stop)
            self.check_stop()
        prog.stage(*spans[2])
        every = max(1, min(500, req["steps"]))              # a short run still validates and saves
        _call_main(train_328.main, _script_config(train_328, **{
            **dict(name=name, data_root=s.data_root, ckpt_root=s.ckpt_root, widths=req["widths"],
                   max_steps=req["steps"], batch_size=req["batch_size"], stem=req.get("stem", train_328.Config.stem), device=s.device,
                   num_workers=s.train_workers, overwrite=not resume, resume="auto" if resume else "",
                   val_every=every, save_every=every, save_minutes=SAVE_MINUTES),
            **json_object(s.train_extra, "train_extra")}), progress=prog, should_stop=self.should_stop)
        return None                                         # the avatar itself is the result

    # -- generate: audio (or text) -> mp4 -------------------------------------------------------
    def forget_models(self, folder):
        """Drop cached models loaded from checkpoints in `folder` (an avatar being deleted)."""
        for key in [k for k in self.models if Path(k[0]).parent == Path(folder)]:
            del self.models[key]

    def model(self, ckpt):
        """The LipSyncModel of a checkpoint file, loaded once and kept (LRU of cache_models)."""
        import inference_328
        key = (str(ckpt), ckpt.stat().st_mtime_ns)
        if key in self.models:
            self.models.move_to_end(key)
            return self.models[key]
        for k in [k for k in self.models if k[0] == key[0]]:     # an older version of the same file
            del self.models[k]
        m = inference_328.LipSyncModel(ckpt, self.s.device, self.s.backend)
        self.models[key] = m
        while len(self.models) > max(self.s.cache_models, 1):
            self.models.popitem(last=False)
        return m

    def run_generate(self, job, prog):
        s, inp, req = self.s, job["inputs"], job["request"]
        audio = inp.get("audio")
        if inp.get("text"):
            prog.stage("synthesising speech", 0.0, 0.02)
            audio = str(synthesize_speech(inp["text"], Path(inp["dir"]) / "speech.wav"))
            dur = media_io.probe(audio)["duration"] or 0
            if dur > s.max_audio_s:
                raise UserError(f"the synthesised speech is {dur:.0f} s long; the limit is {s.max_audio_s:g} s: shorten the text")
        prog.stage("loading model", 0.02, 0.05)
        ckpt = checkpoint_path(s, job["avatar"], req.get("checkpoint") or "")
        model = self.model(ckpt)
        self.check_stop()
        prog.stage("rendering", 0.05, 1.0)
        template = templates.open_template(job["avatar"], s.data_root, inp.get("template") or "", bool(req.get("other_person")))
        rel = Path("results") / f"{job['id']}.mp4"
        try:
            opts = render_options(req, bool(inp.get("text")), model.guidance_for(template))
            model.render(audio, Path(s.data_dir) / rel, template=template, opts=opts, progress=prog,
                         should_stop=self.should_stop, tmp_dir=Path(s.data_dir) / "tmp")
        finally:
            template.close()
        return str(rel)



def render_options(req, text, guidance):
    """A generate request's render options: its guidance (default `guidance`, the model's fitted one, a
    photo's apart), sharpening and band push (default TEXT_BAND_PUSH for `text` spoken by the offline voice, else
    RenderOptions' auto: the same when the audio's voice is not the avatar's recorded one)."""
    return RenderOptions(guidance=float(req.get("guidance", guidance)), sharpen=float(req.get("sharpen", RenderOptions.sharpen)),
                         band_push=float(req.get("band_push", TEXT_BAND_PUSH if text else RenderOptions.band_push)))


# avatars on disk
GEN_CKPT = re.compile(r"^(best|last|step_\d+)\.pth$")


def checkpoint_path(s, name, file=""):
    """The generator checkpoint to use: `file` in ckpt_root/NAME, else last.pth, else best.pth."""
    folder = Path(s.ckpt_root) / utils.check_name(name, "avatar name")
    if file:
        if not GEN_CKPT.match(file) or not (folder / file).is_file():
            raise UserError(f"avatar {name!r} has no checkpoint {file!r}; GET /api/avatars lists them")
        return folder / file
    found = utils.default_generator_checkpoint(folder)
    if found is not None:
        return found
    raise UserError(f"avatar {name!r} has no trained generator yet (no last.pth or best.pth)")
