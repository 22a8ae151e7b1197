"""The demo project made from scikit-image's bundled photos, offline."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from labelsmart import config, demo, imageio
from labelsmart.project import open_project
from labelsmart.store import load_classes_file


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a socket fails the test (the demo must never download)."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the demo tried to use the network")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_default_demo_root() -> None:
    assert demo.default_demo_root({"XDG_DATA_HOME": "/x/data", "HOME": "/h"}) == Path("/x/data/labelsmart/demo")
    assert demo.default_demo_root({"HOME": "/h"}) == Path("/h/.local/share/labelsmart/demo")
    assert demo.default_demo_root({"XDG_DATA_HOME": "", "HOME": "/h"}) == Path("/h/.local/share/labelsmart/demo")


def test_demo_dataset_offline_and_idempotent(tmp_path: Path, no_network: None) -> None:
    root = demo.demo_dataset(tmp_path / "demo")
    assert root == tmp_path / "demo"
    names = sorted(p.stem for p in (root / "images").glob("*.png"))
    assert names == sorted(demo.DEMO_PHOTOS)
    for name in names:
        img = imageio.read_image(root / "images" / f"{name}.png")
        assert img.ndim == 3 and img.shape[2] == 3 and min(img.shape[:2]) >= 200
        assert img.std() > 10  # a real photo, not a blank
    classes = load_classes_file(root / "classes.json")
    assert [n for n, _ in classes] == ["background", "object", "sky"]
    assert all(c is not None for _, c in classes)
    assert [c["id"] for c in json.loads((root / "classes.json").read_text())] == [0, 1, 2]
    readme = (root / "README.txt").read_text()
    assert "scikit-image" in readme and "public domain" in readme and "astronaut" in readme

    stamps = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    (root / "images" / "coffee.png").unlink()
    assert demo.demo_dataset(root) == root
    assert (root / "images" / "coffee.png").is_file()  # a missing photo comes back
    for p, t in stamps.items():
        if p.name != "coffee.png":
            assert p.stat().st_mtime_ns == t, f"{p} was rewritten"
    assert not list(root.rglob("*.tmp"))


def test_demo_dataset_opens_as_a_project(tmp_path: Path, no_network: None) -> None:
    root = demo.demo_dataset(tmp_path / "demo")
    cfg = config.load({"dataset": str(root), "workdir": str(tmp_path / "work")}, env={})
    assert cfg.image_root == root / "images" and cfg.classes_file == root / "classes.json"
    store = open_project(cfg)
    assert len(store.images()) == len(demo.DEMO_PHOTOS)
    assert [c.name for c in store.classes()] == ["background", "object", "sky"]


def test_demo_dataset_without_bundled_photos_says_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(demo, "_skimage_data_dir", lambda: tmp_path / "empty")
    with pytest.raises(ValueError, match="pass --dataset a folder of your own images"):
        demo.demo_dataset(tmp_path / "demo")
