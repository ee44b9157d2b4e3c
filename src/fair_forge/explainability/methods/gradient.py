"""Gradient methods on the input embeddings of the attributable tokens, as plans for the batch engine.

A method yields ``EmbeddingRows``: points (n, A, H) for the A attributable tokens (template and target tokens stay
as they are, so baselines, noise and interpolation touch only what is attributed), and which scalar each row
differentiates (the explained score, or one target token's log-prob for the per-target matrix). It receives the
rows' gradients and computes its attribution itself:

  INTEGRATED_GRADIENTS: (x - b) * the path integral of the gradient, by ``quadrature.integrate`` (steps, achieved
      error and a ``ConvergenceWarning`` when the error stays above ``tolerance``); token scores add up to
      f(x) - f(b) up to that error;
  GRADIENT_SHAP: mean of (x + noise - b) * gradient at b + alpha (x + noise - b), alpha ~ U(0, 1);
  INPUT_X_GRADIENT: x * gradient;  SALIENCY: the gradient;
  SMOOTH_GRAD / SQUARE_GRAD / VAR_GRAD: mean / mean square / variance of the gradient at noisy copies of x, kept as
      running sums, so memory does not grow with ``n_samples``.

Noise and random interpolation points come from generators seeded by ``seed``, drawn ``SAMPLES_PER_REQUEST``
samples at a time: results depend neither on the global RNG nor on the batch size. A request holds at most
``REQUEST_GRADIENT_BYTES`` of gradients (long inputs: fewer points per request, the same values). Reduction over the hidden
dimension and a feature's tokens: signed sum for the additive methods (and the already non-negative SQUARE_GRAD,
VAR_GRAD), L2 norm for SALIENCY and SMOOTH_GRAD.
"""

from __future__ import annotations

from typing import Iterator, Literal, Optional, Union

import numpy as np
import torch
from pydantic import Field

from ..core.plans import relay
from ..errors import BudgetError, InvalidInputError, NoAttributableFeaturesError
from ..runtime.requests import EXPLAINED_SCORE, EmbeddingAnswer, EmbeddingRows
from ..text.segment import membership
from ..core.types import AttributionMethod
from .registry import (Count, FiniteFloat, MethodContext, MethodParams, Plan, RawAttribution, SampledParams, TokenId,
               register_method)
from .coalitions import DEFAULT_MAX_EVALUATIONS
from .quadrature import integrate, warn_if_unconverged

Reduction = Literal["sum", "l2"]
NOISE_SAMPLES = 16  # default number of noisy samples
SAMPLES_PER_REQUEST = 16  # noise is drawn, and rows requested, this many samples at a time
STEPS_PER_REQUEST = 64  # interpolation points per request (times the outputs with per_target)
# float32 gradients one request returns at most (points x outputs x A x H). The method turns them into float64
# products, so a request costs about 8x this while it is reduced: 64 points of a 1.3k-token document (SmolLM2) were
# 192 MB of gradients and took integrated gradients' peak RSS from 1.8 GB to 2.5 GB. Short inputs are not affected
# (64 points of a 100-token input hold 15 MB).
REQUEST_GRADIENT_BYTES = 2**25
Baseline = Union[Literal["zero", "pad"], TokenId]
BASELINE_HELP = "'zero' embedding, 'pad' (the input's pad/unk token's embedding) or a token id's embedding"


class StepParams(MethodParams):
    n_steps: Optional[Count] = Field(
        None, description="fixed Gauss-Legendre nodes; None: 64 nodes, then an adaptive rule while the completeness "
                          "error is above tolerance")
    tolerance: FiniteFloat = Field(
        0.01, gt=0, description="relative completeness error the default rule refines to (else a ConvergenceWarning)")
    max_steps: Count = Field(1024, description="most integration nodes the default rule may use")
    baseline: Baseline = Field("zero", description=BASELINE_HELP)
    max_evaluations: Count = Field(
        DEFAULT_MAX_EVALUATIONS, description="refuse (BudgetError) explanations that would need more model evaluations")

    def planned_evaluations(self) -> int:
        return (self.n_steps or self.max_steps) + 2  # the path's points and its two ends


