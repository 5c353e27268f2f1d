"""The bias stage end to end through Dagster: ratios per stage, the reweighting fix, and the drift sensor.

Most tests write ``filtered_samples`` from the demo corpus's ground truth (a perfect filter that removes
every motif image), so they depend only on the foundation; ``test_real_safety_filter_...`` runs the real
safety stage (simulated annotator, one active-learning round, as ``make demo`` does) in front of the bias
stage, with its false positives and misses.
"""

import json
import shutil
import warnings
from pathlib import Path

import dagster as dg
import polars as pl
import pytest
import yaml

from curation_assets import bias
from curation_assets import bias_drift
from curation_assets.core.demographics import CaptionMatcher
from resources.alerts import AlertSink

warnings.filterwarnings("ignore", category=dg.BetaWarning)

# 4 normal shards and a drifted fifth; 2000 normal images is about the smallest corpus on which the weak
# probe (perceptual embeddings) reliably sees the thinned-out family: at 400 images the filter removes ~18
DRIFT_CORPUS = {"shards": 4, "per_shard": 500, "seed": 2, "size": 128, "drift_shard": True}
DRIFTED = "00004"


def write_truth_filter(storage, corpus: Path) -> pl.DataFrame:
    """``filtered_samples`` as a perfect filter would write it: every motif image removed with its category."""
    truth = pl.read_parquet(corpus / "ground_truth.parquet")
    ok = storage.read("samples", columns=["uid", "shard", "status"]).filter(pl.col("status") == "ok")
    table = ok.join(truth.select("uid", "category"), on="uid").select(
        "uid", "shard", kept=pl.col("category").is_null(),
        reasons=pl.when(pl.col("category").is_null()).then(pl.lit([], dtype=pl.List(pl.String)))
        .otherwise(pl.concat_list(pl.col("category"))))
    for shard in table["shard"].unique().sort().to_list():
        storage.write_shard("filtered_samples", table.filter(pl.col("shard") == shard), shard)
    return table


def drift_base(tmp_path_factory) -> tuple[Path, Path]:
    """A data root with a drifted corpus (3 normal shards + 1 drifted, see DRIFT_CORPUS) ingested and
    embedded; built once per session on disk and copied by each user."""
    from curation_assets.demo.corpus import write_demo_corpus
    from tests.conftest import open_ingested

    base = tmp_path_factory.getbasetemp() / "bias_drift_base"
    corpus, root = base / "corpus", base / "root"
    if not (base / "done").exists():
        shutil.rmtree(base, ignore_errors=True)
        write_demo_corpus(corpus, **DRIFT_CORPUS)
        state = open_ingested(corpus, root)
        state.materialize(["samples", "image_embeddings"])
        (base / "done").write_text("ok")
    return corpus, root


def drift_copy(tmp_path_factory, dest: Path, config: dict | None = None, sections: dict | None = None):
    from curation_assets.demo.run import demo_config
    from curation_assets.pipeline import open_pipeline

    corpus, root = drift_base(tmp_path_factory)
    shutil.copytree(root, dest, ignore=shutil.ignore_patterns("dagster_home"))
    path = demo_config(corpus, dest)
    if config:
        merged = yaml.safe_load(path.read_text()) or {}
        merged.setdefault("bias", {}).update(config)
        path.write_text(yaml.safe_dump(merged))
    if sections:
        merged = yaml.safe_load(path.read_text()) or {}
        path.write_text(yaml.safe_dump({**merged, **sections}))
    pipeline = open_pipeline(dest, corpus, str(path), instance=dg.DagsterInstance.ephemeral())
    pipeline.register_all_shards()
    return corpus, pipeline


# --- ratios, weights and the fix -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reweighted(tmp_path_factory):
    corpus, pipeline = drift_copy(tmp_path_factory, tmp_path_factory.mktemp("bias_root") / "root")
    write_truth_filter(pipeline.storage, corpus)
    pipeline.materialize(["sample_weights", "demographic_ratios", "overall_demographic_ratios"])
    pipeline.corpus = corpus
    return pipeline


def _overall_ratio(storage, stage):
    t = storage.read(bias.OVERALL_RATIOS).filter(
        (pl.col("scope") == "overall") & (pl.col("kind") == "ratio") & (pl.col("stage") == stage)
        & (pl.col("source") == "caption") & (pl.col("group") == "women/men"))
    assert t.height == 1
    return t.row(0, named=True)


