"""Copies of an image: the perturbations a copy goes through, as data, and the function that applies them.

A transform is ``(name, parameter)``: ``crop`` (area fraction, aspect, x and y position in [0, 1]), ``resize``
(scale), ``brightness`` and ``contrast`` (PIL enhancement factors), ``colour`` (per-channel offset), ``jpeg``
(quality of the final encoding). Transforms apply in :data:`TRANSFORM_ORDER` whatever order they are listed
in. The regurgitation audit calibrates its candidate threshold on copies made by :func:`copy_transforms`
(``core/regurgitation.py``); synthetic corpora use the same vocabulary so their copies match.
"""

from __future__ import annotations

import io
import math
import random
from typing import Any, Callable, Mapping

import numpy as np
from PIL import Image, ImageEnhance

TRANSFORM_ORDER = ("crop", "resize", "brightness", "contrast", "colour", "overlay", "jpeg")

Extra = Callable[[Image.Image, Any, random.Random], Image.Image]


def apply_transforms(img: Image.Image, transforms: list[tuple[str, Any]], quality: int, seed: int,
                     extra: Mapping[str, Extra] | None = None) -> tuple[Image.Image, int]:
    """``img`` after ``transforms`` and the JPEG quality to encode it with (``quality`` unless a ``jpeg``
    transform sets it). ``extra`` adds transforms by name, called as ``f(img, parameter, rng)``."""
    r = random.Random(seed)
    extra = extra or {}
    for name, p in sorted(transforms, key=lambda t: TRANSFORM_ORDER.index(t[0])):
        w, h = img.size
        if name == "crop":
            area, aspect, fx, fy = p
            cw = min(w, int(round(w * math.sqrt(area) * aspect)))
            ch = min(h, int(round(h * math.sqrt(area) / aspect)))
            x0, y0 = int((w - cw) * fx), int((h - ch) * fy)
            img = img.crop((x0, y0, x0 + cw, y0 + ch))
        elif name == "resize":
            img = img.resize((max(8, int(round(w * p))), max(8, int(round(h * p)))), Image.BILINEAR)
        elif name == "brightness":
            img = ImageEnhance.Brightness(img).enhance(p)
        elif name == "contrast":
            img = ImageEnhance.Contrast(img).enhance(p)
        elif name == "colour":
            arr = np.asarray(img, np.int16) + np.array(p, np.int16)
            img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
        elif name == "jpeg":
            quality = int(p)
        elif name in extra:
            img = extra[name](img, p, r)
        else:
            raise ValueError(f"unknown transform {name!r}; known: {list(TRANSFORM_ORDER)}")
    return img, quality


def copy_transforms(r: random.Random) -> list[tuple[str, Any]]:
    """A copy's perturbation: JPEG quality 40-80 plus two of a crop to 70-90% of the area, a resize by
    0.5-0.9 and a colour shift of up to +-30 per channel (harsher than the perceptual encoder's
    near-duplicate transforms)."""
    transforms: list[tuple[str, Any]] = [("jpeg", r.randint(40, 80))]
    for name in r.sample(["crop", "resize", "colour"], 2):
        if name == "crop":
            transforms.append(("crop", (round(r.uniform(0.7, 0.9), 3), round(r.uniform(0.9, 1.1), 3),
                                        round(r.random(), 3), round(r.random(), 3))))
        elif name == "resize":
            transforms.append(("resize", round(r.uniform(0.5, 0.9), 3)))
        else:
            transforms.append(("colour", tuple(r.randint(-30, 30) for _ in range(3))))
    return transforms


def perturbed_copy(image: Image.Image, r: random.Random) -> bytes:
    """JPEG bytes of ``image`` perturbed by :func:`copy_transforms`."""
    img, quality = apply_transforms(image.convert("RGB"), copy_transforms(r), 90, r.randrange(2**31 - 8))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()
