"""Engine-free per-event core: decode, profile, features, segments, transitions.

Never imports pyflink, redis or confluent_kafka."""
