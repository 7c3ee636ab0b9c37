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
        raise OperatorsJarMissing(f"{jar} is missing: run infra/setup.sh (it builds the Java operators from "
                                  "infra/java)")
    return jar


def java_class(settings: JobSettings, name: str):
    """The class `name` (dotted) through PyFlink's JVM gateway. On the client it must be loadable
    there; pipeline.jars (which create_environment fills from jars_dir) ships the same jar to the
    cluster."""
    from pyflink.java_gateway import get_gateway
    from pyflink.util.java_utils import add_jars_to_context_class_loader

    add_jars_to_context_class_loader([operators_jar(settings).as_uri()])
    found = get_gateway().jvm
    for part in name.split("."):
        found = getattr(found, part)
    return found
