"""The audits stage: what reviewers see before a model is trained on the curated data.

- ``regurgitation_audit``: nearest training images of a set of generated images; flagged copies, the
  regurgitation rate against the full and the deduplicated set, and an HTML page of the matches.
- ``clip_bias_audit``: CLIP zero-shot misclassification of faces by race x gender group, one partition per
  open_clip checkpoint (Birhane et al.'s protocol).
- ``dataset_census``: counts, sizes, caption lengths, safety scores, duplicate rate, caption demographics,
  face counts, per shard and overall.
(The curation report that ties every stage together lives in ``curation_assets/report.py``.)

Every asset reads its upstream tables defensively: a stage that has not run shows as "stage not run".
"""


import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
import polars as pl

from curation_assets.core.plots import figure_png, pyplot
from curation_assets.core import report as rpt
from curation_assets.core.validation import check_fields
from resources.encoders import EncoderResource
from resources.settings import CurationSettings
from resources.shard_source import ShardSource
from resources.storage import DeltaStorage

REGURGITATION_PAGE = "regurgitation.html"
CLIP_BIAS_PAGE = "clip_bias.html"
CENSUS_PAGE = "census.html"
NOT_CONFIGURED = "not configured"
UNCONFIGURED_KEY = "none"

# --------------------------------------------------------------------------- configuration


def _check_keys(where: str, section: dict, known: set[str]) -> None:
    unknown = set(section) - known
    if unknown:
        raise ValueError(f"audits config {where}: unknown keys {sorted(unknown)}; known: {sorted(known)}")


@dataclass
class RegurgitationConfig:
    generated: str | None = None
    k: int = 20
    threshold: float | None = None
    thresholds: dict = field(default_factory=dict)
    fallback_threshold: float = 0.95
    colour_shifts: list = field(default_factory=lambda: [0])
    deduplicated: bool = True
    confidence: float = 0.95
    index: dict = field(default_factory=dict)
    verify: dict = field(default_factory=dict)
    max_shown: int = 200
    thumbnail_px: int = 160


@dataclass
class ClipBiasConfig:
    probe_dir: str | None = None
    probe_csv: str | None = None
    races: list[str] | None = None
    genders: list[str] | None = None
    race_aliases: dict = field(default_factory=dict)
    gender_aliases: dict = field(default_factory=dict)
    labels: list[str] = field(default_factory=list)
    templates: list[str] = field(default_factory=list)
    human_labels: list[str] = field(default_factory=list)
    temperature: float = 100.0
    batch_size: int = 64
    device: str = "auto"
    confidence: float = 0.95
    checkpoints: list[dict] = field(default_factory=list)
    baseline: str | None = None


@dataclass
class CensusConfig:
    face_sample_per_shard: int = 200
    face_max_side: int = 512
    seed: int = 0


