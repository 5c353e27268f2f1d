"""The verification thumbnail: what pixel verification (:mod:`curation_assets.core.pixel_verify`) needs of an
image, made once while the image is decoded for embedding and stored beside its vector, so that
verification never reads a tar again. OpenCV and numpy only, so every encoder can make it."""

from __future__ import annotations

import numpy as np

THUMBNAIL_WIDTH = 128
THUMBNAIL_QUALITY = 90
_MAX_ASPECT = 4


def thumbnail(pixels: np.ndarray, width: int, height: int) -> bytes:
    """The verification thumbnail of an image whose ``RGB`` pixels (any size, e.g. the perceptual encoder's
    square work image) show a picture of ``width x height``: :data:`THUMBNAIL_WIDTH` px wide with that aspect
    (at most 4:1 either way), JPEG quality :data:`THUMBNAIL_QUALITY`."""
    import cv2

    aspect = min(max(height / max(width, 1), 1 / _MAX_ASPECT), _MAX_ASPECT)
    h = max(8, int(round(THUMBNAIL_WIDTH * aspect)))
    src = np.ascontiguousarray(pixels[..., ::-1])
    shrink = h <= src.shape[0] and THUMBNAIL_WIDTH <= src.shape[1]
    out = cv2.resize(src, (THUMBNAIL_WIDTH, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    return cv2.imencode(".jpg", out, [cv2.IMWRITE_JPEG_QUALITY, THUMBNAIL_QUALITY])[1].tobytes()
