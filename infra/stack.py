"""The local stack: a tansu broker, Redis, topics, and a standalone Flink cluster (JobManager +
TaskManager from PyFlink's own distribution, in a Flink home owned by the project).

Every process started here is recorded in `<stack dir>/pids` and stopped by `down`; every log goes
to `<stack dir>/logs`. Ports come from `StackPorts` (flags or SEGMENTS_STACK_* variables).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pyflink

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("SEGMENTS_CACHE", Path.home() / ".cache" / "segments"))
TANSU = CACHE / "bin" / "tansu"
PYFLINK_HOME = Path(pyflink.__file__).resolve().parent


def stack_dir() -> Path:
    return Path(os.environ.get("SEGMENTS_STACK_DIR", PROJECT_ROOT / ".stack"))


PROMETHEUS_PORTS = 4


@dataclass(frozen=True)
class StackPorts:
    broker: int = 9092
    redis: int = 6390
    flink_rest: int = 8081
    flink_rpc: int = 6123
    # Prometheus reporter: the JobManager and the TaskManager each take the first free port of
    # [prometheus, prometheus + PROMETHEUS_PORTS).
    prometheus: int = 9249

    @classmethod
    def from_env(cls) -> StackPorts:
        env = os.environ
        return cls(
            broker=int(env.get("SEGMENTS_STACK_BROKER_PORT", cls.broker)),
            redis=int(env.get("SEGMENTS_STACK_REDIS_PORT", cls.redis)),
            flink_rest=int(env.get("SEGMENTS_STACK_FLINK_REST_PORT", cls.flink_rest)),
            flink_rpc=int(env.get("SEGMENTS_STACK_FLINK_RPC_PORT", cls.flink_rpc)),
            prometheus=int(env.get("SEGMENTS_STACK_PROMETHEUS_PORT", cls.prometheus)),
        )


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """`count` distinct ports free now. Held open together while they are picked: the kernel may
    hand the port of a socket just closed to the next bind, and two services given one port
    fail strangely (the second cannot listen, and its clients reach the first)."""
    with contextlib.ExitStack() as held:
        sockets = [held.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


def wait_for_port(port: int, timeout_s: float = 30.0, what: str = "service") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"{what} did not open port {port} within {timeout_s:.0f} s")


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.3):
            return True
    except OSError:
        return False


class ManagedProcess:
    """A child process in its own session (so its whole tree can be signalled), with its log under
    `<root>/logs` and its pid under `<root>/pids`, so that a later `down`, another process, can
    stop it too. The process that started it also holds its Popen: it reaps the child (no zombie
    that looks alive) and knows its exit code."""

    def __init__(self, name: str, root: Path):
        self.name = name
        self.pid_file = root / "pids" / f"{name}.pid"
        self.log_file = root / "logs" / f"{name}.log"
        self.popen: subprocess.Popen | None = None
        self.launched_at: float | None = None

    def start(self, argv: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> int:
        self.pid_file.parent.mkdir(parents=True, exist_ok=True)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        if self.running():
            return self.pid()
        self.launched_at = time.time()
        with open(self.log_file, "ab") as log:
            self.popen = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=cwd,
                start_new_session=True,
            )
        self.pid_file.write_text(str(self.popen.pid))
        return self.popen.pid

    def pid(self) -> int | None:
        if self.popen is not None:
            return self.popen.pid
        try:
            return int(self.pid_file.read_text())
        except (FileNotFoundError, ValueError):
            return None

    def running(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        pid = self.pid()
        if pid is None:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 10.0) -> None:
        """`sig` to the process group, SIGKILL to it after `timeout_s`."""
        pid = self.pid()
        if pid is not None and self.running():
            try:
                os.killpg(pid, sig)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + timeout_s
            while self.running() and time.monotonic() < deadline:
                time.sleep(0.05)
            if self.running():
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                if self.popen is not None:
                    self.popen.wait(10)
        self.pid_file.unlink(missing_ok=True)


def start_broker(root: Path, port: int, advertised_port: int | None = None) -> ManagedProcess:
    """tansu on `port`, telling clients to come back to `advertised_port` (default: the same; the
    tests' SASL gate, tests/e2e/sasl_gate.py, advertises its own)."""
    if not TANSU.exists():
        raise FileNotFoundError(f"{TANSU} is missing: run infra/setup.sh")
    broker = ManagedProcess("broker", root)
    url = f"tcp://127.0.0.1:{port}"
    advertised = f"tcp://127.0.0.1:{advertised_port or port}"
    broker.start([str(TANSU), "broker", "--listener-url", url, "--advertised-listener-url", advertised])
    wait_for_port(port, what="tansu broker")
    return broker


def start_redis(root: Path, port: int) -> ManagedProcess:
    redis = ManagedProcess("redis", root)
    binary = shutil.which("redis-server")
    if binary is None:
        raise FileNotFoundError("redis-server is not installed: run infra/setup.sh, or set REDIS_URL")
    redis.start(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(root)]
    )
    wait_for_port(port, what="redis-server")
    return redis


