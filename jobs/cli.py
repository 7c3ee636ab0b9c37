"""`segments`: run, submit, generate, tail, demo, validate, backtest, train, profile-stats, lookup,
members, dashboard, forget, consent, deploy, promote, rollback, deployments, shadow-report, and
`stack up|down|status`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from jobs.committed_log import KafkaAuthenticationError
from jobs.kafka_security import KafkaSecurityError
from jobs.settings import SettingsError, load_settings
from udfs.profile_config import MINUTE_MS, parse_duration_ms

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def _settings(args):
    return load_settings(getattr(args, "config", None))


def cmd_stack(args) -> int:
    from infra import stack

    ports = stack.StackPorts.from_env()
    if args.action == "up":
        settings = _settings(args)
        info = stack.up(
            ports,
            with_flink=args.flink,
            taskmanagers=args.taskmanagers,
            partitions=settings.topic_partitions(args.partitions),
            topic_configs=settings.topic_configs(),
        )
        print(
            f"stack up: broker {info['bootstrap_servers']}, redis {stack.redact_url(info['redis_url'])}"
            + (f", flink http://127.0.0.1:{ports.flink_rest}" if args.flink else "")
        )
        print(f"logs: {stack.stack_dir() / 'logs'}")
    elif args.action == "down":
        stack.down()
        print("stack down")
    else:
        for name, state in stack.status(ports).items():
            print(f"{name:8} {state}")
    return 0


def cmd_run(args) -> int:
    from jobs.segment_users import main as run_job

    settings = _settings(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = threading.Event()
    follower = None
    if settings.redis_url and settings.redis_follower:
        from jobs.redis_follower import follow

        follower = threading.Thread(
            target=follow,
            name="redis-view-follower",
            daemon=True,
            args=(settings, stop, settings.redis_follower_metrics_port or None),
        )
        follower.start()
    try:
        run_job(["--config", args.config] if args.config else [])
    finally:
        stop.set()
        if follower is not None:
            follower.join(timeout=10)
    return 0


def ship_directory() -> Path:
    """The code the workers need, copied without the venv: the job's modules and the schemas."""
    from infra.stack import stack_dir

    ship = stack_dir() / "ship" / "segments_code"
    if ship.exists():
        shutil.rmtree(ship)
    for name in ("udfs", "jobs", "schemas", "models"):
        src = PROJECT_ROOT / name
        if src.exists():
            shutil.copytree(src, ship / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return ship


def cmd_submit(args) -> int:
    from infra import stack

    settings = _settings(args)  # validate before submitting anything
    ports = stack.StackPorts.from_env()
    root = stack.stack_dir()
    flink = stack.flink_home(root) / "bin" / "flink"
    if not flink.exists():
        print("no standalone cluster: run `segments stack up --flink` first", file=sys.stderr)
        return 2
    argv = [
        str(flink),
        "run",
        "-m",
        f"127.0.0.1:{ports.flink_rest}",
        "-py",
        str(PROJECT_ROOT / "jobs" / "segment_users.py"),
        "-pyfs",
        str(ship_directory()),
        "-pyclientexec",
        sys.executable,
        "-pyexec",
        sys.executable,
    ]
    if args.detached:
        argv.insert(2, "--detached")
    if getattr(args, "from_latest_checkpoint", False):
        from jobs.operations import OperationError, latest_retained_checkpoint

        directory = settings.checkpoint_dir or root / "checkpoints"
        try:
            latest = latest_retained_checkpoint(directory)
        except OperationError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        if latest is None:
            print(f"error: no complete checkpoint under {directory}", file=sys.stderr)
            return 1
        args.from_savepoint = str(latest)
    if args.from_savepoint:
        argv[2:2] = ["--fromSavepoint", args.from_savepoint]
    if args.config:
        argv += ["--config", str(Path(args.config).resolve())]
    env = stack.flink_env(root)
    if args.parallelism:  # a rescale: the same job from a savepoint at a new parallelism
        env["SEGMENTS_PARALLELISM"] = str(args.parallelism)
    print(
        f"submitting {settings.job_name} to http://127.0.0.1:{ports.flink_rest}"
        + (f" from {args.from_savepoint}" if args.from_savepoint else "")
        + (f" at parallelism {args.parallelism}" if args.parallelism else "")
    )
    return subprocess.call(argv, env=env)


def cmd_savepoint(args) -> int:
    """A savepoint of the running job; with --stop, the same as `stop --savepoint`."""
    return _on_running_job(args, "stop-with-savepoint" if args.stop else "savepoint")


def cmd_stop(args) -> int:
    """`stop --savepoint`: stop with a savepoint (sinks commit); `stop`: cancel, keeping the
    retained checkpoints (`resume --from-latest-checkpoint` picks up from the newest)."""
    return _on_running_job(args, "stop-with-savepoint" if args.savepoint else "cancel")


def _on_running_job(args, operation: str) -> int:
    from infra import stack
    from jobs.operations import FlinkRest, OperationError

    settings = _settings(args)
    rest = FlinkRest(stack.StackPorts.from_env().flink_rest)
    try:
        job_id = rest.running_job(settings.job_name)
        if operation == "savepoint":
            print(f"savepoint of {settings.job_name} ({job_id}): {rest.savepoint(job_id, args.directory)}")
        elif operation == "stop-with-savepoint":
            location = rest.stop_with_savepoint(job_id, args.directory)
            print(f"stopped {settings.job_name} ({job_id}) with savepoint {location}")
        else:
            rest.cancel(job_id)
            print(f"cancelled {settings.job_name} ({job_id}); its retained checkpoints are kept")
    except OperationError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


def cmd_resume(args) -> int:
    return cmd_submit(
        argparse.Namespace(
            config=args.config,
            detached=True,
            from_savepoint=args.from_savepoint,
            from_latest_checkpoint=args.from_latest_checkpoint,
            parallelism=args.parallelism,
        )
    )


def cmd_rescale(args) -> int:
    """Stop with a savepoint, then submit from it at the new parallelism."""
    from infra import stack
    from jobs.operations import FlinkRest, OperationError

    settings = _settings(args)
    rest = FlinkRest(stack.StackPorts.from_env().flink_rest)
    try:
        location = rest.stop_with_savepoint(rest.running_job(settings.job_name), args.directory)
    except OperationError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"stopped with savepoint {location}; resubmitting at parallelism {args.parallelism}")
    return cmd_submit(
        argparse.Namespace(config=args.config, detached=True, from_savepoint=location, parallelism=args.parallelism)
    )


