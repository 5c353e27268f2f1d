"""Where the pipeline's tables, artefacts and reports live."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

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

    def exists(self, name: str) -> bool:
        return delta.table_exists(self.table_path(name))

    def write_shard(self, name: str, df: pl.DataFrame, shard: str) -> int:
        return delta.write_shard(self.table_path(name), df, shard)

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
