"""Faithfulness metrics: exact values on a model whose score is a known function of the features present, the true
ranking beating the reversed one and random, batch == one by one, and (integration) SmolLM2 against a direct
computation on the edited text."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from additive import OFFSET, additive_explainer, additive_rounding
from tolerances import log_prob_magnitude, model_bound, to_float64

from fair_forge.explainability import (
    At2Weights,
    AttributionExplainer,
    AttributionResult,
    FaithfulnessBatchReport,
    InvalidInputError,
    available_methods,
    compare_methods,
    faithfulness,
    plot_faithfulness,
)
from fair_forge.explainability import cli
from fair_forge.explainability.evaluation import removed_count
from fair_forge.explainability.text.prompt import build_model_input
from fair_forge.explainability.text.segment import build_features
from fair_forge.explainability.core.types import Granularity

QUESTION = "What is the capital of France?"
MESSAGES = [{"role": "user", "content": QUESTION}]
TARGET = "Paris"
WEIGHTS = [0.5, 0.125, 0.25, 2.0, 0.0625, 1.5, 0.375]  # dyadic: every z below is exact


@pytest.fixture
def additive(gpt2_tokenizer) -> tuple[AttributionExplainer, list[float], Any]:
    """(explainer on AdditiveLM, weight of each word feature of QUESTION, its model input)."""
    explainer, model_input = additive_explainer(gpt2_tokenizer, MESSAGES, TARGET, WEIGHTS)
    return explainer, WEIGHTS, model_input


def _hand_metrics(order: list[int], weights: list[float], n_target: int, fractions: list[float],
                  curve: list[float]) -> dict[str, Any]:
    """The metrics from the definitions: f(present features) = n_target x (sum of their weights - OFFSET)."""
    n = len(weights)

    def f(present: set[int]) -> float:
        return n_target * (sum(weights[i] for i in present) - OFFSET)

    every = set(range(n))
    k = lambda x: math.ceil(round(x * n, 9))  # noqa: E731 - the documented rounding
    deletion = [f(every - set(order[: k(x)])) for x in curve]
    insertion = [f(set(order[: k(x)])) for x in curve]
    area = lambda ys: sum((a + b) / 2 * (x1 - x0) for a, b, x0, x1 in zip(ys, ys[1:], curve, curve[1:]))  # noqa: E731
    return {
        "comprehensiveness": np.mean([f(every) - f(every - set(order[: k(x)])) for x in fractions]),
        "sufficiency": np.mean([f(every) - f(set(order[: k(x)])) for x in fractions]),
        "deletion_auc": area(deletion), "insertion_auc": area(insertion),
        "deletion_curve": deletion, "insertion_curve": insertion,
    }


def _score_bound(model: Any, tokenizer: Any, result: AttributionResult) -> float:
    """``tolerances.model_bound`` of ``result``'s explained score (its target log-probs over its input)."""
    if result.messages is not None:
        messages = [message.model_dump() for message in result.messages]
        model_input = build_model_input(tokenizer, target=result.target, messages=messages)
    else:
        model_input = build_model_input(tokenizer, target=result.target, prompt=result.prompt)
    return model_bound(model, log_prob_magnitude(model, model_input.input_ids), length=model_input.length,
                       terms=model_input.n_target)


def _with_scores(result: Any, scores: list[float]) -> Any:
    return result.model_copy(update={"attributions": [
        a.model_copy(update={"score": s}) for a, s in zip(result.attributions, scores)]})


