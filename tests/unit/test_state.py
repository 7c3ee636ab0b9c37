"""The profile's keyed-state form: single-object Avro (UserProfileState), exact and compact."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import START_MS
from udfs.codec import HEADER_SIZE, DecodeError
from udfs.profile import CartLine, Membership, UserProfile
from udfs.segments import BUILTIN_DEFINITIONS_VERSION, builtin_segments
from udfs.shoppers import generate_events
from udfs.state import ProfileStateCodec
from udfs.transitions import SegmentEngine, replay_events

INT32 = st.integers(-(2**31), 2**31 - 1)
INT64 = st.integers(-(2**63), 2**63 - 1)
names = st.text(max_size=30)  # hypothesis text() never yields lone surrogates

profiles = st.builds(
    UserProfile,
    clock_ms=INT64,
    last_event_ms=st.none() | INT64,
    last_cart_activity_ms=st.none() | INT64,
    cart=st.dictionaries(names, st.builds(CartLine, INT32, st.floats(allow_nan=False)), max_size=6),
    memberships=st.dictionaries(names, st.builds(Membership, st.booleans(), INT64, INT64), max_size=6),
    timer_ms=st.none() | INT64,
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
    assert (profile.clock_ms, profile.last_event_ms, profile.cart, profile.memberships) == (0, None, {}, {})


def test_an_empty_profile_round_trips(state_codec):
    assert state_codec.decode(state_codec.encode(UserProfile())) == UserProfile()


def test_state_is_single_object_encoded_with_the_profile_state_schema(catalog, state_codec):
    payload = state_codec.encode(UserProfile(clock_ms=START_MS))
    assert payload[:HEADER_SIZE] == catalog.codec("UserProfileState").header


def test_state_bytes_are_accepted_as_bytearray_or_memoryview(state_codec):
    profile = UserProfile(clock_ms=START_MS, cart={"p": CartLine(1, 2.5)})
    payload = state_codec.encode(profile)
    assert state_codec.decode(bytearray(payload)) == profile
    assert state_codec.decode(memoryview(payload)) == profile


def test_a_realistic_profile_with_three_cart_lines_and_three_memberships_is_under_512_bytes(state_codec):
    profile = UserProfile(
        clock_ms=START_MS + 10**9,
        last_event_ms=START_MS + 10**9,
        last_cart_activity_ms=START_MS + 10**9 - 60_000,
        cart={f"p-electronics-{i:03d}": CartLine(3, 249.99) for i in range(3)},
        memberships={
            name: Membership(True, 1_000_000, START_MS + 10**9)
            for name in ("active_browser", "cart_holder", "cart_abandoner")
        },
        timer_ms=START_MS + 10**9 + 30 * 60_000,
    )
    assert len(state_codec.encode(profile)) < 512


def test_state_written_for_another_record_type_is_rejected(catalog, state_codec):
    payload = catalog.codec("DeadLetter").encode(
        {"payload": b"", "source_topic": "t", "source_partition": 0, "source_offset": 0,
         "reason": "r", "message": "m", "detected_at": START_MS}
    )
    with pytest.raises(DecodeError) as err:
        state_codec.decode(payload)
    assert err.value.reason == "wrong_schema"


def test_profiles_built_by_replaying_generated_traffic_round_trip(state_codec):
    day = 24 * 3_600_000
    engine = SegmentEngine(builtin_segments(), BUILTIN_DEFINITIONS_VERSION)
    _, replayed = replay_events(engine, list(generate_events(20, 5, START_MS, day)), START_MS + day)
    assert any(p.cart for p in replayed.values())
    for profile in replayed.values():
        assert state_codec.decode(state_codec.encode(profile)) == profile
