"""What every benchmark shares: the machine and commit a record was measured on, peak memory, the fixed
image order of ``../shared/BENCHMARK.md`` (the labelled subsets and the simulated annotator's sequence), and
running one piece of a benchmark in its own spawned process."""

from __future__ import annotations

import datetime as dt
import json
import logging
import multiprocessing as mp
import os
import platform
import resource
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
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


def exit_with_parent(poll_s: float = 2.0) -> None:
    """End this (spawned) process when its parent is gone, so a killed benchmark leaves no training behind."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def run_spawned(target: Callable[..., None], args: tuple[Any, ...], what: str, prefix: str) -> dict[str, Any]:
    """Run ``target(*args, out, log_level)`` in a spawned process (its own memory peak; a crash ends that piece
    only) and return the JSON object it wrote to the file ``out``.

    Args:
        what: the piece, for the error when the process ends without a result ("cell ...", "variant ...").
        prefix: of the temporary folder holding ``out``.

    Raises:
        RuntimeError: the process ended without writing ``out`` (killed, perhaps out of memory).
    """
    ctx = mp.get_context("spawn")  # never fork a process that may hold CUDA or thread pools
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        out = Path(tmp) / "result.json"
        level = logging.getLogger("labelsmart").getEffectiveLevel()
        proc = ctx.Process(target=target, args=(*args, str(out), level))
        proc.start()
        try:
            proc.join()
        except BaseException:
            proc.terminate()
            proc.join(10)
            raise
        if not out.is_file():
            raise RuntimeError(
                f"{what} ended with exit code {proc.exitcode} and no result (killed, perhaps out of memory); "
                "see the log above."
            )
        return json.loads(out.read_text())
