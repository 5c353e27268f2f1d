"""Collect bench/results/*.json into bench/results/SUMMARY.md (scalar results, one section per benchmark)."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _flatten(prefix: str, value, out: list[tuple[str, object]]) -> None:
    if isinstance(value, dict):
        for key, inner in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), inner, out)
    elif isinstance(value, (int, float, str, bool)) or value is None:
        out.append((prefix, value))


def main(directory: str = "bench/results") -> None:
    results = Path(directory)
    lines = ["# Benchmark results", "", "Measured by `make bench` on the machine named in each file.", ""]
    for path in sorted(results.glob("*.json")):
        data = json.loads(path.read_text())
        rows: list[tuple[str, object]] = []
        _flatten("", data, rows)
        lines += [f"## {path.stem}", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in rows[:80]]
        lines.append("")
    (results / "SUMMARY.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main(*sys.argv[1:])
