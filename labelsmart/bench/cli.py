"""The ``bench`` commands of ``python -m labelsmart``: serve, preannotate, loop, label-efficiency, load, train-speed.

The product's CLI (:mod:`labelsmart.cli`) knows nothing of them: :func:`register` adds them to its parser, and
:func:`main` is the whole program, product and benchmarks, that ``python -m labelsmart`` runs. Each benchmark
module is imported only by its own command.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from labelsmart import cli
from labelsmart.cli import EXIT_FAILED, EXIT_OK, CliError, SubParsers


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
    from labelsmart.bench import serve

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
    records = serve.serve_benchmark(
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
    print(serve.format_table(records))
    print(f"results: {Path(args.out) / serve.RESULTS_NAME}")
    if args.checkpoint is not None:
        # How far from the machine's limit: work per image against what a large matrix product achieves.
        hw = tuple(records[0]["input_hw"])
        flops = serve.flops_per_image(Path(args.checkpoint), hw)
        ort1 = next(r for r in records if r["engine"] == "onnxruntime" and r["batch"] == min(batches))
        if ort1["device"] == "cpu":
            peak = serve.peak_flops(ort1["threads"])
            achieved = flops * ort1["images_per_s"]
            print(
                f"model: {flops / 1e9:.2f} GFLOP per {hw[0]}x{hw[1]} input; ONNX Runtime at batch {ort1['batch']} "
                f"achieves {achieved / 1e9:.1f} GFLOP/s of a measured {peak / 1e9:.1f} GFLOP/s float32 matrix-product "
                f"peak on {ort1['threads']} threads ({100 * achieved / peak:.0f} %)"
            )
        else:
            print(f"model: {flops / 1e9:.2f} GFLOP per {hw[0]}x{hw[1]} input")
    if args.tune:
        tune = serve.tune_benchmark(
            model,
            images,
            size,
            Path(args.out),
            sorted({1, args.threads or os.cpu_count() or 1}),
            args.warmup,
            args.repeat,
        )
        print(serve.format_tune(tune))
        print(f"tuning: {Path(args.out) / serve.TUNE_NAME}")
    ratio = serve.ort_over_torch(records)
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
    overrides = _parse_settings(args.set, "train.steps=100")
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
            rf_every=args.rf_every,
            tag=args.tag,
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

    overrides = _parse_settings(args.set, "train.temperature=0.07")
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
        ssl_steps=args.ssl_steps,
        ssl_minutes=args.ssl_minutes,
        inference=_parse_list(args.inference, "--inference"),
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
    from labelsmart.bench import preannotate

    if not Path(args.model).is_file():
        raise CliError(f"{args.model}: model file not found; pass --model an exported .onnx file.")
    if not Path(args.images).is_dir():
        raise CliError(f"{args.images}: not a folder; pass --images a folder of images.")
    if args.batch < 1 or args.io_threads < 1 or args.threads < 0:
        raise CliError("--batch and --io-threads must be 1 or more, --threads 0 (all cores) or more.")
    rec = preannotate.preannotate_benchmark(
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
    print(f"results: {Path(args.out) / preannotate.PREANNOTATE_NAME}")
    print(f"e2e_over_inference={rec['e2e_over_inference']:.3f}")
    return EXIT_OK


def cmd_bench_load(args: argparse.Namespace) -> int:
    """Several annotators at once through the page's API while the trainer trains: lost revisions, latencies."""
    from labelsmart.bench import load

    if args.clients < 1 or args.ops < 2:
        raise CliError(f"--clients {args.clients} --ops {args.ops}: give 1 or more clients and 2 or more calls each.")
    if not Path(args.dataset).is_dir():
        raise CliError(f"{args.dataset}: not a folder; pass --dataset a folder of images.")
    result = load.run_load(Path(args.dataset), Path(args.out) / "run", args.clients, args.ops)
    path = load.write_results(result, Path(args.out))
    print(load.format_table(result))
    print(
        f"{result['clients']} clients x {result['ops_per_client']} calls in {result['wall_s']:.0f} s: "
        f"{result['saves']} saves, {result['refused']} refused in words, {len(result['lost'])} lost, "
        f"{len(result['wrong'])} unexplained; published versions {result['published_versions']}"
    )
    print(f"results: {path}")
    return EXIT_OK if not result["lost"] and not result["wrong"] else 1


