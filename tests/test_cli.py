"""The ``curate`` command line, end to end on a tiny corpus."""


import re

import polars as pl
import pytest
from click.testing import CliRunner

from curation_assets.cli import main


@pytest.mark.slow
def test_demo_data_then_run_without_labels_curates_and_says_what_is_next(tmp_path):
    runner = CliRunner()
    corpus = tmp_path / "corpus"
    made = runner.invoke(main, ["demo-data", "--out", str(corpus), "--shards", "2", "--per-shard", "60",
                                "--size", "96", "--seed", "5"])
    assert made.exit_code == 0, made.output
    assert sorted(p.name for p in corpus.glob("*.tar")) == ["00000.tar", "00001.tar"]

    root = tmp_path / "root"
    result = runner.invoke(main, ["run", "--shards-dir", str(corpus), "--root", str(root)])
    assert result.exit_code == 0, result.output
    assert "safety: awaiting labels" in result.output and "curate labels import" in result.output
    samples = pl.read_delta(str(root / "delta" / "samples"))
    assert samples.height == 120 and sorted(samples["shard"].unique()) == ["00000", "00001"]
    embedded = pl.read_delta(str(root / "delta" / "image_embeddings")).height
    assert embedded == samples.filter(pl.col("status") == "ok").height
    for table in ("duplicate_pairs", "dedup_recall", "kmeans_centroids", "dedup_groups", "training_set"):
        assert (root / "delta" / table).is_dir(), f"{table} needs no labels and still ran"
    for table in ("safety_scores", "filtered_samples", "sample_weights"):
        assert not (root / "delta" / table).exists(), f"{table} needs labels"
    final = pl.read_delta(str(root / "delta" / "training_set"))
    kept = final.filter(pl.col("verdict") == "kept").height
    assert re.search(r"^\s+kept\s+(\d+)$", result.output, re.M).group(1) == str(kept)

    report = runner.invoke(main, ["report", "--root", str(root)])
    assert report.exit_code == 0 and report.output.strip().endswith("curation_report.html")


def test_run_needs_existing_directories(tmp_path):
    result = CliRunner().invoke(main, ["run", "--shards-dir", str(tmp_path / "nope"), "--root", str(tmp_path)])
    assert result.exit_code == 2 and "does not exist" in result.output
