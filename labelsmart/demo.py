"""A small demo project from photos that ship inside scikit-image (no download, works offline).

``python app.py`` without ``--dataset`` opens :func:`demo_dataset` under :func:`default_demo_root`. The
photos are read straight from scikit-image's own data folder (the files ``skimage.data.astronaut()`` and
friends load), never through its downloader, so nothing touches the network.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path

from labelsmart import imageio

log = logging.getLogger(__name__)

# name in the demo -> (file in skimage/data, where it comes from)
DEMO_PHOTOS: dict[str, tuple[str, str]] = {
    "astronaut": ("astronaut.png", "Eileen Collins, NASA Great Images database; public domain"),
    "chelsea": ("chelsea.png", "Chelsea the cat by Stefan van der Walt; CC0"),
    "coffee": ("coffee.png", "coffee cup by Rachel Michetti, courtesy of Pikolo Espresso Bar; CC0"),
    "rocket": ("rocket.jpg", "DSCOVR launch on Falcon 9, SpaceX; public domain"),
    "motorcycle_left": ("motorcycle_left.png", "Middlebury 2014 stereo benchmark (Scharstein et al.), left view"),
    "motorcycle_right": ("motorcycle_right.png", "Middlebury 2014 stereo benchmark (Scharstein et al.), right view"),
    "hubble_deep_field": ("hubble_deep_field.jpg", "Hubble eXtreme Deep Field, NASA/HubbleSite; public domain"),
}

# Every photo has a main object on a background; two of them (rocket, hubble) have sky.
DEMO_CLASSES: list[dict[str, object]] = [
    {"id": 0, "name": "background", "color": [140, 140, 140]},
    {"id": 1, "name": "object", "color": [230, 25, 75]},
    {"id": 2, "name": "sky", "color": [66, 135, 245]},
]

MIN_PHOTOS = 3


def default_demo_root(env: Mapping[str, str]) -> Path:
    """``$XDG_DATA_HOME/labelsmart/demo``, or ``~/.local/share/labelsmart/demo``.

    Args:
        env: the environment (passed in; only :mod:`labelsmart.config` and entry points read ``os.environ``).
    """
    base = env.get("XDG_DATA_HOME")
    if base:
        return Path(base).expanduser() / "labelsmart" / "demo"
    home = Path(env["HOME"]) if env.get("HOME") else Path.home()
    return home / ".local" / "share" / "labelsmart" / "demo"


def _skimage_data_dir() -> Path | None:
    try:
        import skimage.data
    except ImportError:
        return None
    return Path(skimage.data.__file__).parent


def _readme(written: list[str]) -> str:
    lines = [
        "labelsmart demo project",
        "",
        "Photos that ship inside scikit-image (skimage/data, the files skimage.data.<name>() loads), copied",
        "here as PNG so the demo works offline. Label them with the classes in classes.json:",
        "background, object (the main thing in each photo) and sky.",
        "",
        "images/<name>.png   source",
    ]
    for name in written:
        lines.append(f"  {name:<18}  skimage/data/{DEMO_PHOTOS[name][0]}: {DEMO_PHOTOS[name][1]}")
    lines += ["", "See https://scikit-image.org/docs/stable/api/skimage.data.html for the original notes.", ""]
    return "\n".join(lines)


def demo_dataset(root: Path) -> Path:
    """Create (or complete) the demo project folder and return it.

    Idempotent: files already there are kept; missing ones are written atomically. A photo that this
    scikit-image install does not carry locally is skipped (it is never downloaded).

    Layout: ``root/images/<name>.png``, ``root/classes.json``, ``root/README.txt``.

    Raises:
        ValueError: fewer than three photos could be found (scikit-image missing or stripped down).
    """
    root = Path(root)
    images = root / "images"
    present = [n for n in DEMO_PHOTOS if (images / f"{n}.png").is_file()]
    if len(present) < len(DEMO_PHOTOS):
        data_dir = _skimage_data_dir()
        for name, (filename, _) in DEMO_PHOTOS.items():
            out = images / f"{name}.png"
            if out.is_file():
                continue
            src = data_dir / filename if data_dir is not None else None
            if src is None or not src.is_file():
                log.warning("demo photo %s is not bundled with this scikit-image; skipping it", filename)
                continue
            try:
                rgb = imageio.read_image(src)
            except imageio.ImageError as exc:
                log.warning("demo photo skipped: %s", exc)
                continue
            imageio.atomic_write_bytes(out, imageio.encode_png(rgb))
            log.info("demo: wrote %s", out)
        present = [n for n in DEMO_PHOTOS if (images / f"{n}.png").is_file()]
    if len(present) < MIN_PHOTOS:
        raise ValueError(
            f"{root}: only {len(present)} demo photos could be made (scikit-image's bundled photos are missing); "
            "pass --dataset a folder of your own images."
        )
    classes = root / "classes.json"
    if not classes.is_file():
        imageio.atomic_write_bytes(classes, (json.dumps(DEMO_CLASSES, indent=2) + "\n").encode())
    readme = root / "README.txt"
    if not readme.is_file():
        imageio.atomic_write_bytes(readme, _readme(present).encode())
    return root
