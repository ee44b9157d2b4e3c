"""Integration on the real embedded SmolLM2-135M-Instruct: the gradient path, batched scoring, packed batches."""

from __future__ import annotations

import numpy as np
import pytest

from fair_forge.explainability import AttributionExplainer, AttributionMethod, Granularity
from fair_forge.explainability.text.prompt import build_model_input
from fair_forge.explainability.runtime.packer import rows_per_call
from fair_forge.explainability.runtime.scorer import TargetScorer

pytestmark = pytest.mark.integration

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
TARGET = "The capital of France is Paris."


def test_integrated_gradients_converges_at_default_settings(smollm2):
    model, tokenizer = smollm2
    result = AttributionExplainer(model, tokenizer).explain(MESSAGES, TARGET, method="integrated_gradients")
    meta = result.metadata
    assert meta.relative_convergence_delta < 0.01
    assert sum(result.scores) == pytest.approx(meta.score_input - meta.score_baseline, rel=0.01)
    assert result.tokens == ["What", "is", "the", "capital", "of", "France", "?"]
    assert {a.text for a in result.get_top_k(2)} & {"capital", "France"}
    # the 64 steps in as few forward + backward calls as the logits budget allows (one row = (targets + 1) x vocab)
    rows = rows_per_call(1, meta.n_target_tokens, TargetScorer(model).vocab_size, gradients=True)
    assert meta.n_backward_passes == -(-64 // rows)


def test_the_chat_template_special_tokens_reach_the_model(smollm2):
    _, tokenizer = smollm2
    model_input = build_model_input(tokenizer, messages=MESSAGES, target=TARGET)
    ids = model_input.input_ids.tolist()
    assert ids.count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == 3  # default system prompt, user, assistant
    assert "".join(model_input.target_labels) == TARGET


def test_batched_scoring_equals_single_on_the_real_model(smollm2):
    model, tokenizer = smollm2
    model_input = build_model_input(tokenizer, messages=MESSAGES, target=TARGET)
    rng = np.random.default_rng(0)
    keep = np.ones((5, model_input.length), dtype=bool)
    attributable = np.flatnonzero(model_input.attributable)
    keep[:, attributable] = rng.random((5, attributable.size)) < 0.6
    single = TargetScorer(model, batch_size=1).score_token_masks(model_input, keep, per_target=True)
    batched = TargetScorer(model, batch_size=5).score_token_masks(model_input, keep, per_target=True)
    np.testing.assert_allclose(batched, single, atol=1e-4)


def test_sentence_level_input_x_gradient_adds_up_its_words(smollm2):
    model, tokenizer = smollm2
    messages = [{"role": "user", "content": "I live in Paris. What is the capital of France?"}]
    explainer = AttributionExplainer(model, tokenizer, default_method=AttributionMethod.INPUT_X_GRADIENT)
    words = explainer.explain(messages, TARGET, granularity=Granularity.WORD)
    sentences = explainer.explain(messages, TARGET, granularity=Granularity.SENTENCE)
    assert sentences.tokens == ["I live in Paris.", "What is the capital of France?"]
    assert sum(sentences.scores) == pytest.approx(sum(words.scores), rel=1e-5)


@pytest.mark.parametrize("method", ["input_x_gradient", "occlusion"])
def test_packed_batch_equals_one_by_one_on_the_real_model(smollm2, method):
    """explain_batch packs items of different lengths into shared calls; on SmolLM2 the scores do not move."""
    model, tokenizer = smollm2
    items = [(MESSAGES, TARGET),
             ([{"role": "user", "content": "Which planet is known as the red planet?"}], "Mars."),
             ([{"role": "system", "content": "Answer briefly."},
               {"role": "user", "content": "Who wrote Hamlet?"}], "William Shakespeare wrote Hamlet.")]
    explainer = AttributionExplainer(model, tokenizer)
    batch = explainer.explain_batch(items, method=method, show_progress=False)
    assert not batch.failures
    for (messages, target), packed in zip(items, batch):
        one = explainer.explain(messages, target, method=method)
        np.testing.assert_allclose(packed.scores, one.scores, atol=1e-4, rtol=1e-4)
