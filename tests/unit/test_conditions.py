"""The condition language node by node: what each piece of text parses into, what it evaluates to
on real profiles (built by applying events through the engine), the missing-value rule, and the
exact millisecond at which a condition changes with time alone (recency thresholds, decaying
scores, windowed counts lapsing at bucket boundaries, sessions). docs/definitions.md.

Every expected value and instant below is worked out by hand from docs/definitions.md, docs/features.md and the default
profile configuration (horizon buckets 10m/1m, 1h/5m, 24h/1h, 7d/6h, 30d/1d; session gap 30 min;
engagement and affinity half-life 7 days)."""

from __future__ import annotations

import math

import pytest
import yaml

from tests.conftest import START_MS
from udfs.conditions import (
    BOOL,
    Absent,
    And,
    Compare,
    Compiler,
    ConditionError,
    Evaluation,
    FeatureRef,
    InCondition,
    Literal,
    Missing,
    ModelOutput,
    Not,
    Or,
    ScoreRef,
    SegmentRef,
    parse_condition,
)
from udfs.definitions import DefinitionError, parse_definitions
from udfs.events import UserEvent
from udfs.features import DURATION, NUMBER, TEXT, FeatureCatalog
from udfs.profile import WEEK_MS, UserProfile
from udfs.profile_config import DAY_MS, HOUR_MS, MINUTE_MS, SECOND_MS, ProfileConfig
from udfs.transitions import SegmentEngine

HALF_LIFE = 7 * DAY_MS  # default engagement and affinity half-life
T0 = START_MS
A = T0 - T0 % DAY_MS  # a UTC midnight: a bucket boundary for every default horizon (1m, 5m, 1h, 6h, 1d)

CONFIG = ProfileConfig()
CATALOG = FeatureCatalog(CONFIG)
MODELS = {"propensity": ModelOutput("propensity"), "persona": ModelOutput("persona", clusters=4)}
# Only video plays count, 100 points each: one event gives a score of exactly 100.0.
CONFIG_100 = ProfileConfig(engagement_weights={"video_play": 100.0})


def ev(n: int, ts: int, kind: str = "page_view", user: str = "u1", **fields) -> UserEvent:
    return UserEvent(f"{user}-{n}", user, kind, ts, **fields)


def definitions_yaml(**segments: str) -> str:
    return yaml.safe_dump({"version": "cond-1", "segments": [{"name": n, "when": w} for n, w in segments.items()]})


def profile_after(*events: UserEvent, scores: dict | None = None, config: ProfileConfig | None = None) -> UserProfile:
    """A real profile: the events applied by the engine (with a trivial definitions file)."""
    definitions = parse_definitions(definitions_yaml(anyone="true"), "t.yaml", config)
    engine = SegmentEngine(definitions, scorer=(lambda p, now, read: dict(scores)) if scores is not None else None)
    profile = UserProfile()
    for event in events:
        engine.on_event(event.user_id, profile, event)
    return profile


def holds(
    text: str,
    profile: UserProfile,
    now: int | None = None,
    scores: dict | None = None,
    members: dict[str, bool] | None = None,
    catalog: FeatureCatalog = CATALOG,
) -> bool:
    members = members or {}
    condition = Compiler(catalog, MODELS, set(members)).compile(text)
    evaluation = Evaluation(
        profile, profile.clock_ms if now is None else now, catalog, profile.scores if scores is None else scores
    )
    evaluation.members.update(members)
    return condition.holds(evaluation)


def run(when: str, events: list[UserEvent], until: int, config: ProfileConfig | None = None):
    """One segment `s` with `when: <when>`: its transitions as (kind, ms after A, cause)."""
    definitions = parse_definitions(definitions_yaml(s=when), "t.yaml", config)
    engine, profile, out = SegmentEngine(definitions), UserProfile(), []
    for event in events:
        out += engine.on_event("u1", profile, event)
    out += engine.advance_to("u1", profile, until)
    return [(t.kind, t.event_time - A, t.cause) for t in out if t.segment == "s"]


def first_instant(after: int, differs) -> int:
    """The first whole millisecond > after at which `differs(t)` is true, for a predicate that is
    false up to some instant and true from it on (found by bisection, independently of the engine)."""
    low, high = after, after + 1
    while not differs(high):
        high = after + 2 * (high - after)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if differs(mid) else (mid, high)
    return high


# =============================================================================================
# Parsing: the shape of every node type
# =============================================================================================


def test_a_comparison_parses_to_compare_of_a_feature_and_a_number_with_one_based_columns():
    assert parse_condition("cart_items > 0") == Compare(
        ">", FeatureRef("cart_items", None, 1), Literal(0.0, NUMBER, 14), 12
    )


@pytest.mark.parametrize("op", ["<", "<=", ">", ">=", "==", "!="])
def test_every_comparison_operator_parses(op):
    node = parse_condition(f"cart_items {op} 2")
    assert node == Compare(op, FeatureRef("cart_items", None, 1), Literal(2.0, NUMBER, 13 + len(op)), 12)


