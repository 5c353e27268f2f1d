"""Delta Lake tables the pipeline owns: per-shard partition overwrite, append, lazy scans, embeddings.

Every table lives at ``<root>/delta/<name>``. Per-shard tables are partitioned by the ``shard`` column and a
write replaces exactly one shard (a predicate overwrite), so re-running a shard never touches its
neighbours and several shards written in one run (a ranged backfill) all survive. Concurrent writers of
different shards race on the Delta log; the loser retries its commit.

Vectors are stored as ``List(Float32)`` (``pl.Array`` does not read back from Delta) and come out of
:func:`load_embeddings` as one C-contiguous float32 matrix.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import polars as pl

from curation_assets.core.location import is_uri
from curation_assets.core.locks import file_lock

_RETRIES = 12


def _retrying(write, what: str):
    from deltalake.exceptions import CommitFailedError, DeltaError

    last: Exception | None = None
    for attempt in range(_RETRIES):
        try:
            return write()
        except (CommitFailedError, DeltaError, OSError) as exc:  # lost a commit race or a create race
            message = str(exc).lower()
            transient = isinstance(exc, CommitFailedError) or any(
                word in message for word in ("conflict", "already exists", "version", "transaction", "commit")
            )
            if not transient:
                raise
            last = exc
            time.sleep(min(2.0, 0.05 * 2**attempt) * (0.5 + random.random()))
    raise RuntimeError(f"could not commit {what} after {_RETRIES} attempts: {last}") from last


def _make_parent(path: str | Path) -> None:
    """Create the directory a local table lives in (an object store has no directories to make)."""
    if not is_uri(path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)


def _file(path: str | Path, relative: str) -> str:
    """A data file of a table, by the relative path its add action names."""
    return f"{str(path).rstrip('/')}/{relative}" if is_uri(path) else str(Path(path) / relative)


def _arrow(df: pl.DataFrame):
    return df.to_arrow()


def table_exists(path: str | Path) -> bool:
    from deltalake import DeltaTable

    return DeltaTable.is_deltatable(str(path))


def write_shard(path: str | Path, df: pl.DataFrame, shard: str, partition_by: Sequence[str] | None = None) -> int:
    """Replace the rows of one shard in a per-shard table; returns the rows written. The table is partitioned
    by ``shard`` unless ``partition_by`` names other columns (e.g. the dedup buckets, which every shard writes
    into): each write then adds files holding only this shard's rows, and the next write of the shard removes
    exactly those."""
    if "shard" not in df.columns:
        raise ValueError(f"{path}: a per-shard table needs a 'shard' column")
    _check_shard_key(shard)
    if not partition_by or list(partition_by) == ["shard"]:
        return replace_where(path, df, "shard", shard)
    others = df.filter(pl.col("shard") != shard).height
    if others:
        raise ValueError(f"{path}: {others} rows do not belong to shard = {shard!r}")
    existing = partition_columns(path)
    if existing is not None and existing != list(partition_by):
        raise ValueError(f"{path} is partitioned by {existing}, this release writes it partitioned by "
                         f"{list(partition_by)}: delete the table and re-materialise every shard of its asset")
    return _overwrite_where(path, df, f"shard = {_literal(shard)}", list(partition_by))


def partition_columns(path: str | Path) -> list[str] | None:
    """The partition columns of a table (None when it does not exist)."""
    from deltalake import DeltaTable

    return list(DeltaTable(str(path)).metadata().partition_columns) if table_exists(path) else None


def partition_files(path: str | Path, stats: Sequence[str] = ()) -> pl.DataFrame:
    """One row per data file of the current version: ``path``, one column per partition column (as strings)
    and ``min.<c>`` / ``max.<c>`` of each column in ``stats`` (from the file statistics; null when the table
    keeps none). File names are unique per write, so a partition's file list fingerprints its content."""
    from deltalake import DeltaTable

    if not table_exists(path):
        return pl.DataFrame(schema={"path": pl.String, "num_records": pl.Int64})
    actions = pl.DataFrame(DeltaTable(str(path)).get_add_actions(flatten=True))
    parts = [c for c in actions.columns if c.startswith("partition.")]
    wanted = [f"{kind}.{c}" for c in stats for kind in ("min", "max")]
    return actions.select(pl.col("path").cast(pl.String), pl.col("num_records").cast(pl.Int64),
                          *[pl.col(c).cast(pl.String).alias(c.removeprefix("partition.")) for c in parts],
                          *[(pl.col(c) if c in actions.columns else pl.lit(None)).cast(pl.String).alias(c) for c in wanted])


