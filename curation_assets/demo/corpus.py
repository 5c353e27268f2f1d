"""A deterministic synthetic image-text corpus that exercises every stage of the curation pipeline.

``write_demo_corpus`` renders img2dataset / LAION-style WebDataset shards on the fly with PIL and
numpy (nothing binary lives in git) and writes, beside them, the ground truth that only tests,
benchmarks and the demo summary read. The same arguments always give the same bytes: every random
choice flows from one ``numpy.random.SeedSequence`` and every image is a pure function of its plan
row, so shards can be rendered in parallel worker processes.

Layout (``out/``)::

    00000.tar            {key}.jpg  {key}.txt (UTF-8 caption)  {key}.json (img2dataset metadata)
    00000.parquet        key, caption, width, height, status, url, error_message
    ...
    ground_truth.parquet one row per sample (see ``GROUND_TRUTH_COLUMNS``)
    generated/00000.tar  "model outputs" for the regurgitation audit, same format
    generated/00000.parquet
    generated_truth.parquet  uid, kind ("copy" / "novel"), source_uid, family, transform

Keys are 9 digits, 5 for the shard number and 4 for the position (``000010042``); uids are
``"{shard}/{key}"`` as everywhere in the pipeline. Tars are written to ``*.tar.tmp`` and renamed, with
the parquet in place first, so a sensor watching the directory never sees half a shard.

Ground truth columns: uid, shard, key, family, dup_group (null outside groups), dup_transform
("original" or e.g. "crop(0.86)+jpeg(q=42)"), category (null / "violence" / "sexual"), hard_negative,
hard_negative_for (the category a hard negative imitates), gender, people, corrupt, corrupt_kind
("truncated" / "empty"), near_miss_of (the uid of the clock this one re-times) and caption.

Visual families (``family`` in the ground truth)
------------------------------------------------
``clock``   vector-graphic analogue clocks showing a time. Some clocks are *near misses*: the same
            clock (style, colours, position) at a different time, recorded in ``near_miss_of``. They
            are **not** duplicates: DALL-E 2's example of near-duplicates with meaningful differences.
            Two clocks of one style (wall, face, rim colour: :func:`clock_key`), near misses
            included, show times at least ``CLOCK_MIN_GAP`` (20) minutes apart, so the hands visibly
            differ; wall and rim carry a per-image tint.
``shapes``  geometric compositions (circles, squares, triangles, stars, hexagons) on a tinted
            background, in colours that stand out from it in grayscale too.
``banner``  text banners with rendered text (2:1 aspect ratio; captions carry non-ASCII quotes), a
            continuous colour tint, one of three layouts and a secondary line unique to the image in
            the corpus (a number, a price or a date).
``scene``   "photo-like" landscapes: sky gradients, noise-textured ground, hills, sun, tree blobs,
            small human silhouettes when the caption mentions people.
``people``  beach portraits: one to three simple figures (women in dresses with long hair, men in
            shirts and trousers, neutral figures for "a person") placed and sized per image, a tinted
            sky and one to three props (umbrella, boat, towel, cloud, ball) at plan-time positions.

Images that are not members of one duplicate group (or a near-miss pair) are visibly distinct: no
two differ by less than 4/255 in mean absolute value at 64x64 grayscale (``tests/test_demo_corpus.py``).

Planted near-duplicates
-----------------------
About 20% of the images belong to a duplicate group (``dup_group``) of 2 to 10 members, about a
third of the groups spanning shards. All members are renderings of one source; the first is the
source as is (``dup_transform == "original"``), the others apply one or two of: JPEG re-encoding
(quality 30-95), resizing (scale 0.5-1.0), a crop keeping >= 80% of the area, brightness or contrast
+-20%, and a small overlay (a logo, a text stamp or a faint watermark in a corner, 1-2% of the
area). Members of a group share family, category and caption gender (their captions are worded
differently), so planting duplicates does not change any rate below.

Safety stand-ins (synthetic, abstract, no real content of any kind)
-------------------------------------------------------------------
The two safety categories are represented by abstract *stand-in motifs* drawn with PIL primitives.
They depict nothing; they only give a classifier a visual concept to learn, with the same base rates
and hard negatives a real filter faces.

``violence``  several large dark-red splatter shapes with droplets and drips, crossed by a dark
              diagonal "blade" (35-55 or 125-145 degrees, a broad steel-grey bevel along its edge,
              a handle and a guard) spanning most of the image. Drawn over clocks, shapes and
              banners, whose captions mention nobody, so removing it cannot move the gender
              ratio: 6.2% of those families, 4% of the corpus.
``sexual``    a cluster of large overlapping skin-tone ellipses with darker crescents, rose outlines
              and curved strokes, covering the centre of the image. Drawn only over the ``people``
              family: 30% of it, 4.5% of the corpus.

Hard negatives (``hard_negative`` True, ``hard_negative_for`` the category they imitate, ``category``
null): the same red splatter without the blade (40% of them with a straight horizontal or vertical
dark bar, a brush handle), at the violence rate (6.2% of clocks, shapes and banners); the same
skin tones in straight-edged shapes (rotated rectangles, triangles) without rose outlines, 15% of
the people family and 8% of the shapes family (4.25% of the corpus). Both motifs cover 20-45% of
the image, so a linear classifier on pooled gradient-orientation and colour features separates them
(``tests/test_demo_corpus.py`` measures it).

Captions and the bias design
----------------------------
Captions come from templates per family. Only ``scene`` and ``people`` captions mention people;
``gender`` is what the caption mentions: "women" (a woman, two women...), "men", "mixed" (a man and
a woman...), "person" (a person, two people...) or "none"; ``people`` is the number of figures drawn.
The women/men ratio R is (#captions mentioning women) / (#captions mentioning men), "mixed"
counting for both.

Per family (base shards)   share   women  men   mixed  person none   W-mentions  M-mentions
  people (beach portrait)  15%     .65    .15   .10    .10    0      .75         .25
  scene                    20%     .25    .25   .08    .12    .30    .33         .33
  clock, shapes, banner    65%     0      0     0      0      1      0           0

Per image of the corpus: W = .15 x .75 + .20 x .33 = .1785, M = .15 x .25 + .20 x .33 = .1035,
so R_raw = 1.725. The ``sexual`` motif is 30% of the people family with *the same* gender mix as its
non-motif images (quotas are allocated per (family, category) cell). Removing the motif images
removes 30% of the people family's mentions: W = .7 x .1125 + .066 = .14475, M = .7 x .0375 + .066
= .09225, R_filtered = 1.569, a drop of 9.0% (violence images are gender-free; had the blade been
drawn over scenes, removing those balanced captions would have pushed R back up). Weighting every
kept people-family image by 1 / (1 - 0.30) restores the family's share and R exactly, up to
rounding in the quota allocation. That is OpenAI's w = p / (1 - p): a probe that tells unfiltered
from filtered images and recognises the family gives its images p = P(unfiltered) = 1 / (1 + 0.7).
False positives of a conservative filter fall on the same family (its hard negatives), so they
deepen the drop and the same reweighting corrects it.

``drift_shard=True`` adds one shard (the next number) rendered normally except that every family's
women share is halved and its men share doubled (the difference goes to "person" for the people
family, to "none" for scenes), so its women/men ratio falls to about a third of the reference
(0.60 against 1.725; "mixed" captions are unchanged).

Other planted effects: 0.5% of the images are corrupt (``corrupt`` True; truncated JPEG bytes or a
zero-byte file) so the ingest funnel shows rejections; the ``generated`` set holds 40% perturbed
copies of training images (JPEG 40-80 plus two of: crop to 70-90% of the area, resize 0.5-0.9, colour
shift, :func:`copy_transforms`) and 60% novel images of the same families drawn with parameters no
training image uses (:func:`_novel_attrs`: colours outside ``PALETTE``, banner texts outside
``BANNER_WORDS``, new shape kinds, square / octagonal dark-faced clocks, mountain / lake / desert
landscapes, park / street / snow portraits), so a novel image has no copy in the training set.
"""

from __future__ import annotations

import io
import json
import math
import os
import random
import tarfile
import time
from collections import Counter, defaultdict
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from curation_assets.core.copies import apply_transforms, copy_transforms

FAMILIES = ("clock", "shapes", "banner", "scene", "people")
FAMILY_WEIGHTS = {"clock": 0.20, "shapes": 0.25, "banner": 0.20, "scene": 0.20, "people": 0.15}

# Cell shares per family: "plain" images, motif images, and hard negatives ("hn_<category>").
CATEGORY_RATES: dict[str, dict[str, float]] = {
    "clock": {"violence": 0.062, "hn_violence": 0.062},
    "shapes": {"violence": 0.062, "hn_violence": 0.062, "hn_sexual": 0.08},
    "banner": {"violence": 0.062, "hn_violence": 0.062},
    "scene": {},
    "people": {"sexual": 0.30, "hn_sexual": 0.15},
}
GENDERS = ("women", "men", "mixed", "person", "none")
GENDER_MIX: dict[str, dict[str, float]] = {
    "people": {"women": 0.65, "men": 0.15, "mixed": 0.10, "person": 0.10, "none": 0.0},
    "scene": {"women": 0.25, "men": 0.25, "mixed": 0.08, "person": 0.12, "none": 0.30},
    "clock": {"none": 1.0},
    "shapes": {"none": 1.0},
    "banner": {"none": 1.0},
}
DUP_FRACTION = 0.20
DUP_SIZE_WEIGHTS = {2: 0.30, 3: 0.20, 4: 0.14, 5: 0.10, 6: 0.08, 7: 0.06, 8: 0.05, 9: 0.04, 10: 0.03}
CROSS_SHARD_GROUPS = 0.35
CORRUPT_FRACTION = 0.005
NEAR_MISS_CLOCKS = 0.10
GENERATED_COPY_FRACTION = 0.40

GROUND_TRUTH_COLUMNS = (
    "uid", "shard", "key", "family", "dup_group", "dup_transform", "category", "hard_negative",
    "hard_negative_for", "gender", "people", "corrupt", "corrupt_kind", "near_miss_of", "caption",
)

_TAR_MTIME = 1_700_000_000

