"""HTML pages of the audits and the curation report: self-contained files (plots and thumbnails inline as
base64), rendered from ``curation_assets/templates/page.html.j2`` with jinja2 autoescaping.

A page is a list of :class:`Section`; a section whose upstream table is missing carries a ``missing`` note
("stage not run") instead of failing the page.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import polars as pl
from markupsafe import Markup

from curation_assets.core.location import as_path, write_atomic
from curation_assets.core.plots import png_data_uri  # noqa: F401  (re-exported for the report pages)


REPORT_PAGE = "curation_report.html"


@dataclass
class Section:
    id: str
    title: str
    blocks: list[Markup] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    missing: str | None = None


def plot_html(png: bytes, alt: str) -> Markup:
    return Markup(f'<img class="plot" alt="{html.escape(alt)}" src="{png_data_uri(png)}">')


def thumbnail_data_uri(data: bytes, size: int = 160) -> str | None:
    """A JPEG thumbnail (longest side ``size``) of encoded image bytes as a data URI; None if undecodable."""
    from PIL import Image

    from curation_assets.core.shards import decode_rgb

    try:
        img = decode_rgb(data)
    except Exception:  # an undecodable training image shows as a placeholder, not a broken page
        return None
    img.thumbnail((size, size), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _cell(value, digits: int) -> tuple[str, bool]:
    if value is None:
        return "", False
    if isinstance(value, float):
        if math.isnan(value):
            return "nan", False
        return (f"{value:.{digits}g}" if abs(value) >= 1e4 or (value != 0 and abs(value) < 1e-3)
                else f"{value:.{digits}f}"), False
    if isinstance(value, (int,)) and not isinstance(value, bool):
        return str(value), False
    return str(value), True


def table_html(df: pl.DataFrame, digits: int = 3, max_rows: int = 500, caption: str | None = None) -> Markup:
    """A frame as an HTML table (text left-aligned, numbers right-aligned); longer frames are cut with a note."""
    rows = df.head(max_rows)
    head = "".join(f"<th class=\"text\">{html.escape(c)}</th>" if df.schema[c] in (pl.String, pl.Boolean)
                   else f"<th>{html.escape(c)}</th>" for c in df.columns)
    body = []
    for row in rows.iter_rows():
        cells = []
        for value in row:
            text, is_text = _cell(value, digits)
            cells.append(f"<td class=\"text\">{html.escape(text)}</td>" if is_text else f"<td>{html.escape(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    more = f"<p class=\"note\">{df.height - max_rows} more rows not shown</p>" if df.height > max_rows else ""
    return Markup(f'<div class="tablewrap"><table>{cap}<thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>{more}')


def fmt_interval(value: float | None, low: float | None, high: float | None, digits: int = 2) -> str:
    """``1.59 [1.39, 1.81]``; blank for a missing value."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if low is None or high is None:
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def fmt_pct(value: float | None, digits: int = 1, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{100 * value:+.{digits}f}%" if signed else f"{100 * value:.{digits}f}%"


def collapsible_table(df: pl.DataFrame, visible: int = 10, digits: int = 3, caption: str | None = None) -> Markup:
    """The first ``visible`` rows as a table; the rest behind a "show all" toggle (nothing is cut)."""
    if df.height <= visible:
        return table_html(df, digits=digits, caption=caption)
    return Markup(f"{table_html(df.head(visible), digits=digits, caption=caption)}"
                  f"<details class=\"more\"><summary>show all {df.height} rows</summary>"
                  f"{table_html(df, digits=digits, max_rows=df.height)}</details>")


def card(title: str, lines: Sequence[str], href: str, status: str = "") -> Markup:
    """A summary card: a title, a few short lines, a link to the detailed section."""
    body = "".join(f"<li>{html.escape(line)}</li>" for line in lines)
    return Markup(f'<div class="card {html.escape(status)}"><h3><a href="#{html.escape(href)}">{html.escape(title)}</a>'
                  f'</h3><ul>{body}</ul></div>')


def thumbs_html(items: Sequence[dict], blur: bool = False) -> Markup:
    """A row of thumbnails. Each item: src (data URI or None), caption, marked (outlined, e.g. the group's
    representative), blur. A blurred image (every one with ``blur``) stays blurred until clicked: reviewers
    are not shown possibly graphic content unasked."""
    figures = []
    for item in items:
        blurred = blur or item.get("blur", False)
        classes = " ".join(c for c in ("thumb", "marked" if item.get("marked") else "", "blur" if blurred else "") if c)
        toggle = ' onclick="this.classList.toggle(\'blur\')" title="click to show or blur"' if blurred else ""
        image = (f'<img class="{classes}" alt="{html.escape(item["caption"])}" src="{item["src"]}"{toggle}>'
                 if item.get("src") else '<div class="thumb">unavailable</div>')
        figures.append(f'<figure>{image}<figcaption>{html.escape(item["caption"])}</figcaption></figure>')
    return Markup(f'<div class="thumbs">{"".join(figures)}</div>')


def paragraph(text: str) -> Markup:
    return Markup(f"<p>{html.escape(text)}</p>")


def link_list(links: Iterable[tuple[str, str]]) -> Markup:
    items = "".join(f'<li><a href="{html.escape(href)}">{html.escape(label)}</a></li>' for label, href in links)
    return Markup(f"<ul>{items}</ul>")


def matches_html(matches: Sequence[dict]) -> Markup:
    """Flagged matches side by side. Each dict: generated_id, generated_src, train_uid, train_src,
    similarity, caption (optional), reference."""
    cards = []
    for m in matches:
        def fig(src, label):
            if src:
                return f'<figure><img class="thumb" alt="{html.escape(label)}" src="{src}"><figcaption>{html.escape(label)}</figcaption></figure>'
            return f'<figure><div class="thumb">unavailable</div><figcaption>{html.escape(label)}</figcaption></figure>'

        caption = f"<div>{html.escape(m['caption'])}</div>" if m.get("caption") else ""
        cards.append(
            f'<div class="match"><div class="pair">{fig(m.get("generated_src"), "generated " + m["generated_id"])}'
            f'{fig(m.get("train_src"), "training " + m["train_uid"])}</div>'
            f'<div>cosine <span class="sim">{m["similarity"]:.3f}</span>'
            + (f', verification {m["verification"]:.2f}' if m.get("verification") is not None else "")
            + f' ({html.escape(m.get("reference", "full"))} set)</div>'
            f"{caption}</div>"
        )
    return Markup(f'<div class="matches">{"".join(cards)}</div>')


def render_page(title: str, sections: Sequence[Section], subtitle: str | None = None,
                links: Sequence[tuple[str, str]] = (), summary: Markup | None = None, collapsed: bool = False) -> str:
    """A page: an optional first-screen ``summary``, then the sections (each a ``<details>`` element, closed
    when ``collapsed``)."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("curation_assets", "templates"),
        autoescape=jinja2.select_autoescape(["html", "j2"]),
    )
    return env.get_template("page.html.j2").render(
        title=title, subtitle=subtitle, sections=list(sections), links=list(links), summary=summary,
        collapsed=collapsed,
        generated_at=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    )


def write_page(path: str | Path, page: str) -> Path:
    """Write atomically (a reader never sees half a page)."""
    path = as_path(path)
    write_atomic(path, page.encode("utf-8"))
    return path
