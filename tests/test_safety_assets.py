"""The safety assets through Dagster on constructed tables (no encoder): labels in, classifiers, queue,
thresholds and their blocking check, scores, the filtered set, and the `curate labels` commands."""

from __future__ import annotations

import csv
from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl
import pytest
import yaml
from click.testing import CliRunner

from curation_assets import safety
from curation_assets import safety_filter, safety_labels
from curation_assets.core.delta import embeddings_frame
from curation_assets.demo.safety import AnnotatorSettings, SimulatedAnnotator, seed_labels
from curation_assets.partitions import shard_partitions
from resources.compute import ComputeResource
from resources.settings import CurationSettings
from resources.storage import DeltaStorage

SHARDS = ["00000", "00001"]
PER_SHARD = 300
DIM = 24


def _corpus(storage: DeltaStorage, seed: int = 0) -> pl.DataFrame:
    """samples + image_embeddings for two shards; truth: category per uid (8% violence, 8% sexual)."""
    rng = np.random.default_rng(seed)
    centres = {"violence": np.eye(DIM)[0], "sexual": np.eye(DIM)[1]}
    truth = []
    for shard in SHARDS:
        keys = [f"{int(shard):05d}{i:04d}" for i in range(PER_SHARD)]
        uids = [f"{shard}/{k}" for k in keys]
        status = ["rejected" if i % 50 == 7 else "ok" for i in range(PER_SHARD)]
        cats = rng.choice(["violence", "sexual", None], size=PER_SHARD, p=[0.08, 0.08, 0.84])
        storage.write_shard("samples", pl.DataFrame({
            "uid": uids, "shard": [shard] * PER_SHARD, "key": keys, "caption": ["a caption"] * PER_SHARD,
            "status": status, "image_member": [f"{k}.jpg" for k in keys], "sha256": [f"sha-{u}" for u in uids],
        }), shard)
        X = rng.normal(size=(PER_SHARD, DIM)) * 0.2
        for i, c in enumerate(cats):
            if c is not None:
                X[i] += centres[c]
        X /= np.linalg.norm(X, axis=1, keepdims=True)
        ok = [i for i, s in enumerate(status) if s == "ok"]
        storage.write_shard("image_embeddings", embeddings_frame([uids[i] for i in ok], [shard] * len(ok), X[ok],
                                                                  "synthetic"), shard)
        truth += [{"uid": u, "category": c, "status": s} for u, c, s in zip(uids, cats, status)]
    return pl.DataFrame(truth, schema={"uid": pl.String, "category": pl.String, "status": pl.String})


def _config(tmp_path: Path, **safety_overrides) -> str:
    section = {"categories": [
        {"name": "violence", "definition": "graphic violence", "target_recall": 0.9},
        {"name": "sexual", "definition": "sexual content", "target_recall": 0.9},
    ], "active_learning": {"batch_size": 20}, **safety_overrides}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"safety": section}))
    return str(path)


UPSTREAM = [dg.AssetSpec("samples", partitions_def=shard_partitions),
            dg.AssetSpec("image_embeddings", partitions_def=shard_partitions)]
GLOBAL = [safety_labels.labels_asset, safety.safety_classifiers, safety.labeling_queue, safety_filter.safety_thresholds]
PER_SHARD_ASSETS = [safety_filter.safety_scores, safety_filter.filtered_samples]


