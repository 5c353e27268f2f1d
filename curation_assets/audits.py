"""The audits stage: what reviewers see before a model is trained on the curated data.

- ``regurgitation_audit``: nearest training images of a set of generated images; flagged copies, the
  regurgitation rate against the full and the deduplicated set, and an HTML page of the matches.
- ``clip_bias_audit``: CLIP zero-shot misclassification of faces by race x gender group, one partition per
  open_clip checkpoint (Birhane et al.'s protocol).
- ``dataset_census``: counts, sizes, caption lengths, safety scores, duplicate rate, caption demographics,
  face counts, per shard and overall.
This module holds their settings (the ``audits`` section) and the page names; each asset is in the module
named after it (``regurgitation_audit.py``, ``clip_bias_audit.py``, ``dataset_census.py``). The curation
report that ties every stage together lives in ``report.py``.

Every asset reads its upstream tables defensively: a stage that has not run shows as "stage not run".
"""


from dataclasses import dataclass, field, fields
from typing import Any

from curation_assets.core.validation import check_fields
from resources.settings import CurationSettings

REGURGITATION_PAGE = "regurgitation.html"
CLIP_BIAS_PAGE = "clip_bias.html"
CENSUS_PAGE = "census.html"
NOT_CONFIGURED = "not configured"
UNCONFIGURED_KEY = "none"

# --------------------------------------------------------------------------- configuration


def _check_keys(where: str, section: dict, known: set[str]) -> None:
    unknown = set(section) - known
    if unknown:
        raise ValueError(f"audits config {where}: unknown keys {sorted(unknown)}; known: {sorted(known)}")


@dataclass
class RegurgitationConfig:
    generated: str | None = None
    k: int = 20
    threshold: float | None = None
    thresholds: dict = field(default_factory=dict)
    fallback_threshold: float = 0.95
    colour_shifts: list = field(default_factory=lambda: [0])
    deduplicated: bool = True
    confidence: float = 0.95
    index: dict = field(default_factory=dict)
    verify: dict = field(default_factory=dict)
    max_shown: int = 200
    thumbnail_px: int = 160


@dataclass
class ClipBiasConfig:
    probe_dir: str | None = None
    probe_csv: str | None = None
    races: list[str] | None = None
    genders: list[str] | None = None
    race_aliases: dict = field(default_factory=dict)
    gender_aliases: dict = field(default_factory=dict)
    labels: list[str] = field(default_factory=list)
    templates: list[str] = field(default_factory=list)
    human_labels: list[str] = field(default_factory=list)
    temperature: float = 100.0
    batch_size: int = 64
    device: str = "auto"
    confidence: float = 0.95
    checkpoints: list[dict] = field(default_factory=list)
    baseline: str | None = None


@dataclass
class CensusConfig:
    face_sample_per_shard: int = 200
    face_max_side: int = 512
    seed: int = 0
    group_by: str = "caption_groups"


@dataclass
class AttributesConfig:
    """``image_attributes``: which images the face and NSFW models see, per shard."""

    enabled: bool = True
    sample_per_shard: int = 1000
    max_side: int = 640
    threads: int = 2
    seed: int = 0


@dataclass
class AuditsConfig:
    """The validated ``audits`` section (see ``curation_assets/configs/audits.yaml``)."""

    regurgitation: RegurgitationConfig
    clip_bias: ClipBiasConfig
    census: CensusConfig
    report: dict
    attributes: AttributesConfig = field(default_factory=AttributesConfig)

    @classmethod
    def from_section(cls, section: dict[str, Any]) -> "AuditsConfig":
        _check_keys("", section, {"regurgitation", "clip_bias", "census", "report", "attributes"})
        parts = {}
        for name, kind in (("regurgitation", RegurgitationConfig), ("clip_bias", ClipBiasConfig), ("census", CensusConfig),
                           ("attributes", AttributesConfig)):
            sub = section.get(name) or {}
            _check_keys(name, sub, {f.name for f in fields(kind)})
            check_fields(f"audits.{name}", kind, sub)
            parts[name] = kind(**sub)
        cfg = cls(report=section.get("report") or {}, **parts)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        from curation_assets.core.clip_bias import Checkpoint, prompts

        a = self.attributes
        if a.sample_per_shard < 0 or a.max_side < 64 or a.threads < 1:
            raise ValueError("audits config attributes: need sample_per_shard >= 0, max_side >= 64, threads >= 1")
        r = self.regurgitation
        if r.k < 1:
            raise ValueError("audits config regurgitation.k must be >= 1")
        values = {"threshold": r.threshold, "fallback_threshold": r.fallback_threshold}
        if not isinstance(r.thresholds, dict):
            raise ValueError("audits config regurgitation.thresholds maps encoder names to cosines")
        values.update({f"thresholds[{k}]": v for k, v in r.thresholds.items()})
        for name, value in values.items():
            if value is not None and not -1.0 <= float(value) <= 1.0:
                raise ValueError(f"audits config regurgitation.{name} is a cosine in [-1, 1], got {value}")
        if not isinstance(r.colour_shifts, (list, tuple)) or not all(isinstance(v, int) and -255 <= v <= 255 for v in r.colour_shifts):
            raise ValueError(f"audits config regurgitation.colour_shifts is a list of integer offsets, got {r.colour_shifts!r}")
        self.index_config()
        self.verify_config()
        c = self.clip_bias
        if not c.labels or not c.templates:
            raise ValueError("audits config clip_bias.labels and clip_bias.templates must not be empty")
        prompts(c.labels, c.templates)
        missing = set(c.human_labels) - set(c.labels)
        if missing:
            raise ValueError(f"audits config clip_bias.human_labels {sorted(missing)} are not in clip_bias.labels")
        if c.temperature <= 0:
            raise ValueError("audits config clip_bias.temperature must be > 0")
        names = [Checkpoint.from_config(e).name for e in c.checkpoints]
        if len(set(names)) != len(names):
            raise ValueError(f"audits config clip_bias.checkpoints: names must be unique, got {names}")
        if c.baseline is not None and c.baseline not in names:
            raise ValueError(f"audits config clip_bias.baseline {c.baseline!r} is not a configured checkpoint {names}")

    def index_config(self):
        from curation_assets.core.regurgitation import IndexConfig

        known = {f.name for f in fields(IndexConfig)}
        _check_keys("regurgitation.index", self.regurgitation.index, known)
        return IndexConfig(**self.regurgitation.index)

    def verify_config(self):
        from curation_assets.core.regurgitation import ContainmentSettings

        _check_keys("regurgitation.verify", self.regurgitation.verify, {f.name for f in fields(ContainmentSettings)})
        return ContainmentSettings(**self.regurgitation.verify)

    def checkpoints(self):
        from curation_assets.core.clip_bias import Checkpoint

        return [Checkpoint.from_config(e) for e in self.clip_bias.checkpoints]


def audits_config(settings: CurationSettings) -> AuditsConfig:
    return AuditsConfig.from_section(settings.section("audits"))


def checkpoint_names(cfg: AuditsConfig) -> list[str]:
    """Partition keys of ``clip_bias_audit``: the configured checkpoint names (the code location reads them
    when it loads; reload it after editing the list). With no checkpoints configured the single key ``none``
    materialises a "not configured" result."""
    return list(dict.fromkeys(c.name for c in cfg.checkpoints())) or [UNCONFIGURED_KEY]
