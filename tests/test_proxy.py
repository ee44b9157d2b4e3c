"""proxy_model: ablations scored by another model of the same vocabulary, checked against the explained model."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import spearmanr

from conftest import make_tiny_gpt2, make_tiny_llama
from tolerances import ESTIMATOR_CONDITION, log_prob_magnitude, model_bound, to_float64
from fair_forge.explainability import AttributionExplainer
from fair_forge.explainability.core.types import Granularity
from fair_forge.explainability.errors import InvalidInputError
from fair_forge.explainability.runtime.scorer import TargetScorer
from fair_forge.explainability.text.prompt import build_model_input
from fair_forge.explainability.text.segment import build_features, membership

MESSAGES = [{"role": "user", "content": "Paris is a city in France. Dogs and cats are friends!"}]
TARGET = "The capital of France is Paris."
QUIET = {"show_progress": False}


def test_a_proxy_of_another_vocabulary_is_refused_before_any_call(tiny_gpt2, llama_tokenizer):
    model, tokenizer = tiny_gpt2
    with pytest.raises(InvalidInputError, match="tokenizer has another vocabulary"):
        AttributionExplainer(model, tokenizer, proxy_model=make_tiny_llama(len(llama_tokenizer)),
                             proxy_tokenizer=llama_tokenizer)
    with pytest.raises(InvalidInputError, match="embedding rows"):  # same tokenizer, a model with more rows
        AttributionExplainer(model, tokenizer, proxy_model=make_tiny_gpt2(len(tokenizer) + 8))
    with pytest.raises(InvalidInputError, match="proxy_check_rows"):
        AttributionExplainer(model, tokenizer, proxy_model=model, proxy_check_rows=1)
    with pytest.raises(InvalidInputError, match="gradient method"):
        AttributionExplainer(model, tokenizer, proxy_model=model).explain(MESSAGES, TARGET, method="saliency")


@pytest.mark.parametrize("method", ["occlusion", "lime", "context_cite", "kernel_shap", "sobol"])
def test_the_explained_model_as_its_own_proxy_changes_nothing_and_agrees_fully(tiny_gpt2, method):
    model, tokenizer = tiny_gpt2
    plain = AttributionExplainer(model, tokenizer).explain(MESSAGES, TARGET, method=method, **QUIET)
    proxied = AttributionExplainer(model, tokenizer, proxy_model=model).explain(MESSAGES, TARGET, method=method,
                                                                                **QUIET)
    assert proxied.scores == plain.scores
    report = proxied.metadata.proxy
    assert report["lds"] == 1.0  # exact: spearmanr of one ranking with itself
    assert report["check_rows"] == min(16, plain.metadata.n_evaluations)  # occlusion asks for 14 rows only
    checked = report["explained_model"]
    assert proxied.metadata.n_forward_passes == plain.metadata.n_forward_passes + checked["n_forward_passes"]
    assert proxied.metadata.n_tokens_processed == plain.metadata.n_tokens_processed + checked["n_tokens_processed"]


def packing(model, tokenizer, terms: int = 0) -> float:
    """model_bound of ``terms`` target log-probs (default: all of TARGET's) of the test input on ``model``, between
    two layouts of its rows."""
    model_input = build_model_input(tokenizer, target=TARGET, messages=MESSAGES)
    magnitude = log_prob_magnitude(model, model_input.input_ids)
    return model_bound(model, magnitude, length=model_input.length, terms=terms or model_input.n_target)


def direct_scores(model, tokenizer, rows: np.ndarray) -> np.ndarray:
    model_input = build_model_input(tokenizer, target=TARGET, messages=MESSAGES)
    member = membership(build_features(model_input, Granularity.SENTENCE), range(model_input.length))
    return TargetScorer(model).score_token_masks(model_input, ~(~rows @ member))


@pytest.mark.parametrize("prefix_cache", [True, False])  # without caches, rows of the two models never share a call
def test_agreement_with_another_model_is_spearman_on_the_checked_rows(tiny_gpt2, prefix_cache):
    """Occlusion over two sentences asks for three rows, all checked: the LDS equals spearmanr of the two models'
    direct scores of those rows, and the scores are the proxy's own occlusion. Identities: in float64."""
    model, tokenizer = tiny_gpt2
    to_float64(model)
    proxy = to_float64(make_tiny_llama(len(tokenizer)))
    result = AttributionExplainer(model, tokenizer, proxy_model=proxy, prefix_cache=prefix_cache).explain(
        MESSAGES, TARGET, method="occlusion", granularity="sentence", **QUIET)
    rows = np.array([[True, True], [False, True], [True, False]])
    main, small = direct_scores(model, tokenizer, rows), direct_scores(proxy, tokenizer, rows)
    report = result.metadata.proxy
    assert report["check_rows"] == 3 and report["model"] == "LlamaForCausalLM"
    assert -1.0 <= report["lds"] <= 1.0
    assert report["lds"] == spearmanr(small, main).statistic  # exact: spearmanr of the same ranks
    # occlusion's drops, each a difference of two rows, packed otherwise than direct_scores'
    np.testing.assert_allclose(result.scores, small[0] - small[1:], rtol=0, atol=2 * packing(proxy, tokenizer))


def test_the_check_is_a_seeded_sample_and_batches_agree(tiny_gpt2):
    model, tokenizer = tiny_gpt2
    proxy = to_float64(make_tiny_gpt2(len(tokenizer), seed=1))  # batched equals alone: an identity, in float64
    explainer = AttributionExplainer(to_float64(model), tokenizer, proxy_model=proxy, proxy_check_rows=5)
    first = explainer.explain(MESSAGES, TARGET, method="lime", seed=3, **QUIET)
    again = explainer.explain(MESSAGES, TARGET, method="lime", seed=3, **QUIET)
    assert first.metadata.proxy["check_rows"] == 5 and first.metadata.proxy["lds"] == again.metadata.proxy["lds"]
    batch = explainer.explain_batch([(MESSAGES, TARGET)] * 3, method="lime", seed=3, **QUIET)
    for result in batch.results:
        # LIME's fit to the proxy's rows, packed with the other items' (ESTIMATOR_CONDITION)
        np.testing.assert_allclose(result.scores, first.scores, rtol=0,
                                   atol=ESTIMATOR_CONDITION * packing(proxy, tokenizer))
        assert result.metadata.proxy["lds"] == first.metadata.proxy["lds"]  # exact: spearmanr of the same ranks


def test_a_counterfactual_is_proxied_through_its_texts(tiny_gpt2):
    model, tokenizer = tiny_gpt2
    counterfactual = [{"role": "user", "content": "Berlin is a city in Germany. Dogs and cats are friends!"}]
    kwargs = dict(method="kernel_shap", granularity="word", counterfactual=counterfactual, **QUIET)
    plain = AttributionExplainer(model, tokenizer).explain(MESSAGES, TARGET, **kwargs)
    proxied = AttributionExplainer(model, tokenizer, proxy_model=model).explain(MESSAGES, TARGET, **kwargs)
    assert proxied.scores == plain.scores and proxied.metadata.proxy["lds"] == 1.0  # exact: a ranking with itself


def test_a_config_with_a_proxy_is_rebuilt_only_with_it(tiny_gpt2):
    model, tokenizer = tiny_gpt2
    explainer = AttributionExplainer(model, tokenizer, proxy_model=model, proxy_check_rows=8)
    assert explainer.config.fingerprint()["proxy_model_name"] == "GPT2LMHeadModel"
    with pytest.raises(InvalidInputError, match="pass the same proxy_model"):
        AttributionExplainer.from_config(model, tokenizer, explainer.config)
    rebuilt = AttributionExplainer.from_config(model, tokenizer, explainer.config, proxy_model=model)
    assert rebuilt.config == explainer.config


def test_rows_of_two_models_in_one_round_run_on_their_own_models(tiny_gpt2):
    """Without prefix caches nothing else tells the rows of a proxy and of the explained model apart: in one round
    (one item's check next to another's ablations) each request is still answered by its own model."""
    from fair_forge.explainability.runtime.answers import answer_requests
    from fair_forge.explainability.runtime.requests import ByScorer, MaskedRows

    model, tokenizer = tiny_gpt2
    to_float64(model)  # one round vs each model alone: an identity, in float64
    proxy = to_float64(make_tiny_llama(len(tokenizer)))
    model_input = build_model_input(tokenizer, target=TARGET, messages=MESSAGES)
    rows = MaskedRows(np.ones((2, model_input.length), dtype=bool), model_input.baseline_token_id)
    rows.keep[1, 3] = False
    own, other = TargetScorer(model, prefix_cache=False), TargetScorer(proxy, prefix_cache=False)
    mine, theirs = answer_requests([(own, model_input, rows), (own, model_input, ByScorer(other, rows))])
    np.testing.assert_allclose(mine, TargetScorer(model).score_token_masks(model_input, rows.keep, per_target=True),
                               rtol=0, atol=packing(model, tokenizer, terms=1))  # per target token: one log-prob
    np.testing.assert_allclose(theirs, TargetScorer(proxy).score_token_masks(model_input, rows.keep, per_target=True),
                               rtol=0, atol=packing(proxy, tokenizer, terms=1))
    assert own.count.forward_passes == other.count.forward_passes == 1
