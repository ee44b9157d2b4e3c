"""Context-attribution metrics of ContextCite (Cohen-Wang et al. 2024): does the explained score move the way the
scores say when sources (features: sentences of a document, usually) are dropped?

- top-k drop: f(x) - f(x without the k highest-scored sources), for each k of ``top_k``, k clipped to the number of
  sources (higher is better; compare with the same drop for random orders).
- LDS, the linear datamodeling score: over ``n_ablations`` random half-ablations (each source kept with probability
  1/2), the Spearman rank correlation between the scores' linear predictions (the sum of the kept sources' scores)
  and f of each ablation (1: the scores order the ablations exactly as the model does; 0: chance).

Only numbers here: the masks are scored with the other edits of a check (``edits.plan_edits``).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
from scipy.stats import spearmanr

CONTEXT_METRICS = ("top_k_drop", "lds")
DEFAULT_TOP_K = (1, 3, 5)
DEFAULT_N_ABLATIONS = 32
ABLATION_STREAM = 1  # the ablations' generator is default_rng((seed, ABLATION_STREAM)), apart from the random orders'


def clipped_top_k(top_k: Sequence[int], n_features: int) -> list[int]:
    """The features each k of ``top_k`` removes: k, or every feature when there are fewer."""
    return [min(k, n_features) for k in top_k]


def draw_ablations(seed: int, n_ablations: int, n_features: int) -> np.ndarray:
    """(n_ablations, n_features) keep-masks, each feature kept with probability 1/2:
    ``numpy.random.default_rng((seed, 1)).random((n_ablations, n_features)) < 0.5``. A stream of their own, so asking
    for LDS leaves the random orders (``default_rng(seed)``) as they were, and ``n_random`` leaves LDS as it was."""
    return np.random.default_rng((seed, ABLATION_STREAM)).random((n_ablations, n_features)) < 0.5


def linear_datamodeling_score(scores: Sequence[float], ablations: np.ndarray,
                              values: np.ndarray) -> tuple[float, Optional[str]]:
    """(LDS, None), or (NaN, why) when a rank correlation is undefined: the predictions or the values are constant."""
    predictions = ablations.astype(float) @ np.asarray(scores, dtype=float)
    for name, series, cause in (
        ("the linear predictions (sums of the kept sources' scores)", predictions,
         "every score is 0, or every ablation kept the same sources"),
        ("the explained scores of the ablations", values,
         "the model's score does not depend on which sources are kept"),
    ):
        if np.ptp(series) == 0.0:
            return math.nan, f"LDS undefined: {name} are the same for all {len(values)} ablations ({cause})"
    return float(spearmanr(predictions, values).statistic), None
