"""Perturbation algorithms as pure functions of a value function over feature coalitions.

Every estimator here sees only ``v(masks) -> scores``: ``masks`` is an (n, d) bool array (True = feature kept) and
``v`` returns (n,) scores or an (n, K) matrix (e.g. one column per target token). They never see tokens or a model,
so they are tested against analytic value functions (exact Shapley values, known linear models, known variances).

Shared conventions:

- Estimates are per output column: an (n,) value function gives (d,) scores, an (n, K) one gives (K, d).
- ``MaskEvaluator`` scores each distinct mask once and calls ``v`` with at most ``batch_size`` masks at a time, so
  the expensive per-mask work behind ``v`` (token masks, activations) grows with the batch size, not ``n_samples``.
  Only the (n, d) bool masks and their scores are held in full.
- Every estimator checks its planned number of evaluations against ``max_evaluations`` before calling ``v`` and
  raises ``BudgetError`` rather than starting something that cannot finish (e.g. exact Shapley values over 30
  features need 2^30 evaluations).
- Masks first, values, then fit: each estimator is a generator (``*_plan``) that yields its distinct masks,
  receives their values and returns its ``Estimate``. The batch engine drives the plans of many inputs together;
  ``run_with`` drives one with a value function, which is what the plain functions (``occlusion``, ``lime``, ...)
  do.
- Default number of samples (LIME, KernelSHAP): ``max(100, 4 * d)``, i.e. 100 up to 25 features and 4 coalitions
  per feature beyond, so the weighted regressions stay over-determined. KernelSHAP never takes more than the
  2^d - 2 coalitions that exist, so with the default it is exact for d <= 6.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Generator, Optional

import numpy as np

from ..core.plans import drive
from ..errors import BudgetError, InvalidInputError, NoAttributableFeaturesError

ValueFunction = Callable[[np.ndarray], np.ndarray]

DEFAULT_MAX_EVALUATIONS = 100_000
DEFAULT_SOBOL_SAMPLES = 32
SOBOL_MAX_DIMENSION = 21201  # scipy.stats.qmc.Sobol supports at most this many dimensions (2 per feature here)



@dataclass
class Estimate:
    """Scores per feature ((d,) or (K, d)), the number of distinct masks scored, and method-specific extras."""

    values: np.ndarray
    n_evaluations: int
    extras: dict[str, Any] = field(default_factory=dict)


def default_n_samples(n_features: int) -> int:
    """Coalitions sampled by LIME and KernelSHAP when the user gives no ``n_samples`` (see the module docstring)."""
    return max(100, 4 * n_features)


def searched_n_samples(n_features: int) -> int:
    """LIME's neighbourhood in the second stage of the hierarchical search (``hierarchy``), over the features it
    kept: 4 x features as ``default_n_samples``, without the floor of 100 meant for a whole input (at least 16)."""
    return max(16, 4 * n_features)


class MaskEvaluator:
    """Scores masks through ``v``: each distinct mask once, at most ``batch_size`` masks per call of ``v``."""

    def __init__(self, value_fn: ValueFunction, n_features: int, batch_size: Optional[int] = None) -> None:
        self.value_fn = value_fn
        self.n_features = n_features
        self.batch_size = batch_size
        self._scores: dict[bytes, np.ndarray] = {}
        self._output_shape: Optional[tuple[int, ...]] = None

    @property
    def n_evaluations(self) -> int:
        """Distinct masks scored so far."""
        return len(self._scores)

    def __call__(self, masks: np.ndarray) -> np.ndarray:
        """(n, d) masks -> (n,) or (n, K) scores, in the order of ``masks``."""
        masks = np.asarray(masks, dtype=bool)
        if masks.ndim != 2 or masks.shape[1] != self.n_features:
            raise InvalidInputError(f"masks must have shape (n, {self.n_features}), got {masks.shape}")
        packed = np.packbits(masks, axis=1)
        unique, first, inverse = np.unique(packed, axis=0, return_index=True, return_inverse=True)
        keys = [row.tobytes() for row in unique]
        missing = [i for i, key in enumerate(keys) if key not in self._scores]
        step = self.batch_size or max(len(missing), 1)
        for start in range(0, len(missing), step):
            rows = missing[start : start + step]
            scores = self._checked(self.value_fn(masks[first[rows]]), len(rows))
            for row, score in zip(rows, scores):
                self._scores[keys[row]] = score
        table = np.stack([self._scores[key] for key in keys])
        return table[inverse.reshape(-1)]

    def _checked(self, scores: Any, n_rows: int) -> np.ndarray:
        scores = np.asarray(scores, dtype=np.float64)
        if scores.ndim not in (1, 2) or scores.shape[0] != n_rows:
            raise InvalidInputError(f"value function must return ({n_rows},) or ({n_rows}, K) scores, got {scores.shape}")
        if self._output_shape is None:
            self._output_shape = scores.shape[1:]
        elif scores.shape[1:] != self._output_shape:
            raise InvalidInputError(f"value function changed its output shape from {self._output_shape} to {scores.shape[1:]}")
        return scores


def per_column(values: np.ndarray) -> np.ndarray:
    """(d,) stays (d,); (d, K) becomes (K, d): estimates are reported one row per output column."""
    return values if values.ndim == 1 else np.ascontiguousarray(values.T)


def check_features(n_features: int) -> None:
    if n_features < 1:
        raise NoAttributableFeaturesError("there are no features to attribute to (the input has no attributable text)")


def check_count(name: str, value: Any, minimum: int) -> int:
    """``value`` as an int >= ``minimum``, or a typed error naming the parameter."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise InvalidInputError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_budget(method: str, planned: int, max_evaluations: int, hint: str) -> None:
    if planned > max_evaluations:
        raise BudgetError(
            f"{method} would need {planned} model evaluations, more than max_evaluations={max_evaluations}; {hint}"
        )




