"""Benchmark of the five-clustering near-duplicate search on synthetic embeddings with realistic structure.

Three measurements (see ``curation_assets.demo.synthetic_embeddings`` for the data: topics of very uneven size
grouped into themes, plus planted duplicate groups with copies at cosine 0.92..0.995 to their source):

1. **Against brute force** at N = 200,000, d = 512, in the same run: the five-clustering search (fit + assign +
   within-cluster search + union + components) vs faiss exact range search (IndexFlatIP). Recall is over the
   true pairs (cosine >= threshold) of the brute-force queries. With ``--brute-queries Q < N`` the brute force
   runs Q random query rows against all N rows and its full time is Q-linear extrapolated (its cost is exactly
   linear in the number of queries); ``--brute-queries 0`` runs all N queries.
2. **Scaling**: the whole stage (k-means x5, assignment, search, union, connected components, representatives,
   and the dedup_recall exact-search sample) in a fresh subprocess per N that loads the matrix from a .npy file,
   with wall and CPU time per step and peak RSS (``VmHWM`` of the subprocess; ``resource.getrusage`` would
   include the driver's RSS at fork time) against the size of the embedding matrix. Delta I/O is not included.
3. **N = 1,000,000**: the same subprocess measurement (targets: < 10 min, peak RSS < 3x the matrix).
4. **The hard setting** (:data:`HARD`): overlapping topics and copies just above the threshold, where one
   clustering misses a visible share of the pairs; recall against exact search by clusterings 1..5.

Scope: this measures stage 1 of the dedup stage (the embedding candidate search) only. Stage 2 (pixel
verification of each candidate pair, ``core.pixel_verify``) needs images, which synthetic embeddings do not
have; its cost is linear in the number of candidate pairs (about 1,300 pairs per second with 2 worker
processes on 2 cores, from the stored thumbnails) and is measured on the demo images in
``bench/bench_verify.py`` and ``bench/bench_dedup_baselines.py``.

    python bench/bench_dedup.py --out bench/results/dedup.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from curation_assets.core import dedup  # noqa: E402
from curation_assets.demo.synthetic_embeddings import synthetic_embeddings  # noqa: E402

THRESHOLD = 0.9


def compare_with_brute_force(n: int, d: int, brute_queries: int, seed: int) -> dict:
    data = synthetic_embeddings(n, d, seed=seed)
    x = data.x
    started, cpu = time.perf_counter(), time.process_time()
    result = dedup.run_dedup(x, THRESHOLD)
    ours, ours_cpu = time.perf_counter() - started, time.process_time() - cpu

    import faiss

    queries = dedup.sample_queries(n, brute_queries if brute_queries > 0 else n, seed + 1)
    started, cpu = time.perf_counter(), time.process_time()
    index = faiss.IndexFlatIP(d)
    index.add(x)
    ta, tb, _ = dedup.exact_pairs(x, queries, THRESHOLD, index=index)
    brute_measured, brute_cpu = time.perf_counter() - started, time.process_time() - cpu
    brute_full = brute_measured * n / len(queries)
    curve = dedup.recall_curve(ta, tb, result.pair_a, result.pair_b, result.pair_mask, n, 5)
    false_pairs = len(set(zip(result.pair_a.tolist(), result.pair_b.tolist()))
                      - set(zip(ta.tolist(), tb.tolist()))) if len(queries) == n else None
    return {
        "n": n, "d": d, "threshold": THRESHOLD, "k": result.k,
        "ours_seconds": ours, "ours_cpu_seconds": ours_cpu, "ours_steps_seconds": result.seconds,
        "largest_cluster": result.search_stats.largest_cluster,
        "dot_products_fraction_of_all_pairs": result.search_stats.dot_products / (n * (n - 1) / 2),
        "pairs_found": int(len(result.pair_a)), "pairs_per_clustering": result.per_clustering_pairs,
        "brute_queries": int(len(queries)), "brute_seconds_measured": brute_measured,
        "brute_cpu_seconds_measured": brute_cpu, "cpu_speed_ratio": brute_cpu * n / len(queries) / ours_cpu,
        "brute_seconds_full": brute_full, "brute_full_is_extrapolated": len(queries) < n,
        "speed_ratio": brute_full / ours,
        "true_pairs_in_sample": int(len(ta)),
        "recall_by_clusterings": [r.recall for r in curve],
        "recall_low_by_clusterings": [r.recall_low for r in curve],
        "recall_mean_over_subsets": [r.recall_mean_over_subsets for r in curve],
        "false_pairs": false_pairs,
    }


HARD = {"topic_spread": 0.12, "point_spread": 0.03, "dup_cosine": (0.895, 0.93), "points_per_topic": 2000.0}
"""The hard setting: large, dense, overlapping topics (each split over dozens of k-means cells) and copies
just above the threshold, so a pair often straddles a cell boundary and one clustering misses a visible share
of the pairs (OpenAI saw 85% with one clustering and 97% with five on real data). Denser topics (a point
spread of 0.02) put most of a topic above the threshold and the exact search runs out of memory."""


def hard_setting(n: int, d: int, seed: int, threshold: float = THRESHOLD, **overrides) -> dict:
    """Recall of the clustered search against exact search by clusterings 1..5 on the hard setting (every
    true pair of ``n`` rows, found by faiss range search)."""
    import faiss

    params = {**HARD, **overrides}
    data = synthetic_embeddings(n, d, seed=seed, **params)
    x = data.x
    started = time.perf_counter()
    result = dedup.run_dedup(x, threshold)
    seconds = time.perf_counter() - started
    index = faiss.IndexFlatIP(d)
    index.add(x)
    ta, tb, _ = dedup.exact_pairs(x, np.arange(n), threshold, index=index)
    rows = dedup.recall_curve(ta, tb, result.pair_a, result.pair_b, result.pair_mask, n, 5)
    return {"n": n, "d": d, "threshold": threshold, "params": {k: list(v) if isinstance(v, tuple) else v
                                                               for k, v in params.items()},
            "k": result.k, "true_pairs": len(ta), "seconds_clustered": round(seconds, 2),
            "recall_by_clusterings": {r.clusterings: round(r.recall, 4) for r in rows},
            "recall_mean_over_subsets": {r.clusterings: round(r.recall_mean_over_subsets, 4) for r in rows}}


def _peak_rss() -> int:
    """Peak resident set size of this process in bytes: ``VmHWM`` (the high-water mark of this process's own
    memory map). ``getrusage(RUSAGE_SELF).ru_maxrss`` is the fallback; on Linux it keeps the parent's RSS at
    fork time across exec, which would count the benchmark driver's memory too."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(npy: str, threshold: float, recall_sample: int) -> dict:
    """The whole dedup stage on a matrix loaded from disk, in this (fresh) process."""
    import polars as pl

    t0, cpu0 = time.perf_counter(), time.process_time()
    x = np.load(npy)
    load = time.perf_counter() - t0
    result = dedup.run_dedup(x, threshold)
    t = time.perf_counter()
    n = len(x)
    uids = [f"{i // 10000:05d}/{i:09d}" for i in range(n)]
    groups = dedup.group_frame(uids, result.component)
    rng = np.random.default_rng(0)
    members = groups.with_columns(pl.Series("width", rng.integers(64, 1024, groups.height)),
                                  pl.Series("height", rng.integers(64, 1024, groups.height)))
    ranked = dedup.choose_representatives(members, ["highest_resolution", "uid"])
    removed = int((~ranked["is_representative"]).sum())
    groups_seconds = time.perf_counter() - t
    t = time.perf_counter()
    queries = dedup.sample_queries(n, recall_sample, 1234)
    ta, tb, _ = dedup.exact_pairs(x, queries, threshold)
    curve = dedup.recall_curve(ta, tb, result.pair_a, result.pair_b, result.pair_mask, n, 5)
    recall_seconds = time.perf_counter() - t
    total = time.perf_counter() - t0
    peak = _peak_rss()
    return {
        "n": n, "d": int(x.shape[1]), "k": result.k, "seconds_total": total, "seconds_load": load,
        "cpu_seconds_total": time.process_time() - cpu0,
        "seconds_steps": {**result.seconds, "groups_representatives": groups_seconds, "recall_sample": recall_seconds},
        "pairs": int(len(result.pair_a)), "groups": int(ranked["group_id"].n_unique()), "removed": removed,
        "largest_cluster": result.search_stats.largest_cluster,
        "recall_sample": int(len(queries)), "recall_true_pairs": int(len(ta)),
        "recall_by_clusterings": [r.recall for r in curve],
        "peak_rss_bytes": peak, "matrix_bytes": int(x.nbytes), "peak_rss_over_matrix": peak / x.nbytes,
    }


