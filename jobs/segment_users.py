"""The segmentation job: Kafka events -> decode -> per-user profile and segments -> transitions to
Kafka (exactly-once) and Redis. The PyFlink classes here only translate between Flink's lifecycle
and the engine-free core in `udfs/`.

`build_pipeline` wires the logic on a stream of raw records and returns the output streams; only
`attach_connectors` and `main` touch Kafka and Redis, so tests can feed `from_collection`.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections import OrderedDict
from dataclasses import dataclass

from pyflink.common import Duration, Types, WatermarkStrategy
from pyflink.datastream import (
    DataStream,
    KeyedBroadcastProcessFunction,
    KeyedProcessFunction,
    RuntimeContext,
    StreamExecutionEnvironment,
)
from pyflink.datastream.state import ValueStateDescriptor
from pyflink.table import StreamTableEnvironment
from pyflink.table.expressions import col

import udfs
from jobs.deployment_operator import DECISIONS, control_decisions, control_source, job_models
from jobs.deployment_stream import BroadcastTimeline
from jobs.flink_environment import create_environment
from jobs.identity_feedback import fold_of, fold_record, forwarded_record, hops_of
from jobs.kafka_tables import kafka_table_ddl
from jobs.settings import JobSettings, load_settings
from jobs.shipped_files import ShippedFiles
from jobs.step_outputs import ERASURE_AUDIT, IDENTITY_FEEDBACK, SHADOW_TRANSITION, StepOutputs
from udfs.codec import HEADER_SIZE, MAGIC, DecodeError, SchemaCatalog
from udfs.events import MIN_EVENT_TIME_MS, event_from_record
from udfs.identity import MAX_ALIAS_HOPS, Alias, forward_target, identify_from_record, is_identify
from udfs.latency import LatencyHistogram
from udfs.privacy import (
    ERASED_ALIAS,
    PrivacyState,
    UserRequest,
    decode_privacy,
    encode_privacy,
    request_from_record,
    user_hash,
)
from udfs.profile import UserProfile
from udfs.redis_layout import ERASE_VIEW_KIND
from udfs.segmentation import Segmentation
from udfs.state import ProfileStateCodec
from udfs.transition_avro import TransitionWriter
from udfs.transitions import BURIED, DUPLICATE, ERASED, LATE, WITHHELD, Step

log = logging.getLogger("segments.job")

BYTES = Types.PRIMITIVE_ARRAY(Types.BYTE())
RAW_RECORD = Types.ROW_NAMED(
    ["payload", "src_topic", "src_partition", "src_offset"],
    [BYTES, Types.STRING(), Types.INT(), Types.LONG()],
)
# What the keyed function gets: the record with the user id and event time that the Java keying
# operator read from it (infra/java, segments.events.UserEventKeys; event_time Long.MIN_VALUE when
# unknown), and KEYED_EVENT, the (key, record) rows PyFlink's key_by hands a keyed function.
RAW_EVENT = Types.ROW_NAMED(
    ["user_id", "event_time", "payload", "src_topic", "src_partition", "src_offset"],
    [Types.STRING(), Types.LONG(), BYTES, Types.STRING(), Types.INT(), Types.LONG()],
)
KEYED_EVENT = Types.ROW([Types.STRING(), RAW_EVENT])
USER_EVENT_KEYS_CLASS = "segments.events.UserEventKeys"
KEYED_RECORD = Types.ROW_NAMED(["key", "payload"], [Types.STRING(), BYTES])
# The Kafka sink takes user_id and payload; the Redis view's sink the rest (infra/java
# RedisViewWriter reads the rule at index 6). kind is ENTER, EXIT or ERASE_VIEW_KIND: an erasure
# marker, for the Redis view only.
TRANSITION_RECORD = Types.ROW_NAMED(
    ["user_id", "segment", "kind", "sequence", "event_time", "payload", "rule"],
    [Types.STRING(), Types.STRING(), Types.STRING(), Types.LONG(), Types.LONG(), BYTES, Types.STRING()],
)
# The side outputs of the Java operator that splits each step's outputs (jobs/step_outputs.py):
# dead letters (undecodable, invalid and late events), folds and forwarded events for another key
# (to the identity feedback topic, jobs/identity_feedback.py), one ErasureAudit record per erasure
# keyed by the user id's hash (docs/privacy.md); in step_outputs.KEYED_KINDS order.
# A candidate in shadow's transitions go to the shadow topic (docs/deployments.md).
KEYED_OUTPUTS = ("dead-letters", "identity-feedback", "erasure-audit", "shadow-transitions")
# The dead-letter reason of an event older than its user's erasure (dead-lettered without its
# payload: what it held is what was erased).
ERASED_USER = "erased_user"
# The dead-letter reason of a stored profile the job could not read (keyed by the user, the raw
# state as the payload); the user starts afresh.
QUARANTINED_STATE = "quarantined_state"
# A user's state after every event (with its id) and timer (id None), when the settings enable it.
PROFILE_SNAPSHOT = Types.ROW_NAMED(["user_id", "cause_event_id", "payload"], [Types.STRING(), Types.STRING(), BYTES])
PROFILE_SNAPSHOTS = "profile-snapshots"
SPLIT_STEP_OUTPUTS_CLASS = "segments.steps.SplitStepOutputs"


@dataclass(frozen=True)
class Operator:
    name: str
    uid: str


# Stable uids: savepoints map state to operators by these; never change one without a migration.
DECODE = Operator("Decode user events", "decode-user-events")  # reads key and time; the keyed function checks
DECODE_REQUESTS = Operator("Decode user requests", "decode-user-requests")  # the same, of privacy requests
EVENT_TIME = Operator("Event time and watermarks", "event-time-watermarks")
# The identity feedback topic's records, keyed and timed like the events (idle most of the time).
DECODE_FEEDBACK = Operator("Decode identity feedback", "decode-identity-feedback")
FEEDBACK_TIME = Operator("Identity feedback event time", "identity-feedback-event-time")
# How long the feedback topic may be silent before its watermark stops holding the events' back.
FEEDBACK_IDLE_MS = 1_000
SEGMENT = Operator("Segment users", "segment-users")
SPLIT = Operator("Split step outputs", "split-step-outputs")
# The Redis view's two-phase-commit sink (its writer and committer; jobs/redis_sink.py).
REDIS_VIEW = Operator("Redis view", "redis-view")
PROFILE_STATE = "user-profile-bytes"
# Where the releases before 2026-12-08 kept the profile, as latin-1 text: read when a user has no
# PROFILE_STATE yet, cleared, and written as bytes at that step.
TEXT_PROFILE_STATE = "user-profile"
PRIVACY_STATE = "user-privacy"  # udfs/privacy.PrivacyState, when settings.privacy_requests
# An anonymous id merged into a known one: "known id" + US + "until (ms)" (udfs/identity.Alias).
ALIAS_STATE = "identity-alias"
ALIAS_SEPARATOR = "\x1f"


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def dead_letter_row(
    dlq_codec, payload, topic, partition, offset, reason, message, max_bytes, key=None
) -> tuple[str | None, bytes]:
    """A dead letter as (key, DeadLetter record)."""
    if payload is not None and len(payload) > max_bytes:
        message = f"{message}; payload truncated to its first {max_bytes} bytes"
        payload = payload[:max_bytes]
    record = {
        "payload": bytes(payload or b""),
        "source_topic": topic or "",
        "source_partition": -1 if partition is None else partition,
        "source_offset": -1 if offset is None else offset,
        "reason": reason,
        "message": message,
        "detected_at": now_ms(),
    }
    return key, dlq_codec.encode(record)


class LatencyMetrics:
    """A latency histogram's p50, p99 and max as metrics, pushed from the operator's own thread at
    most once a second. Why not PyFlink gauges: in thread mode a gauge is a Python callable that
    Flink's metric thread calls into the embedded interpreter, and on the standalone cluster that
    crashed the TaskManager (SIGSEGV in _PyEvalFramePushAndInit on thread flink-metrics, seen
    under the fault suite). A distribution metric keeps its value on the Java side."""

    def __init__(self, metrics, prefix: str, histogram: LatencyHistogram):
        self.histogram = histogram
        self.p50 = metrics.distribution(f"{prefix}_p50_us")
        self.p99 = metrics.distribution(f"{prefix}_p99_us")
        self.max = metrics.distribution(f"{prefix}_max_us")
        self.published_at = 0.0

    def maybe_publish(self) -> None:
        now = time.monotonic()
        if now - self.published_at >= 1.0:
            self.published_at = now
            self.p50.update(int(self.histogram.percentile(0.5)))
            self.p99.update(int(self.histogram.percentile(0.99)))
            self.max.update(int(self.histogram.max_us))


class SegmentUsers(KeyedProcessFunction):
    """Holds each user's profile and emits a transition whenever a membership changes, on an
    event or when event time passes a point where a condition lapses (one timer per user, which
    is also the cleanup timer: when the retention runs out the user exits and the state goes)."""

    def __init__(self, settings: JobSettings, segmentation: Segmentation):
        self.allowed_lateness_ms = settings.allowed_lateness_ms
        self.max_event_bytes = settings.max_event_bytes
        self.max_future_ms = settings.max_future_ms
        # The definitions travel as the file's text (checked on the client before submission)
        # and are compiled again in open(): compiled closures are not shipped.
        self.definitions_text = segmentation.definitions.text
        self.definitions_source = segmentation.definitions.source
        # Schemas and the models the definitions read, by value (see ShippedFiles); with live
        # deployments every model of the directory (a deployment may read any of them).
        self.control_topic = settings.control_topic
        self.deployment_sweep_ms = settings.deployment_sweep_ms
        models = job_models(settings.models_dir) if self.control_topic else segmentation.definitions.models
        self.files = ShippedFiles.of_job(settings.models_dir, models)
        self.profile_config = settings.profile
        self.emit_profile_snapshots = settings.emit_profile_snapshots
        self.profile_cache_users = settings.profile_cache_users
        self.privacy_requests = settings.privacy_requests
        self.requests_topic = settings.requests_topic
        self.consent_default = settings.consent_default == "granted"
        self.identity_topic = settings.identity_topic

    def open(self, runtime_context: RuntimeContext):
        self.files_dir = self.files.materialize()
        catalog = SchemaCatalog(self.files_dir / "schemas")
        self.events = catalog.codec("UserEvent", max_bytes=self.max_event_bytes)
        self.feedback = catalog.codec("UserEvent")  # a fold carries a whole profile: no event's cap
        self.transitions = catalog.codec("SegmentTransition")
        self.transition_writer = TransitionWriter(catalog.current["SegmentTransition"])
        self.dead_letters = catalog.codec("DeadLetter")
        self.state_codec = ProfileStateCodec(catalog.codec("UserProfileState"))
        # Models verified again where they run (file hashes, this worker's feature code, golden
        # sets): a worker whose code or files differ from the client's stops here.
        startup = Segmentation.from_text(
            self.definitions_text, self.definitions_source, self.profile_config, self.files_dir / "models"
        )
        self.engine = startup.engine()
        self.engine.consent_default = self.consent_default
        # Live deployments: the timeline rebuilt from broadcast state when first needed
        # (DeployedSegmentUsers); its DeployedEngine then takes the steps.
        self.deployments = (
            BroadcastTimeline(
                startup, self.profile_config, self.files_dir / "models", self.deployment_sweep_ms, self.consent_default
            )
            if self.control_topic
            else None
        )
        self.requests = catalog.codec("UserRequest", max_bytes=self.max_event_bytes)
        # The headers of the UserRequest versions: on the feedback topic, the erasure of an id
        # folded into an erased user (the rest there are UserEvent records).
        self.request_headers = frozenset(
            MAGIC + fp for fp, known in catalog.by_fingerprint.items() if known.full_name == self.requests.full_name
        )
        self.audit = catalog.codec("ErasureAudit")
        log.info("segment users: the core runs %s", udfs.CORE)
        # Bytes through PyFlink's pickled-bytes type (the value in state is the pickle of one
        # bytes object): written in less than half the time of the same bytes as latin-1 text,
        # which PyFlink passes to Java as a string and Flink serialises char by char
        # (docs/architecture.md, "Profile state"). A primitive byte array is no option: PyFlink's
        # thread mode turns it into a tuple of ints, one per byte, and fails on an empty one.
        self.profile_state = runtime_context.get_state(ValueStateDescriptor(PROFILE_STATE, Types.PICKLED_BYTE_ARRAY()))
        self.text_profile_state = runtime_context.get_state(ValueStateDescriptor(TEXT_PROFILE_STATE, Types.STRING()))
        self.alias_state = runtime_context.get_state(ValueStateDescriptor(ALIAS_STATE, Types.STRING()))
        self.retention_ms = self.engine.config.retention_ms
        # Decoded profiles of recently seen users, written through to the state on every change.
        # This instance is the only writer of its keys' state, and a restore or rescale builds a
        # new instance, so an entry can never be stale; it only saves the decode.
        self.profile_cache: OrderedDict[str, UserProfile] = OrderedDict()
        # The users' privacy records, the same way (only with settings.privacy_requests).
        self.privacy_state = runtime_context.get_state(ValueStateDescriptor(PRIVACY_STATE, Types.STRING()))
        self.privacy_cache: OrderedDict[str, PrivacyState] = OrderedDict()
        metrics = runtime_context.get_metrics_group()
        self.dead_letters_out = metrics.counter("dead_letters")
        self.late_events = metrics.counter("late_events")
        self.duplicate_events = metrics.counter("duplicate_events")
        self.profiles_expired = metrics.counter("profiles_expired")
        self.profiles_quarantined = metrics.counter("profiles_quarantined")
        self.identity_merges = metrics.counter("identity_merges")
        self.identity_forwards = metrics.counter("identity_forwards")
        self.scoring_skipped = metrics.counter("scoring_skipped")
        self.scores_out_of_range = metrics.counter("scores_out_of_range")
        self.users_erased = metrics.counter("users_erased")
        self.consent_changes = metrics.counter("consent_changes")
        self.buried_events = metrics.counter("erased_user_events")
        self.withheld_events = metrics.counter("consent_withheld_events")
        scorer = self.engine.scorer
        self.inference_latency = (
            None if scorer is None else LatencyMetrics(metrics, "inference_latency", scorer.stats.latency)
        )

    def process_element(self, value, ctx: KeyedProcessFunction.Context):
        out = StepOutputs()
        self._process_event(value, ctx, out)
        return (out.frame(),) if out.parts else ()

    def on_timer(self, timestamp: int, ctx: KeyedProcessFunction.OnTimerContext):
        out = StepOutputs()
        self._process_timer(timestamp, ctx, out)
        return (out.frame(),) if out.parts else ()

    def _process_event(self, value, ctx: KeyedProcessFunction.Context, out: StepOutputs) -> None:
        user_id, payload = value[0], value[2]
        if self.requests_topic and value[3] == self.requests_topic:
            self._process_request(value, ctx, out)
            return
        fed_back = bool(self.identity_topic) and value[3] == self.identity_topic
        if fed_back and bytes(payload[:HEADER_SIZE]) in self.request_headers:
            self._process_request(value, ctx, out)
            return
        try:
            record = (self.feedback if fed_back else self.events).decode(payload)
            if record.get("user_id") != user_id:  # the Java keying could not read it the way Avro does
                raise DecodeError("undecodable", "user_id could not be read as UTF-8 ahead of the decode")
            if is_identify(record):
                if not self.identity_topic:
                    raise DecodeError("identity_merge_off", "an identify record, and no identity_topic is set")
                if fed_back:
                    self._fold_in(ctx, user_id, record, value, out)
                else:
                    identify = identify_from_record(record, now_ms(), self.max_future_ms)
                    self._fold_out(ctx, user_id, identify, value, out)
                return
            event = event_from_record(record, now_ms(), self.max_future_ms)
        except DecodeError as err:
            self.dead_letters_out.inc()
            out.dead_letter(self._dead_letter(value, err.reason, err.message))
            return
        late_before = ctx.timer_service().current_watermark() - self.allowed_lateness_ms
        if not fed_back and event.timestamp < late_before:  # a fed-back event was checked where it was sent
            if self.privacy_requests and self._load_privacy(user_id).buries(event.timestamp):
                out.dead_letter(self._buried(value))  # late too, but its payload must not be kept
                return
            self.late_events.inc()
            out.dead_letter(
                self._dead_letter(
                    value,
                    "late",
                    f"event time {event.timestamp} is more than {self.allowed_lateness_ms} ms behind "
                    f"the watermark {late_before + self.allowed_lateness_ms}",
                ),
            )
            return
        alias = self._alias()
        if alias is not None:
            target = forward_target(alias, event.timestamp, self.retention_ms)
            if target is not None:
                hops = hops_of(event) + 1
                if hops > MAX_ALIAS_HOPS:
                    self.dead_letters_out.inc()
                    out.dead_letter(self._dead_letter(value, "identity_loop", "the aliases of the ids form a loop"))
                    return
                self._store_alias(ctx, alias)
                self.identity_forwards.inc()
                out.keyed(IDENTITY_FEEDBACK, target, self.feedback.encode(forwarded_record(event, target, hops)))
                return
            self.alias_state.clear()  # it ran out: the id is its own again
        profile, quarantined = self._load_profile(user_id)
        if quarantined is not None:
            out.dead_letter(quarantined)
        privacy = self._load_privacy(user_id) if self.privacy_requests else None
        step = self.engine.step_event(user_id, profile, event, privacy=privacy)
        if step.outcome == DUPLICATE:
            self.duplicate_events.inc()
            return
        if step.outcome == BURIED:
            out.dead_letter(self._buried(value))
            return
        if step.outcome == WITHHELD:  # no consent to segmentation: nothing of the event is kept
            self.withheld_events.inc()
            return
        if self.inference_latency is not None:
            self.inference_latency.maybe_publish()
        self._commit(ctx, user_id, profile, step, event.event_id, out)

    def _buried(self, value) -> tuple[str | None, bytes]:
        """The dead letter of an event older than its user's erasure: where it was, not what."""
        self.buried_events.inc()
        return dead_letter_row(
            self.dead_letters,
            b"",
            value[3],
            value[4],
            value[5],
            ERASED_USER,
            "event time before its user's erasure: not applied (payload not kept)",
            self.max_event_bytes,
        )

    def _fold_out(self, ctx, user_id: str, identify, value, out: StepOutputs) -> None:
        """An identify at the anonymous id: EXIT, hand the profile to the known id through the
        feedback topic, keep the alias (docs/architecture.md, "Identity merge across keys")."""
        alias = self._alias()
        if alias is not None and identify.timestamp < alias.until_ms:
            if alias.known_id != identify.known_id:
                self.dead_letters_out.inc()
                out.dead_letter(self._dead_letter(value, "identity_conflict", "the id is merged into another user"))
            return  # a resent identify: the merge is done
        late_before = ctx.timer_service().current_watermark() - self.allowed_lateness_ms
        profile, quarantined = self._load_profile(user_id)
        if quarantined is not None:
            out.dead_letter(quarantined)
        fold = self.engine.step_fold_out(user_id, profile, identify, late_before)
        if fold.step.outcome == LATE:
            self.late_events.inc()
            out.dead_letter(self._dead_letter(value, "late", "the identify is behind the watermark"))
            return
        self._store_alias(ctx, Alias(identify.known_id, identify.timestamp + self.retention_ms))
        self._commit(ctx, user_id, profile, fold.step, identify.event_id, out)
        if fold.folded is not None:
            self.identity_merges.inc()
            record = fold_record(
                identify.event_id,
                identify.timestamp,
                user_id,
                identify.known_id,
                0,
                self.state_codec.encode(fold.folded),
            )
            out.keyed(IDENTITY_FEEDBACK, identify.known_id, self.feedback.encode(record))

    def _fold_in(self, ctx, user_id: str, record: dict, value, out: StepOutputs) -> None:
        """A fold from the feedback topic: merge it here, or pass it along this id's alias."""
        try:
            fold = fold_of(record)
            folded = self.state_codec.decode(fold.profile_bytes)
        except (KeyError, ValueError) as err:
            raise DecodeError("undecodable", f"identity fold: {type(err).__name__}") from None
        alias = self._alias()
        if alias is not None and fold.timestamp < alias.until_ms:
            if alias.known_id != fold.source_id:  # this id went elsewhere: the profile follows
                if fold.hops + 1 > MAX_ALIAS_HOPS:
                    self.dead_letters_out.inc()
                    out.dead_letter(self._dead_letter(value, "identity_loop", "the aliases of the ids form a loop"))
                    return
                forwarded = fold_record(
                    fold.identify_event_id,
                    fold.timestamp,
                    user_id,
                    alias.known_id,
                    fold.hops + 1,
                    fold.profile_bytes,
                )
                out.keyed(IDENTITY_FEEDBACK, alias.known_id, self.feedback.encode(forwarded))
                return
            self.alias_state.clear()  # the fold comes back from where this id went: it takes it in
        profile, quarantined = self._load_profile(user_id)
        if quarantined is not None:
            out.dead_letter(quarantined)
        privacy = self._load_privacy(user_id) if self.privacy_requests else None
        step = self.engine.step_fold_in(user_id, profile, folded, fold.identify_event_id, privacy, fold.source_id)
        if step.outcome == DUPLICATE:
            self.duplicate_events.inc()
            return
        if privacy is not None:  # it remembers the id folded in, which this user's erasure erases too
            self._store_privacy(user_id, privacy)
        if step.outcome in (BURIED, WITHHELD):  # older than the known user's erasure, or no consent: not kept
            (self.buried_events if step.outcome == BURIED else self.withheld_events).inc()
            if step.register_timer_ms is not None:  # when the folded id is to be forgotten
                ctx.timer_service().register_event_time_timer(step.register_timer_ms)
            return
        self._commit(ctx, user_id, profile, step, fold.identify_event_id, out)

    def _alias(self) -> Alias | None:
        if not self.identity_topic:  # no merges: no alias to read (a state read per event and timer)
            return None
        stored = self.alias_state.value()
        if stored is None:
            return None
        known_id, until = stored.rsplit(ALIAS_SEPARATOR, 1)
        return Alias(known_id, int(until))

    def _store_alias(self, ctx, alias: Alias) -> None:
        """Kept, and cleared by a timer at its end (on_timer) if nothing extends it."""
        self.alias_state.update(f"{alias.known_id}{ALIAS_SEPARATOR}{alias.until_ms}")
        ctx.timer_service().register_event_time_timer(alias.until_ms)

    def _dead_letter(self, value, reason: str, message: str) -> tuple[str | None, bytes]:
        return dead_letter_row(
            self.dead_letters, value[2], value[3], value[4], value[5], reason, message, self.max_event_bytes
        )

    def _process_timer(self, timestamp: int, ctx: KeyedProcessFunction.OnTimerContext, out: StepOutputs) -> None:
        user_id = ctx.get_current_key()
        alias = self._alias()
        if alias is not None and timestamp >= alias.until_ms:
            self.alias_state.clear()
        profile, quarantined = self._load_profile(user_id)
        if quarantined is not None:
            out.dead_letter(quarantined)
        if self.privacy_requests:
            privacy = self._load_privacy(user_id)
            held = privacy.tombstone_until_ms, len(privacy.folded)
            step = self.engine.step_timer(user_id, profile, timestamp, privacy)
            if (privacy.tombstone_until_ms, len(privacy.folded)) != held:  # a tombstone or folded ids forgotten
                self._store_privacy(user_id, privacy)
        else:
            step = self.engine.step_timer(user_id, profile, timestamp)
        self._commit(ctx, user_id, profile, step, None, out)

    def _process_request(self, value, ctx: KeyedProcessFunction.Context, out: StepOutputs) -> None:
        """A privacy request: applied at its event time by the core, however late it comes (an
        erasure is never dropped); an ERASE also writes its audit record, and sends the erasures
        of the ids folded into the user to them through the feedback topic (from there, one of
        those comes back here)."""
        user_id = value[0]
        try:
            request = request_from_record(self.requests.decode(value[2]))
            if request.user_id != user_id:
                raise DecodeError("undecodable", "user_id could not be read as UTF-8 ahead of the decode")
        except DecodeError as err:
            self.dead_letters_out.inc()
            out.dead_letter(self._dead_letter(value, err.reason, err.message))
            return
        profile, quarantined = self._load_profile(user_id)
        if quarantined is not None:
            out.dead_letter(quarantined)
        privacy = self._load_privacy(user_id)
        step = self.engine.step_request(user_id, profile, privacy, request, self.allowed_lateness_ms)
        if step.outcome == DUPLICATE:  # a fanned-out erasure of an id already erased since
            return
        if step.delete_timer_ms is not None:
            ctx.timer_service().delete_event_time_timer(step.delete_timer_ms)
        self._store_privacy(user_id, privacy)
        if step.outcome == ERASED:
            self.users_erased.inc()
            erased = list(step.erased)
            if self.alias_state.value() is not None:  # the link to the id this one was merged into
                self.alias_state.clear()
                erased.append(ERASED_ALIAS)
            hashed = user_hash(user_id)
            log.info("erased user %s (request %s): %d items", hashed[:16], request.request_id, len(erased))
            record = {
                "request_id": request.request_id,
                "user_hash": hashed,
                "requested_at": request.timestamp,
                "erased_at": now_ms(),
                "source": request.source,
                "erased": erased,
                "definitions_version": self.engine.definitions_version,
            }
            out.keyed(ERASURE_AUDIT, hashed, self.audit.encode(record))
            self._fan_out(step.fan_out, out)
        else:
            self.consent_changes.inc()
        self._commit(ctx, user_id, profile, step, request.request_id, out)
        if step.erase_view_up_to is not None:
            # After the EXITs: the Redis view's sink deletes what they do not reach (docs/redis.md,
            # "Erasure marker"); attach_connectors keeps it out of the transitions topic.
            out.erase_view(user_id, step.erase_view_up_to, request.timestamp)

    def _fan_out(self, requests: tuple[UserRequest, ...], out: StepOutputs) -> None:
        """Each id folded into an erased user gets its erasure through the feedback topic, which
        crosses keys exactly-once (docs/privacy.md, "A request names one id")."""
        for request in requests:
            out.keyed(IDENTITY_FEEDBACK, request.user_id, self.requests.encode(request.to_record()))

    def _load_privacy(self, user_id: str) -> PrivacyState:
        """The user's privacy record. A damaged one is an error that stops the job: dropping it
        would forget a withdrawn consent or an erasure's tombstone."""
        privacy = self.privacy_cache.get(user_id)
        if privacy is not None:
            self.privacy_cache.move_to_end(user_id)
            return privacy
        stored = self.privacy_state.value()
        privacy = decode_privacy(None if stored is None else stored.encode("latin-1"))
        self._cache_privacy(user_id, privacy)
        return privacy

    def _store_privacy(self, user_id: str, privacy: PrivacyState) -> None:
        if privacy.is_empty:
            self.privacy_state.clear()
        else:
            self.privacy_state.update(encode_privacy(privacy).decode("latin-1"))
        self._cache_privacy(user_id, privacy)

    def _cache_privacy(self, user_id: str, privacy: PrivacyState) -> None:
        if self.profile_cache_users:
            self.privacy_cache[user_id] = privacy
            if len(self.privacy_cache) > self.profile_cache_users:
                self.privacy_cache.popitem(last=False)

    def close(self):
        shutil.rmtree(self.files_dir, ignore_errors=True)

    def _load_profile(self, user_id: str) -> tuple[UserProfile, tuple[str | None, bytes] | None]:
        """The user's profile, and the dead letter of a stored value that could not be read."""
        cache = self.profile_cache
        profile = cache.get(user_id)
        if profile is not None:
            cache.move_to_end(user_id)
            return profile, None
        stored, unreadable = self._stored_profile()
        quarantined = None
        try:
            if unreadable is not None:
                raise DecodeError("undecodable", unreadable)
            profile = self.state_codec.decode(stored)
        except DecodeError as err:
            # One user's unreadable state (damaged, or written by a release that is newer than
            # this one) must not stop the job for everyone: it goes to the dead letters whole,
            # keyed by the user, and the user starts afresh.
            self.profiles_quarantined.inc()
            log.warning("profile state quarantined (%s): the user starts afresh", err.reason)
            quarantined = dead_letter_row(
                self.dead_letters,
                stored,
                "",
                None,
                None,
                QUARANTINED_STATE,
                f"{err.reason}: {err.message}; the stored profile was dropped and the user starts afresh",
                self.max_event_bytes,
                key=user_id,
            )
            self.profile_state.clear()
            profile = UserProfile()
        if self.profile_cache_users:
            cache[user_id] = profile
            if len(cache) > self.profile_cache_users:
                cache.popitem(last=False)
        return profile, quarantined

    def _stored_profile(self) -> tuple[bytes | None, str | None]:
        """The stored profile's bytes (None: nothing stored), and why they cannot be a value this
        job wrote (None when they can)."""
        try:
            stored = self.profile_state.value()
        except Exception as err:  # PyFlink unpickles the value: one it cannot unpickle is not ours
            return b"", f"profile state: not a pickled byte string ({type(err).__name__})"
        if stored is not None:
            return (stored, None) if isinstance(stored, bytes) else (b"", "profile state: not a byte string")
        text = self.text_profile_state.value()
        if text is None:
            return None, None
        self.text_profile_state.clear()  # carried over: this step writes PROFILE_STATE
        try:
            return text.encode("latin-1"), None
        except UnicodeEncodeError:  # not a value a release wrote (one char per byte)
            return text.encode("utf-8", "surrogatepass"), "profile state: not one byte per character"

    def _commit(
        self, ctx, user_id: str, profile: UserProfile, step: Step, cause_event_id: str | None, out: StepOutputs
    ) -> None:
        if step.register_timer_ms is not None:
            ctx.timer_service().register_event_time_timer(step.register_timer_ms)
        if step.scores_skipped:
            self.scoring_skipped.inc(step.scores_skipped)
        if step.scores_out_of_range:
            self.scores_out_of_range.inc(step.scores_out_of_range)
        if step.drop_state:  # the retention ran out: nothing of the user is kept
            if step.expired:
                self.profiles_expired.inc()
            self.profile_state.clear()
            self.profile_cache.pop(user_id, None)
        else:
            encoded = self.state_codec.encode(profile)
            self.profile_state.update(encoded)
            if self.emit_profile_snapshots:
                out.snapshot(user_id, cause_event_id, encoded)
        transitions = step.transitions
        if not transitions and not step.shadow_transitions:
            return
        emitted_at = now_ms()
        header, body = self.transitions.header, self.transition_writer.body
        for t in step.shadow_transitions:
            out.keyed(SHADOW_TRANSITION, t.user_id, header + body(t, emitted_at))
        for t in transitions:
            out.transition(
                t.user_id,
                t.segment,
                t.kind == "ENTER",
                t.sequence,
                t.event_time,
                header + body(t, emitted_at),
                t.rule,
            )


