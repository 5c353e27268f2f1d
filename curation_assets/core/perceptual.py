"""A weight-free perceptual image encoder for near-duplicate detection on CPU.

This is the pipeline's embedded default encoder: no model weights, deterministic, ~ms per image on one
CPU core. It is *not* a semantic encoder (it does not know what a cat is); it answers "is this the same
picture, re-encoded, resized, cropped, brightened or stamped with a small logo?" and that is all the
demo, the tests and the dedup stage need from it. Tables record it as ``encoder = "perceptual-v1"``.

How it works:

1. The image is converted to RGB (transparency composited on white, 16-bit rescaled) and squashed to a
   ``WORK_SIZE`` square; aspect changes from crops are small and the pooled features absorb them.
2. Raw descriptor (1386 numbers), every block power-normalised (signed square root) and L2-normalised
   on its own so that no block dominates and global contrast cancels:
   - gradient-orientation histograms (HOG-like, 9 soft orientation bins) at two image scales, pooled
     over coarse grids (1x1 to 6x6) with overlapping Gaussian windows, so a 10-20% shift from a crop
     moves mass smoothly between neighbouring cells instead of across a hard cell border;
   - hue histograms (12 bins weighted by chroma, plus an achromatic bin) over soft 1x1-4x4 grids;
   - a coarse intensity layout (standardised: brightness and contrast cancel) and an opponent-colour
     layout (normalised and absolute).
3. A learned whitening (linear-discriminant style, Radenovic et al. 2016): the within-pair covariance
   of near-duplicate pairs is whitened away, then the top ``OUTPUT_DIM`` directions of the remaining
   between-image variance are kept. It is fitted once, deterministically, on a fixed synthetic
   reference set generated inside this module (:func:`reference_images` + :func:`near_duplicate`,
   1200 scenes x 3 near-duplicates), never on the data being encoded, so encoding a shard does not
   depend on any other shard and re-encoding gives identical vectors. The fit takes about a minute once
   per machine; the result is cached on disk under a hash of the code and constants it depends on
   (``CURATION_ASSETS_CACHE`` overrides the directory, default ``~/.cache/curation_assets``).

At :data:`DUPLICATE_THRESHOLD` cosine similarity, near-duplicate pairs score above and distinct images
below; :func:`separation_report` measures exactly that on any labelled set of vectors. Measured on demo
corpora it was not chosen on (4 x 1000 and 2 x 1000 images of 256 px): pair recall 96.3% / 96.4% with
0.082% / 0.068% of random distinct pairs above it. Known limit: it does not read clock hands, so most
"near-miss" clocks (the same clock at another time) score above the threshold.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFont

ENCODER_NAME = "perceptual-v1"
WORK_SIZE = 128
OUTPUT_DIM = 768
DUPLICATE_THRESHOLD = 0.89
"""Cosine similarity above which two perceptual-v1 vectors are called near-duplicates. Chosen on a
validation demo corpus (``write_demo_corpus`` seed 1, 4 x 1000 images of 256 px), where it is the
middle of the window in which pair recall >= 95% and the false-positive rate on random distinct pairs
<= 0.1% both hold (96.1% / 0.087% there), then frozen; tests and ``bench/bench_encoders.py`` measure
it on other seeds."""

_ORIENTATIONS = 9
_HUES = 12
_REFERENCE_IMAGES = 1200
_REFERENCE_VIEWS = 3
_REFERENCE_SEED = 20240611
_SHRINKAGE = 0.01
_CHUNK = 8
"""Images per descriptor call: each of its float maps (8 x 128 x 128) then stays in a core's L2 cache; on the
2-core dev VM 8 encoded 1.2x faster than 64 on one thread and 1.3x on two."""


# --------------------------------------------------------------------------- raw descriptor


def _pool_matrix(cells: int, size: int) -> np.ndarray:
    """Overlapping Gaussian pooling windows: ``cells`` rows over ``size`` pixels, each row sums to 1."""
    centres = (np.arange(cells) + 0.5) / cells
    pos = (np.arange(size) + 0.5) / size
    sigma = 0.6 / cells
    w = np.exp(-0.5 * ((pos[None, :] - centres[:, None]) / sigma) ** 2)
    return (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


_POOLS: dict[tuple[tuple[int, ...], int], np.ndarray] = {}


def _pool_stack(cells: tuple[int, ...], size: int) -> np.ndarray:
    key = (cells, size)
    if key not in _POOLS:
        _POOLS[key] = np.concatenate([_pool_matrix(c, size) for c in cells])
    return _POOLS[key]


def _pool_grids(maps: np.ndarray, grids: Sequence[int]) -> list[np.ndarray]:
    """Soft-pool ``(B, ..., H, W)`` maps onto each ``g x g`` grid in one pair of matrix products;
    returns one ``(B, ... * g * g)`` array per grid."""
    h, w = maps.shape[-2:]
    grids = tuple(grids)
    rows = _pool_stack(grids, h) @ (maps @ _pool_stack(grids, w).T)
    out, offset = [], 0
    for g in grids:
        out.append(rows[..., offset : offset + g, offset : offset + g].reshape(len(maps), -1))
        offset += g
    return out


def _pool(maps: np.ndarray, cells: int) -> np.ndarray:
    """Soft-pool ``(B, H, W)`` maps onto a ``cells x cells`` grid -> ``(B, cells * cells)``."""
    return _pool_grids(maps, (cells,))[0]


def _block(x: np.ndarray) -> np.ndarray:
    """Power (signed square root) then L2 normalisation of one descriptor block, per row."""
    x = np.sign(x) * np.sqrt(np.abs(x))
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-6)


def _soft_bins(values: np.ndarray, weights: np.ndarray, bins: int, extra: int = 0) -> np.ndarray:
    """Circular linear-interpolation binning: ``values`` in [0, bins) -> ``(B, bins + extra, H, W)`` weighted
    maps (the ``extra`` trailing maps are left for the caller to fill, which saves a copy of them all).
    Compiled (:func:`_soft_bins_kernel`, by numba): the same float32 operations in the same order as the numpy
    formulation ``max(1 - |v - k|, 0) * w`` (circular for bin 0), so the maps are equal bit for bit, ~6x
    faster, and without the GIL, so the encoder's threads run it side by side."""
    return _compiled_soft_bins()(np.ascontiguousarray(values, dtype=np.float32),
                                 np.ascontiguousarray(weights, dtype=np.float32), bins, extra)


