"""The path-integral rules of integrated gradients: exactness, the spike at the baseline, budgets, typed errors."""

from __future__ import annotations

import math
import warnings
from typing import Callable

import numpy as np
import pytest
from tolerances import sum_bound, unit_roundoff

from fair_forge.explainability.errors import BudgetError, ConvergenceWarning, InvalidInputError
from fair_forge.explainability.methods.quadrature import (
    DEFAULT_MAX_STEPS,
    ROUND_STEPS,
    Integral,
    integrate,
    kronrod_rule,
    warn_if_unconverged,
)


def drive(rule, integrand: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]) -> tuple[Integral, list[int]]:
    """Run the protocol; also return the size of every batch of points asked for."""
    batches = []
    alphas = next(rule)
    while True:
        assert np.all((alphas > 0) & (alphas < 1))
        batches.append(len(alphas))
        try:
            alphas = rule.send(integrand(alphas))
        except StopIteration as stop:
            return stop.value, batches


def scalar_only(derivative: Callable[[np.ndarray], np.ndarray]):
    return lambda alphas: (derivative(alphas), derivative(alphas)[:, None])


def rmsnorm_spike(scale: float, mass: float = -0.1) -> tuple[Callable[[np.ndarray], np.ndarray], float]:
    """d/dalpha of mass * alpha / sqrt(alpha^2 + scale^2) + sin(3 alpha) + alpha^2 (an RMSNorm-like jump at 0)."""

    def derivative(alphas: np.ndarray) -> np.ndarray:
        return mass * scale**2 / (alphas**2 + scale**2) ** 1.5 + 3 * np.cos(3 * alphas) + 2 * alphas

    return derivative, mass / math.sqrt(1 + scale**2) + math.sin(3.0) + 1.0


# -- the fixed rule ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_steps", [1, 7, 64, 100])
def test_fixed_rule_is_numpy_gauss_legendre(n_steps):
    nodes, weights = np.polynomial.legendre.leggauss(n_steps)
    rng = np.random.default_rng(n_steps)
    vector = rng.normal(size=(n_steps, 3, 2))
    rule = integrate(1.0, n_steps=n_steps)
    alphas = next(rule)
    np.testing.assert_array_equal(alphas, (nodes + 1.0) / 2.0)
    with pytest.raises(StopIteration) as stop:
        rule.send((np.full(n_steps, 1.0), vector))
    integral = stop.value.value  # the StopIteration, then its value
    np.testing.assert_array_equal(integral.value, np.tensordot(weights / 2.0, vector, axes=(0, 0)))
    assert integral.n_evaluations == n_steps
    assert integral.error == abs(float(weights / 2.0 @ np.ones(n_steps)) - 1.0)
    assert integral.converged


def test_fixed_rule_reports_its_error_without_refining():
    derivative, total = rmsnorm_spike(1e-4)
    integral, batches = drive(integrate(total, n_steps=16), scalar_only(derivative))
    assert batches == [16]
    assert integral.error > 0.01 and not integral.converged


# -- the adaptive rule ---------------------------------------------------------------------------------------------


def test_kronrod_rule_exactness():
    nodes, kronrod, gauss = kronrod_rule()
    u = unit_roundoff(np.float64)
    for degree in range(30):
        exact = (1 - (-1) ** (degree + 1)) / (degree + 1)
        for weights, limit in ((kronrod, 22), (gauss, 13)):
            if degree <= limit:
                # float64 sum of 15 terms; each weight and node rounded once, a node's error raised to the degree
                size = float(np.abs(weights) @ np.abs(nodes) ** degree)
                bound = sum_bound(size, 15) + (degree + 2) * u * size
                assert weights @ nodes**degree == pytest.approx(exact, rel=0, abs=bound)
    assert kronrod @ nodes**24 != pytest.approx(2 / 25, abs=1e-12)  # degree 23 is the limit, not more
    # the tabulated nodes against numpy's Newton-refined ones: each within a few ulps of the true node (|x| <= 1)
    np.testing.assert_allclose(np.sort(nodes[gauss > 0]), np.polynomial.legendre.leggauss(7)[0], rtol=0,
                               atol=4 * unit_roundoff(np.float64))


@pytest.mark.parametrize("degree", [0, 1, 4, 7])
def test_polynomials_cost_one_round_and_are_exact(degree):
    # alpha = t^3 turns a degree-d polynomial into one of degree 3d + 2 in t; K15 is exact up to degree 23
    coefficients = np.arange(1.0, degree + 2.0)
    derivative = np.polynomial.Polynomial(coefficients)
    total = float(derivative.integ()(1.0))
    integral, batches = drive(integrate(total, adaptive=True), scalar_only(derivative))
    assert batches == [ROUND_STEPS]
    # positive terms: the nodes' mapping and t^3 (~6 roundings), Horner (2 per degree), 15 weighted terms summed,
    # and the same for the reference's integ(); relative errors add
    rounding = 2 * (6 + 2 * degree + ROUND_STEPS + 2) * unit_roundoff(np.float64)
    assert integral.value[0] == pytest.approx(total, rel=rounding, abs=0)
    assert integral.error < 1e-13 and integral.converged


