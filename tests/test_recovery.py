"""Pose recovery through the splats: silhouette search, the 2D-similarity-to-pose step, render-and-compare.

The scene is a small random Gaussian blob (tests/test_refine.py) rendered at known poses: its renders
are the reference views and the queries, so every true pose is known exactly.
"""

import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from splatpose.data.cameras import center_error, rotation_error_deg
from splatpose.refine.pose_refinement import PoseRefiner
from splatpose.refine.queries import default_refine_config
from splatpose.refine.recovery import (PoseRecovery, alignment_confidence, foreground_mask, orbit_views,
                                       pose_from_similarity, render_search_views, screened_search,
                                       search_similarities, silhouette_moments, SCREEN_FACTOR)
from splatpose.splat.rendering import render
from test_refine import K, SIZE, camera, random_scene, textured_plate


def rolled(w2c: np.ndarray, degrees: float) -> np.ndarray:
    """The same camera rotated about its optical axis (the image turns by ``degrees``)."""
    a = math.radians(degrees)
    roll = np.eye(4)
    roll[:2, :2] = [[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]]
    return roll @ w2c


def shot(scene, w2c: np.ndarray) -> np.ndarray:
    """[H, W, 3] float32 render of the scene on white."""
    with torch.no_grad():
        rgb = render(scene, torch.as_tensor(w2c, dtype=torch.float32), torch.as_tensor(K, dtype=torch.float32),
                     SIZE, SIZE, backend="torch")
    return rgb[0].clamp(0, 1).numpy()


def recovery_cfg(**overrides):
    """The default recovery at this toy's scale: 64 px renders of a loose blob of Gaussians have a soft,
    speckled fringe, so even the true pose reaches IoU ~0.85 and colour difference ~0.1 (the defaults'
    thresholds are set on the generated classes); the acceptance bounds here sit between the true
    pose's and a wrong pose's (0.83, 0.16)."""
    return OmegaConf.merge(default_refine_config().recovery,
                           {"search_size": 32, "min_iou": 0.8, "max_l1": 0.12, **overrides})


def reference_views(scene, yaws=range(-90, 91, 30)):
    """Search views rendered at cameras every 30 degrees of yaw (no orbits)."""
    poses = np.stack([camera(yaw_deg=float(y)) for y in yaws])
    return render_search_views(scene, K, SIZE, SIZE, poses, search_size=32, backend="torch"), poses


def test_orbits_keep_the_distance_to_the_object_and_look_at_it():
    reference = camera(yaw_deg=10.0)
    centre = np.zeros(3)
    views = orbit_views(reference[None], centre, [-8.0, 0.0, 8.0])
    assert len(views) == 9 and np.allclose(views[4], reference)
    for view in views:
        eye = -view[:3, :3].T @ view[:3, 3]
        assert np.isclose(np.linalg.norm(eye - centre), np.linalg.norm(-reference[:3, :3].T @ reference[:3, 3]))
        assert rotation_error_deg(view, reference) <= 8.0 * math.sqrt(2) + 1e-6
    # the centre stays where it projects in the reference view (its optical axis passes near the object)
    depth_ref = (reference @ np.append(centre, 1.0))[:3]
    for view in views:
        in_view = (view @ np.append(centre, 1.0))[:3]
        assert np.allclose(in_view[:2] / in_view[2], depth_ref[:2] / depth_ref[2], atol=1e-9)


def test_moments_of_a_square():
    mask = torch.zeros(1, 1, 10, 20)
    mask[0, 0, 2:6, 4:8] = 1.0
    centroid, area = silhouette_moments(mask)
    assert float(area[0]) == 16.0
    assert torch.allclose(centroid[0], torch.tensor([6.0, 4.0]))


def test_similarity_pose_reproduces_a_rolled_and_moved_camera():
    """Rolling the reference camera by 40 degrees and moving it closer is exactly what the 2D similarity
    (roll, scale, centroid shift) of the object's image describes, for an object at the image centre."""
    scene = random_scene(n=1500)
    reference = camera(yaw_deg=0.0)
    truth = rolled(reference, 40.0)
    truth[2, 3] -= 0.4  # 0.4 closer: the object looks larger
    masks = foreground_mask(torch.as_tensor(np.stack([shot(scene, reference), shot(scene, truth)])).permute(0, 3, 1, 2))
    centroids, areas = silhouette_moments(masks)
    depth = float(np.linalg.norm(reference[:3, 3]))
    pose = pose_from_similarity(reference, K, centroids[0].numpy(), centroids[1].numpy(), math.radians(40.0),
                                float(torch.sqrt(areas[1] / areas[0])), depth)
    assert rotation_error_deg(pose, truth) < 2.0
    assert center_error(pose, truth) < 0.15


