"""``regurgitation_audit``: the nearest training images of a set of generated images, flagged copies, the
regurgitation rate against the full and the deduplicated set, and an HTML page of the matches.

Retrieval and verification are in ``core/regurgitation.py`` and ``core/pixel_verify.py``; the settings are
``audits.regurgitation``.
"""

import json
from typing import Any

import dagster as dg
import numpy as np
import polars as pl

from curation_assets.audits import NOT_CONFIGURED, REGURGITATION_PAGE, RegurgitationConfig, audits_config
from curation_assets.core import report as rpt
from curation_assets.core.plots import figure_png, markdown_image, markdown_table, pyplot
from resources.encoders import EncoderResource
from resources.settings import CurationSettings
from resources.shard_source import ShardSource
from resources.storage import DeltaStorage


def _encoder_threshold(model, cfg: RegurgitationConfig) -> tuple[float, str]:
    """The candidate cosine: ``threshold`` when set, else the calibrated value for this encoder in
    ``thresholds``, else ``fallback_threshold``. Never the dedup threshold: generated copies are
    harsher than the near-duplicates inside a training set."""
    if cfg.threshold is not None:
        return float(cfg.threshold), "audits.regurgitation.threshold"
    if cfg.thresholds.get(model.name) is not None:
        return float(cfg.thresholds[model.name]), f"audits.regurgitation.thresholds[{model.name}]"
    return float(cfg.fallback_threshold), "audits.regurgitation.fallback_threshold"


def _search_streamed(storage: DeltaStorage, xq: np.ndarray, k: int, kept_uids: pl.Series | None) -> dict:
    """Exact search of every reference set, reading the training embeddings one shard at a time."""
    from curation_assets.core import regurgitation as rg

    shards = sorted(storage.shards("image_embeddings"))

    def shard_blocks(keep: bool):
        for shard in shards:
            ids, x = storage.load_embeddings([shard])
            if keep:
                mask = ids["uid"].is_in(kept_uids.implode()).to_numpy()
                yield ids["uid"].filter(pl.Series(mask)).to_list(), x[mask]
            else:
                yield ids["uid"].to_list(), x

    out = {"full": rg.search_streamed(shard_blocks(False), xq, k)}
    if kept_uids is not None:
        out["deduplicated"] = rg.search_streamed(shard_blocks(True), xq, k)
    return out


def _training_bytes(storage: DeltaStorage, shard_source: ShardSource, uids: list[str]) -> dict[str, bytes]:
    """Encoded training images read back from their tars (one streaming pass per shard)."""

    if not uids:
        return {}
    rows = storage.scan("samples").filter(pl.col("uid").is_in(list(uids))).select("uid", "shard", "image_member").collect()
    out: dict[str, bytes] = {}
    for (shard,), part in rows.partition_by("shard", as_dict=True).items():
        try:
            blobs = shard_source.get(shard).read_images(part["image_member"].to_list())
        except FileNotFoundError:
            continue
        out.update({uid: blobs[m] for uid, m in zip(part["uid"].to_list(), part["image_member"].to_list()) if m in blobs})
    return out


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
    summary_ids = (storage.scan("image_embeddings").group_by("encoder").agg(pl.len().alias("n")).collect()
                   if storage.exists("image_embeddings") else pl.DataFrame({"encoder": [], "n": []}))
    encoders = sorted(summary_ids["encoder"].to_list())
    if encoders and encoders != [model.name]:
        raise ValueError(f"training embeddings were made by {encoders} but the encoder resource is {model.name}: "
                         "re-materialise image_embeddings with this encoder or configure the same encoder")
    n_train = int(summary_ids["n"].sum()) if summary_ids.height else 0
    threshold, threshold_source = _encoder_threshold(model, rc)
    index_cfg = cfg.index_config()
    gen_ids = [g.id for g in generated]
    kind = index_cfg.choose(n_train)
    streamed = kind == "flat" or n_train * xq.shape[1] * 4 > settings.memory_budget() // 2
    context.log.info(f"searching {len(generated)} generated images against {n_train} training images "
                     f"({'exact, streamed shard by shard' if streamed else kind + ' index'}, {variants} colour-shift "
                     f"variant(s) per image, threshold {threshold} from {threshold_source})")

    kept_uids = None
    dedup_note = None
    if rc.deduplicated:
        dedup = storage.read_if_exists("deduplicated_samples")
        if dedup is None or "uid" not in dedup.columns:
            dedup_note = "deduplicated_samples not materialised (dedup stage not run): full set only"
        else:
            kept_uids = (dedup.filter(pl.col("kept")) if "kept" in dedup.columns else dedup)["uid"]
    names = ["full"] + (["deduplicated"] if kept_uids is not None else [])
    tables, searches, sizes = [], {}, {}
    if streamed:
        results = _search_streamed(storage, xq, rc.k, kept_uids)
        for reference in names:
            result, ref_uids = results[reference]
            searches[reference] = rg.merge_variants(result, variants)
            sizes[reference] = result.n_train
            tables.append(rg.neighbour_table(gen_ids, searches[reference], ref_uids, threshold, reference))
    else:
        ids, xb = storage.load_embeddings()
        uids = ids["uid"].to_list()
        references: dict[str, tuple[list[str], np.ndarray]] = {"full": (uids, xb)}
        if kept_uids is not None:
            keep = ids["uid"].is_in(kept_uids.implode()).to_numpy()
            references["deduplicated"] = ([u for u, k in zip(uids, keep) if k], xb[keep])
        for reference, (ref_uids, ref_x) in references.items():
            searches[reference] = rg.merge_variants(rg.search(ref_x, xq, rc.k, index_cfg, threshold), variants)
            sizes[reference] = len(ref_uids)
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
        summary.update(n_train=sizes[reference], index=result.index_kind, recall_at_k=result.recall_at_k,
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
    rpt.write_page(page_path, rpt.render_page("Regurgitation audit", sections, subtitle=f"training set: {n_train} images"))
    (storage.artifact_dir("regurgitation_audit") / "matches.json").write_text(json.dumps(matches))
    storage.write_json("regurgitation_audit", {"status": "ok", "threshold": threshold, "threshold_source": threshold_source,
                                                  "encoder": model.name, "summaries": summaries, "note": dedup_note})
    full = summaries[0]
    metadata: dict[str, Any] = {
        "dagster/row_count": table.height,
        "generated_images": len(gen_ids),
        "training_images": n_train, "search": "exact, streamed shard by shard" if streamed else kind,
        "threshold": threshold,
        "threshold_source": threshold_source,
        "index": full["index"],
        "regurgitation_rate": dg.FloatMetadataValue(full["rate"]),
        "rate_ci": f"[{full['ci_low']:.4f}, {full['ci_high']:.4f}]",
        "flagged": full["n_flagged"],
        "summary": dg.MetadataValue.md(markdown_table(summary_df, digits=4) + "\n\n" + markdown_image(hist, "best-match similarity")),
        "page": dg.MetadataValue.path(str(page_path)),
    }
    if full["recall_at_k"] is not None:
        metadata["index_recall_at_k"] = dg.FloatMetadataValue(full["recall_at_k"])
    if full["flag_recall"] is not None:
        metadata["index_flag_recall"] = dg.FloatMetadataValue(full["flag_recall"])
    if "deduplicated" in searches:
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


defs = dg.Definitions(assets=[regurgitation_audit])
