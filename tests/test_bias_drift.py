"""The drift rule: significance AND effect size, Bonferroni over groups, reference choice, version reset."""

import pytest

from curation_assets.core.demographics import DriftSettings, compare_shares, drift_verdict, select_reference

V1, V2 = "words:aaaa", "words:bbbb"


def shard_counts(women, men, n):
    return {"women": (float(women), float(n)), "men": (float(men), float(n))}


def test_alerts_need_both_significance_and_effect():
    s = DriftSettings()
    ref = shard_counts(18_000, 10_000, 100_000)
    # a huge shard with a small change: significant but inside the band -> no alert
    big = compare_shares(shard_counts(16_500, 10_000, 100_000), ref, s)
    women = next(r for r in big if r["group"] == "women")
    assert women["significant"] and not women["outside_band"] and not women["tripped"]
    # a tiny shard with a large change: outside the band but not significant -> no alert
    small = compare_shares(shard_counts(1, 1, 10), ref, s)
    assert not any(r["tripped"] for r in small)
    assert any(r["outside_band"] for r in small)
    # a real drift: both trip, with ERROR beyond the error band
    drift = compare_shares(shard_counts(400, 1000, 5000), ref, s)
    by = {r["group"]: r for r in drift}
    assert by["women"]["tripped"] and by["men"]["tripped"]
    assert by["women"]["effect"] == pytest.approx(0.08 / 0.18)
    assert by["women"]["severity"] == "ERROR"                       # 0.44 is below the error band's 0.5
    assert by["men"]["effect"] == pytest.approx(0.2 / 0.1) and by["men"]["severity"] == "WARN"


def test_severity_and_bonferroni():
    s = DriftSettings(alpha=0.01, band=(0.8, 1.25), error_band=(0.5, 2.0))
    ref = shard_counts(1000, 1000, 10_000)       # shares 0.1 / 0.1
    rows = {r["group"]: r for r in compare_shares(shard_counts(40, 260, 1000), ref, s)}
    assert rows["women"]["effect"] == pytest.approx(0.4) and rows["women"]["severity"] == "ERROR"
    assert rows["men"]["effect"] == pytest.approx(2.6) and rows["men"]["severity"] == "ERROR"
    assert rows["women"]["level"] == pytest.approx(0.005)  # alpha / 2 groups
    # p between alpha/2 and alpha and the effect outside the band: only the correction prevents the alert
    borderline = {r["group"]: r for r in compare_shares(shard_counts(127, 100, 1000), ref, s)}
    women = borderline["women"]
    assert 0.005 < women["p_value"] < 0.01 and women["outside_band"]
    assert not women["significant"] and not women["tripped"]


def test_trailing_and_pinned_reference():
    versions = {f"{i:05d}": V1 for i in range(12)}
    s = DriftSettings(reference="trailing", trailing_shards=3)
    assert select_reference("00010", V1, versions, s) == ("compare", ["00007", "00008", "00009"])
    assert select_reference("00010", V1, versions, s, exclude={"00009"}) == ("compare", ["00006", "00007", "00008"])
    assert select_reference("00000", V1, versions, s) == ("reset", [])
    p = DriftSettings(reference="pinned", baseline_shards=2)
    assert select_reference("00005", V1, versions, p) == ("compare", ["00000", "00001"])
    assert select_reference("00001", V1, versions, p) == ("baseline", [])
    p2 = DriftSettings(reference="pinned", pinned_shards=["00003", "00004"])
    assert select_reference("00009", V1, versions, p2) == ("compare", ["00003", "00004"])


def test_version_change_resets_reference_instead_of_alerting():
    counts = {f"{i:05d}": shard_counts(180, 100, 1000) for i in range(4)}
    counts["00004"] = shard_counts(45, 200, 1000)            # drifted
    versions = {s: V1 for s in counts}
    s = DriftSettings()
    assert drift_verdict("00004", V1, counts, versions, s).status == "alert"
    # the same drifted shard measured with new word lists: no reference of that version -> reset
    versions["00004"] = V2
    verdict = drift_verdict("00004", V2, counts, versions, s)
    assert verdict.status == "reset" and not verdict.alerting and verdict.reference_shards == []
    # the next shard of the new version compares against the new reference only
    counts["00005"] = shard_counts(45, 200, 1000)
    versions["00005"] = V2
    nxt = drift_verdict("00005", V2, counts, versions, s)
    assert nxt.reference_shards == ["00004"]
    assert nxt.status in ("ok", "insufficient") and not nxt.alerting


def test_small_reference_gives_no_verdict_and_settings_validate():
    counts = {"00000": shard_counts(18, 10, 100), "00001": shard_counts(1, 30, 100)}
    versions = {"00000": V1, "00001": V1}
    assert drift_verdict("00001", V1, counts, versions, DriftSettings(min_reference_samples=200)).status == "insufficient"
    for bad in [dict(reference="median"), dict(band=(1.2, 0.8)), dict(band=(0.8, 1.25), error_band=(0.9, 1.1)),
                dict(alpha=0), dict(trailing_shards=0)]:
        with pytest.raises(ValueError):
            DriftSettings(**bad)


def test_a_drift_alert_is_raised_once_per_content_of_the_shard():
    """Every shard's ratios are recomputed when a new shard moves the global weights or dedup groups: the
    same counts recomputed later must not alert again, other counts for the shard must."""
    from curation_assets.bias_drift import drift_alert
    from curation_assets.core.demographics import BiasSettings, DriftVerdict
    from resources.settings import CurationSettings

    cfg = BiasSettings.from_section(CurationSettings().section("bias"))
    group = {"group": "women", "share": 0.08, "reference_share": 0.18, "effect": 0.44, "p_value": 1e-9,
             "tripped": True}
    verdict = DriftVerdict("00004", V1, "alert", "ERROR", ["00000", "00001"], [group])
    first = drift_alert(verdict, cfg, "2026-11-30 10:00:00", shard_counts(400, 1000, 5000))
    recomputed = drift_alert(verdict, cfg, "2026-11-30 10:05:00", shard_counts(400, 1000, 5000))
    changed = drift_alert(verdict, cfg, "2026-11-30 10:05:00", shard_counts(390, 1000, 5000))
    assert first.alert_id == recomputed.alert_id != changed.alert_id
