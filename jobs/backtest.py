"""`segments backtest`: replays a recorded event log through the same engine-free core the job
runs, with no cluster, and reports what a definitions file would have done per segment.

Logs: JSONL (one UserEvent record per line, as `segments generate --jsonl` writes), an Avro
object container file of UserEvent records, or a Kafka topic range
(`kafka://HOST:PORT/TOPIC`, with optional start/end offsets or times). Events are validated as
the job validates them; the ones it would dead-letter are counted by reason and left out. For
definitions with experiments (`holdout(...)`) it also reports each arm's conversion
(jobs/experiment_report.py). Identify records (udfs/identity.py) fold the anonymous id's profile
into the known id's when they are replayed, as the job does once the fold has come back through
its feedback topic (docs/architecture.md, "Identity merge across keys").
"""

from __future__ import annotations

import heapq
import html
import json
import statistics
import sys
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlparse

from jobs import experiment_report
from jobs.experiment_report import ExperimentFigures
from jobs.kafka_security import PLAINTEXT, KafkaSecurity
from jobs.segment_warnings import FLAP_WINDOW_MS
from udfs.codec import DecodeError, SchemaCatalog
from udfs.definitions import DefinitionSet
from udfs.deployments import ControlRecord, DeployedEngine, DeploymentStatus, timeline_of
from udfs.events import UserEvent, event_from_record
from udfs.identity import Identify, identify_from_record, is_identify
from udfs.identity_replay import Erasure, IdentityReplay
from udfs.privacy import PrivacyState, UserRequest, request_from_record
from udfs.profile import UserProfile
from udfs.profile_config import DAY_MS, HOUR_MS, MINUTE_MS, SECOND_MS
from udfs.segmentation import Segmentation
from udfs.transitions import BURIED, DUPLICATE, LATE, WITHHELD, SegmentEngine, Transition

SIZE_SAMPLES = 120
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
FLUSH = 2**62  # "until the end of time": every pending timer, retention included, fires
CONVERSION_WINDOW_MS = 7 * DAY_MS  # an experiment's conversion: a purchase this long after entering


@dataclass
class EventLog:
    """Valid events in log order (per user, the order the job sees them) and what was left out,
    and the privacy requests (erasure, consent) of the requests topic, if one was read."""

    source: str
    events: list[UserEvent]
    rejected: Counter = field(default_factory=Counter)  # dead-letter reason -> count
    requests: list[UserRequest] = field(default_factory=list)
    # Identify records, each with the number of events before it in the log: it is replayed there.
    identifies: list[tuple[int, Identify]] = field(default_factory=list)

    @property
    def max_event_ms(self) -> int | None:
        return max((e.timestamp for e in self.events), default=None)


