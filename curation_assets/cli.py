"""``curate``: the command line. Every command that computes goes through Dagster, like the UI; ``curate labels``
brings human safety labels in (validated) and sends the active-learning queue out as CSV."""

from __future__ import annotations

import os
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
    from curation_assets.demo.corpus import write_demo_corpus

    started = time.perf_counter()
    summary = write_demo_corpus(out, shards=shards, per_shard=per_shard, seed=seed, size=size, drift_shard=drift_shard)
    click.echo(f"wrote demo corpus to {out} in {time.perf_counter() - started:.1f}s")
    for key, value in summary.items():
        if not isinstance(value, (dict, list)):
            click.echo(f"  {key}: {value}")


@main.command("run")
@click.option("--shards-dir", callback=lambda ctx, param, value: _existing_dir(value), required=True,
              help="Directory of *.tar shards: a local path or an object-store URI (s3://bucket/prefix).")
@click.option("--root", required=True, help="Data root for tables, artefacts and reports: a local path or an "
                                             "object-store URI (s3://bucket/prefix).")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False), default=None,
              envvar="CURATION_CONFIG", help="YAML settings per stage (default: $CURATION_CONFIG).")
@click.option("--asset", "assets", multiple=True, help="Only these assets (repeatable); default: the whole graph.")
def run(shards_dir: str, root: str, config_path: str | None, assets: tuple[str, ...]) -> None:
    """Register every shard found and materialise the graph for them through Dagster."""
    from curation_assets.pipeline import open_pipeline
    from curation_assets.runner import PartialRunError

    from curation_assets.core.validation import ConfigError

    try:
        pipeline = open_pipeline(root, shards_dir, config_path)
    except ConfigError as exc:
        click.echo(str(exc), err=True)
        sys.exit(2)
    refs, skipped = pipeline.defs.resources["shard_source"].scan()
    fresh = pipeline.register_all_shards()
    present = {ref.key for ref in refs}
    missing = [key for key in pipeline.shards() if key not in present]
    click.echo(f"{len(refs)} shards ({len(fresh)} new) in {shards_dir}; Dagster home {pipeline.dagster_home}")
    for ref in refs:
        if not ref.parts and ref.key != ref.tar.stem:
            click.echo(f"  {ref.name}: partition key {ref.key!r} (the name does not fit the key rule)")
    for item in skipped:
        click.echo(f"  skipped {item.name}: {item.reason}")
    for key in missing:
        click.echo(f"  shard {key} is registered but its file is gone: left as it was "
                   f"(`curate shards remove {key} --root {root}` forgets it)")
    shards = [key for key in pipeline.shards() if key in present]
    with pipeline.exclusive() as alone:
        if alone:
            for run_id in pipeline.fail_abandoned_runs():
                click.echo(f"  run {run_id} was left STARTED by a curate run that died: marked failed")
        try:
            pipeline.materialize(list(assets) or None, shards=shards, progress=True, keep_going=True)
        except PartialRunError as exc:
            click.echo(str(exc), err=True)
            click.echo(f"partial run; tables under {pipeline.storage.root_path / 'delta'}", err=True)
            sys.exit(1)
    for line in summary_lines(pipeline, root, shards_dir, config_path):
        click.echo(line)
    unreadable = unreadable_shards(pipeline.storage, shards)
    if unreadable:
        for key, error in unreadable.items():
            click.echo(f"shard {key} failed: {error}", err=True)
        click.echo(f"{len(unreadable)} of {len(shards)} shards could not be read; the others were curated", err=True)
        sys.exit(1)


def _existing_dir(value: str) -> str:
    """A shard directory that exists (an object-store URI is checked when the shards are listed)."""
    from curation_assets.core.location import is_uri

    if not is_uri(value) and not Path(value).is_dir():
        raise click.BadParameter(f"directory {value!r} does not exist")
    return value


def unreadable_shards(storage, shards: list[str]) -> dict[str, str]:
    """Shards whose file could not be read as a tar at all (their one ``_shard_unreadable`` row), with why."""
    import polars as pl

    from curation_assets.core.shards import UNREADABLE_KEY

    if not storage.exists("samples") or not shards:
        return {}
    rows = storage.scan("samples", shards).filter(pl.col("key") == UNREADABLE_KEY).select("shard", "error").collect()
    return dict(rows.iter_rows())


@main.group("shards")
def shards_group() -> None:
    """The shards a data root knows: list them, or forget one."""