@pytest.mark.parametrize("mode", ["remove", "replace"])
def test_metrics_equal_a_hand_computation_on_an_additive_model(additive, mode: str) -> None:
    explainer, weights, model_input = additive
    result = explainer.explain(MESSAGES, TARGET, method="occlusion")
    exact = additive_rounding(model_input.n_target, WEIGHTS)
    leave_one_out = np.array(weights) * model_input.n_target
    np.testing.assert_allclose(result.scores, leave_one_out, rtol=0, atol=exact)
    fractions, curve = [0.1, 0.3, 0.5], np.linspace(0, 1, 8).tolist()
    report = faithfulness(explainer, result, MESSAGES, fractions=fractions, curve_points=8, mode=mode,
                          n_random=4, seed=3)
    true_order = sorted(range(len(weights)), key=lambda i: -weights[i])
    assert report.ranking == true_order
    assert report.features_removed == [1, 3, 4] and report.n_features == 7
    assert report.full_score == pytest.approx(model_input.n_target * (sum(weights) - OFFSET), abs=exact)
    assert report.empty_score == pytest.approx(-model_input.n_target * OFFSET, abs=exact)
    expected = _hand_metrics(true_order, weights, model_input.n_target, fractions, curve)
    for name, value in expected.items():
        np.testing.assert_allclose(getattr(report.explanation, name), value, rtol=0, atol=exact, err_msg=name)
    rng = np.random.default_rng(3)  # the documented random orders: default_rng(seed) per item
    randoms = [_hand_metrics(rng.permutation(7).tolist(), weights, model_input.n_target, fractions, curve)
               for _ in range(4)]
    for name in ("comprehensiveness", "sufficiency", "deletion_auc", "insertion_auc"):
        values = [r[name] for r in randoms]
        np.testing.assert_allclose(getattr(report.random_mean, name), np.mean(values), rtol=0, atol=exact,
                                   err_msg=name)
        # a standard deviation moves by at most as much as the values it is taken of
        np.testing.assert_allclose(getattr(report.random_std, name), np.std(values), rtol=0, atol=exact,
                                   err_msg=name)


def test_true_ranking_beats_random_which_beats_the_reversed_ranking(additive) -> None:
    explainer, weights, _ = additive
    result = explainer.explain(MESSAGES, TARGET, method="occlusion")
    true = faithfulness(explainer, result, MESSAGES, n_random=20)
    reversed_ = faithfulness(explainer, _with_scores(result, [-s for s in result.scores]), MESSAGES, n_random=0)
    random = true.random_mean
    assert true.comprehensiveness > random.comprehensiveness > reversed_.comprehensiveness
    assert true.sufficiency < random.sufficiency < reversed_.sufficiency
    assert true.deletion_auc < random.deletion_auc < reversed_.deletion_auc
    assert true.insertion_auc > random.insertion_auc > reversed_.insertion_auc
    assert reversed_.random_mean is None and reversed_.ranking == true.ranking[::-1]


def test_ties_are_ranked_by_position_and_fractions_round_up(additive) -> None:
    explainer, _, _ = additive
    result = explainer.explain(MESSAGES, TARGET, method="occlusion")
    report = faithfulness(explainer, _with_scores(result, [1.0, 2.0, 1.0, 2.0, 0.0, 1.0, 0.0]), MESSAGES, n_random=0)
    assert report.ranking == [1, 3, 0, 2, 5, 4, 6]
    assert [removed_count(f, 10) for f in (0.1, 0.2, 0.3, 0.7, 1.0)] == [1, 2, 3, 7, 10]
    assert [removed_count(f, 7) for f in (0.01, 0.1, 0.5)] == [1, 1, 4]


@pytest.mark.parametrize("method", available_methods())
def test_every_method_result_can_be_evaluated(tiny_gpt2, method: str) -> None:
    model, tokenizer = tiny_gpt2
    to_float64(model)  # the report's full score is the direct score of the input: an identity
    explainer = AttributionExplainer(model, tokenizer)
    params = {"weights": At2Weights.uniform(model)} if method == "at2" else {}  # head weights belong to one model
    result = explainer.explain(MESSAGES, "The capital of France is Paris.", method=method, **params)
    report = faithfulness(explainer, result, MESSAGES, n_random=2)
    assert report.method == result.method and report.n_features == len(result.attributions)
    assert len(report.explanation.deletion_curve) == 11
    model_input = build_model_input(tokenizer, target="The capital of France is Paris.", messages=MESSAGES)
    with torch.no_grad():
        logits = model(model_input.input_ids[None]).logits[0, model_input.target_start - 1 : -1].log_softmax(-1)
    direct = logits.gather(-1, model_input.target_ids[:, None]).sum().item()
    bound = model_bound(model, log_prob_magnitude(model, model_input.input_ids), length=model_input.length,
                        terms=model_input.n_target)
    assert report.full_score == pytest.approx(direct, abs=bound)
    assert report.explanation.deletion_curve[0] == report.full_score == report.explanation.insertion_curve[-1]


