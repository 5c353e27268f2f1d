"""``sample_weights``: training weights that undo the safety filter's demographic bias (OpenAI's reweighting
for DALL·E 2); the probe and the weights are computed in ``core/reweighting.py``."""

import dagster as dg
import numpy as np
import polars as pl

from curation_assets.bias import WEIGHTS, load_settings
from curation_assets.core.plots import figure_png, markdown_image, pyplot
from resources.settings import CurationSettings
from resources.storage import DeltaStorage


@dg.asset(
    deps=[dg.AssetDep("filtered_samples", partition_mapping=dg.AllPartitionMapping()),
          dg.AssetDep("image_embeddings", partition_mapping=dg.AllPartitionMapping())],
    group_name="bias",
    kinds={"scikitlearn", "delta"},
)
def sample_weights(context: dg.AssetExecutionContext, storage: DeltaStorage,
                   settings: CurationSettings) -> dg.MaterializeResult:
    """Training weights that undo the filter's bias (OpenAI's method for DALL·E 2). A deliberately weak
    linear probe, trained on equal-sized samples of the unfiltered and the filtered set, predicts
    P(unfiltered | image); each kept sample gets w = p / (1 - p), clipped and normalised to mean 1, so
    regions of the data the filter thinned out count for more. The table has uid, shard, weight: feed
    ``weight`` to the training loader. When the embeddings exceed a quarter of the memory budget
    (``CURATION_MEMORY_GB``), the probe is fitted on a bounded sample and the rows are weighted shard by
    shard (:func:`_streamed`)."""
    if not storage.exists("filtered_samples"):
        from curation_assets.safety_labels import awaiting_result, label_readiness, safety_config

        return awaiting_result(label_readiness(storage, safety_config(settings)), WEIGHTS)
    cfg = load_settings(settings).reweighting
    n, dim = storage.embedding_shape()
    budget = settings.memory_budget()
    if n * dim * 4 * IN_MEMORY_COPIES <= budget:
        metadata, w = _in_memory(context, storage, cfg)
    else:
        metadata, w = _streamed(context, storage, cfg, budget, dim)
    if len(w):
        plt = pyplot()

        fig, ax = plt.subplots(figsize=(6, 3))
        ax.hist(w, bins=50)
        ax.set_xlabel("weight (mean 1)")
        ax.set_ylabel("kept samples")
        ax.set_title(f"sample weights: ESS {metadata['effective_sample_size'].value:.0f} of "
                     f"{metadata['kept'].value}" + (" (a sample shown)" if "weights_sampled" in metadata else ""))
        metadata["weight distribution"] = dg.MetadataValue.md(markdown_image(figure_png(fig)))
    return dg.MaterializeResult(metadata={**metadata, **storage.table_metadata("sample_weights", "bias")})


IN_MEMORY_COPIES = 4
"""Copies of the embedding matrix the in-memory fit holds at once: below ``memory budget / 4`` bytes of
embeddings the probe sees every row at once; above it the fit streams shard by shard."""

WEIGHTS_SCHEMA = {"uid": pl.String, "shard": pl.String, "weight": pl.Float64, "p_unfiltered": pl.Float64}


