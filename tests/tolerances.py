"""Tolerances derived from rounding error, for tests that compare two computations of one quantity.

Two computations that differ only in rounding (the order of a sum: rows padded together, batch shapes, thread
counts, BLAS kernels; or float32 against float64) agree to what their rounding allows, and that follows from the
computation rather than from one machine's results:

``sum_bound``    a sum of n terms in any order is within gamma(n-1) * sum|x_i| of the exact sum, gamma(k) =
                 k*u / (1 - k*u) (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., eq. 4.4), so two
                 orders differ by at most twice that. Rigorous.
``model_bound``  a value a model computes is a chain of such sums: per layer the projections (over the hidden and
                 the intermediate size) and attention (over the sequence), then the output layer and the
                 log-sum-exp over the vocabulary. Worst-case bounds compound to nothing useful over a network, so
                 each sum of n terms is charged LAMBDA * sqrt(n) * u, the bound that independent rounding errors
                 stay within with probability >= 1 - 2 exp(-LAMBDA^2 / 2) (Higham & Mary, "A new approach to
                 probabilistic rounding error analysis", SIAM J. Sci. Comput. 41(5), 2019), each measured against
                 the output's own magnitude (normalised layers keep activations at that scale; the log-sum-exp, a
                 sum of probabilities, against 1). A stated model, not a theorem: it is 100-1000x what two
                 summation orders produce on the models tested (the tiny test models, SmolLM2), and far below what
                 a bug does (a padding slot that leaks into attention, a position off by one, a wrong cache length
                 move a log-prob by 1e-3 or more).

In float64 either bound is ~1e-9 of float32's, which is why tests of a mathematical identity (packed rows equal
single rows, a cached prefix equals recomputing it, deleting tokens equals scoring the shorter text) run their
model in float64 (``to_float64``): the identity is then checked to ~1e-12 instead of to float32's noise. A float64
model is not float64 throughout by itself: transformers' Llama-family RMSNorm computes in float32 whatever the
dtype, so ``to_float64`` makes those layers compute in the model's dtype, and ``model_bound`` charges float32 for
any such layer left (``float32_islands``). The rotary tables stay float32, but they depend only on the positions,
which the layouts compared share.
"""

from __future__ import annotations

import math
from typing import Any, Union

import numpy as np
import torch

LAMBDA = 6.0  # probabilistic bound's multiplier: a sum exceeds it with probability below 2 exp(-18) ~ 3e-8
# How much an attribution estimator may amplify an error in the scores it is built from (|d attribution| per
# |d score|): differences of two scores (occlusion: 2), least-squares fits over >= 2 rows per feature (LIME,
# KernelSHAP: their design's pseudo-inverse, below 10^2 here), path sums and sample means of gradients (<= 1 per
# score-sized term), Sobol indices ((2 sqrt(2 S) + 4 S) / sqrt(Var f) per unit of score error, first order: up to
# ~10^3 on the tiny random models, whose features move the score by ~1e-3 of its size). 10^4 covers all of them.
ESTIMATOR_CONDITION = 1e4

DType = Union[torch.dtype, np.dtype, type, str]


def unit_roundoff(dtype: DType = torch.float32) -> float:
    """u = 2^-p for a dtype with p significand bits: 2^-24 for float32, 2^-53 for float64."""
    if isinstance(dtype, torch.dtype):
        return float(torch.finfo(dtype).eps) / 2
    return float(np.finfo(np.dtype(dtype)).eps) / 2


def sum_bound(absolute_sum: Any, terms: int, dtype: DType = torch.float64) -> Any:
    """Largest |a - b| for two evaluations, in any order, of one sum of ``terms`` values whose absolute values add up
    to ``absolute_sum`` (Higham eq. 4.4, both sides). Rigorous. ``absolute_sum`` may be an array (one sum each)."""
    k = max(int(terms) - 1, 1)
    u = unit_roundoff(dtype)
    return 2.0 * k * u / (1.0 - k * u) * absolute_sum


