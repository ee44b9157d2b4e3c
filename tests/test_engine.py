"""explain_batch packs the model inputs of several items into shared model calls, without changing any result."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from fair_forge.explainability import AttributionExplainer
from fair_forge.explainability.packing import Coordinator, _Job

ITEMS = [
    ([{"role": "user", "content": "What is the capital of France?"}], "The capital of France is Paris."),
    ([{"role": "user", "content": "Why is the sky blue?"}], "Light scatters in the atmosphere."),
    ([{"role": "system", "content": "Answer in one short sentence."},
      {"role": "user", "content": "Name a friend of dogs."}], "Cats are friends!"),
    ([{"role": "user", "content": "The quick brown fox jumps over the lazy dog, why?"}], "Dogs are lazy."),
]
METHODS = {
    "occlusion": {},
    "lime": {"n_samples": 40},
    "kernel_shap": {"n_samples": 40},
    "sobol": {"n_samples": 8},
}


class CallCounter:
    """Counts the model's forward calls and the rows and tokens they carry."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.calls: list[tuple[int, int]] = []
        self.handle = model.register_forward_pre_hook(self.record, with_kwargs=True)

    def record(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        batch = ids if ids is not None else kwargs["inputs_embeds"]
        self.calls.append((int(batch.shape[0]), int(batch.shape[1])))


def _explain(explainer, item, **params):
    """``explain`` for one batch item: (messages, target) or (prompt, target)."""
    source, target = item
    if isinstance(source, str):
        return explainer.explain(prompt=source, target=target, **params)
    return explainer.explain(source, target, **params)


def _items(tokenizer):
    """Chat items, as raw prompts for a tokenizer without a chat template."""
    return ITEMS if tokenizer.chat_template else [(m[-1]["content"], t) for m, t in ITEMS]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_packed_batch_equals_one_by_one_with_fewer_model_calls(tiny_lm, method):
    model, tokenizer = tiny_lm
    items = _items(tokenizer)
    explainer = AttributionExplainer(model, tokenizer, batch_size=16)
    counter = CallCounter(model)
    try:
        single = [_explain(explainer, item, method=method, per_target=True, **METHODS[method]) for item in items]
        single_calls = len(counter.calls)
        batch = explainer.explain_batch(items, method=method, per_target=True, show_progress=False, **METHODS[method])
        packed_calls = len(counter.calls) - single_calls
    finally:
        counter.handle.remove()
    assert not batch.failures and batch.indices == list(range(len(items)))
    # padding rows to a shared length changes float32 rounding (~1e-6); Sobol indices divide by a variance, which
    # for a single target token can be tiny, so they are compared relatively
    rtol, matrix_rtol = (1e-3, 1e-2) if method == "sobol" else (1e-7, 1e-7)
    for one, packed in zip(single, batch):
        np.testing.assert_allclose(packed.scores, one.scores, atol=1e-5, rtol=rtol)
        np.testing.assert_allclose(packed.matrix.values, one.matrix.values, atol=1e-5, rtol=matrix_rtol)
        assert packed.metadata.n_evaluations == one.metadata.n_evaluations
    assert packed_calls < single_calls  # rows of different items shared model calls
    assert max(rows for rows, _ in counter.calls[single_calls:]) <= 16


GRADIENT_METHODS = {
    "saliency": {},
    "input_x_gradient": {},
    "integrated_gradients": {"n_steps": 4},
    "smooth_grad": {"n_samples": 3},
    "gradient_shap": {"n_samples": 3},
}


@pytest.mark.parametrize("per_target", [False, True])
@pytest.mark.parametrize("method", sorted(GRADIENT_METHODS))
def test_packed_gradients_equal_one_by_one(tiny_lm, method, per_target):
    """Embedding rows of several items share one forward and one backward; each row still gets its own gradient."""
    model, tokenizer = tiny_lm
    items = _items(tokenizer)
    explainer = AttributionExplainer(model, tokenizer)
    params = GRADIENT_METHODS[method]
    counter = CallCounter(model)
    try:
        single = [_explain(explainer, item, method=method, per_target=per_target, **params) for item in items]
        single_calls = len(counter.calls)
        batch = explainer.explain_batch(items, method=method, per_target=per_target, show_progress=False, **params)
        packed_calls = len(counter.calls) - single_calls
    finally:
        counter.handle.remove()
    assert not batch.failures
    for one, packed in zip(single, batch):
        np.testing.assert_allclose(packed.scores, one.scores, atol=1e-5, rtol=1e-4)
        if per_target:
            np.testing.assert_allclose(packed.matrix.values, one.matrix.values, atol=1e-5, rtol=1e-4)
        if method == "integrated_gradients":
            assert packed.metadata.convergence_delta == pytest.approx(one.metadata.convergence_delta, abs=1e-5)
    assert packed_calls < single_calls


def test_packed_gradients_do_not_depend_on_the_callers_grad_mode(tiny_gpt2):
    """Per-target gradients run as calls in the coordinating thread, with the worker's grad mode, not the caller's."""
    model, tokenizer = tiny_gpt2
    explainer = AttributionExplainer(model, tokenizer)
    with torch.no_grad():
        batch = explainer.explain_batch(ITEMS[:2], method="saliency", per_target=True, show_progress=False)
    assert not batch.failures
    one = explainer.explain(*ITEMS[1], method="saliency", per_target=True)
    np.testing.assert_allclose(batch[1].matrix.values, one.matrix.values, atol=1e-5)


def test_a_shared_system_prompt_runs_once_for_the_whole_batch(tiny_gpt2):
    model, tokenizer = tiny_gpt2
    explainer = AttributionExplainer(model, tokenizer)
    counter = CallCounter(model)
    try:
        explainer.explain_batch([ITEMS[0], ITEMS[1], ITEMS[3]], method="occlusion", show_progress=False)
    finally:
        counter.handle.remove()
    prefix_calls = [call for call in counter.calls if call[0] == 1]
    assert len(prefix_calls) == 1  # "<|im_start|>user\n" is the same prefix for all three items


def test_remove_masking_packs_too(tiny_lm):
    model, tokenizer = tiny_lm
    items = _items(tokenizer)
    explainer = AttributionExplainer(model, tokenizer)
    batch = explainer.explain_batch(items, method="occlusion", remove=True, show_progress=False)
    for item, packed in zip(items, batch):
        one = _explain(explainer, item, method="occlusion", remove=True)
        np.testing.assert_allclose(packed.scores, one.scores, atol=1e-5)


def test_a_failing_item_is_recorded_and_the_others_still_pack(tiny_gpt2):
    model, tokenizer = tiny_gpt2
    explainer = AttributionExplainer(model, tokenizer)
    long_item = ([{"role": "user", "content": "one two three four five six seven eight nine ten"}], "Numbers.")
    items = [ITEMS[0], long_item, ({"role": "user"},), ITEMS[1]]
    # exact KernelSHAP: 7 features need 128 evaluations, 10 features 1024 (over the budget: a BudgetError at run time)
    batch = explainer.explain_batch(items, method="kernel_shap", exact=True, max_evaluations=200, show_progress=False)
    assert batch.indices == [0, 3]
    assert [(f.index, f.error_type) for f in batch.failures] == [(1, "BudgetError"), (2, "InvalidInputError")]
    for index, result in zip(batch.indices, batch):
        one = _explain(explainer, items[index], method="kernel_shap", exact=True)
        np.testing.assert_allclose(result.scores, one.scores, atol=1e-5)


def test_the_model_is_untouched_after_a_packed_batch(tiny_gpt2):
    model, tokenizer = tiny_gpt2
    model.train()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    AttributionExplainer(model, tokenizer).explain_batch(ITEMS, method="lime", n_samples=20, show_progress=False)
    assert model.training and all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_coordinator_runs_calls_in_its_own_thread_and_keeps_failures_apart():
    coordinator = Coordinator(batch_size=4, max_workers=3, tokens_per_call=4096)
    main = threading.get_ident()
    seen: list[int] = []

    def task(index: int):
        def call():
            seen.append(threading.get_ident())
            if index == 2:
                raise ValueError("call failed")
            return index * 10

        first = coordinator.submit(_Job(call=call))
        return first + coordinator.submit(_Job(call=lambda: 1))

    def failing_task():
        raise KeyError("task failed")

    finished: list[int] = []
    outcomes = coordinator.run([lambda i=i: task(i) for i in range(5)] + [failing_task], on_done=finished.append)
    assert [ok for ok, _ in outcomes] == [True, True, False, True, True, False]
    assert [value for ok, value in outcomes if ok] == [1, 11, 31, 41]
    assert isinstance(outcomes[2][1], ValueError) and isinstance(outcomes[5][1], KeyError)
    assert set(seen) == {main} and sorted(finished) == list(range(6))


def test_a_batch_whose_items_all_fail_validation_returns_only_failures(tiny_gpt2):
    model, tokenizer = tiny_gpt2
    batch = AttributionExplainer(model, tokenizer).explain_batch(
        [("", "x"), {"question": "Why?", "answer": " "}], method="saliency", batch_size=2, show_progress=False)
    assert len(batch) == 0 and [f.index for f in batch.failures] == [0, 1]
