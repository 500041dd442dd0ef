"""The web page in a real browser: Debian's chromium driven by Playwright against the real server
(a subprocess on a free loopback port) with a tiny avatar. The page shows an API error's detail,
runs a generate job for 8 s of speech, and its <video> loads the result (duration ~8.0 s).

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
def browser():
    if importlib.util.find_spec("playwright") is None:
        pytest.skip("playwright is not installed (pip install playwright)")
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no chromium at {CHROMIUM} (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
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
