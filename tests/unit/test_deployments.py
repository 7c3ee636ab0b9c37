"""Live deployments (udfs/deployments.py, docs/deployments.md): validation as at start-up, the
timeline, the deterministic switch, the sweep, the shadow, and the state that keeps them."""

from __future__ import annotations

import inspect
import json
import random
from collections import defaultdict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import START_MS
from tests.unit.basic_definitions import basic_yaml
from udfs.codec import SchemaCatalog
from udfs.definitions import REMOVED_RULE
from udfs.deployments import (
    ACCEPTED,
    ACTIVE,
    DEPLOY,
    PROMOTE,
    REFUSED,
    ROLLBACK,
    SHADOW,
    ControlRecord,
    DeployedEngine,
    ModelBundle,
    Timeline,
    control_from_json,
    control_from_record,
    load_segmentation,
    sweep_instant,
    validate,
)
from udfs.events import UserEvent
from udfs.privacy import PrivacyState, UserRequest
from udfs.profile import UserProfile
from udfs.profile_config import HOUR_MS, MINUTE_MS
from udfs.segmentation import DEFAULT_MODELS_DIR, Segmentation
from udfs.shoppers import generate_events
from udfs.state import ProfileStateCodec
from udfs.transitions import SegmentEngine, Transition

STARTUP = Segmentation.from_text(basic_yaml().encode(), "basic.yaml")
# v2: active_browser's window shortened (a changed threshold), highly_engaged removed, a segment added.
V2 = (
    basic_yaml(active_window="5m")
    .replace("basic-1", "v2")
    .replace('  - name: highly_engaged\n    when: engagement_tier == "high"\n', "")
    .replace("segments:\n", "segments:\n  - name: long_browser\n    when: ms_since_last_event < 40m\n")
)
V3 = basic_yaml(abandon_after="10m").replace("basic-1", "v3")


def deploy(deployment_id: str, at: int, text: str = V2, mode: str = ACTIVE) -> ControlRecord:
    return ControlRecord(deployment_id, DEPLOY, at, mode, text.encode(), None)


def control(deployment_id: str, action: str, at: int) -> ControlRecord:
    return ControlRecord(deployment_id, action, at)


def timeline(*controls: ControlRecord) -> Timeline:
    line = Timeline(STARTUP, load_segmentation)
    for c in controls:
        assert line.decide(c, validate(c)).status == ACCEPTED, c.deployment_id
    return line


def ev(n: int, ts: int, kind: str = "page_view", user: str = "u1", **fields) -> UserEvent:
    return UserEvent(f"e{n}", user, kind, ts, **fields)


def summary(transitions: list[Transition]) -> list[tuple]:
    return [(t.event_time - START_MS, t.segment, t.kind, t.cause, t.rule, t.definitions_version) for t in transitions]


# -- validation and the timeline -----------------------------------------------------------------------


def test_a_broken_definitions_file_is_refused_with_the_start_up_message_and_the_active_version_stays():
    line = timeline()
    broken = deploy("bad", START_MS, "version: v9\nsegments:\n  - name: x\n    when: no_such_feature > 1\n")
    status = line.decide(broken, validate(broken))
    assert status.status == REFUSED
    assert "no_such_feature" in status.reason
    assert line.entries == []


def test_a_version_the_record_names_must_be_the_one_the_file_declares():
    record = ControlRecord("d", DEPLOY, START_MS, ACTIVE, V2.encode(), "v7")
    assert "'v7'" in validate(record)


def shipped_bundle(name: str = "churn_risk", **changes) -> ModelBundle:
    directory = DEFAULT_MODELS_DIR / name
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest.update(changes.pop("manifest", {}))
    return ModelBundle(name, json.dumps(manifest), (directory / "model.onnx").read_bytes(), **changes)


def with_model(bundle: ModelBundle) -> ControlRecord:
    text = "version: m1\nsegments:\n  - name: churny\n    when: score.churn_risk > 0.5\n"
    return ControlRecord("m", DEPLOY, START_MS, ACTIVE, text.encode(), None, (bundle,))


def test_a_model_bundle_verifies_as_at_start_up():
    assert validate(with_model(shipped_bundle())) is None


def test_a_tampered_model_is_refused():
    bundle = shipped_bundle()
    tampered = ModelBundle(bundle.name, bundle.manifest, bundle.onnx[:-1] + bytes([bundle.onnx[-1] ^ 1]))
    assert "sha256" in validate(with_model(tampered))


