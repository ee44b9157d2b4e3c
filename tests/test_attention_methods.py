"""The ``attention`` and ``at2`` methods and ``train_at2`` (methods/attention.py, methods/at2*.py).

Scores are checked against a direct computation from ``output_attentions`` of an eager copy of the model; AT2's fit
against a planted value function, an exact weighted sum of per-head attention scores, whose weights it must recover
(up to the positive scale the correlation objective leaves free: both sides are compared with L1 norm 1).
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from tolerances import sum_bound, to_float64, unit_roundoff
from zoo import build_zoo_model

from fair_forge.explainability import AttributionExplainer, AttributionResult, At2Weights, train_at2
from fair_forge.explainability.core.types import Granularity
from fair_forge.explainability.errors import InvalidInputError
from fair_forge.explainability.methods import get_method
from fair_forge.explainability.methods.at2 import head_scores, model_fingerprint
from fair_forge.explainability.runtime.scorer import TargetScorer
from fair_forge.explainability.text.prompt import build_model_input
from fair_forge.explainability.text.segment import build_features

SENTENCES = ["The quick brown fox jumps over the lazy dog.", "Paris is the capital of France.",
             "Light scatters in the atmosphere.", "Name a fast animal.", "Blue light scatters more.",
             "The cheetah is the fastest land animal.", "You are a helpful assistant.",
             "Answer the question in one short sentence."]
ANSWERS = ["The cheetah is fast.", "Paris.", "Light scatters."]


def documents(count: int = 6, seed: int = 0) -> list[dict]:
    """Raw prompts of five of ``SENTENCES`` each, in random orders, with short answers."""
    rng = np.random.default_rng(seed)
    return [{"prompt": " ".join(SENTENCES[j] for j in rng.permutation(len(SENTENCES))[:5]),
             "target": ANSWERS[i % len(ANSWERS)]} for i in range(count)]


@pytest.fixture(scope="module")
def llama():
    return build_zoo_model("llama")


@pytest.fixture(scope="module")
def llama64():
    """The llama in float64: the eager reference is then exact to ~1e-15, and only the methods' float32 reading
    (``runtime.attention`` computes the asked rows' softmax in float32 whatever the dtype) rounds."""
    zoo_model = build_zoo_model("llama")
    to_float64(zoo_model.model)
    return zoo_model


@pytest.fixture
def calls(llama, llama64):
    """How many forward passes the model makes during a test (either llama: a test uses one)."""
    counter = {"n": 0}
    handles = [zoo_model.model.register_forward_pre_hook(lambda *_: counter.__setitem__("n", counter["n"] + 1))
               for zoo_model in (llama, llama64)]
    yield counter
    for handle in handles:
        handle.remove()


def read_rounding(zoo_model) -> float:
    """Relative error of the float32 attention a method reads, against exact weights: each row's softmax over the
    sequence (a length-term denominator) of logits |q.k| * scaling < 1 (a random model's: ~0.03) from head_dim-term
    dots of float32-rounded queries and keys, then summed over a feature's tokens and over the heads and layers
    (nonnegative terms: relative bounds add)."""
    config = zoo_model.model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    heads = config.num_hidden_layers * config.num_attention_heads
    inputs = zoo_model.example
    length = build_model_input(zoo_model.tokenizer, target=inputs["target"], messages=inputs.get("messages"),
                               prompt=inputs.get("prompt")).length
    return (2 * (head_dim + 2) + 2 * length + 3 + heads) * unit_roundoff(torch.float32)


def direct_matrix(zoo_model, result: AttributionResult, head_weights=None) -> np.ndarray:
    """(target tokens, features) from output_attentions of an eager copy: rows predicting the target, heads and layers
    averaged (or weighted by ``head_weights``), summed over each feature's tokens."""
    eager = copy.deepcopy(zoo_model.model)  # (hooks are copied too: count calls before)
    eager.set_attn_implementation("eager")
    inputs = zoo_model.example
    model_input = build_model_input(zoo_model.tokenizer, target=inputs["target"], messages=inputs.get("messages"),
                                    prompt=inputs.get("prompt"))
    with torch.no_grad():
        attentions = eager(input_ids=model_input.input_ids[None], output_attentions=True).attentions
    weights = torch.stack([layer[0] for layer in attentions]).double()  # (L, H, n, n)
    rows = weights[:, :, model_input.target_start - 1 : model_input.length - 1]
    per_row = rows.mean(dim=(0, 1)) if head_weights is None else \
        torch.einsum("lh,lhrn->rn", torch.as_tensor(head_weights, dtype=torch.float64), rows)
    return np.stack([per_row[:, a.token_positions].sum(-1).numpy() for a in result.attributions], axis=1)


def test_attention_scores_equal_a_direct_computation_and_rows_average_to_them(llama64, calls) -> None:
    explainer = AttributionExplainer(llama64.model, llama64.tokenizer)
    result = explainer.explain(**llama64.example, method="attention", per_target=True)
    assert calls["n"] == 1 and result.metadata.n_forward_passes == 1  # one forward pass, counted
    matrix = np.asarray(result.matrix.values)
    # float64 reference; the method's float32 softmax rounds relatively (read_rounding)
    np.testing.assert_allclose(matrix, direct_matrix(llama64, result), rtol=read_rounding(llama64), atol=0)
    np.testing.assert_array_equal(matrix.mean(axis=0), result.scores)  # exact: the method's own float64 mean


def test_at2_scores_are_the_head_weighted_attention(llama64, calls) -> None:
    rng = np.random.default_rng(3)
    uniform = At2Weights.uniform(llama64.model)
    weights = At2Weights(rng.normal(size=uniform.head_weights.shape), uniform.fingerprint, "llama")
    explainer = AttributionExplainer(llama64.model, llama64.tokenizer)
    result = explainer.explain(**llama64.example, method="at2", weights=weights, per_target=True)
    assert calls["n"] == 1
    matrix = np.asarray(result.matrix.values)
    expected = direct_matrix(llama64, result, weights.head_weights)
    # mixed-sign weights: each head's relative read error (read_rounding), charged on sum_h |w_h| a_h
    scale = direct_matrix(llama64, result, np.abs(weights.head_weights))
    assert (np.abs(matrix - expected) <= read_rounding(llama64) * scale).all()
    np.testing.assert_array_equal(matrix.mean(axis=0), result.scores)  # exact: the method's own float64 mean
    # uniform head weights (1/8, a power of two) give the attention method's scores: the same float32 weights
    # averaged over the 8 heads in float32 (plain) or float64 (at2), nonnegative terms
    plain = explainer.explain(**llama64.example, method="attention")
    at_uniform = explainer.explain(**llama64.example, method="at2", weights=uniform)
    rows = len(result.matrix.values)
    np.testing.assert_allclose(at_uniform.scores, plain.scores, atol=0,
                               rtol=sum_bound(1.0, 8, torch.float32) + sum_bound(1.0, rows, torch.float64))
    # the result keeps a JSON-able reference to the weights and survives a round trip
    assert AttributionResult.model_validate_json(result.model_dump_json()).scores == result.scores


def planted_scores(head_weights: np.ndarray):
    """A value function for ``TargetScorer.score_token_masks``: 3 x w . sum_s (+-1) a_s - 7, a_s the per-head
    attention of each sentence (what AT2 reads), +1 for a kept sentence, -1 for a removed one."""
    def score_token_masks(self, model_input, keep, **_: object) -> np.ndarray:
        sources = build_features(model_input, Granularity.SENTENCE)
        per_head = head_scores(self.model, model_input, sources).mean(2).flatten(0, 1).T.double().numpy()
        kept = np.stack([keep[:, list(source.token_positions)].all(axis=1) for source in sources], axis=1)
        return 3.0 * ((2.0 * kept - 1.0) @ per_head @ head_weights) - 7.0
    return score_token_masks


def distinct_heads(zoo_model):
    """A copy whose queries and keys are 8x larger: a random model's heads then attend differently (at the random
    scale every head attends almost uniformly, so no data could tell heads apart)."""
    model = copy.deepcopy(zoo_model.model)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "q_proj" in name or "k_proj" in name:
                parameter.mul_(8)
    return model


def test_at2_recovers_planted_head_weights(llama, monkeypatch) -> None:
    model = distinct_heads(llama)
    planted = np.random.default_rng(0).normal(size=8)  # 2 layers x 4 heads, mixed signs
    monkeypatch.setattr(TargetScorer, "score_token_masks", planted_scores(planted))
    weights = train_at2(model, llama.tokenizer, documents(), seed=0)
    pooled = []
    for document in documents():
        model_input = build_model_input(llama.tokenizer, target=document["target"], prompt=document["prompt"])
        per_head = head_scores(model, model_input, build_features(model_input, Granularity.SENTENCE))
        features = per_head.mean(2).flatten(0, 1).T.double().numpy()
        pooled.append(features - features.mean(axis=0))
    singular = np.linalg.svd(np.concatenate(pooled), compute_uv=False)
    learned, expected = weights.head_weights.reshape(-1), planted / np.abs(planted).sum()
    # the bound: identifiable up to a positive factor only where the documents' attention varies; here it varies in
    # every direction (the pooled, centred features' smallest singular value is > 5% of the largest) ...
    assert singular.min() > 0.05 * singular.max()
    assert weights.info["correlation"] > 0.99999
    assert weights.info["shrinkage"] == 0.0  # exact data: the fit predicts left-out documents best as it is
    # ... so the weights come back, with L1 norm 1, to 1e-3 (measured: 2e-4 after the default 300 steps)
    np.testing.assert_allclose(learned, expected, atol=1e-3)
    assert train_at2(model, llama.tokenizer, documents(), seed=0).head_weights.tobytes() == \
        weights.head_weights.tobytes()  # deterministic


def test_shrinkage_pulls_an_overfitted_fit_towards_uniform_heads(llama, monkeypatch) -> None:
    """Scores that are uniform-head attention plus noise, from few ablations: the free fit follows the noise, and
    cross-validation over the documents mixes in uniform weights as far as that predicts left-out documents better."""
    model = distinct_heads(llama)
    signal = planted_scores(np.full(8, 1.0 / 8))
    noise = np.random.default_rng(1)

    def noisy(self, model_input, keep, **kwargs):
        values = signal(self, model_input, keep, **kwargs)
        return values + noise.normal(scale=3.0 * values.std(), size=values.shape)

    monkeypatch.setattr(TargetScorer, "score_token_masks", noisy)
    free = train_at2(model, llama.tokenizer, documents(8), n_ablations=6, shrink=False)
    noise = np.random.default_rng(1)  # the same ablation scores for the shrunk fit
    shrunk = train_at2(model, llama.tokenizer, documents(8), n_ablations=6)
    held_out, level = shrunk.info["held_out_correlation"], shrunk.info["shrinkage"]
    assert free.info["shrinkage"] == 0.0 and free.info["held_out_correlation"] is None
    assert level > 0 and held_out[f"{level:g}"] == max(held_out.values()) > held_out["0"]
    uniform = np.full(8, 1.0 / 8)
    assert np.abs(shrunk.head_weights.reshape(-1) - uniform).sum() < np.abs(free.head_weights.reshape(-1) - uniform).sum()


def test_trained_weights_are_saved_reused_and_refused_for_another_model(llama, calls, tmp_path: Path) -> None:
    path = tmp_path / "at2.safetensors"
    explainer = AttributionExplainer(llama.model, llama.tokenizer)
    trained = train_at2(explainer, None, documents(3), path=path, n_ablations=8, steps=20)
    assert path.is_file() and trained.path == str(path) and trained.info["n_used"] == 3
    used = calls["n"]
    again = train_at2(explainer, None, documents(3), path=path, n_ablations=8, steps=20)
    assert calls["n"] == used and np.array_equal(again.head_weights, trained.head_weights)  # read, not retrained
    result = explainer.explain(**llama.example, method="at2", weights=str(path))
    assert result.metadata.method_params["weights"]["path"] == str(path)

    other = build_zoo_model("llama", seed=1)
    runs = []
    handle = other.model.register_forward_pre_hook(lambda *_: runs.append(1))
    try:
        with pytest.raises(InvalidInputError, match="trained on another model"):
            AttributionExplainer(other.model, other.tokenizer).explain(**llama.example, method="at2",
                                                                         weights=str(path))
        with pytest.raises(InvalidInputError, match="trained on another model"):
            train_at2(other.model, other.tokenizer, documents(3), path=path)
    finally:
        handle.remove()
    assert not runs  # refused before the other model runs


def test_bad_input_is_refused_before_any_model_call(llama, calls, tmp_path: Path) -> None:
    explainer = AttributionExplainer(llama.model, llama.tokenizer)
    with pytest.raises(InvalidInputError, match="at2 needs weights="):
        explainer.explain(**llama.example, method="at2")
    with pytest.raises(InvalidInputError, match="no AT2 weights file"):
        explainer.explain(**llama.example, method="at2", weights=str(tmp_path / "missing.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(InvalidInputError, match="not an AT2 weights file"):
        explainer.explain(**llama.example, method="at2", weights=str(tmp_path / "junk.safetensors"))
    with pytest.raises(InvalidInputError, match="rows"):
        explainer.explain(**llama.example, method="attention", rows="last")
    for bad in ({"documents": []}, {"n_ablations": 1}, {"keep_probability": 1.0}, {"steps": 0}, {"seed": -1},
                {"rows": "all"}, {"granularity": "page"}):
        arguments = {"documents": documents(2), **bad}
        with pytest.raises(InvalidInputError):
            train_at2(explainer, None, **arguments)
    with pytest.raises(InvalidInputError, match="tokenizer"):
        train_at2(llama.model, None, documents(2))
    assert calls["n"] == 0


def test_a_changed_weights_file_is_noticed(llama, tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    At2Weights.uniform(llama.model).save(path)
    params = get_method("at2").resolve_params({"weights": str(path)})
    At2Weights(np.ones((2, 4)), model_fingerprint(llama.model)).save(path)
    explainer = AttributionExplainer(llama.model, llama.tokenizer)
    with pytest.raises(InvalidInputError, match="changed"):
        get_method("at2").run(_context(explainer, llama, params))


def _context(explainer, zoo_model, params):
    from fair_forge.explainability.methods.registry import MethodContext

    inputs = zoo_model.example
    model_input = build_model_input(zoo_model.tokenizer, target=inputs["target"], messages=inputs.get("messages"))
    return MethodContext(TargetScorer(zoo_model.model), model_input, build_features(model_input, Granularity.WORD),
                         params)


def test_fingerprints_ignore_attention_implementation_and_bfloat16_copies(llama) -> None:
    model = llama.model
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    assert model_fingerprint(eager) == model_fingerprint(model)
    assert model_fingerprint(copy.deepcopy(model).to(torch.bfloat16)) == model_fingerprint(model)
    assert model_fingerprint(build_zoo_model("llama", seed=1).model) != model_fingerprint(model)
