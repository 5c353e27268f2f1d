"""Pixel verification of embedding matches, for dedup and for the regurgitation audit.

An embedding search is tuned for recall; what it finds is confirmed here, on the pixels, by one of two tests
that share decoding, gradients and one calibration:

- :func:`verify_pair` (dedup, symmetric): are two images near-duplicates of each other? Structure and
  colour, below.
- :func:`containment_score` (regurgitation, one-way): does the generated image, rescaled, reappear inside the
  training image (a crop, rescale, re-encode or colour shift of it)? :class:`ContainmentSettings`.

Near-duplicates inside a training set. The embedding search (stage 1, :mod:`curation_assets.core.dedup`) is tuned for recall: at the perceptual
encoder's threshold about 0.08% of random distinct pairs score above it, mostly same-family look-alikes
(banners with the same layout but other text, the same clock at another time, similar scenes). On n images
that is ~0.0004 n^2 false pairs against O(n) true ones, and connected components chain them into large
false groups. Verification reads both images back and asks two questions a near-duplicate must pass:

1. **Structure.** Both images are resized to ``width`` px (aspect kept) and their gradient magnitudes
   (after a small Gaussian blur) are compared. The central ``crop_fraction`` of one image is searched in the
   other over ``scales`` relative scales in [min_scale, max_scale] and all offsets (OpenCV
   ``matchTemplate``, normalised cross-correlation), in both directions; this absorbs crops keeping >= 80%
   of the area and resizes. At the best alignment the template is split into ``cells x cells`` cells and
   each cell's contrast-normalised gradient difference is measured; the structure score is 1 minus the
   second-worst cell's difference (one cell may hold a stamped logo). Different text, a moved clock hand or
   another scene changes some cell a lot, while JPEG, brightness and contrast change none.
2. **Colour.** At the same alignment, the blurred RGB pixels of one image must follow the other's through
   one gain (0.6-1.6) and offset shared by all three channels (what brightness and contrast changes do);
   the colour residual is the RMS error (0-255 units) of the best 95% of pixels. A palette change (navy vs
   blue banner) needs a different gain per channel and fails.

Calibration (one procedure, :func:`calibrate`): every threshold here is the 5% quantile (the colour
residual's 95%) of the scores of positive pairs made by the perceptual encoder's own near-duplicate
transforms on its synthetic reference scenes (:func:`calibration_pairs`, seed :data:`CALIBRATION_SEED`),
never of the data being verified; distinct reference scenes are scored beside them, and the pass rates of
both at the configured thresholds are reported. ``bench/bench_audits.py`` records the full report.
"""

from __future__ import annotations

import io
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

CALIBRATION_SEED = 4242
"""Seed of the calibration scenes: not the encoder's whitening set and not a demo corpus."""

STRUCTURE_THRESHOLD = 0.56
"""Structure score a near-duplicate must reach: the 5% quantile of the positives of ``calibrate()``
(n=300, seed 4242, at the default settings: measured 0.564), rounded down. The low tail is set by the
encoder's largest stamps (text up to about half the width), which to a structural test look like other text."""

COLOUR_THRESHOLD = 7.1
"""Colour residual (0-255 units) a near-duplicate must not exceed: the 95% quantile of the same
positives (measured 7.02), rounded up. At both defaults 91% of calibration positives and 0 of 300 distinct
scene pairs pass (highest distinct structure score 0.66, median 0.16); ~95 pairs verified per second."""


