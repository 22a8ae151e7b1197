"""Serving-speed benchmark: ONNX Runtime against eager PyTorch on the same inputs, in the same process.

Images are read and prepared once (through :func:`labelsmart.imageio.prepare` with the model's own sidecar
preprocessing), so both engines time pure inference on the very same float32 tensors. torch is imported only
when a checkpoint is given, so an ONNX Runtime-only run does not need it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from labelsmart import imageio
from labelsmart.bench.common import provenance
from labelsmart.serving.onnx_model import OnnxModel

log = logging.getLogger(__name__)

DEFAULT_SIZE = (480, 360)  # (W, H): BENCHMARK.md section 3
RESULTS_NAME = "serve.jsonl"


# ----------------------------------------------------------------------------------------------- inputs


def load_inputs(images_dir: Path, count: int, size: tuple[int, int] | None, pp: Any) -> np.ndarray:
    """``count`` prepared network inputs ``(count, 3, Hp, Wp)`` float32 from the images of a folder.

    Up to ``count`` images are read (cycled when the folder has fewer), resized to ``size`` (W, H) when
    given, and prepared with ``pp`` (a :class:`labelsmart.config.PreprocessConfig`). Without ``size``,
    images of different sizes are padded to the largest padded size so that they stack.

    Raises:
        ValueError: the folder holds no image.
        labelsmart.imageio.ImageError: an image cannot be read.
    """
    names: list[Path] = []
    for rel in imageio.list_images(images_dir):
        names.append(rel)
        if len(names) >= count:
            break
    if not names:
        raise ValueError(f"{images_dir}: no images found; pass --images a folder of JPEG/PNG images.")
    images = [imageio.read_image(images_dir / rel) for rel in names]
    if size is not None:
        w, h = size
        images = [imageio.resize_image(img, (h, w)) for img in images]
    prepared = [imageio.prepare(img, pp) for img in images]
    pad_h = max(meta.pad_hw[0] for _, meta in prepared)
    pad_w = max(meta.pad_hw[1] for _, meta in prepared)
    if any(meta.pad_hw != (pad_h, pad_w) for _, meta in prepared):
        prepared = [imageio.prepare(img, pp, pad_to=(pad_h, pad_w)) for img in images]
    tensors = [x for x, _ in prepared]
    while len(tensors) < count:  # fewer images than the largest batch: reuse them
        tensors.append(tensors[len(tensors) % len(names)])
    log.info("prepared %d inputs (%d distinct images) at %dx%d (HxW)", count, len(names), pad_h, pad_w)
    return np.ascontiguousarray(np.stack(tensors[:count]))  # (count, 3, Hp, Wp)


# ---------------------------------------------------------------------------------------------- timing


def time_runs(run: Callable[[], Any], warmup: int, repeat: int) -> list[float]:
    """Call ``run`` ``warmup`` times untimed, then ``repeat`` times timed; returns the seconds of each."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return times


def summarize(times: list[float], batch: int) -> dict[str, float]:
    """Latency per batch (p50/p95 in ms) and throughput (batch / median seconds)."""
    ms = np.asarray(times, dtype=np.float64) * 1000.0
    p50 = float(np.percentile(ms, 50))
    return {
        "images_per_s": round(batch / (p50 / 1000.0), 3),
        "p50_ms": round(p50, 3),
        "p95_ms": round(float(np.percentile(ms, 95)), 3),
    }


# ----------------------------------------------------------------------------------------------- engines


def _bench_onnxruntime(
    model: OnnxModel, inputs: np.ndarray, batches: list[int], warmup: int, repeat: int
) -> dict[int, dict[str, float]]:
    out: dict[int, dict[str, float]] = {}
    for b in batches:
        x = np.ascontiguousarray(inputs[:b])  # (b, 3, Hp, Wp)
        times = time_runs(lambda x=x: model.session.run([model.output_name], {model.input_name: x}), warmup, repeat)
        out[b] = summarize(times, b)
        log.info("onnxruntime batch %d: %s", b, out[b])
    return out


