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
    ``weight`` to the training loader."""
    from curation_assets.core import reweighting

    if not storage.exists("filtered_samples"):
        from curation_assets.safety_labels import awaiting_result, label_readiness, safety_config

        return awaiting_result(label_readiness(storage, safety_config(settings)), WEIGHTS)
    cfg = load_settings(settings).reweighting
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
    q = np.quantile(w, [0.0, 0.01, 0.25, 0.5, 0.75, 0.99, 1.0]) if len(w) else np.full(7, np.nan)
    context.log.info(f"{len(w)} kept samples weighted; effective sample size {result.effective_sample_size:.0f}; "
                     f"probe L2 penalty {result.regularization:g} ({'given' if cfg.regularization else cfg.selection})")
    metadata = {
        "unfiltered": dg.MetadataValue.int(len(ids)), "kept": dg.MetadataValue.int(int(is_kept.sum())),
        "train_unfiltered": dg.MetadataValue.int(result.n_unfiltered),
        "train_kept": dg.MetadataValue.int(result.n_kept),
        "probe_regularization": dg.MetadataValue.float(result.regularization),
        "regularization_selection": dg.MetadataValue.text("given" if cfg.regularization else cfg.selection),
        "selection_scores": dg.MetadataValue.json({
            f"{lam:g}": {"cv_log_loss": result.cv_log_loss.get(lam), "region_imbalance": result.balance.get(lam)}
            for lam in sorted(set(result.cv_log_loss) | set(result.balance))}),
        "platt_slope": dg.MetadataValue.float(result.calibration[0]),
        "probe_train_accuracy": dg.MetadataValue.float(result.train_accuracy),
        "effective_sample_size": dg.MetadataValue.float(result.effective_sample_size),
        "effective_sample_fraction": dg.MetadataValue.float(result.effective_sample_size / max(1, len(w))),
        "clipped_fraction": dg.MetadataValue.float(result.clipped_fraction),
        **{f"weight_{name}": dg.MetadataValue.float(float(v))
           for name, v in zip(["min", "p01", "p25", "median", "p75", "p99", "max"], q)},
    }
    if len(w):
        plt = pyplot()

        fig, ax = plt.subplots(figsize=(6, 3))
        ax.hist(w, bins=50)
        ax.set_xlabel("weight (mean 1)")
        ax.set_ylabel("kept samples")
        ax.set_title(f"sample weights: ESS {result.effective_sample_size:.0f} of {len(w)}")
        metadata["weight distribution"] = dg.MetadataValue.md(markdown_image(figure_png(fig)))
    return dg.MaterializeResult(metadata={**metadata, **storage.table_metadata("sample_weights", "bias")})


defs = dg.Definitions(assets=[sample_weights])