@dataclass(frozen=True)
class VerifySettings:
    """The ``dedup.verify`` config section. ``enabled`` None means "auto": on for perceptual encoders (whose
    threshold admits same-layout look-alikes), off otherwise."""

    enabled: bool | None = None
    structure_threshold: float = STRUCTURE_THRESHOLD
    colour_threshold: float = COLOUR_THRESHOLD
    width: int = 128
    crop_fraction: float = 0.7
    min_scale: float = 0.86
    max_scale: float = 1.16
    scales: int = 11
    blur: float = 0.7
    cells: int = 4
    workers: int = 2

    @classmethod
    def from_section(cls, section: Mapping[str, Any] | None) -> "VerifySettings":
        section = dict(section or {})
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(section) - known)
        if unknown:
            raise ValueError(f"dedup config: unknown keys {unknown} under 'verify'; known: {sorted(known)}")
        enabled = section.get("enabled", "auto")
        if enabled in (None, "auto"):
            enabled = None
        elif not isinstance(enabled, bool):
            raise ValueError(f"dedup config: verify.enabled must be true, false or auto, got {enabled!r}")
        d = cls()

        def num(key: str, lo: float, hi: float, integer: bool = False):
            v = section.get(key, getattr(d, key))
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi or (integer and v != int(v)):
                raise ValueError(f"dedup config: verify.{key} must be a{'n integer' if integer else ' number'} "
                                 f"in [{lo}, {hi}], got {v!r}")
            return int(v) if integer else float(v)

        out = cls(enabled=enabled, structure_threshold=num("structure_threshold", -1.0, 1.0),
                  colour_threshold=num("colour_threshold", 0.0, 255.0), width=num("width", 32, 1024, True),
                  crop_fraction=num("crop_fraction", 0.3, 1.0), min_scale=num("min_scale", 0.2, 1.0),
                  max_scale=num("max_scale", 1.0, 5.0), scales=num("scales", 1, 101, True),
                  blur=num("blur", 0.0, 5.0), cells=num("cells", 1, 16, True), workers=num("workers", 1, 64, True))
        return out

    def version(self) -> str:
        """A digest of everything that decides a verdict (not ``workers``, not ``enabled``): verdicts stored
        under the same version for the same two images need not be computed again."""
        import hashlib
        import json

        decisive = {k: v for k, v in self.__dict__.items() if k not in ("workers", "enabled")}
        return "verify-" + hashlib.sha256(json.dumps(decisive, sort_keys=True).encode()).hexdigest()[:12]

    def active(self, encoder_name: str | None) -> bool:
        if self.enabled is not None:
            return self.enabled
        return (encoder_name or "").lower().startswith("perceptual")


@dataclass(frozen=True)
class Verification:
    """Scores of one pair: ``structure`` (higher = more alike, -1 if undecodable), ``colour_residual``
    (lower = more alike), ``alignment_ncc`` (the global gradient correlation at the chosen alignment)."""

    structure: float
    colour_residual: float
    alignment_ncc: float

    def passes(self, cfg: VerifySettings) -> bool:
        return self.structure >= cfg.structure_threshold and self.colour_residual <= cfg.colour_threshold


_FAILED = Verification(-1.0, 255.0, -1.0)


def _decode_gray(data: bytes) -> np.ndarray | None:
    import cv2

    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
    return None if arr is None else arr.astype(np.float32)


def _decode(data: bytes) -> np.ndarray | None:
    """BGR float pixels as displayed (OpenCV's IMREAD_COLOR applies the EXIF orientation)."""
    import cv2

    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if arr is None or min(arr.shape[:2]) < 8:
        return None
    return arr.astype(np.float32)


def _resize_width(x: np.ndarray, width: int) -> np.ndarray:
    import cv2

    height = max(8, int(round(width * x.shape[0] / x.shape[1])))
    return cv2.resize(x, (width, height), interpolation=cv2.INTER_AREA)


def _sobel(gray: np.ndarray, blur: float) -> tuple[np.ndarray, np.ndarray]:
    """Signed x and y gradients (3x3 Sobel) of a grey image after a Gaussian blur of ``blur`` px."""
    import cv2

    if blur > 0:
        gray = cv2.GaussianBlur(gray, (0, 0), blur)
    return cv2.Sobel(gray, cv2.CV_32F, 1, 0, ksize=3), cv2.Sobel(gray, cv2.CV_32F, 0, 1, ksize=3)


def _magnitude(gray: np.ndarray, blur: float) -> np.ndarray:
    import cv2

    return cv2.magnitude(*_sobel(gray, blur))


