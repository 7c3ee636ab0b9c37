"""Definition files: the example segments of the issue on small hand-built event sequences with
the exact transitions they must produce; hysteresis, min_dwell, exclusive groups, segments removed
from the definitions, what a transition's reason records; the shipped file; and every rejection,
each naming the file, the line (and column where known) and the segment. docs/definitions.md.
Instants are worked out by hand from the definitions and the default profile configuration
(buckets 10m/1m, 1h/5m, 24h/1h, 7d/6h, 30d/1d; session gap 30 min; half-life 7 d)."""

from __future__ import annotations

import pytest

from jobs.settings import SHIPPED_DEFINITIONS
from tests.conftest import START_MS
from udfs.conditions import ModelOutput
from udfs.definitions import (
    REMOVED_RULE,
    DefinitionError,
    ExclusiveGroup,
    Segment,
    load_definitions,
    parse_definitions,
)
from udfs.events import UserEvent
from udfs.profile import WEEK_MS, UserProfile
from udfs.profile_config import DAY_MS, HOUR_MS, MINUTE_MS
from udfs.scoring import ModelRegistry
from udfs.segmentation import DEFAULT_MODELS_DIR, Segmentation
from udfs.transitions import SegmentEngine, Transition
from udfs.yaml_events import EventComposer

HALF_LIFE = 7 * DAY_MS
T0 = START_MS
A = T0 - T0 % DAY_MS  # a UTC midnight: a bucket boundary of every default horizon
SEQ0 = A * 1000  # a profile lifetime whose first event is at A numbers its transitions from here
SOURCE = "defs.yaml"

MODELS = {
    "purchase_propensity": ModelOutput("purchase_propensity"),
    "churn_risk": ModelOutput("churn_risk"),
    "persona": ModelOutput("persona", clusters=4),
}


def ev(n: int, ts: int, kind: str = "page_view", user: str = "u1", **fields) -> UserEvent:
    return UserEvent(f"{user}-{n}", user, kind, ts, **fields)


def view(n: int, ts: int, product: str, category: str | None = None) -> UserEvent:
    return ev(n, ts, "product_view", product_id=product, category=category)


def add(n: int, ts: int, product: str = "p1", quantity: int = 1, price: float = 10.0) -> UserEvent:
    return ev(n, ts, "add_to_cart", product_id=product, quantity=quantity, price=price)


def remove(n: int, ts: int, product: str = "p1", quantity: int | None = 1) -> UserEvent:
    return ev(n, ts, "remove_from_cart", product_id=product, quantity=quantity)


def parse(text: str, models=None):
    return parse_definitions(text, SOURCE, None, models)


class Run:
    """One user through one engine; transitions as (segment, kind, ms after A, cause)."""

    def __init__(self, definitions, scorer=None, model_version=None, profile: UserProfile | None = None):
        self.engine = SegmentEngine(definitions, model_version=model_version, scorer=scorer)
        self.profile = profile if profile is not None else UserProfile()
        self.all: list[Transition] = []

    def event(self, event: UserEvent) -> list[Transition]:
        out = self.engine.on_event(event.user_id, self.profile, event)
        self.all += out
        return out

    def until(self, time_ms: int) -> list[Transition]:
        out = self.engine.advance_to("u1", self.profile, time_ms)
        self.all += out
        return out

    def next_change(self) -> int | None:
        return self.engine.next_change_ms(self.profile)


def brief(transitions, segments=None) -> list[tuple]:
    return [
        (t.segment, t.kind, t.event_time - A, t.cause) for t in transitions if segments is None or t.segment in segments
    ]


def replay(definitions, events, until, segments=None, **kw) -> list[tuple]:
    run = Run(definitions, **kw)
    for event in events:
        run.event(event)
    run.until(until)
    assert_exits_first(run.all)
    return brief(run.all, segments)


def assert_exits_first(transitions) -> None:
    """docs/definitions.md: exits precede entries at the same instant."""
    for a, b in zip(transitions, transitions[1:], strict=False):
        if a.event_time == b.event_time and a.user_id == b.user_id:
            assert not (a.kind == "ENTER" and b.kind == "EXIT"), (a, b)


def first_instant(after: int, differs) -> int:
    """The first whole millisecond > after at which a monotone predicate becomes true (bisection)."""
    low, high = after, after + 1
    while not differs(high):
        high = after + 2 * (high - after)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if differs(mid) else (mid, high)
    return high


# The shipped file reads model scores; the behavioural segments these tests replay do not.
SHOP = load_definitions(SHIPPED_DEFINITIONS, models=ModelRegistry.outputs_of(DEFAULT_MODELS_DIR))


# =============================================================================================
# The shipped file
# =============================================================================================


def test_the_shipped_definitions_load_with_the_segments_and_group_of_the_readme():
    shop = Segmentation.load(SHIPPED_DEFINITIONS).definitions
    assert shop.version == "shop-7"
    assert shop.names == (
        "new_paid_mobile_visitor",
        "new_from_newsletter",
        "new_from_search",
        "active_browser",
        "cart_holder",
        "cart_abandoner",
        "potential_buyer",
        "abandoner_still_browsing",
        "shoe_considerer",
        "shoe_browser_not_buying",
        "window_shopper",
        "engagement_score_above_50",
        "engaged_steady",
        "highly_engaged",
        "likely_buyer",
        "churn_risk_high",
        "high_value",
        "big_spender_persona",
        "browsing_not_buying_persona",
        "tier_high",
        "tier_medium",
        "tier_low",
    )
    assert [s.name for s in shop.groups["engagement_tier"].segments] == ["tier_high", "tier_medium", "tier_low"]
    steady = shop.segments["engaged_steady"]
    assert (steady.enter.text, steady.exit.text, steady.min_dwell_ms) == (
        "engagement_score > 50",
        "engagement_score < 40",
        DAY_MS,
    )
    assert shop.segments["cart_abandoner"].enter.text == "cart_items > 0 and ms_since_cart_activity >= 30m"
    assert shop.models == ("churn_risk", "clv_30d", "personas", "purchase_propensity")
    assert shop.rescore_every_ms == 6 * 3_600_000
    # referenced segments are decided before the segments that read them
    order = [u.name for u in shop.units]
    assert order.index("cart_abandoner") < order.index("potential_buyer")
    assert order.index("active_browser") < order.index("window_shopper")
    assert isinstance(shop.units[order.index("engagement_tier")], ExclusiveGroup)
    assert all(isinstance(u, Segment | ExclusiveGroup) for u in shop.units)
    assert shop.source == str(SHIPPED_DEFINITIONS) and shop.text == SHIPPED_DEFINITIONS.read_bytes()


