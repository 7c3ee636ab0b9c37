"""The measured runs, each over its own topics and Redis keys: throughput over preloaded events
(the job, on the MiniCluster or a standalone cluster, the floor job, the reference loop), latency at
a fixed offered load, and a checkpoint of many users' state."""

from __future__ import annotations

import bisect
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from jobs.bench import log, now_ms
from jobs.bench.load import checkpoint_events, preload
from jobs.bench.markers import (
    END_MARKER_AGE_MS,
    END_MARKERS_PER_PARTITION,
    START_MARKER,
    DeadLetterWatcher,
    MarkerClock,
    send_end_markers,
)
from jobs.bench.processes import BenchStack, ClusterJob, MeasuredProcess, busiest_threads
from jobs.bench.producing import flush, make_producer, produce
from jobs.bench.report import latency_summary


def visible_at(
    seen: dict[tuple[str, str], list[tuple[int, float]]], user: str, segment: str, sequence: int
) -> float | None:
    """When the Redis view first held `sequence` (or a later one) for (user, segment). The view
    applies a user's transitions in sequence order, so seeing a later sequence proves the earlier
    one had been applied; the watcher records sequences as it finds them, in increasing order."""
    entries = seen.get((user, segment))
    if not entries:
        return None
    i = bisect.bisect_left(entries, (sequence, -math.inf))
    return entries[i][1] if i < len(entries) else None


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
            "user_id": t["user_id"],
            "segment": t["segment"],
            "sequence": t["sequence"],
            "event_time": t["event_time"],
            "cause": t["cause"],
        }
    return out


@dataclass
class RunTopics:
    events: str
    transitions: str
    dead_letters: str


def run_environment(stack: BenchStack, work: Path, name: str, topics: RunTopics, settings: dict) -> dict[str, str]:
    """SEGMENTS_* for one run (as tests/e2e job_environment does), over the caller's environment
    (so its own SEGMENTS_* settings apply to the job and the reference alike), with everything
    that must be private to the run: topics, Redis keys, transactional ids, checkpoints, logs."""
    # The run's broker is the bench's own, private and plaintext: the caller's Kafka security
    # settings are for their Kafka, not this one.
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL" and not k.startswith("SEGMENTS_KAFKA_")}
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


def watch_markers(
    proc: MeasuredProcess,
    watcher: DeadLetterWatcher,
    clock: MarkerClock,
    events: int,
    partitions: int,
    stall_s: float,
    stack: BenchStack | None = None,
    on_tick=None,
) -> dict:
    """Waits until every end marker is visible, logging progress; gives up when no marker has
    come for stall_s. Samples CPU (and the busiest threads) at the first start marker and at the
    last end marker, and calls on_tick between polls. Returns the samples."""
    samples: dict = {}
    last_marker = time.monotonic()
    last_log = 0.0
    while not clock.all_ended:
        if not proc.running():
            raise RuntimeError(
                f"{proc.name} exited early (code {proc.popen.returncode}); log {proc.log_file}:\n{proc.log_tail()}"
            )
        if time.monotonic() - last_marker > stall_s:
            raise TimeoutError(
                f"{proc.name}: no progress for {stall_s:.0f} s (~{clock.events_done(partitions):,} "
                f"of {events:,} events done, {len(clock.ended)} of {clock.end_markers} end markers)"
            )
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
            log(
                f"{proc.name}: ~{done:,} of {events:,} events after {elapsed:.0f} s (~{rate:,.0f} events/s)"
                + (f", ~{(events - done) / rate:.0f} s to go" if rate else "")
            )
    samples["cpu_end"] = proc.cpu_seconds()
    samples["threads_end"] = proc.threads()
    if stack is not None:
        samples["stack_cpu_end"] = stack.cpu_seconds()
    return samples


def measure_throughput(
    stack: BenchStack,
    work: Path,
    name: str,
    argv: list[str],
    slots: int,
    events_topic: str,
    partitions: int,
    events: int,
    settings: dict,
    stall_s: float,
    count_transitions: bool,
    checkpoint_interval_ms: int,
    cluster: tuple[Path, int] | None = None,
) -> ThroughputResult:
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
        log(
            f"{name}: {result.events_per_s:,.0f} events/s ({result.window_s:.1f} s, "
            f"{result.cores_busy:.2f} cores busy)"
            + (f"; second half {result.steady_events_per_s:,.0f} events/s" if result.steady_events_per_s else "")
        )
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


