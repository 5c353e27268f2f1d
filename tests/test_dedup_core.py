"""The dedup algorithms on small constructed data where the answer is known."""

from __future__ import annotations

import itertools

import numpy as np
import polars as pl
import pytest

from curation_assets.core import dedup
from curation_assets.demo.synthetic_embeddings import synthetic_embeddings


def _unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


def naive_pairs(x: np.ndarray, labels: np.ndarray, threshold: float) -> set[tuple[int, int]]:
    s = x @ x.T
    return {(i, j) for i, j in zip(*np.nonzero(np.triu(s >= threshold, k=1))) if labels[i] == labels[j]}


@pytest.fixture(scope="module")
def clustered():
    """Three tight groups of points and some loose ones; labels put most points in a few big clusters."""
    data = synthetic_embeddings(3000, d=32, seed=3, points_per_topic=300, dup_fraction=0.2,
                                dup_cosine=(0.9, 0.99), point_spread=0.2)
    labels = np.random.default_rng(0).integers(0, 4, len(data.x))
    return data.x, labels


@pytest.mark.parametrize("row_block,col_block", [(1024, 8192), (7, 5), (64, 16), (1, 1)])
def test_blocked_search_equals_naive(clustered, row_block, col_block):
    x, labels = clustered
    x, labels = x[:600], labels[:600]
    threshold = 0.5  # low enough for hundreds of pairs, many of them near the threshold
    expected = naive_pairs(x, labels, threshold)
    assert len(expected) > 200  # the fixture must actually hold pairs
    a, b, s = dedup.within_cluster_pairs(x, labels, threshold, row_block=row_block, col_block=col_block)
    got = set(zip(a.tolist(), b.tolist()))
    assert got == expected
    assert np.all(a < b)
    np.testing.assert_allclose(s, (x[a] * x[b]).sum(axis=1), atol=1e-5)


def test_blocked_search_large_cluster_never_materialises_full_matrix(clustered, monkeypatch):
    x, _ = clustered
    labels = np.zeros(len(x), dtype=np.int32)  # one cluster of 3000
    stats = dedup.PairSearchStats()
    a, b, _ = dedup.within_cluster_pairs(x, labels, 0.9, row_block=256, col_block=512, stats=stats)
    assert set(zip(a.tolist(), b.tolist())) == naive_pairs(x, labels, 0.9)
    assert stats.largest_cluster == 3000
    # only the upper triangle (plus diagonal blocks) is computed
    assert stats.dot_products < 0.6 * 3000 * 3000


def test_max_pairs_guard(clustered):
    x, labels = clustered
    with pytest.raises(RuntimeError, match="threshold is too low"):
        dedup.within_cluster_pairs(x, labels, -1.0, max_pairs=100)


def test_pair_across_cluster_boundary_found_by_another_clustering():
    """Two near-identical points split by clustering 1's boundary are found by clustering 2."""
    d = 8
    e = np.eye(d, dtype=np.float32)
    p = _unit(e[0] + 0.02 * e[1])
    q = _unit(e[0] - 0.02 * e[1])
    far = _unit(e[2])
    x = np.stack([p, q, far])
    # clustering 1: centroids on either side of the pair; clustering 2: one centroid covering both
    c1 = _unit(np.stack([e[0] + e[1], e[0] - e[1], e[2]]))
    c2 = _unit(np.stack([e[0], e[2]]))
    l1, _ = dedup.assign(x, c1)
    l2, _ = dedup.assign(x, c2)
    assert l1[0] != l1[1] and l2[0] == l2[1]
    found1 = dedup.within_cluster_pairs(x, l1, 0.99)
    found2 = dedup.within_cluster_pairs(x, l2, 0.99)
    assert len(found1[0]) == 0
    a, b, s, mask = dedup.union_pairs([found1, found2], len(x))
    assert list(zip(a.tolist(), b.tolist())) == [(0, 1)]
    assert mask.tolist() == [0b10]
    assert dedup.mask_to_list(mask, 5) == [[2]]


