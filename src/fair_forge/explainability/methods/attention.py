"""ATTENTION and AT2: context attribution from the attention weights of one forward pass.

Both read, during one ordinary forward pass of the unmasked input (``runtime.attention``), the attention from the
target's rows (by default the positions that predict the target tokens) to every token, summed over each feature's
tokens as it is read: (layers, heads, target rows, features), never a full attention map.

- ``attention``: a feature's score is that attention averaged over heads and layers, then over target rows.
- ``at2``: a feature's score is sum over (layer, head) of w[layer, head] times that attention averaged over target
  rows, with head weights w learned by ``train_at2`` (``methods.at2``) from ablations on a few documents.

With ``per_target=True`` the matrix row of a target token is the same quantity for its row alone, so the rows average
to the feature scores. Neither is additive (attention weights are not effects on the score; AT2's are fitted to
correlate with them, up to scale). Both are registered as perturbation methods: they need no embeddings, only
forward passes; the cost is one forward pass of the input (no logits but one position's), counted in the metadata.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Optional

import torch
from pydantic import BeforeValidator, Field, model_validator

from ..core.types import AttributionMethod
from ..errors import InvalidInputError
from ..runtime.attention import QueryRows
from .at2 import At2Weights, head_scores, weights_reference
from .registry import Count, MethodContext, MethodParams, RawAttribution, register_method

ROWS_DESCRIPTION = ("attention rows read: 'predicting' (the positions whose outputs are the target tokens' log-probs) "
                    "or 'target' (the target tokens themselves)")


class _OnePass(MethodParams):
    batch_size: Optional[Count] = Field(None, description="not used: the input goes through the model once, alone")


class AttentionParams(_OnePass):
    rows: QueryRows = Field("predicting", description=ROWS_DESCRIPTION)


class At2Params(_OnePass):
    weights: Annotated[Optional[dict[str, Any]], BeforeValidator(weights_reference)] = Field(
        None, description="required: the path of head weights saved by train_at2, or the At2Weights it returned "
                          "(kept in the results as a reference: the file and its digest, or the weights)")

    @model_validator(mode="after")
    def _weights_given(self) -> "At2Params":
        if self.weights is None:
            raise ValueError("at2 needs weights=: a path to head weights saved by train_at2(model, tokenizer, "
                             "documents, path=...) or the At2Weights it returned")
        return self


def _read(context: MethodContext, rows: QueryRows) -> tuple[torch.Tensor, dict[str, float]]:
    """(layers, heads, target rows, features) attention, from one forward pass counted by the item's scorer, and
    the explained score at the input read from the same pass (not for a contrast: its answer is another input)."""
    scorer, model_input = context.scorer, context.model_input
    started = time.perf_counter()
    logits: list = []
    scores = head_scores(scorer.model, model_input, context.features, rows, max_memory=scorer.max_memory,
                         keep_logits=model_input.n_target + 1, outputs=logits)
    scorer.count.forward_passes += 1
    scorer.count.tokens_processed += model_input.length
    scorer.count.seconds += time.perf_counter() - started
    if model_input.contrast is not None:
        return scores, {}
    predicting = logits[0][:-1].to(scorer.score_dtype).log_softmax(-1)
    log_probs = predicting.gather(-1, model_input.target_ids.to(predicting.device)[:, None]).squeeze(-1)
    return scores, {"target_score": float(scorer.reduce(log_probs))}


def _attribution(context: MethodContext, matrix: torch.Tensor, **metadata: Any) -> RawAttribution:
    """Feature scores (the rows' mean) from the (target rows, features) matrix, and the matrix with per_target."""
    values = matrix.detach().double().cpu().numpy()
    return RawAttribution(feature_scores=values.mean(axis=0), matrix=values if context.per_target else None,
                          metadata={"n_evaluations": 1, **metadata})


@register_method(AttributionMethod.ATTENTION, kind="perturbation", additive=False, params=AttentionParams,
                 description="attention from the target's rows to each feature's tokens, averaged over heads and "
                             "layers (one forward pass)")
def attention(context: MethodContext) -> RawAttribution:
    rows = context.params["rows"]
    scores, scored = _read(context, rows)
    return _attribution(context, scores.mean(dim=(0, 1)), rows=rows, **scored)


@register_method(AttributionMethod.AT2, kind="perturbation", additive=False, params=At2Params,
                 description="attention to each feature weighted per head by weights learned from ablations "
                             "(AT2; train_at2), one forward pass")
def at2(context: MethodContext) -> RawAttribution:
    weights = At2Weights.from_reference(context.params["weights"])
    weights.check(context.scorer.model)  # another model's weights: refused before the model runs
    scores, scored = _read(context, weights.rows)
    if tuple(scores.shape[:2]) != weights.head_weights.shape:
        raise InvalidInputError(f"the AT2 weights are for {weights.head_weights.shape} (layers, heads), the model "
                                f"has {tuple(scores.shape[:2])}")
    head_weights = torch.from_numpy(weights.head_weights).to(scores.device)
    matrix = torch.einsum("lh,lhrf->rf", head_weights, scores)
    return _attribution(context, matrix, rows=weights.rows, weights_digest=weights.digest, **scored)

