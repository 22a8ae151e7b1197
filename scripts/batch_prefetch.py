"""Would making the next batch beside the step give the CPU trainer more steps a second? (issues 12 and 13)

    PYTHONPATH=. python scripts/batch_prefetch.py ../shared/data/camvid SECONDS ROUNDS THREADS serial,thread,worker1

The continuous trainer's step (the shipped network, optimiser and cross-entropy, ``bench train-speed``'s
``train_step``) on batches of N=20 scribbled CamVid images (the label-efficiency subset), the batch made

- ``serial``: on the training thread, as shipped (a DataLoader without workers);
- ``thread``: by the same loader in a thread, two batches ahead;
- ``worker1``: by a DataLoader with one persistent worker process, two batches ahead.

One network trains throughout; the modes take turns in blocks of SECONDS (A B C A B C ...), ROUNDS times. Prints each
block's steps a second, then the medians and the median ratio to the first mode. Compare with one mode per process,
taken in turn: a process that merely holds the other modes' thread and loader process makes fewer steps in every
mode (BENCHMARKS.md, thirteenth pass).
"""

from __future__ import annotations

import queue
import statistics
import sys
import threading
import time
from collections.abc import Iterator

import torch

from labelsmart import config
from labelsmart.bench.label_efficiency import make_labels, select_subset
from labelsmart.bench.train_speed import train_step
from labelsmart.datasets import DataFolder
from labelsmart.training.data import LabelledSet
from labelsmart.training.round import EndlessSampler, crops_per_batch, endless_batches, network_and_optimiser


def threaded(batches: Iterator, depth: int = 2) -> Iterator:
    q: queue.Queue = queue.Queue(depth)

    def run() -> None:
        for b in batches:
            q.put(b)

    threading.Thread(target=run, daemon=True).start()
    while True:
        yield q.get()


def main(pool_path: str, seconds: float, rounds: int, threads: int, modes: list[str]) -> None:
    torch.set_num_threads(threads)
    cfg = config.load({}, env={})
    pool = DataFolder.open(pool_path, "--pool")
    names = select_subset(pool.names("train_no_0006R0"), 20)
    dataset = LabelledSet([(pool.read_image(n), make_labels(pool.read(n)[1], "scribble")) for n in names], cfg)
    bs = crops_per_batch(cfg.train)  # what the continuous trainer takes per step
    make = {
        "serial": lambda: endless_batches(dataset, 0, bs),
        "thread": lambda: threaded(endless_batches(dataset, 0, bs)),
        "worker1": lambda: iter(
            torch.utils.data.DataLoader(
                dataset, bs, sampler=EndlessSampler(len(dataset), 0), num_workers=1, persistent_workers=True
            )
        ),
    }
    streams = {m: make[m]() for m in modes}
    ctx, opt = network_and_optimiser(
        cfg, len(pool.classes), torch.device("cpu"), ce_weight=torch.ones(len(pool.classes))
    )
    for m in modes:
        for _ in range(3):
            train_step(ctx, opt, next(streams[m]))
    rates: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(rounds):
        for m in modes:
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                train_step(ctx, opt, next(streams[m]))
                n += 1
            rates[m].append(n / (time.perf_counter() - t0))
        print(r, {m: round(v[-1], 3) for m, v in rates.items()}, flush=True)
    first = rates[modes[0]]
    print(
        {m: round(statistics.median(v), 3) for m, v in rates.items()},
        {m: round(statistics.median([a / b for a, b in zip(v, first, strict=True)]), 3) for m, v in rates.items()},
    )


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5].split(","))
