"""Pixel verification of dedup candidates on the demo corpus (4 x 1000 images of 256 px, seed 0), through the
thumbnails ``image_embeddings`` stores (no tar is read):

1. the pipeline: ``samples`` .. ``duplicate_pairs`` and ``dedup_groups`` through Dagster, then pair recall and
   precision of the groups against the planted near-duplicates (what ``make demo`` reports);
2. throughput of :func:`~curation_assets.core.pixel_verify.verify_thumbnails` on those candidate pairs with 1
   and 2 threads (min / median / max of ``--repeats``), decoding and preparing the thumbnails included;
3. what the thumbnails cost: bytes per image, and encoding with and without them (best of ``--repeats``).

    python bench/bench_verify.py --out bench/results/verify.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import dagster as dg
import polars as pl

from curation_assets.core import pixel_verify as pv
from curation_assets.core.perceptual import PerceptualEncoder
from curation_assets.core.shards import iter_image_batches
from curation_assets.demo.corpus import write_demo_corpus
from curation_assets.demo.dedup import planted_pair_scores
from curation_assets.demo.run import demo_config
from curation_assets.pipeline import open_pipeline

ASSETS = ["samples", "image_embeddings", "kmeans_centroids", "cluster_assignments", "duplicate_pairs", "dedup_groups"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench/results/verify.json")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        corpus, root = Path(tmp) / "shards", Path(tmp) / "root"
        write_demo_corpus(corpus, shards=4, per_shard=1000, seed=0)
        root.mkdir()
        pipeline = open_pipeline(root, corpus, config_path=str(demo_config(corpus, root)),
                                 instance=dg.DagsterInstance.ephemeral())
        pipeline.register_all_shards()
        started = time.perf_counter()
        pipeline.materialize(ASSETS)
        pipeline_s = time.perf_counter() - started
        storage = pipeline.storage
        pairs = storage.read("duplicate_pairs")
        truth = pl.read_parquet(corpus / "ground_truth.parquet").join(
            storage.scan("image_embeddings").select("uid").collect(), on="uid", how="semi")
        scores = planted_pair_scores(storage.read("dedup_groups"), truth)
        thumbs = dict(storage.read("image_embeddings", columns=["uid", "thumbnail"]).iter_rows())
        keys = list(pairs.select("uid_a", "uid_b").iter_rows())

        throughput = {}
        for workers in (1, 2):
            cfg = pv.VerifySettings(workers=workers)
            rates = []
            for _ in range(args.repeats):
                started = time.perf_counter()
                verdicts = pv.verify_thumbnails(keys, thumbs, cfg)
                rates.append(len(keys) / (time.perf_counter() - started))
            rates.sort()
            throughput[f"threads_{workers}_pairs_per_s"] = {"min": rates[0], "median": statistics.median(rates),
                                                            "max": rates[-1]}
        same = [v.passes(cfg) for v in verdicts] == pairs["verified"].to_list()

        blobs = []
        for tar in sorted(corpus.glob("*.tar")):
            ok = storage.read("samples", [tar.stem], columns=["status", "image_member"]).filter(pl.col("status") == "ok")
            blobs += [d for chunk in iter_image_batches(tar, ok["image_member"].to_list(), 1024) for _, d in chunk]
        encoder = PerceptualEncoder()
        encode = {}
        for with_thumbs in (False, True):
            best = 0.0
            for _ in range(args.repeats):
                started = time.perf_counter()
                encoder.encode_bytes(blobs, thumbnails=with_thumbs)
                best = max(best, len(blobs) / (time.perf_counter() - started))
            encode["with_thumbnails" if with_thumbs else "without_thumbnails"] = best

    sizes = [len(t) for t in thumbs.values() if t is not None]
    result = {
        "machine": f"{platform.node()} {os.cpu_count()} cpu",
        "load_average_before": list(load_before), "load_average_after": list(os.getloadavg()),
        "corpus": {"shards": 4, "per_shard": 1000, "seed": 0, "size": 256},
        "pipeline_seconds": pipeline_s,
        "candidate_pairs": pairs.height, "verified_pairs": int(pairs["verified"].sum()),
        "groups_vs_planted": scores,
        "verify": throughput, "verdicts_match_the_pipeline": same,
        "thumbnail_bytes": {"mean": sum(sizes) / len(sizes), "max": max(sizes), "images": len(sizes)},
        "encode_images_per_s": encode,
        "settings": {k: v for k, v in pv.VerifySettings().__dict__.items()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
