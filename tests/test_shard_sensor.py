"""new_shards_sensor: registers new shards once, bounded per tick (tests/test_drift_daemon.py runs it under a
real daemon)."""


import dagster as dg

from curation_assets.partitions import SHARDS
from curation_assets.sensors import new_shards_sensor
from resources.shard_source import ShardSource
from tests.test_shard_partitions import _write_shard



def _tick(instance, source, cursor=None):
    context = dg.build_sensor_context(instance=instance, resources={"shard_source": source}, cursor=cursor)
    return new_shards_sensor(context)


def test_sensor_registers_new_shards_once(tmp_path):
    for number in (0, 1):
        _write_shard(tmp_path, number, 2)
    (tmp_path / "00002.tar.tmp").write_bytes(b"being written")
    (tmp_path / "bad,key.tar").write_bytes(b"")
    instance = dg.DagsterInstance.ephemeral()
    source = ShardSource(uri=str(tmp_path))

    result = _tick(instance, source)
    assert not result.run_requests  # automation materialises the new partitions, the sensor only registers them
    assert result.dynamic_partitions_requests[0].partition_keys == ["00000", "00001"]

    instance.add_dynamic_partitions(SHARDS, ["00000", "00001"])
    again = _tick(instance, source)
    assert isinstance(again, dg.SkipReason)

    _write_shard(tmp_path, 2, 2)
    third = _tick(instance, source)
    assert third.dynamic_partitions_requests[0].partition_keys == ["00002"]


def test_sensor_bounds_keys_per_tick(tmp_path):
    for number in range(53):
        (tmp_path / f"{number:05d}.tar").write_bytes(b"")
    result = _tick(dg.DagsterInstance.ephemeral(), ShardSource(uri=str(tmp_path)))
    keys = result.dynamic_partitions_requests[0].partition_keys
    assert len(keys) == 50 and keys[-1] == "00049"
