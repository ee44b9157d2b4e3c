"""Gradient methods: completeness, agreement with gradients computed by hand, batching and seeding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tolerances import ESTIMATOR_CONDITION, log_prob_magnitude, model_bound, sum_bound, to_float64

from fair_forge.explainability import AttributionExplainer, AttributionMethod, Granularity
from fair_forge.explainability.text.prompt import build_model_input

MESSAGES = [{"role": "user", "content": "What is the capital of France? Tell me now."}]
TARGET = "The capital of France is Paris."
GRADIENT_METHODS = [
    AttributionMethod.SALIENCY,
    AttributionMethod.INTEGRATED_GRADIENTS,
    AttributionMethod.GRADIENT_SHAP,
    AttributionMethod.SMOOTH_GRAD,
    AttributionMethod.SQUARE_GRAD,
    AttributionMethod.VAR_GRAD,
    AttributionMethod.INPUT_X_GRADIENT,
]


def explain(model, tokenizer, method, granularity=Granularity.TOKEN, batch_size=None, **kwargs):
    explainer = AttributionExplainer(model, tokenizer, batch_size=batch_size)
    if tokenizer.chat_template:
        return explainer.explain(MESSAGES, TARGET, method=method, granularity=granularity, **kwargs)
    return explainer.explain(prompt=MESSAGES[0]["content"], target=TARGET, method=method, granularity=granularity, **kwargs)


def gradient_by_hand(model, tokenizer):
    """(x, d score / d x) at the attributable tokens, with plain autograd: the reference."""
    if tokenizer.chat_template:
        model_input = build_model_input(tokenizer, messages=MESSAGES, target=TARGET)
    else:
        model_input = build_model_input(tokenizer, prompt=MESSAGES[0]["content"], target=TARGET)
    embeddings = model.get_input_embeddings()(model_input.input_ids).detach().requires_grad_(True)
    log_probs = torch.log_softmax(model(inputs_embeds=embeddings.unsqueeze(0)).logits[0], -1)
    positions = torch.arange(model_input.target_start, model_input.length)
    score = log_probs[positions - 1, model_input.input_ids[positions]].sum()
    (gradient,) = torch.autograd.grad(score, embeddings)
    return embeddings.detach(), gradient


def model_input_of(tokenizer):
    if tokenizer.chat_template:
        return build_model_input(tokenizer, messages=MESSAGES, target=TARGET)
    return build_model_input(tokenizer, prompt=MESSAGES[0]["content"], target=TARGET)


def rounding(model, tokenizer) -> float:
    """What rounding alone may move a gradient attribution of the test input by between two computations of it (a
    cache, a batch size, captum's or autograd's own graph): a score's ``tolerances.model_bound`` times what an
    estimator amplifies it by. Used on float64 models (``to_float64``): the identities below hold to ~1e-8."""
    model_input = model_input_of(tokenizer)
    magnitude = log_prob_magnitude(model, model_input.input_ids)
    return ESTIMATOR_CONDITION * model_bound(model, magnitude, length=model_input.length, terms=model_input.n_target)


def per_feature(result, per_token: torch.Tensor, combine) -> np.ndarray:
    """Combine per-token reference values (indexed by input position) over each feature's tokens."""
    return np.array([float(combine(per_token[list(a.token_positions)])) for a in result.attributions])


def test_integrated_gradients_completeness(tiny_lm):
    model, tokenizer = tiny_lm
    result = explain(model, tokenizer, AttributionMethod.INTEGRATED_GRADIENTS, n_steps=128)
    meta = result.metadata
    difference = meta.score_input - meta.score_baseline
    assert abs(difference) > 1e-3  # the check below is not vacuous
    # a quadrature error, not rounding: 128 Gauss-Legendre nodes on these smooth paths integrate to well within 1e-3
    assert sum(result.scores) == pytest.approx(difference, rel=1e-3)
    # the same float64 sum in another order (Higham 4.4)
    order = sum_bound(sum(abs(s) for s in result.scores) + abs(difference), len(result.scores) + 1)
    assert meta.convergence_delta == pytest.approx(abs(sum(result.scores) - difference), abs=order)
    assert meta.relative_convergence_delta < 1e-3
    assert meta.n_backward_passes >= 1 and meta.n_forward_passes >= 2


