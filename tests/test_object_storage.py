"""Shards, tables and artefacts on object storage: a real S3-compatible server (moto's server mode) on
127.0.0.1, the pipeline run with an s3:// data root and s3:// shards, the tables read back with polars, a
re-run of one shard replacing exactly it, and two shards written concurrently both landing."""

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import polars as pl
import pytest
from click.testing import CliRunner

from tests.conftest import demo_shards
from tests.services import s3_server


def _upload(local: Path, uri: str) -> None:
    import boto3

    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    client = boto3.client("s3")
    for path in sorted(local.iterdir()):
        if path.suffix in (".tar", ".parquet"):
            client.upload_file(str(path), bucket, f"{prefix}/{path.name}")


def _write_one_shard(args) -> int:
    root, shard = args
    from resources.storage import DeltaStorage

    frame = pl.DataFrame({"uid": [f"{shard}/{i}" for i in range(50)], "shard": [shard] * 50, "value": list(range(50))})
    return DeltaStorage(root=root).write_shard("concurrent", frame, shard)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_pipeline_runs_on_s3_shards_and_an_s3_root(tmp_path, monkeypatch):
    import tarfile

    from curation_assets.cli import main
    from resources.storage import DeltaStorage

    local = tmp_path / "shards"
    demo_shards(local, 2, 40, size=96, seed=5)
    with s3_server(monkeypatch) as bucket:
        shards, root = f"{bucket}/incoming", f"{bucket}/curation"
        _upload(local, shards)
        monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
        ran = CliRunner().invoke(main, ["run", "--shards-dir", shards, "--root", root])
        assert ran.exit_code == 0, ran.output

        # every table is in the bucket and reads back with polars; every sample once in the training set
        samples = pl.read_delta(f"{root}/delta/samples")
        assert samples.height == 80 and samples["uid"].n_unique() == 80
        assert sorted(samples["shard"].unique()) == ["00000", "00001"]
        verdicts = pl.read_delta(f"{root}/delta/training_set")
        assert sorted(verdicts["uid"]) == sorted(samples["uid"])
        assert pl.read_delta(f"{root}/delta/image_embeddings").height == samples.filter(pl.col("status") == "ok").height
        storage = DeltaStorage(root=root)
        assert {"samples", "image_embeddings", "duplicate_pairs", "dedup_groups", "training_set"} <= set(storage.tables())
        # artefacts and reports went to the same store
        assert list((storage.root_path / "artifacts" / "kmeans_centroids").glob("*.npz"))
        assert (storage.root_path / "reports" / "curation_report.html").is_file()

        # a re-run of one shard replaces exactly it: 00001 loses half its members, 00000 is untouched
        before = samples.filter(pl.col("shard") == "00000").sort("uid")
        with tarfile.open(local / "00001.tar") as src, tarfile.open(tmp_path / "00001.tar", "w") as dst:
            members = src.getmembers()
            keys = sorted({m.name.split(".")[0] for m in members})[:20]
            for m in members:
                if m.name.split(".")[0] in keys:
                    dst.addfile(m, src.extractfile(m))
        import boto3

        boto3.client("s3").upload_file(str(tmp_path / "00001.tar"), "curation", "incoming/00001.tar")
        again = CliRunner().invoke(main, ["run", "--shards-dir", shards, "--root", root, "--asset", "samples"])
        assert again.exit_code == 0, again.output
        after = pl.read_delta(f"{root}/delta/samples")
        assert after.filter(pl.col("shard") == "00001").height == 20
        assert after.filter(pl.col("shard") == "00000").sort("uid").equals(before)

        # two writers of two shards of one table at once: both commits land (delta-rs conditional puts)
        # graceful shutdown: Pool.__exit__ terminates its workers, and one that ignores SIGTERM hangs the join
        with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
            written = list(pool.map(_write_one_shard, [(root, "a"), (root, "b")]))
        assert written == [50, 50]
        both = pl.read_delta(f"{root}/delta/concurrent")
        assert both.group_by("shard").len().sort("shard").rows() == [("a", 50), ("b", 50)]


def test_artefact_versions_are_claimed_once_and_published_whole_on_s3(monkeypatch):
    import numpy as np

    from curation_assets.core.location import as_path, create_exclusive
    from curation_assets.core.safety import LinearProbe, latest_version, load_bank, next_version, publish_latest, save_bank

    with s3_server(monkeypatch) as bucket:
        marker = as_path(f"{bucket}/x/.claimed")
        assert create_exclusive(marker) and not create_exclusive(marker)  # If-None-Match: the second loses
        root = as_path(f"{bucket}/artifacts/safety_classifiers")
        first, directory = next_version(root)
        second, _ = next_version(root)
        assert (first, second) == (1, 2)
        probe = LinearProbe("violence", np.arange(4.0), 0.5, 1.0, 0.0, np.zeros(4), np.ones(4))
        save_bank(directory, [probe], {"note": "s3"})
        assert latest_version(root).name == "v0001"  # v0002 has no manifest: not a version yet
        publish_latest(root, "v0001")
        probes, manifest = load_bank(latest_version(root))
        assert manifest["note"] == "s3" and np.array_equal(probes[0].weight, probe.weight)
