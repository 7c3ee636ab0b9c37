"""Writes transitions into the Redis view and reads it back (see udfs/redis_layout.py)."""

from __future__ import annotations

from collections.abc import Iterable

import redis
from redis.exceptions import NoScriptError

from udfs.redis_layout import APPLY_TRANSITION_LUA, members_key, sequence_key, user_key


class RedisSegmentView:
    def __init__(self, url: str, prefix: str, ttl_s: int):
        self.prefix = prefix
        self.ttl_s = ttl_s
        self.client = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5)
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
            pipe.evalsha(sha, 3, user_key(prefix, user_id), sequence_key(prefix, user_id),
                         members_key(prefix, segment), segment, kind, sequence, event_time, user_id, ttl_s)
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


def rebuild_from_topic(view: RedisSegmentView, bootstrap_servers: str, topic: str, batch_size: int = 1000,
                       idle_s: float = 3.0) -> tuple[int, int]:
    """Replays every committed transition of the topic into the view: (read, applied). Safe while
    the job runs: the apply script keeps only newer sequences, so order and repeats do not matter."""
    from confluent_kafka import KafkaException

    from jobs.transitions_reader import committed_consumer
    from udfs.codec import SchemaCatalog

    codec = SchemaCatalog().codec("SegmentTransition")
    consumer = committed_consumer(bootstrap_servers, topic)
    read = applied = 0
    pending: list[tuple[str, str, str, int, int]] = []
    try:
        while True:
            msg = consumer.poll(idle_s)
            if msg is None:
                break
            if msg.error():
                raise KafkaException(msg.error())
            t = codec.decode(msg.value())
            pending.append((t["user_id"], t["segment"], t["kind"], t["sequence"], t["event_time"]))
            read += 1
            if len(pending) >= batch_size:
                applied += view.apply(pending)
                pending = []
        if pending:
            applied += view.apply(pending)
    finally:
        consumer.close()
    return read, applied
