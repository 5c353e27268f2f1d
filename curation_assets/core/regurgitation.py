"""Regurgitation audit: does a generative model reproduce its training images?

Every generated image is embedded with the encoder that embedded the training set (together with
colour-shifted variants of it, :func:`encode_queries`) and searched against the whole training set.
Retrieval, then verification, as in copy detection: a training image among the ``k`` nearest at or above
the *candidate* cosine is a candidate, and pixel verification (:func:`~curation_assets.core.pixel_verify.containment_score`, the generated
image found again inside the training image) confirms it; a generated image with a confirmed candidate is
*flagged* as a likely copy. The regurgitation rate is the flagged share of generated images, reported with
a Wilson interval.

The candidate cosine is the audit's own, per encoder (``configs/audits.yaml`` ``thresholds``), not the
dedup threshold: a model's copies are harsher than the near-duplicates inside a crawl (crops to 70% of
the area, JPEG 40, colour casts). :func:`calibrate_candidate_threshold` sets it on synthetic copies of
synthetic scenes (:func:`copy_pairs`), never on audited data.

Search is exact (faiss ``IndexFlatIP``) up to ``flat_max`` training vectors. Beyond that an approximate
index (HNSW or IVF) keeps the audit tractable at 10^8-10^9 vectors, and its quality is never assumed: a
sample of the queries is also searched exactly and two recalls are reported, the usual recall@k of the
neighbour lists and, the one that matters for the audit, the share of exact above-threshold matches the
approximate index also flags.
"""

from __future__ import annotations

import math
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import polars as pl

from curation_assets.core.pixel_verify import ContainmentSettings, containment_score

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
INDEX_KINDS = ("auto", "flat", "hnsw", "ivf")


def wilson_interval(successes, n, confidence: float = 0.95):
    """Wilson score interval ``(low, high)`` (from :mod:`curation_assets.core.stats`), element-wise over
    arrays; ``nan`` where ``n == 0``."""
    from curation_assets.core import stats

    k = np.asarray(successes, dtype=np.float64)
    n_ = np.broadcast_to(np.asarray(n, dtype=np.float64), k.shape)
    pairs = [stats.wilson_interval(float(a), float(b), confidence) for a, b in zip(k.reshape(-1), n_.reshape(-1))]
    low = np.array([p.low for p in pairs]).reshape(k.shape)
    high = np.array([p.high for p in pairs]).reshape(k.shape)
    low = np.where(np.abs(low) < 1e-12, 0.0, low)  # rounding residue of the closed form at k = 0
    high = np.where(np.abs(high - 1.0) < 1e-12, 1.0, high)
    if k.ndim == 0:
        return float(low), float(high)
    return low, high


# --------------------------------------------------------------------------- generated images


@dataclass(frozen=True)
class GeneratedImage:
    """One generated image: ``id`` is its path relative to the generated root without suffix (``name`` for
    a loose file, ``<tar stem>/<member stem>`` inside a tar shard)."""

    id: str
    data: bytes


def list_generated(path: str | Path) -> list[GeneratedImage]:
    """Every image under ``path``: a directory of image files (searched recursively), ``*.tar`` shards in
    that directory, or a single tar file. Sorted by id so runs are reproducible."""
    root = Path(path).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"generated images: {root} does not exist")
    out: list[GeneratedImage] = []
    tars = [root] if root.is_file() else sorted(root.rglob("*.tar"))
    if root.is_file() and root.suffix != ".tar":
        raise ValueError(f"generated images: {root} is neither a directory nor a .tar shard")
    if root.is_dir():
        for file in sorted(root.rglob("*")):
            if file.is_file() and file.suffix.lower() in IMAGE_SUFFIXES:
                rel = file.relative_to(root).with_suffix("")
                out.append(GeneratedImage(rel.as_posix(), file.read_bytes()))
    for tar in tars:
        prefix = tar.relative_to(root).with_suffix("").as_posix() if root.is_dir() else tar.stem
        with tarfile.open(tar) as handle:
            for info in handle:
                if info.isfile() and Path(info.name).suffix.lower() in IMAGE_SUFFIXES:
                    stem = Path(info.name).with_suffix("").as_posix()
                    out.append(GeneratedImage(f"{prefix}/{stem}", handle.extractfile(info).read()))
    ids = [g.id for g in out]
    if len(set(ids)) != len(ids):
        dupes = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise ValueError(f"generated images: ids are not unique (same name, different suffix?): {dupes}")
    return sorted(out, key=lambda g: g.id)


