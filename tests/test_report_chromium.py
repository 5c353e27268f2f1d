"""The curation report and the regurgitation page rendered by a real browser (headless Chromium): every
image decodes (naturalWidth > 0), the tables are in the DOM, and a screenshot is not blank."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from curation_assets import audits

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--hide-scrollbars"]
PROBE = """
<script>
window.addEventListener('load', () => {
  const imgs = [...document.images];
  document.body.setAttribute('data-image-widths', imgs.map(i => i.complete ? i.naturalWidth : -1).join(','));
  document.body.setAttribute('data-tables', String(document.querySelectorAll('table').length));
  document.body.setAttribute('data-table-rows', String(document.querySelectorAll('table tbody tr').length));
});
</script>
"""

pytestmark = pytest.mark.skipif(not CHROMIUM.is_file(), reason="headless Chromium not installed: apt-get install -y chromium")


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    return subprocess.run([str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=120)


def _rendered(page: Path, tmp_path: Path) -> dict:
    """Load a copy of the page with a probe script; returns the image widths and table counts the browser saw."""
    probed = tmp_path / f"probed-{page.name}"
    probed.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    done = _chromium(tmp_path, "--virtual-time-budget=10000", "--dump-dom", probed.as_uri())
    assert done.returncode == 0, done.stderr[-2000:]
    body = re.search(r"<body([^>]*)>", done.stdout)
    assert body, done.stdout[:500]
    attrs = dict(re.findall(r'data-([a-z-]+)="([^"]*)"', body.group(1)))
    widths = [int(w) for w in attrs.get("image-widths", "").split(",") if w]
    return {"widths": widths, "tables": int(attrs["tables"]), "rows": int(attrs["table-rows"])}


@pytest.fixture(scope="module")
def reported(ingested, tmp_path_factory):
    state = ingested.copy(tmp_path_factory.mktemp("reported"))
    state.materialize(["regurgitation_audit", "dataset_census", "curation_report"])
    return state


def test_report_renders_images_and_tables_in_chromium(reported, tmp_path):
    page = audits.report_path(reported.storage)
    seen = _rendered(page, tmp_path)
    html = page.read_text()
    assert len(seen["widths"]) == html.count("<img ") >= 4  # funnel + census plots
    assert all(w > 0 for w in seen["widths"]), seen["widths"]
    assert seen["tables"] == html.count("<table>") >= 4
    assert seen["rows"] >= 10

    shot = tmp_path / "report.png"
    done = _chromium(tmp_path, "--window-size=1280,2000", f"--screenshot={shot}", page.as_uri())
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert pixels.std() > 10  # text, tables and plots, not a blank page
    assert (pixels < 128).mean() > 0.01


def test_regurgitation_page_shows_each_flagged_pair(reported, tmp_path):
    page = reported.storage.reports_dir() / audits.REGURGITATION_PAGE
    html = page.read_text()
    pairs = html.count('class="match"')
    assert pairs > 0
    seen = _rendered(page, tmp_path)
    thumbs = [w for w in seen["widths"]]
    assert len(thumbs) == 2 * pairs + 1  # a generated and a training thumbnail per match, plus the histogram
    assert all(w > 0 for w in thumbs)
    assert seen["tables"] == 1

