"""``clip_bias_audit``: CLIP zero-shot misclassification of faces by race x gender group (Birhane et al.'s
protocol), one partition per configured open_clip checkpoint; the audit itself is ``core/clip_bias.py``."""

from pathlib import Path
from typing import Any

import dagster as dg
import polars as pl

from curation_assets.audits import AuditsConfig, CLIP_BIAS_PAGE, NOT_CONFIGURED, audits_config, checkpoint_names
from curation_assets.core import report as rpt
from resources.settings import CurationSettings
from resources.storage import DeltaStorage


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


def build_defs(settings: CurationSettings) -> dg.Definitions:
    """``clip_bias_audit`` with one partition per checkpoint configured in ``settings``."""
    return dg.Definitions(assets=[build_clip_bias_audit(checkpoint_names(audits_config(settings)))])
