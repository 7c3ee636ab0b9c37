"""Writes transitions into the Redis view and reads it back (see udfs/redis_layout.py)."""

from __future__ import annotations

from collections.abc import Iterable

import redis

from udfs.redis_layout import APPLY_TRANSITION_LUA, members_key, sequence_key, user_key


class RedisSegmentView:
    def __init__(self, url: str, prefix: str, ttl_s: int):
        self.prefix = prefix
        self.ttl_s = ttl_s
        self.client = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5)
        self.client.ping()  # fail fast on a bad address, before any record is consumed
        self._apply = self.client.register_script(APPLY_TRANSITION_LUA)

    def apply(self, transitions: Iterable[tuple[str, str, str, int, int]]) -> int:
        """Applies (user_id, segment, kind, sequence, event_time_ms) in one round trip; returns
        how many were newer than what Redis held."""
        pipe = self.client.pipeline(transaction=False)
        n = 0
        for user_id, segment, kind, sequence, event_time in transitions:
            keys = [
                user_key(self.prefix, user_id), sequence_key(self.prefix, user_id), members_key(self.prefix, segment)
            ]
            self._apply(keys=keys, args=[segment, kind, sequence, event_time, user_id, self.ttl_s], client=pipe)
            n += 1
        return sum(pipe.execute()) if n else 0

    def segments_of(self, user_id: str) -> dict[str, tuple[int, int]]:
        raw = self.client.hgetall(user_key(self.prefix, user_id))
        out = {}
        for seg, value in raw.items():
            seq, entered = value.decode().split(":")
            out[seg.decode()] = (int(seq), int(entered))
        return out

    def members(self, segment: str) -> set[str]:
        return {m.decode() for m in self.client.smembers(members_key(self.prefix, segment))}

    def close(self) -> None:
        self.client.close()
