"""The profile's keyed-state form: explicit Avro (schemas/user_profile_state.avsc), versioned by its
fingerprint, so state written by one release is read by the next through schema resolution."""

from __future__ import annotations

from udfs.codec import AvroCodec
from udfs.events import EVENT_TYPES
from udfs.profile import Bucket, CartOp, Membership, Session, UserProfile


def _counts(stored: list[int]) -> list[int]:
    # State written before an event type was added holds a shorter list.
    return stored + [0] * (len(EVENT_TYPES) - len(stored))


def _session(s: Session) -> dict:
    return {"start_ms": s.start_ms, "end_ms": s.end_ms, "events": s.events}


class ProfileStateCodec:
    def __init__(self, codec: AvroCodec):
        self._codec = codec

    def encode(self, profile: UserProfile) -> bytes:
        return self._codec.encode(
            {
                "clock_ms": profile.clock_ms,
                "sequence_base": profile.sequence_base,
                "last_by_type": profile.last_by_type,
                "rings": [
                    {
                        "width_ms": width,
                        "buckets": [
                            {"start_ms": start, "counts": b.counts, "spend": b.spend or None,
                             "category_views": b.category_views}
                            for start, b in ring.items()
                        ],
                    }
                    for width, ring in profile.buckets.items()
                ],
                "lifetime_spend": profile.lifetime_spend,
                "lifetime_orders": profile.lifetime_orders,
                "products_viewed": profile.products_viewed,
                "categories_viewed": profile.categories_viewed,
                "named_sessions": {sid: _session(s) for sid, s in profile.named_sessions.items()},
                "derived_sessions": [_session(s) for s in profile.derived_sessions],
                "cart_ops": {
                    product: [
                        {"time_ms": op.time_ms, "kind": op.kind, "quantity": op.quantity, "unit_price": op.unit_price}
                        for op in ops
                    ]
                    for product, ops in profile.cart_ops.items()
                },
                "cart_cleared_ms": profile.cart_cleared_ms,
                "decay_as_of_ms": profile.decay_as_of_ms,
                "engagement": profile.engagement,
                "affinity": profile.affinity,
                "seen_event_ids": [{"id_hash": h, "event_time": t} for h, t in profile.seen_event_ids.items()],
                "memberships": {
                    name: {"member": m.member, "sequence": m.sequence, "since_ms": m.since_ms}
                    for name, m in profile.memberships.items()
                },
                "timer_ms": profile.timer_ms,
            }
        )

    def decode(self, data: bytes | None) -> UserProfile:
        if data is None:
            return UserProfile()
        r = self._codec.decode(bytes(data))
        return UserProfile(
            clock_ms=r["clock_ms"],
            sequence_base=r["sequence_base"],
            last_by_type=r["last_by_type"],
            buckets={
                ring["width_ms"]: {
                    b["start_ms"]: Bucket(_counts(b["counts"]), b["spend"] or 0.0, b["category_views"])
                    for b in ring["buckets"]
                }
                for ring in r["rings"]
            },
            lifetime_spend=r["lifetime_spend"],
            lifetime_orders=r["lifetime_orders"],
            products_viewed=r["products_viewed"],
            categories_viewed=r["categories_viewed"],
            named_sessions={sid: Session(**s) for sid, s in r["named_sessions"].items()},
            derived_sessions=[Session(**s) for s in r["derived_sessions"]],
            cart_ops={product: [CartOp(**op) for op in ops] for product, ops in r["cart_ops"].items()},
            cart_cleared_ms=r["cart_cleared_ms"],
            decay_as_of_ms=r["decay_as_of_ms"],
            engagement=r["engagement"],
            affinity=r["affinity"],
            seen_event_ids={s["id_hash"]: s["event_time"] for s in r["seen_event_ids"]},
            memberships={n: Membership(m["member"], m["sequence"], m["since_ms"]) for n, m in r["memberships"].items()},
            timer_ms=r["timer_ms"],
        )
