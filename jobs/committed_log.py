"""A read_committed reader of our own, over Kafka's wire protocol (Fetch v4, record batches v2).

Why: tansu 0.6, the only Kafka-compatible broker these machines can install, writes the commit and
abort markers of a transaction but sends no aborted-transaction list in its Fetch responses, so a
read_committed client (librdkafka, the Java client) also returns the records of ABORTED
transactions there (tests/e2e/test_transactional_log.py shows it). A real Kafka filters them. This
reader fetches read_uncommitted, sees the control batches themselves and keeps a transactional
record only when the marker that closes its producer's transaction is a commit, which is what
read_committed means; it works the same against Apache Kafka.

The project's one reader of committed records: the Redis view's follower and `segments redis
rebuild` (only committed transitions may reach the view), `segments tail` (jobs/transitions_reader),
the bench's counts and latency join, and the tests that check the committed log. Its public parts:
`committed_records` (to the end, once), `follow_committed_records` (without end), `read_topic` /
`read_partition` + `split_by_outcome` (everything, aborted records too), and for a reader that keeps
its own place (the follower) `LeaderConnections`, `BrokerConnection.fetch_entries` and
`PartitionCursor`.

Security: the settings' (jobs/kafka_security.py): TLS through the ssl module (the CA file, the
host name checked, an optional client certificate), then SASL (SaslHandshake v1, SaslAuthenticate
v1) with PLAIN or SCRAM-SHA-256/512 (RFC 5802, 7677); a refused login is a KafkaAuthenticationError.

Limits: record batches v2 (Kafka 0.11 and later) and uncompressed only (the job's Kafka sink does
not compress; a compressed batch is an error, not skipped); each partition is fetched from its
leader as the metadata names it at the start (a leader change while reading is an error: run it
again).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import socket
import ssl
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from jobs.kafka_security import PLAINTEXT, KafkaSecurity, SaslCredentials

FETCH, FETCH_VERSION = 1, 4
SASL_HANDSHAKE, SASL_AUTHENTICATE = 17, 36
CLIENT_ID = b"segments-committed-log"
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
    return buf[pos : pos + length], pos + length


def parse_batches(partition: int, data: bytes) -> list[LogRecord | TransactionMarker]:
    """Record batches (magic 2, uncompressed) into records and transaction markers. A partial
    batch at the end (a Fetch response may cut one) is left out."""
    return _parse(partition, data)[0]


def _parse(partition: int, data: bytes) -> tuple[list[LogRecord | TransactionMarker], int | None]:
    """The entries of the complete batches, and the offset after the last complete batch (None if
    there is none): a batch may end past its last record's offset (compaction)."""
    out: list[LogRecord | TransactionMarker] = []
    next_offset = None
    pos = 0
    while pos + 61 <= len(data):
        base_offset, batch_length = struct.unpack_from(">qi", data, pos)
        end = pos + 12 + batch_length
        if end > len(data):
            break  # a partial batch at the end of the response
        (last_offset_delta,) = struct.unpack_from(">i", data, pos + 23)
        next_offset = base_offset + last_offset_delta + 1
        magic = data[pos + 16]
        if magic != 2:
            raise ValueError(f"record batch magic {magic} at offset {base_offset}: only v2 is read")
        (attributes,) = struct.unpack_from(">h", data, pos + 21)
        if attributes & 0x07:
            raise ValueError(
                f"compressed record batch at offset {base_offset}: only uncompressed batches are read here"
            )
        transactional, control = bool(attributes & 0x10), bool(attributes & 0x20)
        (producer_id,) = struct.unpack_from(">q", data, pos + 43)
        (count,) = struct.unpack_from(">i", data, pos + 57)
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
                (kind,) = struct.unpack_from(">h", key, 2)  # key: version int16, type int16
                out.append(TransactionMarker(partition, offset, producer_id, kind == CONTROL_COMMIT))
            else:
                out.append(LogRecord(partition, offset, producer_id, transactional, key, value))
        pos = end
    return out, next_offset


OFFSET_OUT_OF_RANGE = 1


