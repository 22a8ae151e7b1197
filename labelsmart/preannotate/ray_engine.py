"""``preannotate --engine ray``: the batch pre-annotation of :mod:`labelsmart.preannotate.pipeline` on a Ray cluster.

Ray Data streams the same three steps as the local pipeline, each where it runs best:

1. read: CPU tasks decode the images and prepare the network inputs (:func:`labelsmart.preannotate.pipeline.load_item`);
2. infer: a pool of ONNX Runtime actors (one per GPU where the cluster has GPUs, else CPU actors) turns
   the inputs into masks and confidences;
3. write: CPU tasks write the overlays and palette masks and return each image's manifest record
   (:func:`labelsmart.preannotate.pipeline.write_outputs`).

The driver appends the records to the manifest as they stream back, so resuming, the manifest and the
COCO file work exactly as with the local engine, and the files written are the same. A full disk stops the
run with the local engine's sentence (:class:`labelsmart.preannotate.pipeline.OutputFullError`). The model
file, the images and the output folder must be reachable under the same paths from every node (a shared
filesystem); on a single machine that is always so. Ray is an optional extra:
``pip install -r requirements-ray.txt``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from labelsmart import imageio
from labelsmart.preannotate import pipeline

log = logging.getLogger(__name__)


def _require_ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401 - Ray Data comes with the "data" extra
    except ImportError as exc:
        raise ValueError(
            "--engine ray needs Ray Data, which is not installed; run `pip install -r requirements-ray.txt`."
        ) from exc
    return ray


def _read_batch(rows: dict[str, np.ndarray], images: str, pp: Any) -> dict[str, Any]:
    """Ray Data step 1: decode and prepare each image of a batch of relative paths."""
    out: dict[str, list[Any]] = {k: [] for k in ("rel", "error", "image", "x", "meta")}
    for rel in rows["rel"]:
        item = pipeline.load_item(Path(images), Path(str(rel)), pp)
        out["rel"].append(str(rel))
        out["error"].append(item.error or "")
        out["image"].append(item.image if item.image is not None else np.zeros((1, 1, 3), np.uint8))
        out["x"].append(item.x if item.x is not None else np.zeros((3, 1, 1), np.float32))
        meta = item.meta
        out["meta"].append(
            np.asarray([*meta.orig_hw, *meta.work_hw, *meta.pad_hw], np.int64) if meta else np.zeros(6, np.int64)
        )
    return {k: _column(v) for k, v in out.items()}


def _column(values: list[Any]) -> np.ndarray:
    """A Ray Data column: strings as a string array, arrays as an object array (their shapes may differ)."""
    if values and isinstance(values[0], str):
        return np.asarray(values, dtype=object)
    col = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        col[i] = v
    return col


def _meta(row: np.ndarray) -> imageio.Meta:
    v = [int(a) for a in row]
    return imageio.Meta(orig_hw=(v[0], v[1]), work_hw=(v[2], v[3]), pad_hw=(v[4], v[5]))


class _Infer:
    """Ray Data step 2: an actor holding one ONNX Runtime session (on its GPU when it was given one)."""

    def __init__(self, model_path: str, threads: int, device: str) -> None:
        from labelsmart.serving.onnx_model import OnnxModel

        self.model = OnnxModel(Path(model_path), threads=threads or None, device=device)

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, Any]:
        n = len(rows["rel"])
        masks: list[Any] = [np.zeros((1, 1), np.uint8)] * n
        confs: list[Any] = [np.zeros((1, 1), np.float32)] * n
        errors = [str(e) for e in rows["error"]]
        groups: dict[tuple[int, ...], list[int]] = {}
        for i in range(n):
            if not errors[i]:
                groups.setdefault(tuple(int(v) for v in rows["meta"][i][4:6]), []).append(i)
        for idx in groups.values():  # inputs of one padded size share a run, as in the local pipeline
            try:
                logits = list(self.model.logits(np.stack([rows["x"][i] for i in idx])))
            except Exception:  # noqa: BLE001 - retry one by one so a bad image fails alone
                logits = []
                for i in idx:
                    try:
                        logits.append(self.model.logits(rows["x"][i][None])[0])
                    except Exception as exc:  # noqa: BLE001
                        logits.append(exc)
            for i, lg in zip(idx, logits, strict=True):
                if isinstance(lg, Exception):
                    errors[i] = pipeline.INFERENCE_FAILED.format(" ".join(str(lg).split()))
                    continue
                masks[i], confs[i] = imageio.logits_to_mask(lg, _meta(rows["meta"][i]))
        return {
            "rel": rows["rel"],
            "error": _column(errors),
            "image": rows["image"],
            "mask": _column(masks),
            "confidence": _column(confs),
        }


def _write_batch(rows: dict[str, np.ndarray], out: str, info: pipeline.ModelInfo, overlays: bool) -> dict[str, Any]:
    """Ray Data step 3: write each image's files; returns its manifest record (as JSON) or its error.

    A full disk is not an image's error: that image's ``full`` column holds the sentence of
    :func:`labelsmart.preannotate.pipeline.stop_when_full`, the images after it in the batch are not written
    (nor recorded), and the driver stops the run there, as the local engine does.
    """
    import json

    records, errors, full = [], [], []
    stopped = ""
    for i, rel in enumerate(rows["rel"]):
        error = str(rows["error"][i])
        record = ""
        if not error and not stopped:
            where = Path(str(rel))
            try:
                with pipeline.stop_when_full(Path(out), f"the outputs of {where.as_posix()} were not written"):
                    image, mask, confidence = rows["image"][i], rows["mask"][i], rows["confidence"][i]
                    rec = pipeline.write_outputs(Path(out), where, image, mask, confidence, info, overlays)
                record = json.dumps(rec)
            except pipeline.OutputFullError as exc:
                stopped = str(exc)
            except OSError as exc:
                error = pipeline.WRITE_FAILED.format(exc, out)
        records.append(record)
        errors.append(error)
        full.append(stopped)
    return {"rel": rows["rel"], "record": _column(records), "error": _column(errors), "full": _column(full)}


def _actor_plan(resources: dict[str, float], device: str, threads: int) -> tuple[int, int, dict[str, int], int, int]:
    """How the inference step runs on a cluster with ``resources``: one actor per GPU, else one per two CPUs
    (with ``threads`` ONNX Runtime threads each, 1 by default).

    Returns:
        ``(cpus, gpus, resources per actor, actors, ONNX Runtime threads per actor)``.
    """
    gpus = int(resources.get("GPU", 0)) if device != "cpu" else 0
    cpus = max(1, int(resources.get("CPU", os.cpu_count() or 1)))
    ort_threads = threads or 1
    if gpus:
        return cpus, gpus, {"num_gpus": 1, "num_cpus": 1}, gpus, ort_threads
    per_actor = max(1, (cpus // 2) // ort_threads) if cpus > 1 else 1
    return cpus, gpus, {"num_cpus": ort_threads}, per_actor, ort_threads


def run_ray(
    model_path: Path,
    images: Path,
    out: Path,
    todo: Sequence[Path],
    on_outcome: Callable[[pipeline.Outcome], None],
    batch_size: int = 4,
    threads: int = 0,
    device: str = "auto",
    overlays: bool = True,
    address: str | None = None,
    num_cpus: int | None = None,
) -> None:
    """Pre-annotate ``todo`` on Ray; ``on_outcome`` is called in the driver once per image.

    Raises:
        OutputFullError: the disk holding ``out`` filled up; the images reported so far are done, the rest are
            not (the same sentence as the local engine's, and the same resume).

    Args:
        address: a running cluster (``ray://host:10001`` or ``auto``); None starts a local Ray instance.
        threads: ONNX Runtime threads per CPU actor (0 = 1 per actor, with one actor per two CPUs).
        num_cpus: CPUs of the local instance (default all); ignored with ``address``.
    """
    import json

    from labelsmart.serving.onnx_model import OnnxModel

    if not todo:
        return
    ray = _require_ray()
    started = False
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
        if address:
            kwargs["address"] = address
        elif num_cpus is not None:
            kwargs["num_cpus"] = num_cpus
        ray.init(**kwargs)
        started = True
    try:
        probe = OnnxModel(model_path, threads=1, device="cpu")
        info = pipeline.ModelInfo.of(probe)
        cpus, gpus, actors, per_actor, ort_threads = _actor_plan(ray.cluster_resources(), device, threads)
        log.info(
            "ray: %d CPUs, %d GPUs; %d inference actors (%s), %d image(s) per batch",
            cpus,
            gpus,
            per_actor,
            "GPU" if gpus else f"{ort_threads} ONNX Runtime thread(s) each",
            batch_size,
        )
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        # enough blocks to keep every CPU busy, few enough that a million paths are not a million tasks
        blocks = max(1, min(len(todo) // batch_size, 16 * cpus))
        ds = ray.data.from_items([{"rel": r.as_posix()} for r in todo], override_num_blocks=blocks)
        ds = ds.map_batches(
            _read_batch, batch_size=batch_size, batch_format="numpy", fn_kwargs={"images": str(images), "pp": probe.pp}
        )
        ds = ds.map_batches(
            _Infer,
            batch_size=batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=per_actor),
            fn_constructor_kwargs={"model_path": str(model_path), "threads": ort_threads, "device": device},
            **actors,
        )
        ds = ds.map_batches(
            _write_batch,
            batch_size=batch_size,
            batch_format="numpy",
            fn_kwargs={"out": str(out), "info": info, "overlays": overlays},
        )
        for rows in ds.iter_batches(batch_format="numpy", batch_size=None):
            for rel, record, error, full in zip(rows["rel"], rows["record"], rows["error"], rows["full"], strict=True):
                if full:  # the images reported so far are done; the rest (some perhaps written) are done again
                    raise pipeline.OutputFullError(str(full))
                if error:
                    on_outcome(pipeline.Outcome(Path(str(rel)), error=str(error)))
                else:
                    on_outcome(pipeline.Outcome(Path(str(rel)), record=json.loads(str(record))))
    finally:
        if started:
            ray.shutdown()
