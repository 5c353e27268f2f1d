"""The sections of the curation report, one builder per stage, plus the funnel, thumbnails and table exports.

Each builder reads its upstream tables defensively (the schema of a table another stage owns is checked
before use) and returns a section that says "stage not run" when the table is missing. The funnel
reconciles: ingested = rejected + filtered + removed as duplicates + kept.
"""

import polars as pl
from markupsafe import Markup

from curation_assets.core import report as rpt
from curation_assets.core.plots import figure_png, pyplot


MATCHES_SHOWN = 12


CSV_MAX_ROWS = 200_000


def stage_not_run(id_: str, title: str, table: str, stage: str) -> rpt.Section:
    return rpt.Section(id_, title, missing=f"Stage not run: table {table} ({stage} stage) does not exist yet.")


def _reasons(filtered: pl.DataFrame) -> pl.DataFrame:
    """Filtered rows exploded to one row per reason (list or delimited string columns both accepted)."""
    dropped = filtered.filter(~pl.col("kept").cast(pl.Boolean))
    if "reasons" not in dropped.columns:
        return dropped.select("uid", reason=pl.lit("unspecified"))
    dtype = dropped.schema["reasons"]
    if isinstance(dtype, pl.List):
        col = pl.col("reasons")
    else:
        col = pl.col("reasons").cast(pl.String).str.split(by=",")
    out = dropped.select("uid", reason=col).explode("reason").with_columns(
        pl.col("reason").cast(pl.String).str.strip_chars(" ;[]'\"").replace("", None))
    return out.with_columns(pl.col("reason").fill_null("unspecified"))


def _training_set_funnel(storage, samples: pl.DataFrame) -> tuple[pl.DataFrame, list[str], list[str]] | None:
    """The funnel straight from ``training_set`` verdicts, when it exists and covers every sample."""
    final = storage.read_if_exists("training_set")
    if final is None or "verdict" not in final.columns or final.height != samples.height:
        return None
    counts = dict(final.group_by("verdict").len().iter_rows())
    rows = [("ingested", final.height), ("rejected at ingest", counts.get("rejected", 0))]
    missing, notes = [], []
    if final["filter_applied"].any():
        reasons = (final.filter(pl.col("verdict") == "filtered")
                   .select("uid", reason=pl.col("reason").str.split(",")).explode("reason"))
        rows.append(("filtered (safety)", counts.get("filtered", 0)))
        rows += [(f"  filtered: {r}", n) for r, n in
                 reasons.group_by("reason").agg(n=pl.col("uid").n_unique()).sort("reason").iter_rows()]
        if reasons.height > counts.get("filtered", 0):
            notes.append("a sample filtered for several categories counts once in 'filtered' and once per category below it")
    else:
        missing.append("safety (awaiting labels)")
        rows.append(("filtered (safety)", None))
    rows.append(("removed as duplicates", counts.get("duplicate", 0)))
    for verdict, step in (("not_embedded", "not embedded"), ("pending", "pending (arrived after the last refresh)")):
        if counts.get(verdict):
            rows.append((step, counts[verdict]))
    rows.append(("kept", counts.get("kept", 0)))
    notes.append("from training_set: every sample once with its final verdict")
    df = pl.DataFrame(rows, schema={"step": pl.String, "samples": pl.Int64}, orient="row")
    return df.with_columns(share_of_ingested=pl.col("samples") / final.height), notes, missing


