"""The automation policy (curation_assets/automation.py), evaluated tick by tick against a real instance."""

import datetime as dt

import dagster as dg
import pytest

from curation_assets.automation import GLOBAL

START = dt.datetime(2026, 11, 30, 10, 5, tzinfo=dt.timezone.utc)


class Ticks:
    """Evaluates the automation conditions like the automation sensor does, one tick at a time."""

    def __init__(self, tmp_path):
        from curation_assets.definitions import build_definitions

        self.defs = build_definitions(root=str(tmp_path / "root"), shards_dir=str(tmp_path / "shards"),
                                      refresh_cron="0 * * * *")
        self.instance = dg.DagsterInstance.ephemeral()
        self.cursor = None
        self.now = START

    def tick(self, minutes: float = 1) -> dict[str, set]:
        self.now += dt.timedelta(minutes=minutes)
        result = dg.evaluate_automation_conditions(self.defs, self.instance, cursor=self.cursor,
                                                   evaluation_time=self.now)
        self.cursor = result.cursor
        out = {}
        for key in self.defs.resolve_asset_graph().materializable_asset_keys:
            if result.get_num_requested(key):
                out[key.to_user_string()] = result.get_requested_partitions(key)
        return out

    def materialized(self, asset: str, partitions=(None,)) -> None:
        for partition in partitions:
            self.instance.report_runless_asset_event(dg.AssetMaterialization(asset, partition=partition))


@pytest.fixture
def ticks(tmp_path):
    t = Ticks(tmp_path)
    assert t.tick() == {}  # the first evaluation requests nothing
    return t


def test_a_new_shard_flows_to_its_ratios_and_nothing_global_runs(ticks):
    ticks.instance.add_dynamic_partitions("shards", ["00000", "00001"])
    requested = ticks.tick()
    # no centroids and no classifier yet: clustering and the safety stage wait, the ratios do not
    assert set(requested) == {"samples", "image_embeddings", "image_attributes", "demographic_ratios"}
    for asset in requested:
        assert requested[asset] == {"00000", "00001"}
    for asset in requested:
        ticks.materialized(asset, ["00000", "00001"])
    after = ticks.tick()
    assert set(after) == {"kmeans_centroids"}  # fitted once, when the first embeddings exist
    ticks.materialized("kmeans_centroids", [str(c) for c in range(1, 6)])
    assert set(ticks.tick()) == {"cluster_assignments"}  # every shard joins the fitted clusterings
    ticks.materialized("cluster_assignments", ["00000", "00001"])
    assert ticks.tick() == {}


def test_global_assets_refresh_once_per_cron_tick_after_new_shards(ticks):
    ticks.instance.add_dynamic_partitions("shards", ["00000"])
    for asset in ("samples", "image_embeddings", "cluster_assignments", "demographic_ratios"):
        ticks.materialized(asset, ["00000"])
    ticks.materialized("kmeans_centroids", [str(c) for c in range(1, 6)])
    assert not set(ticks.tick()) & set(GLOBAL)  # within the hour: nothing global
    refreshed = ticks.tick(minutes=60)  # the hourly tick passes: the whole global chain, in one evaluation
    assert {"duplicate_pairs", "dedup_groups", "deduplicated_samples", "dedup_recall", "dataset_census",
            "training_set", "overall_demographic_ratios", "curation_report", "labeling_queue"} <= set(refreshed)
    assert "safety_classifiers" not in refreshed and "sample_weights" not in refreshed  # no labels yet
    for asset in refreshed:
        ticks.materialized(asset)
    assert not set(ticks.tick(minutes=61)) & set(GLOBAL)  # nothing changed upstream: no second refresh


def test_shards_registered_before_automation_started_are_processed(tmp_path):
    t = Ticks(tmp_path)
    t.instance.add_dynamic_partitions("shards", ["00000"])
    assert t.tick()["samples"] == {"00000"}  # even on the very first evaluation
    t.materialized("samples", ["00000"])
    t.instance.add_dynamic_partitions("shards", ["00001"])
    assert t.tick()["samples"] == {"00001"}


def test_labels_retrain_the_classifiers_and_shards_do_not(ticks):
    ticks.instance.add_dynamic_partitions("shards", ["00000"])
    for asset in ("samples", "image_embeddings"):
        ticks.materialized(asset, ["00000"])
    assert "safety_classifiers" not in ticks.tick()
    ticks.materialized("labels")  # what `curate labels import` records
    requested = ticks.tick()
    assert "safety_classifiers" in requested and "safety_thresholds" in requested
    ticks.materialized("safety_classifiers")
    ticks.materialized("safety_thresholds")
    rescored = ticks.tick()
    assert rescored.get("safety_scores") == {"00000"} and rescored.get("filtered_samples") == {"00000"}
    assert "safety_classifiers" not in rescored
