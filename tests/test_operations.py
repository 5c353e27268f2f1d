"""Operating the pipeline as a new user would: a first run on shards with no labels that still curates, labels
that fill in the safety stage on the next run, and shared tables that two runs write at the same time."""

import csv
import multiprocessing
import tarfile
from pathlib import Path

import dagster as dg
import polars as pl
import pytest
import yaml
from click.testing import CliRunner

from resources.storage import DeltaStorage

LABEL_FREE_TABLES = ("samples", "image_embeddings", "kmeans_centroids", "cluster_assignments", "duplicate_pairs",
                     "dedup_groups", "deduplicated_samples", "dedup_recall", "demographic_ratios",
                     "overall_demographic_ratios", "dataset_census", "labeling_queue", "training_set")
LABEL_TABLES = ("safety_thresholds", "safety_scores", "filtered_samples", "sample_weights")


def _tar_keys(corpus: Path) -> dict[str, int]:
    """Distinct sample keys per tar, read with the standard library (what ingest must account for)."""
    out = {}
    for tar in sorted(corpus.glob("*.tar")):
        with tarfile.open(tar) as handle:
            out[tar.stem] = len({Path(m.name).name.split(".", 1)[0] for m in handle.getmembers() if m.isfile()})
    return out


def _latest_metadata(root: Path, asset: str) -> dict:
    instance = dg.DagsterInstance.from_config(str(root / "dagster_home"))
    event = instance.get_latest_materialization_event(dg.AssetKey(asset))
    return {k: v.value for k, v in event.asset_materialization.metadata.items()}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_first_run_without_labels_curates_and_labels_fill_in_the_safety_stage(demo_corpus, tmp_path):
    from curation_assets.cli import main
    from curation_assets.demo.run import demo_config

    root = tmp_path / "root"
    config = str(demo_config(demo_corpus, tmp_path))  # the small corpus's reachable recall target (0.9)
    run = ["run", "--shards-dir", str(demo_corpus), "--root", str(root), "--config", config]
    cli = CliRunner()

    first = cli.invoke(main, run)
    assert first.exit_code == 0, first.output
    assert "safety: awaiting labels" in first.output and "curate labels export-queue" in first.output
    storage = DeltaStorage(root=str(root))
    for table in LABEL_FREE_TABLES:
        assert storage.exists(table), table
    for table in LABEL_TABLES:
        assert not storage.exists(table), table
    keys = _tar_keys(demo_corpus)
    samples = storage.read("samples", columns=["uid", "shard", "status"])
    assert dict(samples.group_by("shard").len().iter_rows()) == keys
    for table in ("deduplicated_samples", "training_set"):
        out = storage.read(table, columns=["uid"])
        assert out.height == out["uid"].n_unique() == samples.height, table
    final = storage.read("training_set")
    assert not final["filter_applied"].any()
    assert set(final.filter(pl.col("verdict") == "kept")["weight"].to_list()) == {1.0}
    assert final.filter(pl.col("verdict") == "duplicate").height > 0
    stages = set(storage.read("demographic_ratios")["stage"].unique())
    assert {"raw", "deduplicated", "training_set"} <= stages and "filtered" not in stages
    queue = storage.read("labeling_queue")
    small = yaml.safe_load(Path(config).read_text())["safety"]
    assert set(queue["procedure"]) == {"diverse"} and queue["round"].unique().to_list() == [1]
    assert queue["uid"].n_unique() == small["active_learning"]["batch_size"]
    assert set(queue["category"]) == {c["name"] for c in small["categories"]}
    report = (root / "reports" / "curation_report.html").read_text()
    assert "Pending: awaiting labels" in report
    assert _latest_metadata(root, "safety_classifiers")["status"] == "awaiting_labels"
    assert _latest_metadata(root, "training_set")["status"].startswith("awaiting labels")

    # a labeller answers the queue and adds the positives found while browsing (ground truth stands in)
    queue_csv = tmp_path / "queue.csv"
    exported = cli.invoke(main, ["labels", "export-queue", "--root", str(root), "--config", config, "--out", str(queue_csv)])
    assert exported.exit_code == 0, exported.output
    truth = dict(pl.read_parquet(demo_corpus / "ground_truth.parquet", columns=["uid", "category"]).iter_rows())
    ok = set(samples.filter(pl.col("status") == "ok")["uid"])
    answers = [{"uid": r["uid"], "category": r["category"], "label": int(truth.get(r["uid"]) == r["category"])}
               for r in csv.DictReader(queue_csv.open())]
    answers += [{"uid": uid, "category": category, "label": 1} for uid, category in truth.items()
                if category is not None and uid in ok]
    labels_csv = tmp_path / "labels.csv"
    with labels_csv.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, ["uid", "category", "label"])
        writer.writeheader()
        writer.writerows(answers)
    imported = cli.invoke(main, ["labels", "import", str(labels_csv), "--root", str(root), "--config", config])
    assert imported.exit_code == 0, imported.output

    second = cli.invoke(main, run)
    assert second.exit_code == 0, second.output
    assert "awaiting labels" not in second.output
    for table in LABEL_TABLES:
        assert storage.exists(table), table
    assert any((root / "artifacts" / "safety_classifiers").glob("v*/manifest.json"))
    final = storage.read("training_set")
    assert final.height == final["uid"].n_unique() == samples.height and final["filter_applied"].all()
    assert final.filter(pl.col("verdict") == "filtered").height > 0
    assert final.filter(pl.col("verdict") == "kept")["weight"].mean() == pytest.approx(1.0)
    assert {"filtered", "filtered_reweighted", "training_set_weighted"} <= set(storage.read("demographic_ratios")["stage"])
    census = pl.read_parquet(root / "artifacts" / "dataset_census" / "safety_scores.parquet")
    assert set(census["score"]) == {"violence", "sexual"}  # per category, and no threshold column pooled in
    scores = storage.read("safety_scores")
    for category in ("violence", "sexual"):
        row = census.filter((pl.col("score") == category) & (pl.col("shard") == "all")).row(0, named=True)
        assert row["n"] == scores.filter(pl.col("category") == category).height
        assert row["mean"] == pytest.approx(scores.filter(pl.col("category") == category)["score"].mean(), rel=1e-5)


