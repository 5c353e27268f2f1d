"""Real services the tests start on 127.0.0.1 and stop by PID: a Postgres server on a temporary data directory
and a local Ray cluster. Each skips with the reason when its software is not installed."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import sys
import socket
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _postgres_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def _stop_pid(pid: int, sig=signal.SIGTERM, timeout: float = 30.0) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@contextmanager
def postgres_server():
    """A Postgres server (Debian's ``postgresql``) on a free port of 127.0.0.1 with a fresh data directory and
    a ``dagster`` database; yields its URL (with the ``psycopg2`` driver dagster-postgres uses: SQLAlchemy
    2.1 maps a bare ``postgresql://`` to psycopg 3) and stops the postmaster by PID. As root, the server runs as the
    ``postgres`` user (Postgres refuses to run as root)."""
    initdb, postgres = _postgres_bin("initdb"), _postgres_bin("postgres")
    if not initdb or not postgres:
        pytest.skip("postgresql is not installed (apt-get install postgresql)")
    as_user: list[str] = []
    data = Path(tempfile.mkdtemp(prefix="curation-pg-"))
    if os.geteuid() == 0:
        import pwd

        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run the server as")
        as_user = ["runuser", "-u", "postgres", "--"]
        os.chown(data, user.pw_uid, user.pw_gid)
    port = free_port()
    subprocess.run([*as_user, initdb, "-D", str(data / "db"), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
                   check=True, capture_output=True)
    log = open(data / "server.log", "w")
    proc = subprocess.Popen([*as_user, postgres, "-D", str(data / "db"), "-p", str(port), "-h", "127.0.0.1",
                             "-k", str(data)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 60
        while True:
            try:
                import psycopg2

                conn = psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres")
                conn.autocommit = True
                conn.cursor().execute("CREATE DATABASE dagster")
                conn.close()
                break
            except Exception:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError("postgres did not start:\n" + (data / "server.log").read_text()[-3000:])
                time.sleep(0.3)
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/dagster"
    finally:
        pid = _postmaster_pid(data / "db") or proc.pid
        _stop_pid(pid, signal.SIGINT)  # "fast" shutdown
        proc.wait(timeout=30)
        log.close()
        shutil.rmtree(data, ignore_errors=True)


def _postmaster_pid(db: Path) -> int | None:
    try:
        return int((db / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


@contextmanager
def ray_cluster(num_cpus: int = 2):
    """A local Ray cluster (``ray start --head --node-ip-address 127.0.0.1``) in a fresh temp dir; yields
    ``(address, dashboard_url)`` and stops every process of that session by PID afterwards."""
    ray_bin = Path(sys.executable).parent / "ray"
    if not ray_bin.exists():
        pytest.skip("ray is not installed (pip install 'ray[default]')")
    temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # short: Ray's unix sockets live under it
    port, dashboard = free_port(), free_port()
    started = subprocess.run(
        [str(ray_bin), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
         "--num-cpus", str(num_cpus), "--num-gpus", "0", "--include-dashboard", "true",
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--temp-dir", str(temp),
         "--disable-usage-stats"], capture_output=True, text=True, timeout=180)
    try:
        if started.returncode != 0:
            raise RuntimeError(f"ray start failed:\n{started.stdout[-2000:]}\n{started.stderr[-2000:]}")
        yield f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard}"
    finally:
        for pid in _pids_using(str(temp)):
            _stop_pid(pid, signal.SIGTERM, timeout=10)
        shutil.rmtree(temp, ignore_errors=True)


def _pids_using(marker: str) -> list[int]:
    """Processes whose command line names ``marker`` (the daemons of one Ray session name its temp dir) and
    their children (workers rename themselves ``ray::...``), children first."""
    import psutil

    found: dict[int, None] = {}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(marker in part for part in (proc.info["cmdline"] or [])):
                for child in proc.children(recursive=True):
                    found[child.pid] = None
                found[proc.info["pid"]] = None
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return list(found)


@contextmanager
def s3_server(monkeypatch, bucket: str = "curation"):
    """An S3-compatible server (moto's server mode) on a free port of 127.0.0.1 with one bucket; sets the
    standard AWS_* variables delta-rs, polars and s3fs read, yields the bucket's ``s3://`` URI and stops the
    server by PID."""
    moto = Path(sys.executable).parent / "moto_server"
    if not moto.exists():
        pytest.skip("moto's server is not installed (pip install 'moto[server]')")
    port = free_port()
    proc = subprocess.Popen([str(moto), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ALLOW_HTTP": "true"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    try:
        import boto3

        deadline = time.time() + 30
        while True:
            try:
                boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).create_bucket(Bucket=bucket)
                break
            except Exception:
                if proc.poll() is not None or time.time() > deadline:
                    raise
                time.sleep(0.2)
        yield f"s3://{bucket}"
    finally:
        _stop_pid(proc.pid)
