"""`segments bench`: the performance figures of the whole pipeline, measured in one invocation on
one machine, each printed against its target and written as JSON so runs can be compared.

What runs, each as its own process (so CPU seconds are read per process tree), on a tansu broker
and a redis-server the bench starts for itself on free ports:

* the full job (`segments run` on the embedded MiniCluster: Avro decode, the whole profile, every
  model, the shipped definitions, transitions exactly-once to Kafka and to Redis) at parallelism 1
  and 2, over the same preloaded generated events;
* the reference loop (`python -m jobs.bench reference`): one plain Python process doing the same
  work with the same engine-free core (confluent-kafka consumer -> core -> transactional producer
  + Redis), no Flink;
* a latency run: a paced producer at a fixed offered rate, event timestamps = wall clock, and two
  watchers: Redis keyspace notifications (transition visible in the view) and a read_committed
  consumer (transition committed in Kafka);
* a checkpoint run: the job with RocksDB (incremental) over one event for each of N users, the
  checkpoint statistics read from the MiniCluster's REST API;
* state bytes per user from `jobs.profile_stats` (the core alone).

Throughput excludes start-up: every events partition begins with a garbage record and ends with
events far behind the watermark. Both become dead letters in the keyed operator (the garbage keyed by
"", the late events after every event of their partition before them) and are visible with
read_uncommitted as soon as the sink sends them. Throughput is the events between the first start
marker and the last end marker, over that time; start-up is process launch -> first start marker.
More late events every PROGRESS_EVERY events report progress on the way.

The internal subcommands (`python -m jobs.bench reference|produce|watch-redis|watch-kafka`) are the
processes the bench starts. Module import is stdlib-only so `segments --help` stays fast.
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path

from infra.stack import ManagedProcess
from udfs.profile_config import DAY_MS, HOUR_MS

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# Generated shoppers produce about 19 events per user and day (profile-stats: 38,786 events for
# 2,000 users in a day); used only to pick how many days of traffic hold the requested events.
EVENTS_PER_USER_DAY = 19.0
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
STATE_TARGET_BYTES = 2048
JOB_TARGET_PER_SLOT = 1_500
FLOOR_STATE_BYTES = 1_800  # the floor job's state value when the state replay was skipped


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


# --- pure helpers (tests/unit/test_bench.py) -----------------------------------------------------


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of an ascending list (q in [0, 1]); None when empty."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def latency_summary(values_ms: list[float]) -> dict:
    ordered = sorted(values_ms)
    return {
        "count": len(ordered),
        "p50_ms": percentile(ordered, 0.50),
        "p99_ms": percentile(ordered, 0.99),
        "max_ms": ordered[-1] if ordered else None,
    }


def parse_proc_stat(text: str) -> tuple[int, int]:
    """(parent pid, CPU ticks) from /proc/<pid>/stat: utime + stime of the process and cutime +
    cstime of its children that have exited and been waited for. The command name (field 2) may
    hold spaces and parentheses, so fields are counted after its last ')'."""
    rest = text[text.rindex(")") + 2:].split()
    # rest[0] is field 3 (state): field k is rest[k - 3]; ppid 4, utime 14, stime 15, cutime 16, cstime 17
    return int(rest[1]), int(rest[11]) + int(rest[12]) + int(rest[13]) + int(rest[14])


def process_tree_ticks(root_pid: int, stats: dict[int, str]) -> int:
    """CPU ticks of root_pid and all its descendants, from {pid: stat text}."""
    parsed = {}
    for pid, text in stats.items():
        try:
            parsed[pid] = parse_proc_stat(text)
        except (ValueError, IndexError):
            continue
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in parsed.items():
        children.setdefault(ppid, []).append(pid)
    total, stack = 0, [root_pid]
    while stack:
        pid = stack.pop()
        if pid in parsed:
            total += parsed[pid][1]
        stack.extend(children.get(pid, ()))
    return total


def read_proc_stats(proc: Path = Path("/proc")) -> dict[int, str]:
    stats = {}
    for entry in proc.iterdir():
        if entry.name.isdigit():
            try:
                stats[int(entry.name)] = (entry / "stat").read_text()
            except OSError:  # exited while we looked
                continue
    return stats


def tree_cpu_seconds(pid: int) -> float:
    return process_tree_ticks(pid, read_proc_stats()) / os.sysconf("SC_CLK_TCK")


def tree_pids(root_pid: int) -> list[int]:
    stats = read_proc_stats()
    children: dict[int, list[int]] = {}
    for pid, text in stats.items():
        try:
            children.setdefault(parse_proc_stat(text)[0], []).append(pid)
        except (ValueError, IndexError):
            continue
    out, stack = [], [root_pid]
    while stack:
        pid = stack.pop()
        out.append(pid)
        stack.extend(children.get(pid, ()))
    return out


def parse_thread_stat(text: str) -> tuple[str, int]:
    """(thread name, utime + stime ticks) from /proc/<pid>/task/<tid>/stat."""
    name = text[text.index("(") + 1:text.rindex(")")]
    rest = text[text.rindex(")") + 2:].split()
    return name, int(rest[11]) + int(rest[12])


def thread_ticks(root_pid: int) -> dict[int, tuple[str, int]]:
    """{tid: (name, ticks)} of every thread of the process tree (Flink names its task threads after
    their operators, truncated by the kernel to 15 characters)."""
    out = {}
    for pid in tree_pids(root_pid):
        try:
            tasks = list(Path(f"/proc/{pid}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                out[int(task.name)] = parse_thread_stat((task / "stat").read_text())
            except (OSError, ValueError, IndexError):
                continue
    return out


def busiest_threads(before: dict[int, tuple[str, int]], after: dict[int, tuple[str, int]],
                    top: int = 5) -> list[tuple[str, float]]:
    """The threads that used the most CPU between two samples, by name (threads of one name summed)."""
    by_name: dict[str, int] = {}
    for tid, (name, ticks) in after.items():
        by_name[name] = by_name.get(name, 0) + ticks - before.get(tid, (name, 0))[1]
    ranked = sorted(by_name.items(), key=lambda item: -item[1])[:top]
    return [(name, round(ticks / os.sysconf("SC_CLK_TCK"), 1)) for name, ticks in ranked if ticks > 0]


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
            steps.setdefault(int(key[len(PROGRESS_MARKER_PREFIX):].split("-")[0]), []).append(at)
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


def visible_at(seen: dict[tuple[str, str], list[tuple[int, float]]], user: str, segment: str,
               sequence: int) -> float | None:
    """When the Redis view first held `sequence` (or a later one) for (user, segment). The view
    applies a user's transitions in sequence order, so seeing a later sequence proves the earlier
    one had been applied; the watcher records sequences as it finds them, in increasing order."""
    entries = seen.get((user, segment))
    if not entries:
        return None
    i = bisect.bisect_left(entries, (sequence, -math.inf))
    return entries[i][1] if i < len(entries) else None


def verdict(value: float | None, op: str, target: float) -> str:
    if value is None:
        return "n/a"
    ok = value >= target if op == ">=" else value <= target
    return "pass" if ok else "MISS"


def fmt(value, unit: str = "", digits: int = 0) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and digits:
        return f"{value:,.{digits}f}{unit}"
    return f"{round(value):,}{unit}"


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
    return payload[:offset] + encoded + payload[offset + length:]


# --- machine ---------------------------------------------------------------------------------------


def machine_info() -> dict:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kb = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    except OSError:
        pass
    try:
        java = subprocess.run(["java", "-version"], capture_output=True, text=True, timeout=30).stderr
        java_version = java.splitlines()[0].strip() if java else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        java_version = "not found"
    return {
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "ram_gb": round(mem_kb / 1024 / 1024, 1),
        "python": platform.python_version(),
        "java": java_version,
        "kernel": platform.release(),
        "load_average_at_start": os.getloadavg()[0],
    }


# --- processes ----------------------------------------------------------------------------------------


class MeasuredProcess(ManagedProcess):
    """A process the bench starts (from the project's root) and measures: CPU seconds and threads of
    its tree. Its stop also kills the descendants that left its process group (the JVM a job
    starts is in its tree)."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], work: Path):
        super().__init__(name, work)
        self.cpu_last = 0.0
        self.start(argv, env=env, cwd=PROJECT_ROOT)

    def cpu_seconds(self) -> float:
        if self.running():
            self.cpu_last = tree_cpu_seconds(self.pid())
        return self.cpu_last

    def threads(self) -> dict[int, tuple[str, int]]:
        return thread_ticks(self.pid())

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 20.0) -> None:
        if not self.running():
            return
        self.cpu_seconds()
        members = tree_pids(self.pid())
        super().stop(sig, timeout_s)
        for pid in members[1:]:  # a descendant that left the group or ignored the signal
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


