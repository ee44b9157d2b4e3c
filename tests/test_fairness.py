"""Contrastive targets and counterfactual inputs: numbers pinned by direct model calls, by the linearity of the
attributions in the explained score, by exact Shapley values, and by a planted model whose decision depends on one
word only."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from tolerances import ESTIMATOR_CONDITION, log_prob_magnitude, model_bound, to_float64, unit_roundoff

from fair_forge.explainability import AttributionExplainer, AttributionResult, InvalidInputError, swap
from fair_forge.explainability.text.prompt import build_model_input

QUESTION = "What is the capital of France?"
PROMPT = "The capital of France is"
# float32 log-probs of a ~10-token target (|log p| ~ 60 nats) round at ~1e-5; direct calls compute in float64
ATOL = 1e-4


def direct_score(model, tokenizer, target: str, messages=None, prompt=None) -> float:
    """log p(target | input) from one plain model call in float64, on the tokens build_model_input lays out."""
    model_input = build_model_input(tokenizer, target=target, messages=messages, prompt=prompt)
    with torch.no_grad():
        logits = model(model_input.input_ids.unsqueeze(0)).logits[0].double()
    log_probs = logits[model_input.target_start - 1 : -1].log_softmax(-1)
    return float(log_probs.gather(1, model_input.target_ids[:, None]).sum())


def fit_rounding(meta) -> float:
    """Shapley efficiency (the scores sum to f(x) - f(x')) of the float64 fit to the very scores f(x), f(x'): its
    rounding of their size, amplified by at most ESTIMATOR_CONDITION."""
    size = abs(meta.target_score) + abs(meta.counterfactual_score)
    return ESTIMATOR_CONDITION * unit_roundoff(torch.float64) * size


def chat(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def test_contrastive_target_score_is_the_direct_margin(tiny_gpt2) -> None:
    model, tokenizer = tiny_gpt2
    explainer = AttributionExplainer(model, tokenizer)
    target, foil = "The capital of France is Paris.", "Berlin is the capital of Germany."
    a = direct_score(model, tokenizer, target, messages=chat(QUESTION))
    b = direct_score(model, tokenizer, foil, messages=chat(QUESTION))
    for contrast, expected in (("logprob_diff", a - b), ("prob_diff", math.exp(a) - math.exp(b))):
        result = explainer.explain(chat(QUESTION), target, contrast_target=foil, contrast=contrast, method="occlusion")
        assert result.metadata.target_score == pytest.approx(expected, abs=ATOL)
        assert result.contrast_target == foil and result.metadata.score == contrast
        # occlusion's drops sum the margin's changes: each is f(x) - f(x without the word), recomputed directly
        assert AttributionResult.model_validate_json(result.model_dump_json()) == result


@pytest.mark.parametrize("method,params", [("occlusion", {}), ("integrated_gradients", {"n_steps": 4}),
                                           ("input_x_gradient", {})])
def test_a_one_token_contrast_costs_no_extra_model_call(tiny_gpt2, method: str, params: dict) -> None:
    model, tokenizer = tiny_gpt2
    explainer = AttributionExplainer(model, tokenizer)
    plain = explainer.explain(prompt=PROMPT, target="Paris", method=method, **params)
    contrast = explainer.explain(prompt=PROMPT, target="Paris", contrast_target="he", method=method, **params)
    assert build_model_input(tokenizer, prompt=PROMPT, target="he").n_target == 1  # both answers are one token
    for name in ("n_forward_passes", "n_backward_passes", "n_tokens_processed"):
        assert getattr(contrast.metadata, name) == getattr(plain.metadata, name), name
    a = direct_score(model, tokenizer, "Paris", prompt=PROMPT)
    b = direct_score(model, tokenizer, "he", prompt=PROMPT)
    assert contrast.metadata.target_score == pytest.approx(a - b, abs=ATOL)
    assert plain.metadata.target_score == pytest.approx(a, abs=ATOL)


@pytest.mark.parametrize("foil", ["he", "Berlin is in Germany."])  # one token (same logits), several (two inputs)
@pytest.mark.parametrize("method,params", [("input_x_gradient", {}), ("kernel_shap", {"exact": True}),
                                           ("integrated_gradients", {"n_steps": 8})])
def test_logprob_diff_attributions_are_the_difference_of_the_two_answers(tiny_lm, foil, method, params) -> None:
    """Every method here is linear in the explained score, so explaining log p(t) - log p(c) gives the attributions
    of log p(t) minus those of log p(c): the chain rule of a contrast's gradients and its packed rows, checked."""
    model, tokenizer = tiny_lm
    explainer = AttributionExplainer(model, tokenizer)
    words = dict(prompt=PROMPT, method=method, granularity="word", **params)
    both = explainer.explain(target="Paris", contrast_target=foil, **words)
    alone = [explainer.explain(target=answer, **words) for answer in ("Paris", foil)]
    np.testing.assert_allclose(both.scores, np.subtract(alone[0].scores, alone[1].scores), atol=ATOL)
    assert both.metadata.target_score == pytest.approx(
        alone[0].metadata.target_score - alone[1].metadata.target_score, abs=ATOL)


def test_prob_diff_gradients_follow_the_chain_rule(tiny_gpt2) -> None:
    """d (p_t - p_c) = p_t d log p_t - p_c d log p_c, for a contrast of several tokens (two inputs)."""
    model, tokenizer = tiny_gpt2
    explainer = AttributionExplainer(to_float64(model), tokenizer)  # an identity: in float64
    words = dict(prompt=PROMPT, method="input_x_gradient")
    both = explainer.explain(target="Paris.", contrast_target="Berlin is.", contrast="prob_diff", **words)
    alone = [explainer.explain(target=answer, **words) for answer in ("Paris.", "Berlin is.")]
    p = [math.exp(result.metadata.target_score) for result in alone]
    expected = p[0] * np.asarray(alone[0].scores) - p[1] * np.asarray(alone[1].scores)
    # each answer's gradient attributions to their model_bound times ESTIMATOR_CONDITION (test_gradient's), p <= 1
    bound = 0.0
    for answer in ("Paris.", "Berlin is."):
        model_input = build_model_input(tokenizer, prompt=PROMPT, target=answer)
        magnitude = log_prob_magnitude(model, model_input.input_ids)
        bound += ESTIMATOR_CONDITION * model_bound(model, magnitude, length=model_input.length,
                                                   terms=model_input.n_target)
    np.testing.assert_allclose(both.scores, expected, rtol=0, atol=bound)


def test_per_target_contrast_rows_are_token_by_token_differences(tiny_gpt2) -> None:
    model, tokenizer = tiny_gpt2
    explainer = AttributionExplainer(model, tokenizer)
    target, foil = "Paris.", "he."
    sizes = [build_model_input(tokenizer, prompt=PROMPT, target=answer).n_target for answer in (target, foil)]
    if sizes[0] != sizes[1]:
        pytest.skip(f"the tokenizer gives {sizes} tokens")
    words = dict(prompt=PROMPT, method="occlusion", per_target=True)
    both = explainer.explain(target=target, contrast_target=foil, **words)
    alone = [explainer.explain(target=answer, **words) for answer in (target, foil)]
    np.testing.assert_allclose(both.matrix.to_numpy(), alone[0].matrix.to_numpy() - alone[1].matrix.to_numpy(),
                               atol=ATOL)
    with pytest.raises(InvalidInputError, match="token by token"):
        explainer.explain(target=target, contrast_target="No.", **words)


def test_bad_contrasts_and_counterfactuals_fail_before_any_model_call(tiny_gpt2) -> None:
    model, tokenizer = tiny_gpt2
    explainer = AttributionExplainer(model, tokenizer)
    calls = []
    handle = model.register_forward_pre_hook(lambda *args: calls.append(1))
    cases = [
        (dict(contrast_target=""), "empty"),
        (dict(contrast_target=" Paris. "), "equals the target"),
        (dict(contrast_target="No", contrast="ratio"), "contrast must be one of"),
        (dict(counterfactual=chat(QUESTION) + chat("again")), "message"),
        (dict(counterfactual=chat(QUESTION)), "identical"),
        (dict(counterfactual=chat("Völlig andere Worte hier drin.")), "closer|align"),
        (dict(counterfactual=chat("What is the capital of Germany?"), method="saliency"), "no baseline"),
    ]
    try:
        for options, message in cases:
            with pytest.raises(InvalidInputError, match=message):
                explainer.explain(chat(QUESTION), "Paris.", **{"method": "occlusion", **options})
    finally:
        handle.remove()
    assert calls == []


# ---- counterfactual inputs ----------------------------------------------------------------------------------------


X = "The capital of France is a city called Paris."
X_PRIME = "The capital of Germany is a town called Paris."  # two differences: France -> Germany, city -> town


def _shapley(values: dict[tuple[bool, ...], float], n: int) -> np.ndarray:
    phi = np.zeros(n)
    for row, value in values.items():
        size = sum(row)
        for i in range(n):
            if row[i]:
                without = tuple(k and j != i for j, k in enumerate(row))
                weight = math.factorial(size - 1) * math.factorial(n - size) / math.factorial(n)
                phi[i] += weight * (value - values[without])
    return phi


def test_counterfactual_shapley_is_exact_and_sums_to_the_change(tiny_lm) -> None:
    model, tokenizer = tiny_lm
    explainer = AttributionExplainer(model, tokenizer)
    x = chat(X) if tokenizer.chat_template else X
    x_prime = chat(X_PRIME) if tokenizer.chat_template else X_PRIME
    key = "messages" if isinstance(x, list) else "prompt"
    result = explainer.explain(**{key: x}, target="Paris.", counterfactual=x_prime, method="kernel_shap", exact=True)
    assert [(a.text, a.counterfactual_text) for a in result.attributions] == [("France", "Germany"), ("city", "town")]
    meta = result.metadata
    assert sum(result.scores) == pytest.approx(meta.target_score - meta.counterfactual_score, abs=fit_rounding(meta))
    assert meta.target_score == pytest.approx(direct_score(model, tokenizer, "Paris.", **{key: x}), abs=ATOL)
    assert meta.counterfactual_score == pytest.approx(direct_score(model, tokenizer, "Paris.", **{key: x_prime}),
                                                      abs=ATOL)
    texts = {(True, True): X, (False, True): "The capital of Germany is a city called Paris.",
             (True, False): "The capital of France is a town called Paris.", (False, False): X_PRIME}
    values = {row: direct_score(model, tokenizer, "Paris.", **{key: chat(text) if key == "messages" else text})
              for row, text in texts.items()}
    np.testing.assert_allclose(result.scores, _shapley(values, 2), atol=ATOL)
    occlusion = explainer.explain(**{key: x}, target="Paris.", counterfactual=x_prime, method="occlusion")  # one swap at a time
    np.testing.assert_allclose(occlusion.scores, [values[(True, True)] - values[(False, True)],
                                                  values[(True, True)] - values[(True, False)]], atol=ATOL)
    assert AttributionResult.model_validate_json(result.model_dump_json()) == result


def test_counterfactual_integrated_gradients_walk_from_x_prime(tiny_gpt2) -> None:
    model, tokenizer = tiny_gpt2
    explainer = AttributionExplainer(model, tokenizer)
    x, x_prime = "The capital of France is big.", "The capital of Paris is big."  # one token each
    sizes = [build_model_input(tokenizer, prompt=text, target="Yes").target_start for text in (x, x_prime)]
    result = explainer.explain(prompt=x, target="Yes", counterfactual=x_prime, method="integrated_gradients")
    if sizes[0] != sizes[1]:
        pytest.fail("the test needs differences of equal token counts")
    meta = result.metadata
    assert meta.counterfactual_score == pytest.approx(direct_score(model, tokenizer, "Yes", prompt=x_prime), abs=ATOL)
    assert meta.relative_convergence_delta <= 0.01  # the adaptive rule's tolerance
    assert sum(result.scores) == pytest.approx(meta.target_score - meta.counterfactual_score,
                                               abs=0.011 * abs(meta.target_score - meta.counterfactual_score))
    with pytest.raises(InvalidInputError, match="different numbers of tokens"):
        explainer.explain(prompt=x, target="Yes", counterfactual="The capital of Germany is big.",
                          method="integrated_gradients")


def test_counterfactuals_and_contrasts_in_a_batch(tiny_gpt2) -> None:
    model, tokenizer = tiny_gpt2
    explainer = AttributionExplainer(model, tokenizer)
    items = [
        {"prompt": X, "target": "Paris.", "counterfactual": X_PRIME},
        {"prompt": X, "target": "Paris.", "contrast_target": "Berlin."},
        {"prompt": X, "target": "Paris.", "counterfactual": X},  # identical: recorded, the others go on
    ]
    batch = explainer.explain_batch(items, method="kernel_shap", exact=True, show_progress=False)
    assert batch.indices == [0, 1] and batch.failures[0].index == 2 and "identical" in batch.failures[0].message
    single = [explainer.explain(prompt=X, target="Paris.", counterfactual=X_PRIME, method="kernel_shap", exact=True),
              explainer.explain(prompt=X, target="Paris.", contrast_target="Berlin.", method="kernel_shap",
                                exact=True)]
    for packed, one in zip(batch, single):
        np.testing.assert_allclose(packed.scores, one.scores, atol=ATOL)
        assert packed.metadata.target_score == pytest.approx(one.metadata.target_score, abs=ATOL)


def test_swap_builds_the_counterfactual(tiny_gpt2) -> None:
    model, tokenizer = tiny_gpt2
    x = chat("The nurse said she was tired, so her shift ended.")
    result = AttributionExplainer(model, tokenizer).explain(x, "Yes", counterfactual=swap(x, "gender"),
                                                            method="kernel_shap", exact=True)
    assert [(a.text, a.counterfactual_text) for a in result.attributions] == [("she", "he"), ("her", "his")]


# ---- a planted decision: only one word matters ----------------------------------------------------------------------


# float64 margins of ~6 after a log-softmax over ~400 logits round at ~12 u; a Shapley fit amplifies that (tolerances)
PLANTED = ESTIMATOR_CONDITION * 12 * unit_roundoff(torch.float64)


class PlantedDecision(torch.nn.Module):
    """A causal LM whose next-token logits are 0 except +-3 for two answer tokens once the key token has been read:
    the decision margin log p(yes) - log p(no) is 6 with the key word in the input and 0 without it. In float64, so
    that it is scored in float64 (``PLANTED``)."""

    def __init__(self, vocab_size: int, key: int, yes: int, no: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
        self.config = SimpleNamespace(vocab_size=vocab_size, model_type="planted")
        self.vocab_size, self.key, self.yes, self.no = vocab_size, key, yes, no

    def forward(self, input_ids=None, attention_mask=None, logits_to_keep: int = 0, **_: Any) -> Any:
        seen = (input_ids == self.key).long()
        if attention_mask is not None:
            seen = seen * attention_mask[:, -input_ids.shape[1]:]
        read = (seen.cumsum(-1) > 0).double()
        logits = torch.zeros((*input_ids.shape, self.vocab_size), dtype=torch.float64) + 0 * self.weight
        logits[..., self.yes] = 3 * read
        logits[..., self.no] = -3 * read
        return SimpleNamespace(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits)


def test_a_decision_on_one_word_puts_all_attribution_there(gpt2_tokenizer) -> None:
    tokenizer = gpt2_tokenizer
    ids = {word: tokenizer(word, add_special_tokens=False)["input_ids"] for word in (" Paris", " France", " he")}
    assert all(len(v) == 1 for v in ids.values())
    model = PlantedDecision(len(tokenizer), ids[" Paris"][0], ids[" France"][0], ids[" he"][0]).eval()
    explainer = AttributionExplainer(model, tokenizer, default_method="occlusion")
    x = "The capital is Paris and the city is big."
    contrast = explainer.explain(prompt=x, target="France", contrast_target="he", method="occlusion")
    scores = dict(zip(contrast.tokens, contrast.scores))
    # known answers of the float64 planted model (PLANTED); the other words' drops are 6 - 6, the same numbers
    assert scores.pop("Paris") == pytest.approx(6.0, abs=PLANTED) and set(scores.values()) == {0.0}
    assert contrast.metadata.target_score == pytest.approx(6.0, abs=PLANTED)
    counterfactual = explainer.explain(prompt=x, target="France", contrast_target="he", method="kernel_shap",
                                       counterfactual="The capital is Rome and the town is big.", exact=True)
    assert [a.text for a in counterfactual.attributions] == ["Paris", "city"]
    assert counterfactual.scores == pytest.approx([6.0, 0.0], abs=PLANTED)
    assert counterfactual.metadata.counterfactual_score == 0.0  # exact: without the key p(yes), p(no) are one number


def test_views_say_what_was_asked_and_escape_it(tiny_gpt2) -> None:
    model, tokenizer = tiny_gpt2
    explainer = AttributionExplainer(model, tokenizer)
    result = explainer.explain(prompt=X, target="Paris.", contrast_target="<b>No</b>",
                               counterfactual=X_PRIME.replace("town", "<i>town</i>"), method="kernel_shap", exact=True)
    page = result.model_copy()._repr_html_()
    assert "why &#x27;Paris.&#x27; rather than &#x27;&lt;b&gt;No&lt;/b&gt;&#x27;" in page and "<b>No</b>" not in page
    assert "x&#x27;: &#x27;&lt;i&gt;town&lt;/i&gt;&#x27;" in page and "<i>" not in page
    from fair_forge.explainability.viz.console import format_table

    table = format_table(result)
    assert "question: why 'Paris.' rather than '<b>No</b>'" in table
    meta = result.metadata
    assert f"f(x) - f(x') = {meta.target_score - meta.counterfactual_score:+.4f}" in table
    assert "city (x': '<i>town</i>')" in table


def test_dataset_rows_carry_contrasts_and_counterfactuals(tiny_gpt2, tmp_path) -> None:
    from fair_forge.explainability import explain_dataset

    model, tokenizer = tiny_gpt2
    explainer = AttributionExplainer(model, tokenizer)
    rows = [{"question": X, "target": "Paris.", "contrast_target": "Berlin.", "counterfactual": X_PRIME, "group": "a"},
            {"question": X, "target": "Paris.", "group": "b"}]
    settings = dict(method="kernel_shap", exact=True, show_progress=False)
    out = explain_dataset(explainer, rows, tmp_path / "out.jsonl", **settings)
    records = out.load()
    assert records.indices == [0, 1] and not records.failures
    first = explainer.explain(chat(X), "Paris.", contrast_target="Berlin.", counterfactual=chat(X_PRIME), **settings)
    got = records[0]
    assert got.contrast_target == "Berlin." and [a.counterfactual_text for a in got.attributions] == ["Germany", "town"]
    np.testing.assert_allclose(got.scores, first.scores, atol=ATOL)
    assert got.metadata.counterfactual_score == pytest.approx(first.metadata.counterfactual_score, abs=ATOL)
    assert records[1].contrast_target is None and records[1].attributions[0].counterfactual_text is None


def test_cli_explains_a_contrast_and_a_counterfactual(tiny_gpt2, tmp_path, capsys) -> None:
    from fair_forge.explainability import cli

    model, tokenizer = tiny_gpt2
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    argv = ["--prompt", X, "--target", "Paris.", "--contrast-target", "Berlin.", "--counterfactual", X_PRIME,
            "--method", "kernel_shap", "--param", "exact=true", "--model", str(folder), "--json", "-"]
    assert cli.main(argv) == 0
    result = AttributionResult.model_validate_json(capsys.readouterr().out)
    assert result.contrast_target == "Berlin." and result.counterfactual_prompt == X_PRIME
    assert sum(result.scores) == pytest.approx(result.metadata.target_score - result.metadata.counterfactual_score,
                                               abs=fit_rounding(result.metadata))
    assert cli.main(argv[:-2] + ["--contrast", "ratio"]) == 2  # an unknown contrast: bad input


def test_faithfulness_of_a_contrast_measures_the_margin(tiny_gpt2) -> None:
    from fair_forge.explainability import faithfulness

    model, tokenizer = tiny_gpt2
    explainer = AttributionExplainer(model, tokenizer)
    result = explainer.explain(prompt=X, target="Paris.", contrast_target="Berlin is.", method="occlusion")
    report = faithfulness(explainer, result, X, n_random=0)
    assert report.score == "logprob_diff"
    assert report.full_score == pytest.approx(result.metadata.target_score, abs=ATOL)  # the margin, not log p
    with pytest.raises(InvalidInputError, match="counterfactual"):
        counterfactual = explainer.explain(prompt=X, target="Paris.", counterfactual=X_PRIME, method="occlusion")
        faithfulness(explainer, counterfactual, X)


# ---- claim-level targets --------------------------------------------------------------------------------------------


def test_a_target_span_explains_its_tokens_given_the_rest_of_the_answer(tiny_gpt2) -> None:
    """log p(second sentence | prompt, first sentence) = log p(both) - log p(first): two plain log-probs."""
    from fair_forge.explainability import answer_sentences

    model, tokenizer = tiny_gpt2
    explainer = AttributionExplainer(model, tokenizer)
    first, second = "Paris is in France.", " Berlin is in Germany."
    answer = first + second
    both = direct_score(model, tokenizer, answer, prompt=PROMPT)
    alone = direct_score(model, tokenizer, first, prompt=PROMPT)
    assert build_model_input(tokenizer, prompt=PROMPT, target=answer).target_ids[: len(
        build_model_input(tokenizer, prompt=PROMPT, target=first).target_ids)].tolist() == \
        build_model_input(tokenizer, prompt=PROMPT, target=first).target_ids.tolist()  # the first sentence's tokens
    span = (len(first) + 1, len(answer))
    result = explainer.explain(prompt=PROMPT, target=answer, target_span=span, method="occlusion")
    assert result.target_span == span and result.metadata.target_score == pytest.approx(both - alone, abs=ATOL)
    claims = answer_sentences(explainer, prompt=PROMPT, answer=answer, method="occlusion")
    assert [r.target_span for r in claims] == [(0, len(first)), span]
    np.testing.assert_allclose(claims[1].scores, result.scores, atol=ATOL)
    assert claims[0].metadata.target_score == pytest.approx(alone, abs=ATOL)
    for bad in [(5, 5), (0, 999), (3, 2)]:
        with pytest.raises(InvalidInputError, match="target_span"):
            explainer.explain(prompt=PROMPT, target=answer, target_span=bad, method="occlusion")
