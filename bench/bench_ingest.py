"""Ingest + encode throughput on the demo corpus (this machine, CPU, perceptual encoder), stage by stage and
end to end through Dagster (samples + image_embeddings materialised for every shard), each ``--repeats`` times
(min / median / max images per second), with the load average before and after so a busy machine shows."""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import dagster as dg

from curation_assets.core.shards import iter_images_at, read_shard
from curation_assets.pipeline import open_pipeline
from resources.encoders import EncoderResource

CORPUS = Path("bench/results/raw/corpus")


def ensure_corpus(shards: int, per_shard: int) -> Path:
    from curation_assets.demo.corpus import write_demo_corpus

    stamp = CORPUS / "params.json"
    params = {"shards": shards, "per_shard": per_shard}
    if not (stamp.is_file() and json.loads(stamp.read_text()) == params):
        shutil.rmtree(CORPUS, ignore_errors=True)
        write_demo_corpus(CORPUS, shards=shards, per_shard=per_shard, seed=0)
        stamp.write_text(json.dumps(params))
    return CORPUS


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench/results/ingest.json")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--per-shard", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    corpus = ensure_corpus(args.shards, args.per_shard)
    tars = sorted(corpus.glob("*.tar"))
    load_before = os.getloadavg()

    model = EncoderResource(kind="perceptual").load()
    ingest, encode = [], []
    for _ in range(args.repeats):
        started = time.perf_counter()
        frames = [read_shard(t.stem, t, t.with_suffix(".parquet")) for t in tars]
        ingest.append(time.perf_counter() - started)
        started = time.perf_counter()
        encoded = 0
        for tar, frame in zip(tars, frames):  # read at ingest's offsets, with thumbnails: as the pipeline does
            located = frame.filter(frame["status"] == "ok").select("image_member", "image_offset", "bytes", "sha256")
            for chunk in iter_images_at(tar, list(located.iter_rows()), 1024):
                encoded += len(model.encode_bytes([d for _, d in chunk], thumbnails=True)[0])
        encode.append(time.perf_counter() - started)
    n = sum(f.height for f in frames)

    dagster = []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            pipeline = open_pipeline(Path(tmp) / "root", corpus, instance=dg.DagsterInstance.ephemeral())
            pipeline.register_all_shards()
            started = time.perf_counter()
            pipeline.materialize(["samples", "image_embeddings"])
            dagster.append(time.perf_counter() - started)

    def spread(seconds: list[float], count: int) -> dict:
        rates = sorted(count / s for s in seconds)
        return {"min": rates[0], "median": statistics.median(rates), "max": rates[-1]}

    result = {
        "machine": f"{platform.node()} {os.cpu_count()} cpu",
        "load_average_before": list(load_before),
        "load_average_after": list(os.getloadavg()),
        "images": n,
        "ok_images_encoded": encoded,
        "repeats": args.repeats,
        "ingest_images_per_s": spread(ingest, n),
        "encode_images_per_s_perceptual": spread(encode, encoded),
        "ingest_plus_encode_images_per_s": spread([a + b for a, b in zip(ingest, encode)], n),
        "dagster_samples_plus_embeddings_images_per_s": spread(dagster, n),
        "dagster_samples_plus_embeddings_s": statistics.median(dagster),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "encoder": model.name,
        "encoder_threads": model.num_workers,
        "with_verification_thumbnails": True,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
