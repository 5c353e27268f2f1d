"""Settings are versioned per asset: a changed setting marks exactly the assets it changes stale, as the UI
shows them (the resolver the UI itself uses, a private Dagster API used only here, over a real instance), and secrets stay environment
variables."""

from __future__ import annotations

import dagster as dg
import pytest
import yaml
from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleStatus
from dagster._core.loader import LoadingContextForTest

from curation_assets.config import SETTINGS_OF
from curation_assets.definitions import build_definitions


def _defs(tmp_path, config: dict, name: str, shards=None) -> dg.Definitions:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return build_definitions(root=str(tmp_path / "root"), shards_dir=str(shards or tmp_path / "shards"),
                             config_path=str(path))


def _versions(defs: dg.Definitions) -> dict[str, str]:
    graph = defs.resolve_asset_graph()
    return {key.to_user_string(): graph.get(key).code_version for key in graph.get_all_asset_keys()}


def test_every_asset_declares_the_settings_that_change_it(tmp_path):
    versions = _versions(_defs(tmp_path, {}, "defaults"))
    assert set(versions) == set(SETTINGS_OF)
    assert all(v and v.startswith("settings-") for v in versions.values())


@pytest.mark.parametrize("change, affected", [
    ({"dedup": {"verify": {"colour_threshold": 6.0}}}, {"duplicate_pairs"}),
    ({"dedup": {"kmeans": {"seed": 7}}}, {"kmeans_centroids", "cluster_assignments"}),
    ({"ingest": {"min_side": 16}}, {"samples"}),
    ({"bias": {"reweighting": {"max_weight": 5.0}}}, {"sample_weights"}),
    ({"safety": {"active_learning": {"batch_size": 50}}}, {"labeling_queue"}),
    ({"audits": {"census": {"group_by": "format"}}}, {"dataset_census"}),
    ({"audits": {"attributes": {"sample_per_shard": 200}}}, {"image_attributes"}),
    ({"embeddings": {"batch_size": 64}}, set()),
    ({"bias": {"drift": {"alpha": 0.01}}}, set()),
])
def test_a_changed_setting_changes_the_versions_of_exactly_its_assets(tmp_path, change, affected):
    before = _versions(_defs(tmp_path, {}, "before"))
    after = _versions(_defs(tmp_path, change, "after"))
    assert {name for name in before if before[name] != after[name]} == affected


def test_the_ui_marks_the_assets_of_a_changed_setting_stale(tmp_path, demo_corpus):
    shard = "00000"
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("shards", [shard])
    first = _defs(tmp_path, {}, "first", shards=demo_corpus)
    result = first.resolve_implicit_global_asset_job_def().execute_in_process(
        instance=instance, asset_selection=[dg.AssetKey("samples")], partition_key=shard)
    assert result.success
    materialization = instance.get_latest_materialization_event(dg.AssetKey("samples")).asset_materialization
    assert materialization.tags["dagster/code_version"] == _versions(first)["samples"]

    def status(defs: dg.Definitions) -> StaleStatus:
        resolver = CachingStaleStatusResolver(instance, defs.resolve_asset_graph(), LoadingContextForTest(instance))
        return resolver.get_status(dg.AssetKey("samples"), shard)

    assert status(first) == StaleStatus.FRESH
    assert status(_defs(tmp_path, {"dedup": {"verify": {"colour_threshold": 6.0}}}, "other", demo_corpus)) \
        == StaleStatus.FRESH
    changed = _defs(tmp_path, {"ingest": {"min_side": 16}}, "changed", demo_corpus)
    assert status(changed) == StaleStatus.STALE
    causes = CachingStaleStatusResolver(instance, changed.resolve_asset_graph(), LoadingContextForTest(instance)
                                        ).get_stale_causes(dg.AssetKey("samples"), shard)
    assert any("code version" in cause.reason for cause in causes), causes


def test_the_settings_show_on_each_asset_definition(tmp_path):
    defs = _defs(tmp_path, {"dedup": {"verify": {"colour_threshold": 6.0}}}, "shown")
    spec = defs.resolve_asset_graph().get(dg.AssetKey("duplicate_pairs"))
    shown = spec.metadata["settings"].value
    assert shown["dedup.verify"]["colour_threshold"] == 6.0 and "dedup.threshold" in shown


def test_alert_secrets_are_environment_variables(tmp_path, monkeypatch):
    monkeypatch.setenv("CURATION_SLACK_TOKEN", "xoxb-secret")
    monkeypatch.setenv("CURATION_SLACK_CHANNEL", "#curation")
    monkeypatch.delenv("CURATION_ALERT_WEBHOOK", raising=False)
    sink = _defs(tmp_path, {}, "alerts").resources["alerts"]
    assert isinstance(sink.slack_token, dg.EnvVar) and sink.slack_token.env_var_name == "CURATION_SLACK_TOKEN"
    assert sink.slack_token.get_value() == "xoxb-secret" and sink.webhook_url is None
