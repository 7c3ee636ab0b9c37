"""What a profile costs: bytes of keyed state per user and core time per event, measured by
replaying generated traffic through the engine-free core (no cluster). `segments profile-stats`."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

from jobs.settings import JobSettings
from udfs.codec import SchemaCatalog
from udfs.profile import UserProfile
from udfs.segmentation import Segmentation
from udfs.shoppers import generate_events
from udfs.state import ProfileStateCodec

DAY_MS = 24 * 3_600_000
START_MS = 1_700_000_000_000


@dataclass(frozen=True)
class ProfileStats:
    users: int
    events: int
    core_us_per_event: float
    cached_us_per_event: float
    state_bytes_mean: float
    state_bytes_p50: int
    state_bytes_p99: int
    state_bytes_max: int

    def lines(self) -> list[str]:
        return [
            f"users {self.users}, events {self.events}",
            f"core (profile, features, segments, state decode + encode): {self.core_us_per_event:.1f} us/event",
            f"same with every profile cached (state encode only): {self.cached_us_per_event:.1f} us/event",
            f"state bytes per user: mean {self.state_bytes_mean:.0f}, p50 {self.state_bytes_p50}, "
            f"p99 {self.state_bytes_p99}, max {self.state_bytes_max}",
        ]


def measure(settings: JobSettings, users: int, days: float, seed: int) -> ProfileStats:
    """Replays the traffic as the job does (decode state, apply, encode state, per event), then
    measures every user's state at the end of the traffic, when it is at its largest."""
    events = list(generate_events(users, seed, START_MS, int(days * DAY_MS)))
    segmentation = Segmentation.load(settings.definitions_file(), settings.profile, settings.models_dir)
    engine = segmentation.engine()
    codec = ProfileStateCodec(SchemaCatalog().codec("UserProfileState"))
    stored: dict[str, bytes] = {}
    started = time.perf_counter()
    for event in events:
        profile = codec.decode(stored.get(event.user_id))
        engine.on_event(event.user_id, profile, event)
        stored[event.user_id] = codec.encode(profile)
    elapsed = time.perf_counter() - started
    # The job's write-through profile cache on a full hit rate: no decode, still one encode.
    fresh = segmentation.engine()
    profiles: dict[str, UserProfile] = {}
    started = time.perf_counter()
    for event in events:
        profile = profiles.setdefault(event.user_id, UserProfile())
        fresh.on_event(event.user_id, profile, event)
        codec.encode(profile)
    cached = time.perf_counter() - started
    sizes = sorted(len(b) for b in stored.values())
    return ProfileStats(
        users=len(sizes),
        events=len(events),
        core_us_per_event=elapsed / max(len(events), 1) * 1e6,
        cached_us_per_event=cached / max(len(events), 1) * 1e6,
        state_bytes_mean=statistics.fmean(sizes),
        state_bytes_p50=sizes[len(sizes) // 2],
        state_bytes_p99=sizes[min(len(sizes) - 1, int(len(sizes) * 0.99))],
        state_bytes_max=sizes[-1],
    )
