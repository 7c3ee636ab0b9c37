"""The Redis view's key layout and the script that applies a transition, defined once.

Engine-free (no redis import): the job's Redis writer, the `redis rebuild` command and the tests
all take key names and the script from here.

Layout 2 (docs/redis.md):
  {prefix}:user:{user_id}      hash  segment -> "<sequence>:<entered_at_ms>:<rule>" (current segments)
  {prefix}:seq:{user_id}       hash  segment -> last applied sequence (kept after EXIT)
  {prefix}:members:{segment}   set   user ids currently in the segment
The profile retention is the view's too: a member stays until the EXITs the core emits when the
retention runs out (rule `profile_retention_expired`), whose last one deletes every key of the
user. A user holding no segment keeps only the sequence hash, which expires the retention after
its last write. Layout 1 stored "<sequence>:<entered_at_ms>" (read as an unknown rule) and gave
the user's keys a 30-day TTL from their last transition.
"""

from __future__ import annotations

import re

from udfs.privacy import CONSENT_RULE, ERASURE_RULE
from udfs.transitions import RETENTION_RULE

LAYOUT_VERSION = 2
# The kind of an erasure marker: a row of the view's input that is no transition (the job keeps it
# out of the transitions topic) and deletes the user's entries (the apply script below).
ERASE_VIEW_KIND = "ERASE"


def user_key(prefix: str, user_id: str) -> str:
    """The hash of a user's current segments: segment to `<sequence>:<entered_at_ms>:<rule>`."""
    return f"{prefix}:user:{user_id}"


def sequence_key(prefix: str, user_id: str) -> str:
    """The hash of a user's last applied sequence by segment, kept after an EXIT."""
    return f"{prefix}:seq:{user_id}"


def members_key(prefix: str, segment: str) -> str:
    """The set of the user ids currently in a segment."""
    return f"{prefix}:members:{segment}"


def parse_membership(value: str) -> tuple[int, int, str]:
    """A user hash value as (sequence, entered_at_ms, rule); layout 1's values have no rule ("")."""
    parts = value.split(":", 2)
    return int(parts[0]), int(parts[1]), parts[2] if len(parts) == 3 else ""


# The EXITs that end a profile's lifetime: the retention ran out, the user was erased, or withdrew
# consent to segmentation. The last of them deletes every key of the user; the next lifetime
# starts with higher sequences.
LIFETIME_END_RULES = (RETENTION_RULE, ERASURE_RULE, CONSENT_RULE)
# The rules are spliced into the script as Lua string literals: they must need no escaping.
assert all(re.fullmatch(r"[a-z_]+", rule) for rule in LIFETIME_END_RULES)
_ENDS_LIFETIME = " or ".join(f"rule == '{rule}'" for rule in LIFETIME_END_RULES)

# Applies a transition only if its sequence is newer than the last applied one for (user,
# segment): replays after a restore, or a rebuild racing the live job, can never move the view
# backwards. KEYS: user hash, sequence hash, members set. ARGV: segment, kind, sequence,
# event_time_ms, user_id, retention_ms, rule. Returns 1 if applied, 0 if stale.
#
# Expiry: a user holding a segment has no TTL (PERSIST also clears layout 1's): only the core
# decides when a member goes, by an EXIT. A lifetime-ending EXIT (retention, erasure, withdrawn
# consent) that leaves the user holding nothing deletes the sequence hash too: the profile's
# lifetime is over, and the next one starts with higher sequences (udfs/profile.py:
# sequence_base). Any other EXIT that leaves nothing keeps the sequence hash as a guard against
# stale replays for the retention (wall time): the view never sees the user's later events, so no
# expiry of its own can be tied to the profile's.
#
# An erasure marker (kind ERASE, segment "", so the members key is the members prefix): deletes
# every entry of the user whose sequence is at most the marker's, in both hashes and the member
# sets, whether the user holds the segment or not (a user in no segment keeps a sequence hash no
# EXIT deletes). Idempotent; a return after the erasure has higher sequences and stays. The member
# set keys are built here from the prefix: the view is not meant for Redis Cluster.
_APPLY_FUNCTION = (
    """
local function erase(user, seqs, members_prefix, up_to, user_id)
  for _, hash in ipairs({seqs, user}) do
    local entries = redis.call('HGETALL', hash)
    for i = 1, #entries, 2 do
      local segment = entries[i]
      if tonumber(string.match(entries[i + 1], '^%d+')) <= up_to then
        redis.call('HDEL', user, segment)
        redis.call('HDEL', seqs, segment)
        redis.call('SREM', members_prefix .. segment, user_id)
      end
    end
  end
  return 1
end

local function apply(user, seqs, members, segment, kind, sequence, at, user_id, retention_ms, rule)
  if kind == '"""
    + ERASE_VIEW_KIND
    + """' then return erase(user, seqs, members, tonumber(sequence), user_id) end
  local last = tonumber(redis.call('HGET', seqs, segment) or '0')
  local seq = tonumber(sequence)
  if seq <= last then return 0 end
  redis.call('HSET', seqs, segment, sequence)
  if kind == 'ENTER' then
    redis.call('HSET', user, segment, sequence .. ':' .. at .. ':' .. rule)
    redis.call('SADD', members, user_id)
  else
    redis.call('HDEL', user, segment)
    redis.call('SREM', members, user_id)
  end
  if redis.call('EXISTS', user) == 1 then
    redis.call('PERSIST', user)
    redis.call('PERSIST', seqs)
  elseif """
    + _ENDS_LIFETIME
    + """ then
    redis.call('DEL', seqs)
  elseif tonumber(retention_ms) > 0 then
    redis.call('PEXPIRE', seqs, retention_ms)
  end
  return 1
end
"""
)

APPLY_TRANSITION_LUA = (
    _APPLY_FUNCTION
    + """
return apply(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7])
"""
)

# The view follower's batch (jobs/redis_follower.py): every transition as above, then the follower's
# resume offsets, last, so that a transition that fails (the script stops there) leaves them as
# they were and the batch is applied again. KEYS: the offsets hash, then per transition its three
# keys. ARGV: the transition count, per transition segment, kind, sequence, event_time_ms,
# user_id, retention_ms, rule, then partition, offset pairs. Returns how many transitions were applied.
APPLY_BATCH_LUA = (
    _APPLY_FUNCTION
    + """
local n = tonumber(ARGV[1])
local applied = 0
for i = 0, n - 1 do
  local a = 2 + i * 7
  applied = applied + apply(KEYS[2 + i * 3], KEYS[3 + i * 3], KEYS[4 + i * 3], ARGV[a], ARGV[a + 1],
                            ARGV[a + 2], ARGV[a + 3], ARGV[a + 4], ARGV[a + 5], ARGV[a + 6])
end
for j = 2 + n * 7, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[j], ARGV[j + 1])
end
return applied
"""
)
