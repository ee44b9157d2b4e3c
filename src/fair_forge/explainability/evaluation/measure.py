"""``faithfulness``: score a result's edits and turn the scores into its report (or a batch's reports and mean)."""

from __future__ import annotations

import time
from typing import Any, Optional, Sequence, Union

import numpy as np

from ..core.types import AttributionBatchResult, AttributionResult
from ..errors import InvalidInputError
from ..explainer import AttributionExplainer
from ..runtime.scorer import EvaluationCount
from ..text.items import batch_items
from .edits import DEFAULT_FRACTIONS, ItemPlan, Settings, check_settings, plan_edits, removed_count, score_edits
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
    by_order = values[plan.inverse]  # (orders, 2, steps)
    n = len(plan.ranking)
    orders = [_order_scores(by_order[o, 0], by_order[o, 1], plan.steps, n, settings) for o in range(len(by_order))]
    random = orders[1:]
    return FaithfulnessReport(
        method=plan.result.method, granularity=plan.result.granularity, mode=settings.mode, score=explainer.score,
        n_features=n, fractions=list(settings.fractions), curve_fractions=list(settings.curve_fractions),
        features_removed=[removed_count(f, n) for f in settings.fractions],
        curve_features=[removed_count(f, n) for f in settings.curve_fractions],
        ranking=plan.ranking.tolist(), full_score=float(by_order[0, 0, 0]), empty_score=float(by_order[0, 1, 0]),
        explanation=orders[0], n_random=settings.n_random, seed=settings.seed,
        random_mean=_combine(random) if random else None, random_std=_combine(random, "std") if random else None,
        n_forward_passes=count.forward_passes, n_tokens_processed=count.tokens_processed,
        compute_time_seconds=seconds,
    )


def faithfulness(
    explainer: AttributionExplainer,
    result: Union[AttributionResult, AttributionBatchResult],
    inputs: Any = None,
    *,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    curve_points: int = 11,
    mode: EditMode = "remove",
    n_random: int = 10,
    seed: int = 0,
    baseline_id: Optional[int] = None,
) -> Union[FaithfulnessReport, FaithfulnessBatchReport]:
    """How faithful ``result`` is to the model behind ``explainer`` (see the module docstring for the metrics).

    A result keeps what was explained (its messages, or its raw prompt), so ``inputs`` is optional; given, it is
    used instead: for one result, its messages, raw prompt or ``explain_batch`` item; for an
    ``AttributionBatchResult``, the items given to ``explain_batch`` (result i belongs to
    ``inputs[batch.indices[i]]``). A batch's edits are packed into shared model calls and its report
    holds every item's report and their mean. ``curve_points`` fractions from 0 to 1 sample the curves
    (``n_features + 1`` points visit every k); ``baseline_id`` is the token of ``mode="replace"`` (default: the
    input's baseline token). Costs one no-grad row per distinct edit, no backward pass.
    """
    settings = check_settings(fractions, curve_points, mode, n_random, seed, baseline_id)
    started = time.perf_counter()
    if isinstance(result, AttributionResult):
        plan = plan_edits(explainer, result, inputs, settings)
        (values,), (count,) = score_edits(explainer, [(plan.model_input, plan.keep)], settings.mode,
                                           settings.baseline_id)
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
    values, counts = score_edits(explainer, [(p.model_input, p.keep) for p in plans], settings.mode,
                                  settings.baseline_id)
    seconds = time.perf_counter() - started
    reports = [_report(p, v, c, seconds, settings, explainer) for p, v, c in zip(plans, values, counts)]
    if not reports:
        raise InvalidInputError("the batch holds no results to evaluate")
    randoms = [r.random_mean for r in reports if r.random_mean is not None]
    return FaithfulnessBatchReport(
        reports=reports, indices=indices, mean=_combine([r.explanation for r in reports]),
        random_mean=_combine(randoms) if randoms else None, compute_time_seconds=seconds,
    )

