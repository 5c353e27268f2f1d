"""Where new tar shards arrive (img2dataset / LAION WebDataset layout)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import dagster as dg

_KEY = re.compile(r"[A-Za-z0-9_.-]+")


@dataclass(frozen=True)
class ShardRef:
    """One tar shard: its partition key (the file stem), the tar and its optional parquet."""

    key: str
    tar: Path
    parquet: Optional[Path]


class ShardSource(dg.ConfigurableResource):
    """A directory of ``*.tar`` shards (with optional ``*.parquet`` beside them).

    ``uri`` is a local path today; the resource is the one place that lists and opens shards, so an
    object-store implementation (``s3://``, ``gs://``) only has to replace ``list_shards`` and ``open``.
    """

    uri: str = "data/shards"

    @property
    def directory(self) -> Path:
        if "://" in self.uri and not self.uri.startswith("file://"):
            raise NotImplementedError(f"shard source {self.uri!r}: only local directories are supported so far")
        return Path(self.uri.removeprefix("file://")).expanduser().resolve()

    def list_shards(self) -> list[ShardRef]:
        """Every complete shard in the directory, in key order. Files still being written
        (``*.tar.tmp``, ``*.part``) are not shards yet; stems that cannot be partition keys are skipped."""
        directory = self.directory
        if not directory.is_dir():
            return []
        refs = []
        for tar in sorted(directory.glob("*.tar")):
            if not _KEY.fullmatch(tar.stem) or "..." in tar.stem:
                continue
            parquet = tar.with_suffix(".parquet")
            refs.append(ShardRef(tar.stem, tar, parquet if parquet.is_file() else None))
        return refs

    def get(self, key: str) -> ShardRef:
        tar = self.directory / f"{key}.tar"
        if not tar.is_file():
            raise FileNotFoundError(f"shard {key!r}: {tar} does not exist in shard source {self.uri}")
        parquet = tar.with_suffix(".parquet")
        return ShardRef(key, tar, parquet if parquet.is_file() else None)