def test_union_pairs_each_pair_once_with_mask():
    f1 = (np.array([0, 1]), np.array([1, 2]), np.array([0.9, 0.8], np.float32))
    f2 = (np.array([0]), np.array([1]), np.array([0.9], np.float32))
    f3 = (np.array([3]), np.array([4]), np.array([0.95], np.float32))
    a, b, s, mask = dedup.union_pairs([f1, f2, f3], 10)
    assert list(zip(a.tolist(), b.tolist(), mask.tolist())) == [(0, 1, 0b011), (1, 2, 0b001), (3, 4, 0b100)]
    assert dedup.mask_to_list(mask, 3) == [[1, 2], [1], [3]]


def test_connected_components_and_group_ids():
    # 0-1-2 chain, 3-4 pair, 5 alone
    comp = dedup.connected_components(6, np.array([0, 1, 3]), np.array([1, 2, 4]))
    assert comp[0] == comp[1] == comp[2] and comp[3] == comp[4]
    assert len({comp[0], comp[3], comp[5]}) == 3
    uids = ["s/c", "s/a", "s/b", "s/e", "s/d", "s/f"]
    groups = dedup.group_frame(uids, comp)
    assert groups.sort("uid").rows() == [("s/a", "s/a", 3), ("s/b", "s/a", 3), ("s/c", "s/a", 3),
                                         ("s/d", "s/d", 2), ("s/e", "s/d", 2)]


def test_representative_policy():
    members = pl.DataFrame({
        "uid": ["a/1", "a/2", "a/3", "b/1", "b/2", "c/1", "c/2"],
        "group_id": ["g1", "g1", "g1", "g2", "g2", "g3", "g3"],
        "width": [100, 200, 200, 50, 50, 10, 10],
        "height": [100, 100, 100, 50, 50, 10, 10],
        "safety_score": [0.0, 0.5, 0.1, 0.9, 0.2, None, None],
    })
    ranked = dedup.choose_representatives(members, ["highest_resolution", "lowest_safety_score", "uid"])
    reps = dict(ranked.filter("is_representative").select("group_id", "uid").iter_rows())
    # g1: resolution ties between a/2 and a/3, a/3 is safer; g2: equal resolution, b/2 safer; g3: uid tie-break
    assert reps == {"g1": "a/3", "g2": "b/2", "g3": "c/1"}
    assert ranked.group_by("group_id").agg(pl.col("is_representative").sum())["is_representative"].to_list() == [1, 1, 1]
    assert ranked.filter(pl.col("uid") == "a/1")["representative_uid"].item() == "a/3"
    # a different policy gives a different, still deterministic choice; missing safety column is skipped
    by_safety = dedup.choose_representatives(members.drop("safety_score"), ["lowest_safety_score", "lowest_resolution"])
    assert dict(by_safety.filter("is_representative").select("group_id", "uid").iter_rows()) == {
        "g1": "a/1", "g2": "b/1", "g3": "c/1"}
    shuffled = dedup.choose_representatives(members.sample(fraction=1.0, shuffle=True, seed=5),
                                            ["highest_resolution", "lowest_safety_score", "uid"])
    assert shuffled.equals(ranked)


