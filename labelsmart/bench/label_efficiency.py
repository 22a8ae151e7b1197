"""Label-efficiency benchmark (``../shared/BENCHMARK.md`` section 1, issue 3).

For each labelled-subset size N and label form (dense masks or simulated scribbles) every row trains on the
same N pool images and is scored on one or more evaluation splits:

- ``labelsmart``: one round of :func:`labelsmart.training.round.run_round`, the code the background trainer runs,
  with the shipped ``TrainConfig`` (the project store is built in a temporary folder: the whole pool split
  is registered as images, only the N chosen ones are labelled);
- ``ce-only``: plain cross-entropy, the same round with every contrastive part and the class balancing
  switched off (:func:`ce_only`), same steps or minutes;
- ``contrastive``: the same round with the paper's two-stage recipe, whatever the defaults are: 30 % of the
  budget on supervised pixel contrastive pretraining, then cross-entropy (``--set
  train.pretrain_fraction=F`` changes the split);
- ``rf``: the ilastik-style peer of :mod:`labelsmart.bench.rf_baseline`.

A *cell* is one (row, N, label form) under one budget. Each cell runs in its own spawned process (so its
peak resident memory is its own, and a crash or out-of-memory kill ends that cell only), appends one line
per evaluation split to ``results.jsonl`` and rewrites ``table.md`` and ``label_efficiency.png``. Finished
cells are found in ``results.jsonl`` and skipped, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import io
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from labelsmart import imageio
from labelsmart.bench.common import (
    exit_with_parent,
    peak_rss_children_mb,
    peak_rss_mb,
    provenance,
    run_spawned,
    seeded_order,
)
from labelsmart.config import IGNORE_INDEX, Config, TrainConfig
from labelsmart.datasets import DataFolder, evaluate

log = logging.getLogger(__name__)

ROWS = ("labelsmart", "ce-only", "contrastive", "rf")
NET_ROWS = ("labelsmart", "ce-only", "contrastive")
PAPER_PRETRAIN_FRACTION = 0.3  # the contrastive row's split when --set does not give train.pretrain_fraction
LABEL_FORMS = ("dense", "scribble")
RESULTS_NAME = "results.jsonl"
ERRORS_NAME = "errors.jsonl"
TABLE_NAME = "table.md"
PLOT_NAME = "label_efficiency.png"
# inference modes a net cell can also be scored with (``--inference``): the working scales (times max_side) whose class
# probabilities are averaged, and whether the mirrored image joins each (training.validation.predict_mask)
INFERENCE: dict[str, tuple[tuple[float, ...], bool]] = {
    "plain": ((1.0,), False),
    "flip": ((1.0,), True),
    "ms3": ((0.75, 1.0, 1.25), False),
    "ms3flip": ((0.75, 1.0, 1.25), True),
    "up-flip": ((1.0, 1.25, 1.5), True),
}
MINUTES_STEPS = 1_000_000  # step cap when only --minutes bounds a round (the deadline ends it first)


class BenchError(ValueError):
    """Bad benchmark input; the message is one sentence naming the file or flag and what to do."""


# ------------------------------------------------------------------------------------------------ data


def select_subset(names: Sequence[str], n: int) -> list[str]:
    """BENCHMARK.md: the first ``n`` of the pool names in :func:`~labelsmart.bench.common.seeded_order`."""
    if n > len(names):
        raise BenchError(f"--n-labeled {n}: the pool split has only {len(names)} images; pick a smaller N.")
    return seeded_order(names)[:n]


def make_labels(mask: np.ndarray, form: str) -> np.ndarray:
    """The training labels of one ground-truth mask: ``dense`` = the mask, ``scribble`` = simulated strokes."""
    if form == "dense":
        return mask.copy()
    if form == "scribble":
        from labelsmart.bench.scribble import simulate_scribbles

        return simulate_scribbles(mask)
    raise BenchError(f"--labels {form}: unknown label form; use dense and/or scribble.")


# ---------------------------------------------------------------------------------------------- spec


@dataclass(frozen=True)
class BenchSpec:
    """Everything one benchmark run is asked to do."""

    pool: Path
    eval: Path
    out: Path
    pool_split: str = "train"
    eval_splits: tuple[str, ...] = ("val",)
    n_labeled: tuple[int, ...] = (5, 20, 50)
    labels: tuple[str, ...] = LABEL_FORMS
    rows: tuple[str, ...] = ROWS
    steps: int | None = None  # training steps per net cell (the shipped round's steps when neither is given)
    minutes: float | None = None  # wall-clock budget of a net cell's training
    device: str = "auto"
    threads: int = 0  # torch / random-forest threads (0 = all cores)
    seed: int = 0  # training seed (the subset is always drawn with seed 0)
    overrides: dict[str, Any] = field(default_factory=dict)  # "train.x" -> value, for the net rows (ablations)
    variant: str = ""  # name of the overrides in results and tables
    isolate: bool = True  # each cell in its own spawned process
    # dense self-supervised pretraining on every pool-split image before the net cells (None = none), run once and
    # shared by the run's cells: its steps and / or minutes
    ssl_steps: int | None = None
    ssl_minutes: float | None = None
    # how net cells are scored: "plain" is the predictor's one pass; the others average several (INFERENCE), on the
    # same trained network, one record each
    inference: tuple[str, ...] = ("plain",)

    @property
    def ssl(self) -> bool:
        """Whether the net cells start from self-supervised pretraining."""
        return self.ssl_steps is not None or self.ssl_minutes is not None

    def budget(self) -> str:
        """The budget as a short label, such as ``300 steps``, ``5 min`` or ``10 min + ssl 10 min``."""
        parts = []
        if self.steps is not None:
            parts.append(f"{self.steps} steps")
        if self.minutes is not None:
            parts.append(f"{self.minutes:g} min")
        label = " / ".join(parts) or "default steps"
        if self.ssl:
            ssl = [f"{self.ssl_steps} steps"] if self.ssl_steps is not None else []
            ssl += [f"{self.ssl_minutes:g} min"] if self.ssl_minutes is not None else []
            label += " + ssl " + " / ".join(ssl)
        return label

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (paths as strings) that :meth:`from_json` reads back."""
        d = dataclasses.asdict(self)
        for k in ("pool", "eval", "out"):
            d[k] = str(d[k])
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> BenchSpec:
        """Inverse of :meth:`to_json`."""
        d = dict(d)
        for k in ("pool", "eval", "out"):
            d[k] = Path(d[k])
        for k in ("eval_splits", "n_labeled", "labels", "rows", "inference"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)


