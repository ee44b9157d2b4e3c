"""The sparse surrogate (ContextCite) as a pure estimator over a value function: known answers."""

from __future__ import annotations

import numpy as np
import pytest
from tolerances import ESTIMATOR_CONDITION, log_prob_magnitude, model_bound, to_float64, unit_roundoff

from fair_forge.explainability.errors import BudgetError, InvalidInputError
from fair_forge.explainability.methods.sparse import ablation_masks, default_n_ablations, sparse_surrogate


def fit_rounding(intercept: float, weights: dict[int, float]) -> float:
    """The least-squares refit of exact (dyadic) values: float64 rounding of their size, times what a fit amplifies."""
    return ESTIMATOR_CONDITION * unit_roundoff(np.float64) * (abs(intercept) + sum(abs(w) for w in weights.values()))


def planted(n_features: int, weights: dict[int, float], intercept: float = -3.0):
    """A value function exactly linear in a few features: intercept + sum of the kept planted weights."""
    vector = np.zeros(n_features)
    for feature, weight in weights.items():
        vector[feature] = weight
    return lambda masks: intercept + masks.astype(np.float64) @ vector, vector


@pytest.mark.parametrize("n_features,n_samples", [(20, 32), (43, 43), (120, 64)])
def test_recovers_a_planted_sparse_linear_value_function_exactly(n_features, n_samples):
    weights = {0: 2.5, 7: -1.25, n_features - 1: 0.75}
    value_fn, expected = planted(n_features, weights)
    estimate = sparse_surrogate(value_fn, n_features, n_samples=n_samples, seed=3)
    np.testing.assert_allclose(estimate.values, expected, rtol=0, atol=fit_rounding(-3.0, weights))
    assert estimate.extras["intercept"] == pytest.approx(-3.0, abs=fit_rounding(-3.0, weights))
    # 1 - SS_res / SS_tot with SS_res ~ (fit_rounding)^2 ~ 1e-22 of SS_tot ~ 1: rounds to 1 (u = 1.1e-16)
    assert estimate.extras["r2"] == pytest.approx(1.0, rel=0, abs=unit_roundoff(np.float64))
    assert estimate.extras["n_selected"] == 3
    masks = ablation_masks(n_features, n_samples, np.random.default_rng(3))
    assert estimate.n_evaluations == len(np.unique(masks, axis=0))


def test_each_output_column_is_fitted_on_its_own():
    first, expected_first = planted(30, {1: 1.0, 4: -2.0})
    second, expected_second = planted(30, {9: 0.5}, intercept=1.0)
    estimate = sparse_surrogate(lambda m: np.stack([first(m), second(m)], axis=1), 30, n_samples=40, seed=0)
    assert estimate.values.shape == (2, 30)
    np.testing.assert_allclose(estimate.values, np.stack([expected_first, expected_second]), rtol=0,
                               atol=fit_rounding(-3.0, {1: 1.0, 4: -2.0}))  # the larger column's


def test_ablations_keep_each_feature_with_probability_one_half():
    masks = ablation_masks(50, 4000, np.random.default_rng(0))
    assert masks.shape == (4000, 50) and masks.dtype == bool
    assert abs(masks.mean() - 0.5) < 0.01
    np.testing.assert_array_equal(masks, ablation_masks(50, 4000, np.random.default_rng(0)))


def test_default_number_of_ablations_is_one_per_feature_between_32_and_64():
    assert [default_n_ablations(d) for d in (1, 32, 43, 64, 500)] == [32, 32, 43, 64, 64]
    seen: list[int] = []
    value_fn, _ = planted(43, {2: 1.0})
    sparse_surrogate(lambda masks: seen.append(len(masks)) or value_fn(masks), 43)
    assert sum(seen) == 43


def test_bad_parameters_are_typed_errors_before_any_evaluation():
    def never(masks):
        raise AssertionError("evaluated")

    with pytest.raises(InvalidInputError, match="alpha"):
        sparse_surrogate(never, 5, alpha=0)
    with pytest.raises(InvalidInputError, match="n_samples"):
        sparse_surrogate(never, 5, n_samples=1)
    with pytest.raises(BudgetError, match="max_evaluations"):
        sparse_surrogate(never, 5, n_samples=50, max_evaluations=10)


def test_context_cite_method_is_the_estimator_on_the_model_value_function(tiny_lm):
    from fair_forge.explainability import AttributionExplainer
    from fair_forge.explainability.text.prompt import build_model_input
    from fair_forge.explainability.runtime.scorer import TargetScorer
    from fair_forge.explainability.text.segment import build_features
    from fair_forge.explainability.core.types import Granularity

    model, tokenizer = tiny_lm
    to_float64(model)  # the method's packed rows vs the scorer's own calls: an identity, in float64
    prompt, target = "Paris is a city in France. Berlin is the capital of Germany. Dogs and cats are friends!", "Paris"
    result = AttributionExplainer(model, tokenizer).explain(prompt=prompt, target=target, method="context_cite",
                                                           granularity="word", seed=5)
    model_input = build_model_input(tokenizer, target=target, prompt=prompt)
    features = build_features(model_input, Granularity.WORD)
    membership = np.zeros((len(features), model_input.length), dtype=bool)
    for row, feature in enumerate(features):
        membership[row, list(feature.token_positions)] = True
    scorer = TargetScorer(model)
    expected = sparse_surrogate(  # ablated words removed, ContextCite's ablation and the method's default
        lambda masks: scorer.score_token_masks(model_input, ~(~masks @ membership), remove=True), len(features), seed=5)
    bound = ESTIMATOR_CONDITION * model_bound(model, log_prob_magnitude(model, model_input.input_ids),
                                              length=model_input.length, terms=model_input.n_target)
    np.testing.assert_allclose(result.scores, expected.values, rtol=0, atol=bound)  # a fit to rows within model_bound
    assert str(result.method) == "context_cite" and result.metadata.n_selected == expected.extras["n_selected"]
