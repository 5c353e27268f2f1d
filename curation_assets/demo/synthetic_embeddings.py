"""Synthetic embeddings with the structure that makes near-duplicate search hard, for tests and benchmarks.

Real image embeddings are not uniform on the sphere: they form topics of very uneven size (a long tail of
rare topics and a few huge ones), topics group into broader themes, and near-duplicates are small
perturbations of one source image. The generator reproduces that:

- themes: random unit vectors; topics: ``normalize(theme + topic_spread * noise)``, sizes from a log-normal
  (heavy tail); points: ``normalize(topic + point_spread * noise)`` (same-topic cosine about 0.5);
- duplicate groups: a fraction of points become sources, each with 1..``max_copies`` copies at an exact
  cosine to the source drawn uniformly from ``dup_cosine`` (so copies can also be near the threshold).

Vectors are generated block-wise in float32 so a million 512-d points fit in about twice their size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class SyntheticEmbeddings:
    x: np.ndarray  # n x d float32, unit rows
    topic: np.ndarray  # topic per row
    dup_group: np.ndarray  # planted group id per row, -1 when not planted


def _unit(v: np.ndarray) -> np.ndarray:
    v /= np.linalg.norm(v, axis=-1, keepdims=True)
    return v


def synthetic_embeddings(
    n: int,
    d: int = 512,
    seed: int = 0,
    points_per_topic: float = 200.0,
    topics_per_theme: int = 20,
    topic_spread: float = 0.06,
    point_spread: float = 0.045,
    dup_fraction: float = 0.05,
    max_copies: int = 4,
    dup_cosine: tuple[float, float] = (0.92, 0.995),
    block: int = 65536,
) -> SyntheticEmbeddings:
    """``n`` unit vectors in ``d`` dimensions (planted duplicates included in ``n``)."""
    rng = np.random.default_rng(seed)
    n_topics = max(1, int(round(n / points_per_topic)))
    n_themes = max(1, n_topics // topics_per_theme)
    themes = _unit(rng.standard_normal((n_themes, d)).astype(np.float32))
    topics = _unit(themes[rng.integers(0, n_themes, n_topics)]
                   + topic_spread * rng.standard_normal((n_topics, d)).astype(np.float32))
    weights = rng.lognormal(0.0, 1.2, n_topics)
    weights /= weights.sum()

    # planted groups: sources and copies take n_dup rows, the rest are plain points
    n_sources = int(n * dup_fraction / (1 + (max_copies + 1) / 2))
    copies = rng.integers(1, max_copies + 1, n_sources)
    while n_sources and n_sources + copies.sum() > n:
        n_sources -= 1
        copies = copies[:n_sources]
    n_base = n - int(copies.sum())

    x = np.empty((n, d), dtype=np.float32)
    topic = rng.choice(n_topics, size=n, p=weights)
    for start in range(0, n_base, block):
        stop = min(n_base, start + block)
        noise = rng.standard_normal((stop - start, d), dtype=np.float32)
        x[start:stop] = _unit(topics[topic[start:stop]] + point_spread * noise)

    dup_group = np.full(n, -1, dtype=np.int64)
    sources = rng.choice(n_base, size=n_sources, replace=False)
    dup_group[sources] = np.arange(n_sources)
    row = n_base
    cos_lo, cos_hi = dup_cosine
    src_rows = np.repeat(sources, copies)
    for start in range(0, len(src_rows), block):
        src = src_rows[start:start + block]
        base = x[src]
        u = rng.standard_normal(base.shape, dtype=np.float32)
        u -= (u * base).sum(axis=1, keepdims=True) * base
        _unit(u)
        cos = rng.uniform(cos_lo, cos_hi, len(src)).astype(np.float32)[:, None]
        x[row:row + len(src)] = _unit(cos * base + np.sqrt(1 - cos ** 2) * u)
        topic[row:row + len(src)] = topic[src]
        dup_group[row:row + len(src)] = dup_group[src]
        row += len(src)
    perm = rng.permutation(n)
    return SyntheticEmbeddings(x=x[perm], topic=topic[perm], dup_group=dup_group[perm])
