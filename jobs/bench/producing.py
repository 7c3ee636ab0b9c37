"""The bench's Kafka producer: idempotent, waiting out a full local queue, flushed with a check."""

from __future__ import annotations


def make_producer(bootstrap: str, **extra):
    from confluent_kafka import Producer

    return Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 5, **extra})


def produce(producer, topic: str, value: bytes, key: bytes | None = None, partition: int | None = None) -> None:
    kwargs = {"key": key, "value": value}
    if partition is not None:
        kwargs["partition"] = partition
    while True:
        try:
            producer.produce(topic, **kwargs)
            return
        except BufferError:  # local queue full: let it drain
            producer.poll(0.05)


def flush(producer, what: str) -> None:
    remaining = producer.flush(120)
    if remaining:
        raise RuntimeError(f"{remaining} {what} were not acknowledged by the broker")
