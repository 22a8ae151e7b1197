"""Faults, issue 15 "nothing lost" (RELIABILITY.md): a full disk under a save, an export and a batch
pre-annotation, and the database locked by another program past the busy timeout.

The disk fills up for real in SQLite (``PRAGMA max_page_count`` makes it answer SQLITE_FULL, as it does on a full
disk); for files, :class:`FullDisk` makes every atomic write from the n-th one on put part of its bytes into its
temporary file and then fail with ENOSPC, which is what a full disk does to ``write(2)``.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from conftest import synth_scene, write_toy_model

from labelsmart import imageio
from labelsmart.cli import main
from labelsmart.formats import FormatError, export_labels
from labelsmart.preannotate import pipeline
from labelsmart.project import open_project
from labelsmart.store import Snapshot, Store, StoreError, StoreFullError, StoreLockedError, db

# ------------------------------------------------------------------------------------------ a full disk


class _HalfWrites:
    """A file on a full disk: a write puts half its bytes in and then fails with ENOSPC."""

    def __init__(self, fh: Any, partial: list[int]) -> None:
        self._fh = fh
        self._partial = partial

    def __enter__(self) -> _HalfWrites:
        return self

    def __exit__(self, *exc: object) -> None:
        self._fh.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fh, name)

    def write(self, data: bytes) -> int:
        self._fh.write(data[: len(data) // 2])
        self._fh.flush()
        self._partial.append(os.fstat(self._fh.fileno()).st_size)  # what a cleanup has to remove
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class _OsOnAFullDisk:
    """``os`` as :mod:`labelsmart.imageio` sees it: files opened by a write that meets the full disk half-write."""

    def __init__(self, disk: FullDisk) -> None:
        self._disk = disk

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def fdopen(self, fd: int, *args: Any, **kwargs: Any) -> Any:
        fh = os.fdopen(fd, *args, **kwargs)
        return _HalfWrites(fh, self._disk.partial) if getattr(self._disk.local, "fail", False) else fh


class FullDisk:
    """A disk that fills up at the ``after``-th atomic write that ``counts`` picks, and stays full (every write,
    counted or not, fails) until :meth:`free`.

    Attributes:
        failed: the paths whose write met the full disk.
        partial: the size of each temporary file at the moment its write failed (bytes that had landed).
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch, after: int, counts: Callable[[Path], bool]) -> None:
        self.after, self.counts = after, counts
        self.seen = 0
        self.full = False
        self.failed: list[Path] = []
        self.partial: list[int] = []
        self.local = threading.local()
        self._lock = threading.Lock()
        real = imageio.atomic_write_bytes

        def write(path: Path, data: bytes) -> None:
            path = Path(path)
            with self._lock:
                if not self.full and self.after > 0 and self.counts(path):
                    self.seen += 1
                    self.full = self.seen >= self.after
                if self.full:
                    self.failed.append(path)
                fail = self.full
            self.local.fail = fail
            try:
                real(path, data)
            finally:
                self.local.fail = False

        monkeypatch.setattr(imageio, "atomic_write_bytes", write)
        monkeypatch.setattr(imageio, "os", _OsOnAFullDisk(self))

    def free(self) -> None:
        """Space was freed: every write from now on lands."""
        with self._lock:
            self.full, self.after = False, 0


