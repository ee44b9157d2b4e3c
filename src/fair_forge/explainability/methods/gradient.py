"""Gradient methods through captum, on the input embeddings of the attributable tokens.

captum sees only the embeddings of the attributable tokens, shape (1, A, H); the forward function writes them into
the full sequence (template and target tokens fixed) and returns the explained score. So baselines, noise and
interpolation touch only what is attributed, and for the additive methods the token scores add up exactly to
f(input) - f(baseline). Interpolation steps and noise samples go through the model in batches of ``batch_size``
rows, one forward and one backward pass per batch. Noise and random interpolation points (SMOOTH_GRAD, SQUARE_GRAD,
VAR_GRAD, GRADIENT_SHAP) come from a generator seeded by ``seed``, so results do not depend on the batch size or on
the global RNG (captum's NoiseTunnel draws per batch from the global RNG, which would make them depend on both).

Reduction over the hidden dimension, per method (and the same reduction over a feature's tokens):
  additive (INTEGRATED_GRADIENTS, GRADIENT_SHAP, INPUT_X_GRADIENT): signed sum of (x - baseline) * gradient;
  SALIENCY, SMOOTH_GRAD: L2 norm of the (mean) gradient;
  SQUARE_GRAD, VAR_GRAD: sum over dimensions of the mean squared gradient / of the gradient's variance.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Literal, Optional

import numpy as np
import torch
from captum.attr import InputXGradient, IntegratedGradients, Saliency

from ..types import AttributionMethod
from . import MethodContext, RawAttribution, register_method

Reduction = Literal["sum", "l2"]
TOKENS_PER_BATCH = 4096  # default batch: as many rows (steps, samples) as fit this many tokens

# batch_size=None sizes batches by TOKENS_PER_BATCH; noise_std is relative to the std of the input embeddings
_STEP_PARAMS = {"n_steps": 64, "baseline": "zero", "batch_size": None}
NOISE_SAMPLES = 16  # default (and n_samples=None) number of noisy samples
_NOISE_PARAMS = {"n_samples": NOISE_SAMPLES, "noise_std": 0.1, "seed": 0, "batch_size": None}
_SHAP_PARAMS = {"n_samples": NOISE_SAMPLES, "noise_std": 0.0, "baseline": "zero", "seed": 0, "batch_size": None}
_PLAIN_PARAMS = {"batch_size": None}


def _batch_rows(context: MethodContext) -> int:
    """Rows per model call: the ``batch_size`` parameter, or as many as fit ``TOKENS_PER_BATCH`` tokens."""
    if context.params["batch_size"] is None:
        return max(1, TOKENS_PER_BATCH // context.model_input.length)
    return int(context.params["batch_size"])


class _EmbeddingTask:
    """The pieces every gradient method shares: the attributable embeddings and a forward function over them."""

    def __init__(self, context: MethodContext) -> None:
        self.context = context
        scorer, model_input = context.scorer, context.model_input
        self.positions = torch.from_numpy(np.flatnonzero(model_input.attributable))
        scorer.embedding_layer()  # typed error for models without input embeddings, before any model call
        # the tokens before the first attributable one never change: the scorer runs them once (prefix cache)
        self.prefix = scorer.prefix(model_input.input_ids, int(self.positions[0]))
        start = self.prefix.length if self.prefix is not None else 0
        self.full = scorer.embed(model_input.input_ids[start:]).float()  # (L - start, H); float32 gradients
        self._positions_on_device = (self.positions - start).to(self.full.device)
        self.inputs = self.full[self._positions_on_device].unsqueeze(0)  # (1, A, H)
        self.target_ids = model_input.target_ids
        self.n_target = model_input.n_target

    def forward(self, attributed: torch.Tensor, per_target: bool = False) -> torch.Tensor:
        """(B, A, H) attributable embeddings -> (B,) explained score, or (B, n_target) log-probs."""
        scorer = self.context.scorer
        batch = self.full.unsqueeze(0).expand(attributed.shape[0], -1, -1).clone()
        batch[:, self._positions_on_device] = attributed
        if torch.is_grad_enabled() and attributed.requires_grad:
            scorer.count.backward_passes += 1  # captum differentiates every forward it makes with grad enabled
        if per_target:
            return scorer.target_log_probs(self.target_ids, inputs_embeds=batch, prefix=self.prefix)
        return scorer.score_embeddings(self.target_ids, batch, self.prefix)

    def baseline(self, spec: Any) -> torch.Tensor:
        """(1, A, H) baseline: "zero", "pad" (the input's baseline token) or a token id, at every attributed token."""
        if spec == "zero":
            return torch.zeros_like(self.inputs)
        if spec == "pad":
            spec = self.context.model_input.baseline_token_id
        embedding = self.context.scorer.embed(torch.tensor([int(spec)])).float()
        return embedding.expand_as(self.inputs[0]).unsqueeze(0).clone()

    def runs(self) -> Iterator[tuple[torch.Tensor, Optional[torch.Tensor], Callable[..., torch.Tensor]]]:
        """(inputs, captum target, forward) for the sequence score, then per target token if a matrix is asked."""
        yield self.inputs.clone().requires_grad_(True), None, self.forward
        if self.context.per_target:
            repeated = self.inputs.expand(self.n_target, -1, -1).clone().requires_grad_(True)
            targets = torch.arange(self.n_target, device=repeated.device)  # captum gathers on the output's device
            yield repeated, targets, lambda x: self.forward(x, per_target=True)

    def feature_scores(self, attributions: torch.Tensor, reduction: Reduction) -> np.ndarray:
        """(..., A, H) attributions -> (..., n_features): sum, or L2 norm over each feature's tokens and dims."""
        index = {int(p): i for i, p in enumerate(self.positions)}
        membership = torch.zeros(len(self.context.features), len(index), dtype=torch.float64)
        for row, feature in enumerate(self.context.features):
            membership[row, [index[p] for p in feature.token_positions]] = 1.0
        values = attributions.detach().double().cpu()
        if reduction == "sum":
            return (values.sum(-1) @ membership.T).numpy()
        return (values.square().sum(-1) @ membership.T).sqrt().numpy()


def _sample_gradients(
    fn: Callable[..., torch.Tensor], points: torch.Tensor, target: Optional[torch.Tensor], rows: int
) -> torch.Tensor:
    """Gradients of ``fn`` at (S, R, A, H) ``points`` (S samples of R inputs), ``rows`` points per model call."""
    samples, inputs = points.shape[:2]
    flat = points.reshape(samples * inputs, *points.shape[2:])
    targets = None if target is None else target.repeat(samples)
    saliency = Saliency(fn)
    gradients = [
        saliency.attribute(flat[i : i + rows].clone().requires_grad_(True), abs=False,
                           target=None if targets is None else targets[i : i + rows])
        for i in range(0, flat.shape[0], rows)
    ]
    return torch.cat(gradients).reshape(points.shape)


def _gaussian(context: MethodContext, task: _EmbeddingTask, shape: tuple[int, ...]) -> torch.Tensor:
    """Noise of std ``noise_std`` x std(input embeddings), from a generator seeded by ``seed``.

    Drawn on the CPU from its own generator: independent of the global RNG, of the device and of the batch size.
    """
    generator = torch.Generator().manual_seed(int(context.params["seed"]))
    stdev = float(context.params["noise_std"]) * float(task.inputs.std())
    return (torch.randn(shape, generator=generator) * stdev).to(task.inputs.device)


def _collect(task: _EmbeddingTask, attribute: Callable[..., torch.Tensor], reduction: Reduction) -> RawAttribution:
    """Run ``attribute(inputs, target, forward)`` for the sequence score (and per target token) and reduce."""
    results = [task.feature_scores(attribute(x, target, fn), reduction) for x, target, fn in task.runs()]
    return RawAttribution(feature_scores=results[0][0], matrix=results[1] if len(results) > 1 else None)


@register_method(AttributionMethod.INTEGRATED_GRADIENTS, kind="gradient", additive=True, defaults=_STEP_PARAMS,
                 description="path integral of gradients from a baseline (Gauss-Legendre quadrature)")
def integrated_gradients(context: MethodContext) -> RawAttribution:
    n_steps = int(context.params["n_steps"])
    batch_size = _batch_rows(context)
    task = _EmbeddingTask(context)
    baseline = task.baseline(context.params["baseline"])

    def attribute(x: torch.Tensor, target: Optional[torch.Tensor], fn: Callable[..., torch.Tensor]) -> torch.Tensor:
        ig = IntegratedGradients(fn, multiply_by_inputs=True)
        return ig.attribute(x, baselines=baseline.expand_as(x), target=target, n_steps=n_steps,
                            method="gausslegendre", internal_batch_size=max(batch_size, x.shape[0]))

    raw = _collect(task, attribute, "sum")
    with torch.no_grad():
        endpoints = task.forward(torch.cat([task.inputs, baseline]))
    difference = float(endpoints[0] - endpoints[1])
    delta = abs(float(raw.feature_scores.sum()) - difference)
    raw.metadata.update(
        convergence_delta=delta,
        relative_convergence_delta=delta / abs(difference) if difference else None,
        score_input=float(endpoints[0]),
        score_baseline=float(endpoints[1]),
    )
    return raw


@register_method(AttributionMethod.GRADIENT_SHAP, kind="gradient", additive=True, defaults=_SHAP_PARAMS,
                 description="expected gradients at random points between baseline and (noisy) input")
def gradient_shap(context: MethodContext) -> RawAttribution:
    n_samples = int(context.params["n_samples"] or NOISE_SAMPLES)
    task = _EmbeddingTask(context)
    baseline = task.baseline(context.params["baseline"])

    def attribute(x: torch.Tensor, target: Optional[torch.Tensor], fn: Callable[..., torch.Tensor]) -> torch.Tensor:
        # E[(x + noise - b) * grad f(b + alpha (x + noise - b))], alpha ~ U(0, 1): captum's GradientShap estimator,
        # sampled from a seeded generator so that batch size and global RNG do not change the result
        noisy = x.unsqueeze(0) + _gaussian(context, task, (n_samples, *x.shape))
        generator = torch.Generator().manual_seed(int(context.params["seed"]) + 1)
        alphas = torch.rand((n_samples, x.shape[0], 1, 1), generator=generator).to(x.device)
        points = baseline + alphas * (noisy - baseline)
        gradients = _sample_gradients(fn, points, target, _batch_rows(context))
        return ((noisy - baseline) * gradients).mean(0)

    return _collect(task, attribute, "sum")


@register_method(AttributionMethod.INPUT_X_GRADIENT, kind="gradient", additive=True, defaults=_PLAIN_PARAMS,
                 description="input embedding times gradient, summed over the hidden dimension")
def input_x_gradient(context: MethodContext) -> RawAttribution:
    task = _EmbeddingTask(context)
    return _collect(task, lambda x, target, fn: InputXGradient(fn).attribute(x, target=target), "sum")


@register_method(AttributionMethod.SALIENCY, kind="gradient", additive=False, defaults=_PLAIN_PARAMS,
                 description="L2 norm of the gradient")
def saliency(context: MethodContext) -> RawAttribution:
    task = _EmbeddingTask(context)
    return _collect(task, lambda x, target, fn: Saliency(fn).attribute(x, target=target, abs=False), "l2")


def _noisy_gradients(context: MethodContext, reduction: Reduction,
                     statistic: Callable[[torch.Tensor], torch.Tensor]) -> RawAttribution:
    """``statistic`` over the sample axis of gradients at noisy copies of the input (SmoothGrad family)."""
    n_samples = int(context.params["n_samples"] or NOISE_SAMPLES)
    task = _EmbeddingTask(context)

    def attribute(x: torch.Tensor, target: Optional[torch.Tensor], fn: Callable[..., torch.Tensor]) -> torch.Tensor:
        points = x.unsqueeze(0) + _gaussian(context, task, (n_samples, *x.shape))
        return statistic(_sample_gradients(fn, points, target, _batch_rows(context)))

    return _collect(task, attribute, reduction)


@register_method(AttributionMethod.SMOOTH_GRAD, kind="gradient", additive=False, defaults=_NOISE_PARAMS,
                 description="L2 norm of the gradient averaged over noisy copies of the input")
def smooth_grad(context: MethodContext) -> RawAttribution:
    return _noisy_gradients(context, "l2", lambda g: g.mean(0))


@register_method(AttributionMethod.SQUARE_GRAD, kind="gradient", additive=False, defaults=_NOISE_PARAMS,
                 description="mean squared gradient over noisy copies, summed over the hidden dimension")
def square_grad(context: MethodContext) -> RawAttribution:
    return _noisy_gradients(context, "sum", lambda g: g.square().mean(0))


@register_method(AttributionMethod.VAR_GRAD, kind="gradient", additive=False, defaults=_NOISE_PARAMS,
                 description="variance of the gradient over noisy copies, summed over the hidden dimension")
def var_grad(context: MethodContext) -> RawAttribution:
    return _noisy_gradients(context, "sum", lambda g: g.var(0, unbiased=False))
