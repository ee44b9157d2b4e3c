"""The record pipeline: dataset items in, one ``DatasetRecord`` per item out, the same on every engine.

Items are explained in blocks of ``BLOCK`` consecutive source indices (targets generated and model calls packed only
within a block), so a run that resumes inside a block re-runs that block and writes, bit for bit, what an
uninterrupted run writes. The local engine (``datasets.py``) and every Ray actor (``ray_engine.py``) run this.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Collection, Iterable, Iterator, Optional

from ..core.records import DatasetRecord
from ..core.types import BatchFailure
from ..errors import ExplainabilityError
from ..runtime.engine import ITEMS_IN_FLIGHT
from ..runtime.generation import generate_targets
from .sources import ColumnMap, DatasetItem

if TYPE_CHECKING:  # annotations only: a Ray actor imports this module before it builds its explainer
    from ..explainer import AttributionExplainer

BLOCK = ITEMS_IN_FLIGHT  # items of consecutive source indices explained together (see ``explain_records``)


@dataclass(frozen=True)
class RunSettings:
    """Everything that decides an item's result; written into the output, compared on resume."""

    method: str
    params: dict[str, Any]
    granularity: str
    per_target: bool
    generate: bool
    max_new_tokens: int
    generation_kwargs: dict[str, Any]
    generation_batch_size: int
    contrast: str = "logprob_diff"  # the contrastive score of items with a contrast target

    def fingerprint(self, explainer: AttributionExplainer, columns: ColumnMap) -> dict[str, Any]:
        """The JSON-able settings an output records (batch sizes excluded: they do not change results)."""
        data = {**vars(self), "explainer": explainer.config.fingerprint(), "columns": vars(columns)}
        data.pop("generation_batch_size")
        return json.loads(json.dumps(data, sort_keys=True, default=str))


def explain_records(
    explainer: AttributionExplainer, items: Iterable[DatasetItem], run: RunSettings, done: Collection[str] = ()
) -> Iterator[Optional[DatasetRecord]]:
    """One record per item, explained block by block: the items whose source indices share ``index // BLOCK``
    get their missing targets generated together and their model calls packed together, and nothing else does.
    An item's result so depends on its block alone, never on where a run started, and a resumed run writes,
    bit for bit, what an uninterrupted run would have: a block that holds an item not yet in the output
    (``done``: the ids it holds) is run whole, and each item already done yields None instead of its record."""
    for block in _blocks(items):
        if all(item.item_id in done for item in block):
            yield from (None for _ in block)
            continue
        for record in _block_records(explainer, block, run):
            yield None if record.item_id in done else record


def _blocks(items: Iterable[DatasetItem]) -> Iterator[list[DatasetItem]]:
    """Consecutive items grouped by ``index // BLOCK`` (items come in source order)."""
    block: list[DatasetItem] = []
    for item in items:
        if block and item.index // BLOCK != block[0].index // BLOCK:
            yield block
            block = []
        block.append(item)
    if block:
        yield block


def _block_records(explainer: AttributionExplainer, block: list[DatasetItem], run: RunSettings
                   ) -> Iterator[DatasetRecord]:
    """The block's records: items that fail before reaching the engine first, then the engine's, as they finish."""
    failed: list[DatasetRecord] = []
    ready: list[tuple[DatasetItem, str]] = []
    for start in range(0, len(block), run.generation_batch_size):
        ready += _with_targets(explainer, block[start : start + run.generation_batch_size], run, failed)
    yield from failed
    stream = explainer.iter_explain([item.request(target) for item, target in ready], method=run.method,
                                    granularity=run.granularity, per_target=run.per_target, contrast=run.contrast,
                                    **run.params)
    for position, outcome in stream:
        item = ready[position][0]
        if isinstance(outcome, BatchFailure):
            outcome = outcome.model_copy(update={"index": item.index})
        yield DatasetRecord(item.index, item.item_id, outcome, item.metadata)


def _with_targets(explainer: AttributionExplainer, chunk: list[DatasetItem], run: RunSettings,
                  failed: list[DatasetRecord]) -> list[tuple[DatasetItem, str]]:
    """The chunk's good items with their targets, the model generating the missing ones in one batched call (one by
    one only when that call fails, to find the item that broke it)."""
    ready: list[tuple[DatasetItem, str]] = []
    to_generate: list[DatasetItem] = []
    for item in chunk:
        if item.error is not None:
            failed.append(DatasetRecord(item.index, item.item_id, item.error, item.metadata))
        elif item.target is None:
            to_generate.append(item)
        else:
            ready.append((item, item.target))

    def generate(items: list[DatasetItem]) -> list[str]:
        return generate_targets(explainer.model, explainer.tokenizer, [(i.messages, i.prompt) for i in items],
                                max_new_tokens=run.max_new_tokens, batch_size=run.generation_batch_size,
                                **run.generation_kwargs)

    def answer_alone(item: DatasetItem) -> Optional[str]:
        try:
            return generate([item])[0]
        except Exception as error:  # noqa: BLE001 - recorded per item
            failed.append(item.failed(error))
            return None

    try:
        answers: list[Optional[str]] = list(generate(to_generate)) if to_generate else []
    except Exception:  # noqa: BLE001 - retried item by item, so only the item at fault is recorded
        answers = [answer_alone(item) for item in to_generate]
    for item, answer in zip(to_generate, answers):
        if answer:
            ready.append((item, answer))
        elif answer == "":
            failed.append(item.failed(ExplainabilityError("the model generated an empty answer: nothing to explain")))
    return ready