def _bench_pytorch(
    checkpoint: Path,
    inputs: np.ndarray,
    batches: list[int],
    threads: int,
    device: str,
    num_classes: int,
    warmup: int,
    repeat: int,
    reference: Callable[[np.ndarray], np.ndarray],
) -> dict[int, dict[str, float]]:
    import torch

    from labelsmart.training.model import load_checkpoint

    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: PyTorch sees no CUDA GPU; run on a GPU machine or use --device cpu.")
    model, ckpt = load_checkpoint(checkpoint, map_location=device)
    if int(ckpt["num_classes"]) != num_classes:
        raise ValueError(
            f"{checkpoint}: the checkpoint has {ckpt['num_classes']} classes but the ONNX model {num_classes}; "
            "pass the checkpoint the model was exported from."
        )
    model.eval()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        with torch.inference_mode():
            # Same weights as the ONNX file? A cheap check on one input; a mismatch is logged, not fatal.
            got = model(torch.from_numpy(inputs[:1]).to(device)).cpu().numpy()  # (1, K, Hp, Wp)
            diff = float(np.abs(got - reference(inputs[:1])).max())
            log.log(logging.INFO if diff < 1e-2 else logging.WARNING, "pytorch vs onnxruntime max |diff| %.3g", diff)
            out: dict[int, dict[str, float]] = {}
            for b in batches:
                x = torch.from_numpy(np.ascontiguousarray(inputs[:b]))  # (b, 3, Hp, Wp), shares memory

                def run(x: Any = x) -> Any:
                    # numpy in, numpy out, like ONNX Runtime: on a GPU the copies are part of serving
                    y = model(x.to(device)).cpu().numpy()  # (b, K, Hp, Wp)
                    sync()
                    return y

                out[b] = summarize(time_runs(run, warmup, repeat), b)
                log.info("pytorch batch %d: %s", b, out[b])
    finally:
        torch.set_num_threads(before)
    return out


# ------------------------------------------------------------------------------------------ GPU variants


def export_fp16(checkpoint: Path, path: Path, device: str = "cuda") -> Path:
    """The checkpoint's network in float16 (weights and input) as an ONNX file, for GPU serving."""
    import torch

    from labelsmart.training.export import export_graph
    from labelsmart.training.model import load_checkpoint

    model, _ = load_checkpoint(checkpoint, map_location=device)
    model = model.half().eval()
    example = torch.rand(1, 3, 256, 320, device=device, dtype=torch.float16)
    with torch.inference_mode(False):
        export_graph(model, Path(path), 18, example_input=example)
    return Path(path)


