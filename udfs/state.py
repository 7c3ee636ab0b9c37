"""The profile's keyed-state form: explicit Avro (schemas/user_profile_state.avsc), versioned by its
fingerprint, so state written by one release is read by the next through schema resolution."""

from __future__ import annotations

from udfs.codec import AvroCodec
from udfs.profile import CartLine, Membership, UserProfile


class ProfileStateCodec:
    def __init__(self, codec: AvroCodec):
        self._codec = codec

    def encode(self, profile: UserProfile) -> bytes:
        return self._codec.encode(
            {
                "clock_ms": profile.clock_ms,
                "last_event_ms": profile.last_event_ms,
                "last_cart_activity_ms": profile.last_cart_activity_ms,
                "cart": {
                    pid: {"quantity": line.quantity, "unit_price": line.unit_price}
                    for pid, line in profile.cart.items()
                },
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
            last_event_ms=r["last_event_ms"],
            last_cart_activity_ms=r["last_cart_activity_ms"],
            cart={pid: CartLine(c["quantity"], c["unit_price"]) for pid, c in r["cart"].items()},
            memberships={
                n: Membership(m["member"], m["sequence"], m["since_ms"])
                for n, m in r["memberships"].items()
            },
            timer_ms=r["timer_ms"],
        )
