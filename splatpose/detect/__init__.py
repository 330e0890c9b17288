"""Detection of new images with a finished run: run-folder reading, image inputs, batched
localization of decoded images, overlays and output records. The entry point is
:class:`splatpose.detector.Detector`."""
