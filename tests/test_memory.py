"""The activation-memory estimate against measured peaks, the budget, and checkpointed layers.

Peaks are measured on the CPU with the torch profiler's allocation events (``profile_memory=True``): every
allocation and free made during the call, in time order, summed; the peak of that running sum is the most memory the
call held at once on top of what existed before it (weights, the prefix cache). That is what the estimate bounds.
"""

from __future__ import annotations

import warnings
from typing import Callable

import numpy as np
import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from tolerances import ESTIMATOR_CONDITION, log_prob_magnitude, model_bound, to_float64

from fair_forge.explainability.errors import InvalidInputError
from fair_forge.explainability.runtime import memory
from fair_forge.explainability.runtime.memory import (
    CallEstimate,
    MemoryBudgetWarning,
    ModelShape,
    call_estimate,
    checkpointed_layers,
    memory_budget,
    rows_per_call,
)
from fair_forge.explainability.text.prompt import ModelInput
from fair_forge.explainability.runtime.packer import score_embedding_requests, score_row_requests
from fair_forge.explainability.runtime.requests import EmbeddingRows, MaskedRows
from fair_forge.explainability.runtime.scorer import TargetScorer

N_TARGET = 10
SHAPES = [(1, 64, 0), (4, 100, 20), (2, 120, 0), (3, 30, 90)]  # (rows, length after the prefix, prefix)


