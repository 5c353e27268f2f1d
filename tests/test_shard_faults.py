"""Faults at the shard level: a bad shard never blocks the others, a vanished one can be forgotten, and every
tar-like file is either a partition or reported with the reason."""

import re
import shutil

import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner

from curation_assets.cli import main
from resources.shard_source import ShardSource, shard_key, valid_key


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory):
    corpus = tmp_path_factory.mktemp("tiny") / "corpus"
    made = CliRunner().invoke(main, ["demo-data", "--out", str(corpus), "--shards", "2", "--per-shard", "60",
                                     "--size", "96", "--seed", "7"])
    assert made.exit_code == 0, made.output
    return corpus


def _run(shards, root):
    return CliRunner().invoke(main, ["run", "--shards-dir", str(shards), "--root", str(root)])


@pytest.mark.slow
def test_a_corrupt_shard_among_good_ones_is_recorded_and_the_rest_curated(tiny_corpus, tmp_path):
    shards, root = tmp_path / "shards", tmp_path / "root"
    shutil.copytree(tiny_corpus, shards)
    (shards / "00009.tar").write_bytes(b"this is not a tar file at all" * 40)
    (shards / "00010.tar").write_bytes(b"")

    first = _run(shards, root)
    assert first.exit_code == 1, first.output + first.stderr
    assert re.search(r"shard 00009 failed: unreadable shard: cannot open shard .*00009\.tar", first.stderr)
    assert "shard 00010 failed" in first.stderr and "2 of 4 shards could not be read" in first.stderr
    samples = pl.read_delta(str(root / "delta" / "samples"))
    assert samples.filter(pl.col("shard").is_in(["00000", "00001"])).height == 120
    bad = samples.filter(pl.col("shard").is_in(["00009", "00010"]))
    assert bad["key"].to_list() == ["_shard_unreadable"] * 2 and set(bad["status"]) == {"rejected"}
    final = pl.read_delta(str(root / "delta" / "training_set"))
    assert final.height == samples.height and final["uid"].n_unique() == final.height
    assert final.filter(pl.col("uid").str.starts_with("00009/"))["verdict"].to_list() == ["rejected"]
    embedded = pl.read_delta(str(root / "delta" / "image_embeddings"))
    assert set(embedded["shard"]) == {"00000", "00001"}

    # the bad files are moved away: the run succeeds and says the shards' files are gone
    (shards / "00009.tar").unlink()
    (shards / "00010.tar").unlink()
    second = _run(shards, root)
    assert second.exit_code == 0, second.output + second.stderr
    assert "shard 00009 is registered but its file is gone" in second.output

    removed = CliRunner().invoke(main, ["shards", "remove", "00009", "00010", "--root", str(root)])
    assert removed.exit_code == 0, removed.output
    assert "samples" in removed.output and "training_set" in removed.output
    samples = pl.read_delta(str(root / "delta" / "samples"))
    assert set(samples["shard"]) == {"00000", "00001"}
    listed = CliRunner().invoke(main, ["shards", "list", "--root", str(root), "--shards-dir", str(shards)])
    assert "00009" not in listed.output and "00000\t00000.tar\tok" in listed.output
    third = _run(shards, root)
    assert third.exit_code == 0 and "file is gone" not in third.output
    final = pl.read_delta(str(root / "delta" / "training_set"))
    assert final.height == 120 and set(final["shard"]) == {"00000", "00001"}