def _gradient(colour: np.ndarray, blur: float) -> np.ndarray:
    """``(H, W, 3)``: gradient magnitude, then the signed x and y gradients of the blurred grey image."""
    import cv2

    gx, gy = _sobel(cv2.cvtColor(colour, cv2.COLOR_BGR2GRAY), blur)
    return np.dstack([cv2.magnitude(gx, gy), gx, gy])


def _cell_score(t: np.ndarray, r: np.ndarray, cells: int) -> float:
    """1 - the second-largest per-cell normalised difference of two aligned signed-gradient fields
    ``(H, W, 2)``: near 0 for the same picture, near 1 where the content differs (unrelated edges do not
    cancel), so other text or another hand position makes some cell differ."""
    tn = t / (np.sqrt(float((t * t).sum(axis=2).mean())) + 1e-6)
    rn = r / (np.sqrt(float((r * r).sum(axis=2).mean())) + 1e-6)
    ys = np.linspace(0, t.shape[0], cells + 1).astype(int)
    xs = np.linspace(0, t.shape[1], cells + 1).astype(int)
    diffs = []
    for i in range(cells):
        for j in range(cells):
            ct, cr = tn[ys[i]:ys[i + 1], xs[j]:xs[j + 1]], rn[ys[i]:ys[i + 1], xs[j]:xs[j + 1]]
            # the +0.5 floor (mean cell energy is 1) keeps flat cells, where noise dominates, from deciding
            diffs.append(float(((ct - cr) ** 2).mean()) / (float((ct * ct).mean() + (cr * cr).mean()) + 0.5))
    diffs.sort()
    return 1.0 - (diffs[-2] if len(diffs) > 1 else diffs[-1])


def _colour_residual(a: np.ndarray, b: np.ndarray) -> float:
    import cv2

    xa = cv2.GaussianBlur(a, (0, 0), 2.0).reshape(-1).astype(np.float64)
    xb = cv2.GaussianBlur(b, (0, 0), 2.0).reshape(-1).astype(np.float64)
    va = xa.var()
    gain = float(np.clip(((xa - xa.mean()) * (xb - xb.mean())).mean() / va, 0.6, 1.6)) if va > 1e-6 else 1.0
    res = np.abs(xb - gain * xa - float(np.mean(xb - gain * xa)))
    kept = np.sort(res)[: max(1, int(0.95 * len(res)))]
    return float(np.sqrt(np.mean(kept ** 2)))


def _one_way(a: np.ndarray, b: np.ndarray, cfg: VerifySettings) -> tuple[float, float, float]:
    """Search the centre of ``a`` inside ``b`` over scales; (ncc, structure, colour residual) at the best."""
    import cv2

    ca = _resize_width(a, cfg.width)
    ga = _gradient(ca, cfg.blur)
    h, w = ga.shape[:2]
    th, tw = max(8, int(round(h * cfg.crop_fraction))), max(8, int(round(w * cfg.crop_fraction)))
    y0, x0 = (h - th) // 2, (w - tw) // 2
    fields = ga[y0:y0 + th, x0:x0 + tw, 1:]
    template = np.ascontiguousarray(ga[y0:y0 + th, x0:x0 + tw, 0])
    if float(template.std()) == 0.0:
        template = template + np.random.default_rng(0).normal(0, 1e-3, template.shape).astype(np.float32)
    best_ncc, best = -2.0, None
    for s in np.linspace(cfg.min_scale, cfg.max_scale, cfg.scales):
        cb = _resize_width(b, max(8, int(round(cfg.width * s))))
        gb = _gradient(cb, cfg.blur)
        if gb.shape[0] < th or gb.shape[1] < tw:
            continue
        _, ncc, _, (x, y) = cv2.minMaxLoc(cv2.matchTemplate(np.ascontiguousarray(gb[:, :, 0]), template,
                                                             cv2.TM_CCOEFF_NORMED))
        if ncc > best_ncc:
            best_ncc, best = ncc, (gb[y:y + th, x:x + tw, 1:], cb[y:y + th, x:x + tw])
    if best is None:
        return -1.0, -1.0, 255.0
    return (float(best_ncc), _cell_score(fields, best[0], cfg.cells),
            _colour_residual(ca[y0:y0 + th, x0:x0 + tw], best[1]))


