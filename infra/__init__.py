"""The local stack: broker, Redis and a standalone Flink cluster, started and stopped by `segments stack`."""
