"""Training-speed benchmark (issue 13): steps per second and FLOPs per step of the shipped training step, against
the machine's measured peak.

Each *variant* (a network, memory format, compilation or shape; :data:`VARIANTS`) times the cross-entropy step the
background trainer takes — :func:`~labelsmart.training.objectives.finetune_step`, the finiteness check, backward and
an AdamW step, as ``_train_stages`` in :mod:`labelsmart.training.round` does it, with a :class:`StepContext` built as
``_prepare`` builds it — on one batch of random crops at the configured shape (``TrainConfig``: batch 4, crop 192).
The data loader is not part of it: the batch is made once and fed to every step. Per variant:

1. the network is built fresh (seed ``train.seed``), the FLOPs of one step (forward and backward) are counted
   once with ``torch.utils.flop_counter.FlopCounterMode``, eager, outside the timing (that counter sees the
   convolutions and matrix products, not the element-wise and normalisation work, so it is the dense arithmetic
   of a step and the same for both memory formats);
2. ``warmup`` untimed steps (the first, which compiles a compiled variant, is reported on its own);
3. steps for ``seconds`` of wall time (at least :data:`MIN_STEPS`); steps/s from the median step time and from
   the mean.

The peak is the throughput of a large square matrix product at the same thread count, measured once per run
(:func:`labelsmart.bench.serve.peak_flops` in float32 on the CPU, the home of that figure, and
:func:`mm_peak_flops` for the rest: bfloat16 where the CPU has native bfloat16, float32 and bfloat16 on CUDA).
Each variant reports achieved GFLOP/s = FLOPs per step x steps/s and its share of the peak of the dtype its step
runs in (``train.precision``: under bf16 autocast, the bfloat16 peak).

Each variant runs in its own spawned process (so compile caches, thread pools and memory do not leak from one to
the next, and its peak resident memory is its own); a variant that fails is recorded with its error and the run
goes on. ``results.jsonl`` (one line per variant) and ``table.md`` in ``--out`` are rewritten after each variant.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from labelsmart import imageio
from labelsmart.bench.common import exit_with_parent, peak_rss_mb, provenance, run_spawned
from labelsmart.config import Config, ModelConfig, TrainConfig

log = logging.getLogger(__name__)

RESULTS_NAME = "results.jsonl"
TABLE_NAME = "table.md"
MIN_STEPS = 3  # timed steps at least, however short --seconds is (a median of fewer says little)
DEFAULT_CLASSES = 11  # CamVid's, the benchmark data set's
PEAK_SIZE = 2048  # n of the n x n x n float32 matrix product whose throughput is the peak
FIXED_SETTINGS = {  # set by a flag or a variant, not by --set
    "model.arch": "--variants (each variant names its architecture)",
    "train.device": "--device",
    "train.threads": "--threads",
}


class SpeedError(ValueError):
    """Bad benchmark input; the message is one sentence naming the flag and what to do."""


@dataclass(frozen=True)
class Variant:
    """One way of running the training step; ``None`` fields keep the configured value."""

    name: str
    description: str
    arch: str = ModelConfig.arch
    channels_last: bool = False  # model and input in torch.channels_last
    compile: bool = False  # torch.compile (default mode) of the network
    crop: int | None = None  # overrides train.crop
    batch_size: int | None = None  # overrides train.batch_size
    precision: str | None = None  # overrides train.precision (fp32 | bf16)
    encoder: str | None = None  # overrides model.encoder


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("deeplabv3plus", "the shipped network (ModelConfig defaults), eager, contiguous"),
        Variant("deeplabv3plus-cl", "the shipped network in channels_last (model and input)", channels_last=True),
        Variant("deeplabv3plus-compile", "the shipped network under torch.compile (default mode)", compile=True),
        Variant("fpn", "FPN decoder on the same encoder, eager, contiguous", arch="FPN"),
        Variant("unet", "Unet decoder on the same encoder, eager, contiguous", arch="Unet"),
        Variant("deeplabv3plus-crop128", "the shipped network at crop 128", crop=128),
        Variant("deeplabv3plus-batch8", "the shipped network at batch 8", batch_size=8),
        Variant("deeplabv3plus-fp32", "the shipped network in float32 arithmetic", precision="fp32"),
        Variant("deeplabv3plus-bf16", "the shipped network under bfloat16 autocast", precision="bf16"),
        Variant("resnet18", "DeepLabV3+ on ResNet-18 (the default encoder until the ninth pass)", encoder="resnet18"),
        Variant("resnet18-fp32", "DeepLabV3+ on ResNet-18 in float32 arithmetic", encoder="resnet18", precision="fp32"),
    )
}
DEFAULT_VARIANTS = tuple(VARIANTS)


@dataclass(frozen=True)
class SpeedSpec:
    """Everything one benchmark run is asked to do."""

    out: Path
    variants: tuple[str, ...] = DEFAULT_VARIANTS
    seconds: float = 20.0  # timed wall time per variant, after the warm-up
    warmup: int = 3  # untimed steps first (compilation needs several)
    threads: int = 1  # torch threads (0 = all cores); the label-efficiency cells run one thread each
    device: str = "cpu"  # cpu | cuda | auto
    num_classes: int = DEFAULT_CLASSES
    overrides: dict[str, str] = field(default_factory=dict)  # "train.crop" -> "64", for every variant
    peak_size: int = PEAK_SIZE
    isolate: bool = True  # each variant in its own spawned process

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict that :meth:`from_json` reads back."""
        d = dataclasses.asdict(self)
        d["out"] = str(self.out)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SpeedSpec:
        """Inverse of :meth:`to_json`."""
        return cls(**{**d, "out": Path(d["out"]), "variants": tuple(d["variants"])})


