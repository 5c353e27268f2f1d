"""Near-duplicate detection on the demo images: our pipeline against perceptual-hash baselines.

All methods see the same images (the demo corpus: 4 shards x 1000 images of 256 px, generated with
``write_demo_corpus`` when missing) and are scored against the same ground truth (``dup_group`` of
ground_truth.parquet; corrupt images, which never reach any method, are left out):

- **ours**: the full two-stage pipeline: the perceptual encoder (``perceptual-v1``) + the dedup core (five
  k-means clusterings, within-cluster search at the encoder's fixed ``DUPLICATE_THRESHOLD``), then every
  candidate pair verified on pixels (``core.pixel_verify`` at its defaults, calibrated on synthetic pairs, not
  on this data), connected components of the verified pairs. Not tuned on this data.
- **ours_stage1**: stage 1 alone (candidates, no verification), at the same fixed threshold.
- **ours_swept**: stage 1 alone with the cosine threshold swept like the baselines' Hamming thresholds.
- **imagehash pHash**: ``imagehash.phash`` (64 bits), all pairs within a Hamming distance ``t``.
- **imagededup PHash**: ``imagededup.methods.PHash`` (encode_images + find_duplicates), max distance ``t``.

Each baseline's ``t`` is swept and its best F1 reported (tuned on the test set, which favours the baselines).
Scores are pair precision / recall / F1 over the unordered pairs within predicted groups (connected
components of the predicted pairs: what removal acts on), and, for reference, over the raw predicted pairs.

Note: torchvision in this environment fails to import (``operator torchvision::nms does not exist``), and
imagededup's package ``__init__`` imports its CNN module, which needs it. The hashing methods do not use it,
so the CNN modules are replaced by empty stand-ins before import; PHash itself is imagededup's own code.

    python bench/bench_dedup_baselines.py --out bench/results/dedup_baselines.json
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
import tempfile
import time
import types
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

IMAGE_EXT = (".jpg", ".jpeg", ".png", ".webp")


def ensure_corpus(corpus: Path | None) -> Path:
    candidates = [corpus] if corpus else [Path("data/demo/shards"), Path("data/bench/dedup_corpus")]
    for path in candidates:
        if path and (path / "ground_truth.parquet").is_file():
            return path
    from curation_assets.demo.corpus import write_demo_corpus

    out = candidates[-1]
    print(f"generating the demo corpus (4 x 1000 images, 256 px) at {out}")
    write_demo_corpus(out, shards=4, per_shard=1000, seed=0, size=256)
    return out


def load_images(corpus: Path) -> tuple[list[str], list[bytes]]:
    uids, blobs = [], []
    for tar_path in sorted(corpus.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                name = Path(member.name).name
                if member.isfile() and name.lower().endswith(IMAGE_EXT):
                    uids.append(f"{tar_path.stem}/{name.rsplit('.', 1)[0]}")
                    blobs.append(tar.extractfile(member).read())
    order = np.argsort(uids)
    return [uids[i] for i in order], [blobs[i] for i in order]


def decodable(blob: bytes) -> bool:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(blob)) as im:
            im.load()
        return True
    except Exception:
        return False


def closure_pairs(n: int, a: np.ndarray, b: np.ndarray) -> set[tuple[int, int]]:
    from curation_assets.core.dedup import connected_components

    comp = connected_components(n, np.asarray(a, np.int64), np.asarray(b, np.int64))
    out: set[tuple[int, int]] = set()
    order = np.argsort(comp, kind="stable")
    bounds = np.flatnonzero(np.r_[True, comp[order][1:] != comp[order][:-1], True])
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        members = sorted(order[lo:hi].tolist())
        for i in range(len(members)):
            for j in range(i + 1, len(members)):
                out.add((members[i], members[j]))
    return out


def score(pred: set[tuple[int, int]], truth: set[tuple[int, int]]) -> dict:
    tp = len(pred & truth)
    p = tp / len(pred) if pred else 0.0
    r = tp / len(truth) if truth else 0.0
    return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0, "pairs": len(pred)}


def evaluate(n: int, a, b, truth: set[tuple[int, int]]) -> dict:
    edges = {(min(i, j), max(i, j)) for i, j in zip(np.asarray(a).tolist(), np.asarray(b).tolist()) if i != j}
    return {"groups": score(closure_pairs(n, a, b), truth), "edges": score(edges, truth)}


def run_ours(blobs: list[bytes], truth: set, n: int, sweep: list[float]) -> tuple[dict, dict]:
    """Ours at the encoder's fixed threshold, and (like the baselines) at the best threshold of a sweep. The
    search runs once at the lowest threshold: the same clusterings at a higher threshold find exactly the
    pairs with similarity >= it, so the sweep filters those pairs."""
    from curation_assets.core import dedup
    from curation_assets.core.perceptual import DUPLICATE_THRESHOLD, PerceptualEncoder

    started = time.perf_counter()
    x = PerceptualEncoder().encode_bytes(blobs)
    encode = time.perf_counter() - started
    started = time.perf_counter()
    result = dedup.run_dedup(x, DUPLICATE_THRESHOLD)
    search = time.perf_counter() - started
    stage1 = {"threshold": DUPLICATE_THRESHOLD, "k": result.k, "seconds_encode": encode, "seconds_search": search,
              "seconds": encode + search, **evaluate(n, result.pair_a, result.pair_b, truth)}
    from curation_assets.core.pixel_verify import VerifySettings, verify_pairs

    cfg = VerifySettings()
    started = time.perf_counter()
    checks = verify_pairs([(blobs[i], blobs[j]) for i, j in zip(result.pair_a.tolist(), result.pair_b.tolist())], cfg)
    verify = time.perf_counter() - started
    ok = np.array([c.passes(cfg) for c in checks], dtype=bool)
    fixed = {"threshold": DUPLICATE_THRESHOLD, "k": result.k, "seconds_encode": encode, "seconds_search": search,
             "seconds_verify": verify, "seconds": encode + search + verify, "candidates": int(len(ok)),
             "verified": int(ok.sum()), "pairs_verified_per_second": len(ok) / max(verify, 1e-9),
             "structure_threshold": cfg.structure_threshold, "colour_threshold": cfg.colour_threshold,
             **evaluate(n, result.pair_a[ok], result.pair_b[ok], truth)}
    low = min(sweep)
    swept = dedup.run_dedup(x, low) if low < DUPLICATE_THRESHOLD else result
    table = {}
    for t in sweep:
        keep = swept.pair_sim >= t
        table[t] = evaluate(n, swept.pair_a[keep], swept.pair_b[keep], truth)
    best = max(table, key=lambda t: table[t]["groups"]["f1"])
    started = time.perf_counter()
    dedup.run_dedup(x, best)
    best_search = time.perf_counter() - started
    tuned = {"best_threshold": best, "k": result.k, "seconds_encode": encode, "seconds_search": best_search,
             "seconds": encode + best_search, **table[best],
             "sweep_f1": {t: round(v["groups"]["f1"], 4) for t, v in table.items()}}
    return fixed, stage1, tuned


def run_imagehash(blobs: list[bytes], truth: set, n: int, thresholds: range) -> dict:
    import imagehash
    from PIL import Image

    started = time.perf_counter()
    hashes = []
    for blob in blobs:
        with Image.open(io.BytesIO(blob)) as im:
            bits = imagehash.phash(im).hash.flatten()
        hashes.append(int("".join("1" if v else "0" for v in bits), 2))
    h = np.array(hashes, dtype=np.uint64)
    encode = time.perf_counter() - started
    started = time.perf_counter()
    dist = np.bitwise_count(h[:, None] ^ h[None, :])
    iu, ju = np.triu_indices(n, k=1)
    d = dist[iu, ju]
    pairwise = time.perf_counter() - started
    sweep = {}
    for t in thresholds:
        keep = d <= t
        sweep[t] = evaluate(n, iu[keep], ju[keep], truth)
    best = max(sweep, key=lambda t: sweep[t]["groups"]["f1"])
    return {"best_threshold": best, **sweep[best], "seconds_encode": encode, "seconds_search": pairwise,
            "seconds": encode + pairwise,
            "sweep_f1": {t: round(v["groups"]["f1"], 4) for t, v in sweep.items()}}


def _import_imagededup_phash():
    for name, attrs in (("imagededup.utils.models", ["CustomModel", "MobilenetV3", "DEFAULT_MODEL_NAME"]),
                        ("imagededup.methods.cnn", ["CNN"])):
        if name not in sys.modules:
            stub = types.ModuleType(name)
            for attr in attrs:
                setattr(stub, attr, None)
            sys.modules[name] = stub
    from imagededup.methods import PHash

    return PHash


def run_imagededup(uids: list[str], blobs: list[bytes], truth: set, n: int, thresholds: range) -> dict:
    phash_cls = _import_imagededup_phash()
    index = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (uid, blob) in enumerate(zip(uids, blobs)):
            name = uid.replace("/", "_") + ".jpg"
            (Path(tmp) / name).write_bytes(blob)
            index[name] = i
        phasher = phash_cls(verbose=False)
        started = time.perf_counter()
        encodings = phasher.encode_images(image_dir=tmp, num_enc_workers=1)
        encode = time.perf_counter() - started
    top = max(thresholds)
    scored = phasher.find_duplicates(encoding_map=encodings, max_distance_threshold=top, scores=True,
                                     num_dist_workers=1)
    sweep = {}
    for t in thresholds:
        a = [index[k] for k, vs in scored.items() for v, dist in vs if dist <= t]
        b = [index[v] for vs in scored.values() for v, dist in vs if dist <= t]
        sweep[t] = evaluate(n, a, b, truth)
    best = max(sweep, key=lambda t: sweep[t]["groups"]["f1"])
    started = time.perf_counter()
    phasher.find_duplicates(encoding_map=encodings, max_distance_threshold=best, num_dist_workers=1)
    search = time.perf_counter() - started
    return {"best_threshold": best, **sweep[best], "seconds_encode": encode, "seconds_search": search,
            "seconds": encode + search, "encoded": len(encodings),
            "sweep_f1": {t: round(v["groups"]["f1"], 4) for t, v in sweep.items()}}


def main() -> None:
    import polars as pl

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench/results/dedup_baselines.json"))
    parser.add_argument("--corpus", type=Path, default=None)
    args = parser.parse_args()

    corpus = ensure_corpus(args.corpus)
    uids, blobs = load_images(corpus)
    ok = [i for i, blob in enumerate(blobs) if decodable(blob)]
    uids, blobs = [uids[i] for i in ok], [blobs[i] for i in ok]
    n = len(uids)
    position = {u: i for i, u in enumerate(uids)}
    truth_df = pl.read_parquet(corpus / "ground_truth.parquet", columns=["uid", "dup_group"])
    truth_df = truth_df.filter(pl.col("uid").is_in(uids) & pl.col("dup_group").is_not_null())
    truth: set[tuple[int, int]] = set()
    for members in truth_df.group_by("dup_group").agg("uid")["uid"].to_list():
        idx = sorted(position[u] for u in members)
        truth |= {(idx[i], idx[j]) for i in range(len(idx)) for j in range(i + 1, len(idx))}
    print(f"{n} decodable images, {len(truth)} planted duplicate pairs ({corpus})")

    results: dict = {"corpus": str(corpus), "images": n, "planted_pairs": len(truth)}
    sweep = [0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.92, 0.94, 0.95, 0.96, 0.97, 0.98, 0.99]
    results["ours"], results["ours_stage1"], results["ours_swept"] = run_ours(blobs, truth, n, sweep)
    results["imagehash_phash"] = run_imagehash(blobs, truth, n, range(0, 25))
    results["imagededup_phash"] = run_imagededup(uids, blobs, truth, n, range(0, 21))
    print(f"{'method':<18} {'threshold':>10} {'precision':>9} {'recall':>7} {'F1':>7} {'edge F1':>8} {'seconds':>8}")
    names = ("ours", "ours_stage1", "ours_swept", "imagehash_phash", "imagededup_phash")
    for name in names:
        r = results[name]
        thr = r.get("threshold", r.get("best_threshold"))
        g = r["groups"]
        print(f"{name:<18} {thr!s:>10} {g['precision']:>9.4f} {g['recall']:>7.4f} {g['f1']:>7.4f} "
              f"{r['edges']['f1']:>8.4f} {r['seconds']:>8.1f}")
    best = max(names, key=lambda k: results[k]["groups"]["f1"])
    results["best_f1"] = best
    print(f"best F1: {best}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
