"""jobs.settings: defaults, then a YAML file, then SEGMENTS_* variables; strict validation."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from jobs.settings import MAX_SETTINGS_BYTES, JobSettings, SettingsError, load_settings


def write_yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


def test_the_defaults_are_valid():
    settings = load_settings(environ={})
    assert settings == JobSettings()
    assert settings.parallelism == 1
    assert settings.execution_mode == "thread"
    assert settings.transaction_timeout_ms > settings.checkpoint_interval_ms


def test_a_yaml_file_overrides_the_defaults(tmp_path):
    path = write_yaml(tmp_path, "parallelism: 3\nevents_topic: clicks\n")
    settings = load_settings(path, environ={})
    assert (settings.parallelism, settings.events_topic) == (3, "clicks")


def test_an_empty_yaml_file_gives_the_defaults(tmp_path):
    assert load_settings(write_yaml(tmp_path, ""), environ={}) == JobSettings()


def test_an_unknown_key_in_the_yaml_file_names_the_file_and_the_key(tmp_path):
    path = write_yaml(tmp_path, "parallelism: 2\nparalelism: 3\n")
    with pytest.raises(SettingsError) as err:
        load_settings(path, environ={})
    assert str(path) in str(err.value)
    assert "paralelism" in str(err.value)


def test_a_yaml_file_that_is_not_a_mapping_is_rejected(tmp_path):
    with pytest.raises(SettingsError, match="mapping"):
        load_settings(write_yaml(tmp_path, "- parallelism\n"), environ={})


@pytest.mark.parametrize("value", ["1.5", "true", "[1]", "'two'"])
def test_a_non_integer_in_the_yaml_file_for_an_int_setting_is_rejected(tmp_path, value):
    with pytest.raises(SettingsError, match="parallelism"):
        load_settings(write_yaml(tmp_path, f"parallelism: {value}\n"), environ={})


def test_an_unknown_segments_environment_variable_is_rejected():
    with pytest.raises(SettingsError, match="SEGMENTS_FOO"):
        load_settings(environ={"SEGMENTS_FOO": "1"})


@pytest.mark.parametrize("var", ["SEGMENTS_CACHE", "SEGMENTS_VENV", "SEGMENTS_STACK_DIR"])
def test_tooling_variables_are_ignored(var):
    assert load_settings(environ={var: "/somewhere"}) == JobSettings()


def test_unrelated_environment_variables_are_ignored():
    assert load_settings(environ={"HOME": "/root", "PARALLELISM": "7", "SEGMENTSX": "1"}) == JobSettings()


def test_a_segments_variable_overrides_the_file(tmp_path):
    path = write_yaml(tmp_path, "parallelism: 3\n")
    assert load_settings(path, environ={"SEGMENTS_PARALLELISM": "2"}).parallelism == 2


def test_string_settings_come_from_the_environment_unchanged():
    assert load_settings(environ={"SEGMENTS_EVENTS_TOPIC": "clicks"}).events_topic == "clicks"


def test_redis_url_sets_the_redis_url():
    assert load_settings(environ={"REDIS_URL": "redis://cache:6380/2"}).redis_url == "redis://cache:6380/2"


def test_an_empty_redis_url_disables_the_view():
    assert load_settings(environ={"REDIS_URL": ""}).redis_url == ""


def test_keyword_overrides_win_over_the_environment():
    assert load_settings(environ={"SEGMENTS_PARALLELISM": "2"}, parallelism=4).parallelism == 4


def test_an_unknown_keyword_override_is_rejected():
    with pytest.raises(SettingsError, match="nope"):
        load_settings(environ={}, nope=1)


@pytest.mark.parametrize("raw", ["two", "", "2.0", "0x10"])
def test_a_bad_integer_in_the_environment_is_rejected(raw):
    with pytest.raises(SettingsError, match="parallelism"):
        load_settings(environ={"SEGMENTS_PARALLELISM": raw})


def test_a_negative_integer_is_rejected():
    with pytest.raises(SettingsError, match="watermark_lag_ms"):
        load_settings(environ={"SEGMENTS_WATERMARK_LAG_MS": "-1"})


@pytest.mark.parametrize("mode", ["fiber", "THREAD", ""])
def test_an_unknown_execution_mode_is_rejected(mode):
    with pytest.raises(SettingsError, match="execution_mode"):
        load_settings(environ={"SEGMENTS_EXECUTION_MODE": mode})


def test_process_execution_mode_is_accepted():
    assert load_settings(environ={"SEGMENTS_EXECUTION_MODE": "process"}).execution_mode == "process"


@pytest.mark.parametrize("timeout", [5_000, 4_999, 100])
def test_a_transaction_timeout_not_above_the_checkpoint_interval_is_rejected(timeout):
    with pytest.raises(SettingsError, match="transaction_timeout_ms"):
        load_settings(environ={}, checkpoint_interval_ms=5_000, transaction_timeout_ms=timeout)


def test_a_transaction_timeout_just_above_the_checkpoint_interval_is_accepted():
    settings = load_settings(environ={}, checkpoint_interval_ms=5_000, transaction_timeout_ms=5_001)
    assert settings.transaction_timeout_ms == 5_001


def test_parallelism_must_be_between_one_and_max_parallelism():
    with pytest.raises(SettingsError):
        load_settings(environ={"SEGMENTS_PARALLELISM": "0"})
    with pytest.raises(SettingsError):
        load_settings(environ={"SEGMENTS_PARALLELISM": "129"})
    assert load_settings(environ={"SEGMENTS_PARALLELISM": "128"}).parallelism == 128


def test_a_transactional_id_prefix_with_a_space_is_rejected():
    with pytest.raises(SettingsError, match="transactional_id_prefix"):
        load_settings(environ={"SEGMENTS_TRANSACTIONAL_ID_PREFIX": "my prefix"})


def test_redacted_hides_the_password_in_the_redis_url():
    settings = load_settings(environ={"REDIS_URL": "redis://app:s3cret@cache:6379/0"})
    redacted = settings.redacted()
    assert redacted["redis_url"] == "redis://***@cache:6379/0"
    assert "s3cret" not in repr(redacted)
    assert settings.redis_url == "redis://app:s3cret@cache:6379/0"


def test_redacted_leaves_a_url_without_credentials_alone():
    assert load_settings(environ={}).redacted()["redis_url"] == "redis://127.0.0.1:6379/0"


def test_replace_revalidates():
    with pytest.raises(SettingsError):
        JobSettings().replace(execution_mode="fiber")


# redis-py takes the password up to the last '@' of the netloc, so it accepts an unencoded '@'
# inside a password ("redis://app:p@ss@cache" -> password "p@ss"); redacted() stops at the first
# '@' and logs the rest of the password.
def test_redacted_hides_a_password_that_contains_an_at_sign():
    settings = load_settings(environ={"REDIS_URL": "redis://app:p@ss@cache:6379/0"})
    assert "ss@" not in settings.redacted()["redis_url"]
    assert settings.redacted()["redis_url"] == "redis://***@cache:6379/0"


# redis-py also reads the password from the query string (redis://host/0?password=...).
def test_redacted_hides_a_password_given_as_a_query_parameter():
    settings = load_settings(environ={"REDIS_URL": "redis://cache:6379/0?password=s3cret"})
    assert "s3cret" not in settings.redacted()["redis_url"]


def test_an_allowed_lateness_reaching_the_retention_is_rejected(tmp_path):
    path = tmp_path / "s.yaml"
    profile = "profile:\n  retention_ms: 1d\n  horizons: {1h: {length: 1h, bucket: 5m}}\n"
    path.write_text("allowed_lateness_ms: 86400000\n" + profile)
    with pytest.raises(SettingsError, match="allowed_lateness_ms must be below the profile retention"):
        load_settings(path, environ={})
    path.write_text("allowed_lateness_ms: 86399999\n" + profile)
    assert load_settings(path, environ={}).allowed_lateness_ms == 86_399_999


# --- a hostile settings file: refused at once, naming the file and the line ------------------

LAUGHS = (
    "  - &l0 ["
    + ", ".join(['"lol"'] * 9)
    + "]\n"
    + "".join(f"  - &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n" for i in range(1, 9))
)


def test_a_billion_laughs_settings_file_is_refused_at_once_naming_its_first_anchor(tmp_path):
    # Nine lines of aliases stand for 9**9 strings: printing the value in the error message for
    # a string setting never ended (> 60 s).
    path = write_yaml(tmp_path, "parallelism: 2\njob_name:\n" + LAUGHS)
    started = time.perf_counter()
    with pytest.raises(SettingsError) as err:
        load_settings(path, environ={})
    assert time.perf_counter() - started < 10  # not the > 60 s of printing the value (a busy CI machine is slow)
    assert str(err.value) == f"{path}:3: YAML anchors and aliases are not allowed in a settings file"


def test_a_single_alias_in_a_settings_file_is_refused(tmp_path):
    path = write_yaml(tmp_path, "events_topic: &topic clicks\ntransitions_topic: *topic\n")
    with pytest.raises(SettingsError, match=r"job\.yaml:1: YAML anchors and aliases are not allowed"):
        load_settings(path, environ={})


def test_a_settings_file_nested_deeper_than_the_bound_is_refused_not_a_recursion_error(tmp_path):
    path = write_yaml(tmp_path, "profile:\n  horizons: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(SettingsError, match=r"job\.yaml:2: nested more than 32 levels deep"):
        load_settings(path, environ={})


def test_a_settings_file_of_more_than_3000_yaml_nodes_is_refused_at_the_3001st(tmp_path):
    # 5 nodes before the list (the mapping, parallelism, 2, job_name, the list), then one a line
    path = write_yaml(tmp_path, "parallelism: 2\njob_name:\n" + "  - 1\n" * 2995)
    with pytest.raises(SettingsError, match="job_name must be a string"):
        load_settings(path, environ={})
    path.write_text(path.read_text() + "  - 1\n")
    with pytest.raises(SettingsError, match=r"job\.yaml:2998: more than 3000 YAML nodes"):
        load_settings(path, environ={})


def test_a_settings_file_larger_than_the_bound_is_refused_and_one_at_the_bound_is_read(tmp_path):
    head = "parallelism: 2\n"
    path = write_yaml(tmp_path, head + "#" * (MAX_SETTINGS_BYTES - len(head) - 1) + "\n")
    assert load_settings(path, environ={}).parallelism == 2
    path.write_text(path.read_text() + "\n")
    with pytest.raises(SettingsError, match=f"job.yaml: larger than {MAX_SETTINGS_BYTES} bytes"):
        load_settings(path, environ={})


@pytest.mark.parametrize(
    "text, line, message",
    [
        ("parallelism: 2\nevents_topic: [clicks\n", 3, "invalid YAML"),
        ("parallelism: 2\njob_name: !!python/name:os.system x\n", 2, "invalid YAML"),
        ("parallelism: 2\njob_name: caf\xe9\n", 2, "not UTF-8"),
    ],
)
def test_a_settings_file_that_is_not_yaml_is_a_settings_error_naming_the_line(tmp_path, text, line, message):
    path = tmp_path / "job.yaml"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(SettingsError, match=rf"job\.yaml:{line}: {message}"):
        load_settings(path, environ={})


@pytest.mark.parametrize(
    "url, secret",
    [
        ("redis://:s3cret@h:1/0", True),
        ("rediss://app:p%40ss@h/2", True),
        ("redis://s3cret@h", True),
        ("redis://h/0?password=s3cret", True),
        ("redis://h:6379/0", False),
        ("env:REDIS_VIEW_URL", False),
    ],
)
def test_a_redis_url_with_a_password_is_told_apart_from_one_without_or_a_reference(url, secret):
    """Issue 19: the client warns before shipping a password inside the job (jobs/redis_sink.py)."""
    from jobs.redis_sink import holds_a_secret

    assert holds_a_secret(url) is secret


@pytest.mark.parametrize(
    "url, shown",
    [
        ("redis://:p@ss@cache:6379/0", "redis://***@cache:6379/0"),
        ("redis://cache/0?password=s3cret&db=1", "redis://cache/0?password=***&db=1"),
        ("rediss://app:x%40y@cache", "rediss://***@cache"),
        ("env:REDIS_VIEW_URL", "env:REDIS_VIEW_URL"),
    ],
)
def test_the_cli_prints_redis_urls_without_any_form_of_password(url, shown):
    """Issue 19: `segments stack up`, `redis follow` and `redis rebuild` print the URL; they
    printed `?password=` in clear and the tail of a password holding '@'."""
    from infra.stack import redact_url

    assert redact_url(url) == shown


def test_the_end_to_end_jobs_keep_the_documented_cache_variable_and_drop_job_settings(monkeypatch, tmp_path):
    """Issue 21: with SEGMENTS_CACHE set (docs/setup.md), every e2e job failed on a missing Kafka
    connector, because its environment dropped every SEGMENTS_* variable."""
    from tests.e2e.conftest import job_environment

    monkeypatch.setenv("SEGMENTS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SEGMENTS_REDIS_URL", "redis://elsewhere:1/0")
    monkeypatch.setenv("REDIS_URL", "redis://elsewhere:2/0")
    monkeypatch.setenv("SEGMENTS_STACK_BROKER_PORT", "1")
    env = job_environment(tmp_path, "j", {"parallelism": 2})
    assert env["SEGMENTS_CACHE"] == str(tmp_path / "cache") and env["SEGMENTS_PARALLELISM"] == "2"
    assert "SEGMENTS_REDIS_URL" not in env and "REDIS_URL" not in env and "SEGMENTS_STACK_BROKER_PORT" not in env
    # What the job's process then reads (the default is taken from the environment at import).
    import subprocess
    import sys

    shown = subprocess.run(
        [sys.executable, "-c", "from jobs.settings import load_settings; print(load_settings().jars_dir)"],
        env=env,
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
        check=True,
    ).stdout.strip()
    assert shown == str(tmp_path / "cache" / "jars")


def test_the_removed_redis_ttl_is_refused_naming_the_retention_that_replaced_it(tmp_path):
    for load in (
        lambda: load_settings(write_yaml(tmp_path, "redis_user_ttl_s: 60\n"), environ={}),
        lambda: load_settings(environ={"SEGMENTS_REDIS_USER_TTL_S": "60"}),
        lambda: load_settings(environ={}, redis_user_ttl_s=60),
    ):
        with pytest.raises(SettingsError, match=r"'redis_user_ttl_s' was removed: .*retention_ms"):
            load()