def test_a_model_reading_a_feature_that_does_not_exist_is_refused():
    manifest = json.loads(shipped_bundle().manifest)
    manifest["vector"][0]["name"] = "no_such_feature"
    assert "no_such_feature" in validate(with_model(shipped_bundle(manifest=manifest)))


def test_a_model_by_reference_is_read_and_checked_against_its_sha256(tmp_path):
    bundle = shipped_bundle()
    path = tmp_path / "churn.onnx"
    path.write_bytes(bundle.onnx)
    manifest = json.loads(bundle.manifest)
    good = ModelBundle(bundle.name, bundle.manifest, None, str(path), manifest["onnx_sha256"])
    assert validate(with_model(good)) is None
    wrong = ModelBundle(bundle.name, bundle.manifest, None, str(path), "0" * 64)
    assert "sha256" in validate(with_model(wrong))


def test_a_bundle_cannot_write_outside_its_directory():
    manifest = json.loads(shipped_bundle().manifest)
    manifest["onnx_file"] = "../escape.onnx"
    assert "plain file name" in validate(with_model(shipped_bundle(manifest=manifest)))
    assert "plain name" in validate(with_model(ModelBundle("../x", "{}", b"")))


def test_promote_and_rollback_follow_the_versions_and_are_refused_when_there_is_nothing_to_do():
    line = timeline()
    assert line.decide(control("p0", PROMOTE, START_MS)).reason == "no candidate in shadow to promote"
    assert line.decide(control("r0", ROLLBACK, START_MS)).reason == "no earlier version to roll back to"
    assert line.decide(deploy("d2", START_MS + 1)).active_version == "v2"
    assert line.decide(deploy("s3", START_MS + 2, V3, SHADOW)).shadow_version == "v3"
    promoted = line.decide(control("p3", PROMOTE, START_MS + 3))
    assert (promoted.active_version, promoted.shadow_version) == ("v3", None)
    assert line.decide(control("r1", ROLLBACK, START_MS + 4)).active_version == "v2"
    assert line.decide(control("r2", ROLLBACK, START_MS + 5)).active_version == "basic-1"
    assert [e.active for e in line.entries] == ["d2", "d2", "s3", "d2", ""]


def test_an_instant_before_the_latest_deployment_is_refused_and_a_record_seen_twice_keeps_its_status():
    line = timeline(deploy("d2", START_MS + HOUR_MS))
    late = deploy("d3", START_MS, V3)
    assert "before the latest deployment" in line.decide(late).reason
    assert line.decide(deploy("d2", START_MS + 5 * HOUR_MS)).effective_at == START_MS + HOUR_MS
    assert len(line.entries) == 1


def test_a_control_record_round_trips_through_its_schema_and_a_deployments_file_line():
    record = with_model(shipped_bundle())
    codec = SchemaCatalog().codec("Deployment")
    assert control_from_record(codec.decode(codec.encode(record.to_record()))) == record
    assert control_from_json(json.loads(json.dumps(record.to_json()))) == record
    status = timeline().decide(record, validate(record))
    status_codec = SchemaCatalog().codec("DeploymentStatus")
    assert status_codec.decode(status_codec.encode(status.to_record(5)))["active_version"].startswith("m1@churn_risk")


def test_a_record_without_an_instant_takes_the_kafka_record_timestamp():
    record = {**deploy("d", 0).to_record(), "effective_at": None}
    assert control_from_record(record, 1234).effective_at == 1234


# -- the switch ---------------------------------------------------------------------------------------


def test_removed_segments_exit_at_the_instant_with_the_reason_and_the_others_are_decided_again():
    engine = DeployedEngine(timeline(deploy("d2", START_MS + 7 * MINUTE_MS)))
    profile = UserProfile()
    first = engine.step_event("u1", profile, ev(1, START_MS, "add_to_cart", product_id="p", quantity=1, price=9.0))
    assert ("active_browser", "ENTER") in {(t.segment, t.kind) for t in first.transitions}
    profile.memberships["highly_engaged"] = profile.memberships["active_browser"]  # as if a member
    step = engine.step_event("u1", profile, ev(2, START_MS + 8 * MINUTE_MS))
    assert summary(step.transitions)[:3] == [
        (7 * MINUTE_MS, "highly_engaged", "EXIT", "DEPLOYMENT", REMOVED_RULE, "v2"),
        (7 * MINUTE_MS, "active_browser", "EXIT", "DEPLOYMENT", "not (ms_since_last_event < 5m)", "v2"),
        (7 * MINUTE_MS, "long_browser", "ENTER", "DEPLOYMENT", "ms_since_last_event < 40m", "v2"),
    ]
    assert {t.cause_event_id for t in step.transitions[:3]} == {"d2"}
    assert summary(step.transitions)[3:] == [
        (8 * MINUTE_MS, "active_browser", "ENTER", "EVENT", "ms_since_last_event < 5m", "v2")
    ]
    assert profile.deployment == "d2"


