"""The condition language of segment definitions: a tokenizer, a recursive-descent parser into a
closed set of node types, and a compiler from nodes to closures.

Safe by construction: the text is never handed to Python (no eval, exec, format templates or
attribute lookup); a name can only resolve to a feature of the catalog, a model score or another
segment, and everything else is a syntax or type error naming the column. docs/definitions.md is the
user's reference for the grammar.

    condition  := or
    or         := and ("or" and)*
    and        := not ("and" not)*
    not        := "not" not | comparison
    comparison := operand [("<" | "<=" | ">" | ">=" | "==" | "!=") operand
                          | ["not"] "in" (list | operand)]
    operand    := NUMBER | DURATION | STRING | "true" | "false" | "-" NUMBER | "(" or ")"
                | "missing" "(" reference ")" | "absent" "(" EVENT_TYPE "," DURATION ")"
                | "holdout" "(" STRING "," PERCENT ")" | reference
    reference  := FEATURE ["[" STRING "]"] | "score" "." MODEL | "segment" "." SEGMENT
    list       := "[" literal ("," literal)* "]"

A comparison involving a missing value (no such event yet, a key not held, a model that did not
score) is false, so `not (ms_since_last_purchase < 7d)` holds for someone who never purchased;
`absent(purchase, 7d)` is that, spelled out. `holdout("spring_promo", 10%)` holds for the user
ids in the experiment's control arm (udfs/experiments.py).
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from udfs.events import EVENT_TYPES
from udfs.experiments import EXPERIMENT_NAME, control_places, place
from udfs.features import DECAY, DURATION, MAP, NUMBER, RECENCY, STEP, TEXT, TEXT_LIST, FeatureCatalog, FeatureSpec
from udfs.profile import UserProfile
from udfs.profile_config import DURATION_UNITS

MAX_CONDITION_CHARS = 4_000
MAX_DEPTH = 40  # nesting of parentheses and `not`; keeps the recursive parser far from Python's limit
MAX_DURATION_MS = 100 * 365 * 86_400_000
MAX_STEPS = 10_000  # when searching the exact millisecond a decaying value crosses a threshold
BOOL = "boolean"
KEYWORDS = {"and", "or", "not", "in", "true", "false", "missing", "absent", "holdout", "score", "segment"}


class ConditionError(ValueError):
    """A condition that cannot be parsed or compiled; `column` is 1-based within the text."""

    def __init__(self, message: str, column: int | None = None):
        super().__init__(message)
        self.message = message
        self.column = column


# -- tokens --------------------------------------------------------------------------------------

_TOKEN = re.compile(
    r"""(?P<space>\s+)
      | (?P<number>\d+(?:\.\d+)?)(?P<unit>ms|s|m|h|d|w|%)?(?![A-Za-z0-9_.])
      | (?P<string>"[^"\\\n]*"|'[^'\\\n]*')
      | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
      | (?P<op><=|>=|==|!=|<|>|\(|\)|\[|\]|,|\.|-)
    """,
    re.VERBOSE,
)


@dataclass(frozen=True, slots=True)
class Token:
    """A token of a condition's text, with the column it starts at for error messages."""

    kind: str  # number | duration | percent | string | name | op | end
    text: str
    column: int
    value: Any = None


def tokenize(text: str) -> list[Token]:
    """The condition's tokens, ending with an `end` token; a `ConditionError` naming the column otherwise."""
    if len(text) > MAX_CONDITION_CHARS:
        raise ConditionError(f"condition longer than {MAX_CONDITION_CHARS} characters")
    tokens: list[Token] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            word = re.match(r"[^\s()\[\],]+", text[pos:])
            shown = word.group(0)[:40] if word else text[pos]
            hint = " (durations: 500ms, 30s, 10m, 1h, 7d, 2w)" if text[pos].isdigit() else ""
            raise ConditionError(f"unexpected {shown!r}{hint}", pos + 1)
        column = pos + 1
        pos = m.end()
        if m.group("space"):
            continue
        if m.group("number") is not None:
            number = float(m.group("number"))
            if m.group("unit") == "%":
                # Exact (a Fraction of the digits as written), so that 12.5% is exactly one eighth.
                tokens.append(Token("percent", m.group(0), column, Fraction(m.group("number")) / 100))
            elif m.group("unit"):
                tokens.append(Token("duration", m.group(0), column, number * DURATION_UNITS[m.group("unit")]))
            else:
                tokens.append(Token("number", m.group(0), column, number))
        elif m.group("string") is not None:
            tokens.append(Token("string", m.group(0), column, m.group("string")[1:-1]))
        elif m.group("name") is not None:
            tokens.append(Token("name", m.group(0), column))
        else:
            tokens.append(Token("op", m.group(0), column))
    tokens.append(Token("end", "", len(text) + 1))
    return tokens