@dataclass(frozen=True)
class Cell:
    """One (row, N, label form) of a run."""

    row: str
    n_labeled: int
    labels: str

    def key(self, spec: BenchSpec) -> str:
        """Identity of the cell across runs: a finished cell with this key is not trained again."""
        parts = [self.row, self.labels, f"n{self.n_labeled}", spec.pool_split, f"seed{spec.seed}"]
        if self.row in NET_ROWS:
            parts.insert(4, spec.budget().replace(" ", ""))
            if spec.variant:
                parts.append(spec.variant)
            if spec.inference != ("plain",):  # a cell scored other ways is another cell (its records differ)
                parts.append("inference=" + "+".join(spec.inference))
        return "|".join(parts)


def _folder_key(path: str | Path | None) -> str | None:
    """A data folder as resume matches it: relative and absolute spellings of one folder are the same."""
    return None if path is None else str(Path(path).resolve())


def cells_of(spec: BenchSpec) -> list[Cell]:
    """Cells in run order: small N first (a first table comes soon), then label form, then row."""
    return [Cell(r, n, lf) for n in spec.n_labeled for lf in spec.labels for r in spec.rows]


# ------------------------------------------------------------------------------------------- one cell


def ce_only(tc: TrainConfig) -> TrainConfig:
    """Plain cross-entropy, the baseline row: the shipped round with every contrastive part, self-training, the
    CRF loss and the class balancing switched off (also when ``--set`` turned them on for the other rows)."""
    return dataclasses.replace(
        tc,
        pretrain_fraction=0.0,
        contrastive_weight=0.0,
        pseudo_weight=0.0,
        unlabelled_weight=0.0,
        class_balance=0.0,
        crf_weight=0.0,
    )


