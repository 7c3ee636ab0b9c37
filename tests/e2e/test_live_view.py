"""The live view's Prometheus figures (jobs/live_view.py, served by `segments dashboard` at
/metrics) against a real broker and a real redis-server: the view follower reads committed
transitions from the topic and tallies them in Redis; the exporter's text is checked against
what the test produced (committed only), across a restart of the follower and a replay into an
emptied Redis; a restart that reads committed records again behind an open transaction, and a
batch Redis refused, count nothing twice."""

from __future__ import annotations

import re
import time
import urllib.request

import pytest
from redis.exceptions import ResponseError

from infra.stack import create_topics, free_port
from jobs.dashboard.server import Dashboard, serve
from jobs.live_view import EXPORTED_METRICS
from jobs.redis_follower import ViewFollower
from jobs.redis_view import RedisSegmentView
from jobs.segment_warnings import WarningThresholds
from tests.e2e.test_redis_follower import Transitions, record
from udfs.definitions import parse_definitions

pytestmark = pytest.mark.e2e

TOPIC = "live-transitions"
PREFIX = "live"
MIN = 60_000
DEFINITIONS = """
version: live-test-1
segments:
  - name: cart
    when: cart_items > 0
  - name: vip
    when: cart_items > 3
"""


def scrape(port: int) -> tuple[dict[str, str], dict[tuple[str, str], float]]:
    """(family -> type, (sample, labels) -> value) of the endpoint's text."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = response.read().decode()
    types, samples = {}, {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            types[name] = kind
        elif line and not line.startswith("#"):
            name, labels, value = re.fullmatch(r"([a-z_]+)(\{[^}]*\})? (\S+)", line).groups()
            samples[(name, labels or "")] = float(value)
    return types, samples


def follow_to_the_end(follower: ViewFollower) -> None:
    while follower.step():
        pass


def test_the_exporter_shows_member_sets_and_the_committed_transitions_tallies(broker, redis_url, catalog):
    codec = catalog.codec("SegmentTransition")
    create_topics(broker, {TOPIC: 2})
    job = Transitions(broker, codec, "live-job", TOPIC)
    now = int(time.time() * 1000)
    t0 = now - 30 * MIN
    # cart: ann enters, leaves, comes back 4 min later (a flap); bob enters; cy enters and leaves.
    job.send(
        [
            ("ann", "cart", "ENTER", 1, t0),
            ("ann", "cart", "EXIT", 2, t0 + MIN),
            ("bob", "cart", "ENTER", 1, t0 + MIN),
            ("ann", "cart", "ENTER", 3, t0 + 5 * MIN),
            ("cy", "cart", "ENTER", 1, t0 + 6 * MIN),
            ("cy", "cart", "EXIT", 2, t0 + 7 * MIN),
        ]
    )
    job.send([("dan", "vip", "ENTER", 1, now - 2_000)])
    job.send([("eve", "vip", "ENTER", 1, now)], commit=False)  # aborted: never counted
    view = RedisSegmentView(redis_url, PREFIX, 0)
    follow_to_the_end(ViewFollower(view, broker, TOPIC))

    dashboard = Dashboard(
        view.client, PREFIX, parse_definitions(DEFINITIONS, "live.yaml"), WarningThresholds(), sample_s=3600
    )
    port = free_port()
    server = serve(dashboard, "127.0.0.1", port)
    try:
        types, samples = scrape(port)
        assert set(types) == set(EXPORTED_METRICS)

        def value(name: str, segment: str) -> float:
            return samples[(name, f'{{segment="{segment}"}}')]

        # Sizes are the member sets: cart {ann, bob}, vip {dan}.
        assert view.members("cart") == {"ann", "bob"} and view.members("vip") == {"dan"}
        assert value("segments_segment_members", "cart") == 2
        assert value("segments_segment_members", "vip") == 1
        assert value("segments_segment_entries_total", "cart") == 4
        assert value("segments_segment_exits_total", "cart") == 2
        assert value("segments_segment_flaps_total", "cart") == 1
        assert value("segments_segment_entries_total", "vip") == 1
        assert value("segments_segment_flaps_total", "vip") == 0
        # 7 committed transitions: 6 about half an hour old (in the 3600 s bucket), dan's ~2 s.
        buckets = {labels: n for (name, labels), n in samples.items() if name.endswith("_bucket")}
        assert buckets['{le="+Inf"}'] == samples[("segments_transition_latency_seconds_count", "")] == 7
        assert buckets['{le="300"}'] == 1 and buckets['{le="3600"}'] == 7
        assert buckets['{le="0.25"}'] == 0
        # The exits kept for the flap check (user ids) go by themselves: window + margin, wall time.
        assert 0 < view.client.pttl(f"{PREFIX}:live:exits:cart") <= WarningThresholds().flap_window_ms + 60 * MIN

        # The follower restarted: it resumes at its offsets, so nothing is counted twice, and the
        # exit it stored in Redis before makes bob's re-entry after a restart a flap.
        job.send([("bob", "cart", "EXIT", 2, t0 + 8 * MIN)])
        follow_to_the_end(ViewFollower(view, broker, TOPIC))
        job.send([("bob", "cart", "ENTER", 3, t0 + 9 * MIN)])
        follow_to_the_end(ViewFollower(view, broker, TOPIC))
        _, samples = scrape(port)
        assert value("segments_segment_entries_total", "cart") == 5
        assert value("segments_segment_exits_total", "cart") == 3
        assert value("segments_segment_flaps_total", "cart") == 2
        assert value("segments_segment_members", "cart") == 2
        assert samples[("segments_transition_latency_seconds_count", "")] == 9

        # A transaction left open holds every follower's resume offset before it: a restarted
        # follower reads the committed records after it again, and counts none of them twice.
        other = Transitions(broker, codec, "live-job-2", TOPIC)
        other.producer.begin_transaction()
        for user in ("fay", "gus"):
            other.producer.produce(TOPIC, record(codec, user, "vip", "ENTER", 1, now), key=user.encode())
        other.producer.flush(30)
        job.send([(u, "vip", "ENTER", 1, now) for u in ("hal", "ian", "jo", "kim")])
        follow_to_the_end(ViewFollower(view, broker, TOPIC))
        follow_to_the_end(ViewFollower(view, broker, TOPIC))
        _, samples = scrape(port)
        assert value("segments_segment_entries_total", "vip") == 1 + 4
        other.producer.commit_transaction(30)
        follow_to_the_end(ViewFollower(view, broker, TOPIC))
        follow_to_the_end(ViewFollower(view, broker, TOPIC))
        _, samples = scrape(port)
        assert value("segments_segment_entries_total", "vip") == 1 + 4 + 2
        assert value("segments_segment_members", "vip") == 7

        # A batch Redis refuses (a key of the wrong type) is applied again once the key is fixed:
        # counted once.
        view.client.set(f"{PREFIX}:seq:poison", "not a hash")
        job.send([("lee", "cart", "ENTER", 1, now), ("poison", "cart", "ENTER", 1, now)])
        with pytest.raises(ResponseError, match="WRONGTYPE"):
            follow_to_the_end(ViewFollower(view, broker, TOPIC))
        view.client.delete(f"{PREFIX}:seq:poison")
        follow_to_the_end(ViewFollower(view, broker, TOPIC))
        _, samples = scrape(port)
        assert view.members("cart") == {"ann", "bob", "lee", "poison"}
        assert value("segments_segment_entries_total", "cart") == 5 + 2
        assert samples[("segments_transition_latency_seconds_count", "")] == 9 + 6 + 2

        # Redis emptied: the follower replays the topic and counts it all again, once.
        view.client.flushdb()
        follow_to_the_end(ViewFollower(view, broker, TOPIC))
        _, again = scrape(port)
        for name in ("segments_segment_members", "segments_segment_entries_total", "segments_segment_exits_total"):
            for segment in ("cart", "vip"):
                assert again[(name, f'{{segment="{segment}"}}')] == samples[(name, f'{{segment="{segment}"}}')]
        assert again[("segments_segment_flaps_total", '{segment="cart"}')] == 2
        assert again[("segments_transition_latency_seconds_count", "")] == 17
    finally:
        server.shutdown()
        view.close()
