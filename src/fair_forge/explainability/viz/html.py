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

from ..core.types import AttributionResult
from .console import explained_question, feature_label, in_notebook, scores_line

if TYPE_CHECKING:
    pass

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


def _span(css_class: str, text: str, score: float, normalized: float, show_score: bool = False,
          note: Optional[str] = None) -> str:
    style = f"background-color:{score_color(normalized)};color:{_text_color(normalized)}"
    title = _esc(_title(score, normalized) + (f"; {note}" if note else ""))
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
    note: Optional[str] = None  # said in the tooltip (what a counterfactual has instead)


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
            pieces.append(_span(_chip_class(css_class, item), item.label, item.score, item.normalized, show_scores,
                                item.note))
            continue
        if not cursor <= item.start <= item.end <= len(text):
            return None
        pieces.append(_esc(text[cursor : item.start]))
        pieces.append(_span(css_class, text[item.start : item.end], item.score, item.normalized, show_scores,
                            item.note))
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
        pieces.append(gap + _span(_chip_class(css_class, item), label, item.score, item.normalized, show_scores,
                                  item.note))
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
    return [_Item(a.text, a.start, a.end, a.message_index, a.score, a.normalized_score,
                  None if a.counterfactual_text is None else feature_label(a.text, a.counterfactual_text))
            for a in result.attributions]


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
    peak = largest_magnitude(matrix.to_numpy())
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
        *([("contrast", result.contrast_target)] if result.contrast_target else []),
        *([("counterfactual x'", result.counterfactual_prompt)] if result.counterfactual_prompt is not None else []),
        ("question", explained_question(result)),
        *([("scores", scores_line(result))] if scores_line(result) else []),
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


def largest_magnitude(values: np.ndarray) -> float:
    """The largest finite |value| (0 for none): the scale colours and bars are normalised by."""
    finite = np.abs(values[np.isfinite(values)])
    return float(finite.max()) if finite.size else 0.0