def test_filtering_shifts_ratio_and_reweighting_restores_it(reweighted):
    raw = _overall_ratio(reweighted.storage, "raw")
    filtered = _overall_ratio(reweighted.storage, "filtered")
    fixed = _overall_ratio(reweighted.storage, "filtered_reweighted")
    print(f"women/men raw {raw['value']:.3f} filtered {filtered['value']:.3f} reweighted {fixed['value']:.3f}")
    assert filtered["value"] < raw["value"] * 0.95            # filtering shifts the ratio by more than 5%
    assert abs(fixed["value"] / raw["value"] - 1) <= 0.03     # reweighting brings it back within 3%
    assert fixed["change_vs_raw"] == pytest.approx(fixed["value"] / raw["value"] - 1)
    for row in (raw, filtered, fixed):
        assert row["low"] < row["value"] < row["high"]
    from curation_assets.demo import bias as demo_bias

    lines = demo_bias.summary(reweighted.storage, reweighted.corpus)
    assert any("filtering shifts the ratio" in line and "yes" in line for line in lines), lines


@pytest.fixture(scope="module")
def reweighted_real_filter(tmp_path_factory):
    from curation_assets.demo import safety as demo_safety
    from tests.test_safety_e2e import SMALL_SAFETY, SMALL_SEED  # recall target ~100 positives per category resolve

    corpus, pipeline = drift_copy(tmp_path_factory, tmp_path_factory.mktemp("bias_real_filter") / "root",
                                  sections={"safety": SMALL_SAFETY})
    demo_safety.active_learning(lambda names: pipeline.materialize(names), pipeline.storage, pipeline.settings,
                                corpus, rounds=1, annotator_config=SMALL_SEED)
    pipeline.materialize(["safety_scores", "filtered_samples", "sample_weights", "demographic_ratios",
                          "overall_demographic_ratios"])
    pipeline.corpus = corpus
    return pipeline


def test_real_safety_filter_shift_is_restored_by_reweighting(reweighted_real_filter):
    """The acceptance with the real filter: its false positives (mostly hard negatives) and misses change
    which images are kept, and the probe's penalty is selected without demographics (region balance)."""
    storage = reweighted_real_filter.storage
    raw, filtered, fixed = (_overall_ratio(storage, s) for s in ("raw", "filtered", "filtered_reweighted"))
    kept = storage.read("filtered_samples", columns=["uid", "kept"])
    truth = pl.read_parquet(reweighted_real_filter.corpus / "ground_truth.parquet").join(kept, on="uid")
    removed = truth.filter(~pl.col("kept"))
    print(f"real filter removed {removed.height} ({removed['category'].null_count()} clean); women/men raw "
          f"{raw['value']:.3f} filtered {filtered['value']:.3f} reweighted {fixed['value']:.3f}")
    assert filtered["value"] < raw["value"] * 0.95
    assert abs(fixed["value"] / raw["value"] - 1) <= 0.03
    md = reweighted_real_filter.instance.get_latest_materialization_event(
        dg.AssetKey("sample_weights")).asset_materialization.metadata
    assert md["regularization_selection"].value == "balance"
    assert md["probe_regularization"].value in {float(k) for k in md["selection_scores"].value}


def test_ratio_table_counts_reconcile_with_captions_and_truth(reweighted):
    storage = reweighted.storage
    table = pl.concat([storage.read("demographic_ratios"), storage.read(bias.OVERALL_RATIOS)])
    samples = storage.read("samples").filter(pl.col("status") == "ok")
    truth = pl.read_parquet(reweighted.corpus / "ground_truth.parquet").join(samples.select("uid"), on="uid")
    version = CaptionMatcher(bias.load_settings(reweighted.settings).caption_groups).version
    assert set(table["source_version"].unique()) == {version}
    assert set(table["shard"].unique()) == set(samples["shard"].unique()) | {bias.OVERALL}
    raw = table.filter((pl.col("stage") == "raw") & (pl.col("kind") == "share") & (pl.col("scope") == "overall"))
    counts = {r["group"]: (r["count"], r["n"]) for r in raw.iter_rows(named=True)}
    women = truth.filter(pl.col("gender").is_in(["women", "mixed"])).height
    men = truth.filter(pl.col("gender").is_in(["men", "mixed"])).height
    assert counts["women"] == (women, samples.height) and counts["men"] == (men, samples.height)
    per_shard = table.filter((pl.col("scope") == "shard") & (pl.col("stage") == "raw") & (pl.col("kind") == "share")
                             & (pl.col("group") == "women"))
    assert per_shard["count"].sum() == women
    kept = storage.read("filtered_samples").filter(pl.col("kept")).height
    filt = table.filter((pl.col("scope") == "overall") & (pl.col("stage") == "filtered") & (pl.col("kind") == "share"))
    assert set(filt["n"].to_list()) == {kept}
    keywords = table.filter((pl.col("kind") == "keyword") & (pl.col("scope") == "overall") & (pl.col("stage") == "filtered"))
    assert {"woman", "women", "man", "men"} <= set(keywords["group"].to_list())
    # the keyword 'woman' loses more than the keyword 'man' under the filter, as in OpenAI's table
    change = {r["group"]: r["change_vs_raw"] for r in keywords.iter_rows(named=True)}
    assert change["woman"] < change["man"]