def test_number_literals_are_floats_with_optional_decimals_and_a_leading_minus():
    assert parse_condition("score.propensity >= 0.75") == Compare(
        ">=", ScoreRef("propensity", 1), Literal(0.75, NUMBER, 21), 18
    )
    negative = parse_condition("cart_items > -1").right
    assert (negative.value, negative.kind) == (-1.0, NUMBER)


@pytest.mark.parametrize(
    "text, ms",
    [
        ("500ms", 500),
        ("30s", 30_000),
        ("10m", 600_000),
        ("1h", 3_600_000),
        ("7d", 604_800_000),
        ("2w", 1_209_600_000),
        ("1.5h", 5_400_000),
    ],
)
def test_duration_literals_are_milliseconds(text, ms):
    node = parse_condition(f"ms_since_last_event < {text}")
    assert node == Compare("<", FeatureRef("ms_since_last_event", None, 1), Literal(float(ms), DURATION, 23), 21)


def test_text_literals_take_double_or_single_quotes():
    assert parse_condition('engagement_tier == "high"') == Compare(
        "==", FeatureRef("engagement_tier", None, 1), Literal("high", TEXT, 20), 17
    )
    assert parse_condition("engagement_tier != 'low'").right == Literal("low", TEXT, 20)


def test_true_and_false_are_boolean_literals_and_conditions_on_their_own():
    assert parse_condition("true") == Literal(True, BOOL, 1)
    assert parse_condition("  false") == Literal(False, BOOL, 3)


def test_a_map_feature_takes_a_quoted_key():
    assert parse_condition('category_views_24h["shoes"] > 3').left == FeatureRef("category_views_24h", "shoes", 1)
    assert parse_condition("cart_quantity['p-1'] > 0").left == FeatureRef("cart_quantity", "p-1", 1)


def test_score_and_segment_references():
    assert parse_condition("score.persona == 2") == Compare("==", ScoreRef("persona", 1), Literal(2.0, NUMBER, 18), 15)
    assert parse_condition("segment.cart_holder") == SegmentRef("cart_holder", 1)


def test_membership_in_a_list_not_in_a_list_and_text_in_a_list_feature():
    assert parse_condition('engagement_tier in ["high", "medium"]') == InCondition(
        FeatureRef("engagement_tier", None, 1), (Literal("high", TEXT, 21), Literal("medium", TEXT, 29)), False, 17
    )
    assert parse_condition('engagement_tier not in ["low"]') == InCondition(
        FeatureRef("engagement_tier", None, 1), (Literal("low", TEXT, 25),), True, 21
    )
    assert parse_condition('"shoes" in top_categories') == InCondition(
        Literal("shoes", TEXT, 1), FeatureRef("top_categories", None, 12), False, 9
    )
    assert parse_condition("cart_items in [1, 3]").options == (Literal(1.0, NUMBER, 16), Literal(3.0, NUMBER, 19))


def test_missing_takes_a_feature_or_a_score():
    assert parse_condition("missing(ms_since_last_purchase)") == Missing(
        FeatureRef("ms_since_last_purchase", None, 9), 1
    )
    assert parse_condition("missing(score.propensity)") == Missing(ScoreRef("propensity", 9), 1)
    assert parse_condition('missing(ms_since_viewed_product["p-1"])').ref == FeatureRef(
        "ms_since_viewed_product", "p-1", 9
    )


def test_absent_takes_an_event_type_and_a_duration():
    assert parse_condition("absent(purchase, 7d)") == Absent("purchase", 7 * DAY_MS, 1)
    assert parse_condition("absent( video_play ,90s )") == Absent("video_play", 90 * SECOND_MS, 1)


def test_not_binds_tighter_than_and_which_binds_tighter_than_or():
    a, b, c = (
        Compare(">", FeatureRef(n, None, col), Literal(v, NUMBER, col + len(n) + 3), col + len(n) + 1)
        for n, col, v in (("cart_items", 1, 1.0), ("cart_lines", 19, 2.0), ("orders_24h", 42, 3.0))
    )
    assert parse_condition("cart_items > 1 or cart_lines > 2 and not orders_24h > 3") == Or((a, And((b, Not(c, 38)))))


def test_parentheses_override_precedence_and_chains_are_flat():
    node = parse_condition("(segment.a or segment.b) and segment.c and not not segment.d")
    assert node == And(
        (Or((SegmentRef("a", 2), SegmentRef("b", 15))), SegmentRef("c", 30), Not(Not(SegmentRef("d", 52), 48), 44))
    )
    assert parse_condition("segment.a or segment.b or segment.c") == Or(
        (SegmentRef("a", 1), SegmentRef("b", 14), SegmentRef("c", 27))
    )


def test_whitespace_does_not_matter():
    assert parse_condition("cart_items>0") == Compare(
        ">", FeatureRef("cart_items", None, 1), Literal(0.0, NUMBER, 12), 11
    )
    assert parse_condition("\tsegment.a\n and\nsegment.b ") == And((SegmentRef("a", 2), SegmentRef("b", 17)))


