"""The built-in dataset generator: determinism, masks from rendered passes, poses, caching."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from splatpose.data import list_classes, load_class, read_image, read_mask
from splatpose.data.cameras import (camera_center, intrinsics_from_fov_x, look_at_opengl_c2w, opengl_c2w_to_opencv_w2c,
                                   project_points)
from splatpose.data.mad_sim import DEFECT_TYPES
from splatpose.data.offscreen import LIGHTINGS, OffscreenRenderer
from splatpose.data.synthetic import build_object, ensure_synthetic_dataset, make_settings, render_defect_view
from splatpose.data.synthetic_scene import MESHES
from splatpose.refine.pose_refinement import enclosed_white_mask

CLASS = "01Ant"


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    # Same folder and settings as in test_mad_sim_reader.py: generated once per session.
    return ensure_synthetic_dataset(tmp_path_factory.getbasetemp() / "synthetic", [CLASS], preset="tiny")


def _files(class_dir):
    return {p.relative_to(class_dir).as_posix(): p.read_bytes() for p in sorted(class_dir.rglob("*")) if p.is_file()}


def test_same_seed_gives_byte_identical_files(tiny_root, tmp_path):
    again = ensure_synthetic_dataset(tmp_path, [CLASS], preset="tiny")
    first, second = _files(tiny_root / CLASS), _files(again / CLASS)
    assert len(first) == 6 + 5 + 3 + 2  # train, test, masks, transforms.json + test_poses.json
    assert first.keys() == second.keys()
    assert [name for name in first if first[name] != second[name]] == []
    other_seed = ensure_synthetic_dataset(tmp_path, [CLASS], preset="tiny", seed=1)
    assert other_seed != again, "other settings go to another cache folder"
    assert _files(other_seed / CLASS)["train/good/0.png"] != first["train/good/0.png"]


def test_masks_are_exactly_the_pixels_the_defect_changed(tiny_root):
    """Masks exist exactly for defect images, are non-empty, and cover every pixel where the defective
    image differs from a fresh defect-free render at the same (true) pose."""
    data = load_class(tiny_root, CLASS)
    settings = make_settings("tiny")
    mesh, _, _ = build_object(settings, CLASS)
    masks = sorted(p.relative_to(tiny_root / CLASS).as_posix() for p in (tiny_root / CLASS).rglob("*_mask.png"))
    assert masks == sorted(f"ground_truth/{d}/000_mask.png" for d in DEFECT_TYPES)
    with OffscreenRenderer(settings.width, settings.height, settings.camera_angle_x, settings.supersample) as renderer:
        for image in data.test:
            c2w = np.asarray(json.loads((tiny_root / CLASS / "test_poses.json").read_text())["poses"][image.name])
            clean = renderer.render_rgb(mesh, c2w)
            pixels = np.asarray(Image.open(image.path))
            differs = (pixels != clean).any(axis=-1)
            if image.defect == "good":
                assert not differs.any(), f"{image.name} should be the defect-free render at its pose"
                continue
            mask = read_mask(image.mask_path)
            assert mask.any(), f"{image.name}: empty mask"
            assert not (differs & ~mask).any(), f"{image.name}: changed pixels outside the mask"
            # Mask pixels are changed pixels (colour) or, rarely, a new surface of the same colour.
            assert differs[mask].mean() > 0.8, f"{image.name}: mask covers pixels the defect did not change"
            assert mask.sum() <= settings.max_defect_fraction * (clean != 255).any(axis=-1).sum()


def test_test_poses_are_not_train_poses_and_object_is_in_view(tiny_root):
    data = load_class(tiny_root, CLASS)
    settings = make_settings("tiny")
    train_centres = np.stack([camera_center(v.w2c) for v in data.train])
    for name, w2c in data.test_poses.items():
        assert np.linalg.norm(train_centres - camera_center(w2c), axis=1).min() > 0.05, name
    # The object centre (world origin) projects onto the object in every train image.
    K = intrinsics_from_fov_x(settings.camera_angle_x, settings.width, settings.height)
    for view in data.train:
        uv, _ = project_points(np.zeros((1, 3)), view.w2c, K)
        u, v = uv[0]
        image = read_image(view.path)
        window = image[int(v) - 2:int(v) + 3, int(u) - 2:int(u) + 3]
        assert (window < 0.99).any(axis=-1).any(), f"{view.name}: nothing of the object at the projected centre"
    np.testing.assert_allclose(data.train[0].w2c, opengl_c2w_to_opencv_w2c(
        json.loads((tiny_root / CLASS / "transforms.json").read_text())["frames"][0]["transform_matrix"]))


def test_cache_is_reused_and_unfinished_output_is_never_trusted(tiny_root):
    class_dir = tiny_root / CLASS
    before = (class_dir / "transforms.json").stat().st_mtime_ns
    # A leftover of an interrupted generation: hidden, so never listed as a class, and cleaned up.
    stale = tiny_root / f".tmp-{CLASS}-99999"
    (stale / "train").mkdir(parents=True)
    (stale / "transforms.json").write_text("{}")
    assert list_classes(tiny_root) == [CLASS]
    assert ensure_synthetic_dataset(tiny_root.parent, [CLASS], preset="tiny") == tiny_root
    assert (class_dir / "transforms.json").stat().st_mtime_ns == before, "a finished class is reused as is"
    assert not stale.exists()


def test_settings_are_validated():
    with pytest.raises(ValueError, match=r"unknown generator settings \['n_trian'\].*n_train"):
        make_settings(n_trian=10)
    with pytest.raises(ValueError, match="unknown synthetic preset 'huge'.*mad_sim_like"):
        make_settings("huge")
    assert make_settings("mad_sim_like").n_train == 200
    # YAML lists become tuples, so settings from a config hash like the defaults.
    assert make_settings(train_elevation_deg=[-45.0, 75.0]).key() == make_settings().key()
    with pytest.raises(ValueError, match="no mesh for synthetic classes"):
        ensure_synthetic_dataset("/tmp/unused", ["01Gorilla"])


def test_dents_change_only_the_shading_inside_their_mask(tmp_path):
    """09DentKnob's fourth defect type: a dent shows as a visible change of shading inside its mask,
    and nothing changes beyond a few pixels of that mask (the bowl's rim is smooth)."""
    root = ensure_synthetic_dataset(tmp_path, ["09DentKnob"], preset="tiny")
    data = load_class(root, "09DentKnob")
    assert sorted({image.defect for image in data.test}) == ["Burrs", "Dents", "Missing", "Stains", "good"]
    settings = make_settings("tiny")
    mesh, _, _ = build_object(settings, "09DentKnob")
    poses = json.loads((root / "09DentKnob" / "test_poses.json").read_text())["poses"]
    dents = [image for image in data.test if image.defect == "Dents"]
    with OffscreenRenderer(settings.width, settings.height, settings.camera_angle_x, settings.supersample) as renderer:
        for image in dents:
            clean = renderer.render_rgb(mesh, np.asarray(poses[image.name])).astype(int)
            change = np.abs(np.asarray(Image.open(image.path)).astype(int) - clean).max(axis=-1)
            mask = read_mask(image.mask_path)
            assert change[mask].mean() >= 4, f"{image.name}: the dent does not show (mean change {change[mask].mean()})"
            assert not (change > 0)[~ndimage.binary_dilation(mask, iterations=3)].any(), \
                f"{image.name}: pixels changed far from the dent's mask"


def test_the_soft_light_shows_the_same_dents_less_than_two_lamps_but_still_shows_them():
    """12SoftKnob's light (a soft box and a dome): the same dents, at the same poses, change the pixels in
    their masks less than under the other classes' two lamps, and still change them."""
    settings = make_settings("tiny")
    mesh, texture, _ = build_object(settings, "12SoftKnob")
    assert MESHES["12SoftKnob"].lighting == "soft"
    change = {}
    for lighting in ("soft", "two_lights"):
        rng = np.random.default_rng(3)
        with OffscreenRenderer(settings.width, settings.height, settings.camera_angle_x, settings.supersample,
                               lighting=lighting) as renderer:
            per_dent = []
            for _ in range(4):
                c2w, image, mask, _ = render_defect_view(renderer, mesh, texture, "Dents", settings, rng)
                clean = renderer.render_rgb(mesh, c2w).astype(int)
                per_dent.append(np.abs(image.astype(int) - clean).max(axis=-1)[mask].mean())
        change[lighting] = np.mean(per_dent)
    assert 1.0 < change["soft"] < 0.85 * change["two_lights"], change
    with pytest.raises(ValueError, match="unknown lighting"):
        OffscreenRenderer(16, 16, 0.7, lighting="sunset")


def test_a_glossy_noisy_class_has_noise_on_the_object_and_pure_white_around_it(tmp_path):
    """10GlossyKnob's look: photon noise on the object (its test image differs from the noise-free,
    glossy render at the same pose by a few levels, not more), none on the white background."""
    root = ensure_synthetic_dataset(tmp_path, ["10GlossyKnob"], preset="tiny")
    settings = make_settings("tiny")
    mesh, _, _ = build_object(settings, "10GlossyKnob")
    image = load_class(root, "10GlossyKnob").test[0]
    assert image.defect == "good"
    c2w = np.asarray(json.loads((root / "10GlossyKnob" / "test_poses.json").read_text())["poses"][image.name])
    with OffscreenRenderer(settings.width, settings.height, settings.camera_angle_x, settings.supersample,
                           specular=MESHES["10GlossyKnob"].specular) as renderer:
        clean = renderer.render_rgb(mesh, c2w).astype(int)
        coverage = renderer.render_coverage(mesh, c2w)
    pixels = np.asarray(Image.open(image.path)).astype(int)
    assert (pixels[coverage == 0] == 255).all(), "noise on the background"
    change = np.abs(pixels - clean)[coverage == 1]
    assert 1.0 < change.mean() < 10.0, f"mean change {change.mean():.2f} on the object"


def test_the_shiny_nut_blows_its_top_face_out_to_white_where_the_matte_one_shows_it():
    """13ShinyNut's look: seen from where the key light mirrors off its flat top face, part of the part is as white
    as the background (the trait it stands in for); 05PlainNut, the same nut matte, shows every pixel darker."""
    settings = make_settings("tiny")
    key = np.asarray(LIGHTINGS["two_lights"]["lights"][0][0], dtype=np.float64)
    key /= np.linalg.norm(key)
    mirror = 2 * key[2] * np.array([0.0, 0.0, 1.0]) - key  # the key light reflected about the top face's normal
    c2w = look_at_opengl_c2w(settings.train_distance * mirror, np.zeros(3), np.array([0.0, 0.0, 1.0]))
    white_share = {}
    for name in ("13ShinyNut", "05PlainNut"):
        mesh, _, _ = build_object(settings, name)
        with OffscreenRenderer(settings.width, settings.height, settings.camera_angle_x, settings.supersample,
                               specular=MESHES[name].specular) as renderer:
            rgb, part = renderer.render_rgb(mesh, c2w), renderer.render_coverage(mesh, c2w) == 1
        white_share[name] = ((rgb.min(axis=-1) >= 250) & part).sum() / part.sum()
    assert white_share["13ShinyNut"] > 0.05 and white_share["05PlainNut"] == 0.0, white_share


def test_the_shiny_brackets_highlight_runs_to_its_outline_where_the_shiny_nuts_is_enclosed():
    """14ShinyBracket's look: seen from where the key light mirrors off its base plate, part of the part is as white
    as the background and that white joins the background's (the trait it stands in for: no rule built on the
    white's connection to the image's border finds it), while 13ShinyNut's darker rim encloses its white."""
    settings = make_settings("tiny")
    key = np.asarray(LIGHTINGS["two_lights"]["lights"][0][0], dtype=np.float64)
    key /= np.linalg.norm(key)
    mirror = 2 * key[2] * np.array([0.0, 0.0, 1.0]) - key  # the key light reflected about the horizontal faces
    c2w = look_at_opengl_c2w(settings.train_distance * mirror, np.zeros(3), np.array([0.0, 0.0, 1.0]))
    white_share, enclosed_share = {}, {}
    for name in ("14ShinyBracket", "13ShinyNut"):
        mesh, _, _ = build_object(settings, name)
        with OffscreenRenderer(settings.width, settings.height, settings.camera_angle_x, settings.supersample,
                               specular=MESHES[name].specular) as renderer:
            rgb, part = renderer.render_rgb(mesh, c2w), renderer.render_coverage(mesh, c2w) == 1
        white = (rgb.min(axis=-1) >= 250) & part
        enclosed = enclosed_white_mask(torch.from_numpy(rgb).permute(2, 0, 1) / 255.0).numpy()
        white_share[name] = white.sum() / part.sum()
        enclosed_share[name] = (white & enclosed).sum() / max(white.sum(), 1)
    assert white_share["14ShinyBracket"] > 0.05 and white_share["13ShinyNut"] > 0.05, white_share
    assert enclosed_share["14ShinyBracket"] < 0.1 and enclosed_share["13ShinyNut"] > 0.9, enclosed_share
