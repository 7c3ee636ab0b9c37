"""The profile's keyed-state form: a versioned MessagePack array of the clock, the pending timer and
a zstd frame of the rest, exact and compact; a step that moved only the clock and the timer reuses
the frame; the layouts of versions 5 and 4 and the Avro state of earlier releases still read."""

from __future__ import annotations

import hashlib
import heapq
import json

import msgpack
import pytest
import zstandard
from hypothesis import given
from hypothesis import strategies as st

from jobs.settings import SHIPPED_DEFINITIONS
from tests.conftest import START_MS
from tests.unit.basic_definitions import basic_definitions
from udfs.codec import SCHEMAS_DIR, AvroCodec, DecodeError, SchemaCatalog
from udfs.events import EVENT_TYPES
from udfs.profile import ENCODED_BODY, Bucket, CartOp, Membership, Session, UserProfile
from udfs.profile_config import DAY_MS
from udfs.segmentation import Segmentation
from udfs.shoppers import generate_events
from udfs.state import (
    LAYOUT_VERSION,
    STATE_DICTIONARY,
    STATE_DICTIONARY_SHA256,
    ProfileStateCodec,
    state_body,
    state_dictionary,
)
from udfs.transitions import SegmentEngine, replay_events

INT32 = st.integers(-(2**31), 2**31 - 1)
INT64 = st.integers(-(2**63), 2**63 - 1)
names = st.text(max_size=30)  # hypothesis text() never yields lone surrogates
finite = st.floats(allow_nan=False)
sessions = st.builds(Session, INT64, INT64, INT32)
# What the profile can hold: counts are never negative, bucket starts are multiples of a width of
# at least a second, in the uint32 range of start / width that the packed layout stores, and event
# times (int64 milliseconds, as every other instant here).
UINT32 = st.integers(0, 2**32 - 1)
counts = st.lists(UINT32, min_size=len(EVENT_TYPES), max_size=len(EVENT_TYPES))
spends = st.floats(allow_nan=False).filter(lambda x: x != 0.0) | st.just(0.0)
buckets = st.builds(Bucket, counts, spends, st.dictionaries(names, INT32, max_size=3))
cart_ops = st.builds(CartOp, INT64, st.sampled_from(["ADD", "REMOVE", "REMOVE_ALL", "SET"]), INT32, st.none() | finite)

