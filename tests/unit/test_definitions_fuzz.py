"""Fuzzing the definitions language: whatever text or YAML arrives, the parser, the compiler and
the loader either succeed or raise their own clean error (ConditionError / DefinitionError, both
ValueErrors) -- never anything else -- and nothing is ever executed: eval, exec, compile, pickle,
YAML object construction and shell calls are trapped for the duration of every parse. What does
compile must then evaluate and time itself on real profiles without raising either."""

from __future__ import annotations

import builtins
import contextlib
import difflib  # noqa: F401  (imported lazily by the compiler's suggestions: import it before the traps)
import os
import pickle
import re
import subprocess
from unittest import mock

import pytest
import yaml
import yaml.constructor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import START_MS
from udfs.conditions import KEYWORDS, Compiler, ConditionError, Evaluation, ModelOutput, parse_condition
from udfs.definitions import DefinitionError, parse_definitions
from udfs.events import EVENT_TYPES, UserEvent
from udfs.features import FeatureCatalog
from udfs.profile import UserProfile
from udfs.profile_config import DAY_MS, HOUR_MS, MINUTE_MS, ProfileConfig
from udfs.transitions import SegmentEngine

A = START_MS - START_MS % DAY_MS

CATALOG = FeatureCatalog(ProfileConfig())
MODELS = {"p": ModelOutput("p"), "k": ModelOutput("k", clusters=3)}
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- the canary: nothing may be executed or constructed ---------------------------------------------


class CanaryTripped(AssertionError):
    pass


TRAPPED = [
    (builtins, "eval"),
    (builtins, "exec"),
    (builtins, "compile"),
    (pickle, "loads"),
    (pickle, "load"),
    (yaml, "load"),
    (yaml, "unsafe_load"),
    (yaml, "full_load"),
    (yaml, "load_all"),
    (yaml, "unsafe_load_all"),
    (yaml, "full_load_all"),
    (yaml.constructor.BaseConstructor, "construct_document"),  # no YAML node becomes a Python object
    (os, "system"),
    (os, "popen"),
    (subprocess, "Popen"),
]


@contextlib.contextmanager
def nothing_executed():
    """Traps the calls above for the duration of the block: any call raises CanaryTripped and is
    recorded (in case something swallowed the exception)."""
    tripped: list[str] = []

    def trap(name):
        def call(*args, **kwargs):
            tripped.append(name)
            raise CanaryTripped(f"{name} was called")

        return call

    with contextlib.ExitStack() as stack:
        for owner, attribute in TRAPPED:
            stack.enter_context(mock.patch.object(owner, attribute, trap(f"{owner.__name__}.{attribute}")))
        yield tripped
    assert not tripped, tripped


@pytest.mark.parametrize(
    "call",
    [
        lambda: eval("1"),  # noqa: S307
        lambda: exec("x = 1"),  # noqa: S102
        lambda: compile("1", "<s>", "eval"),
        lambda: pickle.loads(b"N."),
        lambda: yaml.load("a: 1", Loader=yaml.SafeLoader),  # noqa: S506
        lambda: yaml.safe_load("a: 1"),
        lambda: yaml.unsafe_load("a: 1"),
        lambda: yaml.full_load("a: 1"),
        lambda: os.system("true"),  # noqa: S605
        lambda: subprocess.Popen(["true"]),  # noqa: S603
    ],
)
def test_the_canary_trips_on_every_trapped_call(call):
    with pytest.raises(CanaryTripped), nothing_executed():
        call()


def test_the_canary_leaves_the_parser_and_compiler_working():
    with nothing_executed():
        assert parse_condition("cart_items > 0 and not segment.a") is not None
        parse_definitions("version: v1\nsegments:\n  - name: s\n    when: cart_items > 0\n", "f.yaml")
        with pytest.raises(DefinitionError):
            parse_definitions("version: v1\nsegments:\n  - name: s\n    when: count_purchse_24h > 0\n", "f.yaml")


@pytest.mark.parametrize(
    "payload",
    [
        '!!python/object/apply:os.system ["touch {marker}"]',
        '!!python/object/new:os.system ["touch {marker}"]',
        '!!python/object/apply:subprocess.check_call [["touch", "{marker}"]]',
        "!!python/name:os.system",
    ],
)
def test_yaml_code_execution_payloads_are_refused_and_run_nothing(payload, tmp_path):
    marker = tmp_path / "pwned"
    value = payload.format(marker=marker)
    for text in (
        f"version: v1\nsegments:\n  - name: s\n    when: {value}\n",
        f"version: {value}\nsegments: []\n",
        f"{value}\n",
    ):
        with nothing_executed(), pytest.raises(DefinitionError, match="is not allowed"):
            parse_definitions(text, "f.yaml")
    assert not marker.exists()


