"""Chat messages or a raw prompt, plus a target, to the exact token sequence the model sees.

The chat template is applied once, the whole text (prompt + target) is tokenized once with character offsets, and
every later step works from those ids and offsets: nothing is decoded and re-encoded, so special tokens survive.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch

from ..errors import InvalidInputError, UnsupportedModelError

VALID_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})

Messages = Sequence[Mapping[str, str]]  # a chat: [{"role": ..., "content": ...}, ...]


class BoundaryMergeWarning(UserWarning):
    """In context, the last prompt token and the first target token would merge; they were tokenized apart."""


class UnknownTokenWarning(UserWarning):
    """Some characters of the user's text are not in the tokenizer's vocabulary: the model reads them as unknown."""


@dataclass(frozen=True)
class SourceSpan:
    """Where a piece of user text (a message's content or the raw prompt) sits in the full model text."""

    message_index: Optional[int]  # None for a raw prompt
    start: int  # offset in ModelInput.text of content[content_offset]
    end: int
    content: str
    content_offset: int = 0

    def to_content(self, text_offset: int) -> int:
        """Map an offset in the full text to an offset in ``content``."""
        return text_offset - self.start + self.content_offset


@dataclass(frozen=True)
class ModelInput:
    """One tokenized (prompt + target) sequence with everything the later steps need to know about it."""

    input_ids: torch.Tensor  # (L,) int64, on the CPU
    target_start: int  # input_ids[target_start:] are the target tokens
    offsets: tuple[tuple[int, int], ...]  # char span of each token in ``text`` ((0, 0) for added special tokens)
    text: str  # what the model reads: rendered prompt + target
    attributable: np.ndarray  # (L,) bool: tokens that may belong to a feature
    sources: tuple[SourceSpan, ...]
    prompt: str  # the prompt as the user gave it (messages' contents joined by newlines)
    target: str
    baseline_token_id: int  # token that stands in for a masked feature (pad, else unk, else eos)
    tokens: tuple[str, ...]  # the tokenizer's token strings, for labels
    messages: Optional[tuple[dict[str, str], ...]] = None  # the checked chat messages; None for a raw prompt
    contrast: Optional["ModelInput"] = None  # the same prompt followed by the contrast target (same prompt tokens)
    target_span: Optional[tuple[int, int]] = None  # target tokens [a, b) whose log-probs are explained (None: all)

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def n_target(self) -> int:
        return self.length - self.target_start

    @property
    def target_ids(self) -> torch.Tensor:
        return self.input_ids[self.target_start :]

    @property
    def n_contrast(self) -> int:
        """Tokens of the contrast target (0 without one)."""
        return self.contrast.n_target if self.contrast is not None else 0

    @property
    def target_labels(self) -> list[str]:
        """Readable text of every target token (its slice of ``text``, else its token string)."""
        labels = []
        for position in range(self.target_start, self.length):
            start, end = self.offsets[position]
            labels.append(self.text[start:end] if end > start else self.tokens[position])
        return labels


def validate_text(text: str, name: str) -> str:
    """``text`` if it is encodable text; a lone surrogate (e.g. undecodable bytes read with ``surrogateescape``)
    makes tokenizers fail with an untyped error, so it is rejected here, saying where it is."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        bad = text[error.start]
        raise InvalidInputError(
            f"{name} contains a lone surrogate {bad!r} at character {error.start}, which is not valid text; "
            "fix the encoding of the input (e.g. decode the bytes as UTF-8)"
        ) from None
    return text


def validate_messages(messages: Any) -> list[dict[str, str]]:
    """Check chat messages and return them as plain dicts; raises InvalidInputError saying what is wrong."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise InvalidInputError("messages must be a list of {'role': ..., 'content': ...} dicts")
    if len(messages) == 0:
        raise InvalidInputError("messages is empty: give at least one {'role': 'user', 'content': ...} message")
    checked = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise InvalidInputError(f"message {index} must be a dict with 'role' and 'content' keys, got {message!r}")
        role, content = message["role"], message["content"]
        if role not in VALID_ROLES:
            raise InvalidInputError(f"message {index} has unknown role {role!r}; use one of {sorted(VALID_ROLES)}")
        if not isinstance(content, str):
            raise InvalidInputError(f"message {index} content must be a string, got {type(content).__name__}")
        validate_text(content, f"message {index} content")
        checked.append({"role": role, "content": content})
    return checked


def validate_target(target: Any) -> str:
    if not isinstance(target, str):
        raise InvalidInputError(f"target must be a string, got {type(target).__name__}")
    if not target.strip():
        raise InvalidInputError("target is empty or whitespace: give the response text to explain")
    return validate_text(target, "target")


def render_chat(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The prompt text for ``messages``: the tokenizer's chat template with the generation prompt.

    A tokenizer without a chat template gets the plain fallback ``"role: content\\n"`` per message followed by
    ``"assistant: "``.
    """
    if getattr(tokenizer, "chat_template", None):
        from jinja2 import TemplateError  # transformers renders chat templates with jinja2

        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except TemplateError as error:
            raise InvalidInputError(
                f"the tokenizer's chat template rejected these messages: {error}; change the messages (e.g. roles "
                "in the order the template expects) or pass prompt='...' to skip the template"
            ) from error
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "


def _template_gaps(tokenizer: Any, messages: list[dict[str, str]]) -> Optional[list[int]]:
    """Length of the template text before each message's content (after the previous content), or None.

    Searching the rendered text for a content string could match template text first (a default system prompt
    saying "You are a helpful assistant" holds the word "helpful"), so the template is rendered once more with a
    unique placeholder per message, and the template text around the placeholders is measured instead.
    """
    marks = [f"\ue000ffslot{index}\ue000" for index in range(len(messages))]
    try:
        shaped = render_chat(tokenizer, [{**m, "content": mark} for m, mark in zip(messages, marks)])
    except Exception:  # noqa: BLE001 - a template may reject placeholders; then fall back to searching
        return None
    gaps, cursor = [], 0
    for mark in marks:
        found = shaped.find(mark, cursor)
        if found < 0:
            return None
        gaps.append(found - cursor)
        cursor = found + len(mark)
    return gaps


def _locate_sources(
    tokenizer: Any, rendered: str, messages: list[dict[str, str]], include_template_tokens: bool
) -> list[SourceSpan]:
    """Find each message's content in the rendered template, in order (templates may strip whitespace).

    A content the template changed cannot be located; with ``include_template_tokens`` its tokens are attributed
    as template tokens (one feature per token), otherwise that is an error.
    """
    gaps = _template_gaps(tokenizer, messages)
    sources, cursor = [], 0
    for index, message in enumerate(messages):
        content = message["content"]
        core = content.strip()
        expected = cursor + gaps[index] if gaps is not None else None
        if expected is not None and rendered.startswith(content, expected):
            start, end = expected, expected + len(content)  # inserted as is
        elif expected is not None and rendered.startswith(core, expected):
            start, end = expected, expected + len(core)  # inserted stripped (or dropped, when empty)
        elif not core:
            continue
        else:
            start = rendered.find(core, cursor)
            if start < 0 and include_template_tokens:
                continue  # its tokens are attributable as template tokens
            if start < 0:
                raise InvalidInputError(
                    f"the chat template changed the content of message {index}, so its words cannot be located; "
                    "pass include_template_tokens=True to attribute to every prompt token (one feature per token) "
                    "instead"
                )
            end = start + len(core)
        cursor = end
        if core:  # nothing to attribute in a whitespace-only message
            offset = 0 if end - start == len(content) else content.index(core)
            sources.append(SourceSpan(index, start, end, content, offset))
    return sources


def encode(tokenizer: Any, text: str, add_special_tokens: bool) -> tuple[list[int], list[tuple[int, int]]]:
    if not getattr(tokenizer, "is_fast", False):
        raise UnsupportedModelError(
            "a fast (Rust) tokenizer is needed for character offsets; load it with AutoTokenizer(..., use_fast=True)"
        )
    encoding = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    return list(encoding["input_ids"]), [tuple(span) for span in encoding["offset_mapping"]]


def drop_trailing_specials(tokenizer: Any, ids: list[int], offsets: list[tuple[int, int]]) -> None:
    """Remove special tokens a tokenizer appends (e.g. EOS): the target must be the end of the sequence."""
    special = set(tokenizer.all_special_ids)
    while ids and ids[-1] in special and offsets[-1] == (0, 0):
        ids.pop()
        offsets.pop()


def _baseline_token_id(tokenizer: Any) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def with_target_span(model_input: ModelInput, span: Any) -> ModelInput:
    """``model_input`` explaining only the target tokens that hold the characters ``span = (start, end)`` of the
    target (a claim of a longer answer; the rest of the answer stays as context), or a typed error."""
    if not (isinstance(span, (tuple, list)) and len(span) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) for v in span)):
        raise InvalidInputError(f"target_span must be (start, end) character offsets into the target, got {span!r}")
    start, end = span
    target = model_input.target
    if not 0 <= start < end <= len(target) or not target[start:end].strip():
        raise InvalidInputError(f"target_span {span!r} must be a non-empty stretch of text inside the "
                                f"{len(target)}-character target")
    if model_input.contrast is not None:
        raise InvalidInputError("target_span and contrast_target do not combine: a contrast compares whole answers")
    base = len(model_input.text) - len(target)  # where the target's first character is in the model's text
    tokens = [index for index, position in enumerate(range(model_input.target_start, model_input.length))
              if (offset := model_input.offsets[position])[0] < base + end and base + start < offset[1]]
    return dataclasses.replace(model_input, target_span=(tokens[0], tokens[-1] + 1))


def validate_contrast(contrast_target: Any, target: str) -> str:
    """A usable contrast target: a non-empty string other than the target, else a typed error."""
    if not isinstance(contrast_target, str):
        raise InvalidInputError(f"contrast_target must be a string, got {type(contrast_target).__name__}")
    if not contrast_target.strip():
        raise InvalidInputError("contrast_target is empty; give the alternative answer to contrast with (e.g. 'No')")
    if contrast_target.strip() == target.strip():
        raise InvalidInputError(f"contrast_target {contrast_target!r} equals the target: nothing to contrast")
    return contrast_target


def with_contrast(model_input: ModelInput, contrast: ModelInput) -> ModelInput:
    """``model_input`` with ``contrast`` (the same prompt, another target), after checking their prompts are the
    same tokens (masks and embeddings of the prompt apply to both)."""
    start = model_input.target_start
    same = contrast.target_start == start and bool((contrast.input_ids[:start] == model_input.input_ids[:start]).all())
    if not same:
        raise InvalidInputError(
            f"the prompt tokenizes differently before the target {model_input.target!r} and before the contrast "
            f"{contrast.target!r} (the tokenizer merges the end of the prompt into the answer); start both answers "
            "the same way, e.g. both with a space or both without")
    return dataclasses.replace(model_input, contrast=contrast)


def build_model_input(
    tokenizer: Any,
    *,
    target: str,
    messages: Optional[Messages] = None,
    prompt: Optional[str] = None,
    include_template_tokens: bool = False,
    contrast_target: Optional[str] = None,
) -> ModelInput:
    """Tokenize ``messages`` (chat) or ``prompt`` (raw) followed by ``target``, once, with offsets.

    For a raw prompt, a single space is put between prompt and target when the prompt does not end with whitespace
    and the target starts with a letter or digit; it belongs to the target side (word-initial tokens carry their
    leading space). A target starting with punctuation or whitespace continues the prompt as given.
    With ``contrast_target``, the same prompt followed by it is the input's ``contrast``: its prompt tokens must be
    the target's (they are, unless the tokenizer merges the end of the prompt into one of them).
    """
    if contrast_target is not None:
        main = build_model_input(tokenizer, target=target, messages=messages, prompt=prompt,
                                 include_template_tokens=include_template_tokens)
        return with_contrast(main, build_model_input(tokenizer, target=validate_contrast(contrast_target, main.target),
                                                     messages=messages, prompt=prompt,
                                                     include_template_tokens=include_template_tokens))
    if (messages is None) == (prompt is None):
        raise InvalidInputError("give exactly one of messages=[...] or prompt='...'")
    target = validate_target(target)
    target_text = target  # what follows the prompt in the model's text
    checked: Optional[list[dict[str, str]]] = None

    if messages is not None:
        checked = validate_messages(messages)
        rendered = render_chat(tokenizer, checked)
        sources = _locate_sources(tokenizer, rendered, checked, include_template_tokens)
        user_prompt = "\n".join(m["content"] for m in checked)
        add_special = False  # chat templates spell out their special tokens
    else:
        if not isinstance(prompt, str):
            raise InvalidInputError(f"prompt must be a string, got {type(prompt).__name__}")
        rendered = validate_text(prompt, "prompt")
        if prompt and not prompt[-1].isspace() and target[0].isalnum():
            target_text = " " + target
        sources = [SourceSpan(None, 0, len(prompt), prompt)] if prompt.strip() else []
        user_prompt = prompt
        add_special = True

    ids, offsets = encode(tokenizer, rendered + target_text, add_special)
    drop_trailing_specials(tokenizer, ids, offsets)
    boundary = len(rendered)
    full_text = rendered + target_text

    def crosses(span: tuple[int, int]) -> bool:  # a token with prompt text (not just a space) and target text
        return span[0] < boundary < span[1] and bool(full_text[span[0] : boundary].strip())

    if any(crosses(span) for span in offsets):
        warnings.warn(
            "the end of the prompt and the start of the target tokenize as one token; they were tokenized "
            "separately so the target keeps its own tokens",
            BoundaryMergeWarning,
            stacklevel=3,
        )
        ids, offsets = encode(tokenizer, rendered, add_special)
        drop_trailing_specials(tokenizer, ids, offsets)
        target_ids, target_offsets = encode(tokenizer, target_text, False)
        # SentencePiece-style tokenizers prefix a lone '▁' that covers no character of its own: not the user's text
        while len(target_offsets) > 1 and target_offsets[0] == target_offsets[1]:
            target_ids, target_offsets = target_ids[1:], target_offsets[1:]
        ids += target_ids
        offsets += [(start + boundary, end + boundary) for start, end in target_offsets]

    target_start = next((i for i, (start, end) in enumerate(offsets) if end > boundary and end > start), None)
    if target_start is None:
        raise InvalidInputError(f"target {target!r} produced no tokens")

    # the unknown token is special, but where it covers user text it stands for the user's characters
    special = set(tokenizer.all_special_ids) - {tokenizer.unk_token_id}
    attributable = np.zeros(len(ids), dtype=bool)
    for position in range(target_start):
        start, end = offsets[position]
        if include_template_tokens:
            attributable[position] = True
        elif ids[position] not in special and end > start:
            attributable[position] = any(start < s.end and s.start < end for s in sources)
    _warn_unknown(tokenizer, ids, offsets, full_text, sources, boundary)

    return ModelInput(
        input_ids=torch.tensor(ids, dtype=torch.long),
        target_start=target_start,
        offsets=tuple(offsets),
        text=full_text,
        attributable=attributable,
        sources=tuple(sources),
        prompt=user_prompt,
        target=target,
        baseline_token_id=_baseline_token_id(tokenizer),
        tokens=tuple(tokenizer.convert_ids_to_tokens(ids)),
        messages=tuple(checked) if checked is not None else None,
    )


def _warn_unknown(
    tokenizer: Any,
    ids: list[int],
    offsets: list[tuple[int, int]],
    text: str,
    sources: Sequence[SourceSpan],
    boundary: int,
) -> None:
    """Warn when characters of the user's text (messages, prompt, target; not the template) tokenize to the unknown
    token: the model cannot tell them apart."""
    unknown = tokenizer.unk_token_id
    if unknown is None:
        return

    def users(start: int, end: int) -> bool:
        return end > boundary or any(start < s.end and s.start < end for s in sources)

    pieces = [
        text[start:end]
        for token, (start, end) in zip(ids, offsets)
        if token == unknown and end > start and users(start, end)
    ]
    if pieces:
        warnings.warn(
            f"the tokenizer maps {pieces!r} to its unknown token {tokenizer.unk_token!r}: the model reads each as "
            "the same unknown symbol (they are still features and get scores)",
            UnknownTokenWarning,
            stacklevel=3,
        )
