"""Where dataset results go: one record per item (``records.py``), streamed to JSONL or Parquet and read back lazily.

Crash safety: JSONL lines are written whole and flushed, and a torn last line is dropped when the file is reopened.
Parquet is staged as complete small files (one per flush) in ``<name>.parts/`` and merged into the output, row group
by row group, by the final commit, which swaps the new file in by rename and names the parts it holds in its
metadata; a killed run leaves the last committed file (which loads) and the staged parts (which ``load_results`` also
reads and a resumed run keeps), never a row twice.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterator, Optional, Union

from .errors import InvalidInputError
from .records import SETTINGS_KEY, DatasetRecord, arrow_table, batch_records, record_rows, rows_record
from .types import AttributionBatchResult

FORMAT_VERSION = 1
MERGED_KEY = b"fair_forge_merged_parts"
PARQUET_SUFFIXES = (".parquet", ".pq")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
ITEMS_PER_PART = 32  # items per staged Parquet file (a row group of the committed file): lost at most on a kill


# ---- sinks -------------------------------------------------------------------------------------------------------


def output_format(path: Path) -> str:
    """"jsonl" or "parquet" from the output path's suffix; a typed error for any other."""
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    raise InvalidInputError(f"output {path} must end in {JSONL_SUFFIXES + PARQUET_SUFFIXES} (the format follows it)")


def _parts_dir(path: Path) -> Path:
    return path.with_name(path.name + ".parts")


