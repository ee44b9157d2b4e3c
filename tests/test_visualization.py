"""HTML escaping, colours and headless matplotlib figures, on results built by hand (no model needed)."""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import re
from html.parser import HTMLParser

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
import torch
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from matplotlib.patches import PathPatch

from fair_forge.explainability.errors import InvalidInputError
from fair_forge.explainability.core.types import (
    AttributionMatrix,
    AttributionMethod,
    AttributionResult,
    Granularity,
    TokenAttribution,
    normalize_scores,
)
from fair_forge.explainability.viz.html import (
    NEGATIVE_COLOR,
    POSITIVE_COLOR,
    display_html,
    json_for_script,
    render_html,
    score_color,
)
from fair_forge.explainability.viz.plots import plot_attributions, plot_connections, plot_matrix

IMG = "<img src=x onerror=alert(1)>"
SCRIPT = "</script><script>alert(1)</script>"
COMMENT = '"><!-- & \'quoted\''


def make_result(
    texts: list[str],
    scores: list[float],
    prompt: str = "",
    target: str = "Paris",
    matrix: AttributionMatrix | None = None,
    granularity: Granularity = Granularity.WORD,
) -> AttributionResult:
    """A result with the given features; offsets located in ``prompt`` when it contains them in order."""
    attributions = []
    cursor = 0
    for position, (text, score, norm) in enumerate(zip(texts, scores, normalize_scores(scores))):
        start = prompt.find(text, cursor) if prompt else -1
        span = {"start": start, "end": start + len(text)} if start >= 0 else {}
        cursor = start + len(text) if start >= 0 else cursor
        attributions.append(
            TokenAttribution(text=text, score=score, position=position, normalized_score=norm, **span)
        )
    return AttributionResult(
        prompt=prompt or " ".join(texts),
        target=target,
        method=AttributionMethod.INTEGRATED_GRADIENTS,
        granularity=granularity,
        attributions=attributions,
        matrix=matrix,
    )


def malicious_result() -> AttributionResult:
    texts = ["capital", IMG, SCRIPT, COMMENT]
    matrix = AttributionMatrix(
        row_labels=["The", IMG, SCRIPT],
        column_labels=texts,
        values=[[0.5, -0.25, 0.0, 1.0], [-2.0, 0.1, 0.2, 0.3], [0.0, 0.0, 0.0, 0.0]],
    )
    result = make_result(texts, [0.8, -0.4, 0.2, -0.1], target=IMG + SCRIPT, matrix=matrix)
    return result.model_copy(update={"prompt": f"What is the {IMG} {SCRIPT} {COMMENT}?", "model_name": IMG})


