"""Writes transitions into the Redis view and reads it back (see udfs/redis_layout.py): the client
of `segments redis rebuild` and of the tests. The running job writes the view through its own sink
(jobs/redis_sink.py, infra/java)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import redis
from redis.exceptions import NoScriptError

from jobs.kafka_security import PLAINTEXT, KafkaSecurity
from udfs.redis_layout import APPLY_TRANSITION_LUA, members_key, parse_membership, sequence_key, user_key

# (user_id, segment, kind, sequence, event_time_ms, rule); the rule may be left off (stored as "").
ViewTransition = tuple[str, str, str, int, int] | tuple[str, str, str, int, int, str]


def resolve_redis_url(url: str) -> str:
    """`env:NAME` is the URL in the environment variable NAME (as the job's Redis sink reads it on
    the workers); anything else is the URL itself."""
    if not url.startswith("env:"):
        return url
    value = os.environ.get(url[4:], "")
    if not value:
        raise ValueError(f"the Redis URL variable {url[4:]} is not set")
    return value


# Layout 1 to 2 for one user: KEYS user hash, sequence hash. Returns 1 if the user is in a segment.
_PERSIST_MEMBER_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('PERSIST', KEYS[1])
redis.call('PERSIST', KEYS[2])
return 1
"""


@dataclass(frozen=True)
class CurrentSegment:
    """One of a user's current segments as the view holds it."""

    segment: str
    sequence: int
    entered_at_ms: int
    rule: str  # the rule that let the user in; "" when written by layout 1, which kept none


class RedisSegmentView:
    def __init__(self, url: str, prefix: str, retention_ms: int, load_apply_script: bool = True):
        """`retention_ms`: the profile retention (settings.profile.retention_ms), how long the
        sequence guard of a user holding no segment is kept; 0 keeps it for good. Without
        `load_apply_script` (the lookups) no script is loaded, so a read-only ACL user will do."""
        self.prefix = prefix
        self.retention_ms = retention_ms
        url = resolve_redis_url(url)
        # rediss:// verifies the certificate against ?ssl_ca_certs=FILE (or the system's CAs) and,
        # unlike redis-py's default, that it names the host, as the job's Java sink does.
        tls = {"ssl_check_hostname": True} if url.startswith("rediss://") else {}
        self.client = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5, **tls)
        self.client.ping()  # fail fast on a bad address, before any record is consumed
        # Loaded here, not at the first write: a Redis user without EVALSHA/SCRIPT fails the writer at once.
        self._script_sha = self.client.script_load(APPLY_TRANSITION_LUA) if load_apply_script else ""

    def apply(self, transitions: Iterable[ViewTransition]) -> int:
        """Applies (user_id, segment, kind, sequence, event_time_ms[, rule]) in one round trip;
        returns how many were newer than what Redis held."""
        batch = list(transitions)
        if not batch:
            return 0
        try:
            return self._apply(batch)
        except NoScriptError:
            # Redis restarted (or SCRIPT FLUSH) since the script was loaded: no EVALSHA of the
            # batch ran, so load it again and send the whole batch once more.
            self._script_sha = self.client.script_load(APPLY_TRANSITION_LUA)
            return self._apply(batch)

    def _apply(self, batch: list[ViewTransition]) -> int:
        # EVALSHA straight away: redis-py's Script object would send SCRIPT EXISTS before every
        # pipeline, a second round trip per write.
        pipe = self.client.pipeline(transaction=False)
        sha, prefix, retention_ms = self._script_sha, self.prefix, self.retention_ms
        for transition in batch:
            user_id, segment, kind, sequence, event_time = transition[:5]
            pipe.evalsha(
                sha,
                3,
                user_key(prefix, user_id),
                sequence_key(prefix, user_id),
                members_key(prefix, segment),
                segment,
                kind,
                sequence,
                event_time,
                user_id,
                retention_ms,
                transition[5] if len(transition) > 5 else "",
            )
        return sum(pipe.execute())

    def current_segments(self, user_id: str) -> list[CurrentSegment]:
        """The user's current segments, by entry time; empty for a user the view does not hold."""
        raw = self.client.hgetall(user_key(self.prefix, user_id))
        out = [CurrentSegment(seg.decode(), *parse_membership(value.decode())) for seg, value in raw.items()]
        return sorted(out, key=lambda c: (c.entered_at_ms, c.segment))

    def segments_of(self, user_id: str) -> dict[str, tuple[int, int]]:
        """The user's current segments as segment -> (sequence, entered_at_ms)."""
        return {c.segment: (c.sequence, c.entered_at_ms) for c in self.current_segments(user_id)}

    def members(self, segment: str) -> set[str]:
        """Every member of the segment at once: for tests and small segments (see iter_members)."""
        return {m.decode() for m in self.client.smembers(members_key(self.prefix, segment))}

    def iter_members(self, segment: str, batch: int = 1000) -> Iterator[str]:
        """The segment's members, SSCAN `batch` at a time: never the whole set in one reply nor in
        memory. SSCAN's guarantee: every member present throughout the scan is listed; one that
        joins or leaves meanwhile may or may not be; one may be listed twice if the set is resized
        during the scan."""
        for member in self.client.sscan_iter(members_key(self.prefix, segment), count=batch):
            yield member.decode()

    def member_count(self, segment: str) -> int:
        return int(self.client.scard(members_key(self.prefix, segment)))

    def holds_user(self, user_id: str) -> bool:
        """True when the view holds anything of the user: segments, or the sequences of a user who
        left them within the retention."""
        return bool(self.client.exists(user_key(self.prefix, user_id), sequence_key(self.prefix, user_id)))

    def has_members_key(self, segment: str) -> bool:
        return bool(self.client.exists(members_key(self.prefix, segment)))

    def upgrade_layout(self) -> int:
        """Layout 1 to 2 in place: layout 1 gave every user's keys a TTL from their last
        transition, which would drop a member's user hash while the member sets keep them. Clears
        the TTL of every user hash (a user in a segment) and of its sequence hash; a user in no
        segment keeps the TTL of their sequence hash. Returns how many users it kept. Idempotent,
        and safe while the job writes: each user's check and PERSISTs are one script, so a user
        who has just left their last segment keeps the TTL of their sequence hash."""
        kept = 0
        start = len(user_key(self.prefix, ""))
        pipe = self.client.pipeline(transaction=False)
        for key in self.client.scan_iter(match=user_key(self.prefix, "*"), count=1000, _type="hash"):
            pipe.eval(_PERSIST_MEMBER_LUA, 2, key, sequence_key(self.prefix, key[start:].decode()))
            if len(pipe) >= 1000:
                kept += sum(pipe.execute())
        kept += sum(pipe.execute())
        return kept

    def clear(self) -> int:
        """Deletes every key of this view's prefix (a rebuild from scratch); returns how many."""
        deleted = 0
        batch = []
        for key in self.client.scan_iter(match=f"{self.prefix}:*", count=1000):
            batch.append(key)
            if len(batch) == 1000:
                deleted += self.client.unlink(*batch)
                batch = []
        if batch:
            deleted += self.client.unlink(*batch)
        return deleted

    def close(self) -> None:
        self.client.close()


