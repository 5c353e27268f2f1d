"""The final verdicts: a duplicate group keeps its best member the filter keeps; every sample once; mean weight 1."""

import polars as pl
import pytest

from curation_assets.core.training_set import VERDICTS, final_verdicts

ORDER = ["highest_resolution", "lowest_safety_score", "uid"]


def _inputs():
    uids = [f"s/{i}" for i in range(8)]
    samples = pl.DataFrame({"uid": uids, "shard": ["s"] * 8, "status": ["ok"] * 7 + ["rejected"],
                            "error": [None] * 7 + ["truncated jpeg"]})
    # group g1: s/0 (largest) is filtered, s/1 and s/2 are kept by the filter; s/2 scores lower on safety
    # group g2: both members filtered; s/5, s/6 singletons
    groups = pl.DataFrame({"uid": ["s/0", "s/1", "s/2", "s/3", "s/4"], "group_id": ["s/0", "s/0", "s/0", "s/3", "s/3"],
                           "width": [1024, 512, 512, 300, 200], "height": [1024, 512, 512, 300, 200]})
    dedup = pl.DataFrame({"uid": uids, "status": ["representative", "duplicate", "duplicate", "representative",
                                                  "duplicate", "singleton", "singleton", "rejected"]})
    filtered = pl.DataFrame({"uid": uids, "kept": [False, True, True, False, False, True, True, False],
                             "reasons": [["violence"], [], [], ["sexual"], ["sexual", "violence"], [], [], ["rejected"]]})
    safety = pl.DataFrame({"uid": uids, "safety_score": [0.9, 0.3, 0.1, 0.8, 0.95, 0.0, 0.2, None]})
    weights = pl.DataFrame({"uid": ["s/1", "s/2", "s/5", "s/6"], "weight": [2.0, 4.0, 1.0, 3.0]})
    return samples, dedup, groups, filtered, safety, weights


def test_representative_is_the_best_member_the_filter_keeps():
    samples, dedup, groups, filtered, safety, weights = _inputs()
    out = final_verdicts(samples, dedup, groups, filtered, safety, weights, ORDER)
    v = dict(zip(out["uid"], out["verdict"]))
    assert v == {"s/0": "filtered", "s/1": "duplicate", "s/2": "kept", "s/3": "filtered", "s/4": "filtered",
                 "s/5": "kept", "s/6": "kept", "s/7": "rejected"}
    reason = dict(zip(out["uid"], out["reason"]))
    assert reason["s/1"] == "duplicate of s/2" and reason["s/4"] == "sexual,violence" and reason["s/7"] == "truncated jpeg"
    assert out.filter(pl.col("uid") == "s/1")["representative_uid"].item() == "s/2"
    assert out["uid"].n_unique() == out.height == samples.height
    kept = out.filter(pl.col("verdict") == "kept")
    assert kept["weight"].mean() == pytest.approx(1.0)
    assert kept.sort("uid")["weight"].to_list() == pytest.approx([4 / (8 / 3), 1 / (8 / 3), 3 / (8 / 3)])
    assert out.filter(pl.col("verdict") != "kept")["weight"].null_count() == out.height - kept.height
    assert out["filter_applied"].all() and set(out["verdict"]) <= set(VERDICTS)


def test_before_labels_it_is_the_deduplicated_set_with_weight_one():
    samples, dedup, groups, _, _, _ = _inputs()
    out = final_verdicts(samples, dedup, groups, None, None, None, ORDER)
    v = dict(zip(out["uid"], out["verdict"]))
    assert v["s/0"] == "kept" and v["s/1"] == v["s/2"] == "duplicate" and v["s/3"] == "kept" and v["s/4"] == "duplicate"
    assert not out["filter_applied"].any()
    assert out.filter(pl.col("verdict") == "kept")["weight"].to_list() == [1.0] * 4


def test_samples_newer_than_dedup_or_filter_are_pending_not_lost():
    samples, dedup, groups, filtered, safety, weights = _inputs()
    late = pl.DataFrame({"uid": ["t/0", "t/1"], "shard": ["t", "t"], "status": ["ok", "ok"], "error": [None, None]})
    out = final_verdicts(pl.concat([samples, late]), dedup.vstack(pl.DataFrame({"uid": ["t/1"], "status": ["singleton"]})),
                         groups, filtered, safety, weights, ORDER)
    rows = {r["uid"]: r for r in out.iter_rows(named=True)}
    assert rows["t/0"]["verdict"] == "pending" and rows["t/0"]["reason"] == "not deduplicated yet"
    assert rows["t/1"]["verdict"] == "pending" and rows["t/1"]["reason"] == "not filtered yet"
    assert out.height == 10