def create_topics(
    bootstrap: str,
    partitions: dict[str, int],
    client_config: dict | None = None,
    configs: dict[str, dict[str, str]] | None = None,
) -> None:
    """Creates the topics with explicit partition counts and the given topic configurations (e.g.
    the dead-letter topic's retention.ms); existing ones are left as they are.
    `client_config`: librdkafka security properties (KafkaSecurity.librdkafka_config)."""
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap, **(client_config or {})})
    existing = admin.list_topics(timeout=10).topics
    wanted = [NewTopic(t, n, 1, config=(configs or {}).get(t, {})) for t, n in partitions.items() if t not in existing]
    for future in admin.create_topics(wanted).values() if wanted else []:
        future.result(timeout=30)


# --- standalone Flink cluster --------------------------------------------------------------------


def flink_home(root: Path) -> Path:
    return root / "flink"


def prepare_flink_home(root: Path, ports: StackPorts, task_slots: int = 2) -> Path:
    """A Flink home of our own: PyFlink's scripts and jars, our conf, logs and pid files.

    flink-python goes into lib/ so PEMJA loads parent-first: thread mode on a standalone cluster
    fails with NoSuchFieldException: loadedLibraryNames otherwise (PEMJA loading its native
    library through the job's user class loader)."""
    home = flink_home(root)
    if home.exists():
        shutil.rmtree(home)
    shutil.copytree(PYFLINK_HOME / "bin", home / "bin")
    (home / "lib").mkdir(parents=True)
    for jar in [*(PYFLINK_HOME / "lib").glob("*.jar"), *(PYFLINK_HOME / "opt").glob("flink-python-*.jar")]:
        (home / "lib" / jar.name).symlink_to(jar)
    # opt/ as a real folder: the CLI finds flink-python there and finds none behind a linked folder.
    (home / "opt").mkdir()
    for jar in (PYFLINK_HOME / "opt").glob("*.jar"):
        (home / "opt" / jar.name).symlink_to(jar)
    if (PYFLINK_HOME / "plugins").exists():
        (home / "plugins").symlink_to(PYFLINK_HOME / "plugins")
    (home / "conf").mkdir()
    for name in ("log4j.properties", "log4j-cli.properties", "log4j-console.properties"):
        shutil.copy(PYFLINK_HOME / "conf" / name, home / "conf" / name)
    import yaml

    # Keep the distribution's JVM flags (Java 17 module opens Flink needs), set everything else.
    java_opts = yaml.safe_load((PYFLINK_HOME / "conf" / "config.yaml").read_text())["env"]["java"]["opts"]["all"]
    (home / "conf" / "config.yaml").write_text(
        "\n".join(
            [
                f"env.java.opts.all: {java_opts}",
                "jobmanager.rpc.address: 127.0.0.1",
                "jobmanager.bind-host: 127.0.0.1",
                f"jobmanager.rpc.port: {ports.flink_rpc}",
                "jobmanager.memory.process.size: 1024m",
                "taskmanager.bind-host: 127.0.0.1",
                "taskmanager.host: 127.0.0.1",
                "taskmanager.memory.process.size: 2048m",
                f"taskmanager.numberOfTaskSlots: {task_slots}",
                "rest.address: 127.0.0.1",
                "rest.bind-address: 127.0.0.1",
                f"rest.port: {ports.flink_rest}",
                "parallelism.default: 1",
                # A TaskManager that dies is declared lost after two failed heartbeats (connection
                # refused) or 10 s of silence, not the default 50 s: the job restarts sooner.
                "heartbeat.interval: 2000",
                "heartbeat.timeout: 10000",
                f"python.executable: {sys.executable}",
                f"python.client.executable: {sys.executable}",
                f"execution.checkpointing.dir: file://{root / 'checkpoints'}",
                f"execution.checkpointing.savepoint-dir: file://{root / 'savepoints'}",
                # Metrics for Prometheus (the reporter is a plugin shipped with PyFlink).
                "metrics.reporter.prom.factory.class: org.apache.flink.metrics.prometheus.PrometheusReporterFactory",
                f"metrics.reporter.prom.port: {ports.prometheus}-{ports.prometheus + PROMETHEUS_PORTS - 1}",
                "",
            ]
        )
    )
    (home / "conf" / "masters").write_text(f"127.0.0.1:{ports.flink_rest}\n")
    (home / "conf" / "workers").write_text("127.0.0.1\n")
    return home


# What pyflink sets in its own process's environment once it has run a job there (a MiniCluster in
# thread mode): FLINK_LIB_DIR, FLINK_OPT_DIR and FLINK_PLUGINS_DIR would point a child's scripts at
# the wheel's lib/ (no flink-python there) instead of a home's, and PYFLINK_GATEWAY_DISABLED makes a
# child's pyflink refuse to start its gateway ("launching the PythonGatewayServer during Python UDF
# execution"): `segments run` started by a process that ran a job before fails at once.
PYFLINK_PROCESS_VARIABLES = ("FLINK_LIB_DIR", "FLINK_OPT_DIR", "FLINK_PLUGINS_DIR", "PYFLINK_GATEWAY_DISABLED")


