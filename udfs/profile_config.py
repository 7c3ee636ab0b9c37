"""What the profile computes, as data: horizons and their bucket widths, the session gap, the
engagement and affinity weights and half-lives, the tier thresholds, and the bounds that keep a
user's state small. Read from the `profile:` section of the job's YAML settings; the defaults
follow the reference articles (+10 for a video watched, +5 for a review read, more than 5
sessions a week is high engagement)."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from udfs.events import EVENT_TYPES

SECOND_MS = 1_000
MINUTE_MS = 60 * SECOND_MS
HOUR_MS = 60 * MINUTE_MS
DAY_MS = 24 * HOUR_MS
WEEK_MS = 7 * DAY_MS
DURATION_UNITS = {"ms": 1, "s": SECOND_MS, "m": MINUTE_MS, "h": HOUR_MS, "d": DAY_MS, "w": WEEK_MS}
_DURATION = re.compile(r"(\d+)(ms|s|m|h|d|w)")
_HORIZON_NAME = re.compile(r"[a-z0-9]{1,8}")


class ProfileConfigError(ValueError):
    """A `profile:` setting that is out of range or inconsistent with the others."""

    pass


def parse_duration_ms(raw: Any, what: str) -> int:
    """`90`, `"500ms"`, `"30s"`, `"10m"`, `"1h"`, `"7d"`, `"2w"` -> milliseconds (plain numbers are ms)."""
    if isinstance(raw, bool):
        raise ProfileConfigError(f"{what}: expected a duration such as 10m, got {raw!r}")
    if isinstance(raw, int):
        value = raw
    elif isinstance(raw, str) and (match := _DURATION.fullmatch(raw.strip())):
        value = int(match.group(1)) * DURATION_UNITS[match.group(2)]
    else:
        raise ProfileConfigError(f"{what}: expected a duration such as 10m, 1h or 7d, got {raw!r}")
    if value <= 0:
        raise ProfileConfigError(f"{what}: must be positive, got {raw!r}")
    return value


def _rebuilt(config: Any) -> tuple[Any, tuple[Any, ...]]:
    """How a configuration pickles (it travels inside the job's function objects): rebuilt through
    its constructor, since the compiled core's frozen dataclasses refuse the attribute-by-attribute
    restore that pickle does by default."""
    return type(config), tuple(getattr(config, f.name) for f in fields(config))


@dataclass(frozen=True, slots=True)
class Horizon:
    """A sliding window of `length_ms`, kept as `length_ms / bucket_ms` buckets of event time.

    At time T the horizon covers the bucket holding T and the ones before it, `length_ms` in all:
    every event it counts is less than `length_ms` old, and an event stops counting at the bucket
    boundary `bucket_start + length_ms`, at most one bucket before its `length_ms`-th birthday."""

    name: str
    length_ms: int
    bucket_ms: int

    def __reduce__(self) -> tuple[type[Horizon], tuple[Any, ...]]:
        return _rebuilt(self)

    def bucket_start(self, time_ms: int) -> int:
        """The start of the bucket that holds `time_ms`."""
        return time_ms - time_ms % self.bucket_ms

    def covers(self, event_ms: int, now_ms: int) -> bool:
        """Whether an event at `event_ms` counts in this horizon at `now_ms` (>= event_ms):
        bucket_start(event) > bucket_start(now) - length, i.e. event >= first_covered_ms(now)."""
        return event_ms >= self.first_covered_ms(now_ms)

    def first_covered_ms(self, now_ms: int) -> int:
        """The start of the oldest bucket the horizon covers at `now_ms`."""
        return now_ms - now_ms % self.bucket_ms - self.length_ms + self.bucket_ms

    def lapses_at(self, event_ms: int) -> int:
        """The instant an event at `event_ms` stops counting."""
        return self.bucket_start(event_ms) + self.length_ms


DEFAULT_HORIZONS = (
    Horizon("10m", 10 * MINUTE_MS, MINUTE_MS),
    Horizon("1h", HOUR_MS, 5 * MINUTE_MS),
    Horizon("24h", DAY_MS, HOUR_MS),
    Horizon("7d", 7 * DAY_MS, 6 * HOUR_MS),
    Horizon("30d", 30 * DAY_MS, DAY_MS),
)

DEFAULT_ENGAGEMENT_WEIGHTS = {
    "page_view": 1.0,
    "product_view": 2.0,
    "add_to_cart": 5.0,
    "remove_from_cart": 0.0,
    "checkout_start": 8.0,
    "purchase": 20.0,
    "search": 1.0,
    "video_play": 10.0,
    "review_read": 5.0,
    "wishlist_add": 3.0,
}

DEFAULT_AFFINITY_WEIGHTS = {
    "product_view": 1.0,
    "add_to_cart": 3.0,
    "purchase": 5.0,
    "wishlist_add": 2.0,
    "review_read": 1.0,
    "video_play": 1.0,
}

TIER_BASES = ("sessions_per_week", "engagement_score")


@dataclass(frozen=True)
class ProfileConfig:
    """The profile's horizons, session gap, weights, thresholds and bounds (the `profile:` settings)."""

    def __reduce__(self) -> tuple[type[ProfileConfig], tuple[Any, ...]]:
        return _rebuilt(self)

    horizons: tuple[Horizon, ...] = DEFAULT_HORIZONS
    # Events of one user further apart than this start a new session (when session_id is absent).
    session_gap_ms: int = 30 * MINUTE_MS
    engagement_weights: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_ENGAGEMENT_WEIGHTS))
    engagement_half_life_ms: int = 7 * DAY_MS
    # Tier: high if the basis is above tier_high_above, medium if above tier_medium_above, else low.
    tier_basis: str = "sessions_per_week"
    tier_high_above: float = 5.0
    tier_medium_above: float = 1.0
    affinity_weights: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_AFFINITY_WEIGHTS))
    affinity_half_life_ms: int = 7 * DAY_MS
    affinity_top_k: int = 3
    # Duplicates: an event whose event_id was accepted within this much event time is not counted.
    # Resends come within seconds to minutes; anything older than the allowed lateness is
    # dead-lettered as late before it gets here.
    dedup_window_ms: int = HOUR_MS
    # A user with no event for this long is dropped (their segments exited first).
    retention_ms: int = 90 * DAY_MS
    # Bounds on what one user can hold, whatever they send; the oldest entries go first.
    max_seen_event_ids: int = 2048
    max_tracked_items: int = 256  # products and categories viewed, sessions, affinity categories
    max_cart_lines: int = 100
    max_cart_ops_per_line: int = 16
    # Categories counted per bucket (category_views_<h>): beyond it the least viewed (then the
    # first by name) is forgotten. Without it one user viewing thousands of categories an hour
    # made every read of the feature merge thousands of entries per bucket.
    max_bucket_categories: int = 16

    def __post_init__(self) -> None:
        if not self.horizons:
            raise ProfileConfigError("horizons: at least one is needed")
        names = [h.name for h in self.horizons]
        if len(set(names)) != len(names):
            raise ProfileConfigError(f"horizons: names must be unique, got {names}")
        for h in self.horizons:
            if not _HORIZON_NAME.fullmatch(h.name):
                raise ProfileConfigError(f"horizons: name {h.name!r} must be 1-8 lowercase letters or digits")
            if h.length_ms % h.bucket_ms:
                raise ProfileConfigError(f"horizons.{h.name}: length must be a whole number of buckets")
            if h.bucket_ms < SECOND_MS:
                raise ProfileConfigError(f"horizons.{h.name}: buckets must be at least 1s")
            if h.length_ms // h.bucket_ms > 1000:
                raise ProfileConfigError(f"horizons.{h.name}: more than 1000 buckets per horizon")
        weight_maps = (("engagement_weights", self.engagement_weights), ("affinity_weights", self.affinity_weights))
        for name, weights in weight_maps:
            read: Mapping[str, object] = weights  # as read from a settings file: checked here
            for kind, weight in read.items():
                if kind not in EVENT_TYPES:
                    raise ProfileConfigError(f"{name}: unknown event type {kind!r} (known: {', '.join(EVENT_TYPES)})")
                number = isinstance(weight, int | float) and not isinstance(weight, bool)
                if not isinstance(weight, int | float) or not number or not math.isfinite(weight) or weight < 0:
                    raise ProfileConfigError(f"{name}.{kind}: must be a finite number >= 0, got {weight!r}")
        if self.tier_basis not in TIER_BASES:
            raise ProfileConfigError(f"tier_basis must be one of {TIER_BASES}, got {self.tier_basis!r}")
        if not self.tier_high_above >= self.tier_medium_above:
            raise ProfileConfigError("tier_high_above must be at least tier_medium_above")
        if self.affinity_top_k < 1:
            raise ProfileConfigError("affinity_top_k must be at least 1")
        if self.retention_ms < self.longest_horizon_ms:
            raise ProfileConfigError("retention must be at least the longest horizon")
        for name in (
            "max_seen_event_ids",
            "max_tracked_items",
            "max_cart_lines",
            "max_cart_ops_per_line",
            "max_bucket_categories",
        ):
            if getattr(self, name) < 1:
                raise ProfileConfigError(f"{name} must be at least 1")

    @property
    def longest_horizon_ms(self) -> int:
        """The length of the longest horizon."""
        return max(h.length_ms for h in self.horizons)

    def horizon(self, name: str) -> Horizon:
        """The horizon of this name; KeyError when there is none."""
        for h in self.horizons:
            if h.name == name:
                return h
        raise KeyError(name)

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any] | None, where: str = "profile") -> ProfileConfig:
        """Builds the config from YAML data; unknown keys and malformed values are errors."""
        if raw is None:
            return cls()
        if not isinstance(raw, Mapping):
            raise ProfileConfigError(f"{where}: expected a mapping")
        known = {f.name for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in raw.items():
            if key not in known:
                raise ProfileConfigError(f"{where}: unknown key {key!r} (known: {', '.join(sorted(known))})")
            path = f"{where}.{key}"
            if key == "horizons":
                if not isinstance(value, Mapping):
                    raise ProfileConfigError(f"{path}: expected a mapping of name to {{length, bucket}}")
                values[key] = tuple(_horizon(str(name), spec, f"{path}.{name}") for name, spec in value.items())
            elif key.endswith("_ms"):
                values[key] = parse_duration_ms(value, path)
            elif key.endswith("_weights"):
                if not isinstance(value, Mapping):
                    raise ProfileConfigError(f"{path}: expected a mapping of event type to weight")
                values[key] = dict(value)
            elif key == "tier_basis":
                values[key] = value
            elif key.startswith("tier_"):
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise ProfileConfigError(f"{path}: expected a number, got {value!r}")
                values[key] = float(value)
            else:
                if isinstance(value, bool) or not isinstance(value, int):
                    raise ProfileConfigError(f"{path}: expected an integer, got {value!r}")
                values[key] = value
        try:
            return cls(**values)
        except ProfileConfigError as err:
            raise ProfileConfigError(f"{where}: {err}") from None


def _horizon(name: str, spec: Any, path: str) -> Horizon:
    if not isinstance(spec, Mapping) or set(spec) != {"length", "bucket"}:
        raise ProfileConfigError(f"{path}: expected {{length: <duration>, bucket: <duration>}}")
    length = parse_duration_ms(spec["length"], f"{path}.length")
    return Horizon(name, length, parse_duration_ms(spec["bucket"], f"{path}.bucket"))
