"""An example consumer of the segment transitions topic (docs/consumers.md explains it).

It needs only `confluent-kafka` and `fastavro` and the schemas in schemas/ (copy them next to
your consumer). It reads committed transitions (isolation.level=read_committed), decodes them,
acts on each transition id once, even when records are read twice (a restart before the offsets
were committed, a replay from the beginning, or on the local tansu broker, which also delivers
the records of aborted transactions), and commits its offsets after acting.

The action here keeps a table of current memberships (user, segment, since) in a SQLite file, as
a CRM sync would; put yours in `act`. The action and the transition id are stored in one SQLite
transaction, so an action is done once or not at all; then the Kafka offsets are committed.

    python docs/examples/transitions_consumer.py --bootstrap 127.0.0.1:9092 \
        --topic segment-transitions --group crm-sync --db crm.sqlite [--from-beginning] [--idle-exit 30]
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import fastavro
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition
from fastavro.schema import fingerprint, to_parsing_canonical_form

SCHEMAS_DIR = Path(__file__).resolve().parents[2] / "schemas"
SINGLE_OBJECT_MARKER = b"\xc3\x01"
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
log = logging.getLogger("transitions-consumer")


class TransitionDecoder:
    """Avro single-object encoding: the marker C3 01, the CRC-64-AVRO fingerprint of the writer
    schema (8 bytes, little-endian), the body. Records of older schema versions (schemas/history)
    are read into the current one."""

    def __init__(self, schemas_dir: Path = SCHEMAS_DIR):
        self.writers = {}
        for path in [schemas_dir / "segment_transition.avsc", *schemas_dir.glob("history/segment_transition.*")]:
            schema = json.loads(path.read_text(encoding="utf-8"))
            key = bytes.fromhex(fingerprint(to_parsing_canonical_form(schema), "CRC-64-AVRO"))
            self.writers[key] = fastavro.parse_schema(schema)
        self.reader = fastavro.parse_schema(json.loads((schemas_dir / "segment_transition.avsc").read_text("utf-8")))

    def decode(self, payload: bytes) -> dict:
        """The transition record; a ValueError for a payload that is not one of ours."""
        if payload[:2] != SINGLE_OBJECT_MARKER:
            raise ValueError("not Avro single-object encoding")
        writer = self.writers.get(payload[2:10])
        if writer is None:
            raise ValueError(f"unknown writer schema (fingerprint {payload[2:10].hex()})")
        record = fastavro.schemaless_reader(io.BytesIO(payload[10:]), writer, self.reader)
        for name in ("event_time", "emitted_at"):  # fastavro reads timestamp-millis as datetimes
            record[name] = (record[name] - EPOCH) // timedelta(milliseconds=1)
        return record


class UndecodableRecord(RuntimeError):
    """A record that is not a transition this consumer can read; where it is and why."""


class MembershipStore:
    """The consumer's state in SQLite: the transition ids already acted on, and its action's
    result (the current memberships)."""

    def __init__(self, path: str):
        self.db = sqlite3.connect(path)
        with self.db:
            self.db.execute("CREATE TABLE IF NOT EXISTS processed (transition_id TEXT PRIMARY KEY)")
            self.db.execute(
                "CREATE TABLE IF NOT EXISTS memberships "
                "(user_id TEXT, segment TEXT, since_ms INTEGER, PRIMARY KEY (user_id, segment))"
            )

    def process_once(self, transition: dict) -> bool:
        """Acts on the transition unless its id was acted on before; True if it acted."""
        with self.db:  # one transaction: the id and the action's writes, or neither
            inserted = self.db.execute(
                "INSERT OR IGNORE INTO processed (transition_id) VALUES (?)", (transition["transition_id"],)
            ).rowcount
            if inserted:
                self.act(transition)
        return bool(inserted)

    def act(self, t: dict) -> None:
        """The action: keep the current memberships. Per user and segment, transitions come in
        order (one partition per user) and alternate ENTER, EXIT."""
        if t["kind"] == "ENTER":
            self.db.execute(
                "INSERT OR REPLACE INTO memberships VALUES (?, ?, ?)", (t["user_id"], t["segment"], t["event_time"])
            )
        else:
            self.db.execute("DELETE FROM memberships WHERE user_id = ? AND segment = ?", (t["user_id"], t["segment"]))


def consume(args: argparse.Namespace) -> dict[str, int]:
    """Reads, acts once per transition id, commits; returns what it counted."""
    consumer = Consumer(
        {
            "bootstrap.servers": args.bootstrap,
            "group.id": args.group,  # where the offsets are committed
            "isolation.level": "read_committed",  # only committed transactions' records
            "enable.auto.commit": False,  # committed below, after acting
            "enable.partition.eof": True,
        }
    )
    decoder, store = TransitionDecoder(), MembershipStore(args.db)
    counts = {"acted": 0, "repeated": 0}
    try:
        partitions = sorted(consumer.list_topics(args.topic, timeout=10).topics[args.topic].partitions)
        # assign(), not subscribe(): on tansu 0.6 a subscribed consumer gets no partitions (the
        # group's offsets work); with Apache Kafka, subscribe() also spreads the partitions.
        committed = consumer.committed([TopicPartition(args.topic, p) for p in partitions], timeout=10)
        consumer.assign(
            [
                TopicPartition(
                    args.topic, tp.partition, OFFSET_BEGINNING if args.from_beginning or tp.offset < 0 else tp.offset
                )
                for tp in committed
            ]
        )
        at_end: set[int] = set()
        idle_s = 0.0
        while args.idle_exit is None or idle_s < args.idle_exit or len(at_end) < len(partitions):
            messages = consumer.consume(500, timeout=1.0)
            idle_s = idle_s + 1.0 if not messages else 0.0
            next_offsets = {}
            try:
                for msg in messages:
                    if msg.error():
                        if msg.error().code() == KafkaError._PARTITION_EOF:
                            at_end.add(msg.partition())
                            continue
                        raise KafkaException(msg.error())
                    at_end.discard(msg.partition())
                    try:
                        transition = decoder.decode(msg.value())
                    except (ValueError, EOFError, StopIteration) as err:
                        # Stop rather than skip a transition (most often a newer schema version:
                        # copy the new schemas/); never the payload in the message.
                        raise UndecodableRecord(f"partition {msg.partition()} offset {msg.offset()}: {err}") from None
                    counts["acted" if store.process_once(transition) else "repeated"] += 1
                    next_offsets[msg.partition()] = msg.offset() + 1
            finally:  # after acting: a crash before this repeats records, never skips one
                if next_offsets:
                    consumer.commit(
                        offsets=[TopicPartition(args.topic, p, o) for p, o in next_offsets.items()], asynchronous=False
                    )
    finally:
        consumer.close()
    return counts


def main(argv: list[str] | None = None) -> None:
    """The command line (see the module's docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topic", default="segment-transitions")
    parser.add_argument("--group", required=True, help="consumer group: where the offsets are kept")
    parser.add_argument("--db", required=True, help="SQLite file of the processed ids and the memberships")
    parser.add_argument("--from-beginning", action="store_true", help="read again from the start")
    parser.add_argument("--idle-exit", type=float, help="stop at the end of every partition after this many idle s")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        counts = consume(args)
    except UndecodableRecord as err:
        log.error("stopped at a record it cannot decode, %s", err)
        raise SystemExit(2) from None
    log.info("acted on %(acted)d transitions, %(repeated)d read again", counts)
    print(json.dumps(counts))


if __name__ == "__main__":
    main()
