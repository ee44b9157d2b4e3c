"""Where dataset results go: one record per item (``core/records.py``), streamed to JSONL or Parquet and read back lazily.

An output is a committed file plus the parts staged beside it in ``<name>.parts/`` (``part-<run>-....parquet`` or
``.jsonl``, names that sort in write order and never repeat). A local JSONL run appends whole, flushed lines to the
committed file (a torn last line is dropped when it is reopened); a local Parquet run stages a complete small file per
``ITEMS_PER_PART`` records; ``engine="ray"`` has Ray's writers put parts of either format there. The final commit
merges the committed file and the parts into a new file, swapped in by rename, that names the parts it holds (Parquet
metadata, JSONL header); the parts are deleted after. Readers (``load_results``, ``done_ids``, ``stored_settings``)
see the committed file, then the parts it does not hold yet, and skip what a kill tore: a Parquet part without its
footer, a JSONL line without its newline. So a killed run leaves an output that loads and resumes, never a row twice.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Union

from ..errors import InvalidInputError
from ..core.records import SETTINGS_KEY, DatasetRecord, batch_records, record_rows, rows_record
from .tables import arrow_table
from ..core.types import AttributionBatchResult

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


def _run_id() -> str:
    """A run's part-name prefix: later runs sort later, and two runs never share it."""
    return f"{time.time_ns():020d}"


def stored_settings(path: Path) -> Optional[dict[str, Any]]:
    """The run settings an existing output was written with (None when there is no output)."""
    if output_format(path) == "jsonl":
        if not path.exists() or path.stat().st_size == 0:
            return None
        return _jsonl_header(path)["settings"]
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


def _jsonl_header(path: Path) -> dict[str, Any]:
    """The first line of a JSONL output: format version, run settings, and the parts its last commit merged."""
    with path.open(encoding="utf-8") as handle:
        header = handle.readline()
    try:
        data = json.loads(header)["fair_forge_dataset"]
    except (json.JSONDecodeError, KeyError, TypeError):
        data = None
    if not isinstance(data, dict) or "settings" not in data:
        raise InvalidInputError(f"{path} is not a fair_forge dataset output; choose another path")
    return data


def _whole_lines(file: Path, header: bool) -> Iterator[str]:
    """The lines of a JSONL file that a kill did not tear (with their newline), after its header if it has one."""
    with file.open(encoding="utf-8") as handle:
        if header:
            handle.readline()
        for line in handle:
            if line.endswith("\n"):
                yield line


def _jsonl_files(path: Path) -> list[tuple[Path, bool]]:
    """(file, has a header): the committed output (if any) then the staged parts it does not hold yet."""
    merged = set(_merged_parts(path))
    parts = [part for part in sorted(_parts_dir(path).glob("part-*.jsonl")) if part.name not in merged]
    return ([(path, True)] if path.exists() else []) + [(part, False) for part in parts]


class JsonlSink:
    """Appends one whole, flushed line per record after a header line with the run settings; ``close`` commits the
    parts Ray's writers staged (if any) into the output."""

    def __init__(self, path: Path, settings: dict[str, Any]) -> None:
        self.path = path
        self.settings = settings
        self.parts_dir = _parts_dir(path)
        self.run_id = _run_id()
        fresh = not path.exists() or path.stat().st_size == 0
        if not fresh:
            _drop_torn_tail(path)
            _drop_merged_parts(path)
        self._handle = path.open("a", encoding="utf-8")
        if fresh:
            self._write_line(json.dumps({"fair_forge_dataset": {"version": FORMAT_VERSION, "settings": settings}}))

    def done_ids(self) -> set[str]:
        return {json.loads(line)["item_id"] for file, header in _jsonl_files(self.path)
                for line in _whole_lines(file, header)}

    def _write_line(self, line: str) -> None:
        self._handle.write(line + "\n")
        self._handle.flush()

    def write(self, record: DatasetRecord) -> None:
        self._write_line(record.to_json())

    def close(self) -> None:
        """Close the output, then merge the staged parts (if any) into a new output, swapped in by rename."""
        self._handle.close()
        files = _jsonl_files(self.path)
        if len(files) > 1:
            header = _jsonl_header(self.path)
            header["merged_parts"] = [file.name for file, _ in files[1:]]
            staging = self.path.with_name(self.path.name + ".tmp")
            with staging.open("w", encoding="utf-8") as out:
                out.write(json.dumps({"fair_forge_dataset": header}) + "\n")
                for file, has_header in files:
                    out.writelines(_whole_lines(file, has_header))
            os.replace(staging, self.path)
        shutil.rmtree(self.parts_dir, ignore_errors=True)


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
        self.parts_dir = _parts_dir(path)
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        _drop_merged_parts(path)
        self.run_id = _run_id()  # part names never repeat, so a commit can say which ones it holds
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
        final = self.parts_dir / f"part-{self.run_id}-{self._next_part:06d}.parquet"
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
            shutil.rmtree(self.parts_dir, ignore_errors=True)
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
                for table in _item_ordered(file, committed=file == self.path):
                    writer.write_table(_conform(table, schema))
        os.replace(staging, self.path)
        shutil.rmtree(self.parts_dir, ignore_errors=True)


