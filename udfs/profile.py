"""A user's profile: what the segments are evaluated on, updated one event at a time."""

from __future__ import annotations

from dataclasses import dataclass, field

from udfs.events import UserEvent


@dataclass(slots=True)
class CartLine:
    quantity: int
    unit_price: float


@dataclass(slots=True)
class Membership:
    member: bool
    sequence: int
    since_ms: int


@dataclass(slots=True)
class UserProfile:
    clock_ms: int = 0
    last_event_ms: int | None = None
    last_cart_activity_ms: int | None = None
    cart: dict[str, CartLine] = field(default_factory=dict)
    memberships: dict[str, Membership] = field(default_factory=dict)
    timer_ms: int | None = None

    @property
    def cart_value(self) -> float:
        return sum(line.quantity * line.unit_price for line in self.cart.values())

    @property
    def cart_items(self) -> int:
        return sum(line.quantity for line in self.cart.values())


def update_profile(profile: UserProfile, event: UserEvent) -> None:
    """Applies one event. Out-of-order events never move the recency marks backwards."""
    ts = event.timestamp
    if profile.last_event_ms is None or ts > profile.last_event_ms:
        profile.last_event_ms = ts
    kind = event.event_type
    if kind == "add_to_cart":
        line = profile.cart.get(event.product_id)
        qty = event.quantity or 1
        if line is None:
            profile.cart[event.product_id] = CartLine(qty, event.price or 0.0)
        else:
            line.quantity += qty
            if event.price is not None:
                line.unit_price = event.price
        _touch_cart(profile, ts)
    elif kind == "remove_from_cart":
        line = profile.cart.get(event.product_id)
        if line is not None:
            line.quantity -= event.quantity or line.quantity
            if line.quantity <= 0:
                del profile.cart[event.product_id]
        _touch_cart(profile, ts)
    elif kind == "checkout_start":
        _touch_cart(profile, ts)
    elif kind == "purchase":
        profile.cart.clear()
        _touch_cart(profile, ts)


def _touch_cart(profile: UserProfile, ts: int) -> None:
    if profile.last_cart_activity_ms is None or ts > profile.last_cart_activity_ms:
        profile.last_cart_activity_ms = ts
