"""Start-up cost of the command line and of the package: `fair-forge-explain --help` and `import
fair_forge.explainability` in fresh processes (median of 5), and whether torch was imported on the way.

--help must answer without importing torch or transformers (the parser lists the methods from the enum), so it
costs a Python start-up plus pydantic; importing the package loads the heavy modules only on first use.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from typing import Any

REPEATS = 5

CASES = {
    "fair-forge-explain --help": [sys.executable, "-m", "fair_forge.explainability.cli", "--help"],
    "import fair_forge.explainability": [sys.executable, "-c", "import fair_forge.explainability"],
    "python -c pass (baseline)": [sys.executable, "-c", "pass"],
}
TORCH_PROBE = "import sys; import fair_forge.explainability.cli as c; c.build_parser(); print('torch' in sys.modules)"


def _seconds(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return time.perf_counter() - started


def main() -> dict[str, Any]:
    rows = []
    for name, command in CASES.items():
        timings = [_seconds(command) for _ in range(REPEATS)]
        rows.append({"case": name, "median_s": round(statistics.median(timings), 3),
                     "min_s": round(min(timings), 3), "repeats": REPEATS})
    probe = subprocess.run([sys.executable, "-c", TORCH_PROBE], check=True, capture_output=True, text=True)
    rows.append({"case": "--help imports torch", "median_s": probe.stdout.strip(), "min_s": "", "repeats": 1})
    return {"rows": rows}


if __name__ == "__main__":  # pragma: no cover
    for row in main()["rows"]:
        print(row)