def read_files(path: str | Path, files: Sequence[str], columns: Sequence[str], where: pl.Expr | None = None
               ) -> pl.DataFrame:
    """The rows of some data files of a table (paths as :func:`partition_files` lists them, all from one
    version), optionally only those matching ``where`` (pushed into the scan, so only matching rows are held).
    Partition columns are not in the files. Cheaper than a filtered table scan, which lists every file."""
    if not files:
        return pl.DataFrame()
    lf = pl.scan_parquet([_file(path, f) for f in files])
    if where is not None:
        lf = lf.filter(where)
    return lf.select(list(columns)).collect()


def _literal(value: str | int) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise TypeError(f"predicate values are strings or integers, not {type(value).__name__}")
    if isinstance(value, int):
        return str(value)
    if "'" in value or "\\" in value:
        raise ValueError(f"invalid key {value!r} for a predicate overwrite")
    return f"'{value}'"


def replace_where(path: str | Path, df: pl.DataFrame, column: str, value: str | int) -> int:
    """Replace the rows whose ``column`` equals ``value`` (the table is partitioned by ``column``) with ``df``,
    in one Delta commit; the rest of the table is untouched, so concurrent writers of different keys never
    lose each other's rows (the loser of a commit race retries against the new table state)."""
    others = df.filter(pl.col(column) != value).height
    if others:
        raise ValueError(f"{path}: {others} rows do not belong to {column} = {value!r}")
    return _overwrite_where(path, df, f"{column} = {_literal(value)}", [column])


def replace_in(path: str | Path, df: pl.DataFrame, column: str, values: Sequence[str | int]) -> int:
    """Replace the rows whose ``column`` is one of ``values`` with ``df`` in one commit, in a small table that
    is not partitioned by ``column`` (one row per key, e.g. per clustering); retried like
    :func:`replace_where`."""
    values = list(values)
    others = df.filter(~pl.col(column).is_in(values)).height
    if others:
        raise ValueError(f"{path}: {others} rows do not belong to {column} in {values!r}")
    return _overwrite_where(path, df, f"{column} IN ({', '.join(_literal(v) for v in values)})", None)


def _added_columns_mode(path: str | Path, df: pl.DataFrame) -> str | None:
    """``"merge"`` when ``df`` keeps every column of the table and adds new ones (a newer writer: the other
    keys' rows read the new columns as null); otherwise the table's schema must match exactly."""
    from deltalake import DeltaTable

    existing = {f.name for f in DeltaTable(str(path)).schema().fields}
    return "merge" if set(df.columns) - existing and existing <= set(df.columns) else None


def _overwrite_where(path: str | Path, df: pl.DataFrame, predicate: str, partition_by: list[str] | None) -> int:
    """One commit replacing the rows matching ``predicate`` with ``df``; creates the table when missing. A
    writer that adds columns (a newer release) evolves the schema instead of failing."""
    from deltalake import write_deltalake

    _make_parent(path)
    data = _arrow(df)

    def overwrite():
        write_deltalake(str(path), data, mode="overwrite", predicate=predicate, partition_by=partition_by,
                        schema_mode=_added_columns_mode(path, df))

    def write():
        if table_exists(path):
            return overwrite()
        with _creating(path):  # two first writers at once would otherwise both create version 0's rows
            if table_exists(path):
                return overwrite()
            write_deltalake(str(path), data, mode="error", partition_by=partition_by)

    _retrying(write, f"{predicate} of {path}")
    return df.height


def _creating(path: str | Path):
    """An exclusive lock (between processes on this machine) around creating the table at ``path``. On an
    object store the first commit is a conditional put: the loser sees "already exists" and retries as an
    overwrite."""
    if is_uri(path):
        from contextlib import nullcontext

        return nullcontext()
    path = Path(path)
    return file_lock(path.parent / ".locks" / f"{path.name}.create.lock")


def delete_where(path: str | Path, column: str, value: str | int) -> None:
    """Delete the rows whose ``column`` equals ``value`` (nothing when the table does not exist)."""
    from deltalake import DeltaTable

    if table_exists(path):
        predicate = f"{column} = {_literal(value)}"
        _retrying(lambda: DeltaTable(str(path)).delete(predicate), f"delete {predicate} from {path}")


