"""Operations: new tar shards become partitions, and automation carries them through the graph."""


import dagster as dg

from curation_assets.partitions import SHARDS, shard_partitions
from resources.shard_source import ShardSource

MAX_SHARDS_PER_TICK = 50


@dg.sensor(minimum_interval_seconds=15, default_status=dg.DefaultSensorStatus.RUNNING)
def new_shards_sensor(context: dg.SensorEvaluationContext, shard_source: ShardSource) -> dg.SensorResult | dg.SkipReason:
    """Registers shards that appeared in the shard source as ``shards`` partitions (at most 50 per tick, the
    rest on later ticks). It launches nothing itself: each new partition is missing, and the
    ``curation_automation`` sensor materialises it and everything per shard after it (``automation.py``).

    On by default because registering a file that landed in the watched directory is what a user who
    switched the pipeline on expects, and the automation it feeds batches shards and caps concurrent runs.
    Stop it in the UI (Automation tab) to freeze the set of shards."""
    known = set(context.instance.get_dynamic_partitions(SHARDS))
    refs, skipped = shard_source.scan()
    fresh = [ref for ref in refs if ref.key not in known]
    not_shards = "; ".join(f"skipped {item.name}: {item.reason}" for item in skipped)
    if not fresh:
        return dg.SkipReason(f"no new shards in {shard_source.uri} ({len(known)} known)"
                             + (f"; {not_shards}" if not_shards else ""))
    batch = fresh[:MAX_SHARDS_PER_TICK]
    context.log.info(f"registering {len(batch)} new shards ({len(fresh) - len(batch)} left for later ticks)")
    for ref in batch:
        if ref.key != ref.tar.stem:
            context.log.info(f"{ref.name}: partition key {ref.key!r} (the name does not fit the key rule)")
    if not_shards:
        context.log.warning(not_shards)
    return dg.SensorResult(dynamic_partitions_requests=[shard_partitions.build_add_request([r.key for r in batch])])


defs = dg.Definitions(sensors=[new_shards_sensor])
