"""Materialising the asset graph from Python (the CLI, the demo, tests) through a real Dagster instance.

The graph mixes per-shard, per-clustering and global assets, and a Dagster run targets one partitioning at a
time. :func:`plan_layers` cuts a selection into layers of equal partitioning in dependency order; each layer
runs as one Dagster run (per-shard layers as a ranged run over the shards, so models load once per layer).
Runs are recorded in the instance, so the UI shows them like any run it launched itself.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import dagster as dg

from curation_assets.partitions import SHARDS, shard_backfill_policy

# The run tags of a ranged (multi-partition) run, as the UI's backfills and Dagster's docs write them; the
# constants themselves are only in Dagster's private modules.
ASSET_PARTITION_RANGE_START_TAG = "dagster/asset_partition_range_start"
ASSET_PARTITION_RANGE_END_TAG = "dagster/asset_partition_range_end"


def register_shards(instance: dg.DagsterInstance, keys: Iterable[str]) -> list[str]:
    """Add shard partitions that are not registered yet; returns the newly added keys."""
    known = set(instance.get_dynamic_partitions(SHARDS))
    fresh = [k for k in keys if k not in known]
    if fresh:
        instance.add_dynamic_partitions(SHARDS, fresh)
    return fresh


def _partitions_id(graph, key: dg.AssetKey):
    pdef = graph.get(key).partitions_def
    return None if pdef is None else (type(pdef).__name__, getattr(pdef, "name", None) or tuple(pdef.get_partition_keys()))


def plan_layers(defs: dg.Definitions, assets: Sequence[str] | None = None) -> list[list[dg.AssetKey]]:
    """The selection as layers: each layer shares one partitioning and only needs earlier layers or itself."""
    graph = defs.resolve_asset_graph()
    materializable = {k for k in graph.materializable_asset_keys}
    selected = materializable if assets is None else {dg.AssetKey.from_coercible(a) for a in assets}
    unknown = selected - materializable
    if unknown:
        raise KeyError(f"unknown assets {sorted(k.to_user_string() for k in unknown)}")
    order = [k for k in graph.toposorted_asset_keys if k in selected]
    done: set[dg.AssetKey] = set()
    layers: list[list[dg.AssetKey]] = []
    while len(done) < len(order):
        def parents(k):
            return {p for p in graph.get(k).parent_keys if p in selected}

        first = next(k for k in order if k not in done and parents(k) <= done)
        pid = _partitions_id(graph, first)
        layer = [first]
        changed = True
        while changed:
            changed = False
            for k in order:
                if k in done or k in layer or _partitions_id(graph, k) != pid:
                    continue
                if parents(k) <= done | set(layer):
                    layer.append(k)
                    changed = True
        layer.sort(key=order.index)
        layers.append(layer)
        done |= set(layer)
    return layers


class PartialRunError(RuntimeError):
    """Some assets failed; the others (not downstream of a failure) were still materialised."""

    def __init__(self, failed: dict[str, str], skipped: list[str]):
        self.failed, self.skipped = failed, skipped
        lines = [f"  {asset}: {error}" for asset, error in failed.items()]
        super().__init__("failed assets:\n" + "\n".join(lines)
                         + (f"\nnot run because an upstream asset failed: {', '.join(skipped)}" if skipped else ""))


def materialize(
    defs: dg.Definitions,
    instance: dg.DagsterInstance,
    assets: Sequence[str] | None = None,
    shards: Sequence[str] | None = None,
    tags: dict[str, str] | None = None,
    on_layer: Callable[[list[dg.AssetKey], int, str], None] | None = None,
    on_run: Callable[[list[dg.AssetKey], int, str, bool], None] | None = None,
    log_level: str = "INFO",
    keep_going: bool = False,
) -> list[dg.ExecuteInProcessResult]:
    """Materialise ``assets`` (default: the whole graph) for ``shards`` (default: every registered shard),
    layer by layer. ``log_level`` is the console log level of each run (every event is stored in the
    instance regardless).

    ``on_layer(assets, partitions, unit)`` is called before each layer and ``on_run(assets, partitions, what,
    success)`` after each of its runs (a per-shard layer runs in batches of at most
    ``shard_backfill_policy.max_partitions_per_run`` shards, as a UI backfill does), for progress displays.

    By default the first failed run raises. With ``keep_going`` a failure only stops what depends on the
    failed assets; everything else still runs, and a :class:`PartialRunError` listing both comes at the end
    (a fresh root without safety labels still gets ingest, embeddings, dedup and the census)."""
    graph = defs.resolve_asset_graph()
    registered = list(instance.get_dynamic_partitions(SHARDS))
    shards = registered if shards is None else list(shards)
    missing = set(shards) - set(registered)
    if missing:
        raise KeyError(f"shards not registered as partitions: {sorted(missing)}; call register_shards first")
    results = []
    failed: dict[str, str] = {}
    blocked: set[dg.AssetKey] = set()
    skipped: list[str] = []
    for layer in plan_layers(defs, assets):
        runnable = []
        for key in layer:
            if graph.get(key).parent_keys & blocked:
                blocked.add(key)
                skipped.append(key.to_user_string())
            else:
                runnable.append(key)
        if not runnable:
            continue
        job = defs.resolve_implicit_job_def_def_for_assets(runnable)
        pdef = graph.get(runnable[0]).partitions_def
        names = ", ".join(k.to_user_string() for k in runnable)
        runs = list(_partition_runs(pdef, shards, registered, instance))
        if on_layer:
            on_layer(runnable, sum(n for _, _, n in runs), "runs" if pdef is None else (
                "shards" if isinstance(pdef, dg.DynamicPartitionsDefinition) and pdef.name == SHARDS else "partitions"))
        for run_tags, what, count in runs:
            result = job.execute_in_process(
                instance=instance, asset_selection=runnable, tags={**(tags or {}), **run_tags},
                raise_on_error=not keep_going,
                run_config={"loggers": {"console": {"config": {"log_level": log_level}}}},
            )
            results.append(result)
            if on_run:
                on_run(runnable, count, what, result.success)
            if result.success:
                continue
            if not keep_going:
                raise RuntimeError(f"run {result.run_id} for [{names}] ({what}) failed")
            materialized = {e.asset_key for e in result.get_asset_materialization_events()}
            for event in result.get_step_failure_events():
                failed[event.step_key] = root_cause(event.step_failure_data.error)
            blocked |= {k for k in runnable if k not in materialized}
            # a failed blocking check stops what depends on its asset in later runs too, as it does in-run
            blocked |= {e.asset_key for e in result.get_asset_check_evaluations()
                        if not e.passed and e.blocking and e.severity == dg.AssetCheckSeverity.ERROR}
    if failed or skipped:
        raise PartialRunError(failed, sorted(set(skipped)))
    return results


def root_cause(error) -> str:
    """The first line of the innermost error of a step failure: the user's exception, not Dagster's
    "Error occurred while executing op" wrapper around it."""
    if error is None:
        return "failed"
    while getattr(error, "cause", None) is not None:
        error = error.cause
    lines = [line for line in (error.message or "").strip().splitlines() if line.strip()]
    return lines[0] if lines else error.cls_name or "failed"


def _partition_runs(pdef, shards: list[str], registered: list[str], instance: dg.DagsterInstance):
    """``(run tags, description, number of partitions)`` of each run a layer needs."""
    if pdef is None:
        yield {}, "global", 1
        return
    if isinstance(pdef, dg.DynamicPartitionsDefinition) and pdef.name != SHARDS:
        for key in instance.get_dynamic_partitions(pdef.name):
            yield _range(key, key), f"{pdef.name} {key}", 1
        return
    if isinstance(pdef, dg.DynamicPartitionsDefinition):
        if not shards:
            return
        batch = shard_backfill_policy.max_partitions_per_run or len(shards)
        positions = sorted(registered.index(s) for s in shards)
        runs: list[list[int]] = []
        for p in positions:  # contiguous ranges of registered shards, at most `batch` shards each
            if runs and p == runs[-1][-1] + 1 and len(runs[-1]) < batch:
                runs[-1].append(p)
            else:
                runs.append([p])
        for run in runs:
            start, end = registered[run[0]], registered[run[-1]]
            yield _range(start, end), f"shards {start}..{end}" if start != end else f"shard {start}", len(run)
        return
    keys = pdef.get_partition_keys()
    if not keys:
        return
    yield _range(keys[0], keys[-1]), f"partitions {keys[0]}..{keys[-1]}", len(keys)


def _range(start: str, end: str) -> dict[str, str]:
    return {ASSET_PARTITION_RANGE_START_TAG: start, ASSET_PARTITION_RANGE_END_TAG: end}
