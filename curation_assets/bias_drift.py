"""Drift of the demographic mix of new shards: the ``demographic_drift`` check and ``bias_drift_sensor``.

Each newly measured shard is compared with its reference shards (``bias.drift`` settings); an alert goes to
the ``alerts`` table (and webhook / Slack when configured) only when a group's share differs significantly
*and* by more than the configured band. A changed attribute-source version resets the reference instead of
alerting. The comparison itself is ``core/demographics.drift_verdict``.
"""

import hashlib
import json
from typing import Optional, Sequence

import dagster as dg
import polars as pl

from curation_assets.bias import ALERT_SOURCE, DRIFT_CHECK, RATIOS, demographic_ratios, load_settings
from curation_assets.core import demographics
from curation_assets.core.demographics import BiasSettings
from resources.alerts import Alert, AlertSink
from resources.settings import CurationSettings
from resources.storage import DeltaStorage


def drift_inputs(storage: DeltaStorage, cfg: BiasSettings) -> tuple[dict, dict, dict]:
    """From ``demographic_ratios``: per shard the (count, n) of each group at the drift stage and source,
    the attribute-source version and the computation time of each shard."""
    if not storage.exists(RATIOS):
        return {}, {}, {}
    rows = (storage.scan(RATIOS)
            .filter((pl.col("scope") == "shard") & (pl.col("kind") == "share")
                    & (pl.col("stage") == cfg.drift_stage) & (pl.col("source") == cfg.drift_source))
            .collect())
    counts: dict[str, dict[str, tuple[float, float]]] = {}
    versions: dict[str, str] = {}
    computed: dict[str, str] = {}
    for r in rows.iter_rows(named=True):
        if cfg.drift_stage == "filtered_reweighted":
            # weighted counts in the units of the Kish effective sample size of the shard
            n_eff = r["weight_total"] ** 2 / r["weight_sq_total"] if r["weight_sq_total"] else 0.0
            value = (r["weight_sum"] / r["weight_total"] * n_eff if r["weight_total"] else 0.0, n_eff)
        else:
            value = (float(r["count"]), float(r["n"]))
        counts.setdefault(r["shard"], {})[r["group"]] = value
        versions[r["shard"]] = r["source_version"]
        computed[r["shard"]] = str(r["computed_at"])
    return counts, versions, computed


def alerted_shards(alerts: AlertSink, storage: DeltaStorage, version: str) -> set[str]:
    table = alerts.read(storage).filter(pl.col("source") == ALERT_SOURCE)
    out = set()
    for r in table.iter_rows(named=True):
        if json.loads(r["details"] or "{}").get("source_version") == version:
            out.add(r["shard"])
    return out


def drift_alert(verdict: demographics.DriftVerdict, cfg: BiasSettings, computed_at: str,
                shard_counts: dict[str, tuple[float, float]]) -> Alert:
    """The alert for a drifted shard. Its id digests the shard's own counts, not when they were computed: a
    shard whose ratios are recomputed unchanged (every shard's are, when a new shard moves the global
    weights or the dedup groups) is not alerted twice; one re-ingested with other data is."""
    tripped = [g for g in verdict.groups if g["tripped"]]
    parts = [f"{g['group']} share {g['share']:.3f} vs reference {g['reference_share']:.3f} "
             f"(x{g['effect']:.2f}, p={g['p_value']:.2g})" for g in tripped]
    content = json.dumps(sorted((g, round(c, 6), round(n, 6)) for g, (c, n) in shard_counts.items()))
    identity = (f"{ALERT_SOURCE}|{verdict.shard}|{verdict.version}|{cfg.drift_stage}|{cfg.drift_source}|"
                + hashlib.sha256(content.encode()).hexdigest())
    return Alert(
        alert_id=hashlib.sha256(identity.encode()).hexdigest()[:20], source=ALERT_SOURCE,
        severity=verdict.severity or "WARN", asset=RATIOS, shard=verdict.shard,
        title=f"demographic drift in shard {verdict.shard}",
        message="; ".join(parts) + f" [{cfg.drift_source} source, {cfg.drift_stage} stage, reference "
                f"{len(verdict.reference_shards)} shards]",
        details={"source_version": verdict.version, "stage": cfg.drift_stage, "source": cfg.drift_source,
                 "reference_shards": verdict.reference_shards, "groups": verdict.groups, "computed_at": computed_at},
    )