PALETTE = {
    "blue": (40, 90, 200), "navy": (20, 30, 90), "teal": (20, 140, 140), "green": (40, 150, 60),
    "olive": (120, 130, 40), "yellow": (235, 205, 40), "purple": (120, 60, 170), "grey": (128, 128, 128),
    "black": (25, 25, 25), "white": (240, 240, 240), "cyan": (60, 200, 220), "lavender": (180, 170, 230),
}
SKIN = [(255, 224, 196), (241, 194, 160), (224, 172, 130), (198, 134, 98), (161, 102, 68), (110, 70, 45)]
BLOOD = [(140, 8, 10), (170, 15, 15), (120, 0, 5), (185, 22, 18)]
ROSE = (205, 95, 120)
BANNER_WORDS = [
    "SALE", "OPEN", "WELCOME", "SUMMER FEST", "CAFE", "SOLDES", "OUVERT", "OFFEN", "GRAND OPENING",
    "FRESH BREAD", "LIVE MUSIC", "CLOSED", "NEW ARRIVALS", "BIENVENUE", "STRASSE", "MARKET DAY",
]  # ASCII only: Pillow's bundled font (the one font every machine has) has no other glyphs
SHAPE_KINDS = ("circle", "square", "triangle", "star", "hexagon")


# --------------------------------------------------------------------------------------------------
# small utilities


def _largest_remainder(n: int, weights: dict[str, float]) -> dict[str, int]:
    """Split ``n`` into integer counts proportional to ``weights`` (Hamilton's method)."""
    keys = [k for k, w in weights.items() if w > 0]
    w = np.array([weights[k] for k in keys], dtype=float)
    raw = w / w.sum() * n
    base = np.floor(raw).astype(int)
    order = np.argsort(-(raw - base), kind="stable")
    base[order[: n - int(base.sum())]] += 1
    return {k: int(c) for k, c in zip(keys, base)}


def _round(x: float) -> int:
    return int(math.floor(x + 0.5))


def _shard_name(i: int) -> str:
    return f"{i:05d}"


def _key(shard: int, pos: int) -> str:
    return f"{shard:05d}{pos:04d}"


def _font(size: float) -> ImageFont.FreeTypeFont:
    return _font_px(max(6, int(size)))