def gpu_variants(
    model: OnnxModel,
    checkpoint: Path | None,
    inputs: np.ndarray,
    batches: list[int],
    warmup: int,
    repeat: int,
    work_dir: Path,
    out: list[tuple[str, str, list[str], dict[int, dict[str, float]], dict[str, Any]]],
) -> None:
    """Serving choices that exist only on a GPU, each timed like the plain engines; appended to ``out`` as
    ``(engine, device, providers, {batch: timings}, extra)`` one by one (what ran survives a later failure).

    - ``onnxruntime-iobinding``: the float32 model with its input already on the GPU and its output left
      there (I/O binding): the inference alone, without the host copies of the plain call.
    - ``onnxruntime-fp16``: a float16 export of the checkpoint (with ``--checkpoint``), numpy in and out;
      ``agreement`` is the fraction of pixels whose class equals the float32 model's.
    - ``onnxruntime-fp16-iobinding``: the same with I/O binding.
    - ``pytorch-fp16``: eager PyTorch with float16 weights and input.
    """
    import onnxruntime as ort

    from labelsmart.serving.onnx_model import providers_for, session_options

    def iobinding(sess: ort.InferenceSession, x: np.ndarray) -> Callable[[], Any]:
        value = ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0)
        binding = sess.io_binding()
        binding.bind_ortvalue_input(sess.get_inputs()[0].name, value)
        binding.bind_output(sess.get_outputs()[0].name, "cuda")
        return lambda: sess.run_with_iobinding(binding)

    def timed(make: Callable[[np.ndarray], Callable[[], Any]]) -> dict[int, dict[str, float]]:
        return {b: summarize(time_runs(make(np.ascontiguousarray(inputs[:b])), warmup, repeat), b) for b in batches}

    out.append(
        ("onnxruntime-iobinding", "cuda", list(model.providers), timed(lambda x: iobinding(model.session, x)), {})
    )
    # cuDNN's exhaustive algorithm search (ONNX Runtime's default) against the heuristic the predictor uses:
    # faster per call at a known shape, slower at each new shape (first_call_ms).
    exhaustive = ort.InferenceSession(
        str(model.path),
        sess_options=session_options(None),
        providers=[("CUDAExecutionProvider", {"cudnn_conv_algo_search": "EXHAUSTIVE"}), "CPUExecutionProvider"],
    )
    x1 = np.ascontiguousarray(inputs[:1])
    t0 = time.perf_counter()
    exhaustive.run(None, {model.input_name: x1})
    first_exh = (time.perf_counter() - t0) * 1000.0
    fresh = ort.InferenceSession(str(model.path), sess_options=session_options(None), providers=providers_for("cuda"))
    t0 = time.perf_counter()
    fresh.run(None, {model.input_name: x1})
    first_heur = (time.perf_counter() - t0) * 1000.0
    out.append(
        (
            "onnxruntime-exhaustive",
            "cuda",
            list(exhaustive.get_providers()),
            timed(lambda x: lambda: exhaustive.run(None, {model.input_name: x})),
            {"first_call_ms": round(first_exh, 1), "heuristic_first_call_ms": round(first_heur, 1)},
        )
    )
    if checkpoint is None:
        return
    Path(work_dir).mkdir(parents=True, exist_ok=True)
    fp16_path = export_fp16(Path(checkpoint), Path(work_dir) / "model-fp16.onnx")
    sess = ort.InferenceSession(str(fp16_path), sess_options=session_options(None), providers=providers_for("cuda"))
    name_in, name_out = sess.get_inputs()[0].name, sess.get_outputs()[0].name
    half = inputs.astype(np.float16)
    ref = model.logits(inputs[:1]).argmax(axis=1)
    got = sess.run([name_out], {name_in: half[:1]})[0].argmax(axis=1)
    extra = {"agreement": round(float(np.mean(ref == got)), 5)}
    out.append(
        (
            "onnxruntime-fp16",
            "cuda",
            list(sess.get_providers()),
            timed(lambda x: lambda xh=x.astype(np.float16): sess.run([name_out], {name_in: xh})),
            extra,
        )
    )
    out.append(
        (
            "onnxruntime-fp16-iobinding",
            "cuda",
            list(sess.get_providers()),
            timed(lambda x: iobinding(sess, x.astype(np.float16))),
            extra,
        )
    )

    import torch

    from labelsmart.training.model import load_checkpoint

    net, _ = load_checkpoint(Path(checkpoint), map_location="cuda")
    net = net.half().eval()

    def torch_half(x: np.ndarray) -> Callable[[], Any]:
        xt = torch.from_numpy(x.astype(np.float16))

        def run() -> Any:
            with torch.inference_mode():
                y = net(xt.to("cuda")).float().cpu().numpy()
            torch.cuda.synchronize()
            return y

        return run

    out.append(("pytorch-fp16", "cuda", [], timed(torch_half), {}))


# ------------------------------------------------------------------------------------------------ public