_COMPILED: dict[str, object] = {}
_COMPILE_LOCK = threading.Lock()


def _compiled_soft_bins():
    """:func:`_soft_bins_kernel` compiled by numba (cached on disk), imported on first use only: numba's import
    (~0.2 s) is not paid by every Dagster process that loads the definitions."""
    with _COMPILE_LOCK:
        if "soft_bins" not in _COMPILED:
            from numba import njit

            _COMPILED["soft_bins"] = njit(cache=True, nogil=True)(_soft_bins_kernel)
        return _COMPILED["soft_bins"]


def _soft_bins_kernel(values, weights, bins, extra):
    n, h, w = values.shape
    out = np.empty((n, bins + extra, h, w), dtype=np.float32)
    period, one, zero = np.float32(bins), np.float32(1.0), np.float32(0.0)
    for i in range(n):
        for k in range(bins):
            centre = np.float32(k)
            for y in range(h):
                for x in range(w):
                    d = abs(values[i, y, x] - centre)
                    if k == 0:  # only bin 0 can be nearer the long way round: |v - k| > bins - 1 needs k = 0
                        d = min(d, period - d)
                    out[i, k, y, x] = max(one - d, zero) * weights[i, y, x]
    return out


def _wrap(angle: np.ndarray, period: float) -> np.ndarray:
    """``angle % period`` for angles in ``[-period, period]`` (what ``arctan2`` returns), bit for bit, without
    numpy's floating-point remainder (measured 25x slower, a sixth of the whole descriptor)."""
    p = angle.dtype.type(period)
    out = angle + (angle < 0) * p
    out -= (out >= p) * p
    return out


