"""Over-segmentation warnings that can be decided from a definitions file alone (`segments
validate`): segments no user can ever enter, and pairs of segments whose rules give them the
same members at every instant.

Only what follows soundly from the text is reported, so a warning is never a false alarm: the
reasoning knows that a comparison with a missing value is false (so `x > 10` implies `x > 5`),
that `and`/`or` are commutative, and how thresholds on one feature or score combine. What the
text cannot tell (how large a segment gets, whether two segments over different features move
together, whether a segment flaps) depends on the traffic: `segments backtest` measures those
(jobs/segment_warnings.py). A warning is about the definitions as written: a member carried over
from an earlier version of the file stays until its own exit rule lets it go.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from udfs.conditions import (
    Absent,
    And,
    Compare,
    FeatureRef,
    Holdout,
    InCondition,
    Literal,
    Missing,
    Not,
    Or,
    ScoreRef,
    SegmentRef,
    parse_condition,
)
from udfs.definitions import DefinitionSet, ExclusiveGroup, Segment

NEVER_ENTERED = "never_entered"
IDENTICAL = "identical"

# A canonical condition: nested tuples, equal for conditions that read the same values the same way.
Canon = tuple[Any, ...]
_TRUE: Canon = ("bool", True)
_FALSE: Canon = ("bool", False)
_FLIPPED = {"<": ">", "<=": ">=", ">": "<", ">=": "<=", "==": "==", "!=": "!="}


@dataclass(frozen=True)
class DefinitionWarning:
    """One static warning: its kind, the segments it is about and a sentence saying why."""

    kind: str  # NEVER_ENTERED | IDENTICAL
    segments: tuple[str, ...]
    line: int  # the line of the (first) segment in the file
    message: str


def canonical(node: Any) -> Canon:
    """A condition's syntax tree without columns, with literals on the right of a comparison,
    numbers and durations alike (a duration is its milliseconds), `and`/`or` flattened, sorted
    and without repeats, and `not not x` as `x`."""
    if isinstance(node, Literal):
        if node.kind == "boolean":
            return ("bool", node.value)
        return ("text", node.value) if isinstance(node.value, str) else ("num", float(node.value))
    if isinstance(node, FeatureRef):
        return ("feature", node.name, node.key)
    if isinstance(node, ScoreRef):
        return ("score", node.model)
    if isinstance(node, SegmentRef):
        return ("segment", node.segment)
    if isinstance(node, Compare):
        left, right, op = canonical(node.left), canonical(node.right), node.op
        if _is_literal(left) and not _is_literal(right):
            left, right, op = right, left, _FLIPPED[op]
        elif op in ("==", "!=") and repr(right) < repr(left):
            left, right = right, left
        return ("compare", op, left, right)
    if isinstance(node, InCondition):
        options = (
            tuple(sorted({canonical(o) for o in node.options}, key=repr))
            if isinstance(node.options, tuple)
            else canonical(node.options)
        )
        return ("in", canonical(node.item), options, node.negated)
    if isinstance(node, Missing):
        return ("missing", canonical(node.ref))
    if isinstance(node, Absent):
        return ("absent", node.event_type, node.window_ms)
    if isinstance(node, Holdout):  # an opaque predicate of the user: equal only to itself
        return ("holdout", node.experiment, node.share)
    if isinstance(node, Not):
        inner = canonical(node.item)
        return inner[1] if inner[0] == "not" else ("not", inner)
    if isinstance(node, And | Or):
        kind = "and" if isinstance(node, And) else "or"
        items: set[Canon] = set()
        for item in node.items:
            part = canonical(item)
            items.update(part[1] if part[0] == kind else (part,))
        return (kind, tuple(sorted(items, key=repr))) if len(items) > 1 else items.pop()
    raise TypeError(f"unknown condition node {type(node).__name__}")


def _is_literal(c: Canon) -> bool:
    return c[0] in ("num", "text", "bool")


# An interval of values: (low, low included, high, high included).
Interval = tuple[float, bool, float, bool]
_ALL: Interval = (-math.inf, False, math.inf, False)


def _threshold(c: Canon) -> tuple[Canon, Interval] | None:
    """`feature-or-score op number` as the value it reads and the interval where it holds."""
    if c[0] != "compare" or c[3][0] != "num" or c[2][0] not in ("feature", "score") or c[1] == "!=":
        return None
    op, v = c[1], c[3][1]
    interval = {
        "<": (-math.inf, False, v, False),
        "<=": (-math.inf, False, v, True),
        ">": (v, False, math.inf, False),
        ">=": (v, True, math.inf, False),
        "==": (v, True, v, True),
    }[op]
    return c[2], interval


def _intersect(a: Interval, b: Interval) -> Interval:
    low = max((a[0], not a[1]), (b[0], not b[1]))  # at one bound, the exclusive one is tighter
    high = min((a[2], a[3]), (b[2], b[3]))
    return low[0], not low[1], high[0], high[1]


def _empty(i: Interval) -> bool:
    return i[0] > i[2] or (i[0] == i[2] and not (i[1] and i[3]))


def _within(inner: Interval, outer: Interval) -> bool:
    low_ok = inner[0] > outer[0] or (inner[0] == outer[0] and (outer[1] or not inner[1]))
    high_ok = inner[2] < outer[2] or (inner[2] == outer[2] and (outer[3] or not inner[3]))
    return low_ok and high_ok


def _conjunct_intervals(c: Canon) -> dict[Canon, Interval]:
    """The interval each value read by a threshold must lie in for `c` to hold (`c` itself or
    the thresholds among the items of an `and`)."""
    items = c[1] if c[0] == "and" else (c,)
    out: dict[Canon, Interval] = {}
    for item in items:
        found = _threshold(item)
        if found is not None:
            out[found[0]] = _intersect(out.get(found[0], _ALL), found[1])
    return out


def never_holds(c: Canon, empty_segments: frozenset[str] = frozenset()) -> bool:
    """Whether `c` can hold for no profile at no instant, as far as its text shows; a
    `segment.X` of a segment in `empty_segments` never holds."""
    if c == _FALSE:
        return True
    if c[0] == "segment":
        return c[1] in empty_segments
    if c[0] == "or":
        return all(never_holds(item, empty_segments) for item in c[1])
    if c[0] == "and" and any(never_holds(item, empty_segments) for item in c[1]):
        return True
    return any(_empty(i) for i in _conjunct_intervals(c).values())


def implies(p: Canon, q: Canon) -> bool:
    """Whether `q` holds wherever `p` holds, as far as their text shows (False: not shown)."""
    if q == _TRUE or p == q or never_holds(p):
        return True
    if q[0] == "and":
        return all(implies(p, item) for item in q[1])
    if p[0] == "or":
        return all(implies(item, q) for item in p[1])
    if p[0] == "and" and any(implies(item, q) for item in p[1]):
        return True
    if q[0] == "or" and any(implies(p, item) for item in q[1]):
        return True
    wanted = _threshold(q)
    if wanted is None:
        return False
    held = _conjunct_intervals(p).get(wanted[0])
    return held is not None and _within(held, wanted[1])


def _rule(segment: Segment) -> tuple[Canon, Canon | None, int]:
    enter = canonical(parse_condition(segment.enter.text))
    exit_ = canonical(parse_condition(segment.exit.text)) if segment.exit is not None else None
    return enter, exit_, segment.min_dwell_ms


def definition_warnings(definitions: DefinitionSet) -> list[DefinitionWarning]:
    """The static warnings of a loaded definitions file, in the order of its segments."""
    rules = {name: _rule(s) for name, s in definitions.segments.items()}
    group_of = {s.name: g for g in definitions.groups.values() for s in g.segments}
    empty: dict[str, str] = {}  # segment -> why no user can enter it
    for unit in definitions.units:  # referenced segments first, so emptiness propagates
        members = unit.segments if isinstance(unit, ExclusiveGroup) else (unit,)
        for position, s in enumerate(members):
            enter = rules[s.name][0]
            if never_holds(enter, frozenset(empty)):
                empty[s.name] = f"its condition ({s.enter.text}) can never hold"
                continue
            if isinstance(unit, ExclusiveGroup):
                # The first member whose entry holds wins (a member stays while its own exit
                # does not hold, and then its entry no longer holds): a member whose entry
                # implies an earlier member's entry never wins.
                shadow = next((e for e in members[:position] if implies(enter, rules[e.name][0])), None)
                if shadow is not None:
                    empty[s.name] = (
                        f"in exclusive group {unit.name}, {shadow.name} comes first and its entry "
                        f"({shadow.enter.text}) holds whenever this one's ({s.enter.text}) does"
                    )
    out = [
        DefinitionWarning(NEVER_ENTERED, (name,), s.line, f"no user can ever enter it: {empty[name]}")
        for name, s in definitions.segments.items()
        if name in empty
    ]
    names = list(definitions.segments)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            why = _same_members(a, b, rules, group_of)
            if why is not None:
                line = definitions.segments[a].line
                out.append(DefinitionWarning(IDENTICAL, (a, b), line, f"always the same members: {why}"))
    return out


def _same_members(a: str, b: str, rules: dict, group_of: dict) -> str | None:
    """Why `a` and `b` have the same members at every instant, or None if the text does not show it."""
    for alias, other in ((a, b), (b, a)):
        # `when: segment.X` alone (no exit, no dwell) is a member exactly when X is.
        if rules[alias] == (("segment", other), None, 0) and alias not in group_of:
            return f"{alias} is defined as segment.{other}"
    if a in group_of or b in group_of or rules[a] != rules[b]:
        return None  # a group decides its members together: equal rules there differ by priority
    return "the same rules (conditions, exit and minimum dwell)"
