"""The sections of the curation report, built from whatever tables the stages have written so far.

Each builder reads its upstream tables defensively (the schema of a table another stage owns is checked
before use) and returns a section that says "stage not run" when the table is missing. The funnel
reconciles: ingested = rejected + filtered + removed as duplicates + kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import polars as pl

from curation_assets.core.plots import figure_png
from curation_assets.core import report as rpt


@dataclass
class BuiltReport:
    sections: list[rpt.Section]
    funnel: pl.DataFrame | None
    missing: list[str] = field(default_factory=list)

    @property
    def funnel_markdown(self) -> str:
        return rpt.markdown_table(self.funnel) if self.funnel is not None else "samples not materialised"


def _read(storage, name: str) -> pl.DataFrame | None:
    from curation_assets.audits import _read as read

    return read(storage, name)


def _not_run(id_: str, title: str, table: str, stage: str) -> rpt.Section:
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
    final = _read(storage, "training_set")
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
    samples = _read(storage, "samples")
    if samples is None:
        return None, [], ["ingest"]
    if (from_final := _training_set_funnel(storage, samples)) is not None:
        return from_final
    notes, missing = [], []
    ok = samples.filter(pl.col("status") == "ok").select("uid")
    total = samples.height
    rows = [("ingested", total), ("rejected at ingest", total - ok.height)]
    remaining = ok
    filtered = _read(storage, "filtered_samples")
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


def _funnel_png(df: pl.DataFrame) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main = df.filter(~pl.col("step").str.starts_with("  ") & pl.col("samples").is_not_null())
    fig, ax = plt.subplots(figsize=(6, 3), dpi=90)
    ax.barh(main["step"].to_list()[::-1], main["samples"].to_list()[::-1], color="#4c72b0")
    for i, v in enumerate(main["samples"].to_list()[::-1]):
        ax.text(v, i, f" {v}", va="center", fontsize=8)
    ax.set_xlabel("samples")
    ax.set_title("curation funnel")
    fig.tight_layout()
    return figure_png(fig)


def _curve_png(df: pl.DataFrame, x: str, ys: list[str], title: str, by: str | None = None) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    df = _read(storage, "active_learning_rounds")
    if df is None:
        return _not_run("active-learning", "Active learning", "active_learning_rounds", "safety")
    blocks = [rpt.table_html(df)]
    x = next((c for c in ("n_labels", "round") if c in df.columns), None)
    by = "category" if "category" in df.columns else None
    preferred = [c for c in ("precision_at_target", "cv_auc") if c in df.columns]
    ys = preferred or [c for c in _numeric(df, (x or "",)) if any(w in c for w in ("precision", "auc"))][:2]
    if x and ys and df.height > 0:
        blocks.insert(0, rpt.plot_html(_curve_png(df, x, ys, "active learning: classifier quality vs labels", by),
                                       "active learning curve"))
    return rpt.Section("active-learning", "Active learning", blocks=blocks)


def bias_section(storage) -> rpt.Section:
    df = _read(storage, "overall_demographic_ratios")
    if df is None:
        df = _read(storage, "demographic_ratios")
    if df is None:
        return _not_run("bias", "Group ratios per stage", "demographic_ratios", "bias")
    notes = []
    view = df
    if "scope" in df.columns and df.filter(pl.col("scope") == "overall").height:
        view = df.filter(pl.col("scope") == "overall")
        notes.append("all shards together (scope = overall); per-shard rows are in the demographic_ratios table")
    elif "shard" in df.columns and df.height > 60:
        overall = df.filter(pl.col("shard").is_in(["_overall", "all", "overall"]))
        if overall.height:
            view = overall
        else:
            notes.append(f"{df.height} rows (per shard); the first 200 are shown")
    if "kind" in view.columns:
        view = view.sort(pl.col("kind") != "ratio", maintain_order=True)
    drop = [c for c in view.columns if view.schema[c] in (pl.List, pl.Struct) or isinstance(view.schema[c], (pl.List, pl.Struct))]
    return rpt.Section("bias", "Group ratios per stage", blocks=[rpt.table_html(view.drop(drop), max_rows=200)], notes=notes)


def dedup_recall_section(storage) -> rpt.Section:
    df = _read(storage, "dedup_recall")
    if df is None:
        return _not_run("dedup-recall", "Dedup recall", "dedup_recall", "dedup")
    blocks = [rpt.table_html(df)]
    x = next((c for c in ("n_clusterings", "clusterings", "clustering") if c in df.columns), None)
    ys = [c for c in ("recall", "recall_low", "recall_high", "recall_mean_over_subsets") if c in df.columns]
    if x and ys and df.height:
        blocks.insert(0, rpt.plot_html(_curve_png(df, x, ys, "duplicate-pair recall vs clusterings"), "dedup recall curve"))
    return rpt.Section("dedup-recall", "Dedup recall", blocks=blocks,
                       notes=["Recall of the clustered duplicate search against exact search on a sample."])


def regurgitation_section(storage) -> rpt.Section:
    from curation_assets.audits import REGURGITATION_PAGE, _read_json

    summary = _read_json(storage, "regurgitation_audit")
    if summary is None:
        return rpt.Section("regurgitation", "Regurgitation audit", missing="Stage not run: regurgitation_audit not materialised.")
    if summary.get("status") != "ok":
        return rpt.Section("regurgitation", "Regurgitation audit", missing=f"Not configured: {summary.get('reason')}")
    df = pl.DataFrame([{k: v for k, v in s.items() if k != "index_params"} for s in summary["summaries"]])
    notes = [f"threshold {summary['threshold']:.3f} ({summary['threshold_source']}), encoder {summary['encoder']}"]
    if summary.get("note"):
        notes.append(summary["note"])
    return rpt.Section("regurgitation", "Regurgitation audit", notes=notes,
                       blocks=[rpt.table_html(df, digits=4), rpt.link_list([("flagged matches, side by side", REGURGITATION_PAGE)])])


def safety_section(storage, awaiting: str | None = None) -> rpt.Section | None:
    df = _read(storage, "safety_thresholds")
    if df is None:
        if awaiting is None:
            return None
        return rpt.Section("safety-thresholds", "Safety filter",
                           missing=f"Pending: awaiting labels. {awaiting}")
    keep = [c for c in df.columns if not isinstance(df.schema[c], (pl.List, pl.Struct))]
    return rpt.Section("safety-thresholds", "Safety thresholds", blocks=[rpt.table_html(df.select(keep))])


def build_report(storage, cfg, log=None, awaiting: str | None = None) -> BuiltReport:
    """``awaiting``: what the safety stage still needs (and the next command), when it has no labels yet."""
    from curation_assets.audits import CLIP_BIAS_PAGE, census_sections, clip_bias_sections

    sections: list[rpt.Section] = []
    table, notes, missing = funnel(storage)
    if table is None:
        sections.append(_not_run("funnel", "Funnel", "samples", "ingest"))
    else:
        sections.append(rpt.Section("funnel", "Funnel", notes=notes + [f"stage not run: {m}" for m in missing],
                                    blocks=[rpt.plot_html(_funnel_png(table), "funnel"), rpt.table_html(table)]))
    sections.append(active_learning_section(storage))
    if (section := safety_section(storage, awaiting)) is not None:
        sections.append(section)
    sections.append(bias_section(storage))
    sections.append(dedup_recall_section(storage))
    sections.append(regurgitation_section(storage))
    clip = clip_bias_sections(storage, cfg)
    if clip:
        clip[0].notes.insert(0, "CLIP misclassification audit; full page: " + CLIP_BIAS_PAGE)
    sections.extend(clip)
    sections.extend(census_sections(storage))
    not_run = [s.title for s in sections if s.missing and s.missing.startswith("Stage not run")] + missing
    if log:
        log.info(f"curation report: {len(sections)} sections; not run: {not_run or 'none'}")
    return BuiltReport(sections, table, not_run)
