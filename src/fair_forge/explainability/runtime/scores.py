"""The explained score: the one number a method attributes, computed from the target tokens' log-probs.

A score is a registered function of the (..., n_target) log-probs of the target tokens, returning (...) scores,
differentiable (gradient methods take its gradient w.r.t. the input embeddings). The built-ins are the sum of the
log-probs (``"sum"``, the log-probability of the whole target), their mean (``"mean"``) and the target's probability
(``"prob"``). Users add their own with ``register_score`` and select it with ``AttributionExplainer(score=name)``.

A *contrastive* score (``register_score(name, contrastive=True)``) explains why the target rather than a contrast
(foil): a function ``combine(a, b)`` of a = log p(target) and b = log p(contrast), elementwise on tensors of any
shape. The built-ins are ``"logprob_diff"`` (a - b) and ``"prob_diff"`` (exp a - exp b); they are selected with
``explain(..., contrast_target=..., contrast=name)``. Applied to the per-token log-probs of a target and a contrast
of the same length, ``combine`` gives the per-token rows of a contrastive ``per_target`` matrix.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Union

import torch

from ..errors import InvalidInputError, ProbabilityUnderflowWarning

ScoreFunction = Callable[[torch.Tensor], torch.Tensor]
ScoreKind = str  # the name of a registered score ("sum", "mean", "prob" or a user's)


@dataclass(frozen=True)
class ExplainedScore:
    """A registered score: its name, its function and what it means (shown in the docs and errors)."""

    name: str
    function: ScoreFunction
    description: str = ""
    contrastive: bool = False  # a function combine(log p(target), log p(contrast)) of two tensors

    def __call__(self, *log_probs: torch.Tensor) -> torch.Tensor:
        return self.function(*log_probs)


_SCORES: dict[str, ExplainedScore] = {}


def register_score(name: str, *, description: str = "", contrastive: bool = False, replace: bool = False
                   ) -> Callable[[ScoreFunction], ScoreFunction]:
    """Decorator that registers ``function(log_probs (..., n_target)) -> (...)`` as the explained score ``name``, or
    with ``contrastive=True`` ``function(a, b)`` of log p(target) and log p(contrast) (see the module's docstring)."""
    if not isinstance(name, str) or not name.strip():
        raise InvalidInputError(f"a score's name must be a non-empty string, got {name!r}")
    key = name.strip().lower()

    def decorator(function: ScoreFunction) -> ScoreFunction:
        if not callable(function):
            raise InvalidInputError(f"score {key!r} must be a function of the target log-probs")
        if key in _SCORES and not replace:
            raise ValueError(f"score {key!r} is already registered; pass replace=True to override it")
        _SCORES[key] = ExplainedScore(key, function, description, bool(contrastive))
        return function

    return decorator


def get_score(score: Union[str, ExplainedScore], contrastive: bool = False) -> ExplainedScore:
    """The registered score named ``score`` (a contrastive one with ``contrastive=True``), or a typed error naming
    the available ones."""
    if isinstance(score, ExplainedScore) and score.contrastive == contrastive:
        return score
    key = score.strip().lower() if isinstance(score, str) else score
    if key not in _SCORES or _SCORES[key].contrastive != contrastive:
        what = "contrast" if contrastive else "score"
        raise InvalidInputError(f"{what} must be one of {available_scores(contrastive)}, got {score!r}")
    return _SCORES[key]


def available_scores(contrastive: bool = False) -> list[str]:
    """Names of the registered scores (or, with ``contrastive=True``, the contrastive ones), built-ins first."""
    return [name for name, score in _SCORES.items() if score.contrastive == contrastive]


def warn_if_probability_underflows(log_probability: torch.Tensor) -> None:
    """score="prob" is exp(sum of log-probs): below the dtype's smallest normal number it is 0 or imprecise, and so
    are the scores and gradients built on it. Say so instead of returning zero attributions silently."""
    floor = math.log(torch.finfo(log_probability.dtype).tiny)
    if bool((log_probability.detach() < floor).any()):
        warnings.warn(
            f"score='prob': the target's probability underflows {log_probability.dtype} (log p < {floor:.0f}) for "
            "some inputs, so their scores and gradients are 0 and the attributions lose them; use score='sum' "
            "(the log-probability) or a shorter target",
            ProbabilityUnderflowWarning,
            stacklevel=3,
        )


@register_score("sum", description="log p(target): the sum of the target tokens' log-probs")
def _sum(log_probs: torch.Tensor) -> torch.Tensor:
    return log_probs.sum(-1)


@register_score("mean", description="the mean of the target tokens' log-probs (length-normalised)")
def _mean(log_probs: torch.Tensor) -> torch.Tensor:
    return log_probs.mean(-1)


@register_score("prob", description="p(target): the probability of the whole target (exp of the sum)")
def _prob(log_probs: torch.Tensor) -> torch.Tensor:
    total = log_probs.sum(-1)
    warn_if_probability_underflows(total)
    return total.exp()


@register_score("logprob_diff", contrastive=True,
                description="log p(target) - log p(contrast): the decision margin in log-odds between the two")
def _logprob_diff(target: torch.Tensor, contrast: torch.Tensor) -> torch.Tensor:
    return target - contrast


@register_score("prob_diff", contrastive=True, description="p(target) - p(contrast): the margin in probability")
def _prob_diff(target: torch.Tensor, contrast: torch.Tensor) -> torch.Tensor:
    return target.exp() - contrast.exp()
