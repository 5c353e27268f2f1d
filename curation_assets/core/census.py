"""Dataset census: what is in the data, per shard and overall, before anyone trains on it.

Counts per ingest status, image sizes, caption lengths, safety score distributions, the duplicate rate,
demographic words in captions and faces found by an offline detector (OpenCV's frontal-face Haar cascade,
shipped inside the opencv package, so nothing is downloaded). Every function takes plain polars frames
and returns plain frames, so the census runs the same outside Dagster.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
import polars as pl

from curation_assets.core.plots import figure_png, pyplot

HAAR_CASCADE = "haarcascade_frontalface_default.xml"


def status_counts(samples: pl.DataFrame) -> pl.DataFrame:
    """Rows per shard x status, plus an ``all`` shard with the totals."""
    per = samples.group_by("shard", "status").agg(n=pl.len())
    total = samples.group_by("status").agg(n=pl.len()).with_columns(shard=pl.lit("all"))
    return pl.concat([per, total.select(per.columns)]).sort("shard", "status")


def _describe(df: pl.DataFrame, column: str) -> pl.DataFrame:
    q = [pl.col(column).quantile(p).alias(f"p{int(p * 100):02d}") for p in (0.05, 0.5, 0.95)]
    aggs = [pl.col(column).count().alias("n"), pl.col(column).mean().alias("mean"), pl.col(column).min().alias("min"),
            *q, pl.col(column).max().alias("max")]
    per = df.group_by("shard").agg(aggs)
    total = df.select(aggs).with_columns(shard=pl.lit("all"))
    out = pl.concat([per.with_columns(pl.all().exclude("shard").cast(pl.Float64)),
                     total.select(per.columns).with_columns(pl.all().exclude("shard").cast(pl.Float64))])
    return out.with_columns(metric=pl.lit(column)).sort("shard")


def size_and_caption_stats(samples: pl.DataFrame) -> pl.DataFrame:
    """Distribution summaries (n, mean, min, p05, p50, p95, max) of width, height, megapixels and caption
    length in characters and words, for accepted samples, per shard and overall."""
    ok = samples.filter(pl.col("status") == "ok").with_columns(
        megapixels=(pl.col("width").cast(pl.Float64) * pl.col("height").cast(pl.Float64) / 1e6),
        caption_chars=pl.col("caption").str.len_chars(),
        caption_words=pl.col("caption").str.split(" ").list.len(),
    )
    return pl.concat([_describe(ok, c) for c in ("width", "height", "megapixels", "caption_chars", "caption_words")])


def demographic_word_frequencies(samples: pl.DataFrame, groups: dict[str, Sequence[str]] | None = None) -> pl.DataFrame:
    """Per shard and overall, for each demographic group (the bias stage's caption word lists, matched by
    :class:`curation_assets.core.demographics.CaptionMatcher`) and each of its words: captions mentioning
    it (``captions``) and their share of the captioned accepted samples. ``word`` is null on group rows."""
    from curation_assets.core.demographics import CaptionMatcher

    matcher = CaptionMatcher(groups) if groups else CaptionMatcher()
    ok = samples.filter(pl.col("status") == "ok")
    flags = matcher.annotate(ok["caption"]).with_columns(
        shard=ok["shard"], captioned=ok["caption"].fill_null("").str.len_chars() > 0)
    columns = [(g, None, g) for g in matcher.groups] + [
        (g, w, f"kw:{w}") for g, words in matcher.groups.items() for w in words]
    rows = []
    parts = [(k[0] if isinstance(k, tuple) else k, v) for k, v in sorted(flags.partition_by("shard", as_dict=True).items())]
    for shard, part in [*parts, ("all", flags)]:
        captioned = int(part["captioned"].sum())
        for group, word, column in columns:
            n = int(part[column].sum())
            rows.append({"shard": shard, "group": group, "word": word, "captions": n, "captioned": captioned,
                         "share": n / captioned if captioned else None})
    return pl.DataFrame(rows, schema={"shard": pl.String, "group": pl.String, "word": pl.String, "captions": pl.Int64,
                                      "captioned": pl.Int64, "share": pl.Float64})


def face_detector():
    """OpenCV's frontal-face Haar cascade (offline: the XML ships inside opencv-python)."""
    import cv2

    if not hasattr(cv2, "CascadeClassifier"):
        raise RuntimeError("this OpenCV build has no CascadeClassifier (OpenCV 5 moved it out); install opencv-python-headless<5")
    path = cv2.data.haarcascades + HAAR_CASCADE
    detector = cv2.CascadeClassifier(path)
    if detector.empty():
        raise RuntimeError(f"could not load the Haar cascade {path}")
    return detector


