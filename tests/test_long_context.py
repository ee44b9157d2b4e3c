"""Sentences across messages: message indices on features, and attribution restricted to some messages."""

from __future__ import annotations

import numpy as np
import pytest
from tolerances import log_prob_magnitude, model_bound, to_float64

from fair_forge.explainability import AttributionExplainer
from fair_forge.explainability.errors import InvalidInputError
from fair_forge.explainability.text.prompt import build_model_input
from fair_forge.explainability.runtime.scorer import TargetScorer
from fair_forge.explainability.text.segment import build_features, restrict_to_messages
from fair_forge.explainability.core.types import Granularity

MESSAGES = [
    {"role": "system", "content": "Paris is a city in France. Berlin is the capital of Germany."},
    {"role": "user", "content": "The quick brown fox jumps. Dogs and cats are friends!"},
    {"role": "user", "content": "What is the capital of France?"},
]
TARGET = "The capital of France is Paris."


def rounding(model, model_input, terms: int = 1) -> float:
    """What two layouts of ``model_input``'s rows (cached prefixes of other lengths, padding) may differ by in
    rounding alone, summed over ``terms`` target log-probs (``tolerances.model_bound``)."""
    magnitude = log_prob_magnitude(model, model_input.input_ids)
    return model_bound(model, magnitude, length=model_input.length, terms=terms)


def test_sentences_of_every_message_carry_their_message_index(gpt2_tokenizer):
    features = build_features(build_model_input(gpt2_tokenizer, target=TARGET, messages=MESSAGES), Granularity.SENTENCE)
    assert [(f.message_index, f.text) for f in features] == [
        (0, "Paris is a city in France."), (0, "Berlin is the capital of Germany."),
        (1, "The quick brown fox jumps."), (1, "Dogs and cats are friends!"),
        (2, "What is the capital of France?"),
    ]


def test_restriction_makes_only_the_chosen_messages_attributable(gpt2_tokenizer):
    model_input = build_model_input(gpt2_tokenizer, target=TARGET, messages=MESSAGES)
    restricted = restrict_to_messages(model_input, (0, 1))
    everything = build_features(model_input, Granularity.SENTENCE)
    features = build_features(restricted, Granularity.SENTENCE)
    assert features == [f for f in everything if f.message_index in (0, 1)]
    question = {p for f in everything if f.message_index == 2 for p in f.token_positions}
    assert not restricted.attributable[sorted(question)].any()
    assert set(np.flatnonzero(restricted.attributable)) == {p for f in features for p in f.token_positions}


def test_other_messages_stay_context_never_masked(tiny_gpt2):
    """Exact KernelSHAP values add up to v(all) - v(no feature kept): with attribute_messages=[0] that is the score
    with message 0's sentences masked and the other messages intact, computed here by a direct masked call."""
    model, tokenizer = tiny_gpt2
    to_float64(model)  # an identity: in float64
    explainer = AttributionExplainer(model, tokenizer)
    result = explainer.explain(MESSAGES, TARGET, method="kernel_shap", granularity="sentence", exact=True,
                               attribute_messages=[0])
    assert {a.message_index for a in result.attributions} == {0} and len(result.attributions) == 2
    model_input = build_model_input(tokenizer, target=TARGET, messages=MESSAGES)
    keep = np.ones((2, model_input.length), dtype=bool)
    keep[1, [p for a in result.attributions for p in a.token_positions]] = False
    full, masked = TargetScorer(model).score_token_masks(model_input, keep)
    # the values' sum is pinned to a difference of two scores, each within a score's bound of the direct call's
    assert sum(result.scores) == pytest.approx(full - masked, abs=2 * rounding(model, model_input, model_input.n_target))


