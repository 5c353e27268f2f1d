"""``make demo`` (``python -m curation_assets.demo``): the whole pipeline on the embedded synthetic corpus, then a summary measured against its
ground truth (which only this summary, the tests and the benchmarks read; the pipeline never does)."""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import polars as pl
import yaml

from curation_assets.demo import audits, bias, dedup, safety
from curation_assets.pipeline import open_pipeline

STAGE_MODULES = {"safety": safety, "dedup": dedup, "bias": bias, "audits": audits}
"""The demo's module per stage: ``config(corpus)`` gives the stage's settings for the corpus (written into
the demo's config file), ``summary(storage, corpus)`` its lines measured against the ground truth."""


def ensure_corpus(corpus: Path, shards: int, per_shard: int, seed: int, size: int) -> None:
    """Generate the corpus unless one with the same parameters is already there (it is deterministic)."""
    import hashlib
    import inspect

    from curation_assets.core import copies
    from curation_assets.demo import corpus as demo_corpus
    from curation_assets.demo.corpus import write_demo_corpus

    params = {"shards": shards, "per_shard": per_shard, "seed": seed, "size": size}
    source = inspect.getsource(demo_corpus) + inspect.getsource(copies)
    generator = hashlib.sha256(source.encode()).hexdigest()[:16]
    stamp = corpus / "demo_params.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == {**params, "generator": generator} \
            and (corpus / "ground_truth.parquet").is_file():
        print(f"demo corpus already at {corpus}")
        return
    if corpus.exists():
        shutil.rmtree(corpus)
    started = time.perf_counter()
    write_demo_corpus(corpus, **params)
    stamp.write_text(json.dumps({**params, "generator": generator}))
    print(f"generated demo corpus ({shards} x {per_shard} images) at {corpus} in {time.perf_counter() - started:.1f}s")


def demo_config(corpus: Path, root: Path) -> Path:
    """The per-stage overrides each stage asks for in the demo, as one YAML config file."""
    config = {}
    for stage, module in STAGE_MODULES.items():
        hook = getattr(module, "config", None)
        if hook and hook(corpus):
            config[stage] = hook(corpus)
    path = root / "demo_config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def table_counts(storage) -> list[str]:
    lines = []
    for table in storage.tables():
        rows = storage.scan(table).select(pl.len()).collect().item()
        lines.append(f"  {table:<24} {rows:>8} rows")
    return lines


def run_demo(root: Path, shards: int, per_shard: int, seed: int, size: int, rounds: int) -> None:
    started = time.perf_counter()
    root = root.resolve()
    corpus = root / "shards"
    ensure_corpus(corpus, shards, per_shard, seed, size)
    for derived in ("delta", "artifacts", "reports"):
        shutil.rmtree(root / derived, ignore_errors=True)  # a demo starts from no labels; run history stays
    pipeline = open_pipeline(root, corpus, str(demo_config(corpus, root)))
    pipeline.register_all_shards()
    print(f"{len(pipeline.shards())} shards registered; Dagster home {pipeline.dagster_home}")

    pipeline.materialize(["samples", "image_embeddings"], progress=True)
    lines: list[str] = []
    done = {"samples", "image_embeddings"}
    done |= {"safety_classifiers", "labeling_queue", "safety_thresholds"}
    print(f"active learning: {rounds} rounds with the simulated annotator")
    lines += safety.active_learning(lambda names: pipeline.materialize(names, progress=True), pipeline.storage,
                                    pipeline.settings, corpus, rounds=rounds)
    graph = pipeline.defs.resolve_asset_graph()
    rest = [k.to_user_string() for k in graph.materializable_asset_keys if k.to_user_string() not in done]
    pipeline.materialize(rest, progress=True)

    print("\n=== curation demo summary ===")
    print(f"data root: {root}\nDelta tables: {root / 'delta'}")
    print("\n".join(table_counts(pipeline.storage)))
    for line in lines:
        print(line)
    for stage, module in STAGE_MODULES.items():
        print(f"\n--- {stage} ---")
        for line in module.summary(pipeline.storage, corpus):
            print(line)
    print(f"\nreports: {pipeline.storage.root_path / 'reports'}")
    print(f"UI: make ui  (DAGSTER_HOME={pipeline.dagster_home})")
    print(f"demo finished in {time.perf_counter() - started:.0f}s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", type=Path, default=Path("data/demo"))
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--per-shard", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    run_demo(args.root, args.shards, args.per_shard, args.seed, args.size, args.rounds)
