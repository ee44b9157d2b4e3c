"""The edits of a faithfulness check: checked settings, each result's feature masks laid out as unique token
keep-masks, and their explained scores in packed no-grad model calls (the one place the evaluation calls the model)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch

from ..core.types import AttributionResult
from ..errors import InvalidInputError
from ..explainer import AttributionExplainer
from ..runtime.models import borrowed
from ..runtime.scorer import EvaluationCount, MaskedRows, TargetScorer, score_row_requests
from ..text.items import item_fields
from ..text.prompt import ModelInput, build_model_input
from ..text.segment import build_features, restrict_to_messages
from .reports import EditMode

DEFAULT_FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5)


@dataclass(frozen=True)
class Settings:
    fractions: tuple[float, ...]
    curve_fractions: tuple[float, ...]
    mode: EditMode
    n_random: int
    seed: int
    baseline_id: Optional[int]


@dataclass(frozen=True)
class ItemPlan:
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


def check_settings(fractions: Sequence[float], curve_points: int, mode: str, n_random: int, seed: int,
              baseline_id: Optional[int]) -> Settings:
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
    return Settings(values, curve, mode, int(n_random), int(seed), None if baseline_id is None else int(baseline_id))  # type: ignore[arg-type]


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
    """Rebuild the result's input and features from ``item``, check they match, and lay out every edit."""
    messages, prompt = _source(item, result)
    model_input = build_model_input(explainer.tokenizer, target=result.target, messages=messages, prompt=prompt,
                                    include_template_tokens=explainer.include_template_tokens)
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
    membership = np.zeros((n, model_input.length), dtype=bool)
    for row, feature in enumerate(features):
        membership[row, list(feature.token_positions)] = True
    keep = ~(~unique @ membership)
    return ItemPlan(result, model_input, ranking, steps, keep, inverse.reshape(masks.shape[:3]))


def score_edits(explainer: AttributionExplainer, edits: Sequence[tuple[ModelInput, np.ndarray]], mode: EditMode,
                 baseline_id: Optional[int]) -> tuple[list[np.ndarray], list[EvaluationCount]]:
    """Explained scores of every edit (token keep-masks (m_i, L_i) per input) in shared no-grad model calls, and each
    input's cost; the one place this module touches the scorer. The masking is the perturbation methods' own
    (``scoring.MaskedRows``); a chat header common to the inputs runs once for all of them."""
    prefixes: dict = {}
    requests = []
    for model_input, keep in edits:
        scorer = TargetScorer(explainer.model, score=explainer.score, prefix_cache=explainer.prefix_cache,
                              prefixes=prefixes)
        baseline = model_input.baseline_token_id if baseline_id is None else baseline_id
        requests.append((scorer, model_input, MaskedRows(keep, int(baseline), remove=mode == "remove")))
    with borrowed(explainer.model):
        log_probs = score_row_requests(requests, explainer.batch_size)
    scores = [scorer.reduce(torch.from_numpy(values)).double().numpy() for (scorer, _, _), values in zip(requests, log_probs)]
    return scores, [scorer.count for scorer, _, _ in requests]
