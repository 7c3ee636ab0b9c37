"""The report: each figure against its target, as rows (kept in the JSON) and as a table."""

from __future__ import annotations

import math

STATE_TARGET_BYTES = 2048
JOB_TARGET_PER_SLOT = 1_500
CONTROL_IDLE_RUN = "job-p1-control-idle"  # the job at p1 with a control topic connected, no deployment


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of an ascending list (q in [0, 1]); None when empty."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def latency_summary(values_ms: list[float]) -> dict:
    ordered = sorted(values_ms)
    return {
        "count": len(ordered),
        "p50_ms": percentile(ordered, 0.50),
        "p99_ms": percentile(ordered, 0.99),
        "max_ms": ordered[-1] if ordered else None,
    }


def verdict(value: float | None, op: str, target: float) -> str:
    if value is None:
        return "n/a"
    ok = value >= target if op == ">=" else value <= target
    return "pass" if ok else "MISS"


def fmt(value, unit: str = "", digits: int = 0) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and digits:
        return f"{value:,.{digits}f}{unit}"
    return f"{round(value):,}{unit}"


def figures(results: dict, checkpoint_interval_ms: int, cores: int) -> list[dict]:
    """Rows of (figure, value, target, verdict); the JSON keeps the numbers, the table the text."""
    rows = []

    def row(figure, value, shown, target_text="", op=None, target=None, note=""):
        rows.append(
            {
                "figure": figure,
                "value": value,
                "shown": shown,
                "target": target_text,
                "verdict": verdict(value, op, target) if op else "",
                "note": note,
            }
        )

    tp = {r["name"]: r for r in results.get("throughput", [])}
    job1, job2, ref, floor = tp.get("job-p1"), tp.get("job-p2"), tp.get("reference"), tp.get("floor-p1")
    on_cluster = [r for name, r in tp.items() if name.startswith("job-cluster-p")]
    if job1:
        row(
            "full job, parallelism 1: events/s per slot",
            job1["events_per_s_per_slot"],
            fmt(job1["events_per_s_per_slot"]),
            ">= 1,500",
            ">=",
            JOB_TARGET_PER_SLOT,
            job1["error"] or "",
        )
    if job2:
        row(
            "full job, parallelism 2: events/s per slot",
            job2["events_per_s_per_slot"],
            fmt(job2["events_per_s_per_slot"]),
            ">= 1,500",
            ">=",
            JOB_TARGET_PER_SLOT,
            job2["error"] or "",
        )
    if floor:
        row(
            "floor job (state, timer, model call; no logic), p1: events/s",
            floor["events_per_s"],
            fmt(floor["events_per_s"]),
            "",
            None,
            None,
            floor["error"] or "",
        )
    for part, what in (("floor-p1-no-model", "the model call"), ("floor-p1-no-timer", "the timer")):
        without = tp.get(part)
        if floor and without and floor.get("cpu_s_per_million_events") and without.get("cpu_s_per_million_events"):
            cost = floor["cpu_s_per_million_events"] - without["cpu_s_per_million_events"]  # s per 1M = us per event
            row(
                f"floor: {what}, CPU per event (floor - floor without it)",
                cost,
                fmt(cost, " us"),
                "",
                None,
                None,
                f"without it {fmt(without['events_per_s'])} events/s",
            )
    if job1 and floor and job1["events_per_s"] and floor["events_per_s"]:
        ratio = job1["events_per_s"] / floor["events_per_s"]
        row("job (p1) / floor", ratio, f"{ratio:.2f}x", ">= 0.6x", ">=", 0.6)
        if job1.get("steady_events_per_s") and floor.get("steady_events_per_s"):
            ratio = job1["steady_events_per_s"] / floor["steady_events_per_s"]
            row("job (p1) / floor, second half of the run", ratio, f"{ratio:.2f}x", ">= 0.6x", ">=", 0.6)
    idle = tp.get(CONTROL_IDLE_RUN)
    if job1 and idle and job1["events_per_s"] and idle["events_per_s"]:
        ratio = idle["events_per_s"] / job1["events_per_s"]
        row("job (p1) with an idle control stream / without", ratio, f"{ratio:.2f}x", ">= 0.95x", ">=", 0.95)
        if job1.get("cpu_s_per_million_events") and idle.get("cpu_s_per_million_events"):
            ratio = idle["cpu_s_per_million_events"] / job1["cpu_s_per_million_events"]
            row("  CPU per event, with it / without", ratio, f"{ratio:.2f}x", "<= 1.05x", "<=", 1.05)
    if ref:
        row(
            "reference loop (1 process): events/s",
            ref["events_per_s"],
            fmt(ref["events_per_s"]),
            "",
            None,
            None,
            ref["error"] or "",
        )
    if job1 and ref and job1["events_per_s_per_slot"] and ref["events_per_s"]:
        ratio = job1["events_per_s_per_slot"] / ref["events_per_s"]
        row("job (p1, per slot) / reference", ratio, f"{ratio:.2f}x", ">= 0.5x", ">=", 0.5)
    for r in (job1, job2, floor, ref):
        if r and r.get("steady_events_per_s"):
            per = r["steady_events_per_s"] / r["slots"]
            row(
                f"{r['name']}: events/s per slot, second half of the run",
                per,
                fmt(per),
                "",
                None,
                None,
                "after the JVM's JIT warm-up" if r is not ref else "",
            )
    if job1 and ref and job1.get("steady_events_per_s") and ref.get("steady_events_per_s"):
        ratio = job1["steady_events_per_s"] / ref["steady_events_per_s"]
        row("job (p1) / reference, second half of the run", ratio, f"{ratio:.2f}x", ">= 0.5x", ">=", 0.5)
    if job1 and job2 and job1["events_per_s"] and job2["events_per_s"]:
        ratio = job2["events_per_s"] / job1["events_per_s"]
        note = f"{cores} cores on this machine, shared by the job, broker, Redis and the bench" if cores < 4 else ""
        row(
            "parallelism 2 / parallelism 1 (one TaskManager, 2 slots)",
            ratio,
            f"{ratio:.2f}x",
            ">= 1.6x",
            ">=",
            1.6,
            note,
        )
    for r in on_cluster:
        row(
            f"{r['name']} ({r['slots']} single-slot TaskManagers): events/s in all",
            r["events_per_s"],
            fmt(r["events_per_s"]),
            "",
            None,
            None,
            r["error"] or "",
        )
        if job1 and job1["events_per_s"] and r["events_per_s"]:
            ratio = r["events_per_s"] / job1["events_per_s"]
            note = f"{cores} cores on this machine, shared by the job, broker, Redis and the bench" if cores < 4 else ""
            row(
                f"{r['name']} / parallelism 1",
                ratio,
                f"{ratio:.2f}x",
                f">= {0.8 * r['slots']:.1f}x",
                ">=",
                0.8 * r["slots"],
                note,
            )
    for r in (job1, job2, *on_cluster, floor, ref):
        if r and r["cpu_s_per_million_events"] is not None:
            target = ("<= 800 s", "<=", 800) if r is job1 else ("", None, None)
            row(
                f"{r['name']}: CPU seconds per 1M events",
                r["cpu_s_per_million_events"],
                fmt(r["cpu_s_per_million_events"], " s"),
                *target,
                f"{r['cores_busy']:.2f} cores busy",
            )
    for r in (job1, job2):
        if r and r["startup_s"] is not None:
            row(f"{r['name']}: start-up (launch -> first event read)", r["startup_s"], fmt(r["startup_s"], " s", 1))
    lat = results.get("latency")
    if lat:
        rate_note = (
            f"offered {lat['offered_rate']:,.0f}/s, sent {fmt(lat['achieved_send_rate'])}/s, "
            f"processed {'~' if lat['processing_rate_estimated'] else ''}{fmt(lat['processing_rate'])}/s"
        )
        if not lat["kept_up"]:
            if lat["drain_lag_s"] is not None:
                after = f"drained {fmt(lat['drain_lag_s'], ' s', 1)} after it"
            elif lat["redis"].get("count"):
                after = "not drained: the latencies cover only the events it got through"
            else:
                after = "none of the measured window's events got through"
            behind = fmt(lat["lag_at_end_of_load_s"], " s", 1)
            rate_note += f": DID NOT KEEP UP, {behind} behind when the load stopped; {after}"
        if lat["error"]:
            rate_note = lat["error"]
        for what, key, target_text, target, stat in (
            ("event -> visible in Redis", "redis", "p99 <= 100 ms", 100, "p99_ms"),
            (
                "event -> committed in Kafka",
                "kafka",
                f"max <= {checkpoint_interval_ms + 1000:,} ms",
                checkpoint_interval_ms + 1000,
                "max_ms",
            ),
        ):
            s = lat.get(key) or {}
            value = s.get(stat)
            shown = (
                f"p50 {fmt(s.get('p50_ms'))} / p99 {fmt(s.get('p99_ms'))} / max {fmt(s.get('max_ms'))} ms"
                if s.get("count")
                else "-"
            )
            if not s.get("count") and lat["lag_at_end_of_load_s"] is not None:
                # Nothing of the window got through: the latency is at least the backlog's age.
                value = lat["lag_at_end_of_load_s"] * 1000
                shown = f"> {fmt(value)} ms (backlog)"
            row(f"{lat['name']}: {what}", value, shown, target_text, "<=", target, rate_note)
            rate_note = lat["error"] or ""  # said once
    state = results.get("state")
    if state and state.get("core_events_per_s"):
        note = (
            f"{state['timers_per_event']:.2f} timer steps per event; {state['users']:,} users x {state['days']:g} days"
        )
        row(
            "in-memory core (per-user step, timers, state encode), the shipped models: events/s",
            state["core_events_per_s"],
            fmt(state["core_events_per_s"]),
            ">= 8,000",
            ">=",
            8_000,
            note,
        )
        if state.get("no_models_events_per_s"):
            row(
                "in-memory core without the model segments and models: events/s",
                state["no_models_events_per_s"],
                fmt(state["no_models_events_per_s"]),
                ">= 25,000",
                ">=",
                25_000,
            )
    if state:
        row(
            f"state bytes per user ({state['users']:,} users x {state['days']:g} days)",
            state["state_bytes_mean"],
            f"mean {fmt(state['state_bytes_mean'])} / p99 {fmt(state['state_bytes_p99'])} / max "
            f"{fmt(state['state_bytes_max'])} B",
            "mean <= 2,048 B",
            "<=",
            STATE_TARGET_BYTES,
            f"core {state['core_us_per_event']:.0f} us/event ({state['cached_us_per_event']:.0f} cached)",
        )
    ck = results.get("checkpoint")
    if ck:
        note = "" if ck["users"] >= 1_000_000 else f"at {ck['users']:,} users (target is for 1M)"
        if ck["error"]:
            note = ck["error"]
        shown = (
            f"{fmt(ck['duration_s'], ' s', 2)}, state {fmt(ck['state_size_bytes'])} B, uploaded "
            f"{fmt(ck['checkpointed_size_bytes'])} B"
            if ck["finished"]
            else "-"
        )
        row(
            f"checkpoint with {ck['users']:,} users' state (RocksDB, incremental)",
            ck["duration_s"],
            shown,
            "<= 10 s",
            "<=",
            10,
            note,
        )
        if ck["finished"]:
            row(
                "  next checkpoint (nothing new)",
                ck["next_duration_s"],
                f"{fmt(ck['next_duration_s'], ' s', 2)}, uploaded {fmt(ck['next_checkpointed_size_bytes'])} B",
            )
            row(
                "  longest checkpoint while loading (backpressured)",
                ck["max_duration_during_load_s"],
                fmt(ck["max_duration_during_load_s"], " s", 2),
                "<= 10 s",
                "<=",
                10,
                f"{ck['checkpoints_failed']} failed"
                + (f": {ck['failure_messages'][0][:90]}" if ck["failure_messages"] else "")
                if ck["checkpoints_failed"]
                else "",
            )
            row("  checkpointed state per user", ck["state_bytes_per_user"], fmt(ck["state_bytes_per_user"], " B"))
    return rows


