"""The profile's keyed-state form, written on every step: a MessagePack array
`[LAYOUT_VERSION, clock_ms, timer_ms, body, check]`, where `body` is a zstd frame (with its own
checksum) of the rest of the profile as a positional MessagePack array and `check` a CRC-32 of the
two instants beside it.

Why the clock and the pending timer stand outside the frame: they are all that a timer step which
finds nothing due changes (0.3 of them per event on generated traffic), so such a step rewrites
them beside the body it encoded before (kept in `profile.derived` until the state changes; see
`ENCODED_BODY`) instead of packing and compressing ~4 KB again. Why not Avro any more: the profile is
rewritten after every step, and fastavro's writer took ~300 us for a week-old profile. MessagePack
holds only plain values (no code, no class names), so a value decodes to the same profile in any
Python release, and a damaged one is an error, never a profile. State written by earlier releases
is still read: the layout of version 7 (the same without the deployment and the shadow), of
version 5 (the same without the context), of version 4 (one zstd
frame of the whole array), and Avro (plain, or in
a zstd frame; schemas/user_profile_state.avsc and schemas/history), through schema resolution.
Changing the layout means a new version number and a reader for the old one, kept here."""

from __future__ import annotations

import hashlib
import struct
import sys
import zlib
from array import array

import msgpack
import zstandard

from udfs import PACKAGE_DIR, read_at_import
from udfs.codec import MAGIC, AvroCodec, DecodeError
from udfs.context import UNKNOWN_SOURCE
from udfs.events import EVENT_TYPES
from udfs.profile import ENCODED_BODY, Bucket, CartOp, Membership, Session, ShadowState, UserProfile

_UNSIGNED = {1: "B", 2: "H", 4: "I"}  # array typecodes by item size
_BIG_ENDIAN = sys.byteorder == "big"


def _pack(values, typecode: str) -> bytes:
    packed = array(typecode, values)
    if _BIG_ENDIAN:
        packed.byteswap()
    return packed.tobytes()


def _unpack(data: bytes, typecode: str) -> array:
    unpacked = array(typecode)
    unpacked.frombytes(data)
    if _BIG_ENDIAN:
        unpacked.byteswap()
    return unpacked