def _gradient_blocks(gray: np.ndarray, grids: Sequence[int]) -> list[np.ndarray]:
    gx = np.zeros_like(gray)
    gy = np.zeros_like(gray)
    gx[:, :, 1:-1] = gray[:, :, 2:] - gray[:, :, :-2]
    gy[:, 1:-1, :] = gray[:, 2:, :] - gray[:, :-2, :]
    mag = np.sqrt(gx * gx + gy * gy)
    ang = _wrap(np.arctan2(gy, gx), np.pi) * (_ORIENTATIONS / np.pi)
    return [_block(p) for p in _pool_grids(_soft_bins(ang, mag, _ORIENTATIONS), grids)]


def _downsample2(x: np.ndarray) -> np.ndarray:
    return 0.25 * (x[:, 0::2, 0::2] + x[:, 1::2, 0::2] + x[:, 0::2, 1::2] + x[:, 1::2, 1::2])


def _standardise(x: np.ndarray) -> np.ndarray:
    x = x - x.mean(axis=1, keepdims=True)
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-6)


def _raw_descriptor(pixels: np.ndarray) -> np.ndarray:
    """``(B, S, S, 3)`` uint8 -> ``(B, D)`` float32 raw descriptor (blocks described in the module docstring)."""
    x = np.moveaxis(pixels, -1, 0).astype(np.float32) * (1.0 / 255.0)  # planar: each channel contiguous
    r, g, b = x[0], x[1], x[2]
    gray = 0.299 * r + 0.587 * g + 0.114 * b
    blocks = _gradient_blocks(gray, (1, 2, 3, 4, 6))
    blocks += _gradient_blocks(_downsample2(gray), (1, 2, 3, 4))

    chroma = np.maximum(np.maximum(r, g), b) - np.minimum(np.minimum(r, g), b)
    hue = _wrap(np.arctan2(math.sqrt(3) * 0.5 * (g - b), r - 0.5 * (g + b)), 2 * np.pi) * (_HUES / (2 * np.pi))
    colour_maps = _soft_bins(hue, chroma, _HUES, extra=1)
    colour_maps[:, _HUES] = np.clip(1.0 - 4.0 * chroma, 0.0, 1.0) * 0.25
    blocks += [_block(p) for p in _pool_grids(colour_maps, (1, 2, 3, 4))]

    o1 = r - g
    o2 = 0.5 * (r + g) - b
    blocks.append(_standardise(_pool(gray, 4)))
    blocks.append(_standardise(_pool(gray, 6)))
    opponent = np.concatenate([_pool(o1, 4), _pool(o2, 4)], axis=1)
    blocks.append(_block(opponent))
    blocks.append(np.concatenate([opponent, _pool(gray, 4) - 0.5], axis=1))
    return np.concatenate(blocks, axis=1).astype(np.float32)


def _to_pixels(image: Image.Image) -> np.ndarray:
    if image.mode != "RGB":
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            canvas = Image.new("RGB", rgba.size, (255, 255, 255))
            canvas.paste(rgba, mask=rgba.getchannel("A"))
            image = canvas
        elif image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
            arr = np.asarray(image, dtype=np.float32)
            hi = float(arr.max()) or 1.0
            image = Image.fromarray((np.clip(arr / hi, 0, 1) * 255).astype(np.uint8)).convert("RGB")
        else:
            image = image.convert("RGB")
    return np.asarray(image.resize((WORK_SIZE, WORK_SIZE), Image.BILINEAR), dtype=np.uint8)


