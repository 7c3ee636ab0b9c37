"""The Redis view's follower: applies the committed transitions topic to the view and keeps its
place in Redis, so the view catches up by itself after Redis was unavailable or came back empty.

The job's sink (jobs/redis_sink.py) writes each checkpoint's transitions once the checkpoint has
completed: the fast path. When Redis is unreachable for longer than `redis_retry_ms` the sink
leaves that checkpoint's transitions to this follower and the job goes on (the Kafka transitions
never wait for Redis). The follower reads the topic with the project's own read_committed reader
(jobs/committed_log: only committed transitions, as the sink), applies them with the same script
(udfs/redis_layout: a transition only if its sequence is newer than the one Redis holds, so the
follower and the sink may apply the same transition in any order, any number of times), and
stores, in the same Redis transaction, the offset of each partition to resume at. So:

* Redis down: the follower waits (its position is where it was) and catches up when Redis is back;
* Redis restarted empty (or flushed): the stored offsets are gone with the data, and the follower
  replays the topic from its beginning: the view is rebuilt without a manual command;
* the follower restarted: it resumes at the stored offsets.

The resume offset of a partition is the first record of the earliest transaction still open there
(or the next offset to fetch when none is): every record before it is decided and applied.
`segments redis follow` runs it (and `segments run` starts it beside the embedded job); its
figures (lag in records per partition, transitions applied, Redis unavailable) are served in the
Prometheus text format when a metrics port is given.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.exceptions import WatchError

from jobs.committed_log import (
    OFFSET_OUT_OF_RANGE,
    FetchError,
    LeaderConnections,
    PartitionCursor,
    log_start_offset,
    partition_leaders,
)
from jobs.kafka_security import PLAINTEXT, KafkaSecurity
from jobs.live_view import already_counted, last_exits, queue_tally, serve_on_thread, tally
from jobs.redis_view import RedisSegmentView
from jobs.segment_warnings import FLAP_WINDOW_MS
from udfs.codec import DecodeError, SchemaCatalog
from udfs.redis_layout import APPLY_BATCH_LUA, members_key, sequence_key, user_key

log = logging.getLogger("segments.redis_follower")

REDIS_DOWN = (RedisConnectionError, RedisTimeoutError)
# A committed transition as the follower applies it: user_id, segment, kind, sequence,
# event_time_ms, rule, and where it was read (partition, offset) for the live view's tally.
FollowedTransition = tuple[str, str, str, int, int, str, int, int]
BATCH = 1000
CHECK_EVERY_S = 1.0


def offsets_key(prefix: str) -> str:
    """The hash partition -> offset to resume at, kept beside the view it describes."""
    return f"{prefix}:view:offsets"


@dataclass
class FollowerFigures:
    applied: int = 0  # transitions newer than what Redis held
    read: int = 0  # committed transitions read
    replays: int = 0  # times the topic was replayed from its beginning (Redis found empty)
    gaps: int = 0  # times the retention had deleted records the view had not applied
    undecodable: int = 0  # records of the topic that are not SegmentTransitions, skipped
    errors: int = 0  # steps that failed (broker, Kafka metadata, a Redis reply): started over
    redis_unavailable: bool = False
    lag: dict[int, int] = field(default_factory=dict)  # partition -> records below the high watermark not applied

    def prometheus(self) -> str:
        lines = [
            "# TYPE segments_redis_view_applied_total counter",
            f"segments_redis_view_applied_total {self.applied}",
            "# TYPE segments_redis_view_read_total counter",
            f"segments_redis_view_read_total {self.read}",
            "# TYPE segments_redis_view_replays_total counter",
            f"segments_redis_view_replays_total {self.replays}",
            "# TYPE segments_redis_view_gaps_total counter",
            f"segments_redis_view_gaps_total {self.gaps}",
            "# TYPE segments_redis_view_undecodable_total counter",
            f"segments_redis_view_undecodable_total {self.undecodable}",
            "# TYPE segments_redis_view_errors_total counter",
            f"segments_redis_view_errors_total {self.errors}",
            "# TYPE segments_redis_view_redis_unavailable gauge",
            f"segments_redis_view_redis_unavailable {int(self.redis_unavailable)}",
            "# TYPE segments_redis_view_lag_records gauge",
            *(f'segments_redis_view_lag_records{{partition="{p}"}} {n}' for p, n in sorted(self.lag.items())),
        ]
        return "\n".join(lines) + "\n"


class ViewFollower:
    def __init__(
        self,
        view: RedisSegmentView,
        bootstrap_servers: str,
        topic: str,
        poll_s: float = 0.2,
        security: KafkaSecurity = PLAINTEXT,
        flap_window_ms: int = FLAP_WINDOW_MS,
    ):
        self.view = view
        self.flap_window_ms = flap_window_ms  # the live view's flaps (jobs/live_view.py)
        self.bootstrap_servers = bootstrap_servers
        self.security = security
        self.topic = topic
        self.poll_s = poll_s
        self.key = offsets_key(view.prefix)
        self.codec = SchemaCatalog().codec("SegmentTransition")
        self.figures = FollowerFigures()
        self._cursors: dict[int, PartitionCursor] = {}
        self._connections = LeaderConnections({})
        self._positioned = False  # the cursors stand where Redis says
        self._offsets_expected = False  # Redis held (or was given) offsets since the cursors were placed
        self._written: dict[str, int] = {}  # the resume offsets last stored
        self._checked_at = 0.0

    # -- the loop ------------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Follows until `stop` is set; Redis or broker unavailable: waits and tries again."""
        pause = self.poll_s
        while not stop.is_set():
            try:
                progressed = self.step()
                if self.figures.redis_unavailable:
                    log.info("Redis is reachable again: the view catches up from the stored offsets")
                self.figures.redis_unavailable = False
                pause = self.poll_s
                if not progressed:
                    stop.wait(self.poll_s)
            except redis.exceptions.AuthenticationError:
                raise  # not an outage: waiting does not change credentials
            except REDIS_DOWN as err:
                if not self.figures.redis_unavailable:
                    log.warning(
                        "Redis unavailable (%s): the view waits, the transitions are kept in Kafka", type(err).__name__
                    )
                self.figures.redis_unavailable = True
                self._positioned = False  # Redis may come back empty: read the offsets again
                self._connections.close()
                stop.wait(pause)
                pause = min(pause * 2, 5.0)
        self._connections.close()

    def step(self) -> bool:
        """One pass over the partitions: fetch what is new, apply what is committed, store the
        resume offsets with it. True if anything was read."""
        if not self._positioned:
            self._position()
        progressed = False
        for partition in list(self._cursors):
            cursor = self._cursors[partition]
            try:
                high_watermark, entries, next_offset = self._connections.of(partition).fetch_entries(
                    self.topic, partition, cursor.offset
                )
            except FetchError as err:
                if err.code != OFFSET_OUT_OF_RANGE:
                    raise
                self._skip_to_log_start(cursor)
                progressed = True
                continue
            # Released in marker order: applied in offset order, so that each stored offset has
            # everything before it applied (a record's place is what a resume starts from).
            committed = sorted(cursor.take(entries), key=lambda r: r.offset)
            cursor.offset = next_offset
            cursor.high_watermark = high_watermark
            if entries or committed:
                progressed = True
            for start in range(0, len(committed), BATCH):
                rest = committed[start + BATCH :]
                self._apply(
                    [t for r in committed[start : start + BATCH] if (t := self._transition(r)) is not None],
                    self._resume_offsets(partition, rest[0].offset if rest else None),
                )
                if not self._positioned:  # Redis was emptied meanwhile: start again from the beginning
                    return True
            if self._resume_offsets() != self._written:  # markers and aborted records move it too
                self._apply([], self._resume_offsets())
            self.figures.lag[partition] = max(0, high_watermark - self._resume_offset(cursor))
        if not progressed:
            self._check_redis()
        return progressed

    def _check_redis(self) -> None:
        """With nothing new to apply, still look at Redis once in a while: an outage is seen (and
        reported) when it happens, and an empty restart is replayed into at once, not at the next
        transition."""
        now = time.monotonic()
        if now - self._checked_at < CHECK_EVERY_S:
            return
        self._checked_at = now
        if self._offsets_expected and not self.view.client.exists(self.key):
            self._positioned = False

    # -- positions -----------------------------------------------------------------------------

    def _position(self) -> None:
        """Cursors at the stored resume offsets; none stored (a new or an emptied Redis): at the
        beginning, so the whole topic is replayed."""
        stored = {int(p): int(o) for p, o in self.view.client.hgetall(self.key).items()}
        leaders = partition_leaders(self.bootstrap_servers, self.topic, self.security)
        if not stored and (self._offsets_expected or any(c.offset for c in self._cursors.values())):
            self.figures.replays += 1
            log.warning(
                "the Redis view holds no follower offsets (restarted empty or flushed): replaying %s from "
                "its beginning",
                self.topic,
            )
        self._connections.close()
        self._connections = LeaderConnections(leaders, self.security)
        self._cursors = {p: PartitionCursor(p, offset=stored.get(p, 0)) for p in leaders}
        self._offsets_expected = bool(stored)
        self._written = {str(p): o for p, o in stored.items()}
        self._positioned = True

    @staticmethod
    def _resume_offset(cursor: PartitionCursor, unapplied_from: int | None = None) -> int:
        """Where a resume must start: the earliest record not known to be applied, i.e. the first
        of a transaction still open, or (mid-fetch) the first committed record not applied yet."""
        opened = [records[0].offset for records in cursor.pending.values() if records]
        if unapplied_from is not None:
            opened.append(unapplied_from)
        return min(opened, default=cursor.offset)

    def _resume_offsets(self, partition: int | None = None, unapplied_from: int | None = None) -> dict[str, int]:
        """Every partition's resume offset; `partition`'s with its committed records from
        `unapplied_from` on not applied yet."""
        return {
            str(p): self._resume_offset(c, unapplied_from if p == partition else None) for p, c in self._cursors.items()
        }

    def _skip_to_log_start(self, cursor: PartitionCursor) -> None:
        """The offset is below the log start: the retention deleted what the view never saw (a
        follower stopped, or a replay, longer than the topic keeps its records). What is left is
        applied; the gap is counted and said, not hidden."""
        start = log_start_offset(self.bootstrap_servers, self.topic, cursor.partition, self.security)
        if start <= cursor.offset:
            raise FetchError(
                OFFSET_OUT_OF_RANGE,
                f"{self.topic}/{cursor.partition}: offset {cursor.offset} out of range, log start {start}",
            )
        self.figures.gaps += 1
        log.error(
            "%s/%d: records %d to %d were deleted by the topic's retention before the view applied them: "
            "the view misses their transitions (keep the topic's retention longer than any follower outage; "
            "a full rebuild needs all of it)",
            self.topic,
            cursor.partition,
            cursor.offset,
            start - 1,
        )
        cursor.offset = start
        cursor.pending.clear()

    # -- Redis ---------------------------------------------------------------------------------

    def _transition(self, record) -> FollowedTransition | None:
        try:
            t = self.codec.decode(record.value)
        except DecodeError as err:  # not the job's (the payload is never logged)
            self.figures.undecodable += 1
            log.warning(
                "%s/%d@%d is not a SegmentTransition (%s): skipped",
                self.topic,
                record.partition,
                record.offset,
                err.reason,
            )
            return None
        return (
            t["user_id"],
            t["segment"],
            t["kind"],
            t["sequence"],
            t["event_time"],
            t["reason"]["rule"],
            record.partition,
            record.offset,
        )

    def _apply(self, batch: list[FollowedTransition], offsets: dict[str, int]) -> None:
        """The batch, then the resume offsets, in one script (APPLY_BATCH_LUA: if a transition
        fails, the script stops before the offsets, so they never pass it), under WATCH of the
        offsets: if Redis was emptied meanwhile, nothing is written and the cursors go back to
        where Redis says (the beginning). EVAL, not EVALSHA: no script cache to have lost. The
        live view's tallies of the batch (jobs/live_view.py) go in the same transaction, with the
        positions they counted: a transition read again is not counted again."""
        view, prefix = self.view, self.view.prefix
        positions = [(partition, offset) for *_, partition, offset in batch]
        keys = [self.key]
        args: list = [len(batch)]
        for user_id, segment, kind, sequence, event_time, rule, _, _ in batch:
            keys += [user_key(prefix, user_id), sequence_key(prefix, user_id), members_key(prefix, segment)]
            args += [segment, kind, sequence, event_time, user_id, view.retention_ms, rule]
        for partition, offset in offsets.items():
            args += [partition, offset]
        with view.client.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(self.key)
                if self._offsets_expected and not pipe.exists(self.key):
                    raise WatchError("the offsets are gone")
                seen = already_counted(pipe, prefix, positions)
                tallied = [(t[0], t[1], t[2], t[4]) for t in batch if (t[6], t[7]) not in seen]
                counted = tally(
                    tallied, last_exits(pipe, prefix, tallied), self.flap_window_ms, int(time.time() * 1000)
                )
                pipe.multi()
                # Redis's EVAL of the fixed script constant: the transitions travel as its KEYS and
                # ARGV (data), never as script text.
                pipe.eval(APPLY_BATCH_LUA, len(keys), *keys, *args)
                stored = {int(p): o for p, o in self._written.items()}
                queue_tally(pipe, prefix, counted, self.flap_window_ms, positions, stored)
                applied = pipe.execute()[0]
            except WatchError:  # emptied, or another writer of the offsets: place the cursors again
                self._positioned = False
                return
        self.figures.read += len(batch)
        self.figures.applied += applied
        self._offsets_expected = True
        self._written = offsets

    def start_over(self) -> None:
        """The next step places the cursors again where Redis says."""
        self._positioned = False
        self._connections.close()


