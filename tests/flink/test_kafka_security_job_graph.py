"""The Kafka password is in no job graph: the job as `segments run` and `segments submit` build it
(Kafka DDL with SASL over TLS, the pipeline's pickled Python functions), compiled to the JobGraph
Flink submits and serialized as Flink serializes it, holds the JAAS line that names the variable
and never the password, which is set in this process's environment the whole time."""

from __future__ import annotations

import pytest

from jobs.flink_environment import create_environment
from jobs.segment_users import attach_connectors
from jobs.settings import load_settings

pytestmark = pytest.mark.flink

PASSWORD = "job-graph-canary-9c41e"


@pytest.mark.parametrize("mechanism, module", [("SCRAM-SHA-512", b"ScramLoginModule"), ("PLAIN", b"PlainLoginModule")])
def test_the_serialized_job_graph_names_the_password_variable_and_never_holds_the_password(
    monkeypatch, mechanism, module
):
    from pyflink.java_gateway import get_gateway

    monkeypatch.setenv("KAFKA_JOB_GRAPH_PASSWORD", PASSWORD)
    settings = load_settings(
        environ={},
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism=mechanism,
        kafka_sasl_username="alice",
        kafka_sasl_password="env:KAFKA_JOB_GRAPH_PASSWORD",
        kafka_ssl_ca_location="/etc/kafka-ca.pem",
        redis_url="",
    )
    env = create_environment(settings)
    attach_connectors(env, settings)
    jvm = get_gateway().jvm
    stream_graph = env._generate_stream_graph(False)
    job_graph = jvm.org.apache.flink.streaming.api.graph.StreamingJobGraphGenerator.createJobGraph(stream_graph)
    serialized = bytes(jvm.org.apache.flink.util.InstantiationUtil.serializeObject(job_graph))
    assert PASSWORD.encode() not in serialized
    # ... though the Kafka clients' properties are in it (a password there would have been found).
    assert b"${env:KAFKA_JOB_GRAPH_PASSWORD}" in serialized and module in serialized
    assert b"EnvVarConfigProvider" in serialized and b"/etc/kafka-ca.pem" in serialized