# -- (a) condition text ------------------------------------------------------------------------------


def profiles() -> list[UserProfile]:
    """Real profiles at a few stages: a single page view, and a shopper who viewed, added, played
    and purchased."""
    definitions = parse_definitions("version: f\nsegments:\n  - name: x\n    when: 'true'\n", "f.yaml")
    engine = SegmentEngine(definitions, scorer=lambda p, now, read: {"p": 0.75, "k": 2})
    one, rich = UserProfile(), UserProfile()
    engine.on_event("u", one, UserEvent("e0", "u", "page_view", A))
    for i, (kind, offset, extra) in enumerate(
        [
            ("page_view", 0, {}),
            ("product_view", MINUTE_MS, {"product_id": "p-1", "category": "shoes"}),
            ("add_to_cart", 2 * MINUTE_MS, {"product_id": "p-1", "quantity": 2, "price": 3.0, "category": "shoes"}),
            ("video_play", 3 * MINUTE_MS, {}),
            ("purchase", HOUR_MS, {"price": 6.0}),
        ]
    ):
        engine.on_event("u", rich, UserEvent(f"e{i}", "u", kind, A + offset, **extra))
    return [one, rich, UserProfile()]


PROFILES = profiles()

EXTREMES = st.sampled_from(["9" * 400, "9" * 20, "0." + "0" * 320 + "1", "0." + "0" * 30 + "1", "0." + "9" * 40])
NUMBERS = st.one_of(
    st.sampled_from(
        ["0", "1", "2", "3", "4", "5", "0.5", "0.7", "0.8", "40", "50", "1500.5", "100", "600000", "00", "1.0"]
    ),
    EXTREMES,
    st.integers(0, 10**7).map(str),
    st.floats(0, 1e7, allow_nan=False, allow_infinity=False).map(lambda f: f"{f:.4f}"),
)
UNITS = st.sampled_from(["ms", "s", "m", "h", "d", "w"])
DURATIONS = st.builds(lambda n, u: n + u, NUMBERS, UNITS)
TEXTS = st.sampled_from(['"high"', '"medium"', "'low'", '"hgh"', '"shoes"', '""', "'p-1'"])
LITERALS = st.one_of(
    NUMBERS,
    DURATIONS,
    NUMBERS.map(lambda n: "-" + n),
    DURATIONS.map(lambda d: "-" + d),
    TEXTS,
    st.sampled_from(["true", "false"]),
)
NAMES = sorted(CATALOG.specs)
REFS = st.one_of(
    st.sampled_from(NAMES),
    st.builds(
        lambda m, k: f"{m}[{k}]",
        st.sampled_from(
            [
                "category_views_24h",
                "category_affinity",
                "cart_quantity",
                "ms_since_viewed_product",
                "cart",
                "cart_items",
                "category_views_10m",
            ]
        ),
        TEXTS,
    ),
    st.sampled_from(["score.p", "score.k", "score.q", "segment.a", "segment.s", "segment.zz", "nope", "score", "and"]),
)
OPS = st.sampled_from(["<", "<=", ">", ">=", "==", "!="])
ATOMS = st.one_of(
    st.builds(lambda a, op, b: f"{a} {op} {b}", REFS, OPS, st.one_of(LITERALS, REFS)),
    st.builds(lambda a, op, b: f"{a} {op} {b}", LITERALS, OPS, REFS),
    st.builds(
        lambda a, neg, items: f"{a} {neg}in [{', '.join(items)}]",
        REFS,
        st.sampled_from(["", "not "]),
        st.lists(LITERALS, min_size=1, max_size=3),
    ),
    st.builds(lambda t, neg, b: f"{t} {neg}in {b}", st.one_of(TEXTS, REFS), st.sampled_from(["", "not "]), REFS),
    REFS.map(lambda r: f"missing({r})"),
    st.builds(
        lambda e, d: f"absent({e}, {d})", st.sampled_from([*EVENT_TYPES, "nope"]), st.one_of(DURATIONS, NUMBERS, TEXTS)
    ),
    st.sampled_from(["true", "false", "segment.a", "not segment.a"]),
)
# Well-typed atoms, which mostly compile, so that the compiler's timing and the engine get exercised.
NUMBER_FEATURES = sorted(n for n, spec in CATALOG.specs.items() if spec.kind == "number")
DURATION_FEATURES = sorted(n for n, spec in CATALOG.specs.items() if spec.kind == "duration")
TYPED_ATOMS = st.one_of(
    st.builds(
        lambda f, op, n: f"{f} {op} {n}",
        st.one_of(
            st.sampled_from(NUMBER_FEATURES),
            st.sampled_from(['category_views_24h["shoes"]', "cart_quantity['p-1']", 'category_affinity["shoes"]']),
        ),
        OPS,
        NUMBERS,
    ),
    st.builds(
        lambda f, op, d: f"{f} {op} {d}",
        st.one_of(st.sampled_from(DURATION_FEATURES), st.just('ms_since_viewed_product["p-1"]')),
        OPS,
        st.one_of(DURATIONS, NUMBERS),
    ),
    st.builds(
        lambda f, op, n: f"{f} {op} {n}",
        st.sampled_from(["engagement_score", 'category_affinity["shoes"]']),
        OPS,
        NUMBERS,
    ),  # decaying values
    st.builds(lambda op, n: f"score.p {op} {n}", OPS, st.sampled_from(["0", "0.5", "0.7", "1", "0.75"])),
    st.builds(lambda op, n: f"score.k {op} {n}", OPS, st.sampled_from(["0", "1", "2"])),
    st.builds(
        lambda op, t: f"engagement_tier {op} {t}",
        st.sampled_from(["==", "!="]),
        st.sampled_from(['"high"', '"medium"', '"low"']),
    ),
    st.builds(
        lambda neg, t: f'engagement_tier {neg}in ["low", {t}]',
        st.sampled_from(["", "not "]),
        st.sampled_from(['"high"', '"medium"']),
    ),
    st.builds(
        lambda neg, t: f"{t} {neg}in top_categories",
        st.sampled_from(["", "not "]),
        st.sampled_from(['"shoes"', '"hats"', "engagement_tier"]),
    ),
    st.builds(lambda neg, n: f"score.k {neg}in [{n}]", st.sampled_from(["", "not "]), st.sampled_from(["0", "2"])),
    st.builds(lambda e, d: f"absent({e}, {d})", st.sampled_from(EVENT_TYPES), DURATIONS),
    # extreme literals where a value is timed
    st.builds(lambda e, x, u: f"absent({e}, {x}{u})", st.sampled_from(EVENT_TYPES), EXTREMES, UNITS),
    st.builds(
        lambda f, op, x: f"{f} {op} {x}", st.sampled_from(["engagement_score", "ms_since_last_event"]), OPS, EXTREMES
    ),
    st.sampled_from(NUMBER_FEATURES + DURATION_FEATURES + ["score.p", "score.k"]).map(lambda r: f"missing({r})"),
    st.sampled_from(["segment.a", "not segment.a", "true"]),
)
GRAMMAR = st.recursive(
    st.one_of(TYPED_ATOMS, TYPED_ATOMS, ATOMS),
    lambda c: st.one_of(
        st.builds(lambda a, b: f"{a} and {b}", c, c),
        st.builds(lambda a, b: f"{a} or {b}", c, c),
        c.map(lambda a: f"not {a}"),
        c.map(lambda a: f"({a})"),
    ),
    max_leaves=6,
)

