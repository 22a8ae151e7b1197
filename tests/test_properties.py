"""Property-based tests (hypothesis) of everything that takes outside input: images in every colour mode, mask files,
masks given to the store, the editor's layers, and every route of the Label Studio backend.

Each property says what must hold for any input: the right pixels back, or one clear error of the documented type
that names what was wrong, and never another exception (for the API: never a 500). Examples are few and small so the
file runs in well under a minute on a busy two-core machine.
"""

from __future__ import annotations

import io
import json
import logging
import socket
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from xml.sax.saxutils import quoteattr

import cv2
import numpy as np
import pytest
from conftest import CLASSES, write_toy_model
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

from labelsmart import imageio
from labelsmart.app import ml_backend
from labelsmart.app.session import Session
from labelsmart.formats import FormatError
from labelsmart.formats import labelstudio as ls
from labelsmart.project import open_project
from labelsmart.serving.predictor import Predictor
from labelsmart.store import Store, StoreError

FIXTURE_OK = [HealthCheck.function_scoped_fixture]  # the fixtures' store and session serve every example
COLORS = [tuple(c["color"]) for c in CLASSES]
NAMES = [c["name"] for c in CLASSES]
K = len(CLASSES)


def shapes(lo: int = 1, hi: int = 24) -> st.SearchStrategy[tuple[int, int]]:
    return st.tuples(st.integers(lo, hi), st.integers(lo, hi))


# ------------------------------------------------------------------------------- images in every mode


def _save(im: Image.Image, path: Path, **kw) -> Path:
    with warnings.catch_warnings():  # Pillow's advice on palette transparency as bytes: that is the case tested
        warnings.simplefilter("ignore", UserWarning)
        im.save(path, **kw)
    return path


def _pillow_rgb(path: Path) -> np.ndarray:
    with warnings.catch_warnings(), Image.open(path) as im:
        warnings.simplefilter("ignore", UserWarning)
        return np.asarray(im.convert("RGB"))


MODES = {  # name -> (how to make it from random bytes, file suffix, save options, largest difference allowed)
    "palette png": ("P", ".png", {}, 0),
    "palette png, one transparent index": ("P", ".png", {"transparency": 3}, 0),
    "palette png, alpha per index": ("P", ".png", {"transparency": bytes(range(0, 256, 16))}, 0),
    "palette tiff": ("P", ".tif", {}, 0),
    "palette bmp": ("P", ".bmp", {}, 0),
    "cmyk jpeg": ("CMYK", ".jpg", {"quality": 95}, 3),  # two JPEG decoders: rounding apart
    "cmyk tiff": ("CMYK", ".tif", {}, 1),  # OpenCV's and Pillow's CMYK -> RGB round differently
    "cmyk lzw tiff": ("CMYK", ".tif", {"compression": "tiff_lzw"}, 1),
    "grey with alpha png": ("LA", ".png", {}, 0),
    "grey with alpha tiff": ("LA", ".tif", {}, 0),
    "bilevel png": ("1", ".png", {}, 0),
    "rgba webp": ("RGBA", ".webp", {"lossless": True}, 0),
}


def _image_in_mode(mode: str, rng: np.random.Generator, h: int, w: int) -> Image.Image:
    if mode == "P":
        im = Image.fromarray(rng.integers(0, 16, (h, w), dtype=np.uint8), mode="P")
        im.putpalette(rng.integers(0, 256, 256 * 3, dtype=np.uint8).tolist())
        return im
    if mode == "1":
        return Image.fromarray(rng.random((h, w)) < 0.5)
    bands = {"CMYK": 4, "LA": 2, "RGBA": 4}[mode]
    return Image.fromarray(rng.integers(0, 256, (h, w, bands), dtype=np.uint8), mode=mode)


