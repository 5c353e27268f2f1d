"""Reading img2dataset / WebDataset tar shards without extracting them, and validating every member.

A shard is a tar of member groups that share a key: ``{key}.jpg|png|webp`` (the image), ``{key}.txt`` (the
caption), ``{key}.json`` (metadata). :func:`read_shard` turns every group into exactly one row: ``status =
"ok"`` with a decoded, validated image, or ``status = "rejected"`` with a readable ``error``. Nothing is
written to disk, so member names with ``..`` or absolute paths are harmless; they are still rejected.
A tar cut off in the middle keeps every group read before the damage and adds one rejected row that
records where the stream broke.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import warnings as pywarnings
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Iterable, Iterator, Sequence

import numpy as np
import polars as pl
from PIL import Image

from curation_assets.core.images import upright
from curation_assets.core.location import as_path

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
TRUNCATED_KEY = "_tar_truncated"
UNREADABLE_KEY = "_shard_unreadable"

SAMPLES_SCHEMA = {
    "uid": pl.String,
    "shard": pl.String,
    "key": pl.String,
    "caption": pl.String,
    "url": pl.String,
    "width": pl.Int32,
    "height": pl.Int32,
    "mode": pl.String,
    "format": pl.String,
    "bytes": pl.Int64,
    "sha256": pl.String,
    "image_member": pl.String,
    "image_offset": pl.Int64,
    "status": pl.String,
    "error": pl.String,
    "warnings": pl.String,
}


@dataclass
class IngestLimits:
    """What a valid image is: ``max_pixels`` guards against decompression bombs."""

    max_pixels: int = 89_478_485
    min_side: int = 8
    allowed_formats: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
    image_extensions: tuple[str, ...] = IMAGE_EXTENSIONS

    @classmethod
    def from_section(cls, section: dict) -> "IngestLimits":
        from curation_assets.core.validation import check_fields

        check_fields("ingest", cls, section)
        limits = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in section.items()})
        if limits.max_pixels <= 0 or limits.min_side <= 0:
            raise ValueError("ingest config: max_pixels and min_side must be positive")
        return limits


@dataclass
class _Group:
    key: str
    images: list[tuple[str, bytes, int]] = field(default_factory=list)  # member, bytes, data offset in the tar
    caption: bytes | None = None
    meta: bytes | None = None
    problems: list[str] = field(default_factory=list)


def _unsafe(name: str) -> bool:
    path = PurePosixPath(name)
    return name.startswith(("/", "\\")) or ".." in path.parts or (len(name) > 1 and name[1] == ":")


def _split(name: str) -> tuple[str, str]:
    base = PurePosixPath(name).name
    stem, dot, ext = base.partition(".")
    return (stem, ext.lower()) if dot else (base, "")


def iter_members(tar_path: Path) -> Iterator[tuple[tarfile.TarInfo | None, bytes | None, str | None]]:
    """Stream ``(info, data, error)`` for every member; a final ``(None, None, error)`` if the tar is truncated."""
    stream = as_path(tar_path).open("rb")
    try:
        handle = tarfile.open(fileobj=stream, mode="r|*")
    except (tarfile.TarError, OSError, EOFError) as exc:
        stream.close()
        raise ValueError(f"cannot open shard {tar_path}: {exc}") from exc
    with stream, handle:
        while True:
            try:
                info = handle.next()
            except (tarfile.TarError, OSError, EOFError) as exc:
                yield None, None, f"tar truncated or corrupt after {handle.offset} bytes: {exc}"
                return
            if info is None:
                return
            if not info.isfile():
                yield info, None, None if info.isdir() else f"unsupported tar member type ({'link' if info.issym() or info.islnk() else 'special'})"
                continue
            try:
                data = handle.extractfile(info).read()
                if len(data) != info.size:
                    raise EOFError(f"member has {len(data)} of {info.size} bytes")
            except (tarfile.TarError, OSError, EOFError) as exc:
                yield info, None, f"tar truncated inside member {info.name!r}: {exc}"
                yield None, None, f"tar truncated or corrupt at member {info.name!r}: {exc}"
                return
            yield info, data, None


def _validate(data: bytes, limits: IngestLimits) -> dict:
    """Decode one image as far as validation needs (to RGB, upright; JPEGs at a reduced DCT scale) and return
    its facts, with ``error`` when it is rejected."""
    facts: dict = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    if not data:
        facts["error"] = "empty file (0 bytes)"
        return facts
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with pywarnings.catch_warnings():
            pywarnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data))
            fmt = img.format
            width, height = img.size
            if img.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # rotated a quarter turn when displayed
                width, height = height, width
            facts.update(width=width, height=height, mode=img.mode, format=fmt)
            if img.format not in limits.allowed_formats:
                facts["error"] = f"unsupported image format {img.format}"
                return facts
            if img.width * img.height > limits.max_pixels:
                facts["error"] = (f"decompression bomb: {img.width}x{img.height} = {img.width * img.height} pixels "
                                  f"exceeds max_pixels={limits.max_pixels}")
                return facts
            if min(img.width, img.height) < limits.min_side:
                facts["error"] = f"image too small: {img.width}x{img.height} (min_side={limits.min_side})"
                return facts
            if fmt == "JPEG":  # every scan is still entropy-decoded (truncation is caught), at 1/8 the side
                img.draft(None, (max(1, img.width // 8), max(1, img.height // 8)))
            img.load()
            to_rgb(upright(img))
            return facts
    except Exception as exc:  # PIL raises many types for bad bytes; every one becomes a recorded rejection
        kind = "not an image" if "cannot identify" in str(exc) else "corrupt or truncated image"
        facts["error"] = f"{kind}: {exc}"
        return facts
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB: alpha composited on white, 16-bit and float scaled, CMYK and palette converted."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / top * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def decode_rgb(data: bytes) -> Image.Image:
    """Decode bytes already validated by ingest into an RGB image."""
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return to_rgb(upright(img))
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def _caption(group: _Group, fallback: str | None, warnings: list[str]) -> str | None:
    if group.caption is None:
        if fallback is not None:
            warnings.append("caption taken from the shard parquet (no .txt member)")
            return fallback
        warnings.append("missing caption")
        return None
    try:
        return group.caption.decode("utf-8").strip()
    except UnicodeDecodeError:
        warnings.append("caption is not valid UTF-8 (undecodable bytes replaced)")
        return group.caption.decode("utf-8", errors="replace").strip()


def _parquet_rows(parquet: Path | None) -> dict[str, dict]:
    if parquet is None:
        return {}
    try:
        df = pl.read_parquet(str(parquet))
    except Exception as exc:  # an unreadable sidecar must not lose the shard
        return {"__error__": {"error": f"unreadable parquet {parquet.name}: {exc}"}}
    if "key" not in df.columns:
        return {}
    keep = [c for c in ("key", "caption", "url") if c in df.columns]
    return {str(r["key"]): r for r in df.select(keep).iter_rows(named=True)}


def read_shard(shard: str, tar_path: Path, parquet_path: Path | None = None,
               limits: IngestLimits | None = None) -> pl.DataFrame:
    """One ``samples`` row per member group of the shard (see module docstring). Members are streamed and a
    group's bytes are released as soon as its key ends, so memory holds one group, not the shard (tars
    written by img2dataset keep a key's members together). Raises only when the tar cannot be opened at
    all, naming the file."""
    limits = limits or IngestLimits()
    tar_path = as_path(tar_path)
    if not tar_path.is_file():
        raise FileNotFoundError(f"shard {shard!r}: tar file {tar_path} does not exist")
    sidecar = _parquet_rows(parquet_path)
    rows: list[dict] = []
    truncation: str | None = None
    current: _Group | None = None
    emitted: dict[str, int] = {}  # key -> images already read, for groups already turned into rows

    def flush() -> None:
        """Turn the finished group into rows and let go of its bytes (one group in memory at a time)."""
        nonlocal current
        if current is not None:
            meta = sidecar.get(current.key, {})
            rows.extend(_group_rows(shard, current, meta.get("caption"), meta.get("url"), limits))
            emitted[current.key] = len(current.images)
            current = None

    for info, data, error in iter_members(tar_path):
        if info is None:
            truncation = error
            break
        if info.isdir():
            continue
        key, ext = _split(info.name)
        if _unsafe(info.name):
            rows.append(_rejected(shard, info.name, f"unsafe member path {info.name!r} (absolute or '..'); not read"))
            continue
        if current is None or current.key != key:
            flush()
            if key in emitted:  # a tar not grouped by key: this member comes after its group was read
                rows.append(_late_member(shard, key, info.name, data, ext in limits.image_extensions, emitted))
                continue
            current = _Group(key)
        g = current
        if error is not None:
            g.problems.append(f"{info.name}: {error}")
            continue
        if ext in limits.image_extensions:
            g.images.append((info.name, data, info.offset_data))
        elif ext == "txt":
            if g.caption is not None:
                g.problems.append(f"duplicate caption member {info.name!r} (first one kept)")
            else:
                g.caption = data
        elif ext == "json":
            g.meta = data
        elif ext in ("svg", "heic", "heif", "avif", "jp2", "psd", "ico", "pdf"):
            g.images.append((info.name, data, info.offset_data))
        else:
            g.problems.append(f"ignored member {info.name!r} (unknown extension)")
    flush()
    if truncation is not None:
        rows.append(_rejected(shard, TRUNCATED_KEY, truncation))
    if "__error__" in sidecar:
        for row in rows:
            row["warnings"] = "; ".join(filter(None, [row.get("warnings"), sidecar["__error__"]["error"]]))
    return _unique_uids(pl.DataFrame(rows, schema=SAMPLES_SCHEMA) if rows else pl.DataFrame(schema=SAMPLES_SCHEMA))


def within_group(df: pl.DataFrame, shard: str, tar_key: str) -> pl.DataFrame:
    """The rows :func:`read_shard` made of one tar of a shard group, keyed inside the group: key and image
    member prefixed with the tar's key, uid ``{shard}/{tar_key}/{key}``."""
    key = pl.lit(tar_key + "/") + pl.col("key")
    return df.with_columns(uid=pl.lit(shard + "/") + key, key=key,
                           image_member=pl.lit(tar_key + "/") + pl.col("image_member"))