class FetchError(RuntimeError):
    """An error code in a Fetch reply (OFFSET_OUT_OF_RANGE: the offset is below the log start,
    deleted by the retention, or beyond its end)."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


def log_start_offset(bootstrap: str, topic: str, partition: int, security: KafkaSecurity = PLAINTEXT) -> int:
    """The partition's earliest retained offset."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "segments-log-start",
            "enable.auto.commit": False,
            **security.librdkafka_config(),
        }
    )
    try:
        low, _ = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
        return low
    finally:
        consumer.close()


class KafkaAuthenticationError(ConnectionError):
    """The broker refused the login (or the TLS handshake failed): retrying will not change it."""


def _string(text: bytes) -> bytes:
    return struct.pack(">h", len(text)) + text


def _scram_escape(name: str) -> str:
    return name.replace("=", "=3D").replace(",", "=2C")


class ScramClient:
    """The client side of SCRAM (RFC 5802; SHA-256 and SHA-512 as RFC 7677 and Kafka use them)."""

    def __init__(self, mechanism: str, username: str, password: str, nonce: str | None = None):
        self.hash = "sha256" if mechanism == "SCRAM-SHA-256" else "sha512"
        self.password = password
        self.nonce = nonce or base64.b64encode(os.urandom(24)).decode()
        self.first_bare = f"n={_scram_escape(username)},r={self.nonce}"
        self.server_signature = b""

    def first(self) -> bytes:
        return ("n,," + self.first_bare).encode()

    def final(self, server_first: bytes) -> bytes:
        text = server_first.decode()
        attrs = dict(part.split("=", 1) for part in text.split(","))
        if "e" in attrs:
            raise KafkaAuthenticationError(f"SCRAM: the broker answered {attrs['e']}")
        if not attrs.get("r", "").startswith(self.nonce) or "s" not in attrs or "i" not in attrs:
            raise KafkaAuthenticationError("SCRAM: malformed first message from the broker")
        salted = hashlib.pbkdf2_hmac(self.hash, self.password.encode(), base64.b64decode(attrs["s"]), int(attrs["i"]))
        client_key = hmac.new(salted, b"Client Key", self.hash).digest()
        stored_key = hashlib.new(self.hash, client_key).digest()
        without_proof = f"c=biws,r={attrs['r']}"
        message = f"{self.first_bare},{text},{without_proof}".encode()
        signature = hmac.new(stored_key, message, self.hash).digest()
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        server_key = hmac.new(salted, b"Server Key", self.hash).digest()
        self.server_signature = hmac.new(server_key, message, self.hash).digest()
        return f"{without_proof},p={base64.b64encode(proof).decode()}".encode()

    def check(self, server_final: bytes) -> None:
        """The broker proves it knows the password too."""
        text = server_final.decode()
        if not text.startswith("v=") or not hmac.compare_digest(base64.b64decode(text[2:]), self.server_signature):
            raise KafkaAuthenticationError(
                "SCRAM: the broker's signature does not match (not the broker the credentials are for?)"
            )


