"""See an attribution: escaped, self-contained HTML and headless matplotlib figures.

Colours follow one convention everywhere: red for positive scores (towards the target / more similar), blue for
negative ones, white for zero, and intensity by ``|normalized_score|``. Every piece of user text (prompt, target,
feature and matrix labels) is HTML-escaped, and data for the optional matrix row picker is embedded as JSON with
``<``, ``>`` and ``&`` escaped, so text such as ``</script><script>...`` is shown, never run. Figures are built on
``matplotlib.figure.Figure`` without pyplot: no global state and no display needed.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np

from ..errors import InvalidInputError
from ..core.types import AttributionResult, in_notebook

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

POSITIVE_RGB = (215, 48, 39)
NEGATIVE_RGB = (69, 117, 180)
POSITIVE_COLOR = "#d73027"
NEGATIVE_COLOR = "#4575b4"
DIVERGING_CMAP = "RdBu_r"

_CSS = """
.ff-attr{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;font-size:14px;line-height:1.9;color:#222;
max-width:60em}
.ff-attr table.ff-header{border-collapse:collapse;margin-bottom:.6em}
.ff-attr table.ff-header th{text-align:left;padding:0 1em 0 0;vertical-align:top;color:#555;font-weight:600}
.ff-attr table.ff-header td{white-space:pre-wrap;word-break:break-word}
.ff-attr .ff-text{white-space:pre-wrap;word-break:break-word;border:1px solid #ddd;padding:.5em;
border-radius:4px}
.ff-attr .ff-block{margin-bottom:.4em}
.ff-attr .ff-role{font-size:12px;font-weight:600;color:#555;text-transform:uppercase;letter-spacing:.04em}
.ff-attr ruby{ruby-position:under}
.ff-attr rt{font-size:10px;color:#555}
.ff-attr .ff-tok,.ff-attr .ff-cell{border-radius:3px;padding:1px 0}
.ff-attr .ff-special{margin:0 .3em}
.ff-attr .ff-legend{display:flex;align-items:center;gap:.5em;font-size:12px;color:#555;margin:.5em 0}
.ff-attr .ff-bar{width:12em;height:.9em;border:1px solid #ccc;
background:linear-gradient(to right,#4575b4,#ffffff,#d73027)}
.ff-attr .ff-matrix{margin-top:1em}
.ff-attr select{max-width:30em}
.ff-attr .ff-meta{font-size:12px;color:#777;margin-top:.5em}
"""

_LEGEND = (
    '<div class="ff-legend"><span>&minus;1 negative</span><span class="ff-bar"></span>'
    "<span>+1 positive</span><span>(score / max |score|; hover a word for its score)</span></div>"
)

# Applies the chosen row's precomputed colours and titles; never writes HTML, only style and title attributes.
# The picker is rendered disabled (showing the first row) and enabled here, so it is inert where scripts don't run.
_PICKER_JS = """(function () {
  var root = document.currentScript && document.currentScript.parentNode;
  if (!root) { return; }
  var data = JSON.parse(root.querySelector('script.ff-data').textContent);
  var picker = root.querySelector('select.ff-row-picker');
  var cells = root.querySelectorAll('.ff-cell');
  function show() {
    var row = Number(picker.value);
    for (var j = 0; j < cells.length; j++) {
      cells[j].style.backgroundColor = data.colors[row][j];
      cells[j].style.color = data.text_colors[row][j];
      cells[j].title = data.titles[row][j];
    }
  }
  picker.addEventListener('change', show);
  picker.disabled = false;
  show();
})();"""

_PICKER_JS_HASH = base64.b64encode(hashlib.sha256(_PICKER_JS.encode("utf-8")).digest()).decode("ascii")
# Standalone files may run only the picker script above and load nothing from the network.
CONTENT_SECURITY_POLICY = f"default-src 'none'; style-src 'unsafe-inline'; script-src 'sha256-{_PICKER_JS_HASH}'"


def _esc(text: str) -> str:
    return html.escape(text, quote=True)


def json_for_script(data: Any) -> str:
    """JSON safe to embed in a ``<script>`` element: ``<``, ``>`` and ``&`` become ``\\u003c``-style escapes."""
    text = json.dumps(data, ensure_ascii=False, allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def score_color(normalized: float) -> str:
    """Background colour of a normalized score in [-1, 1]: white at 0, towards red (+) or blue (-)."""
    if not math.isfinite(normalized):
        return "#ffffff"
    strength = min(1.0, abs(normalized))
    end = POSITIVE_RGB if normalized > 0 else NEGATIVE_RGB
    r, g, b = (round(255 + (channel - 255) * strength) for channel in end)
    return f"#{r:02x}{g:02x}{b:02x}"


def _text_color(normalized: float) -> str:
    return "#ffffff" if math.isfinite(normalized) and abs(normalized) >= 0.6 else "#222222"


def _title(score: float, normalized: float) -> str:
    return f"score {score:+.4g} (normalized {normalized:+.2f})"


def _span(css_class: str, text: str, score: float, normalized: float, show_score: bool = False) -> str:
    style = f"background-color:{score_color(normalized)};color:{_text_color(normalized)}"
    title = _esc(_title(score, normalized))
    chip = f'<span class="{css_class}" style="{style}" title="{title}">{_esc(text)}</span>'
    return f"<ruby>{chip}<rt>{score:+.2g}</rt></ruby>" if show_score else chip


@dataclass(frozen=True)
class _Item:
    """One coloured piece: its label, where it lies in its source text (None: not in it, e.g. [CLS]), its score."""

    label: str
    start: Optional[int]
    end: Optional[int]
    message_index: Optional[int]
    score: float
    normalized: float


_SPECIAL_LABEL = re.compile(r"\[[A-Z]+\]|<[^<>\s]+>")


def _chip_class(css_class: str, item: _Item) -> str:
    """Special tokens ([CLS], <s>) are set a little apart: they are no text of the input."""
    return f"{css_class} ff-special" if _SPECIAL_LABEL.fullmatch(item.label) else css_class


def _place(text: str, items: Sequence[_Item], css_class: str, show_scores: bool) -> Optional[str]:
    """``text`` with every located item coloured in place (the text between items kept as it is) and unlocated
    items (special tokens) as chips where they occur; None when the spans do not fit ``text`` in order."""
    pieces: list[str] = []
    cursor = 0
    for item in items:
        if item.start is None or item.end is None:
            pieces.append(_span(_chip_class(css_class, item), item.label, item.score, item.normalized, show_scores))
            continue
        if not cursor <= item.start <= item.end <= len(text):
            return None
        pieces.append(_esc(text[cursor : item.start]))
        pieces.append(_span(css_class, text[item.start : item.end], item.score, item.normalized, show_scores))
        cursor = item.end
    pieces.append(_esc(text[cursor:]))
    return "".join(pieces)


def _joined(items: Sequence[_Item], css_class: str, token_level: bool, show_scores: bool) -> str:
    """Items that cannot be placed in a text, in order: a WordPiece '##' continuation glued to the previous item;
    otherwise a space where the source had a gap (or a message changed), none where the pieces touched."""
    pieces: list[str] = []
    previous: Optional[_Item] = None
    for item in items:
        label = item.label
        if label.startswith("##") and len(label) > 2:
            label, gap = label[2:], ""
        elif previous is None:
            gap = ""
        elif item.start is not None and previous.end is not None and item.message_index == previous.message_index:
            gap = "" if item.start == previous.end else " "
        else:
            gap = "" if token_level and item.start is None and previous.start is None else " "
        pieces.append(gap + _span(_chip_class(css_class, item), label, item.score, item.normalized, show_scores))
        previous = item
    return "".join(pieces)


def _blocks(result: AttributionResult, items: Sequence[_Item], text: str, css_class: str, show_scores: bool) -> str:
    """The items in their texts: one labelled block per chat message (its content with original spacing), else one
    block of ``text``; items from no message (template tokens) in blocks of their own."""
    if result.messages:
        groups: list[tuple[Optional[int], list[_Item]]] = []
        for item in items:
            if groups and groups[-1][0] == item.message_index:
                groups[-1][1].append(item)
            else:
                groups.append((item.message_index, [item]))
        blocks = []
        for index, members in groups:
            inside = index is not None and 0 <= index < len(result.messages)
            content = _place(result.messages[index].content, members, css_class, show_scores) if inside else None
            role = result.messages[index].role if inside else "template"
            if content is None:
                content = _joined(members, css_class, True, show_scores)
            blocks.append(f'<div class="ff-block"><div class="ff-role">{_esc(role)}</div>'
                          f'<div class="ff-text">{content}</div></div>')
        return "".join(blocks)
    token_level = result.granularity.value == "token"
    single_text = len({item.message_index for item in items}) <= 1
    content = _place(text, items, css_class, show_scores) if single_text else None
    if content is None:
        content = _joined(items, css_class, token_level, show_scores)
    return f'<div class="ff-text">{content}</div>'


def _attribution_items(result: AttributionResult) -> list[_Item]:
    return [_Item(a.text, a.start, a.end, a.message_index, a.score, a.normalized_score) for a in result.attributions]


def _attributed_text(result: AttributionResult, show_scores: bool = False) -> str:
    """The features coloured in the text they came from."""
    return _blocks(result, _attribution_items(result), result.prompt, "ff-tok", show_scores)


def _located_labels(text: str, labels: Sequence[str]) -> Optional[list[tuple[Optional[int], Optional[int]]]]:
    """Spans of token labels (e.g. a siamese candidate's WordPieces) found in order in ``text``, case-insensitively
    and skipping only whitespace; special tokens such as ``[CLS]`` get no span. None when a label is not found."""
    lowered = text.lower()
    if len(lowered) != len(text):
        return None
    spans: list[tuple[Optional[int], Optional[int]]] = []
    cursor = 0
    for label in labels:
        if _SPECIAL_LABEL.fullmatch(label):
            spans.append((None, None))
            continue
        piece = (label[2:] if label.startswith("##") else label).replace("\u0120", " ").replace("\u2581", " ")
        piece = piece.strip().lower()
        found = lowered.find(piece, cursor) if piece else -1
        if found < 0 or lowered[cursor:found].strip():
            return None
        spans.append((found, found + len(piece)))
        cursor = found + len(piece)
    return spans


def _column_items(result: AttributionResult, values: Sequence[float], normalized: Sequence[float]) -> str:
    """One matrix row coloured in its text: laid out as the features when the columns are the features (per-target
    LM matrices), else with the column labels located in the target text (siamese candidate tokens)."""
    matrix = result.matrix
    if matrix is None:
        return ""
    if matrix.column_labels == result.tokens:
        items = [_Item(a.text, a.start, a.end, a.message_index, v, n)
                 for a, v, n in zip(result.attributions, values, normalized)]
        return _blocks(result, items, result.prompt, "ff-cell", False)
    spans = _located_labels(result.target, matrix.column_labels)
    items = [_Item(label, start, end, None, v, n)
             for label, (start, end), v, n in zip(matrix.column_labels, spans or [(None, None)] * len(values), values,
                                                   normalized)]
    if spans is None:  # token labels that are not the target's text: shown as words
        return f'<div class="ff-text">{_joined(items, "ff-cell", False, False)}</div>'
    return _blocks(result.model_copy(update={"messages": None}), items, result.target, "ff-cell", False)


def _matrix_section(result: AttributionResult) -> str:
    """Row picker over the matrix: choose a row label, see that row's scores over the column labels."""
    matrix = result.matrix
    if matrix is None:
        return ""
    peak = _peak(matrix.to_numpy())
    normalized = [[v / peak if peak > 0 else 0.0 for v in row] for row in matrix.values]
    data = {
        "rows": matrix.row_labels,
        "columns": matrix.column_labels,
        "values": matrix.values,
        "colors": [[score_color(n) for n in row] for row in normalized],
        "text_colors": [[_text_color(n) for n in row] for row in normalized],
        "titles": [[_title(v, n) for v, n in zip(vr, nr)] for vr, nr in zip(matrix.values, normalized)],
    }
    options = "".join(
        f'<option value="{i}"{" selected" if i == 0 else ""}>{i}: {_esc(label)}</option>'
        for i, label in enumerate(matrix.row_labels)
    )
    zeros = [0.0] * len(matrix.column_labels)
    cells = _column_items(result, *((matrix.values[0], normalized[0]) if matrix.values else (zeros, zeros)))
    return (
        '<div class="ff-matrix">'
        f'<label>{_esc(matrix.row_axis)}: <select class="ff-row-picker" disabled>{options}</select></label> '
        f"<span>&rarr; scores over each {_esc(matrix.column_axis)} (scaled by the matrix's max |score|)</span>"
        f'<div class="ff-row">{cells}</div>'
        f'<script type="application/json" class="ff-data">{json_for_script(data)}</script>'
        f"<script>{_PICKER_JS}</script>"
        "</div>"
    )


def render_html(result: AttributionResult, *, standalone: bool = True, show_scores: bool = False) -> str:
    """The attribution as coloured text with a header and legend; a full page unless ``standalone=False``.

    Chat messages are shown one block each, labelled with their role, with their own spacing. ``show_scores``
    prints every feature's score under it, so a static export (print, PDF, screenshot) is readable without hovering.

    The page is self-contained (inline CSS, one small inline script for the matrix row picker, a
    Content-Security-Policy that allows nothing else) and every piece of user text is escaped.
    """
    header_rows = [
        ("method", result.method_name),
        ("granularity", result.granularity.value),
        ("model", result.model_name),
        *([] if result.messages else [("prompt", result.prompt)]),  # chat messages are shown in their blocks
        ("target", result.target),
    ]
    header = "".join(f"<tr><th>{_esc(name)}</th><td>{_esc(value)}</td></tr>" for name, value in header_rows)
    meta = result.metadata
    body = (
        '<div class="ff-attr">'
        f"<style>{_CSS}</style>"
        f'<table class="ff-header">{header}</table>'
        f"{_LEGEND}"
        f"{_attributed_text(result, show_scores)}"
        f"{_matrix_section(result)}"
        f'<div class="ff-meta">{meta.compute_time_seconds:.3g} s, {meta.n_forward_passes} forward and '
        f"{meta.n_backward_passes} backward passes</div>"
        "</div>"
    )
    if not standalone:
        return body
    title = _esc(f"{result.method_name} attribution: {result.target}")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f'<meta http-equiv="Content-Security-Policy" content="{CONTENT_SECURITY_POLICY}">'
        f"<title>{title}</title></head><body>{body}</body></html>\n"
    )


def display_html(result: AttributionResult) -> Optional[str]:
    """Show the HTML in a Jupyter kernel and return None; elsewhere (a console, a terminal IPython), return it."""
    fragment = render_html(result, standalone=False)
    if not in_notebook():
        return fragment
    from IPython.display import HTML, display

    display(HTML(fragment))
    return None


def _label(text: str, max_chars: int = 40) -> str:
    """A feature as a readable axis label: newlines and tabs shown, outer spaces dropped, long text cut."""
    shown = text.replace("\n", "\u21b5").replace("\t", "\u21e5").strip() or "\u2423"
    return shown if len(shown) <= max_chars else shown[: max_chars - 1] + "\u2026"


def _sign_color(score: float) -> str:
    return POSITIVE_COLOR if score > 0 else NEGATIVE_COLOR if score < 0 else "#999999"


def _figure_and_axes(ax: Optional["Axes"], figsize: tuple[float, float]) -> tuple["Figure", "Axes"]:
    """Draw on ``ax`` when given, else on a new pyplot-free Figure (headless, no global state)."""
    if ax is not None:
        return ax.figure, ax
    from matplotlib.figure import Figure

    figure = Figure(figsize=figsize, layout="constrained")
    return figure, figure.add_subplot()


def _peak(values: np.ndarray) -> float:
    finite = np.abs(values[np.isfinite(values)])
    return float(finite.max()) if finite.size else 0.0


def plot_attributions(result: AttributionResult, ax: Optional["Axes"] = None, top_k: Optional[int] = None) -> "Figure":
    """Horizontal bars of the feature scores, red positive and blue negative.

    Features run top to bottom in reading order; with ``top_k`` only the ``top_k`` strongest by |score| are shown,
    strongest on top. Returns the Figure (the one holding ``ax`` when given).
    """
    chosen = list(result.attributions) if top_k is None else result.get_top_k(top_k)
    figure, ax = _figure_and_axes(ax, (6.4, max(2.0, 0.3 * len(chosen) + 1.2)))
    scores = [a.score for a in chosen]
    positions = np.arange(len(chosen))
    ax.barh(positions, scores, color=[_sign_color(s) for s in scores])
    ax.set_yticks(positions, [_label(a.text) for a in chosen], parse_math=False)
    ax.invert_yaxis()
    ax.axvline(0.0, color="#444444", linewidth=0.8)
    ax.set_xlabel("attribution score")
    ax.set_title(f"{result.method_name} ({result.granularity.value})", parse_math=False)
    return figure


def plot_matrix(result: AttributionResult, ax: Optional["Axes"] = None) -> "Figure":
    """Heatmap of ``result.matrix`` (rows x columns, labelled), diverging colours centred at 0. Returns the Figure."""
    matrix = result.matrix
    if matrix is None or 0 in matrix.shape:
        raise InvalidInputError(
            f"plot_matrix needs a result with a non-empty matrix; this {result.method_name} result has none "
            "(ask the explainer for per-target-token scores, or use plot_attributions)"
        )
    rows, columns = matrix.shape
    values = matrix.to_numpy()
    column_text = [_label(c) for c in matrix.column_labels]
    row_text = [_label(r) for r in matrix.row_labels]
    width = 0.35 * columns + 0.09 * max(map(len, row_text)) + 2.5
    height = 0.35 * rows + 0.09 * max(map(len, column_text)) + 1.8
    figure, ax = _figure_and_axes(ax, (max(4.0, width), max(3.0, height)))
    peak = _peak(values) or 1.0
    image = ax.imshow(values, cmap=DIVERGING_CMAP, vmin=-peak, vmax=peak, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(columns), column_text, rotation=90, parse_math=False)
    ax.set_yticks(range(rows), row_text, parse_math=False)
    ax.set_xlabel(matrix.column_axis)
    ax.set_ylabel(matrix.row_axis)
    ax.set_title(f"{result.method_name} ({result.granularity.value})", parse_math=False)
    figure.colorbar(image, ax=ax, label="score")
    return figure


def _as_matrix(scores: Any) -> np.ndarray:
    """A 2-D float array from a numpy array, nested list or (any device, any dtype) torch tensor."""
    if hasattr(scores, "detach"):
        scores = scores.detach().cpu().double().numpy()
    array = np.asarray(scores, dtype=float)
    if array.ndim != 2:
        raise InvalidInputError(f"plot_connections needs a 2-D score matrix, got shape {array.shape}")
    return array


def _column_positions(count: int) -> np.ndarray:
    return np.linspace(1.0, 0.0, count) if count > 1 else np.full(count, 0.5)


def plot_connections(
    result_or_scores: AttributionResult | Any,
    query_tokens: Optional[Sequence[str]] = None,
    candidate_tokens: Optional[Sequence[str]] = None,
    details: Optional[dict[str, Any]] = None,
    *,
    ax: Optional["Axes"] = None,
    top_k: Optional[int] = None,
    title: Optional[str] = None,
    max_linewidth: float = 3.0,
    fontsize: float = 10.0,
) -> "Figure":
    """Query tokens (left) joined to candidate tokens (right) by one curve per token pair.

    Takes an ``AttributionResult`` with a matrix (rows = query tokens, columns = candidate tokens) or a 2-D
    array/tensor with token lists. The argument order matches retrivex, so ``plot_connections(*explainer.explain(q,
    c))`` works; ``details`` (its similarity terms) is printed under the plot. Curves are red for positive and blue
    for negative scores, with opacity and width by |score| / max|score|; zero scores are not drawn; with ``top_k``
    only the ``top_k`` strongest pairs are. The strongest curve is drawn last (on top). Returns the Figure.
    """
    left_title, right_title = "query", "candidate"
    if isinstance(result_or_scores, AttributionResult):
        if result_or_scores.matrix is None:
            raise InvalidInputError("plot_connections needs a result with a matrix (query x candidate tokens)")
        matrix = result_or_scores.matrix
        scores = matrix.to_numpy()
        query_tokens = matrix.row_labels if query_tokens is None else query_tokens
        candidate_tokens = matrix.column_labels if candidate_tokens is None else candidate_tokens
        left_title, right_title = matrix.row_axis, matrix.column_axis
    else:
        scores = _as_matrix(result_or_scores)
    rows, columns = scores.shape
    left = [str(i) for i in range(rows)] if query_tokens is None else list(query_tokens)
    right = [str(j) for j in range(columns)] if candidate_tokens is None else list(candidate_tokens)
    if (len(left), len(right)) != (rows, columns):
        raise InvalidInputError(
            f"{len(left)} query and {len(right)} candidate tokens do not match the {rows} x {columns} score matrix"
        )
    if top_k is not None and top_k < 0:
        raise InvalidInputError(f"top_k must be >= 0, got {top_k}")

    peak = _peak(scores)
    pairs = sorted(
        ((i, j) for i in range(rows) for j in range(columns) if np.isfinite(scores[i, j]) and scores[i, j] != 0),
        key=lambda pair: abs(scores[pair]),
    )
    if top_k is not None:
        pairs = pairs[len(pairs) - min(top_k, len(pairs)) :]

    from matplotlib.patches import PathPatch
    from matplotlib.path import Path

    figure, ax = _figure_and_axes(ax, (6.0, max(3.0, 0.32 * max(rows, columns) + 1.5)))
    left_y, right_y = _column_positions(rows), _column_positions(columns)
    codes = [Path.MOVETO, Path.CURVE4, Path.CURVE4, Path.CURVE4]
    for i, j in pairs:
        strength = abs(scores[i, j]) / peak
        curve = Path([(0.0, left_y[i]), (0.5, left_y[i]), (0.5, right_y[j]), (1.0, right_y[j])], codes)
        ax.add_patch(
            PathPatch(
                curve,
                facecolor="none",
                edgecolor=_sign_color(scores[i, j]),
                alpha=strength,
                linewidth=max_linewidth * (0.25 + 0.75 * strength),
            )
        )
    for x, ys, tokens, align in ((-0.02, left_y, left, "right"), (1.02, right_y, right, "left")):
        for y, token in zip(ys, tokens):
            ax.text(x, y, _label(token), ha=align, va="center", fontsize=fontsize, parse_math=False)
    ax.text(-0.02, 1.08, left_title, ha="right", weight="bold", fontsize=fontsize, parse_math=False)
    ax.text(1.02, 1.08, right_title, ha="left", weight="bold", fontsize=fontsize, parse_math=False)
    if details:
        caption = ", ".join(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"
                            for key, value in details.items())
        ax.text(0.5, -0.1, caption, ha="center", va="top", fontsize=fontsize * 0.8, parse_math=False, wrap=True)
    if title:
        ax.set_title(title, parse_math=False)
    ax.set_xlim(-0.8, 1.8)
    ax.set_ylim(-0.15 if details else -0.06, 1.14)
    ax.axis("off")
    return figure