def raw_features(images: Sequence[Image.Image]) -> np.ndarray:
    """The un-whitened descriptor of each image (exposed for diagnostics and for fitting the whitening)."""
    out = []
    for start in range(0, len(images), _CHUNK):
        pixels = np.stack([_to_pixels(im) for im in images[start : start + _CHUNK]])
        out.append(_raw_descriptor(pixels))
    if not out:
        return np.zeros((0, _raw_dim()), dtype=np.float32)
    return np.concatenate(out)


def _raw_dim() -> int:
    return _raw_descriptor(np.zeros((1, WORK_SIZE, WORK_SIZE, 3), dtype=np.uint8)).shape[1]


# --------------------------------------------------------------------------- synthetic reference set


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 256, 3))


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    kind = rng.integers(0, 4)
    if kind == 0:
        return Image.new("RGB", (size, size), _colour(rng))
    if kind == 1:
        a, b = np.array(_colour(rng), np.float32), np.array(_colour(rng), np.float32)
        theta = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:size, 0:size] / size
        t = np.clip(0.5 + (xx - 0.5) * np.cos(theta) + (yy - 0.5) * np.sin(theta), 0, 1)[..., None]
        return Image.fromarray((a * (1 - t) + b * t).astype(np.uint8))
    if kind == 2:
        cells = int(rng.integers(4, 24))
        noise = rng.random((cells, cells, 3)) * 255
        base = Image.fromarray(noise.astype(np.uint8)).resize((size, size), Image.BICUBIC)
        return base
    freq = rng.uniform(3, 20)
    theta = rng.uniform(0, np.pi)
    yy, xx = np.mgrid[0:size, 0:size] / size
    wave = 0.5 + 0.5 * np.sin(2 * np.pi * freq * (xx * np.cos(theta) + yy * np.sin(theta)))
    a, b = np.array(_colour(rng), np.float32), np.array(_colour(rng), np.float32)
    return Image.fromarray((a * (1 - wave[..., None]) + b * wave[..., None]).astype(np.uint8))


def _random_text(rng: np.random.Generator, length: int) -> str:
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 "
    return "".join(letters[i] for i in rng.integers(0, len(letters), length))


