"""The product's commands: train | export | preannotate | evaluate | export-labels | import-labels | add-user
(``python -m labelsmart`` adds ``bench``).

Every command logs to stderr, prints its results to stdout, and ends a user error (bad path, unreadable
file, wrong model) with one ``error: <sentence>`` line on stderr and a non-zero exit code, not a traceback.
Heavy modules (torch, through the trainer and the exporter) are imported only by the commands that need
them, so ``preannotate`` and ``evaluate`` run without torch.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, TypeAlias

from labelsmart import config, imageio

if TYPE_CHECKING:
    from labelsmart.preannotate.pipeline import Journal, Outcome
    from labelsmart.store import Store

log = logging.getLogger(__name__)

DESCRIPTION = "labelsmart: label images for semantic segmentation with a fraction of the usual labels."
EXIT_OK = 0
EXIT_FAILED = 1  # a user error, or preannotate with images that failed
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


SubParsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
# Adds subcommands to the parser's subparsers (``bench`` comes this way, from labelsmart/bench/cli.py).
CommandGroup = Callable[[SubParsers], None]


class CliError(ValueError):
    """A user error found by the CLI itself; the message is the one sentence printed."""


# ------------------------------------------------------------------------------------------------ helpers


def _setup_logging(verbose: bool = False) -> None:
    """Our INFO (DEBUG with -v) to stderr, other libraries' WARNING; leaves configured logging alone (tests)."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("labelsmart").setLevel(logging.DEBUG if verbose else logging.INFO)


def _user_error_types() -> tuple[type[BaseException], ...]:
    from labelsmart.imageio import ImageError
    from labelsmart.project import ProjectError
    from labelsmart.store import StoreError

    return (CliError, ImageError, StoreError, ProjectError, ValueError, FileNotFoundError)


