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


def tallest_bar(shot: Path) -> int:
    """The longest vertical run of bar-coloured pixels in the screenshot."""
    from PIL import Image

    image = Image.open(shot).convert("RGB")
    width, height = image.size
    raw = image.tobytes()
    best = 0
    for x in range(width):
        run = 0
        for y in range(height):
            i = (y * width + x) * 3
            run = run + 1 if all(abs(raw[i + k] - BAR[k]) <= 8 for k in range(3)) else 0
            best = max(best, run)
    return best

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium here (.ci/run installs Debian's)")


@pytest.mark.usefixtures("quickstart")
def test_the_statement_page_renders_with_its_chart(tmp_path: Path) -> None:
    from PIL import Image

    deposit("phys", "1000", start="2026-01-01")
    for day, core_hours in ((2, 400), (9, 1200), (17, 300), (28, 800)):
        charge("phys", "cluster-core-hours", str(core_hours), user="tux", effective_at=f"2026-10-{day:02d}T12:00:00Z")
    with session_scope() as s:
        (st,) = statements(s, *month("2026-10"), ["phys"])
    page = tmp_path / "phys-2026-10.html"
    page.write_text(render.to_html(st))
    shot = tmp_path / "phys-2026-10.png"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--screenshot={shot}", "--window-size=1000,900", page.as_uri()],
                   check=True, capture_output=True, timeout=120)
    image = Image.open(shot).convert("RGB")
    assert image.size == (1000, 900)
    raw = image.tobytes()
    pixels = [tuple(raw[i:i + 3]) for i in range(0, len(raw), 3)]
    bars = sum(1 for p in pixels if all(abs(a - b) <= 8 for a, b in zip(p, BAR, strict=True)))
    assert bars > 500, f"the chart's bars cover {bars} pixels"  # four days of 31 charged
    assert tallest_bar(shot) >= 130  # the biggest day's bar stands its full height (140 px)
    text = sum(1 for p in pixels if max(p) < 80)
    assert text > 500  # the tables' text is there too


@pytest.mark.usefixtures("quickstart")
def test_the_usage_page_renders_with_its_charts(tmp_path: Path, cli) -> None:  # type: ignore[no-untyped-def]
    from PIL import Image

    deposit("phys", "1000", start="2026-01-01")
    for day, core_hours in ((2, 400), (9, 1200), (17, 300)):
        charge("phys", "cluster-core-hours", str(core_hours), user="tux", effective_at=f"2026-10-{day:02d}T12:00:00Z")
    assert cli("report", "rollup", "--from", "2026-10-01", "--to", "2026-10-31").code == 0
    page = tmp_path / "usage.html"
    page.write_text(cli("report", "usage", "--from", "2026-10-01", "--to", "2026-10-31", "--format", "html").out)
    shot = tmp_path / "usage.png"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--screenshot={shot}", "--window-size=1000,900", page.as_uri()],
                   check=True, capture_output=True, timeout=120)
    raw = Image.open(shot).convert("RGB").tobytes()
    bars = sum(1 for i in range(0, len(raw), 3) if all(abs(raw[i + k] - BAR[k]) <= 8 for k in range(3)))
    assert bars > 2000, f"the charts cover {bars} pixels"  # three days' bars and two full share bars
    assert tallest_bar(shot) >= 130
