"""labelsmart: label images for semantic segmentation with a fraction of the usual labels."""

__version__ = "0.1.0"
