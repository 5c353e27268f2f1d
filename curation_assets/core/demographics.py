"""Demographic attributes of samples and the per-stage group statistics built from them.

Two attribute sources, each with a version string that is stored next to every number derived from it:

- :class:`CaptionMatcher`: word lists per group matched in captions, case-insensitively, on word
  boundaries, with regular plurals (``girl`` -> ``girls``, ``lady`` -> ``ladies``) and possessives
  (``woman's``, ``women's``, ``girls'``, curly apostrophes too). Irregular plurals are listed as words
  (``woman``, ``women``). ``man`` never matches inside ``woman``, ``human`` or ``manager``.
- :func:`clip_zero_shot`: zero-shot assignment of image embeddings to groups from text-prompt
  embeddings of an open_clip model (only meaningful with real weights).

A sample may belong to several groups (``"a man and a woman"``); shares are the fraction of the stage's
samples that mention a group, as in OpenAI's keyword table. :func:`group_stats` turns per-sample group
memberships plus optional weights into counts, weighted sums, shares with Wilson intervals and
between-group ratios with log-method intervals.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np
import polars as pl

from curation_assets.core import stats

MATCHER_RULES_VERSION = "1"  # bump when the matching rules below change: it changes every caption version

DEFAULT_GROUPS: dict[str, list[str]] = {
    "women": ["woman", "women", "girl", "lady", "female", "mother", "daughter", "wife", "sister"],
    "men": ["man", "men", "boy", "gentleman", "gentlemen", "male", "father", "son", "husband", "brother"],
}

_APOSTROPHES = "'\u2019"


def _plural_forms(word: str) -> set[str]:
    """The word and its regular English plural(s); irregular plurals must be listed separately."""
    forms = {word}
    if re.search(r"[^aeiou]y$", word):
        forms.add(word[:-1] + "ies")
    elif re.search(r"(s|x|z|ch|sh)$", word):
        forms.add(word + "es")
    else:
        forms.add(word + "s")
    return forms


def source_version(kind: str, spec: object) -> str:
    """A short, stable version id for an attribute source: ``<kind>:<12 hex of sha256(spec)>``."""
    blob = json.dumps(spec, sort_keys=True, separators=(",", ":"), default=str)
    return f"{kind}:{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


@dataclass
class CaptionMatcher:
    """Matches group keywords in captions. ``groups`` maps a group name to its words (case-insensitive;
    a word may be a phrase such as ``"young woman"``)."""

    groups: Mapping[str, Sequence[str]] = field(default_factory=lambda: dict(DEFAULT_GROUPS))

    def __post_init__(self) -> None:
        if not self.groups:
            raise ValueError("caption matcher: at least one group with words is needed")
        self.groups = {str(g): [str(w).strip().lower() for w in words] for g, words in self.groups.items()}
        for group, words in self.groups.items():
            if not words or any(not w for w in words):
                raise ValueError(f"caption matcher: group {group!r} needs non-empty words, got {words!r}")
        self._keyword_patterns: dict[str, re.Pattern] = {}
        self._group_patterns: dict[str, re.Pattern] = {}
        for group, words in self.groups.items():
            for word in words:
                self._keyword_patterns[word] = self._compile([word])
            self._group_patterns[group] = self._compile(words)

    @staticmethod
    def _compile(words: Iterable[str]) -> re.Pattern:
        alternatives = set()
        for word in words:
            for form in _plural_forms(word):
                alternatives.add(r"\s+".join(re.escape(part) for part in form.split()))
        body = "|".join(sorted(alternatives, key=len, reverse=True))
        # word boundaries that treat letters and digits as word characters but not '_' or apostrophes;
        # an optional possessive ('s, ’s, or a bare apostrophe after a plural) may follow
        return re.compile(
            rf"(?<![^\W_])(?:{body})(?:[{_APOSTROPHES}]s?)?(?![^\W_])", re.IGNORECASE | re.UNICODE
        )

    @property
    def version(self) -> str:
        return source_version("words", {"rules": MATCHER_RULES_VERSION, "groups": self.groups})

    @property
    def group_names(self) -> list[str]:
        return list(self.groups)

    @property
    def keywords(self) -> list[str]:
        return list(self._keyword_patterns)

    def groups_of(self, caption: str | None) -> list[str]:
        """The groups a caption mentions, in config order (empty for a missing caption)."""
        if not caption:
            return []
        return [g for g, pattern in self._group_patterns.items() if pattern.search(caption)]

    def keywords_of(self, caption: str | None) -> list[str]:
        if not caption:
            return []
        return [w for w, pattern in self._keyword_patterns.items() if pattern.search(caption)]

    def annotate(self, captions: pl.Series) -> pl.DataFrame:
        """One boolean column per group (``group``) and per keyword (``kw:<word>``) for a caption column."""
        texts = captions.fill_null("")
        columns = {g: texts.str.contains(p) for g, p in self._rust_patterns(self._group_patterns).items()}
        columns.update({f"kw:{w}": texts.str.contains(p) for w, p in
                        self._rust_patterns(self._keyword_patterns).items()})
        return pl.DataFrame(columns) if columns else pl.DataFrame()

    @staticmethod
    def _rust_patterns(patterns: Mapping[str, re.Pattern]) -> dict[str, str]:
        # polars' regex engine (Rust) has no look-behind: rewrite the boundary as an explicit alternative
        out = {}
        for name, pattern in patterns.items():
            core = pattern.pattern.removeprefix(r"(?<![^\W_])").removesuffix(r"(?![^\W_])")
            out[name] = rf"(?i)(?:^|[^\p{{L}}\p{{N}}]){core}(?:$|[^\p{{L}}\p{{N}}])"
        return out


def clip_zero_shot(image_embeddings: np.ndarray, prompt_embeddings: Mapping[str, np.ndarray],
                   neutral: str | None = None, logit_scale: float = 100.0, min_probability: float = 0.5
                   ) -> list[list[str]]:
    """Zero-shot group membership from L2-normalised image embeddings (n x d) and, per class, a matrix of
    L2-normalised prompt embeddings (averaged into one class vector, as in the CLIP paper). A sample joins
    the argmax class when its softmax probability is at least ``min_probability``; the ``neutral`` class
    (e.g. "a photo of an object") absorbs images without people and assigns no group."""
    names = list(prompt_embeddings)
    if not names:
        return [[] for _ in range(len(image_embeddings))]
    classes = []
    for name in names:
        mean = np.asarray(prompt_embeddings[name], dtype=np.float32).reshape(-1, image_embeddings.shape[1]).mean(0)
        classes.append(mean / max(np.linalg.norm(mean), 1e-12))
    logits = logit_scale * (np.asarray(image_embeddings, dtype=np.float32) @ np.stack(classes).T)
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    best = probs.argmax(axis=1)
    out: list[list[str]] = []
    for i, j in enumerate(best):
        name = names[j]
        out.append([] if name == neutral or probs[i, j] < min_probability else [name])
    return out


def group_stats(memberships: pl.DataFrame, groups: Sequence[str], weights: np.ndarray | None = None,
                confidence: float = 0.95, ratio_pairs: Sequence[tuple[str, str]] | None = None
                ) -> tuple[list[dict], list[dict]]:
    """Statistics of one set of samples.

    ``memberships`` holds one boolean column per group (one row per sample); ``weights`` (optional, one
    per row) makes every number weighted. Returns ``(group_rows, ratio_rows)``: per group n, count,
    weighted sums, share and its Wilson interval; per ordered pair (default: every pair in config order)
    the ratio of counts with a log-method interval. That interval treats the two counts as independent;
    samples in both groups make them positively correlated, which only shrinks the true variance of the
    log ratio, so the interval errs on the wide side.
    """
    n = memberships.height
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    if len(w) != n:
        raise ValueError(f"{len(w)} weights for {n} samples")
    w_total, w_sq_total = float(w.sum()), float((w * w).sum())
    group_rows, sums = [], {}
    for g in groups:
        mask = memberships[g].to_numpy().astype(bool) if g in memberships.columns else np.zeros(n, bool)
        s, s2 = float(w[mask].sum()), float((w[mask] ** 2).sum())
        sums[g] = (s, s2)
        ci = stats.weighted_wilson_interval(s, w_total, w_sq_total, confidence)
        group_rows.append({"group": g, "n": n, "count": int(mask.sum()), "weight_sum": s, "weight_sq_sum": s2,
                           "weight_total": w_total, "weight_sq_total": w_sq_total,
                           "share": ci.estimate, "share_low": ci.low, "share_high": ci.high})
    pairs = list(ratio_pairs) if ratio_pairs is not None else [
        (a, b) for i, a in enumerate(groups) for b in groups[i + 1:]]
    ratio_rows = []
    for a, b in pairs:
        (sa, sa2), (sb, sb2) = sums[a], sums[b]
        ci = stats.count_ratio_interval(sa, sb, sa2, sb2, confidence)
        ratio_rows.append({"numerator": a, "denominator": b, "ratio": ci.estimate,
                           "ratio_low": ci.low, "ratio_high": ci.high})
    return group_rows, ratio_rows


def relative_change(before: float, after: float) -> float:
    """``after / before - 1`` (nan when ``before`` is 0)."""
    return after / before - 1.0 if before > 0 else math.nan


# --- drift of one shard against a reference --------------------------------------------------------------

@dataclass
class DriftSettings:
    """How a shard is compared with its reference (see ``drift:`` in configs/bias.yaml)."""

    reference: str = "trailing"
    trailing_shards: int = 8
    pinned_shards: Sequence[str] = ()
    baseline_shards: int = 2
    alpha: float = 0.01
    band: tuple[float, float] = (0.8, 1.25)
    error_band: tuple[float, float] = (0.5, 2.0)
    min_reference_samples: int = 200

    def __post_init__(self) -> None:
        if self.reference not in ("trailing", "pinned"):
            raise ValueError(f"drift.reference must be 'trailing' or 'pinned', got {self.reference!r}")
        for name in ("band", "error_band"):
            low, high = getattr(self, name)
            if not 0 < low < 1 < high:
                raise ValueError(f"drift.{name} must be [low, high] with 0 < low < 1 < high, got {[low, high]}")
            setattr(self, name, (float(low), float(high)))
        if self.error_band[0] > self.band[0] or self.error_band[1] < self.band[1]:
            raise ValueError("drift.error_band must contain drift.band")
        if not 0 < self.alpha < 1:
            raise ValueError(f"drift.alpha must be in (0, 1), got {self.alpha}")
        if self.trailing_shards < 1 or self.baseline_shards < 1:
            raise ValueError("drift.trailing_shards and drift.baseline_shards must be >= 1")


@dataclass
class DriftVerdict:
    """The outcome for one shard. ``status``: ``alert`` (some group tripped both tests), ``ok``, ``reset``
    (no reference measured with this attribute-source version: the shard starts the new reference),
    ``baseline`` (the shard is part of the pinned baseline) or ``insufficient`` (reference too small)."""

    shard: str
    version: str
    status: str
    severity: str | None
    reference_shards: list[str]
    groups: list[dict]

    @property
    def alerting(self) -> bool:
        return self.status == "alert"


def compare_shares(current: Mapping[str, tuple[float, float]], reference: Mapping[str, tuple[float, float]],
                   settings: DriftSettings) -> list[dict]:
    """Per group: the two-proportion z-test of the shard's share against the reference share (at
    ``alpha / number of groups``) and the effect size ``share / reference share``. A group trips only when
    both the test and the band trip; ``severity`` is ERROR when it also leaves ``error_band``."""
    level = stats.bonferroni_level(settings.alpha, len(current))
    rows = []
    for group, (count, n) in current.items():
        ref_count, ref_n = reference.get(group, (0.0, 0.0))
        test = stats.two_proportion_ztest(count, n, ref_count, ref_n)
        share = count / n if n else math.nan
        ref_share = ref_count / ref_n if ref_n else math.nan
        if ref_share > 0:
            effect = share / ref_share
        else:
            effect = math.inf if share > 0 else 1.0
        significant = bool(test.p_value < level) if not math.isnan(test.p_value) else False
        outside = not (settings.band[0] <= effect <= settings.band[1])
        severe = not (settings.error_band[0] <= effect <= settings.error_band[1])
        tripped = significant and outside
        rows.append({"group": group, "count": count, "n": n, "share": share, "reference_count": ref_count,
                     "reference_n": ref_n, "reference_share": ref_share, "effect": effect, "z": test.statistic,
                     "p_value": test.p_value, "level": level, "significant": significant,
                     "outside_band": outside, "tripped": tripped,
                     "severity": ("ERROR" if severe else "WARN") if tripped else None})
    return rows


def select_reference(shard: str, version: str, available: Mapping[str, str], settings: DriftSettings,
                     exclude: Iterable[str] = ()) -> tuple[str, list[str]]:
    """Choose the reference shards for ``shard``. ``available`` maps every measured shard to the
    attribute-source version it was measured with; only shards of the same version qualify, so a new
    version starts a fresh reference. Returns ``(status, shards)`` with status ``compare``, ``reset``
    (nothing of this version to compare with) or ``baseline`` (the shard belongs to the pinned baseline)."""
    excluded = set(exclude) | {shard}
    same = sorted(s for s, v in available.items() if v == version)
    if settings.reference == "pinned":
        pinned = [s for s in settings.pinned_shards if available.get(s) == version]
        if not pinned:
            pinned = same[: settings.baseline_shards]
        if shard in pinned:
            return "baseline", []
        ref = [s for s in pinned if s not in excluded]
    else:
        ref = [s for s in same if s < shard and s not in excluded][-settings.trailing_shards:]
    return ("compare" if ref else "reset"), ref


def drift_verdict(shard: str, version: str, counts: Mapping[str, Mapping[str, tuple[float, float]]],
                  versions: Mapping[str, str], settings: DriftSettings, exclude: Iterable[str] = ()) -> DriftVerdict:
    """Judge one shard. ``counts[shard][group] = (count, n)`` for every measured shard; ``versions`` maps
    shards to their attribute-source version; ``exclude`` lists shards never to use as reference (those
    that alerted already)."""
    status, ref = select_reference(shard, version, versions, settings, exclude)
    if status != "compare":
        return DriftVerdict(shard, version, status, None, ref, [])
    pooled: dict[str, tuple[float, float]] = {}
    for s in ref:
        for group, (count, n) in counts[s].items():
            c0, n0 = pooled.get(group, (0.0, 0.0))
            pooled[group] = (c0 + count, n0 + n)
    if max((n for _, n in pooled.values()), default=0) < settings.min_reference_samples:
        return DriftVerdict(shard, version, "insufficient", None, ref, [])
    rows = compare_shares(counts[shard], pooled, settings)
    tripped = [r for r in rows if r["tripped"]]
    severity = ("ERROR" if any(r["severity"] == "ERROR" for r in tripped) else "WARN") if tripped else None
    return DriftVerdict(shard, version, "alert" if tripped else "ok", severity, ref, rows)


STAGES = ("raw", "filtered", "filtered_reweighted", "deduplicated", "training_set", "training_set_weighted")
"""The stages of the data at which the bias stage measures demographic ratios, in pipeline order."""


@dataclass
class ClipSettings:
    enabled: bool = True
    prompts: dict[str, list[str]] = field(default_factory=dict)
    neutral: Optional[str] = "none"
    min_probability: float = 0.5
    logit_scale: float = 100.0


@dataclass
class ReweightSettings:
    regularization: Optional[float] = None  # None / "auto": selected from regularization_grid
    regularization_grid: list[float] = field(default_factory=lambda: [1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2])
    selection: str = "balance"
    balance_clusters: int = 16
    max_weight: float = 10.0
    max_train_per_class: int = 50_000
    seed: int = 0


@dataclass
class BiasSettings:
    """The validated ``bias:`` section (defaults in configs/bias.yaml)."""

    confidence: float
    caption_groups: dict[str, list[str]]
    ratio_pairs: list[tuple[str, str]]
    clip: ClipSettings
    reweighting: ReweightSettings
    drift: DriftSettings
    drift_source: str
    drift_stage: str

    @classmethod
    def from_section(cls, section: Mapping[str, Any]) -> "BiasSettings":
        known = {"confidence", "caption_groups", "ratio_pairs", "clip", "reweighting", "drift"}
        unknown = sorted(set(section) - known)
        if unknown:
            raise ValueError(f"bias config: unknown keys {unknown}; known: {sorted(known)}")
        from curation_assets.core.validation import ConfigError, check_fields, check_value

        try:
            check_value("bias.confidence", section.get("confidence", 0.95), float)
            check_fields("bias.clip", ClipSettings, dict(section.get("clip") or {}))
            check_fields("bias.reweighting", ReweightSettings, {
                k: v for k, v in dict(section.get("reweighting") or {}).items() if not (k == "regularization" and v == "auto")})
            check_fields("bias.drift", DriftSettings, {k: v for k, v in dict(section.get("drift") or {}).items()
                                                             if k not in ("source", "stage")})
        except ConfigError as exc:
            raise ConfigError(f"bias config: {exc}") from None
        try:
            groups = {str(k): [str(w) for w in v] for k, v in dict(section.get("caption_groups") or {}).items()}
            CaptionMatcher(groups)  # validates the word lists
            pairs = [tuple(map(str, p)) for p in (section.get("ratio_pairs") or [])]
            for pair in pairs:
                if len(pair) != 2 or any(g not in groups for g in pair):
                    raise ValueError(f"ratio pair {list(pair)} must name two groups of caption_groups {list(groups)}")
            if not pairs:
                names = list(groups)
                pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
            clip = ClipSettings(**dict(section.get("clip") or {}))
            rw_section = dict(section.get("reweighting") or {})
            if rw_section.get("regularization") in ("auto", None):
                rw_section["regularization"] = None
            reweighting = ReweightSettings(**rw_section)
            if reweighting.regularization is not None:
                reweighting.regularization = float(reweighting.regularization)
            reweighting.regularization_grid = [float(v) for v in reweighting.regularization_grid]
            if (reweighting.regularization is not None and reweighting.regularization <= 0) or reweighting.max_weight <= 0:
                raise ValueError("reweighting.regularization and reweighting.max_weight must be positive")
            if not reweighting.regularization_grid or min(reweighting.regularization_grid) <= 0:
                raise ValueError("reweighting.regularization_grid must be a non-empty list of positive penalties")
            if reweighting.selection not in ("balance", "log_loss"):
                raise ValueError(f"reweighting.selection must be balance or log_loss, got {reweighting.selection!r}")
            if int(reweighting.balance_clusters) < 2:
                raise ValueError("reweighting.balance_clusters must be at least 2")
            drift_section = dict(section.get("drift") or {})
            source = drift_section.pop("source", "caption")
            stage = drift_section.pop("stage", "raw")
            if source not in ("caption", "clip", "image"):
                raise ValueError(f"drift.source must be caption, clip or image, got {source!r}")
            if stage not in STAGES:
                raise ValueError(f"drift.stage must be one of {STAGES}, got {stage!r}")
            drift = DriftSettings(**drift_section)
            confidence = float(section.get("confidence", 0.95))
            if not 0 < confidence < 1:
                raise ValueError(f"confidence must be in (0, 1), got {confidence}")
        except TypeError as exc:  # unknown keys inside a sub-section
            raise ValueError(f"bias config: {exc}") from exc
        return cls(confidence, groups, pairs, clip, reweighting, drift, source, stage)

    @property
    def matcher(self) -> CaptionMatcher:
        return CaptionMatcher(self.caption_groups)
