"""The background trainer: triggers, label snapshots, rounds, publishing, status, supervision.

``run_one_round`` is the one code path that turns the current labels into a published model version; the
background loop (:class:`TrainerLoop`, in its own process) and ``python -m labelsmart train`` both call it.
:class:`Supervisor` runs the loop in a child process from ``app.py`` and restarts it if it dies, so a
crash or an out-of-memory kill in training never takes the UI down.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import shutil
import sqlite3
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from labelsmart import imageio
from labelsmart.config import Config, TrainConfig, TriggerConfig
from labelsmart.store import ModelRow, Snapshot, Store, StoreError
from labelsmart.store.registry import CHECKPOINT_NAME, ONNX_NAME, staging_dir, version_dir

if TYPE_CHECKING:
    from labelsmart.training.round import RoundData

log = logging.getLogger(__name__)

ProgressFn = Callable[[dict[str, Any]], None]
TRAINER_NICENESS = 10  # the trainer process runs this much below the app's priority


class TrainerError(RuntimeError):
    """A round cannot run; the message says what the user can do."""


def load_snapshot(
    store: Store, snapshot: Snapshot, ids: list[int] | None = None
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Read the images and label revisions of a snapshot at full size.

    Args:
        store: project store.
        snapshot: the revisions to read.
        ids: only these image ids (in snapshot order); all when None.

    Returns:
        ``[(image RGB uint8 (H, W, 3), mask uint8 (H, W), 255 = unlabelled)]`` in snapshot order.

    Raises:
        ValueError: a mask does not match its image's size.
    """
    wanted = None if ids is None else set(ids)
    pairs = []
    for image_id, revision_id in snapshot.revisions:
        if wanted is not None and image_id not in wanted:
            continue
        image = store.read_image(image_id)
        mask = store.load_revision(revision_id)
        if mask.shape != image.shape[:2]:
            raise ValueError(
                f"label revision {revision_id} is {mask.shape[1]}x{mask.shape[0]} but image "
                f"{store.image(image_id).path} is {image.shape[1]}x{image.shape[0]}; relabel the image."
            )
        pairs.append((image, mask))
    return pairs


def unlabelled_images(store: Store, labelled: set[int], limit: int, seed: int) -> list[np.ndarray]:
    """Up to ``limit`` project images with no labels (a seeded draw, in path order), read at full size.

    An image that cannot be read is skipped with a warning: it costs the round one unlabelled crop source,
    not the round.
    """
    from labelsmart.training.round import sample_unlabelled

    ids = [row.id for row in store.images() if row.id not in labelled and row.labelled_pixels == 0]
    ids = sorted(sample_unlabelled(ids, limit, seed))
    images = []
    for image_id in ids:
        try:
            images.append(store.read_image(image_id))
        except (imageio.ImageError, OSError) as exc:
            log.warning("unlabelled image %d skipped: %s", image_id, exc)
    return images


def round_data(store: Store, snapshot: Snapshot, tc: TrainConfig) -> RoundData:
    """What a round learns from, read from the store: the snapshot's labelled images (every ``val_every``-th held
    out for validation once ``val_min_images`` are labelled), the classes, and the unlabelled images (read only
    if the round's objective uses them)."""
    from labelsmart.training.round import RoundData, split_validation

    ids = snapshot.image_ids
    train_ids, val_ids = split_validation(ids, tc)
    by_id = dict(zip(ids, load_snapshot(store, snapshot), strict=True))
    classes = [{"id": c.id, "name": c.name, "color": list(c.color)} for c in store.classes()]
    labelled = set(ids)
    return RoundData(
        train=[by_id[i] for i in train_ids],
        val=[by_id[i] for i in val_ids],
        classes=classes,
        unlabelled=lambda: unlabelled_images(store, labelled, tc.unlabelled_images, tc.seed),
    )


