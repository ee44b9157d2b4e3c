"""Dataset sources: rows read lazily from iterables, DataFrames, Hugging Face datasets and JSONL/CSV/Parquet files,
mapped by column name to a chat or a prompt, a target (or none: the model answers) and metadata, each with a
stable id.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional

from ..errors import InvalidInputError
from ..core.records import DatasetRecord
from ..core.types import BatchFailure

DEFAULT_COLUMNS: dict[str, tuple[str, ...]] = {
    "messages": ("messages",),
    "prompt": ("prompt",),
    "question": ("question",),
    "system": ("system", "context"),
    "target": ("target", "answer", "response"),
    "contrast_target": ("contrast_target",),
    "counterfactual": ("counterfactual",),
}
SOURCE_SUFFIXES = (".jsonl", ".ndjson", ".csv", ".parquet", ".pq")
ROWS_PER_READ = 1024  # rows taken at a time from a DataFrame or a Parquet file


# ---- items -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetItem:
    """One source row mapped to what the engine needs, or the reason it could not be (``error``)."""

    index: int
    item_id: str
    messages: Optional[list[dict[str, str]]] = None
    prompt: Optional[str] = None
    target: Optional[str] = None  # None: the model generates it
    metadata: dict[str, Any] = field(default_factory=dict)
    error: Optional[BatchFailure] = None
    contrast_target: Optional[str] = None
    counterfactual: Any = None  # x': messages (for a chat item) or a prompt

    def request(self, target: str) -> dict[str, Any]:
        """The item as ``iter_explain`` takes it."""
        extras = {name: value for name in ("contrast_target", "counterfactual")
                  if (value := getattr(self, name)) is not None}
        if self.messages is not None:
            return {"messages": self.messages, "target": target, **extras}
        return {"prompt": self.prompt, "target": target, **extras}

    def failed(self, error: BaseException) -> DatasetRecord:
        failure = BatchFailure(index=self.index, error_type=type(error).__name__, message=str(error))
        return DatasetRecord(self.index, self.item_id, failure, self.metadata)

    def to_json(self) -> str:
        """The item as JSON text (how the Ray engine hands it to its actors)."""
        error = self.error.model_dump(mode="json") if self.error is not None else None
        return json.dumps({**vars(self), "error": error}, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> "DatasetItem":
        data = json.loads(text)
        error = BatchFailure.model_validate(data["error"]) if data["error"] is not None else None
        return cls(**{**data, "error": error})


@dataclass(frozen=True)
class ColumnMap:
    """Which source column holds each field; an unset field takes the first of its default names a row has."""

    messages: Optional[str] = None
    prompt: Optional[str] = None
    question: Optional[str] = None
    system: Optional[str] = None
    target: Optional[str] = None
    id: Optional[str] = None
    contrast_target: Optional[str] = None
    counterfactual: Optional[str] = None

    def candidates(self, name: str) -> tuple[str, ...]:
        chosen = getattr(self, name)
        return (chosen,) if chosen is not None else DEFAULT_COLUMNS[name]

    def named(self) -> list[str]:
        """The column names the user gave explicitly (they must exist)."""
        return [value for value in vars(self).values() if value is not None]


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _pick(row: Mapping[str, Any], columns: ColumnMap, name: str) -> tuple[Optional[str], Any]:
    for column in columns.candidates(name):
        if column in row and not _missing(row[column]):
            return column, row[column]
    return None, None


def _as_row(raw: Any) -> Mapping[str, Any]:
    """A source item as a column -> value mapping: a (messages_or_prompt, target) pair or a bare question string
    becomes the matching columns."""
    if isinstance(raw, Mapping):
        return raw
    if isinstance(raw, str):
        return {"question": raw}
    if isinstance(raw, (tuple, list)) and len(raw) == 2:
        source, target = raw
        return {"prompt" if isinstance(source, str) else "messages": source, "target": target}
    raise InvalidInputError(f"an item must be a dict, a (messages_or_prompt, target) pair or a string, got {raw!r}")


def _map_row(row: Mapping[str, Any], columns: ColumnMap, generate: bool) -> dict[str, Any]:
    """messages / prompt / target / metadata of one row; a typed error naming what is missing or malformed."""
    used: list[Optional[str]] = [columns.id]
    source, messages = _pick(row, columns, "messages")
    used.append(source)
    prompt = None
    if messages is not None:
        if isinstance(messages, str):  # a chat stored as JSON text (CSV, some JSONL exports)
            try:
                messages = json.loads(messages)
            except json.JSONDecodeError:
                raise InvalidInputError(f"column {source!r} holds text that is not a JSON list of messages") from None
        messages = [dict(message) if isinstance(message, Mapping) else message for message in list(messages)]
    else:
        prompt_column, prompt = _pick(row, columns, "prompt")
        question_column, question = _pick(row, columns, "question")
        used += [prompt_column, question_column]
        if prompt is None and question is None:
            wanted = [*columns.candidates("messages"), *columns.candidates("prompt"), *columns.candidates("question")]
            raise InvalidInputError(f"row has none of the input columns {wanted}; its columns are {sorted(row)}")
        if prompt is None:
            messages = [{"role": "user", "content": question}]
    system_column, system = _pick(row, columns, "system")
    if system is not None:
        used.append(system_column)
        if messages is None:
            raise InvalidInputError(f"column {system_column!r} (a system message) needs a chat, not a raw prompt")
        messages = [{"role": "system", "content": system}, *messages]
    target_column, target = _pick(row, columns, "target")
    contrast_column, contrast_target = _pick(row, columns, "contrast_target")
    counterfactual_column, counterfactual = _pick(row, columns, "counterfactual")
    used += [target_column, contrast_column, counterfactual_column]
    if counterfactual is not None:
        counterfactual = _counterfactual(counterfactual, counterfactual_column, messages, system)
    metadata = {key: value for key, value in row.items() if key not in used and _is_scalar(value)}
    if generate and target is not None:
        metadata["reference_target"] = target  # the dataset's own answer, kept beside the model's
        target = None
    metadata["target_generated"] = target is None
    return {"messages": messages, "prompt": prompt, "target": target, "metadata": metadata,
            "contrast_target": contrast_target, "counterfactual": counterfactual}


def _counterfactual(value: Any, column: Optional[str], messages: Optional[list[Any]], system: Any) -> Any:
    """x' of a row: a prompt for a prompt item; for a chat item a list of messages (or its JSON text), or a plain
    string that stands for the user's message (as a ``question`` column does, after the row's system message)."""
    if messages is None:
        return value
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return ([{"role": "system", "content": system}] if system is not None else []) + \
                [{"role": "user", "content": value}]
    if not isinstance(value, (list, tuple)):
        raise InvalidInputError(f"column {column!r} must hold the counterfactual's messages or its question")
    return [dict(message) if isinstance(message, Mapping) else message for message in value]


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (str, bool, int, float)) and not _missing(value)


def _content_id(index: int, content: Any, settings_digest: str) -> str:
    text = json.dumps({"index": index, "content": content, "settings": settings_digest}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]


def iter_items(rows: Iterable[Any], columns: ColumnMap, generate: bool, settings_digest: str) -> Iterator[DatasetItem]:
    """Map source rows to items, lazily; a row that cannot be mapped becomes an item with its ``error`` set."""
    seen_ids: set[str] = set()  # only for user ids: hashed ids hold the index, so they cannot repeat
    for index, raw in enumerate(rows):
        try:
            if isinstance(raw, BaseException):  # a line of a file that did not parse
                raise raw
            row = _as_row(raw)
            fields = _map_row(row, columns, generate)
            if columns.id is not None:
                if _missing(row.get(columns.id)):
                    raise InvalidInputError(f"row has no value in the id column {columns.id!r}")
                item_id = str(row[columns.id])
                if item_id in seen_ids:
                    raise InvalidInputError(f"id {item_id!r} (column {columns.id!r}) was already used by another row")
                seen_ids.add(item_id)
            else:
                content = {key: fields[key] for key in ("messages", "prompt", "target")}
                content.update({key: fields[key] for key in ("contrast_target", "counterfactual")
                                if fields[key] is not None})
                item_id = _content_id(index, content, settings_digest)
            yield DatasetItem(index, item_id, fields["messages"], fields["prompt"], fields["target"],
                              fields["metadata"], contrast_target=fields["contrast_target"],
                              counterfactual=fields["counterfactual"])
        except Exception as error:  # noqa: BLE001 - recorded per item; nothing the user gave is lost
            failure = BatchFailure(index=index, error_type=type(error).__name__, message=str(error))
            yield DatasetItem(index, _content_id(index, repr(raw), settings_digest), error=failure)


# ---- sources ---------------------------------------------------------------------------------------------------


def iter_source(source: Any, columns: ColumnMap) -> Iterator[Any]:
    """The rows of ``source``, read lazily. Column names the user gave are checked up front where the source
    knows its columns (DataFrame, Hugging Face dataset, Parquet, CSV)."""
    if isinstance(source, (str, os.PathLike)):
        return _file_rows(Path(source), columns)
    if hasattr(source, "to_dict") and hasattr(source, "columns"):  # pandas DataFrame
        _check_columns(list(source.columns), columns, "the DataFrame")
        return (row for start in range(0, len(source), ROWS_PER_READ)
                for row in source.iloc[start : start + ROWS_PER_READ].to_dict(orient="records"))
    names = getattr(source, "column_names", None)  # Hugging Face Dataset / IterableDataset (when known)
    if isinstance(names, list):
        _check_columns(names, columns, "the dataset")
    if isinstance(source, (bytes, Mapping)) or not isinstance(source, Iterable):
        raise InvalidInputError(
            "source must be an iterable of items, a pandas DataFrame, a Hugging Face dataset or a path to a "
            f"{'/'.join(SOURCE_SUFFIXES)} file; got {type(source).__name__}"
        )
    return iter(source)


def _check_columns(available: list[str], columns: ColumnMap, where: str) -> None:
    absent = [name for name in columns.named() if name not in available]
    if absent:
        raise InvalidInputError(f"{where} has no column(s) {absent}; its columns are {available}")


def _file_rows(path: Path, columns: ColumnMap) -> Iterator[Any]:
    suffix = path.suffix.lower()
    if suffix not in SOURCE_SUFFIXES:
        raise InvalidInputError(f"input {path} must end in one of {SOURCE_SUFFIXES}")
    if not path.is_file():
        raise InvalidInputError(f"input {path} does not exist")
    if suffix in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        reader = pq.ParquetFile(path)
        _check_columns(reader.schema_arrow.names, columns, str(path))
        return (row for batch in reader.iter_batches(batch_size=ROWS_PER_READ) for row in batch.to_pylist())
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as handle:
            header = next(csv.reader(handle), [])
        _check_columns(header, columns, str(path))
        return _csv_rows(path)
    return _jsonl_rows(path)


def _csv_rows(path: Path) -> Iterator[dict[str, Any]]:
    with path.open(newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            yield {key: (None if value == "" else value) for key, value in row.items()}


def _jsonl_rows(path: Path) -> Iterator[Any]:
    """One row per non-blank line; a line that is not JSON is passed on as the error, to be recorded."""
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as error:
                yield InvalidInputError(f"{path.name} line {number} is not valid JSON: {error.msg}")
