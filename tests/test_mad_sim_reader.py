"""The MAD-Sim reader on a generated dataset and on broken copies of it: each validation error, with
the file it names and its fix."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from splatpose.data import DatasetError, list_classes, load_class, read_image, read_mask, resolve_dataset
from splatpose.data.cameras import opengl_c2w_to_opencv_w2c

CLASS = "01Ant"


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    """A tiny generated dataset (64x64, 6 train views), shared by the data tests of this session."""
    from splatpose.data.synthetic import ensure_synthetic_dataset

    return ensure_synthetic_dataset(tmp_path_factory.getbasetemp() / "synthetic", [CLASS], preset="tiny")


@pytest.fixture
def broken(tiny_root, tmp_path):
    """A private copy of the tiny dataset that a test may damage: returns (dataset root, class folder)."""
    shutil.copytree(tiny_root / CLASS, tmp_path / CLASS)
    return tmp_path, tmp_path / CLASS


def test_reads_generated_class(tiny_root):
    data = load_class(tiny_root, CLASS)
    assert (data.width, data.height) == (64, 64)
    assert [v.name for v in data.train] == [f"train/good/{i}.png" for i in range(6)]
    assert data.K[0, 2] == 32.0 and data.K[1, 2] == 32.0
    counts = {d: sum(t.defect == d for t in data.test) for d in ("good", "Burrs", "Missing", "Stains")}
    assert counts == {"good": 2, "Burrs": 1, "Missing": 1, "Stains": 1}
    for image in data.test:
        assert image.label == (image.defect != "good")
        assert (image.mask_path is None) == (image.defect == "good")
    # Poses are converted once, at the boundary: OpenCV world-to-camera.
    frames = json.loads((tiny_root / CLASS / "transforms.json").read_text())["frames"]
    np.testing.assert_allclose(data.train[3].w2c, opengl_c2w_to_opencv_w2c(np.array(frames[3]["transform_matrix"])))
    assert set(data.test_poses) == {t.name for t in data.test}
    assert list_classes(tiny_root) == [CLASS]


def test_read_image_and_mask(tiny_root):
    data = load_class(tiny_root, CLASS)
    image = read_image(data.train[0].path)
    assert image.shape == (64, 64, 3) and image.dtype == np.float32
    assert 0.0 <= image.min() and image.max() <= 1.0
    assert (image[0, 0] == 1.0).all(), "background is white"
    mask = read_mask(next(t for t in data.test if t.defect == "Stains").mask_path)
    assert mask.dtype == bool and mask.shape == (64, 64) and mask.any()


def test_rgba_is_composited_on_white(tmp_path):
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 255            # red ...
    rgba[:2, :, 3] = 255          # ... opaque in the top half, fully transparent below
    rgba[2, 0, 3] = 128           # one half-transparent pixel
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    image = read_image(tmp_path / "a.png")
    np.testing.assert_allclose(image[0, 0], [1, 0, 0])
    np.testing.assert_allclose(image[3, 3], [1, 1, 1])
    np.testing.assert_allclose(image[2, 0], [1, 127 / 255, 127 / 255], atol=1e-6)


def test_frame_paths_without_extension_are_accepted(broken):
    root, class_dir = broken
    meta = json.loads((class_dir / "transforms.json").read_text())
    for frame in meta["frames"]:
        frame["file_path"] = "./" + frame["file_path"][: -len(".png")]  # ./train/good/0
    (class_dir / "transforms.json").write_text(json.dumps(meta))
    assert load_class(root, CLASS).train[1].name == "train/good/1.png"


def test_test_poses_are_optional(broken):
    root, class_dir = broken
    (class_dir / "test_poses.json").unlink()
    assert load_class(root, CLASS).test_poses is None


def test_class_without_transforms_is_read_with_unknown_poses(broken):
    root, class_dir = broken
    (class_dir / "transforms.json").unlink()
    data = load_class(root, CLASS)
    assert not data.poses_known and data.K is None
    assert [v.name for v in data.train] == [f"train/good/{i}.png" for i in range(6)]
    assert all(v.w2c is None for v in data.train)
    assert list_classes(root) == [CLASS]


def test_missing_transforms_and_train_images(broken):
    root, class_dir = broken
    (class_dir / "transforms.json").unlink()
    shutil.rmtree(class_dir / "train")
    with pytest.raises(DatasetError, match=r"01Ant/transforms.json: missing transforms.json and no images in"):
        load_class(root, CLASS)


def test_frame_count_differs_from_train_images(broken):
    root, class_dir = broken
    (class_dir / "train" / "good" / "5.png").unlink()
    with pytest.raises(DatasetError, match=r"transforms.json: 6 frames but 5 images"):
        load_class(root, CLASS)


def test_defect_image_without_mask(broken):
    root, class_dir = broken
    (class_dir / "ground_truth" / "Burrs" / "000_mask.png").unlink()
    with pytest.raises(DatasetError, match=r"Burrs/000.png: defect image without its mask; expected .*000_mask.png"):
        load_class(root, CLASS)


def test_mask_size_differs_from_image(broken):
    root, class_dir = broken
    mask_path = class_dir / "ground_truth" / "Stains" / "000_mask.png"
    Image.open(mask_path).resize((32, 32)).save(mask_path)
    with pytest.raises(DatasetError, match=r"000_mask.png: mask size 32x32 differs from its image"):
        load_class(root, CLASS)


def test_truncated_image(broken):
    root, class_dir = broken
    path = class_dir / "test" / "good" / "001.png"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match=r"001.png: truncated PNG"):
        load_class(root, CLASS)
    with pytest.raises(DatasetError, match=r"001.png: truncated PNG"):
        read_image(path)


def test_image_damaged_in_the_middle_stops_the_data_stage(broken):
    """Its end chunk is intact, so a header check passes it; the data stage decodes every image."""
    root, class_dir = broken
    path = class_dir / "train" / "good" / "3.png"
    data = bytearray(path.read_bytes())
    data[len(data) // 2:len(data) // 2 + 16] = bytes(16)
    path.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match=r"3.png: corrupt PNG \(chunk 'IDAT' .* CRC"):
        load_class(root, CLASS)


def test_missing_transforms_is_named_not_an_unknown_class(broken):
    root, class_dir = broken
    (class_dir / "transforms.json").unlink()
    shutil.rmtree(class_dir / "train")
    with pytest.raises(DatasetError, match=r"01Ant.transforms.json: missing transforms.json and no images"):
        resolve_dataset(OmegaConf.create({"name": "custom", "root": str(root)}), CLASS)


def test_non_finite_pose_is_named_as_such(broken):
    root, class_dir = broken
    meta = json.loads((class_dir / "transforms.json").read_text())
    meta["frames"][2]["transform_matrix"][0][3] = float("nan")
    (class_dir / "transforms.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match=r"frames\[2\].transform_matrix holds NaN or infinite values"):
        load_class(root, CLASS)


def test_unreadable_image(broken):
    root, class_dir = broken
    (class_dir / "train" / "good" / "2.png").write_bytes(b"not an image at all")
    with pytest.raises(DatasetError, match=r"2.png: unreadable image"):
        load_class(root, CLASS)


def test_empty_test_set(broken):
    root, class_dir = broken
    shutil.rmtree(class_dir / "test")
    with pytest.raises(DatasetError, match="empty test set"):
        load_class(root, CLASS)


def test_unknown_test_folder(broken):
    root, class_dir = broken
    (class_dir / "test" / "Stains").rename(class_dir / "test" / "stains")
    with pytest.raises(DatasetError, match=r"unknown test folder 'stains'.*ground_truth/stains/.*case-sensitive"):
        load_class(root, CLASS)


def test_any_defect_folder_with_its_masks_is_a_defect_type(broken):
    """Generated families have defect types of their own (e.g. parts' Scratch): any test folder other
    than good is a defect type, as long as ground_truth/<name>/ holds its masks."""
    root, class_dir = broken
    (class_dir / "test" / "Stains").rename(class_dir / "test" / "Scratch")
    (class_dir / "ground_truth" / "Stains").rename(class_dir / "ground_truth" / "Scratch")
    data = load_class(root, CLASS)
    scratch = [t for t in data.test if t.defect == "Scratch"]
    assert [t.name for t in scratch] == ["test/Scratch/000.png"] and scratch[0].label == 1
    assert scratch[0].mask_path == class_dir / "ground_truth" / "Scratch" / "000_mask.png"
    assert [t.defect for t in data.test] == ["good", "good", "Burrs", "Missing", "Scratch"]
    (class_dir / "ground_truth" / "Scratch" / "000_mask.png").unlink()
    with pytest.raises(DatasetError, match=r"Scratch/000.png: defect image without its mask"):
        load_class(root, CLASS)


def test_unknown_class_lists_the_available_ones(tiny_root):
    with pytest.raises(DatasetError, match=r"unknown class '01Gorilla'.*01Ant"):
        load_class(tiny_root, "01Gorilla")


def test_resolve_dataset_errors_name_the_fix(tiny_root, tmp_path):
    custom = OmegaConf.create({"name": "custom", "root": str(tiny_root), "classes": None})
    assert resolve_dataset(custom, CLASS).class_name == CLASS
    with pytest.raises(DatasetError, match=r"unknown class 'nope'.*classes found there: 01Ant"):
        resolve_dataset(custom, "nope")
    missing = OmegaConf.create({"name": "mad_sim", "root": str(tmp_path / "nowhere")})
    with pytest.raises(DatasetError, match=r"nowhere does not exist.*dataset.root.*MAD_SIM_ROOT"):
        resolve_dataset(missing, "01Gorilla")
    with pytest.raises(DatasetError, match=r"needs its root folder.*dataset.root="):
        resolve_dataset(OmegaConf.create({"name": "mad_sim", "root": None}), "01Gorilla")
    synthetic = OmegaConf.create({"name": "synthetic", "root": str(tmp_path), "classes": ["01Ant"],
                                  "preset": "tiny", "generator": {}})
    with pytest.raises(DatasetError, match=r"unknown class '01Gorilla' for dataset=synthetic; its classes: 01Ant"):
        resolve_dataset(synthetic, "01Gorilla")


def test_resolve_synthetic_reuses_the_generated_class(tiny_root):
    """The conf/dataset/synthetic.yaml shape: null generator fields keep the preset's values."""
    cfg = OmegaConf.load(Path(__file__).parents[1] / "conf" / "dataset" / "synthetic.yaml")
    cfg.root = str(tiny_root.parent)
    cfg.preset = "tiny"
    data = resolve_dataset(cfg, CLASS)
    assert data.root == tiny_root / CLASS


def test_fingerprint_changes_when_a_file_changes(broken):
    """The stage cache keys on the fingerprint: replacing an image must not reuse results of the old one."""
    root, class_dir = broken
    before = load_class(root, CLASS).fingerprint()
    assert load_class(root, CLASS).fingerprint() == before, "same files, same fingerprint"
    image = class_dir / "train" / "good" / "0.png"
    original = image.read_bytes()
    Image.open(image).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(image)
    assert load_class(root, CLASS).fingerprint() != before
    # the same content written again (a fresh copy, another machine: new times) is the same dataset
    image.write_bytes(original)
    assert load_class(root, CLASS).fingerprint() == before