# --------------------------------------------------------------------------- two runs at once


def _together(target, argument_lists) -> None:
    """Run ``target(barrier, *args)`` in one process per argument list, released at the same moment."""
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(len(argument_lists))
    procs = [ctx.Process(target=target, args=(barrier, *args)) for args in argument_lists]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0] * len(procs)


def _queue_round(barrier, root: str, round_no: int) -> None:
    from curation_assets.core.labels import utcnow
    from curation_assets.safety import _write_queue

    rows = [{"round": round_no, "category": c, "rank": i, "uid": f"00000/{round_no:03d}{i:03d}", "shard": "00000",
             "procedure": "diverse", "score": None, "threshold": None, "why": "test", "classifier_version": None,
             "created_at": utcnow()} for c in ("violence", "sexual") for i in range(20)]
    barrier.wait()
    for _ in range(3):
        _write_queue(DeltaStorage(root=root), rows, round_no)


def _record(barrier, root: str, round_no: int) -> None:
    from curation_assets.safety import _record_round

    rows = [{"round": round_no, "category": c, "n_labels": 10 * round_no, "cv_auc": 0.9} for c in ("violence", "sexual")]
    barrier.wait()
    for _ in range(3):
        _record_round(DeltaStorage(root=root), rows)


def test_two_runs_writing_labeling_queue_rounds_lose_nothing(tmp_path):
    _together(_queue_round, [(str(tmp_path), 1), (str(tmp_path), 2)])
    queue = DeltaStorage(root=str(tmp_path)).read("labeling_queue")
    assert dict(queue.group_by("round").len().sort("round").iter_rows()) == {1: 40, 2: 40}
    assert queue.select("round", "category", "rank").n_unique() == queue.height


def test_two_trainings_recording_active_learning_rounds_lose_nothing(tmp_path):
    _together(_record, [(str(tmp_path), 1), (str(tmp_path), 2)])
    rounds = DeltaStorage(root=str(tmp_path)).read("active_learning_rounds")
    assert sorted(rounds.select("round", "category").iter_rows()) == [
        (1, "sexual"), (1, "violence"), (2, "sexual"), (2, "violence")]