@settings(max_examples=len(MODES) * 2, deadline=None)
@given(case=st.sampled_from(sorted(MODES)), seed=st.integers(0, 2**32 - 1), hw=shapes(1, 40))
def test_palette_cmyk_and_grey_alpha_images_read_as_pillow_converts_them(case: str, seed: int, hw: tuple[int, int]):
    """Palette PNGs (with and without transparency), CMYK JPEGs and TIFFs, LA images: RGB (H, W, 3) uint8 with the
    colours Pillow's ``convert("RGB")`` gives (alpha dropped, not blended)."""
    mode, suffix, options, tolerance = MODES[case]
    with tempfile.TemporaryDirectory() as tmp:
        path = _save(_image_in_mode(mode, np.random.default_rng(seed), *hw), Path(tmp) / f"x{suffix}", **options)
        want = _pillow_rgb(path)
        got = imageio.read_image(path)
    assert got.dtype == np.uint8 and got.shape == (*hw, 3) == want.shape
    assert int(np.abs(got.astype(int) - want.astype(int)).max()) <= tolerance, case


def test_every_colour_mode_case_is_the_mode_it_claims(tmp_path: Path):
    """The files above really are palette / CMYK / LA files (Pillow could have converted them on saving)."""
    rng = np.random.default_rng(0)
    for case, (mode, suffix, options, _) in MODES.items():
        path = _save(_image_in_mode(mode, rng, 5, 7), tmp_path / f"{len(case)}{suffix}", **options)
        with Image.open(path) as im:
            assert im.mode == ("RGBA" if suffix == ".webp" else mode), case


def test_16_bit_colour_with_alpha_is_stretched_by_its_colour_not_its_alpha(tmp_path: Path):
    """A 16-bit RGBA PNG holding 12-bit data under an opaque alpha (65535) is as bright as the same data without
    alpha: the alpha channel is dropped before the stretch, not counted in its range (it was: nearly black)."""
    ramp = np.tile(np.linspace(100, 4095, 64).astype(np.uint16), (8, 1))
    cv2.imwrite(str(tmp_path / "rgb.png"), np.dstack([ramp, ramp, ramp]))
    cv2.imwrite(str(tmp_path / "rgba.png"), np.dstack([ramp, ramp, ramp, np.full_like(ramp, 65535)]))
    rgb, rgba = imageio.read_image(tmp_path / "rgb.png"), imageio.read_image(tmp_path / "rgba.png")
    assert rgba.min() == 0 and rgba.max() == 255
    assert np.array_equal(rgb, rgba)


# ------------------------------------------------------------------------------------------ mask files


def _write_mask(path: Path, mask: np.ndarray, mode: str, rng: np.random.Generator) -> Path:
    if mode == "L":
        Image.fromarray(mask, mode="L").save(path)
    elif mode == "P, the project's palette":
        path.write_bytes(imageio.palette_png_bytes(mask, COLORS))
    else:  # a palette of another tool: any colours, the indices are what counts
        im = Image.fromarray(mask, mode="P")
        im.putpalette(rng.integers(0, 256, 256 * 3, dtype=np.uint8).tolist())
        im.save(path)
    return path


MASK_MODES = st.sampled_from(["L", "P, the project's palette", "P, another palette"])


@settings(max_examples=60, deadline=None)
@given(data=st.data(), mode=MASK_MODES, hw=shapes(), num_classes=st.integers(1, 255))
def test_a_mask_png_reads_back_exactly_or_is_one_error_naming_the_file(data, mode: str, hw, num_classes: int):
    """Any uint8 array written as a grey or palette PNG: with every id a class (or 255) the same array comes back;
    otherwise one :class:`ImageError` naming the file and the ids, never another exception."""
    in_range = st.one_of(st.integers(0, num_classes - 1), st.just(255))
    elements = data.draw(st.sampled_from([in_range, st.integers(0, 255)]), label="ids")
    mask = data.draw(arrays(np.uint8, hw, elements=elements), label="mask")
    with tempfile.TemporaryDirectory() as tmp:
        path = _write_mask(Path(tmp) / "m.png", mask, mode, np.random.default_rng(int(mask.sum())))
        bad = sorted({int(v) for v in np.unique(mask)} - {*range(num_classes), 255})
        if bad:
            with pytest.raises(imageio.ImageError) as err:
                imageio.read_mask(path, hw, num_classes)
            assert str(path) in str(err.value) and str(bad) in str(err.value)
        else:
            got = imageio.read_mask(path, hw, num_classes)
            assert got.dtype == np.uint8 and np.array_equal(got, mask)
        assert np.array_equal(imageio.read_mask(path), mask)  # without a class count: the ids as they are


