"""The CLIP zero-shot attribute source, wired to a tiny random-initialised open_clip model (plumbing only:
random weights mean nothing, which is why the pipeline itself uses this source only with real weights)."""

import numpy as np
import polars as pl

from curation_assets import bias
from curation_assets.core import delta
from curation_assets.core.clip_bias import write_tiny_model_config
from resources.encoders import EncoderResource
from resources.settings import default_section
from resources.storage import DeltaStorage


def test_clip_attributes_from_the_encoders_text_tower(tmp_path):
    config = write_tiny_model_config(tmp_path / "tiny-bias-clip.json")
    encoder = EncoderResource(kind="open_clip", model_config_path=str(config), allow_random_weights=True)
    loaded = encoder.load()
    storage = DeltaStorage(root=str(tmp_path / "root"))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((12, loaded.dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    uids = [f"00000/00000{i:04d}" for i in range(12)]
    storage.write_shard("image_embeddings", delta.embeddings_frame(uids, ["00000"] * 12, x, loaded.name), "00000")
    cfg = bias.BiasSettings.from_section({**default_section("bias"), "clip": {**default_section("bias")["clip"],
                                                                              "min_probability": 0.0}})
    source = bias.clip_attributes(storage, "00000", pl.Series("uid", uids[::-1]), encoder, cfg)
    assert source.name == "clip" and source.version.startswith("clip:")
    assert source.groups == ["women", "men"] and source.pairs == [("women", "men")]
    assert source.frame["uid"].to_list() == uids[::-1]
    # with min_probability 0 every image joins its argmax class: women, men, or the neutral class (no group)
    text = bias._clip_text_embeddings(encoder, cfg.clip.prompts)
    assert set(text) == {"women", "men", "none"} and text["women"].shape == (3, loaded.dim)
    assert np.allclose(np.linalg.norm(text["men"], axis=1), 1.0, atol=1e-5)
    assert not (source.frame["women"] & source.frame["men"]).any()
    # another prompt list is another version
    other = bias.BiasSettings.from_section({**default_section("bias"), "clip": {
        **default_section("bias")["clip"], "prompts": {"women": ["a woman"], "men": ["a man"], "none": ["a thing"]}}})
    assert bias.clip_attributes(storage, "00000", pl.Series("uid", uids), encoder, other).version != source.version