# ------------------------------------------------------------------------------------------------ checks


def thread_count(threads: int) -> int:
    """``--threads``: 0 means every core."""
    return threads or os.cpu_count() or 1


def parse_variants(text: str) -> tuple[str, ...]:
    """``"deeplabv3plus,fpn"`` -> the variant names, checked (``"all"``: :data:`DEFAULT_VARIANTS`); raises
    :class:`SpeedError` on anything else."""
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    if names == ("all",):
        return DEFAULT_VARIANTS
    if not names:
        raise SpeedError(f"--variants {text!r}: give one or more variant names separated by commas.")
    for name in names:
        if name not in VARIANTS:
            raise SpeedError(f"--variants {name}: unknown variant; use any of {', '.join(VARIANTS)}.")
    if len(set(names)) != len(names):
        raise SpeedError(f"--variants {text}: a variant is named twice; name each once.")
    return names


def variant_config(spec: SpeedSpec, variant: Variant) -> Config:
    """The configuration a variant trains with: the shipped defaults, ``--set`` changes, then the variant's own."""
    from labelsmart import config

    cfg = config.load({"train.device": spec.device, "train.threads": spec.threads, **spec.overrides})
    tc = cfg.train
    tc = dataclasses.replace(
        tc,
        crop=variant.crop if variant.crop is not None else tc.crop,
        batch_size=variant.batch_size if variant.batch_size is not None else tc.batch_size,
        precision=variant.precision if variant.precision is not None else tc.precision,
    )
    model = dataclasses.replace(cfg.model, arch=variant.arch, encoder=variant.encoder or cfg.model.encoder)
    return dataclasses.replace(cfg, model=model, train=tc)


def check_spec(spec: SpeedSpec) -> None:
    """Fail early, with one sentence, on anything that would only fail inside a variant.

    Raises:
        SpeedError: unknown variants, a bad duration, warm-up, thread count, class count, setting or crop, or
            ``--device cuda`` without a GPU.
    """
    parse_variants(",".join(spec.variants))
    if not (spec.seconds > 0 and math.isfinite(spec.seconds)):
        raise SpeedError(f"--seconds {spec.seconds}: give a positive number of seconds.")
    if spec.warmup < 1:
        raise SpeedError(f"--warmup {spec.warmup}: give 1 or more (the first step is never timed with the rest).")
    if spec.threads < 0:
        raise SpeedError(f"--threads {spec.threads}: give 0 (all cores) or more.")
    if spec.num_classes < 2:
        raise SpeedError(f"--classes {spec.num_classes}: give 2 or more.")
    if spec.peak_size < 64:
        raise SpeedError(f"--peak-size {spec.peak_size}: give 64 or more (2048 is the benchmark's).")
    if spec.device not in ("cpu", "cuda", "auto"):
        raise SpeedError(f"--device {spec.device}: use cpu, cuda or auto.")
    sections = {"train": TrainConfig, "model": ModelConfig}
    for key in spec.overrides:
        section, _, name = key.partition(".")
        if key in FIXED_SETTINGS:
            raise SpeedError(f"--set {key}: set it with {FIXED_SETTINGS[key]}, not --set.")
        if section not in sections or name not in {f.name for f in dataclasses.fields(sections[section])}:
            raise SpeedError(f"--set {key}: not a train.* or model.* setting; see labelsmart/config.py.")
    for name in spec.variants:
        try:
            tc = variant_config(spec, VARIANTS[name]).train
        except ValueError as exc:
            raise SpeedError(
                f"--set: a value does not fit its setting ({exc}); give a number where one is due."
            ) from exc
        if tc.crop < 32 or tc.crop % 32:
            raise SpeedError(
                f"variant {name}: crop {tc.crop} is not a multiple of 32 (the network's stride); fix --set."
            )
        if tc.batch_size < 1:
            raise SpeedError(f"variant {name}: batch {tc.batch_size}; give train.batch_size 1 or more.")
    if spec.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SpeedError("--device cuda: PyTorch sees no CUDA GPU; run on a GPU machine or use --device cpu.")


