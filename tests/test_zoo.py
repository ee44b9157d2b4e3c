"""Every method on every architecture of the zoo (tests/zoo.py): the promises that must hold whatever the model.

Per architecture: every method runs; integrated gradients meet their completeness tolerance and explain the score a
direct model call gives; the prefix cache and packing change no score; per-target matrices add up to the sequence
scores for the additive methods; the model and tokenizer are left exactly as they were; chat-template tokens are
never attributed. Models are 2 layers of width 32, so the whole file runs in well under a minute on one thread.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from tolerances import ESTIMATOR_CONDITION, log_prob_magnitude, model_bound, to_float64
from zoo import (ARCHITECTURES, IG_COMPLETENESS_PARAMS, IG_TOLERANCE, KNOWN_GAPS, OWN_MODEL_PAGE, ZooModel,
                 build_zoo_model, own_model_page)

from fair_forge.explainability import At2Weights, AttributionExplainer, AttributionMethod
from fair_forge.explainability.methods import get_method

#: The cheapest settings each method runs with (every method, every architecture).
MINIMAL_PARAMS: dict[str, dict[str, Any]] = {
    "integrated_gradients": {"n_steps": 4},
    "gradient_shap": {"n_samples": 4},
    "smooth_grad": {"n_samples": 4},
    "square_grad": {"n_samples": 4},
    "var_grad": {"n_samples": 4},
    "lime": {"n_samples": 16},
    "kernel_shap": {"n_samples": 16},
    "sobol": {"n_samples": 4},
}
#: One method per scoring path: gradients through embedding rows, perturbations through masked id rows.
PATH_METHODS = {"integrated_gradients": {"n_steps": 8}, "occlusion": {}}
#: Additive methods whose per-target matrix must add up, column by column, to the sequence-level scores.
ADDITIVE_PER_TARGET = {"integrated_gradients": {"n_steps": 8}, "input_x_gradient": {}, "occlusion": {},
                       "kernel_shap": {"n_samples": 32}, "gradient_shap": {"n_samples": 4}}


def assert_same_scores(actual: Any, expected: Any, bound: float) -> None:
    """Equal up to ``bound`` (``rounding``: what two computations of one attribution may differ by in rounding)."""
    actual, expected = np.asarray(actual, dtype=float), np.asarray(expected, dtype=float)
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, rtol=0, atol=bound)


@pytest.fixture(scope="module", params=ARCHITECTURES)
def zoo_model(request: pytest.FixtureRequest) -> ZooModel:
    return build_zoo_model(request.param)


@pytest.fixture(scope="module", params=ARCHITECTURES)
def zoo_model64(request: pytest.FixtureRequest) -> ZooModel:
    """The same architectures in float64 (``tolerances.to_float64``), for the identities: a prefix cache, packing and
    per-target sums change no score, to float64 rounding."""
    zoo_model = build_zoo_model(request.param)
    to_float64(zoo_model.model)
    return zoo_model


@pytest.fixture
def explainer(zoo_model: ZooModel) -> AttributionExplainer:
    return AttributionExplainer(zoo_model.model, zoo_model.tokenizer)


@pytest.fixture
def explainer64(zoo_model64: ZooModel) -> AttributionExplainer:
    return AttributionExplainer(zoo_model64.model, zoo_model64.tokenizer)


def encode(zoo_model: ZooModel, index: int = 0) -> tuple[str, list[int], list[tuple[int, int]]]:
    """The text the model reads for example ``index`` and its tokens, straight from the tokenizer (the oracle)."""
    inputs = zoo_model.inputs(index)
    tokenizer = zoo_model.tokenizer
    if "messages" in inputs:
        prompt = tokenizer.apply_chat_template(inputs["messages"], tokenize=False, add_generation_prompt=True)
        text = prompt + inputs["target"]
    else:
        text = f"{inputs['prompt']} {inputs['target']}"
    encoding = tokenizer(text, add_special_tokens="messages" not in inputs, return_offsets_mapping=True)
    return text, list(encoding["input_ids"]), [tuple(span) for span in encoding["offset_mapping"]]


def rounding(zoo_model: ZooModel, n_target: int, index: int = 0) -> float:
    """What rounding alone may move an attribution of example ``index`` by: ``tolerances.model_bound`` of a sum of
    its ``n_target`` target log-probs, times what an estimator amplifies it by."""
    _, ids, _ = encode(zoo_model, index)
    magnitude = log_prob_magnitude(zoo_model.model, torch.tensor(ids))
    return ESTIMATOR_CONDITION * model_bound(zoo_model.model, magnitude, length=len(ids), terms=n_target)


def direct_score(zoo_model: ZooModel, n_target: int, index: int = 0) -> float:
    """Sum of the target tokens' log-probs from one plain forward pass over the token ids."""
    _, ids, _ = encode(zoo_model, index)
    with torch.no_grad():
        logits = zoo_model.model(input_ids=torch.tensor([ids])).logits[0].double()
    log_probs = logits[:-1].log_softmax(-1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    return float(log_probs[-n_target:].sum())


#: Every built-in method for causal LMs (integrated Jacobians explain siamese encoders).
LM_METHODS = [m.value for m in AttributionMethod if m is not AttributionMethod.INTEGRATED_JACOBIANS]


@pytest.mark.parametrize("method", LM_METHODS)
def test_every_method_runs(explainer: AttributionExplainer, zoo_model: ZooModel, method: str) -> None:
    params = dict(MINIMAL_PARAMS.get(method, {}))
    if method == "at2":  # head weights belong to one model: uniform ones made for this one
        params["weights"] = At2Weights.uniform(zoo_model.model)
    result = explainer.explain(**zoo_model.example, method=method, **params)
    scores = np.asarray(result.scores)
    assert scores.shape == (len(result.attributions),) and len(scores) > 0
    assert np.isfinite(scores).all() and np.abs(scores).max() > 0


def test_integrated_gradients_are_complete(explainer: AttributionExplainer, zoo_model: ZooModel) -> None:
    result = explainer.explain(**zoo_model.example, method="integrated_gradients", **IG_COMPLETENESS_PARAMS)
    metadata = result.metadata
    assert metadata.relative_convergence_delta < IG_TOLERANCE
    # the explained function is the model's own score: the embedding path (scaled embeddings, prefix cache) agrees
    # with a plain forward pass over the ids, to float32 rounding of one score (this model runs in float32)
    score_bound = rounding(zoo_model, metadata.n_target_tokens) / ESTIMATOR_CONDITION
    assert metadata.score_input == pytest.approx(direct_score(zoo_model, metadata.n_target_tokens), abs=score_bound)
    assert sum(result.scores) == pytest.approx(metadata.score_input - metadata.score_baseline,
                                               rel=IG_TOLERANCE)


@pytest.mark.parametrize("method", PATH_METHODS)
def test_prefix_cache_changes_no_score(zoo_model64: ZooModel, method: str) -> None:
    zoo_model = zoo_model64
    params = PATH_METHODS[method]
    cached, plain = (
        AttributionExplainer(zoo_model.model, zoo_model.tokenizer, prefix_cache=flag).explain(
            **zoo_model.example, method=method, per_target=True, **params)
        for flag in (True, False)
    )
    bound = rounding(zoo_model, cached.metadata.n_target_tokens)
    assert_same_scores(cached.scores, plain.scores, bound)
    assert_same_scores(cached.matrix.values, plain.matrix.values, bound)


@pytest.mark.parametrize("method", PATH_METHODS)
def test_packed_batch_equals_one_by_one(explainer64: AttributionExplainer, zoo_model64: ZooModel, method: str,
                                        request: pytest.FixtureRequest) -> None:
    explainer, zoo_model = explainer64, zoo_model64
    if zoo_model.entry.name in KNOWN_GAPS:  # strict: once packing is fixed, remove the entry from zoo.KNOWN_GAPS
        request.applymarker(pytest.mark.xfail(strict=True, reason=KNOWN_GAPS[zoo_model.entry.name]))
    params = PATH_METHODS[method]
    items = [zoo_model.inputs(index) for index in range(3)]
    batch = explainer.explain_batch(items, method=method, show_progress=False, **params)
    assert not batch.failures
    for index, (item, packed) in enumerate(zip(items, batch)):
        bound = rounding(zoo_model, packed.metadata.n_target_tokens, index)
        assert_same_scores(packed.scores, explainer.explain(**item, method=method, **params).scores, bound)


@pytest.mark.parametrize("method", list(ADDITIVE_PER_TARGET))
def test_per_target_rows_add_up_to_the_sequence_scores(explainer64: AttributionExplainer, zoo_model64: ZooModel,
                                                        method: str) -> None:
    explainer, zoo_model = explainer64, zoo_model64
    assert get_method(method).additive
    result = explainer.explain(**zoo_model.example, method=method, per_target=True, **ADDITIVE_PER_TARGET[method])
    matrix = np.asarray(result.matrix.values)
    assert matrix.shape == (result.metadata.n_target_tokens, len(result.attributions))
    assert_same_scores(matrix.sum(axis=0), result.scores, rounding(zoo_model, result.metadata.n_target_tokens))


def _state(zoo_model: ZooModel) -> dict[str, Any]:
    """Everything an explanation must leave as it found it."""
    model, tokenizer = zoo_model.model, zoo_model.tokenizer
    return {
        "weights": {name: tensor.clone() for name, tensor in model.state_dict().items()},
        "requires_grad": {name: p.requires_grad for name, p in model.named_parameters()},
        "grads": [name for name, p in model.named_parameters() if p.grad is not None],
        "training": {name: module.training for name, module in model.named_modules()},
        "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
                     for m in model.modules()),
        "config": model.config.to_dict(),
        "embedding_rows": model.get_input_embeddings().weight.shape[0],
        "vocab": tokenizer.get_vocab(),
        "special": tokenizer.special_tokens_map,
        "template": tokenizer.chat_template,
    }