class DeployedSegmentUsers(SegmentUsers, KeyedBroadcastProcessFunction):
    """SegmentUsers connected to the control stream's broadcast (docs/deployments.md): each
    accepted decision goes into broadcast state and the timeline; each event and timer is stepped
    by the DeployedEngine of the timeline, rebuilt from the broadcast state (readable only through
    the contexts) the first time one needs it after open."""

    def process_broadcast_element(self, value, ctx):
        ctx.get_broadcast_state(DECISIONS).put(value[0], value[1])
        self.deployments.add(value[1])
        return ()

    def _deployed(self, ctx) -> None:
        self.engine = self.deployments.engine or self.deployments.rebuild(ctx.get_broadcast_state(DECISIONS).items())

    def process_element(self, value, ctx):
        self._deployed(ctx)
        return super().process_element(value, ctx)

    def on_timer(self, timestamp: int, ctx):
        self._deployed(ctx)
        return super().on_timer(timestamp, ctx)


@dataclass
class PipelineOutputs:
    transitions: DataStream  # TRANSITION_RECORD
    dead_letters: DataStream  # KEYED_RECORD: undecodable, invalid and late events
    identity_feedback: DataStream  # KEYED_RECORD: folds and forwarded events for another key
    profile_snapshots: DataStream  # PROFILE_SNAPSHOT, empty unless settings.emit_profile_snapshots
    erasure_audit: DataStream  # KEYED_RECORD: one ErasureAudit per erasure
    shadow_transitions: DataStream  # KEYED_RECORD: a candidate in shadow's (docs/deployments.md)
    deployment_status: DataStream | None = None  # KEYED_RECORD: DeploymentStatus, with a control stream
    control_dead_letters: DataStream | None = None  # KEYED_RECORD: unreadable control records


