"""Over-segmentation warnings from behaviour (`segments backtest`): segments too small to act on,
pairs of segments with almost the same members, segments that flap. What can be told from the
definitions alone is udfs/definition_warnings.py (`segments validate`); docs/operations.md
describes both and their thresholds.
"""

from __future__ import annotations

import dataclasses
import re
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from udfs.profile_config import DURATION_UNITS
from udfs.transitions import Transition

TOO_SMALL = "too_small"
OVERLAP = "overlap"
FLAPPING = "flapping"
FLAP_WINDOW_MS = 10 * 60_000  # the backtest's default: a re-entry sooner than this after an exit is a flap


@dataclass(frozen=True)
class WarningThresholds:
    """When a backtest warns: the defaults, else the settings file's `warnings:` section, else
    the command's flags (docs/configuration.md)."""

    min_members: int = 10  # at its peak, fewer members than this: too small
    min_share: float = 0.01  # ... or fewer than this share of the users with an event
    max_overlap: float = 0.9  # time-weighted Jaccard index of two segments at or above this
    max_flap_rate: float = 0.1  # re-entries within flap_window_ms of an exit, per entry, above this
    flap_window_ms: int = FLAP_WINDOW_MS

    def __post_init__(self) -> None:
        if self.min_members < 0:
            raise ValueError(f"min_members must not be negative, got {self.min_members}")
        for name in ("min_share", "max_overlap", "max_flap_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must lie between 0 and 1, got {value}")
        if self.max_overlap == 0.0:
            raise ValueError("max_overlap must be above 0 (at 0 every pair would be warned)")
        if self.flap_window_ms <= 0:
            raise ValueError(f"flap_window_ms must be positive, got {self.flap_window_ms}")

    @classmethod
    def from_mapping(cls, raw: Any) -> WarningThresholds:
        """The settings file's `warnings:` section: any of min_members (an integer), min_share,
        max_overlap, max_flap_rate (numbers from 0 to 1) and flap_window (a duration such as
        10m, or milliseconds); a ValueError for anything else."""
        if raw is None:
            return cls()
        if not isinstance(raw, Mapping):
            raise ValueError("warnings must be a mapping of threshold names to values")
        values: dict[str, Any] = {}
        for key, value in raw.items():
            if key == "min_members":
                if isinstance(value, bool) or not isinstance(value, int):
                    raise ValueError(f"warnings: min_members must be an integer, got {value!r}")
                values[key] = value
            elif key in ("min_share", "max_overlap", "max_flap_rate"):
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise ValueError(f"warnings: {key} must be a number, got {value!r}")
                values[key] = float(value)
            elif key == "flap_window":
                values["flap_window_ms"] = duration_ms(value)
            else:
                known = "min_members, min_share, max_overlap, max_flap_rate, flap_window"
                raise ValueError(f"warnings: unknown threshold {key!r} (known: {known})")
        try:
            return cls(**values)
        except ValueError as err:
            raise ValueError(f"warnings: {err}") from None

    def replace(self, **changes: Any) -> WarningThresholds:
        """These thresholds with some changed (and checked again); None leaves one as it is."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


def duration_ms(value: Any) -> int:
    """A duration as the settings write it: milliseconds, or a number with a unit (30s, 10m, 1h)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    match = re.fullmatch(r"(\d{1,12})(ms|s|m|h|d|w)?", value) if isinstance(value, str) else None
    if match is None:
        raise ValueError(f"expected a duration such as 600000, 30s, 10m or 1h, got {value!r}")
    return int(match[1]) * DURATION_UNITS[match[2] or "ms"]


@dataclass(frozen=True)
class BehaviourWarning:
    """One warning of a backtest: its kind, the segments, the measure and the threshold it crossed."""

    kind: str  # TOO_SMALL | OVERLAP | FLAPPING
    segments: tuple[str, ...]
    value: float
    threshold: float
    message: str

    def as_json(self) -> dict:
        return {
            "kind": self.kind,
            "segments": list(self.segments),
            "value": self.value,
            "threshold": self.threshold,
            "message": self.message,
        }


