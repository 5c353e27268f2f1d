"""Stage-2 pixel verification on constructed images where the answer is known."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageEnhance

from curation_assets.core.dedup import DedupSettings
from curation_assets.core.pixel_verify import VerifySettings, calibrate, verify_pair, verify_pairs
from curation_assets.core.perceptual import near_duplicate, reference_images

CFG = VerifySettings()


def _jpeg(im: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    im.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _banner(text: str, colour=(30, 60, 160), frame: bool = True, dx: int = 0) -> Image.Image:
    im = Image.new("RGB", (256, 128), colour)
    d = ImageDraw.Draw(im)
    if frame:
        d.rectangle([8, 8, 247, 119], outline=(250, 250, 245), width=3)
    d.text((128 + dx, 64), text, fill=(250, 250, 245), font=ImageFont_default(56), anchor="mm")
    return im


def ImageFont_default(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def _clock(hour: int, minute: int) -> Image.Image:
    im = Image.new("RGB", (256, 256), (240, 240, 235))
    d = ImageDraw.Draw(im)
    d.ellipse([28, 28, 228, 228], outline=(20, 20, 20), width=6, fill=(255, 255, 250))
    for k in range(12):
        a = k * np.pi / 6
        d.line([128 + 88 * np.sin(a), 128 - 88 * np.cos(a), 128 + 96 * np.sin(a), 128 - 96 * np.cos(a)],
               fill=(20, 20, 20), width=4)
    for length, angle, width in ((55, (hour % 12 + minute / 60) * np.pi / 6, 8), (85, minute * np.pi / 30, 5)):
        d.line([128, 128, 128 + length * np.sin(angle), 128 - length * np.cos(angle)], fill=(20, 20, 20), width=width)
    return im


def test_accepts_transformed_copies():
    banner = _banner("SALE")
    copies = [
        banner.crop((10, 6, 246, 124)),                                     # crop ~86% of the area
        banner.resize((160, 80), Image.BILINEAR),                           # resize 0.625
        ImageEnhance.Brightness(banner).enhance(1.15),
        ImageEnhance.Contrast(banner).enhance(0.85),
    ]
    scores = [verify_pair(_jpeg(banner), _jpeg(c, 40), CFG) for c in copies]
    assert all(s.passes(CFG) for s in scores), scores
    assert verify_pair(_jpeg(banner), _jpeg(banner, 30), CFG).passes(CFG)


def test_rejects_other_text_other_time_other_palette():
    assert not verify_pair(_jpeg(_banner("SALE")), _jpeg(_banner("OPEN")), CFG).passes(CFG)
    assert not verify_pair(_jpeg(_clock(3, 10)), _jpeg(_clock(8, 40)), CFG).passes(CFG)
    # same layout and text, another palette: structure agrees, colour does not
    other = verify_pair(_jpeg(_banner("SALE", (30, 60, 160))), _jpeg(_banner("SALE", (200, 40, 40))), CFG)
    assert other.structure >= CFG.structure_threshold and not other.passes(CFG)


def test_reference_scenes_copies_pass_distinct_fail():
    rng = np.random.default_rng(11)
    scenes = reference_images(21, seed=99)
    pos = verify_pairs([(_jpeg(im), _jpeg(near_duplicate(im, rng, ["crop", "resize", "jpeg"]))) for im in scenes[:20]])
    neg = verify_pairs([(_jpeg(scenes[i]), _jpeg(scenes[i + 1])) for i in range(20)])
    assert sum(v.passes(CFG) for v in pos) >= 18
    assert sum(v.passes(CFG) for v in neg) == 0


def test_undecodable_never_verifies():
    v = verify_pair(b"not an image", _jpeg(_banner("SALE")), CFG)
    assert v.structure == -1.0 and not v.passes(CFG)


def test_calibration_reports_thresholds():
    # fresh calibration scenes (seed 5, not the defaults' seed): the defaults keep most copies, no distinct pair
    report = calibrate(n=40, seed=5)
    assert report["structure_threshold"] <= report["positive_structure"]["median"] and report["colour_threshold"] > 0
    assert report["positive_pass_rate_at_defaults"] >= 0.8 and report["negative_pass_rate_at_defaults"] == 0.0


def test_settings_validation():
    cfg = DedupSettings.from_section({"verify": {"enabled": False, "structure_threshold": 0.5}}).verification
    assert cfg.enabled is False and cfg.structure_threshold == 0.5 and not cfg.active("perceptual-v1")
    auto = DedupSettings.from_section({}).verification
    assert auto.active("perceptual-v1") and not auto.active("open_clip:ViT-B-32")
    with pytest.raises(ValueError, match="verify"):
        DedupSettings.from_section({"verify": {"colour_threshold": -1}})
    with pytest.raises(ValueError, match="unknown keys"):
        DedupSettings.from_section({"verify": {"nope": 1}})


def test_thumbnails_come_from_the_encoders_decode_and_keep_the_aspect():
    import cv2

    from curation_assets.core.perceptual import PerceptualEncoder
    from curation_assets.core.pixel_verify import thumbnail_of
    from curation_assets.core.thumbnails import THUMBNAIL_WIDTH

    blobs = [_jpeg(_banner("SALE")), _jpeg(_clock(3, 10)), _jpeg(_banner("OPEN").rotate(90, expand=True))]
    encoder = PerceptualEncoder()
    vectors, thumbs = encoder.encode_bytes(blobs, thumbnails=True)
    assert np.array_equal(vectors, encoder.encode_bytes(blobs))
    assert thumbs == [thumbnail_of(b) for b in blobs]
    shapes = [cv2.imdecode(np.frombuffer(t, np.uint8), cv2.IMREAD_COLOR).shape[:2] for t in thumbs]
    assert shapes == [(THUMBNAIL_WIDTH // 2, THUMBNAIL_WIDTH), (THUMBNAIL_WIDTH, THUMBNAIL_WIDTH),
                      (2 * THUMBNAIL_WIDTH, THUMBNAIL_WIDTH)]
    assert max(len(t) for t in thumbs) < 16_000 and thumbnail_of(b"not an image") is None


def test_threads_blocks_and_order_give_the_same_verdicts():
    from curation_assets.core.pixel_verify import _PAIR_BLOCK, thumbnail_of, verify_thumbnails

    rng = np.random.default_rng(3)
    scenes = reference_images(12, seed=31)
    thumbs = {}
    for i, im in enumerate(scenes):
        thumbs[("a", i)] = thumbnail_of(_jpeg(im))
        thumbs[("b", i)] = thumbnail_of(_jpeg(near_duplicate(im, rng, ["crop", "jpeg"])))
    pairs = [(("a", i % 12), ("b", (i * 7) % 12)) for i in range(_PAIR_BLOCK + 40)]  # two blocks
    one = verify_thumbnails(pairs, thumbs, VerifySettings(workers=1))
    two = verify_thumbnails(pairs, thumbs, VerifySettings(workers=2))
    assert one == two and sum(v.passes(CFG) for v in one) >= 40
    # results come back in the order given, whatever block a pair was scored in
    assert verify_thumbnails(pairs[::-1], thumbs, VerifySettings(workers=2)) == one[::-1]
    alone = {p: verify_thumbnails([p], thumbs, VerifySettings(workers=1))[0] for p in set(pairs)}
    assert all(v == alone[p] for p, v in zip(pairs, one))
    same = [i == (i * 7) % 12 for i in range(12)]  # the even i pair a scene with its own copy
    assert not any(v.passes(CFG) for v, s in zip(one[:12], same) if not s)
    assert sum(v.passes(CFG) for v, s in zip(one[:12], same) if s) >= 4


def test_blocks_bound_pairs_and_images():
    from curation_assets.core.pixel_verify import _BLOCK_IMAGES, _PAIR_BLOCK, _blocks, _by_component

    rng = np.random.default_rng(5)
    pairs = [(int(a), int(b)) for a, b in rng.integers(0, 3000, (4000, 2)) if a != b]
    pairs += [(9000, 9001)] * 700  # one pair repeated: a block of it holds two images
    ordered = [pairs[i] for i in _by_component(pairs)]
    spans = _blocks(ordered)
    assert spans[0][0] == 0 and spans[-1][1] == len(ordered)
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    for start, stop in spans:
        assert 0 < stop - start <= _PAIR_BLOCK
        assert len({k for pair in ordered[start:stop] for k in pair}) <= _BLOCK_IMAGES
    assert sorted(_by_component(pairs).tolist()) == list(range(len(pairs)))