@pytest.mark.parametrize("method", PATH_METHODS)
def test_model_and_tokenizer_are_left_untouched(zoo_model: ZooModel, method: str) -> None:
    model = zoo_model.model
    # a model mid-training: train mode (dropout on) except one module, some parameters frozen
    model.train()
    next(iter(model.children())).eval()
    frozen = [p for i, p in enumerate(model.parameters()) if i % 3 == 0]
    for parameter in frozen:
        parameter.requires_grad_(False)
    try:
        before = _state(zoo_model)
        explainer = AttributionExplainer(model, zoo_model.tokenizer)
        explainer.explain(**zoo_model.example, method=method, per_target=True, **PATH_METHODS[method])
        explainer.explain_batch([zoo_model.inputs(1)], method=method, show_progress=False, **PATH_METHODS[method])
        after = _state(zoo_model)
    finally:
        model.eval()
        for parameter in frozen:
            parameter.requires_grad_(True)
    weights_before, weights_after = before.pop("weights"), after.pop("weights")
    assert after == before
    assert all(torch.equal(weights_after[name], tensor) for name, tensor in weights_before.items())


def test_template_tokens_are_never_attributed(explainer: AttributionExplainer, zoo_model: ZooModel) -> None:
    result = explainer.explain(**zoo_model.example, method="occlusion", granularity="token")
    text, ids, offsets = encode(zoo_model)
    inputs = zoo_model.example
    contents = [m["content"] for m in inputs["messages"]] if "messages" in inputs else [inputs["prompt"]]
    spans, cursor = [], 0
    for content in contents:  # where the user's text sits in what the model reads
        start = text.index(content, cursor)
        spans.append((start, start + len(content)))
        cursor = start + len(content)
    special = set(zoo_model.tokenizer.all_special_ids)
    n_prompt = len(ids) - result.metadata.n_target_tokens
    users = {
        position for position in range(n_prompt)
        if ids[position] not in special and offsets[position][1] > offsets[position][0]
        and any(start < offsets[position][1] and offsets[position][0] < end for start, end in spans)
    }
    attributed = [position for a in result.attributions for position in a.token_positions]
    assert sorted(attributed) == sorted(users)
    if zoo_model.entry.has_template:  # the template put tokens of its own around the user's text
        assert len(users) < n_prompt


