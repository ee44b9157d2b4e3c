"""Explain whole datasets: sources in, the streaming engine, sinks out, resumable, optionally on Ray.

``explain_dataset`` reads items lazily from a list or any iterable, a pandas DataFrame, a Hugging Face dataset or a
JSONL/CSV/Parquet file, maps their columns to a chat or a prompt and a target, lets the model generate the targets
that are missing, streams them through ``AttributionExplainer.iter_explain`` and writes one record per item, as it
finishes, to a JSONL or Parquet output (``sinks.py``). Every item has a stable id, so a rerun into the same output
skips what is done. ``summarize`` turns results into a table per feature text.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Union

from ..errors import InvalidInputError
from ..explainer import AttributionExplainer, parse_granularity
from ..runtime.generation import DEFAULT_GENERATION_BATCH_SIZE, DEFAULT_MAX_NEW_TOKENS
from ..methods.registry import get_method
from ..runtime.scores import get_score
from ..core.records import DatasetRecord, batch_from_records
from .sinks import Sink, load_results, open_sink, output_format, remove_output, stored_settings
from .pipeline import RunSettings, explain_records
from .sources import ColumnMap, DatasetItem, iter_items, iter_source
from ..core.types import AttributionBatchResult

PathLike = Union[str, os.PathLike]


# ---- the run ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetRun:
    """What a dataset run into an output did (items explained, failed, and skipped as already done), and where the
    records are."""

    path: Path
    n_explained: int
    n_failed: int
    n_skipped: int
    seconds: float

    def load(self) -> AttributionBatchResult:
        """Every record of the output (this run's and earlier ones'), as a batch result."""
        return AttributionBatchResult.load(self.path)


def explain_dataset(
    explainer: AttributionExplainer,
    source: Any,
    out: Optional[PathLike] = None,
    *,
    method: Optional[str] = None,
    granularity: Optional[str] = None,
    per_target: bool = False,
    messages: Optional[str] = None,
    prompt: Optional[str] = None,
    question: Optional[str] = None,
    system: Optional[str] = None,
    context: Optional[str] = None,
    target: Optional[str] = None,
    id_column: Optional[str] = None,
    contrast_target: Optional[str] = None,
    counterfactual: Optional[str] = None,
    contrast: str = "logprob_diff",
    generate: bool = False,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    generation_kwargs: Optional[Mapping[str, Any]] = None,
    generation_batch_size: int = DEFAULT_GENERATION_BATCH_SIZE,
    limit: Optional[int] = None,
    resume: bool = True,
    overwrite: bool = False,
    show_progress: bool = True,
    engine: str = "local",
    num_workers: int = 2,
    num_gpus_per_worker: float = 0.0,
    address: Optional[str] = None,
    model_loader: Union[str, os.PathLike, Callable[[], tuple[Any, Any]], None] = None,
    **method_params: Any,
) -> Union[DatasetRun, AttributionBatchResult]:
    """Explain every item of ``source``; with ``out`` (a .jsonl or .parquet path) stream records there and return a
    ``DatasetRun``, else return an ``AttributionBatchResult``.

    ``messages=``, ``prompt=``, ``question=``, ``system=`` (alias ``context=``, sent as a system message),
    ``target=``, ``id_column=``, ``contrast_target=`` and ``counterfactual=`` name source columns (defaults:
    ``messages``, ``prompt``, ``question``, ``system``/``context``, ``target``/``answer``/``response``,
    ``contrast_target``, ``counterfactual``; ids hash the item and the settings). A row with a contrast target is
    explained as why its target rather than that (``contrast=``, see ``AttributionExplainer.explain``); a row with
    a counterfactual (messages, the counterfactual's question, or a prompt) as f(x) - f(x'). An item
    without a target, or every item with ``generate=True``, gets the model's own greedy answer. An existing output
    written with the same settings is resumed (``resume=False`` makes that an error), one written with other
    settings is an error unless ``overwrite=True``. ``engine="ray"`` runs on Ray Data (see ``ray_engine.py``).
    """
    if context is not None and system is not None:
        raise InvalidInputError("give system= or context= (the same column role), not both")
    if engine not in ("local", "ray"):
        raise InvalidInputError(f"engine must be 'local' or 'ray', got {engine!r}")
    if limit is not None and limit < 0:
        raise InvalidInputError(f"limit must be >= 0, got {limit}")
    spec = get_method(method if method is not None else explainer.default_method)
    level = parse_granularity(granularity if granularity is not None else explainer.default_granularity)
    run = RunSettings(spec.name, dict(spec.resolve_params(method_params)), level.value, per_target, generate,
                      max_new_tokens, dict(generation_kwargs or {}), generation_batch_size,
                      get_score(contrast, contrastive=True).name)
    if max_new_tokens < 1 or generation_batch_size < 1:
        raise InvalidInputError("max_new_tokens and generation_batch_size must be >= 1")
    columns = ColumnMap(messages, prompt, question, system if system is not None else context, target, id_column,
                        contrast_target, counterfactual)
    settings = run.fingerprint(explainer, columns)
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    if engine == "ray":
        from .ray_engine import check_ray

        check_ray()
    path = Path(out) if out is not None else None
    if path is not None:
        _prepare_output(path, settings, resume, overwrite)
    rows = iter_source(source, columns)
    items = iter_items(islice(rows, limit) if limit is not None else rows, columns, generate, digest)

    started = time.perf_counter()
    # Ray's writers write files: an in-memory Ray run writes a temporary output and reads it back
    in_memory_ray = path is None and engine == "ray"
    with tempfile.TemporaryDirectory(prefix="fair_forge-") if in_memory_ray else nullcontext() as scratch:
        output = Path(scratch) / "records.jsonl" if scratch is not None else path
        sink = open_sink(output, settings) if output is not None else None
        done = sink.done_ids() if sink is not None else set()
        collected: list[DatasetRecord] = []
        counts = {"ok": 0, "failed": 0, "skipped": 0}
        progress = _progress(show_progress, _length(source, limit))

        def skip() -> None:  # an item the output holds already
            counts["skipped"] += 1
            progress.update(1)

        try:
            if engine == "local":
                written = _write_local(explainer, items, run, done, skip, sink, collected)
            else:
                from .ray_engine import ray_write

                written = ray_write(explainer, _not_done(items, done, skip), run, sink, num_workers=num_workers,
                                    num_gpus_per_worker=num_gpus_per_worker, address=address,
                                    model_loader=model_loader)
            for n_items, n_failed in written:
                counts["ok"] += n_items - n_failed
                counts["failed"] += n_failed
                progress.update(n_items)
                progress.set_postfix(failed=counts["failed"], refresh=False)
        finally:
            progress.close()
            if sink is not None:
                sink.close()
        if path is None and output is not None:
            collected = list(load_results(output))
    seconds = time.perf_counter() - started
    if path is None:
        return batch_from_records(collected, explainer.model_name, seconds)
    return DatasetRun(path, counts["ok"], counts["failed"], counts["skipped"], seconds)


def _prepare_output(path: Path, settings: dict[str, Any], resume: bool, overwrite: bool) -> None:
    """Check an existing output against this run before any model call (or remove it, with ``overwrite``)."""
    output_format(path)
    if overwrite:
        remove_output(path)
        return
    existing = stored_settings(path)
    if existing is None:
        return
    if existing != settings:
        changed = sorted(key for key in {*existing, *settings} if existing.get(key) != settings.get(key))
        raise InvalidInputError(
            f"{path} holds a run with other settings (differing: {changed}); pass overwrite=True to replace it, "
            "or write to another path"
        )
    if not resume:
        raise InvalidInputError(f"{path} already exists; resume it (resume=True) or replace it (overwrite=True)")


def _write_local(explainer: AttributionExplainer, items: Iterator[DatasetItem], run: RunSettings, done: set[str],
                 skip: Callable[[], None], sink: Optional[Sink], collected: list[DatasetRecord]
                 ) -> Iterator[tuple[int, int]]:
    """Explain ``items`` here, each record to the sink (or ``collected``) as it finishes; yields (1, failed) per item.
    An item the output holds is re-run with its block (``explain_records``) and only counted (``skip``)."""
    for record in explain_records(explainer, items, run, done):
        if record is None:
            skip()
            continue
        if sink is not None:
            sink.write(record)
        else:
            collected.append(record)
        yield 1, int(record.failed)


def _not_done(items: Iterable[DatasetItem], done: set[str], skip: Callable[[], None]) -> Iterator[DatasetItem]:
    """The items an output does not hold yet (for the Ray engine, whose actors see batches, not blocks); the ones it
    holds are counted (``skip``)."""
    for item in items:
        if item.item_id in done:
            skip()
        else:
            yield item


def _length(source: Any, limit: Optional[int]) -> Optional[int]:
    """How many items a source holds, when it knows (a list, a DataFrame, a Hugging Face Dataset), for the bar."""
    try:
        count = len(source) if not isinstance(source, (str, os.PathLike)) else None
    except TypeError:
        count = None
    return min(count, limit) if count is not None and limit is not None else count if count is not None else limit


def _progress(show: bool, total: Optional[int]) -> Any:
    """A tqdm bar: items/s, and the failures so far as its postfix (skipped items count towards the total)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="explaining", unit="item", disable=not show)
