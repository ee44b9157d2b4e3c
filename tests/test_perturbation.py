"""Perturbation methods: the pure estimators against analytic value functions, then the registered backends."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from lime.lime_base import LimeBase
from sklearn.linear_model import Ridge
from tolerances import ESTIMATOR_CONDITION, log_prob_magnitude, model_bound, sum_bound, to_float64

from fair_forge.explainability.errors import BudgetError, InvalidInputError, NoAttributableFeaturesError
from fair_forge.explainability.explainer import AttributionExplainer
from fair_forge.explainability.methods import MethodContext, coalitions as core, get_method
from fair_forge.explainability.text.prompt import build_model_input
from fair_forge.explainability.runtime.scorer import TargetScorer
from fair_forge.explainability.text.segment import build_features
from fair_forge.explainability.core.types import Granularity

# ---- analytic value functions and brute-force references --------------------------------------------------------


def interacting(n_features: int):
    """A non-linear value function with pairwise and three-way interactions (and a sine of the linear part)."""
    weights = np.linspace(0.5, 2.0, n_features)

    def v(masks: np.ndarray) -> np.ndarray:
        m = masks.astype(np.float64)
        linear = m @ weights
        return linear + 2.0 * m[:, 0] * m[:, 1] - 3.0 * m[:, 1] * m[:, 2] * m[:, -1] + np.sin(linear)

    return v


def vector_valued(n_features: int):
    """Three output columns, the first the sum of the other two (like an explained score over target tokens)."""
    scalar = interacting(n_features)

    def v(masks: np.ndarray) -> np.ndarray:
        a = scalar(masks)
        b = np.cos(masks.astype(np.float64).sum(1)) * masks[:, 0]
        return np.stack([a + b, a, b], axis=1)

    return v


def all_masks(n_features: int) -> np.ndarray:
    return np.array(list(itertools.product([False, True], repeat=n_features)), dtype=bool)


def exact_shapley(v, n_features: int) -> np.ndarray:
    """phi_i = sum over S not containing i of |S|!(d-|S|-1)!/d! (v(S + i) - v(S)), by enumeration."""
    masks = all_masks(n_features)
    values = {tuple(row): value for row, value in zip(masks, v(masks))}
    phi = np.zeros(n_features)
    for row in masks:
        size = int(row.sum())
        for i in np.flatnonzero(~row):
            with_i = row.copy()
            with_i[i] = True
            weight = math.factorial(size) * math.factorial(n_features - size - 1) / math.factorial(n_features)
            phi[i] += weight * (values[tuple(with_i)] - values[tuple(row)])
    return phi


def exact_total_sobol(v, n_features: int) -> np.ndarray:
    """ST_i = E[Var(v | all but i)] / Var(v) for fair-coin masks, by enumeration."""
    masks = all_masks(n_features)
    values = v(masks)
    total = np.zeros(n_features)
    for i in range(n_features):
        on, off = masks.copy(), masks.copy()
        on[:, i], off[:, i] = True, False
        total[i] = np.mean((v(on) - v(off)) ** 2) / 4.0
    return total / values.var()


def analytic(v, n_features: int) -> float:
    """What float64 rounding may move an estimate of the analytic ``v`` by: the estimators combine at most 2^d
    evaluations (all coalitions, or fewer samples), a sum whose rounding is ``sum_bound``'s, amplified by at most
    ``ESTIMATOR_CONDITION`` (least-squares solves, variance ratios)."""
    masks = all_masks(min(n_features, 12))
    evaluations = 2 ** n_features
    magnitude = float(np.abs(v(np.pad(masks, ((0, 0), (0, n_features - masks.shape[1])), constant_values=True))).max())
    return ESTIMATOR_CONDITION * sum_bound(evaluations * magnitude, evaluations)


class Recorder:
    """Wraps a value function and keeps every batch it was called with."""

    def __init__(self, v) -> None:
        self.v = v
        self.batches: list[np.ndarray] = []

    def __call__(self, masks: np.ndarray) -> np.ndarray:
        self.batches.append(masks.copy())
        return self.v(masks)

    @property
    def rows(self) -> np.ndarray:
        return np.concatenate(self.batches)


def run(method: str, v, n_features: int, **params) -> core.Estimate:
    return getattr(core, method)(v, n_features, **params)


SAMPLED = {
    "kernel_shap": {"n_samples": 60},
    "lime": {"n_samples": 60},
    "sobol_total": {"n_samples": 16},
}
ALL = {"occlusion": {"window": 2, "stride": 1}, **SAMPLED}

# ---- KernelSHAP ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_features", [1, 2, 3, 5, 6])
def test_kernel_shap_full_enumeration_is_exact_shapley(n_features: int) -> None:
    v = interacting(n_features) if n_features >= 3 else (lambda m: m.astype(float) @ np.arange(1.0, n_features + 1) + m.all(1))
    estimate = core.kernel_shap(v, n_features, exact=True)
    expected = exact_shapley(v, n_features)
    np.testing.assert_allclose(estimate.values, expected, rtol=0, atol=analytic(v, n_features))
    full, empty = v(np.ones((1, n_features), bool)), v(np.zeros((1, n_features), bool))
    assert estimate.values.sum() == pytest.approx(float(full[0] - empty[0]), abs=analytic(v, n_features))
    assert estimate.extras["exact"] and estimate.n_evaluations == 2**n_features


def test_kernel_shap_default_samples_enumerate_small_inputs() -> None:
    v = interacting(6)
    estimate = core.kernel_shap(v, 6)
    assert estimate.extras["exact"]
    np.testing.assert_allclose(estimate.values, exact_shapley(v, 6), rtol=0, atol=analytic(v, 6))


def test_kernel_shap_sampled_runs_converge_to_exact_values() -> None:
    n_features = 10
    v = interacting(n_features)
    expected = exact_shapley(v, n_features)
    errors = {}
    for n_samples in (40, 200, 1000):
        runs = [core.kernel_shap(v, n_features, n_samples=n_samples, seed=seed).values for seed in range(5)]
        for values in runs:  # the efficiency constraint holds for every sampled run
            assert values.sum() == pytest.approx(expected.sum(), abs=analytic(v, n_features))
        errors[n_samples] = np.mean([np.abs(values - expected).max() for values in runs])
    assert errors[1000] < errors[200] < errors[40]
    assert errors[1000] < 0.05 * np.abs(expected).max()


def test_kernel_shap_vector_output_is_per_column() -> None:
    n_features = 5
    v = vector_valued(n_features)
    estimate = core.kernel_shap(v, n_features, exact=True)
    assert estimate.values.shape == (3, n_features)
    for column in range(3):
        expected = exact_shapley(lambda m, c=column: v(m)[:, c], n_features)
        np.testing.assert_allclose(estimate.values[column], expected, rtol=0, atol=analytic(v, n_features))
    np.testing.assert_allclose(estimate.values[0], estimate.values[1] + estimate.values[2], rtol=0,
                               atol=analytic(v, n_features))


def test_kernel_shap_exact_over_many_features_is_refused_quickly() -> None:
    never = Recorder(interacting(30))
    with pytest.raises(BudgetError, match="exact KernelSHAP"):
        core.kernel_shap(never, 30, exact=True)
    with pytest.raises(BudgetError, match="n_samples"):
        core.kernel_shap(never, 30, n_samples=10**9)
    assert never.batches == []  # refused before any evaluation


def test_kernel_shap_leaves_the_global_rng_alone() -> None:
    np.random.seed(123)
    expected = np.random.random()
    np.random.seed(123)
    core.kernel_shap(interacting(8), 8, n_samples=50, seed=7)
    assert np.random.random() == expected


# ---- LIME ---------------------------------------------------------------------------------------------------------


def test_lime_recovers_linear_coefficients() -> None:
    n_features = 8
    coefficients = np.array([1.5, -2.0, 0.25, 3.0, 0.0, -0.75, 1.0, 2.5])

    def linear(masks: np.ndarray) -> np.ndarray:
        return 4.0 + masks.astype(np.float64) @ coefficients

    unregularised = core.lime(linear, n_features, n_samples=200, alpha=0.0)
    fit = ESTIMATOR_CONDITION * sum_bound(200 * 15.0, 200)  # 200 rows of |v| <= 4 + sum|coefficients| < 15
    np.testing.assert_allclose(unregularised.values, coefficients, rtol=0, atol=fit)
    assert unregularised.extras["r2"] == pytest.approx(1.0, rel=0, abs=fit)
    assert unregularised.extras["intercept"] == pytest.approx(4.0, rel=0, abs=fit)
    default = core.lime(linear, n_features, n_samples=2000)  # LimeBase's Ridge(alpha=1) shrinks a little
    np.testing.assert_allclose(default.values, coefficients, atol=0.02 * np.abs(coefficients).max())


def test_lime_matches_limebase_for_every_output_column() -> None:
    n_features, n_samples, width = 6, 80, 25.0
    v = vector_valued(n_features)
    estimate = core.lime(v, n_features, n_samples=n_samples, kernel_width=width, seed=3)
    masks = core.lime_samples(n_features, n_samples, np.random.default_rng(3))
    labels = v(masks)
    distances = (1.0 - np.sqrt(masks.sum(1) / n_features)) * 100.0
    base = LimeBase(lambda d: np.sqrt(np.exp(-(d**2) / width**2)), random_state=3)
    for column in range(labels.shape[1]):
        _, ranked, r2, _ = base.explain_instance_with_data(
            masks.astype(float), labels, distances, column, n_features, feature_selection="none",
            model_regressor=Ridge(alpha=1.0),
        )
        fit = ESTIMATOR_CONDITION * sum_bound(n_samples * float(np.abs(labels).max()), n_samples)  # two float64 fits
        np.testing.assert_allclose(estimate.values[column], [c for _, c in sorted(ranked)], rtol=0, atol=fit)
        if column == 0:
            assert estimate.extras["r2"] == pytest.approx(r2, rel=0, abs=fit)


def test_lime_samples_follow_lime_text_neighbourhood() -> None:
    masks = core.lime_samples(7, 5000, np.random.default_rng(0))
    assert masks[0].all() and not masks[1:].all(axis=1).any()  # the input itself, then >= 1 feature dropped
    dropped = (~masks[1:]).sum(1)
    assert set(np.unique(dropped)) == set(range(1, 8))
    # sampling noise, not rounding: a frequency over 5,000 draws has a standard deviation of sqrt(p (1 - p) / 5000),
    # 0.005 for p = 1/7 and 0.007 for p = 1/2, so 0.02 and 0.03 are 4 standard deviations (a seeded, fixed draw)
    assert np.abs(np.bincount(dropped, minlength=8)[1:] / len(dropped) - 1 / 7).max() < 0.02
    assert np.abs((~masks[1:]).mean(0) - (~masks[1:]).mean()).max() < 0.03  # no feature favoured


# ---- occlusion ----------------------------------------------------------------------------------------------------


def test_occlusion_is_leave_one_out() -> None:
    n_features = 7
    v = interacting(n_features)
    full = v(np.ones((1, n_features), bool))[0]
    expected = [full - v(~np.eye(n_features, dtype=bool)[i : i + 1])[0] for i in range(n_features)]
    estimate = core.occlusion(v, n_features)
    np.testing.assert_array_equal(estimate.values, expected)  # the same subtractions of the same values
    assert estimate.n_evaluations == n_features + 1


def test_occlusion_windows_average_over_covering_windows() -> None:
    n_features = 5
    v = interacting(n_features)
    full = v(np.ones((1, n_features), bool))[0]

    def drop(*features: int) -> float:
        mask = np.ones((1, n_features), bool)
        mask[0, list(features)] = False
        return full - v(mask)[0]

    # window 2, stride 2: windows {0,1}, {2,3}, then {3,4} added so that feature 4 is covered
    w01, w23, w34 = drop(0, 1), drop(2, 3), drop(3, 4)
    expected = [w01, w01, w23, (w23 + w34) / 2, w34]
    estimate = core.occlusion(v, n_features, window=2, stride=2)
    np.testing.assert_array_equal(estimate.values, expected)  # the same subtractions and halves (exact)
    assert estimate.extras["n_windows"] == 3
    whole = core.occlusion(v, n_features, window=99)  # longer than the input: one window over everything
    np.testing.assert_array_equal(whole.values, np.full(5, drop(0, 1, 2, 3, 4)))


def test_occlusion_vector_output() -> None:
    v = vector_valued(4)
    estimate = core.occlusion(v, 4)
    assert estimate.values.shape == (3, 4)
    for column in range(3):
        np.testing.assert_array_equal(estimate.values[column], core.occlusion(lambda m: v(m)[:, column], 4).values)


# ---- Sobol --------------------------------------------------------------------------------------------------------


def test_sobol_additive_function_gives_variance_shares() -> None:
    coefficients = np.array([1.0, 2.0, 0.0, -3.0, 0.5])

    def additive(masks: np.ndarray) -> np.ndarray:
        return masks.astype(np.float64) @ coefficients

    estimate = core.sobol_total(additive, 5, n_samples=1024)
    # on an additive function over 1024 balanced Sobol points the estimate is the variance share itself (each
    # feature flips on half the points, and fair-coin masks make the features' contributions uncorrelated): float64
    # rounding only
    evaluations = 1024 * (5 + 2)  # n_samples * (d + 2) rows of |v| <= sum|coefficients|
    arithmetic = ESTIMATOR_CONDITION * sum_bound(evaluations * np.abs(coefficients).sum(), evaluations)
    np.testing.assert_allclose(estimate.values, coefficients**2 / (coefficients**2).sum(), rtol=0, atol=arithmetic)
    assert estimate.values[2] == 0.0


def test_sobol_converges_to_exact_total_indices_with_interactions() -> None:
    n_features = 6
    v = interacting(n_features)
    expected = exact_total_sobol(v, n_features)
    assert expected.sum() > 1.0  # interactions: total indices add up to more than one
    errors = [np.abs(core.sobol_total(v, n_features, n_samples=n).values - expected).max() for n in (32, 4096)]
    assert errors[1] < errors[0] and errors[1] < 0.03


def test_sobol_constant_function_gives_zeros() -> None:
    estimate = core.sobol_total(lambda m: np.full(len(m), 2.5), 4)
    np.testing.assert_array_equal(estimate.values, np.zeros(4))


def test_sobol_refuses_budget_overrun() -> None:
    with pytest.raises(BudgetError, match="Sobol"):
        core.sobol_total(interacting(200), 200, n_samples=1024)


# ---- shared behaviour of every estimator --------------------------------------------------------------------------


@pytest.mark.parametrize("method", sorted(SAMPLED))
def test_same_seed_same_result(method: str) -> None:
    v = interacting(9)
    first = run(method, v, 9, seed=11, **SAMPLED[method]).values
    again = run(method, v, 9, seed=11, **SAMPLED[method]).values
    other = run(method, v, 9, seed=12, **SAMPLED[method]).values
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, other)


@pytest.mark.parametrize("method", sorted(ALL))
@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_batched_equals_unbatched_and_masks_stream(method: str, batch_size: int) -> None:
    v = vector_valued(9)
    unbatched = run(method, v, 9, batch_size=None, **ALL[method])
    recorder = Recorder(v)
    batched = run(method, recorder, 9, batch_size=batch_size, **ALL[method])
    np.testing.assert_array_equal(batched.values, unbatched.values)  # the same values, fitted the same way
    assert max(len(batch) for batch in recorder.batches) <= batch_size  # peak work grows with the batch size
    rows = recorder.rows
    assert len(np.unique(rows, axis=0)) == len(rows) == batched.n_evaluations  # every distinct mask scored once


@pytest.mark.parametrize("method", sorted(ALL))
def test_zero_features_is_a_typed_error(method: str) -> None:
    with pytest.raises(NoAttributableFeaturesError):
        run(method, lambda m: np.zeros(len(m)), 0)


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("lime", {"n_samples": 1}),
        ("lime", {"kernel_width": 0.0}),
        ("kernel_shap", {"n_samples": 0}),
        ("sobol_total", {"n_samples": 1.5}),
        ("occlusion", {"window": 0}),
        ("occlusion", {"stride": True}),
    ],
)
def test_bad_parameters_are_typed_errors(method: str, params: dict) -> None:
    with pytest.raises(InvalidInputError):
        run(method, interacting(4), 4, **params)


def test_value_function_output_shape_is_checked() -> None:
    with pytest.raises(InvalidInputError, match="value function"):
        core.occlusion(lambda m: np.zeros((len(m) + 1,)), 3)


# ---- the registered backends on tiny causal LMs ---------------------------------------------------------------------

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
TARGET = "The capital of France is Paris."
PERTURBATION_METHODS = ["occlusion", "kernel_shap", "lime", "sobol"]


def direct_log_probs(model, ids: torch.Tensor, n_target: int) -> np.ndarray:
    """log p(target_t | prefix) for each target token, straight from the model on one unmasked-shape sequence."""
    with torch.no_grad():
        logits = model(ids.unsqueeze(0)).logits[0].double()
    log_probs = logits[-n_target - 1 : -1].log_softmax(-1)
    return log_probs.gather(1, ids[-n_target:].unsqueeze(1)).squeeze(1).numpy()


def explain(lm, method: str, **kwargs):
    model, tokenizer = lm
    granularity = kwargs.pop("granularity", "word")
    per_target = kwargs.pop("per_target", False)
    explainer = AttributionExplainer(model, tokenizer, batch_size=kwargs.pop("explainer_batch_size", 16))
    return explainer.explain(MESSAGES, TARGET, method=method, granularity=granularity, per_target=per_target, **kwargs)


def model_input(lm):
    return build_model_input(lm[1], target=TARGET, messages=MESSAGES)


def rounding(lm, terms: int = 1) -> float:
    """``tolerances.model_bound`` of ``terms`` target log-probs of the test input (``MESSAGES``, ``TARGET``)."""
    model = lm[0]
    inputs = model_input(lm)
    return model_bound(model, log_prob_magnitude(model, inputs.input_ids), length=inputs.length, terms=terms)


@pytest.mark.parametrize("remove", [False, True])
def test_occlusion_equals_direct_leave_one_out(tiny_lm, remove: bool) -> None:
    model, _ = tiny_lm
    to_float64(model)  # masking or removing equals a direct call on the edited ids: an identity
    result = explain(tiny_lm, "occlusion", per_target=True, remove=remove)
    inputs = model_input(tiny_lm)
    ids, n_target = inputs.input_ids, inputs.n_target
    full = direct_log_probs(model, ids, n_target)
    rows = []
    for attribution in result.attributions:
        positions = list(attribution.token_positions)
        if remove:  # removing from attention == deleting the tokens from the sequence
            kept = torch.ones(len(ids), dtype=torch.bool)
            kept[positions] = False
            masked = ids[kept]
        else:
            masked = ids.clone()
            masked[positions] = inputs.baseline_token_id
        rows.append(full - direct_log_probs(model, masked, n_target))
    expected = np.stack(rows)  # (features, target tokens)
    # each value a difference of two scores (or of two log-probs), each within a bound of the direct call's
    np.testing.assert_allclose(result.scores, expected.sum(1), rtol=0, atol=2 * rounding(tiny_lm, n_target))
    np.testing.assert_allclose(result.matrix.to_numpy(), expected.T, rtol=0, atol=2 * rounding(tiny_lm))
    assert result.metadata.n_evaluations == len(result.attributions) + 1


def test_kernel_shap_exact_on_model_equals_brute_force_shapley(tiny_gpt2) -> None:
    model, _ = tiny_gpt2
    to_float64(model)  # the same coalitions scored directly: an identity
    result = explain(tiny_gpt2, "kernel_shap", granularity="word", exact=True, baseline=5)
    inputs = model_input(tiny_gpt2)
    features = [list(a.token_positions) for a in result.attributions]

    def v(masks: np.ndarray) -> np.ndarray:
        out = []
        for mask in masks:
            ids = inputs.input_ids.clone()
            for feature, kept in zip(features, mask):
                if not kept:
                    ids[feature] = 5
            out.append(direct_log_probs(model, ids, inputs.n_target).sum())
        return np.array(out)

    expected = exact_shapley(v, len(features))
    bound = ESTIMATOR_CONDITION * rounding(tiny_gpt2, inputs.n_target)
    np.testing.assert_allclose(result.scores, expected, rtol=0, atol=bound)
    # efficiency: the values add up to v(all) - v(none) up to float64 arithmetic on the scores
    arithmetic = ESTIMATOR_CONDITION * sum_bound(2 ** len(features) * abs(result.metadata.score_input), 2 ** len(features))
    assert result.metadata.exact and result.metadata.convergence_delta < arithmetic
    assert sum(result.scores) == pytest.approx(result.metadata.score_input - result.metadata.score_baseline,
                                               abs=arithmetic)


@pytest.mark.parametrize("method", PERTURBATION_METHODS)
def test_batched_equals_unbatched_on_model(tiny_lm, method: str) -> None:
    to_float64(tiny_lm[0])  # an identity: in float64
    one = explain(tiny_lm, method, per_target=True, batch_size=1)
    many = explain(tiny_lm, method, per_target=True, batch_size=64)
    bound = ESTIMATOR_CONDITION * rounding(tiny_lm, model_input(tiny_lm).n_target)
    np.testing.assert_allclose(one.scores, many.scores, rtol=0, atol=bound)
    np.testing.assert_allclose(one.matrix.to_numpy(), many.matrix.to_numpy(), rtol=0, atol=bound)
    # one pass per distinct mask, plus one for the prefix the scorer caches (chat header / BOS)
    assert one.metadata.n_forward_passes == one.metadata.n_evaluations + 1 > many.metadata.n_forward_passes


@pytest.mark.parametrize("method", ["occlusion", "kernel_shap", "lime"])
def test_matrix_rows_add_up_to_the_sequence_scores(tiny_gpt2, method: str) -> None:
    # all three are linear in the value function, and the explained score is the sum of target log-probs
    result = explain(tiny_gpt2, method, per_target=True)
    inputs = model_input(tiny_gpt2)
    n_target = inputs.n_target
    assert result.matrix.shape == (n_target, len(result.scores))
    # the same float64 fit of the same values, column by column: float64 arithmetic on scores of this size
    score = float(direct_log_probs(tiny_gpt2[0], inputs.input_ids, n_target).sum())
    arithmetic = ESTIMATOR_CONDITION * sum_bound(n_target * abs(score), n_target)
    np.testing.assert_allclose(result.matrix.to_numpy().sum(0), result.scores, rtol=0, atol=arithmetic)


def test_registry_declares_additivity_and_defaults() -> None:
    assert get_method("occlusion").additive and get_method("kernel_shap").additive
    assert not get_method("lime").additive and not get_method("sobol").additive
    for name in PERTURBATION_METHODS:
        spec = get_method(name)
        assert spec.kind == "perturbation"
        assert {"batch_size", "baseline", "remove"} <= set(spec.defaults)
    assert {"n_samples", "seed", "max_evaluations"} <= set(get_method("lime").defaults) & set(get_method("sobol").defaults)


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("occlusion", {"baseline": "zero"}),
        ("occlusion", {"baseline": 10**6}),
        ("occlusion", {"remove": "yes"}),
        ("lime", {"seed": -1}),
        ("lime", {"batch_size": 0}),
        ("kernel_shap", {"exact": 1}),
        ("sobol", {"max_evaluations": 0}),
        ("lime", {"n_steps": 4}),  # a gradient-method parameter
    ],
)
def test_bad_backend_parameters_are_typed_errors(tiny_gpt2, method: str, params: dict) -> None:
    with pytest.raises(InvalidInputError):
        explain(tiny_gpt2, method, **params)


def test_budget_errors_come_before_any_model_call(tiny_gpt2) -> None:
    model, tokenizer = tiny_gpt2
    inputs = build_model_input(tokenizer, target=TARGET, prompt="one two three four five six seven eight nine ten " * 4)
    features = build_features(inputs, Granularity.TOKEN)
    assert len(features) > 20
    scorer = TargetScorer(model)
    spec = get_method("kernel_shap")
    context = MethodContext(scorer, inputs, features, spec.resolve_params({"exact": True}))
    with pytest.raises(BudgetError, match="exact KernelSHAP"):
        spec.run(context)
    assert scorer.count.forward_passes == 0


def test_backend_without_features_is_a_typed_error(tiny_gpt2) -> None:
    spec = get_method("occlusion")
    context = MethodContext(TargetScorer(tiny_gpt2[0]), model_input(tiny_gpt2), [], spec.resolve_params({}))
    with pytest.raises(NoAttributableFeaturesError):
        spec.run(context)


@pytest.mark.parametrize("method", PERTURBATION_METHODS)
def test_prefix_cache_equals_no_cache(tiny_lm, method: str) -> None:
    model, tokenizer = tiny_lm
    to_float64(model)  # an identity: in float64 (in float32 a Sobol index turns one ulp into 1e-3 relative)
    inputs = model_input(tiny_lm)
    features = build_features(inputs, Granularity.WORD)
    spec = get_method(method)
    params = spec.resolve_params({"batch_size": 8})
    scorers = [TargetScorer(model, prefix_cache=cached) for cached in (True, False)]
    cached, plain = (spec.run(MethodContext(scorer, inputs, features, params, per_target=True)) for scorer in scorers)
    bound = ESTIMATOR_CONDITION * rounding(tiny_lm, inputs.n_target)
    np.testing.assert_allclose(cached.feature_scores, plain.feature_scores, rtol=0, atol=bound)
    np.testing.assert_allclose(cached.matrix, plain.matrix, rtol=0, atol=bound)
    assert scorers[0].count.tokens_processed < scorers[1].count.tokens_processed


def test_occlusion_that_would_leave_features_unmasked_is_refused() -> None:
    with pytest.raises(InvalidInputError, match="never masked"):
        core.occlusion(interacting(6), 6, window=1, stride=3)
    with pytest.raises(InvalidInputError, match="never masked"):
        get_method("occlusion").resolve_params({"window": 2, "stride": 3})


@pytest.mark.parametrize("kind", ["banana", None])
def test_register_method_refuses_an_unknown_kind(kind) -> None:
    from fair_forge.explainability import register_method

    with pytest.raises(InvalidInputError, match="kind"):
        register_method("never_registered", kind=kind, additive=False)


@pytest.mark.parametrize("seed", [None, 0, 2**32 - 1])
def test_seed_none_or_a_32_bit_integer_is_accepted(seed) -> None:
    assert get_method("kernel_shap").resolve_params({"seed": seed})["seed"] == seed


@pytest.mark.parametrize("seed", [2**32, 2**64, -1, 1.0, True, "0"])
def test_other_seeds_are_refused_with_a_message_that_allows_none(seed) -> None:
    with pytest.raises(InvalidInputError, match="seed"):
        get_method("lime").resolve_params({"seed": seed})
