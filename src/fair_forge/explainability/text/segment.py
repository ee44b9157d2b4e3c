"""Features at each granularity: groups of attributable token positions, with their text and character span.

Words and sentences are found in the user's text with regular expressions and then matched to tokens by character
offsets, so any fast tokenizer works (byte-level 'Ġ', SentencePiece '▁', WordPiece '##'). A token that spans two
words joins them into one feature, so a feature is always a set of whole tokens; whitespace-only tokens join the
next word, so every attributable token belongs to exactly one feature (sums over features equal sums over tokens).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from ..errors import InvalidInputError, NoAttributableFeaturesError
from .prompt import ModelInput, SourceSpan
from ..core.types import Granularity

WORD_PATTERN = re.compile(r"\w+(?:['’\-]\w+)*|[^\w\s]")
SENTENCE_PATTERN = re.compile(r"[^\n]+?(?:[.!?]+(?=\s|$)|$)", re.MULTILINE)


@dataclass(frozen=True)
class Feature:
    """One unit to attribute to: token positions in ``input_ids`` plus where its text lies in the user's input."""

    text: str
    token_positions: tuple[int, ...]
    start: Optional[int]  # character span in the source text (message content or prompt); None for template tokens
    end: Optional[int]
    message_index: Optional[int]


def _core_span(text: str, start: int, end: int) -> tuple[int, int]:
    """``[start, end)`` without surrounding whitespace (empty when it is all whitespace)."""
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def _units(source: SourceSpan, text: str, granularity: Granularity) -> list[tuple[int, int]]:
    """Word or sentence spans (in full-text coordinates) inside ``source``."""
    segment = text[source.start : source.end]
    pattern = WORD_PATTERN if granularity is Granularity.WORD else SENTENCE_PATTERN
    spans = []
    for match in pattern.finditer(segment):
        start, end = _core_span(segment, match.start(), match.end())
        if end > start:
            spans.append((source.start + start, source.start + end))
    return spans


def _source_features(model_input: ModelInput, source: SourceSpan, granularity: Granularity) -> list[Feature]:
    text = model_input.text
    positions = [
        p
        for p in range(model_input.target_start)
        if model_input.attributable[p] and model_input.offsets[p][0] < source.end and source.start < model_input.offsets[p][1]
    ]
    # (positions, span) groups in reading order; a token's "core" is its text inside the source, minus whitespace
    groups: list[tuple[list[int], int, int]] = []
    pending: list[int] = []  # whitespace-only tokens waiting for the next group
    units = _units(source, text, granularity) if granularity is not Granularity.TOKEN else []
    last_unit = -1
    for position in positions:
        start, end = model_input.offsets[position]
        core = _core_span(text, max(start, source.start), min(end, source.end))
        if core[1] <= core[0]:
            pending.append(position)
            continue
        if granularity is Granularity.TOKEN:
            groups.append(([*pending, position], *core))
            pending = []
            continue
        hit = [i for i, (us, ue) in enumerate(units) if us < core[1] and core[0] < ue]
        first, last = (hit[0], hit[-1]) if hit else (last_unit + 1, last_unit)
        span = (min([core[0], *(units[i][0] for i in hit)]), max([core[1], *(units[i][1] for i in hit)]))
        if groups and first <= last_unit:  # shares a word/sentence with the previous group: same feature
            members, gs, ge = groups[-1]
            groups[-1] = ([*members, *pending, position], min(gs, span[0]), max(ge, span[1]))
        else:
            groups.append(([*pending, position], *span))
        pending = []
        last_unit = max(last_unit, last)
    if pending and groups:  # trailing whitespace tokens join the last feature
        members, gs, ge = groups[-1]
        groups[-1] = ([*members, *pending], gs, ge)
    return [
        Feature(
            text=text[gs:ge],
            token_positions=tuple(members),
            start=source.to_content(gs),
            end=source.to_content(ge),
            message_index=source.message_index,
        )
        for members, gs, ge in groups
    ]


