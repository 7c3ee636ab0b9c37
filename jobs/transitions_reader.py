"""Reads committed records back from a topic: assign() to every partition (a consumer-group join
on tansu takes ~23 s) and read_committed, so only transactions the job committed are seen."""

from __future__ import annotations

from collections.abc import Iterator

from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, Consumer, KafkaException, TopicPartition

from udfs.codec import SchemaCatalog


def committed_consumer(bootstrap_servers: str, topic: str, from_beginning: bool = True) -> Consumer:
    consumer = Consumer({
        "bootstrap.servers": bootstrap_servers,
        "group.id": "segments-reader",  # required by librdkafka; unused with assign()
        "enable.auto.commit": False,
        "isolation.level": "read_committed",
    })
    partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    start = OFFSET_BEGINNING if from_beginning else OFFSET_END
    consumer.assign([TopicPartition(topic, p, start) for p in sorted(partitions)])
    return consumer


def read_committed_values(
    bootstrap_servers: str, topic: str, idle_s: float = 3.0
) -> list[tuple[bytes | None, bytes, int, int]]:
    """(key, value, partition, offset) of every committed record, once none has come for idle_s."""
    consumer = committed_consumer(bootstrap_servers, topic)
    out = []
    try:
        while True:
            msg = consumer.poll(idle_s)
            if msg is None:
                return out
            if msg.error():
                raise KafkaException(msg.error())
            out.append((msg.key(), msg.value(), msg.partition(), msg.offset()))
    finally:
        consumer.close()


def follow_transitions(bootstrap_servers: str, topic: str, from_beginning: bool = False) -> Iterator[dict]:
    codec = SchemaCatalog().codec("SegmentTransition")
    consumer = committed_consumer(bootstrap_servers, topic, from_beginning)
    try:
        while True:
            msg = consumer.poll(1.0)
            if msg is None:
                continue
            if msg.error():
                raise KafkaException(msg.error())
            yield codec.decode(msg.value())
    finally:
        consumer.close()
