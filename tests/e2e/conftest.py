"""Real parts for end-to-end tests: a tansu broker and a redis-server on free ports, started and
stopped by the tests themselves, and the job run as its own process (`segments run`)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from infra.stack import (
    ManagedProcess,
    StackPorts,
    child_environment,
    free_port,
    free_ports,
    start_broker,
    start_flink_cluster,
    start_redis,
    stop_flink_cluster,
    wait_for_port,
)
from jobs.kafka_security import KafkaSecurity

PROJECT_ROOT = Path(__file__).resolve().parents[2]
# Of this environment's SEGMENTS_* variables, what the job's process needs too (the stack's own
# variables are set per test).
KEPT_TOOLING_VARIABLES = ("SEGMENTS_CACHE", "SEGMENTS_VENV")


@pytest.fixture
def stack_root(tmp_path) -> Path:
    root = tmp_path / "stack"
    root.mkdir()
    return root


@pytest.fixture
def broker(stack_root):
    port = free_port()
    proc = start_broker(stack_root, port)
    yield f"127.0.0.1:{port}"
    proc.stop()


class SecuredBroker:
    """tansu behind the SASL gate (tests/e2e/sasl_gate.py), with TLS or not: `bootstrap` is the gate's
    address, the only one clients get; the user's password is in the environment variable
    `password_variable` of this process (monkeypatched) and so of the processes it starts."""

    username = "alice"
    password = "alice-scram-secret-4f1c"
    password_variable = "KAFKA_TEST_PASSWORD"  # no SEGMENTS_ prefix: not a setting

    def __init__(self, bootstrap: str, ca_file: Path | None, client_pem: Path | None):
        self.bootstrap = bootstrap
        self.ca_file = ca_file  # None: SASL_PLAINTEXT
        self.client_pem = client_pem  # the client's key and certificate, when the gate requires one

    def settings(self, mechanism: str = "SCRAM-SHA-512") -> dict[str, str]:
        """The job's settings for this broker (SEGMENTS_* names without the prefix)."""
        client = (
            {"kafka_ssl_certificate_location": str(self.client_pem), "kafka_ssl_key_location": str(self.client_pem)}
            if self.client_pem
            else {}
        )
        tls = {"kafka_ssl_ca_location": str(self.ca_file)} if self.ca_file else {}
        return {
            "bootstrap_servers": self.bootstrap,
            "kafka_security_protocol": "SASL_SSL" if self.ca_file else "SASL_PLAINTEXT",
            "kafka_sasl_mechanism": mechanism,
            "kafka_sasl_username": self.username,
            "kafka_sasl_password": f"env:{self.password_variable}",
            **tls,
            **client,
        }

    def security(self, mechanism: str = "SCRAM-SHA-512") -> KafkaSecurity:
        return KafkaSecurity(
            **{k[len("kafka_") :]: v for k, v in self.settings(mechanism).items() if k.startswith("kafka_")}
        )


def self_signed(directory: Path, name: str, *extra: str) -> tuple[Path, Path]:
    """A throw-away self-signed certificate (its own CA) and its unencrypted PKCS#8 key."""
    cert, key = directory / f"{name}.pem", directory / f"{name}-key.pem"
    run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            f"/CN={name}",
            *extra,
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ]
    )
    return cert, key


@pytest.fixture(params=["tls"])
def secured_broker(stack_root, monkeypatch, request):
    """A broker that requires SASL over TLS: tansu on a private port, advertising the gate's. The
    indirect parameter: "tls" (the default), "mutual-tls" (the gate also requires a client
    certificate) or "plaintext" (SASL without TLS)."""
    import json

    tls_dir = stack_root / "tls"
    tls_dir.mkdir()
    cert, key = self_signed(tls_dir, "localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost")
    tls_files = [str(cert), str(key)] if request.param != "plaintext" else []
    client_pem = None
    if request.param == "mutual-tls":
        client_cert, client_key = self_signed(tls_dir, "segments-client")
        client_pem = tls_dir / "client.pem"  # key and chain in one file: the Java client's PEM key store
        client_pem.write_text(client_key.read_text() + client_cert.read_text())
        tls_files.append(str(client_cert))
    users = stack_root / "sasl-users.json"
    users.write_text(json.dumps({SecuredBroker.username: SecuredBroker.password}))
    broker_port, gate_port = free_ports(2)
    broker = start_broker(stack_root, broker_port, advertised_port=gate_port)
    gate = ManagedProcess("sasl-gate", stack_root)
    gate.start(
        [
            sys.executable,
            "-m",
            "tests.e2e.sasl_gate",
            str(gate_port),
            f"127.0.0.1:{broker_port}",
            str(users),
            *tls_files,
        ],
        cwd=PROJECT_ROOT,
    )
    try:
        wait_for_port(gate_port, what="SASL gate")
        monkeypatch.setenv(SecuredBroker.password_variable, SecuredBroker.password)
        yield SecuredBroker(f"127.0.0.1:{gate_port}", cert if tls_files else None, client_pem)
    finally:
        gate.stop()
        broker.stop()