@pytest.mark.parametrize("granularity", ["token", "word", "sentence"])
def test_every_granularity_and_raw_prompts(tiny_lm, granularity: str) -> None:
    model, tokenizer = tiny_lm
    explainer = AttributionExplainer(model, tokenizer)
    prompt = "The quick brown fox jumps. Dogs and cats are friends!"
    result = explainer.explain(prompt=prompt, target="Paris is a city.", method="occlusion", granularity=granularity)
    report = faithfulness(explainer, result, prompt, mode="replace", n_random=2)
    assert report.granularity.value == granularity and report.n_features == len(result.attributions)
    assert report.curve_features[-1] == report.n_features and report.n_forward_passes >= 1


def test_batch_equals_one_by_one_and_same_seed_same_random_orders(tiny_gpt2) -> None:
    model, tokenizer = tiny_gpt2
    to_float64(model)  # packed reports equal reports made one by one: an identity
    explainer = AttributionExplainer(model, tokenizer)
    items = [
        {"question": "What is the capital of France?", "answer": "Paris."},
        {"messages": [{"role": "system", "content": "Answer in one short sentence."},
                      {"role": "user", "content": "Explain why the sky is blue."}], "target": "Light scatters."},
        {"question": "Who?"},  # no answer: a failure in the batch, skipped by the report
        ("Dogs and cats are friends!", "The quick brown fox."),
    ]
    batch = explainer.explain_batch(items, method="lime", show_progress=False)
    assert batch.indices == [0, 1, 3]
    for mode in ("remove", "replace"):
        packed = faithfulness(explainer, batch, items, mode=mode, n_random=3, seed=7)
        assert isinstance(packed, FaithfulnessBatchReport) and packed.indices == [0, 1, 3]
        for report, result, index in zip(packed.reports, batch, batch.indices):
            alone = faithfulness(explainer, result, items[index], mode=mode, n_random=3, seed=7)
            # metrics are differences, means and standard deviations of scores: within twice a score's bound
            bound = 2 * _score_bound(model, tokenizer, result)
            for name in ("explanation", "random_mean", "random_std"):
                mine, theirs = getattr(report, name).model_dump(), getattr(alone, name).model_dump()
                for key in mine:
                    np.testing.assert_allclose(mine[key], theirs[key], rtol=0, atol=bound,
                                               err_msg=f"{mode} {name}.{key}")
        again = faithfulness(explainer, batch, items, mode=mode, n_random=3, seed=7)
        assert again.random_mean == packed.random_mean and again.mean == packed.mean
        assert packed.mean.comprehensiveness == np.mean([r.comprehensiveness for r in packed.reports])
    other = faithfulness(explainer, batch, items, n_random=3, seed=8)
    assert other.random_mean != faithfulness(explainer, batch, items, n_random=3, seed=7).random_mean


def test_results_carry_what_was_explained(tiny_gpt2) -> None:
    """Without ``inputs`` a report re-reads the result's own messages or raw prompt, also after a JSON round trip."""
    model, tokenizer = tiny_gpt2
    explainer = AttributionExplainer(model, tokenizer)
    items = [{"messages": [{"role": "system", "content": "Answer in one short sentence."},
                           {"role": "user", "content": "Explain why the sky is blue."}], "target": "Light scatters."},
             ("Dogs and cats are friends!", "The quick brown fox.")]
    batch = explainer.explain_batch(items, method="occlusion", show_progress=False)
    given = faithfulness(explainer, batch, items, n_random=2)
    assert faithfulness(explainer, batch, n_random=2).mean == given.mean
    reloaded = AttributionResult.model_validate_json(batch[0].model_dump_json())
    assert faithfulness(explainer, reloaded, n_random=2).explanation == given.reports[0].explanation