class BrokerConnection:
    """One connection to a broker (TLS and SASL as the settings say), speaking Fetch v4
    read_uncommitted."""

    def __init__(self, host: str, port: int, timeout_s: float = 30.0, security: KafkaSecurity = PLAINTEXT):
        self.sock = socket.create_connection((host, port), timeout=timeout_s)
        self.correlation = 0
        try:
            context = security.ssl_context()
            if context is not None:
                try:
                    self.sock = context.wrap_socket(self.sock, server_hostname=host)
                except ssl.SSLError as err:
                    raise KafkaAuthenticationError(f"TLS with the broker {host}:{port} failed: {err}") from None
            credentials = security.sasl_credentials()
            if credentials is not None:
                self._authenticate(credentials, f"{host}:{port}")
        except BaseException:
            self.sock.close()
            raise

    def _request(self, api_key: int, version: int, body: bytes) -> bytes:
        """One request and its reply, the reply's correlation id checked and cut off."""
        self.correlation += 1
        header = struct.pack(">hhi", api_key, version, self.correlation) + _string(CLIENT_ID)
        self.sock.sendall(struct.pack(">i", len(header) + len(body)) + header + body)
        response = self._receive()
        (correlation,) = struct.unpack_from(">i", response, 0)
        if correlation != self.correlation:
            raise ConnectionError(f"reply {correlation} does not answer request {self.correlation}")
        return response[4:]

    def _authenticate(self, credentials: SaslCredentials, broker: str) -> None:
        mechanism = credentials.mechanism
        try:
            reply = self._request(SASL_HANDSHAKE, 1, _string(mechanism.encode()))
        except (ConnectionError, ssl.SSLError) as err:  # TLS 1.3: a refused client certificate shows here
            raise KafkaAuthenticationError(
                f"the broker {broker} closed the connection at the SASL handshake "
                f"(does its listener speak SASL, and TLS as set?): {err}"
            ) from None
        (error,) = struct.unpack_from(">h", reply, 0)
        if error:
            raise KafkaAuthenticationError(f"the broker {broker} does not offer SASL {mechanism} (error {error})")
        if mechanism == "PLAIN":
            self._sasl_step(f"\0{credentials.username}\0{credentials.password}".encode(), broker)
            return
        scram = ScramClient(mechanism, credentials.username, credentials.password)
        server_first = self._sasl_step(scram.first(), broker)
        scram.check(self._sasl_step(scram.final(server_first), broker))

    def _sasl_step(self, data: bytes, broker: str) -> bytes:
        """One SaslAuthenticate v1 exchange: the broker's bytes, or the broker's refusal raised."""
        try:
            reply = self._request(SASL_AUTHENTICATE, 1, struct.pack(">i", len(data)) + data)
        except (ConnectionError, ssl.SSLError) as err:
            raise KafkaAuthenticationError(
                f"the broker {broker} closed the connection during SASL authentication: {err}"
            ) from None
        error, length = struct.unpack_from(">hh", reply, 0)
        pos = 4
        message = reply[pos : pos + length].decode(errors="replace") if length >= 0 else ""
        pos += max(length, 0)
        if error:
            raise KafkaAuthenticationError(f"the broker {broker} refused the login (error {error}): {message}")
        (size,) = struct.unpack_from(">i", reply, pos)
        return reply[pos + 4 : pos + 4 + max(size, 0)]

    def fetch(self, topic: str, partition: int, offset: int, max_wait_ms: int = 100) -> tuple[int, bytes]:
        """(high watermark, record bytes) from `offset`, read_uncommitted: every batch, markers too."""
        topic_b = topic.encode()
        body = struct.pack(">iiiib", -1, max_wait_ms, 1, MAX_BYTES, READ_UNCOMMITTED)
        body += struct.pack(">ih", 1, len(topic_b)) + topic_b
        body += struct.pack(">iiqi", 1, partition, offset, MAX_BYTES)
        response = self._request(FETCH, FETCH_VERSION, body)
        pos = 4  # throttle time
        (topics,) = struct.unpack_from(">i", response, pos)
        pos += 4
        if topics != 1:
            raise ConnectionError(f"fetch {topic}/{partition}: {topics} topics in the reply")
        (name_len,) = struct.unpack_from(">h", response, pos)
        pos += 2 + name_len
        (partitions,) = struct.unpack_from(">i", response, pos)
        pos += 4
        if partitions != 1:
            raise ConnectionError(f"fetch {topic}/{partition}: {partitions} partitions in the reply")
        _, error, high_watermark, _ = struct.unpack_from(">ihqq", response, pos)
        pos += 22
        if error:
            raise FetchError(error, f"fetch {topic}/{partition}@{offset}: Kafka error code {error}")
        (aborted,) = struct.unpack_from(">i", response, pos)
        pos += 4 + max(aborted, 0) * 16
        (size,) = struct.unpack_from(">i", response, pos)
        pos += 4
        return high_watermark, response[pos : pos + max(size, 0)]

    def fetch_entries(
        self,
        topic: str,
        partition: int,
        offset: int,
        patience_s: float = 10.0,
    ) -> tuple[int, list[LogRecord | TransactionMarker], int]:
        """(high watermark, entries from `offset` on, the offset to fetch next). The local broker may
        report a high watermark before the batch below it can be fetched (seen under load): then the
        fetch is repeated for up to `patience_s`."""
        deadline = time.monotonic() + patience_s
        while True:
            high_watermark, data = self.fetch(topic, partition, offset)
            if offset >= high_watermark:
                return high_watermark, [], offset
            entries, next_offset = _parse(partition, data)
            if next_offset is not None and next_offset > offset:
                return high_watermark, [e for e in entries if e.offset >= offset], next_offset
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{topic}/{partition}: no complete batch at {offset} below the high watermark "
                    f"{high_watermark} for {patience_s:.0f} s (a batch over {MAX_BYTES} bytes?)"
                )
            time.sleep(0.05)

    def _receive(self) -> bytes:
        (size,) = struct.unpack(">i", self._exactly(4))
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


