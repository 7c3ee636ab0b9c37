"""The job's Kafka connectors as Table DDL (why Table DDL and not the DataStream connector:
docs/architecture.md): the events source as raw bytes with their topic, partition and offset,
read_committed, and the raw sinks, exactly-once, keyed by user; with the settings' Kafka security."""

from __future__ import annotations

from jobs.settings import JobSettings


def _quoted(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def kafka_table_ddl(name: str, topic: str, settings: JobSettings, sink: bool) -> str:
    # Security as Kafka's own properties; the password is only named (`${env:NAME}`), never written.
    security = "".join(
        f", {_quoted('properties.' + k)} = {_quoted(v)}"
        for k, v in settings.kafka_security().flink_properties().items()
    )
    common = (
        f"'connector' = 'kafka', 'topic' = '{topic}', "
        f"'properties.bootstrap.servers' = '{settings.bootstrap_servers}'{security}"
    )
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
