"""The job's Kafka connectors as Table DDL (why Table DDL and not the DataStream connector:
docs/architecture.md): the events source as raw bytes with their topic, partition and offset,
read_committed, and the raw sinks, exactly-once, keyed by user; with the settings' Kafka security."""

from __future__ import annotations

from jobs.settings import JobSettings


def _quoted(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _common(topic: str, settings: JobSettings) -> str:
    # Security as Kafka's own properties; the password is only named (`${env:NAME}`), never written.
    security = "".join(
        f", {_quoted('properties.' + k)} = {_quoted(v)}"
        for k, v in settings.kafka_security().flink_properties().items()
    )
    return (
        f"'connector' = 'kafka', 'topic' = '{topic}', "
        f"'properties.bootstrap.servers' = '{settings.bootstrap_servers}'{security}"
    )


def control_table_ddl(name: str, settings: JobSettings) -> str:
    """The control topic (docs/deployments.md) as raw bytes with the record's timestamp (the
    instant of a record without effective_at), its partition and offset; read_committed, and from
    the earliest offset whatever `startup_mode` says: a job started afresh must see every
    deployment (a restored one resumes from its checkpoint's offsets)."""
    return (
        f"CREATE TEMPORARY TABLE `{name}` (payload BYTES, "
        "src_timestamp TIMESTAMP_LTZ(3) METADATA FROM 'timestamp' VIRTUAL, "
        "src_partition INT METADATA FROM 'partition' VIRTUAL, "
        "src_offset BIGINT METADATA FROM 'offset' VIRTUAL) WITH ("
        f"{_common(settings.control_topic, settings)}, 'properties.group.id' = '{settings.consumer_group}', "
        "'scan.startup.mode' = 'earliest-offset', "
        "'properties.isolation.level' = 'read_committed', 'format' = 'raw')"
    )


def kafka_table_ddl(name: str, topic: str, settings: JobSettings, sink: bool) -> str:
    common = _common(topic, settings)
    if not sink:
        return (
            f"CREATE TEMPORARY TABLE `{name}` (payload BYTES, "
            "src_topic STRING METADATA FROM 'topic' VIRTUAL, "
            "src_partition INT METADATA FROM 'partition' VIRTUAL, "
            "src_offset BIGINT METADATA FROM 'offset' VIRTUAL) WITH ("
            f"{common}, 'properties.group.id' = '{settings.consumer_group}', "
            f"'scan.startup.mode' = '{settings.startup_mode}', "
            "'properties.isolation.level' = 'read_committed', 'format' = 'raw')"
        )
    return (
        f"CREATE TEMPORARY TABLE `{name}` (`key` STRING, payload BYTES) WITH ({common}, "
        "'key.format' = 'raw', 'key.fields' = 'key', 'value.format' = 'raw', "
        "'value.fields-include' = 'EXCEPT_KEY', 'sink.delivery-guarantee' = 'exactly-once', "
        f"'sink.transactional-id-prefix' = '{settings.transactional_id_prefix}-{name}', "
        f"'properties.transaction.timeout.ms' = '{settings.transaction_timeout_ms}')"
    )