def test_own_model_page_lists_the_zoo() -> None:
    current = OWN_MODEL_PAGE.read_text(encoding="utf-8")
    assert current == own_model_page(current), "docs/how-to/own-model.md is stale: run `python tests/zoo.py`"


def test_removed_tokens_leave_no_gap_in_a_sliding_window() -> None:
    """Gemma 3's sliding-window layer (window 8 in the zoo) measures distance in slots: removing a token must score
    the shorter sequence, as a plain forward pass over the remaining ids does."""
    zoo_model = build_zoo_model("gemma3")
    to_float64(zoo_model.model)  # an identity: in float64
    explainer = AttributionExplainer(zoo_model.model, zoo_model.tokenizer)
    result = explainer.explain(**zoo_model.example, method="occlusion", granularity="token", remove=True)
    _, ids, _ = encode(zoo_model)
    n_target = result.metadata.n_target_tokens
    assert len(ids) > 8  # longer than the window, so a gap would show
    full = direct_score(zoo_model, n_target)

    def score_without(positions: list[int]) -> float:
        kept = [token for position, token in enumerate(ids) if position not in positions]
        with torch.no_grad():
            logits = zoo_model.model(input_ids=torch.tensor([kept])).logits[0].double()
        log_probs = logits[:-1].log_softmax(-1)[torch.arange(len(kept) - 1), torch.tensor(kept[1:])]
        return float(log_probs[-n_target:].sum())

    bound = 2 * rounding(zoo_model, n_target) / ESTIMATOR_CONDITION  # a difference of two scores
    for attribution in result.attributions:
        assert attribution.score == pytest.approx(full - score_without(attribution.token_positions), abs=bound)
