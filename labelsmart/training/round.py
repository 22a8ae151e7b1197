"""One training round: labelled images in, a trained network and its metrics out.

Read top to bottom: :func:`run_round` takes a :class:`RoundData` (the labelled images, already split into
training and validation, the classes, and the unlabelled images for objectives that use them), builds (or
warm-starts) the network, trains the two stages (optional contrastive pretraining, then fine-tuning;
:mod:`~labelsmart.training.objectives`) inside a :class:`Budget`, validates through the predictor's own
preprocessing path (:mod:`~labelsmart.training.validation`) and returns a :class:`RoundResult`. It knows
nothing of the project store: the background trainer (:mod:`~labelsmart.training.trainer`) turns a label
snapshot into its input, and the label-efficiency benchmark calls it on in-memory masks.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Sampler

from labelsmart import imageio
from labelsmart.config import Config, TrainConfig
from labelsmart.training.data import LabelledSet, UnlabelledSet, WeakStrongSet
from labelsmart.training.device_data import DeviceBatches
from labelsmart.training.losses import class_weights
from labelsmart.training.model import (
    CheckpointError,
    SegModel,
    build_model,
    model_config_of,
    read_checkpoint,
    save_checkpoint,
)
from labelsmart.training.objectives import (
    PseudoThresholds,
    StepContext,
    contrastive_step,
    finetune_step,
    joint_step,
    self_training_step,
    semi_step,
)
from labelsmart.training.validation import validate

log = logging.getLogger(__name__)

PRETRAIN, FINETUNE, VALIDATE = "pretraining", "fine-tuning", "validating"
PROGRESS_EVERY_S = 0.5
FT_COST_GUESS = 0.5  # fine-tuning step time / pretraining step time, until measured
GROW_BELOW = 0.9  # a capped round's plan grows back when it needs less than this share of the time left
LOSS_WINDOW = 20  # reported losses are means over the last steps of a stage

T = TypeVar("T")
Pair = tuple[np.ndarray, np.ndarray]  # (image RGB uint8 (H, W, 3), mask uint8 (H, W), 255 = unlabelled)


class RoundCancelled(RuntimeError):
    """``should_stop()`` asked the round to stop; nothing was saved."""


class RoundFailed(RuntimeError):
    """The round cannot go on (a loss that is not finite, out of memory at the smallest batch); nothing was saved,
    the message says what to do."""


@dataclass(frozen=True)
class RoundData:
    """What a round learns from.

    Attributes:
        train: labelled images the network trains on, at full size.
        val: labelled images held out for validation (may be empty).
        classes: ``[{"id", "name", "color"}]`` in id order; mask value k is ``classes[k]``.
        unlabelled: reads the unlabelled images an objective learns from (the semi-supervised one); called
            only by a round that uses them, so a cross-entropy round never reads them.
    """

    train: Sequence[Pair]
    classes: Sequence[dict[str, Any]]
    val: Sequence[Pair] = ()
    unlabelled: Callable[[], list[np.ndarray]] | None = None


@dataclass
class RoundResult:
    """What a finished round produced: the trained network (on its device) and what it measured."""

    model: SegModel
    cfg: Config
    classes: list[dict[str, Any]]
    version: int
    steps: int  # optimisation steps done (both stages)
    seconds: float  # wall time of the whole round
    device: str
    metrics: dict[str, Any] = field(default_factory=dict)

    def save(self, path: Path) -> Path:
        """Write the self-describing checkpoint (``model.pt``) atomically; returns its path."""
        save_checkpoint(path, self.model, self.cfg, self.classes, self.version, self.steps, self.metrics)
        return Path(path)


# ---------------------------------------------------------------------------------------------- helpers


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("train.device is cuda but no CUDA GPU is visible; use --device cpu or auto.")
    return torch.device(name)


PRECISIONS = ("auto", "fp32", "bf16")  # train.precision


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX-512 BF16 or AMX tiles), so bf16 autocast pays on it."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu's capability checks (torch >= 2.1)
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The dtype a training step autocasts to on ``device`` under ``train.precision`` (None: plain float32).

    Raises:
        ValueError: ``precision`` is none of :data:`PRECISIONS`.
    """
    if precision not in PRECISIONS:
        raise ValueError(
            f"train.precision is {precision!r}; set LABELSMART_TRAIN_PRECISION to one of {', '.join(PRECISIONS)}."
        )
    if precision == "fp32":
        return None
    if precision == "bf16" or device.type == "cuda" or cpu_has_bf16():
        return torch.bfloat16
    return None


