"""``train_at2``: AT2's head weights learned from ablations of a handful of documents (see ``methods.at2``).

Per document: one forward pass reads the attention from the target's rows to each source (sentence by default), then
``n_ablations`` random subsets of the sources (each kept with ``keep_probability``) are removed and scored by the
package's scorer (``TargetScorer.score_token_masks``: packed, prefix-cached calls). The head weights are fitted on
all documents together (``fit_head_weights``) and, with ``shrink``, pulled towards uniform head weights (the paper's
baseline, plain attention) as far as ``shrinkage`` finds it helps documents left out of the fit: a handful of
documents gives fewer ablations than the model has heads. With ``path`` they are saved next to the model's
fingerprint; a later call with the same model, documents and settings reads them back instead of training again.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np

from ..core.types import Granularity
from ..errors import InvalidInputError
from ..runtime.attention import QUERY_ROWS, QueryRows, check_attention_model
from ..runtime.generation import generate_target
from ..runtime.models import borrowed
from ..runtime.scorer import TargetScorer
from ..text.items import batch_items, item_fields
from ..text.prompt import build_model_input
from ..text.segment import build_features, check_message_indices, restrict_to_messages
from .at2 import At2Weights, fit_head_weights, head_scores, model_fingerprint

DEFAULT_ABLATIONS = 32  # per document, as in AT2's reference trainer
DEFAULT_STEPS = 300
# the mixes (1 - s) w + s u of the fitted weights w and uniform ones u that ``shrinkage`` compares, over at most
# SHRINKAGE_FOLDS folds of the documents. Six GPL excerpts (192 ablations for SmolLM2's 270 heads) fitted a training
# correlation of 0.96 and ranked a 4k-token document's sentences at an LDS of 0.06, where plain attention reached 0.45.
SHRINKAGE_LEVELS = (0.0, 0.25, 0.5, 0.75, 1.0)
SHRINKAGE_FOLDS = 5


def train_at2(
    explainer_or_model: Any,
    tokenizer: Any = None,
    documents: Iterable[Any] = (),
    *,
    path: Optional[Union[str, Path]] = None,
    n_ablations: int = DEFAULT_ABLATIONS,
    keep_probability: float = 0.5,
    granularity: Union[str, Granularity] = Granularity.SENTENCE,
    attribute_messages: Optional[Sequence[int]] = None,
    rows: QueryRows = "predicting",
    remove: bool = True,
    shrink: bool = True,
    steps: int = DEFAULT_STEPS,
    learning_rate: float = 0.3,
    seed: int = 0,
    overwrite: bool = False,
) -> At2Weights:
    """Learn AT2 head weights for a model from ablations of ``documents`` and return them (saved to ``path`` if given).

    ``explainer_or_model``: an ``AttributionExplainer`` (its model, tokenizer, score and template setting are used;
    ``tokenizer`` may be None) or a model with ``tokenizer``. ``documents``: items as ``explain_batch`` takes them
    (pairs, or dicts with ``messages``/``prompt``/``question`` and ``target``; a missing target is the model's greedy
    answer), each with several sentences to ablate. ``remove=True`` deletes ablated sources (as AT2 does), False
    replaces them by the pad token. ``shrink=True`` mixes the fitted weights with uniform ones as cross-validation
    over the documents says (``shrinkage``; ``info["shrinkage"]``, 0 with fewer than two usable documents); False
    keeps the fit as it is. ``path``: an existing file made for this model with the same documents and
    settings is read instead of training again; one made for another model is an error unless ``overwrite=True``.
    Deterministic for a ``seed``.
    """
    model, tokenizer, settings = _unpack(explainer_or_model, tokenizer)
    items = batch_items(documents)
    _check(items, n_ablations, keep_probability, rows, remove, steps, learning_rate, seed, overwrite, shrink)
    level = _granularity(granularity)
    messages_kept = check_message_indices(attribute_messages)
    check_attention_model(model)
    fingerprint = model_fingerprint(model)
    chosen = dict(n_ablations=n_ablations, keep_probability=keep_probability, granularity=level.value,
                  attribute_messages=messages_kept, rows=rows, remove=remove, shrink=shrink, steps=steps,
                  learning_rate=learning_rate, seed=seed, score=settings["score"])
    key = hashlib.sha256(json.dumps([chosen, items], sort_keys=True, default=str).encode()).hexdigest()[:32]
    if path is not None and Path(path).exists():
        saved = At2Weights.load(path)
        if saved.fingerprint != fingerprint and not overwrite:
            saved.check(model)  # the clear error: trained on another model
        if saved.fingerprint == fingerprint and saved.info.get("training_key") == key and not overwrite:
            return saved
    rng = np.random.default_rng(seed)
    features, masks, outputs = [], [], []
    scorer = TargetScorer(model, score=settings["score"], batch_size=settings["batch_size"],
                          max_memory=settings["max_memory"])
    with borrowed(model):
        for item in items:
            messages, prompt, target = item_fields(item)
            if target is None:
                target = generate_target(model, tokenizer, messages=messages, prompt=prompt)
            model_input = restrict_to_messages(
                build_model_input(tokenizer, target=target, messages=messages, prompt=prompt,
                                  include_template_tokens=settings["include_template_tokens"]), messages_kept)
            sources = build_features(model_input, level)
            if len(sources) < 2:
                continue  # nothing to contrast: one source is always kept or always removed
            per_head = head_scores(model, model_input, sources, rows, max_memory=settings["max_memory"])
            scorer.count.forward_passes += 1
            kept = rng.random((n_ablations, len(sources))) < keep_probability
            membership = np.zeros((len(sources), model_input.length), dtype=bool)
            for index, source in enumerate(sources):
                membership[index, list(source.token_positions)] = True
            keep = ~(~kept @ membership)
            outputs.append(scorer.score_token_masks(model_input, keep, remove=remove))
            features.append(per_head.mean(dim=2).flatten(0, 1).T.double().cpu().numpy())  # (sources, layers x heads)
            masks.append(kept)
    if not features:
        raise InvalidInputError(f"none of the {len(items)} documents has two or more {level.value}s to ablate; AT2 "
                                "learns from documents whose sources can be removed one against another")
    shape = tuple(per_head.shape[:2])
    fitted = fit_head_weights(features, masks, outputs, steps=steps, learning_rate=learning_rate)
    level_chosen, held_out = shrinkage(features, masks, outputs, steps=steps, learning_rate=learning_rate) \
        if shrink else (0.0, None)
    fitted = mixed(fitted, level_chosen)
    info = {**chosen, "training_key": key, "n_documents": len(items), "n_used": len(features),
            "n_forward_passes": scorer.count.forward_passes, "trained": True,
            "correlation": mean_correlation(fitted, features, masks, outputs), "shrinkage": level_chosen,
            "held_out_correlation": held_out}
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    weights = At2Weights(fitted.reshape(shape), fingerprint, str(getattr(config, "model_type", "")), rows, info)
    return weights.save(path) if path is not None else weights


def mixed(weights: np.ndarray, level: float) -> np.ndarray:
    """(1 - level) w + level u, u uniform (1 / F each), with L1 norm 1 (both have it; a mix of signs may not)."""
    mix = (1.0 - level) * np.asarray(weights, dtype=np.float64) + level / weights.size
    return mix / max(np.abs(mix).sum(), 1e-30)


def shrinkage(features: Sequence[np.ndarray], masks: Sequence[np.ndarray], outputs: Sequence[np.ndarray], *,
              steps: int, learning_rate: float) -> tuple[float, Optional[dict[str, float]]]:
    """The level s of ``SHRINKAGE_LEVELS`` whose mix ``mixed(w, s)`` correlates best, on average, with the ablations
    of documents left out of the fit of w (``SHRINKAGE_FOLDS`` folds of consecutive documents at most; the larger s on
    a tie), and each level's held-out correlation; (0, None) with fewer than two documents whose scores vary."""
    usable = [index for index, y in enumerate(outputs) if np.ptp(np.asarray(y, dtype=np.float64)) > 0]
    if len(usable) < 2:
        return 0.0, None
    folds = np.array_split(np.asarray(usable), min(SHRINKAGE_FOLDS, len(usable)))
    totals = dict.fromkeys(SHRINKAGE_LEVELS, 0.0)
    for fold in folds:
        kept = [index for index in usable if index not in set(fold.tolist())]
        weights = fit_head_weights([features[i] for i in kept], [masks[i] for i in kept], [outputs[i] for i in kept],
                                   steps=steps, learning_rate=learning_rate)
        for level in SHRINKAGE_LEVELS:
            value = mean_correlation(mixed(weights, level), [features[i] for i in fold], [masks[i] for i in fold],
                                     [outputs[i] for i in fold])
            totals[level] += len(fold) * (value if np.isfinite(value) else -1.0)  # constant predictions: the worst
    held_out = {level: total / len(usable) for level, total in totals.items()}
    best = max(held_out.values())
    return max(level for level, value in held_out.items() if value >= best - 1e-12), \
        {f"{level:g}": value for level, value in held_out.items()}