# --------------------------------------------------------------------------- index choice and search


@dataclass
class IndexConfig:
    """Which faiss index to search with. ``kind="auto"``: exact flat search up to ``flat_max`` training
    vectors, ``approximate`` (hnsw or ivf) beyond. HNSW: ``hnsw_m`` links, ``hnsw_ef_search``. IVF:
    ``ivf_nlist`` lists (0 = 4 * sqrt(n)), ``ivf_nprobe``. ``recall_sample`` queries are also searched
    exactly to measure the approximate index's recall."""

    kind: str = "auto"
    flat_max: int = 1_000_000
    approximate: str = "ivf"
    hnsw_m: int = 32
    hnsw_ef_construction: int = 80
    hnsw_ef_search: int = 128
    ivf_nlist: int = 0
    ivf_nprobe: int = 16
    recall_sample: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in INDEX_KINDS:
            raise ValueError(f"index kind {self.kind!r}: use one of {INDEX_KINDS}")
        if self.approximate not in ("hnsw", "ivf"):
            raise ValueError(f"approximate index {self.approximate!r}: use 'hnsw' or 'ivf'")
        if self.flat_max < 0 or self.recall_sample < 0:
            raise ValueError("flat_max and recall_sample must be >= 0")

    def choose(self, n_train: int) -> str:
        """The index kind used for a training set of ``n_train`` vectors."""
        if self.kind != "auto":
            return self.kind
        return "flat" if n_train <= self.flat_max else self.approximate


