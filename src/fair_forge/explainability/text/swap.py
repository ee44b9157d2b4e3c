"""Counterfactuals by word swaps: x with the words of one attribute exchanged ("she" <-> "he"), nothing else changed.

The built-in table covers gender; any other attribute takes word pairs from the caller (``pairs=``), applied both
ways. Words are matched whole (no "she" inside "shed"; "Mr." keeps its dot) and case-insensitively; the replacement
follows the case of the word it replaces (she -> he, She -> He, SHE -> HE).

Swapping twice gives x back for the words of ``GENDER_PAIRS`` (a bijection). The exceptions:

- "her" is possessive ("her book" -> "his book") or an object ("saw her" -> "saw him"), and "his" is a determiner
  ("his book" -> "her book") or a pronoun ("it is his" -> "it is hers"). The position decides: before a word that is
  not in ``FUNCTION_WORDS`` it is read as a determiner, elsewhere (before punctuation, a line end, "the", "to", ...)
  as a pronoun. So "told him the truth" round-trips, but "saw him yesterday" becomes "saw her yesterday" and then
  "saw his yesterday": the guess is a word list, not a parser.
- "Mrs" -> "Mr" is one-way (``GENDER_ONE_WAY``): "Mr" <-> "Ms" is the pair. "Miss" is left alone (also a verb).
"""

from __future__ import annotations

import re
from typing import Any, Collection, Mapping, Optional, Sequence, Union

from ..errors import InvalidInputError
from .prompt import VALID_ROLES, Messages, validate_messages, validate_text
from .protected import whole_words_pattern

#: Gender words swapped both ways (a bijection: swapping twice gives the text back).
GENDER_PAIRS: tuple[tuple[str, str], ...] = (
    ("he", "she"), ("himself", "herself"), ("man", "woman"), ("men", "women"), ("boy", "girl"), ("boys", "girls"),
    ("male", "female"), ("males", "females"), ("father", "mother"), ("fathers", "mothers"), ("son", "daughter"),
    ("sons", "daughters"), ("brother", "sister"), ("brothers", "sisters"), ("husband", "wife"),
    ("husbands", "wives"), ("king", "queen"), ("kings", "queens"), ("prince", "princess"), ("princes", "princesses"),
    ("gentleman", "lady"), ("gentlemen", "ladies"), ("uncle", "aunt"), ("uncles", "aunts"), ("nephew", "niece"),
    ("nephews", "nieces"), ("grandfather", "grandmother"), ("grandfathers", "grandmothers"),
    ("grandson", "granddaughter"), ("grandsons", "granddaughters"), ("dad", "mom"), ("dads", "moms"),
    ("boyfriend", "girlfriend"), ("boyfriends", "girlfriends"), ("groom", "bride"), ("grooms", "brides"),
    ("actor", "actress"), ("actors", "actresses"), ("waiter", "waitress"), ("waiters", "waitresses"),
    ("businessman", "businesswoman"), ("businessmen", "businesswomen"), ("chairman", "chairwoman"),
    ("spokesman", "spokeswoman"), ("policeman", "policewoman"), ("policemen", "policewomen"),
    ("Mr", "Ms"), ("masculine", "feminine"), ("paternal", "maternal"), ("fatherhood", "motherhood"),
)
#: Gender words whose counterpart depends on position: (before a content word, elsewhere).
GENDER_BY_POSITION: dict[str, tuple[str, str]] = {
    "her": ("his", "him"), "his": ("her", "hers"), "him": ("her", "her"), "hers": ("his", "his"),
}
#: Gender words swapped one way only: their counterpart swaps to another word.
GENDER_ONE_WAY: dict[str, str] = {"mrs": "Mr"}
#: Words after which "her"/"his" read as pronouns ("told her the truth", "saw her, then"), not determiners.
FUNCTION_WORDS = frozenset(
    "a an the this that these those to and or but nor so yet in on at for with about from of by as if than then up "
    "down out off over into onto when while because before after again too now here there why how what who where "
    "is was are were will would can could should".split()
)

Replacement = Union[str, tuple[str, str]]  # a word, or (before a content word, elsewhere)


def _gender_table() -> dict[str, Replacement]:
    table: dict[str, Replacement] = {}
    for a, b in GENDER_PAIRS:
        table[a.lower()], table[b.lower()] = b, a
    return {**table, **GENDER_ONE_WAY, **GENDER_BY_POSITION}


_ATTRIBUTES = {"gender": _gender_table()}
#: Attributes with a built-in table.
ATTRIBUTES: tuple[str, ...] = tuple(_ATTRIBUTES)
_NEXT_WORD = re.compile(r"[^\S\n]*(\w+)")  # the next word on the same line


