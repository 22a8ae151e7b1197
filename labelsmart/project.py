"""Open a project: workdir, store, images, classes and (on request) imported masks."""

from __future__ import annotations

import logging
from pathlib import Path

from labelsmart.config import Config
from labelsmart.store import Store, StoreError, load_classes_file

log = logging.getLogger(__name__)


class ProjectError(ValueError):
    """The project cannot be opened as asked; the message says what to do."""


def open_project(cfg: Config) -> Store:
    """Create or open the project described by ``cfg`` and bring its image list up to date.

    Images are only read. Classes come from ``cfg.classes_file`` when given (they must match a project
    that has classes already). ``cfg.import_masks`` loads ``<stem>.png`` index masks as first label
    revisions of images that have none yet.
    """
    if cfg.dataset is None or cfg.image_root is None or cfg.workdir is None:
        raise ProjectError("no data set given; pass --dataset DIR (a folder of images).")
    if not cfg.dataset.is_dir():
        raise ProjectError(f"{cfg.dataset}: not a folder; pass --dataset a folder of images.")
    try:
        cfg.workdir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ProjectError(f"{cfg.workdir}: cannot create the project folder ({exc}); pass --workdir DIR.") from exc
    store = Store(cfg.db_path, image_root=cfg.image_root)
    if store.resolve_model_paths(cfg.project_models_dir):
        log.info("model registry: relative version folders recorded as absolute paths")
    added = store.sync_images(cfg.image_root)
    n = len(store.images())
    if n == 0:
        raise ProjectError(
            f"{cfg.image_root}: no images found (looked for jpg/jpeg/png/bmp/tif/tiff/webp, nested folders "
            "included); point --dataset at a folder of images."
        )
    log.info("project %s: %d images (%d new), state in %s", cfg.project, n, added, cfg.workdir)
    if cfg.classes_file is not None:
        try:
            store.ensure_classes(load_classes_file(cfg.classes_file), source=str(cfg.classes_file))
        except StoreError as exc:
            raise ProjectError(str(exc)) from exc
    if cfg.import_masks is not None:
        import_masks(store, Path(cfg.import_masks))
    return store


def import_masks(store: Store, masks_dir: Path, author: str = "import") -> int:
    """Load ``<stem>.png`` index masks (255 = unlabelled) as label revisions of unlabelled images.

    A shortcut of ``import-labels --format png`` (:func:`labelsmart.formats.import_labels`): images that already
    have a label revision are left alone, so importing twice changes nothing, and masks of images outside the
    project are passed over. Returns the number of masks imported.

    Raises:
        ProjectError: the folder is missing, there are no classes yet, or a mask is unusable; nothing was imported.
    """
    from labelsmart.formats import FormatError, import_labels

    if not masks_dir.is_dir():
        raise ProjectError(f"{masks_dir}: masks folder not found; pass --import-masks a folder of <stem>.png masks.")
    if not store.classes():
        raise ProjectError(f"{masks_dir}: cannot import masks before the classes are known; pass --classes FILE.")
    try:
        n = import_labels(
            store, "png", masks_dir, author=author, source="import", only_unlabelled=True, skip_unknown_images=True
        )
    except FormatError as exc:
        raise ProjectError(str(exc)) from exc
    log.info("imported %d masks from %s", n, masks_dir)
    return n
