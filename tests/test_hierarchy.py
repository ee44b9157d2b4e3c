"""Hierarchical search: groups first, then the features of the groups that matter (planted value functions, then a
tiny model on a multi-paragraph document)."""

from __future__ import annotations

import numpy as np
import pytest

from fair_forge.explainability import AttributionExplainer
from fair_forge.explainability.errors import InvalidInputError
from fair_forge.explainability.methods import coalitions as core, get_method, sparse
from fair_forge.explainability.errors import BudgetError
from fair_forge.explainability.methods.hierarchy import PRUNE_BELOW, feature_groups, hierarchical_plan, select_groups
from fair_forge.explainability.text.prompt import build_model_input
from fair_forge.explainability.text.segment import build_features
from fair_forge.explainability.core.types import Granularity

def _budget(budget):
    return core.DEFAULT_MAX_EVALUATIONS if budget is None else budget


ESTIMATORS = {  # (n_features, max_evaluations, given) -> the second stage's plan, as perturbation.py builds them
    "occlusion": lambda n, budget, given: core.occlusion_plan(n),
    "lime": lambda n, budget, given: core.lime_plan(n, n_samples=max(2, min(core.searched_n_samples(n), _budget(budget))),
                                                    seed=0, max_evaluations=_budget(budget)),
    "context_cite": lambda n, budget, given: sparse.sparse_plan(
        n, n_samples=max(2, min(sparse.searched_n_ablations(n), _budget(budget))), seed=0, max_evaluations=_budget(budget),
        given=given),
}
FLAT = {  # the flat runs at their defaults
    "occlusion": lambda n: core.occlusion_plan(n),
    "lime": lambda n: core.lime_plan(n, seed=0),
    "context_cite": lambda n: sparse.sparse_plan(n, seed=0),
}


def runs(n_features: int, size: int) -> list[list[int]]:
    return [list(range(start, min(start + size, n_features))) for start in range(0, n_features, size)]


def planted(n_features: int, weights: dict[int, float]):
    vector = np.zeros(n_features)
    vector[list(weights)] = list(weights.values())
    return lambda masks: -3.0 + masks.astype(np.float64) @ vector


def hierarchical(method: str, v, groups, n_features: int) -> core.Estimate:
    return core.run_with(hierarchical_plan(n_features, groups, ESTIMATORS[method], max_evaluations=100_000), v,
                         n_features)


