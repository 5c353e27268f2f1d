"""Hands-off operation: when each asset refreshes by itself (Dagster declarative automation).

The whole policy sits here, in one table, so an operator can read it in one place:

- **Per shard, as soon as possible** (``eager``): ``samples`` when ``new_shards_sensor`` registers a shard,
  then ``image_embeddings``, ``image_attributes``, ``cluster_assignments``, ``safety_scores``, ``filtered_samples`` and the shard's
  ``demographic_ratios``, usually in one run. ``bias_drift_sensor`` judges each new measurement. The ratios
  wait only for the shard's own ``samples``: a shard is measured (and can alert) before any label exists.
- **Labels drive the safety stage**: ``safety_classifiers`` retrains when ``labels`` changes (``curate labels
  import`` records that in the instance), never because a shard arrived; thresholds, the labelling queue and
  the rescoring of every shard follow from the new classifiers.
- **Global assets refresh on a debounced schedule** (:func:`global_refresh`): at most once per tick of
  ``CURATION_REFRESH_CRON`` (default hourly), only when something upstream changed since their last
  refresh, and only once no upstream run is in progress, so a backlog of shards becomes one refresh after it
  drains instead of one refresh per shard. The k-means centroids are fitted once, when first missing (refit
  them by hand: README).

Shard runs are batched by the shard backfill policy (at most 16 shards per run) and the instance queue caps
concurrent runs (``dagster.yaml``), so turning automation back on after a pause, or dropping a thousand shards
at once, never floods the instance. Switch everything off by stopping ``curation_automation`` in the UI
(Automation tab); ``new_shards_sensor`` and ``bias_drift_sensor`` are switched there too.
"""

from __future__ import annotations

import os

import dagster as dg

AC = dg.AutomationCondition
DEFAULT_REFRESH_CRON = "0 * * * *"

PER_SHARD = ("samples", "image_embeddings", "image_attributes", "cluster_assignments", "safety_scores",
             "filtered_samples")
MANUAL = ("clip_bias_audit",)  # one partition per configured checkpoint, materialised by hand
OPTIONAL = ("image_attributes",)  # read when present (census, ratios), never waited for
LABEL_ASSETS = ("labels", "safety_classifiers", "safety_thresholds", "safety_scores", "filtered_samples",
                "sample_weights", "labeling_queue")
GLOBAL = ("duplicate_pairs", "dedup_groups", "deduplicated_samples", "dedup_recall", "dataset_census",
          "regurgitation_audit", "overall_demographic_ratios", "training_set", "curation_report")


def _assets(*names: str) -> dg.AssetSelection:
    return dg.AssetSelection.assets(*names)


def _unprocessed() -> dg.AutomationCondition:
    """A partition that has never been materialised and whose last attempt did not fail: a shard registered
    before automation was switched on is picked up too, and a failing shard is not retried in a loop."""
    return (AC.missing() & ~AC.execution_failed()).with_label("unprocessed")


def shard_eager() -> dg.AutomationCondition:
    """A shard's partition as soon as it is unprocessed or its inputs change; the ``labels`` log is read,
    never waited for, and a label import alone re-runs nothing per shard (the classifiers it retrains do)."""
    return (
        (_unprocessed() | AC.any_deps_updated().ignore(_assets("labels")).since_last_handled())
        & ~AC.any_deps_missing().ignore(_assets("labels"))
        & ~AC.any_deps_in_progress()
        & ~AC.in_progress()
    ).with_label("shard_eager")


def shard_ratios() -> dg.AutomationCondition:
    """``demographic_ratios`` of a shard: when it is unprocessed or its samples, filter decisions or image
    attributes change.
    Refreshes of global inputs (dedup, weights, training set) do not re-measure every shard; the overall
    numbers are refreshed globally."""
    own = _assets("samples", "filtered_samples", "image_attributes")
    return (
        (_unprocessed() | AC.any_deps_updated().allow(own).since_last_handled())
        & ~AC.any_deps_missing().allow(_assets("samples"))
        & ~AC.any_deps_in_progress().allow(own)
        & ~AC.in_progress()
    ).with_label("shard_ratios")