def test_time_driven_changes_before_the_instant_belong_to_the_old_version():
    engine = DeployedEngine(timeline(deploy("d2", START_MS + 30 * MINUTE_MS)))
    profile = UserProfile()
    engine.step_event("u1", profile, ev(1, START_MS))
    step = engine.step_timer("u1", profile, START_MS + HOUR_MS)
    assert summary(step.transitions) == [
        (10 * MINUTE_MS, "active_browser", "EXIT", "TIMER", "not (ms_since_last_event < 10m)", "basic-1"),
        (30 * MINUTE_MS, "long_browser", "ENTER", "DEPLOYMENT", "ms_since_last_event < 40m", "v2"),
        (40 * MINUTE_MS, "long_browser", "EXIT", "TIMER", "not (ms_since_last_event < 40m)", "v2"),
    ]


def test_a_user_without_events_takes_the_latest_version_without_transitions():
    engine = DeployedEngine(timeline(deploy("d2", START_MS)))
    profile = UserProfile()
    step = engine.step_event("u1", profile, ev(1, START_MS + MINUTE_MS))
    assert [t.definitions_version for t in step.transitions] == ["v2", "v2"]
    assert all(t.cause == "EVENT" for t in step.transitions)


def test_rollback_returns_to_the_earlier_version_at_its_instant():
    line = timeline(deploy("d2", START_MS + 2 * MINUTE_MS), control("r", ROLLBACK, START_MS + 3 * MINUTE_MS))
    engine = DeployedEngine(line)
    profile = UserProfile()
    engine.step_event("u1", profile, ev(1, START_MS))
    step = engine.step_event("u1", profile, ev(2, START_MS + 4 * MINUTE_MS))
    assert summary(step.transitions) == [
        (2 * MINUTE_MS, "long_browser", "ENTER", "DEPLOYMENT", "ms_since_last_event < 40m", "v2"),
        (3 * MINUTE_MS, "long_browser", "EXIT", "DEPLOYMENT", REMOVED_RULE, "basic-1"),
    ]


def test_the_sweep_visits_every_user_within_the_interval_at_a_phase_spread_over_it():
    sweep = HOUR_MS
    phases = [sweep_instant(f"user-{i}", START_MS, sweep) - START_MS for i in range(2000)]
    assert all(0 < p <= sweep for p in phases)
    quarters = [sum(1 for p in phases if q * sweep / 4 < p <= (q + 1) * sweep / 4) for q in range(4)]
    assert min(quarters) > 400  # 500 expected in each
    assert sweep_instant("u", sweep_instant("u", START_MS, sweep), sweep) - sweep_instant("u", START_MS, sweep) == sweep


def test_a_step_asks_for_a_timer_at_the_sweep_when_nothing_earlier_is_due():
    engine = DeployedEngine(timeline(), sweep_ms=HOUR_MS)
    profile = UserProfile()
    engine.step_event("u1", profile, ev(1, START_MS))
    step = engine.step_timer("u1", profile, START_MS + 10 * MINUTE_MS)
    assert step.register_timer_ms == sweep_instant("u1", START_MS + 10 * MINUTE_MS, HOUR_MS)


# -- visit independence: the property the switch is built for ----------------------------------------

EVENTS = list(generate_events(40, seed=7, start_ms=START_MS, duration_ms=6 * HOUR_MS))
SCHEDULE = (
    deploy("d2", START_MS + HOUR_MS),
    deploy("s3", START_MS + 2 * HOUR_MS, V3, SHADOW),
    control("p3", PROMOTE, START_MS + 3 * HOUR_MS),
    control("r", ROLLBACK, START_MS + 4 * HOUR_MS),
)