def noisy_mask(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Random class ids: a PNG that does not compress, so saving it needs new database pages."""
    return rng.integers(0, 3, (h, w), dtype=np.uint8)


def error_line(err: str) -> str:
    """The one ``error:`` line a command ended with, after checking there is no traceback."""
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


# ------------------------------------------------------------------------------------------ saves


def test_a_save_on_a_full_disk_is_one_sentence_writes_nothing_and_the_next_save_lands(tiny_cfg) -> None:
    from labelsmart.app.session import Session
    from labelsmart.serving.predictor import Predictor

    store = open_project(tiny_cfg)
    img, other = store.images()[:2]
    rng = np.random.default_rng(0)
    saved = {}
    for _ in range(3):
        mask = noisy_mask(rng, img.height, img.width)
        saved[store.save_label(img.id, mask, based_on=max(saved) if saved else None)] = mask
    con = store._con()  # this thread's connection, the one every save below goes through
    pages = con.execute("PRAGMA page_count").fetchone()[0]
    assert con.execute(f"PRAGMA max_page_count={pages}").fetchone()[0] == pages  # not one page more: disk full

    with pytest.raises(StoreFullError) as caught:
        store.save_label(img.id, noisy_mask(rng, img.height, img.width), based_on=max(saved))
    msg = str(caught.value)
    assert isinstance(caught.value, StoreError) and "\n" not in msg
    assert f"the disk holding {tiny_cfg.db_path} is full; free space and save again" in msg
    assert "this change was not written" in msg and "saved before it is safe" in msg
    assert not con.in_transaction  # rolled back: the next transaction can start
    with pytest.raises(StoreFullError):  # an import: both masks or neither
        store.save_labels(
            [(other.id, noisy_mask(rng, other.height, other.width)), (img.id, saved[min(saved)])], "i", "png"
        )
    with pytest.raises(StoreFullError):  # an undo appends a copy of the revision before
        store.undo_label(img.id)

    # The person saving in the page is told the sentence; the editor keeps its strokes (no revision).
    session = Session(tiny_cfg, store, Predictor(store, tiny_cfg))
    mask = noisy_mask(rng, img.height, img.width)
    editor = {"background": store.read_image(img.id), "layers": [imageio.mask_to_rgba(mask, session.colors())]}
    result = session.save_labels(img.id, editor, based_on=max(saved))
    assert result.revision is None and result.message == f"⚠️ {msg}"

    fresh = Store(tiny_cfg.db_path, image_root=tiny_cfg.image_root)  # another connection: what is on disk
    assert fresh._con().execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert [r.id for r in fresh.history(img.id)] == sorted(saved) and fresh.history(other.id) == []
    for rev, m in saved.items():
        np.testing.assert_array_equal(fresh.load_revision(rev), m)

    con.execute("PRAGMA max_page_count=1073741823")  # space freed
    result = session.save_labels(img.id, editor, based_on=max(saved))
    assert result.message.startswith("Saved revision") and result.revision is not None
    assert [r.id for r in fresh.history(img.id)] == [*sorted(saved), result.revision]
    np.testing.assert_array_equal(fresh.current_label(img.id), mask)


# ------------------------------------------------------------------------------------------ exports


def _labelled_project(tiny_cfg, n: int = 5) -> tuple[Store, list[str]]:
    store = open_project(tiny_cfg)
    rng = np.random.default_rng(1)
    for row in store.images()[:n]:
        store.save_label(row.id, noisy_mask(rng, row.height, row.width))
    project = ["--dataset", str(tiny_cfg.dataset), "--workdir", str(tiny_cfg.workdir)]
    return store, project


def test_an_export_on_a_full_disk_leaves_no_folder_and_says_free_space(
    tiny_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    store, project = _labelled_project(tiny_cfg)
    clean = tmp_path / "clean"
    assert export_labels(store, "png", clean) == 5
    exports = tmp_path / "exports"
    exports.mkdir()
    out = exports / "labels"
    disk = FullDisk(monkeypatch, after=3, counts=lambda p: p.suffix == ".png")  # full at the third mask

    assert main(["export-labels", *project, "--format", "png", "--out", str(out)]) == 1
    line = error_line(capsys.readouterr().err)
    assert line == (
        f"error: {out}: the disk is full, so the export was not written (nothing of it was left behind); "
        "free space and export again."
    )
    assert disk.failed and disk.partial and max(disk.partial) > 0  # a temporary file had bytes in it
    assert not out.exists() and list(exports.iterdir()) == []  # no export, no temporary folder beside it
    with pytest.raises(FormatError, match="the disk is full"):  # the function says the same to the page
        export_labels(store, "png", out)
    assert list(exports.iterdir()) == []

    disk.free()
    assert main(["export-labels", *project, "--format", "png", "--out", str(out)]) == 0
    capsys.readouterr()
    files = sorted(p.relative_to(clean) for p in clean.rglob("*") if p.is_file())
    assert files and sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file()) == files
    assert all((out / f).read_bytes() == (clean / f).read_bytes() for f in files)


def test_a_full_disk_the_command_did_not_name_is_still_one_sentence(
    tiny_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The CLI's last line of defence: an ENOSPC from any write is one sentence, other OSErrors keep theirs."""
    from labelsmart import formats

    _, project = _labelled_project(tiny_cfg, n=1)
    where = str(tmp_path / "x" / "file")

    def full(*args: object, **kwargs: object) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), where)

    monkeypatch.setattr(formats, "export_labels", full)
    assert main(["export-labels", *project, "--format", "png", "--out", str(tmp_path / "o")]) == 1
    line = error_line(capsys.readouterr().err)
    assert line == f"error: {where}: the disk is full, so it was not written; free space and run the command again."

    def denied(*args: object, **kwargs: object) -> int:
        raise OSError(errno.EIO, os.strerror(errno.EIO), where)

    monkeypatch.setattr(formats, "export_labels", denied)
    with pytest.raises(OSError, match="Input/output error"):
        main(["export-labels", *project, "--format", "png", "--out", str(tmp_path / "o")])


