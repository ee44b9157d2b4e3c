"""The fairness audit: across a dataset, how much does the model lean on protected words, and does it differ
between groups?

``audit`` reads the items lazily (any source ``explain_dataset`` takes, with the same column options), builds each
item's counterfactual x' (protected words swapped), and explains x and, where there is one, x' against x in one
``explain_dataset`` run: the same packed, streaming engine, with the records streamed next to the report when ``out``
is given, so a rerun resumes. The report (``core/audit.py``) is then aggregated from the records. An item that
cannot be read, explained or given a counterfactual stays in the report, with the reason.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence, Union

from ..core.audit import AuditFailure, AuditItem, AuditReport, AuditSettings, Carrier, protected_mass
from ..core.records import DatasetRecord, batch_records
from ..core.types import AttributionResult, BatchFailure
from ..errors import InvalidInputError
from ..explainer import AttributionExplainer, parse_granularity
from ..methods.registry import get_method
from ..text.prompt import Messages
from ..text.protected import (
    SPANS,
    SPANS_FIELD,
    ProtectedSpan,
    ProtectedSpec,
    item_spans,
    parse_protected,
    touched_attributes,
    whole_words_pattern,
    word_spans,
)
from ..text.swap import swap, swap_table
from ..runtime.scores import get_score
from .datasets import explain_dataset
from .sinks import load_results
from .sources import ColumnMap, DatasetItem, _missing, iter_items, iter_source

PathLike = Union[str, os.PathLike]
X = Union[str, Messages]
REPORT_SUFFIXES = (".json", ".html")
_ID = "audit_id"  # the id column of the audit's own run: one id per (item, pass), a hash of what is explained


@dataclass
class _Item:
    """An item in flight: its report row and where its protected words are."""

    row: AuditItem
    spans: list[ProtectedSpan] = field(default_factory=list)
    words: Optional[re.Pattern[str]] = None  # every protected word (None for spans): finds them in x' too
    attributes: tuple[str, ...] = ()  # the attributes with a share of their own (when several are audited)


def audit(
    explainer: AttributionExplainer,
    items: Any,
    *,
    protected: Any,
    group: Optional[str] = None,
    method: Optional[str] = None,
    granularity: Optional[str] = "word",
    target: Optional[str] = None,
    contrast_target: Optional[str] = None,
    contrast: str = "logprob_diff",
    counterfactual: Union[None, str, Sequence[tuple[str, str]], Callable[[X], X]] = None,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    out: Optional[PathLike] = None,
    resume: bool = True,
    overwrite: bool = False,
    show_progress: bool = True,
    messages: Optional[str] = None,
    prompt: Optional[str] = None,
    question: Optional[str] = None,
    system: Optional[str] = None,
    context: Optional[str] = None,
    id_column: Optional[str] = None,
    **method_params: Any,
) -> AuditReport:
    """Audit ``items``: per item the decision score, the share of attribution mass on protected words and, with a
    counterfactual, the gap f(x) - f(x') and the part the swapped words carry; per group their means with percentile
    bootstrap confidence intervals (``n_bootstrap`` resamples, ``confidence``, a numpy Generator seeded by ``seed``)
    and the differences between groups.

    ``protected``: a list of words, a mapping attribute -> words, or ``"spans"`` (each item's ``protected_spans``
    field); see ``text/protected.py``. ``group`` names the field (column) holding an item's group.
    ``counterfactual``: a built-in attribute of ``swap`` ("gender"), a list of word pairs for ``swap``, or a
    function x -> x'; an item's own ``counterfactual`` field wins over it, and without either an item has none.
    ``messages=`` ... ``id_column=`` name columns as in ``explain_dataset``, and so do ``target=`` and
    ``contrast_target=`` (default columns ``target``/``answer``/``response`` and ``contrast_target``); an audit needs
    every item's target. With ``out`` (a .json or .html report) the explanations stream to ``<out stem>.records.jsonl``
    beside it, a rerun resumes them (``resume``/``overwrite`` as in ``explain_dataset``), and the report is written
    to ``out``. ``contrast=`` picks the contrastive score of items with a contrast target ("logprob_diff" or
    "prob_diff", as in ``explain``). Method parameters are keywords, as for ``explain``.
    """
    options = check_options(protected, counterfactual, group, n_bootstrap, confidence, seed, out)
    if context is not None and system is not None:
        raise InvalidInputError("give system= or context= (the same column role), not both")
    method_spec = get_method(method if method is not None else explainer.default_method)
    params = json.loads(json.dumps(dict(method_spec.resolve_params(method_params)), default=str))
    level = parse_granularity(granularity if granularity is not None else explainer.default_granularity)
    spec = options.protected
    settings = AuditSettings(
        model_name=explainer.model_name, method=method_spec.name, granularity=level.value, method_params=params,
        protected=spec if isinstance(spec, str) else {name: list(words) for name, words in spec.items()},
        group=group, counterfactual=options.described, contrast=get_score(contrast, contrastive=True).name,
        n_bootstrap=n_bootstrap, confidence=confidence, seed=seed)
    report_path, records_path = options.report, options.records
    columns = ColumnMap(messages, prompt, question, system if system is not None else context, target, id_column,
                        contrast_target)

    pending: dict[str, tuple[_Item, str]] = {}  # audit id -> (item, "plain" | "counterfactual")
    rows: list[_Item] = []
    failures: list[AuditFailure] = []
    requests = _requests(iter_source(items, columns), columns, spec, group, options.build, pending, rows, failures)
    outcome = explain_dataset(explainer, requests, records_path, method=method_spec.name, granularity=level.value,
                              id_column=_ID, resume=resume, overwrite=overwrite, show_progress=show_progress,
                              contrast=settings.contrast, **method_params)
    order = list(pending)  # the run's item indices are positions in the stream of requests
    records: Iterable[DatasetRecord] = (load_results(records_path) if records_path is not None
                                        else (DatasetRecord(r.index, order[r.index], r.outcome)
                                              for r in batch_records(outcome)))
    for record in records:
        if record.item_id in pending:
            item, kind = pending.pop(record.item_id)
            _fill(item, kind, record.outcome, failures)
    report = AuditReport.build(settings, [item.row for item in rows], failures)
    if report_path is not None:
        if report_path.suffix.lower() == ".html":
            report.save_html(report_path)
        else:
            report_path.write_text(report.model_dump_json(indent=1) + "\n", encoding="utf-8")
    return report


@dataclass(frozen=True)
class AuditOptions:
    """The audit's own options, checked: what is protected, how x' is built, where the report and records go."""

    protected: ProtectedSpec
    build: Optional[Callable[[X], X]]
    described: Optional[str]  # how the report names the counterfactual
    report: Optional[Path]
    records: Optional[Path]  # <report stem>.records.jsonl beside the report


def check_options(protected: Any, counterfactual: Any = None, group: Optional[str] = None, n_bootstrap: int = 1000,
                  confidence: float = 0.95, seed: int = 0, out: Optional[PathLike] = None) -> AuditOptions:
    """Check the options ``audit`` adds to ``explain_dataset``'s (typed errors, before any model is loaded or item
    read: the command line calls this before it loads the model)."""
    if group is not None and (not isinstance(group, str) or not group):
        raise InvalidInputError(f"group names the field holding an item's group, got {group!r}")
    if isinstance(n_bootstrap, bool) or not isinstance(n_bootstrap, int) or n_bootstrap < 1:
        raise InvalidInputError(f"n_bootstrap must be a whole number >= 1, got {n_bootstrap!r}")
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0 < confidence < 1:
        raise InvalidInputError(f"confidence must lie strictly between 0 and 1 (e.g. 0.95), got {confidence!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InvalidInputError(f"seed must be a whole number >= 0, got {seed!r}")
    report = Path(out) if out is not None else None
    if report is not None and report.suffix.lower() not in REPORT_SUFFIXES:
        raise InvalidInputError(f"out is the report: a path ending in {REPORT_SUFFIXES}, got {report}")
    records = report.with_name(report.stem + ".records.jsonl") if report is not None else None
    return AuditOptions(parse_protected(protected), *_counterfactual_builder(counterfactual), report, records)


def _counterfactual_builder(counterfactual: Any) -> tuple[Optional[Callable[[X], X]], Optional[str]]:
    """The function that builds x' from x, and how the report names it; typed errors before any item is read."""
    if counterfactual is None:
        return None, None
    if isinstance(counterfactual, str):
        swap_table(counterfactual, None)  # an unknown attribute fails here
        return partial(swap, attribute=counterfactual), f"swap({counterfactual!r})"
    if callable(counterfactual):
        return counterfactual, getattr(counterfactual, "__qualname__", type(counterfactual).__name__)
    swap_table(None, counterfactual)  # malformed pairs fail here
    pairs = [tuple(pair) for pair in counterfactual]
    return partial(swap, pairs=pairs), f"swap(pairs={pairs!r})"


