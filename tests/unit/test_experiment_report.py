"""The backtest's experiment figures (jobs/experiment_report.py, docs/operations.md): the
intervals against the published worked examples, and a generated log whose arm sizes and
conversions the test works out itself, from the events and the documented hash, never from the
code's output; then the text, JSON and CLI outputs."""

from __future__ import annotations

import json
import random

import pytest

from jobs.backtest import EventLog, run_backtest, summary_lines
from jobs.cli import main as cli_main
from jobs.experiment_report import newcombe, wilson
from tests.conftest import START_MS
from tests.unit.definitions_oracle import in_control
from udfs.definitions import parse_definitions
from udfs.events import UserEvent
from udfs.profile_config import DAY_MS, HOUR_MS, MINUTE_MS

# -- the intervals -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "successes, n, low, high",
    # Newcombe, "Two-sided confidence intervals for the single proportion", Stat. Med. 1998, Table I
    [(81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718)],
)
def test_the_wilson_interval_matches_newcombes_worked_examples(successes, n, low, high):
    got = wilson(successes, n)
    assert got == pytest.approx((low, high), abs=5e-5)


@pytest.mark.parametrize(
    "a, n, b, m, low, high",
    # Newcombe, "Interval estimation for the difference between independent proportions",
    # Stat. Med. 1998, Table II, method 10 (score, no continuity correction)
    [(56, 70, 48, 80, 0.0524, 0.3339), (9, 10, 3, 10, 0.1705, 0.8090)],
)
def test_the_difference_interval_matches_newcombes_method_10(a, n, b, m, low, high):
    assert newcombe(a, n, b, m) == pytest.approx((low, high), abs=5e-5)


def test_no_observations_give_no_interval():
    assert wilson(0, 0) is None and newcombe(1, 2, 0, 0) is None


# -- a generated log ---------------------------------------------------------------------------

SPLIT = """
version: promo-1
segments:
  - name: cart_holders
    when: cart_items > 0
  - name: promo_treated
    when: segment.cart_holders and not holdout("cart_promo", 30%)
  - name: promo_held_out
    when: segment.cart_holders and holdout("cart_promo", 30%)
"""
WINDOW_MS = 3 * DAY_MS


def generated_log(users: int = 1500, seed: int = 7) -> list[UserEvent]:
    """Each user views pages, most add to the cart once or twice, and buy within hours to days,
    treatment users more often; a few buy before they ever add anything. In time order, recorded
    for 20 days: the last users' windows reach past its end."""
    rng = random.Random(seed)
    events = []
    for i in range(users):
        user = f"shopper-{i}"
        own: list[tuple[str, int, dict]] = []  # (type, time, other fields)
        start = START_MS + rng.randrange(19 * DAY_MS)
        own.append(("page_view", start, {}))
        if rng.random() < 0.1:
            own.append(("purchase", start + MINUTE_MS, {"price": 10.0}))  # before any cart: not a conversion
        if rng.random() < 0.85:
            first_add = start + rng.randrange(1, 2 * HOUR_MS)
            cart = {"quantity": 1, "price": 5.0}
            own.append(("add_to_cart", first_add, {"product_id": "p1", **cart}))
            if rng.random() < 0.3:
                own.append(("add_to_cart", first_add + rng.randrange(1, DAY_MS), {"product_id": "p2", **cart}))
            buys = 0.3 if in_control("cart_promo", "30", user) else 0.6
            if rng.random() < buys:
                own.append(
                    ("purchase", first_add + rng.randrange(0, 5 * DAY_MS), {"price": 5.0})
                )  # some after the window
        events += [UserEvent(f"{user}-{n}", user, kind, at, **fields) for n, (kind, at, fields) in enumerate(own)]
    events.sort(key=lambda e: e.timestamp)
    return [e for e in events if e.timestamp < START_MS + 20 * DAY_MS]


def expected_figures(events: list[UserEvent]) -> dict[str, tuple[int, int, int]]:
    """arm -> (entered, measured, converted), from the events alone: a user enters the split at
    their first add_to_cart (the cart is then not empty), in the arm the documented hash says."""
    end = max(e.timestamp for e in events)
    first_add: dict[str, int] = {}
    for e in events:
        if e.event_type == "add_to_cart":
            first_add.setdefault(e.user_id, e.timestamp)
    out = {"control": [0, 0, 0], "treatment": [0, 0, 0]}
    for user, entered in first_add.items():
        tally = out["control" if in_control("cart_promo", "30", user) else "treatment"]
        tally[0] += 1
        if entered + WINDOW_MS <= end:
            tally[1] += 1
            if any(
                e.user_id == user and e.event_type == "purchase" and entered < e.timestamp <= entered + WINDOW_MS
                for e in events
            ):
                tally[2] += 1
    return {arm: tuple(v) for arm, v in out.items()}


@pytest.fixture(scope="module")
def generated():
    events = generated_log()
    result = run_backtest(
        parse_definitions(SPLIT, "split.yaml"), EventLog("log", events), conversion_window_ms=WINDOW_MS
    )
    return events, result


def test_each_arms_size_and_conversions_are_what_the_events_say(generated):
    events, result = generated
    want = expected_figures(events)
    figures = result.experiments["cart_promo"]
    got = {a.arm: (a.entered, a.measured, a.converted) for a in (figures.control, figures.treatment)}
    assert got == want
    assert figures.segments == ("promo_treated", "promo_held_out")
    # The log is big enough for the check to mean something: both arms measured, some not.
    assert min(want["control"][1], want["treatment"][1]) > 250
    assert all(entered > measured > converted > 0 for entered, measured, converted in want.values())