def count_faces(blobs: Iterable[bytes], detector=None, max_side: int = 512, min_face: int = 24) -> list[int]:
    """Frontal faces per image (images larger than ``max_side`` are downscaled first; faces smaller than
    ``min_face`` px are ignored). Undecodable images count as -1."""
    import cv2

    detector = detector or face_detector()
    counts = []
    for data in blobs:
        arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
        if arr is None:
            counts.append(-1)
            continue
        scale = max_side / max(arr.shape)
        if scale < 1:
            arr = cv2.resize(arr, (int(arr.shape[1] * scale), int(arr.shape[0] * scale)), interpolation=cv2.INTER_AREA)
        arr = cv2.equalizeHist(arr)
        faces = detector.detectMultiScale(arr, scaleFactor=1.1, minNeighbors=5, minSize=(min_face, min_face))
        counts.append(int(len(faces)))
    return counts


def face_summary(faces: pl.DataFrame) -> pl.DataFrame:
    """From rows (shard, uid, faces): per shard and overall the images scanned, share with >= 1 face, mean
    faces per image (undecodable images excluded)."""
    ok = faces.filter(pl.col("faces") >= 0)
    aggs = [pl.len().alias("images_scanned"), (pl.col("faces") > 0).mean().alias("share_with_face"),
            pl.col("faces").mean().cast(pl.Float64).alias("mean_faces"), pl.col("faces").sum().cast(pl.Int64).alias("faces")]
    per = ok.group_by("shard").agg(aggs)
    total = ok.select(aggs).with_columns(shard=pl.lit("all"))
    return pl.concat([per.with_columns(pl.col("images_scanned").cast(pl.Int64)),
                      total.select(per.columns).with_columns(pl.col("images_scanned").cast(pl.Int64))]).sort("shard")


def category_score_summary(scores: pl.DataFrame) -> pl.DataFrame:
    """The ``score`` of ``safety_scores`` (long format: one row per uid and category) summarised per category,
    per shard and overall: n, mean, p50, p95, p99, max and the share flagged at the category's threshold."""
    aggs = [pl.col("score").count().cast(pl.Float64).alias("n"), pl.col("score").mean().alias("mean"),
            pl.col("score").quantile(0.5).alias("p50"), pl.col("score").quantile(0.95).alias("p95"),
            pl.col("score").quantile(0.99).alias("p99"), pl.col("score").max().cast(pl.Float64).alias("max")]
    if "flagged" in scores.columns:
        aggs.append(pl.col("flagged").cast(pl.Float64).mean().alias("flagged_share"))
    if "scorer" in scores.columns:  # a pretrained prior is its own row beside the classifier: "sexual (prior:...)"
        scores = scores.with_columns(pl.when(pl.col("scorer") == "classifier").then(pl.col("category"))
                                     .otherwise(pl.format("{} ({})", "category", "scorer")).alias("category"))
    per = scores.group_by("category", "shard").agg(aggs)
    total = scores.group_by("category").agg(aggs).with_columns(shard=pl.lit("all"))
    out = pl.concat([per, total.select(per.columns)]).with_columns(pl.exclude("category", "shard").cast(pl.Float64))
    return out.rename({"category": "score"}).sort("score", "shard")


def duplicate_rate(groups: pl.DataFrame, samples: pl.DataFrame) -> pl.DataFrame:
    """From ``dedup_groups`` (uid, group_id, is_representative): per shard and overall the accepted samples,
    those in a duplicate group, and those that deduplication removes (non-representatives)."""
    ok = samples.filter(pl.col("status") == "ok").select("uid", "shard")
    g = groups.select("uid", "group_id", "is_representative")
    sizes = g.group_by("group_id").agg(size=pl.len())
    joined = ok.join(g.join(sizes, on="group_id"), on="uid", how="left").with_columns(
        in_group=pl.col("size").fill_null(1) > 1,
        removed=(pl.col("size").fill_null(1) > 1) & ~pl.col("is_representative").fill_null(True),
    )
    aggs = [pl.len().alias("samples"), pl.col("in_group").sum().cast(pl.Int64).alias("in_duplicate_group"),
            pl.col("removed").sum().cast(pl.Int64).alias("removed")]
    per = joined.group_by("shard").agg(aggs)
    total = joined.select(aggs).with_columns(shard=pl.lit("all"))
    out = pl.concat([per.with_columns(pl.col("samples").cast(pl.Int64)),
                     total.select(per.columns).with_columns(pl.col("samples").cast(pl.Int64))])
    return out.with_columns(duplicate_rate=pl.col("removed") / pl.col("samples")).sort("shard")


