"""Perturbation methods: OCCLUSION, LIME, KERNEL_SHAP, SOBOL on a causal LM, as plans for the batch engine.

The algorithms live in ``coalitions`` as plans over feature masks (masks first, values, then fit); this module
only adapts them to the model: a feature mask (n, d) becomes a token keep-mask (n, L) (a dropped feature's tokens
are replaced by the ``baseline`` token, or removed from attention with ``remove=True``), yielded as a
``MaskedRows`` request whose answer, the target log-probs, gives the explained score. With ``per_target`` the same
model calls also yield each target token's log-prob, so the matrix (target tokens x features) costs no extra
evaluations.

Additivity: OCCLUSION and KERNEL_SHAP are registered additive (KernelSHAP values add up to
f(input) - f(all features masked); occlusion is the per-feature drop). LIME is *not* registered additive: its
coefficients belong to a Ridge surrogate with an intercept, so they add up to the surrogate's prediction, not to
f(input) - f(baseline); nor is CONTEXT_CITE (a sparse surrogate on random half-ablations, ``sparse``, for inputs
with many features such as the sentences of a long document). SOBOL indices are non-negative variance shares and not additive.
"""

from __future__ import annotations

import inspect
import sys
from typing import Annotated, Any, Callable, Literal, Optional, Union

import numpy as np
import torch
from pydantic import BeforeValidator, Field, model_validator

from ..core.plans import relay
from ..errors import NoAttributableFeaturesError
from ..runtime.requests import MaskedRows, TextRows
from ..text.segment import kept_tokens, membership
from ..core.types import AttributionMethod
from .registry import (Count, FiniteFloat, Flag, MethodContext, MethodParams, Plan, RawAttribution, SampledParams, TokenId,
               _integer, register_method)
from . import coalitions as core
from . import hierarchy, sparse

SampleCount = Annotated[int, BeforeValidator(_integer), Field(ge=2, strict=True)]  # a fit or a variance needs two


class MaskingParams(MethodParams):
    """How a dropped feature is masked."""

    baseline: Union[Literal["pad"], TokenId] = Field(
        "pad", description="token that replaces a dropped feature's tokens: 'pad' (the input's pad/unk token) or an id")
    remove: Flag = Field(False, description="delete dropped tokens from attention instead of replacing them")


class HierarchicalParams(MethodParams):
    """The hierarchical search (``hierarchy``): groups of consecutive features first, then the kept groups' features."""

    hierarchical: Flag = Field(
        False, description="mask each paragraph (group of ~sqrt(n) features) alone first, then run the method only on "
                           "the features of the groups whose effect is at least 0.2 x the largest; pruned features "
                           "score 0 (metadata.hierarchical says which)")


class OcclusionParams(HierarchicalParams, MaskingParams):
    window: Count = Field(1, description="consecutive features masked together (1: leave-one-out)")
    stride: Count = Field(1, description="step between windows; at most window, so that every feature is masked")

    @model_validator(mode="after")
    def _every_feature_masked(self) -> "OcclusionParams":
        if self.stride > self.window:
            raise ValueError(f"stride={self.stride} > window={self.window} would leave features never masked")
        if self.hierarchical and self.window > 1:
            raise ValueError("hierarchical occlusion is leave-one-out at both levels (the groups are its windows); "
                             "use window=1")
        return self


class CoalitionParams(MaskingParams, SampledParams):
    n_samples: Optional[Count] = Field(
        None, description="coalitions sampled; None: max(100, 4 x features)")


class KernelShapParams(CoalitionParams):
    exact: Flag = Field(False, description="enumerate all 2^d coalitions (exact Shapley values)")


class LimeParams(HierarchicalParams, CoalitionParams):
    n_samples: Optional[SampleCount] = Field(
        None, description="neighbourhood size (with hierarchical: of the second stage); None: max(100, 4 x features) "
                          "(with hierarchical: max(16, 4 x searched features))")
    kernel_width: FiniteFloat = Field(25.0, gt=0, description="width of LIME's exponential kernel on distances")


class ContextCiteParams(HierarchicalParams, MaskingParams, SampledParams):
    # ContextCite ablates sources by removing them, and its metrics (top-k drop, LDS) remove them too: a surrogate
    # fitted on pad-replaced ablations predicted removals at chance (1.3k-token document, 36 ablations: LDS 0.03,
    # top-3 drop -1.09, against 0.63 and 8.95 with removal, bench_long_context)
    remove: Flag = Field(True, description="delete ablated features' tokens (as ContextCite does) instead of "
                                           "replacing them with baseline")
    n_samples: Optional[SampleCount] = Field(
        None, description="random half-ablations scored (with hierarchical: of the second stage); None: one per "
                          "feature, between 32 and 64 (with hierarchical: one per two searched features, between 8 and 64)")
    alpha: FiniteFloat = Field(sparse.DEFAULT_ALPHA, gt=0, description="Lasso penalty, relative to the standard deviation of the scores over the ablations")


