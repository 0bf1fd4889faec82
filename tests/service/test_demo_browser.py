"""``livestack demo`` in a real browser: the gate's rejection and every frame's verdict.

The real demo runs as a subprocess (small frames, a short interval); Debian's chromium
opens its viewer. The test waits on DOM state (``data-count``, ``data-reason``), never on
time, and leaves a screenshot in ``test-artifacts/demo-verdicts.png``.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from tests.daemon_helpers import Daemon as CliProcess
from tests.service.test_viewer_browser import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS, _require_chromium

#: The demo's cloudy frame (``livestack.cli.DEMO_SKY``) and its first satellite frames.
CLOUD_FRAME = 10
N_FRAMES = 14


def test_demo_viewer_shows_a_rejected_frame_a_removed_trail_and_the_verdicts(
        tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    from livestack.cli import DEMO_SKY

    _require_chromium()
    assert CLOUD_FRAME in DEMO_SKY["cloud_frames"] and DEMO_SKY["satellite_frames"][0] < 10
    env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
    demo = CliProcess(["demo", "--frames", str(N_FRAMES), "--interval", "0.3", "--size",
                       "480x360", "--port", "0", "--output", str(tmp_path / "out")], env)
    try:
        url = demo.wait_line(lambda s: s.strip().startswith("viewer"), 240).split()[-1]
        assert url.startswith("http://127.0.0.1:")
        expect.set_options(timeout=120_000)
        ARTIFACTS.mkdir(exist_ok=True)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 1000})
                errors: list[str] = []
                page.on("pageerror", lambda exc: errors.append(str(exc)))
                page.goto(url)
                verdicts = page.locator("#verdict-list")
                expect(verdicts).to_have_attribute("data-count", str(N_FRAMES))
                expect(verdicts).to_have_attribute("data-rejected", "1")
                # The cloudy frame: rejected, with the gate's reason, in both lists.
                cloudy = f"light_{CLOUD_FRAME:04d}.fits"
                rejected = page.locator("#rejected-list li")
                expect(rejected).to_have_count(1)
                expect(rejected.first).to_contain_text(cloudy)
                expect(rejected.first).to_have_attribute("data-reason", "background_jump")
                row = page.locator("#verdict-list li[data-verdict='rejected']")
                expect(row).to_contain_text(cloudy)
                expect(row).to_contain_text("background_jump")
                # Accepted frames are listed too; the satellite frames' trails were clipped.
                accepted = page.locator("#verdict-list li[data-verdict='accepted']")
                expect(accepted).to_have_count(N_FRAMES - 1)
                expect(accepted.first).to_contain_text("stars")
                trails = page.locator("#verdict-list li[data-trail='1']")
                expect(trails).to_have_count(2)  # frames 6 and 13
                expect(trails.first).to_contain_text("light_0013.fits")
                expect(page.locator("#preview")).not_to_have_attribute("data-version", "0")
                page.locator("#verdicts-title").scroll_into_view_if_needed()
                page.screenshot(path=str(ARTIFACTS / "demo-verdicts.png"), full_page=True)
                assert not errors, errors
            finally:
                browser.close()
    finally:
        demo.proc.send_signal(signal.SIGINT)
        try:
            demo.proc.wait(60)
        except subprocess.TimeoutExpired:
            demo.proc.kill()
    assert demo.proc.returncode == 0, demo.seen[-20:]
    # The simulated sky is not a catalogue's: the demo never plate-solves it (a solve could
    # only fail, with a warning alert, after a minute of a core).
    assert not [line for line in demo.drain() if "plate" in line]
