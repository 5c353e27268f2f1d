"""The pipeline's configuration: per-stage defaults shipped with the package, overridden by a user file."""

from __future__ import annotations

import copy
import functools
from importlib import resources as importlib_resources
from pathlib import Path
from typing import Any, Optional

import dagster as dg
import yaml

DEFAULT_MEMORY_GB = 4.0
"""The per-step memory budget when ``CURATION_MEMORY_GB`` is not set."""

STAGES = ("ingest", "embeddings", "safety", "bias", "dedup", "audits")


def _deep_merge(base: dict, override: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


@functools.lru_cache(maxsize=None)
def _packaged(stage: str) -> dict[str, Any]:
    ref = importlib_resources.files("curation_assets") / "configs" / f"{stage}.yaml"
    if not ref.is_file():
        return {}
    return yaml.safe_load(ref.read_text()) or {}


def default_section(stage: str) -> dict[str, Any]:
    """The shipped defaults of one stage (``curation_assets/configs/<stage>.yaml``)."""
    return copy.deepcopy(_packaged(stage))


@functools.lru_cache(maxsize=32)
def _parse_file(path: str, mtime_ns: int, size: int) -> Any:
    return yaml.safe_load(Path(path).read_text()) or {}


def load_user_config(path: str | Path | None) -> dict[str, Any]:
    """The user's YAML file, parsed once per content (an edited file is read again)."""
    if not path:
        return {}
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    stat = path.stat()
    data = copy.deepcopy(_parse_file(str(path.resolve()), stat.st_mtime_ns, stat.st_size))
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of stage name to settings")
    unknown = sorted(set(data) - set(STAGES))
    if unknown:
        raise ValueError(f"config file {path}: unknown sections {unknown}; known: {list(STAGES)}")
    return data


class CurationSettings(dg.ConfigurableResource):
    """Stage settings: the packaged YAML defaults merged with the optional user file at ``config_path``
    (a YAML mapping with one section per stage: ingest, embeddings, safety, bias, dedup, audits)."""

    config_path: Optional[str] = None
    memory_gb: Optional[float] = None

    def memory_budget(self) -> int:
        """The memory one step may use for its data, in bytes: ``memory_gb`` (``CURATION_MEMORY_GB``), else
        :data:`DEFAULT_MEMORY_GB`. Global steps size their reads and fit samples to it."""
        gb = DEFAULT_MEMORY_GB if self.memory_gb is None else float(self.memory_gb)
        if not gb > 0:
            raise ValueError(f"the memory budget must be positive, got {gb} GB (CURATION_MEMORY_GB)")
        return int(gb * (1 << 30))

    def section(self, stage: str) -> dict[str, Any]:
        if stage not in STAGES:
            raise KeyError(f"unknown stage {stage!r}; known: {list(STAGES)}")
        return _deep_merge(_packaged(stage), load_user_config(self.config_path).get(stage, {}))

    def sections(self) -> dict[str, dict[str, Any]]:
        """Every stage's merged settings."""
        return {stage: self.section(stage) for stage in STAGES}