@settings(max_examples=40, deadline=None)
@given(
    hw=shapes(),
    other=shapes(),
    kind=st.sampled_from(["rgb", "grey alpha", "bilevel", "16-bit", "32-bit signed", "truncated", "not an image"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_a_mask_of_another_size_or_kind_is_one_error_naming_the_file(hw, other, kind: str, seed: int):
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / ("m.tif" if kind == "32-bit signed" else "m.png")
        if kind == "rgb":
            Image.fromarray(rng.integers(0, 3, (*hw, 3), dtype=np.uint8)).save(path)
        elif kind == "grey alpha":
            Image.fromarray(rng.integers(0, 3, (*hw, 2), dtype=np.uint8), mode="LA").save(path)
        elif kind == "bilevel":
            Image.fromarray(rng.random(hw) < 0.5).save(path)
        elif kind == "16-bit":  # ids above 255 cannot be classes of an 8-bit mask
            Image.fromarray(rng.integers(0, 1000, hw, dtype=np.uint16)).save(path)
        elif kind == "32-bit signed":  # -1 must not wrap around to 255 (unlabelled)
            Image.fromarray(np.full(hw, -1, np.int32)).save(path)
        elif kind == "truncated":
            path.write_bytes(imageio.encode_png(rng.integers(0, 3, hw, dtype=np.uint8))[:40])
        else:
            path.write_bytes(rng.bytes(60))
        with pytest.raises(imageio.ImageError) as err:
            imageio.read_mask(path, hw, K)
        assert str(path) in str(err.value)
        if kind == "16-bit" and int(np.asarray(Image.open(path)).max()) <= 255:
            return  # the rare draw of only small values was refused for its ids, which is right too
        good = Path(tmp) / "good.png"
        Image.fromarray(np.zeros(other, np.uint8)).save(good)
        if other != hw:
            with pytest.raises(imageio.ImageError, match=r"good\.png: mask is \d+x\d+ but its image is"):
                imageio.read_mask(good, hw, K)


# ------------------------------------------------------------------------------------ masks into the store


@pytest.fixture
def session(tiny_cfg) -> Session:
    store = open_project(tiny_cfg)
    return Session(tiny_cfg, store, Predictor(store, tiny_cfg))


IDS = st.sampled_from([*range(K), 255])


@st.composite
def masks(draw, hw: tuple[int, int]) -> np.ndarray:
    """A mask of ``hw``: a background class and a few boxes of other ids (hypothesis arrays of 12 000 pixels one by
    one would be slow)."""
    mask = np.full(hw, draw(IDS), np.uint8)
    for _ in range(draw(st.integers(0, 4))):
        y0, x0 = draw(st.integers(0, hw[0] - 1)), draw(st.integers(0, hw[1] - 1))
        y1, x1 = draw(st.integers(y0 + 1, hw[0])), draw(st.integers(x0 + 1, hw[1]))
        mask[y0:y1, x0:x1] = draw(IDS)
    return mask


@settings(max_examples=40, deadline=None, suppress_health_check=FIXTURE_OK)
@given(data=st.data())
def test_save_label_lands_exactly_or_raises_store_error(session: Session, data):
    store = session.store
    row = data.draw(st.sampled_from(store.images()[:3]), label="image")
    hw = (row.height, row.width)
    kind = data.draw(st.sampled_from(["right", "transposed view", "wrong size", "ids out of range", "not uint8"]))
    if kind == "wrong size":
        mask = data.draw(masks(data.draw(shapes(1, 140).filter(lambda s: s != hw))))
    elif kind == "transposed view":  # the right shape, not C-contiguous
        mask = data.draw(masks(hw[::-1])).T
    else:
        mask = data.draw(masks(hw))
    if kind == "ids out of range":
        mask[data.draw(st.integers(0, hw[0] - 1)), :] = data.draw(st.integers(K, 254))
    if kind == "not uint8":
        mask = mask.astype(data.draw(st.sampled_from([np.int64, np.float32, np.uint16, bool])))
    before = store.current_revision(row.id)
    if kind in ("right", "transposed view"):
        rev = store.save_label(row.id, mask)
        assert store.current_revision(row.id).id == rev
        assert np.array_equal(store.current_label(row.id), mask)
    else:
        with pytest.raises(StoreError) as err:
            store.save_label(row.id, mask)
        assert row.path in str(err.value)
        assert store.current_revision(row.id) == before  # nothing was written


# --------------------------------------------------------------------------------------- editor -> mask


@settings(max_examples=40, deadline=None, suppress_health_check=FIXTURE_OK)
@given(data=st.data())
def test_the_editor_gives_back_the_mask_it_was_shown(session: Session, data):
    """``mask_to_rgba`` of any mask, as the editor's layer (one layer, or two where the later wins), is that mask;
    a layer at another size is resized to the image and holds only the ids it had."""
    row = session.store.images()[0]
    hw = (row.height, row.width)
    a, b = data.draw(masks(hw)), data.draw(masks(hw))
    background = np.zeros((*hw, 3), np.uint8)
    one = {"background": background, "layers": [imageio.mask_to_rgba(a, COLORS)], "composite": None}
    assert np.array_equal(session.editor_to_mask(row.id, one), a)
    two = {**one, "layers": [imageio.mask_to_rgba(a, COLORS), imageio.mask_to_rgba(b, COLORS)]}
    assert np.array_equal(session.editor_to_mask(row.id, two), np.where(b != 255, b, a))
    other = data.draw(shapes(1, 200))
    c = data.draw(masks(other))
    got = session.editor_to_mask(row.id, {**one, "layers": [imageio.mask_to_rgba(c, COLORS)]})
    assert got.shape == hw and got.dtype == np.uint8
    assert set(np.unique(got).tolist()) <= set(np.unique(c).tolist())


def _garbage_layers() -> st.SearchStrategy:
    arrays_any = st.builds(
        lambda shape, dtype, seed: np.random.default_rng(seed).integers(0, 256, shape).astype(dtype),
        st.one_of(
            st.tuples(st.integers(0, 5), st.integers(0, 5)),
            st.tuples(st.integers(0, 70), st.integers(0, 70), st.integers(0, 6)),
            st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3), st.integers(1, 3)),
            st.just(()),
        ),
        st.sampled_from([np.uint8, np.uint16, np.int64, np.float32, np.float64, bool, object]),
        st.integers(0, 2**32 - 1),
    )
    scalars = st.one_of(
        st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8), st.binary(max_size=8)
    )
    item = st.one_of(arrays_any, scalars, st.lists(st.integers(0, 255), max_size=4), st.just({"path": "/etc/passwd"}))
    return st.one_of(st.lists(item, max_size=3), scalars, st.dictionaries(st.text(max_size=4), item, max_size=2))