def test_search_finds_the_view_and_roll():
    scene = random_scene(n=1500)
    views, poses = reference_views(scene)
    query = torch.as_tensor(shot(scene, rolled(camera(yaw_deg=60.0), -70.0))).permute(2, 0, 1)
    best = search_similarities(query, views, rolls=36, keep=3, colour_weight=0.5)[0]
    assert best.view == 5  # yaw 60
    roll_error = (math.degrees(best.roll) + 70.0 + 180.0) % 360.0 - 180.0
    assert abs(roll_error) <= 10.0


def test_screened_search_keeps_the_best_view_of_the_full_search():
    scene = random_scene(n=1500)
    views, _ = reference_views(scene, yaws=range(-90, 91, 15))  # 13 views
    query = torch.as_tensor(shot(scene, rolled(camera(yaw_deg=45.0), 30.0))).permute(2, 0, 1)
    full = search_similarities(query, views, rolls=36, keep=2, colour_weight=0.5)
    screened = screened_search(query, views, views.coarser(SCREEN_FACTOR), screen_views=4, rolls=36, keep=2,
                               colour_weight=0.5)
    assert [(h.view, h.roll) for h in screened] == [(h.view, h.roll) for h in full]
    assert full[0].view == 9  # yaw 45: a view index of the reference, not of the screened subset


# The PoseRefiner's search the recovery runs: the default (turns about the object, bounded first step,
# early stop) and the one of runs whose node predates those keys (turns about the camera, torch's steps).
OBJECT_SEARCH = {"rotation_centre": "object", "first_step": 0.01, "stop_patience": 4, "stop_tolerance": 1e-3,
                 "colours_per_level": True}
CAMERA_SEARCH = {"rotation_centre": "camera", "first_step": None, "stop_patience": None, "stop_tolerance": None,
                 "colours_per_level": None}


@pytest.mark.parametrize("search", [CAMERA_SEARCH, OBJECT_SEARCH], ids=["camera", "object"])
def test_recovery_turns_a_far_pose_into_an_accurate_one(search):
    """A query 15 degrees of yaw away from the nearest reference view and rolled by 50 degrees: no start
    pose at all, and the recovered pose is within 1 degree."""
    scene = random_scene(n=1500)
    views, _ = reference_views(scene)
    truth = rolled(camera(yaw_deg=45.0), 50.0)
    query = torch.as_tensor(shot(scene, truth)).permute(2, 0, 1)
    recovery = PoseRecovery(scene, K, SIZE, SIZE, views, recovery_cfg(**search), backend="torch")
    assert all(recovery.refiner.cfg.get(key) == value for key, value in search.items())
    result = recovery.recover(query)
    assert result.accepted, result.summary()
    assert rotation_error_deg(result.w2c, truth) < 1.0, result.summary()
    assert result.searches == 1  # lined up at the first try: no second search


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_recovery_on_cuda_takes_a_query_on_the_gpu():
    """The detector hands the recovery its query on the GPU (the search views stay on the host)."""
    scene = random_scene(n=1500)
    views, _ = reference_views(scene)
    truth = rolled(camera(yaw_deg=45.0), 50.0)
    query = torch.as_tensor(shot(scene, truth)).permute(2, 0, 1)
    recovery = PoseRecovery(scene.to("cuda"), K, SIZE, SIZE, views, recovery_cfg(**OBJECT_SEARCH), backend="auto")
    result = recovery.recover(query.cuda())
    assert result.accepted, result.summary()
    assert rotation_error_deg(result.w2c, truth) < 1.0, result.summary()


