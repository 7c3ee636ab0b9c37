"""Kafka security against a broker that requires it: tansu behind the SASL gate (SASL over TLS,
tests/e2e/sasl_gate.py). The project's wire-level reader and a confluent-kafka client log in with
SCRAM-SHA-512 and read committed records; wrong and missing credentials are refused."""

from __future__ import annotations

import dataclasses
import os
import re
import time
from urllib.parse import quote

import pytest
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition

from infra.stack import create_topics
from jobs.committed_log import (
    BrokerConnection,
    KafkaAuthenticationError,
    committed_records,
    follow_committed_records,
    read_topic,
)
from jobs.kafka_security import KafkaSecurity
from tests.e2e.conftest import wait_until
from tests.e2e.tls_redis import ACL_PASSWORD, ACL_USER, tls_redis

pytestmark = pytest.mark.e2e

TOPIC = "secured-log"


def write_committed_and_aborted(bootstrap: str, security: KafkaSecurity) -> None:
    producer = Producer(
        {"bootstrap.servers": bootstrap, "transactional.id": "secured-writer", **security.librdkafka_config()}
    )
    producer.init_transactions(30)
    producer.begin_transaction()
    for i in range(3):
        producer.produce(TOPIC, key=b"k", value=f"committed-{i}".encode())
    producer.commit_transaction(30)
    producer.begin_transaction()
    producer.produce(TOPIC, key=b"k", value=b"aborted")
    assert producer.flush(30) == 0  # on the broker, then aborted (abort alone purges what is unsent)
    producer.abort_transaction(30)


def test_reader_and_librdkafka_read_committed_records_over_sasl_ssl_with_scram_sha_512(secured_broker):
    security = secured_broker.security("SCRAM-SHA-512")
    create_topics(secured_broker.bootstrap, {TOPIC: 1}, security.librdkafka_config())
    write_committed_and_aborted(secured_broker.bootstrap, security)
    expected = [b"committed-0", b"committed-1", b"committed-2"]

    log = read_topic(secured_broker.bootstrap, TOPIC, security)
    assert [r.value for r in log.committed] == expected
    assert [r.value for r in log.aborted] == [b"aborted"]
    assert [r.value for r in committed_records(secured_broker.bootstrap, TOPIC, security=security)] == expected
    following = follow_committed_records(secured_broker.bootstrap, TOPIC, from_beginning=True, security=security)
    assert [next(following).value for _ in expected] == expected  # `segments tail`'s reader
    following.close()

    consumer = Consumer(
        {
            "bootstrap.servers": secured_broker.bootstrap,
            "group.id": "secured-reader",
            "isolation.level": "read_committed",
            "enable.auto.commit": False,
            **security.librdkafka_config(),
        }
    )
    try:
        consumer.assign([TopicPartition(TOPIC, 0, 0)])
        got: list[bytes] = []
        deadline = time.monotonic() + 30
        while len(got) < len(expected) and time.monotonic() < deadline:
            message = consumer.poll(1.0)
            if message is not None and not message.error():
                got.append(message.value())
    finally:
        consumer.close()
    assert got[:3] == expected  # (tansu sends no aborted list: librdkafka may also return "aborted" after)


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256"])
def test_the_reader_logs_in_with_the_other_mechanisms(secured_broker, mechanism):
    security = secured_broker.security(mechanism)
    create_topics(secured_broker.bootstrap, {TOPIC: 1}, security.librdkafka_config())
    write_committed_and_aborted(secured_broker.bootstrap, security)
    assert len(read_topic(secured_broker.bootstrap, TOPIC, security).committed) == 3


@pytest.mark.parametrize("secured_broker", ["mutual-tls"], indirect=True)
def test_with_mutual_tls_the_client_certificate_is_required(secured_broker):
    security = secured_broker.security("SCRAM-SHA-512")
    create_topics(secured_broker.bootstrap, {TOPIC: 1}, security.librdkafka_config())
    write_committed_and_aborted(secured_broker.bootstrap, security)
    assert len(read_topic(secured_broker.bootstrap, TOPIC, security).committed) == 3
    host, port = secured_broker.bootstrap.rsplit(":", 1)
    no_certificate = dataclasses.replace(security, ssl_certificate_location="", ssl_key_location="")
    with pytest.raises(KafkaAuthenticationError):
        BrokerConnection(host, int(port), security=no_certificate)
    with pytest.raises(KafkaException):
        create_topics(
            secured_broker.bootstrap, {"other": 1}, {**no_certificate.librdkafka_config(), "socket.timeout.ms": 3000}
        )


