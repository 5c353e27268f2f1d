"""A data root opened for work: its Dagster instance, its Definitions and its shards, in one object.

``curate run``, ``make demo`` and the tests use this; ``make ui`` points ``dagster dev`` at the same
``DAGSTER_HOME`` (``<root>/dagster_home``) and ``CURATION_*`` variables, so the UI shows these runs.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import dagster as dg

from curation_assets import runner
from curation_assets.core.location import as_path, is_uri, local_state_dir
from curation_assets.partitions import SHARDS

LAUNCHER_TAG = "curation/launched_by"
LAUNCHER = "curate"


INSTANCE_CONFIG = """\
# The Dagster instance of this data root (make ui, curate run, the daemon). Automation batches shards (16 per
# run) and the queue below caps concurrent runs, so a backlog of shards never floods the machine.
telemetry:
  enabled: false
concurrency:
  runs:
    max_concurrent_runs: 4
# runs whose worker process died are marked failed by the daemon (curate run marks its own on the next start)
run_monitoring:
  enabled: true
  start_timeout_seconds: 300
  poll_interval_seconds: 60
"""


POSTGRES_STORAGE = """\
# Runs, event logs and schedules/sensor ticks in Postgres: the instance for many shards (SQLite fails near ~36k
# partitions) and for a daemon, a webserver and curate commands on different machines. The URL is read from the
# environment when the instance loads, so the password never sits in this file. Name the driver dagster-postgres
# uses: postgresql+psycopg2://user:password@host:5432/dagster (SQLAlchemy 2.1 reads postgresql:// as psycopg 3).
storage:
  postgres:
    postgres_url:
      env: DAGSTER_POSTGRES_URL
