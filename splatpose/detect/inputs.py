"""Reading the images a detector is given: which files, and whether each one is usable as it is.

A detector sees whatever an inspection line or a user hands it. Each image is checked on its own,
and a bad one becomes a per-image error or a flag, never an exception that stops the batch:

- unreadable or truncated file -> error (the reader's message names the file);
- another size than the run's camera -> with ``on_size_mismatch="resize"`` and the same aspect ratio
  (within 1 %: the same camera at another resolution, so the intrinsics scale with it) it is resized
  with antialiasing and flagged ``resized_from_WxH``; another aspect ratio, or
  ``on_size_mismatch="reject"``, is an error that says what size is expected;
- grayscale (a single-channel file, or three equal channels) -> scored, flagged ``grayscale``: the
  renders are in colour, so colour differences raise the map everywhere on the object.
"""

from __future__ import annotations

import glob
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from splatpose.errors import UserError
from splatpose.data.mad_sim import DatasetError, decode_image_bytes, decode_pixels, pixels_to_float

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
SIZE_POLICIES = ("resize", "reject")
ASPECT_TOLERANCE = 0.01


class InputError(UserError):
    """An input image that cannot be scored; the message says why and what would fix it."""


@dataclass(frozen=True)
class EncodedImage:
    """An image file's bytes held in memory (e.g. an HTTP upload); ``name`` labels it in errors."""

    data: bytes
    name: str

    def __str__(self) -> str:
        return self.name


@dataclass
class LoadedImage:
    """One usable input at the run's size, with notes on it (``flags``). Either ``pixels``, the file's
    decoded uint8 [H, W, 3|4] (RGBA: composited onto white later; the detector uploads these, a
    quarter of the float bytes, and converts them on its device), or ``image``, float32 [3, H, W] in
    [0, 1] on a white background (arrays, resized files). ``load_seconds``: what reading, decoding and
    checking it took (set by ``Detector.prepare``; its detection reports it as the load stage)."""

    pixels: np.ndarray | None = None
    image: torch.Tensor | None = None
    flags: list[str] = field(default_factory=list)
    load_seconds: float = 0.0

    def float_image(self) -> torch.Tensor:
        """[3, H, W] float32 in [0, 1], white background."""
        if self.image is not None:
            return self.image
        return torch.from_numpy(pixels_to_float(self.pixels)).permute(2, 0, 1)


def pixels_to_float_torch(pixels: torch.Tensor) -> torch.Tensor:
    """``splatpose.data.mad_sim.pixels_to_float`` on a device, equal to the bit: uint8 [..., 3|4] ->
    float32 [..., 3]. The division is a lookup in numpy's own table of k / 255 (a device division by a
    constant may multiply by its reciprocal, which rounds differently); the composite is the same
    float32 multiply and add, and with alpha 255 it returns the colour unchanged, as numpy's shortcut."""
    table = _unit_table(pixels.device)
    rgb = table[pixels[..., :3].long()]
    if pixels.shape[-1] == 3:
        return rgb
    alpha = table[pixels[..., 3:].long()]
    return rgb * alpha + (1.0 - alpha)


_UNIT_TABLES: dict[str, torch.Tensor] = {}


def _unit_table(device: torch.device) -> torch.Tensor:
    key = str(device)
    if key not in _UNIT_TABLES:
        _UNIT_TABLES[key] = torch.from_numpy(np.arange(256).astype(np.float32) / 255.0).to(device)
    return _UNIT_TABLES[key]