def measured_peak(call: Callable[[], object]) -> int:
    """Most bytes held at once by the allocations ``call`` makes (running sum of the profiler's memory events)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        call()
    events = [event for event in profiler.profiler.kineto_results.events() if event.name() == "[memory]"]
    held = peak = 0
    for event in sorted(events, key=lambda event: event.start_ns()):
        held += event.nbytes()
        peak = max(peak, held)
    return peak


def scored_call(model, rows: int, length: int, prefix: int, grad: bool) -> Callable[[], object]:
    """The packer's call (forward + backward, or no-grad forward) over ``rows`` distinct random rows of ``length``
    tokens after a cached ``prefix``."""
    model.requires_grad_(False)  # as during an explanation (models.borrowed): gradients w.r.t. inputs only
    scorer = TargetScorer(model)
    generator = torch.Generator().manual_seed(0)
    total = prefix + length
    ids = torch.randint(5, model.config.vocab_size, (total,), generator=generator)
    attributable = np.zeros(total, dtype=bool)
    attributable[prefix : total - N_TARGET] = True
    model_input = ModelInput(ids, total - N_TARGET, ((0, 0),) * total, "", attributable, (), "", "", 0, ("",) * total)
    scorer.prefix(ids, prefix)  # computed once per explanation, before (and outside) the measured call
    if grad:
        embeds = scorer.embed(ids[attributable]).expand(rows, -1, -1).clone()
        return lambda: score_embedding_requests([(scorer, model_input, EmbeddingRows(embeds))], batch_size=rows)
    keep = np.ones((rows, total), dtype=bool)
    keep[np.arange(rows), prefix + np.arange(rows)] = False  # distinct rows, each masking one token
    return lambda: score_row_requests([(scorer, model_input, MaskedRows(keep, 0))], batch_size=rows)


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("rows,length,prefix", SHAPES)
def test_gradient_estimate_bounds_the_measured_peak_within_2x(tiny_lm, attention, rows, length, prefix):
    model, _ = tiny_lm
    model.config._attn_implementation = attention
    peak = measured_peak(scored_call(model, rows, length, prefix, grad=True))
    estimate = call_estimate(model, length=length, prefix=prefix, n_target=N_TARGET).bytes_for(rows)
    assert peak <= estimate <= 2 * peak


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("rows,length,prefix", SHAPES)
def test_forward_estimate_bounds_the_measured_peak_within_2x(tiny_lm, attention, rows, length, prefix):
    model, _ = tiny_lm
    model.config._attn_implementation = attention
    peak = measured_peak(scored_call(model, rows, length, prefix, grad=False))
    estimate = call_estimate(model, length=length, prefix=prefix, n_target=N_TARGET, grad=False).bytes_for(rows)
    assert peak <= estimate <= 2 * peak


def test_eager_attention_weights_grow_with_length_squared(tiny_llama):
    model, _ = tiny_llama
    shape = ModelShape.of(model)
    model.config._attn_implementation = "eager"
    short, long = (call_estimate(model, length=n).bytes_per_row for n in (50, 100))
    model.config._attn_implementation = "sdpa"
    short_fused, long_fused = (call_estimate(model, length=n).bytes_per_row for n in (50, 100))
    weights = lambda n: shape.n_heads * n * n * 4 * (shape.n_layers + 2)  # noqa: E731 - kept + softmax grad
    assert (short - short_fused, long - long_fused) == (weights(50), weights(100))


def test_rows_per_call_fills_the_budget_and_warns_below_one_row():
    estimate = CallEstimate(bytes_per_row=1000, length=10, prefix=0, grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert rows_per_call(estimate, 3999) == 3
        assert rows_per_call(estimate, 1000) == 1
    with pytest.warns(MemoryBudgetWarning, match="checkpoint=True"):
        assert rows_per_call(estimate, 999) == 1


def test_memory_budget_checks_max_memory_and_defaults_to_free_memory(tiny_gpt2):
    import psutil

    model, _ = tiny_gpt2
    assert memory_budget(model, 12345) == 12345
    assert 0 < memory_budget(model) <= psutil.virtual_memory().total
    for bad in (0, -5, 1.5, True, "1GB"):
        with pytest.raises(InvalidInputError, match="max_memory"):
            memory_budget(model, bad)


def test_checkpointed_layers_give_the_same_gradient_with_less_memory_and_restore_the_model(tiny_lm):
    model, _ = tiny_lm
    model.requires_grad_(False)
    model.config._attn_implementation = "eager"
    embeds = torch.randn(2, 120, model.config.hidden_size, generator=torch.Generator().manual_seed(0))

    def gradient() -> torch.Tensor:
        inputs = embeds.clone().requires_grad_(True)
        model(inputs_embeds=inputs, use_cache=False).logits[:, -N_TARGET:].logsumexp(-1).sum().backward()
        return inputs.grad

    before = {name: dict(module.__dict__) for name, module in model.named_modules()}
    plain_peak, plain = measured_peak(gradient), gradient()
    with checkpointed_layers(model):
        checkpointed_peak, checkpointed = measured_peak(gradient), gradient()
    assert {name: dict(module.__dict__) for name, module in model.named_modules()} == before
    assert torch.equal(checkpointed, plain)  # the backward pass recomputes the same forward: the same bits
    assert checkpointed_peak < plain_peak
    estimate = call_estimate(model, length=120, n_target=N_TARGET - 1, checkpoint=True).bytes_for(2)
    assert checkpointed_peak <= estimate


MESSAGES = [{"role": "user", "content": "Paris is a city in France. What is the capital of France?"}]
TARGET = "The capital of France is Paris."


def test_gradient_calls_are_sized_by_max_memory_with_a_warning_below_one_row(tiny_lm):
    from fair_forge.explainability import AttributionExplainer
    from fair_forge.explainability.text.prompt import build_model_input

    model, tokenizer = tiny_lm
    messages = MESSAGES if tokenizer.chat_template else None
    prompt = None if messages else MESSAGES[0]["content"]
    model_input = build_model_input(tokenizer, target=TARGET, messages=messages, prompt=prompt)
    first = int(np.flatnonzero(model_input.attributable)[0])
    per_row = call_estimate(model, length=model_input.length - first, prefix=first,
                            n_target=model_input.n_target).bytes_per_row
    results = {}
    for rows in (3, 1):
        explainer = AttributionExplainer(model, tokenizer, max_memory=rows * per_row + 1)
        with warnings.catch_warnings():
            warnings.simplefilter("error", MemoryBudgetWarning)
            results[rows] = explainer.explain(messages, TARGET, prompt=prompt, method="integrated_gradients", n_steps=6)
    with pytest.warns(MemoryBudgetWarning, match="checkpoint=True"):  # checkpoint=False: over budget, with advice
        results[0] = AttributionExplainer(model, tokenizer, max_memory=per_row // 2, checkpoint=False).explain(
            messages, TARGET, prompt=prompt, method="integrated_gradients", n_steps=6)
    assert [results[rows].metadata.n_backward_passes for rows in (3, 1, 0)] == [2, 6, 6]
    assert not any(hasattr(results[rows].metadata, "checkpoint") for rows in (3, 1, 0))
    # one row per call against three: the same attributions up to rounding (in float32: an IG attribution is a
    # weighted sum of gradient products of the score's size, within ESTIMATOR_CONDITION times a score's bound)
    bound = ESTIMATOR_CONDITION * model_bound(model, log_prob_magnitude(model, model_input.input_ids),
                                              length=model_input.length, terms=model_input.n_target)
    np.testing.assert_allclose(results[1].scores, results[3].scores, rtol=0, atol=bound)


def test_the_checkpoint_threshold_is_max_memory_else_the_budget_and_at_most_a_fixed_size_on_the_cpu(tiny_gpt2,
                                                                                                   monkeypatch):
    model, _ = tiny_gpt2
    assert memory.checkpoint_threshold(model, 12345) == 12345
    for available, expected in ((100 * 2**30, memory.CPU_CHECKPOINT_BYTES), (4 * 2**30, int(0.05 * 4 * 2**30))):
        monkeypatch.setattr(memory, "available_memory", lambda _model, free=available: free)
        assert memory.checkpoint_threshold(model) == expected


def test_the_default_checkpoints_by_itself_when_one_row_is_over_budget(tiny_gpt2, monkeypatch):
    """checkpoint=None: where one row's backward pass is estimated over max_memory, gradient calls run checkpointed
    (no warning: the checkpointed row fits), as checkpoint=True would, and the result's metadata says why. The model
    has 8 layers: with 2, a checkpointed call keeps more than a plain one, and the default leaves it plain."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from fair_forge.explainability import AttributionExplainer

    shallow, tokenizer = tiny_gpt2
    assert call_estimate(shallow, length=40, checkpoint=True).bytes_per_row >= \
        call_estimate(shallow, length=40).bytes_per_row
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=8, n_head=2, bos_token_id=0,
                        eos_token_id=2)
    model = GPT2LMHeadModel(config).eval()
    messages, prompt = MESSAGES, None
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + TARGET
    length = len(tokenizer(text)["input_ids"])
    plain = call_estimate(model, length=length, n_target=len(tokenizer(TARGET)["input_ids"]))
    checkpointed = call_estimate(model, length=length, n_target=len(tokenizer(TARGET)["input_ids"]), checkpoint=True)
    assert 2 * checkpointed.bytes_per_row < plain.bytes_per_row
    budget = int((plain.bytes_per_row * checkpointed.bytes_per_row) ** 0.5)  # a checkpointed row fits, a plain not
    params = {"method": "integrated_gradients", "n_steps": 6, "prompt": prompt}
    with warnings.catch_warnings():
        warnings.simplefilter("error", MemoryBudgetWarning)
        auto = AttributionExplainer(model, tokenizer, max_memory=budget).explain(messages, TARGET, **params)
        forced = AttributionExplainer(model, tokenizer, max_memory=budget, checkpoint=True).explain(
            messages, TARGET, **params)
        roomy = AttributionExplainer(model, tokenizer, max_memory=2 * plain.bytes_per_row).explain(
            messages, TARGET, **params)
    assert auto.metadata.checkpoint is True and auto.metadata.checkpoint_reason.startswith("automatic")
    assert forced.metadata.checkpoint is True and forced.metadata.checkpoint_reason == "checkpoint=True"
    assert not hasattr(roomy.metadata, "checkpoint")
    assert auto.scores == forced.scores  # the same checkpointed calls
    assert auto.metadata.n_forward_passes == forced.metadata.n_forward_passes
    with pytest.warns(MemoryBudgetWarning, match="checkpoint=True"):
        AttributionExplainer(model, tokenizer, max_memory=budget, checkpoint=False).explain(messages, TARGET, **params)
    monkeypatch.setattr(memory, "CPU_CHECKPOINT_BYTES", budget)  # no max_memory: the CPU's fixed threshold decides
    assert AttributionExplainer(model, tokenizer).explain(messages, TARGET, **params).metadata.checkpoint is True
    reloaded = type(auto).model_validate_json(auto.model_dump_json())
    assert reloaded.metadata.checkpoint_reason == auto.metadata.checkpoint_reason


