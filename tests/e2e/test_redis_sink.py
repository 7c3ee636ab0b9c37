"""The Redis view sink's Java parts (infra/java, built by infra/setup.sh) driven through PyFlink's
JVM gateway, as Flink drives them: the committable's serializer, the URL parsing, and the
committer against a real redis-server (ordered by sequence, idempotent when committed again, the
apply script reloaded after Redis forgot it, a password and a database, an unreachable Redis
retried until the deadline and then failing the commit).

The writer-to-committer path inside a running job (nothing in Redis before the checkpoint
completes) is tests/e2e/test_redis_view.py."""

from __future__ import annotations

import os
import struct
import subprocess
import time
from pathlib import Path

import pytest

from infra.stack import ManagedProcess, free_port, wait_for_port
from jobs.committed_log import PartitionCursor
from jobs.java_operators import OperatorsJarMissing, operators_jar
from jobs.redis_follower import ViewFollower
from jobs.redis_sink import redis_view_sink
from jobs.redis_view import RedisSegmentView
from jobs.settings import load_settings
from tests.e2e.tls_redis import certificates, tls_redis
from udfs.redis_layout import ERASE_VIEW_KIND

pytestmark = pytest.mark.e2e

SINK2 = "org.apache.flink.api.connector.sink2"
PROBE_S = 5.1  # RedisViewCommitter.PROBE_MILLIS, and a little


@pytest.fixture(scope="module")
def jvm():
    from pyflink.java_gateway import get_gateway
    from pyflink.util.java_utils import add_jars_to_context_class_loader

    from jobs.flink_environment import python_worker_path

    # The gateway JVM this starts is the one every later MiniCluster job of this test process runs
    # in, and it keeps the environment it started with: without the worker path, their thread-mode
    # interpreters find no pemja (as create_environment would have set it first).
    os.environ["PYTHONPATH"] = python_worker_path()

    try:
        jar = operators_jar(load_settings(environ={}))
    except OperatorsJarMissing as err:
        pytest.fail(str(err))
    add_jars_to_context_class_loader([jar.as_uri()])
    return get_gateway().jvm


def batch(jvm, *entries):
    """A committable of (user, segment, kind, sequence, event_time[, rule]) entries (rule "r");
    kind ERASE makes an erasure marker (segment "", sequence the last one it deletes)."""
    Entry = jvm.segments.redis.TransitionBatch.Entry
    items = jvm.java.util.ArrayList()
    for user, segment, kind, sequence, event_time, *rule in entries:
        if kind == ERASE_VIEW_KIND:
            items.add(Entry.erasure(user, sequence, event_time))
        else:
            items.add(Entry(user, segment, kind == "ENTER", sequence, event_time, rule[0] if rule else "r"))
    return jvm.segments.redis.TransitionBatch(items)


def version_1_bytes(*entries) -> bytes:
    """A committable as the release before the rule wrote it (TransitionBatch version 1)."""

    def string(s: str) -> bytes:
        return struct.pack(">i", len(s.encode())) + s.encode()

    out = struct.pack(">i", len(entries))
    for user, segment, kind, sequence, event_time in entries:
        out += string(user) + string(segment) + struct.pack(">bqq", kind == "ENTER", sequence, event_time)
    return out


