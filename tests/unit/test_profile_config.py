"""The profile's configuration: durations, horizons, weights and thresholds from YAML, strictly."""

from __future__ import annotations

import pytest

from jobs.settings import SettingsError, load_settings
from udfs.profile_config import (
    DAY_MS,
    DEFAULT_HORIZONS,
    HOUR_MS,
    MINUTE_MS,
    Horizon,
    ProfileConfig,
    ProfileConfigError,
    parse_duration_ms,
)


@pytest.mark.parametrize(
    "raw, ms",
    [
        (250, 250),
        ("500ms", 500),
        ("30s", 30_000),
        ("10m", 600_000),
        ("1h", 3_600_000),
        ("7d", 604_800_000),
        ("2w", 1_209_600_000),
        (" 5m ", 300_000),
    ],
)
def test_durations_take_a_unit_or_plain_milliseconds(raw, ms):
    assert parse_duration_ms(raw, "x") == ms


@pytest.mark.parametrize("raw", ["10", "10 m", "-5m", "0s", 0, -1, "1.5h", "m", True, None, 2.5, "10y"])
def test_malformed_durations_are_rejected_naming_the_setting(raw):
    with pytest.raises(ProfileConfigError, match="profile.session_gap_ms"):
        parse_duration_ms(raw, "profile.session_gap_ms")


def test_the_defaults_are_the_five_horizons_of_the_issue():
    config = ProfileConfig()
    assert [(h.name, h.length_ms, h.bucket_ms) for h in config.horizons] == [
        ("10m", 10 * MINUTE_MS, MINUTE_MS),
        ("1h", HOUR_MS, 5 * MINUTE_MS),
        ("24h", DAY_MS, HOUR_MS),
        ("7d", 7 * DAY_MS, 6 * HOUR_MS),
        ("30d", 30 * DAY_MS, DAY_MS),
    ]
    assert config.engagement_weights["video_play"] == 10.0 and config.engagement_weights["review_read"] == 5.0
    assert (config.tier_basis, config.tier_high_above) == ("sessions_per_week", 5.0)


def test_a_horizon_covers_the_bucket_of_now_and_the_ones_before_it_up_to_its_length():
    h = Horizon("10m", 10 * MINUTE_MS, MINUTE_MS)
    now = 100 * MINUTE_MS + 30_000  # in the bucket starting at minute 100
    assert h.covers(91 * MINUTE_MS, now)  # the tenth bucket back, counting now's
    assert not h.covers(91 * MINUTE_MS - 1, now)
    assert h.lapses_at(91 * MINUTE_MS + 59_999) == 101 * MINUTE_MS
    assert not h.covers(91 * MINUTE_MS, 101 * MINUTE_MS)


def test_a_full_profile_section_is_read():
    config = ProfileConfig.from_mapping(
        {
            "horizons": {"5m": {"length": "5m", "bucket": "1m"}, "2d": {"length": "2d", "bucket": "2h"}},
            "session_gap_ms": "20m",
            "engagement_weights": {"video_play": 12, "review_read": 4.5},
            "engagement_half_life_ms": "3d",
            "tier_basis": "engagement_score",
            "tier_high_above": 50,
            "tier_medium_above": 10,
            "affinity_top_k": 5,
            "retention_ms": "60d",
            "max_cart_lines": 20,
        }
    )
    assert config.horizons == (Horizon("5m", 5 * MINUTE_MS, MINUTE_MS), Horizon("2d", 2 * DAY_MS, 2 * HOUR_MS))
    assert config.session_gap_ms == 20 * MINUTE_MS
    assert config.engagement_weights == {"video_play": 12, "review_read": 4.5}
    assert (config.tier_basis, config.tier_high_above, config.tier_medium_above) == ("engagement_score", 50.0, 10.0)
    assert (config.affinity_top_k, config.retention_ms, config.max_cart_lines) == (5, 60 * DAY_MS, 20)


@pytest.mark.parametrize(
    "section, message",
    [
        ({"horizon": {}}, "unknown key 'horizon'"),
        ({"horizons": {"1h": {"length": "1h", "bucket": "7m"}}}, "whole number of buckets"),
        ({"horizons": {"1h": {"length": "1h"}}}, "expected {length"),
        ({"horizons": {"One Hour": {"length": "1h", "bucket": "1m"}}}, "lowercase letters or digits"),
        ({"horizons": {"1h": {"length": "10d", "bucket": "1m"}}}, "more than 1000 buckets"),
        ({"horizons": {}}, "at least one"),
        ({"horizons": {"1m": {"length": "1m", "bucket": "500ms"}}}, "at least 1s"),
        ({"engagement_weights": {"video_watch": 10}}, "unknown event type 'video_watch'"),
        ({"engagement_weights": {"video_play": -1}}, "finite number >= 0"),
        ({"engagement_weights": {"video_play": "10"}}, "finite number >= 0"),
        ({"affinity_weights": {"purchase": float("nan")}}, "finite number >= 0"),
        ({"tier_basis": "vibes"}, "tier_basis must be one of"),
        ({"tier_high_above": 1, "tier_medium_above": 5}, "at least tier_medium_above"),
        ({"tier_high_above": "high"}, "expected a number"),
        ({"retention_ms": "7d"}, "at least the longest horizon"),
        ({"max_cart_lines": 0}, "at least 1"),
        ({"max_cart_lines": "10"}, "expected an integer"),
        ("not a mapping", "expected a mapping"),
    ],
)
def test_bad_profile_sections_are_rejected_with_the_key_at_fault(section, message):
    with pytest.raises(ProfileConfigError, match=message.replace("(", r"\(").replace("{", r"\{")):
        ProfileConfig.from_mapping(section)


def test_the_settings_file_carries_the_profile_section(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("parallelism: 2\nprofile:\n  session_gap_ms: 15m\n  retention_ms: 40d\n")
    settings = load_settings(path, environ={})
    assert settings.profile.session_gap_ms == 15 * MINUTE_MS
    assert settings.profile.retention_ms == 40 * DAY_MS
    assert settings.profile.horizons == DEFAULT_HORIZONS
    assert load_settings(environ={}).profile == ProfileConfig()


def test_a_bad_profile_section_names_the_file(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("profile:\n  session_gap: 15m\n")
    with pytest.raises(SettingsError, match=r"job.yaml: profile: unknown key 'session_gap'"):
        load_settings(path, environ={})


def test_the_profile_section_is_not_settable_from_one_environment_variable():
    with pytest.raises(SettingsError, match="SEGMENTS_PROFILE"):
        load_settings(environ={"SEGMENTS_PROFILE": "x"})


@pytest.mark.parametrize("raw, expected", [("true", True), ("FALSE", False), (" True ", True)])
def test_boolean_settings_accept_true_and_false_words(raw, expected):
    assert load_settings(environ={"SEGMENTS_EMIT_PROFILE_SNAPSHOTS": raw}).emit_profile_snapshots is expected


def test_boolean_settings_reject_anything_else(tmp_path):
    with pytest.raises(SettingsError, match="emit_profile_snapshots must be true or false"):
        load_settings(environ={"SEGMENTS_EMIT_PROFILE_SNAPSHOTS": "yes"})
    path = tmp_path / "job.yaml"
    path.write_text("emit_profile_snapshots: true\n")
    assert load_settings(path, environ={}).emit_profile_snapshots is True
