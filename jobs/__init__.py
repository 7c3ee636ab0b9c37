"""PyFlink jobs, their settings, the CLI and the thin adapters to Kafka and Redis."""
