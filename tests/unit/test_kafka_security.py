"""Kafka client security settings: strict validation, and the one mapping per kind of client
(librdkafka, the Flink connector's DDL, the wire reader), with the password never written out."""

from __future__ import annotations

import pickle

import pytest

from jobs.committed_log import ScramClient
from jobs.kafka_security import KafkaSecurity, KafkaSecurityError
from jobs.kafka_tables import kafka_table_ddl
from jobs.settings import SettingsError, load_settings

SECRET = "s3cr3t-'quoted'-pw"
SCRAM = dict(
    kafka_security_protocol="SASL_SSL",
    kafka_sasl_mechanism="SCRAM-SHA-512",
    kafka_sasl_username="alice",
    kafka_sasl_password="env:KAFKA_PW",
    kafka_ssl_ca_location="/etc/ca.pem",
)


def test_sasl_settings_come_from_the_environment_with_kafkas_property_names():
    environ = {f"SEGMENTS_{k.upper()}": v for k, v in SCRAM.items()}
    security = load_settings(environ=environ).kafka_security()
    assert security == KafkaSecurity("SASL_SSL", "SCRAM-SHA-512", "alice", "env:KAFKA_PW", "/etc/ca.pem")


def test_sasl_settings_come_from_the_settings_file(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("".join(f"{k}: {v}\n" for k, v in SCRAM.items()))
    assert load_settings(path, environ={}).kafka_security().sasl_mechanism == "SCRAM-SHA-512"


@pytest.mark.parametrize("password", ["hunter2", "env:", "file:", "vault:x", "env:NOT-A-NAME"])
def test_a_password_that_is_not_a_reference_is_refused(password):
    with pytest.raises(SettingsError, match="kafka_sasl_password"):
        load_settings(environ={}, **(SCRAM | {"kafka_sasl_password": password}))


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"kafka_security_protocol": "SASL"}, "kafka_security_protocol must be one of"),
        ({"kafka_sasl_mechanism": "GSSAPI"}, "kafka_sasl_mechanism must be one of"),
        ({"kafka_sasl_mechanism": ""}, "kafka_sasl_mechanism must be one of"),
        ({"kafka_sasl_username": ""}, "kafka_sasl_username is required"),
        ({"kafka_sasl_username": 'a"b'}, "kafka_sasl_username may not hold"),
        ({"kafka_sasl_password": ""}, "kafka_sasl_password is required"),
        ({"kafka_security_protocol": "SSL"}, "kafka_sasl_mechanism is set but"),
        ({"kafka_security_protocol": "SASL_PLAINTEXT"}, "kafka_ssl_ca_location is set but"),
        ({"kafka_ssl_certificate_location": "/c.pem"}, "go together"),
    ],
)
def test_inconsistent_security_settings_are_refused_with_the_setting_named(changes, message):
    with pytest.raises(SettingsError, match=message):
        load_settings(environ={}, **(SCRAM | changes))


def test_plaintext_by_default_and_no_extra_properties():
    security = load_settings(environ={}).kafka_security()
    assert security.librdkafka_config() == {} and security.flink_properties() == {}
    assert security.ssl_context() is None and security.sasl_credentials() is None


def test_librdkafka_gets_the_password_read_from_its_variable_or_file(monkeypatch, tmp_path):
    monkeypatch.setenv("KAFKA_PW", SECRET)
    security = KafkaSecurity("SASL_SSL", "SCRAM-SHA-256", "alice", "env:KAFKA_PW", "/etc/ca.pem", "/c.pem", "/k.pem")
    assert security.librdkafka_config() == {
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-256",
        "sasl.username": "alice",
        "sasl.password": SECRET,
        "ssl.ca.location": "/etc/ca.pem",
        "ssl.certificate.location": "/c.pem",
        "ssl.key.location": "/k.pem",
    }
    (tmp_path / "pw").write_text(SECRET + "\n")
    from_file = KafkaSecurity("SASL_PLAINTEXT", "PLAIN", "alice", f"file:{tmp_path / 'pw'}")
    assert from_file.librdkafka_config()["sasl.password"] == SECRET


def test_a_missing_password_variable_or_file_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.delenv("KAFKA_PW", raising=False)
    with pytest.raises(KafkaSecurityError, match="variable KAFKA_PW is not set"):
        KafkaSecurity(**{k[6:]: v for k, v in SCRAM.items()}).librdkafka_config()
    with pytest.raises(KafkaSecurityError, match="cannot read the Kafka password file"):
        KafkaSecurity("SASL_PLAINTEXT", "PLAIN", "alice", f"file:{tmp_path / 'none'}").sasl_credentials()