def serve_benchmark(
    model_path: Path,
    images_dir: Path,
    batches: list[int],
    threads: int,
    checkpoint: Path | None,
    warmup: int,
    repeat: int,
    size: tuple[int, int] | None,
    out_dir: Path,
    device: str = "cpu",
) -> list[dict[str, Any]]:
    """Time ONNX Runtime (and eager PyTorch on the same weights) per batch size; write ``out_dir/serve.jsonl``.

    Args:
        model_path: exported ``.onnx`` file (its sidecar JSON beside it).
        images_dir: folder of images; up to ``max(batches)`` of them are used (cycled when fewer).
        batches: batch sizes, each at least 1.
        threads: intra-op threads for both engines (0 = all cores).
        checkpoint: the ``model.pt`` the ONNX file was exported from; None times ONNX Runtime only.
        warmup: untimed runs per (engine, batch).
        repeat: timed runs per (engine, batch).
        size: resize every image to ``(W, H)`` first; None keeps their own sizes.
        out_dir: folder for ``serve.jsonl`` (overwritten).
        device: ``cpu`` or ``cuda`` (ONNX Runtime falls back to CPU where CUDA does not load; see the
            ``providers`` of its records).

    Returns:
        One record per (engine, batch): ``engine``, ``device``, ``providers``, ``batch``, ``images_per_s``,
        ``p50_ms``, ``p95_ms`` (latency per batch), ``threads``, ``input_hw``, ``model``, ``commit``, ``cpu``,
        ``date``.

    Raises:
        ValueError: bad arguments, no images, or a model/checkpoint that cannot be used.
        FileNotFoundError: the model file is missing.
    """
    if not batches or any(b < 1 for b in batches):
        raise ValueError(f"batch sizes {batches}: give one or more batch sizes of 1 or more.")
    if warmup < 0 or repeat < 1:
        raise ValueError(f"warmup {warmup}, repeat {repeat}: warmup must be 0 or more and repeat 1 or more.")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r}: use cpu or cuda.")
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise ValueError(f"{images_dir}: not a folder; pass --images a folder of images.")
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise ValueError(f"{checkpoint}: checkpoint not found; pass --checkpoint the model.pt of the ONNX model.")
    n_threads = int(threads or os.cpu_count() or 1)
    batches = sorted(set(batches))

    model = OnnxModel(Path(model_path), threads=n_threads, device=device)
    inputs = load_inputs(images_dir, max(batches), size, model.pp)  # (Bmax, 3, Hp, Wp)
    input_hw = [int(inputs.shape[2]), int(inputs.shape[3])]

    ort_device = "cuda" if "CUDAExecutionProvider" in model.providers else "cpu"
    if ort_device != device:
        log.warning("ONNX Runtime runs on %s (providers %s), not %s", ort_device, model.providers, device)
    results: list[tuple[str, str, list[str], dict[int, dict[str, float]]]] = [
        ("onnxruntime", ort_device, list(model.providers), _bench_onnxruntime(model, inputs, batches, warmup, repeat))
    ]
    if checkpoint is not None:
        torch_res = _bench_pytorch(
            Path(checkpoint),
            inputs,
            batches,
            n_threads,
            device,
            model.num_classes,
            warmup,
            repeat,
            reference=lambda x: model.session.run([model.output_name], {model.input_name: x})[0],
        )
        results.append(("pytorch", device, [], torch_res))

    extras: dict[str, dict[str, Any]] = {}
    if ort_device == "cuda" and device == "cuda":
        variants: list[Any] = []
        try:
            gpu_variants(model, checkpoint, inputs, batches, warmup, repeat, Path(out_dir), variants)
        except Exception:  # noqa: BLE001 - the plain engines' numbers stand; say which variant broke
            log.exception("a GPU serving variant failed after %s", [v[0] for v in variants])
        for engine, dev, providers, res, extra in variants:
            results.append((engine, dev, providers, res))
            extras[engine] = extra

    common = {
        "threads": n_threads,
        "input_hw": input_hw,
        "model": str(model_path),
        **provenance(),
    }
    records = [
        {
            "engine": engine,
            "device": dev,
            "providers": providers,
            "batch": b,
            **res[b],
            **extras.get(engine, {}),
            **common,
        }
        for engine, dev, providers, res in results
        for b in batches
    ]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in records)
    imageio.atomic_write_bytes(out_dir / RESULTS_NAME, text.encode())
    log.info("wrote %d records to %s", len(records), out_dir / RESULTS_NAME)
    return records


