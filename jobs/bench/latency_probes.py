"""The latency run's helper processes (`python -m jobs.bench produce|watch-redis|watch-kafka`): a
paced producer that stamps pre-encoded events with the wall clock as it sends them, and the
watchers that note when each transition shows in the Redis view and under read_committed."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

from jobs.bench import now_ms
from jobs.bench.load import generated_events
from jobs.bench.producing import flush, make_producer, produce


def zigzag_varint(n: int) -> bytes:
    """An Avro long as its binary encoding writes it."""
    z = (n << 1) ^ (n >> 63)
    out = bytearray()
    while True:
        low, z = z & 0x7F, z >> 7
        if not z:
            out.append(low)
            return bytes(out)
        out.append(low | 0x80)


def timestamp_slot(encode, record: dict) -> tuple[bytes, int, int]:
    """(payload, offset, length) of the event's timestamp in its encoding, so the paced producer can
    stamp a pre-encoded event with the wall clock by replacing those bytes (an encode per event
    would cost the producer half a core at 5,000 events/s, on the machine the job is measured on).
    Found by encoding twice with timestamps one apart: the first differing byte starts the field;
    every epoch-ms value until 2039 has the same 6-byte length."""
    at = record["timestamp"]
    one, two = encode({**record, "timestamp": at}), encode({**record, "timestamp": at + 1})
    if len(one) != len(two):
        raise ValueError("the timestamp's encoded length changed between two adjacent values")
    offset = next(i for i, (a, b) in enumerate(zip(one, two, strict=True)) if a != b)
    return one, offset, len(zigzag_varint(at))


def stamp(payload: bytes, offset: int, length: int, timestamp_ms: int) -> bytes:
    encoded = zigzag_varint(timestamp_ms)
    if len(encoded) != length:
        raise ValueError(f"timestamp {timestamp_ms} does not encode in {length} bytes")
    return payload[:offset] + encoded + payload[offset + length :]


def main_produce(args) -> int:
    """Offers `rate` events/s for `seconds`, each stamped with the wall clock as it is sent."""
    import resource
    from dataclasses import replace

    from udfs.codec import SchemaCatalog

    codec = SchemaCatalog().codec("UserEvent")
    wanted = int(args.rate * args.seconds) + 1
    # Encoded before the clock starts, each with a timestamp of now's length, stamped at send time.
    prepared = []
    offsets: list[int] = []  # where earlier events had it: ids of equal lengths put it at the same place
    for event in generated_events(wanted, args.users, args.seed, now_ms()):
        record = replace(event, timestamp=now_ms()).to_record()
        payload, expected = codec.encode(record), zigzag_varint(record["timestamp"])
        offset = next((o for o in offsets if payload[o : o + len(expected)] == expected), None)
        if offset is None:
            payload, offset, _ = timestamp_slot(codec.encode, record)
            offsets.append(offset)
        prepared.append((event.user_id.encode(), payload, offset, len(expected)))
    check = stamp(prepared[0][1], prepared[0][2], prepared[0][3], 1_234_567_890_123)
    if codec.decode(check)["timestamp"] != 1_234_567_890_123:
        raise ValueError("stamping the timestamp into a pre-encoded event did not work")
    producer = make_producer(args.bootstrap, **{"linger.ms": 1})
    before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.time()
    sent = 0
    end = started + args.seconds
    while sent < len(prepared):
        now = time.time()
        if now >= end:
            break
        due = min(len(prepared), int((now - started) * args.rate) + 1)
        while sent < due:
            key, payload, offset, length = prepared[sent]
            produce(producer, args.topic, stamp(payload, offset, length, now_ms()), key)
            sent += 1
        producer.poll(0)
        time.sleep(0.001)
    ended = time.time()
    flush(producer, "events")
    after = resource.getrusage(resource.RUSAGE_SELF)  # the sending only, not the preparation
    cpu_s = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    Path(args.out).write_text(json.dumps({"started": started, "ended": ended, "sent": sent, "cpu_s": cpu_s}))
    return 0


class _Stop:
    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGTERM, self.request)
        signal.signal(signal.SIGINT, self.request)

    def request(self, *_):
        self.requested = True


def main_watch_redis(args) -> int:
    """Records when each (user, segment, sequence) first shows in the view's sequence hashes:
    subscribed to keyspace notifications of those keys, it reads a key after each notification.
    Each key's time is its latest notification before the read (an upper bound)."""
    import resource

    import redis

    stop = _Stop()
    client = redis.Redis.from_url(args.url)
    db = client.connection_pool.connection_kwargs.get("db", 0)
    channel_prefix = f"__keyspace@{db}__:{args.prefix}:seq:".encode()
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.psubscribe(channel_prefix.decode() + "*")
    known: dict[tuple[str, str], int] = {}
    seen: list[tuple[str, str, int, float]] = []
    while not stop.requested:
        message = pubsub.get_message(timeout=0.2)
        if message is None:
            continue
        batch: dict[str, float] = {}
        while message is not None and len(batch) < 2000:
            if message["type"] == "pmessage":
                batch[message["channel"][len(channel_prefix) :].decode()] = time.time() * 1000
            message = pubsub.get_message(timeout=0)
        users = list(batch)
        pipe = client.pipeline(transaction=False)
        for user in users:
            pipe.hgetall(f"{args.prefix}:seq:{user}")
        for user, sequences in zip(users, pipe.execute(), strict=True):
            for segment, sequence in sequences.items():
                key, value = (user, segment.decode()), int(sequence)
                if value > known.get(key, 0):
                    known[key] = value
                    seen.append((user, key[1], value, batch[user]))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    Path(args.out).write_text(json.dumps({"seen": seen, "cpu_s": usage.ru_utime + usage.ru_stime}))
    return 0


def main_watch_kafka(args) -> int:
    """Records when each transition became readable under read_committed: (partition, offset, ms)."""
    import resource

    from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition

    stop = _Stop()
    consumer = Consumer(
        {
            "bootstrap.servers": args.bootstrap,
            "group.id": "segments-bench-watch",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "fetch.wait.max.ms": 10,
        }
    )
    partitions = consumer.list_topics(args.topic, timeout=10).topics[args.topic].partitions
    consumer.assign([TopicPartition(args.topic, p, OFFSET_BEGINNING) for p in sorted(partitions)])
    seen: list[tuple[int, int, float]] = []
    while not stop.requested:
        msgs = consumer.consume(1000, 0.2)
        at = time.time() * 1000
        for msg in msgs:
            if msg.error():
                raise KafkaException(msg.error())
            seen.append((msg.partition(), msg.offset(), at))
    consumer.close()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    Path(args.out).write_text(json.dumps({"seen": seen, "cpu_s": usage.ru_utime + usage.ru_stime}))
    return 0
