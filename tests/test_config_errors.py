"""Config errors surface when the code location loads and before `curate run` runs any step, naming the key."""

import pytest
import yaml
from click.testing import CliRunner

from curation_assets.core.validation import ConfigError

BAD = [
    ({"ingest": {"max_pixels": "1e9"}}, "ingest.max_pixels must be an integer, got '1e9' (YAML reads exponent"),
    ({"ingest": {"max_pixel": 5}}, "ingest: unknown keys ['max_pixel']"),
    ({"embeddings": {"encoder": "open_clip"}}, "embeddings: unknown keys ['encoder']"),
    ({"embeddings": {"batch_size": "big"}}, "embeddings.batch_size must be an integer"),
    ({"safety": {"classifier": {"C": "big"}}}, "safety.classifier.C must be a number"),
    ({"safety": {"categorie": []}}, "unknown keys ['categorie']"),
    ({"bias": {"confidence": "high"}}, "bias.confidence must be a number"),
    ({"bias": {"drift": {"alpha": "x"}}}, "bias.drift.alpha must be a number"),
    ({"bias": {"reweighting": {"max_weigth": 3}}}, "bias.reweighting: unknown keys ['max_weigth']"),
    ({"dedup": {"kmeans": {"k_max": "lots"}}}, "kmeans.k_max must be an integer"),
    ({"dedup": {"kmean": {}}}, "unknown keys ['kmean']"),
    ({"audits": {"census": {"face_sample_per_shard": "x"}}}, "audits.census.face_sample_per_shard must be an integer"),
    ({"audits": {"regurgitation": {"top_k": 3}}}, "unknown keys ['top_k']"),
    ({"dedupe": {}}, "unknown sections ['dedupe']"),
]


@pytest.mark.parametrize("config, message", BAD)
def test_code_location_load_names_the_bad_key(tmp_path, config, message):
    from curation_assets.definitions import build_definitions

    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError) as err:
        build_definitions(root=str(tmp_path / "root"), config_path=str(path))
    assert message in str(err.value)


def test_several_problems_are_reported_together(tmp_path):
    from curation_assets.definitions import build_definitions

    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"ingest": {"min_side": "8"}, "dedup": {"kmeans": {"niter": 0}}}))
    with pytest.raises(ConfigError) as err:
        build_definitions(root=str(tmp_path / "root"), config_path=str(path))
    assert "ingest.min_side" in str(err.value) and "kmeans.niter" in str(err.value)


def test_curate_run_stops_before_the_first_step(tmp_path, demo_corpus):
    from curation_assets.cli import main

    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"ingest": {"max_pixels": "1e9"}}))
    root = tmp_path / "root"
    result = CliRunner().invoke(main, ["run", "--shards-dir", str(demo_corpus), "--root", str(root),
                                       "--config", str(path)])
    assert result.exit_code == 2, result.output
    assert "ingest.max_pixels must be an integer" in result.stderr and "Traceback" not in result.output
    assert not (root / "delta").exists()


def test_a_non_failure_exception_is_reported_by_its_own_message(ingested, tmp_path):
    """An error raised by library code inside a step (not a dagster Failure) reaches the summary by its own
    words, not as "Error occurred while executing op"."""
    import shutil

    from curation_assets.runner import PartialRunError

    state = ingested.copy(tmp_path / "root")
    shutil.rmtree(state.root / "delta" / "image_embeddings")
    (state.root / "delta" / "image_embeddings").write_text("not a table")
    with pytest.raises(PartialRunError) as err:
        state.pipeline.materialize(["kmeans_centroids"], keep_going=True)
    message = str(err.value)
    assert "Error occurred while executing" not in message
    assert "kmeans_centroids: OSError" in message  # delta-rs's own words about the broken table