EDITORS = st.one_of(
    st.none(),
    st.just({}),
    st.builds(lambda layers: {"background": None, "layers": layers, "composite": None}, _garbage_layers()),
    st.builds(lambda layers: {"layers": layers}, _garbage_layers()),
    st.one_of(st.text(max_size=8), st.integers(), st.lists(st.integers(), max_size=3)),  # not even a dict
)


@settings(max_examples=80, deadline=None, suppress_health_check=FIXTURE_OK)
@given(editor=EDITORS)
@example(editor={"layers": [np.zeros((0, 5, 4), np.uint8)]})
@example(editor={"layers": [np.zeros((7, 9, 2), np.uint8)]})
@example(editor={"layers": "/etc/passwd"})
@example(editor={"layers": [np.full((3, 3, 4), 255, np.float64)]})
def test_garbage_from_the_editor_is_a_mask_or_one_clear_error(session: Session, editor):
    """Missing layers, None, layers at other sizes and of other kinds: a mask at the image's size with class ids,
    or one :class:`ImageError` whose sentence says what to do; a save of it is a message, never an exception."""
    row = session.store.images()[0]
    try:
        mask = session.editor_to_mask(row.id, editor)
    except imageio.ImageError as exc:
        assert "layer" in str(exc) or "editor" in str(exc)
    else:
        assert mask.shape == (row.height, row.width) and mask.dtype == np.uint8
        assert set(np.unique(mask).tolist()) <= {*range(K), 255}
    message = session.save(row.id, editor)
    assert isinstance(message, str) and message