def partition_leaders(bootstrap: str, topic: str, security: KafkaSecurity = PLAINTEXT) -> dict[int, tuple[str, int]]:
    """Each partition's leader (host, port), from the cluster's metadata."""
    from confluent_kafka.admin import AdminClient

    metadata = AdminClient({"bootstrap.servers": bootstrap, **security.librdkafka_config()}).list_topics(
        topic, timeout=10
    )
    described = metadata.topics.get(topic)
    if described is None or described.error is not None:
        raise RuntimeError(f"topic {topic}: {described.error if described else 'not found'}")
    leaders = {}
    for partition, info in described.partitions.items():
        broker = metadata.brokers.get(info.leader)
        if broker is None:
            raise RuntimeError(f"{topic}/{partition} has no leader now (leader id {info.leader})")
        leaders[partition] = (broker.host, broker.port)
    return dict(sorted(leaders.items()))


class LeaderConnections:
    """A connection to each partition's leader (one per broker), opened when first needed."""

    def __init__(self, leaders: dict[int, tuple[str, int]], security: KafkaSecurity = PLAINTEXT):
        self.leaders = leaders
        self.security = security
        self._open: dict[tuple[str, int], BrokerConnection] = {}

    def of(self, partition: int) -> BrokerConnection:
        leader = self.leaders[partition]
        conn = self._open.get(leader)
        if conn is None:
            conn = self._open[leader] = BrokerConnection(*leader, security=self.security)
        return conn

    def close(self) -> None:
        for conn in self._open.values():
            conn.close()
        self._open.clear()


@dataclass
class PartitionCursor:
    """One partition read in order: records wait per producer for the marker that closes their
    transaction; a commit releases them, an abort drops them."""

    partition: int
    offset: int = 0
    high_watermark: int = -1
    pending: dict[int, list[LogRecord]] = field(default_factory=dict)
    aborted: int = 0

    def take(
        self, entries: list[LogRecord | TransactionMarker], aborted: list[LogRecord] | None = None
    ) -> list[LogRecord]:
        """The records these entries commit, in marker order; records of aborted transactions are
        counted (and added to `aborted` when given)."""
        committed: list[LogRecord] = []
        for entry in sorted(entries, key=lambda e: e.offset):
            if isinstance(entry, TransactionMarker):
                records = self.pending.pop(entry.producer_id, [])
                if entry.commit:
                    committed += records
                else:
                    self.aborted += len(records)
                    if aborted is not None:
                        aborted += records
            elif entry.transactional:
                self.pending.setdefault(entry.producer_id, []).append(entry)
            else:
                committed.append(entry)
        return committed

    def advance(self, conn: BrokerConnection, topic: str) -> list[LogRecord]:
        """One fetch from the cursor's offset: the records it commits; the offset and the high
        watermark move on."""
        self.high_watermark, entries, next_offset = conn.fetch_entries(topic, self.partition, self.offset)
        committed = self.take(entries)
        self.offset = next_offset
        return committed

    @property
    def at_end(self) -> bool:
        return self.offset >= self.high_watermark


@dataclass
class ReadSummary:
    """What a `committed_records` read saw besides the committed records it yielded."""

    aborted: int = 0  # records of aborted transactions, dropped
    open_left: int = 0  # records of transactions still open when the read stopped, not yielded
    open_waited_s: float = 0.0


