"""Safety classifiers: validated category spec, per-category linear probes on embeddings, cross-validation,
and a pickle-free artefact format.

A classifier is a logistic regression on standardised embeddings. The standardisation is folded into the
weights, so scoring is one matrix product ``X @ W + b`` for all categories at once, followed by Platt
calibration fitted on the out-of-fold margins of a stratified k-fold cross-validation. The out-of-fold
(held-out) calibrated scores are kept with the model: thresholds and active learning are computed from them,
never from scores of the model on its own training labels.

Artefacts are ``<dir>/<category>.npz`` (float arrays only, loaded with ``allow_pickle=False``) plus a JSON
manifest, so a swapped file can at worst hold wrong numbers, never code.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from curation_assets.core.location import as_path, create_exclusive, local, write_atomic

ARTIFACT_FORMAT = "curation-linear-probe/1"


# --------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class Category:
    """One content category: labellers read ``definition``; the filter aims at ``target_recall``. ``prior``: a
    pretrained scorer (:data:`PRIORS`) that seeds the first labelling queue and is recorded beside the trained
    classifier in ``safety_scores``; it filters on its own only when ``prior_threshold`` is set."""

    name: str
    definition: str
    target_recall: float = 0.99
    min_positives: int | None = None
    prior: str | None = None
    prior_threshold: float | None = None

    @property
    def required_positives(self) -> int:
        """Labelled positives needed before a held-out recall can resolve the target (a single miss must
        move recall below it): ``min_positives`` or ceil(1 / (1 - target_recall))."""
        if self.min_positives is not None:
            return self.min_positives
        return int(math.ceil(1.0 / (1.0 - self.target_recall) - 1e-9))


@dataclass(frozen=True)
class ClassifierConfig:
    kind: str = "logistic"
    C: float = 1.0
    class_weight: str = "balanced"
    cv_folds: int = 5
    seed: int = 0


@dataclass(frozen=True)
class ActiveLearningConfig:
    batch_size: int = 100
    mix: Mapping[str, float] = field(default_factory=lambda: {"flagged": 0.4, "missed_neighbors": 0.3, "uncertain": 0.3})
    neighbors_per_positive: int = 5
    max_missed_positives: int = 50
    missed_below: float = 0.5
    near_duplicate_cosine: float = 0.95
    candidate_oversample: int = 5
    seed: int = 0

    def quotas(self, batch_size: int | None = None) -> dict[str, int]:
        """Rows per procedure for a batch (largest-remainder rounding, so they sum to the batch size)."""
        n = self.batch_size if batch_size is None else batch_size
        total = sum(self.mix.values())
        raw = {k: n * v / total for k, v in self.mix.items()}
        out = {k: int(math.floor(v)) for k, v in raw.items()}
        for k in sorted(raw, key=lambda k: raw[k] - out[k], reverse=True)[: n - sum(out.values())]:
            out[k] += 1
        return out


@dataclass(frozen=True)
class SafetyConfig:
    categories: tuple[Category, ...]
    classifier: ClassifierConfig = ClassifierConfig()
    confidence: float = 0.95
    random_sources: tuple[str, ...] = ("seed", "random")
    trust_negative_labels: bool = False
    active_learning: ActiveLearningConfig = ActiveLearningConfig()

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.categories]

    @classmethod
    def from_section(cls, section: Mapping[str, Any]) -> "SafetyConfig":
        """The validated ``safety`` section; :class:`SafetyConfigError` names the key at fault."""
        return _parse(section)

    def category(self, name: str) -> Category:
        for c in self.categories:
            if c.name == name:
                return c
        raise KeyError(f"unknown safety category {name!r}; configured: {self.names}")


PROCEDURES = ("flagged", "missed_neighbors", "uncertain")

PRIORS = {"open_nsfw": "nsfw"}
"""Pretrained scorers a category can take as its prior: name -> the ``image_attributes`` column it reads."""


class SafetyConfigError(ValueError):
    """The ``safety`` config section is invalid; the message says which key and why."""


def _section(data: Mapping[str, Any], key: str, allowed: set[str]) -> dict[str, Any]:
    value = data.get(key) or {}
    if not isinstance(value, Mapping):
        raise SafetyConfigError(f"safety.{key} must be a mapping, got {type(value).__name__}")
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise SafetyConfigError(f"safety.{key}: unknown keys {unknown}; allowed: {sorted(allowed)}")
    return dict(value)


def _number(where: str, value: Any, kind: type, low: float | None = None, high: float | None = None,
            low_open: bool = False, high_open: bool = False) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not float(value).is_integer()):
        raise SafetyConfigError(f"safety.{where} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    value = kind(value)
    if low is not None and (value < low or (low_open and value == low)):
        raise SafetyConfigError(f"safety.{where} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and (value > high or (high_open and value == high)):
        raise SafetyConfigError(f"safety.{where} must be {'<' if high_open else '<='} {high}, got {value}")
    return value


def _parse(section: Mapping[str, Any]) -> SafetyConfig:
    """Validate the merged ``safety`` section (defaults + user file) into a :class:`SafetyConfig`.

    Raises :class:`SafetyConfigError` naming the offending key on anything malformed: unknown keys, missing
    category names or definitions, duplicate categories, recall targets outside (0, 1), a mix without
    positive shares, and so on.
    """
    allowed_top = {"categories", "classifier", "thresholds", "labels", "active_learning"}
    unknown = sorted(set(section) - allowed_top)
    if unknown:
        raise SafetyConfigError(f"safety: unknown keys {unknown}; allowed: {sorted(allowed_top)}")

    raw_categories = section.get("categories")
    if not isinstance(raw_categories, list) or not raw_categories:
        raise SafetyConfigError("safety.categories must be a non-empty list of {name, definition, target_recall}")
    categories: list[Category] = []
    for i, item in enumerate(raw_categories):
        where = f"categories[{i}]"
        if not isinstance(item, Mapping):
            raise SafetyConfigError(f"safety.{where} must be a mapping")
        extra = sorted(set(item) - {"name", "definition", "target_recall", "min_positives", "prior", "prior_threshold"})
        if extra:
            raise SafetyConfigError(f"safety.{where}: unknown keys {extra}")
        name = item.get("name")
        if not isinstance(name, str) or not name.strip() or not name.replace("_", "").replace("-", "").isalnum():
            raise SafetyConfigError(f"safety.{where}.name must be a word of letters, digits, '_' or '-', got {name!r}")
        definition = item.get("definition")
        if not isinstance(definition, str) or not definition.strip():
            raise SafetyConfigError(f"safety.{where} ({name}): a written 'definition' for labellers is required")
        target = _number(f"{where}.target_recall", item.get("target_recall", 0.99), float, 0.0, 1.0, True, True)
        min_pos = item.get("min_positives")
        if min_pos is not None:
            min_pos = _number(f"{where}.min_positives", min_pos, int, 1)
        prior = item.get("prior")
        if prior not in (None, *PRIORS):
            raise SafetyConfigError(f"safety.{where}.prior: one of {list(PRIORS)} or absent, got {prior!r}")
        prior_threshold = item.get("prior_threshold")
        if prior_threshold is not None:
            if prior is None:
                raise SafetyConfigError(f"safety.{where}.prior_threshold needs a prior")
            prior_threshold = _number(f"{where}.prior_threshold", prior_threshold, float, 0.0, 1.0)
        categories.append(Category(name, " ".join(definition.split()), target, min_pos, prior, prior_threshold))
    names = [c.name for c in categories]
    if len(set(names)) != len(names):
        raise SafetyConfigError(f"safety.categories: duplicate names in {names}")

    clf = _section(section, "classifier", {"kind", "C", "class_weight", "cv_folds", "seed"})
    if clf.get("kind", "logistic") != "logistic":
        raise SafetyConfigError(f"safety.classifier.kind: only 'logistic' is implemented, got {clf['kind']!r}")
    if clf.get("class_weight", "balanced") not in ("balanced", "none"):
        raise SafetyConfigError("safety.classifier.class_weight must be 'balanced' or 'none'")
    classifier = ClassifierConfig(
        kind="logistic",
        C=_number("classifier.C", clf.get("C", 1.0), float, 0.0, low_open=True),
        class_weight=clf.get("class_weight", "balanced"),
        cv_folds=_number("classifier.cv_folds", clf.get("cv_folds", 5), int, 2),
        seed=_number("classifier.seed", clf.get("seed", 0), int),
    )

    thr = _section(section, "thresholds", {"confidence"})
    confidence = _number("thresholds.confidence", thr.get("confidence", 0.95), float, 0.0, 1.0, True, True)

    lab = _section(section, "labels", {"random_sources", "trust_negative_labels"})
    random_sources = lab.get("random_sources", ["seed", "random"])
    if not isinstance(random_sources, list) or not all(isinstance(s, str) for s in random_sources):
        raise SafetyConfigError("safety.labels.random_sources must be a list of source names")
    trust = lab.get("trust_negative_labels", False)
    if not isinstance(trust, bool):
        raise SafetyConfigError("safety.labels.trust_negative_labels must be true or false")

    al = _section(section, "active_learning", {"batch_size", "mix", "neighbors_per_positive", "max_missed_positives",
                                               "missed_below", "near_duplicate_cosine", "candidate_oversample", "seed"})
    mix = al.get("mix", {"flagged": 0.4, "missed_neighbors": 0.3, "uncertain": 0.3})
    if not isinstance(mix, Mapping) or not mix:
        raise SafetyConfigError(f"safety.active_learning.mix must map procedures {list(PROCEDURES)} to shares")
    bad = sorted(set(mix) - set(PROCEDURES))
    if bad:
        raise SafetyConfigError(f"safety.active_learning.mix: unknown procedures {bad}; known: {list(PROCEDURES)}")
    mix = {k: _number(f"active_learning.mix.{k}", v, float, 0.0) for k, v in mix.items()}
    if sum(mix.values()) <= 0:
        raise SafetyConfigError("safety.active_learning.mix: at least one share must be positive")
    active = ActiveLearningConfig(
        batch_size=_number("active_learning.batch_size", al.get("batch_size", 100), int, 1),
        mix=mix,
        neighbors_per_positive=_number("active_learning.neighbors_per_positive", al.get("neighbors_per_positive", 5), int, 1),
        max_missed_positives=_number("active_learning.max_missed_positives", al.get("max_missed_positives", 50), int, 1),
        missed_below=_number("active_learning.missed_below", al.get("missed_below", 0.5), float, 0.0, 1.0),
        near_duplicate_cosine=_number("active_learning.near_duplicate_cosine", al.get("near_duplicate_cosine", 0.95),
                                      float, -1.0, 1.0),
        candidate_oversample=_number("active_learning.candidate_oversample", al.get("candidate_oversample", 5), int, 1),
        seed=_number("active_learning.seed", al.get("seed", 0), int),
    )

    return SafetyConfig(tuple(categories), classifier, confidence, tuple(random_sources), trust, active)


# ----------------------------------------------------------------------------------------- classifier


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(z, dtype=np.float64)))


@dataclass
class LinearProbe:
    """A calibrated linear classifier: ``p = sigmoid(a * (x @ weight + bias) + b)``.

    ``weight``/``bias`` already include the standardisation (kept in ``scaler_mean``/``scaler_scale`` for
    provenance); ``platt_a``/``platt_b`` map raw margins to probabilities calibrated on held-out folds.
    """

    category: str
    weight: np.ndarray
    bias: float
    platt_a: float
    platt_b: float
    scaler_mean: np.ndarray
    scaler_scale: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.weight.shape[0])

    def margin(self, X: np.ndarray) -> np.ndarray:
        return np.asarray(X, dtype=np.float32) @ self.weight.astype(np.float32) + np.float32(self.bias)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return sigmoid(self.platt_a * self.margin(X) + self.platt_b)

    def save(self, directory: str | Path) -> Path:
        path = as_path(directory) / f"{self.category}.npz"
        buffer = io.BytesIO()
        np.savez(buffer, weight=self.weight.astype(np.float64), bias=np.float64(self.bias),
                 platt=np.array([self.platt_a, self.platt_b], dtype=np.float64),
                 scaler_mean=self.scaler_mean.astype(np.float64), scaler_scale=self.scaler_scale.astype(np.float64))
        write_atomic(path, buffer.getvalue())
        return path

    @classmethod
    def load(cls, path: str | Path, category: str | None = None) -> "LinearProbe":
        path = as_path(path)
        with np.load(io.BytesIO(path.read_bytes()), allow_pickle=False) as z:
            expected = {"weight", "bias", "platt", "scaler_mean", "scaler_scale"}
            if set(z.files) != expected:
                raise ValueError(f"{path}: not a linear-probe artefact (arrays {sorted(z.files)})")
            weight = np.asarray(z["weight"], dtype=np.float64)
            platt = np.asarray(z["platt"], dtype=np.float64)
            probe = cls(category or path.stem, weight, float(z["bias"]), float(platt[0]), float(platt[1]),
                        np.asarray(z["scaler_mean"], np.float64), np.asarray(z["scaler_scale"], np.float64))
        if weight.ndim != 1 or probe.scaler_mean.shape != weight.shape or not np.all(np.isfinite(weight)):
            raise ValueError(f"{path}: malformed weights")
        return probe


class ProbeBank:
    """Several probes of the same dimension scored together: one ``X @ W`` for all categories."""

    def __init__(self, probes: Sequence[LinearProbe]):
        if not probes:
            raise ValueError("no classifiers to score with")
        dims = {p.dim for p in probes}
        if len(dims) != 1:
            raise ValueError(f"classifiers disagree on the embedding dimension: {dims}")
        self.categories = [p.category for p in probes]
        # calibration folded into the weights: p = sigmoid(x @ (a w) + (a b + c))
        a = np.array([p.platt_a for p in probes], dtype=np.float64)
        self.W = np.ascontiguousarray(np.stack([p.weight for p in probes], axis=1) * a, dtype=np.float32)
        self.b = (a * np.array([p.bias for p in probes]) + np.array([p.platt_b for p in probes])).astype(np.float32)

    @property
    def dim(self) -> int:
        return int(self.W.shape[0])

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """n x categories calibrated probabilities."""
        X = np.ascontiguousarray(X, dtype=np.float32)
        if X.ndim != 2 or (len(X) and X.shape[1] != self.dim):
            raise ValueError(f"embeddings of shape {X.shape} do not match classifiers of dimension {self.dim}")
        z = np.empty((len(X), self.W.shape[1]), dtype=np.float32)
        for j in range(self.W.shape[1]):  # one matrix-vector product per category beats a skinny GEMM here
            z[:, j] = X @ self.W[:, j]
        z += self.b
        z *= 0.5
        np.tanh(z, out=z)
        z += 1.0
        z *= 0.5
        return z


@dataclass
class CrossValidation:
    """Held-out evaluation of one category: out-of-fold calibrated scores in the order of the training rows."""

    oof_scores: np.ndarray
    labels: np.ndarray
    folds: int
    auc: float
    average_precision: float


def _fit_logistic(X: np.ndarray, y: np.ndarray, cfg: ClassifierConfig):
    from sklearn.linear_model import LogisticRegression

    mean = X.mean(axis=0)
    scale = X.std(axis=0)
    scale[scale < 1e-8] = 1.0
    model = LogisticRegression(C=cfg.C, class_weight=None if cfg.class_weight == "none" else "balanced",
                               max_iter=2000, tol=1e-4)
    model.fit((X - mean) / scale, y)
    w = model.coef_[0] / scale
    b = float(model.intercept_[0] - np.dot(model.coef_[0], mean / scale))
    return w, b, mean, scale


def _fit_platt(margins: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Platt scaling with Platt's smoothed targets, fitted by Newton steps on the log-loss."""
    n_pos, n_neg = int(y.sum()), int(len(y) - y.sum())
    t = np.where(y == 1, (n_pos + 1.0) / (n_pos + 2.0), 1.0 / (n_neg + 2.0))
    m = margins.astype(np.float64)
    a, b = 1.0, 0.0
    for _ in range(100):
        p = sigmoid(a * m + b)
        g = np.array([np.sum((p - t) * m), np.sum(p - t)])
        w = np.maximum(p * (1 - p), 1e-12)
        H = np.array([[np.sum(w * m * m), np.sum(w * m)], [np.sum(w * m), np.sum(w)]]) + 1e-9 * np.eye(2)
        step = np.linalg.solve(H, g)
        a, b = a - step[0], b - step[1]
        if np.max(np.abs(step)) < 1e-10:
            break
    if not (np.isfinite(a) and np.isfinite(b)) or a <= 0:
        return 1.0, 0.0  # degenerate (perfectly separated folds): keep the raw logistic scale
    return float(a), float(b)


