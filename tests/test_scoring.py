"""TargetScorer: teacher-forced target log-probs equal a direct model call, in any batching, masked or removed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tolerances import log_prob_magnitude, model_bound, to_float64

from fair_forge.explainability import InvalidInputError
from fair_forge.explainability.text.prompt import build_model_input
from fair_forge.explainability.runtime.scorer import TargetScorer

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
TARGET = "The capital of France is Paris."


def direct_log_probs(model, ids: torch.Tensor, target_start: int) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) for t >= target_start, from full logits: the reference."""
    with torch.no_grad():
        logits = model(ids.unsqueeze(0)).logits[0].double()
    log_probs = torch.log_softmax(logits, -1)
    positions = torch.arange(target_start, ids.shape[0])
    return log_probs[positions - 1, ids[positions]]


def rounding(model, model_input, terms: int = 1) -> float:
    """What two layouts of ``model_input``'s rows may differ by in rounding alone, summed over ``terms`` target
    log-probs (``tolerances.model_bound``)."""
    magnitude = log_prob_magnitude(model, model_input.input_ids)
    return model_bound(model, magnitude, length=model_input.length, terms=terms)


@pytest.fixture
def setup(tiny_lm):
    """(float64 model, model input): every test here checks an identity (batching, masking, caching change no
    log-prob), so in float64, to ``rounding``'s bound."""
    model, tokenizer = tiny_lm
    to_float64(model)
    if tokenizer.chat_template:
        model_input = build_model_input(tokenizer, messages=MESSAGES, target=TARGET)
    else:
        model_input = build_model_input(tokenizer, prompt="What is the capital of France?", target=TARGET)
    return model, model_input


def test_target_log_probs_match_a_direct_model_call(setup):
    model, model_input = setup
    scorer = TargetScorer(model)
    got = scorer.target_log_probs(model_input.target_ids, input_ids=model_input.input_ids.unsqueeze(0))
    expected = direct_log_probs(model, model_input.input_ids, model_input.target_start)
    assert got.shape == (1, model_input.n_target)
    torch.testing.assert_close(got[0], expected, atol=rounding(model, model_input), rtol=0)
    assert scorer.count.forward_passes == 1
    assert scorer.count.tokens_processed == model_input.length


@pytest.mark.parametrize("score", ["sum", "mean", "prob"])
def test_explained_quantity(setup, score):
    model, model_input = setup
    scorer = TargetScorer(model, score=score)
    keep = np.ones((1, model_input.length), dtype=bool)
    log_probs = direct_log_probs(model, model_input.input_ids, model_input.target_start)
    expected = {"sum": log_probs.sum(), "mean": log_probs.mean(), "prob": log_probs.sum().exp()}[score]
    total = rounding(model, model_input, terms=model_input.n_target)  # the sum's bound; exp scales it by its value
    tolerance = {"sum": total, "mean": total / model_input.n_target, "prob": float(expected) * total}[score]
    assert scorer.score_token_masks(model_input, keep)[0] == pytest.approx(float(expected), rel=0, abs=tolerance)