def test_input_x_gradient_and_saliency_equal_hand_computed_gradients(tiny_lm):
    model, tokenizer = tiny_lm
    to_float64(model)  # the explainer's gradient (cached prefix, one packed call) is autograd's: an identity
    x, gradient = gradient_by_hand(model, tokenizer)
    ixg = explain(model, tokenizer, AttributionMethod.INPUT_X_GRADIENT)
    expected = per_feature(ixg, (x * gradient).sum(-1), torch.sum)
    np.testing.assert_allclose(ixg.scores, expected, rtol=0, atol=rounding(model, tokenizer))
    saliency = explain(model, tokenizer, AttributionMethod.SALIENCY)
    expected = per_feature(saliency, gradient.square().sum(-1), lambda v: v.sum().sqrt())
    np.testing.assert_allclose(saliency.scores, expected, rtol=0, atol=rounding(model, tokenizer))
    length = len(x)  # one pass over the sequence: the cached prefix once, then the rest with one backward
    assert saliency.metadata.n_tokens_processed == length and saliency.metadata.n_backward_passes == 1


def test_word_scores_are_sums_of_token_scores(tiny_gpt2):
    model, tokenizer = tiny_gpt2
    tokens = explain(model, tokenizer, AttributionMethod.INPUT_X_GRADIENT, Granularity.TOKEN)
    for granularity in (Granularity.WORD, Granularity.SENTENCE):
        grouped = explain(model, tokenizer, AttributionMethod.INPUT_X_GRADIENT, granularity)
        by_position = {tuple(a.token_positions): a.score for a in tokens.attributions}
        for feature in grouped.attributions:
            parts = [score for positions, score in by_position.items() if set(positions) <= set(feature.token_positions)]
            # the same token values (granularity changes no model call), summed in float64 in another order
            order = sum_bound(sum(abs(part) for part in parts), len(parts))
            assert feature.score == pytest.approx(sum(parts), rel=0, abs=order)
        order = sum_bound(sum(abs(score) for score in tokens.scores), len(tokens.scores))
        assert sum(grouped.scores) == pytest.approx(sum(tokens.scores), rel=0, abs=2 * order)


def test_saliency_words_are_norms_over_their_tokens(tiny_gpt2):
    model, tokenizer = tiny_gpt2
    tokens = {tuple(a.token_positions): a.score for a in explain(model, tokenizer, "saliency").attributions}
    for word in explain(model, tokenizer, "saliency", Granularity.WORD).attributions:
        parts = [s for positions, s in tokens.items() if set(positions) <= set(word.token_positions)]
        # the same squared gradients summed in another order; sqrt halves the relative error and adds one rounding
        squares = float(np.sum(np.square(parts)))
        order = sum_bound(squares, 2 * len(parts)) / (2 * np.sqrt(squares)) + 2 * np.sqrt(squares) * 2.0**-53
        assert word.score == pytest.approx(float(np.sqrt(squares)), rel=0, abs=order)


def few_rows(method: AttributionMethod) -> dict:
    """Small step/sample counts that keep a test fast."""
    if method is AttributionMethod.INTEGRATED_GRADIENTS:
        return {"n_steps": 8}
    if method in (AttributionMethod.GRADIENT_SHAP, AttributionMethod.SMOOTH_GRAD, AttributionMethod.SQUARE_GRAD,
                  AttributionMethod.VAR_GRAD):
        return {"n_samples": 6}
    return {}