def mean_correlation(weights: np.ndarray, features: Sequence[np.ndarray], masks: Sequence[np.ndarray],
                     outputs: Sequence[np.ndarray]) -> float:
    """Mean over examples of the correlation between predicted and actual ablation scores (the fit's objective)."""
    values = []
    for a, m, y in zip(features, masks, outputs):
        predicted = (2.0 * np.asarray(m, dtype=float) - 1.0) @ np.asarray(a) @ np.asarray(weights).reshape(-1)
        if np.std(predicted) > 0 and np.std(y) > 0:
            values.append(float(np.corrcoef(predicted, y)[0, 1]))
    return float(np.mean(values)) if values else float("nan")


def _granularity(value: Any) -> Granularity:
    if isinstance(value, Granularity):
        return value
    try:
        return Granularity(str(value).strip().lower())
    except ValueError:
        raise InvalidInputError(f"unknown granularity {value!r}; use one of {[g.value for g in Granularity]}") from None


def _unpack(explainer_or_model: Any, tokenizer: Any) -> tuple[Any, Any, dict[str, Any]]:
    """(model, tokenizer, scorer settings) from an explainer (duck-typed: it lives on a higher floor) or a model."""
    settings = {"score": "sum", "batch_size": None, "max_memory": None, "include_template_tokens": False}
    if hasattr(explainer_or_model, "model") and hasattr(explainer_or_model, "tokenizer") and \
            not hasattr(explainer_or_model, "forward"):
        explainer = explainer_or_model
        settings.update({name: getattr(explainer, name, default) for name, default in settings.items()})
        return explainer.model, tokenizer if tokenizer is not None else explainer.tokenizer, settings
    if tokenizer is None:
        raise InvalidInputError("train_at2 needs a tokenizer with a model: train_at2(model, tokenizer, documents), "
                                "or give an AttributionExplainer")
    return explainer_or_model, tokenizer, settings


