"""Operations: new tar shards become partitions and are ingested without anyone clicking."""


import dagster as dg

from curation_assets.partitions import SHARDS, shard_partitions
from resources.shard_source import ShardSource

shard_ingest_job = dg.define_asset_job(
    "shard_ingest_job",
    selection=dg.AssetSelection.assets("samples", "image_embeddings"),
    description="Ingest and embed one shard (what new_shards_sensor launches for each new shard).",
)


@dg.sensor(job=shard_ingest_job, minimum_interval_seconds=30, default_status=dg.DefaultSensorStatus.STOPPED)
def new_shards_sensor(context: dg.SensorEvaluationContext, shard_source: ShardSource) -> dg.SensorResult | dg.SkipReason:
    """Registers shards that appeared in the shard source as ``shards`` partitions and requests one ingest run
    each. The run key is the shard key, so a shard is launched once however many ticks see it; at most
    ``max_shards_per_tick`` (50) new shards per tick, the rest on later ticks."""
    max_per_tick = 50
    known = set(context.instance.get_dynamic_partitions(SHARDS))
    fresh = [ref.key for ref in shard_source.list_shards() if ref.key not in known]
    if not fresh:
        return dg.SkipReason(f"no new shards in {shard_source.uri} ({len(known)} known)")
    batch = fresh[:max_per_tick]
    context.log.info(f"registering {len(batch)} new shards ({len(fresh) - len(batch)} left for later ticks)")
    return dg.SensorResult(
        run_requests=[dg.RunRequest(partition_key=key, run_key=f"shard-{key}") for key in batch],
        dynamic_partitions_requests=[shard_partitions.build_add_request(batch)],
    )


defs = dg.Definitions(jobs=[shard_ingest_job], sensors=[new_shards_sensor])