class SobolParams(MaskingParams, SampledParams):
    n_samples: SampleCount = Field(core.DEFAULT_SOBOL_SAMPLES,
                                   description="quasi-Monte-Carlo base points; costs n_samples x (d + 2) evaluations")


class _Masks:
    """One explanation seen from its feature masks: token keep-masks to request, values to hand the estimator."""

    def __init__(self, context: MethodContext) -> None:
        if not context.features:
            raise NoAttributableFeaturesError("there are no features to attribute to")
        self.context = context
        params = context.params
        baseline = params["baseline"]
        self.baseline_id = int(context.model_input.baseline_token_id if baseline == "pad" else baseline)
        self.remove = params["remove"]
        self.n_features = len(context.features)
        self.membership = membership(context.features, range(context.model_input.length))  # feature -> tokens
        # the input itself (its score is reported) and, for a counterfactual, x' (all differences take x''s text)
        self.anchors = np.ones((1 + (context.counterfactual is not None), self.n_features), dtype=bool)
        self.anchors[1:] = False
        self.anchor_values: Optional[np.ndarray] = None
        self.n_added = 0  # anchor rows the estimator did not ask for

    def run(self, estimator: core.EstimatorPlan) -> Plan:
        """Drive ``estimator``: each batch of feature masks becomes one ``MaskedRows`` request."""
        return (yield from relay(estimator, self.ask))

    def ask(self, masks: np.ndarray) -> Plan:
        """The values of feature ``masks`` (n, features): one request of their token masks (``MaskedRows``), or for
        a counterfactual of the texts they compose (``TextRows``). The first request also scores the anchors."""
        added = np.zeros((0, self.n_features), dtype=bool)
        if self.anchor_values is None:
            missing = [row for row in self.anchors if not (masks == row).all(axis=1).any()]
            added = np.array(missing, dtype=bool).reshape(-1, self.n_features)
            self.n_added = len(added)
        rows = np.concatenate([masks, added])
        if self.context.counterfactual is not None:
            log_probs = yield TextRows(self.context.counterfactual.inputs(rows))
        else:
            log_probs = yield MaskedRows(kept_tokens(rows, self.membership), self.baseline_id, self.remove)
        values = self.values(log_probs)
        if self.anchor_values is None:
            self.anchor_values = np.stack([values[np.flatnonzero((rows == row).all(axis=1))[0]] for row in self.anchors])
        return values[: len(masks)]

    def values(self, log_probs: np.ndarray) -> np.ndarray:
        """(n, T) target log-probs -> (n,) explained scores, or (n, 1 + T) [score, log-probs] with per_target."""
        scorer, log_probs = self.context.scorer, torch.from_numpy(log_probs)
        total = scorer.reduce(log_probs).numpy()
        return np.concatenate([total[:, None], scorer.per_token(log_probs).numpy()], axis=1) \
            if self.context.per_target else total

    def attribution(self, estimate: core.Estimate, **metadata: Any) -> RawAttribution:
        """Split an estimate into feature scores and the per-target matrix, with the shared metadata."""
        values = estimate.values
        scores, matrix = (values[0], values[1:]) if self.context.per_target else (values, None)
        totals = self.anchor_values.reshape(len(self.anchors), -1)[:, 0]
        scored = {"target_score": float(totals[0])}
        if "hierarchical" in estimate.extras:
            scored["hierarchical"] = estimate.extras["hierarchical"]
        if self.context.counterfactual is not None:
            scored["counterfactual_score"] = float(totals[1])
        return RawAttribution(feature_scores=scores, matrix=matrix, metadata={
            "n_evaluations": estimate.n_evaluations + self.n_added, **scored, **metadata})


def _sampling(params: dict[str, Any]) -> dict[str, Any]:
    return {"seed": params["seed"], "max_evaluations": params["max_evaluations"]}


def _estimator(context: MethodContext, build: Callable[[int, Optional[int]], core.EstimatorPlan],
               search: Optional[hierarchy.EstimatorFactory] = None) -> core.EstimatorPlan:
    """The method's estimator over the context's features: ``build(n_features, max_evaluations)`` itself, or with
    ``hierarchical`` the hierarchical search (``hierarchy``) running ``search`` (default: ``build``) on the features
    it keeps."""
    n_features, budget = len(context.features), context.params.get("max_evaluations")
    if not context.params["hierarchical"]:
        return build(n_features, budget)
    groups = hierarchy.feature_groups(context.features, context.model_input)
    search = search or (lambda n_searched, left, _: build(n_searched, left))
    return hierarchy.hierarchical_plan(n_features, groups, search, max_evaluations=budget)


