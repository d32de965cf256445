"""Sketching: weighted k-means tables and codes for linear layers (data-free or Hessian-weighted)."""

from .kmeans import weighted_kmeans_1d
from .linear import sketch_linear
from .model import sketch_layer, sketch_model
from .result import SketchResult

__all__ = ["SketchResult", "sketch_layer", "sketch_linear", "sketch_model", "weighted_kmeans_1d"]
