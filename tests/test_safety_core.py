"""The safety stage's algorithms on constructed data: config, classifiers, thresholds, labels, active learning."""

from __future__ import annotations

import datetime as dt
import math

import numpy as np
import polars as pl
import pytest

from curation_assets.core import labels as L
from curation_assets.core.active_learning import QueueBuilder, missed_positives
from curation_assets.core.safety import (
    ClassifierConfig,
    LinearProbe,
    ProbeBank,
    SafetyConfig,
    SafetyConfigError,
    load_bank,
    save_bank,
    train_probe,
)
from curation_assets.core.stats import wilson_interval
from curation_assets.core.thresholds import positives_needed_for_bound, precision_at_recall, recall_threshold
from resources.settings import default_section


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def blobs(n_pos: int, n_neg: int, dim: int = 32, shift: float = 1.2, seed: int = 0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n_pos + n_neg, dim))
    X[:n_pos, :4] += shift
    y = np.r_[np.ones(n_pos, int), np.zeros(n_neg, int)]
    return unit(X), y


# ------------------------------------------------------------------------------------------ config


def test_default_config_is_valid():
    cfg = SafetyConfig.from_section(default_section("safety"))
    assert cfg.names == ["violence", "sexual"]
    assert all(c.target_recall == 0.99 and c.definition for c in cfg.categories)
    assert cfg.category("violence").required_positives == 100
    quotas = cfg.active_learning.quotas()
    assert sum(quotas.values()) == cfg.active_learning.batch_size
    assert cfg.active_learning.quotas(7) == {"flagged": 3, "missed_neighbors": 2, "uncertain": 2}


@pytest.mark.parametrize("patch, message", [
    ({"categories": []}, "non-empty list"),
    ({"categories": [{"name": "violence"}]}, "definition"),
    ({"categories": [{"name": "a", "definition": "x", "target_recall": 1.0}]}, "target_recall"),
    ({"categories": [{"name": "a", "definition": "x"}, {"name": "a", "definition": "y"}]}, "duplicate"),
    ({"categories": [{"name": "a b", "definition": "x"}]}, "name"),
    ({"colour": 1}, "unknown keys"),
    ({"active_learning": {"mix": {"flagged": 0, "uncertain": 0}}}, "positive"),
    ({"active_learning": {"mix": {"random": 1}}}, "unknown procedures"),
    ({"active_learning": {"batch_size": 0}}, "batch_size"),
    ({"classifier": {"kind": "svm"}}, "logistic"),
])
def test_bad_config_names_the_key(patch, message):
    section = {**default_section("safety"), **patch}
    with pytest.raises(SafetyConfigError, match=message):
        SafetyConfig.from_section(section)


# -------------------------------------------------------------------------------------- classifier


def test_probe_learns_calibrates_and_round_trips(tmp_path):
    X, y = blobs(120, 880, shift=2.0)
    probe, cv = train_probe(X, y, "violence", ClassifierConfig(cv_folds=5))
    assert cv.folds == 5 and len(cv.oof_scores) == len(y)
    assert cv.auc > 0.95
    # calibrated on held-out margins: mean score ~ base rate, positives score far above negatives
    assert abs(cv.oof_scores.mean() - y.mean()) < 0.03
    assert cv.oof_scores[y == 1].mean() > 0.5 > cv.oof_scores[y == 0].mean()
    save_bank(tmp_path, [probe], {"version": "v0001"})
    (loaded,), manifest = load_bank(tmp_path)
    assert manifest["categories"] == ["violence"]
    np.testing.assert_allclose(loaded.predict_proba(X), probe.predict_proba(X), rtol=1e-6)
    np.testing.assert_allclose(ProbeBank([loaded]).predict_proba(X)[:, 0], probe.predict_proba(X), atol=1e-6)


