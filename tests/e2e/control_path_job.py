"""A job of the control path alone (jobs/deployment_operator.attach_control: the control topic,
the validation operator, the status topic and the dead letters), with the settings of its
SEGMENTS_* variables, for tests/e2e/test_deployment_commands.py: the control path's own
behaviour, without events."""

from __future__ import annotations

from pyflink.table import StreamTableEnvironment

from jobs.deployment_operator import attach_control
from jobs.flink_environment import create_environment
from jobs.kafka_tables import kafka_table_ddl
from jobs.settings import load_settings
from udfs.segmentation import Segmentation


def main() -> None:
    settings = load_settings()
    env = create_environment(settings)
    t_env = StreamTableEnvironment.create(env)
    statements = t_env.create_statement_set()
    t_env.execute_sql(kafka_table_ddl("dead_letters_out", settings.dead_letter_topic, settings, sink=True))
    startup = Segmentation.load(settings.definitions_file(), settings.profile, settings.models_dir)
    _, dead_letters = attach_control(t_env, statements, settings, startup)
    statements.add_insert("dead_letters_out", t_env.from_data_stream(dead_letters))
    statements.attach_as_datastream()
    env.execute("control path")


if __name__ == "__main__":
    main()
