"""Deployment files under infra/ parse and agree with the stack they describe.

No Docker or Kubernetes here: the compose file, the FlinkDeployment and the Dockerfile are parsed
and checked against the job's settings (jobs/settings.py), the local stack's ports
(infra/stack.py), the pinned versions (infra/requirements.lock) and the checksums infra/setup.sh
trusts. What they would do when run is not tested here."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from infra.stack import PROMETHEUS_PORTS, StackPorts
from jobs.settings import TOOLING_ENV_PREFIXES, JobSettings, load_settings

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
COMPOSE_FILE = INFRA / "docker-compose.yml"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
FLINK_DEPLOYMENT_FILE = INFRA / "k8s" / "flink-deployment.yaml"

PROMETHEUS_REPORTER = "org.apache.flink.metrics.prometheus.PrometheusReporterFactory"
PYTHON_DRIVER = "org.apache.flink.client.python.PythonDriver"
DURABLE_SCHEMES = {"s3", "s3a", "s3p", "gs", "abfs", "abfss", "wasbs", "hdfs", "oss"}
# Any setting will do for REDIS_URL where a file takes it from a Secret.
SECRET_REDIS_URL = "redis://:secret@redis.example:6379/0"


def test_the_prometheus_scrape_config_covers_the_stack_reporter_ports():
    config = yaml.safe_load((INFRA / "prometheus.yml").read_text())
    [job] = config["scrape_configs"]
    targets = {t for c in job["static_configs"] for t in c["targets"]}
    first = StackPorts().prometheus
    assert targets == {f"127.0.0.1:{port}" for port in range(first, first + PROMETHEUS_PORTS)}


# --- reading the files ---------------------------------------------------------------------------

COMPOSE_VARIABLE = re.compile(r"\$\$|\$\{(\w+)(?::?-([^}]*))?\}|\$(\w+)")


def compose_value(text) -> str:
    """A compose value as compose would use it with no variable set: `${VAR:-default}` becomes the
    default and `$$` a `$`. A variable without a default would leave the file unusable as it is."""

    def substitute(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1) or match.group(3)
        assert match.group(2) is not None, f"compose variable {name} has no default"
        return match.group(2)

    return COMPOSE_VARIABLE.sub(substitute, str(text))


def compose_environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {name: compose_value(value) for name, value in env.items()}


def flink_properties(service: dict) -> dict[str, str]:
    """FLINK_PROPERTIES as the official image's entrypoint reads it: one `key: value` a line,
    whitespace removed, split at the first colon."""
    text = compose_environment(service)["FLINK_PROPERTIES"]
    properties = {}
    for line in text.splitlines():
        compact = "".join(line.split())
        if compact:
            key, _, value = compact.partition(":")
            properties[key] = value
    return properties


def published_ports(service: dict) -> dict[int, int]:
    """container port -> host port."""
    out = {}
    for entry in service.get("ports", []):
        host, container = compose_value(entry).rsplit(":", 2)[-2:]
        out[int(container)] = int(host)
    return out


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    logical, current = [], ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") or (not current and not line.strip()):
            continue  # Docker drops comment lines, inside a continued instruction too
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    out = []
    for line in logical:
        keyword, _, arguments = line.strip().partition(" ")
        out.append((keyword.upper(), arguments.strip()))
    return out


def dockerfile_env(instructions) -> dict[str, str]:
    env = {}
    for keyword, arguments in instructions:
        if keyword == "ENV":
            env.update(token.split("=", 1) for token in shlex.split(arguments))
    return env


def dockerfile_args(instructions) -> dict[str, str]:
    return dict(arguments.split("=", 1) for keyword, arguments in instructions if keyword == "ARG" and "=" in arguments)


def dockerfile_copies(instructions) -> list[tuple[list[str], str, bool]]:
    """(sources, destination, from another stage) per COPY."""
    out = []
    for keyword, arguments in instructions:
        if keyword == "COPY":
            tokens = arguments.split()
            flags = [t for t in tokens if t.startswith("--")]
            paths = [t for t in tokens if not t.startswith("--")]
            out.append((paths[:-1], paths[-1], any(f.startswith("--from=") for f in flags)))
    return out


def shell_assignments(text: str) -> dict[str, str]:
    return dict(re.findall(r"^([A-Z_]+)=(\S+)$", text, re.MULTILINE))


def pinned_version(package: str) -> str:
    [version] = re.findall(rf"^{re.escape(package)}==(\S+)$", (INFRA / "requirements.lock").read_text(), re.MULTILINE)
    return version


def duration_ms(text: str) -> int:
    """Flink's duration strings as used in these files: `5000 ms`, `30 s`, `1 min`."""
    number, unit = re.fullmatch(r"(\d+)\s*(ms|s|min)", text.strip()).groups()
    return int(number) * {"ms": 1, "s": 1000, "min": 60_000}[unit]


