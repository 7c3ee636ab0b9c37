"""The backtest's experiment figures: per experiment (`holdout(...)` in the definitions), each
arm's users who entered one of its segments, how many of them bought within a window after
entering, the conversion rate with a 95% Wilson interval, and the lift of treatment over control
with Newcombe's interval for a difference of two proportions (docs/operations.md, "Experiments in
a backtest").

A user counts from their first entry into any segment that reads the experiment, in the arm their
transition records; they are measured only if the whole window after that entry lies within the
log (up to its latest event time), so a user who entered at the end of the log is not counted as
one who did not buy. A conversion is a valid purchase event of the user's strictly after the entry
and at most the window after it: the purchase that caused an entry is not its outcome.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable
from dataclasses import dataclass
from fractions import Fraction

from udfs.definitions import DefinitionSet
from udfs.events import UserEvent
from udfs.experiments import CONTROL, TREATMENT
from udfs.transitions import Transition

Z95 = 1.959963984540054  # the standard normal's 97.5th percentile
Interval = tuple[float, float]


def wilson(successes: int, n: int, z: float = Z95) -> Interval | None:
    """The Wilson score interval of a proportion (None without observations)."""
    if n == 0:
        return None
    p = successes / n
    scale = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / scale
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / scale
    return max(0.0, centre - half), min(1.0, centre + half)


def newcombe(a: int, n: int, b: int, m: int, z: float = Z95) -> Interval | None:
    """Newcombe's hybrid score interval of a/n - b/m, from the two Wilson intervals."""
    first, second = wilson(a, n, z), wilson(b, m, z)
    if first is None or second is None:
        return None
    p, q = a / n, b / m
    (l1, u1), (l2, u2) = first, second
    d = p - q
    return d - math.sqrt((p - l1) ** 2 + (u2 - q) ** 2), d + math.sqrt((u1 - p) ** 2 + (q - l2) ** 2)


@dataclass(frozen=True)
class ArmFigures:
    """One arm of one experiment."""

    arm: str  # CONTROL | TREATMENT
    entered: int  # users whose first entry into one of the experiment's segments was in this arm
    measured: int  # ... of whom the whole conversion window lies within the log
    converted: int  # ... of whom bought within the window

    @property
    def rate(self) -> float | None:
        return self.converted / self.measured if self.measured else None

    @property
    def interval(self) -> Interval | None:
        return wilson(self.converted, self.measured)


@dataclass(frozen=True)
class ExperimentFigures:
    """One experiment: its arms and the lift of treatment over control."""

    name: str
    share: Fraction  # held out: the control arm's share of users
    segments: tuple[str, ...]  # the segments whose conditions read it
    window_ms: int
    control: ArmFigures
    treatment: ArmFigures

    @property
    def lift(self) -> float | None:
        """Treatment's conversion rate minus control's."""
        c, t = self.control.rate, self.treatment.rate
        return None if c is None or t is None else t - c

    @property
    def lift_interval(self) -> Interval | None:
        return newcombe(
            self.treatment.converted, self.treatment.measured, self.control.converted, self.control.measured
        )

    @property
    def relative_lift(self) -> float | None:
        """Treatment's rate over control's, minus one (None when control converted no one)."""
        c, t = self.control.rate, self.treatment.rate
        return None if not c or t is None else t / c - 1


def experiment_figures(
    definitions: DefinitionSet, transitions: Iterable[Transition], events: Iterable[UserEvent], window_ms: int
) -> dict[str, ExperimentFigures]:
    """The figures of every experiment of `definitions`, from the backtest's transitions and the
    log's valid events (the log ends at its latest event time)."""
    if not definitions.experiments:
        return {}
    purchases: dict[str, list[int]] = {}
    end = None
    for event in events:
        end = event.timestamp if end is None else max(end, event.timestamp)
        if event.event_type == "purchase":
            purchases.setdefault(event.user_id, []).append(event.timestamp)
    for times in purchases.values():
        times.sort()
    segments_of = {
        name: tuple(s for s, segment in definitions.segments.items() if name in segment.experiments)
        for name in definitions.experiments
    }
    first_entry: dict[str, dict[str, tuple[int, str]]] = {name: {} for name in definitions.experiments}
    for t in transitions:
        if t.kind != "ENTER":
            continue
        for name, arm in t.arms.items():
            entries = first_entry.get(name)
            if entries is not None and (t.user_id not in entries or t.event_time < entries[t.user_id][0]):
                entries[t.user_id] = (t.event_time, arm)
    out = {}
    for name, entries in first_entry.items():
        counts = {CONTROL: [0, 0, 0], TREATMENT: [0, 0, 0]}  # entered, measured, converted
        for user_id, (entered_at, arm) in entries.items():
            tally = counts[arm]
            tally[0] += 1
            if end is None or entered_at + window_ms > end:
                continue  # the window reaches past the log
            tally[1] += 1
            times = purchases.get(user_id, [])
            first_after = bisect.bisect_right(times, entered_at)
            if first_after < len(times) and times[first_after] <= entered_at + window_ms:
                tally[2] += 1
        out[name] = ExperimentFigures(
            name,
            definitions.experiments[name],
            segments_of[name],
            window_ms,
            ArmFigures(CONTROL, *counts[CONTROL]),
            ArmFigures(TREATMENT, *counts[TREATMENT]),
        )
    return out


def _percent(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _span(interval: Interval | None, signed: bool = False) -> str:
    if interval is None:
        return "-"
    form = "{:+.1f}" if signed else "{:.1f}%"
    return "[" + ", ".join(form.format(100 * x) for x in interval) + "]"


def _share(share: Fraction) -> str:
    return f"{float(share * 100):g}%"


def text_lines(figures: dict[str, ExperimentFigures], window: str) -> list[str]:
    """The experiments' table of the backtest's text output (`window` as the reader wrote it)."""
    lines = []
    for f in figures.values():
        lines += [
            f"experiment {f.name}: control holds out {_share(f.share)} of users; segments {', '.join(f.segments)}; "
            f"conversion: a purchase within {window} after entering",
            f"  {'arm':10} {'entered':>8} {'measured':>9} {'converted':>10} {'rate':>7}  95% interval",
        ]
        for a in (f.control, f.treatment):
            counts = f"{a.entered:8d} {a.measured:9d} {a.converted:10d}"
            lines.append(f"  {a.arm:10} {counts} {_percent(a.rate):>7}  {_span(a.interval)}")
        lift = "-" if f.lift is None else f"{100 * f.lift:+.1f} points {_span(f.lift_interval, signed=True)}"
        relative = "" if f.relative_lift is None else f", relative {100 * f.relative_lift:+.0f}%"
        lines.append(f"  lift, treatment - control: {lift}{relative}")
    return lines


def as_json(figures: dict[str, ExperimentFigures]) -> dict:
    """The experiments' figures for the backtest's JSON output (rates as fractions)."""

    def arm(a: ArmFigures) -> dict:
        return {
            "entered": a.entered,
            "measured": a.measured,
            "converted": a.converted,
            "rate": a.rate,
            "interval_95": list(a.interval) if a.interval else None,
        }

    return {
        f.name: {
            "share_held_out": float(f.share),
            "segments": list(f.segments),
            "window_ms": f.window_ms,
            "control": arm(f.control),
            "treatment": arm(f.treatment),
            "lift": f.lift,
            "lift_interval_95": list(f.lift_interval) if f.lift_interval else None,
            "relative_lift": f.relative_lift,
        }
        for f in figures.values()
    }
