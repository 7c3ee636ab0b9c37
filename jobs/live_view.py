"""The live view's figures: segment sizes, entries, exits, flaps and event latency, kept in Redis
so that they survive restarts of every process (docs/metrics.md, docs/operations.md).

Where each figure comes from:

* **sizes** are the view's member sets (`SCARD {prefix}:members:{segment}`), which are written
  only from committed transitions (docs/redis.md): no counter of ours, nothing to reset;
* **entries, exits, flaps and the event latency** are tallied by the view follower
  (jobs/redis_follower.py) from the committed transitions topic, in the same Redis transaction
  as its resume offsets, with the positions (partition, offset) it counted: a transition read
  again (a restart resumes at the first record of a transaction still open, so the records after
  it are read again) is not counted again. A Redis emptied (or flushed) loses the tallies with
  the offsets, and the follower's replay of the topic counts everything again;
* **size history** is sampled by `segments dashboard` into a bounded Redis list, so the page's
  chart starts where it left off after a restart of the dashboard.

A **flap** is an ENTER of a user into a segment less than the flap window (the `warnings:`
section's `flap_window`, 10 minutes by default) in event time after the same user's EXIT from it:
the backtest's definition (jobs/backtest.py), so a live flap rate and a backtest's agree.
"""

from __future__ import annotations

import json
import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from udfs.redis_layout import members_key

# Upper bounds (seconds) of the event -> view latency histogram's buckets; +Inf is implicit.
LATENCY_BUCKETS_S = (0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0)
# An exit is kept this long past the flap window for the flap check, in event time: the follower
# reads partitions in turn, so one partition's events may run ahead of another's by this much.
EXIT_MARGIN_MS = 60 * 60_000
DEFAULT_HISTORY_SAMPLES = 1440  # a day of one-minute samples

# (user_id, segment, kind, event_time_ms): what the tally needs of a transition.
TallyTransition = tuple[str, str, str, int]


def counters_key(prefix: str) -> str:
    """The hash of the follower's tallies: entries:SEG, exits:SEG, flaps:SEG, latency buckets."""
    return f"{prefix}:live:counters"


def counted_key(prefix: str, partition: int) -> str:
    """The sorted set of the offsets of the partition's transitions already tallied, at or above
    the follower's stored resume offset: what a follower that reads them again (after a restart,
    or a batch Redis refused) must not count twice."""
    return f"{prefix}:live:counted:{partition}"


def recent_exits_key(prefix: str, segment: str) -> str:
    """The sorted set user -> event time of their last EXIT from the segment, pruned to the flap
    window (plus EXIT_MARGIN_MS) behind the newest transition seen."""
    return f"{prefix}:live:exits:{segment}"


def size_history_key(prefix: str) -> str:
    """The list of size samples, newest first, as JSON {"t": epoch ms, "sizes": {segment: n}}."""
    return f"{prefix}:live:sizes"


# -- the tally (pure: unit-tested without Redis) --------------------------------------------------


@dataclass
class Tally:
    """What a batch of committed transitions adds to the counters, and the exits to remember."""

    increments: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    latency_sum_ms: int = 0
    exits: dict[str, dict[str, int]] = field(default_factory=lambda: defaultdict(dict))  # segment -> user -> ms
    newest_event_ms: int = 0


def latency_bucket(seconds: float) -> str:
    """The label of the smallest bucket that holds `seconds` ("+Inf" above the last)."""
    for bound in LATENCY_BUCKETS_S:
        if seconds <= bound:
            return f"{bound:g}"
    return "+Inf"


