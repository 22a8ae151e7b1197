"""The continuous trainer (the default background trainer): one network, one optimiser, training without a pause
while there are labels to learn from, publishing what it has learnt as it goes.

Read top to bottom:

- :class:`LabelPool` holds the labelled images at working scale and takes in new saves: every poll it compares the
  store's snapshot with what it holds, and reads only the images whose revision changed. A save joins the
  training set at the next poll (``trigger.poll_s``, default 1 s), without restarting anything. Validation images
  are held out by a rule that does not move as images are labelled (:func:`held_out`).
- :class:`Ema` is an exponential moving average of the weights; it is what gets published (training itself runs at a
  constant learning rate after a short warm-up, a schedule made for a run with no planned end).
- :class:`OnnxTemplate` exports the network's graph once per set of classes, before the first label arrives; each
  version after that writes the same graph with its own weights from the publisher thread (where tracing beside
  training would not be safe), and the parity check against PyTorch still runs on every file.
- :class:`Publisher` is the thread that turns a candidate (a copy of the averaged weights and the labels it has
  seen) into a published version: it scores the candidate and the served version on the held-out labels and
  publishes only a candidate that is not worse (``trigger.publish_tolerance``), so an annotator never sees a
  regression; then it builds the files in a hidden folder and publishes them with one rename, as rounds do.
- :class:`Scorer` is the thread that scores unlabelled images with the newest version for "Next", on one thread.
- :class:`ContinuousTrainer` is the loop: absorb saves, train a slice of steps, decide whether to publish, go idle
  when nothing is left to learn (``trigger.idle_after_s`` without new labels or a better held-out score).

The round-based trainer (:class:`~labelsmart.training.trainer.TrainerLoop`) stays reachable with
``trigger.mode = "rounds"``; ``python -m labelsmart train`` runs one round either way.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import os
import queue
import shutil
import tempfile
import threading
import time
import traceback
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from labelsmart import imageio
from labelsmart.config import IGNORE_INDEX, Config
from labelsmart.store import ModelRow, Snapshot, Store
from labelsmart.store.registry import CHECKPOINT_NAME, ONNX_NAME, version_dir
from labelsmart.training.data import LabelledSet
from labelsmart.training.losses import class_weights
from labelsmart.training.model import SegModel, build_model, read_checkpoint, save_checkpoint
from labelsmart.training.objectives import StepContext, finetune_step, joint_step
from labelsmart.training.round import (
    adamw,
    crops_per_batch,
    is_out_of_memory,
    labelled_batches,
    network_and_optimiser,
    resolve_device,
    warm_start,
)
from labelsmart.training.trainer import TrainerLoop, publish_version
from labelsmart.training.validation import validate

log = logging.getLogger(__name__)

Pair = tuple[np.ndarray, np.ndarray]  # (image RGB uint8 (H, W, 3), mask uint8 (H, W), 255 = unlabelled)
SLICE_S = 1.0  # training runs in slices of about this long between polls of the store
WARMUP_STEPS = 10  # linear learning-rate warm-up, then constant
EMA_RESTART = 20  # the average's step count after new labels: it follows the network closely for a while
SCORE_DUTY = 3.0  # the scorer rests this many times as long as its last pass took
MAX_BAD_STEPS = 3  # non-finite losses in a row before the network restarts from its average


def held_out(image_id: int, val_every: int) -> bool:
    """Whether an image is a validation image: a hash of its id, so an image stays on its side as others are
    labelled (the round trainer's every-n-th-by-id rule moves images between the sides as the set grows)."""
    return val_every >= 2 and zlib.crc32(int(image_id).to_bytes(8, "little")) % val_every == 0


# ------------------------------------------------------------------------------------------------ labels


class LabelPool:
    """The labelled images the trainer learns from, in step with the store.

    Attributes:
        snapshot: the labels held now (the registry row of a version trained on them records it).
        train: ``{image id: (working-scale image, working-scale mask)}``.
        val: ``{image id: (full-size image, full-size mask)}`` (validation runs as the predictor predicts).
    """

    def __init__(self, store: Store, cfg: Config) -> None:
        self.store = store
        self.cfg = cfg
        self.snapshot: Snapshot | None = None
        self.revisions: dict[int, int] = {}
        self._seen: tuple | None = None  # the store's revisions at the last refresh
        self.classes_labelled = 0
        self.train: dict[int, Pair] = {}
        self.val: dict[int, Pair] = {}

    def refresh(self) -> bool:
        """Take in saves since the last call. Returns whether the labels changed.

        Only images whose revision changed are read. One that cannot be read now (a file being replaced, a mask
        of the wrong size) is left out with a warning and tried again at the next change of the labels.
        """
        snap = self.store.snapshot()
        if snap.revisions == self._seen:
            return False
        self._seen = snap.revisions
        tc = self.cfg.train
        use_val = len(snap.revisions) >= tc.val_min_images
        train: dict[int, Pair] = {}
        val: dict[int, Pair] = {}
        revisions: dict[int, int] = {}
        for image_id, rev in snap.revisions:
            side = val if use_val and held_out(image_id, tc.val_every) else train
            held = (val if side is val else self.train).get(image_id)
            if held is not None and self.revisions.get(image_id) == rev:
                side[image_id], revisions[image_id] = held, rev
                continue
            try:
                image = self.store.read_image(image_id)
                mask = self.store.load_revision(rev)
                if mask.shape != image.shape[:2]:
                    raise ValueError(
                        f"label revision {rev} is {mask.shape[1]}x{mask.shape[0]} but the image is "
                        f"{image.shape[1]}x{image.shape[0]}; relabel the image"
                    )
            except (imageio.ImageError, OSError, ValueError) as exc:
                log.warning("image %d left out of training: %s", image_id, exc)
                continue
            if side is train:  # training crops come from the working scale; validation predicts at full size
                size = imageio.working_size(image.shape[0], image.shape[1], self.cfg.preprocess.max_side)
                image, mask = imageio.resize_image(image, size), imageio.resize_labels(mask, size)
            side[image_id], revisions[image_id] = (image, mask), rev
        self.train, self.val, self.revisions = train, val, revisions
        seen: set[int] = set()
        for _, mask in train.values():
            seen.update(int(v) for v in np.unique(mask) if v != IGNORE_INDEX)
        self.classes_labelled = len(seen)  # classes with a labelled pixel in the training images
        self.snapshot = Snapshot(
            max_revision=snap.max_revision,
            revisions=tuple((i, r) for i, r in snap.revisions if i in revisions),
            labelled_pixels=snap.labelled_pixels,
        )
        return True


# ------------------------------------------------------------------------------------------------ weights


class Ema:
    """Exponential moving average of a network's weights (buffers, such as BatchNorm statistics, copied).

    The decay grows from 0 towards ``decay`` as ``(1 + n) / (10 + n)`` over the averaged steps, so an early
    average is not dominated by the random initial weights; :meth:`follow` sets ``n`` back after new labels, so
    the published weights take them up within a few dozen steps.
    """

    def __init__(self, model: SegModel, decay: float) -> None:
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.decay = decay
        self.n = 0

    @torch.no_grad()
    def update(self, model: SegModel) -> None:
        """Average in the network's current weights."""
        self.n += 1
        d = min(self.decay, (1.0 + self.n) / (10.0 + self.n))
        ours = list(self.model.parameters())
        theirs = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ours, theirs, 1.0 - d)
        for b_ema, b in zip(self.model.buffers(), model.buffers(), strict=True):
            b_ema.copy_(b)

    def follow(self) -> None:
        """New labels arrived: weigh the coming steps more for a while."""
        self.n = min(self.n, EMA_RESTART)

    def cpu_copy(self) -> SegModel:
        """A CPU copy of the averaged network in eval mode (what a publish works on while training goes on)."""
        return copy.deepcopy(self.model).to("cpu").eval()