def member_time(transitions: list[Transition], end_ms: int) -> dict[str, dict[str, list[tuple[int, int]]]]:
    """segment -> user -> the user's stays [entered, left) in it; a stay still open ends at
    `end_ms`. Each user's transitions are in the order their steps emitted them."""
    stays: dict[str, dict[str, list[tuple[int, int]]]] = defaultdict(lambda: defaultdict(list))
    entered: dict[tuple[str, str], int] = {}
    for t in transitions:
        key = (t.segment, t.user_id)
        if t.kind == "ENTER":
            entered[key] = t.event_time
        elif key in entered:
            stays[t.segment][t.user_id].append((entered.pop(key), t.event_time))
    for (segment, user), since in entered.items():
        stays[segment][user].append((since, max(since, end_ms)))
    return stays


def _total(stays: list[tuple[int, int]]) -> int:
    return sum(b - a for a, b in stays)


def _shared(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> int:
    """The time two sorted lists of disjoint stays have in common."""
    i = j = shared = 0
    while i < len(a) and j < len(b):
        shared += max(0, min(a[i][1], b[j][1]) - max(a[i][0], b[j][0]))
        if a[i][1] <= b[j][1]:
            i += 1
        else:
            j += 1
    return shared


def overlaps(stays: dict[str, dict[str, list[tuple[int, int]]]]) -> dict[tuple[str, str], float]:
    """The time-weighted Jaccard index of every pair of segments with member-time: the user-time
    spent in both over the user-time spent in either (1.0: the same users at every instant)."""
    totals = {s: sum(_total(v) for v in users.values()) for s, users in stays.items()}
    names = sorted(s for s, total in totals.items() if total > 0)
    out = {}
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            both = sum(_shared(v, stays[b][u]) for u, v in stays[a].items() if u in stays[b])
            out[(a, b)] = both / (totals[a] + totals[b] - both)
    return out


def behaviour_warnings(result, thresholds: WarningThresholds) -> list[BehaviourWarning]:
    """The warnings of a `jobs.backtest.BacktestResult`, which counted its flaps with the
    thresholds' flap window."""
    if result.flap_window_ms != thresholds.flap_window_ms:
        raise ValueError(
            f"the backtest counted flaps within {result.flap_window_ms} ms, the thresholds say "
            f"{thresholds.flap_window_ms} ms: run it with flap_window_ms={thresholds.flap_window_ms}"
        )
    out = []
    users = result.users
    defined = set(result.definitions.names)  # not the removed segments whose members only leave
    for name, r in result.segments.items():
        if name not in defined:
            continue
        # Below min_members or below min_share of the users: below the larger of the two.
        least = max(thresholds.min_members, thresholds.min_share * users)
        if r.peak_size < least:
            share = r.peak_size / users if users else 0.0
            out.append(
                BehaviourWarning(
                    TOO_SMALL,
                    (name,),
                    r.peak_size,
                    least,
                    f"{name}: too small to act on: at most {r.peak_size} members at once "
                    f"({share:.2%} of {users} users with events); warned below {least:g} (the larger of "
                    f"{thresholds.min_members} members and {thresholds.min_share:.2%} of the users)",
                )
            )
    for name, r in result.segments.items():
        if name in defined and r.flaps and r.flap_rate > thresholds.max_flap_rate:
            out.append(
                BehaviourWarning(
                    FLAPPING,
                    (name,),
                    r.flap_rate,
                    thresholds.max_flap_rate,
                    f"{name}: flaps: {r.flaps} of {r.entries} entries ({r.flap_rate:.1%}) came less than "
                    f"{thresholds.flap_window_ms / 60_000:g} min after the same user's exit; "
                    f"warned above {thresholds.max_flap_rate:.1%}",
                )
            )
    for (a, b), index in sorted(overlaps(member_time(result.transitions, result.end_ms)).items()):
        if a in defined and b in defined and index >= thresholds.max_overlap:
            out.append(
                BehaviourWarning(
                    OVERLAP,
                    (a, b),
                    index,
                    thresholds.max_overlap,
                    f"{a} & {b}: almost the same members: time-weighted Jaccard index {index:.3f} "
                    f"(user-time in both / in either); warned at {thresholds.max_overlap:.3f} or above",
                )
            )
    return out
