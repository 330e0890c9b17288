"""The second dataset family (``dataset=parts``): layout, masks, determinism, and the path tracer's camera.

Generation runs in child processes (llvm_ad_rgb where libLLVM >= 16 exists); the checks that render in
this process use Mitsuba's scalar_rgb variant, which loads no LLVM next to torch's.
"""

import json

import numpy as np
import pytest
import trimesh
from PIL import Image
from scipy.ndimage import binary_dilation

from splatpose.data import DatasetError, load_class, read_mask, resolve_dataset
from splatpose.data.cameras import (intrinsics_from_fov_x, look_at_opengl_c2w, opengl_c2w_to_opencv_w2c,
                                    project_points)
from splatpose.data.parts import (PARTS_CLASSES, PARTS_DEFECTS, ensure_parts_dataset, make_settings,
                                  place_visible_defect, train_poses)

CLASS = "01Knob"


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    """A tiny parts dataset (64x64, 6 train views, 2 good + 1 per defect test views)."""
    return ensure_parts_dataset(tmp_path_factory.getbasetemp() / "parts", [CLASS], preset="tiny")


@pytest.fixture(scope="module")
def tracer():
    """A small in-process path tracer (scalar_rgb)."""
    from splatpose.data.parts_render import PathTracer

    return PathTracer(64, 64, make_settings("tiny").camera_angle_x, spp=16, variant="scalar_rgb")


def _files(class_dir):
    return {p.relative_to(class_dir).as_posix(): p.read_bytes() for p in sorted(class_dir.rglob("*")) if p.is_file()}


def test_generated_class_is_readable_with_poses_and_masks(tiny_root):
    data = load_class(tiny_root, CLASS)
    assert (data.width, data.height) == (64, 64) and len(data.train) == 6
    counts = {d: sum(t.defect == d for t in data.test) for d in ("good", *PARTS_DEFECTS)}
    assert counts == {"good": 2, "Chip": 1, "ColourShift": 1, "Dent": 1, "Scratch": 1}
    assert set(data.test_poses) == {t.name for t in data.test}
    masks = sorted(p.relative_to(tiny_root / CLASS).as_posix() for p in (tiny_root / CLASS).rglob("*_mask.png"))
    assert masks == sorted(f"ground_truth/{d}/000_mask.png" for d in PARTS_DEFECTS), "masks only for defect images"
    for image in data.test:
        pixels = np.asarray(Image.open(image.path))
        assert pixels.shape == (64, 64, 3)
        assert (pixels[0, 0] == 255).all() and (pixels[-1, -1] == 255).all(), "pure white background"
        assert not (pixels.sum(axis=-1) == 0).any(), f"{image.name}: black pixels (a back face or a NaN)"
        if image.defect == "good":
            continue
        mask = read_mask(image.mask_path)
        assert mask.sum() >= 6, f"{image.name}: empty or tiny mask"
        on_object = binary_dilation((pixels < 250).any(axis=-1), iterations=1)
        assert (mask & ~on_object).sum() == 0, f"{image.name}: mask outside the object"


def test_test_poses_are_not_train_poses(tiny_root):
    meta = json.loads((tiny_root / CLASS / "transforms.json").read_text())
    train_centres = np.array([np.array(f["transform_matrix"])[:3, 3] for f in meta["frames"]])
    poses = json.loads((tiny_root / CLASS / "test_poses.json").read_text())["poses"]
    for name, c2w in poses.items():
        gap = np.linalg.norm(train_centres - np.array(c2w)[:3, 3], axis=1).min()
        assert gap >= make_settings("tiny").min_gap_to_train_camera, name


def test_same_seed_gives_byte_identical_files(tiny_root, tmp_path):
    again = ensure_parts_dataset(tmp_path, [CLASS], preset="tiny")
    first, second = _files(tiny_root / CLASS), _files(again / CLASS)
    assert len(first) == 6 + 6 + 4 + 2  # train, test, masks, transforms.json + test_poses.json
    assert first.keys() == second.keys()
    assert [name for name in first if first[name] != second[name]] == []
    assert make_settings("tiny", seed=1).key() != make_settings("tiny").key(), "another seed, another folder"


