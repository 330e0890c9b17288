"""read_image's fast decode gives exactly the float values of the plain formula, for every PNG mode.

The detector's maps must equal the evaluation's (1e-4), and both read images through read_image; the
table lookup that replaced the float conversion must not move a single value.
"""

import numpy as np
import pytest
from PIL import Image

from splatpose.data.mad_sim import decode_pixels, read_image, spng_decodes_exactly


def plain_formula(path) -> np.ndarray:
    """The reference: float32 RGBA / 255, alpha-composited onto white."""
    with Image.open(path) as im:
        rgba = np.asarray(im.convert("RGBA"), dtype=np.float32) / 255.0
    rgb, alpha = rgba[..., :3], rgba[..., 3:]
    return rgb * alpha + (1.0 - alpha)


MODES = ["RGB", "RGBA", "L", "LA", "P", "P_transparent", "RGBA_opaque", "RGB_transparent", "I;16"]


def save_png(tmp_path, mode):
    """A 53x37 PNG of ``mode`` with opaque, transparent and partly transparent pixels where it has alpha."""
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (37, 53, 4), dtype=np.uint8)
    rgba[::3, :, 3] = 255  # opaque, transparent and partly transparent pixels
    rgba[1::3, :, 3] = 0
    image = Image.fromarray(rgba, "RGBA")
    if mode == "RGBA_opaque":
        image = Image.fromarray(np.concatenate([rgba[..., :3], np.full_like(rgba[..., :1], 255)], 2), "RGBA")
    elif mode == "P_transparent":
        image = image.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE)
        image.info["transparency"] = 3
    elif mode == "RGB_transparent":  # one colour marked transparent (a tRNS chunk)
        image = image.convert("RGB")
        image.info["transparency"] = tuple(int(v) for v in rgba[0, 0, :3])
    elif mode == "I;16":
        image = Image.fromarray(rgba[..., 0].astype(np.uint16) * 257)  # 16-bit grayscale
    elif mode != "RGBA":
        image = image.convert(mode)
    path = tmp_path / f"{mode.replace(';', '')}.png"
    image.save(path, transparency=image.info["transparency"]) if "transparency" in image.info else image.save(path)
    return path


@pytest.mark.parametrize("mode", MODES)
def test_read_image_equals_the_plain_formula(tmp_path, mode):
    path = save_png(tmp_path, mode)
    values = read_image(path)
    assert values.dtype == np.float32 and values.shape == (37, 53, 3)
    np.testing.assert_array_equal(values, plain_formula(path))


@pytest.mark.parametrize("mode", MODES)
def test_fast_decoder_takes_only_the_files_it_decodes_as_pillow_does(tmp_path, mode):
    """libspng decodes 8-bit RGB and RGBA PNGs (the common case, 3x faster); every other mode, and RGB
    with a transparent colour, which libspng's default decode would show opaque, goes to Pillow."""
    path = save_png(tmp_path, mode)
    assert spng_decodes_exactly(path.read_bytes()) == (mode in ("RGB", "RGBA", "RGBA_opaque"))
    with Image.open(path) as im:
        pillow = np.asarray(im if im.mode == "RGB" and "transparency" not in im.info else im.convert("RGBA"))
    np.testing.assert_array_equal(decode_pixels(path), pillow)
    np.testing.assert_array_equal(decode_pixels(path, fast=False), pillow)  # Pillow only (background threads)


def test_corrupt_png_is_a_clear_error_not_garbage(tmp_path):
    """A truncated RGB PNG that libspng refuses still raises the reader's error (via Pillow)."""
    from splatpose.data.mad_sim import DatasetError

    path = save_png(tmp_path, "RGB")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(DatasetError, match="truncated.png: unreadable or truncated"):
        decode_pixels(truncated)
