"""The reference loop (`python -m jobs.bench reference`): the job's work in one plain Python
process with the same engine-free core, no Flink."""

from __future__ import annotations

import signal
import time
from collections import OrderedDict

from jobs.bench import now_ms
from jobs.bench.producing import produce


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
        self.view = (
            RedisSegmentView(settings.redis_url, settings.redis_key_prefix, settings.profile.retention_ms)
            if settings.redis_url
            else None
        )
        self.state: dict[str, str] = {}  # user -> profile state, what the hashmap backend keeps
        self.cache: OrderedDict = OrderedDict()
        # The timer service: registered (instant, user) pairs, each at most once, as Flink's.
        self.timers: list[tuple[int, str]] = []  # heap
        self.registered: set[tuple[int, str]] = set()
        self.max_event_time: int | None = None
        self.watermark = -(2**63)
        self.consumer = Consumer(
            {
                "bootstrap.servers": settings.bootstrap_servers,
                "group.id": settings.consumer_group,
                "enable.auto.commit": False,
                "isolation.level": "read_committed",
                **settings.kafka_security().librdkafka_config(),
            }
        )
        topic = settings.events_topic
        partitions = self.consumer.list_topics(topic, timeout=10).topics[topic].partitions
        self.consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in sorted(partitions)])
        self.producer = Producer(
            {
                "bootstrap.servers": settings.bootstrap_servers,
                "transactional.id": f"{settings.transactional_id_prefix}-reference",
                "transaction.timeout.ms": settings.transaction_timeout_ms,
                **settings.kafka_security().librdkafka_config(),
            }
        )
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
            self.dead_letter(
                payload,
                topic,
                partition,
                offset,
                "late",
                f"event time {event.timestamp} is more than {self.settings.allowed_lateness_ms} ms "
                f"behind the watermark {self.watermark}",
            )
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
            self.view.apply([(t.user_id, t.segment, t.kind, t.sequence, t.event_time, t.rule) for t in transitions])
        emitted_at = now_ms()
        for t in transitions:
            payload = self.transitions.encode(t.to_record(emitted_at))
            produce(self.producer, self.settings.transitions_topic, payload, t.user_id.encode())

    def dead_letter(self, payload, topic, partition, offset, reason, message) -> None:
        limit = self.settings.max_event_bytes
        if payload is not None and len(payload) > limit:
            message = f"{message}; payload truncated to its first {limit} bytes"
            payload = payload[:limit]
        record = {
            "payload": bytes(payload or b""),
            "source_topic": topic or "",
            "source_partition": partition,
            "source_offset": offset,
            "reason": reason,
            "message": message,
            "detected_at": now_ms(),
        }
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
