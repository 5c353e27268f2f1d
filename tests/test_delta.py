"""The Delta helpers: exact round trips of vectors, shard replacement, clear errors."""

import numpy as np
import polars as pl
import pytest

from curation_assets.core import delta


def test_embeddings_round_trip_exactly(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 48)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    uids = [f"00000/{i:09d}" for i in range(300)]
    path = tmp_path / "image_embeddings"
    delta.write_shard(path, delta.embeddings_frame(uids[:200], ["00000"] * 200, x[:200], "enc-v1"), "00000")
    delta.write_shard(path, delta.embeddings_frame([u.replace("00000/", "00001/") for u in uids[200:]], ["00001"] * 100,
                                                   x[200:], "enc-v1"), "00001")
    ids, matrix = delta.load_embeddings(path)
    assert matrix.shape == (300, 48) and matrix.dtype == np.float32 and matrix.flags["C_CONTIGUOUS"]
    order = np.argsort(np.array([u.replace("00001/", "00000/") for u in uids]))
    by_uid = dict(zip(ids["uid"], matrix))
    assert np.array_equal(by_uid["00000/000000005"], x[5])
    assert np.array_equal(by_uid["00001/000000250"], x[250])
    only, m1 = delta.load_embeddings(path, ["00001"])
    assert m1.shape == (100, 48) and set(only["shard"]) == {"00001"}
    assert order is not None


def test_write_shard_replaces_only_that_shard(tmp_path):
    path = tmp_path / "t"
    delta.write_shard(path, pl.DataFrame({"shard": ["a"] * 3, "v": [1, 2, 3]}), "a")
    delta.write_shard(path, pl.DataFrame({"shard": ["b"] * 2, "v": [4, 5]}), "b")
    delta.write_shard(path, pl.DataFrame({"shard": ["a"], "v": [9]}), "a")
    df = delta.read(path).sort("shard", "v")
    assert df.rows() == [("a", 9), ("b", 4), ("b", 5)]
    assert delta.shards_in(path) == ["a", "b"]


def test_write_shard_refuses_foreign_rows_and_bad_keys(tmp_path):
    with pytest.raises(ValueError, match="do not belong"):
        delta.write_shard(tmp_path / "t", pl.DataFrame({"shard": ["a", "b"], "v": [1, 2]}), "a")
    with pytest.raises(ValueError, match="invalid shard key"):
        delta.write_shard(tmp_path / "t", pl.DataFrame({"shard": ["x'y"], "v": [1]}), "x'y")
    with pytest.raises(FileNotFoundError, match="materialise"):
        delta.scan(tmp_path / "nothing")


def test_a_newer_writer_adds_columns_and_the_other_shards_read_them_as_null(tmp_path):
    path = tmp_path / "scores"
    delta.write_shard(path, pl.DataFrame({"uid": ["a"], "shard": ["00000"], "score": [0.5]}), "00000")
    delta.write_shard(path, pl.DataFrame({"uid": ["b"], "shard": ["00001"], "score": [0.7]}), "00001")
    delta.write_shard(path, pl.DataFrame({"uid": ["a"], "shard": ["00000"], "score": [0.6], "scorer": ["classifier"]}),
                      "00000")
    table = delta.read(path).sort("uid")
    assert table.columns.count("scorer") == 1 and table["scorer"].to_list() == ["classifier", None]
    assert table["score"].to_list() == [0.6, 0.7]
    with pytest.raises(Exception):  # dropping a column is not an evolution: the schema must match
        delta.write_shard(path, pl.DataFrame({"uid": ["b"], "shard": ["00001"]}), "00001")


def test_streamed_table_write_is_one_commit_and_may_read_delta_while_it_runs(tmp_path):
    source, target = tmp_path / "source", tmp_path / "target"
    delta.write_table(source, pl.DataFrame({"uid": ["a", "b", "c"], "shard": ["1", "1", "2"]}), ["shard"])
    schema = {"uid": pl.String, "shard": pl.String}
    delta.write_table(target, pl.DataFrame({"uid": ["old"], "shard": ["9"]}), ["shard"])

    def frames(fail_after=None):
        for i, shard in enumerate(["1", "2"]):
            if fail_after is not None and i == fail_after:
                raise RuntimeError("crash while producing the frames")
            yield delta.read(source, [shard])  # reads Delta while the write streams

    with pytest.raises(RuntimeError, match="crash"):
        delta.write_table_streamed(target, frames(fail_after=1), schema, ["shard"])
    assert delta.read(target)["uid"].to_list() == ["old"]  # nothing of the failed write landed
    assert delta.write_table_streamed(target, frames(), schema, ["shard"]) == 3
    assert sorted(delta.read(target)["uid"].to_list()) == ["a", "b", "c"]
    assert not list(tmp_path.glob(".target.staging-*"))  # the staging files are gone


def test_a_per_shard_table_in_another_partition_layout_is_refused(tmp_path):
    path = tmp_path / "cluster_assignments"
    delta.write_shard(path, pl.DataFrame({"uid": ["a"], "shard": ["1"], "bucket": [0]}), "1")  # by shard
    with pytest.raises(ValueError, match=r"partitioned by \['shard'\].*delete the table"):
        delta.write_shard(path, pl.DataFrame({"uid": ["b"], "shard": ["2"], "bucket": [1]}), "2", ["bucket"])
    assert delta.read(path)["uid"].to_list() == ["a"]
