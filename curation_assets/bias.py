"""The bias stage: demographic ratios per stage, OpenAI's reweighting, and drift alerts for new shards.

Filtering can shift who is in a dataset: in DALL·E 2's data, captions mentioning "woman" fell 14% while
"man" fell 6%. This stage measures each group's share and the ratios between groups at every stage of the
funnel (raw -> filtered -> filtered + reweighted -> deduplicated -> the final training set), fixes the shift
with importance weights from a deliberately weak probe (``sample_weights``, in ``bias_weights.py``), and
watches every new shard for drift (``bias_drift.py``), alerting through the ``alerts`` resource. Its settings
are ``core.demographics.BiasSettings``.

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


import math
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Mapping, Optional, Sequence

import dagster as dg
import numpy as np
import polars as pl

from curation_assets.core import demographics
from curation_assets.core.demographics import BiasSettings, STAGES
from curation_assets.core.plots import figure_png, markdown_image, markdown_table, pyplot
from curation_assets.partitions import partition_keys, shard_asset
from curation_assets.training_set import TRAINING_SET
from resources.encoders import EncoderResource
from resources.settings import CurationSettings
from resources.storage import DeltaStorage

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
    measured_only: bool = False  # shares over the samples in ``frame`` only (a sampled source), not every sample


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
    members = demographics.clip_zero_shot(x, text, neutral=cfg.clip.neutral, logit_scale=cfg.clip.logit_scale,
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
    return AttributeSource("clip", demographics.source_version("clip", spec), groups, [], pairs, frame)


def image_attributes_source(storage: DeltaStorage, shard: str) -> Optional[AttributeSource]:
    """Groups from what the images show (``image_attributes``): ``women`` / ``men`` = the image has at least one
    face the face model estimates female / male. Only the sampled images the model saw count, so shares are
    over measured images; the version names the face model, so a new model resets the drift reference."""
    if not storage.exists("image_attributes"):
        return None
    rows = (storage.scan("image_attributes", [shard]).select("uid", "female_faces", "male_faces", "face_model")
            .collect())
    if rows.height == 0:
        return None
    frame = rows.select("uid", women=pl.col("female_faces") > 0, men=pl.col("male_faces") > 0)
    version = demographics.source_version("image", {"face_model": sorted(set(rows["face_model"].to_list()))})
    return AttributeSource("image", version, ["women", "men"], [], [("women", "men")], frame, measured_only=True)


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
            if source.measured_only:
                keep = frame["uid"].is_in(source.frame["uid"].implode()).to_numpy()
                frame, weights = frame.filter(pl.Series(keep)), (weights[keep] if weights is not None else None)
            flags = frame.select("uid").join(source.frame, on="uid", how="left", maintain_order="left").fill_null(False)
            columns = source.groups + [f"kw:{k}" for k in source.keywords]
            group_rows, ratio_rows = demographics.group_stats(flags, columns, weights, confidence, source.pairs)
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
                row["change_vs_raw"] = demographics.relative_change(before, row["value"]) if not math.isnan(before) else None
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
                       "change_vs_raw": demographics.relative_change(before, ci.estimate) if before == before else None}
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
                             "change_vs_raw": demographics.relative_change(before, ci.estimate) if before == before else None})
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
    image = image_attributes_source(storage, shard)
    if image is not None:
        sources.append(image)
    if clip_text is not None:
        clip = clip_attributes(storage, shard, raw["uid"], encoder, cfg, clip_text)
        if clip is not None:
            sources.append(clip)
    return measure(sets, sources, cfg.confidence), list(sets)


def _ratio_pairs(cfg: BiasSettings, use_clip: bool) -> dict[str, list[tuple[str, str]]]:
    pairs = {"caption": cfg.ratio_pairs, "image": [("women", "men")]}
    if use_clip:
        pairs["clip"] = [p for p in cfg.ratio_pairs if all(g in cfg.clip.prompts for g in p)]
    return pairs


@shard_asset(
    deps=["samples", "filtered_samples", "image_attributes", dg.AssetDep(WEIGHTS),
          dg.AssetDep("deduplicated_samples"), dg.AssetDep(TRAINING_SET)],
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


defs = dg.Definitions(assets=[demographic_ratios, overall_demographic_ratios])
