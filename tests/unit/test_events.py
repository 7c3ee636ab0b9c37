"""event_from_record: which decoded records are usable, and the dead-letter reason for those that
are not."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import START_MS
from udfs.codec import DecodeError
from udfs.events import EVENT_TYPES, MAX_ID_LENGTH, MIN_EVENT_TIME_MS, UserEvent, event_from_record

NOW = START_MS
CONTEXT_FIELDS = ("referrer", "utm_source", "utm_medium", "utm_campaign", "country", "timezone")
MAX_FUTURE = 24 * 3600 * 1000


def a_record(**changes) -> dict:
    record = {
        "event_id": "u1-0000001",
        "user_id": "u1",
        "event_type": "add_to_cart",
        "timestamp": NOW - 1_000,
        "session_id": "u1-s1",
        "product_id": "p-shoes-001",
        "category": "shoes",
        "price": 19.99,
        "quantity": 1,
        "device": "mobile",
        "properties": {"referrer": "newsletter"},
    }
    return {**record, **changes}


def reason_for(record: dict) -> str:
    with pytest.raises(DecodeError) as err:
        event_from_record(record, now_ms=NOW, max_future_ms=MAX_FUTURE)
    return err.value.reason


def accept(record: dict) -> UserEvent:
    return event_from_record(record, now_ms=NOW, max_future_ms=MAX_FUTURE)


@pytest.mark.parametrize("user_id", ["", " ", "   ", "\t\n", None])
def test_an_empty_or_blank_user_id_is_rejected_as_missing_user_id(user_id):
    assert reason_for(a_record(user_id=user_id)) == "missing_user_id"


def test_a_record_without_a_user_id_key_is_rejected_as_missing_user_id():
    record = a_record()
    del record["user_id"]
    assert reason_for(record) == "missing_user_id"


@pytest.mark.parametrize("field", ["session_id", "product_id", "category"])
def test_a_string_that_reaches_the_profile_is_capped_like_an_id(field):
    """Issue 19: each of these is kept in the user's state (sessions, products and categories
    viewed, the cart, category views per bucket): over the cap the event is a dead letter."""
    assert reason_for(a_record(**{field: "x" * (MAX_ID_LENGTH + 1)})) == "invalid_field"
    assert getattr(accept(a_record(**{field: "x" * MAX_ID_LENGTH})), field) == "x" * MAX_ID_LENGTH


def test_a_user_id_longer_than_the_limit_is_invalid_and_one_at_the_limit_is_accepted():
    assert reason_for(a_record(user_id="u" * (MAX_ID_LENGTH + 1))) == "invalid_field"
    assert accept(a_record(user_id="u" * MAX_ID_LENGTH)).user_id == "u" * MAX_ID_LENGTH


@pytest.mark.parametrize("event_id", ["", "e" * (MAX_ID_LENGTH + 1)])
def test_an_empty_or_overlong_event_id_is_invalid(event_id):
    assert reason_for(a_record(event_id=event_id)) == "invalid_field"


@pytest.mark.parametrize("timestamp", [0, 5, NOW // 1000, MIN_EVENT_TIME_MS - 1, -1])
def test_a_timestamp_before_2000_is_rejected_as_absurd(timestamp):
    assert reason_for(a_record(timestamp=timestamp)) == "absurd_timestamp"


def test_the_first_millisecond_of_2000_is_accepted():
    assert MIN_EVENT_TIME_MS == 946_684_800_000  # 2000-01-01T00:00:00Z
    assert accept(a_record(timestamp=MIN_EVENT_TIME_MS)).timestamp == MIN_EVENT_TIME_MS


def test_a_timestamp_more_than_max_future_ahead_of_now_is_absurd_and_exactly_max_future_is_accepted():
    assert reason_for(a_record(timestamp=NOW + MAX_FUTURE + 1)) == "absurd_timestamp"
    assert accept(a_record(timestamp=NOW + MAX_FUTURE)).timestamp == NOW + MAX_FUTURE


def test_the_future_bound_follows_the_given_now_and_max_future():
    record = a_record(timestamp=NOW + 10_000)
    assert event_from_record(record, now_ms=NOW, max_future_ms=10_000).timestamp == NOW + 10_000
    with pytest.raises(DecodeError) as err:
        event_from_record(record, now_ms=NOW, max_future_ms=9_999)
    assert err.value.reason == "absurd_timestamp"


@pytest.mark.parametrize("price", [math.nan, math.inf, -math.inf, -0.01, -1e300])
def test_a_nan_infinite_or_negative_price_is_invalid(price):
    assert reason_for(a_record(price=price)) == "invalid_field"


@pytest.mark.parametrize("price", [0.0, -0.0, 0.01, 1e9, None])
def test_zero_positive_and_missing_prices_are_accepted(price):
    assert accept(a_record(price=price)).price == price


@pytest.mark.parametrize("event_type", ["add_to_cart", "remove_from_cart"])
@pytest.mark.parametrize("product_id", [None, ""])
def test_a_cart_event_without_product_id_is_invalid(event_type, product_id):
    assert reason_for(a_record(event_type=event_type, product_id=product_id)) == "invalid_field"


@pytest.mark.parametrize("product_id", [None, ""])
def test_a_purchase_without_product_id_is_valid_an_order_not_a_cart_line(product_id):
    """Issue 16: only add_to_cart and remove_from_cart name a cart line; a purchase is the order
    (its price the order's value) and empties the whole cart, so it needs no product."""
    event = accept(a_record(event_type="purchase", product_id=product_id, price=30.0))
    assert (event.event_type, event.price) == ("purchase", 30.0)


@pytest.mark.parametrize("event_type", ["add_to_cart", "remove_from_cart"])
@pytest.mark.parametrize("quantity", [0, -1, -(2**31)])
def test_a_cart_event_with_zero_or_negative_quantity_is_invalid(event_type, quantity):
    assert reason_for(a_record(event_type=event_type, quantity=quantity)) == "invalid_field"


def test_a_cart_event_without_quantity_is_accepted_as_one_unit_later():
    assert accept(a_record(quantity=None)).quantity is None


@pytest.mark.parametrize("event_type", ["page_view", "search", "checkout_start", "purchase"])
def test_non_cart_events_need_no_product_id(event_type):
    assert accept(a_record(event_type=event_type, product_id=None, quantity=None)).product_id is None


def test_a_valid_record_passes_and_round_trips_through_to_record():
    record = a_record()
    event = accept(record)
    assert event == UserEvent(
        event_id="u1-0000001",
        user_id="u1",
        event_type="add_to_cart",
        timestamp=NOW - 1_000,
        session_id="u1-s1",
        product_id="p-shoes-001",
        category="shoes",
        price=19.99,
        quantity=1,
        device="mobile",
        properties={"referrer": "newsletter"},
        referrer="newsletter",  # the property of that name, read as the context field (a bare host)
    )
    assert event.to_record() == {**record, **dict.fromkeys(CONTEXT_FIELDS), "referrer": "newsletter"}


def test_a_record_with_only_the_required_fields_gets_none_and_empty_properties():
    record = {"event_id": "e1", "user_id": "u1", "event_type": "page_view", "timestamp": NOW}
    event = accept(record)
    assert event.to_record() == {
        **record,
        "session_id": None,
        "product_id": None,
        "category": None,
        "price": None,
        "quantity": None,
        "device": None,
        "properties": {},
        **dict.fromkeys(CONTEXT_FIELDS),
    }


ids = st.text(min_size=1, max_size=MAX_ID_LENGTH).filter(lambda s: s.strip())
valid_records = st.fixed_dictionaries(
    {
        "event_id": ids,
        "user_id": ids,
        "event_type": st.sampled_from(EVENT_TYPES),
        "timestamp": st.integers(MIN_EVENT_TIME_MS, NOW + MAX_FUTURE),
        "session_id": st.none() | st.text(max_size=10),
        "product_id": st.text(min_size=1, max_size=10),
        "category": st.none() | st.text(max_size=10),
        "price": st.none() | st.floats(min_value=0, allow_infinity=False),
        "quantity": st.none() | st.integers(1, 2**31 - 1),
        "device": st.none() | st.text(max_size=10),
        "properties": st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3),
    }
)