def run(
    engine: DeployedEngine, events: list[UserEvent], visits: dict[str, list[int]], until: int, codec=None
) -> tuple[dict, dict]:
    """Each user's transitions and shadow transitions: events in time order, each user's extra
    timer steps at `visits` (a timer at T fires after the events at T), then time up to `until`.
    With `codec`, the profile goes through state between steps, as in the job."""
    profiles: dict[str, bytes | UserProfile] = {}
    out, shadow = defaultdict(list), defaultdict(list)
    pending = {user: sorted(instants) for user, instants in visits.items()}

    def profile_of(user):
        held = profiles.get(user) or UserProfile()
        return codec.decode(codec.encode(held)) if codec is not None else held

    def keep(user, profile, step):
        out[user].extend(step.transitions)
        shadow[user].extend(step.shadow_transitions)
        if step.drop_state:
            profiles.pop(user, None)
        else:
            profiles[user] = profile

    for event in events:
        user = event.user_id
        while pending.get(user) and pending[user][0] < event.timestamp:
            profile = profile_of(user)
            if user in profiles:
                keep(user, profile, engine.step_timer(user, profile, pending[user].pop(0)))
            else:
                pending[user].pop(0)
        profile = profile_of(user)
        keep(user, profile, engine.step_event(user, profile, event))
    for user in list(profiles):
        profile = profile_of(user)
        keep(user, profile, engine.step_timer(user, profile, until))
    return dict(out), dict(shadow)


def records(by_user: dict) -> dict:
    return {user: [t.to_record(0) for t in ts] for user, ts in by_user.items() if ts}


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**32))
def test_a_switch_gives_the_same_transitions_whether_the_user_is_visited_at_the_instant_by_the_sweep_or_later(seed):
    rng = random.Random(seed)
    until = START_MS + 8 * HOUR_MS
    users = sorted({e.user_id for e in EVENTS})
    baseline = run(DeployedEngine(timeline(*SCHEDULE)), EVENTS, {}, until)
    at_instants = {u: [c.effective_at for c in SCHEDULE] for u in users}
    random_visits = {u: [START_MS + rng.randrange(8 * HOUR_MS) for _ in range(rng.randrange(6))] for u in users}
    for visits, sweep in ((at_instants, 0), (random_visits, 0), ({}, rng.choice([10, 25, 60]) * MINUTE_MS)):
        engine = DeployedEngine(timeline(*SCHEDULE), sweep_ms=sweep)
        if sweep:  # the sweep's own timers, as the job registers them
            visits = {u: list(range(sweep_instant(u, START_MS, sweep), until, sweep)) for u in users}
        got = run(engine, EVENTS, visits, until, ProfileStateCodec(SchemaCatalog().codec("UserProfileState")))
        assert records(got[0]) == records(baseline[0])
        assert records(got[1]) == records(baseline[1])
    assert any(t.cause == "DEPLOYMENT" for ts in baseline[0].values() for t in ts)
    assert any(ts for ts in baseline[1].values())


def test_shadow_transitions_are_the_candidates_alone_from_the_shadows_start():
    """After its start the shadow emits what the candidate alone emits over the same events; at its
    start it enters what the candidate alone holds then. Never on the main output."""
    start, until = START_MS + 2 * HOUR_MS, START_MS + 8 * HOUR_MS
    with_shadow = run(DeployedEngine(timeline(deploy("s3", start, V3, SHADOW))), EVENTS, {}, until)
    alone = run(DeployedEngine(timeline(deploy("a3", START_MS - 1, V3))), EVENTS, {}, until)
    without = run(DeployedEngine(timeline()), EVENTS, {}, until)
    assert records(with_shadow[0]) == records(without[0])

    def after(ts: list[Transition]) -> list[tuple]:
        return [(t.segment, t.kind, t.event_time, t.cause, t.rule, t.features) for t in ts if t.event_time > start]

    for user in {e.user_id for e in EVENTS}:
        shadow, candidate = with_shadow[1].get(user, []), alone[0].get(user, [])
        assert after(shadow) == after(candidate)
        members = {}
        for t in candidate:
            if t.event_time <= start:
                members[t.segment] = t.kind == "ENTER"
        entered = {t.segment for t in shadow if t.event_time == start and t.cause == "DEPLOYMENT"}
        assert entered == {s for s, member in members.items() if member}
        assert all(t.definitions_version == "v3" for t in shadow)