def test_a_file_that_cannot_be_read_is_a_definition_error_naming_it(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(DefinitionError) as info:
        load_definitions(missing)
    assert str(info.value).startswith(f"{missing}: cannot read")


# =============================================================================================
# The example segments of the issue
# =============================================================================================


def test_viewed_product_x_in_the_last_10_minutes_and_added_it_to_the_cart():
    run = Run(SHOP)
    run.event(view(1, A, "p-shoes-007", "shoes"))
    run.event(view(2, A + MINUTE_MS, "p-other", "shoes"))
    out = run.event(add(3, A + 2 * MINUTE_MS, "p-shoes-007", price=80.0))
    [enter] = [t for t in out if t.segment == "shoe_considerer"]
    assert (enter.kind, enter.event_time, enter.cause, enter.cause_event_id) == (
        "ENTER",
        A + 2 * MINUTE_MS,
        "EVENT",
        "u1-3",
    )
    assert enter.rule == 'ms_since_viewed_product["p-shoes-007"] < 10m and cart_quantity["p-shoes-007"] > 0'
    assert enter.features == {
        "ms_since_viewed_product[p-shoes-007]": 2.0 * MINUTE_MS,
        "cart_quantity[p-shoes-007]": 1.0,
    }
    run.until(A + DAY_MS)
    # the view is 10 minutes old at A+10m: the condition stops holding then, by time alone
    assert brief(run.all, {"shoe_considerer"}) == [
        ("shoe_considerer", "ENTER", 2 * MINUTE_MS, "EVENT"),
        ("shoe_considerer", "EXIT", 10 * MINUTE_MS, "TIMER"),
    ]
    [exit_] = [t for t in run.all if t.segment == "shoe_considerer" and t.kind == "EXIT"]
    assert exit_.rule == 'not (ms_since_viewed_product["p-shoes-007"] < 10m and cart_quantity["p-shoes-007"] > 0)'
    assert exit_.features["ms_since_viewed_product[p-shoes-007]"] == 10.0 * MINUTE_MS


def test_viewed_product_x_needs_that_product_in_the_cart_and_a_view_of_it():
    other_in_cart = [view(1, A, "p-shoes-007"), add(2, A + MINUTE_MS, "p-other")]
    assert replay(SHOP, other_in_cart, A + DAY_MS, {"shoe_considerer"}) == []
    added_then_viewed = [add(1, A, "p-shoes-007"), view(2, A + 5 * MINUTE_MS, "p-shoes-007")]
    assert replay(SHOP, added_then_viewed, A + DAY_MS, {"shoe_considerer"}) == [
        ("shoe_considerer", "ENTER", 5 * MINUTE_MS, "EVENT"),
        ("shoe_considerer", "EXIT", 15 * MINUTE_MS, "TIMER"),
    ]
    removed = [
        view(1, A, "p-shoes-007"),
        add(2, A + MINUTE_MS, "p-shoes-007"),
        remove(3, A + 3 * MINUTE_MS, "p-shoes-007"),
    ]
    assert replay(SHOP, removed, A + DAY_MS, {"shoe_considerer"}) == [
        ("shoe_considerer", "ENTER", MINUTE_MS, "EVENT"),
        ("shoe_considerer", "EXIT", 3 * MINUTE_MS, "EVENT"),
    ]


def test_viewed_a_category_more_than_3_times_in_24h_and_has_not_purchased():
    # three views in the 24h bucket [A, A+1h), the fourth in [A+1h, A+2h); the first bucket leaves at A+24h
    views = [view(i, A + m * MINUTE_MS, f"s{i}", "shoes") for i, m in enumerate((10, 20, 30, 70), start=1)]
    run = Run(SHOP)
    for v in views[:3]:
        assert [t for t in run.event(v) if t.segment == "shoe_browser_not_buying"] == []
    [enter] = [t for t in run.event(views[3]) if t.segment == "shoe_browser_not_buying"]
    assert (enter.kind, enter.event_time, enter.cause) == ("ENTER", A + 70 * MINUTE_MS, "EVENT")
    assert enter.features == {"category_views_24h[shoes]": 4.0}
    assert enter.missing == ("ms_since_last_purchase",)  # never purchased: absent(purchase, 7d) holds
    run.until(A + 3 * DAY_MS)
    assert brief(run.all, {"shoe_browser_not_buying"}) == [
        ("shoe_browser_not_buying", "ENTER", 70 * MINUTE_MS, "EVENT"),
        ("shoe_browser_not_buying", "EXIT", DAY_MS, "TIMER"),
    ]
    # hats do not count, and a purchase ends it at once
    hats = [view(10 + i, A + i * MINUTE_MS, f"h{i}", "hats") for i in range(5)]
    assert replay(SHOP, hats, A + DAY_MS, {"shoe_browser_not_buying"}) == []
    bought = [*views, ev(9, A + 2 * HOUR_MS, "purchase", price=50.0)]
    assert replay(SHOP, bought, A + 3 * DAY_MS, {"shoe_browser_not_buying"}) == [
        ("shoe_browser_not_buying", "ENTER", 70 * MINUTE_MS, "EVENT"),
        ("shoe_browser_not_buying", "EXIT", 2 * HOUR_MS, "EVENT"),
    ]


def test_has_not_purchased_comes_back_exactly_seven_days_after_the_purchase():
    # purchase at A; four shoe views in the 24h bucket [A+6d20h, A+6d21h): not while the purchase is
    # less than 7 days old; enters at A+7d; the views leave the 24h horizon at A+7d20h
    start = 6 * DAY_MS + 20 * HOUR_MS
    events = [ev(1, A, "purchase", price=10.0)] + [
        view(2 + i, A + start + i * MINUTE_MS, f"s{i}", "shoes") for i in range(4)
    ]
    assert replay(SHOP, events, A + 9 * DAY_MS, {"shoe_browser_not_buying"}) == [
        ("shoe_browser_not_buying", "ENTER", WEEK_MS, "TIMER"),
        ("shoe_browser_not_buying", "EXIT", WEEK_MS + 20 * HOUR_MS, "TIMER"),
    ]


def test_more_than_5_sessions_a_week_is_tier_high_with_medium_and_low_as_the_rest():
    # a page view every hour: six derived sessions (more than 30 min apart) ending at A, A+1h, ... A+5h;
    # each leaves sessions_per_week exactly 7 days after its last event
    run = Run(SHOP)
    for k in range(6):
        run.event(ev(k, A + k * HOUR_MS))
    run.until(A + 8 * DAY_MS)
    tiers = {"tier_high", "tier_medium", "tier_low"}
    assert brief(run.all, tiers) == [
        ("tier_low", "ENTER", 0, "EVENT"),  # 1 session: the rest
        ("tier_low", "EXIT", HOUR_MS, "EVENT"),
        ("tier_medium", "ENTER", HOUR_MS, "EVENT"),  # 2 > 1
        ("tier_medium", "EXIT", 5 * HOUR_MS, "EVENT"),
        ("tier_high", "ENTER", 5 * HOUR_MS, "EVENT"),  # 6 > 5
        # A+7d: 5 sessions, still high (it leaves at 4 or fewer)
        ("tier_high", "EXIT", WEEK_MS + HOUR_MS, "TIMER"),
        ("tier_medium", "ENTER", WEEK_MS + HOUR_MS, "TIMER"),  # 4
        ("tier_medium", "EXIT", WEEK_MS + 4 * HOUR_MS, "TIMER"),
        ("tier_low", "ENTER", WEEK_MS + 4 * HOUR_MS, "TIMER"),  # 1
    ]
    rules = [(t.segment, t.kind, t.rule, t.features) for t in run.all if t.segment in tiers]
    assert rules[1] == (
        "tier_low",
        "EXIT",
        "exclusive group engagement_tier: tier_medium took precedence (sessions_per_week > 1)",
        {"sessions_per_week": 2.0},
    )
    assert rules[3][2] == "exclusive group engagement_tier: tier_high took precedence (sessions_per_week > 5)"
    assert rules[5] == ("tier_high", "EXIT", "sessions_per_week <= 4", {"sessions_per_week": 4.0})
    assert rules[7] == ("tier_medium", "EXIT", "not (sessions_per_week > 1)", {"sessions_per_week": 1.0})
    assert rules[8][2] == "true"


def engagement(t: int) -> float:
    """Six video plays (10 points each) at A, A+1m, ... A+5m, decayed to t (independently of the engine)."""
    return sum(10.0 * 2.0 ** (-(t - A - k * MINUTE_MS) / HALF_LIFE) for k in range(6))


def test_engagement_score_above_50_enters_at_the_sixth_video_and_leaves_at_the_exact_millisecond():
    assert engagement(A + 5 * MINUTE_MS) > 50
    assert sum(10.0 * 2.0 ** (-(4 - k) * MINUTE_MS / HALF_LIFE) for k in range(5)) < 50
    below_50 = first_instant(A + 5 * MINUTE_MS, lambda t: engagement(t) <= 50)
    run = Run(SHOP)
    for k in range(6):
        run.event(ev(k, A + k * MINUTE_MS, "video_play"))
    assert brief(run.all, {"engagement_score_above_50"}) == [
        ("engagement_score_above_50", "ENTER", 5 * MINUTE_MS, "EVENT")
    ]
    run.until(below_50 - 1)
    assert brief(run.all, {"engagement_score_above_50"}) == [
        ("engagement_score_above_50", "ENTER", 5 * MINUTE_MS, "EVENT")
    ]
    read = SHOP.catalog.read
    assert read("engagement_score", run.profile, below_50 - 1) > 50 >= read("engagement_score", run.profile, below_50)
    [exit_] = [t for t in run.until(below_50) if t.segment == "engagement_score_above_50"]
    assert (exit_.kind, exit_.event_time, exit_.cause, exit_.rule) == (
        "EXIT",
        below_50,
        "TIMER",
        "not (engagement_score > 50)",
    )


def test_engaged_steady_holds_through_50_and_leaves_below_40_hysteresis_with_exact_instants():
    below_40 = first_instant(A + 5 * MINUTE_MS, lambda t: engagement(t) < 40)
    events = [ev(k, A + k * MINUTE_MS, "video_play") for k in range(6)]
    assert replay(SHOP, events, A + 3 * WEEK_MS, {"engaged_steady"}) == [
        ("engaged_steady", "ENTER", 5 * MINUTE_MS, "EVENT"),
        ("engaged_steady", "EXIT", below_40 - A, "TIMER"),
    ]
    run = Run(SHOP)
    for event in events:
        run.event(event)
    [exit_] = [t for t in run.until(A + 3 * WEEK_MS) if t.segment == "engaged_steady"]
    assert (exit_.rule, exit_.event_time) == ("engagement_score < 40", below_40)
    assert 39.99 < exit_.features["engagement_score"] < 40


def test_cart_abandoned_in_the_last_24h():
    run = Run(SHOP)
    run.event(add(1, A))
    run.event(ev(2, A + 2 * HOUR_MS))  # browsing again: abandoner_still_browsing for 10 minutes
    run.until(A + 3 * DAY_MS)
    watched = {"cart_abandoner", "potential_buyer", "abandoner_still_browsing"}
    assert brief(run.all, watched) == [
        ("cart_abandoner", "ENTER", 30 * MINUTE_MS, "TIMER"),  # cart untouched for 30 minutes
        ("potential_buyer", "ENTER", 30 * MINUTE_MS, "TIMER"),  # decided after the segment it reads
        ("abandoner_still_browsing", "ENTER", 2 * HOUR_MS, "EVENT"),
        ("abandoner_still_browsing", "EXIT", 2 * HOUR_MS + 10 * MINUTE_MS, "TIMER"),
        ("potential_buyer", "EXIT", DAY_MS, "TIMER"),  # the cart activity is 24 h old
    ]
    [exit_] = [t for t in run.all if t.segment == "potential_buyer" and t.kind == "EXIT"]
    assert exit_.rule == "not (segment.cart_abandoner and ms_since_cart_activity < 24h)"
    assert exit_.features == {"segment.cart_abandoner": 1.0, "ms_since_cart_activity": float(DAY_MS)}


def test_in_segment_a_and_not_in_segment_b():
    # window_shopper: segment.active_browser and not segment.cart_holder
    events = [ev(1, A), add(2, A + MINUTE_MS), remove(3, A + 2 * MINUTE_MS, quantity=None)]
    assert replay(SHOP, events, A + DAY_MS, {"active_browser", "cart_holder", "window_shopper"}) == [
        ("active_browser", "ENTER", 0, "EVENT"),
        ("window_shopper", "ENTER", 0, "EVENT"),
        ("window_shopper", "EXIT", MINUTE_MS, "EVENT"),
        ("cart_holder", "ENTER", MINUTE_MS, "EVENT"),
        ("cart_holder", "EXIT", 2 * MINUTE_MS, "EVENT"),
        ("window_shopper", "ENTER", 2 * MINUTE_MS, "EVENT"),
        # the last event is at A+2m: active_browser lapses at A+12m, and window_shopper with it
        ("active_browser", "EXIT", 12 * MINUTE_MS, "TIMER"),
        ("window_shopper", "EXIT", 12 * MINUTE_MS, "TIMER"),
    ]
    run = Run(SHOP)
    run.event(ev(1, A))
    [enter] = [t for t in run.all if t.segment == "window_shopper"]
    assert enter.rule == "segment.active_browser and not segment.cart_holder"
    assert enter.features == {"segment.active_browser": 1.0, "segment.cart_holder": 0.0}


MODEL_FILE = """\
version: models-1
segments:
  - name: likely_buyer
    when: score.purchase_propensity > 0.7
  - name: churn_risk
    when: score.churn_risk > 0.8
  - name: persona_2
    when: score.persona == 2
  - name: likely_buyer_now
    when: score.purchase_propensity > 0.7 and ms_since_last_event < 10m
"""


class FakeScorer:
    def __init__(self):
        self.next: dict[str, float] = {}
        self.calls: list[int] = []

    def __call__(self, profile, now_ms, read):
        self.calls.append(now_ms)
        return dict(self.next)


def test_model_scores_purchase_propensity_churn_risk_and_persona_cluster():
    definitions = parse(MODEL_FILE, MODELS)
    assert definitions.models == ("churn_risk", "persona", "purchase_propensity")
    scorer = FakeScorer()
    run = Run(definitions, scorer=scorer, model_version="m-7")

    scorer.next = {"purchase_propensity": 0.5, "churn_risk": 0.9, "persona": 2}
    out = run.event(ev(1, A))
    assert brief(out) == [("churn_risk", "ENTER", 0, "EVENT"), ("persona_2", "ENTER", 0, "EVENT")]
    assert all(t.scores == scorer.next and t.model_version == "m-7" for t in out)

    scorer.next = {"purchase_propensity": 0.71, "churn_risk": 0.8, "persona": 1}
    out = run.event(ev(2, A + MINUTE_MS))
    assert sorted(brief(out)) == sorted(
        [
            ("churn_risk", "EXIT", MINUTE_MS, "EVENT"),  # 0.8 is not above 0.8
            ("persona_2", "EXIT", MINUTE_MS, "EVENT"),
            ("likely_buyer", "ENTER", MINUTE_MS, "EVENT"),
            ("likely_buyer_now", "ENTER", MINUTE_MS, "EVENT"),
        ]
    )
    assert [t.kind for t in out] == ["EXIT", "EXIT", "ENTER", "ENTER"]
    assert {t.segment: t.rule for t in out if t.kind == "EXIT"} == {
        "churn_risk": "not (score.churn_risk > 0.8)",
        "persona_2": "not (score.persona == 2)",
    }

    # scores are computed once per event and hold until the next one: the timer at A+11m reads them
    [lapse] = run.until(A + 11 * MINUTE_MS)
    assert brief([lapse]) == [("likely_buyer_now", "EXIT", 11 * MINUTE_MS, "TIMER")]
    assert lapse.scores == {"purchase_propensity": 0.71, "churn_risk": 0.8, "persona": 1}
    assert scorer.calls == [A, A + MINUTE_MS]

    scorer.next = {}  # the model did not score: comparisons reading it are false
    assert brief(run.event(ev(3, A + 20 * MINUTE_MS))) == [("likely_buyer", "EXIT", 20 * MINUTE_MS, "EVENT")]


def test_a_persona_cluster_threshold_must_be_a_cluster_id():
    for ok in ("score.persona == 0", "score.persona == 3", "score.persona in [0, 3]"):
        parse(f"version: v1\nsegments:\n  - name: s\n    when: {ok}\n", MODELS)
    for bad, shown in (("score.persona == 4", "4"), ("score.persona >= -1", "-1"), ("score.persona < 3.5", "3.5")):
        with pytest.raises(DefinitionError) as info:
            parse(f"version: v1\nsegments:\n  - name: s\n    when: {bad}\n", MODELS)
        assert str(info.value) == (
            f"defs.yaml:4:25: segment 's': threshold {shown} is outside the range of "
            f"score.persona, [0, 3]: the comparison would be constant"
        )


# =============================================================================================
# Hysteresis, min_dwell, exclusive groups
# =============================================================================================


def test_hysteresis_enters_on_the_enter_condition_and_leaves_only_on_the_exit_condition():
    definitions = parse(
        "version: v1\nsegments:\n  - name: big\n    enter: cart_items >= 3\n    exit: cart_items <= 1\n"
    )
    events = [
        add(1, A, quantity=3),
        remove(2, A + MINUTE_MS),
        remove(3, A + 2 * MINUTE_MS),
        add(4, A + 3 * MINUTE_MS),
        add(5, A + 4 * MINUTE_MS),
    ]
    # cart: 3 (enter), 2 (stays), 1 (leaves), 2 (does not come back), 3 (enters)
    assert replay(definitions, events, A + DAY_MS) == [
        ("big", "ENTER", 0, "EVENT"),
        ("big", "EXIT", 2 * MINUTE_MS, "EVENT"),
        ("big", "ENTER", 4 * MINUTE_MS, "EVENT"),
    ]
    run = Run(definitions)
    for event in events[:3]:
        run.event(event)
    assert [(t.rule, t.features) for t in run.all] == [
        ("cart_items >= 3", {"cart_items": 3.0}),
        ("cart_items <= 1", {"cart_items": 1.0}),
    ]


def test_an_enter_exit_pair_that_can_both_hold_is_one_stay_entry_winning_while_enter_holds():
    """Issue 16: `enter: A, exit: B` where both can hold at once. A member leaves when B holds
    and A does not, at the exact instant, by a timer when time alone gets it there."""
    # The pair: B (recent activity) holds at every event, so a member leaves only when
    # the cart empties, and at that very event (it used to leave at the next event after entering).
    pair = parse("version: v1\nsegments:\n  - name: s\n    enter: cart_items > 0\n    exit: ms_since_last_event < 1d\n")
    assert replay(
        pair,
        [add(1, A), ev(2, A + MINUTE_MS), ev(3, A + HOUR_MS), ev(4, A + 2 * HOUR_MS, "purchase", price=5.0)],
        A + 3 * DAY_MS,
    ) == [("s", "ENTER", 0, "EVENT"), ("s", "EXIT", 2 * HOUR_MS, "EVENT")]
    # A lapses by time while B holds: the exit is due at A's lapse and a timer takes it there.
    lapsing = parse(
        "version: v1\nsegments:\n  - name: s\n    enter: ms_since_last_event < 10m\n    exit: cart_items == 0\n"
    )
    run = Run(lapsing)
    assert brief(run.event(ev(1, A))) == [("s", "ENTER", 0, "EVENT")]  # entry wins: B holds too
    assert run.next_change() == A + 10 * MINUTE_MS
    out = run.until(A + DAY_MS)
    assert [(t.kind, t.event_time - A, t.cause, t.rule, t.features) for t in out] == [
        ("EXIT", 10 * MINUTE_MS, "TIMER", "cart_items == 0", {"cart_items": 0.0})
    ]
    # While B does not hold, A lapsing changes nothing; B coming true with A still holding
    # changes nothing either; A's lapse after that is the exit.
    assert replay(lapsing, [add(1, A), remove(2, A + 20 * MINUTE_MS)], A + DAY_MS) == [
        ("s", "ENTER", 0, "EVENT"),
        ("s", "EXIT", 30 * MINUTE_MS, "TIMER"),
    ]


def test_in_a_group_a_member_whose_own_exit_holds_records_its_own_rule_not_the_precedence():
    """Issue 16: the current member's own exit holds and an earlier-listed segment enters at the
    same instant: the member's EXIT records its own rule (it would have left anyway), the
    winner's ENTER its enter rule; "took precedence" is only for a member whose exit does not hold."""
    run = Run(parse(GROUP_FILE))
    run.event(add(1, A, quantity=1))  # small
    out = run.event(add(2, A + MINUTE_MS, quantity=2))  # 3 items: big enters, small's own exit does not hold
    assert [(t.segment, t.kind, t.rule) for t in out] == [
        ("small", "EXIT", "exclusive group sizes: big took precedence (cart_items >= 3)"),
        ("big", "ENTER", "cart_items >= 3"),
    ]
    own = parse("""\
version: groups-own
segments:
  - name: first
    when: ms_since_last_purchase < 1h
  - name: carted
    enter: cart_items >= 1
    exit: cart_items == 0
exclusive_groups:
  - name: shopper
    segments: [first, carted]
""")
    run = Run(own)
    assert brief(run.event(add(1, A))) == [("carted", "ENTER", 0, "EVENT")]
    out = run.event(ev(2, A + MINUTE_MS, "purchase", price=10.0))  # empties the cart (own exit) and makes first hold
    assert [(t.segment, t.kind, t.rule) for t in out] == [
        ("carted", "EXIT", "cart_items == 0"),
        ("first", "ENTER", "ms_since_last_purchase < 1h"),
    ]
    assert out[0].features == {"cart_items": 0.0}


@pytest.mark.parametrize(
    "enter, exit_",
    [
        ("engagement_score > 50", "engagement_score < 60"),
        ("engagement_score >= 50", "engagement_score <= 50"),  # both hold at exactly 50
        ("50 < engagement_score", "engagement_score < 60"),
        ("cart_items > 2", "cart_items < 5"),
        ("score.churn_risk > 0.5", "score.churn_risk <= 0.9"),
        ("ms_since_last_event < 10m", "ms_since_last_event < 20m"),
    ],
)
def test_overlapping_hysteresis_thresholds_are_refused_at_the_exit_line(enter, exit_):
    text = f"version: v1\nsegments:\n  - name: s\n    enter: {enter}\n    exit: {exit_}\n"
    with pytest.raises(DefinitionError) as info:
        parse(text, MODELS)
    assert str(info.value).startswith(f"defs.yaml:5: segment 's': enter ({enter}) and exit ({exit_}) both hold")


@pytest.mark.parametrize(
    "enter, exit_",
    [
        ("engagement_score > 50", "engagement_score < 40"),
        ("engagement_score > 50", "engagement_score <= 50"),
        ("engagement_score >= 50", "engagement_score < 50"),
        ("cart_items > 2", "cart_items < 1"),
        ("ms_since_last_event < 10m", "ms_since_last_event >= 10m"),
    ],
)
def test_separated_hysteresis_thresholds_are_accepted(enter, exit_):
    parse(f"version: v1\nsegments:\n  - name: s\n    enter: {enter}\n    exit: {exit_}\n")


DWELL_FILE = """\
version: dwell-1
segments:
  - name: big_cart
    enter: cart_items > 2
    exit: cart_items < 1
    min_dwell: 1h
  - name: recent
    when: ms_since_last_event < 10m
    min_dwell: 1h
"""


def test_min_dwell_delays_an_exit_to_exactly_the_end_of_the_dwell_by_a_timer():
    run = Run(parse(DWELL_FILE))
    assert [t.kind for t in run.event(add(1, A, quantity=3))] == ["ENTER", "ENTER"]
    assert run.event(remove(2, A + 5 * MINUTE_MS, quantity=None)) == []  # the exit holds, but not before A+1h
    assert run.next_change() == A + HOUR_MS
    assert run.until(A + HOUR_MS - 1) == []
    out = run.until(A + HOUR_MS)
    assert [(t.segment, t.kind, t.event_time, t.cause, t.rule) for t in out] == [
        ("big_cart", "EXIT", A + HOUR_MS, "TIMER", "cart_items < 1"),
        ("recent", "EXIT", A + HOUR_MS, "TIMER", "not (ms_since_last_event < 10m)"),
    ]


def test_at_the_end_of_the_dwell_the_exit_is_checked_again():
    events = [
        add(1, A, quantity=3),
        remove(2, A + 5 * MINUTE_MS, quantity=None),
        add(3, A + 55 * MINUTE_MS),
        remove(4, A + 2 * HOUR_MS, quantity=None),
    ]
    # at A+1h: one item in the cart (not < 1) and the last event 5 minutes old: both stay
    assert replay(parse(DWELL_FILE), events, A + DAY_MS) == [
        ("big_cart", "ENTER", 0, "EVENT"),
        ("recent", "ENTER", 0, "EVENT"),
        ("recent", "EXIT", 65 * MINUTE_MS, "TIMER"),
        ("big_cart", "EXIT", 2 * HOUR_MS, "EVENT"),
        ("recent", "ENTER", 2 * HOUR_MS, "EVENT"),
        ("recent", "EXIT", 3 * HOUR_MS, "TIMER"),  # entered at A+2h: the dwell, not the 10 minutes, decides
    ]


GROUP_FILE = """\
version: groups-1
segments:
  - name: big
    enter: cart_items >= 3
    exit: cart_items < 2
  - name: small
    when: cart_items >= 1
exclusive_groups:
  - name: sizes
    segments: [big, small]
"""


def test_an_exclusive_group_takes_the_first_listed_and_an_earlier_one_takes_precedence():
    run = Run(parse(GROUP_FILE))
    assert brief(run.event(add(1, A, quantity=3))) == [("big", "ENTER", 0, "EVENT")]  # both hold: big is first
    assert run.event(remove(2, A + MINUTE_MS)) == []  # 2: big does not leave, small cannot displace it
    out = run.event(remove(3, A + 2 * MINUTE_MS))  # 1: big leaves, small enters; the exit first
    assert [(t.segment, t.kind, t.rule) for t in out] == [
        ("big", "EXIT", "cart_items < 2"),
        ("small", "ENTER", "cart_items >= 1"),
    ]
    out = run.event(add(4, A + 3 * MINUTE_MS, quantity=2))  # 3: big enters again and takes precedence
    assert [(t.segment, t.kind, t.rule) for t in out] == [
        ("small", "EXIT", "exclusive group sizes: big took precedence (cart_items >= 3)"),
        ("big", "ENTER", "cart_items >= 3"),
    ]
    assert out[0].features == {"cart_items": 3.0}
    assert brief(run.event(remove(5, A + 4 * MINUTE_MS, quantity=None))) == [("big", "EXIT", 4 * MINUTE_MS, "EVENT")]
    assert {name: m.member for name, m in run.profile.memberships.items()} == {"big": False, "small": False}


FROZEN_FILE = """\
version: groups-2
segments:
  - name: huge
    when: cart_items >= 5
  - name: sticky
    when: cart_items >= 1
    min_dwell: 30m
exclusive_groups:
  - name: frozen
    segments: [huge, sticky]
"""


def test_while_the_members_dwell_runs_the_group_does_not_change_then_precedence_applies_at_its_end():
    run = Run(parse(FROZEN_FILE))
    assert brief(run.event(add(1, A))) == [("sticky", "ENTER", 0, "EVENT")]
    assert run.event(add(2, A + 5 * MINUTE_MS, quantity=4)) == []  # huge holds, but sticky's dwell runs
    assert run.next_change() == A + 30 * MINUTE_MS
    assert run.until(A + 30 * MINUTE_MS - 1) == []
    out = run.until(A + 30 * MINUTE_MS)
    assert [(t.segment, t.kind, t.event_time, t.cause, t.rule) for t in out] == [
        (
            "sticky",
            "EXIT",
            A + 30 * MINUTE_MS,
            "TIMER",
            "exclusive group frozen: huge took precedence (cart_items >= 5)",
        ),
        ("huge", "ENTER", A + 30 * MINUTE_MS, "TIMER", "cart_items >= 5"),
    ]


def test_a_dwelling_member_whose_condition_fails_leaves_at_the_dwell_end_and_no_one_enters():
    events = [add(1, A), remove(2, A + 5 * MINUTE_MS, quantity=None)]
    run = Run(parse(FROZEN_FILE))
    for event in events:
        run.event(event)
    out = run.until(A + DAY_MS)
    assert [(t.segment, t.kind, t.event_time - A, t.rule) for t in out] == [
        ("sticky", "EXIT", 30 * MINUTE_MS, "not (cart_items >= 1)")
    ]


def test_a_precedence_that_passed_during_the_dwell_changes_nothing():
    events = [add(1, A), add(2, A + 5 * MINUTE_MS, quantity=4), remove(3, A + 10 * MINUTE_MS, quantity=4)]
    assert replay(parse(FROZEN_FILE), events, A + DAY_MS) == [("sticky", "ENTER", 0, "EVENT")]


# =============================================================================================
# Definitions versions and transition reasons
# =============================================================================================

V1 = """\
version: v1
segments:
  - name: holder
    when: cart_items > 0
  - name: recent
    when: ms_since_last_event < 10m
"""
V2 = """\
version: v2
segments:
  - name: recent
    when: ms_since_last_event < 10m
"""


def test_a_segment_removed_from_the_definitions_exits_at_the_next_event_under_the_new_version():
    first = Run(parse(V1))
    assert [(t.segment, t.sequence, t.definitions_version) for t in first.event(add(1, A))] == [
        ("holder", SEQ0 + 1, "v1"),
        ("recent", SEQ0 + 1, "v1"),
    ]
    second = Run(parse(V2), profile=first.profile)
    [exit_] = second.event(ev(2, A + MINUTE_MS))
    assert (exit_.segment, exit_.kind, exit_.rule, exit_.features) == ("holder", "EXIT", REMOVED_RULE, {})
    assert (exit_.definitions_version, exit_.cause, exit_.cause_event_id, exit_.sequence, exit_.event_time) == (
        "v2",
        "EVENT",
        "u1-2",
        SEQ0 + 2,
        A + MINUTE_MS,
    )
    assert second.event(ev(3, A + 2 * MINUTE_MS)) == []  # once


def test_a_segment_removed_from_the_definitions_exits_at_the_next_timer_under_the_new_version():
    first = Run(parse(V1))
    first.event(add(1, A))
    second = Run(parse(V2), profile=first.profile)
    out = second.until(A + DAY_MS)
    assert [(t.segment, t.kind, t.event_time - A, t.cause, t.rule, t.definitions_version) for t in out] == [
        ("holder", "EXIT", 10 * MINUTE_MS, "TIMER", REMOVED_RULE, "v2"),
        ("recent", "EXIT", 10 * MINUTE_MS, "TIMER", "not (ms_since_last_event < 10m)", "v2"),
    ]
    # brought back by a later version, its sequence continues: no transition id is reused
    third = Run(parse(V1.replace("version: v1", "version: v3")), profile=first.profile)
    [enter] = [t for t in third.event(ev(2, A + 2 * DAY_MS)) if t.segment == "holder"]
    assert (enter.kind, enter.sequence, enter.definitions_version) == ("ENTER", SEQ0 + 3, "v3")


REASONS_FILE = """\
version: reasons-7
segments:
  - name: tiered
    when: engagement_tier == "low"
  - name: cart_no_purchase
    when: absent(purchase, 7d)   and cart_items>0
  - name: likes_shoes
    when: '"shoes" in top_categories'
"""


def test_a_transition_reason_records_the_rule_as_written_features_labels_missing_and_the_version():
    run = Run(parse(REASONS_FILE))
    [tiered] = run.event(ev(1, A))
    assert (tiered.segment, tiered.rule, tiered.features, tiered.labels, tiered.missing) == (
        "tiered",
        'engagement_tier == "low"',
        {},
        {"engagement_tier": "low"},
        (),
    )
    assert tiered.definitions_version == "reasons-7"
    out = run.event(ev(2, A + MINUTE_MS, "add_to_cart", product_id="p1", category="shoes", quantity=2))
    by = {t.segment: t for t in out}
    assert set(by) == {"cart_no_purchase", "likes_shoes"}
    cart = by["cart_no_purchase"]
    assert cart.rule == "absent(purchase, 7d)   and cart_items>0"  # as written, spaces included
    assert (cart.features, cart.labels, cart.missing) == ({"cart_items": 2.0}, {}, ("ms_since_last_purchase",))
    shoes = by["likes_shoes"]
    assert (shoes.rule, shoes.labels, shoes.features) == ('"shoes" in top_categories', {"top_categories": "shoes"}, {})
    record = cart.to_record(emitted_at=A + MINUTE_MS)
    assert record["definitions_version"] == "reasons-7"
    assert record["reason"] == {
        "rule": "absent(purchase, 7d)   and cart_items>0",
        "features": {"cart_items": 2.0},
        "scores": {},
        "labels": {},
        "missing": ["ms_since_last_purchase"],
        "provisional": False,
    }
    [left] = [t for t in run.event(ev(3, A + 2 * MINUTE_MS, "purchase", price=20.0)) if t.segment == "cart_no_purchase"]
    assert (left.kind, left.rule) == ("EXIT", "not (absent(purchase, 7d)   and cart_items>0)")
    assert left.features == {"ms_since_last_purchase": 0.0, "cart_items": 0.0} and left.missing == ()


# =============================================================================================
# Rejections: file, line (and column where known), segment
# =============================================================================================


def rejected(text: str | bytes, models=None) -> DefinitionError:
    with pytest.raises(DefinitionError) as info:
        parse_definitions(text, SOURCE, None, models)
    assert info.value.source == SOURCE
    return info.value


def assert_names(err: DefinitionError, line: int | None, column: int | None, segment: str | None, message: str):
    where = SOURCE + (f":{line}" if line else "") + (f":{column}" if column else "")
    prefix = f"{where}: " + (f"segment {segment!r}: " if segment else "")
    text = str(err)
    assert text.startswith(prefix), (text, prefix)
    assert message in text[len(prefix) :], (text, message)
    assert (err.line, err.column, err.segment) == (line, column, segment)


def with_bad(condition: str) -> str:
    """Line 6 holds segment `bad`'s condition, its first character at column 11."""
    return (
        "version: v1\n"
        "segments:\n"
        "  - name: cart_holder\n"
        "    when: cart_items > 0\n"
        "  - name: bad\n"
        f"    when: {condition}\n"
    )


PC = {
    "purchase_propensity": ModelOutput("purchase_propensity"),
    "churn_risk": ModelOutput("churn_risk"),
    "persona": ModelOutput("persona", clusters=4),
}


@pytest.mark.parametrize(
    "condition, column, message, models",
    [
        # unknown names
        ("count_purchse_24h > 0", 11, "unknown feature 'count_purchse_24h' (did you mean 'count_purchase_24h'?)", None),
        ("cart_itms > 0", 11, "unknown feature 'cart_itms' (did you mean 'cart_items'?)", None),
        ("score.nope > 0.5", 11, "unknown model score 'nope' (models: none are installed)", None),
        (
            "score.purchase_propensty > 0.7",
            11,
            "unknown model score 'purchase_propensty' (models: churn_risk, persona, purchase_propensity)",
            PC,
        ),
        ("segment.cart_holdr", 11, "unknown segment 'cart_holdr' (did you mean 'cart_holder'?)", None),
        ("cart_items > 0 and not segment.nothing_like_it", 34, "unknown segment 'nothing_like_it'", None),
        # types
        (
            "count_purchase_24h > 10m",
            30,
            "count_purchase_24h is a number, not a duration: compare it with a plain number",
            None,
        ),
        ("engagement_tier == 3", 27, "cannot compare engagement_tier (text) with 3.0 (number)", None),
        ("engagement_tier < 'high'", 27, "text is compared with == or != only, not <", None),
        ("engagement_tier == 'hgh'", 27, "engagement_tier is never 'hgh': it is one of high, medium, low", None),
        (
            "engagement_tier in ['high', 'hgh']",
            39,
            "engagement_tier is never 'hgh': it is one of high, medium, low",
            None,
        ),
        ("cart_items in [1, 'two']", 29, "'two' is not a number like cart_items", None),
        (
            "ms_since_last_event > cart_items",
            31,
            "cannot compare ms_since_last_event (duration) with cart_items (number)",
            None,
        ),
        ("engagement_tier in cart_items", 27, "cart_items is not a list", None),
        ("top_categories == 'shoes'", 26, 'top_categories is a list: use "value" in top_categories', None),
        ("cart_items", 11, "cart_items is not a condition: compare it with something, e.g. cart_items > 0", None),
        ("segment.cart_holder == true", 31, "segments and true/false are conditions themselves", None),
        ("1 < 2", 13, "a comparison needs a feature, score or segment on one side", None),
        # ranges
        (
            "cart_items > -1",
            22,
            "threshold -1 is outside the range of cart_items, at least 0: the comparison would be constant",
            None,
        ),
        (
            "ms_since_last_event < -5m",
            31,
            "threshold -300000 is outside the range of ms_since_last_event, at least 0",
            None,
        ),
        ("score.churn_risk > 1.5", 28, "threshold 1.5 is outside the range of score.churn_risk, [0, 1]", PC),
        (
            "score.purchase_propensity < -0.1",
            37,
            "threshold -0.1 is outside the range of score.purchase_propensity, [0, 1]",
            PC,
        ),
        ("score.persona == 4", 25, "threshold 4 is outside the range of score.persona, [0, 3]", PC),
        # maps
        (
            "category_views_24h > 3",
            11,
            'category_views_24h is a map: name a key, e.g. category_views_24h["shoes"]',
            None,
        ),
        ("cart_items['x'] > 0", 11, "cart_items is not a map: it takes no [key]", None),
        ("cart['p1'] > 0", 11, "cart cannot be used in conditions", None),
        # values moving with time
        (
            "ms_since_last_event < ms_since_last_purchase",
            31,
            "ms_since_last_event changes continuously with time: compare it with a constant, not with another feature",
            None,
        ),
        ("engagement_score > category_affinity['shoes']", 28, "changes continuously with time", None),
        ("engagement_score in [50]", 28, "engagement_score changes continuously with time: use <, <=, >, >=", None),
        # durations and syntax
        ("ms_since_last_event < 10x", 33, "unexpected '10x' (durations: 500ms, 30s, 10m, 1h, 7d, 2w)", None),
        ("ms_since_last_event < 10 m", 36, "unexpected 'm' (expected 'and', 'or' or the end)", None),
        ("absent(purchase, 7)", 28, "absent(...) takes a positive duration second, such as 7d; found '7'", None),
        ("absent(purchases, 7d)", 18, "absent(...) takes an event type first", None),
        ("(cart_items > 0", 26, "expected ')', found the end of the condition", None),
    ],
)
def test_a_bad_condition_is_refused_naming_file_line_column_and_segment(condition, column, message, models):
    assert_names(rejected(with_bad(condition), models), 6, column, "bad", message)


def test_the_readme_example_message():
    text = "version: v1\nsegments:\n" + "\n" * 8 + "  - name: x\n    when: orders_7d > 0 or count_purchse_24h > 0\n"
    assert str(rejected(text)) == (
        "defs.yaml:12:28: segment 'x': unknown feature 'count_purchse_24h' (did you mean 'count_purchase_24h'?)"
    )


def test_an_unknown_name_far_from_any_feature_gets_no_suggestion():
    err = rejected(with_bad("zzzz > 0"))
    assert_names(err, 6, 11, "bad", "unknown feature 'zzzz'")
    assert "did you mean" not in str(err)


def test_a_quoted_condition_names_the_line_and_segment():
    err = rejected(with_bad('"count_purchse_24h > 0"'))
    assert str(err).startswith("defs.yaml:6") and "segment 'bad': unknown feature 'count_purchse_24h'" in str(err)


def test_an_error_in_a_literal_block_condition_names_its_own_line():
    text = "version: v1\nsegments:\n  - name: s\n    when: |\n      cart_items > 0 and\n      count_purchse_24h > 0\n"
    err = rejected(text)
    assert (err.line, err.segment) == (6, "s")
    assert "unknown feature 'count_purchse_24h'" in str(err)


def test_an_error_in_a_folded_block_condition_names_its_own_line():
    text = "version: v1\nsegments:\n  - name: s\n    when: >\n      cart_items > 0 and\n      count_purchse_24h > 0\n"
    err = rejected(text)
    assert (err.line, err.segment) == (6, "s"), str(err)


def test_an_error_on_the_second_line_of_a_plain_multi_line_condition_names_that_line():
    text = "version: v1\nsegments:\n  - name: s\n    when: cart_items > 0 and\n      count_purchse_24h > 0\n"
    err = rejected(text)
    # the unknown name is on line 5, at column 7; line 4 column 30 is past the end of line 4
    assert (err.line, err.segment) == (5, "s"), str(err)
    assert err.column in (None, 7), str(err)


CYCLE = "version: v1\nsegments:\n  - name: a\n    when: segment.b\n  - name: b\n    when: segment.a\n"


def test_a_two_segment_cycle_is_refused_showing_it():
    assert_names(rejected(CYCLE), 3, None, "a", "segment references form a cycle: a -> b -> a")


def test_a_self_reference_is_a_cycle():
    text = "version: v1\nsegments:\n  - name: a\n    when: segment.a and cart_items > 0\n"
    assert_names(rejected(text), 3, None, "a", "segment references form a cycle: a -> a")


def test_a_longer_cycle_and_one_through_an_exit_condition():
    three = (
        "version: v1\nsegments:\n  - name: ok\n    when: 'true'\n  - name: a\n    when: segment.b\n"
        "  - name: b\n    when: segment.c\n  - name: c\n    when: not segment.a\n"
    )
    assert_names(rejected(three), 5, None, "a", "segment references form a cycle: a -> b -> c -> a")
    via_exit = (
        "version: v1\nsegments:\n  - name: a\n    enter: cart_items > 0\n    exit: not segment.b\n"
        "  - name: b\n    when: segment.a\n"
    )
    assert_names(rejected(via_exit), 3, None, "a", "segment references form a cycle: a -> b -> a")


def test_a_cycle_through_an_exclusive_group_is_refused():
    text = (
        "version: v1\nsegments:\n  - name: a\n    when: segment.b\n  - name: x\n    when: cart_items > 0\n"
        "  - name: b\n    when: segment.x\nexclusive_groups:\n  - name: g\n    segments: [a, x]\n"
    )
    assert_names(rejected(text), 3, None, "a", "segment references form a cycle: group g -> b -> group g")


def test_a_reference_into_the_segments_own_exclusive_group_is_refused():
    text = (
        "version: v1\nsegments:\n  - name: x\n    when: cart_items > 0\n  - name: y\n    when: not segment.x\n"
        "exclusive_groups:\n  - name: g\n    segments: [x, y]\n"
    )
    assert_names(rejected(text), 5, None, "y", "refers to 'x', a member of its own exclusive group 'g'")


def test_references_without_a_cycle_are_accepted_in_any_order():
    text = (
        "version: v1\nsegments:\n  - name: c\n    when: segment.b and not segment.a\n  - name: b\n"
        "    when: segment.a\n  - name: a\n    when: cart_items > 0\n"
    )
    assert [u.name for u in parse(text).units] == ["a", "b", "c"]


def seg_file(*lines: str) -> str:
    """Segment `s` starts on line 3; its fields are on lines 4, 5, ..."""
    return "version: v1\nsegments:\n  - name: s\n" + "".join(f"    {line}\n" for line in lines)


@pytest.mark.parametrize("dwell", ["1 day", "10", "1.5h", "-1h", "10y", "[1h]", "''", "1H"])
def test_a_bad_min_dwell_is_refused(dwell):
    err = rejected(seg_file("when: cart_items > 0", f"min_dwell: {dwell}"))
    assert_names(err, 5, None, "s", "min_dwell must be a duration such as 30s, 10m, 1h or 7d")


def test_a_zero_min_dwell_is_refused():
    err = rejected(seg_file("when: cart_items > 0", "min_dwell: 0s"))
    assert_names(err, 5, None, "s", "min_dwell must be positive")


HUNDRED_YEARS_MS = 100 * 365 * 86_400_000


@pytest.mark.parametrize("dwell", [f"{HUNDRED_YEARS_MS + 1}ms", "36501d", "1" + "0" * 45 + "w", "9" * 5000 + "ms"])
def test_a_min_dwell_beyond_100_years_is_refused_like_a_duration_threshold(dwell):
    # 1e45 weeks is 6e53 ms; 5,000 digits are more than int() reads.
    err = rejected(seg_file("when: cart_items > 0", f"min_dwell: {dwell}"))
    assert_names(err, 5, None, "s", f"min_dwell must be at most 100 years ({HUNDRED_YEARS_MS} ms)")


def test_a_min_dwell_of_exactly_100_years_is_accepted_leading_zeros_or_not():
    for dwell in ("36500d", f"{HUNDRED_YEARS_MS}ms", "0" * 5000 + "36500d"):
        assert parse(seg_file("when: cart_items > 0", f"min_dwell: {dwell}")).segments["s"].min_dwell_ms == (
            HUNDRED_YEARS_MS
        )


def test_a_rescore_every_beyond_100_years_is_refused():
    text = "version: v1\nrescore_every: {}\nsegments:\n  - name: s\n    when: score.churn_risk > 0.5\n"
    assert parse(text.format("36500d"), MODELS).rescore_every_ms == HUNDRED_YEARS_MS
    err = rejected(text.format("1" + "0" * 45 + "w"), MODELS)
    assert_names(err, 2, None, None, f"rescore_every must be at most 100 years ({HUNDRED_YEARS_MS} ms)")


@pytest.mark.parametrize(
    "condition, column",
    [
        ("ms_since_last_event < 36501d", 31),  # the comparison's column
        ("ms_since_last_event < " + "1" + "0" * 48, 31),
        ("absent(purchase, " + "1" + "0" * 45 + "w)", 11),
    ],
)
def test_a_duration_in_a_condition_beyond_100_years_is_refused(condition, column):
    err = rejected(seg_file(f"when: {condition}"))
    assert_names(err, 4, column, "s", "is beyond 100 years")


@pytest.mark.parametrize("name", ["Cart-Holder", "1abc", "_x", "a" * 65, "cart holder", "café"])
def test_a_bad_segment_name_is_refused(name):
    text = f"version: v1\nsegments:\n  - name: {name}\n    when: cart_items > 0\n"
    assert_names(
        rejected(text), 3, None, name, "a segment name is 1-64 lowercase letters, digits and _, starting with a letter"
    )


def test_a_64_character_name_is_accepted_and_a_name_must_be_text():
    assert parse(f"version: v1\nsegments:\n  - name: {'a' * 64}\n    when: 'true'\n").names == ("a" * 64,)
    err = rejected("version: v1\nsegments:\n  - name: 5\n    when: 'true'\n")
    assert_names(err, 3, None, None, "name must be text")


def test_a_duplicate_segment_name_is_refused_pointing_at_the_first():
    text = "version: v1\nsegments:\n  - name: s\n    when: cart_items > 0\n  - name: s\n    when: cart_items > 1\n"
    assert_names(rejected(text), 5, None, "s", "defined twice (first on line 3)")


def test_an_unknown_top_level_key_is_refused():
    err = rejected("version: v1\nsegmnts:\n  - name: s\n    when: 'true'\n")
    assert_names(err, 2, None, None, "unknown key 'segmnts' in the definitions file (allowed: ")
    assert "segments" in str(err).split("allowed:")[1] and "version" in str(err).split("allowed:")[1]


def test_an_unknown_key_in_a_segment_is_refused_naming_the_segment():
    err = rejected(seg_file("whn: cart_items > 0"))
    assert_names(err, 4, None, "s", "unknown key 'whn' in a segment")


def test_a_key_given_twice_is_refused():
    err = rejected(seg_file("when: cart_items > 0", "when: cart_items > 1"))
    assert err.line == 5 and "'when' given twice" in str(err)


def test_when_and_enter_together_are_refused():
    err = rejected(seg_file("when: cart_items > 0", "enter: cart_items > 1"))
    assert_names(err, 3, None, "s", "give either `when` or `enter` (with an optional `exit`)")


def test_exit_without_enter_is_refused():
    err = rejected(seg_file("when: cart_items > 0", "exit: cart_items < 1"))
    assert_names(err, 5, None, "s", "`exit` goes with `enter`, not with `when`")
    assert_names(rejected(seg_file("exit: cart_items < 1")), 3, None, "s", "give either `when` or `enter`")


def test_a_segment_without_a_condition_and_an_empty_segment_list_are_refused():
    assert_names(rejected(seg_file("description: nothing")), 3, None, "s", "give either `when` or `enter`")
    assert_names(rejected("version: v1\nsegments: []\n"), 2, None, None, "segments must not be empty")
    assert "segments must be a list" in str(rejected("version: v1\nsegments: {a: 1}\n"))
    assert "segments must be a list" in str(rejected("version: v1\nsegments:\n"))
    assert_names(rejected("version: v1\nsegments:\n  - when: 'true'\n"), 3, None, None, "a segment needs name")


def test_a_missing_version_is_refused():
    assert_names(
        rejected("segments:\n  - name: s\n    when: 'true'\n"), 1, None, None, "the definitions file needs version"
    )


@pytest.mark.parametrize("version", ["has space", "[v1]", "''", "x" * 65, "-v1", "~", "", "null", "Null"])
def test_a_bad_version_is_refused(version):
    err = rejected(f"version: {version}\nsegments:\n  - name: s\n    when: 'true'\n")
    assert_names(err, 1, None, None, "version must be 1-64 letters, digits or . _ : + -")


def test_good_versions_are_accepted_as_written():
    for version in ("shop-3", "2026-11-23.1", "a:b+c_d", "x" * 64):
        assert parse(f"version: {version}\nsegments:\n  - name: s\n    when: 'true'\n").version == version


def test_yaml_anchors_and_aliases_are_refused():
    err = rejected("version: &v v1\nsegments:\n  - name: s\n    when: 'true'\n")
    assert_names(err, 1, None, None, "YAML anchors and aliases are not allowed")
    text = "version: v1\nsegments:\n  - &seg {name: a, when: 'true'}\n  - *seg\n"
    assert rejected(text).line == 3


def test_a_yaml_anchor_inside_a_segment_is_refused_naming_the_segment():
    text = "version: v1\nsegments:\n  - name: a\n    when: &c cart_items > 0\n  - name: b\n    when: *c\n"
    assert_names(rejected(text), 4, None, "a", "YAML anchors and aliases are not allowed")


@pytest.mark.parametrize(
    "tagged, tag",
    [
        ('!!python/object/apply:os.system ["echo pwned"]', "tag:yaml.org,2002:python/object/apply:os.system"),
        ("!!python/name:os.system", "tag:yaml.org,2002:python/name:os.system"),
        ('!!python/object/new:subprocess.Popen [["true"]]', "tag:yaml.org,2002:python/object/new:subprocess.Popen"),
        ("!!binary Y2FydF9pdGVtcyA+IDA=", "tag:yaml.org,2002:binary"),
        ("!custom cart_items > 0", "!custom"),
        ("!!str cart_items > 0", None),  # the core schema's own tags are fine
    ],
)
def test_yaml_tags_on_a_condition_are_refused_naming_the_segment(tagged, tag):
    if tag is None:
        assert parse(with_bad(tagged)).segments["bad"].enter.text == "cart_items > 0"
        return
    assert_names(rejected(with_bad(tagged)), 6, None, "bad", f"YAML tag {tag!r} is not allowed")


def test_yaml_tags_elsewhere_are_refused():
    err = rejected("!!python/object:__main__.Boom\nversion: v1\nsegments: []\n")
    assert "YAML tag 'tag:yaml.org,2002:python/object:__main__.Boom' is not allowed" in str(err)
    err = rejected("version: !!python/object/apply:os.getcwd []\nsegments:\n  - name: s\n    when: 'true'\n")
    assert_names(err, 1, None, None, "YAML tag 'tag:yaml.org,2002:python/object/apply:os.getcwd' is not allowed")
    err = rejected(seg_file("when: 'true'", "description: !!set {a, b}"))
    assert_names(err, 5, None, "s", "YAML tag 'tag:yaml.org,2002:set' is not allowed")
    # A date is a YAML timestamp; as a version it is taken as written.
    assert parse("version: 2026-11-23\nsegments:\n  - name: s\n    when: 'true'\n").version == "2026-11-23"


def test_non_utf8_bytes_are_refused_naming_the_line():
    raw = b"version: v1\nsegments:\n  - name: s\n    when: cart_items > 0 \xff\n"
    err = rejected(raw)
    assert str(err).startswith("defs.yaml") and "not UTF-8" in str(err)
    assert err.line == 4, str(err)


def test_a_file_of_exactly_1_mb_is_read_and_one_byte_more_is_refused():
    head = "version: v1\nsegments:\n  - name: s\n    when: 'true'\n#"
    exact = head + "x" * (1_000_000 - len(head) - 1) + "\n"
    assert len(exact.encode()) == 1_000_000
    assert parse(exact).names == ("s",)
    err = rejected(exact + "\n")
    assert str(err) == "defs.yaml: larger than 1000000 bytes"


def most_a_file_holds(segments: int = 1000, padding: str = "") -> str:
    """`segments` segments with every field, in exclusive groups of two, with a description."""
    lines = ["version: v1", "description: every field of every segment", "rescore_every: 1h", "segments:"]
    for i in range(segments):
        lines += [
            f"  - name: s{i}",
            f"    description: segment {i}",
            f"    enter: score.churn_risk > 0.5{padding}",
            "    exit: score.churn_risk < 0.4",
            "    min_dwell: 1h",
        ]
    lines.append("exclusive_groups:")
    for i in range(0, segments, 2):
        lines += [f"  - name: g{i}", f"    description: group {i}", f"    segments: [s{i}, s{i + 1}]"]
    return "\n".join(lines) + "\n"


def test_the_most_a_file_may_hold_loads_every_field_of_1000_segments_in_groups():
    definitions = parse(most_a_file_holds(), MODELS)
    assert (len(definitions.segments), len(definitions.groups)) == (1000, 500)


@pytest.mark.parametrize(
    "text, line",
    [
        ("version: v1\nsegments: [" + "1," * 499_980 + "1]\n", 2),  # took 16 s to say "more than 1000 segments"
        ("version: v1\nsegments:\n" + "- 1\n" * 249_994, 19_998),
        ("version: v1\nsegments:\n  - {name: a, when: 'true'" + ", x: 1" * 166_650 + "}\n", 3),
        ("a: 1\n" * 200_000, 10_000),
    ],
)
def test_a_file_of_more_than_20000_yaml_nodes_is_refused_at_the_20001st_before_it_is_composed(text, line, monkeypatch):
    assert len(text.encode()) <= 1_000_000

    def composed(self):  # composing ~30 us a node is what took 16 s: it must not start
        raise AssertionError("the nodes were composed before the count refused them")

    monkeypatch.setattr(EventComposer, "get_single_node", composed)
    assert_names(rejected(text), line, None, None, "more than 20000 YAML nodes")


def test_the_conditions_of_a_file_together_may_be_200000_characters_and_no_more():
    padding = " or cart_items > 0" * 7 + " or cart_items > 1000000000000"
    assert len("score.churn_risk > 0.5" + padding) + len("score.churn_risk < 0.4") == 200  # enter and exit
    assert len(parse(most_a_file_holds(1000, padding), MODELS).segments) == 1000
    # 201 a segment: the enter condition of s995 (on line 5 + 5 * 995 + 2) reaches 995 * 201 + 179
    err = rejected(most_a_file_holds(1000, padding + "0"), MODELS)
    assert_names(err, 4982, None, "s995", "the file's conditions are longer than 200000 characters together")


def test_a_chain_of_1000_segment_references_loads_and_a_cycle_of_1000_is_refused():
    # The order was found by recursion: a chain this long was a RecursionError.
    chain = "version: v1\nsegments:\n" + "".join(f"  - name: s{i}\n    when: segment.s{i + 1}\n" for i in range(999))
    definitions = parse(chain + "  - name: s999\n    when: cart_items > 0\n")
    assert [u.name for u in definitions.units] == [f"s{i}" for i in reversed(range(1000))]
    err = rejected(chain + "  - name: s999\n    when: segment.s0\n")
    assert_names(err, 3, None, "s0", "segment references form a cycle: s0 -> s1 -> s2 -> ")
    assert str(err).endswith("s998 -> s999 -> s0")


def test_a_condition_of_4000_characters_is_accepted_and_longer_is_refused():
    ok = "cart_items > 0" + " or cart_items > 0" * 221 + " or true"
    assert len(ok) == 4000
    assert parse(with_bad(ok)).segments["bad"].enter.text == ok
    assert_names(rejected(with_bad(ok + "x")), 6, None, "bad", "condition longer than 4000 characters")


def test_a_condition_nested_41_deep_is_refused_at_the_41st_level():
    assert parse(with_bad("(" * 40 + "cart_items > 0" + ")" * 40))
    assert_names(
        rejected(with_bad("(" * 41 + "cart_items > 0" + ")" * 41)), 6, 51, "bad", "nested more than 40 levels deep"
    )
    assert_names(
        rejected(with_bad("not " * 41 + "segment.cart_holder")),
        6,
        11 + 4 * 40,
        "bad",
        "nested more than 40 levels deep",
    )


def test_multiple_yaml_documents_are_refused():
    text = "version: v1\nsegments:\n  - name: s\n    when: 'true'\n---\nversion: v2\n"
    assert_names(rejected(text), 5, None, None, "invalid YAML: but found another document")


def test_invalid_yaml_names_the_line():
    text = "version: v1\nsegments:\n  - name: s\n    when: 'true'\n  - name: [t\n"
    err = rejected(text)
    assert str(err).startswith("defs.yaml:") and "invalid YAML" in str(err) and err.line is not None


def test_an_empty_file_and_a_file_that_is_not_a_mapping_are_refused():
    assert str(rejected("")) == "defs.yaml: empty file: expected `version:` and `segments:`"
    assert str(rejected("# only a comment\n")) == "defs.yaml: empty file: expected `version:` and `segments:`"
    assert_names(rejected("- version: v1\n"), 1, None, None, "the definitions file must be a mapping")
    assert_names(rejected("hello\n"), 1, None, None, "the definitions file must be a mapping")


def test_deeply_nested_yaml_is_a_definition_error_not_a_recursion_error():
    # 2 KB of brackets: YAML's composer recurses once per level
    with pytest.raises(DefinitionError):
        parse_definitions("[" * 1000 + "]" * 1000, SOURCE)
    with pytest.raises(DefinitionError):
        parse_definitions(seg_file("when: 'true'", "description: " + "[" * 1000 + "]" * 1000), SOURCE)


GROUPED = "version: v1\nsegments:\n  - name: a\n    when: 'true'\n  - name: b\n    when: 'true'\n"


@pytest.mark.parametrize(
    "groups, line, message",
    [
        ("exclusive_groups:\n  - name: g\n    segments: [a, nope]\n", 9, "group 'g' lists unknown segment 'nope'"),
        ("exclusive_groups:\n  - name: g\n    segments: [a]\n", 9, "group 'g' needs at least two segments"),
        (
            "exclusive_groups:\n  - name: g\n    segments: [a, b]\n  - name: h\n    segments: [b, a]\n",
            11,
            "segment 'b' is in two exclusive groups (g, h)",
        ),
        ("exclusive_groups:\n  - name: G!\n    segments: [a, b]\n", 8, "group name 'G!' must be unique"),
        (
            "exclusive_groups:\n  - name: g\n    segments: [a, b]\n  - name: g\n    segments: [a, b]\n",
            10,
            "group name 'g' must be unique",
        ),
        ("exclusive_groups:\n  - name: g\n    members: [a, b]\n", 9, "unknown key 'members' in an exclusive group"),
        ("exclusive_groups:\n  - name: g\n", 8, "an exclusive group needs segments"),
    ],
)
def test_bad_exclusive_groups_are_refused(groups, line, message):
    err = rejected(GROUPED + groups)
    assert str(err).startswith(f"defs.yaml:{line}: ") and message in str(err), str(err)
