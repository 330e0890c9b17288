"""The ``parts`` family as a line's camera sees it (presets ``realistic`` / ``tiny_realistic``): the same
class as the clean preset (poses, defect masks) seen on a bench, under a light that changes, with noise
and JPEG; and the capture chain's pieces (compositing, the light's turn)."""

import json

import numpy as np
import pytest
import trimesh
from PIL import Image
from scipy.ndimage import binary_dilation, binary_erosion

from splatpose.data import load_class, read_mask
from splatpose.data.cameras import look_at_opengl_c2w
from splatpose.data.parts import ensure_parts_dataset, make_settings
from splatpose.data.parts_capture import BENCH_KINDS, ViewLight, bench_texture, photograph

CLASS = "01Knob"


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    """The tiny parts class, clean and realistic, with the same seed."""
    base = tmp_path_factory.getbasetemp() / "parts_capture"
    return (ensure_parts_dataset(base, [CLASS], preset="tiny"),
            ensure_parts_dataset(base, [CLASS], preset="tiny_realistic"))


def _image(path):
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def test_realistic_class_keeps_the_clean_poses_and_defect_masks(roots):
    clean, real = (load_class(root, CLASS) for root in roots)
    assert json.loads((roots[0] / CLASS / "transforms.json").read_text()) == \
        json.loads((roots[1] / CLASS / "transforms.json").read_text())
    assert clean.test_poses.keys() == real.test_poses.keys()
    for name in clean.test_poses:
        np.testing.assert_array_equal(clean.test_poses[name], real.test_poses[name])
    for a, b in zip(clean.test, real.test):
        assert a.name == b.name
        if a.mask_path is not None:
            np.testing.assert_array_equal(read_mask(a.mask_path), read_mask(b.mask_path))


def test_realistic_views_stand_on_a_bench_with_reference_masks(roots):
    clean, real = (load_class(root, CLASS) for root in roots)
    assert real.has_reference_masks and not clean.has_reference_masks
    for clean_view, view in zip(clean.train, real.train):
        mask = np.asarray(Image.open(view.mask_path)) > 127
        white = (_image(clean_view.path) >= 250).all(axis=-1)
        # the mask is the part: where the clean render is not white (but for its anti-aliased outline)
        outline = binary_dilation(mask) & ~binary_erosion(mask)
        assert ((mask == white) & ~outline).mean() < 0.003
        background = _image(view.path)[~mask]
        assert background.mean() < 220, "the background is a bench, not white"
    for clean_view, view in zip(clean.test, real.test):
        assert np.abs(_image(clean_view.path) - _image(view.path)).mean() > 5, f"{view.name} looks clean"


def test_same_seed_gives_byte_identical_realistic_files(roots, tmp_path):
    again = ensure_parts_dataset(tmp_path, [CLASS], preset="tiny_realistic")
    first = {p.relative_to(roots[1]).as_posix(): p.read_bytes() for p in sorted((roots[1] / CLASS).rglob("*.png"))}
    second = {p.relative_to(again).as_posix(): p.read_bytes() for p in sorted((again / CLASS).rglob("*.png"))}
    assert first.keys() == second.keys() and len(first) == 6 + 6 + 6 + 4  # train, masks, test, defect masks
    assert [name for name in first if first[name] != second[name]] == []
    assert make_settings("tiny_realistic").key() != make_settings("tiny").key()


def test_capture_with_every_effect_off_is_the_clean_render():
    """Compositing the premultiplied render over white with no light change, lens or sensor effect gives
    exactly the clean image (the two presets differ only by what the capture adds)."""
    from splatpose.data.parts_meshes import build_part
    from splatpose.data.parts_render import PathTracer

    settings = make_settings("tiny", variant="scalar_rgb")
    tracer = PathTracer(64, 64, settings.camera_angle_x, spp=4, variant="scalar_rgb")
    scene = tracer.scene(build_part(CLASS, np.random.default_rng(0), settings.edge_len))
    c2w = look_at_opengl_c2w(np.array([2.2, -1.5, 1.4]), np.zeros(3), np.array([0.0, 0.0, 1.0]))
    premultiplied, alpha = tracer.render_linear(scene, c2w, seed=5)
    clean = tracer.render_rgb(scene, c2w, seed=5)
    off = photograph(premultiplied, alpha, None, ViewLight(), np.random.default_rng(0), shadow=0.0, vignette=0.0,
                     electrons_at_white=0.0, read_noise=0.0, jpeg_quality=0)
    assert np.abs(off.astype(int) - clean.astype(int)).max() <= 1
    assert 0.05 < alpha.mean() < 0.9 and set(np.unique(alpha[[0, -1]])) == {0.0}


def test_turning_the_light_turns_the_lit_side_about_the_vertical():
    """A sphere seen from straight above: the brightness-weighted centre of its lit side moves around the
    image centre by the light's turn, and the light's gain scales its pixels."""
    from splatpose.data.parts_meshes import Material, PartObject, SurfaceMesh
    from splatpose.data.parts_render import PathTracer

    tracer = PathTracer(64, 64, 0.7, spp=16, variant="scalar_rgb")
    sphere = trimesh.creation.icosphere(subdivisions=4, radius=0.6)
    obj = PartObject(SurfaceMesh(sphere.vertices, sphere.faces, sphere.vertex_normals,
                                 np.full_like(sphere.vertices, 0.6)), Material("diffuse"), "sphere")
    # from above, image x along world +x and image y (down) along world -y
    c2w = look_at_opengl_c2w(np.array([0.0, 0.0, 3.0]), np.zeros(3), np.array([0.0, 1.0, 0.0]))

    def lit_side_angle(light: ViewLight) -> tuple[float, float]:
        premultiplied, alpha = tracer.render_linear(tracer.scene(obj, light), c2w, seed=1)
        brightness = premultiplied.mean(axis=-1) * (alpha > 0.99)
        rows, cols = np.mgrid[0:64, 0:64] - 31.5
        dx, dy = (brightness * cols).sum() / brightness.sum(), -(brightness * rows).sum() / brightness.sum()
        return float(np.degrees(np.arctan2(dy, dx))), float(brightness.sum())

    (angle0, total0), (angle90, total90) = lit_side_angle(ViewLight()), lit_side_angle(ViewLight(turn_deg=90.0))
    turned = (angle90 - angle0 + 180.0) % 360.0 - 180.0
    assert abs(abs(turned) - 90.0) < 15.0, turned
    assert abs(lit_side_angle(ViewLight(gain=1.25))[1] / total0 - 1.25) < 0.01
    assert abs(total90 / total0 - 1.0) < 0.1, "turning the light keeps its level"


@pytest.mark.parametrize("kind", BENCH_KINDS)
def test_bench_textures_have_texture(kind):
    texture = bench_texture(kind, (90, 120), np.random.default_rng(0))
    assert texture.shape == (90, 120, 3) and 0.0 <= texture.min() and texture.max() <= 1.0
    assert texture.std() > 0.01, "a bench with no texture would not test anything"