@pytest.mark.parametrize(
    "text, column, message",
    [
        ("cart_items > 0 $", 16, "unexpected '$'"),
        ("ms_since_last_event < 10x", 23, "unexpected '10x' (durations: 500ms, 30s, 10m, 1h, 7d, 2w)"),
        ('engagement_tier == "high', 20, "unexpected '\"high'"),
        ("(cart_items > 0", 16, "expected ')', found the end of the condition"),
        ("cart_items > 0 cart_lines > 1", 16, "unexpected 'cart_lines' (expected 'and', 'or' or the end)"),
        ("", 1, "expected a feature, score, segment or value, found the end of the condition"),
        ("cart_items >", 13, "expected a feature, score, segment or value, found the end of the condition"),
        ("and > 1", 1, "expected a feature, score or segment name, found 'and'"),
        ("category_views_24h[shoes] > 3", 20, "expected a \"quoted\" key inside [...], found 'shoes'"),
        ("absent(purchases, 7d)", 8, "absent(...) takes an event type first"),
        ("absent(purchase, 7)", 18, "absent(...) takes a positive duration second, such as 7d; found '7'"),
        ("absent(purchase, 0s)", 18, "absent(...) takes a positive duration second"),
        ("missing(segment.a)", 1, "missing(...) takes a feature or a score"),
        ("score.", 7, "expected a score name after 'score.'"),
        ("cart_items in []", 16, "expected a number, duration or \"text\", found ']'"),
    ],
)
def test_syntax_errors_say_what_and_where(text, column, message):
    with pytest.raises(ConditionError) as info:
        parse_condition(text)
    assert message in info.value.message
    assert info.value.column == column


def test_a_condition_of_4000_characters_parses_and_one_more_is_refused():
    text = "cart_items > 0" + " or cart_items > 0" * 221
    text = text + " " * (4000 - len(text))
    assert len(text) == 4000
    assert isinstance(parse_condition(text), Or)
    with pytest.raises(ConditionError, match="condition longer than 4000 characters"):
        parse_condition(text + " ")


@pytest.mark.parametrize(
    "ok, refused",
    [
        ("(" * 40 + "segment.a" + ")" * 40, "(" * 41 + "segment.a" + ")" * 41),
        ("not " * 40 + "segment.a", "not " * 41 + "segment.a"),
        ("(not " * 20 + "segment.a" + ")" * 20, "(not " * 20 + "not segment.a" + ")" * 20),
    ],
)
def test_nesting_up_to_40_levels_parses_and_41_is_refused(ok, refused):
    assert parse_condition(ok) is not None
    with pytest.raises(ConditionError, match="nested more than 40 levels deep"):
        parse_condition(refused)


def test_deep_nesting_far_beyond_the_limit_is_a_clean_error_not_a_recursion_error():
    with pytest.raises(ConditionError, match="nested more than 40"):
        parse_condition("(" * 1000 + "segment.a" + ")" * 1000)
    with pytest.raises(ConditionError, match="nested more than 40"):
        parse_condition("not " * 900 + "segment.a")


# =============================================================================================
# Evaluation on a real profile
# =============================================================================================


def shopper() -> UserProfile:
    """A page view, two shoe views, two adds to the cart, one minute apart, starting at A.
    At A+4m: cart p-1 x2 at 30 + p-3 x1 at 5 (3 items, 2 lines, value 65); 2 shoe views; one
    derived session (A .. A+4m, 5 events); no purchase; affinity shoes 1+1+3, socks 3;
    engagement 1+2+2+5+5 = 15 points, decayed by at most 4 minutes of a 7-day half-life."""
    return profile_after(
        ev(1, A),
        ev(2, A + MINUTE_MS, "product_view", product_id="p-1", category="shoes"),
        ev(3, A + 2 * MINUTE_MS, "product_view", product_id="p-2", category="shoes"),
        ev(4, A + 3 * MINUTE_MS, "add_to_cart", product_id="p-1", category="shoes", quantity=2, price=30.0),
        ev(5, A + 4 * MINUTE_MS, "add_to_cart", product_id="p-3", category="socks", quantity=1, price=5.0),
    )


