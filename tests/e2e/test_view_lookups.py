"""`segments lookup USER` and `segments members SEGMENT` (issue 18.5) against a real redis-server
that the real writer filled with the core's transitions for the shipped definitions."""

from __future__ import annotations

import json

import pytest

from jobs import cli
from jobs.redis_view import RedisSegmentView
from jobs.settings import SHIPPED_DEFINITIONS
from tests.conftest import START_MS
from udfs.events import UserEvent
from udfs.segmentation import Segmentation
from udfs.transitions import replay_events

pytestmark = pytest.mark.e2e

PREFIX = "look"


@pytest.fixture
def view_settings(redis_url, monkeypatch):
    """The CLI's settings point at the test's Redis (as a user's SEGMENTS_* variables would)."""
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("SEGMENTS_REDIS_KEY_PREFIX", PREFIX)
    return RedisSegmentView(redis_url, PREFIX, retention_ms=90 * 86_400_000)


def cart_event(user_id: str, n: int, at_ms: int) -> UserEvent:
    return UserEvent(
        f"{user_id}-{n}", user_id, "add_to_cart", at_ms, product_id="p1", category="shoes", price=10.0, quantity=1
    )


def write(view: RedisSegmentView, events: list[UserEvent]):
    """The core's transitions of `events`, applied by the view's writer; the core's profiles."""
    transitions, profiles = replay_events(Segmentation.load(SHIPPED_DEFINITIONS).engine(), events)
    view.apply([(t.user_id, t.segment, t.kind, t.sequence, t.event_time, t.rule) for t in transitions])
    return transitions, profiles


def test_lookup_prints_the_users_current_segments_with_entry_time_and_rule(view_settings, capsys):
    transitions, profiles = write(view_settings, [cart_event("ann", 1, START_MS)])
    current = {name: m for name, m in profiles["ann"].memberships.items() if m.member}
    assert current, "the shipped definitions put a shopper with a cart in some segment"
    rules = {t.segment: t.rule for t in transitions if t.kind == "ENTER"}

    assert cli.main(["lookup", "ann", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["user_id"] == "ann" and shown["known"] is True
    assert {s["segment"]: (s["entered_at"], s["rule"], s["sequence"]) for s in shown["segments"]} == {
        name: (m.since_ms, rules[name], m.sequence) for name, m in current.items()
    }
    assert {s["entered_at_utc"] for s in shown["segments"]} == {"2023-11-14T22:13:20.000Z"}

    assert cli.main(["lookup", "ann"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["SEGMENT", "ENTERED", "(UTC)", "RULE"]
    assert sorted(line.split()[0] for line in table[1:]) == sorted(current)
    assert all(rules[line.split()[0]] in line and "2023-11-14T22:13:20.000Z" in line for line in table[1:])


def test_lookup_of_an_unknown_user_says_so_and_exits_non_zero(view_settings, capsys):
    write(view_settings, [cart_event("ann", 1, START_MS)])
    assert cli.main(["lookup", "nobody"]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and "'nobody' is unknown to the view" in captured.err
    assert cli.main(["lookup", "nobody", "--json"]) == 1
    assert json.loads(capsys.readouterr().out) == {"user_id": "nobody", "known": False, "segments": []}


def test_members_streams_every_member_and_counts_them(view_settings, capsys):
    users = [f"user-{i:04d}" for i in range(2_500)]
    transitions, _ = write(view_settings, [cart_event(u, 1, START_MS + i) for i, u in enumerate(users)])
    segment = next(t.segment for t in transitions if t.kind == "ENTER")
    want = {t.user_id for t in transitions if t.segment == segment and t.kind == "ENTER"}
    assert len(want) == 2_500

    calls = view_settings.client.info("commandstats")
    assert cli.main(["members", segment, "--batch", "500"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert set(listed) == want
    after = view_settings.client.info("commandstats")
    assert "cmdstat_smembers" not in after  # never the whole set in one reply
    assert after["cmdstat_sscan"]["calls"] - calls.get("cmdstat_sscan", {}).get("calls", 0) >= 2_500 // 500

    assert cli.main(["members", segment, "--count"]) == 0
    assert capsys.readouterr().out == "2500\n"


def test_members_of_a_defined_segment_nobody_is_in_is_empty_and_an_unknown_segment_is_an_error(view_settings, capsys):
    write(view_settings, [cart_event("ann", 1, START_MS)])
    defined = set(Segmentation.load(SHIPPED_DEFINITIONS).definitions.segments)
    empty = sorted(s for s in defined if not view_settings.client.exists(f"{PREFIX}:members:{s}"))[0]
    assert cli.main(["members", empty, "--count"]) == 0
    assert capsys.readouterr().out == "0\n"
    assert cli.main(["members", "no_such_segment"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "unknown segment 'no_such_segment'" in captured.err
    assert cli.main(["members", "no_such_segment", "--count"]) == 2


def test_both_read_as_a_redis_user_allowed_only_the_reads_they_make(view_settings, redis_url, monkeypatch, capsys):
    """No script is loaded for a lookup: an ACL user with the view's keys and five read commands
    will do, logged in through the URL as every client of the project does."""
    write(view_settings, [cart_event("ann", 1, START_MS)])
    view_settings.client.execute_command(
        "ACL",
        "SETUSER",
        "reader",
        "on",
        ">read s3cret",
        f"~{PREFIX}:*",
        "+ping",
        "+hgetall",
        "+exists",
        "+sscan",
        "+scard",
    )
    monkeypatch.setenv("REDIS_URL", redis_url.replace("redis://", "redis://reader:read%20s3cret@"))
    segments = {c.segment for c in view_settings.current_segments("ann")}
    assert cli.main(["lookup", "ann", "--json"]) == 0
    assert {s["segment"] for s in json.loads(capsys.readouterr().out)["segments"]} == segments
    segment = sorted(segments)[0]
    assert cli.main(["members", segment]) == 0 and capsys.readouterr().out == "ann\n"
    assert cli.main(["members", segment, "--count"]) == 0 and capsys.readouterr().out == "1\n"


def test_an_unreachable_redis_is_one_line_without_the_password(monkeypatch, capsys):
    from infra.stack import free_port

    monkeypatch.setenv("REDIS_URL", f"redis://app:s3cret@127.0.0.1:{free_port()}/0")
    assert cli.main(["lookup", "ann"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: Redis at redis://***@127.0.0.1:") and "ConnectionError" in err
    assert "s3cret" not in err and len(err.splitlines()) == 1
