"""`segments bench`: its arguments and the whole run (state, throughput, floor, reference,
latency, checkpoint), the report printed and written as JSON."""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import udfs
from jobs.bench import PROJECT_ROOT, log, now_ms
from jobs.bench.load import generated_events, preload
from jobs.bench.processes import BenchStack, machine_info
from jobs.bench.report import CONTROL_IDLE_RUN, figures, format_report
from jobs.bench.runs import (
    floor_argv,
    job_argv,
    measure_checkpoint,
    measure_latency,
    measure_on_cluster,
    measure_throughput,
    reference_argv,
)

FLOOR_STATE_BYTES = 1_800  # the floor job's state value when the state replay was skipped


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--events", type=int, default=200_000, help="preloaded events for the throughput runs")
    p.add_argument("--users", type=int, default=5_000, help="generated users in the throughput runs")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--parallelisms", default="1,2", help="job parallelisms to measure (comma-separated)")
    p.add_argument(
        "--cluster-parallelisms",
        default="2",
        help="job parallelisms to measure on a standalone cluster of that many single-slot TaskManagers",
    )
    p.add_argument("--rate", type=float, default=5_000.0, help="offered load of the latency run, events/s")
    p.add_argument("--latency-seconds", type=float, default=60.0, help="measured window of the latency run")
    p.add_argument("--warmup-seconds", type=float, default=10.0, help="offered load before the window")
    p.add_argument("--latency-users", type=int, default=5_000)
    p.add_argument(
        "--drain-seconds",
        type=float,
        default=60.0,
        help="how long the latency run waits for a backlog to drain after the load stops",
    )
    p.add_argument("--latency-parallelism", type=int, default=1)
    p.add_argument(
        "--latency-of-reference", action="store_true", help="also measure the reference loop's latency at the same load"
    )
    p.add_argument(
        "--checkpoint-users",
        type=int,
        default=1_000_000,
        help="users whose state the checkpoint run holds (one event each)",
    )
    p.add_argument("--state-users", type=int, default=500, help="users for the state-bytes replay")
    p.add_argument("--state-days", type=float, default=7.0, help="days of traffic for the state-bytes replay")
    p.add_argument(
        "--stall-seconds",
        type=float,
        default=600.0,
        help="give a run up when none of its markers has come for this long",
    )
    for what in ("state", "throughput", "floor", "reference", "latency", "checkpoint"):
        p.add_argument(f"--skip-{what}", action="store_true", help=f"do not measure {what}")
    p.add_argument(
        "--floor-parts",
        action="store_true",
        help="also run the floor job without its model call and without its timer, to price each",
    )
    p.add_argument(
        "--control-idle",
        action="store_true",
        help="also run the job at parallelism 1 with a control topic connected and idle (live deployments: "
        "docs/deployments.md), to price it",
    )
    p.add_argument("--json", help="results file (default: bench-results/<UTC timestamp>.json)")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, checkpoints)")