def test_the_committable_survives_its_serializer_and_rejects_what_it_cannot_read(jvm):
    from py4j.protocol import Py4JJavaError

    serializer = jvm.segments.redis.TransitionBatch.Serializer()
    original = batch(
        jvm,
        ("u1", "vip", "ENTER", 1_700_000_000_001, 1_700_000_000_000),
        ("üser-ß", "cart_holder", "EXIT", 2**62, -1),
        ("u2", "", "ENTER", 0, 0),
        ("u1", "", ERASE_VIEW_KIND, 1_700_000_000_999, 1_700_000_000_000),
    )
    data = serializer.serialize(original)
    assert serializer.getVersion() == 3
    again = serializer.deserialize(3, data)
    assert again.equals(original) and again.entries().size() == 4
    assert str(again.entries().get(3)) == " ERASE #1700000000999 @1700000000000"
    # A marker is not the EXIT of a segment named "" with the same numbers.
    exit_instead = batch(jvm, ("u1", "", "EXIT", 1_700_000_000_999, 1_700_000_000_000, ""))
    assert not exit_instead.entries().get(0).equals(again.entries().get(3))
    # No user id in the text: Flink logs committables, and user ids are personal data.
    assert str(again.entries().get(1)) == "cart_holder EXIT #4611686018427387904 @-1"
    empty = batch(jvm)
    assert serializer.deserialize(3, serializer.serialize(empty)).equals(empty)
    # A checkpoint of version 2 (no erasure marker): read as it was; a kind 2 byte is not one of its.
    without_marker = batch(jvm, ("u1", "vip", "ENTER", 5, 100))
    assert serializer.deserialize(2, serializer.serialize(without_marker)).equals(without_marker)
    with pytest.raises(Py4JJavaError, match="kind byte 2"):
        serializer.deserialize(2, data)
    # A checkpoint of the release before: its committables are read, their rule unknown.
    old = serializer.deserialize(1, version_1_bytes(("üser-ß", "vip", "EXIT", 7, 100), ("u2", "cart", "ENTER", 3, 90)))
    assert old.equals(batch(jvm, ("üser-ß", "vip", "EXIT", 7, 100, ""), ("u2", "cart", "ENTER", 3, 90, "")))
    with pytest.raises(Py4JJavaError, match="unknown TransitionBatch version 4"):
        serializer.deserialize(4, data)
    with pytest.raises(Py4JJavaError, match="EOFException|corrupt"):
        serializer.deserialize(3, bytes(data)[:-3])
    with pytest.raises(Py4JJavaError, match="trailing bytes"):
        serializer.deserialize(3, bytes(data) + b"\x00")
    # Short in logs and exception messages (Flink prints committables there).
    assert str(original) == "TransitionBatch{4 transitions, first vip ENTER #1700000000001 @1700000000000}"


@pytest.mark.parametrize(
    "url, shown",
    [
        ("redis://127.0.0.1:6390/0", "redis://127.0.0.1:6390/0"),
        ("redis://:s3cret@redis.example:7000/3", "redis://***@redis.example:7000/3"),
        ("redis://app:p%40ss@redis.example/2", "redis://***@redis.example:6379/2"),
        ("rediss://redis.example?password=s3cret&db=5", "rediss://***@redis.example:6379/5"),
        ("redis://s3cret@redis.example", "redis://***@redis.example:6379/0"),
    ],
)
def test_redis_urls_are_read_as_redis_py_reads_them_and_printed_without_the_password(jvm, url, shown):
    assert str(jvm.segments.redis.RedisEndpoint.parse(url)) == shown


@pytest.mark.parametrize("url", ["unix:///var/run/redis.sock", "redis:///0", "redis://h:1/x", "not a url at all"])
def test_urls_the_sink_cannot_use_are_refused_without_repeating_them(jvm, url):
    from py4j.protocol import Py4JJavaError

    with pytest.raises(Py4JJavaError) as raised:
        jvm.segments.redis.RedisEndpoint.parse(url + "?password=s3cret")
    assert "s3cret" not in str(raised.value.java_exception.getMessage())


class CommitRequest:
    """Committer.CommitRequest, as Flink's CommitRequestImpl behaves for what the committer calls."""

    def __init__(self, committable):
        self.committable = committable
        self.outcome = "committed"

    def getCommittable(self):  # noqa: N802 (Java names)
        return self.committable

    def getNumberOfRetries(self):  # noqa: N802
        return 0

    def signalFailedWithKnownReason(self, t):  # noqa: N802
        self.outcome = f"failed (known): {t}"

    def signalFailedWithUnknownReason(self, t):  # noqa: N802
        self.outcome = f"failed: {t}"

    def retryLater(self):  # noqa: N802
        self.outcome = "retry"

    def updateAndRetryLater(self, committable):  # noqa: N802
        self.committable, self.outcome = committable, "retry"

    def signalAlreadyCommitted(self):  # noqa: N802
        self.outcome = "already committed"

    class Java:
        implements = [f"{SINK2}.Committer$CommitRequest"]


class CommitterContext:
    """CommitterInitContext: the committer asks it only for its metric group."""

    def __init__(self, jvm):
        self.group = jvm.org.apache.flink.runtime.metrics.groups.InternalSinkCommitterMetricGroup.wrap(
            jvm.org.apache.flink.metrics.groups.UnregisteredMetricsGroup.createOperatorMetricGroup()
        )

    def metricGroup(self):  # noqa: N802
        return self.group

    class Java:
        implements = [f"{SINK2}.CommitterInitContext"]