@dataclass
class AuditsConfig:
    """The validated ``audits`` section (see ``curation_assets/configs/audits.yaml``)."""

    regurgitation: RegurgitationConfig
    clip_bias: ClipBiasConfig
    census: CensusConfig
    report: dict

    @classmethod
    def from_section(cls, section: dict[str, Any]) -> "AuditsConfig":
        _check_keys("", section, {"regurgitation", "clip_bias", "census", "report"})
        parts = {}
        for name, kind in (("regurgitation", RegurgitationConfig), ("clip_bias", ClipBiasConfig), ("census", CensusConfig)):
            sub = section.get(name) or {}
            _check_keys(name, sub, {f.name for f in fields(kind)})
            check_fields(f"audits.{name}", kind, sub)
            parts[name] = kind(**sub)
        cfg = cls(report=section.get("report") or {}, **parts)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        from curation_assets.core.clip_bias import Checkpoint, prompts

        r = self.regurgitation
        if r.k < 1:
            raise ValueError("audits config regurgitation.k must be >= 1")
        values = {"threshold": r.threshold, "fallback_threshold": r.fallback_threshold}
        if not isinstance(r.thresholds, dict):
            raise ValueError("audits config regurgitation.thresholds maps encoder names to cosines")
        values.update({f"thresholds[{k}]": v for k, v in r.thresholds.items()})
        for name, value in values.items():
            if value is not None and not -1.0 <= float(value) <= 1.0:
                raise ValueError(f"audits config regurgitation.{name} is a cosine in [-1, 1], got {value}")
        if not isinstance(r.colour_shifts, (list, tuple)) or not all(isinstance(v, int) and -255 <= v <= 255 for v in r.colour_shifts):
            raise ValueError(f"audits config regurgitation.colour_shifts is a list of integer offsets, got {r.colour_shifts!r}")
        self.index_config()
        self.verify_config()
        c = self.clip_bias
        if not c.labels or not c.templates:
            raise ValueError("audits config clip_bias.labels and clip_bias.templates must not be empty")
        prompts(c.labels, c.templates)
        missing = set(c.human_labels) - set(c.labels)
        if missing:
            raise ValueError(f"audits config clip_bias.human_labels {sorted(missing)} are not in clip_bias.labels")
        if c.temperature <= 0:
            raise ValueError("audits config clip_bias.temperature must be > 0")
        names = [Checkpoint.from_config(e).name for e in c.checkpoints]
        if len(set(names)) != len(names):
            raise ValueError(f"audits config clip_bias.checkpoints: names must be unique, got {names}")
        if c.baseline is not None and c.baseline not in names:
            raise ValueError(f"audits config clip_bias.baseline {c.baseline!r} is not a configured checkpoint {names}")

    def index_config(self):
        from curation_assets.core.regurgitation import IndexConfig

        known = {f.name for f in fields(IndexConfig)}
        _check_keys("regurgitation.index", self.regurgitation.index, known)
        return IndexConfig(**self.regurgitation.index)

    def verify_config(self):
        from curation_assets.core.regurgitation import ContainmentSettings

        _check_keys("regurgitation.verify", self.regurgitation.verify, {f.name for f in fields(ContainmentSettings)})
        return ContainmentSettings(**self.regurgitation.verify)

    def checkpoints(self):
        from curation_assets.core.clip_bias import Checkpoint

        return [Checkpoint.from_config(e) for e in self.clip_bias.checkpoints]


def audits_config(settings: CurationSettings) -> AuditsConfig:
    return AuditsConfig.from_section(settings.section("audits"))


def checkpoint_names(cfg: AuditsConfig) -> list[str]:
    """Partition keys of ``clip_bias_audit``: the configured checkpoint names (the code location reads them
    when it loads; reload it after editing the list). With no checkpoints configured the single key ``none``
    materialises a "not configured" result."""
    return list(dict.fromkeys(c.name for c in cfg.checkpoints())) or [UNCONFIGURED_KEY]




def _encoder_threshold(model, cfg: RegurgitationConfig) -> tuple[float, str]:
    """The candidate cosine: ``threshold`` when set, else the calibrated value for this encoder in
    ``thresholds``, else ``fallback_threshold``. Never the dedup threshold: generated copies are
    harsher than the near-duplicates inside a training set."""
    if cfg.threshold is not None:
        return float(cfg.threshold), "audits.regurgitation.threshold"
    if cfg.thresholds.get(model.name) is not None:
        return float(cfg.thresholds[model.name]), f"audits.regurgitation.thresholds[{model.name}]"
    return float(cfg.fallback_threshold), "audits.regurgitation.fallback_threshold"


def _training_bytes(storage: DeltaStorage, shard_source: ShardSource, uids: list[str]) -> dict[str, bytes]:
    """Encoded training images read back from their tars (one streaming pass per shard)."""
    from curation_assets.core.shards import read_images

    if not uids:
        return {}
    rows = storage.scan("samples").filter(pl.col("uid").is_in(list(uids))).select("uid", "shard", "image_member").collect()
    out: dict[str, bytes] = {}
    for (shard,), part in rows.partition_by("shard", as_dict=True).items():
        try:
            blobs = read_images(shard_source.get(shard).tar, part["image_member"].to_list())
        except FileNotFoundError:
            continue
        out.update({uid: blobs[m] for uid, m in zip(part["uid"].to_list(), part["image_member"].to_list()) if m in blobs})
    return out


# --------------------------------------------------------------------------- regurgitation