def _net_config(spec: BenchSpec, row: str) -> Config:
    """The configuration a net row trains with: the shipped defaults, the bench's device/threads/seed/budget."""
    from labelsmart import config

    args: dict[str, Any] = {
        "train.device": spec.device,
        "train.threads": spec.threads,
        "train.seed": spec.seed,
        "train.val_every": 0,  # all N images train; the benchmark scores on its own evaluation split
        "train.max_round_seconds": 60.0 * spec.minutes if spec.minutes is not None else 0.0,
    }
    args.update(spec.overrides)
    cfg = config.load(args)
    if row == "ce-only":
        cfg = dataclasses.replace(cfg, train=ce_only(cfg.train))
    elif row == "contrastive":
        split = float(spec.overrides.get("train.pretrain_fraction", PAPER_PRETRAIN_FRACTION))
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, pretrain_fraction=split))
    return cfg


def _run_net(
    spec: BenchSpec, cell: Cell, pool: DataFolder, names: list[str], masks: list[np.ndarray]
) -> tuple[dict[str, Callable[[np.ndarray], np.ndarray]], dict[str, Any]]:
    """Train one net cell with ``run_round``, the background trainer's round; returns ``(predictors, facts)``,
    one predictor per mode of ``spec.inference``.

    The N labelled images train in the order of the pool split (the order a project lists them in); the rest
    of the pool split is the unlabelled material an objective may learn from, as in a labelling session.
    """
    import torch
    from tqdm import tqdm

    from labelsmart.training import round as training_round
    from labelsmart.training.validation import predict_mask

    cfg = _net_config(spec, cell.row)
    pool_names = pool.names(spec.pool_split)
    position = {n: i for i, n in enumerate(pool_names)}
    labelled = sorted(zip(names, masks, strict=True), key=lambda nm: position[nm[0]])
    chosen = set(names)

    def unlabelled() -> list[np.ndarray]:
        rest = sorted((n for n in pool_names if n not in chosen), key=lambda n: pool.image_rel(n).as_posix())
        drawn = training_round.sample_unlabelled(rest, cfg.train.unlabelled_images, cfg.train.seed)
        return [pool.read_image(n) for n in sorted(drawn, key=position.__getitem__)]

    data = training_round.RoundData(
        train=[(pool.read_image(n), m) for n, m in labelled], classes=_classes(pool), unlabelled=unlabelled
    )
    steps = spec.steps if spec.steps is not None else (MINUTES_STEPS if spec.minutes is not None else cfg.train.steps)
    bar = tqdm(desc=f"  {cell.key(spec)}", unit="step", file=sys.stderr, dynamic_ncols=True, leave=False, mininterval=1)

    def progress(info: dict[str, Any]) -> None:
        bar.total = int(info["total"])
        bar.n = int(info["step"])
        bar.set_postfix(stage=info["stage"], loss=f"{info['loss']:.3f}", eta=f"{info['eta_s']:.0f}s", refresh=False)
        bar.refresh()

    try:
        init = ssl_checkpoint_path(spec) if spec.ssl else None
        if init is not None and not init.is_file():
            raise BenchError(f"{init}: the self-supervised checkpoint is missing; run the benchmark again to make it.")
        result = training_round.run_round(cfg, data, 1, init_checkpoint=init, steps=steps, progress=progress)
    finally:
        bar.close()
    device = training_round.resolve_device(cfg.train.device)
    model = result.model.eval()

    def predictor(mode: str) -> Callable[[np.ndarray], np.ndarray]:
        scales, flip = INFERENCE[mode]
        return lambda image: predict_mask(model, image, cfg.preprocess, device, scales, flip)

    facts = {
        "train_seconds": round(result.seconds, 2),
        "steps": result.steps,
        "pretrain_steps": result.metrics.get("pretrain_steps"),
        "finetune_steps": result.metrics.get("finetune_steps"),
        "train_loss": result.metrics.get("train_loss"),
        "contrastive_loss": result.metrics.get("contrastive_loss"),
        # the semi-supervised objective's steps and the share of unlabelled pixels confident enough to use
        "pseudo_steps": result.metrics.get("pseudo_steps"),
        "pseudo_confident_share": result.metrics.get("pseudo_confident_share"),
        "class_weights": result.metrics.get("class_weights"),  # class-balanced cross-entropy, per class id
        "device": result.device,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "threads": torch.get_num_threads(),
        "autocast": training_round.autocast_name(cfg.train.precision, device),
        "train_config": dataclasses.asdict(cfg.train),
        "model_config": dataclasses.asdict(cfg.model),
        "max_side": cfg.preprocess.max_side,
    }
    if spec.ssl:
        from labelsmart.training.model import read_checkpoint

        facts["ssl"] = read_checkpoint(ssl_checkpoint_path(spec))["metrics"].get("ssl")
    return {mode: predictor(mode) for mode in spec.inference}, facts


