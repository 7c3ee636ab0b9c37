"""The fault-injection suite's invariants, as functions that return what is wrong (an empty list
when the invariant holds), so a test can assert that they hold after faults and that they catch
a deliberately broken run (tests/unit/test_fault_invariants.py feeds them corrupted logs).

A committed transition is the decoded Avro record (a dict, timestamps as epoch ms) with the
partition and offset it was committed at.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from udfs.transitions import Transition

# Set when the record is written: the only field a fault-free run cannot predict.
WALL_CLOCK_FIELDS = ("emitted_at",)


@dataclass(frozen=True)
class Committed:
    partition: int
    offset: int
    record: dict

    @property
    def transition_id(self) -> str:
        return self.record["transition_id"]


def comparable(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in WALL_CLOCK_FIELDS}


def missing_transitions(expected: Sequence[Transition], committed: Sequence[Committed]) -> list[str]:
    """Invariant 1: every expected transition is in the committed topic."""
    got = {c.transition_id for c in committed}
    return [
        f"missing {t.transition_id} ({t.user_id} {t.segment} {t.kind} #{t.sequence})"
        for t in expected
        if t.transition_id not in got
    ]


def repeated_or_out_of_sequence(committed: Sequence[Committed]) -> list[str]:
    """Invariant 2: no transition id twice; per (user, segment), in log order, ENTER and EXIT
    alternate starting with ENTER and sequences rise by one (within a profile lifetime)."""
    problems = [f"{tid} committed {n} times" for tid, n in Counter(c.transition_id for c in committed).items() if n > 1]
    by_pair: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for c in sorted(committed, key=lambda c: (c.partition, c.offset)):
        by_pair[(c.record["user_id"], c.record["segment"])].append(c.record)
    for (user, segment), records in by_pair.items():
        for i, r in enumerate(records):
            want_kind = "ENTER" if i % 2 == 0 else "EXIT"
            if r["kind"] != want_kind:
                problems.append(f"{user} {segment}: transition {i + 1} is {r['kind']}, expected {want_kind}")
                break
            # A new lifetime (after the retention, an erasure or a withdrawn consent) starts with
            # an ENTER at 1000 x its first event's time + 1, above every earlier sequence.
            new_lifetime = (
                r["kind"] == "ENTER" and r["sequence"] % 1000 == 1 and r["sequence"] > records[i - 1]["sequence"]
            )
            if i and r["sequence"] != records[i - 1]["sequence"] + 1 and not new_lifetime:
                problems.append(f"{user} {segment}: sequence {r['sequence']} follows {records[i - 1]['sequence']}")
                break
    return problems


def differences_from_fault_free(expected: Sequence[Transition], committed: Sequence[Committed]) -> list[str]:
    """Invariant 3: the committed log equals a fault-free run's: the same records, field by field
    (the emission wall-clock time aside), and each user's transitions in the same order."""
    want = {t.transition_id: comparable(t.to_record(0)) for t in expected}
    got: dict[str, dict] = {}
    for c in committed:
        got.setdefault(c.transition_id, comparable(c.record))
    problems = [
        f"unexpected {tid} ({r['user_id']} {r['segment']} {r['kind']})" for tid, r in got.items() if tid not in want
    ]
    problems += [
        f"{tid} ({r['user_id']} {r['segment']} {r['kind']}) differs: {_difference(r, got[tid])}"
        for tid, r in want.items()
        if tid in got and got[tid] != r
    ]
    want_order: dict[str, list[str]] = defaultdict(list)
    for t in expected:
        want_order[t.user_id].append(t.transition_id)
    got_order: dict[str, list[str]] = defaultdict(list)
    for c in sorted(committed, key=lambda c: (c.partition, c.offset)):
        if c.transition_id not in got_order[c.record["user_id"]]:
            got_order[c.record["user_id"]].append(c.transition_id)
    problems += [
        f"{user}: transitions committed in another order"
        for user, ids in want_order.items()
        if got_order.get(user) != ids and set(got_order.get(user, ())) == set(ids)
    ]
    return problems


def _difference(want: dict, got: dict, path: str = "") -> list[str]:
    """Where two records differ, as paths with both values."""
    out = []
    for key in sorted(set(want) | set(got)):
        a, b = want.get(key), got.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += _difference(a, b, f"{path}{key}.")
        else:
            out.append(f"{path}{key}: expected {a!r}, committed {b!r}")
    return out


def memberships_of(committed: Iterable[Committed]) -> dict[str, dict[str, tuple[int, int]]]:
    """What a replay of the committed log leaves: per user, segment -> (sequence, entered at)."""
    last: dict[tuple[str, str], dict] = {}
    for c in committed:
        key = (c.record["user_id"], c.record["segment"])
        if key not in last or c.record["sequence"] > last[key]["sequence"]:
            last[key] = c.record
    out: dict[str, dict[str, tuple[int, int]]] = defaultdict(dict)
    for (user, segment), r in last.items():
        if r["kind"] == "ENTER":
            out[user][segment] = (r["sequence"], r["event_time"])
    return out


def redis_differences(committed: Sequence[Committed], view, segments: Iterable[str]) -> list[str]:
    """Invariant 4: Redis (a jobs.redis_view.RedisSegmentView) equals a replay of the committed
    log: every user's segments with sequence and entry time, and every segment's member set."""
    want = memberships_of(committed)
    users = {c.record["user_id"] for c in committed}
    problems = [
        f"{user}: Redis has {view.segments_of(user)}, the log says {want.get(user, {})}"
        for user in sorted(users)
        if view.segments_of(user) != want.get(user, {})
    ]
    for segment in segments:
        members = {u for u, segs in want.items() if segment in segs}
        if view.members(segment) != members:
            problems.append(f"members of {segment}: Redis {len(view.members(segment))}, the log {len(members)}")
    return problems


def dead_letter_differences(
    injected: Sequence[tuple[str, bytes]], letters: Sequence[dict], valid_payloads: set[bytes]
) -> list[str]:
    """Invariant 5: the dead-letter topic holds exactly the injected bad and too-late events, each
    with its reason (as (reason, payload) pairs; oversize payloads are kept truncated), and no
    valid event."""
    got = Counter((d["reason"], bytes(d["payload"])) for d in letters)
    want = Counter(injected)
    problems = [
        f"dead letter {reason} missing ({len(payload)} bytes)"
        for (reason, payload), n in (want - got).items()
        for _ in range(n)
    ]
    problems += [
        f"unexpected dead letter {reason} ({len(payload)} bytes)"
        for (reason, payload), n in (got - want).items()
        for _ in range(n)
    ]
    problems += [
        f"a valid event was dead-lettered as {d['reason']}"
        for d in letters
        if bytes(d["payload"]) in valid_payloads and (d["reason"], bytes(d["payload"])) not in want
    ]
    return problems