@pytest.mark.parametrize(
    "text, expected",
    [
        ("cart_items < 3", False),
        ("cart_items <= 3", True),
        ("cart_items > 2", True),
        ("cart_items >= 4", False),
        ("cart_items == 3", True),
        ("cart_items != 3", False),
        ("3 == cart_items", True),
        ("2 < cart_items", True),
        ("cart_lines == 2", True),
        ("cart_value == 65", True),
        ("cart_value > 65", False),
        ('cart_quantity["p-1"] == 2', True),
        ('cart_quantity["p-3"] == 1', True),
        ('cart_quantity["p-9"] == 0', True),  # a key the map does not hold reads 0
        ('category_views_24h["shoes"] == 2', True),
        ('category_views_24h["socks"] == 0', True),
        ('category_views_24h["hats"] == 0', True),
        ("count_product_view_10m == 2", True),
        ("events_10m == 5", True),
        ("count_add_to_cart_1h == 2", True),
        ("count_purchase_30d == 0", True),
        ("orders_24h == 0", True),
        ("ms_since_last_event == 0", True),
        ("ms_since_last_page_view == 4m", True),
        ("ms_since_last_page_view == 240000", True),  # a plain number against a duration is milliseconds
        ('ms_since_viewed_product["p-1"] == 3m', True),
        ('ms_since_viewed_product["p-2"] < 2m', False),
        ('ms_since_viewed_product["p-2"] <= 2m', True),
        ("sessions_per_week == 1", True),
        ("in_session == 1", True),
        ("current_session_events == 5", True),
        ("current_session_duration_ms == 4m", True),
        ("checkout_pending == 0", True),
        ("engagement_score > 14.99", True),
        ("engagement_score >= 15", False),
    ],
)
def test_comparisons_on_a_real_profile(text, expected):
    assert holds(text, shopper()) is expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ('engagement_tier == "low"', True),  # one session this week: not more than 1
        ('engagement_tier != "low"', False),
        ('engagement_tier in ["medium", "high"]', False),
        ('engagement_tier not in ["medium", "high"]', True),
        ('engagement_tier in ["low"]', True),
        ('"shoes" in top_categories', True),
        ('"socks" in top_categories', True),
        ('"hats" in top_categories', False),
        ('"hats" not in top_categories', True),
        ('"shoes" not in top_categories', False),
        ("engagement_tier in top_categories", False),
        ("cart_items in [1, 3]", True),
        ("cart_items not in [1, 3]", False),
        ("cart_lines in [1, 3]", False),
    ],
)
def test_membership_on_a_real_profile(text, expected):
    assert holds(text, shopper()) is expected


@pytest.mark.parametrize(
    "text, expected",
    [
        # no purchase yet: every comparison reading the missing value is false, whatever the operator
        ("ms_since_last_purchase < 1w", False),
        ("ms_since_last_purchase >= 0", False),
        ("ms_since_last_purchase == 0", False),
        ("ms_since_last_purchase != 0", False),
        ("not (ms_since_last_purchase < 1w)", True),
        ("not ms_since_last_purchase >= 0", True),
        ("missing(ms_since_last_purchase)", True),
        ("missing(ms_since_last_event)", False),
        ("absent(purchase, 7d)", True),
        ("absent(add_to_cart, 7d)", False),
        ("absent(page_view, 4m)", True),
        ("absent(page_view, 5m)", False),  # the page view was 4 minutes ago
        ("aov_24h > 0", False),
        ("aov_24h == 0", False),
        ("not (aov_24h >= 0)", True),
        ("missing(aov_24h)", True),
        ("lifetime_aov <= 1000000", False),
        ("missing(lifetime_aov)", True),
        # a key not held: missing for recency maps, 0 for counts and quantities
        ('ms_since_viewed_product["p-3"] >= 0', False),
        ('missing(ms_since_viewed_product["p-3"])', True),
        ('missing(ms_since_viewed_product["p-1"])', False),
        ('missing(category_views_24h["hats"])', False),
        ('missing(cart_quantity["p-9"])', False),
        ("ms_since_last_purchase < 1w or cart_items > 0", True),
        ("ms_since_last_purchase < 1w and cart_items > 0", False),
        # `in` / `not in` are comparisons too (docs/definitions.md grammar): reading a missing value they are false
        ("aov_24h in [10, 20]", False),
        ("aov_24h not in [10, 20]", False),
        ("aov_24h != 10", False),
        ("not (aov_24h in [10, 20])", True),
    ],
)
def test_missing_values_make_comparisons_false_and_their_negation_true(text, expected):
    assert holds(text, shopper()) is expected


def test_a_profile_that_ended_its_session_reads_the_session_features_as_missing():
    profile = shopper()
    later = A + 4 * MINUTE_MS + 30 * MINUTE_MS  # the session's last event + the gap
    assert holds("current_session_events > 0", profile, now=later - 1)
    assert not holds("current_session_events > 0", profile, now=later)
    assert not holds("current_session_events == 0", profile, now=later)
    assert holds("missing(current_session_start_ms)", profile, now=later)
    assert holds("in_session == 0", profile, now=later)