@shards_group.command("list")
@click.option("--root", type=click.Path(exists=True, file_okay=False), required=True)
@click.option("--shards-dir", type=click.Path(file_okay=False), default=None, help="default: <root>/shards")
def list_shards(root: str, shards_dir: str | None) -> None:
    """Every registered shard with its file and state, and every file skipped with the reason."""
    from curation_assets.pipeline import open_pipeline

    pipeline = open_pipeline(root, shards_dir or str(Path(root) / "shards"))
    refs, skipped = pipeline.defs.resources["shard_source"].scan()
    by_key = {ref.key: ref for ref in refs}
    keys = pipeline.shards()
    bad = unreadable_shards(pipeline.storage, keys)
    for key in keys:
        state = "missing file" if key not in by_key else ("unreadable" if key in bad else "ok")
        click.echo(f"{key}\t{by_key[key].name if key in by_key else '-'}\t{state}")
    for ref in refs:
        if ref.key not in keys:
            click.echo(f"{ref.key}\t{ref.name}\tnot registered yet")
    for item in skipped:
        click.echo(f"-\t{item.name}\tskipped: {item.reason}")


@shards_group.command("remove")
@click.argument("keys", nargs=-1, required=True)
@click.option("--root", type=click.Path(exists=True, file_okay=False), required=True)
def remove_shards(keys: tuple[str, ...], root: str) -> None:
    """Forget shards: delete their rows from every per-shard table and their partitions from the instance.
    Global assets (dedup, weights, the training set, the report) drop them on their next refresh."""
    import dagster as dg

    from curation_assets.partitions import SHARDS
    from curation_assets.pipeline import dagster_home
    from resources.storage import DeltaStorage

    from curation_assets.sensors import shard_removal_job

    instance = dg.DagsterInstance.from_config(str(dagster_home(root)))
    unknown = [k for k in keys if k not in set(instance.get_dynamic_partitions(SHARDS))]
    if unknown:
        click.echo(f"not registered shards: {', '.join(unknown)}", err=True)
        sys.exit(2)
    storage = DeltaStorage(root=root)
    tables = storage.shard_tables()
    shard_removal_job.execute_in_process(instance=instance, resources={"storage": storage},
                                         run_config={"ops": {"remove_shards": {"config": {"shards": list(keys)}}}})
    click.echo(f"removed shards {', '.join(keys)}: rows deleted from {', '.join(tables) or 'no table'}")
    click.echo("run `curate run` (or wait for the global refresh) to bring dedup, weights and the training set up to date")


def summary_lines(pipeline, root: str, shards_dir: str, config_path: str | None) -> list[str]:
    """What a run left behind, on one screen: the training set's verdicts, the safety stage's state and the
    command to type next."""
    import polars as pl

    from curation_assets.report_sections import funnel
    from curation_assets.safety_labels import awaiting_message, label_readiness, labels_in_force, safety_config
    from curation_assets.safety import classifiers_trained

    storage = pipeline.storage
    lines = [f"done; tables under {storage.root_path / 'delta'}"]
    table, _, _ = funnel(storage)
    if table is not None:
        lines += [f"  {step:<42} {'' if n is None else n:>9}" for step, n in table.select("step", "samples").iter_rows()]
    overall = storage.read("overall_demographic_ratios") if storage.exists("overall_demographic_ratios") else None
    if overall is not None:
        ratios = overall.filter((pl.col("kind") == "ratio") & (pl.col("source") == "caption"))
        for group in ratios["group"].unique().sort().to_list():
            by_stage = {r["stage"]: r["value"] for r in ratios.filter(pl.col("group") == group).iter_rows(named=True)}
            lines.append(f"  {group} caption ratio: " + ", ".join(f"{s} {v:.3f}" for s, v in by_stage.items()))
    config = f" --config {config_path}" if config_path else ""
    stale = labels_in_force(storage)[1]
    if stale.height:
        lines.append(f"safety: {stale.height} labels are stale (the picture at their uid changed since it was "
                     f"labelled; shards {', '.join(sorted(stale['uid'].str.split('/').list.first().unique()))}) "
                     "and were not used: relabel them (`curate labels export-queue` proposes images again)")
    if not classifiers_trained(storage):
        need = awaiting_message(label_readiness(storage, safety_config(pipeline.settings)))
        lines += [f"safety: awaiting labels ({need or 'no classifier yet'})",
                  "next: label the queue the run proposed, then run again:",
                  f"  curate labels export-queue --root {root}{config} --out queue.csv",
                  f"  curate labels import queue.csv --root {root}{config}",
                  f"  curate run --shards-dir {shards_dir} --root {root}{config}"]
    lines.append(f"report: {storage.reports_dir() / 'curation_report.html'}")
    return lines


