"""One record per dataset item, and its tidy rows.

A ``DatasetRecord`` is what a dataset run produces per item: its index in the source, its stable id, the result or
the failure, and the item's own metadata columns. The tidy long table (one row per feature, a single row for a
failure) is the Parquet layout and ``AttributionBatchResult.to_dataframe()``; it holds everything needed to rebuild
the records exactly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Union

from .types import AttributionBatchResult, AttributionResult, BatchFailure

SETTINGS_KEY = b"fair_forge_settings"

Outcome = Union[AttributionResult, BatchFailure]


@dataclass(frozen=True)
class DatasetRecord:
    """One item of a dataset run: where it was in the source, its stable id, what came out, and its own columns."""

    index: int
    item_id: str
    outcome: Outcome
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return isinstance(self.outcome, BatchFailure)

    def to_json(self) -> str:
        """One JSONL line (without the newline)."""
        kind = "failure" if self.failed else "result"
        body = {"index": self.index, "item_id": self.item_id, "metadata": self.metadata,
                kind: json.loads(self.outcome.model_dump_json())}
        return json.dumps(body, ensure_ascii=False)

    @classmethod
    def from_json(cls, line: str) -> "DatasetRecord":
        data = json.loads(line)
        outcome: Outcome = (BatchFailure.model_validate(data["failure"]) if "failure" in data
                            else AttributionResult.model_validate(data["result"]))
        return cls(data["index"], data["item_id"], outcome, data.get("metadata") or {})


# ---- the tidy long table ----------------------------------------------------------------------------------------

FEATURE_COLUMNS = ("position", "text", "score", "normalized_score", "message_index", "start", "end", "token_positions")
TIDY_COLUMNS = ("item_id", "item_index", "status", "method", "granularity", "model_name", "prompt", "target",
                *FEATURE_COLUMNS, "error_type", "error_message", "result_json")


def record_rows(record: DatasetRecord) -> list[dict[str, Any]]:
    """The tidy rows of one record: one per feature of a result, one for a failure. ``result_json`` keeps what the
    columns do not (metadata, matrix), so the record can be rebuilt exactly; item metadata columns come last, a name
    that clashes with a tidy column prefixed with ``meta_``."""
    base: dict[str, Any] = dict.fromkeys(TIDY_COLUMNS)
    base.update(item_id=record.item_id, item_index=record.index)
    outcome = record.outcome
    if isinstance(outcome, BatchFailure):
        base.update(status="failed", error_type=outcome.error_type, error_message=outcome.message)
        rows = [base]
    else:
        rest = outcome.model_dump(mode="json", include={"matrix", "metadata", "messages"})
        base.update(status="ok", method=str(outcome.method), granularity=outcome.granularity.value,
                    model_name=outcome.model_name, prompt=outcome.prompt, target=outcome.target,
                    result_json=json.dumps(rest, ensure_ascii=False))
        rows = [{**base, **attribution.model_dump()} for attribution in outcome.attributions] or [base]
    extra = {(f"meta_{key}" if key in base else key): value for key, value in record.metadata.items()}
    return [{**row, **extra} for row in rows]


def rows_record(rows: list[dict[str, Any]]) -> DatasetRecord:
    """Rebuild the record from its tidy rows (the inverse of ``record_rows``)."""
    first = rows[0]
    metadata = {(key[5:] if key.startswith("meta_") and key[5:] in TIDY_COLUMNS else key): value
                for key, value in first.items() if key not in TIDY_COLUMNS}
    metadata = {key: value for key, value in metadata.items() if not _is_missing(value)}
    if first["status"] == "failed":
        outcome: Outcome = BatchFailure(index=first["item_index"], error_type=first["error_type"],
                                        message=first["error_message"])
    else:
        attributions = [{key: row[key] for key in FEATURE_COLUMNS} for row in rows if row["position"] is not None]
        for attribution in attributions:
            attribution["token_positions"] = list(attribution["token_positions"] or [])
        outcome = AttributionResult.model_validate({
            "prompt": first["prompt"], "target": first["target"], "method": first["method"],
            "granularity": first["granularity"], "model_name": first["model_name"],
            "attributions": attributions, **json.loads(first["result_json"]),
        })
    return DatasetRecord(int(first["item_index"]), first["item_id"], outcome, metadata)


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and value != value)


# ---- a batch result as records (``AttributionBatchResult.to_dataframe/save/load``) -----------------------------


def batch_records(batch: AttributionBatchResult) -> list[DatasetRecord]:
    """The records of a batch result, ordered by item index; an item's id is its index."""
    records = [DatasetRecord(index, str(index), result) for index, result in zip(_indices(batch), batch.results)]
    records += [DatasetRecord(failure.index, str(failure.index), failure) for failure in batch.failures]
    return sorted(records, key=lambda record: record.index)


def _indices(batch: AttributionBatchResult) -> list[int]:
    return list(batch.indices) if len(batch.indices) == len(batch.results) else list(range(len(batch.results)))


def batch_from_records(records: Iterable[DatasetRecord], model_name: Optional[str] = None,
                       seconds: float = 0.0) -> AttributionBatchResult:
    """Records (in any order) as a batch result ordered by item index."""
    ordered = sorted(records, key=lambda record: record.index)
    results = [record for record in ordered if not record.failed]
    if model_name is None:
        model_name = results[0].outcome.model_name if results else "unknown"
    return AttributionBatchResult(
        results=[record.outcome for record in results], indices=[record.index for record in results],
        failures=[record.outcome for record in ordered if record.failed], model_name=model_name,
        total_compute_time_seconds=seconds,
    )