def test_checkpointed_gradient_calls_give_the_same_attributions(tiny_lm):
    from fair_forge.explainability import AttributionExplainer

    model, tokenizer = tiny_lm
    to_float64(model)  # checkpointed calls recompute the cached prefix too: the same attributions as an identity
    patched = {name for name, module in model.named_modules() if "forward" in module.__dict__}  # to_float64's
    messages = MESSAGES if tokenizer.chat_template else None
    prompt = None if messages else MESSAGES[0]["content"]
    plain, checkpointed = (
        AttributionExplainer(model, tokenizer, checkpoint=flag).explain(
            messages, TARGET, prompt=prompt, method="integrated_gradients", n_steps=8)
        for flag in (False, True))
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) if messages else prompt
    ids = tokenizer(f"{text} {TARGET}", return_tensors="pt")["input_ids"][0]  # what the model reads, near enough
    bound = ESTIMATOR_CONDITION * model_bound(model, log_prob_magnitude(model, ids), length=len(ids),
                                              terms=plain.metadata.n_target_tokens)
    np.testing.assert_allclose(checkpointed.scores, plain.scores, rtol=0, atol=bound)
    assert {name for name, module in model.named_modules() if "forward" in module.__dict__} == patched


def test_bad_max_memory_or_checkpoint_are_rejected_by_the_explainer(tiny_gpt2):
    from fair_forge.explainability import AttributionExplainer

    model, tokenizer = tiny_gpt2
    with pytest.raises(InvalidInputError, match="max_memory"):
        AttributionExplainer(model, tokenizer, max_memory=-1)
    for bad in ("yes", 1, 0):
        with pytest.raises(InvalidInputError, match="checkpoint"):
            AttributionExplainer(model, tokenizer, checkpoint=bad)
    assert AttributionExplainer(model, tokenizer).checkpoint is None  # automatic by default