def cmd_generate(args) -> int:
    from jobs.traffic import produce_events
    from udfs.shoppers import generate_events

    settings = _settings(args)
    start_ms = args.start_ms or int(time.time() * 1000) - int(args.hours * 60 * MINUTE_MS)
    events = generate_events(args.users, args.seed, start_ms, int(args.hours * 60 * MINUTE_MS))
    sent = produce_events(
        events,
        settings.bootstrap_servers,
        settings.events_topic,
        rate_per_s=args.rate,
        jsonl_copy=Path(args.jsonl) if args.jsonl else None,
        progress=not args.quiet,
        security=settings.kafka_security(),
    )
    print(f"sent {sent} events to {settings.events_topic}")
    return 0


def cmd_forget(args) -> int:
    from jobs.privacy_requests import erase_request

    return _send_request(args, "erasure", erase_request(args.user_id, args.at))


def cmd_consent(args) -> int:
    from jobs.privacy_requests import consent_request

    return _send_request(
        args, "consent", consent_request(args.user_id, args.purpose.upper(), args.choice == "grant", args.at)
    )


def _send_request(args, what: str, request) -> int:
    from jobs.privacy_requests import produce_request

    settings = _settings(args)
    try:
        produce_request(settings, request)
    except (ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"{what} request {request.request_id} sent to {settings.requests_topic}")
    return 0


def _instant_ms(text: str) -> int:
    """An instant on the command line: epoch milliseconds, or an ISO 8601 time (UTC unless it says)."""
    from datetime import UTC, datetime

    if text.lstrip("-").isdigit():
        return int(text)
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected epoch ms or an ISO 8601 time, got {text!r}") from None
    return int((when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp() * 1000)


def cmd_deploy(args) -> int:
    from jobs.deployment_control import deploy_record
    from udfs.deployments import DeploymentError, validate

    settings = _settings(args)
    try:
        control = deploy_record(args.definitions, args.models, args.shadow, args.at)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    # The job validates it again (and says so on the status topic); a file that fails here would fail there.
    try:
        refusal = validate(control, settings.profile, settings.models_dir or None)
    except DeploymentError as err:
        refusal = str(err)
    if refusal is not None:
        print(f"error: refused: {refusal}", file=sys.stderr)
        return 1
    return _send_control(args, settings, control)


def cmd_promote(args) -> int:
    from jobs.deployment_control import action_record
    from udfs.deployments import PROMOTE, ROLLBACK

    return _send_control(
        args, _settings(args), action_record(PROMOTE if args.command == "promote" else ROLLBACK, args.at)
    )


def _send_control(args, settings, control) -> int:
    from jobs.deployment_control import produce_control, write_control

    what = control.action.lower() + (f" ({control.mode.lower()})" if control.mode else "")
    if args.output:
        write_control(Path(args.output), control)
        print(f"{what} {control.deployment_id} at {_utc(control.effective_at)} written to {args.output}")
        return 0
    try:
        produce_control(settings, control)
    except (ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"{what} {control.deployment_id} at {_utc(control.effective_at)} sent to {settings.control_topic}")
    print(f"the job's verdict: segments deployments (status topic {settings.deployment_status_topic})")
    return 0


def cmd_deployments(args) -> int:
    from jobs.deployment_control import read_records
    from udfs.deployments import ACCEPTED

    settings = _settings(args)
    # By instant: the timeline's order (the status topic's order is not, with parallel writers).
    statuses = sorted(
        read_records(settings, settings.deployment_status_topic, "DeploymentStatus"), key=lambda s: s["effective_at"]
    )
    accepted = [s for s in statuses if s["status"] == ACCEPTED]
    current = accepted[-1] if accepted else None
    if current is None:
        print("active: the start-up definitions")
    else:
        print(f"active: {current['active_version'] or 'the start-up definitions'} from {_utc(current['effective_at'])}")
        print(f"shadow: {current['shadow_version'] or 'none'}")
    for s in statuses:
        what = s["action"] + (f" {s['mode']}" if s["mode"] else "")
        if s["status"] == ACCEPTED:
            detail = f"active {s['active_version']}" + (
                f", shadow {s['shadow_version']}" if s["shadow_version"] else ""
            )
        else:
            detail = s["reason"] or ""
        print(f"{_utc(s['effective_at'])}  {s['status']:8} {what:15} {s['deployment_id']}  {detail}")
    return 0


def cmd_shadow_report(args) -> int:
    from jobs.deployment_control import shadow_report

    settings = _settings(args)
    end = args.end if args.end is not None else 2**62
    report = shadow_report(settings, args.start or 0, end)
    print(f"{'segment':24} {'both':>7} {'active':>7} {'shadow':>7} {'agree':>6} {'flips a':>8} {'flips s':>8}")
    for a in report.values():
        print(
            f"{a.segment:24} {a.both:7} {a.only_active:7} {a.only_shadow:7} {a.agreement:6.1%} "
            f"{a.active_flip_rate:8.1%} {a.shadow_flip_rate:8.1%}"
        )
    return 0


def cmd_tail(args) -> int:
    from jobs.transitions_reader import follow_transitions

    settings = _settings(args)
    try:
        for t in follow_transitions(
            settings.bootstrap_servers,
            settings.transitions_topic,
            from_beginning=args.from_beginning,
            security=settings.kafka_security(),
        ):
            features = ", ".join(f"{k}={v:g}" for k, v in sorted(t["reason"]["features"].items()))
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t["event_time"] / 1000))
            cause = t["cause_event_id"] or "timer"
            print(
                f"{when}Z  {t['kind']:5}  {t['segment']:15} {t['user_id']:10} #{t['sequence']:<3} "
                f"by {cause:18} {t['reason']['rule']}  [{features}]",
                flush=True,
            )
    except KeyboardInterrupt:
        pass
    return 0


