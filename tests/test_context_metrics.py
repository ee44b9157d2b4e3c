"""Context metrics (top-k drop, LDS): exact values on an additive model, direct model calls on a tiny GPT-2 at sentence
granularity, the documented seeded ablations, k clipping, undefined LDS, cost, batches and the compare table."""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import pytest
import torch
from additive import OFFSET, additive_explainer, additive_rounding
from scipy.stats import spearmanr
from tolerances import log_prob_magnitude, model_bound, to_float64, unit_roundoff

from fair_forge.explainability import (
    AttributionBatchResult,
    AttributionExplainer,
    FaithfulnessBatchReport,
    FaithfulnessReport,
    InvalidInputError,
    compare_methods,
    faithfulness,
    plot_faithfulness,
)
from fair_forge.explainability.evaluation import METRICS
from fair_forge.explainability.text.prompt import build_model_input

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
TARGET = "Paris"
POWERS = np.array([8, 1, 32, 4, 64, 2, 16]) / 64  # distinct subset sums: no two different edits tie
CLAIMED = [3.0, -1.0, 4.0, 1.0, 5.0, 9.0, 2.0]  # partly wrong about POWERS: feature 5 is not the top one
DOCUMENT = ("Paris is the capital of France. Berlin is in Germany. The sky is blue today. Cats sleep a lot. "
            "Rome is very old.")
DOC_MESSAGES = [{"role": "system", "content": DOCUMENT}, {"role": "user", "content": "What is the capital of France?"}]
ANSWER = "The capital of France is Paris."
CONTEXT = ("top_k_drop", "lds")


@pytest.fixture
def powers(gpt2_tokenizer) -> tuple[AttributionExplainer, Any, Any]:
    """(explainer on an AdditiveLM whose word i weighs POWERS[i], its occlusion result, the model input)."""
    explainer, model_input = additive_explainer(gpt2_tokenizer, MESSAGES, TARGET, POWERS.tolist())
    return explainer, explainer.explain(MESSAGES, TARGET, method="occlusion"), model_input


def _drop_bound(model: Any, tokenizer: Any, **item: Any) -> float:
    """model_bound of a top-k drop on ``item`` (build_model_input's arguments): a difference of two scores."""
    model_input = build_model_input(tokenizer, **item)
    magnitude = log_prob_magnitude(model, model_input.input_ids)
    return 2 * model_bound(model, magnitude, length=model_input.length, terms=model_input.n_target)


def _with_scores(result: Any, scores: list[float]) -> Any:
    return result.model_copy(update={"attributions": [
        a.model_copy(update={"score": s}) for a, s in zip(result.attributions, scores)]})


def _without_first(order: list[int], k: int, n: int) -> np.ndarray:
    keep = np.ones(n, dtype=bool)
    keep[order[:k]] = False
    return keep


def _ranking(scores: list[float]) -> list[int]:
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))  # highest first, ties in reading order


def _ablations(seed: int, n_ablations: int, n: int) -> np.ndarray:
    """The documented draw: each feature kept with probability 1/2, from a stream of its own."""
    return np.random.default_rng((seed, 1)).random((n_ablations, n)) < 0.5


