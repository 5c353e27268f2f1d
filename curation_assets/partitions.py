"""Partitions: one per tar shard (registered as shards arrive) and one per k-means clustering."""

from __future__ import annotations

import warnings

import dagster as dg

# backfill_policy is marked beta; the stages rely on it deliberately, so its warning is noise in every run.
warnings.filterwarnings("ignore", category=dg.BetaWarning)

SHARDS = "shards"
N_CLUSTERINGS = 5

shard_partitions = dg.DynamicPartitionsDefinition(name=SHARDS)
clustering_partitions = dg.StaticPartitionsDefinition([str(i) for i in range(1, N_CLUSTERINGS + 1)])

# A UI backfill over many shards runs them in batches, so a model loads once per batch, not per shard.
shard_backfill_policy = dg.BackfillPolicy.multi_run(max_partitions_per_run=16)


def partition_keys(context: dg.AssetExecutionContext) -> list[str]:
    """The shards (or clusterings) this step materialises: one, or several in a ranged backfill run."""
    if not context.has_partition_key and not context.has_partition_key_range:
        return []
    return list(context.partition_keys)
