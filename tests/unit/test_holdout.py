"""Experiments: `holdout("name", P%)` (docs/definitions.md, "Experiments").

The arm is a pure function of the experiment's name and the user id: pinned here against digests
computed outside Python (coreutils' sha256sum), checked to be the same in a process with another
hash seed, to hold out the requested share of 20,000 users within a binomial tolerance, to be
independent between two experiments, and to grow by nesting when a share is raised. Then the
language: what parses, what is refused and why, and the arm each transition records."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from jobs.cli import main as cli_main
from tests.conftest import START_MS
from udfs.conditions import Compiler, ConditionError, Evaluation, Holdout, Not, parse_condition
from udfs.definitions import DefinitionError, load_definitions, parse_definitions
from udfs.events import UserEvent
from udfs.experiments import CONTROL, TREATMENT, arm, control_places, place
from udfs.features import FeatureCatalog
from udfs.profile import UserProfile
from udfs.profile_config import DAY_MS, MINUTE_MS, ProfileConfig
from udfs.transitions import RETENTION_RULE, SegmentEngine

USERS = [f"user-{i}" for i in range(20_000)]
SIGMAS = 5  # a binomial count outside 5 standard deviations: about 6 in 10 million runs


def within_binomial(count: int, n: int, p: float) -> bool:
    return abs(count - n * p) <= SIGMAS * math.sqrt(n * p * (1 - p))


# -- the hash ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "user_id, digest",
    [
        # printf 'flink-segments holdout v1\0spring_promo\0<user id>' | sha256sum
        ("user-42", "3c0980126a8ab858e5c6b533c0c7f5e4ed1408e5ec32c1500994ccbfee1c140d"),
        ("u1", "a55d1b6c85c251442eec4c38cc47f03f9ab5bb87b7d39a4818daa63935d332de"),
        ("Ünïcode-ü", "71a7ad9fc02b35b0a123961c0ce45553cfa0df43e9ac7f61c81077774d1ca23a"),
    ],
)
def test_the_place_is_the_first_8_bytes_of_the_documented_sha256_input(user_id, digest):
    assert place("spring_promo", user_id) == int(digest[:16], 16)


def test_the_pinned_users_arms_follow_from_their_places():
    # user-42 sits at 0x3c0980126a8ab858 / 2**64 = 0.2345...: control at 25%, treatment at 20%.
    assert arm("spring_promo", Fraction(1, 4), "user-42") == CONTROL
    assert arm("spring_promo", Fraction(1, 5), "user-42") == TREATMENT


def test_a_share_covers_exactly_the_places_below_share_times_2_to_the_64():
    assert control_places(Fraction(1, 2)) == 2**63
    assert control_places(Fraction(1, 3)) == 2**64 // 3 + 1  # 6148914691236517205.33: places 0 .. 6148914691236517205


def test_the_arms_are_the_same_in_another_process_with_another_hash_seed():
    users = USERS[:200]
    here = [arm("spring_promo", Fraction(1, 10), u) for u in users]
    script = (
        "import sys; from fractions import Fraction; from udfs.experiments import arm\n"
        "print(''.join(arm('spring_promo', Fraction(1, 10), f'user-{i}')[0] for i in range(200)))"
    )
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(root)}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True, cwd=root)
    assert out.stdout.strip() == "".join(a[0] for a in here)


@settings(max_examples=25, deadline=None)
@given(
    experiment=st.from_regex(r"[a-z][a-z0-9_]{0,20}", fullmatch=True),
    percent=st.sampled_from(["1", "5", "10", "12.5", "33.3", "50", "90", "99"]),
)
def test_an_experiment_holds_out_its_share_of_20000_users_within_binomial_tolerance(experiment, percent):
    share = Fraction(percent) / 100
    control = sum(arm(experiment, share, u) == CONTROL for u in USERS)
    assert within_binomial(control, len(USERS), float(share)), (control, percent)


@settings(max_examples=10, deadline=None)
@given(
    names=st.lists(st.from_regex(r"[a-z][a-z0-9_]{0,20}", fullmatch=True), min_size=2, max_size=2, unique=True),
    shares=st.tuples(st.sampled_from([10, 30, 50]), st.sampled_from([20, 50, 70])),
)
def test_two_experiments_arms_are_independent_the_joint_share_is_the_product(names, shares):
    a, b = names
    p, q = shares[0] / 100, shares[1] / 100
    in_a = [arm(a, Fraction(shares[0], 100), u) == CONTROL for u in USERS]
    in_b = [arm(b, Fraction(shares[1], 100), u) == CONTROL for u in USERS]
    both = sum(x and y for x, y in zip(in_a, in_b, strict=True))
    assert within_binomial(both, len(USERS), p * q), (both, p, q)
    # ... and within a's control arm, b still holds out its own share.
    assert within_binomial(both, sum(in_a), q)


def test_raising_a_share_only_moves_users_from_treatment_to_control():
    at_10 = {u for u in USERS if arm("spring_promo", Fraction(1, 10), u) == CONTROL}
    at_20 = {u for u in USERS if arm("spring_promo", Fraction(1, 5), u) == CONTROL}
    assert at_10 < at_20


# -- the language ------------------------------------------------------------------------------


def test_holdout_parses_to_its_node_with_an_exact_share():
    assert parse_condition('holdout("spring_promo", 12.5%)') == Holdout("spring_promo", Fraction(1, 8), 1)
    assert parse_condition("not holdout('b2', 10%)") == Not(Holdout("b2", Fraction(1, 10), 5), 1)


@pytest.mark.parametrize(
    "text, column, message",
    [
        ("holdout(spring, 10%)", 9, "experiment's name first, in quotes"),
        ('holdout("Spring", 10%)', 9, "1-64 lowercase letters"),
        ('holdout("", 10%)', 9, "1-64 lowercase letters"),
        ('holdout("9lives", 10%)', 9, "starting with a letter"),
        ('holdout("spring", 0.1)', 19, "as a percentage such as 10%"),
        ('holdout("spring", 10)', 19, "as a percentage such as 10%"),
        ('holdout("spring", 0%)', 19, "more than 0% and less than 100%"),
        ('holdout("spring", 0.000%)', 19, "more than 0% and less than 100%"),
        ('holdout("spring", 100%)', 19, "more than 0% and less than 100%"),
        ('holdout("spring", 150%)', 19, "more than 0% and less than 100%"),
        ('holdout("spring", -10%)', 19, "as a percentage such as 10%"),
        ('holdout("spring")', 17, "expected ','"),
        ('holdout("spring", 10%', 22, "expected ')'"),
        ("cart_items > 10%", 14, 'only the share of holdout(...), as in holdout("name", 10%)'),
        ("cart_items in [1, 10%]", 19, "only the share of holdout"),
        ("holdout > 1", 9, "expected '('"),
    ],
)
def test_holdout_errors_say_what_and_where(text, column, message):
    with pytest.raises(ConditionError) as err:
        Compiler(FeatureCatalog(ProfileConfig()), {}, set()).compile(text)
    assert message in err.value.message
    assert err.value.column == column


def test_one_condition_may_not_hold_out_one_experiment_at_two_shares():
    with pytest.raises(ConditionError, match="'x' is held out at 10% and at 20%: one experiment has one share"):
        Compiler(FeatureCatalog(ProfileConfig()), {}, set()).compile('holdout("x", 10%) or holdout("x", 20%)')


def definitions(*segments: dict) -> str:
    return yaml.safe_dump({"version": "exp-1", "segments": list(segments)}, sort_keys=False)


def test_a_file_may_not_hold_out_one_experiment_at_two_shares_in_two_segments():
    text = definitions(
        {"name": "treated", "when": 'not holdout("spring_promo", 10%)'},
        {"name": "held_out", "when": 'holdout("spring_promo", 12%)'},
    )
    with pytest.raises(DefinitionError) as err:
        parse_definitions(text, "exp.yaml")
    assert str(err.value) == (
        "exp.yaml:5: segment 'held_out': holds out experiment 'spring_promo' at 12%, segment 'treated' at 10%: "
        "one experiment has one share (name a new experiment to change it)"
    )


def test_nor_in_the_enter_and_exit_of_one_segment():
    text = definitions({"name": "s", "enter": 'holdout("x", 10%)', "exit": 'not holdout("x", 20%)'})
    with pytest.raises(DefinitionError, match="holds out experiment 'x' at 20%, segment 's' at 10%"):
        parse_definitions(text, "exp.yaml")


def test_the_definitions_list_their_experiments_and_each_segment_its_own():
    compiled = parse_definitions(
        definitions(
            {"name": "buyers", "when": "lifetime_orders > 0"},
            {"name": "treated", "when": 'segment.buyers and not holdout("spring_promo", 10%)'},
            {"name": "held_out", "when": 'segment.buyers and holdout("spring_promo", 10%)'},
            {"name": "both", "enter": 'holdout("a", 50%)', "exit": 'not holdout("b", 5%)'},
        )
    )
    assert compiled.experiments == {"spring_promo": Fraction(1, 10), "a": Fraction(1, 2), "b": Fraction(1, 20)}
    assert compiled.segments["buyers"].experiments == {}
    assert compiled.segments["held_out"].experiments == {"spring_promo": Fraction(1, 10)}
    assert compiled.segments["both"].experiments == {"a": Fraction(1, 2), "b": Fraction(1, 20)}


def test_the_compiled_holdout_holds_exactly_for_the_control_arm():
    catalog = FeatureCatalog(ProfileConfig())
    condition = Compiler(catalog, {}, set()).compile('holdout("spring_promo", 25%)')
    profile = UserProfile()
    for user in USERS[:500]:
        ev = Evaluation(profile, 0, catalog, {}, user)
        assert condition.holds(ev) == (arm("spring_promo", Fraction(1, 4), user) == CONTROL)


def test_a_holdout_evaluated_without_the_user_id_is_an_error_not_a_guess():
    catalog = FeatureCatalog(ProfileConfig())
    condition = Compiler(catalog, {}, set()).compile('holdout("spring_promo", 25%)')
    with pytest.raises(ValueError, match="without the user id"):
        condition.holds(Evaluation(UserProfile(), 0, catalog, {}))


# -- transitions -------------------------------------------------------------------------------

SPLIT = definitions(
    {"name": "buyers", "when": "lifetime_orders > 0"},
    {"name": "treated", "when": 'segment.buyers and not holdout("spring_promo", 50%)'},
    {"name": "held_out", "when": 'segment.buyers and holdout("spring_promo", 50%)'},
)


def test_every_transition_of_a_split_segment_records_the_users_arm_and_others_record_none():
    engine = SegmentEngine(parse_definitions(SPLIT, "split.yaml"))
    seen = {CONTROL: 0, TREATMENT: 0}
    for user in USERS[:200]:
        profile = UserProfile()
        out = engine.on_event(user, profile, UserEvent(f"{user}-1", user, "purchase", START_MS, price=5.0))
        out += engine.advance_to(user, profile, START_MS + 400 * DAY_MS)  # the retention ends the stay
        expected_arm = arm("spring_promo", Fraction(1, 2), user)
        seen[expected_arm] += 1
        entered = "held_out" if expected_arm == CONTROL else "treated"
        assert [(t.segment, t.kind, t.rule == RETENTION_RULE) for t in out] == [
            ("buyers", "ENTER", False),
            (entered, "ENTER", False),
            ("buyers", "EXIT", True),
            (entered, "EXIT", True),
        ]
        assert [t.arms for t in out] == [{}, {"spring_promo": expected_arm}, {}, {"spring_promo": expected_arm}]
        assert out[1].to_record(0)["arms"] == {"spring_promo": expected_arm}
        assert out[0].to_record(0)["arms"] == {}
    assert min(seen.values()) > 60  # both arms were exercised


EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "spring_promo.yaml"


def test_the_documented_example_splits_cart_abandoners_into_its_two_arms():
    definitions = load_definitions(EXAMPLE)
    assert definitions.experiments == {"spring_promo": Fraction(1, 10)}
    engine = SegmentEngine(definitions)
    arms_seen = set()
    for user in USERS[:60]:
        profile = UserProfile()
        out = engine.on_event(user, profile, UserEvent(f"{user}-1", user, "add_to_cart", START_MS, product_id="p"))
        out += engine.advance_to(user, profile, START_MS + 31 * MINUTE_MS)  # the cart untouched for 30 minutes
        user_arm = arm("spring_promo", Fraction(1, 10), user)
        arms_seen.add(user_arm)
        entered = {t.segment: t.arms for t in out if t.kind == "ENTER"}
        split = "spring_promo_control" if user_arm == CONTROL else "spring_promo_treatment"
        assert entered == {"cart_abandoner": {}, split: {"spring_promo": user_arm}}
    assert arms_seen == {CONTROL, TREATMENT}


def test_validate_names_the_experiments_and_their_shares(capsys):
    assert cli_main(["validate", str(EXAMPLE)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{EXAMPLE}: ok, version spring-promo-1, 3 segments")
    assert out.rstrip().endswith(", experiments: spring_promo (10% held out)")
