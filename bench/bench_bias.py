"""Bias stage benchmark: caption matching throughput, the reweighting probe's time and how well it restores
a group ratio on synthetic embeddings with a planted filter effect, and drift-rule evaluation speed.

    python bench/bench_bias.py --out bench/results/bias.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from curation_assets.core import demographics as demo  # noqa: E402
from curation_assets.core.reweighting import fit_weights  # noqa: E402

TEMPLATES = ["a woman walking on the beach", "two men playing football", "a man and a woman at dinner",
             "a person riding a bike", "a red clock on a wall", "the girls' school", "a human manager",
             "three women's shoes", "a boy with his father", "an abstract painting of shapes"]


def bench_matching(n: int) -> dict:
    rng = np.random.default_rng(0)
    captions = pl.Series("caption", [TEMPLATES[i] for i in rng.integers(0, len(TEMPLATES), n)])
    matcher = demo.CaptionMatcher()
    start = time.perf_counter()
    flags = matcher.annotate(captions)
    seconds = time.perf_counter() - start
    return {"captions": n, "seconds": seconds, "captions_per_s": n / seconds,
            "women_share": float(flags["women"].mean()), "men_share": float(flags["men"].mean())}


def bench_probe(n: int, d: int, families: int = 20, thinned: float = 0.3) -> dict:
    """``families`` Gaussian clusters on the unit sphere; family 0 (20% of the data) is women-heavy (75% of its captions
    mention women, 25% men), the others balanced; the filter removes a ``thinned`` share of family 0 from a
    region *next to* its centre (a motif), like the demo corpus."""
    rng = np.random.default_rng(1)
    centres = rng.standard_normal((families, d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    fam = np.where(rng.random(n) < 0.2, 0, rng.integers(1, families, n))  # family 0 is 20% of the data
    x = centres[fam] + 0.6 / np.sqrt(d) * rng.standard_normal((n, d)).astype(np.float32)
    motif = (fam == 0) & (rng.random(n) < thinned)
    direction = rng.standard_normal(d).astype(np.float32)
    direction /= np.linalg.norm(direction)
    x[motif] += 0.5 * direction
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    women = np.where(fam == 0, rng.random(n) < 0.75, rng.random(n) < 0.3)
    men = np.where(fam == 0, rng.random(n) < 0.25, rng.random(n) < 0.3)
    kept = ~motif
    raw = women.sum() / men.sum()
    filtered = women[kept].sum() / men[kept].sum()
    start = time.perf_counter()
    result = fit_weights(x, kept)
    seconds = time.perf_counter() - start
    w = result.weights
    reweighted = (w * women[kept]).sum() / (w * men[kept]).sum()
    return {"n": n, "d": d, "fit_seconds": seconds, "ratio_raw": float(raw),
            "filtered_change": float(filtered / raw - 1), "reweighted_change": float(reweighted / raw - 1),
            "effective_sample_fraction": result.effective_sample_size / len(w),
            "heldout_accuracy": result.train_accuracy, "regularization": result.regularization,
            "region_imbalance": {f"{k:g}": v for k, v in result.balance.items()},
            "cv_log_loss": {f"{k:g}": v for k, v in result.cv_log_loss.items()}}


def bench_drift(shards: int) -> dict:
    rng = np.random.default_rng(2)
    counts = {f"{i:05d}": {"women": (float(rng.binomial(10_000, 0.18)), 10_000.0),
                           "men": (float(rng.binomial(10_000, 0.10)), 10_000.0)} for i in range(shards)}
    versions = {s: "words:x" for s in counts}
    settings = demo.DriftSettings()
    start = time.perf_counter()
    alerts = sum(demo.drift_verdict(s, "words:x", counts, versions, settings).alerting for s in counts)
    seconds = time.perf_counter() - start
    return {"shards": shards, "seconds": seconds, "false_alerts_on_stationary_shards": int(alerts)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="bench/results/bias.json")
    parser.add_argument("--captions", type=int, default=1_000_000)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--d", type=int, default=512)
    args = parser.parse_args()
    results = {"machine": platform.platform(), "matching": bench_matching(args.captions),
               "probe": bench_probe(args.n, args.d), "drift": bench_drift(2_000)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    m, p, d = results["matching"], results["probe"], results["drift"]
    print(f"caption matching: {m['captions_per_s']:,.0f} captions/s ({m['captions']:,} captions)")
    print(f"reweighting probe: N={p['n']:,} d={p['d']} in {p['fit_seconds']:.1f}s; women/men ratio "
          f"filtered {100 * p['filtered_change']:+.1f}%, reweighted {100 * p['reweighted_change']:+.1f}% vs raw; "
          f"ESS {100 * p['effective_sample_fraction']:.0f}%; L2 penalty {p['regularization']:g} (selected by region balance)")
    print(f"drift rule: {d['shards']} shards judged in {d['seconds']:.2f}s, "
          f"{d['false_alerts_on_stationary_shards']} alerts on stationary shards")


if __name__ == "__main__":
    main()
