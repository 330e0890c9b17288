"""Camera pose refinement through the differentiable renderer (SE(3) increments, photometric or
feature-metric loss)."""

from splatpose.refine.pose_refinement import REFINE_LOSSES, PoseRefiner, Refinement, check_refine_config
from splatpose.refine.se3 import apply_increment, se3_exp, twist_matrix

__all__ = ["REFINE_LOSSES", "PoseRefiner", "Refinement", "apply_increment", "check_refine_config", "se3_exp",
           "twist_matrix"]
