"""The bias stage: demographic ratios per stage, OpenAI's reweighting, and drift alerts for new shards.

Filtering can shift who is in a dataset: in DALL·E 2's data, captions mentioning "woman" fell 14% while
"man" fell 6%. This stage measures each group's share and the ratios between groups at every stage of the
funnel (raw -> filtered -> filtered + reweighted -> deduplicated -> the final training set), fixes the shift with importance weights
from a deliberately weak probe (``sample_weights``), and watches every new shard for drift
(``bias_drift_sensor``), alerting through the ``alerts`` resource.

Tables:

- ``demographic_ratios`` (per shard): one row per (stage, attribute source, kind, group). ``kind`` is
  ``share`` (a group's share with its Wilson interval), ``ratio`` (``numerator/denominator`` with a
  log-method interval) or ``keyword`` (a single word's share: OpenAI's keyword table). ``change_vs_raw`` is
  the relative change of the value against the raw stage of the same shards. ``source_version`` identifies
  the word lists / prompts the numbers came from.
- ``overall_demographic_ratios``: the same rows for the whole dataset (``shard = "_overall"``).
- ``sample_weights``: uid, shard, weight (mean 1 over kept samples), p_unfiltered. Feed ``weight`` to the
  training loader (e.g. a WeightedRandomSampler).
- ``alerts`` (written by the alert sink): every drift alert ever raised.
"""


import hashlib
import json
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Mapping, Optional, Sequence

import dagster as dg
import numpy as np
import polars as pl

from curation_assets.core.plots import figure_png, markdown_image, markdown_table, pyplot
from curation_assets.core import demographics as demo
from curation_assets.partitions import partition_keys, shard_asset
from curation_assets.training_set import TRAINING_SET
from resources.alerts import Alert, AlertSink
from resources.encoders import EncoderResource
from resources.settings import CurationSettings
from resources.storage import DeltaStorage

STAGES = ("raw", "filtered", "filtered_reweighted", "deduplicated", "training_set", "training_set_weighted")
OVERALL = "_overall"
RATIOS = "demographic_ratios"
OVERALL_RATIOS = "overall_demographic_ratios"
WEIGHTS = "sample_weights"
DRIFT_CHECK = "demographic_drift"
ALERT_SOURCE = "bias_drift"

RATIO_SCHEMA = {
    "shard": pl.String, "scope": pl.String, "stage": pl.String, "source": pl.String,
    "source_version": pl.String, "kind": pl.String, "group": pl.String, "numerator": pl.String,
    "denominator": pl.String, "n": pl.Int64, "count": pl.Int64, "weight_sum": pl.Float64,
    "weight_sq_sum": pl.Float64, "weight_total": pl.Float64, "weight_sq_total": pl.Float64,
    "value": pl.Float64, "low": pl.Float64, "high": pl.Float64, "change_vs_raw": pl.Float64,
    "n_shards": pl.Int64, "computed_at": pl.Datetime("us", "UTC"), "run_id": pl.String,
}


# --- configuration ---------------------------------------------------------------------------------------

@dataclass
class ClipSettings:
    enabled: bool = True
    prompts: dict[str, list[str]] = field(default_factory=dict)
    neutral: Optional[str] = "none"
    min_probability: float = 0.5
    logit_scale: float = 100.0


@dataclass
class ReweightSettings:
    regularization: Optional[float] = None  # None / "auto": selected from regularization_grid
    regularization_grid: list[float] = field(default_factory=lambda: [1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2])
    selection: str = "balance"
    balance_clusters: int = 16
    max_weight: float = 10.0
    max_train_per_class: int = 50_000
    seed: int = 0


