"""`python -m jobs.bench reference|produce|watch-redis|watch-kafka`: the processes `segments bench`
starts (run the bench itself with `segments bench`)."""

from __future__ import annotations

import argparse
import sys

from jobs.bench.latency_probes import main_produce, main_watch_kafka, main_watch_redis
from jobs.bench.reference import main_reference


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.bench", description="processes `segments bench` starts (use `segments bench`)"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("reference", help="the reference loop, configured like the job (SEGMENTS_*, --config)")
    p.add_argument("--config")
    p.set_defaults(func=main_reference)
    p = sub.add_parser("produce", help="paced producer of generated events stamped with the wall clock")
    for name, kind in (
        ("bootstrap", str),
        ("topic", str),
        ("rate", float),
        ("seconds", float),
        ("users", int),
        ("seed", int),
        ("out", str),
    ):
        p.add_argument(f"--{name}", type=kind, required=True)
    p.set_defaults(func=main_produce)
    p = sub.add_parser("watch-redis", help="records when transitions become visible in the Redis view")
    for name in ("url", "prefix", "out"):
        p.add_argument(f"--{name}", required=True)
    p.set_defaults(func=main_watch_redis)
    p = sub.add_parser("watch-kafka", help="records when transitions become readable under read_committed")
    for name in ("bootstrap", "topic", "out"):
        p.add_argument(f"--{name}", required=True)
    p.set_defaults(func=main_watch_kafka)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
