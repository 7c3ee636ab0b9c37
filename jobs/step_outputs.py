"""Everything the keyed function produces in one step (an event, a timer, a request), written as one
byte array that the Java operator `segments.steps.SplitStepOutputs` (infra/java) splits into the
job's streams: transitions on its main output, profile snapshots and keyed records (dead letters,
identity feedback, erasure audits) on side outputs.

Why one record per step: each record a Python function yields goes through PyFlink's per-record
Python (the generator chain, a converter, a `Row`) and crosses into Java on its own, and a keyed
broadcast function's side outputs yielded from `on_timer` are not routed in thread mode
(docs/architecture.md, "Broadcast state in thread mode"). The split also keeps the per-segment
transition counters in Java, off the keyed thread.

The layout, big-endian, item after item to the end of the array:

    item        := kind:u8 body
    TRANSITION  := user_id:str segment:str kind:u8 sequence:i64 event_time:i64 payload:bytes rule:str
                   (kind 0 EXIT, 1 ENTER, 2 an erasure marker for the Redis view: segment "",
                   the sequence up to which the user's entries go, payload and rule empty)
    SNAPSHOT    := user_id:str cause_event_id:str? payload:bytes
    keyed kinds := key:str? payload:bytes
    str         := length:i32 UTF-8 (length -1: null, where marked ?)
    bytes       := length:i32 bytes
"""

from __future__ import annotations

import struct

TRANSITION = 1
SNAPSHOT = 2
DEAD_LETTER = 3
IDENTITY_FEEDBACK = 4
ERASURE_AUDIT = 5
SHADOW_TRANSITION = 6  # a candidate in shadow's transition (docs/deployments.md), keyed by user id
# The side outputs of keyed records, in kind order from DEAD_LETTER: the Java operator's
# constructor takes their tags in this order.
KEYED_KINDS = (DEAD_LETTER, IDENTITY_FEEDBACK, ERASURE_AUDIT, SHADOW_TRANSITION)

_LENGTH = struct.Struct(">i")
_TRANSITION_FIXED = struct.Struct(">Bqqi")  # kind, sequence, event_time, payload length
ERASE_VIEW = 2  # a TRANSITION item's kind byte for an erasure marker (0 EXIT, 1 ENTER)
_NULL = _LENGTH.pack(-1)


def _text(value: str | None) -> bytes:
    if value is None:
        return _NULL
    raw = value.encode("utf-8")
    return _LENGTH.pack(len(raw)) + raw


class StepOutputs:
    """The outputs of one step, in the order they were added."""

    __slots__ = ("parts",)

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def __bool__(self) -> bool:
        return bool(self.parts)

    def transition(
        self, user_id: str, segment: str, enter: bool, sequence: int, event_time: int, payload: bytes, rule: str
    ) -> None:
        self.parts.append(
            b"\x01"
            + _text(user_id)
            + _text(segment)
            + _TRANSITION_FIXED.pack(enter, sequence, event_time, len(payload))
            + payload
            + _text(rule)
        )

    def erase_view(self, user_id: str, up_to_sequence: int, event_time: int) -> None:
        """The Redis view's erasure marker (docs/redis.md), a transition row of kind ERASE that
        only the view's sink takes."""
        self.parts.append(
            b"\x01"
            + _text(user_id)
            + _text("")
            + _TRANSITION_FIXED.pack(ERASE_VIEW, up_to_sequence, event_time, 0)
            + _text("")
        )

    def snapshot(self, user_id: str, cause_event_id: str | None, payload: bytes) -> None:
        self.parts.append(b"\x02" + _text(user_id) + _text(cause_event_id) + _LENGTH.pack(len(payload)) + payload)

    def dead_letter(self, letter: tuple[str | None, bytes]) -> None:
        """A (key, DeadLetter record) pair."""
        self.keyed(DEAD_LETTER, *letter)

    def keyed(self, kind: int, key: str | None, payload: bytes) -> None:
        self.parts.append(bytes((kind,)) + _text(key) + _LENGTH.pack(len(payload)) + payload)

    def frame(self) -> bytes:
        return b"".join(self.parts)
