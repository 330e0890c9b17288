"""Pose refinement: the SE(3) increment and the refiner on a small random Gaussian scene (CPU, seconds).

The scene is its own ground truth: the target image is the scene rendered at a known pose, so a
refiner that works must walk a perturbed start pose back towards it.
"""

import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from scipy.spatial.transform import Rotation

from splatpose.data.cameras import center_error, rotation_error_deg
from splatpose.refine import PoseRefiner, apply_increment, check_refine_config, default_refine_config, se3_exp
from splatpose.refine.pose_refinement import CPU_MAX_SIZE, enclosed_white_mask, resolve_max_size
from splatpose.splat.gaussians import Gaussians, rgb_to_sh0
from splatpose.splat.rendering import render

SIZE = 64
K = np.array([[70.0, 0.0, SIZE / 2], [0.0, 70.0, SIZE / 2], [0.0, 0.0, 1.0]])


def random_scene(n: int = 400, seed: int = 0) -> Gaussians:
    """Opaque, small, brightly coloured Gaussians in a unit cube around the origin: a textured blob."""
    rng = np.random.default_rng(seed)
    return Gaussians(
        means=torch.as_tensor(rng.uniform(-0.5, 0.5, (n, 3)), dtype=torch.float32),
        quats=torch.as_tensor(Rotation.random(n, random_state=seed).as_quat()[:, [3, 0, 1, 2]], dtype=torch.float32),
        scales=torch.full((n, 3), math.log(0.06)),
        opacities=torch.full((n,), 3.0),
        sh0=rgb_to_sh0(torch.as_tensor(rng.random((n, 3)), dtype=torch.float32))[:, None],
        shN=torch.zeros(n, 0, 3),
    )


def camera(distance: float = 2.5, yaw_deg: float = 20.0) -> np.ndarray:
    """w2c [4, 4] of a camera on a circle around the origin, looking at it (OpenCV axes)."""
    yaw = math.radians(yaw_deg)
    centre = np.array([distance * math.sin(yaw), 0.3, -distance * math.cos(yaw)])
    forward = -centre / np.linalg.norm(centre)
    right = np.cross(forward, [0.0, -1.0, 0.0])
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    w2c = np.eye(4)
    w2c[:3, :3] = np.stack([right, down, forward])
    w2c[:3, 3] = -w2c[:3, :3] @ centre
    return w2c