# -- nodes: the closed set -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Literal:
    """A number, duration, text or boolean written in the condition."""

    value: Any  # float (number or duration in ms), str, or bool
    kind: str  # NUMBER | DURATION | TEXT | BOOL
    column: int


@dataclass(frozen=True, slots=True)
class FeatureRef:
    """A profile feature by name, with the key of a map feature (`category_views_30d["shoes"]` reads one)."""

    name: str
    key: str | None
    column: int


@dataclass(frozen=True, slots=True)
class ScoreRef:
    """A model's score by the model's name (`score.churn_risk`)."""

    model: str
    column: int


@dataclass(frozen=True, slots=True)
class SegmentRef:
    """Another segment's membership (`segment.name`), decided before this one."""

    segment: str
    column: int


@dataclass(frozen=True, slots=True)
class Compare:
    """A comparison of two operands (`<`, `<=`, `>`, `>=`, `==`, `!=`)."""

    op: str
    left: Any
    right: Any
    column: int


@dataclass(frozen=True, slots=True)
class InCondition:  # `x in [...]`, `"shoes" in top_categories` (not udfs.profile.Membership)
    """Membership of a value in a list of literals or in a text-list feature, or its negation."""

    item: Any
    options: Any  # a tuple of Literal, or a FeatureRef to a text list
    negated: bool
    column: int


@dataclass(frozen=True, slots=True)
class Missing:
    """True when a feature or score has no value (`missing(reference)`)."""

    ref: FeatureRef | ScoreRef
    column: int


@dataclass(frozen=True, slots=True)
class Absent:
    """True when no event of the type came within the window (`absent(event_type, duration)`)."""

    event_type: str
    window_ms: int
    column: int


@dataclass(frozen=True, slots=True)
class Holdout:
    """True for the users in an experiment's control arm (`holdout("name", 10%)`)."""

    experiment: str
    share: Fraction  # of users held out, in (0, 1)
    column: int


@dataclass(frozen=True, slots=True)
class And:
    """The conjunction of its items."""

    items: tuple


@dataclass(frozen=True, slots=True)
class Or:
    """The disjunction of its items."""

    items: tuple


@dataclass(frozen=True, slots=True)
class Not:
    """The negation of its item."""

    item: Any
    column: int