def test_the_rates_intervals_and_lift_follow_from_the_counts(generated):
    events, result = generated
    want = expected_figures(events)
    f = result.experiments["cart_promo"]
    (_, nc, kc), (_, nt, kt) = want["control"], want["treatment"]
    assert f.control.rate == kc / nc and f.treatment.rate == kt / nt
    assert f.lift == pytest.approx(kt / nt - kc / nc)
    assert f.lift_interval == newcombe(kt, nt, kc, nc)
    assert f.relative_lift == pytest.approx((kt / nt) / (kc / nc) - 1)
    low, high = f.lift_interval
    assert 0 < low < f.lift < high  # generated with 60% against 30% of buyers: a lift the log shows


def test_the_edges_of_the_window_and_of_the_log():
    """Users enter at 0, 11, 12 or 20 ms (by an add to the cart); the log ends at WINDOW_MS + 11,
    so the windows of the first two kinds lie within it and the others' do not."""
    users = [f"edge-{i}" for i in range(40)]
    arms = {u: "control" if in_control("cart_promo", "30", u) else "treatment" for u in users}
    events = []
    for i, u in enumerate(users):
        entered = START_MS + (0, 11, 12, 20)[i % 4]
        events.append(UserEvent(f"{u}-add", u, "add_to_cart", entered, product_id="p", quantity=1))
        # 0: a purchase at the very entry (it caused nothing: not a conversion); 1: at the window's
        # end (converted); 2: one ms after it; 3: none.
        buy = {0: entered, 1: entered + WINDOW_MS, 2: entered + WINDOW_MS + 1}.get((i // 4) % 4)
        if buy is not None:
            events.append(UserEvent(f"{u}-buy", u, "purchase", buy, price=1.0))
    end = START_MS + WINDOW_MS + 11
    events = [e for e in events if e.timestamp <= end] + [UserEvent("end", "someone-else", "page_view", end)]
    events.sort(key=lambda e: e.timestamp)
    result = run_backtest(
        parse_definitions(SPLIT, "split.yaml"), EventLog("log", events), conversion_window_ms=WINDOW_MS
    )
    f = result.experiments["cart_promo"]
    want = {"control": [0, 0, 0], "treatment": [0, 0, 0]}
    for i, u in enumerate(users):
        tally = want[arms[u]]
        tally[0] += 1
        if i % 4 <= 1:  # entered at 0 or 11 ms: the window ends by the end of the log
            tally[1] += 1
            tally[2] += (i // 4) % 4 == 1
    assert {a.arm: [a.entered, a.measured, a.converted] for a in (f.control, f.treatment)} == want
    assert sum(v[2] for v in want.values()) > 0 and sum(v[1] for v in want.values()) < len(users)


def test_a_file_without_experiments_reports_none_and_its_output_is_unchanged(generated):
    events, _ = generated
    plain = "version: p-1\nsegments:\n  - name: cart_holders\n    when: cart_items > 0\n"
    result = run_backtest(parse_definitions(plain), EventLog("log", events[:200]))
    assert result.experiments == {}
    assert not any(line.startswith("experiment") for line in summary_lines(result))


def test_the_text_json_and_html_outputs_carry_the_figures(tmp_path, capsys):
    events = generated_log(users=300, seed=3)
    log = tmp_path / "events.jsonl"
    log.write_text("".join(json.dumps(e.to_record()) + "\n" for e in events))
    definitions = tmp_path / "split.yaml"
    definitions.write_text(SPLIT)
    out_json = tmp_path / "figures.json"
    code = cli_main(
        [
            "backtest",
            str(definitions),
            "--events",
            str(log),
            "--quiet",
            "--conversion-window",
            "3d",
            "--json",
            str(out_json),
            "--html",
            str(tmp_path / "report.html"),
        ]
    )
    assert code == 0
    want = expected_figures(events)
    text = capsys.readouterr().out
    assert "experiment cart_promo: control holds out 30% of users; segments promo_treated, promo_held_out" in text
    assert "a purchase within 3.0d after entering" in text
    for arm, (entered, measured, converted) in want.items():
        assert any(line.split()[:4] == [arm, str(entered), str(measured), str(converted)] for line in text.splitlines())
    assert "lift, treatment - control:" in text
    page = (tmp_path / "report.html").read_text()
    assert "<h2>Experiments</h2><pre>experiment cart_promo: control holds out 30% of users" in page
    figures = json.loads(out_json.read_text())["experiments"]["cart_promo"]
    assert figures["share_held_out"] == 0.3 and figures["window_ms"] == WINDOW_MS
    for arm, (entered, measured, converted) in want.items():
        assert (figures[arm]["entered"], figures[arm]["measured"], figures[arm]["converted"]) == (
            entered,
            measured,
            converted,
        )
        low, high = figures[arm]["interval_95"]
        assert low < converted / measured < high


def test_a_conversion_window_that_is_not_a_duration_is_refused(tmp_path, capsys):
    definitions = tmp_path / "split.yaml"
    definitions.write_text(SPLIT)
    log = tmp_path / "events.jsonl"
    log.write_text("")
    code = cli_main(["backtest", str(definitions), "--events", str(log), "--quiet", "--conversion-window", "week"])
    assert code == 2
    assert "--conversion-window: expected a duration such as 10m, 1h or 7d" in capsys.readouterr().err