TOKENS = st.sampled_from(
    [
        *sorted(KEYWORDS),
        "<",
        "<=",
        ">",
        ">=",
        "==",
        "!=",
        "(",
        ")",
        "[",
        "]",
        ",",
        ".",
        "-",
        '"',
        "'",
        "0",
        "3",
        "0.7",
        "10m",
        "7d",
        "500ms",
        "1.5h",
        '"shoes"',
        "'high'",
        "cart_items",
        "engagement_score",
        "engagement_tier",
        "top_categories",
        "category_views_24h",
        "ms_since_last_event",
        "ms_since_viewed_product",
        "purchase",
        "p",
        "k",
        "a",
        "s",
        "9" * 30,
        "\n",
        "\t",
        "#",
        ":",
        "!",
        "&",
        "*",
        "é",
        "\\",
        "10x",
    ]
)
SOUP = st.lists(TOKENS, max_size=40).flatmap(
    lambda tokens: st.sampled_from([" ", ""]).map(lambda sep: sep.join(tokens))
)
DEEP = st.builds(
    lambda n, inner, how: {
        "paren": "(" * n + inner + ")" * n,
        "not": "not " * n + inner,
        "mixed": "(not " * n + inner + ")" * n,
        "open": "(" * n + inner,
    }[how],
    st.integers(0, 120),
    st.one_of(GRAMMAR, SOUP),
    st.sampled_from(["paren", "not", "mixed", "open"]),
)
CONDITION_TEXT = st.one_of(st.text(max_size=200), SOUP, GRAMMAR, DEEP)


