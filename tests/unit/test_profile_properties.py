"""The production profile against a brute-force oracle (tests/unit/profile_oracle.py), after every
step of random arrival-ordered logs, plus small examples worked out by hand from the spec.

The oracle recomputes every feature from the lifetime's raw accepted events; the configs used here
have caps far above what a log can reach, so the spec's "within these caps every feature is exact"
applies and the comparison is exact for ints and near-exact for floats.

Spec readings the oracle takes where the text is not explicit are listed in profile_oracle.py.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.profile_oracle import Advance, features_of, float_keys, oracle_features, replay
from udfs.definitions import parse_definitions
from udfs.events import EVENT_TYPES, UserEvent
from udfs.profile import UserProfile
from udfs.profile_config import DAY_MS, HOUR_MS, MINUTE_MS, SECOND_MS, Horizon, ProfileConfig
from udfs.transitions import SegmentEngine

B = 1_700_006_400_000  # a UTC day boundary, so every bucket width divides it
assert B % DAY_MS == 0
USER = "u1"

LARGE_CAPS = dict(
    max_seen_event_ids=100_000,
    max_tracked_items=100_000,
    max_cart_lines=100_000,
    max_cart_ops_per_line=100_000,
    max_bucket_categories=100_000,
)

# Short horizons, gap, half-lives, dedup window and retention: lapses, session cuts, dedup expiry
# and retention resets all happen within a few dozen steps.
SMALL = ProfileConfig(
    horizons=(Horizon("a", 4 * MINUTE_MS, MINUTE_MS), Horizon("b", HOUR_MS, 10 * MINUTE_MS)),
    session_gap_ms=10 * MINUTE_MS,
    engagement_half_life_ms=20 * MINUTE_MS,
    affinity_half_life_ms=30 * MINUTE_MS,
    dedup_window_ms=30 * MINUTE_MS,
    retention_ms=2 * HOUR_MS,
    tier_basis="engagement_score",
    tier_high_above=20.0,
    tier_medium_above=5.0,
    affinity_top_k=2,
    **LARGE_CAPS,
)
# Default horizons, weights and session gap; retention cut to 40 days so it is crossed sometimes.
DEFAULT_40D = ProfileConfig(retention_ms=40 * DAY_MS, **LARGE_CAPS)
DEFAULT = ProfileConfig(**LARGE_CAPS)

PRODUCTS = ("p1", "p2", "p3", "p4")
# Context as event_from_record leaves it (normalised), but the device as sent (the profile classes it).
CONTEXTS = st.fixed_dictionaries(
    {
        "device": st.sampled_from([None, "mobile", "Desktop", "tablet", "smart-tv", " "]),
        "referrer": st.sampled_from([None, "a.example", "b.example"]),
        "utm_source": st.sampled_from([None, "google", "newsletter"]),
        "utm_medium": st.sampled_from([None, "cpc", "email"]),
        "utm_campaign": st.none() | st.sampled_from(["spring", "summer"]),
        "country": st.sampled_from([None, "FR", "IN"]),
        # A half-hour offset, and zones with summer time (Lord Howe's moves by 30 minutes)
        "timezone": st.sampled_from([None, "Europe/Paris", "Asia/Kolkata", "America/New_York", "Australia/Lord_Howe"]),
    }
)
CATEGORIES = ("c1", "c2", "c3")
SESSIONS = ("s1", "s2", "s3")


def no_segments(config: ProfileConfig):
    """The profile under test alone: a definitions file whose one segment never holds."""
    return parse_definitions("version: t\nsegments:\n  - name: never\n    when: false\n", profile_config=config)


@dataclass(frozen=True)
class Scale:
    fwd_ms: int  # usual forward step
    back_ms: int  # largest jump back (kept below retention: see profile_oracle docstring)
    gap_min_ms: int
    gap_max_ms: int
    specials: tuple[int, ...]  # exact deltas that sit on boundaries
    max_steps: int = 40


SMALL_SCALE = Scale(
    fwd_ms=3 * MINUTE_MS,
    back_ms=100 * MINUTE_MS,
    gap_min_ms=10 * MINUTE_MS,
    gap_max_ms=3 * HOUR_MS,
    specials=(
        MINUTE_MS,
        4 * MINUTE_MS,
        10 * MINUTE_MS,
        10 * MINUTE_MS + 1,
        30 * MINUTE_MS,
        30 * MINUTE_MS - 1,
        HOUR_MS,
        2 * HOUR_MS,
        2 * HOUR_MS - 1,
        20 * MINUTE_MS,
    ),
)
DEFAULT_SCALE = Scale(
    fwd_ms=20 * MINUTE_MS,
    back_ms=2 * HOUR_MS,
    gap_min_ms=HOUR_MS,
    gap_max_ms=12 * DAY_MS,
    specials=(
        5 * MINUTE_MS,
        10 * MINUTE_MS,
        30 * MINUTE_MS,
        30 * MINUTE_MS + 1,
        HOUR_MS,
        6 * HOUR_MS,
        DAY_MS,
        DAY_MS + 1,
        7 * DAY_MS,
        7 * DAY_MS - 1,
        30 * DAY_MS,
        40 * DAY_MS,
        40 * DAY_MS - 1,
    ),
)


def _draw_delta(draw, scale: Scale, allow_back: bool) -> int:
    modes = ["fwd"] * 6 + ["fwd_aligned"] * 2 + ["gap", "special", "zero"] + (["back"] * 3 if allow_back else [])
    mode = draw(st.sampled_from(modes))
    if mode == "fwd":
        return draw(st.integers(0, scale.fwd_ms))
    if mode == "fwd_aligned":
        return draw(st.integers(0, scale.fwd_ms // MINUTE_MS)) * MINUTE_MS
    if mode == "gap":
        return draw(st.integers(scale.gap_min_ms, scale.gap_max_ms))
    if mode == "special":
        d = draw(st.sampled_from(scale.specials))
        if allow_back and draw(st.booleans()) and d <= scale.back_ms:
            return -d
        return d
    if mode == "zero":
        return 0
    return -draw(st.integers(1, scale.back_ms))


def _anchored_time(draw, sent: list[UserEvent], config: ProfileConfig) -> int:
    """An instant on (or 1 ms either side of) a boundary set by an earlier event: where it lapses
    from a horizon, leaves the dedup window, the session gap, the week, retention."""
    anchor = draw(st.sampled_from(sent)).timestamp
    offsets = [config.dedup_window_ms, config.session_gap_ms, 7 * DAY_MS, config.retention_ms]
    offsets += [h.lapses_at(anchor) - anchor for h in config.horizons]
    return anchor + draw(st.sampled_from(offsets)) + draw(st.sampled_from((-1, 0, 0, 1)))


@st.composite
def event_logs(draw, scale: Scale, config: ProfileConfig):
    """Arrival-ordered steps: new events, resends of earlier ones, and clock advances (timers)."""
    n = draw(st.integers(1, scale.max_steps))
    # The generator's clock bounds the real clock from above (duplicates do not move the real one),
    # so advances to >= gen_clock are always >= the clock, and jumps back stay within back_ms of it.
    gen_clock = B + draw(st.integers(0, 2 * MINUTE_MS))
    sent: list[UserEvent] = []
    steps: list = []
    for i in range(n):
        kinds = ["new"] * 6 + ["resend"] * 2 + ["advance"] * 2 + ["anchored_advance", "anchored_new", "window_probe"]
        kind = "new" if i == 0 else draw(st.sampled_from(kinds))
        if kind == "advance":
            gen_clock += max(0, _draw_delta(draw, scale, allow_back=False))
            steps.append(Advance(gen_clock))
            continue
        if kind == "anchored_advance":
            gen_clock = max(gen_clock, _anchored_time(draw, sent, config))
            steps.append(Advance(gen_clock))
            continue
        if kind == "window_probe":
            # The clock right at an earlier event's dedup-window edge, then that event resent.
            original = draw(st.sampled_from(sent))
            edge = original.timestamp + config.dedup_window_ms + draw(st.sampled_from((-1, 0, 1)))
            gen_clock = max(gen_clock, edge)
            steps.append(Advance(gen_clock))
            t = draw(st.sampled_from((original.timestamp, gen_clock)))
            event = dataclasses.replace(original, timestamp=max(t, gen_clock - scale.back_ms))
        elif kind == "resend":
            original = draw(st.sampled_from(sent))
            if draw(st.booleans()):
                t = original.timestamp
            else:
                t = gen_clock + _draw_delta(draw, scale, allow_back=True)
            # Never further back than back_ms behind the clock (keeps late events out of the
            # "already expired on arrival" corner, see profile_oracle docstring).
            t = max(t, gen_clock - scale.back_ms)
            event = dataclasses.replace(original, timestamp=t)
        else:
            if kind == "anchored_new":
                t = max(_anchored_time(draw, sent, config), gen_clock - scale.back_ms)
            else:
                t = gen_clock + _draw_delta(draw, scale, allow_back=True)
            event_type = draw(st.sampled_from(EVENT_TYPES))
            if event_type in ("add_to_cart", "remove_from_cart"):
                product = draw(st.sampled_from(PRODUCTS))
            else:
                product = draw(st.none() | st.sampled_from(PRODUCTS))
            price = draw(st.none() | st.integers(0, 50_000).map(lambda c: c / 100))
            event = UserEvent(
                event_id=f"e{i}",
                user_id=USER,
                event_type=event_type,
                timestamp=t,
                session_id=draw(st.none() | st.none() | st.sampled_from(SESSIONS)),
                product_id=product,
                category=draw(st.none() | st.sampled_from(CATEGORIES)),
                price=price,
                quantity=draw(st.none() | st.integers(1, 3)),
                **draw(st.just({}) | CONTEXTS),
            )
        sent.append(event)
        gen_clock = max(gen_clock, event.timestamp)
        steps.append(event)
    return steps


# ---------------------------------------------------------------- comparison


def _approx(a, b) -> bool:
    return a == pytest.approx(b, rel=1e-9, abs=1e-6)


def _near_tie(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-9 * max(abs(a), abs(b)) + 1e-12


def _top_categories_problems(got: list, want: list, affinity: dict[str, float], k: int) -> list[str]:
    if got == want:
        return []
    problems = []
    if not isinstance(got, list) or len(got) != len(want) or len(set(got)) != len(got):
        return [f"top_categories: got {got!r}, want {want!r}"]
    if not set(got) <= set(affinity):
        return [f"top_categories: {got!r} names categories without affinity ({sorted(affinity)})"]

    def strictly_before(x: str, y: str) -> bool:  # x must come before y under the oracle's values
        vx, vy = affinity[x], affinity[y]
        if _near_tie(vx, vy):
            return False  # near ties may go either way
        return vx > vy

    for i, x in enumerate(got):
        for y in got[i + 1 :]:
            if strictly_before(y, x):
                problems.append(f"top_categories: {y} ({affinity[y]!r}) listed after {x} ({affinity[x]!r})")
    for c in set(affinity) - set(got):
        if got and strictly_before(c, got[-1]):
            last = got[-1]
            problems.append(f"top_categories: {c} ({affinity[c]!r}) left out but beats {last} ({affinity[last]!r})")
    if problems:
        problems.append(f"top_categories: got {got!r}, oracle {want!r}, affinity {affinity!r}")
    return problems


def feature_problems(got: dict, want: dict, config: ProfileConfig) -> list[str]:
    problems: list[str] = []
    if set(got) != set(want):
        problems.append(f"keys: missing {sorted(set(want) - set(got))}, unexpected {sorted(set(got) - set(want))}")
    floats = float_keys(config)
    for key in sorted(set(got) & set(want)):
        g, w = got[key], want[key]
        if key in floats:
            ok = (g is None) if w is None else (g is not None and _approx(g, w))
        elif key == "cart":
            ok = (
                isinstance(g, dict)
                and set(g) == set(w)
                and all(tuple(g[p])[0] == w[p][0] and _approx(tuple(g[p])[1], w[p][1]) for p in w)
            )
        elif key == "category_affinity":
            ok = isinstance(g, dict) and set(g) == set(w) and all(_approx(g[c], w[c]) for c in w)
        elif key == "top_categories":
            problems += _top_categories_problems(g, w, want["category_affinity"], config.affinity_top_k)
            continue
        else:
            ok = (g is None) == (w is None) and g == w
        if not ok:
            problems.append(f"{key}: got {g!r}, want {w!r}")
    return problems


def _describe(steps) -> str:
    lines = []
    for i, s in enumerate(steps):
        if isinstance(s, Advance):
            lines.append(f"  [{i}] advance to B{s.time_ms - B:+d}")
        else:
            lines.append(
                f"  [{i}] {s.event_id} {s.event_type} t=B{s.timestamp - B:+d} sid={s.session_id} "
                f"prod={s.product_id} cat={s.category} price={s.price} qty={s.quantity}"
            )
    return "\n".join(lines)


def run_and_compare(steps, config: ProfileConfig) -> None:
    engine = SegmentEngine(no_segments(config))
    profile = UserProfile()
    for i, step in enumerate(steps):
        if isinstance(step, Advance):
            engine.advance_to(USER, profile, step.time_ms)
        else:
            engine.on_event(USER, profile, step)
        r = replay(steps[: i + 1], config)
        problems = []
        if profile.clock_ms != r.clock_ms:
            problems.append(f"clock: got B{profile.clock_ms - B:+d}, want B{r.clock_ms - B:+d}")
        else:
            want = features_of(r.accepted, config, r.clock_ms)
            got = engine.features(profile, profile.clock_ms)
            problems += feature_problems(got, want, config)
        if problems:
            pytest.fail(
                f"after step {i} (clock B{r.clock_ms - B:+d}; oracle: {len(r.accepted)} accepted in the "
                f"lifetime, {r.duplicates} duplicates, {r.resets} resets):\n"
                + "\n".join(problems)
                + "\nsteps (B = day boundary):\n"
                + _describe(steps[: i + 1])
            )


PROPERTY_SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY_SETTINGS
@given(event_logs(SMALL_SCALE, SMALL))
def test_profile_matches_oracle_small_config(steps):
    run_and_compare(steps, SMALL)


@PROPERTY_SETTINGS
@given(event_logs(DEFAULT_SCALE, DEFAULT_40D))
def test_profile_matches_oracle_default_horizons_40d_retention(steps):
    run_and_compare(steps, DEFAULT_40D)


# ---------------------------------------------------------------- hand-computed examples
# Each expected value below is worked out from the spec text; both the oracle and production are
# checked against it (so these also validate the oracle).


def ev(event_id: str, event_type: str, t: int, **kw) -> UserEvent:
    return UserEvent(event_id=event_id, user_id=USER, event_type=event_type, timestamp=t, **kw)


class Both:
    """Feeds the same steps to production and to the oracle; `check` asserts hand values on both."""

    def __init__(self, config: ProfileConfig = DEFAULT):
        self.config = config
        self.engine = SegmentEngine(no_segments(config))
        self.profile = UserProfile()
        self.steps: list = []

    def send(self, *events: UserEvent) -> Both:
        for e in events:
            self.engine.on_event(USER, self.profile, e)
            self.steps.append(e)
        return self

    def advance(self, t: int) -> Both:
        self.engine.advance_to(USER, self.profile, t)
        self.steps.append(Advance(t))
        return self

    def check(self, clock: int | None = None, **expected) -> Both:
        r = replay(self.steps, self.config)
        if clock is not None:
            assert r.clock_ms == clock, "oracle clock"
            assert self.profile.clock_ms == clock, "production clock"
        for who, feats in (
            ("oracle", oracle_features(self.steps, self.config)),
            ("production", self.engine.features(self.profile, self.profile.clock_ms)),
        ):
            for key, value in expected.items():
                got = feats[key]
                if isinstance(value, float):
                    assert got == pytest.approx(value, rel=1e-12, abs=1e-12), f"{who}: {key}"
                elif key == "cart":
                    assert {p: (q, pytest.approx(u)) for p, (q, u) in value.items()} == {
                        p: tuple(line) for p, line in got.items()
                    }, f"{who}: cart"
                else:
                    assert got == value, f"{who}: {key} = {got!r}, expected {value!r}"
        return self


def test_bucket_coverage_at_the_boundary():
    # 10m horizon: 1-minute buckets; 1h horizon: 5-minute buckets. Event at B+2m30s sits in the
    # 10m bucket [B+2m, B+3m) and in the 1h bucket [B, B+5m).
    p = Both().send(ev("e1", "page_view", B + 2 * MINUTE_MS + 30 * SECOND_MS))
    # T = B+11:59.999: bucket(T) = B+11m; B+2m > B+1m -> counted; 1h: B > B+10m-1h.
    p.advance(B + 12 * MINUTE_MS - 1).check(events_10m=1, count_page_view_10m=1, events_1h=1)
    # T = B+12m: B+2m > B+2m is false -> lapsed, 9.5 min after the event.
    p.advance(B + 12 * MINUTE_MS).check(events_10m=0, count_page_view_10m=0, events_1h=1, events_24h=1)
    # 1h: at B+59:59.999 bucket(T) = B+55m, B > B-5m; at B+60m, B > B is false (57.5 min old).
    p.advance(B + HOUR_MS - 1).check(events_1h=1)
    p.advance(B + HOUR_MS).check(
        events_1h=0,
        count_page_view_1h=0,
        events_24h=1,
        events_30d=1,
        ms_since_last_event=57 * MINUTE_MS + 30 * SECOND_MS,
    )
    # Out-of-order events update their own bucket: at T = B+60m, B+55m is covered by 10m
    # (B+55m > B+50m) and 1h (B+55m > B); B+50m only by 1h (B+50m > B+50m is false).
    p.send(ev("e2", "page_view", B + 55 * MINUTE_MS)).check(
        clock=B + HOUR_MS, events_10m=1, events_1h=1, ms_since_last_event=5 * MINUTE_MS
    )
    p.send(ev("e3", "search", B + 50 * MINUTE_MS)).check(
        clock=B + HOUR_MS,
        events_10m=1,
        events_1h=2,
        count_search_10m=0,
        count_search_1h=1,
        ms_since_last_search=10 * MINUTE_MS,
    )


def test_dedup_window():
    # Spec: a duplicate when the accepted copy's time t_j > latest accepted event time - window.
    p = Both(ProfileConfig(dedup_window_ms=DAY_MS)).send(ev("e1", "page_view", B)).check(clock=B, count_page_view_30d=1)
    # A resend while the copy (t=B) is within 24h of the latest event (B): dropped, clock unmoved.
    p.send(ev("e1", "page_view", B + HOUR_MS)).check(clock=B, count_page_view_30d=1, ms_since_last_event=0)
    # Another event makes B+24h-1 the latest: B > B-1, the resend is still a duplicate.
    p.send(ev("e2", "page_view", B + DAY_MS - 1)).send(ev("e1", "page_view", B + DAY_MS - 1)).check(
        count_page_view_30d=2
    )
    # The latest at B+24h: B > B is false, the resend is accepted as a new event.
    p.send(ev("e3", "page_view", B + DAY_MS)).send(ev("e1", "page_view", B + DAY_MS)).check(
        count_page_view_30d=4, count_page_view_24h=3
    )
    # Now its copy at B+24h is within the window: a further resend is a duplicate again.
    p.send(ev("e1", "page_view", B + DAY_MS + 5)).check(count_page_view_30d=4)


def test_timers_do_not_expire_the_dedup_memory():
    # Timers move the clock as the watermark allows; the window counts back from the latest event,
    # so a resend is a duplicate however far the timers went.
    p = Both(ProfileConfig(dedup_window_ms=HOUR_MS)).send(ev("e1", "purchase", B, price=5.0))
    p.advance(B + 10 * DAY_MS).send(ev("e1", "purchase", B, price=5.0)).check(
        clock=B + 10 * DAY_MS, lifetime_orders=1, lifetime_spend=5.0
    )


def test_derived_sessions_joined_by_a_late_event():
    p = Both()
    for i, minute in enumerate((0, 10, 50, 55)):
        p.send(ev(f"a{i}", "page_view", B + minute * MINUTE_MS))
    # Runs [B, B+10m] and [B+50m, B+55m] (40 min apart > 30 min gap).
    p.check(
        clock=B + 55 * MINUTE_MS,
        sessions_24h=2,
        sessions_per_week=2,
        in_session=1,
        current_session_start_ms=B + 50 * MINUTE_MS,
        current_session_events=2,
        current_session_duration_ms=5 * MINUTE_MS,
    )
    # A late event at B+30m: gaps 10, 20, 20, 5 minutes -> one session.
    p.send(ev("late", "page_view", B + 30 * MINUTE_MS))
    p.check(
        clock=B + 55 * MINUTE_MS,
        sessions_24h=1,
        sessions_1h=1,
        sessions_per_week=1,
        in_session=1,
        current_session_start_ms=B,
        current_session_events=5,
        current_session_duration_ms=55 * MINUTE_MS,
    )
    # Exactly session_gap apart stays in the session ("more than session_gap apart" cuts).
    p.send(ev("a4", "page_view", B + 85 * MINUTE_MS))
    p.check(sessions_per_week=1, current_session_events=6, current_session_duration_ms=85 * MINUTE_MS)
    # session_id events never join derived runs. s1: B+100m .. B+115m+1.
    p.send(ev("x0", "page_view", B + 100 * MINUTE_MS, session_id="s1"))
    p.check(sessions_per_week=2, current_session_start_ms=B + 100 * MINUTE_MS, current_session_events=1)
    # One ms more than the gap: a new derived run; its last event ties with s1's last -> s1 wins.
    t = B + 115 * MINUTE_MS + 1
    p.send(ev("a5", "page_view", t), ev("x1", "page_view", t, session_id="s1"))
    p.check(
        clock=t,
        sessions_per_week=3,
        sessions_24h=3,
        in_session=1,
        current_session_start_ms=B + 100 * MINUTE_MS,
        current_session_events=2,
        current_session_duration_ms=15 * MINUTE_MS + 1,
    )
    # in_session ends when T - last >= gap.
    p.advance(t + 30 * MINUTE_MS - 1).check(in_session=1, current_session_events=2)
    p.advance(t + 30 * MINUTE_MS).check(
        in_session=0,
        current_session_start_ms=None,
        current_session_events=None,
        current_session_duration_ms=None,
        sessions_per_week=3,
    )


def test_cart_fold_with_an_out_of_order_purchase():
    p = Both()
    p.send(ev("c1", "add_to_cart", B + MINUTE_MS, product_id="p1", quantity=2, price=10.0))
    p.send(ev("c2", "add_to_cart", B + 3 * MINUTE_MS, product_id="p2", price=5.5))  # quantity missing: 1
    p.check(cart={"p1": (2, 10.0), "p2": (1, 5.5)}, cart_lines=2, cart_items=3, cart_value=25.5)
    p.send(ev("c3", "checkout_start", B + 90 * SECOND_MS)).check(checkout_pending=1)  # no purchase yet
    # The purchase at B+2m arrives late: fold order is add p1, purchase (empties), add p2.
    p.send(ev("c4", "purchase", B + 2 * MINUTE_MS, price=20.0))
    p.check(
        clock=B + 3 * MINUTE_MS,
        cart={"p2": (1, 5.5)},
        cart_lines=1,
        cart_items=1,
        cart_value=5.5,
        checkout_pending=0,
        lifetime_orders=1,
        lifetime_spend=20.0,
        lifetime_aov=20.0,
        ms_since_cart_activity=0,
        ms_since_cart_change=0,
        ms_since_last_purchase=MINUTE_MS,
    )
    p.send(ev("c5", "remove_from_cart", B + 4 * MINUTE_MS, product_id="p1", quantity=1))  # not in cart
    p.check(cart={"p2": (1, 5.5)}, cart_value=5.5)
    p.send(ev("c6", "add_to_cart", B + 5 * MINUTE_MS, product_id="p2", quantity=2))  # no price: keeps 5.5
    p.check(cart={"p2": (3, 5.5)}, cart_items=3, cart_value=16.5)
    p.send(ev("c7", "remove_from_cart", B + 6 * MINUTE_MS, product_id="p2", quantity=2))
    p.check(cart={"p2": (1, 5.5)}, cart_value=5.5)
    p.send(ev("c8", "remove_from_cart", B + 7 * MINUTE_MS, product_id="p2"))  # no quantity: whole line
    p.check(cart={}, cart_lines=0, cart_items=0, cart_value=0.0)
    # Same event time: arrival order decides. add p3, then purchase -> empty; then add p4 -> p4.
    p.send(ev("c9", "add_to_cart", B + 8 * MINUTE_MS, product_id="p3", price=3.0))
    p.send(ev("c10", "purchase", B + 8 * MINUTE_MS))  # no price: counts 0
    p.check(
        cart={}, lifetime_orders=2, lifetime_spend=20.0, lifetime_aov=10.0, orders_10m=2, spend_10m=20.0, aov_10m=10.0
    )
    p.send(ev("c11", "add_to_cart", B + 8 * MINUTE_MS, product_id="p4", price=2.0))
    p.check(cart={"p4": (1, 2.0)}, cart_value=2.0, checkout_pending=0)
    # A line created by an add without a price has unit price 0 (p1's 10.0 went with the purchase).
    p.send(ev("c12", "add_to_cart", B + 9 * MINUTE_MS, product_id="p1", quantity=3))
    p.check(cart={"p4": (1, 2.0), "p1": (3, 0.0)}, cart_value=2.0, cart_items=4)


def test_engagement_and_affinity_decay_by_half_at_one_half_life():
    p = Both()  # half-lives 7 d; purchase 20 / 5, product_view 2 / 1, video_play 10 / 1
    p.send(ev("a", "purchase", B, category="c2", price=1.0), ev("b", "product_view", B, category="c1", product_id="p1"))
    p.check(engagement_score=22.0, category_affinity={"c2": 5.0, "c1": 1.0}, top_categories=["c2", "c1"])
    p.advance(B + 7 * DAY_MS).check(engagement_score=11.0, top_categories=["c2", "c1"])
    p.check(category_affinity={"c2": pytest.approx(2.5), "c1": pytest.approx(0.5)})
    p.send(ev("c", "video_play", B + 7 * DAY_MS, category="c1")).check(engagement_score=21.0)
    p.check(category_affinity={"c2": pytest.approx(2.5), "c1": pytest.approx(1.5)})
    p.advance(B + 14 * DAY_MS).check(engagement_score=10.5)  # 22/4 + 10/2
    p.check(category_affinity={"c2": pytest.approx(1.25), "c1": pytest.approx(0.75)}, top_categories=["c2", "c1"])
    # remove_from_cart has engagement weight 0 and no affinity weight: changes neither.
    p.send(ev("d", "remove_from_cart", B + 14 * DAY_MS, product_id="p1", category="c3"))
    p.check(engagement_score=10.5, category_affinity={"c2": pytest.approx(1.25), "c1": pytest.approx(0.75)})
    # A tie in affinity is broken by name.
    p.send(ev("e", "product_view", B + 14 * DAY_MS, category="c0", product_id="p2"))
    p.send(ev("f", "product_view", B + 14 * DAY_MS, category="c9", product_id="p2"))
    p.check(top_categories=["c2", "c0", "c9"])


def test_a_session_id_reused_after_its_session_was_forgotten_starts_a_new_session():
    # Spec: a session whose last event no horizon covers, at least 7 days and session_gap old, is
    # forgotten; an event for it afterwards starts a new session. 31 days apart with the default
    # horizons (the 30d one, day buckets, no longer covers B): a new session.
    p = Both(DEFAULT_40D).send(ev("a", "page_view", B, session_id="s"))
    p.send(ev("b", "page_view", B + 31 * DAY_MS, session_id="s"))
    p.check(
        clock=B + 31 * DAY_MS,
        in_session=1,
        sessions_per_week=1,
        sessions_30d=1,
        events_30d=1,
        current_session_start_ms=B + 31 * DAY_MS,
        current_session_events=1,
        current_session_duration_ms=0,
    )


def test_a_session_id_reused_while_its_session_is_still_visible_continues_it():
    # 6 days apart: the first event is still within 7 days (and the 7d and 30d horizons): one session.
    p = Both(DEFAULT_40D).send(ev("a", "page_view", B, session_id="s"))
    p.send(ev("b", "page_view", B + 6 * DAY_MS, session_id="s"))
    p.check(
        clock=B + 6 * DAY_MS,
        in_session=1,
        sessions_per_week=1,
        sessions_30d=1,
        events_30d=2,
        current_session_start_ms=B,
        current_session_events=2,
        current_session_duration_ms=6 * DAY_MS,
    )


def test_tier_thresholds_on_sessions_per_week():
    p = Both()  # high above 5 sessions a week, medium above 1
    tiers = []
    for i in range(6):
        p.send(ev(f"s{i}", "page_view", B + i * HOUR_MS, session_id=f"k{i}"))
        tiers.append(p.engine.features(p.profile, p.profile.clock_ms)["engagement_tier"])
        p.check(sessions_per_week=i + 1)
    assert tiers == ["low", "medium", "medium", "medium", "medium", "high"]
    p.check(engagement_tier="high")
    # The session whose last event is at B stops counting exactly 7 days later.
    p.advance(B + 7 * DAY_MS - 1).check(sessions_per_week=6, engagement_tier="high")
    p.advance(B + 7 * DAY_MS).check(sessions_per_week=5, engagement_tier="medium")


def test_tier_thresholds_on_engagement_score():
    config = ProfileConfig(tier_basis="engagement_score", tier_high_above=20.0, tier_medium_above=5.0)
    p = Both(config).send(ev("r", "review_read", B)).check(engagement_score=5.0, engagement_tier="low")
    p.send(ev("v", "page_view", B)).check(engagement_score=6.0, engagement_tier="medium")
    q = Both(config).send(ev("p", "purchase", B)).check(engagement_score=20.0, engagement_tier="medium")
    q.send(ev("v", "page_view", B)).check(engagement_score=21.0, engagement_tier="high")


EMPTY = dict(
    ms_since_last_event=None,
    ms_since_last_purchase=None,
    ms_since_cart_activity=None,
    events_30d=0,
    count_purchase_30d=0,
    sessions_30d=0,
    category_views_30d={},
    spend_30d=0.0,
    orders_30d=0,
    aov_30d=None,
    lifetime_spend=0.0,
    lifetime_orders=0,
    lifetime_aov=None,
    cart={},
    cart_quantity={},
    cart_lines=0,
    cart_items=0,
    cart_value=0.0,
    checkout_pending=0,
    sessions_per_week=0,
    in_session=0,
    current_session_start_ms=None,
    current_session_events=None,
    current_session_duration_ms=None,
    engagement_score=0.0,
    engagement_tier="low",
    category_affinity={},
    top_categories=[],
    ms_since_viewed_product={},
)


def test_empty_profile_features():
    engine = SegmentEngine(no_segments(DEFAULT))
    got = engine.features(UserProfile(), B)
    want = features_of([], DEFAULT, B)
    assert feature_problems(got, want, DEFAULT) == []
    for key, value in EMPTY.items():
        assert want[key] == value and got[key] == value, key


def test_retention_reset():
    p = Both()  # retention 90 d
    p.send(ev("e1", "page_view", B), ev("e2", "purchase", B + HOUR_MS, price=9.99, category="c1"))
    p.advance(B + HOUR_MS + 90 * DAY_MS - 1).check(lifetime_orders=1, lifetime_spend=9.99, events_30d=0)
    p.advance(B + HOUR_MS + 90 * DAY_MS).check(**EMPTY)
    # Same id in a new lifetime is not a duplicate.
    t = B + HOUR_MS + 90 * DAY_MS
    p.send(ev("e2", "purchase", t, price=1.0)).check(clock=t, lifetime_orders=1, lifetime_spend=1.0, events_30d=1)
    # An event at or after last + retention drops the old lifetime before it is applied.
    t2 = t + 90 * DAY_MS
    p.send(ev("e3", "page_view", t2)).check(
        clock=t2, lifetime_orders=0, events_30d=1, events_10m=1, ms_since_last_purchase=None
    )