def test_a_blown_out_highlight_lowers_the_alignment_only_while_enclosed_white_counts_as_background():
    """The plate at its true pose with a patch inside it blown out to white: read as background the patch leaves
    the render's silhouette uncovered by the query's and adds its colour difference; read as unknown
    (``refine.enclosed_white``) the pose lines up as well as on the clean query."""
    scene, truth = textured_plate(), camera()
    clean = torch.as_tensor(shot(scene, truth)).permute(2, 0, 1)
    blown = clean.clone()
    blown[:, 25:37, 28:40] = 1.0
    on_clean = alignment_confidence(scene, truth, clean, K, "torch")
    as_background = alignment_confidence(scene, truth, blown, K, "torch")
    as_unknown = alignment_confidence(scene, truth, blown, K, "torch", enclosed_white="unknown")
    assert on_clean.iou > 0.95 and as_background.iou < on_clean.iou - 0.05
    assert as_background.l1 > on_clean.l1 + 0.02
    assert abs(as_unknown.iou - on_clean.iou) < 0.01 and as_unknown.l1 < on_clean.l1 + 0.005
    assert alignment_confidence(scene, truth, clean, K, "torch", enclosed_white="unknown") == on_clean


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_enclosed_white_reads_as_unknown_on_cuda_as_on_the_cpu():
    """The plate with a blown-out patch, its query and splats on the GPU (the enclosed white is found on the host):
    the refinement's loss at the truth and the alignment check come out as on the CPU."""
    scene, truth = textured_plate(), camera()
    blown = torch.as_tensor(shot(scene, truth)).permute(2, 0, 1)
    blown[:, 25:37, 28:40] = 1.0
    cfg = OmegaConf.merge(default_refine_config(), {"enclosed_white": "unknown"})
    read = {}
    for device, backend in (("cpu", "torch"), ("cuda", "gsplat")):
        on_device = scene.to(device)
        refiner = PoseRefiner(on_device, K, SIZE, SIZE, cfg, backend=backend)
        loss = refiner.losses_at(blown.to(device), [truth], len(refiner.levels) - 1)[0]
        read[device] = loss, alignment_confidence(on_device, truth, blown.to(device), K, backend, "unknown")
    assert read["cuda"][0] == pytest.approx(read["cpu"][0], rel=0.05)
    assert read["cuda"][1].iou == pytest.approx(read["cpu"][1].iou, abs=0.01)
    assert read["cuda"][1].l1 == pytest.approx(read["cpu"][1].l1, abs=0.005)


def test_blank_and_foreign_images_are_not_recovered():
    scene = random_scene(n=1500)
    views, _ = reference_views(scene)
    recovery = PoseRecovery(scene, K, SIZE, SIZE, views, recovery_cfg(), backend="torch")
    blank = recovery.recover(torch.ones(3, SIZE, SIZE))
    assert not blank.accepted and blank.hypotheses == 0
    foreign_scene = random_scene(n=150, seed=7)  # another object: other colours, another outline
    foreign = torch.as_tensor(shot(foreign_scene, camera(yaw_deg=30.0))).permute(2, 0, 1)
    foreign_result = recovery.recover(foreign)
    assert not foreign_result.accepted
    # the configured search lined nothing up, so the search about the camera had its try too
    assert foreign_result.searches == 2 and foreign_result.summary()["searches"] == 2


def second_opinion_settler(scene, min_inliers=None, when_neither_lines_up="pnp", recovered_hypotheses=None):
    """A settler at this toy's scale: the recovery as above (object search), reference cameras every 30
    degrees of yaw, no near-symmetry check (a random blob has none); ``min_inliers`` and
    ``recovered_hypotheses`` as ``refine.second_opinion``'s, ``when_neither_lines_up`` as ``refine.recovery``'s."""
    from splatpose.refine.queries import PoseSettler

    recovery = recovery_cfg(**OBJECT_SEARCH, when_neither_lines_up=when_neither_lines_up)
    second_opinion = {"min_inliers": min_inliers, "recovered_hypotheses": recovered_hypotheses}
    cfg = OmegaConf.merge(default_refine_config(), {"recovery": recovery, "symmetry": {"enabled": False},
                                                    "second_opinion": second_opinion})
    db_w2c = np.stack([camera(yaw_deg=float(y)) for y in range(-90, 91, 30)])
    return PoseSettler(scene, K, SIZE, SIZE, cfg, db_w2c, backend="torch")