def _probe_metadata(result_n_unfiltered: int, result_n_kept: int, lam: float, cfg, cv: dict, balance: dict,
                    calibration: tuple, accuracy: float, w: np.ndarray, n_unfiltered: int, n_kept: int,
                    ess: float, clipped: float) -> dict:
    q = np.quantile(w, [0.0, 0.01, 0.25, 0.5, 0.75, 0.99, 1.0]) if len(w) else np.full(7, np.nan)
    return {
        "unfiltered": dg.MetadataValue.int(n_unfiltered), "kept": dg.MetadataValue.int(n_kept),
        "train_unfiltered": dg.MetadataValue.int(result_n_unfiltered),
        "train_kept": dg.MetadataValue.int(result_n_kept),
        "probe_regularization": dg.MetadataValue.float(lam),
        "regularization_selection": dg.MetadataValue.text("given" if cfg.regularization else cfg.selection),
        "selection_scores": dg.MetadataValue.json({
            f"{c:g}": {"cv_log_loss": cv.get(c), "region_imbalance": balance.get(c)}
            for c in sorted(set(cv) | set(balance))}),
        "platt_slope": dg.MetadataValue.float(calibration[0]),
        "probe_train_accuracy": dg.MetadataValue.float(accuracy),
        "effective_sample_size": dg.MetadataValue.float(ess),
        "effective_sample_fraction": dg.MetadataValue.float(ess / max(1, n_kept)),
        "clipped_fraction": dg.MetadataValue.float(clipped),
        **{f"weight_{name}": dg.MetadataValue.float(float(v))
           for name, v in zip(["min", "p01", "p25", "median", "p75", "p99", "max"], q)},
    }


def _in_memory(context, storage: DeltaStorage, cfg) -> tuple[dict, np.ndarray]:
    """Every embedding in one matrix (the data fits a quarter of the memory budget)."""
    from curation_assets.core import reweighting

    ids, x = storage.load_embeddings()
    kept = storage.read("filtered_samples", columns=["uid", "kept"])
    flags = ids.join(kept, on="uid", how="left", maintain_order="left")
    missing = int(flags["kept"].null_count())
    if missing:
        context.log.warning(f"{missing} embedded samples have no filter decision yet; they count as unfiltered only")
    is_kept = flags["kept"].fill_null(False).to_numpy()
    result = reweighting.fit_weights(x, is_kept, regularization=cfg.regularization, max_weight=cfg.max_weight,
                                     max_train_per_class=cfg.max_train_per_class, seed=cfg.seed,
                                     regularization_grid=cfg.regularization_grid, selection=cfg.selection,
                                     balance_clusters=cfg.balance_clusters)
    table = ids.filter(pl.Series(is_kept)).select("uid", "shard").with_columns(
        pl.Series("weight", result.weights, dtype=pl.Float64),
        pl.Series("p_unfiltered", result.probabilities, dtype=pl.Float64))
    storage.write_table(WEIGHTS, table, partition_by=["shard"])
    w = result.weights
    context.log.info(f"{len(w)} kept samples weighted; effective sample size {result.effective_sample_size:.0f}; "
                     f"probe L2 penalty {result.regularization:g} ({'given' if cfg.regularization else cfg.selection})")
    meta = _probe_metadata(result.n_unfiltered, result.n_kept, result.regularization, cfg, result.cv_log_loss,
                           result.balance, result.calibration, result.train_accuracy, w, len(ids), int(is_kept.sum()),
                           result.effective_sample_size, result.clipped_fraction)
    return {**meta, "fit": dg.MetadataValue.text("in memory")}, w


def _shard_blocks(storage: DeltaStorage, shards: list[str]):
    """``(shard, ids, embeddings, kept mask)`` one shard at a time (no filter decision counts as not kept)."""
    for shard in shards:
        ids, x = storage.load_embeddings([shard])
        kept = storage.scan("filtered_samples", [shard]).select("uid", "kept").collect()
        flags = ids.join(kept, on="uid", how="left", maintain_order="left")["kept"].fill_null(False).to_numpy()
        yield shard, ids, x, flags


