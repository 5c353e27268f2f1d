"""Shard groups (CURATION_SHARD_GROUP): a partition is a block of numbered tars, so 10^9 images stay under ~10^4
partitions. 20 tars grouped 5 per partition run through the whole graph as 4 partitions, every sample once."""

import tarfile

import polars as pl
import pytest
from click.testing import CliRunner

from resources.shard_source import ShardSource
from tests.conftest import demo_shards


def _members(tar) -> set[str]:
    with tarfile.open(tar) as handle:
        return {m.name.split(".")[0] for m in handle.getmembers() if m.isfile()}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_twenty_tars_in_groups_of_five_make_four_partitions_with_every_row(tmp_path, monkeypatch):
    import dagster as dg

    from curation_assets.cli import main
    from curation_assets.pipeline import dagster_home
    from resources.storage import DeltaStorage

    shards, root = tmp_path / "shards", tmp_path / "root"
    demo_shards(shards, 20, 12, size=64, seed=3)
    tars = sorted(shards.glob("*.tar"))
    assert len(tars) == 20
    expected = {f"{t.stem}/{key}" for t in tars for key in _members(t)}

    monkeypatch.setenv("CURATION_SHARD_GROUP", "5")
    ran = CliRunner().invoke(main, ["run", "--shards-dir", str(shards), "--root", str(root)])
    assert ran.exit_code == 0, ran.output

    groups = ["00000-00004", "00005-00009", "00010-00014", "00015-00019"]
    instance = dg.DagsterInstance.from_config(str(dagster_home(root)))
    assert sorted(instance.get_dynamic_partitions("shards")) == groups
    storage = DeltaStorage(root=str(root))
    samples = storage.read("samples", columns=["uid", "shard", "key", "status", "image_member"])
    assert sorted(samples["shard"].unique()) == groups
    assert samples["uid"].n_unique() == samples.height
    # every member group of every tar is one row, under its group, keyed by its tar
    assert set(samples["key"]) == expected
    assert all(uid.startswith(f"{shard}/{key.split('/')[0]}/") for uid, shard, key in
               samples.select("uid", "shard", "key").iter_rows())
    ok = samples.filter(pl.col("status") == "ok")
    assert storage.read("image_embeddings", columns=["uid"])["uid"].sort().to_list() == ok["uid"].sort().to_list()
    verdicts = storage.read("training_set", columns=["uid", "verdict"])
    assert verdicts.height == samples.height and set(verdicts["uid"]) == set(samples["uid"])

    # the pictures are found again through the group (what verification, thumbnails and the census read)
    source = ShardSource(uri=str(shards), group_size=5)
    ref = source.get("00005-00009")
    assert [p.key for p in ref.tars] == ["00005", "00006", "00007", "00008", "00009"]
    part = ok.filter(pl.col("shard") == "00005-00009")
    blobs = ref.read_images(part["image_member"].to_list())
    assert len(blobs) == part.height and all(blobs.values())
    # and at the offsets ingest recorded inside each tar of the group (what image_embeddings reads)
    located = storage.read("samples", ["00005-00009"]).filter(pl.col("status") == "ok")
    at = {m: d for batch in ref.iter_images_at(located.select("image_member", "image_offset", "bytes", "sha256")
                                               .iter_rows(), 7) for m, d in batch}
    assert at == blobs


def test_groups_follow_the_tar_numbers_and_skip_other_names(tmp_path):
    for name in ("00000", "00003", "00007", "00012", "extra"):
        with tarfile.open(tmp_path / f"{name}.tar", "w"):
            pass
    refs, skipped = ShardSource(uri=str(tmp_path), group_size=5).scan()
    assert [(r.key, [p.key for p in r.tars]) for r in refs] == [
        ("00000-00004", ["00000", "00003"]), ("00005-00009", ["00007"]), ("00010-00014", ["00012"])]
    assert [s.name for s in skipped] == ["extra.tar"] and "numbered" in skipped[0].reason
    # a group that gains a tar is a changed partition (its stamp changes), so the sensor re-ingests it
    before = refs[0].stamp()
    with tarfile.open(tmp_path / "00001.tar", "w"):
        pass
    after = ShardSource(uri=str(tmp_path), group_size=5).get("00000-00004")
    assert [p.key for p in after.tars] == ["00000", "00001", "00003"] and after.stamp() != before
    with pytest.raises(FileNotFoundError):
        ShardSource(uri=str(tmp_path), group_size=5).get("00020-00024")
