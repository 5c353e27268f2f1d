"""Throughput of the open_clip image encoder on a CUDA device, through the pipeline's own encoder class
(``curation_assets.core.clip_encoder.OpenClipEncoder``): JPEG bytes from a tar shard -> decode and
preprocess in DataLoader workers -> fp16 / bf16 forward -> L2-normalised vectors.

Weights are random (``allow_random_weights``): throughput does not depend on the weights, and no real
checkpoint can be downloaded on the machines this runs on. Not part of ``make bench`` (it needs a GPU):
run ``python bench/gpu_encoder.py --out bench/results/gpu_encoder.json`` on a CUDA machine.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import tarfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np


def _jpeg(i: int, side: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(i)
    yy, xx = np.mgrid[0:side, 0:side]
    base = (np.stack([xx * (i % 7 + 1), yy * (i % 5 + 1), xx + yy], axis=-1) % 256).astype(np.int16)
    noise = rng.integers(-40, 40, size=(side // 8, side // 8, 3)).repeat(8, 0).repeat(8, 1)
    buf = io.BytesIO()
    Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def write_shard(path: Path, images: int, side: int) -> None:
    with ProcessPoolExecutor() as pool, tarfile.open(path, "w") as tar:
        for i, data in enumerate(pool.map(_jpeg, range(images), [side] * images, chunksize=64)):
            info = tarfile.TarInfo(f"{i:09d}.jpg")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def read_shard(path: Path) -> list[bytes]:
    with tarfile.open(path, mode="r|*") as tar:
        return [tar.extractfile(m).read() for m in tar if m.isfile()]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench/results/gpu_encoder.json")
    parser.add_argument("--images", type=int, default=8192)
    parser.add_argument("--side", type=int, default=512)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--workers", type=int, nargs="+", default=[4, 8, 14])
    parser.add_argument("--shard", default="/tmp/gpu_bench_shard.tar")
    args = parser.parse_args()

    import torch

    from curation_assets.core.clip_encoder import OpenClipEncoder

    shard = Path(args.shard)
    t = time.perf_counter()
    write_shard(shard, args.images, args.side)
    write_seconds = time.perf_counter() - t
    t = time.perf_counter()
    blobs = read_shard(shard)
    read_seconds = time.perf_counter() - t
    result = {"machine": platform.node(), "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "cpus": os.cpu_count(), "model": args.model, "weights": "random (throughput only)",
              "images": len(blobs), "side": args.side, "shard_mib": shard.stat().st_size / 2**20,
              "write_seconds": write_seconds, "tar_read_seconds": read_seconds, "runs": []}
    for precision in ("fp16", "bf16"):
        for workers in args.workers:
            enc = OpenClipEncoder(args.model, allow_random_weights=True, device="cuda", precision=precision,
                                  batch_size=256, num_workers=workers)
            enc.encode_bytes(blobs[:1024])  # warm-up: CUDA kernels, worker start
            torch.cuda.synchronize()
            t = time.perf_counter()
            vectors = enc.encode_bytes(blobs)
            torch.cuda.synchronize()
            seconds = time.perf_counter() - t
            assert vectors.shape == (len(blobs), enc.dim) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-3)
            run = {"precision": precision, "workers": workers, "seconds": seconds,
                   "images_per_second": len(blobs) / seconds}
            result["runs"].append(run)
            print(json.dumps(run), flush=True)
        # the device alone: preprocessed batches already on the GPU (the ceiling decoding must feed)
        batch = torch.randn(256, 3, 224, 224, device="cuda")
        with torch.inference_mode(), enc._autocast():
            for _ in range(3):
                enc.model.encode_image(batch)
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(20):
                enc.model.encode_image(batch)
            torch.cuda.synchronize()
        result[f"forward_only_images_per_second_{precision}"] = 20 * 256 / (time.perf_counter() - t)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