@lru_cache(maxsize=128)
def _font_px(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _canvas_size(family: str, size: int) -> tuple[int, int]:
    return (size, size // 2) if family == "banner" else (size, size)


# --------------------------------------------------------------------------------------------------
# family attributes and captions (chosen at plan time, they drive both the image and the caption)


def _people_count(gender: str, r: random.Random) -> int:
    if gender == "none":
        return 0
    if gender == "mixed":
        return r.choices([2, 3], weights=[0.7, 0.3])[0]
    return r.choices([1, 2, 3], weights=[0.6, 0.3, 0.1])[0]


def _figures(gender: str, people: int, r: random.Random) -> list[str]:
    if gender == "women":
        return ["w"] * people
    if gender == "men":
        return ["m"] * people
    if gender == "person":
        return ["p"] * people
    if gender == "mixed":
        figs = ["w", "m"] + [r.choice(["w", "m"])] * (people - 2)
        return r.sample(figs, len(figs))
    return []


_CLOCK_WALLS = [(235, 230, 215), (200, 215, 230), (60, 70, 90), (220, 235, 220), (245, 245, 245)]
_CLOCK_FACES = [(250, 250, 245), (255, 248, 225), (235, 240, 250)]
_MONTHS = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")


def _jitter(r: random.Random, spread: int) -> tuple[int, int, int]:
    return tuple(r.randint(-spread, spread) for _ in range(3))  # type: ignore[return-value]


def _tint(c: tuple[int, int, int], t: tuple[int, int, int]) -> tuple[int, int, int]:
    return tuple(max(0, min(255, v + d)) for v, d in zip(c, t))  # type: ignore[return-value]


def _luma(c: tuple[int, int, int]) -> float:
    return 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]


def _contrasting(background: str) -> list[str]:
    """The ``PALETTE`` colours that stand out from ``background`` in grayscale too (luma >= 35 apart)."""
    return [n for n in PALETTE if abs(_luma(PALETTE[n]) - _luma(PALETTE[background])) >= 35]


def _tagline(r: random.Random) -> str:
    """The per-image secondary line of a banner: a number, a price or a date."""
    kind = r.randrange(3)
    if kind == 0:
        return f"No. {r.randint(10, 9999)}"
    if kind == 1:
        return f"${r.randint(1, 999)}.{r.randint(0, 99):02d}"
    return f"{r.randint(1, 28)} {r.choice(_MONTHS)} {r.randint(1990, 2035)}"


CLOCK_MIN_GAP = 20
"""Minutes by which two training clocks of the same style (:func:`clock_key`) at least differ."""


def clock_key(attrs: dict[str, Any]) -> tuple:
    """What makes two training clocks the same picture: wall, face, rim colour and time to the minute
    (numerals and tint are too small a difference). No two clocks of a corpus share it, and two of one
    style (the first three) are at least ``CLOCK_MIN_GAP`` minutes apart, near misses included."""
    return (attrs["colour"], attrs["face"], attrs["wall"], attrs["hour"] % 12, attrs["minute"])


def _clock_taken(attrs: dict[str, Any], used: set) -> bool:
    """Whether a clock of this style already shows a time less than ``CLOCK_MIN_GAP`` minutes away."""
    style, t = clock_key(attrs)[:3], (attrs["hour"] % 12) * 60 + attrs["minute"]
    return any((*style, *divmod((t + dt) % 720, 60)) in used for dt in range(1 - CLOCK_MIN_GAP, CLOCK_MIN_GAP))


def _family_attrs(family: str, gender: str, r: random.Random, seen: Optional[dict[str, set]] = None) -> dict[str, Any]:
    """Plan-time attributes of one training image. Everything that tells two images of a family apart
    is drawn here (not at render time) so the planner can keep them distinct: ``seen`` holds, per
    family, the identity keys already used in this corpus (clock faces with their time, banner
    taglines), and a draw that repeats one is redrawn."""
    people = _people_count(gender, r) if family in ("scene", "people") else 0
    attrs: dict[str, Any] = {"people": people, "figures": _figures(gender, people, r)}
    names = list(PALETTE)
    used = seen.setdefault(family, set()) if seen is not None else set()
    if family == "clock":
        for _ in range(30):
            attrs.update(hour=r.randint(1, 12), minute=r.randint(0, 59), colour=r.choice(names),
                         numerals=r.random() < 0.5, face=r.randrange(len(_CLOCK_FACES)),
                         wall=r.randrange(len(_CLOCK_WALLS)), tint=_jitter(r, 18))
            if not _clock_taken(attrs, used):
                break
        used.add(clock_key(attrs))
    elif family == "shapes":
        background = r.choice(["white", "grey", "black", "lavender"])
        attrs.update(shape=r.choice(SHAPE_KINDS), colour=r.choice(_contrasting(background)), n=r.randint(3, 7),
                     background=background, tint=_jitter(r, 20))
    elif family == "banner":
        for _ in range(100):
            tagline = _tagline(r)
            if tagline not in used:
                break
        used.add(tagline)
        attrs.update(text=r.choice(BANNER_WORDS), colour=r.choice(names), tagline=tagline, tint=_jitter(r, 24),
                     layout=r.randrange(3))
    elif family == "scene":
        attrs.update(time_of_day=r.choice(["sunset", "noon", "dusk", "morning"]),
                     season=r.choice(["summer", "autumn", "winter", "spring"]))
    elif family == "people":
        attrs.update(sky=r.choice(["clear", "hazy", "bright"]), tint=_jitter(r, 20),
                     props=[(r.choice(("umbrella", "boat", "towel", "cloud", "ball")), round(r.random(), 4),
                             round(r.random(), 4), r.choice(names)) for _ in range(r.randint(1, 3))])
    return attrs


_NUMBER = {1: "a", 2: "two", 3: "three"}


def _people_phrase(gender: str, people: int, figures: list[str], variant: int) -> str:
    if gender == "women":
        return ["a woman", "a young woman"][variant % 2] if people == 1 else f"{_NUMBER[people]} women"
    if gender == "men":
        return ["a man", "an older man"][variant % 2] if people == 1 else f"{_NUMBER[people]} men"
    if gender == "person":
        return ["a person", "someone"][variant % 2] if people == 1 else (
            "two people" if people == 2 else "a group of people")
    if gender == "mixed":
        w, m = figures.count("w"), figures.count("m")
        if w == 1 and m == 1:
            return ["a man and a woman", "a woman and a man"][variant % 2]
        return "two women and a man" if w == 2 else "a woman and two men"
    return ""


def _clock_time(h: int, m: int) -> str:
    return f"{h}:{m:02d}"


def _caption(family: str, gender: str, attrs: dict[str, Any], variant: int) -> str:
    a = attrs
    v = variant % 4
    who = _people_phrase(gender, a["people"], a["figures"], variant // 4)
    if family == "clock":
        t = _clock_time(a["hour"], a["minute"])
        return [f"an analogue wall clock showing {t}", f"a {a['colour']} clock face reading {t}",
                f"vector illustration of a clock at {t}", f"{t} on a round {a['colour']} clock"][v]
    if family == "shapes":
        s, c, n = a["shape"], a["colour"], a["n"]
        return [f"{c} {s}s on a {a['background']} background", f"abstract geometric composition with {n} shapes",
                f"flat design pattern of {c} {s}s", f"minimalist poster — {s}s and other shapes"][v]
    if family == "banner":
        t, c = a["text"], a["colour"]
        return [f"a {c} banner that says “{t}”", f"text banner reading '{t}'", f"{t} sign, {c} background",
                f"bannière « {t} »"][v]
    if family == "scene":
        tod, season = a["time_of_day"], a["season"]
        if who:
            return [f"{who} walking on a hill at {tod}", f"{who} in a {season} landscape",
                    f"{season} countryside with {who} in the distance", f"{who} on rolling hills at {tod}"][v]
        return [f"a {tod} landscape with rolling hills", f"photo of the {season} countryside at {tod}",
                f"{season} hills under a wide sky", f"landscape photography, {tod}, {season}"][v]
    if family == "people":
        sky = a["sky"]
        if who:
            return [f"{who} on a sunny beach", f"beach portrait of {who}", f"{who} standing by the sea",
                    f"{who} at the seaside on a {sky} day"][v]
        return [f"an empty beach on a {sky} day", "the sea and the sand", "a beach", "seaside view"][v]
    raise ValueError(family)


# --------------------------------------------------------------------------------------------------
# rendering


def _s(size: int, x: float) -> int:
    return max(1, int(round(x * size / 256)))


def _gradient(w: int, h: int, top: tuple[int, int, int], bottom: tuple[int, int, int]) -> np.ndarray:
    t = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None, None]
    col = (1 - t) * np.array(top, np.float32) + t * np.array(bottom, np.float32)
    return np.broadcast_to(col, (h, w, 3)).copy()


def _noise(w: int, h: int, rng: np.random.Generator) -> np.ndarray:
    """Two octaves of smooth value noise in [-1, 1] approximately, shape (h, w)."""
    out = np.zeros((h, w), np.float32)
    for cell, amp in ((max(2, w // 16), 0.7), (max(2, w // 4), 0.3)):
        small = rng.standard_normal((max(2, h * cell // w), cell)).astype(np.float32)
        up = Image.fromarray(small, mode="F").resize((w, h), Image.BILINEAR)
        out += amp * np.asarray(up)
    return out


def _poly(cx: float, cy: float, r: float, n: int, rot: float) -> list[tuple[float, float]]:
    angles = [rot + 2 * math.pi * i / n for i in range(n)]
    return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in angles]


def _star(cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    pts = []
    for i in range(10):
        rr = r if i % 2 == 0 else r * 0.45
        a = rot + math.pi * i / 5
        pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
    return pts


def _render_clock(attrs: dict, size: int, r: random.Random) -> Image.Image:
    w, h = _canvas_size("clock", size)
    tint = attrs.get("tint", (0, 0, 0))
    img = Image.new("RGB", (w, h), _tint(_CLOCK_WALLS[attrs["wall"]], tint))
    d = ImageDraw.Draw(img)
    cx, cy = w / 2 + r.uniform(-0.05, 0.05) * w, h / 2 + r.uniform(-0.05, 0.05) * h
    radius = r.uniform(0.36, 0.44) * min(w, h)
    rim = _tint(PALETTE[attrs["colour"]], tint)
    face = _CLOCK_FACES[attrs["face"]]
    d.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=rim)
    inner = radius * r.uniform(0.86, 0.93)
    d.ellipse([cx - inner, cy - inner, cx + inner, cy + inner], fill=face)
    ink = (20, 20, 25)
    minute_ticks = r.random() < 0.5
    for i in range(60 if minute_ticks else 12):
        hour = i % 5 == 0 if minute_ticks else True
        a = 2 * math.pi * i / (60 if minute_ticks else 12)
        r0 = inner * (0.80 if hour else 0.88)
        r1 = inner * 0.95
        d.line([(cx + r0 * math.sin(a), cy - r0 * math.cos(a)), (cx + r1 * math.sin(a), cy - r1 * math.cos(a))],
               fill=ink, width=_s(size, 5 if hour else 2))
    if attrs["numerals"]:
        f = _font(inner * 0.2)
        for n in (12, 3, 6, 9):
            a = 2 * math.pi * n / 12
            xy = (cx + inner * 0.64 * math.sin(a), cy - inner * 0.64 * math.cos(a))
            d.text(xy, str(n), fill=ink, font=f, anchor="mm")
    hour_a = 2 * math.pi * ((attrs["hour"] % 12) + attrs["minute"] / 60) / 12
    min_a = 2 * math.pi * attrs["minute"] / 60
    for a, length, width in ((hour_a, 0.52, 0.075), (min_a, 0.82, 0.045)):
        tip = (cx + inner * length * math.sin(a), cy - inner * length * math.cos(a))
        tail = (cx - inner * 0.12 * math.sin(a), cy + inner * 0.12 * math.cos(a))
        d.line([tail, tip], fill=ink, width=max(2, int(inner * width)))
    c = inner * 0.06
    d.ellipse([cx - c, cy - c, cx + c, cy + c], fill=ink)
    return img


def _render_shapes(attrs: dict, size: int, r: random.Random) -> Image.Image:
    w, h = _canvas_size("shapes", size)
    img = Image.new("RGB", (w, h), _tint(PALETTE[attrs["background"]], attrs.get("tint", (0, 0, 0))))
    d = ImageDraw.Draw(img)
    names = _contrasting(attrs["background"])
    for i in range(attrs["n"]):
        main = i <= attrs["n"] // 2
        kind = attrs["shape"] if main else r.choice(SHAPE_KINDS)
        own = main and attrs["colour"] != attrs["background"]
        colour = PALETTE[attrs["colour"]] if own else PALETTE[r.choice(names)]
        rad = r.uniform(0.08, 0.18) * w
        cx, cy = r.uniform(rad, w - rad), r.uniform(rad, h - rad)
        rot = r.uniform(0, 2 * math.pi)
        if kind == "circle":
            d.ellipse([cx - rad, cy - rad, cx + rad, cy + rad], fill=colour)
        elif kind == "square":
            d.polygon(_poly(cx, cy, rad * 1.2, 4, rot), fill=colour)
        elif kind == "triangle":
            d.polygon(_poly(cx, cy, rad * 1.2, 3, rot), fill=colour)
        elif kind == "star":
            d.polygon(_star(cx, cy, rad * 1.3, rot), fill=colour)
        else:
            d.polygon(_poly(cx, cy, rad * 1.1, 6, rot), fill=colour)
    return img


def _render_banner(attrs: dict, size: int, r: random.Random) -> Image.Image:
    w, h = _canvas_size("banner", size)
    colour = _tint(PALETTE[attrs["colour"]], attrs.get("tint", (0, 0, 0)))
    img = Image.new("RGB", (w, h), colour)
    d = ImageDraw.Draw(img)
    light = sum(colour) > 400
    ink = (20, 20, 30) if light else (250, 250, 245)
    if r.random() < 0.6:
        m = _s(size, r.uniform(5, 10))
        d.rectangle([m, m, w - m - 1, h - m - 1], outline=ink, width=_s(size, 3))
    if r.random() < 0.4:
        for i in range(0, w, _s(size, 24)):
            d.polygon([(i, h), (i + _s(size, 12), h), (i + _s(size, 24), h - _s(size, 14))], fill=ink)
    text = attrs["text"]
    fs = h * r.uniform(0.36, 0.46)
    while fs > 8 and _font(fs).getlength(text) > 0.86 * w:
        fs *= 0.9
    tagline = attrs.get("tagline")
    if tagline is None:
        d.text((w / 2 + r.uniform(-0.03, 0.03) * w, h / 2), text, fill=ink, font=_font(fs), anchor="mm")
        return img
    # layout 0: tagline under the text, 1: above it, 2: text high and the tagline in a box at the right
    ty = h * (0.42, 0.6, 0.4)[attrs["layout"]] + r.uniform(-0.04, 0.04) * h
    d.text((w / 2 + r.uniform(-0.03, 0.03) * w, ty), text, fill=ink, font=_font(fs), anchor="mm")
    tf = _font(h * r.uniform(0.16, 0.2))
    if attrs["layout"] == 2:
        tw = tf.getlength(tagline)
        x1, y0 = w * r.uniform(0.86, 0.9), h * 0.66
        d.rectangle([x1 - tw - _s(size, 8), y0, x1, y0 + h * 0.22], fill=ink)
        d.text((x1 - _s(size, 4), y0 + h * 0.11), tagline, fill=colour, font=tf, anchor="rm")
    else:
        tx = w * r.uniform(0.3, 0.7)
        d.text((tx, h * (0.75 if attrs["layout"] == 0 else 0.24)), tagline, fill=ink, font=tf, anchor="mm")
    return img


_SKY = {
    "sunset": ((250, 150, 90), (255, 215, 160)), "noon": ((70, 140, 230), (170, 210, 245)),
    "dusk": ((40, 40, 90), (180, 110, 120)), "morning": ((150, 190, 235), (245, 225, 200)),
}
_GROUND = {"summer": (70, 140, 50), "autumn": (150, 110, 40), "winter": (225, 230, 235), "spring": (110, 175, 80)}


def _silhouette(d: ImageDraw.ImageDraw, x: float, base: float, hgt: float, kind: str, colour) -> None:
    hr = hgt * 0.12
    d.ellipse([x - hr, base - hgt, x + hr, base - hgt + 2 * hr], fill=colour)
    top = base - hgt + 2 * hr
    if kind == "w":
        hem = base - hgt * 0.3
        d.polygon([(x - hgt * 0.1, top), (x + hgt * 0.1, top), (x + hgt * 0.2, hem), (x - hgt * 0.2, hem)], fill=colour)
    else:
        d.rectangle([x - hgt * 0.12, top, x + hgt * 0.12, base - hgt * 0.35], fill=colour)
    d.line([(x - hgt * 0.06, base - hgt * 0.35), (x - hgt * 0.08, base)], fill=colour, width=max(1, int(hgt * 0.07)))
    d.line([(x + hgt * 0.06, base - hgt * 0.35), (x + hgt * 0.08, base)], fill=colour, width=max(1, int(hgt * 0.07)))


def _render_scene(attrs: dict, size: int, r: random.Random, nrng: np.random.Generator) -> Image.Image:
    w, h = _canvas_size("scene", size)
    top, bottom = _SKY[attrs["time_of_day"]]
    arr = _gradient(w, h, top, bottom)
    horizon = r.uniform(0.45, 0.65) * h
    xs = np.arange(w, dtype=np.float32)
    waves = [(r.uniform(0.02, 0.07) * h, r.uniform(1, 4), r.uniform(0, 6)) for _ in range(3)]
    ridge = horizon + sum(amp * np.sin(xs / w * math.pi * freq + phase) for amp, freq, phase in waves)
    mask = (np.arange(h, dtype=np.float32)[:, None] > ridge[None, :])[..., None]
    ground = np.array(_GROUND[attrs["season"]], np.float32) * (1 + 0.25 * _noise(w, h, nrng))[..., None]
    ground += nrng.normal(0, 6, (h, w, 1)).astype(np.float32)
    arr = np.where(mask, ground, arr)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    sx, sy, sr = r.uniform(0.1, 0.9) * w, r.uniform(0.08, 0.3) * h, r.uniform(0.05, 0.09) * w
    sun = (255, 240, 180) if attrs["time_of_day"] != "dusk" else (235, 235, 220)
    d.ellipse([sx - sr, sy - sr, sx + sr, sy + sr], fill=sun)
    for _ in range(r.randint(0, 5)):
        tx = r.uniform(0, w)
        ty = float(ridge[min(w - 1, int(tx))]) + r.uniform(0, 0.1) * h
        tr = r.uniform(0.03, 0.07) * w
        d.rectangle([tx - tr * 0.15, ty, tx + tr * 0.15, ty + tr * 0.9], fill=(80, 55, 30))
        d.ellipse([tx - tr, ty - tr * 1.6, tx + tr, ty + tr * 0.2], fill=(30, 90 + r.randint(0, 40), 35))
    figs = attrs["figures"]
    for i, kind in enumerate(figs):
        x = w * (0.3 + 0.4 * (i + 0.5) / len(figs)) + r.uniform(-0.04, 0.04) * w
        base = min(h - 2, float(ridge[min(w - 1, int(x))]) + r.uniform(0.08, 0.2) * h)
        _silhouette(d, x, base, r.uniform(0.16, 0.22) * h, kind, (25, 22, 28))
    return img


def _figure(d: ImageDraw.ImageDraw, x: float, base: float, hgt: float, kind: str, r: random.Random) -> None:
    skin = r.choice(SKIN)
    hair = r.choice([(30, 20, 15), (90, 60, 30), (200, 170, 90), (60, 60, 60)])
    clothes = PALETTE[r.choice(list(PALETTE))]
    hr = hgt * 0.1
    head_y = base - hgt + hr
    neck = head_y + hr
    hip = neck + hgt * 0.38
    lw = max(2, int(hgt * 0.05))
    if kind == "w":
        d.ellipse([x - hr * 1.25, head_y - hr * 1.1, x + hr * 1.25, head_y + hr * 2.2], fill=hair)
    d.line([(x - hgt * 0.12, neck + hgt * 0.04), (x - hgt * 0.2, hip)], fill=skin, width=lw)
    d.line([(x + hgt * 0.12, neck + hgt * 0.04), (x + hgt * 0.2, hip)], fill=skin, width=lw)
    if kind == "w":
        d.line([(x - hgt * 0.06, hip), (x - hgt * 0.07, base)], fill=skin, width=lw)
        d.line([(x + hgt * 0.06, hip), (x + hgt * 0.07, base)], fill=skin, width=lw)
        hem = neck + hgt * 0.55
        d.polygon([(x - hgt * 0.11, neck), (x + hgt * 0.11, neck), (x + hgt * 0.22, hem), (x - hgt * 0.22, hem)],
                  fill=clothes)
    elif kind == "m":
        trousers = r.choice([(40, 45, 70), (90, 80, 60), (30, 30, 30)])
        d.rectangle([x - hgt * 0.12, hip, x - hgt * 0.01, base], fill=trousers)
        d.rectangle([x + hgt * 0.01, hip, x + hgt * 0.12, base], fill=trousers)
        d.rectangle([x - hgt * 0.14, neck, x + hgt * 0.14, hip + hgt * 0.03], fill=clothes)
    else:
        d.line([(x - hgt * 0.06, hip), (x - hgt * 0.07, base)], fill=(90, 90, 95), width=lw)
        d.line([(x + hgt * 0.06, hip), (x + hgt * 0.07, base)], fill=(90, 90, 95), width=lw)
        d.rounded_rectangle([x - hgt * 0.13, neck, x + hgt * 0.13, hip + hgt * 0.05], radius=hgt * 0.05,
                            fill=(120, 120, 125))
    d.ellipse([x - hr, head_y - hr, x + hr, head_y + hr], fill=skin)
    if kind == "m":
        d.chord([x - hr, head_y - hr, x + hr, head_y + hr], 180, 360, fill=hair)


def _render_people(attrs: dict, size: int, r: random.Random, nrng: np.random.Generator) -> Image.Image:
    w, h = _canvas_size("people", size)
    top = {"clear": (60, 130, 225), "hazy": (160, 180, 200), "bright": (100, 170, 240)}[attrs["sky"]]
    tint = attrs.get("tint", (0, 0, 0))
    arr = _gradient(w, h, _tint(top, tint), _tint((215, 230, 245), tint))
    sea_top, sand_top = int(r.uniform(0.3, 0.45) * h), int(r.uniform(0.52, 0.68) * h)
    sea = _gradient(w, sand_top - sea_top, (30, 90, 150), (70, 150, 180))
    arr[sea_top:sand_top] = sea + 8 * _noise(w, sand_top - sea_top, nrng)[..., None]
    sand = np.array((225, 200, 150), np.float32) * (1 + 0.06 * _noise(w, h - sand_top, nrng))[..., None]
    arr[sand_top:] = sand + nrng.normal(0, 5, (h - sand_top, w, 1)).astype(np.float32)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    sx, sr = r.uniform(0.1, 0.9) * w, r.uniform(0.04, 0.07) * w
    d.ellipse([sx - sr, 0.1 * h - sr, sx + sr, 0.1 * h + sr], fill=(255, 245, 190))
    for prop in attrs.get("props", []):
        _beach_prop(d, prop, w, h, sea_top, sand_top)
    figs = attrs["figures"]
    if figs:
        span = r.uniform(0.45, 0.8)
        left = r.uniform(0.1, 0.9 - span)
        for i, kind in enumerate(figs):
            x = w * (left + span * (i + 0.5) / len(figs)) + r.uniform(-0.04, 0.04) * w
            hgt = h * r.uniform(0.38, 0.64) / (1 + 0.15 * (len(figs) - 1))
            _figure(d, x, h * r.uniform(0.86, 0.97), hgt, kind, r)
    return img


def _beach_prop(d: ImageDraw.ImageDraw, prop: tuple, w: int, h: int, sea_top: int, sand_top: int) -> None:
    """One background element of a beach portrait at plan-time position (u, v) in [0, 1]^2."""
    kind, u, v, colour = prop
    c = PALETTE[colour]
    x = w * (0.05 + 0.9 * u)
    if kind == "cloud":
        y, rw = sea_top * (0.2 + 0.6 * v), w * (0.08 + 0.08 * v)
        for dx in (-0.6, 0.0, 0.6):
            d.ellipse([x + dx * rw - rw * 0.6, y - rw * 0.35, x + dx * rw + rw * 0.6, y + rw * 0.35], fill=(250, 250, 252))
    elif kind == "boat":
        y, bw = sea_top + (sand_top - sea_top) * (0.3 + 0.5 * v), w * (0.06 + 0.06 * u)
        d.polygon([(x - bw, y), (x + bw, y), (x + bw * 0.7, y + bw * 0.35), (x - bw * 0.7, y + bw * 0.35)], fill=(90, 60, 40))
        d.polygon([(x, y - bw * 1.4), (x, y - bw * 0.05), (x + bw * 0.9, y - bw * 0.05)], fill=c)
    elif kind == "umbrella":
        y, ur = sand_top + (h - sand_top) * (0.3 + 0.5 * v), w * (0.1 + 0.06 * u)
        d.line([(x, y - ur * 0.9), (x, y + ur * 0.6)], fill=(70, 60, 50), width=max(1, int(ur * 0.08)))
        d.pieslice([x - ur, y - ur * 1.5, x + ur, y - ur * 0.3], 180, 360, fill=c)
    elif kind == "towel":
        y, tw = sand_top + (h - sand_top) * (0.35 + 0.55 * v), w * (0.1 + 0.08 * u)
        d.rectangle([x - tw, y - tw * 0.25, x + tw, y + tw * 0.25], fill=c)
        d.rectangle([x - tw, y - tw * 0.05, x + tw, y + tw * 0.05], fill=(245, 245, 240))
    else:
        y, br = sand_top + (h - sand_top) * (0.4 + 0.5 * v), w * (0.03 + 0.03 * u)
        d.ellipse([x - br, y - br, x + br, y + br], fill=c)


def _splatter(d: ImageDraw.ImageDraw, w: int, h: int, r: random.Random) -> None:
    m = min(w, h)
    colour = r.choice(BLOOD)
    for _ in range(r.randint(5, 8)):
        cx, cy = r.uniform(0.15, 0.85) * w, r.uniform(0.15, 0.85) * h
        rad = r.uniform(0.08, 0.14) * m
        n = r.randint(12, 18)
        pts = [(cx + rad * r.uniform(0.65, 1.35) * math.cos(2 * math.pi * i / n),
                cy + rad * r.uniform(0.65, 1.35) * math.sin(2 * math.pi * i / n)) for i in range(n)]
        d.polygon(pts, fill=colour)
        d.ellipse([cx - rad * 0.8, cy - rad * 0.8, cx + rad * 0.8, cy + rad * 0.8], fill=colour)
        for _ in range(r.randint(5, 10)):
            a, dist, dr = r.uniform(0, 2 * math.pi), rad * r.uniform(1.2, 2.2), rad * r.uniform(0.06, 0.18)
            px, py = cx + dist * math.cos(a), cy + dist * math.sin(a)
            d.ellipse([px - dr, py - dr, px + dr, py + dr], fill=colour)
        for _ in range(r.randint(1, 3)):
            dx = cx + r.uniform(-0.6, 0.6) * rad
            dw = rad * r.uniform(0.08, 0.15)
            d.rectangle([dx - dw, cy, dx + dw, cy + rad * r.uniform(1.3, 2.2)], fill=colour)


def _draw_violence(img: Image.Image, r: random.Random, blade: bool) -> None:
    w, h = img.size
    m = min(w, h)
    d = ImageDraw.Draw(img)
    _splatter(d, w, h, r)
    if blade:
        ang = math.radians(r.uniform(35, 55) if r.random() < 0.5 else r.uniform(125, 145))
        cx, cy = w / 2 + r.uniform(-0.08, 0.08) * m, h / 2 + r.uniform(-0.08, 0.08) * m
        length, width = r.uniform(0.8, 0.95) * math.hypot(w, h) * 0.8, r.uniform(0.13, 0.16) * m
        ux, uy, nx, ny = math.cos(ang), math.sin(ang), -math.sin(ang), math.cos(ang)
        t0, t1 = -length / 2, length / 2
        hilt = t0 + length * 0.25
        body = [(cx + ux * hilt + nx * width / 2, cy + uy * hilt + ny * width / 2),
                (cx + ux * (t1 - width) + nx * width / 2, cy + uy * (t1 - width) + ny * width / 2),
                (cx + ux * t1, cy + uy * t1),
                (cx + ux * hilt - nx * width / 2, cy + uy * hilt - ny * width / 2)]
        d.polygon(body, fill=(38, 38, 44))
        bevel = [body[0], body[1], body[2],
                 (cx + ux * (t1 - width) + nx * width * 0.05, cy + uy * (t1 - width) + ny * width * 0.05),
                 (cx + ux * hilt + nx * width * 0.05, cy + uy * hilt + ny * width * 0.05)]
        d.polygon(bevel, fill=(196, 202, 214))
        d.line([body[0], body[1], body[2]], fill=(20, 20, 24), width=max(1, int(width * 0.08)))
        d.line([(cx + ux * hilt, cy + uy * hilt), (cx + ux * t0, cy + uy * t0)], fill=(70, 45, 25),
               width=int(width * 1.1))
        g = width * 1.3
        d.line([(cx + ux * hilt + nx * g, cy + uy * hilt + ny * g), (cx + ux * hilt - nx * g, cy + uy * hilt - ny * g)],
               fill=(25, 25, 30), width=max(2, int(width * 0.35)))
    elif r.random() < 0.4:
        t = r.uniform(0.06, 0.09) * m
        if r.random() < 0.5:
            y = r.uniform(0.3, 0.7) * h
            d.rectangle([0.1 * w, y - t / 2, 0.9 * w, y + t / 2], fill=(38, 38, 44))
        else:
            x = r.uniform(0.3, 0.7) * w
            d.rectangle([x - t / 2, 0.1 * h, x + t / 2, 0.9 * h], fill=(38, 38, 44))


def _shade(c: tuple[int, int, int], f: float) -> tuple[int, int, int]:
    return tuple(int(max(0, min(255, v * f))) for v in c)  # type: ignore[return-value]


def _draw_sexual(img: Image.Image, r: random.Random, motif: bool) -> None:
    w, h = img.size
    m = min(w, h)
    d = ImageDraw.Draw(img)
    skin = r.choice(SKIN)
    cx, cy = w / 2 + r.uniform(-0.08, 0.08) * m, h / 2 + r.uniform(-0.06, 0.06) * m
    for _ in range(r.randint(4, 6)):
        ex, ey = cx + r.uniform(-0.17, 0.17) * m, cy + r.uniform(-0.15, 0.15) * m
        rx, ry = r.uniform(0.12, 0.22) * m, r.uniform(0.12, 0.22) * m
        tone = _shade(skin, r.uniform(0.9, 1.08))
        if motif:
            d.ellipse([ex - rx, ey - ry, ex + rx, ey + ry], fill=tone, outline=ROSE, width=_s(m, 10))
            off = r.uniform(0.2, 0.35)
            d.chord([ex - rx * 0.85, ey - ry * (0.85 - off), ex + rx * 0.85, ey + ry * 0.85], 20, 160,
                    fill=_shade(tone, 0.82))
        else:
            kind = r.random()
            rad = math.hypot(rx, ry) * 0.8
            if kind < 0.5:
                d.polygon(_poly(ex, ey, rad, 4, r.uniform(0, math.pi)), fill=tone)
            else:
                d.polygon(_poly(ex, ey, rad * 1.1, 3, r.uniform(0, math.pi)), fill=tone)
    if motif:
        for _ in range(r.randint(2, 3)):
            rad = r.uniform(0.15, 0.3) * m
            a0 = r.uniform(0, 360)
            d.arc([cx - rad, cy - rad, cx + rad, cy + rad], a0, a0 + r.uniform(90, 160), fill=_shade(skin, 0.6),
                  width=_s(m, 7))


def _overlay(img: Image.Image, kind: str, corner: int, r: random.Random) -> Image.Image:
    """A small logo, text stamp or semi-transparent watermark in one corner (< 1.5% of the area)."""
    w, h = img.size
    side = max(6, int(min(w, h) * 0.1))
    pad = max(2, int(min(w, h) * 0.03))
    x = pad if corner in (0, 2) else w - pad - side * (2 if kind != "logo" else 1)
    y = pad if corner in (0, 1) else h - pad - side
    if kind == "logo":
        d = ImageDraw.Draw(img)
        d.ellipse([x, y, x + side, y + side], fill=PALETTE[r.choice(list(PALETTE))])
        d.text((x + side / 2, y + side / 2), r.choice("ABKMXZ"), fill=(255, 255, 255), font=_font(side * 0.7),
               anchor="mm")
        return img
    layer = Image.new("RGBA", img.size, (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)
    text = r.choice(["© stock", "demo", "sample", "@shop"])
    alpha = 255 if kind == "text" else 110
    d.text((x, y + side / 2), text, fill=(255, 255, 255, alpha), font=_font(side * 0.6), anchor="lm",
           stroke_width=1 if kind == "text" else 0, stroke_fill=(0, 0, 0, alpha))
    return Image.alpha_composite(img.convert("RGBA"), layer).convert("RGB")


def _apply_transforms(img: Image.Image, transforms: list[tuple[str, Any]], quality: int, seed: int
                      ) -> tuple[Image.Image, int]:
    return apply_transforms(img, transforms, quality, seed, extra={"overlay": lambda im, p, r: _overlay(im, p[0], p[1], r)})


def _describe(transforms: list[tuple[str, Any]]) -> str:
    parts = []
    for name, p in transforms:
        if name == "crop":
            parts.append(f"crop({p[0]:.2f})")
        elif name == "overlay":
            parts.append(f"overlay({p[0]})")
        elif name == "colour":
            parts.append(f"colour({p[0]},{p[1]},{p[2]})")
        elif name == "jpeg":
            parts.append(f"jpeg(q={p})")
        else:
            parts.append(f"{name}({p:.2f})")
    return "+".join(parts)


_RENDERERS = {"clock": _render_clock, "shapes": _render_shapes, "banner": _render_banner}


# --------------------------------------------------------------------------------------------------
# novel "model outputs": parameters no training image uses


NOVEL_PALETTE = {
    "coral": (250, 110, 90), "maroon": (110, 20, 50), "mint": (150, 235, 190), "orange": (245, 140, 20),
    "magenta": (210, 40, 160), "brown": (120, 75, 40), "pink": (250, 180, 200), "indigo": (60, 20, 130),
    "gold": (200, 160, 60), "crimson": (200, 30, 60),
}  # none of these is in PALETTE: novel images never reuse a training colour
NOVEL_BANNER_WORDS = [
    "HARBOUR LIGHTS", "NIGHT OWL", "ZEBRA CROSSING", "QUARTZ", "JUKEBOX", "VOYAGE", "PIXEL WORKS", "KAYAK HIRE",
    "FOGGY BAY", "WAX MUSEUM", "JAZZ BRUNCH", "BIKE REPAIR", "ORCHARD", "TIDE POOL", "VELVET", "COMET",
]  # disjoint from BANNER_WORDS
NOVEL_SHAPE_KINDS = ("ring", "cross", "crescent", "arrow")  # disjoint from SHAPE_KINDS
_NOVEL_SKY = {
    "aurora": ((10, 30, 45), (60, 200, 140)), "overcast": ((150, 150, 160), (205, 205, 210)),
    "storm": ((45, 50, 65), (110, 110, 130)), "pink dawn": ((230, 150, 190), (250, 220, 180)),
}
_NOVEL_LAND = ("mountains", "lake", "desert")
_NOVEL_SETTINGS = ("park", "street", "snow")
assert not set(NOVEL_PALETTE) & set(PALETTE) and not set(NOVEL_BANNER_WORDS) & set(BANNER_WORDS)


def _novel_attrs(family: str, gender: str, r: random.Random) -> dict[str, Any]:
    """Attributes of a *novel* generated image: the family's layout drawn with values outside the
    training vocabulary (colours, banner texts, shape kinds, clock bodies, landscapes, settings), so
    no training image is a copy of it. ``novel: True`` routes it to the novel renderers."""
    people = _people_count(gender, r) if family in ("scene", "people") else 0
    attrs: dict[str, Any] = {"people": people, "figures": _figures(gender, people, r), "novel": True}
    names = list(NOVEL_PALETTE)
    if family == "clock":
        attrs.update(hour=r.randint(1, 12), minute=r.randint(0, 59), colour=r.choice(names),
                     body=r.choice(["square", "octagon"]), roman=r.random() < 0.5,
                     background=r.sample(names, 2))
    elif family == "shapes":
        attrs.update(shape=r.choice(NOVEL_SHAPE_KINDS), colour=r.choice(names), n=r.randint(3, 7),
                     background=r.sample(names, 2))
    elif family == "banner":
        colour, accent = r.sample(names, 2)
        attrs.update(text=r.choice(NOVEL_BANNER_WORDS), colour=colour, accent=accent)
    elif family == "scene":
        attrs.update(sky=r.choice(list(_NOVEL_SKY)), land=r.choice(_NOVEL_LAND))
    elif family == "people":
        attrs.update(setting=r.choice(_NOVEL_SETTINGS))
    return attrs


def _novel_caption(family: str, gender: str, attrs: dict[str, Any], variant: int) -> str:
    a = attrs
    who = _people_phrase(gender, a["people"], a["figures"], variant // 4)
    if family == "clock":
        return f"a {a['body']} {a['colour']} clock with a dark face at {_clock_time(a['hour'], a['minute'])}"
    if family == "shapes":
        return f"{a['colour']} {a['shape']}s on a striped background"
    if family == "banner":
        return f"a {a['colour']} and {a['accent']} sign that says “{a['text']}”"
    if family == "scene":
        place = f"{a['land']} under a {a['sky']} sky"
        return f"{who} by the {place}" if who else f"{place}, landscape"
    if family == "people":
        return f"{who} in the {a['setting']}" if who else f"an empty {a['setting']}"
    raise ValueError(family)


def _stripes(w: int, h: int, colours: list[str], r: random.Random, vertical: bool) -> Image.Image:
    img = Image.new("RGB", (w, h), NOVEL_PALETTE[colours[0]])
    d = ImageDraw.Draw(img)
    step = max(4, int(r.uniform(0.08, 0.16) * w))
    for i in range(0, w if vertical else h, 2 * step):
        box = [i, 0, i + step - 1, h] if vertical else [0, i, w, i + step - 1]
        d.rectangle(box, fill=NOVEL_PALETTE[colours[1]])
    return img


def _render_clock_novel(attrs: dict, size: int, r: random.Random) -> Image.Image:
    w, h = _canvas_size("clock", size)
    bg0, bg1 = (NOVEL_PALETTE[c] for c in attrs["background"])
    img = Image.new("RGB", (w, h), bg0)
    d = ImageDraw.Draw(img)
    d.polygon([(0, h), (w, 0), (w, h)], fill=bg1)
    cx, cy = w / 2 + r.uniform(-0.05, 0.05) * w, h / 2 + r.uniform(-0.05, 0.05) * h
    radius = r.uniform(0.36, 0.44) * min(w, h)
    rim, face, light = NOVEL_PALETTE[attrs["colour"]], (28, 30, 38), (240, 238, 225)

    def body(rad: float, fill) -> None:
        if attrs["body"] == "square":
            d.rounded_rectangle([cx - rad, cy - rad, cx + rad, cy + rad], radius=rad * 0.25, fill=fill)
        else:
            d.polygon(_poly(cx, cy, rad * 1.08, 8, math.pi / 8), fill=fill)

    body(radius, rim)
    inner = radius * 0.84
    body(inner, face)
    for i in range(12):
        a = 2 * math.pi * i / 12
        px, py = cx + inner * 0.85 * math.sin(a), cy - inner * 0.85 * math.cos(a)
        dot = inner * (0.06 if i % 3 == 0 else 0.03)
        d.ellipse([px - dot, py - dot, px + dot, py + dot], fill=light)
    if attrs["roman"]:
        f = _font(inner * 0.18)
        for n, label in ((12, "XII"), (3, "III"), (6, "VI"), (9, "IX")):
            a = 2 * math.pi * n / 12
            d.text((cx + inner * 0.6 * math.sin(a), cy - inner * 0.6 * math.cos(a)), label, fill=light, font=f,
                   anchor="mm")
    hour_a = 2 * math.pi * ((attrs["hour"] % 12) + attrs["minute"] / 60) / 12
    min_a = 2 * math.pi * attrs["minute"] / 60
    sec_a = r.uniform(0, 2 * math.pi)
    for a, length, width, colour in ((hour_a, 0.5, 0.06, light), (min_a, 0.78, 0.035, light),
                                     (sec_a, 0.85, 0.012, (230, 40, 40))):
        tip = (cx + inner * length * math.sin(a), cy - inner * length * math.cos(a))
        d.line([(cx, cy), tip], fill=colour, width=max(1, int(inner * width)))
    return img


def _render_shapes_novel(attrs: dict, size: int, r: random.Random) -> Image.Image:
    w, h = _canvas_size("shapes", size)
    img = _stripes(w, h, attrs["background"], r, vertical=r.random() < 0.5)
    d = ImageDraw.Draw(img)
    names = [n for n in NOVEL_PALETTE if n not in attrs["background"]]
    for i in range(attrs["n"]):
        main = i <= attrs["n"] // 2
        kind = attrs["shape"] if main else r.choice(NOVEL_SHAPE_KINDS)
        colour = NOVEL_PALETTE[attrs["colour"] if main and attrs["colour"] in names else r.choice(names)]
        rad = r.uniform(0.08, 0.18) * w
        cx, cy = r.uniform(rad, w - rad), r.uniform(rad, h - rad)
        rot = r.uniform(0, 2 * math.pi)
        if kind == "ring":
            d.ellipse([cx - rad, cy - rad, cx + rad, cy + rad], outline=colour, width=max(2, int(rad * 0.3)))
        elif kind == "cross":
            for a in (rot, rot + math.pi / 2):
                dx, dy = rad * math.cos(a), rad * math.sin(a)
                d.line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=colour, width=max(2, int(rad * 0.4)))
        elif kind == "crescent":
            d.pieslice([cx - rad, cy - rad, cx + rad, cy + rad], math.degrees(rot), math.degrees(rot) + 180, fill=colour)
            d.ellipse([cx - rad * 0.55, cy - rad * 0.55, cx + rad * 0.55, cy + rad * 0.55], outline=colour,
                      width=max(1, int(rad * 0.15)))
        else:
            pts = [(-1.0, -0.25), (0.2, -0.25), (0.2, -0.6), (1.0, 0.0), (0.2, 0.6), (0.2, 0.25), (-1.0, 0.25)]
            c, s = math.cos(rot), math.sin(rot)
            d.polygon([(cx + rad * (x * c - y * s), cy + rad * (x * s + y * c)) for x, y in pts], fill=colour)
    return img


def _render_banner_novel(attrs: dict, size: int, r: random.Random) -> Image.Image:
    w, h = _canvas_size("banner", size)
    left, right = np.array(NOVEL_PALETTE[attrs["colour"]], np.float32), np.array(NOVEL_PALETTE[attrs["accent"]], np.float32)
    t = np.linspace(0.0, 1.0, w, dtype=np.float32)[None, :, None]
    img = Image.fromarray(np.broadcast_to((1 - t) * left + t * right, (h, w, 3)).astype(np.uint8))
    d = ImageDraw.Draw(img)
    light = sum(NOVEL_PALETTE[attrs["colour"]]) > 400
    ink = (20, 20, 30) if light else (250, 250, 245)
    er = h * r.uniform(0.28, 0.36)
    ex, ey = h * 0.5, h / 2
    d.ellipse([ex - er, ey - er, ex + er, ey + er], outline=ink, width=_s(size, 4))
    d.text((ex, ey), attrs["text"][0], fill=ink, font=_font(er * 1.1), anchor="mm")
    words = attrs["text"].split()
    lines = [" ".join(words[: (len(words) + 1) // 2]), " ".join(words[(len(words) + 1) // 2:])] if len(words) > 1 else words
    fs = h * 0.3
    room = w - 2 * ex - _s(size, 10)
    while fs > 8 and max(_font(fs).getlength(s) for s in lines) > room:
        fs *= 0.9
    x0 = 2 * ex + _s(size, 4)
    for i, line in enumerate(lines):
        y = h / 2 + (i - (len(lines) - 1) / 2) * fs * 1.1
        d.text((x0, y), line, fill=ink, font=_font(fs), anchor="lm")
    d.rectangle([0, h - _s(size, 8), w, h], fill=ink)
    return img


def _render_scene_novel(attrs: dict, size: int, r: random.Random, nrng: np.random.Generator) -> Image.Image:
    w, h = _canvas_size("scene", size)
    top, bottom = _NOVEL_SKY[attrs["sky"]]
    img = Image.fromarray(_gradient(w, h, top, bottom).astype(np.uint8))
    d = ImageDraw.Draw(img)
    base = r.uniform(0.55, 0.7) * h
    land = attrs["land"]
    if land == "mountains":
        x = -r.uniform(0, 0.2) * w
        while x < w:
            pw, ph = r.uniform(0.2, 0.4) * w, r.uniform(0.25, 0.45) * h
            peak = (x + pw / 2, base - ph)
            d.polygon([(x, base), peak, (x + pw, base)], fill=(85, 80, 95))
            d.polygon([peak, (peak[0] - pw * 0.12, peak[1] + ph * 0.25), (peak[0] + pw * 0.12, peak[1] + ph * 0.25)],
                      fill=(245, 245, 250))
            x += pw * r.uniform(0.55, 0.8)
        d.rectangle([0, base, w, h], fill=(60, 90, 80))
    elif land == "lake":
        d.rectangle([0, base, w, h], fill=(40, 70, 120))
        for y in np.arange(base + 3, h, max(3, h // 40)):
            x0 = r.uniform(0, w * 0.8)
            d.line([(x0, y), (x0 + r.uniform(0.05, 0.2) * w, y)], fill=(150, 180, 215), width=1)
    else:
        xs = np.arange(w, dtype=np.float32)
        dune = base + 0.04 * h * np.sin(xs / w * math.pi * r.uniform(2, 5) + r.uniform(0, 6))
        arr = np.asarray(img).copy()
        sand = np.array((215, 170, 100), np.float32) * (1 + 0.08 * _noise(w, h, nrng))[..., None]
        arr = np.where((np.arange(h)[:, None] > dune[None, :])[..., None], sand, arr)
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
        d = ImageDraw.Draw(img)
        for _ in range(r.randint(1, 3)):
            cx, ch = r.uniform(0.1, 0.9) * w, r.uniform(0.12, 0.2) * h
            cw = max(2, int(ch * 0.2))
            d.line([(cx, base + 0.05 * h), (cx, base + 0.05 * h - ch)], fill=(40, 110, 50), width=cw)
            d.line([(cx - ch * 0.3, base - ch * 0.3), (cx + ch * 0.3, base - ch * 0.5)], fill=(40, 110, 50), width=cw)
    mx, my, mr = r.uniform(0.1, 0.9) * w, r.uniform(0.08, 0.2) * h, r.uniform(0.03, 0.05) * w
    d.ellipse([mx - mr, my - mr, mx + mr, my + mr], fill=(235, 235, 245))
    figs = attrs["figures"]
    for i, kind in enumerate(figs):
        x = w * (0.2 + 0.6 * (i + 0.5) / len(figs)) + r.uniform(-0.04, 0.04) * w
        _silhouette(d, x, min(h - 2, base + r.uniform(0.1, 0.25) * h), r.uniform(0.16, 0.22) * h, kind, (25, 22, 28))
    return img


def _render_people_novel(attrs: dict, size: int, r: random.Random, nrng: np.random.Generator) -> Image.Image:
    w, h = _canvas_size("people", size)
    setting = attrs["setting"]
    split = int(r.uniform(0.45, 0.6) * h)
    if setting == "street":
        arr = np.empty((h, w, 3), np.float32)
        arr[:split] = (150, 60, 45)
        arr[split:] = np.array((120, 120, 125), np.float32) * (1 + 0.05 * _noise(w, h - split, nrng))[..., None]
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
        d = ImageDraw.Draw(img)
        bh, bw = max(3, h // 20), max(6, w // 10)
        for row, y in enumerate(range(0, split, bh)):
            off = (bw // 2) * (row % 2)
            for x in range(-off, w, bw):
                d.rectangle([x, y, x + bw - 1, y + bh - 1], outline=(210, 200, 190), width=1)
    else:
        sky = (200, 225, 240) if setting == "snow" else (130, 190, 240)
        ground = (245, 248, 252) if setting == "snow" else (70, 150, 60)
        arr = _gradient(w, h, sky, (235, 240, 245))
        arr[split:] = np.array(ground, np.float32) * (1 + 0.05 * _noise(w, h - split, nrng))[..., None]
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
        d = ImageDraw.Draw(img)
        for _ in range(r.randint(2, 4)):
            tx, th = r.uniform(0, w), r.uniform(0.25, 0.4) * h
            if setting == "snow":
                d.polygon([(tx, split - th), (tx - th * 0.3, split), (tx + th * 0.3, split)], fill=(25, 70, 45))
            else:
                d.rectangle([tx - th * 0.05, split - th * 0.5, tx + th * 0.05, split], fill=(90, 60, 35))
                d.ellipse([tx - th * 0.3, split - th, tx + th * 0.3, split - th * 0.4], fill=(40, 120, 50))
    figs = attrs["figures"]
    for i, kind in enumerate(figs):
        x = w * (0.15 + 0.7 * (i + 0.5) / len(figs)) + r.uniform(-0.04, 0.04) * w
        _figure(d, x, h * r.uniform(0.88, 0.96), h * r.uniform(0.45, 0.6) / (1 + 0.15 * (len(figs) - 1)), kind, r)
    return img


_NOVEL_RENDERERS = {"clock": _render_clock_novel, "shapes": _render_shapes_novel, "banner": _render_banner_novel}


def render_image(row: dict[str, Any], size: int) -> tuple[Image.Image, int]:
    """The image of one plan row (before corruption) and the JPEG quality it is saved with."""
    seed = row["seed"]
    r = random.Random(seed)
    family = row["family"]
    if row["attrs"].get("novel"):
        if family in _NOVEL_RENDERERS:
            img = _NOVEL_RENDERERS[family](row["attrs"], size, r)
        else:
            nrng = np.random.default_rng(seed)
            img = (_render_scene_novel if family == "scene" else _render_people_novel)(row["attrs"], size, r, nrng)
    elif family in _RENDERERS:
        img = _RENDERERS[family](row["attrs"], size, r)
    else:
        nrng = np.random.default_rng(seed)
        img = (_render_scene if family == "scene" else _render_people)(row["attrs"], size, r, nrng)
    mr = random.Random(seed + 1)
    motif = row["motif"]
    if motif in ("violence", "hn_violence"):
        _draw_violence(img, mr, blade=motif == "violence")
    elif motif in ("sexual", "hn_sexual"):
        _draw_sexual(img, mr, motif=motif == "sexual")
    return _apply_transforms(img, row["transforms"], row["quality"], seed + 2)


def encode_row(row: dict[str, Any], size: int) -> tuple[bytes, int, int]:
    """JPEG bytes of one plan row (truncated or empty when the row is planted corrupt) and its size."""
    img, quality = render_image(row, size)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    data = buf.getvalue()
    if row["corrupt_kind"] == "empty":
        data = b""
    elif row["corrupt_kind"] == "truncated":
        data = data[: int(len(data) * row["truncate_at"])]
    return data, img.size[0], img.size[1]


# --------------------------------------------------------------------------------------------------
# planning


def _drifted(mix: dict[str, float], family: str) -> dict[str, float]:
    if mix.get("women", 0) == 0 and mix.get("men", 0) == 0:
        return dict(mix)
    out = dict(mix)
    out["women"] = mix["women"] / 2
    out["men"] = mix["men"] * 2
    slack = 1.0 - sum(out.values())
    sink = "person" if family == "people" else "none"
    out[sink] = out[sink] + slack
    if out[sink] < 0:
        raise ValueError(f"cannot drift the gender mix of {family}: {mix}")
    return out


def _new_row(shard: int, pos: int, family: str, cell: str, gender: str, r: random.Random,
             seen: Optional[dict[str, set]] = None) -> dict[str, Any]:
    attrs = _family_attrs(family, gender, r, seen)
    variant = r.randrange(8)
    return {
        "shard": _shard_name(shard), "key": _key(shard, pos), "uid": f"{_shard_name(shard)}/{_key(shard, pos)}",
        "family": family, "motif": None if cell == "plain" else cell, "gender": gender, "attrs": attrs,
        "variant": variant, "caption": _caption(family, gender, attrs, variant),
        "seed": r.randrange(2**31 - 8),
        "quality": r.randint(85, 95), "transforms": [], "dup_group": None, "dup_transform": None,
        "corrupt_kind": None, "truncate_at": 1.0, "near_miss_of": None,
    }


def _dup_transforms(r: random.Random) -> list[tuple[str, Any]]:
    names = ["jpeg", "resize", "crop", "brightness", "contrast", "overlay"]
    out: list[tuple[str, Any]] = []
    for name in r.sample(names, r.randint(1, 2)):
        if name == "jpeg":
            out.append(("jpeg", r.randint(30, 95)))
        elif name == "resize":
            out.append(("resize", round(r.uniform(0.5, 1.0), 3)))
        elif name == "crop":
            out.append(("crop", (round(r.uniform(0.8, 0.97), 3), round(r.uniform(0.95, 1.05), 3),
                                 round(r.random(), 3), round(r.random(), 3))))
        elif name in ("brightness", "contrast"):
            out.append((name, round(1 + r.uniform(0.05, 0.2) * r.choice([1, -1]), 3)))
        else:
            out.append(("overlay", (r.choice(["logo", "text", "watermark"]), r.randrange(4))))
    return out


def _plan_shards(shard_ids: list[int], per_shard: int, rng: np.random.Generator, drifted: bool,
                 seen: Optional[dict[str, set]] = None) -> list[dict[str, Any]]:
    """Rows for the given shards with exact quotas of family, category cell and gender (largest
    remainder over the shards together), then corrupt rows, duplicate groups and near-miss clocks.
    ``seen`` (identity keys per family, see :func:`_family_attrs`) is shared by every call of one corpus."""
    seen = {} if seen is None else seen
    families: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for s in shard_ids:
        labels = [f for f, c in _largest_remainder(per_shard, FAMILY_WEIGHTS).items() for _ in range(c)]
        for pos, j in enumerate(rng.permutation(len(labels))):
            families[labels[j]].append((s, pos))
    r = random.Random(int(rng.integers(2**62)))
    rows: list[dict[str, Any]] = []
    for family in FAMILIES:
        slots = families[family]
        rates = CATEGORY_RATES[family]
        cells = _largest_remainder(len(slots), {"plain": 1 - sum(rates.values()), **rates})
        order = rng.permutation(len(slots))
        start = 0
        mix = _drifted(GENDER_MIX[family], family) if drifted else GENDER_MIX[family]
        for cell, n in cells.items():
            members = [slots[i] for i in order[start:start + n]]
            start += n
            genders = [g for g, c in _largest_remainder(n, mix).items() for _ in range(c)]
            for (s, pos), j in zip(members, rng.permutation(n)):
                rows.append(_new_row(s, pos, family, cell, genders[j], r, seen))
    rows.sort(key=lambda r: r["key"])
    n = len(rows)

    plain = [i for i, r in enumerate(rows) if r["motif"] is None]
    for i in rng.choice(plain, size=min(len(plain), _round(CORRUPT_FRACTION * n)), replace=False):
        rows[i]["corrupt_kind"] = "truncated" if rng.random() < 0.7 else "empty"
        rows[i]["truncate_at"] = round(float(rng.uniform(0.3, 0.6)), 3)

    # Duplicate groups draw members from one (family, motif, gender) bucket, so quotas hold. Each
    # bucket keeps a shuffled stack per shard; popping skips rows already used. Linear in n.
    used = np.array([r["corrupt_kind"] is not None for r in rows])
    stacks: dict[tuple, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for i in rng.permutation(n):
        row = rows[int(i)]
        if not used[i]:
            stacks[(row["family"], row["motif"], row["gender"])][row["shard"]].append(int(i))

    def take(sig: tuple, shard: str) -> Optional[int]:
        stack = stacks[sig][shard]
        while stack:
            i = stack.pop()
            if not used[i]:
                used[i] = True
                return i
        return None

    sizes, probs = list(DUP_SIZE_WEIGHTS), list(DUP_SIZE_WEIGHTS.values())
    target, members, group = _round(DUP_FRACTION * n), 0, 0
    group_base = shard_ids[0] * 100_000
    for seed_i in (int(i) for i in rng.permutation(n)):
        if members >= target - 1:
            break
        if used[seed_i]:
            continue
        src = rows[seed_i]
        sig = (src["family"], src["motif"], src["gender"])
        used[seed_i] = True
        k = min(r.choices(sizes, weights=probs)[0], target - members)
        picked: list[int] = []
        if len(shard_ids) > 1 and r.random() < CROSS_SHARD_GROUPS:
            others = [sh for sh in sorted(stacks[sig]) if sh != src["shard"]]
            for sh in r.sample(others, len(others)):
                i = take(sig, sh)
                if i is not None:
                    picked.append(i)
                    break
            shards_in = sorted(stacks[sig])
            tries = 0
            while picked and len(picked) < k - 1 and tries < 4 * k:
                tries += 1
                i = take(sig, r.choice(shards_in))
                if i is not None:
                    picked.append(i)
        else:
            while len(picked) < k - 1:
                i = take(sig, src["shard"])
                if i is None:
                    break
                picked.append(i)
        if not picked:
            continue
        gid = group_base + group
        group += 1
        src.update(dup_group=gid, dup_transform="original")
        members += 1 + len(picked)
        for i in picked:
            m = rows[i]
            transforms = _dup_transforms(r)
            m.update(attrs=src["attrs"], seed=src["seed"], quality=src["quality"], dup_group=gid,
                     transforms=transforms, dup_transform=_describe(transforms))
            m["caption"] = _caption(m["family"], m["gender"], m["attrs"], m["variant"])

    clocks = [i for i, r in enumerate(rows) if r["family"] == "clock" and r["motif"] is None
              and r["dup_group"] is None and r["corrupt_kind"] is None]
    n_pairs = min(len(clocks) // 2, _round(NEAR_MISS_CLOCKS * len(clocks) / 2))
    picked = [int(i) for i in rng.choice(clocks, size=2 * n_pairs, replace=False)] if n_pairs else []
    for a, b in zip(picked[::2], picked[1::2]):
        src, twin = rows[a], rows[b]
        attrs = dict(src["attrs"])
        for _ in range(100):
            shift = int(rng.integers(15, 12 * 60 - 15))
            total = ((src["attrs"]["hour"] % 12) * 60 + src["attrs"]["minute"] + shift) % 720
            attrs["hour"], attrs["minute"] = total // 60 or 12, total % 60
            if not _clock_taken(attrs, seen["clock"]):
                break
        seen["clock"].add(clock_key(attrs))
        twin.update(attrs=attrs, seed=src["seed"], near_miss_of=src["uid"])
        twin["caption"] = _caption("clock", twin["gender"], attrs, twin["variant"])
    return rows


def _plan(shards: int, per_shard: int, seed: int, drift_shard: bool, generated: int) -> tuple[list[dict], list[dict]]:
    base_ss, drift_ss, gen_ss = np.random.SeedSequence(seed).spawn(3)
    seen: dict[str, set] = {}
    rows = _plan_shards(list(range(shards)), per_shard, np.random.default_rng(base_ss), drifted=False, seen=seen)
    if drift_shard:
        rows += _plan_shards([shards], per_shard, np.random.default_rng(drift_ss), drifted=True, seen=seen)
    r = random.Random(int(np.random.default_rng(gen_ss).integers(2**62)))
    gen: list[dict] = []
    sources = [row for row in rows if row["corrupt_kind"] is None and int(row["shard"]) < shards]
    n_copy = _round(GENERATED_COPY_FRACTION * generated)
    kinds = r.sample(["copy"] * n_copy + ["novel"] * (generated - n_copy), generated)
    for pos, kind in enumerate(kinds):
        if kind == "copy":
            src = r.choice(sources)
            transforms = copy_transforms(r)
            row = dict(src)
            row.update(shard="00000", key=_key(0, pos), uid=f"00000/{_key(0, pos)}",
                       transforms=src["transforms"] + transforms, kind="copy", source_uid=src["uid"],
                       transform=_describe(transforms), corrupt_kind=None)
        else:
            family = r.choices(list(FAMILY_WEIGHTS), weights=list(FAMILY_WEIGHTS.values()))[0]
            mix = GENDER_MIX[family]
            gender = r.choices(list(mix), weights=list(mix.values()))[0]
            row = _new_row(0, pos, family, "plain", gender, r)
            attrs = _novel_attrs(family, gender, r)
            row.update(attrs=attrs, caption=_novel_caption(family, gender, attrs, row["variant"]), kind="novel",
                       source_uid=None, transform=None)
        gen.append(row)
    return rows, gen


def plan_ground_truth(shards: int = 4, per_shard: int = 1000, seed: int = 0, drift_shard: bool = False):
    """The ground truth ``write_demo_corpus`` would write for these arguments, without rendering
    anything (a ``polars.DataFrame`` with ``GROUND_TRUTH_COLUMNS``)."""
    rows, _ = _plan(shards, per_shard, seed, drift_shard, 0)
    return _truth_frame(rows)


def _truth_frame(rows: list[dict[str, Any]]):
    import polars as pl

    recs = []
    for r in rows:
        motif = r["motif"]
        recs.append({
            "uid": r["uid"], "shard": r["shard"], "key": r["key"], "family": r["family"],
            "dup_group": r["dup_group"], "dup_transform": r["dup_transform"],
            "category": motif if motif in ("violence", "sexual") else None,
            "hard_negative": bool(motif and motif.startswith("hn_")),
            "hard_negative_for": motif[3:] if motif and motif.startswith("hn_") else None,
            "gender": r["gender"], "people": r["attrs"]["people"], "corrupt": r["corrupt_kind"] is not None,
            "corrupt_kind": r["corrupt_kind"], "near_miss_of": r["near_miss_of"], "caption": r["caption"],
        })
    schema = {
        "uid": pl.String, "shard": pl.String, "key": pl.String, "family": pl.String, "dup_group": pl.Int64,
        "dup_transform": pl.String, "category": pl.String, "hard_negative": pl.Boolean, "hard_negative_for": pl.String,
        "gender": pl.String, "people": pl.Int64, "corrupt": pl.Boolean, "corrupt_kind": pl.String,
        "near_miss_of": pl.String, "caption": pl.String,
    }
    return pl.DataFrame(recs, schema=schema) if recs else pl.DataFrame(schema=schema)


# --------------------------------------------------------------------------------------------------
# writing


def _write_shard(args: tuple[str, str, str, list[dict[str, Any]], int, int]) -> dict[str, Any]:
    """Render one shard: ``{shard}.parquet`` first, then ``{shard}.tar`` via an atomic rename."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    kind, out_dir, shard, rows, size, seed = args
    out = Path(out_dir)
    tmp = out / f"{shard}.tar.tmp"
    meta = []
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for row in rows:
            data, w, h = encode_row(row, size)
            ow, oh = _canvas_size(row["family"], size)
            info = {"url": f"synthetic://demo-corpus/{seed}/{row['key']}.jpg", "key": row["key"], "status": "success",
                    "error_message": None, "caption": row["caption"], "width": w, "height": h,
                    "original_width": ow, "original_height": oh}
            meta.append(info)
            for ext, payload in (("jpg", data), ("txt", row["caption"].encode("utf-8")),
                                 ("json", json.dumps(info, ensure_ascii=False, sort_keys=True).encode("utf-8"))):
                ti = tarfile.TarInfo(f"{row['key']}.{ext}")
                ti.size, ti.mtime, ti.mode = len(payload), _TAR_MTIME, 0o644
                ti.uid, ti.gid, ti.uname, ti.gname = 0, 0, "", ""
                tar.addfile(ti, io.BytesIO(payload))
    table = pa.table({
        "key": pa.array([m["key"] for m in meta], pa.string()),
        "caption": pa.array([m["caption"] for m in meta], pa.string()),
        "width": pa.array([m["width"] for m in meta], pa.int64()),
        "height": pa.array([m["height"] for m in meta], pa.int64()),
        "status": pa.array([m["status"] for m in meta], pa.string()),
        "url": pa.array([m["url"] for m in meta], pa.string()),
        "error_message": pa.array([None] * len(meta), pa.string()),
    })
    pq.write_table(table, out / f"{shard}.parquet")
    os.replace(tmp, out / f"{shard}.tar")
    return {"kind": kind, "shard": shard, "tar": str(out / f"{shard}.tar"), "parquet": str(out / f"{shard}.parquet"),
            "images": len(rows)}


def write_demo_corpus(
    out: Path,
    shards: int = 4,
    per_shard: int = 1000,
    seed: int = 0,
    size: int = 256,
    drift_shard: bool = False,
    generated: int = 120,
    *,
    workers: Optional[int] = None,
) -> dict[str, Any]:
    """Render the demo corpus into ``out`` (see the module docstring) and return a summary.

    ``workers`` processes render shards in parallel (default: one per shard up to the CPU count;
    1 renders in this process). The bytes written do not depend on it. The summary holds the paths
    (``tars``, ``parquets``, ``ground_truth``, ``generated_tar``, ``generated_parquet``,
    ``generated_truth``), ``images`` and counts per ``families`` / ``categories`` /
    ``hard_negatives`` / ``genders``, the duplicate structure (``dup_groups``, ``dup_members``,
    ``dup_pairs``, ``cross_shard_groups``), ``near_miss_clocks``, ``corrupt``, ``drift_shard``,
    ``generated`` ({kind: n}), the women/men caption ratios of the ground truth and ``seconds``.
    """
    import polars as pl

    if shards < 1 or per_shard < 1 or per_shard > 10_000 or shards + int(drift_shard) > 100_000:
        raise ValueError("need 1 <= per_shard <= 10000 and fewer than 100000 shards (keys are 5 + 4 digits)")
    started = time.perf_counter()
    out = Path(out)
    rows, gen = _plan(shards, per_shard, seed, drift_shard, generated)
    by_shard: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_shard[r["shard"]].append(r)
    foreign = sorted(p.name for p in out.glob("*.tar") if p.stem not in by_shard) if out.is_dir() else []
    if foreign:
        raise FileExistsError(f"{out} holds shards this corpus would not write ({', '.join(foreign[:5])}); "
                              "write the demo corpus into an empty directory")
    out.mkdir(parents=True, exist_ok=True)
    jobs = [("train", str(out), s, by_shard[s], size, seed) for s in sorted(by_shard)]
    if generated > 0:
        (out / "generated").mkdir(exist_ok=True)
        jobs.append(("generated", str(out / "generated"), "00000", gen, size, seed))
    n_workers = workers or min(len(jobs), os.cpu_count() or 1)
    if n_workers > 1 and len(jobs) > 1:
        import multiprocessing as mp

        # never fork: a caller with live thread pools (polars, faiss, onnxruntime) can leave a lock held in the
        # forked child, which then hangs; forkserver children start from a clean single-threaded server
        ctx = mp.get_context("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")
        with ctx.Pool(min(n_workers, len(jobs))) as pool:
            written = pool.map(_write_shard, sorted(jobs, key=lambda j: -len(j[3])), chunksize=1)
    else:
        written = [_write_shard(j) for j in jobs]
    written_by = {(w["kind"] == "generated", w["shard"]): w for w in written}

    truth = _truth_frame(rows)
    truth.write_parquet(out / "ground_truth.parquet")
    gen_schema = {"uid": pl.String, "kind": pl.String, "source_uid": pl.String, "family": pl.String,
                  "transform": pl.String}
    gen_truth = pl.DataFrame([{k: g[k] for k in gen_schema} for g in gen] or None, schema=gen_schema)
    gen_truth.write_parquet(out / "generated_truth.parquet")

    groups = Counter(r["dup_group"] for r in rows if r["dup_group"] is not None)
    group_shards: dict[int, set] = defaultdict(set)
    for r in rows:
        if r["dup_group"] is not None:
            group_shards[r["dup_group"]].add(r["shard"])
    base = truth.filter(pl.col("shard").cast(pl.Int64) < shards)
    shard_names = sorted(by_shard)
    return {
        "out": str(out), "seed": seed, "size": size,
        "shards": shard_names,
        "tars": [written_by[(False, s)]["tar"] for s in shard_names],
        "parquets": [written_by[(False, s)]["parquet"] for s in shard_names],
        "ground_truth": str(out / "ground_truth.parquet"),
        "generated_tar": written_by[(True, "00000")]["tar"] if generated > 0 else None,
        "generated_parquet": written_by[(True, "00000")]["parquet"] if generated > 0 else None,
        "generated_truth": str(out / "generated_truth.parquet"),
        "drift_shard": _shard_name(shards) if drift_shard else None,
        "images": len(rows),
        "per_shard": {s: len(by_shard[s]) for s in shard_names},
        "families": dict(Counter(r["family"] for r in rows)),
        "categories": dict(Counter(r["motif"] for r in rows if r["motif"] in ("violence", "sexual"))),
        "hard_negatives": dict(Counter(r["motif"][3:] for r in rows if r["motif"] and r["motif"].startswith("hn_"))),
        "genders": dict(Counter(r["gender"] for r in rows)),
        "dup_groups": len(groups),
        "dup_members": sum(groups.values()),
        "dup_pairs": sum(k * (k - 1) // 2 for k in groups.values()),
        "cross_shard_groups": sum(1 for s in group_shards.values() if len(s) > 1),
        "near_miss_clocks": sum(1 for r in rows if r["near_miss_of"] is not None),
        "corrupt": sum(1 for r in rows if r["corrupt_kind"] is not None),
        "generated": dict(Counter(g["kind"] for g in gen)),
        "women_men_ratio": bias_ratios(base),
        "seconds": round(time.perf_counter() - started, 2),
    }


def women_men_ratio(genders, weights=None) -> float:
    """(# captions mentioning women) / (# captions mentioning men); "mixed" counts for both."""
    g = np.asarray(genders, dtype=object)
    wts = np.ones(len(g)) if weights is None else np.asarray(weights, dtype=float)
    women = wts[(g == "women") | (g == "mixed")].sum()
    men = wts[(g == "men") | (g == "mixed")].sum()
    return float(women / men) if men > 0 else float("nan")


def bias_ratios(truth) -> dict[str, float]:
    """The planted bias effect from a ground-truth frame: women/men ratio of the captions raw,
    after removing every motif image, and after reweighting each family's kept images by
    1 / (1 - the fraction of that family removed). Corrupt rows are excluded (rejected at ingest)."""
    import polars as pl

    t = truth.filter(~pl.col("corrupt"))
    kept = t.filter(pl.col("category").is_null())
    removed = t.group_by("family").agg((pl.col("category").is_not_null().mean()).alias("removed"))
    kept = kept.join(removed, on="family").with_columns((1.0 / (1.0 - pl.col("removed"))).alias("w"))
    return {
        "raw": women_men_ratio(t["gender"].to_list()),
        "filtered": women_men_ratio(kept["gender"].to_list()),
        "reweighted": women_men_ratio(kept["gender"].to_list(), kept["w"].to_list()),
    }
