"""Throughput of the census models (``core/image_attributes.py``) on this machine's CPU cores.

Two image sets, each measured through ``AttributeModels.measure`` (the function the ``image_attributes``
asset calls): real photos (scikit-image's astronaut, coffee, rocket, chelsea and the 200 ``lfw_subset`` crops
upscaled to 160 px, repeated to ``--n`` images) and JPEGs of the demo corpus (256 px). Reports images/s for
the face model alone, the NSFW model alone and both together, and the time one shard adds at the default
sample of 1000 images.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
from PIL import Image


def real_photos(n: int) -> list[Image.Image]:
    from skimage import data

    base = [Image.fromarray(load()) for load in (data.astronaut, data.coffee, data.rocket, data.chelsea)]
    base += [Image.fromarray((np.clip(c, 0, 1) * 255).astype(np.uint8)).resize((160, 160), Image.BICUBIC).convert("RGB")
             for c in data.lfw_subset()]
    return [base[i % len(base)] for i in range(n)]


def demo_images(n: int, out: Path) -> list[Image.Image]:
    from curation_assets.core.shards import read_images
    from curation_assets.demo.corpus import write_demo_corpus

    if not (out / "00000.tar").is_file():
        write_demo_corpus(out, shards=1, per_shard=max(n, 100), seed=0, size=256, generated=0)
    import tarfile

    with tarfile.open(out / "00000.tar") as tar:
        members = [m.name for m in tar.getmembers() if m.name.endswith(".jpg")][:n]
    blobs = read_images(out / "00000.tar", members)
    images = []
    for m in members:
        try:  # the demo plants truncated and empty images; ingest rejects them, so skip them here
            images.append(Image.open(io.BytesIO(blobs[m])).convert("RGB"))
        except Exception:
            continue
    return images


def measure(models, images: list[Image.Image]) -> dict:
    started = time.perf_counter()
    for im in images:
        models.faces(im)
    faces_s = time.perf_counter() - started
    started = time.perf_counter()
    models.nsfw(images)
    nsfw_s = time.perf_counter() - started
    started = time.perf_counter()
    out = models.measure("00000", ((f"00000/{i:09d}", im) for i, im in enumerate(images)))
    both_s = time.perf_counter() - started
    n = len(images)
    return {"images": n, "faces_found": out.faces.height,
            "faces_images_per_s": round(n / faces_s, 1), "nsfw_images_per_s": round(n / nsfw_s, 1),
            "both_images_per_s": round(n / both_s, 1), "seconds_per_1000_image_shard": round(1000 * both_s / n, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=400)
    parser.add_argument("--out", type=Path, default=Path("bench/results/attributes.json"))
    parser.add_argument("--corpus", type=Path, default=Path("data/bench/attributes_corpus"))
    args = parser.parse_args()
    from curation_assets.core.image_attributes import AttributeModels, model_versions

    models = AttributeModels(threads=os.cpu_count() or 2)
    models.faces(real_photos(1)[0])  # load the models before timing
    results = {
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()},
        "models": model_versions(),
        "real_photos": measure(models, real_photos(args.n)),
        "demo_images_256px": measure(models, demo_images(args.n, args.corpus)),
    }
    print(json.dumps(results, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
