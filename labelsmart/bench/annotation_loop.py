"""The annotation loop benchmark (BENCHMARK.md section 2): a scripted annotator labels pool images one by one.

``python -m labelsmart bench loop --pool DIR --eval DIR --eval-split NAME --images 30 --labels scribble`` drives
a real project through the code paths the UI uses: the project store, the background trainer process under its
:class:`~labelsmart.training.trainer.Supervisor` (which also scores images for "Next"), the :class:`Predictor`
and the UI's own :class:`~labelsmart.app.session.Session` handlers for showing a pre-annotation and saving labels.
For image k it

1. picks the image: ``sequential`` = the pool split's names in BENCHMARK.md's fixed order
   (:func:`~labelsmart.bench.common.seeded_order`, as in section 1); ``suggested`` = what "Next" offers
   (:func:`labelsmart.serving.active.suggest`), which is the sequential order until a model has scored the images;
2. shows the pre-annotation through ``Session.preannotation`` (timed: a new image, then the same one cached)
   and records its mIoU, pixel accuracy and the fraction of pixels the annotator would have to change,
   against the ground truth;
3. saves labels through ``Session.save``: ``scribble`` = simulated strokes (:mod:`labelsmart.bench.scribble`);
   ``correct`` = the pre-annotation with its wrong pixels replaced by the truth (pixels the truth leaves
   unlabelled stay unlabelled);
4. waits ``seconds_per_image`` (a person's pace) while the trainer works, watching for new versions.

Afterwards every published version is evaluated on the eval split(s). Output under ``out/<order>-<labels>/``:
``loop.jsonl`` (one line per image, then a ``summary`` line); under ``out/``: ``loop.md`` and ``loop.png``
over every run found there, so both orders land on one plot.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from labelsmart import config, imageio, metrics
from labelsmart.bench.common import seeded_order
from labelsmart.config import IGNORE_INDEX
from labelsmart.datasets import DataFolder, evaluate
from labelsmart.store import Store, load_classes_file

log = logging.getLogger(__name__)

ORDERS = ("sequential", "suggested")
LABELS = ("scribble", "correct")
RESULTS_NAME = "loop.jsonl"


class LoopError(ValueError):
    """Bad input to the loop benchmark; the message is one sentence naming what to fix."""


@dataclass(frozen=True)
class LoopSettings:
    """One run of the simulated annotator."""

    pool: Path  # folder in the shared layout the annotator labels from
    eval_dir: Path  # folder in the shared layout the published versions are evaluated on
    eval_splits: tuple[str, ...]  # split names in eval_dir/splits.json
    out: Path  # results root; this run writes out/<order>-<labels>/
    workdir: Path  # project state and model registry of the runs (a fresh folder per run)
    pool_split: str = "train"
    images: int = 30
    labels: str = "scribble"
    order: str = "sequential"
    seconds_per_image: float = 30.0
    eval_threads: int = 0  # ONNX Runtime threads for evaluating the versions afterwards (0 = all cores)
    wait_model_s: float = 0.0  # then wait up to this long for a version that includes the save (a patient annotator)
    overrides: Mapping[str, Any] = field(default_factory=dict)  # config.load flags, e.g. {"train.steps": 20}
    rf_every: int = 0  # afterwards, every this many images: rf on the same strokes against the served model
    tag: str = ""  # run name prefix, to put runs of two settings side by side in one report

    @property
    def run_name(self) -> str:
        """Folder name of this run under ``out``."""
        return f"{self.tag + '-' if self.tag else ''}{self.order}-{self.labels}"


def image_scores(gt: np.ndarray, pred: np.ndarray, num_classes: int) -> dict[str, float]:
    """mIoU (classes present in this image's truth), pixel accuracy, fraction of labelled pixels to change."""
    s = metrics.scores(metrics.confusion_matrix(gt, pred, num_classes))
    return {"miou": s["miou"], "pixel_acc": s["pixel_acc"], "change_fraction": 1.0 - s["pixel_acc"]}


def labels_for(kind: str, gt: np.ndarray, pred: np.ndarray | None) -> tuple[np.ndarray, int]:
    """The mask the simulated annotator saves, and how many pixels they changed from the pre-annotation."""
    if kind == "scribble":
        from labelsmart.bench.scribble import simulate_scribbles

        mask = simulate_scribbles(gt)
        return mask, int((mask != IGNORE_INDEX).sum())
    mask = np.full(gt.shape, IGNORE_INDEX, np.uint8) if pred is None else pred.copy()
    wrong = (gt != IGNORE_INDEX) & (mask != gt)
    mask[wrong] = gt[wrong]
    mask[gt == IGNORE_INDEX] = IGNORE_INDEX  # the truth does not know these pixels: leave them unlabelled
    return mask, int(wrong.sum())


def _median(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return round(float(statistics.median(vals)), 3) if vals else None


def evaluate_version(onnx_path: Path, folder: DataFolder, names: Sequence[str], threads: int) -> dict[str, float]:
    """mIoU and pixel accuracy of one exported version over a split (:func:`labelsmart.datasets.evaluate`)."""
    from labelsmart.serving.onnx_model import OnnxModel

    model = OnnxModel(onnx_path, threads=threads or None, device="cpu")
    s = evaluate(lambda image: model.predict(image).mask, folder, names)
    return {"miou": round(s["miou"], 4), "pixel_acc": round(s["pixel_acc"], 4)}


def run_loop(settings: LoopSettings, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the simulated annotator once; returns the summary (also the last line of ``loop.jsonl``)."""
    from labelsmart.app.session import Session
    from labelsmart.serving import active
    from labelsmart.serving.predictor import Predictor
    from labelsmart.training.trainer import Supervisor

    st = settings
    say = progress or (lambda msg: log.info("%s", msg))
    if st.order not in ORDERS:
        raise LoopError(f"--order {st.order}: use one of {', '.join(ORDERS)}.")
    if st.labels not in LABELS:
        raise LoopError(f"--labels {st.labels}: use one of {', '.join(LABELS)}.")
    if st.images < 1 or st.seconds_per_image < 0:
        raise LoopError(f"--images {st.images} --seconds-per-image {st.seconds_per_image}: give 1+ images and 0+ s.")
    pool = DataFolder.open(st.pool, "--pool")
    pool_names = pool.names(st.pool_split)
    if len(pool_names) < st.images:
        raise LoopError(
            f"split {st.pool_split!r} of {st.pool} has {len(pool_names)} images; "
            f"pass --images {len(pool_names)} or fewer."
        )
    eval_folder = DataFolder.open(st.eval_dir, "--eval")
    eval_names = {split: eval_folder.names(split) for split in st.eval_splits}

    run_dir = Path(st.out) / st.run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    work = Path(st.workdir) / f"{st.run_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    flags = {
        "dataset": str(st.pool),
        "workdir": str(work / "state"),
        "models_dir": str(work / "models"),
        "trigger.keep_versions": 0,  # every version is evaluated afterwards
    }
    cfg = config.load({**flags, **dict(st.overrides)})
    store = Store(cfg.db_path, image_root=cfg.image_root)
    store.ensure_classes(load_classes_file(st.pool / "classes.json"), source=str(st.pool / "classes.json"))
    store.sync_images(paths=[pool.image_rel(n) for n in sorted(pool_names)])
    id_by_name = {Path(r.path).stem: r.id for r in store.images()}
    name_by_id = {i: n for n, i in id_by_name.items()}
    num_classes = len(store.classes())
    colors = [c.color for c in store.classes()]
    sequence = seeded_order(pool_names)

    supervisor = Supervisor(cfg, store)
    supervisor.start()
    predictor = Predictor(store, cfg)
    session = Session(cfg, store, predictor, supervisor)
    shown_at: dict[int, float] = {}  # version -> wall time it was first shown (the predictor swapped it in)

    def watch() -> None:
        if predictor.refresh() and predictor.version is not None:
            shown_at.setdefault(predictor.version, time.time())

    records: list[dict[str, Any]] = []
    saves: list[tuple[int, float]] = []  # (label revision, wall time of the save)
    first_save: float | None = None
    say(f"{st.run_name}: {st.images} images from {st.pool_split} of {st.pool}; state in {work}")
    try:
        for k in range(1, st.images + 1):
            watch()
            suggestion = None
            if st.order == "suggested":
                suggestion = active.suggest(store, cfg.active, names=lambda i: name_by_id.get(i, str(i)))
            if suggestion is not None and suggestion.version is not None:
                image_id = suggestion.image_id
            else:  # sequential, or nothing scored yet
                image_id = next(id_by_name[n] for n in sequence if store.image(id_by_name[n]).labelled_pixels == 0)
            name = name_by_id[image_id]
            t0 = time.perf_counter()
            _overlay, _info, version = session.preannotation(image_id)
            new_ms = 1e3 * (time.perf_counter() - t0)
            cached_ms = None
            if version is not None:
                t1 = time.perf_counter()
                session.preannotation(image_id)
                cached_ms = 1e3 * (time.perf_counter() - t1)
            pred = predictor.predict(image_id) if version is not None else None
            gt = pool.read_mask(name)
            scores = image_scores(gt, pred.mask, num_classes) if pred is not None else None
            mask, changed = labels_for(st.labels, gt, pred.mask if pred is not None else None)
            editor = {"background": None, "layers": [imageio.mask_to_rgba(mask, colors)]}
            msg = session.save(image_id, editor)
            saved = time.time()
            if not msg.startswith("Saved revision"):
                raise RuntimeError(f"saving {name} failed: {msg}")
            rev = store.current_revision(image_id)
            saves.append((rev.id if rev else 0, saved))
            first_save = first_save if first_save is not None else saved
            rec = {
                "k": k,
                "image": name,
                "preannotation_miou": None if scores is None else round(scores["miou"], 4),
                "preannotation_pixel_acc": None if scores is None else round(scores["pixel_acc"], 4),
                "change_fraction": 1.0 if scores is None else round(scores["change_fraction"], 4),
                "model_version": version,
                "seconds_since_first_save": round(saved - first_save, 1),
                "show_new_ms": round(new_ms, 1) if version is not None else None,
                "show_cached_ms": None if cached_ms is None else round(cached_ms, 1),
                "labelled_pixels": int((mask != IGNORE_INDEX).sum()),
                "pixels_changed": changed,
            }
            if suggestion is not None:
                rec.update(
                    suggested=suggestion.version is not None,
                    uncertainty=None if suggestion.score is None else round(suggestion.score, 4),
                    rank=suggestion.rank,
                    scored_by=suggestion.version,
                    skipped_duplicates=len(suggestion.skipped),
                )
            records.append(rec)
            miou_txt = "—" if scores is None else f"{100 * scores['miou']:.1f}"
            say(f"k={k} {name} v{version} pre-annotation mIoU {miou_txt}; saved ({msg})")
            until = time.monotonic() + st.seconds_per_image
            while time.monotonic() < until:
                watch()
                time.sleep(min(0.5, max(0.0, until - time.monotonic())))
            until = time.monotonic() + st.wait_model_s
            while time.monotonic() < until and not _covered(store, saves[-1][0], predictor.version):
                watch()
                time.sleep(0.3)
        watch()
    finally:
        supervisor.stop()

    models = [m for m in store.models() if m.status == "published"]
    save_to_model: list[float | None] = []
    save_to_shown: list[float | None] = []
    for rev, t in saves:
        m = next((m for m in models if m.label_revision >= rev and m.published_at), None)
        save_to_model.append(None if m is None else round(m.published_at - t, 1))
        shown = None if m is None else shown_at.get(m.version)
        save_to_shown.append(None if shown is None else round(shown - t, 1))
    for rec, a, b in zip(records, save_to_model, save_to_shown, strict=True):
        rec["save_to_new_model_s"], rec["save_to_shown_s"] = a, b
    versions = []
    for m in models:
        entry = {
            "version": m.version,
            "labelled_images": m.labelled_images,
            "labelled_pixels": m.labelled_pixels,
            "published_s": None if first_save is None else round(m.published_at - first_save, 1),
            "round_seconds": m.metrics.get("round_seconds"),
            "eval": {},
        }
        for split, names in eval_names.items():
            say(f"evaluating v{m.version} on {split} ({len(names)} images)")
            entry["eval"][split] = evaluate_version(m.onnx, eval_folder, names, st.eval_threads)
        versions.append(entry)
    rf_rows = (
        rf_checkpoints(store, records, id_by_name, eval_folder, eval_names, versions, st.rf_every, say)
        if st.rf_every > 0
        else []
    )
    first_shown = min(shown_at.values()) if shown_at else None
    summary = {
        "summary": True,
        "order": st.order,
        "labels": st.labels,
        "images": st.images,
        "pool": str(st.pool),
        "pool_split": st.pool_split,
        "seconds_per_image": st.seconds_per_image,
        "time_to_first_prediction_s": None if first_shown is None else round(first_shown - first_save, 1),
        "save_to_new_model_s_median": _median(save_to_model),
        "save_to_shown_s_median": _median(save_to_shown),
        "show_new_ms_median": _median([r["show_new_ms"] for r in records]),
        "show_cached_ms_median": _median([r["show_cached_ms"] for r in records]),
        "preannotation_miou_mean": _mean([r["preannotation_miou"] for r in records]),
        "versions": versions,
        "rf": rf_rows,
        "workdir": str(work),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    with open(run_dir / RESULTS_NAME, "w") as fh:
        for rec in records:
            fh.write(json.dumps(rec) + "\n")
        fh.write(json.dumps(summary) + "\n")
    write_report(Path(st.out))
    return summary


def rf_checkpoints(
    store: Store,
    records: Sequence[dict[str, Any]],
    id_by_name: Mapping[str, int],
    eval_folder: DataFolder,
    eval_names: Mapping[str, Sequence[str]],
    versions: Sequence[dict[str, Any]],
    every: int,
    say: Callable[[str], None],
) -> list[dict[str, Any]]:
    """After images k = every, 2 every, ...: the ilastik-style random forest fitted on the labels saved for images
    1..k, and the version that served the next image (the newest one at the end), both on the eval splits."""
    from labelsmart.bench.rf_baseline import RandomForestPeer

    by_version = {v["version"]: v["eval"] for v in versions}
    rows = []
    for k in range(every, len(records) + 1, every):
        ids = [id_by_name[r["image"]] for r in records[:k]]
        revs = [(i, store.current_revision(i)) for i in ids]
        pairs = [(i, store.load_revision(rev.id)) for i, rev in revs if rev is not None]
        rf = RandomForestPeer(seed=0)
        say(f"random forest on the labels of images 1-{k}")
        rf.fit(len(pairs), lambda j, pairs=pairs: (store.read_image(pairs[j][0]), pairs[j][1]), [m for _, m in pairs])
        served = records[k]["model_version"] if k < len(records) else (versions[-1]["version"] if versions else None)
        row = {"k": k, "served_version": served, "served": by_version.get(served, {}), "rf": {}}
        for split, names in eval_names.items():
            s = evaluate(rf.predict, eval_folder, names)
            row["rf"][split] = {"miou": round(s["miou"], 4), "pixel_acc": round(s["pixel_acc"], 4)}
        rows.append(row)
    return rows


def _covered(store: Store, revision: int, serving: int | None) -> bool:
    """Whether the version serving was trained on labels up to ``revision``."""
    if serving is None:
        return False
    return any(m.version == serving and m.label_revision >= revision for m in store.models())


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return round(float(np.mean(vals)), 4) if vals else None


# --------------------------------------------------------------------------------------------- report


def read_runs(out: Path) -> dict[str, tuple[list[dict[str, Any]], dict[str, Any]]]:
    """``{run name: (per-image records, summary)}`` of every finished run under ``out``."""
    runs = {}
    for path in sorted(Path(out).glob(f"*/{RESULTS_NAME}")):
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        summary = next((r for r in lines if r.get("summary")), None)
        if summary is not None:
            runs[path.parent.name] = ([r for r in lines if not r.get("summary")], summary)
    return runs


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.1f}"


def _num(v: float | None, fmt: str = "{:.1f}") -> str:
    return "—" if v is None else fmt.format(v)


def format_report(runs: Mapping[str, tuple[list[dict[str, Any]], dict[str, Any]]]) -> str:
    """Markdown: one summary row per run, each published version's eval mIoU, and the per-image curve."""
    out = [
        "| run | images | first pre-annotation s after first save | median save → new model s | median save → shown s "
        "| mean pre-annotation mIoU, images 1–10 / 11–20 / 21–30 | median show new image ms | median show cached ms |",
        "|---|---:|---:|---:|---:|---|---:|---:|",
    ]
    for name, (recs, s) in runs.items():
        thirds = []
        for lo in range(0, len(recs), 10):
            vals = [r["preannotation_miou"] for r in recs[lo : lo + 10] if r["preannotation_miou"] is not None]
            thirds.append(_pct(float(np.mean(vals))) if vals else "—")
        out.append(
            f"| {name} | {s['images']} | {_num(s['time_to_first_prediction_s'])} "
            f"| {_num(s['save_to_new_model_s_median'])} "
            f"| {_num(s['save_to_shown_s_median'])} | {' / '.join(thirds)} | {_num(s['show_new_ms_median'])} "
            f"| {_num(s['show_cached_ms_median'])} |"
        )
    out += ["", "| run | version | labelled images | published s after first save | round s | eval mIoU (pixel acc) |"]
    out.append("|---|---:|---:|---:|---:|---|")
    for name, (_recs, s) in runs.items():
        for v in s["versions"]:
            ev = ", ".join(f"{k} {_pct(e['miou'])} ({_pct(e['pixel_acc'])})" for k, e in v["eval"].items())
            out.append(
                f"| {name} | v{v['version']} | {v['labelled_images']} | {_num(v['published_s'])} "
                f"| {_num(v['round_seconds'])} | {ev} |"
            )
    rf_runs = [(name, s) for name, (_recs, s) in runs.items() if s.get("rf")]
    if rf_runs:
        out += ["", "| run | after image | served version | served eval mIoU | rf on the same strokes, eval mIoU |"]
        out.append("|---|---:|---:|---|---|")
        for name, s in rf_runs:
            for r in s["rf"]:
                served = ", ".join(f"{k} {_pct(e['miou'])}" for k, e in r["served"].items()) or "—"
                rf = ", ".join(f"{k} {_pct(e['miou'])}" for k, e in r["rf"].items())
                version = "—" if r["served_version"] is None else f"v{r['served_version']}"
                out.append(f"| {name} | {r['k']} | {version} | {served} | {rf} |")
    names = list(runs)
    out += ["", "| k | " + " | ".join(f"{n}: image, model, pre-annotation mIoU" for n in names) + " |"]
    out.append("|---:|" + "---|" * len(names))
    for k in range(max((len(r) for r, _ in runs.values()), default=0)):
        cells = []
        for n in names:
            recs = runs[n][0]
            if k < len(recs):
                r = recs[k]
                model = "—" if r["model_version"] is None else f"v{r['model_version']}"
                cells.append(f"{r['image']}, {model}, {_pct(r['preannotation_miou'])}")
            else:
                cells.append("")
        out.append(f"| {k + 1} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def plot_runs(runs: Mapping[str, tuple[list[dict[str, Any]], dict[str, Any]]], path: Path) -> None:
    """Pre-annotation mIoU against images labelled before it, one line (and a 5-image mean) per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    for (name, (recs, _s)), color in zip(
        runs.items(), ("tab:blue", "tab:orange", "tab:green", "tab:red"), strict=False
    ):
        pts = [(r["k"] - 1, 100 * r["preannotation_miou"]) for r in recs if r["preannotation_miou"] is not None]
        if not pts:
            continue
        x, y = np.array(pts).T
        ax.plot(x, y, "o", color=color, alpha=0.35, ms=4)
        w = min(5, len(y))
        smooth = np.convolve(y, np.ones(w) / w, mode="valid")
        ax.plot(x[w - 1 :], smooth, "-", color=color, lw=2, label=f"{name} (mean of last {w})")
    ax.set_xlabel("images labelled before this one")
    ax.set_ylabel("pre-annotation mIoU on the next image (%)")
    ax.set_title("Simulated annotator: how good is the pre-annotation of the image about to be labelled")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(out: Path) -> tuple[Path, Path]:
    """``loop.md`` and ``loop.png`` over every run under ``out``."""
    runs = read_runs(out)
    md, png = Path(out) / "loop.md", Path(out) / "loop.png"
    md.write_text(format_report(runs))
    plot_runs(runs, png)
    return md, png