def resolve_device(name: str) -> str:
    """``auto`` -> cuda when PyTorch sees a GPU, else cpu: the trainer's own rule, as a name."""
    from labelsmart.training.round import resolve_device as trainer_device

    return str(trainer_device(name))


# ------------------------------------------------------------------------------------------------ the step


def random_batch(batch_size: int, crop: int, num_classes: int, seed: int, pin: bool = False) -> dict[str, Any]:
    """A batch shaped like :class:`~labelsmart.training.data.LabelledSet`'s, of random values, on the CPU.

    Returns:
        ``{"view1": (B, 3, c, c) float32, "view2": the same tensor, "label": (B, c, c) int64}``: normalised-looking
        pixels and dense random class ids (the step costs the same whatever the values).
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    view = torch.randn(batch_size, 3, crop, crop, generator=g)  # (B, 3, c, c)
    label = torch.randint(0, num_classes, (batch_size, crop, crop), generator=g, dtype=torch.int64)  # (B, c, c)
    if pin:
        view, label = view.pin_memory(), label.pin_memory()
    return {"view1": view, "view2": view, "label": label}


def build_step(cfg: Config, num_classes: int, device_name: str, channels_last: bool) -> tuple[Any, Any]:
    """The network, optimiser and step context as rounds build them (``network_and_optimiser``, fresh random
    weights), in the variant's memory format (rounds pick channels-last on CUDA, contiguous on the CPU); the class
    weights are ones when the configuration balances classes (the weighted cross-entropy's arithmetic, without
    counting labels).

    Returns:
        ``(StepContext, AdamW optimiser)``.
    """
    import torch

    from labelsmart.training.round import network_and_optimiser

    device = torch.device(device_name)
    torch.manual_seed(cfg.train.seed)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    ce_weight = torch.ones(num_classes, device=device) if cfg.train.class_balance > 0 else None
    return network_and_optimiser(cfg, num_classes, device, memory_format=memory_format, ce_weight=ce_weight)


def train_step(ctx: Any, optimizer: Any, batch: dict[str, Any]) -> float:
    """One cross-entropy step as ``_train_stages`` takes it: loss, finiteness check, backward, AdamW step.

    Returns:
        The loss.

    Raises:
        RuntimeError: the loss is not finite.
    """
    import torch

    from labelsmart.training.objectives import finetune_step

    loss = finetune_step(ctx, batch)
    if not bool(torch.isfinite(loss.detach())):
        raise RuntimeError(f"the loss became {float(loss.detach())}; lower train.lr.")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def count_step_flops(ctx: Any, batch: dict[str, Any]) -> int:
    """FLOPs (multiply and add counted apart) of one step's forward and backward, counted eagerly by
    ``FlopCounterMode`` (convolutions and matrix products); the gradients are dropped afterwards."""
    from torch.utils.flop_counter import FlopCounterMode

    from labelsmart.training.objectives import finetune_step

    counter = FlopCounterMode(display=False)
    with counter:
        loss = finetune_step(ctx, batch)
        loss.backward()
    ctx.model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def step_flops(
    cfg: Config, num_classes: int = DEFAULT_CLASSES, device: str = "cpu", channels_last: bool = False
) -> int:
    """FLOPs of one training step of a fresh network at ``cfg.train``'s shape (no timing)."""
    from labelsmart.training.round import crops_per_batch

    ctx, _ = build_step(cfg, num_classes, device, channels_last)
    batch = random_batch(crops_per_batch(cfg.train), cfg.train.crop, num_classes, cfg.train.seed)
    return count_step_flops(ctx, batch)