def expand_inputs(inputs) -> list[Path]:
    """Image paths from a glob pattern, a folder, a file, or a list of any of those (sorted, no repeats).
    A pattern in a list that matches nothing is logged as a warning (a typo must not pass unseen).

    Raises:
        InputError: when nothing matches, naming what was given.
    """
    if inputs is None:
        raise InputError("inputs is not set; pass inputs='folder/*.png' (a glob, a folder, a file or a list)")
    items = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    paths: list[Path] = []
    for item in items:
        item = str(Path(str(item)).expanduser())
        if Path(item).is_dir():
            paths += sorted(p for p in Path(item).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        elif glob.has_magic(item):
            matched = [Path(p) for p in sorted(glob.glob(item, recursive=True)) if Path(p).is_file()]
            if not matched:
                log.warning("inputs: the pattern %r matched no files (the other inputs go on)", item)
            paths += matched
        else:
            paths.append(Path(item))  # a missing file becomes that image's error, not a failed run
    unique = list(dict.fromkeys(paths))
    if not unique:
        raise InputError(f"inputs={inputs!r} matched no image files (looked for {', '.join(IMAGE_SUFFIXES)})")
    return unique


def display_names(paths: list[Path]) -> list[str]:
    """Names relative to the existing inputs' common folder ("test/Burrs/003.png"); a missing file
    keeps its own name (it becomes that image's error)."""
    resolved = [p.resolve() for p in paths]
    parents = [str(p.parent) for p in resolved if p.is_file()]
    common = Path(os.path.commonpath(parents)) if parents else None
    names = []
    for path in resolved:
        if common is not None and path.is_file() and path.is_relative_to(common):
            names.append(path.relative_to(common).as_posix())
        else:
            names.append(path.name)
    return names


def load_input(source, width: int, height: int, on_size_mismatch: str = "resize", fast_decode: bool = True
               ) -> LoadedImage:
    """Read one input (a path, an :class:`EncodedImage`, or an already decoded [H, W, 3] float array in
    [0, 1]) for a run of ``width`` x ``height``; ``fast_decode``: see ``decode_pixels``'s ``fast``.

    Raises:
        InputError: unreadable file, or a size that cannot be used (see the module docstring).
    """
    if on_size_mismatch not in SIZE_POLICIES:
        raise ValueError(f"detect.on_size_mismatch={on_size_mismatch!r} is unknown; choose one of "
                         f"{', '.join(SIZE_POLICIES)}")
    if isinstance(source, np.ndarray):
        array = source
        if array.ndim == 2:
            array = np.repeat(array[..., None], 3, axis=2)
        if array.ndim != 3 or array.shape[2] != 3:
            raise InputError(f"image array has shape {array.shape}; expected [H, W, 3] (or [H, W]) in [0, 1]")
        loaded = LoadedImage(image=torch.from_numpy(np.ascontiguousarray(array.astype(np.float32))).permute(2, 0, 1))
    else:
        try:
            pixels = (decode_image_bytes(source.data, source.name, fast_decode) if isinstance(source, EncodedImage)
                      else decode_pixels(Path(source), fast=fast_decode))
            loaded = LoadedImage(pixels=pixels)
        except DatasetError as error:
            raise InputError(str(error)) from error
    channels = [loaded.pixels[..., c] for c in range(3)] if loaded.image is None else list(loaded.image.numpy())
    if np.array_equal(channels[0], channels[1]) and np.array_equal(channels[1], channels[2]):
        loaded.flags.append("grayscale")
    actual_h, actual_w = channels[0].shape
    if (actual_w, actual_h) != (width, height):
        loaded.image = _fit_size(loaded.float_image(), width, height, on_size_mismatch, source)
        loaded.pixels = None
        loaded.flags.append(f"resized_from_{actual_w}x{actual_h}")
    return loaded


def _fit_size(image: torch.Tensor, width: int, height: int, policy: str, source) -> torch.Tensor:
    actual_h, actual_w = image.shape[-2:]
    what = f"{source}" if not isinstance(source, np.ndarray) else "image array"
    if policy == "reject":
        raise InputError(f"{what}: image is {actual_w}x{actual_h} but the run's camera is {width}x{height}; "
                         "pass images of that size, or set detect.on_size_mismatch=resize to rescale images "
                         "of the same aspect ratio")
    if abs((actual_w / actual_h) / (width / height) - 1) > ASPECT_TOLERANCE:
        raise InputError(f"{what}: image is {actual_w}x{actual_h} (aspect {actual_w / actual_h:.3f}) but the run's "
                         f"camera is {width}x{height} (aspect {width / height:.3f}); another aspect ratio means "
                         "another camera, whose intrinsics the run does not know: crop to the run's aspect "
                         "ratio or capture with the run's camera")
    return F.interpolate(image[None], size=(height, width), mode="bilinear", antialias=True,
                         align_corners=False)[0].clamp(0, 1)
