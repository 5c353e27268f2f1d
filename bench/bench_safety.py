"""Safety stage benchmark: scoring throughput and the cost of one active-learning round, on this machine.

- scoring: calibrated probabilities for N synthetic L2-normalised embeddings (default 1M x 512) with one
  probe and with all categories at once (the per-shard asset scores every category in one matrix product);
- training per round: cross-validated training of one category's probe on labelled sets of growing size
  (the seed, then +batch per round), 5-fold CV + final fit + Platt calibration;
- queue selection per round: streaming the whole pool through the active-learning QueueBuilder (flagged,
  missed-positive neighbours with exact faiss search, uncertainty), in blocks like the asset does per shard.

    python bench/bench_safety.py --out bench/results/safety.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from curation_assets.core.active_learning import QueueBuilder  # noqa: E402
from curation_assets.core.safety import ClassifierConfig, ProbeBank, train_probe  # noqa: E402


def synthetic(n: int, dim: int, rate: float, rng: np.random.Generator, block: int = 131072):
    """Unit vectors with a planted positive direction per category (x: float32 n x dim, y: n x 2 labels)."""
    X = np.empty((n, dim), dtype=np.float32)
    y = np.zeros((n, 2), dtype=np.int8)
    for start in range(0, n, block):
        stop = min(n, start + block)
        part = rng.standard_normal((stop - start, dim), dtype=np.float32)
        for c in range(2):
            hit = rng.random(stop - start) < rate
            part[hit, c] += 2.0 * np.sqrt(dim) / 8
            y[start:stop, c] = hit
        part /= np.linalg.norm(part, axis=1, keepdims=True)
        X[start:stop] = part
    return X, y


def timed(fn, repeat: int = 1):
    best = float("inf")
    out = None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="embeddings scored")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--rate", type=float, default=0.04, help="positive rate per category")
    parser.add_argument("--seed-labels", type=int, default=400, help="labelled samples in round 0")
    parser.add_argument("--batch", type=int, default=300, help="labels added per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--block", type=int, default=100_000, help="rows per streamed block (a shard)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/safety.json"))
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    t = time.perf_counter()
    X, Y = synthetic(args.n, args.dim, args.rate, rng)
    print(f"generated {args.n} x {args.dim} embeddings in {time.perf_counter() - t:.1f}s")

    # train on a labelled subset: a class-balanced-ish seed, then random batches (the cost depends on size only)
    order = rng.permutation(args.n)
    sizes = [args.seed_labels + r * args.batch for r in range(args.rounds + 1)]
    pos_idx = order[Y[order, 0] == 1]
    neg_idx = order[Y[order, 0] == 0]
    training = []
    probes = {}
    for r, size in enumerate(sizes):
        n_pos = size // 4
        idx = np.r_[pos_idx[:n_pos], neg_idx[: size - n_pos]]
        for c in range(2):
            seconds, (probe, cv) = timed(lambda: train_probe(X[idx], Y[idx, c], f"cat{c}", ClassifierConfig(cv_folds=5)))
            probes[c] = probe
            training.append({"round": r, "category": f"cat{c}", "labels": int(size), "seconds": round(seconds, 3),
                             "cv_auc": round(cv.auc, 4)})
        print(f"round {r}: {size} labels, train+5-fold CV {training[-1]['seconds']:.2f}s per category "
              f"(AUC {training[-1]['cv_auc']:.3f})")

    single = ProbeBank([probes[0]])
    both = ProbeBank([probes[0], probes[1]])
    scoring = {}
    for name, bank in (("1_category", single), ("2_categories", both)):
        def run(bank=bank):
            for start in range(0, args.n, args.block):
                bank.predict_proba(X[start:start + args.block])
        seconds, _ = timed(run, repeat=2)
        scoring[name] = {"seconds": round(seconds, 3), "samples_per_s": round(args.n / seconds),
                         "sample_categories_per_s": round(args.n * len(bank.categories) / seconds)}
        print(f"scoring {name}: {args.n / seconds:,.0f} samples/s ({seconds:.2f}s for {args.n})")

    # one queue selection over the whole pool (per category), streamed in blocks
    uids = np.array([f"{i // 10000:05d}/{i:09d}" for i in range(args.n)], dtype=object)

    def queue_round():
        queries = X[pos_idx[:50]]
        builder = QueueBuilder(0.05, {"flagged": 120, "missed_neighbors": 90, "uncertain": 90}, args.dim,
                               queries=queries, query_uids=[str(i) for i in range(50)], query_scores=[0.1] * 50)
        for start in range(0, args.n, args.block):
            scores = single.predict_proba(X[start:start + args.block])[:, 0]
            builder.add(uids[start:start + args.block], X[start:start + args.block], scores)
        return builder.select(300)

    seconds, batch = timed(queue_round)
    print(f"queue selection: {len(batch)} picked from {args.n} in {seconds:.2f}s per category")

    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_average_1m_at_end": round(os.getloadavg()[0], 2)},
        "n": args.n, "dim": args.dim,
        "scoring": scoring,
        "training_per_round": training,
        "queue_selection_seconds_per_category": round(seconds, 3),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
