"""Ingest: every member group of a tar shard becomes one row of ``samples``, accepted or rejected with a reason."""


import dagster as dg
import polars as pl

from curation_assets.core.shards import IngestLimits, read_shard, unreadable_shard, within_group
from curation_assets.partitions import partition_keys, shard_asset
from resources.compute import ComputeResource
from resources.settings import CurationSettings
from resources.shard_source import ShardRef, ShardSource
from resources.storage import DeltaStorage


def read_partition(ref: ShardRef, limits: IngestLimits) -> tuple[pl.DataFrame, dict[str, str]]:
    """The ``samples`` rows of one partition (a tar or a group of tars; a task of its own on Ray) and the
    tars that could not be read at all, with why."""
    frames, failed = [], {}
    for tar in ref.tars:
        try:
            df = read_shard(ref.key, tar.tar, tar.parquet, limits)
        except ValueError as exc:  # not a tar at all (or 0 bytes): the tar is recorded, the others go on
            df = unreadable_shard(ref.key, str(exc))
            failed[tar.name if ref.parts else ref.key] = str(exc)
        frames.append(within_group(df, ref.key, tar.key) if ref.parts else df)
    return pl.concat(frames), failed


@shard_asset(
    group_name="ingest",
    kinds={"deltalake", "polars"},
)
def samples(
    context: dg.AssetExecutionContext,
    storage: DeltaStorage,
    settings: CurationSettings,
    shard_source: ShardSource,
    compute: ComputeResource,
) -> dg.MaterializeResult:
    """One row per sample of the shard: uid, caption, size, sha256 and ``status`` (``ok``, or ``rejected``
    with a readable ``error``: corrupt or truncated bytes, unsupported formats, decompression bombs, duplicate
    keys, unsafe member paths, a tar cut off mid-stream). Images are decoded and validated, never extracted.
    Re-materialising a shard replaces exactly that shard's rows. A file that is not a tar at all becomes one
    rejected ``_shard_unreadable`` row and the other shards of the step go on; a shard whose file is gone
    keeps its rows and is listed as missing (``curate shards remove KEY`` forgets it). A partition that is a
    group of tars (``CURATION_SHARD_GROUP``) reads each of them, its keys prefixed with the tar's key."""
    limits = IngestLimits.from_section(settings.section("ingest"))
    totals = {"rows": 0, "ok": 0, "rejected": 0}
    errors: dict[str, int] = {}
    failed: dict[str, str] = {}
    missing: list[str] = []
    files: dict[str, str] = {}
    refs = []
    for shard in partition_keys(context):
        try:
            refs.append(shard_source.get(shard))
        except FileNotFoundError as exc:
            missing.append(shard)  # its rows (if any) stay as they were; nothing is invented for it
            context.log.warning(str(exc))
    for ref, (df, unreadable) in zip(refs, compute.map(read_partition, refs, "samples", limits)):
        shard = ref.key
        files[shard] = ref.name
        for name, error in unreadable.items():
            failed[name] = error
            context.log.error(f"shard {shard}: {error}")
        storage.write_shard("samples", df, shard)
        ok = int((df["status"] == "ok").sum())
        totals["rows"] += df.height
        totals["ok"] += ok
        totals["rejected"] += df.height - ok
        for error in df.filter(pl.col("status") == "rejected")["error"].to_list():
            kind = (error or "unknown").split(":")[0][:60]
            errors[kind] = errors.get(kind, 0) + 1
        context.log.info(f"shard {shard}: {df.height} samples, {ok} ok, {df.height - ok} rejected ({ref.name})")
    rejected_table = "\n".join(f"| {k} | {v} |" for k, v in sorted(errors.items(), key=lambda kv: -kv[1]))
    return dg.MaterializeResult(
        metadata={
            **storage.table_metadata("samples", "funnel"),
            "unreadable_shards": dg.MetadataValue.json(failed),
            "missing_shards": dg.MetadataValue.json(missing),
            "files": dg.MetadataValue.json(files),
            "dagster/row_count": totals["rows"],
            "ok": totals["ok"],
            "rejected": totals["rejected"],
            "reject_rate": dg.FloatMetadataValue(totals["rejected"] / max(1, totals["rows"])),
            "rejections": dg.MetadataValue.md(
                "| error | count |\n|---|---|\n" + rejected_table if errors else "no rejected samples"
            ),
            "table": dg.MetadataValue.path(str(storage.table_path("samples"))),
        }
    )


defs = dg.Definitions(assets=[samples])
