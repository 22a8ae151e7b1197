"""Batch pre-annotation benchmark: ``preannotate`` end to end against pure inference on the same machine."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from labelsmart import imageio
from labelsmart.bench.common import peak_rss_mb, provenance
from labelsmart.serving.onnx_model import OnnxModel

log = logging.getLogger(__name__)

PREANNOTATE_NAME = "preannotate.jsonl"


def preannotate_benchmark(
    model_path: Path,
    images_dir: Path,
    out_dir: Path,
    batch: int,
    threads: int,
    io_threads: int,
    limit: int | None = None,
    device: str = "cpu",
    overlays: bool = True,
    postprocess: str = "auto",
) -> dict[str, Any]:
    """End-to-end ``preannotate`` throughput against pure inference throughput, same model, batch and threads.

    Pure inference: the model alone on inputs prepared beforehand (the first 32 images), in batches of
    ``batch``, three passes before and three after the end-to-end run, the median of the six. End to end:
    the streaming pipeline of :mod:`labelsmart.preannotate.pipeline` on every image of the folder (or the first
    ``limit``), reading, decoding, inferring, encoding and writing masks, overlays and the manifest into
    ``out_dir/preannotations`` (emptied first).
    """
    import shutil

    from labelsmart.preannotate import pipeline

    images_dir = Path(images_dir)
    rels = list(imageio.list_images(images_dir))
    if limit:
        rels = rels[:limit]
    if not rels:
        raise ValueError(f"{images_dir}: no images found; pass --images a folder of JPEG/PNG images.")
    n_threads = int(threads or os.cpu_count() or 1)
    model = OnnxModel(Path(model_path), threads=n_threads, device=device)
    sample = []
    for rel in rels:
        if len(sample) == 32:
            break
        try:
            sample.append(imageio.prepare(imageio.read_image(images_dir / rel), model.pp))
        except imageio.ImageError:
            continue  # the end-to-end run reports it
    if not sample:
        raise ValueError(f"{images_dir}: no readable images; pass --images a folder of JPEG/PNG images.")
    groups: dict[tuple[int, int], list[np.ndarray]] = {}
    for x, meta in sample:
        groups.setdefault(meta.pad_hw, []).append(x)
    batches = [np.stack(xs[i : i + batch]) for xs in groups.values() for i in range(0, len(xs), batch)]
    model.logits(batches[0])  # warm-up

    def inference_passes(n: int) -> list[float]:
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            for xb in batches:
                model.logits(xb)
            out.append(len(sample) / (time.perf_counter() - t0))
        return out

    # pure inference is timed before and after the end-to-end run and the median taken, so a passing change
    # in the machine's speed does not land on one side of the ratio only
    passes = inference_passes(3)

    target = Path(out_dir) / "preannotations"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    journal = pipeline.Journal(target, overwrite=True)
    failed = 0

    def on_outcome(o: pipeline.Outcome) -> None:
        nonlocal failed
        if o.record is not None:
            journal.record(o.record)
        else:
            failed += 1

    post = pipeline.choose_postprocess(postprocess, model.providers)
    if post == "graph":  # build and warm the post-processing session outside the timed run
        model.masks(np.stack([sample[0][0]]), sample[0][1])
    t0 = time.perf_counter()
    pipeline.run_local(
        model,
        images_dir,
        target,
        rels,
        on_outcome,
        batch=batch,
        io_threads=io_threads,
        overlays=overlays,
        postprocess=post,
    )

    journal.close()
    seconds = time.perf_counter() - t0
    e2e_ips = (len(rels) - failed) / seconds
    passes += inference_passes(3)
    inference_ips = float(np.median(passes))
    rec = {
        "images": len(rels),
        "failed": failed,
        "batch": batch,
        "threads": n_threads,
        "io_threads": io_threads,
        "overlays": overlays,
        "postprocess": post,
        "providers": list(model.providers),
        "inference_images_per_s": round(inference_ips, 3),
        "inference_passes": [round(v, 3) for v in passes],
        "end_to_end_images_per_s": round(e2e_ips, 3),
        "end_to_end_seconds": round(seconds, 2),
        "e2e_over_inference": round(e2e_ips / inference_ips, 4),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "model": str(model_path),
        **provenance(),
    }
    with open(Path(out_dir) / PREANNOTATE_NAME, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(rec) + "\n")
    return rec