@pytest.mark.parametrize("keep", ["pnp", "silhouette"])
def test_a_pnp_pose_that_nothing_lines_up_with_is_kept_but_says_so(keep):
    """PnP's pose for an image of another object: neither it (refined) nor anything the recovery finds lines up,
    not even by its silhouette alone, so under either ``when_neither_lines_up`` the PnP pose is kept and the
    result says it does not line up; the same settler on an image of the scene at that pose says it does."""
    from splatpose.sfm.localization import QueryPose

    scene = random_scene(n=1500)
    settler = second_opinion_settler(scene, when_neither_lines_up=keep)
    pose = camera(yaw_deg=30.0)
    own = torch.as_tensor(shot(scene, pose)).permute(2, 0, 1)
    foreign = torch.as_tensor(shot(random_scene(n=150, seed=7), pose)).permute(2, 0, 1)
    for query, lines_up in ((own, True), (foreign, False)):
        settled = settler.settle(query, QueryPose("q.png", pose, True, 30, 40, []))
        assert (settled.path, settled.localized, settled.lines_up) == ("pnp", True, lines_up)
        assert (settled.recovery is None) == lines_up


@pytest.mark.parametrize("keep", ["pnp", "silhouette"])
def test_when_neither_lines_up_a_stained_query_keeps_the_pose_its_silhouette_chose(keep):
    """A dark stain over a third of the plate raises the colour difference of its true pose above ``max_l1``, so
    for a PnP pose whose part sits off to the side neither the refined PnP pose nor the recovery's lines up.
    ``when_neither_lines_up: silhouette`` keeps the recovery's, whose silhouette passes (within 1 degree of the
    truth, and within 10 % of its distance: the toy's 64 px renders hold the depth loosely; path "recovered");
    ``pnp`` keeps PnP's, the part's width away. Either way the result is localized and says it does not line up."""
    from splatpose.sfm.localization import QueryPose

    scene, truth = textured_plate(), camera(yaw_deg=20.0)
    settler = second_opinion_settler(scene, when_neither_lines_up=keep)
    query = torch.as_tensor(shot(scene, truth)).permute(2, 0, 1)
    query[:, 14:50, 12:42] *= 0.1
    assert alignment_confidence(scene, truth, query, K, "torch").l1 > settler.cfg.recovery.max_l1

    off_to_the_side = truth.copy()
    off_to_the_side[0, 3] += 2.0
    settled = settler.settle(query, QueryPose("q.png", off_to_the_side, True, 30, 40, []))
    assert settled.localized and not settled.lines_up and not settled.recovery["accepted"]
    if keep == "silhouette":
        assert settled.path == "recovered" and settled.recovery["kept_for_its_silhouette"]
        assert settled.confidence["iou"] >= settler.cfg.recovery.min_iou
        assert rotation_error_deg(settled.w2c, truth) < 1.0 and center_error(settled.w2c, truth) < 0.1
    else:
        assert settled.path == "pnp" and settled.confidence["iou"] < settler.cfg.recovery.min_iou
        assert center_error(settled.w2c, truth) > 0.3