# ------------------------------------------------------------------------------------------------- export


class OnnxTemplate:
    """The network's ONNX graph, exported once for its architecture and classes; versions refresh its weights.

    The graph is exported without the exporter's optimisation passes, so its initializers are exactly the
    network's parameters and buffers by name (ONNX Runtime fuses BatchNorm into convolutions itself when it
    loads the file). :meth:`write_graph` is a drop-in for :func:`labelsmart.training.export.export_graph`:
    :func:`~labelsmart.training.export.export_onnx` still checks the file and its parity with PyTorch.
    """

    def __init__(self, model: SegModel, opset: int = 18) -> None:
        """Export the graph of ``model``'s architecture and classes with the TorchScript exporter and no constant
        folding (under a second for the default network; its initializers are the weights by name). Call it from
        the training thread: exporters trace through global state that is not safe beside training in another
        thread."""
        import onnx

        from labelsmart.training.export import PARITY_SHAPES, export_torchscript

        t0 = time.monotonic()
        self.key = template_key(model)
        self.opset = opset
        # A copy with a distinct random value in every tensor: the exporter merges initializers of equal values (a
        # new network's BatchNorm weights are all ones), and merged names could not take their own weights later.
        model = copy.deepcopy(model).eval()
        with torch.no_grad():
            for t in model.state_dict().values():
                if t.is_floating_point():
                    t.copy_(torch.rand_like(t) + 0.5)
        with tempfile.TemporaryDirectory(prefix="labelsmart-template-") as tmp:
            path = Path(tmp) / "graph.onnx"
            example = torch.rand(*PARITY_SHAPES[0], device=next(model.parameters()).device)  # (1, 3, H, W)
            # no constant folding, so the initializers stay the weights by name (BatchNorm is not folded into the
            # convolutions)
            export_torchscript(model, path, opset, example, constant_folding=False)
            self.proto = onnx.load(str(path))
        shapes = dict(self.key[2])
        self.names = [init.name for init in self.proto.graph.initializer]
        odd = [n for n in self.names if n not in shapes]
        if odd:
            raise ValueError(f"the exported graph holds initializers that are not weights: {odd[:3]}")
        self.lock = threading.Lock()
        log.info("ONNX graph template exported in %.1f s (%d weight tensors)", time.monotonic() - t0, len(self.names))

    def write_graph(self, model: SegModel, path: Path, opset: int = 18, example_input: Tensor | None = None) -> str:
        """Write the graph with ``model``'s weights to ``path``. Returns the exporter's name for the sidecar."""
        import onnx
        from onnx import numpy_helper

        if template_key(model) != self.key:
            raise ValueError("the network no longer matches the exported graph (its classes changed)")
        state = model.state_dict()
        with self.lock:
            for k, init in enumerate(self.proto.graph.initializer):
                array = state[self.names[k]].detach().cpu().numpy()
                self.proto.graph.initializer[k].CopyFrom(numpy_helper.from_array(array, name=init.name))
            onnx.save(self.proto, str(path))
        return "torchscript (graph template, weights refreshed)"


