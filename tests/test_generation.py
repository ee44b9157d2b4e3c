"""The model's own answers: batched, left-padded generation equals model.generate on each prompt alone, the turn's end
is cut, the tokenizer is untouched, and explain() without a target explains the generated answer."""

from __future__ import annotations

import pytest
import torch

from conftest import make_tiny_gpt2
from fair_forge.explainability import AttributionExplainer
from fair_forge.explainability.errors import InvalidInputError, UnknownMethodError
from fair_forge.explainability.runtime.generation import (
    _answer_text,
    end_of_turn_ids,
    generate_target,
    generate_targets,
    prompt_ids,
)

RAW_PROMPTS = ["What is the capital", "Paris is", "The quick brown fox jumps over the lazy"]
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "Why is the sky blue?"}],
]


def _alone(model, tokenizer, messages, prompt, max_new_tokens: int) -> str:
    """The oracle: model.generate on the one unpadded prompt, cut at the first end-of-turn token, decoded."""
    ids = torch.tensor([prompt_ids(tokenizer, messages, prompt)])
    output = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                            pad_token_id=tokenizer.pad_token_id or 0)
    new = output[0, ids.shape[1]:].tolist()
    stops = end_of_turn_ids(model, tokenizer)
    end = next((i for i, token in enumerate(new) if token in stops), len(new))
    return tokenizer.decode(new[:end], skip_special_tokens=True).strip()


def test_batched_raw_prompts_equal_generate_alone(tiny_llama) -> None:
    model, tokenizer = tiny_llama
    requests = [(None, prompt) for prompt in RAW_PROMPTS]
    answers = generate_targets(model, tokenizer, requests, max_new_tokens=7, batch_size=3)
    assert answers == [_alone(model, tokenizer, None, prompt, 7) for prompt in RAW_PROMPTS]
    assert all(answers)


def test_batched_chats_equal_generate_alone(gpt2_tokenizer) -> None:
    model = make_tiny_gpt2(len(gpt2_tokenizer), seed=5)  # a seed whose answers are not just newlines
    requests = [(chat, None) for chat in CHATS] + [(None, RAW_PROMPTS[0])]
    answers = generate_targets(model, gpt2_tokenizer, requests, max_new_tokens=5, batch_size=2)
    assert answers == [_alone(model, gpt2_tokenizer, m, p, 5) for m, p in requests]


def test_the_tokenizer_is_not_changed(tiny_llama) -> None:
    model, tokenizer = tiny_llama
    before = (tokenizer.padding_side, tokenizer.pad_token, len(tokenizer), tokenizer.chat_template)
    generate_targets(model, tokenizer, [(None, p) for p in RAW_PROMPTS], max_new_tokens=2)
    assert (tokenizer.padding_side, tokenizer.pad_token, len(tokenizer), tokenizer.chat_template) == before


def test_an_answer_ends_at_the_end_of_turn_token(tiny_gpt2) -> None:
    model, tokenizer = tiny_gpt2
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end in end_of_turn_ids(model, tokenizer)
    generated = tokenizer.encode(" Paris.") + [end] + tokenizer.encode(" junk")
    assert _answer_text(tokenizer, generated, end_of_turn_ids(model, tokenizer)) == "Paris."


def test_generation_kwargs_reach_generate(tiny_llama) -> None:
    model, tokenizer = tiny_llama
    (greedy,) = generate_targets(model, tokenizer, [(None, "Paris is")], max_new_tokens=4)
    first = tokenizer.encode(greedy, add_special_tokens=False)[0]
    (other,) = generate_targets(model, tokenizer, [(None, "Paris is")], max_new_tokens=4, suppress_tokens=[first])
    assert other != greedy
    assert other == _alone_suppressed(model, tokenizer, "Paris is", first)


def _alone_suppressed(model, tokenizer, prompt: str, token: int) -> str:
    ids = torch.tensor([prompt_ids(tokenizer, None, prompt)])
    output = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                            suppress_tokens=[token], pad_token_id=0)
    return tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True).strip()


def test_explain_without_target_explains_the_generated_answer(tiny_llama) -> None:
    model, tokenizer = tiny_llama
    explainer = AttributionExplainer(model, tokenizer)
    result = explainer.explain(prompt="Paris is", method="occlusion")
    expected = generate_target(model, tokenizer, prompt="Paris is")
    assert result.target == expected
    given = explainer.explain(prompt="Paris is", target=expected, method="occlusion")
    assert result.scores == given.scores  # exact: the same target scored in the same calls


def test_empty_target_stays_an_error_and_bad_settings_come_before_generation(tiny_llama, monkeypatch) -> None:
    model, tokenizer = tiny_llama
    explainer = AttributionExplainer(model, tokenizer)
    with pytest.raises(InvalidInputError, match="empty"):
        explainer.explain(prompt="Paris is", target="")

    def no_generation(*_args, **_kwargs):
        raise AssertionError("settings must be checked before the model generates")

    monkeypatch.setattr(model, "generate", no_generation)
    with pytest.raises(UnknownMethodError):
        explainer.explain(prompt="Paris is", method="no_such_method")
    with pytest.raises(InvalidInputError):
        generate_targets(model, tokenizer, [(None, "Paris is")], max_new_tokens=0)
