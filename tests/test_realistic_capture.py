"""The realistic preset of the built-in generator: the same objects, poses and defect masks as the clean
preset, seen as a real capture (bench and clutter behind, drifting light, sensor noise, JPEG), with
reference-view object masks that the reader picks up and splat training uses."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from splatpose.data.mad_sim import REFERENCE_MASKS_DIR, DatasetError, load_class, read_image, read_object_mask
from splatpose.data.synthetic import ensure_synthetic_dataset, make_settings
from splatpose.splat.train import load_posed_views

CLASS = "01Ant"


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    """(clean tiny root, realistic tiny root) of one class, same seed."""
    base = tmp_path_factory.mktemp("capture")
    return (ensure_synthetic_dataset(base, [CLASS], preset="tiny"),
            ensure_synthetic_dataset(base, [CLASS], preset="tiny_realistic"))


def _digest(folder, pattern):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.glob(pattern))}


def test_realistic_keeps_poses_and_defect_masks_and_changes_the_images(roots):
    clean, real = roots[0] / CLASS, roots[1] / CLASS
    assert _digest(clean, "ground_truth/*/*.png") == _digest(real, "ground_truth/*/*.png")
    for name in ("transforms.json", "test_poses.json"):
        assert json.loads((clean / name).read_text()) == json.loads((real / name).read_text())
    clean_good, real_good = read_image(clean / "test/good/000.png"), read_image(real / "test/good/000.png")
    background = (clean_good > 0.99).all(-1)
    assert background.mean() > 0.3
    # the white background became a bench: far from white, and not uniform
    assert np.abs(real_good[background] - 1.0).mean() > 0.15
    assert real_good[background].std(axis=0).mean() > 0.03


def test_realistic_is_deterministic_by_seed(roots, tmp_path):
    again = ensure_synthetic_dataset(tmp_path, [CLASS], preset="tiny_realistic")
    assert _digest(roots[1] / CLASS, "**/*.png") == _digest(again / CLASS, "**/*.png")
    other = ensure_synthetic_dataset(tmp_path, [CLASS], preset="tiny_realistic", seed=1)
    assert _digest(other / CLASS, "train/good/*.png") != _digest(again / CLASS, "train/good/*.png")


def test_reference_masks_are_the_object_coverage_and_the_reader_loads_them(roots):
    clean, real = load_class(roots[0], CLASS), load_class(roots[1], CLASS)
    assert not clean.has_reference_masks and real.has_reference_masks
    for clean_view, view in zip(clean.train, real.train):
        mask = read_object_mask(view.mask_path)
        object_pixels = (read_image(clean_view.path) < 0.99).any(-1)
        assert mask.shape == object_pixels.shape
        # the rendered object on white is exactly where the coverage is positive (ant colours are never white)
        assert ((mask > 0) == object_pixels).mean() > 0.995
    # splat training sees the object on white: the bench is gone outside the mask
    views = load_posed_views(real, object_masks=True).images.numpy() / 255.0
    clean_views = load_posed_views(clean).images.numpy() / 255.0
    outside = np.stack([read_object_mask(v.mask_path) == 0 for v in real.train])
    assert np.allclose(views[outside], 1.0)
    assert not np.allclose(load_posed_views(real, object_masks=False).images.numpy()[outside] / 255.0, 1.0)
    assert np.abs(views - clean_views)[~outside].mean() < 0.15


def test_a_missing_reference_mask_is_named(roots, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(roots[1] / CLASS, copy / CLASS)
    (copy / CLASS / REFERENCE_MASKS_DIR / "2.png").unlink()
    with pytest.raises(DatasetError, match="2.png.*add it"):
        load_class(copy, CLASS)
    shutil.rmtree(copy / CLASS / REFERENCE_MASKS_DIR)
    assert not load_class(copy, CLASS).has_reference_masks


def test_clean_preset_keeps_its_cache_folder():
    # the capture settings left out of the key: clean datasets already generated stay valid
    assert make_settings("small").key() == "852d737ce844"
    assert make_settings("realistic").key() != make_settings("small").key()
    assert make_settings("small", jpeg_quality=90).key() != make_settings("small").key()


def test_object_mask_formats(tmp_path):
    grey = np.array([[0, 128], [255, 64]], dtype=np.uint8)
    Image.fromarray(grey).save(tmp_path / "l.png")
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[..., 3] = grey
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    for name in ("l.png", "rgba.png"):
        assert np.allclose(read_object_mask(tmp_path / name), grey / 255.0)


def test_a_turned_light_moves_the_shading_of_test_views_only(roots, tmp_path):
    """``test_light_turn_deg`` turns the renderer's lights for each test view: the train views, the poses
    and the defect masks stay those of the clean preset, and a good test view is shaded otherwise (its
    object pixels change, its outline does not)."""
    clean = roots[0] / CLASS
    turned = ensure_synthetic_dataset(tmp_path, [CLASS], preset="tiny", test_light_turn_deg=60.0) / CLASS
    assert _digest(clean, "train/good/*.png") == _digest(turned, "train/good/*.png")
    assert _digest(clean, "ground_truth/*/*.png") == _digest(turned, "ground_truth/*/*.png")
    assert json.loads((clean / "test_poses.json").read_text()) == json.loads((turned / "test_poses.json").read_text())
    before, after = read_image(clean / "test/good/000.png"), read_image(turned / "test/good/000.png")
    on_object = (before < 0.99).any(-1)
    assert np.array_equal(on_object, (after < 0.99).any(-1)), "the outline does not move with the light"
    assert np.abs(after - before)[on_object].mean() > 0.01, "the shading did not change"


def test_the_parts_shadow_darkens_the_bench_next_to_it():
    from splatpose.data.capture_effects import cast_shadow

    alpha = np.zeros((64, 64))
    alpha[24:40, 24:40] = 1.0
    factor = cast_shadow(alpha, np.random.default_rng(0), 0.3)
    assert factor.min() >= 0.7 - 1e-9 and factor.max() <= 1.0
    assert factor[32, 32] < 0.85 and factor[0, 0] > 0.99, "dark under and beside the part, untouched far away"


def test_a_fixed_bench_stands_behind_every_view(roots, tmp_path):
    """``fixed_bench``: every view's bench, reference and test, is a crop of one bench of the class (found in
    it at some offset, clutter aside); without it, a test view's bench is another one. Poses and masks stay
    the realistic preset's."""
    from scipy.ndimage import binary_dilation

    from splatpose.data.synthetic import CaptureDraws

    settings = make_settings("tiny_realistic", fixed_bench=True, clutter_shapes=(0, 0))
    fixed = ensure_synthetic_dataset(tmp_path, [CLASS], preset="tiny_realistic", fixed_bench=True,
                                     clutter_shapes=(0, 0)) / CLASS
    assert _digest(roots[1] / CLASS, "ground_truth/*/*.png") == _digest(fixed, "ground_truth/*/*.png")
    bench = CaptureDraws(settings, CLASS).bench
    assert bench is not None and bench.shape[:2] == (2 * settings.height, 2 * settings.width)

    def crop_error(image_path, mask) -> float:
        """How far the view's bench pixels (outside ``mask``) are from the best-matching crop of the bench."""
        image, h, w = read_image(image_path), settings.height, settings.width
        outside = ~mask
        return min(np.abs(image - bench[y:y + h, x:x + w])[outside].mean()
                   for y in range(h + 1) for x in range(w + 1))

    train_mask = read_object_mask(fixed / REFERENCE_MASKS_DIR / "0.png") > 0.01
    test_mask = ~(read_image(roots[0] / CLASS / "test/good/000.png") > 0.99).all(-1)
    test_mask = binary_dilation(test_mask, iterations=4)  # the shadow, the noise and JPEG aside, near the part
    assert crop_error(fixed / "train/good/0.png", binary_dilation(train_mask, iterations=4)) < 0.1
    assert crop_error(fixed / "test/good/000.png", test_mask) < 0.1   # (the test view's light: its gain)
    assert crop_error(roots[1] / CLASS / "test/good/000.png", test_mask) > 0.2