def test_restricted_occlusion_equals_the_same_features_unrestricted(tiny_gpt2):
    model, tokenizer = tiny_gpt2
    to_float64(model)  # the restricted input caches a longer prefix, the same scores: an identity, in float64
    explainer = AttributionExplainer(model, tokenizer)
    everything = explainer.explain(MESSAGES, TARGET, method="occlusion", granularity="sentence")
    restricted = explainer.explain(MESSAGES, TARGET, method="occlusion", granularity="sentence",
                                   attribute_messages=[1])
    chosen = [a for a in everything.attributions if a.message_index == 1]
    assert [a.text for a in restricted.attributions] == [a.text for a in chosen]
    model_input = build_model_input(tokenizer, target=TARGET, messages=MESSAGES)
    bound = 2 * rounding(model, model_input, model_input.n_target)  # an occlusion score: a difference of two scores
    np.testing.assert_allclose(restricted.scores, [a.score for a in chosen], rtol=0, atol=bound)
    batch = explainer.explain_batch([(MESSAGES, TARGET)], method="occlusion", granularity="sentence",
                                    attribute_messages=[1], show_progress=False)
    assert batch[0].scores == restricted.scores  # one item alone: the same calls


@pytest.mark.parametrize("bad", [[], [-1], ["0"], 0, "0", [True]])
def test_bad_attribute_messages_are_settings_errors_raised_before_any_item(tiny_gpt2, bad):
    model, tokenizer = tiny_gpt2
    explainer = AttributionExplainer(model, tokenizer)
    with pytest.raises(InvalidInputError, match="attribute_messages"):
        explainer.iter_explain(iter(()), method="occlusion", attribute_messages=bad)


def test_messages_that_do_not_exist_or_a_raw_prompt_fail_with_the_reason(tiny_gpt2):
    model, tokenizer = tiny_gpt2
    explainer = AttributionExplainer(model, tokenizer)
    with pytest.raises(InvalidInputError, match=r"message\(s\) \[3\] do not exist"):
        explainer.explain(MESSAGES, TARGET, method="occlusion", attribute_messages=[0, 3])
    with pytest.raises(InvalidInputError, match="needs chat messages"):
        explainer.explain(prompt="Paris is a city in France.", target=TARGET, method="occlusion",
                          attribute_messages=[0])


# ---- per-row prefix reuse ---------------------------------------------------------------------------------------


def occlusion_and_random_keeps(model_input, n_random: int = 12) -> np.ndarray:
    """The full row, one row per attributable token masked, and random rows."""
    attributable = np.flatnonzero(model_input.attributable)
    keep = np.ones((1 + attributable.size + n_random, model_input.length), dtype=bool)
    keep[np.arange(1, 1 + attributable.size), attributable] = False
    rng = np.random.default_rng(0)
    keep[1 + attributable.size :, attributable] = rng.random((n_random, attributable.size)) < 0.5
    return keep


@pytest.mark.parametrize("remove", [False, True])
@pytest.mark.parametrize("batch_size", [1, 5, None])
def test_rows_continuing_the_input_cache_equal_full_rows(tiny_lm, monkeypatch, remove, batch_size):
    from fair_forge.explainability.runtime import packer as scoring

    model, tokenizer = tiny_lm
    to_float64(model)  # rows continuing the input's cache equal full rows: an identity, in float64
    messages = MESSAGES if tokenizer.chat_template else None
    prompt = None if messages else " ".join(m["content"] for m in MESSAGES)
    model_input = build_model_input(tokenizer, target=TARGET, messages=messages, prompt=prompt)
    keep = occlusion_and_random_keeps(model_input)
    full = TargetScorer(model, prefix_cache=False).score_token_masks(model_input, keep, remove=remove,
                                                                     per_target=True, batch_size=1)
    monkeypatch.setattr(scoring, "ROW_REUSE_MIN_WIDTH", 0)
    reusing = TargetScorer(model)
    reused = reusing.score_token_masks(model_input, keep, remove=remove, per_target=True, batch_size=batch_size)
    np.testing.assert_allclose(reused, full, rtol=0, atol=rounding(model, model_input))
    if batch_size == 1:  # one forward of the unmasked input, then each row from its first masked (or last kept) token
        last = model_input.target_start - 1
        computed = []
        for row in np.unique(keep, axis=0):
            masked = np.flatnonzero(~row)
            start = min(masked[0], last) if masked.size else last
            if remove:
                start = min(start, np.flatnonzero(row[: model_input.target_start])[-1])
            computed.append(model_input.length - start)
        assert reusing.count.tokens_processed == last + sum(computed)