def test_artefact_refuses_pickled_arrays(tmp_path):
    np.savez(tmp_path / "evil.npz", weight=np.array([object()], dtype=object), bias=0.0, platt=np.ones(2),
             scaler_mean=np.zeros(1), scaler_scale=np.ones(1))
    with pytest.raises(ValueError):
        LinearProbe.load(tmp_path / "evil.npz")


def test_too_few_labels_is_a_clear_error():
    X, y = blobs(1, 50)
    with pytest.raises(ValueError, match="at least 2 positive"):
        train_probe(X, y, "sexual", ClassifierConfig())


def test_folds_shrink_to_the_scarcer_class():
    X, y = blobs(3, 60)
    _, cv = train_probe(X, y, "sexual", ClassifierConfig(cv_folds=5))
    assert cv.folds == 3


# -------------------------------------------------------------------------------------- thresholds


def test_threshold_is_the_highest_meeting_the_target():
    pos = np.linspace(0.01, 1.0, 100)              # 100 positives: 0.01, 0.02, ..., 1.00
    neg = np.array([0.005, 0.015, 0.5, 0.95])
    r = recall_threshold(pos, neg, 0.99)
    assert r.threshold == pytest.approx(0.02)       # 99 of 100 positives are >= 0.02; 0.03 would catch 98
    assert r.caught == 99 and r.recall == pytest.approx(0.99)
    assert r.false_positives == 2                   # 0.5 and 0.95
    assert r.precision == pytest.approx(99 / 101)
    assert r.reachable and r.positives_needed == 0
    assert r.recall_low == pytest.approx(wilson_interval(99, 100).low)
    assert r.recall_low < 0.99 and "Wilson lower bound" in r.message
    # one more positive above 0.02 and the recall would still hold at a higher threshold? No: highest is exact
    assert np.mean(pos >= r.threshold + 1e-9) < 0.99


def test_threshold_with_ties_counts_all_tied_positives():
    pos = np.array([0.9] * 10 + [0.2] * 90)
    r = recall_threshold(pos, np.array([0.1, 0.3]), 0.5, required_positives=1)
    assert r.threshold == pytest.approx(0.2) and r.caught == 100 and r.false_positives == 1


def test_target_not_reachable_says_how_many_positives_are_needed():
    pos = np.linspace(0.5, 1.0, 40)
    r = recall_threshold(pos, np.linspace(0, 0.6, 200), 0.99)
    assert not r.reachable
    assert r.required_positives == 100 and r.positives_needed == 60
    assert "60 more positives" in r.message
    none = recall_threshold(np.array([]), np.array([0.1]), 0.95)
    assert not none.reachable and none.positives_needed == 20 and math.isnan(none.recall)


def test_positives_needed_for_wilson_bound_is_minimal():
    for misses, n, target in [(0, 100, 0.97), (1, 150, 0.97), (2, 300, 0.98)]:
        extra = positives_needed_for_bound(misses, n, target)
        assert extra > 0
        assert wilson_interval(n + extra - misses, n + extra).low >= target
        assert wilson_interval(n + extra - 1 - misses, n + extra - 1).low < target
    assert positives_needed_for_bound(0, 100, 0.95) == 0   # 100/100: lower bound 0.963 already
    assert positives_needed_for_bound(0, 10_000, 0.9) == 0


def test_precision_at_recall_on_mixed_scores():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.4, 0.3])
    labels = np.array([1, 0, 1, 0, 1, 0])
    assert precision_at_recall(scores, labels, 0.99) == pytest.approx(3 / 5)
    assert precision_at_recall(scores, labels, 0.6) == pytest.approx(2 / 3)


# ------------------------------------------------------------------------------------------ labels


@pytest.fixture
def status() -> pl.DataFrame:
    return pl.DataFrame({"uid": ["00000/000000000", "00000/000000001", "00000/000000002"],
                         "status": ["ok", "ok", "rejected"]})


