"""A brute-force oracle for segment transitions (docs/definitions.md), and a hypothesis
strategy for random definitions files.

The strategy draws each definitions file twice over: as YAML text, which only the engine parses
(`udfs.definitions.parse_definitions`), and as a small tree of the node classes below, which only
this oracle evaluates. Nothing here imports the engine's parser, compiler, condition evaluation or
timer logic; feature values come from the independent profile oracle
(`tests/unit/profile_oracle.py`: every feature recomputed from the raw accepted events).

How the oracle finds the time-driven changes, without asking the engine when they are due: between
two steps of a user it evaluates the definitions at every *candidate* instant, in time order, and
emits a transition whenever a membership changes. The candidates are generated generously from the
log: every accepted event time plus every duration the definitions or the configuration contain
(thresholds and `absent` windows, floor and ceiling of fractional ones, the session gap, the week,
each horizon's length), each bucket boundary at which an event leaves a horizon, the end of every
running min_dwell, and for decaying scores the exact millisecond at which the score crosses each
threshold the definitions compare it with (found by bisection on the same decay sum the profile
oracle uses), all of them -1, +0 and +1 ms. Evaluating at an instant where nothing changes is
harmless (membership is a function of the previous membership and the values at that instant), so
the over-generation only costs time.

Readings of the spec this oracle takes:
  * Evaluation instants are the user's clock: an accepted event is evaluated at max(clock, its
    time) after it is applied (a late event's transitions are stamped with the clock it is
    applied at, which is the instant the features are computed for).
  * A time-driven change due exactly at an event's timestamp is decided with the event (docs/definitions.md:
    the clock advances "emitting any time-driven change due *before* it"). Retention expiry at
    exactly the event's timestamp comes first ("when the clock reaches last_event + retention,
    the profile is dropped").
  * A user without a profile (none yet, or dropped by the retention) is in no segment and is not
    evaluated until their next accepted event.
  * Within one instant and cause, exits come before entries (docs/definitions.md); the order among exits (or
    among entries) is not specified, so the oracle lists each sorted by segment name.
  * `holdout("name", P%)` holds when the first 8 bytes of sha256("flink-segments holdout v1",
    NUL, the name, NUL, the user id), read as a big-endian integer over 2**64, are below P/100
    (docs/definitions.md, "Experiments"); computed here from the hex digest with exact decimals.
    A transition records the user's arm in every experiment its segment's conditions name.
  * Scores (`score.X`, from the fake models below) are computed at every accepted event after it
    is applied, and, with `rescore_every: D` in the file, D after the latest scoring while no event
    comes (udfs/transitions.py; docs/definitions.md, `rescore_every`); a rescoring
    instant is evaluated with the new scores.

Float ties: the engine keeps decayed scores incrementally while the profile oracle sums decayed
terms, so the two differ in the last bits. Where a verdict hangs on that (a float within 1e-12 of
its threshold, a near tie at the top_categories cut) the oracle raises `Ambiguous` and the test
rejects the example; thresholds are chosen so that this practically never happens.
"""

from __future__ import annotations

import hashlib
import heapq
import operator
from dataclasses import dataclass, field
from decimal import Decimal

from hypothesis import strategies as st

from tests.unit.profile_oracle import WEEK_MS, Accepted, Advance, bucket, features_of, replay
from udfs.events import EVENT_TYPES, UserEvent
from udfs.profile_config import ProfileConfig

RETENTION_RULE = "profile_retention_expired"  # docs/definitions.md "Transitions"

# Two fake "models" for score.X conditions, scored from features only (so the engine's scorer and the
# oracle compute the same numbers from their own feature values): `fresh` falls as the user goes
# quiet (it moves only when rescored), `cartp` is missing while the cart is empty.
FAKE_MODELS = ("fresh", "cartp")


def fake_scores(read, scale_ms: int) -> dict[str, float]:
    """read(feature name) -> value."""
    out: dict[str, float] = {}
    since = read("ms_since_last_event")
    if since is not None:
        out["fresh"] = 1.0 / (1.0 + since / scale_ms)
    items = read("cart_items")
    if items:
        out["cartp"] = items / (items + 1.0)
    return out


PRODUCTS = ("p1", "p2", "p3", "p4")  # as in test_profile_properties' event generator
CATEGORIES = ("c1", "c2", "c3")


class Ambiguous(Exception):  # noqa: N818
    """A verdict that hangs on float rounding (a float within 1e-12, relative, of its threshold, or
    a near tie at the top_categories cut): the engine and this oracle sum the same terms in another
    order, so neither answer is wrong. Callers reject such examples."""


# ---------------------------------------------------------------- condition trees


@dataclass(frozen=True)
class Ref:
    feature: str
    key: str | None = None

    def text(self) -> str:
        return self.feature if self.key is None else f'{self.feature}["{self.key}"]'


@dataclass(frozen=True)
class Cmp:
    """`ref op literal` (written `literal op' ref` when literal_left)."""

    ref: Ref
    op: str
    value: float | str
    literal: str  # how the literal is written
    literal_left: bool = False

    def text(self) -> str:
        if self.literal_left:
            return f"{self.literal} {FLIP[self.op]} {self.ref.text()}"
        return f"{self.ref.text()} {self.op} {self.literal}"


