"""Faithfulness: does the model follow an explanation's ranking? Edit the input and watch the explained score.

Features are ranked by signed score, highest first (ties: reading order), and removed or kept in that order with
the masking of the perturbation methods: ``mode="remove"`` deletes their tokens (the kept tokens move right and the
freed slots leave attention and positions, as if the shorter text were run), ``mode="replace"`` puts the baseline
token in their place. With f the explained score (``AttributionExplainer(score=...)``), x the input, and top_k the
k highest-ranked features, where k = ceil(fraction x n_features) (at least one feature for any fraction > 0):

- comprehensiveness = mean over ``fractions`` of f(x) - f(x without top_k)   (higher: the ranking found what matters)
- sufficiency       = mean over ``fractions`` of f(x) - f(only top_k kept)   (lower: the top features alone suffice)
- deletion curve    f(x without top_k) at ``curve_points`` fractions from 0 to 1, and its area (lower is better)
- insertion curve   f(only top_k kept) at the same fractions, and its area (higher is better)

(ERASER's AOPC comprehensiveness and sufficiency, DeYoung et al. 2020; RISE's deletion and insertion areas.) The same
numbers for ``n_random`` random orders (mean and spread) say what chance gives. All edits of all items go through the
``TargetScorer`` in packed no-grad model calls; the random orders are drawn from ``numpy.random.default_rng(seed)``
per item, so a batch gives the same numbers as its items one by one.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from pydantic import BaseModel, Field

from .errors import InvalidInputError
from .explainer import AttributionExplainer
from .text.items import batch_items, item_fields
from .runtime.models import borrowed
from .text.prompt import ModelInput, build_model_input
from .runtime.answers import answer_requests
from .runtime.requests import EvaluationCount, MaskedRows
from .runtime.scorer import TargetScorer
from .text.segment import build_features, kept_tokens, membership, restrict_to_messages
from .core.types import AttributionBatchResult, AttributionMethod, AttributionResult, Granularity

if TYPE_CHECKING:
    from matplotlib.figure import Figure

EditMode = Literal["remove", "replace"]
DEFAULT_FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5)
METRICS = ("comprehensiveness", "sufficiency", "deletion_auc", "insertion_auc")


class FaithfulnessScores(BaseModel):
    """The four metrics and the two curves of one feature order (or their mean / spread over orders or items)."""

    comprehensiveness: float
    sufficiency: float
    deletion_auc: float
    insertion_auc: float
    deletion_curve: list[float] = Field(description="f(x without top_k) at each curve fraction")
    insertion_curve: list[float] = Field(description="f(only top_k kept) at each curve fraction")


class FaithfulnessReport(BaseModel):
    """How faithful one explanation is: its metrics, those of random orders, and what the check cost."""

    method: Union[AttributionMethod, str]
    granularity: Granularity
    mode: EditMode
    score: str = Field(description="the explained quantity: 'sum', 'mean' or 'prob' (the explainer's score)")
    n_features: int
    fractions: list[float]
    curve_fractions: list[float]
    features_removed: list[int] = Field(description="k = ceil(fraction x n_features) at each of ``fractions``")
    curve_features: list[int] = Field(description="k at each of ``curve_fractions``")
    ranking: list[int] = Field(description="feature positions, most important first")
    full_score: float = Field(description="f(x): the explained score before any edit")
    empty_score: float = Field(description="f with every feature removed (or replaced)")
    explanation: FaithfulnessScores
    n_random: int
    seed: int
    random_mean: Optional[FaithfulnessScores] = None
    random_std: Optional[FaithfulnessScores] = None
    n_forward_passes: int = 0
    n_tokens_processed: int = 0
    compute_time_seconds: float = Field(0.0, description="wall time of the call (of the whole batch, in a batch)")

    @property
    def comprehensiveness(self) -> float:
        return self.explanation.comprehensiveness

    @property
    def sufficiency(self) -> float:
        return self.explanation.sufficiency

    @property
    def deletion_auc(self) -> float:
        return self.explanation.deletion_auc

    @property
    def insertion_auc(self) -> float:
        return self.explanation.insertion_auc


class FaithfulnessBatchReport(BaseModel):
    """Per-item reports of a batch and their mean (curves averaged point by point over the shared fractions)."""

    reports: list[FaithfulnessReport]
    indices: list[int] = Field(description="item index of each report")
    mean: FaithfulnessScores
    random_mean: Optional[FaithfulnessScores] = None
    compute_time_seconds: float = Field(0.0, description="wall time of the whole batch (items share model calls)")

    def __len__(self) -> int:
        return len(self.reports)


@dataclass(frozen=True)
class _Settings:
    fractions: tuple[float, ...]
    curve_fractions: tuple[float, ...]
    mode: EditMode
    n_random: int
    seed: int
    baseline_id: Optional[int]


@dataclass(frozen=True)
class _ItemPlan:
    """One result's edits: feature masks (rows: orders x [deletion, insertion] x steps) as unique token keep-masks."""

    result: AttributionResult
    model_input: ModelInput
    ranking: np.ndarray
    steps: list[int]  # the k values edited, sorted
    keep: np.ndarray  # (m, L) unique token keep-masks
    inverse: np.ndarray  # (orders, 2, steps) -> row of ``keep``