def funnel(storage) -> tuple[pl.DataFrame | None, list[str], list[str]]:
    """(funnel table, notes, stages missing). Rows: step, samples, share of ingested. From ``training_set``
    when it exists; otherwise assembled from the stage tables that exist."""
    samples = storage.read_if_exists("samples")
    if samples is None:
        return None, [], ["ingest"]
    if (from_final := _training_set_funnel(storage, samples)) is not None:
        return from_final
    notes, missing = [], []
    ok = samples.filter(pl.col("status") == "ok").select("uid")
    total = samples.height
    rows = [("ingested", total), ("rejected at ingest", total - ok.height)]
    remaining = ok
    filtered = storage.read_if_exists("filtered_samples")
    if filtered is not None and {"uid", "kept"} <= set(filtered.columns):
        reasons = _reasons(filtered.join(ok, on="uid", how="semi"))
        dropped = reasons["uid"].n_unique()
        per = reasons.group_by("reason").agg(n=pl.col("uid").n_unique()).sort("reason")
        rows.append(("filtered (safety)", dropped))
        rows += [(f"  filtered: {r}", n) for r, n in per.iter_rows()]
        if reasons.height > dropped:
            notes.append("a sample filtered for several categories counts once in 'filtered' and once per category below it")
        remaining = remaining.join(reasons.select("uid").unique(), on="uid", how="anti")
        unscored = ok.join(filtered.select("uid"), on="uid", how="anti").height
        if unscored:
            notes.append(f"{unscored} accepted samples have no filtered_samples row (shards not filtered yet); counted as kept")
    else:
        missing.append("safety (filtered_samples)")
        rows.append(("filtered (safety)", None))
    # which duplicates leave depends on the filter (a group keeps its best member the filter keeps):
    # only training_set resolves that, so without it the funnel stops before dedup
    missing.append("final verdicts (training_set)")
    rows.append(("removed as duplicates", None))
    rows.append(("kept (before dedup)", remaining.height))
    df = pl.DataFrame(rows, schema={"step": pl.String, "samples": pl.Int64}, orient="row")
    return df.with_columns(share_of_ingested=pl.col("samples") / total), notes, missing


def funnel_png(df: pl.DataFrame) -> bytes:
    plt = pyplot()

    main = df.filter(~pl.col("step").str.starts_with("  ") & pl.col("samples").is_not_null())
    fig, ax = plt.subplots(figsize=(6.2, 2.6), dpi=90)
    ax.barh(main["step"].to_list()[::-1], main["samples"].to_list()[::-1], color="#4c72b0")
    for i, v in enumerate(main["samples"].to_list()[::-1]):
        ax.text(v, i, f" {v}", va="center", fontsize=8)
    ax.set_xlabel("samples")
    ax.set_title("curation funnel")
    fig.tight_layout()
    return figure_png(fig)


def _curve_png(df: pl.DataFrame, x: str, ys: list[str], title: str, by: str | None = None) -> bytes:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=90)
    parts = df.partition_by(by, as_dict=True).items() if by else [((None,), df)]
    for (key,), part in parts:
        part = part.sort(x)
        for y in ys:
            label = f"{key} {y}" if key is not None else y
            ax.plot(part[x].to_list(), part[y].to_list(), marker="o", label=label)
    ax.set_xlabel(x)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return figure_png(fig)


def _numeric(df: pl.DataFrame, exclude: tuple[str, ...] = ()) -> list[str]:
    return [c for c, t in df.schema.items() if t.is_numeric() and c not in exclude]


def active_learning_section(storage) -> rpt.Section:
    df = storage.read_if_exists("active_learning_rounds")
    if df is None:
        return stage_not_run("active-learning", "Active learning", "active_learning_rounds", "safety")
    shown = [c for c in ("category", "round", "n_labels", "n_positive", "n_negative", "cv_auc", "precision_at_target",
                         "random_precision_at_target", "threshold", "classifier_version") if c in df.columns]
    blocks = [rpt.collapsible_table(df.select(shown).sort([c for c in ("category", "round") if c in shown]))]
    x = next((c for c in ("n_labels", "round") if c in df.columns), None)
    by = "category" if "category" in df.columns else None
    preferred = [c for c in ("precision_at_target", "cv_auc") if c in df.columns]
    ys = preferred or [c for c in _numeric(df, (x or "",)) if any(w in c for w in ("precision", "auc"))][:2]
    if x and ys and df.height > 0:
        blocks.insert(0, rpt.plot_html(_curve_png(df, x, ys, "active learning: classifier quality vs labels", by),
                                       "active learning curve"))
    return rpt.Section("active-learning", "Active learning", blocks=blocks)


