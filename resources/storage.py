"""Where the pipeline's tables, artefacts and reports live."""

from __future__ import annotations

from pathlib import Path
from contextlib import contextmanager
from typing import Iterable, Iterator, Sequence

import dagster as dg
import numpy as np
import polars as pl

from curation_assets.core import delta


class DeltaStorage(dg.ConfigurableResource):
    """The data root: Delta tables under ``<root>/delta/<asset>``, model artefacts under
    ``<root>/artifacts/<asset>``, HTML pages under ``<root>/reports``.

    Heavy assets write their own tables through this resource (a shard at a time) instead of an IO
    manager, which would overwrite whole tables on ranged backfills.
    """

    root: str = "data"

    @property
    def root_path(self) -> Path:
        return Path(self.root).expanduser().resolve()

    def table_path(self, name: str) -> Path:
        return self.root_path / "delta" / name

    def artifact_dir(self, name: str) -> Path:
        path = self.root_path / "artifacts" / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def reports_dir(self) -> Path:
        path = self.root_path / "reports"
        path.mkdir(parents=True, exist_ok=True)
        return path

    @contextmanager
    def locked(self, name: str) -> Iterator[None]:
        """An exclusive lock on ``name`` between processes on this machine (``<root>/locks``), for a
        read-then-append that must not interleave with another (taking the next label round)."""
        import fcntl

        directory = self.root_path / "locks"
        directory.mkdir(parents=True, exist_ok=True)
        with open(directory / f"{name}.lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def exists(self, name: str) -> bool:
        return delta.table_exists(self.table_path(name))

    def write_shard(self, name: str, df: pl.DataFrame, shard: str) -> int:
        return delta.write_shard(self.table_path(name), df, shard)

    def replace_where(self, name: str, df: pl.DataFrame, column: str, value: str | int) -> int:
        """Replace the rows of one key (``column = value``) of a table partitioned by ``column``."""
        return delta.replace_where(self.table_path(name), df, column, value)

    def delete_where(self, name: str, column: str, value: str | int) -> None:
        delta.delete_where(self.table_path(name), column, value)

    def tables(self) -> list[str]:
        """The names of the Delta tables under the root."""
        directory = self.root_path / "delta"
        return sorted(p.name for p in directory.iterdir() if delta.table_exists(p)) if directory.is_dir() else []

    def delete_shard(self, shard: str) -> list[str]:
        """Delete one shard's rows from every table with a ``shard`` column; returns the tables touched."""
        touched = []
        for name in self.tables():
            if "shard" in self.scan(name).collect_schema().names():
                self.delete_where(name, "shard", shard)
                touched.append(name)
        return touched

    def maintain(self, retention_hours: int) -> dict[str, dict]:
        """Compact and vacuum every table (:func:`curation_assets.core.delta.maintain`), per table."""
        return {name: delta.maintain(self.table_path(name), retention_hours) for name in self.tables()}

    def write_table(self, name: str, df: pl.DataFrame, partition_by: Sequence[str] | None = None) -> int:
        return delta.write_table(self.table_path(name), df, partition_by)

    def append(self, name: str, df: pl.DataFrame, partition_by: Sequence[str] | None = None) -> int:
        return delta.append(self.table_path(name), df, partition_by)

    def scan(self, name: str, shards: Iterable[str] | None = None) -> pl.LazyFrame:
        return delta.scan(self.table_path(name), shards)

    def read(self, name: str, shards: Iterable[str] | None = None, columns: Sequence[str] | None = None) -> pl.DataFrame:
        return delta.read(self.table_path(name), shards, columns)

    def shards(self, name: str) -> list[str]:
        return delta.shards_in(self.table_path(name))

    def load_embeddings(self, shards: Iterable[str] | None = None) -> tuple[pl.DataFrame, np.ndarray]:
        return delta.load_embeddings(self.table_path("image_embeddings"), shards)