@dg.asset(
    deps=[dg.AssetDep("image_embeddings", partition_mapping=dg.AllPartitionMapping()),
          dg.AssetDep("samples", partition_mapping=dg.AllPartitionMapping()), "deduplicated_samples"],
    group_name="audits",
    kinds={"deltalake", "faiss", "html"},
    pool="gpu",
)
def regurgitation_audit(
    context: dg.AssetExecutionContext,
    storage: DeltaStorage,
    settings: CurationSettings,
    encoder: EncoderResource,
    shard_source: ShardSource,
) -> dg.MaterializeResult:
    """Nearest training images of every generated image, over the whole training set and over the
    deduplicated set. A neighbour at or above the similarity threshold is a candidate; pixel verification
    (the generated image found again inside the training image) confirms it, and the generated image is
    flagged as a likely copy. The regurgitation rate (flagged share) comes with a Wilson interval. Rows:
    generated_id, reference ("full" / "deduplicated"), rank, train_uid, similarity, candidate,
    verification, flagged. Page: reports/regurgitation.html with every flagged pair side by side."""
    from curation_assets.core import regurgitation as rg

    cfg = audits_config(settings)
    rc = cfg.regurgitation
    page_path = storage.reports_dir() / REGURGITATION_PAGE
    if not rc.generated:
        reason = "set audits.regurgitation.generated to a directory of generated images (or of .tar shards)"
        rpt.write_page(page_path, rpt.render_page("Regurgitation audit", [rpt.Section("status", "Status", missing=f"Not configured: {reason}.")]))
        storage.write_json("regurgitation_audit", {"status": NOT_CONFIGURED, "reason": reason})
        return dg.MaterializeResult(metadata={"status": NOT_CONFIGURED, "configure": reason, "page": dg.MetadataValue.path(str(page_path))})

    generated = rg.list_generated(rc.generated)
    if not generated:
        raise ValueError(f"audits.regurgitation.generated={rc.generated}: no images found there")
    model = encoder.load()
    xq, variants = rg.encode_queries(model, [g.data for g in generated], rc.colour_shifts)
    ids, xb = storage.load_embeddings()
    encoders = sorted(ids["encoder"].unique().to_list()) if ids.height else []
    if encoders and encoders != [model.name]:
        raise ValueError(f"training embeddings were made by {encoders} but the encoder resource is {model.name}: "
                         "re-materialise image_embeddings with this encoder or configure the same encoder")
    threshold, threshold_source = _encoder_threshold(model, rc)
    index_cfg = cfg.index_config()
    gen_ids = [g.id for g in generated]
    uids = ids["uid"].to_list()
    context.log.info(f"searching {len(generated)} generated images against {len(uids)} training images "
                     f"({index_cfg.choose(len(uids))} index, {variants} colour-shift variant(s) per image, "
                     f"threshold {threshold} from {threshold_source})")

    references: dict[str, tuple[list[str], np.ndarray]] = {"full": (uids, xb)}
    dedup_note = None
    if rc.deduplicated:
        dedup = storage.read_if_exists("deduplicated_samples")
        if dedup is None or "uid" not in dedup.columns:
            dedup_note = "deduplicated_samples not materialised (dedup stage not run): full set only"
        else:
            if "kept" in dedup.columns:
                dedup = dedup.filter(pl.col("kept"))
            keep = ids["uid"].is_in(dedup["uid"].implode()).to_numpy()
            references["deduplicated"] = ([u for u, k in zip(uids, keep) if k], xb[keep])

    tables, searches = [], {}
    for reference, (ref_uids, ref_x) in references.items():
        searches[reference] = rg.merge_variants(rg.search(ref_x, xq, rc.k, index_cfg, threshold), variants)
        tables.append(rg.neighbour_table(gen_ids, searches[reference], ref_uids, threshold, reference))
    table = pl.concat(tables)
    gen_bytes = {g.id: g.data for g in generated}
    verify = cfg.verify_config()
    if verify.enabled:
        candidates = table.filter(pl.col("candidate"))["train_uid"].unique().to_list()
        context.log.info(f"verifying {table['candidate'].sum()} candidate matches against {len(candidates)} training images")
        train_bytes = _training_bytes(storage, shard_source, candidates)
        table = rg.verify_candidates(table, gen_bytes, train_bytes, verify)
    else:
        table = table.with_columns(verification=pl.lit(None, pl.Float32))
    summaries = []
    for reference, result in searches.items():
        summary = rg.rate_summary(table, len(gen_ids), reference, rc.confidence)
        summary.update(n_train=len(references[reference][0]), index=result.index_kind, recall_at_k=result.recall_at_k,
                       flag_recall=result.flag_recall, recall_queries=result.recall_queries, index_params=result.params)
        summaries.append(summary)
    storage.write_table("regurgitation_audit", table)

    full_rows = table.filter(pl.col("reference") == "full")
    best = full_rows.filter(pl.col("flagged")).sort("rank").unique("generated_id", keep="first")
    flagged = best.sort("similarity", descending=True).head(rc.max_shown)
    shown = _training_bytes(storage, shard_source, flagged["train_uid"].to_list())
    train_thumbs = {uid: rpt.thumbnail_data_uri(data, rc.thumbnail_px) for uid, data in shown.items()}
    captions = dict(storage.scan("samples").filter(pl.col("uid").is_in(flagged["train_uid"].to_list()))
                    .select("uid", "caption").collect().iter_rows())
    matches = [{"generated_id": r["generated_id"], "generated_src": rpt.thumbnail_data_uri(gen_bytes[r["generated_id"]], rc.thumbnail_px),
                "train_uid": r["train_uid"], "train_src": train_thumbs.get(r["train_uid"]), "similarity": r["similarity"],
                "verification": r["verification"],
                "caption": captions.get(r["train_uid"]), "reference": "full"} for r in flagged.iter_rows(named=True)]
    summary_df = pl.DataFrame([{k: v for k, v in s.items() if k != "index_params"} for s in summaries])
    hist = _similarity_histogram(table, threshold)
    sections = [
        rpt.Section("summary", "Regurgitation rate", blocks=[rpt.table_html(summary_df, digits=4), rpt.plot_html(hist, "best-match similarity")],
                    notes=[_regurgitation_note(len(gen_ids), rc, model.name, threshold, threshold_source, verify)]
                    + ([dedup_note] if dedup_note else [])),
        rpt.Section("matches", f"Flagged matches ({best.height} generated images; {len(matches)} shown)",
                    blocks=[rpt.matches_html(matches)] if matches else [rpt.paragraph("No generated image reaches the threshold.")]),
    ]
    rpt.write_page(page_path, rpt.render_page("Regurgitation audit", sections, subtitle=f"training set: {len(uids)} images"))
    (storage.artifact_dir("regurgitation_audit") / "matches.json").write_text(json.dumps(matches))
    storage.write_json("regurgitation_audit", {"status": "ok", "threshold": threshold, "threshold_source": threshold_source,
                                                  "encoder": model.name, "summaries": summaries, "note": dedup_note})
    full = summaries[0]
    metadata: dict[str, Any] = {
        "dagster/row_count": table.height,
        "generated_images": len(gen_ids),
        "training_images": len(uids),
        "threshold": threshold,
        "threshold_source": threshold_source,
        "index": full["index"],
        "regurgitation_rate": dg.FloatMetadataValue(full["rate"]),
        "rate_ci": f"[{full['ci_low']:.4f}, {full['ci_high']:.4f}]",
        "flagged": full["n_flagged"],
        "summary": dg.MetadataValue.md(rpt.markdown_table(summary_df, digits=4) + "\n\n" + rpt.markdown_png(hist, "best-match similarity")),
        "page": dg.MetadataValue.path(str(page_path)),
    }
    if full["recall_at_k"] is not None:
        metadata["index_recall_at_k"] = dg.FloatMetadataValue(full["recall_at_k"])
    if full["flag_recall"] is not None:
        metadata["index_flag_recall"] = dg.FloatMetadataValue(full["flag_recall"])
    if "deduplicated" in references:
        metadata["regurgitation_rate_deduplicated"] = dg.FloatMetadataValue(summaries[1]["rate"])
    return dg.MaterializeResult(metadata={**metadata, **storage.table_metadata("regurgitation_audit", "regurgitation")})


