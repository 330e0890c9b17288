"""Anomaly scoring: pretrained feature backbones and the (query, render) -> anomaly map recipe."""

from splatpose.scoring.anomaly_maps import AnomalyScorer, build_scorer
from splatpose.scoring.backbones import BackboneError, FeatureBackbone, build_backbone, load_efficientnet

__all__ = ["AnomalyScorer", "BackboneError", "FeatureBackbone", "build_backbone", "build_scorer",
           "load_efficientnet"]
