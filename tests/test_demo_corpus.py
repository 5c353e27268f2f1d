"""The demo corpus: img2dataset layout, byte-for-byte determinism, and the planted effects
(duplicates, safety stand-ins, the caption-gender bias, drift, the generated set) at the rates the
pipeline's tests and benchmarks rely on."""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from curation_assets.demo.corpus import plan_ground_truth, write_demo_corpus

SMALL = dict(shards=2, per_shard=150, seed=7, size=128, drift_shard=True, generated=40)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo") / "shards"
    return out, write_demo_corpus(out, **SMALL)


@pytest.fixture(scope="module")
def truth(corpus) -> pl.DataFrame:
    return pl.read_parquet(corpus[0] / "ground_truth.parquet")


@pytest.fixture(scope="module")
def default_plan() -> pl.DataFrame:
    """Ground truth of the default corpus (4 x 1000), planned without rendering."""
    return plan_ground_truth(shards=4, per_shard=1000, seed=0, drift_shard=True)


def _members(tar_path: Path) -> dict[str, bytes]:
    with tarfile.open(tar_path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def _tiny(data: bytes) -> np.ndarray:
    g = np.asarray(Image.open(io.BytesIO(data)).convert("L").resize((16, 16), Image.BILINEAR), np.float32)
    return (g - g.mean()) / (g.std() + 1e-6)


def _ratio(frame: pl.DataFrame, weight: str | None = None) -> float:
    w = pl.col(weight) if weight else pl.lit(1.0)
    women = frame.select((w * pl.col("gender").is_in(["women", "mixed"])).sum()).item()
    men = frame.select((w * pl.col("gender").is_in(["men", "mixed"])).sum()).item()
    return women / men


def _bias_simulation(truth: pl.DataFrame) -> tuple[float, float, float]:
    """Women/men caption ratio raw, after removing the motif images, and after weighting each
    family's kept images by 1 / (1 - fraction of the family removed)."""
    t = truth.filter(~pl.col("corrupt"))
    kept = t.filter(pl.col("category").is_null())
    removed = t.group_by("family").agg(pl.col("category").is_not_null().mean().alias("removed"))
    kept = kept.join(removed, on="family").with_columns((1 / (1 - pl.col("removed"))).alias("w"))
    return _ratio(t), _ratio(kept), _ratio(kept, "w")


def test_layout_matches_img2dataset(corpus, truth):
    out, summary = corpus
    assert summary["shards"] == ["00000", "00001", "00002"] and summary["drift_shard"] == "00002"
    assert not list(out.rglob("*.tmp"))
    for shard in summary["shards"]:
        members = _members(out / f"{shard}.tar")
        keys = sorted({name.split(".")[0] for name in members})
        assert keys == [f"{shard}{pos:04d}" for pos in range(SMALL["per_shard"])]
        assert all(re.fullmatch(r"\d{9}", k) for k in keys)
        assert sorted(members) == sorted(f"{k}.{ext}" for k in keys for ext in ("jpg", "txt", "json"))
        meta = pl.read_parquet(out / f"{shard}.parquet")
        assert meta.columns[:6] == ["key", "caption", "width", "height", "status", "url"]
        assert meta["key"].to_list() == keys and set(meta["status"]) == {"success"}
        shard_truth = truth.filter(pl.col("shard") == shard).sort("key")
        assert shard_truth["uid"].to_list() == [f"{shard}/{k}" for k in keys]
        for k, row, t in zip(keys, meta.iter_rows(named=True), shard_truth.iter_rows(named=True)):
            caption = members[f"{k}.txt"].decode("utf-8")
            info = json.loads(members[f"{k}.json"].decode("utf-8"))
            assert caption == row["caption"] == info["caption"] == t["caption"] and caption.strip()
            assert info["key"] == k and info["status"] == "success" and info["url"].startswith("synthetic://")
            assert (info["width"], info["height"]) == (row["width"], row["height"])
            data = members[f"{k}.jpg"]
            if t["corrupt"]:
                assert t["corrupt_kind"] in ("truncated", "empty")
                if t["corrupt_kind"] == "empty":
                    assert data == b""
                with pytest.raises(OSError):
                    Image.open(io.BytesIO(data)).load()
            else:
                img = Image.open(io.BytesIO(data))
                img.load()
                assert img.format == "JPEG" and img.size == (row["width"], row["height"])
    # non-ASCII captions survive the round trip
    assert any(not c.isascii() for c in truth["caption"])


def test_same_seed_same_bytes_and_workers_do_not_matter(corpus, truth, tmp_path):
    out, summary = corpus
    again = write_demo_corpus(tmp_path / "again", **SMALL, workers=1)
    for a, b in zip(summary["tars"] + [summary["generated_tar"]], again["tars"] + [again["generated_tar"]]):
        assert Path(a).read_bytes() == Path(b).read_bytes()
    assert pl.read_parquet(again["ground_truth"]).equals(truth)
    assert pl.read_parquet(again["generated_truth"]).equals(pl.read_parquet(summary["generated_truth"]))
    other = write_demo_corpus(tmp_path / "other", **{**SMALL, "seed": 8, "drift_shard": False, "generated": 0})
    assert Path(other["tars"][0]).read_bytes() != Path(summary["tars"][0]).read_bytes()


def test_refuses_to_mix_with_foreign_shards(tmp_path):
    (tmp_path / "00009.tar").write_bytes(b"")
    with pytest.raises(FileExistsError):
        write_demo_corpus(tmp_path, shards=1, per_shard=10, size=64, generated=0)


def test_drift_flag_leaves_base_shards_unchanged(default_plan):
    without = plan_ground_truth(shards=4, per_shard=1000, seed=0, drift_shard=False)
    assert default_plan.filter(pl.col("shard") != "00004").equals(without)


def test_duplicate_groups(corpus, truth, default_plan):
    out, summary = corpus
    for frame in (truth.filter(pl.col("shard") != "00002"), default_plan):
        groups = frame.filter(pl.col("dup_group").is_not_null()).group_by("dup_group").agg(
            pl.len().alias("n"), pl.col("shard").n_unique().alias("shards"),
            (pl.col("dup_transform") == "original").sum().alias("originals"),
            pl.col("family").n_unique().alias("families"), pl.col("category").n_unique().alias("categories"),
            pl.col("gender").n_unique().alias("genders"), pl.col("corrupt").any().alias("corrupt"))
        assert groups["n"].min() >= 2 and groups["n"].max() <= 10
        assert (groups["originals"] == 1).all()
        assert (groups["families"] == 1).all() and (groups["categories"] == 1).all() and (groups["genders"] == 1).all()
        assert not groups["corrupt"].any()
        assert (groups["shards"] > 1).sum() >= 2
        share = groups["n"].sum() / frame.height
        assert 0.15 <= share <= 0.25, share
    base = default_plan.filter(pl.col("shard") != "00004")
    cross = base.filter(pl.col("dup_group").is_not_null()).group_by("dup_group").agg(pl.col("shard").n_unique() > 1)
    assert 0.2 <= cross["shard"].mean() <= 0.5
    transforms = base.filter(pl.col("dup_transform") != "original")["dup_transform"].drop_nulls()
    allowed = re.compile(r"(jpeg\(q=(\d+)\)|resize\((0\.\d+|1\.00)\)|crop\((0\.\d+)\)|brightness\(([\d.]+)\)"
                         r"|contrast\(([\d.]+)\)|overlay\((logo|text|watermark)\))")
    for t in transforms:
        parts = t.split("+")
        assert 1 <= len(parts) <= 2 and all(allowed.fullmatch(p) for p in parts), t
        for p in parts:
            if p.startswith("jpeg"):
                assert 30 <= int(p[7:-1]) <= 95
            elif p.startswith("crop"):
                assert float(p[5:-1]) >= 0.8
            elif p.startswith("resize"):
                assert 0.5 <= float(p[7:-1]) <= 1.0
            elif p.startswith(("brightness", "contrast")):
                assert 0.8 <= float(p.split("(")[1][:-1]) <= 1.2
    # members look like their original, much more than unrelated images of the same family do
    images = {s: _members(out / f"{s}.tar") for s in summary["shards"]}
    tiny = {u: _tiny(images[u[:5]][f"{u[6:]}.jpg"]) for u in truth.filter(~pl.col("corrupt"))["uid"]}
    dup = truth.filter(pl.col("dup_group").is_not_null())
    originals = dict(dup.filter(pl.col("dup_transform") == "original").select("dup_group", "uid").iter_rows())
    copies = dup.filter(pl.col("dup_transform") != "original").select("uid", "dup_group")
    near = [np.mean((tiny[u] - tiny[originals[g]]) ** 2) for u, g in copies.iter_rows()]
    rng = np.random.default_rng(0)
    uids = list(tiny)
    far = [np.mean((tiny[a] - tiny[b]) ** 2) for a, b in rng.choice(uids, size=(300, 2)) if a != b]
    assert np.median(near) < 0.25 * np.median(far), (np.median(near), np.median(far))


def test_near_miss_clocks_are_different_times_not_duplicates(corpus, truth):
    out, _ = corpus
    twins = truth.filter(pl.col("near_miss_of").is_not_null())
    assert twins.height >= 1
    by_uid = {r["uid"]: r for r in truth.iter_rows(named=True)}
    for t in twins.iter_rows(named=True):
        src = by_uid[t["near_miss_of"]]
        assert t["family"] == src["family"] == "clock" and t["dup_group"] is None and src["dup_group"] is None
        time_of = lambda c: re.search(r"\d{1,2}:\d{2}", c).group(0)  # noqa: E731
        assert time_of(t["caption"]) != time_of(src["caption"])
        a = np.asarray(Image.open(io.BytesIO(_members(out / f"{t['shard']}.tar")[f"{t['key']}.jpg"])), np.float32)
        b = np.asarray(Image.open(io.BytesIO(_members(out / f"{src['shard']}.tar")[f"{src['key']}.jpg"])), np.float32)
        diff = np.abs(a - b).max(axis=2) > 60
        assert 0.002 < diff.mean() < 0.15  # same clock, only the hands moved


def test_base_rates(default_plan, truth):
    cases = ((default_plan.filter(pl.col("shard") != "00004"), 0.0), (truth.filter(pl.col("shard") != "00002"), 0.01))
    for frame, tol in cases:
        n = frame.height
        rate = lambda expr: frame.filter(expr).height / n  # noqa: E731
        assert 0.03 - tol <= rate(pl.col("category") == "violence") <= 0.05 + tol
        assert 0.03 - tol <= rate(pl.col("category") == "sexual") <= 0.05 + tol
        assert 0.03 - tol <= rate(pl.col("hard_negative_for") == "violence") <= 0.05 + tol
        assert 0.03 - tol <= rate(pl.col("hard_negative_for") == "sexual") <= 0.05 + tol
        assert 0.003 <= rate(pl.col("corrupt")) <= 0.008
        assert frame.filter(pl.col("hard_negative") & pl.col("category").is_not_null()).height == 0
        assert set(frame.filter(pl.col("category") == "sexual")["family"]) == {"people"}
        assert "people" not in set(frame.filter(pl.col("category") == "violence")["family"])
        assert frame.filter(pl.col("corrupt") & pl.col("category").is_not_null()).height == 0
        assert set(frame["family"]) == {"clock", "shapes", "banner", "scene", "people"}
        people_ok = frame.with_columns(pl.col("gender").replace_strict(
            {"women": 1, "men": 1, "mixed": 2, "person": 1, "none": 0}, return_dtype=pl.Int64).alias("min_people"))
        assert (people_ok.filter(pl.col("family").is_in(["scene", "people"]))["people"]
                >= people_ok.filter(pl.col("family").is_in(["scene", "people"]))["min_people"]).all()
        assert (frame.filter(pl.col("gender") == "none")["people"] == 0).all()
    base = default_plan.filter(pl.col("shard") != "00004")
    people = base.filter(pl.col("family") == "people")
    mix = lambda f: f["gender"].value_counts(normalize=True).sort("gender")["proportion"].to_numpy()  # noqa: E731
    motif, other = people.filter(pl.col("category") == "sexual"), people.filter(pl.col("category").is_null())
    assert np.abs(mix(motif) - mix(other)).max() < 0.01
    women = people.filter(pl.col("gender").is_in(["women", "mixed"])).height
    men = people.filter(pl.col("gender").is_in(["men", "mixed"])).height
    assert 2.5 <= women / men <= 3.5
    scene = base.filter(pl.col("family") == "scene")
    assert scene.filter(pl.col("gender") == "women").height == scene.filter(pl.col("gender") == "men").height
    assert base.filter(~pl.col("family").is_in(["scene", "people"]) & (pl.col("gender") != "none")).height == 0


def test_bias_simulation_filter_lowers_and_reweighting_restores(default_plan, truth, corpus):
    raw, filtered, reweighted = _bias_simulation(default_plan.filter(pl.col("shard") != "00004"))
    assert 0.08 <= 1 - filtered / raw <= 0.12, (raw, filtered)
    assert abs(reweighted / raw - 1) <= 0.03, (raw, reweighted)
    raw, filtered, reweighted = _bias_simulation(truth.filter(pl.col("shard") != "00002"))
    assert 1 - filtered / raw > 0.05, (raw, filtered)
    assert abs(reweighted / raw - 1) <= 0.03, (raw, reweighted)
    summary_ratios = corpus[1]["women_men_ratio"]
    assert summary_ratios == pytest.approx({"raw": raw, "filtered": filtered, "reweighted": reweighted})


def test_drift_shard_shifts_the_mix_only(default_plan, truth):
    for frame, drift in ((default_plan, "00004"), (truth, "00002")):
        base, shifted = frame.filter(pl.col("shard") != drift), frame.filter(pl.col("shard") == drift)
        assert _ratio(shifted) < 0.5 * _ratio(base)
        one_base = base.filter(pl.col("shard") == "00000")
        assert one_base["family"].value_counts().sort("family").equals(shifted["family"].value_counts().sort("family"))
        n_base = base["shard"].n_unique()
        for col in ("category", "hard_negative_for"):
            expected = base[col].drop_nulls().value_counts().with_columns(pl.col("count") / n_base)
            got = dict(shifted[col].drop_nulls().value_counts().iter_rows())
            for value, mean in expected.iter_rows():
                assert abs(got[value] - mean) <= 0.25 * mean + 2, (col, value, got[value], mean)
    shifted = default_plan.filter(pl.col("shard") == "00004")
    base = default_plan.filter(pl.col("shard") != "00004")
    share = lambda f, g: f.filter(pl.col("gender") == g).height / f.height  # noqa: E731
    assert share(shifted, "women") == pytest.approx(share(base, "women") / 2, rel=0.05)
    assert share(shifted, "men") == pytest.approx(share(base, "men") * 2, rel=0.05)


def test_generated_set(corpus, truth):
    out, summary = corpus
    gen = pl.read_parquet(summary["generated_truth"])
    assert gen.height == SMALL["generated"] and summary["generated"] == {"copy": 16, "novel": 24}
    members = _members(out / "generated" / "00000.tar")
    meta = pl.read_parquet(out / "generated" / "00000.parquet")
    assert meta["key"].to_list() == [u.split("/")[1] for u in gen["uid"]]
    assert sorted(members) == sorted(f"{k}.{e}" for k in meta["key"] for e in ("jpg", "txt", "json"))
    copies, novel = gen.filter(pl.col("kind") == "copy"), gen.filter(pl.col("kind") == "novel")
    assert novel["source_uid"].null_count() == novel.height and copies["source_uid"].null_count() == 0
    training = truth.filter(~pl.col("corrupt") & (pl.col("shard") != "00002"))
    assert set(copies["source_uid"]) <= set(training["uid"])
    family = dict(truth.select("uid", "family").iter_rows())
    assert all(family[s] == f for s, f in copies.select("source_uid", "family").iter_rows())
    for t in copies["transform"]:
        parts = t.split("+")
        assert parts[0].startswith("jpeg(q=") and 40 <= int(parts[0][7:-1]) <= 80 and len(parts) == 3
    images = {s: _members(out / f"{s}.tar") for s in summary["shards"]}
    train_tiny = {u: _tiny(images[u[:5]][f"{u[6:]}.jpg"]) for u in training["uid"]}
    gen_tiny = {u: _tiny(members[f"{u[6:]}.jpg"]) for u in gen["uid"]}
    to_source = [np.mean((gen_tiny[u] - train_tiny[s]) ** 2) for u, s in copies.select("uid", "source_uid").iter_rows()]
    nearest_novel = [min(np.mean((gen_tiny[u] - v) ** 2) for v in train_tiny.values()) for u in novel["uid"]]
    assert np.median(to_source) < np.median(nearest_novel)


def _hog_colour(data: bytes) -> np.ndarray:
    """Pooled gradient-orientation histograms (1x1, 2x2, 4x4 grids, 8 bins) plus a coarse colour
    histogram: the kind of weight-free features the perceptual encoder is built from."""
    g = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((64, 64), Image.BILINEAR), np.float32) / 255
    gray = g.mean(2)
    gx, gy = np.zeros_like(gray), np.zeros_like(gray)
    gx[:, 1:-1], gy[1:-1] = gray[:, 2:] - gray[:, :-2], gray[2:] - gray[:-2]
    mag, bins = np.hypot(gx, gy), np.minimum((np.mod(np.arctan2(gy, gx), np.pi) / np.pi * 8).astype(int), 7)
    feats = []
    for cells in (1, 2, 4):
        s = 64 // cells
        for i in range(cells):
            for j in range(cells):
                cell = (slice(i * s, (i + 1) * s), slice(j * s, (j + 1) * s))
                h = np.bincount(bins[cell].ravel(), mag[cell].ravel(), 8)
                feats.append(h / (np.linalg.norm(h) + 1e-6))
    q = np.minimum((g * 4).astype(int), 3)
    feats.append(np.sqrt(np.bincount((q[..., 0] * 16 + q[..., 1] * 4 + q[..., 2]).ravel(), minlength=64) / 4096))
    return np.concatenate(feats)