def verify_pair(a: bytes, b: bytes, cfg: VerifySettings | None = None) -> Verification:
    """Structure and colour scores of two encoded images (see the module docstring); symmetric up to the
    choice of direction, which takes the better-aligned of "centre of a in b" and "centre of b in a"."""
    cfg = cfg or VerifySettings()
    xa, xb = _decode(a), _decode(b)
    if xa is None or xb is None:
        return _FAILED
    r1, r2 = _one_way(xa, xb, cfg), _one_way(xb, xa, cfg)
    ncc, structure, colour = r1 if r1[0] >= r2[0] else r2
    return Verification(structure, colour, ncc)


def verify_pairs(pairs: Sequence[tuple[bytes, bytes]], cfg: VerifySettings | None = None) -> list[Verification]:
    """:func:`verify_pair` over many pairs on ``cfg.workers`` threads (OpenCV releases the GIL)."""
    cfg = cfg or VerifySettings()
    if cfg.workers <= 1 or len(pairs) < 8:
        return [verify_pair(a, b, cfg) for a, b in pairs]
    with ThreadPoolExecutor(cfg.workers) as pool:
        return list(pool.map(lambda p: verify_pair(p[0], p[1], cfg), pairs))


# --------------------------------------------------------------------------- containment (regurgitation)


@dataclass(frozen=True)
class ContainmentSettings:
    """Pixel-level verification of embedding matches (retrieval + verification, as in copy detection).

    A weight-free encoder pools features over coarse cells, so two different pictures drawn from one
    template (the same banner layout with other words, the same beach with another person) can be as
    close as a real copy. A copy, though, is a crop, rescale, re-encode or colour shift of its source, so
    the generated image, rescaled, reappears somewhere inside the training image: the verifier searches
    ``scales`` (generated width as a fraction of the training width, down to ``min_scale``) for the best
    normalised cross-correlation of gradient magnitudes at ``width`` px. ``threshold`` applies to that
    score. Its default 0.78 was set as the 5% quantile of such copies on 300 reference scenes (seed 7);
    :func:`calibrate` (150 copies, seed 4242) measures 96% of copies at or above it, 5% quantile 0.85, 1%
    quantile 0.68 (the largest stamps), and no distinct scene pair above 0.50."""

    enabled: bool = True
    threshold: float = 0.78
    width: int = 128
    min_scale: float = 0.7
    scales: int = 13
    blur: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 < self.min_scale <= 1.0 or self.scales < 1 or self.width < 32:
            raise ValueError("verify: need 0 < min_scale <= 1, scales >= 1, width >= 32")


def containment_score(generated: bytes, training: bytes, config: ContainmentSettings | None = None) -> float:
    """Best gradient NCC of the (rescaled) generated image inside the training image; -1 if either does
    not decode. Near 1 for a crop / rescale / re-encode / colour shift of the training image."""
    import cv2

    config = config or ContainmentSettings()
    g, t = _decode_gray(generated), _decode_gray(training)
    if g is None or t is None or min(g.shape) < 4 or min(t.shape) < 4:
        return -1.0
    # never upsample the generated image much: its own width bounds the detail both can share
    width = int(min(config.width, t.shape[1], max(32, g.shape[1])))
    t = cv2.resize(t, (width, max(4, int(round(width * t.shape[0] / t.shape[1])))), interpolation=cv2.INTER_AREA)
    tg = _magnitude(t, config.blur)
    best = -1.0
    for scale in np.linspace(config.min_scale, 1.0, config.scales):
        w = int(round(width * scale))
        h = int(round(w * g.shape[0] / g.shape[1]))
        if h > t.shape[0] or w > t.shape[1] or h < 8 or w < 8:
            continue
        gi = _magnitude(cv2.resize(g, (w, h), interpolation=cv2.INTER_AREA), config.blur)
        if float(gi.std()) == 0.0:
            continue
        best = max(best, float(cv2.matchTemplate(tg, gi, cv2.TM_CCOEFF_NORMED).max()))
    return best


