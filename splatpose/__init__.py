"""SplatPose+ framework: pose-agnostic 3D anomaly detection with SfM localization and Gaussian splatting."""