def run_one_round(
    cfg: Config,
    store: Store,
    steps: int | None = None,
    progress: ProgressFn | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> ModelRow:
    """Snapshot the labels, train a round (warm-started), export, parity-check and publish a version.

    The version's files are built in a hidden staging folder and moved into place with one rename; only then
    is the registry row flipped to published. On any failure the row is marked failed, the staging folder
    removed, and the exception re-raised; the last good model keeps serving.

    Args:
        cfg: configuration.
        store: the project store.
        steps: optimisation steps (default: ``first_round_steps`` for the first version, else ``steps``).
        progress: called with ``{"stage", "step", "total", "loss", "eta_s", ...}`` while it works.
        should_stop: polled during training; returning True cancels the round.

    Returns:
        The published registry row.
    """
    from labelsmart.training import export  # torch lives there; keep this module light for the UI
    from labelsmart.training import round as training_round

    if len(store.classes()) < 2:
        raise TrainerError("a model needs at least two classes; add classes first.")
    snapshot = store.snapshot()
    if not snapshot.revisions:
        raise TrainerError("no labelled images yet; paint some strokes and save them first.")
    previous = store.latest_published()
    init = previous.checkpoint if previous else None
    if init is not None and not init.is_file():
        log.warning("previous checkpoint %s is missing; training from scratch", init)
        init = None
    if steps is None:
        steps = cfg.train.steps if previous else cfg.train.first_round_steps
    report = progress or (lambda _info: None)
    started = time.monotonic()

    def work(version: int, tmp: Path) -> dict[str, Any]:
        def notify(message: str) -> None:  # a change of course, shown on the page with the other warnings
            store.add_event("warning", "trainer", f"round v{version}: {message}")

        data = round_data(store, snapshot, cfg.train)
        result = training_round.run_round(
            cfg,
            data,
            version,
            init_checkpoint=init,
            steps=steps,
            progress=report,
            should_stop=should_stop,
            notify=notify,
        )
        checkpoint = result.save(tmp / CHECKPOINT_NAME)
        report({"stage": "exporting", "step": result.steps, "total": result.steps, "eta_s": 0.0})
        metrics = dict(result.metrics)
        metrics.update(
            steps=result.steps,
            train_seconds=round(result.seconds, 1),
            device=result.device,
            labelled_images=len(snapshot.revisions),
            labelled_pixels=snapshot.labelled_pixels,
            warm_start=previous.version if init is not None and previous else None,
        )
        export.export_onnx(checkpoint, tmp / ONNX_NAME, metrics=metrics)
        metrics["round_seconds"] = round(time.monotonic() - started, 1)
        return metrics

    row = publish_version(cfg, store, snapshot, work)
    log.info("published version %d at %s (%s)", row.version, row.folder, row.metrics)
    return row


def publish_version(
    cfg: Config, store: Store, snapshot: Snapshot, build: Callable[[int, Path], dict[str, Any]]
) -> ModelRow:
    """Register a version trained on ``snapshot``, have ``build(version, folder)`` write its files into a hidden
    staging folder (returning the metrics to record), move the folder into place with one rename, and only then
    flip the registry row to published. On any failure the row is marked failed, the staging folder removed, and
    the exception re-raised; the last good model keeps serving. Rounds and the continuous trainer both publish so.
    """
    version = store.begin_model(cfg.project_models_dir, snapshot)
    final = version_dir(cfg.project_models_dir, version)
    tmp = staging_dir(final)
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        metrics = build(version, tmp)
        if final.exists():  # a leftover of a crashed earlier attempt at this version number
            shutil.rmtree(final)
        os.replace(tmp, final)
        store.publish_model(version, metrics)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        store.fail_model(version, f"{type(exc).__name__}: {exc}")
        raise
    return next(m for m in store.models() if m.version == version)


# ------------------------------------------------------------------------------------------ triggers


@dataclass(frozen=True)
class TriggerState:
    """What the trigger rule looks at."""

    new_pixels: int  # labelled pixels saved since the last round's snapshot
    classes_labelled: int  # classes with at least one labelled pixel
    train_now: bool  # "Train now" was pressed
    seconds_since_last_round: float | None  # None before the first round
    round_running: bool = False


def should_start(state: TriggerState, trig: TriggerConfig) -> tuple[bool, str]:
    """The trigger rule. Returns ``(start, reason)``; the reason is shown while waiting.

    - A round never starts while one is running (saves during a round wait for the next one).
    - Labels of at least ``min_classes`` classes are needed.
    - "Train now" starts a round at once, whatever the pixel count and interval.
    - Otherwise a round starts when ``min_new_pixels`` labelled pixels arrived since the last round's
      snapshot and at least ``min_interval_s`` passed since the last round ended (the first round does
      not wait for the interval).
    """
    if state.round_running:
        return False, "a round is running"
    if state.classes_labelled < trig.min_classes:
        return False, f"waiting for labels of at least {trig.min_classes} classes"
    if state.train_now:
        return True, "Train now"
    if state.new_pixels < trig.min_new_pixels:
        return False, f"waiting for new labels ({state.new_pixels}/{trig.min_new_pixels} new labelled pixels)"
    since = state.seconds_since_last_round
    if since is not None and since < trig.min_interval_s:
        return False, f"new labels waiting; next round in {trig.min_interval_s - since:.0f} s"
    return True, f"{state.new_pixels} new labelled pixels"


class TrainerLoop:
    """The loop the trainer process runs: poll the store, decide, train, publish, report."""

    def __init__(self, cfg: Config, store: Store, clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.store = store
        self.clock = clock
        self.last_round_end: float | None = None
        self.status: dict[str, Any] = {"state": "waiting", "message": "starting", "pid": os.getpid()}
        self._last_write = 0.0
        self._stop: Callable[[], bool] = lambda: False

    def write_status(self, force: bool = False, **fields: Any) -> None:
        """Update the status record the UI shows (at most a few writes per second)."""
        self.status.update(fields)
        self.status["pid"] = os.getpid()
        self.status["heartbeat"] = time.time()
        now = time.monotonic()
        if force or now - self._last_write > 0.5:
            try:
                self.store.set_status("trainer", self.status)
            except (StoreError, sqlite3.Error) as exc:  # the status is what the page shows; training goes on
                log.warning("trainer status not written: %s", exc)
            self._last_write = now

    def trigger_state(self) -> TriggerState:
        """Read what the trigger rule needs from the store."""
        counts = self.store.class_pixel_counts()
        since = None if self.last_round_end is None else self.clock() - self.last_round_end
        if since is None and self.store.models():
            since = float("inf")  # rounds ran in an earlier session: no interval to wait for
        return TriggerState(
            new_pixels=self.store.new_pixels_since(self.store.last_round_revision()),
            classes_labelled=sum(1 for v in counts.values() if v > 0),
            train_now=self.store.pending_requests("train_now") > 0,
            seconds_since_last_round=since,
        )

    def round_config(self) -> Config:
        """The configuration of the next background round: its wall-clock cap comes from the trigger settings
        (``first_round_seconds`` before the first published version, then ``round_seconds``) unless
        ``train.max_round_seconds`` is set. On an idle CPU the step counts end a round first; on a busy one
        the cap does, with fewer steps.
        """
        import dataclasses

        cfg = self.cfg
        if cfg.train.max_round_seconds > 0:
            return cfg
        trig = cfg.trigger
        cap = trig.round_seconds if self.store.latest_published() is not None else trig.first_round_seconds
        if cap <= 0:
            return cfg
        return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_round_seconds=float(cap)))

    def recover(self) -> None:
        """Mark rounds that a dead process left 'training' as failed, and drop their files.

        A trainer killed mid-round leaves its files in the staging folder; one killed mid-publish, between the
        rename and the row's flip to published, leaves them in the version's own folder. The row is failed
        first, so nothing serves those files while they go; version numbers are never reused, so no later round
        would replace that folder. Only a folder where rounds put versions (:func:`version_dir`) is removed.

        A round whose owner still runs (a ``python -m labelsmart train`` started before this trainer, say) is
        left to it; rows without an owner come from older registries, whose rounds have long ended.
        """
        for m in self.store.models():
            if m.status != "training":
                continue
            if m.owner is not None and m.owner.is_alive():
                log.info(
                    "version %d is being trained by process %d on %s; left to it", m.version, m.owner.pid, m.owner.host
                )
                continue
            self.store.fail_model(m.version, "interrupted: the process training it stopped during this round")
            shutil.rmtree(staging_dir(m.folder), ignore_errors=True)
            if m.folder.resolve() == version_dir(self.cfg.project_models_dir, m.version).resolve():
                shutil.rmtree(m.folder, ignore_errors=True)

    def step(self) -> bool:
        """One poll: maybe run a round. Returns True if a round ran (published or failed)."""
        state = self.trigger_state()
        start, reason = should_start(state, self.cfg.trigger)
        if not start:
            self.write_status(state="waiting", message=reason, stage=None, step=None, total=None, eta_s=None)
            return False
        self.store.take_requests("train_now")
        self.write_status(force=True, state="starting", message=f"starting a round ({reason})", error=None)

        def progress(info: dict[str, Any]) -> None:
            stage = info.get("stage", "training")
            self.write_status(force=stage != self.status.get("state"), state=stage, message=stage, **info)

        try:
            row = run_one_round(self.round_config(), self.store, progress=progress, should_stop=self._stop)
        except Exception as exc:  # noqa: BLE001 - any failure of a round is reported, never fatal
            log.error("training round failed: %s\n%s", exc, traceback.format_exc())
            msg = f"training round failed: {type(exc).__name__}: {exc}"
            self.store.add_event("error", "trainer", msg)
            self.write_status(force=True, state="error", message=msg, error=msg)
        else:
            self.write_status(
                force=True,
                state="waiting",
                message=f"published version {row.version}",
                error=None,
                last_version=row.version,
            )
            self.score(row)
        self.last_round_end = self.clock()
        return True

    def score(self, row: ModelRow) -> None:
        """Score the unlabelled images with a newly published version, for "Next" (active learning).

        Runs in this process between rounds on ``active.threads`` CPU threads; it stops early for "Train
        now" or shutdown, and a failure is reported, never fatal (Next then goes by older scores).
        """
        acfg = self.cfg.active
        if not acfg.score:
            return
        from labelsmart.serving import active

        def progress(done: int, total: int) -> None:
            self.write_status(state="scoring", message=f"scoring images with v{row.version}", step=done, total=total)

        def stop() -> bool:
            return self._stop() or self.store.pending_requests("train_now") > 0

        try:
            active.score_published(self.store, row, acfg, threads=acfg.threads, should_stop=stop, progress=progress)
        except Exception as exc:  # noqa: BLE001 - scoring is a help, never a reason to stop training
            log.error("scoring with v%d failed: %s\n%s", row.version, exc, traceback.format_exc())
            self.store.add_event("warning", "trainer", f"scoring images with v{row.version} failed: {exc}")
        self.write_status(
            force=True, state="waiting", message=f"published version {row.version}", step=None, total=None
        )

    def run(self, stop: Callable[[], bool] = lambda: False) -> None:
        """Poll until ``stop()`` is true (a running round is cancelled at its next step)."""
        self._stop = stop
        self.recover()
        self.write_status(force=True, state="waiting", message="trainer started")
        while not stop():
            try:
                ran = self.step()
            except (StoreError, sqlite3.Error) as exc:  # the store locked by another program, or its disk full
                log.warning("trainer waits for the store: %s", exc)
                ran = False
            if not ran:
                time.sleep(self.cfg.trigger.poll_s)


