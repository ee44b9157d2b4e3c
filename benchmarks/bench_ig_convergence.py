"""Integrated gradients' path integral at defaults: evaluations used and relative completeness error, per model.

For the embedded SmolLM2 and tiny random Gemma 3, Llama and Qwen 3 models built from configs (2 layers, hidden size
64, SmolLM2's tokenizer, seeded), the integrand of integrated gradients on the demo (word granularity, zero
baseline) is built by hand as the library builds it: the attributable input embeddings x, the straight path
alpha x, the explained score f (sum of target log-probs) and its gradient by autograd. ``integrate`` from
``methods/_quadrature.py`` is driven with it: the adaptive rule at its defaults (tolerance 0.01, max_steps 256)
and the fixed Gauss-Legendre rule at 16, 32 and 64 steps. Error = |integral of df/dalpha - (f(x) - f(0))| /
|f(x) - f(0)|. Target (issue 12): every adaptive error below 1%, and no more than 64 evaluations on SmolLM2.

Run: ``python -m benchmarks.bench_ig_convergence`` (or ``python benchmarks/run_all.py ig_convergence``).
"""

from __future__ import annotations

import os
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import (  # noqa: E402
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from fair_forge.explainability import AttributionExplainer, load_default_model  # noqa: E402
from fair_forge.explainability.methods import MethodContext  # noqa: E402
from fair_forge.explainability.methods._quadrature import Integral, integrate  # noqa: E402
from fair_forge.explainability.methods.gradient import _EmbeddingTask  # noqa: E402
from fair_forge.explainability.models import borrowed  # noqa: E402
from fair_forge.explainability.scoring import TargetScorer  # noqa: E402

THREADS = 2
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
TARGET = "The capital of France is Paris."
FIXED_STEPS = (16, 32, 64)
ROWS_PER_CALL = 32
TARGET_ERROR = 0.01
TARGET_SMOLLM2_STEPS = 64


def tiny_model(architecture: str, vocab_size: int) -> torch.nn.Module:
    """A seeded random 2-layer model of ``architecture`` (hidden size 64), built from its config."""
    torch.manual_seed(0)
    sizes = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    if architecture == "gemma3":
        return Gemma3ForCausalLM(Gemma3TextConfig(head_dim=16, sliding_window=64, **sizes)).eval()
    if architecture == "qwen3":
        return Qwen3ForCausalLM(Qwen3Config(head_dim=16, **sizes)).eval()
    return LlamaForCausalLM(LlamaConfig(**sizes)).eval()


class PathIntegrand:
    """(d f / d alpha, per-token contributions) at points alpha x of the zero-baseline path, and f(x) - f(0)."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any) -> None:
        request = AttributionExplainer(model, tokenizer)._prepare(
            MESSAGES, None, TARGET, "integrated_gradients", "word", {})
        context = MethodContext(TargetScorer(model), request.model_input, request.features, request.params)
        self.task = _EmbeddingTask(context)
        self.inputs = self.task.inputs.detach()
        with torch.no_grad():
            ends = self.task.forward(torch.cat([self.inputs, torch.zeros_like(self.inputs)]))
        self.total = float(ends[0] - ends[1])

    def __call__(self, alphas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        contributions = []
        for start in range(0, len(alphas), ROWS_PER_CALL):
            chunk = torch.as_tensor(alphas[start:start + ROWS_PER_CALL], dtype=self.inputs.dtype)
            points = (chunk.view(-1, 1, 1) * self.inputs).requires_grad_(True)
            with torch.enable_grad():
                (gradients,) = torch.autograd.grad(self.task.forward(points).sum(), points)
            contributions.append((self.inputs * gradients).sum(-1).double().numpy())
        vector = np.concatenate(contributions)
        return vector.sum(-1), vector


def drive(rule: Any, integrand: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]) -> Integral:
    """Feed the rule's points to ``integrand`` until it returns its Integral."""
    alphas = next(rule)
    while True:
        try:
            alphas = rule.send(integrand(alphas))
        except StopIteration as stop:
            return stop.value


def measure(name: str, model: torch.nn.Module, tokenizer: Any) -> dict[str, Any]:
    with borrowed(model):
        integrand = PathIntegrand(model, tokenizer)
        adaptive = drive(integrate(integrand.total), integrand)
        row: dict[str, Any] = {
            "model": name,
            "f(x)-f(0)": round(integrand.total, 4),
            "adaptive_steps": adaptive.n_evaluations,
            "adaptive_error": adaptive.error,
            "converged": adaptive.converged,
        }
        for steps in FIXED_STEPS:
            row[f"GL{steps}_error"] = drive(integrate(integrand.total, n_steps=steps), integrand).error
    limit = TARGET_SMOLLM2_STEPS if name == "SmolLM2-135M-Instruct" else None
    row["meets_target"] = adaptive.error is not None and adaptive.error < TARGET_ERROR and (
        limit is None or adaptive.n_evaluations <= limit)
    return row


def main() -> dict[str, Any]:
    torch.set_num_threads(THREADS)
    model, tokenizer = load_default_model()
    rows = [measure(f"tiny {architecture}", tiny_model(architecture, len(tokenizer)), tokenizer)
            for architecture in ("gemma3", "llama", "qwen3")]
    rows.append(measure("SmolLM2-135M-Instruct", model, tokenizer))
    return {"rows": rows, "all_meet_target": all(row["meets_target"] for row in rows)}


if __name__ == "__main__":
    from benchmarks.run_all import format_rows

    print(format_rows(main()["rows"]))
