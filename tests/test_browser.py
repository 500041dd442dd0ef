"""The web page in a real browser: Debian's chromium driven by Playwright against the real server
(a subprocess on a free loopback port) with a tiny avatar. The page shows an API error's detail,
runs a generate job for 8 s of speech, and its <video> loads the result (duration ~8.0 s). In the
Live section, chromium's fake microphone (a speech wav) streams to the server and the avatar's
frames appear on the canvas.

Needs `apt-get install -y chromium` and `pip install playwright` (no `playwright install`: the
browser is Debian's); skipped with the reason when either is missing."""
import importlib.util
import os
from pathlib import Path

import pytest

import media_io
from bench_server import free_port, start_server, write_random_checkpoint, write_speech

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
ROOT = Path(__file__).resolve().parents[1]
MEDIA = ROOT.parent / "shared" / "media"     # real media, outside the repository
ARTIFACTS = ROOT / "test-artifacts"
SPEECH = "speech_en_radio_8s.wav"


@pytest.fixture(scope="module")
def playwright():
    if importlib.util.find_spec("playwright") is None:
        pytest.skip("playwright is not installed (pip install playwright)")
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no chromium at {CHROMIUM} (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        yield p


@pytest.fixture(scope="module")
def browser(playwright):
    b = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
    yield b
    b.close()


@pytest.fixture(scope="module")
def live_server(tiny_dataset, tmp_path_factory):
    """server.py on 127.0.0.1:<free port> serving the avatar 'tiny' (random tiny-width weights)."""
    tmp = tmp_path_factory.mktemp("live")
    write_random_checkpoint(tmp / "ckpt" / "tiny")
    port = free_port()
    log = open(tmp / "server.log", "w")
    proc = start_server(tmp / "srv", Path(tiny_dataset).parent, tmp / "ckpt", port, log,
                        device="cpu", backend="eager", threads=1, log_level="warning")
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(30)
    log.close()


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    """The real 8 s speech clip when ../shared/media is present, else 8 s of synthetic speech."""
    if (MEDIA / SPEECH).is_file():
        return MEDIA / SPEECH
    return write_speech(tmp_path_factory.mktemp("speech") / "speech_8s.wav", 8.0)


def test_page_generates_and_plays_a_video(browser, live_server, speech, tmp_path):
    page = browser.new_page()
    console_errors = []
    page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
    page.goto(live_server)
    page.wait_for_selector("#avatar option[value='tiny']", state="attached", timeout=20000)
    assert "Server ready on cpu" in page.inner_text("#health")

    # an API error is shown with the server's own words
    bad = tmp_path / "notes.txt"
    bad.write_text("not audio\n" * 10)
    page.set_input_files("#audio", str(bad))
    page.click("#generate-btn")
    err = page.wait_for_selector("#messages .error", timeout=20000)
    assert "notes.txt is not a readable video or audio file" in err.inner_text()

    # a real job: upload, progress, then the video plays from the server (Range requests)
    page.set_input_files("#audio", str(speech))
    page.click("#generate-btn")
    page.wait_for_selector("#job-section:not([hidden])", timeout=20000)
    page.wait_for_selector("#result:not([hidden])", timeout=600000)   # a safety net, not a speed check: a loaded 2-core box renders slowly
    page.wait_for_function("document.querySelector('#result-video').readyState >= 1", timeout=30000)
    duration = page.eval_on_selector("#result-video", "v => v.duration")
    expected = media_io.probe(speech)["duration"]
    assert abs(duration - expected) < 0.1, (duration, expected)
    # frames really decode (H.264 in this chromium): seek into the clip and read the picture size
    size = page.evaluate("""() => new Promise((ok, fail) => {
        const v = document.querySelector('#result-video');
        v.addEventListener('seeked', () => ok([v.videoWidth, v.videoHeight]), {once: true});
        v.addEventListener('error', () => fail(String(v.error && v.error.message)), {once: true});
        v.currentTime = 2.0;
    })""")
    assert size == [384, 384]
    assert page.get_attribute("#download-link", "href").endswith("/result")
    assert "done" in page.inner_text("#jobs tbody tr:first-child")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "browser_generate.png"), full_page=True)
    # the only console error allowed is the 422 of the bad upload above
    assert all("422" in e for e in console_errors), console_errors
    page.close()


