"""The UI's "Materialize all" on shards with no labels: a real dagster-webserver receives the same GraphQL
mutation the button sends (an asset backfill of every asset and partition), a real dagster-daemon runs it,
and the backfill finishes successfully with every label-free table made."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import dagster as dg
import polars as pl
import pytest
from click.testing import CliRunner

from tests.conftest import dagster_daemon

REPO = Path(__file__).resolve().parents[1]
MUTATION = """
mutation($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PythonError { message }
  }
}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _graphql(port: int, query: str, variables: dict) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/graphql", method="POST",
                                     data=json.dumps({"query": query, "variables": variables}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_materialize_all_without_labels_succeeds(tmp_path):
    from curation_assets.cli import main
    from curation_assets.definitions import build_definitions
    from curation_assets.pipeline import INSTANCE_CONFIG

    home, root, shards = tmp_path / "home", tmp_path / "root", tmp_path / "shards"
    home.mkdir()
    made = CliRunner().invoke(main, ["demo-data", "--out", str(shards), "--shards", "2", "--per-shard", "60",
                                     "--size", "96", "--seed", "5"])
    assert made.exit_code == 0, made.output
    (home / "dagster.yaml").write_text(INSTANCE_CONFIG)
    workspace = tmp_path / "workspace.yaml"
    shutil.copy(REPO / "workspace.yaml", workspace)
    env = {**os.environ, "DAGSTER_HOME": str(home), "CURATION_ROOT": str(root), "CURATION_SHARDS": str(shards),
           "CURATION_REFRESH_CRON": "0 0 1 1 *", "PYTHONPATH": str(REPO)}
    env.pop("CURATION_CONFIG", None)
    instance = dg.DagsterInstance.from_config(str(home))
    instance.add_dynamic_partitions("shards", ["00000", "00001"])
    bin_dir = Path(sys.executable).parent
    # only the backfill may materialise anything here: automation off, as a user testing the button would
    for sensor in ("curation_automation", "new_shards_sensor", "bias_drift_sensor"):
        subprocess.run([str(bin_dir / "dagster"), "sensor", "stop", sensor, "-w", str(workspace)], env=env,
                       cwd=tmp_path, check=True, capture_output=True, timeout=120)
    keys = [k.path for k in build_definitions(root=str(root), shards_dir=str(shards))
            .resolve_asset_graph().materializable_asset_keys]

    port = _free_port()
    with open(tmp_path / "webserver.log", "w") as log:
        webserver = subprocess.Popen([str(bin_dir / "dagster-webserver"), "-h", "127.0.0.1", "-p", str(port),
                                      "-w", str(workspace)], env=env, cwd=tmp_path, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=5)
                break
            except OSError:
                assert time.time() < deadline and webserver.poll() is None, (tmp_path / "webserver.log").read_text()[-3000:]
                time.sleep(1)
        answer = _graphql(port, MUTATION, {"params": {"assetSelection": [{"path": k} for k in keys],
                                                      "allPartitions": True, "title": "Materialize all"}})
        launched = answer["data"]["launchPartitionBackfill"]
        assert launched["__typename"] == "LaunchBackfillSuccess", answer
        backfill_id = launched["backfillId"]
    finally:
        os.killpg(webserver.pid, 15)
        webserver.wait(timeout=30)

    with dagster_daemon(workspace, env, tmp_path) as (daemon, log_path):
        deadline = time.time() + 600
        while time.time() < deadline:
            status = instance.get_backfill(backfill_id).status
            if status.value.startswith("COMPLETED") or status.value in ("FAILED", "CANCELED"):
                break
            assert daemon.poll() is None, log_path.read_text()[-3000:]
            time.sleep(3)
        else:
            pytest.fail("the backfill did not finish:\n" + log_path.read_text()[-4000:])
    runs = instance.get_runs(filters=dg.RunsFilter(tags={"dagster/backfill": backfill_id}))
    failed = [r.run_id for r in runs if r.status == dg.DagsterRunStatus.FAILURE]
    assert status.value in ("COMPLETED", "COMPLETED_SUCCESS"), (status, failed)
    assert runs and not failed
    for table in ("samples", "image_embeddings", "duplicate_pairs", "deduplicated_samples", "dedup_recall",
                  "demographic_ratios", "overall_demographic_ratios", "dataset_census", "labeling_queue",
                  "training_set"):
        assert (root / "delta" / table).is_dir(), table
    samples = pl.read_delta(str(root / "delta" / "samples"))
    assert pl.read_delta(str(root / "delta" / "training_set")).height == samples.height == 120
    assert not (root / "delta" / "safety_scores").exists()  # awaiting labels: made, empty-handed, not failed
    md = instance.get_latest_materialization_event(dg.AssetKey("safety_classifiers")).asset_materialization.metadata
    assert md["status"].value == "awaiting_labels"
