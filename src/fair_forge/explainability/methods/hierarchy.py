"""Hierarchical search: the effect of each group of consecutive features first, then the method on the features of
the groups that matter only, the other groups held as they are (unmasked context).

A long document's answer usually comes from a few of its passages, yet a flat ablation method pays for every
sentence: occlusion one row each, LIME four rows each (``max(100, 4 x features)``), ContextCite one each (32 to 64).
The search pays for ~sqrt(n) group rows plus the kept groups' sentences. ``hierarchical_plan`` is itself an
estimator plan over the full feature masks (``run_with`` drives it with a plain value function, and
``perturbation._Masks`` turns its masks into model calls like any estimator's):

1. **Groups** (``feature_groups``): paragraphs (features separated by a blank line in their message's text, or in
   different messages), packed whole into groups of at most ``ceil(sqrt(n))`` features; a paragraph longer than
   that is cut into runs of that many. A text without blank lines is cut into runs of ``ceil(sqrt(n))``. Packing
   keeps one-sentence paragraphs (section titles) from making the first stage as costly as the flat run, and cutting
   keeps one long paragraph from making the second stage the flat run.
2. **Group effects**, for every method: the input and each group masked alone (G + 1 rows), a group's effect
   v(all) - v(all but the group), as AttriBoT does (Liu et al. 2024). This is occlusion on the groups, and for the
   surrogates (LIME, ContextCite) it replaces a surrogate fitted on the groups: that fit cost 32 rows or more
   (ContextCite) or 100 (LIME) for ~sqrt(n) features, and on a noisy model it spread the effect over every group,
   so that nothing could be pruned (1.3k-token benchmark document: nothing pruned, 65 rows against the flat run's
   36).
3. **Selection** (``select_groups``): a group is pruned when its |effect| is under ``PRUNE_BELOW`` (0.2) of the
   largest group's, negligible against it. So a pruned group never moves the score more on its own than a kept one,
   and the rule does not depend on how many groups there are (a share of the total |effect| would keep ever more
   groups of noise as the document grows). If no group has any effect, all are kept.
4. **Features**: the method on the kept groups' features, every other feature kept. Pruned features score 0. The
   second stage's rows follow the features it searches, not the floors meant for a whole input: ContextCite
   ``sparse.searched_n_ablations`` (one random half-ablation per two features, at least 8, at most 64: about the
   density the flat default has on a long document, 64 rows for ~100 sentences, and the density at which the
   1.3k-token benchmark document kept the flat run's top-3 drop) and LIME ``searched_n_samples`` (4 x features, at
   least 16), unless ``n_samples`` is given. The first stage's rows that lie in the second stage's space (the input,
   each kept group masked alone) are ``given`` to the estimator: ContextCite fits on them besides its random rows,
   at no cost; LIME's first row is the input anyway; occlusion's input row is shared. Fewer rows make a noisier
   fit: on the planted 36-sentence test the second stage's 8 + 3 rows miss a sentence the flat run's 36 find.

Each distinct mask is asked for once over both stages, so ``n_evaluations`` counts distinct rows.
``max_evaluations`` bounds the whole search: the group rows must fit in it, and the second stage gets what they left
(its default rows cut to that). The price: a group whose sentences cancel (one raises the score as much as another
lowers it), or that repeats what another group says (masking either alone changes little), shows no effect and can
be pruned; the flat run would find both.
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
from .coalitions import Estimate, EstimatorPlan, check_budget, check_features

PRUNE_BELOW = 0.2  # a group is pruned when its |ablation effect| is under this share of the largest group's
PARAGRAPH_BREAK = re.compile(r"\n[^\S\n]*\n")

# (n_features, max_evaluations or None, given) -> the method's estimator plan over that many features; ``given``
# (m, n_features) are masks already scored (the input first), which a surrogate may fit on at no cost
EstimatorFactory = Callable[[int, Optional[int], np.ndarray], EstimatorPlan]


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


def select_groups(effects: np.ndarray, threshold: float = PRUNE_BELOW) -> np.ndarray:
    """(groups,) bool, True for the groups whose features are searched: |effect| at least ``threshold`` x the largest
    |effect| (step 3 of the module docstring). No effect anywhere keeps every group."""
    magnitude = np.abs(np.asarray(effects, dtype=float))
    largest = magnitude.max(initial=0.0)
    if not largest > 0:
        return np.ones(len(magnitude), dtype=bool)
    return magnitude >= threshold * largest


class _DistinctRows:
    """The full masks asked for so far and their values: each distinct mask is asked for once."""

    def __init__(self) -> None:
        self.values: dict[bytes, np.ndarray] = {}

    def ask(self, masks: np.ndarray) -> Generator[np.ndarray, np.ndarray, np.ndarray]:
        """The values of ``masks`` (n, d), asking for the rows not seen yet in one request."""
        keys = [row.tobytes() for row in np.packbits(masks, axis=1)]
        first = {key: index for index, key in reversed(list(enumerate(keys)))}  # each key's first row
        missing = sorted(index for key, index in first.items() if key not in self.values)
        if missing:
            answer = np.asarray((yield masks[missing]), dtype=np.float64)
            self.values.update((keys[index], value) for index, value in zip(missing, answer))
        return np.stack([self.values[key] for key in keys])


def hierarchical_plan(n_features: int, groups: Sequence[Sequence[int]], estimator: EstimatorFactory, *,
                      max_evaluations: Optional[int] = None, threshold: float = PRUNE_BELOW) -> EstimatorPlan:
    """Each of ``groups`` of the ``n_features`` features masked alone, then the method ``estimator`` on the features
    of the groups kept (module docstring). Extras: the second stage's, and ``hierarchical`` (what was kept and
    pruned, and each stage's rows)."""
    check_features(n_features)
    if [feature for group in groups for feature in group] != list(range(n_features)) or not all(groups):
        raise InvalidInputError(f"groups must be non-empty runs of consecutive features covering all {n_features}")
    member = np.repeat(np.arange(len(groups)), [len(group) for group in groups])  # each feature's group
    alone = np.ones((1 + len(groups), n_features), dtype=bool)  # the input, then each group masked alone
    for index, group in enumerate(groups):
        alone[1 + index, list(group)] = False
    if max_evaluations is not None:
        check_budget("the hierarchical search", len(alone), max_evaluations, "raise max_evaluations")
    rows = _DistinctRows()
    own = yield from rows.ask(alone)
    scores = own if own.ndim == 1 else own[:, 0]
    effects = scores[0] - scores[1:]
    kept = select_groups(effects, threshold)
    searched = np.flatnonzero(kept[member])
    n_group_rows = len(rows.values)
    given = alone[[0, *(1 + np.flatnonzero(kept))]][:, searched]  # the rows above that lie in the second stage

    def within(masks: np.ndarray) -> Generator[np.ndarray, np.ndarray, np.ndarray]:
        full = np.ones((len(masks), n_features), dtype=bool)
        full[:, searched] = masks
        return (yield from rows.ask(full))

    left = None if max_evaluations is None else max_evaluations - n_group_rows
    fine = yield from relay(estimator(len(searched), left, given), within)
    values = np.zeros(fine.values.shape[:-1] + (n_features,))
    values[..., searched] = fine.values
    report: dict[str, Any] = {
        "n_groups": len(groups),
        "groups": [[int(group[0]), int(group[-1]) + 1] for group in groups],
        "kept_groups": np.flatnonzero(kept).tolist(),
        "pruned_features": np.flatnonzero(~kept[member]).tolist(),
        "group_ablation_effects": [float(value) for value in effects],
        "n_evaluations_groups": n_group_rows,
        "n_evaluations_features": len(rows.values) - n_group_rows,
    }
    return Estimate(values, len(rows.values), {**fine.extras, "hierarchical": report})