def run_child(n: int, d: int, seed: int, recall_sample: int, tmp: Path) -> dict:
    data = synthetic_embeddings(n, d, seed=seed)
    path = tmp / f"x_{n}.npy"
    np.save(path, data.x)
    del data
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", str(path), "--recall-sample", str(recall_sample)],
                          capture_output=True, text=True, check=True)
    wall = time.perf_counter() - started
    path.unlink()
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["subprocess_wall_seconds"] = wall
    return out


def _print_compare(cmp: dict) -> None:
    print(f"N={cmp['n']} d={cmp['d']} K={cmp['k']}: five clusterings {cmp['ours_seconds']:.1f}s "
          f"({', '.join(f'{k} {v:.1f}s' for k, v in cmp['ours_steps_seconds'].items())}); brute force "
          f"{cmp['brute_seconds_full']:.1f}s{' (extrapolated from %d queries)' % cmp['brute_queries'] if cmp['brute_full_is_extrapolated'] else ''}"
          f" -> {cmp['speed_ratio']:.1f}x faster (CPU-time ratio {cmp['cpu_speed_ratio']:.1f}x)")
    print(f"  recall over {cmp['true_pairs_in_sample']} true pairs by clusterings 1..5: "
          + ", ".join(f"{r:.4f}" for r in cmp["recall_by_clusterings"]))


