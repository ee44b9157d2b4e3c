"""Gradient methods against a direct autograd computation of their definitions (and captum's IntegratedGradients).

The explained function is f(e) = sum of the target tokens' log-probs when the attributable tokens' input embeddings
are e (A x H) and every other token keeps its own; the reference evaluates it with one plain forward pass of a float64
copy of the model over full embedding sequences. The library runs the same float64 model (``tolerances.to_float64``)
with its prefix cache and batching, so agreement to a float64 rounding bound means both compute the same mathematics
(a different noise draw or formula is off by tens of percent).

The noise contract of the sampled methods (what a user relies on for reproducible results, whatever the batching):
  * noise = ``torch.randn((n_samples, 1, A, H), generator=torch.Generator().manual_seed(seed))`` times
    ``noise_std * std(e)``, with std over every entry of the attributable embeddings e (torch.std, Bessel-corrected),
    drawn on the CPU in float32, independent of the global RNG and of ``batch_size``;
  * GRADIENT_SHAP's interpolation points alpha = ``torch.rand((n_samples, 1, 1, 1), generator=torch.Generator()
    .manual_seed(seed + 1))``, its noise as above (``noise_std`` 0 by default).
Definitions per token (reduced over the hidden dimension H and, the same way, over a feature's tokens; a token
feature may hold a whitespace token with the next one; g_s = grad f at sample s):
  SMOOTH_GRAD  ||mean_s g_s(e + noise_s)||_2            SQUARE_GRAD  sum_H mean_s g_s(e + noise_s)^2
  VAR_GRAD     sum_H var_s g_s(e + noise_s) (population)
  GRADIENT_SHAP sum_H mean_s (e + noise_s - b) * g_s(b + alpha_s (e + noise_s - b)), baseline b = 0
  INTEGRATED_GRADIENTS  sum_H of captum's IntegratedGradients(f) with a zero baseline, Gauss-Legendre nodes
"""

from __future__ import annotations

import copy
from typing import Callable

import numpy as np
import pytest
import torch
from captum.attr import IntegratedGradients
from tolerances import ESTIMATOR_CONDITION, log_prob_magnitude, model_bound, to_float64
from zoo import ZooModel, build_zoo_model

from fair_forge.explainability import AttributionExplainer, AttributionResult

N_SAMPLES, NOISE_STD, SEED = 5, 0.3, 7


def assert_close_to_reference(actual: list[float], expected: np.ndarray, f: "ExplainedFunction") -> None:
    """Equal up to float64 rounding of the explained score (``tolerances.model_bound``) times what the methods
    amplify it by (``tolerances.ESTIMATOR_CONDITION``): the same mathematics, not a different noise draw or formula."""
    assert np.abs(expected).max() > 0
    bound = model_bound(f.model, log_prob_magnitude(f.model, f.ids), length=len(f.ids), terms=f.n_target)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=ESTIMATOR_CONDITION * bound)


