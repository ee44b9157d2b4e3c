"""Console views: the ranked table of a result (``show()`` outside a notebook, and the CLI), and whether the code
runs in a Jupyter kernel that can display HTML."""

from __future__ import annotations

from ..core.types import AttributionResult


def in_notebook() -> bool:
    """True inside a Jupyter kernel (which can display HTML), False in a console or plain IPython."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


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
    rows = [
        (str(rank), repr(a.text)[1:-1], f"{a.score:+.4f}", f"{a.normalized_score:+.3f}")  # repr: newlines stay visible
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
