"""Datasets: one type (`ImageDataset`) and the sources that produce it (digits, shapes, imagefolder)."""
from gradtrace.data.base import NULL_CODE, ImageDataset, encode_attributes
from gradtrace.data.registry import KNOWN_SPECS, load_dataset
from gradtrace.data.shapes import render_shape

__all__ = ["ImageDataset", "load_dataset", "encode_attributes", "render_shape", "NULL_CODE", "KNOWN_SPECS"]
