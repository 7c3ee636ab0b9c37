"""The job's Flink environment: thread mode with this interpreter, the connector and operator jars,
checkpoints (exactly-once, retained on cancellation), the state backend, the restart strategy and
the buffer timeout, all from the settings."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from pyflink.common import Configuration
from pyflink.datastream import StreamExecutionEnvironment

from jobs.settings import JobSettings

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def python_worker_path() -> str:
    """What the embedded (thread-mode) interpreter needs on its path: the venv's packages (PEMJA
    itself: without them it fails with "No module named 'pemja'") and this project."""
    import site

    return os.pathsep.join([str(PROJECT_ROOT), *site.getsitepackages()])


def create_environment(settings: JobSettings) -> StreamExecutionEnvironment:
    os.environ["PYTHONPATH"] = python_worker_path()
    conf = Configuration()
    conf.set_string("python.execution-mode", settings.execution_mode)
    conf.set_string("python.executable", sys.executable)
    conf.set_string("python.client.executable", sys.executable)
    jars = sorted(Path(settings.jars_dir).glob("*.jar"))
    if jars:
        conf.set_string("pipeline.jars", ";".join(p.as_uri() for p in jars))
    conf.set_string("execution.checkpointing.interval", f"{settings.checkpoint_interval_ms} ms")
    conf.set_string("execution.checkpointing.mode", "EXACTLY_ONCE")
    conf.set_string("execution.checkpointing.externalized-checkpoint-retention", "RETAIN_ON_CANCELLATION")
    conf.set_string("state.backend.type", settings.state_backend)
    if settings.state_backend == "rocksdb":
        conf.set_string("execution.checkpointing.incremental", "true")
        conf.set_string("state.backend.rocksdb.timer-service.factory", settings.timer_service.upper())
    conf.set_string("restart-strategy.type", settings.restart_strategy)
    if settings.restart_strategy == "exponential-delay":
        conf.set_string("restart-strategy.exponential-delay.initial-backoff", "1 s")
        conf.set_string("restart-strategy.exponential-delay.max-backoff", f"{settings.restart_max_backoff_ms} ms")
    elif settings.restart_strategy == "fixed-delay":
        conf.set_string("restart-strategy.fixed-delay.attempts", str(2**31 - 1))
        conf.set_string("restart-strategy.fixed-delay.delay", f"{settings.restart_max_backoff_ms} ms")
    if settings.checkpoint_dir:
        conf.set_string("execution.checkpointing.dir", settings.checkpoint_dir)
    conf.set_string("pipeline.name", settings.job_name)
    # Chained Java operators (Table conversions, sinks) hand records on without a deep copy; the
    # Python functions never see those objects (PyFlink converts at the boundary).
    conf.set_string("pipeline.object-reuse", "true")
    conf.set_string("execution.buffer-timeout", f"{settings.buffer_timeout_ms} ms")
    env = StreamExecutionEnvironment.get_execution_environment(conf)
    env.set_parallelism(settings.parallelism)
    env.set_max_parallelism(settings.max_parallelism)
    return env