EstimatorPlan = Generator[np.ndarray, np.ndarray, Estimate]


def run_with(plan: EstimatorPlan, value_fn: ValueFunction, n_features: int,
             batch_size: Optional[int] = None) -> Estimate:
    """Drive an estimator plan with a value function (each distinct mask once, ``batch_size`` masks per call)."""
    return drive(plan, MaskEvaluator(value_fn, n_features, batch_size))


def distinct_values(masks: np.ndarray) -> Generator[np.ndarray, np.ndarray, tuple[np.ndarray, int]]:
    """Yield each distinct mask of ``masks`` once, receive their values; return the values of every mask (in the
    order of ``masks``) and how many distinct masks were scored."""
    unique, inverse = np.unique(masks, axis=0, return_inverse=True)
    values = np.asarray((yield unique), dtype=np.float64)
    return values[inverse.reshape(-1)], len(unique)


def occlusion_plan(n_features: int, *, window: int = 1, stride: int = 1) -> EstimatorPlan:
    """v(all) - v(all but a window of consecutive features), averaged over the windows covering each feature.

    ``window=1, stride=1`` is leave-one-out. A window longer than the feature list is shortened to it, and a last
    window is added when the stride would leave the final features uncovered.
    """
    check_features(n_features)
    window = min(check_count("window", window, 1), n_features)
    stride = check_count("stride", stride, 1)
    starts = list(range(0, n_features - window + 1, stride))
    if starts[-1] + window < n_features:
        starts.append(n_features - window)
    masks = np.ones((len(starts) + 1, n_features), dtype=bool)
    for row, start in enumerate(starts, start=1):
        masks[row, start : start + window] = False
    scores, n_evaluations = yield from distinct_values(masks)
    drops = (scores[:1] - scores[1:]).reshape(len(starts), -1)  # (windows, K)
    covered = ~masks[1:]  # (windows, d): which features each window hides
    if not covered.any(0).all():
        raise InvalidInputError(f"window={window} with stride={stride} leaves features never masked")
    per_feature = covered.T.astype(np.float64) @ drops / covered.sum(0)[:, None]  # (d, K)
    values = per_feature[:, 0] if scores.ndim == 1 else per_feature.T
    return Estimate(values, n_evaluations, {"n_windows": len(starts)})


