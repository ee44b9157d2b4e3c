"""``fair-forge-explain``: the command line. Each command is a module with a parser and a runner; this module
wires them (``main`` dispatches on the first argument) and turns typed errors into exit codes.

    fair-forge-explain --prompt "..." --target "..."          explain one response (``explain.py``)
    fair-forge-explain dataset items.jsonl --out out.parquet   explain a dataset (``dataset.py``)
    fair-forge-explain summarize out.parquet                   per-feature summary of an output (``dataset.py``)
    fair-forge-explain audit --input items.jsonl --protected she,he --out report.html   fairness audit (``audit.py``)

Building a parser imports neither torch nor transformers (``--help`` answers at once).
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from ..errors import ExplainabilityError, InvalidInputError
from .common import EXIT_BAD_INPUT, EXIT_FAILURE, PROG, BadInput, one_line
from . import audit, dataset
from .explain import build_parser, run

__all__ = ["build_parser", "main"]

# name -> (parser, runner); ``main`` dispatches on the first argument
SUBCOMMANDS = {**dataset.SUBCOMMANDS, **audit.SUBCOMMANDS}


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    build, command = SUBCOMMANDS[argv[0]] if argv and argv[0] in SUBCOMMANDS else (build_parser, run)
    args = build().parse_args(argv[1:] if build is not build_parser else argv)  # bad arguments: exit code 2
    try:
        return command(args)
    except (BadInput, InvalidInputError) as exc:
        print(f"{PROG}: error: {one_line(exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ExplainabilityError as exc:
        print(f"{PROG}: error: {one_line(exc)}", file=sys.stderr)
        return EXIT_FAILURE
    except MemoryError:
        print(f"{PROG}: error: out of memory; ask for fewer steps or samples (--param)", file=sys.stderr)
        return EXIT_FAILURE
