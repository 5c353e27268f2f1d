"""The curation report: one HTML page tying every stage together (summary cards, funnel and ratio charts, one
collapsible section per stage built in ``report_sections.py``), and the ``curation_report`` asset that writes it."""


from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg
import polars as pl
from markupsafe import Markup

from curation_assets.core import report as rpt
from curation_assets.core.plots import markdown_table
from curation_assets.report_sections import (active_learning_section, bias_section, dedup_recall_section,
                                             duplicate_groups_html, funnel, funnel_png, near_threshold_html,
                                             ratio_chart_png, regurgitation_section, safety_section, stage_not_run,
                                             tables_section)
from resources.settings import CurationSettings
from resources.shard_source import ShardSource
from resources.storage import DeltaStorage


@dataclass
class BuiltReport:
    sections: list[rpt.Section]
    funnel: pl.DataFrame | None
    missing: list[str] = field(default_factory=list)
    summary: Markup | None = None

    @property
    def funnel_markdown(self) -> str:
        return markdown_table(self.funnel) if self.funnel is not None else "samples not materialised"


def summary_html(storage, table: pl.DataFrame | None, awaiting: str | None) -> Markup:
    """The first screen: the headline of every stage as a card linking to its section, the funnel and the
    ratio chart."""
    cards = []
    steps = dict(table.select("step", "samples").iter_rows()) if table is not None else {}
    total = steps.get("ingested") or 0
    if table is not None:
        kept = steps.get("kept", steps.get("kept (before dedup)"))
        lines = [f"{total} ingested -> {kept} kept for training ({rpt.fmt_pct(kept / total if total else None)})"]
        for step in ("rejected at ingest", "filtered (safety)", "removed as duplicates",
                     "pending (arrived after the last refresh)"):
            if steps.get(step) is not None:
                lines.append(f"{step}: {steps[step]}")
        cards.append(rpt.card("Samples", lines, "funnel"))
    thresholds = storage.read_if_exists("safety_thresholds")
    if thresholds is not None:
        cards.append(rpt.card("Safety filter", [
            f"{r['category']}: threshold {r['threshold']:.3f}, held-out recall >= {r['recall_low']:.3f} "
            f"(target {r['target_recall']}), precision {r['precision']:.2f}" for r in thresholds.iter_rows(named=True)],
            "safety-thresholds"))
    else:
        cards.append(rpt.card("Safety filter", ["awaiting labels: " + (awaiting or "the classifiers are not trained")],
                              "safety-thresholds", "pending"))
    recall = storage.read_if_exists("dedup_recall")
    dedup_lines = []
    if steps.get("removed as duplicates") is not None and total:
        dedup_lines.append(f"{steps['removed as duplicates']} near-duplicates removed "
                           f"({rpt.fmt_pct(steps['removed as duplicates'] / total)} of ingested)")
    if recall is not None and recall.height:
        recall = recall.sort("clusterings")
        last, first = recall.row(-1, named=True), recall.row(0, named=True)
        dedup_lines.append(f"search recall vs exact search: {rpt.fmt_interval(last['recall'], last['recall_low'], last['recall_high'], 3)}"
                           f" with {last['clusterings']} clusterings ({first['recall']:.3f} with 1), "
                           f"{last['true_pairs']} true pairs sampled")
    cards.append(rpt.card("Near-duplicates", dedup_lines or ["dedup not run yet"], "dedup-recall"))
    overall = storage.read_if_exists("overall_demographic_ratios")
    bias_lines = []
    if overall is not None:
        ratios = overall.filter((pl.col("kind") == "ratio") & (pl.col("source") == "caption"))
        for group in ratios["group"].unique().sort().to_list():
            by = {r["stage"]: r for r in ratios.filter(pl.col("group") == group).iter_rows(named=True)}
            last = next((by[s] for s in ("training_set_weighted", "training_set", "deduplicated") if s in by), None)
            if "raw" in by and last is not None:
                bias_lines.append(f"{group}: raw {by['raw']['value']:.3f} -> {last['stage'].replace('_', ' ')} "
                                  f"{rpt.fmt_interval(last['value'], last['low'], last['high'])} "
                                  f"({rpt.fmt_pct(last['change_vs_raw'], signed=True)})")
            if "filtered" in by:
                bias_lines.append(f"{group} after the filter alone: {by['filtered']['value']:.3f} "
                                  f"({rpt.fmt_pct(by['filtered']['change_vs_raw'], signed=True)})")
    cards.append(rpt.card("Group ratios", bias_lines or ["demographic ratios not measured yet"], "bias"))
    regurgitation = storage.read_json("regurgitation_audit")
    if regurgitation and regurgitation.get("status") == "ok":
        s0 = regurgitation["summaries"][0]
        reg_lines = [f"{s0['n_flagged']} of {s0['n_generated']} generated images copy a training image: "
                     f"{rpt.fmt_pct(s0['rate'])} [{rpt.fmt_pct(s0['ci_low'])}, {rpt.fmt_pct(s0['ci_high'])}]"]
    else:
        reg_lines = ["not configured: set audits.regurgitation.generated" if regurgitation else "not run yet"]
    cards.append(rpt.card("Regurgitation", reg_lines, "regurgitation"))
    alerts = storage.read("alerts") if storage.exists("alerts") else None
    drift = alerts.filter(pl.col("source") == "bias_drift") if alerts is not None else None
    if drift is not None and drift.height:
        last = drift.sort("created_at").row(-1, named=True)
        cards.append(rpt.card("Drift alerts", [f"{drift.height} alerts; latest: shard {last['shard']} ({last['severity']})",
                                               last["message"][:160]], "bias", "alert"))
    else:
        cards.append(rpt.card("Drift alerts", ["none: every judged shard is within the band of its reference"], "bias"))
    charts = []
    if table is not None:
        charts.append(Markup('<figure id="funnel-chart">') + rpt.plot_html(funnel_png(table), "curation funnel")
                      + Markup("<figcaption>What happened to every ingested sample.</figcaption></figure>"))
    ratio_png = ratio_chart_png(overall.filter(pl.col("source") == "caption")) if overall is not None else None
    if ratio_png is not None:
        charts.append(Markup('<figure id="ratio-chart">') + rpt.plot_html(ratio_png, "group ratio per stage")
                      + Markup("<figcaption>Caption-based group ratio at each stage of the funnel.</figcaption></figure>"))
    return Markup('<div class="cards">') + Markup("".join(cards)) + Markup('</div><div class="charts">') \
        + Markup("".join(charts)) + Markup("</div>")