def test_sample_weights_table(reweighted):
    storage = reweighted.storage
    weights = storage.read("sample_weights")
    kept = storage.read("filtered_samples").filter(pl.col("kept"))
    assert weights.height == kept.height and set(weights["uid"]) == set(kept["uid"])
    assert weights["weight"].mean() == pytest.approx(1.0)
    assert weights["weight"].min() > 0
    truth = pl.read_parquet(reweighted.corpus / "ground_truth.parquet").join(weights, on="uid")
    # the probe must lift the family the filter thinned out (people) above the untouched families
    mean_by_family = dict(truth.group_by("family").agg(pl.col("weight").mean()).iter_rows())
    assert mean_by_family["people"] > 1.1 * max(mean_by_family[f] for f in ("clock", "banner", "scene"))
    event = reweighted.instance.get_latest_materialization_event(dg.AssetKey("sample_weights"))
    md = event.asset_materialization.metadata
    assert 0 < md["effective_sample_size"].value <= weights.height
    assert md["kept"].value == kept.height


def test_sample_weights_streamed_under_a_small_memory_budget(reweighted, tmp_path, monkeypatch):
    """Past a quarter of the budget the probe is fitted on a bounded sample and rows are weighted shard by
    shard: every kept sample still gets one weight of mean 1, the thinned-out family is still lifted, and the
    reweighted ratio is restored about as well as by the in-memory fit."""
    import dagster as dg

    from curation_assets.pipeline import open_pipeline

    storage = reweighted.storage
    n, dim = storage.embedding_shape()
    monkeypatch.setenv("CURATION_MEMORY_GB", str(12 * n * dim / 2 ** 30))  # a sample of ~0.37 n per class
    shutil.copytree(reweighted.root, tmp_path / "root", ignore=shutil.ignore_patterns("dagster_home"))
    pipeline = open_pipeline(tmp_path / "root", reweighted.corpus, reweighted.config_path,
                             instance=dg.DagsterInstance.ephemeral())
    pipeline.register_all_shards()
    pipeline.materialize(["sample_weights", "overall_demographic_ratios"])
    event = pipeline.instance.get_latest_materialization_event(dg.AssetKey("sample_weights"))
    md = event.asset_materialization.metadata
    assert md["fit"].value.startswith("streamed")
    assert 0.3 * n < md["train_unfiltered"].value < 0.45 * n
    weights = pipeline.storage.read("sample_weights")
    kept = pipeline.storage.read("filtered_samples").filter(pl.col("kept"))
    assert weights.height == kept.height and set(weights["uid"]) == set(kept["uid"])
    assert weights["weight"].mean() == pytest.approx(1.0)
    truth = pl.read_parquet(reweighted.corpus / "ground_truth.parquet").join(weights, on="uid")
    mean_by_family = dict(truth.group_by("family").agg(pl.col("weight").mean()).iter_rows())
    assert mean_by_family["people"] > 1.1 * max(mean_by_family[f] for f in ("clock", "banner", "scene"))
    raw = _overall_ratio(pipeline.storage, "raw")
    fixed = _overall_ratio(pipeline.storage, "filtered_reweighted")
    in_memory = _overall_ratio(reweighted.storage, "filtered_reweighted")
    print(f"women/men raw {raw['value']:.3f} reweighted: streamed {fixed['value']:.3f}, in memory "
          f"{in_memory['value']:.3f}")
    assert abs(fixed["value"] / raw["value"] - 1) <= 0.03


# --- the drift sensor ------------------------------------------------------------------------------------

def _sensor_context(pipeline, cursor=None):
    r = pipeline.defs.resources
    return dg.build_sensor_context(instance=pipeline.instance, cursor=cursor,
                                   resources={"storage": r["storage"], "settings": r["settings"], "alerts": r["alerts"]})


