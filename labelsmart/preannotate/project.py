"""Pre-annotations of a project's own images for a label export (``export-labels --include predictions``)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

from labelsmart import imageio
from labelsmart.config import Config
from labelsmart.formats import FormatError, PredictedImage
from labelsmart.formats.labelstudio import model_version_name
from labelsmart.serving.predictor import Predictor
from labelsmart.store import Store

log = logging.getLogger(__name__)


def unlabelled_predictions(store: Store, cfg: Config) -> Callable[[], Iterator[PredictedImage]]:
    """The newest published model's pre-annotation of every image nobody labelled, in the project's image order.

    Predictions come from the prediction cache where the page (or an earlier export) made them, and are made and
    cached otherwise. An image that cannot be read is logged and left out.

    Raises:
        FormatError: no model is published yet.
    """
    predictor = Predictor(store, cfg)
    if predictor.version is None:
        raise FormatError(
            f"{store.db_path}: no model is published yet, so there are no pre-annotations to include; label a few "
            "images and let the trainer publish one, or drop --include predictions."
        )

    def predictions() -> Iterator[PredictedImage]:
        for image in store.images():
            if image.labelled_pixels > 0:
                continue
            try:
                pred = predictor.predict(image.id)
            except (imageio.ImageError, ValueError) as exc:
                log.warning("pre-annotation of %s left out of the export: %s", image.path, exc)
                continue
            if pred is None:
                continue
            yield PredictedImage(
                image, pred.mask, pred.confidence, pred.mean_confidence, model_version_name(pred.version)
            )

    return predictions