def test_bad_input_is_rejected_before_any_model_call(tiny_gpt2, monkeypatch) -> None:
    model, tokenizer = tiny_gpt2
    explainer = AttributionExplainer(model, tokenizer)
    result = explainer.explain(MESSAGES, "Paris.", method="occlusion")

    def no_model(*_: Any, **__: Any) -> Any:
        raise AssertionError("bad input must be rejected before the model is called")

    monkeypatch.setattr(model, "forward", no_model)
    for kwargs in ({"fractions": []}, {"fractions": [0.0]}, {"fractions": [1.5]}, {"fractions": "a"},
                   {"mode": "delete"}, {"n_random": -1}, {"curve_points": 1}, {"seed": True}, {"baseline_id": "pad"}):
        with pytest.raises(InvalidInputError):
            faithfulness(explainer, result, MESSAGES, **kwargs)
    with pytest.raises(InvalidInputError, match="not those of the given input"):
        faithfulness(explainer, result, [{"role": "user", "content": "Something else entirely."}])
    with pytest.raises(InvalidInputError, match="not the result's target"):
        faithfulness(explainer, result, {"messages": MESSAGES, "target": "Rome."})
    with pytest.raises(InvalidInputError):
        faithfulness(explainer, "not a result", MESSAGES)  # type: ignore[arg-type]


def test_compare_methods_table_and_plots(tiny_gpt2) -> None:
    model, tokenizer = tiny_gpt2
    to_float64(model)  # the table's one check packs every method's edits together: equal to one check, in float64
    explainer = AttributionExplainer(model, tokenizer)
    items = [{"question": "What is the capital of France?", "answer": "Paris."},
             {"question": "Explain why the sky is blue.", "answer": "Light scatters."}]
    frame = compare_methods(explainer, items, {"occlusion": {}, "lime": {"n_samples": 40}}, n_random=3)
    assert list(frame["method"]) == ["occlusion", "lime", "random"]
    assert list(frame.columns) == ["method", "comprehensiveness", "sufficiency", "deletion_auc", "insertion_auc",
                                   "seconds_per_item", "passes_per_item", "n_items"]
    batch = explainer.explain_batch(items, method="lime", n_samples=40, show_progress=False)
    report = faithfulness(explainer, batch, items, n_random=3)
    lime = frame[frame.method == "lime"].iloc[0]
    random = frame[frame.method == "random"].iloc[0]
    # the table runs the same batch and the same edits, other rows packed beside them: means of score differences,
    # within twice the largest score's float64 bound
    bound = 2 * max(_score_bound(model, tokenizer, result) for result in batch)
    assert lime.comprehensiveness == pytest.approx(report.mean.comprehensiveness, rel=0, abs=bound)
    assert random.insertion_auc == pytest.approx(report.random_mean.insertion_auc, rel=0, abs=bound)
    assert np.isnan(random.seconds_per_item) and lime.n_items == 2
    for target in (frame, report, report.reports[0]):
        figure = plot_faithfulness(target)
        assert type(figure).__name__ == "Figure" and figure.axes
    with pytest.raises(InvalidInputError):
        plot_faithfulness([1, 2])
    with pytest.raises(InvalidInputError):
        compare_methods(explainer, items, {"lime": {"n_steps": 3}})
    with pytest.raises(InvalidInputError, match="unknown parameter"):
        compare_methods(explainer, items, ["occlusion"], n_sample=3)


