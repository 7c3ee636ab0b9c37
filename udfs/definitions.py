"""Segment definitions as data: a versioned YAML file of segments and mutually exclusive groups,
checked against the feature catalog and the installed models, and compiled once per worker.

    version: shop-2026-11-23          # recorded in every transition
    segments:
      - name: cart_abandoner
        description: Cart not empty and untouched for 30 minutes
        when: cart_items > 0 and ms_since_cart_activity >= 30m
      - name: engaged_by_score
        enter: engagement_score > 50   # hysteresis: enter above 50 ...
        exit: engagement_score < 40    # ... leave only below 40
        min_dwell: 1h                  # and stay at least an hour
    exclusive_groups:
      - name: engagement_tier          # a user is in at most one; the first that holds wins
        segments: [tier_high, tier_medium, tier_low]

The YAML is composed into nodes (never constructed into objects), tags, anchors and aliases are
refused, and every error names the file, line and segment. See docs/definitions.md.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from fractions import Fraction
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

import yaml

from udfs.conditions import (
    MAX_CONDITION_CHARS,
    MAX_DURATION_MS,
    Compare,
    Compiler,
    Condition,
    ConditionError,
    Evaluation,
    FeatureRef,
    Literal,
    ModelOutput,
    References,
    ScoreRef,
)
from udfs.features import FeatureCatalog
from udfs.profile import Membership
from udfs.profile_config import DURATION_UNITS, ProfileConfig
from udfs.yaml_events import EventComposer

MAX_FILE_BYTES = 1_000_000
MAX_SEGMENTS = 1_000
# All of a file's conditions together: 1,000 segments of 200 characters (the shipped file has 38
# a segment). Compiling takes some 1.3 us a character: refusing the last segment of a 1 MB file of
# long conditions took 1.2 s of compiling after the YAML; with this, a quarter of a second.
MAX_FILE_CONDITION_CHARS = 200_000
MAX_YAML_DEPTH = 32
# Every field of MAX_SEGMENTS segments, each in a group of two, is 15,511 nodes; PyYAML parses
# some 13 us a node, so the event pass stops a denser file within a third of a second.
MAX_YAML_NODES = 20_000
MAX_TIME_MS = 2**62  # beyond any event time; Flink timers are signed 64-bit
NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")
VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:+-]{0,63}")
REMOVED_RULE = "segment_removed_from_definitions"

_SAFE_TAGS = {f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null", "seq", "map")}


class DefinitionError(ValueError):
    """An error in a definitions file, its message naming the file, line, column and segment where known."""

    def __init__(
        self, message: str, source: str, line: int | None = None, column: int | None = None, segment: str | None = None
    ):
        where = source + (f":{line}" if line else "") + (f":{column}" if line and column else "")
        super().__init__(f"{where}: " + (f"segment {segment!r}: " if segment else "") + message)
        self.source, self.line, self.column, self.segment, self.message = source, line, column, segment, message


class Verdict(NamedTuple):
    """The membership decided for one segment at one instant, and what decided it (a tuple:
    every segment gets one at every evaluation, and a frozen dataclass costs 3x to build)."""

    member: bool
    rule: str
    condition: Condition | None  # whose references the reason records


@dataclass(frozen=True)
class Segment:
    """A segment: its entry and optional exit condition, hysteresis and minimum dwell."""

    name: str
    description: str
    enter: Condition
    exit: Condition | None  # None: leave when `enter` stops holding
    min_dwell_ms: int
    line: int
    # A cold-start segment: its `enter` is `(when) and not (<the file's cold_start ends_when>)`,
    # and each of its transitions says so in its reason.
    provisional: bool = False

    @cached_property
    def experiments(self) -> dict[str, Fraction]:
        """The experiments its conditions split users by (`holdout(...)`), with their shares."""
        return {name: share for c in (self.enter, self.exit) if c for name, share in c.references.experiments.items()}

    @cached_property
    def dwell_rule(self) -> str:
        """The rule a transition's reason records while the minimum dwell holds a member in."""
        return f"min_dwell {self.min_dwell_ms} ms"

    @cached_property
    def leaves_rule(self) -> tuple[str, Condition]:
        """The rule and condition a member leaves by."""
        if self.exit is not None:
            return self.exit.text, self.exit
        return f"not ({self.enter.text})", self.enter

    def leaves(self, ev: Evaluation) -> tuple[bool, str, Condition]:
        """Whether a member leaves at this evaluation, with the rule and condition that decide it."""
        if self.exit is not None:
            return self.exit_holds(ev), self.exit.text, self.exit
        return not self.enter.holds(ev), f"not ({self.enter.text})", self.enter

    def exit_holds(self, ev: Evaluation) -> bool:
        """`enter: A, exit: B`: a member leaves when B holds and A does not. Entry wins while A
        holds, so a pair that can both hold (B over other features than A, or true by time
        alone) is still one membership, not a flap at every evaluation; for a pair that never
        both holds (the usual hysteresis) this is B alone."""
        assert self.exit is not None  # bound as the exit test only for a segment with an exit
        return self.exit.holds(ev) and not self.enter.holds(ev)

    def member_next_change(self, ev: Evaluation) -> int | None:
        """When a member's leaving can next change with no event: while B does not hold, only
        when B does (A cannot make a member leave); while B holds (so A holds too, or the member
        would have left), when either does."""
        exit_ = self.exit
        if exit_ is None:
            return self.enter.next_change(ev)
        due = exit_.next_change(ev)
        if exit_.holds(ev):
            other = self.enter.next_change(ev)
            if other is not None and (due is None or other < due):
                due = other
        return due


