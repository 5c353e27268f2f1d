"""Every stage's settings validated at once, before any step runs.

The code location (``definitions.py``) and ``curate run`` call :func:`validate_settings` when they load, so
a misspelt key or a value of the wrong type is one clear message naming ``section.key`` instead of a failure
deep inside the first step that reads it.
"""

from __future__ import annotations

from typing import Any, Callable

from curation_assets.core.validation import ConfigError
from resources.settings import STAGES, CurationSettings


def _parsers() -> dict[str, Callable[[dict], Any]]:
    from curation_assets.audits import AuditsConfig
    from curation_assets.bias import BiasSettings
    from curation_assets.core.dedup import DedupSettings
    from curation_assets.core.safety import parse_config
    from curation_assets.core.shards import IngestLimits
    from curation_assets.embeddings import EmbeddingSettings

    return {"ingest": IngestLimits.from_config, "embeddings": EmbeddingSettings.from_section,
            "safety": parse_config, "bias": BiasSettings.from_section, "dedup": DedupSettings.from_section,
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