def train_probe(X: np.ndarray, y: np.ndarray, category: str, cfg: ClassifierConfig) -> tuple[LinearProbe, CrossValidation]:
    """Fit one category's probe on labelled embeddings and cross-validate it.

    Stratified k-fold (k reduced to the number of positives or negatives when either is scarcer) gives an
    out-of-fold margin for every labelled row; Platt scaling is fitted on those margins and applied both to
    them (the held-out scores thresholds are chosen on) and to the final model fitted on all rows.
    """
    from sklearn.metrics import average_precision_score, roc_auc_score
    from sklearn.model_selection import StratifiedKFold

    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    n_pos, n_neg = int(y.sum()), int(len(y) - y.sum())
    if n_pos < 2 or n_neg < 2:
        raise ValueError(f"category {category!r}: need at least 2 positive and 2 negative labels, have "
                         f"{n_pos} positive and {n_neg} negative")
    folds = min(cfg.cv_folds, n_pos, n_neg)
    oof_margin = np.zeros(len(y))
    for train, test in StratifiedKFold(folds, shuffle=True, random_state=cfg.seed).split(X, y):
        w, b, _, _ = _fit_logistic(X[train], y[train], cfg)
        oof_margin[test] = X[test] @ w + b
    a, c = _fit_platt(oof_margin, y)
    oof = sigmoid(a * oof_margin + c)
    w, b, mean, scale = _fit_logistic(X, y, cfg)
    probe = LinearProbe(category, w, b, a, c, mean, scale,
                        info={"n_positive": n_pos, "n_negative": n_neg, "folds": folds, "C": cfg.C})
    cv = CrossValidation(oof, y, folds, float(roc_auc_score(y, oof)), float(average_precision_score(y, oof)))
    return probe, cv