def evaluate_drift(storage: DeltaStorage, cfg: BiasSettings, shards: Sequence[str], alerts: AlertSink
                   ) -> list[tuple[demographics.DriftVerdict, Optional[Alert]]]:
    """Judge ``shards`` (in key order) against their references; shards that alerted earlier (same
    attribute version) never serve as reference, including those that alert within this call."""
    counts, versions, computed = drift_inputs(storage, cfg)
    out = []
    excluded: dict[str, set[str]] = {}
    for shard in sorted(s for s in shards if s in counts):
        version = versions[shard]
        if version not in excluded:
            excluded[version] = alerted_shards(alerts, storage, version)
        verdict = demographics.drift_verdict(shard, version, counts, versions, cfg.drift, excluded[version])
        alert = drift_alert(verdict, cfg, computed[shard], counts[shard]) if verdict.alerting else None
        if alert is not None:
            excluded[version].add(shard)
        out.append((verdict, alert))
    return out


def _check_evaluation(verdicts: Sequence[tuple[demographics.DriftVerdict, Optional[Alert]]]) -> tuple[bool, dg.AssetCheckSeverity, dict]:
    alerting = [v for v, _ in verdicts if v.alerting]
    severity = (dg.AssetCheckSeverity.ERROR if any(v.severity == "ERROR" for v in alerting)
                else dg.AssetCheckSeverity.WARN)
    metadata = {
        "shards_checked": dg.MetadataValue.int(len(verdicts)),
        "drifted_shards": dg.MetadataValue.json([v.shard for v in alerting]),
        "statuses": dg.MetadataValue.json({v.shard: v.status for v, _ in verdicts}),
    }
    if alerting:
        metadata["details"] = dg.MetadataValue.md("\n".join(
            f"- shard {v.shard} ({v.severity}): " + ", ".join(
                f"{g['group']} x{g['effect']:.2f} p={g['p_value']:.2g}" for g in v.groups if g["tripped"])
            for v in alerting))
    return not alerting, severity, metadata


@dg.asset_check(asset=demographic_ratios, name=DRIFT_CHECK, blocking=False)
def demographic_drift(storage: DeltaStorage, settings: CurationSettings, alerts: AlertSink) -> dg.AssetCheckResult:
    """Every measured shard against its reference (same rule as ``bias_drift_sensor``): fails with WARN
    or ERROR when some shard's group share differs significantly (Bonferroni over groups) and by more
    than the configured band. The sensor reports the same check for each batch of new shards."""
    cfg = load_settings(settings)
    counts, _, _ = drift_inputs(storage, cfg)
    verdicts = evaluate_drift(storage, cfg, list(counts), alerts)
    passed, severity, metadata = _check_evaluation(verdicts)
    return dg.AssetCheckResult(passed=passed, severity=severity, metadata=metadata)


@dg.sensor(
    name="bias_drift_sensor",
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
)
def bias_drift_sensor(context: dg.SensorEvaluationContext, storage: DeltaStorage, settings: CurationSettings,
                      alerts: AlertSink) -> dg.SkipReason | dg.SensorResult:
    """Watches ``demographic_ratios`` materialisations; compares each newly measured shard with its reference
    and raises an alert (log, ``alerts`` table, webhook / Slack when configured, and the
    ``demographic_drift`` asset check) only when a group's share differs significantly *and* by more than
    the configured band. A changed attribute-source version starts a new reference instead of alerting.
    The cursor is the last materialisation event processed; alerts are idempotent per shard measurement."""
    after = int(context.cursor) if context.cursor else 0
    result = context.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(RATIOS), after_storage_id=after), limit=1000, ascending=True)
    records = list(result.records)
    if not records:
        return dg.SkipReason(f"no new {RATIOS} materialisations after event {after}")
    shards = sorted({r.partition_key for r in records if r.partition_key})
    cursor = str(max(r.storage_id for r in records))
    cfg = load_settings(settings)
    verdicts = evaluate_drift(storage, cfg, shards, alerts)
    fired = [a for _, a in verdicts if a is not None]
    delivery = alerts.emit(fired, storage, context.log)
    for verdict, _ in verdicts:
        context.log.info(f"shard {verdict.shard}: {verdict.status}"
                         + (f" (reference {verdict.reference_shards})" if verdict.reference_shards else ""))
        if verdict.status == "reset":
            context.log.info(f"shard {verdict.shard}: attribute source {verdict.version} has no reference yet; "
                             "it starts a new reference (no alert)")
    events = []
    if verdicts:
        passed, severity, metadata = _check_evaluation(verdicts)
        events.append(dg.AssetCheckEvaluation(
            asset_key=dg.AssetKey(RATIOS), check_name=DRIFT_CHECK, passed=passed, severity=severity,
            metadata={**metadata, "reported_by": dg.MetadataValue.text("bias_drift_sensor")}))
    summary = (f"{len(verdicts)} shards judged, {len(fired)} drift alerts "
               f"({delivery['emitted']} new, {delivery['skipped_duplicates']} already recorded)")
    context.log.info(summary)
    return dg.SensorResult(skip_reason=None if fired else summary, cursor=cursor, asset_events=events)


defs = dg.Definitions(asset_checks=[demographic_drift], sensors=[bias_drift_sensor])