def _late_member(shard: str, key: str, name: str, data: bytes | None, is_image: bool, emitted: dict[str, int]) -> dict:
    """A rejected row for a member whose key's group already ended (members of one key are not adjacent in
    the tar): an image is a duplicate of the key, anything else is recorded and not read."""
    if is_image and data is not None:
        emitted[key] += 1
        row = _rejected(shard, f"{key}#{emitted[key]}", f"duplicate key {key!r}: {name!r} repeats an image already "
                                                         "read for this key")
        row.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest(), image_member=name)
        return row
    return _rejected(shard, key, f"member {name!r} comes after the other members of key {key!r} (the tar is not "
                                 "grouped by key); not read")


def unreadable_shard(shard: str, error: str) -> pl.DataFrame:
    """The ``samples`` rows of a shard whose file cannot be read as a tar at all: one rejected row that
    records why, so the shard is accounted for and visible (the funnel, ``curate run``'s summary)."""
    return pl.DataFrame([_rejected(shard, UNREADABLE_KEY, f"unreadable shard: {error}")], schema=SAMPLES_SCHEMA)


def _url(meta: bytes | None, fallback: str | None, warnings: list[str]) -> str | None:
    if meta is None:
        return fallback
    try:
        parsed = json.loads(meta.decode("utf-8"))
        return parsed.get("url", fallback) if isinstance(parsed, dict) else fallback
    except (UnicodeDecodeError, json.JSONDecodeError):
        warnings.append("metadata .json is not valid UTF-8 JSON")
        return fallback