def child_environment() -> dict[str, str]:
    """This process's environment for a child that runs Flink or pyflink of its own."""
    return {k: v for k, v in os.environ.items() if k not in PYFLINK_PROCESS_VARIABLES}


def flink_env(root: Path) -> dict[str, str]:
    from jobs.flink_environment import python_worker_path

    env = child_environment()
    env.update(
        FLINK_HOME=str(flink_home(root)),
        FLINK_CONF_DIR=str(flink_home(root) / "conf"),
        FLINK_LOG_DIR=str(root / "logs"),
        FLINK_PID_DIR=str(root / "pids"),
        # The embedded interpreter of thread mode needs the venv's packages and our code.
        PYTHONPATH=python_worker_path(),
    )
    return env


def start_flink_cluster(root: Path, ports: StackPorts, taskmanagers: int = 1) -> None:
    """A JobManager and `taskmanagers` TaskManagers: one TaskManager holds two slots (both keyed
    subtasks share its one embedded Python interpreter in thread mode); several hold one slot each,
    the layout to scale out with (a slot per process, so per interpreter and per core)."""
    if not 1 <= taskmanagers < PROMETHEUS_PORTS:
        raise ValueError(f"taskmanagers: 1 to {PROMETHEUS_PORTS - 1} on the local stack (one metrics port each)")
    home = prepare_flink_home(root, ports, task_slots=2 if taskmanagers == 1 else 1)
    (root / "logs").mkdir(parents=True, exist_ok=True)  # Flink's daemon scripts do not create it
    env = flink_env(root)
    for script in ("jobmanager.sh", *["taskmanager.sh"] * taskmanagers):
        subprocess.run(
            [str(home / "bin" / script), "start"],
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    wait_for_taskmanager(ports.flink_rest, count=taskmanagers)


def start_taskmanager(root: Path) -> None:
    """One more TaskManager for the running cluster (e.g. to replace one that died)."""
    subprocess.run(
        [str(flink_home(root) / "bin" / "taskmanager.sh"), "start"],
        env=flink_env(root),
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def taskmanager_pids(root: Path) -> list[int]:
    """The live TaskManager processes started from this stack's Flink home (Flink's pid file)."""
    pids = []
    for pid_file in (root / "pids").glob("flink-*-taskexecutor.pid"):
        for line in pid_file.read_text().split():
            try:
                os.kill(int(line), 0)
            except (ValueError, ProcessLookupError):
                continue
            pids.append(int(line))
    return pids


def wait_for_taskmanager(rest_port: int, timeout_s: float = 90.0, count: int = 1) -> None:
    import json
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{rest_port}/taskmanagers", timeout=2) as r:
                if len(json.load(r).get("taskmanagers", [])) >= count:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(
        f"fewer than {count} TaskManager(s) registered with the JobManager on :{rest_port} in {timeout_s:.0f} s"
    )


def stop_flink_cluster(root: Path) -> None:
    home = flink_home(root)
    if not (home / "bin").exists():
        return
    env = flink_env(root)
    for script in ("taskmanager.sh", "jobmanager.sh"):
        subprocess.run(
            [str(home / "bin" / script), "stop-all"],
            env=env,
            check=False,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )


# --- the whole stack -----------------------------------------------------------------------------


def up(
    ports: StackPorts,
    with_flink: bool = False,
    partitions: dict[str, int] | None = None,
    taskmanagers: int = 1,
    topic_configs: dict[str, dict[str, str]] | None = None,
) -> dict[str, str]:
    root = stack_dir()
    root.mkdir(parents=True, exist_ok=True)
    start_broker(root, ports.broker)
    bootstrap = f"127.0.0.1:{ports.broker}"
    if partitions:
        create_topics(bootstrap, partitions, configs=topic_configs)
    redis_url = os.environ.get("REDIS_URL")
    if not redis_url:
        start_redis(root, ports.redis)
        redis_url = f"redis://127.0.0.1:{ports.redis}/0"
    if with_flink:
        start_flink_cluster(root, ports, taskmanagers)
    return {"bootstrap_servers": bootstrap, "redis_url": redis_url}


def down() -> None:
    root = stack_dir()
    stop_flink_cluster(root)
    for name in ("broker", "redis"):
        ManagedProcess(name, root).stop()


def status(ports: StackPorts) -> dict[str, str]:
    root = stack_dir()
    out = {}
    for name, port in (("broker", ports.broker), ("redis", ports.redis)):
        proc = ManagedProcess(name, root)
        out[name] = f"running (pid {proc.pid()}, port {port})" if proc.running() else "stopped"
    if os.environ.get("REDIS_URL"):
        out["redis"] = "external (REDIS_URL)"
    out["flink"] = f"running (REST :{ports.flink_rest})" if port_open(ports.flink_rest) else "stopped"
    out["logs"] = str(root / "logs")
    return out


def redact_url(url: str) -> str:
    from jobs.settings import redact_url as redacted

    return redacted(url)
