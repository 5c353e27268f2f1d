"""Reading pictures as a person sees them (PIL only, so every decoder can use it cheaply)."""

from __future__ import annotations

from PIL import Image


def upright(img: Image.Image) -> Image.Image:
    """The image as it is displayed: the EXIF orientation tag (cameras, phones, scrapers) applied to the
    pixels, so width, height and content match what a person sees."""
    from PIL import ImageOps

    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:  # unreadable EXIF is no orientation
        return img
    return ImageOps.exif_transpose(img) if orientation not in (None, 1) else img