@pytest.mark.parametrize("method", GRADIENT_METHODS)
def test_batch_size_does_not_change_results(tiny_gpt2, method):
    model, tokenizer = tiny_gpt2
    to_float64(model)  # an identity: in float64
    params = few_rows(method)
    whole = explain(model, tokenizer, method, Granularity.WORD, **params)
    pieces = explain(model, tokenizer, method, Granularity.WORD, batch_size=1, **params)
    np.testing.assert_allclose(pieces.scores, whole.scores, rtol=0, atol=rounding(model, tokenizer))
    assert any(abs(s) > 0 for s in whole.scores)  # never silently zero


@pytest.mark.parametrize(
    "method", [AttributionMethod.GRADIENT_SHAP, AttributionMethod.SMOOTH_GRAD, AttributionMethod.VAR_GRAD]
)
def test_same_seed_same_result_other_seed_other_result(tiny_gpt2, method):
    model, tokenizer = tiny_gpt2
    params = {"n_samples": 4, "noise_std": 0.5}
    first = explain(model, tokenizer, method, seed=3, **params).scores
    again = explain(model, tokenizer, method, seed=3, **params).scores
    other = explain(model, tokenizer, method, seed=4, **params).scores
    assert first == again
    assert not np.allclose(first, other)


def test_seeding_leaves_the_global_rng_alone(tiny_gpt2):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    explain(*tiny_gpt2, AttributionMethod.SMOOTH_GRAD, n_samples=2)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("method", [AttributionMethod.INTEGRATED_GRADIENTS, AttributionMethod.INPUT_X_GRADIENT])
def test_per_target_matrix_rows_add_up_to_the_sequence_scores(tiny_lm, method):
    model, tokenizer = tiny_lm
    to_float64(model)  # the gradient of a sum is the sum of the gradients (the same points): an identity
    result = explain(model, tokenizer, method, Granularity.WORD, per_target=True)
    matrix = result.matrix.to_numpy()
    assert matrix.shape == (result.metadata.n_target_tokens, len(result.attributions))
    assert "".join(result.matrix.row_labels).strip() == TARGET
    assert result.matrix.column_labels == result.tokens
    np.testing.assert_allclose(matrix.sum(0), result.scores, rtol=0, atol=rounding(model, tokenizer))


def test_matrix_rows_equal_single_target_gradients(tiny_gpt2):
    """Row t of the input x gradient matrix is x . d log p(target_t) / dx, computed by hand for t = 0."""
    model, tokenizer = tiny_gpt2
    to_float64(model)
    result = explain(model, tokenizer, AttributionMethod.INPUT_X_GRADIENT, per_target=True)
    model_input = build_model_input(tokenizer, messages=MESSAGES, target=TARGET)
    embeddings = model.get_input_embeddings()(model_input.input_ids).detach().requires_grad_(True)
    log_probs = torch.log_softmax(model(inputs_embeds=embeddings.unsqueeze(0)).logits[0], -1)
    first = log_probs[model_input.target_start - 1, model_input.input_ids[model_input.target_start]]
    (gradient,) = torch.autograd.grad(first, embeddings)
    expected = per_feature(result, (embeddings.detach() * gradient).sum(-1), torch.sum)
    np.testing.assert_allclose(result.matrix.to_numpy()[0], expected, rtol=0, atol=rounding(model, tokenizer))


def test_pad_and_token_baselines(tiny_gpt2):
    model, tokenizer = tiny_gpt2
    for baseline in ("pad", 5):
        result = explain(model, tokenizer, AttributionMethod.INTEGRATED_GRADIENTS, baseline=baseline, n_steps=128)
        difference = result.metadata.score_input - result.metadata.score_baseline
        assert sum(result.scores) == pytest.approx(difference, rel=2e-3)  # quadrature error, as above


def test_bfloat16_model_works_with_float32_gradients(tiny_gpt2):
    model, tokenizer = tiny_gpt2
    reference = explain(model, tokenizer, AttributionMethod.INPUT_X_GRADIENT).scores
    result = explain(model.to(torch.bfloat16), tokenizer, AttributionMethod.INPUT_X_GRADIENT)
    assert next(model.parameters()).dtype == torch.bfloat16  # the model is left in its dtype
    assert np.corrcoef(result.scores, reference)[0, 1] > 0.9