@pytest.mark.parametrize("mode", ["remove", "replace"])
def test_top_k_drop_and_lds_equal_a_hand_computation_on_an_additive_model(powers, mode: str) -> None:
    explainer, result, model_input = powers
    report = faithfulness(explainer, _with_scores(result, CLAIMED), metrics=CONTEXT, mode=mode, top_k=(1, 3, 5, 9),
                          n_random=4, seed=3)

    def f(keep: np.ndarray) -> float:  # the explained score of the features kept, from the model's definition
        return model_input.n_target * (float(keep @ POWERS) - OFFSET)

    n, everything = len(POWERS), np.ones(len(POWERS), dtype=bool)
    exact = additive_rounding(model_input.n_target, POWERS)  # the float64 additive model against the hand values
    assert report.metrics == list(CONTEXT) and report.explanation is None and report.random_mean is None
    assert report.top_k == [1, 3, 5, 9] and report.top_k_removed == [1, 3, 5, 7]  # 9 clipped to the 7 features
    order = _ranking(CLAIMED)
    for k, used in zip(report.top_k, report.top_k_removed):
        assert report.top_k_drop[k] == pytest.approx(f(everything) - f(_without_first(order, used, n)), abs=exact)
    assert report.top_k_drop[9] == report.full_score - report.empty_score  # exact: all removed is the empty row
    rng = np.random.default_rng(3)  # the random orders of the curve metrics, by the same recipe
    orders = [rng.permutation(n).tolist() for _ in range(4)]
    for k, used in zip(report.top_k, report.top_k_removed):
        chance = np.mean([f(everything) - f(_without_first(o, used, n)) for o in orders])
        assert report.random_top_k_drop[k] == pytest.approx(chance, abs=exact)
    ablations = _ablations(3, 32, n)
    expected = spearmanr(ablations @ np.array(CLAIMED), [f(a) for a in ablations]).statistic
    assert 0.2 < expected < 0.9  # a partly right ranking: neither chance nor perfect
    # exact: spearmanr of the same ranks (the edits' scores are >= 1/64 apart, their rounding ~1e-14)
    assert report.n_ablations == 32 and report.lds == expected and report.lds_note is None


def test_an_exact_explanation_has_lds_one_and_beats_random_on_top_k_drop(powers) -> None:
    explainer, result, model_input = powers
    rounding = additive_rounding(model_input.n_target, POWERS)  # occlusion is exact here, up to float64 rounding
    np.testing.assert_allclose(result.scores, POWERS * model_input.n_target, rtol=0, atol=rounding)
    exact = faithfulness(explainer, result, metrics=CONTEXT, n_random=10)
    # a rank correlation of identical rankings: scipy's Pearson of equal rank vectors, one rounding or two
    assert exact.lds == pytest.approx(1.0, rel=0, abs=4 * unit_roundoff(torch.float64))
    assert all(exact.top_k_drop[k] > exact.random_top_k_drop[k] for k in (1, 3))
    assert exact.top_k_drop[5] == pytest.approx(model_input.n_target * np.sort(POWERS)[-5:].sum(), abs=rounding)
    reversed_ = faithfulness(explainer, _with_scores(result, [-s for s in result.scores]), metrics=["lds"])
    assert reversed_.lds == pytest.approx(-1.0, rel=0, abs=4 * unit_roundoff(torch.float64))  # as for +1
    assert reversed_.top_k_drop is None


def _direct_score(model: Any, model_input: Any, result: Any, keep: tuple[bool, ...], mode: str) -> float:
    """The explained score with the model called directly on the kept tokens (or the baseline token in the others)."""
    dropped = sorted({p for a, kept in zip(result.attributions, keep) if not kept for p in a.token_positions})
    ids = model_input.input_ids.clone()
    if mode == "remove":
        ids = ids[[p for p in range(len(ids)) if p not in set(dropped)]]
    else:
        ids[dropped] = model_input.baseline_token_id
    with torch.no_grad():
        log_probs = model(ids[None]).logits[0, -model_input.n_target - 1 : -1].log_softmax(-1)
    return log_probs.gather(-1, model_input.target_ids[:, None]).sum().item()


