"""One item of an explanation, from its fields to its ``AttributionResult``: what ``AttributionExplainer`` runs for
every item of ``explain``, ``explain_batch``, ``iter_explain`` and ``explain_dataset``.

- ``Settings``: what every item of a call shares (method, parameters, granularity, per_target, the contrastive
  score), validated once.
- ``prepare``: one item checked and tokenized: its input, its features, and with a ``contrast_target`` the contrast
  (``text/prompt.py``), with a ``counterfactual`` the differences between x and x' as the features
  (``text/counterfactual_input.py``). Typed errors before any model call.
- ``scored_plan``: the method's plan, followed where it did not score them by one request for the explained score at
  the input (``target_score``) and, for a counterfactual, at x' (``counterfactual_score``).
- ``proxied_plan``: with a proxy model, a plan whose rows the proxy scored, followed by a sample of those rows scored
  by the explained model: how well the proxy's ranking of the ablations agrees (``metadata.proxy``).
- ``build_result``: the plan's ``RawAttribution`` as the result (scores, matrix, metadata).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generator, Iterator, Optional, Union

import numpy as np
import torch

from .core.plans import Plan, relay
from .core.types import (AttributionMatrix, AttributionMetadata, AttributionMethod, AttributionResult, Granularity,
                         TokenAttribution, normalize_scores)
from .errors import ContextLengthError, ExplainabilityError, InvalidInputError
from .methods.registry import MethodContext, MethodSpec, RawAttribution
from .runtime.architectures import model_context_length
from .runtime.requests import ByScorer, MaskedRows, TextRows
from .runtime.scorer import TargetScorer
from .text.counterfactual_input import CounterfactualInput, counterfactual_input
from .text.prompt import Messages, ModelInput, build_model_input, with_target_span
from .text.segment import Feature, build_features, restrict_to_messages

#: gradient methods that explain f(x) - f(x') of a counterfactual: those that integrate from a baseline (x')
COUNTERFACTUAL_GRADIENT_PARAMETER = "baseline"


@dataclass(frozen=True)
class Settings:
    """What every item of a call shares, validated once: the method, its parameters, granularity, per_target."""

    spec: MethodSpec
    params: dict[str, Any]
    granularity: Granularity
    per_target: bool
    attribute_messages: Optional[tuple[int, ...]] = None  # None: every message's text is attributable
    contrast: str = "logprob_diff"  # the contrastive score of items with a contrast target


@dataclass(frozen=True)
class Prepared:
    """One tokenized item: everything checked, nothing computed yet."""

    model_input: ModelInput
    features: list[Feature]
    counterfactual: Optional[CounterfactualInput] = None
    target_span: Optional[tuple[int, int]] = None  # the characters of the target explained (as the user gave them)


def prepare(explainer: Any, settings: Settings, messages: Optional[Messages], prompt: Optional[str],
            target: Optional[str], contrast_target: Optional[str] = None, counterfactual: Any = None,
            target_span: Optional[tuple[int, int]] = None) -> Prepared:
    """Check and tokenize one item for ``explainer``; raises typed errors before any model call."""
    if target is None:
        raise InvalidInputError("target is required: the response text to explain")
    model_input = build_model_input(explainer.tokenizer, target=target, messages=messages, prompt=prompt,
                                    include_template_tokens=explainer.include_template_tokens,
                                    contrast_target=contrast_target)
    if target_span is not None:
        if counterfactual is not None:
            raise InvalidInputError("target_span and counterfactual do not combine; explain the claim's sentence "
                                    "as the target instead")
        model_input = with_target_span(model_input, tuple(target_span))
    limit = model_context_length(explainer.model)
    longest = max(model_input.length, model_input.contrast.length if model_input.contrast is not None else 0)
    if limit is not None and longest > limit:
        raise ContextLengthError(f"prompt + target are {longest} tokens but the model takes at most {limit}; "
                                 "shorten the prompt or the target")
    if settings.per_target and model_input.contrast is not None and model_input.n_contrast != model_input.n_target:
        raise InvalidInputError(
            f"per_target with a contrast compares the two answers token by token, but the target has "
            f"{model_input.n_target} tokens and the contrast {model_input.n_contrast}; use per_target=False or "
            "answers of as many tokens")
    if counterfactual is None:
        model_input = restrict_to_messages(model_input, settings.attribute_messages)
        return Prepared(model_input, build_features(model_input, settings.granularity),
                        target_span=tuple(target_span) if target_span is not None else None)
    if settings.attribute_messages is not None:
        raise InvalidInputError("attribute_messages and counterfactual do not combine: a counterfactual's features "
                                "are the segments where x and x' differ")
    spec = settings.spec
    if spec.kind == "gradient" and COUNTERFACTUAL_GRADIENT_PARAMETER not in spec.params.model_fields:
        raise InvalidInputError(
            f"{spec.name} has no baseline, so it cannot explain f(x) - f(x'); use integrated_gradients, "
            "gradient_shap or a perturbation method (kernel_shap is exact for a few differences)")
    cf = counterfactual_input(explainer.tokenizer, messages if messages is not None else prompt, counterfactual,
                              target=target, granularity=settings.granularity, contrast_target=contrast_target,
                              include_template_tokens=explainer.include_template_tokens)
    return Prepared(cf.model_input, list(cf.features), cf)


def scored_plan(spec: MethodSpec, context: MethodContext) -> Plan:
    """The method's plan; then, where it did not report them, one request for the explained score at the input and,
    for a counterfactual, at x' (packed with the other items' rows)."""
    raw = yield from spec.plan(context)
    if not isinstance(raw, RawAttribution):
        return raw  # reported by build_result
    wanted = ["target_score"] + (["counterfactual_score"] if context.counterfactual is not None else [])
    missing = [name for name in wanted if name not in raw.metadata]
    if missing:
        if context.counterfactual is not None:
            cf = context.counterfactual
            log_probs = yield TextRows((cf.model_input, cf.counterfactual_input))
        else:
            log_probs = yield MaskedRows(np.ones((1, context.model_input.length), dtype=bool),
                                         context.model_input.baseline_token_id)
        totals = context.scorer.reduce(torch.from_numpy(np.asarray(log_probs))).numpy()
        scores = dict(zip(wanted, (float(value) for value in totals)))
        raw.metadata.update({name: scores[name] for name in missing})
    return raw


def proxied_plan(plan: Plan, context: MethodContext, explained: TargetScorer, check_rows: int, proxy_name: str
                 ) -> Plan:
    """``plan`` as it runs on the proxy (the item's scorer, ``context.scorer``), then ``check_rows`` of the distinct
    rows it asked for (masked or text rows), drawn with the method's seed (0 without one), scored again by the
    ``explained`` model: ``metadata.proxy`` holds the Spearman rank correlation of the two models' explained scores
    on them (the LDS; None for fewer than two rows or constant scores) and what the explained model's calls cost."""
    asked: dict[Any, tuple[tuple[Any, ...], Any, np.ndarray]] = {}  # distinct row -> (its kind, it, proxy log-probs)

    def record(request: Any) -> Generator[Any, Any, Any]:
        answer = yield request
        for key, kind, row, log_probs in _single_rows(request, answer):
            asked.setdefault(key, (kind, row, log_probs))
        return answer

    raw = yield from relay(plan, record)
    if not isinstance(raw, RawAttribution):
        return raw
    rows = list(asked.values())
    drawn = np.random.default_rng(context.params.get("seed", 0)).choice(len(rows), min(check_rows, len(rows)),
                                                                        replace=False)
    kinds: dict[tuple[Any, ...], list[tuple[Any, np.ndarray]]] = {}
    for index in sorted(drawn.tolist()):
        kind, row, log_probs = rows[index]
        kinds.setdefault(kind, []).append((row, log_probs))
    proxy_scores, explained_scores = [], []
    for kind, members in kinds.items():
        picked = [row for row, _ in members]
        request = TextRows(tuple(picked)) if kind[0] == "text" else MaskedRows(np.stack(picked), *kind[1:])
        explained_scores.append(_explained(context, (yield ByScorer(explained, request))))
        proxy_scores.append(_explained(context, np.stack([log_probs for _, log_probs in members])))
    proxy_values, explained_values = np.concatenate([[], *proxy_scores]), np.concatenate([[], *explained_scores])
    count = explained.count
    raw.metadata["proxy"] = {
        "model": proxy_name, "check_rows": len(drawn), "lds": rank_agreement(proxy_values, explained_values),
        "explained_model": {"n_forward_passes": count.forward_passes, "n_tokens_processed": count.tokens_processed,
                            "compute_time_seconds": count.seconds}}
    return raw


def _single_rows(request: Any, answer: Any) -> Iterator[tuple[Any, tuple[Any, ...], Any, np.ndarray]]:
    """(key, kind, row, log-probs) of each row of a masked or text request: what a check can ask for again."""
    if isinstance(request, MaskedRows):
        kind = ("masked", int(request.baseline_id), bool(request.remove))
        for row, log_probs in zip(np.asarray(request.keep, dtype=bool), answer):
            yield (*kind, row.tobytes()), kind, row, log_probs
    elif isinstance(request, TextRows):
        for each, log_probs in zip(request.inputs, answer):
            yield ("text", tuple(each.input_ids.tolist())), ("text",), each, log_probs


def _explained(context: MethodContext, log_probs: np.ndarray) -> np.ndarray:
    return context.scorer.reduce(torch.from_numpy(np.asarray(log_probs))).numpy()


def rank_agreement(first: np.ndarray, second: np.ndarray) -> Optional[float]:
    """Spearman's rank correlation of two score vectors, None where it is undefined (fewer than two, or constant)."""
    from scipy.stats import spearmanr

    if len(first) < 2 or np.ptp(first) == 0 or np.ptp(second) == 0:
        return None
    return float(spearmanr(first, second).statistic)


def method_label(name: str) -> Union[AttributionMethod, str]:
    """The enum member for a built-in method, the plain name for a user-registered one."""
    try:
        return AttributionMethod(name)
    except ValueError:
        return name


def build_result(explainer: Any, settings: Settings, item: Prepared, raw: RawAttribution,
                 scorer: TargetScorer) -> AttributionResult:
    """A backend's answer for ``item`` as the result; a malformed answer is an ``ExplainabilityError``."""
    spec = settings.spec
    if not isinstance(raw, RawAttribution):
        raise ExplainabilityError(f"method {spec.name} returned {type(raw).__name__}, not a RawAttribution")
    scores = np.asarray(raw.feature_scores, dtype=float).reshape(-1)
    if scores.shape[0] != len(item.features):
        raise ExplainabilityError(f"method {spec.name} returned {scores.shape[0]} scores for {len(item.features)} "
                                  "features")
    replaced = item.counterfactual.counterfactual_texts if item.counterfactual is not None else [None] * len(scores)
    attributions = [
        TokenAttribution(text=feature.text, score=float(score), position=index, normalized_score=norm,
                         start=feature.start, end=feature.end, message_index=feature.message_index,
                         token_positions=list(feature.token_positions), counterfactual_text=other)
        for index, (feature, score, norm, other) in enumerate(
            zip(item.features, scores, normalize_scores(scores.tolist()), replaced))
    ]
    model_input = item.model_input
    matrix = None
    if raw.matrix is not None:
        matrix = AttributionMatrix(row_labels=model_input.target_labels, column_labels=[f.text for f in item.features],
                                   values=np.asarray(raw.matrix, dtype=float).tolist())
    count = scorer.count
    extra = raw.metadata.get("proxy", {}).get("explained_model", {})  # a proxy's check: the explained model's calls
    metadata = AttributionMetadata(
        compute_time_seconds=count.seconds + extra.get("compute_time_seconds", 0.0),
        n_forward_passes=count.forward_passes + extra.get("n_forward_passes", 0),
        n_backward_passes=count.backward_passes,
        n_tokens_processed=count.tokens_processed + extra.get("n_tokens_processed", 0),
        method_params=dict(settings.params),
        score=scorer.explained,
        n_features=len(item.features),
        n_target_tokens=model_input.n_target,
        **raw.metadata,
        **({"checkpoint": True, "checkpoint_reason": scorer.checkpoint_reason} if scorer.checkpoint_reason else {}),
    )
    if explainer.verbose:
        print(f"[fair_forge] {spec.name}: {len(scores)} features in {scorer.count.seconds:.2f}s")
    counterfactual = item.counterfactual
    return AttributionResult(
        prompt=model_input.prompt,
        target=model_input.target,
        contrast_target=model_input.contrast.target if model_input.contrast is not None else None,
        target_span=item.target_span,
        counterfactual_prompt=counterfactual.counterfactual_input.prompt if counterfactual is not None else None,
        method=method_label(spec.name),
        granularity=settings.granularity,
        attributions=attributions,
        matrix=matrix,
        model_name=explainer.model_name,
        metadata=metadata,
        messages=model_input.messages,
    )
