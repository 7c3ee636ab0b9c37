"""The one settings object of the job: defaults, then a YAML file, then SEGMENTS_* environment
variables; validated strictly (unknown keys are an error) and read once in main()."""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from jobs.kafka_security import KafkaSecurity, KafkaSecurityError
from jobs.segment_warnings import WarningThresholds
from udfs.definitions import MAX_YAML_DEPTH
from udfs.profile_config import ProfileConfig, ProfileConfigError

ENV_PREFIX = "SEGMENTS_"
# Variables with the prefix that configure the tooling (setup, the local stack), not the job.
TOOLING_ENV_PREFIXES = (
    "SEGMENTS_CACHE",
    "SEGMENTS_VENV",
    "SEGMENTS_STACK_",
    "SEGMENTS_COMPILE_CORE",  # infra/setup.sh: 0 to skip compiling the core
    "SEGMENTS_INSTALL_CHROMIUM",  # infra/setup.sh: 0 to skip installing chromium (the browser test)
    "SEGMENTS_INTERPRETED_CORE",  # udfs: 1 to run the sources of a compiled core
)
DEFAULT_CACHE = Path(os.environ.get("SEGMENTS_CACHE", Path.home() / ".cache" / "segments"))
# The segments shipped with the adapters, read when no `definitions_path` is set. The path is
# the adapters' to give: the core (udfs/) loads whatever definitions file it is handed.
SHIPPED_DEFINITIONS = Path(__file__).resolve().parent / "definitions" / "shop.yaml"
# A settings file is a few dozen lines: every setting and a full profile section are 171 YAML
# nodes. PyYAML takes some 30 us a node, so these bound reading a hostile file to a tenth of a
# second (64 KB of `[1,1,...]` took a second to refuse, with a 100 KB error message).
MAX_SETTINGS_BYTES = 64 * 1024
MAX_SETTINGS_NODES = 3_000


class SettingsError(ValueError):
    pass


# Settings of earlier releases, and why they went: named in the error instead of "unknown".
REMOVED_SETTINGS = {
    "redis_user_ttl_s": "the Redis view now follows the profile retention (profile: retention_ms), see docs/redis.md",
}


def _unknown(key: str) -> str:
    """The error's reason for a setting that is not one."""
    if key in REMOVED_SETTINGS:
        return f"setting {key!r} was removed: {REMOVED_SETTINGS[key]}"
    return f"unknown setting {key!r}"


