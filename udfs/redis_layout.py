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
    """The hash of a user's current segments: segment to `<sequence>:<entered_at_ms>`."""
    return f"{prefix}:user:{user_id}"


def sequence_key(prefix: str, user_id: str) -> str:
    """The hash of a user's last applied sequence by segment, kept after an EXIT."""
    return f"{prefix}:seq:{user_id}"


def members_key(prefix: str, segment: str) -> str:
    """The set of the user ids currently in a segment."""
    return f"{prefix}:members:{segment}"


# Applies a transition only if its sequence is newer than the last applied one for (user,
# segment): replays after a restore, or a rebuild racing the live job, can never move the view
# backwards. KEYS: user hash, sequence hash, members set. ARGV: segment, kind, sequence,
# event_time_ms, user_id, ttl_s. Returns 1 if applied, 0 if stale.
_APPLY_FUNCTION = """
local function apply(user, seqs, members, segment, kind, sequence, at, user_id, ttl_s)
  local last = tonumber(redis.call('HGET', seqs, segment) or '0')
  local seq = tonumber(sequence)
  if seq <= last then return 0 end
  redis.call('HSET', seqs, segment, sequence)
  if kind == 'ENTER' then
    redis.call('HSET', user, segment, sequence .. ':' .. at)
    redis.call('SADD', members, user_id)
  else
    redis.call('HDEL', user, segment)
    redis.call('SREM', members, user_id)
  end
  local ttl = tonumber(ttl_s)
  if ttl > 0 then
    redis.call('EXPIRE', user, ttl)
    redis.call('EXPIRE', seqs, ttl)
  end
  return 1
end
"""

APPLY_TRANSITION_LUA = (
    _APPLY_FUNCTION
    + """
return apply(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6])
"""
)

# The view follower's batch (jobs/redis_follower.py): every transition as above, then the follower's
# resume offsets, last, so that a transition that fails (the script stops there) leaves them as
# they were and the batch is applied again. KEYS: the offsets hash, then per transition its three
# keys. ARGV: the transition count, per transition segment, kind, sequence, event_time_ms,
# user_id, ttl_s, then partition, offset pairs. Returns how many transitions were applied.
APPLY_BATCH_LUA = (
    _APPLY_FUNCTION
    + """
local n = tonumber(ARGV[1])
local applied = 0
for i = 0, n - 1 do
  local a = 2 + i * 6
  applied = applied + apply(KEYS[2 + i * 3], KEYS[3 + i * 3], KEYS[4 + i * 3],
                            ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4], ARGV[a + 5])
end
for j = 2 + n * 6, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[j], ARGV[j + 1])
end
return applied
"""
)