def _group_rows(shard: str, g: _Group, parquet_caption: str | None, parquet_url: str | None,
                limits: IngestLimits) -> list[dict]:
    warnings = list(g.problems)
    if not g.images:
        row = _rejected(shard, g.key, "no image member for this key")
        row["caption"] = _caption(g, parquet_caption, [])
        row["warnings"] = "; ".join(warnings) or None
        return [row]
    rows = []
    caption = _caption(g, parquet_caption, warnings)
    url = _url(g.meta, parquet_url, warnings)
    for i, (member, data, offset) in enumerate(g.images):
        key = g.key if i == 0 else f"{g.key}#{i + 1}"
        row = _rejected(shard, key, None)
        row.update(caption=caption, url=url, image_member=member, image_offset=offset)
        if i > 0:
            row["error"] = f"duplicate key {g.key!r}: {member!r} repeats an image already read for this key"
            row.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
        else:
            facts = _validate(data, limits)
            row.update({k: v for k, v in facts.items() if k != "error"})
            if "error" in facts:
                row["error"] = facts["error"]
            else:
                row["status"] = "ok"
        if row["mode"] not in (None, "RGB") and row["status"] == "ok":
            warnings_i = warnings + [f"converted from mode {row['mode']} to RGB"]
        else:
            warnings_i = warnings
        row["warnings"] = "; ".join(warnings_i) or None
        rows.append(row)
    return rows


