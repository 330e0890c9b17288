"""Anomaly detection metrics (numpy, CPU): exact pixel/image AUROC and AUPRO (MVTec definition)."""

from splatpose.metrics.aupro import aupro, label_defect_regions, pro_curve
from splatpose.metrics.auroc import auroc, image_auroc, image_scores, pixel_auroc
from splatpose.metrics.evaluate import evaluate, normalise_maps

__all__ = ["aupro", "auroc", "evaluate", "image_auroc", "image_scores", "label_defect_regions",
           "normalise_maps", "pixel_auroc", "pro_curve"]