def _footprint(path: str | Path) -> tuple[int, int]:
    if is_uri(path):
        import fsspec

        fs, root = fsspec.core.url_to_fs(str(path))
        sizes = [info["size"] for name, info in fs.find(root, detail=True).items() if name.endswith(".parquet")]
        return len(sizes), sum(sizes)
    files = [p for p in Path(path).rglob("*.parquet") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def maintain(path: str | Path, retention_hours: int, compact: bool = True) -> dict:
    """Compact a table's small files into larger ones (unless ``compact`` is false), then delete data files
    no version younger than ``retention_hours`` still needs (time travel keeps working within that window).
    Returns the parquet file count and bytes before and after."""
    from deltalake import DeltaTable

    files_before, bytes_before = _footprint(path)
    compacted = (_retrying(lambda: DeltaTable(str(path)).optimize.compact(), f"compact {path}") if compact
                 else {"numFilesRemoved": 0})
    removed = _retrying(lambda: DeltaTable(str(path)).vacuum(retention_hours=retention_hours, dry_run=False,
                                                             enforce_retention_duration=False), f"vacuum {path}")
    files_after, bytes_after = _footprint(path)
    return {"files_before": files_before, "files_after": files_after, "bytes_before": bytes_before,
            "bytes_after": bytes_after, "files_compacted": int(compacted.get("numFilesRemoved", 0)),
            "files_vacuumed": len(removed)}


def write_table(path: str | Path, df: pl.DataFrame, partition_by: Sequence[str] | None = None) -> int:
    """Replace a whole (global) table, schema included; returns the rows written."""
    from deltalake import write_deltalake

    _make_parent(path)
    data = _arrow(df)
    _retrying(
        lambda: write_deltalake(str(path), data, mode="overwrite", schema_mode="overwrite",
                                partition_by=list(partition_by) if partition_by else None),
        f"{path}",
    )
    return df.height


def write_table_streamed(path: str | Path, frames: Iterable[pl.DataFrame], schema: dict,
                         partition_by: Sequence[str] | None = None) -> int:
    """Replace a whole table with the rows of ``frames`` (an iterator, e.g. one frame per shard) in ONE
    commit, holding one frame at a time: a crash part-way leaves the previous version. The frames are
    staged as parquet files beside the table first, so producing them may read Delta tables (the commit's
    own stream cannot). Returns the rows written."""
    import shutil
    import uuid

    import pyarrow as pa
    import pyarrow.parquet as pq
    from deltalake import write_deltalake

    import tempfile

    arrow_schema = pl.DataFrame(schema=schema).to_arrow().schema
    if is_uri(path):  # staged on local disk, committed to the store
        staging = Path(tempfile.mkdtemp(prefix="curation-staging-"))
    else:
        staging = Path(path).parent / f".{Path(path).name}.staging-{uuid.uuid4().hex[:12]}"
        staging.mkdir(parents=True)
    try:
        files, written = [], 0
        for frame in frames:
            files.append(staging / f"{len(files):06d}.parquet")
            frame.cast(schema).select(list(schema)).write_parquet(files[-1])
            written += frame.height

        def batches():
            for file in files:
                for batch in pq.ParquetFile(file).iter_batches():
                    yield batch.cast(arrow_schema) if batch.schema != arrow_schema else batch

        _retrying(lambda: write_deltalake(  # a fresh reader per attempt: a retry re-reads the staged files
            str(path), pa.RecordBatchReader.from_batches(arrow_schema, batches()), mode="overwrite",
            schema_mode="overwrite", partition_by=list(partition_by) if partition_by else None), f"{path}")
        return written
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def append(path: str | Path, df: pl.DataFrame, partition_by: Sequence[str] | None = None) -> int:
    """Append rows to an append-only table (labels, alerts); returns the rows written."""
    from deltalake import write_deltalake

    if df.height == 0:
        return 0
    _make_parent(path)
    data = _arrow(df)
    _retrying(
        lambda: write_deltalake(str(path), data, mode="append", schema_mode="merge",
                                partition_by=list(partition_by) if partition_by else None),
        f"append to {path}",
    )
    return df.height


def scan(path: str | Path, shards: Iterable[str] | None = None) -> pl.LazyFrame:
    """Lazy scan of a table, optionally restricted to some shards (partition pruning)."""
    if not table_exists(path):
        raise FileNotFoundError(f"Delta table {path} does not exist yet: materialise its asset first")
    lf = pl.scan_delta(str(path))
    if shards is not None:
        lf = lf.filter(pl.col("shard").is_in(list(shards)))
    return lf


def read(path: str | Path, shards: Iterable[str] | None = None, columns: Sequence[str] | None = None) -> pl.DataFrame:
    lf = scan(path, shards)
    if columns is not None:
        lf = lf.select(list(columns))
    return lf.collect()


def shards_in(path: str | Path) -> list[str]:
    """The shard keys present in a per-shard table."""
    if not table_exists(path):
        return []
    return sorted(pl.scan_delta(str(path)).select(pl.col("shard").unique()).collect()["shard"].to_list())


def embeddings_frame(uids: Sequence[str], shards: Sequence[str], vectors: np.ndarray, encoder: str,
                     thumbnails: Sequence[bytes | None] | None = None) -> pl.DataFrame:
    """The ``image_embeddings`` row layout for a block of vectors, with each image's verification thumbnail
    (null when pixel verification is off for the encoder)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    flat = pl.Series("embedding", vectors.reshape(-1))
    dim = vectors.shape[1] if vectors.ndim == 2 else 0
    lists = pl.Series("embedding", [], dtype=pl.List(pl.Float32)) if not len(uids) else (
        flat.reshape((len(uids), dim)).cast(pl.List(pl.Float32))
    )
    return pl.DataFrame({
        "uid": pl.Series(list(uids), dtype=pl.String),
        "shard": pl.Series(list(shards), dtype=pl.String),
        "embedding": lists,
        "encoder": pl.Series([encoder] * len(uids), dtype=pl.String),
        "thumbnail": pl.Series(list(thumbnails) if thumbnails is not None else [None] * len(uids), dtype=pl.Binary),
    })


def matrix(column: pl.Series) -> np.ndarray:
    """A ``List(Float32)`` column as one C-contiguous float32 matrix (no per-row Python work)."""
    if column.len() == 0:
        return np.zeros((0, 0), dtype=np.float32)
    lengths = column.list.len()
    dim = int(lengths[0])
    if lengths.min() != dim or lengths.max() != dim or column.null_count():
        raise ValueError("embedding column mixes vector lengths or has nulls")
    flat = column.explode().to_numpy()
    return np.ascontiguousarray(flat.astype(np.float32, copy=False).reshape(-1, dim))


VECTOR_DTYPES = {"float32": np.float32, "float16": np.float16}


def vectors_to_binary(x: np.ndarray, dtype: str = "float32") -> pl.Series:
    """An ``n x d`` matrix as a Binary column of packed little-endian rows (``float32`` or ``float16``, half
    the bytes), built from one buffer without per-row Python objects."""
    import pyarrow as pa

    packed = np.ascontiguousarray(x, dtype=np.dtype(VECTOR_DTYPES[dtype]).newbyteorder("<"))
    width = packed.shape[1] * packed.itemsize if packed.ndim == 2 else 0
    if len(packed) == 0 or width == 0:
        return pl.Series("vector", [], dtype=pl.Binary)
    arr = pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), len(packed), [None, pa.py_buffer(packed.tobytes())])
    return pl.Series("vector", pl.from_arrow(arr.cast(pa.large_binary())), dtype=pl.Binary)


def binary_to_matrix(column: pl.Series, dim: int) -> np.ndarray:
    """The float32 matrix of a column written by :func:`vectors_to_binary` (its dtype read from the row width)."""
    if column.len() == 0:
        return np.zeros((0, dim), np.float32)
    lengths = column.bin.size("b")
    width = int(lengths[0])
    if column.null_count() or lengths.min() != width or lengths.max() != width or width % dim:
        raise ValueError(f"vector column mixes row widths or has nulls (expected a multiple of {dim} per row)")
    itemsize = width // dim
    dtype = {4: np.float32, 2: np.float16}.get(itemsize)
    if dtype is None:
        raise ValueError(f"vector rows of {width} bytes for dimension {dim}: not float32 or float16")
    arr = column.to_arrow()
    if hasattr(arr, "combine_chunks"):
        arr = arr.combine_chunks()
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64, count=len(arr) + 1, offset=arr.offset * 8)
    data = np.frombuffer(arr.buffers()[2], dtype=np.uint8)[offsets[0]:offsets[-1]]
    return np.ascontiguousarray(data.view(np.dtype(dtype).newbyteorder("<")).reshape(-1, dim), dtype=np.float32)


def load_embeddings(path: str | Path, shards: Iterable[str] | None = None) -> tuple[pl.DataFrame, np.ndarray]:
    """``(ids, X)``: ids has uid, shard, encoder in the row order of the float32 matrix ``X``."""
    df = scan(path, shards).select("uid", "shard", "encoder", "embedding").sort("uid").collect()
    ids = df.select("uid", "shard", "encoder")
    return ids, matrix(df["embedding"])


def _check_shard_key(shard: str) -> None:
    if not shard or any(ch in shard for ch in "',|\\/\n") or "..." in shard:
        raise ValueError(f"invalid shard key {shard!r}: use letters, digits, '-', '_' and '.'")