@main.command("maintain")
@click.option("--root", type=click.Path(exists=True, file_okay=False), required=True)
@click.option("--retain-hours", type=click.IntRange(min=0), default=168, show_default=True,
              help="Keep the files every table version of this age needs (time travel); older ones go.")
def maintain(root: str, retain_hours: int) -> None:
    """Compact every Delta table's small files (not the dedup buckets of cluster_assignments, whose files
    are one shard each) and vacuum files older versions no longer need. Run it when no run is writing (e.g.
    from cron); re-runs of shards otherwise leave every replaced file behind."""
    from resources.storage import DeltaStorage

    total_before = total_after = 0
    for name, r in DeltaStorage(root=root).maintain(retain_hours).items():
        total_before += r["bytes_before"]
        total_after += r["bytes_after"]
        click.echo(f"  {name:<28} files {r['files_before']:>5} -> {r['files_after']:<5} "
                   f"{r['bytes_before'] / 2**20:8.2f} -> {r['bytes_after'] / 2**20:.2f} MiB")
    click.echo(f"{total_before / 2**20:.2f} MiB -> {total_after / 2**20:.2f} MiB "
               f"(versions younger than {retain_hours} h stay readable)")


@main.command("instance")
@click.option("--root", type=click.Path(file_okay=False), required=True)
@click.option("--postgres", is_flag=True, help="Keep runs, events and ticks in Postgres ($DAGSTER_POSTGRES_URL).")
@click.option("--force", is_flag=True, help="Replace an existing dagster.yaml.")
def instance(root: str, postgres: bool, force: bool) -> None:
    """Write the Dagster instance config (dagster.yaml) of a data root: into $DAGSTER_HOME when set, else
    <root>/dagster_home. With --postgres the instance keeps its storage in the database named by
    $DAGSTER_POSTGRES_URL (read when the instance loads), for production and for more than ~30k shards."""
    from curation_assets.pipeline import home_dir, instance_config

    home = home_dir(root)
    path = home / "dagster.yaml"
    if path.exists() and not force:
        click.echo(f"{path} exists; --force replaces it", err=True)
        sys.exit(1)
    home.mkdir(parents=True, exist_ok=True)
    path.write_text(instance_config(postgres))
    click.echo(f"wrote {path}" + ("; set DAGSTER_POSTGRES_URL=postgresql+psycopg2://user:password@host:5432/dagster" if postgres else ""))


@main.command("report")
@click.option("--root", type=click.Path(exists=True, file_okay=False), required=True)
def report(root: str) -> None:
    """Print the path of the curation report (materialise curation_report first)."""
    from curation_assets.report import report_path
    from resources.storage import DeltaStorage

    path = report_path(DeltaStorage(root=root))
    if not Path(path).is_file():
        click.echo(f"no report yet at {path}: run `curate run` (or materialise curation_report)", err=True)
        sys.exit(1)
    click.echo(str(path))


# ---------------------------------------------------------------- curate labels: human safety labels in and out


def _storage_and_config(root: str, config_path: str | None):
    from curation_assets.safety_labels import safety_config
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
    from curation_assets.safety_labels import import_label_rows

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
    from curation_assets.definitions import shard_group_size
    from resources.shard_source import ShardSource

    storage, cfg = _storage_and_config(root, config_path)
    queue = latest_queue(storage)
    shards = ShardSource(uri=shards_dir or str(Path(root) / "shards"), group_size=shard_group_size())
    members = (storage.scan("samples").filter(pl.col("uid").is_in(queue["uid"].unique().to_list()))
               .select("uid", "shard", "image_member").collect())
    image_ref: dict[str, str] = {}
    out_path = Path(out)
    thumb_dir = out_path.parent / f"{out_path.stem}_thumbs"
    for shard, part in members.group_by("shard"):
        shard = shard[0]
        try:
            ref = shards.get(shard)
        except FileNotFoundError:
            ref = None
        for uid, member in zip(part["uid"].to_list(), part["image_member"].to_list()):
            image_ref[uid] = "{}#{}".format(*ref.locate(member)) if ref else f"{shard}.tar#{member}"
        if thumbnails and ref is not None:
            image_ref.update(_thumbnails(ref, part, thumb_dir, size))
    n = write_queue_csv(queue, out_path, image_ref, {c.name: c.definition for c in cfg.categories})
    round_no = queue["round"][0] if queue.height else "-"
    click.echo(f"wrote {n} queue rows (round {round_no}) to {out_path}")


def _thumbnails(ref, part, directory: Path, size: int) -> dict[str, str]:
    import io

    from PIL import Image

    directory.mkdir(parents=True, exist_ok=True)
    blobs = ref.read_images(part["image_member"].to_list())
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


main.add_command(labels)

if __name__ == "__main__":
    main()