def _user_table(pairs: Any) -> dict[str, Replacement]:
    """``pairs`` as a two-way table; typed errors for a malformed pair or a word in two pairs."""
    if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Sequence) or not pairs:
        raise InvalidInputError(f"pairs must be a non-empty list of (word, other word) pairs, got {pairs!r}")
    if len(pairs) == 2 and all(isinstance(word, str) for word in pairs):
        raise InvalidInputError(f"pairs is a list of pairs: write pairs=[{tuple(pairs)!r}]")
    table: dict[str, Replacement] = {}
    for pair in pairs:
        if isinstance(pair, (str, bytes)) or not isinstance(pair, Sequence) or len(pair) != 2 or not all(
                isinstance(w, str) and w.strip() == w and w for w in pair):
            raise InvalidInputError(
                "each of pairs must be two words, e.g. ('Christian', 'Muslim'), without surrounding spaces; "
                f"got {pair!r}")
        a, b = pair
        if a.lower() == b.lower():
            raise InvalidInputError(f"pair {pair!r} swaps a word with itself")
        for word in (a, b):
            if word.lower() in table:
                raise InvalidInputError(f"{word!r} is in two pairs: each word may have one counterpart")
        table[a.lower()], table[b.lower()] = b, a
    return table


def swap_table(attribute: Optional[str], pairs: Any) -> dict[str, Replacement]:
    """The swap table: the built-in one of ``attribute`` with ``pairs`` on top, or ``pairs`` alone; typed errors for an
    unknown attribute or a malformed pair (so a caller can check a swap before it has any text)."""
    if attribute is not None and not isinstance(attribute, str):
        raise InvalidInputError(f"attribute must be a name such as 'gender', got {attribute!r}")
    if attribute is None and pairs is None:
        raise InvalidInputError(f"give an attribute ({list(ATTRIBUTES)}) or pairs=[(word, other word), ...]")
    builtin = _ATTRIBUTES.get(attribute.lower()) if attribute is not None else None
    if pairs is None:
        if builtin is None:
            raise InvalidInputError(
                f"unknown attribute {attribute!r}: the built-in tables are {list(ATTRIBUTES)}; for any other attribute "
                "give its words, e.g. swap(x, 'religion', pairs=[('Christian', 'Muslim'), ('church', 'mosque')])")
        return builtin
    return {**(builtin or {}), **_user_table(pairs)}


def _in_case_of(word: str, replacement: str) -> str:
    """``replacement`` in the case of ``word``: UPPER, Capitalized or lower."""
    if len(word) > 1 and word.isupper():
        return replacement.upper()
    if word[:1].isupper():
        return replacement[:1].upper() + replacement[1:]
    return replacement.lower()


def _swap_text(text: str, table: Mapping[str, Replacement], pattern: re.Pattern[str]) -> tuple[str, int]:
    """``text`` with every word of ``table`` replaced, and how many were."""

    def replace(match: re.Match[str]) -> str:
        word = match.group()
        replacement = table[word.lower()]
        if isinstance(replacement, tuple):
            following = _NEXT_WORD.match(text, match.end())
            before_word = following is not None and following.group(1).lower() not in FUNCTION_WORDS
            replacement = replacement[0] if before_word else replacement[1]
        return _in_case_of(word, replacement)

    return pattern.subn(replace, text)


def _selected_roles(roles: Any) -> Optional[frozenset[str]]:
    if roles is None:
        return None
    chosen = frozenset([roles] if isinstance(roles, str) else roles)
    unknown = sorted(chosen - VALID_ROLES)
    if not chosen or unknown:
        raise InvalidInputError(f"roles must name message roles from {sorted(VALID_ROLES)}, got {roles!r}")
    return chosen


def swap(
    x: Union[str, Messages],
    attribute: Optional[str] = None,
    pairs: Optional[Sequence[tuple[str, str]]] = None,
    *,
    roles: Optional[Union[str, Collection[str]]] = None,
) -> Union[str, list[dict[str, Any]]]:
    """x with the words of ``attribute`` swapped: a prompt gives a prompt, messages give new messages.

    ``attribute`` names a built-in table (``ATTRIBUTES``: "gender"); ``pairs`` add word pairs to it (they win where
    they name the same word) or, for any other attribute, are the whole table. ``roles`` limits the swap to messages
    of those roles (e.g. "user"). Raises ``InvalidInputError`` for an unknown attribute or when no word of the table
    occurs (the counterfactual would equal x).
    """
    table = swap_table(attribute, pairs)
    chosen = _selected_roles(roles)
    pattern = whole_words_pattern(table)
    if isinstance(x, str):
        if chosen is not None:
            raise InvalidInputError("roles= selects chat messages, but x is a prompt; leave roles out")
        result: Union[str, list[dict[str, Any]]]
        result, count = _swap_text(validate_text(x, "x"), table, pattern)
    else:
        result, count = [], 0
        for original, message in zip(x, validate_messages(x)):
            content = message["content"]
            if chosen is None or message["role"] in chosen:
                content, n = _swap_text(content, table, pattern)
                count += n
            result.append({**original, "content": content})
    if count == 0:
        where = "x" if chosen is None else f"the {sorted(chosen)} messages of x"
        kind = f"{attribute!r} word" if attribute is not None else "word of the pairs"
        examples = ", ".join(repr(w) for w in list(table)[:8])
        raise InvalidInputError(
            f"no {kind} occurs in {where}, so the counterfactual would equal x; the table swaps words such as "
            f"{examples}; give pairs=[...] with words that x holds")
    return result
