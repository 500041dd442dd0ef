"""The server's uploads: the request-size limit (413), saving an uploaded file, and probing it with
ffmpeg before any job is queued (422 naming the user's file, never the server path).

    python server.py --max_upload_mb 50          # the limit these functions enforce
    python -m pytest tests/test_server.py -k "errors or limit"

Used by server.py (the middleware) and routes_avatars.py (avatar and generate uploads).
"""
import re
from pathlib import Path

from fastapi import HTTPException
from fastapi.responses import JSONResponse

import media_io
import utils
from utils import UserError

MB = 1 << 20
UPLOAD_CHUNK = 1 << 20          # bytes copied at a time from an upload
SAFE_EXT = re.compile(r"^\.[A-Za-z0-9]{1,5}$")
MAX_IMAGE_PIXELS = 40_000_000   # a template photo larger than this (e.g. 8000 x 5000) is refused before decoding


def upload_limit(s):
    """(bytes, message) of the per-file limit of settings `s`."""
    return (int(s.max_upload_mb * MB),
            f"upload too large: the limit is {s.max_upload_mb:g} MB per file (server setting max_upload_mb)")


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


def save_upload(upload, folder, stem, s):
    """Copy an upload to folder/stem+ext (ext kept only when it is a plain short suffix: ffmpeg
    probes content, the suffix is a hint). 413 when it is larger than the limit of settings `s`."""
    limit_bytes, limit_msg = upload_limit(s)
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
