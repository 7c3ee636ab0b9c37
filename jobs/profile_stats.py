"""What a profile costs: bytes of keyed state per user and core time per event, measured by
replaying generated traffic through the engine-free core's per-user step (no Kafka, Redis or
Flink), as the job drives it: a timer service firing the timers the steps ask for once the
watermark passes them, the state encoded after every step. `segments profile-stats`, and the
in-memory core figures of `segments bench`."""

from __future__ import annotations

import heapq
import statistics
import time
from dataclasses import dataclass

import yaml

import udfs
from jobs.settings import JobSettings
from udfs.codec import SchemaCatalog
from udfs.definitions import parse_definitions
from udfs.profile import UserProfile
from udfs.profile_config import DAY_MS
from udfs.scoring import ModelRegistry
from udfs.segmentation import DEFAULT_MODELS_DIR, Segmentation
from udfs.shoppers import generate_events
from udfs.state import ProfileStateCodec
from udfs.transitions import APPLIED, SegmentEngine

START_MS = 1_700_000_000_000
WATERMARK_LAG_MS = 5_000  # the job's default


@dataclass(frozen=True)
class ProfileStats:
    users: int
    events: int
    core_us_per_event: float  # a cold profile per event: state decode, step, encode
    cached_us_per_event: float  # the profile cache hit (the job's usual case): step and encode
    core_events_per_s: float  # 1e6 / cached_us_per_event
    no_models_events_per_s: float | None  # the same without the model segments and the models
    timers_per_event: float  # timer steps per event (the pending timer fired, early or due)
    state_bytes_mean: float
    state_bytes_p50: int
    state_bytes_p99: int
    state_bytes_max: int

    def lines(self) -> list[str]:
        return [
            f"core {udfs.CORE}; users {self.users}, events {self.events}, "
            f"timer steps per event {self.timers_per_event:.2f}",
            f"core (step, timers, state decode + encode): {self.core_us_per_event:.1f} us/event",
            f"same with every profile cached (state encode only): {self.cached_us_per_event:.1f} us/event "
            f"= {self.core_events_per_s:,.0f} events/s",
            "same without the model segments and models: "
            + ("-" if self.no_models_events_per_s is None else f"{self.no_models_events_per_s:,.0f} events/s"),
            f"state bytes per user: mean {self.state_bytes_mean:.0f}, p50 {self.state_bytes_p50}, "
            f"p99 {self.state_bytes_p99}, max {self.state_bytes_max}",
        ]


def drive(engine: SegmentEngine, events, codec: ProfileStateCodec, stored: dict[str, bytes] | None) -> int:
    """Every event through the per-user step, and the timers the steps ask for fired once the
    watermark (the latest event time - the lag) passes them; the state encoded after each step
    (and decoded before it, when `stored` is given: no profile cache). Returns the timer steps."""
    profiles: dict[str, UserProfile] = {}
    timers: list[tuple[int, str]] = []
    registered: set[tuple[int, str]] = set()
    latest = None
    fired = 0

    def load(user_id: str) -> UserProfile:
        if stored is not None:
            return codec.decode(stored.get(user_id))
        return profiles.setdefault(user_id, UserProfile())

    def commit(user_id: str, profile: UserProfile, step) -> None:
        timer = (step.register_timer_ms, user_id)
        if step.register_timer_ms is not None and timer not in registered:
            registered.add(timer)
            heapq.heappush(timers, timer)
        if step.drop_state:
            profiles.pop(user_id, None)
            if stored is not None:
                stored.pop(user_id, None)
        else:
            encoded = codec.encode(profile)
            if stored is not None:
                stored[user_id] = encoded

    for event in events:
        profile = load(event.user_id)
        step = engine.step_event(event.user_id, profile, event)
        if step.outcome == APPLIED:
            commit(event.user_id, profile, step)
        latest = event.timestamp if latest is None else max(latest, event.timestamp)
        watermark = latest - WATERMARK_LAG_MS
        while timers and timers[0][0] <= watermark:
            timer = heapq.heappop(timers)
            registered.discard(timer)
            profile = load(timer[1])
            commit(timer[1], profile, engine.step_timer(timer[1], profile, timer[0]))
            fired += 1
    return fired


def without_models(definitions_text: bytes) -> bytes:
    """The definitions file without the segments that read a model score (and without rescoring):
    what the core costs with no model at all."""
    raw = yaml.safe_load(definitions_text)
    raw.pop("rescore_every", None)
    raw.pop("models", None)
    reads_score = {
        s["name"] for s in raw["segments"] if "score." in " ".join(str(s.get(k, "")) for k in ("when", "enter", "exit"))
    }
    raw["segments"] = [s for s in raw["segments"] if s["name"] not in reads_score]
    for group in raw.get("exclusive_groups", []):
        group["segments"] = [name for name in group["segments"] if name not in reads_score]
    raw["exclusive_groups"] = [g for g in raw.get("exclusive_groups", []) if g["segments"]]
    return yaml.safe_dump(raw, sort_keys=False).encode()


def measure(settings: JobSettings, users: int, days: float, seed: int) -> ProfileStats:
    """Replays the traffic as the job does, then measures every user's state at the end of the
    traffic, when it is at its largest."""
    events = list(generate_events(users, seed, START_MS, int(days * DAY_MS)))
    segmentation = Segmentation.load(settings.definitions_file(), settings.profile, settings.models_dir)
    codec = ProfileStateCodec(SchemaCatalog().codec("UserProfileState"))
    stored: dict[str, bytes] = {}
    started = time.process_time()
    drive(segmentation.engine(), events, codec, stored)
    cold = time.process_time() - started
    started = time.process_time()
    fired = drive(segmentation.engine(), events, codec, None)
    cached = time.process_time() - started
    no_models = None
    if segmentation.definitions.models:
        models_dir = settings.models_dir or DEFAULT_MODELS_DIR
        plain = parse_definitions(
            without_models(segmentation.definitions.text),
            "without models",
            settings.profile,
            ModelRegistry.outputs_of(models_dir),
        )
        started = time.process_time()
        drive(SegmentEngine(plain), events, codec, None)
        no_models = len(events) / (time.process_time() - started)
    sizes = sorted(len(b) for b in stored.values())
    n = max(len(events), 1)
    return ProfileStats(
        users=len(sizes),
        events=len(events),
        core_us_per_event=cold / n * 1e6,
        cached_us_per_event=cached / n * 1e6,
        core_events_per_s=n / cached,
        no_models_events_per_s=no_models,
        timers_per_event=fired / n,
        state_bytes_mean=statistics.fmean(sizes),
        state_bytes_p50=sizes[len(sizes) // 2],
        state_bytes_p99=sizes[min(len(sizes) - 1, int(len(sizes) * 0.99))],
        state_bytes_max=sizes[-1],
    )