@dataclass
class BiasSettings:
    """The validated ``bias:`` section (defaults in configs/bias.yaml)."""

    confidence: float
    caption_groups: dict[str, list[str]]
    ratio_pairs: list[tuple[str, str]]
    clip: ClipSettings
    reweighting: ReweightSettings
    drift: demo.DriftSettings
    drift_source: str
    drift_stage: str

    @classmethod
    def from_section(cls, section: Mapping[str, Any]) -> "BiasSettings":
        known = {"confidence", "caption_groups", "ratio_pairs", "clip", "reweighting", "drift"}
        unknown = sorted(set(section) - known)
        if unknown:
            raise ValueError(f"bias config: unknown keys {unknown}; known: {sorted(known)}")
        from curation_assets.core.validation import ConfigError, check_fields, check_value

        try:
            check_value("bias.confidence", section.get("confidence", 0.95), float)
            check_fields("bias.clip", ClipSettings, dict(section.get("clip") or {}))
            check_fields("bias.reweighting", ReweightSettings, {
                k: v for k, v in dict(section.get("reweighting") or {}).items() if not (k == "regularization" and v == "auto")})
            check_fields("bias.drift", demo.DriftSettings, {k: v for k, v in dict(section.get("drift") or {}).items()
                                                             if k not in ("source", "stage")})
        except ConfigError as exc:
            raise ConfigError(f"bias config: {exc}") from None
        try:
            groups = {str(k): [str(w) for w in v] for k, v in dict(section.get("caption_groups") or {}).items()}
            demo.CaptionMatcher(groups)  # validates the word lists
            pairs = [tuple(map(str, p)) for p in (section.get("ratio_pairs") or [])]
            for pair in pairs:
                if len(pair) != 2 or any(g not in groups for g in pair):
                    raise ValueError(f"ratio pair {list(pair)} must name two groups of caption_groups {list(groups)}")
            if not pairs:
                names = list(groups)
                pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
            clip = ClipSettings(**dict(section.get("clip") or {}))
            rw_section = dict(section.get("reweighting") or {})
            if rw_section.get("regularization") in ("auto", None):
                rw_section["regularization"] = None
            reweighting = ReweightSettings(**rw_section)
            if reweighting.regularization is not None:
                reweighting.regularization = float(reweighting.regularization)
            reweighting.regularization_grid = [float(v) for v in reweighting.regularization_grid]
            if (reweighting.regularization is not None and reweighting.regularization <= 0) or reweighting.max_weight <= 0:
                raise ValueError("reweighting.regularization and reweighting.max_weight must be positive")
            if not reweighting.regularization_grid or min(reweighting.regularization_grid) <= 0:
                raise ValueError("reweighting.regularization_grid must be a non-empty list of positive penalties")
            if reweighting.selection not in ("balance", "log_loss"):
                raise ValueError(f"reweighting.selection must be balance or log_loss, got {reweighting.selection!r}")
            if int(reweighting.balance_clusters) < 2:
                raise ValueError("reweighting.balance_clusters must be at least 2")
            drift_section = dict(section.get("drift") or {})
            source = drift_section.pop("source", "caption")
            stage = drift_section.pop("stage", "raw")
            if source not in ("caption", "clip"):
                raise ValueError(f"drift.source must be caption or clip, got {source!r}")
            if stage not in STAGES:
                raise ValueError(f"drift.stage must be one of {STAGES}, got {stage!r}")
            drift = demo.DriftSettings(**drift_section)
            confidence = float(section.get("confidence", 0.95))
            if not 0 < confidence < 1:
                raise ValueError(f"confidence must be in (0, 1), got {confidence}")
        except TypeError as exc:  # unknown keys inside a sub-section
            raise ValueError(f"bias config: {exc}") from exc
        return cls(confidence, groups, pairs, clip, reweighting, drift, source, stage)

    @property
    def matcher(self) -> demo.CaptionMatcher:
        return demo.CaptionMatcher(self.caption_groups)


def load_settings(settings: CurationSettings) -> BiasSettings:
    return BiasSettings.from_section(settings.section("bias"))


# --- attribute sources -----------------------------------------------------------------------------------

@dataclass
class AttributeSource:
    """Per-sample group memberships (one boolean column per group, plus ``kw:<word>`` keyword columns for
    captions) keyed by uid, with the version of the source that produced them."""

    name: str
    version: str
    groups: list[str]
    keywords: list[str]
    pairs: list[tuple[str, str]]
    frame: pl.DataFrame  # uid + group columns + keyword columns


def caption_attributes(samples: pl.DataFrame, cfg: BiasSettings) -> AttributeSource:
    matcher = cfg.matcher
    flags = matcher.annotate(samples["caption"])
    frame = pl.concat([samples.select("uid"), flags], how="horizontal")
    return AttributeSource("caption", matcher.version, matcher.group_names, matcher.keywords, cfg.ratio_pairs, frame)


def clip_enabled(encoder: Any, cfg: BiasSettings) -> bool:
    """CLIP zero-shot runs only with a real open_clip checkpoint (kind open_clip and pretrained set)."""
    return bool(cfg.clip.enabled and cfg.clip.prompts and encoder is not None
                and getattr(encoder, "kind", None) == "open_clip" and getattr(encoder, "pretrained", None))


