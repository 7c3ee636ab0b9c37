"""The markers that time a run from outside the job: a garbage record at the head of every
partition (start), events far behind the watermark every PROGRESS_EVERY events (progress) and at
the end (end). The job dead-letters each; the bench reads the dead letters read_uncommitted and
notes when each marker was first seen."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from jobs.bench.producing import flush, make_producer, produce
from udfs.profile_config import HOUR_MS

START_MARKER = b"segments-bench start marker (deliberately not Avro)"
END_MARKER_PREFIX = "bench-end-"
PROGRESS_MARKER_PREFIX = "bench-progress-"
# A late event on every partition after each this many events: progress and an ETA while a long run
# goes, and a run is given up only when no marker has come for --stall-seconds.
PROGRESS_EVERY = 5_000
# Late events per partition at the end: each lands on the keyed subtask its user id hashes to, so
# several distinct ids make sure every keyed subtask has seen one (2 ** -16 odds of missing one of
# two subtasks).
END_MARKERS_PER_PARTITION = 16
# End markers are this far behind the traffic: past any watermark by far more than the allowed
# lateness, yet a plausible timestamp (not `absurd_timestamp`).
END_MARKER_AGE_MS = 2 * HOUR_MS


def classify_dead_letter(letter: dict, decode_event) -> tuple[str, str] | None:
    """("start", partition) for a start marker, ("end" | "progress", marker id) for an end or a
    progress marker, else None."""
    if letter["payload"] == START_MARKER:
        return "start", str(letter["source_partition"])
    if letter["reason"] == "late":
        try:
            event_id = decode_event(letter["payload"])["event_id"]
        except Exception:  # any other late payload is not ours
            return None
        if event_id.startswith(END_MARKER_PREFIX):
            return "end", event_id
        if event_id.startswith(PROGRESS_MARKER_PREFIX):
            return "progress", event_id
    return None


@dataclass
class MarkerClock:
    """When each start and end marker became visible (wall clock seconds)."""

    start_markers: int
    end_markers: int
    started: dict[str, float] = field(default_factory=dict)
    ended: dict[str, float] = field(default_factory=dict)
    progressed: dict[str, float] = field(default_factory=dict)

    def see(self, kind: str, key: str, at: float) -> bool:
        """Records a sighting; True if it is the first of that marker."""
        target = {"start": self.started, "end": self.ended, "progress": self.progressed}[kind]
        if key in target:
            return False
        target[key] = at
        return True

    def events_done(self, partitions: int) -> int:
        """Events processed at least, by the progress markers seen (one per partition per step)."""
        return len(self.progressed) // max(partitions, 1) * PROGRESS_EVERY

    def steady_rate(self, events: int, partitions: int) -> float | None:
        """Events/s from the first progress step at or past half of the events (seen on every
        partition: all events before it are done) to the last end marker: the rate once the
        JVM's JIT compiler has warmed up (it takes ~12 s of CPU in the first half minute)."""
        if self.last_end is None:
            return None
        steps: dict[int, list[float]] = {}
        for key, at in self.progressed.items():
            steps.setdefault(int(key[len(PROGRESS_MARKER_PREFIX) :].split("-")[0]), []).append(at)
        for step in sorted(steps):
            done = step * PROGRESS_EVERY
            if done >= events / 2 and len(steps[step]) >= partitions and done < events:
                elapsed = self.last_end - max(steps[step])
                return (events - done) / elapsed if elapsed > 0 else None
        return None

    @property
    def first_start(self) -> float | None:
        return min(self.started.values()) if self.started else None

    @property
    def all_ended(self) -> bool:
        return len(self.ended) >= self.end_markers

    @property
    def last_end(self) -> float | None:
        return max(self.ended.values()) if self.all_ended else None


def end_marker_events(
    partitions: int, event_time_ms: int, prefix: str = END_MARKER_PREFIX, per_partition: int = END_MARKERS_PER_PARTITION
):
    """(partition, UserEvent) markers: valid events far behind the watermark, so the keyed
    operator (or the reference loop) dead-letters them as `late` after everything before them."""
    from udfs.events import UserEvent

    for p in range(partitions):
        for i in range(per_partition):
            marker = f"{prefix}{p}-{i}"
            yield p, UserEvent(marker, marker, "page_view", event_time_ms)


def send_end_markers(bootstrap: str, topic: str, partitions: int, event_time_ms: int) -> float:
    from udfs.codec import SchemaCatalog

    codec = SchemaCatalog().codec("UserEvent")
    producer = make_producer(bootstrap, **{"linger.ms": 0})
    for p, event in end_marker_events(partitions, event_time_ms):
        produce(producer, topic, codec.encode(event.to_record()), event.user_id.encode(), p)
    flush(producer, "end markers")
    return time.time()


class DeadLetterWatcher:
    """Reads the dead-letter topic with read_uncommitted (a record is visible as soon as the
    sink sends it, before its transaction commits) and timestamps the bench's markers."""

    def __init__(self, bootstrap: str, topic: str, clock: MarkerClock):
        from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

        from udfs.codec import SchemaCatalog

        catalog = SchemaCatalog()
        self.letters = catalog.codec("DeadLetter")
        self.events = catalog.codec("UserEvent")
        self.clock = clock
        self.other_dead_letters: dict[str, int] = {}
        self.consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": "segments-bench-dlq",
                "enable.auto.commit": False,
                "isolation.level": "read_uncommitted",
                "fetch.wait.max.ms": 10,
            }
        )
        partitions = self.consumer.list_topics(topic, timeout=10).topics[topic].partitions
        self.consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in sorted(partitions)])

    def poll(self, timeout_s: float) -> list[str]:
        """Reads what is there; returns the kinds of markers first seen."""
        from confluent_kafka import KafkaException

        seen = []
        for msg in self.consumer.consume(1000, timeout_s):
            at = time.time()
            if msg.error():
                raise KafkaException(msg.error())
            letter = self.letters.decode(msg.value())
            marker = classify_dead_letter(letter, self.events.decode)
            if marker is None:
                self.other_dead_letters[letter["reason"]] = self.other_dead_letters.get(letter["reason"], 0) + 1
                continue
            kind, key = marker
            if self.clock.see(kind, key, at):
                seen.append(kind)
        return seen

    def close(self) -> None:
        self.consumer.close()