@dataclass(frozen=True)
class JobSettings:
    job_name: str = "segment-users"
    bootstrap_servers: str = "127.0.0.1:9092"
    events_topic: str = "shopper-events"
    transitions_topic: str = "segment-transitions"
    dead_letter_topic: str = "segment-dead-letters"
    # Privacy requests (erasure, consent; schemas/user_request.avsc, docs/privacy.md): read from
    # this topic when set (empty: no requests are read), with the audit trail of each erasure
    # written to audit_topic.
    requests_topic: str = ""
    audit_topic: str = "erasure-audit"
    # Whether a user with no consent record for a purpose has consented: granted (today's
    # behaviour: segmentation and scoring run) or withheld (nothing runs until consent is given).
    consent_default: str = "granted"
    # The dead-letter topic's retention.ms, set when the project creates the topic (its records
    # carry raw payloads, which an erasure cannot reach: docs/privacy.md).
    dead_letter_retention_ms: int = 7 * 24 * 3600 * 1000
    # The job's own feedback topic for identity merges (folds and forwarded events, written
    # exactly-once and read back read_committed); it carries profiles: keep its retention short.
    # Empty: no identity merge (identify records are dead letters, identity_merge_off).
    identity_topic: str = ""
    # The feedback topic's retention.ms, set when the project creates it: short, for its folds
    # carry profiles, but longer than any stop of the job (a restore reads the folds sent before
    # the checkpoint again; a fold deleted unread loses the anonymous profile it carried).
    identity_retention_ms: int = 24 * 3600 * 1000
    # Live deployments (docs/deployments.md): control records (deploy, promote, roll back) read
    # from control_topic when set (empty: none, and the job graph is unchanged); what the job
    # made of each to deployment_status_topic; a candidate in shadow's transitions to shadow_topic.
    control_topic: str = ""
    deployment_status_topic: str = "segment-deployments"
    shadow_topic: str = "segment-shadow-transitions"
    # With a control topic: every user with state keeps a timer at most this long (event time)
    # after their latest step, at a phase hashed from their id, so that a deployment reaches
    # quiet users within it, spread evenly over it (one timer step per user per interval). 0: off.
    deployment_sweep_ms: int = 21_600_000  # 6 h: docs/configuration.md says what 1 h cost in the bench
    consumer_group: str = "segments-job"
    startup_mode: str = "earliest-offset"
    # Kafka client security for every client (the job's source and sinks, generate, tail, the
    # rebuild, the follower, backtest), set as `kafka_<field>` in the file and SEGMENTS_KAFKA_<FIELD>
    # variables (the fields of jobs/kafka_security.KafkaSecurity: Kafka's property names).
    kafka: KafkaSecurity = field(default_factory=KafkaSecurity)
    redis_url: str = "redis://127.0.0.1:6379/0"  # empty: no Redis view
    redis_key_prefix: str = "seg"
    parallelism: int = 1
    segment_parallelism: int = 0  # the keyed segmentation operator; 0: same as parallelism
    max_parallelism: int = 128
    execution_mode: str = "thread"
    checkpoint_interval_ms: int = 5_000
    checkpoint_dir: str = ""  # empty: <stack dir>/checkpoints
    # RocksDB: state on local disk, checkpoints incremental (only new SST files are uploaded).
    state_backend: str = "rocksdb"
    # Where RocksDB keeps the timers (one per user): in RocksDB (checkpointed incrementally, no
    # heap) or on the heap (cheaper per event, written in full at every checkpoint).
    timer_service: str = "rocksdb"
    # How the job comes back after a failure (a lost TaskManager, Redis or Kafka unreachable):
    # from the last checkpoint, after a delay growing up to restart_max_backoff_ms. `none` fails
    # the job for good at the first error.
    restart_strategy: str = "exponential-delay"
    restart_max_backoff_ms: int = 30_000
    # A Redis write that cannot reach Redis is retried this long; then the checkpoint's
    # transitions are left to the view follower (jobs/redis_follower.py) and the job goes on: a
    # Redis outage never stops the Kafka transitions.
    redis_retry_ms: int = 10_000
    # `segments run` also runs the view follower (the view catches up by itself after a Redis
    # outage or an empty restart); with a cluster, run `segments redis follow` beside it.
    redis_follower: bool = True
    redis_follower_metrics_port: int = 0  # 0: no metrics endpoint
    redis_follower_metrics_host: str = "127.0.0.1"  # 0.0.0.0 in a container, for the scraper
    # How long a network buffer between operators (the key_by shuffle) may wait to fill before it
    # is sent: Flink's default of 100 ms is most of an event's way to Redis at low load.
    buffer_timeout_ms: int = 10
    watermark_lag_ms: int = 5_000
    # 0: no idleness. With it, a source subtask silent this long stops holding the watermark back;
    # but a subtask silent only because it was stalled (a restart, a broker pause, backpressure)
    # then lets the other partitions' watermark pass its backlog, whose events become late (the
    # fault suite saw exactly that). Set it only if a partition can stay empty for long.
    idle_timeout_ms: int = 0
    allowed_lateness_ms: int = 60_000
    max_event_bytes: int = 64 * 1024
    max_future_ms: int = 24 * 3600 * 1000
    transactional_id_prefix: str = "segments-transitions"
    transaction_timeout_ms: int = 300_000
    # The segment definitions file (docs/definitions.md); empty: the shipped one.
    definitions_path: str = ""
    # Where the models the definitions read live (`<dir>/<name>/manifest.json`); empty: models/.
    models_dir: str = ""
    jars_dir: str = str(DEFAULT_CACHE / "jars")
    # Emit each user's state after every event and timer on a side output (tests, debugging).
    emit_profile_snapshots: bool = False
    # Decoded profiles kept per keyed subtask (saves the state decode for users seen recently;
    # about 28 KB of Python memory each at a week of generated traffic). 0 disables the cache.
    profile_cache_users: int = 5_000
    profile: ProfileConfig = field(default_factory=ProfileConfig)  # YAML `profile:` section only
    # When `segments backtest` warns of over-segmentation (docs/operations.md); YAML `warnings:`
    # section only, the command's flags win over it.
    warnings: WarningThresholds = field(default_factory=WarningThresholds)

    def __post_init__(self) -> None:
        choices = {
            "startup_mode": {"earliest-offset", "latest-offset", "group-offsets"},
            "execution_mode": {"thread", "process"},
            "state_backend": {"hashmap", "rocksdb"},
            "timer_service": {"rocksdb", "heap"},
            "restart_strategy": {"exponential-delay", "fixed-delay", "none"},
            "consent_default": {"granted", "withheld"},
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise SettingsError(f"{name} must be one of {sorted(allowed)}, got {getattr(self, name)!r}")
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "int" and value < 0:
                raise SettingsError(f"{f.name} must not be negative, got {value}")
        if not 1 <= self.parallelism <= self.max_parallelism:
            raise SettingsError("parallelism must be between 1 and max_parallelism")
        if self.segment_parallelism > self.max_parallelism:
            raise SettingsError("segment_parallelism must not exceed max_parallelism")
        if self.checkpoint_interval_ms < 100:
            raise SettingsError("checkpoint_interval_ms must be at least 100 (exactly-once needs checkpoints)")
        if self.allowed_lateness_ms >= self.profile.retention_ms:
            raise SettingsError(
                "allowed_lateness_ms must be below the profile retention (a late event would "
                "join a lifetime that has already expired)"
            )
        if self.transaction_timeout_ms <= self.checkpoint_interval_ms:
            raise SettingsError("transaction_timeout_ms must exceed checkpoint_interval_ms")
        if not re.fullmatch(r"[A-Za-z0-9._-]+", self.transactional_id_prefix):
            raise SettingsError("transactional_id_prefix may hold only letters, digits, '.', '_' and '-'")

    def kafka_security(self) -> KafkaSecurity:
        return self.kafka

    @property
    def privacy_requests(self) -> bool:
        """True when the job keeps per-user privacy records: requests are read, or consent is not
        assumed (without either, every user has consented and nothing needs keeping)."""
        return bool(self.requests_topic) or self.consent_default != "granted"

    def topic_partitions(self, partitions: int) -> dict[str, int]:
        """The topics the project creates for these settings, with their partition counts."""
        topics = {self.events_topic: partitions, self.transitions_topic: partitions, self.dead_letter_topic: 1}
        if self.requests_topic:
            topics.update({self.requests_topic: partitions, self.audit_topic: 1})
        if self.identity_topic:  # the job's source does not wait for a missing topic
            topics[self.identity_topic] = partitions
        if self.control_topic:  # one partition: every subtask reads the deployments in one order
            topics.update({self.control_topic: 1, self.deployment_status_topic: 1, self.shadow_topic: partitions})
        return topics

    def topic_configs(self) -> dict[str, dict[str, str]]:
        """Topic configurations the project sets when it creates the topics (docs/privacy.md):
        dead letters and folds carry personal data an erasure cannot reach, and go after their
        retention; the audit trail of erasures (hashes only) is kept. The requests topic's
        retention is the operator's: a backtest replays the erasures it still holds."""
        configs = {self.dead_letter_topic: {"retention.ms": str(self.dead_letter_retention_ms)}}
        if self.requests_topic:
            configs[self.audit_topic] = {"retention.ms": "-1"}
        if self.identity_topic:
            configs[self.identity_topic] = {"retention.ms": str(self.identity_retention_ms)}
        if self.control_topic:  # a job started afresh rebuilds the timeline from every record
            configs[self.control_topic] = {"retention.ms": "-1"}
        return configs

    def definitions_file(self) -> Path:
        return Path(self.definitions_path) if self.definitions_path else SHIPPED_DEFINITIONS

    def redacted(self) -> dict[str, Any]:
        """For logs: credentials in URLs replaced."""
        out = dataclasses.asdict(self)
        out["redis_url"] = redact_url(self.redis_url)
        return out

    def replace(self, **changes: Any) -> JobSettings:
        return dataclasses.replace(self, **changes)


def redact_url(url: str) -> str:
    """A URL fit for logs and CLI output: the user-info part (greedy up to the host part's last
    '@', as redis-py reads a password containing '@') and a `password=` query value replaced."""
    url = re.sub(r"//[^/?#]*@", "//***@", url)
    return re.sub(r"(?i)([?&]password=)[^&#]*", r"\1***", url)


def _coerce(name: str, kind: str, raw: Any) -> Any:
    if kind == "bool":
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.strip().lower() in ("true", "false"):
            return raw.strip().lower() == "true"
        raise SettingsError(f"{name} must be true or false, got {raw!r}")
    if kind == "int":
        if isinstance(raw, bool) or not isinstance(raw, int | str):
            raise SettingsError(f"{name} must be an integer, got {raw!r}")
        try:
            return int(raw)
        except ValueError:
            raise SettingsError(f"{name} must be an integer, got {raw!r}") from None
    if not isinstance(raw, str):
        raise SettingsError(f"{name} must be a string, got {raw!r}")
    return raw


def _read_yaml(path: str | Path) -> Any:
    """The settings file's YAML, guarded as udfs/definitions.py guards a definitions file: bounded
    in size and in nodes, no anchors or aliases (an alias repeats a node by reference, so nine
    lines of them stand for a billion strings, and printing such a value in an error message
    never ended), nesting bounded (the composer recurses). The event pass finds all but the size
    before anything is composed."""
    with open(path, "rb") as f:
        data = f.read(MAX_SETTINGS_BYTES + 1)
    if len(data) > MAX_SETTINGS_BYTES:
        raise SettingsError(f"{path}: larger than {MAX_SETTINGS_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise SettingsError(f"{path}:{line}: not UTF-8 (byte {err.start})") from None
    try:
        depth = nodes = 0
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            line = event.start_mark.line + 1
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
                raise SettingsError(f"{path}:{line}: YAML anchors and aliases are not allowed in a settings file")
            if isinstance(event, yaml.NodeEvent):
                nodes += 1
                if nodes > MAX_SETTINGS_NODES:
                    raise SettingsError(f"{path}:{line}: more than {MAX_SETTINGS_NODES} YAML nodes")
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > MAX_YAML_DEPTH:
                    raise SettingsError(f"{path}:{line}: nested more than {MAX_YAML_DEPTH} levels deep")
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise SettingsError(f"{where}: invalid YAML: {err.problem or err.context}") from None
    except yaml.YAMLError as err:
        raise SettingsError(f"{path}: invalid YAML: {type(err).__name__}") from None


def load_settings(
    path: str | Path | None = None,
    environ: dict[str, str] | None = None,
    **overrides: Any,
) -> JobSettings:
    environ = dict(os.environ if environ is None else environ)
    # `profile` and `warnings` are the file's sections; `kafka` is set through its `kafka_*` fields only.
    kinds = {f.name: f.type for f in fields(JobSettings) if f.name != "kafka"}
    kinds |= {f"kafka_{f.name}": "str" for f in fields(KafkaSecurity)}
    values: dict[str, Any] = {}
    if path is not None:
        loaded = _read_yaml(path) or {}
        if not isinstance(loaded, dict):
            raise SettingsError(f"{path}: expected a mapping of setting names to values")
        for key, raw in loaded.items():
            if key not in kinds:
                raise SettingsError(f"{path}: {_unknown(key)}")
            if key == "profile":
                try:
                    values[key] = ProfileConfig.from_mapping(raw)
                except ProfileConfigError as err:
                    raise SettingsError(f"{path}: {err}") from None
                continue
            if key == "warnings":
                try:
                    values[key] = WarningThresholds.from_mapping(raw)
                except ValueError as err:
                    raise SettingsError(f"{path}: {err}") from None
                continue
            values[key] = _coerce(key, kinds[key], raw)
    if "REDIS_URL" in environ:
        values["redis_url"] = environ["REDIS_URL"]
    for var, raw in environ.items():
        if not var.startswith(ENV_PREFIX) or var.startswith(TOOLING_ENV_PREFIXES):
            continue
        key = var[len(ENV_PREFIX) :].lower()
        if key not in kinds or key in ("profile", "warnings"):
            reason = _unknown(key) if key in REMOVED_SETTINGS else "unknown setting"
            raise SettingsError(f"{reason} in environment variable {var}")
        values[key] = _coerce(key, kinds[key], raw)
    for key, raw in overrides.items():
        if key not in kinds and key != "kafka":
            raise SettingsError(_unknown(key))
        values[key] = raw
    kafka = {key[len("kafka_") :]: values.pop(key) for key in list(values) if key.startswith("kafka_")}
    if kafka:
        try:
            values["kafka"] = dataclasses.replace(values.get("kafka", KafkaSecurity()), **kafka)
        except KafkaSecurityError as err:
            raise SettingsError(str(err)) from None
    return JobSettings(**values)
