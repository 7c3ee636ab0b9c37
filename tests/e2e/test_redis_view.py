"""The Redis view's writer against a real redis-server: one round trip per batch, ordered by
sequence, and still correct after Redis forgot the apply script (a restart, SCRIPT FLUSH)."""

from __future__ import annotations

import pytest

from jobs.redis_view import RedisSegmentView

pytestmark = pytest.mark.e2e


def test_newer_sequences_apply_and_older_ones_are_ignored(redis_url):
    view = RedisSegmentView(redis_url, "t", ttl_s=0)
    assert view.apply([("u1", "vip", "ENTER", 1, 100), ("u1", "cart", "ENTER", 1, 100)]) == 2
    assert view.apply([("u1", "vip", "EXIT", 2, 200), ("u1", "vip", "ENTER", 1, 100)]) == 1
    assert view.segments_of("u1") == {"cart": (1, 100)}
    assert view.members("vip") == set() and view.members("cart") == {"u1"}


def test_a_batch_sent_after_the_script_was_flushed_is_applied_once(redis_url):
    view = RedisSegmentView(redis_url, "t", ttl_s=0)
    view.apply([("u1", "vip", "ENTER", 1, 100)])
    view.client.script_flush()
    assert view.apply([("u1", "vip", "EXIT", 2, 200), ("u2", "vip", "ENTER", 1, 150)]) == 2
    assert view.members("vip") == {"u2"}
    assert view.client.hget("t:seq:u1", "vip") == b"2"


def test_each_batch_sends_only_its_evalshas(redis_url):
    view = RedisSegmentView(redis_url, "t", ttl_s=0)
    view.apply([("u0", "vip", "ENTER", 1, 100)])

    def calls() -> dict[str, int]:
        stats = view.client.info("commandstats")
        return {name: stats.get(f"cmdstat_{name}", {}).get("calls", 0) for name in ("evalsha", "eval", "script")}

    before = calls()
    view.apply([(f"u{i}", "vip", "ENTER", 1, 100) for i in range(1, 6)])
    after = calls()
    # No SCRIPT EXISTS / LOAD and no EVAL of the body per write: five EVALSHAs, one pipeline.
    assert {name: after[name] - before[name] for name in after} == {"evalsha": 5, "eval": 0, "script": 0}
    assert view.members("vip") == {f"u{i}" for i in range(6)}
