"""Kafka client security (SSL, SASL PLAIN and SCRAM) from the settings, turned into each client's
configuration: librdkafka's (confluent-kafka), the Flink Kafka connector's (Java client properties)
and the project's own wire-level reader's (jobs/committed_log.py). The password is only ever a
reference, `env:NAME` or `file:PATH`, resolved where the client runs: the Flink properties name the
variable through Kafka's EnvVarConfigProvider, so the password is in no job graph."""

from __future__ import annotations

import os
import re
import ssl
from dataclasses import dataclass
from pathlib import Path

PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
LOGIN_MODULES = {
    "PLAIN": "org.apache.kafka.common.security.plain.PlainLoginModule",
    "SCRAM-SHA-256": "org.apache.kafka.common.security.scram.ScramLoginModule",
    "SCRAM-SHA-512": "org.apache.kafka.common.security.scram.ScramLoginModule",
}
ENV_CONFIG_PROVIDER = "org.apache.kafka.common.config.provider.EnvVarConfigProvider"
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
REDACTED = "***"


class KafkaSecurityError(ValueError):
    pass


@dataclass(frozen=True)
class SaslCredentials:
    mechanism: str
    username: str
    password: str

    def __repr__(self) -> str:  # never the password, in a traceback or a log line
        return f"SaslCredentials({self.mechanism}, {self.username!r}, password={REDACTED})"