class ExplainedFunction:
    """f(e) for one explained input, computed directly from a float64 copy of the model."""

    def __init__(self, zoo_model: ZooModel, result: AttributionResult) -> None:
        tokenizer = zoo_model.tokenizer
        inputs = zoo_model.example
        if "messages" in inputs:
            text = tokenizer.apply_chat_template(inputs["messages"], tokenize=False, add_generation_prompt=True)
            ids = tokenizer(text + inputs["target"], add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer(f"{inputs['prompt']} {inputs['target']}")["input_ids"]
        self.ids = torch.tensor(ids)
        self.n_target = result.metadata.n_target_tokens
        self.features = [list(a.token_positions) for a in result.attributions]
        self.positions = torch.tensor([p for feature in self.features for p in feature])
        with torch.no_grad():
            embeddings = zoo_model.model.get_input_embeddings()(self.ids)  # what the library starts from
        self.embeddings32 = embeddings[self.positions]  # (A, H), in the library's dtype (float64 here)
        self.model = to_float64(copy.deepcopy(zoo_model.model)).eval()
        self.full = embeddings.double()

    def per_feature(self, values: torch.Tensor, reduction: str) -> np.ndarray:
        """(A, H) per-entry values -> per-feature score: sum, or L2 norm, over the feature's tokens and H."""
        index = {int(p): i for i, p in enumerate(self.positions)}
        rows = [values[[index[p] for p in feature]] for feature in self.features]
        if reduction == "sum":
            return np.array([float(row.sum()) for row in rows])
        return np.array([float(row.square().sum().sqrt()) for row in rows])

    @property
    def inputs(self) -> torch.Tensor:
        return self.embeddings32.double()

    def __call__(self, attributed: torch.Tensor) -> torch.Tensor:
        """(B, A, H) attributable embeddings -> (B,) sum of target log-probs."""
        batch = self.full.unsqueeze(0).repeat(attributed.shape[0], 1, 1)
        batch[:, self.positions] = attributed
        logits = self.model(inputs_embeds=batch).logits[:, :-1].log_softmax(-1)
        targets = self.ids[1:].expand(attributed.shape[0], -1).unsqueeze(-1)
        return logits.gather(-1, targets).squeeze(-1)[:, -self.n_target:].sum(-1)

    def gradients(self, points: torch.Tensor) -> torch.Tensor:
        """(S, A, H) gradients of f at (S, A, H) points."""
        points = points.detach().clone().requires_grad_(True)
        self(points).sum().backward()
        return points.grad


def noise(f: ExplainedFunction, noise_std: float = NOISE_STD) -> torch.Tensor:
    """(S, A, H) noise as the contract in the module docstring draws it."""
    generator = torch.Generator().manual_seed(SEED)
    draws = torch.randn((N_SAMPLES, 1, *f.embeddings32.shape), generator=generator)
    return (draws * (noise_std * float(f.embeddings32.std()))).squeeze(1).double()


def smooth_grad(f: ExplainedFunction) -> np.ndarray:
    return f.per_feature(f.gradients(f.inputs + noise(f)).mean(0), "l2")


def square_grad(f: ExplainedFunction) -> np.ndarray:
    return f.per_feature(f.gradients(f.inputs + noise(f)).square().mean(0), "sum")


def var_grad(f: ExplainedFunction) -> np.ndarray:
    return f.per_feature(f.gradients(f.inputs + noise(f)).var(0, unbiased=False), "sum")


def gradient_shap(f: ExplainedFunction) -> np.ndarray:
    alphas = torch.rand((N_SAMPLES, 1, 1, 1), generator=torch.Generator().manual_seed(SEED + 1)).squeeze(1).double()
    shifted = f.inputs + noise(f)  # baseline zero
    return f.per_feature((shifted * f.gradients(alphas * shifted)).mean(0), "sum")


REFERENCES: dict[str, tuple[Callable[[ExplainedFunction], np.ndarray], dict]] = {
    "smooth_grad": (smooth_grad, {"noise_std": NOISE_STD}),
    "square_grad": (square_grad, {"noise_std": NOISE_STD}),
    "var_grad": (var_grad, {"noise_std": NOISE_STD}),
    "gradient_shap": (gradient_shap, {"noise_std": NOISE_STD, "baseline": "zero"}),
}


@pytest.fixture(scope="module", params=["gpt2", "gemma3"])
def zoo_model(request: pytest.FixtureRequest) -> ZooModel:
    """GPT-2 from a raw prompt (no prefix cache); Gemma 3 with its chat template (scaled embeddings, prefix cache);
    in float64, RMSNorm included, so the library and the reference differ only in float64 rounding."""
    zoo_model = build_zoo_model(request.param)
    to_float64(zoo_model.model)
    return zoo_model


def _explain(zoo_model: ZooModel, method: str, **params) -> AttributionResult:
    explainer = AttributionExplainer(zoo_model.model, zoo_model.tokenizer)
    return explainer.explain(**zoo_model.example, method=method, granularity="token", **params)


@pytest.mark.parametrize("method", REFERENCES)
def test_noisy_gradient_methods_match_their_definition(zoo_model: ZooModel, method: str) -> None:
    reference, params = REFERENCES[method]
    # batch_size=2 splits the 5 samples over three model calls: the noise must not depend on it
    result = _explain(zoo_model, method, n_samples=N_SAMPLES, seed=SEED, batch_size=2, **params)
    f = ExplainedFunction(zoo_model, result)
    assert_close_to_reference(result.scores, reference(f), f)


def test_integrated_gradients_match_captum(zoo_model: ZooModel) -> None:
    result = _explain(zoo_model, "integrated_gradients", n_steps=16, baseline="zero")
    f = ExplainedFunction(zoo_model, result)
    inputs = f.inputs.unsqueeze(0)
    captum = IntegratedGradients(f).attribute(inputs, baselines=torch.zeros_like(inputs), n_steps=16,
                                               method="gausslegendre")
    expected = f.per_feature(captum[0].detach(), "sum")
    assert_close_to_reference(result.scores, expected, f)
