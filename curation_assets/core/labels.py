"""Human labels for the safety categories: an append-only log, CSV import with validation, latest-wins view.

The ``labels`` table is a log: every judgement is a new row (uid, category, label, source, round, annotator,
labeled_at, and the sha256 of the picture judged) and nothing is ever updated or deleted, so re-labelling
keeps the history. The label in force for a (uid, category) is the one with the latest ``labeled_at``
(:func:`current_labels`), unless the picture at that uid has changed since (:func:`split_stale`).

Imports are validated before anything is written: rows naming a uid that is not in ``samples``, a sample
rejected at ingest (it has no embedding), a category that is not configured, or a label that is not
yes/no are reported with the row number and the reason, never dropped silently.
"""

from __future__ import annotations

import csv
import io
import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import polars as pl

LABELS_SCHEMA: dict[str, pl.DataType] = {
    "uid": pl.String,
    "category": pl.String,
    "label": pl.Int8,
    "source": pl.String,
    "round": pl.Int32,
    "annotator": pl.String,
    "labeled_at": pl.Datetime("us", "UTC"),
    "sha256": pl.String,
}

_TRUE = {"1", "true", "yes", "y", "t", "positive", "pos"}
_FALSE = {"0", "false", "no", "n", "f", "negative", "neg"}


def parse_label(value: object) -> int | None:
    """1 / 0 for the usual spellings of yes / no; None for anything else (an unlabelled or garbled cell)."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)) and value in (0, 1):
        return int(value)
    text = str(value).strip().lower() if value is not None else ""
    if text in _TRUE:
        return 1
    if text in _FALSE:
        return 0
    return None


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def labels_frame(rows: Sequence[dict]) -> pl.DataFrame:
    """Rows (dicts with the ``LABELS_SCHEMA`` keys; source/round/annotator/labeled_at optional) as a typed frame."""
    now = utcnow()
    filled = [{
        "uid": r["uid"], "category": r["category"], "label": int(r["label"]),
        "source": r.get("source") or "import", "round": int(r["round"]) if r.get("round") is not None else 0,
        "annotator": r.get("annotator") or "unknown", "labeled_at": r.get("labeled_at") or now,
        "sha256": r.get("sha256"),
    } for r in rows]
    return pl.DataFrame(filled, schema=LABELS_SCHEMA)


def empty_labels() -> pl.DataFrame:
    return pl.DataFrame(schema=LABELS_SCHEMA)


def split_stale(current: pl.DataFrame, samples: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(labels in force, stale labels). A label records the sha256 of the picture it judged; when the sample
    at that uid now holds another picture (its shard was replaced), or the sample is gone, the label says
    nothing about it and is stale. Labels recorded before sha256 was kept (null) stay in force.
    ``samples``: uid, sha256 of every current sample."""
    if current.height == 0:
        return current, current
    joined = current.join(samples.select("uid", pl.col("sha256").alias("_now")), on="uid", how="left")
    stale = pl.col("sha256").is_not_null() & (pl.col("_now").is_null() | (pl.col("_now") != pl.col("sha256")))
    return joined.filter(~stale).drop("_now"), joined.filter(stale).drop("_now")


def current_labels(history: pl.DataFrame) -> pl.DataFrame:
    """The label in force per (uid, category): the row with the latest ``labeled_at`` (ties: the later row)."""
    if history.height == 0:
        return history
    return (history.with_row_index("_row")
            .sort(["labeled_at", "_row"])
            .group_by(["uid", "category"], maintain_order=True).last()
            .drop("_row")
            .sort(["category", "uid"]))


@dataclass
class ImportReport:
    """The outcome of validating a CSV: rows that can be written and rows that cannot, with reasons."""

    accepted: pl.DataFrame
    rejected: list[tuple[int, dict, str]] = field(default_factory=list)
    superseded_in_file: int = 0
    relabelled: int = 0
    written: int = 0

    @property
    def ok(self) -> bool:
        return not self.rejected

    def summary(self) -> str:
        lines = [f"{self.accepted.height} valid rows, {len(self.rejected)} invalid, "
                 f"{self.superseded_in_file} superseded by a later row of the same file, "
                 f"{self.relabelled} re-label existing labels (history kept, latest wins), {self.written} written"]
        for line_no, row, reason in self.rejected[:50]:
            lines.append(f"  line {line_no}: {reason}: {row}")
        if len(self.rejected) > 50:
            lines.append(f"  ... and {len(self.rejected) - 50} more")
        return "\n".join(lines)


def _parse_time(value: str | None, default: dt.datetime) -> dt.datetime:
    if value is None or not str(value).strip():
        return default
    parsed = dt.datetime.fromisoformat(str(value).strip().replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.timezone.utc)