def _classes(pool: DataFolder) -> list[dict[str, Any]]:
    colours = zip(pool.classes, pool.colors, strict=True)
    return [{"id": k, "name": n, "color": list(c)} for k, (n, c) in enumerate(colours)]


# ------------------------------------------------------------------------------ self-supervised pretraining


def ssl_checkpoint_path(spec: BenchSpec) -> Path:
    """Where a run's self-supervised pretraining is kept: one file per pool split, budget and training setting, so
    it is paid for once and shared by every net cell (as a project pays for it once, before the first label)."""
    cfg = _net_config(spec, "labelsmart")
    key = {
        "pool": _folder_key(spec.pool),
        "pool_split": spec.pool_split,
        "steps": spec.ssl_steps,
        "minutes": spec.ssl_minutes,
        "seed": spec.seed,
        "device": spec.device,
        "threads": spec.threads,
        "model": dataclasses.asdict(cfg.model),
        "max_side": cfg.preprocess.max_side,
        "crop": cfg.train.crop,
        "batch_size": cfg.train.batch_size,
        "lr": cfg.train.lr,
    }
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return spec.out / f"ssl-{digest}.pt"


def run_ssl(spec: BenchSpec) -> Path:
    """Pretrain a network by dense self-supervised contrast on every image of the pool split (no labels) and save
    it where :func:`ssl_checkpoint_path` says; a file already there is kept. Returns the path."""
    from tqdm import tqdm

    from labelsmart.training import pretrain
    from labelsmart.training.model import save_checkpoint

    path = ssl_checkpoint_path(spec)
    if path.is_file():
        log.info("self-supervised pretraining: %s from an earlier run, reused", path)
        return path
    cfg = _net_config(spec, "labelsmart")
    pool = DataFolder.open(spec.pool, "--pool")
    images = [pool.read_image(n) for n in pool.names(spec.pool_split)]
    steps = spec.ssl_steps if spec.ssl_steps is not None else MINUTES_STEPS
    bar = tqdm(desc="  ssl", unit="step", file=sys.stderr, dynamic_ncols=True, leave=False, mininterval=1)

    def progress(step: int, total: int, loss: float) -> None:
        bar.n = step
        bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
        bar.refresh()

    try:
        model, facts = pretrain.pretrain(
            cfg, images, len(pool.classes), steps, 60.0 * (spec.ssl_minutes or 0.0), progress=progress
        )
    finally:
        bar.close()
    facts = {**facts, "peak_rss_mb": round(peak_rss_mb(), 1), "pool_split": spec.pool_split}
    save_checkpoint(path, model, cfg, _classes(pool), 0, facts["steps"], {"ssl": facts})
    return path


def _ssl_child(spec_json: dict[str, Any], out: str, level: int) -> None:
    """Entry point of the spawned pretraining process: write ``{"path"}`` (or the error) to ``out`` as JSON."""
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("labelsmart").setLevel(level)
    exit_with_parent()
    try:
        payload: dict[str, Any] = {"path": str(run_ssl(BenchSpec.from_json(spec_json)))}
    except Exception as exc:
        log.debug("self-supervised pretraining failed", exc_info=True)
        payload = {"error": f"{type(exc).__name__}: {' '.join(str(exc).split())}", "user": isinstance(exc, ValueError)}
    imageio.atomic_write_bytes(Path(out), json.dumps(payload).encode())


def _ssl_before_cells(spec: BenchSpec) -> None:
    """Make the self-supervised checkpoint the net cells start from (in a spawned process when cells are)."""
    if not spec.ssl or not any(r in NET_ROWS for r in spec.rows) or ssl_checkpoint_path(spec).is_file():
        return
    if not spec.isolate:
        run_ssl(spec)
        return
    payload = run_spawned(_ssl_child, (spec.to_json(),), "self-supervised pretraining", "labeleff-ssl-")
    if "error" in payload:
        raise (BenchError if payload.get("user") else RuntimeError)(payload["error"])