def time_steps(step: Callable[[], Any], sync: Callable[[], None], warmup: int, seconds: float) -> dict[str, Any]:
    """Time ``warmup`` steps one by one, then steps for ``seconds`` of wall time (at least :data:`MIN_STEPS`).

    Returns:
        ``first_step_s`` (the first warm-up step: compilation, first allocations), ``warmup_step_s`` (every warm-up
        step), ``step_s`` (every timed step), ``timed_s`` (their wall time).
    """
    warm: list[float] = []
    for _ in range(warmup):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        warm.append(time.perf_counter() - t0)
    times: list[float] = []
    start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        step()
        sync()
        t1 = time.perf_counter()
        times.append(t1 - t0)
        if t1 - start >= seconds and len(times) >= MIN_STEPS:
            break
    return {"first_step_s": warm[0], "warmup_step_s": warm, "step_s": times, "timed_s": time.perf_counter() - start}


# ------------------------------------------------------------------------------------------------ one variant


def _variant_facts(spec: SpeedSpec, variant: Variant, cfg: Config, device: str) -> dict[str, Any]:
    """What a record says about the variant whatever its outcome."""
    import torch

    from labelsmart.training.round import autocast_name, crops_per_batch

    return {
        "variant": variant.name,
        "description": variant.description,
        "arch": cfg.model.arch,
        "encoder": cfg.model.encoder,
        "decoder_channels": cfg.model.decoder_channels,
        "num_classes": spec.num_classes,
        "crop": cfg.train.crop,
        "batch_size": crops_per_batch(cfg.train),
        "memory_format": "channels_last" if variant.channels_last else "contiguous",
        "compiled": variant.compile,
        "autocast": autocast_name(cfg.train.precision, torch.device(device)),
        "class_weighted": cfg.train.class_balance > 0,
        "device": device,
        "threads": thread_count(spec.threads),
        "warmup_steps": spec.warmup,
        "budget_seconds": spec.seconds,
        "isolated": spec.isolate,
        "overrides": dict(spec.overrides),
    }


def run_variant(spec: SpeedSpec, name: str) -> dict[str, Any]:
    """Build, count and time one variant in this process; returns its record (without the peak).

    Raises:
        Anything the network, the compiler or the step raises.
    """
    import torch

    variant = VARIANTS[name]
    device = resolve_device(spec.device)
    torch.set_num_threads(thread_count(spec.threads))
    cfg = variant_config(spec, variant)
    facts = _variant_facts(spec, variant, cfg, device)
    ctx, optimizer = build_step(cfg, spec.num_classes, device, variant.channels_last)
    batch = random_batch(facts["batch_size"], cfg.train.crop, spec.num_classes, cfg.train.seed, pin=device == "cuda")
    flops = count_step_flops(ctx, batch)  # eager, before any compilation, outside the timing
    if variant.compile:
        ctx.model.compile()  # nn.Module.compile: the same SegModel, its forward compiled (default mode)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    losses: list[float] = []
    timing = time_steps(lambda: losses.append(train_step(ctx, optimizer, batch)), sync, spec.warmup, spec.seconds)
    times = timing["step_s"]
    median = statistics.median(times)
    steps_per_s = 1.0 / median
    record = {
        **facts,
        "error": None,
        "params_m": round(sum(p.numel() for p in ctx.model.parameters()) / 1e6, 3),
        "flops_per_step": flops,
        "gflop_per_step": round(flops / 1e9, 3),
        "first_step_s": round(timing["first_step_s"], 4),
        "warmup_step_s": [round(t, 4) for t in timing["warmup_step_s"]],
        "steps": len(times),
        "timed_s": round(timing["timed_s"], 3),
        "step_median_s": round(median, 5),
        "step_mean_s": round(statistics.fmean(times), 5),
        "step_min_s": round(min(times), 5),
        "step_max_s": round(max(times), 5),
        "steps_per_s": round(steps_per_s, 4),  # from the median step time
        "steps_per_s_mean": round(len(times) / sum(times), 4),
        "images_per_s": round(steps_per_s * facts["batch_size"], 3),
        "achieved_gflops": round(flops * steps_per_s / 1e9, 3),
        "loss_last": round(losses[-1], 4),
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
        "torch": torch.__version__,
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }
    log.info(
        "%s: %.3f steps/s (median), %.2f GFLOP/step, first step %.2f s",
        name,
        steps_per_s,
        flops / 1e9,
        timing["first_step_s"],
    )
    return record