@pytest.mark.parametrize("session_id", [None, "s-1"])
@pytest.mark.parametrize("apart, sessions", [(30 * MINUTE_MS - 1, 1), (30 * MINUTE_MS, 1), (30 * MINUTE_MS + 1, 2)])
def test_events_exactly_the_session_gap_apart_are_one_session_and_one_ms_more_are_two(apart, sessions, session_id):
    """Issue 16: derived sessions are cut where two consecutive events are *more* than the gap
    apart; a named session lasts while its last event is less than the gap before the clock, so
    an event exactly the gap later still joins it (visible, it is kept) and is current at once."""
    first, second = ev(1, A, session_id=session_id), ev(2, A + apart, session_id=session_id)
    profile = profile_after(first, second)
    named = session_id is not None
    expected = 1 if named else sessions  # a named session is one whatever the gap, while kept
    assert holds(f"sessions_24h == {expected}", profile)
    assert holds(f"current_session_events == {3 - expected}", profile)
    assert holds(f"current_session_start_ms == {A if expected == 1 else A + apart}", profile)
    # In the session until exactly the gap after its last event.
    assert holds("in_session == 1", profile, now=A + apart + 30 * MINUTE_MS - 1)
    assert holds("in_session == 0", profile, now=A + apart + 30 * MINUTE_MS)


@pytest.mark.parametrize(
    "text, scores, expected",
    [
        ("score.propensity > 0.7", {"propensity": 0.75}, True),
        ("score.propensity > 0.75", {"propensity": 0.75}, False),
        ("score.propensity >= 0.75", {"propensity": 0.75}, True),
        ("score.propensity > 0.7", {}, False),  # the model did not score: missing
        ("not (score.propensity > 0.7)", {}, True),
        ("score.propensity <= 0.7", {}, False),
        ("missing(score.propensity)", {}, True),
        ("missing(score.propensity)", {"propensity": 0.1}, False),
        ("score.persona == 2", {"persona": 2}, True),
        ("score.persona == 2", {"persona": 1}, False),
        ("score.persona != 2", {"persona": 1}, True),
        ("score.persona in [1, 3]", {"persona": 2}, False),
        ("score.persona in [1, 3]", {"persona": 3}, True),
        ("score.persona not in [1, 3]", {"persona": 2}, True),
        ("score.persona not in [1, 3]", {}, False),  # a comparison reading a missing value is false, like !=
    ],
)
def test_scores_as_the_scorer_left_them_on_the_profile(text, scores, expected):
    profile = profile_after(ev(1, A), scores=scores)
    assert profile.scores == scores
    assert holds(text, profile) is expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("segment.a", True),
        ("segment.b", False),
        ("not segment.b", True),
        ("segment.a and not segment.b", True),
        ("segment.a and segment.b", False),
        ("segment.b or segment.a", True),
        ("not (segment.a or segment.b)", False),
        ("true", True),
        ("false", False),
        ("not false", True),
        ("true and false", False),
        ("false or true", True),
        ("segment.a and cart_items > 2", True),
        ("(segment.b or cart_items > 2) and not ms_since_last_event > 0", True),
    ],
)
def test_segment_references_booleans_and_the_connectives(text, expected):
    assert holds(text, shopper(), members={"a": True, "b": False}) is expected


def test_a_segment_reference_reads_the_membership_decided_at_the_same_instant():
    profile = shopper()
    assert holds("segment.a", profile, members={"a": True})
    assert not holds("segment.a", profile, members={"a": False})


# =============================================================================================
# Time-driven changes: the exact millisecond
# =============================================================================================


@pytest.mark.parametrize(
    "op, expected",
    [
        # value(t) = t - A (whole milliseconds); c = 10 min
        ("<", [("ENTER", 0, "EVENT"), ("EXIT", 10 * MINUTE_MS, "TIMER")]),  # false from value == c
        ("<=", [("ENTER", 0, "EVENT"), ("EXIT", 10 * MINUTE_MS + 1, "TIMER")]),  # false from value == c + 1
        (">", [("ENTER", 10 * MINUTE_MS + 1, "TIMER")]),
        (">=", [("ENTER", 10 * MINUTE_MS, "TIMER")]),
        ("==", [("ENTER", 10 * MINUTE_MS, "TIMER"), ("EXIT", 10 * MINUTE_MS + 1, "TIMER")]),
        ("!=", [("ENTER", 0, "EVENT"), ("EXIT", 10 * MINUTE_MS, "TIMER"), ("ENTER", 10 * MINUTE_MS + 1, "TIMER")]),
    ],
)
def test_a_recency_threshold_flips_at_last_event_plus_c_or_c_plus_one_by_operator(op, expected):
    assert run(f"ms_since_last_purchase {op} 10m", [ev(1, A, "purchase", price=10.0)], A + DAY_MS) == expected


@pytest.mark.parametrize("op", ["<", "<=", ">", ">=", "==", "!="])
def test_the_engine_timer_is_set_for_the_first_millisecond_at_which_a_recency_comparison_differs(op):
    definitions = parse_definitions(definitions_yaml(s=f"ms_since_last_purchase {op} 10m"), "t.yaml")
    engine, profile = SegmentEngine(definitions), UserProfile()
    engine.on_event("u1", profile, ev(1, A, "purchase", price=10.0))
    due = engine.next_change_ms(profile)
    flip = {
        "<": 10 * MINUTE_MS,
        "<=": 10 * MINUTE_MS + 1,
        ">": 10 * MINUTE_MS + 1,
        ">=": 10 * MINUTE_MS,
        "==": 10 * MINUTE_MS,
        "!=": 10 * MINUTE_MS,
    }[op]
    assert due == A + flip
    text = f"ms_since_last_purchase {op} 10m"
    assert holds(text, profile, now=due - 1) != holds(text, profile, now=due)
    assert engine.advance_to("u1", profile, due - 1) == []
    assert [t.event_time for t in engine.advance_to("u1", profile, due)] == [due]