# The fields UserEventKeys reads, in the order every readable version of the records it keys must
# start with: user events, and privacy requests, whose first fields have the same types.
KEYED_PREFIXES = {
    "UserEvent": (("event_id", "string"), ("user_id", "string"), ("event_type", "enum"), ("timestamp", "long")),
    "UserRequest": (("request_id", "string"), ("user_id", "string"), ("kind", "enum"), ("timestamp", "long")),
}


def user_event_headers(catalog: SchemaCatalog, record_name: str = "UserEvent") -> bytes:
    """The single-object headers (magic and fingerprint, 10 bytes each, concatenated) of every
    version of `record_name` the catalog reads, for UserEventKeys. A version that does not start
    with its KEYED_PREFIXES entry is refused here, before anything runs: the Java keying would not
    find its key."""
    headers = []
    expected = KEYED_PREFIXES[record_name]
    for fingerprint, known in sorted(catalog.by_fingerprint.items()):
        if known.full_name != catalog.codec(record_name).full_name:
            continue
        prefix = tuple(
            (f["name"], f["type"] if isinstance(f["type"], str) else f["type"].get("type"))
            for f in known.parsed["fields"][: len(expected)]
        )
        if prefix != expected:
            raise ValueError(
                f"{record_name} version {fingerprint.hex()} starts with {prefix}, not {expected}: "
                "infra/java segments.events.UserEventKeys must learn to read its key and time"
            )
        headers.append(MAGIC + fingerprint)
    return b"".join(headers)


