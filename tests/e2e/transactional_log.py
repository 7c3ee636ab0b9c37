"""A read_committed reader of our own, over Kafka's wire protocol (Fetch v4, record batches v2),
for checking the fault suite's logs.

Why: tansu 0.6, the only Kafka-compatible broker these machines can install, writes the commit and
abort markers of a transaction but sends no aborted-transaction list in its Fetch responses, so a
read_committed client (librdkafka, the Java client) also returns the records of ABORTED
transactions (tests/e2e/test_transactional_log.py shows it). A real Kafka filters them. This
reader sees the control batches themselves and keeps a transactional record only when the marker
that closes its producer's transaction is a commit, which is what read_committed means.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

from confluent_kafka.admin import AdminClient

FETCH, FETCH_VERSION = 1, 4
READ_UNCOMMITTED = 0
CONTROL_ABORT, CONTROL_COMMIT = 0, 1
MAX_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class LogRecord:
    partition: int
    offset: int
    producer_id: int
    transactional: bool
    key: bytes | None
    value: bytes | None


@dataclass(frozen=True)
class TransactionMarker:
    partition: int
    offset: int
    producer_id: int
    commit: bool


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return (result >> 1) ^ -(result & 1), pos  # zigzag
        shift += 7


def _bytes_field(buf: bytes, pos: int) -> tuple[bytes | None, int]:
    length, pos = _varint(buf, pos)
    if length < 0:
        return None, pos
    return buf[pos:pos + length], pos + length


def parse_batches(partition: int, data: bytes) -> list[LogRecord | TransactionMarker]:
    """Record batches (magic 2, uncompressed) into records and transaction markers."""
    out: list[LogRecord | TransactionMarker] = []
    pos = 0
    while pos + 61 <= len(data):
        base_offset, batch_length = struct.unpack_from(">qi", data, pos)
        end = pos + 12 + batch_length
        if end > len(data):
            break  # a partial batch at the end of the response
        magic = data[pos + 16]
        if magic != 2:
            raise ValueError(f"record batch magic {magic} at offset {base_offset}: only v2 is read")
        attributes, = struct.unpack_from(">h", data, pos + 21)
        if attributes & 0x07:
            raise ValueError("compressed record batches are not read here")
        transactional, control = bool(attributes & 0x10), bool(attributes & 0x20)
        producer_id, = struct.unpack_from(">q", data, pos + 43)
        count, = struct.unpack_from(">i", data, pos + 57)
        rpos = pos + 61
        for _ in range(count):
            _, rpos = _varint(data, rpos)  # record length
            rpos += 1  # attributes
            _, rpos = _varint(data, rpos)  # timestamp delta
            offset_delta, rpos = _varint(data, rpos)
            key, rpos = _bytes_field(data, rpos)
            value, rpos = _bytes_field(data, rpos)
            headers, rpos = _varint(data, rpos)
            for _ in range(headers):
                _, rpos = _bytes_field(data, rpos)
                _, rpos = _bytes_field(data, rpos)
            offset = base_offset + offset_delta
            if control:
                kind, = struct.unpack_from(">h", key, 2)  # key: version int16, type int16
                out.append(TransactionMarker(partition, offset, producer_id, kind == CONTROL_COMMIT))
            else:
                out.append(LogRecord(partition, offset, producer_id, transactional, key, value))
        pos = end
    return out


class _Connection:
    def __init__(self, host: str, port: int):
        self.sock = socket.create_connection((host, port), timeout=30)
        self.correlation = 0

    def fetch(self, topic: str, partition: int, offset: int) -> tuple[int, bytes]:
        """(high watermark, record bytes) from `offset`, read_uncommitted: every batch, markers too."""
        self.correlation += 1
        client = b"segments-log-check"
        topic_b = topic.encode()
        body = struct.pack(">hhih", FETCH, FETCH_VERSION, self.correlation, len(client)) + client
        body += struct.pack(">iiiib", -1, 100, 1, MAX_BYTES, READ_UNCOMMITTED)
        body += struct.pack(">ih", 1, len(topic_b)) + topic_b
        body += struct.pack(">iiqi", 1, partition, offset, MAX_BYTES)
        self.sock.sendall(struct.pack(">i", len(body)) + body)
        response = self._receive()
        pos = 8  # correlation id, throttle time
        topics, = struct.unpack_from(">i", response, pos)
        pos += 4
        assert topics == 1
        name_len, = struct.unpack_from(">h", response, pos)
        pos += 2 + name_len
        partitions, = struct.unpack_from(">i", response, pos)
        pos += 4
        assert partitions == 1
        _, error, high_watermark, _ = struct.unpack_from(">ihqq", response, pos)
        pos += 22
        if error:
            raise RuntimeError(f"fetch {topic}/{partition}@{offset}: Kafka error code {error}")
        aborted, = struct.unpack_from(">i", response, pos)
        pos += 4 + max(aborted, 0) * 16
        size, = struct.unpack_from(">i", response, pos)
        pos += 4
        return high_watermark, response[pos:pos + max(size, 0)]

    def _receive(self) -> bytes:
        size, = struct.unpack(">i", self._exactly(4))
        return self._exactly(size)

    def _exactly(self, n: int) -> bytes:
        chunks, got = [], 0
        while got < n:
            chunk = self.sock.recv(n - got)
            if not chunk:
                raise ConnectionError("the broker closed the connection")
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    def close(self) -> None:
        self.sock.close()


def read_partition(bootstrap: str, topic: str, partition: int) -> list[LogRecord | TransactionMarker]:
    host, port = bootstrap.split(",")[0].rsplit(":", 1)
    conn = _Connection(host, int(port))
    try:
        out: list[LogRecord | TransactionMarker] = []
        offset = 0
        while True:
            high_watermark, data = conn.fetch(topic, partition, offset)
            if offset >= high_watermark:
                return out
            entries = parse_batches(partition, data)
            if not entries:
                raise RuntimeError(f"{topic}/{partition}: no complete batch at {offset} below {high_watermark}")
            out.extend(e for e in entries if e.offset >= offset)
            offset = max(e.offset for e in entries) + 1
    finally:
        conn.close()


def split_by_outcome(entries: list[LogRecord | TransactionMarker]) -> tuple[list[LogRecord], list[LogRecord]]:
    """read_committed over one partition: (non-transactional records and transactional records
    whose producer's next marker is a commit, records whose next marker is an abort). Records with
    no marker yet belong to open transactions and are in neither."""
    pending: dict[int, list[LogRecord]] = {}
    committed: list[LogRecord] = []
    aborted: list[LogRecord] = []
    for entry in sorted(entries, key=lambda e: e.offset):
        if isinstance(entry, TransactionMarker):
            (committed if entry.commit else aborted).extend(pending.pop(entry.producer_id, []))
        elif entry.transactional:
            pending.setdefault(entry.producer_id, []).append(entry)
        else:
            committed.append(entry)
    return sorted(committed, key=lambda r: r.offset), aborted


@dataclass(frozen=True)
class TopicLog:
    committed: list[LogRecord]
    aborted: list[LogRecord]


def read_topic(bootstrap: str, topic: str) -> TopicLog:
    """Every partition's committed records (by this reader's read_committed) and the records of
    aborted transactions, in (partition, offset) order."""
    metadata = AdminClient({"bootstrap.servers": bootstrap}).list_topics(topic, timeout=10)
    committed: list[LogRecord] = []
    aborted: list[LogRecord] = []
    for partition in sorted(metadata.topics[topic].partitions):
        kept, dropped = split_by_outcome(read_partition(bootstrap, topic, partition))
        committed += kept
        aborted += dropped
    return TopicLog(committed, aborted)