def _ring(width: int, ring: dict[int, Bucket]) -> dict:
    counts: list[int] = []
    spend: dict[str, float] = {}
    category_views: dict[str, list[int]] = {}
    for i, bucket in enumerate(ring.values()):
        counts += bucket.counts
        if bucket.spend:
            spend[str(i)] = bucket.spend
        for category, views in bucket.category_views.items():
            category_views.setdefault(category, []).extend((i, views))
    largest = max(counts, default=0)
    count_bytes = 1 if largest < 1 << 8 else 2 if largest < 1 << 16 else 4
    return {
        "width_ms": width,
        "starts": _pack([start // width for start in ring], "I"),
        "type_count": len(EVENT_TYPES),
        "count_bytes": count_bytes,
        "counts": _pack(counts, _UNSIGNED[count_bytes]),
        "spend": spend,
        "category_views": category_views,
    }


def _buckets(ring: dict) -> dict[int, Bucket]:
    width, stride, known = ring["width_ms"], ring["type_count"], len(EVENT_TYPES)
    starts = [index * width for index in _unpack(ring["starts"], "I")]
    counts = _unpack(ring["counts"], _UNSIGNED[ring["count_bytes"]]).tolist()
    padding = [0] * (known - stride)  # state written before an event type was added
    buckets = [Bucket(counts[i * stride : (i + 1) * stride] + padding) for i in range(len(starts))]
    for i, amount in ring["spend"].items():
        buckets[int(i)].spend = amount
    for category, pairs in ring["category_views"].items():
        for i in range(0, len(pairs), 2):
            buckets[pairs[i]].category_views[category] = pairs[i + 1]
    return dict(zip(starts, buckets, strict=True))


def _session(s: Session) -> dict:
    return {"start_ms": s.start_ms, "end_ms": s.end_ms, "events": s.events}


ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


# Far above any bounded profile (ProfileConfig's caps keep a week-old one near 4 KB before zstd).
MAX_STATE_BYTES = 64 << 20
# 8: version 7's body and the live deployment applied and the shadow's state (two items more;
# udfs/deployments.py), compressed with version 7's dictionary. 7: version 5's body and the
# context (three items more). 5: the body without them. 4: version 5's
# items in one zstd frame. 6 was a layout reverted before any release; never to be reused. The
# Avro schemas of earlier state were 1-3.
LAYOUT_VERSION = 8
BODY_ITEMS = 24
BODY_ITEMS_BY_VERSION = {5: 19, 7: 22, LAYOUT_VERSION: BODY_ITEMS}
DICTIONARY_LAYOUTS = (7, LAYOUT_VERSION)  # the layouts whose bodies are compressed with the dictionary

# Layout 7's (and 8's) bodies are compressed with this dictionary (jobs/state_dictionary.py trained it on the
# bodies of a generated week): a body of ~3 KB compresses to a quarter less and faster, since the
# field names, keys and time stamps every profile repeats are in the dictionary rather than in each
# frame. It is part of the layout: never changed, only replaced together with a new layout version.
STATE_DICTIONARY = PACKAGE_DIR / "state_dictionary.zstd"
STATE_DICTIONARY_SHA256 = "3ac74c4fc791bc0ee04b18a68fc9f1a7f1732dcdb6f03840a4d0f33d32e1a863"


_DICTIONARY_BYTES = read_at_import(STATE_DICTIONARY)  # see read_at_import: not later


def state_dictionary(data: bytes | OSError = _DICTIONARY_BYTES) -> zstandard.ZstdCompressionDict:
    """Layout 7's dictionary (the file's bytes, read at import), verified against its pinned sha256."""
    if isinstance(data, OSError):
        raise RuntimeError(f"the profile state's dictionary {STATE_DICTIONARY} is unreadable: {data}")
    if hashlib.sha256(data).hexdigest() != STATE_DICTIONARY_SHA256:
        raise RuntimeError(f"the profile state's dictionary {STATE_DICTIONARY} is not the one of layout 7")
    return zstandard.ZstdCompressionDict(data)


def state_body(p: UserProfile) -> list:
    """Everything but the clock and the pending timer, in the positions of version 4's layout
    (which had the version at 0, the clock at 1 and the timer at 19)."""
    rings = []
    for width, ring in p.buckets.items():
        buckets = ring.values()
        rings.append(
            [
                width,
                list(ring),
                [c for b in buckets for c in b.counts],
                [b.spend for b in buckets],
                [b.category_views for b in buckets],
            ]
        )
    return [
        p.sequence_base,
        p.last_by_type,
        rings,
        p.lifetime_spend,
        p.lifetime_orders,
        p.products_viewed,
        p.categories_viewed,
        {sid: (s.start_ms, s.end_ms, s.events) for sid, s in p.named_sessions.items()},
        [(s.start_ms, s.end_ms, s.events) for s in p.derived_sessions],
        {
            product: [(op.time_ms, op.kind, op.quantity, op.unit_price) for op in ops]
            for product, ops in p.cart_ops.items()
        },
        p.cart_cleared_ms,
        p.decay_as_of_ms,
        p.engagement,
        p.affinity,
        list(p.seen_event_ids),
        list(p.seen_event_ids.values()),
        {name: (m.member, m.sequence, m.since_ms) for name, m in p.memberships.items()},
        p.scores,
        p.scored_at_ms,
        p.context,
        p.touch,
        p.first_seen,
        p.deployment,
        _shadow(p.shadow),
    ]


def _shadow(shadow: ShadowState | None) -> list | None:
    if shadow is None:
        return None
    memberships = {name: (m.member, m.sequence, m.since_ms) for name, m in shadow.memberships.items()}
    return [shadow.deployment, shadow.clock_ms, memberships, shadow.scores, shadow.scored_at_ms]


def _shadow_from(v: list | None) -> ShadowState | None:
    if v is None:
        return None
    deployment, clock_ms, memberships, scores, scored_at_ms = v
    return ShadowState(
        deployment, clock_ms, {name: Membership(*m) for name, m in memberships.items()}, scores, scored_at_ms
    )


_INSTANTS = struct.Struct("<q?q")


def _instants_check(clock_ms: int, timer_ms: int | None) -> int:
    return zlib.crc32(_INSTANTS.pack(clock_ms, timer_ms is None, timer_ms or 0))


def _first_seen_before_context(sequence_base: int, last_by_type: dict) -> tuple[int, str] | None:
    """What a profile stored before the context (layout 5, 4, Avro) says of when the user was
    first seen: the lifetime's first event, which its sequence base is 1000 times, of a source
    not recorded. So an upgrade does not make every user with history new (docs/features.md)."""
    return (sequence_base // 1000, UNKNOWN_SOURCE) if last_by_type else None


def _from_layout(v: list) -> UserProfile:
    if not isinstance(v, list) or not v or v[0] != 4 or len(v) != 22:
        shown = v[0] if isinstance(v, list) and v else type(v).__name__
        raise DecodeError("unknown_schema", f"profile state: unknown layout {shown!r}")
    stride = len(EVENT_TYPES)
    buckets = {}
    for width, starts, counts, spends, category_views in v[4]:
        types = len(counts) // len(starts) if starts else stride
        padding = [0] * (stride - types)  # state written before an event type was added
        buckets[width] = {
            start: Bucket(counts[i * types : (i + 1) * types] + padding, spends[i], category_views[i])
            for i, start in enumerate(starts)
        }
    return UserProfile(
        clock_ms=v[1],
        sequence_base=v[2],
        first_seen=_first_seen_before_context(v[2], v[3]),
        last_by_type=v[3],
        buckets=buckets,
        lifetime_spend=v[5],
        lifetime_orders=v[6],
        products_viewed=v[7],
        categories_viewed=v[8],
        named_sessions={sid: Session(*s) for sid, s in v[9].items()},
        derived_sessions=[Session(*s) for s in v[10]],
        cart_ops={product: [CartOp(*op) for op in ops] for product, ops in v[11].items()},
        cart_cleared_ms=v[12],
        decay_as_of_ms=v[13],
        engagement=v[14],
        affinity=v[15],
        seen_event_ids=dict(zip(v[16], v[17], strict=True)),
        memberships={name: Membership(*m) for name, m in v[18].items()},
        timer_ms=v[19],
        scores=v[20],
        scored_at_ms=v[21],
    )


class ProfileStateCodec:
    """Not thread-safe (the zstd contexts and the packer): one per operator instance."""

    def __init__(self, codec: AvroCodec):
        self._codec = codec  # reads state that earlier releases wrote as Avro
        # Frames carry their content size and a checksum: a damaged value is an error, never a profile.
        dictionary = state_dictionary()
        self._compressor = zstandard.ZstdCompressor(level=1, dict_data=dictionary, write_checksum=True)
        self._decompressor = zstandard.ZstdDecompressor()  # layout 5's bodies, and layout 4
        self._dictionary_decompressor = zstandard.ZstdDecompressor(dict_data=dictionary)
        self._packer = msgpack.Packer(use_bin_type=True)

    def encode(self, profile: UserProfile) -> bytes:
        """The profile as state bytes in the current layout."""
        body = profile.derived.get(ENCODED_BODY)
        if body is None:
            body = profile.derived[ENCODED_BODY] = self._compressor.compress(self._packer.pack(state_body(profile)))
        clock_ms, timer_ms = profile.clock_ms, profile.timer_ms
        return self._packer.pack([LAYOUT_VERSION, clock_ms, timer_ms, body, _instants_check(clock_ms, timer_ms)])

    def decode(self, data: bytes | bytearray | memoryview | None) -> UserProfile:
        """The profile that state bytes hold, of this or an earlier layout; an empty profile for None."""
        if data is None:
            return UserProfile()
        data = bytes(data)
        if data[:4] == ZSTD_MAGIC:  # version 4, or Avro in a frame: state of earlier releases
            data = self._decompress(data)
            if data[:2] == MAGIC:
                return self._from_avro(data)
            return self._checked(_from_layout, self._unpack(data))
        if data[:2] == MAGIC:  # Avro single-object encoding: state of a release before the layout
            return self._from_avro(data)
        return self._checked(self._from_current, self._unpack(data))

    def _from_current(self, v: list) -> UserProfile:
        """Layout LAYOUT_VERSION, 7 (no deployment: the profile has the start-up definitions' state),
        or 5 (which had no context either: the profile starts without it)."""
        if not isinstance(v, list) or len(v) != 5 or v[0] not in BODY_ITEMS_BY_VERSION:
            shown = v[0] if isinstance(v, list) and v else type(v).__name__
            raise DecodeError("unknown_schema", f"profile state: unknown layout {shown!r}")
        version, clock_ms, timer_ms, body, check = v
        if not isinstance(body, bytes) or check != _instants_check(clock_ms, timer_ms):
            raise DecodeError("undecodable", "profile state: the clock and timer do not match their check")
        items = self._unpack(
            self._decompress(body, self._dictionary_decompressor if version in DICTIONARY_LAYOUTS else None)
        )
        if not isinstance(items, list) or len(items) != BODY_ITEMS_BY_VERSION[version]:
            raise DecodeError("undecodable", "profile state: malformed body")
        profile = _from_layout([4, clock_ms, *items[:17], timer_ms, *items[17:19]])
        if version in DICTIONARY_LAYOUTS:
            context, touch, first_seen = items[19:22]
            profile.context = {kind: (held[0], held[1]) for kind, held in context.items()}
            profile.touch = None if touch is None else (touch[0], touch[1], touch[2], touch[3])
            profile.first_seen = None if first_seen is None else (first_seen[0], first_seen[1])
        if version == LAYOUT_VERSION:
            profile.deployment, profile.shadow = items[22], _shadow_from(items[23])
            profile.derived[ENCODED_BODY] = body  # exactly what was read: unchanged until the state changes
        return profile

    def _decompress(self, frame: bytes, decompressor: zstandard.ZstdDecompressor | None = None) -> bytes:
        try:
            # A damaged header can claim any size, and the decompressor allocates what it claims.
            size = zstandard.frame_content_size(frame)
            if size > MAX_STATE_BYTES:
                raise DecodeError("undecodable", f"profile state: a frame of {size} bytes, over {MAX_STATE_BYTES}")
            return (decompressor or self._decompressor).decompress(frame)
        except zstandard.ZstdError as err:
            raise DecodeError("undecodable", f"profile state: not a valid zstd frame ({err})") from None

    @staticmethod
    def _unpack(data: bytes):
        try:
            return msgpack.unpackb(data)
        except (ValueError, msgpack.UnpackException) as err:
            raise DecodeError(
                "undecodable", f"profile state: not a MessagePack layout ({type(err).__name__})"
            ) from None

    @staticmethod
    def _checked(build, layout) -> UserProfile:
        try:
            return build(layout)
        except DecodeError:
            raise
        except (TypeError, ValueError, IndexError, KeyError, AttributeError, struct.error) as err:
            raise DecodeError("undecodable", f"profile state: malformed layout ({type(err).__name__})") from None

    def avro(self, profile: UserProfile) -> bytes:
        """The profile as single-object Avro, as releases before the layout wrote it (their
        state is still read; tests write it with this)."""
        return self._codec.encode(
            {
                "clock_ms": profile.clock_ms,
                "sequence_base": profile.sequence_base,
                "last_by_type": profile.last_by_type,
                "rings": [_ring(width, ring) for width, ring in profile.buckets.items()],
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
                "seen_id_hashes": list(profile.seen_event_ids),
                "seen_times": list(profile.seen_event_ids.values()),
                "memberships": {
                    name: {"member": m.member, "sequence": m.sequence, "since_ms": m.since_ms}
                    for name, m in profile.memberships.items()
                },
                "timer_ms": profile.timer_ms,
                "scores": profile.scores,
                "scored_at_ms": profile.scored_at_ms,
            }
        )

    def _from_avro(self, data: bytes) -> UserProfile:
        r = self._codec.decode(data)
        return UserProfile(
            clock_ms=r["clock_ms"],
            sequence_base=r["sequence_base"],
            first_seen=_first_seen_before_context(r["sequence_base"], r["last_by_type"]),
            last_by_type=r["last_by_type"],
            buckets={ring["width_ms"]: _buckets(ring) for ring in r["rings"]},
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
            seen_event_ids=dict(zip(r["seen_id_hashes"], r["seen_times"], strict=True)),
            memberships={n: Membership(m["member"], m["sequence"], m["since_ms"]) for n, m in r["memberships"].items()},
            timer_ms=r["timer_ms"],
            scores=r["scores"],
            scored_at_ms=r["scored_at_ms"],
        )