def build_pipeline(
    raw_records: DataStream,
    settings: JobSettings,
    keyed_function=None,
    raw_requests: DataStream | None = None,
    feedback_records: DataStream | None = None,
    control_records: DataStream | None = None,
) -> PipelineOutputs:
    """`raw_records` (RAW_RECORD rows) must run at `settings.parallelism`, like every operator up to
    key_by: then each connection is forward and a partition's order (which keeps a user's events in
    order, producers key by user) survives to the keyed function (`SegmentUsers`, or what
    `keyed_function(settings, segmentation)` builds: the bench's floor job). Up to key_by all of it
    is Java (UserEventKeys, Flink's watermark generator, PyFlink's selector of (key, value) rows),
    so the keyed function is the only Python under its TaskManager's interpreter lock.
    `raw_requests` (RAW_RECORD rows of settings.requests_topic, the same parallelism): privacy
    requests, keyed by the same Java operator and unioned with the events before the watermark
    generator, so a quiet requests topic never holds the watermark back.
    `feedback_records` (RAW_RECORD rows of the identity feedback topic) are keyed and timed the
    same way, with idleness of their own, and join the events before key_by.
    `control_records` (jobs/deployment_operator.CONTROL_RECORD rows of settings.control_topic):
    live deployments, validated once and broadcast to the keyed function (DeployedSegmentUsers).
    Without them the keyed function is the one without deployments: the graph is unchanged."""
    from pyflink.datastream.data_stream import KeyedStream
    from pyflink.java_gateway import get_gateway

    from jobs.java_operators import java_class

    gateway = get_gateway()
    keys_class = java_class(settings, USER_EVENT_KEYS_CLASS)
    j_keyed_events = (
        raw_records._j_data_stream.process(
            keys_class(
                user_event_headers(SchemaCatalog()), MIN_EVENT_TIME_MS, settings.max_future_ms, settings.max_event_bytes
            ),
            KEYED_EVENT.get_java_type_info(),
        )
        .name(DECODE.name)
        .uid(DECODE.uid)
    )
    if raw_requests is not None:
        j_keyed_requests = (
            raw_requests._j_data_stream.process(
                keys_class(
                    user_event_headers(SchemaCatalog(), "UserRequest"),
                    MIN_EVENT_TIME_MS,
                    settings.max_future_ms,
                    settings.max_event_bytes,
                ),
                KEYED_EVENT.get_java_type_info(),
            )
            .name(DECODE_REQUESTS.name)
            .uid(DECODE_REQUESTS.uid)
        )
        # union is varargs in Java: PyFlink's wrapper builds the array.
        j_keyed_events = DataStream(j_keyed_events).union(DataStream(j_keyed_requests))._j_data_stream
    watermarks = WatermarkStrategy.for_bounded_out_of_orderness(Duration.of_millis(settings.watermark_lag_ms))
    if settings.idle_timeout_ms:
        watermarks = watermarks.with_idleness(Duration.of_millis(settings.idle_timeout_ms))
    j_timed = (
        j_keyed_events.assignTimestampsAndWatermarks(
            watermarks._j_watermark_strategy.withTimestampAssigner(keys_class.EventTime())
        )
        .name(EVENT_TIME.name)
        .uid(EVENT_TIME.uid)
    )
    if feedback_records is not None:
        j_feedback = (
            feedback_records._j_data_stream.process(
                # No size cap: a fold carries a profile; the topic is the job's own. Its records:
                # folds and forwarded events, and the erasures of ids folded into erased users.
                keys_class(
                    user_event_headers(SchemaCatalog()) + user_event_headers(SchemaCatalog(), "UserRequest"),
                    MIN_EVENT_TIME_MS,
                    settings.max_future_ms,
                    2**31 - 1,
                ),
                KEYED_EVENT.get_java_type_info(),
            )
            .name(DECODE_FEEDBACK.name)
            .uid(DECODE_FEEDBACK.uid)
        )
        feedback_watermarks = WatermarkStrategy.for_bounded_out_of_orderness(
            Duration.of_millis(settings.watermark_lag_ms)
        ).with_idleness(Duration.of_millis(FEEDBACK_IDLE_MS))
        j_feedback_timed = (
            j_feedback.assignTimestampsAndWatermarks(
                feedback_watermarks._j_watermark_strategy.withTimestampAssigner(keys_class.EventTime())
            )
            .name(FEEDBACK_TIME.name)
            .uid(FEEDBACK_TIME.uid)
        )
        j_timed = DataStream(j_timed).union(DataStream(j_feedback_timed))._j_data_stream
    j_keyed = j_timed.keyBy(gateway.jvm.KeyByKeySelector(), Types.ROW([Types.STRING()]).get_java_type_info())
    keyed = KeyedStream(j_keyed, RAW_EVENT, DataStream(j_timed))
    # Definitions and models checked here, before anything is submitted or consumed.
    segmentation = Segmentation.load(settings.definitions_file(), settings.profile, settings.models_dir)
    definitions = segmentation.definitions
    log.info(
        "segment definitions %s version %s (sha256 %s): %d segments; models: %s",
        definitions.source,
        definitions.version,
        definitions.sha256[:12],
        len(definitions.segments),
        segmentation.registry.version if segmentation.registry else "none",
    )
    parallelism = settings.segment_parallelism or settings.parallelism
    deployment_status = control_dead_letters = None
    if control_records is None:
        steps = keyed.process((keyed_function or SegmentUsers)(settings, segmentation), output_type=BYTES)
    else:
        decisions, deployment_status, control_dead_letters = control_decisions(control_records, settings, segmentation)
        deployed = (keyed_function or DeployedSegmentUsers)(settings, segmentation)
        steps = keyed.connect(decisions).process(deployed, output_type=BYTES)
    steps = steps.name(SEGMENT.name).uid(SEGMENT.uid).set_parallelism(parallelism)
    output_tag = gateway.jvm.org.apache.flink.util.OutputTag
    snapshots = output_tag(PROFILE_SNAPSHOTS, PROFILE_SNAPSHOT.get_java_type_info())
    keyed_tags = [output_tag(name, KEYED_RECORD.get_java_type_info()) for name in KEYED_OUTPUTS]
    j_keyed_tags = gateway.new_array(output_tag, len(keyed_tags))
    for i, tag in enumerate(keyed_tags):
        j_keyed_tags[i] = tag
    j_segments = gateway.new_array(gateway.jvm.String, len(definitions.names))
    for i, name in enumerate(definitions.names):
        j_segments[i] = name
    j_split = (
        steps._j_data_stream.process(
            java_class(settings, SPLIT_STEP_OUTPUTS_CLASS)(j_segments, snapshots, j_keyed_tags),
            TRANSITION_RECORD.get_java_type_info(),
        )
        .name(SPLIT.name)
        .uid(SPLIT.uid)
        .setParallelism(parallelism)
    )
    dead_letters, identity_feedback, erasure_audit, shadow = (
        DataStream(j_split.getSideOutput(tag)) for tag in keyed_tags
    )
    return PipelineOutputs(
        transitions=DataStream(j_split),
        dead_letters=dead_letters,
        identity_feedback=identity_feedback,
        profile_snapshots=DataStream(j_split.getSideOutput(snapshots)),
        erasure_audit=erasure_audit,
        shadow_transitions=shadow,
        deployment_status=deployment_status,
        control_dead_letters=control_dead_letters,
    )


