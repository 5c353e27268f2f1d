"""Figures as PNG bytes, and PNG bytes as markdown images, so the Dagster UI and the HTML pages show plots."""

from __future__ import annotations

import base64
import io


def figure_png(fig, dpi: int = 90) -> bytes:
    """Render a matplotlib figure to PNG bytes and close it (figures left open leak memory across steps)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def markdown_image(png: bytes, alt: str = "") -> str:
    """A PNG inline in markdown metadata (``dg.MetadataValue.md``)."""
    return f"![{alt}]({png_data_uri(png)})"
