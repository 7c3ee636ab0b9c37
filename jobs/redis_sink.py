"""The Redis view's sink: a Flink two-phase-commit sink in Java (infra/java, `segments.redis`; see
jobs/java_operators.py for how it is built and shipped).

Redis is written only from committed transitions: the sink's writer buffers each checkpoint
interval's transitions and hands them over at the checkpoint barrier; its committer applies them
with the apply script of udfs/redis_layout.py once the checkpoint has completed (when the Kafka
sink commits the same transitions), and again after a restore. See docs/redis.md.
"""

from __future__ import annotations

import logging
from urllib.parse import urlparse

from jobs.java_operators import java_class
from jobs.settings import JobSettings
from udfs.redis_layout import APPLY_TRANSITION_LUA, members_key, sequence_key, user_key

SINK_CLASS = "segments.redis.RedisViewSink"
log = logging.getLogger("segments.redis_sink")


def key_prefixes(prefix: str) -> tuple[str, str, str]:
    """The Redis layout's three key prefixes; the Java side appends the user id or segment name."""
    prefixes = (user_key(prefix, ""), sequence_key(prefix, ""), members_key(prefix, ""))
    # The layout must stay "prefix + name" for the Java side to build the same keys.
    assert (user_key(prefix, "u"), sequence_key(prefix, "u"), members_key(prefix, "s")) == (
        prefixes[0] + "u",
        prefixes[1] + "u",
        prefixes[2] + "s",
    )
    return prefixes


def holds_a_secret(url: str) -> bool:
    """A password in the URL itself, as redis-py reads one (`:pw@`, `user:pw@`, a lone `pw@`, or
    `?password=`); an `env:NAME` reference holds none."""
    if url.startswith("env:"):
        return False
    parsed = urlparse(url)
    return bool(parsed.password or parsed.username or "password=" in parsed.query)


def redis_view_sink(settings: JobSettings):
    """The sink as a PyFlink `Sink` for `DataStream.sink_to`, for a stream whose rows start with
    user_id, segment, kind, sequence, event_time, payload, rule (jobs.segment_users.TRANSITION_RECORD)."""
    from pyflink.datastream.connectors.base import Sink

    if holds_a_secret(settings.redis_url):
        log.warning(
            "redis_url holds a password and travels inside the job (its graph, the cluster's HA "
            "storage): give it as env:NAME, a variable set on every worker, so that only the name does"
        )
    sink_class = java_class(settings, SINK_CLASS)
    user_prefix, sequence_prefix, members_prefix = key_prefixes(settings.redis_key_prefix)
    j_sink = sink_class(
        settings.redis_url,
        user_prefix,
        sequence_prefix,
        members_prefix,
        int(settings.profile.retention_ms),
        int(settings.redis_retry_ms),
        APPLY_TRANSITION_LUA,
    )
    return Sink(j_sink)
