"""Faithfulness: does the model follow an explanation's ranking? Edit the input and watch the explained score.

Features are ranked by signed score, highest first (ties: reading order), and removed or kept in that order with
the masking of the perturbation methods: ``mode="remove"`` deletes their tokens (the kept tokens move right and the
freed slots leave attention and positions, as if the shorter text were run), ``mode="replace"`` puts the baseline
token in their place. With f the explained score (``AttributionExplainer(score=...)``), x the input, and top_k the
k highest-ranked features, where k = ceil(fraction x n_features) (at least one feature for any fraction > 0):

- comprehensiveness = mean over ``fractions`` of f(x) - f(x without top_k)   (higher: the ranking found what matters)
- sufficiency       = mean over ``fractions`` of f(x) - f(only top_k kept)   (lower: the top features alone suffice)
- deletion curve    f(x without top_k) at ``curve_points`` fractions from 0 to 1, and its area (lower is better)
- insertion curve   f(only top_k kept) at the same fractions, and its area (higher is better)

(ERASER's AOPC comprehensiveness and sufficiency, DeYoung et al. 2020; RISE's deletion and insertion areas.) The same
numbers for ``n_random`` random orders (mean and spread) say what chance gives. ``metrics=`` adds (or computes alone)
ContextCite's context metrics (``context.py``): the top-k drop f(x) - f(x without the top k) for each k of ``top_k``,
and the linear datamodeling score, the rank correlation over ``n_ablations`` random half-ablations between the sum of
the kept features' scores and f. All edits of all items go through the ``TargetScorer`` in packed no-grad model calls
(``edits.py``); the random orders are drawn from ``numpy.random.default_rng(seed)`` and the ablations from
``default_rng((seed, 1))`` per item, so a batch gives the same numbers as its items one by one.
"""

from .compare import compare_methods, plot_faithfulness
from .context import CONTEXT_METRICS, DEFAULT_N_ABLATIONS, DEFAULT_TOP_K
from .edits import DEFAULT_FRACTIONS, removed_count
from .measure import faithfulness
from .reports import METRICS, EditMode, FaithfulnessBatchReport, FaithfulnessReport, FaithfulnessScores

__all__ = [
    "CONTEXT_METRICS",
    "DEFAULT_FRACTIONS",
    "DEFAULT_N_ABLATIONS",
    "DEFAULT_TOP_K",
    "METRICS",
    "EditMode",
    "FaithfulnessBatchReport",
    "FaithfulnessReport",
    "FaithfulnessScores",
    "compare_methods",
    "faithfulness",
    "plot_faithfulness",
    "removed_count",
]
