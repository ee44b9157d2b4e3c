"""Counterfactual inputs: where x and x' differ, and the texts in between.

A counterfactual explanation asks which of the changes that turn x into x' move the model's score. Its features are
the *differences* between the two inputs, found per message by aligning their words (``WORD_PATTERN``, the words of
segment.py) with ``difflib.SequenceMatcher``. Outside the differences the two texts are equal character for
character, so every subset S of differences names one text: x with the differences outside S replaced by x''s text
(interventional: an absent feature takes its counterfactual value). ``compose`` builds that text and says where each
kept difference lies in it; all kept gives x exactly, none kept gives x' exactly.

Span conventions (all offsets are into the message's content, or the prompt, like ``Feature.start``/``end``):

- ``start``/``end`` is the text of x that the difference replaces; ``counterfactual_start``/``end`` the text of x'
  that replaces it. Either side may be empty: ``start == end`` means x' inserts text at ``start`` (x has nothing
  there), ``counterfactual_text == ""`` means x' deletes ``text``.
- A difference holds whole words. Whitespace the two texts share around it stays outside; where words are inserted or
  deleted the one space that goes with them is part of the difference, on its left when there is one (" very"), so
  that removing the difference leaves single spaces, as x' has them.
- Whitespace that differs between two equal words ("a  b" vs "a b") is a difference of its own: it is part of what
  turns x into x' (the round trip needs it), and its text is only whitespace.
"""

from __future__ import annotations

from dataclasses import dataclass
from difflib import SequenceMatcher
from itertools import pairwise
from typing import Any, Optional, Sequence, Union

import numpy as np

from ..core.types import Granularity
from ..errors import InvalidInputError
from .prompt import Messages, ModelInput, validate_messages, validate_text
from .segment import SENTENCE_PATTERN, WORD_PATTERN

#: Default limit on the share of a message's words that may change (changed words of x and x' over all their words):
#: above it the two texts are not one input with a few changes, and an attribution to "everything" says nothing.
MAX_CHANGED_FRACTION = 0.5

PromptOrMessages = Union[str, Messages]


@dataclass(frozen=True)
class Difference:
    """One place where x and x' differ: ``text`` (x[start:end]) becomes ``counterfactual_text`` in x'."""

    message_index: Optional[int]  # None for a raw prompt
    start: int
    end: int
    text: str
    counterfactual_start: int
    counterfactual_end: int
    counterfactual_text: str


@dataclass(frozen=True)
class Alignment:
    """x and x' aligned: their texts (one per message, or the prompt) and the differences in reading order."""

    roles: Optional[tuple[str, ...]]  # the messages' roles; None when x and x' are raw prompts
    texts: tuple[str, ...]
    counterfactual_texts: tuple[str, ...]
    differences: tuple[Difference, ...]


@dataclass(frozen=True)
class TextSpan:
    """A character span in the content of message ``message_index`` (None: the raw prompt)."""

    message_index: Optional[int]
    start: int
    end: int


@dataclass(frozen=True)
class Composition:
    """The input for one subset of differences: give ``messages`` or ``prompt`` to ``build_model_input``.

    ``spans[i]`` is where the text of kept difference i lies in it (None where difference i took x''s text).
    """

    prompt: Optional[str]
    messages: Optional[tuple[dict[str, str], ...]]
    spans: tuple[Optional[TextSpan], ...]


def _sides(original: Any, counterfactual: Any) -> tuple[Optional[tuple[str, ...]], list[str], list[str]]:
    """(roles, texts of x, texts of x') after checking that x and x' are the same kind with the same messages."""
    if isinstance(original, str) and isinstance(counterfactual, str):
        return None, [validate_text(original, "x")], [validate_text(counterfactual, "x'")]
    if isinstance(original, str) or isinstance(counterfactual, str):
        raise InvalidInputError(
            "x and x' must be the same kind of input: two prompts (strings) or two lists of chat messages")
    x, y = validate_messages(original), validate_messages(counterfactual)
    if len(x) != len(y):
        raise InvalidInputError(
            f"x has {len(x)} messages and x' has {len(y)}: a counterfactual keeps the messages of x (same count, "
            "same roles, same order) and changes words inside them")
    for index, (mx, my) in enumerate(zip(x, y)):
        if mx["role"] != my["role"]:
            raise InvalidInputError(
                f"message {index} is a {mx['role']!r} message in x but a {my['role']!r} message in x': a "
                "counterfactual keeps the roles of x and changes words inside the messages")
    return tuple(m["role"] for m in x), [m["content"] for m in x], [m["content"] for m in y]


def _trimmed(message_index: Optional[int], x: str, y: str, a: int, b: int, c: int, d: int) -> Difference:
    """The difference x[a:b] -> y[c:d] without the whitespace both share at its right end, then at its left."""
    while b > a and d > c and x[b - 1] == y[d - 1] and x[b - 1].isspace():
        b, d = b - 1, d - 1
    while a < b and c < d and x[a] == y[c] and x[a].isspace():
        a, c = a + 1, c + 1
    return Difference(message_index, a, b, x[a:b], c, d, y[c:d])


