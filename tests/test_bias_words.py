"""Caption word matching: boundaries, plurals, case, possessives, phrases, versions."""

import polars as pl
import pytest

from curation_assets.core.demographics import CaptionMatcher, DEFAULT_GROUPS

CASES = [
    ("A woman on the beach", {"women"}),
    ("two WOMEN walking", {"women"}),
    ("the woman's hat", {"women"}),
    ("the women’s room", {"women"}),          # curly apostrophe
    ("girls' toys", {"women"}),               # plural possessive
    ("a lady and two ladies", {"women"}),     # y -> ies plural
    ("a man and a woman", {"women", "men"}),
    ("MAN", {"men"}),
    ("the men's room", {"men"}),
    ("gentlemen only", {"men"}),
    ("woman-owned shop", {"women"}),          # hyphen is a boundary
    ("(man)", {"men"}),
    ("boys, girls", {"women", "men"}),
    ("a human and a manager", set()),         # 'man' inside words
    ("Batman and Superman", set()),
    ("a postman", set()),
    ("mankind", set()),
    ("a German shepherd", set()),
    ("womanhood", set()),
    ("sonnet season", set()),                 # 'son' inside words
    ("3men", set()),                          # digits are word characters
    ("", set()),
    (None, set()),
]


@pytest.mark.parametrize("caption, groups", CASES)
def test_groups_of(caption, groups):
    assert set(CaptionMatcher().groups_of(caption)) == groups


def test_polars_annotation_agrees_with_python_regex():
    m = CaptionMatcher()
    captions = [c for c, _ in CASES]
    flags = m.annotate(pl.Series(captions, dtype=pl.String))
    for i, caption in enumerate(captions):
        for g in m.group_names:
            assert flags[g][i] == (g in m.groups_of(caption)), (caption, g)
        for w in m.keywords:
            assert flags[f"kw:{w}"][i] == (w in m.keywords_of(caption)), (caption, w)


def test_config_groups_phrases_and_regular_plurals():
    m = CaptionMatcher({"elderly": ["old person", "grandmother"], "kids": ["child", "children", "baby"]})
    assert m.groups_of("an OLD  PERSON reading") == ["elderly"]
    assert m.groups_of("old persons") == ["elderly"]
    assert m.groups_of("grandmothers' tea") == ["elderly"]
    assert m.groups_of("two babies") == ["kids"]
    assert m.groups_of("childish drawing") == []


def test_version_changes_with_word_lists_only():
    a = CaptionMatcher(DEFAULT_GROUPS)
    b = CaptionMatcher({k: list(v) for k, v in DEFAULT_GROUPS.items()})
    c = CaptionMatcher({**DEFAULT_GROUPS, "women": DEFAULT_GROUPS["women"] + ["queen"]})
    assert a.version == b.version and a.version.startswith("words:")
    assert a.version != c.version


def test_bad_word_lists_are_rejected():
    with pytest.raises(ValueError):
        CaptionMatcher({})
    with pytest.raises(ValueError):
        CaptionMatcher({"women": []})


def test_clip_zero_shot_on_constructed_embeddings():
    import numpy as np

    from curation_assets.core.demographics import clip_zero_shot

    eye = np.eye(4, dtype=np.float32)
    prompts = {"women": np.stack([eye[0], eye[0]]), "men": eye[1:2], "none": eye[2:3]}
    images = np.stack([eye[0], eye[1], eye[2], (eye[0] + eye[1]) / np.sqrt(2), eye[3]])
    out = clip_zero_shot(images, prompts, neutral="none", logit_scale=100.0, min_probability=0.6)
    # the neutral class assigns nothing; a tie between groups and an image far from every prompt stay unassigned
    assert out == [["women"], ["men"], [], [], []]


def test_clip_source_only_with_real_open_clip_weights():
    from types import SimpleNamespace

    from curation_assets.bias import clip_enabled
    from curation_assets.core.demographics import BiasSettings
    from resources.settings import default_section

    cfg = BiasSettings.from_section(default_section("bias"))
    assert not clip_enabled(SimpleNamespace(kind="perceptual", pretrained=None), cfg)
    assert not clip_enabled(SimpleNamespace(kind="open_clip", pretrained=None), cfg)   # random weights
    assert clip_enabled(SimpleNamespace(kind="open_clip", pretrained="laion2b_s34b_b79k"), cfg)