class ClusterJob(MeasuredProcess):
    """`segments submit` to a standalone cluster started for the run: the job's CPU and threads are
    the cluster's processes (JobManager and TaskManagers, from Flink's pid files), not the
    client's, which only submits and waits."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], work: Path, cluster_root: Path):
        super().__init__(name, argv, env, work)
        self.cluster_root = cluster_root

    def cluster_pids(self) -> list[int]:
        pids = []
        for pid_file in (self.cluster_root / "pids").glob("flink-*.pid"):
            pids += [int(word) for word in pid_file.read_text().split() if word.isdigit()
                     and Path(f"/proc/{word}").exists()]
        return pids

    def cpu_seconds(self) -> float:
        pids = self.cluster_pids()
        if pids:
            self.cpu_last = sum(tree_cpu_seconds(pid) for pid in pids)
        return self.cpu_last

    def threads(self) -> dict[int, tuple[str, int]]:
        merged: dict[int, tuple[str, int]] = {}
        for pid in self.cluster_pids():
            merged.update(thread_ticks(pid))
        return merged


class BenchStack:
    """A private tansu broker and redis-server on free ports, under a temporary directory."""

    def __init__(self, root: Path):
        from infra.stack import free_port, start_broker, start_redis

        self.root = root
        self.broker_port, self.redis_port = free_port(), free_port()
        self.redis = None
        self.broker = start_broker(root, self.broker_port)
        try:
            self.redis = start_redis(root, self.redis_port)
        except BaseException:
            self.stop()
            raise
        self.bootstrap = f"127.0.0.1:{self.broker_port}"
        self.redis_url = f"redis://127.0.0.1:{self.redis_port}/0"

    def create_topics(self, partitions: dict[str, int]) -> None:
        from infra.stack import create_topics

        create_topics(self.bootstrap, partitions)

    def cpu_seconds(self) -> float:
        stats = read_proc_stats()
        ticks = sum(process_tree_ticks(p.pid(), stats) for p in (self.broker, self.redis) if p and p.pid())
        return ticks / os.sysconf("SC_CLK_TCK")

    def redis_client(self):
        import redis

        return redis.Redis.from_url(self.redis_url)

    def stop(self) -> None:
        for proc in (self.redis, self.broker):
            if proc is not None:
                proc.stop()


# --- Kafka helpers ------------------------------------------------------------------------------------


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


def end_marker_events(partitions: int, event_time_ms: int, prefix: str = END_MARKER_PREFIX,
                      per_partition: int = END_MARKERS_PER_PARTITION):
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
        self.consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "segments-bench-dlq",
                                  "enable.auto.commit": False, "isolation.level": "read_uncommitted",
                                  "fetch.wait.max.ms": 10})
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


def count_committed(bootstrap: str, topic: str) -> int:
    from jobs.committed_log import committed_records

    return sum(1 for _ in committed_records(bootstrap, topic))


def read_committed_transitions(bootstrap: str, topic: str) -> dict[tuple[int, int], dict]:
    """Every committed transition by (partition, offset), with the fields the latency join reads."""
    from jobs.committed_log import committed_records
    from udfs.codec import SchemaCatalog

    codec = SchemaCatalog().codec("SegmentTransition")
    out = {}
    for record in committed_records(bootstrap, topic):
        t = codec.decode(record.value)
        out[(record.partition, record.offset)] = {
            "user_id": t["user_id"], "segment": t["segment"], "sequence": t["sequence"],
            "event_time": t["event_time"], "cause": t["cause"],
        }
    return out


# --- preloading events -----------------------------------------------------------------------------


def generated_events(count: int, users: int, seed: int, end_ms: int):
    """The first `count` events of generated shopper traffic for `users` users, ending by end_ms."""
    from udfs.shoppers import generate_events

    days = max(count / (users * EVENTS_PER_USER_DAY), 1 / 24) * 1.3
    while True:
        duration = int(days * DAY_MS)
        start = end_ms - duration
        taken = 0
        for event in generate_events(users, seed, start, duration):
            yield event
            taken += 1
            if taken == count:
                return
        if taken:  # not enough traffic in the span: the caller got fewer events; say so
            log(f"generated only {taken} of {count} events for {users} users over {days:.2f} days")
            return
        days *= 2


def checkpoint_events(users: int, end_ms: int):
    """One event for each of `users` users (a product view), in time order over the last hour:
    what a checkpoint of many users' state needs, without generating their histories."""
    from udfs.events import UserEvent
    from udfs.shoppers import CATEGORIES, user_id_of

    span = HOUR_MS
    start = end_ms - span
    for i in range(users):
        user = user_id_of(i)
        category = CATEGORIES[i % len(CATEGORIES)]
        yield UserEvent(f"{user}-0000001", user, "product_view", start + i * span // max(users, 1),
                        session_id=f"{user}-s1", product_id=f"p-{category}-{i % 40 + 1:03d}", category=category,
                        price=float(5 + i % 200), device="mobile")


def preload(bootstrap: str, topics: dict[str, int], events) -> tuple[int, int, int]:
    """Writes to each topic (name: partitions): a start marker at the head of every partition,
    the events keyed by user, then the end markers. Returns (events, first time, last time)."""
    from udfs.codec import SchemaCatalog

    codec = SchemaCatalog().codec("UserEvent")
    producer = make_producer(bootstrap, **{"linger.ms": 20, "batch.size": 1_000_000})
    for topic, partitions in topics.items():
        for p in range(partitions):
            produce(producer, topic, START_MARKER, None, p)
    flush(producer, "start markers")
    count, first, last = 0, None, None
    for event in events:
        value, key = codec.encode(event.to_record()), event.user_id.encode()
        for topic in topics:
            produce(producer, topic, value, key)
        producer.poll(0)
        count += 1
        first = event.timestamp if first is None else first
        last = event.timestamp
        if count % PROGRESS_EVERY == 0:
            step = f"{PROGRESS_MARKER_PREFIX}{count // PROGRESS_EVERY}-"
            for topic, partitions in topics.items():
                for p, marker in end_marker_events(partitions, first - END_MARKER_AGE_MS, step, 1):
                    produce(producer, topic, codec.encode(marker.to_record()), marker.user_id.encode(), p)
    flush(producer, "events")
    for topic, partitions in topics.items():
        for p, marker in end_marker_events(partitions, (first or now_ms()) - END_MARKER_AGE_MS):
            produce(producer, topic, codec.encode(marker.to_record()), marker.user_id.encode(), p)
    flush(producer, "end markers")
    return count, first or 0, last or 0


# --- one measured run ---------------------------------------------------------------------------------


@dataclass
class RunTopics:
    events: str
    transitions: str
    dead_letters: str


def run_environment(stack: BenchStack, work: Path, name: str, topics: RunTopics, settings: dict) -> dict[str, str]:
    """SEGMENTS_* for one run (as tests/e2e job_environment does), over the caller's environment
    (so its own SEGMENTS_* settings apply to the job and the reference alike), with everything
    that must be private to the run: topics, Redis keys, transactional ids, checkpoints, logs."""
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    run_settings = {
        "bootstrap_servers": stack.bootstrap,
        "events_topic": topics.events,
        "transitions_topic": topics.transitions,
        "dead_letter_topic": topics.dead_letters,
        "consumer_group": f"bench-{name}",
        "startup_mode": "earliest-offset",
        "redis_key_prefix": f"bench-{name}",
        "transactional_id_prefix": f"bench-{name}",
        "checkpoint_dir": (work / "checkpoints" / name).as_uri(),
        **settings,
    }
    env.update({f"SEGMENTS_{k.upper()}": str(v) for k, v in run_settings.items()})
    env["REDIS_URL"] = stack.redis_url
    env["SEGMENTS_STACK_DIR"] = str(work)
    # The MiniCluster's own log (where its REST port is announced) in a directory of this run, not
    # PyFlink's shared log/ folder that other jobs on the machine overwrite.
    env["FLINK_LOG_DIR"] = str(work / "flink-logs" / name)
    return env


def rest_port_of(flink_log_dir: Path) -> int | None:
    """The MiniCluster picks a free REST port and logs it; `segments run` has no setting for it."""
    pattern = re.compile(r"Rest endpoint listening at [^:\s]+:(\d+)")
    for path in sorted(flink_log_dir.glob("flink-*.log")):
        match = pattern.search(path.read_text(errors="replace"))
        if match:
            return int(match.group(1))
    return None


def checkpoint_failures_in_log(flink_log_dir: Path, limit: int = 3) -> list[str]:
    """Why checkpoints failed, from the MiniCluster's log (REST keeps no details of a checkpoint
    that failed to trigger): the reason part of each distinct message."""
    reasons: list[str] = []
    for path in sorted(flink_log_dir.glob("flink-*.log")):
        for line in path.read_text(errors="replace").splitlines():
            if "CheckpointFailureManager" not in line and "declined" not in line and "expired before" not in line:
                continue
            message = line.split(" - ", 1)[-1]
            reason = message.split("Failure reason: ", 1)[-1] if "Failure reason: " in message else message
            reason = re.sub(r"\b[0-9a-f]{32}\b", "<id>", reason)[:200]
            if reason not in reasons:
                reasons.append(reason)
    return reasons[:limit]


