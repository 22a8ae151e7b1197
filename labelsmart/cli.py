"""``python -m labelsmart``: train | export | preannotate | evaluate | bench.

Every command logs to stderr, prints its results to stdout, and ends a user error (bad path, unreadable
file, wrong model) with one ``error: <sentence>`` line on stderr and a non-zero exit code, not a traceback.
Heavy modules (torch, through the trainer and the exporter) are imported only by the commands that need
them, so ``preannotate`` and ``evaluate`` run without torch.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from labelsmart import config, imageio
from labelsmart.config import IGNORE_INDEX, IMAGE_EXTENSIONS

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1  # a user error, or preannotate with images that failed
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


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


def _one_line(exc: BaseException) -> str:
    """The user-facing sentence of an exception, on one line."""
    if isinstance(exc, FileNotFoundError) and exc.filename:
        return f"{exc.filename}: not found; check the path."
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
    onnx_path = Path(row.path) / "model.onnx"
    print(f"published model v{row.version}: {onnx_path}")
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
        from labelsmart.store import Store

        cfg = config.load(_flags(args, "dataset", "workdir", "models_dir"))
        if cfg.dataset is None or cfg.workdir is None or not cfg.db_path.is_file():
            raise CliError(
                f"{args.dataset}: no labelsmart project here yet; train one with "
                "`python -m labelsmart train --dataset DIR` first."
            )
        store = Store(cfg.db_path, image_root=cfg.image_root)
        row = store.latest_published()
        if row is None:
            raise CliError(f"{cfg.dataset}: the project has no published model yet; train one first.")
        ckpt = Path(row.path) / "model.pt"
        if not ckpt.is_file():
            raise CliError(f"{ckpt}: checkpoint of model v{row.version} is missing from the registry; train again.")
        metrics = dict(row.metrics)
        default_name = f"{cfg.project}-v{row.version:04d}"
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


def cmd_preannotate(args: argparse.Namespace) -> int:
    """Pre-annotate a folder of images with an ONNX model: index masks, overlays, a manifest, optionally COCO.

    Decoding, inference and writing overlap (see :mod:`labelsmart.preannotate.pipeline`); ``--engine ray`` runs
    the same work on a Ray cluster (see :mod:`labelsmart.preannotate.ray_engine`). Images done by an earlier run
    are skipped.
    """
    from tqdm import tqdm

    from labelsmart.preannotate import pipeline as batch
    from labelsmart.serving.predictor import OnnxModel

    images = Path(args.images)
    out = Path(args.out)
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
    model = OnnxModel(Path(args.model), threads=args.threads or None, device=args.device)
    out.mkdir(parents=True, exist_ok=True)
    journal = batch.Journal(out, args.overwrite)
    total = sum(1 for _ in batch.walk_inputs(images, out))
    log.info(
        "pre-annotating %d images from %s into %s with model v%d on %s (%s engine)",
        total,
        images,
        out,
        model.version,
        ", ".join(model.providers),
        args.engine,
    )
    counts = {"done": 0, "skipped": 0, "failed": 0}
    bar = tqdm(total=total, unit="img", desc="pre-annotating", file=sys.stderr, dynamic_ncols=True, mininterval=0.5)
    t0 = time.perf_counter()

    def fail(rel: Path, message: str) -> None:
        counts["failed"] += 1
        tqdm.write(f"skipped {rel.as_posix()}: {message}", file=sys.stderr)
        journal.error(rel, message)

    def on_outcome(outcome: batch.Outcome) -> None:
        if outcome.error is not None:
            fail(outcome.rel, outcome.error)
        else:
            assert outcome.record is not None
            journal.record(outcome.record)  # only after its files landed
            counts["done"] += 1
        bar.update(1)
        if counts["done"]:
            bar.set_postfix({"img/s": f"{counts['done'] / (time.perf_counter() - t0):.1f}"}, refresh=False)

    def todo() -> Iterator[Path]:
        for planned in batch.plan(images, out, args.overwrite, journal.done_before):
            if planned.action == "do":
                yield planned.rel
            else:
                if planned.action == "skip":
                    counts["skipped"] += 1
                else:
                    fail(planned.rel, planned.message)
                bar.update(1)

    try:
        if args.engine == "ray":
            from labelsmart.preannotate import ray_engine

            ray_engine.run_ray(
                Path(args.model),
                images,
                out,
                list(todo()),
                on_outcome,
                batch_size=args.batch,
                threads=args.threads,
                device=args.device,
                overlays=args.overlays,
                address=args.address,
            )
        else:
            batch.run_local(
                model,
                images,
                out,
                todo(),
                on_outcome,
                batch=args.batch,
                io_threads=args.io_threads,
                overlays=args.overlays,
                postprocess=batch.choose_postprocess(args.postprocess, model.providers),
            )
    finally:
        journal.close()
        bar.close()
    seconds = time.perf_counter() - t0
    rate = counts["done"] / seconds if counts["done"] and seconds > 0 else 0.0
    if args.coco is not None:
        coco_path = Path(args.coco) if args.coco else out / "coco.json"
        n_img, n_ann = batch.write_coco(out, coco_path, model.class_names)
        print(f"coco: {coco_path} ({n_img} images, {n_ann} annotations)")
    print(f"{counts['done']} images in {seconds:.1f} s ({rate:.2f} images/s)", file=sys.stderr)
    print(f"done={counts['done']} skipped={counts['skipped']} failed={counts['failed']}")
    if counts["failed"]:
        print(f"failed images are listed in {journal.errors_path}", file=sys.stderr)
    return EXIT_FAILED if counts["failed"] else EXIT_OK


# ---------------------------------------------------------------------------------------------- evaluate


def _find_image(images_dir: Path, name: str) -> Path:
    for ext in (".jpg", ".png", *IMAGE_EXTENSIONS):
        for cand in (images_dir / f"{name}{ext}", images_dir / f"{name}{ext.upper()}"):
            if cand.is_file():
                return cand
    raise CliError(f"{images_dir / name}: no image file with this name (.jpg/.png); check splits.json.")


def cmd_evaluate(args: argparse.Namespace) -> int:
    """mIoU, per-class IoU and pixel accuracy of an ONNX model on a labelled split."""
    from tqdm import tqdm

    from labelsmart import metrics
    from labelsmart.serving.predictor import OnnxModel
    from labelsmart.store import load_classes_file

    dataset = Path(args.dataset)
    model_path = Path(args.model)
    if not dataset.is_dir():
        raise CliError(f"{dataset}: not a folder; pass --dataset a folder with images/, masks/, splits.json.")
    for need in ("splits.json", "classes.json", "images", "masks"):
        if not (dataset / need).exists():
            raise CliError(f"{dataset / need}: missing; --dataset needs images/, masks/, splits.json and classes.json.")
    try:
        splits = json.loads((dataset / "splits.json").read_text())
    except json.JSONDecodeError as exc:
        raise CliError(f"{dataset / 'splits.json'}: not valid JSON ({exc}); fix it.") from exc
    if not isinstance(splits, dict) or args.split not in splits:
        avail = ", ".join(sorted(splits)) if isinstance(splits, dict) else "none"
        raise CliError(f"{dataset / 'splits.json'}: no split {args.split!r}; pick one of: {avail}.")
    names_in_split = [str(n) for n in splits[args.split]]
    if not names_in_split:
        raise CliError(f"{dataset / 'splits.json'}: split {args.split!r} is empty; pick another.")
    classes = [name for name, _ in load_classes_file(dataset / "classes.json")]

    model = OnnxModel(model_path, threads=args.threads or None, device=args.device)
    k = model.num_classes
    if k != len(classes):
        raise CliError(
            f"{model_path}: the model predicts {k} classes but {dataset / 'classes.json'} lists "
            f"{len(classes)}; evaluate a model trained on these classes."
        )
    if model.class_names != classes:
        log.warning("class names differ: model %s, data set %s (evaluating by id)", model.class_names, classes)

    conf = np.zeros((k, k), dtype=np.int64)
    for name in tqdm(
        names_in_split,
        desc=f"evaluating {args.split}",
        unit="img",
        file=sys.stderr,
        dynamic_ncols=True,
        mininterval=0.5,
    ):
        image = imageio.read_image(_find_image(dataset / "images", name))
        gt = imageio.read_mask(dataset / "masks" / f"{name}.png", shape=image.shape[:2], num_classes=k)
        pred = model.predict(image)
        conf += metrics.confusion_matrix(gt, pred.mask, k, ignore_index=IGNORE_INDEX)
    res = metrics.scores(conf)
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


# ------------------------------------------------------------------------------------------------- bench


def _parse_batches(text: str) -> list[int]:
    """``"1,8"`` -> ``[1, 8]``; raises :class:`CliError` on anything else."""
    try:
        batches = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        batches = []
    if not batches or any(b < 1 for b in batches):
        raise CliError(f"--batch {text}: give batch sizes of 1 or more separated by commas, such as 1,8.")
    return batches


def _parse_size(text: str) -> tuple[int, int]:
    """``"480x360"`` -> ``(480, 360)`` (W, H); raises :class:`CliError` on anything else."""
    parts = text.lower().split("x")
    try:
        w, h = (int(v) for v in parts)
    except ValueError:
        w = h = 0
    if w < 1 or h < 1:
        raise CliError(f"--size {text}: give the image size as WIDTHxHEIGHT, such as 480x360.")
    return w, h


def cmd_bench_serve(args: argparse.Namespace) -> int:
    """Serving speed: ONNX Runtime against eager PyTorch on the same inputs, per batch size."""
    from labelsmart.bench import serve as bench

    batches = _parse_batches(args.batch)
    size = _parse_size(args.size)
    model = Path(args.model)
    if not model.is_file():
        raise CliError(f"{model}: model file not found; pass --model an exported .onnx file.")
    images = Path(args.images)
    if not images.is_dir():
        raise CliError(f"{images}: not a folder; pass --images a folder of images.")
    if args.checkpoint is not None and not Path(args.checkpoint).is_file():
        raise CliError(f"{args.checkpoint}: checkpoint not found; pass --checkpoint the model.pt of the ONNX model.")
    if args.warmup < 0 or args.repeat < 1:
        raise CliError(f"--warmup {args.warmup} --repeat {args.repeat}: warmup must be 0 or more, repeat 1 or more.")
    if args.threads < 0:
        raise CliError(f"--threads {args.threads}: give 0 (all cores) or more.")
    records = bench.serve_benchmark(
        model,
        images,
        batches,
        args.threads,
        Path(args.checkpoint) if args.checkpoint is not None else None,
        args.warmup,
        args.repeat,
        size,
        Path(args.out),
        device=args.device,
    )
    print(bench.format_table(records))
    print(f"results: {Path(args.out) / bench.RESULTS_NAME}")
    if args.checkpoint is not None:
        # How far from the machine's limit: work per image against what a large matrix product achieves.
        hw = tuple(records[0]["input_hw"])
        flops = bench.flops_per_image(Path(args.checkpoint), hw)
        ort1 = next(r for r in records if r["engine"] == "onnxruntime" and r["batch"] == min(batches))
        if ort1["device"] == "cpu":
            peak = bench.peak_flops(ort1["threads"])
            achieved = flops * ort1["images_per_s"]
            print(
                f"model: {flops / 1e9:.2f} GFLOP per {hw[0]}x{hw[1]} input; ONNX Runtime at batch {ort1['batch']} "
                f"achieves {achieved / 1e9:.1f} GFLOP/s of a measured {peak / 1e9:.1f} GFLOP/s float32 matrix-product "
                f"peak on {ort1['threads']} threads ({100 * achieved / peak:.0f} %)"
            )
        else:
            print(f"model: {flops / 1e9:.2f} GFLOP per {hw[0]}x{hw[1]} input")
    if args.tune:
        tune = bench.tune_benchmark(
            model,
            images,
            size,
            Path(args.out),
            sorted({1, args.threads or os.cpu_count() or 1}),
            args.warmup,
            args.repeat,
        )
        print(bench.format_tune(tune))
        print(f"tuning: {Path(args.out) / bench.TUNE_NAME}")
    ratio = bench.ort_over_torch(records)
    print(f"ort_over_torch={'n/a' if ratio is None else f'{ratio:.2f}'}")
    return EXIT_OK


def cmd_bench_loop(args: argparse.Namespace) -> int:
    """The annotation loop (BENCHMARK.md section 2): a simulated annotator, the background trainer, the predictor."""
    import tempfile

    from labelsmart.bench import annotation_loop as loop

    orders = [o.strip() for o in args.order.split(",") if o.strip()]
    orders = list(loop.ORDERS) if orders == ["both"] else orders
    if not orders or any(o not in loop.ORDERS for o in orders):
        raise CliError(f"--order {args.order}: use sequential, suggested, both, or a comma-separated list of them.")
    overrides: dict[str, str] = {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise CliError(f"--set {item}: write it as SECTION.FIELD=VALUE, such as train.steps=100.")
        overrides[key.strip()] = value.strip()
    workdir = Path(args.workdir or Path(tempfile.gettempdir()) / "labelsmart-loop")
    for order in orders:
        settings = loop.LoopSettings(
            pool=Path(args.pool),
            eval_dir=Path(args.eval or args.pool),
            eval_splits=tuple(s.strip() for s in args.eval_split.split(",") if s.strip()),
            out=Path(args.out),
            workdir=workdir,
            pool_split=args.pool_split,
            images=args.images,
            labels=args.labels,
            order=order,
            seconds_per_image=args.seconds_per_image,
            eval_threads=args.threads,
            overrides=overrides,
        )
        summary = loop.run_loop(settings)
        print(json.dumps({k: v for k, v in summary.items() if k != "versions"}))
    print(f"results: {Path(args.out)}/<order>-<labels>/{loop.RESULTS_NAME}")
    print(f"table: {Path(args.out) / 'loop.md'}")
    print(f"plot: {Path(args.out) / 'loop.png'}")
    return EXIT_OK


def _parse_list(text: str, flag: str, kind: type = str) -> tuple[Any, ...]:
    """``"5,20,50"`` -> ``(5, 20, 50)``; raises :class:`CliError` on anything else."""
    try:
        items = tuple(kind(part.strip()) for part in text.split(",") if part.strip())
    except ValueError:
        items = ()
    if not items:
        raise CliError(f"{flag} {text}: give one or more values separated by commas.")
    return items


def cmd_bench_label_efficiency(args: argparse.Namespace) -> int:
    """Label efficiency (BENCHMARK.md section 1): labelsmart, CE only and the random-forest peer per N, label form."""
    from labelsmart.bench import label_efficiency as labeleff

    overrides: dict[str, str] = {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise CliError(f"--set {item}: write it as SECTION.FIELD=VALUE, such as train.temperature=0.07.")
        overrides[key.strip()] = value.strip()
    if args.threads < 0:
        raise CliError(f"--threads {args.threads}: give 0 (all cores) or more.")
    spec = labeleff.BenchSpec(
        pool=Path(args.pool),
        eval=Path(args.eval or args.pool),
        out=Path(args.out),
        pool_split=args.pool_split,
        eval_splits=_parse_list(args.eval_split, "--eval-split"),
        n_labeled=_parse_list(args.n_labeled, "--n-labeled", int),
        labels=_parse_list(args.labels, "--labels"),
        rows=_parse_list(args.rows, "--rows"),
        steps=args.steps,
        minutes=args.minutes,
        device=args.device,
        threads=args.threads,
        seed=args.seed,
        overrides=overrides,
        variant=args.variant or "",
        isolate=not args.in_process,
    )
    try:
        records = labeleff.run_benchmark(spec)
    except RuntimeError as exc:  # some cells failed; the rest are written
        raise CliError(str(exc)) from exc
    finally:
        print(f"results: {spec.out / labeleff.RESULTS_NAME}")
        print(f"table: {spec.out / labeleff.TABLE_NAME}")
        print(f"plot: {spec.out / labeleff.PLOT_NAME}")
    print(labeleff.format_table(records))
    return EXIT_OK


def cmd_bench_preannotate(args: argparse.Namespace) -> int:
    """Batch pre-annotation end to end against pure inference on the same machine."""
    from labelsmart.bench import serve as bench

    if not Path(args.model).is_file():
        raise CliError(f"{args.model}: model file not found; pass --model an exported .onnx file.")
    if not Path(args.images).is_dir():
        raise CliError(f"{args.images}: not a folder; pass --images a folder of images.")
    if args.batch < 1 or args.io_threads < 1 or args.threads < 0:
        raise CliError("--batch and --io-threads must be 1 or more, --threads 0 (all cores) or more.")
    rec = bench.preannotate_benchmark(
        Path(args.model),
        Path(args.images),
        Path(args.out),
        args.batch,
        args.threads,
        args.io_threads,
        args.limit,
        device=args.device,
        overlays=args.overlays,
        postprocess=args.postprocess,
    )
    print(
        f"{rec['images']} images: end to end {rec['end_to_end_images_per_s']:.2f} images/s, pure inference "
        f"{rec['inference_images_per_s']:.2f} images/s (batch {rec['batch']}, {rec['threads']} threads, "
        f"{rec['io_threads']} I/O threads, {rec['postprocess']} post-processing), peak RSS {rec['peak_rss_mb']:.0f} MB"
    )
    print(f"results: {Path(args.out) / bench.PREANNOTATE_NAME}")
    print(f"e2e_over_inference={rec['e2e_over_inference']:.3f}")
    return EXIT_OK


# ------------------------------------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with all subcommands."""
    p = argparse.ArgumentParser(prog="python -m labelsmart", description=__doc__.splitlines()[0])
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

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
    t.add_argument("--encoder", help="encoder name (resnet18, ...)")
    t.add_argument("--max-side", dest="max_side", type=int, help="working scale: longer image side in pixels")
    t.add_argument("--threads", type=int, help="CPU threads for training (0 = all cores)")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("export", help="ONNX export (with sidecar JSON) of the newest model or a checkpoint")
    src = e.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", help="project whose newest published model to export")
    src.add_argument("--checkpoint", help="a model.pt checkpoint")
    e.add_argument("--workdir", help="project state folder (with --dataset)")
    e.add_argument("--models-dir", dest="models_dir", help="model registry (with --dataset)")
    e.add_argument("--out", help="output .onnx path (default exports/<project>-vNNNN.onnx)")
    e.set_defaults(func=cmd_export)

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

    v = sub.add_parser("evaluate", help="mIoU of an ONNX model on a labelled split")
    v.add_argument("--model", required=True, help="exported .onnx file")
    v.add_argument("--dataset", required=True, help="folder with images/, masks/, splits.json, classes.json")
    v.add_argument("--split", required=True, help="split name in splits.json")
    v.add_argument("--out", help="report JSON (default <model stem>.eval-<split>.json beside the model)")
    v.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (default all cores)")
    v.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="inference device")
    v.set_defaults(func=cmd_evaluate)

    b = sub.add_parser("bench", help="benchmarks")
    bsub = b.add_subparsers(dest="bench_command", required=True, metavar="BENCHMARK")
    s = bsub.add_parser("serve", help="serving speed: ONNX Runtime against eager PyTorch, per batch size")
    s.add_argument("--model", required=True, help="exported .onnx file (its sidecar .json beside it)")
    s.add_argument("--checkpoint", help="the model.pt the ONNX file came from, to time eager PyTorch too")
    s.add_argument("--images", required=True, help="folder of images (the first max(--batch) are used)")
    s.add_argument("--batch", default="1,8", help="batch sizes, comma-separated (default 1,8)")
    s.add_argument("--threads", type=int, default=0, help="intra-op threads of both engines (default all cores)")
    s.add_argument("--warmup", type=int, default=3, help="untimed runs per engine and batch (default 3)")
    s.add_argument("--repeat", type=int, default=20, help="timed runs per engine and batch (default 20)")
    s.add_argument("--size", default="480x360", help="resize images to WIDTHxHEIGHT first (default 480x360)")
    s.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="inference device (default cpu)")
    s.add_argument("--out", required=True, help="output folder for serve.jsonl (overwritten)")
    s.add_argument("--tune", action="store_true", help="also measure ONNX Runtime session choices one by one (CPU)")
    s.set_defaults(func=cmd_bench_serve)
    pa = bsub.add_parser("preannotate", help="batch pre-annotation end to end against pure inference")
    pa.add_argument("--model", required=True, help="exported .onnx file (its sidecar .json beside it)")
    pa.add_argument("--images", required=True, help="folder of images (500+ for a fair figure)")
    pa.add_argument("--out", required=True, help="output folder (preannotations/ is emptied first)")
    pa.add_argument("--batch", type=int, default=4, help="images per inference run (default 4)")
    pa.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (default all cores)")
    pa.add_argument("--io-threads", dest="io_threads", type=int, default=2, help="decode/write threads (default 2)")
    pa.add_argument("--limit", type=int, help="only the first N images")
    pa.add_argument("--no-overlays", dest="overlays", action="store_false", help="masks only")
    pa.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="inference device (default cpu)")
    pa.add_argument("--postprocess", choices=("auto", "host", "graph"), default="auto", help="see preannotate")
    pa.set_defaults(func=cmd_bench_preannotate)
    lp = bsub.add_parser("loop", help="the annotation loop: a simulated annotator with the background trainer")
    lp.add_argument("--pool", required=True, help="folder (images/, masks/, splits.json, classes.json) to label from")
    lp.add_argument("--pool-split", dest="pool_split", default="train", help="split the annotator labels from")
    lp.add_argument("--eval", help="folder the published versions are evaluated on (default: --pool)")
    lp.add_argument("--eval-split", dest="eval_split", default="val", help="evaluation split(s), comma-separated")
    lp.add_argument("--images", type=int, default=30, help="images the annotator labels (default 30)")
    lp.add_argument("--labels", choices=("scribble", "correct"), default="scribble", help="what the annotator saves")
    lp.add_argument("--order", default="sequential", help="sequential, suggested, both (run one after the other)")
    lp.add_argument(
        "--seconds-per-image", dest="seconds_per_image", type=float, default=30.0, help="annotator pace (default 30)"
    )
    lp.add_argument("--workdir", help="project state and models of the runs (default: a folder in the temp dir)")
    lp.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads when evaluating (default all cores)")
    lp.add_argument("--set", action="append", metavar="KEY=VALUE", help="change any SECTION.FIELD setting (repeatable)")
    lp.add_argument("--out", required=True, help="output folder: <order>-<labels>/loop.jsonl, loop.md, loop.png")
    lp.set_defaults(func=cmd_bench_loop)
    le = bsub.add_parser("label-efficiency", help="mIoU against labelled images: labelsmart, CE only, random forest")
    le.add_argument("--pool", required=True, help="folder (images/, masks/, splits.json, classes.json) to label from")
    le.add_argument("--pool-split", dest="pool_split", default="train", help="split the labelled N come from")
    le.add_argument("--eval", help="folder to evaluate on, same layout and classes (default: --pool)")
    le.add_argument("--eval-split", dest="eval_split", default="val", help="evaluation split(s), comma-separated")
    le.add_argument("--n-labeled", dest="n_labeled", default="5,20,50", help="labelled images N, comma-separated")
    le.add_argument("--labels", default="dense,scribble", help="label forms: dense, scribble (comma-separated)")
    le.add_argument(
        "--rows",
        default="labelsmart,ce-only,contrastive,rf",
        help="rows: labelsmart, ce-only, contrastive, rf (comma-separated)",
    )
    le.add_argument("--steps", type=int, help="training steps per network cell (default: the trainer's round steps)")
    le.add_argument("--minutes", type=float, help="wall-clock training budget per network cell, in minutes")
    le.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="training device")
    le.add_argument("--threads", type=int, default=0, help="CPU threads for torch and the forest (default all cores)")
    le.add_argument("--seed", type=int, default=0, help="training seed (the labelled subset always uses seed 0)")
    le.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="change a train.*/model.*/preprocess.* setting (repeatable)"
    )
    le.add_argument("--variant", help="name for the --set changes in results and tables")
    le.add_argument("--in-process", dest="in_process", action="store_true", help="run cells in this process")
    le.add_argument("--out", required=True, help="output folder: results.jsonl, table.md, plot (resumable)")
    le.set_defaults(func=cmd_bench_label_efficiency)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit code (0 = success)."""
    parser = build_parser()
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
