"""See a fairness audit: per-group bars with confidence intervals, and a self-contained, escaped HTML report.

The plot is a pyplot-free ``Figure`` (as ``plots.py``); the HTML page embeds it as a PNG (a ``data:`` image, the only
thing its Content-Security-Policy lets in besides inline style: no script, no network) and escapes every string the
user gave (words, group names, item texts, error messages) with the helpers of ``html.py``.
"""

from __future__ import annotations

import base64
import io
from collections import Counter
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np

from ..core.audit import ALL_ITEMS, AuditItem, AuditReport, GroupEstimate
from .html import _CSS, _esc, _span, largest_magnitude
from .plots import label

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: The two metrics the plot and the page lead with.
PLOTTED = (("protected_share", "share of |attribution| on protected words"),
           ("counterfactual_gap", "counterfactual gap f(x) - f(x')"))
AUDIT_CONTENT_SECURITY_POLICY = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"
ALL_COLOR, GROUP_COLOR = "#999999", "#4575b4"

_AUDIT_CSS = """
.ff-audit{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;font-size:14px;color:#222;max-width:72em}
.ff-audit table{border-collapse:collapse;margin:.4em 0 1em}
.ff-audit th,.ff-audit td{border-bottom:1px solid #ddd;padding:.2em .8em .2em 0;text-align:left;vertical-align:top}
.ff-audit td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.ff-audit .ff-text{white-space:pre-wrap;word-break:break-word;border:1px solid #ddd;padding:.4em;border-radius:4px}
.ff-audit img{max-width:100%}
.ff-audit .ff-note{color:#666;font-size:12px}
"""


def _estimates(report: AuditReport, metric: str) -> list[GroupEstimate]:
    return [estimate for estimate in report.estimates if estimate.metric == metric]


def plot_audit(report: AuditReport) -> "Figure":
    """One panel per plotted metric with data: a bar per group (every item first, in grey) at the mean, and the
    confidence interval as an error bar. Returns the Figure."""
    panels = [(metric, title) for metric, title in PLOTTED if any(e.n for e in _estimates(report, metric))]
    panels = panels or [PLOTTED[0]]
    groups = [estimate.group for estimate in _estimates(report, panels[0][0])]
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4.2 * len(panels), max(2.6, 0.35 * len(groups) + 1.6)), layout="constrained")
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for ax, (metric, title) in zip(axes, panels):
        shown = _estimates(report, metric)
        means = np.array([np.nan if e.mean is None else e.mean for e in shown])
        low = np.array([np.nan if e.ci_low is None else e.ci_low for e in shown])
        high = np.array([np.nan if e.ci_high is None else e.ci_high for e in shown])
        positions = np.arange(len(shown))
        ax.barh(positions, means, xerr=np.vstack([means - low, high - means]), capsize=3,
                color=[ALL_COLOR if e.group == ALL_ITEMS else GROUP_COLOR for e in shown])
        ax.set_yticks(positions, [f"{label(e.group, 24)} (n={e.n})" for e in shown], parse_math=False)
        ax.invert_yaxis()
        ax.axvline(0.0, color="#444444", linewidth=0.8)
        ax.set_xlabel(f"mean, {report.settings.confidence:.0%} bootstrap CI")
        ax.set_title(title, parse_math=False)
    return figure


def _number(value: Optional[float]) -> str:
    return "&ndash;" if value is None else _esc(f"{value:+.4g}")