def _clip_text_embeddings(encoder: Any, prompts: Mapping[str, Sequence[str]]) -> dict[str, np.ndarray]:
    """L2-normalised text embeddings of each class's prompts, from the text tower of the encoder's CLIP model
    (the model the encoder resource loaded, so image and text towers come from the same checkpoint)."""
    import open_clip
    import torch

    loaded = encoder.load()
    model = getattr(loaded, "model", None)
    if model is None or not hasattr(model, "encode_text"):
        raise ValueError(f"encoder {getattr(loaded, 'name', loaded)!r} has no CLIP text tower for zero-shot prompts")
    model_name = loaded.name.split(":")[1] if loaded.name.startswith("open_clip:") else encoder.model
    tokenizer = open_clip.get_tokenizer(model_name)
    device = getattr(loaded, "device", "cpu")
    out = {}
    with torch.inference_mode():
        for name, texts in prompts.items():
            t = model.encode_text(tokenizer(list(texts)).to(device)).float()
            out[name] = torch.nn.functional.normalize(t, dim=-1).cpu().numpy()
    return out


def clip_attributes(storage: DeltaStorage, shard: str, uids: pl.Series, encoder: Any, cfg: BiasSettings,
                    text: Optional[dict[str, np.ndarray]] = None) -> Optional[AttributeSource]:
    """CLIP zero-shot groups of one shard's samples. ``text``: the prompts' embeddings, computed once per
    step by the caller (:func:`_clip_text_embeddings` loads the model), else here."""
    ids, x = storage.load_embeddings([shard])
    if ids.height == 0:
        return None
    encoder_names = sorted(set(ids["encoder"].to_list()))
    text = text if text is not None else _clip_text_embeddings(encoder, cfg.clip.prompts)
    members = demo.clip_zero_shot(x, text, neutral=cfg.clip.neutral, logit_scale=cfg.clip.logit_scale,
                                  min_probability=cfg.clip.min_probability)
    groups = [g for g in cfg.clip.prompts if g != cfg.clip.neutral]
    frame = ids.select("uid").with_columns(
        [pl.Series(g, [g in m for m in members], dtype=pl.Boolean) for g in groups])
    frame = pl.DataFrame({"uid": uids}).join(frame, on="uid", how="left", maintain_order="left").fill_null(False)
    spec = {"encoder": encoder_names, "model": encoder.model, "pretrained": encoder.pretrained,
            "prompts": cfg.clip.prompts, "neutral": cfg.clip.neutral,
            "min_probability": cfg.clip.min_probability, "logit_scale": cfg.clip.logit_scale}
    pairs = [p for p in cfg.ratio_pairs if all(g in groups for g in p)] or [
        (a, b) for i, a in enumerate(groups) for b in groups[i + 1:]]
    return AttributeSource("clip", demo.source_version("clip", spec), groups, [], pairs, frame)


# --- stage sets ------------------------------------------------------------------------------------------

def stage_sets(storage: DeltaStorage, shard: str, log: Any = None) -> dict[str, tuple[pl.DataFrame, Optional[np.ndarray]]]:
    """The samples of one shard at every stage that exists: ``{stage: (frame[uid, caption], weights or None)}``.

    raw: ``samples`` with status ok; filtered: kept in ``filtered_samples``; filtered_reweighted: the kept
    samples with their ``sample_weights`` (only when every kept sample of the shard has a weight);
    deduplicated: not removed as a duplicate in ``deduplicated_samples`` (dedup alone, no labels needed);
    training_set and training_set_weighted: kept in ``training_set`` (the final set a trainer reads),
    unweighted and with its weights. Stages whose tables do not exist yet (no labels) are left out.
    """
    raw = (storage.scan("samples", [shard]).filter(pl.col("status") == "ok")
           .select("uid", "caption").sort("uid").collect())
    sets: dict[str, tuple[pl.DataFrame, Optional[np.ndarray]]] = {"raw": (raw, None)}
    if storage.exists("filtered_samples"):
        filt = storage.scan("filtered_samples", [shard]).select("uid", "kept").collect()
        if filt.height:
            kept = raw.join(filt.filter(pl.col("kept")).select("uid"), on="uid", how="semi")
            sets["filtered"] = (kept, None)
            if storage.exists(WEIGHTS):
                w = storage.scan(WEIGHTS, [shard]).select("uid", "weight").collect()
                joined = kept.join(w, on="uid", how="left", maintain_order="left")
                missing = joined["weight"].null_count()
                if missing == 0 and kept.height:
                    sets["filtered_reweighted"] = (kept, joined["weight"].to_numpy())
                elif log is not None:
                    log.info(f"shard {shard}: {missing} kept samples have no weight yet; "
                             "re-materialise sample_weights to measure filtered_reweighted")
    if storage.exists("deduplicated_samples"):
        dedup = storage.scan("deduplicated_samples", [shard]).select("uid", "kept").collect()
        if dedup.height:
            sets["deduplicated"] = (raw.join(dedup.filter(pl.col("kept")).select("uid"), on="uid", how="semi"), None)
    if storage.exists(TRAINING_SET):
        final = (storage.scan(TRAINING_SET, [shard]).filter(pl.col("verdict") == "kept")
                 .select("uid", "weight").collect())
        if final.height:
            joined = raw.join(final, on="uid", how="inner", maintain_order="left")
            sets["training_set"] = (joined.select("uid", "caption"), None)
            sets["training_set_weighted"] = (joined.select("uid", "caption"), joined["weight"].to_numpy())
    return sets