class _Parser:
    def __init__(self, text: str):
        self.tokens = tokenize(text)
        self.i = 0
        self.depth = 0

    @property
    def peek(self) -> Token:
        return self.tokens[self.i]

    def take(self) -> Token:
        token = self.tokens[self.i]
        self.i += 1
        return token

    def at(self, *texts: str) -> bool:
        token = self.peek
        return token.kind in ("op", "name") and token.text in texts

    def expect(self, text: str) -> Token:
        if not self.at(text):
            raise ConditionError(f"expected {text!r}, found {self._shown(self.peek)}", self.peek.column)
        return self.take()

    @staticmethod
    def _shown(token: Token) -> str:
        return "the end of the condition" if token.kind == "end" else repr(token.text)

    def nest(self, column: int) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise ConditionError(f"nested more than {MAX_DEPTH} levels deep", column)

    def parse(self):
        node = self.or_()
        if self.peek.kind != "end":
            raise ConditionError(
                f"unexpected {self._shown(self.peek)} (expected 'and', 'or' or the end)", self.peek.column
            )
        return node

    def or_(self):
        items = [self.and_()]
        while self.at("or"):
            self.take()
            items.append(self.and_())
        return items[0] if len(items) == 1 else Or(tuple(items))

    def and_(self):
        items = [self.not_()]
        while self.at("and"):
            self.take()
            items.append(self.not_())
        return items[0] if len(items) == 1 else And(tuple(items))

    def not_(self):
        if self.at("not"):
            column = self.take().column
            self.nest(column)
            node = Not(self.not_(), column)
            self.depth -= 1
            return node
        return self.comparison()

    def comparison(self):
        left = self.operand()
        if self.at("<", "<=", ">", ">=", "==", "!="):
            op = self.take()
            return Compare(op.text, left, self.operand(), op.column)
        negated = False
        if self.at("not") and self.tokens[self.i + 1].text == "in":
            self.take()
            negated = True
        if self.at("in"):
            column = self.take().column
            if self.at("["):
                return InCondition(left, self.literal_list(), negated, column)
            return InCondition(left, self.operand(), negated, column)
        return left

    def literal_list(self) -> tuple:
        self.expect("[")
        items = [self.literal()]
        while self.at(","):
            self.take()
            items.append(self.literal())
        self.expect("]")
        return tuple(items)

    def literal(self) -> Literal:
        token = self.peek
        if token.kind == "percent":
            raise ConditionError(
                f'a percentage is only the share of holdout(...), as in holdout("name", {token.text})', token.column
            )
        negative = False
        if self.at("-"):
            self.take()
            negative = True
            token = self.peek
        if token.kind in ("number", "duration") or (not negative and token.kind == "string"):
            self.take()
            value = -token.value if negative else token.value
            kind = {"number": NUMBER, "duration": DURATION, "string": TEXT}[token.kind]
            return Literal(value, kind, token.column)
        if not negative and self.at("true", "false"):
            self.take()
            return Literal(token.text == "true", BOOL, token.column)
        raise ConditionError(f'expected a number, duration or "text", found {self._shown(token)}', token.column)

    def operand(self):
        token = self.peek
        if token.kind in ("number", "duration", "percent", "string") or self.at("-", "true", "false"):
            return self.literal()
        if self.at("("):
            self.take()
            self.nest(token.column)
            node = self.or_()
            self.depth -= 1
            self.expect(")")
            return node
        if token.kind != "name":
            raise ConditionError(
                f"expected a feature, score, segment or value, found {self._shown(token)}", token.column
            )
        if token.text == "missing":
            self.take()
            self.expect("(")
            ref = self.reference()
            self.expect(")")
            if not isinstance(ref, FeatureRef | ScoreRef):
                raise ConditionError("missing(...) takes a feature or a score", token.column)
            return Missing(ref, token.column)
        if token.text == "absent":
            self.take()
            self.expect("(")
            kind = self.take()
            if kind.kind != "name" or kind.text not in EVENT_TYPES:
                raise ConditionError(
                    f"absent(...) takes an event type first, one of {', '.join(EVENT_TYPES)}; "
                    f"found {self._shown(kind)}",
                    kind.column,
                )
            self.expect(",")
            window = self.take()
            if (
                window.kind != "duration"
                or not math.isfinite(window.value)
                or window.value <= 0
                or window.value != int(window.value)
            ):
                raise ConditionError(
                    f"absent(...) takes a positive duration second, such as 7d; found {self._shown(window)}",
                    window.column,
                )
            self.expect(")")
            return Absent(kind.text, int(window.value), token.column)
        if token.text == "holdout":
            return self.holdout()
        return self.reference()

    def holdout(self) -> Holdout:
        column = self.take().column
        self.expect("(")
        name = self.take()
        if name.kind != "string" or not EXPERIMENT_NAME.fullmatch(name.value):
            raise ConditionError(
                "holdout(...) takes the experiment's name first, in quotes: 1-64 lowercase letters, digits "
                f'and _, starting with a letter, such as "spring_promo"; found {self._shown(name)}',
                name.column,
            )
        self.expect(",")
        share = self.take()
        if share.kind != "percent":
            raise ConditionError(
                f"holdout(...) takes the share of users it holds out second, as a percentage such as 10%; "
                f"found {self._shown(share)}",
                share.column,
            )
        if not 0 < share.value < 1:
            raise ConditionError(
                f"a holdout's share must be more than 0% and less than 100%; found {share.text}", share.column
            )
        self.expect(")")
        return Holdout(name.value, share.value, column)

    def reference(self):
        token = self.take()
        if token.kind != "name" or (token.text in KEYWORDS and token.text not in ("score", "segment")):
            raise ConditionError(f"expected a feature, score or segment name, found {self._shown(token)}", token.column)
        if token.text in ("score", "segment"):
            self.expect(".")
            name = self.take()
            if name.kind != "name":
                raise ConditionError(f"expected a {token.text} name after '{token.text}.'", name.column)
            return ScoreRef(name.text, token.column) if token.text == "score" else SegmentRef(name.text, token.column)
        key = None
        if self.at("["):
            self.take()
            key_token = self.take()
            if key_token.kind != "string":
                raise ConditionError(
                    f'expected a "quoted" key inside [...], found {self._shown(key_token)}', key_token.column
                )
            key = key_token.value
            self.expect("]")
        return FeatureRef(token.text, key, token.column)