def format_report(report: dict) -> str:
    m = report["machine"]
    s = report["settings"]
    lines = [
        f"segments bench, {report['started_at']} (took {report['took_s']:.0f} s)",
        f"machine: {m['cores']} cores ({m['cpu_model']}), {m['ram_gb']} GB RAM, Python {m['python']}, {m['java']}; "
        f"load average {m['load_average_at_start']:.2f} at start",
        f"job: core {s.get('core', 'interpreted')}, definitions {s['definitions_version']} "
        f"({s['segments']} segments, models: {s['models']}), "
        f"checkpoint interval {s['checkpoint_interval_ms']:,} ms, state backend {s['state_backend']}, "
        f"profile cache {s['profile_cache_users']:,} users, watermark lag {s['watermark_lag_ms']:,} ms",
        "",
    ]
    rows = report["figures"]
    widths = [
        max([len(r["figure"]) for r in rows] + [6]),
        max([len(r["shown"]) for r in rows] + [5]),
        max([len(r["target"]) for r in rows] + [6]),
    ]
    lines.append(f"{'figure':<{widths[0]}}  {'value':<{widths[1]}}  {'target':<{widths[2]}}  verdict")
    lines.append("-" * (sum(widths) + 15))
    for r in rows:
        line = f"{r['figure']:<{widths[0]}}  {r['shown']:<{widths[1]}}  {r['target']:<{widths[2]}}  {r['verdict']}"
        lines.append(line.rstrip() + (f"  ({r['note']})" if r["note"] else ""))
    lines.append("")
    for r in report["results"].get("throughput", []):
        if r["finished"]:
            lines.append(
                f"{r['name']}: {r['events']:,} events in {r['window_s']:.1f} s after {r['startup_s']:.1f} s start-up; "
                f"CPU {r['cpu_window_s']:.1f} s in the window ({r['cpu_total_s']:.1f} s in all), broker + Redis "
                f"{r['broker_redis_cpu_window_s']:.1f} s; transitions committed {fmt(r['transitions_committed'])}; "
                f"load average before {r['load_average_before']:.2f}"
            )
        else:
            lines.append(f"{r['name']}: did not finish: {r['error']}")
        if r["busiest_threads"]:
            lines.append(
                "  busiest threads (CPU s in the window): "
                + ", ".join(f"{name!r} {cpu:.1f}" for name, cpu in r["busiest_threads"])
            )
        if r["other_dead_letters"]:
            lines.append(f"  unexpected dead letters: {r['other_dead_letters']}")
    counts = {
        r["name"]: r["transitions_committed"]
        for r in report["results"].get("throughput", [])
        if r["transitions_committed"] is not None
    }
    if len(set(counts.values())) > 1:
        lines.append(f"note: the runs committed different numbers of transitions: {counts}")
    lat = report["results"].get("latency")
    if lat and lat["finished"]:
        lines.append(
            f"{lat['name']}: {lat['events_sent']:,} events sent at {lat['achieved_send_rate']:,.0f}/s "
            f"({lat['warmup_s']:.0f} s warm-up not counted); {lat['event_caused_transitions']:,} event-caused "
            f"transitions in the window (unmatched: Redis {lat['redis_unmatched']}, Kafka {lat['kafka_unmatched']}); "
            f"job {lat['job_cores_busy']:.2f} cores busy; measuring side CPU: producer {lat['producer_cpu_s']:.1f} s, "
            f"Redis watcher {lat['redis_watcher_cpu_s']:.1f} s, Kafka watcher {lat['kafka_watcher_cpu_s']:.1f} s"
        )
    ck = report["results"].get("checkpoint")
    if ck and ck["finished"]:
        lines.append(
            f"checkpoint: {ck['users']:,} users loaded at {ck['load_events_per_s']:,.0f} events/s with RocksDB; "
            f"{ck['checkpoints_completed']} checkpoints completed, {ck['checkpoints_failed']} failed, longest "
            f"{fmt(ck['max_duration_during_load_s'], ' s', 2)}"
        )
        for message in ck["failure_messages"]:
            lines.append(f"  failed checkpoint: {message}")
        if ck["busiest_threads"]:
            lines.append(
                "  busiest threads (CPU s while loading): "
                + ", ".join(f"{name!r} {cpu:.1f}" for name, cpu in ck["busiest_threads"])
            )
    if report.get("json_path"):
        lines.append(f"results: {report['json_path']}")
    return "\n".join(lines)
