"""Datasets: the built-in synthetic shapes set, and readers for the formats users already have."""

from .readers import (
    ImageTextRecord,
    VQARecord,
    read_classification,
    read_retrieval,
    read_vqa,
)
from .shapes import shapes

__all__ = ["shapes", "read_retrieval", "read_vqa", "read_classification", "ImageTextRecord", "VQARecord"]