def save_bank(directory: str | Path, probes: Sequence[LinearProbe], manifest: Mapping[str, Any]) -> Path:
    """Write every probe and ``manifest.json`` (format, categories, anything the caller adds)."""
    directory = as_path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for p in probes:
        p.save(directory)
    body = {"format": ARTIFACT_FORMAT, "categories": [p.category for p in probes],
            "dim": probes[0].dim if probes else None,
            "probes": {p.category: p.info for p in probes}, **dict(manifest)}
    # the manifest is what makes a version complete: written last
    write_atomic(directory / "manifest.json", json.dumps(body, indent=2, default=_json_default).encode())
    return directory


def load_bank(directory: str | Path, categories: Sequence[str] | None = None) -> tuple[list[LinearProbe], dict]:
    """Probes and manifest of one artefact version; only ``.npz`` arrays and JSON are read."""
    directory = as_path(directory)
    manifest = json.loads((directory / "manifest.json").read_text())
    if manifest.get("format") != ARTIFACT_FORMAT:
        raise ValueError(f"{directory}: unknown artefact format {manifest.get('format')!r}")
    wanted = list(categories) if categories is not None else manifest["categories"]
    missing = [c for c in wanted if c not in manifest["categories"]]
    if missing:
        raise ValueError(f"{directory}: no classifier for categories {missing}; has {manifest['categories']}")
    probes = [LinearProbe.load(directory / f"{c}.npz", c) for c in wanted]
    for p in probes:
        p.info = manifest.get("probes", {}).get(p.category, {})
    return probes, manifest


