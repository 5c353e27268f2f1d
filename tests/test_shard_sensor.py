"""new_shards_sensor: registers new shards once, bounded per tick (tests/test_drift_daemon.py runs it under a
real daemon)."""


import dagster as dg

from curation_assets.partitions import SHARDS
from curation_assets.sensors import new_shards_sensor
from resources.shard_source import ShardSource, shard_key
from tests.test_shard_partitions import _write_shard



def _tick(instance, source, cursor=None):
    context = dg.build_sensor_context(instance=instance, resources={"shard_source": source}, cursor=cursor)
    return new_shards_sensor(context)


def test_a_changed_shard_is_re_ingested_once(tmp_path):
    import os

    for number in (0, 1):
        _write_shard(tmp_path, number, 2)
    instance = dg.DagsterInstance.ephemeral()
    source = ShardSource(uri=str(tmp_path))
    first = _tick(instance, source)
    instance.add_dynamic_partitions(SHARDS, ["00000", "00001"])
    quiet = _tick(instance, source, first.cursor)
    assert not quiet.run_requests and not quiet.dynamic_partitions_requests
    _write_shard(tmp_path, 1, 3)  # other pictures under the same name
    os.utime(tmp_path / "00001.tar", ns=(1, 1))
    changed = _tick(instance, source, quiet.cursor)
    assert [r.partition_key for r in changed.run_requests] == ["00001"]
    assert changed.run_requests[0].asset_selection in (None, [dg.AssetKey("samples")])
    again = _tick(instance, source, changed.cursor)
    assert not again.run_requests


def test_sensor_registers_new_shards_once(tmp_path):
    for number in (0, 1):
        _write_shard(tmp_path, number, 2)
    (tmp_path / "00002.tar.tmp").write_bytes(b"being written")
    (tmp_path / "bad,key.tar").write_bytes(b"")
    instance = dg.DagsterInstance.ephemeral()
    source = ShardSource(uri=str(tmp_path))

    result = _tick(instance, source)
    assert not result.run_requests  # automation materialises the new partitions, the sensor only registers them
    # the half-written file is not a shard; the name with a comma gets a safe key instead of being skipped
    assert result.dynamic_partitions_requests[0].partition_keys == ["00000", "00001", shard_key("bad,key")]

    instance.add_dynamic_partitions(SHARDS, ["00000", "00001", shard_key("bad,key")])
    again = _tick(instance, source, result.cursor)
    assert again.skip_reason and not again.run_requests and not again.dynamic_partitions_requests

    _write_shard(tmp_path, 2, 2)
    third = _tick(instance, source, again.cursor)
    assert third.dynamic_partitions_requests[0].partition_keys == ["00002"]


def test_sensor_bounds_keys_per_tick(tmp_path):
    for number in range(53):
        (tmp_path / f"{number:05d}.tar").write_bytes(b"")
    result = _tick(dg.DagsterInstance.ephemeral(), ShardSource(uri=str(tmp_path)))
    keys = result.dynamic_partitions_requests[0].partition_keys
    assert len(keys) == 50 and keys[-1] == "00049"
