"""read_image's fast decode gives exactly the float values of the plain formula, for every PNG mode.

The detector's maps must equal the evaluation's (1e-4), and both read images through read_image; the
table lookup that replaced the float conversion must not move a single value.
"""

import numpy as np
import pytest
from PIL import Image

from splatpose.data.mad_sim import read_image


def plain_formula(path) -> np.ndarray:
    """The reference: float32 RGBA / 255, alpha-composited onto white."""
    with Image.open(path) as im:
        rgba = np.asarray(im.convert("RGBA"), dtype=np.float32) / 255.0
    rgb, alpha = rgba[..., :3], rgba[..., 3:]
    return rgb * alpha + (1.0 - alpha)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "P_transparent", "RGBA_opaque"])
def test_read_image_equals_the_plain_formula(tmp_path, mode):
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
    elif mode != "RGBA":
        image = image.convert(mode)
    path = tmp_path / f"{mode}.png"
    image.save(path, transparency=3) if mode == "P_transparent" else image.save(path)

    values = read_image(path)
    assert values.dtype == np.float32 and values.shape == (37, 53, 3)
    np.testing.assert_array_equal(values, plain_formula(path))