def test_a_doubtful_pnp_pose_gets_a_second_opinion_that_replaces_it_only_when_it_lines_up_better():
    """A PnP pose 25 degrees off (a wrong basin) whose colour difference is far above the class's usual one
    is replaced by the recovery's pose, within 1 degree, and the record says so; a right pose asked again
    (an artificially low usual difference) is kept as it was; nothing is asked before the usual difference
    is known, nor for a pose the recovery found or already searched for. The query carries a little noise, so that
    no pose matches it exactly."""
    from splatpose.refine.queries import RefinedPose, typical_colour_difference
    from splatpose.refine.recovery import alignment_confidence
    from splatpose.sfm.localization import QueryPose

    scene = random_scene(n=1500)
    settler = second_opinion_settler(scene)
    truth = rolled(camera(yaw_deg=45.0), 50.0)
    noise = np.random.default_rng(0).normal(0.0, 0.02, (SIZE, SIZE, 3)).astype(np.float32)
    clean = shot(scene, truth)
    on_object = ~(clean > 0.99).all(-1, keepdims=True)  # noise on the object only, as a path tracer composites
    query = torch.as_tensor(np.where(on_object, np.clip(clean + noise, 0.0, 1.0), clean)).permute(2, 0, 1)
    pnp = QueryPose("q.png", truth, True, 30, 40, [])

    def settled_at(w2c):
        confidence = alignment_confidence(scene, w2c, query, K, "torch")
        return RefinedPose("q.png", w2c, {"steps": 1}, "pnp", confidence.summary())

    right, wrong = settled_at(truth), settled_at(rolled(camera(yaw_deg=70.0), 50.0))
    assert wrong.confidence["l1"] > 2.0 * right.confidence["l1"]
    assert settler.second_opinion_reason(wrong, pnp) is None, "asked before the class's usual difference is known"
    settler.typical_l1 = typical_colour_difference([right] * 5)
    assert settler.typical_l1 == pytest.approx(right.confidence["l1"])
    assert settler.second_opinion_reason(wrong, pnp) == "colour"
    assert settler.second_opinion_reason(RefinedPose("q.png", wrong.w2c, None, "recovered", wrong.confidence), pnp) is None
    searched = RefinedPose("q.png", wrong.w2c, None, "pnp", wrong.confidence, recovery={"accepted": False})
    assert settler.second_opinion_reason(searched, pnp) is None, "the recovery already searched for this one"

    replaced = settler.reconsider(query, pnp, wrong)
    assert replaced.second_opinion["replaced"] and replaced.path == "recovered"
    assert rotation_error_deg(replaced.w2c, truth) < 1.0, replaced.second_opinion
    assert np.allclose(replaced.second_opinion["replaced_w2c"], wrong.w2c)
    assert replaced.confidence["l1"] < wrong.confidence["l1"]
    assert settler.second_opinion_reason(replaced, pnp) is None  # asked once

    settler.typical_l1 = right.confidence["l1"] / 3.0
    kept = settler.reconsider(query, pnp, settled_at(truth))
    assert kept.second_opinion is not None and not kept.second_opinion["replaced"]
    assert kept.path == "pnp" and np.allclose(kept.w2c, truth)
    assert typical_colour_difference([right] * 4) is None  # too few to call it usual


def test_a_pnp_pose_on_few_inliers_gets_a_fresh_search_that_replaces_it_only_when_it_lines_up_better():
    """With ``second_opinion.min_inliers`` set, a PnP pose resting on fewer inliers is asked about at once (the
    class's usual colour difference not needed); the recovery searches as if PnP had failed, so a pose refined
    into a wrong basin is replaced by one within 1 degree, and a right pose is kept. A pose on enough inliers is
    not asked about before the usual difference is known."""
    from splatpose.refine.queries import RefinedPose
    from splatpose.refine.recovery import alignment_confidence
    from splatpose.sfm.localization import QueryPose

    scene = random_scene(n=1500)
    settler = second_opinion_settler(scene, min_inliers=40)
    truth = rolled(camera(yaw_deg=45.0), 50.0)
    query = torch.as_tensor(shot(scene, truth)).permute(2, 0, 1)
    weak, strong = (QueryPose("q.png", truth, True, inliers, 80, []) for inliers in (30, 60))

    def settled_at(w2c):
        confidence = alignment_confidence(scene, w2c, query, K, "torch")
        return RefinedPose("q.png", w2c, {"steps": 1}, "pnp", confidence.summary())

    wrong = settled_at(rolled(camera(yaw_deg=70.0), 50.0))
    assert settler.typical_l1 is None
    assert settler.second_opinion_reason(wrong, weak) == "weak_pnp"
    assert settler.second_opinion_reason(wrong, strong) is None

    replaced = settler.reconsider(query, weak, wrong)
    assert replaced.second_opinion["reason"] == "weak_pnp" and replaced.second_opinion["replaced"]
    assert replaced.path == "recovered" and rotation_error_deg(replaced.w2c, truth) < 1.0, replaced.second_opinion
    kept = settler.reconsider(query, weak, settled_at(truth))
    assert not kept.second_opinion["replaced"] and kept.path == "pnp" and np.allclose(kept.w2c, truth)


