"""The project's Java operators (infra/java: the Redis view's two-phase-commit sink, the keying of
raw user events), built by infra/setup.sh into `<jars_dir>/segments-operators.jar` and shipped
with the job through `pipeline.jars` like the Kafka connector."""

from __future__ import annotations

from pathlib import Path

from jobs.settings import JobSettings

OPERATORS_JAR = "segments-operators.jar"


class OperatorsJarMissing(FileNotFoundError):
    pass


def operators_jar(settings: JobSettings) -> Path:
    jar = Path(settings.jars_dir) / OPERATORS_JAR
    if not jar.is_file():
        raise OperatorsJarMissing(
            f"{jar} is missing: run infra/setup.sh (it builds the Java operators from infra/java)"
        )
    return jar


JAVA_CLASS_ATTEMPTS = 3


def java_class(settings: JobSettings, name: str):
    """The class `name` (dotted) through PyFlink's JVM gateway. On the client it must be loadable
    there; pipeline.jars (which create_environment fills from jars_dir) ships the same jar to the
    cluster.

    PyFlink's add_jars_to_context_class_loader sets the context class loader of the gateway
    thread that serves that one call, and py4j serves each of its connections on a thread of its
    own: a lookup that reaches the JVM on another connection does not see the jar, and py4j then
    answers with a package, not a class (seen once in CI, as ClassNotFoundException on the first
    MiniCluster test of a process whose earlier tests had used the gateway). So the jar is added
    again and the class looked up again until the lookup is a class."""
    from py4j.java_gateway import JavaClass
    from pyflink.java_gateway import get_gateway
    from pyflink.util.java_utils import add_jars_to_context_class_loader

    jar = operators_jar(settings).as_uri()
    for _ in range(JAVA_CLASS_ATTEMPTS):
        add_jars_to_context_class_loader([jar])
        found = get_gateway().jvm
        for part in name.split("."):
            found = getattr(found, part)
        if isinstance(found, JavaClass):
            return found
    raise OperatorsJarMissing(f"{name} is not in {jar} as the gateway JVM loads it: rebuild it with infra/setup.sh")
