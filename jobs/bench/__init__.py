"""`segments bench`: the performance figures of the whole pipeline, measured in one invocation on
one machine, each printed against its target and written as JSON so runs can be compared.

What runs, each as its own process (so CPU seconds are read per process tree), on a tansu broker
and a redis-server the bench starts for itself on free ports:

* the full job (`segments run` on the embedded MiniCluster: Avro decode, the whole profile, every
  model, the shipped definitions, transitions exactly-once to Kafka and to Redis) at parallelism 1
  and 2, over the same preloaded generated events;
* the floor job (`python -m jobs.bench.floor_job`): the job's mechanics without its logic;
* the reference loop (`python -m jobs.bench reference`): one plain Python process doing the same
  work with the same engine-free core (confluent-kafka consumer -> core -> transactional producer
  + Redis), no Flink;
* a latency run: a paced producer at a fixed offered rate, event timestamps = wall clock, and two
  watchers: Redis keyspace notifications (transition visible in the view) and a read_committed
  consumer (transition committed in Kafka);
* a checkpoint run: the job with RocksDB (incremental) over one event for each of N users, the
  checkpoint statistics read from the MiniCluster's REST API;
* state bytes per user from `jobs.profile_stats` (the core alone).

Throughput excludes start-up: every events partition begins with a garbage record and ends with
events far behind the watermark. Both become dead letters in the keyed operator (the garbage keyed by
"", the late events after every event of their partition before them) and are visible with
read_uncommitted as soon as the sink sends them. Throughput is the events between the first start
marker and the last end marker, over that time; start-up is process launch -> first start marker.
More late events every PROGRESS_EVERY events report progress on the way.

The modules: `command` (the arguments and the whole run), `runs` (each measured run), `load` and
`markers` (the preloaded events and the markers that time them), `processes` (/proc statistics and
the measured processes), `report`, `reference` (the reference loop), `latency_probes` (the paced
producer and the watchers), `floor_job`; `__main__` starts the helper processes. Importing the
package and `command` loads no Kafka, Redis or Flink client, so `segments --help` stays fast.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def now_ms() -> int:
    return time.time_ns() // 1_000_000
