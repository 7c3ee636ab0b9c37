"""The Redis view's key layout and the script that applies a transition, defined once.

Engine-free (no redis import): the job's Redis writer, the `redis rebuild` command and the tests
all take key names and the script from here.

  {prefix}:user:{user_id}      hash  segment -> "<sequence>:<entered_at_ms>"  (current segments)
  {prefix}:seq:{user_id}       hash  segment -> last applied sequence (kept after EXIT)
  {prefix}:members:{segment}   set   user ids currently in the segment
User keys expire after the configured TTL of inactivity; every applied transition refreshes it.
"""

from __future__ import annotations


def user_key(prefix: str, user_id: str) -> str:
    return f"{prefix}:user:{user_id}"


def sequence_key(prefix: str, user_id: str) -> str:
    return f"{prefix}:seq:{user_id}"


def members_key(prefix: str, segment: str) -> str:
    return f"{prefix}:members:{segment}"


# Applies a transition only if its sequence is newer than the last applied one for (user,
# segment): replays after a restore, or a rebuild racing the live job, can never move the view
# backwards. KEYS: user hash, sequence hash, members set. ARGV: segment, kind, sequence,
# event_time_ms, user_id, ttl_s. Returns 1 if applied, 0 if stale.
APPLY_TRANSITION_LUA = """
local last = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
local seq = tonumber(ARGV[3])
if seq <= last then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
if ARGV[2] == 'ENTER' then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[3] .. ':' .. ARGV[4])
  redis.call('SADD', KEYS[3], ARGV[5])
else
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('SREM', KEYS[3], ARGV[5])
end
local ttl = tonumber(ARGV[6])
if ttl > 0 then
  redis.call('EXPIRE', KEYS[1], ttl)
  redis.call('EXPIRE', KEYS[2], ttl)
end
return 1
"""