def test_cli_evaluate_prints_the_report(tiny_gpt2, tmp_path, capsys) -> None:
    model, tokenizer = tiny_gpt2
    model.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    code = cli.main(["--prompt", QUESTION, "--target", "Paris.", "--model", str(tmp_path / "tiny"),
                     "--method", "occlusion", "--evaluate"])
    out = capsys.readouterr().out
    assert code == 0 and "faithfulness:" in out
    for name in ("comprehensiveness", "sufficiency", "deletion_auc", "insertion_auc"):
        assert name in out


def _edited_content(content: str, features: list[Any], removed: set[int]) -> str:
    """``content`` without the removed words and the whitespace before each (the word's leading-space token)."""
    text, cursor = [], 0
    for index, feature in enumerate(features):
        if index in removed:
            start = feature.start
            while start > cursor and content[start - 1].isspace():
                start -= 1
            text.append(content[cursor:start])
            cursor = feature.end
    text.append(content[cursor:])
    return "".join(text)


@pytest.mark.integration
def test_remove_mode_equals_scoring_the_edited_text_on_smollm2(smollm2_float64) -> None:
    """Deleting words from the message, applying the chat template and scoring the target with the model directly
    gives the report's curve values wherever the edited text tokenizes into exactly the kept tokens.

    An identity, so in float64: in float32 the reference itself was the inaccurate side (torch's float32
    log_softmax over SmolLM2's 49,152-token vocabulary is off by up to 2e-5 per token, 1e-4 over this target; the
    scorer's gather - logsumexp by 1e-6)."""
    model, tokenizer = smollm2_float64
    question = "What is the capital city of France and Germany?"
    messages = [{"role": "user", "content": question}]
    target = "The capital of France is Paris."
    explainer = AttributionExplainer(model, tokenizer)
    result = explainer.explain(messages, target, method="occlusion")
    n = len(result.attributions)
    report = faithfulness(explainer, result, messages, curve_points=n + 1, n_random=0)
    model_input = build_model_input(tokenizer, target=target, messages=messages)
    features = build_features(model_input, Granularity.WORD)
    magnitude = log_prob_magnitude(model, model_input.input_ids)
    checked = 0
    for curve, removed_sets in (("deletion_curve", [set(report.ranking[:k]) for k in report.curve_features]),
                                ("insertion_curve", [set(report.ranking[k:]) for k in report.curve_features])):
        for value, removed in zip(getattr(report.explanation, curve), removed_sets):
            content = _edited_content(question, features, removed)
            kept = [int(model_input.input_ids[p]) for p in range(model_input.length)
                    if not any(p in features[i].token_positions for i in removed)]
            rendered = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                     add_generation_prompt=True)
            ids = tokenizer(rendered + target, add_special_tokens=False, return_tensors="pt")["input_ids"]
            if ids[0].tolist() != kept or not content.strip():
                continue  # the edited text tokenizes differently (e.g. a first word loses its leading space)
            with torch.no_grad():
                log_probs = model(ids).logits[0, -model_input.n_target - 1 : -1].log_softmax(-1)
            direct = log_probs.gather(-1, model_input.target_ids[:, None]).sum().item()
            bound = model_bound(model, magnitude, length=len(kept), terms=model_input.n_target)
            assert value == pytest.approx(direct, abs=bound), (curve, content)
            checked += 1
    assert checked >= 6


def test_a_result_restricted_to_some_messages_is_evaluated_on_them(tiny_gpt2) -> None:
    """attribute_messages=[0]: the report edits the system message's features only, the question stays context."""
    model, tokenizer = tiny_gpt2
    explainer = AttributionExplainer(model, tokenizer)
    messages = [{"role": "system", "content": "Paris is a city in France. Berlin is the capital of Germany."},
                {"role": "user", "content": "What is the capital of France?"}]
    result = explainer.explain(messages, "Paris.", method="occlusion", granularity="sentence", attribute_messages=[0])
    assert {a.message_index for a in result.attributions} == {0}
    report = faithfulness(explainer, result, n_random=2)
    assert len(report.ranking) == len(result.attributions) == 2