def reference_images(n: int, seed: int = _REFERENCE_SEED, size: int = 256) -> list[Image.Image]:
    """Deterministic synthetic scenes (backgrounds, textures, shapes, lines, text) for fitting the whitening."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        im = _background(rng, size)
        draw = ImageDraw.Draw(im)
        for _ in range(int(rng.integers(1, 9))):
            kind = rng.integers(0, 5)
            x0, y0 = rng.integers(-size // 4, size, 2)
            w, h = rng.integers(size // 10, size // 2 + 1, 2)
            box = [int(x0), int(y0), int(x0 + w), int(y0 + h)]
            if kind == 0:
                draw.ellipse(box, fill=_colour(rng), outline=_colour(rng), width=int(rng.integers(0, 6)))
            elif kind == 1:
                draw.rectangle(box, fill=_colour(rng), outline=_colour(rng), width=int(rng.integers(0, 6)))
            elif kind == 2:
                pts = [tuple(int(v) for v in rng.integers(0, size, 2)) for _ in range(int(rng.integers(3, 7)))]
                draw.polygon(pts, fill=_colour(rng))
            elif kind == 3:
                for _ in range(int(rng.integers(1, 6))):
                    p = [int(v) for v in rng.integers(0, size, 4)]
                    draw.line(p, fill=_colour(rng), width=int(rng.integers(1, 8)))
            else:
                draw.text(
                    (int(x0), int(y0)),
                    _random_text(rng, int(rng.integers(3, 14))),
                    fill=_colour(rng),
                    font=_font(int(rng.integers(12, 48))),
                )
        images.append(im)
    return images


def near_duplicate(image: Image.Image, rng: np.random.Generator, transforms: Iterable[str] | None = None) -> Image.Image:
    """A near-duplicate of ``image`` under the transformations the encoder is built to ignore.

    ``transforms`` picks from ``crop`` (>= 80% of the area, any position), ``resize`` (scale 0.5-1.0),
    ``brightness`` and ``contrast`` (+-20%), ``overlay`` (a small logo or text stamp) and ``jpeg``
    (quality 30-95), applied in that order. ``None`` applies each with probability 0.6 (at least one).
    """
    names = ["crop", "resize", "brightness", "contrast", "overlay", "jpeg"]
    if transforms is None:
        chosen = {t for t in names if rng.random() < 0.6} or {names[int(rng.integers(0, len(names)))]}
    else:
        chosen = set(transforms)
    im = image.convert("RGB")
    w, h = im.size
    if "crop" in chosen:
        area = rng.uniform(0.8, 1.0)
        fw = rng.uniform(area, 1.0)
        fh = area / fw
        cw, ch = max(1, round(w * fw)), max(1, round(h * fh))
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        im = im.crop((x0, y0, x0 + cw, y0 + ch))
    if "resize" in chosen:
        s = rng.uniform(0.5, 1.0)
        im = im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))), Image.BILINEAR)
    if "brightness" in chosen:
        im = ImageEnhance.Brightness(im).enhance(rng.uniform(0.8, 1.2))
    if "contrast" in chosen:
        im = ImageEnhance.Contrast(im).enhance(rng.uniform(0.8, 1.2))
    if "overlay" in chosen:
        draw = ImageDraw.Draw(im)
        side = max(4, int(min(im.size) * rng.uniform(0.08, 0.18)))
        x0 = int(rng.integers(0, max(1, im.width - side)))
        y0 = int(rng.integers(0, max(1, im.height - side)))
        if rng.random() < 0.5:
            draw.ellipse([x0, y0, x0 + side, y0 + side], fill=_colour(rng), outline=_colour(rng), width=2)
            draw.text((x0 + side // 4, y0 + side // 4), _random_text(rng, 2), fill=_colour(rng), font=_font(max(6, side // 2)))
        else:
            draw.text((x0, y0), _random_text(rng, int(rng.integers(4, 10))), fill=_colour(rng), font=_font(max(6, side // 2)))
    if "jpeg" in chosen:
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=int(rng.integers(30, 96)))
        im = Image.open(io.BytesIO(buf.getvalue()))
        im.load()
    return im


# --------------------------------------------------------------------------- whitening


def _fit_whitening(raw_base: np.ndarray, raw_views: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Learned whitening: whiten the near-duplicate (within-pair) covariance, then PCA of what remains.

    ``raw_base``: ``(N, D)`` originals, ``raw_views``: ``(N, V, D)`` near-duplicates of each. Returns
    ``(mean, projection)`` with ``projection`` of shape ``(D, dim)``.
    """
    n, v, d = raw_views.shape
    everything = np.concatenate([raw_base[:, None], raw_views], axis=1).astype(np.float64)
    mean = everything.reshape(-1, d).mean(axis=0)
    centred_groups = everything - everything.mean(axis=1, keepdims=True)
    within = np.einsum("nvd,nve->de", centred_groups, centred_groups) / (n * v)
    within = (1 - _SHRINKAGE) * within + _SHRINKAGE * np.trace(within) / d * np.eye(d)
    evals, evecs = np.linalg.eigh(within)
    w_inv_sqrt = evecs @ np.diag(evals ** -0.5) @ evecs.T
    group_means = everything.mean(axis=1) - mean
    between = (group_means @ w_inv_sqrt).T @ (group_means @ w_inv_sqrt) / n
    b_evals, b_evecs = np.linalg.eigh(between)
    order = np.argsort(b_evals)[::-1][:dim]
    projection = w_inv_sqrt @ b_evecs[:, order]
    # a fixed sign per direction so the projection is reproducible regardless of the eigen-solver
    signs = np.sign(projection[np.abs(projection).argmax(axis=0), np.arange(projection.shape[1])])
    return mean.astype(np.float32), (projection * signs).astype(np.float32)