def tally(
    batch: Sequence[TallyTransition],
    last_exits: Mapping[tuple[str, str], int],
    flap_window_ms: int,
    now_ms: int,
) -> Tally:
    """The counters' increments for `batch` (in the topic's order): an entry and an exit per
    ENTER and EXIT, a flap per ENTER less than `flap_window_ms` after the same user's last EXIT
    from the segment (looked up in `last_exits`, (segment, user) -> event time, then in the batch
    itself), and the latency `now_ms - event_time` of each transition, bucketed."""
    out = Tally()
    exits: dict[tuple[str, str], int] = {}
    for user_id, segment, kind, event_time in batch:
        out.newest_event_ms = max(out.newest_event_ms, event_time)
        key = (segment, user_id)
        if kind == "ENTER":
            out.increments[f"entries:{segment}"] += 1
            left = exits.get(key, last_exits.get(key))
            if left is not None and event_time - left < flap_window_ms:
                out.increments[f"flaps:{segment}"] += 1
        else:
            out.increments[f"exits:{segment}"] += 1
            exits[key] = event_time
            out.exits[segment][user_id] = event_time
        latency_ms = max(0, now_ms - event_time)
        out.increments[f"latency_bucket:{latency_bucket(latency_ms / 1000)}"] += 1
        out.increments["latency_count"] += 1
        out.latency_sum_ms += latency_ms
    if out.latency_sum_ms:
        out.increments["latency_sum_ms"] += out.latency_sum_ms
    return out


def entering(batch: Iterable[TallyTransition]) -> dict[str, list[str]]:
    """segment -> the users the batch lets in: whose last exits the flap check needs."""
    out: dict[str, set[str]] = defaultdict(set)
    for user_id, segment, kind, _ in batch:
        if kind == "ENTER":
            out[segment].add(user_id)
    return {segment: sorted(users) for segment, users in out.items()}


# -- the follower's side: read before its transaction, write inside it ----------------------------


def already_counted(client, prefix: str, positions: Sequence[tuple[int, int]]) -> set[tuple[int, int]]:
    """Of the (partition, offset) positions, those tallied before: one ZMSCORE per partition."""
    by_partition: dict[int, list[int]] = defaultdict(list)
    for partition, offset in positions:
        by_partition[partition].append(offset)
    out = set()
    for partition, offsets in by_partition.items():
        scores = client.zmscore(counted_key(prefix, partition), offsets)
        out.update((partition, o) for o, s in zip(offsets, scores, strict=True) if s is not None)
    return out


def last_exits(client, prefix: str, batch: Sequence[TallyTransition]) -> dict[tuple[str, str], int]:
    """The stored last exits of the users `batch` lets in: one ZMSCORE per segment. Read outside
    the follower's MULTI: the follower is the only writer of these keys (one follower per view)."""
    out = {}
    for segment, users in entering(batch).items():
        scores = client.zmscore(recent_exits_key(prefix, segment), users)
        out.update({(segment, u): int(s) for u, s in zip(users, scores, strict=True) if s is not None})
    return out


def queue_tally(
    pipe,
    prefix: str,
    counted: Tally,
    flap_window_ms: int,
    positions: Sequence[tuple[int, int]],
    stored_offsets: Mapping[int, int],
) -> None:
    """Queues the tally's writes on the follower's MULTI pipeline, beside its offsets: the
    counters, the positions counted, the exits to remember, and the pruning of the positions
    below the resume offsets already stored (never read again) and of the exits too old to make
    a flap."""
    by_partition: dict[int, dict[str, int]] = defaultdict(dict)
    for partition, offset in positions:
        by_partition[partition][str(offset)] = offset
    for partition, offsets in by_partition.items():
        pipe.zadd(counted_key(prefix, partition), offsets)
    for partition, offset in stored_offsets.items():
        pipe.zremrangebyscore(counted_key(prefix, partition), "-inf", f"({offset}")
    if counted.increments:
        key = counters_key(prefix)
        for name, n in counted.increments.items():
            pipe.hincrby(key, name, n)
    oldest_kept = counted.newest_event_ms - flap_window_ms - EXIT_MARGIN_MS
    for segment, users in counted.exits.items():
        key = recent_exits_key(prefix, segment)
        pipe.zadd(key, users)
        pipe.zremrangebyscore(key, "-inf", f"({oldest_kept}")
        # A segment nobody leaves any more keeps no user ids: the set goes as a whole, in wall time.
        pipe.pexpire(key, flap_window_ms + EXIT_MARGIN_MS)


# -- reading the figures --------------------------------------------------------------------------


@dataclass(frozen=True)
class SegmentFigures:
    segment: str
    members: int
    entries: int
    exits: int
    flaps: int

    @property
    def flap_rate(self) -> float:
        """Flaps per entry, as the backtest reports it."""
        return self.flaps / self.entries if self.entries else 0.0