def test_recall_curve_known_answer():
    n = 100
    true = [(0, 1), (2, 3), (4, 5), (6, 7)]
    ta, tb = np.array([p[0] for p in true]), np.array([p[1] for p in true])
    # (0,1) found by clustering 1; (2,3) by 2 and 3; (4,5) by 5; (6,7) never; (8,9) is found but not true
    fa, fb = np.array([0, 2, 4, 8]), np.array([1, 3, 5, 9])
    masks = np.array([0b00001, 0b00110, 0b10000, 0b00001], dtype=np.uint8)
    rows = dedup.recall_curve(ta, tb, fa, fb, masks, n, 5)
    assert [r.found for r in rows] == [1, 2, 2, 2, 3]
    assert [r.recall for r in rows] == [0.25, 0.5, 0.5, 0.5, 0.75]
    assert all(r.true_pairs == 4 for r in rows)
    assert all(r.recall_low <= r.recall <= r.recall_high for r in rows)
    # mean over subsets of size 1: found-by counts 1 + 2 + 1 = 4 hits over 5 clusterings and 4 pairs
    assert rows[0].recall_mean_over_subsets == pytest.approx(4 / 5 / 4)
    expected_2 = np.mean([sum(1 for m in masks[:3] if m & ((1 << i) | (1 << j))) for i, j in
                          itertools.combinations(range(5), 2)]) / 4
    assert rows[1].recall_mean_over_subsets == pytest.approx(expected_2)


def test_exact_pairs_matches_numpy(clustered):
    x, _ = clustered
    x = x[:500]
    queries = np.array([3, 10, 77, 400])
    a, b, s = dedup.exact_pairs(x, queries, 0.9, block=2)
    sims = x @ x.T
    expected = {(min(q, j), max(q, j)) for q in queries for j in np.flatnonzero(sims[q] >= 0.9) if j != q}
    assert set(zip(a.tolist(), b.tolist())) == expected
    assert len(a) == len(expected)  # each pair once even when both ends are queries


def test_run_dedup_recall_with_five_clusterings_on_structured_data():
    data = synthetic_embeddings(8000, d=64, seed=11, point_spread=0.09)
    settings = dedup.DedupSettings(cluster_size=125, niter=8)
    result = dedup.run_dedup(data.x, threshold=0.9, settings=settings)
    queries = dedup.sample_queries(len(data.x), 8000, 0)
    ta, tb, _ = dedup.exact_pairs(data.x, queries, 0.9)
    assert len(ta) > 100
    rows = dedup.recall_curve(ta, tb, result.pair_a, result.pair_b, result.pair_mask, len(data.x), 5)
    recalls = [r.recall for r in rows]
    assert recalls == sorted(recalls)  # more clusterings never find fewer pairs
    assert recalls[-1] >= 0.95
    # every pair reported is a true pair (the within-cluster search is exact)
    found = set(zip(result.pair_a.tolist(), result.pair_b.tolist()))
    assert found <= set(zip(ta.tolist(), tb.tolist()))
    assert result.k == 64 and result.labels.shape == (8000, 5)
    assert result.centroids[0].buckets == 8


def test_k_rule_and_fit_subset():
    assert dedup.default_k(4000) == 16 and dedup.default_buckets(16) == 4
    assert dedup.default_k(10) == 1
    assert dedup.default_k(10_000_000) == 39_063 and dedup.default_buckets(39_063) == 198
    assert dedup.default_k(10_000_000, k_max=1024) == 1024
    assert dedup.default_k(1000, cluster_size=100) == 10
    s1 = dedup.fit_subset(100_000, 1024, seed=1)
    s2 = dedup.fit_subset(100_000, 1024, seed=2)
    assert len(s1) == 1024 * 40 and not np.array_equal(s1, s2)
    assert np.array_equal(s1, dedup.fit_subset(100_000, 1024, seed=1))
    assert len(dedup.fit_subset(500, 12, seed=1)) == 480
    assert len(dedup.fit_subset(500, 13, seed=1)) == 500  # 13 * 40 > 500: every row


def test_fit_centroids_small_inputs():
    x = _unit(np.random.default_rng(0).standard_normal((30, 8)))
    c = dedup.fit_centroids(x, 1, seed=0)
    assert c.shape == (1, 8) and np.isclose(np.linalg.norm(c), 1)
    c = dedup.fit_centroids(x[:3], 10, seed=0)  # k capped at n
    assert c.shape == (3, 8)
    np.testing.assert_allclose(np.linalg.norm(c, axis=1), 1, atol=1e-5)