def autocast_name(precision: str, device: torch.device) -> str | None:
    """:func:`autocast_dtype` as records spell it: ``"bfloat16"``, or None for plain float32."""
    dtype = autocast_dtype(precision, device)
    return str(dtype).removeprefix("torch.") if dtype is not None else None


def training_autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The context a training step runs its forward pass in (:func:`autocast_dtype`)."""
    dtype = autocast_dtype(precision, device)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def sample_unlabelled(items: Sequence[T], limit: int, seed: int) -> list[T]:
    """At most ``limit`` of ``items``: all of them (in order) when they fit, else a seeded draw without
    replacement (in draw order; callers sort it as they list images)."""
    if len(items) <= limit:
        return list(items)
    return [items[int(i)] for i in np.random.default_rng(seed).choice(len(items), size=limit, replace=False)]


def split_validation(image_ids: list[int], tc: TrainConfig) -> tuple[list[int], list[int]]:
    """``(train ids, validation ids)``: every ``val_every``-th image by id, once ``val_min_images`` are labelled."""
    ids = sorted(image_ids)
    if len(ids) < tc.val_min_images or tc.val_every < 2:
        return ids, []
    val = [i for k, i in enumerate(ids) if k % tc.val_every == tc.val_every - 1]
    held = set(val)
    return [i for i in ids if i not in held], val


class EndlessSampler(Sampler[int]):
    """Endless shuffled passes over ``n`` items; pass p yields ``p * n + i``, so each draw has its own seed."""

    def __init__(self, n: int, seed: int) -> None:
        self.n = n
        self.rng = np.random.default_rng(seed)

    def __iter__(self) -> Iterator[int]:
        p = 0
        while True:
            for i in self.rng.permutation(self.n):
                yield p * self.n + int(i)
            p += 1


def crops_per_batch(tc: TrainConfig, batch_size: int | None = None) -> int:
    """Labelled crops per batch: ``batch_size`` (``tc.batch_size`` when None; at least two: BatchNorm after global
    pooling, in ASPP, needs two samples), halved for the joint objectives, whose two views of each crop make a step
    see as many images as a cross-entropy step. ``crops_per_batch(tc, 1)`` is the smallest batch a round can
    train with: two crops, or one crop's two views."""
    n = max(2, tc.batch_size if batch_size is None else batch_size)
    return max(1, n // 2) if tc.contrastive_weight > 0 or tc.pseudo_weight > 0 else n


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether an exception is an allocator running out of memory: ``torch.OutOfMemoryError`` (CUDA), or the
    CPU allocator's ``RuntimeError`` ("out of memory", "DefaultCPUAllocator: can't allocate memory")."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def adamw(params: Iterator[torch.nn.Parameter], tc: TrainConfig, lr: float | None = None) -> torch.optim.AdamW:
    """The training optimiser: AdamW at ``lr`` (default ``train.lr``) with ``train.weight_decay``, fused.

    Fused: one kernel over all parameters instead of a loop of small tensor operations, the same algorithm; on the
    default network the optimiser's step takes about a quarter of the time (6–8 ms instead of 29–34 on one CPU
    thread), and training makes about 5 % more steps a second (BENCHMARKS.md, twelfth pass). Where a device or a
    dtype has no fused kernel, the plain one.
    """
    params = list(params)
    lr = tc.lr if lr is None else lr
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=tc.weight_decay, fused=True)
    except RuntimeError as exc:  # "`fused=True` requires all the params to be floating point Tensors of supported …"
        log.info("fused AdamW unavailable (%s); the plain one", exc)
        return torch.optim.AdamW(params, lr=lr, weight_decay=tc.weight_decay)