def perturbed(w2c: np.ndarray, degrees: float, shift: float, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    axis = rng.normal(size=3)
    xi = np.concatenate([shift * rng.normal(size=3) / math.sqrt(3), math.radians(degrees) * axis / np.linalg.norm(axis)])
    return (se3_exp(torch.as_tensor(xi)) @ torch.as_tensor(w2c)).numpy()


def refine_cfg(**overrides):
    """One full-size level of the l1 loss without blur (unless overridden): the toy scenes' soft edges
    suit the colour loss (see the coarse-to-fine test for the default's outline term)."""
    return OmegaConf.merge(default_refine_config(),
                           {"enabled": True, "loss": "l1", "levels": [1.0], "steps": 10, "blur": 0.0, **overrides})


def shot_from_a_perturbed_start(device: str = "cpu", backend: str = "torch"):
    """A textured blob, the true pose, its render (the query) and a start 1.5 deg and 0.04 off."""
    scene = random_scene().to(device)
    truth = camera()
    target = render(scene, torch.as_tensor(truth, dtype=torch.float32, device=device)[None],
                    torch.as_tensor(K, dtype=torch.float32, device=device), SIZE, SIZE,
                    backend=backend)[0].permute(2, 0, 1).clamp(0, 1)
    return scene, truth, target, perturbed(truth, degrees=1.5, shift=0.04)


def test_se3_exp_is_a_rotation_about_omega_and_a_shift_by_rho():
    assert torch.allclose(se3_exp(torch.zeros(6, dtype=torch.float64)), torch.eye(4, dtype=torch.float64))
    omega = np.array([0.1, -0.2, 0.3])
    T = se3_exp(torch.as_tensor(np.concatenate([[0.0, 0.0, 0.0], omega]))).numpy()
    np.testing.assert_allclose(T[:3, :3], Rotation.from_rotvec(omega).as_matrix(), atol=1e-12)
    T = se3_exp(torch.tensor([0.1, 0.2, -0.3, 0.0, 0.0, 0.0], dtype=torch.float64)).numpy()
    np.testing.assert_allclose(T[:3, 3], [0.1, 0.2, -0.3], atol=1e-12)


def test_increment_moves_the_camera_in_its_own_frame():
    w2c = torch.as_tensor(camera(), dtype=torch.float64)
    # +z in the camera frame moves the world towards the camera: the camera advances by 0.1 along its view axis
    moved = apply_increment(torch.tensor([0.0, 0.0, -0.1, 0.0, 0.0, 0.0], dtype=torch.float64), w2c).numpy()
    forward = w2c.numpy()[2, :3]
    centre_before = -w2c.numpy()[:3, :3].T @ w2c.numpy()[:3, 3]
    centre_after = -moved[:3, :3].T @ moved[:3, 3]
    np.testing.assert_allclose(centre_after - centre_before, 0.1 * forward, atol=1e-12)


def test_render_is_differentiable_in_the_pose():
    scene = random_scene()
    xi = torch.zeros(6, dtype=torch.float64, requires_grad=True)
    rgb = render(scene, apply_increment(xi, torch.as_tensor(camera()))[None], torch.as_tensor(K, dtype=torch.float32),
                 SIZE, SIZE, backend="torch")
    rgb.mean().backward()
    assert torch.isfinite(xi.grad).all() and xi.grad.abs().sum() > 0


@pytest.mark.parametrize("loss", ["l1", "l1_ssim"])
def test_lbfgs_refinement_walks_a_perturbed_pose_back(loss):
    scene = random_scene()
    truth = camera()
    target = render(scene, torch.as_tensor(truth, dtype=torch.float32)[None], torch.as_tensor(K, dtype=torch.float32),
                    SIZE, SIZE, backend="torch")[0].permute(2, 0, 1).clamp(0, 1)
    start = perturbed(truth, degrees=1.5, shift=0.04)
    refiner = PoseRefiner(scene, K, SIZE, SIZE, refine_cfg(loss=loss, steps=20), backend="torch")
    result = refiner.refine(target, start)
    assert result.loss_end < 0.3 * result.loss_start
    assert rotation_error_deg(result.w2c, truth) < 0.3 * rotation_error_deg(start, truth)
    assert center_error(result.w2c, truth) < 0.3 * center_error(start, truth)


def test_default_refinement_runs_coarse_to_fine_and_turns_a_perturbed_pose_back():
    """The default node: a half-size blurred level, then the full size, from where the first ended.

    On a dense, nearly opaque toy blob. The outline term compares alpha with the query's non-white
    mask, which a soft Gaussian edge widens by its faint tail, so on this 64 px toy it trades some
    camera distance for rotation; on trained splats of real objects it brings both closer
    (experiments/results/refine_c2f_cpu_*_2026-12-05.md)."""
    n = 3000
    scene = random_scene(n=n)
    scene.scales, scene.opacities = torch.full((n, 3), math.log(0.03)), torch.full((n,), 6.0)
    truth = camera()
    target = render(scene, torch.as_tensor(truth, dtype=torch.float32)[None], torch.as_tensor(K, dtype=torch.float32),
                    SIZE, SIZE, backend="torch")[0].permute(2, 0, 1).clamp(0, 1)
    start = perturbed(truth, degrees=1.5, shift=0.04)
    refiner = PoseRefiner(scene, K, SIZE, SIZE, default_refine_config(), backend="torch")
    assert [(level.width, level.steps) for level in refiner.levels] == [(SIZE // 2, 20), (SIZE, 30)]
    coarse = refiner.refine(target, start, levels=[0])
    both = refiner.refine(target, start)
    assert both.steps > coarse.steps > 0
    assert rotation_error_deg(both.w2c, truth) < 0.7 * rotation_error_deg(start, truth)


def test_refiner_renders_what_render_gives():
    """The refiner activates the scene once and hands the rasterizer its world covariances: its renders and
    their gradients in the pose must equal ``render``'s bit for bit (the render stage draws the reference
    with ``render``); colours fixed at a pose render that pose as its SH do."""
    scene = random_scene()
    scene.shN = torch.randn(len(scene.means), 3, 3) * 0.2  # SH degree 1: view-dependent colours
    refiner = PoseRefiner(scene, K, SIZE, SIZE, refine_cfg(), backend="torch")
    level = refiner.levels[0]
    w2c = torch.tensor(camera(), dtype=torch.float64, requires_grad=True)
    rgb, alpha = refiner._render(w2c, level)
    expected_rgb, expected_alpha = render(scene, w2c[None], level.K, SIZE, SIZE, backend="torch", return_alpha=True)
    assert torch.equal(rgb, expected_rgb.permute(0, 3, 1, 2)) and torch.equal(alpha, expected_alpha.permute(0, 3, 1, 2))
    grad = torch.autograd.grad(rgb.square().sum() + alpha.sum(), w2c)[0]
    expected_grad = torch.autograd.grad(expected_rgb.square().sum() + expected_alpha.sum(), w2c)[0]
    assert torch.equal(grad, expected_grad) and grad.abs().sum() > 0
    fixed_rgb, _ = refiner._render(w2c, level, refiner.scene.colours(w2c.detach()))
    assert torch.equal(fixed_rgb, rgb)


def test_early_stop_ends_levels_sooner_and_still_walks_the_pose_back():
    """With ``stop_patience`` a level ends once its loss stops falling: fewer renders than its iteration
    budget, and the pose still comes back. ``first_step`` keeps the first probe near the start pose."""
    scene = random_scene()
    truth = camera()
    target = render(scene, torch.as_tensor(truth, dtype=torch.float32)[None], torch.as_tensor(K, dtype=torch.float32),
                    SIZE, SIZE, backend="torch")[0].permute(2, 0, 1).clamp(0, 1)
    start = perturbed(truth, degrees=1.5, shift=0.04)
    full = PoseRefiner(scene, K, SIZE, SIZE, refine_cfg(steps=30, stop_patience=0), backend="torch")
    early = PoseRefiner(scene, K, SIZE, SIZE, refine_cfg(steps=30, stop_patience=4, stop_tolerance=1e-3,
                                                         first_step=0.01, rotation_centre="camera"), backend="torch")
    probes = []
    render_pose = early._render
    early._render = lambda w2c, level, colours=None: probes.append(w2c.detach().numpy()) or render_pose(w2c, level,
                                                                                                        colours)
    full_result, early_result = full.refine(target, start), early.refine(target, start)
    assert early_result.steps < full_result.steps
    assert rotation_error_deg(early_result.w2c, truth) < 0.3 * rotation_error_deg(start, truth)
    assert center_error(early_result.w2c, truth) < 0.3 * center_error(start, truth)
    assert rotation_error_deg(probes[1], start) <= math.degrees(0.01) + 1e-9


def test_object_centred_increments_turn_about_the_object():
    """``rotation_centre: object``: a pure turn leaves the object's centre where it was in the image, and a
    perturbed pose still comes back (that it takes fewer renders on trained splats is measured in
    experiments/results/refine_speed_cpu_2026-12-05.md)."""
    scene = random_scene()
    truth = camera()
    refiner = PoseRefiner(scene, K, SIZE, SIZE, refine_cfg(rotation_centre="object"), backend="torch")
    w2c = torch.as_tensor(truth, dtype=torch.float64)
    pose_at = refiner._pose_map(w2c)
    assert torch.equal(pose_at(torch.zeros(6, dtype=torch.float64)), w2c)
    turned = pose_at(torch.tensor([0.0, 0.0, 0.0, 0.02, -0.03, 0.01], dtype=torch.float64))
    centre = torch.cat([refiner.scene.centre, torch.ones(1, dtype=torch.float64)])
    before, after = (w2c @ centre)[:3], (turned @ centre)[:3]
    assert torch.allclose(before, after, atol=1e-12) and rotation_error_deg(turned.numpy(), truth) > 1.0

    target = render(scene, torch.as_tensor(truth, dtype=torch.float32)[None], torch.as_tensor(K, dtype=torch.float32),
                    SIZE, SIZE, backend="torch")[0].permute(2, 0, 1).clamp(0, 1)
    start = perturbed(truth, degrees=1.5, shift=0.04)
    result = PoseRefiner(scene, K, SIZE, SIZE, refine_cfg(steps=30, rotation_centre="object"),
                         backend="torch").refine(target, start)
    assert rotation_error_deg(result.w2c, truth) < 0.3 * rotation_error_deg(start, truth)
    assert center_error(result.w2c, truth) < 0.3 * center_error(start, truth)


def test_central_differences_walk_a_perturbed_pose_back_to_where_autograd_does():
    """The CUDA default's gradients (central differences of forward renders), run here on the torch
    rasterizer: they must follow the loss as autograd's do, to the true pose."""
    scene, truth, target, start = shot_from_a_perturbed_start()
    for gradients in ("autograd", "differences"):
        result = PoseRefiner(scene, K, SIZE, SIZE, refine_cfg(steps=30, gradients=gradients),
                             backend="torch").refine(target, start)
        assert rotation_error_deg(result.w2c, truth) < 0.02, gradients  # from 1.5 deg
        assert center_error(result.w2c, truth) < 0.02 * center_error(start, truth), gradients
    assert not PoseRefiner(scene, K, SIZE, SIZE, refine_cfg(), backend="torch").differences  # CPU: autograd


def test_adam_refinement_lowers_the_loss():
    scene = random_scene()
    truth = camera()
    target = render(scene, torch.as_tensor(truth, dtype=torch.float32)[None], torch.as_tensor(K, dtype=torch.float32),
                    SIZE, SIZE, backend="torch")[0].permute(2, 0, 1).clamp(0, 1)
    refiner = PoseRefiner(scene, K, SIZE, SIZE, refine_cfg(optimizer="adam", steps=8, lr=3e-3), backend="torch")
    result = refiner.refine(target, perturbed(truth, degrees=1.5, shift=0.04))
    assert result.steps == 8 and result.loss_end < 0.7 * result.loss_start


def test_keep_best_never_returns_a_worse_pose_than_the_start():
    scene = random_scene()
    truth = camera()
    target = render(scene, torch.as_tensor(truth, dtype=torch.float32)[None], torch.as_tensor(K, dtype=torch.float32),
                    SIZE, SIZE, backend="torch")[0].permute(2, 0, 1).clamp(0, 1)
    # Adam with a huge step size overshoots at once; keep_best must then return the start pose itself
    refiner = PoseRefiner(scene, K, SIZE, SIZE, refine_cfg(optimizer="adam", steps=3, lr=0.5), backend="torch")
    result = refiner.refine(target, truth)
    assert result.loss_end <= result.loss_start
    np.testing.assert_allclose(result.w2c, truth, atol=1e-9)


def test_lower_render_scale_keeps_the_camera_geometry():
    """At scale 0.5 the refiner renders a 32x32 image of the same view: a 2x2 box filter of the full one."""
    scene = random_scene()
    level = PoseRefiner(scene, K, SIZE, SIZE, refine_cfg(levels=[0.5]), backend="torch").levels[0]
    assert (level.width, level.height) == (SIZE // 2, SIZE // 2)
    full = render(scene, torch.as_tensor(camera(), dtype=torch.float32)[None], torch.as_tensor(K, dtype=torch.float32),
                  SIZE, SIZE, backend="torch")[0]
    half = render(scene, torch.as_tensor(camera(), dtype=torch.float32)[None], level.K, 32, 32, backend="torch")[0]
    pooled = torch.nn.functional.avg_pool2d(full.permute(2, 0, 1)[None], 2)[0].permute(1, 2, 0)
    assert (half - pooled).abs().mean() < 0.05


def test_max_size_refines_a_large_image_at_the_render_sizes_of_a_small_one():
    """refine.max_size: every level but the last is a fraction of the image fitted into max_size px (cost
    grows with pixels); the last renders at the image's size; an image within the cap refines as it was."""
    scene, truth, target, start = shot_from_a_perturbed_start()
    capped = PoseRefiner(scene, K, SIZE, SIZE, refine_cfg(levels=[0.5, 1.0, 1.0], steps=10, max_size=48),
                         backend="torch")
    assert [(level.width, level.height) for level in capped.levels] == [(24, 24), (48, 48), (SIZE, SIZE)]
    assert torch.allclose(capped.levels[1].K[:2], torch.as_tensor(K[:2] * 48 / SIZE, dtype=torch.float32))
    uncapped = PoseRefiner(scene, K, SIZE, SIZE, refine_cfg(levels=[0.5, 1.0], max_size=2 * SIZE), backend="torch")
    assert [(level.width, level.height) for level in uncapped.levels] == [(SIZE // 2, SIZE // 2), (SIZE, SIZE)]
    assert rotation_error_deg(capped.refine(target, start).w2c, truth) < 0.5 * rotation_error_deg(start, truth)
    # auto: capped where a render's cost follows its pixels (the CPU), not where small renders are launch-bound
    assert resolve_max_size("auto", torch.device("cpu")) == CPU_MAX_SIZE
    assert resolve_max_size("auto", torch.device("cuda")) is None


def test_enclosed_white_is_the_white_the_part_surrounds():
    """A grey ring on white with a white highlight on it: the bore and the highlight are enclosed; the background
    and a white notch cut into the ring from outside are not."""
    image = torch.ones(3, 40, 40)
    y, x = torch.meshgrid(torch.arange(40.0), torch.arange(40.0), indexing="ij")
    radius = ((y - 20) ** 2 + (x - 20) ** 2).sqrt()
    image[:, (radius < 15) & (radius >= 5)] = 0.4
    image[:, 18:20, 30:33] = 1.0  # the highlight, on the ring
    image[:, 19:21, 5:8] = 1.0  # a notch into the ring's outer edge
    enclosed = enclosed_white_mask(image)
    bore = radius < 5
    highlight = torch.zeros(40, 40, dtype=torch.bool)
    highlight[18:20, 30:33] = True
    assert torch.equal(enclosed, bore | highlight)
    assert not enclosed[0, 0] and not enclosed[19, 6]


def textured_plate(n: int = 48, half: float = 0.8) -> Gaussians:
    """An opaque flat square of n x n small Gaussians of random colours in the plane z = 0: a crisp outline."""
    rng = np.random.default_rng(0)
    grid = np.linspace(-half, half, n)
    x, y = np.meshgrid(grid, grid)
    spacing = 2 * half / (n - 1)
    return Gaussians(
        means=torch.as_tensor(np.stack([x.ravel(), y.ravel(), np.zeros(n * n)], 1), dtype=torch.float32),
        quats=torch.tensor([[1.0, 0.0, 0.0, 0.0]]).repeat(n * n, 1),
        scales=torch.log(torch.tensor([[0.6 * spacing, 0.6 * spacing, 0.2 * spacing]])).repeat(n * n, 1),
        opacities=torch.full((n * n,), 6.0),
        sh0=rgb_to_sh0(torch.as_tensor(0.2 + 0.5 * rng.random((n * n, 3)), dtype=torch.float32))[:, None],
        shN=torch.zeros(n * n, 0, 3),
    )


def test_enclosed_white_costs_nothing_and_changes_nothing_where_there_is_none():
    """The query is a plate at its true pose with a patch inside it blown out to white. Read as background the
    patch costs the true pose as much as the part covering the background would; read as unknown it costs
    (about) nothing. A query without enclosed white refines to the same pose, to the last bit, under both settings."""
    scene, truth = textured_plate(), camera()
    clean = render(scene, torch.as_tensor(truth, dtype=torch.float32)[None], torch.as_tensor(K, dtype=torch.float32),
                   SIZE, SIZE, backend="torch")[0].permute(2, 0, 1).clamp(0, 1)
    blown = clean.clone()
    blown[:, 25:37, 28:40] = 1.0  # inside the plate (rows 5-58, columns 10-58 of the image)
    assert enclosed_white_mask(clean).sum() == 0 and enclosed_white_mask(blown)[25:37, 28:40].all()
    start = perturbed(truth, degrees=1.5, shift=0.04)
    loss, pose = {}, {}
    for mode in ("background", "unknown"):
        refiner = PoseRefiner(scene, K, SIZE, SIZE, OmegaConf.merge(default_refine_config(), {"enclosed_white": mode}),
                              backend="torch")
        finest = len(refiner.levels) - 1
        (loss[mode, "clean"], loss[mode, "blown"]), = zip(*(refiner.losses_at(q, [truth], finest) for q in (clean, blown)))
        pose[mode] = refiner.refine(clean, start).w2c
    extra = {mode: loss[mode, "blown"] - loss[mode, "clean"] for mode in ("background", "unknown")}
    assert extra["background"] > loss["background", "clean"]  # (the clean loss: the soft edge's outline term)
    assert abs(extra["unknown"]) < 0.1 * extra["background"]  # (what is left: the blur mixes the patch's edge)
    assert np.array_equal(pose["background"], pose["unknown"])
    assert rotation_error_deg(pose["unknown"], truth) < 0.5 * rotation_error_deg(start, truth)


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="refine.loss='ncc' is unknown"):
        check_refine_config(refine_cfg(loss="ncc"))
    with pytest.raises(ValueError, match="refine.optimizer='sgd' is unknown"):
        check_refine_config(refine_cfg(optimizer="sgd"))
    with pytest.raises(ValueError, match="refine.steps must be >= 1"):
        check_refine_config(refine_cfg(steps=0))
    with pytest.raises(ValueError, match="refine.steps has 3 entries for 2 levels"):
        check_refine_config(refine_cfg(levels=[0.5, 1.0], steps=[5, 5, 5]))
    with pytest.raises(ValueError, match=r"refine.levels must be in \(0, 1\]"):
        check_refine_config(refine_cfg(levels=[2.0]))
    with pytest.raises(ValueError, match="refine.rotation_centre='world' is unknown"):
        check_refine_config(refine_cfg(rotation_centre="world"))
    with pytest.raises(ValueError, match="refine.gradients='numeric' is unknown"):
        check_refine_config(refine_cfg(gradients="numeric"))
    with pytest.raises(ValueError, match="refine.first_step must be > 0"):
        check_refine_config(refine_cfg(first_step=0.0))
    with pytest.raises(ValueError, match="refine.stop_patience and refine.stop_tolerance must be >= 0"):
        check_refine_config(refine_cfg(stop_patience=-1))
    with pytest.raises(ValueError, match="refine.max_size must be auto, null .* or a number of px >= 16"):
        check_refine_config(refine_cfg(max_size=8))
    with pytest.raises(ValueError, match="refine.enclosed_white='part' is unknown"):
        check_refine_config(refine_cfg(enclosed_white="part"))
    with pytest.raises(ValueError, match="refine.recovery.when_neither_lines_up='best' is unknown"):
        check_refine_config(refine_cfg(recovery={"when_neither_lines_up": "best"}))
    with pytest.raises(ValueError, match="refine.second_opinion.recovered_hypotheses must be a number"):
        check_refine_config(refine_cfg(second_opinion={"recovered_hypotheses": 0}))
    with pytest.raises(ValueError, match="refine.bench.rounds must be >= 1"):
        check_refine_config(refine_cfg(bench={"enabled": True, "rounds": 0}))
    with pytest.raises(ValueError, match="refine.loss=feature needs a scorer with a backbone"):
        PoseRefiner(random_scene(), K, SIZE, SIZE, refine_cfg(loss="feature"), backend="torch", scorer=None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_refinement_through_gsplat_on_cuda():
    """gsplat's rasterizer is differentiable in viewmats: the refiner must work on it as on the torch one."""
    scene, truth, target, start = shot_from_a_perturbed_start("cuda", "gsplat")
    result = PoseRefiner(scene, K, SIZE, SIZE, refine_cfg(steps=20, gradients="autograd"),
                         backend="gsplat").refine(target, start)
    assert rotation_error_deg(result.w2c, truth) < 0.3 * rotation_error_deg(start, truth)
    assert center_error(result.w2c, truth) < 0.3 * center_error(start, truth)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_refinement_on_cuda_gives_the_same_pose_every_time():
    """gsplat's backward sums in a different order on every call; the default refinement on CUDA does
    not use it (central differences of forward renders), so one query refined twice lands on the very
    same pose, bit for bit."""
    scene, truth, target, start = shot_from_a_perturbed_start("cuda", "gsplat")
    refiner = PoseRefiner(scene, K, SIZE, SIZE, refine_cfg(steps=20), backend="gsplat")
    assert refiner.differences
    first, second = refiner.refine(target, start), refiner.refine(target, start)
    assert np.array_equal(first.w2c, second.w2c)
    assert rotation_error_deg(first.w2c, truth) < 0.3 * rotation_error_deg(start, truth)


def test_refine_stage_refines_localized_queries_recovers_failed_ones_and_reuses_its_file(tmp_path):
    """The pipeline's refine stage: a localized query's pose moves towards the truth (path "pnp"); a query
    PnP failed on is recovered through the splats from the reference views (path "recovered", within a
    degree); a finished stage folder is reused without rendering; with recovery off the failed query
    keeps its fallback pose and is marked failed."""
    from types import SimpleNamespace

    from PIL import Image

    from splatpose.refine import refine_query_poses
    from splatpose.sfm.localization import QueryPose
    from splatpose.splat.ply import save_ply

    scene = random_scene(n=1500)
    ply = save_ply(scene, tmp_path / "scene.ply")

    def saved(w2c: np.ndarray, path) -> SimpleNamespace:
        rgb = render(scene, torch.as_tensor(w2c, dtype=torch.float32)[None], torch.as_tensor(K, dtype=torch.float32),
                     SIZE, SIZE, backend="torch")[0].clamp(0, 1)
        Image.fromarray((rgb.numpy() * 255).round().astype(np.uint8)).save(path)
        return SimpleNamespace(path=path, w2c=w2c)

    train = [saved(camera(yaw_deg=float(y)), tmp_path / f"train{y}.png") for y in range(-90, 91, 30)]
    truths = [camera(yaw_deg=20.0), camera(yaw_deg=-45.0)]
    tests = [saved(truth, tmp_path / f"{i}.png") for i, truth in enumerate(truths)]
    data = SimpleNamespace(K=K, width=SIZE, height=SIZE, test=tests, train=train,
                           train_w2c=np.stack([view.w2c for view in train]))
    starts = [perturbed(truth, degrees=1.5, shift=0.04, seed=i) for i, truth in enumerate(truths)]
    fallback = camera(yaw_deg=-30.0)
    poses = [QueryPose("0.png", starts[0], success=True, num_inliers=50, num_matches=60, retrieved=[]),
             QueryPose("1.png", fallback, success=False, num_inliers=3, num_matches=5, retrieved=[],
                       fallback="retrieved_db_pose")]

    # acceptance bounds for this toy's soft 64 px renders (see tests/test_recovery.py: recovery_cfg)
    toy = {"recovery": {"min_iou": 0.8, "max_l1": 0.12}}
    refined = refine_query_poses(data, poses, refine_cfg(steps=20, **toy), ply, tmp_path / "stage", "cpu",
                                 backend="torch")
    assert refined[0].path == "pnp" and refined[0].refined and refined[0].refinement["steps"] > 0
    assert rotation_error_deg(refined[0].w2c, truths[0]) < 0.3 * rotation_error_deg(starts[0], truths[0])
    assert refined[1].path == "recovered" and refined[1].localized and refined[1].recovery["accepted"]
    assert rotation_error_deg(refined[1].w2c, truths[1]) < 1.0
    assert refined[1].confidence["iou"] >= 0.8

    ply.unlink()  # a reused stage must not need the scene
    again = refine_query_poses(data, poses, refine_cfg(steps=20, **toy), ply, tmp_path / "stage", "cpu",
                               backend="torch")
    assert [r.to_json() for r in again] == [r.to_json() for r in refined]

    save_ply(scene, ply)
    no_recovery = refine_query_poses(data, poses, refine_cfg(steps=20, recovery={"enabled": False}), ply, None,
                                     "cpu", backend="torch")
    assert no_recovery[1].path == "failed" and not no_recovery[1].localized
    assert np.array_equal(no_recovery[1].w2c, fallback)

    off = refine_query_poses(data, poses, refine_cfg(enabled=False), ply, None, "cpu")
    assert not any(r.refined for r in off) and np.array_equal(off[0].w2c, starts[0])
    assert [r.path for r in off] == ["pnp", "failed"]