def stored_settings(path: Path) -> Optional[dict[str, Any]]:
    """The run settings an existing output was written with (None when there is no output)."""
    if output_format(path) == "jsonl":
        if not path.exists() or path.stat().st_size == 0:
            return None
        with path.open(encoding="utf-8") as handle:
            header = handle.readline()
        try:
            return json.loads(header)["fair_forge_dataset"]["settings"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise InvalidInputError(f"{path} is not a fair_forge dataset output; choose another path") from None
    import pyarrow.parquet as pq

    for file in _parquet_files(path):
        metadata = pq.read_schema(file).metadata or {}
        if SETTINGS_KEY not in metadata:
            raise InvalidInputError(f"{file} is not a fair_forge dataset output; choose another path")
        return json.loads(metadata[SETTINGS_KEY])
    return None


def remove_output(path: Path) -> None:
    """Delete an output and its staged parts (``overwrite=True``)."""
    path.unlink(missing_ok=True)
    shutil.rmtree(_parts_dir(path), ignore_errors=True)


class JsonlSink:
    """Appends one whole, flushed line per record after a header line with the run settings."""

    def __init__(self, path: Path, settings: dict[str, Any]) -> None:
        self.path = path
        fresh = not path.exists() or path.stat().st_size == 0
        if not fresh:
            _drop_torn_tail(path)
        self._handle = path.open("a", encoding="utf-8")
        if fresh:
            self._write_line(json.dumps({"fair_forge_dataset": {"version": FORMAT_VERSION, "settings": settings}}))

    def done_ids(self) -> set[str]:
        with self.path.open(encoding="utf-8") as handle:
            handle.readline()  # the settings header
            return {json.loads(line)["item_id"] for line in handle}

    def _write_line(self, line: str) -> None:
        self._handle.write(line + "\n")
        self._handle.flush()

    def write(self, record: DatasetRecord) -> None:
        self._write_line(record.to_json())

    def close(self) -> None:
        self._handle.close()


def _drop_torn_tail(path: Path) -> None:
    """Cut a last line that a killed run left without its newline."""
    with path.open("rb+") as handle:
        size = handle.seek(0, os.SEEK_END)
        if size == 0:
            return
        handle.seek(size - 1)
        if handle.read(1) == b"\n":
            return
        position = size
        while position > 0:
            step = min(65536, position)
            handle.seek(position - step)
            chunk = handle.read(step)
            newline = chunk.rfind(b"\n")
            if newline >= 0:
                handle.truncate(position - step + newline + 1)
                return
            position -= step
        handle.truncate(0)


class ParquetSink:
    """Stages every ``ITEMS_PER_PART`` records as a complete Parquet file; ``close`` commits them into the output."""

    def __init__(self, path: Path, settings: dict[str, Any], items_per_part: int = ITEMS_PER_PART) -> None:
        self.path = path
        self.settings = settings
        self.items_per_part = items_per_part
        self._parts = _parts_dir(path)
        self._parts.mkdir(parents=True, exist_ok=True)
        for stale in _merged_parts(path):  # merged by a commit that was killed before it could delete them
            (self._parts / stale).unlink(missing_ok=True)
        self._run = f"{time.time_ns():020d}"  # part names never repeat, so a commit can say which ones it holds
        self._next_part = 0
        self._rows: list[dict[str, Any]] = []
        self._items = 0

    def done_ids(self) -> set[str]:
        import pyarrow.parquet as pq

        return {item for file in _parquet_files(self.path)
                for item in pq.read_table(file, columns=["item_id"]).column("item_id").to_pylist()}

    def write(self, record: DatasetRecord) -> None:
        self._rows.extend(record_rows(record))
        self._items += 1
        if self._items >= self.items_per_part:
            self._flush()

    def _flush(self) -> None:
        import pyarrow.parquet as pq

        if not self._rows:
            return
        final = self._parts / f"part-{self._run}-{self._next_part:06d}.parquet"
        staging = final.with_suffix(".tmp")
        pq.write_table(arrow_table(self._rows, self.settings), staging)
        os.replace(staging, final)  # a part exists whole or not at all
        self._next_part += 1
        self._rows, self._items = [], 0

    def close(self) -> None:
        """Flush, then merge the committed output and the parts into a new output, swapped in by rename."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        self._flush()
        sources = _parquet_files(self.path)
        if self.path.exists() and len(sources) == 1:
            shutil.rmtree(self._parts, ignore_errors=True)
            return
        schemas = [pq.read_schema(file) for file in sources]
        if not schemas:
            schemas = [arrow_table([], self.settings).schema]
        schema = pa.unify_schemas(schemas, promote_options="permissive")
        merged = [file.name for file in sources if file != self.path]
        schema = schema.with_metadata({SETTINGS_KEY: json.dumps(self.settings, sort_keys=True),
                                       MERGED_KEY: json.dumps(merged)})
        staging = self.path.with_name(self.path.name + ".tmp")
        with pq.ParquetWriter(staging, schema) as writer:
            for file in sources:
                reader = pq.ParquetFile(file)
                for group in range(reader.num_row_groups):
                    writer.write_table(_conform(reader.read_row_group(group), schema))
        os.replace(staging, self.path)
        shutil.rmtree(self._parts, ignore_errors=True)


def _conform(table: Any, schema: Any) -> Any:
    """``table`` with every column of ``schema`` (missing ones null), in its order and types."""
    import pyarrow as pa

    columns = [table.column(f.name) if f.name in table.column_names else pa.nulls(len(table), f.type) for f in schema]
    return pa.table(columns, schema=schema).cast(schema)


def _merged_parts(path: Path) -> list[str]:
    """Names of the parts the committed output already holds (read from its metadata)."""
    import pyarrow.parquet as pq

    if not path.exists():
        return []
    return json.loads((pq.read_schema(path).metadata or {}).get(MERGED_KEY, b"[]"))


def _parquet_files(path: Path) -> list[Path]:
    """The committed output (if any) then the staged parts it does not hold yet, in write order."""
    merged = set(_merged_parts(path))
    parts = [part for part in sorted(_parts_dir(path).glob("part-*.parquet")) if part.name not in merged]
    return ([path] if path.exists() else []) + parts


Sink = Union[JsonlSink, ParquetSink]


def open_sink(path: Path, settings: dict[str, Any]) -> Sink:
    return JsonlSink(path, settings) if output_format(path) == "jsonl" else ParquetSink(path, settings)


# ---- reading back ------------------------------------------------------------------------------------------------


def load_results(path: Union[str, os.PathLike[str]]) -> Iterator[DatasetRecord]:
    """Iterate the records of a saved dataset output lazily, in the order they were written (a torn JSONL line at
    the end, left by a killed run, is skipped; staged Parquet parts are read after the committed file)."""
    path = Path(path)
    if output_format(path) == "jsonl":
        yield from _jsonl_records(path)
    else:
        yield from _parquet_records(path)


def _jsonl_records(path: Path) -> Iterator[DatasetRecord]:
    if not path.exists():
        raise InvalidInputError(f"no dataset output at {path}")
    with path.open(encoding="utf-8") as handle:
        handle.readline()  # the settings header
        for line in handle:
            if line.endswith("\n"):
                yield DatasetRecord.from_json(line)


def _parquet_records(path: Path) -> Iterator[DatasetRecord]:
    import pyarrow.parquet as pq

    files = _parquet_files(path)
    if not files:
        raise InvalidInputError(f"no dataset output at {path}")
    for file in files:
        rows: list[dict[str, Any]] = []
        for batch in pq.ParquetFile(file).iter_batches():
            for row in batch.to_pylist():  # an item's rows are contiguous; a batch may cut them
                if rows and (row["item_id"], row["item_index"]) != (rows[0]["item_id"], rows[0]["item_index"]):
                    yield rows_record(rows)
                    rows = []
                rows.append(row)
        if rows:
            yield rows_record(rows)


def save_batch(batch: AttributionBatchResult, path: Union[str, os.PathLike[str]]) -> Path:
    """Write a batch result to a new JSONL or Parquet file (replacing one that is there); returns the path."""
    path = Path(path)
    output_format(path)
    remove_output(path)
    sink = open_sink(path, {"saved": "AttributionBatchResult", "model_name": batch.model_name})
    try:
        for record in batch_records(batch):
            sink.write(record)
    finally:
        sink.close()
    return path