@dataclass(frozen=True)
class LiveFigures:
    segments: list[SegmentFigures]
    latency_buckets: dict[str, int]  # bucket label -> transitions in it (not cumulative)
    latency_sum_ms: int
    latency_count: int

    def prometheus(self) -> str:
        """The Prometheus text exposition format (version 0.0.4)."""
        lines = []

        def family(name: str, kind: str, help_text: str, values: Iterable[tuple[str, int | float]]) -> None:
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")
            lines.extend(f"{name}{labels} {value}" for labels, value in values)

        def seg(s: SegmentFigures) -> str:
            return f'{{segment="{label_value(s.segment)}"}}'

        family(
            "segments_segment_members",
            "gauge",
            "Members of the segment now: the Redis view's member set (SCARD).",
            ((seg(s), s.members) for s in self.segments),
        )
        family(
            "segments_segment_entries_total",
            "counter",
            "Committed ENTER transitions of the segment, counted by the view follower.",
            ((seg(s), s.entries) for s in self.segments),
        )
        family(
            "segments_segment_exits_total",
            "counter",
            "Committed EXIT transitions of the segment, counted by the view follower.",
            ((seg(s), s.exits) for s in self.segments),
        )
        family(
            "segments_segment_flaps_total",
            "counter",
            "ENTERs less than the flap window (event time) after the same user's EXIT from the segment.",
            ((seg(s), s.flaps) for s in self.segments),
        )
        cumulative, buckets = 0, []
        for bound in LATENCY_BUCKETS_S:
            cumulative += self.latency_buckets.get(f"{bound:g}", 0)
            buckets.append((f'{{le="{bound:g}"}}', cumulative))
        buckets.append(('{le="+Inf"}', self.latency_count))
        name = "segments_transition_latency_seconds"
        family(
            name,
            "histogram",
            "Event time to the view follower reading the transition committed (an upper bound of event to Redis).",
            (),
        )
        lines.extend(f"{name}_bucket{labels} {n}" for labels, n in buckets)
        lines.append(f"{name}_sum {self.latency_sum_ms / 1000:g}")
        lines.append(f"{name}_count {self.latency_count}")
        return "\n".join(lines) + "\n"


# Every metric family `LiveFigures.prometheus` exports (the infra test checks the dashboard's
# queries against it; a unit test checks it against the text).
EXPORTED_METRICS = (
    "segments_segment_members",
    "segments_segment_entries_total",
    "segments_segment_exits_total",
    "segments_segment_flaps_total",
    "segments_transition_latency_seconds",
)


def label_value(text: str) -> str:
    """A label value escaped as the exposition format wants: backslash, double quote, newline."""
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def view_segments(client, prefix: str, defined: Iterable[str] = ()) -> list[str]:
    """The defined segments and any other the view holds members of (a removed segment's members
    stay until their next evaluation), sorted."""
    start = len(members_key(prefix, ""))
    found = {key[start:].decode() for key in client.scan_iter(match=members_key(prefix, "*"), count=1000)}
    return sorted(found | set(defined))


def segment_sizes(client, prefix: str, segments: Sequence[str]) -> dict[str, int]:
    """segment -> SCARD of its member set, in one round trip."""
    pipe = client.pipeline(transaction=False)
    for segment in segments:
        pipe.scard(members_key(prefix, segment))
    return {segment: int(n) for segment, n in zip(segments, pipe.execute(), strict=True)}


def read_figures(client, prefix: str, defined: Iterable[str] = ()) -> LiveFigures:
    segments = view_segments(client, prefix, defined)
    sizes = segment_sizes(client, prefix, segments)
    counters = {k.decode(): int(v) for k, v in client.hgetall(counters_key(prefix)).items()}
    # A segment the follower has counted transitions of but whose member set is empty and which
    # is no longer defined still has counters: list it, so a counter never vanishes.
    counted = {name.split(":", 1)[1] for name in counters if name.split(":", 1)[0] in ("entries", "exits", "flaps")}
    for segment in sorted(counted - set(sizes)):
        sizes[segment] = 0
    return LiveFigures(
        segments=[
            SegmentFigures(
                segment,
                sizes[segment],
                counters.get(f"entries:{segment}", 0),
                counters.get(f"exits:{segment}", 0),
                counters.get(f"flaps:{segment}", 0),
            )
            for segment in sorted(sizes)
        ],
        latency_buckets={
            name.split(":", 1)[1]: n for name, n in counters.items() if name.startswith("latency_bucket:")
        },
        latency_sum_ms=counters.get("latency_sum_ms", 0),
        latency_count=counters.get("latency_count", 0),
    )