def _run_rf(
    spec: BenchSpec, pool: DataFolder, names: list[str], masks: list[np.ndarray]
) -> tuple[Callable[[np.ndarray], np.ndarray], dict[str, Any]]:
    """Fit the random-forest peer; returns ``(predict, facts)``."""
    from labelsmart.bench.rf_baseline import N_ESTIMATORS, RandomForestPeer

    t0 = time.monotonic()
    peer = RandomForestPeer(seed=0, n_jobs=spec.threads or os.cpu_count() or 1)
    peer.fit(len(names), lambda i: (pool.read(names[i])[0], masks[i]), masks)
    facts = {
        "train_seconds": round(time.monotonic() - t0, 2),
        "steps": None,
        "device": "cpu",
        "gpu": None,
        "threads": peer.n_jobs,
        "rf_trees": N_ESTIMATORS,
        "rf_pixels": peer.fitted_pixels,
    }
    return peer.predict, facts


def run_cell(spec: BenchSpec, cell: Cell, eval_splits: Sequence[str]) -> list[dict[str, Any]]:
    """Train one cell and score it on each evaluation split; one record per split (not yet written).

    Raises:
        BenchError: bad input; anything else the training raises.
    """
    from tqdm import tqdm

    pool = DataFolder.open(spec.pool, "--pool")
    evald = DataFolder.open(spec.eval, "--eval")
    names = select_subset(pool.names(spec.pool_split), cell.n_labeled)
    masks = [make_labels(pool.read(n)[1], cell.labels) for n in names]
    labelled = int(sum(int((m != IGNORE_INDEX).sum()) for m in masks))
    if cell.row == "rf":
        predict, facts = _run_rf(spec, pool, names, masks)
        predictors = {"plain": predict}
    elif cell.row in NET_ROWS:
        predictors, facts = _run_net(spec, cell, pool, names, masks)
    else:
        raise BenchError(f"--rows {cell.row}: unknown row; use {', '.join(ROWS)}.")
    records = []
    for split, mode in ((split, mode) for split in eval_splits for mode in predictors):
        eval_names = evald.names(split)
        t0 = time.monotonic()
        with tqdm(
            total=len(eval_names), desc=f"  eval {split} {mode}", unit="img", file=sys.stderr, leave=False
        ) as bar:
            res = evaluate(predictors[mode], evald, eval_names, bar)
        records.append(
            {
                "row": cell.row,
                "variant": spec.variant if cell.row in NET_ROWS else "",
                "inference": mode,
                "n_labeled": cell.n_labeled,
                "labels": cell.labels,
                "eval_split": split,
                "miou": res["miou"],
                "per_class_iou": {evald.classes[k]: v for k, v in res["per_class_iou"].items()},
                "pixel_acc": res["pixel_acc"],
                "labelled_pixels": labelled,
                "labelled_fraction": labelled / float(sum(m.size for m in masks)),
                "eval_images": res["images"],
                "eval_seconds": round(time.monotonic() - t0, 2),
                **facts,
                "budget": spec.budget() if cell.row in NET_ROWS else "rf",
                "budget_steps": spec.steps,
                "budget_minutes": spec.minutes,
                "seed": spec.seed,
                "pool": str(spec.pool),
                "pool_split": spec.pool_split,
                "eval": str(spec.eval),
                "images": names,
                "cell": cell.key(spec),
                **provenance(),
            }
        )
    peak = {"peak_rss_mb": round(peak_rss_mb(), 1), "peak_rss_children_mb": round(peak_rss_children_mb(), 1)}
    for r in records:
        r.update(peak)
    return records


def _cell_child(spec_json: dict[str, Any], cell: tuple[str, int, str], splits: list[str], out: str, level: int) -> None:
    """Entry point of a spawned cell process: write the records (or the error) to ``out`` as JSON."""
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("labelsmart").setLevel(level)
    logging.getLogger("labelsmart.store").setLevel(max(level, logging.WARNING))  # one line per saved label
    exit_with_parent()
    try:
        records = run_cell(BenchSpec.from_json(spec_json), Cell(*cell), splits)
        payload: dict[str, Any] = {"records": records}
    except Exception as exc:  # reported by the parent, which goes on with the next cell
        log.debug("cell failed", exc_info=True)
        payload = {"error": f"{type(exc).__name__}: {' '.join(str(exc).split())}", "user": isinstance(exc, ValueError)}
    imageio.atomic_write_bytes(Path(out), json.dumps(payload).encode())


