"""Integration on the real embedded SmolLM2-135M-Instruct: the gradient path, batched scoring, packed batches."""

from __future__ import annotations

import numpy as np
import pytest
from tolerances import ESTIMATOR_CONDITION, log_prob_magnitude, model_bound, sum_bound

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
    # a quadrature error, not rounding: the relative convergence delta (< 0.01, above) is this relative error
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


def test_batched_scoring_equals_single_on_the_real_model(smollm2_float64):
    """An identity, so on the float64 copy: in float32 model_bound of a log-prob of SmolLM2 (30 layers) is ~1e-2."""
    model, tokenizer = smollm2_float64
    model_input = build_model_input(tokenizer, messages=MESSAGES, target=TARGET)
    rng = np.random.default_rng(0)
    keep = np.ones((5, model_input.length), dtype=bool)
    attributable = np.flatnonzero(model_input.attributable)
    keep[:, attributable] = rng.random((5, attributable.size)) < 0.6
    single = TargetScorer(model, batch_size=1).score_token_masks(model_input, keep, per_target=True)
    batched = TargetScorer(model, batch_size=5).score_token_masks(model_input, keep, per_target=True)
    bound = model_bound(model, log_prob_magnitude(model, model_input.input_ids), length=model_input.length)
    np.testing.assert_allclose(batched, single, rtol=0, atol=bound)  # per target token: one log-prob each


def test_sentence_level_input_x_gradient_adds_up_its_words(smollm2):
    model, tokenizer = smollm2
    messages = [{"role": "user", "content": "I live in Paris. What is the capital of France?"}]
    explainer = AttributionExplainer(model, tokenizer, default_method=AttributionMethod.INPUT_X_GRADIENT)
    tokens = explainer.explain(messages, TARGET, granularity=Granularity.TOKEN)
    words = explainer.explain(messages, TARGET, granularity=Granularity.WORD)
    sentences = explainer.explain(messages, TARGET, granularity=Granularity.SENTENCE)
    assert sentences.tokens == ["I live in Paris.", "What is the capital of France?"]
    # the same token values (granularity changes no model call), summed in float64 in two groupings (Higham 4.4)
    order = sum_bound(sum(abs(score) for score in tokens.scores), len(tokens.scores))
    assert sum(sentences.scores) == pytest.approx(sum(words.scores), rel=0, abs=order)


@pytest.mark.parametrize("method", ["input_x_gradient", "occlusion"])
def test_packed_batch_equals_one_by_one_on_the_real_model(smollm2_float64, method):
    """explain_batch packs items of different lengths into shared calls; on SmolLM2 the scores do not move (an
    identity, so on the float64 copy, to model_bound)."""
    model, tokenizer = smollm2_float64
    items = [(MESSAGES, TARGET),
             ([{"role": "user", "content": "Which planet is known as the red planet?"}], "Mars."),
             ([{"role": "system", "content": "Answer briefly."},
               {"role": "user", "content": "Who wrote Hamlet?"}], "William Shakespeare wrote Hamlet.")]
    explainer = AttributionExplainer(model, tokenizer)
    batch = explainer.explain_batch(items, method=method, show_progress=False)
    assert not batch.failures
    for (messages, target), packed in zip(items, batch):
        one = explainer.explain(messages, target, method=method)
        model_input = build_model_input(tokenizer, messages=messages, target=target)
        bound = model_bound(model, log_prob_magnitude(model, model_input.input_ids), length=model_input.length,
                            terms=model_input.n_target)
        # occlusion: a difference of two scores; a gradient: what tolerances.ESTIMATOR_CONDITION allows
        bound *= 2 if method == "occlusion" else ESTIMATOR_CONDITION
        np.testing.assert_allclose(packed.scores, one.scores, rtol=0, atol=bound)
