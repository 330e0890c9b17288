"""Detection of new images with a finished run: the :class:`Detector` (``detector``), run-folder reading
(``finished_run``), image inputs (``inputs``), batched localization of decoded images (``localization``),
the GPU accelerators (``static_aliked``, ``static_lightglue``, ``batched_lightglue``, ``cuda_graphs``),
overlays and output records.

    from splatpose.detect import Detector
    detector = Detector.from_run(run_dir)

The names below are imported on first use, so that importing one light module of the package (the
service's ``inputs``, the pipeline's ``finished_run``) does not load the detector, its networks and
renderer."""

PUBLIC = {
    "Detector": "splatpose.detect.detector",
    "Detection": "splatpose.detect.detector",
    "detect_task": "splatpose.detect.detector",
    "default_detect_config": "splatpose.detect.detector",
    "FinishedRun": "splatpose.detect.finished_run",
    "load_finished_run": "splatpose.detect.finished_run",
}
__all__ = sorted(PUBLIC)


def __getattr__(name: str):
    if name not in PUBLIC:
        raise AttributeError(f"module 'splatpose.detect' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(PUBLIC[name]), name)
