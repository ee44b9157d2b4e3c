"""Result objects in everyday use: finite scores or a typed error, JSON round trips, drawing reloaded and custom
results, compact repr, show(), top-k arguments."""

from __future__ import annotations

import math
import warnings

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest

from fair_forge.explainability import (
    AttributionBatchResult,
    AttributionExplainer,
    AttributionMethod,
    AttributionResult,
    InvalidInputError,
    NonFiniteScoreError,
    RawAttribution,
    register_method,
)
from fair_forge.explainability.errors import ProbabilityUnderflowWarning
from fair_forge.explainability.methods.registry import _REGISTRY
from fair_forge.explainability.core.types import AttributionMatrix, TokenAttribution, normalize_scores
from fair_forge.explainability.viz.console import format_table
from fair_forge.explainability.viz.html import render_html
from fair_forge.explainability.viz.plots import plot_attributions

MESSAGES = [
    {"role": "system", "content": "Answer  briefly."},
    {"role": "user", "content": "What is the capital of France?"},
]
TARGET = "The capital of France is Paris."


@pytest.fixture
def custom_method():
    """A user-registered method with known scores: feature i scores (i - 2) * scale, or NaN at ``nan_at``."""

    @register_method("known_scores", kind="perturbation", additive=True, defaults={"scale": 1.0, "nan_at": -1})
    def known_scores(context):
        scores = (np.arange(len(context.features)) - 2.0) * context.params["scale"]
        if context.params["nan_at"] >= 0:
            scores[context.params["nan_at"]] = math.nan
        return RawAttribution(feature_scores=scores, metadata={"ratio": math.inf})

    yield "known_scores"
    del _REGISTRY["known_scores"]


def _result(tiny_gpt2, method: str = "occlusion", **params) -> AttributionResult:
    model, tokenizer = tiny_gpt2
    return AttributionExplainer(model, tokenizer).explain(MESSAGES, TARGET, method=method, **params)


# --- NaN and inf --------------------------------------------------------------------------------------------------


def test_normalize_scores_refuses_nan_instead_of_calling_it_the_strongest() -> None:
    assert normalize_scores([1.0, -4.0, 0.0]) == [0.25, -1.0, 0.0]
    with pytest.raises(NonFiniteScoreError, match=r"feature 1 \('France'\) has score nan"):
        normalize_scores([1.0, math.nan, 2.0], labels=["capital", "France", "?"])
    with pytest.raises(NonFiniteScoreError, match="feature 0 has score inf"):
        normalize_scores([math.inf])


def test_non_finite_scores_cannot_enter_a_result() -> None:
    with pytest.raises(NonFiniteScoreError, match=r"feature 3 \('Paris'\).*stride > window"):
        TokenAttribution(text="Paris", score=math.nan, position=3, normalized_score=0.0)
    with pytest.raises(NonFiniteScoreError, match=r"matrix cell \('The', 'Paris'\) is -inf"):
        AttributionMatrix(row_labels=["The"], column_labels=["Paris"], values=[[-math.inf]])


def test_a_method_returning_nan_gets_a_typed_error_naming_the_feature(tiny_gpt2, custom_method) -> None:
    result = _result(tiny_gpt2, custom_method)
    victim = result.attributions[4].text
    with pytest.raises(NonFiniteScoreError, match=f"feature 4 .*{victim}"):
        _result(tiny_gpt2, custom_method, nan_at=4)


# --- JSON round trips and reloaded results --------------------------------------------------------------------------


def test_results_round_trip_through_json_with_inf_metadata(tiny_gpt2, custom_method) -> None:
    for result in (_result(tiny_gpt2, custom_method), _result(tiny_gpt2, "occlusion", per_target=True)):
        reloaded = AttributionResult.model_validate_json(result.model_dump_json())
        assert reloaded == result
    assert reloaded.method is AttributionMethod.OCCLUSION  # a built-in name comes back as the enum member
    custom = AttributionResult.model_validate_json(_result(tiny_gpt2, custom_method).model_dump_json())
    assert custom.method == "known_scores" and custom.metadata.ratio == math.inf
    assert [m.role for m in custom.messages] == ["system", "user"]


