"""LightGlue's eager matcher on CUDA with a new keypoint count per pair, as real queries have.

Times pair-by-pair matching (the localize stage's path) with PyTorch's cuDNN attention backend on and
off: cuDNN builds an execution plan for every new sequence length, which costs far more than the
attention itself when every query brings other keypoint counts. Run on the lent GPU after
gpu_suite.sh's setup (PHASES=none):

    python experiments/gpu_lightglue_shapes.py
"""

import statistics
import time

import numpy as np
import torch
from omegaconf import OmegaConf

from splatpose.sfm.config import compose_sfm_config
from splatpose.sfm.matchers import build_matcher


def random_features(rng: np.random.Generator, n: int) -> dict:
    descriptors = rng.normal(size=(n, 128)).astype(np.float32)
    return {"keypoints": rng.uniform(0, 400, (n, 2)).astype(np.float32),
            "descriptors": descriptors / np.linalg.norm(descriptors, axis=1, keepdims=True),
            "image_size": np.array([400, 400])}


def time_pairs(matcher, pairs, repeat_shapes: bool) -> float:
    times = []
    for f0, f1 in pairs:
        p0, p1 = matcher.prepare(f0), matcher.prepare(f1)
        torch.cuda.synchronize()
        start = time.perf_counter()
        matcher(p0, p1)
        torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def main() -> None:
    cfg = compose_sfm_config()
    matcher = build_matcher(cfg.matcher, cfg.feature.name, "cuda")
    rng = np.random.default_rng(0)
    fixed = [(random_features(rng, 1024), random_features(rng, 1024))] * 20
    for cudnn_sdp in (True, False):
        torch.backends.cuda.enable_cudnn_sdp(cudnn_sdp)
        varying = [(random_features(rng, int(rng.integers(300, 1024))), random_features(rng, int(rng.integers(300, 1024))))
                   for _ in range(20)]
        time_pairs(matcher, fixed[:3], True)
        print(f"cudnn_sdp={cudnn_sdp}: fixed shapes {time_pairs(matcher, fixed, True):.1f} ms/pair, "
              f"new shapes {time_pairs(matcher, varying, False):.1f} ms/pair", flush=True)
    print(OmegaConf.to_yaml(cfg.matcher))


if __name__ == "__main__":
    main()