def _ratio_rows(df: pl.DataFrame) -> pl.DataFrame:
    """Ratio rows formatted for reading: stage order, ``value [low, high]``, change vs raw."""
    from curation_assets.core.demographics import STAGES

    ratios = df.filter(pl.col("kind") == "ratio") if "kind" in df.columns else df
    if not {"stage", "group", "value"} <= set(ratios.columns):
        return ratios
    order = {stage: i for i, stage in enumerate(STAGES)}
    rows = []
    for r in ratios.iter_rows(named=True):
        rows.append({"source": r.get("source") or "", "group": r["group"], "stage": r["stage"],
                     "ratio [95% interval]": rpt.fmt_interval(r["value"], r.get("low"), r.get("high")),
                     "change vs raw": rpt.fmt_pct(r.get("change_vs_raw"), signed=True),
                     "_order": order.get(r["stage"], 99)})
    return pl.DataFrame(rows).sort("source", "group", "_order").drop("_order") if rows else pl.DataFrame()


def _sources_side_by_side(view: pl.DataFrame) -> pl.DataFrame | None:
    """One row per stage and ratio, one column per attribute source, when more than one source measured it."""
    from curation_assets.core.demographics import STAGES

    if not {"kind", "source", "stage", "group", "value"} <= set(view.columns):
        return None
    ratios = view.filter(pl.col("kind") == "ratio")
    if ratios["source"].n_unique() < 2:
        return None
    shown = ratios.select("stage", "group", "source", pl.struct("value", "low", "high").map_elements(
        lambda r: rpt.fmt_interval(r["value"], r["low"], r["high"]), return_dtype=pl.String).alias("ratio"))
    wide = shown.pivot(on="source", index=["stage", "group"], values="ratio", aggregate_function="first")
    order = {stage: i for i, stage in enumerate(STAGES)}
    return wide.with_columns(pl.col("stage").replace_strict(order, default=99).alias("_o")).sort("group", "_o").drop("_o")


def bias_section(storage) -> rpt.Section:
    df = storage.read_if_exists("overall_demographic_ratios")
    if df is None:
        df = storage.read_if_exists("demographic_ratios")
    if df is None:
        return stage_not_run("bias", "Group ratios per stage", "demographic_ratios", "bias")
    notes, caption = [], None
    view = df
    if "scope" in df.columns and df.filter(pl.col("scope") == "overall").height:
        view = df.filter(pl.col("scope") == "overall")
        caption = "all shards together (shard _overall); per-shard rows are in the demographic_ratios table"
    elif "shard" in df.columns and df.filter(pl.col("shard").is_in(["_overall", "all", "overall"])).height:
        view = df.filter(pl.col("shard").is_in(["_overall", "all", "overall"]))
        caption = "all shards together (shard _overall)"
    blocks = [rpt.table_html(_ratio_rows(view), caption=caption)]
    side = _sources_side_by_side(view)
    if side is not None:
        blocks.insert(0, Markup("<h3>Captions and images side by side</h3>") + rpt.table_html(side))
        notes.append("image = faces the face model estimates female / male on a sample of each shard "
                     "(image_attributes); caption = the configured word lists")
    if "kind" in view.columns and {"low", "high"} <= set(view.columns):
        shares = view.filter(pl.col("kind") == "share").select(
            "source", "stage", "group", pl.struct("value", "low", "high").map_elements(
                lambda r: rpt.fmt_interval(r["value"], r["low"], r["high"], 3), return_dtype=pl.String).alias("share [95% interval]"),
            pl.col("change_vs_raw").map_elements(lambda v: rpt.fmt_pct(v, signed=True), return_dtype=pl.String).alias("change vs raw"))
        keyword_rows = view.filter(pl.col("kind") == "keyword")
        keywords = pl.DataFrame()
        if keyword_rows.height:
            raw = keyword_rows.filter(pl.col("stage") == "raw").select(pl.col("group").alias("word"),
                                                                         pl.col("value").alias("raw share"))
            keywords = raw.filter(pl.col("raw share") > 0).sort("raw share", descending=True)
            for stage in ("filtered", "filtered_reweighted", "training_set_weighted"):
                change = keyword_rows.filter(pl.col("stage") == stage).select(
                    pl.col("group").alias("word"), pl.col("change_vs_raw").map_elements(
                        lambda v: rpt.fmt_pct(v, signed=True), return_dtype=pl.String).alias(f"{stage.replace('_', ' ')} vs raw"))
                if change.height:
                    keywords = keywords.join(change, on="word", how="left", maintain_order="left")
        if shares.height:
            blocks.append(Markup("<h3>Group shares</h3>") + rpt.collapsible_table(shares, visible=8))
        if keywords.height:
            blocks.append(Markup("<h3>Keyword shares (OpenAI's table)</h3>") + rpt.collapsible_table(keywords, visible=8, digits=4))
    return rpt.Section("bias", "Group ratios per stage", blocks=blocks, notes=notes)