def parse_condition(text: str):
    """The condition's syntax tree, one of the node types above; a `ConditionError` naming the column otherwise."""
    return _Parser(text).parse()


# -- compilation ---------------------------------------------------------------------------------


class FeatureValues(dict):
    """Feature name -> its value at one instant, read from the catalog on the first lookup:
    `values[name]` is a plain dict hit afterwards (the ~60 reads of an evaluation step go through
    it: the models' vectors, then the conditions)."""

    __slots__ = ("profile", "now", "readers")

    def __init__(self, profile: UserProfile, now: int, readers: Mapping[str, Callable[[UserProfile, int], Any]]):
        super().__init__()
        self.profile, self.now, self.readers = profile, now, readers

    def __missing__(self, name: str) -> Any:
        value = self[name] = self.readers[name](self.profile, self.now)
        return value


class Evaluation:
    """One evaluation instant of one user: feature reads are cached for its duration, and the
    memberships decided so far are visible to segment references."""

    __slots__ = ("profile", "now", "catalog", "scores", "members", "cache", "lapses", "feature", "user_id")

    def __init__(
        self,
        profile: UserProfile,
        now: int,
        catalog: FeatureCatalog,
        scores: Mapping[str, float],
        user_id: str | None = None,
    ):
        self.profile = profile
        self.user_id = user_id  # whose profile it is: what holdout(...) reads (None: not known here)
        self.now = now
        self.catalog = catalog
        self.scores = scores
        self.members: dict[str, bool] = {}
        # Also holds (map feature, key) slots, filled by `keyed` (never through a missing lookup).
        self.cache = FeatureValues(profile, now, catalog.readers)
        self.feature: Callable[[str], Any] = self.cache.__getitem__  # the value of a feature by name
        self.lapses: dict[Any, int | None] = {}

    def keyed(self, name: str, key: str, read) -> Any:
        """A map feature's value at a key, read once per evaluation and cached."""
        cache, slot = self.cache, (name, key)
        if slot in cache:
            return cache[slot]
        value = cache[slot] = read(self.profile, self.now, key)
        return value

    def lapse(self, slot, lapse) -> int | None:
        """A feature's next lapse, computed once per evaluation however many conditions ask."""
        lapses = self.lapses
        if slot in lapses:
            return lapses[slot]
        due = lapses[slot] = lapse(self.profile, self.now)
        return due


@dataclass(frozen=True)
class ModelOutput:
    """What the definitions may say about a model's score: its range, or its cluster count."""

    name: str
    low: float = 0.0
    high: float = 1.0
    clusters: int | None = None  # a clustering model: the score is the cluster id 0..clusters-1


Value = Callable[[Evaluation], Any]
Change = Callable[[Evaluation], "int | None"]


def _never(ev: Evaluation) -> None:
    return None


@dataclass(frozen=True)
class Operand:
    """A compiled operand: its type, how to read its value and when a step value next changes."""

    kind: str  # NUMBER | DURATION | TEXT | TEXT_LIST | BOOL
    value: Value
    label: str  # how the reason names it
    change: Change = _never  # the next lapse of a step value
    motion: str = STEP
    half_life_ms: int = 0
    at: Callable[[UserProfile, int], Any] | None = None  # the value at another instant (DECAY)
    literal: bool = False
    choices: tuple[str, ...] = ()
    low: float | None = None  # the smallest value it can take
    high: float | None = None
    falls_only: bool = False  # a STEP value that never rises while no event comes
    feature: str | None = None  # a whole feature's name: its value is ev.cache[feature]
    constant: Any = None  # a literal's value, which `value` returns without reading the evaluation