# ------------------------------------------------------------------------------------------ pre-annotation


def _preannotate_argv(model: Path, images: Path, out: Path, io_threads: int = 2) -> list[str]:
    return [
        "preannotate",
        *("--model", str(model), "--images", str(images), "--out", str(out)),
        *("--threads", "1", "--device", "cpu", "--batch", "2", "--io-threads", str(io_threads)),
    ]


def _manifest(out: Path) -> dict[str, dict[str, Any]]:
    lines = [json.loads(x) for x in (out / pipeline.MANIFEST_NAME).read_text().splitlines()]
    by_image = {r["image"]: r for r in lines}
    assert len(by_image) == len(lines)  # no image twice
    return by_image


@pytest.mark.parametrize("io_threads", [1, 2])
def test_a_preannotation_on_a_full_disk_stops_and_the_next_run_completes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], io_threads: int
) -> None:
    """The disk fills up at the fourth mask. With one I/O thread the writes land in order, so exactly three
    images are done; with two, which images landed before the run stopped depends on the threads."""
    model = write_toy_model(tmp_path / "model" / "toy.onnx", version=3)
    images = tmp_path / "imgs"
    rels = []
    for i in range(12):
        img, _ = synth_scene(i, 40 + 8 * (i % 2), 64)
        rel = Path("a" if i % 3 else "b") / f"img{i:02d}.png"
        (images / rel).parent.mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(images / rel), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
        rels.append(rel.as_posix())
    clean = tmp_path / "clean"
    assert main(_preannotate_argv(model, images, clean)) == 0
    capsys.readouterr()

    out = tmp_path / "out"
    disk = FullDisk(monkeypatch, after=4, counts=lambda p: p.suffix == ".png")  # full at the fourth mask
    assert main(_preannotate_argv(model, images, out, io_threads)) == 1
    cap = capsys.readouterr()
    line = error_line(cap.err)
    assert line.startswith(f"error: the disk holding {out} is full, so the run stopped (the outputs of ")
    assert line.endswith("were not written); free space and run the same command again: it goes on where it stopped.")
    assert "done=" not in cap.out  # it stopped; it did not carry on failing image after image
    assert disk.failed and disk.partial and max(disk.partial) > 0
    assert not list(out.rglob("*.tmp")) and not any(p.exists() for p in disk.failed)  # nothing half-written
    first = _manifest(out)
    failed_images = {p.relative_to(out).with_suffix("").as_posix() for p in disk.failed if p.suffix == ".png"}
    assert len(first) == 3 if io_threads == 1 else len(first) < len(rels)
    assert not failed_images & {Path(r).with_suffix("").as_posix() for r in first}  # the failed one is not listed
    assert not (out / pipeline.ERRORS_NAME).exists()  # nor listed as an error: it is simply not done yet
    for image, record in first.items():  # what the manifest lists is there, whole
        assert (out / record["mask"]).read_bytes() == (clean / record["mask"]).read_bytes(), image

    disk.free()
    assert main(_preannotate_argv(model, images, out, io_threads)) == 0
    counts = dict(kv.split("=") for kv in capsys.readouterr().out.strip().splitlines()[-1].split())
    assert counts == {"done": str(len(rels) - len(first)), "skipped": str(len(first)), "failed": "0"}
    assert _manifest(out) == _manifest(clean) and sorted(_manifest(out)) == sorted(rels)
    made = sorted(p.relative_to(clean) for p in clean.rglob("*") if p.is_file() and p.suffix in (".png", ".jpg"))
    assert len(made) == 2 * len(rels)  # a mask and an overlay each
    assert sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file() and p.suffix in (".png", ".jpg")) == made
    assert all((out / f).read_bytes() == (clean / f).read_bytes() for f in made)