def dedup_recall_section(storage, groups_html: Markup | None = None) -> rpt.Section:
    df = storage.read_if_exists("dedup_recall")
    if df is None:
        return stage_not_run("dedup-recall", "Dedup recall", "dedup_recall", "dedup")
    shown = [c for c in ("clusterings", "true_pairs", "found", "recall", "recall_low", "recall_high",
                         "recall_mean_over_subsets") if c in df.columns]
    blocks = [rpt.table_html(df.select(shown))]
    x = next((c for c in ("n_clusterings", "clusterings", "clustering") if c in df.columns), None)
    ys = [c for c in ("recall", "recall_low", "recall_high", "recall_mean_over_subsets") if c in df.columns]
    if x and ys and df.height:
        blocks.insert(0, rpt.plot_html(_curve_png(df, x, ys, "duplicate-pair recall vs clusterings"), "dedup recall curve"))
    if groups_html is not None:
        blocks.append(groups_html)
    return rpt.Section("dedup-recall", "Near-duplicates", blocks=blocks,
                       notes=["Recall of the clustered duplicate search against exact search on a sample."])


def regurgitation_section(storage) -> rpt.Section:
    import json

    from curation_assets.audits import REGURGITATION_PAGE

    summary = storage.read_json("regurgitation_audit")
    if summary is None:
        return rpt.Section("regurgitation", "Regurgitation audit", missing="Stage not run: regurgitation_audit not materialised.")
    if summary.get("status") != "ok":
        return rpt.Section("regurgitation", "Regurgitation audit", missing=f"Not configured: {summary.get('reason')}")
    df = pl.DataFrame([{k: v for k, v in s.items() if k != "index_params"} for s in summary["summaries"]])
    notes = [f"threshold {summary['threshold']:.3f} ({summary['threshold_source']}), encoder {summary['encoder']}"]
    if summary.get("note"):
        notes.append(summary["note"])
    blocks = [rpt.table_html(df, digits=4)]
    matches_file = storage.root_path / "artifacts" / "regurgitation_audit" / "matches.json"
    if matches_file.is_file():
        matches = json.loads(matches_file.read_text())
        if matches:
            blocks.append(Markup(f"<h3>Flagged matches ({min(len(matches), MATCHES_SHOWN)} of {len(matches)} shown)</h3>"))
            blocks.append(rpt.matches_html(matches[:MATCHES_SHOWN]))
    blocks.append(rpt.link_list([("every flagged match, side by side", REGURGITATION_PAGE)]))
    return rpt.Section("regurgitation", "Regurgitation audit", notes=notes, blocks=blocks)


def safety_section(storage, awaiting: str | None = None, thumbs: Markup | None = None) -> rpt.Section | None:
    df = storage.read_if_exists("safety_thresholds")
    if df is None:
        if awaiting is None:
            return None
        return rpt.Section("safety-thresholds", "Safety filter",
                           missing=f"Pending: awaiting labels. {awaiting}")
    rows = []
    for r in df.iter_rows(named=True):
        rows.append({"category": r["category"], "threshold": r.get("threshold"), "target recall": r.get("target_recall"),
                     "held-out recall [95% interval]": rpt.fmt_interval(r.get("recall"), r.get("recall_low"),
                                                                        r.get("recall_high"), 3),
                     "precision": r.get("precision"), "labelled positives": r.get("n_positive"),
                     "target shown": "yes" if r.get("reachable") else "no"})
    blocks = [rpt.table_html(pl.DataFrame(rows), digits=4)]
    if thumbs is not None:
        blocks.append(thumbs)
    return rpt.Section("safety-thresholds", "Safety filter", blocks=blocks)


