"""The saved HTML in a real browser: injected markup stays text, only the row picker script runs.

Needs headless Chromium (``make browser-deps``, which ``make test`` runs); skipped when it is missing, except in CI.
Each test reads the DOM the browser built (``--dump-dom``) after all scripts ran, and one saves a screenshot.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from fair_forge.explainability.core.types import (
    AttributionMatrix,
    AttributionMethod,
    AttributionResult,
    Granularity,
    TokenAttribution,
    normalize_scores,
)
from fair_forge.explainability.viz.html import render_html

CHROMIUM = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome") if shutil.which(name)),
                None)
if CHROMIUM is None and os.environ.get("CI"):  # `make test` installs it; in CI a skip would hide a broken set-up
    raise RuntimeError("headless Chromium is missing in CI: `make test` should have installed it (make browser-deps)")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="headless Chromium not installed (make browser-deps)"
)

# Each payload would rename the page or add a <pwned> element if it ever ran.
PWN_IMG = "<img src=x onerror=\"document.title='pwned';document.body.append(document.createElement('pwned'))\">"
PWN_SCRIPT = "</script><script>document.title='pwned';document.body.append(document.createElement('pwned'))</script>"
PWN_SVG = "<svg onload=\"document.title='pwned'\"></svg>"
PAYLOADS = (PWN_IMG, PWN_SCRIPT, PWN_SVG)


def injected_result() -> AttributionResult:
    """A result with every user-text field (prompt, target, features, matrix labels, model) carrying payloads."""
    texts = ["The", "capital", PWN_IMG, PWN_SCRIPT, PWN_SVG]
    scores = [0.1, 1.2, -0.8, 0.4, -0.2]
    matrix = AttributionMatrix(
        row_labels=[" Paris", PWN_IMG, PWN_SCRIPT],
        column_labels=texts,
        values=[[0.1, 1.0, -0.5, 0.2, 0.0], [-1.0, 0.3, 0.0, 0.6, 0.1], [0.0, -0.2, 0.9, 0.0, -0.4]],
    )
    return AttributionResult(
        prompt="The capital " + " ".join(PAYLOADS),
        target=" Paris" + PWN_IMG + PWN_SCRIPT,
        method=AttributionMethod.OCCLUSION,
        granularity=Granularity.WORD,
        attributions=[
            TokenAttribution(text=t, score=s, position=i, normalized_score=n)
            for i, (t, s, n) in enumerate(zip(texts, scores, normalize_scores(scores)))
        ],
        matrix=matrix,
        model_name=PWN_SVG,
    )


def run_chromium(page: Path, tmp_path: Path, *mode: str) -> subprocess.CompletedProcess[str]:
    """Open ``page`` in a throw-away headless profile with no network services; ``mode`` picks the output."""
    command = [
        str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
        "--enable-logging=stderr", "--v=0", f"--user-data-dir={tmp_path / 'profile'}", *mode, page.as_uri(),
    ]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert completed.returncode == 0, completed.stderr[-2000:]
    return completed


class _Dom(HTMLParser):
    """Tags with attributes, the document title, and the text of each script, from a serialized DOM."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.title = ""
        self.scripts: list[tuple[dict[str, str | None], str]] = []
        self._open: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        self._open = tag
        if tag == "script":
            self.scripts.append((dict(attrs), ""))

    def handle_data(self, data: str) -> None:
        if self._open == "title":
            self.title += data
        elif self._open == "script":
            attrs, text = self.scripts[-1]
            self.scripts[-1] = (attrs, text + data)

    def handle_endtag(self, tag: str) -> None:
        self._open = None


def dump_dom(page: Path, tmp_path: Path) -> tuple[_Dom, str]:
    completed = run_chromium(page, tmp_path, "--dump-dom")
    dom = _Dom()
    dom.feed(completed.stdout)
    dom.close()
    console = "\n".join(line for line in completed.stderr.splitlines() if ":CONSOLE" in line)
    return dom, console


def assert_inert(dom: _Dom) -> None:
    names = [tag for tag, _ in dom.tags]
    assert not {"img", "svg", "pwned", "iframe", "object"} & set(names), names
    assert names.count("script") == 2
    assert [attrs for tag, attrs in dom.tags if tag == "script"] == [
        {"type": "application/json", "class": "ff-data"},
        {},
    ]
    assert not any(name.startswith("on") for _, attrs in dom.tags for name in attrs)
    assert "pwned" != dom.title


def test_saved_html_shows_payloads_as_text_and_runs_only_its_script(tmp_path: Path) -> None:
    result = injected_result()
    page = result.save_html(tmp_path / "result.html")
    dom, console = dump_dom(page, tmp_path)
    assert_inert(dom)
    assert dom.title == f"occlusion attribution: {result.target}"
    assert "Content Security Policy" not in console, console  # the picker script's hash matches
    [picker] = [attrs for tag, attrs in dom.tags if tag == "select"]
    assert "disabled" not in picker  # the picker script ran and enabled it
    [(_, data)] = [(a, t) for a, t in dom.scripts if a.get("type") == "application/json"]
    assert json.loads(data)["rows"] == result.matrix.row_labels


def test_fragment_in_a_page_without_csp_is_inert_and_its_picker_works(tmp_path: Path) -> None:
    """Notebook-like embedding (no CSP): escaping alone keeps payloads inert; choosing row 2 shows row 2."""
    result = injected_result()
    choose_row = (
        "<script>var s = document.querySelector('select.ff-row-picker'); s.value = '2';"
        "s.dispatchEvent(new Event('change'));</script>"
    )
    page = tmp_path / "notebook.html"
    page.write_text(
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>notebook</title></head><body>"
        f"{render_html(result, standalone=False)}{choose_row}</body></html>",
        encoding="utf-8",
    )
    dom, _ = dump_dom(page, tmp_path)
    assert dom.title == "notebook"
    names = [tag for tag, _ in dom.tags]
    assert not {"img", "svg", "pwned"} & set(names)
    assert names.count("script") == 3  # data, picker, and this test's row chooser
    [(_, data)] = [(a, t) for a, t in dom.scripts if a.get("type") == "application/json"]
    expected_titles = json.loads(data)["titles"][2]
    cells = [attrs for tag, attrs in dom.tags if tag == "span" and attrs.get("class") == "ff-cell"]
    assert [cell["title"] for cell in cells] == expected_titles
    assert "rgb(" in cells[2]["style"]  # recoloured by the script for row 2 (0.9 -> strong red)


def test_screenshot_of_the_saved_html(tmp_path: Path) -> None:
    page = injected_result().save_html(tmp_path / "result.html")
    screenshot = tmp_path / "result.png"
    run_chromium(page, tmp_path, f"--screenshot={screenshot}", "--window-size=1100,900", "--hide-scrollbars")
    data = screenshot.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000
