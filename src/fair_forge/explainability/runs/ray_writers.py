"""Ray's writers for ``engine="ray"`` (imported only once Ray is known to be there): part names, and the JSONL
datasink. Parquet parts are written by ``Dataset.write_parquet`` itself (``ray_engine.py``)."""

from __future__ import annotations

from typing import Any

from ray.data.block import BlockAccessor
from ray.data.datasource import BlockBasedFileDatasink, FilenameProvider


class PartNames(FilenameProvider):
    """``<prefix>-<write task>-<write uuid>.<format>``: the prefix (``part-<run>-<window>``) makes names sort in write
    order, the uuid (which Ray requires in the names of Parquet files it appends) keeps them from ever repeating.
    Ray's Parquet writer adds ``-<file number>`` before the suffix."""

    def __init__(self, prefix: str, file_format: str) -> None:
        super().__init__(file_format=file_format)
        self.prefix = prefix

    def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
        return f"{self.prefix}-{task_index:06d}-{write_uuid}.{self.file_format}"


class JsonlParts(BlockBasedFileDatasink):
    """One part file per write task holding the ``record`` column of its rows, one line each: the same lines a
    local run appends (``DatasetRecord.to_json``)."""

    def __init__(self, folder: str, names: PartNames, min_items_per_part: int) -> None:
        super().__init__(folder, filename_provider=names, min_rows_per_file=min_items_per_part, file_format="jsonl")

    def write_block_to_file(self, block: BlockAccessor, file: Any) -> None:
        lines = block.to_arrow().column("record").to_pylist()
        file.write("".join(line + "\n" for line in lines).encode("utf-8"))
