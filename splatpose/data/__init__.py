"""Datasets in the MAD-Sim layout: the reader, camera conventions, and two generated families (the
built-in ``synthetic``, for tuning, and ``parts``, for evaluation only: experiments/PROTOCOL.md).

The pipeline calls :func:`resolve_dataset`; the generators (splatpose.data.synthetic: VTK;
splatpose.data.parts: trimesh and Mitsuba) are loaded only when their dataset is used.
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