def _streamed(context, storage: DeltaStorage, cfg, budget: int, dim: int) -> tuple[dict, np.ndarray]:
    """The same method in three passes over the shards, memory bounded by the budget: (1) a deterministic
    sample of images (``max_train_per_class``, fewer if the budget says so; the kept ones form the other
    class) trains the candidate probes and the coarse regions; (2) every row is scored to choose the penalty by region balance; (3) every kept
    row gets its weight, written in one commit."""
    from curation_assets.core import reweighting
    from curation_assets.core.dedup import fit_points_within
    from curation_assets.core.stats import uniform_keys

    shards = sorted(storage.shards("image_embeddings"))
    n = int(storage.scan("image_embeddings").select(pl.len()).collect().item())
    n_kept = int(storage.scan("filtered_samples").filter(pl.col("kept")).select(pl.len()).collect().item())
    cap = max(2, min(int(cfg.max_train_per_class), fit_points_within(budget, dim) // 2))
    fraction = min(1.0, cap / max(n, 1))
    parts_x, parts_y, parts_uid = [], [], []
    for _, ids, x, kept in _shard_blocks(storage, shards):
        # one sample of images, as in the in-memory fit: each sampled image is in the unfiltered class, and a
        # kept one in the kept class too, so the classes differ only by the removed images
        uids = ids["uid"].to_list()
        pos = uniform_keys(uids, cfg.seed, "sample") < fraction
        neg = pos & kept
        for mask, label in ((pos, 1.0), (neg, 0.0)):
            parts_x.append(x[mask])
            parts_y.append(np.full(int(mask.sum()), label))
            parts_uid += [u for u, m in zip(uids, mask) if m]
    xt, y = np.concatenate(parts_x), np.concatenate(parts_y)
    del parts_x
    if int((y == 0).sum()) < 2:
        raise dg.Failure(f"need at least 2 kept samples to fit the probe, got {int((y == 0).sum())}")
    probe = reweighting.fit_streamed_probe(xt, y, parts_uid, xt[y == 0], cfg.regularization, cfg.regularization_grid,
                                           cfg.selection, cfg.balance_clusters, cfg.seed)
    context.log.info(f"probe fitted on {int(y.sum())} unfiltered + {int((y == 0).sum())} kept samples of {n}")
    del xt
    lam, mean, balance, cv = reweighting.streamed_weights(
        lambda: ((x, kept) for _, _, x, kept in _shard_blocks(storage, shards)), probe, cfg.max_weight, cfg.selection)
    stats = {"sum": 0.0, "sq": 0.0, "n": 0, "clipped": 0}
    sample: list[np.ndarray] = []

    def frames():
        for shard, ids, x, kept in _shard_blocks(storage, shards):
            p = probe.probabilities(lam, x[kept])
            raw = reweighting.clipped_odds(p, None)
            w = np.minimum(raw, cfg.max_weight) / mean
            stats["sum"] += float(w.sum())
            stats["sq"] += float((w * w).sum())
            stats["n"] += len(w)
            stats["clipped"] += int((raw > cfg.max_weight).sum())
            uids = ids["uid"].filter(pl.Series(kept))
            sample.append(w[uniform_keys(uids.to_list(), cfg.seed, "shown") < 100_000 / max(n_kept, 1)])
            yield pl.DataFrame({"uid": uids, "shard": pl.Series([shard] * len(w), dtype=pl.String),
                                "weight": w, "p_unfiltered": p})

    storage.write_table_streamed(WEIGHTS, frames(), WEIGHTS_SCHEMA, partition_by=["shard"])
    ess = stats["sum"] ** 2 / stats["sq"] if stats["sq"] else 0.0
    scale = probe.candidates[lam][1]
    w_sample = np.concatenate(sample) if sample else np.zeros(0)
    context.log.info(f"{stats['n']} kept samples weighted in three passes; effective sample size {ess:.0f}; "
                     f"probe L2 penalty {lam:g}")
    meta = _probe_metadata(probe.n_unfiltered, probe.n_kept, lam, cfg, cv, balance,
                           (float(scale.coef_[0, 0]), float(scale.intercept_[0])), probe.candidates[lam][3],
                           w_sample, n, stats["n"], ess, stats["clipped"] / max(stats["n"], 1))
    return {**meta, "fit": dg.MetadataValue.text("streamed shard by shard (memory budget)"),
            "weights_sampled": dg.MetadataValue.int(len(w_sample))}, w_sample


defs = dg.Definitions(assets=[sample_weights])