def on_labels() -> dg.AutomationCondition:
    """``safety_classifiers``: retrain when labels change, not when shards arrive."""
    return (
        AC.any_deps_updated().allow(_assets("labels")).since_last_handled()
        & ~AC.any_deps_in_progress()
        & ~AC.in_progress()
    ).with_label("on_labels")


def after_classifiers() -> dg.AutomationCondition:
    return (
        AC.any_deps_updated().allow(_assets("safety_classifiers")).since_last_handled()
        & ~AC.any_deps_missing().ignore(_assets("labels"))
        & ~AC.any_deps_in_progress()
        & ~AC.in_progress()
    ).with_label("after_classifiers")


def global_refresh(cron: str, ignore_missing: tuple[str, ...] = LABEL_ASSETS + MANUAL + OPTIONAL
                   ) -> dg.AutomationCondition:
    """At most once per ``cron`` tick, after an upstream change, once nothing upstream is running."""
    return (
        (AC.newly_missing() | AC.any_deps_updated()).since_last_handled()
        & AC.cron_tick_passed(cron).since_last_handled()
        & ~AC.any_deps_missing().ignore(_assets(*ignore_missing))
        & ~AC.any_deps_in_progress()
        & ~AC.in_progress()
    ).with_label(f"global_refresh({cron})")


def centroids_once() -> dg.AutomationCondition:
    """Fit the k-means centroids while they are missing, after embeddings change and once no embedding run is
    in progress; fitted centroids are never refitted by automation (that would reassign every shard)."""
    return (
        AC.missing()
        & AC.any_deps_updated().since_last_handled()
        & ~AC.any_deps_missing()
        & ~AC.any_deps_in_progress()
        & ~AC.in_progress()
    ).with_label("centroids_once")


def conditions(cron: str) -> dict[str, dg.AutomationCondition]:
    """The automation condition of every automated asset."""
    policy = {name: shard_eager() for name in PER_SHARD}
    policy["demographic_ratios"] = shard_ratios()
    policy["kmeans_centroids"] = centroids_once()
    policy["safety_classifiers"] = on_labels()
    policy["safety_thresholds"] = after_classifiers()
    policy["labeling_queue"] = global_refresh(cron)
    policy["sample_weights"] = global_refresh(cron, ignore_missing=("labels",))
    policy.update({name: global_refresh(cron) for name in GLOBAL})
    return policy


def refresh_cron(cron: str | None = None) -> str:
    """The global refresh schedule: the argument, else ``CURATION_REFRESH_CRON``, else hourly."""
    return cron or os.environ.get("CURATION_REFRESH_CRON") or DEFAULT_REFRESH_CRON


def with_automation(defs: dg.Definitions, cron: str | None = None) -> dg.Definitions:
    """``defs`` with the automation conditions of :func:`conditions` and the sensor that evaluates them."""
    policy = conditions(refresh_cron(cron))

    def attach(spec: dg.AssetSpec) -> dg.AssetSpec:
        condition = policy.get(spec.key.to_user_string())
        return spec.replace_attributes(automation_condition=condition) if condition is not None else spec

    sensor = dg.AutomationConditionSensorDefinition(
        "curation_automation", target=dg.AssetSelection.all(), default_status=dg.DefaultSensorStatus.RUNNING,
        minimum_interval_seconds=10, emit_backfills=False,
        description="Evaluates every asset's automation condition (curation_assets/automation.py).")
    return dg.Definitions(
        assets=dg.map_asset_specs(attach, list(defs.assets or [])), asset_checks=defs.asset_checks,
        jobs=defs.jobs, schedules=defs.schedules, sensors=[*(defs.sensors or []), sensor], resources=defs.resources)
