"""Checkpoint -> ONNX + sidecar JSON, checked with ``onnx.checker`` and against PyTorch before anything is written.

Only the segmentation path (``SegModel.forward``: image -> logits) is exported, with dynamic batch,
height and width. The file and its sidecar are written to temporary names in the target folder and moved
into place only after the parity check passes, so a failed export leaves nothing behind.

Export runs on the CPU. Out of memory in it (the exporter, ``onnx.checker`` or the parity check) frees memory and
retries once, sparing it: the parity inputs one at a time, ONNX Runtime without its memory arena. Out of memory
again is one :class:`ExportError` sentence saying what to do.
"""

from __future__ import annotations

import datetime as dt
import gc
import json
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

from labelsmart.config import PreprocessConfig
from labelsmart.serving.sidecar import INPUT_NAME, OUTPUT_NAME, Sidecar, sidecar_path
from labelsmart.training.model import SegModel, load_checkpoint
from labelsmart.training.round import is_out_of_memory

log = logging.getLogger(__name__)

PARITY_SHAPES = ((1, 3, 64, 96), (2, 3, 96, 64))  # differ in batch, height and width; multiples of 32
PARITY_RTOL = 1e-3  # of the logits' scale (at least 1)


class ExportError(RuntimeError):
    """The export failed or does not match PyTorch; nothing was written."""


ORT_OUT_OF_MEMORY = ("Failed to allocate memory", "bad allocation", "bad_alloc")  # ONNX Runtime's words for it


def out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc``, or an exception it was raised from, is an allocator out of memory: torch's
    (:func:`labelsmart.training.round.is_out_of_memory`), Python's ``MemoryError``, or ONNX Runtime's."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if is_out_of_memory(e) or isinstance(e, MemoryError) or any(w in str(e) for w in ORT_OUT_OF_MEMORY):
            return True
        e = e.__cause__ or e.__context__
    return False


def _temp_path(out: Path, suffix: str) -> Path:
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=suffix, dir=out.parent)
    os.close(fd)
    os.chmod(name, 0o644)  # mkstemp makes 0600; an exported model is meant to be shared
    return Path(name)


def _fsync(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def export_graph(model: SegModel, path: Path, opset: int, example_input: torch.Tensor | None = None) -> str:
    """Write ``model.forward`` to ``path``; the TorchScript exporter first, the dynamo one if that fails.

    TorchScript first: on the default network it exports in a fraction of a second where the dynamo exporter
    takes 7 to 10 s (one thread, AMD EPYC, BENCHMARKS.md twelfth pass), its graph runs no slower in ONNX Runtime,
    and the continuous trainer's served versions are TorchScript graphs already. PyTorch has deprecated that
    exporter; where a release no longer has it, or it fails on a network, the dynamo exporter takes over.

    Args:
        example_input: the tracing input (default a float32 CPU tensor); its dtype and device must match the
            model's (a float16 model on a GPU takes a float16 GPU tensor).

    Returns:
        The exporter used: ``"torchscript"`` or ``"dynamo"``.
    """
    example = example_input if example_input is not None else torch.rand(*PARITY_SHAPES[0])  # (B, 3, H, W)
    try:
        export_torchscript(model, path, opset, example)
        return "torchscript"
    except Exception as exc:  # the exporter raises many types
        log.warning("TorchScript ONNX exporter failed (%s: %s); trying the dynamo exporter", type(exc).__name__, exc)
    try:
        batch = torch.export.Dim("batch", min=1, max=1024)
        height = torch.export.Dim("height", min=32, max=8192)
        width = torch.export.Dim("width", min=32, max=8192)
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            opset_version=opset,
            dynamo=True,
            external_data=False,
            dynamic_shapes={"x": {0: batch, 2: height, 3: width}},
            verbose=False,
        )
    except Exception as exc:
        raise ExportError(f"ONNX export failed with both exporters ({type(exc).__name__}: {exc}).") from exc
    return "dynamo"


def export_torchscript(
    model: SegModel, path: Path, opset: int, example: torch.Tensor, constant_folding: bool = True
) -> None:
    """Write ``model.forward`` to ``path`` with the TorchScript exporter, dynamic in batch, height and width.

    The one TorchScript export: :func:`export_graph`'s first choice, and the continuous trainer's graph template
    (:class:`labelsmart.training.continuous.OnnxTemplate`), which needs its graph without constant folding.

    Args:
        example: the tracing input (B, 3, H, W), of the model's dtype and device.
        constant_folding: the exporter's constant folding (its default). Off, the graph's initializers are exactly
            the model's parameters and buffers, by name, so new weights can be written into the same graph.
    """
    axes = {0: "batch", 2: "height", 3: "width"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the exporter's notice that it is deprecated
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            opset_version=opset,
            dynamo=False,
            do_constant_folding=constant_folding,
            dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: axes},
        )