def test_import_validation_reports_every_bad_row(status):
    rows = [
        {"uid": "00000/000000000", "category": "violence", "label": "1"},
        {"uid": "00000/999999999", "category": "violence", "label": "0"},
        {"uid": "00000/000000001", "category": "gore", "label": "yes"},
        {"uid": "00000/000000002", "category": "sexual", "label": "no"},
        {"uid": "00000/000000001", "category": "sexual", "label": "maybe"},
        {"uid": "00000/000000001", "category": "sexual", "label": "false", "round": "x"},
    ]
    report = L.validate_rows(rows, ["violence", "sexual"], status)
    assert not report.ok
    assert report.accepted.height == 1
    reasons = {line: reason for line, _, reason in report.rejected}
    assert set(reasons) == {3, 4, 5, 6, 7}           # CSV line numbers (header is line 1)
    assert "unknown uid" in reasons[3]
    assert "unknown category 'gore'" in reasons[4]
    assert "rejected at ingest" in reasons[5]
    assert "not yes/no" in reasons[6]
    assert "not an integer" in reasons[7]
    assert "5 invalid" in report.summary()


def test_relabelling_keeps_history_and_latest_wins(status):
    t0 = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)
    first = L.validate_rows([{"uid": "00000/000000000", "category": "violence", "label": "0",
                              "labeled_at": t0.isoformat()}], ["violence"], status).accepted
    assert first["round"].to_list() == [0]
    second = L.validate_rows([
        {"uid": "00000/000000000", "category": "violence", "label": "1", "labeled_at": (t0 + dt.timedelta(days=1)).isoformat()},
        {"uid": "00000/000000001", "category": "violence", "label": "1", "labeled_at": t0.isoformat()},
    ], ["violence"], status, existing=first)
    assert second.relabelled == 1
    assert second.accepted["round"].to_list() == [1, 1]  # one past the latest round on record
    history = pl.concat([first, second.accepted])
    current = L.current_labels(history)
    assert history.height == 3 and current.height == 2
    assert dict(zip(current["uid"], current["label"])) == {"00000/000000000": 1, "00000/000000001": 1}
    # an older judgement imported later does not win over a newer one
    late_old = L.validate_rows([{"uid": "00000/000000000", "category": "violence", "label": "0",
                                 "labeled_at": (t0 - dt.timedelta(days=3)).isoformat()}], ["violence"], status).accepted
    assert L.current_labels(pl.concat([history, late_old])).filter(pl.col("uid") == "00000/000000000")["label"][0] == 1


def test_queue_csv_round_trips_through_import(tmp_path, status):
    queue = pl.DataFrame({"uid": ["00000/000000000", "00000/000000001"], "category": ["violence", "violence"],
                          "why": ["flagged: ...", "uncertain: ..."], "procedure": ["flagged", "uncertain"],
                          "score": [0.9, 0.4], "round": [3, 3]})
    out = tmp_path / "queue.csv"
    L.write_queue_csv(queue, out, {"00000/000000000": "thumbs/a.jpg"}, {"violence": "graphic violence"})
    rows = L.read_csv_rows(out)
    assert rows[0]["image"] == "thumbs/a.jpg" and rows[0]["definition"] == "graphic violence"
    rows[0]["label"], rows[1]["label"] = "1", "0"
    report = L.validate_rows(rows, ["violence"], status)
    assert report.ok
    assert report.accepted["round"].to_list() == [3, 3]
    assert report.accepted["source"].to_list() == ["queue:flagged", "queue:uncertain"]


# -------------------------------------------------------------------------------- active learning


def test_missed_positives_are_those_cv_scores_low():
    scores = np.array([0.9, 0.1, 0.3, 0.05, 0.7, 0.2])
    labels = np.array([1, 1, 1, 0, 1, 0])
    assert missed_positives(scores, labels, 0.5, 10).tolist() == [1, 2]
    assert missed_positives(scores, labels, 0.5, 1).tolist() == [1]


