"""The control stream's Flink side (docs/deployments.md, "Job wiring"): the control topic's source,
the validation operator, run once for the job (one key, parallelism 1), and the broadcast of its
accepted decisions to the keyed function (jobs/segment_users.DeployedSegmentUsers). The logic is
jobs/deployment_stream.py's; these classes only move values between it and Flink."""

from __future__ import annotations

from pathlib import Path

from pyflink.common import Duration, Row, Types, WatermarkStrategy
from pyflink.common.watermark_strategy import TimestampAssigner
from pyflink.datastream import DataStream, KeyedProcessFunction, OutputTag, RuntimeContext
from pyflink.datastream.state import ListStateDescriptor, MapStateDescriptor

from jobs.deployment_stream import ControlValidator
from jobs.settings import JobSettings
from jobs.shipped_files import ShippedFiles
from udfs.codec import SchemaCatalog
from udfs.scoring import ModelRegistry
from udfs.segmentation import DEFAULT_MODELS_DIR, Segmentation

BYTES = Types.PRIMITIVE_ARRAY(Types.BYTE())
# A control topic record as its source gives it: the Kafka timestamp is the instant of a record
# without effective_at.
CONTROL_RECORD = Types.ROW_NAMED(
    ["payload", "src_timestamp", "src_partition", "src_offset"], [BYTES, Types.LONG(), Types.INT(), Types.LONG()]
)
KEYED_RECORD = Types.ROW_NAMED(["key", "payload"], [Types.STRING(), BYTES])
# An accepted decision, numbered in the order it was decided (the broadcast state's key).
DECISION = Types.ROW_NAMED(["order", "decision"], [Types.LONG(), Types.STRING()])
# The keyed function's broadcast state: order -> decision text (udfs/deployments.decision_text).
DECISIONS = MapStateDescriptor("deployment-decisions", Types.LONG(), Types.STRING())
DEPLOYMENT_STATUS = OutputTag("deployment-status", KEYED_RECORD)  # DeploymentStatus, keyed by deployment id
CONTROL_DEAD_LETTERS = OutputTag("control-dead-letters", KEYED_RECORD)  # unreadable control records
VALIDATE_UID, VALIDATE_NAME = "validate-deployments", "Validate deployments"  # stable: savepoints use it
CONTROL_KEY = "control"  # every control record under one key: one validator, one order


def job_models(models_dir: str | None) -> tuple[str, ...]:
    """Every model of the job's models directory: a deployment may read any of them without
    bundling it, so with a control topic the workers get them all."""
    return tuple(ModelRegistry.discover(Path(models_dir) if models_dir else DEFAULT_MODELS_DIR))


class ValidateDeployments(KeyedProcessFunction):
    """Validates each control record as at start-up and decides it (jobs/deployment_stream.py):
    the status record to DEPLOYMENT_STATUS, an accepted decision on the main output for the
    broadcast. The decisions made are kept in state, so a restored job decides the records after
    its checkpoint against the same timeline."""

    def __init__(self, settings: JobSettings, segmentation: Segmentation):
        self.definitions_text = segmentation.definitions.text
        self.definitions_source = segmentation.definitions.source
        self.files = ShippedFiles.of_job(settings.models_dir, job_models(settings.models_dir))
        self.profile_config = settings.profile
        self.max_event_bytes = settings.max_event_bytes
        self.control_topic = settings.control_topic

    def open(self, runtime_context: RuntimeContext):
        files_dir = self.files.materialize()
        catalog = SchemaCatalog(files_dir / "schemas")
        models = files_dir / "models"
        startup = Segmentation.from_text(self.definitions_text, self.definitions_source, self.profile_config, models)
        self.validator = ControlValidator(startup, catalog, self.profile_config, models)
        self.dead_letters = catalog.codec("DeadLetter")
        self.decided = runtime_context.get_list_state(ListStateDescriptor("deployment-decisions", Types.STRING()))
        self.restored = False
        metrics = runtime_context.get_metrics_group()
        self.accepted = metrics.counter("deployments_accepted")
        self.refused = metrics.counter("deployments_refused")

    def process_element(self, value, ctx: KeyedProcessFunction.Context):
        from jobs.segment_users import dead_letter_row, now_ms

        if not self.restored:
            self.validator.restore(self.decided.get())
            self.restored = True
        payload = bytes(value[0])
        verdict = self.validator.verdict(payload, value[1], now_ms())
        if verdict.dead_letter is not None:
            reason, message = verdict.dead_letter
            key, letter = dead_letter_row(
                self.dead_letters, payload, self.control_topic, value[2], value[3], reason, message, 1 << 20
            )
            yield CONTROL_DEAD_LETTERS, Row(key, letter)
            return
        yield DEPLOYMENT_STATUS, Row(verdict.deployment_id, verdict.status)
        if verdict.accepted:
            self.accepted.inc()
            self.decided.add(verdict.decision)
            yield Row(len(list(self.decided.get())) - 1, verdict.decision)
        else:
            self.refused.inc()