def error_sentence(exc: BaseException) -> str:
    """An exception as one line: its type and the first line of its message (compiler errors run to pages)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    if len(text) > 300:
        text = text[:297] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _variant_child(spec_json: dict[str, Any], name: str, out: str, level: int) -> None:
    """Entry point of a spawned variant process: write its record (or its error) to ``out`` as JSON."""
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("labelsmart").setLevel(level)
    exit_with_parent()
    try:
        payload: dict[str, Any] = {"record": run_variant(SpeedSpec.from_json(spec_json), name)}
    except Exception as exc:  # recorded by the parent, which goes on with the next variant
        log.debug("variant failed", exc_info=True)
        payload = {"error": error_sentence(exc)}
    imageio.atomic_write_bytes(Path(out), json.dumps(payload).encode())


def _run_isolated(spec: SpeedSpec, name: str) -> dict[str, Any]:
    """Run a variant in a spawned process; returns its record, or raises RuntimeError with its error."""
    payload = run_spawned(_variant_child, (spec.to_json(), name), f"variant {name}", "train-speed-")
    if "error" in payload:
        raise RuntimeError(payload["error"])
    return payload["record"]


def _run_in_process(spec: SpeedSpec, name: str) -> dict[str, Any]:
    """Run a variant here, with a fresh network; compile caches and the CUDA cache are cleared afterwards."""
    import gc

    import torch

    threads = torch.get_num_threads()
    try:
        return run_variant(spec, name)
    except Exception as exc:
        log.debug("variant failed", exc_info=True)
        raise RuntimeError(error_sentence(exc)) from exc
    finally:
        torch.set_num_threads(threads)
        if VARIANTS[name].compile:
            torch._dynamo.reset()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------ the peak


def mm_peak_flops(dtype: Any, device: str = "cuda", n: int = PEAK_SIZE, repeat: int = 5, threads: int = 0) -> float:
    """Measured FLOP/s of an ``n`` x ``n`` x ``n`` matrix product in ``dtype`` on ``device``, best of ``repeat`` timed
    runs after one untimed: on CUDA float32 (without TF32, PyTorch's default for matrix products) and bfloat16, on
    the CPU bfloat16 with ``threads`` threads (float32 there is :func:`labelsmart.bench.serve.peak_flops`)."""
    import torch

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(0)
        a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
        b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
        torch.mm(a, b)
        best = math.inf
        for _ in range(repeat):
            sync()
            t0 = time.perf_counter()
            torch.mm(a, b)
            sync()
            best = min(best, time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)
    return 2.0 * n**3 / best


def measure_peak(device: str, threads: int, n: int = PEAK_SIZE) -> dict[str, Any]:
    """The peaks the variants' shares are against: ``{"peak_gflops", "peak_dtype", "peak_float32_gflops",
    "peak_bfloat16_gflops", "peak_size"}``; ``peak_gflops`` is float32 on the CPU at ``threads`` threads, bfloat16 on
    CUDA; the bfloat16 peak is None on a CPU without native bfloat16."""
    if device == "cuda":
        import torch

        f32 = mm_peak_flops(torch.float32, "cuda", n)
        bf16 = mm_peak_flops(torch.bfloat16, "cuda", n)
        return {
            "peak_gflops": round(bf16 / 1e9, 2),
            "peak_dtype": "bfloat16",
            "peak_float32_gflops": round(f32 / 1e9, 2),
            "peak_bfloat16_gflops": round(bf16 / 1e9, 2),
            "peak_size": n,
        }
    from labelsmart.bench.serve import peak_flops
    from labelsmart.training.round import cpu_has_bf16

    f32 = peak_flops(threads, n=n)
    bf16 = None
    if cpu_has_bf16():
        import torch

        bf16 = mm_peak_flops(torch.bfloat16, "cpu", n, threads=threads)
    return {
        "peak_gflops": round(f32 / 1e9, 2),
        "peak_dtype": "float32",
        "peak_float32_gflops": round(f32 / 1e9, 2),
        "peak_bfloat16_gflops": round(bf16 / 1e9, 2) if bf16 is not None else None,
        "peak_size": n,
    }


def dtype_peak(peak: dict[str, Any], autocast: str | None) -> float:
    """The peak (GFLOP/s) a variant's share is against: the peak of its autocast dtype where it was measured, else
    the run's peak."""
    if autocast is None:
        return peak["peak_float32_gflops"]
    return peak.get(f"peak_{autocast}_gflops") or peak["peak_gflops"]