def test_float16_on_cpu_works_or_says_what_to_do(tiny_gpt2):
    from fair_forge.explainability import UnsupportedModelError

    model, tokenizer = tiny_gpt2
    try:
        result = explain(model.to(torch.float16), tokenizer, AttributionMethod.SALIENCY)
    except UnsupportedModelError as error:
        assert "model.float()" in str(error)
    else:
        assert all(np.isfinite(result.scores))


@pytest.mark.parametrize("method", GRADIENT_METHODS)
def test_prefix_cache_does_not_change_gradient_results(tiny_lm, method):
    model, tokenizer = tiny_lm
    to_float64(model)  # an identity: in float64
    params = few_rows(method)
    kwargs = {"prompt": MESSAGES[0]["content"]} if not tokenizer.chat_template else {"messages": MESSAGES}
    cached = AttributionExplainer(model, tokenizer).explain(target=TARGET, method=method, per_target=True,
                                                            **kwargs, **params)
    plain = AttributionExplainer(model, tokenizer, prefix_cache=False).explain(
        target=TARGET, method=method, per_target=True, **kwargs, **params)
    bound = rounding(model, tokenizer)
    np.testing.assert_allclose(cached.scores, plain.scores, rtol=0, atol=bound)
    np.testing.assert_allclose(cached.matrix.to_numpy(), plain.matrix.to_numpy(), rtol=0, atol=bound)


# ---- each method equals captum (or plain autograd) on the same function, with the same noise ------------------------

from captum.attr import InputXGradient, IntegratedGradients, Saliency  # noqa: E402

from fair_forge.explainability import BudgetError, ConvergenceWarning  # noqa: E402
from fair_forge.explainability.methods.gradient import SAMPLES_PER_REQUEST, noise_chunks  # noqa: E402


def score_function(model, tokenizer):
    """(x (1, A, H) attributable embeddings, f: (B, A, H) -> (B, n_target) target log-probs): the function the
    methods attribute, written by hand (full sequence, no cache, plain log-softmax)."""
    model_input = build_model_input(tokenizer, messages=MESSAGES, target=TARGET)
    embeddings = model.get_input_embeddings()(model_input.input_ids).detach()
    positions = torch.from_numpy(np.flatnonzero(model_input.attributable))
    targets = torch.arange(model_input.target_start, model_input.length)

    def f(points: torch.Tensor) -> torch.Tensor:
        batch = embeddings.expand(points.shape[0], -1, -1).clone()
        batch[:, positions] = points
        log_probs = torch.log_softmax(model(inputs_embeds=batch).logits, -1)
        return log_probs[:, targets - 1, model_input.input_ids[targets]]

    return embeddings[positions].unsqueeze(0), f


def token_sums(result, per_token: torch.Tensor, tokenizer) -> np.ndarray:
    """(A,) values per attributable token -> the sum over each feature's tokens."""
    model_input = build_model_input(tokenizer, messages=MESSAGES, target=TARGET)
    index = {int(p): i for i, p in enumerate(np.flatnonzero(model_input.attributable))}
    return np.array([float(per_token[[index[p] for p in a.token_positions]].sum()) for a in result.attributions])


@pytest.mark.parametrize("per_target_row", [None, 0, -1])
def test_integrated_gradients_equal_captum(tiny_gpt2, per_target_row):
    model, tokenizer = tiny_gpt2
    to_float64(model)  # the same 16-node rule on the same function: an identity
    x, f = score_function(model, tokenizer)
    result = explain(model, tokenizer, AttributionMethod.INTEGRATED_GRADIENTS, per_target=True, n_steps=16)
    if per_target_row is None:
        forward, ours = (lambda p: f(p).sum(-1)), np.asarray(result.scores)
    else:
        forward, ours = (lambda p: f(p)[:, per_target_row]), result.matrix.to_numpy()[per_target_row]
    ig = IntegratedGradients(forward, multiply_by_inputs=True)
    expected = ig.attribute(x, baselines=torch.zeros_like(x), n_steps=16, method="gausslegendre")[0].sum(-1)
    np.testing.assert_allclose(ours, token_sums(result, expected.detach(), tokenizer), rtol=0,
                               atol=rounding(model, tokenizer))
    assert result.metadata.n_steps_used == 16 and result.metadata.integration_error >= 0