def _rejected(shard: str, key: str, error: str | None) -> dict:
    return {
        "uid": f"{shard}/{key}", "shard": shard, "key": key, "caption": None, "url": None, "width": None,
        "height": None, "mode": None, "format": None, "bytes": None, "sha256": None, "image_member": None,
        "image_offset": None, "status": "rejected", "error": error, "warnings": None,
    }


def _unique_uids(df: pl.DataFrame) -> pl.DataFrame:
    """Rows that would share a uid (an unsafe name reused, a member after its group) get the first free
    ``#n`` suffix, so none is lost and no two rows share a uid."""
    uids = df["uid"].to_list()
    taken = set(uids)
    if len(taken) == len(uids):
        return df
    seen: set[str] = set()
    out = []
    for uid in uids:
        if uid in seen:
            n = 2
            while f"{uid}#{n}" in taken:
                n += 1
            uid = f"{uid}#{n}"
            taken.add(uid)
        seen.add(uid)
        out.append(uid)
    return df.with_columns(pl.Series("uid", out, dtype=pl.String))


def read_images(tar_path: Path, members: Iterable[str]) -> dict[str, bytes]:
    """The bytes of the named members, in one streaming pass over the tar."""
    wanted = set(members)
    found: dict[str, bytes] = {}
    if not wanted:
        return found
    for info, data, _ in iter_members(tar_path):
        if info is None:
            break
        if data is not None and info.name in wanted and info.name not in found:
            found[info.name] = data
            if len(found) == len(wanted):
                break
    return found


def iter_images_at(tar_path: Path, entries: Sequence[tuple[str, int, int, str]], batch: int
                   ) -> Iterator[list[tuple[str, bytes]]]:
    """The bytes of image members read at the offsets ingest recorded, ``(member, offset, size, sha256)``
    each, in offset order, ``batch`` at a time: no tar header is parsed. Each image's sha256 is checked against
    the one ingest recorded; when one differs (the tar was rewritten since), the rest of the tar is read by
    member name instead (:func:`iter_image_batches`), so what is read is always what the tar holds now."""
    entries = sorted(entries, key=lambda e: e[1])
    chunk: list[tuple[str, bytes]] = []
    with as_path(tar_path).open("rb") as stream:
        for i, (member, offset, size, digest) in enumerate(entries):
            stream.seek(offset)
            data = stream.read(size)
            if len(data) != size or hashlib.sha256(data).hexdigest() != digest:
                rest = [e[0] for e in entries[i:]]
                for part in iter_image_batches(tar_path, rest, batch):
                    chunk.extend(part)
                    while len(chunk) >= batch:
                        yield chunk[:batch]
                        chunk = chunk[batch:]
                break
            chunk.append((member, data))
            if len(chunk) >= batch:
                yield chunk
                chunk = []
    if chunk:
        yield chunk


def iter_image_batches(tar_path: Path, members: Iterable[str], batch: int) -> Iterator[list[tuple[str, bytes]]]:
    """The named members' bytes in tar order, ``batch`` at a time (bounded memory for big shards)."""
    wanted = set(members)
    seen: set[str] = set()
    chunk: list[tuple[str, bytes]] = []
    for info, data, _ in iter_members(tar_path):
        if info is None:
            break
        if data is not None and info.name in wanted and info.name not in seen:
            seen.add(info.name)
            chunk.append((info.name, data))
            if len(chunk) >= batch:
                yield chunk
                chunk = []
    if chunk:
        yield chunk