@given(record=valid_records)
def test_every_valid_record_is_accepted_and_round_trips(record):
    assert accept(record).to_record() == {**record, **dict.fromkeys(CONTEXT_FIELDS)}


# --- context (docs/contract.md, docs/features.md "Context") ------------------------------------


def context_of(event: UserEvent) -> dict:
    return {name: getattr(event, name) for name in CONTEXT_FIELDS}


def test_declared_context_fields_are_normalised():
    event = accept(
        a_record(
            properties={},
            referrer="https://Someone:secret@WWW.Example.COM:8443/search?q=boots",
            utm_source=" Google ",
            utm_medium="CPC",
            utm_campaign="Spring Sale-2026",
            country="fr",
            timezone="America/Argentina/Buenos_Aires",
        )
    )
    assert context_of(event) == {
        "referrer": "www.example.com",  # the host alone: no path, query, port or user information
        "utm_source": "google",
        "utm_medium": "cpc",
        "utm_campaign": "spring sale-2026",
        "country": "FR",
        "timezone": "America/Argentina/Buenos_Aires",
    }


def test_a_context_property_is_read_when_the_field_is_absent_or_blank_and_the_field_wins():
    properties = {"utm_source": "Newsletter", "country": "de", "timezone": "Asia/Kolkata", "referrer": "a.example"}
    event = accept(a_record(properties=properties, utm_source="facebook", country="  ", timezone=None))
    assert context_of(event) == {
        "referrer": "a.example",
        "utm_source": "facebook",
        "utm_medium": None,
        "utm_campaign": None,
        "country": "DE",
        "timezone": "Asia/Kolkata",
    }
    assert event.properties == properties  # kept as sent


