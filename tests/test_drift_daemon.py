"""bias_drift_sensor under a real dagster-daemon: the drifted shard's alert lands in the alerts table."""

import os
import shutil
import time
import warnings
from pathlib import Path

import dagster as dg
import pytest

from tests.conftest import dagster_daemon

from tests.test_bias import DRIFTED, drift_base

REPO = Path(__file__).resolve().parents[1]
warnings.filterwarnings("ignore", category=dg.BetaWarning)


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_real_daemon_alerts_on_the_drifted_shard(tmp_path, tmp_path_factory):
    from curation_assets.demo import demo_config
    from curation_assets.pipeline import open_pipeline
    from resources.alerts import AlertSink

    corpus, base_root = drift_base(tmp_path_factory)
    root, home = tmp_path / "root", tmp_path / "home"
    shutil.copytree(base_root, root, ignore=shutil.ignore_patterns("dagster_home"))
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    config = demo_config(corpus, root)
    instance = dg.DagsterInstance.from_config(str(home))
    pipeline = open_pipeline(root, corpus, str(config), instance=instance)
    pipeline.register_all_shards()
    pipeline.materialize(["demographic_ratios"])
    assert AlertSink().read(pipeline.storage).height == 0

    workspace = tmp_path / "workspace.yaml"
    shutil.copy(REPO / "workspace.yaml", workspace)
    env = {**os.environ, "DAGSTER_HOME": str(home), "CURATION_ROOT": str(root), "CURATION_SHARDS": str(corpus),
           "CURATION_CONFIG": str(config), "PYTHONPATH": str(REPO)}
    # bias_drift_sensor is RUNNING by default: the daemon ticks it without a `dagster sensor start`
    with dagster_daemon(workspace, env, tmp_path) as (daemon, log_path):
        deadline = time.time() + 300
        while time.time() < deadline:
            if AlertSink().read(pipeline.storage).height:
                break
            assert daemon.poll() is None, log_path.read_text()[-3000:]
            time.sleep(2)
        else:
            pytest.fail("no drift alert from the daemon in time:\n" + log_path.read_text()[-3000:])
        time.sleep(3)  # a second write would show up here
        alerts = AlertSink().read(pipeline.storage)
        assert alerts.height == 1
        assert alerts["shard"].to_list() == [DRIFTED] and alerts["source"].to_list() == ["bias_drift"]
        # the sensor's verdict is also recorded as a failed demographic_drift check evaluation in the instance
        key = dg.AssetCheckKey(dg.AssetKey("demographic_ratios"), "demographic_drift")
        while time.time() < deadline:
            evaluations = [r.event.dagster_event.event_specific_data
                           for r in instance.event_log_storage.get_asset_check_execution_history(key, limit=20)
                           if r.event is not None and r.event.dagster_event is not None]
            from_sensor = [e for e in evaluations if getattr(e, "metadata", {}).get("reported_by")]
            if from_sensor:
                break
            time.sleep(2)
        assert from_sensor, "the sensor's check evaluation never reached the instance"
        assert not from_sensor[0].passed and from_sensor[0].metadata["drifted_shards"].value == [DRIFTED]