def test_wrong_or_missing_credentials_are_refused_with_a_clear_error(secured_broker, monkeypatch):
    host, port = secured_broker.bootstrap.rsplit(":", 1)
    security = secured_broker.security("SCRAM-SHA-512")
    monkeypatch.setenv(secured_broker.password_variable, "not-the-password")
    with pytest.raises(KafkaAuthenticationError, match="refused the login"):
        BrokerConnection(host, int(port), security=security)
    with pytest.raises(KafkaAuthenticationError, match="refused the login"):
        BrokerConnection(host, int(port), security=dataclasses.replace(security, sasl_username="mallory"))
    errors: list = []
    refused = Producer(
        {"bootstrap.servers": secured_broker.bootstrap, "error_cb": errors.append, **security.librdkafka_config()}
    )
    wait_until(lambda: (refused.poll(0.2), errors)[1], timeout_s=20, interval_s=0.1)
    assert "SASL authentication error" in str(errors[0]) and "invalid credentials" in str(errors[0]), errors
    with pytest.raises(KafkaException):
        refused.list_topics(timeout=3)
    # TLS but no SASL: the gate closes the connection at the first request that is not a login.
    no_login = KafkaSecurity("SSL", ssl_ca_location=str(secured_broker.ca_file))
    with pytest.raises(ConnectionError, match="closed the connection"):
        BrokerConnection(host, int(port), security=no_login).fetch(TOPIC, 0, 0)
    # SASL without TLS against a TLS listener, and TLS against another CA, fail at the handshake.
    plaintext = dataclasses.replace(security, security_protocol="SASL_PLAINTEXT", ssl_ca_location="")
    with pytest.raises(ConnectionError):
        BrokerConnection(host, int(port), timeout_s=5, security=plaintext)
    untrusted = dataclasses.replace(security, ssl_ca_location="")  # the system's CAs: not the gate's
    with pytest.raises(KafkaAuthenticationError, match="TLS"):
        BrokerConnection(host, int(port), security=untrusted)