# --- measuring -------------------------------------------------------------------------------------------

def measure(sets: Mapping[str, tuple[pl.DataFrame, Optional[np.ndarray]]], sources: Sequence[AttributeSource],
            confidence: float) -> list[dict]:
    """Rows of ``demographic_ratios`` (without shard / scope / timestamps) for one set of stages."""
    rows: list[dict] = []
    for source in sources:
        raw_values: dict[tuple[str, str], float] = {}
        for stage in STAGES:
            if stage not in sets:
                continue
            frame, weights = sets[stage]
            flags = frame.select("uid").join(source.frame, on="uid", how="left", maintain_order="left").fill_null(False)
            columns = source.groups + [f"kw:{k}" for k in source.keywords]
            group_rows, ratio_rows = demo.group_stats(flags, columns, weights, confidence, source.pairs)
            common = {"stage": stage, "source": source.name, "source_version": source.version}
            for r in group_rows:
                kind = "keyword" if r["group"].startswith("kw:") else "share"
                rows.append({**common, "kind": kind, "group": r["group"].removeprefix("kw:"),
                             "n": r["n"], "count": r["count"], "weight_sum": r["weight_sum"],
                             "weight_sq_sum": r["weight_sq_sum"], "weight_total": r["weight_total"],
                             "weight_sq_total": r["weight_sq_total"], "value": r["share"],
                             "low": r["share_low"], "high": r["share_high"]})
            for r in ratio_rows:
                rows.append({**common, "kind": "ratio", "group": f"{r['numerator']}/{r['denominator']}",
                             "numerator": r["numerator"], "denominator": r["denominator"],
                             "value": r["ratio"], "low": r["ratio_low"], "high": r["ratio_high"]})
        for row in rows:
            if row["source"] == source.name and row["stage"] == "raw":
                raw_values[(row["kind"], row["group"])] = row["value"]
        for row in rows:
            if row["source"] == source.name:
                before = raw_values.get((row["kind"], row["group"]), math.nan)
                row["change_vs_raw"] = demo.relative_change(before, row["value"]) if not math.isnan(before) else None
    return rows


def _frame(rows: list[dict], shard: str, scope: str, n_shards: int, run_id: str, now: datetime) -> pl.DataFrame:
    full = [{**{k: None for k in RATIO_SCHEMA}, "n_shards": n_shards, **r, "shard": shard, "scope": scope,
             "computed_at": now, "run_id": run_id} for r in rows]
    return pl.DataFrame(full, schema=RATIO_SCHEMA)


