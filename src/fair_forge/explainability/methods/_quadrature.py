"""Path integrals over alpha in [0, 1] for integrated gradients, as a generator the caller feeds.

The caller knows how to evaluate the integrand at points of the straight path from the baseline (alpha = 0) to
the input (alpha = 1); this module decides where and how to weight them. Protocol::

    rule = integrate(total, n_steps=64)
    alphas = next(rule)                       # (k,) points in (0, 1)
    while True:
        try:
            alphas = rule.send((scalar, vector))  # integrand values at the last points
        except StopIteration as stop:
            integral = stop.value                 # an Integral
            break

``scalar`` (k,) is d f(b + alpha (x - b)) / d alpha at each point, whose integral must equal ``total`` =
f(x) - f(b) (completeness); it is what the error is measured on. ``vector`` (k, ...) is what is integrated (for
integrated gradients: per-token contributions (x - b) * gradient, summed over the hidden dimension).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generator, Optional

import numpy as np

DEFAULT_STEPS = 64

Integrand = tuple[np.ndarray, np.ndarray]


@dataclass(frozen=True)
class Integral:
    """The integral of the vector integrand, what it cost and how far the scalar integrand is from ``total``."""

    value: np.ndarray
    n_evaluations: int
    error: Optional[float]  # |integral of scalar - total| / |total|; None when total is 0
    converged: bool


def gauss_legendre(steps: int) -> tuple[np.ndarray, np.ndarray]:
    """``steps`` Gauss-Legendre nodes in (0, 1) and their weights (sum 1)."""
    nodes, weights = np.polynomial.legendre.leggauss(steps)
    return (nodes + 1.0) / 2.0, weights / 2.0


def relative_error(estimate: float, total: float) -> Optional[float]:
    """|estimate - total| / |total|, or None when ``total`` is 0."""
    return abs(estimate - total) / abs(total) if total else None


def integrate(
    total: float, *, n_steps: Optional[int] = None, tolerance: float = 0.01, max_steps: Optional[int] = None
) -> Generator[np.ndarray, Integrand, Integral]:
    """Fixed Gauss-Legendre rule with ``n_steps`` nodes (default ``DEFAULT_STEPS``), asked for in one batch.

    ``max_steps`` (a positive int) bounds adaptive rules; the fixed rule only validates it."""
    if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1):
        raise ValueError(f"max_steps must be a positive integer, got {max_steps!r}")
    nodes, weights = gauss_legendre(n_steps or DEFAULT_STEPS)
    scalar, vector = yield nodes
    scalar, vector = np.asarray(scalar, dtype=np.float64), np.asarray(vector, dtype=np.float64)
    error = relative_error(float(weights @ scalar), total)
    value = np.tensordot(weights, vector, axes=(0, 0))
    return Integral(value, len(nodes), error, error is None or error <= tolerance)
