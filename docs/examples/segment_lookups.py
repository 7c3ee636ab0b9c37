"""Looking up the Redis view of current memberships with redis-py (docs/consumers.md explains
the keys; udfs/redis_layout.py defines them). The prefix is the job's `redis_key_prefix` setting.

    {prefix}:user:{user_id}     hash: segment -> "<sequence>:<entered_at_ms>:<rule>", the user's current segments
    {prefix}:members:{segment}  set: the user ids in the segment now
    {prefix}:seq:{user_id}      hash: segment -> the last applied sequence (kept after an EXIT)
"""

from __future__ import annotations

from collections.abc import Iterator

import redis


def segments_of(r: redis.Redis, user_id: str, prefix: str = "seg") -> dict[str, tuple[int, int, str]]:
    """The user's current segments: segment -> (sequence of the ENTER, entered at in epoch ms,
    the rule that let the user in; "" for a value written before the view kept the rule)."""
    out = {}
    for segment, value in r.hgetall(f"{prefix}:user:{user_id}").items():
        sequence, entered_at, *rule = value.decode().split(":", 2)  # the rule may hold ":"
        out[segment.decode()] = (int(sequence), int(entered_at), rule[0] if rule else "")
    return out


def is_member(r: redis.Redis, user_id: str, segment: str, prefix: str = "seg") -> bool:
    """Whether the user is in the segment now."""
    return bool(r.sismember(f"{prefix}:members:{segment}", user_id))


def member_count(r: redis.Redis, segment: str, prefix: str = "seg") -> int:
    """How many users are in the segment now."""
    return r.scard(f"{prefix}:members:{segment}")


def members(r: redis.Redis, segment: str, prefix: str = "seg") -> Iterator[str]:
    """The segment's members, a batch at a time (SSCAN: never one long SMEMBERS on a big set)."""
    for user_id in r.sscan_iter(f"{prefix}:members:{segment}", count=1000):
        yield user_id.decode()