class NoiseParams(SampledParams):
    n_samples: Count = Field(NOISE_SAMPLES, description="noisy samples (rows) per output")
    noise_std: FiniteFloat = Field(0.1, ge=0, description="noise standard deviation, relative to std(input embeddings)")

    def planned_evaluations(self) -> int:
        return self.n_samples


class ShapParams(NoiseParams):
    noise_std: FiniteFloat = Field(0.0, ge=0, description="noise standard deviation, relative to std(input embeddings)")
    baseline: Baseline = Field("zero", description=BASELINE_HELP)


class _Embeddings:
    """The attributable tokens' embeddings of one explanation, the outputs it differentiates, and the reductions."""

    def __init__(self, context: MethodContext) -> None:
        if not context.features:
            raise NoAttributableFeaturesError("there are no features to attribute to")
        self.context = context
        scorer, model_input = context.scorer, context.model_input
        scorer.embedding_layer()  # typed error for models without input embeddings, before any model call
        positions = np.flatnonzero(model_input.attributable)
        self.inputs = scorer.embed(model_input.input_ids[positions])  # (A, H) float32
        self.membership = torch.from_numpy(membership(context.features, positions).astype(np.float64))  # (F, A)
        # the explained score, then (per_target) each target token's log-prob
        self.outputs = (EXPLAINED_SCORE, *(range(model_input.n_target) if context.per_target else ()))

    def baseline(self, spec: Union[str, int]) -> torch.Tensor:
        """(A, H) baseline: "zero", "pad" (the input's baseline token) or a token id, at every attributed token; for
        a counterfactual, x''s own tokens at those positions (the straight path from x' to x)."""
        counterfactual = self.context.counterfactual
        if counterfactual is not None:
            if counterfactual.baseline_ids is None:
                raise InvalidInputError(f"no path from x' to x: {counterfactual.baseline_problem}")
            return self.context.scorer.embed(counterfactual.baseline_ids)
        if spec == "zero":
            return torch.zeros_like(self.inputs)
        token = self.context.model_input.baseline_token_id if spec == "pad" else int(spec)
        return self.context.scorer.embed(torch.tensor([token])).expand_as(self.inputs).clone()

    def check_budget(self, method: str, rows_per_output: int, max_evaluations: int, hint: str, fixed: int = 0) -> None:
        """BudgetError before any model call when this item's rows (``rows_per_output`` per output, + ``fixed``)
        exceed ``max_evaluations`` (with per_target, every target token is an output)."""
        planned = rows_per_output * len(self.outputs) + fixed  # a backward pass per output
        if planned > max_evaluations:
            raise BudgetError(f"{method} would need {planned} gradient rows, more than "
                              f"max_evaluations={max_evaluations}; {hint}")

    def points_per_request(self, most: int) -> int:
        """Points per request: at most ``most``, and at most ``REQUEST_GRADIENT_BYTES`` of their gradients."""
        per_point = len(self.outputs) * self.inputs.numel() * self.inputs.element_size()
        return max(1, min(most, REQUEST_GRADIENT_BYTES // per_point))

    def rows(self, points: torch.Tensor) -> EmbeddingRows:
        """Points (k, A, H) whose gradient is wanted for every output (one forward, a backward per output)."""
        return EmbeddingRows(points, self.outputs)

    def score(self, answer: EmbeddingAnswer, row: int = 0) -> float:
        """The explained score of one row of an answer."""
        return float(self.context.scorer.reduce(torch.from_numpy(answer.log_probs[row])))

    def per_output(self, answer: EmbeddingAnswer) -> torch.Tensor:
        """(k, outputs, A, H) gradients of ``rows`` -> (outputs, k, A, H) in float64."""
        return answer.gradients.double().transpose(0, 1)

    def result(self, token_values: torch.Tensor, reduction: Reduction, **metadata: object) -> RawAttribution:
        """(outputs, A, H) per-token, per-dimension values -> feature scores (and the per-target matrix)."""
        values = token_values.double().cpu()
        if reduction == "sum":
            features = values.sum(-1) @ self.membership.T
        else:
            features = (values.square().sum(-1) @ self.membership.T).sqrt()
        features = features.numpy()
        matrix = features[1:] if self.context.per_target else None
        return RawAttribution(feature_scores=features[0], matrix=matrix, metadata=dict(metadata))


def _seed(params: dict) -> int:
    """The run's seed: the given one, or fresh randomness (not the global RNG) for None."""
    return int(np.random.default_rng().integers(2**32)) if params["seed"] is None else int(params["seed"])


def noise_chunks(seed: int, n_samples: int, shape: tuple[int, ...], stdev: float) -> Iterator[torch.Tensor]:
    """Gaussian noise for ``n_samples`` samples of ``shape``, ``SAMPLES_PER_REQUEST`` at a time, from a CPU generator
    seeded by ``seed``: independent of the global RNG, the device and the batch size."""
    generator = torch.Generator().manual_seed(seed)
    for start in range(0, n_samples, SAMPLES_PER_REQUEST):
        yield torch.randn((min(SAMPLES_PER_REQUEST, n_samples - start), *shape), generator=generator) * stdev


@register_method(AttributionMethod.INTEGRATED_GRADIENTS, kind="gradient", additive=True, params=StepParams,
                 description="path integral of gradients from a baseline (quadrature with an error estimate)")
def integrated_gradients(context: MethodContext) -> Plan:
    params = context.params
    embeddings = _Embeddings(context)
    embeddings.check_budget("integrated gradients", params["n_steps"] or params["max_steps"],
                            params["max_evaluations"], "lower n_steps or max_steps", fixed=2)
    x, b = embeddings.inputs, embeddings.baseline(params["baseline"])
    ends = yield EmbeddingRows(torch.stack([x, b]), gradients=False)
    endpoints = context.scorer.reduce(torch.from_numpy(ends.log_probs))
    total = float(endpoints[0] - endpoints[1])
    # one rule, steered by the explained score's completeness; the per-target rows are integrated at its points
    rule = integrate(total, n_steps=params["n_steps"], tolerance=params["tolerance"], max_steps=params["max_steps"])
    points_per_request = embeddings.points_per_request(max(1, STEPS_PER_REQUEST // len(embeddings.outputs)))

    def integrand(alphas: np.ndarray) -> Plan:
        """The rule's points as requests of ``points_per_request`` rows: (explained score's, every output's) terms."""
        contributions = []  # per point: (outputs, A) sums over the hidden dimension of (x - b) * gradient
        for start in range(0, len(alphas), points_per_request):
            chunk = torch.as_tensor(alphas[start : start + points_per_request], dtype=x.dtype).to(x.device)
            answer = yield embeddings.rows(b + chunk[:, None, None] * (x - b))
            contributions.append(((x - b).double() * embeddings.per_output(answer)).sum(-1).transpose(0, 1).cpu())
        vector = torch.cat(contributions).numpy()  # (k, outputs, A)
        return vector[:, 0].sum(-1), vector

    integral = yield from relay(rule, integrand)
    warn_if_unconverged(integral, params["tolerance"], "integrated gradients")
    raw = embeddings.result(torch.from_numpy(integral.value)[..., None], "sum")  # (outputs, A, 1)
    delta = abs(float(raw.feature_scores.sum()) - total)
    raw.metadata.update(
        convergence_delta=delta, relative_convergence_delta=delta / abs(total) if total else None,
        score_input=float(endpoints[0]), score_baseline=float(endpoints[1]), target_score=float(endpoints[0]),
        **{"counterfactual_score" if context.counterfactual is not None else "baseline_score": float(endpoints[1])},
        n_steps_used=integral.n_evaluations, integration_error=integral.error, converged=integral.converged,
    )
    return raw


@register_method(AttributionMethod.GRADIENT_SHAP, kind="gradient", additive=True, params=ShapParams,
                 description="expected gradients at random points between baseline and (noisy) input")
def gradient_shap(context: MethodContext) -> Plan:
    params = context.params
    embeddings = _Embeddings(context)
    embeddings.check_budget("gradient_shap", params["n_samples"], params["max_evaluations"], "lower n_samples")
    x, b = embeddings.inputs, embeddings.baseline(params["baseline"])
    seed = _seed(params)
    alphas = torch.Generator().manual_seed(seed + 1)
    total = torch.zeros((len(embeddings.outputs), *x.shape), dtype=torch.float64, device=x.device)
    stdev = float(params["noise_std"]) * float(x.std())
    per_request = embeddings.points_per_request(SAMPLES_PER_REQUEST)
    for noise in noise_chunks(seed, params["n_samples"], tuple(x.shape), stdev):
        alpha = torch.rand((len(noise), 1, 1), generator=alphas)
        for part, weight in zip(noise.split(per_request), alpha.split(per_request)):
            noisy = x + part.to(x.device)
            answer = yield embeddings.rows(b + weight.to(x.device) * (noisy - b))
            total += ((noisy - b).double().unsqueeze(0) * embeddings.per_output(answer)).sum(1)
    return embeddings.result(total / params["n_samples"], "sum")


@register_method(AttributionMethod.INPUT_X_GRADIENT, kind="gradient", additive=True, params=MethodParams,
                 description="input embedding times gradient, summed over the hidden dimension")
def input_x_gradient(context: MethodContext) -> Plan:
    embeddings = _Embeddings(context)
    answer = yield embeddings.rows(embeddings.inputs.unsqueeze(0))
    return embeddings.result(embeddings.inputs.double() * embeddings.per_output(answer)[:, 0], "sum",
                             target_score=embeddings.score(answer))


@register_method(AttributionMethod.SALIENCY, kind="gradient", additive=False, params=MethodParams,
                 description="L2 norm of the gradient")
def saliency(context: MethodContext) -> Plan:
    embeddings = _Embeddings(context)
    answer = yield embeddings.rows(embeddings.inputs.unsqueeze(0))
    return embeddings.result(embeddings.per_output(answer)[:, 0], "l2", target_score=embeddings.score(answer))


def _noisy_gradients(context: MethodContext, statistic: Literal["mean", "square", "variance"]) -> Plan:
    """Running sums of the gradient (and its square) at noisy copies of the input -> the SmoothGrad family."""
    params = context.params
    embeddings = _Embeddings(context)
    embeddings.check_budget(f"{statistic} of noisy gradients", params["n_samples"], params["max_evaluations"],
                            "lower n_samples")
    x = embeddings.inputs
    shape = (len(embeddings.outputs), *x.shape)
    total = torch.zeros(shape, dtype=torch.float64, device=x.device)
    squares = torch.zeros(shape, dtype=torch.float64, device=x.device)
    stdev = float(params["noise_std"]) * float(x.std())
    per_request = embeddings.points_per_request(SAMPLES_PER_REQUEST)
    for noise in noise_chunks(_seed(params), params["n_samples"], tuple(x.shape), stdev):
        for part in noise.split(per_request):
            answer = yield embeddings.rows(x + part.to(x.device))
            gradients = embeddings.per_output(answer)
            total += gradients.sum(1)
            squares += gradients.square().sum(1)
    mean, mean_square = total / params["n_samples"], squares / params["n_samples"]
    if statistic == "mean":
        return embeddings.result(mean, "l2")
    if statistic == "square":
        return embeddings.result(mean_square, "sum")
    return embeddings.result((mean_square - mean.square()).clamp(min=0.0), "sum")


@register_method(AttributionMethod.SMOOTH_GRAD, kind="gradient", additive=False, params=NoiseParams,
                 description="L2 norm of the gradient averaged over noisy copies of the input")
def smooth_grad(context: MethodContext) -> Plan:
    return (yield from _noisy_gradients(context, "mean"))


@register_method(AttributionMethod.SQUARE_GRAD, kind="gradient", additive=False, params=NoiseParams,
                 description="mean squared gradient over noisy copies, summed over the hidden dimension")
def square_grad(context: MethodContext) -> Plan:
    return (yield from _noisy_gradients(context, "square"))


@register_method(AttributionMethod.VAR_GRAD, kind="gradient", additive=False, params=NoiseParams,
                 description="variance of the gradient over noisy copies, summed over the hidden dimension")
def var_grad(context: MethodContext) -> Plan:
    return (yield from _noisy_gradients(context, "variance"))
