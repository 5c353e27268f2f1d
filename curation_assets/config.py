"""Every stage's settings validated at once, before any step runs, and versioned per asset.

The code location (``definitions.py``) and ``curate run`` call :func:`validate_settings` when they load, so
a misspelt key or a value of the wrong type is one clear message naming ``section.key`` instead of a failure
deep inside the first step that reads it. :func:`with_settings_versions` gives each asset a ``code_version``
from the settings that change its output (:data:`SETTINGS_OF`), so editing one marks exactly those assets
stale in the UI.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Callable, Mapping

import dagster as dg

from curation_assets.core.validation import ConfigError
from resources.settings import STAGES, CurationSettings


def _parsers() -> dict[str, Callable[[dict], Any]]:
    from curation_assets.audits import AuditsConfig
    from curation_assets.core.demographics import BiasSettings
    from curation_assets.core.dedup import DedupSettings
    from curation_assets.core.safety import SafetyConfig
    from curation_assets.core.shards import IngestLimits
    from curation_assets.embeddings import EmbeddingSettings

    return {"ingest": IngestLimits.from_section, "embeddings": EmbeddingSettings.from_section,
            "safety": SafetyConfig.from_section, "bias": BiasSettings.from_section, "dedup": DedupSettings.from_section,
            "audits": AuditsConfig.from_section}


def validate_settings(settings: CurationSettings) -> None:
    """Parse every section of the merged settings; one :class:`ConfigError` lists every problem."""
    problems = []
    try:
        sections = {stage: settings.section(stage) for stage in STAGES}
    except (ValueError, FileNotFoundError) as exc:
        raise ConfigError(str(exc)) from None
    for stage, parse in _parsers().items():
        try:
            parse(sections[stage])
        except (ValueError, TypeError) as exc:
            problems.append(f"  - {exc}")
    if problems:
        source = settings.config_path or "the packaged defaults"
        raise ConfigError(f"invalid settings in {source}:\n" + "\n".join(problems))


SETTINGS_OF: dict[str, tuple[str, ...]] = {
    "samples": ("ingest",),
    "image_embeddings": ("encoder",),
    "labels": ("safety.categories", "safety.labels"),
    "safety_classifiers": ("safety.categories", "safety.classifier", "safety.labels"),
    "labeling_queue": ("safety.categories", "safety.classifier", "safety.active_learning"),
    "safety_thresholds": ("safety.categories", "safety.thresholds"),
    "safety_scores": ("safety.categories", "safety.thresholds"),
    "filtered_samples": ("safety.categories", "safety.thresholds", "safety.labels"),
    "kmeans_centroids": ("dedup.kmeans",),
    "cluster_assignments": ("dedup.kmeans", "dedup.buckets"),
    "duplicate_pairs": ("dedup.threshold", "dedup.open_clip_threshold", "dedup.search", "dedup.verify"),
    "dedup_groups": ("dedup.representative",),
    "deduplicated_samples": ("dedup.representative",),
    "dedup_recall": ("dedup.threshold", "dedup.open_clip_threshold", "dedup.search", "dedup.recall"),
    "demographic_ratios": ("bias.confidence", "bias.caption_groups", "bias.ratio_pairs", "bias.clip"),
    "overall_demographic_ratios": ("bias.confidence", "bias.caption_groups", "bias.ratio_pairs", "bias.clip"),
    "sample_weights": ("bias.caption_groups", "bias.reweighting"),
    "training_set": ("dedup.representative",),
    "regurgitation_audit": ("encoder", "audits.regurgitation"),
    "clip_bias_audit": ("audits.clip_bias",),
    "dataset_census": ("audits.census", "bias.caption_groups"),
    "image_attributes": ("audits.attributes",),
    "curation_report": ("audits.report",),
}
"""The settings that change each asset's output (``stage`` or ``stage.key``; ``encoder`` is the encoder
resource). Settings that only change speed or alerting (``embeddings.batch_size``, ``bias.drift``) are
left out on purpose: changing them must not make a billion embeddings stale."""


def settings_values(asset: str, sections: Mapping[str, Mapping[str, Any]], encoder: Mapping[str, Any]) -> dict:
    """The values of :data:`SETTINGS_OF` ``[asset]`` (a missing key reads as None)."""
    values = {}
    for path in SETTINGS_OF[asset]:
        if path == "encoder":
            values[path] = dict(encoder)
            continue
        stage, _, key = path.partition(".")
        values[path] = sections[stage].get(key) if key else sections[stage]
    return values


def settings_version(values: Mapping[str, Any]) -> str:
    """A short digest of settings values, stable across key order and processes."""
    canonical = json.dumps(values, sort_keys=True, default=str, separators=(",", ":"))
    return "settings-" + hashlib.sha256(canonical.encode()).hexdigest()[:12]


def with_settings_versions(defs: dg.Definitions, settings: CurationSettings,
                           encoder: Mapping[str, Any]) -> dg.Definitions:
    """``defs`` with each asset's ``code_version`` set from the settings that change its output, and those
    settings as definition metadata (``settings``), so the UI shows them and marks an asset stale ("code
    version changed") when one of them changes. An asset missing from :data:`SETTINGS_OF` is an error."""
    sections = settings.sections()

    def attach(spec: dg.AssetSpec) -> dg.AssetSpec:
        name = spec.key.to_user_string()
        if name not in SETTINGS_OF:
            raise KeyError(f"asset {name} has no entry in config.SETTINGS_OF: say which settings change it")
        values = settings_values(name, sections, encoder)
        return spec.replace_attributes(code_version=settings_version(values)).merge_attributes(
            metadata={"settings": dg.MetadataValue.json(values)})

    return dg.Definitions(
        assets=dg.map_asset_specs(attach, list(defs.assets or [])), asset_checks=defs.asset_checks,
        jobs=defs.jobs, schedules=defs.schedules, sensors=defs.sensors, resources=defs.resources)