def test_settings_validation_and_threshold():
    s = dedup.DedupSettings.from_section({"threshold": "auto", "representative": {"order": ["lowest_resolution"]}})
    assert s.representative_order == ("lowest_resolution", "uid")
    assert s.resolve_threshold("open_clip:ViT-B-32") == s.open_clip_threshold
    from curation_assets.core.perceptual import DUPLICATE_THRESHOLD

    assert s.resolve_threshold("perceptual-v1") == DUPLICATE_THRESHOLD
    assert dedup.DedupSettings.from_section({"threshold": 0.8}).resolve_threshold("perceptual-v1") == 0.8
    with pytest.raises(ValueError, match="no default duplicate threshold"):
        s.resolve_threshold("mystery")
    with pytest.raises(ValueError, match="unknown keys"):
        dedup.DedupSettings.from_section({"treshold": 0.9})
    with pytest.raises(ValueError, match="representative.order"):
        dedup.DedupSettings.from_section({"representative": {"order": ["biggest"]}})
    with pytest.raises(ValueError, match="threshold"):
        dedup.DedupSettings.from_section({"threshold": 2})
    with pytest.raises(ValueError, match="kmeans.k_max"):
        dedup.DedupSettings.from_section({"kmeans": {"k_max": 0}})
    with pytest.raises(ValueError, match="replaced by kmeans.cluster_size"):
        dedup.DedupSettings.from_section({"kmeans": {"min_points_per_centroid": 40}})
    assert dedup.DedupSettings.from_section({"kmeans": {"cluster_size": 64, "k_max": 10}}).k_max == 10


def test_two_level_clusters_lie_in_one_bucket_and_bucketed_search_is_exactly_the_global_search():
    data = synthetic_embeddings(6000, d=48, seed=5, point_spread=0.09)
    x = data.x
    k = dedup.default_k(len(x), 100)
    cents = dedup.fit_two_level(x[dedup.fit_subset(len(x), k, 3)], k, seed=3, niter=6)
    assert cents.buckets == dedup.default_buckets(k) and abs(cents.k - k) <= cents.buckets
    bucket, cluster, sims = dedup.assign_two_level(x, cents)
    assert np.array_equal(cents.bucket_of_cluster()[cluster], bucket)  # every cluster inside one bucket
    # the fine assignment is the nearest fine centroid of the nearest bucket
    nearest_bucket = (x @ cents.coarse.T).argmax(axis=1)
    assert np.array_equal(nearest_bucket, bucket)
    np.testing.assert_allclose(sims, (x * cents.fine[cluster]).sum(axis=1), atol=1e-5)
    settings = dedup.DedupSettings(row_block=64, col_block=128)
    whole = dedup.within_cluster_pairs(x, cluster, 0.9, 64, 128)
    parts = []
    for b in range(cents.buckets):
        rows = np.flatnonzero(bucket == b)[::-1]  # any order of members
        parts.append(dedup.bucket_pairs(rows, x[rows], cluster[rows], 0.9, settings))
    a = np.concatenate([p[0] for p in parts])
    order = np.lexsort((np.concatenate([p[1] for p in parts]), a))
    assert len(whole[0]) > 50
    assert np.array_equal(a[order], whole[0]) and np.array_equal(np.concatenate([p[1] for p in parts])[order], whole[1])
    np.testing.assert_allclose(np.concatenate([p[2] for p in parts])[order], whole[2], atol=1e-6)


def test_two_level_centroids_round_trip(tmp_path):
    x = _unit(np.random.default_rng(1).standard_normal((400, 8)))
    cents = dedup.fit_two_level(x, 20, seed=0, niter=4)
    path = tmp_path / "c.npz"
    with open(path, "wb") as handle:
        cents.save(handle)
    back = dedup.TwoLevelCentroids.load(path)
    assert back.version() == cents.version() and back.k == cents.k and back.buckets == cents.buckets
    assert dedup.fit_two_level(x[:3], 20, seed=0).k == 3  # capped at the subset size


