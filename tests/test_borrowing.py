"""The model is borrowed, also by calls that overlap in several threads: eval mode and frozen parameters while any
call holds it, restored exactly once when the last one leaves; typed errors for what is not a model."""

from __future__ import annotations

import threading

import pytest
import torch

from fair_forge.explainability import AttributionExplainer, InvalidInputError, UnsupportedModelError
from fair_forge.explainability.runtime.models import borrowed

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
TARGET = "The capital of France is Paris."


def _state(model: torch.nn.Module) -> tuple[bool, list[bool], list[bool]]:
    return model.training, [m.training for m in model.modules()], [p.requires_grad for p in model.parameters()]


def test_overlapping_borrows_from_two_threads_share_eval_mode_and_restore_once(tiny_gpt2) -> None:
    model, _ = tiny_gpt2
    model.train()
    model.transformer.h[0].eval()  # a mixed state, to see every module's own mode come back
    model.lm_head.weight.requires_grad_(False)
    before = _state(model)
    a_entered, b_entered, a_left, b_checked = (threading.Event() for _ in range(4))
    seen: dict[str, tuple] = {}

    def thread_a() -> None:
        with borrowed(model):
            a_entered.set()
            b_entered.wait(5)
        a_left.set()

    def thread_b() -> None:
        a_entered.wait(5)
        with borrowed(model):
            b_entered.set()
            a_left.wait(5)  # A has left; B still holds the model
            seen["b_after_a_left"] = _state(model)
            b_checked.set()

    threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    training, modes, flags = seen["b_after_a_left"]
    assert not training and not any(modes) and not any(flags)
    assert _state(model) == before


def test_nested_borrows_restore_at_the_outermost_exit_also_after_errors(tiny_gpt2) -> None:
    model, _ = tiny_gpt2
    model.train()
    before = _state(model)
    with pytest.raises(RuntimeError, match="inner"):
        with borrowed(model):
            with borrowed(model):
                raise RuntimeError("inner")
    assert _state(model) == before


def test_smooth_grad_in_two_overlapping_threads_equals_a_sequential_run(tiny_gpt2) -> None:
    model, tokenizer = tiny_gpt2
    model.train()  # dropout on outside the borrow: a call running after the other restored it would be off
    explainer = AttributionExplainer(model, tokenizer)
    params = {"method": "smooth_grad", "n_samples": 8, "batch_size": 2, "seed": 3}
    expected = explainer.explain(MESSAGES, TARGET, **params).scores
    # A enters and waits inside; B enters and waits inside until A has finished and left; then B runs
    a_inside, b_inside, a_done = threading.Event(), threading.Event(), threading.Event()
    first_forward: dict[int, bool] = {}

    def pause(*_args) -> None:
        thread = threading.current_thread().name
        if first_forward.setdefault(threading.get_ident(), True):
            first_forward[threading.get_ident()] = False
            if thread == "A":
                a_inside.set()
                assert b_inside.wait(10)
            else:
                b_inside.set()
                assert a_done.wait(10)

    results: dict[str, list[float]] = {}

    def explain(name: str) -> None:
        results[name] = explainer.explain(MESSAGES, TARGET, **params).scores
        if name == "A":
            a_done.set()

    hook = model.register_forward_pre_hook(pause)
    try:
        thread_a = threading.Thread(target=explain, args=("A",), name="A")
        thread_b = threading.Thread(target=explain, args=("B",), name="B")
        thread_a.start()
        assert a_inside.wait(10)
        thread_b.start()
        for thread in (thread_a, thread_b):
            thread.join(60)
    finally:
        hook.remove()
    assert results == {"A": expected, "B": expected}
    assert model.training and all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize(
    ("model", "error", "message"),
    [(None, InvalidInputError, "torch.nn.Module"), (torch.nn.Identity(), UnsupportedModelError, "no parameters")],
)
def test_what_is_not_a_model_gets_a_typed_error(model, error, message, gpt2_tokenizer) -> None:
    with pytest.raises(error, match=message):
        AttributionExplainer(model, gpt2_tokenizer)