def _accept(records: Iterable[dict | DecodeError], source: str) -> EventLog:
    log = EventLog(source, [])
    for record in records:
        if isinstance(record, DecodeError):
            log.rejected[record.reason] += 1
            continue
        try:
            if is_identify(record):
                log.identifies.append((len(log.events), identify_from_record(record, sys.maxsize // 2, 0)))
            else:
                log.events.append(event_from_record(record, sys.maxsize // 2, 0))
        except DecodeError as err:
            log.rejected[err.reason] += 1
        except (KeyError, TypeError, ValueError):
            log.rejected["invalid_field"] += 1
    return log


def read_jsonl(path: Path) -> EventLog:
    def records() -> Iterator[dict | DecodeError]:
        with open(path, encoding="utf-8", errors="replace") as lines:
            for line in lines:
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    yield DecodeError("undecodable", "not JSON")
                    continue
                yield record if isinstance(record, dict) else DecodeError("undecodable", "not a JSON object")

    return _accept(records(), str(path))


def read_avro_file(path: Path) -> EventLog:
    import fastavro

    def records() -> Iterator[dict | DecodeError]:
        with open(path, "rb") as f:
            reader = fastavro.reader(f)
            if reader.writer_schema.get("name") not in ("UserEvent", "segments.v1.UserEvent"):
                raise ValueError(f"{path}: holds {reader.writer_schema.get('name')!r} records, not UserEvent")
            for record in reader:
                # fastavro turns timestamp-millis into datetimes; the core counts epoch milliseconds.
                if isinstance(record.get("timestamp"), datetime):
                    record["timestamp"] = (record["timestamp"] - EPOCH) // timedelta(milliseconds=1)
                yield record

    return _accept(records(), str(path))


def read_kafka_range(
    url: str,
    start: str | None = None,
    end: str | None = None,
    max_event_bytes: int | None = None,
    security: KafkaSecurity = PLAINTEXT,
) -> EventLog:
    """`kafka://HOST:PORT/TOPIC`, from `start` to `end` (exclusive) on every partition: each a
    plain offset (`1200`) or an event time (`t=1700000000000`, resolved with offsets_for_times);
    by default from the beginning to the end offsets at the time of reading."""
    return _accept(_kafka_records(url, "UserEvent", start, end, max_event_bytes, security), url)


def read_requests(
    url: str, start: str | None = None, end: str | None = None, security: KafkaSecurity = PLAINTEXT
) -> tuple[list[UserRequest], Counter]:
    """The privacy requests of a requests topic range (as read_kafka_range), and the invalid ones
    by dead-letter reason: the job would dead-letter those too."""
    requests: list[UserRequest] = []
    rejected: Counter = Counter()
    for record in _kafka_records(url, "UserRequest", start, end, None, security):
        try:
            if isinstance(record, DecodeError):
                raise record
            requests.append(request_from_record(record))
        except DecodeError as err:
            rejected[err.reason] += 1
    return requests, rejected


def _kafka_records(
    url: str,
    record_name: str,
    start: str | None,
    end: str | None,
    max_bytes: int | None,
    security: KafkaSecurity,
) -> Iterator[dict | DecodeError]:
    from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

    parsed = urlparse(url)
    topic = parsed.path.lstrip("/")
    if parsed.scheme != "kafka" or not parsed.netloc or not topic:
        raise ValueError(f"expected kafka://HOST:PORT/TOPIC, got {url!r}")
    consumer = Consumer(
        {
            "bootstrap.servers": parsed.netloc,
            "group.id": "segments-backtest",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "enable.partition.eof": True,
            **security.librdkafka_config(),
        }
    )
    codec = SchemaCatalog().codec(record_name, max_bytes)
    try:
        metadata = consumer.list_topics(topic, timeout=10).topics.get(topic)
        if metadata is None or metadata.error is not None:
            raise ValueError(f"topic {topic!r} not found on {parsed.netloc}")
        partitions = sorted(metadata.partitions)

        def resolve(bound: str | None, default: int) -> list[int]:
            if bound is None:
                return [default] * len(partitions)
            if bound.startswith("t="):
                wanted = [TopicPartition(topic, p, int(bound[2:])) for p in partitions]
                return [tp.offset for tp in consumer.offsets_for_times(wanted, timeout=10)]
            return [int(bound)] * len(partitions)

        starts = resolve(start, OFFSET_BEGINNING)
        ends = resolve(end, -1)  # -1: up to the end of the partition at the time of reading
        per_partition: dict[int, list[dict | DecodeError]] = {p: [] for p in partitions}
        # The end of a partition comes from the fetch responses (partition EOF): tansu 0.6's
        # ListOffsets answers 1 for the latest offset, so get_watermark_offsets cannot be used.
        open_partitions = {
            p for p, first, stop in zip(partitions, starts, ends, strict=True) if not (stop >= 0 and 0 <= stop <= first)
        }
        consumer.assign(
            [
                TopicPartition(topic, p, first)
                for p, first in zip(partitions, starts, strict=True)
                if p in open_partitions
            ]
        )
        stop_at = dict(zip(partitions, ends, strict=True))
        while open_partitions:
            msg = consumer.poll(30.0)
            if msg is None:
                raise TimeoutError(f"no records nor end of partition from {topic} for 30 s")
            p = msg.partition()
            if msg.error():
                if msg.error().code() == KafkaError._PARTITION_EOF:
                    open_partitions.discard(p)
                    continue
                raise KafkaException(msg.error())
            if p not in open_partitions:
                continue
            if 0 <= stop_at[p] <= msg.offset():
                open_partitions.discard(p)
                continue
            try:
                per_partition[p].append(codec.decode(msg.value()))
            except DecodeError as err:
                per_partition[p].append(err)
            if 0 <= stop_at[p] <= msg.offset() + 1:
                open_partitions.discard(p)
    finally:
        consumer.close()
    # The job reads the partitions side by side; a user's events are all on one partition, so
    # any interleaving gives the same transitions. Merge by time, as the job roughly sees them.
    return heapq.merge(*per_partition.values(), key=lambda r: 0 if isinstance(r, DecodeError) else r["timestamp"])


def read_events(
    source: str,
    start: str | None = None,
    end: str | None = None,
    max_event_bytes: int | None = None,
    security: KafkaSecurity = PLAINTEXT,
) -> EventLog:
    """`max_event_bytes` applies to Kafka records, which carry the job's Avro encoding; `security`
    to a Kafka source."""
    if source.startswith("kafka://"):
        return read_kafka_range(source, start, end, max_event_bytes, security)
    path = Path(source)
    if not path.exists():
        raise ValueError(f"{source}: no such file")
    with open(path, "rb") as f:
        magic = f.read(4)
    return read_avro_file(path) if magic == b"Obj\x01" else read_jsonl(path)


# -- replay ------------------------------------------------------------------------------------


def in_arrival_order(log: EventLog) -> Iterator[UserEvent | UserRequest]:
    """The log's events in log order with its requests placed among them by event time (a
    request after the events of the same instant): the order the job sees them when the
    requests topic is read as it is produced."""
    requests = sorted(log.requests, key=lambda r: r.timestamp)
    return heapq.merge(log.events, requests, key=lambda r: r.timestamp)


@dataclass
class SegmentReport:
    name: str
    entries: int = 0
    exits: int = 0
    final_size: int = 0
    peak_size: int = 0
    median_dwell_ms: float | None = None
    flaps: int = 0  # re-entries less than the flap window (default FLAP_WINDOW_MS) after an exit

    @property
    def flap_rate(self) -> float:
        return self.flaps / self.entries if self.entries else 0.0


@dataclass
class ProvisionalReport:
    """How long users stay provisional: a member of at least one provisional (cold-start) segment.
    A user's time is the sum of the spans in which they were (usually one, from the first event)."""

    users: int = 0  # provisional at some point
    left: int = 0  # of those, no longer provisional at the end
    still: int = 0  # provisional at the end (their time is not in the figures below)
    median_ms: float | None = None  # time provisional of the users who left
    p90_ms: float | None = None
    max_ms: int | None = None


@dataclass
class BacktestResult:
    definitions: DefinitionSet
    log_source: str
    until_ms: int
    events_applied: int
    duplicates: int
    late: int
    rejected: Counter
    users: int
    transitions: list[Transition]
    segments: dict[str, SegmentReport]
    sizes: dict[str, list[tuple[int, int]]]  # segment -> (time, members) samples
    final_members: dict[str, set[str]]
    overlap: dict[tuple[str, str], int]  # users in both at the end
    end_ms: int = 0  # where the sizes end: until_ms, or the last transition after a flush
    flap_window_ms: int = FLAP_WINDOW_MS
    experiments: dict[str, ExperimentFigures] = field(default_factory=dict)
    provisional: ProvisionalReport = field(default_factory=ProvisionalReport)
    log_requests: list[UserRequest] = field(default_factory=list)  # the privacy requests replayed
    buried: int = 0  # events older than their user's erasure, arriving after it: not applied
    withheld: int = 0  # events of users without consent to segmentation: not applied
    # With live deployments (udfs/deployments.py): what each control record was made of, and
    # the candidates' transitions (the job's shadow output).
    deployments: list[DeploymentStatus] = field(default_factory=list)
    shadow_transitions: list[Transition] = field(default_factory=list)
    erasures: list[Erasure] = field(default_factory=list)  # the job's audit records, fanned-out ones too


def run_backtest(
    segmentation: Segmentation | DefinitionSet,
    log: EventLog,
    until_ms: int | None = None,
    watermark_lag_ms: int = 5_000,
    allowed_lateness_ms: int = 60_000,
    progress: bool = False,
    flap_window_ms: int = FLAP_WINDOW_MS,
    conversion_window_ms: int = CONVERSION_WINDOW_MS,
    consent_default: bool = True,
    deployments: Sequence[ControlRecord] = (),
    models_dir: str | Path | None = None,
) -> BacktestResult:
    """Replays `log` as the job would: per user in log order, duplicates ignored, events the
    job would find too late (more than `allowed_lateness_ms` behind a watermark `watermark_lag_ms`
    behind the latest event time, as when the job's watermark keeps up) left out; then time
    passes up to `until_ms` (default: the watermark the job would reach at the end of the log).
    A re-entry less than `flap_window_ms` after the same user's exit counts as a flap.
    Experiments count a purchase within `conversion_window_ms` after entering as a conversion.
    `deployments` (control records, validated against `models_dir`, the job's models directory)
    switch versions at their instants as the job does (docs/deployments.md); the job's sweep
    timers need no replaying, since when a user is visited never changes a transition."""
    from tqdm import tqdm

    if isinstance(segmentation, DefinitionSet):
        segmentation = Segmentation(segmentation, None)
    definitions = segmentation.definitions
    engine: SegmentEngine | DeployedEngine = segmentation.engine()
    statuses: list[DeploymentStatus] = []
    if deployments:
        timeline = timeline_of(segmentation, deployments, definitions.catalog.config, models_dir)
        statuses = list(timeline.decided.values())
        engine = DeployedEngine(timeline)
    engine.consent_default = consent_default
    profiles: dict[str, UserProfile] = {}
    privacy: dict[str, PrivacyState] = {}
    transitions: list[Transition] = []
    shadow: list[Transition] = []
    duplicates = late = applied = buried = withheld = 0
    latest = None
    identities = IdentityReplay(engine, profiles, transitions, privacy, shadow)
    identifies = list(reversed(log.identifies))  # popped in log order

    def replay_identifies(before_position: int) -> None:
        nonlocal latest, late
        while identifies and identifies[-1][0] <= before_position:
            identify = identifies.pop()[1]
            latest = identify.timestamp if latest is None else max(latest, identify.timestamp)
            late += identities.identify(identify, latest - watermark_lag_ms - 1 - allowed_lateness_ms)

    bar = tqdm(
        in_arrival_order(log),
        desc=f"backtest {definitions.version}",
        unit="ev",
        disable=not progress,
        file=sys.stderr,
        smoothing=0.1,
        mininterval=0.2,
    )
    position = 0  # events replayed so far: identify records are placed between events
    for record in bar:
        latest = record.timestamp if latest is None else max(latest, record.timestamp)
        if isinstance(record, UserRequest):
            # The job's tombstone lasts its allowed lateness; so does this one. An erasure erases
            # the ids folded into the user too (the job's fan-out), and each erased id's alias.
            identities.request(record, allowed_lateness_ms)
        else:
            replay_identifies(position)
            position += 1
            routed = identities.route(record.user_id, record.timestamp)
            if routed is None:
                continue
            user_id = routed
            event = record if routed == record.user_id else replace(record, user_id=routed)
            profile = profiles.setdefault(user_id, UserProfile())
            state = privacy.setdefault(user_id, PrivacyState())
            step = engine.step_event(
                user_id, profile, event, latest - watermark_lag_ms - 1 - allowed_lateness_ms, state
            )
            if step.outcome == LATE:
                late += 1
            elif step.outcome == DUPLICATE:
                duplicates += 1
            elif step.outcome == BURIED:
                buried += 1
            elif step.outcome == WITHHELD:
                withheld += 1
            else:
                applied += 1
                transitions.extend(step.transitions)
                shadow.extend(step.shadow_transitions)
            if step.drop_state:  # e.g. a user whose only event was late has no profile
                profiles.pop(user_id, None)
    replay_identifies(position)  # those after the last event
    if until_ms is None:
        until_ms = (latest or 0) - watermark_lag_ms - 1
    for user_id, profile in profiles.items():
        state = privacy.setdefault(user_id, PrivacyState())  # a known id folded into has none yet
        step = engine.step_timer(user_id, profile, until_ms, state)
        transitions.extend(step.transitions)
        shadow.extend(step.shadow_transitions)
    result = _report(definitions, log, until_ms, applied, duplicates, late, profiles, transitions, flap_window_ms)
    result.log_requests, result.buried, result.withheld = log.requests, buried, withheld
    result.deployments, result.shadow_transitions = statuses, shadow
    result.erasures = identities.erasures
    result.rejected = log.rejected + identities.rejected
    result.experiments = experiment_report.experiment_figures(
        definitions, transitions, log.events, conversion_window_ms
    )
    return result


def transition_records(transitions: Iterable[Transition]) -> list[dict]:
    """The transitions as the contract's SegmentTransition records, grouped by user (a stable
    sort: each user's in the order the steps emitted them, which is the order the job emits them
    for that user). `emitted_at` is the transition's event time: a backtest has no wall-clock
    emit time, and so two runs over the same log write identical records where they agree."""
    return [t.to_record(t.event_time) for t in sorted(transitions, key=lambda t: t.user_id)]


def write_transitions(transitions: Iterable[Transition], path: Path) -> int:
    """Writes `transition_records` to `path`: an Avro object container file of SegmentTransition
    (the contract's current schema, deflate) when the name ends in `.avro`, else JSON lines (one
    record per line, keys sorted). Returns how many were written."""
    import fastavro

    records = transition_records(transitions)
    if path.suffix == ".avro":
        schema = fastavro.parse_schema(SchemaCatalog().current["SegmentTransition"])
        with open(path, "wb") as f:
            fastavro.writer(f, schema, records, codec="deflate")
    else:
        with open(path, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, sort_keys=True, allow_nan=False) + "\n")
    return len(records)


def _report(
    definitions, log, until_ms, applied, duplicates, late, profiles, transitions, flap_window_ms
) -> BacktestResult:
    names = list(definitions.names)
    extra = sorted({t.segment for t in transitions} - set(names))  # removed segments still exiting
    reports = {name: SegmentReport(name) for name in [*names, *extra]}
    ordered = _in_time_order(transitions)
    entered_at: dict[tuple[str, str], int] = {}
    exited_at: dict[tuple[str, str], int] = {}
    dwell: dict[str, list[int]] = {name: [] for name in reports}
    size = Counter()
    start = min((t.event_time for t in ordered), default=until_ms)
    end = max(until_ms if until_ms < FLUSH else 0, max((t.event_time for t in ordered), default=start))
    step = max(1, (end - start) // SIZE_SAMPLES)
    samples = [start + i * step for i in range(SIZE_SAMPLES + 1)]
    sizes: dict[str, list[tuple[int, int]]] = {name: [] for name in reports}
    i = 0
    for sample in samples:
        while i < len(ordered) and ordered[i].event_time <= sample:
            _count(ordered[i], reports, size, entered_at, exited_at, dwell, flap_window_ms)
            i += 1
        for name in reports:
            sizes[name].append((sample, size[name]))
    while i < len(ordered):
        _count(ordered[i], reports, size, entered_at, exited_at, dwell, flap_window_ms)
        i += 1
    final_members = {name: set() for name in reports}
    for user_id, profile in profiles.items():
        for name, m in profile.memberships.items():
            if m.member and name in final_members:
                final_members[name].add(user_id)
    for name, report in reports.items():
        report.final_size = len(final_members[name])
        report.median_dwell_ms = statistics.median(dwell[name]) if dwell[name] else None
    overlap = {}
    for a in reports:
        for b in reports:
            if a < b and final_members[a] and final_members[b]:
                both = len(final_members[a] & final_members[b])
                if both:
                    overlap[(a, b)] = both
    return BacktestResult(
        definitions,
        log.source,
        until_ms,
        applied,
        duplicates,
        late,
        log.rejected,
        len(profiles),
        transitions,
        reports,
        sizes,
        final_members,
        overlap,
        end,
        flap_window_ms,
        provisional=_provisional(ordered),
    )


def _provisional(ordered: list[Transition]) -> ProvisionalReport:
    """From the transitions in time order: each user's time in at least one provisional segment."""
    inside: Counter = Counter()  # user -> provisional segments they are in
    since: dict[str, int] = {}  # user -> when they became provisional (the current span)
    spent: Counter = Counter()  # user -> time provisional in the spans that ended
    for t in ordered:
        if not t.provisional:
            continue
        if t.kind == "ENTER":
            if inside[t.user_id] == 0:
                since[t.user_id] = t.event_time
            inside[t.user_id] += 1
        elif inside[t.user_id] > 0:
            inside[t.user_id] -= 1
            if inside[t.user_id] == 0:
                spent[t.user_id] += t.event_time - since.pop(t.user_id)
    still = len(since)
    left = sorted(spent[user] for user in spent if user not in since)
    report = ProvisionalReport(users=len(spent.keys() | since.keys()), left=len(left), still=still)
    if left:
        report.median_ms = statistics.median(left)
        report.p90_ms = statistics.quantiles(left, n=10, method="inclusive")[-1] if len(left) > 1 else left[0]
        report.max_ms = left[-1]
    return report


def _in_time_order(transitions: list[Transition]) -> list[Transition]:
    """By event time; at one instant the exits of stays that began earlier come first (so the
    sizes never count a user who leaves at T and one who enters at T together), then the rest in
    the order each user's steps produced them (a stay that begins and ends at T is an ENTER then
    an EXIT: it counts once in the peak, with a dwell of 0). Re-sorting every transition by
    (time, exits first) instead broke each user's own order at a shared instant."""
    began: dict[tuple[str, str], int] = {}
    ranked = []
    for t in transitions:  # each user's transitions are in the order their steps produced them
        key = (t.user_id, t.segment)
        if t.kind == "ENTER":
            began[key] = t.event_time
            rank = 1
        else:
            rank = 0 if began.pop(key, t.event_time - 1) < t.event_time else 1
        ranked.append((t.event_time, rank, t))
    ranked.sort(key=lambda e: (e[0], e[1]))  # stable: same instant and rank keep the produced order
    return [t for _, _, t in ranked]


def _count(t: Transition, reports, size, entered_at, exited_at, dwell, flap_window_ms) -> None:
    report, key = reports[t.segment], (t.user_id, t.segment)
    if t.kind == "ENTER":
        report.entries += 1
        size[t.segment] += 1
        report.peak_size = max(report.peak_size, size[t.segment])
        left = exited_at.get(key)
        if left is not None and t.event_time - left < flap_window_ms:
            report.flaps += 1
        entered_at[key] = t.event_time
    else:
        report.exits += 1
        size[t.segment] -= 1
        exited_at[key] = t.event_time
        if key in entered_at:
            dwell[t.segment].append(t.event_time - entered_at.pop(key))


# -- comparing two versions ----------------------------------------------------------------------


@dataclass
class SegmentDiff:
    name: str
    entries: tuple[int | None, int | None]
    final_size: tuple[int | None, int | None]
    only_in_base: int  # members at the end under the base version only
    only_in_other: int
    transitions_differing: int


def compare(base: BacktestResult, other: BacktestResult) -> list[SegmentDiff]:
    def keyed(result: BacktestResult, name: str) -> set:
        return {(t.user_id, t.kind, t.event_time) for t in result.transitions if t.segment == name}

    out = []
    for name in sorted(set(base.segments) | set(other.segments)):
        a, b = base.segments.get(name), other.segments.get(name)
        ma, mb = base.final_members.get(name, set()), other.final_members.get(name, set())
        out.append(
            SegmentDiff(
                name,
                (a.entries if a else None, b.entries if b else None),
                (a.final_size if a else None, b.final_size if b else None),
                len(ma - mb),
                len(mb - ma),
                len(keyed(base, name) ^ keyed(other, name)),
            )
        )
    return out


# -- output --------------------------------------------------------------------------------------


def _duration(ms: float | None) -> str:
    if ms is None:
        return "-"
    for unit, size in (("d", DAY_MS), ("h", HOUR_MS), ("m", MINUTE_MS), ("s", SECOND_MS)):
        if ms >= size:
            return f"{ms / size:.1f}{unit}"
    return f"{ms:.0f}ms"


def summary_lines(result: BacktestResult) -> list[str]:
    d = result.definitions
    rejected = ", ".join(f"{k} {v}" for k, v in sorted(result.rejected.items())) or "none"
    lines = [
        f"definitions {d.source} version {d.version} (sha256 {d.sha256[:12]})",
        f"events {result.log_source}: {result.events_applied} applied, {result.duplicates} duplicates, "
        f"{result.late} too late, rejected: {rejected}; {result.users} users; until {result.until_ms}",
        *(
            [
                f"privacy: {len(result.log_requests)} requests; {result.buried} events older than their user's "
                f"erasure, {result.withheld} without consent to segmentation, not applied"
            ]
            if result.log_requests or result.withheld
            else []
        ),
        f"{'segment':28} {'entries':>8} {'exits':>8} {'final':>7} {'peak':>7} {'med dwell':>10} {'flap rate':>9}",
    ]
    for r in result.segments.values():
        lines.append(
            f"{r.name:28} {r.entries:8d} {r.exits:8d} {r.final_size:7d} {r.peak_size:7d} "
            f"{_duration(r.median_dwell_ms):>10} {r.flap_rate:9.3f}"
        )
    p = result.provisional
    if p.users:
        lines.append(
            f"provisional (cold start): {p.users} users; {p.left} left after a median {_duration(p.median_ms)}, "
            f"p90 {_duration(p.p90_ms)}, max {_duration(p.max_ms)}; {p.still} still provisional at the end"
        )
    if result.overlap:
        lines.append("overlap at the end (users in both):")
        for (a, b), n in sorted(result.overlap.items(), key=lambda e: -e[1])[:15]:
            lines.append(f"  {a} & {b}: {n}")
    if result.experiments:
        window = _duration(next(iter(result.experiments.values())).window_ms)
        lines += ["", *experiment_report.text_lines(result.experiments, window)]
    return lines


def diff_lines(base: BacktestResult, other: BacktestResult, diffs: list[SegmentDiff]) -> list[str]:
    lines = [
        f"diff: {base.definitions.version} -> {other.definitions.version}",
        f"{'segment':28} {'entries':>15} {'final size':>15} {'only old':>9} {'only new':>9} {'changed':>8}",
    ]
    for d in diffs:
        lines.append(
            f"{d.name:28} {_pair(d.entries):>15} {_pair(d.final_size):>15} {d.only_in_base:9d} "
            f"{d.only_in_other:9d} {d.transitions_differing:8d}"
        )
    return lines


def _pair(values) -> str:
    return " -> ".join("-" if v is None else str(v) for v in values)


def as_json(
    result: BacktestResult,
    diffs: list[SegmentDiff] | None = None,
    warnings: list | None = None,
    compared_warnings: list | None = None,
) -> dict:
    """The figures; `warnings` (jobs.segment_warnings.BehaviourWarning) of the run and of the
    compared run, when given."""
    return {
        "definitions": {
            "source": result.definitions.source,
            "version": result.definitions.version,
            "sha256": result.definitions.sha256,
        },
        "events": {
            "source": result.log_source,
            "applied": result.events_applied,
            "duplicates": result.duplicates,
            "late": result.late,
            "rejected": dict(result.rejected),
            "users": result.users,
        },
        "until_ms": result.until_ms,
        "segments": {
            name: {
                "entries": r.entries,
                "exits": r.exits,
                "final_size": r.final_size,
                "peak_size": r.peak_size,
                "median_dwell_ms": r.median_dwell_ms,
                "flap_rate": r.flap_rate,
                "sizes": result.sizes[name],
            }
            for name, r in result.segments.items()
        },
        "overlap": [{"a": a, "b": b, "users": n} for (a, b), n in sorted(result.overlap.items())],
        "experiments": experiment_report.as_json(result.experiments),
        "provisional": result.provisional.__dict__,
        "diff": [d.__dict__ for d in diffs] if diffs is not None else None,
        "warnings": [w.as_json() for w in warnings] if warnings is not None else None,
        "compared_warnings": [w.as_json() for w in compared_warnings] if compared_warnings is not None else None,
    }


_COLOURS = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)


def _svg_chart(result: BacktestResult, width: int = 900, height: int = 320) -> str:
    series = {n: s for n, s in result.sizes.items() if any(v for _, v in s)}
    if not series:
        return "<p>No segment had members.</p>"
    t0 = min(t for s in series.values() for t, _ in s)
    t1 = max(t for s in series.values() for t, _ in s)
    top = max(v for s in series.values() for _, v in s) or 1
    pad = 40

    def x(t):
        return pad + (t - t0) / max(1, t1 - t0) * (width - 2 * pad)

    def y(v):
        return height - pad - v / top * (height - 2 * pad)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height + 20 * len(series)}" '
        'font-family="sans-serif" font-size="12">',
        f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="#444"/>',
        f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="#444"/>',
        f'<text x="{pad}" y="{pad - 8}">members (max {top})</text>',
        f'<text x="{width - pad}" y="{height - pad + 16}" text-anchor="end">event time, '
        f"{_duration(t1 - t0)} span</text>",
    ]
    for i, (name, samples) in enumerate(series.items()):
        colour = _COLOURS[i % len(_COLOURS)]
        points = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in samples)
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{points}"/>')
        parts.append(f'<text x="{pad}" y="{height + 14 + 20 * i}" fill="{colour}">{html.escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def html_report(
    result: BacktestResult,
    other: BacktestResult | None = None,
    diffs: list[SegmentDiff] | None = None,
    warnings: list | None = None,
) -> str:
    esc = html.escape
    d = result.definitions
    rows = "".join(
        f"<tr><td>{esc(r.name)}</td><td>{r.entries}</td><td>{r.exits}</td><td>{r.final_size}</td>"
        f"<td>{r.peak_size}</td><td>{_duration(r.median_dwell_ms)}</td><td>{r.flap_rate:.3f}</td></tr>"
        for r in result.segments.values()
    )
    overlap = "".join(
        f"<tr><td>{esc(a)}</td><td>{esc(b)}</td><td>{n}</td></tr>"
        for (a, b), n in sorted(result.overlap.items(), key=lambda e: -e[1])
    )
    body = [
        f"<h1>Backtest of {esc(d.version)}</h1>",
        f"<p>{esc(d.source)} (sha256 {d.sha256[:12]}) over {esc(result.log_source)}: "
        f"{result.events_applied} events applied, {result.duplicates} duplicates, {result.late} too late, "
        f"{sum(result.rejected.values())} rejected; {result.users} users.</p>",
        "<h2>Segment size over event time</h2>",
        _svg_chart(result),
        "<h2>Per segment</h2><table><tr><th>segment</th><th>entries</th><th>exits</th><th>final</th>"
        f"<th>peak</th><th>median dwell</th><th>flap rate</th></tr>{rows}</table>",
        f"<h2>Overlap at the end</h2><table><tr><th>a</th><th>b</th><th>users in both</th></tr>{overlap}</table>",
    ]
    if warnings:
        body.insert(2, "<h2>Warnings</h2><ul>" + "".join(f"<li>{esc(w.message)}</li>" for w in warnings) + "</ul>")
    if result.experiments:
        window = _duration(next(iter(result.experiments.values())).window_ms)
        table = "\n".join(experiment_report.text_lines(result.experiments, window))
        body.append(f"<h2>Experiments</h2><pre>{esc(table)}</pre>")
    if other is not None and diffs is not None:
        diff_rows = "".join(
            f"<tr><td>{esc(x.name)}</td><td>{_pair(x.entries)}</td><td>{_pair(x.final_size)}</td>"
            f"<td>{x.only_in_base}</td><td>{x.only_in_other}</td><td>{x.transitions_differing}</td></tr>"
            for x in diffs
        )
        body += [
            f"<h2>Diff: {esc(d.version)} → {esc(other.definitions.version)}</h2>",
            "<table><tr><th>segment</th><th>entries</th><th>final size</th><th>only old</th><th>only new</th>"
            f"<th>transitions changed</th></tr>{diff_rows}</table>",
            f"<h3>{esc(other.definitions.version)}: segment size over event time</h3>",
            _svg_chart(other),
        ]
    style = (
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}td:first-child{text-align:left}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>Backtest {esc(d.version)}</title>"
        f"<style>{style}</style></head><body>{''.join(body)}</body></html>"
    )
