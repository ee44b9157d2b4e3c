"""matplotlib views of results: feature bars, the per-target matrix, siamese token connections, dataset summaries.

Every function draws on the ``ax`` it is given or on a new pyplot-free ``Figure`` (headless, no global state) and
returns the Figure; matplotlib is imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np

from ..core.types import AttributionResult
from ..errors import InvalidInputError
from .html import DIVERGING_CMAP, NEGATIVE_COLOR, POSITIVE_COLOR, largest_magnitude

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def label(text: str, max_chars: int = 40) -> str:
    """A feature as a readable axis label: newlines and tabs shown, outer spaces dropped, long text cut."""
    shown = text.replace("\n", "\u21b5").replace("\t", "\u21e5").strip() or "\u2423"
    return shown if len(shown) <= max_chars else shown[: max_chars - 1] + "\u2026"


def sign_color(score: float) -> str:
    return POSITIVE_COLOR if score > 0 else NEGATIVE_COLOR if score < 0 else "#999999"


def figure_and_axes(ax: Optional["Axes"], figsize: tuple[float, float]) -> tuple["Figure", "Axes"]:
    """Draw on ``ax`` when given, else on a new pyplot-free Figure (headless, no global state)."""
    if ax is not None:
        return ax.figure, ax
    from matplotlib.figure import Figure

    figure = Figure(figsize=figsize, layout="constrained")
    return figure, figure.add_subplot()


def plot_attributions(result: AttributionResult, ax: Optional["Axes"] = None, top_k: Optional[int] = None) -> "Figure":
    """Horizontal bars of the feature scores, red positive and blue negative.

    Features run top to bottom in reading order; with ``top_k`` only the ``top_k`` strongest by |score| are shown,
    strongest on top. Returns the Figure (the one holding ``ax`` when given).
    """
    chosen = list(result.attributions) if top_k is None else result.get_top_k(top_k)
    figure, ax = figure_and_axes(ax, (6.4, max(2.0, 0.3 * len(chosen) + 1.2)))
    scores = [a.score for a in chosen]
    positions = np.arange(len(chosen))
    ax.barh(positions, scores, color=[sign_color(s) for s in scores])
    ax.set_yticks(positions, [label(a.text) for a in chosen], parse_math=False)
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
    column_text = [label(c) for c in matrix.column_labels]
    row_text = [label(r) for r in matrix.row_labels]
    width = 0.35 * columns + 0.09 * max(map(len, row_text)) + 2.5
    height = 0.35 * rows + 0.09 * max(map(len, column_text)) + 1.8
    figure, ax = figure_and_axes(ax, (max(4.0, width), max(3.0, height)))
    peak = largest_magnitude(values) or 1.0
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

    peak = largest_magnitude(scores)
    pairs = sorted(
        ((i, j) for i in range(rows) for j in range(columns) if np.isfinite(scores[i, j]) and scores[i, j] != 0),
        key=lambda pair: abs(scores[pair]),
    )
    if top_k is not None:
        pairs = pairs[len(pairs) - min(top_k, len(pairs)) :]

    from matplotlib.patches import PathPatch
    from matplotlib.path import Path

    figure, ax = figure_and_axes(ax, (6.0, max(3.0, 0.32 * max(rows, columns) + 1.5)))
    left_y, right_y = _column_positions(rows), _column_positions(columns)
    codes = [Path.MOVETO, Path.CURVE4, Path.CURVE4, Path.CURVE4]
    for i, j in pairs:
        strength = abs(scores[i, j]) / peak
        curve = Path([(0.0, left_y[i]), (0.5, left_y[i]), (0.5, right_y[j]), (1.0, right_y[j])], codes)
        ax.add_patch(
            PathPatch(
                curve,
                facecolor="none",
                edgecolor=sign_color(scores[i, j]),
                alpha=strength,
                linewidth=max_linewidth * (0.25 + 0.75 * strength),
            )
        )
    for x, ys, tokens, align in ((-0.02, left_y, left, "right"), (1.02, right_y, right, "left")):
        for y, token in zip(ys, tokens):
            ax.text(x, y, label(token), ha=align, va="center", fontsize=fontsize, parse_math=False)
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


def plot_summary(summary: Any, *, top: int = 15, ax: Optional["Axes"] = None) -> "Figure":
    """Horizontal bars of the ``top`` features' mean |normalized score|, coloured by the sign of their mean score,
    with their count beside them. Returns the (pyplot-free) Figure."""
    shown = summary.head(top)
    figure, ax = figure_and_axes(ax, (6.4, max(2.0, 0.3 * len(shown) + 1.2)))
    positions = list(range(len(shown)))
    ax.barh(positions, shown["mean_abs_normalized_score"], color=[sign_color(s) for s in shown["mean_score"]])
    ax.set_yticks(positions, [f"{label(text)} ({count})" for text, count in zip(shown["feature"], shown["count"])],
                  parse_math=False)
    ax.invert_yaxis()
    ax.set_xlabel("mean |normalized score| (red: positive on average, blue: negative)")
    ax.set_title("features across the dataset (occurrences)")
    return figure