# -- size history and top movers -------------------------------------------------------------------


@dataclass(frozen=True)
class SizeSample:
    at_ms: int
    sizes: dict[str, int]


def record_sample(client, prefix: str, sizes: Mapping[str, int], keep: int, at_ms: int | None = None) -> SizeSample:
    """Adds a size sample to the history and trims it to the newest `keep`."""
    sample = SizeSample(int(time.time() * 1000) if at_ms is None else at_ms, dict(sizes))
    key = size_history_key(prefix)
    pipe = client.pipeline(transaction=True)
    pipe.lpush(key, json.dumps({"t": sample.at_ms, "sizes": sample.sizes}, sort_keys=True))
    pipe.ltrim(key, 0, keep - 1)
    pipe.execute()
    return sample


def size_history(client, prefix: str, since_ms: int = 0) -> list[SizeSample]:
    """The samples taken at or after `since_ms`, oldest first. A sample that is not what
    record_sample writes (another writer of the key) is skipped, never evaluated."""
    out = []
    for raw in client.lrange(size_history_key(prefix), 0, -1):
        try:
            value = json.loads(raw)
            sample = SizeSample(int(value["t"]), {str(k): int(n) for k, n in value["sizes"].items()})
        except (ValueError, KeyError, TypeError, AttributeError):
            continue
        if sample.at_ms >= since_ms:
            out.append(sample)
    return sorted(out, key=lambda s: s.at_ms)


@dataclass(frozen=True)
class Mover:
    segment: str
    before: int
    now: int

    @property
    def change(self) -> int:
        return self.now - self.before


def top_movers(history: Sequence[SizeSample], limit: int = 5) -> list[Mover]:
    """The segments whose size changed most (absolute) between the first and the last sample of
    `history` (oldest first), largest first, ties by name; unchanged segments are left out. A
    segment missing from the first sample started at 0."""
    if len(history) < 2:
        return []
    first, last = history[0].sizes, history[-1].sizes
    movers = [Mover(s, first.get(s, 0), n) for s, n in last.items() if n != first.get(s, 0)]
    movers += [Mover(s, n, 0) for s, n in first.items() if s not in last and n]
    return sorted(movers, key=lambda m: (-abs(m.change), m.segment))[:limit]


def live_warnings(figures: LiveFigures, defined: Iterable[str], min_members: int, max_flap_rate: float) -> list[dict]:
    """Over-segmentation warnings from the live figures, as the backtest words its own
    (jobs/segment_warnings.py): a defined segment with fewer than `min_members` members now, and
    a segment whose flaps per entry exceed `max_flap_rate`. The backtest's overlap warning needs
    member-time over a window, which the live view does not keep."""
    defined = set(defined)
    out = []
    for s in figures.segments:
        if s.segment in defined and s.members < min_members:
            out.append(
                {
                    "kind": "too_small",
                    "segments": [s.segment],
                    "message": f"{s.segment}: too small to act on: {s.members} members now; warned below {min_members}",
                }
            )
        if s.flaps and s.flap_rate > max_flap_rate:
            out.append(
                {
                    "kind": "flapping",
                    "segments": [s.segment],
                    "message": f"{s.segment}: flaps: {s.flaps} of {s.entries} entries ({s.flap_rate:.1%}) came "
                    f"within the flap window after the same user's exit; warned above {max_flap_rate:.1%}",
                }
            )
    return out


def serve_on_thread(handler: type[BaseHTTPRequestHandler], host: str, port: int, what: str) -> ThreadingHTTPServer:
    """An HTTP server for `handler` on a daemon thread of its own (the follower's metrics, the
    dashboard); SystemExit naming `what` if it cannot listen."""
    try:
        server = ThreadingHTTPServer((host, port), handler)
    except OSError as err:
        raise SystemExit(f"{what} cannot listen on {host}:{port}: {err.strerror}") from None
    threading.Thread(target=server.serve_forever, name=f"{handler.__name__}-http", daemon=True).start()
    return server