@dataclass(frozen=True)
class CmpRefs:  # two step features
    left: Ref
    op: str
    right: Ref

    def text(self) -> str:
        return f"{self.left.text()} {self.op} {self.right.text()}"


@dataclass(frozen=True)
class InList:  # engagement_tier [not] in ["high", ...]
    ref: Ref
    options: tuple[str, ...]
    negated: bool

    def text(self) -> str:
        items = ", ".join(f'"{o}"' for o in self.options)
        return f"{self.ref.text()} {'not in' if self.negated else 'in'} [{items}]"


@dataclass(frozen=True)
class InTop:  # "c1" [not] in top_categories
    category: str
    negated: bool

    def text(self) -> str:
        return f'"{self.category}" {"not in" if self.negated else "in"} top_categories'


@dataclass(frozen=True)
class Missing:
    ref: Ref

    def text(self) -> str:
        return f"missing({self.ref.text()})"


@dataclass(frozen=True)
class Absent:
    event_type: str
    window_ms: int
    window: str

    def text(self) -> str:
        return f"absent({self.event_type}, {self.window})"


@dataclass(frozen=True)
class Holdout:
    experiment: str
    percent: str  # as written, without the %

    def text(self) -> str:
        return f'holdout("{self.experiment}", {self.percent}%)'


def in_control(experiment: str, percent: str, user_id: str) -> bool:
    digest = hashlib.sha256(f"flink-segments holdout v1\0{experiment}\0{user_id}".encode()).hexdigest()
    return Decimal(int(digest[:16], 16)) * 100 < Decimal(percent) * 2**64  # exact: both sides are integers


@dataclass(frozen=True)
class SegRef:
    name: str

    def text(self) -> str:
        return f"segment.{self.name}"


@dataclass(frozen=True)
class Const:
    value: bool

    def text(self) -> str:
        return "true" if self.value else "false"


@dataclass(frozen=True)
class Not:
    item: object

    def text(self) -> str:
        return f"not {_wrapped(self.item)}"


@dataclass(frozen=True)
class And:
    items: tuple

    def text(self) -> str:
        return " and ".join(_wrapped(i) for i in self.items)


@dataclass(frozen=True)
class Or:
    items: tuple

    def text(self) -> str:
        return " or ".join(_wrapped(i) for i in self.items)


def _wrapped(node) -> str:
    return f"({node.text()})" if isinstance(node, And | Or | Not) else node.text()


FLIP = {"<": ">", "<=": ">=", ">": "<", ">=": "<=", "==": "==", "!=": "!="}
OPS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge, "==": operator.eq, "!=": operator.ne}


def walk(node):
    yield node
    if isinstance(node, Not):
        yield from walk(node.item)
    elif isinstance(node, And | Or):
        for item in node.items:
            yield from walk(item)


# ---------------------------------------------------------------- definitions


@dataclass(frozen=True)
class SegDef:
    name: str
    enter: object  # the `when` condition, or `enter`
    exit: object | None  # None: a `when` segment
    dwell_ms: int = 0
    dwell: str | None = None  # as written

    @property
    def enter_rule(self) -> str:
        return self.enter.text()

    @property
    def exit_rule(self) -> str:
        return self.exit.text() if self.exit is not None else f"not ({self.enter.text()})"

    def conditions(self):
        return (self.enter,) if self.exit is None else (self.enter, self.exit)

    def arms(self, user_id: str) -> tuple[tuple[str, str], ...]:
        """(experiment, arm) of every holdout its conditions name, sorted."""
        holdouts = {(n.experiment, n.percent) for c in self.conditions() for n in walk(c) if isinstance(n, Holdout)}
        return tuple(sorted((e, "control" if in_control(e, p, user_id) else "treatment") for e, p in holdouts))


@dataclass(frozen=True)
class GroupDef:
    name: str
    members: tuple[SegDef, ...]  # priority order


@dataclass(frozen=True)
class Defs:
    version: str
    units: tuple  # SegDef | GroupDef, every referenced segment decided before its readers
    file_order: tuple[str, ...]  # segment names in the order the YAML lists them
    rescore_ms: int = 0  # rescore_every (0: scores only at events)
    rescore: str | None = None  # as written

    @property
    def segments(self) -> dict[str, SegDef]:
        out = {}
        for unit in self.units:
            for s in unit.members if isinstance(unit, GroupDef) else (unit,):
                out[s.name] = s
        return out

    @property
    def groups(self) -> tuple[GroupDef, ...]:
        return tuple(u for u in self.units if isinstance(u, GroupDef))

    def nodes(self):
        for s in self.segments.values():
            for c in s.conditions():
                yield from walk(c)

    @property
    def models(self) -> tuple[str, ...]:
        return tuple(
            sorted(
                {
                    n.ref.feature[len("score.") :]
                    for n in self.nodes()
                    if isinstance(n, Cmp | Missing) and n.ref.feature.startswith("score.")
                }
            )
        )

    def yaml(self) -> str:
        segs = self.segments
        lines = [f"version: {self.version}"]
        if self.rescore is not None:
            lines.append(f"rescore_every: {self.rescore}")
        lines.append("segments:")
        for name in self.file_order:
            s = segs[name]
            lines.append(f"  - name: {s.name}")
            if s.exit is None:
                lines.append(f"    when: {_yaml_condition(s.enter)}")
            else:
                lines.append(f"    enter: {_yaml_condition(s.enter)}")
                lines.append(f"    exit: {_yaml_condition(s.exit)}")
            if s.dwell is not None:
                lines.append(f"    min_dwell: {s.dwell}")
        if self.groups:
            lines.append("exclusive_groups:")
            for g in self.groups:
                lines.append(f"  - name: {g.name}")
                lines.append(f"    segments: [{', '.join(s.name for s in g.members)}]")
        return "\n".join(lines) + "\n"