def _source_digest() -> str:
    """A hash of everything the fitted whitening depends on (code and constants), not of the whole file,
    so editing a docstring or the threshold does not force a refit."""
    import inspect

    parts = [
        inspect.getsource(f)
        for f in (
            _pool_matrix, _pool_stack, _pool_grids, _pool, _block, _soft_bins, _soft_bins_kernel, _wrap,
            _gradient_blocks, _downsample2,
            _standardise, _raw_descriptor, _to_pixels, _font, _colour, _background, _random_text,
            reference_images, near_duplicate, _fit_whitening, fit_reference_whitening,
        )
    ]
    constants = (WORK_SIZE, OUTPUT_DIM, _ORIENTATIONS, _HUES, _REFERENCE_IMAGES, _REFERENCE_VIEWS,
                 _REFERENCE_SEED, _SHRINKAGE, np.__version__.split(".")[0])
    parts.append(repr(constants))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _cache_dir() -> Path:
    return Path(os.environ.get("CURATION_ASSETS_CACHE", Path.home() / ".cache" / "curation_assets"))


_WHITENING: tuple[np.ndarray, np.ndarray] | None = None
_WHITENING_LOCK = threading.Lock()


def fit_reference_whitening() -> tuple[np.ndarray, np.ndarray]:
    """Generate the fixed synthetic reference set and fit the whitening on it (about a minute on one core).

    BLAS runs on one thread here: how a multi-threaded BLAS splits a product changes its rounding, and the
    near-equal eigenvalues of the fit turn a rounding difference into another basis (cosine similarities
    moved by up to 7e-4 between two fits on one machine). Single-threaded, the fit is the same every time."""
    with _single_threaded_blas():
        rng = np.random.default_rng(_REFERENCE_SEED + 1)
        base_images = reference_images(_REFERENCE_IMAGES)
        views = [[near_duplicate(im, rng) for _ in range(_REFERENCE_VIEWS)] for im in base_images]
        raw_base = raw_features(base_images)
        raw_views = raw_features([v for vs in views for v in vs]).reshape(len(base_images), _REFERENCE_VIEWS, -1)
        return _fit_whitening(raw_base, raw_views, OUTPUT_DIM)


