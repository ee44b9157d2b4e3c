"""The fairness audit's report: one row per item, per-group means with bootstrap confidence intervals, the
differences between groups, and every item that failed. pydantic and numpy only (the runner is ``runs/audit.py``).

The metrics of an item (``AuditItem``), all from its explanations:

- ``target_score``: the explained score at the input, f(x) (log p(target), or the margin log p(target) -
  log p(contrast) for a contrastive item): the decision itself.
- ``protected_share``: sum |score| of the protected features / sum |score| of all features, in [0, 1]: how much of
  the attribution mass the protected words hold (0 when the item has none; None when every score is 0).
- ``protected_signed``: the signed sum of the protected features' scores (towards the target when positive).
- ``counterfactual_gap``: f(x) - f(x'), where x' swaps the protected words; ``gap_on_protected``: the part of that
  gap the protected differences carry (their scores' sum: all of it for a Shapley-type method when every
  difference is a protected word).

Confidence intervals are percentile bootstrap intervals of the mean, from a numpy ``Generator`` seeded by the
report's seed and the (metric, group) they belong to, so each is reproducible on its own.
"""

from __future__ import annotations

import os
import zlib
from typing import Any, Literal, Optional, Sequence, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

#: The metrics every report estimates, per group and overall (protected_share[attribute] is added per attribute).
METRICS: tuple[str, ...] = ("target_score", "protected_share", "protected_signed", "counterfactual_gap",
                            "gap_on_protected")
#: Bootstrap draws are made in chunks of at most this many indices, so memory stays bounded for large groups.
MAX_DRAWS_PER_CHUNK = 2**22
ALL_ITEMS = "(all)"
NO_GROUP = "(no group)"


class Carrier(BaseModel):
    """One difference between x and x' in a counterfactual explanation, and the part of the gap it carries."""

    model_config = ConfigDict(frozen=True)

    text: str
    counterfactual_text: str
    score: float
    protected: bool


class AuditItem(BaseModel):
    """One item of the audit: its group, its decision score, the mass on protected words, its counterfactual gap.

    A metric is None where the explanation it comes from failed (see the report's ``failures``) or does not exist
    (``no_counterfactual`` says why an item has no counterfactual).
    """

    index: int = Field(description="the item's position in the source")
    item_id: str
    group: Optional[str] = None
    prompt: Optional[str] = None
    target: Optional[str] = None
    contrast_target: Optional[str] = None
    target_score: Optional[float] = None
    protected_share: Optional[float] = None
    protected_signed: Optional[float] = None
    protected_words: list[str] = Field(default_factory=list, description="the protected features' texts")
    attribute_shares: dict[str, float] = Field(default_factory=dict, description="protected_share per attribute")
    counterfactual_prompt: Optional[str] = None
    counterfactual_score: Optional[float] = None
    counterfactual_gap: Optional[float] = None
    gap_on_protected: Optional[float] = None
    carriers: list[Carrier] = Field(default_factory=list, description="the differences, strongest |score| first")
    no_counterfactual: Optional[str] = Field(default=None, description="why the item has no counterfactual")

    def metric(self, name: str) -> Optional[float]:
        """The value of a metric of ``METRICS`` or ``protected_share[attribute]``."""
        if name.startswith("protected_share[") and name.endswith("]"):
            return self.attribute_shares.get(name[len("protected_share["):-1])
        return getattr(self, name)


class AuditFailure(BaseModel):
    """An item, or one of its explanations, that could not be computed, and why."""

    index: int
    item_id: str
    stage: Literal["input", "explanation", "counterfactual"]
    error_type: str
    message: str


class _GroupStatistic(BaseModel):
    """What a per-group statistic is of: a metric, a group, and how many items with the metric it holds."""

    metric: str
    group: str = Field(description=f"a group, {ALL_ITEMS!r} for every item, {NO_GROUP!r} for items without one")
    n: int


class GroupEstimate(_GroupStatistic):
    """The mean of a metric over a group's items that have it, with its bootstrap confidence interval."""

    mean: Optional[float] = None
    ci_low: Optional[float] = None
    ci_high: Optional[float] = None


class GroupDifference(_GroupStatistic):
    """mean(group) - mean(versus) of a metric, with the bootstrap confidence interval of that difference."""

    versus: Optional[str] = Field(description="the other group, or None for every other group together")
    n_versus: int
    difference: Optional[float] = None
    ci_low: Optional[float] = None
    ci_high: Optional[float] = None