def template_key(model: SegModel) -> tuple:
    """What the graph depends on: the architecture and the shapes of every weight."""
    return (model.mcfg.arch, model.mcfg.encoder, tuple((k, tuple(v.shape)) for k, v in model.state_dict().items()))


# ---------------------------------------------------------------------------------------------- publishing


@dataclass
class Candidate:
    """A version to publish: the averaged weights and the labels they have seen."""

    model: SegModel  # CPU, eval mode
    snapshot: Snapshot
    val: list[Pair]
    steps: int  # optimisation steps of the whole run so far
    train_images: int
    loss: float | None
    reason: str
    absorbed: int = 0  # the trainer's count of label changes taken in when the candidate was made
    metrics: dict[str, Any] = field(default_factory=dict)


class Publisher(threading.Thread):
    """Publishes candidates one at a time, newest first (an older waiting candidate is dropped)."""

    def __init__(self, trainer: ContinuousTrainer) -> None:
        super().__init__(name="labelsmart-publisher", daemon=True)
        self.trainer = trainer
        self.inbox: queue.Queue[Candidate | None] = queue.Queue(maxsize=1)
        self.busy = threading.Event()
        self.template: OnnxTemplate | None = None
        self.served: SegModel | None = None  # the served version's network, to score candidates against
        self.served_version: int | None = None
        self.last_result: str = ""
        self._preparing = threading.Lock()

    def offer(self, candidate: Candidate) -> None:
        """Queue a candidate, replacing one still waiting."""
        with contextlib.suppress(queue.Empty):
            self.inbox.get_nowait()
        self.inbox.put(candidate)

    def stop(self) -> None:
        """End the thread after the publish under way."""
        with contextlib.suppress(queue.Empty):
            self.inbox.get_nowait()
        self.inbox.put(None)

    def prepare(self, model: SegModel) -> None:
        """Export the graph template for ``model``'s architecture and classes, unless it is there already (the
        training thread calls it when it builds the network)."""
        with self._preparing:
            if self.template is None or self.template.key != template_key(model):
                self.template = OnnxTemplate(model)

    def run(self) -> None:
        while True:
            candidate = self.inbox.get()
            if candidate is None:
                return
            self.busy.set()
            try:
                self.trainer.publish(candidate, self)
            except Exception as exc:  # noqa: BLE001 - a failed publish is reported; the served version stays
                log.error("publishing failed: %s\n%s", exc, traceback.format_exc())
                self.trainer.tell("error", f"publishing a new version failed: {type(exc).__name__}: {exc}")
            finally:
                self.busy.clear()


