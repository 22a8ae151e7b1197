"""The SQLite store: revisions are append-only, saves are atomic, snapshots consistent."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import numpy as np
import pytest

from labelsmart.project import ProjectError, import_masks, open_project
from labelsmart.store import Store, StoreError, load_classes_file


def test_open_project_lists_images_not_masks_and_loads_classes(tiny_cfg):
    store = open_project(tiny_cfg)
    paths = [r.path for r in store.images()]
    assert len(paths) == 8 and all(p.startswith("frame_") for p in paths)  # images/ only, masks/ not listed
    assert [c.name for c in store.classes()] == ["sky", "road", "car"]
    assert store.classes()[1].color == (128, 64, 128)
    assert all(r.state == "unlabelled" for r in store.images())


def test_nested_plain_folder_and_unreadable_file(tmp_path: Path):
    import cv2

    root = tmp_path / "plain"
    (root / "a" / "b").mkdir(parents=True)
    cv2.imwrite(str(root / "a" / "b" / "x.jpg"), np.zeros((10, 12, 3), np.uint8))
    cv2.imwrite(str(root / "y.png"), np.zeros((10, 12, 3), np.uint8))
    (root / "broken.png").write_bytes(b"not a png")
    store = Store(tmp_path / "db.sqlite", image_root=root)
    assert store.sync_images() == 2
    assert [r.path for r in store.images()] == ["a/b/x.jpg", "y.png"]
    assert any("broken.png" in e[3] and "not a readable image" in e[3] for e in store.events())
    assert store.sync_images() == 0  # idempotent


def test_revisions_are_append_only_with_undo(tiny_cfg):
    store = open_project(tiny_cfg)
    img = store.images()[0]
    m1 = np.full((img.height, img.width), 255, np.uint8)
    m1[:10] = 0
    m2 = m1.copy()
    m2[-10:] = 1
    r1 = store.save_label(img.id, m1)
    r2 = store.save_label(img.id, m2)
    assert r2 > r1
    assert np.array_equal(store.current_label(img.id), m2)
    assert store.image(img.id).state == "labelled"
    r3 = store.undo_label(img.id)
    assert np.array_equal(store.current_label(img.id), m1)
    store.undo_label(img.id)
    assert (store.current_label(img.id) == 255).all() and store.image(img.id).state == "unlabelled"
    assert store.undo_label(img.id) is None
    assert [h.id for h in store.history(img.id)][:3] == [r1, r2, r3]
    assert np.array_equal(store.load_revision(r2), m2)  # history kept whole


def test_bad_masks_are_refused_with_a_sentence(tiny_cfg):
    store = open_project(tiny_cfg)
    img = store.images()[0]
    with pytest.raises(StoreError, match="paint on the image at its own size"):
        store.save_label(img.id, np.zeros((5, 5), np.uint8))
    bad = np.full((img.height, img.width), 255, np.uint8)
    bad[0, 0] = 7
    with pytest.raises(StoreError, match=r"class ids \[7\]"):
        store.save_label(img.id, bad)
    assert store.history(img.id) == []


def test_snapshot_and_new_pixels(tiny_cfg):
    store = open_project(tiny_cfg)
    a, b = store.images()[:2]
    m = np.full((a.height, a.width), 255, np.uint8)
    m[:4, :5] = 2
    ra = store.save_label(a.id, m)
    snap = store.snapshot()
    assert snap.revisions == ((a.id, ra),) and snap.labelled_pixels == 20
    assert store.new_pixels_since(snap.max_revision) == 0
    store.save_label(b.id, m)
    assert store.new_pixels_since(snap.max_revision) == 20
    assert store.class_pixel_counts() == {2: 40}


def test_import_masks_once(tiny_cfg, tiny_dataset):
    store = open_project(tiny_cfg)
    assert import_masks(store, tiny_dataset / "masks") == 8
    assert import_masks(store, tiny_dataset / "masks") == 0
    first = store.images()[0]
    assert store.current_revision(first.id).source == "import"


def test_import_masks_wrong_size_names_the_file(tiny_cfg, tiny_dataset):
    import cv2

    cv2.imwrite(str(tiny_dataset / "masks" / "frame_000.png"), np.zeros((5, 5), np.uint8))
    store = open_project(tiny_cfg)
    with pytest.raises(ProjectError, match=r"frame_000\.png.*resize the mask"):
        import_masks(store, tiny_dataset / "masks")


def test_classes_file_forms(tmp_path: Path):
    f = tmp_path / "c.json"
    f.write_text('["a", "b"]')
    assert load_classes_file(f) == [("a", None), ("b", None)]
    f.write_text('[{"name": "a", "color": "#ff0000"}, {"name": "b", "color": [0, 255, 0]}]')
    assert load_classes_file(f) == [("a", (255, 0, 0)), ("b", (0, 255, 0))]
    f.write_text('{"a": 1}')
    with pytest.raises(StoreError, match="c.json"):
        load_classes_file(f)


def _writer(db: str, root: str, image_id: int, n: int, value: int) -> None:
    store = Store(Path(db), image_root=Path(root))
    img = store.image(image_id)
    for _ in range(n):
        store.save_label(image_id, np.full((img.height, img.width), value, np.uint8), author=f"w{value}")


def test_two_processes_saving_at_once_lose_nothing(tiny_cfg):
    store = open_project(tiny_cfg)
    image_id = store.images()[0].id
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=_writer, args=(str(tiny_cfg.db_path), str(tiny_cfg.image_root), image_id, 15, v))
        for v in (0, 1)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    hist = store.history(image_id)
    assert len(hist) == 30
    assert sorted({h.author for h in hist}) == ["w0", "w1"]


def test_relative_version_folders_of_an_older_registry_become_absolute(tiny_cfg, tmp_path: Path, monkeypatch):
    from labelsmart.store import Snapshot

    store = open_project(tiny_cfg)
    started_in = tmp_path / "started_in"
    (started_in / "models" / "p" / "v0001").mkdir(parents=True)
    monkeypatch.chdir(started_in)
    store.add_model(1, Path("models/p/v0001"), Snapshot(0, (), 0), status="published")  # as older versions wrote it
    store.add_model(2, Path("models/p/v0002"), Snapshot(0, (), 0), status="published")  # its files are elsewhere
    store.add_model(3, Path("models/p/v0003"), Snapshot(0, (), 0), status="published")  # and nowhere
    (tiny_cfg.project_models_dir / "v0002").mkdir(parents=True)
    assert store.resolve_model_paths(tiny_cfg.project_models_dir) == 2
    monkeypatch.chdir(tmp_path)  # opened from another folder: the rows no longer depend on it
    rows = {m.version: m for m in store.models()}
    assert rows[1].folder == started_in / "models" / "p" / "v0001"
    assert rows[2].folder == tiny_cfg.project_models_dir / "v0002"
    assert rows[3].path == "models/p/v0003"
    assert store.resolve_model_paths(tiny_cfg.project_models_dir) == 0  # once is enough


def test_saves_based_on_one_revision_land_once_however_many_race(tiny_cfg):
    """Eight threads save the same image, all based on the revision they read: exactly one lands, the other
    seven are told who saved first, and the history holds nothing else."""
    import threading

    from labelsmart.store import ANY_REVISION, StaleRevisionError

    store = open_project(tiny_cfg)
    img = store.images()[0]
    base = store.save_label(img.id, np.full((img.height, img.width), 0, np.uint8), author="first")
    outcomes: list[object] = []
    start = threading.Barrier(8)

    def save(k: int) -> None:
        mask = np.full((img.height, img.width), 255, np.uint8)
        mask[k] = 1
        start.wait()
        try:
            outcomes.append(store.save_label(img.id, mask, author=f"t{k}", based_on=base))
        except StaleRevisionError as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=save, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    landed = [o for o in outcomes if isinstance(o, int)]
    refused = [o for o in outcomes if isinstance(o, StaleRevisionError)]
    assert len(landed) == 1 and len(refused) == 7
    assert all(e.current.id == landed[0] and "nothing was saved" in str(e) for e in refused)
    assert [r.id for r in store.history(img.id)] == [base, landed[0]]
    with pytest.raises(StaleRevisionError, match=r"after you opened it with no labels"):
        store.save_label(img.id, np.zeros((img.height, img.width), np.uint8), based_on=None)
    assert store.save_label(img.id, np.zeros((img.height, img.width), np.uint8), based_on=ANY_REVISION) > landed[0]


def test_a_huge_image_in_the_folder_is_skipped_with_an_event(tiny_cfg, tiny_dataset: Path):
    from test_imageio import huge_png_header

    huge_png_header(tiny_dataset / "images" / "huge.png")
    store = open_project(tiny_cfg)
    assert len(store.images()) == 8 and all(r.path != "huge.png" for r in store.images())
    assert any("huge.png: its pixels are more than labelsmart opens" in message for *_, message in store.events())


def _saver(db: str, root: str, image_id: int, log: str) -> None:
    """Save revisions as fast as it can, noting each one after its transaction committed."""
    store = Store(Path(db), image_root=Path(root))
    img = store.image(image_id)
    k = 0
    with open(log, "a") as fh:
        while True:
            mask = np.full((img.height, img.width), 255, np.uint8)
            mask[k % img.height] = k % 3
            rev = store.save_label(image_id, mask, author="saver")
            fh.write(f"{rev}\n")
            fh.flush()
            k += 1


def test_kill_9_during_saves_loses_no_saved_revision(tiny_cfg, tmp_path: Path):
    """The app process killed outright in the middle of saving: the database is intact, and every revision
    whose save had returned is there and readable (RELIABILITY.md)."""
    import os
    import signal
    import time

    store = open_project(tiny_cfg)
    image_id = store.images()[0].id
    log = tmp_path / "saved.txt"
    log.touch()
    proc = mp.get_context("spawn").Process(
        target=_saver, args=(str(tiny_cfg.db_path), str(tiny_cfg.image_root), image_id, str(log))
    )
    proc.start()
    deadline = time.time() + 60
    while time.time() < deadline and len(log.read_text().split()) < 30:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # whatever it was doing: mid-transaction, mid-encode, mid-write
    proc.join(10)
    saved = [int(v) for v in log.read_text().split()]
    assert len(saved) >= 30, "the saver did not get going"
    fresh = Store(tiny_cfg.db_path, image_root=tiny_cfg.image_root)
    assert fresh._con().execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    history = {r.id for r in fresh.history(image_id)}
    assert set(saved) <= history and len(history) - len(saved) <= 1  # at most the one that committed unlogged
    for rev in saved[-5:]:
        assert fresh.load_revision(rev).shape == (store.images()[0].height, store.images()[0].width)
    assert fresh.save_label(image_id, np.zeros_like(fresh.load_revision(saved[-1]))) > max(history)  # resumes
