"""Identity merge (docs/architecture.md, "Identity merge across keys"): an `identify` record links
an anonymous id to a known user id; the anonymous profile is folded into the known user's.

`merge_profiles` is the fold, one rule per part of the profile, chosen so that the merged profile
reads the same features as the profile built from the union of both ids' events (the known id's
events arriving first, then the anonymous id's: tests/unit/test_identity_merge.py proves it
against the brute-force oracle). The per-user steps that use it (fold out at the anonymous id,
fold in at the known id) are in udfs/transitions.py, so every runner folds the same way.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from udfs.codec import DecodeError
from udfs.events import MAX_ID_LENGTH, MIN_EVENT_TIME_MS
from udfs.profile import (
    SET,
    Bucket,
    CartOp,
    Session,
    UserProfile,
    _session_visible,
    decay,
    fold_cart_ops,
)
from udfs.profile_config import ProfileConfig

# The event type of an identify record, and where it carries the known id: the declared field
# (user_event.avsc v3), else the property of the same name (producers still on v2).
IDENTIFY = "identify"
KNOWN_USER_ID = "known_user_id"

# The rule of the EXIT transitions at the anonymous id: it left because it became the known user.
MERGED_RULE = "identity_merged"

# A forwarded event or fold may cross this many aliases (a chain A -> B -> C); beyond, the
# aliases form a loop (two identifies in opposite directions in flight at once) and the record
# is dead-lettered instead of circling for ever.
MAX_ALIAS_HOPS = 4


@dataclass(frozen=True, slots=True)
class Identify:
    """A validated identify record: from `timestamp` on, `anonymous_id` is `known_id`."""

    event_id: str
    anonymous_id: str
    known_id: str
    timestamp: int


@dataclass(slots=True)
class Alias:
    """What an anonymous id keeps once folded ("merged into `known_id`"): its later events go
    there. Kept until `until_ms` (event time), which each forwarded event pushes to its own time
    plus the retention: an alias lasts as long as a profile would."""

    known_id: str
    until_ms: int


def is_identify(record: dict) -> bool:
    """True for a decoded UserEvent record that is an identify record."""
    return record.get("event_type") == IDENTIFY


def identify_from_record(record: dict, now_ms: int, max_future_ms: int) -> Identify:
    """Checks a decoded identify record like any event (ids bounded, timestamp sane) and reads the
    known id from the `known_user_id` field, else the property; raises DecodeError with a
    dead-letter reason. The known id is bounded like any user id: it becomes a Flink key."""
    anonymous_id = record.get("user_id")
    if not anonymous_id or not anonymous_id.strip():
        raise DecodeError("missing_user_id", "user_id is empty")
    if len(anonymous_id) > MAX_ID_LENGTH:
        raise DecodeError("invalid_field", f"user_id longer than {MAX_ID_LENGTH} characters")
    event_id = record.get("event_id")
    if not event_id or len(event_id) > MAX_ID_LENGTH:
        raise DecodeError("invalid_field", "event_id is empty or too long")
    known_id = record.get(KNOWN_USER_ID)
    if known_id is None:
        known_id = (record.get("properties") or {}).get(KNOWN_USER_ID)
    if not known_id or not known_id.strip():
        raise DecodeError("invalid_identify", f"identify without {KNOWN_USER_ID}")
    if len(known_id) > MAX_ID_LENGTH:
        raise DecodeError("invalid_identify", f"{KNOWN_USER_ID} longer than {MAX_ID_LENGTH} characters")
    if known_id == anonymous_id:
        raise DecodeError("invalid_identify", f"{KNOWN_USER_ID} is the record's own user_id")
    ts = record["timestamp"]
    if ts < MIN_EVENT_TIME_MS or ts > now_ms + max_future_ms:
        raise DecodeError("absurd_timestamp", f"timestamp {ts} outside [{MIN_EVENT_TIME_MS}, now + {max_future_ms} ms]")
    return Identify(event_id, anonymous_id, known_id, ts)


def merge_profiles(known: UserProfile, anonymous: UserProfile, config: ProfileConfig) -> None:
    """Folds `anonymous` into `known` in place; `anonymous` is left as it was.

    The rules, part by part (the union is "the known id's events, then the anonymous id's", as
    late arrivals):

    * clock: the later of the two; recency (latest event by type, latest view by item): the later.
    * windowed counts, spend and category views: added bucket by bucket (both use the same
      event-time buckets, so no horizon changes meaning); lifetime spend and orders: added.
    * named sessions: one session id is one session (a shopper who logs in mid-session keeps
      it): first and last the outer ones, events added, unless the known id's had already been
      forgotten (then the anonymous id's). Derived sessions: both sides' runs, joined where within the gap.
    * cart: each line's operations merged by time, the known id's first on a tie; a purchase on
      either side empties the cart as of its time for both (the known id's operations at that
      very instant arrived before the anonymous purchase and go; the anonymous id's at the known
      purchase's instant arrived after it and stay).
    * engagement and affinities: both decayed to the later reference instant, then added.
    * dedup memory: the union (an id seen on either side is seen), oldest forgotten first.
    * context (device, country, timezone, referrer) and campaign touch: the latest by event
      time, the greater value on a tie; first seen: the earliest (what the union's events say;
      the known user's context does not win over a later anonymous one).
    * memberships, sequences, the pending timer and scores: the known id's (the anonymous id has
      left its segments; the merged profile is evaluated and scored again by the fold-in step).

    Every cap of `config` is applied again after the merge, as `apply_event` applies it."""
    k, a = known, anonymous
    k.derived.clear()
    k.next_change_memo = None
    k.pruned_at_ms = -(2**62)  # the merged state is pruned at its next use
    clock = max(k.clock_ms, a.clock_ms)
    if not k.last_by_type and a.last_by_type:
        # A new lifetime of the known id: its sequences start above anything an earlier lifetime
        # of it (state since dropped) can have used, as `apply_event` does at a first event.
        k.sequence_base = max(k.sequence_base, clock * 1000)
    k.clock_ms = clock
    cap = config.max_tracked_items

    for kind, ts in a.last_by_type.items():
        if ts > k.last_by_type.get(kind, -1):
            k.last_by_type[kind] = ts

    for width, ring in a.buckets.items():
        known_ring = k.buckets.setdefault(width, {})
        for start, bucket in ring.items():
            held = known_ring.get(start)
            if held is None:
                known_ring[start] = Bucket(list(bucket.counts), bucket.spend, dict(bucket.category_views))
                continue
            held.counts = [x + y for x, y in zip(held.counts, bucket.counts, strict=True)]
            held.spend += bucket.spend
            views = held.category_views
            for category, n in bucket.category_views.items():
                views[category] = views.get(category, 0) + n
            while len(views) > config.max_bucket_categories:
                del views[min(views, key=lambda c: (views[c], c))]
    k.lifetime_spend += a.lifetime_spend
    k.lifetime_orders += a.lifetime_orders
    for known_items, anonymous_items in (
        (k.products_viewed, a.products_viewed),
        (k.categories_viewed, a.categories_viewed),
    ):
        _merge_latest(known_items, anonymous_items, cap)

    _merge_sessions(k, a, clock, config)
    _merge_cart(k, a, config)
    _merge_interest(k, a, config)

    seen = dict(k.seen_event_ids)
    for key, ts in a.seen_event_ids.items():
        if ts > seen.get(key, -(2**63)):
            seen[key] = ts
    ordered = sorted(seen.items(), key=lambda item: item[1])  # oldest first: the cap forgets those
    k.seen_event_ids = dict(ordered[len(ordered) - config.max_seen_event_ids :] if ordered else [])

    for kind, (ts, value) in a.context.items():
        held_context = k.context.get(kind)
        if held_context is None or (ts, value) > held_context:
            k.context[kind] = (ts, value)
    if a.touch is not None and (k.touch is None or a.touch > k.touch):
        k.touch = a.touch
    if a.first_seen is not None and (k.first_seen is None or a.first_seen < k.first_seen):
        k.first_seen = a.first_seen


def _merge_latest(known: dict[str, int], anonymous: dict[str, int], cap: int) -> None:
    for key, ts in anonymous.items():
        if ts > known.get(key, -1):
            known[key] = ts
    while len(known) > cap:
        del known[min(known, key=lambda item: (known[item], item))]


def _merge_sessions(k: UserProfile, a: UserProfile, clock: int, config: ProfileConfig) -> None:
    named = k.named_sessions
    for sid, session in a.named_sessions.items():
        held = named.get(sid)
        if held is None or not _session_visible(held, clock, config):
            named[sid] = Session(session.start_ms, session.end_ms, session.events)
        else:  # the anonymous events join the visible session as late events of it would
            named[sid] = Session(
                min(held.start_ms, session.start_ms), max(held.end_ms, session.end_ms), held.events + session.events
            )
    while len(named) > config.max_tracked_items:
        del named[min(named, key=lambda sid: (named[sid].end_ms, sid))]
    runs = sorted(
        [Session(s.start_ms, s.end_ms, s.events) for s in k.derived_sessions + a.derived_sessions],
        key=lambda s: s.start_ms,
    )
    joined: list[Session] = []
    for run in runs:  # by start: a run joins the one before when it starts within the gap of its end
        if joined and run.start_ms - config.session_gap_ms <= joined[-1].end_ms:
            last = joined[-1]
            last.end_ms = max(last.end_ms, run.end_ms)
            last.events += run.events
        else:
            joined.append(run)
    k.derived_sessions = joined[max(0, len(joined) - config.max_tracked_items) :]


def _merge_cart(k: UserProfile, a: UserProfile, config: ProfileConfig) -> None:
    known_cleared, anonymous_cleared = k.cart_cleared_ms, a.cart_cleared_ms
    lines: dict[str, list[CartOp]] = {}
    for product, ops in k.cart_ops.items():
        kept = [op for op in ops if anonymous_cleared is None or op.time_ms > anonymous_cleared]
        if kept:
            lines[product] = kept
    for product, ops in a.cart_ops.items():
        kept = [
            CartOp(op.time_ms, op.kind, op.quantity, op.unit_price)
            for op in ops
            if known_cleared is None or op.time_ms >= known_cleared
        ]
        if not kept:
            continue
        line = lines.setdefault(product, [])
        for op in kept:  # after the known id's operations at the same instant: they arrived first
            bisect.insort_right(line, op, key=lambda o: o.time_ms)
    for ops in lines.values():
        if len(ops) > config.max_cart_ops_per_line:
            folded = ops[: len(ops) - config.max_cart_ops_per_line + 1]
            line_now = fold_cart_ops(folded)
            base = CartOp(
                folded[-1].time_ms,
                SET,
                line_now.quantity if line_now else 0,
                line_now.unit_price if line_now else None,
            )
            ops[: len(folded)] = [base]
    while len(lines) > config.max_cart_lines:  # an emptied line first, else the one touched longest ago
        del lines[min(lines, key=lambda p: (fold_cart_ops(lines[p]) is not None, lines[p][-1].time_ms, p))]
    k.cart_ops = lines
    if anonymous_cleared is not None and (known_cleared is None or anonymous_cleared > known_cleared):
        k.cart_cleared_ms = anonymous_cleared


def _merge_interest(k: UserProfile, a: UserProfile, config: ProfileConfig) -> None:
    reference = max(k.decay_as_of_ms, a.decay_as_of_ms)
    k_elapsed, a_elapsed = reference - k.decay_as_of_ms, reference - a.decay_as_of_ms
    k.engagement = decay(k.engagement, k_elapsed, config.engagement_half_life_ms) + decay(
        a.engagement, a_elapsed, config.engagement_half_life_ms
    )
    half_life = config.affinity_half_life_ms
    affinity = {category: decay(value, k_elapsed, half_life) for category, value in k.affinity.items()}
    for category, value in a.affinity.items():
        affinity[category] = affinity.get(category, 0.0) + decay(value, a_elapsed, half_life)
    while len(affinity) > config.max_tracked_items:
        del affinity[min(affinity, key=lambda c: (affinity[c], c))]
    k.affinity = affinity
    k.decay_as_of_ms = reference


def forward_target(alias: Alias | None, event_time_ms: int, retention_ms: int) -> str | None:
    """Where an event of an anonymous id goes: the known id while the alias lasts (pushing it to
    the event's time plus the retention), else None (the id is anonymous again: its own profile)."""
    if alias is None or event_time_ms >= alias.until_ms:
        return None
    alias.until_ms = max(alias.until_ms, event_time_ms + retention_ms)
    return alias.known_id