class Scorer(threading.Thread):
    """Scores unlabelled images with the newest published version for "Next", one version at a time, on one
    thread (versions published while it scores are skipped for the newest). After a pass that took d seconds it
    waits ``SCORE_DUTY`` x d before the next, so scoring takes at most a quarter of the time training has."""

    def __init__(self, trainer: ContinuousTrainer) -> None:
        super().__init__(name="labelsmart-scorer", daemon=True)
        self.trainer = trainer
        self.wake = threading.Event()
        self.done = threading.Event()
        self.scoring = threading.Event()
        self.scored: int | None = None
        self.next_at = 0.0

    def run(self) -> None:
        from labelsmart.serving import active

        t = self.trainer
        while not self.done.is_set():
            self.wake.wait(1.0)
            self.wake.clear()
            row = t.store.latest_published()
            if self.done.is_set() or row is None or row.version == self.scored or not t.cfg.active.score:
                continue
            if time.monotonic() < self.next_at and self.scored is not None:
                continue
            self.scoring.set()
            started = time.monotonic()
            try:
                active.score_published(t.store, row, t.cfg.active, threads=1, should_stop=self.done.is_set)
            except Exception as exc:  # noqa: BLE001 - scoring is a help, never a reason to stop training
                log.error("scoring with v%d failed: %s", row.version, exc)
                t.tell("warning", f"scoring images with v{row.version} failed: {exc}")
            finally:
                self.scoring.clear()
            self.scored = row.version
            self.next_at = time.monotonic() + SCORE_DUTY * (time.monotonic() - started)


# ---------------------------------------------------------------------------------------------------- loop