def ratio_chart_png(overall: pl.DataFrame) -> bytes | None:
    """Every caption ratio across the stages that exist, with 95% intervals and the change against raw."""
    plt = pyplot()
    import numpy as np

    from curation_assets.core.demographics import STAGES

    ratios = overall.filter((pl.col("kind") == "ratio") & pl.col("value").is_not_null())
    if ratios.height == 0:
        return None
    stages = [s for s in STAGES if s in set(ratios["stage"].to_list())]
    fig, ax = plt.subplots(figsize=(6.4, 2.6), dpi=90)
    for i, ((source, group), part) in enumerate(ratios.group_by(["source", "group"], maintain_order=True)):
        part = part.filter(pl.col("stage").is_in(stages)).with_columns(
            pl.col("stage").replace_strict({s: k for k, s in enumerate(stages)}, return_dtype=pl.Int64).alias("x")).sort("x")
        x = part["x"].to_numpy() + 0.08 * i
        y = part["value"].to_numpy()
        err = np.vstack([y - part["low"].fill_null(np.nan).to_numpy(), part["high"].fill_null(np.nan).to_numpy() - y])
        ax.errorbar(x, y, yerr=np.nan_to_num(err), fmt="o-", capsize=4, label=f"{group} ({source})")
        for xi, yi, change in zip(x, y, part["change_vs_raw"].to_list()):
            if change is not None and change == change and abs(change) > 1e-9:
                ax.annotate(f"{100 * change:+.1f}%", (xi, yi), textcoords="offset points", xytext=(4, 6), fontsize=7)
    ax.set_xticks(range(len(stages)), [s.replace("_", " ") for s in stages], fontsize=7)
    ax.set_ylabel("ratio")
    ax.set_title("group ratio per stage (95% intervals; % = change vs raw)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return figure_png(fig)


def thumbnails(storage, shard_source, uids, size: int = 96) -> dict[str, str | None]:
    """JPEG thumbnails (data URIs) of some samples, read from their tars (one pass per shard)."""

    uids = list(dict.fromkeys(uids))
    if not uids or shard_source is None or not storage.exists("samples"):
        return {}
    members = (storage.scan("samples").filter(pl.col("uid").is_in(uids))
               .select("uid", "shard", "image_member").collect())
    out: dict[str, str | None] = {}
    for (shard,), part in members.group_by(["shard"]):
        try:
            blobs = shard_source.get(shard).read_images([m for m in part["image_member"].to_list() if m])
        except (FileNotFoundError, ValueError):
            continue
        for uid, member in part.select("uid", "image_member").iter_rows():
            if member in blobs:
                out[uid] = rpt.thumbnail_data_uri(blobs[member], size)
    return out


def duplicate_groups_html(storage, shard_source, n_groups: int = 6, per_group: int = 5) -> Markup | None:
    """A sample of duplicate groups side by side, the member kept for training outlined."""
    groups = storage.read_if_exists("dedup_groups")
    if groups is None or groups.height == 0:
        return None
    final = storage.read_if_exists("training_set")
    verdict = dict(final.select("uid", "verdict").iter_rows()) if final is not None else {}
    has_kept = (pl.col("uid").replace_strict(verdict, default=None) == "kept").any() if verdict else pl.col("is_representative").any()
    chosen = (groups.group_by("group_id").agg(pl.len().alias("n"), has_kept.alias("has_kept"))
              .sort(["has_kept", "n", "group_id"], descending=[True, True, False])  # groups that train first
              .head(n_groups)["group_id"].to_list())
    members = (groups.filter(pl.col("group_id").is_in(chosen))
               .with_columns(pl.col("uid").replace_strict(verdict, default=None).alias("verdict") if verdict
                             else pl.lit(None, pl.String).alias("verdict"))
               .with_columns((pl.col("verdict") == "kept").fill_null(pl.col("is_representative")).alias("kept"))
               .sort("group_id", "kept", "uid", descending=[False, True, False]))
    shown = members.group_by("group_id", maintain_order=True).head(per_group)  # the kept member first
    thumbs = thumbnails(storage, shard_source, shown["uid"].to_list())
    blocks = []
    for group_id in chosen:
        part = shown.filter(pl.col("group_id") == group_id)
        size = members.filter(pl.col("group_id") == group_id).height
        items = []
        for r in part.iter_rows(named=True):
            fate = r["verdict"] or ("kept" if r["is_representative"] else "duplicate")
            items.append({"src": thumbs.get(r["uid"]), "caption": f"{r['uid']} {r.get('width')}x{r.get('height')} {fate}",
                          "marked": fate == "kept", "blur": fate == "filtered"})
        blocks.append(Markup(f'<div class="group"><div class="note">group {group_id}: {size} images'
                             f'{"" if size <= per_group else f" ({per_group} shown)"}; outlined: kept for training</div>')
                      + rpt.thumbs_html(items) + Markup("</div>"))
    return (Markup('<h3>Duplicate groups (largest first)</h3><p class="note">Outlined: the member kept for training. '
                   'Members the safety filter removed are blurred; click to show.</p>') + Markup("".join(blocks)))


def near_threshold_html(storage, shard_source, per_side: int = 4) -> Markup | None:
    """Per safety category the images scored just above and just below its threshold, blurred until clicked."""
    scores, thresholds = storage.read_if_exists("safety_scores"), storage.read_if_exists("safety_thresholds")
    if scores is None or thresholds is None or scores.height == 0:
        return None
    if "scorer" in scores.columns:
        scores = scores.filter(pl.col("scorer") == "classifier")
    picks = []
    for r in thresholds.iter_rows(named=True):
        part = scores.filter(pl.col("category") == r["category"])
        above = part.filter(pl.col("score") >= r["threshold"]).sort("score").head(per_side)
        below = part.filter(pl.col("score") < r["threshold"]).sort("score", descending=True).head(per_side)
        picks.append((r["category"], r["threshold"], above, below))
    thumbs = thumbnails(storage, shard_source, [u for _, _, a, b in picks for u in a["uid"].to_list() + b["uid"].to_list()])
    html_parts = [Markup('<h3>Images at the threshold</h3><p class="note">Blurred: reviewers should not be shown '
                         'graphic or sexual content unasked. Click an image to show it, click again to blur it.</p>')]
    for category, threshold, above, below in picks:
        items = ([{"src": thumbs.get(u), "caption": f"{s:.3f} removed"} for u, s in above.select("uid", "score").iter_rows()]
                 + [{"src": thumbs.get(u), "caption": f"{s:.3f} kept"} for u, s in below.select("uid", "score").iter_rows()])
        html_parts.append(Markup(f'<div class="group"><div class="note">{category}: threshold {threshold:.4f}; just '
                                 f'above (removed) and just below (kept)</div>') + rpt.thumbs_html(items, blur=True)
                          + Markup("</div>"))
    return Markup("".join(html_parts))


def tables_section(storage) -> rpt.Section:
    """Where every full table is: its Delta path, and a CSV export for the tables small enough to open."""
    export_dir = storage.reports_dir() / "tables"
    export_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in storage.tables():
        frame = storage.scan(name)
        schema = frame.collect_schema()
        n = frame.select(pl.len()).collect().item()
        flat = [c for c, t in schema.items() if not isinstance(t, (pl.List, pl.Array, pl.Struct, pl.Binary))]
        csv = ""
        if n <= CSV_MAX_ROWS:
            with (export_dir / f"{name}.csv").open("wb") as handle:
                frame.select(flat).collect().write_csv(handle)
            csv = f"tables/{name}.csv"
        rows.append({"table": name, "rows": n, "columns": len(schema), "CSV": csv,
                     "Delta table": str(storage.table_path(name))})
    df = pl.DataFrame(rows) if rows else pl.DataFrame()
    links = rpt.link_list([(f"{r['table']}.csv", r["CSV"]) for r in rows if r["CSV"]])
    return rpt.Section("tables", "Full tables", blocks=[rpt.table_html(df), links],
                       notes=[f"Read any table with polars: pl.read_delta(path). CSV exports for tables up to "
                              f"{CSV_MAX_ROWS} rows, without vector columns."])
