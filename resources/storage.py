"""Where the pipeline's tables, artefacts and reports live."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

import dagster as dg
import numpy as np
import polars as pl

from curation_assets.core import delta
from curation_assets.core.location import as_path, is_uri, local_state_dir, write_atomic
from curation_assets.core.locks import file_lock


NOT_COMPACTED = frozenset({"cluster_assignments"})
"""Tables whose data files carry meaning: each file of ``cluster_assignments`` holds one shard's rows of one
bucket, which is how ``duplicate_pairs`` tells which buckets a new shard touched and searches only their new
rows; compacting them would make the next search a full one."""

COLUMN_DOCS = {
    "uid": "sample id: '{shard}/{key}'",
    "shard": "the tar shard (partition key)",
    "key": "the member key inside the tar",
    "sha256": "sha256 of the image bytes: names the picture, not its position",
    "status": "ok, or rejected at ingest (see error)",
    "error": "why the sample was rejected",
    "encoder": "name and version of the encoder that made the vector",
    "embedding": "L2-normalised image embedding (List(Float32))",
    "kept": "true when the sample stays at this stage",
    "reasons": "the categories (or 'rejected', 'no_embedding') that removed the sample",
    "verdict": "final verdict: kept, duplicate, filtered, rejected, not_embedded or pending",
    "weight": "training weight (kept rows; mean 1)",
    "group_id": "duplicate group (its smallest uid)",
    "representative_uid": "the member kept for the group",
    "score": "calibrated classifier score in [0, 1]",
    "threshold": "the recall-first threshold the score was judged by",
    "category": "safety category",
    "stage": "funnel stage the row measures",
    "value": "share or ratio",
    "low": "lower end of the 95% interval",
    "high": "upper end of the 95% interval",
    "change_vs_raw": "relative change against the raw stage of the same shards",
    "source_version": "version of the attribute source (word lists or prompts)",
    "clustering": "which of the five k-means clusterings",
    "cluster": "fine cluster in that clustering (inside its bucket)",
    "bucket": "coarse k-means cell of that clustering: the unit duplicate_pairs reads and searches",
    "vector": "the embedding packed little-endian (float32, or float16 with dedup.buckets.vector_dtype)",
    "similarity": "cosine similarity",
    "verified": "the pair passed pixel verification",
    "sha256_a": "sha256 of uid_a's image when it was verified",
    "sha256_b": "sha256 of uid_b's image when it was verified",
    "verify_version": "digest of the verify settings that decided the verdict",
}


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return str(value)


class DeltaStorage(dg.ConfigurableResource):
    """The data root: Delta tables under ``<root>/delta/<asset>``, model artefacts under
    ``<root>/artifacts/<asset>``, HTML pages under ``<root>/reports``. ``root`` is a local path or an
    object-store URI (``s3://bucket/prefix``, see :mod:`curation_assets.core.location`): tables are written
    with delta-rs's object store (its conditional puts make concurrent commits safe on S3, MinIO and R2),
    artefacts and pages through fsspec.

    Heavy assets write their own tables through this resource (a shard at a time) instead of an IO
    manager, which would overwrite whole tables on ranged backfills.
    """

    root: str = "data"

    @property
    def root_path(self):
        """A ``Path`` for a local root, a ``UPath`` for an object-store root."""
        return as_path(self.root)

    @property
    def on_object_store(self) -> bool:
        return is_uri(self.root)

    def table_path(self, name: str):
        return self.root_path / "delta" / name

    def artifact_dir(self, name: str) -> Path:
        path = self.root_path / "artifacts" / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def reports_dir(self) -> Path:
        path = self.root_path / "reports"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def locked(self, name: str):
        """An exclusive lock on ``name`` between processes on this machine (``<root>/locks``), for a
        read-then-append that must not interleave with another (taking the next label round)."""
        return file_lock(local_state_dir(self.root) / "locks" / f"{name}.lock")

    def exists(self, name: str) -> bool:
        return delta.table_exists(self.table_path(name))

    def write_shard(self, name: str, df: pl.DataFrame, shard: str, partition_by: Sequence[str] | None = None) -> int:
        """Replace one shard's rows (see :func:`curation_assets.core.delta.write_shard`)."""
        return delta.write_shard(self.table_path(name), df, shard, partition_by)

    def partition_files(self, name: str, stats: Sequence[str] = ()) -> pl.DataFrame:
        return delta.partition_files(self.table_path(name), stats)

    def read_files(self, name: str, files: Sequence[str], columns: Sequence[str], where: pl.Expr | None = None
                   ) -> pl.DataFrame:
        return delta.read_files(self.table_path(name), files, columns, where)

    def replace_where(self, name: str, df: pl.DataFrame, column: str, value: str | int) -> int:
        """Replace the rows of one key (``column = value``) of a table partitioned by ``column``."""
        return delta.replace_where(self.table_path(name), df, column, value)

    def replace_in(self, name: str, df: pl.DataFrame, column: str, values: Sequence[str | int]) -> int:
        """Replace the rows of several keys of a small unpartitioned table (one row per key)."""
        return delta.replace_in(self.table_path(name), df, column, values)

    def read_if_exists(self, name: str) -> pl.DataFrame | None:
        """A whole table, or None when its stage has not run (or wrote nothing readable): for report and
        audit code that must not break on a missing or foreign upstream table."""
        try:
            return self.read(name) if self.exists(name) else None
        except Exception:  # a half-written or foreign table must not break a report
            return None

    def write_json(self, asset: str, payload: dict, name: str = "summary.json") -> Path:
        """A small JSON artefact of ``asset`` (numpy numbers become plain numbers)."""
        path = self.artifact_dir(asset) / name
        write_atomic(path, json.dumps(payload, indent=2, default=_json_default).encode())
        return path

    def read_json(self, asset: str, name: str = "summary.json") -> dict | None:
        """A JSON artefact written by :meth:`write_json`, or None when there is none."""
        try:
            return json.loads((self.root_path / "artifacts" / asset / name).read_text())
        except (OSError, ValueError):
            return None

    def table_metadata(self, name: str, report_section: str | None = None) -> dict:
        """What the Dagster UI shows for a table an asset wrote: its column schema (``dagster/column_schema``,
        so the catalog documents the contract), where it is, and a link to its section of the curation
        report. Empty when the table does not exist (an asset awaiting labels writes none)."""
        if not self.exists(name):
            return {}
        schema = self.scan(name).collect_schema()
        out = {
            "dagster/column_schema": dg.TableSchema(columns=[
                dg.TableColumn(column, str(dtype), description=COLUMN_DOCS.get(column)) for column, dtype in schema.items()]),
            "table": dg.MetadataValue.path(str(self.table_path(name))),
        }
        if report_section:
            page = self.root_path / "reports" / "curation_report.html"
            out["report"] = dg.MetadataValue.url(f"{page.as_uri() if not self.on_object_store else page}#{report_section}")
        return out

    def delete_where(self, name: str, column: str, value: str | int) -> None:
        delta.delete_where(self.table_path(name), column, value)

    def tables(self) -> list[str]:
        """The names of the Delta tables under the root."""
        directory = self.root_path / "delta"
        if not directory.is_dir():
            return []
        return sorted(p.name for p in directory.iterdir()
                      if p.is_dir() and not p.name.startswith(".") and delta.table_exists(p))

    def shard_tables(self) -> list[str]:
        """The tables with a ``shard`` column (per-shard tables and global tables that name the shard)."""
        return [name for name in self.tables() if "shard" in self.scan(name).collect_schema().names()]

    def delete_shard(self, shard: str) -> list[str]:
        """Delete one shard's rows from every table with a ``shard`` column; returns the tables touched."""
        touched = self.shard_tables()
        for name in touched:
            self.delete_where(name, "shard", shard)
        return touched

    def maintain(self, retention_hours: int) -> dict[str, dict]:
        """Compact and vacuum every table (:func:`curation_assets.core.delta.maintain`), per table. Tables in
        :data:`NOT_COMPACTED` are only vacuumed."""
        return {name: delta.maintain(self.table_path(name), retention_hours, compact=name not in NOT_COMPACTED)
                for name in self.tables()}

    def write_table(self, name: str, df: pl.DataFrame, partition_by: Sequence[str] | None = None) -> int:
        return delta.write_table(self.table_path(name), df, partition_by)

    def write_table_streamed(self, name: str, frames, schema: dict, partition_by: Sequence[str] | None = None) -> int:
        """Replace a whole table from an iterator of frames, in one commit (bounded memory)."""
        return delta.write_table_streamed(self.table_path(name), frames, schema, partition_by)

    def append(self, name: str, df: pl.DataFrame, partition_by: Sequence[str] | None = None) -> int:
        return delta.append(self.table_path(name), df, partition_by)

    def scan(self, name: str, shards: Iterable[str] | None = None) -> pl.LazyFrame:
        return delta.scan(self.table_path(name), shards)

    def read(self, name: str, shards: Iterable[str] | None = None, columns: Sequence[str] | None = None) -> pl.DataFrame:
        return delta.read(self.table_path(name), shards, columns)

    def shards(self, name: str) -> list[str]:
        return delta.shards_in(self.table_path(name))

    def embedding_shape(self) -> tuple[int, int]:
        """``(rows, dimension)`` of ``image_embeddings`` without loading it ((0, 0) when empty)."""
        lf = self.scan("image_embeddings")
        n = int(lf.select(pl.len()).collect().item())
        dim = int(lf.select(pl.col("embedding").list.len()).head(1).collect().item()) if n else 0
        return n, dim

    def load_embeddings(self, shards: Iterable[str] | None = None) -> tuple[pl.DataFrame, np.ndarray]:
        return delta.load_embeddings(self.table_path("image_embeddings"), shards)