def settings_variables(env: dict[str, str]) -> dict[str, str]:
    return {name: value for name, value in env.items() if name.startswith("SEGMENTS_") or name == "REDIS_URL"}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


@pytest.fixture(scope="module")
def k8s_documents() -> list[dict]:
    return [doc for doc in yaml.safe_load_all(FLINK_DEPLOYMENT_FILE.read_text()) if doc]


@pytest.fixture(scope="module")
def flink_deployment(k8s_documents) -> dict:
    [deployment] = [doc for doc in k8s_documents if doc.get("kind") == "FlinkDeployment"]
    return deployment


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return dockerfile_instructions(DOCKERFILE.read_text())


def k8s_container_env(k8s_documents, deployment) -> dict[str, str]:
    """The SEGMENTS_* variables and REDIS_URL the job's pods get: from the ConfigMaps they name
    (which must be in the file) and their own env entries (a Secret's value replaced by an example)."""
    [container] = [
        c for c in deployment["spec"]["podTemplate"]["spec"]["containers"] if c["name"] == "flink-main-container"
    ]
    config_maps = {doc["metadata"]["name"]: doc for doc in k8s_documents if doc.get("kind") == "ConfigMap"}
    env = {}
    for source in container.get("envFrom", []):
        name = source["configMapRef"]["name"]
        assert name in config_maps, f"the pods read ConfigMap {name!r}, which this file does not define"
        env.update(config_maps[name]["data"])
    for entry in container.get("env", []):
        if "value" in entry:
            env[entry["name"]] = entry["value"]
        elif "secretKeyRef" in entry.get("valueFrom", {}):
            env[entry["name"]] = SECRET_REDIS_URL
    return env


# --- docker compose ------------------------------------------------------------------------------


def test_compose_has_the_pipeline_services_and_submits_only_on_demand(services):
    assert {"kafka", "redis", "topics", "jobmanager", "taskmanager", "submit"} <= set(services)
    assert services["submit"].get("profiles"), "the submission must not start with `docker compose up`"
    assert services["submit"]["command"][:3] == ["segments", "submit", "--detached"]
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert services["redis"]["image"].startswith("redis:")


def test_compose_and_kubernetes_run_the_redis_view_follower_against_the_jobs_topic_and_redis(services, k8s_documents):
    """docs/redis.md: beside a cluster, the view catches up after an outage only if the follower
    runs; it must read the topic the job writes and write the Redis the job writes."""
    follower = services["redis-follower"]
    assert follower["command"] == ["segments", "redis", "follow"]
    assert follower["restart"] == "unless-stopped"
    follows = load_settings(environ=settings_variables(compose_environment(follower)))
    submitted = load_settings(environ=settings_variables(compose_environment(services["submit"])))
    for name in ("bootstrap_servers", "redis_url", "transitions_topic", "redis_key_prefix"):
        assert getattr(follows, name) == getattr(submitted, name), name
    assert follows.redis_follower_metrics_port > 0
    [deployment] = [d for d in k8s_documents if d.get("kind") == "Deployment"]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    assert container["command"][-2:] == ["redis", "follow"] and deployment["spec"]["replicas"] == 1
    assert {"configMapRef": {"name": "segments-settings"}} in container["envFrom"]
    assert [e["valueFrom"]["secretKeyRef"]["name"] for e in container["env"] if e["name"] == "REDIS_VIEW_URL"] == [
        "segments-redis"
    ]