# ---- planted value functions ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", list(ESTIMATORS))
def test_finds_the_few_planted_sentences_among_a_hundred(method):
    """3 of 100 sentences matter (in groups 1 and 7 of ten): both groups are kept, the other 80 sentences pruned
    (score 0), and the planted ones come out on top, exactly for the exact estimators, in under half the flat rows."""
    weights = {13: 2.0, 17: -1.5, 71: 1.0}
    v = planted(100, weights)
    flat = core.run_with(FLAT[method](100), v, 100)
    estimate = hierarchical(method, v, runs(100, 10), 100)
    report = estimate.extras["hierarchical"]
    assert report["kept_groups"] == [1, 7]
    assert report["pruned_features"] == [f for f in range(100) if f // 10 not in (1, 7)]
    assert not estimate.values[report["pruned_features"]].any()
    assert sorted(np.argsort(-np.abs(estimate.values))[:3]) == sorted(weights)
    np.testing.assert_allclose(report["group_ablation_effects"], [0, 0.5, 0, 0, 0, 0, 0, 1.0, 0, 0], atol=1e-12)
    assert estimate.n_evaluations == report["n_evaluations_groups"] + report["n_evaluations_features"]
    if method != "lime":  # LIME's Ridge shrinks
        np.testing.assert_allclose(estimate.values[list(weights)], list(weights.values()), atol=1e-9)
    # stage 1: the input and the ten groups masked alone. Stage 2 over the 20 kept sentences: occlusion one row
    # each; LIME 4 x 20 (77 distinct, the first of them the input, scored already); ContextCite one random
    # half-ablation per two sentences, fitted with 3 of the first stage's rows (the input, each kept group masked alone)
    second = {"occlusion": 20, "lime": 76, "context_cite": 10}[method]
    assert (report["n_evaluations_groups"], report["n_evaluations_features"]) == (11, second)
    assert (estimate.n_evaluations, flat.n_evaluations) == {
        "occlusion": (31, 101), "lime": (87, 396), "context_cite": (21, 64)}[method]


def random_function(rng: np.random.Generator, n_features: int):
    """Sparse linear effects with pairwise interactions, some inside a group and some across groups."""
    weights = np.where(rng.random(n_features) < 0.2, rng.normal(0, 2, n_features), 0.0)
    pairs = rng.integers(0, n_features, (3, 2))
    strengths = rng.normal(0, 1, 3)

    def v(masks: np.ndarray) -> np.ndarray:
        m = masks.astype(np.float64)
        return m @ weights + sum(s * m[:, a] * m[:, b] for s, (a, b) in zip(strengths, pairs))

    return v


@pytest.mark.parametrize("method", list(ESTIMATORS))
def test_no_pruned_group_moves_the_score_more_on_its_own_than_a_kept_one(method):
    rng = np.random.default_rng(0)
    for _ in range(25):
        n_features = int(rng.integers(8, 40))
        cuts = np.sort(rng.choice(np.arange(1, n_features), size=int(rng.integers(2, 7)) - 1, replace=False))
        groups = [g.tolist() for g in np.split(np.arange(n_features), cuts)]
        v = random_function(rng, n_features)
        report = hierarchical(method, v, groups, n_features).extras["hierarchical"]
        everything = np.ones((1 + len(groups), n_features), dtype=bool)
        for index, group in enumerate(groups):
            everything[1 + index, group] = False
        values = v(everything)
        own = np.abs(values[0] - values[1:])  # computed here, not read from the report
        np.testing.assert_allclose(np.abs(report["group_ablation_effects"]), own, atol=1e-9)
        kept = set(report["kept_groups"])
        pruned = [g for g in range(len(groups)) if g not in kept]
        assert all(own[p] <= own[k] + 1e-12 for p in pruned for k in kept)
        assert all(own[p] < PRUNE_BELOW * own.max() for p in pruned)  # what is pruned is negligible
        assert all(own[k] >= PRUNE_BELOW * own.max() - 1e-12 for k in kept)
        assert report["pruned_features"] == [f for g in pruned for f in groups[g]]


def test_the_kept_features_are_searched_with_the_other_groups_held_as_they_are():
    """The second stage is the method over the kept groups' features, every other feature kept: the same LIME
    estimate as a direct run on that restricted value function."""
    v = planted(30, {4: 1.0, 5: 2.0, 22: -1.0})
    estimate = hierarchical("lime", v, runs(30, 6), 30)
    searched = [f for f in range(30) if f not in estimate.extras["hierarchical"]["pruned_features"]]
    assert searched == [*range(0, 6), *range(18, 24)]

    def restricted(masks: np.ndarray) -> np.ndarray:
        full = np.ones((len(masks), 30), dtype=bool)
        full[:, searched] = masks
        return v(full)

    direct = core.run_with(ESTIMATORS["lime"](len(searched), None, None), restricted, len(searched))
    np.testing.assert_allclose(estimate.values[searched], direct.values, atol=1e-12)
    assert estimate.extras["r2"] == direct.extras["r2"]


def test_every_group_kept_searches_every_feature_after_the_group_rows():
    v = random_function(np.random.default_rng(1), 12)
    v = lambda masks, v=v: v(masks) + masks.astype(float).sum(1)  # noqa: E731  (every group matters)
    estimate = core.run_with(hierarchical_plan(12, runs(12, 4), ESTIMATORS["context_cite"]), v, 12)
    report = estimate.extras["hierarchical"]
    assert report["pruned_features"] == [] and report["kept_groups"] == [0, 1, 2]
    # 4 group rows, then searched_n_ablations(12) = 8 random half-ablations, fitted with the 4 group rows
    assert (report["n_evaluations_groups"], report["n_evaluations_features"]) == (4, 8)
    assert sparse.searched_n_ablations(12) == 8 and sparse.searched_n_ablations(37) == 19
    assert sparse.searched_n_ablations(500) == sparse.MAX_ABLATIONS


def test_max_evaluations_bounds_the_whole_search():
    v = planted(100, {13: 2.0, 17: -1.5, 71: 1.0})
    for budget in (13, 20, 21):  # the group rows and 2 half-ablations, a second stage cut to what is left, all of it
        estimate = core.run_with(hierarchical_plan(100, runs(100, 10), ESTIMATORS["context_cite"],
                                                   max_evaluations=budget), v, 100)
        assert estimate.n_evaluations == budget
    with pytest.raises(BudgetError, match="hierarchical search"):  # not even the 11 group rows
        core.run_with(hierarchical_plan(100, runs(100, 10), ESTIMATORS["context_cite"], max_evaluations=10), v, 100)
    with pytest.raises(BudgetError, match="sparse surrogate"):  # no room for the 2 rows a fit needs
        core.run_with(hierarchical_plan(100, runs(100, 10), ESTIMATORS["context_cite"], max_evaluations=12), v, 100)


def test_per_target_columns_are_kept_and_pruned_together():
    v = planted(20, {2: 1.0, 15: 3.0})
    vector = lambda masks: np.stack([v(masks), 2 * v(masks)], axis=1)  # noqa: E731
    estimate = core.run_with(hierarchical_plan(20, runs(20, 5), ESTIMATORS["occlusion"]), vector, 20)
    assert estimate.values.shape == (2, 20)
    np.testing.assert_allclose(estimate.values[1], 2 * estimate.values[0], atol=1e-12)
    assert estimate.extras["hierarchical"]["kept_groups"] == [0, 3]


def test_selection_prunes_the_groups_negligible_against_the_largest():
    kept = select_groups(np.array([5.0, -4.0, 0.5, 0.99, -1.0]), threshold=0.2)  # |effect| >= 0.2 x 5
    assert kept.tolist() == [True, True, False, False, True]
    assert select_groups(np.zeros(3)).all()  # no effect anywhere: nothing can be pruned
    assert select_groups(np.array([1.0, 1e-3]), threshold=0.0).all()


def test_groups_must_split_the_features_in_order():
    with pytest.raises(InvalidInputError, match="consecutive"):
        core.run_with(hierarchical_plan(4, [[0, 1], [3, 2]], ESTIMATORS["occlusion"]), planted(4, {}), 4)


# ---- groups of a real document --------------------------------------------------------------------------------------

PARAGRAPHS = [
    "Paris is a city in France. The capital of France is Paris. Berlin is the capital of Germany.",
    "The quick brown fox jumps over the lazy dog. Dogs and cats are friends!",
    "Light scatters in the atmosphere. Blue light scatters more. Explain why the sky is blue.",
]
DOCUMENT = "\n\n".join(PARAGRAPHS)
QUESTION = "What is the capital of France?"
TARGET = "The capital of France is Paris."


def document_features(tokenizer, text: str):
    model_input = build_model_input(tokenizer, target=TARGET, prompt=text)
    return build_features(model_input, Granularity.SENTENCE), model_input


def test_groups_are_paragraphs_packed_up_to_sqrt_n_sentences(gpt2_tokenizer):
    features, model_input = document_features(gpt2_tokenizer, DOCUMENT + "\n\n" + QUESTION)
    assert len(features) == 9  # groups of at most 3 sentences: each paragraph whole, the question alone
    assert feature_groups(features, model_input) == [[0, 1, 2], [3, 4], [5, 6, 7], [8]]
    flat, flat_input = document_features(gpt2_tokenizer, " ".join(PARAGRAPHS))  # no blank line: runs of 3
    assert feature_groups(flat, flat_input) == [[0, 1, 2], [3, 4, 5], [6, 7]]
    titles = "\n\n".join(["Paris.", "France.", "Berlin.", "Dogs.", "Cats are friends."])  # one-sentence paragraphs
    short, short_input = document_features(gpt2_tokenizer, titles)
    assert feature_groups(short, short_input) == [[0, 1, 2], [3, 4]]  # packed: ceil(sqrt(5)) = 3


def test_messages_are_paragraphs(gpt2_tokenizer):
    """One sentence, then three in another message: groups of at most 2 that never join the two messages (a text
    without the boundary would give [[0, 1], [2, 3]])."""
    messages = [{"role": "system", "content": "Paris is a city in France."},
                {"role": "user", "content": "Berlin is the capital of Germany. Dogs and cats are friends! " + QUESTION}]
    model_input = build_model_input(gpt2_tokenizer, target=TARGET, messages=messages)
    features = build_features(model_input, Granularity.SENTENCE)
    assert [f.message_index for f in features] == [0, 1, 1, 1]
    assert feature_groups(features, model_input) == [[0], [1, 2], [3]]


# ---- on a model ---------------------------------------------------------------------------------------------------


def test_hierarchical_methods_on_a_tiny_model(tiny_lm):
    """Sentences of a three-paragraph document: occlusion's kept sentences score exactly what flat occlusion gives
    them (the same rows), the pruned ones 0; every method reports its search, and a batch gives the same scores."""
    model, tokenizer = tiny_lm
    explainer = AttributionExplainer(model, tokenizer)
    messages = [{"role": "system", "content": DOCUMENT}, {"role": "user", "content": QUESTION}]
    kwargs = dict(granularity="sentence", attribute_messages=[0], show_progress=False)
    flat = explainer.explain(messages, TARGET, method="occlusion", **kwargs)
    for method in ("occlusion", "lime", "context_cite"):
        result = explainer.explain(messages, TARGET, method=method, hierarchical=True, **kwargs)
        report = result.metadata.hierarchical
        assert report["n_groups"] == 3 and report["groups"] == [[0, 3], [3, 5], [5, 8]]
        pruned = report["pruned_features"]
        kept = [index for index in range(8) if index not in pruned]
        assert [result.scores[index] for index in pruned] == [0.0] * len(pruned)
        # the first request holds the input itself (with each group masked alone): no row is added for its score
        assert result.metadata.n_evaluations == report["n_evaluations_groups"] + report["n_evaluations_features"]
        if method == "occlusion":
            np.testing.assert_allclose([result.scores[i] for i in kept], [flat.scores[i] for i in kept], atol=1e-5)
            own = [flat.metadata.target_score - score for score in _group_scores(explainer, messages, report["groups"])]
            np.testing.assert_allclose(report["group_ablation_effects"], own, atol=1e-5)
        batch = explainer.explain_batch([(messages, TARGET)] * 2, method=method, hierarchical=True,
                                        granularity="sentence", attribute_messages=[0], show_progress=False)
        for item in batch.results:
            np.testing.assert_allclose(item.scores, result.scores, atol=1e-5)


def _group_scores(explainer, messages, groups):
    """The explained score with each group of the document's sentences masked, by a direct masked call."""
    from fair_forge.explainability.runtime.scorer import TargetScorer
    from fair_forge.explainability.text.segment import restrict_to_messages

    model_input = restrict_to_messages(build_model_input(explainer.tokenizer, target=TARGET, messages=messages), (0,))
    features = build_features(model_input, Granularity.SENTENCE)
    keep = np.ones((len(groups), model_input.length), dtype=bool)
    for row, (start, stop) in enumerate(groups):
        keep[row, [p for f in features[start:stop] for p in f.token_positions]] = False
    return TargetScorer(explainer.model).score_token_masks(model_input, keep)


def test_hierarchical_is_a_parameter_of_the_three_methods_only():
    for name in ("occlusion", "lime", "context_cite"):
        assert get_method(name).defaults["hierarchical"] is False
    for name in ("kernel_shap", "sobol"):
        with pytest.raises(InvalidInputError, match="does not take"):
            get_method(name).resolve_params({"hierarchical": True})
    with pytest.raises(InvalidInputError, match="window=1"):
        get_method("occlusion").resolve_params({"hierarchical": True, "window": 2})
    with pytest.raises(InvalidInputError, match="hierarchical"):
        get_method("lime").resolve_params({"hierarchical": 1})



# ---- on a planted model -------------------------------------------------------------------------------------------

FILLERS = ["The dog is blue.", "Cats are friends.", "Paris is a city.", "The sky is blue.", "Light scatters more.",
           "Dogs and cats are friends."]
# (paragraph, sentence) -> (the sentence, a token only it holds, that token's weight)
PLANTED = {(1, 2): ("Numbers like 42 appear.", "Ġ42", 1.0), (1, 4): ("The café is naïve.", "ĠnaÃ", -0.5),
           (4, 3): ("Tokyo is 東京.", "ĠæĿ", 0.75)}
EPS = 2.0**-10  # every other token's weight: each sentence moves the score a little


def test_on_a_planted_model_the_search_finds_the_planted_sentences_in_under_half_the_rows(gpt2_tokenizer):
    """An AdditiveLM on a 36-sentence document (six paragraphs of six): three sentences carry a token of weight
    1, -0.5 and 0.75, every other token weighs 2^-10. The search keeps the two paragraphs holding them, what it
    prunes moves the score by under PRUNE_BELOW of the largest paragraph, the two planted sentences that raise the
    score come out on top and it costs 15 rows (7 group rows, 8 half-ablations fitted with 3 of the group rows) against the flat run's 37, for the same
    top-3 drop."""
    import torch
    from additive import AdditiveLM
    from fair_forge.explainability import faithfulness
    from fair_forge.explainability.text.segment import restrict_to_messages

    tokenizer = gpt2_tokenizer
    paragraphs = [" ".join(PLANTED.get((p, s), (FILLERS[(p + s) % 6],))[0] for s in range(6)) for p in range(6)]
    messages = [{"role": "system", "content": "\n\n".join(paragraphs)}, {"role": "user", "content": QUESTION}]
    table = torch.full((len(tokenizer),), EPS, dtype=torch.float64)
    table[tokenizer.pad_token_id] = 0.0  # the baseline token: a masked sentence drops its weights
    for _, token, weight in PLANTED.values():
        table[tokenizer.convert_tokens_to_ids(token)] = weight
    explainer = AttributionExplainer(AdditiveLM(table, tokenizer.convert_tokens_to_ids("<unk>")), tokenizer,
                                     prefix_cache=False)
    kwargs = dict(method="context_cite", granularity="sentence", attribute_messages=[0], show_progress=False)
    flat = explainer.explain(messages, TARGET, **kwargs)
    searched = explainer.explain(messages, TARGET, hierarchical=True, **kwargs)

    model_input = restrict_to_messages(build_model_input(tokenizer, target=TARGET, messages=messages), (0,))
    features = build_features(model_input, Granularity.SENTENCE)
    assert len(features) == 36
    ids = model_input.input_ids.numpy()
    truth = np.array([model_input.n_target * float(table[ids[list(f.token_positions)]].sum()) for f in features])
    planted = [6 * p + s for p, s in PLANTED]
    report = searched.metadata.hierarchical
    assert report["groups"] == [[6 * p, 6 * p + 6] for p in range(6)] and report["kept_groups"] == [1, 4]
    group_truth = truth.reshape(6, 6).sum(1)
    np.testing.assert_allclose(report["group_ablation_effects"], group_truth, atol=1e-9)
    pruned_groups = [0, 2, 3, 5]
    assert np.abs(group_truth[pruned_groups]).max() < PRUNE_BELOW * np.abs(group_truth).max()
    assert report["pruned_features"] == [f for g in pruned_groups for f in range(6 * g, 6 * g + 6)]

    scores, flat_scores = np.array(searched.scores), np.array(flat.scores)
    assert sorted(np.argsort(-np.abs(flat_scores))[:3]) == sorted(planted)
    np.testing.assert_allclose(flat_scores[planted], truth[planted], rtol=0.05)  # the fillers are not exactly 0
    # 11 rows for 12 sentences: the Lasso keeps the two that raise the score and misses the -0.5 one (which the
    # flat run's 36 find), so the refit puts part of its effect on the +1 one
    assert np.flatnonzero(scores).tolist() == [8, 27]
    np.testing.assert_allclose(scores[[8, 27]], [5.4848, 5.5429], atol=1e-4)
    assert (report["n_evaluations_groups"], report["n_evaluations_features"]) == (7, 8)
    assert (searched.metadata.n_evaluations, flat.metadata.n_evaluations) == (15, 37)
    drops = [faithfulness(explainer, result, metrics=("top_k_drop",), top_k=(3,), n_random=0).top_k_drop[3]
             for result in (flat, searched)]
    assert drops[1] >= drops[0] - 1e-9
    # the two planted sentences that raise the score, and a third whose effect is one of a filler sentence's
    assert truth[[8, 27]].sum() < drops[1] <= np.sort(truth)[::-1][:3].sum() + 1e-9
