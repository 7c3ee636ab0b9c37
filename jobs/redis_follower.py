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

from jobs.committed_log import _Connection, _fetch_entries, _PartitionCursor, partition_leaders
from jobs.redis_view import RedisSegmentView
from udfs.codec import SchemaCatalog
from udfs.redis_layout import APPLY_TRANSITION_LUA, members_key, sequence_key, user_key

log = logging.getLogger("segments.redis_follower")

REDIS_DOWN = (RedisConnectionError, RedisTimeoutError)
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
            "# TYPE segments_redis_view_redis_unavailable gauge",
            f"segments_redis_view_redis_unavailable {int(self.redis_unavailable)}",
            "# TYPE segments_redis_view_lag_records gauge",
            *(f'segments_redis_view_lag_records{{partition="{p}"}} {n}' for p, n in sorted(self.lag.items())),
        ]
        return "\n".join(lines) + "\n"


class ViewFollower:
    def __init__(self, view: RedisSegmentView, bootstrap_servers: str, topic: str, poll_s: float = 0.2):
        self.view = view
        self.bootstrap_servers = bootstrap_servers
        self.topic = topic
        self.poll_s = poll_s
        self.key = offsets_key(view.prefix)
        self.codec = SchemaCatalog().codec("SegmentTransition")
        self.figures = FollowerFigures()
        self._cursors: dict[int, _PartitionCursor] = {}
        self._connections: dict[tuple[str, int], _Connection] = {}
        self._leaders: dict[int, tuple[str, int]] = {}
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
            except REDIS_DOWN as err:
                if not self.figures.redis_unavailable:
                    log.warning("Redis unavailable (%s): the view waits, the transitions are kept in Kafka",
                                type(err).__name__)
                self.figures.redis_unavailable = True
                self._positioned = False  # Redis may come back empty: read the offsets again
                self._close_connections()
                stop.wait(pause)
                pause = min(pause * 2, 5.0)
        self._close_connections()

    def step(self) -> bool:
        """One pass over the partitions: fetch what is new, apply what is committed, store the
        resume offsets with it. True if anything was read."""
        if not self._positioned:
            self._position()
        progressed = False
        for partition in list(self._cursors):
            cursor = self._cursors[partition]
            conn = self._connection(partition)
            high_watermark, entries, next_offset = _fetch_entries(conn, self.topic, partition, cursor.offset)
            committed = cursor.take(entries)
            cursor.offset = next_offset
            cursor.high_watermark = high_watermark
            if entries or committed:
                progressed = True
            for start in range(0, len(committed), BATCH):
                self._apply([self._transition(r.value) for r in committed[start:start + BATCH]])
                if not self._positioned:  # Redis was emptied meanwhile: start again from the beginning
                    return True
            if self._resume_offsets() != self._written:  # markers and aborted records move it too
                self._apply([])
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
        self._leaders = partition_leaders(self.bootstrap_servers, self.topic)
        if not stored and (self._offsets_expected or any(c.offset for c in self._cursors.values())):
            self.figures.replays += 1
            log.warning("the Redis view holds no follower offsets (restarted empty or flushed): replaying %s from "
                        "its beginning", self.topic)
        self._close_connections()
        self._cursors = {p: _PartitionCursor(p, offset=stored.get(p, 0)) for p in self._leaders}
        self._offsets_expected = bool(stored)
        self._written = {str(p): o for p, o in stored.items()}
        self._positioned = True

    @staticmethod
    def _resume_offset(cursor: _PartitionCursor) -> int:
        opened = [records[0].offset for records in cursor.pending.values() if records]
        return min(opened, default=cursor.offset)

    def _resume_offsets(self) -> dict[str, int]:
        return {str(p): self._resume_offset(c) for p, c in self._cursors.items()}

    # -- Redis ---------------------------------------------------------------------------------

    def _transition(self, value: bytes) -> tuple[str, str, str, int, int]:
        t = self.codec.decode(value)
        return t["user_id"], t["segment"], t["kind"], t["sequence"], t["event_time"]

    def _apply(self, batch: list[tuple[str, str, str, int, int]]) -> None:
        """The batch and every partition's resume offset in one MULTI/EXEC, under WATCH of the
        offsets: if Redis was emptied meanwhile, nothing is written and the cursors go back to
        where Redis says (the beginning). EVAL, not EVALSHA, inside the transaction: a script
        flushed since it was loaded must not fail a command while the offsets still advance."""
        view, prefix = self.view, self.view.prefix
        offsets = self._resume_offsets()
        with view.client.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(self.key)
                if self._offsets_expected and not pipe.exists(self.key):
                    raise WatchError("the offsets are gone")
                pipe.multi()
                for user_id, segment, kind, sequence, event_time in batch:
                    pipe.eval(APPLY_TRANSITION_LUA, 3, user_key(prefix, user_id), sequence_key(prefix, user_id),
                              members_key(prefix, segment), segment, kind, sequence, event_time, user_id,
                              view.ttl_s)
                pipe.hset(self.key, mapping=offsets)
                replies = pipe.execute()
            except WatchError:  # emptied, or another writer of the offsets: place the cursors again
                self._positioned = False
                return
        self.figures.read += len(batch)
        self.figures.applied += sum(replies[:len(batch)])
        self._offsets_expected = True
        self._written = offsets

    def start_over(self) -> None:
        """The next step places the cursors again where Redis says."""
        self._positioned = False
        self._close_connections()

    # -- the broker ----------------------------------------------------------------------------

    def _connection(self, partition: int) -> _Connection:
        leader = self._leaders[partition]
        conn = self._connections.get(leader)
        if conn is None:
            conn = self._connections[leader] = _Connection(*leader)
        return conn

    def _close_connections(self) -> None:
        for conn in self._connections.values():
            conn.close()
        self._connections.clear()


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


def serve_metrics(figures: FollowerFigures, port: int) -> ThreadingHTTPServer:
    handler = type("FollowerMetrics", (_MetricsHandler,), {"figures": figures})
    server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    threading.Thread(target=server.serve_forever, name="redis-follower-metrics", daemon=True).start()
    return server


def connect_view(url: str, prefix: str, ttl_s: int, stop: threading.Event) -> RedisSegmentView | None:
    """The view, once Redis answers (the follower may start while Redis is down); None if stopped."""
    pause = 0.2
    while not stop.is_set():
        try:
            return RedisSegmentView(url, prefix, ttl_s)
        except REDIS_DOWN:
            stop.wait(pause)
            pause = min(pause * 2, 5.0)
    return None


def follow(settings, stop: threading.Event, metrics_port: int | None = None) -> FollowerFigures:
    """Runs the follower for `settings` until `stop` is set (a thread of `segments run`, or the
    whole of `segments redis follow`)."""
    figures = FollowerFigures()
    server = serve_metrics(figures, metrics_port) if metrics_port else None
    try:
        view = connect_view(settings.redis_url, settings.redis_key_prefix, settings.redis_user_ttl_s, stop)
        if view is None:
            return figures
        follower = ViewFollower(view, settings.bootstrap_servers, settings.transitions_topic)
        follower.figures = figures
        try:
            while not stop.is_set():
                try:
                    follower.run(stop)
                except (RuntimeError, OSError, redis.exceptions.RedisError) as err:
                    # The topic not there yet (the job creates it), a leader change, a broker
                    # restart: start over from the stored offsets after a pause.
                    log.warning("the follower starts over after: %s", err)
                    follower.start_over()
                    stop.wait(2.0)
        finally:
            view.close()
        return figures
    finally:
        if server is not None:
            server.shutdown()
