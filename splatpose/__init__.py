"""SplatPose+ framework: pose-agnostic 3D anomaly detection with SfM localization and Gaussian splatting."""


def __getattr__(name: str):
    # Lazy, so that `import splatpose` stays cheap (the detector pulls in torch, pycolmap and the networks).
    if name == "Detector":
        from splatpose.detect.detector import Detector

        return Detector
    raise AttributeError(f"module 'splatpose' has no attribute {name!r}")
