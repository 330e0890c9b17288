"""Near-symmetric turns: finding them on the splats, and telling a wrong turn from the right pose.

The scene is a six-toothed wheel of small opaque Gaussians about the y axis (the axis the toy cameras
of tests/test_refine.py circle), grey-blue except one red patch: its shape is the same turned by every
60 degrees, and only the patch's colour tells those turns apart.
"""

import math

import numpy as np
import torch
from omegaconf import OmegaConf

from splatpose.data.cameras import rotation_error_deg
from splatpose.refine.pose_refinement import PoseRefiner
from splatpose.refine.queries import default_refine_config
from splatpose.refine.symmetry import NearSymmetry, SymmetryCheck, TurnPolish, axis_of_most_turns, near_symmetries
from splatpose.splat.gaussians import Gaussians, rgb_to_sh0
from test_recovery import shot
from test_refine import K, SIZE, camera, random_scene, refine_cfg


def toothed_wheel(n: int = 3000, teeth: int = 6, seed: int = 0) -> Gaussians:
    """Gaussians on the side and caps of a wheel of radius 0.5 + 0.1 cos(teeth * theta), height 0.5, axis y."""
    rng = np.random.default_rng(seed)
    theta = rng.uniform(0.0, 2 * math.pi, n)
    on_cap = rng.random(n) < 0.3
    radius = 0.5 + 0.1 * np.cos(teeth * theta)
    r = np.where(on_cap, radius * np.sqrt(rng.random(n)), radius)
    y = np.where(on_cap, np.where(rng.random(n) < 0.5, -0.25, 0.25), rng.uniform(-0.25, 0.25, n))
    means = np.stack([r * np.cos(theta), y, r * np.sin(theta)], axis=1)
    colours = np.tile([0.35, 0.45, 0.7], (n, 1))
    colours[(theta < math.radians(40)) & ~on_cap] = [0.9, 0.15, 0.1]
    return Gaussians(
        means=torch.as_tensor(means, dtype=torch.float32),
        quats=torch.tensor([[1.0, 0.0, 0.0, 0.0]]).repeat(n, 1),
        scales=torch.full((n, 3), math.log(0.045)),
        opacities=torch.full((n,), 4.0),
        sh0=rgb_to_sh0(torch.as_tensor(colours, dtype=torch.float32))[:, None],
        shN=torch.zeros(n, 0, 3),
    )


def lumpy_object(n: int = 3000, seed: int = 0) -> Gaussians:
    """Gaussians on the surfaces of five spheres of different sizes at random places: no near-symmetry."""
    rng = np.random.default_rng(seed)
    centres, radii = rng.uniform(-0.4, 0.4, (5, 3)), rng.uniform(0.15, 0.4, 5)
    sphere = rng.integers(0, 5, n)
    directions = rng.normal(size=(n, 3))
    means = centres[sphere] + radii[sphere, None] * directions / np.linalg.norm(directions, axis=1, keepdims=True)
    return Gaussians(means=torch.as_tensor(means, dtype=torch.float32), quats=torch.tensor([[1.0, 0, 0, 0]]).repeat(n, 1),
                     scales=torch.full((n, 3), math.log(0.04)), opacities=torch.full((n,), 4.0),
                     sh0=torch.zeros(n, 1, 3), shN=torch.zeros(n, 0, 3))


def symmetry_cfg(**overrides):
    return OmegaConf.merge(default_refine_config().symmetry, overrides)


def turns_about(symmetries: list[NearSymmetry], axis: np.ndarray) -> list[float]:
    """Angles (degrees in [0, 360)) of the turns about ``axis`` (either direction of it)."""
    angles = []
    for s in symmetries:
        cosine = float(np.dot(s.axis, axis))
        if abs(cosine) > math.cos(math.radians(3)):
            angles.append(s.angle_deg % 360 if cosine > 0 else (360 - s.angle_deg) % 360)
    return sorted(angles)


def test_the_turns_of_a_toothed_wheel_are_found_and_a_lumpy_object_has_none():
    found = near_symmetries(toothed_wheel(), symmetry_cfg())
    about_y = turns_about(found, np.array([0.0, 1.0, 0.0]))
    teeth = (60, 120, 180, 240, 300)
    for tooth in teeth:
        assert min(abs(a - tooth) for a in about_y) <= symmetry_cfg().step_deg, (tooth, about_y)
    assert all(min(abs(a - t) for t in teeth) <= symmetry_cfg().step_deg for a in about_y), about_y
    assert near_symmetries(lumpy_object(), symmetry_cfg()) == []


