"""``curate labels``: bring human safety labels in (validated) and send the active-learning queue out as CSV."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click


def _storage_and_config(root: str, config_path: str | None):
    from curation_assets.safety import safety_config
    from resources.settings import CurationSettings
    from resources.storage import DeltaStorage

    return DeltaStorage(root=root), safety_config(CurationSettings(config_path=config_path))


_root = click.option("--root", type=click.Path(file_okay=False), envvar="CURATION_ROOT", default="data",
                     show_default=True, help="Data root (tables under <root>/delta).")
_config = click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False),
                       envvar="CURATION_CONFIG", default=None, help="YAML settings per stage (safety categories).")


@click.group("labels")
def labels() -> None:
    """Safety labels: import judgements from CSV, export the labelling queue as CSV."""


@labels.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@_root
@_config
@click.option("--annotator", default=None, help="Annotator for rows whose 'annotator' cell is empty.")
@click.option("--source", default="import", show_default=True, help="Source for rows whose 'source' cell is empty.")
@click.option("--round", "round_no", type=int, default=None,
              help="Round for rows whose 'round' cell is empty (default: one past the latest round).")
@click.option("--skip-invalid", is_flag=True,
              help="Write the valid rows even when some are invalid (the invalid ones are still reported).")
def import_labels(file: str, root: str, config_path: str | None, annotator: str | None, source: str,
                  round_no: int | None, skip_invalid: bool) -> None:
    """Append the labels in FILE (CSV with uid, category, label[, source, round, annotator, labeled_at]).

    Every row is validated first: unknown uids, samples rejected at ingest, unknown categories and labels
    that are not yes/no are listed with their line numbers. With any invalid row nothing is written (exit
    status 1) unless --skip-invalid. Re-labelling appends: history is kept and the latest label wins.
    """
    from curation_assets.core.labels import LabelFileError, read_csv_rows
    from curation_assets.safety import import_label_rows

    storage, cfg = _storage_and_config(root, config_path)
    try:
        rows = read_csv_rows(file)
    except LabelFileError as exc:
        click.echo(str(exc), err=True)
        click.echo("nothing written", err=True)
        sys.exit(1)
    answered = [r for r in rows if (r.get("label") or "").strip() or not (r.get("procedure") or "").strip()]
    if len(answered) < len(rows):
        click.echo(f"{len(rows) - len(answered)} queue rows without a label are left for later")
    rows = answered
    try:
        report = import_label_rows(storage, cfg, rows, skip_invalid=skip_invalid, default_source=source,
                                   default_annotator=annotator or os.environ.get("USER", "unknown"),
                                   default_round=round_no)
    except FileNotFoundError as exc:
        click.echo(f"{exc}; nothing written", err=True)
        sys.exit(1)
    click.echo(report.summary())
    if not report.ok and not skip_invalid:
        click.echo("nothing written: fix the rows above or pass --skip-invalid", err=True)
        sys.exit(1)
    if report.written:
        _record_in_instance(root, report.written)


def _record_in_instance(root: str, written: int) -> None:
    """Tell the data root's Dagster instance that ``labels`` changed, so automation retrains the classifiers
    (``labels`` is written here, outside any run)."""
    import dagster as dg

    from curation_assets.pipeline import dagster_home

    instance = dg.DagsterInstance.from_config(str(dagster_home(root)))
    instance.report_runless_asset_event(dg.AssetMaterialization(
        "labels", metadata={"rows_appended": written, "source": "curate labels import"}))


@labels.command("export-queue")
@_root
@_config
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="CSV file to write.")
@click.option("--shards-dir", type=click.Path(file_okay=False), envvar="CURATION_SHARDS", default=None,
              help="Where the tar shards are (default <root>/shards); needed for --thumbnails.")
@click.option("--thumbnails/--no-thumbnails", default=False, show_default=True,
              help="Write a JPEG thumbnail per queued image beside the CSV (else the image column is tar#member).")
@click.option("--size", default=256, show_default=True, help="Thumbnail side in pixels.")
def export_queue(root: str, config_path: str | None, out: str, shards_dir: str | None, thumbnails: bool,
                 size: int) -> None:
    """Write the latest labelling batch (materialise labeling_queue first) as a CSV to fill in and import.

    Rows left without a label are skipped on import, so a partially labelled file can be imported as is."""
    import polars as pl

    from curation_assets.core.labels import write_queue_csv
    from curation_assets.safety import latest_queue
    from resources.shard_source import ShardSource

    storage, cfg = _storage_and_config(root, config_path)
    queue = latest_queue(storage)
    shards = ShardSource(uri=shards_dir or str(Path(root) / "shards"))
    members = (storage.scan("samples").filter(pl.col("uid").is_in(queue["uid"].unique().to_list()))
               .select("uid", "shard", "image_member").collect())
    image_ref: dict[str, str] = {}
    out_path = Path(out)
    thumb_dir = out_path.parent / f"{out_path.stem}_thumbs"
    for shard, part in members.group_by("shard"):
        shard = shard[0]
        try:
            tar = shards.get(shard).tar
        except FileNotFoundError:
            tar = None
        for uid, member in zip(part["uid"].to_list(), part["image_member"].to_list()):
            image_ref[uid] = f"{tar}#{member}" if tar else f"{shard}.tar#{member}"
        if thumbnails and tar is not None:
            image_ref.update(_thumbnails(tar, part, thumb_dir, size))
    n = write_queue_csv(queue, out_path, image_ref, {c.name: c.definition for c in cfg.categories})
    round_no = queue["round"][0] if queue.height else "-"
    click.echo(f"wrote {n} queue rows (round {round_no}) to {out_path}")


def _thumbnails(tar: Path, part, directory: Path, size: int) -> dict[str, str]:
    import io

    from PIL import Image

    from curation_assets.core.shards import read_images

    directory.mkdir(parents=True, exist_ok=True)
    blobs = read_images(tar, part["image_member"].to_list())
    refs = {}
    for uid, member in zip(part["uid"].to_list(), part["image_member"].to_list()):
        if member not in blobs:
            continue
        with Image.open(io.BytesIO(blobs[member])) as img:
            img = img.convert("RGB")
            img.thumbnail((size, size))
            path = directory / f"{uid.replace('/', '_')}.jpg"
            img.save(path, quality=85)
        refs[uid] = str(path)
    return refs
