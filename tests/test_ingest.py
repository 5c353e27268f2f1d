"""Ingest accounts for every member group of a shard, whatever is wrong with it."""

import io
import tarfile
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from curation_assets.core.shards import TRUNCATED_KEY, IngestLimits, read_images, read_shard


def _png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", **kw)
    return buf.getvalue()


def _rgb(seed: int, size=(64, 48)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            _add(tar, name, data)
    return path


@pytest.fixture()
def bad_shard(tmp_path) -> tuple[Path, dict[str, tuple[str, str | None]]]:
    """A shard with every kind of bad input; returns the tar and {key: (status, error or warning substring)}."""
    good = _jpeg(_rgb(0))
    truncated = good[: len(good) // 2]
    ppm = io.BytesIO()
    _rgb(1).save(ppm, format="PPM")
    palette = _rgb(2).convert("P", palette=Image.Palette.ADAPTIVE)
    palette.info["transparency"] = 0
    sixteen = Image.fromarray((np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 20).astype("<u2"))
    rgba = Image.new("RGBA", (40, 40), (255, 0, 0, 128))
    members = [
        ("000000000.jpg", good), ("000000000.txt", "a woman on a bike".encode()), ("000000000.json", b'{"url": "u0"}'),
        ("000000001.jpg", truncated), ("000000001.txt", b"cut"),
        ("000000002.jpg", b""), ("000000002.txt", b"zero"),
        ("000000003.jpg", b"this is a caption, not an image"), ("000000003.txt", b"text"),
        ("000000004.jpg", ppm.getvalue()), ("000000004.txt", b"ppm"),
        ("000000005.png", _png(Image.new("1", (3000, 3000)))), ("000000005.txt", b"bomb"),
        ("000000006.png", _png(_rgb(3).convert("L"))), ("000000006.txt", b"gray"),
        ("000000007.jpg", _jpeg(_rgb(4).convert("CMYK"))), ("000000007.txt", b"cmyk"),
        ("000000008.png", _png(rgba)), ("000000008.txt", b"rgba"),
        ("000000009.png", _png(palette)), ("000000009.txt", b"palette"),
        ("000000010.png", _png(sixteen)), ("000000010.txt", b"sixteen"),
        ("000000011.jpg", _jpeg(_rgb(5))),
        ("000000012.jpg", _jpeg(_rgb(6))), ("000000012.txt", "caf\xe9".encode("latin-1")),
        ("000000013.jpg", _jpeg(_rgb(7))), ("000000013.txt", b"first"),
        ("000000013.jpg", _jpeg(_rgb(8))),
        ("../../etc/000000014.jpg", good),
        ("/abs/000000015.jpg", good),
        ("000000016.txt", b"caption without image"),
        ("000000017.svg", b"<svg xmlns='http://www.w3.org/2000/svg'/>"),
        ("000000018.jpg", _jpeg(_rgb(9, size=(4, 4)))),
    ]
    expected = {
        "000000000": ("ok", None),
        "000000001": ("rejected", "corrupt or truncated image"),
        "000000002": ("rejected", "empty file"),
        "000000003": ("rejected", "not an image"),
        "000000004": ("rejected", "unsupported image format PPM"),
        "000000005": ("rejected", "decompression bomb"),
        "000000006": ("ok", "converted from mode L"),
        "000000007": ("ok", "converted from mode CMYK"),
        "000000008": ("ok", "converted from mode RGBA"),
        "000000009": ("ok", "converted from mode P"),
        "000000010": ("ok", "converted from mode I;16"),
        "000000011": ("ok", "missing caption"),
        "000000012": ("ok", "not valid UTF-8"),
        "000000013": ("ok", None),
        "000000013#2": ("rejected", "duplicate key"),
        "../../etc/000000014.jpg": ("rejected", "unsafe member path"),
        "/abs/000000015.jpg": ("rejected", "unsafe member path"),
        "000000016": ("rejected", "no image member"),
        "000000017": ("rejected", "not an image"),
        "000000018": ("rejected", "image too small"),
    }
    return _write_tar(tmp_path / "00000.tar", members), expected


def test_every_bad_input_is_recorded_and_nothing_is_lost(bad_shard):
    tar, expected = bad_shard
    df = read_shard("00000", tar, limits=IngestLimits(max_pixels=4_000_000))
    assert df["uid"].n_unique() == df.height, "uids must be unique"
    assert sorted(df["key"].to_list()) == sorted(expected)
    for row in df.iter_rows(named=True):
        status, text = expected[row["key"]]
        assert row["status"] == status, (row["key"], row["error"])
        assert row["uid"] == f"00000/{row['key']}"
        if status == "rejected":
            assert text in row["error"], (row["key"], row["error"])
        else:
            assert row["error"] is None
            assert row["width"] > 0 and row["height"] > 0 and len(row["sha256"]) == 64
            if text:
                assert text in (row["warnings"] or ""), (row["key"], row["warnings"])
    ok = df.filter(pl.col("key") == "000000000").row(0, named=True)
    assert ok["caption"] == "a woman on a bike" and ok["url"] == "u0" and ok["image_member"] == "000000000.jpg"
    assert df.filter(pl.col("key") == "000000012")["caption"].item() == "caf\ufffd"


def test_decompression_bomb_limit_comes_from_config(bad_shard):
    tar, _ = bad_shard
    relaxed = read_shard("00000", tar, limits=IngestLimits(max_pixels=10_000_000))
    assert relaxed.filter(pl.col("key") == "000000005")["status"].item() == "ok"
    with pytest.raises(ValueError, match="unknown keys"):
        IngestLimits.from_section({"max_pixel": 5})


def test_converted_images_decode_to_rgb(bad_shard):
    from curation_assets.core.shards import decode_rgb

    tar, _ = bad_shard
    df = read_shard("00000", tar, limits=IngestLimits(max_pixels=4_000_000)).filter(pl.col("status") == "ok")
    blobs = read_images(tar, df["image_member"].to_list())
    for member in df["image_member"]:
        img = decode_rgb(blobs[member])
        assert img.mode == "RGB" and img.size[0] > 0
    sixteen = np.asarray(decode_rgb(blobs["000000010.png"]))
    assert sixteen.max() > 0 and sixteen.min() < sixteen.max(), "16-bit values are scaled, not clipped to white"


def test_truncated_tar_keeps_what_was_readable(tmp_path):
    members = []
    for i in range(20):
        members += [(f"0000{i:05d}.jpg", _jpeg(_rgb(i))), (f"0000{i:05d}.txt", f"caption {i}".encode())]
    full = _write_tar(tmp_path / "full.tar", members).read_bytes()
    cut = tmp_path / "00001.tar"
    cut.write_bytes(full[: len(full) // 2])
    df = read_shard("00001", cut)
    ok = df.filter(pl.col("status") == "ok")
    assert 5 <= ok.height < 20
    assert ok["key"].to_list() == [f"0000{i:05d}" for i in range(ok.height)], "everything before the damage survives"
    marker = df.filter(pl.col("key") == TRUNCATED_KEY)
    assert marker.height == 1 and "truncated" in marker["error"].item()


def test_unopenable_shard_names_the_file(tmp_path):
    junk = tmp_path / "00002.tar"
    junk.write_bytes(b"\x00\x01 not a tar at all" * 3)
    with pytest.raises(ValueError, match="00002.tar"):
        read_shard("00002", junk)
    with pytest.raises(FileNotFoundError, match="missing.tar"):
        read_shard("00003", tmp_path / "missing.tar")


def test_parquet_sidecar_fills_missing_captions(tmp_path):
    tar = _write_tar(tmp_path / "00004.tar", [("000040000.jpg", _jpeg(_rgb(1))), ("000040001.jpg", _jpeg(_rgb(2))),
                                              ("000040001.txt", b"from txt")])
    parquet = tmp_path / "00004.parquet"
    pl.DataFrame({"key": ["000040000", "000040001"], "caption": ["from parquet", "ignored"],
                  "url": ["http://a", "http://b"]}).write_parquet(parquet)
    df = read_shard("00004", tar, parquet).sort("key")
    assert df["caption"].to_list() == ["from parquet", "from txt"]
    assert df["url"].to_list() == ["http://a", "http://b"]


def test_images_are_read_back_at_the_offsets_ingest_recorded(bad_shard, tmp_path):
    """Ingest records where each image's bytes start in the tar; reading there (no header parsing) gives the
    validated bytes, and a tar rewritten since (members moved) is read by name instead, never at stale offsets."""
    import hashlib

    from curation_assets.core.shards import iter_images_at

    tar, _ = bad_shard
    df = read_shard("00000", tar, limits=IngestLimits(max_pixels=4_000_000)).filter(pl.col("status") == "ok")
    assert df.height > 3 and df["image_offset"].null_count() == 0
    entries = list(df.select("image_member", "image_offset", "bytes", "sha256").iter_rows())
    read = dict(chunk for batch in iter_images_at(tar, entries, 2) for chunk in batch)
    assert read == read_images(tar, df["image_member"].to_list())
    assert all(hashlib.sha256(read[m]).hexdigest() == d for m, _, _, d in entries)

    moved = tmp_path / "moved.tar"  # the same members, another one written first: every offset shifts
    with tarfile.open(tar) as src, tarfile.open(moved, "w") as dst:
        extra = tarfile.TarInfo("zzz_padding.bin")
        extra.size = 1000
        dst.addfile(extra, io.BytesIO(b"\0" * 1000))
        for member in src.getmembers():
            dst.addfile(member, src.extractfile(member) if member.isfile() else None)
    again = dict(chunk for batch in iter_images_at(moved, entries, 2) for chunk in batch)
    assert again == read