class _Elements(HTMLParser):
    """Every start tag with its attributes, and the text inside each <script>."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.scripts: list[tuple[dict[str, str | None], str]] = []
        self._in_script: dict[str, str | None] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag == "script":
            self._in_script = dict(attrs)

    def handle_data(self, data: str) -> None:
        if self._in_script is not None:
            self.scripts.append((self._in_script, data))
            self._in_script = None


def parse(html_text: str) -> _Elements:
    parser = _Elements()
    parser.feed(html_text)
    parser.close()
    return parser


def embedded_data(html_text: str) -> dict:
    [(_, text)] = [(attrs, text) for attrs, text in parse(html_text).scripts if attrs.get("type") == "application/json"]
    return json.loads(text)


@pytest.mark.parametrize("show_scores", [False, True])
@pytest.mark.parametrize("standalone", [True, False])
def test_user_text_is_escaped_everywhere(standalone: bool, show_scores: bool) -> None:
    html_text = render_html(malicious_result(), standalone=standalone, show_scores=show_scores)
    elements = parse(html_text)
    tag_names = {tag for tag, _ in elements.tags}
    assert "img" not in tag_names
    assert tag_names <= {"html", "head", "meta", "title", "body", "div", "style", "table", "tr", "th", "td", "span",
                         "label", "select", "option", "script", "ruby", "rt"}
    assert [attrs for tag, attrs in elements.tags if tag == "script"] == [
        {"type": "application/json", "class": "ff-data"},
        {},
    ]
    assert not any(name.startswith("on") for _, attrs in elements.tags for name in attrs)
    for payload in (IMG, SCRIPT, "alert(1)</", "<!--"):
        assert payload not in html_text
    assert html_text.count("<script") == 2 and html_text.count("</script>") == 2
    assert "&lt;img src=x onerror=alert(1)&gt;" in html_text
    assert "&lt;/script&gt;&lt;script&gt;alert(1)&lt;/script&gt;" in html_text


def test_json_for_script_escapes_markup_and_round_trips() -> None:
    data = {"label": SCRIPT + "&amp;" + COMMENT, "values": [1.5, -2.0]}
    text = json_for_script(data)
    assert not set(text) & {"<", ">", "&"}
    assert "\\u003c/script\\u003e" in text
    assert json.loads(text) == data


def test_row_picker_data_equals_the_matrix() -> None:
    result = malicious_result()
    html_text = render_html(result)
    data = embedded_data(html_text)
    assert data["values"] == result.matrix.values
    assert data["rows"] == result.matrix.row_labels
    assert data["columns"] == result.matrix.column_labels
    assert data["colors"][1][0] == score_color(-1.0)  # -2.0 is the matrix's largest |score|
    assert data["colors"][0][3] == score_color(0.5)
    options = [attrs["value"] for tag, attrs in parse(html_text).tags if tag == "option"]
    assert options == ["0", "1", "2"]
    cells = [attrs for tag, attrs in parse(html_text).tags if tag == "span" and attrs.get("class") == "ff-cell"]
    assert [c["title"] for c in cells] == data["titles"][0]


def test_no_matrix_means_no_script() -> None:
    html_text = render_html(make_result(["a", "b"], [1.0, -1.0]))
    assert not parse(html_text).scripts
    assert "<select" not in html_text


def test_standalone_csp_allows_exactly_the_picker_script() -> None:
    html_text = render_html(malicious_result())
    elements = parse(html_text)
    [csp] = [attrs["content"] for tag, attrs in elements.tags if attrs.get("http-equiv") == "Content-Security-Policy"]
    [(_, code)] = [(attrs, text) for attrs, text in elements.scripts if not attrs]
    digest = base64.b64encode(hashlib.sha256(code.encode("utf-8")).digest()).decode("ascii")
    assert f"script-src 'sha256-{digest}'" in csp
    assert "default-src 'none'" in csp
    assert html_text.startswith("<!DOCTYPE html>")
    fragment = render_html(malicious_result(), standalone=False)
    assert fragment.startswith('<div class="ff-attr">') and "<html" not in fragment


def test_score_color_keeps_the_sign() -> None:
    def rgb(color: str) -> tuple[int, int, int]:
        return int(color[1:3], 16), int(color[3:5], 16), int(color[5:7], 16)

    assert score_color(0.0) == "#ffffff"
    assert score_color(1.0) == POSITIVE_COLOR and score_color(-1.0) == NEGATIVE_COLOR
    for value in (0.2, 0.6, 1.0):
        red, _, blue = rgb(score_color(value))
        assert red > blue
        red, _, blue = rgb(score_color(-value))
        assert blue > red
    assert sum(rgb(score_color(0.3))) > sum(rgb(score_color(0.9)))  # stronger is more saturated
    assert score_color(float("nan")) == "#ffffff"


def test_spans_carry_colour_and_score_and_keep_the_prompt_text() -> None:
    prompt = "What is the capital of France?"
    result = make_result(["capital", "France"], [2.0, -0.5], prompt=prompt)
    html_text = render_html(result, standalone=False)
    spans = [attrs for tag, attrs in parse(html_text).tags if tag == "span" and attrs.get("class") == "ff-tok"]
    assert len(spans) == 2
    assert score_color(1.0) in spans[0]["style"] and score_color(-0.25) in spans[1]["style"]
    assert spans[0]["title"] == "score +2 (normalized +1.00)"
    assert "What is the <span" in html_text and "</span> of <span" in html_text


def test_repr_html_and_display_outside_ipython() -> None:
    result = malicious_result()
    assert result._repr_html_() == render_html(result, standalone=False)
    assert display_html(result) == render_html(result, standalone=False)  # no IPython session here


def test_save_html_writes_the_standalone_page(tmp_path) -> None:
    result = malicious_result()
    path = result.save_html(tmp_path / "result.html")
    assert path.read_text(encoding="utf-8") == render_html(result)


def png_bytes(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    data = buffer.getvalue()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000
    return data


def test_plot_attributions_bars_in_reading_order_with_signed_colours() -> None:
    result = make_result(["$x$", "capital", "\n", "France"], [0.5, -1.0, 0.0, 2.0])
    figure = plot_attributions(result)
    [ax] = figure.axes
    bars = ax.patches
    assert [bar.get_width() for bar in bars] == [0.5, -1.0, 0.0, 2.0]
    assert bars[0].get_facecolor() == to_rgba(POSITIVE_COLOR)
    assert bars[1].get_facecolor() == to_rgba(NEGATIVE_COLOR)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["$x$", "capital", "\u21b5", "France"]
    png_bytes(figure)


def test_plot_attributions_top_k_strongest_first_on_a_given_axes() -> None:
    result = make_result(["a", "b", "c", "d"], [0.5, -1.0, 0.1, 2.0])
    figure = Figure()
    ax = figure.add_subplot()
    assert plot_attributions(result, ax=ax, top_k=2) is figure
    assert [bar.get_width() for bar in ax.patches] == [2.0, -1.0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["d", "b"]
    png_bytes(figure)


def test_plot_matrix_heatmap_centred_with_labelled_axes() -> None:
    result = malicious_result()
    figure = plot_matrix(result)
    ax = figure.axes[0]
    [image] = ax.images
    np.testing.assert_array_equal(image.get_array(), np.asarray(result.matrix.values))
    assert image.get_clim() == (-2.0, 2.0)
    assert ax.get_xlabel() == "input feature" and ax.get_ylabel() == "target token"
    assert [t.get_text() for t in ax.get_yticklabels()] == ["The", IMG, SCRIPT]
    assert len(ax.get_xticklabels()) == 4
    assert len(figure.axes) == 2  # heatmap and colour bar
    png_bytes(figure)


def test_plot_matrix_without_matrix_is_a_typed_error() -> None:
    with pytest.raises(InvalidInputError, match="matrix"):
        plot_matrix(make_result(["a"], [1.0]))


def connection_result() -> AttributionResult:
    matrix = AttributionMatrix(
        row_labels=["[CLS]", "cats", "purr"],
        column_labels=["kittens", "meow", "loudly", "[SEP]"],
        values=[[0.0, 0.0, 0.0, 0.0], [0.9, 0.2, -0.1, 0.0], [0.3, -1.5, 0.05, 0.0]],
        row_axis="query",
        column_axis="candidate",
    )
    attributions = [
        TokenAttribution(text=label, score=sum(row), position=i, normalized_score=n)
        for i, (label, row, n) in enumerate(
            zip(matrix.row_labels, matrix.values, normalize_scores([sum(r) for r in matrix.values]))
        )
    ]
    return AttributionResult(
        prompt="cats purr",
        target="kittens meow loudly",
        method=AttributionMethod.INTEGRATED_JACOBIANS,
        granularity=Granularity.TOKEN,
        attributions=attributions,
        matrix=matrix,
    )


def curves(figure: Figure) -> list[PathPatch]:
    return [p for p in figure.axes[0].patches if isinstance(p, PathPatch)]


def test_plot_connections_draws_every_nonzero_pair_with_signed_colours() -> None:
    figure = plot_connections(connection_result())
    drawn = curves(figure)
    assert len(drawn) == 6  # the non-zero entries
    alphas = [c.get_alpha() for c in drawn]
    assert alphas == sorted(alphas) and alphas[-1] == 1.0  # |score| / max|score|: one float64 division each
    assert drawn[-1].get_edgecolor()[:3] == to_rgba(NEGATIVE_COLOR)[:3]  # -1.5, the strongest, on top
    assert drawn[-2].get_edgecolor()[:3] == to_rgba(POSITIVE_COLOR)[:3]  # 0.9
    assert drawn[-2].get_alpha() == 0.9 / 1.5
    labels = {t.get_text() for t in figure.axes[0].texts}
    assert {"[CLS]", "cats", "purr", "kittens", "meow", "loudly", "[SEP]", "query", "candidate"} <= labels
    png_bytes(figure)


def test_plot_connections_top_k_draws_k_curves_strongest_last() -> None:
    figure = plot_connections(connection_result(), top_k=3)
    drawn = curves(figure)
    assert len(drawn) == 3
    assert [c.get_alpha() for c in drawn] == [0.3 / 1.5, 0.9 / 1.5, 1.0]
    assert len(curves(plot_connections(connection_result(), top_k=0))) == 0
    assert len(curves(plot_connections(connection_result(), top_k=100))) == 6


def test_plot_connections_from_a_tensor_on_a_given_axes_retrivex_style() -> None:
    scores = torch.tensor([[0.5, -0.5], [0.0, 2.0]], dtype=torch.bfloat16)
    figure = Figure()
    ax = figure.add_subplot()
    details = {"similarity": 0.8123456, "reference_terms": 3}
    returned = plot_connections(scores, ["a", "b"], ["c", "d"], details, ax=ax, top_k=2, title="pair")
    assert returned is figure
    assert [c.get_alpha() for c in curves(figure)] == [0.25, 1.0]  # 0.5 and 2 are exact in bfloat16
    texts = {t.get_text() for t in ax.texts}
    assert {"a", "b", "c", "d", "similarity=0.8123, reference_terms=3"} <= texts
    assert ax.get_title() == "pair"
    png_bytes(figure)


def test_plot_connections_rejects_mismatched_tokens_and_shapes() -> None:
    with pytest.raises(InvalidInputError, match="do not match"):
        plot_connections(np.ones((2, 3)), ["a", "b"], ["c"])
    with pytest.raises(InvalidInputError, match="2-D"):
        plot_connections(np.ones(3))
    with pytest.raises(InvalidInputError, match="matrix"):
        plot_connections(make_result(["a"], [1.0]))


def test_display_html_shows_the_fragment_in_an_ipython_session(monkeypatch: pytest.MonkeyPatch) -> None:
    IPython = pytest.importorskip("IPython")
    pytest.importorskip("IPython.display")  # the submodule, loaded so it can be patched

    shown = []
    monkeypatch.setattr(IPython, "get_ipython", lambda: object())  # a terminal IPython: no kernel, no HTML display
    monkeypatch.setattr(IPython.display, "display", shown.append)
    result = malicious_result()
    assert display_html(result) == render_html(result, standalone=False) and not shown
    monkeypatch.setattr(IPython, "get_ipython", lambda: type("Shell", (), {"kernel": object()})())
    assert display_html(result) is None
    [html_object] = shown
    assert html_object.data == render_html(result, standalone=False)


def test_features_of_several_messages_are_not_placed_in_the_prompt() -> None:
    one = make_result(["capital", "France"], [1.0, -1.0], prompt="the capital of France")
    single = one.model_copy(
        update={"attributions": [a.model_copy(update={"message_index": 0}) for a in one.attributions]}
    )
    assert "the <span" in render_html(single, standalone=False)
    mixed = one.model_copy(
        update={"attributions": [a.model_copy(update={"message_index": i}) for i, a in enumerate(one.attributions)]}
    )
    text = render_html(mixed, standalone=False)
    assert '<div class="ff-text"><span' in text and "the <span" not in text


# --- layout: messages in labelled blocks with their own spacing, words not WordPieces, printed scores ------------


def _visible(fragment: str, css_class: str = "ff-text") -> list[str]:
    """The text of every ``css_class`` block, tags removed (what a reader sees, without the scores under words)."""
    import re

    blocks = re.findall(rf'<div class="{css_class}">(.*?)</div>', fragment, re.S)
    return [html.unescape(re.sub(r"<rt>.*?</rt>|<[^>]+>", "", block)) for block in blocks]


def chat_result(**update) -> AttributionResult:
    messages = [
        {"role": "system", "content": "Answer  briefly,\nplease."},
        {"role": "user", "content": "Capital of France?"},
    ]
    # (message, start, end) of: Answer, briefly, ",", please, "." | Capital, of, France, ?
    spans = [(0, 0, 6), (0, 8, 15), (0, 15, 16), (0, 17, 23), (0, 23, 24),
             (1, 0, 7), (1, 8, 10), (1, 11, 17), (1, 17, 18)]
    scores = [0.1, -0.2, 0.0, 0.3, 0.0, 0.5, 0.05, 1.0, -0.4]
    attributions = [
        TokenAttribution(text=messages[m]["content"][s:e], score=score, position=i, normalized_score=norm,
                         start=s, end=e, message_index=m)
        for i, ((m, s, e), score, norm) in enumerate(zip(spans, scores, normalize_scores(scores)))
    ]
    return AttributionResult(prompt="\n".join(m["content"] for m in messages), target="Paris.", method="occlusion",
                             granularity="word", attributions=attributions, messages=messages).model_copy(update=update)


def test_each_message_is_a_labelled_block_with_its_own_spacing() -> None:
    fragment = render_html(chat_result(), standalone=False)
    assert re.findall(r'<div class="ff-role">(\w+)</div>', fragment) == ["system", "user"]
    assert _visible(fragment) == ["Answer  briefly,\nplease.", "Capital of France?"]
    assert ">France</span><span" in fragment  # no space inserted before '?'


def test_without_messages_features_of_several_messages_are_joined_by_their_gaps() -> None:
    fragment = render_html(chat_result(messages=None), standalone=False)
    assert "<div class=\"ff-role\">" not in fragment
    assert _visible(fragment) == ["Answer briefly, please. Capital of France?"]


def test_siamese_view_shows_words_of_both_texts_not_glued_wordpieces() -> None:
    query, candidate = "where is the eiffel tower?", "The Eiffel Tower."
    labels = ["[CLS]", "where", "is", "the", "e", "##iff", "##el", "tower", "?", "[SEP]"]
    spans = [None, (0, 5), (6, 8), (9, 12), (13, 14), (14, 17), (17, 19), (20, 25), (25, 26), None]
    columns = ["[CLS]", "the", "e", "##iff", "##el", "tower", ".", "[SEP]"]
    scores = [0.0, 0.2, 0.1, 0.0, 0.3, 0.4, 0.1, 0.5, 0.05, 0.0]
    attributions = [
        TokenAttribution(text=label, score=score, position=i, normalized_score=norm,
                         **({"start": span[0], "end": span[1]} if span else {}))
        for i, (label, span, score, norm) in enumerate(zip(labels, spans, scores, normalize_scores(scores)))
    ]
    matrix = AttributionMatrix(row_labels=labels, column_labels=columns, values=[[0.1] * len(columns)] * len(labels),
                               row_axis="query token", column_axis="candidate token")
    result = AttributionResult(prompt=query, target=candidate, method=AttributionMethod.INTEGRATED_JACOBIANS,
                               granularity="token", attributions=attributions, matrix=matrix)
    fragment = render_html(result, standalone=False)
    assert _visible(fragment) == ["[CLS]where is the eiffel tower?[SEP]", "[CLS]The Eiffel Tower.[SEP]"]
    unlocated = result.model_copy(update={"target": "something else"})  # labels not in the text: joined as words
    assert _visible(render_html(unlocated, standalone=False))[1] == "[CLS] the eiffel tower . [SEP]"


def test_show_scores_prints_every_score_under_its_word(tmp_path) -> None:
    result = chat_result()
    fragment = render_html(result, standalone=False, show_scores=True)
    assert re.findall(r"<rt>(.*?)</rt>", fragment) == [f"{a.score:+.2g}" for a in result.attributions]
    assert _visible(fragment) == _visible(render_html(result, standalone=False))
    assert "<rt>" not in render_html(result, standalone=False)
    saved = result.save_html(tmp_path / "scores.html", show_scores=True).read_text(encoding="utf-8")
    assert saved == render_html(result, show_scores=True)
