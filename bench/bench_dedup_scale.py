"""Benchmark of the partitioned dedup path (Delta tables, Dagster assets) at 1M, 3M and 10M embeddings.

For each N, synthetic embeddings (d=256, :func:`shard_embeddings`: topics of uneven size, planted duplicate
groups within and across neighbouring shards) are written shard by shard into ``image_embeddings`` of a fresh
data root; then each step runs through the pipeline's own ``materialize`` in a fresh subprocess, so that its
peak RSS (``VmHWM``) is its own:

1. ``kmeans_centroids`` (two-level fits, subsets sized to ``CURATION_MEMORY_GB``),
2. ``cluster_assignments`` for every shard (the map side: vectors packed as float16 into the buckets),
3. ``duplicate_pairs`` (every bucket searched, pixel verification off: synthetic embeddings have no images),
4. ``dedup_recall`` (exact search of a 5,000-row sample against all N, streamed shard by shard),
5. one added shard of 10,000 embeddings: its ``image_embeddings`` and ``cluster_assignments``, then
   ``duplicate_pairs`` again, which searches only the new rows of the buckets the shard lands in.

Nothing of a step is held between steps but the tables; the budget is the default 4 GiB unless
``--memory-gb`` says otherwise. Results (time, CPU time, peak RSS per step, recall, pairs) go to ``--out``.

    python bench/bench_dedup_scale.py --n 1000000,3000000 --out bench/results/dedup_scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

THRESHOLD = 0.9
D = 256


def shard_embeddings(shard: int, size: int, d: int, seed: int, n_total: int, dup_fraction: float = 0.05
                     ) -> np.ndarray:
    """One shard of a streamed synthetic corpus: points around shared topics (lognormal sizes, one topic per
    ~200 points of the whole corpus) plus copies at cosine 0.92-0.995 of points of this shard and of the
    previous one (regenerated from its seed), so duplicates cross shard boundaries."""
    from curation_assets.demo.synthetic_embeddings import _unit

    grng = np.random.default_rng(seed)
    n_topics = max(1, n_total // 200)
    topics = _unit(grng.standard_normal((n_topics, d)).astype(np.float32))
    weights = grng.lognormal(0.0, 1.2, n_topics)
    weights /= weights.sum()

    def base(s: int) -> np.ndarray:
        rng = np.random.default_rng([seed, s])
        topic = rng.choice(n_topics, size=size, p=weights)
        return _unit(topics[topic] + 0.045 * rng.standard_normal((size, d), dtype=np.float32))

    x = base(shard)
    rng = np.random.default_rng([seed, shard, 1])
    n_copies = int(size * dup_fraction)
    pool = np.concatenate([x, base(shard - 1)]) if shard > 0 else x
    src = pool[rng.integers(0, len(pool), n_copies)]
    u = rng.standard_normal(src.shape, dtype=np.float32)
    u -= (u * src).sum(axis=1, keepdims=True) * src
    _unit(u)
    cos = rng.uniform(0.92, 0.995, n_copies).astype(np.float32)[:, None]
    x[rng.choice(size, n_copies, replace=False)] = _unit(cos * src + np.sqrt(1 - cos ** 2) * u)
    return x


def _peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _pipeline(root: Path):
    from curation_assets.pipeline import open_pipeline

    return open_pipeline(root, root / "shards", str(root / "config.yaml"))  # its persistent instance


def step_write(root: Path, shards: list[int], size: int, seed: int, n_total: int) -> dict:
    from curation_assets.core import delta
    from curation_assets.runner import register_shards

    pipeline = _pipeline(root)
    for shard in shards:
        key = f"{shard:05d}"
        x = shard_embeddings(shard, size, D, seed, n_total)
        uids = [f"{key}/{i:07d}" for i in range(size)]
        frame = delta.embeddings_frame(uids, [key] * size, x, "synthetic-256")
        pipeline.storage.write_shard("image_embeddings", frame, key)
    register_shards(pipeline.instance, [f"{s:05d}" for s in shards])
    return {}


def step_materialize(root: Path, assets: list[str], shards: list[str] | None) -> dict:
    import dagster as dg

    pipeline = _pipeline(root)
    results = pipeline.materialize(assets, shards)
    if not all(r.success for r in results):
        raise SystemExit(f"{assets} failed")
    meta = {}
    for asset in assets:
        event = pipeline.instance.get_latest_materialization_event(dg.AssetKey(asset))
        if event is not None:
            meta[asset] = {k: v.value for k, v in event.asset_materialization.metadata.items()
                           if isinstance(v.value, (int, float, str)) and not k.startswith("dagster/")
                           and k not in ("table", "report", "centroids_dir")}
    return meta


def run_step(name: str, args: list[str]) -> dict:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--step", name, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"step {name} failed:\n{proc.stderr[-4000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["subprocess_wall_seconds"] = time.perf_counter() - started
    print(f"  {name}: {out['seconds']:.1f}s, CPU {out['cpu_seconds']:.1f}s, peak RSS "
          f"{out['peak_rss_bytes'] / 2**30:.2f} GiB", flush=True)
    return out


def run_n(n: int, shard_size: int, seed: int, work: Path, memory_gb: float | None, keep: bool = False) -> dict:
    import yaml

    root = work / f"n{n}"
    shutil.rmtree(root, ignore_errors=True)
    (root / "shards").mkdir(parents=True)
    (root / "config.yaml").write_text(yaml.safe_dump({"dedup": {
        "threshold": THRESHOLD, "verify": {"enabled": False}, "buckets": {"vector_dtype": "float16"}}}))
    shards = n // shard_size
    common = ["--root", str(root), "--seed", str(seed), "--n-total", str(n), "--shard-size", str(shard_size)]
    if memory_gb:
        os.environ["CURATION_MEMORY_GB"] = str(memory_gb)
    print(f"N = {n:,} ({shards} shards of {shard_size:,}, d={D})", flush=True)
    out = {"n": n, "d": D, "shards": shards, "shard_size": shard_size, "steps": {}}
    out["steps"]["write_embeddings"] = run_step("write", common + ["--shards", f"0-{shards - 1}"])
    for asset in ("kmeans_centroids", "cluster_assignments", "duplicate_pairs", "dedup_recall"):
        out["steps"][asset] = run_step("materialize", common + ["--assets", asset])
    # one more shard of 10,000 arrives
    added = f"{shards:05d}"
    out["steps"]["added_shard_write"] = run_step("write", common + ["--shards", f"{shards}-{shards}",
                                                                    "--shard-size", "10000"])
    out["steps"]["added_shard_assignments"] = run_step("materialize", common + ["--assets", "cluster_assignments",
                                                                               "--only", added])
    out["steps"]["added_shard_duplicate_pairs"] = run_step("materialize", common + ["--assets", "duplicate_pairs"])
    recall = out["steps"]["dedup_recall"]["meta"]["dedup_recall"]
    pairs = out["steps"]["duplicate_pairs"]["meta"]["duplicate_pairs"]
    out["recall_all"] = recall["recall_all"]
    out["recall_1"] = recall["recall_1"]
    out["true_pairs_in_sample"] = recall["true_pairs_in_sample"]
    out["candidate_pairs"] = pairs["candidate_pairs"]
    main = ("kmeans_centroids", "cluster_assignments", "duplicate_pairs")
    out["dedup_seconds"] = sum(out["steps"][s]["seconds"] for s in main)
    out["dedup_cpu_seconds"] = sum(out["steps"][s]["cpu_seconds"] for s in main)
    out["peak_rss_bytes_max"] = max(s["peak_rss_bytes"] for s in out["steps"].values())
    out["disk_bytes"] = sum(p.stat().st_size for p in (root / "delta").rglob("*") if p.is_file())
    if not keep:
        shutil.rmtree(root, ignore_errors=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench/results/dedup_scale.json"))
    parser.add_argument("--n", default="1000000,3000000,10000000")
    parser.add_argument("--shard-size", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("data/bench_scale"))
    parser.add_argument("--memory-gb", type=float, default=None)
    parser.add_argument("--keep", action="store_true", help="keep each N's data root (under --work)")
    parser.add_argument("--step")
    parser.add_argument("--root", type=Path)
    parser.add_argument("--n-total", type=int)
    parser.add_argument("--shards")
    parser.add_argument("--assets")
    parser.add_argument("--only")
    args = parser.parse_args()
    if args.step:
        t0, c0 = time.perf_counter(), time.process_time()
        if args.step == "write":
            lo, hi = (int(v) for v in args.shards.split("-"))
            meta = step_write(args.root, list(range(lo, hi + 1)), args.shard_size, args.seed, args.n_total)
        else:
            meta = step_materialize(args.root, args.assets.split(","), [args.only] if args.only else None)
        print(json.dumps({"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0,
                          "peak_rss_bytes": _peak_rss(), "meta": meta}, default=str))
        return
    previous = json.loads(args.out.read_text()) if args.out.exists() else {}
    runs = previous.get("runs", {})
    for n in (int(v) for v in args.n.split(",")):
        runs[str(n)] = run_n(n, args.shard_size, args.seed, args.work, args.memory_gb, args.keep)
        results = {"summary": summarize(runs), "cpu_count": os.cpu_count(), "threshold": THRESHOLD, "d": D,
                   "runs": runs}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2, default=str))
    print(json.dumps(summarize(runs), indent=1))


def summarize(runs: dict) -> dict:
    """The headline per N (first in the results file, so bench/summarize.py shows it)."""
    out = {}
    for key, run in sorted(runs.items(), key=lambda kv: int(kv[0])):
        steps = run["steps"]
        out[f"n{key}"] = {
            "dedup_seconds": run["dedup_seconds"], "dedup_cpu_seconds": run["dedup_cpu_seconds"],
            "recall_5_clusterings": run["recall_all"], "recall_1_clustering": run["recall_1"],
            "peak_rss_gib": run["peak_rss_bytes_max"] / 2 ** 30,
            "added_10k_shard_duplicate_pairs_seconds": steps["added_shard_duplicate_pairs"]["seconds"],
            "full_duplicate_pairs_seconds": steps["duplicate_pairs"]["seconds"],
        }
    return out


if __name__ == "__main__":
    main()