def format_table(records: list[dict[str, Any]]) -> str:
    """A small fixed-width table of benchmark records."""
    head = f"{'engine':<26} {'device':<6} {'batch':>5} {'img/s':>9} {'p50 ms':>9} {'p95 ms':>9} {'threads':>7}  input"
    lines = [head]
    for r in records:
        lines.append(
            f"{r['engine']:<26} {r['device']:<6} {r['batch']:>5} {r['images_per_s']:>9.2f} {r['p50_ms']:>9.2f} "
            f"{r['p95_ms']:>9.2f} {r['threads']:>7}  {r['input_hw'][0]}x{r['input_hw'][1]}"
        )
    return "\n".join(lines)


def ort_over_torch(records: list[dict[str, Any]], batch: int = 1) -> float | None:
    """ONNX Runtime images/s over PyTorch images/s at ``batch`` (None without both records)."""
    ips = {r["engine"]: r["images_per_s"] for r in records if r["batch"] == batch}
    if "onnxruntime" not in ips or not ips.get("pytorch"):
        return None
    return float(ips["onnxruntime"]) / float(ips["pytorch"])


# ------------------------------------------------------------------------------------- session tuning


TUNE_NAME = "tune.jsonl"


def tune_benchmark(
    model_path: Path,
    images_dir: Path,
    size: tuple[int, int] | None,
    out_dir: Path,
    threads: list[int],
    warmup: int = 3,
    repeat: int = 20,
) -> list[dict[str, Any]]:
    """Measure the ONNX Runtime session choices one by one on the CPU, at batch 1; write ``tune.jsonl``.

    Each record is one choice (``option``, ``value``) with ``images_per_s``, ``p50_ms`` and ``p95_ms`` of a
    full serving call (inference plus turning its output into a mask and a confidence at the image's size),
    everything else at the default. Options: intra-op ``threads``; graph ``optimization`` level; thread
    ``spinning``; ``postprocess`` (``host``: as the predictor does it, in NumPy/OpenCV; ``graph``: the same
    steps appended to the graph, :meth:`~labelsmart.serving.onnx_model.OnnxModel.masks`; its ``agreement`` with
    ``host`` is the fraction of pixels with the same class); and ``first_call_ms``
    at a new input shape against a warmed one (why buckets with a warm-up matter).
    """
    images_dir = Path(images_dir)
    names = [rel for _, rel in zip(range(8), imageio.list_images(images_dir), strict=False)]
    if not names:
        raise ValueError(f"{images_dir}: no images found; pass --images a folder of JPEG/PNG images.")
    raw = [imageio.read_image(images_dir / rel) for rel in names]
    if size is not None:
        raw = [imageio.resize_image(img, (size[1], size[0])) for img in raw]
    base = OnnxModel(Path(model_path), threads=max(threads), device="cpu")
    prepared = [imageio.prepare(img, base.pp) for img in raw]
    common = {
        "model": str(model_path),
        **provenance(),
        "input_hw": list(prepared[0][1].pad_hw),
        "image_hw": list(prepared[0][1].orig_hw),
    }
    records: list[dict[str, Any]] = []

    def serve_host(m: OnnxModel) -> Callable[[], Any]:
        state = {"i": 0}

        def run() -> Any:
            x, meta = prepared[state["i"] % len(prepared)]
            state["i"] += 1
            return imageio.logits_to_mask(m.logits(x[None])[0], meta)

        return run

    def add(option: str, value: Any, run: Callable[[], Any], **extra: Any) -> None:
        res = summarize(time_runs(run, warmup, repeat), 1)
        rec = {"option": option, "value": value, **res, **extra, **common}
        records.append(rec)
        log.info("tune %s=%s: %s", option, value, res)

    top = max(threads)
    for t in threads:
        add("threads", t, serve_host(OnnxModel(Path(model_path), threads=t, device="cpu")), threads=t)
    for level in ("disable", "basic", "extended", "all"):
        m = OnnxModel(Path(model_path), threads=top, device="cpu", optimization=level)
        add("optimization", level, serve_host(m), threads=top)
    for spin in (True, False):
        m = OnnxModel(Path(model_path), threads=top, device="cpu", spinning=spin)
        add("spinning", spin, serve_host(m), threads=top)

    # post-processing in the graph (what preannotate --postprocess graph runs) or on the host
    state = {"i": 0}

    def serve_graph() -> Any:
        x, meta = prepared[state["i"] % len(prepared)]
        state["i"] += 1
        return base.masks(x[None], meta)

    agree = []
    for x, meta in prepared:
        host_mask, _ = imageio.logits_to_mask(base.logits(x[None])[0], meta)
        agree.append(float(np.mean(base.masks(x[None], meta)[0][0] == host_mask)))
    add("postprocess", "host", serve_host(base), threads=top, agreement=1.0)
    add("postprocess", "graph", serve_graph, threads=top, agreement=round(float(np.mean(agree)), 5))

    # first call at a new shape against a warmed shape
    fresh = OnnxModel(Path(model_path), threads=top, device="cpu")
    x0 = prepared[0][0][None]
    t0 = time.perf_counter()
    fresh.logits(x0)
    first = (time.perf_counter() - t0) * 1000.0
    warm = summarize(time_runs(lambda: fresh.logits(x0), 1, 5), 1)["p50_ms"]
    odd = np.zeros((1, 3, x0.shape[2] + 32, x0.shape[3] + 64), np.float32)
    t0 = time.perf_counter()
    fresh.logits(odd)
    new_shape = (time.perf_counter() - t0) * 1000.0
    records.append(
        {
            "option": "first_call_ms",
            "value": "session start",
            "p50_ms": round(first, 3),
            "warm_p50_ms": warm,
            "new_shape_ms": round(new_shape, 3),
            "threads": top,
            **common,
        }
    )

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    imageio.atomic_write_bytes(out_dir / TUNE_NAME, "".join(json.dumps(r) + "\n" for r in records).encode())
    return records


