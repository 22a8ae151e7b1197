"""Server-side time to show a pre-annotation, as the UI's handler does it: a new image, then the same image again.

    python scripts/preannotation_latency.py --workdir exports/loop-work/<run>/state --dataset ../shared/data/camvid \
        --images 20 --threads 2

Opens an existing project (for example one a ``bench loop`` run left behind), serves its newest published version
with the :class:`Predictor` and times ``Session.preannotation`` (read the image, predict, cache it, blend the
overlay) on images that version has not predicted yet, then again on each (the in-memory cache), then with a fresh
predictor (the on-disk cache, as after a restart). Prints the medians in milliseconds as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from labelsmart import config  # noqa: E402
from labelsmart.app.session import Session  # noqa: E402
from labelsmart.serving.predictor import Predictor  # noqa: E402
from labelsmart.store import Store  # noqa: E402


def main() -> int:
    """Time the handler and print the medians."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", required=True, help="the project's data set folder")
    ap.add_argument("--workdir", required=True, help="the project's state folder (holding project.sqlite)")
    ap.add_argument("--images", type=int, default=20, help="images to time (not yet predicted by the newest version)")
    ap.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0 = all cores)")
    args = ap.parse_args()

    cfg = config.load({"dataset": args.dataset, "workdir": args.workdir})
    cfg = dataclasses.replace(cfg, serve=dataclasses.replace(cfg.serve, threads=args.threads))
    store = Store(cfg.db_path, image_root=cfg.image_root)
    predictor = Predictor(store, cfg)
    if predictor.version is None:
        raise SystemExit(f"{cfg.db_path}: no published model version to time; run a training round first.")
    session = Session(cfg, store, predictor)
    fresh = [r.id for r in store.images() if store.prediction(r.id, predictor.version) is None][: args.images]
    session.preannotation(fresh[0])  # warm-up: ONNX Runtime's first run allocates
    fresh = fresh[1:]
    times: dict[str, list[float]] = {"new_image_ms": [], "cached_ms": [], "disk_cached_ms": []}
    for image_id in fresh:
        t = time.perf_counter()
        session.preannotation(image_id)
        times["new_image_ms"].append(1e3 * (time.perf_counter() - t))
        t = time.perf_counter()
        session.preannotation(image_id)
        times["cached_ms"].append(1e3 * (time.perf_counter() - t))
    restarted = Session(cfg, store, Predictor(store, cfg))
    for image_id in fresh:
        t = time.perf_counter()
        restarted.preannotation(image_id)
        times["disk_cached_ms"].append(1e3 * (time.perf_counter() - t))
    out = {k: round(statistics.median(v), 1) for k, v in times.items()}
    out.update(images=len(fresh), version=predictor.version, providers=predictor.providers, threads=args.threads)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
