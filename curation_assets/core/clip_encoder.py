"""The open_clip image encoder (Dagster-free): a model loaded once, images decoded and preprocessed in
DataLoader workers, the forward pass under fp16 / bf16 autocast on CUDA. ``resources.encoders`` wraps it
as the ``encoder`` resource; benchmarks call it directly."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

PRECISIONS = ("auto", "fp16", "bf16", "fp32")
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


class EncoderConfigError(ValueError):
    """The encoder configuration cannot produce a trustworthy model (missing weights, bad option)."""


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EncoderConfigError(f"device={device!r} was requested but CUDA is not available on this machine")
    return device


def _resolve_precision(precision: str, device: str) -> str:
    if precision not in PRECISIONS:
        raise EncoderConfigError(f"precision={precision!r}: expected one of {PRECISIONS}")
    on_gpu = device.startswith("cuda")
    if precision == "auto":
        return "fp16" if on_gpu else "fp32"
    if precision == "fp16" and not on_gpu:
        raise EncoderConfigError("precision='fp16' needs a CUDA device; use 'bf16' or 'fp32' on CPU")
    return precision


def _looks_like_path(value: str) -> bool:
    return os.sep in value or value.startswith((".", "~")) or value.lower().endswith(_CHECKPOINT_SUFFIXES)


def _decode_rgb(data: bytes):
    from PIL import Image

    from curation_assets.core.images import upright

    image = Image.open(io.BytesIO(data))
    image.load()
    return upright(image).convert("RGB")


class _BytesDataset:
    """A map-style dataset over encoded images: decoding and preprocessing run in DataLoader workers."""

    def __init__(self, blobs: Sequence[bytes], transform):
        self.blobs = blobs
        self.transform = transform

    def __len__(self) -> int:
        return len(self.blobs)

    def __getitem__(self, i: int):
        return self.transform(_decode_rgb(self.blobs[i]))


class OpenClipEncoder:
    """An open_clip image tower, loaded once; see ``resources.encoders.EncoderResource`` for the options.

    On CUDA, batches are pinned and copied ``non_blocking`` and the forward pass runs under autocast
    (fp16 or bf16); weights stay fp32 so the same checkpoint serves every precision.
    """

    def __init__(
        self,
        model: str = "ViT-B-32",
        pretrained: Optional[str] = None,
        model_config: Optional[str] = None,
        allow_random_weights: bool = False,
        device: str = "auto",
        precision: str = "auto",
        batch_size: int = 256,
        num_workers: int = 2,
    ):
        import open_clip
        import torch

        self.device = _resolve_device(device)
        self.precision = _resolve_precision(precision, self.device)
        self.batch_size = max(1, int(batch_size))
        self.num_workers = max(0, int(num_workers))

        model_name = model
        if model_config:
            config_path = Path(model_config).expanduser()
            if not config_path.is_file():
                raise EncoderConfigError(f"open_clip model config {str(config_path)!r} does not exist")
            open_clip.add_model_config(config_path)
            model_name = config_path.stem
        if open_clip.get_model_config(model_name) is None:
            raise EncoderConfigError(
                f"open_clip has no model config named {model_name!r}; pass model_config_path=<a config JSON> "
                f"for a custom architecture (built-in: {', '.join(open_clip.list_models()[:8])}, ...)"
            )

        if pretrained is None:
            if not allow_random_weights:
                raise EncoderConfigError(
                    f"open_clip model {model_name!r} has no weights: set pretrained to a pretrained tag or a local "
                    "checkpoint path. Random weights are refused unless allow_random_weights=True (tests only)."
                )
            weights_label = "RANDOM-UNTRAINED"
        else:
            known_tags = open_clip.list_pretrained_tags_by_model(model_name)
            if pretrained in known_tags:
                weights_label = pretrained
            else:
                checkpoint = Path(pretrained).expanduser()
                if checkpoint.is_file():
                    pretrained = str(checkpoint)
                    weights_label = checkpoint.name
                elif _looks_like_path(pretrained):
                    raise EncoderConfigError(
                        f"open_clip checkpoint {str(checkpoint)!r} for model {model_name!r} does not exist"
                    )
                else:
                    raise EncoderConfigError(
                        f"pretrained={pretrained!r} is neither a pretrained tag of open_clip model {model_name!r} "
                        f"(known tags: {known_tags or 'none'}) nor an existing checkpoint file"
                    )
        try:
            self.model, _, self.preprocess = open_clip.create_model_and_transforms(
                model_name,
                pretrained=pretrained,
                device=self.device,
                precision="fp32",
                pretrained_text=False,
            )
        except Exception as exc:  # weights of a known tag that are not in the local cache, a bad checkpoint
            raise EncoderConfigError(
                f"could not load open_clip weights {pretrained!r} for model {model_name!r} (this machine may have "
                f"no network and no cached copy; pass a local checkpoint path instead): {exc}"
            ) from exc
        self.model.eval()
        self.name = f"open_clip:{model_name}:{weights_label}"
        from PIL import Image

        with torch.inference_mode():
            probe = self.preprocess(Image.new("RGB", (32, 32))).unsqueeze(0).to(self.device)
            self.dim = int(self.model.encode_image(probe).shape[-1])

    def _autocast(self):
        import contextlib

        import torch

        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.float16 if self.precision == "fp16" else torch.bfloat16
        return torch.autocast(device_type="cuda" if self.device.startswith("cuda") else "cpu", dtype=dtype)

    def _forward(self, batch) -> np.ndarray:
        import torch

        with torch.inference_mode(), self._autocast():
            features = self.model.encode_image(batch.to(self.device, non_blocking=True))
        features = torch.nn.functional.normalize(features.float(), dim=-1)
        return features.cpu().numpy()

    def _finish(self, parts: list[np.ndarray]) -> np.ndarray:
        if not parts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)

    def encode_images(self, images: Sequence[Any]) -> np.ndarray:
        import torch

        parts = []
        pin = self.device.startswith("cuda")
        for start in range(0, len(images), self.batch_size):
            batch = torch.stack([self.preprocess(im.convert("RGB")) for im in images[start : start + self.batch_size]])
            parts.append(self._forward(batch.pin_memory() if pin else batch))
        return self._finish(parts)

    def encode_bytes(self, blobs: Sequence[bytes]) -> np.ndarray:
        """Decode + preprocess in a torch DataLoader (``num_workers`` processes), encode on the device."""
        from torch.utils.data import DataLoader

        if len(blobs) == 0:
            return self._finish([])
        batches = -(-len(blobs) // self.batch_size)
        workers = min(self.num_workers, batches)
        loader = DataLoader(
            _BytesDataset(list(blobs), self.preprocess),
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=workers,
            pin_memory=self.device.startswith("cuda"),
            prefetch_factor=2 if workers else None,
        )
        return self._finish([self._forward(batch) for batch in loader])