@pytest.mark.parametrize(
    "op, expected",
    [
        # a fractional threshold in ms: value (whole ms) < 1500.5 up to 1500, so every operator flips at 1501
        ("<", [("ENTER", 0, "EVENT"), ("EXIT", 1501, "TIMER")]),
        ("<=", [("ENTER", 0, "EVENT"), ("EXIT", 1501, "TIMER")]),
        (">", [("ENTER", 1501, "TIMER")]),
        (">=", [("ENTER", 1501, "TIMER")]),
        ("==", []),  # never exactly 1500.5
        ("!=", [("ENTER", 0, "EVENT")]),
    ],
)
def test_a_fractional_recency_threshold_flips_at_the_first_whole_millisecond_past_it(op, expected):
    assert run(f"ms_since_last_event {op} 1500.5", [ev(1, A)], A + HOUR_MS) == expected


def test_a_later_event_of_the_type_moves_the_recency_flip():
    events = [ev(1, A, "purchase", price=1.0), ev(2, A + 4 * MINUTE_MS, "purchase", price=1.0)]
    assert run("ms_since_last_purchase < 10m", events, A + DAY_MS) == [
        ("ENTER", 0, "EVENT"),
        ("EXIT", 14 * MINUTE_MS, "TIMER"),
    ]


def test_ms_since_cart_activity_counts_from_the_latest_of_add_remove_checkout_and_purchase():
    events = [
        ev(1, A, "add_to_cart", product_id="p", quantity=1),
        ev(2, A + MINUTE_MS),
        ev(3, A + 2 * MINUTE_MS, "checkout_start"),
        ev(4, A + 3 * MINUTE_MS, "search"),
    ]
    assert run("ms_since_cart_activity >= 30m", events, A + DAY_MS) == [("ENTER", 32 * MINUTE_MS, "TIMER")]


@pytest.mark.parametrize(
    "op, expected",
    [
        # one video play of 100 points at A: 100 * 2^(-t/HL) is exactly 50.0 at t = HL, above before, below after
        (">", [("ENTER", 0, "EVENT"), ("EXIT", HALF_LIFE, "TIMER")]),
        (">=", [("ENTER", 0, "EVENT"), ("EXIT", HALF_LIFE + 1, "TIMER")]),
        ("<", [("ENTER", HALF_LIFE + 1, "TIMER")]),
        ("<=", [("ENTER", HALF_LIFE, "TIMER")]),
    ],
)
def test_a_decaying_score_crosses_its_threshold_at_the_exact_millisecond_by_operator(op, expected):
    assert run(f"engagement_score {op} 50", [ev(1, A, "video_play")], A + 4 * WEEK_MS, CONFIG_100) == expected


def test_the_decay_timer_is_the_first_millisecond_the_score_is_no_longer_above_an_inexact_threshold():
    def score(t):  # worked out independently of the engine
        return 100.0 * 2.0 ** (-(t - A) / HALF_LIFE)

    due = first_instant(A, lambda t: score(t) <= 60)
    assert abs((due - A) - HALF_LIFE * math.log2(100 / 60)) < 2
    definitions = parse_definitions(definitions_yaml(s="engagement_score > 60"), "t.yaml", CONFIG_100)
    engine, profile = SegmentEngine(definitions), UserProfile()
    engine.on_event("u1", profile, ev(1, A, "video_play"))
    assert engine.next_change_ms(profile) == due
    catalog = definitions.catalog
    assert catalog.read("engagement_score", profile, due - 1) > 60 >= catalog.read("engagement_score", profile, due)
    assert engine.advance_to("u1", profile, due - 1) == []
    [exit_] = engine.advance_to("u1", profile, due)
    assert (exit_.kind, exit_.event_time, exit_.cause, exit_.rule) == (
        "EXIT",
        due,
        "TIMER",
        "not (engagement_score > 60)",
    )


def test_the_decay_timer_accounts_for_every_event_and_its_own_decay():
    def score(t):  # two plays of 100 points, at A and A + 1d
        return 100.0 * 2.0 ** (-(t - A) / HALF_LIFE) + 100.0 * 2.0 ** (-(t - A - DAY_MS) / HALF_LIFE)

    due = first_instant(A + DAY_MS, lambda t: score(t) <= 150)
    definitions = parse_definitions(definitions_yaml(s="engagement_score > 150"), "t.yaml", CONFIG_100)
    engine, profile = SegmentEngine(definitions), UserProfile()
    assert engine.on_event("u1", profile, ev(1, A, "video_play")) == []
    [enter] = engine.on_event("u1", profile, ev(2, A + DAY_MS, "video_play"))
    assert (enter.kind, enter.event_time) == ("ENTER", A + DAY_MS)
    assert engine.next_change_ms(profile) == due
    assert holds("engagement_score > 150", profile, now=due - 1, catalog=definitions.catalog)
    assert not holds("engagement_score > 150", profile, now=due, catalog=definitions.catalog)
    assert [(t.kind, t.event_time) for t in engine.advance_to("u1", profile, A + 10 * WEEK_MS)] == [("EXIT", due)]


