#!/usr/bin/env python3
"""Screenshot of the browser demo answering a clip (the README's picture).

::

    python tools/demo_screenshot.py --model FOLDER [--model FOLDER2] \\
        --wav speech.wav [--instruction TEXT] [--asr SOURCE] \\
        [--out docs/images/demo_ui.png]

Starts ``blspkd-demo-ui`` on a free port of 127.0.0.1, drives Debian's
headless Chromium with playwright (no browser download), uploads the clip,
chooses or types the instruction, presses *Answer*, waits for the answers
and writes a full-page PNG. The server is stopped at the end.
"""

import argparse
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time
import urllib.request


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", required=True)
    parser.add_argument("--wav", required=True)
    parser.add_argument("--instruction", default=None)
    parser.add_argument("--asr", default=None)
    parser.add_argument("--out", default="docs/images/demo_ui.png")
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args(argv)

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("error: Debian's chromium is not installed", file=sys.stderr)
        return 2
    from playwright.sync_api import sync_playwright

    port = _free_port()
    cmd = [sys.executable, "-m", "speechbrain_blspkd.inference.demo_ui"]
    for folder in args.model:
        cmd += ["--model", folder]
    if args.asr:
        cmd += ["--asr", args.asr]
    cmd += ["--port", str(port)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False")
    server = subprocess.Popen(cmd, env=env)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + args.timeout
        while True:
            if server.poll() is not None:
                print("error: the demo server stopped", file=sys.stderr)
                return 1
            try:
                with urllib.request.urlopen(url, timeout=2):
                    break
            except OSError:
                if time.time() > deadline:
                    print("error: the server did not start", file=sys.stderr)
                    return 1
                time.sleep(1.0)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=chromium,
                headless=True,
                args=["--no-sandbox", "--disable-dev-shm-usage"],
            )
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(args.timeout * 1000)
            page.goto(url, wait_until="domcontentloaded")
            page.wait_for_selector("#answer")
            if args.instruction:
                box = page.locator("#instruction input")
                box.click()
                box.fill(args.instruction)
                box.press("Enter")
            page.locator("#audio input[type=file]").first.set_input_files(
                args.wav
            )
            page.wait_for_timeout(800)
            page.click("#answer")
            page.wait_for_function(
                "() => /Done|Cannot answer|went wrong/.test("
                "document.querySelector('#status').innerText)"
            )
            print(page.inner_text("#status"))
            page.wait_for_timeout(800)
            out = pathlib.Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out), full_page=True)
            browser.close()
        print(out)
        return 0
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


if __name__ == "__main__":
    sys.exit(main())
