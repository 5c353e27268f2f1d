"""EXIF orientation: a photo stored sideways with an orientation tag is the picture a person sees, in its
recorded size, its embedding and its duplicate group."""

import io
import shutil
import tarfile

import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner
from PIL import Image

from curation_assets.core.shards import IngestLimits, _validate, decode_rgb, read_images


def sideways_copy(data: bytes) -> bytes:
    """The same picture stored rotated a quarter turn, with EXIF orientation 6 (rotate 90° clockwise to
    display) so that viewers show it upright: what a phone camera writes."""
    img = Image.open(io.BytesIO(data)).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6
    out = io.BytesIO()
    img.rotate(90, expand=True).save(out, "JPEG", quality=95, exif=exif)
    return out.getvalue()


def test_ingest_records_the_displayed_size():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 100, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, "JPEG")
    data = sideways_copy(buf.getvalue())
    facts = _validate(data, IngestLimits())
    assert "error" not in facts and (facts["width"], facts["height"]) == (100, 60)
    assert decode_rgb(data).size == (100, 60)


def test_sideways_copy_embeds_next_to_its_upright_twin(demo_corpus):
    from curation_assets.core.perceptual import DUPLICATE_THRESHOLD, PerceptualEncoder

    tar = demo_corpus / "00000.tar"
    with tarfile.open(tar) as handle:
        names = sorted(m.name for m in handle.getmembers() if m.name.endswith((".jpg", ".png", ".webp")))[:6]
    blobs = read_images(tar, names)
    originals = [blobs[n] for n in names]
    encoder = PerceptualEncoder()
    a = encoder.encode_bytes(originals)
    b = encoder.encode_bytes([sideways_copy(d) for d in originals])
    cosine = (a * b).sum(axis=1)
    assert cosine.min() >= DUPLICATE_THRESHOLD, cosine


@pytest.mark.slow
def test_sideways_copy_is_found_as_a_duplicate(demo_corpus, tmp_path):
    from curation_assets.cli import main

    shards, root = tmp_path / "shards", tmp_path / "root"
    shards.mkdir()
    shutil.copy(demo_corpus / "00000.tar", shards / "00000.tar")
    ok = pl.read_parquet(demo_corpus / "ground_truth.parquet").filter(
        pl.col("uid").str.starts_with("00000/") & pl.col("dup_group").is_null() & ~pl.col("corrupt")
        & pl.col("near_miss_of").is_null())
    with tarfile.open(demo_corpus / "00000.tar") as handle:
        members = {m.name.split(".")[0]: m.name for m in handle.getmembers() if m.name.endswith((".jpg", ".png", ".webp"))}
    keys = [u.split("/", 1)[1] for u in ok["uid"].to_list() if u.split("/", 1)[1] in members][:5]
    blobs = read_images(demo_corpus / "00000.tar", [members[k] for k in keys])
    with tarfile.open(shards / "phone.tar", "w") as out:
        for key in keys:
            for name, data in ((f"{key}.jpg", sideways_copy(blobs[members[key]])), (f"{key}.txt", b"a photo")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                out.addfile(info, io.BytesIO(data))
    result = CliRunner().invoke(main, ["run", "--shards-dir", str(shards), "--root", str(root)])
    assert result.exit_code == 0, result.output
    groups = pl.read_delta(str(root / "delta" / "dedup_groups"))
    group_of = dict(zip(groups["uid"], groups["group_id"]))
    for key in keys:
        assert f"phone/{key}" in group_of and group_of[f"phone/{key}"] == group_of.get(f"00000/{key}"), key