@dataclass(frozen=True)
class ExclusiveGroup:
    """Segments of which a user is in at most one: the first in priority order that holds."""

    name: str
    segments: tuple[Segment, ...]  # in priority order


@dataclass
class DefinitionSet:
    """A loaded definitions file: its segments and groups, and the order to evaluate them in."""

    version: str
    segments: dict[str, Segment]
    groups: dict[str, ExclusiveGroup]
    units: tuple[Segment | ExclusiveGroup, ...]  # evaluation order: referenced segments first
    catalog: FeatureCatalog  # the features the conditions were compiled against
    source: str = "<definitions>"
    text: bytes = b""  # the file as read, to ship to the workers
    sha256: str = ""
    models: tuple[str, ...] = field(default=())  # the model scores the conditions read
    rescore_every_ms: int = 0  # also rescore this long after the latest scoring (0: per event only)
    # model -> sha256 of its manifest.json (which holds the ONNX file's sha256): the models these
    # definitions were validated with; the loader refuses any other (udfs/scoring.py).
    model_pins: dict[str, str] = field(default_factory=dict)
    # experiment -> the share of users it holds out, for every holdout(...) of the conditions
    experiments: dict[str, Fraction] = field(default_factory=dict)
    # The file's `cold_start: ends_when`: once it holds, a user leaves the provisional segments.
    cold_start_ends: Condition | None = None

    def __post_init__(self) -> None:
        # Precomputed walk order: (group or None, segments of the unit) per unit.
        self._plan = tuple((unit if isinstance(unit, ExclusiveGroup) else None, _ordered(unit)) for unit in self.units)
        # The same walk for next_change_ms, with what it reads of each segment taken out once.
        self._changes = tuple(
            (
                group is not None,
                tuple(
                    (
                        s.name,
                        s.min_dwell_ms,
                        s.enter.next_change,
                        s.member_next_change if s.exit is not None else s.enter.next_change,
                    )
                    for s in segments
                ),
            )
            for group, segments in self._plan
        )

        # The same walk for changes(), a single segment's parts taken out once: (None, name, min
        # dwell, enter test, exit test or None, the Verdict of entering, the Verdict of leaving).
        # Rows typed loosely: mypy cannot tie the other fields' types to `group is None`.
        self._diff_plan: tuple[tuple[Any, ...], ...] = tuple(
            (group, None, 0, None, None, None, None)
            if group is not None
            else (
                None,
                s.name,
                s.min_dwell_ms,
                s.enter.holds,
                s.exit_holds if s.exit is not None else None,
                Verdict(True, s.enter.text, s.enter),
                Verdict(False, *s.leaves_rule),
            )
            for group, segments in self._plan
            for s in segments[:1]
        )
        # What can change each unit's verdict other than time passing (its next change covers
        # that): an event of one of `types` (None: of any type), new scores (`scored`), or a
        # segment it references changing (`refs`). A step re-decides only the units it reaches,
        # and works out the next change again only for those; the others' verdicts and next
        # changes stand (docs/architecture.md, "Incremental evaluation").
        self._reach = tuple(_reach(segments, self.catalog) for _, segments in self._plan)
        self._unit_names = tuple(tuple(s.name for s in segments) for _, segments in self._plan)

    def reached(self, dues: Sequence[int | None], now: int, event_type: str | None, scored: bool) -> list[bool]:
        """Which units an evaluation at `now` must decide again, given each unit's next change
        as of the latest evaluation: those due by now, those an event of `event_type` (None: a
        timer) can change, and with `scored` those reading scores. `changes` adds the units whose
        referenced segments change on the way."""
        return [
            (due is not None and due <= now)
            or (scored and reads_scores)
            or (event_type is not None and (types is None or event_type in types))
            for due, (types, reads_scores, _) in zip(dues, self._reach, strict=True)
        ]

    @property
    def names(self) -> tuple[str, ...]:
        """The segments' names, in the order of the file."""
        return tuple(self.segments)

    def changes(
        self, ev: Evaluation, memberships: Mapping[str, Membership], reached: list[bool] | None = None
    ) -> list[tuple[str, Verdict | None]]:
        """The segments whose membership at `ev.now` differs from `memberships`, with the verdict
        that decided each, in evaluation order after the members of
        segments no longer defined (verdict None); `ev.members` gets every segment's membership.
        No verdict is built for a segment whose membership stays. With `reached` (see `reached`),
        only those units are decided, and the units that read a segment that changed; they are
        marked in `reached`, and the others keep their memberships."""
        out: list[tuple[str, Verdict | None]] = [
            (name, None) for name, m in memberships.items() if m.member and name not in self.segments
        ]
        members, now = ev.members, ev.now
        changed: set[str] = set()
        for unit, (group, name, min_dwell_ms, enter, leave, entered, left) in enumerate(self._diff_plan):
            if reached is not None and not reached[unit]:
                refs = self._reach[unit][2]
                if not (refs and not changed.isdisjoint(refs)):
                    for held in self._unit_names[unit]:
                        m = memberships.get(held)
                        members[held] = m is not None and m.member
                    continue
                reached[unit] = True
            decided = len(out)
            if group is None:
                current = memberships.get(name)
                if current is not None and current.member:
                    if now < current.since_ms + min_dwell_ms or not (leave(ev) if leave else not enter(ev)):
                        members[name] = True
                    else:
                        members[name] = False
                        out.append((name, left))
                elif enter(ev):
                    members[name] = True
                    out.append((name, entered))
                else:
                    members[name] = False
            else:
                for name, verdict in self._decide_group(group, ev, memberships).items():
                    members[name] = verdict.member
                    current = memberships.get(name)
                    if verdict.member != (current is not None and current.member):
                        out.append((name, verdict))
            for name, _ in out[decided:]:
                changed.add(name)
        return out

    def next_change_ms(self, ev: Evaluation, memberships: Mapping[str, Membership]) -> int | None:
        """The earliest instant after `ev.now` at which a verdict may change with no event."""
        return earliest(self.unit_dues(ev, memberships))

    def unit_dues(
        self,
        ev: Evaluation,
        memberships: Mapping[str, Membership],
        dues: Sequence[int | None] | None = None,
        reached: Sequence[bool] | None = None,
    ) -> list[int | None]:
        """Each unit's next change after `ev.now` with no event: worked out for the units in
        `reached`, or for every unit without it; the others' are taken from `dues`."""
        out: list[int | None] = []
        now = ev.now
        for unit, (grouped, segments) in enumerate(self._changes):
            if dues is not None and reached is not None and not reached[unit]:
                out.append(dues[unit])
                continue
            unit_due: int | None = None
            due: int | None
            for name, min_dwell_ms, enter_change, exit_change in segments:
                m = memberships.get(name)
                if m is not None and m.member:
                    due = m.since_ms + min_dwell_ms
                    if due <= now:
                        due = exit_change(ev)
                    elif grouped:
                        unit_due = due if unit_due is None or due < unit_due else unit_due
                        break  # the group holds still until then
                else:
                    due = enter_change(ev)
                if due is not None and (unit_due is None or due < unit_due):
                    unit_due = due
            out.append(unit_due)
        return out

    @staticmethod
    def _decide_group(group: ExclusiveGroup, ev: Evaluation, memberships: Mapping[str, Membership]) -> dict:
        current = next((s for s in group.segments if (m := memberships.get(s.name)) and m.member), None)
        out: dict[str, Verdict] = {}
        if current is not None and ev.now < memberships[current.name].since_ms + current.min_dwell_ms:
            for s in group.segments:
                out[s.name] = Verdict(s is current, current.dwell_rule, None)
            return out
        own_exit = None
        if current is not None:
            leaves, rule, condition = current.leaves(ev)
            own_exit = Verdict(False, rule, condition) if leaves else None
        winner = next((s for s in group.segments if (own_exit is None if s is current else s.enter.holds(ev))), None)
        for s in group.segments:
            if s is winner:
                out[s.name] = Verdict(True, s.enter.text, s.enter)
            elif s is current:
                if own_exit is not None:
                    out[s.name] = own_exit
                else:
                    assert winner is not None  # current stays unless another segment takes precedence
                    out[s.name] = Verdict(
                        False,
                        f"exclusive group {group.name}: {winner.name} took precedence ({winner.enter.text})",
                        winner.enter,
                    )
            else:
                out[s.name] = Verdict(False, s.enter.text, s.enter)
        return out


