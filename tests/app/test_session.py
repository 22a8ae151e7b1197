"""UI handlers as plain functions, and the launched app driven through gradio_client."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import CLASSES, pid_alive, scribbles, synth_scene

from labelsmart import imageio
from labelsmart.app.session import Session
from labelsmart.project import open_project
from labelsmart.serving.predictor import Predictor
from labelsmart.store import Store

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def session(tiny_cfg) -> Session:
    store = open_project(tiny_cfg)
    return Session(tiny_cfg, store, Predictor(store, tiny_cfg))


def test_save_merges_layers_and_undo_restores(session: Session):
    store = session.store
    img = store.images()[0]
    view = session.view(img.id)
    assert view.editor["background"].shape == (img.height, img.width, 3)
    assert view.overlay is None and "No model yet" in view.overlay_info
    colors = session.colors()
    a = np.full((img.height, img.width), 255, np.uint8)
    a[5:8, 10:60] = 0
    b = np.full_like(a, 255)
    b[60:63, 10:60] = 1
    b[5:8, 10:20] = 2  # a later layer wins where both are painted
    editor = {
        "background": view.editor["background"],
        "layers": [imageio.mask_to_rgba(a, colors), imageio.mask_to_rgba(b, colors)],
    }
    msg = session.save(img.id, editor)
    assert msg.startswith("Saved revision")
    saved = store.current_label(img.id)
    assert (saved[5:8, 10:20] == 2).all() and (saved[5:8, 20:60] == 0).all() and (saved[60:63, 10:60] == 1).all()
    assert (saved == 255).sum() == saved.size - 3 * 50 - 3 * 50
    assert session.save(img.id, editor) == "Nothing changed since the last save."
    assert "●" in dict((i, lbl) for lbl, i in session.image_choices())[img.id]
    assert session.undo(img.id).startswith("Undone")
    assert store.image(img.id).state == "unlabelled"
    assert "1 labelled" not in session.progress_md()


def test_a_save_on_a_stale_revision_is_refused_then_merged_or_kept(tiny_cfg):
    """Two annotators open the same image; the second to save is told, sees the newer labels, and chooses."""
    import dataclasses

    store = open_project(tiny_cfg)
    alice = Session(dataclasses.replace(tiny_cfg, author="alice"), store, Predictor(store, tiny_cfg))
    bob = Session(dataclasses.replace(tiny_cfg, author="bob"), store, Predictor(store, tiny_cfg))
    img = store.images()[0]
    colors = alice.colors()
    shape = (img.height, img.width)

    def editor(mask: np.ndarray) -> dict:
        return {"background": None, "layers": [imageio.mask_to_rgba(mask, colors)]}

    seen_by_alice, seen_by_bob = alice.view(img.id), bob.view(img.id)
    assert seen_by_alice.revision is None and seen_by_bob.revision is None
    theirs = np.full(shape, 255, np.uint8)
    theirs[:10] = 0
    saved = alice.save_labels(img.id, editor(theirs), based_on=seen_by_alice.revision)
    assert saved.revision is not None and not saved.stale
    mine = np.full(shape, 255, np.uint8)
    mine[-10:] = 1
    refused = bob.save_labels(img.id, editor(mine), based_on=seen_by_bob.revision)
    assert refused.stale and refused.revision is None
    assert "was saved by alice" in refused.message and f"(revision {saved.revision})" in refused.message
    assert len(store.history(img.id)) == 1  # nothing of bob's landed
    newer = bob.conflict(img.id, seen_by_bob.revision)
    assert newer is not None and newer.shape == (*shape, 3)  # alice's labels over the photo
    assert bob.conflict(img.id, saved.revision) is None
    assert bob.undo(img.id, based_on=seen_by_bob.revision).startswith("⚠️")  # not alice's save either
    assert bob.merge(img.id, editor(mine), seen_by_bob.revision).startswith("Merged your strokes")
    merged = store.current_label(img.id)
    assert (merged[:10] == 0).all() and (merged[-10:] == 1).all() and (merged[10:-10] == 255).all()
    assert [r.author for r in store.history(img.id)] == ["alice", "bob"]
    # Alice, still on her revision, now chooses to keep hers as a new revision (bob's stays in the history).
    assert alice.save_labels(img.id, editor(theirs), based_on=saved.revision).stale
    assert alice.keep_mine(img.id, editor(theirs)).startswith("Saved revision")
    assert np.array_equal(store.current_label(img.id), theirs) and len(store.history(img.id)) == 3


def test_editor_layers_of_another_size_are_rescaled(session: Session):
    img = session.store.images()[0]
    small = np.zeros((img.height // 2, img.width // 2, 4), np.uint8)
    small[:, :, :3] = session.colors()[1]
    small[:, :, 3] = 255
    mask = session.editor_to_mask(img.id, {"layers": [small]})
    assert mask.shape == (img.height, img.width) and (mask == 1).all()


def test_the_editor_shows_labels_translucent_and_reads_them_back_exactly(session: Session, tmp_path: Path):
    """Saved labels and a pre-annotation go into the editor at LABEL_ALPHA (the photo shows through); a layer at any
    alpha reads back as the classes of its colours, exactly, and nothing else."""
    from labelsmart.app.session import LABEL_ALPHA, MIN_ALPHA, label_layer, layer_to_mask

    store, colors = session.store, session.colors()
    img = store.images()[0]
    mask = np.full((img.height, img.width), 255, np.uint8)
    mask[:10], mask[-10:, :40], mask[40:50, 50:60] = 0, 1, 2
    store.save_label(img.id, mask)
    layer = session.view(img.id).editor["layers"][0]
    assert layer.shape == (img.height, img.width, 4) and set(np.unique(layer[..., 3]).tolist()) == {0, LABEL_ALPHA}
    assert np.array_equal(layer[..., :3][mask == 1], np.tile(colors[1], (int((mask == 1).sum()), 1)))
    assert np.array_equal(session.editor_to_mask(img.id, {"layers": [layer]}), mask)
    assert session.save(img.id, {"layers": [layer]}) == "Nothing changed since the last save."
    # An opaque layer (older pages, API clients) and the browser's rounding of a translucent one read the same.
    assert np.array_equal(layer_to_mask(imageio.mask_to_rgba(mask, colors), colors), mask)
    noisy = layer.copy()
    noise = np.random.default_rng(0).integers(-3, 4, noisy[..., :3].shape)
    noisy[..., :3] = np.clip(noisy[..., :3].astype(int) + noise, 0, 255)
    noisy[..., 3] = np.where(mask != 255, 127, 0)
    assert np.array_equal(layer_to_mask(noisy, colors), mask)
    # Faint (a stroke's rim), transparent whatever its colour, or far from every class colour: unlabelled.
    odd = label_layer(np.zeros((1, 5), np.uint8), colors)
    odd[0, 1, 3] = MIN_ALPHA - 1
    odd[0, 2, 3] = 0
    odd[0, 3, :3] = (128 + 17, 128, 128)  # sky, one channel off by more than the tolerance
    odd[0, 4, :3] = (128 + 16, 128 - 16, 128 + 16)  # sky within the tolerance in every channel
    assert layer_to_mask(odd, colors).tolist() == [[0, 255, 255, 255, 0]]
    close = [(100, 100, 100), (110, 100, 100)]  # two class colours closer than twice the tolerance: the nearest
    px = np.array([[[100, 100, 100, 128], [110, 100, 100, 128], [104, 100, 100, 128], [106, 100, 100, 255]]], np.uint8)
    assert layer_to_mask(px, close).tolist() == [[0, 1, 0, 1]]
    many = [(7 * k % 256, 13 * k % 256, 29 * k % 256) for k in range(150)]  # more classes than bits in a word
    ids = np.arange(150, dtype=np.uint8).reshape(10, 15)
    assert np.array_equal(layer_to_mask(label_layer(ids, many), many), ids)
    # The pre-annotation goes in at the same alpha, and saves back as the prediction, pixel for pixel.
    _publish_toy(session, tmp_path)
    other = store.images()[1]
    value = session.preannotation_layer(other.id)
    pred = session.predictor.predict(other.id).mask
    assert set(np.unique(value["layers"][0][..., 3]).tolist()) <= {0, LABEL_ALPHA}
    assert session.save(other.id, value).startswith("Saved revision")
    assert np.array_equal(store.current_label(other.id), pred)


def test_navigation_and_classes(session: Session):
    ids = [r.id for r in session.store.images()]
    assert session.neighbour(ids[0], 1) == ids[1]
    assert session.neighbour(ids[0], -1) == ids[-1]
    assert session.add_class("sky", None).startswith("⚠️")  # exists already
    assert session.add_class("tree", "#00ff00") == "Added class 3: tree."
    assert "tree" in session.legend_html()
    assert "Train now" not in session.train_now() or session.store.pending_requests("train_now") == 1


def _publish_toy(session: Session, tmp_path: Path, metrics: dict | None = None) -> int:
    """Register the hand-built toy ONNX model as published version 1 and let the predictor serve it."""
    from conftest import write_toy_model

    store = session.store
    write_toy_model(tmp_path / "toy" / "v0001" / "model.onnx", max_side=64)
    store.add_model(1, tmp_path / "toy" / "v0001", store.snapshot(), status="published")
    store.publish_model(1, metrics or {})
    session.predictor.refresh()
    assert session.predictor.version == 1
    return 1


def test_next_offers_the_suggested_image_and_shows_its_uncertainty(session: Session, tmp_path: Path):
    from labelsmart.serving import active

    store = session.store
    ids = [r.id for r in store.images()]
    # No model: Next goes through the list and says why.
    nxt, why = session.next_image(ids[0], [], "suggested")
    assert nxt == ids[1] and "in order" in why
    assert session.next_image(ids[0], [], "sequential") == (ids[1], "")
    _publish_toy(session, tmp_path)
    view = session.view(ids[3])  # served but not scored yet: the map is 1 - confidence
    assert view.uncertainty is not None and view.uncertainty.shape == view.editor["background"].shape
    assert "1 − confidence" in view.uncertainty_info
    active.score_version(store, session.predictor.model, 1, session.cfg.active)
    expected = active.suggest(store, session.cfg.active, after=ids[0])
    nxt, why = session.next_image(ids[0], [], "suggested")
    assert nxt == expected.image_id and "least sure" in why and "model v1" in why
    assert session.next_image(ids[0], [nxt], "suggested")[0] != nxt  # offered once, not again
    umap, info = session.uncertainty(nxt)
    assert umap is not None and "(entropy" in info and "rank" in info


def test_progress_panel(session: Session, tmp_path: Path):
    store = session.store
    img = store.images()[0]
    m = np.full((img.height, img.width), 255, np.uint8)
    m[:2], m[-3:] = 0, 1
    store.save_label(img.id, m)
    md = session.progress_md()
    assert "1 labelled" in md and "7 remaining" in md and f"sky {2 * img.width:,}" in md and "car 0" in md
    assert session.miou_curve().empty
    rows, caption = session.class_iou_rows()
    assert rows == [] and "10 images are labelled" in caption
    _publish_toy(session, tmp_path, {"val_miou": 0.5, "val_per_class_iou": {"0": 0.9, "1": 0.1, "2": None}})
    curve = session.miou_curve()
    assert curve["val mIoU %"].tolist() == [50.0] and curve["labelled pixels"].tolist() == [5 * img.width]
    rows, caption = session.class_iou_rows()
    assert rows == [["sky", "90.0"], ["road", "10.0"], ["car", ""]] and "model v1" in caption


def test_build_ui_wires_next_progress_and_shortcuts(session: Session):
    from labelsmart.app.layout import SHORTCUTS, SHORTCUTS_JS, build_ui

    demo = build_ui(session)
    ids = {getattr(b, "elem_id", None) for b in demo.blocks.values()}
    assert {"ls-next", "ls-why", "ls-uncertainty", "ls-curve", "ls-class-iou", "ls-order", "ls-keys"} <= ids
    assert all(sel.lstrip("#") in ids for sel in SHORTCUTS.values())
    assert '"n": "#ls-next"' in SHORTCUTS_JS


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_app(
    dataset: Path, tmp: Path, extra_env: dict[str, str] | None = None, extra_args: list[str] | None = None
) -> tuple[subprocess.Popen, str]:
    """Start ``app.py`` on a free port with a fast trainer; returns the process and its URL."""
    port = _free_port()
    env = dict(os.environ)
    env.update(
        GRADIO_ANALYTICS_ENABLED="False",
        LABELSMART_TRAIN_STEPS="10",
        LABELSMART_TRAIN_FIRST_ROUND_STEPS="10",
        LABELSMART_TRAIN_CROP="64",
        LABELSMART_TRAIN_BATCH_SIZE="2",
        LABELSMART_TRAIN_THREADS="1",
        LABELSMART_PREPROCESS_MAX_SIDE="128",
        LABELSMART_SERVE_THREADS="1",
        LABELSMART_TRIGGER_MIN_INTERVAL_S="0",
        LABELSMART_TRIGGER_MIN_NEW_PIXELS="50",
        LABELSMART_TRIGGER_POLL_S="0.3",
        **(extra_env or {}),
    )
    log = open(tmp / "app.log", "w")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "app.py"),
            "--dataset",
            str(dataset),
            "--workdir",
            str(tmp / "work"),
            "--models-dir",
            str(tmp / "models"),
            "--port",
            str(port),
            *(extra_args or []),
        ],
        cwd=tmp,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"app exited early:\n{(tmp / 'app.log').read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise AssertionError(f"app did not start:\n{(tmp / 'app.log').read_text()}")


def stop_app(proc: subprocess.Popen) -> None:
    """End the app and its trainer process."""
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()


def wait_for(fn, timeout: float, what: str):
    """Poll ``fn`` until it returns something truthy."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(1.0)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def test_launched_app_save_train_preannotate(tiny_dataset: Path, tmp_path: Path):
    from gradio_client import Client, handle_file

    proc, url = launch_app(tiny_dataset, tmp_path)
    try:
        client = Client(url, verbose=False)
        other = Client(url, verbose=False)  # a second annotator, with a session of their own
        images = client.predict(api_name="/images")
        assert len(images) == 8 and all(state == "unlabelled" for _, _, state in images)
        first, second = images[0][0], images[1][0]
        client.predict(first, 0.5, api_name="/open_image")  # the session now shows image `first`
        other.predict(first, 0.5, api_name="/open_image")  # ... and so does the other one
        img = cv2.cvtColor(cv2.imread(str(tiny_dataset / "images" / images[0][1])), cv2.COLOR_BGR2RGB)
        _, truth = synth_scene(0)
        layer = imageio.mask_to_rgba(scribbles(truth), [c["color"] for c in CLASSES])
        cv2.imwrite(str(tmp_path / "bg.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
        cv2.imwrite(str(tmp_path / "layer.png"), cv2.cvtColor(layer, cv2.COLOR_RGBA2BGRA))
        value = {
            "background": handle_file(str(tmp_path / "bg.png")),
            "layers": [handle_file(str(tmp_path / "layer.png"))],
            "composite": None,
            "id": None,
        }
        msg, *_ = client.predict(value, api_name="/save")
        assert msg.startswith("Saved revision"), msg
        dense = imageio.mask_to_rgba(truth, [c["color"] for c in CLASSES])  # the other paints the whole image
        cv2.imwrite(str(tmp_path / "dense.png"), cv2.cvtColor(dense, cv2.COLOR_RGBA2BGRA))
        theirs = {**value, "layers": [handle_file(str(tmp_path / "dense.png"))]}
        late, *rest = other.predict(theirs, api_name="/save")  # painted on the image as it was before that save
        assert late.startswith("⚠️") and "was saved by annotator" in late and "nothing was saved" in late, late
        newer = [x for x in rest if isinstance(x, str) and Path(x).is_file()]  # the labels saved meanwhile
        assert newer and cv2.imread(newer[0]).shape == img.shape
        assert dict((i, s) for i, _, s in client.predict(api_name="/images"))[first] == "labelled"
        merged, editor_value, *_ = other.predict(theirs, 0.5, api_name="/merge")  # theirs onto the newer labels
        assert merged.startswith("Merged your strokes onto the newer labels"), merged
        assert Path(editor_value["background"]).is_file() and len(editor_value["layers"]) == 1
        again, *_ = client.predict(value, api_name="/save")  # the first annotator is now the stale one
        assert again.startswith("⚠️"), again
        kept, *_ = client.predict(value, 0.5, api_name="/keep_mine")
        assert kept.startswith("Saved revision"), kept
        assert [r.author for r in Store(tmp_path / "work" / "project.sqlite").history(first)] == ["annotator"] * 3
        status = wait_for(
            lambda: (s := client.predict(api_name="/status")) and "Serving model **v1**" in s and s,
            240,
            "the first model version",
        )
        assert "CPUExecutionProvider" in status or "CUDAExecutionProvider" in status
        out = client.predict(second, 0.5, api_name="/open_image")
        overlay_path, overlay_info = out[1], out[2]  # states are not part of the API: editor, overlay, info, ...
        assert overlay_path is not None and Path(overlay_path).is_file()
        assert "model v1" in overlay_info
    finally:
        stop_app(proc)
    # Stopping the app stops its trainer process too.
    trainer_pid = Store(tmp_path / "work" / "project.sqlite").get_status("trainer")[0]["pid"]
    deadline = time.time() + 20
    while time.time() < deadline and pid_alive(trainer_pid):
        time.sleep(0.2)
    assert not pid_alive(trainer_pid), "the trainer outlived the app"


def test_app_refuses_a_missing_folder_in_one_sentence(tmp_path: Path):
    missing = tmp_path / "nope"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "app.py"), "--dataset", str(missing), "--workdir", str(tmp_path / "w")],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, GRADIO_ANALYTICS_ENABLED="False"),
    )
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {missing}: not a folder; pass --dataset a folder of images."]
    assert "Traceback" not in proc.stderr