# `--strict` and a warning: the exit status, apart from 1 (errors) and 2 (usage).
WARNINGS_EXIT = 3


def cmd_validate(args) -> int:
    from udfs.definition_warnings import definition_warnings
    from udfs.definitions import DefinitionError
    from udfs.scoring import ModelVerificationError
    from udfs.segmentation import Segmentation

    settings = _settings(args)
    failed = warned = 0
    for path in args.files:
        try:
            d = Segmentation.load(path, settings.profile, args.models or settings.models_dir).definitions
        except (DefinitionError, ModelVerificationError) as err:
            print(f"error: {err}", file=sys.stderr)
            failed += 1
            continue
        groups = ", ".join(f"{g.name} [{' > '.join(s.name for s in g.segments)}]" for g in d.groups.values())
        print(
            f"{path}: ok, version {d.version}, {len(d.segments)} segments, sha256 {d.sha256[:12]}"
            + (f", exclusive groups: {groups}" if groups else "")
            + (f", model scores: {', '.join(d.models)}" if d.models else "")
            + (f", experiments: {experiments}" if (experiments := _experiments(d)) else "")
        )
        for warning in definition_warnings(d):
            warned += 1
            print(f"warning: {path}:{warning.line}: {' & '.join(warning.segments)}: {warning.message}")
        if args.verbose:
            if d.models:
                from udfs.scoring import ModelRegistry, manifest_digest
                from udfs.segmentation import DEFAULT_MODELS_DIR

                found = ModelRegistry.discover(Path(args.models or settings.models_dir or DEFAULT_MODELS_DIR))
                print("  models:  # the pins these definitions can carry (manifest digests of the models read)")
                for name in d.models:
                    print(f"    {name}: sha256:{manifest_digest(found[name])}")
            for s in d.segments.values():
                rule = f"when {s.enter.text}" if s.exit is None else f"enter {s.enter.text} / exit {s.exit.text}"
                dwell = f" (min dwell {s.min_dwell_ms} ms)" if s.min_dwell_ms else ""
                print(f"  {s.name}: {rule}{dwell}")
    if failed:
        return 1
    return WARNINGS_EXIT if warned and args.strict else 0


def _experiments(definitions) -> str:
    return ", ".join(f"{name} ({float(share * 100):g}% held out)" for name, share in definitions.experiments.items())


