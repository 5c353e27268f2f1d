"""Image encoders as a resource: the weight-free perceptual encoder (default) and open_clip.

Both loaded encoders share one small interface that the ``image_embeddings`` asset relies on:

- ``name``: the string written to every row's ``encoder`` column (``"perceptual-v1"``,
  ``"open_clip:ViT-B-32:laion2b_s34b_b79k"``, ``"open_clip:ViT-B-32:RANDOM-UNTRAINED"`` ...), so a table
  always says which model produced its vectors;
- ``dim``: the embedding width;
- ``encode_images(list[PIL.Image]) -> np.ndarray`` and ``encode_bytes(list[bytes]) -> np.ndarray``:
  ``(n, dim)`` float32, C-contiguous, every row L2-normalised.

``EncoderResource.load()`` builds the model once; call it once per step and reuse the result for every
shard of the step. torch and open_clip are imported only inside ``load()`` and the open_clip encoder, so
importing this module (as Dagster does for every process) stays cheap.
"""

from __future__ import annotations

from typing import Any, Optional

import dagster as dg
from pydantic import Field

from curation_assets.core.clip_encoder import EncoderConfigError, OpenClipEncoder

KINDS = ("perceptual", "open_clip")


class EncoderResource(dg.ConfigurableResource):
    """The image encoder of the ``image_embeddings`` stage.

    ``kind="perceptual"`` (the default) is the weight-free ``perceptual-v1`` encoder: deterministic, fast on
    CPU, made for near-duplicate detection, *not* a semantic model. ``kind="open_clip"`` is the real
    encoder: ``model`` names an open_clip architecture, ``pretrained`` a pretrained tag or a local
    checkpoint path, ``model_config_path`` a config JSON for a custom architecture (its file stem becomes the
    model name). Without usable weights loading fails with an error that names what is missing; random
    weights are used only with ``allow_random_weights=True`` and then the encoder name says
    ``RANDOM-UNTRAINED``.
    """

    kind: str = Field(default="perceptual", description="'perceptual' (weight-free, CPU) or 'open_clip'")
    model: str = Field(default="ViT-B-32", description="open_clip model name")
    pretrained: Optional[str] = Field(default=None, description="open_clip pretrained tag or local checkpoint path")
    model_config_path: Optional[str] = Field(
        default=None, description="path to an open_clip model-config JSON (a custom architecture)"
    )
    allow_random_weights: bool = Field(default=False, description="tests only: allow an untrained open_clip model")
    device: str = Field(default="auto", description="'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1'")
    precision: str = Field(default="auto", description="'auto' (fp16 on cuda, fp32 on cpu), 'fp16', 'bf16', 'fp32'")
    batch_size: int = Field(default=256, description="images per forward pass")
    num_workers: int = Field(default=2, description="decoding workers (DataLoader processes / perceptual threads)")

    def identity(self) -> dict[str, Any]:
        """What decides the vectors this resource produces (recorded in the code version of the assets that
        embed images)."""
        if self.kind == "perceptual":
            return {"kind": self.kind}
        return {"kind": self.kind, "model": self.model, "pretrained": self.pretrained,
                "model_config_path": self.model_config_path}

    def load(self):
        """Build the encoder (loads weights once); returns an object with name, dim, encode_images, encode_bytes."""
        if self.kind == "perceptual":
            from curation_assets.core.perceptual import PerceptualEncoder

            return PerceptualEncoder(num_workers=self.num_workers, batch_size=self.batch_size)
        if self.kind == "open_clip":
            return OpenClipEncoder(
                model=self.model,
                pretrained=self.pretrained,
                model_config=self.model_config_path,
                allow_random_weights=self.allow_random_weights,
                device=self.device,
                precision=self.precision,
                batch_size=self.batch_size,
                num_workers=self.num_workers,
            )
        raise EncoderConfigError(f"encoder kind={self.kind!r}: expected one of {KINDS}")
