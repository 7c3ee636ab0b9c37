"""Writes generated shopper traffic to the events topic as Avro (keyed by user), at a set rate."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path

from confluent_kafka import Producer
from tqdm import tqdm

from jobs.kafka_security import PLAINTEXT, KafkaSecurity
from udfs.codec import SchemaCatalog
from udfs.events import UserEvent


def produce_events(
    events: Iterable[UserEvent],
    bootstrap_servers: str,
    topic: str,
    rate_per_s: float = 0.0,
    jsonl_copy: Path | None = None,
    total: int | None = None,
    progress: bool = True,
    security: KafkaSecurity = PLAINTEXT,
) -> int:
    """Sends events in the order given; rate 0 means as fast as the producer takes them."""
    codec = SchemaCatalog().codec("UserEvent")
    producer = Producer(
        {
            "bootstrap.servers": bootstrap_servers,
            "linger.ms": 20,
            "enable.idempotence": True,
            **security.librdkafka_config(),
        }
    )
    copy = open(jsonl_copy, "w") if jsonl_copy else None
    sent = 0
    started = time.monotonic()
    try:
        for event in tqdm(events, total=total, unit="ev", disable=not progress, smoothing=0.1):
            record = event.to_record()
            while True:
                try:
                    producer.produce(
                        topic, key=event.user_id.encode(), value=codec.encode(record), timestamp=event.timestamp
                    )
                    break
                except BufferError:  # local queue full: let it drain
                    producer.poll(0.05)
            if copy:
                copy.write(json.dumps(record, separators=(",", ":")) + "\n")
            sent += 1
            producer.poll(0)
            if rate_per_s > 0:
                ahead = sent / rate_per_s - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)
    finally:
        remaining = producer.flush(30)
        if copy:
            copy.close()
    if remaining:
        raise RuntimeError(f"{remaining} events were not acknowledged by the broker")
    return sent