def committer(jvm, redis_url: str, prefix: str = "t", retry_ms: int = 10_000):
    settings = load_settings(environ={}, redis_url=redis_url, redis_key_prefix=prefix, redis_retry_ms=retry_ms)
    return redis_view_sink(settings).get_java_function().createCommitter(CommitterContext(jvm))


def commit(committer_, *batches) -> list[CommitRequest]:
    requests = [CommitRequest(b) for b in batches]
    committer_.commit(requests)
    return requests


def test_the_committer_applies_by_sequence_and_a_second_commit_changes_nothing(jvm, redis_url):
    c = committer(jvm, redis_url)
    first = batch(
        jvm,
        ("u1", "vip", "ENTER", 1, 100),
        ("u1", "cart", "ENTER", 1, 100),
        ("u2", "vip", "ENTER", 5, 150, "big_spender"),
    )
    # Out of order within and across committables: the newest sequence wins wherever it comes.
    second = batch(jvm, ("u1", "vip", "EXIT", 2, 200), ("u2", "vip", "EXIT", 4, 140))
    assert [r.outcome for r in commit(c, first, second)] == ["committed", "committed"]
    view = RedisSegmentView(redis_url, "t", retention_ms=0)
    assert view.segments_of("u1") == {"cart": (1, 100)} and view.segments_of("u2") == {"vip": (5, 150)}
    assert view.members("vip") == {"u2"} and view.members("cart") == {"u1"}
    assert [(c.segment, c.rule) for c in view.current_segments("u2")] == [("vip", "big_spender")]
    before = {k: view.client.dump(k) for k in view.client.keys("t:*")}
    commit(c, second, first)  # as after a restore: the restored checkpoint's committables again
    assert {k: view.client.dump(k) for k in view.client.keys("t:*")} == before
    c.close()


def test_an_erasure_marker_deletes_every_entry_of_its_user_held_or_not_and_leaves_a_later_return(jvm, redis_url):
    c = committer(jvm, redis_url, prefix="e")
    before = batch(
        jvm,
        ("held", "vip", "ENTER", 1001, 1),
        ("held", "cart", "ENTER", 1001, 1),
        ("held", "cart", "EXIT", 1002, 2),  # not a lifetime end: its sequence hash entry stays
        ("quiet", "vip", "ENTER", 1001, 1),
        ("quiet", "vip", "EXIT", 1002, 2),  # holds nothing now, but `e:seq:quiet` stays
        ("other", "vip", "ENTER", 1001, 1),
    )
    erasures = batch(
        jvm,
        ("held", "", ERASE_VIEW_KIND, 5000, 5),
        ("quiet", "", ERASE_VIEW_KIND, 5000, 5),
        ("quiet", "cart", "ENTER", 6001, 6),  # the user comes back after the erasure
    )
    commit(c, before)
    view = RedisSegmentView(redis_url, "e", retention_ms=0)
    assert view.client.exists("e:seq:quiet") and not view.client.exists("e:user:quiet")
    commit(c, erasures)
    assert sorted(view.client.keys("e:*held*")) == [] and view.segments_of("held") == {}
    assert view.members("vip") == {"other"} and view.members("cart") == {"quiet"}
    assert view.segments_of("quiet") == {"cart": (6001, 6)}
    assert view.client.hgetall("e:seq:quiet") == {b"cart": b"6001"}
    # A restore commits the restored checkpoint's committables again, in order: nothing changes,
    # and the return (a sequence above the marker's) stays.
    state = {k: view.client.dump(k) for k in view.client.keys("e:*")}
    commit(c, before, erasures)
    assert {k: view.client.dump(k) for k in view.client.keys("e:*")} == state
    c.close()


