"""Housekeeping: killed runs do not stay STARTED, and Delta tables can be compacted and vacuumed."""

import subprocess
import sys
import textwrap
from pathlib import Path

import dagster as dg
import polars as pl
from click.testing import CliRunner

from curation_assets.cli import main
from resources.storage import DeltaStorage

REPO = Path(__file__).resolve().parents[1]

KILLED_RUN = textwrap.dedent("""
    import os, signal, sys
    from curation_assets.core import dedup as core
    from curation_assets.pipeline import open_pipeline

    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)  # killed in the middle of a step
    core.fit_centroids = die
    pipeline = open_pipeline(sys.argv[1], sys.argv[2], sys.argv[3])
    pipeline.register_all_shards()
    pipeline.materialize(["kmeans_centroids"])
""")


def test_a_killed_curate_run_is_marked_failed_by_the_next(ingested, tmp_path):
    from curation_assets.pipeline import dagster_home

    state = ingested.copy(tmp_path / "root")
    config = state.pipeline.config_path
    died = subprocess.run([sys.executable, "-c", KILLED_RUN, str(state.root), str(state.corpus), config],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert died.returncode == -9, died.stderr[-2000:]
    instance = dg.DagsterInstance.from_config(str(dagster_home(state.root)))
    stuck = instance.get_runs(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED]))
    assert len(stuck) == 1
    result = CliRunner().invoke(main, ["run", "--shards-dir", str(state.corpus), "--root", str(state.root),
                                       "--config", config, "--asset", "samples"])
    assert result.exit_code == 0, result.output
    assert f"run {stuck[0].run_id} was left STARTED" in result.output
    instance = dg.DagsterInstance.from_config(str(dagster_home(state.root)))
    assert instance.get_run_by_id(stuck[0].run_id).status == dg.DagsterRunStatus.FAILURE
    assert not instance.get_runs(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED]))


def test_maintain_compacts_and_vacuums_but_keeps_recent_versions(tmp_path):
    from deltalake import DeltaTable

    storage = DeltaStorage(root=str(tmp_path))
    for rerun in range(6):  # re-running shards: every run replaces each shard's file
        for shard in ("a", "b", "c"):
            rows = pl.DataFrame({"uid": [f"{shard}/{i}" for i in range(200)], "shard": [shard] * 200,
                                 "value": [float(rerun)] * 200})
            storage.write_shard("samples", rows, shard)
    path = storage.table_path("samples")
    content = storage.read("samples").sort("uid")
    version = DeltaTable(str(path)).version()

    kept = CliRunner().invoke(main, ["maintain", "--root", str(tmp_path)])  # default: a week of history
    assert kept.exit_code == 0, kept.output
    assert DeltaTable(str(path), version=version - 3).to_pyarrow_table().num_rows == 600  # time travel still works
    report = DeltaStorage(root=str(tmp_path)).maintain(retention_hours=0)["samples"]
    assert report["files_before"] >= 18 and report["files_after"] <= 3
    assert report["bytes_after"] < report["bytes_before"] / 3
    assert storage.read("samples").sort("uid").equals(content)


def test_maintenance_leaves_the_dedup_bucket_files_as_they_are(tmp_path):
    """Each cluster_assignments file holds one shard's rows of one bucket: the unit of incremental dedup."""
    import polars as pl

    from resources.storage import DeltaStorage

    storage = DeltaStorage(root=str(tmp_path))
    for rerun in range(3):
        for shard in ("a", "b"):
            rows = pl.DataFrame({"uid": [f"{shard}/{i}" for i in range(10)], "shard": [shard] * 10,
                                 "clustering": ["1"] * 10, "bucket": [0] * 5 + [1] * 5, "value": [rerun] * 10})
            storage.write_shard("cluster_assignments", rows, shard, partition_by=["clustering", "bucket"])
    before = storage.partition_files("cluster_assignments", stats=["shard"])
    report = storage.maintain(retention_hours=0)["cluster_assignments"]
    after = storage.partition_files("cluster_assignments", stats=["shard"])
    assert report["files_compacted"] == 0 and report["files_vacuumed"] > 0
    assert sorted(after["path"].to_list()) == sorted(before["path"].to_list())
    assert (after["min.shard"] == after["max.shard"]).all() and after.height == 4