@pytest.mark.parametrize(
    "field, value",
    [
        ("utm_source", "someone@example.com"),  # no e-mail addresses
        ("utm_campaign", "https://x.example/a"),  # nor URLs
        ("utm_medium", "c" * 65),
        ("utm_medium", "-cpc"),
        ("country", "FRA"),
        ("country", "F1"),
        ("timezone", "Mars/Olympus_Mons"),
        ("timezone", "../../etc/passwd"),
        ("timezone", "localtime"),  # the machine's zone, not the shopper's
        ("timezone", "Europe/Paris" + " " * 60 + "x"),
        ("referrer", "https://[::1/"),
        ("referrer", "no host here"),
        ("referrer", "https://example.com/" + "a" * 2048),
    ],
)
def test_a_declared_context_field_that_breaks_its_rule_is_invalid_and_its_value_not_in_the_message(field, value):
    with pytest.raises(DecodeError) as err:
        accept(a_record(**{field: value}))
    assert err.value.reason == "invalid_field"
    assert field in err.value.message and value.strip() not in err.value.message


@pytest.mark.parametrize(
    "field, value",
    [
        ("utm_source", "someone@example.com"),
        ("country", "France"),
        ("timezone", "Mars/Olympus_Mons"),
        ("referrer", "?"),
    ],
)
def test_a_context_property_that_breaks_its_rule_is_ignored_and_the_event_accepted(field, value):
    event = accept(a_record(properties={field: value, "query": "boots"}))
    assert getattr(event, field) is None
    assert event.properties == {field: value, "query": "boots"}


@pytest.mark.parametrize("value", [64, 63])
def test_a_campaign_value_of_64_characters_is_accepted(value):
    text = "a" * value
    assert accept(a_record(utm_campaign=text.upper())).utm_campaign == text
