"""Hierarchical search: attribute to groups of consecutive features first, then only to the features of the groups
that matter, the other groups held as they are (unmasked context).

A long document's answer usually comes from a few of its passages, yet a flat ablation method pays for every
sentence: occlusion one row each, LIME four rows each (``max(100, 4 x features)``). Run on ~sqrt(n) groups first,
then on the sentences of the few groups kept, it pays for ~sqrt(n) groups plus the kept groups' sentences.

The search composes the estimators of ``coalitions`` and ``sparse`` unchanged: ``hierarchical_plan`` is itself an
estimator plan over the full feature masks (so ``run_with`` drives it with a plain value function, and
``perturbation._Masks`` turns its masks into model calls like any estimator's):

1. **Groups** (``feature_groups``): paragraphs (features separated by a blank line in their message's text, or in
   different messages), packed whole into groups of at most ``ceil(sqrt(n))`` features; a paragraph longer than
   that is cut into runs of that many. A text without blank lines is cut into runs of ``ceil(sqrt(n))``. Packing
   keeps one-sentence paragraphs (section titles) from making the first stage as costly as the flat run, and cutting
   keeps one long paragraph from making the second stage the flat run.
2. **Group effects**: the method on the group-level features (a group's mask masks all its features), and with the
   first request each group's own ablation effect, v(all) - v(all but the group) (occlusion's own rows).
3. **Selection** (``select_groups``): the groups with the largest |effect| that together cover ``KEEP_SHARE`` of
   the total |effect|, then every group whose own |ablation effect| exceeds a kept group's (so a group that moves the
   score more on its own than a kept one is never pruned, whatever the surrogate made of it). If no group has any
   effect, all are kept (the search learnt nothing, so it gives the flat answer).
4. **Features**: the method on the kept groups' features, every other feature kept. Pruned features score 0.

Each distinct mask is asked for once over both stages, so ``n_evaluations`` counts distinct rows; with every group
kept, the second stage is the flat estimator (same seed, same masks). ``max_evaluations`` bounds the whole search:
the second stage gets what the first left.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Generator, Optional, Sequence

import numpy as np

from ..core.plans import relay
from ..errors import InvalidInputError
from ..text.prompt import ModelInput
from ..text.segment import Feature
from .coalitions import Estimate, EstimatorPlan, check_features

KEEP_SHARE = 0.9  # the kept groups cover this share of the total |group effect|
PARAGRAPH_BREAK = re.compile(r"\n[^\S\n]*\n")

# (n_features, max_evaluations or None) -> the method's estimator plan over that many features
EstimatorFactory = Callable[[int, Optional[int]], EstimatorPlan]


def feature_groups(features: Sequence[Feature], model_input: ModelInput) -> list[list[int]]:
    """The feature indices in groups of consecutive features, by the rule of the module docstring."""
    size = math.ceil(math.sqrt(len(features)))
    contents = {source.message_index: source.content for source in model_input.sources}
    paragraphs: list[list[int]] = []
    for index, feature in enumerate(features):
        before = features[index - 1] if index else None
        if before is None or _paragraph_break(before, feature, contents):
            paragraphs.append([])
        paragraphs[-1].append(index)
    pieces = [paragraph[start : start + size] for paragraph in paragraphs for start in range(0, len(paragraph), size)]
    groups: list[list[int]] = []
    for piece in pieces:
        if groups and len(groups[-1]) + len(piece) <= size:
            groups[-1].extend(piece)
        else:
            groups.append(list(piece))
    return groups


def _paragraph_break(before: Feature, after: Feature, contents: dict[Optional[int], str]) -> bool:
    """Whether a paragraph ends between two consecutive features: another message, a template token, a blank line."""
    if before.message_index != after.message_index or before.end is None or after.start is None:
        return True
    text = contents.get(before.message_index, "")
    return PARAGRAPH_BREAK.search(text, before.end, after.start) is not None


def select_groups(effects: np.ndarray, ablation_effects: np.ndarray, share: float = KEEP_SHARE) -> np.ndarray:
    """(groups,) bool, True for the groups whose features are searched (step 3 of the module docstring)."""
    magnitude, own = np.abs(np.asarray(effects, dtype=float)), np.abs(np.asarray(ablation_effects, dtype=float))
    total = magnitude.sum()
    if not total > 0:
        return np.ones(len(magnitude), dtype=bool)
    order = np.argsort(-magnitude, kind="stable")
    covered = np.cumsum(magnitude[order])
    kept = np.zeros(len(magnitude), dtype=bool)
    kept[order[: int(np.argmax(covered >= share * total)) + 1]] = True
    return kept | (own > own[kept].min())


class _DistinctRows:
    """The full masks asked for so far and their values: each distinct mask is asked for once. Rows put in
    ``pending`` go with the next request."""

    def __init__(self) -> None:
        self.values: dict[bytes, np.ndarray] = {}
        self.pending: list[np.ndarray] = []

    def ask(self, masks: np.ndarray) -> Generator[np.ndarray, np.ndarray, np.ndarray]:
        """The values of ``masks`` (n, d), asking for the rows not seen yet (and the pending ones) in one request."""
        rows = np.concatenate([masks, *self.pending])
        self.pending = []
        keys = [row.tobytes() for row in np.packbits(rows, axis=1)]
        first = {key: index for index, key in reversed(list(enumerate(keys)))}  # each key's first row
        missing = sorted(index for key, index in first.items() if key not in self.values)
        if missing:
            answer = np.asarray((yield rows[missing]), dtype=np.float64)
            self.values.update((keys[index], value) for index, value in zip(missing, answer))
        return np.stack([self.values[key] for key in keys[: len(masks)]])


def _first_column(values: np.ndarray) -> np.ndarray:
    """An estimate's scores of the explained score: (d,) of (d,) or the first row of (K, d)."""
    return values if values.ndim == 1 else values[0]


