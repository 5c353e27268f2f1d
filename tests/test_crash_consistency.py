"""Artefacts stay consistent through a kill -9, two trainings never share a version, and a moved root reads
its own files."""

import multiprocessing
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import polars as pl
import pytest

REPO = Path(__file__).resolve().parents[1]

KILL_ON_THIRD_FIT = textwrap.dedent("""
    import os, signal, sys
    import dagster as dg
    from curation_assets.core import dedup as core
    from curation_assets.pipeline import open_pipeline

    real, calls = core.fit_centroids, []
    def fit_then_die(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGKILL)  # a crash between two fits
        return real(*args, **kwargs)
    core.fit_centroids = fit_then_die
    root, corpus, config = sys.argv[1:4]
    pipeline = open_pipeline(root, corpus, config, instance=dg.DagsterInstance.ephemeral())
    pipeline.register_all_shards()
    pipeline.materialize(["kmeans_centroids"])
""")


@pytest.mark.slow
def test_kill_between_centroid_fits_leaves_a_consistent_table(ingested, tmp_path):
    from curation_assets.dedup_clusters import _load_centroids

    state = ingested.copy(tmp_path / "root")
    state.materialize(["kmeans_centroids"])
    before = state.storage.read("kmeans_centroids").sort("clustering")
    assert all(not Path(p).is_absolute() for p in before["path"])
    # refit with other settings, killed after two of the five fits
    config = Path(state.pipeline.config_path)
    config.write_text(config.read_text() + "dedup:\n  kmeans:\n    seed: 99\n")
    died = subprocess.run([sys.executable, "-c", KILL_ON_THIRD_FIT, str(state.root), str(state.corpus), str(config)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert died.returncode == -9, died.stderr[-2000:]
    after = state.storage.read("kmeans_centroids").sort("clustering")
    assert after.equals(before)  # the table is written last: the killed run changed nothing it points at
    for row in after.iter_rows(named=True):
        loaded = _load_centroids(state.storage, row)
        assert (loaded.k, loaded.dim) == (row["k"], row["dim"])
    state.materialize(["cluster_assignments", "duplicate_pairs"])  # consistent versions: no stale-assignment error
    # the next run refits all five and publishes them together
    state.materialize(["kmeans_centroids"])
    refit = state.storage.read("kmeans_centroids").sort("clustering")
    assert set(refit["version"]).isdisjoint(set(before["version"])) and refit["seed"].to_list() != before["seed"].to_list()


@pytest.mark.slow
def test_a_copied_root_reads_its_own_centroids(ingested, tmp_path):
    state = ingested.copy(tmp_path / "root")
    state.materialize(["kmeans_centroids"])
    moved = state.copy(tmp_path / "moved")
    shutil.rmtree(state.root / "artifacts" / "kmeans_centroids")  # the original root's files are gone
    moved.materialize(["cluster_assignments"])
    assert moved.storage.read("cluster_assignments").height > 0


def _train(barrier, root: str, corpus: str, config: str, out: str) -> None:
    import dagster as dg

    from curation_assets.pipeline import open_pipeline

    pipeline = open_pipeline(root, corpus, config, instance=dg.DagsterInstance.ephemeral())
    pipeline.register_all_shards()
    barrier.wait()
    result = pipeline.materialize(["safety_classifiers"])[0]
    event = result.get_asset_materialization_events()[0]
    Path(out).write_text(str(event.materialization.metadata["version"].value))


@pytest.mark.slow
def test_two_trainings_at_once_get_two_versions(ingested, tmp_path):
    from curation_assets import safety
    from curation_assets.safety_labels import import_label_rows, safety_config

    state = ingested.copy(tmp_path / "root")
    truth = pl.read_parquet(state.corpus / "ground_truth.parquet", columns=["uid", "category"])
    ok = set(state.storage.read("samples").filter(pl.col("status") == "ok")["uid"])
    rows = [{"uid": u, "category": c, "label": int(t == c)} for u, t in truth.iter_rows()
            for c in ("violence", "sexual") if u in ok]
    assert import_label_rows(state.storage, safety_config(state.settings), rows).ok
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    outs = [tmp_path / f"version_{i}.txt" for i in range(2)]
    config = state.pipeline.config_path
    procs = [ctx.Process(target=_train, args=(barrier, str(state.root), str(state.corpus), config, str(o)))
             for o in outs]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0, 0]
    versions = sorted(o.read_text() for o in outs)
    assert versions[0] != versions[1]
    root = safety.classifier_root(state.storage)
    for version in versions:
        probes, manifest, _ = safety.load_classifiers(state.storage, version)
        assert manifest["version"] == version and len(probes) == 2
    assert (root / "LATEST").read_text() in versions
    rounds = state.storage.read("active_learning_rounds")
    assert set(rounds["classifier_version"]) <= set(versions) and rounds.height == 2


def test_concurrent_label_imports_take_distinct_rounds(ingested, tmp_path):
    state = ingested.copy(tmp_path / "root")
    ok = state.storage.read("samples").filter(pl.col("status") == "ok")["uid"].sort().to_list()
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_import, args=(barrier, str(state.root), state.pipeline.config_path, ok[i::2][:20]))
             for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    labels = state.storage.read("labels")
    assert labels.height == 80 and sorted(labels["round"].unique().to_list()) == [0, 1]
    assert labels.group_by("round").agg(pl.col("uid").n_unique())["uid"].to_list() == [20, 20]


def _import(barrier, root: str, config: str, uids: list[str]) -> None:
    from curation_assets.safety_labels import import_label_rows, safety_config
    from resources.settings import CurationSettings
    from resources.storage import DeltaStorage

    cfg = safety_config(CurationSettings(config_path=config))
    rows = [{"uid": u, "category": c, "label": 0} for u in uids for c in ("violence", "sexual")]
    barrier.wait()
    assert import_label_rows(DeltaStorage(root=root), cfg, rows).ok


def test_centroid_file_that_disagrees_with_its_row_is_refused(tmp_path):
    import dagster as dg

    from curation_assets.core.dedup import TwoLevelCentroids
    from curation_assets.dedup_clusters import _load_centroids, _save_centroids
    from resources.storage import DeltaStorage

    storage = DeltaStorage(root=str(tmp_path))
    c = TwoLevelCentroids.single(np.eye(4, dtype=np.float32))
    path = _save_centroids(storage, "1", c, c.version())
    row = {"clustering": "1", "path": path, "k": 4, "dim": 4, "version": c.version()}
    assert np.array_equal(_load_centroids(storage, row).fine, c.fine)
    with open(tmp_path / path, "wb") as handle:
        TwoLevelCentroids.single(c.fine[:3]).save(handle)
    with pytest.raises(dg.Failure, match="does not hold the centroids"):
        _load_centroids(storage, row)
    old = dict(row, path=path.replace(".npz", ".npy"))
    np.save(tmp_path / old["path"], c.fine)
    with pytest.raises(dg.Failure, match="one-level centroids of an older release"):
        _load_centroids(storage, old)
