"""Sketching: weighted k-means tables and codes for linear layers (data-free or Hessian-weighted)."""

from .kmeans import weighted_kmeans_1d
from .linear import SketchResult, sketch_linear

__all__ = ["SketchResult", "sketch_linear", "weighted_kmeans_1d"]