def test_the_command_line_generates_and_backtests_over_sasl_ssl_without_printing_the_password(
    secured_broker, stack_root
):
    """`segments generate` and `segments backtest kafka://...` with the settings as SEGMENTS_*
    variables and the password in the environment only."""
    import os
    import subprocess
    import sys

    from tests.e2e.conftest import PROJECT_ROOT, job_environment

    topic = "cli-events"
    create_topics(secured_broker.bootstrap, {topic: 1}, secured_broker.security().librdkafka_config())
    env = job_environment(stack_root, "cli", {**secured_broker.settings(), "events_topic": topic})
    assert env[secured_broker.password_variable] == os.environ[secured_broker.password_variable]

    def segments(*argv: str) -> subprocess.CompletedProcess:
        done = subprocess.run(
            [sys.executable, "-m", "jobs.cli", *argv],
            env=env,
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert secured_broker.password not in done.stdout + done.stderr
        return done

    generated = segments("generate", "--users", "5", "--hours", "2", "--rate", "0", "--quiet")
    assert generated.returncode == 0, generated.stderr[-2000:]
    sent = int(re.search(r"sent (\d+) events", generated.stdout).group(1))
    assert sent > 0
    backtest = segments(
        "backtest", "jobs/definitions/shop.yaml", "--events", f"kafka://{secured_broker.bootstrap}/{topic}", "--quiet"
    )
    assert backtest.returncode == 0, backtest.stderr[-2000:]
    assert f": {sent} applied" in backtest.stdout, (sent, backtest.stdout[:300])
    env[secured_broker.password_variable] = "not-the-password"
    refused = segments(
        "backtest", "jobs/definitions/shop.yaml", "--events", f"kafka://{secured_broker.bootstrap}/{topic}", "--quiet"
    )
    assert refused.returncode != 0


@pytest.mark.parametrize(
    "secured_broker, mechanism, redis_over_tls",
    [("tls", "SCRAM-SHA-512", True), ("mutual-tls", "SCRAM-SHA-512", False), ("plaintext", "PLAIN", False)],
    indirect=["secured_broker"],
)
def test_the_job_reads_and_writes_a_sasl_broker_with_the_password_only_in_its_environment(
    secured_broker, mechanism, redis_over_tls, run_job, stack_root, monkeypatch, catalog
):
    """`segments run` against the gate (SCRAM-SHA-512 over TLS, with and without a client
    certificate; PLAIN over SASL_PLAINTEXT); with SCRAM over TLS, the Redis view on a TLS-only
    redis-server as an ACL user too (issue 19's security tier: an authenticated broker and an
    authenticated TLS Redis in one run)."""
    from jobs.bench.runs import rest_port_of

    flink_logs = stack_root / "flink-logs"
    monkeypatch.setenv("FLINK_LOG_DIR", str(flink_logs))
    redis = None
    if redis_over_tls:
        server, port, ca = tls_redis(stack_root / "redis-tls", "IP:127.0.0.1,DNS:localhost")
        monkeypatch.setenv(
            "REDIS_VIEW_URL", f"rediss://{ACL_USER}:{quote(ACL_PASSWORD)}@127.0.0.1:{port}/0?ssl_ca_certs={ca}"
        )
        redis = server
    try:
        check_job_over_sasl(
            secured_broker,
            mechanism,
            run_job,
            lambda job: rest_port_of(flink_logs),
            [flink_logs, stack_root / "logs"],
            catalog,
            redis_over_tls,
        )
    finally:
        if redis is not None:
            redis.stop()


@pytest.mark.cluster
def test_the_job_on_the_standalone_cluster_reads_the_password_on_its_workers(
    secured_broker, submit_job, stack_root, catalog
):
    """`segments submit` to a JobManager and TaskManager started with the password variable in
    their environment (as a deployment gives it from a secret), SCRAM-SHA-512 over TLS."""
    check_job_over_sasl(
        secured_broker, "SCRAM-SHA-512", submit_job, lambda job: job.rest_port, [stack_root / "logs"], catalog
    )


def check_job_over_sasl(
    secured_broker, mechanism, start_job, rest_port_of_job, log_dirs, catalog, redis_over_tls: bool = False
):
    """Events produced as `segments generate` produces them, the job started, the transitions read
    back and equal to the core's; the password is in the job's environment only, not in its REST
    plan and configuration or any log; the job's own Java clients logged in at the gate. With
    `redis_over_tls`, the job writes its Redis view through env:REDIS_VIEW_URL (set by the caller)
    and the view comes to the core's memberships."""
    import json
    import urllib.request

    from jobs.settings import SHIPPED_DEFINITIONS
    from jobs.traffic import produce_events
    from tests.conftest import START_MS
    from udfs.events import UserEvent
    from udfs.profile_config import DAY_MS
    from udfs.segmentation import Segmentation
    from udfs.shoppers import generate_events
    from udfs.transitions import replay_events

    security = secured_broker.security(mechanism)
    topics = {"events_topic": "sec-events", "transitions_topic": "sec-transitions", "dead_letter_topic": "sec-dlq"}
    create_topics(secured_broker.bootstrap, dict.fromkeys(topics.values(), 1), security.librdkafka_config())
    traffic = list(generate_events(20, seed=7, start_ms=START_MS, duration_ms=4 * 3600_000))
    sentinel = UserEvent("sentinel-1", "sentinel", "page_view", traffic[-1].timestamp + DAY_MS)
    sent = produce_events(
        [*traffic, sentinel], secured_broker.bootstrap, topics["events_topic"], progress=False, security=security
    )
    assert sent == len(traffic) + 1
    engine = Segmentation.load(SHIPPED_DEFINITIONS).engine()
    expected, _ = replay_events(engine, [*traffic, sentinel], until_ms=sentinel.timestamp - 2_000 - 1)
    assert expected

    redis = {"redis_url": "env:REDIS_VIEW_URL", "redis_key_prefix": "t"} if redis_over_tls else {"redis_url": ""}
    job = start_job(
        **secured_broker.settings(mechanism),
        **topics,
        **redis,
        redis_follower=False,
        checkpoint_interval_ms=2000,
        watermark_lag_ms=2000,
        transactional_id_prefix="sec",
    )

    def committed():
        job.assert_alive()
        records = read_topic(secured_broker.bootstrap, topics["transitions_topic"], security).committed
        return records if len(records) >= len(expected) else None

    records = wait_until(committed, timeout_s=240, interval_s=3, on_timeout=job.log_tail)
    codec = catalog.codec("SegmentTransition")
    got = sorted(codec.decode(r.value)["transition_id"] for r in records)
    assert got == sorted(t.transition_id for t in expected)
    if redis_over_tls:
        from jobs.redis_view import RedisSegmentView

        members: dict[str, set[str]] = {}
        for t in expected:  # in each user's order: the last transition of a (user, segment) holds
            (
                members.setdefault(t.segment, set()).add
                if t.kind == "ENTER"
                else members.setdefault(t.segment, set()).discard
            )(t.user_id)
        view = RedisSegmentView(os.environ["REDIS_VIEW_URL"], "t", retention_ms=0)
        wait_until(
            lambda: all(view.members(s) == m for s, m in members.items()) or None,
            timeout_s=60,
            interval_s=2,
            on_timeout=job.log_tail,
        )
        passwords = (secured_broker.password, ACL_PASSWORD, quote(ACL_PASSWORD))
    else:
        passwords = (secured_broker.password,)

    # The password went nowhere but the job's environment: not into its REST-visible plan and
    # configuration, nor any log line of the job, the gate or Flink.
    rest_port = rest_port_of_job(job)
    assert rest_port, "no REST port for the job"

    def rest(path: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{rest_port}{path}", timeout=10) as r:
            return r.read().decode()

    job_id = json.loads(rest("/jobs/overview"))["jobs"][0]["jid"]
    seen = [rest(f"/jobs/{job_id}/plan"), rest(f"/jobs/{job_id}/config"), rest("/jobmanager/config")]
    seen += [p.read_text(errors="replace") for d in log_dirs for p in d.glob("*") if p.is_file()]
    assert len(seen) > 4 and not [p for p in passwords for text in seen if p in text]
    # The job's own (Java) clients logged in, the source's and both sinks': not only this test's
    # (librdkafka's client id 'rdkafka', the wire reader's 'segments-committed-log').
    gate_log = next(p for d in log_dirs for p in d.glob("sasl-gate.log"))
    logins = re.findall(rf"authenticated 'alice' with {mechanism}, client id '([^']*)'", gate_log.read_text())
    java = {c for c in logins if c not in ("rdkafka", "segments-committed-log")}
    for client in ("enumerator-admin-client", "transitions_out", "dead_letters_out"):  # source, both sinks
        assert any(client in c for c in java), logins