def lr_factor(i: int, n: int) -> float:
    """Linear warm-up over the first steps of a stage, then cosine decay to 5 %."""
    warm = max(1, min(10, n // 10))
    if i < warm:
        return (i + 1) / warm
    progress = (i - warm) / max(1, n - warm)
    return 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def warm_start(model: SegModel, path: Path) -> None:
    """Load a previous version's weights: all of them for the same classes, else all but the class head."""
    try:
        ckpt = read_checkpoint(path)
    except CheckpointError as exc:
        log.warning("no warm start: %s", exc)
        return
    prev = model_config_of(ckpt)
    ours = model.mcfg
    if (prev.arch, prev.encoder, prev.decoder_channels, prev.proj_dim) != (
        ours.arch,
        ours.encoder,
        ours.decoder_channels,
        ours.proj_dim,
    ):
        log.warning(
            "no warm start: %s is %s/%s, this round trains %s/%s",
            path,
            prev.arch,
            prev.encoder,
            ours.arch,
            ours.encoder,
        )
        return
    same_classes = int(ckpt["num_classes"]) == model.num_classes
    own = model.state_dict()
    usable = {
        k: v
        for k, v in ckpt["model_state"].items()
        if k in own and own[k].shape == v.shape and (same_classes or not k.startswith("net.segmentation_head."))
    }
    model.load_state_dict(usable, strict=False)
    log.info(
        "warm start from %s: %d of %d tensors%s",
        path,
        len(usable),
        len(own),
        "" if same_classes else f" (class head reset: {ckpt['num_classes']} -> {model.num_classes} classes)",
    )


def _tail_mean(values: list[float]) -> float | None:
    return float(np.mean(values[-LOSS_WINDOW:])) if values else None


# ----------------------------------------------------------------------------------------------- budget


class Budget:
    """The steps of the two stages, fitted to a wall-clock cap as step times are measured: shrunk when the steps
    left would overrun it, grown back (up to the steps asked for) when a slow stretch has passed and the pace
    leaves time for more, so one slow minute does not shorten the round for good.

    Args:
        total: optimisation steps of the round (both stages).
        pretrain_fraction: share of them spent on contrastive pretraining.
        max_seconds: wall-clock cap of the round (0 = none), counted from ``start``.
        val_share: validation pixels per training-batch pixels (validation is reserved time at the end).
        start: ``time.monotonic()`` when the round began.
    """

    def __init__(self, total: int, pretrain_fraction: float, max_seconds: float, val_share: float, start: float):
        if total < 1:
            raise ValueError(f"a round needs at least one step, got {total}.")
        pre = min(round(total * pretrain_fraction), total - 1)
        self.planned = {PRETRAIN: pre, FINETUNE: total - pre}
        self.asked = dict(self.planned)  # the most each stage may grow back to
        self.done = {PRETRAIN: 0, FINETUNE: 0}
        self.step_times: dict[str, list[float]] = {PRETRAIN: [], FINETUNE: []}
        self.losses: dict[str, list[float]] = {PRETRAIN: [], FINETUNE: []}
        self.max_seconds = max_seconds
        self.deadline = start + max_seconds if max_seconds > 0 else math.inf
        self.val_share = val_share

    @property
    def steps_done(self) -> int:
        """Steps done in both stages."""
        return self.done[PRETRAIN] + self.done[FINETUNE]

    @property
    def steps_planned(self) -> int:
        """Steps planned in both stages (shrinks under a cap)."""
        return self.planned[PRETRAIN] + self.planned[FINETUNE]

    def finished(self, stage: str) -> bool:
        """Whether a stage has done its planned steps."""
        return self.done[stage] >= self.planned[stage]

    def step_time(self, stage: str) -> float:
        """Median recent step time of a stage (the first step pays for warm-up and is left out)."""
        times = self.step_times[stage][1:] or self.step_times[stage]
        if times:
            return statistics.median(times[-20:])
        other = self.step_times[PRETRAIN][1:] or self.step_times[PRETRAIN]
        return statistics.median(other[-20:]) * FT_COST_GUESS if other else 0.0

    def remaining_s(self) -> float:
        """Estimated seconds left: the planned steps, then validation (inference ~ a third of a training step)."""
        rest = sum((self.planned[s] - self.done[s]) * self.step_time(s) for s in (PRETRAIN, FINETUNE))
        return rest + self.val_share * self.step_time(FINETUNE) / 3.0

    def record(self, stage: str, loss: float, seconds: float) -> None:
        """Count one step of a stage, then fit the plan to the cap."""
        self.losses[stage].append(loss)
        self.done[stage] += 1
        self.step_times[stage].append(seconds)
        self._fit(stage)

    def _fit(self, stage: str) -> None:
        """Shrink the unfinished parts of both stages so the round ends before the deadline; when the plan needs
        less than ``GROW_BELOW`` of the time left, give fine-tuning back steps (never past what was asked), filling
        up to that share (the band between it and 1 keeps the plan from flapping)."""
        if math.isinf(self.deadline):
            return
        validation = self.val_share * self.step_time(FINETUNE) / 3.0
        left = self.deadline - time.monotonic() - 0.05 * self.max_seconds - validation
        if left <= 0:  # out of time: end pretraining, keep at most the fine-tuning step under way
            self.planned[PRETRAIN] = self.done[PRETRAIN]
            self.planned[FINETUNE] = max(self.done[FINETUNE], 1)
            return
        if len(self.step_times[stage]) < 3:  # too few steps measured to plan by
            return
        need = sum((self.planned[s] - self.done[s]) * self.step_time(s) for s in (PRETRAIN, FINETUNE))
        if need > left:
            f = left / need
            for s in (PRETRAIN, FINETUNE):
                self.planned[s] = self.done[s] + math.floor((self.planned[s] - self.done[s]) * f)
            self.planned[FINETUNE] = max(self.planned[FINETUNE], 1)
        elif need < GROW_BELOW * left and self.planned[FINETUNE] < self.asked[FINETUNE]:
            per_step = self.step_time(FINETUNE)
            if per_step > 0:
                more = math.floor((GROW_BELOW * left - need) / per_step)
                self.planned[FINETUNE] = min(self.asked[FINETUNE], self.planned[FINETUNE] + more)

    def log_stage(self, stage: str, seconds: float) -> None:
        """One log line about a finished stage."""
        if self.done[stage]:
            log.info(
                "%s: %d steps in %.1f s (%.2f s/step), loss %.4f",
                stage,
                self.done[stage],
                seconds,
                seconds / self.done[stage],
                _tail_mean(self.losses[stage]),
            )


class Reporter:
    """Calls ``progress`` with ``{"stage", "step", "total", "loss", "eta_s", "device"}`` at most every 0.5 s and
    at stage changes (``step`` counts both stages; ``loss`` is the newest step's, 0 before the first)."""

    def __init__(self, progress: Callable[[dict[str, Any]], None] | None, budget: Budget, device: str) -> None:
        self.progress = progress
        self.budget = budget
        self.device = device
        self.last = -math.inf

    def __call__(self, stage: str, force: bool = False) -> None:
        """Report where the round is, unless the last report was under 0.5 s ago (and not ``force``)."""
        now = time.monotonic()
        if self.progress is None or (not force and now - self.last < PROGRESS_EVERY_S):
            return
        self.last = now
        b = self.budget
        recent = b.losses.get(stage) or b.losses[FINETUNE] or b.losses[PRETRAIN]
        self.progress(
            {
                "stage": stage,
                "step": b.steps_done,
                "total": b.steps_planned,
                "loss": float(recent[-1]) if recent else 0.0,
                "eta_s": float(b.remaining_s()),
                "device": self.device,
            }
        )


# ------------------------------------------------------------------------------------------------ parts


Loaders = Callable[[int], tuple[Iterator[dict[str, Tensor]], Iterator[dict[str, Tensor]] | None]]


@dataclass
class _Training:
    """The parts of a round that its stages step through.

    ``loaders`` makes the endless labelled (and unlabelled) batches at a batch size; :meth:`rebatch` remakes them
    smaller after an out-of-memory step.
    """

    ctx: StepContext
    optimizer: torch.optim.Optimizer
    loaders: Loaders
    batch_size: int  # labelled crops per batch now
    batches: Iterator[dict[str, Tensor]]
    unlabelled: Iterator[dict[str, Tensor]] | None
    teacher: torch.nn.Module | None = None  # self-training's teacher: the network, or its moving average
    thresholds: PseudoThresholds | None = None  # self-training's per-class pseudo-label thresholds
    confident: list[float] = field(default_factory=list)  # share of unlabelled pixels made pseudo-labels, per step
    batch_cuts: int = 0  # times an out-of-memory step halved the batch

    def rebatch(self, batch_size: int) -> None:
        """Go on with ``batch_size`` crops per batch (the old loaders, and their workers, are dropped first)."""
        self.batches, self.unlabelled = iter(()), None
        self.batch_size = batch_size
        self.batches, self.unlabelled = self.loaders(batch_size)


def network_and_optimiser(
    cfg: Config,
    num_classes: int,
    device: torch.device,
    init_checkpoint: Path | None = None,
    memory_format: torch.memory_format | None = None,
    ce_weight: Tensor | None = None,
) -> tuple[StepContext, torch.optim.Optimizer]:
    """The network (warm-started from ``init_checkpoint`` if it exists and fits) on the device in train mode, its
    AdamW optimiser, and the step context every objective takes (autocast by ``train.precision``; channels-last on CUDA
    unless ``memory_format`` says otherwise). Rounds, self-supervised pretraining and ``bench train-speed`` all
    start here."""
    tc = cfg.train
    cuda = device.type == "cuda"
    if memory_format is None:
        memory_format = torch.channels_last if cuda else torch.contiguous_format
    model = build_model(cfg.model, num_classes)
    if init_checkpoint is not None and Path(init_checkpoint).is_file():
        warm_start(model, Path(init_checkpoint))
    model.to(device, memory_format=memory_format).train()
    optimizer = adamw(model.parameters(), tc)
    autocast = training_autocast(tc.precision, device)
    generator = torch.Generator().manual_seed(tc.seed)
    ctx = StepContext(model, tc, device, generator, memory_format, autocast, ce_weight, cfg.preprocess.std)
    return ctx, optimizer


def _prepare(cfg: Config, data: RoundData, device: torch.device, init_checkpoint: Path | None) -> _Training:
    """The data loaders, class weights, network (warm-started if it fits), optimiser and step context.

    The loaders come before the network: they draw their seeds from torch's generator first.
    """
    tc = cfg.train
    num_classes = len(data.classes)
    dataset = LabelledSet(data.train, cfg)
    loaders = _loaders(cfg, data, dataset, device)
    batch_size = crops_per_batch(tc)
    batches, unlabelled = loaders(batch_size)
    ce_weight: Tensor | None = None
    if tc.class_balance > 0:
        ce_weight = torch.from_numpy(class_weights(dataset.class_counts(num_classes), tc.class_balance)).to(device)
        log.info("class-balanced cross-entropy: weights %s", [round(float(w), 2) for w in ce_weight.cpu()])
    ctx, optimizer = network_and_optimiser(cfg, num_classes, device, init_checkpoint, ce_weight=ce_weight)
    model = ctx.model
    training = _Training(ctx, optimizer, loaders, batch_size, batches, unlabelled)
    if tc.unlabelled_weight > 0:
        training.thresholds = PseudoThresholds(
            num_classes, tc.pseudo_threshold, tc.pseudo_class_balance, tc.pseudo_min_threshold
        )
        training.teacher = model
        if tc.teacher_ema > 0:  # a mean teacher: the moving average of the weights and BatchNorm statistics
            ema = torch.optim.swa_utils.get_ema_multi_avg_fn(tc.teacher_ema)
            training.teacher = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=ema, use_buffers=True).eval()
    return training


def _round_metrics(data: RoundData, budget: Budget, training: _Training, val: dict[str, Any]) -> dict[str, Any]:
    """What a round records: losses, validation, images, steps per stage, class weights, pseudo-label use."""
    metrics = {
        "train_loss": _tail_mean(budget.losses[FINETUNE]),
        "contrastive_loss": _tail_mean(budget.losses[PRETRAIN]),
        **val,
        "val_images": len(data.val),
        "train_images": len(data.train),
        "pretrain_steps": budget.done[PRETRAIN],
        "finetune_steps": budget.done[FINETUNE],
        "batch_size": training.batch_size,
    }
    if training.batch_cuts:
        metrics["out_of_memory_retries"] = training.batch_cuts
    ce_weight = training.ctx.ce_weight
    if ce_weight is not None:
        metrics["class_weights"] = [round(float(w), 4) for w in ce_weight.cpu()]
    if training.ctx.tc.pseudo_weight > 0 or training.ctx.tc.unlabelled_weight > 0:
        metrics["pseudo_steps"] = len(training.confident)
        metrics["pseudo_confident_share"] = _tail_mean(training.confident)
    return metrics


def labelled_batches(
    dataset: LabelledSet, cfg: Config, device: torch.device, seed: int, batch_size: int, workers: int = 0
) -> Iterator[dict[str, Tensor]]:
    """Endless batches of ``batch_size`` augmented labelled crops for ``device``: made on the GPU from images
    uploaded once (:class:`DeviceBatches`) on CUDA with ``train.device_augment``, otherwise by a DataLoader over
    ``dataset`` in shuffled passes (``workers`` loader processes). Rounds and the continuous trainer both take
    their batches here."""
    if device.type == "cuda" and cfg.train.device_augment:
        return DeviceBatches(dataset.items, cfg, device, seed=seed).batches(batch_size)
    return endless_batches(dataset, seed, batch_size, workers, pin_memory=device.type == "cuda")


def endless_batches(
    dataset: torch.utils.data.Dataset, seed: int, batch_size: int, workers: int = 0, pin_memory: bool = False
) -> Iterator[dict[str, Tensor]]:
    """A DataLoader's endless batches over ``dataset`` in shuffled passes (:class:`EndlessSampler`)."""
    sampler = EndlessSampler(len(dataset), seed)  # type: ignore[arg-type]
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, pin_memory=pin_memory)
    return iter(loader)