@pytest.mark.parametrize("mode", ["remove", "replace"])
def test_sentence_metrics_equal_direct_model_calls(tiny_gpt2, mode: str) -> None:
    """The document's sentences are the sources: every edit's score recomputed by calling the model on the edited
    token sequence built by hand, and the LDS recomputed from those values with scipy. An identity: in float64."""
    model, tokenizer = tiny_gpt2
    explainer = AttributionExplainer(to_float64(model), tokenizer)
    result = explainer.explain(DOC_MESSAGES, ANSWER, method="occlusion", granularity="sentence",
                               attribute_messages=[0])
    scores, n = result.scores, len(result.attributions)
    assert n == 5
    report = faithfulness(explainer, result, metrics=CONTEXT, mode=mode, top_k=(1, 2, 3, 8), n_random=0, seed=1)
    model_input = build_model_input(tokenizer, target=ANSWER, messages=DOC_MESSAGES)
    values: dict[tuple[bool, ...], float] = {}

    def f(keep: np.ndarray) -> float:
        key = tuple(bool(k) for k in keep)
        if key not in values:
            values[key] = _direct_score(model, model_input, result, key, mode)
        return values[key]

    everything = np.ones(n, dtype=bool)
    drop = _drop_bound(model, tokenizer, target=ANSWER, messages=DOC_MESSAGES)  # packed rows vs direct calls
    assert report.full_score == pytest.approx(f(everything), abs=drop / 2)
    assert report.top_k_removed == [1, 2, 3, 5]
    for k, used in zip(report.top_k, report.top_k_removed):
        direct = f(everything) - f(_without_first(_ranking(scores), used, n))
        assert report.top_k_drop[k] == pytest.approx(direct, abs=drop), k
    ablations = _ablations(1, 32, n)
    direct_values = [f(a) for a in ablations]
    distinct = np.unique([values[tuple(bool(k) for k in a)] for a in np.unique(ablations, axis=0)])
    # packed calls and direct ones differ by float64 rounding (< drop / 2): too little to reorder the ablations
    assert np.diff(distinct).min() > drop
    expected = spearmanr(ablations @ np.asarray(scores), direct_values).statistic
    assert report.lds == expected  # exact: spearmanr of the same ranks


def test_defaults_and_seeded_ablations_apart_from_the_random_orders(powers) -> None:
    explainer, result, _ = powers
    claimed = _with_scores(result, CLAIMED)
    curves = faithfulness(explainer, claimed, n_random=3, seed=5)
    assert curves.metrics == list(METRICS) and curves.top_k_drop is None and curves.lds is None
    everything = faithfulness(explainer, claimed, metrics=("sufficiency", *CONTEXT), n_random=3, seed=5)
    assert everything.metrics == [*METRICS, *CONTEXT]  # naming one curve metric computes the four
    assert everything.top_k == [1, 3, 5] and everything.n_ablations == 32  # the defaults
    assert everything.explanation == curves.explanation and everything.random_mean == curves.random_mean
    again = faithfulness(explainer, claimed, metrics="lds", n_random=0, seed=5)
    assert again.lds == everything.lds  # the same seed: the same ablations, whatever n_random
    other = faithfulness(explainer, claimed, metrics="lds", seed=6)
    assert other.lds != everything.lds
    # exact: spearmanr of the same ranks (the model's scores of the ablations rank as their hand sums do)
    assert other.lds == spearmanr(_ablations(6, 32, 7) @ np.array(CLAIMED), _ablations(6, 32, 7) @ POWERS).statistic
    fewer = faithfulness(explainer, claimed, metrics="lds", n_ablations=8, seed=5)
    assert fewer.n_ablations == 8 and fewer.lds == spearmanr(
        _ablations(5, 8, 7) @ np.array(CLAIMED), _ablations(5, 8, 7) @ POWERS).statistic
    with pytest.raises(InvalidInputError, match="not computed"):
        _ = again.comprehensiveness
    with pytest.raises(InvalidInputError, match="no curves"):
        plot_faithfulness(again)


def test_an_undefined_lds_is_nan_with_a_note(powers, gpt2_tokenizer) -> None:
    explainer, result, _ = powers
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no ConstantInputWarning from scipy either
        flat = faithfulness(explainer, _with_scores(result, [0.0] * 7), metrics="lds")
        deaf_explainer, _ = additive_explainer(gpt2_tokenizer, MESSAGES, TARGET, [0.0] * 7)
        deaf = faithfulness(deaf_explainer, result, metrics="lds")  # a model that ignores every word
    assert math.isnan(flat.lds) and "linear predictions" in flat.lds_note and "every score is 0" in flat.lds_note
    assert math.isnan(deaf.lds) and "does not depend on which sources" in deaf.lds_note
    reloaded = FaithfulnessReport.model_validate_json(flat.model_dump_json())
    assert math.isnan(reloaded.lds) and reloaded.lds_note == flat.lds_note


