"""The seeded shopper simulation: reproducible, time-ordered, and valid on the wire."""

from __future__ import annotations

from collections import defaultdict

import pytest

from tests.conftest import START_MS
from udfs.events import EVENT_TYPES, event_from_record
from udfs.profile_config import DAY_MS
from udfs.shoppers import PERSONAS, generate_events, persona_of, user_id_of


@pytest.fixture(scope="module")
def a_day_of_300_users():
    return list(generate_events(300, 42, START_MS, DAY_MS))


def test_the_same_seed_gives_identical_events():
    assert list(generate_events(30, 7, START_MS, DAY_MS)) == list(generate_events(30, 7, START_MS, DAY_MS))


def test_a_different_seed_gives_different_events():
    first = list(generate_events(30, 7, START_MS, DAY_MS))
    second = list(generate_events(30, 8, START_MS, DAY_MS))
    assert first and second
    assert first != second


def test_the_stream_is_in_non_decreasing_timestamp_order_within_the_window(a_day_of_300_users):
    timestamps = [e.timestamp for e in a_day_of_300_users]
    assert timestamps == sorted(timestamps)
    assert START_MS <= timestamps[0] and timestamps[-1] < START_MS + DAY_MS


def test_event_ids_are_unique_and_rise_per_user(a_day_of_300_users):
    ids = [e.event_id for e in a_day_of_300_users]
    assert len(set(ids)) == len(ids)
    per_user = defaultdict(list)
    for e in a_day_of_300_users:
        assert e.event_id.startswith(e.user_id + "-")
        per_user[e.user_id].append(e.event_id)
    for user_ids in per_user.values():
        assert user_ids == sorted(user_ids)


def test_every_persona_appears_among_500_users():
    seen = {persona_of(i, 1).name for i in range(500)}
    assert seen == {p.name for p in PERSONAS}


def test_all_event_types_appear_in_a_day_of_300_users(a_day_of_300_users):
    assert {e.event_type for e in a_day_of_300_users} == set(EVENT_TYPES)


def test_user_ids_are_the_zero_padded_user_index(a_day_of_300_users):
    assert user_id_of(42) == "u0000042"
    assert {e.user_id for e in a_day_of_300_users} <= {user_id_of(i) for i in range(300)}


def test_a_shorter_window_is_a_prefix_of_a_longer_one():
    whole = list(generate_events(40, 3, START_MS, DAY_MS))
    half = list(generate_events(40, 3, START_MS, DAY_MS // 2))
    assert half == [e for e in whole if e.timestamp < START_MS + DAY_MS // 2]


def test_every_generated_event_encodes_as_a_user_event_and_passes_validation(catalog, a_day_of_300_users):
    codec = catalog.codec("UserEvent")
    now = START_MS + DAY_MS
    for event in a_day_of_300_users:
        record = codec.decode(codec.encode(event.to_record()))
        assert record == {**event.to_record(), "known_user_id": None}  # v3's field, of identify records only
        assert event_from_record(record, now_ms=now, max_future_ms=0) == event


def test_the_context_leaves_every_other_field_as_the_generator_gave_it_before_the_context():
    """The context comes from a random stream of its own: the fields of user_event.avsc v1 are
    those of the generator before it (sha256 of their repr, computed with that generator)."""
    import hashlib

    events = list(generate_events(200, 42, 1_780_000_000_000, 2 * DAY_MS))
    v1_fields = [
        (e.event_id, e.user_id, e.event_type, e.timestamp, e.session_id, e.product_id)
        + (e.category, e.price, e.quantity, e.device, e.properties)
        for e in events
    ]
    digest = hashlib.sha256(repr(v1_fields).encode()).hexdigest()
    assert (len(events), digest) == (6492, "574cebb6a5921d605e83ac2884391c4f7f70350a271f48210075297217f589f2")


def test_every_event_carries_a_country_and_timezone_and_a_sessions_first_event_its_landing(a_day_of_300_users):
    sessions: dict[str, list] = defaultdict(list)
    for event in a_day_of_300_users:
        assert event.country is not None and event.timezone is not None
        sessions[event.session_id].append(event)
    landings = defaultdict(int)
    for events in sessions.values():
        first, *rest = events
        assert all((e.referrer, e.utm_source, e.utm_medium, e.utm_campaign) == (None,) * 4 for e in rest)
        landings[first.utm_medium or ("referred" if first.referrer else "direct")] += 1
    assert set(landings) == {"direct", "referred", "cpc", "paid_social", "email"}
    assert landings["direct"] > len(sessions) / 3  # later sessions are mostly direct visits