def _conform(table: Any, schema: Any) -> Any:
    """``table`` with every column of ``schema`` (missing ones null), in its order and types."""
    import pyarrow as pa

    columns = [table.column(f.name) if f.name in table.column_names else pa.nulls(len(table), f.type) for f in schema]
    return pa.table(columns, schema=schema).cast(schema)


def _merged_parts(path: Path) -> list[str]:
    """Names of the parts the committed output already holds (read from its metadata or header)."""
    import pyarrow.parquet as pq

    if not path.exists() or path.stat().st_size == 0:
        return []
    if output_format(path) == "jsonl":
        return _jsonl_header(path).get("merged_parts", [])
    return json.loads((pq.read_schema(path).metadata or {}).get(MERGED_KEY, b"[]"))


def _drop_merged_parts(path: Path) -> None:
    """Delete the parts a commit merged but was killed before it could delete."""
    for stale in _merged_parts(path):
        (_parts_dir(path) / stale).unlink(missing_ok=True)


def _parquet_files(path: Path) -> list[Path]:
    """The committed output (if any) then the whole staged parts it does not hold yet, in write order (a part a kill
    left without its footer is skipped: its items were not done)."""
    merged = set(_merged_parts(path))
    parts = [part for part in sorted(_parts_dir(path).glob("part-*.parquet")) if part.name not in merged]
    return ([path] if path.exists() else []) + [part for part in parts if _is_whole(part)]


def _is_whole(part: Path) -> bool:
    """Whether a staged Parquet part was written to its end: Ray's writer writes in place, the footer last."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pq.read_metadata(part)
    except (pa.ArrowInvalid, OSError):
        return False
    return True


def _item_ordered(file: Path, committed: bool) -> Iterator[Any]:
    """A Parquet file as tables with each item's rows together and in feature order. The committed file is read row
    group by row group, as written (its commit ordered it); a part is read whole (it is small) and sorted by item and
    position, because Ray's writer (pyarrow ``write_dataset`` with threads) does not promise to keep the row order."""
    import pyarrow.parquet as pq

    if committed:
        reader = pq.ParquetFile(file)
        yield from (reader.read_row_group(group) for group in range(reader.num_row_groups))
    else:
        yield pq.ParquetFile(file).read().sort_by([("item_index", "ascending"), ("position", "ascending")])


def count_failed(parts: Iterable[Path]) -> int:
    """How many records in these staged parts are failures (a failure is one line, or one tidy row)."""
    import pyarrow.parquet as pq

    failed = 0
    for part in parts:
        if part.suffix == ".jsonl":
            failed += sum("failure" in json.loads(line) for line in _whole_lines(part, header=False))
        elif _is_whole(part):
            failed += pq.ParquetFile(part).read(columns=["status"]).column("status").to_pylist().count("failed")
    return failed


Sink = Union[JsonlSink, ParquetSink]


def open_sink(path: Path, settings: dict[str, Any]) -> Sink:
    return JsonlSink(path, settings) if output_format(path) == "jsonl" else ParquetSink(path, settings)


# ---- reading back ------------------------------------------------------------------------------------------------


def load_results(path: Union[str, os.PathLike[str]]) -> Iterator[DatasetRecord]:
    """Iterate the records of a saved dataset output lazily: the committed file's in the order they were written,
    then the staged parts' (what a killed run tore, a JSONL line without its newline or a Parquet part without its
    footer, is skipped; a Parquet part is read in item order)."""
    path = Path(path)
    if output_format(path) == "jsonl":
        yield from _jsonl_records(path)
    else:
        yield from _parquet_records(path)


def _jsonl_records(path: Path) -> Iterator[DatasetRecord]:
    if not path.exists():
        raise InvalidInputError(f"no dataset output at {path}")
    for file, header in _jsonl_files(path):
        for line in _whole_lines(file, header):
            yield DatasetRecord.from_json(line)


def _parquet_records(path: Path) -> Iterator[DatasetRecord]:
    files = _parquet_files(path)
    if not files:
        raise InvalidInputError(f"no dataset output at {path}")
    for file in files:
        rows: list[dict[str, Any]] = []
        for table in _item_ordered(file, committed=file == path):
            for row in table.to_pylist():  # an item's rows are contiguous; a row group may cut them
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