def _loaders(cfg: Config, data: RoundData, dataset: LabelledSet, device: torch.device) -> Loaders:
    """A function of the batch size that gives endless batches of labelled crops, and of unlabelled crops when the
    semi-supervised or the self-training objective is on (the unlabelled images are read once, here): as many as
    the labelled ones for the first, half as many (at least two, for BatchNorm) for self-training. On CUDA with
    ``train.device_augment`` the labelled crops are made on the GPU (:class:`DeviceBatches`, the images uploaded
    once); otherwise, and for the unlabelled crops, by DataLoaders (with workers on CUDA)."""
    tc = cfg.train
    cuda = device.type == "cuda"
    workers = min(4, max(0, (os.cpu_count() or 1) - 1)) if cuda else 0
    pool: list[np.ndarray] = []
    if tc.pseudo_weight > 0 or tc.unlabelled_weight > 0:
        pool = data.unlabelled() if data.unlabelled is not None else []
        if pool:
            log.info("semi-supervised: %d unlabelled images", len(pool))
        else:
            log.info("semi-supervised objective off: every image of the project is labelled")
    unlabelled_set: UnlabelledSet | None = None
    if pool:
        unlabelled_set = WeakStrongSet(pool, cfg) if tc.unlabelled_weight > 0 else UnlabelledSet(pool, cfg)

    def make(batch_size: int) -> tuple[Iterator[dict[str, Tensor]], Iterator[dict[str, Tensor]] | None]:
        batches = labelled_batches(dataset, cfg, device, tc.seed, batch_size, workers)
        if unlabelled_set is None:
            return batches, None
        unlabelled_batch = max(2, batch_size // 2) if tc.unlabelled_weight > 0 else batch_size  # BatchNorm: >= 2
        return batches, endless_batches(unlabelled_set, tc.seed + 1, unlabelled_batch, workers, pin_memory=cuda)

    return make


def _step(stage: str, training: _Training, budget: Budget) -> Tensor:
    """The loss of one step of a stage, by the objective the configuration picks."""
    ctx, tc = training.ctx, training.ctx.tc
    batch = next(training.batches)
    if stage == PRETRAIN:
        return contrastive_step(ctx, batch)
    if tc.pseudo_weight > 0 or tc.unlabelled_weight > 0:
        use_pseudo = training.unlabelled is not None and budget.done[FINETUNE] >= round(
            budget.planned[FINETUNE] * tc.pseudo_after
        )
        ubatch = next(training.unlabelled) if use_pseudo and training.unlabelled is not None else None
        if training.teacher is not None and training.thresholds is not None:
            loss, share = self_training_step(ctx, batch, ubatch, training.teacher, training.thresholds)
        else:
            loss, share = semi_step(ctx, batch, ubatch)
        if share is not None:
            training.confident.append(share)
        return loss
    if tc.contrastive_weight > 0:
        return joint_step(ctx, batch)
    return finetune_step(ctx, batch)


def _out_of_memory(
    training: _Training, stage: str, step: int, version: int, notify: Callable[[str], None] | None
) -> None:
    """After a step that ran out of memory (its tensors already released): free the gradients and the CUDA cache,
    and go on with half the batch; at the smallest batch the round fails with what to change."""
    ctx, n = training.ctx, training.batch_size
    training.optimizer.zero_grad(set_to_none=True)
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()
    smallest = crops_per_batch(ctx.tc, 1)
    if n <= smallest:
        raise RoundFailed(
            f"round v{version}: out of memory at batch {n} in {stage} step {step}, the smallest batch this round "
            f"trains with; nothing was saved. Lower train.crop (now {ctx.tc.crop}, LABELSMART_TRAIN_CROP) or "
            "preprocess.max_side (LABELSMART_PREPROCESS_MAX_SIDE), or train on a machine with more memory."
        )
    smaller = max(smallest, n // 2)
    msg = f"out of memory at batch {n}; retrying with batch {smaller}"
    log.warning("round v%d, %s step %d: %s", version, stage, step, msg)
    if notify is not None:
        notify(msg)
    training.batch_cuts += 1
    training.rebatch(smaller)


def _train_stages(
    training: _Training,
    budget: Budget,
    report: Reporter,
    version: int,
    should_stop: Callable[[], bool] | None,
    notify: Callable[[str], None] | None = None,
) -> None:
    """Pretraining (if planned), then fine-tuning, one optimiser step at a time, until the budget is spent.

    A step that runs out of memory is not counted: it is retried with half the batch (:func:`_out_of_memory`).
    """
    tc = training.ctx.tc
    stage = PRETRAIN if budget.planned[PRETRAIN] > 0 else FINETUNE
    report(stage, force=True)
    stage_start = time.monotonic()
    while True:
        if stage == PRETRAIN and budget.finished(PRETRAIN):
            budget.log_stage(PRETRAIN, time.monotonic() - stage_start)
            stage, stage_start = FINETUNE, time.monotonic()
            # fresh moments: the contrastive stage's gradient statistics do not describe the CE loss
            training.optimizer = adamw(training.ctx.model.parameters(), tc)
            report(stage, force=True)
        if stage == FINETUNE and budget.finished(FINETUNE):
            break
        if should_stop is not None and should_stop():
            raise RoundCancelled(f"round v{version} cancelled at step {budget.steps_done}.")
        t0 = time.monotonic()
        for group in training.optimizer.param_groups:
            group["lr"] = tc.lr * lr_factor(budget.done[stage], budget.planned[stage])
        try:
            loss = _step(stage, training, budget)
            finite = bool(torch.isfinite(loss.detach()))
            if finite:  # a NaN would spread into every weight; stop before it does
                training.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                training.optimizer.step()
                if isinstance(training.teacher, torch.optim.swa_utils.AveragedModel):
                    training.teacher.update_parameters(training.ctx.model)
        except RuntimeError as exc:
            if not is_out_of_memory(exc):
                raise
            out_of_memory = True  # handled below, once the exception and the tensors its frames hold are gone
        else:
            out_of_memory = False
        if out_of_memory:
            loss = None
            _out_of_memory(training, stage, budget.steps_done + 1, version, notify)
            continue
        if not finite:
            raise RoundFailed(
                f"round v{version}: the {stage} loss became {float(loss.detach())} at step {budget.steps_done + 1}; "
                "nothing was saved. Lower train.lr (LABELSMART_TRAIN_LR) or check the labels."
            )
        budget.record(stage, float(loss.detach()), time.monotonic() - t0)
        report(stage)
    budget.log_stage(FINETUNE, time.monotonic() - stage_start)


# ------------------------------------------------------------------------------------------------ round


def run_round(
    cfg: Config,
    data: RoundData,
    version: int,
    init_checkpoint: Path | None = None,
    steps: int | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    notify: Callable[[str], None] | None = None,
) -> RoundResult:
    """Train one version on labelled images.

    Args:
        cfg: configuration (``model``, ``preprocess``, ``train`` sections).
        data: the labelled (and unlabelled) images and the classes.
        version: version number the result (and its checkpoint) carries.
        init_checkpoint: previous version to warm-start from, if it exists and fits.
        steps: total optimisation steps (``cfg.train.steps`` when None); shrunk to fit
            ``cfg.train.max_round_seconds`` when that is set.
        progress: called at most every 0.5 s and at stage changes (see :class:`Reporter`).
        should_stop: polled every step; True raises :class:`RoundCancelled`.
        notify: called with a sentence for the user when the round changes course (a step that ran out of memory,
            retried with half the batch: "out of memory at batch 8; retrying with batch 4").

    Returns:
        The trained network with its steps, wall time, device and metrics; :meth:`RoundResult.save` writes it.

    Raises:
        RoundCancelled: ``should_stop()`` returned True.
        RoundFailed: the loss stopped being finite (NaN or infinity; the weights were not stepped with it), or a
            step ran out of memory at the smallest batch (two crops, or one crop's two views).
        ValueError: no classes, no labelled images or a bad setting.
    """
    t_start = time.monotonic()
    tc = cfg.train
    if tc.crop % 32:
        raise ValueError(f"train.crop is {tc.crop}; set it to a multiple of 32 (the network's stride).")
    if tc.pseudo_weight > 0 and tc.unlabelled_weight > 0:
        raise ValueError(
            "train.pseudo_weight and train.unlabelled_weight are both set; pick one way to learn from unlabelled "
            "images (set the other to 0)."
        )
    if not data.classes:
        raise ValueError("the project has no classes; add classes before training.")
    if not data.train:
        raise ValueError("the round has no labelled images; label at least one image before training.")
    device = resolve_device(tc.device)
    torch.set_num_threads(tc.threads or os.cpu_count() or 1)
    torch.manual_seed(tc.seed)
    num_classes = len(data.classes)
    log.info("round v%d: %d training, %d validation images, device %s", version, len(data.train), len(data.val), device)

    training = _prepare(cfg, data, device, init_checkpoint)
    model = training.ctx.model

    # budget, stages
    val_work = sum(math.prod(imageio.working_size(*img.shape[:2], cfg.preprocess.max_side)) for img, _ in data.val)
    val_share = val_work / (crops_per_batch(tc) * tc.crop * tc.crop)  # validation pixels per batch pixels
    budget = Budget(
        steps if steps is not None else tc.steps, tc.pretrain_fraction, tc.max_round_seconds, val_share, t_start
    )
    report = Reporter(progress, budget, device.type)
    _train_stages(training, budget, report, version, should_stop, notify)
    del training.batches, training.unlabelled  # stops loader workers

    # validation, through the predictor's preprocessing path
    val: dict[str, Any] = {"val_miou": None, "val_per_class_iou": None, "val_pixel_acc": None}
    if data.val:
        report(VALIDATE, force=True)
        t0 = time.monotonic()
        val = validate(model, data.val, cfg, num_classes, device)
        log.info("validation: mIoU %.3f on %d images in %.1f s", val["val_miou"], len(data.val), time.monotonic() - t0)

    metrics = _round_metrics(data, budget, training, val)
    seconds = time.monotonic() - t_start
    log.info("round v%d done: %d steps in %.1f s on %s", version, budget.steps_done, seconds, device)
    classes = [
        {"id": int(c["id"]), "name": str(c["name"]), "color": [int(v) for v in c["color"]]} for c in data.classes
    ]
    return RoundResult(model, cfg, classes, version, budget.steps_done, seconds, device.type, metrics)
