"""Engine-free per-event core: decode, profile, segments, transitions. Never imports pyflink, redis or confluent_kafka."""