def _regurgitation_note(n: int, rc: RegurgitationConfig, encoder: str, threshold: float, source: str, verify) -> str:
    rule = (f"and flagged when pixel verification confirms it (gradient NCC >= {verify.threshold:.2f} after rescaling "
            "it into the training image)" if verify.enabled else "and flagged as such (verification disabled)")
    variants = len(_colour_grid(rc.colour_shifts))
    shifts = (f" (best of {variants} colour-shifted variants of the generated image, offsets {sorted(set(rc.colour_shifts) | {0})} "
              "per channel)" if variants > 1 else "")
    return (f"{n} generated images from {rc.generated}; encoder {encoder}. A training image is a candidate match when "
            f"its cosine similarity{shifts} is >= {threshold:.3f} ({source}), {rule}. Intervals: Wilson {rc.confidence:.0%}.")


def _colour_grid(shifts) -> list:
    from curation_assets.core.regurgitation import colour_shift_grid

    return colour_shift_grid(shifts)


def _similarity_histogram(table: pl.DataFrame, threshold: float) -> bytes:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(5.5, 3.2), dpi=90)
    for reference in table["reference"].unique(maintain_order=True).to_list():
        sims = table.filter((pl.col("reference") == reference) & (pl.col("rank") == 1))["similarity"].to_numpy()
        ax.hist(sims, bins=40, alpha=0.55, label=f"{reference} set")
    ax.axvline(threshold, color="crimson", linestyle="--", label=f"threshold {threshold:.2f}")
    ax.set_xlabel("cosine similarity to the nearest training image")
    ax.set_ylabel("generated images")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return figure_png(fig)