def _yaml_condition(node) -> str:
    if isinstance(node, Const):
        return node.text()  # a YAML boolean
    return "'" + node.text().replace("'", "''") + "'"


# ---------------------------------------------------------------- the vocabulary of a config


RECENCY_FEATURES = (
    "ms_since_last_event",
    *(f"ms_since_last_{t}" for t in EVENT_TYPES),
    "ms_since_cart_activity",
    "ms_since_cart_change",
)
DURATION_FEATURES = (*RECENCY_FEATURES, "ms_since_viewed_product", "current_session_duration_ms")
DECAYING = ("engagement_score", "category_affinity")


@dataclass(frozen=True)
class Vocab:
    """What a definitions file for `config` may say, with thresholds in ranges that flip for the
    traffic of the matching event generator. Thresholds of float-valued features are chosen
    off the values the traffic can hit exactly (see `Ambiguous`)."""

    config: ProfileConfig
    durations: tuple[tuple[int, str], ...]  # (ms, as written)
    dwells: tuple[tuple[int, str], ...]
    counts: tuple[float, ...] = (0, 1, 2, 3, 4, 1.5)
    money: tuple[float, ...] = (0.005, 5.005, 50.005, 150.0037, 300.005)
    engagement: tuple[float, ...] = (1.37, 3.71, 7.31, 12.9, 19.3, 31.7)
    affinity: tuple[float, ...] = (0.37, 1.31, 2.7, 4.3)
    session_counts: tuple[float, ...] = (0, 1, 2, 3, 5)
    score_scale_ms: int = 0  # 0: no score.X conditions; else the `fresh` model's time scale
    scores: tuple[float, ...] = (0.21, 0.37, 0.55, 0.62, 0.81)
    rescores: tuple[tuple[int, str], ...] = ()  # rescore_every choices
    holdouts: tuple[tuple[str, str], ...] = ()  # (experiment, percent as written): one share per name
    dwell_percent: int = 40  # how often a segment gets a min_dwell

    @property
    def horizons(self) -> tuple[str, ...]:
        return tuple(h.name for h in self.config.horizons)


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


# ---------------------------------------------------------------- the strategy

CMP_OPS = ("<", "<=", ">", ">=", "==", "!=")
ORDER_OPS = ("<", "<=", ">", ">=")
# Mostly comparisons that hold until the view leaves every horizon (then the value is missing).
VIEWED_OPS = (">", ">=", "!=", ">", ">=", "<", "<=", "==")


@st.composite
def _duration_literal(draw, vocab: Vocab) -> tuple[float, str]:
    ms, written = draw(st.sampled_from(vocab.durations))
    form = draw(st.sampled_from(("unit", "unit", "unit", "ms", "half")))
    if form == "ms":
        return float(ms), str(ms)  # a plain number against a duration is milliseconds
    if form == "half":
        return ms - 0.5, repr(ms - 0.5)
    return float(ms), written


@st.composite
def _cmp(draw, ref: Ref, values, ops=CMP_OPS, duration: bool = False) -> Cmp:
    op = draw(st.sampled_from(ops))
    if duration:
        value, literal = draw(_duration_literal(values))
    else:
        value = draw(st.sampled_from(values))
        literal = _fmt(value)
    return Cmp(ref, op, float(value), literal, draw(st.booleans()))


def _count_features(vocab: Vocab) -> list[str]:
    out = []
    for h in vocab.horizons:
        out += [
            f"events_{h}",
            f"sessions_{h}",
            f"distinct_products_viewed_{h}",
            f"distinct_categories_viewed_{h}",
            f"orders_{h}",
        ]
        out += [f"count_{t}_{h}" for t in EVENT_TYPES]
    return out


def _step_numbers(vocab: Vocab) -> list[Ref]:
    refs = [Ref(f) for f in _count_features(vocab)]
    refs += [
        Ref(f)
        for f in (
            "cart_items",
            "cart_lines",
            "checkout_pending",
            "lifetime_orders",
            "in_session",
            "sessions_per_week",
            "current_session_events",
        )
    ]
    refs += [Ref("cart_quantity", p) for p in PRODUCTS]
    refs += [Ref(f"category_views_{h}", c) for h in vocab.horizons for c in CATEGORIES]
    return refs