def rest_get(port: int, path: str) -> dict:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
        return json.load(response)


@dataclass
class ThroughputResult:
    name: str
    slots: int
    events: int
    finished: bool = False
    error: str | None = None
    startup_s: float | None = None
    window_s: float | None = None
    events_per_s: float | None = None
    events_per_s_per_slot: float | None = None
    steady_events_per_s: float | None = None  # second half of the run (see MarkerClock.steady_rate)
    steady_events_per_s_per_slot: float | None = None
    cpu_window_s: float | None = None
    cpu_total_s: float | None = None
    cpu_s_per_million_events: float | None = None
    cores_busy: float | None = None
    broker_redis_cpu_window_s: float | None = None
    transitions_committed: int | None = None
    other_dead_letters: dict = field(default_factory=dict)
    load_average_before: float | None = None
    busiest_threads: list = field(default_factory=list)  # [thread name, CPU seconds in the window]


def watch_markers(proc: MeasuredProcess, watcher: DeadLetterWatcher, clock: MarkerClock, events: int, partitions: int,
                  stall_s: float, stack: BenchStack | None = None, on_tick=None) -> dict:
    """Waits until every end marker is visible, logging progress; gives up when no marker has
    come for stall_s. Samples CPU (and the busiest threads) at the first start marker and at the
    last end marker, and calls on_tick between polls. Returns the samples."""
    samples: dict = {}
    last_marker = time.monotonic()
    last_log = 0.0
    while not clock.all_ended:
        if not proc.running():
            raise RuntimeError(f"{proc.name} exited early (code {proc.popen.returncode}); log {proc.log_file}:\n"
                               f"{proc.log_tail()}")
        if time.monotonic() - last_marker > stall_s:
            raise TimeoutError(f"{proc.name}: no progress for {stall_s:.0f} s (~{clock.events_done(partitions):,} "
                               f"of {events:,} events done, {len(clock.ended)} of {clock.end_markers} end markers)")
        kinds = watcher.poll(0.2)
        if kinds:
            last_marker = time.monotonic()
        if on_tick is not None:
            on_tick()
        if "start" in kinds and "cpu_start" not in samples:
            samples["cpu_start"] = proc.cpu_seconds()
            samples["threads_start"] = proc.threads()
            if stack is not None:
                samples["stack_cpu_start"] = stack.cpu_seconds()
            log(f"{proc.name}: first start marker after {clock.first_start - proc.launched_at:.1f} s")
        if "progress" in kinds and time.monotonic() - last_log > 30 and clock.first_start:
            last_log = time.monotonic()
            done, elapsed = clock.events_done(partitions), time.time() - clock.first_start
            rate = done / elapsed if elapsed > 0 else 0
            log(f"{proc.name}: ~{done:,} of {events:,} events after {elapsed:.0f} s (~{rate:,.0f} events/s)"
                + (f", ~{(events - done) / rate:.0f} s to go" if rate else ""))
    samples["cpu_end"] = proc.cpu_seconds()
    samples["threads_end"] = proc.threads()
    if stack is not None:
        samples["stack_cpu_end"] = stack.cpu_seconds()
    return samples


def measure_throughput(stack: BenchStack, work: Path, name: str, argv: list[str], slots: int, events_topic: str,
                       partitions: int, events: int, settings: dict, stall_s: float,
                       count_transitions: bool, checkpoint_interval_ms: int,
                       cluster: tuple[Path, int] | None = None) -> ThroughputResult:
    """`cluster`: (stack root, REST port) of a standalone cluster to submit `argv` to (ClusterJob)."""
    topics = RunTopics(events_topic, f"{name}-transitions", f"{name}-dead-letters")
    stack.create_topics({topics.transitions: 2, topics.dead_letters: 1})
    result = ThroughputResult(name, slots, events, load_average_before=os.getloadavg()[0])
    clock = MarkerClock(partitions, partitions * END_MARKERS_PER_PARTITION)
    watcher = DeadLetterWatcher(stack.bootstrap, topics.dead_letters, clock)
    env = run_environment(stack, work, name, topics, settings)
    if cluster is None:
        proc = MeasuredProcess(name, argv, env, work)
    else:
        env.update(SEGMENTS_STACK_DIR=str(cluster[0]), SEGMENTS_STACK_FLINK_REST_PORT=str(cluster[1]))
        proc = ClusterJob(name, argv, env, work, cluster[0])
    log(f"{name}: started (pid {proc.pid()}), {events} events")
    try:
        samples = watch_markers(proc, watcher, clock, events, partitions, stall_s, stack)
        result.finished = True
        result.startup_s = clock.first_start - proc.launched_at
        result.window_s = clock.last_end - clock.first_start
        result.events_per_s = events / result.window_s
        result.events_per_s_per_slot = result.events_per_s / slots
        result.steady_events_per_s = clock.steady_rate(events, partitions)
        if result.steady_events_per_s is not None:
            result.steady_events_per_s_per_slot = result.steady_events_per_s / slots
        result.cpu_window_s = samples["cpu_end"] - samples.get("cpu_start", 0.0)
        result.cpu_s_per_million_events = result.cpu_window_s / events * 1e6
        result.cores_busy = result.cpu_window_s / result.window_s
        result.broker_redis_cpu_window_s = samples["stack_cpu_end"] - samples.get("stack_cpu_start", 0.0)
        result.busiest_threads = busiest_threads(samples.get("threads_start", {}), samples["threads_end"])
        log(f"{name}: {result.events_per_s:,.0f} events/s ({result.window_s:.1f} s, "
            f"{result.cores_busy:.2f} cores busy)"
            + (f"; second half {result.steady_events_per_s:,.0f} events/s" if result.steady_events_per_s else ""))
        if count_transitions:
            # Let the next checkpoint commit the tail (its transaction), then count what committed.
            time.sleep(checkpoint_interval_ms / 1000 + 2)
            result.cpu_total_s = proc.cpu_seconds()
            result.transitions_committed = count_committed(stack.bootstrap, topics.transitions)
    except (RuntimeError, TimeoutError) as err:
        result.error = str(err).splitlines()[0]
        log(f"{name}: {err}")
    finally:
        result.cpu_total_s = proc.cpu_seconds() if result.cpu_total_s is None else result.cpu_total_s
        result.other_dead_letters = dict(watcher.other_dead_letters)
        watcher.close()
        proc.stop()
        stack.redis_client().flushdb()  # this run's view: not needed any more, keep Redis small
    return result


def measure_on_cluster(stack: BenchStack, work: Path, config: str | None, taskmanagers: int, events: int,
                       stall_s: float, checkpoint_interval_ms: int) -> ThroughputResult:
    """The job at parallelism N on a standalone cluster of N single-slot TaskManagers (what
    `segments stack up --flink --taskmanagers N` starts): one interpreter per keyed subtask."""
    from infra.stack import StackPorts, free_port, start_flink_cluster, stop_flink_cluster

    root = work / f"cluster-{taskmanagers}"
    ports = StackPorts(broker=0, redis=0, flink_rest=free_port(), flink_rpc=free_port(), prometheus=free_port())
    log(f"job-cluster-p{taskmanagers}: starting a JobManager and {taskmanagers} single-slot TaskManagers")
    start_flink_cluster(root, ports, taskmanagers)
    try:
        return measure_throughput(
            stack, work, f"job-cluster-p{taskmanagers}", submit_argv(config), taskmanagers,
            f"events-{taskmanagers}", taskmanagers, events, {"parallelism": taskmanagers}, stall_s, True,
            checkpoint_interval_ms, cluster=(root, ports.flink_rest))
    finally:
        stop_flink_cluster(root)


def job_argv(config: str | None) -> list[str]:
    return [sys.executable, "-m", "jobs.cli", "run", *(["--config", config] if config else [])]


def submit_argv(config: str | None) -> list[str]:
    return [sys.executable, "-m", "jobs.cli", "submit", *(["--config", config] if config else [])]


def floor_argv(config: str | None, state_bytes: int) -> list[str]:
    return [sys.executable, "-m", "jobs.floor_job", *(["--config", config] if config else []),
            "--state-bytes", str(state_bytes)]


def reference_argv(config: str | None) -> list[str]:
    return [sys.executable, "-m", "jobs.bench", "reference", *(["--config", config] if config else [])]


# --- latency at a fixed offered load ------------------------------------------------------------------


