"""Ray as the engine: with CURATION_RAY_ADDRESS set, per-shard ingest, embedding (model actors), cluster
assignment and census parts, the dedup buckets and pixel verification run as tasks on a real local Ray
cluster, and every table equals the in-process run's."""

import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner

from tests.conftest import demo_shards
from tests.services import ray_cluster

STAGES = ("samples", "image_embeddings", "image_attributes", "cluster_assignments", "duplicate_pairs", "verify_pairs",
          "dataset_census")
COMPARED = {
    "samples": ["uid"],
    "image_embeddings": ["uid"],
    "cluster_assignments": ["clustering", "uid"],
    "duplicate_pairs": ["uid_a", "uid_b"],
    "dedup_groups": ["uid"],
    "training_set": ["uid"],
    "demographic_ratios": ["shard", "stage", "kind", "group"],
    "dataset_census": ["shard"],
    "image_attributes": ["uid"],
    "face_attributes": ["uid", "face"],
}


def _run(shards, root, monkeypatch, address=None):
    from curation_assets.cli import main

    if address:
        monkeypatch.setenv("CURATION_RAY_ADDRESS", address)
    else:
        monkeypatch.delenv("CURATION_RAY_ADDRESS", raising=False)
    ran = CliRunner().invoke(main, ["run", "--shards-dir", str(shards), "--root", str(root)])
    assert ran.exit_code == 0, ran.output


def _frame(root, table, keys):
    from resources.storage import DeltaStorage

    df = DeltaStorage(root=str(root)).read(table)
    keys = [k for k in keys if k in df.columns]
    return df.sort(keys)


def _assert_equal(a: pl.DataFrame, b: pl.DataFrame, table: str) -> None:
    assert a.columns == b.columns and a.height == b.height, table
    for column in a.columns:
        x, y = a[column], b[column]
        if x.dtype == pl.List(pl.Float32):
            np.testing.assert_allclose(np.stack(x.to_numpy()), np.stack(y.to_numpy()), atol=1e-6, err_msg=table)
        elif x.dtype.is_float():
            np.testing.assert_allclose(x.to_numpy(), y.to_numpy(), atol=1e-5, equal_nan=True, err_msg=f"{table}.{column}")
        elif not isinstance(x.dtype, pl.Datetime) and column != "run_id":  # when and by which run differ
            assert x.to_list() == y.to_list(), f"{table}.{column}"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_ray_path_writes_the_same_tables_and_runs_its_work_on_the_cluster(tmp_path, monkeypatch):
    import ray
    from ray.util.state import list_tasks

    shards = tmp_path / "shards"
    demo_shards(shards, 3, 60, size=96, seed=5)
    _run(shards, tmp_path / "local", monkeypatch)
    with ray_cluster(num_cpus=2) as (address, dashboard):
        try:
            _run(shards, tmp_path / "on_ray", monkeypatch, address)
            assert ray.is_initialized()
            done = {}
            for stage in STAGES:
                for task in list_tasks(address=dashboard, filters=[("name", "=", f"curation:{stage}")], limit=1000):
                    if task.state == "FINISHED":
                        done[task.name] = done.get(task.name, 0) + 1
        finally:
            ray.shutdown()
    # every shard's ingest, embedding, assignment and census part, every bucket search and the verification
    # ran as cluster tasks
    for stage in ("samples", "image_embeddings", "image_attributes", "cluster_assignments", "dataset_census"):
        assert done.get(f"curation:{stage}") == 3, (stage, done)
    assert done.get("curation:duplicate_pairs", 0) >= 5 and done.get("curation:verify_pairs", 0) >= 1, done
    for table, keys in COMPARED.items():
        _assert_equal(_frame(tmp_path / "local", table, keys), _frame(tmp_path / "on_ray", table, keys), table)


class _Counting:
    loads = 0

    def __init__(self, offset: int):
        type(self).loads += 1
        self.offset = offset

    def add(self, item: int) -> int:
        return item + self.offset


def test_without_an_address_work_runs_in_process_and_the_model_loads_once(monkeypatch):
    from resources.compute import ComputeResource, compute_from_env

    compute = ComputeResource()
    assert not compute.on_ray and list(compute.map(pow, [1, 2, 3], "test", 2)) == [1, 4, 9]
    pool = compute.pool(_Counting, (10,), "test", 3)
    assert list(pool.map("add", [1, 2, 3])) == [11, 12, 13] and _Counting.loads == 1
    # model actors ask for a GPU only when the model can use one and the cluster has one, unless told
    assert compute.actor_gpus(True, 8) == 1.0 and compute.actor_gpus(True, 0) == 0.0 and compute.actor_gpus(False, 8) == 0.0
    assert ComputeResource(gpus_per_actor=0.5).actor_gpus(False, 0) == 0.5
    monkeypatch.setenv("CURATION_RAY_ADDRESS", "127.0.0.1:6379")
    monkeypatch.setenv("CURATION_RAY_GPUS_PER_ACTOR", "2")
    assert compute_from_env().ray_address == "127.0.0.1:6379" and compute_from_env().gpus_per_actor == 2.0
    monkeypatch.setenv("CURATION_RAY_GPUS_PER_ACTOR", "many")
    with pytest.raises(ValueError, match="CURATION_RAY_GPUS_PER_ACTOR"):
        compute_from_env()
