"""Where new tar shards arrive (img2dataset / LAION WebDataset layout)."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import dagster as dg

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
    """One tar shard: its partition key, the tar, its optional parquet, and the file's original name."""

    key: str
    tar: Path
    parquet: Optional[Path]

    @property
    def name(self) -> str:
        return self.tar.name


@dataclass(frozen=True)
class SkippedFile:
    """A file in the shard directory that looks like a shard but is not one, and why."""

    name: str
    reason: str


class ShardSource(dg.ConfigurableResource):
    """A directory of ``*.tar`` shards (with optional ``*.parquet`` beside them).

    ``uri`` is a local path today; the resource is the one place that lists and opens shards, so an
    object-store implementation (``s3://``, ``gs://``) only has to replace ``scan`` and ``get``.
    """

    uri: str = "data/shards"

    @property
    def directory(self) -> Path:
        if "://" in self.uri and not self.uri.startswith("file://"):
            raise NotImplementedError(f"shard source {self.uri!r}: only local directories are supported so far")
        return Path(self.uri.removeprefix("file://")).expanduser().resolve()

    def scan(self) -> tuple[list[ShardRef], list[SkippedFile]]:
        """Every shard in the directory in key order, and every tar-like file that is not a shard with the
        reason: still being written (``*.tar.tmp``, ``*.tar.part``), compressed, not a regular file, or a
        second file with the same key. A ``.tar`` of any letter case is a shard; a name that does not follow
        :data:`KEY_RULE` gets the key :func:`shard_key` makes of it (the file keeps its name)."""
        directory = self.directory
        if not directory.is_dir():
            return [], []
        refs: dict[str, ShardRef] = {}
        skipped: list[SkippedFile] = []
        for path in sorted(directory.iterdir()):
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
        if tar.is_file():
            return ShardRef(key, tar, _parquet_beside(tar))
        for ref in self.list_shards():
            if ref.key == key:
                return ref
        raise FileNotFoundError(f"shard {key!r}: no tar file for it in shard source {self.uri} (was it moved or "
                                f"deleted? `curate shards remove {key}` forgets the shard)")


def _parquet_beside(tar: Path) -> Optional[Path]:
    parquet = tar.with_name(tar.name[:-4] + ".parquet")
    return parquet if parquet.is_file() else None