def check_condition_text(text: str) -> None:
    with nothing_executed():
        try:
            parse_condition(text)
        except ConditionError as err:
            assert err.column is None or 1 <= err.column <= len(text) + 1, (err.column, len(text))
        try:
            condition = Compiler(CATALOG, MODELS, {"a", "s"}).compile(text)
        except ConditionError as err:
            assert err.column is None or 1 <= err.column <= len(text) + 1, (err.column, len(text))
            return
    for profile in PROFILES:
        clock = profile.clock_ms or A  # the engine evaluates at the user's clock or later, never before
        for now in (clock, clock + HOUR_MS, clock + 3 * DAY_MS):
            ev = Evaluation(profile, now, CATALOG, {"p": 0.75, "k": 2} if profile is PROFILES[1] else {})
            ev.members.update({"a": True, "s": False})
            assert isinstance(condition.holds(ev), bool)
            due = condition.next_change(ev)
            assert due is None or due > now, (due, now)


@FUZZ
@given(CONDITION_TEXT)
def test_any_condition_text_parses_and_compiles_or_raises_a_condition_error(text):
    check_condition_text(text)


# Numbers at the edges of a float, in every place where the compiler works out a time from a literal.
EDGE_NUMBERS = st.one_of(
    st.sampled_from(
        [
            "0",
            "0.0",
            "1",
            "0." + "0" * 320 + "1",
            f"{5e-324:.330f}",
            f"{2.2250738585072014e-308:.330f}",
            f"{1e-300:.310f}",
            "9" * 400,
            f"{1.7976931348623157e308:.0f}",
            "9" * 20,
        ]
    ),
    st.floats(0, 1e-300).map(lambda x: f"{x:.330f}"),  # down to the subnormals
    st.floats(1e300, 1.7e308).map(lambda x: f"{x:.0f}"),
    st.integers(10**300, 10**400).map(str),  # beyond a float: infinity
)


@settings(max_examples=80, deadline=None)
@given(
    st.sampled_from(
        [
            "ms_since_last_event",
            "ms_since_last_purchase",
            'ms_since_viewed_product["p-1"]',
            "ms_since_cart_activity",
            "current_session_duration_ms",
        ]
    ),
    OPS,
    EDGE_NUMBERS,
    st.sampled_from(["", "ms", "s", "d", "w"]),
)
def test_extreme_recency_thresholds_compile_and_time_or_raise_a_condition_error(feature, op, number, unit):
    check_condition_text(f"{feature} {op} {number}{unit}")


@settings(max_examples=80, deadline=None)
@given(
    st.sampled_from(["engagement_score", 'category_affinity["shoes"]', "count_page_view_24h", "sessions_per_week"]),
    OPS,
    EDGE_NUMBERS,
)
def test_extreme_thresholds_on_decaying_and_step_values_compile_and_time_or_raise_a_condition_error(
    feature, op, number
):
    check_condition_text(f"{feature} {op} {number}")


@settings(max_examples=80, deadline=None)
@given(st.sampled_from(EVENT_TYPES), EDGE_NUMBERS, UNITS)
def test_extreme_absent_windows_compile_and_time_or_raise_a_condition_error(event_type, number, unit):
    check_condition_text(f"absent({event_type}, {number}{unit})")