def _template_features(model_input: ModelInput, positions: list[int], granularity: Granularity) -> list[Feature]:
    """Attributable tokens outside every source (only with include_template_tokens): one feature per token, or per
    contiguous run at SENTENCE granularity."""
    runs: list[list[int]] = []
    for position in positions:
        if granularity is Granularity.SENTENCE and runs and runs[-1][-1] == position - 1:
            runs[-1].append(position)
        else:
            runs.append([position])
    features = []
    for run in runs:
        pieces = []
        for position in run:
            start, end = model_input.offsets[position]
            pieces.append(model_input.text[start:end] if end > start else model_input.tokens[position])
        features.append(Feature("".join(pieces), tuple(run), None, None, None))
    return features


def build_features(model_input: ModelInput, granularity: Granularity) -> list[Feature]:
    """The features of ``model_input`` at ``granularity``, in reading order; raises if there are none."""
    features: list[Feature] = []
    claimed: set[int] = set()
    for source in model_input.sources:
        for feature in _source_features(model_input, source, granularity):
            fresh = tuple(p for p in feature.token_positions if p not in claimed)  # a token shared by two sources
            if fresh:
                claimed.update(fresh)
                features.append(Feature(feature.text, fresh, feature.start, feature.end, feature.message_index))
    rest = [p for p in np.flatnonzero(model_input.attributable).tolist() if p not in claimed]
    features += _template_features(model_input, rest, granularity)
    features.sort(key=lambda f: f.token_positions[0])
    if not features:
        raise NoAttributableFeaturesError(
            "nothing to attribute: the prompt/messages contain no text (only whitespace or template tokens)"
        )
    return features


def membership(features: Sequence[Feature], positions: Sequence[int]) -> np.ndarray:
    """(features, columns) booleans, True where a column's token belongs to the feature; the columns are the token
    ``positions`` given (all of an input's positions, or its attributable ones, in order)."""
    column = {int(position): index for index, position in enumerate(positions)}
    matrix = np.zeros((len(features), len(column)), dtype=bool)
    for row, feature in enumerate(features):
        matrix[row, [column[p] for p in feature.token_positions]] = True
    return matrix


def kept_tokens(feature_masks: np.ndarray, member: np.ndarray) -> np.ndarray:
    """(n, features) feature masks (True: kept) as (n, tokens) token masks, through a ``membership`` matrix: a
    token is kept unless its feature is masked (tokens of no feature are always kept)."""
    return ~(~np.asarray(feature_masks, dtype=bool) @ member)


def check_message_indices(attribute_messages: Any) -> Optional[tuple[int, ...]]:
    """``attribute_messages`` as a sorted tuple of distinct message indices (None: every message), or a typed error."""
    if attribute_messages is None:
        return None
    if isinstance(attribute_messages, (str, bytes, int)) or not hasattr(attribute_messages, "__iter__"):
        raise InvalidInputError(
            f"attribute_messages must be a list of message indices, e.g. [0], got {attribute_messages!r}")
    indices = list(attribute_messages)
    if not indices or any(isinstance(i, bool) or not isinstance(i, (int, np.integer)) or i < 0 for i in indices):
        raise InvalidInputError(
            "attribute_messages must be a non-empty list of message indices (integers >= 0), "
            f"got {attribute_messages!r}")
    return tuple(sorted({int(i) for i in indices}))


def restrict_to_messages(model_input: ModelInput, attribute_messages: Optional[tuple[int, ...]]) -> ModelInput:
    """``model_input`` with only the content tokens of ``attribute_messages`` attributable (None: unchanged).

    The other messages, template tokens included, become context: no feature holds them, so no method masks or
    perturbs them, and tokens before the first attributable one are computed once as the cached prefix.
    """
    if attribute_messages is None:
        return model_input
    with_text = sorted({source.message_index for source in model_input.sources if source.message_index is not None})
    if not with_text:
        raise InvalidInputError("attribute_messages needs chat messages; a raw prompt is one text, attribute all of it")
    missing = [index for index in attribute_messages if index not in with_text]
    if missing:
        raise InvalidInputError(
            f"attribute_messages={list(attribute_messages)}: message(s) {missing} do not exist or hold no text; "
            f"the messages with text are {with_text}"
        )
    sources = tuple(source for source in model_input.sources if source.message_index in attribute_messages)
    attributable = np.zeros_like(model_input.attributable)
    for position in np.flatnonzero(model_input.attributable):
        start, end = model_input.offsets[position]
        attributable[position] = any(start < source.end and source.start < end for source in sources)
    return dataclasses.replace(model_input, attributable=attributable, sources=sources)
