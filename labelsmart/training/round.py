"""One training round: (optional contrastive pretraining) -> cross-entropy fine-tuning -> validation -> checkpoint.

Read top to bottom: :func:`run_round` loads a label snapshot, splits off validation images, builds (or
warm-starts) the network, runs the two stages inside an optional wall-clock budget, validates through the
predictor's own preprocessing path and writes ``model.pt``. Any error propagates to the caller, which
records it; a cancel request raises :class:`RoundCancelled`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Sampler

from labelsmart import imageio, metrics
from labelsmart.config import IGNORE_INDEX, Config, PreprocessConfig, TrainConfig
from labelsmart.store import Snapshot, Store
from labelsmart.training.data import LabelledSet, UnlabelledSet, load_snapshot
from labelsmart.training.losses import (
    class_weights,
    masked_cross_entropy,
    sample_pixels,
    supervised_pixel_contrastive_loss,
)
from labelsmart.training.model import (
    CheckpointError,
    SegModel,
    build_model,
    model_config_of,
    read_checkpoint,
    save_checkpoint,
)

log = logging.getLogger(__name__)

PRETRAIN, FINETUNE, VALIDATE = "pretraining", "fine-tuning", "validating"
PROGRESS_EVERY_S = 0.5
MAX_CONTRASTIVE_SAMPLES = 1024  # per view; bounds the (2N, 2N) similarity matrix (its cost grows as N^2)
FT_COST_GUESS = 0.5  # fine-tuning step time / pretraining step time, until measured
LOSS_WINDOW = 20  # reported losses are means over the last steps of a stage


class RoundCancelled(RuntimeError):
    """``should_stop()`` asked the round to stop; nothing was saved."""


@dataclass
class RoundResult:
    """What a finished round produced."""

    checkpoint: Path
    version: int
    steps: int  # optimisation steps done (both stages)
    seconds: float  # wall time of the whole round
    device: str
    metrics: dict[str, Any]


# ---------------------------------------------------------------------------------------------- helpers


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("train.device is cuda but no CUDA GPU is visible; use --device cpu or auto.")
    return torch.device(name)


def split_validation(image_ids: list[int], tc: TrainConfig) -> tuple[list[int], list[int]]:
    """``(train ids, validation ids)``: every ``val_every``-th image by id, once ``val_min_images`` are labelled."""
    ids = sorted(image_ids)
    if len(ids) < tc.val_min_images or tc.val_every < 2:
        return ids, []
    val = [i for k, i in enumerate(ids) if k % tc.val_every == tc.val_every - 1]
    held = set(val)
    return [i for i in ids if i not in held], val


class _EndlessSampler(Sampler[int]):
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


def _lr_factor(i: int, n: int) -> float:
    """Linear warm-up over the first steps of a stage, then cosine decay to 5 %."""
    warm = max(1, min(10, n // 10))
    if i < warm:
        return (i + 1) / warm
    progress = (i - warm) / max(1, n - warm)
    return 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _sample_features(feats: Tensor, b_idx: Tensor, y: Tensor, x: Tensor, label_hw: tuple[int, int]) -> Tensor:
    """Bilinear features at label-resolution pixels, as ``F.interpolate(align_corners=False)`` would give.

    Args:
        feats: ``(B, C, h, w)`` features at reduced resolution.
        b_idx, y, x: ``(N,)`` image index and pixel coordinates at label resolution ``label_hw``.

    Returns:
        ``(N, C)``.
    """
    _, _, h, w = feats.shape
    fy = ((y.float() + 0.5) * (h / label_hw[0]) - 0.5).clamp(0, h - 1)  # (N,)
    fx = ((x.float() + 0.5) * (w / label_hw[1]) - 0.5).clamp(0, w - 1)  # (N,)
    y0, x0 = fy.floor().long(), fx.floor().long()
    y1, x1 = (y0 + 1).clamp(max=h - 1), (x0 + 1).clamp(max=w - 1)
    wy, wx = (fy - y0).unsqueeze(1), (fx - x0).unsqueeze(1)  # (N, 1)
    f = feats.permute(0, 2, 3, 1)  # (B, h, w, C)
    top = f[b_idx, y0, x0] * (1 - wx) + f[b_idx, y0, x1] * wx  # (N, C)
    bottom = f[b_idx, y1, x0] * (1 - wx) + f[b_idx, y1, x1] * wx  # (N, C)
    return top * (1 - wy) + bottom * wy  # (N, C)


def unlabelled_images(store: Store, labelled: set[int], limit: int, seed: int) -> list[np.ndarray]:
    """Up to ``limit`` project images with no labels (a seeded draw, in path order), read at full size.

    An image that cannot be read is skipped with a warning: it costs the round one unlabelled crop source,
    not the round.
    """
    ids = [row.id for row in store.images() if row.id not in labelled and row.labelled_pixels == 0]
    if len(ids) > limit:
        ids = sorted(np.random.default_rng(seed).choice(ids, size=limit, replace=False).tolist())
    images = []
    for image_id in ids:
        try:
            images.append(store.read_image(image_id))
        except (imageio.ImageError, OSError) as exc:
            log.warning("unlabelled image %d skipped: %s", image_id, exc)
    return images


def _warm_start(model: SegModel, path: Path) -> None:
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


# ------------------------------------------------------------------------------------------------ round


def run_round(
    cfg: Config,
    store: Store,
    snapshot: Snapshot,
    version: int,
    out_dir: Path,
    init_checkpoint: Path | None = None,
    steps: int | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> RoundResult:
    """Train one version on a label snapshot and save ``out_dir / "model.pt"``.

    Args:
        cfg: configuration (``model``, ``preprocess``, ``train`` sections).
        store: project store (classes, images, label revisions).
        snapshot: the labels this round learns from.
        version: version number written into the checkpoint.
        out_dir: folder of the checkpoint (created).
        init_checkpoint: previous version to warm-start from, if it exists and fits.
        steps: total optimisation steps (``cfg.train.steps`` when None); shrunk to fit
            ``cfg.train.max_round_seconds`` when that is set.
        progress: called at most every 0.5 s and at stage changes with ``{"stage", "step", "total",
            "loss", "eta_s", "device"}`` (``step`` counts both stages; ``loss`` is the newest step's).
        should_stop: polled every step; True raises :class:`RoundCancelled`.

    Returns:
        The checkpoint path, steps done, wall time, device and metrics.

    Raises:
        RoundCancelled: ``should_stop()`` returned True.
        ValueError: no classes or no labelled images.
    """
    t_start = time.monotonic()
    tc = cfg.train
    if tc.crop % 32:
        raise ValueError(f"train.crop is {tc.crop}; set it to a multiple of 32 (the network's stride).")
    device = resolve_device(tc.device)
    torch.set_num_threads(tc.threads or os.cpu_count() or 1)
    torch.manual_seed(tc.seed)
    cuda = device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    memory_format = torch.channels_last if cuda else torch.contiguous_format
    deadline = t_start + tc.max_round_seconds if tc.max_round_seconds > 0 else math.inf

    # ---- data
    classes = store.classes()
    num_classes = len(classes)
    if num_classes == 0:
        raise ValueError("the project has no classes; add classes before training.")
    ids = [image_id for image_id, _ in snapshot.revisions]
    if not ids:
        raise ValueError("the snapshot has no labelled images; label at least one image before training.")
    train_ids, val_ids = split_validation(ids, tc)
    by_id = dict(zip(ids, load_snapshot(store, snapshot), strict=True))
    dataset = LabelledSet([by_id[i] for i in train_ids], cfg)
    val_pairs = [by_id[i] for i in val_ids]
    del by_id
    batch_size = max(2, tc.batch_size)  # BatchNorm after global pooling (ASPP) needs two samples
    joint = tc.contrastive_weight > 0
    semi = tc.pseudo_weight > 0
    if joint or semi:  # two views of half the crops: a joint step sees batch_size images, as a CE step does
        batch_size = max(1, batch_size // 2)
    workers = min(4, max(0, (os.cpu_count() or 1) - 1)) if cuda else 0
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=_EndlessSampler(len(dataset), tc.seed),
        num_workers=workers,
        pin_memory=cuda,
    )
    batches = iter(loader)
    unlabelled: Iterator[dict[str, Tensor]] | None = None
    if semi:
        pool = unlabelled_images(store, set(ids), tc.unlabelled_images, tc.seed)
        if pool:
            unlabelled = iter(
                DataLoader(
                    UnlabelledSet(pool, cfg),
                    batch_size=batch_size,
                    sampler=_EndlessSampler(len(pool), tc.seed + 1),
                    num_workers=workers,
                    pin_memory=cuda,
                )
            )
            log.info("semi-supervised: %d unlabelled images", len(pool))
        else:
            log.info("semi-supervised objective off: every image of the project is labelled")
        del pool
    confident: list[float] = []  # share of unlabelled pixels confident enough to be pseudo-labels, per step
    log.info("round v%d: %d training, %d validation images, device %s", version, len(train_ids), len(val_ids), device)

    ce_weight: Tensor | None = None
    if tc.class_balance > 0:
        ce_weight = torch.from_numpy(class_weights(dataset.class_counts(num_classes), tc.class_balance)).to(device)
        log.info("class-balanced cross-entropy: weights %s", [round(float(w), 2) for w in ce_weight.cpu()])

    # ---- model
    model = build_model(cfg.model, num_classes)
    if init_checkpoint is not None and Path(init_checkpoint).is_file():
        _warm_start(model, Path(init_checkpoint))
    model.to(device, memory_format=memory_format).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    generator = torch.Generator().manual_seed(tc.seed)

    # ---- plan
    total = steps if steps is not None else tc.steps
    if total < 1:
        raise ValueError(f"a round needs at least one step, got {total}.")
    planned = {PRETRAIN: min(round(total * tc.pretrain_fraction), total - 1), FINETUNE: 0}
    planned[FINETUNE] = total - planned[PRETRAIN]
    done = {PRETRAIN: 0, FINETUNE: 0}
    step_times: dict[str, list[float]] = {PRETRAIN: [], FINETUNE: []}
    losses: dict[str, list[float]] = {PRETRAIN: [], FINETUNE: []}
    val_work = sum(math.prod(imageio.working_size(*img.shape[:2], cfg.preprocess.max_side)) for img, _ in val_pairs)
    val_share = val_work / (batch_size * tc.crop * tc.crop)  # validation pixels per training-batch pixels
    last_report = -math.inf
    stage = PRETRAIN if planned[PRETRAIN] > 0 else FINETUNE

    def step_time(name: str) -> float:
        times = step_times[name][1:] or step_times[name]  # the first step pays for warm-up
        if times:
            return statistics.median(times[-20:])
        other = step_times[PRETRAIN][1:] or step_times[PRETRAIN]
        return statistics.median(other[-20:]) * FT_COST_GUESS if other else 0.0

    def remaining_s() -> float:
        rest = sum((planned[s] - done[s]) * step_time(s) for s in (PRETRAIN, FINETUNE))
        return rest + val_share * step_time(FINETUNE) / 3.0  # inference ~ a third of a training step

    def report(force: bool = False) -> None:
        nonlocal last_report
        now = time.monotonic()
        if progress is None or (not force and now - last_report < PROGRESS_EVERY_S):
            return
        last_report = now
        recent = losses[stage] if stage in losses and losses[stage] else losses[FINETUNE] or losses[PRETRAIN]
        progress(
            {
                "stage": stage,
                "step": done[PRETRAIN] + done[FINETUNE],
                "total": planned[PRETRAIN] + planned[FINETUNE],
                "loss": float(recent[-1]) if recent else 0.0,  # 0 before the first step
                "eta_s": float(remaining_s()),
                "device": device.type,
            }
        )

    def fit_budget() -> None:
        """Shrink the unfinished parts of both stages so the round ends before the deadline."""
        if math.isinf(deadline):
            return
        left = deadline - time.monotonic() - 0.05 * tc.max_round_seconds - val_share * step_time(FINETUNE) / 3.0
        if left <= 0:  # out of time: end pretraining, keep at most the fine-tuning step under way
            planned[PRETRAIN] = done[PRETRAIN]
            planned[FINETUNE] = max(done[FINETUNE], 1)
            return
        if len(step_times[stage]) < 3:  # too few steps measured to plan by
            return
        need = sum((planned[s] - done[s]) * step_time(s) for s in (PRETRAIN, FINETUNE))
        if need > left:
            f = left / need
            for s in (PRETRAIN, FINETUNE):
                planned[s] = done[s] + math.floor((planned[s] - done[s]) * f)
            planned[FINETUNE] = max(planned[FINETUNE], 1)

    # ---- stages 1 and 2
    report(force=True)
    stage_start = time.monotonic()
    while True:
        if stage == PRETRAIN and done[PRETRAIN] >= planned[PRETRAIN]:
            _log_stage(PRETRAIN, done, losses, time.monotonic() - stage_start)
            stage, stage_start = FINETUNE, time.monotonic()
            # fresh moments: the contrastive stage's gradient statistics do not describe the CE loss
            optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
            report(force=True)
        if stage == FINETUNE and done[FINETUNE] >= planned[FINETUNE]:
            break
        if should_stop is not None and should_stop():
            raise RoundCancelled(f"round v{version} cancelled at step {done[PRETRAIN] + done[FINETUNE]}.")
        t0 = time.monotonic()
        batch = next(batches)
        for group in optimizer.param_groups:
            group["lr"] = tc.lr * _lr_factor(done[stage], planned[stage])
        if stage == PRETRAIN:
            loss = _contrastive_step(model, batch, tc, generator, device, memory_format, autocast)
        elif semi:
            use_pseudo = unlabelled is not None and done[FINETUNE] >= round(planned[FINETUNE] * tc.pseudo_after)
            ubatch = next(unlabelled) if use_pseudo and unlabelled is not None else None
            loss, share = _semi_step(model, batch, ubatch, tc, generator, device, memory_format, autocast, ce_weight)
            if share is not None:
                confident.append(share)
        else:
            loss = (
                _joint_step(model, batch, tc, generator, device, memory_format, autocast, ce_weight)
                if joint
                else _finetune_step(model, batch, device, memory_format, autocast, ce_weight)
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses[stage].append(float(loss.detach()))
        done[stage] += 1
        step_times[stage].append(time.monotonic() - t0)
        fit_budget()
        report()
    _log_stage(FINETUNE, done, losses, time.monotonic() - stage_start)
    del batches, unlabelled  # stops loader workers

    # ---- validation, through the predictor's preprocessing path
    val: dict[str, Any] = {"val_miou": None, "val_per_class_iou": None, "val_pixel_acc": None}
    if val_pairs:
        stage = VALIDATE
        report(force=True)
        t0 = time.monotonic()
        val = validate(model, val_pairs, cfg, num_classes, device)
        log.info("validation: mIoU %.3f on %d images in %.1f s", val["val_miou"], len(val_pairs), time.monotonic() - t0)

    def tail_mean(values: list[float]) -> float | None:
        return float(np.mean(values[-LOSS_WINDOW:])) if values else None

    n_steps = done[PRETRAIN] + done[FINETUNE]
    round_metrics = {
        "train_loss": tail_mean(losses[FINETUNE]),
        "contrastive_loss": tail_mean(losses[PRETRAIN]),
        **val,
        "val_images": len(val_pairs),
        "train_images": len(train_ids),
        "pretrain_steps": done[PRETRAIN],
        "finetune_steps": done[FINETUNE],
    }
    if ce_weight is not None:
        round_metrics["class_weights"] = [round(float(w), 4) for w in ce_weight.cpu()]
    if semi:
        round_metrics["pseudo_steps"] = len(confident)
        round_metrics["pseudo_confident_share"] = tail_mean(confident)
    path = Path(out_dir) / "model.pt"
    class_dicts = [{"id": c.id, "name": c.name, "color": list(c.color)} for c in classes]
    save_checkpoint(path, model, cfg, class_dicts, version, n_steps, round_metrics)
    seconds = time.monotonic() - t_start
    log.info("round v%d done: %d steps in %.1f s on %s", version, n_steps, seconds, device)
    return RoundResult(path, version, n_steps, seconds, device.type, round_metrics)


def _log_stage(name: str, done: dict[str, int], losses: dict[str, list[float]], seconds: float) -> None:
    if done[name]:
        tail = float(np.mean(losses[name][-LOSS_WINDOW:]))
        log.info(
            "%s: %d steps in %.1f s (%.2f s/step), loss %.4f", name, done[name], seconds, seconds / done[name], tail
        )


def _contrastive_loss(
    model: SegModel, feats: Tensor, label: Tensor, tc: TrainConfig, generator: torch.Generator, device: torch.device
) -> Tensor:
    """Supervised pixel contrastive loss of the features of two views; positives across views and images.

    Args:
        feats: ``(2B, C, h, w)``: view 1 of the B crops, then view 2.
        label: ``(B, c, c)`` labels of the crops (CPU), 255 = unlabelled.
    """
    b = label.shape[0]
    b_idx, y, x, cls = sample_pixels(label, tc.pixels_per_class, generator=generator)  # (N,) each
    if b_idx.numel() > MAX_CONTRASTIVE_SAMPLES:
        keep = torch.randperm(b_idx.numel(), generator=generator)[:MAX_CONTRASTIVE_SAMPLES]
        b_idx, y, x, cls = b_idx[keep], y[keep], x[keep], cls[keep]
    b_idx, y, x = b_idx.to(device), y.to(device), x.to(device)
    both = torch.cat([b_idx, b_idx + b])  # (2N,) same pixel in view 1 and view 2
    picked = _sample_features(feats, both, torch.cat([y, y]), torch.cat([x, x]), tuple(label.shape[1:]))  # (2N, C)
    emb = model.project(picked[:, :, None, None]).flatten(1)  # (2N, D)
    with torch.autocast(device.type, enabled=False):  # similarities / temperature need float32, not bf16
        return supervised_pixel_contrastive_loss(emb.float(), torch.cat([cls, cls]).to(device), tc.temperature)


def _contrastive_step(
    model: SegModel,
    batch: dict[str, Tensor],
    tc: TrainConfig,
    generator: torch.Generator,
    device: torch.device,
    memory_format: torch.memory_format,
    autocast: contextlib.AbstractContextManager,
) -> Tensor:
    """Supervised pixel contrastive loss over both views; positives across views and images."""
    views = torch.cat([batch["view1"], batch["view2"]])  # (2B, 3, c, c)
    views = views.to(device, non_blocking=True).contiguous(memory_format=memory_format)
    with autocast:
        feats = model.forward_features(views)  # (2B, C, h, w)
        return _contrastive_loss(model, feats, batch["label"], tc, generator, device)


def _joint_step(
    model: SegModel,
    batch: dict[str, Tensor],
    tc: TrainConfig,
    generator: torch.Generator,
    device: torch.device,
    memory_format: torch.memory_format,
    autocast: contextlib.AbstractContextManager,
    ce_weight: Tensor | None = None,
) -> Tensor:
    """Cross-entropy on both views plus ``contrastive_weight`` x the pixel contrastive loss, one forward pass."""
    label = batch["label"]  # (B, c, c)
    views = torch.cat([batch["view1"], batch["view2"]])  # (2B, 3, c, c)
    views = views.to(device, non_blocking=True).contiguous(memory_format=memory_format)
    target = torch.cat([label, label]).to(device, non_blocking=True)  # (2B, c, c)
    with autocast:
        feats = model.forward_features(views)  # (2B, C, h, w)
        logits = model.forward_head(feats)  # (2B, K, c, c)
        contrastive = _contrastive_loss(model, feats, label, tc, generator, device)
    return masked_cross_entropy(logits.float(), target, weight=ce_weight) + tc.contrastive_weight * contrastive


def _semi_step(
    model: SegModel,
    batch: dict[str, Tensor],
    ubatch: dict[str, Tensor] | None,
    tc: TrainConfig,
    generator: torch.Generator,
    device: torch.device,
    memory_format: torch.memory_format,
    autocast: contextlib.AbstractContextManager,
    ce_weight: Tensor | None = None,
) -> tuple[Tensor, float | None]:
    """The semi-supervised joint step: CE on both views of the labelled crops plus ``pseudo_weight`` x the
    pixel contrastive loss over labelled pixels and confident pseudo-labels of the unlabelled crops, one
    forward pass. Without ``ubatch`` (the CE warm-up that makes the pseudo-labels worth having) only the CE.

    Returns:
        The loss and the share of unlabelled pixels that became pseudo-labels (None without ``ubatch``).
    """
    label = batch["label"]  # (Bl, c, c)
    bl = label.shape[0]
    if ubatch is None:
        parts = [batch["view1"], batch["view2"]]
    else:  # view 1 of every crop, then view 2, the order _contrastive_loss pairs by
        parts = [batch["view1"], ubatch["view1"], batch["view2"], ubatch["view2"]]
    views = torch.cat(parts).to(device, non_blocking=True).contiguous(memory_format=memory_format)
    b = views.shape[0] // 2  # crops per view
    target = label.to(device, non_blocking=True)  # (Bl, c, c)
    with autocast:
        feats = model.forward_features(views)  # (2b, C, h, w)
        logits = model.forward_head(feats)  # (2b, K, c, c)
    ce = masked_cross_entropy(logits[:bl].float(), target, weight=ce_weight) + masked_cross_entropy(
        logits[b : b + bl].float(), target, weight=ce_weight
    )
    if ubatch is None:
        return ce / 2.0, None
    with torch.no_grad():  # the two views of a crop agree on its pseudo-labels (mean probability)
        prob = (logits[bl:b].float().softmax(1) + logits[b + bl :].float().softmax(1)) / 2.0  # (Bu, K, c, c)
        conf, pseudo = prob.max(1)  # (Bu, c, c)
        keep = conf >= tc.pseudo_threshold
        pseudo = torch.where(keep, pseudo, torch.full_like(pseudo, IGNORE_INDEX))
        share = float(keep.float().mean())
    label_all = torch.cat([label, pseudo.cpu().to(label.dtype)])  # (b, c, c), on the CPU for the sampler
    with autocast:
        contrastive = _contrastive_loss(model, feats, label_all, tc, generator, device)
    return ce / 2.0 + tc.pseudo_weight * contrastive, share


def _finetune_step(
    model: SegModel,
    batch: dict[str, Tensor],
    device: torch.device,
    memory_format: torch.memory_format,
    autocast: contextlib.AbstractContextManager,
    ce_weight: Tensor | None = None,
) -> Tensor:
    """Masked cross-entropy on view 1 (255 ignored), class-weighted when ``ce_weight`` is given."""
    x = batch["view1"].to(device, non_blocking=True).contiguous(memory_format=memory_format)  # (B, 3, c, c)
    target = batch["label"].to(device, non_blocking=True)  # (B, c, c)
    with autocast:
        logits = model(x)  # (B, K, c, c)
    return masked_cross_entropy(logits.float(), target, weight=ce_weight)


def ce_only(tc: TrainConfig) -> TrainConfig:
    """Plain cross-entropy, the baseline of the benchmarks: the same round with every contrastive part and the
    class balancing switched off."""
    return dataclasses.replace(tc, pretrain_fraction=0.0, contrastive_weight=0.0, pseudo_weight=0.0, class_balance=0.0)


@torch.inference_mode()
def predict_mask(model: SegModel, image: np.ndarray, pp: PreprocessConfig, device: torch.device) -> np.ndarray:
    """Class ids ``(H, W)`` of an RGB uint8 image, made exactly as the predictor makes them (prepare -> model ->
    logits_to_mask); the model must be in eval mode."""
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    x, meta = imageio.prepare(image, pp)  # (3, Hp, Wp)
    with autocast:
        logits = model(torch.from_numpy(x)[None].to(device))  # (1, K, Hp, Wp)
    mask, _ = imageio.logits_to_mask(logits[0].float().cpu().numpy(), meta)  # (H, W)
    return mask


@torch.inference_mode()
def validate(
    model: SegModel, pairs: list[tuple[np.ndarray, np.ndarray]], cfg: Config, num_classes: int, device: torch.device
) -> dict[str, Any]:
    """mIoU of full-size predictions made exactly as the predictor makes them (:func:`predict_mask`).

    Returns:
        ``{"val_miou", "val_per_class_iou", "val_pixel_acc"}``.
    """
    was_training = model.training
    model.eval()
    conf = np.zeros((num_classes, num_classes), dtype=np.int64)
    for image, label in pairs:
        conf += metrics.confusion_matrix(label, predict_mask(model, image, cfg.preprocess, device), num_classes)
    model.train(was_training)
    s = metrics.scores(conf)
    return {"val_miou": s["miou"], "val_per_class_iou": s["per_class_iou"], "val_pixel_acc": s["pixel_acc"]}
