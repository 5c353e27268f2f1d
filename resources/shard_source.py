"""Where new tar shards arrive (img2dataset / LAION WebDataset layout)."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import dagster as dg
import polars as pl

from curation_assets.core.location import as_path, mtime_ns

KEY_RULE = ("1 to 100 characters: letters, digits, '_', '-' and '.', starting with a letter or digit, "
            "with no '..'")
_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
_IN_PROGRESS = (".tar.tmp", ".tar.part", ".tar.partial", ".tar.download")
_COMPRESSED = (".tar.gz", ".tgz", ".tar.zst", ".tar.bz2", ".tar.xz")


def valid_key(key: str) -> bool:
    """Whether ``key`` follows :data:`KEY_RULE` (safe as a Dagster partition key and a Delta predicate)."""
    return bool(_KEY.fullmatch(key)) and ".." not in key


def shard_key(stem: str) -> str:
    """The partition key of a tar whose file name (without ``.tar``) is ``stem``: the stem itself when it
    follows :data:`KEY_RULE`, else its letters, digits, '_' and '-' plus 8 hex digits of a hash of the whole
    original name, so names that differ only in their odd characters never share a key."""
    if valid_key(stem):
        return stem
    safe = re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_-")[:80] or "shard"
    if not safe[0].isalnum():
        safe = "s" + safe
    return f"{safe}-{hashlib.sha1(stem.encode('utf-8', 'surrogateescape')).hexdigest()[:8]}"


@dataclass(frozen=True)
class ShardRef:
    """One partition's input: a tar shard (its partition key, the tar, its optional parquet), or a group of
    tars read as one partition (``parts``, see :class:`ShardSource`). In a group a sample's key and image
    member are prefixed with its tar's key (``00003/000123``), so uids stay ``{partition}/{key}`` and unique."""

    key: str
    tar: Path
    parquet: Optional[Path]
    parts: tuple["ShardRef", ...] = ()

    @property
    def name(self) -> str:
        return self.tar.name if not self.parts else f"{self.parts[0].name} .. {self.parts[-1].name} ({len(self.parts)} tars)"

    @property
    def tars(self) -> tuple["ShardRef", ...]:
        """The single tars this partition reads, in key order."""
        return self.parts or (self,)

    def stamp(self) -> str:
        """Size and modification time of every tar: changes when a tar is rewritten or a group gains one."""
        stamps = []
        for ref in self.tars:
            size, mtime = mtime_ns(ref.tar)
            stamps.append(f"{size}:{mtime}")
        return stamps[0] if not self.parts else ";".join(f"{r.key}={x}" for r, x in zip(self.parts, stamps))

    def _part(self, member: str) -> tuple[Optional["ShardRef"], str]:
        """The single tar holding an image member (as stored in ``samples.image_member``) and its name
        there; None when the group has no such tar."""
        if not self.parts:
            return self, member
        key, _, inner = member.partition("/")
        return next((ref for ref in self.parts if ref.key == key), None), inner

    def _split(self, members: Iterable[str]) -> dict["ShardRef", dict[str, str]]:
        """``{tar: {member inside the tar: member as stored}}``."""
        out: dict[ShardRef, dict[str, str]] = {}
        for member in members:
            ref, inner = self._part(member)
            if ref is not None:
                out.setdefault(ref, {})[inner] = member
        return out

    def locate(self, member: str) -> tuple[Path, str]:
        """The tar file that holds an image member (as stored in ``samples.image_member``) and its name there."""
        ref, inner = self._part(member)
        if ref is None:
            raise FileNotFoundError(f"shard {self.key}: no tar for member {member!r} in the group")
        return ref.tar, inner

    def read_images(self, members: Iterable[str]) -> dict[str, bytes]:
        """The bytes of the named image members (as stored in ``samples.image_member``), one pass per tar."""
        from curation_assets.core.shards import read_images

        found: dict[str, bytes] = {}
        for ref, names in self._split(members).items():
            found.update({names[m]: data for m, data in read_images(ref.tar, names).items()})
        return found

    def iter_image_batches(self, members: Iterable[str], batch: int) -> Iterator[list[tuple[str, bytes]]]:
        """The named image members' bytes in tar order, ``batch`` at a time."""
        from curation_assets.core.shards import iter_image_batches

        for ref, names in self._split(members).items():
            for chunk in iter_image_batches(ref.tar, names, batch):
                yield [(names[m], data) for m, data in chunk]

    def iter_images_at(self, entries: Iterable[tuple[str, int, int, str]], batch: int
                       ) -> Iterator[list[tuple[str, bytes]]]:
        """Image members read at the offsets ingest recorded, ``(member as stored, offset, size, sha256)``
        each, ``batch`` at a time (see :func:`curation_assets.core.shards.iter_images_at`)."""
        from curation_assets.core.shards import iter_images_at

        by_tar: dict[ShardRef, list[tuple[str, int, int, str]]] = {}
        stored: dict[ShardRef, dict[str, str]] = {}
        for member, offset, size, digest in entries:
            ref, inner = self._part(member)
            if ref is not None:
                by_tar.setdefault(ref, []).append((inner, offset, size, digest))
                stored.setdefault(ref, {})[inner] = member
        for ref, tar_entries in by_tar.items():
            for chunk in iter_images_at(ref.tar, tar_entries, batch):
                yield [(stored[ref][m], data) for m, data in chunk]

    def read_parquet(self, columns: Sequence[str]) -> Optional[pl.DataFrame]:
        """``key`` and ``columns`` from the parquet sidecar(s) that have them (keys as in ``samples``), or None
        when no tar of this partition has such a parquet."""
        frames = []
        for ref in self.tars:
            names = pl.read_parquet_schema(str(ref.parquet)) if ref.parquet is not None else {}
            if ref.parquet is None or "key" not in names or any(c not in names for c in columns):
                continue
            frame = pl.read_parquet(str(ref.parquet), columns=["key", *columns]).with_columns(pl.col("key").cast(pl.String))
            if self.parts:
                frame = frame.with_columns((pl.lit(ref.key + "/") + pl.col("key")).alias("key"))
            frames.append(frame)
        return pl.concat(frames, how="vertical_relaxed") if frames else None