def test_category_affinity_decays_to_its_threshold_at_the_exact_millisecond():
    def affinity(t):  # two shoe views at A, affinity weight 1 each, half-life 7 days
        return 2.0 * 2.0 ** (-(t - A) / HALF_LIFE)

    due = first_instant(A, lambda t: affinity(t) <= 1.5)
    events = [
        ev(1, A, "product_view", product_id="p1", category="shoes"),
        ev(2, A, "product_view", product_id="p2", category="shoes"),
    ]
    assert run('category_affinity["shoes"] > 1.5', events, A + 4 * WEEK_MS) == [
        ("ENTER", 0, "EVENT"),
        ("EXIT", due - A, "TIMER"),
    ]


def test_an_equality_on_a_decaying_score_is_refused_or_timed_to_the_exact_millisecond():
    """`engagement_score in [50]` is refused ("changes continuously with time: use <, <=, >, >="),
    and time-driven changes are promised at the exact millisecond. So `engagement_score != 50`,
    with exactly 100 points at A, must either be refused too or leave at A+HL (the score is exactly
    50.0 there) and come back at A+HL+1."""
    try:
        flips = run("engagement_score != 50", [ev(1, A, "video_play")], A + 4 * WEEK_MS, CONFIG_100)
    except DefinitionError as err:
        assert "continuously" in str(err)
        return
    assert flips == [("ENTER", 0, "EVENT"), ("EXIT", HALF_LIFE, "TIMER"), ("ENTER", HALF_LIFE + 1, "TIMER")]


def test_a_tiny_decay_threshold_that_validates_does_not_crash_the_engine():
    """`engagement_score > 0.000…01` (1e-310) passes the validator (finite, >= 0); the engine must
    then be able to work out the timer (the score takes ~1030 half-lives to fall below it; far past
    the 90-day retention, so the next change is the retention expiry)."""
    threshold = "0." + "0" * 309 + "1"
    definitions = parse_definitions(definitions_yaml(s=f"engagement_score > {threshold}"), "t.yaml")
    engine, profile = SegmentEngine(definitions), UserProfile()
    [enter] = engine.on_event("u1", profile, ev(1, A, "video_play"))
    assert enter.kind == "ENTER"
    assert engine.next_change_ms(profile) == A + 90 * DAY_MS


def test_a_huge_absent_window_is_a_clean_definition_error_or_works():
    """`absent(purchase, 999…9d)` (400 nines) overflows a float to infinity: the validator must say so
    as it does for `cart_items > 999…9`, not raise an OverflowError."""
    huge = "9" * 400
    with pytest.raises(DefinitionError, match="not a finite number"):
        parse_definitions(definitions_yaml(s=f"cart_items > {huge}"), "t.yaml")
    try:
        parse_definitions(definitions_yaml(s=f"absent(purchase, {huge}d)"), "t.yaml")
    except DefinitionError:
        pass


def test_a_windowed_count_lapses_when_its_bucket_leaves_the_horizon():
    # 10m horizon, 1-minute buckets: a view at A+90s is in bucket [A+1m, A+2m), which leaves at A+11m
    assert run("count_page_view_10m > 0", [ev(1, A + 90 * SECOND_MS)], A + DAY_MS) == [
        ("ENTER", 90 * SECOND_MS, "EVENT"),
        ("EXIT", 11 * MINUTE_MS, "TIMER"),
    ]


def test_a_windowed_count_steps_down_one_bucket_at_a_time():
    # 24h horizon, 1-hour buckets: views at A+90m (bucket A+1h, leaves A+25h) and A+3h (leaves A+27h)
    events = [ev(1, A + 90 * MINUTE_MS), ev(2, A + 3 * HOUR_MS)]
    assert run("count_page_view_24h >= 2", events, A + 3 * DAY_MS) == [
        ("ENTER", 3 * HOUR_MS, "EVENT"),
        ("EXIT", 25 * HOUR_MS, "TIMER"),
    ]
    assert run("count_page_view_24h == 1", events, A + 3 * DAY_MS) == [
        ("ENTER", 90 * MINUTE_MS, "EVENT"),
        ("EXIT", 3 * HOUR_MS, "EVENT"),
        ("ENTER", 25 * HOUR_MS, "TIMER"),
        ("EXIT", 27 * HOUR_MS, "TIMER"),
    ]


