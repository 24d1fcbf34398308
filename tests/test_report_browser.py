"""The HTML report in a real browser: headless Chromium opens ``report.html`` of a run with a real
counterexample, draws it without a console error or a request outside the file, and the pictures
are there. Chromium is a system package (``apt-get install chromium`` on Debian; the README's test
command installs it); ``playwright`` (the ``test`` extra) drives it and downloads no browser."""
from __future__ import annotations

import os
import shutil
import struct
import time
import zlib
from pathlib import Path

import pytest

import isolation_suite as iso
from isolation_suite.engine.check import search
from isolation_suite.reporting.report import environment, record, write_summary

INSTALL = ("headless Chromium is needed for the report's browser test and was not found: install it with "
           "`apt-get install -y chromium` (Debian/Ubuntu; the README's test command does), or point "
           "ISOLATION_CHROMIUM at a Chromium or Chrome binary")


def chromium_path() -> str:
    for candidate in (os.environ.get("ISOLATION_CHROMIUM"), shutil.which("chromium"),
                      shutil.which("chromium-browser"), shutil.which("google-chrome")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    pytest.fail(INSTALL, pytrace=False)


def png_facts(png: bytes) -> tuple[int, int, int]:
    """(width, height, distinct byte values of the decompressed pixel rows) of a PNG: a blank page
    decompresses to a handful of values, a drawn one to many."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, width, height, data = 8, 0, 0, b""
    while pos < len(png):
        length, kind = struct.unpack(">I4s", png[pos:pos + 8])
        body = png[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height = struct.unpack(">II", body[:8])
        elif kind == b"IDAT":
            data += body
        pos += 12 + length
    return width, height, len(set(zlib.decompress(data)))


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    """A run folder: a known-bad catalog technique caught with its counterexample, and a sound one."""
    run_dir = tmp_path_factory.mktemp("report") / "run"
    for name in ("restore_after_step", "freeze_and_eval"):
        technique = iso.catalog()[name]
        started = time.monotonic()
        result = search(technique, max_examples=5)
        record(result, technique, time.monotonic() - started, run_dir)
    write_summary(run_dir, environment({"devices": "cpu"}), complete=True)
    return run_dir / "report.html"


@pytest.fixture(scope="module")
def page_of(report):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is needed for the report's browser test: pip install -e '.[test]'", pytrace=False)
    executable = chromium_path()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, headless=True,
                                    args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            problems: list[str] = []
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("request", lambda r: problems.append(f"request: {r.url}")
                    if r.url != report.as_uri() else None)
            page.goto(report.as_uri())
            page.wait_for_load_state("load")
            yield page, problems
        finally:
            browser.close()


def test_the_report_renders_in_chromium_with_its_pictures(page_of, report):
    page, problems = page_of
    png = page.screenshot(full_page=True)
    width, height, distinct = png_facts(png)
    assert width == 1280 and 900 <= height <= 20000, (width, height)
    assert distinct > 50, "the screenshot is blank"
    assert len(png) > 20_000
    assert problems == []  # no console error, no failed script, nothing fetched beyond the file itself
    assert page.locator("svg.curves").count() == 1  # the one counterexample
    assert page.locator("svg.curves polyline").count() >= 2  # two steps: the loss and divergence lines
    assert page.locator("svg.tree g.module.elements").count() == 1  # the element-frozen layer is marked
    assert page.locator("svg.timeline").count() == 2  # one per search
    assert page.locator("svg.timeline path.violated").count() == 1
    for svg in page.locator("svg").all():
        box = svg.bounding_box()
        assert box is not None and box["width"] > 100 and box["height"] > 40  # drawn, with a size
    assert page.title() == f"isolation-suite {report.parent.name}"


def test_a_missing_chromium_is_a_failure_that_says_how_to_install_it(monkeypatch):
    monkeypatch.setenv("ISOLATION_CHROMIUM", "/nonexistent/chromium")
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(pytest.fail.Exception, match="apt-get install -y chromium"):
        chromium_path()
