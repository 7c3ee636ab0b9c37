"""Issue 17's first step: a keyed stream connected to a broadcast stream through a
KeyedBroadcastProcessFunction runs embedded in the JVM in thread mode (PyFlink falls back to
process mode silently for operators it has no embedded version of), and every keyed subtask sees
the broadcast state written before its keyed elements arrive. The same body in process mode shows
the mode check can fail. And one defect of PyFlink 2.0.2's thread mode a design must work around:
side outputs yielded by such a function's on_timer land on its main output."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import pytest
from pyflink.common import Types
from pyflink.datastream import KeyedBroadcastProcessFunction, MapFunction, OutputTag
from pyflink.datastream.state import MapStateDescriptor

from jobs.flink_environment import create_environment
from jobs.settings import load_settings

pytestmark = pytest.mark.flink

DEPLOYMENTS = MapStateDescriptor("deployments", Types.STRING(), Types.STRING())
# (input, operator instance, active version seen, pid of the interpreter the function ran in)
SEEN = Types.TUPLE([Types.STRING(), Types.STRING(), Types.STRING(), Types.LONG()])
PARALLELISM = 2
USERS = [f"user-{n}" for n in range(16)]
WAIT_FOR_BROADCAST_S = 60


class ActiveVersionPerUser(KeyedBroadcastProcessFunction):
    """Stores each broadcast deployment as the active version, and tags every keyed element with
    the active version its subtask sees. Each instance names itself (a random id made in open():
    PyFlink 2.0.2's thread mode fails on get_index_of_this_subtask()) and leaves a marker file
    once it has stored a deployment, which is what releases the keyed input."""

    def __init__(self, markers: str):
        self.markers = markers

    def open(self, runtime_context):
        self.instance = uuid.uuid4().hex

    def process_broadcast_element(self, value, ctx):
        ctx.get_broadcast_state(DEPLOYMENTS).put("active", value)
        (Path(self.markers) / self.instance).touch()
        yield "broadcast", self.instance, value, os.getpid()

    def process_element(self, value, ctx):
        active = ctx.get_broadcast_state(DEPLOYMENTS).get("active")
        yield ctx.get_current_key(), self.instance, active or "", os.getpid()


class AfterEverySubtaskStoredTheDeployment(MapFunction):
    """Holds the keyed input back until every subtask of the broadcast function has left its
    marker (`markers_expected` of them: one per subtask and broadcast element): the two inputs of
    a connected operator are otherwise read in no fixed order."""

    def __init__(self, markers: str, markers_expected: int = PARALLELISM):
        self.markers = markers
        self.expected = markers_expected
        self.released = False

    def map(self, value):
        deadline = time.monotonic() + WAIT_FOR_BROADCAST_S
        while not self.released:
            if len(list(Path(self.markers).iterdir())) >= self.expected:
                self.released = True
            elif time.monotonic() > deadline:
                raise TimeoutError(f"the broadcast elements did not reach every subtask ({self.expected} markers)")
            else:
                time.sleep(0.05)
        return value


def environment(execution_mode: str, parallelism: int):
    # No restarts: a failing job must fail the test, not retry it until the timeout.
    settings = load_settings(
        environ={}, redis_url="", parallelism=parallelism, execution_mode=execution_mode, restart_strategy="none"
    )
    return create_environment(settings)


def run_keyed_broadcast(execution_mode: str, markers: Path) -> list[tuple]:
    env = environment(execution_mode, PARALLELISM)
    deployments = env.from_collection(["v2"], type_info=Types.STRING()).broadcast(DEPLOYMENTS)
    users = (
        env.from_collection(USERS, type_info=Types.STRING())
        .map(AfterEverySubtaskStoredTheDeployment(str(markers)), output_type=Types.STRING())
        .set_parallelism(1)
        .key_by(lambda user: user, key_type=Types.STRING())
    )
    seen = users.connect(deployments).process(ActiveVersionPerUser(str(markers)), output_type=SEEN)
    with seen.execute_and_collect() as results:
        return [tuple(r) for r in results]


def jvm_pid() -> int:
    from pyflink.java_gateway import get_gateway

    return get_gateway().jvm.java.lang.ProcessHandle.current().pid()


@pytest.mark.parametrize("execution_mode", ["thread", "process"])
def test_a_keyed_broadcast_function_runs_in_the_jvm_only_in_thread_mode_and_every_subtask_sees_the_state(
    execution_mode, tmp_path
):
    seen = run_keyed_broadcast(execution_mode, tmp_path)

    broadcast = [s for s in seen if s[0] == "broadcast"]
    keyed = [s for s in seen if s[0] != "broadcast"]
    # The broadcast element reached every subtask, and each stored it in its own copy.
    assert sorted(s[2] for s in broadcast) == ["v2"] * PARALLELISM
    assert len({s[1] for s in broadcast}) == PARALLELISM
    # Every user's element came after it and saw it, on both subtasks (keys spread over both).
    assert sorted(s[0] for s in keyed) == sorted(USERS)
    assert {s[2] for s in keyed} == {"v2"}
    assert {s[1] for s in keyed} == {s[1] for s in broadcast}
    # Where the function ran: embedded in the MiniCluster's JVM (the py4j gateway's process) in
    # thread mode; in process mode in a Beam harness outside the JVM, here this very process
    # (on a local MiniCluster PyFlink serves the Python workers from the client, "loopback").
    pids = {s[3] for s in seen}
    assert jvm_pid() != os.getpid()
    assert pids == ({jvm_pid()} if execution_mode == "thread" else {os.getpid()})


DEAD_LETTERS = OutputTag("dead-letters", Types.STRING())


class SideOutputsFromElementsAndTimers(KeyedBroadcastProcessFunction):
    """Yields a main and a side output from process_element and from on_timer, as the job's
    keyed function does (its timers dead-letter quarantined state)."""

    def process_broadcast_element(self, value, ctx):
        ctx.get_broadcast_state(DEPLOYMENTS).put("active", value)
        return iter(())

    def process_element(self, value, ctx):
        # Fires at the end of the bounded input, with the final watermark.
        ctx.timer_service().register_event_time_timer(1_000)
        yield DEAD_LETTERS, f"element {ctx.get_current_key()}"
        yield f"element {ctx.get_current_key()}"

    def on_timer(self, timestamp, ctx):
        yield DEAD_LETTERS, f"timer {ctx.get_current_key()}"
        yield f"timer {ctx.get_current_key()}"


def where_it_landed(output: str, value) -> str:
    # A (tag, value) pair on the main output is a side output PyFlink did not route.
    if isinstance(value, tuple):
        return f"{output} unrouted {value[1]}"
    return f"{output} {value}"


@pytest.mark.parametrize("execution_mode", ["thread", "process"])
def test_side_outputs_of_a_keyed_broadcast_timer_land_on_the_main_output_in_thread_mode(execution_mode):
    """PyFlink 2.0.2, fn_execution/datastream/embedded/operations.py lines 239-240: thread mode
    passes on_timer's results on without the side-output routing every other path has, so a
    (tag, value) pair reaches the main output unconverted (with a typed main output, the job
    fails). Process mode routes them. If this test fails, PyFlink fixed it: update
    docs/architecture.md ("Broadcast state in thread mode")."""
    env = environment(execution_mode, 1)
    deployments = env.from_collection(["v2"], type_info=Types.STRING()).broadcast(DEPLOYMENTS)
    users = env.from_collection(["a", "b"], type_info=Types.STRING()).key_by(lambda u: u, key_type=Types.STRING())
    out = users.connect(deployments).process(SideOutputsFromElementsAndTimers(), output_type=Types.STRING())
    both = out.map(lambda v: where_it_landed("main", v), output_type=Types.STRING()).union(
        out.get_side_output(DEAD_LETTERS).map(lambda v: where_it_landed("side", v), output_type=Types.STRING())
    )
    with both.execute_and_collect() as results:
        landed = sorted(results)

    routed = ["side timer a", "side timer b"] if execution_mode == "process" else []
    unrouted = ["main unrouted timer a", "main unrouted timer b"] if execution_mode == "thread" else []
    assert landed == sorted(
        ["main element a", "main element b", "main timer a", "main timer b", "side element a", "side element b"]
        + routed
        + unrouted
    )