profiles = st.builds(
    UserProfile,
    clock_ms=INT64,
    sequence_base=INT64,
    last_by_type=st.dictionaries(names, INT64, max_size=4),
    buckets=st.integers(1_000, 10**10).flatmap(
        lambda width: st.dictionaries(
            st.just(width),
            st.dictionaries(
                st.integers(0, min(2**32 - 1, (2**63 - 1) // width)).map(lambda k: k * width), buckets, max_size=3
            ),
            max_size=1,
        )
    ),
    lifetime_spend=finite,
    lifetime_orders=INT64,
    products_viewed=st.dictionaries(names, INT64, max_size=4),
    categories_viewed=st.dictionaries(names, INT64, max_size=4),
    named_sessions=st.dictionaries(names, sessions, max_size=3),
    derived_sessions=st.lists(sessions, max_size=3),
    cart_ops=st.dictionaries(names, st.lists(cart_ops, min_size=1, max_size=3), max_size=3),
    cart_cleared_ms=st.none() | INT64,
    decay_as_of_ms=INT64,
    engagement=finite,
    affinity=st.dictionaries(names, finite, max_size=4),
    seen_event_ids=st.dictionaries(INT64, INT64, max_size=5),
    memberships=st.dictionaries(names, st.builds(Membership, st.booleans(), INT64, INT64), max_size=6),
    timer_ms=st.none() | INT64,
    context=st.dictionaries(st.sampled_from(["device", "country", "timezone", "referrer"]), st.tuples(INT64, names)),
    touch=st.none() | st.tuples(INT64, names, names, names),
    first_seen=st.none() | st.tuples(INT64, names),
)


@pytest.fixture(scope="module")
def state_codec(catalog) -> ProfileStateCodec:
    return ProfileStateCodec(catalog.codec("UserProfileState"))


@given(profile=profiles)
def test_any_profile_round_trips_exactly(state_codec, profile):
    assert state_codec.decode(state_codec.encode(profile)) == profile


def test_decoding_no_state_gives_an_empty_profile(state_codec):
    profile = state_codec.decode(None)
    assert profile == UserProfile()
    assert (profile.clock_ms, profile.last_event_ms, profile.cart(), profile.memberships) == (0, None, {}, {})


def test_an_empty_profile_round_trips(state_codec):
    assert state_codec.decode(state_codec.encode(UserProfile())) == UserProfile()


def test_state_is_the_version_the_instants_and_a_zstd_frame_of_the_rest(state_codec):
    profile = UserProfile(
        clock_ms=START_MS,
        timer_ms=START_MS + 600_000,
        products_viewed={f"p-shoes-{i:03d}": START_MS + i for i in range(40)},
    )
    payload = state_codec.encode(profile)
    version, clock, timer, body, check = msgpack.unpackb(payload)
    assert version == LAYOUT_VERSION == 8
    assert (clock, timer) == (START_MS, START_MS + 600_000) and isinstance(check, int)
    dictionary = state_dictionary()
    assert zstandard.get_frame_parameters(body).dict_id == dictionary.dict_id() != 0
    items = msgpack.unpackb(zstandard.ZstdDecompressor(dict_data=dictionary).decompress(body))
    assert items[5] == profile.products_viewed
    assert len(body) < len(msgpack.packb(items)) * 0.7  # the repeated id prefixes and time stamps compress


def test_the_state_dictionary_is_the_pinned_one_or_no_codec_starts():
    data = STATE_DICTIONARY.read_bytes()
    assert hashlib.sha256(data).hexdigest() == STATE_DICTIONARY_SHA256
    assert state_dictionary(data).dict_id() == state_dictionary().dict_id()
    with pytest.raises(RuntimeError, match="not the one of layout 7"):
        state_dictionary(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(RuntimeError, match="unreadable"):
        state_dictionary(FileNotFoundError("gone"))


def test_the_dictionary_makes_a_week_old_profile_smaller_than_a_plain_frame(state_codec):
    """What the dictionary is for, on a profile it was not trained on (another seed)."""
    profile = UserProfile()
    engine = Segmentation.load(SHIPPED_DEFINITIONS).engine()
    for event in generate_events(1, 99, START_MS, 7 * DAY_MS):
        engine.step_event(event.user_id, profile, event)
    packed = msgpack.packb(state_body(profile), use_bin_type=True)
    with_dictionary = msgpack.unpackb(state_codec.encode(profile))[3]
    plain = zstandard.ZstdCompressor(level=1, write_checksum=True).compress(packed)
    assert len(with_dictionary) < 0.9 * len(plain)


def _version_4(profile: UserProfile) -> bytes:
    """State as the release before wrote it: one zstd frame of [4, clock, ..., timer, scores, scored_at]."""
    items = msgpack.unpackb(
        zstandard.ZstdDecompressor(dict_data=state_dictionary()).decompress(
            msgpack.unpackb(ProfileStateCodec(SchemaCatalog().codec("UserProfileState")).encode(profile))[3]
        )
    )
    layout = [4, profile.clock_ms, *items[:17], profile.timer_ms, *items[17:19]]
    return zstandard.ZstdCompressor(level=1, write_checksum=True).compress(msgpack.packb(layout))


def test_state_of_layout_version_5_is_still_read_without_context_and_written_again_in_the_current_layout(state_codec):
    from udfs.state import _instants_check

    profile = UserProfile(
        clock_ms=START_MS,
        timer_ms=START_MS + 5,
        products_viewed={"p-1": START_MS},
        memberships={"vip": Membership(True, 3, START_MS)},
        scores={"churn_risk": 0.25},
        scored_at_ms=START_MS,
    )
    items = msgpack.unpackb(
        zstandard.ZstdDecompressor(dict_data=state_dictionary()).decompress(
            msgpack.unpackb(state_codec.encode(profile))[3]
        )
    )
    assert items[19:22] == [{}, None, None]  # the context of a profile without it
    assert items[22:] == [None, None]  # no live deployment applied, no shadow (layout 8)
    body = zstandard.ZstdCompressor(level=1, write_checksum=True).compress(msgpack.packb(items[:19]))
    version_5 = msgpack.packb([5, START_MS, START_MS + 5, body, _instants_check(START_MS, START_MS + 5)])
    decoded = state_codec.decode(version_5)
    assert decoded == profile
    assert ENCODED_BODY not in decoded.derived  # a version 5 body is never written back beside a 7
    assert decoded.first_seen is None  # no event: nothing was seen
    assert msgpack.unpackb(state_codec.encode(decoded))[0] == LAYOUT_VERSION
    # A version 7 body is not read as a 5, nor a 5 as a 7.
    check = _instants_check(START_MS, START_MS + 5)
    body_7 = msgpack.unpackb(state_codec.encode(profile))[3]
    # (A 7 body under a 5 is refused already at its frame, compressed with layout 7's dictionary.)
    for version, wrong_body, reason in ((5, body_7, "Dictionary mismatch"), (7, body, "malformed body")):
        with pytest.raises(DecodeError, match=reason):
            state_codec.decode(msgpack.packb([version, START_MS, START_MS + 5, wrong_body, check]))


def test_the_reverted_layout_6_is_not_read(state_codec):
    """Version 6 was a layout reverted before any release: the number stays unused."""
    from udfs.state import _instants_check

    layout = msgpack.unpackb(state_codec.encode(UserProfile(clock_ms=START_MS)))
    layout[0] = 6
    assert _instants_check(START_MS, None) == layout[4]
    with pytest.raises(DecodeError, match="unknown layout 6"):
        state_codec.decode(msgpack.packb(layout))


def test_the_context_round_trips_as_the_profile_holds_it(state_codec):
    profile = UserProfile(
        clock_ms=START_MS,
        context={"device": (START_MS, "mobile"), "timezone": (START_MS - 1, "Asia/Kolkata")},
        touch=(START_MS, "google", "", "spring"),
        first_seen=(START_MS - 9, "direct"),
    )
    decoded = state_codec.decode(state_codec.encode(profile))
    assert decoded == profile
    assert isinstance(decoded.touch, tuple) and isinstance(decoded.context["device"], tuple)


def test_state_of_layout_version_4_is_still_read(state_codec):
    profile = UserProfile(
        clock_ms=START_MS,
        timer_ms=START_MS + 5,
        products_viewed={"p-1": START_MS},
        memberships={"vip": Membership(True, 3, START_MS)},
        scores={"churn_risk": 0.25},
        scored_at_ms=START_MS,
    )
    assert state_codec.decode(_version_4(profile)) == profile


@pytest.mark.parametrize("field, value", [(1, START_MS + 1), (2, START_MS + 600_001), (2, None), (4, 0)])
def test_a_damaged_clock_or_timer_is_a_decode_error(state_codec, field, value):
    layout = msgpack.unpackb(state_codec.encode(UserProfile(clock_ms=START_MS, timer_ms=START_MS + 600_000)))
    layout[field] = value
    with pytest.raises(DecodeError, match="do not match their check"):
        state_codec.decode(msgpack.packb(layout))


def test_a_step_that_moved_only_the_clock_and_timer_reuses_the_encoded_body_and_every_state_reads_back(state_codec):
    """Generated traffic through the per-user step with its timers, as the job runs it: after every
    step the state read back is the profile (a body kept past a change of the state would not be),
    and the timer steps that found nothing due wrote the body they had before."""
    engine = SegmentEngine(basic_definitions())
    events = list(generate_events(30, 11, START_MS, 2 * DAY_MS))
    profiles: dict[str, UserProfile] = {}
    timers: list[tuple[int, str]] = []
    reused = 0

    def check(user_id: str, profile: UserProfile, step) -> None:
        if step.register_timer_ms is not None:
            heapq.heappush(timers, (step.register_timer_ms, user_id))
        if not step.drop_state:
            assert state_codec.decode(state_codec.encode(profile)) == profile

    for event in events:
        profile = profiles.setdefault(event.user_id, UserProfile())
        check(event.user_id, profile, engine.step_event(event.user_id, profile, event))
        while timers and timers[0][0] <= event.timestamp - 5_000:
            due, user_id = heapq.heappop(timers)
            profile = profiles[user_id]
            body_before = profile.derived.get(ENCODED_BODY)
            step = engine.step_timer(user_id, profile, due)
            check(user_id, profile, step)
            reused += body_before is not None and profile.derived.get(ENCODED_BODY) is body_before
    assert reused > 0


def test_plain_avro_state_written_before_compression_is_still_read(state_codec):
    profile = UserProfile(clock_ms=START_MS, memberships={"vip": Membership(True, 3, START_MS)})
    assert state_codec.decode(state_codec.avro(profile)) == profile


def test_avro_state_in_a_zstd_frame_written_before_the_layout_is_still_read(state_codec):
    profile = UserProfile(clock_ms=START_MS, products_viewed={"p-1": START_MS}, scores={"churn_risk": 0.25})
    previous_release = zstandard.ZstdCompressor(level=1, write_checksum=True).compress(state_codec.avro(profile))
    assert state_codec.decode(previous_release) == profile


@pytest.mark.parametrize("layout", [[3, 1, 2], [4, 1], "not a list", [5] + [0] * 21])
def test_a_layout_of_another_version_or_shape_is_a_decode_error(state_codec, layout):
    frame = zstandard.ZstdCompressor().compress(msgpack.packb(layout))
    with pytest.raises(DecodeError):
        state_codec.decode(frame)


def test_a_damaged_state_frame_is_a_decode_error_not_a_crash(state_codec):
    payload = bytearray(state_codec.encode(UserProfile(clock_ms=START_MS)))
    payload[-3:] = b"\xff\xff\xff"
    with pytest.raises(DecodeError, match="undecodable"):
        state_codec.decode(bytes(payload))


def test_a_frame_that_claims_more_than_any_profile_is_refused_before_it_is_inflated(state_codec):
    """A damaged (or hostile) frame header can claim any content size, and the decompressor
    allocates what the header claims: 65 MB of zeros is a frame of a few KB."""
    from udfs.state import MAX_STATE_BYTES, _instants_check

    frame = zstandard.ZstdCompressor(level=1, write_checksum=True).compress(bytes(MAX_STATE_BYTES + 1))
    assert len(frame) < 10_000
    payload = msgpack.packb([LAYOUT_VERSION, START_MS, None, frame, _instants_check(START_MS, None)])
    with pytest.raises(DecodeError, match=f"a frame of {MAX_STATE_BYTES + 1} bytes"):
        state_codec.decode(payload)
    with pytest.raises(DecodeError, match="undecodable"):  # version 4's single frame too
        state_codec.decode(frame)


def test_state_bytes_are_accepted_as_bytearray_or_memoryview(state_codec):
    profile = UserProfile(clock_ms=START_MS, cart_ops={"p": [CartOp(START_MS, "ADD", 1, 2.5)]})
    payload = state_codec.encode(profile)
    assert state_codec.decode(bytearray(payload)) == profile
    assert state_codec.decode(memoryview(payload)) == profile


def test_state_written_by_the_first_state_schema_is_still_read(catalog, state_codec):
    """Savepoints taken by the previous release: what both versions share (clock, memberships and
    their sequences, the registered timer) survives; the new fields start empty."""
    old = SchemaCatalog()
    old.current["UserProfileState"] = json.loads((SCHEMAS_DIR / "history" / "user_profile_state.v1.avsc").read_text())
    v1 = AvroCodec(old, "UserProfileState")
    assert v1.fingerprint != catalog.codec("UserProfileState").fingerprint
    payload = v1.encode(
        {
            "clock_ms": START_MS,
            "last_event_ms": START_MS,
            "last_cart_activity_ms": None,
            "cart": {"p": {"quantity": 1, "unit_price": 2.0}},
            "memberships": {"active_browser": {"member": True, "sequence": 7, "since_ms": START_MS}},
            "timer_ms": START_MS + 600_000,
        }
    )
    profile = state_codec.decode(payload)
    assert profile.clock_ms == START_MS
    assert profile.memberships == {"active_browser": Membership(True, 7, START_MS)}
    assert profile.timer_ms == START_MS + 600_000
    assert profile.last_by_type == {} and profile.cart_ops == {}


def test_state_written_for_another_record_type_is_rejected(catalog, state_codec):
    payload = catalog.codec("DeadLetter").encode(
        {
            "payload": b"",
            "source_topic": "t",
            "source_partition": 0,
            "source_offset": 0,
            "reason": "r",
            "message": "m",
            "detected_at": START_MS,
        }
    )
    with pytest.raises(DecodeError) as err:
        state_codec.decode(payload)
    assert err.value.reason == "wrong_schema"


def test_profiles_built_by_replaying_generated_traffic_round_trip(state_codec):
    engine = SegmentEngine(basic_definitions())
    _, replayed = replay_events(engine, list(generate_events(20, 5, START_MS, DAY_MS)), START_MS + DAY_MS)
    assert any(p.cart() for p in replayed.values())
    for profile in replayed.values():
        assert state_codec.decode(state_codec.encode(profile)) == profile


def test_a_profile_stored_before_the_context_was_first_seen_at_its_lifetimes_first_event_from_an_unknown_source(
    state_codec,
):
    """docs/features.md: an upgrade does not make a user with history new. The lifetime's first
    event is at START_MS - 5 days (its sequence base is 1000 times that); the latest at START_MS."""
    from dataclasses import replace

    from udfs.state import _instants_check

    first = START_MS - 5 * DAY_MS
    profile = UserProfile(clock_ms=START_MS, sequence_base=first * 1000, last_by_type={"page_view": START_MS})
    items = msgpack.unpackb(
        zstandard.ZstdDecompressor(dict_data=state_dictionary()).decompress(
            msgpack.unpackb(state_codec.encode(profile))[3]
        )
    )
    body = zstandard.ZstdCompressor(level=1, write_checksum=True).compress(msgpack.packb(items[:19]))
    version_5 = msgpack.packb([5, START_MS, None, body, _instants_check(START_MS, None)])
    expected = replace(profile, first_seen=(first, "unknown"))
    assert state_codec.decode(version_5) == expected
    assert state_codec.decode(_version_4(profile)) == expected
    assert state_codec.decode(state_codec.avro(profile)) == expected
    # Read in the current layout, the profile as it is: none for none.
    assert state_codec.decode(state_codec.encode(profile)).first_seen is None
