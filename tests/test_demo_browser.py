"""The browser demo in a real browser: ``blspkd-demo-ui`` serves a tiny
model on 127.0.0.1, headless Chromium (Debian's ``chromium``, driven by
playwright's Python package; no browser is downloaded) uploads a generated
wav, submits, and the answer on the page must equal
``SpeechLLM.generate_file`` on the same file and instruction. Non-audio
uploads must get a clear message. A screenshot of the page is written to
``$BLSPKD_TEST_ARTIFACTS`` (default ``test-artifacts/``).

Skipped, with the reason, only where Chromium or playwright is not
installed (``tools/install.sh`` installs both when it can).
"""

import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from speechbrain_blspkd.testing import write_speechlike_wav

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = pathlib.Path(__file__).resolve().parents[1]
ARTIFACTS = pathlib.Path(
    os.environ.get("BLSPKD_TEST_ARTIFACTS", ROOT / "test-artifacts")
)
INSTRUCTION = "Say it back, please:"


def _chromium():
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _why_skip():
    try:
        import gradio  # noqa: F401
    except ImportError:
        return "gradio (the demo extra) is not installed"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright's Python package is not installed"
    if _chromium() is None:
        return (
            "Debian's chromium is not installed (tools/install.sh installs "
            "it with apt-get when run as root or in CI)"
        )
    return None


pytestmark = pytest.mark.skipif(
    _why_skip() is not None, reason=str(_why_skip())
)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from speechbrain_blspkd.inference.export import export_model
    from speechbrain_blspkd.testing import tiny_saved_speech_llm

    tmp = tmp_path_factory.mktemp("browser")
    model = tiny_saved_speech_llm(tmp / "bases", seed=0, instruction="Repeat:")
    folder = export_model(model, tmp / "model", {"max_new_tokens": 8})
    port = _free_port()
    log = open(tmp / "server.log", "w")  # noqa: SIM115 (closed below)
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1",
        GRADIO_ANALYTICS_ENABLED="False",
    )
    cmd = [
        sys.executable,
        "-m",
        "speechbrain_blspkd.inference.demo_ui",
        "--model",
        str(folder),
        "--asr",
        str(tmp / "bases" / "whisper"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 180
    try:
        while True:
            if proc.poll() is not None:
                raise AssertionError(
                    "the demo server stopped:\n"
                    + (tmp / "server.log").read_text()[-4000:]
                )
            try:
                with urllib.request.urlopen(url, timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            assert time.time() < deadline, "the demo server did not start"
            time.sleep(0.5)
        yield {"url": url, "folder": folder, "tmp": tmp, "proc": proc}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(
            executable_path=_chromium(),
            headless=True,
            args=["--no-sandbox", "--disable-dev-shm-usage"],
        )
        try:
            yield chromium
        finally:
            chromium.close()


def _open(browser, url):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(60_000)
    page.goto(url, wait_until="domcontentloaded")
    page.wait_for_selector("#answer")
    return page


def _status(page, pattern, timeout=180_000):
    """Wait until #status matches ``pattern`` (a JS regex); its text."""
    page.wait_for_function(
        "p => { const s = document.querySelector('#status');"
        " return s && new RegExp(p).test(s.innerText); }",
        arg=pattern,
        timeout=timeout,
    )
    return page.inner_text("#status")


def _upload_and_answer(page, path):
    page.locator("#audio input[type=file]").first.set_input_files(str(path))
    page.wait_for_timeout(500)
    page.click("#answer")


def test_upload_answer_equals_generate_file(server, browser):
    from speechbrain_blspkd.inference import SpeechLLM

    clip = write_speechlike_wav(server["tmp"] / "spoken.wav", 1.3)
    page = _open(browser, server["url"])
    # type an instruction of one's own (the list offers the model's too)
    box = page.locator("#instruction input")
    box.click()
    box.fill(INSTRUCTION)
    box.press("Enter")
    _upload_and_answer(page, clip)
    status = _status(page, "Done|Cannot answer|went wrong")
    assert status.startswith("Done"), status
    shown = page.locator("#answer-0 textarea").input_value()

    llm = SpeechLLM.from_hparams(
        source=server["folder"], run_opts={"device": "cpu"}
    )
    want = llm.generate_file(clip, instruction=INSTRUCTION)
    assert shown == want
    assert want != llm.generate_file(clip)  # the typed instruction counted
    # the cascade beside it: the transcript and the same LLM's answer
    transcript = page.locator("#transcript textarea").input_value()
    assert transcript
    # the CIF plot of this CIF model
    assert page.locator("#cif-0 img").count() == 1
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "demo_ui.png"), full_page=True)
    assert (ARTIFACTS / "demo_ui.png").stat().st_size > 10_000
    page.close()


def test_non_audio_upload_gets_a_clear_message(server, browser):
    page = _open(browser, server["url"])
    # a file that claims to be audio but is not
    fake = server["tmp"] / "notes.wav"
    fake.write_text("meeting notes, not a recording\n")
    _upload_and_answer(page, fake)
    status = _status(page, "Done|Cannot answer|went wrong")
    assert "'notes.wav' is not an audio file this demo can read" in status
    assert page.locator("#answer-0 textarea").input_value() == ""
    # a text file: the upload is refused, and Answer says there is no audio
    text = server["tmp"] / "notes.txt"
    text.write_text("meeting notes\n")
    page.reload(wait_until="domcontentloaded")
    page.wait_for_selector("#answer")
    page.locator("#audio input[type=file]").first.set_input_files(str(text))
    page.wait_for_timeout(500)
    page.click("#answer")
    status = _status(page, "Done|Cannot answer|went wrong")
    assert "No audio" in status
    # the server lives on: a good clip is answered after the bad ones
    clip = write_speechlike_wav(server["tmp"] / "again.wav", 0.8)
    page.reload(wait_until="domcontentloaded")
    page.wait_for_selector("#answer")
    _upload_and_answer(page, clip)
    assert _status(page, "Done|Cannot answer|went wrong").startswith("Done")
    assert server["proc"].poll() is None
    page.close()