def _pool(seed: int = 0, n: int = 400, dim: int = 16):
    rng = np.random.default_rng(seed)
    X = unit(rng.normal(size=(n, dim)))
    uids = np.array([f"00000/{i:09d}" for i in range(n)], dtype=object)
    return rng, X, uids


def test_flagged_procedure_samples_only_flagged_images():
    rng, X, uids = _pool()
    scores = rng.random(len(uids))
    builder = QueueBuilder(0.9, {"flagged": 10}, X.shape[1], seed=1)
    builder.add(uids, X, scores)
    batch = builder.select(10, near_duplicate_cosine=1.01)
    assert len(batch) == 10 and {b.procedure for b in batch} == {"flagged"}
    assert all(b.score >= 0.9 for b in batch)
    # a random sample of the flagged set, not just its top scores
    flagged_scores = np.sort(scores[scores >= 0.9])[::-1]
    assert sorted(b.score for b in batch) != sorted(flagged_scores[:10].tolist())


def test_missed_neighbors_finds_the_pool_images_near_a_missed_positive():
    rng, X, uids = _pool(1)
    anchor = unit(rng.normal(size=X.shape[1]))
    near = unit(anchor + 0.15 * rng.normal(size=(5, X.shape[1])))     # 5 planted neighbours of the positive
    X = np.vstack([X, near])
    uids = np.r_[uids, np.array([f"00001/{i:09d}" for i in range(5)], dtype=object)]
    scores = np.full(len(uids), 0.01)                                 # the model flags none of them
    builder = QueueBuilder(0.5, {"missed_neighbors": 5}, X.shape[1], queries=anchor[None], query_uids=["00009/x"],
                           query_scores=[0.05], neighbors=5)
    # streamed in blocks: the neighbours sit in different blocks
    for block in np.array_split(np.arange(len(uids)), 4):
        builder.add(uids[block], X[block], scores[block])
    batch = builder.select(5, near_duplicate_cosine=1.01)
    assert {b.uid for b in batch} == {f"00001/{i:09d}" for i in range(5)}
    assert all(b.procedure == "missed_neighbors" and "00009/x" in b.why for b in batch)


def test_uncertain_takes_scores_nearest_the_threshold():
    _, X, uids = _pool(2, n=100)
    scores = np.linspace(0.001, 0.999, 100)
    builder = QueueBuilder(0.3, {"uncertain": 4}, X.shape[1])
    builder.add(uids, X, scores)
    picked = sorted(b.score for b in builder.select(4, 1.01))
    logit = lambda p: np.log(p / (1 - p))  # noqa: E731
    expected = sorted(scores[np.argsort(np.abs(logit(scores) - logit(0.3)))[:4]].tolist())
    assert picked == pytest.approx(expected)


def test_batch_has_no_duplicates_or_near_duplicates_and_fills_shortfalls():
    rng, X, uids = _pool(3, n=50)
    X[1] = X[0]                                                       # an exact copy
    X[2] = unit(X[0] + 0.05 * rng.normal(size=X.shape[1]))           # a near-duplicate (cosine > 0.95)
    scores = np.full(50, 0.2)
    scores[:3] = 0.95                                                 # the three are flagged ...
    builder = QueueBuilder(0.9, {"flagged": 3, "uncertain": 3}, X.shape[1], queries=X[:1], query_uids=["q"],
                           query_scores=[0.1], neighbors=3)
    builder.add(uids, X, scores)
    batch = builder.select(6, near_duplicate_cosine=0.95)
    chosen = [b.uid for b in batch]
    assert len(chosen) == len(set(chosen)) == 6
    assert sum(u in chosen for u in uids[:3]) == 1                   # ... but only one of them enters
    V = X[[int(u.split("/")[1]) for u in chosen]]
    sims = V @ V.T - 2 * np.eye(len(V))
    assert sims.max() <= 0.95
