"""Experiment arms: which users an experiment holds out, decided from the user id alone.

`holdout("spring_promo", 10%)` in a condition holds for the 10% of users in the experiment's
control arm. The arm is a pure function of the experiment's name and the user id, so it is the
same in every process, on every worker after a rescale, after a restore or a redeployment, and in
the backtest: sha256 of a fixed domain prefix, the name and the user id (UTF-8), whose first 8
bytes (big-endian) place the user in [0, 2**64); the user is in control when place / 2**64 <
share. sha256 rather than Python's hash(), which is salted per process, and rather than a 32-bit
hash, whose 2**32 places would make small shares coarse. Two experiments hash different inputs,
so their arms are independent; one experiment's control arm at 10% is part of its control arm at
20% (the place does not move), so raising a share only moves users from treatment to control.
"""

from __future__ import annotations

import hashlib
import re
from fractions import Fraction

CONTROL, TREATMENT = "control", "treatment"
EXPERIMENT_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")  # the form of segment names
# Keeps these hashes apart from any other use of sha256 over user ids (a change would reshuffle
# every running experiment: it is part of the contract, docs/definitions.md).
DOMAIN = b"flink-segments holdout v1\x00"
PLACES = 2**64


def place(experiment: str, user_id: str) -> int:
    """The user's place in the experiment, uniform in [0, 2**64). The name cannot contain the
    NUL that ends it, so no two (name, user id) pairs hash the same input."""
    digest = hashlib.sha256(DOMAIN + experiment.encode() + b"\x00" + user_id.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big")


def control_places(share: Fraction) -> int:
    """How many of the 2**64 places are in the control arm for a share in (0, 1): the places
    below share x 2**64, so that `place < control_places(share)` is exactly `place / 2**64 < share`."""
    return -(-share.numerator * PLACES // share.denominator)


def arm(experiment: str, share: Fraction, user_id: str) -> str:
    """CONTROL or TREATMENT: the user's arm in the experiment holding out `share` of users."""
    return CONTROL if place(experiment, user_id) < control_places(share) else TREATMENT