@dataclass(frozen=True)
class RebuildResult:
    read: int  # committed transitions read
    applied: int  # of those, newer than what Redis held
    aborted: int  # transitions of aborted transactions, skipped
    open_left: int  # transitions of transactions still open when the read stopped, skipped


def rebuild_from_topic(
    view: RedisSegmentView,
    bootstrap_servers: str,
    topic: str,
    batch_size: int = 1000,
    open_wait_s: float = 30.0,
    security: KafkaSecurity = PLAINTEXT,
) -> RebuildResult:
    """Replays every committed transition of the topic into the view.

    Only committed ones: the topic is read with jobs.committed_log, which keeps a transactional
    record only once its transaction's commit marker is read (librdkafka's read_committed returns
    the records of aborted transactions on tansu, the local broker). A transaction still open at
    the end of the topic is waited for up to `open_wait_s`: the job may be committing it right then,
    and its transitions may have reached the Redis that was lost already.

    Safe while the job runs: the job's sink and the rebuild both apply only committed transitions,
    each only if its sequence is newer than what Redis holds, so neither order nor repeats matter."""
    from jobs.committed_log import ReadSummary, committed_records
    from udfs.codec import SchemaCatalog

    codec = SchemaCatalog().codec("SegmentTransition")
    summary = ReadSummary()
    read = applied = 0
    pending: list[ViewTransition] = []
    for record in committed_records(
        bootstrap_servers, topic, open_wait_s=open_wait_s, summary=summary, security=security
    ):
        t = codec.decode(record.value)
        pending.append((t["user_id"], t["segment"], t["kind"], t["sequence"], t["event_time"], t["reason"]["rule"]))
        read += 1
        if len(pending) >= batch_size:
            applied += view.apply(pending)
            pending = []
    if pending:
        applied += view.apply(pending)
    return RebuildResult(read, applied, summary.aborted, summary.open_left)