# --------------------------------------------------------------------------- calibration


def _jpeg(image, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def calibration_pairs(n: int = 300, seed: int = CALIBRATION_SEED, size: int = 256
                      ) -> tuple[list[tuple[bytes, bytes]], list[tuple[bytes, bytes]]]:
    """Positive pairs from the perceptual encoder's own transforms and negative pairs of distinct scenes.

    Half the positives are (scene, near_duplicate(scene)), half are two independent near-duplicates of one
    scene (both sides transformed, as between two planted copies), with ``near_duplicate``'s default random
    transforms. Negatives pair each scene with the next one."""
    from curation_assets.core.perceptual import near_duplicate, reference_images

    rng = np.random.default_rng(seed)
    scenes = reference_images(n + 1, seed=seed, size=size)
    positives = []
    for i, im in enumerate(scenes[:n]):
        first = near_duplicate(im, rng) if i % 2 else im
        second = near_duplicate(im, rng)
        positives.append((_jpeg(first), _jpeg(second)))
    negatives = [(_jpeg(scenes[i]), _jpeg(scenes[i + 1])) for i in range(n)]
    return positives, negatives


def calibrate(n: int = 300, seed: int = CALIBRATION_SEED, quantile: float = 0.05,
              cfg: VerifySettings | None = None, containment: ContainmentSettings | None = None) -> dict[str, Any]:
    """The one calibration of both verifiers, on :func:`calibration_pairs` (synthetic scenes, never the data
    verified). Pair verification: the structure threshold is the ``quantile`` of the positives' structure
    scores and the colour threshold the ``1 - quantile`` quantile of their colour residuals. Containment: the
    ``quantile`` of :func:`containment_score` over the positives whose first image is the untouched scene
    (every other pair: the copy searched inside its original, as the audit searches a generated image). For each, the pass rates of positives and negatives at the calibrated values and at the
    configured defaults are reported, with the throughput."""
    cfg = cfg or VerifySettings()
    containment = containment or ContainmentSettings()
    positives, negatives = calibration_pairs(n, seed)
    started = time.perf_counter()
    pos = verify_pairs(positives, cfg)
    neg = verify_pairs(negatives, cfg)
    seconds = time.perf_counter() - started
    ps = np.array([v.structure for v in pos])
    pc = np.array([v.colour_residual for v in pos])
    ns = np.array([v.structure for v in neg])
    nc = np.array([v.colour_residual for v in neg])
    t_s, t_c = float(np.quantile(ps, quantile)), float(np.quantile(pc, 1 - quantile))
    cp = np.array([containment_score(b, a, containment) for a, b in positives[::2]])  # copies of an original
    cn = np.array([containment_score(b, a, containment) for a, b in negatives])
    t_n = float(np.quantile(cp, quantile))
    return {
        "n": n, "seed": seed, "quantile": quantile,
        "structure_threshold": t_s, "colour_threshold": t_c,
        "positive_pass_rate": float(np.mean((ps >= t_s) & (pc <= t_c))),
        "negative_pass_rate": float(np.mean((ns >= t_s) & (nc <= t_c))),
        "positive_pass_rate_at_defaults": float(np.mean((ps >= cfg.structure_threshold) & (pc <= cfg.colour_threshold))),
        "negative_pass_rate_at_defaults": float(np.mean((ns >= cfg.structure_threshold) & (nc <= cfg.colour_threshold))),
        "positive_structure": {"p01": float(np.quantile(ps, 0.01)), "median": float(np.median(ps))},
        "negative_structure": {"median": float(np.median(ns)), "max": float(ns.max())},
        "pairs_per_second": 2 * n / seconds,
        "containment": {
            "threshold": t_n,
            "positive": {"p01": float(np.quantile(cp, 0.01)), "median": float(np.median(cp))},
            "negative": {"median": float(np.median(cn)), "max": float(cn.max())},
            "positive_pass_rate_at_default": float(np.mean(cp >= containment.threshold)),
            "negative_pass_rate_at_default": float(np.mean(cn >= containment.threshold)),
        },
    }
