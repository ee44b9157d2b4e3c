"""The documentation site builds strictly, its code runs, and its method table says what the registry holds.

Code blocks are run in a fresh Python process per page (in a temporary folder), in order and in one namespace, so
a page's examples behave as a reader pasting them one after the other would see, and a method a page registers does
not leak into the registry the other tests see.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)

# Runs each block with its own filename, so a traceback names the page and the block.
RUNNER = """
import json, sys
namespace = {"__name__": "__main__"}
for name, source in json.load(sys.stdin):
    exec(compile(source, name, "exec"), namespace)
"""


def python_blocks(page: Path) -> list[str]:
    return PYTHON_BLOCK.findall(page.read_text(encoding="utf-8"))


def run_blocks(page: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    blocks = [(f"{page.relative_to(ROOT)} [python block {i}]", src) for i, src in enumerate(python_blocks(page))]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "MPLBACKEND": "Agg"}
    return subprocess.run([sys.executable, "-c", RUNNER], input=json.dumps(blocks), cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=1800)


def test_mkdocs_build_strict(tmp_path: Path) -> None:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    reference = (tmp_path / "site" / "reference" / "index.html").read_text(encoding="utf-8")
    # the reference documents the public API only (every object it anchors is exported by the package)
    import fair_forge.explainability as api

    anchored = set(re.findall(r'id="fair_forge\.explainability\.(?:[a-z_]+\.)*(\w+)"',
                              reference))
    assert anchored - {"errors"} <= set(api.__all__), anchored - set(api.__all__)
    assert {"AttributionExplainer", "AttributionResult", "NonFiniteScoreError", "render_html"} <= anchored


def test_getting_started_has_the_two_commands_and_runnable_python() -> None:
    text = (DOCS / "index.md").read_text(encoding="utf-8")
    assert "make demo" in text and "make test" in text
    first = python_blocks(DOCS / "index.md")[0]
    assert len([line for line in first.splitlines() if line.strip()]) <= 6


def test_concepts_method_table_matches_the_registry() -> None:
    from fair_forge.explainability import available_methods
    from fair_forge.explainability.methods import get_method

    rows = {}
    for line in (DOCS / "concepts.md").read_text(encoding="utf-8").splitlines():
        match = re.match(r"\| `(\w+)` \| (gradient|perturbation) \|", line)
        if match:
            rows[match.group(1)] = (match.group(2), line.rsplit("|", 2)[1])
    assert sorted(rows) == available_methods()
    for name, (kind, parameters) in rows.items():
        spec = get_method(name)
        assert kind == spec.kind, name
        documented = dict(re.findall(r"`(\w+)=([^`]+)`", parameters))
        assert documented == {key: str(value) for key, value in spec.defaults.items()}, name
        additive_cell = line_for(name).split("|")[4].strip()
        assert additive_cell.startswith("no") != spec.additive, (name, additive_cell)


def line_for(method: str) -> str:
    for line in (DOCS / "concepts.md").read_text(encoding="utf-8").splitlines():
        if line.startswith(f"| `{method}` |"):
            return line
    raise AssertionError(f"{method} has no row")


@pytest.mark.integration
@pytest.mark.parametrize(
    "page", [DOCS / "index.md", *sorted((DOCS / "how-to").glob("*.md"))], ids=lambda p: str(p.relative_to(DOCS))
)
def test_code_blocks_run(page: Path, tmp_path: Path) -> None:
    assert python_blocks(page), f"{page.name} has no python code blocks"
    done = run_blocks(page, tmp_path)
    assert done.returncode == 0, f"{page.name}:\n{done.stdout}\n{done.stderr[-4000:]}"

