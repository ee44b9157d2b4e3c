"""The tidy long table of records as Arrow (what Parquet outputs hold) and as a pandas DataFrame."""

from __future__ import annotations

import json
from typing import Any, Iterable

from ..core.records import SETTINGS_KEY, TIDY_COLUMNS, DatasetRecord, record_rows


def records_dataframe(records: Iterable[DatasetRecord]) -> Any:
    """The tidy long table of ``records`` as a pandas DataFrame."""
    import pandas as pd
    import pyarrow as pa

    rows = [row for record in records for row in record_rows(record)]
    return arrow_table(rows, {}).to_pandas(types_mapper={pa.int64(): pd.Int64Dtype()}.get)


def arrow_table(rows: list[dict[str, Any]], settings: dict[str, Any]) -> Any:
    import pyarrow as pa

    fixed = pa.schema([
        ("item_id", pa.string()), ("item_index", pa.int64()), ("status", pa.string()), ("method", pa.string()),
        ("granularity", pa.string()), ("model_name", pa.string()), ("prompt", pa.string()), ("target", pa.string()),
        ("position", pa.int64()), ("text", pa.string()), ("score", pa.float64()), ("normalized_score", pa.float64()),
        ("message_index", pa.int64()), ("start", pa.int64()), ("end", pa.int64()),
        ("token_positions", pa.list_(pa.int64())), ("error_type", pa.string()), ("error_message", pa.string()),
        ("result_json", pa.string()),
    ])
    columns = {name: pa.array([row[name] for row in rows], type=fixed.field(name).type) for name in TIDY_COLUMNS}
    for name in dict.fromkeys(key for row in rows for key in row if key not in columns):
        columns[name] = pa.array([row.get(name) for row in rows])
    table = pa.table(columns)
    return table.replace_schema_metadata({SETTINGS_KEY: json.dumps(settings, sort_keys=True)})