def _run_isolated(spec: BenchSpec, cell: Cell, splits: list[str]) -> list[dict[str, Any]]:
    """Run a cell in a spawned process (own memory peak; a crash ends the cell, not the run)."""
    payload = run_spawned(
        _cell_child,
        (spec.to_json(), (cell.row, cell.n_labeled, cell.labels), splits),
        f"cell {cell.key(spec)}",
        "labeleff-cell-",
    )
    if "error" in payload:
        raise (BenchError if payload.get("user") else RuntimeError)(payload["error"])
    return payload["records"]


# --------------------------------------------------------------------------------------------- the run


def read_results(path: Path) -> list[dict[str, Any]]:
    """Records of a ``results.jsonl``; a partial last line (an interrupted append) is skipped."""
    out: list[dict[str, Any]] = []
    if not path.is_file():
        return out
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict):
                out.append(rec)
    return out


def _append(path: Path, records: Iterable[dict[str, Any]]) -> None:
    """Append JSON lines and make them durable before the next cell starts."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file() and path.stat().st_size:
        with open(path, "rb") as fh:
            fh.seek(-1, os.SEEK_END)
            partial = fh.read(1) != b"\n"
        if partial:  # an interrupted append: start a fresh line
            with open(path, "ab") as fh:
                fh.write(b"\n")
    with open(path, "a", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def check_spec(spec: BenchSpec) -> None:
    """Fail early, with one sentence, on anything that would only fail inside a cell.

    Raises:
        BenchError: unknown rows or label forms, bad N, bad budget, missing splits, classes that differ,
            labelled images inside an evaluation split.
    """
    for r in spec.rows:
        if r not in ROWS:
            raise BenchError(f"--rows {r}: unknown row; use any of {', '.join(ROWS)}.")
    for lf in spec.labels:
        if lf not in LABEL_FORMS:
            raise BenchError(f"--labels {lf}: unknown label form; use dense and/or scribble.")
    if not spec.n_labeled or any(n < 1 for n in spec.n_labeled):
        raise BenchError("--n-labeled: give image counts of 1 or more separated by commas, such as 5,20,50.")
    if spec.steps is not None and spec.steps < 1:
        raise BenchError(f"--steps {spec.steps}: give 1 or more.")
    if spec.minutes is not None and not (spec.minutes > 0 and math.isfinite(spec.minutes)):
        raise BenchError(f"--minutes {spec.minutes}: give a positive number of minutes.")
    if spec.ssl_steps is not None and spec.ssl_steps < 1:
        raise BenchError(f"--ssl-steps {spec.ssl_steps}: give 1 or more.")
    if spec.ssl_minutes is not None and not (spec.ssl_minutes > 0 and math.isfinite(spec.ssl_minutes)):
        raise BenchError(f"--ssl-minutes {spec.ssl_minutes}: give a positive number of minutes.")
    for mode in spec.inference:
        if mode not in INFERENCE:
            raise BenchError(f"--inference {mode}: unknown mode; use any of {', '.join(INFERENCE)}.")
    if not spec.inference:
        raise BenchError("--inference: give at least one mode, such as plain.")
    for key in spec.overrides:
        if not key.startswith(("train.", "model.", "preprocess.")):
            raise BenchError(f"--set {key}: only train.*, model.* and preprocess.* settings can be changed.")
    pool = DataFolder.open(spec.pool, "--pool")
    evald = DataFolder.open(spec.eval, "--eval")
    pool_names = pool.names(spec.pool_split)
    for n in spec.n_labeled:
        select_subset(pool_names, n)
    if list(pool.classes) != list(evald.classes):
        raise BenchError(
            f"{spec.eval / 'classes.json'}: its classes differ from {spec.pool / 'classes.json'}; evaluate on a "
            "folder with the same classes."
        )
    same_folder = spec.pool.resolve() == spec.eval.resolve()
    biggest = set(select_subset(pool_names, max(spec.n_labeled)))
    for split in spec.eval_splits:
        names = evald.names(split)
        if same_folder and biggest & set(names):
            clash = sorted(biggest & set(names))[0]
            raise BenchError(
                f"{spec.pool / 'splits.json'}: labelled image {clash} of split {spec.pool_split!r} is also in "
                f"evaluation split {split!r}; pick disjoint splits (such as train_no_0006R0 and seq_0006R0)."
            )


def _terminate_as_interrupt() -> Any:
    """SIGTERM (``timeout``, a job scheduler) ends the run like Ctrl-C: the running cell's process is stopped too.

    Returns:
        The previous handler (to restore), or None where no handler can be set (not the main thread).
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    return signal.signal(signal.SIGTERM, handler)


