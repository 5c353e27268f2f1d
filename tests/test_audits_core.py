"""Audits algorithms without Dagster: index choice and recall, the audit table, probe sets, group shares,
checkpoint comparisons, census helpers."""

from __future__ import annotations

import io
import math
import tarfile
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from curation_assets.core import census, clip_bias as cb, pixel_verify as pv, regurgitation as rg, stats


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _png(colour=(10, 20, 30), size=(32, 32)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------- regurgitation


def test_index_choice_follows_flat_max():
    cfg = rg.IndexConfig(flat_max=100, approximate="ivf")
    assert cfg.choose(100) == "flat"
    assert cfg.choose(101) == "ivf"
    assert rg.IndexConfig(kind="hnsw").choose(5) == "hnsw"
    with pytest.raises(ValueError, match="index kind"):
        rg.IndexConfig(kind="lsh")


def test_flat_search_is_exact_and_reports_no_recall():
    rng = np.random.default_rng(0)
    xb, xq = _unit(rng.normal(size=(500, 16))), _unit(rng.normal(size=(20, 16)))
    res = rg.search(xb, xq, 3, rg.IndexConfig())
    brute = np.argsort(-(xq @ xb.T), axis=1)[:, :3]
    assert res.index_kind == "flat"
    assert np.array_equal(res.indices, brute)
    assert res.recall_at_k is None and res.flag_recall is None


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_approximate_index_reports_recall_measured_against_flat(kind):
    rng = np.random.default_rng(1)
    xb = _unit(rng.normal(size=(4000, 32)))
    # half the queries are near-copies of training rows (flag candidates), half random
    sources = rng.choice(len(xb), 100, replace=False)
    xq = np.concatenate([_unit(xb[sources] + 0.05 * rng.normal(size=(100, 32))), _unit(rng.normal(size=(100, 32)))])
    cfg = rg.IndexConfig(flat_max=1000, approximate=kind, recall_sample=200, ivf_nprobe=4, hnsw_ef_search=16)
    res = rg.search(xb, xq, 5, cfg, threshold=0.9)
    assert res.index_kind == kind and res.recall_queries == 200
    exact = np.argsort(-(xq @ xb.T), axis=1)[:, :5]
    expected = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(res.indices, exact)])
    assert res.recall_at_k == pytest.approx(expected)
    assert 0.3 < res.recall_at_k <= 1.0
    sims = xq @ xb.T
    true_flags = [(i, j) for i in range(len(xq)) for j in exact[i] if sims[i, j] >= 0.9]
    found = sum(1 for i, j in true_flags if j in set(res.indices[i]))
    assert len(true_flags) >= 100
    assert res.flag_recall == pytest.approx(found / len(true_flags))


def test_recall_sample_limits_the_measured_queries():
    rng = np.random.default_rng(2)
    xb, xq = _unit(rng.normal(size=(3000, 8))), _unit(rng.normal(size=(300, 8)))
    res = rg.search(xb, xq, 2, rg.IndexConfig(kind="hnsw", recall_sample=50))
    assert res.recall_queries == 50 and res.recall_at_k is not None


def test_neighbour_table_flags_and_rate_with_wilson_interval():
    xb = _unit(np.eye(4, dtype=np.float32) + 0.01)
    xq = _unit(np.array([[1, 0, 0, 0], [0, 0.7, 0.7, 0], [0, 0, 0, 1]], dtype=np.float32))
    res = rg.search(xb, xq, 2, rg.IndexConfig())
    table = rg.neighbour_table(["g1", "g2", "g3"], res, ["a", "b", "c", "d"], threshold=0.9, reference="full")
    assert table.height == 6
    best = table.filter(pl.col("rank") == 1).sort("generated_id")
    assert best["train_uid"].to_list()[0] == "a" and best["train_uid"].to_list()[2] == "d"
    assert best["flagged"].to_list() == [True, False, True]
    summary = rg.rate_summary(table, 3, "full")
    interval = stats.wilson_interval(2, 3)
    assert summary["n_flagged"] == 2 and summary["rate"] == pytest.approx(2 / 3)
    assert (summary["ci_low"], summary["ci_high"]) == pytest.approx((interval.low, interval.high))


