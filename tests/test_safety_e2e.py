"""Active learning and the filter end to end on the small demo corpus (real images, the perceptual encoder)."""

from __future__ import annotations

import shutil
from pathlib import Path

import dagster as dg
import polars as pl
import pytest
import yaml

from curation_assets import safety
from curation_assets.demo import safety as demo_safety
from curation_assets.demo.safety import AnnotatorSettings

# The bias tests' corpus (4 x 500 images plus a drifted shard, shared on disk per session) holds ~90-110
# positives per category: enough for a precision at 0.9 recall that moves in steps of about 1%, where the
# 2 x 200 fixture corpus (~19 positives) moves in steps of 5% and cannot show a trend. The recall target
# is scaled to what the labels can resolve (0.9 needs 10 positives); the seed starts from a few positives.
SMALL_SAFETY = {
    "categories": [
        {"name": "violence", "definition": "graphic violence (demo stand-in motif)", "target_recall": 0.9},
        {"name": "sexual", "definition": "sexual content (demo stand-in motif)", "target_recall": 0.9},
    ],
    "active_learning": {"batch_size": 40},
}
SMALL_SEED = AnnotatorSettings(seed_positives=8, seed_negatives=150, seed_pool=1500)


@pytest.fixture
def corpus(tmp_path_factory) -> Path:
    from tests.test_bias import drift_base

    return drift_base(tmp_path_factory)[0]


@pytest.fixture
def pipeline(corpus, tmp_path_factory, tmp_path):
    from curation_assets.pipeline import open_pipeline
    from tests.test_bias import drift_base

    root = tmp_path / "root"
    shutil.copytree(drift_base(tmp_path_factory)[1], root, ignore=shutil.ignore_patterns("dagster_home"))
    config = yaml.safe_load((root / "demo_config.yaml").read_text()) if (root / "demo_config.yaml").is_file() else {}
    config = config or {}
    config["safety"] = SMALL_SAFETY
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    pipe = open_pipeline(root, corpus, str(path), instance=dg.DagsterInstance.ephemeral())
    pipe.register_all_shards()
    return pipe


def test_active_learning_improves_precision_and_the_filter_accounts_for_every_sample(pipeline, corpus, tmp_path):
    storage = pipeline.storage
    lines = demo_safety.active_learning(lambda names: pipeline.materialize(names), storage, pipeline.settings,
                                        corpus, rounds=3, annotator_config=SMALL_SEED)
    print("\n".join(lines))
    assert any("corpus P@t" in line for line in lines)

    rounds = demo_safety.rounds_table(storage)
    truth = pl.read_parquet(corpus / "ground_truth.parquet", columns=["uid", "category"])
    measured = demo_safety.corpus_metrics(storage, truth, rounds["classifier_version"].unique().to_list(),
                                     {"violence": 0.9, "sexual": 0.9})
    table = rounds.join(measured, on=["classifier_version", "category"])
    for category in ("violence", "sexual"):
        part = table.filter(pl.col("category") == category).sort("round")
        assert part["round"].to_list() == [0, 1, 2, 3]
        assert part["n_labels"].is_sorted() and part["n_labels"][-1] > part["n_labels"][0]
        # the seed model vs the model after three rounds, on every image of the corpus (ground truth)
        assert part["corpus_precision_at_target"][-1] > part["corpus_precision_at_target"][0], part

    # the last queue goes out as CSV with thumbnails read back from the tar shards
    from click.testing import CliRunner

    from curation_assets.cli import labels as labels_cli

    out = tmp_path / "queue.csv"
    result = CliRunner().invoke(labels_cli, ["export-queue", "--root", str(storage.root_path), "--out", str(out),
                                             "--shards-dir", str(corpus), "--thumbnails", "--size", "64"])
    assert result.exit_code == 0, result.output
    exported = pl.read_csv(out)
    assert exported.height == safety.latest_queue(storage).height > 0
    assert all(Path(p).is_file() for p in exported["image"].to_list())

    pipeline.materialize(["safety_scores", "filtered_samples"])
    filtered = storage.read("filtered_samples")
    samples = storage.read("samples", columns=["uid", "status"])
    assert filtered.height == samples.height
    assert filtered["uid"].n_unique() == filtered.height
    assert set(filtered["uid"]) == set(samples["uid"])
    both = filtered.join(samples, on="uid")
    rejected = both.filter(pl.col("status") != "ok")
    assert all(r == ["rejected"] for r in rejected["reasons"].to_list())
    assert (both.filter(pl.col("kept"))["reasons"].list.len() == 0).all()

    summary = demo_safety.summary(storage, corpus)
    assert any(line.strip().startswith("violence") for line in summary)
    assert any("clean images removed" in line for line in summary)
