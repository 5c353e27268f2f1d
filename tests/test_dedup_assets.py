"""The dedup stage end to end through Dagster on the small fixture corpus."""

from __future__ import annotations

import dagster as dg
import numpy as np
import polars as pl
import pytest

DEDUP_ASSETS = ["kmeans_centroids", "cluster_assignments", "duplicate_pairs", "dedup_groups",
                "deduplicated_samples", "dedup_recall"]


@pytest.fixture(scope="module")
def deduped(ingested, tmp_path_factory):
    import yaml

    state = ingested.copy(tmp_path_factory.mktemp("dedup_root"))
    # fit on a random subset smaller than the data, as at scale (K = ceil(n / 25) = 16 in 4 buckets, subset
    # 16 * 20 = 320 of 398)
    config_path = state.root / "demo_config.yaml"
    config = yaml.safe_load(config_path.read_text()) or {}
    config.setdefault("dedup", {})["kmeans"] = {"cluster_size": 25, "fit_points_per_centroid": 20}
    config_path.write_text(yaml.safe_dump(config))
    state.materialize(DEDUP_ASSETS)
    return state


def test_every_sample_exactly_once(deduped):
    storage = deduped.storage
    samples = storage.read("samples", columns=["uid", "status"])
    out = storage.read("deduplicated_samples")
    assert out.height == samples.height
    assert out["uid"].n_unique() == out.height
    assert set(out["uid"]) == set(samples["uid"])
    joined = out.join(samples.rename({"status": "ingest_status"}), on="uid")
    # rejected at ingest <=> status rejected; every ok sample has exactly one of the other fates
    assert (joined.filter(pl.col("ingest_status") != "ok")["status"] == "rejected").all()
    ok = joined.filter(pl.col("ingest_status") == "ok")
    assert set(ok["status"].unique()) <= {"representative", "duplicate", "singleton"}
    assert (out["kept"] == out["status"].is_in(["representative", "singleton"])).all()
    groups = storage.read("dedup_groups")
    assert groups.height > 0
    # one representative per group; removed members point at their group's representative
    per_group = groups.group_by("group_id").agg(pl.col("is_representative").sum().alias("reps"), pl.len().alias("n"))
    assert (per_group["reps"] == 1).all() and (per_group["n"] >= 2).all()
    dups = out.filter(pl.col("status") == "duplicate").join(groups.select("uid", "group_id"), on="uid", suffix="_g")
    assert (dups["group_id"] == dups["group_id_g"]).all()
    reps = set(groups.filter("is_representative")["uid"])
    assert set(dups["representative_uid"]) <= reps


def test_representative_has_highest_resolution(deduped):
    groups = deduped.storage.read("dedup_groups").with_columns((pl.col("width") * pl.col("height")).alias("res"))
    best = groups.group_by("group_id").agg(pl.col("res").max().alias("best"))
    reps = groups.filter("is_representative").join(best, on="group_id")
    assert (reps["res"] == reps["best"]).all()