def _load_cached(path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    try:
        with np.load(path) as data:
            return data["mean"], data["projection"]
    except (OSError, ValueError, KeyError):
        return None


def whitening() -> tuple[np.ndarray, np.ndarray]:
    """The fitted ``(mean, projection)``: from memory, from the disk cache, or fitted now and cached.

    Processes that start together (Dagster steps) serialise on a file lock so only one of them fits.
    """
    global _WHITENING
    with _WHITENING_LOCK:
        if _WHITENING is not None:
            return _WHITENING
        path = _cache_dir() / f"{ENCODER_NAME}-whitening-{_source_digest()}.npz"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            lock = open(path.with_suffix(".lock"), "a+")
        except OSError:
            lock = None
        try:
            if lock is not None:
                import fcntl

                fcntl.flock(lock, fcntl.LOCK_EX)
            _WHITENING = _load_cached(path) if path.is_file() else None
            if _WHITENING is None:
                _WHITENING = fit_reference_whitening()
                try:
                    tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
                    np.savez(tmp, mean=_WHITENING[0], projection=_WHITENING[1])
                    os.replace(tmp, path)
                except OSError:
                    pass
        finally:
            if lock is not None:
                lock.close()
        return _WHITENING


# --------------------------------------------------------------------------- encoder


def _single_threaded_blas():
    """The descriptor's matrix products are small: BLAS threads only oversubscribe the cores that the
    decoding threads already use (measured ~1.5x slower with OpenBLAS's default threading)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl ships with scikit-learn
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _normalise(x: np.ndarray) -> np.ndarray:
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return np.ascontiguousarray(x, dtype=np.float32)


def decode(data: bytes, size_hint: int = 2 * WORK_SIZE) -> Image.Image:
    """Decode image bytes upright (EXIF orientation applied); JPEGs are decoded at a reduced DCT scale when
    much larger than needed."""
    from curation_assets.core.images import upright

    image = Image.open(io.BytesIO(data))
    if image.format == "JPEG":
        image.draft("RGB", (size_hint, size_hint))
    image.load()
    return upright(image)


class PerceptualEncoder:
    """The ``perceptual-v1`` encoder: ``encode_images`` / ``encode_bytes`` -> L2-normalised float32 rows."""

    name = ENCODER_NAME
    dim = OUTPUT_DIM
    threshold = DUPLICATE_THRESHOLD

    def __init__(self, num_workers: int = 2, batch_size: int = 256):
        self.num_workers = max(1, int(num_workers))
        self.batch_size = max(1, int(batch_size))
        self._mean, self._projection = whitening()

    def project(self, raw: np.ndarray) -> np.ndarray:
        return _normalise((raw - self._mean) @ self._projection)

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        if len(images) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        with _single_threaded_blas():
            return self.project(raw_features(list(images)))

    def _encode_chunk(self, start: int, blobs: Sequence[bytes], thumbnails: bool) -> tuple[np.ndarray, list[bytes]]:
        from curation_assets.core.thumbnails import thumbnail

        pixels, thumbs = [], []
        for i, blob in enumerate(blobs):
            try:
                image = decode(blob)
                pixels.append(_to_pixels(image))
            except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError... for bad bytes
                raise ValueError(f"image {start + i} of the batch cannot be decoded: {exc}") from exc
            if thumbnails:
                thumbs.append(thumbnail(pixels[-1], *image.size))
        return _raw_descriptor(np.stack(pixels)), thumbs

    def encode_bytes(self, blobs: Sequence[bytes], thumbnails: bool = False) -> np.ndarray | tuple[np.ndarray, list[bytes]]:
        """Decode and encode; chunks run on a thread pool (PIL decoding and numpy release the GIL). With
        ``thumbnails``, also each image's verification thumbnail (:func:`~curation_assets.core.thumbnails.thumbnail`),
        made from the same decode: ``(vectors, thumbnails)``."""
        if len(blobs) == 0:
            empty = np.zeros((0, self.dim), dtype=np.float32)
            return (empty, []) if thumbnails else empty
        starts = list(range(0, len(blobs), _CHUNK))
        chunks = [blobs[i : i + _CHUNK] for i in starts]
        flags = [thumbnails] * len(chunks)
        with _single_threaded_blas():
            if self.num_workers == 1 or len(chunks) == 1:
                done = [self._encode_chunk(i, c, f) for i, c, f in zip(starts, chunks, flags)]
            else:
                with ThreadPoolExecutor(self.num_workers) as pool:
                    done = list(pool.map(self._encode_chunk, starts, chunks, flags))
            vectors = self.project(np.concatenate([raw for raw, _ in done]))
        return (vectors, [t for _, thumbs in done for t in thumbs]) if thumbnails else vectors


def encode_images(images: Sequence[Image.Image]) -> np.ndarray:
    """Convenience: ``PerceptualEncoder().encode_images(images)``."""
    return PerceptualEncoder().encode_images(images)


# --------------------------------------------------------------------------- measurement


def _singletons_to_unique(group_ids: Sequence) -> np.ndarray:
    ids = []
    for i, g in enumerate(group_ids):
        missing = g is None or (isinstance(g, float) and math.isnan(g)) or (isinstance(g, (int, np.integer)) and g < 0)
        ids.append(f"__singleton_{i}" if missing else f"g:{g}")
    _, codes = np.unique(np.array(ids, dtype=object).astype(str), return_inverse=True)
    return codes


def separation_report(
    vectors: np.ndarray,
    group_ids: Sequence,
    threshold: float = DUPLICATE_THRESHOLD,
    n_random: int = 200_000,
    seed: int = 0,
) -> dict:
    """How well one cosine threshold separates near-duplicates from distinct images.

    ``group_ids[i]`` is the duplicate group of row ``i``; ``None``, NaN or a negative integer marks a
    singleton. Every within-group pair is a positive; ``n_random`` random pairs from different groups are
    negatives. Returns pair recall (positives above the threshold), the false-positive rate (negatives
    above it), the counts behind both, similarity quantiles, and the threshold that would give a 0.1%
    false-positive rate on these negatives (for information, not for tuning against the test set).
    """
    x = np.asarray(vectors, dtype=np.float32)
    codes = _singletons_to_unique(group_ids)
    order = np.argsort(codes, kind="stable")
    sorted_codes = codes[order]
    starts = np.flatnonzero(np.r_[True, sorted_codes[1:] != sorted_codes[:-1]])
    ends = np.r_[starts[1:], len(codes)]
    pos_i, pos_j = [], []
    for s, e in zip(starts, ends):
        if e - s > 1:
            members = order[s:e]
            ii, jj = np.triu_indices(len(members), k=1)
            pos_i.append(members[ii])
            pos_j.append(members[jj])
    pos_i = np.concatenate(pos_i) if pos_i else np.zeros(0, dtype=np.int64)
    pos_j = np.concatenate(pos_j) if pos_j else np.zeros(0, dtype=np.int64)
    pos_sim = np.einsum("ij,ij->i", x[pos_i], x[pos_j]) if len(pos_i) else np.zeros(0, np.float32)

    rng = np.random.default_rng(seed)
    neg_i = np.zeros(0, dtype=np.int64)
    neg_j = np.zeros(0, dtype=np.int64)
    n = len(x)
    if n > 1 and len(starts) > 1:
        while len(neg_i) < n_random:
            need = int((n_random - len(neg_i)) * 1.2) + 16
            a = rng.integers(0, n, need)
            b = rng.integers(0, n, need)
            keep = codes[a] != codes[b]
            neg_i = np.r_[neg_i, a[keep]][:n_random]
            neg_j = np.r_[neg_j, b[keep]][:n_random]
    neg_sim = np.concatenate(
        [np.einsum("ij,ij->i", x[neg_i[s : s + 65536]], x[neg_j[s : s + 65536]]) for s in range(0, len(neg_i), 65536)]
    ) if len(neg_i) else np.zeros(0, np.float32)

    def q(values: np.ndarray, p: float) -> float | None:
        return float(np.quantile(values, p)) if len(values) else None

    n_tp = int((pos_sim > threshold).sum())
    n_fp = int((neg_sim > threshold).sum())
    return {
        "threshold": float(threshold),
        "n_vectors": int(n),
        "n_groups_with_duplicates": int(sum(1 for s, e in zip(starts, ends) if e - s > 1)),
        "n_duplicate_pairs": int(len(pos_sim)),
        "n_duplicate_pairs_above": n_tp,
        "pair_recall": n_tp / len(pos_sim) if len(pos_sim) else None,
        "n_random_pairs": int(len(neg_sim)),
        "n_random_pairs_above": n_fp,
        "false_positive_rate": n_fp / len(neg_sim) if len(neg_sim) else None,
        "duplicate_similarity": {
            "min": q(pos_sim, 0.0), "p01": q(pos_sim, 0.01), "p05": q(pos_sim, 0.05), "median": q(pos_sim, 0.5)
        },
        "random_similarity": {
            "median": q(neg_sim, 0.5), "p99": q(neg_sim, 0.99), "p999": q(neg_sim, 0.999), "max": q(neg_sim, 1.0)
        },
        "threshold_at_fpr_0.001": q(neg_sim, 0.999),
    }