@dataclass
class LatencyResult:
    name: str
    offered_rate: float
    seconds: float
    warmup_s: float
    finished: bool = False
    error: str | None = None
    achieved_send_rate: float | None = None
    events_sent: int | None = None
    drain_lag_s: float | None = None  # last events sent -> end markers visible (None: not within the cap)
    # Events processed per second: events sent / (first send -> end markers visible); when the backlog
    # did not drain, estimated from the newest event whose transition reached Redis by the end of sending.
    processing_rate: float | None = None
    processing_rate_estimated: bool = False
    lag_at_end_of_load_s: float | None = None  # end of sending - newest event time visible in Redis by then
    kept_up: bool | None = None
    event_caused_transitions: int | None = None
    redis: dict = field(default_factory=dict)
    kafka: dict = field(default_factory=dict)
    redis_unmatched: int | None = None
    kafka_unmatched: int | None = None
    job_cores_busy: float | None = None
    producer_cpu_s: float | None = None
    redis_watcher_cpu_s: float | None = None
    kafka_watcher_cpu_s: float | None = None
    load_average_before: float | None = None


def measure_latency(stack: BenchStack, work: Path, name: str, argv: list[str], settings: dict, rate: float,
                    seconds: float, warmup_s: float, users: int, seed: int, checkpoint_interval_ms: int,
                    drain_s: float) -> LatencyResult:
    topics = RunTopics(f"{name}-events", f"{name}-transitions", f"{name}-dead-letters")
    partitions = int(settings.get("parallelism", 1))
    stack.create_topics({topics.events: partitions, topics.transitions: 2, topics.dead_letters: 1})
    result = LatencyResult(name, rate, seconds, warmup_s, load_average_before=os.getloadavg()[0])
    prefix = f"bench-{name}"
    client = stack.redis_client()
    client.config_set("notify-keyspace-events", "Kh")  # hash commands on keys: the view's HSETs
    files = work / "latency" / name
    files.mkdir(parents=True, exist_ok=True)
    me = [sys.executable, "-m", "jobs.bench"]
    plain_env = {k: v for k, v in os.environ.items() if not k.startswith("SEGMENTS_") or k == "SEGMENTS_CACHE"}
    helpers: list[MeasuredProcess] = []
    proc = None
    watcher = None
    try:
        redis_watch = MeasuredProcess(f"{name}-watch-redis", [*me, "watch-redis", "--url", stack.redis_url, "--prefix",
                                                           prefix, "--out", str(files / "redis.json")],
                                   plain_env, work)
        kafka_watch = MeasuredProcess(f"{name}-watch-kafka", [*me, "watch-kafka", "--bootstrap", stack.bootstrap,
                                                           "--topic", topics.transitions, "--out",
                                                           str(files / "kafka.json")],
                                   plain_env, work)
        helpers += [redis_watch, kafka_watch]
        # The start markers tell when the job is reading: the paced load starts only then.
        producer = make_producer(stack.bootstrap)
        for p in range(partitions):
            produce(producer, topics.events, START_MARKER, None, p)
        flush(producer, "start markers")
        del producer
        clock = MarkerClock(partitions, partitions * END_MARKERS_PER_PARTITION)
        watcher = DeadLetterWatcher(stack.bootstrap, topics.dead_letters, clock)
        proc = MeasuredProcess(name, argv, run_environment(stack, work, name, topics, settings), work)
        log(f"{name}: started (pid {proc.pid()}); waiting for it to read")
        deadline = time.monotonic() + 180
        while len(clock.started) < partitions:
            if not proc.running():
                raise RuntimeError(f"{name} exited early; log {proc.log_file}:\n{proc.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name}: no start marker within 180 s")
            watcher.poll(0.2)
        time.sleep(1.0)  # the watchers have long subscribed; let the job settle after its first records
        sender = MeasuredProcess(f"{name}-produce", [*me, "produce", "--bootstrap", stack.bootstrap, "--topic",
                                                  topics.events, "--rate", str(rate), "--seconds",
                                                  str(warmup_s + seconds), "--users", str(users), "--seed",
                                                  str(seed), "--out", str(files / "sent.json")],
                              plain_env, work)
        helpers.append(sender)
        log(f"{name}: offering {rate:,.0f} events/s for {warmup_s:.0f} s warm-up + {seconds:.0f} s")
        cpu_before = proc.cpu_seconds()
        sender.popen.wait(warmup_s + seconds + 120)
        cpu_after = proc.cpu_seconds()
        sent = json.loads((files / "sent.json").read_text())
        result.events_sent = sent["sent"]
        result.achieved_send_rate = sent["sent"] / (sent["ended"] - sent["started"])
        result.producer_cpu_s = sent["cpu_s"]
        result.job_cores_busy = (cpu_after - cpu_before) / (sent["ended"] - sent["started"])
        markers_sent = send_end_markers(stack.bootstrap, topics.events, partitions, now_ms() - END_MARKER_AGE_MS)
        # A job that cannot sustain the load would take minutes to drain its backlog: wait a bounded
        # time, then say so and estimate its rate from what it got through.
        deadline = time.monotonic() + drain_s
        while not clock.all_ended and time.monotonic() < deadline:
            if not proc.running():
                raise RuntimeError(f"{name} exited early; log {proc.log_file}:\n{proc.log_tail()}")
            watcher.poll(0.2)
        if clock.all_ended:
            result.drain_lag_s = clock.last_end - markers_sent
            result.processing_rate = sent["sent"] / (clock.last_end - sent["started"])
            log(f"{name}: drained {result.drain_lag_s:.1f} s after the last event sent; waiting for the last commit")
        else:
            log(f"{name}: the backlog did not drain within {drain_s:.0f} s of the last event sent")
        result.kept_up = result.drain_lag_s is not None and result.drain_lag_s < 2.0
        time.sleep(checkpoint_interval_ms / 1000 + 3)
        for helper in (redis_watch, kafka_watch):
            helper.stop(signal.SIGTERM, timeout_s=60)
        redis_seen = json.loads((files / "redis.json").read_text())
        kafka_seen = json.loads((files / "kafka.json").read_text())
        result.redis_watcher_cpu_s = redis_seen["cpu_s"]
        result.kafka_watcher_cpu_s = kafka_seen["cpu_s"]
        committed = read_committed_transitions(stack.bootstrap, topics.transitions)
        window_start_ms = sent["started"] * 1000 + warmup_s * 1000
        newest_processed = join_latencies(result, committed, redis_seen["seen"], kafka_seen["seen"],
                                          window_start_ms, sent["ended"] * 1000)
        if newest_processed is not None:
            result.lag_at_end_of_load_s = max(0.0, sent["ended"] - newest_processed / 1000)
            if result.processing_rate is None:
                result.processing_rate = result.achieved_send_rate * max(
                    0.0, newest_processed / 1000 - sent["started"]) / (sent["ended"] - sent["started"])
                result.processing_rate_estimated = True
        result.finished = True
    except (RuntimeError, TimeoutError, subprocess.TimeoutExpired, OSError, ValueError, KeyError) as err:
        result.error = str(err).splitlines()[0]
        log(f"{name}: {err}")
    finally:
        if watcher is not None:
            watcher.close()
        for helper in helpers:
            helper.stop()
        if proc is not None:
            proc.stop()
        client.config_set("notify-keyspace-events", "")
        client.flushdb()
        client.close()
    return result


def join_latencies(result: LatencyResult, committed: dict[tuple[int, int], dict], redis_seen: list,
                   kafka_seen: list, window_start_ms: float, window_end_ms: float) -> float | None:
    """Event-caused transitions of events sent in the window: Redis-visible and Kafka-committed
    receive times minus the event's timestamp (the transition's event_time). Returns the newest
    event time whose transition was visible in Redis by the end of the window (how far the job
    had got when the load stopped)."""
    seen: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for user, segment, sequence, at_ms in redis_seen:
        seen.setdefault((user, segment), []).append((sequence, at_ms))
    for entries in seen.values():
        entries.sort()
    received = {(p, o): at_ms for p, o, at_ms in kafka_seen}
    to_redis, to_kafka = [], []
    redis_unmatched = kafka_unmatched = 0
    newest_processed = None
    for position, t in committed.items():
        if t["cause"] != "EVENT" or t["event_time"] > window_end_ms:
            continue
        at = visible_at(seen, t["user_id"], t["segment"], t["sequence"])
        if at is not None and at <= window_end_ms:
            newest_processed = max(newest_processed or 0, t["event_time"])
        if t["event_time"] < window_start_ms:
            continue
        if at is None:
            redis_unmatched += 1
        else:
            to_redis.append(at - t["event_time"])
        at = received.get(position)
        if at is None:
            kafka_unmatched += 1
        else:
            to_kafka.append(at - t["event_time"])
    result.event_caused_transitions = len(to_kafka) + kafka_unmatched
    result.redis = latency_summary(to_redis)
    result.kafka = latency_summary(to_kafka)
    result.redis_unmatched = redis_unmatched
    result.kafka_unmatched = kafka_unmatched
    return newest_processed


