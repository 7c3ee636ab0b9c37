"""`segments forget` and `segments consent`: a privacy request (udfs/privacy.UserRequest) written to
the requests topic, keyed by the user id, as a consent platform would write it. The job applies it
(docs/privacy.md); this only produces it."""

from __future__ import annotations

import time
import uuid

from jobs.settings import JobSettings
from udfs.codec import SchemaCatalog
from udfs.privacy import CONSENT, ERASE, UserRequest, user_hash

SOURCE = "segments-cli"


def erase_request(user_id: str, at_ms: int | None = None) -> UserRequest:
    return UserRequest(str(uuid.uuid4()), user_id, ERASE, _now_ms() if at_ms is None else at_ms, SOURCE)


def consent_request(user_id: str, purpose: str, granted: bool, at_ms: int | None = None) -> UserRequest:
    return UserRequest(
        str(uuid.uuid4()), user_id, CONSENT, _now_ms() if at_ms is None else at_ms, SOURCE, purpose, granted
    )


def produce_request(settings: JobSettings, request: UserRequest) -> None:
    """Writes the request (idempotent producer, waits for the broker's acknowledgement)."""
    if not settings.requests_topic:
        raise ValueError("requests_topic is not set: the job reads no privacy requests (docs/privacy.md)")
    codec = SchemaCatalog().codec("UserRequest")
    errors = deliver_one(settings, settings.requests_topic, request.user_id.encode(), codec.encode(request.to_record()))
    if errors:
        # The id is personal data: the error names its hash only.
        raise RuntimeError(f"request for user {user_hash(request.user_id)[:16]} not delivered: {errors}")


def deliver_one(settings: JobSettings, topic: str, key: bytes, value: bytes, extra: dict | None = None) -> list[str]:
    """Writes one record (idempotent producer) and waits for the broker's acknowledgement; the
    delivery errors, or ["timeout"] (empty: delivered). `extra`: more librdkafka settings."""
    from confluent_kafka import Producer

    producer = Producer(
        {
            "bootstrap.servers": settings.bootstrap_servers,
            "enable.idempotence": True,
            **(extra or {}),
            **settings.kafka_security().librdkafka_config(),
        }
    )
    errors: list[str] = []
    producer.produce(
        topic, key=key, value=value, on_delivery=lambda err, _msg: errors.append(str(err)) if err is not None else None
    )
    if producer.flush(60) != 0 and not errors:
        errors.append("timeout")
    return errors


def _now_ms() -> int:
    return time.time_ns() // 1_000_000