def test_bad_input_is_rejected_before_any_model_call(powers, monkeypatch) -> None:
    explainer, result, _ = powers

    def no_model(*_: Any, **__: Any) -> Any:
        raise AssertionError("bad input must be rejected before the model is called")

    monkeypatch.setattr(explainer.model, "forward", no_model)
    bad = [({"top_k": 0}, "top_k"), ({"top_k": [1, 0]}, "top_k"), ({"top_k": []}, "top_k"), ({"top_k": True}, "top_k"),
           ({"top_k": [2.5]}, "top_k"), ({"n_ablations": 1}, "n_ablations"), ({"n_ablations": 4.0}, "n_ablations"),
           ({"metrics": ["lds", "auc"]}, "unknown metric"), ({"metrics": []}, "non-empty"),
           ({"metrics": 3}, "non-empty")]
    for kwargs, message in bad:
        with pytest.raises(InvalidInputError, match=message):
            faithfulness(explainer, result, metrics=kwargs.pop("metrics", CONTEXT), **kwargs)


def test_cost_is_one_row_per_distinct_edit(powers) -> None:
    """With the curves skipped, the rows are f(x), f(nothing), the top-k edits and the distinct ablations."""
    explainer, result, model_input = powers
    report = faithfulness(explainer, result, metrics=CONTEXT, mode="replace", n_random=0)  # every row: L tokens
    keep = np.ones((3, 7), dtype=bool)
    for row, k in enumerate((1, 3, 5)):
        keep[row, _ranking(result.scores)[:k]] = False
    edits = np.unique(np.concatenate([np.ones((1, 7), bool), np.zeros((1, 7), bool), keep, _ablations(0, 32, 7)]),
                      axis=0)
    assert report.n_tokens_processed == len(edits) * model_input.length and report.n_forward_passes >= 1


def test_results_of_one_item_share_its_rows_and_report_as_alone(powers) -> None:
    """Two explanations of the same input (as compare_methods makes) are scored in one set of rows: each distinct
    keep-mask once, the 32 LDS ablations shared, and each report equal to the one made alone."""
    explainer, result, model_input = powers
    other = _with_scores(result, CLAIMED)
    both = AttributionBatchResult(results=[result, other], indices=[0, 1])
    inputs = [{"messages": MESSAGES, "target": TARGET}] * 2
    shared = faithfulness(explainer, both, inputs, metrics=CONTEXT, mode="replace", n_random=0)
    alone = [faithfulness(explainer, r, metrics=CONTEXT, mode="replace", n_random=0) for r in (result, other)]
    for report, single in zip(shared.reports, alone):
        assert report.top_k_drop == single.top_k_drop  # exact: the additive model's rows are sums of dyadic weights
        assert report.lds == single.lds
    masks = [np.ones((1, 7), bool), np.zeros((1, 7), bool), _ablations(0, 32, 7)]
    for scores in (result.scores, CLAIMED):
        for k in (1, 3, 5):
            masks.append(_without_first(_ranking(list(scores)), k, 7)[None])
    distinct = len(np.unique(np.concatenate(masks), axis=0))
    assert distinct < sum(r.n_tokens_processed for r in alone) // model_input.length
    assert shared.reports[0].n_tokens_processed == distinct * model_input.length