# --- checkpoints of many users' state ----------------------------------------------------------------


@dataclass
class CheckpointResult:
    users: int
    finished: bool = False
    error: str | None = None
    load_events_per_s: float | None = None
    startup_s: float | None = None
    # The first checkpoint triggered after every user's event was processed: it holds all N users.
    duration_s: float | None = None
    state_size_bytes: int | None = None  # the full state the checkpoint references
    checkpointed_size_bytes: int | None = None  # what this (incremental) checkpoint uploaded
    state_bytes_per_user: float | None = None
    # The one after it: nothing new to upload, the steady incremental cost.
    next_duration_s: float | None = None
    next_checkpointed_size_bytes: int | None = None
    # Every checkpoint while the events were processed (the job is then backpressured: a barrier
    # waits behind the records buffered in front of the keyed operator).
    max_duration_during_load_s: float | None = None
    checkpoints_completed: int | None = None
    checkpoints_failed: int | None = None
    failure_messages: list = field(default_factory=list)
    busiest_threads: list = field(default_factory=list)


def measure_checkpoint(stack: BenchStack, work: Path, config: str | None, users: int, settings: dict,
                       checkpoint_interval_ms: int, stall_s: float) -> CheckpointResult:
    name = "checkpoint"
    topics = RunTopics(f"{name}-events", f"{name}-transitions", f"{name}-dead-letters")
    stack.create_topics({topics.events: 1, topics.transitions: 2, topics.dead_letters: 1})
    result = CheckpointResult(users)
    log(f"{name}: preloading one event for each of {users:,} users")
    preload(stack.bootstrap, {topics.events: 1}, checkpoint_events(users, now_ms()))
    clock = MarkerClock(1, END_MARKERS_PER_PARTITION)
    watcher = DeadLetterWatcher(stack.bootstrap, topics.dead_letters, clock)
    env = run_environment(stack, work, name, topics, {"parallelism": 1, "state_backend": "rocksdb", **settings})
    proc = MeasuredProcess(name, job_argv(config), env, work)
    log(f"{name}: started (pid {proc.pid()}) with RocksDB, incremental checkpoints")
    # REST keeps only the latest few checkpoints: collect them as they happen, by id.
    seen: dict[int, dict] = {}
    rest = {"port": None, "job": None, "next_poll": 0.0, "stats": {}}

    def poll_checkpoints() -> None:
        if time.monotonic() < rest["next_poll"]:
            return
        rest["next_poll"] = time.monotonic() + 2.0
        try:
            if rest["port"] is None:
                rest["port"] = rest_port_of(Path(env["FLINK_LOG_DIR"]))
            if rest["port"] is not None and rest["job"] is None:
                jobs = rest_get(rest["port"], "/jobs/overview")["jobs"]
                rest["job"] = jobs[0]["jid"] if jobs else None
            if rest["job"] is not None:
                rest["stats"] = rest_get(rest["port"], f"/jobs/{rest['job']}/checkpoints")
                for c in rest["stats"].get("history", []):
                    if c.get("status") in ("COMPLETED", "FAILED"):
                        seen[c["id"]] = c
        except OSError:  # the REST endpoint is not up yet
            pass

    try:
        samples = watch_markers(proc, watcher, clock, users, 1, stall_s, on_tick=poll_checkpoints)
        result.busiest_threads = busiest_threads(samples.get("threads_start", {}), samples["threads_end"])
        result.startup_s = clock.first_start - proc.launched_at
        result.load_events_per_s = users / (clock.last_end - clock.first_start)
        loaded_ms = clock.last_end * 1000
        during_load = [c["end_to_end_duration"] / 1000 for c in seen.values() if c["status"] == "COMPLETED"]
        result.max_duration_during_load_s = max(during_load) if during_load else None
        deadline = time.monotonic() + max(120.0, 10 * checkpoint_interval_ms / 1000)
        after_load = following = None
        while following is None:
            if not proc.running():
                raise RuntimeError(f"{name} exited early; log {proc.log_file}:\n{proc.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError("no two completed checkpoints after the load within "
                                   f"{max(120.0, 10 * checkpoint_interval_ms / 1000):.0f} s")
            poll_checkpoints()
            for c in sorted(seen.values(), key=lambda c: c["id"]):
                if c["status"] != "COMPLETED":
                    continue
                if after_load is None and c["trigger_timestamp"] >= loaded_ms:
                    after_load = c
                elif after_load is not None and c["id"] > after_load["id"] and following is None:
                    following = c
            time.sleep(0.5)
        stats = rest["stats"]
        result.duration_s = after_load["end_to_end_duration"] / 1000
        result.state_size_bytes = after_load["state_size"]
        result.checkpointed_size_bytes = after_load["checkpointed_size"]
        result.state_bytes_per_user = after_load["state_size"] / users
        result.next_duration_s = following["end_to_end_duration"] / 1000
        result.next_checkpointed_size_bytes = following["checkpointed_size"]
        result.checkpoints_completed = stats["counts"]["completed"]
        result.checkpoints_failed = stats["counts"]["failed"]
        failed = [c for c in seen.values() if c["status"] == "FAILED"]
        latest_failed = (stats.get("latest") or {}).get("failed")
        if latest_failed:
            failed.append(latest_failed)
        result.failure_messages = sorted({str(c.get("failure_message"))[:300] for c in failed})
        if result.checkpoints_failed and not result.failure_messages:
            result.failure_messages = checkpoint_failures_in_log(Path(env["FLINK_LOG_DIR"]))
        result.finished = True
        log(f"{name}: checkpoint with {users:,} users took {result.duration_s:.2f} s, state "
            f"{result.state_size_bytes:,} B")
    except (RuntimeError, TimeoutError, OSError, ValueError, KeyError, IndexError) as err:
        result.error = str(err).splitlines()[0]
        log(f"{name}: {err}")
    finally:
        watcher.close()
        proc.stop()
        stack.redis_client().flushdb()
    return result


# --- the report ---------------------------------------------------------------------------------------