def test_compose_builds_the_flink_services_from_the_dockerfile(services):
    for name in ("jobmanager", "taskmanager", "submit"):
        build = services[name]["build"]
        context = (COMPOSE_FILE.parent / build["context"]).resolve()
        assert context == ROOT, f"{name}: the build context must be the repository (the COPY sources are)"
        assert (context / build["dockerfile"]).resolve() == DOCKERFILE
    assert len({services[name]["image"] for name in ("jobmanager", "taskmanager", "submit")}) == 1
    assert services["jobmanager"]["command"] == "jobmanager"
    assert services["taskmanager"]["command"] == "taskmanager"


def test_compose_kafka_runs_in_kraft_mode_without_zookeeper(services):
    env = compose_environment(services["kafka"])
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    node_id = env["KAFKA_NODE_ID"]
    voters = env["KAFKA_CONTROLLER_QUORUM_VOTERS"].split(",")
    assert any(v.startswith(f"{node_id}@") for v in voters), "the node must be a voter of its own quorum"
    assert env["CLUSTER_ID"], "the image formats KRaft storage with CLUSTER_ID"
    listener_names = {listener.split("://")[0] for listener in env["KAFKA_LISTENERS"].split(",")}
    assert env["KAFKA_CONTROLLER_LISTENER_NAMES"] in listener_names
    for name, service in services.items():
        assert "zookeeper" not in str(service.get("image", "")).lower(), name
        assert not any("ZOOKEEPER" in var for var in compose_environment(service)), name