def make_loop(cfg: Config, store: Store) -> TrainerLoop:
    """The trainer's loop for ``trigger.mode``: the continuous trainer, or rounds."""
    import torch

    from labelsmart.training.round import autocast_dtype

    autocast_dtype(cfg.train.precision, torch.device("cpu"))  # a bad train.precision stops here, in one sentence
    mode = cfg.trigger.mode
    if mode == "continuous":
        from labelsmart.training.continuous import ContinuousTrainer

        return ContinuousTrainer(cfg, store)
    if mode == "rounds":
        return TrainerLoop(cfg, store)
    raise ValueError(f"trigger.mode is {mode!r}; set LABELSMART_TRIGGER_MODE to continuous or rounds.")


def trainer_main(cfg: Config) -> None:
    """Entry point of the trainer process. It ends when the process that started it is gone.

    The app stops its trainer on a normal exit; the parent check covers an app killed outright, so no
    orphaned trainer keeps a CPU and a gigabyte of memory busy.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s trainer %(levelname)s %(name)s: %(message)s")
    parent = os.getppid()
    with contextlib.suppress(OSError):  # below the page's priority: saves and pre-annotations answer first
        os.nice(TRAINER_NICENESS)
    store = Store(cfg.db_path, image_root=cfg.image_root)
    make_loop(cfg, store).run(stop=lambda: os.getppid() != parent)
    log.info("the app (pid %d) is gone; trainer exits", parent)


class Supervisor:
    """Starts the trainer process, watches it, restarts it when it dies and tells the UI through events."""

    def __init__(
        self, cfg: Config, store: Store, target: Callable[[Config], None] = trainer_main, max_restarts: int = 20
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.target = target
        self.max_restarts = max_restarts
        self.restarts = 0
        self._ctx = mp.get_context("spawn")  # never fork a process that holds Gradio's threads
        self._proc: mp.process.BaseProcess | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def alive(self) -> bool:
        """Whether the trainer process runs."""
        return self._proc is not None and self._proc.is_alive()

    @property
    def pid(self) -> int | None:
        """The trainer process id."""
        return self._proc.pid if self._proc is not None else None

    def _spawn(self) -> None:
        self._proc = self._ctx.Process(target=self.target, args=(self.cfg,), name="labelsmart-trainer", daemon=True)
        self._proc.start()
        log.info("trainer process started (pid %s)", self._proc.pid)

    def start(self) -> None:
        """Start the process and the watcher thread."""
        self._spawn()
        self._thread = threading.Thread(target=self._watch, name="trainer-supervisor", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        backoff = 1.0
        while not self._stop.wait(1.0):
            proc = self._proc
            if proc is None or proc.is_alive():
                continue
            code = proc.exitcode
            if self.restarts >= self.max_restarts:
                msg = f"trainer process exited with code {code} and was restarted {self.restarts} times; giving up"
                log.error(msg)
                self._tell(
                    msg + " (restart labelsmart to try again).", {"state": "error", "message": msg, "error": msg}
                )
                return
            self.restarts += 1
            msg = f"trainer process exited with code {code}; restarted it (restart {self.restarts})"
            log.error(msg)
            self._tell(msg)
            time.sleep(backoff)
            backoff = min(backoff * 2, 30.0)
            if not self._stop.is_set():
                self._spawn()

    def _tell(self, message: str, status: dict[str, Any] | None = None) -> None:
        """An event (and a status) for the page; a store that cannot take it (locked, full) never stops the
        watcher, which would leave the trainer unrestarted."""
        try:
            self.store.add_event("error", "supervisor", message)
            if status is not None:
                self.store.set_status("trainer", status)
        except (StoreError, sqlite3.Error) as exc:
            log.warning("supervisor event not recorded (%s): %s", exc, message)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop watching and end the process."""
        self._stop.set()
        proc = self._proc
        if proc is not None and proc.is_alive():
            proc.terminate()
            proc.join(timeout)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout)
