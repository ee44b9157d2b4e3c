"""`make bench`: run every benchmarks/bench_*.py, print its table, write all results to benchmarks/results/latest.json.

Each bench module exposes ``main() -> dict``. A result's ``"table"`` (a string) is printed as is; otherwise its
``"rows"`` (a list of dicts) are printed as columns; otherwise the dict is printed as JSON. One failing benchmark is
recorded and reported; the others still run, and the exit code is 1 if any failed.

    python benchmarks/run_all.py              # all of them
    python benchmarks/run_all.py gradient     # only bench_gradient.py
"""

from __future__ import annotations

import datetime as _dt
import importlib
import importlib.metadata
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Optional, Sequence

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_PATH = BENCH_DIR / "results" / "latest.json"


def peak_rss_bytes() -> int:
    """This process's peak resident set size (``VmHWM``). Not ``getrusage``'s ``ru_maxrss``: Linux keeps that across
    ``exec``, so a benchmark's subprocess would report its parent's peak when the parent's was higher."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (peak RSS is measured on Linux only)")


def discover(only: Sequence[str] = ()) -> list[str]:
    """Module names ``bench_*`` in this folder, sorted; ``only`` keeps those named (with or without ``bench_``)."""
    names = sorted(path.stem for path in BENCH_DIR.glob("bench_*.py"))
    if only:
        wanted = {name if name.startswith("bench_") else f"bench_{name}" for name in only}
        unknown = wanted - set(names)
        if unknown:
            raise SystemExit(f"run_all: no benchmark(s) {sorted(unknown)}; present: {names}")
        names = [name for name in names if name in wanted]
    return names


def format_rows(rows: list[dict[str, Any]]) -> str:
    """Plain aligned columns, in the key order of the first row (keys seen later are appended)."""
    columns: list[str] = []
    for row in rows:
        columns.extend(key for key in row if key not in columns)
    cells = [[_cell(row.get(column, "")) for column in columns] for row in rows]
    widths = [max(len(column), *(len(line[i]) for line in cells)) for i, column in enumerate(columns)]
    lines = ["  ".join(column.ljust(width) for column, width in zip(columns, widths))]
    lines.append("  ".join("-" * width for width in widths))
    lines.extend("  ".join(value.ljust(width) for value, width in zip(line, widths)) for line in cells)
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def render(result: Any) -> str:
    if isinstance(result, dict) and isinstance(result.get("table"), str):
        return result["table"]
    if isinstance(result, dict) and isinstance(result.get("rows"), list) and result["rows"]:
        if all(isinstance(row, dict) for row in result["rows"]):
            return format_rows(result["rows"])
    return json.dumps(result, indent=2, default=_json_default)


def _json_default(value: Any) -> Any:
    """numpy scalars/arrays, paths, enums and anything else JSON does not know."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def environment() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
    }
    for distribution in ("torch", "transformers", "captum", "interpreto", "retrivex", "fair-forge-explainability"):
        try:
            info[distribution] = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:  # optional packages: absent is a fact worth recording
            info[distribution] = None
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    return info


def run(only: Sequence[str] = (), results_path: Path = RESULTS_PATH) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for path in (str(REPO_ROOT), str(BENCH_DIR)):  # `benchmarks.x` and sibling `import x` both work
        if path not in sys.path:
            sys.path.insert(0, path)
    names = discover(only)
    report: dict[str, Any] = {
        "started_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "environment": environment(),
        "benchmarks": {},
        "failures": {},
    }
    if not names:
        print(f"run_all: no benchmarks/bench_*.py found in {BENCH_DIR}")
    for name in names:
        print(f"\n=== {name} ===", flush=True)
        started = time.perf_counter()
        try:
            module = importlib.import_module(f"benchmarks.{name}")
            result = module.main()
        except Exception as error:  # noqa: BLE001 - one broken benchmark must not hide the others
            traceback.print_exc()
            report["failures"][name] = f"{type(error).__name__}: {error}"
            continue
        wall = time.perf_counter() - started
        print(render(result))
        print(f"({name}: {wall:.1f} s)", flush=True)
        report["benchmarks"][name] = {"wall_seconds": round(wall, 3), "result": result}
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results_path.write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
    print(f"\nwrote {results_path}")
    if report["failures"]:
        print(f"run_all: {len(report['failures'])} benchmark(s) failed: {sorted(report['failures'])}", file=sys.stderr)
        return 1
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run(list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