class _MetricsHandler(BaseHTTPRequestHandler):
    figures: FollowerFigures

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        body = self.figures.prometheus().encode()
        self.send_response(200 if self.path.startswith("/metrics") else 404)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:  # scrapes are not news
        pass


def serve_metrics(figures: FollowerFigures, port: int, host: str = "127.0.0.1") -> ThreadingHTTPServer:
    handler = type("FollowerMetrics", (_MetricsHandler,), {"figures": figures})
    return serve_on_thread(handler, host, port, "the follower's metrics endpoint")


def connect_view(url: str, prefix: str, retention_ms: int, stop: threading.Event) -> RedisSegmentView | None:
    """The view, once Redis answers (the follower may start while Redis is down); None if stopped."""
    pause = 0.2
    while not stop.is_set():
        try:
            return RedisSegmentView(url, prefix, retention_ms)
        except redis.exceptions.AuthenticationError:
            raise  # waiting does not change credentials
        except REDIS_DOWN:
            stop.wait(pause)
            pause = min(pause * 2, 5.0)
    return None


def follow(settings, stop: threading.Event, metrics_port: int | None = None) -> FollowerFigures:
    """Runs the follower for `settings` until `stop` is set (a thread of `segments run`, or the
    whole of `segments redis follow`). Only credentials Redis refuses end it (with an error): a
    broker or Redis down, a topic not created yet, a failed step are waited out and started over
    from the offsets stored in Redis."""
    figures = FollowerFigures()
    server = serve_metrics(figures, metrics_port, settings.redis_follower_metrics_host) if metrics_port else None
    try:
        view = connect_view(settings.redis_url, settings.redis_key_prefix, settings.profile.retention_ms, stop)
        if view is None:
            return figures
        follower = ViewFollower(
            view,
            settings.bootstrap_servers,
            settings.transitions_topic,
            security=settings.kafka_security(),
            flap_window_ms=settings.warnings.flap_window_ms,
        )
        follower.figures = figures
        try:
            while not stop.is_set():
                try:
                    follower.run(stop)
                except redis.exceptions.AuthenticationError:
                    raise
                except Exception as err:  # noqa: BLE001 (KafkaException, a fetch error, a Redis reply, ...)
                    figures.errors += 1
                    log.warning(
                        "the follower starts over from the stored offsets after: %s: %s",
                        type(err).__name__,
                        str(err)[:300],
                    )
                    follower.start_over()
                    stop.wait(2.0)
        finally:
            view.close()
        return figures
    except redis.exceptions.AuthenticationError as err:
        log.error("Redis refused the follower's credentials (%s): the view is not followed", type(err).__name__)
        raise
    finally:
        if server is not None:
            server.shutdown()
