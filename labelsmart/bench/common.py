"""What every benchmark shares: the machine and commit a record was measured on, peak memory, and the fixed
image order of ``../shared/BENCHMARK.md`` (the labelled subsets and the simulated annotator's sequence)."""

from __future__ import annotations

import datetime as dt
import os
import platform
import resource
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

ORDER_SEED = 0  # BENCHMARK.md: numpy.random.default_rng(0) permutes the sorted names


def seeded_order(names: Sequence[str]) -> list[str]:
    """BENCHMARK.md's fixed order: sort the names, permute them with ``numpy.random.default_rng(0)``."""
    ordered = sorted(names)
    return [ordered[i] for i in np.random.default_rng(ORDER_SEED).permutation(len(ordered))]


def git_commit(root: Path | None = None) -> str | None:
    """Short hash of the checkout holding this package (None outside git or without git)."""
    root = root or Path(__file__).resolve().parent
    try:
        res = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    out = res.stdout.strip()
    return out if res.returncode == 0 and out else None


def cpu_description() -> str:
    """A one-line description of the CPU: model name (from /proc/cpuinfo where there is one), arch, cores."""
    name = platform.processor()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name or 'unknown CPU'} ({platform.machine()}, {os.cpu_count()} cores, {platform.system()})"


def provenance() -> dict[str, Any]:
    """``{"commit", "cpu", "date"}``: where and when a benchmark record was measured."""
    return {
        "commit": git_commit(),
        "cpu": cpu_description(),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def peak_rss_children_mb() -> float:
    """Peak resident memory of the largest finished child process (a loader worker, say), MiB."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0
