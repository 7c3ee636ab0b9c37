"""Issue 17's control stream on the MiniCluster in thread mode (jobs/deployment_operator.py): the
validation operator decides each control record once (status records, accepted and refused, and
a dead letter for an unreadable one) and its accepted decisions, broadcast, rebuild the same
timeline on every keyed subtask, read only through the broadcast context as the keyed function
will read it."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from pyflink.common import Row, Types
from pyflink.datastream import KeyedBroadcastProcessFunction

from jobs.deployment_operator import CONTROL_RECORD, DECISIONS, control_decisions
from jobs.deployment_stream import BroadcastTimeline
from jobs.flink_environment import create_environment
from jobs.segment_users import DeployedSegmentUsers
from jobs.settings import load_settings
from tests.conftest import START_MS
from tests.flink.test_broadcast_thread_mode import AfterEverySubtaskStoredTheDeployment
from tests.unit.basic_definitions import basic_yaml
from udfs.codec import SchemaCatalog
from udfs.deployments import ACTIVE, DEPLOY, PROMOTE, SHADOW, ControlRecord
from udfs.profile_config import HOUR_MS
from udfs.segmentation import Segmentation

pytestmark = pytest.mark.flink

PARALLELISM = 2
V2 = basic_yaml(active_window="5m").replace("basic-1", "v2")
V3 = basic_yaml(abandon_after="10m").replace("basic-1", "v3")
CONTROLS = [
    ControlRecord("d2", DEPLOY, START_MS + HOUR_MS, ACTIVE, V2.encode(), "v2"),
    ControlRecord("s3", DEPLOY, START_MS + 2 * HOUR_MS, SHADOW, V3.encode(), "v3"),
    ControlRecord("bad", DEPLOY, START_MS + 3 * HOUR_MS, ACTIVE, b"version: v9\nsegments: [", None),
    ControlRecord("p3", PROMOTE, START_MS + 4 * HOUR_MS),
]
ACCEPTED_DECISIONS = 3
# user -> the event time it asks about, and the version active then.
ASKS = {f"user-{n}": START_MS + n * HOUR_MS // 2 for n in range(12)}


class ActiveVersionAt(KeyedBroadcastProcessFunction):
    """Stores each decision in broadcast state (leaving a marker per decision), and answers each
    user with the version active at their time, from the timeline rebuilt from that state."""

    def __init__(self, markers: str, definitions: str):
        self.markers, self.definitions = markers, definitions

    def open(self, runtime_context):
        self.instance = uuid.uuid4().hex
        startup = Segmentation.from_text(self.definitions.encode(), "basic.yaml")
        self.timeline = BroadcastTimeline(startup, None, None, HOUR_MS, True)

    def process_broadcast_element(self, value, ctx):
        ctx.get_broadcast_state(DECISIONS).put(value[0], value[1])
        self.timeline.add(value[1])
        (Path(self.markers) / f"{self.instance}-{value[0]}").touch()
        return iter(())

    def process_element(self, value, ctx):
        engine = self.timeline.engine or self.timeline.rebuild(ctx.get_broadcast_state(DECISIONS).items())
        line = engine.timeline
        position = sum(1 for e in line.entries if e.instant_ms <= value[1]) - 1
        yield f"{value[0]} {line.label(line.active_at(position))} {self.instance}"


def test_the_control_stream_decides_once_and_every_keyed_subtask_rebuilds_the_same_timeline(tmp_path):
    settings = load_settings(
        environ={},
        redis_url="",
        parallelism=PARALLELISM,
        execution_mode="thread",
        restart_strategy="none",
        control_topic="control",
    )
    env = create_environment(settings)
    codec = SchemaCatalog().codec("Deployment")
    rows = [Row(codec.encode(c.to_record()), 0, 0, i) for i, c in enumerate(CONTROLS)]
    rows.append(Row(b"not a control record", 0, 0, len(rows)))
    control = env.from_collection(rows, type_info=CONTROL_RECORD).set_parallelism(1)
    startup = Segmentation.from_text(basic_yaml().encode(), "basic.yaml")
    broadcast, statuses, dead_letters = control_decisions(control, settings, startup)
    users = (
        env.from_collection([Row(u, t) for u, t in ASKS.items()], type_info=Types.ROW([Types.STRING(), Types.LONG()]))
        .map(
            AfterEverySubtaskStoredTheDeployment(str(tmp_path), PARALLELISM * ACCEPTED_DECISIONS),
            output_type=Types.ROW([Types.STRING(), Types.LONG()]),
        )
        .set_parallelism(1)
        .key_by(lambda r: r[0], key_type=Types.STRING())
    )
    answers = users.connect(broadcast).process(ActiveVersionAt(str(tmp_path), basic_yaml()), output_type=Types.STRING())
    status_lines = statuses.map(lambda r: "status " + bytes(r[1]).hex(), output_type=Types.STRING())
    dead_lines = dead_letters.map(lambda r: "dead " + bytes(r[1]).hex(), output_type=Types.STRING())
    with answers.union(status_lines, dead_lines).execute_and_collect() as results:
        seen = list(results)

    catalog = SchemaCatalog()

    def decoded(kind: str, record_name: str) -> list[dict]:
        codec = catalog.codec(record_name)
        return [codec.decode(bytes.fromhex(line.split()[1])) for line in seen if line.startswith(kind + " ")]

    statuses_seen = {
        (r["deployment_id"], r["status"], r["active_version"], r["shadow_version"])
        for r in decoded("status", "DeploymentStatus")
    }
    # Each decided after the ones before it in the topic (s3 sees d2 active, p3 promotes s3).
    assert statuses_seen == {
        ("d2", "ACCEPTED", "v2", None),
        ("s3", "ACCEPTED", "v2", "v3"),
        ("bad", "REFUSED", None, None),
        ("p3", "ACCEPTED", "v3", None),
    }
    assert [r["reason"] for r in decoded("dead", "DeadLetter")] == ["bad_magic"]
    answered = {line.split()[0]: line.split()[1] for line in seen if line.startswith("user-")}
    expected = {
        user: "basic-1" if at < START_MS + HOUR_MS else "v2" if at < START_MS + 4 * HOUR_MS else "v3"
        for user, at in ASKS.items()
    }
    assert answered == expected
    assert len({line.split()[2] for line in seen if line.startswith("user-")}) == PARALLELISM  # both subtasks


class MarkingDeployedSegmentUsers(DeployedSegmentUsers):
    """The job's keyed function, leaving a marker per decision it stores (see
    AfterEverySubtaskStoredTheDeployment)."""

    def __init__(self, settings, segmentation, markers: str):
        super().__init__(settings, segmentation)
        self.markers = markers

    def open(self, runtime_context):
        super().open(runtime_context)
        self.instance = uuid.uuid4().hex

    def process_broadcast_element(self, value, ctx):
        super().process_broadcast_element(value, ctx)
        (Path(self.markers) / f"{self.instance}-{value[0]}").touch()
        return ()


def test_the_job_with_deployments_gives_the_backtests_transitions_and_shadow_transitions(tmp_path):
    """The keyed function connected to the control stream (DeployedSegmentUsers, thread mode,
    keyed parallelism 2, the sweep on): events of 40 users over 6 hours and the control records of
    a deployment adding and removing segments, a shadow, its promotion and a rollback, against
    `run_backtest(..., deployments=...)` of the same: the same transitions and shadow transitions."""
    from jobs.backtest import FLUSH, read_events, run_backtest
    from jobs.segment_users import RAW_RECORD, build_pipeline
    from tests.flink.test_pipeline_minicluster import COLLECTED, run_and_collect
    from udfs.shoppers import generate_events

    events = list(generate_events(40, seed=7, start_ms=START_MS, duration_ms=6 * HOUR_MS))
    log_file = tmp_path / "events.jsonl"
    log_file.write_text("".join(json.dumps(e.to_record()) + "\n" for e in events))
    definitions = tmp_path / "basic.yaml"
    definitions.write_text(basic_yaml())
    v2 = V2.replace(
        "  - name: highly_engaged\n",
        "  - name: long_browser\n    when: ms_since_last_event < 40m\n  - name: highly_engaged_v2\n",
    )
    controls = [
        ControlRecord("d2", DEPLOY, START_MS + HOUR_MS, ACTIVE, v2.encode(), "v2"),
        ControlRecord("s3", DEPLOY, START_MS + 2 * HOUR_MS, SHADOW, V3.encode(), "v3"),
        ControlRecord("p3", PROMOTE, START_MS + 3 * HOUR_MS),
        ControlRecord("r", "ROLLBACK", START_MS + 4 * HOUR_MS),
    ]
    settings = load_settings(
        environ={},
        redis_url="",
        parallelism=1,
        segment_parallelism=2,
        definitions_path=str(definitions),
        control_topic="control",
        deployment_sweep_ms=HOUR_MS,
    )
    startup = Segmentation.load(settings.definitions_file(), settings.profile, settings.models_dir)
    result = run_backtest(
        startup,
        read_events(str(log_file)),
        until_ms=FLUSH,
        watermark_lag_ms=settings.watermark_lag_ms,
        allowed_lateness_ms=settings.allowed_lateness_ms,
        deployments=controls,
    )
    assert [s.status for s in result.deployments] == ["ACCEPTED"] * 4

    catalog = SchemaCatalog()
    event_codec, control_codec = catalog.codec("UserEvent"), catalog.codec("Deployment")
    env = create_environment(settings)
    rows = [Row(event_codec.encode(e.to_record()), "events", 0, i) for i, e in enumerate(events)]
    # The control records first: a bounded test has no other way to have them reach the keyed
    # subtasks before the events (the live job's control records come before their instants).
    control = env.from_collection(
        [Row(control_codec.encode(c.to_record()), 0, 0, i) for i, c in enumerate(controls)], type_info=CONTROL_RECORD
    ).set_parallelism(1)
    released = env.from_collection(rows, type_info=RAW_RECORD).map(
        AfterEverySubtaskStoredTheDeployment(str(tmp_path / "markers"), 2 * len(controls)), output_type=RAW_RECORD
    )
    (tmp_path / "markers").mkdir()
    markers = str(tmp_path / "markers")
    outputs = build_pipeline(
        released, settings, lambda s, seg: MarkingDeployedSegmentUsers(s, seg, markers), control_records=control
    )
    tagged = outputs.transitions.map(lambda r: ("T", r[0], r[1], r[2], r[3], r[4], r[5].hex()), output_type=COLLECTED)
    shadow = outputs.shadow_transitions.map(
        lambda r: ("S", r[0], "", "", 0, 0, bytes(r[1]).hex()), output_type=COLLECTED
    )
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    codec = catalog.codec("SegmentTransition")
    collected = run_and_collect(env, tagged.union(shadow), out_dir)

    def comparable(record: dict) -> str:
        return json.dumps({k: v for k, v in record.items() if k != "emitted_at"}, sort_keys=True)

    job = sorted(comparable(codec.decode(bytes.fromhex(c[6]))) for c in collected if c[0] == "T")
    job_shadow = sorted(comparable(codec.decode(bytes.fromhex(c[6]))) for c in collected if c[0] == "S")
    assert job == sorted(comparable(t.to_record(0)) for t in result.transitions)
    assert job_shadow == sorted(comparable(t.to_record(0)) for t in result.shadow_transitions)
    assert any(t.cause == "DEPLOYMENT" for t in result.transitions) and result.shadow_transitions