def test_pairs_and_assignments(deduped):
    storage = deduped.storage
    n = storage.scan("image_embeddings").select(pl.len()).collect().item()
    assignments = storage.read("cluster_assignments")
    assert assignments.height == 5 * n
    assert sorted(assignments["clustering"].unique()) == ["1", "2", "3", "4", "5"]
    centroids = storage.read("kmeans_centroids").sort("clustering")
    target = -(-n // 25)
    assert centroids["buckets"].to_list() == [4] * 5
    for row in centroids.iter_rows(named=True):  # about K fine clusters, split over the buckets by their share
        assert abs(row["k"] - target) <= row["buckets"]
        part = assignments.filter(pl.col("clustering") == row["clustering"])
        assert part["cluster"].max() < row["k"] and part["bucket"].max() < row["buckets"]
        # every cluster lies inside one bucket
        assert part.group_by("cluster").agg(pl.col("bucket").n_unique())["bucket"].max() == 1
    assert centroids["n_fit"].to_list() == [min(n, target * 20)] * 5 and centroids["n_fit"][0] < n
    # the vectors travel with the assignments (the map side of the bucketed search)
    emb = storage.read("image_embeddings").select("uid", "embedding")
    some = assignments.filter(pl.col("clustering") == "3").join(emb, on="uid")
    from curation_assets.core.delta import binary_to_matrix, matrix

    assert some.height == n
    assert np.array_equal(binary_to_matrix(some["vector"], int(centroids["dim"][0])), matrix(some["embedding"]))
    assert centroids["version"].n_unique() == 5
    pairs = storage.read("duplicate_pairs")
    assert pairs.height > 0
    assert (pairs["uid_a"] < pairs["uid_b"]).all()
    assert pairs.select(pl.struct("uid_a", "uid_b").n_unique()).item() == pairs.height
    assert (pairs["n_clusterings"] == pairs["clusterings"].list.len()).all()
    # a pair is reported by clustering c exactly when both ends share a cluster in c
    wide = assignments.pivot(on="clustering", index="uid", values="cluster")
    check = (pairs.join(wide, left_on="uid_a", right_on="uid")
                  .join(wide, left_on="uid_b", right_on="uid", suffix="_b"))
    for c in "12345":
        same = (check[c] == check[f"{c}_b"]).to_numpy()
        listed = check["clusterings"].list.contains(int(c)).to_numpy()
        assert np.array_equal(same, listed)


def test_bucketed_search_returns_exactly_the_pairs_of_the_unbucketed_search(deduped):
    from curation_assets.core import dedup as core
    from curation_assets.core.perceptual import DUPLICATE_THRESHOLD

    storage = deduped.storage
    ids, x = storage.load_embeddings()
    assignments = storage.read("cluster_assignments").select("uid", "clustering", "cluster")
    wide = ids.select("uid").join(assignments.pivot(on="clustering", index="uid", values="cluster"), on="uid",
                                  how="left", maintain_order="left")
    labels = wide.select(list("12345")).to_numpy().astype(np.int32)
    found = core.search_clusterings(x, labels, DUPLICATE_THRESHOLD, core.DedupSettings())
    uids = ids["uid"]
    expected = pl.DataFrame({"uid_a": uids.gather(found.a), "uid_b": uids.gather(found.b),
                             "clusterings": core.mask_to_list(found.mask, 5)}).sort("uid_a", "uid_b")
    pairs = storage.read("duplicate_pairs").select("uid_a", "uid_b", "clusterings").sort("uid_a", "uid_b")
    assert pairs.height == expected.height > 0
    assert pairs["uid_a"].equals(expected["uid_a"]) and pairs["uid_b"].equals(expected["uid_b"])
    assert pairs["clusterings"].cast(pl.List(pl.Int64)).to_list() == expected["clusterings"].to_list()
    state = storage.read("bucket_state")
    assert state.height == 5 * 4 and state["fingerprint"].n_unique() == 20


def test_a_new_shard_re_searches_only_the_buckets_it_lands_in(deduped, tmp_path):
    import io
    import shutil
    import tarfile

    from tests.conftest import open_ingested

    corpus = tmp_path / "corpus"
    shutil.copytree(deduped.corpus, corpus)
    state = open_ingested(corpus, tmp_path / "root", source=deduped.root)
    before = state.storage.read("duplicate_pairs").sort("uid_a", "uid_b")
    # a new shard of three exact copies of images of shard 00000
    with tarfile.open(corpus / "00000.tar") as src, tarfile.open(corpus / "00002.tar", "w") as out:
        jpgs = sorted(m.name for m in src.getmembers() if m.name.endswith(".jpg"))[:3]
        for i, name in enumerate(jpgs):
            data = src.extractfile(name).read()
            for member, blob in ((f"{i:04d}.jpg", data), (f"{i:04d}.txt", b"a copy")):
                info = tarfile.TarInfo(member)
                info.size = len(blob)
                out.addfile(info, io.BytesIO(blob))
    state.pipeline.register_all_shards()
    state.materialize(["samples", "image_embeddings", "cluster_assignments"], shards=["00002"])
    landed = state.storage.read("cluster_assignments").filter(pl.col("shard") == "00002")
    touched = landed.select("clustering", "bucket").unique().height
    assert landed.height == 15 and touched < 20
    meta = _dedup_search(state)
    assert meta["buckets_searched_new_rows_only"] == touched and meta["buckets_reused"] == 20 - touched
    assert meta["buckets_searched"] == 0
    after = state.storage.read("duplicate_pairs").sort("uid_a", "uid_b")
    new = after.filter(pl.col("uid_a").str.starts_with("00002/") | pl.col("uid_b").str.starts_with("00002/"))
    assert new.filter(pl.col("similarity") > 0.999).height >= 3  # each copy found with its original
    old = after.join(new, on=["uid_a", "uid_b"], how="anti")
    assert old.select("uid_a", "uid_b", "clusterings").equals(before.select("uid_a", "uid_b", "clusterings"))
    # only the new candidate pairs were verified on pixels; the others kept their verdicts
    assert meta["pairs_verified_now"] == new.height and meta["verdicts_reused"] == old.height
    assert old.select("uid_a", "uid_b", "verification", "verified").equals(
        before.select("uid_a", "uid_b", "verification", "verified"))
    assert new.filter(pl.col("similarity") > 0.999)["verified"].all()
    # re-running the shard replaces its files: its buckets are searched again in full, the same pairs result
    state.materialize(["cluster_assignments"], shards=["00002"])
    meta = _dedup_search(state)
    assert meta["buckets_searched"] == touched and meta["buckets_reused"] == 20 - touched
    assert meta["pairs_verified_now"] == 0  # the same images: every verdict is reused
    rerun = state.storage.read("duplicate_pairs").sort("uid_a", "uid_b")
    assert rerun.select("uid_a", "uid_b", "clusterings").equals(after.select("uid_a", "uid_b", "clusterings"))
    # the same pairs as searching every bucket from scratch
    shutil.rmtree(state.storage.table_path("bucket_state"))
    assert _dedup_search(state)["buckets_searched"] == 20
    again = state.storage.read("duplicate_pairs").sort("uid_a", "uid_b")
    assert again.select("uid_a", "uid_b", "clusterings").equals(after.select("uid_a", "uid_b", "clusterings"))
    assert state.storage.read("bucket_pairs").select("clustering", "uid_a", "uid_b").is_duplicated().sum() == 0


def _dedup_search(state) -> dict:
    state.materialize(["duplicate_pairs"])
    event = state.pipeline.instance.get_latest_materialization_event(dg.AssetKey("duplicate_pairs"))
    return {k: v.value for k, v in event.asset_materialization.metadata.items()}


def test_recall_table_and_check(deduped):
    recall = deduped.storage.read("dedup_recall").sort("clusterings")
    assert recall["clusterings"].to_list() == [1, 2, 3, 4, 5]
    r = recall["recall"].to_list()
    assert r == sorted(r)
    assert recall["true_pairs"][0] > 0
    # the fixture is small, so the sample is the whole dataset and the exact search covers every pair
    pairs = deduped.storage.read("duplicate_pairs")
    assert recall["found"][-1] == pairs.height


def test_demo_summary(deduped):
    from curation_assets.demo.dedup import summary as demo_summary

    lines = demo_summary(deduped.storage, deduped.corpus)
    text = "\n".join(lines)
    assert "pair recall" in text and "pair precision" in text and "removed as duplicates" in text


def test_pairs_verified_on_pixels_and_groups_use_verified_only(deduped):
    storage = deduped.storage
    pairs = storage.read("duplicate_pairs")
    assert {"verification", "colour_residual", "verified"} <= set(pairs.columns)
    # perceptual encoder: verification is on by default, every candidate got scores
    assert pairs["verification"].null_count() == 0 and pairs["colour_residual"].null_count() == 0
    assert (pairs["verification"] > -1).all()  # every candidate image had its thumbnail
    from curation_assets.core.pixel_verify import VerifySettings

    cfg = VerifySettings()
    expected = (pairs["verification"] >= cfg.structure_threshold) & (pairs["colour_residual"] <= cfg.colour_threshold)
    assert (pairs["verified"] == expected).all()
    groups = storage.read("dedup_groups")
    from curation_assets.core.dedup import connected_components, group_frame

    verified = pairs.filter("verified")
    nodes = sorted(set(verified["uid_a"]) | set(verified["uid_b"]))
    index = {u: i for i, u in enumerate(nodes)}
    comp = connected_components(len(nodes), np.array([index[u] for u in verified["uid_a"]], np.int64),
                                np.array([index[u] for u in verified["uid_b"]], np.int64))
    assert set(groups["uid"]) == set(group_frame(nodes, comp)["uid"])
    # against the fixture's planted groups: verification removes false candidates and keeps planted ones
    truth = pl.read_parquet(deduped.corpus / "ground_truth.parquet").select("uid", "dup_group")
    g = dict(zip(truth["uid"], truth["dup_group"]))
    planted = np.array([g[a] is not None and g[a] == g[b] for a, b in pairs.select("uid_a", "uid_b").iter_rows()])
    ok = pairs["verified"].to_numpy()
    assert ok.sum() > 0 and planted[ok].mean() > planted.mean() + 0.2
    assert planted[ok].sum() >= 0.9 * planted.sum()


def test_a_tiny_memory_budget_is_honoured_and_finds_the_same_pairs(deduped, tmp_path, monkeypatch):
    import shutil

    from tests.conftest import open_ingested

    monkeypatch.setenv("CURATION_MEMORY_GB", "0.0002")  # ~210 KB: tens of rows per read, tens of fit points
    state = open_ingested(deduped.corpus, tmp_path / "root", source=deduped.root)
    shutil.rmtree(state.storage.table_path("bucket_state"))
    meta = _dedup_search(state)
    assert meta["buckets_searched"] == 20
    cap = meta["read_row_cap"]
    sizes = (state.storage.read("cluster_assignments").group_by("clustering", "cluster").len()["len"].max())
    assert meta["largest_bucket"] > cap, "the budget must force buckets to be read in cluster ranges"
    assert meta["largest_read_rows"] <= max(cap, sizes)
    before = deduped.storage.read("duplicate_pairs").sort("uid_a", "uid_b")
    after = state.storage.read("duplicate_pairs").sort("uid_a", "uid_b")
    assert after.select("uid_a", "uid_b", "clusterings", "verified").equals(
        before.select("uid_a", "uid_b", "clusterings", "verified"))
    state.materialize(["kmeans_centroids"])
    event = state.pipeline.instance.get_latest_materialization_event(dg.AssetKey("kmeans_centroids"))
    fit = {k: v.value for k, v in event.asset_materialization.metadata.items()}
    assert fit["n_fit"] <= max(fit["fit_points_cap"], fit["k"]) < 320 and fit["fit_passes"] == 5


def test_memory_budget_setting_is_validated(monkeypatch):
    from curation_assets.definitions import build_resources

    monkeypatch.setenv("CURATION_MEMORY_GB", "lots")
    with pytest.raises(ValueError, match="CURATION_MEMORY_GB must be a positive number"):
        build_resources(root="x")
    monkeypatch.setenv("CURATION_MEMORY_GB", "1.5")
    assert build_resources(root="x")["settings"].memory_budget() == int(1.5 * (1 << 30))


def test_stale_or_missing_assignments_are_refused(deduped):
    from curation_assets.dedup_clusters import check_assignments, current_centroids

    storage = deduped.storage
    centroids = current_centroids(storage)
    versions = dict(zip(centroids["clustering"], centroids["version"]))
    embedded = storage.scan("image_embeddings").group_by("shard").agg(pl.len().alias("n")).collect()
    check_assignments(storage, embedded, versions)
    with pytest.raises(dg.Failure, match="since been refitted"):
        check_assignments(storage, embedded, {**versions, "3": "another-fit"})
    one_more = embedded.with_columns(pl.col("n") + (pl.col("shard") == "00001").cast(pl.UInt32))
    with pytest.raises(dg.Failure, match=r"no or stale cluster assignments \(shards \['00001'\]\)"):
        check_assignments(storage, one_more, versions)


def test_centroid_check_warns_once_the_data_has_doubled_since_the_fit(deduped, tmp_path):
    import shutil

    from curation_assets.dedup import centroids_fit_the_data

    result = centroids_fit_the_data(storage=deduped.storage, settings=deduped.settings)
    assert result.passed and result.metadata["growth"].value == pytest.approx(1.0)
    root = tmp_path / "root"
    shutil.copytree(deduped.root, root, ignore=shutil.ignore_patterns("dagster_home"))
    from resources.storage import DeltaStorage

    storage = DeltaStorage(root=str(root))
    rows = storage.read("kmeans_centroids").with_columns((pl.col("n_embeddings") // 3).alias("n_embeddings"))
    storage.write_table("kmeans_centroids", rows)  # as if fitted when a third of today's data existed
    result = centroids_fit_the_data(storage=storage, settings=deduped.settings)
    assert not result.passed and "refit kmeans_centroids" in result.description


def test_verdicts_are_reused_only_for_the_same_images_and_settings(deduped):
    from curation_assets.core.pixel_verify import VerifySettings
    from curation_assets.dedup import reusable_verdicts

    pairs = deduped.storage.read("duplicate_pairs").select("uid_a", "uid_b", "sha256_a", "sha256_b")
    version = VerifySettings().version()
    assert VerifySettings(workers=7).version() == version  # speed settings decide no verdict
    assert reusable_verdicts(deduped.storage, pairs, version)["verification"].null_count() == 0
    stricter = VerifySettings(structure_threshold=0.6).version()
    assert reusable_verdicts(deduped.storage, pairs, stricter)["verification"].null_count() == pairs.height
    replaced = pairs.with_columns(pl.when(pl.int_range(pl.len()) == 0).then(pl.lit("another image"))
                                  .otherwise(pl.col("sha256_a")).alias("sha256_a"))
    assert reusable_verdicts(deduped.storage, replaced, version)["verification"].null_count() == 1


def _asset_metadata(results, asset: str) -> dict:
    for result in results:
        for event in result.get_asset_materialization_events():
            if event.asset_key.to_user_string() == asset:
                return {k: v.value for k, v in event.materialization.metadata.items()}
    raise AssertionError(f"{asset} was not materialised")


def test_verification_reads_thumbnails_not_tars(deduped, tmp_path):
    """Every embedded image carries its thumbnail, so with every tar gone the verdicts are the same."""
    import shutil

    from tests.conftest import open_ingested

    embeddings = deduped.storage.read("image_embeddings", columns=["uid", "thumbnail"])
    assert embeddings["thumbnail"].null_count() == 0 and embeddings["thumbnail"].bin.size().min() > 500
    corpus = tmp_path / "corpus"
    shutil.copytree(deduped.corpus, corpus)
    state = open_ingested(corpus, tmp_path / "root", source=deduped.root)
    shutil.rmtree(state.storage.table_path("duplicate_pairs"))  # no verdict to reuse
    for tar in corpus.glob("*.tar"):
        tar.unlink()
    meta = _asset_metadata(state.materialize(["duplicate_pairs"]), "duplicate_pairs")
    assert meta["images_read_from_tars"] == 0 and meta["unreadable_images"] == 0 and meta["pairs_verified_now"] > 0
    before = deduped.storage.read("duplicate_pairs").sort("uid_a", "uid_b")
    after = state.storage.read("duplicate_pairs").sort("uid_a", "uid_b")
    assert after.select("uid_a", "uid_b", "verified").equals(before.select("uid_a", "uid_b", "verified"))
    assert np.allclose(after["verification"].to_numpy(), before["verification"].to_numpy(), atol=1e-5)


def test_images_embedded_without_thumbnails_are_read_from_their_tars(deduped, tmp_path):
    """Tables written before thumbnails existed (or with verification off) still verify, from the tars."""
    import shutil

    state = deduped.copy(tmp_path / "root")
    shard = state.storage.shards("image_embeddings")[0]
    old = state.storage.read("image_embeddings", [shard]).with_columns(pl.lit(None, pl.Binary).alias("thumbnail"))
    state.storage.write_shard("image_embeddings", old, shard)
    shutil.rmtree(state.storage.table_path("duplicate_pairs"))
    meta = _asset_metadata(state.materialize(["duplicate_pairs"]), "duplicate_pairs")
    assert meta["images_read_from_tars"] > 0 and meta["unreadable_images"] == 0
    before = deduped.storage.read("duplicate_pairs").sort("uid_a", "uid_b")
    after = state.storage.read("duplicate_pairs").sort("uid_a", "uid_b")
    assert after.select("uid_a", "uid_b", "verified").equals(before.select("uid_a", "uid_b", "verified"))


def test_verification_pieces_bound_memory_and_cover_every_pair():
    from curation_assets.dedup import _verify_chunks
    from resources.compute import ComputeResource

    todo = pl.DataFrame({"uid_a": [f"s/{i % 97:03d}" for i in range(1000)], "uid_b": [f"t/{i}" for i in range(1000)]})
    pieces = _verify_chunks(todo, ComputeResource(), piece=300)
    assert len(pieces) == 4 and max(p.height for p in pieces) <= 300
    assert pl.concat(pieces).sort("uid_b").equals(todo.sort("uid_b"))
    assert len(_verify_chunks(todo, ComputeResource())) == 1 and _verify_chunks(todo.head(0), ComputeResource()) == []


def test_embeddings_read_at_ingest_offsets_equal_a_full_read_of_the_tar(deduped, tmp_path):
    """image_embeddings reads each image at the offset ingest recorded. A samples table written before offsets
    existed has no such column; re-ingesting one shard adds it (null for the others), and the shards without
    offsets read their tars through. Both give the same vectors and thumbnails."""
    import shutil

    state = deduped.copy(tmp_path / "root")
    older = state.storage.read("samples").drop("image_offset")
    shutil.rmtree(state.storage.table_path("samples"))
    for shard in older["shard"].unique().sort().to_list():
        state.storage.write_shard("samples", older.filter(pl.col("shard") == shard), shard)
    first, second = state.storage.shards("samples")[:2]
    state.materialize(["samples"], [first])
    assert state.storage.read("samples", [second])["image_offset"].null_count() == older.filter(
        pl.col("shard") == second).height
    ok = state.storage.read("samples", [first]).filter(pl.col("status") == "ok").height
    meta = _asset_metadata(state.materialize(["image_embeddings"], [first]), "image_embeddings")
    assert meta["images_read_at_ingest_offsets"] == ok > 0
    meta = _asset_metadata(state.materialize(["image_embeddings"], [second]), "image_embeddings")
    assert meta["images_read_at_ingest_offsets"] == 0
    for shard in (first, second):
        before = deduped.storage.read("image_embeddings", [shard]).sort("uid")
        after = state.storage.read("image_embeddings", [shard]).sort("uid")
        assert after["uid"].equals(before["uid"]) and after["thumbnail"].equals(before["thumbnail"])
        assert np.array_equal(np.stack(after["embedding"].to_numpy()), np.stack(before["embedding"].to_numpy()))