def test_mitsuba_camera_matches_the_project_pinhole(tracer):
    """A small sphere off the image centre lands where the project's intrinsics and extrinsics put it:
    f = 0.5 W / tan(0.5 camera_angle_x), principal point at the centre, OpenGL c2w -> OpenCV w2c."""
    from splatpose.data.parts_meshes import Material, PartObject, SurfaceMesh
    from splatpose.data.parts_render import PathTracer

    width, height, fov = 96, 64, 0.69                       # not square: the field of view is horizontal
    wide = PathTracer(width, height, fov, spp=1, variant="scalar_rgb")
    centre = np.array([0.35, -0.2, 0.25])
    sphere = trimesh.creation.icosphere(subdivisions=3, radius=0.08)
    vertices = sphere.vertices + centre
    obj = PartObject(SurfaceMesh(vertices, sphere.faces, sphere.vertex_normals, np.full_like(vertices, 0.5)),
                     Material("diffuse"), "test sphere")
    scene = wide.scene(obj)
    c2w = look_at_opengl_c2w(np.array([2.0, 1.5, 1.2]), np.array([0.05, 0.0, 0.1]), np.array([0.0, 0.0, 1.0]),
                             roll_deg=20.0)
    covered = wide.render_surface(scene, c2w).shape == "object"
    rows, cols = np.nonzero(covered)
    seen = np.array([cols.mean() + 0.5, rows.mean() + 0.5])  # pixel centres, COLMAP convention
    uv, depth = project_points(centre[None], opengl_c2w_to_opencv_w2c(c2w), intrinsics_from_fov_x(fov, width, height))
    assert depth[0] > 0 and covered.sum() > 40
    assert np.abs(uv[0] - np.array([width / 2, height / 2])).min() > 8, "the sphere must be off-centre"
    np.testing.assert_allclose(seen, uv[0], atol=0.3)


def test_defective_render_differs_from_the_clean_one_only_near_the_mask(tracer):
    from splatpose.data.parts_meshes import build_part

    settings = make_settings("tiny", variant="scalar_rgb")
    rng = np.random.default_rng(3)
    obj = build_part(CLASS, rng, settings.edge_len)
    scene = tracer.scene(obj)
    train_centres = np.stack([c2w[:3, 3] for c2w in train_poses(settings)])
    for defect in PARTS_DEFECTS:
        c2w, defective_scene, mask = place_visible_defect(tracer, obj, scene, defect, settings, rng, train_centres)
        clean = tracer.render_rgb(scene, c2w, seed=11).astype(int)
        changed = tracer.render_rgb(defective_scene, c2w, seed=11).astype(int)
        differs = np.abs(clean - changed).max(axis=-1) > 12
        assert differs[mask].any(), f"{defect}: the defect is invisible in the image"
        far = ~binary_dilation(mask, iterations=3)
        # Light bounced off the defect may change a few pixels nearby; nothing else may change.
        assert (differs & far).sum() <= 3, f"{defect}: the image changed away from the mask"


def test_settings_and_class_lists():
    from splatpose.data.parts_defects import PARTS_DEFECT_TYPES
    from splatpose.data.parts_meshes import PARTS

    assert tuple(PARTS) == PARTS_CLASSES and PARTS_DEFECT_TYPES == PARTS_DEFECTS
    assert make_settings("small").n_train == 48 and make_settings("mad_sim_like").width == 400
    m = make_settings("mad_sim_like")
    assert m.n_train == 120 and m.n_test_good + len(PARTS_DEFECTS) * m.n_test_per_defect == 85
    assert make_settings(variant="auto").variant in ("llvm_ad_rgb", "scalar_rgb")
    with pytest.raises(ValueError, match=r"unknown parts generator settings \['n_trian'\].*n_train"):
        make_settings(n_trian=3)
    with pytest.raises(ValueError, match="unknown parts preset 'huge'"):
        make_settings("huge")
    with pytest.raises(ValueError, match="unknown Mitsuba variant 'cuda_ad_rgb'"):
        make_settings(variant="cuda_ad_rgb")
    # YAML lists become tuples, so settings from a config hash like the defaults.
    assert make_settings(train_elevation_deg=[-30.0, 70.0]).key() == make_settings().key()


def test_resolve_dataset_generates_and_loads_parts(tiny_root):
    cfg = {"name": "parts", "root": str(tiny_root.parent), "classes": [CLASS], "preset": "tiny",
           "generator": {"seed": 0, "width": None, "height": None}}
    data = resolve_dataset(cfg, CLASS)
    assert data.root == tiny_root / CLASS
    with pytest.raises(DatasetError, match=r"unknown class '03Nut' for dataset=parts.*01Knob"):
        resolve_dataset(cfg, "03Nut")
    with pytest.raises(DatasetError, match=r"dataset=parts: unknown parts generator settings \['widht'\]"):
        resolve_dataset({**cfg, "generator": {"widht": 10}}, CLASS)
