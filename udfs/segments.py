"""Segment definitions: a condition over the profile at an event time, and when it may next change.

These are the first built-in segments that prove the path end to end; the declarative language of
the segment-definitions issue compiles to the same interface (`evaluate`, `next_change_ms`).
"""

from __future__ import annotations

from dataclasses import dataclass

from udfs.profile import UserProfile

MINUTE_MS = 60_000


@dataclass(frozen=True, slots=True)
class Verdict:
    member: bool
    rule: str
    features: dict[str, float]


class SegmentDefinition:
    name: str

    def evaluate(self, profile: UserProfile, now_ms: int) -> Verdict:
        raise NotImplementedError

    def next_change_ms(self, profile: UserProfile, now_ms: int) -> int | None:
        """The earliest event time after `now_ms` at which the verdict can change with no new
        event, or None. Timers are set here, so a time-driven exit happens exactly on time."""
        return None


@dataclass(frozen=True)
class ActiveBrowser(SegmentDefinition):
    """Did anything in the last `window_ms`; leaves exactly `window_ms` after the last event."""

    name: str = "active_browser"
    window_ms: int = 10 * MINUTE_MS

    def evaluate(self, profile: UserProfile, now_ms: int) -> Verdict:
        last = profile.last_event_ms
        idle = now_ms - last if last is not None else float("inf")
        return Verdict(
            member=idle < self.window_ms,
            rule=f"ms_since_last_event < {self.window_ms}",
            features={"ms_since_last_event": float(idle)},
        )

    def next_change_ms(self, profile: UserProfile, now_ms: int) -> int | None:
        if profile.last_event_ms is None:
            return None
        lapse = profile.last_event_ms + self.window_ms
        return lapse if lapse > now_ms else None


@dataclass(frozen=True)
class CartHolder(SegmentDefinition):
    """Has at least one item in the cart."""

    name: str = "cart_holder"

    def evaluate(self, profile: UserProfile, now_ms: int) -> Verdict:
        items = profile.cart_items
        return Verdict(
            member=items > 0,
            rule="cart_items > 0",
            features={"cart_items": float(items), "cart_value": round(profile.cart_value, 2)},
        )


@dataclass(frozen=True)
class CartAbandoner(SegmentDefinition):
    """Cart not empty and no cart activity (add, remove, checkout) for `after_ms`."""

    name: str = "cart_abandoner"
    after_ms: int = 30 * MINUTE_MS

    def evaluate(self, profile: UserProfile, now_ms: int) -> Verdict:
        items = profile.cart_items
        last = profile.last_cart_activity_ms
        idle = now_ms - last if last is not None else float("inf")
        return Verdict(
            member=items > 0 and idle >= self.after_ms,
            rule=f"cart_items > 0 and ms_since_cart_activity >= {self.after_ms}",
            features={
                "cart_items": float(items),
                "cart_value": round(profile.cart_value, 2),
                "ms_since_cart_activity": float(idle),
            },
        )

    def next_change_ms(self, profile: UserProfile, now_ms: int) -> int | None:
        if not profile.cart or profile.last_cart_activity_ms is None:
            return None
        due = profile.last_cart_activity_ms + self.after_ms
        return due if due > now_ms else None


BUILTIN_DEFINITIONS_VERSION = "builtin-1"


def builtin_segments(
    active_window_ms: int = 10 * MINUTE_MS, abandon_after_ms: int = 30 * MINUTE_MS
) -> tuple[SegmentDefinition, ...]:
    return (
        ActiveBrowser(window_ms=active_window_ms),
        CartHolder(),
        CartAbandoner(after_ms=abandon_after_ms),
    )