@st.composite
def atom(draw, vocab: Vocab, refs: tuple[str, ...]):
    kinds = ["recency"] * 4 + ["viewed"] * 3 + ["viewed2"] * 2 + ["count"] * 3 + ["engagement"] * 3 + ["tier"] * 3
    kinds += [
        "absent",
        "absent",
        "catviews",
        "money",
        "cart",
        "cart",
        "session",
        "session",
        "affinity",
        "top",
        "top",
        "missing",
        "missing",
        "refs",
        "const",
    ]
    if refs:
        kinds += ["segment"] * 4
    if vocab.score_scale_ms:
        kinds += ["score"] * 4
    if vocab.holdouts:
        kinds += ["holdout"] * 3
    kind = draw(st.sampled_from(kinds))
    horizons = vocab.horizons
    if kind == "recency":
        return draw(_cmp(Ref(draw(st.sampled_from(RECENCY_FEATURES))), vocab, duration=True))
    if kind == "viewed":  # p1 and p2 mostly, so one file often reads two keys of the map
        product = draw(st.sampled_from(("p1", "p2", "p1", "p2", "p3")))
        return draw(_cmp(Ref("ms_since_viewed_product", product), vocab, VIEWED_OPS, duration=True))
    if kind == "viewed2":  # two keys in one condition, each with its own lapse
        a, b = (draw(_cmp(Ref("ms_since_viewed_product", p), vocab, VIEWED_OPS, duration=True)) for p in ("p1", "p2"))
        return Or((a, b)) if draw(st.booleans()) else And((a, Not(b)))
    if kind == "score":
        model = draw(st.sampled_from(("fresh", "fresh", "cartp")))
        if draw(st.integers(0, 3)) == 0:
            return Missing(Ref(f"score.{model}"))
        return draw(_cmp(Ref(f"score.{model}"), vocab.scores, ORDER_OPS))
    if kind == "absent":
        ms, written = draw(st.sampled_from(vocab.durations))
        return Absent(draw(st.sampled_from(EVENT_TYPES)), ms, written)
    if kind == "count":
        # Half the time a count the traffic fills quickly (any event, page or product views).
        h = draw(st.sampled_from(horizons))
        common = [
            f"events_{h}",
            f"sessions_{h}",
            f"count_page_view_{h}",
            f"count_product_view_{h}",
            f"distinct_products_viewed_{h}",
        ]
        name = draw(st.sampled_from(common)) if draw(st.booleans()) else draw(st.sampled_from(_count_features(vocab)))
        return draw(_cmp(Ref(name), vocab.counts))
    if kind == "catviews":
        ref = Ref(f"category_views_{draw(st.sampled_from(horizons))}", draw(st.sampled_from(CATEGORIES)))
        return draw(_cmp(ref, vocab.counts))
    if kind == "money":
        names = [f"spend_{h}" for h in horizons] + [f"aov_{h}" for h in horizons]
        names += ["lifetime_spend", "lifetime_aov", "cart_value"]
        return draw(_cmp(Ref(draw(st.sampled_from(names))), vocab.money))
    if kind == "cart":
        ref = draw(
            st.sampled_from(
                [
                    Ref("cart_items"),
                    Ref("cart_lines"),
                    Ref("checkout_pending"),
                    Ref("lifetime_orders"),
                    *(Ref("cart_quantity", p) for p in PRODUCTS),
                ]
            )
        )
        return draw(_cmp(ref, vocab.counts))
    if kind == "session":
        which = draw(
            st.sampled_from(
                ("in_session", "sessions_per_week", "current_session_events", "current_session_duration_ms")
            )
        )
        if which == "current_session_duration_ms":
            return draw(_cmp(Ref(which), vocab, duration=True))
        if which == "in_session":
            return draw(_cmp(Ref(which), (0, 1, 0.5)))
        return draw(_cmp(Ref(which), vocab.session_counts))
    if kind == "engagement":
        return draw(_cmp(Ref("engagement_score"), vocab.engagement, ORDER_OPS))
    if kind == "affinity":
        return draw(_cmp(Ref("category_affinity", draw(st.sampled_from(CATEGORIES))), vocab.affinity, ORDER_OPS))
    if kind == "tier":
        if draw(st.booleans()):
            value = draw(st.sampled_from(("high", "medium", "low")))
            return Cmp(
                Ref("engagement_tier"), draw(st.sampled_from(("==", "!="))), value, f'"{value}"', draw(st.booleans())
            )
        options = tuple(draw(st.lists(st.sampled_from(("high", "medium", "low")), min_size=1, max_size=2, unique=True)))
        return InList(Ref("engagement_tier"), options, draw(st.booleans()))
    if kind == "top":
        return InTop(draw(st.sampled_from(CATEGORIES)), draw(st.booleans()))
    if kind == "missing":
        refs_ = [Ref(f) for f in RECENCY_FEATURES[:4]] + [Ref("ms_since_cart_activity")]
        refs_ += [Ref(f"aov_{h}") for h in horizons] + [
            Ref("lifetime_aov"),
            Ref("current_session_events"),
            Ref("current_session_duration_ms"),
        ]
        refs_ += [Ref("ms_since_viewed_product", p) for p in ("p1", "p2", "p1", "p2", "p3")]
        return Missing(draw(st.sampled_from(refs_)))
    if kind == "refs":
        pool = _step_numbers(vocab)
        left = draw(st.sampled_from(pool))
        right = draw(st.sampled_from([r for r in pool if r != left]))
        return CmpRefs(left, draw(st.sampled_from(CMP_OPS)), right)
    if kind == "segment":
        return SegRef(draw(st.sampled_from(refs)))
    if kind == "holdout":
        return Holdout(*draw(st.sampled_from(vocab.holdouts)))
    return Const(draw(st.booleans()))


