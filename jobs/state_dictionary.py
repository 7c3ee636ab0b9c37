"""Trains the zstd dictionary of the profile state's layout (udfs/state.py), once per layout: the
bodies of profiles a generated week builds, sampled as the job writes them. The dictionary is part
of the layout: state written with it is read with it, so a layout's dictionary never changes (its
sha256 is pinned in udfs.state) and a new one comes with a new layout version.

    .venv/bin/python -m jobs.state_dictionary     # writes udfs/state_dictionary.zstd, prints its sha256
"""

from __future__ import annotations

import hashlib

import msgpack
import zstandard

from jobs.profile_stats import START_MS
from jobs.settings import load_settings
from udfs.profile import UserProfile
from udfs.profile_config import DAY_MS
from udfs.segmentation import Segmentation
from udfs.shoppers import generate_events
from udfs.state import STATE_DICTIONARY, state_body

DICTIONARY_BYTES = 16_384  # of 8, 16 and 32 KB tried, the smallest bodies at level 1 (docs/performance.md)
TRAINING_USERS, TRAINING_DAYS, TRAINING_SEED = 200, 7, 11
SAMPLE_EVERY = 7  # one body in 7 applied events: young, middle-aged and week-old profiles alike


def training_bodies() -> list[bytes]:
    """Profile bodies (the layout's MessagePack array, before compression) of a generated week."""
    settings = load_settings(None)
    segmentation = Segmentation.load(settings.definitions_file(), settings.profile, settings.models_dir)
    engine = segmentation.engine()
    profiles: dict[str, UserProfile] = {}
    bodies = []
    events = generate_events(TRAINING_USERS, TRAINING_SEED, START_MS, TRAINING_DAYS * DAY_MS)
    for i, event in enumerate(events):
        profile = profiles.setdefault(event.user_id, UserProfile())
        engine.step_event(event.user_id, profile, event)
        if i % SAMPLE_EVERY == 0:
            bodies.append(msgpack.packb(state_body(profile), use_bin_type=True))
    return bodies


def main() -> None:
    dictionary = zstandard.train_dictionary(DICTIONARY_BYTES, training_bodies(), level=1)
    data = dictionary.as_bytes()
    STATE_DICTIONARY.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    print(f"{STATE_DICTIONARY}: {len(data)} bytes, id {dictionary.dict_id()}, sha256 {digest}")


if __name__ == "__main__":
    main()