def run_benchmark(spec: BenchSpec) -> list[dict[str, Any]]:
    """Run (or resume) every cell of ``spec``; returns all records of this run's cells.

    Raises:
        BenchError: bad input (before any cell runs).
        RuntimeError: some cells failed (the others are done and written; the errors are in ``errors.jsonl``).
    """
    from tqdm import tqdm

    check_spec(spec)
    spec.out.mkdir(parents=True, exist_ok=True)
    previous_sigterm = _terminate_as_interrupt()
    results = spec.out / RESULTS_NAME
    cells = cells_of(spec)
    eval_key = _folder_key(spec.eval)
    done = {(r.get("cell"), _folder_key(r.get("eval")), r.get("eval_split")) for r in read_results(results)}
    failed: list[str] = []
    bar = tqdm(total=len(cells), desc="label-efficiency", unit="cell", file=sys.stderr, dynamic_ncols=True)
    try:
        if any(not {(c.key(spec), eval_key, s) for s in spec.eval_splits} <= done for c in cells if c.row in NET_ROWS):
            _ssl_before_cells(spec)  # once, before the net cells that start from it
        for cell in cells:
            key = cell.key(spec)
            todo = [s for s in spec.eval_splits if (key, eval_key, s) not in done]
            bar.set_postfix_str(key)
            if not todo:
                log.info("cell %s: finished in an earlier run, skipped", key)
                bar.update(1)
                continue
            try:
                records = _run_isolated(spec, cell, todo) if spec.isolate else run_cell(spec, cell, todo)
            except (ValueError, RuntimeError) as exc:  # BenchError, DatasetError, a failed cell
                log.error("cell %s failed: %s", key, exc)
                failed.append(key)
                _append(
                    spec.out / ERRORS_NAME,
                    [{"cell": key, "error": str(exc), "date": dt.datetime.now(dt.UTC).isoformat()}],
                )
                bar.update(1)
                continue
            _append(results, records)
            done.update((key, eval_key, s) for s in todo)
            for r in records:
                log.info(
                    "%s on %s: mIoU %.1f, pixel acc %.1f, %s train s, peak RSS %.0f MB",
                    key,
                    r["eval_split"],
                    100 * r["miou"],
                    100 * r["pixel_acc"],
                    r["train_seconds"],
                    r["peak_rss_mb"],
                )
            write_reports(spec.out)
            bar.update(1)
    finally:
        bar.close()
        if previous_sigterm is not None:
            import signal

            signal.signal(signal.SIGTERM, previous_sigterm)
    write_reports(spec.out)
    if failed:
        raise RuntimeError(f"{len(failed)} cell(s) failed ({', '.join(failed)}); see {spec.out / ERRORS_NAME}.")
    keys = {c.key(spec) for c in cells}
    return [r for r in read_results(results) if r.get("cell") in keys and _folder_key(r.get("eval")) == eval_key]


# ------------------------------------------------------------------------------------------------ reports


def _row_name(r: dict[str, Any]) -> str:
    """``row``, ``row (variant)``, ``row (variant, inference)``: what a table calls a record."""
    details = [r["variant"]] if r.get("variant") else []
    details += [r["inference"]] if r.get("inference", "plain") != "plain" else []
    return f"{r['row']} ({', '.join(details)})" if details else r["row"]