def histogram_png(series: dict[str, np.ndarray], title: str, xlabel: str, bins: int = 30, log: bool = False) -> bytes:
    """One PNG with overlaid histograms, one per named series."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(5.5, 3.2), dpi=90)
    for name, values in series.items():
        values = np.asarray(values, dtype=np.float64)
        values = values[np.isfinite(values)]
        if len(values):
            ax.hist(values, bins=bins, alpha=0.55, label=f"{name} (n={len(values)})")
    if log:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("images")
    if series:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return figure_png(fig)


def bar_png(labels: Sequence[str], values: Sequence[float], title: str, ylabel: str) -> bytes:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(5.5, 3.2), dpi=90)
    ax.bar(list(labels), list(values), color="#4c72b0")
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    return figure_png(fig)


def attribute_summary(images: pl.DataFrame, faces: pl.DataFrame, memberships: pl.DataFrame | None = None,
                      confidence: float = 0.95) -> pl.DataFrame:
    """The census of what the images show (``image_attributes`` / ``face_attributes`` rows), per shard and
    ``all``, and per group (``memberships``: uid + one boolean column per group, e.g. caption groups; an
    image may be in several) plus ``all``: images measured, the share with at least one face (Wilson
    interval), faces per image, the apparent-female share of faces (Wilson), apparent age of faces (mean with
    a t interval, spread, skew, min, max) and the NSFW score (mean, median, p90, p99, share >= 0.5 with its
    interval), with the models that produced them."""
    from curation_assets.core.image_attributes import moments
    from curation_assets.core.stats import wilson_interval

    groups = [c for c in (memberships.columns if memberships is not None else []) if c != "uid"]
    rows = []
    scopes = [("all", images)] + [(s, images.filter(pl.col("shard") == s))
                                  for s in sorted(images["shard"].unique().to_list())]
    for shard, part in scopes:
        subsets = [("all", part)]
        if groups:
            joined = part.join(memberships, on="uid", how="left").fill_null(False)
            subsets += [(g, joined.filter(pl.col(g)).select(part.columns)) for g in groups]
        for group, sub in subsets:
            sub_faces = faces.join(sub.select("uid"), on="uid", how="semi")
            n = sub.height
            with_face = int((sub["faces"] > 0).sum()) if n else 0
            female = int((sub_faces["apparent_gender"] == "female").sum())
            nsfw = sub["nsfw"].drop_nulls().to_numpy().astype(np.float64)
            flagged = int((nsfw >= 0.5).sum())
            face_share = wilson_interval(with_face, n, confidence)
            female_share = wilson_interval(female, sub_faces.height, confidence)
            nsfw_share = wilson_interval(flagged, len(nsfw), confidence)
            age = moments(sub_faces["apparent_age"].drop_nulls().to_numpy(), confidence)
            rows.append({
                "shard": shard, "group": group, "images": n, "images_with_face": with_face,
                "share_with_face": face_share.estimate, "share_with_face_low": face_share.low,
                "share_with_face_high": face_share.high, "faces": sub_faces.height,
                "faces_per_image": sub_faces.height / n if n else math.nan,
                "apparent_female_share": female_share.estimate, "apparent_female_low": female_share.low,
                "apparent_female_high": female_share.high,
                **{f"age_{k}": (float(v) if k != "n" else int(v)) for k, v in age.items()},
                "nsfw_mean": float(nsfw.mean()) if len(nsfw) else math.nan,
                "nsfw_p50": float(np.quantile(nsfw, 0.5)) if len(nsfw) else math.nan,
                "nsfw_p90": float(np.quantile(nsfw, 0.9)) if len(nsfw) else math.nan,
                "nsfw_p99": float(np.quantile(nsfw, 0.99)) if len(nsfw) else math.nan,
                "nsfw_share": nsfw_share.estimate, "nsfw_share_low": nsfw_share.low,
                "nsfw_share_high": nsfw_share.high,
                "face_model": sub["face_model"][0] if n else None, "nsfw_model": sub["nsfw_model"][0] if n else None,
            })
    return pl.DataFrame(rows)