# ------------------------------------------------------------------------- the Label Studio backend's API


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def backend_client(tiny_cfg, tmp_path: Path, monkeypatch) -> Iterator[tuple[Store, TestClient]]:
    """The backend over the tiny project with the toy model; Label Studio's address is a closed port (an image it
    would serve fails at once, offline), and no token."""
    monkeypatch.setenv("LABEL_STUDIO_URL", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.delenv("LABEL_STUDIO_API_KEY", raising=False)
    store = open_project(tiny_cfg)
    write_toy_model(tmp_path / "toy" / "v0001" / "model.onnx", max_side=64)
    store.add_model(1, tmp_path / "toy" / "v0001", store.snapshot(), status="published")
    store.publish_model(1, {})
    app = FastAPI()
    app.include_router(ml_backend.router(ml_backend.LabelStudioBackend(store, Predictor(store, tiny_cfg))))
    with TestClient(app) as client:  # raise_server_exceptions: a crash, in the route or after it, fails the test
        yield store, client


TEXT = st.text(st.characters(exclude_categories=()), max_size=10)  # lone surrogates included: JSON can carry them
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), TEXT)
JSON = st.recursive(SCALARS, lambda c: st.lists(c, max_size=3) | st.dictionaries(TEXT, c, max_size=3), max_leaves=8)


def _or_garbage(strategy: st.SearchStrategy) -> st.SearchStrategy:
    """Mostly the right shape (so the levels below are reached), else any JSON value in its place."""
    return st.one_of(strategy, strategy, strategy, JSON)


URLS = st.sampled_from(
    [
        "/data/local-files/?d=x/images/frame_000.png",  # images of the project
        "images/frame_001.png",
        "/data/upload/1/0a1b2c3d-frame_002.png",
        "/data/upload/1/0a1b2c3d-unseen.png",  # on Label Studio (the closed port)
        "/data/local-files/?d=../../../../etc/passwd",
        "../../../etc/passwd",
        "file:///etc/passwd",
        "ftp://127.0.0.1/x.png",
        "data:image/png;base64,iVBORw0KGgo=",
        "http://[::1",
        "C:\\images\\frame_000.png",
        "",
        "?d=",
    ]
)
TASK = st.fixed_dictionaries(
    {"id": _or_garbage(st.integers(0, 99)), "data": _or_garbage(st.fixed_dictionaries({"image": _or_garbage(URLS)}))}
)


@st.composite
def brush_results(draw) -> dict:
    h, w = draw(st.sampled_from([(96, 128), (4, 5)]))
    region = np.zeros((h, w), bool)
    y0, x0 = draw(st.integers(0, h - 1)), draw(st.integers(0, w - 1))
    region[y0 : draw(st.integers(y0 + 1, h)), x0 : draw(st.integers(x0 + 1, w))] = True
    value = {
        "format": "rle",
        "rle": draw(_or_garbage(st.just(ls.encode_rle(region)))),
        "brushlabels": draw(_or_garbage(st.sampled_from([[n] for n in NAMES] + [["pedestrian"], NAMES]))),
    }
    return {
        "type": draw(_or_garbage(st.sampled_from(["brushlabels", "rectanglelabels"]))),
        "value": draw(_or_garbage(st.just(value))),
        "original_width": draw(_or_garbage(st.just(w))),
        "original_height": draw(_or_garbage(st.just(h))),
    }