def check_parity(model: SegModel, onnx_path: Path, threads: int | None = None, frugal: bool = False) -> float:
    """Largest absolute logit difference between ONNX Runtime (CPU) and PyTorch at :data:`PARITY_SHAPES`.

    Args:
        frugal: run the inputs of a batch one at a time, and ONNX Runtime without its memory arena (the same
            numbers, less memory at once).

    Raises:
        ExportError: a shape differs or a difference exceeds ``PARITY_RTOL`` of the logits' scale.
    """
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    if frugal:
        opts.enable_cpu_mem_arena = False
    session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for shape in PARITY_SHAPES:
        x = torch.randn(*shape, generator=gen)  # (B, 3, H, W)
        parts = list(x.split(1)) if frugal else [x]
        with torch.inference_mode():
            ref = np.concatenate([model(p).numpy() for p in parts])  # (B, K, H, W)
        got = np.concatenate([session.run([OUTPUT_NAME], {INPUT_NAME: p.numpy()})[0] for p in parts])  # (B, K, H, W)
        if got.shape != ref.shape:
            raise ExportError(f"ONNX output shape {got.shape} differs from PyTorch {ref.shape} for input {shape}.")
        diff = float(np.abs(got - ref).max())
        tol = PARITY_RTOL * max(1.0, float(np.abs(ref).max()))
        if not diff <= tol:  # also catches NaN
            raise ExportError(
                f"ONNX output differs from PyTorch by {diff:.3g} (tolerance {tol:.3g}) for input {shape}; "
                "the model was not exported."
            )
        worst = max(worst, diff)
    return worst


def export_onnx(
    checkpoint: Path,
    out: Path,
    metrics: dict[str, Any] | None = None,
    opset: int = 18,
    graph: Callable[[SegModel, Path, int], str] | None = None,
) -> Sidecar:
    """Export a checkpoint's segmentation path to ``out`` and write its sidecar (``out`` with ``.json``).

    Args:
        checkpoint: ``model.pt`` written by :func:`labelsmart.training.model.save_checkpoint`.
        out: target ``.onnx`` file; its folder is created.
        metrics: metrics for the sidecar; the checkpoint's own when None.
        opset: ONNX opset.
        graph: writes the graph file, as :func:`export_graph` (the default) does; the continuous trainer passes
            its graph template's, which writes an exported graph with new weights. The checks below run either way.

    Returns:
        The sidecar written.

    Raises:
        ExportError: export, ``onnx.checker`` or the parity check failed, or it ran out of memory twice (once,
            it is retried sparing memory); nothing was written.
        CheckpointError (a ValueError): the checkpoint is missing or corrupt.
    """
    try:
        return _export(Path(checkpoint), Path(out), metrics, opset, graph, frugal=False)
    except Exception as exc:  # noqa: BLE001 - only out of memory is retried, the rest re-raised
        if not out_of_memory(exc):
            raise
        first = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
    # out of the except block, so what the failed attempt held (in its traceback) is released
    log.warning(
        "out of memory exporting %s (%s); freeing memory and retrying once on the CPU, sparing memory", out, first
    )
    _free_memory()
    try:
        return _export(Path(checkpoint), Path(out), metrics, opset, graph, frugal=True)
    except Exception as exc:  # noqa: BLE001
        if not out_of_memory(exc):
            raise
    _free_memory()
    raise ExportError(
        f"out of memory exporting {out}, also when retried on the CPU; nothing was written. Close other programs "
        "and export again (python -m labelsmart export), or export on a machine with more memory."
    )


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _export(
    checkpoint: Path,
    out: Path,
    metrics: dict[str, Any] | None,
    opset: int,
    graph: Callable[[SegModel, Path, int], str] | None,
    frugal: bool,
) -> Sidecar:
    """One attempt of :func:`export_onnx`; ``frugal`` spares memory (:func:`check_parity`)."""
    t0 = time.monotonic()
    model, ckpt = load_checkpoint(checkpoint, map_location="cpu")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_onnx = _temp_path(out, ".onnx.tmp")
    tmp_json = _temp_path(sidecar_path(out), ".json.tmp")
    moved = False
    try:
        exporter = (graph or export_graph)(model, tmp_onnx, opset)
        try:
            onnx.checker.check_model(onnx.load(str(tmp_onnx)), full_check=True)
        except Exception as exc:
            raise ExportError(f"the exported ONNX graph does not pass onnx.checker ({exc}).") from exc
        diff = check_parity(model, tmp_onnx, frugal=frugal)
        pp = ckpt["preprocess"]
        sidecar = Sidecar(
            version=int(ckpt.get("version", 0)),
            classes=tuple(ckpt["classes"]),
            preprocess=PreprocessConfig(
                max_side=int(pp["max_side"]),
                pad_multiple=int(pp["pad_multiple"]),
                mean=tuple(float(v) for v in pp["mean"]),
                std=tuple(float(v) for v in pp["std"]),
            ),
            input_name=INPUT_NAME,
            output_name=OUTPUT_NAME,
            metrics=metrics if metrics is not None else ckpt.get("metrics", {}),
            details={
                "opset": int(opset),
                "arch": ckpt["model"]["arch"],
                "encoder": ckpt["model"]["encoder"],
                "exporter": exporter,
                "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                "parity_max_abs_diff": diff,
            },
        )
        tmp_json.write_text(json.dumps(sidecar.to_json(), indent=2, default=_json_default))
        _fsync(tmp_onnx)
        _fsync(tmp_json)
        os.replace(tmp_onnx, out)
        moved = True
        os.replace(tmp_json, sidecar_path(out))
    except BaseException:
        for p in (tmp_onnx, tmp_json):
            p.unlink(missing_ok=True)
        if moved:
            out.unlink(missing_ok=True)  # the ONNX file landed but its sidecar did not
        raise
    log.info(
        "exported %s (%s exporter, opset %d, parity %.2g) in %.1f s", out, exporter, opset, diff, time.monotonic() - t0
    )
    return sidecar


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
