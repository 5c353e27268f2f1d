"""The audits stage through Dagster: regurgitation on the demo corpus's planted copies, the census, the
CLIP bias audit with tiny random open_clip models (and its "not configured" result), the report."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl
import pytest
import yaml
from PIL import Image

from curation_assets import audits, report
from curation_assets import clip_bias_audit
from curation_assets.core import regurgitation as rg
from resources.settings import CurationSettings
from resources.storage import DeltaStorage


@pytest.fixture(scope="module")
def audited(ingested, tmp_path_factory):
    """A copy of the ingested root with the regurgitation audit, census and report materialised (no safety,
    dedup or bias stage: the report must say those did not run)."""
    state = ingested.copy(tmp_path_factory.mktemp("audited"))
    state.materialize(["regurgitation_audit", "dataset_census", "curation_report"])
    return state


def test_regurgitation_flags_planted_copies_and_spares_novel_images(audited):
    truth = pl.read_parquet(audited.corpus / "generated_truth.parquet")
    table = audited.storage.read("regurgitation_audit")
    assert set(table["reference"].unique()) == {"full"}  # dedup stage not run
    best = rg.flagged_per_image(table, "full")
    assert best.height == truth.height == table["generated_id"].n_unique()
    joined = truth.join(best, left_on="uid", right_on="generated_id", how="inner")
    assert joined.height == truth.height
    copies = joined.filter(pl.col("kind") == "copy")
    novel = joined.filter(pl.col("kind") == "novel")
    assert copies.height >= 20 and novel.height >= 20
    assert copies["flagged"].mean() >= 0.95
    assert novel["flagged"].mean() <= 0.01
    found = copies.filter(pl.col("flagged"))
    # the match is the true source or one of its planted near-duplicates in the training set (same picture)
    group = dict(pl.read_parquet(audited.corpus / "ground_truth.parquet").select("uid", "dup_group").iter_rows())
    same = [t == s or (group[s] is not None and group[t] == group[s]) for t, s in found.select("train_uid", "source_uid").iter_rows()]
    assert np.mean(same) >= 0.9
    summary = audited.storage.read_json("regurgitation_audit")
    full = summary["summaries"][0]
    assert full["n_flagged"] == best["flagged"].sum() and full["ci_low"] < full["rate"] < full["ci_high"]
    assert full["index"] == "flat-streamed" and summary["threshold_source"] == "audits.regurgitation.thresholds[perceptual-v1]"
    packaged = yaml.safe_load((Path(audits.__file__).parent / "configs" / "audits.yaml").read_text())["regurgitation"]
    assert summary["threshold"] == packaged["thresholds"]["perceptual-v1"]  # production settings, not test ones
    assert audits.audits_config(audited.settings).regurgitation.colour_shifts == packaged["colour_shifts"]
    assert full["n_above_threshold"] >= full["n_flagged"]
    candidates = table.filter(pl.col("candidate"))
    assert candidates["verification"].null_count() == 0 and table.filter(~pl.col("candidate"))["verification"].null_count() == table.filter(~pl.col("candidate")).height
    assert (table["flagged"] == (table["candidate"] & (table["verification"] >= 0.78).fill_null(False))).all()
    page = (audited.storage.reports_dir() / audits.REGURGITATION_PAGE).read_text()
    assert page.count('class="match"') == int(best["flagged"].sum())
    assert page.count("data:image/jpeg;base64,") == 2 * int(best["flagged"].sum())


def test_regurgitation_against_deduplicated_set_and_approximate_index(audited, tmp_path):
    state = audited.copy(tmp_path / "root")
    truth = pl.read_parquet(state.corpus / "generated_truth.parquet")
    sources = truth.filter(pl.col("kind") == "copy")["source_uid"].to_list()
    ok = state.storage.read("samples").filter(pl.col("status") == "ok")
    # a deduplicated set that lost half the copied sources: those copies must no longer be flagged there
    dropped = set(sources[::2])
    kept = ok.filter(~pl.col("uid").is_in(list(dropped))).select("uid", "shard")
    state.storage.write_table("deduplicated_samples", kept)
    config = yaml.safe_load(Path(state.pipeline.config_path).read_text())
    config["audits"]["regurgitation"]["index"] = {"kind": "hnsw", "recall_sample": 50}
    config["audits"]["regurgitation"]["threshold"] = 0.5  # this test is about the reference sets, not the encoder's cut
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    from curation_assets.pipeline import open_pipeline

    pipeline = open_pipeline(state.root, state.corpus, str(config_path), instance=dg.DagsterInstance.ephemeral())
    pipeline.register_all_shards()
    result = pipeline.materialize(["regurgitation_audit"])[-1]
    metadata = result.asset_materializations_for_node("regurgitation_audit")[0].metadata
    assert metadata["index"].value == "hnsw"
    assert 0.0 < metadata["index_recall_at_k"].value <= 1.0
    table = pipeline.storage.read("regurgitation_audit")
    assert not table.filter(pl.col("reference") == "deduplicated")["train_uid"].is_in(list(dropped)).any()
    dedup_best = rg.flagged_per_image(table, "deduplicated")
    copy_ids = truth.filter(pl.col("source_uid").is_in(list(dropped)))["uid"]
    full_flag = rg.flagged_per_image(table, "full").filter(pl.col("generated_id").is_in(copy_ids))["flagged"].mean()
    dedup_flag = dedup_best.filter(pl.col("generated_id").is_in(copy_ids))["flagged"].mean()
    assert full_flag > 0.5 and dedup_flag < full_flag  # the acceptance level is the previous test's job
    assert metadata["regurgitation_rate_deduplicated"].value < metadata["regurgitation_rate"].value


def test_census_counts_and_faces(audited):
    samples = audited.storage.read("samples")
    census = audited.storage.read("dataset_census")
    total = census.filter(pl.col("shard") == "all").row(0, named=True)
    assert total["samples"] == samples.height
    assert total["ok"] == samples.filter(pl.col("status") == "ok").height
    assert total["rejected"] == samples.height - total["ok"]
    per_shard = census.filter(pl.col("shard") != "all")
    assert per_shard["samples"].sum() == samples.height
    out = audited.storage.root_path / "artifacts" / "dataset_census"
    faces = pl.read_parquet(out / "faces.parquet")
    assert faces.filter(pl.col("shard") == "all")["images_scanned"].item() > 0
    for plot in ("image_sizes", "caption_length", "demographic_words", "faces"):
        assert Image.open(out / f"{plot}.png").size[0] > 100
    words = pl.read_parquet(out / "demographic_words.parquet")
    truth = pl.read_parquet(audited.corpus / "ground_truth.parquet")
    women = words.filter((pl.col("shard") == "all") & (pl.col("group") == "women") & pl.col("word").is_null())["captions"].item()
    assert women > 0 and (truth["gender"] == "women").sum() > 0


def test_report_sections_cope_with_missing_stages(audited):
    page = report.report_path(audited.storage).read_text()
    for section in ("Funnel", "Active learning", "Group ratios per stage", "Dedup recall", "Regurgitation audit", "Dataset census"):
        assert f">{section}</h2>" in page
    assert page.count("Stage not run") >= 3  # active learning, bias, dedup recall
    assert "regurgitation.html" in page and "census.html" in page
    samples = audited.storage.read("samples")
    assert f"<td class=\"text\">ingested</td><td>{samples.height}</td>" in page
    assert f"<td class=\"text\">kept (before dedup)</td><td>{samples.filter(pl.col('status') == 'ok').height}</td>" in page


def test_funnel_reconciles_with_filtering_and_dedup(audited, tmp_path):
    from curation_assets.core.training_set import final_verdicts
    from curation_assets.report_sections import funnel

    storage = DeltaStorage(root=str(tmp_path))
    samples = pl.DataFrame({"uid": [f"s/{i}" for i in range(10)], "shard": ["s"] * 10,
                            "status": ["rejected"] + ["ok"] * 9, "error": ["corrupt"] + [None] * 9})
    storage.write_table("samples", samples)
    table, _, missing = funnel(storage)
    assert missing == ["safety (filtered_samples)", "final verdicts (training_set)"]
    assert dict(table.select("step", "samples").iter_rows())["kept (before dedup)"] == 9
    filtered = pl.DataFrame({
        "uid": [f"s/{i}" for i in range(10)], "shard": ["s"] * 10, "kept": [False] * 4 + [True] * 6,
        "reasons": [["rejected"], ["violence"], ["sexual", "violence"], ["sexual"]] + [[]] * 6})
    storage.write_table("filtered_samples", filtered)
    # group a: s/1 has the highest resolution but is filtered, so s/4 (kept by the filter) stands for it
    groups = pl.DataFrame({"uid": ["s/1", "s/4", "s/5", "s/6", "s/7"], "group_id": ["a", "a", "b", "b", "b"],
                           "width": [512, 256, 256, 128, 128], "height": [512, 256, 256, 128, 128]})
    dedup = pl.DataFrame({"uid": [f"s/{i}" for i in range(10)],
                          "status": ["rejected", "representative", "singleton", "singleton", "duplicate",
                                     "representative", "duplicate", "duplicate", "singleton", "singleton"]})
    storage.write_table("training_set", final_verdicts(samples, dedup, groups, filtered, None, None,
                                                       ["highest_resolution", "uid"]))
    table, _, missing = funnel(storage)
    steps = dict(table.select("step", "samples").iter_rows())
    assert missing == []
    assert steps["filtered (safety)"] == 3 and steps["  filtered: violence"] == 2 and steps["  filtered: sexual"] == 2
    assert steps["removed as duplicates"] == 2  # s/6, s/7; s/4 stays for its filtered twin s/1
    assert steps["kept"] == 4  # s/4, s/5, s/8, s/9
    assert steps["rejected at ingest"] + steps["filtered (safety)"] + steps["removed as duplicates"] + steps["kept"] == steps["ingested"]


# --------------------------------------------------------------------------- CLIP bias audit


def _settings(tmp_path: Path, clip_bias: dict) -> CurationSettings:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"audits": {"clip_bias": clip_bias}}))
    return CurationSettings(config_path=str(path))


def test_clip_bias_not_configured_materialises_with_instructions(tmp_path):
    asset = clip_bias_audit.build_clip_bias_audit(["ViT-L-14-laion400m"])
    storage = DeltaStorage(root=str(tmp_path / "root"))
    result = dg.materialize([asset], partition_key="ViT-L-14-laion400m",
                            resources={"storage": storage, "settings": CurationSettings()})
    assert result.success
    metadata = result.asset_materializations_for_node("clip_bias_audit")[0].metadata
    assert "not configured" in metadata["status"].value
    assert "probe_dir" in metadata["ViT-L-14-laion400m: configure"].value
    assert "Not configured" in (storage.reports_dir() / audits.CLIP_BIAS_PAGE).read_text()


def _probe_set(root: Path, per_group: int = 6) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    lines = ["image,race,gender"]
    for race in ("B", "W"):
        for gender in ("F", "M"):
            for i in range(per_group):
                name = f"CFD-{race}{gender}-{i:03d}-N.jpg"
                Image.fromarray(rng.integers(0, 255, (80, 64, 3), dtype=np.uint8)).save(root / name)
                lines.append(f"{name},{race},{gender}")
    (root / "probes.csv").write_text("\n".join(lines) + "\n")
    return root


def test_clip_bias_missing_weights_is_not_configured_not_a_crash(tmp_path):
    probe = _probe_set(tmp_path / "probes")
    settings = _settings(tmp_path, {"probe_dir": str(probe), "checkpoints": [
        {"name": "real", "model": "ViT-B-32", "pretrained": str(tmp_path / "absent.pt")}]})
    storage = DeltaStorage(root=str(tmp_path / "root"))
    result = dg.materialize([clip_bias_audit.build_clip_bias_audit(["real"])], partition_key="real",
                            resources={"storage": storage, "settings": settings})
    metadata = result.asset_materializations_for_node("clip_bias_audit")[0].metadata
    assert "absent.pt does not exist" in metadata["real: configure"].value


def test_clip_bias_with_tiny_random_models_across_checkpoints(tmp_path):
    from curation_assets.core.clip_bias import write_tiny_model_config

    cfg_a = write_tiny_model_config(tmp_path / "models" / "tiny_clip_a.json")
    cfg_b = write_tiny_model_config(tmp_path / "models" / "tiny_clip_b.json", embed_dim=48)
    probe = _probe_set(tmp_path / "probes")
    settings = _settings(tmp_path, {
        "probe_dir": str(probe), "races": ["Black", "White"], "genders": ["female", "male"], "device": "cpu",
        "checkpoints": [
            {"name": "tiny-a", "model": "tiny_clip_a", "model_config": str(cfg_a), "random_init": True},
            {"name": "tiny-b", "model": "tiny_clip_b", "model_config": str(cfg_b), "random_init": True},
        ]})
    storage = DeltaStorage(root=str(tmp_path / "root"))
    asset = clip_bias_audit.build_clip_bias_audit(["tiny-a", "tiny-b"])
    for key in ("tiny-a", "tiny-b"):
        result = dg.materialize([asset], partition_key=key, resources={"storage": storage, "settings": settings})
        assert result.success
    table = storage.read("clip_bias_audit")
    labels = audits.audits_config(settings).clip_bias.labels
    assert set(table["checkpoint"].unique()) == {"tiny-a", "tiny-b"}
    for (ckpt, group), part in table.group_by("checkpoint", "group"):
        assert part.height == len(labels)
        assert part["top1"].sum() == part["n"][0]
        assert part["mean_prob"].sum() == pytest.approx(1.0, abs=1e-6)
        assert part["n"][0] == (24 if group == "all" else 6)
    assert set(table["group"].unique()) == {"Black female", "Black male", "White female", "White male", "all"}
    page = (storage.reports_dir() / audits.CLIP_BIAS_PAGE).read_text()
    assert "Change against tiny-a" in page and "randomly initialised" in page
    # re-running one checkpoint replaces its rows only
    dg.materialize([asset], partition_key="tiny-b", resources={"storage": storage, "settings": settings})
    assert storage.read("clip_bias_audit").height == table.height


def test_audits_config_rejects_unknown_keys_and_bad_values():
    with pytest.raises(ValueError, match="unknown keys"):
        audits.AuditsConfig.from_section({"regurgitation": {"treshold": 0.5}})
    with pytest.raises(ValueError, match="human_labels"):
        audits.AuditsConfig.from_section({"clip_bias": {"labels": ["cat"], "templates": ["{label}"], "human_labels": ["dog"]}})
    with pytest.raises(ValueError, match="regurgitation.index"):
        audits.AuditsConfig.from_section({"regurgitation": {"index": {"kind": "flat", "nprobes": 3}}})
    from resources.settings import default_section

    cfg = audits.AuditsConfig.from_section(default_section("audits"))
    assert cfg.regurgitation.generated is None and cfg.clip_bias.temperature == 100.0
    assert [c.name for c in cfg.checkpoints()] == audits.checkpoint_names(cfg)


def test_report_sections_draw_upstream_curves(tmp_path):
    from curation_assets import report

    storage = DeltaStorage(root=str(tmp_path))
    storage.write_table("active_learning_rounds", pl.DataFrame({
        "round": [1, 2, 1, 2], "category": ["violence", "violence", "sexual", "sexual"], "n_labels": [60, 75, 60, 75],
        "cv_auc": [0.8, 0.9, 0.7, 0.85], "precision_at_target": [0.4, 0.6, 0.3, 0.5]}))
    storage.write_table("dedup_recall", pl.DataFrame({
        "clusterings": [1, 2, 3, 4, 5], "true_pairs": [100] * 5, "found": [85, 91, 94, 96, 97],
        "recall": [0.85, 0.91, 0.94, 0.96, 0.97], "recall_low": [0.77, 0.84, 0.88, 0.9, 0.91],
        "recall_high": [0.9, 0.95, 0.97, 0.98, 0.99], "recall_mean_over_subsets": [0.84, 0.9, 0.94, 0.96, 0.97]}))
    storage.write_table("demographic_ratios", pl.DataFrame({
        "shard": ["00000", "_overall"], "scope": ["shard", "overall"], "stage": ["raw", "raw"], "kind": ["ratio", "ratio"],
        "group": ["women/men", "women/men"], "value": [1.7, 1.72]}))
    al = report.active_learning_section(storage)
    dedup = report.dedup_recall_section(storage)
    bias = report.bias_section(storage)
    assert al.missing is None and "<img" in al.blocks[0] and "precision_at_target" in al.blocks[1]
    assert dedup.missing is None and "<img" in dedup.blocks[0] and "0.970" in dedup.blocks[1]
    assert "_overall" in bias.blocks[0] and "00000" not in bias.blocks[0]


def test_census_under_a_small_memory_budget_samples_only_the_overall_quantiles(audited, tmp_path, monkeypatch):
    """Shard by shard, with a sample of rows for the overall quantiles: every count and every per-shard row is
    what the census computes from the whole table; only the 'all' quantiles and the plots come from the sample."""
    import json

    from polars.testing import assert_frame_equal

    from tests.conftest import open_ingested

    monkeypatch.setenv("CURATION_MEMORY_GB", str(120 * 512 * 4 / 2 ** 30))  # a sample of ~120 of the 400 rows
    state = open_ingested(audited.corpus, tmp_path / "root", source=audited.root)
    state.materialize(["dataset_census"])
    event = state.pipeline.instance.get_latest_materialization_event(dg.AssetKey("dataset_census"))
    assert 0.2 < event.asset_materialization.metadata["sampled_fraction"].value < 0.4
    before = audited.storage.root_path / "artifacts" / "dataset_census"
    after = state.storage.root_path / "artifacts" / "dataset_census"
    for name in ("status_counts", "demographic_words"):
        assert pl.read_parquet(after / f"{name}.parquet").equals(pl.read_parquet(before / f"{name}.parquet"))
    full, sampled = (pl.read_parquet(d / "distributions.parquet") for d in (before, after))
    assert_frame_equal(sampled.filter(pl.col("shard") != "all"), full.filter(pl.col("shard") != "all"))
    exact = ["metric", "shard", "n", "mean", "min", "max"]
    assert_frame_equal(sampled.filter(pl.col("shard") == "all").select(exact),
                       full.filter(pl.col("shard") == "all").select(exact))
    overall = sampled.filter(pl.col("shard") == "all")
    assert ((overall["p50"] >= overall["min"]) & (overall["p50"] <= overall["max"])).all()
    assert "sample" in json.loads((after / "notes.json").read_text())["sampled"]
    table = state.storage.read("dataset_census").filter(pl.col("shard") == "all")
    assert table["ok"].to_list() == audited.storage.read("dataset_census").filter(pl.col("shard") == "all")["ok"].to_list()