@pytest.fixture
def redis_url(stack_root):
    port = free_port()
    proc = start_redis(stack_root, port)
    yield f"redis://127.0.0.1:{port}/0"
    proc.stop()


class RunningJob:
    def __init__(self, proc: ManagedProcess):
        self.proc = proc

    def log_tail(self, lines: int = 60) -> str:
        return self.proc.log_tail(lines)

    def assert_alive(self) -> None:
        assert self.proc.running(), f"the job exited early:\n{self.log_tail()}"


@pytest.fixture
def run_job(stack_root):
    """Starts `segments run` with the given settings as SEGMENTS_* variables; stops it after."""
    started: list[ManagedProcess] = []

    def start(name: str = "job", **settings) -> RunningJob:
        proc = ManagedProcess(name, stack_root)
        proc.start([sys.executable, "-m", "jobs.cli", "run"], env=job_environment(stack_root, name, settings))
        started.append(proc)
        return RunningJob(proc)

    yield start
    for proc in started:
        proc.stop()


def job_environment(stack_root: Path, name: str, settings: dict) -> dict[str, str]:
    """The job's environment: this one's without its job settings (the test's only count), but
    with the tooling's (SEGMENTS_CACHE, where setup put the connector jars; SEGMENTS_VENV)."""
    env = {
        k: v
        for k, v in child_environment().items()
        if not (k.startswith("SEGMENTS_") and k not in KEPT_TOOLING_VARIABLES) and k != "REDIS_URL"
    }
    env.update({f"SEGMENTS_{k.upper()}": str(v) for k, v in settings.items()})
    env["SEGMENTS_CHECKPOINT_DIR"] = (stack_root / f"checkpoints-{name}").as_uri()
    env["SEGMENTS_STACK_DIR"] = str(stack_root)
    return env


@pytest.fixture
def flink_cluster(stack_root, request):
    """A standalone JobManager + TaskManager(s) started the way `segments stack up --flink
    [--taskmanagers N]` does: one with two slots, or N of one slot each (indirect parameter N)."""
    ports = StackPorts(broker=0, redis=0, flink_rest=free_port(), flink_rpc=free_port(), prometheus=free_port())
    os.environ["SEGMENTS_STACK_DIR"] = str(stack_root)
    try:
        start_flink_cluster(stack_root, ports, getattr(request, "param", 1))
        yield ports
    finally:
        stop_flink_cluster(stack_root)
        del os.environ["SEGMENTS_STACK_DIR"]


class SubmittedJob(RunningJob):
    """A job on the standalone cluster; alive while the cluster has it RUNNING or restarting."""

    def __init__(self, stack_root: Path, rest_port: int, prometheus_port: int):
        self.stack_root = stack_root
        self.rest_port = rest_port
        self.prometheus_port = prometheus_port

    def state(self) -> str:
        import json
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.rest_port}/jobs/overview", timeout=5) as r:
            jobs = json.load(r)["jobs"]
        return jobs[0]["state"] if jobs else "NONE"

    def log_tail(self, lines: int = 60) -> str:
        logs = sorted((self.stack_root / "logs").glob("flink-*taskexecutor*.log"))
        return "\n".join(logs[-1].read_text(errors="replace").splitlines()[-lines:]) if logs else "(no log)"

    def assert_alive(self) -> None:
        assert self.state() in {"RUNNING", "CREATED", "INITIALIZING", "RESTARTING"}, self.log_tail()


@pytest.fixture
def submit_job(stack_root, flink_cluster):
    def submit(name: str = "job", **settings) -> SubmittedJob:
        env = job_environment(stack_root, name, settings)
        env["SEGMENTS_STACK_FLINK_REST_PORT"] = str(flink_cluster.flink_rest)
        done = subprocess.run(
            [sys.executable, "-m", "jobs.cli", "submit", "--detached"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return SubmittedJob(stack_root, flink_cluster.flink_rest, flink_cluster.prometheus)

    return submit


def wait_until(predicate, timeout_s: float, interval_s: float = 1.0, on_timeout=lambda: ""):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s:.0f} s\n{on_timeout()}")
        time.sleep(interval_s)


def run(argv, **kw):
    return subprocess.run(argv, check=True, capture_output=True, text=True, **kw)
