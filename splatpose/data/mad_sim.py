"""Reader for datasets in the MAD-Sim layout (the PAD benchmark), with validation.

One class folder looks like this (see shared/MAD_SIM_FORMAT.md)::

    <root>/<class>/transforms.json            camera_angle_x + frames (train poses, OpenGL c2w); optional:
                                              without it the reference cameras are estimated (poses_known)
    <root>/<class>/train/good/0.png ...       posed, defect-free views
    <root>/<class>/test/{good,Burrs,Missing,Stains}/*.png   (any other defect folder name works too)
    <root>/<class>/ground_truth/<defect>/<stem>_mask.png
    <root>/<class>/test_poses.json            optional: true test poses (only in generated data)
    <root>/<class>/train/masks/<stem>.png     optional: the object's mask in each train view (8-bit
                                              grey or alpha, 255 = object; soft edges allowed); all or none

:func:`load_class` checks the whole folder up front (file headers only, so it is cheap) and raises a
:class:`DatasetError` that names the file, what is wrong and how to fix it, so that a broken dataset
stops a run before any expensive stage. Poses are converted once, here, to OpenCV world-to-camera.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyspng
from PIL import Image, ImageOps, UnidentifiedImageError

from splatpose.errors import UserError
from splatpose.data.cameras import intrinsics_from_fov_x, opengl_c2w_to_opencv_w2c

# MAD-Sim's defect types; the reader accepts any other test folder name too (with its masks).
DEFECT_TYPES = ("Burrs", "Missing", "Stains")
GOOD = "good"
TRANSFORMS_FILE = "transforms.json"
TEST_POSES_FILE = "test_poses.json"
# Optional object masks of the train views: train/masks/<stem of the train image>.png.
REFERENCE_MASKS_DIR = "train/masks"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class DatasetError(UserError):
    """A dataset folder that cannot be used as it is; the message names the file and the fix."""


@dataclass(frozen=True)
class TrainView:
    """A posed, defect-free training image.

    name: path relative to the class folder, e.g. "train/good/0.png".
    w2c: [4, 4] float64 world-to-camera, OpenCV axes (x right, y down, z forward); None in a class
        without transforms.json (poses unknown until estimated: splatpose.sfm.estimated_poses).
    mask_path: the object's mask in this view (train/masks/<stem>.png), None when the class ships none.
    """

    name: str
    path: Path
    w2c: np.ndarray | None
    mask_path: Path | None = None


@dataclass(frozen=True)
class TestImage:
    """A query image of unknown pose. defect is "good" or the name of its test folder (MAD-Sim's
    DEFECT_TYPES, or any other defect type of a generated family); mask_path is None for good."""

    name: str
    path: Path
    defect: str
    mask_path: Path | None

    @property
    def label(self) -> int:
        """Image-level label: 0 for good, 1 for any defect."""
        return 0 if self.defect == GOOD else 1


@dataclass
class ClassData:
    """Everything the pipeline needs about one object class.

    K: [3, 3] float64 pinhole intrinsics shared by all images (COLMAP pixel convention); None when the
        class has no transforms.json (intrinsics unknown until estimated).
    test_poses: true world-to-camera [4, 4] (OpenCV) per test image name; only generated datasets
        have them (used to measure localization, never to localize).
    """

    root: Path
    class_name: str
    width: int
    height: int
    K: np.ndarray | None
    train: list[TrainView]
    test: list[TestImage]
    test_poses: dict[str, np.ndarray] | None = None

    @property
    def poses_known(self) -> bool:
        """Whether the train views come with poses and intrinsics (a transforms.json)."""
        return self.K is not None and all(view.w2c is not None for view in self.train)

    @property
    def has_reference_masks(self) -> bool:
        """Whether every train view comes with an object mask."""
        return bool(self.train) and all(view.mask_path is not None for view in self.train)

    @property
    def train_w2c(self) -> np.ndarray:
        """[N, 4, 4] world-to-camera matrices of the train views, in ``train`` order."""
        return np.stack([view.w2c for view in self.train])

    def fingerprint(self) -> str:
        """A short hash of the class's files (relative path and content of every image, mask and pose
        file): the stage cache keys on it, and each stage seeds its random state from its key. So
        editing or replacing a file recomputes every stage, while the same files anywhere (another
        folder, a fresh copy, another machine) give the same keys and the same results. Hashing the
        content costs about 0.1 s per 50 MB."""
        files = [self.root / TRANSFORMS_FILE, self.root / TEST_POSES_FILE]
        files += [view.path for view in self.train] + [t.path for t in self.test]
        files += [t.mask_path for t in self.test if t.mask_path]
        files += [view.mask_path for view in self.train if view.mask_path]
        digest = hashlib.sha256()
        for path in files:
            if Path(path).exists():
                content = hashlib.sha256(Path(path).read_bytes()).hexdigest()
                digest.update(f"{Path(path).relative_to(self.root)}|{content}\n".encode())
        return digest.hexdigest()[:16]


# --------------------------------------------------------------------------------------------------
# Images


def read_image(path: Path) -> np.ndarray:
    """Decode an image to float32 RGB [H, W, 3] in [0, 1]; transparency is composited onto white.

    Raises DatasetError for missing, unreadable or truncated files.
    """
    return pixels_to_float(decode_pixels(path))


def decode_pixels(path: Path, fast: bool = True) -> np.ndarray:
    """Decode an image to uint8 [H, W, 3] (opaque RGB) or [H, W, 4] (RGBA: anything with transparency,
    and every other mode); ``pixels_to_float`` makes the float image ``read_image`` returns.

    The format is taken from the file's content, never its name (a JPEG named .png is read as the
    JPEG it is). Modes: 8- and 16-bit grey, grey+alpha, palette, RGB and RGBA PNGs (16-bit values
    keep their high byte, v >> 8: Pillow's reading of 16-bit colour, applied to grey too), and JPEGs (grey, RGB, CMYK) turned upright by their EXIF
    orientation. A PNG whose chunks fail their CRC is refused (libspng would decode it to garbage).

    With ``fast``, 8-bit RGB and RGBA PNGs, what renderers and cameras write, go through libspng
    (pyspng): several times faster than Pillow (experiments/results/notes_data_io.md) and, PNG being
    lossless, the same pixels. Every other file, any file libspng refuses, and every file without
    ``fast`` go through Pillow, whose errors name the problem. libspng holds the GIL while it decodes
    and Pillow does not: threads that decode in the background, beside a thread that runs the GPU,
    pass ``fast=False``.

    Raises DatasetError for missing, empty, unreadable, corrupt or truncated files and for modes that
    have no RGB reading (32-bit float), naming the file and what is wrong.
    """
    path = Path(path)
    return decode_image_bytes(_read_image_bytes(path), str(path), fast)


def decode_image_bytes(data: bytes, label: str, fast: bool = True) -> np.ndarray:
    """``decode_pixels`` of an encoded image held in memory (an upload); ``label`` names it in errors."""
    if not data:
        raise DatasetError(f"{label}: empty image (0 bytes); send the image's PNG or JPEG bytes")
    if data.startswith(PNG_SIGNATURE):
        damage = png_damage(data)
        if damage:
            raise DatasetError(f"{label}: {damage}; re-export or re-copy this file")
    if fast and spng_decodes_exactly(data):
        try:
            return pyspng.load(data)
        except RuntimeError:
            pass  # Pillow says what is wrong
    return _decode_with_pillow(label, data)


def _read_image_bytes(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError as e:
        raise DatasetError(f"{path}: image file not found") from e
    except OSError as e:
        raise DatasetError(f"{path}: unreadable image file ({e})") from e
    if not data:
        raise DatasetError(f"{path}: empty file (0 bytes); re-export or re-copy this file")
    return data


def _decode_with_pillow(path: Path | str, data: bytes) -> np.ndarray:
    try:
        im = Image.open(io.BytesIO(data))  # the format comes from the content, not the file name
    except UnidentifiedImageError as e:
        raise DatasetError(f"{path}: unreadable image, in no format Pillow reads (its first bytes: {data[:8]!r}); "
                           "save it as PNG or JPEG") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise DatasetError(f"{path}: unreadable image ({e}); re-export or re-copy this file") from e
    with im:
        try:
            im.load()
        except (OSError, SyntaxError, ValueError) as e:
            raise DatasetError(f"{path}: unreadable or truncated {im.format or 'image'} ({e}); re-export or "
                               "re-copy this file") from e
        return _pillow_to_pixels(path, im)


def _pillow_to_pixels(path: Path | str, im: Image.Image) -> np.ndarray:
    """A loaded Pillow image as uint8 RGB (opaque) or RGBA, upright; see ``decode_pixels``."""
    file_format = im.format
    if file_format != "PNG":
        im = ImageOps.exif_transpose(im)  # cameras store portrait shots as rotated landscape + a tag
    if im.mode in SIXTEEN_BIT_GREY_MODES:
        grey = np.asarray(im).astype(np.int64)
        if grey.min() < 0 or grey.max() > 65535:
            raise DatasetError(f"{path}: {im.mode} image with values outside 0..65535; save it as 8- or "
                               "16-bit PNG")
        grey = (grey >> 8).astype(np.uint8)  # the high byte, as Pillow reads 16-bit colour PNGs
        return np.repeat(grey[..., None], 3, axis=2)
    if im.mode not in PILLOW_RGB_MODES:
        raise DatasetError(f"{path}: {file_format} image of mode {im.mode} has no RGB reading here; save it "
                           "as an 8- or 16-bit PNG or a JPEG")
    opaque_rgb = im.mode in ("RGB", "L", "CMYK", "YCbCr", "1") and "transparency" not in im.info
    return np.asarray(im.convert("RGB") if opaque_rgb else im.convert("RGBA"))


# Pillow's modes for 16-bit grey PNGs (and 32-bit integer grey, which Pillow uses for some of them).
SIXTEEN_BIT_GREY_MODES = ("I;16", "I;16B", "I;16L", "I")
# Modes that Pillow converts to RGB(A) without losing meaning (16-bit RGB(A) PNGs open as RGB(A)).
PILLOW_RGB_MODES = ("1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr")


def png_damage(data: bytes) -> str | None:
    """What is wrong with a PNG's chunk structure ("truncated PNG (...)" or "corrupt PNG (...)"), or
    None when it is intact: every chunk's CRC
    (crc32 of type + data, a fraction of a millisecond per image), the chunks fitting in the file, and an
    IEND chunk at the end. Catches damage anywhere in the file, the middle included."""
    offset = len(PNG_SIGNATURE)
    while offset + 12 <= len(data):  # each chunk: 4-byte length, 4-byte type, data, 4-byte CRC
        length, kind = int.from_bytes(data[offset:offset + 4], "big"), data[offset + 4:offset + 8]
        end = offset + 12 + length
        if end > len(data):
            return f"truncated PNG (chunk {kind.decode('latin-1')!r} at byte {offset} runs past the end of the file)"
        crc = int.from_bytes(data[end - 4:end], "big")
        if zlib.crc32(data[offset + 4:end - 4]) != crc:
            return f"corrupt PNG (chunk {kind.decode('latin-1')!r} at byte {offset} fails its CRC check)"
        if kind == b"IEND":
            return None
        offset = end
    return "truncated PNG (no IEND chunk at the end of the file)"


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_RGB8, PNG_RGBA8 = 2, 6  # IHDR colour types with bit depth 8


def spng_decodes_exactly(data: bytes) -> bool:
    """Whether libspng's automatic format gives what ``decode_pixels`` promises for this file: an 8-bit
    RGBA PNG, or an 8-bit RGB PNG without a transparent colour (a tRNS chunk, which libspng's default
    decode ignores). The IHDR chunk comes first in every PNG: width, height, bit depth (byte 24), colour
    type (byte 25); a tRNS chunk comes before the first IDAT, so the chunks are walked up to there."""
    if len(data) < 33 or not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR" or data[24] != 8:
        return False
    if data[25] == PNG_RGBA8:
        return True
    if data[25] != PNG_RGB8:
        return False
    offset = len(PNG_SIGNATURE)
    while offset + 8 <= len(data):  # each chunk: 4-byte length, 4-byte type, data, 4-byte CRC
        length, kind = int.from_bytes(data[offset:offset + 4], "big"), data[offset + 4:offset + 8]
        if kind in (b"IDAT", b"tRNS"):
            return kind == b"IDAT"
        offset += 12 + length
    return False  # no image data: let Pillow say what is wrong


def pixels_to_float(pixels: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3|4] -> float32 RGB [H, W, 3] in [0, 1], transparency composited onto white.

    The detector does the same on its GPU (``splatpose.detect.inputs.pixels_to_float_torch``, equal to
    the bit), so that it uploads a quarter of the bytes.
    """
    # Compositing only where there is transparency: for an opaque image rgb * 1 + (1 - 1) is rgb
    # exactly, and skipping the float RGBA pass saves most of the conversion's time (the detector's load).
    rgb = pixels[..., :3].astype(np.float32) / 255.0
    if pixels.shape[-1] == 3 or pixels[..., 3].min() == 255:
        return rgb
    alpha = pixels[..., 3:].astype(np.float32) / 255.0
    return rgb * alpha + (1.0 - alpha)


def _open_mask(path: Path, missing: str, unreadable: str, fix: str) -> Image.Image:
    """The decoded mask image at ``path``; DatasetError "<path>: <missing> not found" or "<path>: unreadable
    or truncated <unreadable> (<why>); <fix>"."""
    try:
        with Image.open(path) as im:
            im.load()
            return im
    except FileNotFoundError as e:
        raise DatasetError(f"{path}: {missing} not found") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise DatasetError(f"{path}: unreadable or truncated {unreadable} ({e}); {fix}") from e


def read_mask(path: Path) -> np.ndarray:
    """Decode a ground-truth mask to bool [H, W]: any value > 0 (in any channel) is defect."""
    values = np.asarray(_open_mask(Path(path), "mask file", "mask", "re-export or re-copy this file"))
    if values.ndim == 3:
        # An RGBA mask's alpha channel is opacity, not a label.
        values = values[..., :3] if values.shape[-1] == 4 else values
        values = values.max(axis=-1)
    return values > 0


def read_object_mask(path: Path) -> np.ndarray:
    """Decode an object mask to float32 [H, W] in [0, 1] (1 = object): a grey file's value (8 or 16
    bit), an RGBA or grey+alpha file's alpha, an RGB file's largest channel."""
    im = _open_mask(Path(path), "object mask", "object mask", "re-export it")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return np.asarray(im.convert("RGBA"))[..., 3].astype(np.float32) / 255.0
    values = np.asarray(im)
    if values.ndim == 3:
        values = values[..., :3].max(axis=-1)
    if values.dtype == bool:
        return values.astype(np.float32)
    scale = 255.0 if values.dtype == np.uint8 else 65535.0
    return np.clip(values.astype(np.float32) / scale, 0.0, 1.0)


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image as ``decode_pixels`` reads it (upright), after decoding it whole.

    The data stage calls this on every image and mask of a class, so a damaged, truncated, empty or
    unsupported file stops the run in its first seconds, naming the file, instead of failing (or being
    misread) in a later stage. Decoding costs about 1-4 ms per 400^2 image.
    """
    pixels = decode_pixels(Path(path))
    return pixels.shape[1], pixels.shape[0]


# --------------------------------------------------------------------------------------------------
# Class folders


def list_classes(root: Path) -> list[str]:
    """Names of the class folders under a dataset root, sorted: those holding a transforms.json, or
    without one (poses to be estimated) train/good/ images.

    Hidden folders (a generator's unfinished ``.tmp-*`` output) are never classes.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset root does not exist or is not a folder")
    return sorted(p.name for p in root.iterdir()
                  if p.is_dir() and not p.name.startswith(".")
                  and ((p / TRANSFORMS_FILE).is_file() or images_in(p / "train" / GOOD)))


def load_class(root: Path, class_name: str) -> ClassData:
    """Read and validate one class folder ``root/class_name`` of a MAD-Sim-layout dataset.

    A class without transforms.json is read with unknown poses (``K`` and every ``w2c`` None; its
    train views are the images of train/good/): its reference cameras are estimated from the images.

    Raises:
        DatasetError: naming the file, the problem and the fix, for: unknown class, no transforms.json
            and no train/good/ images, a malformed transforms.json, frame count != number of train images, unreadable or truncated
            images, images of different sizes, a defect image without its mask, a mask whose size
            differs from its image, a defect test folder without its ground_truth folder, an empty test set.
    """
    root = Path(root)
    class_dir = root / class_name
    if not class_dir.is_dir():
        available = list_classes(root)
        raise DatasetError(f"{class_dir}: unknown class {class_name!r}; classes under {root}: "
                           f"{', '.join(available) if available else '(none)'}")
    if (class_dir / TRANSFORMS_FILE).is_file():
        camera_angle_x, train = _read_train_views(class_dir)
    else:
        camera_angle_x, train = None, _unposed_train_views(class_dir)
    width, height = common_image_size([view.path for view in train], class_dir)
    train = _attach_reference_masks(class_dir, train, width, height)
    test = _read_test_images(class_dir, width, height)
    return ClassData(
        root=class_dir,
        class_name=class_name,
        width=width,
        height=height,
        K=None if camera_angle_x is None else intrinsics_from_fov_x(camera_angle_x, width, height),
        train=train,
        test=test,
        test_poses=_read_test_poses(class_dir, test),
    )


def _attach_reference_masks(class_dir: Path, train: list[TrainView], width: int, height: int) -> list[TrainView]:
    """The train views with their object masks from train/masks/ (when that folder exists: then every
    view needs its mask, of its size)."""
    mask_dir = class_dir / REFERENCE_MASKS_DIR
    if not mask_dir.is_dir():
        return train
    views = []
    for view in train:
        mask = mask_dir / f"{view.path.stem}.png"
        if not mask.is_file():
            raise DatasetError(f"{mask}: {mask_dir} holds object masks but none for the train image {view.path}; "
                               "add it (255 = object), or remove the folder to use no masks")
        size = image_size(mask)
        if size != (width, height):
            raise DatasetError(f"{mask}: mask size {size[0]}x{size[1]} differs from its image {view.path} "
                               f"({width}x{height}); re-export the mask at the image's size")
        views.append(dataclasses.replace(view, mask_path=mask))
    return views


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise DatasetError(f"{path}: missing {path.name} ({what}); every class folder of the MAD-Sim "
                           "layout needs one")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: not valid JSON ({e}); re-export the file") from e


def _normalise_frame_path(file_path: str) -> str:
    """'./train/good/0' or 'train/good/0.png' -> 'train/good/0.png' (both spellings exist in the wild)."""
    name = file_path.replace("\\", "/")
    while name.startswith("./"):
        name = name[2:]
    if Path(name).suffix.lower() not in IMAGE_SUFFIXES:
        name += ".png"
    return name


def _natural_key(path: Path) -> tuple:
    """Sort 2.png before 10.png."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name))


def images_in(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), key=_natural_key)


def _read_train_views(class_dir: Path) -> tuple[float, list[TrainView]]:
    transforms_path = class_dir / TRANSFORMS_FILE
    meta = _read_json(transforms_path, "camera_angle_x and the train poses")
    if "camera_angle_x" not in meta:
        raise DatasetError(f"{transforms_path}: field 'camera_angle_x' (horizontal field of view, radians) "
                           "is missing; add it")
    frames = meta.get("frames")
    if not isinstance(frames, list) or not frames:
        raise DatasetError(f"{transforms_path}: field 'frames' is missing or empty; it must list one "
                           "frame (file_path, transform_matrix) per train image")
    train_images = images_in(class_dir / "train" / GOOD)
    if len(frames) != len(train_images):
        raise DatasetError(f"{transforms_path}: {len(frames)} frames but {len(train_images)} images in "
                           f"{class_dir / 'train' / GOOD}; every train image needs exactly one frame "
                           "(remove the extra images or frames)")
    views = []
    for i, frame in enumerate(frames):
        name = _normalise_frame_path(frame["file_path"]) if "file_path" in frame else f"train/good/{i}.png"
        path = class_dir / name
        if not path.is_file():
            raise DatasetError(f"{transforms_path}: frames[{i}].file_path points to {path}, which does not "
                               "exist; fix the path or add the image")
        try:
            c2w = np.asarray(frame["transform_matrix"], dtype=np.float64)
        except (KeyError, TypeError, ValueError) as e:
            raise DatasetError(f"{transforms_path}: frames[{i}].transform_matrix is missing or not numeric "
                               "(expected a 4x4 camera-to-world matrix)") from e
        if c2w.shape != (4, 4):
            raise DatasetError(f"{transforms_path}: frames[{i}].transform_matrix must be a 4x4 "
                               f"camera-to-world matrix, got shape {c2w.shape}")
        if not np.isfinite(c2w).all():
            raise DatasetError(f"{transforms_path}: frames[{i}].transform_matrix holds NaN or infinite values; "
                               "every pose must be a finite 4x4 camera-to-world matrix (re-export the poses)")
        views.append(TrainView(name=name, path=path, w2c=opengl_c2w_to_opencv_w2c(c2w)))
    return float(meta["camera_angle_x"]), views


def _unposed_train_views(class_dir: Path) -> list[TrainView]:
    """The train views of a class without transforms.json: every image of train/good/, poses unknown."""
    images = images_in(class_dir / "train" / GOOD)
    if not images:
        raise DatasetError(f"{class_dir / TRANSFORMS_FILE}: missing transforms.json and no images in "
                           f"{class_dir / 'train' / GOOD}; put the defect-free photos there (their cameras are "
                           "then estimated from the images), with or without a transforms.json of their poses")
    return [TrainView(name=path.relative_to(class_dir).as_posix(), path=path, w2c=None) for path in images]


def common_image_size(paths: list[Path], class_dir: Path) -> tuple[int, int]:
    sizes = {path: image_size(path) for path in paths}
    first = paths[0]
    for path, size in sizes.items():
        if size != sizes[first]:
            raise DatasetError(f"{path}: image size {size[0]}x{size[1]} differs from {first} "
                               f"({sizes[first][0]}x{sizes[first][1]}); all images of {class_dir.name} "
                               "must share one size (and one camera)")
    return sizes[first]


def _read_test_images(class_dir: Path, width: int, height: int) -> list[TestImage]:
    test_dir = class_dir / "test"
    test = []
    for defect in _test_folders(class_dir):
        for path in images_in(test_dir / defect):
            size = image_size(path)
            if size != (width, height):
                raise DatasetError(f"{path}: image size {size[0]}x{size[1]} differs from the train images "
                                   f"({width}x{height}); all images of a class must share one size")
            mask_path = None
            if defect != GOOD:
                mask_path = class_dir / "ground_truth" / defect / f"{path.stem}_mask.png"
                if not mask_path.is_file():
                    raise DatasetError(f"{path}: defect image without its mask; expected {mask_path} "
                                       "(single channel, same size, > 0 marks the defect)")
                mask_size = image_size(mask_path)
                if mask_size != size:
                    raise DatasetError(f"{mask_path}: mask size {mask_size[0]}x{mask_size[1]} differs from "
                                       f"its image {path} ({size[0]}x{size[1]}); re-export the mask at "
                                       "the image size")
            test.append(TestImage(name=path.relative_to(class_dir).as_posix(), path=path, defect=defect,
                                  mask_path=mask_path))
    if not test:
        raise DatasetError(f"{test_dir}: empty test set; put query images in test/good/ and "
                           f"test/<defect>/ ({', '.join(DEFECT_TYPES)})")
    return test


def _test_folders(class_dir: Path) -> tuple[str, ...]:
    """The test folders of a class: ``good``, then every other folder under test/ (a defect type, sorted:
    MAD-Sim's Burrs, Missing, Stains, or any other name) that holds images. A defect folder needs its
    masks folder ground_truth/<name>/ (same name, case-sensitive)."""
    test_dir = class_dir / "test"
    if not test_dir.is_dir():
        return (GOOD,)
    defects = sorted(p.name for p in test_dir.iterdir() if p.is_dir() and p.name != GOOD and images_in(p))
    for defect in defects:
        if not (class_dir / "ground_truth" / defect).is_dir():
            truth = class_dir / "ground_truth"
            held = sorted(p.name for p in truth.iterdir() if p.is_dir()) if truth.is_dir() else []
            raise DatasetError(f"{test_dir / defect}: unknown test folder {defect!r}: a defect folder needs its "
                               f"masks in {truth / defect}/, which does not exist (names are case-sensitive; "
                               f"ground_truth/ holds: {', '.join(held) if held else '(nothing)'}); rename the "
                               "folder to match its masks, add the masks, or remove it")
    return (GOOD, *defects)


def _read_test_poses(class_dir: Path, test: list[TestImage]) -> dict[str, np.ndarray] | None:
    """The optional true test poses: {"poses": {test name: OpenGL c2w 4x4}} -> {name: OpenCV w2c}."""
    path = class_dir / TEST_POSES_FILE
    if not path.is_file():
        return None
    poses = _read_json(path, "true test poses").get("poses")
    if not isinstance(poses, dict):
        raise DatasetError(f"{path}: field 'poses' must map test image names to 4x4 camera-to-world "
                           "matrices; fix or delete the file (it is optional)")
    names = {image.name for image in test}
    out = {}
    for name, c2w in poses.items():
        c2w = np.asarray(c2w, dtype=np.float64)
        if c2w.shape != (4, 4):
            raise DatasetError(f"{path}: poses[{name!r}] must be a 4x4 camera-to-world matrix, "
                               f"got shape {c2w.shape}")
        if name in names:
            out[name] = opengl_c2w_to_opencv_w2c(c2w)
    return out