def test_batch_equals_one_by_one_and_means_over_items(tiny_gpt2, gpt2_tokenizer, powers) -> None:
    model, tokenizer = tiny_gpt2
    explainer = AttributionExplainer(to_float64(model), tokenizer)  # packed equals alone: an identity, in float64
    items = [{"messages": DOC_MESSAGES, "target": ANSWER},
             ("Dogs and cats are friends! The quick brown fox jumps. It rains.", "The fox.")]
    batch = explainer.explain_batch(items, method="lime", granularity="sentence", n_samples=24, show_progress=False)
    packed = faithfulness(explainer, batch, items, metrics=CONTEXT, n_random=2, seed=4)
    assert isinstance(packed, FaithfulnessBatchReport) and packed.mean is None and packed.lds_items == 2
    for report, result, item in zip(packed.reports, batch, items):
        alone = faithfulness(explainer, result, item, metrics=CONTEXT, n_random=2, seed=4)
        item = dict(messages=item["messages"], target=item["target"]) if isinstance(item, dict) else \
            dict(prompt=item[0], target=item[1])
        np.testing.assert_allclose(list(report.top_k_drop.values()), list(alone.top_k_drop.values()), rtol=0,
                                   atol=_drop_bound(model, tokenizer, **item))
        assert report.lds == alone.lds  # exact: spearmanr of the same ranks
    for k in (1, 3, 5):  # exact: the batch report takes these numpy means of its reports
        assert packed.top_k_drop[k] == float(np.mean([r.top_k_drop[k] for r in packed.reports]))
        assert packed.random_top_k_drop[k] == float(np.mean([r.random_top_k_drop[k] for r in packed.reports]))
    assert packed.lds == float(np.mean([r.lds for r in packed.reports]))
    assert FaithfulnessBatchReport.model_validate_json(packed.model_dump_json()) == packed
    # an item whose LDS is undefined is left out of the mean, and counted out
    additive, _, _ = powers
    other = [{"messages": MESSAGES, "target": TARGET}, {"messages": [{"role": "user", "content": "Dogs bark."}],
                                                        "target": TARGET}]
    mixed = faithfulness(additive, additive.explain_batch(other, method="occlusion", show_progress=False), other,
                         metrics="lds")
    assert math.isnan(mixed.reports[1].lds) and mixed.lds_items == 1 and mixed.lds == mixed.reports[0].lds


def test_compare_methods_shows_the_context_metrics_when_asked(tiny_gpt2) -> None:
    model, tokenizer = tiny_gpt2
    explainer = AttributionExplainer(to_float64(model), tokenizer)  # the table's rows packed otherwise: in float64
    items = [{"messages": DOC_MESSAGES, "target": ANSWER}]
    methods = {"occlusion": {}, "lime": {"n_samples": 24}}
    frame = compare_methods(explainer, items, methods, granularity="sentence", metrics=CONTEXT, top_k=(1, 2),
                            n_random=3)
    assert list(frame["method"]) == ["occlusion", "lime", "random"]
    assert list(frame.columns) == ["method", "top_1_drop", "top_2_drop", "lds", "seconds_per_item",
                                   "passes_per_item", "n_items"]
    batch = explainer.explain_batch(items, method="lime", granularity="sentence", n_samples=24, show_progress=False)
    report = faithfulness(explainer, batch, items, metrics=CONTEXT, top_k=(1, 2), n_random=3)
    lime, random = frame[frame.method == "lime"].iloc[0], frame[frame.method == "random"].iloc[0]
    drop = _drop_bound(model, tokenizer, target=ANSWER, messages=DOC_MESSAGES)
    assert lime.top_2_drop == pytest.approx(report.top_k_drop[2], abs=drop)
    assert lime.lds == report.lds  # exact: spearmanr of the same ranks
    assert random.top_1_drop == pytest.approx(report.random_top_k_drop[1], abs=drop) and np.isnan(random.lds)
    assert len(plot_faithfulness(frame).axes) == 3
    both = compare_methods(explainer, items, ["occlusion"], granularity="sentence", metrics=[*METRICS, "lds"],
                           n_random=0)
    assert list(both.columns)[1:6] == [*METRICS, "lds"] and list(both["method"]) == ["occlusion"]
    with pytest.raises(InvalidInputError, match="n_ablations"):
        compare_methods(explainer, items, ["occlusion"], metrics="lds", n_ablations=1)