def _disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` is a write that failed because the disk (or the user's quota) is full."""
    from labelsmart.imageio import DISK_FULL_ERRNOS

    return isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS


def _one_line(exc: BaseException) -> str:
    """The user-facing sentence of an exception, on one line."""
    if isinstance(exc, FileNotFoundError) and exc.filename:
        return f"{exc.filename}: not found; check the path."
    if _disk_full(exc):
        where = getattr(exc, "filename", None) or "a file"
        return f"{where}: the disk is full, so it was not written; free space and run the command again."
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


class TrainProgress:
    """Prints a training round's progress (``{"stage", "step", "total", "loss", "eta_s", ...}``) with tqdm.

    One bar per stage; the loss and the estimated time left go in the bar's postfix.
    """

    def __init__(self, file: TextIO | None = None) -> None:
        self.file = file or sys.stderr
        self.stage: str | None = None
        self.bar: Any = None

    def __call__(self, info: dict[str, Any]) -> None:
        """Update the bar from one progress report."""
        from tqdm import tqdm

        stage = str(info.get("stage", "training"))
        total = info.get("total")
        if stage != self.stage:
            self.close()
            self.stage = stage
            self.bar = tqdm(
                total=int(total) if total else None,
                desc=stage,
                unit="step",
                file=self.file,
                dynamic_ncols=True,
                mininterval=0.5,
            )
        step = info.get("step")
        if step is not None and self.bar is not None:
            if total and self.bar.total != int(total):
                self.bar.total = int(total)
            self.bar.n = int(step)
            post = {}
            if info.get("loss") is not None:
                post["loss"] = f"{float(info['loss']):.4f}"
            if info.get("eta_s") is not None:
                post["eta"] = f"{float(info['eta_s']):.0f}s"
            self.bar.set_postfix(post, refresh=False)
            self.bar.refresh()

    def close(self) -> None:
        """Close the open bar."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _metrics_line(metrics: dict[str, Any]) -> str:
    keys = ("miou", "val_miou", "pixel_acc", "steps", "train_seconds", "round_seconds", "device")
    parts = [f"{k}={metrics[k]}" for k in keys if k in metrics]
    return "metrics: " + (" ".join(parts) if parts else json.dumps(metrics, sort_keys=True, default=str))


# ------------------------------------------------------------------------------------------------- train


def cmd_train(args: argparse.Namespace) -> int:
    """One training round on a project, headless."""
    from labelsmart.project import open_project
    from labelsmart.training import trainer

    cfg = config.load(
        _flags(
            args,
            "dataset",
            "workdir",
            "models_dir",
            "classes",
            "import_masks",
            "steps",
            "minutes",
            "device",
            "arch",
            "encoder",
            "max_side",
            "threads",
        )
    )
    store = open_project(cfg)
    progress = TrainProgress()
    try:
        row = trainer.run_one_round(cfg, store, steps=args.steps, progress=progress)
    except trainer.TrainerError as exc:
        raise CliError(str(exc)) from exc
    finally:
        progress.close()
    print(f"published model v{row.version}: {row.onnx}")
    print(_metrics_line(row.metrics))
    return EXIT_OK


def _flags(args: argparse.Namespace, *names: str) -> dict[str, Any]:
    return {n: getattr(args, n, None) for n in names}


# ------------------------------------------------------------------------------------------------ export


def cmd_export(args: argparse.Namespace) -> int:
    """ONNX export of the newest published model of a project, or of a given checkpoint."""
    from labelsmart.training import export

    metrics: dict[str, Any] | None = None
    if args.checkpoint is not None:
        ckpt = Path(args.checkpoint)
        if not ckpt.is_file():
            raise CliError(f"{ckpt}: checkpoint not found; pass --checkpoint a model.pt file.")
        default_name = ckpt.parent.name if ckpt.stem == "model" else ckpt.stem
    else:
        from labelsmart.store import version_name

        cfg, store = _open_project_store(args)
        row = store.latest_published()
        if row is None:
            raise CliError(f"{cfg.dataset}: the project has no published model yet; train one first.")
        ckpt = row.checkpoint
        if not ckpt.is_file():
            raise CliError(f"{ckpt}: checkpoint of model v{row.version} is missing from the registry; train again.")
        metrics = dict(row.metrics)
        default_name = f"{cfg.project}-{version_name(row.version)}"
    out = Path(args.out) if args.out else Path(config.Config().exports_dir) / f"{default_name}.onnx"
    if out.suffix != ".onnx":
        raise CliError(f"{out}: the output must end in .onnx; pass --out exports/NAME.onnx.")
    try:
        export.export_onnx(ckpt, out, metrics=metrics)
    except export.ExportError as exc:
        raise CliError(str(exc)) from exc
    print(f"model: {out}")
    print(f"sidecar: {out.with_suffix('.json')}")
    return EXIT_OK


# ------------------------------------------------------------------------------------------- preannotate


class PreannotateProgress:
    """A pre-annotation run's bookkeeping: the journal (manifest, errors), a tqdm bar and the counts.

    ``on_outcome`` takes the engine's result per image; ``todo`` streams the images to do, counting those
    done by an earlier run and failing those that cannot be done.
    """

    def __init__(self, journal: Journal, total: int) -> None:
        from tqdm import tqdm

        self.journal = journal
        self.counts = {"done": 0, "skipped": 0, "failed": 0}
        self.bar = tqdm(
            total=total, unit="img", desc="pre-annotating", file=sys.stderr, dynamic_ncols=True, mininterval=0.5
        )
        self.t0 = time.perf_counter()

    def fail(self, rel: Path, message: str) -> None:
        """Count a failed image, say so above the bar and list it in ``errors.jsonl``."""
        self.counts["failed"] += 1
        self.bar.write(f"skipped {rel.as_posix()}: {message}", file=sys.stderr)
        self.journal.error(rel, message)

    def on_outcome(self, outcome: Outcome) -> None:
        """One image finished: its manifest line (written only after its files landed), or its error."""
        if outcome.error is not None:
            self.fail(outcome.rel, outcome.error)
        else:
            assert outcome.record is not None
            self.journal.record(outcome.record)
            self.counts["done"] += 1
        self.bar.update(1)
        if self.counts["done"]:
            rate = self.counts["done"] / (time.perf_counter() - self.t0)
            self.bar.set_postfix({"img/s": f"{rate:.1f}"}, refresh=False)

    def todo(self, images: Path, out: Path, overwrite: bool) -> Iterator[Path]:
        """The images to do, in listing order (see :func:`labelsmart.preannotate.pipeline.plan`)."""
        from labelsmart.preannotate import pipeline

        for planned in pipeline.plan(images, out, overwrite, self.journal.done_before):
            if planned.action == "do":
                yield planned.rel
                continue
            if planned.action == "skip":
                self.counts["skipped"] += 1
            else:
                self.fail(planned.rel, planned.message)
            self.bar.update(1)

    def close(self) -> None:
        """Make the journal durable and close the bar."""
        self.journal.close()
        self.bar.close()


def _check_preannotate_args(args: argparse.Namespace) -> None:
    images, out = Path(args.images), Path(args.out)
    if not images.is_dir():
        raise CliError(f"{images}: not a folder; pass --images a folder of images.")
    if out.resolve() == images.resolve():
        raise CliError(f"{out}: --out is the images folder, and masks would overwrite PNG images; pick another folder.")
    if args.batch < 1:
        raise CliError(f"--batch {args.batch}: give a batch size of 1 or more.")
    if args.io_threads < 1:
        raise CliError(f"--io-threads {args.io_threads}: give 1 or more.")
    if args.address and args.engine != "ray":
        raise CliError("--address is the Ray cluster to use; add --engine ray.")


def cmd_preannotate(args: argparse.Namespace) -> int:
    """Pre-annotate a folder of images with an ONNX model: index masks, overlays, a manifest, optionally COCO.

    Decoding, inference and writing overlap (see :mod:`labelsmart.preannotate.pipeline`); ``--engine ray`` runs
    the same work on a Ray cluster (see :mod:`labelsmart.preannotate.ray_engine`). Images done by an earlier run
    are skipped.
    """
    from labelsmart.preannotate import coco, pipeline
    from labelsmart.serving.onnx_model import OnnxModel

    _check_preannotate_args(args)
    images, out = Path(args.images), Path(args.out)
    model = OnnxModel(Path(args.model), threads=args.threads or None, device=args.device)
    out.mkdir(parents=True, exist_ok=True)
    total = sum(1 for _ in pipeline.walk_inputs(images, out))
    log.info(
        "pre-annotating %d images from %s into %s with model v%d on %s (%s engine)",
        total,
        images,
        out,
        model.version,
        ", ".join(model.providers),
        args.engine,
    )
    run = PreannotateProgress(pipeline.Journal(out, args.overwrite), total)
    try:
        todo = run.todo(images, out, args.overwrite)
        if args.engine == "ray":
            from labelsmart.preannotate import ray_engine

            ray_engine.run_ray(
                Path(args.model),
                images,
                out,
                list(todo),
                run.on_outcome,
                batch_size=args.batch,
                threads=args.threads,
                device=args.device,
                overlays=args.overlays,
                address=args.address,
            )
        else:
            pipeline.run_local(
                model,
                images,
                out,
                todo,
                run.on_outcome,
                batch=args.batch,
                io_threads=args.io_threads,
                overlays=args.overlays,
                postprocess=pipeline.choose_postprocess(args.postprocess, model.providers),
            )
    finally:
        run.close()
    seconds = time.perf_counter() - run.t0
    counts = run.counts
    rate = counts["done"] / seconds if counts["done"] and seconds > 0 else 0.0
    if args.coco is not None:
        coco_path = Path(args.coco) if args.coco else out / "coco.json"
        n_img, n_ann = coco.write_coco(out, coco_path, model.class_names)
        print(f"coco: {coco_path} ({n_img} images, {n_ann} annotations)")
    print(f"{counts['done']} images in {seconds:.1f} s ({rate:.2f} images/s)", file=sys.stderr)
    print(f"done={counts['done']} skipped={counts['skipped']} failed={counts['failed']}")
    if counts["failed"]:
        print(f"failed images are listed in {run.journal.errors_path}", file=sys.stderr)
    return EXIT_FAILED if counts["failed"] else EXIT_OK


# ---------------------------------------------------------------------------------------------- evaluate


def cmd_evaluate(args: argparse.Namespace) -> int:
    """mIoU, per-class IoU and pixel accuracy of an ONNX model on a labelled split."""
    from tqdm import tqdm

    from labelsmart.datasets import DataFolder, evaluate
    from labelsmart.serving.onnx_model import OnnxModel

    folder = DataFolder.open(Path(args.dataset), "--dataset")
    names_in_split = folder.names(args.split)
    model_path = Path(args.model)
    classes = list(folder.classes)
    model = OnnxModel(model_path, threads=args.threads or None, device=args.device)
    k = model.num_classes
    if k != len(classes):
        raise CliError(
            f"{model_path}: the model predicts {k} classes but {folder.root / 'classes.json'} lists "
            f"{len(classes)}; evaluate a model trained on these classes."
        )
    if model.class_names != classes:
        log.warning("class names differ: model %s, data set %s (evaluating by id)", model.class_names, classes)
    with tqdm(
        total=len(names_in_split),
        desc=f"evaluating {args.split}",
        unit="img",
        file=sys.stderr,
        dynamic_ncols=True,
        mininterval=0.5,
    ) as bar:
        res = evaluate(lambda image: model.predict(image).mask, folder, names_in_split, progress=bar)
    per_class = {classes[i]: res["per_class_iou"].get(i) for i in range(k)}
    report = {
        "miou": res["miou"],
        "per_class_iou": per_class,
        "pixel_acc": res["pixel_acc"],
        "images": len(names_in_split),
        "split": args.split,
        "model": str(model_path),
        "model_version": model.version,
    }
    out = Path(args.out) if args.out else model_path.with_name(f"{model_path.stem}.eval-{args.split}.json")
    imageio.atomic_write_bytes(out, (json.dumps(report, indent=2) + "\n").encode())
    width = max(len(c) for c in classes)
    for name, iou in per_class.items():
        print(f"  {name:<{width}}  IoU {_fmt(iou)}")
    print(f"report: {out}")
    print(f"split={args.split} images={len(names_in_split)} mIoU={res['miou']:.4f} pixel_acc={res['pixel_acc']:.4f}")
    return EXIT_OK


# ------------------------------------------------------------------------------------------------ parser


def _add_train(sub: SubParsers) -> None:
    """``train``: one training round, headless."""
    t = sub.add_parser("train", help="one training round on a project, headless")
    t.add_argument("--dataset", required=True, help="folder of images (or images/ + masks/ + classes.json)")
    t.add_argument("--workdir", help="project state folder (default DIR/.labelsmart)")
    t.add_argument("--models-dir", dest="models_dir", help="model registry (default models/)")
    t.add_argument("--classes", help="classes file: JSON list of names or of {name, color}")
    t.add_argument("--import-masks", dest="import_masks", help="folder of <stem>.png masks to import as labels")
    t.add_argument("--steps", type=int, help="optimisation steps of the round")
    t.add_argument("--minutes", type=float, help="wall-clock cap of the round in minutes")
    t.add_argument("--device", choices=("auto", "cpu", "cuda"), help="training device")
    t.add_argument("--arch", help="segmentation_models_pytorch architecture (DeepLabV3Plus, Unet, FPN, ...)")
    t.add_argument("--encoder", help="encoder name (tu-resnet10t, resnet18, ...)")
    t.add_argument("--max-side", dest="max_side", type=int, help="working scale: longer image side in pixels")
    t.add_argument("--threads", type=int, help="CPU threads for training (0 = all cores)")
    t.set_defaults(func=cmd_train)


def _add_export(sub: SubParsers) -> None:
    """``export``: ONNX export of the newest published model or of a checkpoint."""
    e = sub.add_parser("export", help="ONNX export (with sidecar JSON) of the newest model or a checkpoint")
    src = e.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", help="project whose newest published model to export")
    src.add_argument("--checkpoint", help="a model.pt checkpoint")
    e.add_argument("--workdir", help="project state folder (with --dataset)")
    e.add_argument("--models-dir", dest="models_dir", help="model registry (with --dataset)")
    e.add_argument("--out", help="output .onnx path (default exports/<project>-vNNNN.onnx)")
    e.set_defaults(func=cmd_export)


def _add_preannotate(sub: SubParsers) -> None:
    """``preannotate``: a folder of images through an ONNX model."""
    a = sub.add_parser("preannotate", help="pre-annotate a folder of images with an ONNX model (resumable)")
    a.add_argument("--model", required=True, help="exported .onnx file (its sidecar .json beside it)")
    a.add_argument("--images", required=True, help="folder of images (nested folders included)")
    a.add_argument("--out", required=True, help="output folder: masks, overlays, manifest.jsonl, errors.jsonl")
    a.add_argument("--overwrite", action="store_true", help="redo images that already have a mask")
    a.add_argument("--batch", type=int, default=4, help="images per inference run (default 4)")
    a.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (default all cores)")
    a.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="inference device")
    a.add_argument(
        "--io-threads",
        dest="io_threads",
        type=int,
        default=2,
        help="threads that decode and write while the model runs (default 2)",
    )
    a.add_argument("--no-overlays", dest="overlays", action="store_false", help="write masks only, no overlay JPEGs")
    a.add_argument(
        "--coco",
        nargs="?",
        const="",
        default=None,
        metavar="PATH",
        help="also write one COCO JSON with RLE masks for the folder (default OUT/coco.json)",
    )
    a.add_argument(
        "--engine",
        choices=("local", "ray"),
        default="local",
        help="local (this machine) or ray (a Ray cluster; pip install -r requirements-ray.txt)",
    )
    a.add_argument("--address", help="Ray cluster address (default: start a local Ray instance)")
    a.add_argument(
        "--postprocess",
        choices=("auto", "host", "graph"),
        default="auto",
        help="logits to masks on the host or inside ONNX Runtime (auto: graph on CUDA, host on the CPU)",
    )
    a.set_defaults(func=cmd_preannotate)


def _add_evaluate(sub: SubParsers) -> None:
    """``evaluate``: mIoU of an ONNX model on a split of a data folder."""
    v = sub.add_parser("evaluate", help="mIoU of an ONNX model on a labelled split")
    v.add_argument("--model", required=True, help="exported .onnx file")
    v.add_argument("--dataset", required=True, help="folder with images/, masks/, splits.json, classes.json")
    v.add_argument("--split", required=True, help="split name in splits.json")
    v.add_argument("--out", help="report JSON (default <model stem>.eval-<split>.json beside the model)")
    v.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (default all cores)")
    v.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="inference device")
    v.set_defaults(func=cmd_evaluate)


def _open_project_store(args: argparse.Namespace) -> tuple[config.Config, Store]:
    """The configuration and the store of the project ``--dataset`` (and ``--workdir``) name, which must exist."""
    from labelsmart.store import Store

    cfg = config.load(_flags(args, "dataset", "workdir", "models_dir"))
    if cfg.dataset is None or cfg.workdir is None or not cfg.db_path.is_file():
        raise CliError(
            f"{args.dataset}: no labelsmart project here yet; open it once with `python app.py --dataset DIR` "
            "or `python -m labelsmart train --dataset DIR`."
        )
    store = Store(cfg.db_path, image_root=cfg.image_root)
    store.resolve_model_paths(cfg.project_models_dir)
    return cfg, store


def cmd_export_labels(args: argparse.Namespace) -> int:
    """The project's labels, out in a format other tools read (png, voc, coco, labelstudio, cvat)."""
    from tqdm import tqdm

    from labelsmart import formats

    cfg, store = _open_project_store(args)
    predictions = None
    if args.include == "predictions":
        from labelsmart.preannotate.project import unlabelled_predictions

        predictions = unlabelled_predictions(store, cfg)
    if (args.as_predictions or args.image_url) and args.format != "labelstudio":
        raise CliError("--as-predictions and --image-url are options of --format labelstudio.")
    options = formats.ExportOptions(
        revisions=args.revisions,
        predictions=predictions,
        as_predictions=args.as_predictions,
        image_url=args.image_url or "",
    )
    with tqdm(desc=f"exporting {args.format}", unit="img", file=sys.stderr, dynamic_ncols=True, mininterval=0.5) as bar:

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.n = done
            bar.refresh()

        n = formats.export_labels(store, args.format, Path(args.out), progress=progress, options=options)
    print(f"{n} label revisions of {len(store.images())} images in {args.out} ({args.format})")
    return EXIT_OK


def cmd_import_labels(args: argparse.Namespace) -> int:
    """Labels in: an export in one of the formats (of labelsmart or another tool) as label revisions."""
    from labelsmart import formats

    _, store = _open_project_store(args)
    n = formats.import_labels(store, args.format, Path(args.path), author=args.author or "import")
    print(f"imported {n} label revisions from {args.path} ({args.format})")
    return EXIT_OK


def _add_labels(sub: SubParsers) -> None:
    """``export-labels`` and ``import-labels``."""
    from labelsmart.formats import FORMATS

    e = sub.add_parser("export-labels", help="the project's labels in a format other tools read")
    e.add_argument("--dataset", required=True, help="the project's folder of images")
    e.add_argument("--workdir", help="project state folder (default DIR/.labelsmart)")
    e.add_argument(
        "--format", required=True, choices=FORMATS, help="png, voc (Pascal VOC), coco (RLE), labelstudio, cvat"
    )
    e.add_argument("--out", required=True, help="a new (or empty) folder for the export")
    e.add_argument(
        "--revisions", choices=("current", "all"), default="current", help="current labels, or the whole history"
    )
    e.add_argument(
        "--include",
        choices=("labels", "predictions"),
        default="labels",
        help="predictions: also the newest model's pre-annotations of images nobody labelled, marked as such",
    )
    e.add_argument(
        "--as-predictions",
        action="store_true",
        help="labelstudio: the labels as predictions (with a model_version) instead of annotations",
    )
    e.add_argument(
        "--image-url",
        help="labelstudio: prefix of each task's image URL, e.g. /data/local-files/?d=images/ (default: none)",
    )
    e.set_defaults(func=cmd_export_labels)
    i = sub.add_parser("import-labels", help="labels in one of those formats as label revisions of the project")
    i.add_argument("--dataset", required=True, help="the project's folder of images")
    i.add_argument("--workdir", help="project state folder (default DIR/.labelsmart)")
    i.add_argument("--format", required=True, choices=FORMATS, help="png, voc, coco, labelstudio or cvat")
    i.add_argument("--author", help="recorded as the author of the imported revisions (default import)")
    i.add_argument("path", help="the export folder, or its JSON / XML / zip file (coco, labelstudio, cvat)")
    i.set_defaults(func=cmd_import_labels)


def cmd_add_user(args: argparse.Namespace) -> int:
    """Add a user to (or change a password in) the users file ``app.py --auth`` reads."""
    import getpass

    from labelsmart import auth

    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass(f"password for {args.name}: ")
        if getpass.getpass("again: ") != password:
            raise CliError("the two passwords differ; run the command again.")
    new = auth.add_user(Path(args.users), args.name, password)
    print(f"{'added user' if new else 'changed the password of'} {args.name} in {args.users}")
    return EXIT_OK


def _add_add_user(sub: SubParsers) -> None:
    """``add-user``: a user of ``app.py --auth``."""
    u = sub.add_parser("add-user", help="add a user (or change a password) in a users file for app.py --auth")
    u.add_argument("--users", required=True, help="users file (created if missing; readable by its owner only)")
    u.add_argument("name", help="user name, recorded as the author of the labels they save")
    u.add_argument("--password-stdin", action="store_true", help="read the password from the first line of stdin")
    u.set_defaults(func=cmd_add_user)


def build_parser(command_groups: Sequence[CommandGroup] = ()) -> argparse.ArgumentParser:
    """The argument parser with the product's subcommands and those ``command_groups`` add."""
    p = argparse.ArgumentParser(prog="python -m labelsmart", description=DESCRIPTION)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands = (_add_train, _add_export, _add_preannotate, _add_evaluate, _add_labels, _add_add_user)
    for register in (*commands, *command_groups):
        register(sub)
    return p


def main(argv: Sequence[str] | None = None, command_groups: Sequence[CommandGroup] = ()) -> int:
    """Run one command; returns the exit code (0 = success).

    Args:
        argv: the arguments (``sys.argv[1:]`` when None).
        command_groups: functions that add more subcommands to the parser's subparsers (``python -m
            labelsmart`` adds the benchmarks' with :func:`labelsmart.bench.cli.register`).
    """
    parser = build_parser(command_groups)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse has printed usage and its one-line error
        return int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE
    _setup_logging(args.verbose)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("error: interrupted; run the command again to resume.", file=sys.stderr)
        return EXIT_INTERRUPTED
    except _user_error_types() as exc:
        log.debug("user error", exc_info=True)
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:  # a full disk no command turned into its own sentence; others keep their traceback
        if not _disk_full(exc):
            raise
        log.debug("disk full", exc_info=True)
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_FAILED
