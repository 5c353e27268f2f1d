"""Benchmark of the regurgitation audit's core on the demo corpus, without Dagster.

1. Demo corpus (default 4 shards x 1000, 256 px, 120 generated images: 40% perturbed copies): encode with
   the perceptual encoder, search, verify; recall on the planted copies and flag rate on the novel images,
   with and without pixel verification.
2. Index choice: flat vs HNSW vs IVF on random unit vectors (default 200k x 384), build and search time
   and the recall against flat search that the audit reports.
3. Verification threshold calibration on the encoder's own near-duplicate transforms, and the candidate
   threshold calibration (configs/audits.yaml thresholds) on synthetic copies, not on the demo corpus.

    python bench/bench_audits.py --out bench/results/audits.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl


def packaged_regurgitation_config() -> dict:
    import yaml

    from curation_assets import audits

    return yaml.safe_load((Path(audits.__file__).parent / "configs" / "audits.yaml").read_text())["regurgitation"]


def demo_regurgitation(shards: int, per_shard: int, size: int, seed: int, k: int = 20, threshold: float | None = None) -> dict:
    from curation_assets.core import pixel_verify as pv, regurgitation as rg
    from curation_assets.demo.corpus import write_demo_corpus
    from curation_assets.core.perceptual import PerceptualEncoder
    from curation_assets.core.shards import read_images, read_shard

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        started = time.perf_counter()
        write_demo_corpus(out, shards=shards, per_shard=per_shard, seed=seed, size=size)
        corpus_s = time.perf_counter() - started
        encoder = PerceptualEncoder()
        uids, blocks, train_bytes = [], [], {}
        started = time.perf_counter()
        for tar in sorted(out.glob("*.tar")):
            ok = read_shard(tar.stem, tar).filter(pl.col("status") == "ok")
            blobs = read_images(tar, ok["image_member"].to_list())
            data = [blobs[m] for m in ok["image_member"].to_list()]
            blocks.append(encoder.encode_bytes(data))
            uids += ok["uid"].to_list()
            train_bytes.update(zip(ok["uid"].to_list(), data))
        xb = np.concatenate(blocks)
        encode_s = time.perf_counter() - started
        generated = rg.list_generated(out / "generated")
        packaged = packaged_regurgitation_config()
        shifts = packaged["colour_shifts"]
        xq, variants = rg.encode_queries(encoder, [g.data for g in generated], shifts)
        truth = pl.read_parquet(out / "generated_truth.parquet")
        result = rg.merge_variants(rg.search(xb, xq, k, rg.IndexConfig()), variants)
        threshold = packaged["thresholds"][encoder.name] if threshold is None else threshold
        table = rg.neighbour_table([g.id for g in generated], result, uids, threshold, "full")
        started = time.perf_counter()
        verified = rg.verify_candidates(table, {g.id: g.data for g in generated}, train_bytes, pv.ContainmentSettings())
        verify_s = time.perf_counter() - started

        def rates(t: pl.DataFrame, column: str) -> dict:
            per = t.group_by("generated_id").agg(pl.col(column).any().alias("flag"))
            joined = truth.join(per, left_on="uid", right_on="generated_id", how="left").with_columns(pl.col("flag").fill_null(False))
            copies = joined.filter(pl.col("kind") == "copy")
            novel = joined.filter(pl.col("kind") == "novel")
            return {"copies": copies.height, "recall_on_copies": float(copies["flag"].mean()),
                    "novel": novel.height, "flag_rate_on_novel": float(novel["flag"].mean())}

        best = table.filter(pl.col("rank") == 1).join(truth, left_on="generated_id", right_on="uid")
        by_kind = {k: [round(float(best.filter(pl.col("kind") == k)["similarity"].quantile(q)), 3) for q in (0.0, 0.05, 0.5, 0.95, 1.0)]
                   for k in ("copy", "novel")}
        return {
            "corpus": {"shards": shards, "per_shard": per_shard, "size": size, "seed": seed, "train": len(uids),
                       "generated": len(generated), "corpus_seconds": round(corpus_s, 1), "encode_seconds": round(encode_s, 1)},
            "threshold": threshold, "dedup_threshold": encoder.threshold, "k": k, "colour_shifts": shifts,
            "query_variants": variants,
            "nearest_similarity_quantiles_0_5_50_95_100": by_kind,
            "embedding_only": rates(table, "candidate"),
            "with_verification": rates(verified, "flagged"),
            "verification_pairs": int(table["candidate"].sum()),
            "verification_seconds": round(verify_s, 2),
        }


def index_recall(n: int, d: int, queries: int, seed: int) -> list[dict]:
    from curation_assets.core import regurgitation as rg

    rng = np.random.default_rng(seed)
    # clustered data (like real embeddings), unit norm
    centres = rng.normal(size=(2048, d)).astype(np.float32)
    xb = centres[rng.integers(0, 2048, n)] + 1.0 * rng.normal(size=(n, d)).astype(np.float32)
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    picks = rng.choice(n, queries // 2, replace=False)
    copies = xb[picks] + 0.01 * rng.normal(size=(len(picks), d)).astype(np.float32)
    fresh = centres[rng.integers(0, 2048, queries - len(picks))] + 1.0 * rng.normal(size=(queries - len(picks), d)).astype(np.float32)
    xq = np.concatenate([copies, fresh]).astype(np.float32)
    xq /= np.linalg.norm(xq, axis=1, keepdims=True)
    rows = []
    for kind in ("flat", "hnsw", "ivf"):
        started = time.perf_counter()
        res = rg.search(xb, xq, 10, rg.IndexConfig(kind=kind, recall_sample=queries), threshold=0.9)
        rows.append({"index": kind, "n": n, "d": d, "queries": queries, "seconds": round(time.perf_counter() - started, 2),
                     "recall_at_10": res.recall_at_k if kind != "flat" else 1.0,
                     "flag_recall": res.flag_recall if kind != "flat" else 1.0, "params": res.params})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench/results/audits.json"))
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--per-shard", type=int, default=1000)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threshold", type=float, default=None,
                        help="candidate cosine (default: the packaged audits.yaml thresholds[<encoder>])")
    parser.add_argument("--k", type=int, default=20, help="neighbours per generated image (the audit default)")
    parser.add_argument("--demo-only", action="store_true")
    parser.add_argument("--index-n", type=int, default=50_000)
    parser.add_argument("--index-d", type=int, default=384)
    args = parser.parse_args()
    from curation_assets.core import pixel_verify as pv, regurgitation as rg

    results = {"demo": demo_regurgitation(args.shards, args.per_shard, args.size, args.seed, args.k, args.threshold)}
    print(json.dumps(results["demo"], indent=2))
    if args.demo_only:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2, default=str))
        return
    results["index"] = index_recall(args.index_n, args.index_d, 1000, args.seed)
    for row in results["index"]:
        print(f"{row['index']:>5}: {row['seconds']:6.2f}s recall@10 {row['recall_at_10']:.4f} flag recall {row['flag_recall']}")
    results["verification_calibration"] = pv.calibrate(300)
    print("verification calibration:", results["verification_calibration"])
    from curation_assets.core.perceptual import PerceptualEncoder

    results["candidate_calibration"] = rg.calibrate_candidate_threshold(
        PerceptualEncoder(), n=400, quantile=0.01, shifts=packaged_regurgitation_config()["colour_shifts"],
        verify=pv.ContainmentSettings())
    print("candidate threshold calibration:", results["candidate_calibration"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
