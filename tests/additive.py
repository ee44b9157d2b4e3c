"""A 'causal LM' whose explained score is a known sum of per-feature weights: the oracle of the faithfulness tests."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any, Optional, Sequence

import torch
from tolerances import unit_roundoff

from fair_forge.explainability import AttributionExplainer
from fair_forge.explainability.core.types import Granularity
from fair_forge.explainability.text.prompt import ModelInput, build_model_input
from fair_forge.explainability.text.segment import build_features

OFFSET = 6.0  # keeps every row's log-prob below -1, far from where log1p(-exp(z)) loses digits


class AdditiveLM(torch.nn.Module):
    """A 'causal LM' whose log p(next token) is exactly z = sum of ``weights[id]`` over the attended tokens - OFFSET.

    Every position puts logit z on the next token and log(1 - e^z) on a sink token (-inf elsewhere), so the softmax
    gives the next token probability e^z. Removed tokens (out of attention) and baseline tokens (weight 0) both drop
    their weight: the explained score of a row is n_target x (sum of the weights of the features present + const).
    """

    def __init__(self, weights: torch.Tensor, sink_id: int) -> None:
        super().__init__()
        self.weights = torch.nn.Parameter(weights.double(), requires_grad=False)
        self.sink_id = sink_id

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, **_: Any) -> Any:
        size, length = input_ids.shape
        attended = torch.ones_like(input_ids) if attention_mask is None else attention_mask[:, -length:]
        z = (self.weights[input_ids] * attended).sum(-1) - OFFSET
        logits = torch.full((size, length, len(self.weights)), -math.inf, dtype=self.weights.dtype)
        following = torch.roll(input_ids, -1, dims=1)
        logits.scatter_(-1, following[..., None], z[:, None, None].expand(size, length, 1))
        logits[..., self.sink_id] = torch.log1p(-torch.exp(z))[:, None]
        return SimpleNamespace(logits=logits)


def additive_rounding(n_target: int, weights: Sequence[float]) -> float:
    """How far AdditiveLM's metrics may be from the hand computation with dyadic ``weights``: float64 rounding only.
    A row's log-prob is z - logsumexp(z, log1p(-e^z)), z exact (dyadic weights) and |z| <= M = OFFSET + sum|w|; the
    log-sum-exp of two terms adding up to 1 is exactly 0 up to 8 roundings of values <= 1, and the subtraction rounds
    once at |z|: <= (8 + M) u per token; a score sums n_target of them (Higham 4.4: + n_target * M u each), and a
    metric (differences and means of scores, weights adding up to <= 2) doubles that."""
    m = OFFSET + sum(abs(w) for w in weights)
    return 2 * n_target * (8 + (n_target + 2) * m) * unit_roundoff(torch.float64)


def additive_explainer(tokenizer: Any, messages: list[dict[str, str]], target: str,
                       weights: Sequence[float]) -> tuple[AttributionExplainer, ModelInput]:
    """(explainer on AdditiveLM, the model input): word feature i of ``messages`` weighs ``weights[i]`` (dyadic
    weights are exact), carried by its last token."""
    model_input = build_model_input(tokenizer, target=target, messages=messages)
    features = build_features(model_input, Granularity.WORD)
    ids = model_input.input_ids
    feature_ids = [int(ids[p]) for f in features for p in f.token_positions]
    assert len(set(feature_ids)) == len(feature_ids)  # so a weight per id is a weight per feature
    assert not set(feature_ids) & set(model_input.target_ids.tolist())
    assert len(weights) == len(features)
    table = torch.zeros(len(tokenizer))
    for feature, weight in zip(features, weights):
        table[int(ids[feature.token_positions[-1]])] = weight
    sink = tokenizer.convert_tokens_to_ids("<unk>")
    return AttributionExplainer(AdditiveLM(table, sink), tokenizer, prefix_cache=False), model_input