def _groups(records: list[dict[str, Any]]) -> dict[tuple[str, str, str], list[dict[str, Any]]]:
    """Records by (evaluation split, pool split, net budget); rf records join every net budget of their
    splits (or stand alone where no network ran on them)."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    budgets: dict[tuple[str, str], set[str]] = {}
    for r in records:
        if r["row"] != "rf":
            budgets.setdefault((r["eval_split"], r["pool_split"]), set()).add(r["budget"])
    for r in records:
        splits = (r["eval_split"], r["pool_split"])
        for b in [r["budget"]] if r["row"] != "rf" else sorted(budgets.get(splits, {"rf"})):
            groups.setdefault((*splits, b), []).append(r)
    return groups


def format_table(records: list[dict[str, Any]]) -> str:
    """Markdown: one table of mIoU per (evaluation split, budget), then one detail line per record."""
    if not records:
        return "No finished cells yet.\n"
    lines: list[str] = []
    for (split, pool_split, budget), recs in sorted(_groups(records).items()):
        ns = sorted({r["n_labeled"] for r in recs})
        lines += [
            f"**{pool_split} → {split}**, budget {budget}: mIoU (%) by labelled images N",
            "",
            "| row | labels | " + " | ".join(f"N={n}" for n in ns) + " |",
            "|---|---|" + "---:|" * len(ns),
        ]
        by: dict[tuple[str, str], dict[int, float]] = {}
        for r in recs:
            by.setdefault((_row_name(r), r["labels"]), {})[r["n_labeled"]] = 100 * r["miou"]
        for (row, lf), vals in sorted(by.items(), key=lambda kv: (_row_order(kv[0][0]), kv[0][1])):
            cells = [f"{vals[n]:.1f}" if n in vals else "" for n in ns]
            lines.append(f"| {row} | {lf} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [
        "| row | labels | N | pool → eval | budget | mIoU | pixel acc | labelled px | steps | train s "
        "| peak RSS MB | device |",
        "|---|---|---:|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in sorted(
        records, key=lambda r: (r["eval_split"], r["budget"], r["n_labeled"], r["labels"], _row_order(_row_name(r)))
    ):
        lines.append(
            f"| {_row_name(r)} | {r['labels']} | {r['n_labeled']} | {r['pool_split']} → {r['eval_split']} | "
            f"{r['budget']} | {100 * r['miou']:.1f} | {100 * r['pixel_acc']:.1f} | {r['labelled_pixels']} | "
            f"{r['steps'] if r['steps'] is not None else '–'} | {r['train_seconds']:.0f} | {r['peak_rss_mb']:.0f} | "
            f"{r.get('gpu') or r['device']} |"
        )
    return "\n".join(lines) + "\n"


def _row_order(name: str) -> tuple[int, str]:
    base = name.split(" ")[0]
    return (ROWS.index(base) if base in ROWS else len(ROWS), name)


def plot(records: list[dict[str, Any]], path: Path) -> None:
    """mIoU against labelled images: one panel per (evaluation split, budget), one line per row and label form
    (dense solid, scribble dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted(_groups(records).items())
    fig, axes = plt.subplots(1, max(1, len(groups)), figsize=(5.2 * max(1, len(groups)), 4.2), squeeze=False)
    names = sorted({_row_name(r) for r in records}, key=_row_order)
    colors = {n: f"C{i}" for i, n in enumerate(names)}
    for ax, ((split, pool_split, budget), recs) in zip(axes[0], groups, strict=False):
        for name in names:
            for lf, style in (("dense", "-"), ("scribble", "--")):
                pts = sorted(
                    (r["n_labeled"], 100 * r["miou"]) for r in recs if _row_name(r) == name and r["labels"] == lf
                )
                if pts:
                    ax.plot(*zip(*pts, strict=True), style, marker="o", color=colors[name], label=f"{name}, {lf}")
        ns = sorted({r["n_labeled"] for r in recs})
        ax.set_xscale("log")
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.minorticks_off()
        ax.set_xlabel("labelled images N")
        ax.set_ylabel("mIoU (%)")
        ax.set_ylim(0, max(100 * r["miou"] for r in recs) + 8)  # from 0, so gaps look as big as they are
        ax.set_title(f"{pool_split} → {split}, {budget}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    imageio.atomic_write_bytes(path, buf.getvalue())


def write_reports(out: Path) -> None:
    """Rewrite ``table.md`` and the plot from everything in ``results.jsonl``."""
    records = read_results(out / RESULTS_NAME)
    imageio.atomic_write_bytes(out / TABLE_NAME, format_table(records).encode())
    if records:
        plot(records, out / PLOT_NAME)
