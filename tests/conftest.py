"""Shared fixtures: a small demo corpus and a data root where it is already ingested and embedded."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DAGSTER_DISABLE_TELEMETRY", "1")

SMALL = {"shards": 2, "per_shard": 200, "seed": 1, "size": 128}


def demo_shards(out: Path, shards: int, per_shard: int, size: int = 96, seed: int = 5) -> Path:
    """A small demo corpus of ``shards`` tars (with parquet sidecars) written to ``out``."""
    from curation_assets.demo.corpus import write_demo_corpus

    write_demo_corpus(out, shards=shards, per_shard=per_shard, seed=seed, size=size)
    return out


@pytest.fixture(scope="session")
def demo_corpus(tmp_path_factory) -> Path:
    """A small demo corpus (2 shards x 200 images of 128 px) with ground_truth.parquet and generated/."""
    from curation_assets.demo.corpus import write_demo_corpus

    out = tmp_path_factory.mktemp("corpus")
    write_demo_corpus(out, **SMALL)
    return out


@dataclass
class Ingested:
    """A data root whose shards are registered and whose samples and image_embeddings are materialised."""

    root: Path
    corpus: Path
    pipeline: object

    @property
    def defs(self):
        return self.pipeline.defs

    @property
    def instance(self):
        return self.pipeline.instance

    @property
    def storage(self):
        return self.pipeline.storage

    @property
    def settings(self):
        return self.pipeline.settings

    def materialize(self, assets=None, shards=None):
        return self.pipeline.materialize(assets, shards)

    def copy(self, dest: Path) -> "Ingested":
        """An independent copy (tables, artefacts, a fresh instance with the same shards) to mutate freely."""
        return open_ingested(self.corpus, dest, source=self.root)


def open_ingested(corpus: Path, root: Path, source: Path | None = None) -> Ingested:
    import dagster as dg

    from curation_assets.demo.run import demo_config
    from curation_assets.pipeline import open_pipeline

    if source is not None:
        shutil.copytree(source, root, dirs_exist_ok=True, ignore=shutil.ignore_patterns("dagster_home"))
    root.mkdir(parents=True, exist_ok=True)
    config = demo_config(corpus, root)
    pipeline = open_pipeline(root, corpus, str(config), instance=dg.DagsterInstance.ephemeral())
    pipeline.register_all_shards()
    return Ingested(root, corpus, pipeline)


@pytest.fixture(scope="session")
def ingested(tmp_path_factory, demo_corpus) -> Ingested:
    state = open_ingested(demo_corpus, tmp_path_factory.mktemp("root"))
    state.materialize(["samples", "image_embeddings"])
    return state


@contextmanager
def dagster_daemon(workspace: Path, env: dict, cwd: Path):
    """A real ``dagster-daemon run`` on ``workspace``; yields (process, log path) and always stops it."""
    log_path = cwd / "daemon.log"
    with open(log_path, "w") as log:
        daemon = subprocess.Popen([str(Path(sys.executable).parent / "dagster-daemon"), "run", "-w", str(workspace)],
                                  env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            yield daemon, log_path
        finally:
            os.killpg(daemon.pid, signal.SIGTERM)
            try:
                daemon.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(daemon.pid, signal.SIGKILL)