def validate_rows(rows: Iterable[dict], categories: Sequence[str], sample_status: pl.DataFrame,
                  existing: pl.DataFrame | None = None, default_source: str = "import",
                  default_annotator: str = "unknown", default_round: int | None = None,
                  first_line: int = 2) -> ImportReport:
    """Validate label rows (dicts with uid, category, label and optional source, round, annotator, labeled_at).

    ``sample_status`` has the ``uid`` and ``status`` of every sample. ``default_round`` (None: one more than
    the latest round in ``existing``) fills empty ``round`` cells. Within one file a later row for the same
    (uid, category) supersedes an earlier one (counted, both valid).
    """
    categories = set(categories)
    status = dict(zip(sample_status["uid"].to_list(), sample_status["status"].to_list()))
    sha = (dict(zip(sample_status["uid"].to_list(), sample_status["sha256"].to_list()))
           if "sha256" in sample_status.columns else {})
    if default_round is None:
        default_round = (int(existing["round"].max()) + 1) if existing is not None and existing.height else 0
    now = utcnow()
    accepted: list[dict] = []
    rejected: list[tuple[int, dict, str]] = []
    for offset, row in enumerate(rows):
        row = dict(row)
        line = int(row.pop("_line", first_line + offset))
        uid = (row.get("uid") or "").strip()
        category = (row.get("category") or "").strip()
        label = parse_label(row.get("label"))
        problems = []
        if not uid:
            problems.append("missing uid")
        elif uid not in status:
            problems.append(f"unknown uid {uid!r} (not in samples)")
        elif status[uid] != "ok":
            problems.append(f"uid {uid!r} was rejected at ingest (status {status[uid]!r}) and has no embedding")
        if category not in categories:
            problems.append(f"unknown category {category!r} (configured: {sorted(categories)})")
        if label is None:
            problems.append(f"label {row.get('label')!r} is not yes/no (1/0, true/false)")
        round_cell = row.get("round")
        try:
            round_no = int(round_cell) if round_cell not in (None, "") else default_round
        except ValueError:
            problems.append(f"round {round_cell!r} is not an integer")
            round_no = default_round
        try:
            labeled_at = _parse_time(row.get("labeled_at"), now)
        except ValueError:
            problems.append(f"labeled_at {row.get('labeled_at')!r} is not an ISO timestamp")
            labeled_at = now
        if problems:
            rejected.append((line, dict(row), "; ".join(problems)))
            continue
        accepted.append({"uid": uid, "category": category, "label": label,
                         "source": (row.get("source") or "").strip() or default_source, "round": round_no,
                         "annotator": (row.get("annotator") or "").strip() or default_annotator,
                         "labeled_at": labeled_at, "sha256": sha.get(uid)})
    frame = labels_frame(accepted) if accepted else empty_labels()
    superseded = frame.height - frame.select(["uid", "category"]).unique().height
    relabelled = 0
    if existing is not None and existing.height and frame.height:
        relabelled = frame.select(["uid", "category"]).unique().join(
            existing.select(["uid", "category"]).unique(), on=["uid", "category"], how="semi").height
    return ImportReport(frame, rejected, superseded, relabelled)


class LabelFileError(ValueError):
    """A label CSV that cannot be read as a table; one line per problem, each naming its line."""


def read_csv_rows(path: str | Path) -> list[dict]:
    """Rows of a label CSV as dicts (with their line number under ``_line``). The header must name at least
    uid, category and label. An empty file, bytes that are not UTF-8, a missing column in the header and rows
    with more or fewer fields than the header raise :class:`LabelFileError` with the line numbers."""
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise LabelFileError(f"{path} line {line}: not UTF-8 text (byte 0x{data[exc.start]:02x}); save the file "
                             "as UTF-8") from None
    if not text.strip():
        raise LabelFileError(f"{path} line 1: empty file; expected a header line with uid,category,label")
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [h.strip() for h in next(reader)]
        missing = sorted({"uid", "category", "label"} - set(header))
        if missing:
            raise LabelFileError(f"{path} line 1: the header lacks columns {missing} (it has {header})")
        rows, problems = [], []
        for fields in reader:
            if not fields or all(not f.strip() for f in fields):
                continue
            if len(fields) != len(header):
                problems.append(f"{path} line {reader.line_num}: {len(fields)} fields, the header has {len(header)}")
                continue
            rows.append({**dict(zip(header, fields)), "_line": reader.line_num})
    except csv.Error as exc:
        raise LabelFileError(f"{path} line {reader.line_num}: {exc}") from None
    if problems:
        raise LabelFileError("\n".join(problems[:50]) + (f"\n... {len(problems) - 50} more" if len(problems) > 50 else ""))
    return rows


QUEUE_EXPORT_COLUMNS = ["uid", "category", "label", "image", "why", "procedure", "score", "round", "definition"]


def write_queue_csv(queue: pl.DataFrame, out: str | Path, image_ref: dict[str, str],
                    definitions: dict[str, str]) -> int:
    """A labelling batch as CSV: one row per (uid, category) with an empty ``label`` column to fill in, the
    image (thumbnail path or ``tar#member``), why it was chosen and the category definition. Re-importing the
    filled file with ``labels import`` records the round and the procedure as the label source."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=QUEUE_EXPORT_COLUMNS + ["source"])
        writer.writeheader()
        for row in queue.iter_rows(named=True):
            writer.writerow({
                "uid": row["uid"], "category": row["category"], "label": "",
                "image": image_ref.get(row["uid"], ""), "why": row["why"], "procedure": row["procedure"],
                "score": "" if row["score"] is None else f"{row['score']:.6f}", "round": row["round"],
                "definition": definitions.get(row["category"], ""), "source": f"queue:{row['procedure']}",
            })
    return queue.height
