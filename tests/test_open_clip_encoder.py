"""The open_clip encoder behind EncoderResource, on a tiny random-initialised architecture.

No weights can be downloaded here, so the model is a registered tiny config (ViT width 64, 2 layers,
patch 16, 64 px; text width 64, 1 layer) with ``allow_random_weights=True``, and a local checkpoint
saved from it. What is tested is the loading contract and the batching/decoding machinery, not accuracy.
"""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
from PIL import Image

os.environ["HF_HUB_OFFLINE"] = "1"

from resources.encoders import EncoderConfigError, EncoderResource  # noqa: E402

TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 64, "heads": 2, "layers": 1},
}


def test_open_clip_imports():
    """open_clip is a core dependency: an install whose torchvision does not match torch must fail here, not skip."""
    import open_clip

    assert hasattr(open_clip, "create_model")


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("oc") / "tiny-vit-test.json"
    path.write_text(json.dumps(TINY))
    return str(path)


def _resource(tiny_config: str, **kw) -> EncoderResource:
    base = dict(kind="open_clip", model_config_path=tiny_config, allow_random_weights=True, device="cpu",
                batch_size=7, num_workers=0)
    base.update(kw)
    return EncoderResource(**base)


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(17):
        size = (int(rng.integers(40, 200)), int(rng.integers(40, 200)))
        arr = (rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)
        out.append(Image.fromarray(arr, "RGB") if i % 4 else Image.fromarray(arr[..., 0], "L"))
    return out


@pytest.fixture(scope="module")
def encoder(tiny_config):
    import torch

    torch.manual_seed(0)
    return _resource(tiny_config).load()


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def test_shape_norm_and_name(encoder, images):
    x = encoder.encode_images(images)
    assert x.shape == (len(images), 32) and x.dtype == np.float32 and x.flags.c_contiguous
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    assert encoder.dim == 32
    assert encoder.name == "open_clip:tiny-vit-test:RANDOM-UNTRAINED"
    assert encoder.encode_images([]).shape == (0, 32)
    # random weights still see the input: different images, different vectors
    assert float(x[1] @ x[2]) < 0.9999


def test_batching_invariance_and_determinism(tiny_config, encoder, images):
    batched = encoder.encode_images(images)
    one_by_one = _resource(tiny_config, batch_size=1).load()
    one_by_one.model.load_state_dict(encoder.model.state_dict())
    np.testing.assert_allclose(one_by_one.encode_images(images), batched, atol=1e-5)
    np.testing.assert_array_equal(encoder.encode_images(images), batched)


def test_encode_bytes_equals_encode_images_with_dataloader_workers(tiny_config, encoder, images):
    with_workers = _resource(tiny_config, num_workers=2).load()
    with_workers.model.load_state_dict(encoder.model.state_dict())
    blobs = [_png(im) for im in images]
    from_bytes = with_workers.encode_bytes(blobs)
    np.testing.assert_allclose(from_bytes, encoder.encode_images(images), atol=1e-6)
    np.testing.assert_allclose(encoder.encode_bytes(blobs), from_bytes, atol=1e-6)
    assert with_workers.encode_bytes([]).shape == (0, 32)


def test_local_checkpoint_loads_the_saved_weights(tmp_path, tiny_config, encoder, images):
    import torch

    checkpoint = tmp_path / "tiny-epoch1.pt"
    torch.save({"state_dict": encoder.model.state_dict()}, checkpoint)
    loaded = _resource(tiny_config, pretrained=str(checkpoint), allow_random_weights=False).load()
    assert loaded.name == "open_clip:tiny-vit-test:tiny-epoch1.pt"
    np.testing.assert_allclose(loaded.encode_images(images), encoder.encode_images(images), atol=1e-6)


def test_missing_checkpoint_is_a_clear_error(tmp_path, tiny_config):
    missing = tmp_path / "nowhere" / "model.pt"
    with pytest.raises(EncoderConfigError, match="does not exist") as info:
        _resource(tiny_config, pretrained=str(missing), allow_random_weights=False).load()
    assert str(missing) in str(info.value)


def test_unknown_pretrained_tag_is_a_clear_error(tiny_config):
    with pytest.raises(EncoderConfigError, match="not_a_real_tag"):
        _resource(tiny_config, pretrained="not_a_real_tag").load()
    with pytest.raises(EncoderConfigError, match="nonexistent_tag.*ViT-B-32"):
        EncoderResource(kind="open_clip", model="ViT-B-32", pretrained="nonexistent_tag", device="cpu").load()


def test_random_weights_are_refused_unless_allowed(tiny_config):
    with pytest.raises(EncoderConfigError, match="allow_random_weights"):
        _resource(tiny_config, allow_random_weights=False).load()


def test_bad_options_are_rejected(tiny_config, tmp_path):
    with pytest.raises(EncoderConfigError, match="does not exist"):
        _resource(str(tmp_path / "missing.json")).load()
    with pytest.raises(EncoderConfigError, match="no model config"):
        EncoderResource(kind="open_clip", model="No-Such-Model", allow_random_weights=True, device="cpu").load()
    with pytest.raises(EncoderConfigError, match="precision"):
        _resource(tiny_config, precision="int3").load()
    with pytest.raises(EncoderConfigError, match="fp16"):
        _resource(tiny_config, precision="fp16").load()
    with pytest.raises(EncoderConfigError, match="kind"):
        EncoderResource(kind="magic").load()


def test_bf16_autocast_on_cpu_stays_close_to_fp32(tiny_config, encoder, images):
    bf16 = _resource(tiny_config, precision="bf16").load()
    bf16.model.load_state_dict(encoder.model.state_dict())
    x = bf16.encode_images(images)
    assert x.dtype == np.float32
    cos = np.sum(x * encoder.encode_images(images), axis=1)
    assert cos.min() > 0.98


@pytest.mark.gpu
def test_cuda_fp16_matches_cpu_fp32(tiny_config, encoder, images):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    gpu = _resource(tiny_config, device="auto", precision="auto", num_workers=2).load()
    assert gpu.device == "cuda" and gpu.precision == "fp16"
    gpu.model.load_state_dict(encoder.model.state_dict())
    blobs = [_png(im) for im in images]
    x = gpu.encode_bytes(blobs)
    assert x.dtype == np.float32 and x.shape == (len(images), 32)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-3)
    assert np.sum(x * encoder.encode_images(images), axis=1).min() > 0.99
    np.testing.assert_allclose(gpu.encode_images(images), x, atol=2e-3)
