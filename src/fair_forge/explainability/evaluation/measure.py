"""``faithfulness``: score a result's edits and turn the scores into its report (or a batch's reports and mean)."""

from __future__ import annotations

import math
import time
from typing import Any, Optional, Sequence, Union

import numpy as np

from ..core.types import AttributionBatchResult, AttributionResult
from ..errors import InvalidInputError
from ..explainer import AttributionExplainer
from ..runtime.requests import EvaluationCount
from ..text.items import batch_items
from .context import DEFAULT_N_ABLATIONS, DEFAULT_TOP_K, clipped_top_k, linear_datamodeling_score
from .edits import (DEFAULT_FRACTIONS, ItemPlan, Settings, check_settings, explained_contrast, plan_edits,
                    removed_count, score_edits)
from .reports import METRICS, EditMode, FaithfulnessBatchReport, FaithfulnessReport, FaithfulnessScores


def _area(fractions: Sequence[float], values: np.ndarray) -> float:
    """Trapezoidal area under ``values`` over ``fractions`` (0 to 1)."""
    x = np.asarray(fractions, dtype=float)
    return float(np.sum((values[1:] + values[:-1]) / 2.0 * np.diff(x)))


def _order_scores(deletion: np.ndarray, insertion: np.ndarray, steps: list[int], n: int,
                  settings: Settings) -> FaithfulnessScores:
    """Metrics of one order from its scores after removing / keeping the top ``steps[s]`` features."""
    at = {k: s for s, k in enumerate(steps)}
    full = deletion[at[0]]
    top = [at[removed_count(f, n)] for f in settings.fractions]
    curve = [at[removed_count(f, n)] for f in settings.curve_fractions]
    return FaithfulnessScores(
        comprehensiveness=float(np.mean(full - deletion[top])),
        sufficiency=float(np.mean(full - insertion[top])),
        deletion_auc=_area(settings.curve_fractions, deletion[curve]),
        insertion_auc=_area(settings.curve_fractions, insertion[curve]),
        deletion_curve=deletion[curve].tolist(),
        insertion_curve=insertion[curve].tolist(),
    )


def _combine(scores: Sequence[FaithfulnessScores], how: str = "mean") -> FaithfulnessScores:
    """Mean (or standard deviation) of several scores, metric by metric and curve point by curve point."""
    reduce = np.mean if how == "mean" else np.std
    fields = {name: float(reduce([getattr(s, name) for s in scores])) for name in METRICS}
    curves = {name: reduce([getattr(s, name) for s in scores], axis=0).tolist()
              for name in ("deletion_curve", "insertion_curve")}
    return FaithfulnessScores(**fields, **curves)


def _report(plan: ItemPlan, values: np.ndarray, count: EvaluationCount, seconds: float, settings: Settings,
            explainer: AttributionExplainer) -> FaithfulnessReport:
    n = len(plan.ranking)
    full, empty = values[plan.rows["ends"]]
    fields: dict[str, Any] = {}
    if settings.curves:
        by_order = values[plan.rows["curves"]]  # (orders, 2, steps)
        orders = [_order_scores(deletion, insertion, plan.steps, n, settings) for deletion, insertion in by_order]
        random = orders[1:]
        fields.update(explanation=orders[0], random_mean=_combine(random) if random else None,
                      random_std=_combine(random, "std") if random else None)
    if "top_k_drop" in settings.metrics:
        drops = full - values[plan.rows["top_k"]]  # (orders, k)
        fields.update(top_k=list(settings.top_k), top_k_removed=clipped_top_k(settings.top_k, n),
                      top_k_drop=dict(zip(settings.top_k, drops[0].tolist())),
                      random_top_k_drop=dict(zip(settings.top_k, drops[1:].mean(0).tolist())) if len(drops) > 1
                      else None)
    if plan.ablations is not None:
        lds, note = linear_datamodeling_score(plan.result.scores, plan.ablations, values[plan.rows["lds"]])
        fields.update(n_ablations=settings.n_ablations, lds=lds, lds_note=note)
    return FaithfulnessReport(
        method=plan.result.method, granularity=plan.result.granularity, mode=settings.mode,
        score=explained_contrast(plan.result) or explainer.score,
        n_features=n, fractions=list(settings.fractions), curve_fractions=list(settings.curve_fractions),
        features_removed=[removed_count(f, n) for f in settings.fractions],
        curve_features=[removed_count(f, n) for f in settings.curve_fractions],
        ranking=plan.ranking.tolist(), full_score=float(full), empty_score=float(empty), metrics=list(settings.metrics),
        n_random=settings.n_random, seed=settings.seed, n_forward_passes=count.forward_passes,
        n_tokens_processed=count.tokens_processed, compute_time_seconds=seconds, **fields,
    )


