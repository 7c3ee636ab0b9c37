"""The UserEvent as the core sees it, and the checks that decide whether a decoded record is usable."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from udfs.codec import DecodeError
from udfs.context import campaign_value, country_code, referrer_host, timezone_name

EVENT_TYPES = (
    "page_view",
    "product_view",
    "add_to_cart",
    "remove_from_cart",
    "checkout_start",
    "purchase",
    "search",
    "video_play",
    "review_read",
    "wishlist_add",
)
CART_EVENT_TYPES = frozenset({"add_to_cart", "remove_from_cart"})
_EVENT_TYPE_SET = frozenset(EVENT_TYPES)

# 2000-01-01T00:00:00Z: anything earlier is a unit mistake (seconds for ms) or a default value.
MIN_EVENT_TIME_MS = 946_684_800_000
MAX_ID_LENGTH = 256


@dataclass(frozen=True, slots=True)
class UserEvent:
    """A validated user event, as the contract's `UserEvent` record describes it."""

    event_id: str
    user_id: str
    event_type: str
    timestamp: int
    session_id: str | None = None
    product_id: str | None = None
    category: str | None = None
    price: float | None = None
    quantity: int | None = None
    device: str | None = None
    properties: dict[str, str] = field(default_factory=dict)
    # Context (user_event.avsc v2, or the property of the same name), normalised by
    # event_from_record: a referrer's host, lower-case campaign values, an upper-case country.
    referrer: str | None = None
    utm_source: str | None = None
    utm_medium: str | None = None
    utm_campaign: str | None = None
    country: str | None = None
    timezone: str | None = None

    def to_record(self) -> dict:
        """The event as the Avro record of `user_event.avsc`."""
        return {
            "event_id": self.event_id,
            "user_id": self.user_id,
            "event_type": self.event_type,
            "timestamp": self.timestamp,
            "session_id": self.session_id,
            "product_id": self.product_id,
            "category": self.category,
            "price": self.price,
            "quantity": self.quantity,
            "device": self.device,
            "properties": dict(self.properties),
            "referrer": self.referrer,
            "utm_source": self.utm_source,
            "utm_medium": self.utm_medium,
            "utm_campaign": self.utm_campaign,
            "country": self.country,
            "timezone": self.timezone,
        }


# Each context field, what it must be, and how it is normalised (udfs/context.py).
_CONTEXT_RULES: tuple[tuple[str, str, Callable[[str], str | None]], ...] = (
    ("referrer", "a URL or host name of at most 2048 characters", referrer_host),
    ("utm_source", "1-64 letters, digits, spaces, _ . + -", campaign_value),
    ("utm_medium", "1-64 letters, digits, spaces, _ . + -", campaign_value),
    ("utm_campaign", "1-64 letters, digits, spaces, _ . + -", campaign_value),
    ("country", "two letters", country_code),
    ("timezone", "an IANA timezone name the tz database knows", timezone_name),
)


def _context(record: dict, properties: dict[str, str]) -> list[str | None]:
    """The context values in _CONTEXT_RULES' order: from the declared field, else from the
    property of the same name. A declared field that breaks its rule makes the event a dead
    letter; a property that does is ignored (properties were always free-form); a blank one is
    absent."""
    values: list[str | None] = []
    for name, rule, normalise in _CONTEXT_RULES:
        raw = record.get(name)
        value = None
        if raw is not None:
            value = normalise(raw)
            if value is None and raw.strip():
                raise DecodeError("invalid_field", f"{name} is not {rule}")
        if value is None and properties:
            held = properties.get(name)
            if held is not None:
                value = normalise(held)
        values.append(value)
    return values


def event_from_record(record: dict, now_ms: int, max_future_ms: int) -> UserEvent:
    """Checks a decoded record and builds the event; raises DecodeError with a dead-letter reason.

    `now_ms` bounds timestamps from the future: an event more than `max_future_ms` ahead of the
    processing clock would drag the watermark forward and make every honest event late.
    """
    user_id = record.get("user_id")
    if not user_id or not user_id.strip():
        raise DecodeError("missing_user_id", "user_id is empty")
    if len(user_id) > MAX_ID_LENGTH:
        raise DecodeError("invalid_field", f"user_id longer than {MAX_ID_LENGTH} characters")
    event_id = record.get("event_id")
    if not event_id or len(event_id) > MAX_ID_LENGTH:
        raise DecodeError("invalid_field", "event_id is empty or too long")
    for name in ("session_id", "product_id", "category"):  # these reach the profile's state
        value = record.get(name)
        if value is not None and len(value) > MAX_ID_LENGTH:
            raise DecodeError("invalid_field", f"{name} longer than {MAX_ID_LENGTH} characters")
    ts = record["timestamp"]
    if ts < MIN_EVENT_TIME_MS or ts > now_ms + max_future_ms:
        raise DecodeError("absurd_timestamp", f"timestamp {ts} outside [{MIN_EVENT_TIME_MS}, now + {max_future_ms} ms]")
    price = record.get("price")
    if price is not None and (not math.isfinite(price) or price < 0):
        raise DecodeError("invalid_field", "price is negative, NaN or infinite")
    quantity = record.get("quantity")
    event_type = record["event_type"]
    if event_type not in _EVENT_TYPE_SET:  # an identify record (udfs/identity.py) is not an event
        raise DecodeError("invalid_field", f"{event_type} is not an event type")
    if event_type in CART_EVENT_TYPES:
        if not record.get("product_id"):
            raise DecodeError("invalid_field", f"{event_type} without product_id")
        if quantity is not None and quantity <= 0:
            raise DecodeError("invalid_field", f"{event_type} with quantity {quantity}")
    properties = record.get("properties") or {}
    referrer, utm_source, utm_medium, utm_campaign, country, timezone = _context(record, properties)
    return UserEvent(
        event_id=event_id,
        user_id=user_id,
        event_type=event_type,
        timestamp=ts,
        session_id=record.get("session_id"),
        product_id=record.get("product_id"),
        category=record.get("category"),
        price=price,
        quantity=quantity,
        device=record.get("device"),
        properties=properties,
        referrer=referrer,
        utm_source=utm_source,
        utm_medium=utm_medium,
        utm_campaign=utm_campaign,
        country=country,
        timezone=timezone,
    )