class AuditSettings(BaseModel):
    """How the audit was made: what a reader needs to interpret (and to repeat) it."""

    model_name: str
    method: str
    granularity: str
    method_params: dict[str, Any] = Field(default_factory=dict)
    protected: Union[dict[str, list[str]], Literal["spans"]]
    group: Optional[str] = None
    counterfactual: Optional[str] = Field(default=None, description="how x' was made (None: the items' own, if any)")
    contrast: str = Field(default="logprob_diff", description="the contrastive score of items with a contrast target")
    n_bootstrap: int = Field(ge=1)
    confidence: float = Field(gt=0.0, lt=1.0)
    seed: int = Field(ge=0)

    @property
    def metrics(self) -> tuple[str, ...]:
        """``METRICS``, then one protected_share per attribute when several attributes are audited."""
        if isinstance(self.protected, dict) and len(self.protected) > 1:
            return METRICS + tuple(f"protected_share[{name}]" for name in self.protected)
        return METRICS


class AuditReport(BaseModel):
    """The audit of a dataset: its items, per-group estimates and differences, failures; JSON round trip equal."""

    model_config = ConfigDict(ser_json_inf_nan="constants")

    settings: AuditSettings
    items: list[AuditItem]
    estimates: list[GroupEstimate]
    differences: list[GroupDifference]
    failures: list[AuditFailure] = Field(default_factory=list)

    @classmethod
    def build(cls, settings: AuditSettings, items: Sequence[AuditItem],
              failures: Sequence[AuditFailure] = ()) -> "AuditReport":
        """The report of ``items``: every estimate and difference computed from their metrics."""
        estimates, differences = [], []
        for metric in settings.metrics:
            by_group = _values_by_group(items, metric)
            for group, values in by_group.items():
                estimates.append(GroupEstimate(metric=metric, group=group, n=len(values),
                                               **_estimate(values, settings, metric, group)))
            differences += _differences(by_group, settings, metric)
        return cls(settings=settings, items=sorted(items, key=lambda item: item.index), estimates=estimates,
                   differences=differences, failures=sorted(failures, key=lambda f: (f.index, f.stage)))

    @property
    def groups(self) -> list[str]:
        """The items' groups, sorted (items without a group are in none)."""
        return sorted({item.group for item in self.items if item.group is not None})

    def estimate(self, metric: str, group: str = ALL_ITEMS) -> GroupEstimate:
        """The estimate of ``metric`` for ``group`` (every item by default)."""
        for estimate in self.estimates:
            if estimate.metric == metric and estimate.group == group:
                return estimate
        raise KeyError(f"no estimate of {metric!r} for group {group!r}; groups: {[ALL_ITEMS, *self.groups]}")

    def to_dataframe(self) -> Any:
        """One row per item: its group, texts, metrics, the differences that carry its gap, and its failures."""
        import pandas as pd

        failed: dict[int, list[str]] = {}
        for failure in self.failures:
            failed.setdefault(failure.index, []).append(f"{failure.stage}: {failure.error_type}: {failure.message}")
        rows = []
        for item in self.items:
            row = item.model_dump(exclude={"attribute_shares", "carriers"})
            row.update({f"protected_share[{name}]": share for name, share in item.attribute_shares.items()})
            row["carriers"] = "; ".join(f"{c.text.strip()}\u2192{c.counterfactual_text.strip()} ({c.score:+.4g})"
                                        for c in item.carriers) or None
            row["failures"] = "; ".join(failed.get(item.index, [])) or None
            rows.append(row)
        return pd.DataFrame(rows)

    def summary(self) -> Any:
        """One row per group (every item first, then each group, then items without one): item counts and, per
        metric, its mean and confidence interval (columns ``<metric>``, ``<metric>_low``, ``<metric>_high``)."""
        import pandas as pd

        rows: dict[str, dict[str, Any]] = {}
        for estimate in self.estimates:
            row = rows.setdefault(estimate.group, {"group": estimate.group, "n_items": 0})
            if estimate.metric == "target_score":
                row["n_explained"] = estimate.n
            if estimate.metric == "counterfactual_gap":
                row["n_counterfactual"] = estimate.n
            row.update({estimate.metric: estimate.mean, f"{estimate.metric}_low": estimate.ci_low,
                        f"{estimate.metric}_high": estimate.ci_high})
        for item in self.items:
            for group in _memberships(item):
                if group in rows:
                    rows[group]["n_items"] += 1
        return pd.DataFrame(list(rows.values()))

    def differences_table(self) -> Any:
        """One row per (metric, group): mean(group) - mean(versus; "rest" for every other group) and its interval."""
        import pandas as pd

        rows = [{**difference.model_dump(), "versus": difference.versus or "rest"} for difference in self.differences]
        return pd.DataFrame(rows, columns=list(GroupDifference.model_fields))

    def plot(self) -> Any:
        """Per group, the mean protected share and the mean counterfactual gap with their confidence intervals as
        error bars (a pyplot-free matplotlib Figure)."""
        return _facade().plot_audit(self)

    def save_html(self, path: Union[str, os.PathLike[str]], top: int = 10) -> Any:
        """Write the self-contained, escaped HTML report (table, plot, the ``top`` items with the largest gaps)."""
        return _facade().save_audit_html(self, path, top)