@dataclass(frozen=True)
class SkippedFile:
    """A file in the shard directory that looks like a shard but is not one, and why."""

    name: str
    reason: str


class ShardSource(dg.ConfigurableResource):
    """A directory of ``*.tar`` shards (with optional ``*.parquet`` beside them).

    ``group_size`` N > 1 makes each partition a group of N numbered tars (``CURATION_SHARD_GROUP``): tars
    ``00000`` .. ``00004`` are partition ``00000-00004`` for N = 5, so 10^9 images in 10^5 tars of 10^4 make
    10^4 partitions at N = 10 (SQLite instances fail near ~36k partitions, the UI slows past ~100k). The group
    of a tar follows from its number alone, so groups never reshuffle as tars arrive; a group that gains a tar
    changes its stamp and is re-ingested whole. Group mode needs img2dataset's numbered names; other names are
    skipped with the reason.

    ``uri`` is a local directory or an object-store prefix (``s3://bucket/incoming``, with the standard
    ``AWS_*`` variables; see :mod:`curation_assets.core.location`): the same listing rules apply to both, and
    tars are read as streams.
    """

    uri: str = "data/shards"
    group_size: int = 1

    @property
    def directory(self):
        """A ``Path``, or a ``UPath`` for an object-store prefix (tars are then streamed, never copied)."""
        return as_path(self.uri)

    def scan(self) -> tuple[list[ShardRef], list[SkippedFile]]:
        """Every partition in key order (a tar, or a group of tars), and every tar-like file that is not a
        shard with the reason: still being written (``*.tar.tmp``, ``*.tar.part``), compressed, not a regular
        file, a second file with the same key, or (in group mode) a name that is not a number."""
        tars, skipped = self._scan_tars()
        if self.group_size == 1:
            return tars, skipped
        if self.group_size < 1:
            raise ValueError(f"shard source: group_size must be at least 1, got {self.group_size}")
        groups: dict[str, list[ShardRef]] = {}
        for ref in tars:
            if not ref.key.isdigit():
                skipped.append(SkippedFile(ref.name, f"shard groups of {self.group_size} need numbered tars "
                                                     "(00000.tar, 00001.tar, ... as img2dataset writes them)"))
                continue
            groups.setdefault(self.group_key(ref.key), []).append(ref)
        return [ShardRef(key, parts[0].tar, None, tuple(parts)) for key, parts in sorted(groups.items())], skipped

    def group_key(self, tar_key: str) -> str:
        """The partition of the numbered tar ``tar_key``: ``{first}-{last}`` of its block of ``group_size``."""
        width, first = len(tar_key), int(tar_key) // self.group_size * self.group_size
        return f"{first:0{width}d}-{first + self.group_size - 1:0{width}d}"

    def _scan_tars(self) -> tuple[list[ShardRef], list[SkippedFile]]:
        """Every single tar in the directory in key order, and every tar-like file that is not a shard. A
        ``.tar`` of any letter case is a shard; a name that does not follow :data:`KEY_RULE` gets the key
        :func:`shard_key` makes of it (the file keeps its name)."""
        directory = self.directory
        if not directory.is_dir():
            return [], []
        refs: dict[str, ShardRef] = {}
        skipped: list[SkippedFile] = []
        for path in sorted(directory.iterdir(), key=lambda p: p.name):
            name, lower = path.name, path.name.lower()
            if lower.endswith(_IN_PROGRESS):
                skipped.append(SkippedFile(name, "still being written (a temporary download name)"))
            elif lower.endswith(_COMPRESSED):
                skipped.append(SkippedFile(name, "compressed tars are not read; store shards as plain .tar"))
            elif lower.endswith(".tar"):
                if not path.is_file():
                    skipped.append(SkippedFile(name, "not a regular file"))
                    continue
                key = shard_key(name[:-4])
                if key in refs:
                    skipped.append(SkippedFile(name, f"same shard key {key!r} as {refs[key].name}"))
                    continue
                refs[key] = ShardRef(key, path, _parquet_beside(path))
        return [refs[k] for k in sorted(refs)], skipped

    def list_shards(self) -> list[ShardRef]:
        return self.scan()[0]

    def get(self, key: str) -> ShardRef:
        """The shard with partition key ``key``; ``FileNotFoundError`` when its file is gone."""
        tar = self.directory / f"{key}.tar"
        if self.group_size == 1 and tar.is_file():
            return ShardRef(key, tar, _parquet_beside(tar))
        first, dash, last = key.partition("-")
        if self.group_size > 1 and dash and first.isdigit() and last.isdigit():
            tars = [self.directory / f"{i:0{len(first)}d}.tar" for i in range(int(first), int(last) + 1)]
            parts = tuple(ShardRef(t.stem, t, _parquet_beside(t)) for t in tars if t.is_file())
            if parts:
                return ShardRef(key, parts[0].tar, None, parts)
        for ref in self.list_shards():
            if ref.key == key:
                return ref
        raise FileNotFoundError(f"shard {key!r}: no tar file for it in shard source {self.uri} (was it moved or "
                                f"deleted? `curate shards remove {key}` forgets the shard)")


def _parquet_beside(tar: Path) -> Optional[Path]:
    parquet = tar.with_name(tar.name[:-4] + ".parquet")
    return parquet if parquet.is_file() else None
