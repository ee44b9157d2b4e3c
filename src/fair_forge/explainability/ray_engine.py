"""``explain_dataset(..., engine="ray")``: the same per-item map on Ray Data, an actor pool sharing the work.

The driver reads and maps the source (malformed rows are recorded there), skips the items an output already holds,
and hands the rest to ``map_batches`` over a pool of ``num_workers`` actors. Each actor loads the model once, from a
model folder or a loader function (the model is never pickled per batch), and runs ``datasets.explain_records``
(generation included) over its batches: exactly the local engine, so results agree with it to float rounding.
Records come back to the driver, which writes them with the same sinks as a local run (one format, one resume
logic). Ray is an optional extra, imported only here.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Union

from .errors import InvalidInputError
from .records import DatasetRecord

RAY_EXTRA_HINT = "engine='ray' needs Ray Data: pip install 'fair-forge-explainability[ray]'"
ITEMS_PER_RAY_BATCH = 8  # items per map_batches call: the engine packs the model calls of one batch together

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

    def __init__(self, loader: ModelLoader, explainer_options: dict[str, Any], run: dict[str, Any]) -> None:
        from .datasets import RunSettings
        from .explainer import AttributionExplainer

        model, tokenizer = load_model(loader)
        self.explainer = AttributionExplainer(model, tokenizer, **explainer_options)
        self.run = RunSettings(**run)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        from .datasets import DatasetItem, explain_records

        items = [DatasetItem(**json.loads(text)) for text in batch["item"]]
        lines = [record.to_json() for record in explain_records(self.explainer, items, self.run)]
        return {"record": np.array(lines, dtype=object)}


def _default_loader(explainer: Any) -> str:
    """The explainer's model folder, when it was loaded from one (the embedded model is)."""
    folder = getattr(getattr(explainer.model, "config", None), "name_or_path", None)
    if not folder or not Path(folder).is_dir():
        raise InvalidInputError(
            "engine='ray' needs model_loader=: a local model folder or a function returning (model, tokenizer), "
            "so that every actor loads the model itself"
        )
    return str(folder)


def ray_records(
    explainer: Any,
    items: Iterable[Any],
    run: Any,
    *,
    num_workers: int,
    num_gpus_per_worker: float,
    address: Optional[str],
    model_loader: Optional[ModelLoader],
) -> Iterator[DatasetRecord]:
    """Records of ``items`` explained on a Ray actor pool; starts a local Ray (or joins ``address``) when none is
    running, and shuts down only a Ray it started."""
    if num_workers < 1 or num_gpus_per_worker < 0:
        raise InvalidInputError("num_workers must be >= 1 and num_gpus_per_worker >= 0")
    loader = model_loader if model_loader is not None else _default_loader(explainer)
    import ray

    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    try:
        yield from _run_pool(ray, explainer, items, run, num_workers, num_gpus_per_worker, loader)
    finally:
        if started_here:
            ray.shutdown()


def _run_pool(ray: Any, explainer: Any, items: Iterable[Any], run: Any, num_workers: int,
              num_gpus_per_worker: float, loader: ModelLoader) -> Iterator[DatasetRecord]:
    rows = []
    for item in items:
        if item.error is not None:  # failed on the driver already: nothing for an actor to do
            yield DatasetRecord(item.index, item.item_id, item.error, item.metadata)
        else:
            rows.append({"item": json.dumps(asdict(item))})
    if not rows:
        return
    options = {"default_method": explainer.default_method, "default_granularity": explainer.default_granularity,
               "model_name": explainer.model_name, "score": explainer.score, "batch_size": explainer.batch_size,
               "include_template_tokens": explainer.include_template_tokens, "prefix_cache": explainer.prefix_cache}
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    dataset = ray.data.from_items(rows).map_batches(
        _ExplainActor,
        fn_constructor_kwargs={"loader": loader, "explainer_options": options, "run": asdict(run)},
        batch_size=ITEMS_PER_RAY_BATCH,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=num_workers),
        num_cpus=1,
        num_gpus=num_gpus_per_worker,
    )
    for row in dataset.iter_rows():
        yield DatasetRecord.from_json(row["record"])
