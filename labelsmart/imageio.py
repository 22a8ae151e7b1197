"""The one image and mask path: read, resize, normalise, logits -> mask, palette output (NumPy/OpenCV only).

Training, export, the predictor and the CLI all go through these functions, so a model sees the same
pixels everywhere. Nothing here imports torch.
"""

from __future__ import annotations

import errno
import io
import os
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from labelsmart.config import IGNORE_INDEX, IMAGE_EXTENSIONS, PreprocessConfig

cv2.setNumThreads(1)
EXIF_EXTENSIONS = (".jpg", ".jpeg", ".tif", ".tiff", ".webp")  # the formats whose orientation is read
MAX_PIXELS = 100_000_000  # larger images are refused (10000 x 10000 RGB is 300 MB, and the editor sends it whole)
TOO_MANY_PIXELS = (-1, -1)  # a header size past what Pillow will even read


class ImageError(ValueError):
    """A file that cannot be used, with one sentence that names it and says what to do."""


# ----------------------------------------------------------------------------------------------- files


def list_images(root: Path) -> Iterator[Path]:
    """Yield image paths under ``root`` relative to it, sorted, nested folders included.

    Hidden folders (such as ``.labelsmart``) are skipped. Streams: nothing is read.
    """
    root = Path(root)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        base = Path(dirpath)
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            if name.lower().endswith(IMAGE_EXTENSIONS):
                yield (base / name).relative_to(root)


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)  # the disk, or the user's quota of it, is full


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` is a write refused because the disk (or the quota) is full."""
    return isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder, fsync, ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; outputs are meant to be read by others
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


# EXIF orientation -> how to turn the stored pixels upright (Pillow's ImageOps.exif_transpose, on arrays).
_UPRIGHT = {
    2: lambda a: a[:, ::-1],  # mirrored left-right
    3: lambda a: a[::-1, ::-1],  # upside down
    4: lambda a: a[::-1, :],  # mirrored top-bottom
    5: lambda a: a.swapaxes(0, 1),  # transposed
    6: lambda a: np.rot90(a, -1),  # taken with the camera turned right: rotate 90 degrees clockwise
    7: lambda a: a[::-1, ::-1].swapaxes(0, 1),  # transversed
    8: lambda a: np.rot90(a, 1),  # rotate 90 degrees counter-clockwise
}


def exif_orientation(data: bytes | np.ndarray) -> int:
    """The EXIF orientation tag (1-8) of an encoded image, 1 where it has none (PNG, most TIFFs) or it is unreadable."""
    return _header(data, orientation=True)[1]


def _header(data: bytes | np.ndarray, orientation: bool) -> tuple[tuple[int, int] | None, int]:
    """``((width, height) or None where unreadable, EXIF orientation or 1)`` from an encoded image's header
    alone; the orientation only when asked (a PNG's EXIF would make Pillow decode the whole image)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():  # a size past Pillow's bomb warning is refused below, in words
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(bytes(data)))  # reads the header, decodes nothing
        with im:
            size = (int(im.size[0]), int(im.size[1]))
            value = int(im.getexif().get(0x0112, 1)) if orientation else 1
    except Image.DecompressionBombError:  # more pixels than Pillow itself opens (twice its MAX_IMAGE_PIXELS)
        return TOO_MANY_PIXELS, 1
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError):
        return None, 1
    return size, (value if value in _UPRIGHT else 1)


def to_uint8(img: np.ndarray) -> np.ndarray:
    """Pixels of any depth as uint8 for display and for the network: 8-bit data as it is; deeper data (16-bit,
    float) stretched linearly from its own minimum to its own maximum, so a 16-bit file holding 12-bit
    microscopy is not shown nearly black, as dividing by 257 would show it."""
    if img.dtype == np.uint8:
        return img
    x = img.astype(np.float32)
    lo, hi = float(x.min()), float(x.max())
    if not hi > lo:  # constant (or NaN): nothing to stretch
        return np.zeros(img.shape, np.uint8)
    return np.clip((x - lo) * (255.0 / (hi - lo)) + 0.5, 0, 255).astype(np.uint8)


def read_image(path: Path) -> np.ndarray:
    """Read an image as RGB uint8 ``(H, W, 3)``, the right way up.

    Grey, palette, CMYK and alpha images become RGB, as Pillow's ``convert("RGB")`` makes them (alpha is dropped,
    not blended); 16-bit and float data are stretched by their real range
    (:func:`to_uint8`); a JPEG (or TIFF, WebP) with an EXIF orientation is turned upright, as browsers and
    labelling tools show it, so labels are painted, trained and exported in that orientation. An image over
    :data:`MAX_PIXELS` is refused from its header, before anything is decoded.

    Raises:
        ImageError: the file is missing or not a readable image.
    """
    path = Path(path)
    data = np.fromfile(str(path), dtype=np.uint8) if path.is_file() else None
    if data is None:
        raise ImageError(f"{path}: file not found; check the path or remove it from the folder.")
    size, orientation = _header(data, path.suffix.lower() in EXIF_EXTENSIONS) if data.size else (None, 1)
    if size is not None and (size == TOO_MANY_PIXELS or size[0] * size[1] > MAX_PIXELS):
        dims = "its pixels are" if size == TOO_MANY_PIXELS else f"{size[0]}x{size[1]} pixels is"
        raise ImageError(
            f"{path}: {dims} more than labelsmart opens ({MAX_PIXELS // 10**6} megapixels, which keeps memory and "
            "the browser within bounds); split it into tiles or downscale it."
        )
    # UNCHANGED: no EXIF turn, full depth. OpenCV gives palette images as BGR (BGRA with a tRNS chunk), grey with
    # alpha as BGRA, CMYK JPEGs and TIFFs as BGR or BGRA: every case below is then grey, BGR or BGRA.
    img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if img is None:
        raise ImageError(f"{path}: not a readable image; replace it with a valid JPEG/PNG/TIFF or remove it.")
    if img.ndim == 3 and img.shape[2] == 4:
        img = img[..., :3]  # alpha is dropped (as Pillow's convert("RGB") drops it) before 16-bit data is stretched
    img = to_uint8(img)  # ... so an opaque alpha of 65535 does not set the range of 12-bit colour data
    if orientation != 1:
        img = _UPRIGHT[orientation](img)
    if img.ndim == 2 or img.shape[2] == 1:
        img = cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_GRAY2RGB)
    elif img.shape[2] == 3:
        img = cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_BGR2RGB)
    else:
        raise ImageError(f"{path}: has {img.shape[2]} channels; convert it to RGB or greyscale.")
    return np.ascontiguousarray(img)


def read_mask(path: Path, shape: tuple[int, int] | None = None, num_classes: int | None = None) -> np.ndarray:
    """Read an index mask (uint8 class ids, 255 = unlabelled).

    Args:
        path: single-channel PNG (palette PNGs are read as their indices).
        shape: expected ``(H, W)``; a mismatch is an error.
        num_classes: ids must be below this or 255.

    Raises:
        ImageError: unreadable, wrong size or unknown class id.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: mask file not found; check the masks folder.")
    from PIL import Image  # palette PNGs must be read as indices, which OpenCV cannot do

    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P", "I", "I;16"):
                raise ImageError(
                    f"{path}: mask is {im.mode}, not a single-channel index PNG; save it as 8-bit class ids."
                )
            width, height = im.size
            if shape is not None and (height, width) != tuple(shape):  # from the header, before decoding
                raise ImageError(
                    f"{path}: mask is {width}x{height} but its image is {shape[1]}x{shape[0]}; "
                    "resize the mask to the image size."
                )
            mask = np.array(im)
    except ImageError:
        raise
    except Exception as exc:  # PIL raises many types
        raise ImageError(f"{path}: not a readable mask ({exc}); replace it with an 8-bit index PNG.") from exc
    if mask.dtype != np.uint8:
        if mask.min(initial=0) < 0 or mask.max(initial=0) > 255:  # a 32-bit mask: -1 must not wrap to 255
            raise ImageError(f"{path}: mask values outside 0..255; save it as 8-bit class ids.")
        mask = mask.astype(np.uint8)
    if num_classes is not None:
        bad = np.unique(mask[(mask >= num_classes) & (mask != IGNORE_INDEX)])
        if bad.size:
            raise ImageError(
                f"{path}: mask holds class ids {bad.tolist()} but the project has {num_classes} classes "
                f"(0..{num_classes - 1}, 255 = unlabelled); fix the mask or the classes file."
            )
    return np.ascontiguousarray(mask)


def encode_png(arr: np.ndarray) -> bytes:
    """Lossless PNG bytes of a uint8 array (grey or RGB)."""
    if arr.ndim == 3 and arr.shape[2] == 3:
        arr = cv2.cvtColor(arr, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", arr, [cv2.IMWRITE_PNG_COMPRESSION, 3])
    if not ok:
        raise ValueError("PNG encoding failed")
    return buf.tobytes()


def decode_png(data: bytes) -> np.ndarray:
    """Inverse of :func:`encode_png`."""
    arr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise ValueError("PNG decoding failed")
    if arr.ndim == 3:
        arr = cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)
    return arr


def palette_png_bytes(mask: np.ndarray, colors: Sequence[Sequence[int]]) -> bytes:
    """An 8-bit palette PNG of an index mask: ids stay ids, viewers show the class colours (255 = black)."""
    import io

    from PIL import Image

    im = Image.fromarray(mask.astype(np.uint8), mode="P")
    pal = np.zeros((256, 3), dtype=np.uint8)
    for i, c in enumerate(colors[:255]):
        pal[i] = c
    im.putpalette(pal.flatten().tolist())
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


# -------------------------------------------------------------------------------------------- resizing


def working_size(height: int, width: int, max_side: int) -> tuple[int, int]:
    """``(h, w)`` of an image at working scale: longer side at most ``max_side``, aspect kept."""
    scale = min(1.0, max_side / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize an RGB image to ``(h, w)``: area filter when shrinking, bilinear when growing."""
    h, w = size
    if image.shape[:2] == (h, w):
        return image
    shrinking = h < image.shape[0] or w < image.shape[1]
    return cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


def resize_labels(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize an index mask to ``(h, w)`` so that thin scribbles survive shrinking.

    Growing uses nearest neighbour. Shrinking gives each output pixel the class that covers most of its
    footprint among labelled pixels, so a one-pixel stroke still labels the pixels it crosses; a pixel
    with no labelled input stays 255.
    """
    h, w = size
    if mask.shape == (h, w):
        return mask
    if h >= mask.shape[0] and w >= mask.shape[1]:
        return cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST)
    classes = [c for c in np.unique(mask) if c != IGNORE_INDEX]
    out = np.full((h, w), IGNORE_INDEX, dtype=np.uint8)
    best = np.zeros((h, w), dtype=np.float32)
    for c in classes:
        cover = cv2.resize((mask == c).astype(np.float32), (w, h), interpolation=cv2.INTER_AREA)  # (h, w)
        take = cover > best
        out[take] = c
        best[take] = cover[take]
    return out


# ----------------------------------------------------------------------------------------- network I/O


@dataclass(frozen=True)
class Meta:
    """Where a network input came from, to map its output back."""

    orig_hw: tuple[int, int]  # original image size
    work_hw: tuple[int, int]  # size at working scale (before padding)
    pad_hw: tuple[int, int]  # padded network input size


def normalize(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """RGB uint8 ``(H, W, 3)`` -> float32 ``(3, H, W)`` normalised with ``mean``/``std`` (on 0..1 values)."""
    x = image.astype(np.float32) * (1.0 / 255.0)  # (H, W, 3)
    x -= np.asarray(mean, dtype=np.float32)
    x /= np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))  # (3, H, W)


def padded_size(height: int, width: int, multiple: int) -> tuple[int, int]:
    """Smallest ``(h, w)`` at least the given size and divisible by ``multiple``."""
    return -(-height // multiple) * multiple, -(-width // multiple) * multiple


def prepare(image: np.ndarray, pp: PreprocessConfig, pad_to: tuple[int, int] | None = None) -> tuple[np.ndarray, Meta]:
    """Image -> network input ``(3, Hp, Wp)`` float32 at working scale, zero-padded bottom/right.

    Args:
        image: RGB uint8 ``(H, W, 3)``.
        pp: preprocessing settings (the sidecar JSON carries the same values).
        pad_to: pad to this size instead of the next multiple (to batch images of different sizes).
    """
    orig = image.shape[:2]
    work = working_size(orig[0], orig[1], pp.max_side)
    x = normalize(resize_image(image, work), pp.mean, pp.std)  # (3, h, w)
    pad = pad_to or padded_size(work[0], work[1], pp.pad_multiple)
    if pad != work:
        full = np.zeros((3, pad[0], pad[1]), dtype=np.float32)
        full[:, : work[0], : work[1]] = x
        x = full
    return x, Meta(orig_hw=orig, work_hw=work, pad_hw=pad)


def softmax(logits: np.ndarray, axis: int = 0) -> np.ndarray:
    """Numerically stable softmax."""
    z = logits - logits.max(axis=axis, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=axis, keepdims=True)
    return z


def logits_to_mask(logits: np.ndarray, meta: Meta) -> tuple[np.ndarray, np.ndarray]:
    """Network output ``(K, Hp, Wp)`` -> ``(mask uint8 (H, W), confidence float32 (H, W))`` at original size.

    The padding is cropped off; the mask is the argmax of the logits resized bilinearly to the original
    size (smooth class boundaries); the confidence, the probability of the winning class, is computed at
    working scale (``1 / sum(exp(l - max l))``, no full softmax) and resized bilinearly: the same numbers
    at a fraction of the cost of a softmax over every class at full size.
    """
    h, w = meta.work_hw
    planes = np.asarray(logits[:, :h, :w], dtype=np.float32)  # (K, h, w)
    # reductions across the class planes (axis 0) run plane by plane, vectorised: several times faster than
    # reducing over a short last axis
    conf = planes - planes.max(axis=0)
    np.exp(conf, out=conf)
    conf = conf.sum(axis=0)
    np.reciprocal(conf, out=conf)  # (h, w)
    crop = np.ascontiguousarray(planes.transpose(1, 2, 0))  # (h, w, K) for OpenCV
    oh, ow = meta.orig_hw
    if (oh, ow) != (h, w):
        crop = cv2.resize(crop, (ow, oh), interpolation=cv2.INTER_LINEAR)
        if crop.ndim == 2:  # a single class collapses the channel axis
            crop = crop[:, :, None]
        conf = cv2.resize(conf, (ow, oh), interpolation=cv2.INTER_LINEAR)
    mask = crop.argmax(axis=2).astype(np.uint8)
    return mask, np.clip(conf, 0.0, 1.0, out=conf)


# -------------------------------------------------------------------------------------------- display


def colorize(mask: np.ndarray, colors: Sequence[Sequence[int]]) -> np.ndarray:
    """Index mask -> RGB image with the class colours; 255 (unlabelled) is black."""
    lut = np.zeros((256, 3), dtype=np.uint8)
    for i, c in enumerate(colors[:255]):
        lut[i] = c
    return lut[mask]


def overlay(image: np.ndarray, mask: np.ndarray, colors: Sequence[Sequence[int]], alpha: float = 0.5) -> np.ndarray:
    """Blend class colours over an RGB image; unlabelled pixels (255) keep the image."""
    out = cv2.addWeighted(image, 1.0 - alpha, colorize(mask, colors), alpha, 0.0)  # uint8, rounded
    keep = mask == IGNORE_INDEX
    if keep.any():
        out[keep] = image[keep]
    return out


def mask_to_rgba(mask: np.ndarray, colors: Sequence[Sequence[int]]) -> np.ndarray:
    """Index mask -> RGBA layer for the editor: class colour with full alpha, unlabelled transparent."""
    rgba = np.zeros((*mask.shape, 4), dtype=np.uint8)
    rgba[..., :3] = colorize(mask, colors)
    rgba[..., 3] = np.where(mask != IGNORE_INDEX, 255, 0).astype(np.uint8)
    return rgba


def rgba_to_mask(layer: np.ndarray, colors: Sequence[Sequence[int]], min_alpha: int = 128) -> np.ndarray:
    """Painted RGBA (or RGB on black) layer -> index mask, each painted pixel to the nearest class colour.

    Pixels with alpha below ``min_alpha`` (or pure black on an RGB layer) are unlabelled. Nearest colour,
    rather than exact match, absorbs the anti-aliased edge of a brush stroke.
    """
    if layer.ndim != 3 or layer.shape[2] not in (3, 4):
        raise ValueError(f"expected an RGB or RGBA layer, got shape {layer.shape}")
    rgb = layer[..., :3].astype(np.int32)
    painted = layer[..., 3] >= min_alpha if layer.shape[2] == 4 else rgb.any(axis=2)
    out = np.full(layer.shape[:2], IGNORE_INDEX, dtype=np.uint8)
    if not colors or not painted.any():
        return out
    pal = np.asarray(colors, dtype=np.int32)  # (K, 3)
    px = rgb[painted]  # (N, 3)
    d = ((px[:, None, :] - pal[None, :, :]) ** 2).sum(axis=2)  # (N, K)
    out[painted] = d.argmin(axis=1).astype(np.uint8)
    return out