def test_the_deployment_and_the_shadow_survive_the_state_codec():
    codec = ProfileStateCodec(SchemaCatalog().codec("UserProfileState"))
    engine = DeployedEngine(timeline(deploy("s3", START_MS + MINUTE_MS, V3, SHADOW)))
    profile = UserProfile()
    engine.step_event("u1", profile, ev(1, START_MS, "add_to_cart", product_id="p", quantity=1, price=9.0))
    engine.step_event("u1", profile, ev(2, START_MS + 2 * MINUTE_MS))
    assert profile.deployment == "s3" and profile.shadow is not None and profile.shadow.memberships
    restored = codec.decode(codec.encode(profile))
    assert (restored.deployment, restored.shadow) == (profile.deployment, profile.shadow)


def test_a_profile_of_layout_7_reads_as_the_start_up_version():
    import msgpack

    codec = ProfileStateCodec(SchemaCatalog().codec("UserProfileState"))
    profile = UserProfile()
    DeployedEngine(timeline()).step_event("u1", profile, ev(1, START_MS))
    version, clock, timer, body, check = msgpack.unpackb(codec.encode(profile))
    items = msgpack.unpackb(codec._dictionary_decompressor.decompress(body))
    frame = codec._compressor.compress(msgpack.packb(items[:22], use_bin_type=True))
    restored = codec.decode(msgpack.packb([7, clock, timer, frame, check], use_bin_type=True))
    assert restored.deployment is None and restored.shadow is None
    assert restored.memberships == profile.memberships


@pytest.mark.parametrize("action", [PROMOTE, ROLLBACK])
def test_promote_and_rollback_records_need_nothing_but_an_id_and_an_instant(action):
    assert control_from_record({"deployment_id": "x", "action": action, "effective_at": 5}).action == action


# -- the backtest and the CLI ------------------------------------------------------------------------


def test_the_backtest_with_deployments_gives_the_steps_transitions_and_the_shadows():
    from jobs.backtest import EventLog, run_backtest

    until = START_MS + 8 * HOUR_MS
    result = run_backtest(STARTUP, EventLog("log", EVENTS), until_ms=until, deployments=SCHEDULE)
    expected = run(DeployedEngine(timeline(*SCHEDULE)), EVENTS, {}, until)
    assert [s.status for s in result.deployments] == [ACCEPTED] * 4

    def by_user(ts: list[Transition]) -> dict:
        grouped = defaultdict(list)
        for t in ts:
            grouped[t.user_id].append(t.to_record(0))
        return dict(grouped)

    assert by_user(result.transitions) == records(expected[0])
    assert by_user(result.shadow_transitions) == records(expected[1])


def test_privacy_requests_step_the_shadow_in_the_backtest_as_in_the_job():
    """An erasure or a consent change is a step of the shadow too (its time-driven changes up to
    the request's instant): the backtest keeps those shadow transitions as the job emits them."""
    from jobs.backtest import EventLog, in_arrival_order, run_backtest

    users = sorted({e.user_id for e in EVENTS})
    requests = [
        UserRequest(f"r{i}", user, "ERASE", START_MS + 3 * HOUR_MS + i * MINUTE_MS, "test")
        if i % 2
        else UserRequest(f"r{i}", user, "CONSENT", START_MS + 3 * HOUR_MS + i * MINUTE_MS, "test", "SCORING", False)
        for i, user in enumerate(users[:12])
    ]
    log = EventLog("log", EVENTS, requests=requests)
    until = START_MS + 8 * HOUR_MS
    lateness = 60_000
    result = run_backtest(STARTUP, log, until_ms=until, deployments=SCHEDULE, allowed_lateness_ms=lateness)

    engine = DeployedEngine(timeline(*SCHEDULE))
    profiles: dict[str, UserProfile] = {}
    privacy: dict[str, PrivacyState] = defaultdict(PrivacyState)
    shadow: list[Transition] = []
    for record in in_arrival_order(log):  # time order here: nothing is late
        user = record.user_id
        profile = profiles.setdefault(user, UserProfile())
        if isinstance(record, UserRequest):
            step = engine.step_request(user, profile, privacy[user], record, lateness)
        else:
            step = engine.step_event(user, profile, record, None, privacy[user])
        shadow.extend(step.shadow_transitions)
        if step.drop_state:
            profiles.pop(user)
    for user, profile in profiles.items():
        shadow.extend(engine.step_timer(user, profile, until, privacy[user]).shadow_transitions)

    def by_user(ts: list[Transition]) -> dict:
        grouped = defaultdict(list)
        for t in ts:
            grouped[t.user_id].append(t.to_record(0))
        return dict(grouped)

    assert by_user(result.shadow_transitions) == by_user(shadow)
    requested = {r.user_id for r in requests}
    assert any(t.user_id in requested for t in shadow)  # the requests' users had shadow transitions


