"""Protected words: which features of an explanation hold the words a fairness audit asks about.

What is protected is said one of three ways (``parse_protected``):

- a list of words or phrases, e.g. ``["she", "he", "her", "his"]`` (one attribute, named ``"protected"``);
- a mapping attribute -> words, e.g. ``{"gender": [...], "religion": [...]}`` (a share per attribute too);
- ``"spans"``: each item names its own protected characters in a field ``protected_spans`` (``item_spans``).

Words are found in the explained text itself, case-insensitively and whole (``"he"`` is not found in ``"the"`` or
``"shed"``; a phrase may span several words), and a feature is protected when its character span overlaps a
protected span of the same message. So the rule is the same at every granularity: the token(s) of a word, the
word, or the sentence that holds it. Features outside the user's text (chat-template tokens) are never protected.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

from ..core.types import AttributionResult
from ..errors import InvalidInputError

#: The attribute of protected words given as a plain list, and of an item's own spans.
PROTECTED = "protected"
#: ``protected="spans"``: every item's field of this name holds its protected spans.
SPANS = "spans"
SPANS_FIELD = "protected_spans"

ProtectedSpec = Union[dict[str, tuple[str, ...]], str]
Texts = Sequence[tuple[Optional[int], str]]  # (message index or None for a prompt, text)


@dataclass(frozen=True)
class ProtectedSpan:
    """Protected characters ``[start, end)`` of one message's content (``message_index`` None: of the prompt)."""

    message_index: Optional[int]
    start: int
    end: int
    attribute: str = PROTECTED


def _words(words: Any, name: str) -> tuple[str, ...]:
    if isinstance(words, (str, bytes)) or not isinstance(words, Iterable):
        raise InvalidInputError(f"{name} must be a list of words, got {words!r}")
    found = tuple(words)
    if not found or not all(isinstance(word, str) and word.strip() for word in found):
        raise InvalidInputError(f"{name} must be a non-empty list of non-empty words, got {words!r}")
    return tuple(word.strip() for word in found)


def parse_protected(protected: Any) -> ProtectedSpec:
    """``protected`` as attribute -> words, or ``SPANS``; a typed error for anything else."""
    if isinstance(protected, str):
        if protected == SPANS:
            return SPANS
        raise InvalidInputError(
            f"protected must be a list of words, a mapping attribute -> words, or {SPANS!r} (each item's "
            f"{SPANS_FIELD!r}); got the string {protected!r}: write protected=[{protected!r}] for one word")
    if isinstance(protected, Mapping):
        if not protected or not all(isinstance(name, str) and name.strip() for name in protected):
            raise InvalidInputError(f"protected maps attribute names to words, got {protected!r}")
        return {name: _words(words, f"protected[{name!r}]") for name, words in protected.items()}
    return {PROTECTED: _words(protected, "protected")}


def whole_words_pattern(words: Iterable[str]) -> re.Pattern[str]:
    """A case-insensitive pattern of ``words`` found whole (not inside a longer word), the longest first so that a
    phrase wins over a word inside it."""
    ordered = sorted(set(words), key=len, reverse=True)
    return re.compile(r"(?<!\w)(?:" + "|".join(map(re.escape, ordered)) + r")(?!\w)", re.IGNORECASE)


def result_texts(result: AttributionResult) -> list[tuple[Optional[int], str]]:
    """The texts a result's features index: each message's content, or the prompt."""
    if result.messages:
        return [(index, message.content) for index, message in enumerate(result.messages)]
    return [(None, result.prompt)]


def word_spans(texts: Texts, patterns: Mapping[str, re.Pattern[str]]) -> list[ProtectedSpan]:
    """Where each attribute's words occur in ``texts``."""
    return [ProtectedSpan(index, match.start(), match.end(), attribute)
            for attribute, pattern in patterns.items() for index, text in texts for match in pattern.finditer(text)]


def item_spans(value: Any, texts: Texts) -> list[ProtectedSpan]:
    """An item's ``protected_spans``: a list (or its JSON text) of ``[start, end]`` pairs or mappings
    ``{"start", "end", "message_index", "attribute"}``; offsets index a message's content (default: the last
    message, where a ``question`` column lands) or the prompt. A typed error names a span that does not fit."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise InvalidInputError(f"{SPANS_FIELD} holds text that is not a JSON list of spans") from None
    if isinstance(value, (bytes, Mapping)) or not isinstance(value, Iterable):
        raise InvalidInputError(f"{SPANS_FIELD} must be a list of [start, end] pairs or mappings, got {value!r}")
    lengths = {index: len(text) for index, text in texts}
    default_index = texts[-1][0]
    spans = []
    for span in value:
        if isinstance(span, Mapping):
            fields = {"message_index": default_index, "attribute": PROTECTED, **span}
            unknown = set(fields) - {"start", "end", "message_index", "attribute"}
            if unknown or "start" not in span or "end" not in span:
                raise InvalidInputError(f"a span needs 'start' and 'end' (and may name 'message_index', 'attribute'),"
                                        f" got {dict(span)!r}")
            start, end, index, attribute = (fields[key] for key in ("start", "end", "message_index", "attribute"))
        elif isinstance(span, Sequence) and not isinstance(span, (str, bytes)) and len(span) == 2:
            (start, end), index, attribute = span, default_index, PROTECTED
        else:
            raise InvalidInputError(f"a span is [start, end] or a mapping, got {span!r}")
        if not all(isinstance(n, int) and not isinstance(n, bool) for n in (start, end)) or index not in lengths \
                or not 0 <= start < end <= lengths[index] or not isinstance(attribute, str):
            where = "the prompt" if index is None else f"message {index!r}"
            raise InvalidInputError(f"span {span!r} does not lie in {where} (offsets 0 <= start < end <= its length)")
        spans.append(ProtectedSpan(index, start, end, attribute))
    return spans


def touched_attributes(message_index: Optional[int], start: Optional[int], end: Optional[int],
                       spans: Sequence[ProtectedSpan]) -> set[str]:
    """The attributes whose spans overlap ``[start, end)`` of that message (none for text outside the input)."""
    if start is None or end is None:
        return set()
    return {span.attribute for span in spans
            if span.message_index == message_index and start < span.end and span.start < end}