def _field(raw: Any, name: str) -> Any:
    """A field of a source row (None when the row is not a mapping or the value is missing)."""
    value = raw.get(name) if isinstance(raw, Mapping) else None
    return None if _missing(value) else value


def _requests(rows: Iterator[Any], columns: ColumnMap, spec: Any, group: Optional[str],
              build: Optional[Callable[[X], X]], pending: dict[str, tuple[_Item, str]], items: list[_Item],
              failures: list[AuditFailure]) -> Iterator[dict[str, Any]]:
    """The explanations the audit asks for, item by item (x, then x' against x), as ``explain_dataset`` items; each
    item's row goes to ``items``, its ids to ``pending``, what fails before the model to ``failures``."""
    raw_rows: dict[int, Any] = {}

    def remembered() -> Iterator[Any]:  # iter_items maps one row per item: keep the raw row for the fields it drops
        for index, raw in enumerate(rows):
            raw_rows[index] = raw
            yield raw

    patterns = {} if spec == SPANS else {name: whole_words_pattern(words) for name, words in spec.items()}
    every_word = None if spec == SPANS else whole_words_pattern(word for words in spec.values() for word in words)
    for source in iter_items(remembered(), columns, False, "audit"):
        raw = raw_rows.pop(source.index)
        key = str(_field(raw, columns.id)) if columns.id is not None and source.error is None else str(source.index)
        group_value = _field(raw, group) if group is not None else None
        item = _Item(AuditItem(index=source.index, item_id=key, group=None if group_value is None else str(group_value),
                               target=source.target, contrast_target=source.contrast_target))
        items.append(item)
        if source.error is not None:  # the row could not be mapped: recorded as it was
            failures.append(_failure(item.row, "input", source.error))
            continue
        try:
            x, texts = _x_and_texts(source)
            item.row.prompt = "\n".join(text for _, text in texts)
            item.spans = (item_spans(_field(raw, SPANS_FIELD) or [], texts) if spec == SPANS
                          else word_spans(texts, patterns))
            item.words = every_word
            item.attributes = tuple(spec) if spec != SPANS and len(spec) > 1 else ()
        except InvalidInputError as error:
            failures.append(_failure(item.row, "input", error))
            continue
        request = source.request(source.target)
        own = request.pop("counterfactual", None)
        yield _ask(request, key, "plain", item, pending)
        x_prime = _counterfactual(x, own, build, item, failures)
        if x_prime is not None:
            yield _ask({**request, "counterfactual": x_prime}, key, "counterfactual", item, pending)