def _clip_checkpoint(barrier, root: str, config: str, key: str) -> None:
    from curation_assets import audits
    from curation_assets import clip_bias_audit
    from resources.settings import CurationSettings

    asset = clip_bias_audit.build_clip_bias_audit(["tiny-a", "tiny-b"])
    resources = {"storage": DeltaStorage(root=root), "settings": CurationSettings(config_path=config)}
    barrier.wait()
    assert dg.materialize([asset], partition_key=key, resources=resources).success


@pytest.mark.slow
def test_two_clip_bias_checkpoint_runs_at_once_keep_both(tmp_path):
    from curation_assets.core.clip_bias import write_tiny_model_config
    from tests.test_audits import _probe_set

    checkpoints = []
    for name, dim in (("tiny-a", 32), ("tiny-b", 48)):
        cfg = write_tiny_model_config(tmp_path / "models" / f"{name.replace('-', '_')}.json", embed_dim=dim)
        checkpoints.append({"name": name, "model": name.replace("-", "_"), "model_config": str(cfg), "random_init": True})
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"audits": {"clip_bias": {
        "probe_dir": str(_probe_set(tmp_path / "probes")), "races": ["Black", "White"],
        "genders": ["female", "male"], "device": "cpu", "checkpoints": checkpoints}}}))
    root = str(tmp_path / "root")
    _together(_clip_checkpoint, [(root, str(config), "tiny-a"), (root, str(config), "tiny-b")])
    table = DeltaStorage(root=root).read("clip_bias_audit")
    per = dict(table.group_by("checkpoint").len().iter_rows())
    assert set(per) == {"tiny-a", "tiny-b"} and per["tiny-a"] == per["tiny-b"] > 0
    # re-running one checkpoint replaces exactly its rows
    _together(_clip_checkpoint, [(root, str(config), "tiny-a")])
    again = DeltaStorage(root=root).read("clip_bias_audit")
    assert dict(again.group_by("checkpoint").len().iter_rows()) == per


def _ratios_for_shard(barrier, root: str, corpus: str, config: str, shard: str) -> None:
    from curation_assets.pipeline import open_pipeline

    pipeline = open_pipeline(root, corpus, config, instance=dg.DagsterInstance.ephemeral())
    pipeline.register_all_shards()
    barrier.wait()
    pipeline.materialize(["demographic_ratios"], shards=[shard])


@pytest.mark.slow
def test_two_shard_runs_of_demographic_ratios_at_once_lose_nothing(ingested, tmp_path):
    from curation_assets import bias

    state = ingested.copy(tmp_path / "root")
    shards = state.pipeline.shards()
    config = str(tmp_path / "root" / "demo_config.yaml")
    _together(_ratios_for_shard, [(str(state.root), str(state.corpus), config, s) for s in shards])
    table = state.storage.read(bias.RATIOS)
    assert set(table["shard"].unique()) == set(shards)  # each run wrote its own shard, and only it
    assert table.select("shard", "stage", "source", "kind", "group").n_unique() == table.height
    state.materialize(["overall_demographic_ratios"])
    overall = state.storage.read(bias.OVERALL_RATIOS)
    assert set(overall["n_shards"].unique()) == {len(shards)}
    raw = overall.filter((pl.col("stage") == "raw") & (pl.col("kind") == "share"))
    n_ok = state.storage.read("samples").filter(pl.col("status") == "ok").height
    assert set(raw["n"].to_list()) == {n_ok}


def _first_write(barrier, path: str, tag: str) -> None:
    from curation_assets.core.delta import replace_where

    barrier.wait()
    replace_where(path, pl.DataFrame({"round": [0, 0], "category": ["a", "b"], "tag": [tag, tag]}), "round", 0)


def test_two_first_writers_of_a_new_table_replace_not_duplicate(tmp_path):
    """Both runs create the table at once: the second must replace the first's rows of the key, not add to
    them (four trials; the race showed up in one of four before the creation lock)."""
    for trial in range(4):
        path = str(tmp_path / f"table_{trial}")
        _together(_first_write, [(path, "x"), (path, "y")])
        table = pl.read_delta(path)
        assert table.height == 2 and table["tag"].n_unique() == 1
