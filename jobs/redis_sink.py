"""The Redis view's sink: a Flink two-phase-commit sink in Java (infra/java, `segments.redis`),
built by infra/setup.sh into `<jars_dir>/segments-redis-sink.jar` and shipped with the job through
`pipeline.jars` like the Kafka connector.

Redis is written only from committed transitions: the sink's writer buffers each checkpoint
interval's transitions and hands them over at the checkpoint barrier; its committer applies them
with the apply script of udfs/redis_layout.py once the checkpoint has completed (when the Kafka
sink commits the same transitions), and again after a restore. See README, "Redis layout".
"""

from __future__ import annotations

from pathlib import Path

from jobs.settings import JobSettings
from udfs.redis_layout import APPLY_TRANSITION_LUA, members_key, sequence_key, user_key

SINK_JAR = "segments-redis-sink.jar"
SINK_CLASS = "segments.redis.RedisViewSink"


class SinkJarMissing(FileNotFoundError):
    pass


def sink_jar(settings: JobSettings) -> Path:
    jar = Path(settings.jars_dir) / SINK_JAR
    if not jar.is_file():
        raise SinkJarMissing(f"{jar} is missing: run infra/setup.sh (it builds the Redis view sink from infra/java)")
    return jar


def key_prefixes(prefix: str) -> tuple[str, str, str]:
    """The Redis layout's three key prefixes; the Java side appends the user id or segment name."""
    prefixes = (user_key(prefix, ""), sequence_key(prefix, ""), members_key(prefix, ""))
    # The layout must stay "prefix + name" for the Java side to build the same keys.
    assert (user_key(prefix, "u"), sequence_key(prefix, "u"), members_key(prefix, "s")) == (
        prefixes[0] + "u", prefixes[1] + "u", prefixes[2] + "s")
    return prefixes


def redis_view_sink(settings: JobSettings):
    """The sink as a PyFlink `Sink` for `DataStream.sink_to`, for a stream whose rows start with
    user_id, segment, kind, sequence, event_time (jobs.segment_users.TRANSITION_RECORD)."""
    from pyflink.datastream.connectors.base import Sink
    from pyflink.java_gateway import get_gateway
    from pyflink.util.java_utils import add_jars_to_context_class_loader

    # On the client the class must be loadable through the gateway; pipeline.jars (which
    # create_environment fills from jars_dir) ships the same jar to the cluster.
    add_jars_to_context_class_loader([sink_jar(settings).as_uri()])
    gateway = get_gateway()
    sink_class = gateway.jvm
    for part in SINK_CLASS.split("."):
        sink_class = getattr(sink_class, part)
    user_prefix, sequence_prefix, members_prefix = key_prefixes(settings.redis_key_prefix)
    j_sink = sink_class(settings.redis_url, user_prefix, sequence_prefix, members_prefix,
                        int(settings.redis_user_ttl_s), int(settings.redis_retry_ms), APPLY_TRANSITION_LUA)
    return Sink(j_sink)