@dataclass(frozen=True)
class KafkaSecurity:
    """The settings' `kafka_*` fields, named after Kafka's properties (security.protocol,
    sasl.mechanism, sasl.username, sasl.password, ssl.ca.location, ssl.certificate.location,
    ssl.key.location), checked strictly."""

    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str = ""
    sasl_username: str = ""
    sasl_password: str = ""  # env:NAME or file:PATH, never the password itself
    ssl_ca_location: str = ""
    ssl_certificate_location: str = ""
    ssl_key_location: str = ""

    def __post_init__(self) -> None:
        if self.security_protocol not in PROTOCOLS:
            raise KafkaSecurityError(
                f"kafka_security_protocol must be one of {list(PROTOCOLS)}, got {self.security_protocol!r}"
            )
        if self.sasl:
            if self.sasl_mechanism not in MECHANISMS:
                raise KafkaSecurityError(
                    f"kafka_sasl_mechanism must be one of {list(MECHANISMS)} with "
                    f"{self.security_protocol}, got {self.sasl_mechanism!r}"
                )
            if not self.sasl_username:
                raise KafkaSecurityError(f"kafka_sasl_username is required with {self.security_protocol}")
            if re.search(r'["\\\x00-\x1f]', self.sasl_username):
                raise KafkaSecurityError("kafka_sasl_username may not hold '\"', '\\' or control characters")
            if not self.sasl_password:
                raise KafkaSecurityError(
                    f"kafka_sasl_password is required with {self.security_protocol}: env:NAME or file:PATH"
                )
            kind, _, where = self.sasl_password.partition(":")
            if kind not in ("env", "file") or not where:
                raise KafkaSecurityError(
                    "kafka_sasl_password must be a reference, env:NAME (an environment "
                    "variable) or file:PATH (a file holding it), never the password itself"
                )
            if kind == "env" and not ENV_NAME.fullmatch(where):
                raise KafkaSecurityError(f"kafka_sasl_password: {where!r} is not an environment variable name")
        else:
            for name in ("sasl_mechanism", "sasl_username", "sasl_password"):
                if getattr(self, name):
                    raise KafkaSecurityError(
                        f"kafka_{name} is set but kafka_security_protocol is "
                        f"{self.security_protocol}, not SASL_PLAINTEXT or SASL_SSL"
                    )
        ssl_files = ("ssl_ca_location", "ssl_certificate_location", "ssl_key_location")
        if not self.tls:
            for name in ssl_files:
                if getattr(self, name):
                    raise KafkaSecurityError(
                        f"kafka_{name} is set but kafka_security_protocol is "
                        f"{self.security_protocol}, not SSL or SASL_SSL"
                    )
        if bool(self.ssl_certificate_location) != bool(self.ssl_key_location):
            raise KafkaSecurityError(
                "kafka_ssl_certificate_location and kafka_ssl_key_location go together "
                "(a client certificate and its key, for mutual TLS)"
            )

    @property
    def sasl(self) -> bool:
        return self.security_protocol.startswith("SASL_")

    @property
    def tls(self) -> bool:
        return self.security_protocol in ("SSL", "SASL_SSL")

    def password(self) -> str:
        """The password, read now from its variable or file (where the client runs)."""
        kind, _, where = self.sasl_password.partition(":")
        if kind == "env":
            value = os.environ.get(where, "")
            if not value:
                raise KafkaSecurityError(f"the Kafka password variable {where} is not set")
            return value
        try:
            value = Path(where).read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as err:
            raise KafkaSecurityError(f"cannot read the Kafka password file {where}: {err.strerror}") from None
        if not value:
            raise KafkaSecurityError(f"the Kafka password file {where} is empty")
        return value

    def librdkafka_config(self) -> dict[str, str]:
        """Properties for a confluent-kafka client (merge them into its configuration). The password
        is resolved here: never log the result (`redact_config`)."""
        if self.security_protocol == "PLAINTEXT":
            return {}
        out = {"security.protocol": self.security_protocol}
        if self.sasl:
            out |= {
                "sasl.mechanism": self.sasl_mechanism,
                "sasl.username": self.sasl_username,
                "sasl.password": self.password(),
            }
        for name in ("ssl_ca_location", "ssl_certificate_location", "ssl_key_location"):
            if getattr(self, name):
                out[name.replace("_", ".")] = getattr(self, name)
        return out

    def flink_properties(self) -> dict[str, str]:
        """Kafka Java client properties for the Flink connector (each becomes `properties.<name>` in
        the DDL). No password: the JAAS configuration names the variable, `${env:NAME}`, which
        Kafka's EnvVarConfigProvider resolves in the worker's JVM when the client is created."""
        if self.security_protocol == "PLAINTEXT":
            return {}
        out = {"security.protocol": self.security_protocol}
        if self.sasl:
            kind, _, name = self.sasl_password.partition(":")
            if kind != "env":
                raise KafkaSecurityError(
                    "the Flink job reads the Kafka password from an environment variable "
                    "on every worker: give kafka_sasl_password as env:NAME (file:PATH is "
                    "for the command-line clients only)"
                )
            out |= {
                "sasl.mechanism": self.sasl_mechanism,
                "sasl.jaas.config": f"{LOGIN_MODULES[self.sasl_mechanism]} required "
                f'username="{self.sasl_username}" password="${{env:{name}}}";',
                "config.providers": "env",
                "config.providers.env.class": ENV_CONFIG_PROVIDER,
            }
        if self.ssl_ca_location:
            out |= {"ssl.truststore.type": "PEM", "ssl.truststore.location": self.ssl_ca_location}
        if self.ssl_certificate_location:
            # The Java client's PEM key store is one file holding the key (PKCS#8) and its chain.
            if self.ssl_certificate_location != self.ssl_key_location:
                raise KafkaSecurityError(
                    "for the Flink job, mutual TLS needs the client key and certificate in "
                    "one PEM file: set kafka_ssl_certificate_location and "
                    "kafka_ssl_key_location to that same file"
                )
            out |= {"ssl.keystore.type": "PEM", "ssl.keystore.location": self.ssl_certificate_location}
        return out

    def ssl_context(self) -> ssl.SSLContext | None:
        """The wire reader's TLS context (None without TLS): the broker's certificate checked
        against the CA file (or the system's CAs) and its host name; a client certificate if set."""
        if not self.tls:
            return None
        context = ssl.create_default_context(cafile=self.ssl_ca_location or None)
        if self.ssl_certificate_location:
            context.load_cert_chain(self.ssl_certificate_location, self.ssl_key_location)
        return context

    def sasl_credentials(self) -> SaslCredentials | None:
        """The wire reader's SASL login (None without SASL), the password read now."""
        if not self.sasl:
            return None
        return SaslCredentials(self.sasl_mechanism, self.sasl_username, self.password())


PLAINTEXT = KafkaSecurity()