class Env:
    def __init__(self, tmp_path: Path, config: str):
        self.storage = DeltaStorage(root=str(tmp_path / "root"))
        self.settings = CurationSettings(config_path=config)
        self.truth = _corpus(self.storage)
        self.instance = dg.DagsterInstance.ephemeral()
        self.instance.add_dynamic_partitions("shards", SHARDS)

    @property
    def cfg(self):
        return safety_labels.safety_config(self.settings)

    def run(self, assets, partition_key=None, checks=(), raise_on_error=True):
        return dg.materialize([*UPSTREAM, *GLOBAL, *PER_SHARD_ASSETS, *checks], instance=self.instance,
                              resources={"storage": self.storage, "settings": self.settings,
                                         "compute": ComputeResource()},
                              selection=assets, partition_key=partition_key, raise_on_error=raise_on_error)

    def seed(self, n_pos: int, n_neg: int):
        annotator = SimulatedAnnotator(self.truth)
        ok = self.truth.filter(pl.col("status") == "ok")["uid"].to_list()
        cfg = self.cfg
        rows = seed_labels(annotator, ok, cfg, AnnotatorSettings(seed_positives=n_pos, seed_negatives=n_neg,
                                                                 seed_pool=10_000))
        report = safety_labels.import_label_rows(self.storage, cfg, rows)
        assert report.ok, report.summary()
        return annotator


@pytest.fixture
def env(tmp_path) -> Env:
    return Env(tmp_path, _config(tmp_path))


def test_classifiers_queue_thresholds_scores_and_filter(env):
    annotator = env.seed(20, 120)
    env.run(["safety_classifiers", "labeling_queue"])
    rounds = env.storage.read("active_learning_rounds")
    assert rounds["round"].to_list() == [0, 0] and set(rounds["n_positive"]) == {20}
    assert (rounds["cv_auc"] > 0.9).all()
    version_dir = Path(env.storage.artifact_dir("safety_classifiers")) / "v0001"
    assert {p.name for p in version_dir.iterdir()} >= {"violence.npz", "sexual.npz", "manifest.json",
                                                       "cv_scores.parquet"}

    queue = safety.latest_queue(env.storage)
    labels = env.storage.read("labels")
    assert queue["round"].unique().to_list() == [1]
    for category in ("violence", "sexual"):
        part = queue.filter(pl.col("category") == category)
        assert part.height == 20 and part["uid"].n_unique() == 20
        assert not set(part["uid"]) & set(labels.filter(pl.col("category") == category)["uid"])
        assert set(part["procedure"]) <= {"flagged", "missed_neighbors", "uncertain"}
        flagged = part.filter(pl.col("procedure") == "flagged")
        assert (flagged["score"] >= flagged["threshold"]).all()

    # label the queue, retrain: the round is recorded with the labels it added
    answers = [{"uid": r["uid"], "category": r["category"], "label": annotator.label(r["uid"], r["category"]),
                "source": f"queue:{r['procedure']}", "round": r["round"]} for r in queue.iter_rows(named=True)]
    assert safety_labels.import_label_rows(env.storage, env.cfg, answers).ok
    checks = [safety_filter.safety_target_recall_reachable, safety_filter.safety_recall_lower_bound]
    result = env.run(["safety_classifiers", "safety_thresholds", "safety_thresholds"], checks=checks)
    rounds = env.storage.read("active_learning_rounds").filter(pl.col("round") == 1)
    assert rounds.height == 2 and set(rounds["labels_added"]) == {20}
    evaluations = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert evaluations["safety_target_recall_reachable"].passed

    thresholds = env.storage.read("safety_thresholds")
    assert (thresholds["recall"] >= 0.9).all() and thresholds["reachable"].all()
    assert (thresholds["classifier_version"] == "v0002").all()

    for shard in SHARDS:
        env.run(["safety_scores", "filtered_samples"], partition_key=shard)
    scores = env.storage.read("safety_scores")
    embedded = env.storage.read("image_embeddings", columns=["uid"]).height
    assert scores.height == 2 * embedded
    filtered = env.storage.read("filtered_samples")
    samples = env.storage.read("samples", columns=["uid", "status"])
    assert filtered.height == samples.height and filtered["uid"].n_unique() == samples.height
    assert set(filtered["uid"]) == set(samples["uid"])
    joined = filtered.join(env.truth, on="uid")
    rejected = joined.filter(pl.col("status") == "rejected")
    assert rejected.height > 0 and not rejected["kept"].any()
    assert all(r == ["rejected"] for r in rejected["reasons"].to_list())
    kept_reasons = joined.filter(pl.col("kept"))["reasons"].list.len()
    assert (kept_reasons == 0).all()
    # every labelled positive is removed, whatever its score
    current = env.storage.read("labels").filter(pl.col("label") == 1)
    removed = joined.filter(~pl.col("kept"))
    assert set(current["uid"]) <= set(removed["uid"])
    # the planted positives are found: recall vs truth at least the target on this easy data
    for category in ("violence", "sexual"):
        pos = joined.filter((pl.col("category") == category) & (pl.col("status") == "ok"))
        assert pos["reasons"].list.contains(category).mean() >= 0.9