def removed_count(fraction: float, n_features: int) -> int:
    """k = ceil(fraction x n_features): how many top features a fraction covers (rounded to 1e-9 first, so that
    0.3 x 10 is 3, not 4)."""
    return int(math.ceil(round(fraction * n_features, 9)))


def _settings(fractions: Sequence[float], curve_points: int, mode: str, n_random: int, seed: int,
              baseline_id: Optional[int]) -> _Settings:
    """The checked parameters; a typed error before any model call."""
    try:
        values = tuple(float(f) for f in fractions)
    except (TypeError, ValueError):
        raise InvalidInputError(f"fractions must be numbers in (0, 1], got {fractions!r}") from None
    if not values or not all(0.0 < f <= 1.0 for f in values):
        raise InvalidInputError(f"fractions must be a non-empty list of numbers in (0, 1], got {fractions!r}")
    for name, value, low in (("curve_points", curve_points, 2), ("n_random", n_random, 0), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise InvalidInputError(f"{name} must be an integer >= {low}, got {value!r}")
    if mode not in ("remove", "replace"):
        raise InvalidInputError(f"mode must be 'remove' or 'replace', got {mode!r}")
    if baseline_id is not None and (isinstance(baseline_id, bool) or not isinstance(baseline_id, (int, np.integer))):
        raise InvalidInputError(f"baseline_id must be a token id or None, got {baseline_id!r}")
    curve = tuple(float(x) for x in np.linspace(0.0, 1.0, int(curve_points)))
    return _Settings(values, curve, mode, int(n_random), int(seed), None if baseline_id is None else int(baseline_id))  # type: ignore[arg-type]


def _source(item: Any, result: AttributionResult) -> tuple[Optional[Any], Optional[str]]:
    """(messages, prompt) of what was explained: the result's own chat or raw prompt when ``item`` is None, else the
    messages, raw prompt or ``explain_batch`` item given."""
    if item is None:
        if result.messages is not None:
            return [message.model_dump() for message in result.messages], None
        return None, result.prompt
    if isinstance(item, str):
        return None, item
    if isinstance(item, Sequence) and item and all(isinstance(m, Mapping) and "role" in m for m in item):
        return list(item), None
    messages, prompt, item_target = item_fields(item)
    if item_target is not None and item_target != result.target:
        raise InvalidInputError(f"the item's target {item_target!r} is not the result's target {result.target!r}")
    return messages, prompt


def _plan(explainer: AttributionExplainer, result: AttributionResult, item: Any, settings: _Settings) -> _ItemPlan:
    """Rebuild the result's input and features from ``item``, check they match, and lay out every edit."""
    messages, prompt = _source(item, result)
    if result.counterfactual_prompt is not None:
        raise InvalidInputError("faithfulness removes features from the input; a counterfactual result's features are "
                                "changes towards x': compare its counterfactual_score with the attributions instead")
    model_input = build_model_input(explainer.tokenizer, target=result.target, messages=messages, prompt=prompt,
                                    include_template_tokens=explainer.include_template_tokens,
                                    contrast_target=result.contrast_target)
    explained = {a.message_index for a in result.attributions if a.message_index is not None}
    if messages is not None and explained < {s.message_index for s in model_input.sources}:  # attribute_messages
        model_input = restrict_to_messages(model_input, tuple(sorted(explained)))
    features = build_features(model_input, result.granularity)
    if [f.token_positions for f in features] != [tuple(a.token_positions) for a in result.attributions]:
        raise InvalidInputError(
            f"the result's {len(result.attributions)} features are not those of the given input "
            f"({len(features)} {result.granularity.value} features): pass the messages or prompt that were explained, "
            "with the same explainer settings (include_template_tokens)"
        )
    n = len(features)
    ranking = np.lexsort((np.arange(n), -np.asarray(result.scores, dtype=float)))  # highest first, ties by position
    rng = np.random.default_rng(settings.seed)
    orders = [ranking] + [rng.permutation(n) for _ in range(settings.n_random)]
    steps = sorted({removed_count(f, n) for f in settings.fractions + settings.curve_fractions} | {0})
    masks = np.zeros((len(orders), 2, len(steps), n), dtype=bool)  # [order, deletion/insertion, step, feature]
    for o, order in enumerate(orders):
        for s, k in enumerate(steps):
            masks[o, 0, s] = True
            masks[o, 0, s, order[:k]] = False
            masks[o, 1, s, order[:k]] = True
    unique, inverse = np.unique(masks.reshape(-1, n), axis=0, return_inverse=True)
    keep = kept_tokens(unique, membership(features, range(model_input.length)))
    return _ItemPlan(result, model_input, ranking, steps, keep, inverse.reshape(masks.shape[:3]))


def _contrast(result: AttributionResult) -> Optional[str]:
    """The contrastive score a result explains (its metadata's score), None for a plain result."""
    return getattr(result.metadata, "score", None) if result.contrast_target is not None else None


def _score_edits(explainer: AttributionExplainer, edits: Sequence[tuple[ModelInput, np.ndarray, Optional[str]]],
                 mode: EditMode,
                 baseline_id: Optional[int]) -> tuple[list[np.ndarray], list[EvaluationCount]]:
    """Explained scores of every edit (token keep-masks (m_i, L_i) per input) in shared no-grad model calls, and each
    input's cost; the one place this module touches the scorer. The masking is the perturbation methods' own
    (``requests.MaskedRows``); a chat header common to the inputs runs once for all of them."""
    prefixes: dict = {}
    requests = []
    for model_input, keep, contrast in edits:
        scorer = TargetScorer(explainer.model, score=explainer.score, prefix_cache=explainer.prefix_cache,
                              prefixes=prefixes, contrast=contrast, contrast_length=model_input.n_contrast)
        baseline = model_input.baseline_token_id if baseline_id is None else baseline_id
        requests.append((scorer, model_input, MaskedRows(keep, int(baseline), remove=mode == "remove")))
    with borrowed(explainer.model):
        log_probs = answer_requests(requests, explainer.batch_size)
    scores = [scorer.reduce(torch.from_numpy(values)).double().numpy() for (scorer, _, _), values in zip(requests, log_probs)]
    return scores, [scorer.count for scorer, _, _ in requests]


def _area(fractions: Sequence[float], values: np.ndarray) -> float:
    """Trapezoidal area under ``values`` over ``fractions`` (0 to 1)."""
    x = np.asarray(fractions, dtype=float)
    return float(np.sum((values[1:] + values[:-1]) / 2.0 * np.diff(x)))


def _order_scores(deletion: np.ndarray, insertion: np.ndarray, steps: list[int], n: int,
                  settings: _Settings) -> FaithfulnessScores:
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


def _report(plan: _ItemPlan, values: np.ndarray, count: EvaluationCount, seconds: float, settings: _Settings,
            explainer: AttributionExplainer) -> FaithfulnessReport:
    by_order = values[plan.inverse]  # (orders, 2, steps)
    n = len(plan.ranking)
    orders = [_order_scores(by_order[o, 0], by_order[o, 1], plan.steps, n, settings) for o in range(len(by_order))]
    random = orders[1:]
    return FaithfulnessReport(
        method=plan.result.method, granularity=plan.result.granularity, mode=settings.mode,
        score=_contrast(plan.result) or explainer.score,
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
    settings = _settings(fractions, curve_points, mode, n_random, seed, baseline_id)
    started = time.perf_counter()
    if isinstance(result, AttributionResult):
        plan = _plan(explainer, result, inputs, settings)
        (values,), (count,) = _score_edits(explainer, [(plan.model_input, plan.keep, _contrast(plan.result))], settings.mode,
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
    plans = [_plan(explainer, item_result, item, settings) for item_result, item in zip(result, items)]
    values, counts = _score_edits(explainer, [(p.model_input, p.keep, _contrast(p.result)) for p in plans], settings.mode,
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
    to ``faithfulness`` (``fractions``, ``curve_points``, ``mode``, ``n_random``, ``seed``, ``baseline_id``); the
    random orders are scored once, with the first method. Columns: the mean over items of comprehensiveness,
    sufficiency, deletion and insertion AUC, ``seconds_per_item`` and ``passes_per_item`` (forward + backward) of
    the explanations themselves (``explain_batch``), and ``n_items`` explained.
    """
    import pandas as pd

    from .methods.registry import available_methods, get_method

    chosen = dict(methods) if isinstance(methods, Mapping) else {m: {} for m in (methods or available_methods())}
    if not chosen:
        raise InvalidInputError("methods is empty: name at least one method")
    for name, method_params in chosen.items():  # every setting checked before the first (slow) explanation
        get_method(name).resolve_params(method_params)
    unknown = sorted(set(params) - {"fractions", "curve_points", "mode", "n_random", "seed", "baseline_id"})
    if unknown:
        raise InvalidInputError(f"compare_methods got unknown parameter(s) {unknown}; method parameters go in methods")
    _settings(params.get("fractions", DEFAULT_FRACTIONS), params.get("curve_points", 11),
              params.get("mode", "remove"), params.get("n_random", 10), params.get("seed", 0),
              params.get("baseline_id"))
    records = batch_items(items)
    rows, random = [], None
    for position, (name, method_params) in enumerate(chosen.items()):
        started = time.perf_counter()
        batch = explainer.explain_batch(records, method=name, granularity=granularity, show_progress=False,
                                        **method_params)
        seconds = time.perf_counter() - started
        if not len(batch):
            raise InvalidInputError(f"{name} explained none of the items: {batch.failures[:1]}")
        report = faithfulness(explainer, batch, records, **{**params, **({} if position == 0 else {"n_random": 0})})
        random = random or report.random_mean
        passes = [r.metadata.n_forward_passes + r.metadata.n_backward_passes for r in batch]
        rows.append({"method": str(get_method(name).name), **_metric_columns(report.mean),
                     "seconds_per_item": seconds / len(batch), "passes_per_item": float(np.mean(passes)),
                     "n_items": len(batch)})
    if random is not None:
        rows.append({"method": "random", **_metric_columns(random), "seconds_per_item": float("nan"),
                     "passes_per_item": float("nan"), "n_items": rows[0]["n_items"]})
    return pd.DataFrame(rows)


def _metric_columns(scores: FaithfulnessScores) -> dict[str, float]:
    return {name: getattr(scores, name) for name in METRICS}


def plot_faithfulness(report: Any, ax: Optional[Sequence[Any]] = None) -> "Figure":
    """Draw a report's deletion and insertion curves against the random orders' mean (band: one spread), or, for a
    ``compare_methods`` DataFrame, its four metrics per method as bars. Pyplot-free Figure (headless)."""
    from matplotlib.figure import Figure

    if isinstance(report, (FaithfulnessReport, FaithfulnessBatchReport)):
        return _plot_curves(report, Figure(figsize=(9, 3.5), layout="constrained"))
    if hasattr(report, "columns") and set(METRICS) <= set(report.columns) and "method" in report.columns:
        figure = Figure(figsize=(12, 3.5), layout="constrained")
        for axes, name in zip(figure.subplots(1, len(METRICS)), METRICS):
            colours = ["0.6" if m == "random" else "tab:blue" for m in report["method"]]
            axes.barh(list(report["method"]), list(report[name]), color=colours)
            axes.invert_yaxis()
            axes.set_title(name.replace("_", " ") + (" (lower is better)" if name in ("sufficiency", "deletion_auc")
                                                     else " (higher is better)"), fontsize=9)
        return figure
    raise InvalidInputError("plot_faithfulness takes a FaithfulnessReport, a FaithfulnessBatchReport or the "
                            f"DataFrame of compare_methods, got {type(report).__name__}")


def _plot_curves(report: Union[FaithfulnessReport, FaithfulnessBatchReport], figure: "Figure") -> "Figure":
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