def test_a_commit_after_redis_forgot_the_script_loads_it_and_applies_each_transition_once(jvm, redis_url):
    c = committer(jvm, redis_url)
    commit(c, batch(jvm, ("u0", "vip", "ENTER", 1, 100)))
    view = RedisSegmentView(redis_url, "t", retention_ms=0)
    view.client.script_flush()
    stats = view.client.info("commandstats")
    evalsha_before = stats.get("cmdstat_evalsha", {}).get("calls", 0)
    commit(c, batch(jvm, *[(f"u{i}", "vip", "ENTER", 1, 100) for i in range(1, 2500)]))  # three pipelines
    assert view.members("vip") == {f"u{i}" for i in range(2500)}
    stats = view.client.info("commandstats")
    # 2,499 EVALSHAs, the first pipeline's 1,000 refused with NOSCRIPT and sent again after one load.
    assert stats["cmdstat_evalsha"]["calls"] - evalsha_before == 2499 + 1000
    assert stats.get("cmdstat_eval", {}).get("calls", 0) == 0
    c.close()


def test_the_committer_logs_in_with_a_password_and_selects_the_database(jvm, tmp_path):
    port = free_port()
    server = ManagedProcess("redis-auth", tmp_path)
    server.start(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--requirepass",
            "s3cret word",
            "--dir",
            str(tmp_path),
        ]
    )
    try:
        wait_for_port(port, what="redis-server")
        url = f"redis://:s3cret%20word@127.0.0.1:{port}/3"
        commit(committer(jvm, url), batch(jvm, ("u1", "vip", "ENTER", 1, 100)))
        assert RedisSegmentView(url, "t", retention_ms=0).members("vip") == {"u1"}
        assert (
            RedisSegmentView(f"redis://:s3cret%20word@127.0.0.1:{port}/0", "t", retention_ms=0).members("vip") == set()
        )

        from py4j.protocol import Py4JJavaError

        # Wrong credentials are not retried: the commit fails at once, and the job with it, for
        # good (no restart loop: retrying cannot change the answer).
        with pytest.raises(Py4JJavaError) as refused:
            commit(
                committer(jvm, f"redis://:n0t-the-pass@127.0.0.1:{port}/3", retry_ms=60_000),
                batch(jvm, ("u1", "vip", "EXIT", 2, 200)),
            )
        assert "Redis refused the credentials" in str(refused.value)
        assert refused.value.java_exception.getClass().getName() == (
            "org.apache.flink.runtime.execution.SuppressRestartsException"
        )
        assert "n0t-the-pass" not in str(refused.value)
    finally:
        server.stop()


def test_an_unreachable_redis_is_retried_until_the_deadline_then_left_to_the_follower_without_failing(jvm, tmp_path):
    """Issue 19: Redis down must not stop the job. The commit retries for redis_retry_ms, then
    marks the committable failed with a known reason (Flink counts it and goes on) instead of
    throwing; while Redis stays down, later commits try once per probe interval instead of
    waiting the whole retry time (the committer runs on the task's thread); once Redis answers,
    commits apply again."""
    port = free_port()  # nothing listens there yet
    c = committer(jvm, f"redis://:s3cret@127.0.0.1:{port}/0", retry_ms=4000)
    started = time.monotonic()
    [first] = commit(c, batch(jvm, ("u1", "vip", "ENTER", 1, 100)))
    assert time.monotonic() - started >= 4.0
    assert first.outcome.startswith("failed (known)") and "s3cret" not in first.outcome
    started = time.monotonic()
    [second] = commit(c, batch(jvm, ("u2", "vip", "ENTER", 1, 100)))
    # once, not for the retry time again (room for a busy machine, well under the 4 s)
    assert time.monotonic() - started < 3.0 and second.outcome.startswith("failed (known)")
    server = ManagedProcess("redis-late", tmp_path)
    server.start(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--requirepass",
            "s3cret",
            "--dir",
            str(tmp_path),
        ]
    )
    try:
        wait_for_port(port, what="redis-server")
        time.sleep(PROBE_S)  # the next probe is due
        [third] = commit(c, batch(jvm, ("u3", "vip", "ENTER", 1, 100)))
        assert third.outcome == "committed"
        # Only what was committed after Redis answered is there: the rest is the follower's.
        assert RedisSegmentView(f"redis://:s3cret@127.0.0.1:{port}/0", "t", retention_ms=0).members("vip") == {"u3"}
    finally:
        c.close()
        server.stop()


def test_an_env_reference_keeps_the_url_out_of_the_job_and_is_read_where_the_committer_runs(jvm):
    from py4j.protocol import Py4JJavaError

    name = "SEGMENTS_TEST_NEVER_SET_REDIS_URL"
    assert name not in os.environ
    # Accepted on the client without the variable: only the committer's process reads it ...
    sink = redis_view_sink(load_settings(environ={}, redis_url=f"env:{name}")).get_java_function()
    assert "env:" not in str(sink)
    # ... and there, an unset variable is named (the URL would not be).
    with pytest.raises(Py4JJavaError, match=f"the Redis URL variable {name} is not set"):
        sink.createCommitter(CommitterContext(jvm))