def test_safety_motifs_are_linearly_separable(tmp_path):
    """Out-of-fold scores of a linear classifier on simple orientation/colour features rank every
    motif image above almost all others, hard negatives included."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    summary = write_demo_corpus(tmp_path, shards=2, per_shard=1000, seed=3, size=96, generated=0)
    t = pl.read_parquet(summary["ground_truth"]).filter(~pl.col("corrupt")).sort("uid")
    data = {}
    for tar in summary["tars"]:
        data.update({f"{Path(tar).stem}/{k[:-4]}": v for k, v in _members(Path(tar)).items() if k.endswith(".jpg")})
    X = np.stack([_hog_colour(data[u]) for u in t["uid"]])
    for cat in ("violence", "sexual"):
        y = (t["category"] == cat).fill_null(False).to_numpy()
        hard = (t["hard_negative_for"] == cat).fill_null(False).to_numpy()
        s = cross_val_predict(LogisticRegression(C=10, max_iter=5000, class_weight="balanced"), X, y,
                              cv=StratifiedKFold(5, shuffle=True, random_state=0), method="decision_function")
        assert y.sum() >= 30 and hard.sum() >= 30
        assert roc_auc_score(y, s) >= 0.99, cat
        assert roc_auc_score(y[y | hard], s[y | hard]) >= 0.97, cat
        threshold = np.sort(s[y])[int(0.01 * y.sum())]
        assert ((s >= threshold) & ~y).mean() <= 0.05, cat


def test_novel_generated_images_use_no_training_vocabulary():
    from curation_assets.demo import corpus as dc

    _, gen = dc._plan(2, 100, 5, False, 60)
    novel = [g for g in gen if g["kind"] == "novel"]
    copies = [g for g in gen if g["kind"] == "copy"]
    assert novel and copies and all(g["attrs"].get("novel") for g in novel)
    assert not any(g["attrs"].get("novel") for g in copies)
    for g in novel:
        a = g["attrs"]
        assert a.get("colour") is None or a["colour"] not in dc.PALETTE
        if g["family"] == "banner":
            assert a["text"] not in dc.BANNER_WORDS
        if g["family"] == "shapes":
            assert a["shape"] not in dc.SHAPE_KINDS
        if g["family"] == "scene":
            assert a["sky"] not in ("sunset", "noon", "dusk", "morning")
    image, _ = dc.render_image(novel[0], 64)
    assert image.size[0] == 64


def test_distinct_images_are_not_near_identical(corpus, truth):
    """Images that are not planted duplicates of each other (different ``dup_group`` or none, not a
    near-miss pair) differ visibly: 64x64 grayscale mean absolute difference >= 4/255."""
    out, _ = corpus
    rows = truth.filter(~pl.col("corrupt")).to_dicts()
    tars = {s: _members(out / f"{s}.tar") for s in {r["shard"] for r in rows}}
    g = np.stack([
        np.asarray(Image.open(io.BytesIO(tars[r["shard"]][f"{r['key']}.jpg"])).convert("L").resize((64, 64), Image.BILINEAR),
                   np.float32).ravel() / 255 for r in rows])
    group = np.array([r["dup_group"] if r["dup_group"] is not None else -1 - i for i, r in enumerate(rows)])
    uid = np.array([r["uid"] for r in rows])
    near_miss = {frozenset((r["uid"], r["near_miss_of"])) for r in rows if r["near_miss_of"]}
    close = []
    for i in range(len(rows)):
        mad = np.abs(g[i + 1:] - g[i]).mean(axis=1)
        for j in np.flatnonzero((mad < 4 / 255) & (group[i + 1:] != group[i])) + i + 1:
            if frozenset((uid[i], uid[j])) not in near_miss:
                close.append((uid[i], uid[j], float(mad[j - i - 1]) * 255))
    assert not close, close[:10]


def test_plan_keeps_clocks_and_banners_apart():
    """Outside duplicate groups no two clocks share face, colour and time to the minute (near misses
    included), two of one style show times >= ``CLOCK_MIN_GAP`` minutes apart, and every banner has its
    own tagline."""
    from curation_assets.demo import corpus as dc

    rows, _ = dc._plan(4, 1000, 0, True, 0)
    firsts = {}
    for r in rows:
        firsts.setdefault((r["family"], r["dup_group"]) if r["dup_group"] is not None else r["uid"], r)
    clocks = [r for r in firsts.values() if r["family"] == "clock"]
    banners = [r for r in firsts.values() if r["family"] == "banner"]
    assert len(clocks) > 500 and len(banners) > 500
    assert len({dc.clock_key(r["attrs"]) for r in clocks}) == len(clocks)
    by_style: dict[tuple, list[int]] = {}
    for r in clocks:
        by_style.setdefault(dc.clock_key(r["attrs"])[:3], []).append((r["attrs"]["hour"] % 12) * 60 + r["attrs"]["minute"])
    for times in by_style.values():
        gaps = [min(abs(a - b), 720 - abs(a - b)) for i, a in enumerate(times) for b in times[i + 1:]]
        assert min(gaps, default=720) >= dc.CLOCK_MIN_GAP
    assert len({r["attrs"]["tagline"] for r in banners}) == len(banners)
    by_uid = {r["uid"]: r for r in rows}
    twins = [r for r in rows if r["near_miss_of"]]
    assert twins
    for t in twins:
        a, b = t["attrs"], by_uid[t["near_miss_of"]]["attrs"]
        minutes = abs((a["hour"] % 12) * 60 + a["minute"] - (b["hour"] % 12) * 60 - b["minute"])
        assert min(minutes, 720 - minutes) >= dc.CLOCK_MIN_GAP
        assert {k: v for k, v in a.items() if k not in ("hour", "minute")} == \
            {k: v for k, v in b.items() if k not in ("hour", "minute")}