def _align_texts(message_index: Optional[int], x: str, y: str, max_changed_fraction: float) -> list[Difference]:
    """The differences of one message: the text between consecutive matched words, where it is not equal."""
    words_x, words_y = list(WORD_PATTERN.finditer(x)), list(WORD_PATTERN.finditer(y))
    matcher = SequenceMatcher(None, [w.group() for w in words_x], [w.group() for w in words_y], autojunk=False)
    anchors = [(i + k, j + k) for i, j, n in matcher.get_matching_blocks() for k in range(n)]
    total = len(words_x) + len(words_y)
    changed = total - 2 * len(anchors)
    if total and changed / total > max_changed_fraction:
        where = "the prompt" if message_index is None else f"message {message_index}"
        why = ("x and x' have no word in common there" if not anchors else
               f"{changed} of their {total} words differ ({changed / total:.0%}, above "
               f"max_changed_fraction={max_changed_fraction})")
        raise InvalidInputError(
            f"{where} cannot be aligned: {why}. A counterfactual changes a few words of x (e.g. swap(x, 'gender')); "
            "give closer texts, or raise max_changed_fraction to accept the whole text as one difference")
    differences = []
    x_cursor = y_cursor = 0  # ends of the previous matched word
    for i, j in [*anchors, (len(words_x), len(words_y))]:
        x_next = words_x[i].start() if i < len(words_x) else len(x)
        y_next = words_y[j].start() if j < len(words_y) else len(y)
        if x[x_cursor:x_next] != y[y_cursor:y_next]:
            differences.append(_trimmed(message_index, x, y, x_cursor, x_next, y_cursor, y_next))
        if i < len(words_x):
            x_cursor, y_cursor = words_x[i].end(), words_y[j].end()
    return differences


def align(
    original: PromptOrMessages, counterfactual: PromptOrMessages, *, max_changed_fraction: float = MAX_CHANGED_FRACTION
) -> Alignment:
    """Align x (``original``) and x' (two prompts, or two chats with the same roles) word by word.

    Raises ``InvalidInputError`` when they are different kinds, their messages differ in count or role, they are
    identical or differ only in whitespace (nothing to explain), or a message changes more than
    ``max_changed_fraction`` of its words (changed words of both texts over all their words; 1.0 accepts anything).
    """
    if isinstance(max_changed_fraction, bool) or not isinstance(max_changed_fraction, (int, float)) or not (
            0 < max_changed_fraction <= 1):
        raise InvalidInputError(f"max_changed_fraction must be a number in (0, 1], got {max_changed_fraction!r}")
    roles, texts, counterfactual_texts = _sides(original, counterfactual)
    if texts == counterfactual_texts:
        raise InvalidInputError(
            "x and x' are identical: there is no difference to explain; change some words of x "
            "(e.g. swap(x, 'gender'))")
    differences = []
    for index, (x, y) in enumerate(zip(texts, counterfactual_texts)):
        if x != y:
            differences += _align_texts(None if roles is None else index, x, y, max_changed_fraction)
    if all(not d.text.strip() and not d.counterfactual_text.strip() for d in differences):
        raise InvalidInputError(
            "x and x' differ only in whitespace: no word changes, so there is nothing to explain; change some words")
    return Alignment(roles, tuple(texts), tuple(counterfactual_texts), tuple(differences))


def _sentences(text: str) -> list[tuple[int, int]]:
    """Sentence spans of ``text`` (SENTENCE_PATTERN, without surrounding whitespace), as segment.py finds them."""
    spans = []
    for match in SENTENCE_PATTERN.finditer(text):
        start, end = match.start(), match.end()
        core = text[start:end].strip()
        if core:
            start += text[start:end].index(core)
            spans.append((start, start + len(core)))
    return spans


def _touches(span: tuple[int, int], start: int, end: int) -> bool:
    """Whether [start, end) overlaps ``span``; an empty [p, p) touches the spans that hold p strictly inside."""
    if start == end:
        return span[0] < start < span[1]
    return span[0] < end and start < span[1]


