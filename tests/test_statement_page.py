"""The HTML statement in a real headless Chromium: it renders, and its chart's bars are drawn."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from openacct.shortcuts import charge, deposit
from services.reporter import render
from services.reporter.statements import month, statements
from shared.db import session_scope

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
BAR = (0x3A, 0x6E, 0xA5)  # the chart's fill colour (render.py)


def screenshot(page: Path) -> tuple[tuple[int, int], list[tuple[int, ...]]]:
    """The page as headless Chromium draws it at 1000 x 900: its size, and its pixels, row by row."""
    from PIL import Image

    shot = page.with_suffix(".png")
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",  # type: ignore[list-item]
                    f"--screenshot={shot}", "--window-size=1000,900", page.as_uri()],
                   check=True, capture_output=True, timeout=120)
    image = Image.open(shot).convert("RGB")
    raw = image.tobytes()
    return image.size, [tuple(raw[i:i + 3]) for i in range(0, len(raw), 3)]


def is_bar(pixel: tuple[int, ...]) -> bool:
    return all(abs(a - b) <= 8 for a, b in zip(pixel, BAR, strict=True))


def tallest_bar(size: tuple[int, int], pixels: list[tuple[int, ...]]) -> int:
    """The longest vertical run of bar-coloured pixels."""
    width, height = size
    best = 0
    for x in range(width):
        run = 0
        for y in range(height):
            run = run + 1 if is_bar(pixels[y * width + x]) else 0
            best = max(best, run)
    return best


pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium here (.ci/run installs Debian's)")


@pytest.mark.usefixtures("quickstart")
def test_the_statement_page_renders_with_its_chart(tmp_path: Path) -> None:
    deposit("phys", "1000", start="2026-01-01")
    for day, core_hours in ((2, 400), (9, 1200), (17, 300), (28, 800)):
        charge("phys", "cluster-core-hours", str(core_hours), user="tux", effective_at=f"2026-10-{day:02d}T12:00:00Z")
    with session_scope() as s:
        (st,) = statements(s, *month("2026-10"), ["phys"])
    page = tmp_path / "phys-2026-10.html"
    page.write_text(render.to_html(st))
    size, pixels = screenshot(page)
    assert size == (1000, 900)
    bars = sum(1 for p in pixels if is_bar(p))
    assert bars > 500, f"the chart's bars cover {bars} pixels"  # four days of 31 charged
    assert tallest_bar(size, pixels) >= 130  # the biggest day's bar stands its full height (140 px)
    text = sum(1 for p in pixels if max(p) < 80)
    assert text > 500  # the tables' text is there too


@pytest.mark.usefixtures("quickstart")
def test_the_usage_page_renders_with_its_charts(tmp_path: Path, cli) -> None:  # type: ignore[no-untyped-def]
    deposit("phys", "1000", start="2026-01-01")
    for day, core_hours in ((2, 400), (9, 1200), (17, 300)):
        charge("phys", "cluster-core-hours", str(core_hours), user="tux", effective_at=f"2026-10-{day:02d}T12:00:00Z")
    assert cli("report", "rollup", "--from", "2026-10-01", "--to", "2026-10-31").code == 0
    page = tmp_path / "usage.html"
    page.write_text(cli("report", "usage", "--from", "2026-10-01", "--to", "2026-10-31", "--format", "html").out)
    size, pixels = screenshot(page)
    bars = sum(1 for p in pixels if is_bar(p))
    assert bars > 2000, f"the charts cover {bars} pixels"  # three days' bars and two full share bars
    assert tallest_bar(size, pixels) >= 130