def committed_records(
    bootstrap: str,
    topic: str,
    open_wait_s: float = 0.0,
    summary: ReadSummary | None = None,
    security: KafkaSecurity = PLAINTEXT,
) -> Iterator[LogRecord]:
    """Every committed record of the topic, partition by partition, in offset order within each,
    yielded as soon as its transaction's commit marker is read (memory: the open transactions).

    Reads up to each partition's end; then, if `open_wait_s` > 0, keeps reading while any
    transaction that was open at the end is still open, for up to that long, so that a
    transaction being committed right then (its marker not yet written) is not missed. Records of
    transactions still open after that are not yielded (`summary.open_left` counts them)."""
    summary = summary if summary is not None else ReadSummary()
    connections = LeaderConnections(partition_leaders(bootstrap, topic, security), security)
    cursors = {partition: PartitionCursor(partition) for partition in connections.leaders}
    try:

        def read_to_end(cursor: PartitionCursor) -> Iterator[LogRecord]:
            while True:
                yield from cursor.advance(connections.of(cursor.partition), topic)
                if cursor.at_end:
                    return

        for cursor in cursors.values():
            yield from read_to_end(cursor)
        # Transactions open at the end: wait for their markers (commit or abort), for a while.
        waiting = {(p, pid) for p, cursor in cursors.items() for pid in cursor.pending}
        started = time.monotonic()
        while waiting and time.monotonic() - started < open_wait_s:
            time.sleep(0.2)
            for cursor in cursors.values():
                yield from read_to_end(cursor)
            waiting = {(p, pid) for p, pid in waiting if pid in cursors[p].pending}
        summary.open_waited_s = time.monotonic() - started if open_wait_s else 0.0
        summary.aborted = sum(cursor.aborted for cursor in cursors.values())
        summary.open_left = sum(len(r) for cursor in cursors.values() for r in cursor.pending.values())
    finally:
        connections.close()


def follow_committed_records(
    bootstrap: str, topic: str, from_beginning: bool = False, poll_s: float = 0.5, security: KafkaSecurity = PLAINTEXT
) -> Iterator[LogRecord]:
    """The committed records of the topic as their transactions commit, without end (`segments
    tail`): from the beginning, or from each partition's end at the start."""
    connections = LeaderConnections(partition_leaders(bootstrap, topic, security), security)
    cursors = [PartitionCursor(partition) for partition in connections.leaders]
    try:
        for cursor in cursors:
            cursor.offset = log_start_offset(bootstrap, topic, cursor.partition, security)
            if not from_beginning:  # the high watermark, from a fetch (tansu's ListOffsets(latest) says 1)
                cursor.offset, _ = connections.of(cursor.partition).fetch(topic, cursor.partition, cursor.offset)
        while True:
            progressed = False
            for cursor in cursors:
                before = cursor.offset
                yield from cursor.advance(connections.of(cursor.partition), topic)
                progressed |= cursor.offset != before
            if not progressed:
                time.sleep(poll_s)
    finally:
        connections.close()


def read_partition(
    bootstrap: str, topic: str, partition: int, security: KafkaSecurity = PLAINTEXT
) -> list[LogRecord | TransactionMarker]:
    """Every record and marker of one partition up to its end (read_uncommitted), from its leader."""
    host, port = partition_leaders(bootstrap, topic, security)[partition]
    conn = BrokerConnection(host, port, security=security)
    try:
        out: list[LogRecord | TransactionMarker] = []
        offset = 0
        while True:
            high_watermark, entries, offset = conn.fetch_entries(topic, partition, offset)
            if not entries and offset >= high_watermark:
                return out
            out.extend(entries)
    finally:
        conn.close()


def split_by_outcome(entries: list[LogRecord | TransactionMarker]) -> tuple[list[LogRecord], list[LogRecord]]:
    """read_committed over one partition: (non-transactional records and transactional records
    whose producer's next marker is a commit, records whose next marker is an abort). Records with
    no marker yet belong to open transactions and are in neither."""
    aborted: list[LogRecord] = []
    committed = PartitionCursor(partition=-1).take(entries, aborted)
    return sorted(committed, key=lambda r: r.offset), aborted


@dataclass(frozen=True)
class TopicLog:
    committed: list[LogRecord]
    aborted: list[LogRecord]


def read_topic(bootstrap: str, topic: str, security: KafkaSecurity = PLAINTEXT) -> TopicLog:
    """Every partition's committed records (by this reader's read_committed) and the records of
    aborted transactions, in (partition, offset) order."""
    committed: list[LogRecord] = []
    aborted: list[LogRecord] = []
    for partition in partition_leaders(bootstrap, topic, security):
        kept, dropped = split_by_outcome(read_partition(bootstrap, topic, partition, security))
        committed += kept
        aborted += dropped
    return TopicLog(committed, aborted)