def random_keeps(model_input, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    keep = np.ones((n, model_input.length), dtype=bool)
    attributable = np.flatnonzero(model_input.attributable)
    keep[:, attributable] = rng.random((n, attributable.size)) < 0.5
    keep[1] = keep[0]  # a duplicate row: scored once, answered twice
    return keep


@pytest.mark.parametrize("remove", [False, True])
def test_masked_scores_do_not_depend_on_batch_size(setup, remove):
    model, model_input = setup
    keep = random_keeps(model_input, 11)
    one = TargetScorer(model, batch_size=1, prefix_cache=False)  # pass counts without the prefix's own pass
    many = TargetScorer(model, batch_size=4)
    single = one.score_token_masks(model_input, keep, remove=remove, per_target=True)
    batched = many.score_token_masks(model_input, keep, remove=remove, per_target=True)
    np.testing.assert_allclose(batched, single, rtol=0, atol=rounding(model, model_input))
    distinct = len(np.unique(keep, axis=0))  # duplicates are scored once
    assert distinct < len(keep)
    assert one.count.forward_passes == distinct
    assert many.count.forward_passes == -(-distinct // 4) + 1  # + the cached prefix (removal keeps it too)


def test_replace_masking_equals_calling_the_model_on_replaced_ids(setup):
    model, model_input = setup
    keep = random_keeps(model_input, 3)
    scores = TargetScorer(model).score_token_masks(model_input, keep, baseline_id=3, per_target=True)
    for row, mask in zip(scores, keep):
        ids = torch.where(torch.from_numpy(mask), model_input.input_ids, torch.tensor(3))
        np.testing.assert_allclose(row, direct_log_probs(model, ids, model_input.target_start).numpy(), rtol=0,
                                   atol=rounding(model, model_input))


def test_remove_masking_equals_deleting_the_tokens(setup):
    model, model_input = setup
    keep = random_keeps(model_input, 3)
    scores = TargetScorer(model).score_token_masks(model_input, keep, remove=True, per_target=True)
    for row, mask in zip(scores, keep):
        ids = model_input.input_ids[torch.from_numpy(mask)]
        start = model_input.target_start - int((~mask).sum())
        np.testing.assert_allclose(row, direct_log_probs(model, ids, start).numpy(), rtol=0,
                                   atol=rounding(model, model_input))


def test_bad_masks_are_rejected(setup):
    model, model_input = setup
    scorer = TargetScorer(model)
    with pytest.raises(InvalidInputError, match="shape"):
        scorer.score_token_masks(model_input, np.ones((2, 3), dtype=bool))
    keep = np.ones((1, model_input.length), dtype=bool)
    keep[0, -1] = False
    with pytest.raises(InvalidInputError, match="target tokens"):
        scorer.score_token_masks(model_input, keep)
    assert scorer.count.forward_passes == 0


@pytest.mark.parametrize("kwargs", [dict(score="median"), dict(batch_size=0), dict(batch_size=2.5)])
def test_bad_settings_are_rejected(tiny_gpt2, kwargs):
    with pytest.raises(InvalidInputError):
        TargetScorer(tiny_gpt2[0], **kwargs)


def test_prefix_cache_gives_the_same_scores_with_fewer_tokens(setup):
    model, model_input = setup
    keep = random_keeps(model_input, 7)
    cached = TargetScorer(model, batch_size=3)
    plain = TargetScorer(model, batch_size=3, prefix_cache=False)
    np.testing.assert_allclose(
        cached.score_token_masks(model_input, keep, per_target=True),
        plain.score_token_masks(model_input, keep, per_target=True),
        rtol=0,
        atol=rounding(model, model_input),
    )
    first = int(np.flatnonzero(model_input.attributable)[0])
    assert first > 0
    # the prefix runs once, then every row only its suffix
    distinct = len(np.unique(keep, axis=0))
    assert plain.count.tokens_processed == distinct * model_input.length
    assert cached.count.tokens_processed == first + distinct * (model_input.length - first)
    assert cached.count.forward_passes == plain.count.forward_passes + 1


def test_the_output_layer_hook_is_gone_after_every_call(setup):
    """The scorer feeds the output layer a contiguous input through a pre-hook that lives only inside one call."""
    model, model_input = setup
    scorer = TargetScorer(model)
    head = model.get_output_embeddings()
    batch = model_input.input_ids.unsqueeze(0).expand(3, -1)
    scorer.target_log_probs(model_input.target_ids, input_ids=batch)
    assert not head._forward_pre_hooks
    with pytest.raises(Exception):
        scorer.target_log_probs(model_input.target_ids, input_ids=torch.full_like(batch, 10**6))  # out of vocab
    assert not head._forward_pre_hooks


def test_default_calls_are_sized_by_tokens_and_by_logits(setup, monkeypatch):
    """batch_size=None: as many rows per call as fit the token budget and the logits budget, whichever is smaller."""
    from fair_forge.explainability.runtime import packer as scoring

    model, model_input = setup
    keep = random_keeps(model_input, 11)
    distinct = len(np.unique(keep, axis=0))
    width = model_input.length - int(np.flatnonzero(model_input.attributable)[0])  # the rows after the cached prefix
    reference = TargetScorer(model, batch_size=1).score_token_masks(model_input, keep, per_target=True)
    vocab = TargetScorer(model).vocab_size
    for tokens, logits, rows in [(3 * width, 10**9, 3), (10**6, 2 * (model_input.n_target + 1) * vocab, 2)]:
        monkeypatch.setattr(scoring, "MASKED_TOKENS_PER_CALL", tokens)
        monkeypatch.setattr(scoring, "LOGITS_PER_CALL", logits)
        scorer = TargetScorer(model)
        np.testing.assert_allclose(scorer.score_token_masks(model_input, keep, per_target=True), reference, rtol=0,
                                   atol=rounding(model, model_input))
        assert scorer.count.forward_passes == 1 + -(-distinct // rows)  # the prefix, then full calls


def test_the_prefix_cache_uses_the_current_cache_argument_without_warnings(setup):
    import warnings

    model, model_input = setup
    keep = random_keeps(model_input, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # transformers' FutureWarning for past_key_values would fail here
        scorer = TargetScorer(model)
        scorer.score_token_masks(model_input, keep)
    assert scorer.count.forward_passes == 2  # the cached prefix, then the rows: the cache was used


def test_the_cache_argument_follows_the_forward_signature():
    from fair_forge.explainability.runtime.architectures import cache_argument

    class Old(torch.nn.Module):
        def forward(self, input_ids=None, past_key_values=None):
            return None

    class New(torch.nn.Module):
        def forward(self, input_ids=None, cache=None):
            return None

    assert cache_argument(Old()) == "past_key_values" and cache_argument(New()) == "cache"