def test_the_flink_ddl_names_the_password_variable_and_never_holds_the_password(monkeypatch):
    monkeypatch.setenv("KAFKA_PW", SECRET)
    settings = load_settings(environ={}, **SCRAM)
    ddls = [kafka_table_ddl("events", "t", settings, sink=False), kafka_table_ddl("out", "t", settings, sink=True)]
    for ddl in ddls:
        assert SECRET not in ddl
        assert "'properties.security.protocol' = 'SASL_SSL'" in ddl
        assert "'properties.sasl.mechanism' = 'SCRAM-SHA-512'" in ddl
        assert (
            "'properties.sasl.jaas.config' = 'org.apache.kafka.common.security.scram.ScramLoginModule "
            'required username="alice" password="${env:KAFKA_PW}";\''
        ) in ddl
        assert "'properties.config.providers' = 'env'" in ddl
        assert (
            "'properties.config.providers.env.class' = 'org.apache.kafka.common.config.provider.EnvVarConfigProvider'"
        ) in ddl
        assert "'properties.ssl.truststore.type' = 'PEM'" in ddl
        assert "'properties.ssl.truststore.location' = '/etc/ca.pem'" in ddl
    assert SECRET.encode() not in pickle.dumps(settings)


def test_plain_uses_the_plain_login_module_and_mtls_one_pem_key_store():
    security = KafkaSecurity("SASL_SSL", "PLAIN", "bob", "env:PW", "", "/client.pem", "/client.pem")
    props = security.flink_properties()
    assert props["sasl.jaas.config"].startswith("org.apache.kafka.common.security.plain.PlainLoginModule required")
    assert props["ssl.keystore.type"] == "PEM" and props["ssl.keystore.location"] == "/client.pem"
    assert "ssl.truststore.location" not in props


def test_the_flink_job_refuses_what_it_cannot_keep_out_of_the_job_graph():
    with pytest.raises(KafkaSecurityError, match="env:NAME"):
        KafkaSecurity("SASL_PLAINTEXT", "PLAIN", "bob", "file:/run/pw").flink_properties()
    with pytest.raises(KafkaSecurityError, match="one PEM file"):
        KafkaSecurity("SSL", ssl_certificate_location="/c.pem", ssl_key_location="/k.pem").flink_properties()


def test_logged_settings_errors_and_credentials_never_show_the_password(monkeypatch):
    monkeypatch.setenv("KAFKA_PW", SECRET)
    settings = load_settings(environ={}, **SCRAM)
    assert SECRET not in repr(settings.redacted()) and SECRET not in repr(settings)
    assert SECRET not in repr(settings.kafka_security().sasl_credentials())
    assert settings.kafka_security().sasl_credentials().password == SECRET
    with pytest.raises(SettingsError) as refused:  # an inline password is refused without echoing it
        load_settings(environ={}, **(SCRAM | {"kafka_sasl_password": SECRET}))
    assert SECRET not in str(refused.value)


def test_scram_client_matches_rfc_7677s_example():
    client = ScramClient("SCRAM-SHA-256", "user", "pencil", nonce="rOprNGfwEbeRWgbNEkqO")
    assert client.first() == b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
    final = client.final(b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096")
    assert final == (
        b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
    )
    client.check(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")
    with pytest.raises(ConnectionError, match="signature does not match"):
        client.check(b"v=AAAA" + b"6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="[4:])


def test_the_security_settings_are_set_field_by_field_only(tmp_path):
    with pytest.raises(SettingsError, match="unknown setting in environment variable SEGMENTS_KAFKA"):
        load_settings(environ={"SEGMENTS_KAFKA": "SASL_SSL"})
    with pytest.raises(SettingsError, match="unknown setting in environment variable SEGMENTS_KAFKA_SASL_PASS"):
        load_settings(environ={"SEGMENTS_KAFKA_SASL_PASS": "env:X"})
    path = tmp_path / "s.yaml"
    path.write_text("kafka: {security_protocol: SSL}\n")
    with pytest.raises(SettingsError, match="unknown setting 'kafka'"):
        load_settings(path, environ={})


def test_the_command_line_says_which_password_variable_is_missing(monkeypatch, capsys):
    from jobs.cli import main

    for key, value in SCRAM.items():
        monkeypatch.setenv(f"SEGMENTS_{key.upper()}", value)
    monkeypatch.delenv("KAFKA_PW", raising=False)
    assert main(["tail"]) == 1
    assert "kafka error: the Kafka password variable KAFKA_PW is not set" in capsys.readouterr().err