def build_index(xb: np.ndarray, kind: str, config: IndexConfig):
    """A faiss inner-product index of ``kind`` over ``xb`` (L2-normalised rows, so scores are cosines)."""
    import faiss

    xb = np.ascontiguousarray(xb, dtype=np.float32)
    d = xb.shape[1]
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = config.hnsw_ef_construction
        index.hnsw.efSearch = config.hnsw_ef_search
    elif kind == "ivf":
        nlist = config.ivf_nlist or max(1, int(4 * math.sqrt(len(xb))))
        nlist = min(nlist, max(1, len(xb) // 39))  # faiss wants >= 39 training points per list
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(config.seed)
        train = xb if len(xb) <= 256 * nlist else xb[rng.choice(len(xb), 256 * nlist, replace=False)]
        index.train(train)
        index.nprobe = min(config.ivf_nprobe, nlist)
    else:
        raise ValueError(f"unknown index kind {kind!r}")
    index.add(xb)
    return index


@dataclass
class SearchResult:
    """Top-``k`` neighbours per query: similarities and row indices into the training matrix (-1 = none),
    the index used and, for approximate indices, its measured recall against exact search."""

    similarities: np.ndarray
    indices: np.ndarray
    index_kind: str
    n_train: int
    recall_at_k: float | None = None
    flag_recall: float | None = None
    recall_queries: int = 0
    params: dict = field(default_factory=dict)


def search(xb: np.ndarray, xq: np.ndarray, k: int, config: IndexConfig | None = None,
           threshold: float | None = None) -> SearchResult:
    """Search ``xq`` against ``xb`` with the index ``config`` chooses. For an approximate index, up to
    ``recall_sample`` queries are searched exactly too: ``recall_at_k`` is the share of exact top-k ids the
    index returned, ``flag_recall`` the share of exact matches at or above ``threshold`` it returned."""
    config = config or IndexConfig()
    xb = np.ascontiguousarray(xb, dtype=np.float32)
    xq = np.ascontiguousarray(xq, dtype=np.float32)
    n = len(xb)
    kind = config.choose(n)
    if n == 0 or len(xq) == 0:
        return SearchResult(np.full((len(xq), k), -np.inf, np.float32), np.full((len(xq), k), -1, np.int64),
                            kind, n, params={"k": k})
    kk = min(k, n)
    index = build_index(xb, kind, config)
    sims, idx = index.search(xq, kk)
    if kk < k:
        sims = np.pad(sims, ((0, 0), (0, k - kk)), constant_values=-np.inf)
        idx = np.pad(idx, ((0, 0), (0, k - kk)), constant_values=-1)
    params: dict = {"k": k}
    if kind == "hnsw":
        params.update(m=config.hnsw_m, ef_search=config.hnsw_ef_search, ef_construction=config.hnsw_ef_construction)
    elif kind == "ivf":
        params.update(nlist=int(index.nlist), nprobe=int(index.nprobe))
    result = SearchResult(sims.astype(np.float32), idx.astype(np.int64), kind, n, params=params)
    if kind != "flat" and config.recall_sample:
        result.recall_at_k, result.flag_recall, result.recall_queries = measure_recall(
            xb, xq, result.indices[:, :kk], result.similarities[:, :kk], kk, config, threshold)
    return result


def search_streamed(blocks: Iterable[tuple[Sequence[str], np.ndarray]], xq: np.ndarray, k: int
                    ) -> tuple[SearchResult, list[str]]:
    """Exact top-``k`` search of ``xq`` against training vectors streamed block by block (``(uids,
    vectors)``, e.g. one shard at a time), merging each block's top-k into the running top-k: memory holds
    the queries, one block and ``k`` neighbours per query, whatever the training set's size. Returns the
    same neighbours as a flat index over the blocks concatenated (ties in block order) and the uids its
    indices point into (only those of the neighbours)."""
    import faiss

    xq = np.ascontiguousarray(xq, dtype=np.float32)
    best_s = np.full((len(xq), k), -np.inf, np.float32)
    best_u = np.full((len(xq), k), None, dtype=object)
    n = 0
    for uids, xb in blocks:
        if len(xb) == 0 or len(xq) == 0:
            continue
        xb = np.ascontiguousarray(xb, dtype=np.float32)
        n += len(xb)
        kk = min(k, len(xb))
        sims, idx = faiss.knn(xq, xb, kk, metric=faiss.METRIC_INNER_PRODUCT)
        cand_s = np.concatenate([best_s, sims], axis=1)
        cand_u = np.concatenate([best_u, np.asarray(list(uids), dtype=object)[idx]], axis=1)
        order = np.argsort(-cand_s, axis=1, kind="stable")[:, :k]
        best_s = np.take_along_axis(cand_s, order, axis=1)
        best_u = np.take_along_axis(cand_u, order, axis=1)
    found = best_u.reshape(-1)
    names = sorted({u for u in found.tolist() if u is not None})
    position = {u: i for i, u in enumerate(names)}
    idx = np.array([position[u] if u is not None else -1 for u in found.tolist()], np.int64).reshape(best_u.shape)
    best_s = np.where(idx >= 0, best_s, -np.inf).astype(np.float32)
    return SearchResult(best_s, idx, "flat-streamed", n, params={"k": k}), names


def colour_shift_grid(shifts: Sequence[int]) -> list[tuple[int, int, int]]:
    """Every per-channel offset ``(r, g, b)`` with each component in ``shifts``; (0, 0, 0) always first."""
    import itertools

    values = sorted({int(v) for v in shifts} | {0}, key=lambda v: (v != 0, v))
    return list(itertools.product(values, repeat=3))


def encode_queries(encoder, blobs: Sequence[bytes], shifts: Sequence[int] = (0,)) -> tuple[np.ndarray, int]:
    """Embed generated images together with colour-shifted variants of each (query-side augmentation).

    A weight-free encoder reads colour layout, so a copy with a uniform colour cast (a generator's
    palette drift) can land far from its source. Searching each generated image also with every offset
    in :func:`colour_shift_grid` (``len(shifts) ** 3`` variants, the original first) and keeping the
    best similarity per training image undoes a cast to within half a grid step. Only the (few)
    generated images are re-encoded; the training embeddings are used as stored. Returns the
    ``(n * v, d)`` matrix, variants of one image contiguous, and ``v``."""
    import io

    from PIL import Image

    from curation_assets.core.images import upright

    grid = colour_shift_grid(shifts)
    plain = encoder.encode_bytes(list(blobs))  # the originals exactly as the training set was encoded
    if len(grid) == 1 or len(blobs) == 0:
        return plain, 1
    out = np.empty((len(blobs) * len(grid), plain.shape[1]), np.float32)
    for i, data in enumerate(blobs):
        image = upright(Image.open(io.BytesIO(data)))
        if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
            rgba = image.convert("RGBA")
            image = Image.new("RGB", rgba.size, (255, 255, 255))
            image.paste(rgba, mask=rgba.getchannel("A"))
        base = np.asarray(image.convert("RGB"), dtype=np.int16)
        variants = [Image.fromarray(np.clip(base + np.array(off, np.int16), 0, 255).astype(np.uint8)) for off in grid[1:]]
        out[i * len(grid)] = plain[i]
        out[i * len(grid) + 1:(i + 1) * len(grid)] = encoder.encode_images(variants)
    return out, len(grid)


def merge_variants(result: SearchResult, variants: int) -> SearchResult:
    """Collapse the neighbour lists of ``variants`` consecutive query rows (one generated image) into one:
    the best similarity per training row, top ``k`` again."""
    if variants == 1:
        return result
    n = result.indices.shape[0] // variants
    k = result.indices.shape[1]
    sims = np.full((n, k), -np.inf, np.float32)
    idx = np.full((n, k), -1, np.int64)
    for q in range(n):
        s = result.similarities[q * variants:(q + 1) * variants].reshape(-1)
        i = result.indices[q * variants:(q + 1) * variants].reshape(-1)
        order = np.argsort(-s, kind="stable")
        _, first = np.unique(i[order], return_index=True)
        keep = order[np.sort(first)]
        keep = keep[i[keep] >= 0][:k]
        sims[q, :len(keep)], idx[q, :len(keep)] = s[keep], i[keep]
    out = SearchResult(sims, idx, result.index_kind, result.n_train, result.recall_at_k, result.flag_recall,
                       result.recall_queries, dict(result.params, query_variants=variants))
    return out


def measure_recall(xb: np.ndarray, xq: np.ndarray, approx_idx: np.ndarray, approx_sims: np.ndarray, k: int,
                   config: IndexConfig, threshold: float | None) -> tuple[float, float | None, int]:
    """(recall@k, flag recall or None when no exact match reaches the threshold, queries measured), against
    exact flat search on a random sample of the queries."""
    import faiss

    rng = np.random.default_rng(config.seed)
    m = min(config.recall_sample, len(xq))
    rows = np.sort(rng.choice(len(xq), m, replace=False))
    exact = faiss.IndexFlatIP(xb.shape[1])
    exact.add(xb)
    true_sims, true_idx = exact.search(np.ascontiguousarray(xq[rows]), k)
    hits = 0
    flag_true = flag_hit = 0
    for r, row in enumerate(rows):
        found = set(approx_idx[row].tolist())
        hits += len(found & set(true_idx[r].tolist()))
        if threshold is not None:
            above = true_idx[r][true_sims[r] >= threshold]
            flag_true += len(above)
            flag_hit += len(found & set(above.tolist()))
    recall = hits / (m * k) if m else float("nan")
    return recall, (flag_hit / flag_true if flag_true else None), m


# --------------------------------------------------------------------------- verification


def verify_candidates(table: pl.DataFrame, generated: dict[str, bytes], training: dict[str, bytes],
                      config: ContainmentSettings, workers: int = 2) -> pl.DataFrame:
    """Add ``verification`` (score, null where not checked) and recompute ``flagged`` for the rows whose
    similarity reached the threshold (``candidate``): flagged = candidate and verified."""
    from concurrent.futures import ThreadPoolExecutor

    todo = table.with_row_index("_row").filter(pl.col("candidate"))
    pairs = list(zip(todo["_row"].to_list(), todo["generated_id"].to_list(), todo["train_uid"].to_list()))

    def score(pair):
        _, gid, uid = pair
        if gid not in generated or uid not in training:
            return -1.0
        return containment_score(generated[gid], training[uid], config)

    with ThreadPoolExecutor(max(1, workers)) as pool:  # OpenCV releases the GIL
        scores = list(pool.map(score, pairs))
    values = np.full(table.height, np.nan, dtype=np.float64)
    for (row, _, _), value in zip(pairs, scores):
        values[row] = value
    out = table.with_columns(verification=pl.Series(values, dtype=pl.Float32).fill_nan(None))
    return out.with_columns(flagged=pl.col("candidate") & (pl.col("verification") >= config.threshold).fill_null(False))


# --------------------------------------------------------------------------- candidate threshold


CALIBRATION_SEED = 1009
"""Seed of the synthetic calibration scenes: neither the encoder's whitening set nor any demo corpus."""


def copy_pairs(n: int = 400, seed: int = CALIBRATION_SEED, size: int = 256) -> tuple[list[bytes], list[bytes], list[str]]:
    """Calibration pairs for the audit, built from synthetic scenes that are not audited data
    (:func:`curation_assets.core.perceptual.reference_images` with their own seed). Each scene yields
    two copies: one made with the perceptual encoder's near-duplicate transforms (crop >= 80%, resize,
    brightness, contrast, stamp, JPEG 30-95) and one with the harsher copy perturbation
    (:func:`curation_assets.core.copies.copy_transforms`: JPEG 40-80 plus two of crop
    to 70-90% of the area, resize 0.5-0.9, colour shift). Returns (originals, copies, kinds) with
    ``originals[i]`` the JPEG the ``i``-th copy was made from, kind "encoder" or "generator"."""
    import io
    import random

    from curation_assets.core.copies import perturbed_copy
    from curation_assets.core.perceptual import near_duplicate, reference_images

    rng = np.random.default_rng(seed)
    r = random.Random(seed)
    originals, copies, kinds = [], [], []
    for image in reference_images(n, seed=seed, size=size):
        buf = io.BytesIO()
        image.convert("RGB").save(buf, format="JPEG", quality=90)
        src = buf.getvalue()
        dup = near_duplicate(image, rng).convert("RGB")
        buf = io.BytesIO()
        dup.save(buf, format="JPEG", quality=95)
        originals += [src, src]
        copies += [buf.getvalue(), perturbed_copy(image, r)]
        kinds += ["encoder", "generator"]
    return originals, copies, kinds


def calibrate_candidate_threshold(encoder, n: int = 400, quantile: float = 0.01, seed: int = CALIBRATION_SEED,
                                  k: int = 20, verify: ContainmentSettings | None = None, shifts: Sequence[int] = (0,)) -> dict:
    """The audit's candidate cosine for ``encoder``: the ``quantile`` of the similarities between
    calibration copies and their originals (:func:`copy_pairs`), so that ``1 - quantile`` of such copies
    reach it. Nothing audited is used. Also reported: the copies' similarity quantiles per kind, how
    many candidates a distinct image brings (each copy searched against all ``n`` originals: the mean
    number of other originals in its top ``k`` at or above the threshold) and, when ``verify`` is given,
    the share of copies that the pixel verification confirms. ``shifts``: the audit's query-side colour
    shifts (:func:`encode_queries`); a copy's similarity is then its best variant's, as in the audit."""
    originals, copies, kinds = copy_pairs(n, seed)
    uniq = originals[::2]
    xo = encoder.encode_bytes(uniq)
    xv, v = encode_queries(encoder, copies, shifts)
    own = np.repeat(np.arange(len(uniq)), 2)
    sims = (xv @ xo.T).reshape(len(copies), v, len(uniq)).max(axis=1)
    pos = sims[np.arange(len(copies)), own]
    threshold = float(np.quantile(pos, quantile))
    sims[np.arange(len(copies)), own] = -np.inf
    top = -np.sort(-sims, axis=1)[:, : max(1, min(k, len(uniq) - 1))]
    kinds_arr = np.asarray(kinds)
    out = {
        "encoder": getattr(encoder, "name", type(encoder).__name__), "n_scenes": len(uniq), "seed": seed,
        "query_variants": v,
        "quantile": quantile, "threshold": round(threshold, 4),
        "copy_similarity": {kind: {q: round(float(np.quantile(pos[kinds_arr == kind], p)), 4)
                                   for q, p in (("min", 0.0), ("p01", 0.01), ("p05", 0.05), ("median", 0.5))}
                            for kind in ("encoder", "generator")},
        "recall_at_threshold": {kind: float((pos[kinds_arr == kind] >= threshold).mean()) for kind in ("encoder", "generator")},
        "distinct_best_similarity_p99": round(float(np.quantile(top[:, 0], 0.99)), 4),
        "distinct_candidates_per_query": float((top >= threshold).sum(axis=1).mean()),
    }
    if verify is not None:
        scores = np.array([containment_score(c, originals[i], verify) for i, c in enumerate(copies)])
        out["verified"] = {kind: float((scores[kinds_arr == kind] >= verify.threshold).mean()) for kind in ("encoder", "generator")}
    return out


# --------------------------------------------------------------------------- the audit table


def neighbour_table(generated_ids: Sequence[str], result: SearchResult, train_uids: Sequence[str],
                    threshold: float, reference: str) -> pl.DataFrame:
    """One row per generated image x neighbour rank: generated_id, reference ("full" / "deduplicated"),
    rank (1 = nearest), train_uid, similarity, candidate (similarity >= threshold) and flagged (equal to
    candidate until :func:`verify_candidates` confirms or clears each candidate)."""
    n, k = result.indices.shape
    uids = np.asarray(list(train_uids), dtype=object)
    idx = result.indices.reshape(-1)
    valid = idx >= 0
    train = np.full(idx.shape, None, dtype=object)
    train[valid] = uids[idx[valid]]
    sims = result.similarities.reshape(-1).astype(np.float64)
    df = pl.DataFrame({
        "generated_id": pl.Series(np.repeat(np.asarray(list(generated_ids), dtype=object), k).tolist(), dtype=pl.String),
        "reference": pl.Series([reference] * (n * k), dtype=pl.String),
        "rank": pl.Series(np.tile(np.arange(1, k + 1), n), dtype=pl.Int32),
        "train_uid": pl.Series(train.tolist(), dtype=pl.String),
        "similarity": pl.Series(np.where(valid, sims, np.nan), dtype=pl.Float32),
    })
    flagged = pl.col("similarity").is_not_nan() & (pl.col("similarity") >= threshold)
    return df.with_columns(candidate=flagged.fill_null(False), flagged=flagged.fill_null(False)) \
        .filter(pl.col("train_uid").is_not_null())


def rate_summary(table: pl.DataFrame, n_generated: int, reference: str, confidence: float = 0.95) -> dict:
    """Regurgitation rate for one reference set: generated images with at least one flagged neighbour."""
    rows = table.filter(pl.col("reference") == reference)
    flagged = rows.filter(pl.col("flagged"))["generated_id"].n_unique()
    candidates = rows.filter(pl.col("candidate"))["generated_id"].n_unique() if "candidate" in rows.columns else flagged
    low, high = wilson_interval(flagged, n_generated, confidence)
    return {
        "reference": reference,
        "n_generated": int(n_generated),
        "n_above_threshold": int(candidates),
        "n_flagged": int(flagged),
        "rate": flagged / n_generated if n_generated else float("nan"),
        "ci_low": low,
        "ci_high": high,
    }


def flagged_per_image(table: pl.DataFrame, reference: str) -> pl.DataFrame:
    """One row per generated image: flagged (any neighbour flagged), the best flagged training uid (or the
    nearest one when none is flagged) and its similarity."""
    rows = table.filter(pl.col("reference") == reference).sort("generated_id", pl.col("flagged").not_(), "rank")
    return rows.unique("generated_id", keep="first").select(
        "generated_id", "train_uid", "similarity", "verification", flagged=pl.col("flagged"))