def build_report(storage, cfg, log=None, awaiting: str | None = None, shard_source=None) -> BuiltReport:
    """The report's summary and sections. ``awaiting``: what the safety stage still needs (and the next
    command), when it has no labels yet; ``shard_source``: where thumbnails are read from (none: no pictures)."""
    from curation_assets.audits import CLIP_BIAS_PAGE
    from curation_assets.dataset_census import census_sections
    from curation_assets.clip_bias_audit import clip_bias_sections

    sections: list[rpt.Section] = []
    table, notes, missing = funnel(storage)
    if table is None:
        sections.append(stage_not_run("funnel", "Funnel", "samples", "ingest"))
    else:
        sections.append(rpt.Section("funnel", "Funnel", notes=notes + [f"stage not run: {m}" for m in missing],
                                    blocks=[rpt.table_html(table)]))
    if (section := safety_section(storage, awaiting, near_threshold_html(storage, shard_source))) is not None:
        sections.append(section)
    sections.append(active_learning_section(storage))
    sections.append(bias_section(storage))
    sections.append(dedup_recall_section(storage, duplicate_groups_html(storage, shard_source)))
    sections.append(regurgitation_section(storage))
    clip = clip_bias_sections(storage, cfg)
    if clip:
        clip[0].notes.insert(0, "CLIP misclassification audit; full page: " + CLIP_BIAS_PAGE)
    sections.extend(clip)
    sections.extend(census_sections(storage))
    sections.append(tables_section(storage))
    not_run = [s.title for s in sections if s.missing and s.missing.startswith("Stage not run")] + missing
    if log:
        log.info(f"curation report: {len(sections)} sections; not run: {not_run or 'none'}")
    return BuiltReport(sections, table, not_run, summary_html(storage, table, awaiting))


# --------------------------------------------------------------------------- the asset


def report_path(storage: DeltaStorage) -> Path:
    """Where ``curation_report`` writes its HTML page (``curate report`` prints this)."""
    return storage.reports_dir() / rpt.REPORT_PAGE


@dg.asset(
    deps=["regurgitation_audit", "clip_bias_audit", "dataset_census",
          dg.AssetDep("filtered_samples", partition_mapping=dg.AllPartitionMapping()),
          dg.AssetDep("demographic_ratios", partition_mapping=dg.AllPartitionMapping()),
          "overall_demographic_ratios", "training_set",
          "dedup_groups", "deduplicated_samples", "dedup_recall", "safety_classifiers"],
    group_name="audits",
    kinds={"html"},
)
def curation_report(context: dg.AssetExecutionContext, storage: DeltaStorage, settings: CurationSettings,
                    shard_source: ShardSource) -> dg.MaterializeResult:
    """One HTML page for reviewers: the funnel (ingested, rejected, filtered per category, removed as
    duplicates, kept), the active-learning curve, group ratios per stage, the dedup recall curve, the
    census and links to the audit pages. Sections whose stage has not run say so."""
    from curation_assets.audits import CENSUS_PAGE, CLIP_BIAS_PAGE, REGURGITATION_PAGE, audits_config
    from curation_assets.safety_labels import NEXT_STEP, awaiting_message, label_readiness, safety_config
    from curation_assets.safety import classifiers_trained

    cfg = audits_config(settings)
    awaiting = None
    if not classifiers_trained(storage):
        awaiting = (awaiting_message(label_readiness(storage, safety_config(settings))) or "no classifier trained yet")
        awaiting += f". Next: {NEXT_STEP}."
    built = build_report(storage, cfg, context.log, awaiting, shard_source)
    path = report_path(storage)
    links = [(label, page) for label, page in (("Regurgitation audit", REGURGITATION_PAGE), ("CLIP bias audit", CLIP_BIAS_PAGE),
                                               ("Census", CENSUS_PAGE)) if (storage.reports_dir() / page).is_file()]
    rpt.write_page(path, rpt.render_page(cfg.report.get("title", "Curation report"), built.sections,
                                         subtitle=f"data root {storage.root_path}", links=links,
                                         summary=built.summary, collapsed=True))
    return dg.MaterializeResult(metadata={
        "path": dg.MetadataValue.path(str(path)),
        "report": dg.MetadataValue.url(path.as_uri()),
        "funnel": dg.MetadataValue.md(built.funnel_markdown),
        "stages not run": ", ".join(built.missing) or "none",
        "safety": dg.MetadataValue.text("awaiting labels" if awaiting else "filter applied"),
    })


defs = dg.Definitions(assets=[curation_report])