def test_compose_kafka_allows_exactly_once_sinks_on_one_broker(services):
    env = compose_environment(services["kafka"])
    assert int(env["KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR"]) == 1
    assert int(env["KAFKA_TRANSACTION_STATE_LOG_MIN_ISR"]) == 1
    assert int(env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"]) == 1
    submitted = load_settings(environ=settings_variables(compose_environment(services["submit"])))
    max_timeout = int(env["KAFKA_TRANSACTION_MAX_TIMEOUT_MS"])
    assert max_timeout >= JobSettings().transaction_timeout_ms
    assert max_timeout >= submitted.transaction_timeout_ms


def test_compose_submission_settings_point_at_the_compose_services(services):
    settings = load_settings(environ=settings_variables(compose_environment(services["submit"])))
    kafka_env = compose_environment(services["kafka"])
    advertised = {a.split("://")[1] for a in kafka_env["KAFKA_ADVERTISED_LISTENERS"].split(",")}
    assert settings.bootstrap_servers in advertised
    assert settings.bootstrap_servers.split(":")[0] == "kafka", "the workers reach the broker by service name"
    assert urlparse(settings.redis_url).hostname == "redis"
    assert settings.state_backend == "rocksdb"
    cluster = flink_properties(services["jobmanager"])
    assert settings.checkpoint_dir == cluster["execution.checkpointing.dir"]
    assert settings.parallelism <= int(cluster["taskmanager.numberOfTaskSlots"]), "not enough slots for the job"
    # `segments submit` reaches the JobManager at 127.0.0.1:<rest port> through its network namespace.
    assert services["submit"]["network_mode"] == "service:jobmanager"
    rest_port = int(compose_environment(services["submit"]).get("SEGMENTS_STACK_FLINK_REST_PORT", 8081))
    assert rest_port in published_ports(services["jobmanager"])


def created_topics(script: str) -> dict[str, tuple[int, dict[str, str]]]:
    """The `create_topic NAME PARTITIONS [--config KEY=VALUE]...` lines of a topics script."""
    created = {}
    for name, partitions, rest in re.findall(r"^\s*create_topic (\S+) (\d+)(.*)$", script, re.MULTILINE):
        words = shlex.split(rest)
        assert words[::2] == ["--config"] * (len(words) // 2) and len(words) % 2 == 0, rest
        created[name] = (int(partitions), dict(word.split("=", 1) for word in words[1::2]))
    return created


def assert_creates_the_topics_of(settings: JobSettings, script: str) -> None:
    """Every topic the job reads or writes with these settings, with the partitions and the
    configurations the project gives it (jobs/settings.py topic_partitions, topic_configs)."""
    assert settings.requests_topic and settings.identity_topic, "privacy requests and identity merge configured"
    created = created_topics(script)
    wanted = settings.topic_partitions(settings.parallelism)
    configs = settings.topic_configs()
    assert {name: partitions for name, (partitions, _) in created.items()} == wanted
    assert {name: config for name, (_, config) in created.items()} == {name: configs.get(name, {}) for name in wanted}


def test_compose_creates_the_jobs_topics(services):
    settings = load_settings(environ=settings_variables(compose_environment(services["submit"])))
    assert_creates_the_topics_of(settings, compose_value(" ".join(services["topics"]["command"])))
    assert services["topics"]["depends_on"]["kafka"]["condition"] == "service_healthy"


def test_kubernetes_creates_the_jobs_topics(k8s_documents, flink_deployment):
    settings = load_settings(environ=settings_variables(k8s_container_env(k8s_documents, flink_deployment)))
    [job] = [doc for doc in k8s_documents if doc.get("kind") == "Job" and doc["metadata"]["name"] == "segments-topics"]
    [container] = job["spec"]["template"]["spec"]["containers"]
    script = " ".join(container["args"])
    assert f"--bootstrap-server {settings.bootstrap_servers} " in script
    assert_creates_the_topics_of(settings, script)


def test_a_missing_topic_or_retention_fails_the_manifest_check():
    settings = JobSettings(requests_topic="user-requests", identity_topic="identity-feedback", parallelism=2)
    script = """
        create_topic shopper-events 2
        create_topic segment-transitions 2
        create_topic segment-dead-letters 1 --config retention.ms=604800000
        create_topic user-requests 2
        create_topic erasure-audit 1 --config retention.ms=-1
        create_topic identity-feedback 2 --config retention.ms=86400000
    """
    assert_creates_the_topics_of(settings, script)
    for line in script.strip().splitlines():
        with pytest.raises(AssertionError):
            assert_creates_the_topics_of(settings, script.replace(line, ""))
    with pytest.raises(AssertionError):
        assert_creates_the_topics_of(settings, script.replace(" --config retention.ms=86400000", ""))


def test_compose_flink_cluster_configuration(compose, services):
    jobmanager, taskmanager = flink_properties(services["jobmanager"]), flink_properties(services["taskmanager"])
    assert jobmanager == taskmanager
    assert jobmanager["jobmanager.rpc.address"] == "jobmanager" and "jobmanager" in services
    assert jobmanager["state.backend.type"] == "rocksdb"
    assert int(jobmanager["taskmanager.numberOfTaskSlots"]) >= 1
    assert jobmanager["metrics.reporter.prom.factory.class"] == PROMETHEUS_REPORTER
    assert int(jobmanager["metrics.reporter.prom.port"].split("-")[0]) == StackPorts().prometheus
    # Checkpoints and savepoints on one named volume that every Flink process mounts.
    for key in ("execution.checkpointing.dir", "execution.checkpointing.savepoint-dir"):
        location = urlparse(jobmanager[key])
        assert location.scheme == "file"
        for name in ("jobmanager", "taskmanager"):
            mounts = dict(v.split(":")[:2][::-1] for v in services[name]["volumes"])
            [mount_point] = [m for m in mounts if location.path.startswith(m.rstrip("/") + "/")]
            assert mounts[mount_point] in compose["volumes"], f"{name}: {mount_point} must be a named volume"


def test_compose_publishes_every_port_on_localhost_unless_told_otherwise(services):
    """Issue 19: Kafka, Redis and the Flink REST API (which runs submitted code) authenticate
    nobody in this file, so by default they are reachable from this host only."""
    published = [(name, entry) for name, service in services.items() for entry in service.get("ports", [])]
    assert len(published) >= 5
    for name, entry in published:
        assert compose_value(entry).startswith("127.0.0.1:"), f"{name} publishes {entry} beyond localhost"


def test_compose_publishes_the_local_stack_ports(services):
    ports = StackPorts()
    assert published_ports(services["kafka"])[9092] == ports.broker
    assert published_ports(services["redis"])[6379] == ports.redis
    assert published_ports(services["jobmanager"])[8081] == ports.flink_rest
    scraped = {
        int(t.rsplit(":", 1)[1])
        for c in yaml.safe_load((INFRA / "prometheus.yml").read_text())["scrape_configs"][0]["static_configs"]
        for t in c["targets"]
    }
    for name in ("jobmanager", "taskmanager"):
        assert published_ports(services[name])[ports.prometheus] in scraped, f"{name}'s metrics are not scraped"


def test_compose_healthchecks_and_start_order(services):
    for name in ("kafka", "redis", "jobmanager", "taskmanager"):
        assert services[name]["healthcheck"]["test"], f"{name} has no healthcheck"
    assert services["taskmanager"]["depends_on"]["jobmanager"]["condition"] == "service_healthy"
    submit = services["submit"]["depends_on"]
    assert submit["jobmanager"]["condition"] == "service_healthy"
    assert submit["taskmanager"]["condition"] == "service_healthy"
    assert submit["redis"]["condition"] == "service_healthy"
    assert submit["topics"]["condition"] == "service_completed_successfully"


# --- the FlinkDeployment -------------------------------------------------------------------------


def test_flink_deployment_has_the_required_fields(flink_deployment):
    assert flink_deployment["apiVersion"] == "flink.apache.org/v1beta1"
    assert flink_deployment["kind"] == "FlinkDeployment"
    assert flink_deployment["metadata"]["name"]
    spec = flink_deployment["spec"]
    assert spec["image"] and spec["serviceAccount"]
    major, minor = pinned_version("apache-flink").split(".")[:2]
    assert spec["flinkVersion"] == f"v{major}_{minor}", "flinkVersion must be the pinned Flink's"
    for role in ("jobManager", "taskManager"):
        resource = spec[role]["resource"]
        assert re.fullmatch(r"\d+[mg]", resource["memory"]) and float(resource["cpu"]) > 0, role
    job = spec["job"]
    assert job["upgradeMode"] in {"savepoint", "last-state"}, "a stateless upgrade would drop every profile"
    assert job["state"] == "running"
    assert job["entryClass"] == PYTHON_DRIVER
    assert job["jarURI"] == f"local:///opt/flink/opt/flink-python-{pinned_version('apache-flink')}.jar"
    assert int(job["parallelism"]) >= 1


def test_flink_deployment_configuration(flink_deployment):
    conf = flink_deployment["spec"]["flinkConfiguration"]
    assert all(isinstance(v, str) for v in conf.values()), "operators before 1.13 take only string values"
    assert conf["state.backend.type"] == "rocksdb"
    assert conf["execution.checkpointing.incremental"] == "true"
    assert duration_ms(conf["execution.checkpointing.interval"]) > 0
    assert conf["execution.checkpointing.externalized-checkpoint-retention"] == "RETAIN_ON_CANCELLATION"
    for key in ("execution.checkpointing.dir", "execution.checkpointing.savepoint-dir", "high-availability.storageDir"):
        assert urlparse(conf[key]).scheme in DURABLE_SCHEMES, f"{key} must be on durable storage"
    assert conf["high-availability.type"] == "kubernetes"
    assert conf["restart-strategy.type"] in {"exponential-delay", "fixed-delay"}
    assert duration_ms(conf["restart-strategy.exponential-delay.max-backoff"]) < JobSettings().transaction_timeout_ms
    assert conf["python.execution-mode"] == "thread"
    assert conf["metrics.reporter.prom.factory.class"] == PROMETHEUS_REPORTER
    assert int(conf["metrics.reporter.prom.port"].split("-")[0]) == StackPorts().prometheus


def test_flink_deployment_exposes_the_prometheus_port(flink_deployment):
    pod = flink_deployment["spec"]["podTemplate"]
    port = StackPorts().prometheus
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(port)
    [container] = pod["spec"]["containers"]
    assert port in {p["containerPort"] for p in container["ports"]}


def test_flink_deployment_settings_agree_with_the_deployment(k8s_documents, flink_deployment):
    env = k8s_container_env(k8s_documents, flink_deployment)
    [container] = flink_deployment["spec"]["podTemplate"]["spec"]["containers"]
    [redis_url] = [e for e in container["env"] if e["name"] == "REDIS_VIEW_URL"]
    assert "secretKeyRef" in redis_url["valueFrom"], "the Redis URL (with its password) must come from a Secret"
    settings = load_settings(environ=settings_variables(env))
    # Issue 19: the job (its graph, the HA storage) carries the reference, never the password.
    assert settings.redis_url == "env:REDIS_VIEW_URL" and "REDIS_URL" not in env
    spec = flink_deployment["spec"]
    conf = spec["flinkConfiguration"]
    # The job sets these itself, over the cluster's configuration: they must not contradict it.
    assert settings.parallelism == spec["job"]["parallelism"]
    assert settings.state_backend == conf["state.backend.type"]
    assert settings.checkpoint_interval_ms == duration_ms(conf["execution.checkpointing.interval"])
    assert settings.execution_mode == conf["python.execution-mode"]


def test_flink_deployment_runs_the_module_and_code_that_segments_submit_ships(flink_deployment, dockerfile):
    args = flink_deployment["spec"]["job"]["args"]
    option = dict(zip(args[::2], args[1::2], strict=True))  # options and their values, in pairs
    assert option["-pym"] == "jobs.segment_users"
    assert (ROOT / (option["-pym"].replace(".", "/") + ".py")).is_file()
    # The shipped directory is where the image holds the code the CLI ships.
    copies = dockerfile_copies(dockerfile)
    destinations = {
        sources[0].rstrip("/"): dest.rstrip("/") for sources, dest, staged in copies if not staged and len(sources) == 1
    }
    # udfs/ is compiled in a build stage and reaches the image from there (COPY --from).
    from_stages = {sources[0].rstrip("/"): dest.rstrip("/") for sources, dest, staged in copies if staged}
    destinations = {source: from_stages.get(dest, dest) for source, dest in destinations.items()}
    for package in ("udfs", "jobs", "schemas", "models"):
        assert destinations[package] == f"{option['-pyfs']}/{package}", f"{package}/ is not under -pyfs"
    conf = flink_deployment["spec"]["flinkConfiguration"]
    assert option["-pyexec"] == option["-pyclientexec"] == conf["python.executable"] == conf["python.client.executable"]
    assert option["-pyexec"] in " ".join(arguments for keyword, arguments in dockerfile if keyword == "RUN")


# --- the Dockerfile ------------------------------------------------------------------------------


def test_dockerfile_copy_sources_exist(dockerfile):
    copies = [c for c in dockerfile_copies(dockerfile) if not c[2]]
    assert copies
    for sources, _, _ in copies:
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
    copied = {source.rstrip("/") for sources, _, _ in copies for source in sources}
    assert {"udfs", "jobs", "schemas", "models", "infra/requirements.lock"} <= copied


def test_dockerfile_builds_on_the_pinned_flink_and_python(dockerfile):
    version = pinned_version("apache-flink")
    bases = [arguments.split()[0] for keyword, arguments in dockerfile if keyword == "FROM"]
    flink_bases = [b for b in bases if b.startswith("flink:")]
    assert flink_bases and all(b == f"flink:{version}-java17" for b in flink_bases), bases
    assert bases[-1] == f"flink:{version}-java17", "the final image must be the official Flink image"
    runs = " ".join(arguments for keyword, arguments in dockerfile if keyword == "RUN")
    assert "-r /tmp/requirements.lock" in runs
    assert re.search(r"COPY infra/requirements\.lock /tmp/requirements\.lock", DOCKERFILE.read_text())


def test_dockerfile_takes_the_connector_jars_as_setup_does(dockerfile):
    setup = shell_assignments((INFRA / "setup.sh").read_text())
    args = dockerfile_args(dockerfile)
    for name in ("CONNECTOR_WHEEL", "CONNECTOR_WHEEL_SHA", "KAFKA_CONNECTOR_JAR_SHA", "KAFKA_CLIENTS_JAR_SHA"):
        assert args[name] == setup[name], f"{name} differs from infra/setup.sh"
    runs = [arguments for keyword, arguments in dockerfile if keyword == "RUN"]
    for sha in ("CONNECTOR_WHEEL_SHA", "KAFKA_CONNECTOR_JAR_SHA", "KAFKA_CLIENTS_JAR_SHA"):
        assert any(f"${{{sha}}}" in run and "sha256sum -c" in run for run in runs), f"{sha} is never checked"
    for run in runs:
        for command in re.split(r"&&|;", run):
            if re.search(r"\bpip\b.*\binstall\b", command):
                assert "shigawire" not in command, "the connector wheel must never be pip-installed"


def test_dockerfile_builds_the_java_operators_as_setup_does_into_the_jars_directory(dockerfile):
    from jobs.java_operators import OPERATORS_JAR

    runs = [arguments for keyword, arguments in dockerfile if keyword == "RUN"]
    [build] = [run for run in runs if "infra/java/build.sh" in run]
    assert build.split()[-1] == f"/jars/{OPERATORS_JAR}"
    setup = (INFRA / "setup.sh").read_text()
    assert "infra/java/build.sh" in setup and f'jars/{OPERATORS_JAR}"' in setup
    copies = dockerfile_copies(dockerfile)
    assert (["infra/java/"], "/build/infra/java/", False) in copies
    jars_dir = dockerfile_env(dockerfile)["SEGMENTS_JARS_DIR"]
    assert (["/jars/"], jars_dir + "/", True) in copies, "the jar must land where the job takes pipeline.jars from"


def test_dockerfile_prepares_thread_mode(dockerfile):
    runs = " ".join(arguments for keyword, arguments in dockerfile if keyword == "RUN")
    assert re.search(r"cp /opt/flink/opt/flink-python-\S*\.jar /opt/flink/lib/", runs), "flink-python must be in lib/"
    env = dockerfile_env(dockerfile)
    python_path = env["PYTHONPATH"].split(":")
    assert any(p.endswith("/lib/python3.11/site-packages") for p in python_path), "no site-packages on PYTHONPATH"
    assert python_path[0] == "/opt/segments/app"
    assert "-Dpython.executable=/opt/segments/venv/bin/python" in runs


# --- settings named anywhere ---------------------------------------------------------------------


def test_every_segments_variable_is_a_setting_or_a_tooling_variable(
    services, k8s_documents, flink_deployment, dockerfile
):
    fields = {f.upper() for f in JobSettings.__dataclass_fields__} - {"PROFILE"}
    sources = {f"compose service {name}": compose_environment(service) for name, service in services.items()}
    sources["the FlinkDeployment's pods"] = k8s_container_env(k8s_documents, flink_deployment)
    sources["the Dockerfile"] = dockerfile_env(dockerfile)
    named = 0
    for where, env in sources.items():
        variables = settings_variables(env)
        for name in variables:
            if name.startswith("SEGMENTS_") and not name.startswith(TOOLING_ENV_PREFIXES):
                assert name[len("SEGMENTS_") :] in fields, f"{where}: {name} is not a setting"
                named += 1
        load_settings(environ=variables)  # raises on an unknown variable or a bad value
    assert named >= 5


# --- the live view: Prometheus and Grafana in compose ---------------------------------------------

GRAFANA = INFRA / "grafana"
# Flink's own metrics of the Kafka source that the dashboard reads (the Kafka connector's
# documented operator metrics), beside the ones the job's operators register.
FLINK_SOURCE_METRICS = {"pendingRecords"}


def bind_mounts(service: dict) -> dict[str, Path]:
    """container path -> host path of the service's bind mounts (relative to the compose file)."""
    out = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("."):
            out[target] = (COMPOSE_FILE.parent / source).resolve()
    return out


def exported_metric_names() -> set[str]:
    """Every sample name the project's own endpoints serve: the live view's (`segments
    dashboard`) and the view follower's, from their text."""
    from jobs.live_view import LiveFigures, SegmentFigures
    from jobs.redis_follower import FollowerFigures

    texts = [
        LiveFigures([SegmentFigures("s", 1, 1, 1, 1)], {"1": 1}, 1, 1).prometheus(),
        FollowerFigures(lag={0: 1}).prometheus(),
    ]
    return {
        line.split("{")[0].split(" ")[0] for text in texts for line in text.splitlines() if not line.startswith("#")
    }


def job_operator_metrics() -> set[str]:
    """The metric names the job's Python operators register (jobs/segment_users.py)."""
    source = (ROOT / "jobs" / "segment_users.py").read_text()
    return set(re.findall(r'\.counter\("(\w+)"\)', source))


def dashboard_queries() -> list[str]:
    dashboard = json.loads((GRAFANA / "dashboards" / "segments.json").read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def test_the_grafana_dashboard_queries_only_metrics_that_are_exported():
    exported = exported_metric_names()
    operators = job_operator_metrics()
    assert {"dead_letters", "late_events"} <= operators
    queried = {name for expr in dashboard_queries() for name in re.findall(r"\b(?:segments|flink)_\w+", expr)}
    for name in queried:
        if name.startswith("flink_taskmanager_job_task_operator_"):
            metric = name[len("flink_taskmanager_job_task_operator_") :]
            assert metric in operators | FLINK_SOURCE_METRICS, f"{name}: no operator registers {metric}"
        else:
            assert name in exported, f"the dashboard queries {name}, which nothing exports"
    # Every live-view figure is on the dashboard, and documented.
    from jobs.live_view import EXPORTED_METRICS

    metrics_doc = (ROOT / "docs" / "metrics.md").read_text()
    for family in EXPORTED_METRICS:
        assert any(q.startswith(family) for q in queried), f"{family} is on no panel"
        assert f"`{family}" in metrics_doc, f"{family} is not in docs/metrics.md"


def test_compose_provisions_prometheus_and_grafana_with_the_dashboard(services):
    # Grafana: the provisioning directory, the dashboards where its provider looks, the data source.
    grafana = bind_mounts(services["grafana"])
    assert grafana["/etc/grafana/provisioning"] == GRAFANA / "provisioning"
    [provider] = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "segments.yml").read_text())["providers"]
    assert (grafana[provider["options"]["path"]] / "segments.json").is_file()
    [source] = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())["datasources"]
    url = urlparse(source["url"])
    assert url.hostname == "prometheus" and url.port in published_ports(services["prometheus"])
    dashboard = json.loads((GRAFANA / "dashboards" / "segments.json").read_text())
    uids = {t["datasource"]["uid"] for p in dashboard["panels"] for t in p["targets"]}
    assert uids == {source["uid"]}, "the panels must use the provisioned data source"
    # Prometheus: its configuration file scrapes every service that serves figures, at its port.
    mounts = bind_mounts(services["prometheus"])
    [(config_path, config_file)] = [(target, host) for target, host in mounts.items() if target.endswith(".yml")]
    assert f"--config.file={config_path}" in services["prometheus"]["command"]
    targets = {
        t
        for job in yaml.safe_load(config_file.read_text())["scrape_configs"]
        for c in job["static_configs"]
        for t in c["targets"]
    }
    command = services["dashboard"]["command"]
    assert command[:2] == ["segments", "dashboard"]
    option = dict(zip(command[2::2], command[3::2], strict=True))
    assert option["--host"] == "0.0.0.0"
    follower = load_settings(environ=settings_variables(compose_environment(services["redis-follower"])))
    reporter_port = flink_properties(services["jobmanager"])["metrics.reporter.prom.port"]
    assert targets == {
        f"dashboard:{option['--port']}",
        f"redis-follower:{follower.redis_follower_metrics_port}",
        f"jobmanager:{reporter_port}",
        f"taskmanager:{reporter_port}",
    }
    # The dashboard reads the Redis the job writes.
    shown = load_settings(environ=settings_variables(compose_environment(services["dashboard"])))
    submitted = load_settings(environ=settings_variables(compose_environment(services["submit"])))
    assert (shown.redis_url, shown.redis_key_prefix) == (submitted.redis_url, submitted.redis_key_prefix)
    assert int(option["--port"]) in published_ports(services["dashboard"])
