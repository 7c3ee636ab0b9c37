"""jobs/committed_log.py's parsing and read_committed bookkeeping on hand-built record batches (v2):
records and markers, a batch whose last offset lies past its last record (compaction), a batch cut
off at the end of a response, what it refuses to read, and which records a commit or an abort
releases. The reader against a real broker is tests/e2e/test_transactional_log.py."""

from __future__ import annotations

import struct

import pytest

from jobs.committed_log import (
    LogRecord,
    PartitionCursor,
    TransactionMarker,
    _parse,
    parse_batches,
    split_by_outcome,
)


def _varint(n: int) -> bytes:
    n = (n << 1) ^ (n >> 63)  # zigzag
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _bytes(b: bytes | None) -> bytes:
    return _varint(-1) if b is None else _varint(len(b)) + b


def batch(
    base_offset: int,
    records: list[tuple[int, bytes | None, bytes | None]],
    producer_id: int = 7,
    transactional: bool = False,
    control: bool = False,
    compression: int = 0,
    last_offset_delta: int | None = None,
    magic: int = 2,
) -> bytes:
    """A record batch v2: records as (offset delta, key, value); the CRC is not checked by the reader."""
    body = b""
    for delta, key, value in records:
        record = b"\x00" + _varint(0) + _varint(delta) + _bytes(key) + _bytes(value) + _varint(0)
        body += _varint(len(record)) + record
    attributes = compression | (0x10 if transactional else 0) | (0x20 if control else 0)
    last = max(d for d, _, _ in records) if last_offset_delta is None else last_offset_delta
    after_length = (
        struct.pack(">ibih", 0, magic, 0, attributes)
        + struct.pack(">iqqqhii", last, 0, 0, producer_id, 0, 0, len(records))
        + body
    )
    return struct.pack(">qi", base_offset, len(after_length)) + after_length


def marker(offset: int, producer_id: int, commit: bool) -> bytes:
    key = struct.pack(">hh", 0, 1 if commit else 0)
    return batch(offset, [(0, key, struct.pack(">hi", 0, 0))], producer_id, transactional=True, control=True)


def test_records_and_markers_come_out_with_their_offsets():
    data = (
        batch(0, [(0, b"k", b"plain")], producer_id=-1)
        + batch(1, [(0, b"u1", b"a"), (1, b"u2", b"b")], producer_id=5, transactional=True)
        + marker(3, 5, commit=True)
    )
    entries, next_offset = _parse(0, data)
    assert entries == [
        LogRecord(0, 0, -1, False, b"k", b"plain"),
        LogRecord(0, 1, 5, True, b"u1", b"a"),
        LogRecord(0, 2, 5, True, b"u2", b"b"),
        TransactionMarker(0, 3, 5, True),
    ]
    assert next_offset == 4 and parse_batches(0, data) == entries


def test_the_next_offset_is_the_batch_end_even_past_its_last_record_and_a_cut_batch_is_left_out():
    compacted = batch(10, [(0, None, b"x")], last_offset_delta=4)  # offsets 11-14 compacted away
    cut = batch(15, [(0, None, b"y")])[:-3]  # the response ended inside this batch
    entries, next_offset = _parse(0, compacted + cut)
    assert [e.offset for e in entries] == [10] and next_offset == 15
    assert _parse(0, cut) == ([], None)


@pytest.mark.parametrize("kind, match", [("compressed", "compressed record batch"), ("magic", "only v2")])
def test_what_it_cannot_read_is_an_error_not_a_skip(kind, match):
    data = batch(0, [(0, None, b"x")], compression=4) if kind == "compressed" else batch(0, [(0, None, b"x")], magic=1)
    with pytest.raises(ValueError, match=match):
        _parse(0, data)


def test_a_commit_releases_its_producers_records_an_abort_drops_them_and_open_ones_wait():
    entries, _ = _parse(
        0,
        batch(0, [(0, None, b"a1")], producer_id=1, transactional=True)
        + batch(1, [(0, None, b"b1")], producer_id=2, transactional=True)
        + batch(2, [(0, None, b"plain")], producer_id=-1)
        + marker(3, 2, commit=False)
        + batch(4, [(0, None, b"c1")], producer_id=3, transactional=True)
        + marker(5, 1, commit=True),
    )
    cursor = PartitionCursor(0)
    assert [r.value for r in cursor.take(entries)] == [b"plain", b"a1"]
    assert cursor.aborted == 1 and {pid: [r.value for r in rs] for pid, rs in cursor.pending.items()} == {3: [b"c1"]}
    committed, aborted = split_by_outcome(entries)
    assert [r.value for r in committed] == [b"a1", b"plain"] and [r.value for r in aborted] == [b"b1"]
