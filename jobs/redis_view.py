"""Writes transitions into the Redis view and reads it back (see udfs/redis_layout.py): the client
of `segments redis rebuild` and of the tests. The running job writes the view through its own sink
(jobs/redis_sink.py, infra/java)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

import redis
from redis.exceptions import NoScriptError

from jobs.kafka_security import PLAINTEXT, KafkaSecurity
from udfs.redis_layout import APPLY_TRANSITION_LUA, members_key, sequence_key, user_key


def resolve_redis_url(url: str) -> str:
    """`env:NAME` is the URL in the environment variable NAME (as the job's Redis sink reads it on
    the workers); anything else is the URL itself."""
    if not url.startswith("env:"):
        return url
    value = os.environ.get(url[4:], "")
    if not value:
        raise ValueError(f"the Redis URL variable {url[4:]} is not set")
    return value


class RedisSegmentView:
    def __init__(self, url: str, prefix: str, ttl_s: int):
        self.prefix = prefix
        self.ttl_s = ttl_s
        url = resolve_redis_url(url)
        # rediss:// verifies the certificate against ?ssl_ca_certs=FILE (or the system's CAs) and,
        # unlike redis-py's default, that it names the host, as the job's Java sink does.
        tls = {"ssl_check_hostname": True} if url.startswith("rediss://") else {}
        self.client = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5, **tls)
        self.client.ping()  # fail fast on a bad address, before any record is consumed
        self._script_sha = self.client.script_load(APPLY_TRANSITION_LUA)

    def apply(self, transitions: Iterable[tuple[str, str, str, int, int]]) -> int:
        """Applies (user_id, segment, kind, sequence, event_time_ms) in one round trip; returns
        how many were newer than what Redis held."""
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

    def _apply(self, batch: list[tuple[str, str, str, int, int]]) -> int:
        # EVALSHA straight away: redis-py's Script object would send SCRIPT EXISTS before every
        # pipeline, a second round trip per write.
        pipe = self.client.pipeline(transaction=False)
        sha, prefix, ttl_s = self._script_sha, self.prefix, self.ttl_s
        for user_id, segment, kind, sequence, event_time in batch:
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
                ttl_s,
            )
        return sum(pipe.execute())

    def segments_of(self, user_id: str) -> dict[str, tuple[int, int]]:
        raw = self.client.hgetall(user_key(self.prefix, user_id))
        out = {}
        for seg, value in raw.items():
            seq, entered = value.decode().split(":")
            out[seg.decode()] = (int(seq), int(entered))
        return out

    def members(self, segment: str) -> set[str]:
        return {m.decode() for m in self.client.smembers(members_key(self.prefix, segment))}

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
    pending: list[tuple[str, str, str, int, int]] = []
    for record in committed_records(
        bootstrap_servers, topic, open_wait_s=open_wait_s, summary=summary, security=security
    ):
        t = codec.decode(record.value)
        pending.append((t["user_id"], t["segment"], t["kind"], t["sequence"], t["event_time"]))
        read += 1
        if len(pending) >= batch_size:
            applied += view.apply(pending)
            pending = []
    if pending:
        applied += view.apply(pending)
    return RebuildResult(read, applied, summary.aborted, summary.open_left)