def test_a_recovered_pose_with_doubtful_colours_gets_a_wider_search_that_replaces_it():
    """A recovered pose 25 degrees off (a wrong basin) whose colour difference is far above the class's usual one:
    with ``second_opinion.recovered_hypotheses`` set the recovery searches again, its first level refining that
    many starts (the doubtful pose and the best coarse poses), and the pose it finds, within 1 degree, replaces
    it; a right recovered pose asked again is kept. Unset, recovered poses get no second opinion. The query
    carries a little noise, so that no pose matches it exactly."""
    from splatpose.refine.queries import RefinedPose
    from splatpose.sfm.localization import QueryPose

    scene = random_scene(n=1500)
    truth = rolled(camera(yaw_deg=45.0), 50.0)
    clean = shot(scene, truth)
    noise = np.random.default_rng(0).normal(0.0, 0.02, clean.shape).astype(np.float32)
    on_object = ~(clean > 0.99).all(-1, keepdims=True)  # noise on the object only
    query = torch.as_tensor(np.where(on_object, np.clip(clean + noise, 0.0, 1.0), clean)).permute(2, 0, 1)
    failed_pnp = QueryPose("q.png", camera(), False, 0, 0, [])

    def recovered_at(w2c):
        confidence = alignment_confidence(scene, w2c, query, K, "torch")
        return RefinedPose("q.png", w2c, None, "recovered", confidence.summary(), {"accepted": True})

    right, wrong = recovered_at(truth), recovered_at(rolled(camera(yaw_deg=70.0), 50.0))
    settler = second_opinion_settler(scene)
    settler.typical_l1 = right.confidence["l1"]
    assert wrong.confidence["l1"] > 2.0 * settler.typical_l1
    assert settler.second_opinion_reason(wrong, failed_pnp) is None, "asked while recovered_hypotheses is null"

    settler.cfg.second_opinion.recovered_hypotheses = 8
    assert settler.second_opinion_reason(wrong, failed_pnp) == "recovered_colour"
    replaced = settler.reconsider(query, failed_pnp, wrong)
    assert replaced.second_opinion["replaced"] and replaced.path == "recovered" and replaced.lines_up
    assert replaced.second_opinion["recovery"]["hypotheses"] == 8 + 1  # the coarse poses and the doubtful one
    assert rotation_error_deg(replaced.w2c, truth) < 1.0, replaced.second_opinion
    assert settler.second_opinion_reason(replaced, failed_pnp) is None  # asked once
    settler.typical_l1 = right.confidence["l1"] / 3.0
    kept = settler.reconsider(query, failed_pnp, recovered_at(truth))
    assert not kept.second_opinion["replaced"] and np.allclose(kept.w2c, truth)


def test_a_query_on_a_bench_is_put_on_white_again_at_each_refined_pose():
    """refine.bench.rounds: a query on a bench is put on white at its PnP pose, and at a pose 6 degrees off
    that keeps bench inside the render's silhouette where the part is not, which holds one refinement (the
    realistic preset's SSIM loss) away from the truth; put on white again at each refined pose and refined
    again, the pose comes back to the truth, and the record counts the refinements."""
    from splatpose.data.capture_effects import background_texture
    from splatpose.refine.queries import PoseSettler
    from splatpose.sfm.localization import QueryPose
    from test_refine import perturbed

    scene = random_scene(n=1500)
    truth = camera(yaw_deg=40.0)
    clean = shot(scene, truth)
    bench = background_texture("concrete", (SIZE, SIZE), np.random.default_rng(3))
    query = torch.as_tensor(np.where((clean > 0.99).all(-1, keepdims=True), bench, clean)).permute(2, 0, 1).float()
    pnp = QueryPose("q.png", perturbed(truth, 6.0, 0.0, seed=2), True, 30, 40, [])
    errors, rounds = {}, {}
    for most in (1, 8):
        cfg = OmegaConf.merge(default_refine_config(), {
            "loss": "l1_ssim", "ssim_weight": 0.8, "bench": {"enabled": True, "rounds": most},
            "recovery": {"enabled": False}, "symmetry": {"enabled": False}})
        settled = PoseSettler(scene, K, SIZE, SIZE, cfg, truth[None], backend="torch").settle(query, pnp)
        errors[most], rounds[most] = rotation_error_deg(settled.w2c, truth), settled.refinement.get("rounds", 1)
    assert errors[1] > 0.5, errors      # held near the pose the query was put on white at
    assert errors[8] < 0.3 and rounds[8] >= 2 and rounds[1] == 1, (errors, rounds)