FULL_DISK_TICKETS = "LABELSMART_TEST_FULL_DISK"  # a Ray worker's disk fills up: the folder counting its writes


def _a_ray_worker_on_a_full_disk() -> None:
    """Ray's ``worker_process_setup_hook``: every worker's atomic writes share one disk (a folder of tickets,
    one per mask written, named in ``$LABELSMART_TEST_FULL_DISK``) that fills up at the fourth mask and stays
    full (every write after, mask or overlay, fails with ENOSPC), whichever worker writes."""
    import errno
    import os
    from pathlib import Path

    from labelsmart import imageio

    tickets = Path(os.environ[FULL_DISK_TICKETS])
    real = imageio.atomic_write_bytes

    def write(path: Path, data: bytes) -> None:
        if not (tickets / "full").exists() and Path(path).suffix == ".png":
            n = 1
            while True:  # the next ticket, taken atomically across processes
                try:
                    os.close(os.open(tickets / str(n), os.O_CREAT | os.O_EXCL))
                    break
                except FileExistsError:
                    n += 1
            if n >= 4:
                (tickets / "full").touch()
        if (tickets / "full").exists():
            (tickets / f"failed-{os.getpid()}-{Path(path).name}").touch()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, data)

    imageio.atomic_write_bytes = write


def test_a_ray_preannotation_on_a_full_disk_stops_as_the_local_engine_does(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The disk of Ray's workers fills up at the fourth mask: the run stops with the local engine's sentence
    instead of listing every image after as failed, and the next run completes it."""
    pytest.importorskip("ray.data", reason="Ray is an optional extra: pip install -r requirements-ray.txt")
    import ray
    from ray import cloudpickle

    model = write_toy_model(tmp_path / "model" / "toy.onnx", version=3)
    images = tmp_path / "imgs"
    images.mkdir()
    for i in range(12):
        img, _ = synth_scene(i, 48, 64)
        assert cv2.imwrite(str(images / f"img{i:02d}.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    clean, out, tickets = tmp_path / "clean", tmp_path / "out", tmp_path / "tickets"
    tickets.mkdir()
    ray_argv = [*_preannotate_argv(model, images, out), "--engine", "ray"]
    assert main(_preannotate_argv(model, images, clean)) == 0
    capsys.readouterr()

    # the hook travels by value (tests/ is not on the workers' path), and finds labelsmart where this test does
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    root = str(Path(imageio.__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    try:
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
            runtime_env={
                "worker_process_setup_hook": _a_ray_worker_on_a_full_disk,
                "env_vars": {FULL_DISK_TICKETS: str(tickets), "PYTHONPATH": path},
            },
        )
        assert main(ray_argv) == 1  # run_ray uses the instance already started
    finally:
        ray.shutdown()
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    cap = capsys.readouterr()
    line = error_line(cap.err)
    assert line.startswith(f"error: the disk holding {out} is full, so the run stopped (the outputs of img")
    assert line.endswith("were not written); free space and run the same command again: it goes on where it stopped.")
    assert "done=" not in cap.out  # it stopped; it did not carry on failing image after image
    assert (tickets / "full").exists() and list(tickets.glob("failed-*"))  # the workers' disk did fill up
    first = _manifest(out)
    assert len(first) < 12 and not (out / pipeline.ERRORS_NAME).exists()  # the rest are not done, nor failed
    assert not list(out.rglob("*.tmp"))
    for image, record in first.items():  # what the manifest lists is there, whole
        assert (out / record["mask"]).read_bytes() == (clean / record["mask"]).read_bytes(), image

    assert main(ray_argv) == 0  # space freed (a fresh Ray instance, without the full disk)
    counts = dict(kv.split("=") for kv in capsys.readouterr().out.strip().splitlines()[-1].split())
    assert counts == {"done": str(12 - len(first)), "skipped": str(len(first)), "failed": "0"}
    assert _manifest(out) == _manifest(clean)
    made = sorted(p.relative_to(clean) for p in clean.rglob("*") if p.is_file() and p.suffix in (".png", ".jpg"))
    assert sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file() and p.suffix in (".png", ".jpg")) == made
    assert all((out / f).read_bytes() == (clean / f).read_bytes() for f in made)


class _FullFile:
    """A text file on a full disk: writes are buffered, every flush fails with ENOSPC."""

    def __init__(self, fh: Any) -> None:
        self._fh = fh

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def fileno(self) -> int:
        return self._fh.fileno()

    @property
    def closed(self) -> bool:
        return self._fh.closed

    def close(self) -> None:
        self._fh.close()


def test_a_full_disk_under_the_manifest_is_the_same_sentence_and_both_files_close(tmp_path: Path) -> None:
    journal = pipeline.Journal(tmp_path, overwrite=False)
    journal.error(Path("bad.png"), "not a readable image")
    manifest, errors = journal._manifest, journal._errors
    assert errors is not None
    journal._manifest = _FullFile(manifest)  # the disk fills up under the manifest
    with pytest.raises(pipeline.OutputFullError, match=rf"the disk holding {tmp_path} is full.*a\.png"):
        journal.record({"image": "a.png", "mask": "a.png"})
    with pytest.raises(pipeline.OutputFullError, match="the manifest was not closed"):
        journal.close()
    assert manifest.closed and errors.closed


# ------------------------------------------------------------------------------------------ a locked database

LOCKER = """
import sqlite3, sys
con = sqlite3.connect(sys.argv[1], isolation_level=None)
con.execute("BEGIN EXCLUSIVE")
con.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('held-by', 'another program')")
print("locked", flush=True)
sys.stdin.readline()
con.execute("ROLLBACK")
"""


def test_a_save_while_another_program_holds_the_lock_fails_in_a_sentence_and_reads_go_on(
    tiny_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from labelsmart.serving.predictor import Predictor
    from labelsmart.training.trainer import TrainerLoop

    monkeypatch.setattr(db, "BUSY_TIMEOUT_S", 0.5)  # 30 s in the product; every store opened below waits 0.5 s
    store = open_project(tiny_cfg)
    assert store.busy_timeout_s == 0.5
    img = store.images()[0]
    rng = np.random.default_rng(2)
    first = noisy_mask(rng, img.height, img.width)
    r1 = store.save_label(img.id, first, based_on=None)
    folder = tiny_cfg.project_models_dir / "v0001"
    write_toy_model(folder / "model.onnx", version=1)
    store.add_model(1, folder, Snapshot(0, (), 0))
    store.publish_model(1, {"miou": 0.5})
    expected = Predictor(store, tiny_cfg).predict(img.id)  # cached on disk and in the store's index
    assert expected is not None

    locker = subprocess.Popen(
        [sys.executable, "-c", LOCKER, str(tiny_cfg.db_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert locker.stdout is not None and locker.stdout.readline().strip() == "locked"
        t0 = time.monotonic()
        with pytest.raises(StoreLockedError) as caught:
            store.save_label(img.id, noisy_mask(rng, img.height, img.width), based_on=r1)
        assert time.monotonic() - t0 >= 0.4  # it waited for the lock before giving up
        msg = str(caught.value)
        assert isinstance(caught.value, StoreError) and "\n" not in msg
        assert msg.startswith(f"{tiny_cfg.db_path} is locked by another program (waited 0.5 s); close it and save")
        assert "this change was not written" in msg

        # Readers never wait for a writer: the page, the trainer's trigger and snapshot, a predictor starting now.
        np.testing.assert_array_equal(store.current_label(img.id), first)
        assert [r.id for r in store.history(img.id)] == [r1]
        assert store.snapshot().revisions == ((img.id, r1),)
        assert TrainerLoop(tiny_cfg, store).trigger_state().new_pixels == img.height * img.width
        predictor = Predictor(store, tiny_cfg)
        assert predictor.version == 1 and predictor.refresh() is False
        pred = predictor.predict(img.id)
        assert pred is not None and np.array_equal(pred.mask, expected.mask)
    finally:
        try:
            if locker.stdin is not None:
                locker.stdin.write("\n")
                locker.stdin.close()
        except BrokenPipeError:  # it died on its own; its output says why
            pass
        locker.wait(timeout=60)

    fresh = Store(tiny_cfg.db_path, image_root=tiny_cfg.image_root)
    assert fresh.get_meta("held-by") is None  # the other program's change was its own, and rolled back
    assert [r.id for r in fresh.history(img.id)] == [r1]  # the refused save wrote nothing
    second = noisy_mask(rng, img.height, img.width)
    r2 = store.save_label(img.id, second, based_on=r1)  # the lock released: the same save lands
    assert [r.id for r in fresh.history(img.id)] == [r1, r2]
    np.testing.assert_array_equal(fresh.current_label(img.id), second)


def test_a_locked_store_neither_stops_the_trainer_nor_fails_a_prediction(tiny_cfg, tmp_path: Path, monkeypatch) -> None:
    from labelsmart.serving.predictor import Predictor
    from labelsmart.training.trainer import TrainerLoop

    store = open_project(tiny_cfg)
    locked = StoreLockedError(f"{store.db_path} is locked by another program (waited 30 s); close it and save again.")

    def refuse(*_args: Any, **_kwargs: Any) -> None:
        raise locked

    loop = TrainerLoop(tiny_cfg, store)
    monkeypatch.setattr(store, "set_status", refuse)
    loop.write_status(force=True, state="waiting")  # the page's status is not written; the trainer goes on
    polls = []

    def step() -> bool:
        polls.append(1)
        raise locked

    monkeypatch.setattr(loop, "step", step)
    monkeypatch.setattr(loop, "recover", lambda: None)
    loop.run(stop=lambda: len(polls) >= 3)  # each poll meets the lock; the loop waits and polls again
    assert len(polls) == 3

    write_toy_model(tmp_path / "toy" / "v0001" / "model.onnx", max_side=64)
    store.add_model(1, tmp_path / "toy" / "v0001", store.snapshot(), status="published")
    store.publish_model(1, {})
    predictor = Predictor(store, tiny_cfg)
    monkeypatch.setattr(store, "record_prediction", refuse)
    image = store.images()[0]
    pred = predictor.predict(image.id)  # answered; only the cache's index row is missing
    assert pred is not None and pred.mask.shape == (image.height, image.width)
    assert predictor.cache_path(image.id, 1).is_file()