def figures(results: dict, checkpoint_interval_ms: int, cores: int) -> list[dict]:
    """Rows of (figure, value, target, verdict); the JSON keeps the numbers, the table the text."""
    rows = []

    def row(figure, value, shown, target_text="", op=None, target=None, note=""):
        rows.append({"figure": figure, "value": value, "shown": shown, "target": target_text,
                     "verdict": verdict(value, op, target) if op else "", "note": note})

    tp = {r["name"]: r for r in results.get("throughput", [])}
    job1, job2, ref, floor = tp.get("job-p1"), tp.get("job-p2"), tp.get("reference"), tp.get("floor-p1")
    on_cluster = [r for name, r in tp.items() if name.startswith("job-cluster-p")]
    if job1:
        row("full job, parallelism 1: events/s per slot", job1["events_per_s_per_slot"],
            fmt(job1["events_per_s_per_slot"]), ">= 1,500", ">=", JOB_TARGET_PER_SLOT, job1["error"] or "")
    if job2:
        row("full job, parallelism 2: events/s per slot", job2["events_per_s_per_slot"],
            fmt(job2["events_per_s_per_slot"]), ">= 1,500", ">=", JOB_TARGET_PER_SLOT, job2["error"] or "")
    if floor:
        row("floor job (state, timer, model call; no logic), p1: events/s", floor["events_per_s"],
            fmt(floor["events_per_s"]), "", None, None, floor["error"] or "")
    for part, what in (("floor-p1-no-model", "the model call"), ("floor-p1-no-timer", "the timer")):
        without = tp.get(part)
        if floor and without and floor.get("cpu_s_per_million_events") and without.get("cpu_s_per_million_events"):
            cost = floor["cpu_s_per_million_events"] - without["cpu_s_per_million_events"]  # s per 1M = us per event
            row(f"floor: {what}, CPU per event (floor - floor without it)", cost, fmt(cost, " us"), "", None, None,
                f"without it {fmt(without['events_per_s'])} events/s")
    if job1 and floor and job1["events_per_s"] and floor["events_per_s"]:
        ratio = job1["events_per_s"] / floor["events_per_s"]
        row("job (p1) / floor", ratio, f"{ratio:.2f}x", ">= 0.6x", ">=", 0.6)
        if job1.get("steady_events_per_s") and floor.get("steady_events_per_s"):
            ratio = job1["steady_events_per_s"] / floor["steady_events_per_s"]
            row("job (p1) / floor, second half of the run", ratio, f"{ratio:.2f}x", ">= 0.6x", ">=", 0.6)
    if ref:
        row("reference loop (1 process): events/s", ref["events_per_s"], fmt(ref["events_per_s"]), "", None, None,
            ref["error"] or "")
    if job1 and ref and job1["events_per_s_per_slot"] and ref["events_per_s"]:
        ratio = job1["events_per_s_per_slot"] / ref["events_per_s"]
        row("job (p1, per slot) / reference", ratio, f"{ratio:.2f}x", ">= 0.5x", ">=", 0.5)
    for r in (job1, job2, floor, ref):
        if r and r.get("steady_events_per_s"):
            per = r["steady_events_per_s"] / r["slots"]
            row(f"{r['name']}: events/s per slot, second half of the run", per, fmt(per), "", None, None,
                "after the JVM's JIT warm-up" if r is not ref else "")
    if job1 and ref and job1.get("steady_events_per_s") and ref.get("steady_events_per_s"):
        ratio = job1["steady_events_per_s"] / ref["steady_events_per_s"]
        row("job (p1) / reference, second half of the run", ratio, f"{ratio:.2f}x", ">= 0.5x", ">=", 0.5)
    if job1 and job2 and job1["events_per_s"] and job2["events_per_s"]:
        ratio = job2["events_per_s"] / job1["events_per_s"]
        note = f"{cores} cores on this machine, shared by the job, broker, Redis and the bench" if cores < 4 else ""
        row("parallelism 2 / parallelism 1 (one TaskManager, 2 slots)", ratio, f"{ratio:.2f}x", ">= 1.6x", ">=", 1.6,
            note)
    for r in on_cluster:
        row(f"{r['name']} ({r['slots']} single-slot TaskManagers): events/s in all", r["events_per_s"],
            fmt(r["events_per_s"]), "", None, None, r["error"] or "")
        if job1 and job1["events_per_s"] and r["events_per_s"]:
            ratio = r["events_per_s"] / job1["events_per_s"]
            note = f"{cores} cores on this machine, shared by the job, broker, Redis and the bench" if cores < 4 else ""
            row(f"{r['name']} / parallelism 1", ratio, f"{ratio:.2f}x", f">= {0.8 * r['slots']:.1f}x", ">=",
                0.8 * r["slots"], note)
    for r in (job1, job2, *on_cluster, floor, ref):
        if r and r["cpu_s_per_million_events"] is not None:
            target = ("<= 800 s", "<=", 800) if r is job1 else ("", None, None)
            row(f"{r['name']}: CPU seconds per 1M events", r["cpu_s_per_million_events"],
                fmt(r["cpu_s_per_million_events"], " s"), *target, f"{r['cores_busy']:.2f} cores busy")
    for r in (job1, job2):
        if r and r["startup_s"] is not None:
            row(f"{r['name']}: start-up (launch -> first event read)", r["startup_s"],
                fmt(r["startup_s"], " s", 1))
    lat = results.get("latency")
    if lat:
        rate_note = (f"offered {lat['offered_rate']:,.0f}/s, sent {fmt(lat['achieved_send_rate'])}/s, "
                     f"processed {'~' if lat['processing_rate_estimated'] else ''}{fmt(lat['processing_rate'])}/s")
        if not lat["kept_up"]:
            if lat["drain_lag_s"] is not None:
                after = f"drained {fmt(lat['drain_lag_s'], ' s', 1)} after it"
            elif lat["redis"].get("count"):
                after = "not drained: the latencies cover only the events it got through"
            else:
                after = "none of the measured window's events got through"
            behind = fmt(lat["lag_at_end_of_load_s"], " s", 1)
            rate_note += f": DID NOT KEEP UP, {behind} behind when the load stopped; {after}"
        if lat["error"]:
            rate_note = lat["error"]
        for what, key, target_text, target, stat in (
            ("event -> visible in Redis", "redis", "p99 <= 100 ms", 100, "p99_ms"),
            ("event -> committed in Kafka", "kafka", f"max <= {checkpoint_interval_ms + 1000:,} ms",
             checkpoint_interval_ms + 1000, "max_ms"),
        ):
            s = lat.get(key) or {}
            value = s.get(stat)
            shown = (f"p50 {fmt(s.get('p50_ms'))} / p99 {fmt(s.get('p99_ms'))} / max {fmt(s.get('max_ms'))} ms"
                     if s.get("count") else "-")
            if not s.get("count") and lat["lag_at_end_of_load_s"] is not None:
                # Nothing of the window got through: the latency is at least the backlog's age.
                value = lat["lag_at_end_of_load_s"] * 1000
                shown = f"> {fmt(value)} ms (backlog)"
            row(f"{lat['name']}: {what}", value, shown, target_text, "<=", target, rate_note)
            rate_note = lat["error"] or ""  # said once
    state = results.get("state")
    if state and state.get("core_events_per_s"):
        note = (f"{state['timers_per_event']:.2f} timer steps per event; {state['users']:,} users x "
                f"{state['days']:g} days")
        row("in-memory core (per-user step, timers, state encode), 3 models: events/s", state["core_events_per_s"],
            fmt(state["core_events_per_s"]), ">= 8,000", ">=", 8_000, note)
        if state.get("no_models_events_per_s"):
            row("in-memory core without the model segments and models: events/s", state["no_models_events_per_s"],
                fmt(state["no_models_events_per_s"]), ">= 25,000", ">=", 25_000)
    if state:
        row(f"state bytes per user ({state['users']:,} users x {state['days']:g} days)", state["state_bytes_mean"],
            f"mean {fmt(state['state_bytes_mean'])} / p99 {fmt(state['state_bytes_p99'])} / max "
            f"{fmt(state['state_bytes_max'])} B", "mean <= 2,048 B", "<=", STATE_TARGET_BYTES,
            f"core {state['core_us_per_event']:.0f} us/event ({state['cached_us_per_event']:.0f} cached)")
    ck = results.get("checkpoint")
    if ck:
        note = "" if ck["users"] >= 1_000_000 else f"at {ck['users']:,} users (target is for 1M)"
        if ck["error"]:
            note = ck["error"]
        shown = (f"{fmt(ck['duration_s'], ' s', 2)}, state {fmt(ck['state_size_bytes'])} B, uploaded "
                 f"{fmt(ck['checkpointed_size_bytes'])} B" if ck["finished"] else "-")
        row(f"checkpoint with {ck['users']:,} users' state (RocksDB, incremental)", ck["duration_s"], shown,
            "<= 10 s", "<=", 10, note)
        if ck["finished"]:
            row("  next checkpoint (nothing new)", ck["next_duration_s"],
                f"{fmt(ck['next_duration_s'], ' s', 2)}, uploaded {fmt(ck['next_checkpointed_size_bytes'])} B")
            row("  longest checkpoint while loading (backpressured)", ck["max_duration_during_load_s"],
                fmt(ck["max_duration_during_load_s"], " s", 2), "<= 10 s", "<=", 10,
                f"{ck['checkpoints_failed']} failed" + (f": {ck['failure_messages'][0][:90]}" if ck["failure_messages"]
                                                        else "") if ck["checkpoints_failed"] else "")
            row("  checkpointed state per user", ck["state_bytes_per_user"], fmt(ck["state_bytes_per_user"], " B"))
    return rows


