"""Local paths and object-store URIs behind one path type.

A data root or a shard directory is a local path or a URI (``s3://bucket/prefix``; S3, MinIO, R2 and GCS in
S3 mode through the standard ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_REGION`` and, for plain-http endpoints, ``AWS_ALLOW_HTTP=true``, which delta-rs, polars and s3fs all
read). :func:`as_path` gives a ``pathlib.Path`` for a local path and a ``UPath`` (universal_pathlib over
fsspec) for a URI, so code written against ``Path`` methods (``/``, ``open``, ``read_text``, ``iterdir``,
``is_file``, ``mkdir``) works on both. Where the two differ (atomic publication, exclusive creation,
stat times), use the helpers here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Union

AnyPath = Union[Path, Any]
"""A ``pathlib.Path`` or a ``upath.UPath``."""


def is_uri(path: Any) -> bool:
    """Whether ``path`` names an object-store location (``s3://...``) rather than a local file."""
    text = str(path)
    return "://" in text and not text.startswith("file://")


def as_path(path: Any) -> AnyPath:
    """A ``Path`` (expanded and resolved) for a local path, a ``UPath`` for a URI; path objects pass through."""
    if isinstance(path, Path):
        return path.expanduser().resolve()
    if not isinstance(path, str) and is_uri(path):
        return path
    text = str(path)
    if is_uri(text):
        from upath import UPath

        options = {}
        if text.startswith(("s3://", "s3a://")):
            # no listing cache: shards are replaced under the same name, and a stale cached ETag fails the read;
            # the endpoint is part of the filesystem's identity, so a changed AWS_ENDPOINT_URL is never ignored
            options = {"use_listings_cache": False,
                       "client_kwargs": {"endpoint_url": os.environ.get("AWS_ENDPOINT_URL") or None}}
        return UPath(text.rstrip("/"), **options)
    return Path(text.removeprefix("file://")).expanduser().resolve()


def local(path: AnyPath) -> bool:
    return isinstance(path, Path)


def write_atomic(path: AnyPath, data: bytes) -> None:
    """Publish ``data`` at ``path`` so no reader sees half of it: a temporary file renamed over it locally,
    one PUT on an object store (a PUT is atomic per object)."""
    if local(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    else:
        path.write_bytes(data)


def create_exclusive(path: AnyPath, data: bytes = b"claimed") -> bool:
    """Create ``path`` only if nothing is there (True), else False, atomically between writers: ``O_EXCL``
    locally, a conditional PUT (``If-None-Match: *``) on an object store. ``data`` must not be empty: s3fs
    writes an empty object with a plain PUT."""
    if not data:
        raise ValueError("create_exclusive needs a non-empty body")
    if local(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        return True
    try:  # the filesystem's own exclusive mode: s3fs sends If-None-Match: * (UPath.open would not)
        with path.fs.open(path.path, "xb") as handle:
            handle.write(data)
    except (FileExistsError, OSError) as exc:
        if isinstance(exc, FileExistsError) or "PreconditionFailed" in str(exc) or "412" in str(exc):
            return False
        raise
    return True


def mtime_ns(path: AnyPath) -> tuple[int, int]:
    """``(size, modification time in ns)`` of a file, local or in an object store."""
    stat = path.stat()
    ns = getattr(stat, "st_mtime_ns", None)
    if ns is None:
        ns = int(float(stat.st_mtime) * 1e9)
    return int(stat.st_size), int(ns)


def local_state_dir(root: Any) -> Path:
    """Where this machine keeps the state of a data root that must be a local file (locks, and the Dagster
    home when ``DAGSTER_HOME`` is not set): the root itself when local, else ``~/.cache/curation/<bucket-and-
    prefix>-<hash>`` (an object store has no locks or SQLite files)."""
    if not is_uri(root):
        return as_path(root)
    import hashlib
    import re

    text = str(root).rstrip("/")
    name = re.sub(r"[^A-Za-z0-9_-]+", "_", text.split("://", 1)[1])[:60]
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "curation" / f"{name}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"
