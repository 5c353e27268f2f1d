"""new_shards_sensor: registers new shards once, bounded per tick; and a real daemon ingests a dropped shard."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest

from curation_assets.partitions import SHARDS
from curation_assets.sensors import new_shards_sensor
from resources.shard_source import ShardSource
from tests.conftest import dagster_daemon
from tests.test_shard_partitions import _write_shard

REPO = Path(__file__).resolve().parents[1]


def _tick(instance, source, cursor=None):
    context = dg.build_sensor_context(instance=instance, resources={"shard_source": source}, cursor=cursor)
    return new_shards_sensor(context)


def test_sensor_registers_new_shards_with_idempotent_run_keys(tmp_path):
    for number in (0, 1):
        _write_shard(tmp_path, number, 2)
    (tmp_path / "00002.tar.tmp").write_bytes(b"being written")
    (tmp_path / "bad,key.tar").write_bytes(b"")
    instance = dg.DagsterInstance.ephemeral()
    source = ShardSource(uri=str(tmp_path))

    result = _tick(instance, source)
    assert [r.partition_key for r in result.run_requests] == ["00000", "00001"]
    assert [r.run_key for r in result.run_requests] == ["shard-00000", "shard-00001"]
    assert result.dynamic_partitions_requests[0].partition_keys == ["00000", "00001"]

    instance.add_dynamic_partitions(SHARDS, ["00000", "00001"])
    again = _tick(instance, source)
    assert isinstance(again, dg.SkipReason)

    _write_shard(tmp_path, 2, 2)
    third = _tick(instance, source)
    assert [r.partition_key for r in third.run_requests] == ["00002"]


def test_sensor_bounds_keys_per_tick(tmp_path):
    for number in range(53):
        (tmp_path / f"{number:05d}.tar").write_bytes(b"")
    result = _tick(dg.DagsterInstance.ephemeral(), ShardSource(uri=str(tmp_path)))
    assert len(result.run_requests) == 50
    assert result.run_requests[-1].partition_key == "00049"


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_real_daemon_ingests_a_dropped_shard(tmp_path):
    """dagster-daemon on a temporary DAGSTER_HOME: start the sensor, drop a tar in, wait for its rows."""
    from curation_assets.core import delta

    home, root, shards = tmp_path / "home", tmp_path / "root", tmp_path / "shards"
    for d in (home, root, shards):
        d.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    workspace = tmp_path / "workspace.yaml"
    shutil.copy(REPO / "workspace.yaml", workspace)
    env = {**os.environ, "DAGSTER_HOME": str(home), "CURATION_ROOT": str(root), "CURATION_SHARDS": str(shards),
           "PYTHONPATH": str(REPO)}
    env.pop("CURATION_CONFIG", None)
    bin_dir = Path(sys.executable).parent
    subprocess.run([str(bin_dir / "dagster"), "sensor", "start", "new_shards_sensor", "-w", str(workspace)],
                   env=env, cwd=tmp_path, check=True, capture_output=True, timeout=120)
    with dagster_daemon(workspace, env, tmp_path) as (daemon, log_path):
        _write_shard(shards, 7, 6)
        table = root / "delta" / "image_embeddings"
        deadline = time.time() + 300
        while time.time() < deadline:
            if delta.table_exists(table) and delta.read(table).height == 6:
                break
            assert daemon.poll() is None, (tmp_path / "daemon.log").read_text()[-3000:]
            time.sleep(3)
        else:
            pytest.fail("the daemon did not ingest the shard in time:\n" + (tmp_path / "daemon.log").read_text()[-3000:])
        samples = delta.read(root / "delta" / "samples")
        assert samples["shard"].unique().to_list() == ["00007"] and samples.height == 6
        instance = dg.DagsterInstance.from_config(str(home))
        assert instance.get_dynamic_partitions(SHARDS) == ["00007"]