def kernel_shap_plan(
    n_features: int,
    *,
    n_samples: Optional[int] = None,
    exact: bool = False,
    seed: Optional[int] = 0,
    max_evaluations: int = DEFAULT_MAX_EVALUATIONS,
) -> EstimatorPlan:
    """Shapley values of ``v`` by shap's KernelExplainer over binary coalitions (background: no feature kept).

    With ``exact=True``, or whenever ``n_samples`` reaches the 2^d - 2 proper coalitions, shap enumerates all of
    them and the result is the exact Shapley values (summing to v(all) - v(none)); otherwise shap enumerates the
    subset sizes the budget covers and samples the rest in complementary pairs. shap's L1 feature selection is
    off, so every feature gets a value and the efficiency constraint holds for sampled runs too.

    shap draws its coalitions from numpy's global RNG: each shap call seeds it with ``seed`` and restores the
    caller's state afterwards, so the user's random stream is unchanged. shap picks its coalitions before it sees
    any value, so a first pass with placeholder values finds them; they are yielded (with all and none) in one
    batch, and a second pass with the same seed reads every value from that batch.
    """
    import shap

    check_features(n_features)
    n_coalitions = 2**n_features - 2
    if exact:
        check_budget("exact KernelSHAP", n_coalitions + 2, max_evaluations,
                      "use exact=False with n_samples, or a coarser granularity (fewer features)")
        n_samples = n_coalitions
    else:
        n_samples = default_n_samples(n_features) if n_samples is None else check_count("n_samples", n_samples, 1)
        n_samples = min(n_samples, n_coalitions)
        check_budget("KernelSHAP", n_samples + 2, max_evaluations, "lower n_samples")
    everything, nothing = np.ones((1, n_features), dtype=bool), np.zeros((1, n_features), dtype=bool)
    run_seed = int(np.random.default_rng().integers(2**32)) if seed is None else seed  # both passes draw alike

    def shap_values(model: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        state = np.random.get_state()
        try:
            np.random.seed(run_seed)
            explainer = shap.KernelExplainer(model, nothing.astype(np.float64))
            return explainer.shap_values(everything[0].astype(np.float64), nsamples=max(n_samples, 1),
                                         l1_reg=False, silent=True)
        finally:
            np.random.set_state(state)

    asked: list[np.ndarray] = [everything, nothing]

    def record(coalitions: np.ndarray) -> np.ndarray:
        asked.append(coalitions > 0.5)
        return np.zeros(len(coalitions))

    shap_values(record)
    masks = np.concatenate(asked)
    values, n_evaluations = yield from distinct_values(masks)
    table = {row.tobytes(): value for row, value in zip(np.packbits(masks, axis=1), values)}

    def lookup(coalitions: np.ndarray) -> np.ndarray:
        return np.stack([table[row.tobytes()] for row in np.packbits(coalitions > 0.5, axis=1)])

    phi = shap_values(lookup)
    extras = {
        "exact": n_samples >= n_coalitions,
        "n_coalitions": n_samples,
        "value_all": float(values[0].reshape(-1)[0]),  # first output column
        "value_none": float(values[1].reshape(-1)[0]),
    }
    return Estimate(per_column(np.asarray(phi, dtype=np.float64)), n_evaluations, extras)


def lime_samples(n_features: int, n_samples: int, rng: np.random.Generator) -> np.ndarray:
    """LIME's text neighbourhood: the input itself, then rows that drop a uniform number (1..d) of random features."""
    masks = np.ones((n_samples, n_features), dtype=bool)
    sizes = rng.integers(1, n_features + 1, size=n_samples - 1)
    ranks = rng.random((n_samples - 1, n_features)).argsort(axis=1).argsort(axis=1)  # a random order per row
    masks[1:] = ranks >= sizes[:, None]
    return masks


def lime_kernel(distances: np.ndarray, kernel_width: float) -> np.ndarray:
    """LIME's exponential kernel on distances (as LimeTextExplainer defines it)."""
    return np.sqrt(np.exp(-(distances**2) / kernel_width**2))


def lime_plan(
    n_features: int,
    *,
    n_samples: Optional[int] = None,
    kernel_width: float = 25.0,
    alpha: float = 1.0,
    seed: Optional[int] = 0,
    max_evaluations: int = DEFAULT_MAX_EVALUATIONS,
) -> EstimatorPlan:
    """Coefficients of LIME's weighted Ridge surrogate (lime.lime_base.LimeBase) fitted on binary coalitions.

    Neighbourhood, distance (cosine distance to the full input x 100) and kernel are LimeTextExplainer's; the fit
    is LimeBase's Ridge(alpha) with an intercept and no feature selection. Extras: the surrogate's weighted R^2
    (``r2``) and ``intercept`` for the first output column. Further output columns (per-target tokens) are fitted
    at once by the same weighted Ridge.
    """
    from lime.lime_base import LimeBase
    from sklearn.linear_model import Ridge

    check_features(n_features)
    n_samples = default_n_samples(n_features) if n_samples is None else check_count("n_samples", n_samples, 2)
    if isinstance(kernel_width, bool) or not isinstance(kernel_width, (int, float)) or not 0 < kernel_width < np.inf:
        raise InvalidInputError(f"kernel_width must be a finite number > 0, got {kernel_width!r}")
    check_budget("LIME", n_samples, max_evaluations, "lower n_samples")
    masks = lime_samples(n_features, n_samples, np.random.default_rng(seed))
    scores, n_evaluations = yield from distinct_values(masks)
    labels = scores.reshape(n_samples, -1)
    data = masks.astype(np.float64)
    distances = (1.0 - np.sqrt(masks.sum(1) / n_features)) * 100.0  # cosine distance of a 0/1 row to all-ones
    base = LimeBase(lambda d: lime_kernel(d, kernel_width), random_state=seed)
    intercept, ranked, r2, _ = base.explain_instance_with_data(
        data, labels, distances, label=0, num_features=n_features, feature_selection="none",
        model_regressor=Ridge(alpha=alpha, fit_intercept=True),
    )
    coefficients = np.zeros((labels.shape[1], n_features))
    for feature, coefficient in ranked:
        coefficients[0, feature] = coefficient
    if labels.shape[1] > 1:
        weights = lime_kernel(distances, kernel_width)
        rest = Ridge(alpha=alpha, fit_intercept=True).fit(data, labels[:, 1:], sample_weight=weights)
        coefficients[1:] = rest.coef_
    values = coefficients[0] if scores.ndim == 1 else coefficients
    return Estimate(values, n_evaluations, {"r2": float(r2), "intercept": float(intercept)})


def sobol_plan(
    n_features: int,
    *,
    n_samples: Optional[int] = None,
    seed: Optional[int] = 0,
    max_evaluations: int = DEFAULT_MAX_EVALUATIONS,
) -> EstimatorPlan:
    """Total-order Sobol indices of ``v`` over independent fair-coin feature masks (Jansen estimator).

    Two mask matrices A and B come from one scrambled Sobol sequence in 2d dimensions (thresholded at 1/2); AB_i
    is A with column i from B. ST_i = mean((v(A) - v(AB_i))^2) / (2 Var v), which for binary masks estimates
    E[(v(x with i) - v(x without i))^2] / (4 Var v). Costs ``n_samples * (d + 2)`` evaluations before deduplication
    (default 32 base points; powers of two keep the sequence balanced). Extras: ``variance`` of the first output
    column. Indices are >= 0 and not additive; a constant ``v`` gives zeros.
    """
    from scipy.stats import qmc

    check_features(n_features)
    n_samples = DEFAULT_SOBOL_SAMPLES if n_samples is None else check_count("n_samples", n_samples, 2)
    if 2 * n_features > SOBOL_MAX_DIMENSION:
        raise BudgetError(f"Sobol sampling supports at most {SOBOL_MAX_DIMENSION // 2} features, got {n_features}")
    check_budget("Sobol", n_samples * (n_features + 2), max_evaluations, "lower n_samples or use fewer features")
    sampler = qmc.Sobol(d=2 * n_features, scramble=True, seed=seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*balance properties of Sobol' points.*")
        points = sampler.random(n_samples) < 0.5
    a, b = points[:, :n_features], points[:, n_features:]
    ab = np.repeat(a[None], n_features, axis=0)  # (d, N, d)
    features = np.arange(n_features)
    ab[features, :, features] = b.T
    scores, n_evaluations = yield from distinct_values(np.concatenate([a, b, ab.reshape(-1, n_features)]))
    columns = scores.reshape(len(scores), -1)
    f_a, f_b = columns[:n_samples], columns[n_samples : 2 * n_samples]
    f_ab = columns[2 * n_samples :].reshape(n_features, n_samples, -1)
    variance = np.concatenate([f_a, f_b]).var(axis=0)  # (K,)
    total = 0.5 * ((f_a[None] - f_ab) ** 2).mean(axis=1)  # (d, K)
    indices = np.divide(total, variance, out=np.zeros_like(total), where=variance > 0)
    values = indices[:, 0] if scores.ndim == 1 else indices.T
    return Estimate(values, n_evaluations, {"variance": float(variance[0])})


def occlusion(value_fn: ValueFunction, n_features: int, *, batch_size: Optional[int] = None,
              **params: Any) -> Estimate:
    """``occlusion_plan`` driven by ``value_fn``."""
    return run_with(occlusion_plan(n_features, **params), value_fn, n_features, batch_size)


def kernel_shap(value_fn: ValueFunction, n_features: int, *, batch_size: Optional[int] = None,
                **params: Any) -> Estimate:
    """``kernel_shap_plan`` driven by ``value_fn``."""
    return run_with(kernel_shap_plan(n_features, **params), value_fn, n_features, batch_size)


def lime(value_fn: ValueFunction, n_features: int, *, batch_size: Optional[int] = None, **params: Any) -> Estimate:
    """``lime_plan`` driven by ``value_fn``."""
    return run_with(lime_plan(n_features, **params), value_fn, n_features, batch_size)


def sobol_total(value_fn: ValueFunction, n_features: int, *, batch_size: Optional[int] = None,
                **params: Any) -> Estimate:
    """``sobol_plan`` driven by ``value_fn``."""
    return run_with(sobol_plan(n_features, **params), value_fn, n_features, batch_size)
