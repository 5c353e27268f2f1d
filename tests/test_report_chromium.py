"""The curation report as a person sees it, rendered by a real browser (headless Chromium at 1400 x 1000):
the first screen holds the summary with the funnel and the ratio chart, the page is short with its sections
collapsed, every image decodes, nothing logs an error; and the same for a first run that awaits labels.
Screenshots are kept in test-artifacts/ for a person to look at."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import dagster as dg
import numpy as np
import pytest
from PIL import Image

from curation_assets import audits, report

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--hide-scrollbars", "--window-size=1400,1000"]
PROBE = """
<script>
window.__errors = [];
window.addEventListener('error', e => window.__errors.push('error: ' + (e.message || (e.target && e.target.tagName) || e.type)), true);
const __consoleError = console.error;
console.error = (...args) => { window.__errors.push('console: ' + args.join(' ')); __consoleError(...args); };
window.addEventListener('load', () => {
  const box = id => { const el = document.getElementById(id); if (!el) return 'none';
    const b = el.getBoundingClientRect(); return [b.top, b.bottom, b.left, b.right].map(Math.round).join(':'); };
  const b = document.body;
  b.setAttribute('data-image-widths', [...document.images].map(i => i.complete ? i.naturalWidth : -1).join(','));
  b.setAttribute('data-summary', box('summary'));
  b.setAttribute('data-funnel', box('funnel-chart'));
  b.setAttribute('data-ratio', box('ratio-chart'));
  b.setAttribute('data-height', String(document.documentElement.scrollHeight));
  b.setAttribute('data-viewport', window.innerWidth + 'x' + window.innerHeight);
  b.setAttribute('data-open', String(document.querySelectorAll('details.section[open]').length));
  b.setAttribute('data-sections', String(document.querySelectorAll('details.section').length));
  b.setAttribute('data-pending', String(document.querySelectorAll('.card.pending').length));
  b.setAttribute('data-tables', String(document.querySelectorAll('table').length));
  b.setAttribute('data-errors', window.__errors.join(' | '));
});
</script>
"""

pytestmark = pytest.mark.skipif(not CHROMIUM.is_file(), reason="headless Chromium not installed: apt-get install -y chromium")


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    return subprocess.run([str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=120)


def _rendered(page: Path, tmp_path: Path) -> dict:
    """Load a copy of the page with a probe script (first in <head>, so it sees every error); returns what the
    browser saw."""
    probed = page.with_name(f"probed-{page.name}")  # beside the page: relative links and CSVs resolve
    probed.write_text(page.read_text().replace("<head>", "<head>" + PROBE, 1))
    try:
        done = _chromium(tmp_path, "--virtual-time-budget=10000", "--dump-dom", probed.as_uri())
    finally:
        probed.unlink()
    assert done.returncode == 0, done.stderr[-2000:]
    body = re.search(r"<body([^>]*)>", done.stdout)
    assert body, done.stdout[:500]
    attrs = dict(re.findall(r'data-([a-z-]+)="([^"]*)"', body.group(1)))
    box = {k: [int(v) for v in attrs[k].split(":")] if attrs[k] != "none" else None for k in ("summary", "funnel", "ratio")}
    return {"widths": [int(w) for w in attrs["image-widths"].split(",") if w], **box,
            "height": int(attrs["height"]), "viewport": attrs["viewport"], "open": int(attrs["open"]),
            "sections": int(attrs["sections"]), "pending": int(attrs["pending"]), "tables": int(attrs["tables"]),
            "errors": attrs["errors"]}


def _screenshot(page: Path, tmp_path: Path, name: str) -> np.ndarray:
    shot = tmp_path / name
    done = _chromium(tmp_path, f"--screenshot={shot}", page.as_uri())
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copy(shot, ARTIFACTS / name)
    return np.asarray(Image.open(shot).convert("L"), dtype=np.float64)


def _in_first_screen(box) -> bool:
    top, bottom, left, right = box
    return 0 <= top < bottom <= 1000 and 0 <= left < right <= 1400


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    """`make demo` at test scale: the demo's own flow (simulated annotator, three active-learning rounds) on
    2 shards x 400 images (large enough for a filter that keeps most clean images)."""
    from curation_assets.demo.run import run_demo

    root = tmp_path_factory.mktemp("demo") / "root"
    run_demo(root, shards=2, per_shard=400, seed=1, size=128, rounds=3)
    return root


@pytest.fixture(scope="module")
def label_free_root(demo_corpus, tmp_path_factory):
    from click.testing import CliRunner

    from curation_assets.cli import main

    root = tmp_path_factory.mktemp("label_free") / "root"
    result = CliRunner().invoke(main, ["run", "--shards-dir", str(demo_corpus), "--root", str(root)])
    assert result.exit_code == 0, result.output
    return root


def test_demo_report_first_screen_tells_the_story(demo_root, tmp_path):
    from resources.storage import DeltaStorage

    page = report.report_path(DeltaStorage(root=str(demo_root)))
    seen = _rendered(page, tmp_path)
    assert seen["viewport"].startswith("1400x")  # laid out 1400 px wide; the screenshot below is 1400 x 1000
    for element in ("summary", "funnel", "ratio"):
        assert seen[element] is not None, f"#{element} missing"
    assert _in_first_screen(seen["funnel"]) and _in_first_screen(seen["ratio"]), seen
    assert seen["summary"][0] < 200  # the summary starts right under the title
    assert seen["height"] < 8000, seen["height"]
    assert seen["open"] == 0 and seen["sections"] >= 8  # every section collapsed, there to open
    assert seen["pending"] == 0
    html = page.read_text()
    assert len(seen["widths"]) == html.count("<img ") >= 20  # charts, duplicate groups, near-threshold images
    assert all(w > 0 for w in seen["widths"]), seen["widths"]
    assert seen["errors"] == "", seen["errors"]
    for anchor in ("funnel", "safety-thresholds", "bias", "dedup-recall", "regurgitation"):
        assert f'href="#{anchor}"' in html and f'id="{anchor}"' in html
    assert re.search(r"\d\.\d\d \[\d\.\d\d, \d\.\d\d\]", html)  # ratios as value [low, high]
    assert 'class="thumb blur"' in html and 'class="thumb marked"' in html
    pixels = _screenshot(page, tmp_path, "report_demo_first_screen.png")
    assert pixels.shape == (1000, 1400) and pixels.std() > 10 and (pixels < 128).mean() > 0.01


def test_label_free_report_shows_safety_as_pending(label_free_root, tmp_path):
    from resources.storage import DeltaStorage

    page = report.report_path(DeltaStorage(root=str(label_free_root)))
    seen = _rendered(page, tmp_path)
    assert _in_first_screen(seen["funnel"]) and _in_first_screen(seen["ratio"]), seen
    assert seen["pending"] == 1 and seen["height"] < 8000 and seen["errors"] == ""
    assert all(w > 0 for w in seen["widths"])
    html = page.read_text()
    assert "awaiting labels" in html and "curate labels export-queue" in html
    _screenshot(page, tmp_path, "report_awaiting_labels_first_screen.png")


def test_every_delta_table_asset_documents_its_columns(demo_root):
    """The catalog documents the table contract: each table written under the root whose name is an asset
    has a column schema, in the asset's definition or on its latest materialisation."""
    from curation_assets.definitions import build_definitions
    from resources.storage import DeltaStorage

    storage = DeltaStorage(root=str(demo_root))
    defs = build_definitions(root=str(demo_root))
    graph = defs.resolve_asset_graph()
    instance = dg.DagsterInstance.from_config(str(demo_root / "dagster_home"))
    checked = []
    for table in storage.tables():
        key = dg.AssetKey(table)
        if not graph.has(key):
            continue
        schema = graph.get(key).metadata.get("dagster/column_schema")
        if schema is None:
            event = instance.get_latest_materialization_event(key)
            assert event is not None, table
            schema = event.asset_materialization.metadata.get("dagster/column_schema")
            schema = schema.value if schema is not None else None
        assert schema is not None, f"{table} has no column schema"
        columns = {c.name for c in schema.columns}
        assert columns == set(storage.scan(table).collect_schema().names()), table
        checked.append(table)
    assert {"samples", "training_set", "labels", "safety_scores", "duplicate_pairs", "overall_demographic_ratios"} <= set(checked)


def test_regurgitation_page_shows_each_flagged_pair(demo_root, tmp_path):
    from resources.storage import DeltaStorage

    page = DeltaStorage(root=str(demo_root)).reports_dir() / audits.REGURGITATION_PAGE
    html = page.read_text()
    pairs = html.count('class="match"')
    assert pairs > 0
    seen = _rendered(page, tmp_path)
    assert len(seen["widths"]) == 2 * pairs + 1  # a generated and a training thumbnail per match, plus the histogram
    assert all(w > 0 for w in seen["widths"])
    assert seen["errors"] == ""