@pytest.mark.parametrize("scale", [1e-2, 1e-4, 1e-6, 1e-8])
def test_spike_at_the_baseline_meets_the_tolerance(scale):
    derivative, total = rmsnorm_spike(scale)
    fixed, _ = drive(integrate(total, n_steps=64), scalar_only(derivative))
    integral, batches = drive(integrate(total, tolerance=1e-3, adaptive=True), scalar_only(derivative))
    assert integral.converged and integral.error <= 1e-3
    assert integral.value[0] == pytest.approx(total, rel=1e-3)  # integral.error is that relative error, <= 1e-3
    assert integral.n_evaluations == sum(batches) <= DEFAULT_MAX_STEPS
    assert all(size % ROUND_STEPS == 0 for size in batches)
    if scale <= 1e-4:
        assert fixed.error > 0.05  # what the fixed rule gives on the same integrand


def test_the_default_rule_escalates_only_when_the_fixed_rule_misses_the_tolerance():
    smooth = np.polynomial.Polynomial([1.0, -2.0, 3.0])
    total = float(smooth.integ()(1.0))
    integral, batches = drive(integrate(total), scalar_only(smooth))
    assert batches == [64] and integral.converged and integral.n_evaluations == 64
    derivative, total = rmsnorm_spike(1e-6)
    fixed, _ = drive(integrate(total, n_steps=64), scalar_only(derivative))
    adaptive, _ = drive(integrate(total, adaptive=True, max_steps=DEFAULT_MAX_STEPS - 64), scalar_only(derivative))
    integral, batches = drive(integrate(total), scalar_only(derivative))
    assert fixed.error > 0.01 and integral.converged and integral.error <= 0.01
    assert batches[0] == 64 and integral.n_evaluations == sum(batches) == 64 + adaptive.n_evaluations
    np.testing.assert_array_equal(integral.value, adaptive.value)  # the adaptive result replaces the fixed one


def test_log_singularity_near_the_baseline():
    epsilon = 1e-7
    total = math.log1p(1 / epsilon)
    integral, _ = drive(integrate(total, adaptive=True), scalar_only(lambda alphas: 1.0 / (alphas + epsilon)))
    assert integral.converged and integral.error <= 0.01


def test_vector_integrand_is_integrated_componentwise():
    derivative, total = rmsnorm_spike(1e-5)

    def integrand(alphas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        columns = [derivative(alphas), np.cos(alphas), alphas**3]
        return derivative(alphas), np.stack(columns, axis=1).reshape(len(alphas), 3, 1)

    integral, _ = drive(integrate(total, tolerance=1e-4, adaptive=True), integrand)
    assert integral.value.shape == (3, 1)
    # the scalar's relative error is the asked 1e-4 (integral.error); cos and t^3, smooth, do better on its nodes
    np.testing.assert_allclose(integral.value[:, 0], [total, math.sin(1.0), 0.25], rtol=1e-4)


def test_budget_exhaustion_returns_the_achieved_error():
    derivative, total = rmsnorm_spike(1e-8)
    integral, batches = drive(integrate(total, tolerance=1e-6, max_steps=50, adaptive=True), scalar_only(derivative))
    assert batches == [15, 30]  # a third round (30 more) would pass 50
    assert integral.n_evaluations == 45 and not integral.converged
    assert integral.error == abs(integral.value[0] - total) / abs(total)  # exact: the error's definition
    with pytest.warns(ConvergenceWarning, match="did not reach tolerance=1e-06 within 45 evaluations"):
        warn_if_unconverged(integral, 1e-6, "integrated gradients")


def test_zero_total_uses_the_integral_of_the_magnitude_as_scale():
    integral, _ = drive(integrate(0.0, adaptive=True), scalar_only(lambda alphas: np.cos(2 * math.pi * alphas)))
    assert integral.error is None and integral.converged
    assert abs(integral.value[0]) < 1e-8
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_unconverged(integral, 0.01, "integrated gradients")


# -- settings ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("settings", [
    {"n_steps": 0}, {"n_steps": 2.5}, {"n_steps": True}, {"tolerance": 0}, {"tolerance": -1.0},
    {"tolerance": math.nan}, {"tolerance": "0.1"}, {"max_steps": 0}, {"max_steps": None},
])
def test_bad_settings_are_typed_errors(settings):
    with pytest.raises(InvalidInputError):
        integrate(1.0, **settings)


@pytest.mark.parametrize("total", [math.nan, math.inf, "1", None])
def test_bad_total_is_a_typed_error(total):
    with pytest.raises(InvalidInputError):
        integrate(total)


def test_budgets_are_checked_before_any_point_is_asked_for():
    with pytest.raises(BudgetError, match="n_steps=1000000000 is more than max_steps=256"):
        integrate(1.0, n_steps=10**9)
    with pytest.raises(BudgetError, match="max_steps >= 15"):
        integrate(1.0, max_steps=14)
    assert len(next(integrate(1.0, n_steps=300, max_steps=300))) == 300