def chain_length(model: Any, length: int) -> float:
    """Sum of sqrt(n) over the sums one output of ``model`` passes through on a sequence of ``length`` tokens: per
    layer the hidden-size and intermediate-size projections and attention over the sequence, then the output layer
    (sizes read from the transformers config)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    hidden = int(getattr(config, "hidden_size", None) or config.n_embd)
    intermediate = int(getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden)
    layers = int(getattr(config, "num_hidden_layers", None) or config.n_layer)
    per_layer = math.sqrt(hidden) + math.sqrt(intermediate) + math.sqrt(max(int(length), 1))
    return layers * per_layer + math.sqrt(hidden)


def _upcasting_rms_norm(module: torch.nn.Module) -> bool:
    """A transformers RMSNorm (they compute in float32 whatever the dtype) that ``to_float64`` has not patched."""
    return type(module).__name__.endswith("RMSNorm") and "forward" not in module.__dict__


def float32_islands(model: Any) -> int:
    """Layers of ``model`` that compute in float32 even when the model is float64 (see ``to_float64``)."""
    return sum(1 for module in model.modules() if _upcasting_rms_norm(module))


def _llama_rms_norm(self: Any, hidden_states: torch.Tensor) -> torch.Tensor:
    """Llama's RMSNorm (weight * x / rms(x)) in the input's dtype."""
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def _gemma_rms_norm(self: Any, hidden_states: torch.Tensor) -> torch.Tensor:
    """Gemma's RMSNorm ((1 + weight) * x / rms(x)) in the input's dtype."""
    return self._norm(hidden_states) * (1.0 + self.weight)


def to_float64(model: Any) -> Any:
    """``model.double()``, with its upcasting RMSNorm layers (Llama's, Gemma's) computing in float64 as well (an
    instance-level ``forward``: the same function in the model's dtype), so that rounding is float64's throughout;
    other RMSNorm kinds stay float32 and ``model_bound`` charges them. Returns the model."""
    import types

    model.double()
    for module in model.modules():
        if not _upcasting_rms_norm(module):
            continue
        if hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(_llama_rms_norm, module)
        elif type(module).__name__.startswith("Gemma") and hasattr(module, "_norm"):
            module.forward = types.MethodType(_gemma_rms_norm, module)
    return model


def model_bound(model: Any, magnitude: float, *, length: int, terms: int = 1, dtype: DType | None = None,
                log_softmax: bool = True) -> float:
    """Largest |a - b| for two evaluations of the sum of ``terms`` outputs of ``model`` (each of size at most
    ``magnitude``, e.g. a target token's log-prob) on ``length``-token sequences that differ only in rounding, in
    ``dtype`` (default: the model's). The probabilistic per-sum model of this module, for both sides; a layer that
    computes in float32 inside a float64 model (``float32_islands``) is charged its hidden-size sum in float32.
    ``log_softmax``: each output ends in a log-sum-exp over the vocabulary, a sum of probabilities (terms <= 1, total
    1), charged LAMBDA sqrt(V) u in absolute terms; an encoder's output (a similarity) does not."""
    if dtype is None:
        dtype = next(model.parameters()).dtype
    if dtype in (torch.float16, torch.bfloat16):
        raise ValueError("half-precision models run their log-softmax in float32; bound them by hand")
    steps = chain_length(model, length) * unit_roundoff(dtype)
    if unit_roundoff(dtype) < unit_roundoff(torch.float32):
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        hidden = int(getattr(config, "hidden_size", None) or config.n_embd)
        steps += float32_islands(model) * math.sqrt(hidden) * unit_roundoff(torch.float32)
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    vocabulary = math.sqrt(int(config.vocab_size)) * unit_roundoff(dtype) if log_softmax else 0.0
    return 2.0 * int(terms) * LAMBDA * (steps * float(magnitude) + vocabulary)


def log_prob_magnitude(model: Any, input_ids: torch.Tensor) -> float:
    """An upper bound on |log p| of any token at any position of ``input_ids`` (1-d): log(vocab) plus the spread of
    the logits there, since log p_t = z_t - logsumexp(z) >= min z - max z - log V. The magnitude ``model_bound``
    charges the sums that end in a log-prob."""
    with torch.no_grad():
        logits = model(input_ids=input_ids[None].to(next(model.parameters()).device)).logits[0].double()
    spread = float((logits.amax(-1) - logits.amin(-1)).max())
    return math.log(logits.shape[-1]) + spread
