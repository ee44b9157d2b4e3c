"""What drove a model across a dataset: per feature text, how often it appears and how strongly it counts.

Features are grouped by their case-folded, stripped text ("Paris", " paris" and "PARIS" are one feature), over the
results of a run given in any form: an output path, an ``AttributionBatchResult``, records, results, or the tidy
table. Reading a path streams its records, so summarising a large output holds one record at a time.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Optional

from ..errors import InvalidInputError
from ..core.records import DatasetRecord
from .sinks import load_results
from ..core.types import AttributionBatchResult, AttributionResult

if TYPE_CHECKING:  # pragma: no cover
    pass

SUMMARY_COLUMNS = ("feature", "count", "n_items", "mean_score", "mean_normalized_score", "mean_abs_normalized_score")


def _scored_features(results: Any) -> Iterator[tuple[Any, str, float, float]]:
    """(item key, feature text, score, normalized score) of every feature of every successful result."""
    if isinstance(results, (str, os.PathLike)):
        results = load_results(Path(results))
    if hasattr(results, "columns") and hasattr(results, "itertuples"):  # the tidy table
        rows = results[results["status"] == "ok"] if "status" in results.columns else results
        for row in rows.itertuples(index=False):
            yield row.item_index, row.text, row.score, row.normalized_score
        return
    if isinstance(results, AttributionResult):
        results = [results]
    if isinstance(results, (bytes, str)) or not isinstance(results, Iterable):
        raise InvalidInputError("summarize takes an output path, a batch result, records, results or a tidy table")
    for key, entry in enumerate(results):
        if isinstance(entry, DatasetRecord):
            key, entry = entry.index, entry.outcome
        if isinstance(entry, AttributionResult):
            for attribution in entry.attributions:
                yield key, attribution.text, attribution.score, attribution.normalized_score


def summarize(results: Any, *, top: Optional[int] = None, min_count: int = 1) -> Any:
    """A pandas DataFrame with one row per case-folded feature text: ``count`` (occurrences), ``n_items`` (items it
    occurs in), ``mean_score``, ``mean_normalized_score`` and ``mean_abs_normalized_score``, strongest first (by
    mean |normalized score|, then count). ``min_count`` drops rarer features; ``top`` keeps the first rows."""
    import pandas as pd

    if min_count < 1 or (top is not None and top < 0):
        raise InvalidInputError("min_count must be >= 1 and top >= 0")
    if isinstance(results, AttributionBatchResult):
        results = zip(results.indices or range(len(results)), results.results)
        results = [DatasetRecord(index, str(index), result) for index, result in results]
    totals: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0.0, 0.0])
    items: dict[str, set[Any]] = defaultdict(set)
    for key, text, score, normalized in _scored_features(results):
        feature = text.strip().casefold()
        if not feature:
            continue
        entry = totals[feature]
        entry[0] += 1
        entry[1] += score
        entry[2] += normalized
        entry[3] += abs(normalized)
        items[feature].add(key)
    rows = [(feature, int(count), len(items[feature]), total / count, signed / count, absolute / count)
            for feature, (count, total, signed, absolute) in totals.items() if count >= min_count]
    table = pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS))
    table = table.sort_values(["mean_abs_normalized_score", "count", "feature"], ascending=[False, False, True])
    table = table.reset_index(drop=True)
    return table if top is None else table.head(top)
