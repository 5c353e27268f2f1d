"""Benchmark of the perceptual encoder: throughput (decode included) and near-duplicate separation.

Reads the tar shards of a demo corpus (rendered into a temporary directory with
``write_demo_corpus(shards=4, per_shard=1000, seed=0, size=256)`` unless ``--corpus`` points at one),
encodes every image from its JPEG bytes, and measures at the frozen ``DUPLICATE_THRESHOLD``:

- pair recall over every within-group pair of the planted duplicate groups,
- the false-positive rate over random pairs of different groups / singletons,
- the same per family, which transforms the misses carry, and how many "near-miss" clocks (the same
  clock at another time: different images) score above the threshold.

    python bench/bench_encoders.py --out bench/results/encoders.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tarfile
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from curation_assets.core import perceptual as P  # noqa: E402


def _read_shards(corpus: Path, uids: list[str]) -> list[bytes]:
    wanted = set(uids)
    blobs: dict[str, bytes] = {}
    for tar_path in sorted(corpus.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar:
                if member.name.endswith((".jpg", ".png", ".webp")):
                    uid = f"{tar_path.stem}/{member.name.rsplit('.', 1)[0]}"
                    if uid in wanted:
                        blobs[uid] = tar.extractfile(member).read()
    return [blobs[u] for u in uids]


def _throughput(blobs: list[bytes], workers: int) -> dict:
    encoder = P.PerceptualEncoder(num_workers=workers)
    encoder.encode_bytes(blobs[:64])
    started = time.perf_counter()
    vectors = encoder.encode_bytes(blobs)
    seconds = time.perf_counter() - started
    return {"workers": workers, "images": len(blobs), "seconds": round(seconds, 2),
            "images_per_s": round(len(blobs) / seconds, 1), "vectors": vectors}


def run(corpus: Path | None, shards: int, per_shard: int, seed: int, n_random: int, workers: int) -> dict:
    import polars as pl

    result: dict = {"encoder": P.ENCODER_NAME, "dim": P.OUTPUT_DIM, "threshold": P.DUPLICATE_THRESHOLD,
                    "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                "load_avg_1m_at_start": round(os.getloadavg()[0], 2)}}
    tmp = None
    if corpus is None:
        from curation_assets.demo.corpus import write_demo_corpus

        tmp = tempfile.TemporaryDirectory(prefix="bench-encoders-")
        corpus = Path(tmp.name)
        started = time.perf_counter()
        write_demo_corpus(corpus, shards=shards, per_shard=per_shard, seed=seed, size=256, generated=0)
        result["corpus_render_seconds"] = round(time.perf_counter() - started, 1)
        result["corpus"] = {"shards": shards, "per_shard": per_shard, "seed": seed, "size": 256}
    else:
        result["corpus"] = {"path": str(corpus)}

    started = time.perf_counter()
    P.whitening()
    result["whitening_load_seconds"] = round(time.perf_counter() - started, 2)

    truth = pl.read_parquet(corpus / "ground_truth.parquet").filter(~pl.col("corrupt"))
    uids = truth["uid"].to_list()
    blobs = _read_shards(corpus, uids)

    main = _throughput(blobs, workers)
    vectors = main.pop("vectors")
    single = _throughput(blobs[:1000], 1)
    single.pop("vectors")
    result["throughput"] = {"parallel": main, "one_worker": single,
                            "note": "decode (JPEG bytes -> PIL) included; whitening already loaded"}

    groups = truth["dup_group"].to_list()
    report = P.separation_report(vectors, groups, P.DUPLICATE_THRESHOLD, n_random, seed=0)
    result["separation"] = report
    result["acceptance"] = {"pair_recall>=0.95": report["pair_recall"] >= 0.95,
                            "false_positive_rate<=0.001": report["false_positive_rate"] <= 0.001}

    families = np.array(truth["family"].to_list())
    per_family = {}
    for family in sorted(set(families)):
        mask = families == family
        rep = P.separation_report(vectors[mask], [g for g, m in zip(groups, mask) if m], P.DUPLICATE_THRESHOLD,
                                  min(n_random, 50_000), seed=0)
        per_family[family] = {"pair_recall": rep["pair_recall"], "n_duplicate_pairs": rep["n_duplicate_pairs"],
                              "within_family_false_positive_rate": rep["false_positive_rate"]}
    result["per_family"] = per_family

    index = {u: i for i, u in enumerate(uids)}
    transforms = truth["dup_transform"].to_list()
    missed, total = Counter(), Counter()
    group_arr = np.array([-1 if g is None else g for g in groups])
    for g in np.unique(group_arr[group_arr >= 0]):
        members = np.flatnonzero(group_arr == g)
        originals = [i for i in members if transforms[i] == "original"]
        for i in members:
            if transforms[i] == "original":
                continue
            kind = "+".join(sorted(p.split("(")[0] for p in transforms[i].split("+")))
            for o in originals:
                total[kind] += 1
                missed[kind] += int(float(vectors[i] @ vectors[o]) <= P.DUPLICATE_THRESHOLD)
    result["original_vs_copy_recall_by_transform"] = {
        k: {"pairs": total[k], "recall": round(1 - missed[k] / total[k], 4)} for k in sorted(total)
    }

    near = truth.filter(pl.col("near_miss_of").is_not_null())
    sims = np.array([float(vectors[index[u]] @ vectors[index[v]])
                     for u, v in zip(near["uid"], near["near_miss_of"]) if v in index])
    result["near_miss_clocks"] = {
        "pairs": int(len(sims)),
        "above_threshold": int((sims > P.DUPLICATE_THRESHOLD).sum()),
        "share_above_threshold": float((sims > P.DUPLICATE_THRESHOLD).mean()) if len(sims) else None,
        "similarity_min_median_max": (
            [round(float(q), 4) for q in np.quantile(sims, [0, 0.5, 1])] if len(sims) else None
        ),
        "note": "the same clock at another time: different images, ideally below the threshold",
    }
    if tmp is not None:
        tmp.cleanup()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench/results/encoders.json"))
    parser.add_argument("--corpus", type=Path, default=None, help="an existing demo corpus directory")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--per-shard", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-random", type=int, default=200_000)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    started = time.perf_counter()
    result = run(args.corpus, args.shards, args.per_shard, args.seed, args.n_random, args.workers)
    result["total_seconds"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    s, t = result["separation"], result["throughput"]
    print(f"{result['encoder']} (dim {result['dim']}), threshold {result['threshold']}")
    par, one = t["parallel"], t["one_worker"]
    load = result["machine"]["load_avg_1m_at_start"]
    print(f"  throughput: {par['images_per_s']} images/s with {par['workers']} workers, "
          f"{one['images_per_s']} with 1 (decode included, load avg {load})")
    print(f"  pair recall {s['pair_recall']:.4f} "
          f"({s['n_duplicate_pairs_above']}/{s['n_duplicate_pairs']} within-group pairs)")
    print(f"  false-positive rate {s['false_positive_rate']:.5f} "
          f"({s['n_random_pairs_above']}/{s['n_random_pairs']} random pairs)")
    print(f"  threshold at 0.1% FPR on this corpus: {s['threshold_at_fpr_0.001']:.3f}")
    nm = result["near_miss_clocks"]
    print(f"  near-miss clocks above threshold: {nm['above_threshold']}/{nm['pairs']}")
    print(f"  acceptance: {result['acceptance']}  -> {args.out}")


if __name__ == "__main__":
    main()