CONTROL_IDLE_S = 1  # how soon a control stream without records stops counting for the watermark


class AtTheEndOfTime(TimestampAssigner):
    """Every control record at the end of event time: what the control stream says of the
    watermark never holds back the events' (a deployment carries its own instant)."""

    def extract_timestamp(self, value, record_timestamp: int) -> int:
        return 2**63 - 1


def control_decisions(control_records: DataStream, settings: JobSettings, segmentation: Segmentation):
    """(the accepted decisions, broadcast with DECISIONS; the status records; the dead letters) of
    a stream of CONTROL_RECORD rows."""
    # The broadcast side must never hold the keyed function's watermark (the lesser of its two
    # inputs') back: idle until the first record, then at the end of time.
    watermarks = (
        WatermarkStrategy.for_monotonous_timestamps()
        .with_timestamp_assigner(AtTheEndOfTime())
        .with_idleness(Duration.of_seconds(CONTROL_IDLE_S))
    )
    decisions = (
        control_records.assign_timestamps_and_watermarks(watermarks)
        .key_by(lambda _: CONTROL_KEY, key_type=Types.STRING())
        .process(ValidateDeployments(settings, segmentation), output_type=DECISION)
        .name(VALIDATE_NAME)
        .uid(VALIDATE_UID)
        .set_parallelism(1)
    )
    return (
        decisions.broadcast(DECISIONS),
        decisions.get_side_output(DEPLOYMENT_STATUS),
        decisions.get_side_output(CONTROL_DEAD_LETTERS),
    )


def _epoch_ms(timestamp) -> int:
    """The Kafka timestamp as PyFlink hands a TIMESTAMP_LTZ over: in thread mode the Java Instant
    itself (through PEMJA), in process mode PyFlink's Instant."""
    for method in ("toEpochMilli", "to_epoch_milli"):
        to_ms = getattr(timestamp, method, None)
        if to_ms is not None:
            return int(to_ms())
    return int(timestamp.timestamp() * 1000)


def control_source(t_env, settings: JobSettings) -> DataStream:
    """The control topic's records as CONTROL_RECORD rows, on the job's table environment."""
    from jobs.kafka_tables import control_table_ddl

    t_env.execute_sql(control_table_ddl("control_in", settings))
    return (
        t_env.to_data_stream(t_env.from_path("control_in"))
        .map(lambda r: Row(r[0], _epoch_ms(r[1]), r[2], r[3]), output_type=CONTROL_RECORD)
        .name("Control records")
        .uid("control-records")
        .set_parallelism(1)
    )


def attach_control(t_env, statements, settings: JobSettings, segmentation: Segmentation):
    """The control topic's source and the status topic's sink (exactly-once) on a table
    environment and statement set, alone: the broadcast of accepted decisions, and the dead
    letters of unreadable control records (tests/e2e/control_path_job.py; the job's wiring is
    jobs/segment_users.attach_connectors)."""
    from jobs.kafka_tables import kafka_table_ddl

    t_env.execute_sql(kafka_table_ddl("deployment_status_out", settings.deployment_status_topic, settings, sink=True))
    broadcast, statuses, dead_letters = control_decisions(control_source(t_env, settings), settings, segmentation)
    statements.add_insert("deployment_status_out", t_env.from_data_stream(statuses))
    return broadcast, dead_letters