def _ordered(unit) -> tuple[Segment, ...]:
    return unit.segments if isinstance(unit, ExclusiveGroup) else (unit,)


def earliest(dues: Sequence[int | None]) -> int | None:
    """The earliest of the units' next changes (None: none before the end of time)."""
    first: int | None = None
    for due in dues:
        if due is not None and (first is None or due < first):
            first = due
    return first if first is None or first < MAX_TIME_MS else None


def _reach(
    segments: tuple[Segment, ...], catalog: FeatureCatalog
) -> tuple[frozenset[str] | None, bool, frozenset[str]]:
    """(the event types that can change a feature the unit reads, None: any; whether it reads
    scores; the segments it references)."""
    types: set[str] | None = set()
    reads_scores = False
    refs: set[str] = set()
    for s in segments:
        for c in (s.enter, s.exit):
            if c is None:
                continue
            reads_scores = reads_scores or bool(c.references.scores)
            refs |= c.references.segments
            for label in c.references.features:
                changed_by = catalog.specs[label.split("[", 1)[0]].changed_by  # a map's label: name[key]
                if changed_by is None:
                    types = None
                elif types is not None:
                    types |= changed_by
    return (None if types is None else frozenset(types)), reads_scores, frozenset(refs)


# -- loading ---------------------------------------------------------------------------------------