def overall_rows(table: pl.DataFrame, pairs_by_source: Mapping[str, Sequence[tuple[str, str]]],
                 confidence: float) -> list[dict]:
    """Aggregate per-shard rows into overall rows: counts and weighted sums add up exactly, so shares and
    ratios are recomputed from the sums. Per source only the newest version is aggregated, and every stage
    is compared with the raw stage of the same shards."""
    from curation_assets.core import stats

    shard_rows = table.filter((pl.col("scope") == "shard") & pl.col("kind").is_in(["share", "keyword"]))
    rows: list[dict] = []
    for source in shard_rows["source"].unique().sort().to_list():
        src = shard_rows.filter(pl.col("source") == source)
        version = src.sort("computed_at")["source_version"][-1]
        src = src.filter(pl.col("source_version") == version)
        raw = src.filter(pl.col("stage") == "raw")
        for stage in STAGES:
            part = src.filter(pl.col("stage") == stage)
            if part.height == 0:
                continue
            shards = part["shard"].unique().to_list()
            n_shards = len(shards)
            base = raw.filter(pl.col("shard").is_in(shards))

            def sums(df: pl.DataFrame) -> pl.DataFrame:
                return df.group_by("kind", "group").agg(
                    pl.col("n").sum(), pl.col("count").sum(), pl.col("weight_sum").sum(),
                    pl.col("weight_sq_sum").sum(), pl.col("weight_total").sum(), pl.col("weight_sq_total").sum())

            agg, raw_agg = sums(part), sums(base)
            raw_share = {(r["kind"], r["group"]): (r["weight_sum"] / r["weight_total"] if r["weight_total"] else math.nan)
                         for r in raw_agg.iter_rows(named=True)}
            by_group: dict[str, dict] = {}
            for r in agg.sort("kind", "group").iter_rows(named=True):
                ci = stats.weighted_wilson_interval(r["weight_sum"], r["weight_total"], r["weight_sq_total"], confidence)
                before = raw_share.get((r["kind"], r["group"]), math.nan)
                row = {"stage": stage, "source": source, "source_version": version, "kind": r["kind"],
                       "group": r["group"], "n": r["n"], "count": r["count"], "weight_sum": r["weight_sum"],
                       "weight_sq_sum": r["weight_sq_sum"], "weight_total": r["weight_total"],
                       "weight_sq_total": r["weight_sq_total"], "value": ci.estimate, "low": ci.low,
                       "high": ci.high, "n_shards": n_shards,
                       "change_vs_raw": demo.relative_change(before, ci.estimate) if before == before else None}
                rows.append(row)
                if r["kind"] == "share":
                    by_group[r["group"]] = row
            raw_ratio = {}
            for r in raw_agg.filter(pl.col("kind") == "share").iter_rows(named=True):
                raw_ratio[r["group"]] = r["weight_sum"]
            for a, b in pairs_by_source.get(source, []):
                if a not in by_group or b not in by_group:
                    continue
                ga, gb = by_group[a], by_group[b]
                ci = stats.count_ratio_interval(ga["weight_sum"], gb["weight_sum"], ga["weight_sq_sum"],
                                                gb["weight_sq_sum"], confidence)
                before = (raw_ratio.get(a, 0.0) / raw_ratio[b]) if raw_ratio.get(b) else math.nan
                rows.append({"stage": stage, "source": source, "source_version": version, "kind": "ratio",
                             "group": f"{a}/{b}", "numerator": a, "denominator": b, "value": ci.estimate,
                             "low": ci.low, "high": ci.high, "n_shards": n_shards,
                             "change_vs_raw": demo.relative_change(before, ci.estimate) if before == before else None})
    return rows


def ratio_plot(rows: pl.DataFrame, title: str) -> str:
    """Ratios per stage with their intervals, as a markdown image."""
    plt = pyplot()

    ratios = rows.filter(pl.col("kind") == "ratio")
    fig, ax = plt.subplots(figsize=(6, 3))
    for i, (name, part) in enumerate(ratios.group_by(["source", "group"], maintain_order=True)):
        part = part.with_columns(pl.col("stage").replace_strict({s: k for k, s in enumerate(STAGES)}).alias("order")).sort("order")
        x = np.arange(part.height) + 0.1 * i
        y = part["value"].to_numpy()
        err = np.vstack([y - part["low"].fill_null(np.nan).to_numpy(), part["high"].fill_null(np.nan).to_numpy() - y])
        ax.errorbar(x, y, yerr=np.nan_to_num(err), fmt="o-", capsize=4, label=f"{name[1]} ({name[0]})")
        ax.set_xticks(np.arange(part.height), part["stage"].to_list())
    ax.set_ylabel("ratio")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return markdown_image(figure_png(fig))


def _metadata_values(rows: pl.DataFrame, prefix: str) -> dict[str, Any]:
    md: dict[str, Any] = {}
    for r in rows.filter(pl.col("kind").is_in(["share", "ratio"])).iter_rows(named=True):
        if r["value"] is None or not math.isfinite(r["value"]):
            continue
        key = f"{prefix}{r['source']}/{r['stage']}/{r['kind']}/{r['group']}"
        md[key] = dg.MetadataValue.float(float(r["value"]))
    return md