def test_new_avatar_form_sends_who_it_will_speak_with(browser, live_server, speech):
    """The voice choice reaches POST /api/avatars (intercepted here: no training starts)."""
    page = browser.new_page()
    page.goto(live_server)
    page.wait_for_selector("#preset option", state="attached", timeout=20000)
    assert page.input_value("#voice") == "others"                          # the default: other voices
    sent = []

    def refuse(route):
        sent.append(route.request.post_data_buffer)
        route.fulfill(status=409, content_type="application/json", body='{"detail": "intercepted by the test"}')

    page.route("**/api/avatars", refuse)
    page.fill("#new-name", "anna")
    page.set_input_files("#new-video", str(speech))
    page.select_option("#voice", "own")
    page.click("#avatar-btn")
    err = page.wait_for_selector("#messages .error", timeout=20000)
    assert "intercepted by the test" in err.inner_text()
    assert len(sent) == 1
    body = sent[0].decode("latin-1")
    assert 'name="voice"\r\n\r\nown\r\n' in body and 'name="name"\r\n\r\nanna\r\n' in body
    page.close()


def test_generate_form_sends_the_band_push(browser, live_server, speech):
    """"Another person's voice" reaches POST /api/generate as band_push (intercepted: no job starts);
    a value over 1 is refused by the page before anything is sent."""
    page = browser.new_page()
    page.goto(live_server)
    page.wait_for_selector("#avatar option[value='tiny']", state="attached", timeout=20000)
    sent = []

    def refuse(route):
        sent.append(route.request.post_data_buffer)
        route.fulfill(status=409, content_type="application/json", body='{"detail": "intercepted by the test"}')

    page.route("**/api/generate", refuse)
    page.set_input_files("#audio", str(speech))
    page.fill("#band-push", "3")
    page.click("#generate-btn")
    page.wait_for_timeout(500)
    assert not sent and page.eval_on_selector("#band-push", "e => e.validity.rangeOverflow")   # the browser refuses it
    page.fill("#band-push", "0.1")
    page.click("#generate-btn")
    page.wait_for_function("document.querySelector('#messages .error') && "
                           "document.querySelector('#messages .error').innerText.includes('intercepted')", timeout=20000)
    assert len(sent) == 1
    assert 'name="band_push"\r\n\r\n0.1\r\n' in sent[0].decode("latin-1")
    page.close()


def test_live_mode_shows_the_avatar_from_the_microphone(playwright, live_server, speech):
    # chromium's fake microphone plays the speech wav (in a loop); the permission prompt is answered yes
    b = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS + [
        "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={speech}", "--autoplay-policy=no-user-gesture-required"])
    page = b.new_page()
    console_errors = []
    page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
    page.goto(live_server)
    page.wait_for_selector("#live-avatar option[value='tiny']", state="attached", timeout=20000)
    page.click("#live-mic-btn")
    shown = "() => Number(document.querySelector('#live-canvas').dataset.frames)"
    page.wait_for_function(f"({shown})() >= 25", timeout=120000)   # a safety net: a loaded 2-core box is slow
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "live_page.png"), full_page=True)
    spread = page.evaluate("""() => {
        const c = document.querySelector('#live-canvas');
        const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let lo = 255, hi = 0;
        for (let i = 0; i < px.length; i += 4) { lo = Math.min(lo, px[i + 1]); hi = Math.max(hi, px[i + 1]); }
        return [c.width, c.height, hi - lo];
    }""")
    assert spread[:2] == [384, 384] and spread[2] > 50, spread          # a face, not a blank canvas
    n = page.evaluate(shown)
    page.wait_for_function(f"({shown})() > {n}", timeout=30000)      # frames keep coming
    assert "fps received" in page.inner_text("#live-status")
    page.click("#live-stop-btn")
    page.wait_for_function("document.querySelector('#live-status').textContent.startsWith('Stream ended')",
                           timeout=60000)
    assert not console_errors, console_errors
    b.close()