"""


def instance_config(postgres: bool = False) -> str:
    """The ``dagster.yaml`` of a data root: :data:`INSTANCE_CONFIG`, with :data:`POSTGRES_STORAGE` when
    ``postgres`` (``curate instance --postgres``)."""
    return INSTANCE_CONFIG + (POSTGRES_STORAGE if postgres else "")


def home_dir(root: str | Path) -> Path:
    """``$DAGSTER_HOME`` when set, else ``<root>/dagster_home`` (for an object-store root, the root's local
    state directory, :func:`~curation_assets.core.location.local_state_dir`; see :func:`dagster_home`)."""
    env = os.environ.get("DAGSTER_HOME")
    return Path(env).expanduser().resolve() if env else local_state_dir(root) / "dagster_home"


def dagster_home(root: str | Path) -> Path:
    """The Dagster home every command of this root shares: ``$DAGSTER_HOME`` when set (the daemon and the
    webserver read it too, so ``curate`` and they see one instance), else ``<root>/dagster_home``. A missing
    ``dagster.yaml`` is written from :data:`INSTANCE_CONFIG` on first use."""
    home = home_dir(root)
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    if not config.exists():
        config.write_text(INSTANCE_CONFIG)
    return home


@dataclass
class Pipeline:
    root: Path
    shards_dir: Path
    config_path: str | None
    defs: dg.Definitions
    instance: dg.DagsterInstance
    dagster_home: Path

    @property
    def resources(self) -> dict:
        return self.defs.resources

    @property
    def storage(self):
        return self.defs.resources["storage"]

    @property
    def settings(self):
        return self.defs.resources["settings"]

    def shards(self) -> list[str]:
        return list(self.instance.get_dynamic_partitions(SHARDS))

    def register_all_shards(self) -> list[str]:
        keys = [ref.key for ref in self.defs.resources["shard_source"].list_shards()]
        return runner.register_shards(self.instance, keys)

    def materialize(self, assets: Sequence[str] | None = None, shards: Sequence[str] | None = None,
                    progress: bool = False, log_level: str = "WARNING",
                    keep_going: bool = False) -> list[dg.ExecuteInProcessResult]:
        bar = ProgressBars() if progress else None
        try:
            return runner.materialize(self.defs, self.instance, assets, shards, log_level=log_level,
                                      keep_going=keep_going, tags={LAUNCHER_TAG: LAUNCHER},
                                      on_layer=bar.layer if bar else None, on_run=bar.run if bar else None)
        finally:
            if bar:
                bar.close()

    def exclusive(self):
        """Hold the root's run lock while materialising; yields whether it was free. While it is held, runs
        that this launcher left ``STARTED`` in the instance cannot belong to a live process."""
        from curation_assets.core.locks import file_lock

        return file_lock(local_state_dir(self.root) / "locks" / "curate_run.lock", blocking=False)

    def fail_abandoned_runs(self) -> list[str]:
        """Mark runs of this launcher that are still ``STARTING``/``STARTED`` as failed (a killed ``curate run``
        leaves them so forever); call only while :meth:`exclusive` holds the lock. Returns their ids."""
        records = self.instance.get_runs(filters=dg.RunsFilter(
            statuses=[dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED], tags={LAUNCHER_TAG: LAUNCHER}))
        for run in records:
            self.instance.report_run_failed(run, "the process running it ended without finishing (killed or "
                                                 "crashed); marked failed by the next curate run")
        return [run.run_id for run in records]


class ProgressBars:
    """One bar per stage of a materialisation on a terminal (shards or partitions done, the rate, the time);
    one line per finished run elsewhere (logs, CI)."""

    def __init__(self, stream=None):
        self._stream = stream or sys.stderr
        self._bar = None
        self._done = 0
        self._total = 0
        self._unit = ""
        self._names = ""
        self._started = 0.0

    def layer(self, assets, total: int, unit: str) -> None:
        self.close()
        names = ", ".join(k.to_user_string() for k in assets)
        self._names = names if len(names) <= 60 else names[:57] + "..."
        self._done, self._total, self._unit, self._started = 0, total, unit, time.perf_counter()
        if self._stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit=f" {unit}", desc=self._names, file=self._stream,
                             bar_format="{desc}: {n_fmt}/{total_fmt}{unit} |{bar:20}| {elapsed} ({rate_fmt}){postfix}")

    def run(self, assets, count: int, what: str, success: bool) -> None:
        self._done += count
        if self._bar is not None:
            self._bar.set_postfix_str(what if success else f"{what} FAILED", refresh=False)
            self._bar.update(count)
            return
        seconds = time.perf_counter() - self._started
        rate = f", {self._done / seconds:.2f} {self._unit}/s" if self._unit == "shards" and seconds > 0 else ""
        print(f"  {self._names}: {self._done}/{self._total} {self._unit} ({what}{'' if success else ', FAILED'}) "
              f"{seconds:.1f}s{rate}", file=self._stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def open_pipeline(root: str | Path, shards_dir: str | Path, config_path: str | None = None,
                  encoder=None, instance: dg.DagsterInstance | None = None) -> Pipeline:
    """Bind the definitions to a data root and open (or create) its persistent Dagster instance.

    The ``CURATION_*`` variables are set for this process too, so code that builds Definitions from the
    environment (a daemon started from here, ``dagster dev``) sees the same root."""
    from curation_assets.definitions import build_definitions

    root = as_path(root)
    if not is_uri(root):
        root.mkdir(parents=True, exist_ok=True)
    shards_dir = as_path(shards_dir)
    os.environ["CURATION_ROOT"] = str(root)
    os.environ["CURATION_SHARDS"] = str(shards_dir)
    if config_path:
        os.environ["CURATION_CONFIG"] = str(Path(config_path).resolve())
    else:  # no settings file for this root: none may leak in from a root opened earlier in this process
        os.environ.pop("CURATION_CONFIG", None)
    home = dagster_home(root)
    if instance is None:
        instance = dg.DagsterInstance.from_config(str(home))
    defs = build_definitions(root=str(root), shards_dir=str(shards_dir), config_path=config_path, encoder=encoder)
    return Pipeline(root, shards_dir, config_path, defs, instance, home)