def test_reloaded_and_custom_results_draw_like_the_original(tiny_gpt2, custom_method, tmp_path) -> None:
    model, tokenizer = tiny_gpt2
    explainer = AttributionExplainer(model, tokenizer)
    for result in (_result(tiny_gpt2, custom_method), _result(tiny_gpt2, "occlusion")):
        reloaded = AttributionResult.model_validate_json(result.model_dump_json())
        assert render_html(reloaded) == render_html(result)
        assert reloaded._repr_html_() == result._repr_html_()
        assert explainer.visualize(reloaded, return_html=True) == render_html(result)
        assert reloaded.save_html(tmp_path / "r.html").read_text(encoding="utf-8") == render_html(result)
        assert result.method_name in render_html(result)
        drawn = [plot_attributions(r).axes[0] for r in (result, reloaded)]
        assert drawn[0].get_title() == drawn[1].get_title() == f"{result.method_name} (word)"
        widths = [[bar.get_width() for bar in ax.patches] for ax in drawn]
        assert widths[0] == widths[1] == result.scores
        labels = [[tick.get_text() for tick in ax.get_yticklabels()] for ax in drawn]
        assert labels[0] == labels[1]
        assert repr(reloaded) == repr(result) and format_table(reloaded) == format_table(result)


# --- everyday use ---------------------------------------------------------------------------------------------------


def test_repr_is_short_and_names_the_strongest_features(tiny_gpt2, custom_method) -> None:
    result = _result(tiny_gpt2, custom_method, scale=0.5)
    n = len(result.attributions)
    top = result.get_top_k(3)
    assert abs(top[0].score) == 0.5 * (n - 3)
    text = repr(result)
    assert str(result) == text and "\n" not in text and len(text) < 200
    assert text.startswith(f"AttributionResult(method=known_scores, granularity=word, features={n}, ")
    assert f"{top[0].text.strip()}={top[0].score:+.3g}" in text
    batch = AttributionBatchResult(results=[result] * 50, model_name="tiny")
    assert repr(batch) == (
        "AttributionBatchResult(results=50, failures=0, model=tiny, methods=['known_scores'], seconds=0)"
    )


def test_show_prints_the_cli_table_in_a_console(tiny_gpt2, capsys) -> None:
    result = _result(tiny_gpt2)
    result.show(top=3)
    out = capsys.readouterr().out
    assert out == format_table(result, 3) + "\n"
    ranked = out[out.index("rank") :].splitlines()[1:]
    assert [row.split()[1] for row in ranked] == [a.text.strip() for a in result.get_top_k(3)]


@pytest.mark.parametrize("k", [2.5, None, True, "3", -1])
def test_top_k_takes_only_whole_numbers(tiny_gpt2, k) -> None:
    result = _result(tiny_gpt2)
    with pytest.raises(InvalidInputError, match="k must be"):
        result.get_top_k(k)
    assert result.get_top_k(np.int64(2)) == result.get_top_k(2)
    assert len(result.get_top_k(2)) == 2


def test_probability_underflow_warns_instead_of_zero_attributions_in_silence(tiny_gpt2) -> None:
    model, tokenizer = tiny_gpt2
    long_target = " ".join(["The capital of France is Paris."] * 4)  # ~30 tokens: log p far below -87 on a random model
    prob = AttributionExplainer(model, tokenizer, score="prob")
    with pytest.warns(ProbabilityUnderflowWarning, match="score='sum'"):
        result = prob.explain(MESSAGES, long_target, method="saliency")
    assert not any(result.scores)  # what the warning is about: float32 exp(log p) is 0, and so is its gradient
    with warnings.catch_warnings():
        warnings.simplefilter("error", ProbabilityUnderflowWarning)
        assert any(prob.explain(MESSAGES, "Paris.", method="saliency").scores)
        AttributionExplainer(model, tokenizer).explain(MESSAGES, long_target, method="saliency")


def test_show_renders_the_html_in_a_notebook_kernel(tiny_gpt2, monkeypatch, capsys) -> None:
    IPython = pytest.importorskip("IPython")
    pytest.importorskip("IPython.display")

    class Kernel:
        kernel = object()  # what a Jupyter kernel's shell has and a terminal IPython's lacks

    shown = []
    monkeypatch.setattr(IPython, "get_ipython", Kernel)
    monkeypatch.setattr(IPython.display, "display", shown.append)
    result = _result(tiny_gpt2)
    result.show()
    [html_object] = shown
    assert html_object.data == render_html(result, standalone=False) and capsys.readouterr().out == ""