ANNOTATION = st.fixed_dictionaries(
    {
        "id": _or_garbage(st.integers(0, 99)),
        "result": _or_garbage(st.lists(_or_garbage(brush_results()), max_size=3)),
        "completed_by": JSON,
        "task": _or_garbage(st.integers(0, 99)),
    }
)
CONFIGS = st.one_of(
    st.builds(
        lambda names, colors: ls.labeling_config(zip(names, colors, strict=False)),
        st.lists(st.sampled_from(NAMES), min_size=1, max_size=3),
        st.lists(st.tuples(st.integers(0, 255), st.integers(0, 255), st.integers(0, 255)), min_size=3, max_size=3),
    ),
    st.just(ls.labeling_config((n, c) for n, c in zip(["sky", "pedestrian"], COLORS, strict=False))),
    st.just("<View><Image name='image' value='$image'/><BrushLabels name='tag' toName='image'/></View>"),
    st.just("<View/>"),
    TEXT,
)
BODIES = {
    "/labelstudio/setup": st.fixed_dictionaries(
        {"schema": _or_garbage(CONFIGS)}, optional={"hostname": _or_garbage(URLS), "access_token": JSON}
    ),
    "/labelstudio/predict": st.fixed_dictionaries(
        {"tasks": _or_garbage(st.lists(_or_garbage(TASK), max_size=3))}, optional={"label_config": _or_garbage(CONFIGS)}
    ),
    "/labelstudio/webhook": st.one_of(
        st.fixed_dictionaries(  # one annotation of one task, as ANNOTATION_CREATED / _UPDATED send them
            {"action": st.sampled_from(ml_backend.LABEL_EVENTS), "annotation": ANNOTATION, "task": TASK}
        ),
        st.builds(  # ANNOTATIONS_CREATED: lists, matched by task id
            lambda pairs: {
                "action": "ANNOTATIONS_CREATED",
                "annotation": [{**a, "task": t["id"]} for a, t in pairs],
                "task": [t for _, t in pairs],
            },
            st.lists(st.tuples(ANNOTATION, TASK), max_size=2),
        ),
        st.fixed_dictionaries(
            {"action": _or_garbage(st.sampled_from([*ml_backend.LABEL_EVENTS, "START_TRAINING", "PROJECT_UPDATED"]))},
            optional={
                "annotation": _or_garbage(st.one_of(ANNOTATION, st.lists(ANNOTATION, max_size=2))),
                "task": _or_garbage(st.one_of(TASK, st.lists(TASK, max_size=2))),
            },
        ),
    ),
    "/labelstudio/train": JSON,
}


def _answered(r) -> None:
    assert r.status_code in (200, 400, 422), (r.status_code, r.text[:500])
    if r.status_code == 400:
        error = r.json()["error"]
        assert isinstance(error, str) and len(error) > 10, r.text


def _post(client: TestClient, route: str, body) -> None:
    r = client.post(route, content=json.dumps(body).encode(), headers={"content-type": "application/json"})
    _answered(r)
    if r.status_code == 200 and route == "/labelstudio/predict":
        assert len(r.json()["results"]) == len(body.get("tasks") or [])


@pytest.mark.parametrize("route", sorted(BODIES))
def test_every_backend_route_answers_arbitrary_json_with_200_400_or_422(backend_client, route: str, caplog):
    """Any JSON value, and bodies of the protocol's shape with wrong types at every level: a 200, a 400 with
    ``{"error": sentence}``, or a 422 for a body that is not an object; never a 500, in the route or in the work a
    webhook leaves for after its response (which may fail only with one of the errors that name what was wrong)."""
    _, client = backend_client

    @settings(max_examples=70, deadline=None, suppress_health_check=FIXTURE_OK)
    @given(body=st.one_of(BODIES[route], BODIES[route], JSON))
    def check(body) -> None:
        _post(client, route, body)

    check()
    expected = (ml_backend.BackendError, FormatError, StoreError, imageio.ImageError)
    crashes = [r for r in caplog.records if r.exc_info and not isinstance(r.exc_info[1], expected)]
    assert not crashes, crashes[0].getMessage() + "\n" + logging.Formatter().formatException(crashes[0].exc_info)