def cmd_backtest(args) -> int:
    from jobs import backtest
    from jobs.segment_warnings import behaviour_warnings
    from udfs.definitions import DefinitionError
    from udfs.deployments import DeploymentError, read_deployments_file
    from udfs.scoring import ModelVerificationError
    from udfs.segmentation import Segmentation

    if args.compare_transitions and not args.compare_with:
        print("error: --compare-transitions needs --compare-with", file=sys.stderr)
        return 2
    settings = _settings(args)
    try:
        thresholds = settings.warnings.replace(
            min_members=args.min_members,
            min_share=args.min_share,
            max_overlap=args.max_overlap,
            max_flap_rate=args.max_flap_rate,
            flap_window_ms=args.flap_window,
        )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        base = Segmentation.load(args.definitions, settings.profile, settings.models_dir)
        other = (
            Segmentation.load(args.compare_with, settings.profile, settings.models_dir) if args.compare_with else None
        )
    except (DefinitionError, ModelVerificationError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    try:
        log = backtest.read_events(
            args.events, args.start, args.end, settings.max_event_bytes, settings.kafka_security()
        )
        if args.requests:
            log.requests, rejected = backtest.read_requests(args.requests, security=settings.kafka_security())
            log.rejected.update({f"request {reason}": n for reason, n in rejected.items()})
    except (OSError, ValueError) as err:
        print(f"error: cannot read events: {err}", file=sys.stderr)
        return 1
    until = backtest.FLUSH if args.until == "flush" else (None if args.until == "watermark" else int(args.until))
    try:
        window_ms = parse_duration_ms(args.conversion_window, "--conversion-window")
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    options = dict(
        until_ms=until,
        watermark_lag_ms=settings.watermark_lag_ms,
        allowed_lateness_ms=settings.allowed_lateness_ms,
        progress=not args.quiet,
        flap_window_ms=thresholds.flap_window_ms,
        conversion_window_ms=window_ms,
        consent_default=settings.consent_default == "granted",
    )
    try:
        deployments = read_deployments_file(args.deployments) if args.deployments else ()
    except (OSError, DeploymentError) as err:
        print(f"error: cannot read deployments: {err}", file=sys.stderr)
        return 1
    result = backtest.run_backtest(
        base, log, **options, deployments=deployments, models_dir=settings.models_dir or None
    )
    for status in result.deployments:
        print(f"deployment {status.deployment_id}: {status.status}" + (f" ({status.reason})" if status.reason else ""))
    warnings = behaviour_warnings(result, thresholds)
    lines = [*backtest.summary_lines(result), *_warning_lines(result, warnings)]
    compared, diffs, compared_warnings = None, None, None
    if other is not None:
        compared = backtest.run_backtest(other, log, **options)
        compared_warnings = behaviour_warnings(compared, thresholds)
        diffs = backtest.compare(result, compared)
        lines += [
            "",
            *backtest.summary_lines(compared),
            *_warning_lines(compared, compared_warnings),
            "",
            *backtest.diff_lines(result, compared, diffs),
        ]
    print("\n".join(lines))
    if args.html:
        Path(args.html).write_text(backtest.html_report(result, compared, diffs, warnings), encoding="utf-8")
        print(f"chart and tables: {args.html}")
    if args.json:
        figures = backtest.as_json(result, diffs, warnings, compared_warnings)
        Path(args.json).write_text(json.dumps(figures, indent=1))
        print(f"figures: {args.json}")
    for path, run in ((args.transitions, result), (args.compare_transitions, compared)):
        if path and run is not None:
            written = backtest.write_transitions(run.transitions, Path(path))
            print(f"transitions of {run.definitions.version}: {written} in {path}")
    if args.shadow_transitions:
        written = backtest.write_transitions(result.shadow_transitions, Path(args.shadow_transitions))
        print(f"shadow transitions: {written} in {args.shadow_transitions}")
    return WARNINGS_EXIT if args.strict and (warnings or compared_warnings) else 0


def _warning_lines(result, warnings) -> list[str]:
    if not warnings:
        return [f"no over-segmentation warnings for {result.definitions.version}"]
    return [f"warnings for {result.definitions.version}:", *(f"warning: {w.message}" for w in warnings)]


def _duration_ms(text: str) -> int:
    """A CLI duration: milliseconds, or a number with a unit (30s, 10m, 1h, 1d)."""
    from jobs.segment_warnings import duration_ms

    try:
        return duration_ms(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def cmd_train(args) -> int:
    from models.train import train

    settings = _settings(args)
    out = Path(args.out)
    report = train(
        out,
        users=args.users,
        days=args.days,
        seed=args.seed,
        version=args.version,
        config=settings.profile,
        clv_users=args.clv_users,
        clv_days=args.clv_days,
        progress=lambda line: print(f"[train] {line}", flush=True),
    )
    for line in report.lines():
        print(line)
    print(f"models and manifests written to {out}/")
    return 0


def cmd_redis(args) -> int:
    from infra.stack import redact_url
    from jobs.redis_view import RedisSegmentView, rebuild_from_topic

    settings = _settings(args)
    if not settings.redis_url:
        print("no redis_url configured", file=sys.stderr)
        return 2
    if args.action == "upgrade":
        view = RedisSegmentView(
            settings.redis_url, settings.redis_key_prefix, settings.profile.retention_ms, load_apply_script=False
        )
        try:
            kept = view.upgrade_layout()
        finally:
            view.close()
        print(f"{kept} users in a segment at {redact_url(settings.redis_url)} no longer expire by layout 1's TTL")
        return 0
    if args.action == "follow":
        from redis import exceptions as redis_errors

        from jobs.redis_follower import follow

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        print(
            f"following {settings.transitions_topic} into {redact_url(settings.redis_url)} (Ctrl-C stops)", flush=True
        )
        try:
            follow(settings, stop, args.metrics_port or settings.redis_follower_metrics_port or None)
        except KeyboardInterrupt:
            stop.set()
        except redis_errors.AuthenticationError:
            print("error: Redis refused the follower's credentials", file=sys.stderr)
            return 1
        return 0
    view = RedisSegmentView(settings.redis_url, settings.redis_key_prefix, settings.profile.retention_ms)
    # A transaction open at the end of the topic may be being committed right now (its transitions
    # perhaps already in the Redis that was lost): wait that long for its marker.
    open_wait_s = args.open_wait_s
    if open_wait_s is None:
        open_wait_s = max(10.0, 3 * settings.checkpoint_interval_ms / 1000)
    try:
        if args.flush:
            print(f"deleted {view.clear()} keys under {settings.redis_key_prefix}:*")
        result = rebuild_from_topic(
            view,
            settings.bootstrap_servers,
            settings.transitions_topic,
            open_wait_s=open_wait_s,
            security=settings.kafka_security(),
        )
    finally:
        view.close()
    print(
        f"read {result.read} committed transitions from {settings.transitions_topic}, applied {result.applied} "
        f"to {redact_url(settings.redis_url)} (the rest were not newer than what Redis held); skipped "
        f"{result.aborted} of aborted transactions"
    )
    if result.open_left:
        print(
            f"warning: {result.open_left} transitions are in transactions still open after {open_wait_s:.0f} s "
            "(a job down or restarting?): run the rebuild again once the job runs",
            file=sys.stderr,
        )
    return 0


def _view_reader(settings):
    """The Redis view for reading, or None (with the reason printed) when no Redis is configured."""
    from jobs.redis_view import RedisSegmentView

    if not settings.redis_url:
        print("no redis_url configured", file=sys.stderr)
        return None
    return RedisSegmentView(
        settings.redis_url, settings.redis_key_prefix, settings.profile.retention_ms, load_apply_script=False
    )


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _utc(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}Z"


def _reading_the_view(command):
    """Runs a view-reading command; a Redis that cannot be reached or refuses the reads is one
    line on stderr (the URL without its password) and exit 1, not a traceback."""

    def run(args) -> int:
        from redis import exceptions as redis_errors

        from infra.stack import redact_url

        try:
            return command(args)
        except redis_errors.RedisError as err:
            settings = _settings(args)
            print(f"error: Redis at {redact_url(settings.redis_url)}: {type(err).__name__}: {err}", file=sys.stderr)
            return 1

    return run


@_reading_the_view
def cmd_lookup(args) -> int:
    """A user's current segments, with when and by which rule they entered, from the Redis view."""
    from infra.stack import redact_url

    settings = _settings(args)
    view = _view_reader(settings)
    if view is None:
        return 2
    try:
        current = view.current_segments(args.user_id)
        known = bool(current) or view.holds_user(args.user_id)
    finally:
        view.close()
    if args.json:
        print(
            json.dumps(
                {
                    "user_id": args.user_id,
                    "known": known,
                    "segments": [
                        {
                            "segment": c.segment,
                            "entered_at": c.entered_at_ms,
                            "entered_at_utc": _utc(c.entered_at_ms),
                            "rule": c.rule or None,
                            "sequence": c.sequence,
                        }
                        for c in current
                    ],
                }
            )
        )
    elif current:
        width = max(len("SEGMENT"), *(len(c.segment) for c in current))
        print(f"{'SEGMENT':<{width}}  {'ENTERED (UTC)':<24}  RULE")
        for c in current:
            print(f"{c.segment:<{width}}  {_utc(c.entered_at_ms):<24}  {c.rule or '(not recorded: layout 1)'}")
    elif known:
        print(f"{args.user_id!r} is in no segment")
    else:
        print(
            f"{args.user_id!r} is unknown to the view at {redact_url(settings.redis_url)} (prefix "
            f"{settings.redis_key_prefix!r}): no transition of theirs, or their profile expired",
            file=sys.stderr,
        )
    return 0 if known else 1


@_reading_the_view
def cmd_members(args) -> int:
    """A segment's members (streamed, SSCAN), or their number, from the Redis view."""
    from udfs.definitions import DefinitionError
    from udfs.scoring import ModelVerificationError
    from udfs.segmentation import Segmentation

    settings = _settings(args)
    try:
        segmentation = Segmentation.load(settings.definitions_file(), settings.profile, settings.models_dir)
    except (DefinitionError, ModelVerificationError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    defined = set(segmentation.definitions.segments)
    view = _view_reader(settings)
    if view is None:
        return 2
    try:
        # A segment the definitions no longer hold may still have members in the view until
        # each of them is next evaluated (and exits with the rule segment_removed_from_definitions).
        if args.segment not in defined and not view.has_members_key(args.segment):
            print(
                f"error: unknown segment {args.segment!r}: not in {settings.definitions_file()} "
                f"({', '.join(sorted(defined))}) and not in the view",
                file=sys.stderr,
            )
            return 2
        if args.count:
            print(view.member_count(args.segment))
            return 0
        out = sys.stdout
        for n, member in enumerate(view.iter_members(args.segment, args.batch), 1):
            out.write(member + "\n")
            if n % args.batch == 0:
                out.flush()
        out.flush()
    except BrokenPipeError:  # `segments members big | head`: the reader has seen enough
        # As Python's docs advise: point stdout at devnull so that the exit flush does not fail too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    finally:
        view.close()
    return 0


@_reading_the_view
def cmd_dashboard(args) -> int:
    """The live view's page, JSON and Prometheus figures (jobs/dashboard/server.py) until Ctrl-C."""
    from infra.stack import redact_url
    from jobs.dashboard.server import Dashboard, serve
    from udfs.definitions import DefinitionError
    from udfs.scoring import ModelVerificationError
    from udfs.segmentation import Segmentation

    if args.sample_every < 100:
        print(f"error: --sample-every must be at least 100 ms, got {args.sample_every}", file=sys.stderr)
        return 2
    settings = _settings(args)
    try:
        definitions = Segmentation.load(settings.definitions_file(), settings.profile, settings.models_dir).definitions
    except (DefinitionError, ModelVerificationError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    view = _view_reader(settings)
    if view is None:
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    dashboard = Dashboard(
        view.client,
        settings.redis_key_prefix,
        definitions,
        settings.warnings,
        sample_s=args.sample_every / 1000,
        keep_samples=args.history,
        window_ms=args.window,
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    server = serve(dashboard, args.host, args.port)
    print(
        f"dashboard of {redact_url(settings.redis_url)} at http://{args.host}:{args.port}/ "
        f"(Prometheus: /metrics; Ctrl-C stops)",
        flush=True,
    )
    try:
        dashboard.run_sampler(stop)
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
        view.close()
    return 0


def cmd_profile_stats(args) -> int:
    from jobs.profile_stats import measure

    print(f"replaying {args.users} users x {args.days} days of generated traffic (seed {args.seed}) ...")
    for line in measure(_settings(args), args.users, args.days, args.seed).lines():
        print(line)
    return 0


def cmd_demo(args) -> int:
    """Stack up, the job on the embedded MiniCluster, generated traffic, live transitions."""
    from infra import stack

    ports = stack.StackPorts.from_env()
    settings = _settings(args)
    info = stack.up(ports, partitions=settings.topic_partitions(2), topic_configs=settings.topic_configs())
    env = dict(os.environ, SEGMENTS_BOOTSTRAP_SERVERS=info["bootstrap_servers"], REDIS_URL=info["redis_url"])
    logs = stack.stack_dir() / "logs"
    me = [sys.executable, "-m", "jobs.cli"]
    children = []
    with open(logs / "demo-job.log", "ab") as job_log, open(logs / "demo-traffic.log", "ab") as gen_log:
        children.append(
            subprocess.Popen(
                [*me, "run"],
                env=env,
                stdout=job_log,
                stderr=subprocess.STDOUT,
                cwd=PROJECT_ROOT,
                start_new_session=True,
            )
        )
        children.append(
            subprocess.Popen(
                [*me, "generate", "--users", str(args.users), "--hours", "6", "--rate", str(args.rate), "--quiet"],
                env=env,
                stdout=gen_log,
                stderr=subprocess.STDOUT,
                cwd=PROJECT_ROOT,
                start_new_session=True,
            )
        )
    print(
        f"job and traffic started (logs in {logs}); transitions appear once the first checkpoint "
        f"commits (~{settings.checkpoint_interval_ms // 1000} s after the job starts). Ctrl-C stops.",
        flush=True,
    )
    # SIGTERM (a supervisor, `timeout`) must stop the children too, as Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        os.environ.update(env)
        return cmd_tail(argparse.Namespace(config=args.config, from_beginning=True))
    finally:
        for child in children:
            try:
                os.killpg(child.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        print("job and traffic stopped; `segments stack down` stops the broker and Redis")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="segments", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p):
        p.add_argument("--config", help="YAML settings file; SEGMENTS_* variables override it")
        return p

    p = with_config(sub.add_parser("stack", help="local broker, Redis and Flink cluster"))
    p.add_argument("action", choices=["up", "down", "status"])
    p.add_argument("--flink", action="store_true", help="also start a standalone Flink cluster")
    p.add_argument("--partitions", type=int, default=2, help="partitions of the events and transitions topics")
    p.add_argument(
        "--taskmanagers",
        type=int,
        default=1,
        help="with --flink: TaskManagers to start; 1 (the default) holds two slots, more hold one each",
    )
    p.set_defaults(func=cmd_stack)

    with_config(sub.add_parser("run", help="run the job on the embedded MiniCluster")).set_defaults(func=cmd_run)

    p = with_config(sub.add_parser("submit", help="submit the job to the standalone cluster"))
    p.add_argument("--detached", action="store_true")
    p.add_argument("--from-savepoint", help="resume from this savepoint (or retained checkpoint)")
    p.add_argument(
        "--from-latest-checkpoint",
        action="store_true",
        help="resume from the newest retained checkpoint in the checkpoint directory",
    )
    p.add_argument("--parallelism", type=int, help="override the parallelism setting (a rescale)")
    p.set_defaults(func=cmd_submit)

    p = with_config(sub.add_parser("savepoint", help="savepoint the running job (--stop: and stop it)"))
    p.add_argument("--stop", action="store_true", help="stop the job after the savepoint (sinks commit)")
    p.add_argument("--directory", help="target directory (default: the cluster's savepoint dir)")
    p.set_defaults(func=cmd_savepoint)

    p = with_config(sub.add_parser("stop", help="stop the running job (--savepoint: with a savepoint; else cancel)"))
    p.add_argument("--savepoint", action="store_true", help="take a final savepoint; sinks commit")
    p.add_argument("--directory", help="savepoint directory (default: the cluster's savepoint dir)")
    p.set_defaults(func=cmd_stop)

    p = with_config(sub.add_parser("resume", help="submit the job again from a savepoint or retained checkpoint"))
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--from", dest="from_savepoint", help="savepoint or chk-<n> directory")
    source.add_argument(
        "--from-latest-checkpoint",
        action="store_true",
        help="the newest retained checkpoint in the checkpoint directory",
    )
    p.add_argument("--parallelism", type=int, help="resume at this parallelism (a rescale)")
    p.set_defaults(func=cmd_resume)

    p = with_config(sub.add_parser("rescale", help="stop with a savepoint and resume at a new parallelism"))
    p.add_argument("parallelism", type=int)
    p.add_argument("--directory", help="savepoint directory (default: the cluster's savepoint dir)")
    p.set_defaults(func=cmd_rescale)

    p = with_config(sub.add_parser("generate", help="write generated shopper traffic to the events topic"))
    p.add_argument("--users", type=int, default=1000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--hours", type=float, default=24.0, help="event-time span of the traffic")
    p.add_argument("--start-ms", type=int, default=0, help="first event time (default: now - hours)")
    p.add_argument("--rate", type=float, default=1000.0, help="events per second; 0 = unthrottled")
    p.add_argument("--jsonl", help="also write the events to this JSONL file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_generate)

    p = with_config(sub.add_parser("tail", help="print committed transitions as they arrive"))
    p.add_argument("--from-beginning", action="store_true")
    p.set_defaults(func=cmd_tail)

    p = with_config(sub.add_parser("validate", help="check segment definitions files; non-zero exit on errors"))
    p.add_argument("files", nargs="+")
    p.add_argument("-v", "--verbose", action="store_true", help="list every segment's rule")
    p.add_argument("--models", help="models directory (default: the models_dir setting, else models/)")
    p.add_argument("--strict", action="store_true", help=f"exit {WARNINGS_EXIT} if there is any warning")
    p.set_defaults(func=cmd_validate)

    p = with_config(sub.add_parser("backtest", help="replay an event log through definitions, no cluster"))
    p.add_argument("definitions", help="segment definitions file")
    p.add_argument("--events", required=True, help="JSONL file, Avro container file, or kafka://HOST:PORT/TOPIC")
    p.add_argument("--start", help="Kafka: first offset, or t=EPOCH_MS (default: the beginning)")
    p.add_argument("--end", help="Kafka: end offset (exclusive), or t=EPOCH_MS (default: the end now)")
    p.add_argument(
        "--until",
        default="watermark",
        help="let time pass to: `watermark` (what the job reaches: last event time - "
        "watermark_lag_ms - 1), `flush` (every pending timer), or epoch ms",
    )
    p.add_argument(
        "--requests",
        help="kafka://HOST:PORT/TOPIC of privacy requests (erasure, consent), replayed among the events "
        "by event time (the whole topic)",
    )
    p.add_argument("--compare-with", help="another definitions file: report both and the diff")
    p.add_argument("--html", help="write the chart and tables to this HTML file")
    p.add_argument("--json", help="write the figures to this JSON file")
    p.add_argument(
        "--transitions",
        help="write the transitions themselves to this file, as SegmentTransition "
        "records: Avro container file if it ends in .avro, else JSON lines",
    )
    p.add_argument("--compare-transitions", help="the same for the --compare-with definitions")
    p.add_argument(
        "--deployments",
        help="a deployments file (JSON lines of control records, as `segments deploy --output` writes): "
        "versions switch at their instants as in the job (docs/deployments.md)",
    )
    p.add_argument("--shadow-transitions", help="with --deployments: write the shadow's transitions to this file")
    p.add_argument(
        "--conversion-window",
        default="7d",
        help="experiments (holdout(...)): a purchase this long after entering is a conversion (default 7d)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    # The thresholds' defaults: jobs/segment_warnings.WarningThresholds, or the settings file's
    # `warnings:` section; a flag given wins over both.
    p.add_argument("--min-members", type=int, help="warn of a segment with fewer members at its peak (default 10)")
    p.add_argument(
        "--min-share", type=float, help="... or fewer than this share of the users with events (default 0.01)"
    )
    p.add_argument(
        "--max-overlap",
        type=float,
        help="warn of two segments whose time-weighted Jaccard index is at least this (default 0.9)",
    )
    p.add_argument(
        "--max-flap-rate",
        type=float,
        help="warn of a segment whose share of entries that are flaps is above this (default 0.1)",
    )
    p.add_argument(
        "--flap-window",
        type=_duration_ms,
        help="a re-entry this soon after the same user's exit is a flap (default 10m)",
    )
    p.add_argument("--strict", action="store_true", help=f"exit {WARNINGS_EXIT} if there is any warning")
    p.set_defaults(func=cmd_backtest)

    p = with_config(sub.add_parser("train", help="train and export the models from generated history"))
    p.add_argument("--users", type=int, default=1200)
    p.add_argument("--days", type=int, default=36, help="history length (the churn label needs 14 days ahead)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--clv-users", type=int, default=600, help="users of the clv_30d model's own history")
    p.add_argument(
        "--clv-days", type=int, default=100, help="its length (30 days of warm-up, 30-day labels around the split)"
    )
    p.add_argument("--version", default="1", help="recorded in the manifests and in transitions")
    p.add_argument("--out", default=str(PROJECT_ROOT / "models"))
    p.set_defaults(func=cmd_train)

    p = with_config(sub.add_parser("redis", help="the Redis view: follow the transitions topic, or rebuild it"))
    p.add_argument(
        "action",
        choices=["follow", "rebuild", "upgrade"],
        help="follow: apply committed transitions as they come, resuming where it left off (the view "
        "catches up after Redis was down or came back empty); rebuild: replay the whole topic once; "
        "upgrade: clear the TTL layout 1 gave members' keys",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="follow: serve the follower's figures (lag per partition) for Prometheus on this port",
    )
    p.add_argument("--flush", action="store_true", help="delete the view's keys first (a fresh Redis)")
    p.add_argument(
        "--open-wait-s",
        type=float,
        default=None,
        help="how long to wait for transactions still open at the end of the topic "
        "(default: 3 checkpoint intervals, at least 10 s)",
    )
    p.set_defaults(func=cmd_redis)

    p = with_config(sub.add_parser("lookup", help="a user's current segments, entry times and rules (Redis view)"))
    p.add_argument("user_id")
    p.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    p.set_defaults(func=cmd_lookup)

    p = with_config(sub.add_parser("forget", help="request a user's erasure (written to the requests topic)"))
    p.add_argument("user_id")
    p.add_argument("--at", type=int, help="the request's event time, epoch ms (default: now)")
    p.set_defaults(func=cmd_forget)

    p = with_config(sub.add_parser("consent", help="give or withdraw a user's consent to a purpose"))
    p.add_argument("user_id")
    p.add_argument("purpose", choices=["segmentation", "personalisation", "scoring"])
    p.add_argument("choice", choices=["grant", "withdraw"])
    p.add_argument("--at", type=int, help="the request's event time, epoch ms (default: now)")
    p.set_defaults(func=cmd_consent)

    p = with_config(sub.add_parser("deploy", help="deploy a definitions file live, active or in shadow"))
    p.add_argument("definitions", help="segment definitions file")
    p.add_argument("--models", help="a models directory whose models travel with the deployment")
    p.add_argument("--shadow", action="store_true", help="run it in shadow beside the active version")
    p.add_argument("--at", type=_instant_ms, help="event-time instant it applies from: epoch ms or ISO (default: now)")
    p.add_argument("--output", help="append the control record to this deployments file instead of sending it")
    p.set_defaults(func=cmd_deploy)
    for name, what in (
        ("promote", "make the candidate in shadow active"),
        ("rollback", "return to the previous version"),
    ):
        p = with_config(sub.add_parser(name, help=what))
        p.add_argument("--at", type=_instant_ms, help="event-time instant: epoch ms or ISO (default: now)")
        p.add_argument("--output", help="append the control record to this deployments file instead of sending it")
        p.set_defaults(func=cmd_promote)
    p = with_config(sub.add_parser("deployments", help="what is active, in shadow, refused (the status topic)"))
    p.set_defaults(func=cmd_deployments)
    p = with_config(sub.add_parser("shadow-report", help="agreement per segment of the active and shadow outputs"))
    p.add_argument("--start", type=_instant_ms, help="window start, event time (default: the beginning)")
    p.add_argument("--end", type=_instant_ms, help="window end, event time, exclusive (default: no end)")
    p.set_defaults(func=cmd_shadow_report)

    p = with_config(sub.add_parser("members", help="a segment's members, one per line, or --count (Redis view)"))
    p.add_argument("segment")
    p.add_argument("--count", action="store_true", help="print only how many members the segment has")
    p.add_argument("--batch", type=_positive_int, default=1000, help="members fetched per SSCAN round trip")
    p.set_defaults(func=cmd_members)

    p = with_config(sub.add_parser("dashboard", help="the live view: a web page and Prometheus figures (Redis view)"))
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0 in a container)")
    p.add_argument("--port", type=int, default=8090, help="the page at /, its JSON at /api/live, /metrics")
    p.add_argument(
        "--sample-every", type=_duration_ms, default=60_000, help="how often segment sizes are sampled (default 1m)"
    )
    p.add_argument(
        "--history", type=_positive_int, default=1440, help="size samples kept in Redis (default 1440: a day)"
    )
    p.add_argument("--window", type=_duration_ms, default=3_600_000, help="the top movers' window (default 1h)")
    p.set_defaults(func=cmd_dashboard)

    p = with_config(sub.add_parser("profile-stats", help="state bytes per user and core cost per event"))
    p.add_argument("--users", type=int, default=2000)
    p.add_argument("--days", type=float, default=7.0)
    p.add_argument("--seed", type=int, default=1)
    p.set_defaults(func=cmd_profile_stats)

    from jobs.bench import command as bench  # no Kafka, Redis or Flink client at import: cheap here

    p = with_config(sub.add_parser("bench", help="throughput, latency, state and checkpoint figures against targets"))
    bench.add_arguments(p)
    p.set_defaults(func=bench.run)

    p = with_config(sub.add_parser("demo", help="stack, job, traffic and live transitions in one go"))
    p.add_argument("--users", type=int, default=300)
    p.add_argument("--rate", type=float, default=200.0)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SettingsError as err:
        print(f"settings error: {err}", file=sys.stderr)
        return 2
    except (KafkaSecurityError, KafkaAuthenticationError) as err:  # no password in either's message
        print(f"kafka error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
