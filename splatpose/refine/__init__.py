"""Camera pose refinement through the differentiable renderer (SE(3) increments, photometric or
feature-metric loss), and the pipeline's refine stage over a class's test images."""

from splatpose.refine.pose_refinement import REFINE_LOSSES, PoseRefiner, Refinement, check_refine_config
from splatpose.refine.queries import RefinedPose, default_refine_config, refine_query_poses
from splatpose.refine.se3 import apply_increment, se3_exp, twist_matrix

__all__ = ["REFINE_LOSSES", "PoseRefiner", "RefinedPose", "Refinement", "apply_increment", "check_refine_config",
           "default_refine_config", "refine_query_poses", "se3_exp", "twist_matrix"]