def _table_markdown(rows: pl.DataFrame, kinds: Sequence[str]) -> str:
    def interval(r: dict) -> str:
        return f"[{r['low']:.4f}, {r['high']:.4f}]" if r["low"] is not None and r["high"] is not None else ""

    def change(r: dict) -> str:
        c = r["change_vs_raw"]
        return f"{100 * c:+.1f}%" if c is not None and math.isfinite(c) else ""

    part = rows.filter(pl.col("kind").is_in(list(kinds)))
    shown = [{"source": r["source"], "stage": r["stage"], "kind": r["kind"], "group": r["group"],
              "value": f"{r['value']:.4f}", "95% interval": interval(r), "change vs raw": change(r)}
             for r in part.iter_rows(named=True)]
    return markdown_table(pl.DataFrame(shown, schema={k: pl.String for k in (
        "source", "stage", "kind", "group", "value", "95% interval", "change vs raw")}))


# --- assets ----------------------------------------------------------------------------------------------

def measure_shard(storage: DeltaStorage, shard: str, cfg: BiasSettings, encoder: EncoderResource,
                  clip_text: Optional[dict[str, np.ndarray]], log: Any = None) -> tuple[list[dict], list[str]]:
    """The ratio rows of one shard at every stage that exists now, and those stages. ``clip_text``: the CLIP
    prompts' embeddings (loaded once per step), or None when CLIP attributes are off."""
    sets = stage_sets(storage, shard, log)
    raw = sets["raw"][0]
    sources = [caption_attributes(raw, cfg)]
    if clip_text is not None:
        clip = clip_attributes(storage, shard, raw["uid"], encoder, cfg, clip_text)
        if clip is not None:
            sources.append(clip)
    return measure(sets, sources, cfg.confidence), list(sets)


def _ratio_pairs(cfg: BiasSettings, use_clip: bool) -> dict[str, list[tuple[str, str]]]:
    pairs = {"caption": cfg.ratio_pairs}
    if use_clip:
        pairs["clip"] = [p for p in cfg.ratio_pairs if all(g in cfg.clip.prompts for g in p)]
    return pairs


@shard_asset(
    deps=["samples", "filtered_samples", dg.AssetDep(WEIGHTS), dg.AssetDep("deduplicated_samples"),
          dg.AssetDep(TRAINING_SET)],
    group_name="bias",
    kinds={"polars", "delta"},
)
def demographic_ratios(context: dg.AssetExecutionContext, storage: DeltaStorage, settings: CurationSettings,
                       encoder: EncoderResource) -> dg.MaterializeResult:
    """Who is in one shard at each stage: each group's share of samples (Wilson interval), the ratio between
    groups (log-method interval) and each keyword's share, for every stage that exists when the shard is
    measured (raw always; filtered, filtered_reweighted, deduplicated, training_set and
    training_set_weighted once their tables exist, so a shard is measured before any label). Caption groups
    come from configurable word lists; CLIP zero-shot groups are added when a real open_clip checkpoint is
    configured. Every row carries the version of its attribute source, so changing word lists or prompts never
    mixes with older numbers. Each shard writes only its own rows; the dataset-wide numbers are
    ``overall_demographic_ratios``. ``bias_drift_sensor`` judges every new measurement."""
    cfg = load_settings(settings)
    use_clip = clip_enabled(encoder, cfg)
    clip_text = _clip_text_embeddings(encoder, cfg.clip.prompts) if use_clip else None
    now = datetime.now(timezone.utc)
    written = []
    for shard in partition_keys(context):
        rows, stages = measure_shard(storage, shard, cfg, encoder, clip_text, context.log)
        frame = _frame(rows, shard, "shard", 1, context.run.run_id, now)
        storage.write_shard(RATIOS, frame, shard)
        written.append(frame)
        context.log.info(f"shard {shard}: stages {stages}")
    table = pl.concat(written) if written else pl.DataFrame(schema=RATIO_SCHEMA)
    metadata: dict[str, Any] = {"shards": dg.MetadataValue.int(len(written)),
                                "stages": ", ".join(s for s in STAGES if s in set(table["stage"].to_list()))}
    if len(written) == 1:
        metadata.update(_metadata_values(written[0], ""))
        metadata["ratios"] = dg.MetadataValue.md(_table_markdown(written[0], ["ratio"]))
    return dg.MaterializeResult(metadata={**metadata, **storage.table_metadata("demographic_ratios", "bias")})