def _json_default(value: Any):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def next_version(root: str | Path) -> tuple[int, Path]:
    """Take the next free ``v0001``-style version directory under ``root``: created here with an exclusive
    ``mkdir`` (on an object store, an exclusive put of ``v0001/.claimed``), so two trainings at once never get
    the same version."""
    root = as_path(root)
    root.mkdir(parents=True, exist_ok=True)
    existing = [int(p.name[1:]) for p in root.glob("v[0-9]*") if p.name[1:].isdigit()]
    version = max(existing, default=0) + 1
    while True:
        directory = root / f"v{version:04d}"
        if local(directory):
            try:
                directory.mkdir()
                return version, directory
            except FileExistsError:
                pass
        elif create_exclusive(directory / ".claimed"):
            return version, directory
        version += 1


def publish_latest(root: str | Path, version: str) -> None:
    """Point ``LATEST`` at ``version`` (write a temporary file, then rename: readers never see half a name)."""
    write_atomic(as_path(root) / "LATEST", version.encode())


def latest_version(root: str | Path) -> Path | None:
    root = as_path(root)
    pointer = root / "LATEST"
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if (candidate / "manifest.json").is_file():
            return candidate
    versions = sorted((p for p in root.glob("v[0-9]*") if (p / "manifest.json").is_file()),
                      key=lambda p: p.name) if root.exists() else []
    return versions[-1] if versions else None