@dataclass
class References:
    """What a condition reads, to record in each transition's reason."""

    features: dict[str, Value] = field(default_factory=dict)
    scores: set[str] = field(default_factory=set)
    segments: set[str] = field(default_factory=set)
    experiments: dict[str, Fraction] = field(default_factory=dict)  # name -> share held out


@dataclass(frozen=True)
class Condition:
    """A compiled condition: whether it holds, the next instant it may change without an event, and what it reads."""

    text: str
    holds: Callable[[Evaluation], bool]
    next_change: Change  # the earliest instant after ev.now at which `holds` may change, no event
    references: References
    compare: Compare | None = None  # the node, when the condition is a single comparison


_OPS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge, "==": operator.eq, "!=": operator.ne}
_FLIPPED = {"<": ">", "<=": ">=", ">": "<", ">=": "<=", "==": "==", "!=": "!="}


def _first_of(*times):
    present = [t for t in times if t is not None]
    return min(present) if present else None


class Compiler:
    """Compiles condition text against a feature catalog, the models' outputs and the known segments."""

    def __init__(self, catalog: FeatureCatalog, models: Mapping[str, ModelOutput], segments: set[str]):
        self.catalog = catalog
        self.models = models
        self.segments = segments

    def compile(self, text: str) -> Condition:
        """The condition the text says; a `ConditionError` for a syntax, name or type error."""
        node = parse_condition(text)
        refs = References()
        holds, change = self._condition(node, refs)
        return Condition(text, holds, change, refs, node if isinstance(node, Compare) else None)

    def constant(self, value: bool) -> Condition:
        """A condition that always (or never) holds."""
        return Condition("true" if value else "false", lambda ev: value, _never, References())

    # -- boolean nodes --

    def _condition(self, node, refs: References) -> tuple[Callable[[Evaluation], bool], Change]:
        if isinstance(node, And | Or):
            parts = [self._condition(item, refs) for item in node.items]
            tests = tuple(p[0] for p in parts)
            changes = tuple(p[1] for p in parts)
            # Two operands (the usual case) without a generator: these run for every segment at
            # every evaluation. Same short-circuit order as all() / any().
            if len(tests) == 2:
                first, second = tests
                if isinstance(node, And):

                    def holds(ev):
                        return bool(first(ev) and second(ev))
                else:

                    def holds(ev):
                        return bool(first(ev) or second(ev))

                first_change, second_change = changes

                def change(ev):
                    a, b = first_change(ev), second_change(ev)
                    if a is None:
                        return b
                    return a if b is None or a <= b else b

                return holds, change
            if isinstance(node, And):

                def holds(ev):
                    return all(test(ev) for test in tests)
            else:

                def holds(ev):
                    return any(test(ev) for test in tests)

            return holds, lambda ev: _first_of(*(c(ev) for c in changes))
        if isinstance(node, Not):
            test, change = self._condition(node.item, refs)
            return (lambda ev: not test(ev)), change
        if isinstance(node, Compare):
            return self._compare(node, refs)
        if isinstance(node, InCondition):
            return self._in_condition(node, refs)
        if isinstance(node, Missing):
            ref = self._operand(node.ref, refs)
            return (lambda ev: ref.value(ev) is None), ref.change
        if isinstance(node, Absent):
            # no such event within the window: not (ms_since_last_<type> < window)
            feature = FeatureRef(f"ms_since_last_{node.event_type}", None, node.column)
            window = Literal(float(node.window_ms), DURATION, node.column)
            test, change = self._compare(Compare("<", feature, window, node.column), refs)
            return (lambda ev: not test(ev)), change
        if isinstance(node, SegmentRef):
            ref = self._operand(node, refs)
            return ref.value, _never
        if isinstance(node, Holdout):
            return self._holdout(node, refs), _never  # the user's arm never changes
        if isinstance(node, Literal) and node.kind == BOOL:
            value = node.value
            return (lambda ev: value), _never
        what = self._describe(node)
        raise ConditionError(f"{what} is not a condition: compare it with something, e.g. {what} > 0", _column(node))

    @staticmethod
    def _holdout(node: Holdout, refs: References) -> Callable[[Evaluation], bool]:
        name, places = node.experiment, control_places(node.share)
        known = refs.experiments.setdefault(name, node.share)
        if known != node.share:
            raise ConditionError(
                f"experiment {name!r} is held out at {_percent(known)} and at {_percent(node.share)}: "
                "one experiment has one share (name a new experiment to change it)",
                node.column,
            )

        def holds(ev):
            user_id = ev.user_id
            if user_id is None:
                raise ValueError(f"holdout({name!r}, ...) is evaluated without the user id")
            return place(name, user_id) < places

        return holds

    def _describe(self, node) -> str:
        if isinstance(node, FeatureRef):
            return node.name + (f'["{node.key}"]' if node.key is not None else "")
        if isinstance(node, ScoreRef):
            return f"score.{node.model}"
        if isinstance(node, Literal):
            return repr(node.value)
        return "this"

    # -- operands --

    def _operand(self, node, refs: References) -> Operand:
        if isinstance(node, Literal):
            value = node.value
            return Operand(node.kind, lambda ev: value, repr(value), literal=True, constant=value)
        if isinstance(node, FeatureRef):
            return self._feature(node, refs)
        if isinstance(node, ScoreRef):
            model = self.models.get(node.model)
            if model is None:
                known = ", ".join(sorted(self.models)) or "none are installed"
                raise ConditionError(f"unknown model score {node.model!r} (models: {known})", node.column)
            name = node.model
            refs.scores.add(name)
            if model.clusters is not None:
                return Operand(NUMBER, lambda ev: ev.scores.get(name), f"score.{name}", low=0, high=model.clusters - 1)
            return Operand(NUMBER, lambda ev: ev.scores.get(name), f"score.{name}", low=model.low, high=model.high)
        if isinstance(node, SegmentRef):
            if node.segment not in self.segments:
                raise ConditionError(
                    f"unknown segment {node.segment!r}{_suggest(node.segment, self.segments)}", node.column
                )
            name = node.segment
            refs.segments.add(name)
            return Operand(BOOL, lambda ev: ev.members[name], f"segment.{name}")
        raise ConditionError("expected a feature, score, segment or value here", _column(node))

    def _feature(self, node: FeatureRef, refs: References) -> Operand:
        catalog, name = self.catalog, node.name
        spec: FeatureSpec | None = catalog.specs.get(name)
        if spec is None:
            raise ConditionError(f"unknown feature {name!r}{_suggest(name, catalog.specs)}", node.column)
        lapse = catalog.lapses.get(name)
        # Keyed by the lapse function: the features of one horizon share it, and so its result.
        change: Change = (lambda ev: ev.lapse(lapse, lapse)) if lapse else _never
        read = catalog.readers[name]
        if spec.kind == MAP:
            if node.key is None:
                raise ConditionError(f'{name} is a map: name a key, e.g. {name}["shoes"]', node.column)
            if spec.value_kind not in (NUMBER, DURATION):
                raise ConditionError(f"{name} cannot be used in conditions", node.column)
            key, default = node.key, spec.missing_key
            read_key = catalog.key_readers.get(name)
            if read_key is None:

                def read_key(p, t, k):
                    return read(p, t).get(k, default)

            key_lapse = catalog.key_lapses.get(name)
            if key_lapse is not None:

                def lapse_of_key(p, t):
                    return key_lapse(p, t, key)

                change = lambda ev: ev.lapse((name, key), lapse_of_key)  # noqa: E731

            def value(ev):
                return ev.keyed(name, key, read_key)

            def at(p, t):
                return read_key(p, t, key)

            label = f"{name}[{key}]"
            kind = spec.value_kind
        else:
            if node.key is not None:
                raise ConditionError(f"{name} is not a map: it takes no [key]", node.column)

            def value(ev):
                return ev.cache[name]

            at, label, kind = read, name, spec.kind
        refs.features[label] = value
        return Operand(
            kind,
            value,
            label,
            change,
            spec.motion,
            spec.half_life_ms,
            at,
            choices=spec.choices,
            low=0.0 if kind in (NUMBER, DURATION) else None,
            falls_only=spec.falls_only,
            feature=None if spec.kind == MAP else name,
        )

    # -- comparisons --

    def _compare(self, node: Compare, refs: References):
        left, right = self._operand(node.left, refs), self._operand(node.right, refs)
        op = node.op
        if left.literal and not right.literal:
            left, right, op = right, left, _FLIPPED[op]
        if left.literal:
            raise ConditionError("a comparison needs a feature, score or segment on one side", node.column)
        if left.kind == BOOL or right.kind == BOOL:
            raise ConditionError(
                "segments and true/false are conditions themselves: write `segment.x` or "
                "`not segment.x`, not a comparison",
                node.column,
            )
        self._check_kinds(left, right, op, node.column)
        test = _OPS[op]
        if right.literal and left.feature is not None:
            # The usual `feature op constant`, read straight from the evaluation's cache: it runs
            # for most segments at every evaluation.
            feature, constant = left.feature, right.constant

            def holds(ev):
                a = ev.cache[feature]
                return a is not None and test(a, constant)
        else:
            lv, rv = left.value, right.value

            def holds(ev):
                a = lv(ev)
                if a is None:
                    return False
                b = rv(ev)
                return b is not None and test(a, b)

        if right.literal and right.kind == TEXT:
            return holds, left.change
        if right.literal:
            threshold = right.constant
            self._check_threshold(left, op, threshold, node.column)
            if left.motion == DECAY and op in ("==", "!="):
                raise ConditionError(f"{left.label} changes continuously with time: use <, <=, >, >=", node.column)
            return holds, self._crossing(left, op, threshold)
        for side in (left, right):
            if side.motion != STEP:
                raise ConditionError(
                    f"{side.label} changes continuously with time: compare it with a constant, "
                    "not with another feature",
                    node.column,
                )
        lc, rc = left.change, right.change
        return holds, lambda ev: _first_of(lc(ev), rc(ev))

    def _check_kinds(self, left: Operand, right: Operand, op: str, column: int) -> None:
        if left.kind == TEXT_LIST or right.kind == TEXT_LIST:
            raise ConditionError(
                f"{(left if left.kind == TEXT_LIST else right).label} is a list: use "
                f'"value" in {left.label if left.kind == TEXT_LIST else right.label}',
                column,
            )
        if left.kind == TEXT or right.kind == TEXT:
            if left.kind != right.kind:
                raise ConditionError(
                    f"cannot compare {left.label} ({left.kind}) with {right.label} ({right.kind})", column
                )
            if op not in ("==", "!="):
                raise ConditionError(f"text is compared with == or != only, not {op}", column)
            if right.literal and left.choices and right.constant not in left.choices:
                raise ConditionError(
                    f"{left.label} is never {right.constant!r}: it is one of {', '.join(left.choices)}", column
                )
            return
        # Numbers: a duration literal only where the other side is a duration (ms) too; a plain
        # number against a duration is read as milliseconds.
        if right.literal and right.kind == DURATION and left.kind != DURATION:
            raise ConditionError(
                f"{left.label} is a {left.kind}, not a duration: compare it with a plain number", column
            )
        if not right.literal and left.kind != right.kind:
            raise ConditionError(f"cannot compare {left.label} ({left.kind}) with {right.label} ({right.kind})", column)

    @staticmethod
    def _check_threshold(left: Operand, op: str, threshold: float, column: int) -> None:
        if not math.isfinite(threshold):
            raise ConditionError(f"threshold {threshold} is not a finite number", column)
        if left.kind == DURATION and abs(threshold) > MAX_DURATION_MS:
            raise ConditionError(f"duration threshold {threshold:g} ms is beyond 100 years", column)
        low, high = left.low, left.high
        if (low is not None and threshold < low) or (high is not None and threshold > high):
            bounds = f"[{low:g}, {high:g}]" if high is not None else f"at least {low:g}"
            raise ConditionError(
                f"threshold {threshold:g} is outside the range of {left.label}, {bounds}: "
                f"the comparison would be constant",
                column,
            )

    def _crossing(self, left: Operand, op: str, threshold: float) -> Change:
        """When `left op threshold` may next change with no event: at the feature's next lapse,
        and for a value moving with time, at the exact millisecond it crosses the threshold."""
        step = left.change
        if left.motion == RECENCY:
            # value(t) = t - base: whole milliseconds, so `value op c` flips at exactly one offset.
            if op in ("<", ">="):
                offsets = [math.ceil(threshold)]
            elif op in ("<=", ">"):
                offsets = [math.floor(threshold) + 1]
            else:
                offsets = [int(threshold), int(threshold) + 1] if threshold == int(threshold) else []
            value = left.value

            def change(ev):
                v = value(ev)
                due = step(ev)
                if v is None:
                    return due
                base = ev.now - v
                for offset in offsets:
                    if base + offset > ev.now:
                        return _first_of(due, base + offset)
                return due

            return change
        if left.motion == DECAY:
            test, value, at, half_life = _OPS[op], left.value, left.at, left.half_life_ms

            def change(ev):
                return _first_of(step(ev), _decay_crossing(ev, value(ev), at, half_life, test, threshold))

            return change
        if left.falls_only and op in ("<", "<=", ">", ">="):
            # A value that only falls flips `> c` only from true and `< c` only from false: in the
            # other state no lapse can change the verdict, so no timer is needed for it.
            test, value, upward = _OPS[op], left.value, op in (">", ">=")

            def change(ev):
                v = value(ev)
                if v is not None and test(v, threshold) != upward:
                    return None
                return step(ev)

            return change
        return step

    def _in_condition(self, node: InCondition, refs: References):
        item = self._operand(node.item, refs)
        negated = node.negated
        if isinstance(node.options, tuple):
            if item.literal or item.kind not in (NUMBER, TEXT):
                raise ConditionError("`in [...]` needs a number or text feature or score on its left", node.column)
            if item.motion != STEP:
                raise ConditionError(f"{item.label} changes continuously with time: use <, <=, >, >=", node.column)
            for option in node.options:
                if option.kind != item.kind:
                    raise ConditionError(f"{option.value!r} is not a {item.kind} like {item.label}", option.column)
                if item.choices and option.value not in item.choices:
                    raise ConditionError(
                        f"{item.label} is never {option.value!r}: it is one of {', '.join(item.choices)}", option.column
                    )
            options = frozenset(o.value for o in node.options)
            value = item.value

            def holds_in(ev):
                v = value(ev)
                return v is not None and (v in options) != negated  # missing: false, as comparisons

            return holds_in, item.change
        collection = self._operand(node.options, refs)
        if collection.kind != TEXT_LIST:
            raise ConditionError(f"{collection.label} is not a list", node.column)
        if item.kind != TEXT:
            raise ConditionError(
                f'{collection.label} holds text: put a "quoted" value or a text feature on the left of `in`',
                node.column,
            )
        value, members = item.value, collection.value

        def holds(ev):
            v = value(ev)
            return v is not None and (v in members(ev)) != negated

        return holds, lambda ev: _first_of(item.change(ev), collection.change(ev))