# --------------------------------------------------------------------------- CLIP bias


def build_clip_bias_audit(checkpoint_names: list[str]) -> dg.AssetsDefinition:
    """The ``clip_bias_audit`` asset with one static partition per checkpoint name.

    Static rather than dynamic partitions: the checkpoints are configuration (a short list a user edits),
    every checkpoint is visible in the UI from the start, and the graph runner materialises static
    partitions like the clusterings. :func:`build_defs` passes :func:`checkpoint_names`."""

    @dg.asset(
        name="clip_bias_audit",
        partitions_def=dg.StaticPartitionsDefinition(checkpoint_names),
        group_name="audits",
        kinds={"pytorch", "deltalake", "html"},
        pool="gpu",
    )
    def clip_bias_audit(context: dg.AssetExecutionContext, storage: DeltaStorage, settings: CurationSettings) -> dg.MaterializeResult:
        """Zero-shot CLIP classification of a face probe set into human, animal and offensive labels, per
        race x gender group (Birhane et al., "The Dark Side of Dataset Scaling"): top-1 share with Wilson
        intervals and mean probability per group x label; against the baseline checkpoint the change in
        percentage points with a two-proportion z-test. Rows of all checkpoints share the table
        ``clip_bias_audit`` (column ``checkpoint``); page: reports/clip_bias.html."""
        from curation_assets.partitions import partition_keys

        cfg = audits_config(settings)
        results = {key: _audit_checkpoint(context, storage, cfg, key) for key in partition_keys(context)}
        page = _write_clip_bias_page(storage, cfg)
        statuses = {k: v["status"] for k, v in results.items()}
        metadata: dict[str, Any] = {"status": ", ".join(f"{k}: {v}" for k, v in statuses.items()),
                                    "page": dg.MetadataValue.path(str(page))}
        for key, res in results.items():
            if res["status"] != "ok":
                metadata[f"{key}: configure"] = res["reason"]
            else:
                metadata[f"{key}: probes"] = res["n_probes"]
                metadata[f"{key}: misclassified as non-human"] = dg.FloatMetadataValue(res["non_human_share"])
                metadata[f"{key}: shares"] = dg.MetadataValue.md(res["markdown"])
        return dg.MaterializeResult(metadata={**metadata, **storage.table_metadata("clip_bias_audit")})

    return clip_bias_audit


def _audit_checkpoint(context, storage: DeltaStorage, cfg: AuditsConfig, key: str) -> dict:
    from curation_assets.core import clip_bias as cb

    c = cfg.clip_bias
    spec = {ck.name: ck for ck in cfg.checkpoints()}.get(key)
    reason = None
    if not c.probe_dir:
        reason = ("set audits.clip_bias.probe_dir to a directory of face images with a CSV (image, race, gender), "
                  "e.g. the Chicago Face Dataset")
    elif spec is None:
        reason = f"checkpoint {key!r} is not in audits.clip_bias.checkpoints (reload the code location after editing it)"
    if reason is None:
        probe = cb.load_probe_set(c.probe_dir, c.probe_csv, c.races, c.genders, c.race_aliases, c.gender_aliases)
        device = c.device
        if device == "auto":
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            model, preprocess, tokenizer = cb.load_checkpoint(spec, device)
        except cb.CheckpointUnavailable as exc:
            reason = f"{exc}; put the weights on this machine and set pretrained to their path"
    if reason is not None:
        context.log.warning(f"clip_bias_audit[{key}]: {NOT_CONFIGURED}: {reason}")
        _replace_checkpoint_rows(storage, key, None)
        status = {"status": NOT_CONFIGURED, "reason": reason}
        storage.write_json("clip_bias_audit", status, f"{key}.json")
        return status
    image_emb, label_emb = cb.encode_probe_set(model, preprocess, tokenizer, probe, c.labels, c.templates, c.batch_size, device)
    probs = cb.zero_shot_probabilities(image_emb, label_emb, c.temperature)
    shares = cb.group_label_shares(probs, c.labels, probe.table["group"].to_list(), c.confidence)
    rows = shares.with_columns(
        checkpoint=pl.lit(key), model=pl.lit(spec.model), pretrained=pl.lit(spec.pretrained or "random-init"),
        human_label=pl.col("label").is_in(c.human_labels),
    )
    _replace_checkpoint_rows(storage, key, rows)
    non_human = float(rows.filter((pl.col("group") == "all") & ~pl.col("human_label"))["share"].sum())
    status = {"status": "ok", "reason": None, "n_probes": len(probe), "non_human_share": non_human,
              "random_init": spec.random_init, "markdown": cb.shares_markdown(shares, c.labels)}
    storage.write_json("clip_bias_audit", status, f"{key}.json")
    context.log.info(f"clip_bias_audit[{key}]: {len(probe)} probes, {non_human:.1%} top-1 outside the human labels")
    return status