def _sentence_differences(alignment: Alignment, index: int, differences: list[Difference]) -> list[Difference]:
    """The differences of message ``index`` grown to the sentences (of x or of x') that they touch.

    The message is cut into pieces: the differences, and the equal text between them cut at every sentence
    boundary of either text. Neighbouring pieces that touch one sentence belong together; each run of pieces that
    holds a difference becomes one difference. Equal text stays equal, so composition still round-trips.
    """
    x, y = alignment.texts[index], alignment.counterfactual_texts[index]
    sentences_x, sentences_y = _sentences(x), _sentences(y)
    pieces: list[tuple[int, int, int, int, bool]] = []  # x start, x end, x' start, x' end, changed

    def add_equal(x_start: int, x_end: int, y_start: int) -> None:
        shift = y_start - x_start
        cuts = {b for s in sentences_x for b in s if x_start < b < x_end}
        cuts |= {b - shift for s in sentences_y for b in s if y_start < b < x_end + shift}
        bounds = [x_start, *sorted(cuts), x_end]
        pieces.extend((a, b, a + shift, b + shift, False) for a, b in pairwise(bounds) if b > a)

    x_cursor = y_cursor = 0
    for d in differences:
        add_equal(x_cursor, d.start, y_cursor)
        pieces.append((d.start, d.end, d.counterfactual_start, d.counterfactual_end, True))
        x_cursor, y_cursor = d.end, d.counterfactual_end
    add_equal(x_cursor, len(x), y_cursor)

    def sentence_keys(piece: tuple[int, int, int, int, bool]) -> set[tuple[str, int]]:
        return ({("x", k) for k, s in enumerate(sentences_x) if _touches(s, piece[0], piece[1])}
                | {("y", k) for k, s in enumerate(sentences_y) if _touches(s, piece[2], piece[3])})

    runs: list[list[tuple[int, int, int, int, bool]]] = []
    previous: set[tuple[str, int]] = set()
    for piece in pieces:
        keys = sentence_keys(piece)
        if runs and keys & previous:
            runs[-1].append(piece)
        else:
            runs.append([piece])
        previous = keys
    grown = []
    for run in runs:
        if any(piece[4] for piece in run):
            a, b, c, d = run[0][0], run[-1][1], run[0][2], run[-1][3]
            message_index = differences[0].message_index
            grown.append(Difference(message_index, a, b, x[a:b], c, d, y[c:d]))
    return grown


def expand_differences(alignment: Alignment, granularity: Union[Granularity, str]) -> Alignment:
    """``alignment`` with its differences as features of ``granularity``.

    TOKEN and WORD: the changed words as aligned (unchanged). SENTENCE: the sentences that hold a change, of x or of
    x' (so a sentence x' inserts or splits is whole), with all the changes inside them as one difference.
    """
    try:
        granularity = Granularity(granularity)
    except ValueError:
        raise InvalidInputError(
            f"unknown granularity {granularity!r}; use one of {[g.value for g in Granularity]}") from None
    if granularity is not Granularity.SENTENCE:
        return alignment
    grown: list[Difference] = []
    for index in range(len(alignment.texts)):
        message_index = None if alignment.roles is None else index
        differences = [d for d in alignment.differences if d.message_index == message_index]
        if differences:
            grown += _sentence_differences(alignment, index, differences)
    return Alignment(alignment.roles, alignment.texts, alignment.counterfactual_texts, tuple(grown))


def compose(alignment: Alignment, keep: Sequence[bool]) -> Composition:
    """The input where difference i keeps x's text if ``keep[i]`` and takes x''s text otherwise.

    ``keep`` is one row of a feature mask (a list of booleans or a numpy row, one per difference). Returns the
    messages (or prompt) and where each kept difference's text lies in them, in content coordinates.
    """
    keep = list(keep)
    if len(keep) != len(alignment.differences) or not all(isinstance(k, (bool, np.bool_)) for k in keep):
        raise InvalidInputError(
            f"keep must hold one boolean per difference ({len(alignment.differences)}), got {keep!r}")
    spans: list[Optional[TextSpan]] = [None] * len(keep)
    contents = []
    for index, x in enumerate(alignment.texts):
        message_index = None if alignment.roles is None else index
        pieces, length, cursor = [], 0, 0
        for k, d in enumerate(alignment.differences):
            if d.message_index != message_index:
                continue
            pieces.append(x[cursor:d.start])
            length += d.start - cursor
            replacement = d.text if keep[k] else d.counterfactual_text
            if keep[k]:
                spans[k] = TextSpan(message_index, length, length + len(d.text))
            pieces.append(replacement)
            length += len(replacement)
            cursor = d.end
        pieces.append(x[cursor:])
        contents.append("".join(pieces))
    if alignment.roles is None:
        return Composition(contents[0], None, tuple(spans))
    messages = tuple({"role": role, "content": content} for role, content in zip(alignment.roles, contents))
    return Composition(None, messages, tuple(spans))


def difference_token_positions(
    model_input: ModelInput, spans: Sequence[Optional[TextSpan]]
) -> tuple[tuple[int, ...], ...]:
    """The attributable prompt tokens of ``model_input`` that hold each span (``Composition.spans``), in order.

    A token belongs to a span when they share a non-whitespace character, when it lies inside the span (a space
    token of " very"), or, for a whitespace-only span, when they overlap at all. A span with no text (a kept
    insertion: x has nothing there) or text the chat template dropped has no tokens. Two spans may share a token
    when the tokenizer merges across the equal text between them.
    """
    sources = {source.message_index: source for source in model_input.sources}
    text, found = model_input.text, []
    for span in spans:
        source = sources.get(span.message_index) if span is not None else None
        if source is None:
            found.append(())
            continue
        start = max(source.start, source.start + span.start - source.content_offset)
        end = min(source.end, source.start + span.end - source.content_offset)
        blank = not text[start:end].strip()
        positions = []
        for position in range(model_input.target_start):
            token_start, token_end = model_input.offsets[position]
            low, high = max(token_start, start), min(token_end, end)
            if not model_input.attributable[position] or low >= high:
                continue
            if blank or text[low:high].strip() or (start <= token_start and token_end <= end):
                positions.append(position)
        found.append(tuple(positions))
    return tuple(found)
