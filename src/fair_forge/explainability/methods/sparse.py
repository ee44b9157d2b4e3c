"""A sparse linear surrogate fitted on few random ablations, for inputs with many features (ContextCite).

Cohen-Wang et al. (2024), "ContextCite: Attributing Model Generation to Context": score a few dozen random
ablations that keep each feature (sentence) with probability 1/2, fit a Lasso of the score on the keep-masks, and
read the coefficients as attributions. Few sentences of a long context matter for an answer, so a sparse model fits
from far fewer rows than LIME's max(100, 4 x features), whose neighbourhood grows with the document.

The Lasso picks the features; their coefficients are then refitted by least squares on those features alone
(a relaxed Lasso, Meinshausen 2007), because the L1 penalty shrinks every kept coefficient towards zero by about
``4 * alpha`` (times the scores' spread) on 0/1 masks. So a value function that is exactly linear in a few features is recovered exactly.

Same conventions as ``coalitions``: ``v(masks) -> scores``, masks (n, d) bool with True = kept, scores (n,) or
(n, K); the estimate is (d,) or (K, d), each output column fitted on its own. ``sparse_plan`` is the generator the
batch engine drives (it yields its distinct masks once, receives their values and returns the ``Estimate``);
``sparse_surrogate`` drives it with a value function.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np

from ..errors import InvalidInputError
from .coalitions import (
    DEFAULT_MAX_EVALUATIONS,
    Estimate,
    EstimatorPlan,
    ValueFunction,
    check_budget,
    check_features,
    distinct_values,
    per_column,
    check_count,
    run_with,
)

# The Lasso penalty, relative to the standard deviation of the scores over the ablations (so that models whose scores
# move by 1e-3, tiny or calibrated ones, are not penalised to zero). ContextCite's 0.01 is for a plain Lasso, whose
# penalty also shrinks what it keeps; after the least-squares refit a weak penalty keeps too many features, each refit
# on few rows. On a 46-sentence document (benchmarks/bench_long_context.py, SmolLM2, the same 60 ablations) 0.01 kept
# 39 sentences: comprehensiveness 6.4, sufficiency 82.1; 0.1 kept 8: 10.2 and 79.7 (LIME on 181 rows: 9.1 and 79.2).
# One document only: chosen there, not validated on others.
DEFAULT_ALPHA = 0.1
MIN_ABLATIONS, MAX_ABLATIONS = 32, 64
MIN_SEARCH_ABLATIONS, SEARCH_DENSITY = 8, 0.5


def default_n_ablations(n_features: int) -> int:
    """Ablations scored when none are asked for: one per feature, at least 32 and at most 64."""
    return min(MAX_ABLATIONS, max(MIN_ABLATIONS, n_features))


def searched_n_ablations(n_features: int) -> int:
    """Ablations of the second stage of the hierarchical search (``hierarchy``), over the ``n_features`` it kept:
    ``SEARCH_DENSITY`` (one per two features), at least ``MIN_SEARCH_ABLATIONS`` and at most ``MAX_ABLATIONS``
    (see ``hierarchy``'s docstring for why)."""
    return min(MAX_ABLATIONS, max(MIN_SEARCH_ABLATIONS, math.ceil(SEARCH_DENSITY * n_features)))


def ablation_masks(n_features: int, n_samples: int, rng: np.random.Generator) -> np.ndarray:
    """(n_samples, d) masks keeping each feature independently with probability 1/2."""
    return rng.random((n_samples, n_features)) < 0.5


def _fit_column(data: np.ndarray, labels: np.ndarray, alpha: float) -> tuple[np.ndarray, float]:
    """Coefficients and intercept of one output column: Lasso selection (penalty ``alpha`` x the scores' standard
    deviation), then least squares on the selection. Scores that never change give zero coefficients."""
    from sklearn.linear_model import Lasso

    spread = float(labels.std())
    if spread == 0.0:
        return np.zeros(data.shape[1]), float(labels[0])
    lasso = Lasso(alpha=alpha * spread, fit_intercept=True, max_iter=10_000).fit(data, labels)
    selected = np.flatnonzero(lasso.coef_)
    design = np.column_stack([np.ones(len(data)), data[:, selected]])
    solution, *_ = np.linalg.lstsq(design, labels, rcond=None)
    coefficients = np.zeros(data.shape[1])
    coefficients[selected] = solution[1:]
    return coefficients, float(solution[0])


def sparse_plan(
    n_features: int,
    *,
    n_samples: Optional[int] = None,
    alpha: float = DEFAULT_ALPHA,
    seed: Optional[int] = 0,
    max_evaluations: int = DEFAULT_MAX_EVALUATIONS,
    given: Optional[np.ndarray] = None,
) -> EstimatorPlan:
    """Coefficients of a sparse linear model of ``v`` fitted on ``n_samples`` random half-ablations.

    ``n_samples`` defaults to ``default_n_ablations(d)`` (32 to 64). ``given`` (m, d) bool: masks fitted on besides
    the random ones, as the first rows (rows the caller has scored already, such as the input). Extras: ``intercept`` and the fit's ``r2`` on
    the ablations, and ``n_selected`` (features with a non-zero coefficient), for the first output column.
    """
    check_features(n_features)
    n_samples = default_n_ablations(n_features) if n_samples is None else check_count("n_samples", n_samples, 2)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise InvalidInputError(f"alpha must be a number > 0, got {alpha!r}")
    check_budget("the sparse surrogate", n_samples, max_evaluations, "lower n_samples")
    masks = ablation_masks(n_features, n_samples, np.random.default_rng(seed))
    if given is not None and len(given):
        masks = np.concatenate([np.asarray(given, dtype=bool).reshape(-1, n_features), masks])
    scores, n_evaluations = yield from distinct_values(masks)
    labels = scores.reshape(len(masks), -1)
    data = masks.astype(np.float64)
    fits = [_fit_column(data, labels[:, column], float(alpha)) for column in range(labels.shape[1])]
    coefficients = np.stack([coefficient for coefficient, _ in fits])  # (K, d)
    intercept = fits[0][1]
    residual = labels[:, 0] - data @ coefficients[0] - intercept
    spread = float(np.square(labels[:, 0] - labels[:, 0].mean()).sum())
    r2 = 1.0 - float(np.square(residual).sum()) / spread if spread > 0 else 1.0
    values = coefficients[0] if scores.ndim == 1 else per_column(coefficients.T)
    extras = {"intercept": intercept, "r2": r2, "n_selected": int(np.count_nonzero(coefficients[0]))}
    return Estimate(values, n_evaluations, extras)


def sparse_surrogate(value_fn: ValueFunction, n_features: int, *, batch_size: Optional[int] = None,
                     **params: Any) -> Estimate:
    """``sparse_plan`` driven by ``value_fn`` (``batch_size`` masks per call)."""
    return run_with(sparse_plan(n_features, **params), value_fn, n_features, batch_size)