def _replace_checkpoint_rows(storage: DeltaStorage, key: str, rows: pl.DataFrame | None) -> None:
    """The table holds every checkpoint's rows (partitioned by ``checkpoint``); a partition replaces only its
    own with a predicate overwrite, so a UI backfill running one run per checkpoint at once loses nothing."""
    if rows is None or rows.height == 0:
        storage.delete_where("clip_bias_audit", "checkpoint", key)
    else:
        storage.replace_where("clip_bias_audit", rows, "checkpoint", key)


def clip_bias_sections(storage: DeltaStorage, cfg: AuditsConfig) -> list[rpt.Section]:
    """Sections of the CLIP bias page (and of the report): per checkpoint the heatmap and share table, then
    each checkpoint against the baseline."""
    from curation_assets.core import clip_bias as cb

    names = [ck.name for ck in cfg.checkpoints()]
    table = storage.read_if_exists("clip_bias_audit")
    sections = []
    present = [] if table is None or table.height == 0 else list(dict.fromkeys(table["checkpoint"].to_list()))
    for name in list(dict.fromkeys(names + present)):
        status = storage.read_json("clip_bias_audit", f"{name}.json") or {}
        if name not in present:
            reason = status.get("reason") or "not materialised yet"
            sections.append(rpt.Section(f"clip-{name}", f"Checkpoint {name}", missing=f"Not configured: {reason}"))
            continue
        shares = table.filter(pl.col("checkpoint") == name)
        labels = [label for label in dict.fromkeys(shares["label"].to_list())]
        notes = [f"{shares['n'].max()} probe faces; top-1 share per group x label with Wilson intervals; temperature {cfg.clip_bias.temperature}."]
        if status.get("random_init"):
            notes.append("This checkpoint is a randomly initialised model: a pipeline test, not an audit result.")
        sections.append(rpt.Section(
            f"clip-{name}", f"Checkpoint {name}", notes=notes,
            blocks=[rpt.plot_html(cb.heatmap_png(shares, f"top-1 share (%) - {name}"), f"heatmap {name}"),
                    rpt.table_html(cb.shares_wide(shares, labels), caption="top-1 share [95% Wilson interval]"),
                    rpt.table_html(shares.pivot(on="label", index="group", values="mean_prob").select("group", *labels),
                                   caption="mean probability")]))
    present = [n for n in names if n in present] + [n for n in present if n not in names]  # config order
    baseline = cfg.clip_bias.baseline or (present[0] if present else None)
    if baseline in present and len(present) > 1:
        comparisons = pl.concat([cb.compare_checkpoints(table, baseline, other) for other in present if other != baseline])
        sections.append(rpt.Section(
            "clip-compare", f"Change against {baseline}",
            notes=["delta_pp: change of the top-1 share in percentage points; p_value: pooled two-proportion z-test."],
            blocks=[rpt.table_html(comparisons.filter(pl.col("group") != "all"))]))
    return sections


def _write_clip_bias_page(storage: DeltaStorage, cfg: AuditsConfig) -> Path:
    path = storage.reports_dir() / CLIP_BIAS_PAGE
    rpt.write_page(path, rpt.render_page("CLIP misclassification audit", clip_bias_sections(storage, cfg),
                                         subtitle="Protocol of Birhane et al., 'The Dark Side of Dataset Scaling'"))
    return path




# --------------------------------------------------------------------------- census


