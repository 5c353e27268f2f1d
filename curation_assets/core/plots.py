"""Figures as PNG bytes, PNG bytes as markdown images and frames as markdown tables, so the Dagster UI and
the HTML pages show plots and tables."""

from __future__ import annotations

import base64
import io
import math


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend (steps and sensors run without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_png(fig, dpi: int = 90) -> bytes:
    """Render a matplotlib figure to PNG bytes and close it (figures left open leak memory across steps)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def figure_row(ncols: int, width: float = 4.2, height: float = 3.2):
    """A figure with ``ncols`` axes side by side: ``(fig, axes)``."""
    fig, axes = pyplot().subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    return fig, axes[0]


def figure_markdown(fig, alt: str = "", dpi: int = 90) -> str:
    """A figure as an inline markdown image (and closed)."""
    return markdown_image(figure_png(fig, dpi=dpi), alt)


def markdown_table(df, digits: int = 4, max_rows: int = 50) -> str:
    """A polars frame as a markdown table (``dg.MetadataValue.md``); floats to ``digits`` significant digits,
    at most ``max_rows`` rows (the rest counted below)."""
    def fmt(v) -> str:
        if isinstance(v, float):
            return "nan" if math.isnan(v) else f"{v:.{digits}g}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.head(max_rows).iter_rows()]
    if df.height > max_rows:
        lines.append(f"\n({df.height - max_rows} more rows)")
    return "\n".join(lines)


def markdown_image(png: bytes, alt: str = "") -> str:
    """A PNG inline in markdown metadata (``dg.MetadataValue.md``)."""
    return f"![{alt}]({png_data_uri(png)})"
