"""Perturbation methods: OCCLUSION, LIME, KERNEL_SHAP, SOBOL on a causal LM through the TargetScorer.

The algorithms live in ``_coalitions`` as pure functions of a value function over feature masks; this module only
adapts them to the model: a feature mask (n, d) becomes a token keep-mask (n, L) (a dropped feature's tokens are
replaced by the ``baseline`` token, or removed from attention with ``remove=True``) and the scorer returns the
explained score. With ``per_target`` the same model calls also yield each target token's log-prob, so the matrix
(target tokens x features) costs no extra evaluations.

Additivity: OCCLUSION and KERNEL_SHAP are registered additive (KernelSHAP values add up to
f(input) - f(all features masked); occlusion is the per-feature drop). LIME is *not* registered additive: its
coefficients belong to a Ridge surrogate with an intercept, so they add up to the surrogate's prediction, not to
f(input) - f(baseline). SOBOL indices are non-negative variance shares and not additive.

Shared parameters: ``n_samples`` (LIME, KERNEL_SHAP: default max(100, 4 x features) coalitions;
SOBOL: 32 quasi-Monte-Carlo base points, costing 32 * (d + 2) evaluations), ``seed``,
``batch_size`` (masks per model call; None: the explainer's, by default sized by ``scoring.masked_rows_per_call``), ``baseline`` ("pad": the input's pad/unk
token, or a token id), ``remove``, ``max_evaluations`` (refuse larger jobs with BudgetError).
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

from ..errors import InvalidInputError, NoAttributableFeaturesError
from ..types import AttributionMethod
from . import MethodContext, RawAttribution, register_method
from . import _coalitions as core

_COMMON = {"batch_size": None, "baseline": "pad", "remove": False}
# n_samples=None: LIME and KERNEL_SHAP sample max(100, 4 x features) coalitions (``_coalitions.default_n_samples``)
_SAMPLED = {**_COMMON, "n_samples": None, "seed": 0, "max_evaluations": core.DEFAULT_MAX_EVALUATIONS}


class _Task:
    """One explanation seen as a value function over feature masks, plus the parameters every method shares."""

    def __init__(self, context: MethodContext) -> None:
        if not context.features:
            raise NoAttributableFeaturesError("there are no features to attribute to")
        self.context = context
        params = context.params
        self.batch_size = params["batch_size"]
        if self.batch_size is not None:
            self.batch_size = core.check_count("batch_size", self.batch_size, 1)
        self.baseline_id = _baseline_id(params["baseline"], context)
        if not isinstance(params["remove"], bool):
            raise InvalidInputError(f"remove must be True or False, got {params['remove']!r}")
        self.remove = params["remove"]
        model_input = context.model_input
        self.n_features = len(context.features)
        self.membership = np.zeros((self.n_features, model_input.length), dtype=bool)  # feature -> its tokens
        for row, feature in enumerate(context.features):
            self.membership[row, list(feature.token_positions)] = True

    def value(self, masks: np.ndarray) -> np.ndarray:
        """(n, d) feature masks -> (n,) explained scores, or (n, 1 + T) [score, target log-probs] with per_target."""
        keep = ~(~masks @ self.membership)
        scorer = self.context.scorer
        scores = scorer.score_token_masks(
            self.context.model_input, keep, baseline_id=self.baseline_id, remove=self.remove,
            per_target=self.context.per_target, batch_size=self.batch_size,
        )
        if not self.context.per_target:
            return scores
        total = scorer.reduce(torch.from_numpy(scores)).numpy()
        return np.concatenate([total[:, None], scores], axis=1)

    def attribution(self, estimate: core.Estimate, **metadata: Any) -> RawAttribution:
        """Split an estimate into feature scores and the per-target matrix, with the shared metadata."""
        values = estimate.values
        scores, matrix = (values[0], values[1:]) if self.context.per_target else (values, None)
        metadata = {"n_evaluations": estimate.n_evaluations, **metadata}
        return RawAttribution(feature_scores=scores, matrix=matrix, metadata=metadata)


def _baseline_id(spec: Any, context: MethodContext) -> int:
    if spec == "pad":
        return int(context.model_input.baseline_token_id)
    vocab_size = getattr(getattr(context.scorer.model, "config", None), "vocab_size", None)
    if isinstance(spec, bool) or not isinstance(spec, (int, np.integer)) or spec < 0 or (
        isinstance(vocab_size, int) and spec >= vocab_size
    ):
        raise InvalidInputError(f"baseline must be 'pad' or a token id of the model's vocabulary, got {spec!r}")
    return int(spec)


def _seed(params: dict[str, Any]) -> Optional[int]:
    seed = params["seed"]
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32):
        raise InvalidInputError(f"seed must be None or an integer in [0, 2**32), got {seed!r}")
    return None if seed is None else int(seed)


def _sampled(params: dict[str, Any]) -> dict[str, Any]:
    """The sampling parameters shared by LIME, KERNEL_SHAP and SOBOL, validated."""
    return {"seed": _seed(params), "max_evaluations": core.check_count("max_evaluations", params["max_evaluations"], 1)}


def _first(values: Any) -> float:
    return float(np.asarray(values).reshape(-1)[0])


@register_method(AttributionMethod.OCCLUSION, kind="perturbation", additive=True,
                 defaults={**_COMMON, "window": 1, "stride": 1},
                 description="drop in score when a window of consecutive features is masked (leave-one-out by default)")
def occlusion(context: MethodContext) -> RawAttribution:
    task = _Task(context)
    estimate = core.occlusion(task.value, task.n_features, window=context.params["window"],
                              stride=context.params["stride"], batch_size=task.batch_size)
    return task.attribution(estimate, n_windows=estimate.extras["n_windows"])


@register_method(AttributionMethod.KERNEL_SHAP, kind="perturbation", additive=True, defaults={**_SAMPLED, "exact": False},
                 description="Shapley values by shap's KernelExplainer over feature coalitions (exact when enumerable)")
def kernel_shap(context: MethodContext) -> RawAttribution:
    task = _Task(context)
    if not isinstance(context.params["exact"], bool):
        raise InvalidInputError(f"exact must be True or False, got {context.params['exact']!r}")
    estimate = core.kernel_shap(task.value, task.n_features, n_samples=context.params["n_samples"],
                                exact=context.params["exact"], batch_size=task.batch_size, **_sampled(context.params))
    extras = estimate.extras
    difference = extras["value_all"] - extras["value_none"]
    delta = abs(_first(estimate.values.sum(-1)) - difference)
    return task.attribution(
        estimate, exact=extras["exact"], n_coalitions=extras["n_coalitions"], score_input=extras["value_all"],
        score_baseline=extras["value_none"], convergence_delta=delta,
        relative_convergence_delta=delta / abs(difference) if difference else None,
    )


@register_method(AttributionMethod.LIME, kind="perturbation", additive=False, defaults={**_SAMPLED, "kernel_width": 25.0},
                 description="coefficients of LIME's kernel-weighted Ridge surrogate over feature coalitions")
def lime(context: MethodContext) -> RawAttribution:
    task = _Task(context)
    estimate = core.lime(task.value, task.n_features, n_samples=context.params["n_samples"],
                         kernel_width=context.params["kernel_width"], batch_size=task.batch_size,
                         **_sampled(context.params))
    return task.attribution(estimate, r2=estimate.extras["r2"], intercept=estimate.extras["intercept"])


@register_method(AttributionMethod.SOBOL, kind="perturbation", additive=False,
                 defaults={**_SAMPLED, "n_samples": core.DEFAULT_SOBOL_SAMPLES},
                 description="total-order Sobol indices over random feature masks (quasi-Monte-Carlo)")
def sobol(context: MethodContext) -> RawAttribution:
    task = _Task(context)
    estimate = core.sobol_total(task.value, task.n_features, n_samples=context.params["n_samples"],
                                batch_size=task.batch_size, **_sampled(context.params))
    return task.attribution(estimate, score_variance=estimate.extras["variance"])