def test_deploy_output_then_backtest_deployments_round_trip_through_a_file(tmp_path, capsys):
    from jobs.cli import main as cli_main

    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps(e.to_record()) + "\n" for e in EVENTS[:200]))
    startup, v2 = tmp_path / "basic.yaml", tmp_path / "v2.yaml"
    startup.write_text(basic_yaml())
    v2.write_text(V2)
    deployments = tmp_path / "deployments.jsonl"
    at = str(START_MS + HOUR_MS)
    assert cli_main(["deploy", str(v2), "--at", at, "--output", str(deployments)]) == 0
    assert cli_main(["rollback", "--at", "2023-11-15T00:13:20Z", "--output", str(deployments)]) == 0
    lines = deployments.read_text().splitlines()
    assert [json.loads(line)["action"] for line in lines] == ["DEPLOY", "ROLLBACK"]
    assert json.loads(lines[1])["effective_at"] == START_MS + 2 * HOUR_MS
    out_file = tmp_path / "t.jsonl"
    args = ["backtest", str(startup), "--events", str(log), "--quiet", "--until", "flush"]
    assert cli_main([*args, "--deployments", str(deployments), "--transitions", str(out_file)]) == 0
    assert "ACCEPTED" in capsys.readouterr().out
    written = [json.loads(line) for line in out_file.read_text().splitlines()]
    causes = {(t["cause"], t["definitions_version"]) for t in written}
    assert ("DEPLOYMENT", "v2") in causes and ("DEPLOYMENT", "basic-1") in causes


def test_deploy_refuses_a_broken_file_before_sending_it(tmp_path, capsys):
    from jobs.cli import main as cli_main

    broken = tmp_path / "broken.yaml"
    broken.write_text("version: v9\nsegments:\n  - name: x\n    when: no_such_feature > 1\n")
    assert cli_main(["deploy", str(broken), "--output", str(tmp_path / "d.jsonl")]) == 1
    assert "no_such_feature" in capsys.readouterr().err
    assert not (tmp_path / "d.jsonl").exists()


def test_shadow_agreement_counts_pairs_entered_by_both_by_one_and_flips():
    from udfs.deployments import shadow_agreement

    def t(user, segment, kind, at, sequence=1):
        return {"user_id": user, "segment": segment, "kind": kind, "event_time": at, "sequence": sequence}

    active = [t("a", "s", "ENTER", 1), t("b", "s", "ENTER", 2), t("a", "s", "EXIT", 3, 2), t("a", "s", "ENTER", 4, 3)]
    shadow = [t("a", "s", "ENTER", 1), t("c", "s", "ENTER", 2), t("c", "x", "ENTER", 50)]
    report = shadow_agreement(active, shadow, 0, 10)
    s = report["s"]
    assert (s.both, s.only_active, s.only_shadow) == (1, 1, 1)
    assert (s.active_entries, s.active_flips, s.shadow_flips) == (3, 1, 0)
    assert s.agreement == pytest.approx(1 / 3) and s.active_flip_rate == pytest.approx(1 / 3)
    assert "x" not in report  # outside the window


def test_a_decision_survives_its_broadcast_state_text_and_rebuilds_the_same_timeline():
    from udfs.deployments import decision_from_text, decision_text

    decisions = [(c, validate(c)) for c in SCHEDULE]
    restored = [decision_from_text(decision_text(c, r)) for c, r in decisions]
    assert restored == decisions
    first, again = timeline(), Timeline(STARTUP, load_segmentation)
    for (c, r), (c2, r2) in zip(decisions, restored, strict=True):
        assert first.decide(c, r) == again.decide(c2, r2)
    assert first.entries == again.entries


