"""The production instance: `curate instance --postgres` writes a dagster.yaml whose runs, events and ticks live
in Postgres, and `curate run` materialises the whole graph against a real Postgres server on 127.0.0.1
(tests/test_drift_daemon.py runs the sensors and the automation sensor under a daemon against it)."""


import dagster as dg
import polars as pl
import pytest
from click.testing import CliRunner

from tests.conftest import demo_shards
from tests.services import postgres_server


@pytest.fixture
def postgres_home(tmp_path, monkeypatch):
    """A Dagster home written by `curate instance --postgres`, pointed at a fresh Postgres server."""
    from curation_assets.cli import main

    home = tmp_path / "home"
    with postgres_server() as url:
        monkeypatch.setenv("DAGSTER_HOME", str(home))
        monkeypatch.setenv("DAGSTER_POSTGRES_URL", url)
        made = CliRunner().invoke(main, ["instance", "--root", str(tmp_path / "root"), "--postgres"])
        assert made.exit_code == 0, made.output
        yield home, url


def _count(url: str, table: str) -> int:
    import psycopg2

    with psycopg2.connect(url.replace("+psycopg2", "")) as conn, conn.cursor() as cur:
        cur.execute(f"SELECT count(*) FROM {table}")
        return cur.fetchone()[0]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_curate_run_keeps_its_instance_in_postgres(tmp_path, postgres_home):
    from curation_assets.cli import main
    from resources.storage import DeltaStorage

    home, url = postgres_home
    config = (home / "dagster.yaml").read_text()
    assert "DAGSTER_POSTGRES_URL" in config and url not in config  # the secret stays in the environment
    again = CliRunner().invoke(main, ["instance", "--root", str(tmp_path / "root"), "--postgres"])
    assert again.exit_code == 1 and "exists" in again.output

    shards, root = tmp_path / "shards", tmp_path / "root"
    demo_shards(shards, 2, 60, size=96, seed=5)
    ran = CliRunner().invoke(main, ["run", "--shards-dir", str(shards), "--root", str(root)])
    assert ran.exit_code == 0, ran.output
    assert f"Dagster home {home}" in ran.output
    assert not (root / "dagster_home").exists()

    instance = dg.DagsterInstance.from_config(str(home))
    assert type(instance.run_storage).__name__ == "PostgresRunStorage"
    assert sorted(instance.get_dynamic_partitions("shards")) == ["00000", "00001"]
    runs = instance.get_runs()
    assert runs and all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs)
    assert _count(url, "runs") == len(runs) and _count(url, "event_logs") > 0
    assert instance.get_latest_materialization_event(dg.AssetKey("training_set")) is not None

    storage = DeltaStorage(root=str(root))
    verdicts = storage.read("training_set", columns=["uid", "verdict"])
    assert verdicts.height == 120 and verdicts["uid"].n_unique() == 120
    assert set(verdicts["verdict"]) <= {"kept", "duplicate", "filtered", "rejected", "pending", "not_embedded"}
    assert storage.read("samples").filter(pl.col("status") == "ok").height > 0
