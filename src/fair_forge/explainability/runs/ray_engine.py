"""``explain_dataset(..., engine="ray")``: the same per-item map on Ray Data, an actor pool sharing the work, Ray's
writers putting the records into the output.

The driver reads and maps the source lazily (``sources.py``: malformed rows become failed items there), skips the
items the output already holds, and hands the rest to Ray a window of ``ITEMS_PER_RAY_WINDOW`` items at a time, so it
holds at most one window. Each window is one Ray Data run: ``map_batches`` over a pool of up to ``num_workers``
actors, each loading the model once (from a model folder or a loader function; never pickled per batch) and running
``datasets.explain_records`` (generation included, failed items passed through as their failure records) over its
batches: exactly the local engine, so results agree with it to float rounding. Ray's writers then put the records
into the output's parts folder (``sinks.py``), named ``part-<run>-<window>-<task>-<uuid>``: ``write_parquet`` of the
tidy rows (run settings in the schema metadata, like a local part) or ``JsonlParts`` (the lines a local run writes).
After each window the driver counts its failures from the parts it wrote (the progress bar moves per window), and at
the end the sink's commit merges the parts into the output, as after a local run. Ray writes a part in place, not
atomically: the readers skip a part a kill tore, so a killed run resumes. Ray is an optional extra, imported only
here and in ``ray_writers.py``.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import asdict
from itertools import count, islice
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Union

from ..core.config import ExplainerConfig
from ..errors import InvalidInputError
from ..core.records import DatasetRecord, record_rows
from .tables import arrow_table
from .pipeline import RunSettings, explain_records
from .sinks import ITEMS_PER_PART, Sink, count_failed, output_format

RAY_EXTRA_HINT = "engine='ray' needs Ray Data: pip install 'fair-forge-explainability[ray]'"
ITEMS_PER_RAY_BATCH = 8  # items per map_batches call: the engine packs the model calls of one batch together
# Items per Ray Data run. Each run starts its own actor pool, so every actor starts, imports torch and loads the model
# once per window: measured on the embedded model (2 busy cores), a window costs ~5-7 s more than its items alone,
# against ~0.7 s per item for occlusion (~26 s for integrated gradients), so 1024 items on 2 workers lose ~2% (128
# would lose ~15%). The driver holds at most one window of items (as JSON text, a few MB).
ITEMS_PER_RAY_WINDOW = 1024

ModelLoader = Union[str, os.PathLike, Callable[[], tuple[Any, Any]]]


def check_ray() -> None:
    """A clear error naming the extra when Ray (with Ray Data) is not installed; nothing is imported."""
    if importlib.util.find_spec("ray") is None or importlib.util.find_spec("ray.data") is None:
        raise ImportError(RAY_EXTRA_HINT)


def load_model(loader: ModelLoader) -> tuple[Any, Any]:
    """(model, tokenizer) from a loader function or a local transformers folder (eval mode, local files only; on the
    actor's GPU when Ray gave it one: the actor's own copy, so placing it is not moving the user's model)."""
    if callable(loader):
        return loader()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(loader, local_files_only=True, device_map=device).eval()
    return model, AutoTokenizer.from_pretrained(loader, local_files_only=True)


class _ExplainActor:
    """One Ray actor: loads the model once, then explains the items of every batch it is given."""

    def __init__(self, loader: ModelLoader, config: ExplainerConfig, run: dict[str, Any]) -> None:
        from ..explainer import AttributionExplainer

        model, tokenizer = load_model(loader)
        self.explainer = AttributionExplainer.from_config(model, tokenizer, config)
        self.run = RunSettings(**run)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        from .sources import DatasetItem

        items = [DatasetItem.from_json(text) for text in batch["item"]]
        lines = [record.to_json() for record in explain_records(self.explainer, items, self.run)]
        return {"record": np.array(lines, dtype=object)}


def tidy_table(batch: Any, settings: dict[str, Any]) -> Any:
    """The tidy rows of a batch of records (JSON lines), with the run settings in the schema metadata: what a local
    Parquet part holds, for ``write_parquet``."""
    rows = [row for line in batch.column("record").to_pylist() for row in record_rows(DatasetRecord.from_json(line))]
    return arrow_table(rows, settings)


def _default_loader(explainer: Any) -> str:
    """The explainer's model folder, when it was loaded from one (the embedded model is)."""
    folder = getattr(getattr(explainer.model, "config", None), "name_or_path", None)
    if not folder or not Path(folder).is_dir():
        raise InvalidInputError(
            "engine='ray' needs model_loader=: a local model folder or a function returning (model, tokenizer), "
            "so that every actor loads the model itself"
        )
    return str(folder)


def ray_write(
    explainer: Any,
    items: Iterable[Any],
    run: Any,
    sink: Sink,
    *,
    num_workers: int,
    num_gpus_per_worker: float,
    address: Optional[str],
    model_loader: Optional[ModelLoader],
) -> Iterator[tuple[int, int]]:
    """Explain ``items`` on a Ray actor pool, a window at a time, Ray's writers staging the records in ``sink``'s parts
    folder; yields (items, failed items) per window. Starts a local Ray (or joins ``address``) when none is running,
    and shuts down only a Ray it started."""
    if num_workers < 1 or num_gpus_per_worker < 0:
        raise InvalidInputError("num_workers must be >= 1 and num_gpus_per_worker >= 0")
    if explainer.config.proxy_model_name is not None:
        raise InvalidInputError("engine='ray' loads one model per actor and cannot carry proxy_model; run the "
                                "dataset with engine='local', or without a proxy")
    loader = model_loader if model_loader is not None else _default_loader(explainer)
    import ray

    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    try:
        actor = {"loader": loader, "config": explainer.config, "run": asdict(run)}
        ray.data.DataContext.get_current().enable_progress_bars = False
        sink.parts_dir.mkdir(parents=True, exist_ok=True)
        iterator = iter(items)
        for window in count():
            rows = [{"item": item.to_json()} for item in islice(iterator, ITEMS_PER_RAY_WINDOW)]
            if not rows:
                return
            prefix = f"part-{sink.run_id}-{window:06d}"
            workers = min(num_workers, -(-len(rows) // ITEMS_PER_RAY_BATCH))
            records = ray.data.from_items(rows).map_batches(
                _ExplainActor, fn_constructor_kwargs=actor, batch_size=ITEMS_PER_RAY_BATCH, batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=1, num_gpus=num_gpus_per_worker)
            _write(records, sink, prefix)
            yield len(rows), count_failed(sink.parts_dir.glob(f"{prefix}-*"))
    finally:
        if started_here:
            ray.shutdown()


def _write(records: Any, sink: Sink, prefix: str) -> None:
    """Run one window and stage its records with Ray's writers, a part per write task (of at least
    ``ITEMS_PER_PART`` items, the window's last one excepted). For Parquet the tidy rows are made in the write tasks
    (Ray fuses ``tidy_table`` with the write: ``MapBatches(tidy_table)->Write``), so an item's rows, which Ray may
    split between blocks, still reach one file."""
    from .ray_writers import JsonlParts, PartNames

    folder = str(sink.parts_dir)
    if output_format(sink.path) == "jsonl":
        records.write_datasink(JsonlParts(folder, PartNames(prefix, "jsonl"), ITEMS_PER_PART))
    else:
        tidy = records.map_batches(tidy_table, fn_kwargs={"settings": sink.settings}, batch_size=ITEMS_PER_PART,
                                   batch_format="pyarrow")
        tidy.write_parquet(folder, filename_provider=PartNames(prefix, "parquet"))