def format_report(report: dict) -> str:
    m = report["machine"]
    s = report["settings"]
    lines = [
        f"segments bench, {report['started_at']} (took {report['took_s']:.0f} s)",
        f"machine: {m['cores']} cores ({m['cpu_model']}), {m['ram_gb']} GB RAM, Python {m['python']}, {m['java']}; "
        f"load average {m['load_average_at_start']:.2f} at start",
        f"job: definitions {s['definitions_version']} ({s['segments']} segments, models: {s['models']}), "
        f"checkpoint interval {s['checkpoint_interval_ms']:,} ms, state backend {s['state_backend']}, "
        f"profile cache {s['profile_cache_users']:,} users, watermark lag {s['watermark_lag_ms']:,} ms",
        "",
    ]
    rows = report["figures"]
    widths = [max([len(r["figure"]) for r in rows] + [6]), max([len(r["shown"]) for r in rows] + [5]),
              max([len(r["target"]) for r in rows] + [6])]
    lines.append(f"{'figure':<{widths[0]}}  {'value':<{widths[1]}}  {'target':<{widths[2]}}  verdict")
    lines.append("-" * (sum(widths) + 15))
    for r in rows:
        line = f"{r['figure']:<{widths[0]}}  {r['shown']:<{widths[1]}}  {r['target']:<{widths[2]}}  {r['verdict']}"
        lines.append(line.rstrip() + (f"  ({r['note']})" if r["note"] else ""))
    lines.append("")
    for r in report["results"].get("throughput", []):
        if r["finished"]:
            lines.append(
                f"{r['name']}: {r['events']:,} events in {r['window_s']:.1f} s after {r['startup_s']:.1f} s start-up; "
                f"CPU {r['cpu_window_s']:.1f} s in the window ({r['cpu_total_s']:.1f} s in all), broker + Redis "
                f"{r['broker_redis_cpu_window_s']:.1f} s; transitions committed {fmt(r['transitions_committed'])}; "
                f"load average before {r['load_average_before']:.2f}")
        else:
            lines.append(f"{r['name']}: did not finish: {r['error']}")
        if r["busiest_threads"]:
            lines.append("  busiest threads (CPU s in the window): "
                         + ", ".join(f"{name!r} {cpu:.1f}" for name, cpu in r["busiest_threads"]))
        if r["other_dead_letters"]:
            lines.append(f"  unexpected dead letters: {r['other_dead_letters']}")
    counts = {r["name"]: r["transitions_committed"] for r in report["results"].get("throughput", [])
              if r["transitions_committed"] is not None}
    if len(set(counts.values())) > 1:
        lines.append(f"note: the runs committed different numbers of transitions: {counts}")
    lat = report["results"].get("latency")
    if lat and lat["finished"]:
        lines.append(
            f"{lat['name']}: {lat['events_sent']:,} events sent at {lat['achieved_send_rate']:,.0f}/s "
            f"({lat['warmup_s']:.0f} s warm-up not counted); {lat['event_caused_transitions']:,} event-caused "
            f"transitions in the window (unmatched: Redis {lat['redis_unmatched']}, Kafka {lat['kafka_unmatched']}); "
            f"job {lat['job_cores_busy']:.2f} cores busy; measuring side CPU: producer {lat['producer_cpu_s']:.1f} s, "
            f"Redis watcher {lat['redis_watcher_cpu_s']:.1f} s, Kafka watcher {lat['kafka_watcher_cpu_s']:.1f} s")
    ck = report["results"].get("checkpoint")
    if ck and ck["finished"]:
        lines.append(
            f"checkpoint: {ck['users']:,} users loaded at {ck['load_events_per_s']:,.0f} events/s with RocksDB; "
            f"{ck['checkpoints_completed']} checkpoints completed, {ck['checkpoints_failed']} failed, longest "
            f"{fmt(ck['max_duration_during_load_s'], ' s', 2)}")
        for message in ck["failure_messages"]:
            lines.append(f"  failed checkpoint: {message}")
        if ck["busiest_threads"]:
            lines.append("  busiest threads (CPU s while loading): "
                         + ", ".join(f"{name!r} {cpu:.1f}" for name, cpu in ck["busiest_threads"]))
    if report.get("json_path"):
        lines.append(f"results: {report['json_path']}")
    return "\n".join(lines)


# --- the command ---------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--events", type=int, default=200_000, help="preloaded events for the throughput runs")
    p.add_argument("--users", type=int, default=5_000, help="generated users in the throughput runs")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--parallelisms", default="1,2", help="job parallelisms to measure (comma-separated)")
    p.add_argument("--cluster-parallelisms", default="2",
                   help="job parallelisms to measure on a standalone cluster of that many single-slot TaskManagers")
    p.add_argument("--rate", type=float, default=5_000.0, help="offered load of the latency run, events/s")
    p.add_argument("--latency-seconds", type=float, default=60.0, help="measured window of the latency run")
    p.add_argument("--warmup-seconds", type=float, default=10.0, help="offered load before the window")
    p.add_argument("--latency-users", type=int, default=5_000)
    p.add_argument("--drain-seconds", type=float, default=60.0,
                   help="how long the latency run waits for a backlog to drain after the load stops")
    p.add_argument("--latency-parallelism", type=int, default=1)
    p.add_argument("--latency-of-reference", action="store_true",
                   help="also measure the reference loop's latency at the same load")
    p.add_argument("--checkpoint-users", type=int, default=1_000_000,
                   help="users whose state the checkpoint run holds (one event each)")
    p.add_argument("--state-users", type=int, default=500, help="users for the state-bytes replay")
    p.add_argument("--state-days", type=float, default=7.0, help="days of traffic for the state-bytes replay")
    p.add_argument("--stall-seconds", type=float, default=600.0,
                   help="give a run up when none of its markers has come for this long")
    for what in ("state", "throughput", "floor", "reference", "latency", "checkpoint"):
        p.add_argument(f"--skip-{what}", action="store_true", help=f"do not measure {what}")
    p.add_argument("--floor-parts", action="store_true",
                   help="also run the floor job without its model call and without its timer, to price each")
    p.add_argument("--json", help="results file (default: bench-results/<UTC timestamp>.json)")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, checkpoints)")


def run(args) -> int:
    from jobs.profile_stats import measure
    from jobs.settings import load_settings
    from udfs.segmentation import Segmentation

    settings = load_settings(args.config)
    segmentation = Segmentation.load(settings.definitions_file(), settings.profile, settings.models_dir)
    started = time.time()
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(started))
    json_path = Path(args.json) if args.json else PROJECT_ROOT / "bench-results" / f"{stamp}.json"
    machine = machine_info()
    log(f"machine: {machine['cores']} cores, load average {machine['load_average_at_start']:.2f}")
    results: dict = {}
    work = Path(tempfile.mkdtemp(prefix="segments-bench-"))
    stack = None
    failed = False
    # SIGTERM (a supervisor, `timeout`) must stop everything this started, as Ctrl-C does.
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        if not args.skip_state:
            log(f"state: replaying {args.state_users:,} users x {args.state_days:g} days through the core")
            stats = measure(settings, args.state_users, args.state_days, args.seed)
            results["state"] = {**asdict(stats), "days": args.state_days}
        stack = BenchStack(work)
        interval = settings.checkpoint_interval_ms
        if not args.skip_throughput:
            parallelisms = [int(p) for p in args.parallelisms.split(",") if p.strip()]
            on_cluster = [int(p) for p in args.cluster_parallelisms.split(",") if p.strip()]
            topics = {f"events-{p}": p for p in sorted(set(parallelisms) | set(on_cluster) | {1})}
            stack.create_topics(topics)
            # One topic per partition count: a source subtask reading several partitions of a
            # backlog makes events late (docs/limits.md), so partitions = parallelism.
            log(f"preloading {args.events:,} generated events for {args.users:,} users into {sorted(topics)}")
            count, _, _ = preload(stack.bootstrap, topics,
                                  generated_events(args.events, args.users, args.seed, now_ms()))
            runs = results["throughput"] = []
            for p in parallelisms:
                runs.append(asdict(measure_throughput(
                    stack, work, f"job-p{p}", job_argv(args.config), p, f"events-{p}", p, count,
                    {"parallelism": p}, args.stall_seconds, True, interval)))
            for p in on_cluster:
                runs.append(asdict(measure_on_cluster(stack, work, args.config, p, count, args.stall_seconds,
                                                      interval)))
            if not args.skip_floor:
                state_bytes = int(results["state"]["state_bytes_mean"]) if "state" in results else FLOOR_STATE_BYTES
                variants = [("floor-p1", ())]
                if args.floor_parts:  # each part left out once: what it costs is the difference
                    variants += [("floor-p1-no-model", ("--no-model",)), ("floor-p1-no-timer", ("--no-timer",))]
                for name, flags in variants:
                    runs.append(asdict(measure_throughput(
                        stack, work, name, [*floor_argv(args.config, state_bytes), *flags], 1, "events-1", 1, count,
                        {"parallelism": 1}, args.stall_seconds, False, interval)))
            if not args.skip_reference:
                runs.append(asdict(measure_throughput(
                    stack, work, "reference", reference_argv(args.config), 1, "events-1", 1, count, {},
                    args.stall_seconds, True, interval)))
        if not args.skip_latency:
            p = args.latency_parallelism
            results["latency"] = asdict(measure_latency(
                stack, work, f"latency-job-p{p}", job_argv(args.config), {"parallelism": p}, args.rate,
                args.latency_seconds, args.warmup_seconds, args.latency_users, args.seed, interval,
                args.drain_seconds))
            if args.latency_of_reference:
                results["latency_reference"] = asdict(measure_latency(
                    stack, work, "latency-reference", reference_argv(args.config), {}, args.rate,
                    args.latency_seconds, args.warmup_seconds, args.latency_users, args.seed, interval,
                    args.drain_seconds))
        if not args.skip_checkpoint:
            results["checkpoint"] = asdict(measure_checkpoint(
                stack, work, args.config, args.checkpoint_users, {}, interval, args.stall_seconds))
    except BaseException:
        failed = True
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        if stack is not None:
            stack.stop()
        if args.keep or failed:
            log(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    definitions = segmentation.definitions
    report = {
        "started_at": time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(started)),
        "took_s": time.time() - started,
        "machine": machine,
        "settings": {
            "definitions_version": definitions.version,
            "segments": len(definitions.segments),
            "models": ", ".join(definitions.models) or "none",
            "checkpoint_interval_ms": settings.checkpoint_interval_ms,
            "state_backend": settings.state_backend,
            "profile_cache_users": settings.profile_cache_users,
            "watermark_lag_ms": settings.watermark_lag_ms,
        },
        "arguments": {k: v for k, v in vars(args).items() if k != "func"},
        "results": results,
    }
    report["figures"] = figures(results, settings.checkpoint_interval_ms, machine["cores"] or 1)
    if results.get("latency_reference"):
        extra = figures({"latency": results["latency_reference"]}, settings.checkpoint_interval_ms,
                        machine["cores"] or 1)
        report["figures"] += extra
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=1))
    report["json_path"] = str(json_path)
    print(format_report(report))
    return 0


