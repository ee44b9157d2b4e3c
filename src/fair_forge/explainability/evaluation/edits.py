"""The edits of a faithfulness check: checked settings, each result's feature masks laid out as unique token
keep-masks, and their explained scores in packed no-grad model calls (the one place the evaluation calls the model)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from ..core.types import AttributionResult
from ..errors import InvalidInputError
from ..explainer import AttributionExplainer
from ..runtime.models import borrowed
from ..runtime.answers import answer_requests
from ..runtime.requests import EvaluationCount, MaskedRows
from ..runtime.scorer import TargetScorer
from ..text.items import item_fields
from ..text.prompt import ModelInput, build_model_input
from ..text.segment import build_features, kept_tokens, membership, restrict_to_messages
from .context import CONTEXT_METRICS, clipped_top_k, draw_ablations
from .reports import METRICS, EditMode

DEFAULT_FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5)


@dataclass(frozen=True)
class Settings:
    metrics: tuple[str, ...]  # what is computed: the four curve metrics (all or none) and/or the context metrics
    fractions: tuple[float, ...]
    curve_fractions: tuple[float, ...]
    mode: EditMode
    n_random: int
    seed: int
    baseline_id: Optional[int]
    top_k: tuple[int, ...]
    n_ablations: int

    @property
    def curves(self) -> bool:
        """The four ERASER / RISE metrics come from the same curve edits: asking for one computes them all."""
        return METRICS[0] in self.metrics


@dataclass(frozen=True)
class ItemPlan:
    """One result's edits as unique token keep-masks, and where each metric's feature masks landed among them."""

    result: AttributionResult
    model_input: ModelInput
    ranking: np.ndarray
    steps: list[int]  # the k values the curves edit, sorted
    keep: np.ndarray  # (m, L) unique token keep-masks
    rows: dict[str, np.ndarray]  # block name -> row of ``keep`` for each mask of the block (see ``plan_edits``)
    ablations: Optional[np.ndarray]  # (n_ablations, n_features) LDS keep-masks


def removed_count(fraction: float, n_features: int) -> int:
    """k = ceil(fraction x n_features): how many top features a fraction covers (rounded to 1e-9 first, so that
    0.3 x 10 is 3, not 4)."""
    return int(math.ceil(round(fraction * n_features, 9)))


def _is_count(value: Any, low: int) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, np.integer)) and value >= low


def _metrics(metrics: Union[str, Sequence[str], None]) -> tuple[str, ...]:
    """The metrics asked for, in canonical order: the four curve metrics (any one of them brings all four), then the
    context metrics; None is the four."""
    if metrics is None:
        return METRICS
    names = [metrics] if isinstance(metrics, str) else list(metrics) if isinstance(metrics, Sequence) else None
    if not names:
        raise InvalidInputError(f"metrics must be a non-empty list of metric names or None, got {metrics!r}")
    unknown = [name for name in names if name not in METRICS + CONTEXT_METRICS]
    if unknown:
        raise InvalidInputError(f"unknown metric(s) {unknown}: choose from {list(METRICS + CONTEXT_METRICS)}")
    curves = METRICS if set(names) & set(METRICS) else ()
    return curves + tuple(name for name in CONTEXT_METRICS if name in names)


def check_settings(*, metrics: Union[str, Sequence[str], None], fractions: Sequence[float], curve_points: int,
                   mode: str, n_random: int, seed: int, baseline_id: Optional[int], top_k: Union[int, Sequence[int]],
                   n_ablations: int) -> Settings:
    """The checked parameters of ``faithfulness`` (same names); a typed error before any model call."""
    try:
        values = tuple(float(f) for f in fractions)
    except (TypeError, ValueError):
        raise InvalidInputError(f"fractions must be numbers in (0, 1], got {fractions!r}") from None
    if not values or not all(0.0 < f <= 1.0 for f in values):
        raise InvalidInputError(f"fractions must be a non-empty list of numbers in (0, 1], got {fractions!r}")
    for name, value, low in (("curve_points", curve_points, 2), ("n_random", n_random, 0), ("seed", seed, 0),
                             ("n_ablations", n_ablations, 2)):
        if not _is_count(value, low):
            raise InvalidInputError(f"{name} must be an integer >= {low}, got {value!r}")
    ks = [top_k] if _is_count(top_k, 1) else list(top_k) if isinstance(top_k, Sequence) else []
    if not ks or not all(_is_count(k, 1) for k in ks):
        raise InvalidInputError(f"top_k must be a k >= 1 or a non-empty list of them, got {top_k!r}")
    if mode not in ("remove", "replace"):
        raise InvalidInputError(f"mode must be 'remove' or 'replace', got {mode!r}")
    if baseline_id is not None and not _is_count(baseline_id, 0):
        raise InvalidInputError(f"baseline_id must be a token id or None, got {baseline_id!r}")
    curve = tuple(float(x) for x in np.linspace(0.0, 1.0, int(curve_points)))
    return Settings(_metrics(metrics), values, curve, mode, int(n_random), int(seed),  # type: ignore[arg-type]
                    None if baseline_id is None else int(baseline_id), tuple(sorted({int(k) for k in ks})),
                    int(n_ablations))


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


def plan_edits(explainer: AttributionExplainer, result: AttributionResult, item: Any, settings: Settings) -> ItemPlan:
    """Rebuild the result's input and features from ``item``, check they match, and lay out every edit: feature masks
    in blocks (``ends``: f(x), f(nothing); ``curves``: [order, deletion/insertion, step]; ``top_k``: [order, k];
    ``lds``: the ablations) made unique together, so an edit two metrics share is scored once."""
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
    orders = np.stack([ranking] + [rng.permutation(n) for _ in range(settings.n_random)])
    steps = sorted({removed_count(f, n) for f in settings.fractions + settings.curve_fractions} | {0})
    ablations = draw_ablations(settings.seed, settings.n_ablations, n) if "lds" in settings.metrics else None
    blocks = {"ends": np.stack([np.ones(n, dtype=bool), np.zeros(n, dtype=bool)])}  # f(x), f(nothing)
    if settings.curves:
        deletion = _without_first(orders, steps)
        blocks["curves"] = np.stack([deletion, ~deletion], axis=1)  # [order, deletion/insertion, step, feature]
    if "top_k_drop" in settings.metrics:
        blocks["top_k"] = _without_first(orders, clipped_top_k(settings.top_k, n))  # [order, k, feature]
    if ablations is not None:
        blocks["lds"] = ablations
    unique, inverse = np.unique(np.concatenate([b.reshape(-1, n) for b in blocks.values()]), axis=0,
                                return_inverse=True)
    bounds = np.cumsum([0] + [int(np.prod(b.shape[:-1])) for b in blocks.values()])
    rows = {name: inverse[start:end].reshape(block.shape[:-1])
            for (name, block), start, end in zip(blocks.items(), bounds, bounds[1:])}
    keep = kept_tokens(unique, membership(features, range(model_input.length)))
    return ItemPlan(result, model_input, ranking, steps, keep, rows, ablations)


def _without_first(orders: np.ndarray, counts: Sequence[int]) -> np.ndarray:
    """Feature keep-masks [order, count, feature]: every feature but the first ``counts[c]`` of each order."""
    masks = np.ones((len(orders), len(counts), orders.shape[1]), dtype=bool)
    for o, order in enumerate(orders):
        for c, k in enumerate(counts):
            masks[o, c, order[:k]] = False
    return masks


def explained_contrast(result: AttributionResult) -> Optional[str]:
    """The contrastive score a result explains (its metadata's score), None for a plain result."""
    return getattr(result.metadata, "score", None) if result.contrast_target is not None else None


def score_edits(explainer: AttributionExplainer, edits: Sequence[tuple[ModelInput, np.ndarray, Optional[str]]],
                mode: EditMode, baseline_id: Optional[int]) -> tuple[list[np.ndarray], list[EvaluationCount]]:
    """Explained scores of every edit (token keep-masks (m_i, L_i) per input, and the contrast the input's result
    explains) in shared no-grad model calls, and each input's cost; the one place this module touches the scorer.
    The masking is the perturbation methods' own (``requests.MaskedRows``); a chat header common to the inputs runs
    once for all of them. Edits of the same input (several results of one item, as ``compare_methods`` makes) are
    scored once: each distinct keep-mask of an input is one row, and the inputs that share rows share their cost
    (each one's count is that of the rows of its input)."""
    prefixes: dict = {}
    groups: dict[tuple, list[int]] = {}  # the edits of each distinct (input, contrast, baseline)
    for index, (model_input, _, contrast) in enumerate(edits):
        baseline = model_input.baseline_token_id if baseline_id is None else baseline_id
        groups.setdefault(_input_key(model_input, contrast, int(baseline)), []).append(index)
    requests, inverses = [], []
    for members in groups.values():
        model_input, _, contrast = edits[members[0]]
        keep, inverse = edits[members[0]][1], np.arange(len(edits[members[0]][1]))  # an input's rows are distinct
        if len(members) > 1:
            keep, inverse = np.unique(np.concatenate([edits[i][1] for i in members]), axis=0, return_inverse=True)
        inverses.append(inverse.reshape(-1))
        scorer = TargetScorer(explainer.model, score=explainer.score, prefix_cache=explainer.prefix_cache,
                              prefixes=prefixes, contrast=contrast, contrast_length=model_input.n_contrast)
        baseline = model_input.baseline_token_id if baseline_id is None else baseline_id
        requests.append((scorer, model_input, MaskedRows(keep, int(baseline), remove=mode == "remove")))
    with borrowed(explainer.model):
        log_probs = answer_requests(requests, explainer.batch_size)
    scores: list[np.ndarray] = [np.empty(0)] * len(edits)
    counts: list[EvaluationCount] = [EvaluationCount()] * len(edits)
    for members, inverse, (scorer, _, _), values in zip(groups.values(), inverses, requests, log_probs):
        unique = scorer.reduce(torch.from_numpy(values)).double().numpy()[inverse]
        bounds = np.cumsum([0] + [len(edits[i][1]) for i in members])
        for member, start, end in zip(members, bounds[:-1], bounds[1:]):
            scores[member], counts[member] = unique[start:end], scorer.count
    return scores, counts


def _input_key(model_input: ModelInput, contrast: Optional[str], baseline: int) -> tuple:
    """What decides an edit row's score besides its mask: the tokens, the target, its span and contrast side."""
    side = model_input.contrast
    return (model_input.input_ids.numpy().tobytes(), model_input.target_start, model_input.target_span, contrast,
            None if side is None else (side.input_ids.numpy().tobytes(), side.target_start), baseline)