# ------------------------------------------------------------------------------------------------ the run


def run_benchmark(spec: SpeedSpec) -> list[dict[str, Any]]:
    """Measure the peak, then every variant of ``spec`` in turn; returns one record per variant (failed ones with
    ``error`` set), as written to ``results.jsonl``.

    Raises:
        SpeedError: bad input (before anything runs).
    """
    from tqdm import tqdm

    check_spec(spec)
    device = resolve_device(spec.device)
    threads = thread_count(spec.threads)
    spec.out.mkdir(parents=True, exist_ok=True)
    log.info("peak: %d x %d float32 matrix product on %s, %d threads", spec.peak_size, spec.peak_size, device, threads)
    peak = measure_peak(device, threads, spec.peak_size)
    log.info("peak %.1f GFLOP/s (%s)", peak["peak_gflops"], peak["peak_dtype"])
    where = provenance()
    records: list[dict[str, Any]] = []
    bar = tqdm(total=len(spec.variants), desc="train-speed", unit="variant", file=sys.stderr, dynamic_ncols=True)
    try:
        for name in spec.variants:
            bar.set_postfix_str(name)
            try:
                rec = _run_isolated(spec, name) if spec.isolate else _run_in_process(spec, name)
            except RuntimeError as exc:
                log.error("variant %s failed: %s", name, exc)
                rec = {**_variant_facts(spec, VARIANTS[name], variant_config(spec, VARIANTS[name]), device)}
                rec["error"] = str(exc)
            if rec.get("error") is None:
                rec["peak_share"] = round(rec["achieved_gflops"] / dtype_peak(peak, rec["autocast"]), 4)
            records.append({**rec, **peak, **where})
            write_results(spec.out, records)
            bar.update(1)
    finally:
        bar.close()
    return records


def write_results(out: Path, records: Sequence[dict[str, Any]]) -> None:
    """Rewrite ``results.jsonl`` (one line per record) and ``table.md`` atomically."""
    lines = "".join(json.dumps(r) + "\n" for r in records)
    imageio.atomic_write_bytes(out / RESULTS_NAME, lines.encode())
    imageio.atomic_write_bytes(out / TABLE_NAME, format_table(records).encode())


def format_table(records: Sequence[dict[str, Any]]) -> str:
    """Markdown: where it ran and the peak, then one row per variant."""
    if not records:
        return "No variants measured.\n"
    r0 = records[0]
    head = (
        f"Training step (CE forward + backward + AdamW) on {r0.get('gpu') or r0['device']}, {r0['threads']} "
        f"thread(s); peak {r0['peak_gflops']:.1f} GFLOP/s ({r0['peak_dtype']} {r0['peak_size']}^3 matrix product); "
        f"{r0['cpu']}, commit {r0['commit']}, {r0['date']}."
    )
    lines = [
        head,
        "",
        "| variant | arch | batch x crop | memory | compiled | dtype | GFLOP/step | first step s | steps/s (median) "
        "| steps/s (mean) | images/s | GFLOP/s | % of peak |",
        "|---|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        shape = f"{r['batch_size']} x {r['crop']}"
        where = (
            f"| {r['variant']} | {r['arch']} | {shape} | {r['memory_format']} | {'yes' if r['compiled'] else 'no'} "
            f"| {r.get('autocast') or 'float32'} "
        )
        if r.get("error"):
            lines.append(where + f"| failed: {r['error'].replace('|', '/')} |" + " |" * 6)
            continue
        lines.append(
            where + f"| {r['gflop_per_step']:.2f} | {r['first_step_s']:.2f} | {r['steps_per_s']:.3f} "
            f"| {r['steps_per_s_mean']:.3f} | {r['images_per_s']:.2f} | {r['achieved_gflops']:.1f} "
            f"| {100 * r['peak_share']:.1f} |"
        )
    lines += [
        "",
        "FLOPs: convolutions and matrix products of one forward and backward pass (torch.utils.flop_counter), "
        "eager; steps/s from the median step time unless marked mean.",
    ]
    return "\n".join(lines) + "\n"