def measure_on_cluster(
    stack: BenchStack,
    work: Path,
    config: str | None,
    taskmanagers: int,
    events: int,
    stall_s: float,
    checkpoint_interval_ms: int,
) -> ThroughputResult:
    """The job at parallelism N on a standalone cluster of N single-slot TaskManagers (what
    `segments stack up --flink --taskmanagers N` starts): one interpreter per keyed subtask."""
    from infra.stack import StackPorts, free_port, start_flink_cluster, stop_flink_cluster

    root = work / f"cluster-{taskmanagers}"
    ports = StackPorts(broker=0, redis=0, flink_rest=free_port(), flink_rpc=free_port(), prometheus=free_port())
    log(f"job-cluster-p{taskmanagers}: starting a JobManager and {taskmanagers} single-slot TaskManagers")
    start_flink_cluster(root, ports, taskmanagers)
    try:
        return measure_throughput(
            stack,
            work,
            f"job-cluster-p{taskmanagers}",
            submit_argv(config),
            taskmanagers,
            f"events-{taskmanagers}",
            taskmanagers,
            events,
            {"parallelism": taskmanagers},
            stall_s,
            True,
            checkpoint_interval_ms,
            cluster=(root, ports.flink_rest),
        )
    finally:
        stop_flink_cluster(root)


def job_argv(config: str | None) -> list[str]:
    return [sys.executable, "-m", "jobs.cli", "run", *(["--config", config] if config else [])]


def submit_argv(config: str | None) -> list[str]:
    return [sys.executable, "-m", "jobs.cli", "submit", *(["--config", config] if config else [])]


def floor_argv(config: str | None, state_bytes: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "jobs.bench.floor_job",
        *(["--config", config] if config else []),
        "--state-bytes",
        str(state_bytes),
    ]


def reference_argv(config: str | None) -> list[str]:
    return [sys.executable, "-m", "jobs.bench", "reference", *(["--config", config] if config else [])]


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


def measure_latency(
    stack: BenchStack,
    work: Path,
    name: str,
    argv: list[str],
    settings: dict,
    rate: float,
    seconds: float,
    warmup_s: float,
    users: int,
    seed: int,
    checkpoint_interval_ms: int,
    drain_s: float,
) -> LatencyResult:
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
        redis_watch = MeasuredProcess(
            f"{name}-watch-redis",
            [*me, "watch-redis", "--url", stack.redis_url, "--prefix", prefix, "--out", str(files / "redis.json")],
            plain_env,
            work,
        )
        kafka_watch = MeasuredProcess(
            f"{name}-watch-kafka",
            [
                *me,
                "watch-kafka",
                "--bootstrap",
                stack.bootstrap,
                "--topic",
                topics.transitions,
                "--out",
                str(files / "kafka.json"),
            ],
            plain_env,
            work,
        )
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
        sender = MeasuredProcess(
            f"{name}-produce",
            [
                *me,
                "produce",
                "--bootstrap",
                stack.bootstrap,
                "--topic",
                topics.events,
                "--rate",
                str(rate),
                "--seconds",
                str(warmup_s + seconds),
                "--users",
                str(users),
                "--seed",
                str(seed),
                "--out",
                str(files / "sent.json"),
            ],
            plain_env,
            work,
        )
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
        newest_processed = join_latencies(
            result, committed, redis_seen["seen"], kafka_seen["seen"], window_start_ms, sent["ended"] * 1000
        )
        if newest_processed is not None:
            result.lag_at_end_of_load_s = max(0.0, sent["ended"] - newest_processed / 1000)
            if result.processing_rate is None:
                result.processing_rate = (
                    result.achieved_send_rate
                    * max(0.0, newest_processed / 1000 - sent["started"])
                    / (sent["ended"] - sent["started"])
                )
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


def join_latencies(
    result: LatencyResult,
    committed: dict[tuple[int, int], dict],
    redis_seen: list,
    kafka_seen: list,
    window_start_ms: float,
    window_end_ms: float,
) -> float | None:
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


def measure_checkpoint(
    stack: BenchStack,
    work: Path,
    config: str | None,
    users: int,
    settings: dict,
    checkpoint_interval_ms: int,
    stall_s: float,
) -> CheckpointResult:
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
                raise TimeoutError(
                    "no two completed checkpoints after the load within "
                    f"{max(120.0, 10 * checkpoint_interval_ms / 1000):.0f} s"
                )
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
        log(
            f"{name}: checkpoint with {users:,} users took {result.duration_s:.2f} s, state "
            f"{result.state_size_bytes:,} B"
        )
    except (RuntimeError, TimeoutError, OSError, ValueError, KeyError, IndexError) as err:
        result.error = str(err).splitlines()[0]
        log(f"{name}: {err}")
    finally:
        watcher.close()
        proc.stop()
        stack.redis_client().flushdb()
    return result