def cmd_bench_train_speed(args: argparse.Namespace) -> int:
    """Training speed: steps/s and FLOPs per step of the shipped training step per variant, against the peak."""
    from labelsmart.bench import train_speed

    spec = train_speed.SpeedSpec(
        out=Path(args.out),
        variants=train_speed.parse_variants(args.variants),
        seconds=args.seconds,
        warmup=args.warmup,
        threads=args.threads,
        device=args.device,
        num_classes=args.classes,
        overrides=_parse_settings(args.set, "train.crop=128"),
        peak_size=args.peak_size,
        isolate=not args.in_process,
    )
    records = train_speed.run_benchmark(spec)
    print(train_speed.format_table(records))
    print(f"results: {spec.out / train_speed.RESULTS_NAME}")
    print(f"table: {spec.out / train_speed.TABLE_NAME}")
    failed = [r["variant"] for r in records if r.get("error")]
    if failed:
        print(f"{len(failed)} variant(s) failed ({', '.join(failed)}); their errors are in the table.", file=sys.stderr)
    return EXIT_OK if len(failed) < len(records) else EXIT_FAILED


def _parse_settings(items: Sequence[str] | None, example: str) -> dict[str, str]:
    """``--set SECTION.FIELD=VALUE`` flags as a dict; raises :class:`CliError` on anything else."""
    overrides: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise CliError(f"--set {item}: write it as SECTION.FIELD=VALUE, such as {example}.")
        overrides[key.strip()] = value.strip()
    return overrides


def register(sub: SubParsers) -> None:
    """Add ``bench`` and its benchmarks to the subparsers of the product's parser."""

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
    lp.add_argument(
        "--rf-every",
        dest="rf_every",
        type=int,
        default=0,
        help="afterwards, every N images: the random forest on the same strokes against the served model (0 = off)",
    )
    lp.add_argument("--tag", default="", help="run name prefix, for runs of two settings in one --out folder")
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
    le.add_argument(
        "--ssl-steps",
        dest="ssl_steps",
        type=int,
        help="pretrain first, this many steps, by dense self-supervised contrast on all pool-split images (once a run)",
    )
    le.add_argument("--ssl-minutes", dest="ssl_minutes", type=float, help="the same pretraining, bounded in minutes")
    le.add_argument(
        "--inference",
        default="plain",
        help="score each network also with test-time averaging: plain (the predictor's one pass), flip, ms3, ms3flip, "
        "up-flip (comma-separated; one record each, the same trained network)",
    )
    le.add_argument("--in-process", dest="in_process", action="store_true", help="run cells in this process")
    le.add_argument("--out", required=True, help="output folder: results.jsonl, table.md, plot (resumable)")
    le.set_defaults(func=cmd_bench_label_efficiency)
    ld = bsub.add_parser("load", help="several annotators at once through the page's API while the trainer trains")
    ld.add_argument("--dataset", required=True, help="folder of images (a copy of the project is made in --out)")
    ld.add_argument("--clients", type=int, default=8, help="concurrent clients, two per image (default 8)")
    ld.add_argument("--ops", type=int, default=200, help="API calls per client (default 200)")
    ld.add_argument("--out", required=True, help="output folder: load.json, and the run's project state")
    ld.set_defaults(func=cmd_bench_load)
    ts = bsub.add_parser(
        "train-speed", help="training speed: steps/s and FLOPs per step per variant, against the measured peak"
    )
    ts.add_argument(
        "--variants",
        default="all",
        help="variant names, comma-separated, or all (default): deeplabv3plus, its -cl, -compile, -crop128, -batch8, "
        "-fp32, -bf16, fpn, unet, resnet18, resnet18-fp32 (labelsmart/bench/train_speed.py)",
    )
    ts.add_argument("--seconds", type=float, default=20.0, help="timed wall time per variant (default 20)")
    ts.add_argument("--warmup", type=int, default=3, help="untimed steps first; compilation needs several (default 3)")
    ts.add_argument("--threads", type=int, default=1, help="torch threads, peak too (default 1; 0 = all cores)")
    ts.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu", help="training device (default cpu)")
    ts.add_argument("--classes", type=int, default=11, help="classes of the random labels (default 11, CamVid's)")
    ts.add_argument("--set", action="append", metavar="KEY=VALUE", help="change a train.*/model.* setting (repeatable)")
    ts.add_argument("--peak-size", dest="peak_size", type=int, default=2048, help="n of the n^3 peak matrix product")
    ts.add_argument("--in-process", dest="in_process", action="store_true", help="run variants in this process")
    ts.add_argument("--out", required=True, help="output folder: results.jsonl, table.md (overwritten)")
    ts.set_defaults(func=cmd_bench_train_speed)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m labelsmart``: the product's commands and ``bench``; returns the exit code."""
    return cli.main(argv, command_groups=[register])