def _surrogate(context: MethodContext, build: Callable[[int, Optional[int]], core.EstimatorPlan],
               search: hierarchy.EstimatorFactory) -> Plan:
    """A surrogate model's coefficients (lime, context_cite): ``build``'s fit over the context's masks (``search``'s
    in the hierarchical search), with the fit's extras (``r2``, ``intercept``, the hierarchical report) in the
    metadata."""
    masks = _Masks(context)
    estimate = yield from masks.run(_estimator(context, build, search))
    return masks.attribution(estimate, **estimate.extras)


@register_method(AttributionMethod.OCCLUSION, kind="perturbation", additive=True, params=OcclusionParams,
                 description="drop in score when a window of consecutive features is masked (leave-one-out by default)")
def occlusion(context: MethodContext) -> Plan:
    masks = _Masks(context)
    window, stride = context.params["window"], context.params["stride"]
    estimate = yield from masks.run(_estimator(context, lambda n_features, _: core.occlusion_plan(
        n_features, window=window, stride=stride)))
    return masks.attribution(estimate, n_windows=estimate.extras["n_windows"])


@register_method(AttributionMethod.KERNEL_SHAP, kind="perturbation", additive=True, params=KernelShapParams,
                 description="Shapley values by shap's KernelExplainer over feature coalitions (exact when enumerable)")
def kernel_shap(context: MethodContext) -> Plan:
    masks = _Masks(context)
    params = context.params
    estimate = yield from masks.run(core.kernel_shap_plan(masks.n_features, n_samples=params["n_samples"],
                                                          exact=params["exact"], **_sampling(params)))
    extras = estimate.extras
    difference = extras["value_all"] - extras["value_none"]
    delta = abs(float(np.asarray(estimate.values.sum(-1)).reshape(-1)[0]) - difference)
    return masks.attribution(
        estimate, exact=extras["exact"], n_coalitions=extras["n_coalitions"], score_input=extras["value_all"],
        score_baseline=extras["value_none"], baseline_score=extras["value_none"], convergence_delta=delta,
        relative_convergence_delta=delta / abs(difference) if difference else None,
    )


def _register_surrogate(method: AttributionMethod, params: type, plan: Callable[..., core.EstimatorPlan],
                        option: str, searched_rows: Callable[[int], int], description: str) -> None:
    """Register a surrogate method: ``plan(n_features, n_samples=, <option>=, seed=, max_evaluations=)`` fitted
    over the context's masks (``_surrogate``); the two differ only by their estimator and its one option. In the
    hierarchical search's second stage ``n_samples`` defaults to ``searched_rows(features searched)`` (at most the
    rows the budget left), and a ``plan`` taking ``given`` fits on the first stage's rows that lie there too."""
    takes_given = "given" in inspect.signature(plan).parameters

    def explain(context: MethodContext) -> Plan:
        values = context.params

        def build(n_features: int, budget: Optional[int]) -> core.EstimatorPlan:
            return plan(n_features, n_samples=values["n_samples"], seed=values["seed"], max_evaluations=budget,
                        **{option: values[option]})

        def search(n_features: int, budget: Optional[int], given: np.ndarray) -> core.EstimatorPlan:
            n_samples = values["n_samples"] or max(2, min(searched_rows(n_features), budget or sys.maxsize))
            extra = {"given": given} if takes_given else {}
            return plan(n_features, n_samples=n_samples, seed=values["seed"], max_evaluations=budget,
                        **{option: values[option]}, **extra)

        return (yield from _surrogate(context, build, search))

    explain.__name__ = explain.__qualname__ = method.value
    register_method(method, kind="perturbation", additive=False, params=params, description=description)(explain)


_register_surrogate(AttributionMethod.LIME, LimeParams, core.lime_plan, "kernel_width", core.searched_n_samples,
                    "coefficients of LIME's kernel-weighted Ridge surrogate over feature coalitions")
_register_surrogate(AttributionMethod.CONTEXT_CITE, ContextCiteParams, sparse.sparse_plan, "alpha",
                    sparse.searched_n_ablations,
                    "sparse linear surrogate (Lasso, refitted) on random half-ablations, for many features")


@register_method(AttributionMethod.SOBOL, kind="perturbation", additive=False, params=SobolParams,
                 description="total-order Sobol indices over random feature masks (quasi-Monte-Carlo)")
def sobol(context: MethodContext) -> Plan:
    masks = _Masks(context)
    estimate = yield from masks.run(core.sobol_plan(masks.n_features, n_samples=context.params["n_samples"],
                                                    **_sampling(context.params)))
    return masks.attribution(estimate, score_variance=estimate.extras["variance"])
