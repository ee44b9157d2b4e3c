"""The explainer API: borrowed model, early typed errors, batches as maps, registry, result round trips."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fair_forge.explainability import (
    AttributionExplainer,
    AttributionMethod,
    AttributionResult,
    ContextLengthError,
    Granularity,
    InvalidInputError,
    NoAttributableFeaturesError,
    RawAttribution,
    UnknownMethodError,
    UnsupportedModelError,
    available_methods,
    compute_attributions,
    register_method,
)
from fair_forge.explainability.methods.registry import _REGISTRY

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
TARGET = "The capital of France is Paris."


class CountingModel(torch.nn.Module):
    """Wraps a model and counts forward calls, to prove errors come before any model call."""

    def __init__(self, model):
        super().__init__()
        self.inner = model
        self.config = model.config
        self.calls = 0

    def get_input_embeddings(self):
        return self.inner.get_input_embeddings()

    def forward(self, *args, logits_to_keep=0, **kwargs):
        self.calls += 1
        return self.inner(*args, logits_to_keep=logits_to_keep, **kwargs)


def snapshot(model):
    return (
        {name: p.detach().clone() for name, p in model.named_parameters()},
        {name: p.requires_grad for name, p in model.named_parameters()},
        model.training,
        {p.device for p in model.parameters()},
        {name: p.grad for name, p in model.named_parameters()},
    )


def assert_untouched(model, before):
    params, flags, training, devices, grads = before
    now = snapshot(model)
    for name, value in params.items():
        assert torch.equal(now[0][name], value), name
    assert now[1] == flags and now[2] == training and now[3] == devices
    assert all(g is None for g in now[4].values())


@pytest.mark.parametrize("method", ["integrated_gradients", "smooth_grad", "occlusion", "lime"])
def test_the_model_is_borrowed_not_changed(tiny_gpt2, method):
    model, tokenizer = tiny_gpt2
    model.train()
    model.transformer.h[1].eval()  # mixed module modes must come back as they were
    model.transformer.h[0].mlp.c_fc.weight.requires_grad_(False)  # a mixed set of flags must come back as it was
    vocabulary = dict(tokenizer.get_vocab())
    before = snapshot(model)
    params = {"n_samples": 8} if method != "integrated_gradients" else {"n_steps": 4}
    if method == "occlusion":
        params = {}
    AttributionExplainer(model, tokenizer).explain(MESSAGES, TARGET, method=method, **params)
    assert_untouched(model, before)
    assert model.transformer.h[0].training and not model.transformer.h[1].training
    assert tokenizer.get_vocab() == vocabulary


def test_the_model_is_restored_after_a_failure(tiny_gpt2):
    model, tokenizer = tiny_gpt2
    model.train()
    before = snapshot(model)

    @register_method("exploding", kind="gradient", additive=True, replace=True)
    def exploding(context):
        context.scorer.score_token_masks(context.model_input, np.ones((1, context.model_input.length), bool))
        raise RuntimeError("boom")

    try:
        with pytest.raises(RuntimeError, match="boom"):
            AttributionExplainer(model, tokenizer).explain(MESSAGES, TARGET, method="exploding")
    finally:
        del _REGISTRY["exploding"]
    assert_untouched(model, before)


@pytest.mark.parametrize(
    "call, error, message",
    [
        (dict(target=""), InvalidInputError, "target is empty"),
        (dict(target="   "), InvalidInputError, "target is empty"),
        (dict(messages=[]), InvalidInputError, "messages is empty"),
        (dict(messages=[{"role": "robot", "content": "x"}]), InvalidInputError, "unknown role"),
        (dict(method="shapley_magic"), UnknownMethodError, "available"),
        (dict(method="integrated_jacobians"), UnknownMethodError, "SimilarityExplainer"),
        (dict(granularity="paragraph"), InvalidInputError, "granularity"),
        (dict(method="integrated_gradients", n_steps=0), InvalidInputError, "n_steps"),
        (dict(method="saliency", n_steps=5), InvalidInputError, "does not take"),
        (dict(method="smooth_grad", noise_std=-1.0), InvalidInputError, "noise_std"),
        (dict(target="word " * 200), ContextLengthError, "at most 128"),
        (dict(messages=[{"role": "user", "content": " \n "}]), NoAttributableFeaturesError, "nothing to attribute"),
    ],
)
def test_bad_input_fails_before_any_model_call(tiny_gpt2, call, error, message):
    model, tokenizer = tiny_gpt2
    counting = CountingModel(model)
    kwargs = {"messages": MESSAGES, "target": TARGET, **call}
    with pytest.raises(error, match=message):
        AttributionExplainer(counting, tokenizer).explain(**kwargs)
    assert counting.calls == 0


def test_gradient_methods_need_input_embeddings(tiny_gpt2):
    model, tokenizer = tiny_gpt2
    counting = CountingModel(model)
    counting.get_input_embeddings = lambda: None
    with pytest.raises(UnsupportedModelError, match="perturbation method"):
        AttributionExplainer(counting, tokenizer).explain(MESSAGES, TARGET, method="saliency")
    assert counting.calls == 0
    result = AttributionExplainer(counting, tokenizer).explain(MESSAGES, TARGET, method="occlusion")
    assert len(result.attributions) == 7


def test_methods_accept_enum_and_plain_names(tiny_gpt2):
    model, tokenizer = tiny_gpt2
    explainer = AttributionExplainer(model, tokenizer, default_method="input_x_gradient")
    by_enum = explainer.explain(MESSAGES, TARGET, method=AttributionMethod.INPUT_X_GRADIENT)
    by_name = explainer.explain(MESSAGES, TARGET, method="Input_X_Gradient", granularity="word")
    default = explainer.explain(MESSAGES, TARGET)
    assert by_enum.scores == by_name.scores == default.scores
    assert by_enum.method is AttributionMethod.INPUT_X_GRADIENT and by_enum.granularity is Granularity.WORD


def test_result_contents_and_json_round_trip(tiny_gpt2):
    model, tokenizer = tiny_gpt2
    result = AttributionExplainer(model, tokenizer).explain(
        MESSAGES, TARGET, method="integrated_gradients", per_target=True, n_steps=8
    )
    assert result.prompt == MESSAGES[0]["content"] and result.target == TARGET
    assert result.tokens == ["What", "is", "the", "capital", "of", "France", "?"]
    for attribution in result.attributions:
        assert MESSAGES[0]["content"][attribution.start : attribution.end] == attribution.text
    peak = max(abs(s) for s in result.scores)
    # exact: the same division by the same peak (the peak's own ratio is 1 exactly)
    assert [a.normalized_score for a in result.attributions] == [s / peak for s in result.scores]
    assert max(abs(a.normalized_score) for a in result.attributions) == 1.0
    assert result.metadata.method_params == {"n_steps": 8, "baseline": "zero", "batch_size": None, "tolerance": 0.01,
                                             "max_steps": 1024, "max_evaluations": 100_000}
    assert result.metadata.n_tokens_processed > 0
    top = result.get_top_k(3)
    assert [abs(a.score) for a in top] == sorted((abs(s) for s in result.scores), reverse=True)[:3]
    assert result.top_attributions == result.get_top_k(5)
    again = AttributionResult.model_validate_json(result.model_dump_json())
    assert again == result
    visual = result.to_dict_for_visualization()
    assert visual["tokens"] == result.tokens and visual["scores"] == result.scores
    frame = result.to_dataframe()
    assert list(frame["text"]) == result.tokens


def test_custom_method_through_the_registry(tiny_gpt2):
    model, tokenizer = tiny_gpt2

    @register_method("first_is_one", kind="perturbation", additive=True, defaults={"scale": 1.0})
    def first_is_one(context):
        scores = np.zeros(len(context.features))
        scores[0] = context.params["scale"]
        return RawAttribution(feature_scores=scores, metadata={"custom": True})

    try:
        assert "first_is_one" in available_methods()
        result = AttributionExplainer(model, tokenizer).explain(MESSAGES, TARGET, method="first_is_one", scale=2.0)
        assert result.method == "first_is_one" and result.scores[0] == 2.0 and result.metadata.custom
        assert AttributionResult.model_validate_json(result.model_dump_json()) == result
        with pytest.raises(ValueError, match="already registered"):
            register_method("first_is_one", kind="perturbation", additive=True)(first_is_one)
    finally:
        del _REGISTRY["first_is_one"]


def test_explain_batch_keeps_going_past_a_bad_item(tiny_gpt2):
    model, tokenizer = tiny_gpt2
    explainer = AttributionExplainer(model, tokenizer, default_method="input_x_gradient")
    items = [
        (MESSAGES, TARGET),
        {"question": "Why is the sky blue?", "answer": ""},  # empty target: recorded, not raised
        {"prompt": "The quick brown fox", "target": "jumps over the lazy dog."},
        ("Explain why the sky is blue.", "Light scatters."),
        42,
    ]
    batch = explainer.explain_batch(items, show_progress=False)
    assert len(batch) == 3 and batch.indices == [0, 2, 3]
    assert [(f.index, f.error_type) for f in batch.failures] == [(1, "InvalidInputError"), (4, "InvalidInputError")]
    assert "target is empty" in batch.failures[0].message
    single = explainer.explain(prompt="The quick brown fox", target="jumps over the lazy dog.")
    assert batch[1].scores == single.scores  # a batch is a map: same item, same result
    assert [r.target for r in batch] == [TARGET, "jumps over the lazy dog.", "Light scatters."]


def test_explain_batch_from_a_dataframe(tiny_gpt2):
    pandas = pytest.importorskip("pandas")
    model, tokenizer = tiny_gpt2
    frame = pandas.DataFrame({"question": ["What is the capital of France?", "Why?"], "answer": [TARGET, "Because."]})
    batch = AttributionExplainer(model, tokenizer).explain_batch(frame, method="saliency", show_progress=False)
    assert len(batch) == 2 and not batch.failures
    assert batch[0].scores == AttributionExplainer(model, tokenizer).explain(MESSAGES, TARGET, method="saliency").scores


def test_explain_batch_rejects_settings_errors_at_once(tiny_gpt2):
    model, tokenizer = tiny_gpt2
    with pytest.raises(UnknownMethodError):
        AttributionExplainer(model, tokenizer).explain_batch([(MESSAGES, TARGET)], method="nope")
    with pytest.raises(InvalidInputError, match="n_steps"):
        AttributionExplainer(model, tokenizer).explain_batch([(MESSAGES, TARGET)], n_steps=-1)


def test_compute_attributions_one_liner(tiny_gpt2):
    model, tokenizer = tiny_gpt2
    result = compute_attributions(model, tokenizer, messages=MESSAGES, target=TARGET, method="saliency")
    assert result.method is AttributionMethod.SALIENCY and len(result.attributions) == 7


def test_visualize_returns_escaped_html(tiny_gpt2):
    model, tokenizer = tiny_gpt2
    explainer = AttributionExplainer(model, tokenizer)
    result = explainer.explain(MESSAGES, "<img src=x onerror=alert(1)>", method="saliency")
    html = explainer.visualize(result, return_html=True)
    assert "<img src=x" not in html and "&lt;img src=x onerror=alert(1)&gt;" in html


def test_model_name_never_carries_a_local_path(tiny_gpt2, tmp_path):
    model, tokenizer = tiny_gpt2
    model.save_pretrained(tmp_path / "my-model")
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "my-model")
    assert AttributionExplainer(loaded, tokenizer).model_name == "my-model"
    assert AttributionExplainer(loaded, tokenizer, model_name="custom").model_name == "custom"


def test_methods_doc_parameter_tables_are_the_generated_ones():
    from pathlib import Path

    from fair_forge.explainability.methods import methods_reference

    text = (Path(__file__).parents[1] / "docs" / "methods.md").read_text(encoding="utf-8")
    marker = "<!-- parameters: generated -->\n"
    assert text.split(marker, 1)[1] == methods_reference()


def test_a_long_explanation_shows_its_progress(tiny_gpt2, monkeypatch, capsys) -> None:
    """explain() counts its model requests in a progress bar that appears after PROGRESS_DELAY seconds."""
    from fair_forge.explainability import explainer as explainer_module

    model, tokenizer = tiny_gpt2
    explainer = AttributionExplainer(model, tokenizer)
    item = {"messages": [{"role": "user", "content": "What is the capital of France?"}], "target": "Paris."}
    monkeypatch.setattr(explainer_module, "PROGRESS_DELAY", 0.0)
    explainer.explain(**item, method="smooth_grad", n_samples=40)  # 40 samples: 3 requests of 16
    assert "explaining (smooth_grad)" in capsys.readouterr().err
    explainer.explain(**item, method="smooth_grad", n_samples=40, show_progress=False)
    assert capsys.readouterr().err == ""
