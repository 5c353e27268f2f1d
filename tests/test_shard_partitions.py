"""Per-shard tables through Dagster: re-runs replace one shard, ranged runs and concurrent runs lose nothing."""

import io
import multiprocessing as mp
import tarfile
from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl
import pytest
from PIL import Image

from curation_assets.core import delta
from curation_assets.pipeline import open_pipeline


def _write_shard(directory: Path, number: int, n: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed + number)
    path = directory / f"{number:05d}.tar"
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(buf, format="JPEG")
            for name, data in ((f"{number:05d}{i:04d}.jpg", buf.getvalue()), (f"{number:05d}{i:04d}.txt", f"c{i}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def _counts(root: Path) -> dict[str, int]:
    df = delta.read(root / "delta" / "samples")
    return dict(df.group_by("shard").len().sort("shard").iter_rows())


def test_ranged_run_then_rematerialising_one_shard_replaces_exactly_it(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    for number, n in ((0, 7), (1, 5), (2, 9)):
        _write_shard(shards, number, n)
    pipeline = open_pipeline(tmp_path / "root", shards, instance=dg.DagsterInstance.ephemeral())
    pipeline.register_all_shards()
    results = pipeline.materialize(["samples"])
    assert len(results) == 1, "three shards in one ranged run"
    assert _counts(pipeline.root) == {"00000": 7, "00001": 5, "00002": 9}

    before = delta.read(pipeline.root / "delta" / "samples").filter(pl.col("shard") != "00001").sort("uid")
    _write_shard(shards, 1, 3, seed=99)
    pipeline.materialize(["samples"], shards=["00001"])
    assert _counts(pipeline.root) == {"00000": 7, "00001": 3, "00002": 9}
    after = delta.read(pipeline.root / "delta" / "samples").filter(pl.col("shard") != "00001").sort("uid")
    assert after.equals(before), "other shards untouched, byte for byte"

    events = pipeline.instance.fetch_materializations(dg.AssetKey("samples"), limit=10).records
    assert {e.partition_key for e in events} == {"00000", "00001", "00002"}


def _materialize_one(root: str, shards_dir: str, shard: str, barrier) -> None:
    pipeline = open_pipeline(root, shards_dir, instance=dg.DagsterInstance.ephemeral())
    pipeline.register_all_shards()
    barrier.wait(timeout=60)
    pipeline.materialize(["samples"], shards=[shard])


def test_two_shards_materialised_concurrently_both_land(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    sizes = {0: 40, 1: 60, 2: 50, 3: 30}
    for number, n in sizes.items():
        _write_shard(shards, number, n)
    root = tmp_path / "root"
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(len(sizes))
    procs = [ctx.Process(target=_materialize_one, args=(str(root), str(shards), f"{n:05d}", barrier)) for n in sizes]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
        assert p.exitcode == 0
    assert _counts(root) == {f"{n:05d}": c for n, c in sizes.items()}


@pytest.mark.slow
def test_demo_shards_reconcile_with_tar_members(ingested):
    """samples has one row per member group of every tar; image_embeddings one vector per ok sample."""
    storage = ingested.storage
    for ref in ingested.defs.resources["shard_source"].list_shards():
        with tarfile.open(ref.tar) as tar:
            keys = {Path(m.name).name.split(".")[0] for m in tar.getmembers() if m.isfile()}
        rows = storage.read("samples", [ref.key])
        assert set(rows["key"]) == keys
        assert rows.height == len(keys)
        emb = storage.read("image_embeddings", [ref.key])
        assert set(emb["uid"]) == set(rows.filter(pl.col("status") == "ok")["uid"])
    ids, matrix = storage.load_embeddings()
    assert matrix.dtype == np.float32 and matrix.flags["C_CONTIGUOUS"]
    assert np.allclose(np.linalg.norm(matrix, axis=1), 1.0, atol=1e-4)
    assert ids["uid"].is_sorted()