def test_search_pads_when_training_set_is_smaller_than_k():
    xb = _unit(np.eye(3, dtype=np.float32))
    res = rg.search(xb, xb[:1], 5)
    assert res.indices.shape == (1, 5) and list(res.indices[0, 3:]) == [-1, -1]
    table = rg.neighbour_table(["g"], res, ["a", "b", "c"], 0.5, "full")
    assert table.height == 3


def test_list_generated_reads_files_and_tar_shards(tmp_path: Path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.png").write_bytes(_png())
    (tmp_path / "sub" / "b.jpg").write_bytes(_png((200, 0, 0)))
    (tmp_path / "notes.txt").write_text("not an image")
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        for name, data in (("000000001.png", _png((0, 200, 0))), ("000000001.txt", b"caption")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    images = rg.list_generated(tmp_path)
    assert [g.id for g in images] == ["00000/000000001", "a", "sub/b"]
    assert Image.open(io.BytesIO(images[0].data)).getpixel((0, 0)) == (0, 200, 0)
    single = rg.list_generated(tmp_path / "00000.tar")
    assert [g.id for g in single] == ["00000/000000001"]
    (tmp_path / "a.jpg").write_bytes(_png())
    with pytest.raises(ValueError, match="not unique"):
        rg.list_generated(tmp_path)
    with pytest.raises(FileNotFoundError):
        rg.list_generated(tmp_path / "missing")


# --------------------------------------------------------------------------- probe sets


def _probe_dir(tmp_path: Path, rows: list[tuple[str, str, str]], create: bool = True) -> Path:
    root = tmp_path / "probes"
    root.mkdir(exist_ok=True)
    lines = ["image,race,gender"] + [",".join(r) for r in rows]
    (root / "probes.csv").write_text("\n".join(lines) + "\n")
    if create:
        for image, _, _ in rows:
            (root / image).parent.mkdir(parents=True, exist_ok=True)
            (root / image).write_bytes(_png())
    return root


def test_probe_set_loader_maps_cfd_codes_and_builds_groups(tmp_path):
    root = _probe_dir(tmp_path, [("f/CFD-BF-1.jpg", "B", "F"), ("f/CFD-WM-2.jpg", "W", "M"), ("x.png", "Latino", "female")])
    probe = cb.load_probe_set(root, races=["Black", "White", "Latino"], genders=["female", "male"])
    assert len(probe) == 3
    assert probe.groups() == ["Black female", "Latino female", "White male"]
    assert all(Path(p).is_file() for p in probe.table["path"].to_list())


def test_probe_set_loader_names_missing_files(tmp_path):
    root = _probe_dir(tmp_path, [("a.jpg", "B", "F"), ("b.jpg", "W", "M")], create=False)
    (root / "a.jpg").write_bytes(_png())
    with pytest.raises(cb.ProbeSetError, match=r"1 of 2 images .*missing.*b\.jpg"):
        cb.load_probe_set(root)
    with pytest.raises(cb.ProbeSetError, match="CSV .* does not exist"):
        cb.load_probe_set(root, csv="other.csv")
    with pytest.raises(cb.ProbeSetError, match="directory .* does not exist"):
        cb.load_probe_set(tmp_path / "nowhere")


def test_probe_set_loader_rejects_unknown_groups_and_bad_columns(tmp_path):
    root = _probe_dir(tmp_path, [("a.jpg", "B", "F"), ("b.jpg", "Blak", "M")])
    with pytest.raises(cb.ProbeSetError, match=r"unknown race values \['Blak'\]"):
        cb.load_probe_set(root, races=["Black", "White"])
    with pytest.raises(cb.ProbeSetError, match=r"unknown gender values \['female'\]"):
        cb.load_probe_set(root, genders=["male"])
    assert len(cb.load_probe_set(root, race_aliases={"Blak": "Black"}, races=["Black"])) == 2
    (root / "probes.csv").write_text("image,ethnicity\na.jpg,B\n")
    with pytest.raises(cb.ProbeSetError, match="lacks columns"):
        cb.load_probe_set(root)


# --------------------------------------------------------------------------- shares and comparisons


def test_zero_shot_probabilities_softmax_at_temperature():
    img = _unit(np.array([[1.0, 0.0], [0.6, 0.8]]))
    txt = _unit(np.array([[1.0, 0.0], [0.0, 1.0]]))
    p = cb.zero_shot_probabilities(img, txt, 100.0)
    assert np.allclose(p.sum(axis=1), 1.0)
    expected = np.exp(100 * 0.6) / (np.exp(100 * 0.6) + np.exp(100 * 0.8))
    assert p[1, 0] == pytest.approx(expected)
    assert cb.zero_shot_probabilities(img, txt, 1.0)[1, 0] == pytest.approx(np.exp(0.6) / (np.exp(0.6) + np.exp(0.8)))


def test_label_embeddings_average_templates_per_label():
    prompt_emb = _unit(np.array([[1, 0, 0], [1, 1, 0], [0, 0, 1], [0, 1, 1]], dtype=np.float64))
    labels = cb.label_embeddings(prompt_emb, 2, 2)
    assert labels.shape == (2, 3)
    assert np.allclose(np.linalg.norm(labels, axis=1), 1.0, atol=1e-6)
    assert labels[0, 2] == pytest.approx(0) and labels[1, 0] == pytest.approx(0)


def test_group_shares_and_wilson_intervals_on_constructed_data():
    labels = ["human being", "gorilla", "criminal"]
    # group A: 8 human, 2 gorilla; group B: 5 human, 0 gorilla, 5 criminal
    top = [0] * 8 + [1] * 2 + [0] * 5 + [2] * 5
    groups = ["A"] * 10 + ["B"] * 10
    probs = np.full((20, 3), 0.1)
    probs[np.arange(20), top] = 0.8
    shares = cb.group_label_shares(probs, labels, groups)
    row = shares.filter((pl.col("group") == "A") & (pl.col("label") == "gorilla")).row(0, named=True)
    interval = stats.wilson_interval(2, 10)
    assert (row["n"], row["top1"], row["share"]) == (10, 2, 0.2)
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((interval.low, interval.high))
    assert row["mean_prob"] == pytest.approx((2 * 0.8 + 8 * 0.1) / 10)
    b_gorilla = shares.filter((pl.col("group") == "B") & (pl.col("label") == "gorilla")).row(0, named=True)
    assert b_gorilla["share"] == 0 and b_gorilla["ci_low"] == pytest.approx(0, abs=1e-12) and b_gorilla["ci_high"] == pytest.approx(stats.wilson_interval(0, 10).high)
    overall = shares.filter(pl.col("group") == "all")
    assert overall["top1"].to_list() == [13, 2, 5] and set(overall["n"].to_list()) == {20}
    with pytest.raises(ValueError, match="shape"):
        cb.group_label_shares(probs[:, :2], labels, groups)


def test_compare_checkpoints_reports_percentage_points_and_z_test():
    base = pl.DataFrame({"group": ["A", "A"], "label": ["human being", "gorilla"], "n": [200, 200], "top1": [180, 20],
                         "share": [0.9, 0.1]}).with_columns(checkpoint=pl.lit("small"))
    big = pl.DataFrame({"group": ["A", "A"], "label": ["human being", "gorilla"], "n": [200, 200], "top1": [140, 60],
                        "share": [0.7, 0.3]}).with_columns(checkpoint=pl.lit("large"))
    cmp = cb.compare_checkpoints(pl.concat([base, big]), "small", "large").sort("label")
    gorilla = cmp.filter(pl.col("label") == "gorilla").row(0, named=True)
    assert gorilla["delta_pp"] == pytest.approx(20.0)
    pooled = 80 / 400
    z = (0.3 - 0.1) / math.sqrt(pooled * (1 - pooled) * (2 / 200))
    assert gorilla["z"] == pytest.approx(z)
    assert gorilla["p_value"] == pytest.approx(2 * (1 - 0.5 * (1 + math.erf(z / math.sqrt(2)))), rel=1e-6)
    assert gorilla["p_value"] < 1e-6
    human = cmp.filter(pl.col("label") == "human being").row(0, named=True)
    assert human["delta_pp"] == pytest.approx(-20.0) and human["z"] < 0


def test_prompts_need_the_label_placeholder():
    assert cb.prompts(["cat"], ["a photo of a {label}", "{label}!"]) == [["a photo of a cat", "cat!"]]
    with pytest.raises(ValueError, match="placeholder"):
        cb.prompts(["cat"], ["a photo"])


def test_heatmap_is_a_png():
    shares = cb.group_label_shares(np.eye(2)[[0, 1, 1]], ["a", "b"], ["g1", "g2", "g2"])
    png = cb.heatmap_png(shares, "t")
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and Image.open(io.BytesIO(png)).size[0] > 100


# --------------------------------------------------------------------------- census


def test_face_detector_finds_the_face_in_a_photo_and_none_in_a_flat_image():
    import matplotlib.cbook

    photo = Path(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).read_bytes()
    assert census.count_faces([photo, _png(size=(200, 200)), b"not an image"]) == [1, 0, -1]


def test_duplicate_rate_counts_non_representatives():
    samples = pl.DataFrame({"uid": ["s/1", "s/2", "s/3", "t/4", "t/5"], "shard": ["s", "s", "s", "t", "t"],
                            "status": ["ok", "ok", "ok", "ok", "rejected"]})
    groups = pl.DataFrame({"uid": ["s/1", "s/2", "t/4", "s/3"], "group_id": ["g", "g", "g", "h"],
                           "is_representative": [True, False, False, True]})
    out = census.duplicate_rate(groups, samples)
    rows = {r["shard"]: r for r in out.iter_rows(named=True)}
    assert (rows["s"]["samples"], rows["s"]["in_duplicate_group"], rows["s"]["removed"]) == (3, 2, 1)
    assert (rows["t"]["removed"], rows["all"]["removed"], rows["all"]["samples"]) == (1, 2, 4)
    assert rows["all"]["duplicate_rate"] == pytest.approx(0.5)


def test_status_counts_and_caption_words():
    samples = pl.DataFrame({"uid": ["a/1", "a/2", "b/3"], "shard": ["a", "a", "b"], "status": ["ok", "rejected", "ok"],
                            "caption": ["A woman with her dog", None, "two men and a boy"],
                            "width": [100, None, 300], "height": [50, None, 30]})
    counts = census.status_counts(samples)
    assert counts.filter((pl.col("shard") == "all") & (pl.col("status") == "ok"))["n"].item() == 2
    words = census.demographic_word_frequencies(samples, {"women": ["woman"], "men": ["man", "men", "boy"]})
    overall = {r["group"]: r["captions"] for r in words.filter((pl.col("shard") == "all") & pl.col("word").is_null()).iter_rows(named=True)}
    assert overall == {"women": 1, "men": 1}
    dist = census.size_and_caption_stats(samples).filter((pl.col("metric") == "width") & (pl.col("shard") == "all"))
    assert dist["n"].item() == 2 and dist["mean"].item() == 200


def _jpeg(im: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    im.convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def test_verification_confirms_a_cropped_rescaled_copy_and_rejects_another_scene():
    from curation_assets.core.perceptual import reference_images

    source, other = reference_images(2, seed=11)
    w, h = source.size
    copy = source.crop((int(0.1 * w), int(0.05 * h), int(0.95 * w), int(0.92 * h))).resize((150, 150))
    cfg = pv.ContainmentSettings()
    assert pv.containment_score(_jpeg(copy, 50), _jpeg(source), cfg) >= 0.85
    assert pv.containment_score(_jpeg(other), _jpeg(source), cfg) < cfg.threshold
    assert pv.containment_score(b"broken", _jpeg(source), cfg) == -1.0


def test_verify_candidates_only_checks_candidates_and_requires_both():
    from curation_assets.core.perceptual import reference_images

    a, b = reference_images(2, seed=12)
    table = pl.DataFrame({"generated_id": ["g1", "g1", "g2"], "reference": ["full"] * 3, "rank": [1, 2, 1],
                          "train_uid": ["a", "b", "b"], "similarity": [0.9, 0.8, 0.3],
                          "candidate": [True, True, False], "flagged": [True, True, False]})
    out = rg.verify_candidates(table, {"g1": _jpeg(a, 60), "g2": _jpeg(b)}, {"a": _jpeg(a), "b": _jpeg(b)}, pv.ContainmentSettings())
    assert out["flagged"].to_list() == [True, False, False]  # g2 -> b is identical but below the cosine threshold
    assert out["verification"][2] is None and out["verification"][0] > 0.9
    assert rg.rate_summary(out, 2, "full")["n_above_threshold"] == 1


# --------------------------------------------------------------------------- candidate threshold and query variants


def test_colour_shift_grid_starts_with_the_original():
    grid = rg.colour_shift_grid([20, -20])
    assert grid[0] == (0, 0, 0) and len(grid) == 27 and len(set(grid)) == 27
    assert rg.colour_shift_grid([0]) == [(0, 0, 0)]


def test_merge_variants_keeps_best_similarity_per_training_row():
    # two generated images x 2 variants, k = 3; row 5 appears in both variants of image 0
    sims = np.array([[0.9, 0.5, 0.4], [0.95, 0.6, 0.3], [0.2, 0.1, -np.inf], [0.7, 0.2, 0.1]], np.float32)
    idx = np.array([[5, 1, 2], [5, 3, 1], [4, 0, -1], [9, 4, 0]], np.int64)
    res = rg.SearchResult(sims, idx, "flat", 10, params={"k": 3})
    merged = rg.merge_variants(res, 2)
    assert merged.indices.tolist() == [[5, 3, 1], [9, 4, 0]]
    np.testing.assert_allclose(merged.similarities, [[0.95, 0.6, 0.5], [0.7, 0.2, 0.1]])
    assert merged.params["query_variants"] == 2 and rg.merge_variants(res, 1) is res


class _MeanColour:
    """A toy encoder that only sees the mean colour: shifting the query colour back must find the source."""

    name, dim = "mean-colour", 3

    def encode_images(self, images):
        x = np.stack([np.asarray(im.convert("RGB"), np.float32).mean(axis=(0, 1)) - 128 for im in images])
        return _unit(x + 1e-3)

    def encode_bytes(self, blobs):
        return self.encode_images([Image.open(io.BytesIO(b)) for b in blobs])


def test_encode_queries_colour_variants_recover_a_colour_cast():
    enc = _MeanColour()
    source, cast = _png((150, 90, 110)), _png((130, 110, 110))  # the copy has a (-20, +20, 0) cast
    xb = enc.encode_bytes([source, _png((130, 110, 110 + 60))])
    plain, v1 = rg.encode_queries(enc, [cast], [0])
    xq, v = rg.encode_queries(enc, [cast], [-20, 0, 20])
    assert v1 == 1 and v == 27 and xq.shape == (27, 3)
    np.testing.assert_allclose(xq[0], plain[0], atol=1e-6)  # the original is the first variant
    merged = rg.merge_variants(rg.search(xb, xq, 2), v)
    assert merged.indices[0, 0] == 0 and merged.similarities[0, 0] > 0.999
    assert (plain @ xb[0]).item() < merged.similarities[0, 0]


def test_candidate_threshold_calibration_keeps_the_quantile_of_synthetic_copies():
    from curation_assets.core.perceptual import PerceptualEncoder

    out = rg.calibrate_candidate_threshold(PerceptualEncoder(), n=40, quantile=0.1)
    assert out["n_scenes"] == 40 and out["query_variants"] == 1
    recall = np.mean(list(out["recall_at_threshold"].values()))
    assert 0.85 <= recall <= 0.95 + 1e-9
    assert out["copy_similarity"]["generator"]["median"] < out["copy_similarity"]["encoder"]["median"]
    originals, copies, kinds = rg.copy_pairs(3)
    assert len(originals) == len(copies) == 6 and kinds == ["encoder", "generator"] * 3
    assert originals[0] == originals[1] and copies[0] != copies[1]


def test_streamed_exact_search_returns_the_flat_index_neighbours():
    from curation_assets.core import regurgitation as rg

    rng = np.random.default_rng(3)
    xb = rng.standard_normal((900, 16)).astype(np.float32)
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    xq = xb[[5, 77, 400]] + 0.05 * rng.standard_normal((3, 16)).astype(np.float32)
    uids = [f"u{i:04d}" for i in range(len(xb))]
    flat = rg.search(xb, xq, 7, rg.IndexConfig(kind="flat"))
    cuts = [0, 100, 101, 450, 900]  # uneven blocks, one of a single row
    blocks = [(uids[a:b], xb[a:b]) for a, b in zip(cuts, cuts[1:])]
    streamed, names = rg.search_streamed(iter(blocks), xq, 7)
    assert streamed.n_train == 900 and streamed.index_kind == "flat-streamed"
    got = [[names[i] for i in row] for row in streamed.indices]
    assert got == [[uids[i] for i in row] for row in flat.indices]
    np.testing.assert_allclose(streamed.similarities, flat.similarities, atol=1e-5)
    few, names = rg.search_streamed(iter([(uids[:3], xb[:3])]), xq, 7)  # fewer training rows than k
    assert (few.indices[:, 3:] == -1).all() and len(names) == 3