def format_tune(records: list[dict[str, Any]]) -> str:
    """A table of :func:`tune_benchmark` records."""
    lines = [f"{'option':<14} {'value':<14} {'img/s':>8} {'p50 ms':>8} {'p95 ms':>8}  note"]
    for r in records:
        if r["option"] == "first_call_ms":
            lines.append(
                f"{'first call':<14} {'':<14} {'':>8} {r['p50_ms']:>8.1f} {'':>8}  warmed {r['warm_p50_ms']:.1f} "
                f"ms, new shape {r['new_shape_ms']:.1f} ms"
            )
            continue
        note = f"agreement {r['agreement']:.4f}" if "agreement" in r else ""
        lines.append(
            f"{r['option']:<14} {r['value']!s:<14} {r['images_per_s']:>8.2f} {r['p50_ms']:>8.2f} "
            f"{r['p95_ms']:>8.2f}  {note}"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- machine's limit


def flops_per_image(checkpoint: Path, input_hw: tuple[int, int]) -> float:
    """Floating-point operations (multiply and add counted apart) of one forward pass at ``input_hw``,
    counted by ``torch.utils.flop_counter`` on the checkpoint's network."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from labelsmart.training.model import load_checkpoint

    model, _ = load_checkpoint(checkpoint, map_location="cpu")
    model.eval()
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(torch.zeros(1, 3, *input_hw))
    return float(counter.get_total_flops())


def peak_flops(threads: int, n: int = 2048, repeat: int = 5) -> float:
    """Measured float32 FLOP/s of a large matrix product (``n`` x ``n`` x ``n``) with ``threads`` threads: the
    practical ceiling of these cores for dense math. The best of NumPy's BLAS and PyTorch's, since either may
    be the faster one on a given CPU (on the AMD EPYC here NumPy's OpenBLAS beat PyTorch by a quarter)."""
    import torch
    from threadpoolctl import threadpool_limits

    a = np.random.default_rng(0).random((n, n), dtype=np.float32)
    b = np.random.default_rng(1).random((n, n), dtype=np.float32)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        t_torch = float(np.median(time_runs(lambda: torch.mm(ta, tb), 1, repeat)))
    finally:
        torch.set_num_threads(before)
    with threadpool_limits(limits=threads):
        t_numpy = float(np.median(time_runs(lambda: a @ b, 1, repeat)))
    return 2.0 * n**3 / min(t_torch, t_numpy)