def attach_connectors(env: StreamExecutionEnvironment, settings: JobSettings, keyed_function=None) -> None:
    """Kafka source -> pipeline -> Kafka sinks (exactly-once) and the Redis view."""
    t_env = StreamTableEnvironment.create(env)
    t_env.execute_sql(kafka_table_ddl("events_in", settings.events_topic, settings, sink=False))
    t_env.execute_sql(kafka_table_ddl("transitions_out", settings.transitions_topic, settings, sink=True))
    t_env.execute_sql(kafka_table_ddl("dead_letters_out", settings.dead_letter_topic, settings, sink=True))
    raw = t_env.to_data_stream(t_env.from_path("events_in"))
    raw_requests = None
    if settings.requests_topic:
        t_env.execute_sql(kafka_table_ddl("requests_in", settings.requests_topic, settings, sink=False))
        t_env.execute_sql(kafka_table_ddl("erasure_audit_out", settings.audit_topic, settings, sink=True))
        raw_requests = t_env.to_data_stream(t_env.from_path("requests_in"))
    feedback = None
    if settings.identity_topic:
        t_env.execute_sql(kafka_table_ddl("identity_in", settings.identity_topic, settings, sink=False))
        t_env.execute_sql(kafka_table_ddl("identity_out", settings.identity_topic, settings, sink=True))
        feedback = t_env.to_data_stream(t_env.from_path("identity_in"))
    control = None
    if settings.control_topic:
        t_env.execute_sql(kafka_table_ddl("deployment_status_out", settings.deployment_status_topic, settings, True))
        t_env.execute_sql(kafka_table_ddl("shadow_out", settings.shadow_topic, settings, sink=True))
        control = control_source(t_env, settings)
    outputs = build_pipeline(raw, settings, keyed_function, raw_requests, feedback, control)
    transitions = outputs.transitions
    statements = t_env.create_statement_set()
    dead_letters = outputs.dead_letters
    if outputs.deployment_status is not None and outputs.control_dead_letters is not None:
        statements.add_insert("deployment_status_out", t_env.from_data_stream(outputs.deployment_status))
        statements.add_insert("shadow_out", t_env.from_data_stream(outputs.shadow_transitions))
        dead_letters = dead_letters.union(outputs.control_dead_letters)  # one sink per topic (its transactional ids)
    statements.add_insert(
        "transitions_out",
        t_env.from_data_stream(transitions)
        .where(col("kind") != ERASE_VIEW_KIND)  # erasure markers are for the Redis view only
        .select(col("user_id").alias("key"), col("payload")),
    )
    statements.add_insert("dead_letters_out", t_env.from_data_stream(dead_letters))
    if raw_requests is not None:
        statements.add_insert("erasure_audit_out", t_env.from_data_stream(outputs.erasure_audit))
    if feedback is not None:
        statements.add_insert("identity_out", t_env.from_data_stream(outputs.identity_feedback))
    statements.attach_as_datastream()
    if settings.redis_url:
        # Redis only from committed transitions: applied once the checkpoint holding them completes.
        from jobs.redis_sink import redis_view_sink

        (
            transitions.sink_to(redis_view_sink(settings))
            .name(REDIS_VIEW.name)
            .uid(REDIS_VIEW.uid)
            .set_parallelism(settings.segment_parallelism or settings.parallelism)
        )


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Run the segmentation job")
    parser.add_argument("--config", help="YAML settings file (SEGMENTS_* variables override it)")
    args, _ = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = load_settings(args.config)
    log.info("starting job with settings %s", settings.redacted())
    env = create_environment(settings)
    attach_connectors(env, settings)
    env.execute(settings.job_name)


if __name__ == "__main__":
    # `flink run -py` executes this file as __main__; cloudpickle would then ship these classes
    # by value, module globals and all. Running the imported module's main ships them by name.
    from jobs.segment_users import main as main_of_module

    main_of_module()
