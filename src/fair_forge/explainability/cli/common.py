"""What every command shares: the exit codes, argparse that exits with 2 in one line, argument checks that run
before any model loads, and loading the model a command explains (the embedded default or a local folder).

Importing this module imports neither torch nor transformers, so ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any, Optional, Sequence

PROG = "fair-forge-explain"
EXIT_BAD_INPUT = 2
EXIT_FAILURE = 1
#: The item fields ``--column KEY=NAME`` maps to source columns (``id`` is the id column).
COLUMN_KEYS = ("messages", "prompt", "question", "system", "context", "target", "id", "contrast_target",
               "counterfactual")


class BadInput(Exception):
    """Input rejected by the CLI itself, before any model is loaded."""


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (and exit code 2), not the whole usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def parse_params(pairs: Sequence[str]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise BadInput(f"--param expects KEY=VALUE, got {pair!r}")
        try:
            params[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            params[key.strip()] = value
    return params


def parse_columns(pairs: Sequence[str], keys: Sequence[str] = COLUMN_KEYS) -> dict[str, str]:
    """``--column KEY=NAME`` options as the column keywords of ``explain_dataset`` (``id`` becomes ``id_column``)."""
    columns: dict[str, str] = {}
    for pair in pairs:
        key, sep, name = pair.partition("=")
        if not sep or key not in keys or not name:
            raise BadInput(f"--column expects KEY=NAME with KEY one of {tuple(keys)}, got {pair!r}")
        columns["id_column" if key == "id" else key] = name
    if "system" in columns and "context" in columns:
        raise BadInput("--column system=... and --column context=... name the same role; give one")
    return columns


def source_file(path: str, name: str) -> Path:
    """An existing dataset file of a suffix ``explain_dataset`` reads, else ``BadInput`` naming the option."""
    from ..runs.sources import SOURCE_SUFFIXES

    source = Path(path)
    if source.suffix.lower() not in SOURCE_SUFFIXES or not source.is_file():
        raise BadInput(f"{name} {source} must be an existing {'/'.join(SOURCE_SUFFIXES)} file")
    return source


def check_text(text: Optional[str], name: str) -> None:
    """Reject text Python cannot encode (a lone surrogate, e.g. from undecodable bytes in argv) before any load."""
    if text is None:
        return
    from ..text.prompt import validate_text

    validate_text(text, name)


def check_method(method: Optional[str]) -> None:
    """Reject an unknown method before the (slow) model load; the registry's error names the available ones."""
    if method is None:
        return
    from ..methods.registry import get_method

    get_method(method)


def check_contrast(contrast: str) -> None:
    """Reject an unknown contrastive score before the (slow) model load."""
    from ..runtime.scores import get_score

    get_score(contrast, contrastive=True)


def load_model(path: Optional[str]) -> tuple[Any, Any, str]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    if path is None:
        from ..runtime.models import DEFAULT_MODEL_NAME, load_default_model

        model, tokenizer = load_default_model()
        return model, tokenizer, DEFAULT_MODEL_NAME
    folder = Path(path)
    if not folder.is_dir():
        raise BadInput(f"--model {path}: no such folder (give a local transformers model folder)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise BadInput(f"--model {path}: cannot load a causal LM and tokenizer from it ({one_line(exc)})") from None
    model.eval()
    return model, tokenizer, folder.name or str(folder)


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= 400 else text[:397] + "..."
