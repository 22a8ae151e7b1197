"""Batch pre-annotation of whole folders: the streaming pipeline, the Ray engine and COCO output. No torch."""
