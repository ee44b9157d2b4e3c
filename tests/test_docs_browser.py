"""The built documentation site in headless Chromium at 1280 px: code blocks fit without horizontal scrolling,
identifiers in tables are not broken mid-word, and the getting-started page is saved as a screenshot.

Builds the site once (about 5 s); needs Chromium like tests/test_browser.py (skipped without it, except in CI).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from test_browser import CHROMIUM, run_chromium

pytestmark = [pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed (make browser-deps)"),
              pytest.mark.xdist_group("browser")]  # the module's screenshots in one test worker

ROOT = Path(__file__).resolve().parents[1]
WINDOW = "--window-size=1280,900"

# Appended to a page: measures the laid-out page and writes the numbers into it, for --dump-dom to read back.
MEASURE = """<script>
(function () {
  // material scrolls a block's code element, not its pre
  var pres = Array.prototype.slice.call(document.querySelectorAll('.md-content pre > code'));
  var codes = Array.prototype.slice.call(document.querySelectorAll('.md-content td code'));
  var out = document.createElement('div');
  out.id = 'ff-measure';
  out.textContent = JSON.stringify({
    width: document.documentElement.clientWidth,
    pres: pres.length,
    overflowing: pres.filter(function (p) { return p.scrollWidth > p.clientWidth; })
                     .map(function (p) { return p.textContent.slice(0, 80); }),
    codes: codes.length,
    broken: codes.filter(function (c) { return c.getClientRects().length > 1; })
                 .map(function (c) { return c.textContent; })
  });
  document.body.appendChild(out);
})();
</script>"""


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(folder)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return folder


def measure(site: Path, page: str, tmp_path: Path) -> dict:
    source = site / page / "index.html" if page else site / "index.html"
    probe = source.with_name("measured.html")
    probe.write_text(source.read_text(encoding="utf-8").replace("</body>", MEASURE + "</body>"), encoding="utf-8")
    dom = run_chromium(probe, tmp_path, WINDOW, "--hide-scrollbars", "--virtual-time-budget=5000", "--dump-dom").stdout
    match = re.search(r'<div id="ff-measure">(.*?)</div>', dom)
    assert match, dom[-2000:]
    return json.loads(match.group(1).replace("&quot;", '"').replace("&amp;", "&"))


@pytest.mark.parametrize(("page", "min_pres", "min_codes"), [("", 4, 0), ("concepts", 0, 20), ("how-to/siamese", 2, 0)])
def test_code_blocks_fit_and_table_identifiers_stay_whole_at_1280px(
    site: Path, page: str, min_pres: int, min_codes: int, tmp_path: Path
) -> None:
    numbers = measure(site, page, tmp_path)
    assert numbers["width"] == 1280
    assert numbers["pres"] >= min_pres and numbers["codes"] >= min_codes, numbers  # something was measured
    assert numbers["overflowing"] == [], numbers["overflowing"]
    assert numbers["broken"] == [], numbers["broken"]


def test_screenshot_of_the_getting_started_page(site: Path, tmp_path: Path) -> None:
    screenshot = tmp_path / "getting-started.png"
    run_chromium(site / "index.html", tmp_path, f"--screenshot={screenshot}", WINDOW, "--hide-scrollbars",
                 "--virtual-time-budget=5000")
    data = screenshot.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 20_000
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1280, 900)
    if os.environ.get("FAIR_FORGE_KEEP_SCREENSHOTS"):
        shutil.copy(screenshot, os.environ["FAIR_FORGE_KEEP_SCREENSHOTS"])