def test_odd_names_are_mapped_to_keys_or_reported(tmp_path):
    source_tar = tmp_path / "src.tar"
    source_tar.write_bytes(b"")
    names = ["my shard.tar", "shärd.tar", "a,b.tar", "UPPER.TAR", "..tar", "ok-01.tar", "x.tar.tmp",
             "y.tar.gz", "...tar"]
    shards = tmp_path / "shards"
    shards.mkdir()
    for name in names:
        shutil.copy(source_tar, shards / name)
    (shards / "notes.txt").write_text("not a shard")
    refs, skipped = ShardSource(uri=str(shards)).scan()
    by_name = {ref.name: ref.key for ref in refs}
    assert set(by_name) == {"my shard.tar", "shärd.tar", "a,b.tar", "UPPER.TAR", "..tar", "ok-01.tar", "...tar"}
    assert by_name["ok-01.tar"] == "ok-01" and by_name["UPPER.TAR"] == "UPPER"
    assert by_name["my shard.tar"].startswith("my_shard-") and by_name["a,b.tar"].startswith("a_b-")
    assert all(valid_key(k) for k in by_name.values()) and len(set(by_name.values())) == len(by_name)
    assert {s.name: s.reason for s in skipped} == {
        "x.tar.tmp": "still being written (a temporary download name)",
        "y.tar.gz": "compressed tars are not read; store shards as plain .tar"}
    for name, key in by_name.items():
        assert ShardSource(uri=str(shards)).get(key).name == name
    assert shard_key("a,b") != shard_key("a;b")  # the hash keeps names apart that map to the same letters


@pytest.mark.slow
def test_odd_names_are_ingested_under_their_keys(tiny_corpus, tmp_path):
    shards, root = tmp_path / "shards", tmp_path / "root"
    shards.mkdir()
    for name in ("my shard.tar", "shärd.tar", "a,b.tar", "UPPER.TAR"):
        shutil.copy(tiny_corpus / "00000.tar", shards / name)
    result = _run(shards, root)
    assert result.exit_code == 0, result.output + result.stderr
    samples = pl.read_delta(str(root / "delta" / "samples"))
    keys = {ref.key for ref in ShardSource(uri=str(shards)).list_shards()}
    assert set(samples["shard"]) == keys and len(keys) == 4
    assert samples.group_by("shard").len()["len"].to_list() == [60] * 4
    assert "my shard.tar: partition key 'my_shard-" in result.output


def test_a_tar_not_grouped_by_key_loses_nothing(tmp_path):
    """Ingest streams one key's group at a time; members that come back to an earlier key are recorded."""
    import io
    import tarfile

    from PIL import Image

    from curation_assets.core.shards import read_shard

    def jpeg(seed: int) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, "JPEG")
        return buf.getvalue()

    tar_path = tmp_path / "x.tar"
    with tarfile.open(tar_path, "w") as tar:
        for name, data in (("a.jpg", jpeg(1)), ("a.txt", b"first"), ("b.jpg", jpeg(2)), ("a.txt", b"late"),
                           ("a.jpg", jpeg(3)), ("c.jpg", jpeg(4))):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    df = read_shard("x", tar_path).sort("uid")
    assert df.height == 5 and df["uid"].n_unique() == 5
    ok = df.filter(pl.col("status") == "ok")
    assert ok["uid"].to_list() == ["x/a", "x/b", "x/c"] and ok.filter(pl.col("key") == "a")["caption"].item() == "first"
    errors = df.filter(pl.col("status") == "rejected")["error"].to_list()
    assert any("comes after the other members of key 'a'" in e for e in errors)
    assert any(e.startswith("duplicate key 'a'") for e in errors)


def test_the_ui_job_removes_a_shard_like_the_cli(ingested, tmp_path):
    """shard_removal_job, launched with config as from the Launchpad, forgets a shard in tables and instance."""
    import dagster as dg

    from curation_assets.sensors import shard_removal_job

    state = ingested.copy(tmp_path / "root")
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("shards", ["00000", "00001"])
    result = shard_removal_job.execute_in_process(
        instance=instance, resources={"storage": state.storage},
        run_config={"ops": {"remove_shards": {"config": {"shards": ["00001"]}}}})
    assert result.success
    assert instance.get_dynamic_partitions("shards") == ["00000"]
    for table in ("samples", "image_embeddings"):
        assert set(state.storage.read(table, columns=["shard"])["shard"]) == {"00000"}, table
    with pytest.raises(dg.Failure, match="not registered"):
        shard_removal_job.execute_in_process(instance=instance, resources={"storage": state.storage},
                                             run_config={"ops": {"remove_shards": {"config": {"shards": ["nope"]}}}})