@dg.asset(
    deps=[dg.AssetDep("samples", partition_mapping=dg.AllPartitionMapping()),
          dg.AssetDep("safety_scores", partition_mapping=dg.AllPartitionMapping()), "dedup_groups"],
    group_name="audits",
    kinds={"deltalake", "opencv", "html"},
)
def dataset_census(context: dg.AssetExecutionContext, storage: DeltaStorage, settings: CurationSettings,
                   shard_source: ShardSource) -> dg.MaterializeResult:
    """What the dataset holds, per shard and overall: samples per ingest status, image sizes, caption
    lengths, safety score distributions, the duplicate rate, demographic words in captions (the bias
    stage's word lists) and frontal faces found by OpenCV's Haar cascade on a sample of images. Table
    ``dataset_census``: one row per shard (and ``all``); details as parquet and plots under
    artifacts/dataset_census; page: reports/census.html."""
    from curation_assets.core import census

    cfg = audits_config(settings).census
    samples = storage.read("samples")
    out_dir = storage.artifact_dir("dataset_census")
    frames: dict[str, pl.DataFrame] = {
        "status_counts": census.status_counts(samples),
        "distributions": census.size_and_caption_stats(samples),
    }
    bias_groups = settings.section("bias").get("caption_groups") or None
    frames["demographic_words"] = census.demographic_word_frequencies(samples, bias_groups)
    plots: dict[str, bytes] = {}
    ok = samples.filter(pl.col("status") == "ok")
    plots["image_sizes"] = census.histogram_png({"width": ok["width"].to_numpy(), "height": ok["height"].to_numpy()},
                                                "image size", "pixels")
    plots["caption_length"] = census.histogram_png({"words": ok["caption"].fill_null("").str.split(" ").list.len().to_numpy()},
                                                   "caption length", "words")
    notes: dict[str, str] = {}
    scores = storage.read_if_exists("safety_scores")
    if scores is not None:
        frames["safety_scores"] = census.category_score_summary(scores)
        by_category = {c: part["score"].to_numpy() for (c,), part in scores.group_by(["category"], maintain_order=True)}
        if by_category:
            plots["safety_scores"] = census.histogram_png(dict(sorted(by_category.items())),
                                                          "safety scores per category", "score", log=True)
    else:
        notes["safety_scores"] = "safety_scores not materialised (safety stage not run)"
    groups = storage.read_if_exists("dedup_groups")
    if groups is not None and {"uid", "group_id", "is_representative"} <= set(groups.columns):
        frames["duplicates"] = census.duplicate_rate(groups, samples)
    else:
        notes["duplicates"] = "dedup_groups not materialised (dedup stage not run)"

    faces = _face_counts(context, samples, shard_source, cfg)
    if faces.height:
        frames["faces"] = census.face_summary(faces)
        plots["faces"] = census.histogram_png({"faces per image": faces.filter(pl.col("faces") >= 0)["faces"].to_numpy()},
                                              "frontal faces (Haar cascade, sampled images)", "faces", bins=10)
    words = frames["demographic_words"].filter((pl.col("shard") == "all") & pl.col("word").is_null())
    plots["demographic_words"] = census.bar_png(words["group"].to_list(), (words["share"].fill_null(0) * 100).to_list(),
                                                "captions mentioning a group", "% of captioned samples")

    for name, frame in frames.items():
        frame.write_parquet(out_dir / f"{name}.parquet")
    for name, png in plots.items():
        (out_dir / f"{name}.png").write_bytes(png)
    (out_dir / "notes.json").write_text(json.dumps(notes))

    per_shard = _census_table(frames)
    storage.write_table("dataset_census", per_shard)
    page = storage.reports_dir() / CENSUS_PAGE
    rpt.write_page(page, rpt.render_page("Dataset census", census_sections(storage), subtitle=f"{samples.height} samples"))
    total = per_shard.filter(pl.col("shard") == "all").row(0, named=True)
    return dg.MaterializeResult(metadata={
        **storage.table_metadata("dataset_census", "census"),
        "dagster/row_count": per_shard.height,
        "samples": samples.height,
        "ok": int(total.get("ok") or 0),
        "rejected": int(total.get("rejected") or 0),
        "per_shard": dg.MetadataValue.md(rpt.markdown_table(per_shard)),
        "plots": dg.MetadataValue.md("\n\n".join(rpt.markdown_png(p, n) for n, p in plots.items())),
        "page": dg.MetadataValue.path(str(page)),
        **({"not run": ", ".join(notes.values())} if notes else {}),
    })