def test_input_x_gradient_and_saliency_equal_captum(tiny_gpt2):
    model, tokenizer = tiny_gpt2
    to_float64(model)
    x, f = score_function(model, tokenizer)
    def forward(p):
        return f(p).sum(-1)

    ixg = explain(model, tokenizer, AttributionMethod.INPUT_X_GRADIENT)
    expected = InputXGradient(forward).attribute(x)[0].sum(-1).detach()
    np.testing.assert_allclose(ixg.scores, token_sums(ixg, expected, tokenizer), rtol=0, atol=rounding(model, tokenizer))
    saliency = explain(model, tokenizer, AttributionMethod.SALIENCY)
    gradient = Saliency(forward).attribute(x, abs=False)[0].detach()
    expected = np.sqrt(token_sums(saliency, gradient.square().sum(-1), tokenizer))
    np.testing.assert_allclose(saliency.scores, expected, rtol=0, atol=rounding(model, tokenizer))


@pytest.mark.parametrize("method", [AttributionMethod.SMOOTH_GRAD, AttributionMethod.SQUARE_GRAD,
                                    AttributionMethod.VAR_GRAD])
def test_noise_tunnel_methods_equal_captum_gradients_at_the_same_noisy_points(tiny_gpt2, method):
    model, tokenizer = tiny_gpt2
    to_float64(model)
    x, f = score_function(model, tokenizer)
    n_samples = SAMPLES_PER_REQUEST + 3  # two draws: the running statistics cross a request boundary
    result = explain(model, tokenizer, method, n_samples=n_samples, noise_std=0.5, seed=7)
    noise = torch.cat(list(noise_chunks(7, n_samples, tuple(x.shape[1:]), 0.5 * float(x.std()))))
    gradients = Saliency(lambda p: f(p).sum(-1)).attribute(x + noise, abs=False).detach().double()  # (S, A, H)
    if method is AttributionMethod.SMOOTH_GRAD:
        expected = np.sqrt(token_sums(result, gradients.mean(0).square().sum(-1), tokenizer))
    elif method is AttributionMethod.SQUARE_GRAD:
        expected = token_sums(result, gradients.square().mean(0).sum(-1), tokenizer)
    else:
        expected = token_sums(result, gradients.var(0, unbiased=False).sum(-1), tokenizer)
    np.testing.assert_allclose(result.scores, expected, rtol=0, atol=rounding(model, tokenizer))


def test_gradient_shap_equals_autograd_at_the_same_points(tiny_gpt2):
    model, tokenizer = tiny_gpt2
    to_float64(model)
    x, f = score_function(model, tokenizer)
    n_samples = SAMPLES_PER_REQUEST + 3
    result = explain(model, tokenizer, AttributionMethod.GRADIENT_SHAP, n_samples=n_samples, noise_std=0.3, seed=5)
    noisy = x + torch.cat(list(noise_chunks(5, n_samples, tuple(x.shape[1:]), 0.3 * float(x.std()))))
    generator = torch.Generator().manual_seed(6)
    alphas = torch.cat([torch.rand((min(SAMPLES_PER_REQUEST, n_samples - start), 1, 1), generator=generator)
                        for start in range(0, n_samples, SAMPLES_PER_REQUEST)])
    points = (alphas * noisy).requires_grad_(True)  # zero baseline
    (gradients,) = torch.autograd.grad(f(points).sum(), points)
    expected = token_sums(result, (noisy * gradients).mean(0).sum(-1).detach(), tokenizer)
    np.testing.assert_allclose(result.scores, expected, rtol=0, atol=rounding(model, tokenizer))