def batch_report(reports: list[FaithfulnessReport], indices: list[int], seconds: float) -> FaithfulnessBatchReport:
    """The items' reports and their means: curve metrics point by point, top-k drops k by k, and the LDS over the
    items where it is defined."""
    if not reports:
        raise InvalidInputError("the batch holds no results to evaluate")
    first, fields = reports[0], {}
    if first.explanation is not None:
        randoms = [r.random_mean for r in reports if r.random_mean is not None]
        fields.update(mean=_combine([r.explanation for r in reports]),  # type: ignore[misc]
                      random_mean=_combine(randoms) if randoms else None)
    for name in ("top_k_drop", "random_top_k_drop"):
        if getattr(first, name) is not None:
            fields[name] = {k: float(np.mean([getattr(r, name)[k] for r in reports])) for k in getattr(first, name)}
    if first.lds is not None:
        defined = [r.lds for r in reports if not math.isnan(r.lds)]  # type: ignore[arg-type]
        fields.update(lds=float(np.mean(defined)) if defined else math.nan, lds_items=len(defined))
    return FaithfulnessBatchReport(reports=reports, indices=indices, compute_time_seconds=seconds, **fields)


def faithfulness(
    explainer: AttributionExplainer,
    result: Union[AttributionResult, AttributionBatchResult],
    inputs: Any = None,
    *,
    metrics: Union[str, Sequence[str], None] = None,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    curve_points: int = 11,
    mode: EditMode = "remove",
    n_random: int = 10,
    seed: int = 0,
    baseline_id: Optional[int] = None,
    top_k: Union[int, Sequence[int]] = DEFAULT_TOP_K,
    n_ablations: int = DEFAULT_N_ABLATIONS,
) -> Union[FaithfulnessReport, FaithfulnessBatchReport]:
    """How faithful ``result`` is to the model behind ``explainer`` (see the package docstring for the metrics).

    A result keeps what was explained (its messages, or its raw prompt), so ``inputs`` is optional; given, it is
    used instead: for one result, its messages, raw prompt or ``explain_batch`` item; for an
    ``AttributionBatchResult``, the items given to ``explain_batch`` (result i belongs to
    ``inputs[batch.indices[i]]``). A batch's edits are packed into shared model calls and its report
    holds every item's report and their mean. Results of the same input (say, of several methods) share their
    edits: each distinct edit of an input is one row, the LDS ablations and the random orders included.

    ``metrics`` names what to compute: None is the four curve metrics (comprehensiveness, sufficiency, deletion and
    insertion AUC, which come together: naming one computes all four); add ``"top_k_drop"`` (for each k of ``top_k``)
    and/or ``"lds"`` (over ``n_ablations`` random half-ablations drawn with ``seed``), or name only those to skip the
    curves' edits. ``curve_points`` fractions from 0 to 1 sample the curves (``n_features + 1`` points visit every k);
    ``n_random`` random orders give the curve metrics and the top-k drop their chance level; ``baseline_id`` is the
    token of ``mode="replace"`` (default: the input's baseline token). Costs one no-grad row per distinct edit, no
    backward pass.
    """
    settings = check_settings(metrics=metrics, fractions=fractions, curve_points=curve_points, mode=mode,
                              n_random=n_random, seed=seed, baseline_id=baseline_id, top_k=top_k,
                              n_ablations=n_ablations)
    started = time.perf_counter()
    if isinstance(result, AttributionResult):
        plan = plan_edits(explainer, result, inputs, settings)
        edit = (plan.model_input, plan.keep, explained_contrast(plan.result))
        (values,), (count,) = score_edits(explainer, [edit], settings.mode, settings.baseline_id)
        return _report(plan, values, count, time.perf_counter() - started, settings, explainer)
    if not isinstance(result, AttributionBatchResult):
        raise InvalidInputError(f"result must be an AttributionResult or AttributionBatchResult, got {type(result).__name__}")
    indices = list(result.indices) or list(range(len(result.results)))
    if inputs is None:
        items: list[Any] = [None] * len(result.results)
    else:
        records = batch_items(inputs)
        if len(indices) != len(result.results) or any(not 0 <= i < len(records) for i in indices):
            raise InvalidInputError(f"inputs has {len(records)} items; the batch's results need items {indices}")
        items = [records[index] for index in indices]
    plans = [plan_edits(explainer, item_result, item, settings) for item_result, item in zip(result, items)]
    edits = [(p.model_input, p.keep, explained_contrast(p.result)) for p in plans]
    values, counts = score_edits(explainer, edits, settings.mode, settings.baseline_id)
    seconds = time.perf_counter() - started
    reports = [_report(p, v, c, seconds, settings, explainer) for p, v, c in zip(plans, values, counts)]
    return batch_report(reports, indices, seconds)
