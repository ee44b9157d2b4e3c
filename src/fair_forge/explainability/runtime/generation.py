"""The model's own answers: generate the target to explain when an item has none.

Prompts are rendered exactly as ``text/prompt.py`` renders them for attribution (chat template with the generation prompt,
or the raw prompt with the tokenizer's special tokens), left-padded by hand into batches (the tokenizer is never
changed), decoded greedily by default, cut at the first token that ends a turn, and stripped of surrounding
whitespace: the text ``build_model_input`` then tokenizes in context as the target.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from ..errors import ExplainabilityError, InvalidInputError
from .models import borrowed
from ..text.prompt import Messages, drop_trailing_specials, encode, render_chat, validate_messages

DEFAULT_MAX_NEW_TOKENS = 64
DEFAULT_GENERATION_BATCH_SIZE = 8
# Special tokens chat models end a turn with, besides the tokenizer's and the generation config's EOS.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>")

PromptRequest = tuple[Optional[Messages], Optional[str]]  # (messages, None) for chat, (None, prompt) for raw text


def end_of_turn_ids(model: Any, tokenizer: Any) -> list[int]:
    """Token ids that end an answer: EOS of the tokenizer and of the model's generation config, and the chat
    end-of-turn tokens the vocabulary knows."""
    ids: set[int] = set()
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (tokenizer.eos_token_id, config_eos):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    vocabulary = tokenizer.get_vocab()
    ids.update(vocabulary[name] for name in END_OF_TURN_TOKENS if name in vocabulary)
    return sorted(ids)


def prompt_ids(tokenizer: Any, messages: Optional[Messages], prompt: Optional[str]) -> list[int]:
    """The token ids the model reads before its answer, as ``build_model_input`` builds them."""
    if (messages is None) == (prompt is None):
        raise InvalidInputError("give exactly one of messages=[...] or prompt='...'")
    if messages is not None:
        ids, offsets = encode(tokenizer, render_chat(tokenizer, validate_messages(messages)), False)
    else:
        if not isinstance(prompt, str):
            raise InvalidInputError(f"prompt must be a string, got {type(prompt).__name__}")
        ids, offsets = encode(tokenizer, prompt, True)
    drop_trailing_specials(tokenizer, ids, offsets)
    if not ids:
        raise InvalidInputError("the prompt is empty: there is nothing to generate an answer from")
    return ids


def _left_padded(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row_index, row in enumerate(rows):
        input_ids[row_index, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        attention_mask[row_index, width - len(row) :] = 1
    return input_ids, attention_mask


def generate_targets(
    model: Any,
    tokenizer: Any,
    requests: Sequence[PromptRequest],
    *,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    batch_size: int = DEFAULT_GENERATION_BATCH_SIZE,
    **generate_kwargs: Any,
) -> list[str]:
    """The model's answer to each ``(messages, prompt)`` request, ``batch_size`` prompts per ``generate`` call.

    Greedy unless ``generate_kwargs`` say otherwise (they go to ``model.generate`` as given). An answer may be the
    empty string (the model ended its turn at once); callers decide whether that is an error.
    """
    if max_new_tokens < 1:
        raise InvalidInputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if batch_size < 1:
        raise InvalidInputError(f"batch_size must be >= 1, got {batch_size}")
    rows = [prompt_ids(tokenizer, messages, prompt) for messages, prompt in requests]
    stops = end_of_turn_ids(model, tokenizer)
    pad_candidates = (tokenizer.pad_token_id, stops[0] if stops else None, 0)
    pad_id = next(int(candidate) for candidate in pad_candidates if candidate is not None)
    device = next(model.parameters()).device
    options = {"do_sample": False, "pad_token_id": pad_id, "eos_token_id": stops or None, **generate_kwargs}
    answers: list[str] = []
    with borrowed(model), torch.no_grad():
        for start in range(0, len(rows), batch_size):
            input_ids, attention_mask = _left_padded(rows[start : start + batch_size], pad_id)
            output = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                max_new_tokens=max_new_tokens,
                **options,
            )
            for generated in output[:, input_ids.shape[1] :].tolist():
                answers.append(_answer_text(tokenizer, generated, stops))
    return answers


def _answer_text(tokenizer: Any, generated: list[int], stops: Sequence[int]) -> str:
    """The text before the first end-of-turn token, without special tokens and surrounding whitespace."""
    end = next((position for position, token in enumerate(generated) if token in stops), len(generated))
    return tokenizer.decode(generated[:end], skip_special_tokens=True).strip()


def generate_target(
    model: Any,
    tokenizer: Any,
    *,
    messages: Optional[Messages] = None,
    prompt: Optional[str] = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    **generate_kwargs: Any,
) -> str:
    """The model's answer to one prompt; an error when it answers nothing (there would be nothing to explain)."""
    (answer,) = generate_targets(model, tokenizer, [(messages, prompt)], max_new_tokens=max_new_tokens,
                                 **generate_kwargs)
    if not answer:
        raise ExplainabilityError("the model generated an empty answer: there is no target to explain")
    return answer