def _face_counts(context, samples: pl.DataFrame, shard_source: ShardSource, cfg: CensusConfig) -> pl.DataFrame:
    from curation_assets.core import census
    from curation_assets.core.shards import read_images

    schema = {"shard": pl.String, "uid": pl.String, "faces": pl.Int64}
    if cfg.face_sample_per_shard <= 0:
        return pl.DataFrame(schema=schema)
    detector = census.face_detector()
    rows = []
    ok = samples.filter(pl.col("status") == "ok").select("uid", "shard", "image_member")
    for (shard,), part in sorted(ok.partition_by("shard", as_dict=True).items()):
        part = part.sample(min(cfg.face_sample_per_shard, part.height), seed=cfg.seed).sort("uid")
        try:
            blobs = read_images(shard_source.get(shard).tar, part["image_member"].to_list())
        except FileNotFoundError:
            context.log.warning(f"census: shard {shard} tar is gone; no face counts for it")
            continue
        members = [m for m in part["image_member"].to_list() if m in blobs]
        counts = census.count_faces([blobs[m] for m in members], detector, cfg.face_max_side)
        uid_of = dict(zip(part["image_member"].to_list(), part["uid"].to_list()))
        rows += [{"shard": shard, "uid": uid_of[m], "faces": c} for m, c in zip(members, counts)]
    return pl.DataFrame(rows, schema=schema)


def _census_table(frames: dict[str, pl.DataFrame]) -> pl.DataFrame:
    counts = frames["status_counts"].pivot(on="status", index="shard", values="n").fill_null(0)
    for status in ("ok", "rejected"):
        if status not in counts.columns:
            counts = counts.with_columns(pl.lit(0).alias(status))
    counts = counts.with_columns(samples=pl.sum_horizontal(pl.exclude("shard")))
    dist = frames["distributions"].filter(pl.col("metric").is_in(["width", "height", "caption_words"]))
    wide = dist.select("shard", "metric", "p50").pivot(on="metric", index="shard", values="p50")
    wide = wide.rename({c: f"median_{c}" for c in wide.columns if c != "shard"})
    table = counts.join(wide, on="shard", how="left")
    words = frames["demographic_words"].filter(pl.col("word").is_null())
    if words.height:
        table = table.join(words.pivot(on="group", index="shard", values="share")
                           .rename(lambda c: c if c == "shard" else f"share_{c}"), on="shard", how="left")
    if "duplicates" in frames:
        table = table.join(frames["duplicates"].select("shard", "duplicate_rate"), on="shard", how="left")
    if "faces" in frames:
        table = table.join(frames["faces"].select("shard", "share_with_face", "mean_faces"), on="shard", how="left")
    order = pl.when(pl.col("shard") == "all").then(1).otherwise(0)
    return table.sort(order, "shard")


def census_sections(storage: DeltaStorage) -> list[rpt.Section]:
    """The census as page sections, from the artefacts ``dataset_census`` wrote."""
    out_dir = storage.root_path / "artifacts" / "dataset_census"
    table = storage.read_if_exists("dataset_census")
    if table is None:
        return [rpt.Section("census", "Dataset census", missing="dataset_census not materialised (stage not run)")]
    notes = json.loads((out_dir / "notes.json").read_text()) if (out_dir / "notes.json").is_file() else {}
    plots = [rpt.plot_html(p.read_bytes(), p.stem) for p in sorted(out_dir.glob("*.png"))]
    sections = [rpt.Section("census", "Dataset census", blocks=[rpt.table_html(table), *plots], notes=list(notes.values()))]
    titles = {"distributions": "Image size and caption length", "safety_scores": "Safety score distributions",
              "duplicates": "Duplicate rate", "demographic_words": "Demographic words in captions",
              "faces": "Faces (OpenCV Haar cascade, sampled images)"}
    for name, title in titles.items():
        path = out_dir / f"{name}.parquet"
        if path.is_file():
            frame = pl.read_parquet(path)
            if name == "demographic_words":
                frame = frame.filter(pl.col("shard") == "all")
            sections.append(rpt.Section(f"census-{name}", title, blocks=[rpt.table_html(frame)]))
    return sections


def build_defs(settings: CurationSettings) -> dg.Definitions:
    """The audits, with one ``clip_bias_audit`` partition per configured checkpoint."""
    return dg.Definitions(assets=[regurgitation_audit, build_clip_bias_audit(checkpoint_names(audits_config(settings))),
                                  dataset_census])