@dg.asset(
    deps=[dg.AssetDep("samples", partition_mapping=dg.AllPartitionMapping()),
          dg.AssetDep("filtered_samples", partition_mapping=dg.AllPartitionMapping()),
          dg.AssetDep(WEIGHTS), dg.AssetDep("deduplicated_samples"), dg.AssetDep(TRAINING_SET)],
    group_name="bias",
    kinds={"polars", "delta"},
)
def overall_demographic_ratios(context: dg.AssetExecutionContext, storage: DeltaStorage, settings: CurationSettings,
                               encoder: EncoderResource) -> dg.MaterializeResult:
    """The bias-amplification story for the whole dataset: per stage (raw -> filtered -> filtered +
    reweighted -> deduplicated -> training set, unweighted and weighted) each group's share, the ratios
    between groups with log-method intervals, and the change against raw; OpenAI's keyword table. Rows have
    ``shard = "_overall"``, ``scope = "overall"``. Every shard is measured afresh against the current tables
    and the counts are summed (one writer of one table, so concurrent shard runs never lose an update)."""
    cfg = load_settings(settings)
    use_clip = clip_enabled(encoder, cfg)
    clip_text = _clip_text_embeddings(encoder, cfg.clip.prompts) if use_clip else None
    now = datetime.now(timezone.utc)
    frames = []
    for shard in storage.shards("samples"):
        rows, _ = measure_shard(storage, shard, cfg, encoder, clip_text)
        frames.append(_frame(rows, shard, "shard", 1, context.run.run_id, now))
    per_shard = pl.concat(frames) if frames else pl.DataFrame(schema=RATIO_SCHEMA)
    overall = _frame(overall_rows(per_shard, _ratio_pairs(cfg, use_clip), cfg.confidence), OVERALL, "overall",
                     len(frames), context.run.run_id, now).with_columns(pl.col("n_shards").fill_null(0))
    storage.write_table(OVERALL_RATIOS, overall)
    metadata: dict[str, Any] = {"shards": dg.MetadataValue.int(len(frames)), "dagster/row_count": overall.height}
    metadata.update(_metadata_values(overall, ""))
    metadata["ratios"] = dg.MetadataValue.md(
        _table_markdown(overall, ["ratio", "share"]) + "\n\n" + ratio_plot(overall, "overall ratio by stage"))
    metadata["keyword table (OpenAI)"] = dg.MetadataValue.md(_table_markdown(
        overall.filter(pl.col("stage").is_in(["filtered", "filtered_reweighted"]) & pl.col("change_vs_raw").is_not_null()
                       & pl.col("change_vs_raw").is_not_nan()), ["keyword"]))
    return dg.MaterializeResult(metadata={**metadata, **storage.table_metadata("overall_demographic_ratios", "bias")})


def read_overall(storage: DeltaStorage) -> pl.DataFrame | None:
    """The ``_overall`` ratio rows (None before ``overall_demographic_ratios`` ran)."""
    return storage.read(OVERALL_RATIOS) if storage.exists(OVERALL_RATIOS) else None