@settings(max_examples=60, deadline=None)
@given(GRAMMAR)
def test_any_grammar_shaped_condition_loads_or_raises_a_definition_error_and_then_runs(text):
    raw = yaml.safe_dump(
        {"version": "fuzz-1", "segments": [{"name": "a", "when": "cart_items > 0"}, {"name": "s", "when": text}]},
        sort_keys=False,
    )
    with nothing_executed():
        try:
            definitions = parse_definitions(raw, "fuzz.yaml", None, MODELS)
        except DefinitionError as err:
            assert str(err).startswith("fuzz.yaml")
            assert err.line is None or 1 <= err.line <= raw.count("\n") + 1
            return
    # it loaded: the engine must run it through events and time without raising
    engine = SegmentEngine(definitions, scorer=lambda p, now, read: {"p": 0.75, "k": 2})
    profile, out = UserProfile(), []
    for i, (kind, offset) in enumerate(
        [("page_view", 0), ("add_to_cart", MINUTE_MS), ("video_play", 2 * MINUTE_MS), ("purchase", HOUR_MS)]
    ):
        out += engine.on_event(
            "u",
            profile,
            UserEvent(f"e{i}", "u", kind, A + offset, product_id="p-1", quantity=1, price=2.0, category="shoes"),
        )
    out += engine.advance_to("u", profile, A + 10 * DAY_MS)
    for segment in ("a", "s"):
        kinds = [t.kind for t in out if t.segment == segment]
        assert kinds == ["ENTER", "EXIT"] * (len(kinds) // 2) + ["ENTER"] * (len(kinds) % 2)


@FUZZ
@given(CONDITION_TEXT)
def test_any_condition_text_in_a_file_loads_or_raises_a_definition_error_naming_the_segment(text):
    raw = yaml.safe_dump(
        {"version": "fuzz-1", "segments": [{"name": "a", "when": "cart_items > 0"}, {"name": "s", "when": text}]},
        sort_keys=False,
    )
    with nothing_executed():
        try:
            parse_definitions(raw, "fuzz.yaml", None, MODELS)
        except DefinitionError as err:
            assert str(err).startswith("fuzz.yaml:")
            assert err.segment == "s", str(err)


# -- (b) YAML structures and raw bytes ---------------------------------------------------------------

KEYS = st.one_of(
    st.sampled_from(
        ["version", "segments", "exclusive_groups", "description", "name", "when", "enter", "exit", "min_dwell"]
    ),
    st.text(max_size=8),
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(),
    st.text(max_size=30),
    st.sampled_from(
        [
            "cart_items > 0",
            "segment.a",
            "segment.s",
            "not segment.b",
            "ms_since_last_event < 10m",
            "1h",
            "0s",
            "v1",
            "a",
            "b",
            "s",
            "true",
            "engagement_score > 50",
            "engagement_score < 40",
            "tier",
            "score.p > 0.5",
        ]
    ),
)
TREES = st.recursive(
    SCALARS,
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(KEYS, children, max_size=5)),
    max_leaves=25,
)
SEGMENT_ENTRIES = st.dictionaries(
    st.sampled_from(["name", "when", "enter", "exit", "min_dwell", "description", "x"]),
    st.one_of(SCALARS, TREES),
    max_size=5,
)
SHAPED = st.fixed_dictionaries(
    {
        "version": st.one_of(st.sampled_from(["v1", "shop-3"]), SCALARS),
        "segments": st.lists(SEGMENT_ENTRIES, max_size=5),
    },
    optional={
        "exclusive_groups": st.lists(
            st.fixed_dictionaries(
                {
                    "name": st.one_of(st.sampled_from(["g", "h"]), SCALARS),
                    "segments": st.lists(st.sampled_from(["a", "b", "s", "x"]), max_size=4),
                }
            ),
            max_size=2,
        ),
        "description": SCALARS,
    },
)
YAML_DOCS = st.one_of(TREES, SHAPED)
YAML_TEXT = st.text(alphabet=st.sampled_from(list("-:[]{}&*!|>'\"#%@?,. \n\tabcnsvw0123456789_=<")), max_size=300)


# What YAML takes for a line break (PyYAML's reader, YAML 1.1): an error's line counts these.
YAML_LINE_BREAKS = re.compile("\r\n|[\r\n\x85\u2028\u2029]")


def check_file(raw: str | bytes) -> None:
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    lines = len(YAML_LINE_BREAKS.split(text))
    with nothing_executed():
        try:
            parse_definitions(raw, "fuzz.yaml", None, MODELS)
        except DefinitionError as err:
            assert str(err).startswith("fuzz.yaml")
            assert err.line is None or 1 <= err.line <= lines, (err.line, lines)


@FUZZ
@given(YAML_DOCS)
def test_any_yaml_structure_loads_or_raises_a_definition_error(doc):
    check_file(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True))


@FUZZ
@given(st.one_of(st.binary(max_size=400), YAML_TEXT, YAML_TEXT.map(lambda t: "version: v1\nsegments:\n" + t)))
def test_any_bytes_or_yaml_looking_text_loads_or_raises_a_definition_error(raw):
    check_file(raw)