def test_blocking_check_fails_when_positives_are_too_few(tmp_path):
    env = Env(tmp_path, _config(tmp_path, categories=[
        {"name": "violence", "definition": "graphic violence", "target_recall": 0.99},
        {"name": "sexual", "definition": "sexual content", "target_recall": 0.9},
    ]))
    env.seed(15, 100)
    env.run(["safety_classifiers"])
    result = env.run(["safety_thresholds"], checks=[safety_filter.safety_target_recall_reachable], raise_on_error=False)
    evaluation = {e.check_name: e for e in result.get_asset_check_evaluations()}["safety_target_recall_reachable"]
    assert not evaluation.passed
    assert "violence" in evaluation.description and "85 more positives" in evaluation.description
    assert "sexual" not in evaluation.description
    table = env.storage.read("safety_thresholds")
    assert dict(zip(table["category"], table["positives_needed"])) == {"violence": 85, "sexual": 0}


def test_labels_cli_validates_and_round_trips_the_queue(env, tmp_path):
    from curation_assets.cli import labels as labels_cli

    runner = CliRunner()
    root, config = env.storage.root, env.settings.config_path
    ok = env.truth.filter(pl.col("status") == "ok")
    bad_csv = tmp_path / "bad.csv"
    with open(bad_csv, "w", newline="") as handle:
        w = csv.writer(handle)
        w.writerow(["uid", "category", "label"])
        w.writerow([ok["uid"][0], "violence", "1"])
        w.writerow(["99999/000000000", "violence", "0"])
        w.writerow([ok["uid"][1], "hate", "1"])
    result = runner.invoke(labels_cli, ["import", str(bad_csv), "--root", root, "--config", config])
    assert result.exit_code == 1
    assert "line 3" in result.output and "unknown uid" in result.output
    assert "line 4" in result.output and "unknown category 'hate'" in result.output
    assert not env.storage.exists("labels")
    result = runner.invoke(labels_cli, ["import", str(bad_csv), "--root", root, "--config", config, "--skip-invalid"])
    assert result.exit_code == 0 and env.storage.read("labels").height == 1

    annotator = env.seed(20, 120)
    env.run(["safety_classifiers", "labeling_queue"])
    out = tmp_path / "queue.csv"
    result = runner.invoke(labels_cli, ["export-queue", "--root", root, "--config", config, "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(open(out)))
    assert len(rows) == 40 and all(r["why"] and r["image"].endswith(".jpg") and r["label"] == "" for r in rows)
    for r in rows[:30]:
        r["label"] = "yes" if annotator.label(r["uid"], r["category"]) else "no"
    with open(out, "w", newline="") as handle:
        w = csv.DictWriter(handle, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    before = env.storage.read("labels").height
    result = runner.invoke(labels_cli, ["import", str(out), "--root", root, "--config", config])
    assert result.exit_code == 0, result.output
    assert "10 queue rows without a label" in result.output
    new = env.storage.read("labels").filter(pl.col("round") == 1)
    assert env.storage.read("labels").height == before + 30 == before + new.height
    assert set(new["source"]) <= {"queue:flagged", "queue:missed_neighbors", "queue:uncertain"}
