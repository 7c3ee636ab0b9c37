"""The job's Kafka connectors as Table DDL (why Table DDL and not the DataStream connector:
docs/architecture.md): the events source as raw bytes with their topic, partition and offset,
read_committed, and the raw sinks, exactly-once, keyed by user."""

from __future__ import annotations

from jobs.settings import JobSettings


def kafka_table_ddl(name: str, topic: str, settings: JobSettings, sink: bool) -> str:
    common = (
        f"'connector' = 'kafka', 'topic' = '{topic}', "
        f"'properties.bootstrap.servers' = '{settings.bootstrap_servers}'"
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