def test_the_job_is_refused_on_the_client_when_the_operators_jar_was_not_built(tmp_path):
    with pytest.raises(OperatorsJarMissing, match="run infra/setup.sh"):
        operators_jar(load_settings(environ={}, jars_dir=str(tmp_path)))


def test_the_operators_jar_builds_byte_for_byte_the_same_from_the_same_sources(tmp_path):
    import hashlib
    import os

    import pyflink

    lib = os.path.join(os.path.dirname(pyflink.__file__), "lib")
    script = Path(__file__).resolve().parents[2] / "infra" / "java" / "build.sh"
    digests = []
    for name in ("a.jar", "b.jar"):
        subprocess.run(["bash", str(script), lib, str(tmp_path / name)], check=True, capture_output=True)
        digests.append(hashlib.sha256((tmp_path / name).read_bytes()).hexdigest())
    assert digests[0] == digests[1]


def test_the_sink_and_the_view_speak_tls_verify_the_certificate_and_the_host_and_log_in_as_an_acl_user(jvm, tmp_path):
    """Issue 19: rediss:// with ?ssl_ca_certs=FILE (redis-py's name, read by both clients) and a
    user and password, against a redis-server that speaks TLS only and knows no default user."""
    from py4j.protocol import Py4JJavaError

    server, port, ca = tls_redis(tmp_path / "good", "IP:127.0.0.1,DNS:localhost")
    try:
        url = f"rediss://app:app%20s3cret@127.0.0.1:{port}/0?ssl_ca_certs={ca}"
        [request] = commit(committer(jvm, url), batch(jvm, ("u1", "vip", "ENTER", 1, 100)))
        assert request.outcome == "committed"
        view = RedisSegmentView(url, "t", retention_ms=0)
        assert view.members("vip") == {"u1"}
        # The view follower's write (a batch script and its offsets under WATCH) as this user too.
        follower = ViewFollower(view, "127.0.0.1:1", "no-topic")
        follower._cursors = {0: PartitionCursor(0, offset=7)}
        follower._apply([("u9", "vip", "ENTER", 1, 100, "r", 0, 6)], {"0": 7})  # read at partition 0, offset 6
        assert view.members("vip") == {"u1", "u9"} and view.client.hgetall("t:view:offsets") == {b"0": b"7"}
        # Another CA's certificate: refused at once by both, and for good (not retried).
        other_ca, _, _ = certificates(tmp_path, "DNS:elsewhere")
        untrusted = url.replace(str(ca), str(other_ca))
        with pytest.raises(Py4JJavaError) as refused:
            commit(committer(jvm, untrusted, retry_ms=60_000), batch(jvm, ("u2", "vip", "ENTER", 1, 100)))
        assert "TLS handshake with Redis" in str(refused.value) and "s3cret" not in str(refused.value)
        with pytest.raises(Exception, match="certificate verify failed"):
            RedisSegmentView(untrusted, "t", retention_ms=0)
        # Without TLS the server does not answer at all (no plaintext port). Any error will do: which
        # one redis-py raises depends on how the TLS port drops the plaintext connection.
        with pytest.raises(Exception):  # noqa: B017
            RedisSegmentView(url.replace("rediss://", "redis://").split("?")[0], "t", retention_ms=0)
    finally:
        server.stop()
    # A certificate the CA signed for another host: the name is checked, by both clients.
    server, port, ca = tls_redis(tmp_path / "other-host", "DNS:redis.elsewhere.example")
    try:
        url = f"rediss://app:app%20s3cret@127.0.0.1:{port}/0?ssl_ca_certs={ca}"
        with pytest.raises(Py4JJavaError, match="TLS handshake with Redis"):
            commit(committer(jvm, url, retry_ms=60_000), batch(jvm, ("u1", "vip", "ENTER", 1, 100)))
        with pytest.raises(Exception, match="certificate verify failed|match|IP address mismatch"):
            RedisSegmentView(url, "t", retention_ms=0)
    finally:
        server.stop()