def _x_and_texts(source: DatasetItem) -> tuple[X, list[tuple[Optional[int], str]]]:
    """The item's input (prompt or messages) and its texts, or the reason it cannot be audited."""
    if source.target is None:
        raise InvalidInputError("the item has no target: an audit compares the score of a given target across items "
                                "(name its column with target=)")
    if source.messages is not None:
        return source.messages, [(index, str(m.get("content", ""))) for index, m in enumerate(source.messages)]
    return source.prompt, [(None, source.prompt)]


def _counterfactual(x: X, own: Any, build: Optional[Callable[[X], X]], item: _Item,
                    failures: list[AuditFailure]) -> Optional[X]:
    """x' for an item: its own, else built from x; None (with the reason on its row) when there is none."""
    if own is None and build is None:
        item.row.no_counterfactual = "no counterfactual given (counterfactual= or the item's 'counterfactual' field)"
        return None
    try:
        x_prime = own if own is not None else build(json.loads(json.dumps(x)))  # the builder gets its own copy
    except InvalidInputError as error:  # e.g. swap: no word to swap in x
        item.row.no_counterfactual = str(error)
        return None
    except Exception as error:  # noqa: BLE001 - a broken builder fails this item's counterfactual, not the audit
        failures.append(_failure(item.row, "counterfactual", error))
        return None
    if x_prime == x:
        item.row.no_counterfactual = "the counterfactual equals x"
        return None
    return x_prime


