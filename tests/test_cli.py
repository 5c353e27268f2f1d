"""The ``curate`` command line, end to end on a tiny corpus."""


import polars as pl
import pytest
from click.testing import CliRunner

from curation_assets.cli import main


@pytest.mark.slow
def test_demo_data_then_run_without_labels_is_a_clear_partial_run(tmp_path):
    runner = CliRunner()
    corpus = tmp_path / "corpus"
    made = runner.invoke(main, ["demo-data", "--out", str(corpus), "--shards", "2", "--per-shard", "60",
                                "--size", "96", "--seed", "5"])
    assert made.exit_code == 0, made.output
    assert sorted(p.name for p in corpus.glob("*.tar")) == ["00000.tar", "00001.tar"]

    root = tmp_path / "root"
    result = runner.invoke(main, ["run", "--shards-dir", str(corpus), "--root", str(root)])
    assert result.exit_code == 1, result.output
    assert "safety_classifiers" in result.output and "label" in result.output.lower()
    samples = pl.read_delta(str(root / "delta" / "samples"))
    assert samples.height == 120 and sorted(samples["shard"].unique()) == ["00000", "00001"]
    embedded = pl.read_delta(str(root / "delta" / "image_embeddings")).height
    assert embedded == samples.filter(pl.col("status") == "ok").height
    for table in ("duplicate_pairs", "dedup_recall", "kmeans_centroids"):
        assert (root / "delta" / table).is_dir(), f"{table} needs no labels and still ran"
    for table in ("safety_scores", "filtered_samples", "dedup_groups", "curation_report"):
        assert not (root / "delta" / table).exists(), f"{table} is downstream of the failed stage"
    assert "not run because an upstream asset failed" in result.output

    report = runner.invoke(main, ["report", "--root", str(root)])
    assert report.exit_code == 1 and "no report yet" in report.output


def test_run_needs_existing_directories(tmp_path):
    result = CliRunner().invoke(main, ["run", "--shards-dir", str(tmp_path / "nope"), "--root", str(tmp_path)])
    assert result.exit_code == 2 and "does not exist" in result.output
