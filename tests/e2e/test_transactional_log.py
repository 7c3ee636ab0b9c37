"""Our read_committed reader against the real broker: it hides aborted and open transactions and
keeps committed and plain records, where the broker's own read_committed (as librdkafka sees it)
shows the aborted ones too (tansu 0.6 sends no aborted-transaction list; a real Kafka does)."""

from __future__ import annotations

import pytest
from confluent_kafka import Producer

from infra.stack import create_topics
from jobs.committed_log import read_topic
from tests.e2e.conftest import wait_until

pytestmark = pytest.mark.e2e


def leave_open(bootstrap: str, transactional_id: str, topic: str, records: list[tuple[bytes, int]]) -> Producer:
    """A transaction with `records` (value, partition) sent and never ended: a producer that went
    away. The producer is returned so that it is not closed before the test ends."""
    producer = Producer({"bootstrap.servers": bootstrap, "transactional.id": transactional_id})
    producer.init_transactions(30)
    producer.begin_transaction()
    for value, partition in records:
        producer.produce(topic, value, partition=partition)
    producer.flush(30)
    return producer


def values_seen_by_librdkafka(bootstrap: str, topic: str, idle_s: float) -> list[bytes]:
    """What the broker's own read_committed gives a librdkafka client (assign() to every partition,
    read until none has come for idle_s): the behaviour this test records, so it is librdkafka's
    reader on purpose, not the project's."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition

    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "txn-check-reader",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
    )
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in sorted(partitions)])
        values = []
        while (msg := consumer.poll(idle_s)) is not None:
            if msg.error():
                raise KafkaException(msg.error())
            values.append(msg.value())
        return values
    finally:
        consumer.close()


def test_aborted_and_open_transactions_are_hidden_and_committed_ones_kept(broker):
    create_topics(broker, {"txn-check": 2})
    producer = Producer({"bootstrap.servers": broker, "transactional.id": "txn-check-1"})
    producer.init_transactions(30)
    producer.begin_transaction()
    producer.produce("txn-check", b"aborted", key=b"k", partition=0)
    producer.flush(30)
    producer.abort_transaction(30)
    producer.begin_transaction()
    producer.produce("txn-check", b"committed-0", key=b"k", partition=0)
    producer.produce("txn-check", b"committed-1", partition=1)
    producer.commit_transaction(30)
    plain = Producer({"bootstrap.servers": broker})
    plain.produce("txn-check", b"plain", partition=1)
    plain.flush(30)
    # A transaction left open by a producer that went away: not committed (yet).
    orphan = leave_open(broker, "txn-check-2", "txn-check", [(b"open", 0)])  # noqa: F841 (kept open)

    log = read_topic(broker, "txn-check")
    assert [(r.partition, r.value) for r in log.committed] == [(0, b"committed-0"), (1, b"committed-1"), (1, b"plain")]
    assert [(r.partition, r.key, r.value) for r in log.aborted] == [(0, b"k", b"aborted")]
    # What the broker's read_committed gives a client, for the record: if this ever stops
    # including the aborted record, the broker has been fixed and the fault suite can rely on it.
    seen_by_client = sorted(values_seen_by_librdkafka(broker, "txn-check", idle_s=2))
    print(f"\nlibrdkafka read_committed on this broker sees: {seen_by_client}")
    assert b"open" not in seen_by_client and b"committed-0" in seen_by_client


def test_the_streaming_reader_yields_committed_records_and_waits_for_a_transaction_being_committed(broker):
    """What `segments redis rebuild` reads: committed records only, aborted ones counted and
    dropped; a transaction still open at the end is waited for (the job may be committing it
    right then), and given up on after `open_wait_s`."""
    import threading

    from jobs.committed_log import ReadSummary, committed_records

    create_topics(broker, {"txn-stream": 2})
    producer = Producer({"bootstrap.servers": broker, "transactional.id": "txn-stream-1"})
    producer.init_transactions(30)
    for n in range(3):
        producer.begin_transaction()
        producer.produce("txn-stream", f"aborted-{n}".encode(), partition=n % 2)
        producer.flush(30)
        producer.abort_transaction(30)
        producer.begin_transaction()
        producer.produce("txn-stream", f"committed-{n}".encode(), partition=n % 2)
        producer.commit_transaction(30)
    # Open at the end of the topic, committed a moment later (as by the job's next checkpoint).
    producer.begin_transaction()
    producer.produce("txn-stream", b"late-commit", partition=1)
    producer.flush(30)
    committer = threading.Timer(1.5, lambda: producer.commit_transaction(30))
    committer.start()
    summary = ReadSummary()
    values = [r.value for r in committed_records(broker, "txn-stream", open_wait_s=60, summary=summary)]
    committer.join()
    assert sorted(values) == [b"committed-0", b"committed-1", b"committed-2", b"late-commit"]
    assert summary.aborted == 3 and summary.open_left == 0

    # A transaction that stays open: waited for, then left out and counted.
    orphan = leave_open(broker, "txn-stream-2", "txn-stream", [(b"open", 0)])  # noqa: F841 (kept open)
    summary = ReadSummary()
    values = [r.value for r in committed_records(broker, "txn-stream", open_wait_s=0.5, summary=summary)]
    assert b"open" not in values and len(values) == 4
    assert summary.open_left == 1 and summary.open_waited_s >= 0.5


def test_following_yields_each_transaction_as_it_commits_and_never_an_aborted_one(broker):
    """What `segments tail` reads: from the beginning or from the end at the start, committed
    records as their markers come, aborted ones never, and no stall behind a transaction still open
    (librdkafka's read_committed would stop there)."""
    import threading

    from jobs.committed_log import follow_committed_records

    create_topics(broker, {"txn-follow": 2})
    producer = Producer({"bootstrap.servers": broker, "transactional.id": "txn-follow-1"})
    producer.init_transactions(30)
    producer.begin_transaction()
    producer.produce("txn-follow", b"before", partition=0)
    producer.commit_transaction(30)
    # Left open by another producer, on both partitions: what follows must not wait for it.
    orphan = leave_open(broker, "txn-follow-2", "txn-follow", [(b"open-0", 0), (b"open-1", 1)])  # noqa: F841

    from_beginning, from_end = [], []

    def follow(into: list, beginning: bool) -> None:
        for record in follow_committed_records(broker, "txn-follow", from_beginning=beginning, poll_s=0.1):
            into.append(record.value)
            if {b"after-0", b"after-1"} <= set(into):
                return

    threads = [
        threading.Thread(target=follow, args=(from_beginning, True), daemon=True),
        threading.Thread(target=follow, args=(from_end, False), daemon=True),
    ]
    for thread in threads:
        thread.start()

    def committed(value: bytes, partition: int) -> None:
        producer.begin_transaction()
        producer.produce("txn-follow", value, partition=partition)
        producer.commit_transaction(30)

    def from_end_reads() -> bool:  # it places itself at the end when it starts: probe until it reads
        committed(b"probe", 0)
        return bool(from_end)

    wait_until(from_end_reads, timeout_s=60, interval_s=0.5)
    producer.begin_transaction()
    producer.produce("txn-follow", b"aborted", partition=1)
    producer.flush(30)
    producer.abort_transaction(30)
    committed(b"after-0", 0)
    committed(b"after-1", 1)
    for thread in threads:
        thread.join(60)
    assert sorted(v for v in from_beginning if v != b"probe") == [b"after-0", b"after-1", b"before"]
    assert set(from_end) == {b"probe", b"after-0", b"after-1"}