# --- the reference loop ---------------------------------------------------------------------------------


class ReferenceLoop:
    """The job's work in one plain Python process, with the same core and the same adapters'
    choices: decode and validate (as the keyed function does), drop events behind the watermark,
    duplicates, the engine per event, the state written per step in the state codec's layout
    (latin-1 text, as the job's ValueState) behind the same profile cache, one timer per user fired as the watermark
    passes it, the transitions of each event or timer written to Redis in one RedisSegmentView.apply
    (one round trip), each produced Avro-encoded by a transactional producer that commits every
    checkpoint interval.

    Not done, because only Flink needs it: the second decode of the event in the keyed operator
    (the job ships the validated bytes between operators instead of a Row)."""

    def __init__(self, settings):
        from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

        from jobs.redis_view import RedisSegmentView
        from udfs.codec import SchemaCatalog
        from udfs.segmentation import Segmentation
        from udfs.state import ProfileStateCodec

        self.settings = settings
        catalog = SchemaCatalog()
        self.events = catalog.codec("UserEvent", max_bytes=settings.max_event_bytes)
        self.transitions = catalog.codec("SegmentTransition")
        self.dead_letters = catalog.codec("DeadLetter")
        self.state_codec = ProfileStateCodec(catalog.codec("UserProfileState"))
        self.engine = Segmentation.load(settings.definitions_file(), settings.profile, settings.models_dir).engine()
        self.view = (RedisSegmentView(settings.redis_url, settings.redis_key_prefix, settings.redis_user_ttl_s)
                     if settings.redis_url else None)
        self.state: dict[str, str] = {}  # user -> profile state, what the hashmap backend keeps
        self.cache: OrderedDict = OrderedDict()
        # The timer service: registered (instant, user) pairs, each at most once, as Flink's.
        self.timers: list[tuple[int, str]] = []  # heap
        self.registered: set[tuple[int, str]] = set()
        self.max_event_time: int | None = None
        self.watermark = -(2**63)
        self.consumer = Consumer({"bootstrap.servers": settings.bootstrap_servers, "group.id": settings.consumer_group,
                                  "enable.auto.commit": False, "isolation.level": "read_committed"})
        topic = settings.events_topic
        partitions = self.consumer.list_topics(topic, timeout=10).topics[topic].partitions
        self.consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in sorted(partitions)])
        self.producer = Producer({"bootstrap.servers": settings.bootstrap_servers,
                                  "transactional.id": f"{settings.transactional_id_prefix}-reference",
                                  "transaction.timeout.ms": settings.transaction_timeout_ms})
        self.producer.init_transactions(30)
        self.producer.begin_transaction()
        self.stopping = False

    def run(self) -> None:
        import heapq

        from confluent_kafka import KafkaException

        interval_s = self.settings.checkpoint_interval_ms / 1000
        next_commit = time.monotonic() + interval_s
        while not self.stopping:
            for msg in self.consumer.consume(500, 0.1):
                if msg.error():
                    raise KafkaException(msg.error())
                self.on_record(msg.value(), msg.topic(), msg.partition(), msg.offset())
            # Periodic watermark, as the job's bounded out-of-orderness strategy emits it.
            if self.max_event_time is not None:
                self.watermark = max(self.watermark, self.max_event_time - self.settings.watermark_lag_ms - 1)
            while self.timers and self.timers[0][0] <= self.watermark:
                timer = heapq.heappop(self.timers)
                self.registered.discard(timer)
                self.on_timer(timer[1], timer[0])
            self.producer.poll(0)
            if time.monotonic() >= next_commit:
                self.producer.commit_transaction(60)
                self.producer.begin_transaction()
                next_commit = time.monotonic() + interval_s
        self.producer.commit_transaction(60)
        self.consumer.close()

    def on_record(self, payload: bytes, topic: str, partition: int, offset: int) -> None:
        from udfs.codec import DecodeError
        from udfs.events import event_from_record
        from udfs.transitions import APPLIED

        try:
            event = event_from_record(self.events.decode(payload), now_ms(), self.settings.max_future_ms)
        except DecodeError as err:
            self.dead_letter(payload, topic, partition, offset, err.reason, err.message)
            return
        late_before = self.watermark - self.settings.allowed_lateness_ms
        if event.timestamp < late_before:  # before the profile is loaded, as the job
            self.dead_letter(payload, topic, partition, offset, "late",
                             f"event time {event.timestamp} is more than {self.settings.allowed_lateness_ms} ms "
                             f"behind the watermark {self.watermark}")
            return
        if self.max_event_time is None or event.timestamp > self.max_event_time:
            self.max_event_time = event.timestamp
        profile = self.load_profile(event.user_id)
        step = self.engine.step_event(event.user_id, profile, event)
        if step.outcome == APPLIED:
            self.commit(event.user_id, profile, step)

    def on_timer(self, user_id: str, due: int) -> None:
        profile = self.load_profile(user_id)
        self.commit(user_id, profile, self.engine.step_timer(user_id, profile, due))

    def load_profile(self, user_id: str):
        profile = self.cache.get(user_id)
        if profile is not None:
            self.cache.move_to_end(user_id)
            return profile
        stored = self.state.get(user_id)
        profile = self.state_codec.decode(None if stored is None else stored.encode("latin-1"))
        if self.settings.profile_cache_users:
            self.cache[user_id] = profile
            if len(self.cache) > self.settings.profile_cache_users:
                self.cache.popitem(last=False)
        return profile

    def commit(self, user_id: str, profile, step) -> None:
        import heapq

        timer = (step.register_timer_ms, user_id)
        if step.register_timer_ms is not None and timer not in self.registered:
            self.registered.add(timer)
            heapq.heappush(self.timers, timer)
        if step.drop_state:
            self.state.pop(user_id, None)
            self.cache.pop(user_id, None)
        else:
            self.state[user_id] = self.state_codec.encode(profile).decode("latin-1")
        transitions = step.transitions
        if transitions and self.view is not None:  # one round trip per event or timer, as the job's writer
            self.view.apply([(t.user_id, t.segment, t.kind, t.sequence, t.event_time) for t in transitions])
        emitted_at = now_ms()
        for t in transitions:
            payload = self.transitions.encode(t.to_record(emitted_at))
            produce(self.producer, self.settings.transitions_topic, payload, t.user_id.encode())

    def dead_letter(self, payload, topic, partition, offset, reason, message) -> None:
        limit = self.settings.max_event_bytes
        if payload is not None and len(payload) > limit:
            message = f"{message}; payload truncated to its first {limit} bytes"
            payload = payload[:limit]
        record = {"payload": bytes(payload or b""), "source_topic": topic or "", "source_partition": partition,
                  "source_offset": offset, "reason": reason, "message": message, "detected_at": now_ms()}
        produce(self.producer, self.settings.dead_letter_topic, self.dead_letters.encode(record))


def main_reference(args) -> int:
    from jobs.settings import load_settings

    loop = ReferenceLoop(load_settings(args.config))

    def stop(*_):
        loop.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    loop.run()
    return 0


# --- the latency run's helpers: paced producer and watchers ----------------------------------------


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
        offset = next((o for o in offsets if payload[o:o + len(expected)] == expected), None)
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
                batch[message["channel"][len(channel_prefix):].decode()] = time.time() * 1000
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
    consumer = Consumer({"bootstrap.servers": args.bootstrap, "group.id": "segments-bench-watch",
                         "enable.auto.commit": False, "isolation.level": "read_committed",
                         "fetch.wait.max.ms": 10})
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.bench",
                                     description="processes `segments bench` starts (use `segments bench`)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("reference", help="the reference loop, configured like the job (SEGMENTS_*, --config)")
    p.add_argument("--config")
    p.set_defaults(func=main_reference)
    p = sub.add_parser("produce", help="paced producer of generated events stamped with the wall clock")
    for name, kind in (("bootstrap", str), ("topic", str), ("rate", float), ("seconds", float), ("users", int),
                       ("seed", int), ("out", str)):
        p.add_argument(f"--{name}", type=kind, required=True)
    p.set_defaults(func=main_produce)
    p = sub.add_parser("watch-redis", help="records when transitions become visible in the Redis view")
    for name in ("url", "prefix", "out"):
        p.add_argument(f"--{name}", required=True)
    p.set_defaults(func=main_watch_redis)
    p = sub.add_parser("watch-kafka", help="records when transitions become readable under read_committed")
    for name in ("bootstrap", "topic", "out"):
        p.add_argument(f"--{name}", required=True)
    p.set_defaults(func=main_watch_kafka)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
