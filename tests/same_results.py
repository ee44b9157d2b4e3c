"""Comparing two runs' records: which fields depend on packing, and equality up to float32 rounding."""

from __future__ import annotations

from typing import Any

import pytest

# Which items share a packed model call depends on which items a run explains and on the engine's batches, so runs
# over different items (a prefix of a source, then all of it; one item alone) or on different engines (local, Ray)
# agree up to float32 rounding of the padding, and their pass counts are those of their own calls. (A resumed local
# run of the same source re-runs its block: it agrees bit for bit.)
PACKING_DEPENDENT = ("compute_time_seconds", "n_forward_passes", "n_backward_passes", "n_tokens_processed")


def close(left: Any, right: Any, path: str = "") -> None:
    """``left`` equals ``right``: floats to 1e-5 absolute (float32 log-probs of ~30 nats round at ~3e-6; a normalized
    score divides by a score of ~1e-2, hence the relative 1e-3), everything else exactly. For float32 runs of the tiny
    models compared field by field; a test that compares a float64 model's scores bounds them by model_bound."""
    if isinstance(left, dict):
        assert left.keys() == right.keys(), path
        for key in left:
            close(left[key], right[key], f"{path}.{key}")
    elif isinstance(left, list):
        assert len(left) == len(right), path
        for position, (a, b) in enumerate(zip(left, right)):
            close(a, b, f"{path}[{position}]")
    elif isinstance(left, float):
        # float32 runs (the resumed tiny-model outputs): scores of ~30 nats, ~3e-6 apart; normalized: / a peak ~1e-2
        assert left == pytest.approx(right, rel=1e-3, abs=1e-5), path
    else:
        assert left == right, path