def _check(items: list, n_ablations: Any, keep_probability: Any, rows: Any, remove: Any, steps: Any,
           learning_rate: Any, seed: Any, overwrite: Any, shrink: Any) -> None:
    """Every setting checked before any model call, each error saying what is wrong."""
    def whole(value: Any, low: int) -> bool:
        return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= low

    problems = []
    if not items:
        problems.append("documents is empty: give a few documents (items as explain_batch takes them)")
    if not whole(n_ablations, 2):
        problems.append(f"n_ablations must be an integer >= 2 (a correlation needs two), got {n_ablations!r}")
    if not isinstance(keep_probability, (int, float)) or isinstance(keep_probability, bool) or \
            not 0 < keep_probability < 1:
        problems.append(f"keep_probability must lie strictly between 0 and 1, got {keep_probability!r}")
    if rows not in QUERY_ROWS:
        problems.append(f"rows must be one of {QUERY_ROWS}, got {rows!r}")
    if not whole(steps, 1):
        problems.append(f"steps must be an integer >= 1, got {steps!r}")
    if not isinstance(learning_rate, (int, float)) or isinstance(learning_rate, bool) or not learning_rate > 0:
        problems.append(f"learning_rate must be a positive number, got {learning_rate!r}")
    if not whole(seed, 0):
        problems.append(f"seed must be a non-negative integer, got {seed!r}")
    for name, flag in (("remove", remove), ("overwrite", overwrite), ("shrink", shrink)):
        if not isinstance(flag, bool):
            problems.append(f"{name} must be True or False, got {flag!r}")
    if problems:
        raise InvalidInputError("train_at2: " + "; ".join(problems))