def load_definitions(
    path: str | Path,
    profile_config: ProfileConfig | None = None,
    models: Mapping[str, ModelOutput] | None = None,
) -> DefinitionSet:
    """The definitions file at `path`, checked and compiled; a `DefinitionError` naming what is wrong."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DefinitionError(f"cannot read: {err.strerror}", str(path)) from None
    return parse_definitions(raw, str(path), profile_config, models)


def parse_definitions(
    raw: bytes | str,
    source: str = "<definitions>",
    profile_config: ProfileConfig | None = None,
    models: Mapping[str, ModelOutput] | None = None,
) -> DefinitionSet:
    """Definitions from text or bytes, checked and compiled; `source` names them in errors."""
    data = raw.encode() if isinstance(raw, str) else raw
    if len(data) > MAX_FILE_BYTES:
        raise DefinitionError(f"larger than {MAX_FILE_BYTES} bytes", source)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DefinitionError(f"not UTF-8 (byte {err.start})", source, data[: err.start].count(b"\n") + 1) from None
    root, anchor_line = _compose(text, source)
    builder = _Builder(source, FeatureCatalog(profile_config or ProfileConfig()), models or {}, text)
    if anchor_line is not None:
        builder.fail("YAML anchors and aliases are not allowed", None, _segment_at(root, anchor_line), line=anchor_line)
    return builder.build(root, data)


def _compose(text: str, source: str) -> tuple[yaml.Node, int | None]:
    """The node tree, and the line of the first anchor or alias (refused once the segment it
    sits in is known). The event pass bounds the nesting first (composing is recursive) and the
    number of nodes (PyYAML takes some 30 us a node: a 1 MB file of `[1,1,...]` took 16 s to
    refuse), then the nodes are composed from its events: the text is parsed once."""
    anchor_line = None
    events: list[yaml.Event] = []
    try:
        depth = nodes = documents = 0
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            events.append(event)
            if isinstance(event, yaml.NodeEvent):
                nodes += 1
                if nodes > MAX_YAML_NODES:
                    raise DefinitionError(
                        f"more than {MAX_YAML_NODES} YAML nodes (values, lists and mappings)",
                        source,
                        event.start_mark.line + 1,
                    )
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > MAX_YAML_DEPTH:
                    raise DefinitionError(
                        f"nested more than {MAX_YAML_DEPTH} levels deep", source, event.start_mark.line + 1
                    )
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
            elif isinstance(event, yaml.DocumentStartEvent):
                documents += 1
                if documents > 1:
                    break  # the composer refuses it, as it refused it from the text
            if anchor_line is None and (isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None)):
                anchor_line = event.start_mark.line + 1
        root = EventComposer(events).get_single_node()
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        raise DefinitionError(
            f"invalid YAML: {err.problem or err.context}", source, mark.line + 1 if mark else None
        ) from None
    except yaml.YAMLError as err:
        raise DefinitionError(f"invalid YAML: {type(err).__name__}", source) from None
    if root is None:
        raise DefinitionError("empty file: expected `version:` and `segments:`", source)
    return root, anchor_line


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


def _segment_at(root: yaml.Node, line: int) -> str | None:
    """The name of the segment whose entry spans `line`, if any (for error messages)."""
    if not isinstance(root, yaml.MappingNode):
        return None
    for key, value in root.value:
        if getattr(key, "value", None) == "segments" and isinstance(value, yaml.SequenceNode):
            for entry in value.value:
                if entry.start_mark.line + 1 <= line <= entry.end_mark.line + 1:
                    return _name_of(entry)
    return None


def _name_of(entry: yaml.Node) -> str | None:
    if isinstance(entry, yaml.MappingNode):
        for key, value in entry.value:
            if getattr(key, "value", None) == "name" and isinstance(value, yaml.ScalarNode):
                return value.value
    return None


class _Builder:
    def __init__(self, source: str, catalog: FeatureCatalog, models: Mapping[str, ModelOutput], text: str = ""):
        self.source = source
        self.source_text = text
        self.catalog = catalog
        self.models = models
        self.condition_chars = 0  # of the conditions compiled so far
        self.cold_start_ends: Condition | None = None  # the file's cold_start: ends_when, once compiled

    def fail(
        self,
        message: str,
        node: yaml.Node | None,
        segment: str | None = None,
        column: int | None = None,
        line: int | None = None,
    ) -> NoReturn:
        line = line if line is not None else (_line(node) if node is not None else None)
        raise DefinitionError(message, self.source, line, column, segment)

    # -- YAML nodes to plain values, refusing anything but the core schema --

    def mapping(
        self, node, what: str, allowed: set[str], required: AbstractSet[str] = frozenset(), segment: str | None = None
    ) -> dict[str, yaml.Node]:
        self.check_tag(node, segment)
        if not isinstance(node, yaml.MappingNode):
            self.fail(f"{what} must be a mapping", node, segment)
        out: dict[str, yaml.Node] = {}
        for key_node, value_node in node.value:
            key = self.text(key_node, f"a key of {what}", segment)
            if key not in allowed:
                self.fail(f"unknown key {key!r} in {what} (allowed: {', '.join(sorted(allowed))})", key_node, segment)
            if key in out:
                self.fail(f"{key!r} given twice in {what}", key_node, segment)
            out[key] = value_node
        missing = sorted(required - set(out))
        if missing:
            self.fail(f"{what} needs {', '.join(missing)}", node, segment)
        return out

    def sequence(self, node, what: str, segment: str | None = None) -> list[yaml.Node]:
        self.check_tag(node, segment)
        if not isinstance(node, yaml.SequenceNode):
            self.fail(f"{what} must be a list", node, segment)
        return node.value

    def text(self, node, what: str, segment: str | None = None) -> str:
        self.check_tag(node, segment)
        if not isinstance(node, yaml.ScalarNode) or node.tag != "tag:yaml.org,2002:str":
            self.fail(f"{what} must be text", node, segment)
        return node.value

    def check_tag(self, node, segment: str | None) -> None:
        if node.tag not in _SAFE_TAGS:
            self.fail(f"YAML tag {node.tag!r} is not allowed", node, segment)

    # -- the file --

    def build(self, root, data: bytes) -> DefinitionSet:
        top = self.mapping(
            root,
            "the definitions file",
            {"version", "description", "segments", "exclusive_groups", "rescore_every", "models", "cold_start"},
            {"version", "segments"},
        )
        version_node = top["version"]
        if version_node.tag != "tag:yaml.org,2002:timestamp":
            self.check_tag(version_node, None)
        # Written as text, a number or a date (`2026-11-23` is a YAML timestamp): the text as written.
        version = (
            version_node.value
            if isinstance(version_node, yaml.ScalarNode)
            and version_node.tag
            in (
                "tag:yaml.org,2002:str",
                "tag:yaml.org,2002:int",
                "tag:yaml.org,2002:float",
                "tag:yaml.org,2002:timestamp",
            )
            else None
        )
        if version is None or not VERSION.fullmatch(version):
            self.fail("version must be 1-64 letters, digits or . _ : + - (e.g. 2026-11-23.1)", version_node)
        if "description" in top:
            self.text(top["description"], "description")
        entries = self.sequence(top["segments"], "segments")
        if not entries:
            self.fail("segments must not be empty", top["segments"])
        if len(entries) > MAX_SEGMENTS:
            self.fail(f"more than {MAX_SEGMENTS} segments", top["segments"])
        raw_segments: dict[str, tuple[dict[str, yaml.Node], yaml.Node]] = {}
        for entry in entries:
            fields = self.mapping(
                entry,
                "a segment",
                {"name", "description", "when", "enter", "exit", "min_dwell", "provisional"},
                {"name"},
                segment=_name_of(entry),
            )
            name = self.text(fields["name"], "name")
            if not NAME.fullmatch(name):
                self.fail(
                    "a segment name is 1-64 lowercase letters, digits and _, starting with a letter",
                    fields["name"],
                    name,
                )
            if name in raw_segments:
                self.fail(f"defined twice (first on line {_line(raw_segments[name][1])})", entry, name)
            raw_segments[name] = (fields, entry)
        compiler = Compiler(self.catalog, self.models, set(raw_segments))
        self.cold_start_ends = self.cold_start(top["cold_start"], compiler) if "cold_start" in top else None
        segments = {name: self.segment(name, fields, entry, compiler) for name, (fields, entry) in raw_segments.items()}
        experiments = self.experiments(segments, raw_segments)
        groups = self.groups(top.get("exclusive_groups"), segments)
        units = self.order(segments, groups, raw_segments)
        models = sorted({m for s in segments.values() for c in (s.enter, s.exit) if c for m in c.references.scores})
        rescore = self.duration(top["rescore_every"], "rescore_every", None) if "rescore_every" in top else 0
        if rescore and not models:
            self.fail("rescore_every is set but no condition reads a model score", top["rescore_every"])
        pins = self.model_pins(top["models"], set(models)) if "models" in top else {}
        return DefinitionSet(
            version,
            segments,
            groups,
            units,
            self.catalog,
            self.source,
            data,
            hashlib.sha256(data).hexdigest(),
            tuple(models),
            rescore,
            pins,
            experiments,
            self.cold_start_ends,
        )

    def experiments(self, segments: dict[str, Segment], raw: dict) -> dict[str, Fraction]:
        """Every experiment the conditions name, with its one share: the same name held out at
        two shares would put a user in control for one segment and in treatment for another."""
        shares: dict[str, tuple[Fraction, str]] = {}
        for name, segment in segments.items():
            read = [c.references.experiments for c in (segment.enter, segment.exit) if c is not None]
            for experiment, share in (item for experiments in read for item in experiments.items()):
                first = shares.setdefault(experiment, (share, name))
                if first[0] != share:
                    self.fail(
                        f"holds out experiment {experiment!r} at {float(share * 100):g}%, segment "
                        f"{first[1]!r} at {float(first[0] * 100):g}%: one experiment has one share "
                        "(name a new experiment to change it)",
                        raw[name][1],
                        name,
                    )
        return {experiment: share for experiment, (share, _) in shares.items()}

    def cold_start(self, node, compiler: Compiler) -> Condition:
        """`cold_start: {ends_when: C}`: the condition under which a user has history enough for
        the behavioural segments, and leaves the provisional ones."""
        fields = self.mapping(node, "cold_start", {"description", "ends_when"}, {"ends_when"})
        if "description" in fields:
            self.text(fields["description"], "description")
        return self.condition(fields["ends_when"], None, compiler)

    def model_pins(self, node, read: set[str]) -> dict[str, str]:
        """`models: {name: sha256:<64 hex>}`: the manifest digest of each model the conditions
        read (`segments validate --verbose` prints them)."""
        fields = self.mapping(node, "models", set(read) or {"(no model is read)"})
        pins = {}
        for name, value_node in fields.items():
            value = self.text(value_node, f"the digest of model {name}")
            if not re.fullmatch(r"sha256:[0-9a-f]{64}", value):
                self.fail(f"the digest of model {name} must be sha256: and 64 lowercase hex digits", value_node)
            pins[name] = value.removeprefix("sha256:")
        unpinned = sorted(read - set(pins))
        if unpinned:
            self.fail(f"models pins some models but not {', '.join(unpinned)}, which the conditions read", node)
        return pins

    def segment(self, name: str, fields: dict, entry, compiler: Compiler) -> Segment:
        if ("when" in fields) == ("enter" in fields):
            self.fail("give either `when` or `enter` (with an optional `exit`)", entry, name)
        if "exit" in fields and "enter" not in fields:
            self.fail("`exit` goes with `enter`, not with `when`", fields["exit"], name)
        enter = self.condition(fields.get("when") or fields["enter"], name, compiler)
        exit_ = self.condition(fields["exit"], name, compiler) if "exit" in fields else None
        if exit_ is not None:
            self.check_hysteresis(enter, exit_, fields["exit"], name)
        dwell = 0
        if "min_dwell" in fields:
            dwell = self.duration(fields["min_dwell"], "min_dwell", name)
        description = self.text(fields["description"], "description", name) if "description" in fields else ""
        provisional = "provisional" in fields and self.flag(fields["provisional"], "provisional", name)
        if provisional:
            if "when" not in fields:
                self.fail("a provisional segment is given with `when` (it leaves by the cold start rule)", entry, name)
            if self.cold_start_ends is None:
                self.fail("provisional needs the file's cold_start: ends_when, the rule it leaves by", entry, name)
            enter = _until_established(enter, self.cold_start_ends)
        return Segment(name, description, enter, exit_, dwell, _line(entry), provisional)

    def flag(self, node, what: str, segment: str | None) -> bool:
        """A YAML true or false."""
        self.check_tag(node, segment)
        if not (isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:bool"):
            self.fail(f"{what} must be true or false", node, segment)
        return node.value.lower() in ("true", "yes", "on")

    def condition(self, node, segment: str | None, compiler: Compiler) -> Condition:
        self.check_tag(node, segment)
        if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:bool":
            return compiler.constant(node.value.lower() in ("true", "yes", "on"))
        text = self.text(node, "a condition", segment)
        self.condition_chars += len(text)
        # (A condition too long by itself is refused as such by the compiler.)
        if self.condition_chars > MAX_FILE_CONDITION_CHARS and len(text) <= MAX_CONDITION_CHARS:
            self.fail(
                f"the file's conditions are longer than {MAX_FILE_CONDITION_CHARS} characters together", node, segment
            )
        try:
            return compiler.compile(text)
        except ConditionError as err:
            line, column = _line(node), None
            if err.column is not None:
                line, column = self.locate(node, text, err.column)
            raise DefinitionError(err.message, self.source, line, column, segment) from None

    def locate(self, node: yaml.ScalarNode, value: str, column: int) -> tuple[int, int]:
        """The file line and column of `value[column - 1]`. YAML folds and re-indents multi-line
        scalars but keeps every non-blank character in order, so count those in the source."""
        wanted = sum(1 for c in value[: column - 1] if not c.isspace())
        raw = self.source_text[node.start_mark.index : node.end_mark.index]
        start = 0
        if node.style in ("|", ">"):
            start = raw.find("\n") + 1  # after the block header line
        elif node.style in ("'", '"'):
            start = 1
        position, seen = len(raw), 0
        for i in range(start, len(raw)):
            if not raw[i].isspace():
                if seen == wanted:
                    position = i
                    break
                seen += 1
        newlines = raw.count("\n", 0, position)
        if newlines == 0:
            return _line(node), node.start_mark.column + position + 1
        return _line(node) + newlines, position - raw.rfind("\n", 0, position)

    def duration(self, node, what: str, segment: str | None) -> int:
        self.check_tag(node, segment)
        raw = node.value if isinstance(node, yaml.ScalarNode) else None
        match = re.fullmatch(r"0*(\d+)(ms|s|m|h|d|w)", raw or "")
        if match is None:
            self.fail(f"{what} must be a duration such as 30s, 10m, 1h or 7d", node, segment)
        digits, unit = match.groups()
        # The conditions' bound on durations, so that an event time plus one stays far below
        # MAX_TIME_MS; the digits counted first, since int() refuses more than 4,300 of them.
        value = int(digits) * DURATION_UNITS[unit] if len(digits) <= len(str(MAX_DURATION_MS)) else None
        if value is None or value > MAX_DURATION_MS:
            self.fail(f"{what} must be at most 100 years ({MAX_DURATION_MS} ms)", node, segment)
        if value <= 0:
            self.fail(f"{what} must be positive", node, segment)
        return value

    def check_hysteresis(self, enter: Condition, exit_: Condition, node, segment: str) -> None:
        """For the usual form, one threshold each on the same value: refuse thresholds under which
        both hold at once, since the segment would then flap at every evaluation."""
        a, b = _threshold_interval(enter.compare), _threshold_interval(exit_.compare)
        if a is None or b is None or a[0] != b[0]:
            return
        low = max(a[1], b[1], key=lambda e: (e[0], not e[1]))
        high = min(a[2], b[2], key=lambda e: (e[0], e[1]))
        if low[0] < high[0] or (low[0] == high[0] and low[1] and high[1]):
            self.fail(
                f"enter ({enter.text}) and exit ({exit_.text}) both hold for some values of {a[0]}: "
                "the exit threshold must lie on the other side of the enter threshold",
                node,
                segment,
            )

    def groups(self, node, segments: dict[str, Segment]) -> dict[str, ExclusiveGroup]:
        if node is None:
            return {}
        groups: dict[str, ExclusiveGroup] = {}
        owner: dict[str, str] = {}
        for entry in self.sequence(node, "exclusive_groups"):
            fields = self.mapping(
                entry, "an exclusive group", {"name", "description", "segments"}, {"name", "segments"}
            )
            name = self.text(fields["name"], "a group name")
            if not NAME.fullmatch(name) or name in groups:
                self.fail(f"group name {name!r} must be unique, lowercase letters, digits and _", fields["name"])
            members = []
            for member_node in self.sequence(fields["segments"], f"group {name}'s segments"):
                member = self.text(member_node, "a segment name")
                if member not in segments:
                    self.fail(f"group {name!r} lists unknown segment {member!r}", member_node)
                if member in owner:
                    self.fail(f"segment {member!r} is in two exclusive groups ({owner[member]}, {name})", member_node)
                owner[member] = name
                members.append(segments[member])
            if len(members) < 2:
                self.fail(f"group {name!r} needs at least two segments", fields["segments"])
            groups[name] = ExclusiveGroup(name, tuple(members))
        return groups

    def order(self, segments: dict[str, Segment], groups: dict[str, ExclusiveGroup], raw: dict) -> tuple:
        """Units (a segment, or a group evaluated as one) so that every referenced segment is
        decided before the segments that read it; a cycle is an error that shows it."""
        unit_of: dict[str, Segment | ExclusiveGroup] = dict(segments.items())
        for g in groups.values():
            for s in g.segments:
                unit_of[s.name] = g

        def depends(unit) -> list[str]:
            refs = []
            for s in _ordered(unit):
                for c in (s.enter, s.exit):
                    if c is not None:
                        refs += sorted(c.references.segments)
            return refs

        def label(unit) -> str:
            return unit.name if isinstance(unit, Segment) else f"group {unit.name}"

        ordered: list = []
        state: dict[int, str] = {}  # id(unit) -> visiting | done
        # Depth first with a stack of (unit, the references it has still to visit), not by
        # recursion: a chain of MAX_SEGMENTS references is deeper than Python's recursion limit.
        for name in segments:
            if state.get(id(unit_of[name])) == "done":
                continue
            state[id(unit_of[name])] = "visiting"
            stack = [(unit_of[name], iter(depends(unit_of[name])))]
            while stack:
                unit, refs = stack[-1]
                ref = next(refs, None)
                if ref is None:
                    stack.pop()
                    state[id(unit)] = "done"
                    ordered.append(unit)
                    continue
                target = unit_of[ref]
                if target is unit and isinstance(unit, ExclusiveGroup):
                    reader = next(
                        s.name
                        for s in unit.segments
                        for c in (s.enter, s.exit)
                        if c is not None and ref in c.references.segments
                    )
                    self.fail(
                        f"refers to {ref!r}, a member of its own exclusive group {unit.name!r}", raw[reader][1], reader
                    )
                if state.get(id(target)) == "visiting":
                    path = [label(u) for u, _ in stack]
                    cycle = path[path.index(label(target)) :] + [label(target)]
                    first = _ordered(target)[0].name
                    self.fail(f"segment references form a cycle: {' -> '.join(cycle)}", raw[first][1], first)
                if state.get(id(target)) is None:
                    state[id(target)] = "visiting"
                    stack.append((target, iter(depends(target))))
        return tuple(ordered)


def _until_established(when: Condition, ends: Condition) -> Condition:
    """A provisional segment's condition, `(when) and not (ends)`.

    It is false while `when` is, whatever `ends` does, so it may change only when `when` may;
    while both hold, only when `ends` may; else when either may. So a user the segment is not for
    costs no more than its `when`, and `ends` is read only for those it may be for.
    """
    when_holds, ends_holds, when_change, ends_change = when.holds, ends.holds, when.next_change, ends.next_change

    def holds(ev: Evaluation) -> bool:
        return bool(when_holds(ev) and not ends_holds(ev))

    def next_change(ev: Evaluation) -> int | None:
        if not when_holds(ev):
            return when_change(ev)
        b = ends_change(ev)
        if ends_holds(ev):
            return b
        a = when_change(ev)
        if a is None:
            return b
        return a if b is None or a <= b else b

    refs = References(
        {**when.references.features, **ends.references.features},
        when.references.scores | ends.references.scores,
        when.references.segments | ends.references.segments,
    )
    return Condition(f"({when.text}) and not ({ends.text})", holds, next_change, refs)


def _threshold_interval(node: Compare | None):
    """`feature op number` as (feature label, low bound, high bound), bounds as (value, inclusive)."""
    if node is None or node.op in ("==", "!="):
        return None
    left, right, op = node.left, node.right, node.op
    if isinstance(left, Literal):
        left, right, op = right, left, {"<": ">", "<=": ">=", ">": "<", ">=": "<="}[op]
    if isinstance(left, Literal) or not isinstance(right, Literal) or not isinstance(right.value, float):
        return None
    if isinstance(left, FeatureRef):
        label = f"{left.name}[{left.key}]" if left.key is not None else left.name
    elif isinstance(left, ScoreRef):
        label = f"score.{left.model}"
    else:
        return None
    inf = (float("inf"), False)
    if op in (">", ">="):
        return label, (right.value, op == ">="), inf
    return label, (-float("inf"), False), (right.value, op == "<=")


def condition_features(condition: Condition | None, ev: Evaluation) -> dict[str, object]:
    """The values a condition read at `ev`, for the transition's reason."""
    if condition is None:
        return {}
    values: dict[str, object] = {label: read(ev) for label, read in condition.references.features.items()}
    for segment in condition.references.segments:
        values[f"segment.{segment}"] = ev.members.get(segment, False)
    return values
