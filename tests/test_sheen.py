"""The sheen taken off a query (splatpose/scoring/sheen.py): a highlight goes, a defect stays."""

import dataclasses

import pytest
import torch

from splatpose.detect.cuda_graphs import GraphedScorer
from splatpose.scoring.anomaly_maps import AnomalyScorer
from splatpose.scoring.sheen import SheenSettings, sheen_allowance, take_off_sheen, white_excess

SIZE = 64
GREEN = (0.30, 0.50, 0.28)
SHEEN = SheenSettings(eps=0.003, opening_px=3, hue_weight=1.0, percentile=99)


def surface(colour=GREEN) -> torch.Tensor:
    """[1, 3, SIZE, SIZE] a part filling the middle of a white image, in one colour."""
    image = torch.ones(1, 3, SIZE, SIZE)
    image[:, :, 8:-8, 8:-8] = torch.tensor(colour).view(1, 3, 1, 1)
    return image


def blob(cy: int, cx: int, sigma: float) -> torch.Tensor:
    """[SIZE, SIZE] a Gaussian bump of height 1."""
    y, x = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    return torch.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * sigma ** 2))


def test_a_highlight_is_taken_off_and_shading_and_colour_changes_stay():
    render = surface()
    query = render.clone()
    query += 0.3 * blob(22, 22, 4.0)                                # a sheen: white light added
    query[:, :, 40:48, 20:28] *= 0.8                                 # a dent's darker side: shading
    query[:, :, 40:48, 36:44] *= 1.15                                # its lit side
    query[:, :, 28:34, 40:48] = torch.tensor([0.50, 0.30, 0.20]).view(1, 3, 1, 1)   # a rust stain: another hue
    out = take_off_sheen(query, render, allowance=0.6, settings=SHEEN)

    highlight = blob(22, 22, 4.0) > 0.2
    before, after = ((image - render)[0, :, highlight].abs().max() for image in (query, out))
    assert before > 0.1 and after < 0.1 * before
    for rows, cols in [(slice(40, 48), slice(20, 28)), (slice(40, 48), slice(36, 44)), (slice(28, 34), slice(40, 48))]:
        lost = (out - query)[0, :, rows, cols].abs().mean() / (query - render)[0, :, rows, cols].abs().mean()
        assert lost < 0.05, f"a defect at {rows}, {cols} was changed by {lost:.0%} of its difference"
    ungated = take_off_sheen(query, render, allowance=0.6, settings=dataclasses.replace(SHEEN, hue_weight=0.0))
    assert (ungated - query)[0, :, 28:34, 40:48].abs().mean() > 0.1   # without the hue weight the stain reads as sheen


def test_pixel_sized_excess_and_grey_surfaces_lose_nothing():
    render = surface()
    query = render.clone()
    query[:, :, 20:44:4, 20:44:4] += 0.3                             # isolated bright pixels (noise)
    assert white_excess(query, render, SHEEN).max() == 0.0
    without_opening = dataclasses.replace(SHEEN, opening_px=1)
    assert white_excess(query, render, without_opening).max() > 0.2    # without the opening they would count

    grey = surface((0.5, 0.5, 0.5))
    shined = grey + 0.3 * blob(32, 32, 6.0)                         # white on grey is indistinguishable from shading
    assert (take_off_sheen(shined, grey, 0.6, SHEEN) - shined).abs().max() < 1e-3


def test_the_allowance_is_near_zero_on_a_matte_class_and_protects_its_white_stains():
    generator = torch.Generator().manual_seed(0)
    renders = surface().repeat(4, 1, 1, 1)
    matte = (renders + 0.01 * torch.randn(renders.shape, generator=generator)).clamp(0, 1)
    glossy = renders + 0.35 * torch.stack([blob(16 + 8 * i, 30, 5.0) for i in range(4)])[:, None]
    matte_allowance = sheen_allowance(matte, renders, SHEEN)
    glossy_allowance = sheen_allowance(glossy, renders, SHEEN)
    assert matte_allowance < 0.02
    assert glossy_allowance > 0.2

    render = surface()
    stained = render.clone()
    stained[:, :, 24:36, 24:36] = 0.9                                # a whitish stain on the matte part
    out = take_off_sheen(stained, render, matte_allowance, SHEEN)
    lost = (out - stained)[0, :, 24:36, 24:36].abs().mean() / (stained - render)[0, :, 24:36, 24:36].abs().mean()
    assert lost < 0.05


def test_the_scorer_uses_the_allowance_it_is_given():
    scorer = AnomalyScorer(backbone=None, size=SIZE, blur_kernel_size=0)
    render = surface()
    query = render + 0.3 * blob(22, 22, 4.0)
    plain = scorer(query, render)
    scorer.sheen_allowance = 0.6
    assert scorer(query, render).max() < 0.05 * plain.max()
    scorer.sheen_allowance = None
    assert torch.equal(scorer(query, render), plain)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_detector_replays_the_scorer_with_the_sheen_from_a_cuda_graph():
    """Taking the sheen off must be capturable (no host copy inside it), or the detector scores eagerly."""
    scorer = AnomalyScorer(backbone=None, size=SIZE, blur_kernel_size=0).cuda()
    scorer.sheen_allowance = 0.6
    render = surface().cuda()
    query = render + 0.3 * blob(22, 22, 4.0).cuda()
    query[:, :, 40:48, 20:28] = torch.tensor([0.50, 0.30, 0.20], device="cuda").view(1, 3, 1, 1)
    graphed = GraphedScorer(scorer)
    maps = graphed(query, render)
    assert not graphed.failed and graphed.graphs, "the scorer fell back to eager scoring"
    torch.testing.assert_close(maps, scorer(query, render), atol=1e-5, rtol=1e-4)