def test_a_turn_maps_the_scene_onto_itself_as_the_camera_sees_it():
    """turn_camera: rendering the scene at the turned camera equals rendering the turned scene at the camera."""
    scene = random_scene(n=300)
    turn = NearSymmetry((0.0, 1.0, 0.0), 70.0, (0.1, 0.0, -0.1), 1.0)
    transform = torch.as_tensor(turn.world_transform(), dtype=torch.float32)
    moved = Gaussians(means=scene.means @ transform[:3, :3].T + transform[:3, 3], quats=scene.quats,
                      scales=torch.full_like(scene.scales, math.log(0.06)), opacities=scene.opacities,
                      sh0=scene.sh0, shN=scene.shN)  # isotropic Gaussians: turning them needs no new quats
    scene.scales = moved.scales
    w2c = camera(yaw_deg=10.0)
    np.testing.assert_allclose(shot(scene, turn.turn_camera(w2c)), shot(moved, w2c), atol=2e-3)


def test_a_wrong_turn_is_replaced_by_the_right_pose_and_the_right_pose_is_kept():
    scene = toothed_wheel()
    symmetries = near_symmetries(scene, symmetry_cfg())
    truth = camera(yaw_deg=150.0)  # looking at the red patch
    query = torch.as_tensor(shot(scene, truth)).permute(2, 0, 1)
    refiner = PoseRefiner(scene, K, SIZE, SIZE, refine_cfg(), backend="torch")
    check = SymmetryCheck(refiner, symmetries, symmetry_cfg(), K, backend="torch")
    tooth = next(s for s in symmetries if abs(abs(s.axis[1]) - 1) < 0.01 and 100 <= s.angle_deg <= 140)
    # the check sees settled poses: refined by the same refiner
    wrong = refiner.refine(query, tooth.turn_camera(truth)).w2c
    assert rotation_error_deg(wrong, truth) > 100  # a wrong turn whose outline lines up
    right = refiner.refine(query, truth).w2c

    verdict = check.check(query, wrong)
    assert verdict.switched and rotation_error_deg(verdict.w2c, truth) < 1.0, verdict.summary()
    kept = check.check(query, right)
    assert not kept.switched and np.array_equal(kept.w2c, right), kept.summary()


def test_the_wheels_own_axis_is_the_one_most_turns_are_about():
    symmetries = near_symmetries(toothed_wheel(), symmetry_cfg())
    assert abs(axis_of_most_turns(symmetries).axis[1]) > 0.99, [s.summary() for s in symmetries]
    flip = NearSymmetry((1.0, 0.0, 0.0), 180.0, (0.0, 0.0, 0.0), 0.1)  # one turn about x, lower misfit
    assert axis_of_most_turns([flip] + symmetries) is not flip


def test_the_turn_polish_settles_a_turn_about_the_axis_and_keeps_a_right_pose():
    """A pose 2 deg off about the wheel's axis (only the red patch tells) comes back to within 0.3 deg; the
    right pose stays exactly as it was."""
    scene = toothed_wheel()
    axis = axis_of_most_turns(near_symmetries(scene, symmetry_cfg()))
    truth = camera(yaw_deg=150.0)  # looking at the red patch
    query = torch.as_tensor(shot(scene, truth)).permute(2, 0, 1)
    polish = TurnPolish(PoseRefiner(scene, K, SIZE, SIZE, refine_cfg(), backend="torch"), axis, 3.0, 0.25)
    off = NearSymmetry(axis.axis, 2.0, axis.centre, axis.misfit).turn_camera(truth)
    assert rotation_error_deg(off, truth) > 1.9

    polished, record = polish.polish(query, off)
    assert rotation_error_deg(polished, truth) < 0.3, record
    assert record["loss_after"] < record["loss_before"] and record["renders"] == 13, record
    kept, record = polish.polish(query, truth)
    assert record["turn_deg"] == 0.0 and np.array_equal(kept, truth), record


def test_the_settler_polishes_last_and_records_it_only_when_asked():
    from splatpose.refine.queries import PoseSettler
    from splatpose.sfm.localization import QueryPose

    scene = toothed_wheel()
    truth = camera(yaw_deg=150.0)
    query = torch.as_tensor(shot(scene, truth)).permute(2, 0, 1)
    axis = axis_of_most_turns(near_symmetries(scene, symmetry_cfg()))
    off = NearSymmetry(axis.axis, 2.0, axis.centre, axis.misfit).turn_camera(truth)
    pnp = QueryPose("q.png", off, True, 60, 80, [])

    def settled(span):
        cfg = OmegaConf.merge(refine_cfg(), {"recovery": {"enabled": False}, "second_opinion": {"enabled": False},
                                             "symmetry": {"polish_span_deg": span}})
        return PoseSettler(scene, K, SIZE, SIZE, cfg, truth[None], backend="torch").settle(query, pnp)

    polished = settled(3.0)
    assert polished.turn_polish is not None and polished.to_json()["turn_polish"] == polished.turn_polish
    assert rotation_error_deg(polished.w2c, truth) < 0.3, polished.turn_polish
    assert settled(None).turn_polish is None
