"""The Definitions object: every stage's assets, checks and sensors, and the resources they share.

Resources read their settings from the environment so ``dagster dev`` (workspace.yaml), ``curate run`` and the
tests all see the same data root:

- ``CURATION_ROOT``: data root (Delta tables, artefacts, reports); default ``./data``.
- ``CURATION_SHARDS``: directory the shard sensor watches; default ``<root>/shards``.
- ``CURATION_CONFIG``: optional YAML file with per-stage settings.
- ``CURATION_ENCODER``: ``perceptual`` (default, weight-free) or ``open_clip``; with open_clip also
  ``CURATION_CLIP_MODEL`` and ``CURATION_CLIP_PRETRAINED`` (a pretrained tag or a local checkpoint path).
- ``CURATION_ALERT_WEBHOOK``, ``CURATION_SLACK_CHANNEL``, ``CURATION_SLACK_TOKEN``: where drift alerts go
  (``resources/alerts.py``), read through ``dg.EnvVar``.
- ``CURATION_MEMORY_GB``: memory budget of one step (default 4): global steps size their reads and k-means
  samples to it.
- ``CURATION_REFRESH_CRON``: how often global assets may refresh by themselves (``automation.py``).
"""

from __future__ import annotations

import os
from typing import Any

import dagster as dg

from curation_assets import (bias, bias_drift, bias_weights, clip_bias_audit, dataset_census, dedup, dedup_clusters,
                             dedup_recall, embeddings, image_attributes, ingest, regurgitation_audit, report, safety,
                             safety_filter, safety_labels, sensors, training_set)
from curation_assets.automation import with_automation
from curation_assets.config import validate_settings, with_settings_versions
from resources.alerts import alert_sink_from_env
from resources.compute import compute_from_env
from resources.encoders import EncoderResource
from resources.settings import CurationSettings
from resources.shard_source import ShardSource
from resources.storage import DeltaStorage
from resources.vector_search import VectorSearch

STAGES = (ingest, embeddings, image_attributes, safety_labels, safety, safety_filter, dedup_clusters, dedup,
          dedup_recall, bias, bias_weights, bias_drift, training_set, regurgitation_audit, dataset_census, report,
          sensors)
"""Stage modules with a module-level ``defs``; ``clip_bias_audit.build_defs`` depends on the settings."""


def _memory_gb() -> float | None:
    value = os.environ.get("CURATION_MEMORY_GB")
    if not value:
        return None
    try:
        gb = float(value)
    except ValueError:
        gb = float("nan")
    if not gb > 0:
        raise ValueError(f"CURATION_MEMORY_GB must be a positive number of gigabytes, got {value!r}")
    return gb


def shard_group_size() -> int:
    """Tars per partition (``CURATION_SHARD_GROUP``, default 1: one tar, one partition)."""
    value = os.environ.get("CURATION_SHARD_GROUP") or "1"
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"CURATION_SHARD_GROUP must be a whole number of tars per partition (>= 1), got {value!r}")
    return int(value)


def build_resources(
    root: str | None = None,
    shards_dir: str | None = None,
    config_path: str | None = None,
    encoder: EncoderResource | None = None,
) -> dict[str, Any]:
    """The resources for a data root; arguments override the ``CURATION_*`` environment variables."""
    root = root or os.environ.get("CURATION_ROOT", "data")
    shards_dir = shards_dir or os.environ.get("CURATION_SHARDS") or os.path.join(root, "shards")
    config_path = config_path or os.environ.get("CURATION_CONFIG") or None
    if encoder is None:
        kind = os.environ.get("CURATION_ENCODER", "perceptual")
        encoder = EncoderResource(
            kind=kind,
            model=os.environ.get("CURATION_CLIP_MODEL", "ViT-B-32"),
            pretrained=os.environ.get("CURATION_CLIP_PRETRAINED") or None,
        )
    return {
        "storage": DeltaStorage(root=root),
        "settings": CurationSettings(config_path=config_path, memory_gb=_memory_gb()),
        "shard_source": ShardSource(uri=shards_dir, group_size=shard_group_size()),
        "encoder": encoder,
        "vector_search": VectorSearch(),
        "alerts": alert_sink_from_env(),
        "compute": compute_from_env(),
    }


def build_definitions(refresh_cron: str | None = None, **resource_overrides: Any) -> dg.Definitions:
    """All stages merged, with their automation (``automation.py``), bound to the resources of
    ``build_resources(**resource_overrides)``; the settings are validated first and versioned per asset
    (``config.py``)."""
    resources = build_resources(**resource_overrides)
    settings = resources["settings"]
    validate_settings(settings)
    merged = dg.Definitions.merge(*(stage.defs for stage in STAGES), clip_bias_audit.build_defs(settings),
                                  dg.Definitions(resources=resources))
    return with_automation(with_settings_versions(merged, settings, resources["encoder"].identity()), refresh_cron)


defs = build_definitions()