def test_bodies_json_cannot_hold_are_a_400_or_422_with_a_sentence(backend_client):
    """Not JSON, not UTF-8, nested past what the parser takes, a number of 5000 digits, a lone surrogate."""
    _, client = backend_client
    raw = [
        b"",
        b"null",
        b"\xff\xfe{",
        b"{" * 3,
        b"[" * 100_000 + b"]" * 100_000,
        b'{"tasks": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'{"tasks": ' + b"1" * 5000 + b"}",
        b'{"schema": "\\ud800<View/>", "hostname": "\\udfff"}',
        b'{"action": "\\ud800"}',
        b'{"tasks": [{"id": NaN, "data": {"image": "\\ud800"}}]}',
    ]
    for route in ["/labelstudio/setup", "/labelstudio/predict", "/labelstudio/webhook", "/labelstudio/train"]:
        for body in raw:
            _answered(client.post(route, content=body, headers={"content-type": "application/json"}))
        _answered(client.post(route, content=b'{"a": 1}', headers={"content-type": "text/plain"}))
    for query in ["", "?x=1", "?%ff=%00"]:
        assert client.get(f"/labelstudio/health{query}").status_code == 200


@settings(max_examples=40, deadline=None, suppress_health_check=FIXTURE_OK)
@given(
    labels=st.lists(st.one_of(st.sampled_from(["cat", "dog", " cat", "cat ", "car"]), TEXT), min_size=0, max_size=5),
    colors=st.lists(st.one_of(st.sampled_from(["#ff0000", "red", "#abc", "#gggggg", "rgba(1,2,3,0.5)"]), TEXT)),
)
@example(labels=[f"c{k}" for k in range(256)], colors=[])
def test_setup_of_an_empty_project_adds_every_label_or_none(tiny_dataset: Path, labels: list[str], colors: list[str]):
    """A project without classes takes the config's labels as classes, all of them (the colours Label Studio gives,
    the default where it gives one labelsmart does not read) or, refused with a sentence, none."""
    config = "".join(
        f"<Label value={quoteattr(name)}" + (f" background={quoteattr(color)}" if color else "") + "/>"
        for name, color in zip(labels, [*colors, *[None] * len(labels)], strict=False)
    )
    image = "<Image name='image' value='$image'/>"
    xml = f"<View>{image}<BrushLabels name='tag' toName='image'>{config}</BrushLabels></View>"
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "empty.sqlite", image_root=tiny_dataset / "images")
        app = FastAPI()
        app.include_router(ml_backend.router(ml_backend.LabelStudioBackend(store, _NoModel())))
        with TestClient(app) as client:
            r = client.post("/labelstudio/setup", content=json.dumps({"schema": xml}).encode())
        _answered(r)
        names = [c.name for c in store.classes()]
        if r.status_code == 200:
            assert names == [n for n in ls.LabelConfig.parse(xml).labels]
        else:
            assert names == []


class _NoModel:
    """A predictor with nothing published (setup only asks for the version)."""

    version = None

    def refresh(self) -> None:
        pass


def test_png_round_trip_helpers_agree():
    """The test's own palette writer and the store's PNG codec (used above) keep ids as ids."""
    mask = np.array([[0, 1, 255], [2, 254, 3]], np.uint8)
    assert np.array_equal(imageio.decode_png(imageio.encode_png(mask)), mask)
    with Image.open(io.BytesIO(imageio.palette_png_bytes(mask, COLORS))) as im:
        assert im.mode == "P" and np.array_equal(np.asarray(im), mask)