@st.composite
def condition(draw, vocab: Vocab, refs: tuple[str, ...], depth: int = 2):
    shape = draw(st.integers(0, 9)) if depth > 0 else 0
    if shape < 6:
        return draw(atom(vocab, refs))
    if shape == 6:
        return Not(draw(condition(vocab, refs, depth - 1)))
    items = tuple(draw(st.lists(condition(vocab, refs, depth - 1), min_size=2, max_size=3 if depth > 1 else 2)))
    return And(items) if shape < 8 else Or(items)


def _threshold_families(vocab: Vocab):
    """(refs, sorted thresholds, is_duration) for the single-threshold hysteresis form."""
    count_refs = [Ref(f) for f in _count_features(vocab)] + [Ref("cart_items"), Ref("sessions_per_week")]
    count_refs += [Ref(f"category_views_{h}", c) for h in vocab.horizons for c in CATEGORIES]
    scores = [([Ref(f"score.{m}") for m in FAKE_MODELS], sorted(vocab.scores), False)] if vocab.score_scale_ms else []
    return scores + [
        ([Ref("engagement_score")], sorted(vocab.engagement), False),
        ([Ref("category_affinity", c) for c in CATEGORIES], sorted(vocab.affinity), False),
        (
            [Ref(f) for f in RECENCY_FEATURES[:1] + RECENCY_FEATURES[-2:]]
            + [Ref("ms_since_viewed_product", p) for p in PRODUCTS[:2]],
            sorted(vocab.durations),
            True,
        ),
        (count_refs, sorted(set(vocab.counts)), False),
        ([Ref(f"spend_{h}") for h in vocab.horizons] + [Ref("cart_value")], sorted(vocab.money), False),
    ]


@st.composite
def hysteresis(draw, vocab: Vocab, refs: tuple[str, ...]):
    """(enter, exit): mostly pairs that can never both hold (the usual hysteresis), and one in
    five any two conditions, which can both hold (then entry wins while enter holds), except the
    single-threshold form on one value that the validator refuses."""
    shape = draw(st.integers(0, 4))
    if shape == 0:
        enter, leave = draw(condition(vocab, refs, 1)), draw(condition(vocab, refs, 1))
        if isinstance(enter, Cmp) and isinstance(leave, Cmp) and enter.ref == leave.ref:
            leave = Or((leave, Const(False)))  # not the refused form, and the same exit
        return enter, leave
    if shape == 1:
        a = draw(condition(vocab, refs, 1))
        x = draw(st.none() | condition(vocab, refs, 1))
        y = draw(st.none() | condition(vocab, refs, 1))
        enter = a if x is None else And((a, x))
        leave = Not(a) if y is None else And((Not(a), y))
        return enter, leave
    family_refs, thresholds, is_duration = draw(st.sampled_from(_threshold_families(vocab)))
    ref = draw(st.sampled_from(family_refs))
    i, j = sorted(draw(st.lists(st.integers(0, len(thresholds) - 1), min_size=2, max_size=2)))
    lo, hi = thresholds[i], thresholds[j]
    up = draw(st.booleans()) if not is_duration else draw(st.integers(0, 3)) == 0
    # up: enter above `hi`, leave below `lo`; down: enter below `lo`, leave above `hi`.
    enter_op = draw(st.sampled_from((">", ">="))) if up else draw(st.sampled_from(("<", "<=")))
    exit_op = draw(st.sampled_from(("<", "<="))) if up else draw(st.sampled_from((">", ">=")))
    if i == j and enter_op in (">=", "<=") and exit_op in (">=", "<="):
        exit_op = exit_op[0]  # equal thresholds: at most one side inclusive

    def lit(value):
        if is_duration:
            ms, written = value
            return float(ms), written
        return float(value), _fmt(value)

    enter_value, leave_value = (hi, lo) if up else (lo, hi)
    ev, et = lit(enter_value)
    xv, xt = lit(leave_value)
    return (Cmp(ref, enter_op, ev, et, draw(st.booleans())), Cmp(ref, exit_op, xv, xt, draw(st.booleans())))


@st.composite
def segment_def(draw, vocab: Vocab, name: str, refs: tuple[str, ...], allow_true: bool = False) -> SegDef:
    if allow_true and draw(st.integers(0, 2)) == 0:
        enter, leave = Const(True), None
    elif draw(st.integers(0, 4)) < 3:
        enter, leave = draw(condition(vocab, refs)), None
    else:
        enter, leave = draw(hysteresis(vocab, refs))
    dwell = draw(st.sampled_from(vocab.dwells)) if draw(st.integers(0, 99)) < vocab.dwell_percent else None
    if dwell is None:
        return SegDef(name, enter, leave)
    return SegDef(name, enter, leave, dwell[0], dwell[1])


@st.composite
def definitions(draw, vocab: Vocab, max_units: int = 4) -> Defs:
    """Segments s0, s1, ... where each refers only to earlier ones (never to its own group), some
    of them in exclusive groups of 2-3 consecutive segments; listed in the YAML in random order."""
    units = []
    names: list[str] = []
    for _ in range(draw(st.integers(1, max_units))):
        before = tuple(names)
        if draw(st.integers(0, 2)) == 0:
            size = draw(st.integers(2, 3))
            members = []
            for k in range(size):
                name = f"s{len(names)}"
                names.append(name)
                members.append(draw(segment_def(vocab, name, before, allow_true=k == size - 1)))
            units.append(GroupDef(f"g{sum(isinstance(u, GroupDef) for u in units)}", tuple(members)))
        else:
            name = f"s{len(names)}"
            names.append(name)
            units.append(draw(segment_def(vocab, name, before)))
    order = tuple(draw(st.permutations(names)))
    defs = Defs("prop-1", tuple(units), order)
    if defs.models and vocab.rescores and draw(st.integers(0, 3)):
        ms, written = draw(st.sampled_from(vocab.rescores))
        defs = Defs(defs.version, defs.units, defs.file_order, ms, written)
    return defs


