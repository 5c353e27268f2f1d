"""Peak memory of ingesting one large shard: 3000 images of 1024 px (about 0.5 GB of JPEG), read with
``read_shard`` in a fresh process. Ingest should hold one member group at a time, not the whole tar."""

from __future__ import annotations

import argparse
import io
import json
import platform
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

SHARD = Path("bench/results/raw/large_shard/00000.tar")
MEASURE = """
import json, resource, sys, time
from pathlib import Path
from curation_assets.core.shards import read_shard
t = time.perf_counter()
df = read_shard("00000", Path(sys.argv[1]))
print(json.dumps({"rows": df.height, "ok": int((df["status"] == "ok").sum()), "seconds": time.perf_counter() - t,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def ensure_shard(images: int, side: int) -> Path:
    """Photos-like noise-and-gradient JPEGs (quality 90), deterministic; written once and reused."""
    stamp = SHARD.with_suffix(".json")
    params = {"images": images, "side": side}
    if SHARD.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == params:
        return SHARD
    from PIL import Image

    SHARD.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:side, 0:side]
    with tarfile.open(SHARD, "w") as tar:
        for i in range(images):
            base = (np.stack([xx * (i % 7 + 1), yy * (i % 5 + 1), xx + yy], axis=-1) % 256).astype(np.int16)
            noise = rng.integers(-40, 40, size=(side // 8, side // 8, 3)).repeat(8, 0).repeat(8, 1)
            buf = io.BytesIO()
            Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
            for name, data in ((f"{i:09d}.jpg", buf.getvalue()), (f"{i:09d}.txt", f"image {i}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    stamp.write_text(json.dumps(params))
    return SHARD


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench/results/ingest_memory.json")
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--side", type=int, default=1024)
    args = parser.parse_args()
    started = time.perf_counter()
    shard = ensure_shard(args.images, args.side)
    print(f"shard {shard} ({shard.stat().st_size / 2**20:.0f} MiB) ready in {time.perf_counter() - started:.0f}s")
    out = subprocess.run([sys.executable, "-c", MEASURE, str(shard)], capture_output=True, text=True, check=True)
    result = {"machine": platform.node(), "python": platform.python_version(), "images": args.images,
              "side": args.side, "tar_mib": shard.stat().st_size / 2**20, **json.loads(out.stdout)}
    result["images_per_second"] = result["rows"] / result["seconds"]
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
