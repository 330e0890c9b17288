"""Query -> database retrieval: which train images a query is matched against (``sfm/retrieval``).

- ``global`` (default): VLAD of the image's own local descriptors over a vocabulary learned from the
  database (k-means). It needs no weights and no extra network pass: the query's local features are
  already extracted for matching, so describing it costs one small nearest-centre assignment. On
  object-centric inspection images the visible parts of the object decide the viewpoint, and VLAD
  keeps which parts (through which descriptors) are visible, so the nearest views rank first.
- ``exhaustive``: every database image (slow, the upper bound on what retrieval can give).
- ``netvlad``: NetVLAD (VGG16 + NetVLAD pooling, 64 clusters) with weights from
  ``sfm.retrieval.weights``, a PyTorch checkpoint in the layout of the pytorch-NetVlad project
  (parameters ``encoder.<i>.*`` for VGG16's conv layers up to conv5_3 and ``pool.conv.weight``,
  ``pool.centroids``; an optional top-level ``state_dict`` key). No weights ship with this project.

A retriever has ``fit(db_features)`` (database side, once) and ``describe(image, features) -> [D]``
(one image: ``image`` [3, H, W] in [0, 1], needed only when ``needs_images``, else None; ``features``
its local features); :func:`rank_database` orders the database by cosine similarity. Descriptors are
L2-normalised.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from sklearn.cluster import KMeans
from torch import nn

RETRIEVAL_NAMES = ("global", "exhaustive", "netvlad")


def rank_database(query_descriptor: np.ndarray, db_descriptors: np.ndarray) -> np.ndarray:
    """Database indices sorted from most to least similar (cosine of L2-normalised descriptors).

    Args:
        query_descriptor: [D]; db_descriptors: [N, D]. Empty D (exhaustive retrieval) keeps database order.
    """
    if query_descriptor.size == 0:
        return np.arange(len(db_descriptors))
    return np.argsort(-(db_descriptors @ query_descriptor), kind="stable")


class ExhaustiveRetrieval:
    """Every database image is a candidate (``top_k`` is ignored by the localizer)."""

    exhaustive = True
    needs_images = False

    def fit(self, db_features: list[dict]) -> None:
        pass

    def describe(self, image: torch.Tensor | None, features: dict) -> np.ndarray:
        return np.zeros(0, dtype=np.float32)


class VladRetrieval:
    """VLAD (Jegou et al. 2010) over the local descriptors, vocabulary from the database images.

    Residuals to the nearest of ``num_clusters`` k-means centres are summed per centre, each centre's
    sum is L2-normalised (intra-normalisation: no single repeated texture dominates), then the whole
    vector is square-rooted (signed) and L2-normalised.
    """

    exhaustive = False
    needs_images = False

    def __init__(self, num_clusters: int = 32, max_training_descriptors: int = 100_000, seed: int = 0):
        self.num_clusters = num_clusters
        self.max_training = max_training_descriptors
        self.seed = seed
        self.centres: np.ndarray | None = None  # [K, D]

    def fit(self, db_features: list[dict]) -> None:
        descriptors = np.concatenate([f["descriptors"] for f in db_features]).astype(np.float32)
        rng = np.random.default_rng(self.seed)
        if len(descriptors) > self.max_training:
            descriptors = descriptors[rng.choice(len(descriptors), self.max_training, replace=False)]
        k = min(self.num_clusters, len(descriptors))
        kmeans = KMeans(n_clusters=k, n_init=1, random_state=self.seed).fit(_unit(descriptors))
        self.centres = kmeans.cluster_centers_.astype(np.float32)

    def describe(self, image: torch.Tensor | None, features: dict) -> np.ndarray:
        if self.centres is None:
            raise RuntimeError("VladRetrieval.describe called before fit (the database vocabulary)")
        k, dim = self.centres.shape
        desc = _unit(np.asarray(features["descriptors"], dtype=np.float32))
        vlad = np.zeros((k, dim), dtype=np.float32)
        if len(desc):
            nearest = np.argmax(desc @ self.centres.T, axis=1)  # unit vectors: max cosine = min distance
            # sum of residuals per centre as one product with the assignment matrix (np.add.at's
            # unbuffered scatter would be half of the retrieval's time)
            assignment = np.zeros((k, len(desc)), dtype=np.float32)
            assignment[nearest, np.arange(len(desc))] = 1.0
            vlad = assignment @ desc - assignment.sum(axis=1, keepdims=True) * self.centres
        vlad = _unit(vlad).ravel()
        vlad = np.sign(vlad) * np.sqrt(np.abs(vlad))
        return _unit(vlad[None])[0]


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class NetVLADPooling(nn.Module):
    """NetVLAD layer (Arandjelovic et al. 2016): soft-assigned residuals to learned centroids."""

    def __init__(self, num_clusters: int = 64, dim: int = 512):
        super().__init__()
        self.conv = nn.Conv2d(dim, num_clusters, kernel_size=1, bias=False)
        self.centroids = nn.Parameter(torch.zeros(num_clusters, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, D, h, w] -> [B, K * D] L2-normalised."""
        x = F.normalize(x, dim=1)
        assignment = self.conv(x).flatten(2).softmax(1)  # [B, K, hw]
        x = x.flatten(2)  # [B, D, hw]
        # sum_i a_k(x_i) (x_i - c_k) = (a x^T)_k - (sum_i a_k(x_i)) c_k
        vlad = assignment @ x.transpose(1, 2) - assignment.sum(-1, keepdim=True) * self.centroids[None]
        vlad = F.normalize(vlad, dim=2).flatten(1)
        return F.normalize(vlad, dim=1)