def test_the_7d_horizon_lapses_on_its_six_hour_bucket_boundary():
    # an event at A+7h is in bucket [A+6h, A+12h): it stops counting at A+6h+7d, 1h before its 7-day mark
    assert run("events_7d > 0", [ev(1, A + 7 * HOUR_MS)], A + 3 * WEEK_MS) == [
        ("ENTER", 7 * HOUR_MS, "EVENT"),
        ("EXIT", 6 * HOUR_MS + WEEK_MS, "TIMER"),
    ]


def test_distinct_products_lapse_with_the_bucket_of_their_latest_view():
    # 1h horizon, 5-minute buckets
    views = [
        ev(1, A + 2 * MINUTE_MS, "product_view", product_id="p1"),
        ev(2, A + 7 * MINUTE_MS, "product_view", product_id="p2"),
    ]
    assert run("distinct_products_viewed_1h > 1", views, A + DAY_MS) == [
        ("ENTER", 7 * MINUTE_MS, "EVENT"),
        ("EXIT", HOUR_MS, "TIMER"),
    ]
    again = [*views, ev(3, A + 8 * MINUTE_MS, "product_view", product_id="p1")]
    assert run("distinct_products_viewed_1h > 1", again, A + DAY_MS) == [
        ("ENTER", 7 * MINUTE_MS, "EVENT"),
        ("EXIT", HOUR_MS + 5 * MINUTE_MS, "TIMER"),
    ]


def test_windowed_sessions_lapse_with_the_bucket_of_their_last_event():
    # two derived sessions (more than 30 min apart); the first ends at A+10m, in the 24h bucket [A, A+1h)
    events = [ev(1, A + 10 * MINUTE_MS), ev(2, A + 2 * HOUR_MS)]
    assert run("sessions_24h > 1", events, A + 3 * DAY_MS) == [
        ("ENTER", 2 * HOUR_MS, "EVENT"),
        ("EXIT", DAY_MS, "TIMER"),
    ]


def test_sessions_per_week_drops_exactly_seven_days_after_a_sessions_last_event():
    events = [ev(1, A), ev(2, A + HOUR_MS)]
    assert run("sessions_per_week > 1", events, A + 3 * WEEK_MS) == [
        ("ENTER", HOUR_MS, "EVENT"),
        ("EXIT", WEEK_MS, "TIMER"),
    ]


def test_the_current_session_ends_when_the_gap_passes():
    events = [ev(1, A), ev(2, A + 10 * MINUTE_MS)]
    assert run("in_session == 1", events, A + DAY_MS) == [("ENTER", 0, "EVENT"), ("EXIT", 40 * MINUTE_MS, "TIMER")]
    assert run("missing(current_session_duration_ms)", events, A + DAY_MS) == [("ENTER", 40 * MINUTE_MS, "TIMER")]
    assert run("current_session_duration_ms >= 10m", events, A + DAY_MS) == [
        ("ENTER", 10 * MINUTE_MS, "EVENT"),
        ("EXIT", 40 * MINUTE_MS, "TIMER"),
    ]


def test_absent_holds_for_someone_who_never_did_it_and_returns_exactly_the_window_after_the_last_one():
    events = [ev(1, A), ev(2, A + HOUR_MS, "purchase", price=10.0)]
    assert run("absent(purchase, 7d)", events, A + 3 * WEEK_MS) == [
        ("ENTER", 0, "EVENT"),
        ("EXIT", HOUR_MS, "EVENT"),
        ("ENTER", HOUR_MS + WEEK_MS, "TIMER"),
    ]


def test_a_recency_map_key_goes_missing_when_no_horizon_covers_its_latest_view():
    # the latest view of p-1 at A+1h is in the 30d horizon's bucket [A, A+1d): listed until A+30d
    events = [ev(1, A), ev(2, A + HOUR_MS, "product_view", product_id="p-1")]
    assert run('missing(ms_since_viewed_product["p-1"])', events, A + 40 * DAY_MS) == [
        ("ENTER", 0, "EVENT"),
        ("EXIT", HOUR_MS, "EVENT"),
        ("ENTER", 30 * DAY_MS, "TIMER"),
    ]
    assert run('ms_since_viewed_product["p-1"] >= 10m', events, A + 40 * DAY_MS) == [
        ("ENTER", HOUR_MS + 10 * MINUTE_MS, "TIMER"),
        ("EXIT", 30 * DAY_MS, "TIMER"),
    ]


def test_not_and_or_take_the_earliest_change_of_their_parts():
    events = [ev(1, A, "purchase", price=1.0), ev(2, A + MINUTE_MS)]
    # purchase recency flips at A+10m, event recency at A+1m+5m
    assert run("not (ms_since_last_purchase < 10m or ms_since_last_event < 5m)", events, A + DAY_MS) == [
        ("ENTER", 10 * MINUTE_MS, "TIMER")
    ]
    assert run("ms_since_last_purchase < 10m and ms_since_last_event < 5m", events, A + DAY_MS) == [
        ("ENTER", 0, "EVENT"),
        ("EXIT", 6 * MINUTE_MS, "TIMER"),
    ]
