"""The sync-free DefaultStrategy keeps gsplat's densification statistics and decisions."""

import torch
from gsplat.strategy import DefaultStrategy

from splatpose.splat.gaussians import Gaussians
from splatpose.splat.rendering import render
from splatpose.splat.strategy import DeviceStatsDefaultStrategy
from test_splat_rasterizer import tiny_camera, tiny_scene


def densify_once(strategy_class, steps=3):
    """Two cameras, a few steps of gradients, then one refine step; returns (state, parameters)."""
    gaussians = tiny_scene(n=60, dtype=torch.float32)
    # some Gaussians far behind the cameras: invisible, so they must gather no statistics
    gaussians.means.data[:10] += 50.0
    w2c, K, width, height = tiny_camera(dtype=torch.float32)
    params = torch.nn.ParameterDict({k: torch.nn.Parameter(v.clone()) for k, v in gaussians.as_dict().items()})
    optimizers = {k: torch.optim.Adam([p], lr=1e-3) for k, p in params.items()}
    strategy = strategy_class(refine_start_iter=0, refine_every=steps, grow_grad2d=2e-4, prune_opa=0.05,
                              refine_scale2d_stop_iter=10)
    state = strategy.initialize_state(scene_scale=1.0)
    states = []
    for step in range(1, steps + 1):
        rgb, _, info = render(Gaussians.from_dict(params), w2c, K, width, height, backend="torch",
                              return_alpha=True, return_info=True)
        strategy.step_pre_backward(params, optimizers, state, step, info)
        ((rgb - 0.5) ** 2).sum().backward()
        if step < steps:  # statistics before the refine step resets them
            strategy._update_state(params, state, info)
            states.append({k: state[k].clone() for k in ("grad2d", "count", "radii")})
            for p in params.values():
                p.grad = None
        else:
            torch.manual_seed(0)  # splitting samples new positions
            strategy.step_post_backward(params, optimizers, state, step, info, packed=False)
    return states, {k: v.detach() for k, v in params.items()}


def test_device_stats_equal_gsplat_statistics_and_densification():
    ours_states, ours = densify_once(DeviceStatsDefaultStrategy)
    gsplat_states, reference = densify_once(DefaultStrategy)
    for mine, theirs in zip(ours_states, gsplat_states):
        torch.testing.assert_close(mine["grad2d"], theirs["grad2d"], rtol=1e-6, atol=0)
        assert torch.equal(mine["count"], theirs["count"])
        assert mine["count"][:10].sum() == 0  # the invisible Gaussians
        # gsplat writes each camera in turn (the last wins), this keeps the larger of the cameras'
        assert (mine["radii"] >= theirs["radii"]).all()
    assert len(ours["means"]) != 60  # the refine step grew or pruned
    assert ours["means"].shape == reference["means"].shape  # the same Gaussians grown and pruned
    torch.testing.assert_close(ours["means"], reference["means"])