def run(args) -> int:
    from jobs.profile_stats import measure
    from jobs.settings import load_settings
    from udfs.segmentation import Segmentation

    settings = load_settings(args.config)
    segmentation = Segmentation.load(settings.definitions_file(), settings.profile, settings.models_dir)
    started = time.time()
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(started))
    json_path = Path(args.json) if args.json else PROJECT_ROOT / "bench-results" / f"{stamp}.json"
    machine = machine_info()
    log(f"machine: {machine['cores']} cores, load average {machine['load_average_at_start']:.2f}")
    results: dict = {}
    work = Path(tempfile.mkdtemp(prefix="segments-bench-"))
    stack = None
    failed = False
    # SIGTERM (a supervisor, `timeout`) must stop everything this started, as Ctrl-C does.
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        if not args.skip_state:
            log(f"state: replaying {args.state_users:,} users x {args.state_days:g} days through the core")
            stats = measure(settings, args.state_users, args.state_days, args.seed)
            results["state"] = {**asdict(stats), "days": args.state_days}
        stack = BenchStack(work)
        interval = settings.checkpoint_interval_ms
        if not args.skip_throughput:
            parallelisms = [int(p) for p in args.parallelisms.split(",") if p.strip()]
            on_cluster = [int(p) for p in args.cluster_parallelisms.split(",") if p.strip()]
            topics = {f"events-{p}": p for p in sorted(set(parallelisms) | set(on_cluster) | {1})}
            stack.create_topics(topics)
            # One topic per partition count: a source subtask reading several partitions of a
            # backlog makes events late (docs/limits.md), so partitions = parallelism.
            log(f"preloading {args.events:,} generated events for {args.users:,} users into {sorted(topics)}")
            count, _, _ = preload(
                stack.bootstrap, topics, generated_events(args.events, args.users, args.seed, now_ms())
            )
            runs = results["throughput"] = []
            for p in parallelisms:
                runs.append(
                    asdict(
                        measure_throughput(
                            stack,
                            work,
                            f"job-p{p}",
                            job_argv(args.config),
                            p,
                            f"events-{p}",
                            p,
                            count,
                            {"parallelism": p},
                            args.stall_seconds,
                            True,
                            interval,
                        )
                    )
                )
            if args.control_idle:
                control = {
                    "control_topic": "job-p1-control",
                    "deployment_status_topic": "job-p1-control-status",
                    "shadow_topic": "job-p1-control-shadow",
                }
                stack.create_topics({control["control_topic"]: 1, control["deployment_status_topic"]: 1})
                stack.create_topics({control["shadow_topic"]: 1})
                runs.append(
                    asdict(
                        measure_throughput(
                            stack,
                            work,
                            CONTROL_IDLE_RUN,
                            job_argv(args.config),
                            1,
                            "events-1",
                            1,
                            count,
                            {"parallelism": 1, **control},
                            args.stall_seconds,
                            True,
                            interval,
                        )
                    )
                )
            for p in on_cluster:
                runs.append(
                    asdict(measure_on_cluster(stack, work, args.config, p, count, args.stall_seconds, interval))
                )
            if not args.skip_floor:
                state_bytes = int(results["state"]["state_bytes_mean"]) if "state" in results else FLOOR_STATE_BYTES
                variants = [("floor-p1", ())]
                if args.floor_parts:  # each part left out once: what it costs is the difference
                    variants += [("floor-p1-no-model", ("--no-model",)), ("floor-p1-no-timer", ("--no-timer",))]
                for name, flags in variants:
                    runs.append(
                        asdict(
                            measure_throughput(
                                stack,
                                work,
                                name,
                                [*floor_argv(args.config, state_bytes), *flags],
                                1,
                                "events-1",
                                1,
                                count,
                                {"parallelism": 1},
                                args.stall_seconds,
                                False,
                                interval,
                            )
                        )
                    )
            if not args.skip_reference:
                runs.append(
                    asdict(
                        measure_throughput(
                            stack,
                            work,
                            "reference",
                            reference_argv(args.config),
                            1,
                            "events-1",
                            1,
                            count,
                            {},
                            args.stall_seconds,
                            True,
                            interval,
                        )
                    )
                )
        if not args.skip_latency:
            p = args.latency_parallelism
            results["latency"] = asdict(
                measure_latency(
                    stack,
                    work,
                    f"latency-job-p{p}",
                    job_argv(args.config),
                    {"parallelism": p},
                    args.rate,
                    args.latency_seconds,
                    args.warmup_seconds,
                    args.latency_users,
                    args.seed,
                    interval,
                    args.drain_seconds,
                )
            )
            if args.latency_of_reference:
                results["latency_reference"] = asdict(
                    measure_latency(
                        stack,
                        work,
                        "latency-reference",
                        reference_argv(args.config),
                        {},
                        args.rate,
                        args.latency_seconds,
                        args.warmup_seconds,
                        args.latency_users,
                        args.seed,
                        interval,
                        args.drain_seconds,
                    )
                )
        if not args.skip_checkpoint:
            results["checkpoint"] = asdict(
                measure_checkpoint(stack, work, args.config, args.checkpoint_users, {}, interval, args.stall_seconds)
            )
    except BaseException:
        failed = True
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        if stack is not None:
            stack.stop()
        if args.keep or failed:
            log(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    definitions = segmentation.definitions
    report = {
        "started_at": time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(started)),
        "took_s": time.time() - started,
        "machine": machine,
        "settings": {
            "core": udfs.CORE,  # the job's workers import the same files: they run the same build
            "definitions_version": definitions.version,
            "segments": len(definitions.segments),
            "models": ", ".join(definitions.models) or "none",
            "checkpoint_interval_ms": settings.checkpoint_interval_ms,
            "state_backend": settings.state_backend,
            "profile_cache_users": settings.profile_cache_users,
            "watermark_lag_ms": settings.watermark_lag_ms,
        },
        "arguments": {k: v for k, v in vars(args).items() if k != "func"},
        "results": results,
    }
    report["figures"] = figures(results, settings.checkpoint_interval_ms, machine["cores"] or 1)
    if results.get("latency_reference"):
        extra = figures(
            {"latency": results["latency_reference"]}, settings.checkpoint_interval_ms, machine["cores"] or 1
        )
        report["figures"] += extra
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=1))
    report["json_path"] = str(json_path)
    print(format_report(report))
    return 0