def run_on_registered_timers(engine: DeployedEngine, events: list[UserEvent], until: int) -> tuple[dict, dict]:
    """As the job runs: each step's `register_timer_ms` registers a timer (one per user and
    instant), timers fire in time order once event time passes them (a timer at T after the events
    at T). Checks after every step that keeps state that a timer is pending at most the sweep
    after the user's clock: the bound within which a deployment reaches a quiet user."""
    import heapq

    profiles: dict[str, UserProfile] = {}
    registered: set[tuple[int, str]] = set()
    heap: list[tuple[int, str]] = []
    out, shadow = defaultdict(list), defaultdict(list)

    def commit(user: str, profile: UserProfile, step) -> None:
        out[user].extend(step.transitions)
        shadow[user].extend(step.shadow_transitions)
        if step.delete_timer_ms is not None:
            registered.discard((step.delete_timer_ms, user))
        if step.register_timer_ms is not None and (step.register_timer_ms, user) not in registered:
            registered.add((step.register_timer_ms, user))
            heapq.heappush(heap, (step.register_timer_ms, user))
        if step.drop_state:
            profiles.pop(user, None)
            return
        profiles[user] = profile
        pending = min((t for t, u in registered if u == user), default=None)
        assert pending is not None and pending <= profile.clock_ms + engine.sweep_ms, (user, pending, profile.clock_ms)

    def fire(limit: int) -> None:
        while heap and heap[0][0] <= limit:
            at, user = heapq.heappop(heap)
            if (at, user) not in registered:
                continue
            registered.discard((at, user))
            profile = profiles.get(user) or UserProfile()
            commit(user, profile, engine.step_timer(user, profile, at))

    for event in events:
        fire(event.timestamp - 1)
        profile = profiles.get(event.user_id) or UserProfile()
        commit(event.user_id, profile, engine.step_event(event.user_id, profile, event))
    fire(until)
    return dict(out), dict(shadow)


@pytest.mark.parametrize("sweep_ms", [10 * MINUTE_MS, HOUR_MS])
def test_on_the_timers_the_steps_register_every_user_is_visited_within_the_sweep_and_nothing_changes(sweep_ms):
    until = START_MS + 8 * HOUR_MS
    baseline = run(DeployedEngine(timeline(*SCHEDULE)), EVENTS, {}, until)
    got = run_on_registered_timers(DeployedEngine(timeline(*SCHEDULE), sweep_ms=sweep_ms), EVENTS, until)
    assert records(got[0]) == records(baseline[0])
    assert records(got[1]) == records(baseline[1])


# -- the job's engine-free side (jobs/deployment_stream.py) -----------------------------------------


def test_the_validator_refuses_with_a_status_broadcasts_the_decision_and_dead_letters_the_unreadable():
    from jobs.deployment_stream import BroadcastTimeline, ControlValidator

    catalog = SchemaCatalog()
    validator = ControlValidator(STARTUP, catalog, None, None)
    codec, statuses = catalog.codec("Deployment"), catalog.codec("DeploymentStatus")
    broken = deploy("bad", START_MS, "version: v9\nsegments: [")
    verdicts = [validator.verdict(codec.encode(c.to_record()), 0, 7) for c in (*SCHEDULE, broken)]
    decoded = [statuses.decode(v.status) for v in verdicts]
    assert [d["status"] for d in decoded] == [ACCEPTED] * 4 + [REFUSED]
    assert decoded[-1]["reason"] and decoded[-1]["decided_at"] == 7
    unreadable = validator.verdict(b"not avro", 0, 7)
    assert unreadable.decision is None and unreadable.dead_letter[0] == "bad_magic"
    # A keyed subtask rebuilds the same timeline from the decisions, whatever order the state lists them in.
    keyed = BroadcastTimeline(STARTUP, None, None, HOUR_MS, True)
    engine = keyed.rebuild(reversed(list(enumerate(v.decision for v in verdicts))))
    assert engine.timeline.entries == validator.timeline.entries
    assert engine.sweep_ms == HOUR_MS


@pytest.mark.parametrize("name", ["step_event", "step_timer", "step_request", "step_fold_out", "step_fold_in"])
def test_the_deployed_engine_takes_the_arguments_of_the_engines_steps(name):
    # The keyed function calls either engine the same way: a parameter the engine gained and the
    # deployed engine lacks fails only the job with deployments (as step_fold_in's folded_from did).
    deployed = list(inspect.signature(getattr(DeployedEngine, name)).parameters)
    assert deployed == list(inspect.signature(getattr(SegmentEngine, name)).parameters)
