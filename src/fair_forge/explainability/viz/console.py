"""Console views: the ranked table of a result (``show()`` outside a notebook, and the CLI), and whether the code
runs in a Jupyter kernel that can display HTML."""

from __future__ import annotations

from typing import Optional

from ..core.types import AttributionResult


def in_notebook() -> bool:
    """True inside a Jupyter kernel (which can display HTML), False in a console or plain IPython."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


def explained_question(result: AttributionResult) -> str:
    """What the scores answer, in words: which parts of the input drove the target, why it rather than the
    contrast, and for a counterfactual how much each change from x' to x moved that."""
    question = f"why {result.target!r}" + (f" rather than {result.contrast_target!r}" if result.contrast_target else "")
    if result.counterfactual_prompt is not None:
        return f"{question}: what each change from the counterfactual x' to x did (they sum to f(x) - f(x'))"
    return question


def scores_line(result: AttributionResult) -> str:
    """The explained score at the input (and at x'), when the method reported it."""
    meta = result.metadata
    if meta.target_score is None:
        return ""
    line = f"explained score ({getattr(meta, 'score', 'score')}): f(x) = {meta.target_score:+.4f}"
    if meta.counterfactual_score is not None:
        line += f", f(x') = {meta.counterfactual_score:+.4f}, f(x) - f(x') = " \
                f"{meta.target_score - meta.counterfactual_score:+.4f}"
    elif meta.baseline_score is not None:
        line += f", f(baseline) = {meta.baseline_score:+.4f}"
    return line


def feature_label(text: str, counterfactual_text: Optional[str]) -> str:
    """A feature as shown in tables and tooltips: its text, and for a counterfactual what x' has instead."""
    return text if counterfactual_text is None else f"{text} (x': {counterfactual_text!r})"


def format_table(result: AttributionResult, top: int = 10) -> str:
    """The ranked summary shared by ``show()`` and the CLI: header, then rank / text / score / normalized score."""
    meta = result.metadata
    lines = [
        f"model: {result.model_name}",
        f"method: {result.method_name}   granularity: {result.granularity}   "
        f"time: {meta.compute_time_seconds:.2f} s   passes: {meta.n_forward_passes} forward, "
        f"{meta.n_backward_passes} backward",
    ]
    if meta.convergence_delta is not None:
        relative = meta.relative_convergence_delta
        extra = f" ({relative:.2%} of f(x) - f(baseline))" if relative is not None else ""
        lines.append(f"convergence delta: {meta.convergence_delta:.4g}{extra}")
    lines.append(f"target: {result.target!r}")
    lines.append(f"question: {explained_question(result)}")
    if scores_line(result):
        lines.append(scores_line(result))
    rows = [  # repr: newlines stay visible
        (str(rank), repr(feature_label(a.text, a.counterfactual_text))[1:-1], f"{a.score:+.4f}",
         f"{a.normalized_score:+.3f}")
        for rank, a in enumerate(result.get_top_k(top), 1)
    ]
    header = ("rank", "text", "score", "normalized")
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]
    lines.append("")
    lines.append(f"top {len(rows)} of {len(result.attributions)} {result.granularity}s by |score|:")
    for row in (header, *rows):  # text left-aligned, numbers right-aligned
        cells = [cell.ljust(w) if i == 1 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells))
    return "\n".join(lines)