def hierarchical_plan(n_features: int, groups: Sequence[Sequence[int]], estimator: EstimatorFactory, *,
                      max_evaluations: Optional[int] = None, share: float = KEEP_SHARE) -> EstimatorPlan:
    """The method ``estimator`` run on ``groups`` of the ``n_features`` features, then on the features of the groups
    it keeps (module docstring). Extras: the second stage's, and ``hierarchical`` (what was kept and pruned)."""
    check_features(n_features)
    if [feature for group in groups for feature in group] != list(range(n_features)) or not all(groups):
        raise InvalidInputError(f"groups must be non-empty runs of consecutive features covering all {n_features}")
    member = np.repeat(np.arange(len(groups)), [len(group) for group in groups])  # each feature's group
    rows = _DistinctRows()
    alone = np.ones((1 + len(groups), n_features), dtype=bool)  # the input, then each group masked alone
    for index, group in enumerate(groups):
        alone[1 + index, list(group)] = False
    rows.pending.append(alone)
    budget = None if max_evaluations is None else max_evaluations - len(alone)
    coarse = yield from relay(estimator(len(groups), budget), lambda masks: rows.ask(masks[:, member]))
    own = yield from rows.ask(alone)  # already scored: asks for nothing
    scores = own if own.ndim == 1 else own[:, 0]
    ablation = scores[0] - scores[1:]
    effects = _first_column(coarse.values)
    kept = select_groups(effects, ablation, share)
    searched = np.flatnonzero(kept[member])
    n_group_rows = len(rows.values)

    def within(masks: np.ndarray) -> Generator[np.ndarray, np.ndarray, np.ndarray]:
        full = np.ones((len(masks), n_features), dtype=bool)
        full[:, searched] = masks
        return (yield from rows.ask(full))

    left = None if max_evaluations is None else max_evaluations - n_group_rows
    fine = yield from relay(estimator(len(searched), left), within)
    values = np.zeros(fine.values.shape[:-1] + (n_features,))
    values[..., searched] = fine.values
    report: dict[str, Any] = {
        "n_groups": len(groups),
        "groups": [[int(group[0]), int(group[-1]) + 1] for group in groups],
        "kept_groups": np.flatnonzero(kept).tolist(),
        "pruned_features": np.flatnonzero(~kept[member]).tolist(),
        "group_scores": [float(value) for value in effects],
        "group_ablation_effects": [float(value) for value in ablation],
        "n_evaluations_groups": n_group_rows,
        "n_evaluations_features": len(rows.values) - n_group_rows,
    }
    return Estimate(values, len(rows.values), {**fine.extras, "hierarchical": report})
