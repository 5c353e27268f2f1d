"""Partitions: one per tar shard (registered as shards arrive) and one per k-means clustering."""

from __future__ import annotations

import warnings
from typing import Any, Callable

import dagster as dg

SHARDS = "shards"
N_CLUSTERINGS = 5

shard_partitions = dg.DynamicPartitionsDefinition(name=SHARDS)
clustering_partitions = dg.StaticPartitionsDefinition([str(i) for i in range(1, N_CLUSTERINGS + 1)])

# A UI backfill over many shards runs them in batches, so a model loads once per batch, not per shard.
shard_backfill_policy = dg.BackfillPolicy.multi_run(max_partitions_per_run=16)


def partitioned_asset(partitions_def: dg.PartitionsDefinition, backfill_policy: dg.BackfillPolicy,
                      **kwargs: Any) -> Callable:
    """``dg.asset`` with a partition set and a backfill policy. ``backfill_policy`` is a beta parameter of
    ``dg.asset``; its ``BetaWarning`` is silenced here, for this use only."""
    def decorate(fn: Callable) -> dg.AssetsDefinition:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=dg.BetaWarning, message=".*backfill_policy.*")
            return dg.asset(partitions_def=partitions_def, backfill_policy=backfill_policy, **kwargs)(fn)
    return decorate


def shard_asset(**kwargs: Any) -> Callable:
    """An asset partitioned by shard, backfilled in batches (:data:`shard_backfill_policy`)."""
    return partitioned_asset(shard_partitions, shard_backfill_policy, **kwargs)


def partition_keys(context: dg.AssetExecutionContext) -> list[str]:
    """The shards (or clusterings) this step materialises: one, or several in a ranged backfill run."""
    if not context.has_partition_key and not context.has_partition_key_range:
        return []
    return list(context.partition_keys)