def _interval(estimate: Optional[GroupEstimate]) -> str:
    if estimate is None or estimate.mean is None:
        return "&ndash;"
    return f"{_number(estimate.mean)} [{_number(estimate.ci_low)}, {_number(estimate.ci_high)}]"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], numeric: bool = True) -> str:
    """An HTML table: ``header`` is escaped here, cells arrive escaped (with ``numeric``, every cell after the
    first is right-aligned)."""
    head = "".join(f"<th>{_esc(name)}</th>" for name in header)
    body = "".join("<tr>" + "".join(f'<td class="num">{cell}</td>' if index and numeric else f"<td>{cell}</td>"
                                    for index, cell in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _summary_table(report: AuditReport) -> str:
    metrics = report.settings.metrics
    by_key = {(e.metric, e.group): e for e in report.estimates}
    counts = report.summary().set_index("group")["n_items"].to_dict() if report.estimates else {}
    rows = [[_esc(group), str(counts.get(group, 0)), *(_interval(by_key.get((m, group))) for m in metrics)]
            for group in dict.fromkeys(e.group for e in report.estimates)]
    return _table(["group", "items", *metrics], rows)


def _differences_table(report: AuditReport) -> str:
    if not report.differences:
        return '<p class="ff-note">fewer than two groups: no differences</p>'
    rows = [[_esc(d.metric), _esc(f"{d.group} - {d.versus or 'rest'}"), f"{d.n} / {d.n_versus}",
             _number(d.difference), f"[{_number(d.ci_low)}, {_number(d.ci_high)}]"] for d in report.differences]
    return _table(["metric", "difference", "n", "mean", f"{report.settings.confidence:.0%} CI"], rows)


def _figure_png(report: AuditReport) -> str:
    buffer = io.BytesIO()
    plot_audit(report).savefig(buffer, format="png", dpi=110)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _carriers(item: AuditItem) -> str:
    """The differences of an item as chips coloured by their share of the gap, strongest first."""
    peak = largest_magnitude(np.array([c.score for c in item.carriers])) or 1.0
    chips = [_span("ff-tok", f"{c.text.strip()} \u2192 {c.counterfactual_text.strip()}", c.score, c.score / peak,
                   show_score=True) + ("" if c.protected else " (not protected)") for c in item.carriers]
    return " &nbsp; ".join(chips)


def _largest_gaps(report: AuditReport, top: int) -> str:
    chosen = sorted((item for item in report.items if item.counterfactual_gap is not None),
                    key=lambda item: abs(item.counterfactual_gap or 0.0), reverse=True)[:top]
    if not chosen:
        return '<p class="ff-note">no item has a counterfactual</p>'
    blocks = []
    for item in chosen:
        contrast = f" vs {item.contrast_target!r}" if item.contrast_target is not None else ""
        head = (f"item {item.item_id} (group {item.group}): target {item.target!r}{contrast}, gap "
                f"{item.counterfactual_gap:+.4g}, on protected words {item.gap_on_protected or 0.0:+.4g}")
        blocks.append(f"<h3>{_esc(head)}</h3><div class=\"ff-text\">{_esc(item.prompt or '')}</div>"
                      f'<div class="ff-attr">{_carriers(item)}</div>')
    return "".join(blocks)


def _unmeasured(report: AuditReport) -> str:
    """Failures one per line, and why items had no counterfactual (each reason once, with its count)."""
    parts = []
    if report.failures:
        rows = [[_esc(f.item_id), _esc(f.stage), _esc(f"{f.error_type}: {f.message}")] for f in report.failures]
        parts.append(f"<h2>Failures ({len(report.failures)})</h2>" + _table(["item", "stage", "error"], rows, False))
    reasons = Counter(item.no_counterfactual for item in report.items if item.no_counterfactual is not None)
    if reasons:
        rows = [[_esc(reason), str(count)] for reason, count in reasons.most_common()]
        parts.append(f"<h2>Items without a counterfactual ({sum(reasons.values())})</h2>"
                     + _table(["reason", "items"], rows, False))
    return "".join(parts)


def render_audit_html(report: AuditReport, top: int = 10) -> str:
    """The report as a self-contained page: settings, the per-group table, the differences, the plot, the ``top``
    items with the largest |gap| and the differences that carry it, failures and items without a counterfactual."""
    settings = report.settings
    protected = settings.protected if isinstance(settings.protected, str) else "; ".join(
        f"{name}: {', '.join(words)}" for name, words in settings.protected.items())
    header = [("model", settings.model_name), ("method", settings.method), ("granularity", settings.granularity),
              ("protected", protected), ("group", str(settings.group)),
              ("counterfactual", str(settings.counterfactual)),
              ("bootstrap", f"{settings.n_bootstrap} resamples, {settings.confidence:.0%} CI, seed {settings.seed}")]
    body = (
        f'<div class="ff-audit"><style>{_CSS}{_AUDIT_CSS}</style><h1>Fairness audit</h1>'
        + _table(["setting", ""], [[_esc(name), _esc(value)] for name, value in header], numeric=False)
        + f"<h2>Per group</h2>{_summary_table(report)}<h2>Between groups</h2>{_differences_table(report)}"
        + f'<img alt="per-group means with confidence intervals" src="data:image/png;base64,{_figure_png(report)}">'
        + f"<h2>Largest counterfactual gaps</h2>{_largest_gaps(report, top)}{_unmeasured(report)}</div>"
    )
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f'<meta http-equiv="Content-Security-Policy" content="{AUDIT_CONTENT_SECURITY_POLICY}">'
            f"<title>Fairness audit: {_esc(settings.model_name)}</title></head><body>{body}</body></html>\n")