class ContinuousTrainer(TrainerLoop):
    """The trainer process's loop in continuous mode (see the module's docstring); status and recovery as rounds."""

    def __init__(self, cfg: Config, store: Store, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(cfg, store, clock)
        self.pool = LabelPool(store, cfg)
        self.device = resolve_device(cfg.train.device)
        self.threads = cfg.train.threads or os.cpu_count() or 1
        self.model: SegModel | None = None
        self.ema: Ema | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.ctx: StepContext | None = None
        self.batches: Iterator[dict[str, Tensor]] | None = None
        self.batch_size = crops_per_batch(cfg.train)
        self.steps = 0  # optimisation steps of this process
        self.absorbed = 0  # label changes taken in
        # (absorb count, steps then) of each label change the served version has not seen, oldest first: the
        # "new labels" rule counts steps from the oldest, so saves that come faster than publish_min_steps steps
        # cannot put a publish off for ever
        self.unserved: list[tuple[int, int]] = []
        self.served_absorbed = 0  # label changes the newest published version had taken in (publisher thread)
        self.absorbed_at: float | None = None  # clock of the newest change of labels
        self.published_at: float | None = None
        self.published_revisions: tuple | None = None  # labels of the newest published version
        self.steps_at_publish = 0
        self.best_val: float | None = None
        self.improved_at: float | None = None
        self.idle = False
        self.losses: list[float] = []
        self.bad_steps = 0
        self.publisher = Publisher(self)
        self.scorer = Scorer(self)

    # -- talking to the page

    def tell(self, level: str, message: str) -> None:
        """An event on the page (a store that cannot take it never stops training)."""
        try:
            self.store.add_event(level, "trainer", message)
        except Exception as exc:  # noqa: BLE001
            log.warning("event not recorded (%s): %s", exc, message)

    def _status(self, force: bool = False) -> None:
        n = len(self.pool.train)
        loss = float(np.mean(self.losses[-20:])) if self.losses else None
        if self.idle:
            state, message = "idle", self._idle_reason()
        else:
            state = "training"
            message = f"training continuously on {n} labelled image{'s' if n != 1 else ''}, step {self.steps}"
            if loss is not None:
                message += f", loss {loss:.3f}"
            if self.publisher.last_result:
                message += f"; {self.publisher.last_result}"
        self.write_status(
            force=force,
            state=state,
            message=message,
            stage=None,
            step=self.steps,
            total=None,
            loss=loss,
            eta_s=None,
            device=self.device.type,
            mode="continuous",
        )

    def _idle_reason(self) -> str:
        minutes = self.cfg.trigger.idle_after_s / 60.0
        return (
            f"idle: no new labels and no better held-out score for {minutes:.0f} min; "
            "training resumes at the next save or Train now"
        )

    # -- the network

    def _build(self, num_classes: int) -> None:
        """Build (or rebuild for new classes) the network, its optimiser and its average, warm-started from the
        newest published version, or from the running network when the classes changed."""
        tc = self.cfg.train
        torch.manual_seed(tc.seed)
        with tempfile.TemporaryDirectory(prefix="labelsmart-rebuild-") as tmp:
            init: Path | None = None
            if self.ema is not None:
                init = Path(tmp) / CHECKPOINT_NAME
                save_checkpoint(init, self.ema.model, self.cfg, self._classes(), 0, self.steps, {})
            else:
                row = self.store.latest_published()
                init = row.checkpoint if row is not None else None
            self.ctx, self.optimizer = network_and_optimiser(self.cfg, num_classes, self.device, init)
        model = self.model = self.ctx.model
        self.ema = Ema(model, tc.ema_decay)
        self.publisher.prepare(model)  # ~2 s, once per set of classes, before the first label is trained on
        self.publisher.served, self.publisher.served_version = self._served_network(num_classes)

    def _served_network(self, num_classes: int) -> tuple[SegModel | None, int | None]:
        """The served version's network, to score candidates against, when it has these classes."""
        row = self.store.latest_published()
        if row is None or not row.checkpoint.is_file():
            return None, None
        try:
            ckpt = read_checkpoint(row.checkpoint)
        except ValueError as exc:
            log.warning("served version v%d cannot be read for comparison: %s", row.version, exc)
            return None, None
        if int(ckpt["num_classes"]) != num_classes:
            return None, None
        net = build_model(self.cfg.model, num_classes)
        warm_start(net, row.checkpoint)
        return net.eval(), row.version

    def _classes(self) -> list[dict[str, Any]]:
        return [{"id": c.id, "name": c.name, "color": [int(v) for v in c.color]} for c in self.store.classes()]

    def _data(self) -> None:
        """Batches over the training images as they are now, and the class weights of their labels."""
        tc = self.cfg.train
        assert self.model is not None
        num_classes = self.model.num_classes
        seed = tc.seed + self.absorbed
        dataset = LabelledSet(list(self.pool.train.values()), self.cfg, seed=seed)
        self.batches = labelled_batches(dataset, self.cfg, self.device, seed, self.batch_size)
        weight = None
        if tc.class_balance > 0:
            counts = dataset.class_counts(num_classes)
            weight = torch.from_numpy(class_weights(counts, tc.class_balance)).to(self.device)
        assert self.ctx is not None
        generator = torch.Generator().manual_seed(seed)
        self.ctx = dataclasses.replace(self.ctx, model=self.model, generator=generator, ce_weight=weight)

    # -- one slice of training

    def _train_slice(self, seconds: float) -> None:
        """Optimisation steps for about ``seconds`` (at least one)."""
        assert self.ctx is not None and self.optimizer is not None and self.ema is not None and self.batches is not None
        tc = self.cfg.train
        threads = max(1, self.threads - 1) if self.scorer.scoring.is_set() and self.threads > 1 else self.threads
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        end = time.monotonic() + seconds
        while True:
            for group in self.optimizer.param_groups:
                group["lr"] = tc.lr * min(1.0, (self.steps + 1) / WARMUP_STEPS)
            try:
                batch = next(self.batches)
                loss = joint_step(self.ctx, batch) if tc.contrastive_weight > 0 else finetune_step(self.ctx, batch)
                finite = bool(torch.isfinite(loss.detach()))
                if finite:
                    self.optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    self.optimizer.step()
            except RuntimeError as exc:
                if not is_out_of_memory(exc):
                    raise
                oom = True
            else:
                oom = False
            if oom:
                loss = None
                self._out_of_memory()
                return
            if not finite:
                self._bad_step(float(loss.detach()))
                return
            self.bad_steps = 0
            self.steps += 1
            self.losses.append(float(loss.detach()))
            del self.losses[:-100]
            self.ema.update(self.ctx.model)
            if time.monotonic() >= end:
                return

    def _out_of_memory(self) -> None:
        assert self.optimizer is not None
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        smallest = crops_per_batch(self.cfg.train, 1)
        if self.batch_size <= smallest:
            msg = (
                f"out of memory at batch {self.batch_size}, the smallest batch; training waits for the next save. "
                f"Lower train.crop (now {self.cfg.train.crop}) or preprocess.max_side."
            )
            self.tell("error", msg)
            self.idle = True
            return
        smaller = max(smallest, self.batch_size // 2)
        self.tell("warning", f"out of memory at batch {self.batch_size}; training goes on with batch {smaller}")
        self.batch_size = smaller
        self._data()

    def _bad_step(self, value: float) -> None:
        """A loss that is not finite: the step is not taken; after a few in a row the network restarts from its
        average with fresh optimiser moments."""
        assert self.model is not None and self.ema is not None
        self.bad_steps += 1
        if self.bad_steps < MAX_BAD_STEPS:
            return
        self.tell(
            "warning",
            f"the training loss became {value} {self.bad_steps} steps in a row at step {self.steps}; the network "
            "restarts from its averaged weights. If this repeats, lower train.lr (LABELSMART_TRAIN_LR).",
        )
        self.model.load_state_dict(self.ema.model.state_dict())
        tc = self.cfg.train
        self.optimizer = adamw(self.model.parameters(), tc, lr=tc.lr * 0.5)
        self.bad_steps = 0
        self._data()

    # -- deciding

    def _absorb(self) -> bool:
        """Take in new saves (and new classes). Returns whether the labels changed."""
        num_classes = len(self.store.classes())
        if self.model is not None and self.model.num_classes != num_classes:
            log.info("classes changed: %d -> %d; the class head restarts", self.model.num_classes, num_classes)
            self._build(num_classes)
            self.pool.snapshot = None  # rebuild the batches for the new head
        if not self.pool.refresh():
            return False
        self.absorbed += 1
        self.unserved.append((self.absorbed, self.steps))
        self.absorbed_at = self.clock()
        if self.model is None:
            self._build(num_classes)
        if self.pool.train:
            self._data()
        if self.ema is not None:
            self.ema.follow()
        if self.idle:
            log.info("new labels: training resumes")
        self.idle = False
        return True

    def _should_publish(self, train_now: bool) -> str | None:
        """Why to publish the average now, or None. See ``TriggerConfig`` for the rules."""
        trig = self.cfg.trigger
        since_steps = self.steps - self.steps_at_publish
        if since_steps < 1 or self.publisher.busy.is_set() or not self.pool.train:
            return None
        if train_now:
            return "Train now"
        new_labels = self.pool.snapshot is not None and self.pool.snapshot.revisions != self.published_revisions
        first = self.published_at is None and self.store.latest_published() is None
        self.unserved = [u for u in self.unserved if u[0] > self.served_absorbed]
        on_new = self.steps - self.unserved[0][1] if self.unserved else 0  # steps on the oldest unserved change
        if first:
            return "first model" if since_steps >= trig.first_publish_steps else None
        since_s = math.inf if self.published_at is None else self.clock() - self.published_at
        if since_s < trig.publish_min_interval_s:
            return None
        if new_labels and on_new >= trig.publish_min_steps:
            return "new labels"
        if since_s >= trig.publish_every_s and since_steps >= trig.publish_min_steps:
            return "more training"
        return None

    def _should_idle(self) -> bool:
        trig = self.cfg.trigger
        if trig.idle_after_s <= 0 or self.absorbed_at is None:
            return False
        now = self.clock()
        quiet = now - self.absorbed_at >= trig.idle_after_s
        flat = self.improved_at is None or now - self.improved_at >= trig.idle_after_s
        return quiet and flat and not self.publisher.busy.is_set()

    def _candidate(self, reason: str) -> Candidate:
        assert self.ema is not None and self.pool.snapshot is not None
        loss = float(np.mean(self.losses[-20:])) if self.losses else None
        return Candidate(
            model=self.ema.cpu_copy(),
            snapshot=self.pool.snapshot,
            val=list(self.pool.val.values()),
            steps=self.steps,
            train_images=len(self.pool.train),
            loss=loss,
            reason=reason,
            metrics={"batch_size": self.batch_size},
            absorbed=self.absorbed,
        )

    # -- publishing (in the publisher thread)

    def publish(self, c: Candidate, pub: Publisher) -> ModelRow | None:
        """Score a candidate against the served version on the held-out labels; publish it if it is not worse."""
        from labelsmart.training import export

        cfg, store = self.cfg, self.store
        t0 = time.monotonic()
        num_classes = c.model.num_classes
        val: dict[str, Any] = {"val_miou": None, "val_per_class_iou": None, "val_pixel_acc": None}
        served_miou = None
        if c.val:
            val = validate(c.model, c.val, cfg, num_classes, torch.device("cpu"))
            gate = len(c.val) >= cfg.trigger.publish_gate_images  # one or two images say little: no gate yet
            if gate and pub.served is not None and pub.served.num_classes == num_classes:
                served_miou = validate(pub.served, c.val, cfg, num_classes, torch.device("cpu"))["val_miou"]
        if val["val_miou"] is not None:
            if self.best_val is None or val["val_miou"] > self.best_val + 1e-3:
                self.best_val, self.improved_at = val["val_miou"], self.clock()
        if served_miou is not None and val["val_miou"] < served_miou - cfg.trigger.publish_tolerance:
            pub.last_result = (
                f"a candidate at step {c.steps} scored {100 * val['val_miou']:.1f} % mIoU on the {len(c.val)} held-out "
                f"images, below the served v{pub.served_version} ({100 * served_miou:.1f} %); not published"
            )
            log.info(pub.last_result)
            if c.reason == "Train now":
                self.tell("info", f"Train now: {pub.last_result}")
            self.published_at = self.clock()  # wait an interval before the next try
            self.steps_at_publish = c.steps
            return None
        if pub.template is None or pub.template.key != template_key(c.model):
            raise RuntimeError("no ONNX graph template for this network; the trainer prepares one when it builds it")

        def build(version: int, folder: Path) -> dict[str, Any]:
            metrics = {
                "train_loss": c.loss,
                **val,
                "val_images": len(c.val),
                "train_images": c.train_images,
                "steps": c.steps,
                "device": self.device.type,
                "labelled_images": len(c.snapshot.revisions),
                "labelled_pixels": c.snapshot.labelled_pixels,
                "mode": "continuous",
                "publish_reason": c.reason,
                "served_val_miou": served_miou,
                **c.metrics,
            }
            save_checkpoint(folder / CHECKPOINT_NAME, c.model, cfg, self._classes(), version, c.steps, metrics)
            metrics["round_seconds"] = round(time.monotonic() - t0, 1)
            assert pub.template is not None
            graph = pub.template.write_graph
            export.export_onnx(folder / CHECKPOINT_NAME, folder / ONNX_NAME, metrics=metrics, graph=graph)
            return metrics

        row = publish_version(cfg, store, c.snapshot, build)
        version = row.version
        pub.served, pub.served_version = c.model, version
        self.published_at = self.clock()
        self.published_revisions = c.snapshot.revisions
        self.served_absorbed = c.absorbed
        self.steps_at_publish = c.steps
        miou = "" if val["val_miou"] is None else f", held-out mIoU {100 * val['val_miou']:.1f} %"
        pub.last_result = f"published v{version} ({c.reason}, step {c.steps}{miou})"
        log.info("%s in %.1f s", pub.last_result, time.monotonic() - t0)
        self.scorer.wake.set()
        self._prune()
        return row

    def _prune(self) -> None:
        """Remove the files of published versions older than the newest ``trigger.keep_versions`` (0 keeps all);
        their registry rows stay, as the history of the curve."""
        keep = self.cfg.trigger.keep_versions
        if keep <= 0:
            return
        published = [m for m in self.store.models() if m.status == "published"]
        for m in published[:-keep]:
            ours = version_dir(self.cfg.project_models_dir, m.version).resolve()
            if m.folder.is_dir() and m.folder.resolve() == ours:  # only a folder where versions go is removed
                shutil.rmtree(m.folder, ignore_errors=True)

    # -- the loop

    def run(self, stop: Callable[[], bool] = lambda: False) -> None:
        """Train, publish and score until ``stop()`` is true; then publish nothing more and end the threads."""
        from labelsmart.store import StoreError

        self._stop = stop
        torch.set_num_threads(self.threads)
        self.recover()
        self.write_status(force=True, state="waiting", message="trainer started", mode="continuous")
        self.publisher.start()
        self.scorer.start()
        self.scorer.wake.set()  # scores a version published before this start, if it has none
        last_poll = -math.inf
        try:
            while not stop():
                now = time.monotonic()
                try:
                    if now - last_poll >= self.cfg.trigger.poll_s or self.idle or not self.pool.train:
                        last_poll = now
                        self._poll()
                except (StoreError, OSError) as exc:  # the store locked or its disk full: training waits
                    log.warning("trainer waits for the store: %s", exc)
                    time.sleep(self.cfg.trigger.poll_s)
                    continue
                if self.idle or not self._ready():
                    time.sleep(self.cfg.trigger.poll_s)
                    continue
                self._train_slice(SLICE_S)
                self._status()
        finally:
            self.publisher.stop()
            self.scorer.done.set()
            self.scorer.wake.set()
            self.publisher.join(30.0)

    def _ready(self) -> bool:
        return (
            self.batches is not None
            and bool(self.pool.train)
            and self.pool.classes_labelled >= max(1, self.cfg.trigger.min_classes)
        )

    def _poll(self) -> None:
        """Read the store: new labels, new classes, Train now; then publish or go idle as the rules say."""
        num_classes = len(self.store.classes())
        if num_classes < 2:
            self.write_status(state="waiting", message="waiting for at least two classes", mode="continuous")
            return
        if self.model is None:
            self._build(num_classes)
        self._absorb()
        if not self._ready():
            trig = self.cfg.trigger
            self.write_status(
                state="waiting", message=f"waiting for labels of at least {trig.min_classes} classes", mode="continuous"
            )
            return
        train_now = self.store.pending_requests("train_now") > 0
        if train_now:
            self.store.take_requests("train_now")
            if self.idle:
                self.idle = False
        reason = self._should_publish(train_now)
        if reason is not None:
            self.publisher.offer(self._candidate(reason))
        elif not self.idle and self._should_idle():
            if self.steps > self.steps_at_publish and not self.publisher.busy.is_set():
                self.publisher.offer(self._candidate("before going idle"))
            self.idle = True
            log.info(self._idle_reason())
        self._status(force=True)