# ---- statistics -------------------------------------------------------------------------------------------------


def protected_mass(scores: Sequence[float], protected: Sequence[bool]) -> tuple[Optional[float], float]:
    """(share of the |score| mass on the protected features, None when all scores are 0; their signed sum)."""
    values = np.asarray(scores, dtype=float)
    chosen = np.asarray(protected, dtype=bool)
    total = float(np.abs(values).sum())
    share = float(np.abs(values[chosen]).sum()) / total if total > 0 else None
    return share, float(values[chosen].sum())


def bootstrap_means(values: np.ndarray, n_bootstrap: int, rng: np.random.Generator) -> np.ndarray:
    """``n_bootstrap`` means of resamples (with replacement, of the same size) of ``values``."""
    size = len(values)
    means = np.empty(n_bootstrap)
    chunk = max(1, MAX_DRAWS_PER_CHUNK // size)
    for start in range(0, n_bootstrap, chunk):
        stop = min(n_bootstrap, start + chunk)
        means[start:stop] = values[rng.integers(0, size, size=(stop - start, size))].mean(axis=1)
    return means


def percentile_interval(samples: np.ndarray, confidence: float) -> tuple[float, float]:
    """The central ``confidence`` interval of bootstrap ``samples`` (the percentile method)."""
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(samples, [tail, 1.0 - tail])
    return float(low), float(high)


def seeded_rng(seed: int, *key: str) -> np.random.Generator:
    """A Generator for one statistic: the report's seed and the statistic's name, so that no interval depends on
    which others were computed before it."""
    return np.random.default_rng([seed, zlib.crc32("\x1f".join(key).encode("utf-8"))])


def _estimate(values: list[float], settings: AuditSettings, metric: str, group: str) -> dict[str, Optional[float]]:
    if not values:
        return {}
    data = np.asarray(values, dtype=float)
    means = bootstrap_means(data, settings.n_bootstrap, seeded_rng(settings.seed, metric, group))
    low, high = percentile_interval(means, settings.confidence)
    return {"mean": float(data.mean()), "ci_low": low, "ci_high": high}


def _memberships(item: AuditItem) -> tuple[str, ...]:
    """The summary rows an item counts in: every item, and its group (or the row of items without one)."""
    return ALL_ITEMS, item.group if item.group is not None else NO_GROUP


def _values_by_group(items: Sequence[AuditItem], metric: str) -> dict[str, list[float]]:
    """The metric's values (items that have it) for every item, each group, and the items without a group."""
    groups = sorted({item.group for item in items if item.group is not None})
    found: dict[str, list[float]] = {ALL_ITEMS: [], **{group: [] for group in groups}}
    for item in items:
        value = item.metric(metric)
        if item.group is None:
            found.setdefault(NO_GROUP, [])
        if value is not None:
            for group in _memberships(item):
                found[group].append(value)
    return found


def _differences(by_group: dict[str, list[float]], settings: AuditSettings, metric: str) -> list[GroupDifference]:
    """Two groups: the first minus the second. More: each group minus every other group together."""
    groups = [group for group in by_group if group not in (ALL_ITEMS, NO_GROUP)]
    if len(groups) < 2:
        return []
    if len(groups) == 2:
        pairs = [(groups[0], groups[1], by_group[groups[1]])]
    else:
        pairs = [(group, None, [v for other in groups if other != group for v in by_group[other]]) for group in groups]
    found = []
    for group, versus, others in pairs:
        mine = by_group[group]
        stats: dict[str, Optional[float]] = {}
        if mine and others:
            a, b = np.asarray(mine, dtype=float), np.asarray(others, dtype=float)
            rng = seeded_rng(settings.seed, "difference", metric, group, versus or "")
            samples = bootstrap_means(a, settings.n_bootstrap, rng) - bootstrap_means(b, settings.n_bootstrap, rng)
            low, high = percentile_interval(samples, settings.confidence)
            stats = {"difference": float(a.mean() - b.mean()), "ci_low": low, "ci_high": high}
        found.append(GroupDifference(metric=metric, group=group, versus=versus, n=len(mine), n_versus=len(others),
                                     **stats))
    return found


def _facade() -> Any:
    """The report's display methods go through the package facade, the one upward arrow ``core`` has (see
    ``core.types._facade``)."""
    from .types import _facade as facade

    return facade()
