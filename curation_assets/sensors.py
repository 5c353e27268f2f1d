"""Operations: new tar shards become partitions, changed ones are re-ingested, and automation carries both
through the graph."""

import json

import dagster as dg

from curation_assets.partitions import SHARDS, shard_partitions
from resources.shard_source import ShardSource
from resources.storage import DeltaStorage

MAX_SHARDS_PER_TICK = 50


@dg.sensor(minimum_interval_seconds=15, default_status=dg.DefaultSensorStatus.RUNNING,
           target=dg.AssetSelection.assets("samples"))
def new_shards_sensor(context: dg.SensorEvaluationContext, shard_source: ShardSource) -> dg.SensorResult | dg.SkipReason:
    """Registers shards that appeared in the shard source as ``shards`` partitions (at most 50 per tick, the
    rest on later ticks); the ``curation_automation`` sensor then materialises each new partition and
    everything per shard after it (``automation.py``). A registered shard whose file changed (size or
    modification time) is re-ingested, and automation re-runs what was built on it; labels made on its old
    pictures become stale by their sha256 and are not used.

    On by default because registering a file that landed in the watched directory is what a user who
    switched the pipeline on expects, and the automation it feeds batches shards and caps concurrent runs.
    Stop it in the UI (Automation tab) to freeze the set of shards."""
    seen: dict[str, str] = json.loads(context.cursor) if context.cursor else {}
    known = set(context.instance.get_dynamic_partitions(SHARDS))
    refs, skipped = shard_source.scan()
    fresh = [ref for ref in refs if ref.key not in known][:MAX_SHARDS_PER_TICK]
    changed = []
    for ref in refs:
        if ref.key in known:
            stamp = ref.stamp()
            if ref.key in seen and seen[ref.key] != stamp:
                changed.append((ref, stamp))
            seen[ref.key] = stamp
    for ref in fresh:
        seen[ref.key] = ref.stamp()
    not_shards = "; ".join(f"skipped {item.name}: {item.reason}" for item in skipped)
    if not fresh and not changed:
        return dg.SensorResult(skip_reason=f"no new or changed shards in {shard_source.uri} ({len(known)} known)"
                               + (f"; {not_shards}" if not_shards else ""), cursor=json.dumps(seen))
    if fresh:
        context.log.info(f"registering {len(fresh)} new shards")
    for ref in fresh:
        if not ref.parts and ref.key != ref.tar.stem:
            context.log.info(f"{ref.name}: partition key {ref.key!r} (the name does not fit the key rule)")
    for ref, _ in changed:
        context.log.info(f"shard {ref.key}: {ref.name} changed since it was seen; re-ingesting it")
    if not_shards:
        context.log.warning(not_shards)
    return dg.SensorResult(
        run_requests=[dg.RunRequest(partition_key=ref.key, run_key=f"changed-{ref.key}-{stamp}")
                      for ref, stamp in changed],
        dynamic_partitions_requests=[shard_partitions.build_add_request([r.key for r in fresh])] if fresh else [],
        cursor=json.dumps(seen))


class ShardRemoval(dg.Config):
    """The shards to forget (partition keys, as `curate shards list` prints them)."""

    shards: list[str]


@dg.op(description="Delete the shards' rows from every per-shard table and their partitions from the instance.")
def remove_shards(context: dg.OpExecutionContext, config: ShardRemoval, storage: DeltaStorage) -> None:
    known = set(context.instance.get_dynamic_partitions(SHARDS))
    unknown = [key for key in config.shards if key not in known]
    if unknown:
        raise dg.Failure(f"not registered shards: {unknown}")
    for key in config.shards:
        tables = storage.delete_shard(key)
        context.instance.delete_dynamic_partition(SHARDS, key)
        context.log.info(f"removed shard {key}: rows deleted from {', '.join(tables) or 'no table'}")


@dg.job(description="Forget shards (the UI's equivalent of `curate shards remove KEY`): their rows leave every "
                    "per-shard table and their partitions leave the instance; global assets drop them on their "
                    "next refresh. Launch it from the Launchpad with `ops: remove_shards: config: shards: [KEY]`.")
def shard_removal_job():
    remove_shards()


defs = dg.Definitions(sensors=[new_shards_sensor], jobs=[shard_removal_job])
