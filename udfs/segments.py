"""Segment definitions: a condition over the profile at an event time, and when it may next change.

These are the first built-in segments that prove the path end to end; the declarative language of
the segment-definitions issue compiles to the same interface (`evaluate`, `next_change_ms`).
"""

from __future__ import annotations

from dataclasses import dataclass

from udfs.features import CART_ACTIVITY_TYPES, FeatureCatalog, decays_below_ms
from udfs.profile import UserProfile

MINUTE_MS = 60_000


@dataclass(frozen=True, slots=True)
class Verdict:
    member: bool
    rule: str
    features: dict[str, float]


class SegmentDefinition:
    name: str

    def evaluate(self, profile: UserProfile, now_ms: int, catalog: FeatureCatalog) -> Verdict:
        raise NotImplementedError

    def next_change_ms(self, profile: UserProfile, now_ms: int, catalog: FeatureCatalog) -> int | None:
        """The earliest event time after `now_ms` at which the verdict can change with no new
        event, or None. Timers are set here, so a time-driven exit happens exactly on time."""
        return None


@dataclass(frozen=True)
class ActiveBrowser(SegmentDefinition):
    """Did anything in the last `window_ms`; leaves exactly `window_ms` after the last event."""

    name: str = "active_browser"
    window_ms: int = 10 * MINUTE_MS

    def evaluate(self, profile: UserProfile, now_ms: int, catalog: FeatureCatalog) -> Verdict:
        last = profile.last_event_ms
        idle = now_ms - last if last is not None else float("inf")
        return Verdict(
            member=idle < self.window_ms,
            rule=f"ms_since_last_event < {self.window_ms}",
            features={"ms_since_last_event": float(idle)},
        )

    def next_change_ms(self, profile: UserProfile, now_ms: int, catalog: FeatureCatalog) -> int | None:
        if profile.last_event_ms is None:
            return None
        lapse = profile.last_event_ms + self.window_ms
        return lapse if lapse > now_ms else None


@dataclass(frozen=True)
class CartHolder(SegmentDefinition):
    """Has at least one item in the cart."""

    name: str = "cart_holder"

    def evaluate(self, profile: UserProfile, now_ms: int, catalog: FeatureCatalog) -> Verdict:
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

    def evaluate(self, profile: UserProfile, now_ms: int, catalog: FeatureCatalog) -> Verdict:
        items = profile.cart_items
        last = profile.last_of(CART_ACTIVITY_TYPES)
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

    def next_change_ms(self, profile: UserProfile, now_ms: int, catalog: FeatureCatalog) -> int | None:
        last = profile.last_of(CART_ACTIVITY_TYPES)
        if last is None or not profile.cart_items:
            return None
        due = last + self.after_ms
        return due if due > now_ms else None


@dataclass(frozen=True)
class HighlyEngaged(SegmentDefinition):
    """Engagement tier `high` (by default more than 5 sessions in the last 7 days)."""

    name: str = "highly_engaged"

    def evaluate(self, profile: UserProfile, now_ms: int, catalog: FeatureCatalog) -> Verdict:
        tier = catalog.read("engagement_tier", profile, now_ms)
        return Verdict(
            member=tier == "high",
            rule="engagement_tier == high",
            features={
                "sessions_per_week": float(catalog.read("sessions_per_week", profile, now_ms)),
                "engagement_score": round(catalog.read("engagement_score", profile, now_ms), 6),
            },
        )

    def next_change_ms(self, profile: UserProfile, now_ms: int, catalog: FeatureCatalog) -> int | None:
        return catalog.next_change_ms("engagement_tier", profile, now_ms)


@dataclass(frozen=True)
class EngagementScoreAbove(SegmentDefinition):
    """Decayed engagement score above a threshold (the articles' "score > 50": high engagement)."""

    name: str = "engagement_score_above_50"
    threshold: float = 50.0

    def evaluate(self, profile: UserProfile, now_ms: int, catalog: FeatureCatalog) -> Verdict:
        score = catalog.read("engagement_score", profile, now_ms)
        return Verdict(
            member=score > self.threshold,
            rule=f"engagement_score > {self.threshold:g}",
            features={"engagement_score": round(score, 6)},
        )

    def next_change_ms(self, profile: UserProfile, now_ms: int, catalog: FeatureCatalog) -> int | None:
        return decays_below_ms(
            profile.engagement, profile.decay_as_of_ms, catalog.config.engagement_half_life_ms, self.threshold, now_ms
        )


BUILTIN_DEFINITIONS_VERSION = "builtin-2"


def builtin_segments(
    active_window_ms: int = 10 * MINUTE_MS, abandon_after_ms: int = 30 * MINUTE_MS
) -> tuple[SegmentDefinition, ...]:
    return (
        ActiveBrowser(window_ms=active_window_ms),
        CartHolder(),
        CartAbandoner(after_ms=abandon_after_ms),
        HighlyEngaged(),
        EngagementScoreAbove(),
    )