class NetVLAD(nn.Module):
    """VGG16 up to conv5_3 (before its ReLU) + NetVLAD pooling, in pytorch-NetVlad's parameter layout."""

    def __init__(self, num_clusters: int = 64):
        super().__init__()
        from torchvision.models import vgg16

        self.encoder = nn.Sequential(*list(vgg16(weights=None).features.children())[:-2])
        self.pool = NetVLADPooling(num_clusters, 512)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] -> [B, 64 * 512]."""
        return self.pool(self.encoder((images - self.mean) / self.std))


class NetVLADRetrieval:
    exhaustive = False
    needs_images = True

    def __init__(self, cfg: DictConfig, device: str):
        weights = cfg.get("weights")
        if not weights:
            raise ValueError("sfm.retrieval.weights is not set: NetVLAD weights are not shipped with any "
                             "installed package; set sfm.retrieval.weights=/path/to/netvlad_checkpoint.pth "
                             "or use sfm/retrieval=global")
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"sfm.retrieval.weights={path}: no such file (NetVLAD checkpoint)")
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
        num_clusters = state["pool.centroids"].shape[0] if "pool.centroids" in state else 64
        self.model = NetVLAD(num_clusters)
        result = self.model.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if k not in ("mean", "std")]
        if missing or result.unexpected_keys:
            raise ValueError(f"sfm.retrieval.weights={path}: not a pytorch-NetVlad checkpoint (missing "
                             f"{missing[:3]}, unexpected {result.unexpected_keys[:3]}); expected encoder.* "
                             "and pool.* parameters")
        self.model.eval().to(device)
        self.device = device
        self.resize_max = cfg.get("resize_max")

    def fit(self, db_features: list[dict]) -> None:
        pass

    @torch.inference_mode()
    def describe(self, image: torch.Tensor | None, features: dict) -> np.ndarray:
        image = image[None].to(self.device)
        if self.resize_max and max(image.shape[-2:]) > self.resize_max:
            scale = self.resize_max / max(image.shape[-2:])
            image = F.interpolate(image, scale_factor=scale, mode="bilinear", antialias=True)
        return self.model(image)[0].float().cpu().numpy()


def build_retrieval(cfg_retrieval: DictConfig, device: str):
    name = cfg_retrieval.name
    if name == "global":
        return VladRetrieval(int(cfg_retrieval.num_clusters), seed=int(cfg_retrieval.get("seed", 0)))
    if name == "exhaustive":
        return ExhaustiveRetrieval()
    if name == "netvlad":
        return NetVLADRetrieval(cfg_retrieval, device)
    raise ValueError(f"sfm.retrieval.name={name!r} is unknown; choose one of {', '.join(RETRIEVAL_NAMES)}")