def _decay_crossing(ev: Evaluation, v, at, half_life_ms: int, test, threshold: float) -> int | None:
    """The first millisecond after ev.now at which `test(value, threshold)` differs from now, for
    a value halving every `half_life_ms` (it only falls, so it crosses a threshold at most once)."""
    now = ev.now
    if v is None or v <= 0 or threshold <= 0 or v < threshold:
        return None  # it stays on its side of the threshold from here on
    if v == threshold:
        return now + 1  # it falls below at once: <= / >= flip
    holds_now = test(v, threshold)
    wait = half_life_ms * math.log2(v / threshold)
    if not math.isfinite(wait) or wait > 2**62 - now:
        return None  # not within any time the engine can reach
    due = max(now + 1, now + math.ceil(wait))
    # The estimate is from the value now; the reader decays from the stored base, so settle the
    # exact millisecond by reading it.
    for _ in range(MAX_STEPS):
        if due - 1 > now and test(at(ev.profile, due - 1), threshold) != holds_now:
            due -= 1
        elif test(at(ev.profile, due), threshold) == holds_now:
            due += 1
        else:
            return due
    return due


def _percent(share: Fraction) -> str:
    return f"{float(share * 100):g}%"


def _column(node) -> int | None:
    return getattr(node, "column", None)


def _suggest(name: str, known) -> str:
    import difflib

    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.75)
    return f" (did you mean {close[0]!r}?)" if close else ""