# ---------------------------------------------------------------- evaluation at one instant


def _near(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-12 * max(1.0, abs(a), abs(b))


class Instant:
    """The features at one instant and the memberships decided so far there."""

    def __init__(self, features: dict, config: ProfileConfig, scores: dict[str, float] | None = None, user_id=""):
        self.f = features
        self.user_id = user_id
        self.config = config
        self.scores = scores or {}
        self.members: dict[str, bool] = {}

    def read(self, ref: Ref):
        if ref.feature.startswith("score."):
            return self.scores.get(ref.feature[len("score.") :])  # a model that did not score: missing
        value = self.f[ref.feature]
        if ref.key is None:
            if ref.feature == "engagement_tier" and self.config.tier_basis == "engagement_score":
                basis = self.f["engagement_score"]
                if _near(basis, self.config.tier_high_above) or _near(basis, self.config.tier_medium_above):
                    raise Ambiguous(f"engagement_score {basis!r} at a tier threshold")
            return value
        # docs/features.md: a key a map does not hold reads 0 (counts, affinity, quantities) or missing
        # (ms_since_viewed_product).
        return value.get(ref.key, None if ref.feature == "ms_since_viewed_product" else 0)

    def holds(self, node) -> bool:
        if isinstance(node, Cmp):
            a = self.read(node.ref)
            if a is None:
                return False  # a comparison reading a missing value is false
            if isinstance(a, float) and not isinstance(node.value, str) and _near(a, node.value):
                raise Ambiguous(f"{node.ref.text()} = {a!r} at its threshold {node.value!r}")
            return OPS[node.op](a, node.value)
        if isinstance(node, CmpRefs):
            a, b = self.read(node.left), self.read(node.right)
            return a is not None and b is not None and OPS[node.op](a, b)
        if isinstance(node, InList):
            value = self.read(node.ref)
            return value is not None and (value in node.options) != node.negated
        if isinstance(node, InTop):
            self._check_top_tie(node.category)
            return (node.category in self.f["top_categories"]) != node.negated
        if isinstance(node, Missing):
            return self.read(node.ref) is None
        if isinstance(node, Absent):
            since = self.f[f"ms_since_last_{node.event_type}"]
            return not (since is not None and since < node.window_ms)
        if isinstance(node, SegRef):
            return self.members[node.name]
        if isinstance(node, Holdout):
            return in_control(node.experiment, node.percent, self.user_id)
        if isinstance(node, Const):
            return node.value
        if isinstance(node, Not):
            return not self.holds(node.item)
        if isinstance(node, And):
            return all(self.holds(i) for i in node.items)
        if isinstance(node, Or):
            return any(self.holds(i) for i in node.items)
        raise TypeError(node)

    def _check_top_tie(self, category: str) -> None:
        affinity = self.f["category_affinity"]
        k = self.config.affinity_top_k
        values = sorted(affinity.values(), reverse=True)
        if len(values) <= k or category not in affinity:
            return
        cut_in, cut_out = values[k - 1], values[k]
        if _near(cut_in, cut_out) and (_near(affinity[category], cut_in) or _near(affinity[category], cut_out)):
            raise Ambiguous(f"{category} ties at the top_categories cut: {affinity!r}")


@dataclass
class MState:
    member: bool
    since: int
    sequence: int


def decide(defs: Defs, at: Instant, now: int, memberships: dict[str, MState]) -> dict[str, tuple[bool, str]]:
    """The membership rules of docs/definitions.md at one instant: segment name -> (member, rule) for every
    segment whose membership changes."""
    changes: dict[str, tuple[bool, str]] = {}

    def was(s: SegDef) -> MState | None:
        m = memberships.get(s.name)
        return m if m is not None and m.member else None

    def leaves(s: SegDef) -> bool:
        # `when: A`: A no longer holds. `enter: A, exit: B`: B holds and A does not (entry wins
        # while A holds: a pair that can both hold is one stay, not a flap).
        if s.exit is None:
            return not at.holds(s.enter)
        return at.holds(s.exit) and not at.holds(s.enter)

    for unit in defs.units:
        if isinstance(unit, SegDef):
            current = was(unit)
            if current is None:
                if at.holds(unit.enter):
                    changes[unit.name] = (True, unit.enter_rule)
            elif now >= current.since + unit.dwell_ms:
                if leaves(unit):
                    changes[unit.name] = (False, unit.exit_rule)
            at.members[unit.name] = (unit.name in changes) != (current is not None)
            continue
        members = unit.members
        current = next((s for s in members if was(s) is not None), None)
        frozen = current is not None and now < was(current).since + current.dwell_ms
        if not frozen:
            current_leaves = current is not None and leaves(current)
            winner = None
            for s in members:  # the first listed that holds; the current member holds while it stays
                if (not current_leaves) if s is current else at.holds(s.enter):
                    winner = s
                    break
            if winner is not current:
                if current is not None:
                    rule = (
                        current.exit_rule
                        if current_leaves
                        else (f"exclusive group {unit.name}: {winner.name} took precedence ({winner.enter_rule})")
                    )
                    changes[current.name] = (False, rule)
                if winner is not None:
                    changes[winner.name] = (True, winner.enter_rule)
        for s in members:
            at.members[s.name] = (s.name in changes) != (was(s) is not None)
    return changes


# ---------------------------------------------------------------- the timeline of each user


@dataclass(frozen=True)
class OTransition:
    user_id: str
    segment: str
    kind: str
    event_time: int
    cause: str
    cause_event_id: str | None
    sequence: int
    rule: str
    arms: tuple[tuple[str, str], ...] = ()  # (experiment, arm), sorted


@dataclass
class _User:
    steps: list = field(default_factory=list)  # this user's steps, for profile_oracle.replay
    clock: int | None = None
    life: list[Accepted] = field(default_factory=list)  # accepted events of the current lifetime
    duplicates: int = 0
    resets: int = 0
    memberships: dict[str, MState] = field(default_factory=dict)
    sequence_base: int = 0
    scores: dict[str, float] = field(default_factory=dict)
    scored_at: int | None = None


class DefinitionsOracle:
    def __init__(self, defs: Defs, config: ProfileConfig, score_scale_ms: int = 0):
        self.defs = defs
        self.config = config
        # Scores (when the definitions read any): computed at every accepted event, and with
        # rescore_every also that long after the latest scoring while no event comes.
        self.score_scale_ms = score_scale_ms if defs.models else 0
        assert score_scale_ms or not defs.models, "the definitions read scores: give score_scale_ms"
        self.rescore_ms = defs.rescore_ms if self.score_scale_ms else 0
        self.users: dict[str, _User] = {}
        self.out: list[OTransition] = []
        self.evaluations = 0
        offsets: set[int] = {config.session_gap_ms, WEEK_MS, *(h.length_ms for h in config.horizons)}
        decaying: set[tuple[str, str | None, float]] = set()
        reads_tier = False
        for node in defs.nodes():
            if isinstance(node, Cmp) and node.ref.feature in DURATION_FEATURES:
                offsets |= {int(node.value // 1), -int(-node.value // 1)}  # floor, ceil
            elif isinstance(node, Absent):
                offsets.add(node.window_ms)
            if isinstance(node, Cmp) and node.ref.feature in DECAYING:
                decaying.add((node.ref.feature, node.ref.key, float(node.value)))
            if isinstance(node, Cmp | InList) and node.ref.feature == "engagement_tier":
                reads_tier = True
        if reads_tier and config.tier_basis == "engagement_score":
            decaying |= {
                ("engagement_score", None, config.tier_high_above),
                ("engagement_score", None, config.tier_medium_above),
            }
        self.offsets = sorted(offsets)
        self.decaying = sorted(decaying, key=repr)

    # -- driving ---------------------------------------------------------------------------------

    def run(self, steps, until_ms: int | None) -> list[OTransition]:
        """steps: UserEvent or Advance (every user seen so far advances, as their timers fire), in
        arrival order; then every user advances to until_ms."""
        for step in steps:
            if isinstance(step, Advance):
                for user_id, user in self.users.items():
                    self._advance(user_id, user, step)
            else:
                user = self.users.setdefault(step.user_id, _User())
                self._event(step.user_id, user, step)
        if until_ms is not None:
            for user_id, user in self.users.items():
                self._advance(user_id, user, Advance(until_ms))
        return self.out

    def _replay(self, user: _User, step) -> tuple[bool, bool, list[Accepted]]:
        """The profile oracle's dedup and retention over the user's steps so far: whether the new
        step is a duplicate, whether it dropped the lifetime, and the lifetime's events after it."""
        user.steps.append(step)
        r = replay(user.steps, self.config)
        duplicate, reset = r.duplicates > user.duplicates, r.resets > user.resets
        user.duplicates, user.resets = r.duplicates, r.resets
        return duplicate, reset, r.accepted

    def _advance(self, user_id: str, user: _User, step: Advance) -> None:
        _, reset, life = self._replay(user, step)
        expired = self._pass_time(user_id, user, step.time_ms, True)
        assert expired == reset, "oracle: retention expiry disagrees with profile_oracle.replay"
        user.life = life

    def _event(self, user_id: str, user: _User, event: UserEvent) -> None:
        duplicate, reset, life = self._replay(user, event)
        if duplicate:
            return  # changes nothing, not even the clock
        expired = False
        if user.clock is not None:
            expired = self._pass_time(user_id, user, event.timestamp, inclusive=False)
        assert expired == reset, "oracle: retention expiry disagrees with profile_oracle.replay"
        if not user.life:
            user.sequence_base = (
                1000 * event.timestamp
            )  # docs/features.md: a lifetime starts at 1000 x its first event time
        user.life = life
        user.clock = event.timestamp if user.clock is None else max(user.clock, event.timestamp)
        features = features_of(user.life, self.config, user.clock)
        if self.score_scale_ms:
            self._score(user, features, user.clock)
        self._evaluate(user_id, user, user.clock, "EVENT", event.event_id, features)

    def _score(self, user: _User, features: dict, now: int) -> None:
        user.scores = fake_scores(features.get, self.score_scale_ms)
        user.scored_at = now

    # -- time passing ----------------------------------------------------------------------------

    def _pass_time(self, user_id: str, user: _User, target: int, inclusive: bool) -> bool:
        """Evaluates at every candidate instant in (clock, target] (or (clock, target) when not
        inclusive); drops the profile if last_event + retention <= target. True if dropped."""
        if user.clock is None or target <= user.clock:
            return False
        if not user.life:
            user.clock = target
            return False
        expiry = max(a.t for a in user.life) + self.config.retention_ms
        last = min(target if inclusive else target - 1, expiry - 1)
        lo = user.clock
        pending = sorted(self._candidates(user, lo, last))
        heapq.heapify(pending)
        done = set()
        while pending:
            t = heapq.heappop(pending)
            if t in done:
                continue
            done.add(t)
            features = features_of(user.life, self.config, t)
            follow = []
            if self.rescore_ms and t == user.scored_at + self.rescore_ms:
                self._score(user, features, t)
                follow.append(t + self.rescore_ms)
            entered = self._evaluate(user_id, user, t, "TIMER", None, features)
            follow += [t + self.defs.segments[name].dwell_ms for name in entered]  # a running min_dwell ends
            for end in follow:
                for x in (end - 1, end, end + 1):
                    if t < x <= last:
                        heapq.heappush(pending, x)
        expired = expiry <= target
        if expired:
            for name in sorted(n for n, m in user.memberships.items() if m.member):
                self.out.append(
                    OTransition(
                        user_id,
                        name,
                        "EXIT",
                        expiry,
                        "TIMER",
                        None,
                        user.memberships[name].sequence + 1,
                        RETENTION_RULE,
                        self.defs.segments[name].arms(user_id),
                    )
                )
            user.memberships = {}
            user.life = []
            user.scores, user.scored_at = {}, None
        user.clock = target
        return expired

    def _candidates(self, user: _User, lo: int, hi: int) -> set[int]:
        out: set[int] = set()
        if hi <= lo:
            return out

        def add(x: int) -> None:
            for y in (x - 1, x, x + 1):
                if lo < y <= hi:
                    out.add(y)

        for a in user.life:
            for o in self.offsets:
                add(a.t + o)
            for h in self.config.horizons:
                add(bucket(a.t, h.bucket_ms) + h.length_ms)  # leaves the horizon at this boundary
        for name, m in user.memberships.items():
            if m.member:
                add(m.since + self.defs.segments[name].dwell_ms)
        if self.rescore_ms and user.scored_at is not None:
            add(user.scored_at + self.rescore_ms)
        for feature, key, threshold in self.decaying:
            for strict in (True, False):
                x = self._decay_crossing(user.life, feature, key, threshold, strict, lo, hi)
                if x is not None:
                    add(x)
        return out

    def _decayed(self, life: list[Accepted], feature: str, key: str | None, now: int) -> float:
        """The same sum, in the same order, as profile_oracle.features_of."""
        c = self.config
        if feature == "engagement_score":
            return sum(
                c.engagement_weights.get(a.event.event_type, 0.0)
                * 2.0 ** (-(now - a.event.timestamp) / c.engagement_half_life_ms)
                for a in life
                if a.t <= now
            )
        total = 0.0
        for a in life:
            e = a.event
            w = c.affinity_weights.get(e.event_type, 0.0)
            if a.t <= now and e.category == key and w > 0:
                total = total + w * 2.0 ** (-(now - e.timestamp) / c.affinity_half_life_ms)
        return total

    def _decay_crossing(self, life, feature, key, threshold, strict, lo, hi) -> int | None:
        """The first instant in (lo, hi] at which the value is below (strict) or at most the
        threshold, by bisection (no event in between: the value only falls)."""

        def crossed(t: int) -> bool:
            v = self._decayed(life, feature, key, t)
            return v < threshold if strict else v <= threshold

        if not crossed(hi):
            return None
        a, b = lo + 1, hi
        if crossed(a):
            return a
        while b - a > 1:  # crossed(b) and not crossed(a)
            mid = (a + b) // 2
            if crossed(mid):
                b = mid
            else:
                a = mid
        return b

    # -- one evaluation --------------------------------------------------------------------------

    def _evaluate(
        self, user_id: str, user: _User, now: int, cause: str, event_id: str | None, features: dict
    ) -> list[str]:
        """Decides every segment at `now`, emits the changes (exits first), returns the entered."""
        self.evaluations += 1
        at = Instant(features, self.config, user.scores, user_id)
        changes = decide(self.defs, at, now, user.memberships)
        entered = []
        for name, (member, rule) in sorted(changes.items(), key=lambda e: (e[1][0], e[0])):
            previous = user.memberships.get(name)
            sequence = (previous.sequence if previous is not None else user.sequence_base) + 1
            user.memberships[name] = MState(member, now, sequence)
            self.out.append(
                OTransition(
                    user_id,
                    name,
                    "ENTER" if member else "EXIT",
                    now,
                    cause,
                    event_id,
                    sequence,
                    rule,
                    self.defs.segments[name].arms(user_id),
                )
            )
            if member:
                entered.append(name)
        return entered


def expected_transitions(
    defs: Defs, config: ProfileConfig, steps, until_ms: int | None, score_scale_ms: int = 0
) -> list[OTransition]:
    return DefinitionsOracle(defs, config, score_scale_ms).run(steps, until_ms)