@pytest.mark.parametrize(("method", "params"), [
    (AttributionMethod.INTEGRATED_GRADIENTS, {"n_steps": 10}),
    (AttributionMethod.GRADIENT_SHAP, {"n_samples": SAMPLES_PER_REQUEST + 3, "seed": 5}),
    (AttributionMethod.VAR_GRAD, {"n_samples": SAMPLES_PER_REQUEST + 3, "seed": 7}),
])
def test_requests_capped_by_gradient_bytes_give_the_same_scores(tiny_gpt2, monkeypatch, method, params):
    """A long input's points go out in smaller requests (REQUEST_GRADIENT_BYTES): the same noise, alphas and nodes,
    and one row per call either way, so the same scores up to how float64 sums over a request's rows are grouped."""
    from fair_forge.explainability.methods import gradient

    model, tokenizer = tiny_gpt2
    to_float64(model)
    whole = explain(model, tokenizer, method, batch_size=1, **params)
    sizes: list[int] = []
    rows = gradient._Embeddings.rows
    monkeypatch.setattr(gradient._Embeddings, "rows", lambda self, points: sizes.append(len(points)) or rows(self, points))
    weight = model.get_input_embeddings().weight
    per_point = int(model_input_of(tokenizer).attributable.sum()) * weight.shape[1] * weight.element_size()
    monkeypatch.setattr(gradient, "REQUEST_GRADIENT_BYTES", 3 * per_point)
    capped = explain(model, tokenizer, method, batch_size=1, **params)
    assert max(sizes) == 3 and sum(sizes) == params.get("n_steps", params.get("n_samples"))
    np.testing.assert_allclose(capped.scores, whole.scores, rtol=0, atol=rounding(model, tokenizer))


@pytest.mark.parametrize(("method", "params"), [
    (AttributionMethod.INTEGRATED_GRADIENTS, {"n_steps": 10**5}),
    (AttributionMethod.SMOOTH_GRAD, {"n_samples": 10**6}),
    (AttributionMethod.GRADIENT_SHAP, {"n_samples": 40, "max_evaluations": 39}),
])
def test_gradient_budgets_are_checked_before_any_model_call(tiny_gpt2, method, params):
    model, tokenizer = tiny_gpt2
    calls = []
    handle = model.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        with pytest.raises(BudgetError, match="max_evaluations"):
            explain(model, tokenizer, method, **params)
    finally:
        handle.remove()
    assert calls == []


def test_max_evaluations_lets_a_large_run_through(tiny_gpt2):
    result = explain(*tiny_gpt2, AttributionMethod.SMOOTH_GRAD, n_samples=40, max_evaluations=40)
    assert result.metadata.n_backward_passes >= 1


def test_integrated_gradients_inside_inference_mode(tiny_gpt2):
    model, tokenizer = tiny_gpt2
    reference = explain(model, tokenizer, AttributionMethod.INTEGRATED_GRADIENTS, n_steps=8)
    with torch.inference_mode():
        inside = explain(model, tokenizer, AttributionMethod.INTEGRATED_GRADIENTS, n_steps=8)
    assert inside.scores == reference.scores  # the same calls: the same bits


def test_integrated_gradients_warn_above_their_tolerance(tiny_gpt2):
    with pytest.warns(ConvergenceWarning, match="tolerance"):
        result = explain(*tiny_gpt2, AttributionMethod.INTEGRATED_GRADIENTS, n_steps=2, tolerance=1e-12)
    assert not result.metadata.converged and result.metadata.integration_error > 1e-12


@pytest.mark.parametrize("baseline", [10**6, -1, 2.5])
def test_integrated_gradients_baseline_outside_the_vocabulary_is_a_typed_error(tiny_gpt2, baseline):
    from fair_forge.explainability import InvalidInputError

    with pytest.raises(InvalidInputError, match="baseline"):
        explain(*tiny_gpt2, AttributionMethod.INTEGRATED_GRADIENTS, baseline=baseline)
