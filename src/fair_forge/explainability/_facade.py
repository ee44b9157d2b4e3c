"""The package's facade for the convenience methods of the result types (see ``core.types._facade``).

``AttributionResult.show`` / ``save_html`` / ``_repr_html_`` and ``AttributionBatchResult.save`` / ``load`` /
``to_dataframe`` are plain data's methods, but their work is display (``viz/``) and storage (``runs/``), floors above
``core``; so are ``AuditReport.plot`` and ``save_html``. They call these functions, which live on the top floor and may
import any floor.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from .core.types import AttributionBatchResult, AttributionResult

if TYPE_CHECKING:
    from .core.audit import AuditReport

PathLike = Union[str, "os.PathLike[str]"]


def render_html(result: AttributionResult, *, standalone: bool) -> str:
    from .viz.html import render_html as render

    return render(result, standalone=standalone)


def save_html(result: AttributionResult, path: PathLike, show_scores: bool) -> Path:
    from .viz.html import render_html as render

    target = Path(path)
    target.write_text(render(result, standalone=True, show_scores=show_scores), encoding="utf-8")
    return target


def show(result: AttributionResult, top: int) -> None:
    """The HTML view in a notebook; in a console the ranked table."""
    from .viz.console import format_table, in_notebook

    if in_notebook():
        from IPython.display import HTML, display

        display(HTML(render_html(result, standalone=False)))
    else:
        print(format_table(result, top))


def batch_dataframe(batch: AttributionBatchResult) -> Any:
    from .core.records import batch_records
    from .runs.tables import records_dataframe

    return records_dataframe(batch_records(batch))


def save_batch(batch: AttributionBatchResult, path: PathLike) -> Path:
    from .runs.sinks import save_batch as save

    return save(batch, path)


def load_batch(path: PathLike) -> AttributionBatchResult:
    from .core.records import batch_from_records
    from .runs.sinks import load_results

    return batch_from_records(load_results(path))


def plot_audit(report: "AuditReport") -> Any:
    from .viz.audit import plot_audit as plot

    return plot(report)


def save_audit_html(report: "AuditReport", path: PathLike, top: int) -> Path:
    from .viz.audit import render_audit_html

    target = Path(path)
    target.write_text(render_audit_html(report, top), encoding="utf-8")
    return target
