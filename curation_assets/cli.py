"""``curate``: the command line. Every command that computes goes through Dagster, like the UI."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click


@click.group()
def main() -> None:
    """Curate image-text datasets: ingest, embed, filter, measure bias, deduplicate, audit."""


@main.command("demo-data")
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Directory to write shards into.")
@click.option("--shards", default=4, show_default=True, help="Number of tar shards.")
@click.option("--per-shard", default=1000, show_default=True, help="Images per shard.")
@click.option("--seed", default=0, show_default=True)
@click.option("--size", default=256, show_default=True, help="Image side in pixels.")
@click.option("--drift-shard", is_flag=True, help="Also write one extra shard whose demographic mix has drifted.")
def demo_data(out: Path, shards: int, per_shard: int, seed: int, size: int, drift_shard: bool) -> None:
    """Write the synthetic demo corpus (img2dataset layout) and its ground truth."""
    from curation_assets.core.demo_corpus import write_demo_corpus

    started = time.perf_counter()
    summary = write_demo_corpus(out, shards=shards, per_shard=per_shard, seed=seed, size=size, drift_shard=drift_shard)
    click.echo(f"wrote demo corpus to {out} in {time.perf_counter() - started:.1f}s")
    for key, value in summary.items():
        if not isinstance(value, (dict, list)):
            click.echo(f"  {key}: {value}")


@main.command("run")
@click.option("--shards-dir", type=click.Path(exists=True, file_okay=False), required=True, help="Directory of *.tar shards.")
@click.option("--root", type=click.Path(file_okay=False), required=True, help="Data root for tables, artefacts and reports.")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False), default=None, help="YAML settings per stage.")
@click.option("--asset", "assets", multiple=True, help="Only these assets (repeatable); default: the whole graph.")
def run(shards_dir: str, root: str, config_path: str | None, assets: tuple[str, ...]) -> None:
    """Register every shard found and materialise the graph for them through Dagster."""
    from curation_assets.pipeline import open_pipeline
    from curation_assets.runner import PartialRunError

    pipeline = open_pipeline(root, shards_dir, config_path)
    fresh = pipeline.register_all_shards()
    click.echo(f"{len(pipeline.shards())} shards ({len(fresh)} new) in {shards_dir}; Dagster home {pipeline.dagster_home}")
    try:
        pipeline.materialize(list(assets) or None, progress=True, keep_going=True)
    except PartialRunError as exc:
        click.echo(str(exc), err=True)
        click.echo(f"partial run; tables under {Path(root).resolve() / 'delta'}", err=True)
        sys.exit(1)
    click.echo(f"done; tables under {Path(root).resolve() / 'delta'}")


@main.command("report")
@click.option("--root", type=click.Path(exists=True, file_okay=False), required=True)
def report(root: str) -> None:
    """Print the path of the curation report (materialise curation_report first)."""
    from curation_assets.audits import report_path
    from resources.storage import DeltaStorage

    path = report_path(DeltaStorage(root=root))
    if not Path(path).is_file():
        click.echo(f"no report yet at {path}: run `curate run` (or materialise curation_report)", err=True)
        sys.exit(1)
    click.echo(str(path))


def _register_optional_groups() -> None:
    try:
        from curation_assets.safety_cli import labels
    except ImportError:  # the safety stage's commands are optional until it lands
        return
    main.add_command(labels)


_register_optional_groups()

if __name__ == "__main__":
    main()
