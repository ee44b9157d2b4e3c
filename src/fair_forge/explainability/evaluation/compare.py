"""``compare_methods`` (one table: every method's faithfulness on the same items) and ``plot_faithfulness``."""

from __future__ import annotations

import inspect
import math
import re
import time
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence, Union

import numpy as np

from ..core.types import AttributionBatchResult, Granularity
from ..errors import InvalidInputError
from ..explainer import AttributionExplainer
from ..text.items import batch_items
from .edits import check_settings
from .measure import batch_report, faithfulness
from .reports import METRICS, FaithfulnessBatchReport, FaithfulnessReport, FaithfulnessScores

if TYPE_CHECKING:
    from matplotlib.figure import Figure

_TOP_K_COLUMN = re.compile(r"top_\d+_drop")


def compare_methods(
    explainer: AttributionExplainer,
    items: Any,
    methods: Union[Sequence[str], Mapping[str, Mapping[str, Any]], None] = None,
    *,
    granularity: Optional[Union[str, Granularity]] = None,
    **params: Any,
) -> Any:
    """Explain ``items`` with every method and tabulate how faithful each is: a pandas DataFrame, one row per method
    and a ``random`` row (the mean over items of the random orders' means) for reference.

    ``methods`` are names (default: every registered method) or a mapping name -> method parameters. ``params`` go
    to ``faithfulness`` (``metrics``, ``fractions``, ``curve_points``, ``mode``, ``n_random``, ``seed``,
    ``baseline_id``, ``top_k``, ``n_ablations``), in one check of every method's results: the edits they share
    (the random orders, the LDS ablations) are scored once. Columns:
    the mean over items of each metric computed (by default comprehensiveness, sufficiency, deletion and insertion
    AUC; ``top_{k}_drop`` for each k and ``lds`` when ``metrics`` names them, the random row's ``lds`` NaN: its chance
    level is 0), ``seconds_per_item`` and ``passes_per_item`` (forward + backward) of the explanations themselves
    (``explain_batch``), and ``n_items`` explained.
    """
    import pandas as pd

    from ..methods.registry import available_methods, get_method

    chosen = dict(methods) if isinstance(methods, Mapping) else {m: {} for m in (methods or available_methods())}
    if not chosen:
        raise InvalidInputError("methods is empty: name at least one method")
    for name, method_params in chosen.items():  # every setting checked before the first (slow) explanation
        get_method(name).resolve_params(method_params)
    defaults = {name: p.default for name, p in inspect.signature(faithfulness).parameters.items()
                if p.kind is p.KEYWORD_ONLY}
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise InvalidInputError(f"compare_methods got unknown parameter(s) {unknown}; method parameters go in methods")
    check_settings(**{**defaults, **params})
    records = batch_items(items)
    batches, costs = [], []
    for name, method_params in chosen.items():
        started = time.perf_counter()
        batch = explainer.explain_batch(records, method=name, granularity=granularity, show_progress=False,
                                        **method_params)
        seconds = time.perf_counter() - started
        if not len(batch):
            raise InvalidInputError(f"{name} explained none of the items: {batch.failures[:1]}")
        batches.append(batch)
        passes = [r.metadata.n_forward_passes + r.metadata.n_backward_passes for r in batch]
        costs.append({"seconds_per_item": seconds / len(batch), "passes_per_item": float(np.mean(passes)),
                      "n_items": len(batch)})
    # one check of every method's results: the edits they share (f(x), the random orders, the LDS ablations) run once
    every = AttributionBatchResult(results=[r for b in batches for r in b],
                                   indices=[i for b in batches for i in b.indices])
    started = time.perf_counter()
    reports = iter(faithfulness(explainer, every, records, **params).reports)
    seconds = time.perf_counter() - started
    methods_reports = [batch_report([next(reports) for _ in batch], list(batch.indices), seconds) for batch in batches]
    rows = [{"method": str(get_method(name).name), **_metric_columns(report.mean, report.top_k_drop, report.lds),
             **cost} for name, report, cost in zip(chosen, methods_reports, costs)]
    first = methods_reports[0]
    if first.random_mean is not None or first.random_top_k_drop is not None:
        lds = None if first.lds is None else math.nan
        rows.append({"method": "random", **_metric_columns(first.random_mean, first.random_top_k_drop, lds),
                     "seconds_per_item": math.nan, "passes_per_item": math.nan, "n_items": rows[0]["n_items"]})
    return pd.DataFrame(rows)


