"""The viewer's plate-solve block in a real browser: status, field, RA/Dec under the cursor."""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np
from astropy.wcs import WCS

from livestack.pipeline.wcs import field_geometry, pixel_to_world, to_astropy
from livestack.service.hub import Hub
from livestack.sim.tycho import tan_cards
from tests.service.test_viewer_browser import (
    CHROMIUM,
    CHROMIUM_ARGS,
    STACK_ID,
    TIMEOUT_MS,
    FakeCommands,
    ServerThread,
    _require_chromium,
    make_jpeg,
)

SHAPE = (640, 960)


def _cards() -> dict:
    cards = tan_cards(286.0, 36.6, 2.37, SHAPE, rotation_deg=-25.0)
    cards.update({"CTYPE1": "RA---TAN-SIP", "CTYPE2": "DEC--TAN-SIP", "A_ORDER": 2,
                  "B_ORDER": 2, "A_2_0": 3e-6, "A_0_2": -2e-6, "B_1_1": 4e-6})
    return cards


def _summary(solve: dict) -> dict:
    return {"object": "TrES-1", "filter": "L", "frames": 3, "preview_version": 1,
            "state": "running", "updated": "2026-01-15T23:00:00Z", "solve": solve}


def _in_thread(action: Callable[[], None]) -> None:
    """Publish from another thread, as the daemon's worker does."""
    thread = threading.Thread(target=action)
    thread.start()
    thread.join(TIMEOUT_MS / 1000)
    assert not thread.is_alive()


def test_viewer_shows_solve_status_field_and_radec_under_the_cursor() -> None:
    from playwright.sync_api import expect, sync_playwright

    _require_chromium()
    expect.set_options(timeout=TIMEOUT_MS)
    cards = _cards()
    assert isinstance(to_astropy(cards), WCS)
    solved = {"state": "solved", "message": "solved in 2.1 s", "elapsed_s": 2.1,
              "wcs": cards, "shape": list(SHAPE),
              "field": field_geometry(cards, SHAPE).as_dict()}
    hub = Hub()
    hub.update_stack(STACK_ID, _summary({"state": "solving", "message": "solving"}))
    hub.publish_preview(STACK_ID, 1, make_jpeg(1, (SHAPE[1], SHAPE[0])))
    with ServerThread(hub, FakeCommands()) as port, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.set_default_timeout(TIMEOUT_MS)
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(f"http://127.0.0.1:{port}/")
            expect(page.locator("#conn-status")).to_have_attribute("data-state", "open")
            expect(page.locator("#preview")).to_have_attribute("data-stack", STACK_ID)
            expect(page.locator("#solve-info")).to_have_text("plate solving…")

            _in_thread(lambda: (
                hub.update_stack(STACK_ID, _summary(solved)),
                hub.publish({"type": "stack", "stack_id": STACK_ID, **_summary(solved)})))
            expect(page.locator("#solve-info")).to_have_attribute("data-state", "solved")
            text = page.text_content("#solve-info") or ""
            assert "19h04m00.0s +36°36′00″" in text and "2.37″/px" in text
            assert "PA 335.0°" in text and "solved in 2.1 s" in text

            # The page's own TAN-SIP evaluation agrees with astropy on a 5x5 grid.
            gx, gy = np.meshgrid(np.linspace(0, SHAPE[1] - 1, 5), np.linspace(0, SHAPE[0] - 1, 5))
            xy = np.column_stack([gx.ravel(), gy.ravel()])
            js = page.evaluate("([c, pts]) => pts.map(([x, y]) => "
                               "window.livestackSolve.pixelToWorld(c, x, y))",
                               [cards, xy.tolist()])
            want = pixel_to_world(cards, xy)
            assert np.max(np.abs(np.array(js) - want)) * 3600 < 0.01  # arcsec

            # Hovering shows RA/Dec of the pixel under the pointer (to a CSS pixel).
            left, top, width, height = page.eval_on_selector(
                "#preview", "i => { const r = i.getBoundingClientRect(); "
                "return [r.left, r.top, r.width, r.height]; }")
            target = np.array([300.0, 200.0])
            page.mouse.move(left + (target[0] + 0.5) / SHAPE[1] * width,
                            top + (target[1] + 0.5) / SHAPE[0] * height)
            expect(page.locator("#cursor-radec")).to_be_visible()
            ra = float(page.get_attribute("#cursor-radec", "data-ra") or "nan")
            dec = float(page.get_attribute("#cursor-radec", "data-dec") or "nan")
            px_per_css = SHAPE[1] / width
            expected = pixel_to_world(cards, target[None, :])[0]
            tol_deg = 2.37 / 3600 * 1.5 * max(px_per_css, 1.0)
            assert abs(ra - expected[0]) * np.cos(np.radians(dec)) < tol_deg
            assert abs(dec - expected[1]) < tol_deg

            failed = {"state": "failed", "reason": "not_solved",
                      "message": "no confident match among 40 stars (scale, 60 s)"}
            _in_thread(lambda: hub.publish({"type": "stack", "stack_id": STACK_ID,
                                            **_summary(failed)}))
            expect(page.locator("#solve-info")).to_have_text(
                "not solved: no confident match among 40 stars (scale, 60 s)")
            assert not errors, errors
        finally:
            browser.close()
