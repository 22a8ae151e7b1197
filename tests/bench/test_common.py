"""What the benchmarks share: BENCHMARK.md's fixed image order, provenance of a record."""

from __future__ import annotations

import numpy as np

from labelsmart.bench.common import provenance, seeded_order


def test_sequential_order_is_the_benchmark_permutation():
    names = [f"n{i}" for i in (3, 1, 2, 0)]
    assert seeded_order(names) == [f"n{i}" for i in np.random.default_rng(0).permutation(4)]


def test_provenance_names_commit_cpu_and_date():
    facts = provenance()
    assert set(facts) == {"commit", "cpu", "date"} and "cores" in facts["cpu"] and facts["date"].startswith("20")
