"""One exported model under ONNX Runtime: :class:`OnnxModel` (an ``.onnx`` file and its sidecar) and the session
choices labelsmart makes (providers, threads, optimisation), measured by ``bench serve --tune``.

Nothing here imports torch.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from labelsmart import imageio
from labelsmart.serving.sidecar import Sidecar

log = logging.getLogger(__name__)

# Interactive serving meets a new input shape now and then; an exhaustive cuDNN search would make the first
# prediction at each shape slow, the heuristic picks a good algorithm at once.
CUDA_OPTIONS = {"cudnn_conv_algo_search": "HEURISTIC"}


@dataclass(frozen=True)
class Prediction:
    """A model's answer for one image, at the image's own size.

    The arrays are read-only (they may be shared through the cache); copy them before editing.
    """

    mask: np.ndarray  # (H, W) uint8 class ids
    confidence: np.ndarray  # (H, W) float32 in [0, 1], probability of the winning class
    version: int  # model version that made it
    mean_confidence: float


def frozen_prediction(mask: np.ndarray, conf: np.ndarray, version: int) -> Prediction:
    mask.setflags(write=False)
    conf.setflags(write=False)
    return Prediction(mask=mask, confidence=conf, version=version, mean_confidence=float(conf.mean()))


_PRELOADED = False


def _preload_cuda_libraries() -> None:
    """Let ONNX Runtime find CUDA and cuDNN in the ``nvidia-*`` pip packages (as PyTorch's CUDA build
    installs them) when no system-wide CUDA is on the library path; only where an NVIDIA GPU is present."""
    global _PRELOADED
    if _PRELOADED or not os.path.exists("/dev/nvidiactl") or not hasattr(ort, "preload_dlls"):
        return
    _PRELOADED = True
    try:
        ort.preload_dlls()
    except Exception as exc:  # noqa: BLE001 - a system CUDA may still work; the session says what loaded
        log.debug("onnxruntime.preload_dlls failed: %s", exc)


def providers_for(device: str) -> list[str | tuple[str, dict[str, str]]]:
    """Execution providers to ask for: CUDA first (when wanted and built in), then CPU."""
    wanted: list[str | tuple[str, dict[str, str]]] = []
    if device != "cpu" and "CUDAExecutionProvider" in ort.get_available_providers():
        _preload_cuda_libraries()
        wanted.append(("CUDAExecutionProvider", dict(CUDA_OPTIONS)))
    wanted.append("CPUExecutionProvider")
    return wanted


_ORT_LOG_LOCK = threading.Lock()


def _source(model: Path | bytes) -> str | bytes:
    return model if isinstance(model, bytes) else str(model)


OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def session_options(threads: int | None, optimization: str = "all", spinning: bool = True) -> ort.SessionOptions:
    """ONNX Runtime session options as labelsmart uses them (each choice measured by ``bench serve --tune``).

    Args:
        threads: intra-op threads (None or 0 = all cores); inter-op stays 1 (the graph is one chain).
        optimization: graph optimisation level: ``disable``, ``basic``, ``extended`` or ``all`` (constant
            folding, Conv+BN/activation fusion and, on x86, the NCHWc layout for convolutions).
        spinning: intra-op threads spin between operators instead of sleeping; faster when ONNX Runtime
            has the cores to itself, slower when other threads (decoding, a UI) need them.
    """
    if optimization not in OPT_LEVELS:
        raise ValueError(f"optimization {optimization!r}: use one of {', '.join(OPT_LEVELS)}.")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads or os.cpu_count() or 1)
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = OPT_LEVELS[optimization]
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return opts


def _create_session(
    path: Path | bytes, opts: ort.SessionOptions, providers: list[str | tuple[str, dict[str, str]]], quiet: bool
) -> ort.InferenceSession:
    """Create an ONNX Runtime session, optionally muting its console errors while it tries the providers.

    With ``quiet`` (device ``auto``) a CUDA provider that cannot load is expected, not an error: ONNX Runtime's
    own messages about it are muted and the caller logs which providers it got.
    """
    if not quiet or len(providers) == 1:
        return ort.InferenceSession(_source(path), sess_options=opts, providers=providers)
    with _ORT_LOG_LOCK:  # the default logger is process-wide
        ort.set_default_logger_severity(4)
        try:
            return ort.InferenceSession(_source(path), sess_options=opts, providers=providers)
        finally:
            ort.set_default_logger_severity(2)  # ONNX Runtime's default (warnings)


def with_postprocess(model_bytes: bytes, output_name: str) -> bytes:
    """The model with labelsmart's post-processing appended, to run where the model runs (on the GPU).

    Extra inputs ``crop_hw`` and ``out_hw`` (int64, 2 values each: the working size inside the padding and
    the image's own size) give two more outputs: ``mask`` (uint8, ``(B, H, W)``), the argmax of the cropped
    logits resized bilinearly to the image's size, and ``confidence`` (float32, ``(B, H, W)``), the winning
    probability at working scale resized the same way: what :func:`labelsmart.imageio.logits_to_mask` does
    on the host, so only the small results cross back to the host.
    """
    import onnx
    from onnx import TensorProto, helper

    m = onnx.load_from_string(model_bytes)
    g = m.graph
    g.input.extend(
        [
            helper.make_tensor_value_info("crop_hw", TensorProto.INT64, [2]),
            helper.make_tensor_value_info("out_hw", TensorProto.INT64, [2]),
        ]
    )
    g.initializer.extend(
        [
            helper.make_tensor("ls_zeros2", TensorProto.INT64, [2], [0, 0]),
            helper.make_tensor("ls_axes23", TensorProto.INT64, [2], [2, 3]),
            helper.make_tensor("ls_axis1", TensorProto.INT64, [1], [1]),
            helper.make_tensor("ls_0", TensorProto.INT64, [1], [0]),
            helper.make_tensor("ls_2", TensorProto.INT64, [1], [2]),
        ]
    )

    def resize_to_image(src: str, dst: str) -> list[onnx.NodeProto]:
        return [
            helper.make_node("Shape", [src], [f"{dst}_shape"]),
            helper.make_node("Slice", [f"{dst}_shape", "ls_0", "ls_2"], [f"{dst}_bk"]),
            helper.make_node("Concat", [f"{dst}_bk", "out_hw"], [f"{dst}_sizes"], axis=0),
            helper.make_node(
                "Resize",
                [src, "", "", f"{dst}_sizes"],
                [dst],
                mode="linear",
                coordinate_transformation_mode="half_pixel",
            ),
        ]

    g.node.extend(
        [
            helper.make_node("Slice", [output_name, "ls_zeros2", "crop_hw", "ls_axes23"], ["ls_crop"]),
            *resize_to_image("ls_crop", "ls_up"),
            helper.make_node("ArgMax", ["ls_up"], ["ls_argmax"], axis=1, keepdims=0),
            helper.make_node("Cast", ["ls_argmax"], ["mask"], to=TensorProto.UINT8),
            helper.make_node("Softmax", ["ls_crop"], ["ls_probs"], axis=1),
            helper.make_node("ReduceMax", ["ls_probs", "ls_axis1"], ["ls_pmax"], keepdims=1),
            *resize_to_image("ls_pmax", "ls_cup"),
            helper.make_node("Squeeze", ["ls_cup", "ls_axis1"], ["confidence"]),
        ]
    )
    g.output.extend(
        [
            helper.make_tensor_value_info("mask", TensorProto.UINT8, ["batch", "out_h", "out_w"]),
            helper.make_tensor_value_info("confidence", TensorProto.FLOAT, ["batch", "out_h", "out_w"]),
        ]
    )
    onnx.checker.check_model(m)
    return m.SerializeToString()


class OnnxModel:
    """One ONNX Runtime session over an exported model and its sidecar JSON.

    Args:
        path: the ``.onnx`` file; ``<stem>.json`` beside it is the sidecar.
        threads: ONNX Runtime intra-op threads (None or 0 = all cores).
        device: ``auto`` (CUDA where it loads, else CPU), ``cuda`` (the same, with a warning on fallback) or
            ``cpu``.
        version: the version to report instead of the sidecar's (the registry's number wins).
        optimization, spinning: see :func:`session_options`.

    Raises:
        FileNotFoundError: the ``.onnx`` file is missing.
        ValueError: the model file or its sidecar is corrupt or does not fit together.
    """

    def __init__(
        self,
        path: Path,
        threads: int | None = None,
        device: str = "auto",
        version: int | None = None,
        optimization: str = "all",
        spinning: bool = True,
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: model file not found; check the path to the .onnx file.")
        self.sidecar = Sidecar.read(self.path)
        self.version = int(version if version is not None else self.sidecar.version)
        self.classes: list[dict[str, Any]] = list(self.sidecar.classes)
        self.num_classes = self.sidecar.num_classes
        self.colors: list[tuple[int, int, int]] = self.sidecar.colors
        self.class_names: list[str] = self.sidecar.class_names
        self.pp = self.sidecar.preprocess

        opts = session_options(threads, optimization, spinning)
        wanted = providers_for(device)
        self._options, self._wanted = opts, wanted
        self._post_session: ort.InferenceSession | None = None
        self._post_lock = threading.Lock()
        try:
            self.session = _create_session(self.path, opts, wanted, quiet=device == "auto")
        except Exception as exc:  # ORT raises its own exception types (InvalidProtobuf, Fail, ...)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ValueError(
                f"{self.path}: ONNX Runtime cannot load this model ({first}); export it again with "
                "`python -m labelsmart export`."
            ) from exc
        self.providers: list[str] = list(self.session.get_providers())
        names_in = [i.name for i in self.session.get_inputs()]
        names_out = [o.name for o in self.session.get_outputs()]
        self.input_name = self.sidecar.input_name
        self.output_name = self.sidecar.output_name
        if self.input_name not in names_in or self.output_name not in names_out:
            raise ValueError(
                f"{self.path}: model has inputs {names_in} and outputs {names_out} but its sidecar names "
                f"{self.input_name!r} -> {self.output_name!r}; export it again."
            )
        k_dim = next(o for o in self.session.get_outputs() if o.name == self.output_name).shape[1]
        if isinstance(k_dim, int) and k_dim != self.num_classes:
            raise ValueError(
                f"{self.path}: model outputs {k_dim} classes but its sidecar lists {self.num_classes}; export it again."
            )
        if len(wanted) > 1 and "CUDAExecutionProvider" not in self.providers:
            log.log(
                logging.WARNING if device == "cuda" else logging.INFO,
                "CUDA execution provider did not load (CUDA 13 / cuDNN 9 libraries missing, or no GPU); using %s",
                self.providers,
            )
        log.info("loaded model v%d from %s on %s", self.version, self.path, self.providers)

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """Raw class scores for a batch prepared with :func:`imageio.prepare` and this model's ``pp``.

        Args:
            batch: ``(B, 3, Hp, Wp)`` float32, normalised and padded.

        Returns:
            ``(B, K, Hp, Wp)`` float32 logits (crop with each image's ``Meta`` before use).
        """
        return self.session.run([self.output_name], {self.input_name: batch})[0]

    _run = logits

    def input_shape(self, height: int, width: int) -> tuple[int, int]:
        """The padded network input ``(Hp, Wp)`` of an image of this size (its shape bucket)."""
        work = imageio.working_size(height, width, self.pp.max_side)
        return imageio.padded_size(work[0], work[1], self.pp.pad_multiple)

    def warm_up(self, image_sizes: Iterable[tuple[int, int]], buckets: int = 2) -> list[tuple[int, int]]:
        """Run the model once at the input shapes of the most common image sizes, so that the first real
        prediction at each does not pay for ONNX Runtime's first-run setup at that shape (memory planning,
        and on CUDA cuDNN's algorithm choice).

        Args:
            image_sizes: ``(H, W)`` of the images to be served (one per image; repeats count).
            buckets: how many of the most common input shapes to warm.

        Returns:
            The input shapes warmed, most common first.
        """
        counts: dict[tuple[int, int], int] = {}
        for h, w in image_sizes:
            shape = self.input_shape(int(h), int(w))
            counts[shape] = counts.get(shape, 0) + 1
        shapes = sorted(counts, key=lambda s: -counts[s])[: max(0, buckets)]
        for hp, wp in shapes:
            self.logits(np.zeros((1, 3, hp, wp), np.float32))
        return shapes

    def predict(self, image: np.ndarray) -> Prediction:
        """Predict one RGB uint8 ``(H, W, 3)`` image."""
        x, meta = imageio.prepare(image, self.pp)  # (3, Hp, Wp)
        logits = self._run(x[None])  # (1, K, Hp, Wp)
        mask, conf = imageio.logits_to_mask(logits[0], meta)
        return frozen_prediction(mask, conf, self.version)

    def masks(self, batch: np.ndarray, meta: imageio.Meta) -> tuple[np.ndarray, np.ndarray]:
        """Masks and confidences of a prepared batch whose images share one :class:`~imageio.Meta`, with the
        post-processing run inside ONNX Runtime (see :func:`with_postprocess`): on a GPU only the small
        results come back to the host.

        Returns:
            ``(mask (B, H, W) uint8, confidence (B, H, W) float32)`` at the images' own size.
        """
        with self._post_lock:
            if self._post_session is None:
                self._post_session = _create_session(
                    with_postprocess(self.path.read_bytes(), self.output_name),
                    self._options,
                    self._wanted,
                    quiet=True,
                )
        mask, conf = self._post_session.run(
            ["mask", "confidence"],
            {
                self.input_name: batch,
                "crop_hw": np.asarray(meta.work_hw, np.int64),
                "out_hw": np.asarray(meta.orig_hw, np.int64),
            },
        )
        return mask, np.clip(conf, 0.0, 1.0)

    def predict_batch(self, images: Sequence[np.ndarray]) -> list[Prediction]:
        """Predict several images; those of the same padded size share one run. Order is kept."""
        prepared = [imageio.prepare(img, self.pp) for img in images]
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (_, meta) in enumerate(prepared):
            groups.setdefault(meta.pad_hw, []).append(i)
        out: list[Prediction | None] = [None] * len(prepared)
        for idx in groups.values():
            batch = np.stack([prepared[i][0] for i in idx])  # (B, 3, Hp, Wp)
            logits = self._run(batch)  # (B, K, Hp, Wp)
            for j, i in enumerate(idx):
                mask, conf = imageio.logits_to_mask(logits[j], prepared[i][1])
                out[i] = frozen_prediction(mask, conf, self.version)
        return [p for p in out if p is not None]