def test_drift_sensor_alerts_once_for_the_drifted_shard(tmp_path_factory):
    corpus, pipeline = drift_copy(tmp_path_factory, tmp_path_factory.mktemp("drift") / "root")
    pipeline.materialize(["demographic_ratios"])
    drifted = DRIFTED
    result = bias_drift.bias_drift_sensor(_sensor_context(pipeline))
    alerts = AlertSink().read(pipeline.storage)
    assert alerts.height == 1, alerts
    alert = alerts.row(0, named=True)
    assert alert["shard"] == drifted and alert["source"] == "bias_drift" and alert["severity"] in ("WARN", "ERROR")
    details = json.loads(alert["details"])
    assert details["reference_shards"] == ["00000", "00001", "00002", "00003"]
    assert any(g["tripped"] and g["group"] == "women" and g["effect"] < 0.8 for g in details["groups"])
    # the asset check result goes out with the tick: failed, listing only the drifted shard
    assert isinstance(result, dg.SensorResult)
    (check,) = result.asset_events
    assert isinstance(check, dg.AssetCheckEvaluation) and not check.passed
    assert check.metadata["drifted_shards"].value == [drifted]
    statuses = check.metadata["statuses"].value
    assert statuses[drifted] == "alert" and all(statuses[s] != "alert" for s in ("00000", "00001", "00002", "00003"))
    # the next tick sees nothing new; a replay from scratch does not alert twice
    assert isinstance(bias_drift.bias_drift_sensor(_sensor_context(pipeline, cursor=result.cursor)), (dg.SkipReason, dg.SensorResult))
    bias_drift.bias_drift_sensor(_sensor_context(pipeline))
    assert AlertSink().read(pipeline.storage).height == 1
    # the asset check, run as a check, agrees
    check_result = dg.materialize([bias.demographic_ratios, bias_drift.demographic_drift], instance=pipeline.instance,
                                  resources=pipeline.defs.resources,
                                  selection=dg.AssetSelection.checks(bias_drift.demographic_drift))
    (evaluation,) = check_result.get_asset_check_evaluations()
    assert not evaluation.passed and evaluation.metadata["drifted_shards"].value == [drifted]


def test_changed_word_lists_reset_the_reference_instead_of_alerting(tmp_path_factory):
    corpus, pipeline = drift_copy(tmp_path_factory, tmp_path_factory.mktemp("reset") / "root")
    pipeline.materialize(["demographic_ratios"], shards=["00000", "00001", "00002", "00003"])
    first = bias_drift.bias_drift_sensor(_sensor_context(pipeline))
    assert AlertSink().read(pipeline.storage).height == 0
    # new word lists, then the drifted shard arrives: it is measured with another version -> reset, no alert
    from curation_assets.pipeline import open_pipeline

    groups = dict(bias.load_settings(pipeline.settings).caption_groups)
    groups["women"] = groups["women"] + ["queen"]
    config = yaml.safe_load(Path(pipeline.config_path).read_text()) or {}
    config.setdefault("bias", {})["caption_groups"] = groups
    new_config = pipeline.root / "new_words.yaml"
    new_config.write_text(yaml.safe_dump(config))
    changed = open_pipeline(pipeline.root, corpus, str(new_config), instance=pipeline.instance)
    changed.materialize(["demographic_ratios"], shards=[DRIFTED])
    result = bias_drift.bias_drift_sensor(_sensor_context(changed, cursor=first.cursor))
    assert AlertSink().read(changed.storage).height == 0
    table = changed.storage.read("demographic_ratios").filter(pl.col("scope") == "shard")
    versions = dict(table.select("shard", "source_version").unique().iter_rows())
    assert versions[DRIFTED] != versions["00000"]
    (check,) = result.asset_events
    assert check.passed and check.metadata["statuses"].value == {DRIFTED: "reset"}


def test_bad_bias_config_is_a_clear_error():
    from resources.settings import default_section

    base = default_section("bias")
    for bad, message in [({"ratio_pairs": [["women", "aliens"]]}, "ratio pair"),
                         ({"drift": {**base["drift"], "band": [1.2, 0.9]}}, "band"),
                         ({"drift": {**base["drift"], "stage": "final"}}, "drift.stage"),
                         ({"reweighting": {"C": 1}}, "bias config"),
                         ({"reweighting": {**base["reweighting"], "selection": "accuracy"}}, "selection"),
                         ({"reweighting": {**base["reweighting"], "regularization_grid": []}}, "regularization_grid"),
                         ({"colour": 1}, "unknown keys")]:
        with pytest.raises(ValueError, match=message):
            bias.BiasSettings.from_section({**base, **bad})
