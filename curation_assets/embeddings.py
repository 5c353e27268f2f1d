"""Image embeddings: one L2-normalised vector per accepted sample, from the configured encoder."""


import time
from dataclasses import dataclass

import dagster as dg
import numpy as np
import polars as pl

from curation_assets.core import delta
from curation_assets.core.perceptual import PerceptualEncoder
from curation_assets.core.pixel_verify import VerifySettings, thumbnail_of
from curation_assets.core.validation import ConfigError, check_fields
from curation_assets.partitions import partition_keys, shard_asset
from resources.compute import ComputeResource
from resources.encoders import EncoderResource
from resources.settings import CurationSettings
from resources.shard_source import ShardSource
from resources.storage import DeltaStorage


@dataclass(frozen=True)
class EmbeddingSettings:
    """The ``embeddings`` section: images per encoder batch (the encoder itself is a resource)."""

    batch_size: int = 256

    @classmethod
    def from_section(cls, section: dict) -> "EmbeddingSettings":
        check_fields("embeddings", cls, section)
        settings = cls(**section)
        if settings.batch_size < 1:
            raise ConfigError(f"embeddings.batch_size must be at least 1, got {settings.batch_size}")
        return settings


class ShardEncoder:
    """The encoder loaded once (in the step's process, or in a Ray actor), embedding whole shards, and making
    each image's verification thumbnail from the same decode when dedup verifies this encoder's pairs
    (``verify`` is ``dedup.verify.enabled``: true, false or None for auto)."""

    def __init__(self, encoder: EncoderResource, batch: int, verify: bool | None = None):
        self.model = encoder.load()
        self.batch = batch
        self.thumbnails = VerifySettings(enabled=verify).active(self.model.name)

    def encode(self, job: tuple) -> tuple[list[str], np.ndarray, str, list[bytes | None] | None]:
        """``(shard, ref, {image member: uid}, locations)`` -> the uids found, their vectors, the encoder's name
        and the thumbnails (None when not made). ``locations`` (member, offset, size, sha256) come from ingest:
        the images are then read at their offsets without parsing the tar again; None reads the tar through."""
        _, ref, member_uid, locations = job
        uids: list[str] = []
        blocks: list[np.ndarray] = []
        thumbs: list[bytes | None] = []
        if not member_uid:
            batches = iter(())
        elif locations is not None:
            batches = ref.iter_images_at(locations, self.batch * 4)
        else:
            batches = ref.iter_image_batches(member_uid, self.batch * 4)
        for chunk in batches:
            blobs = [data for _, data in chunk]
            if not self.thumbnails:
                blocks.append(self.model.encode_bytes(blobs))
            elif isinstance(self.model, PerceptualEncoder):
                vectors, made = self.model.encode_bytes(blobs, thumbnails=True)
                blocks.append(vectors)
                thumbs.extend(made)
            else:  # another encoder decodes in its own way: the thumbnail takes a decode of its own
                blocks.append(self.model.encode_bytes(blobs))
                thumbs.extend(thumbnail_of(b) for b in blobs)
            uids.extend(member_uid[name] for name, _ in chunk)
        vectors = np.concatenate(blocks) if blocks else np.zeros((0, self.model.dim), np.float32)
        return uids, vectors, self.model.name, (thumbs if self.thumbnails else None)


@shard_asset(
    deps=["samples"],
    group_name="ingest",
    kinds={"deltalake", "pytorch"},
    pool="gpu",
)
def image_embeddings(
    context: dg.AssetExecutionContext,
    storage: DeltaStorage,
    settings: CurationSettings,
    shard_source: ShardSource,
    encoder: EncoderResource,
    compute: ComputeResource,
) -> dg.MaterializeResult:
    """A vector per ``ok`` sample (uid, shard, embedding as List(Float32), encoder name and version).

    The model loads once per step and encodes every shard of the step (on Ray: once per model actor, the
    shards spread over the actors); the step runs in the ``gpu`` pool so GPU steps never oversubscribe a
    device. The ``encoder`` column says which encoder made each vector
    (``perceptual-*`` is the weight-free default, not CLIP)."""
    batch = EmbeddingSettings.from_section(settings.section("embeddings")).batch_size
    started = time.perf_counter()
    total = 0
    jobs = []
    located = 0
    for shard in partition_keys(context):
        scan = storage.scan("samples", [shard]).filter(pl.col("status") == "ok")
        located_cols = ["image_offset", "bytes", "sha256"]
        has_offsets = "image_offset" in scan.collect_schema().names()  # tables ingested before offsets: no
        ok = scan.select("uid", "image_member", *(located_cols if has_offsets else [])).collect()
        member_uid = dict(zip(ok["image_member"].to_list(), ok["uid"].to_list()))
        locations = None
        if has_offsets and ok.height and ok["image_offset"].null_count() == 0:
            locations = list(ok.select("image_member", *located_cols).iter_rows())
        try:
            ref = shard_source.get(shard) if member_uid else None
        except FileNotFoundError as exc:
            context.log.warning(f"{exc}; its embeddings stay as they were")
            continue
        located += len(locations or ())
        jobs.append((shard, ref, member_uid, locations))
    try:
        verify = VerifySettings.from_section((settings.section("dedup") or {}).get("verify")).enabled
    except ValueError as exc:
        raise dg.Failure(str(exc)) from exc
    pool = compute.pool(ShardEncoder, (encoder, batch, verify), "image_embeddings", len(jobs),
                        wants_gpu=encoder.kind == "open_clip" and encoder.device != "cpu")
    name, dim = "", 0
    try:
        for (shard, _, member_uid, _), (uids, vectors, name, thumbs) in zip(jobs, pool.map("encode", jobs)):
            dim = vectors.shape[1]
            missing = set(member_uid.values()) - set(uids)
            if missing:
                raise RuntimeError(f"shard {shard}: {len(missing)} ok samples vanished from the tar since ingest "
                                   f"(e.g. {sorted(missing)[:3]}); re-materialise samples for this shard")
            storage.write_shard("image_embeddings",
                                delta.embeddings_frame(uids, [shard] * len(uids), vectors, name, thumbs), shard)
            total += len(uids)
            context.log.info(f"shard {shard}: {len(uids)} embeddings ({name}, {compute.describe()})")
    finally:
        pool.close()
    seconds = time.perf_counter() - started
    return dg.MaterializeResult(
        metadata={
            **storage.table_metadata("image_embeddings", None),
            "dagster/row_count": total,
            "encoder": name,
            "dim": dim,
            "ran_on": compute.describe(),
            "images_per_second": dg.FloatMetadataValue(total / seconds if seconds else 0.0),
            "images_read_at_ingest_offsets": located,
            "table": dg.MetadataValue.path(str(storage.table_path("image_embeddings"))),
        }
    )


defs = dg.Definitions(assets=[image_embeddings])