def summarize(results: dict) -> dict:
    """Scalars for bench/summarize.py (which skips lists)."""
    out: dict = {}
    cmp = results.get("compare")
    if cmp:
        out.update({"compare_n": cmp["n"], "speed_ratio": cmp["speed_ratio"], "cpu_speed_ratio": cmp["cpu_speed_ratio"],
                    "brute_full_is_extrapolated": cmp["brute_full_is_extrapolated"],
                    "recall_1_clustering": cmp["recall_by_clusterings"][0],
                    "recall_5_clusterings": cmp["recall_by_clusterings"][-1]})
    for row in results.get("scaling", []):
        out[f"n{row['n']}_seconds"] = row["seconds_total"]
        out[f"n{row['n']}_peak_rss_over_matrix"] = row["peak_rss_over_matrix"]
    if "time_growth_exponent" in results:
        out["time_growth_exponent"] = results["time_growth_exponent"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench/results/dedup.json"))
    parser.add_argument("--n-compare", type=int, default=200_000, help="0 to skip the brute-force comparison")
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--brute-queries", type=int, default=10_000, help="0 = all N (about 20 min at 200k here)")
    parser.add_argument("--scaling", default="50000,100000,200000")
    parser.add_argument("--n-large", type=int, default=1_000_000, help="0 to skip")
    parser.add_argument("--recall-sample", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-hard", type=int, default=100_000, help="0 to skip the hard setting")
    parser.add_argument("--only-hard", action="store_true", help="run only the hard setting; keep the other results")
    parser.add_argument("--child")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, THRESHOLD, args.recall_sample)))
        return

    results: dict = {"cpu_count": os.cpu_count(), "threshold": THRESHOLD}
    if args.n_hard:
        results["hard"] = hard_setting(args.n_hard, args.d, args.seed)
        print("hard setting:", json.dumps(results["hard"]))
        if args.only_hard:
            kept = json.loads(args.out.read_text()) if args.out.is_file() else {}
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({**kept, "hard": results["hard"]}, indent=2, default=str))
            return
    if args.n_compare:
        cmp = compare_with_brute_force(args.n_compare, args.d, args.brute_queries, args.seed)
        results["compare"] = cmp
        _print_compare(cmp)
    results["args"] = {k: v for k, v in vars(args).items() if k != "out"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=str))

    sizes = [int(s) for s in args.scaling.split(",") if s] + ([args.n_large] if args.n_large else [])
    results["scaling"] = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            row = run_child(n, args.d, args.seed, args.recall_sample, Path(tmp))
            results["scaling"].append(row)
            print(f"N={n}: whole stage {row['seconds_total']:.1f}s wall, {row['cpu_seconds_total']:.1f}s CPU ("
                  + ", ".join(f"{k} {v:.1f}s" for k, v in row["seconds_steps"].items())
                  + f"), peak RSS {row['peak_rss_bytes'] / 2**30:.2f} GiB = {row['peak_rss_over_matrix']:.2f}x the "
                  f"matrix, recall@5 {row['recall_by_clusterings'][-1]:.4f} on {row['recall_true_pairs']} pairs")
            args.out.write_text(json.dumps(results, indent=2, default=str))
    if len(results["scaling"]) >= 2:
        ns = np.array([r["n"] for r in results["scaling"]], float)
        ts = np.array([r["seconds_total"] for r in results["scaling"]], float)
        slope = np.polyfit(np.log(ns), np.log(ts), 1)[0]
        results["time_growth_exponent"] = slope
        print(f"time grows as N^{slope:.2f} over N = {', '.join(str(int(n)) for n in ns)}")
    results["summary"] = summarize(results)
    args.out.write_text(json.dumps(results, indent=2, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