@dg.asset(
    deps=[dg.AssetDep("filtered_samples", partition_mapping=dg.AllPartitionMapping()),
          dg.AssetDep("image_embeddings", partition_mapping=dg.AllPartitionMapping())],
    group_name="bias",
    kinds={"scikitlearn", "delta"},
)
def sample_weights(context: dg.AssetExecutionContext, storage: DeltaStorage,
                   settings: CurationSettings) -> dg.MaterializeResult:
    """Training weights that undo the filter's bias (OpenAI's method for DALL·E 2). A deliberately weak
    linear probe, trained on equal-sized samples of the unfiltered and the filtered set, predicts
    P(unfiltered | image); each kept sample gets w = p / (1 - p), clipped and normalised to mean 1, so
    regions of the data the filter thinned out count for more. The table has uid, shard, weight: feed
    ``weight`` to the training loader."""
    from curation_assets.core import reweighting

    if not storage.exists("filtered_samples"):
        from curation_assets.safety import awaiting_result, label_readiness, safety_config

        return awaiting_result(label_readiness(storage, safety_config(settings)), WEIGHTS)
    cfg = load_settings(settings).reweighting
    ids, x = storage.load_embeddings()
    kept = storage.read("filtered_samples", columns=["uid", "kept"])
    flags = ids.join(kept, on="uid", how="left", maintain_order="left")
    missing = int(flags["kept"].null_count())
    if missing:
        context.log.warning(f"{missing} embedded samples have no filter decision yet; they count as unfiltered only")
    is_kept = flags["kept"].fill_null(False).to_numpy()
    result = reweighting.fit_weights(x, is_kept, regularization=cfg.regularization, max_weight=cfg.max_weight,
                                     max_train_per_class=cfg.max_train_per_class, seed=cfg.seed,
                                     regularization_grid=cfg.regularization_grid, selection=cfg.selection,
                                     balance_clusters=cfg.balance_clusters)
    table = ids.filter(pl.Series(is_kept)).select("uid", "shard").with_columns(
        pl.Series("weight", result.weights, dtype=pl.Float64),
        pl.Series("p_unfiltered", result.probabilities, dtype=pl.Float64))
    storage.write_table(WEIGHTS, table, partition_by=["shard"])
    w = result.weights
    q = np.quantile(w, [0.0, 0.01, 0.25, 0.5, 0.75, 0.99, 1.0]) if len(w) else np.full(7, np.nan)
    context.log.info(f"{len(w)} kept samples weighted; effective sample size {result.effective_sample_size:.0f}; "
                     f"probe L2 penalty {result.regularization:g} ({'given' if cfg.regularization else cfg.selection})")
    metadata = {
        "unfiltered": dg.MetadataValue.int(len(ids)), "kept": dg.MetadataValue.int(int(is_kept.sum())),
        "train_unfiltered": dg.MetadataValue.int(result.n_unfiltered),
        "train_kept": dg.MetadataValue.int(result.n_kept),
        "probe_regularization": dg.MetadataValue.float(result.regularization),
        "regularization_selection": dg.MetadataValue.text("given" if cfg.regularization else cfg.selection),
        "selection_scores": dg.MetadataValue.json({
            f"{lam:g}": {"cv_log_loss": result.cv_log_loss.get(lam), "region_imbalance": result.balance.get(lam)}
            for lam in sorted(set(result.cv_log_loss) | set(result.balance))}),
        "platt_slope": dg.MetadataValue.float(result.calibration[0]),
        "probe_train_accuracy": dg.MetadataValue.float(result.train_accuracy),
        "effective_sample_size": dg.MetadataValue.float(result.effective_sample_size),
        "effective_sample_fraction": dg.MetadataValue.float(result.effective_sample_size / max(1, len(w))),
        "clipped_fraction": dg.MetadataValue.float(result.clipped_fraction),
        **{f"weight_{name}": dg.MetadataValue.float(float(v))
           for name, v in zip(["min", "p01", "p25", "median", "p75", "p99", "max"], q)},
    }
    if len(w):
        plt = pyplot()

        fig, ax = plt.subplots(figsize=(6, 3))
        ax.hist(w, bins=50)
        ax.set_xlabel("weight (mean 1)")
        ax.set_ylabel("kept samples")
        ax.set_title(f"sample weights: ESS {result.effective_sample_size:.0f} of {len(w)}")
        metadata["weight distribution"] = dg.MetadataValue.md(markdown_image(figure_png(fig)))
    return dg.MaterializeResult(metadata={**metadata, **storage.table_metadata("sample_weights", "bias")})


# --- drift -----------------------------------------------------------------------------------------------

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


def drift_alert(verdict: demo.DriftVerdict, cfg: BiasSettings, computed_at: str) -> Alert:
    tripped = [g for g in verdict.groups if g["tripped"]]
    parts = [f"{g['group']} share {g['share']:.3f} vs reference {g['reference_share']:.3f} "
             f"(x{g['effect']:.2f}, p={g['p_value']:.2g})" for g in tripped]
    identity = f"{ALERT_SOURCE}|{verdict.shard}|{verdict.version}|{cfg.drift_stage}|{computed_at}"
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
                   ) -> list[tuple[demo.DriftVerdict, Optional[Alert]]]:
    """Judge ``shards`` (in key order) against their references; shards that alerted earlier (same
    attribute version) never serve as reference, including those that alert within this call."""
    counts, versions, computed = drift_inputs(storage, cfg)
    out = []
    excluded: dict[str, set[str]] = {}
    for shard in sorted(s for s in shards if s in counts):
        version = versions[shard]
        if version not in excluded:
            excluded[version] = alerted_shards(alerts, storage, version)
        verdict = demo.drift_verdict(shard, version, counts, versions, cfg.drift, excluded[version])
        alert = drift_alert(verdict, cfg, computed[shard]) if verdict.alerting else None
        if alert is not None:
            excluded[version].add(shard)
        out.append((verdict, alert))
    return out


def _check_evaluation(verdicts: Sequence[tuple[demo.DriftVerdict, Optional[Alert]]]) -> tuple[bool, dg.AssetCheckSeverity, dict]:
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


defs = dg.Definitions(
    assets=[demographic_ratios, overall_demographic_ratios, sample_weights],
    asset_checks=[demographic_drift],
    sensors=[bias_drift_sensor],
)