def _ask(request: dict[str, Any], key: str, kind: str, item: _Item, pending: dict[str, tuple[_Item, str]]
         ) -> dict[str, Any]:
    """The request with its id: a hash of the item's key, the pass and what is explained, so a rerun finds it."""
    text = json.dumps({"key": key, "kind": kind, "request": request}, sort_keys=True, default=str)
    audit_id = f"{kind}-{hashlib.sha256(text.encode('utf-8')).hexdigest()[:20]}"
    pending[audit_id] = (item, kind)
    return {**request, _ID: audit_id}


def _failure(row: AuditItem, stage: str, error: Union[BaseException, BatchFailure]) -> AuditFailure:
    if isinstance(error, BatchFailure):
        return AuditFailure(index=row.index, item_id=row.item_id, stage=stage, error_type=error.error_type,
                            message=error.message)
    return AuditFailure(index=row.index, item_id=row.item_id, stage=stage, error_type=type(error).__name__,
                        message=str(error))


def _fill(item: _Item, kind: str, outcome: Union[AttributionResult, BatchFailure],
          failures: list[AuditFailure]) -> None:
    """Put one explanation's metrics on the item's row (or its failure in ``failures``)."""
    row = item.row
    if isinstance(outcome, BatchFailure):
        failures.append(_failure(row, "explanation" if kind == "plain" else "counterfactual", outcome))
        return
    touched = [touched_attributes(a.message_index, a.start, a.end, item.spans) for a in outcome.attributions]
    if kind == "plain":
        row.target_score = outcome.metadata.target_score
        row.protected_share, row.protected_signed = protected_mass(outcome.scores, [bool(t) for t in touched])
        row.protected_words = [a.text for a, t in zip(outcome.attributions, touched) if t]
        shares = {name: protected_mass(outcome.scores, [name in t for t in touched])[0] for name in item.attributes}
        row.attribute_shares = {name: share for name, share in shares.items() if share is not None}
        return
    metadata = outcome.metadata
    row.counterfactual_prompt = outcome.counterfactual_prompt
    row.counterfactual_score = metadata.counterfactual_score
    row.counterfactual_gap = metadata.target_score - metadata.counterfactual_score
    in_x_prime = [item.words is not None and item.words.search(a.counterfactual_text or "") is not None
                  for a in outcome.attributions]  # an inserted protected word has no span in x
    carriers = [Carrier(text=a.text, counterfactual_text=a.counterfactual_text or "", score=a.score,
                        protected=bool(t) or inserted)
                for a, t, inserted in zip(outcome.attributions, touched, in_x_prime)]
    row.carriers = sorted(carriers, key=lambda carrier: abs(carrier.score), reverse=True)
    row.gap_on_protected = sum(carrier.score for carrier in carriers if carrier.protected)