def _metric_columns(scores: Optional[FaithfulnessScores], top_k_drop: Optional[dict[int, float]],
                    lds: Optional[float]) -> dict[str, float]:
    """One table row's metric columns: the curve metrics, ``top_{k}_drop`` for each k, ``lds``; those computed."""
    columns = {name: getattr(scores, name) for name in METRICS} if scores is not None else {}
    columns.update({f"top_{k}_drop": value for k, value in (top_k_drop or {}).items()})
    return columns if lds is None else {**columns, "lds": lds}


def plot_faithfulness(report: Any, ax: Optional[Sequence[Any]] = None) -> "Figure":
    """Draw a report's deletion and insertion curves against the random orders' mean (band: one spread), or, for a
    ``compare_methods`` DataFrame, each of its metrics per method as bars. Pyplot-free Figure (headless)."""
    from matplotlib.figure import Figure

    if isinstance(report, (FaithfulnessReport, FaithfulnessBatchReport)):
        return _plot_curves(report, Figure(figsize=(9, 3.5), layout="constrained"))
    names = [c for c in getattr(report, "columns", ()) if c in METRICS or c == "lds" or _TOP_K_COLUMN.fullmatch(c)]
    if names and "method" in report.columns:
        figure = Figure(figsize=(3 * len(names), 3.5), layout="constrained")
        for axes, name in zip(np.atleast_1d(figure.subplots(1, len(names))), names):
            colours = ["0.6" if m == "random" else "tab:blue" for m in report["method"]]
            axes.barh(list(report["method"]), list(report[name]), color=colours)
            axes.invert_yaxis()
            axes.set_title(name.replace("_", " ") + (" (lower is better)" if name in ("sufficiency", "deletion_auc")
                                                     else " (higher is better)"), fontsize=9)
        return figure
    raise InvalidInputError("plot_faithfulness takes a FaithfulnessReport, a FaithfulnessBatchReport or the "
                            f"DataFrame of compare_methods, got {type(report).__name__}")


def _plot_curves(report: Union[FaithfulnessReport, FaithfulnessBatchReport], figure: "Figure") -> "Figure":
    if (report.mean if isinstance(report, FaithfulnessBatchReport) else report.explanation) is None:
        raise InvalidInputError("this report has no curves: its metrics= named none of the four curve metrics")
    if isinstance(report, FaithfulnessBatchReport):
        x, mine, random = report.reports[0].curve_fractions, report.mean, report.random_mean
        spread, title = None, f"{report.reports[0].method}: mean of {len(report)} items"
    else:
        x, mine, random, spread = report.curve_fractions, report.explanation, report.random_mean, report.random_std
        title = f"{report.method} ({report.granularity.value}, {report.mode})"
    for axes, curve, label in zip(figure.subplots(1, 2), ("deletion_curve", "insertion_curve"),
                                  ("features removed", "features kept")):
        axes.plot(x, getattr(mine, curve), marker="o", label="explanation's order")
        if random is not None:
            mean = np.asarray(getattr(random, curve))
            axes.plot(x, mean, color="0.4", linestyle="--", label="random order (mean)")
            if spread is not None:
                width = np.asarray(getattr(spread, curve))
                axes.fill_between(x, mean - width, mean + width, color="0.8", alpha=0.6)
        axes.set_xlabel(f"fraction of {label}")
        axes.set_ylabel("explained score")
        axes.set_title(f"{curve.split('_')[0]}: {title}", fontsize=9)
        axes.legend(fontsize=8)
    return figure