def test_deduplicate_accounts_for_every_sample():
    from curation_assets.dedup import deduplicate

    samples = pl.DataFrame({
        "uid": ["0/1", "0/2", "0/3", "0/4", "0/5", "0/6"],
        "shard": ["0"] * 6,
        "status": ["ok", "ok", "ok", "rejected", "ok", "ok"],
    })
    embedded = pl.DataFrame({"uid": ["0/1", "0/2", "0/3", "0/5"]})
    groups = pl.DataFrame({"uid": ["0/1", "0/2"], "group_id": ["0/1", "0/1"], "is_representative": [False, True],
                           "representative_uid": ["0/2", "0/2"]})
    out = deduplicate(samples, embedded, groups)
    assert out["uid"].to_list() == samples["uid"].to_list()
    fate = dict(zip(out["uid"], out["status"]))
    assert fate == {"0/1": "duplicate", "0/2": "representative", "0/3": "singleton", "0/4": "rejected",
                    "0/5": "singleton", "0/6": "not_embedded"}
    assert dict(zip(out["uid"], out["kept"])) == {"0/1": False, "0/2": True, "0/3": True, "0/4": False,
                                                  "0/5": True, "0/6": False}
    row = out.filter(pl.col("uid") == "0/1").row(0, named=True)
    assert row["group_id"] == "0/1" and row["representative_uid"] == "0/2"
    assert out.filter(pl.col("status") == "singleton")["group_id"].is_null().all()
    # no pairs at all: every embedded ok sample is a kept singleton
    empty = groups.clear()
    out = deduplicate(samples, embedded, empty)
    assert out.filter(pl.col("status") == "singleton").height == 4 and out.height == 6


def test_streamed_exact_search_finds_exactly_the_pairs_of_the_whole_matrix():
    data = synthetic_embeddings(6000, 64, seed=3, dup_fraction=0.2)
    x = data.x
    queries = dedup.sample_queries(len(x), 700, seed=5)
    a, b, _ = dedup.exact_pairs(x, queries, 0.9)
    bounds = [0, 1000, 1001, 3500, 6000]  # uneven blocks, one of a single row
    blocks = ((lo, x[lo:hi]) for lo, hi in zip(bounds, bounds[1:]))
    sa, sb, ss = dedup.exact_pairs_streamed(x[queries], queries, blocks, 0.9, len(x), block=256)
    assert len(a) > 100
    assert np.array_equal(sa, a) and np.array_equal(sb, b)
    assert np.allclose(ss, (x[sa] * x[sb]).sum(axis=1), atol=1e-5)


def test_pairs_with_new_members_complete_the_earlier_pairs_of_a_bucket():
    data = synthetic_embeddings(3000, d=32, seed=8, point_spread=0.09)
    x = data.x
    cents = dedup.fit_two_level(x, 12, seed=1, niter=5)
    bucket, cluster, _ = dedup.assign_two_level(x, cents)
    rows = np.flatnonzero(bucket == np.bincount(bucket).argmax())
    settings = dedup.DedupSettings()
    is_new = np.zeros(len(rows), bool)
    is_new[np.random.default_rng(0).choice(len(rows), len(rows) // 5, replace=False)] = True
    old = dedup.bucket_pairs(rows[~is_new], x[rows[~is_new]], cluster[rows[~is_new]], 0.9, settings)
    added = dedup.bucket_pairs_with_new(rows, x[rows], cluster[rows], is_new, 0.9)
    full = dedup.bucket_pairs(rows, x[rows], cluster[rows], 0.9, settings)
    got = set(zip(old[0].tolist(), old[1].tolist())) | set(zip(added[0].tolist(), added[1].tolist()))
    assert len(added[0]) > 10 and len(old[0]) > 10
    assert len(old[0]) + len(added[0]) == len(full[0])  # no pair twice
    assert got == set(zip(full[0].tolist(), full[1].tolist()))
