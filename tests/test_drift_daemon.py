"""Hands-off under a real dagster-daemon on the production instance (Postgres storage, a real server on
127.0.0.1): shards dropped into the watched directory flow through every per-shard asset to their demographic
ratios with no click and no `materialize` call, and the drifted one alerts."""

import json
import os
import shutil
import time
import warnings
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from tests.conftest import dagster_daemon
from tests.services import postgres_server
from tests.test_bias import DRIFTED, drift_base

REPO = Path(__file__).resolve().parents[1]
warnings.filterwarnings("ignore", category=dg.BetaWarning)
CHECK = dg.AssetCheckKey(dg.AssetKey("demographic_ratios"), "demographic_drift")


def _drop(src: Path, dest_dir: Path, name: str | None = None) -> None:
    """Copy a shard in the way a downloader should: under a temporary name, then an atomic rename."""
    dest = dest_dir / (name or src.name)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.copy(src, tmp)
    os.replace(tmp, dest)


def _wait(what: str, condition, daemon, log_path: Path, seconds: float):
    deadline = time.time() + seconds
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        assert daemon.poll() is None, log_path.read_text()[-3000:]
        time.sleep(2)
    pytest.fail(f"{what} did not happen in {seconds:.0f}s:\n" + log_path.read_text()[-4000:])


def _sensor_verdicts(instance) -> list[dict]:
    """The demographic_drift evaluations bias_drift_sensor recorded, newest first: {shard: status}, passed."""
    out = []
    for record in instance.event_log_storage.get_asset_check_execution_history(CHECK, limit=50):
        data = record.event.dagster_event.event_specific_data if record.event and record.event.dagster_event else None
        if "reported_by" in (getattr(data, "metadata", None) or {}):
            out.append({"statuses": data.metadata["statuses"].value, "passed": data.passed,
                        "drifted": data.metadata["drifted_shards"].value})
    return out


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_dropped_shards_flow_to_a_drift_alert_with_no_clicks(tmp_path, tmp_path_factory, monkeypatch):
    from curation_assets.core import delta
    from curation_assets.demo.run import demo_config
    from curation_assets.pipeline import instance_config
    from resources.storage import DeltaStorage

    corpus, _ = drift_base(tmp_path_factory)
    root, home, watched = tmp_path / "root", tmp_path / "home", tmp_path / "watched"
    for d in (root, home, watched):
        d.mkdir()
    (home / "dagster.yaml").write_text(instance_config(postgres=True))
    config = demo_config(corpus, tmp_path)
    workspace = tmp_path / "workspace.yaml"
    shutil.copy(REPO / "workspace.yaml", workspace)
    # the global assets' hourly refresh is not what this test is about: keep it from starting mid-test
    env = {**os.environ, "DAGSTER_HOME": str(home), "CURATION_ROOT": str(root), "CURATION_SHARDS": str(watched),
           "CURATION_CONFIG": str(config), "CURATION_REFRESH_CRON": "0 0 1 1 *", "PYTHONPATH": str(REPO)}
    storage = DeltaStorage(root=str(root))
    ratios = root / "delta" / "demographic_ratios"

    def measured() -> set[str]:
        return set(delta.read(ratios, columns=["shard"])["shard"].unique()) if delta.table_exists(ratios) else set()

    reference = sorted(p for p in corpus.glob("*.tar") if p.stem != DRIFTED)
    assert len(reference) == 4
    # no `dagster sensor start`: new_shards_sensor, curation_automation and bias_drift_sensor are on by default
    with postgres_server() as url:
        monkeypatch.setenv("DAGSTER_POSTGRES_URL", url)  # for the instance this test opens to read the checks
        _run_and_check(corpus, reference, watched, workspace, {**env, "DAGSTER_POSTGRES_URL": url}, tmp_path,
                       home, storage, measured)


def _run_and_check(corpus, reference, watched, workspace, env, tmp_path, home, storage, measured):
    from resources.alerts import AlertSink

    with dagster_daemon(workspace, env, tmp_path) as (daemon, log_path):
        for tar in reference:
            _drop(tar, watched)
            _drop(tar.with_suffix(".parquet"), watched)
        _wait("the four reference shards measured", lambda: measured() >= {p.stem for p in reference},
              daemon, log_path, 360)
        assert AlertSink().read(storage).height == 0

        _drop(corpus / f"{DRIFTED}.tar", watched)
        _wait("a drift alert", lambda: AlertSink().read(storage).height, daemon, log_path, 240)
        alerts = AlertSink().read(storage)
        assert alerts["shard"].to_list() == [DRIFTED] and alerts["source"].to_list() == ["bias_drift"]
        instance = dg.DagsterInstance.from_config(str(home))
        failed = _wait("a failed demographic_drift check from the sensor",
                       lambda: [v for v in _sensor_verdicts(instance) if DRIFTED in v["statuses"]], daemon, log_path, 120)
        assert not failed[0]["passed"] and failed[0]["drifted"] == [DRIFTED]

        normal = "00005"
        _drop(reference[-1], watched, f"{normal}.tar")  # a normal shard under a new name
        judged = _wait("the normal shard judged", lambda: [v for v in _sensor_verdicts(instance)
                                                           if normal in v["statuses"]], daemon, log_path, 240)
        assert judged[0]["passed"] and judged[0]["statuses"][normal] != "alert"
        alerts = AlertSink().read(storage)
        assert alerts.height == 1, alerts.to_dicts()

    # every per-shard asset ran for every shard, each shard's rows counted once, and the runs came from
    # automation (no run was launched by hand)
    shards = {p.stem for p in reference} | {DRIFTED, normal}
    assert type(instance.run_storage).__name__ == "PostgresRunStorage"
    assert set(instance.get_dynamic_partitions("shards")) == shards
    for table in ("samples", "image_embeddings", "demographic_ratios"):
        assert set(storage.read(table, columns=["shard"])["shard"].unique()) == shards, table
    samples = storage.read("samples", columns=["uid"])
    assert samples.height == samples["uid"].n_unique()
    runs = instance.get_runs()
    assert runs and all(r.tags.get("dagster/from_automation_condition") == "true" for r in runs), \
        [json.dumps(r.tags) for r in runs]
    raw = storage.read("demographic_ratios").filter((pl.col("stage") == "raw") & (pl.col("kind") == "share"))
    assert set(raw["shard"]) == shards
