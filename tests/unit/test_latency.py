"""The job's latency histogram: percentiles within the bucket width of the exact ones."""

from __future__ import annotations

import random

from udfs.latency import LatencyHistogram


def test_percentiles_are_within_a_bucket_of_the_exact_ones():
    rng = random.Random(7)
    values = [rng.lognormvariate(3, 1) for _ in range(20_000)]
    hist = LatencyHistogram()
    for v in values:
        hist.record(v)
    ordered = sorted(values)
    for q in (0.5, 0.9, 0.99):
        exact = ordered[int(q * len(ordered)) - 1]
        assert exact <= hist.percentile(q) <= exact * LatencyHistogram.FACTOR**2, q
    assert hist.max_us == max(values) and hist.total == len(values)


def test_an_empty_histogram_reads_zero():
    assert LatencyHistogram().percentile(0.99) == 0.0
