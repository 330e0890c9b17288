"""Datasets in the MAD-Sim layout: the reader, camera conventions, and the built-in generated dataset.

The pipeline calls :func:`resolve_dataset`; the generator (splatpose.data.synthetic) imports VTK and is
loaded only when the synthetic dataset is used.
"""

from splatpose.data.mad_sim import (
    DEFECT_TYPES,
    ClassData,
    DatasetError,
    TestImage,
    TrainView,
    list_classes,
    load_class,
    read_image,
    read_mask,
)
from splatpose.data.resolve import resolve_dataset

__all__ = [
    "DEFECT_TYPES",
    "ClassData",
    "DatasetError",
    "TestImage",
    "TrainView",
    "list_classes",
    "load_class",
    "read_image",
    "read_mask",
    "resolve_dataset",
]
