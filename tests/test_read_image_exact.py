"""read_image's fast decode gives exactly the float values of the plain formula, for every PNG mode.

The detector's maps must equal the evaluation's (1e-4), and both read images through read_image; the
table lookup that replaced the float conversion must not move a single value.
"""

import numpy as np
import pytest
from PIL import Image

from splatpose.data.mad_sim import PNG_SIGNATURE, decode_pixels, read_image, spng_decodes_exactly


def plain_formula(path) -> np.ndarray:
    """The reference: float32 RGBA / 255, alpha-composited onto white (16-bit grey: its high byte)."""
    with Image.open(path) as im:
        if im.mode == "I;16":
            im = Image.fromarray((np.asarray(im) >> 8).astype(np.uint8), "L")
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
        opaque = im.mode in ("RGB", "L", "I;16") and "transparency" not in im.info
        if im.mode == "I;16":
            im = Image.fromarray((np.asarray(im) >> 8).astype(np.uint8), "L")
        pillow = np.asarray(im.convert("RGB") if opaque else im.convert("RGBA"))
    np.testing.assert_array_equal(decode_pixels(path), pillow)
    np.testing.assert_array_equal(decode_pixels(path, fast=False), pillow)  # Pillow only (background threads)


def test_corrupt_png_is_a_clear_error_not_garbage(tmp_path):
    """A truncated RGB PNG that libspng refuses still raises the reader's error (via Pillow)."""
    from splatpose.data.mad_sim import DatasetError

    path = save_png(tmp_path, "RGB")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(DatasetError, match="truncated.png: truncated PNG"):
        decode_pixels(truncated)


# ----------------------------------------------------------------------------------------------
# What cameras and exporters write: each mode reads as the picture it holds, or is refused by name.


def gradient(height=37, width=53) -> np.ndarray:
    """uint8 [H, W, 3]: a colour gradient with no symmetry, so a rotation or a channel swap shows."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // (width - 1), y * 255 // (height - 1), (x + 2 * y) % 256], -1).astype(np.uint8)


def test_16_bit_grey_png_reads_as_its_grey_values_not_white(tmp_path):
    grey16 = (np.arange(37 * 53).reshape(37, 53) * 31 % 65536).astype(np.uint16)
    Image.fromarray(grey16).save(tmp_path / "depth_like.png")
    values = read_image(tmp_path / "depth_like.png")
    expected = (grey16 >> 8).astype(np.float32) / np.float32(255.0)
    np.testing.assert_array_equal(values, np.repeat(expected[..., None], 3, 2))
    assert values.min() < 0.1, "a 16-bit grey image must not read as (nearly) pure white"


def png_16_bit(values: np.ndarray, colour_type: int) -> bytes:
    """A 16-bit PNG written by hand (Pillow cannot write 16-bit colour): [H, W, C] uint16."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    height, width = values.shape[:2]
    rows = b"".join(b"\x00" + values[y].astype(">u2").tobytes() for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    return PNG_SIGNATURE + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("channels, colour_type", [(3, 2), (4, 6)])
def test_16_bit_colour_pngs_read_as_their_high_bytes(tmp_path, channels, colour_type):
    values = np.random.default_rng(1).integers(0, 65536, (9, 7, channels)).astype(np.uint16)
    (tmp_path / "deep.png").write_bytes(png_16_bit(values, colour_type))
    np.testing.assert_array_equal(decode_pixels(tmp_path / "deep.png"), (values >> 8).astype(np.uint8))


def test_palette_and_grey_alpha_pngs_read_as_their_colours(tmp_path):
    rgb = gradient()
    palette = Image.fromarray(rgb).quantize(64)
    palette.save(tmp_path / "palette.png")
    np.testing.assert_array_equal(read_image(tmp_path / "palette.png"),
                                  np.asarray(palette.convert("RGB"), np.float32) / 255.0)
    grey, alpha = rgb[..., 0], np.where(np.arange(53) < 20, 255, 0).astype(np.uint8)[None].repeat(37, 0)
    Image.fromarray(np.stack([grey, alpha], -1), "LA").save(tmp_path / "grey_alpha.png")
    values = read_image(tmp_path / "grey_alpha.png")
    np.testing.assert_array_equal(values[:, :20, 0], grey[:, :20] / np.float32(255.0))
    assert (values[:, 20:] == 1.0).all(), "transparent pixels are composited onto white"


def test_exif_rotated_jpeg_is_read_upright(tmp_path):
    """A camera held upright stores the sensor's landscape pixels and EXIF orientation 6 (rotate 90° CW
    to display); the reader must return the upright picture, as every viewer shows it."""
    upright = gradient(48, 32)  # portrait
    stored = np.rot90(upright, k=1)  # what the sensor wrote: the picture turned 90° counter-clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.ascontiguousarray(stored)).save(tmp_path / "phone.jpg", quality=100, exif=exif)
    values = read_image(tmp_path / "phone.jpg")
    assert values.shape == (48, 32, 3)
    assert np.abs(values * 255 - upright).mean() < 3  # JPEG loss only


def test_jpeg_named_png_is_read_as_the_jpeg_it_is(tmp_path):
    from splatpose.data.mad_sim import image_size

    Image.fromarray(gradient()).save(tmp_path / "real.jpg", quality=95)
    (tmp_path / "misnamed.png").write_bytes((tmp_path / "real.jpg").read_bytes())
    np.testing.assert_array_equal(read_image(tmp_path / "misnamed.png"), read_image(tmp_path / "real.jpg"))
    assert image_size(tmp_path / "misnamed.png") == (53, 37)


def test_png_damaged_in_the_middle_is_refused_naming_the_damage(tmp_path):
    """The end chunk is intact, so only decoding (or the chunks' CRCs) can tell: libspng alone would
    return garbage pixels for it."""
    from splatpose.data.mad_sim import DatasetError

    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    data = bytearray((tmp_path / "a.png").read_bytes())
    data[len(data) // 2:len(data) // 2 + 64] = bytes(64)
    (tmp_path / "a.png").write_bytes(bytes(data))
    with pytest.raises(DatasetError, match=r"a.png: corrupt PNG \(chunk 'IDAT' .* fails its CRC check"):
        read_image(tmp_path / "a.png")


def test_empty_and_unknown_files_are_named_as_such(tmp_path):
    from splatpose.data.mad_sim import DatasetError

    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(DatasetError, match=r"empty.png: empty file \(0 bytes\)"):
        read_image(tmp_path / "empty.png")
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(DatasetError, match="notes.png: unreadable image, in no format Pillow reads") as error:
        read_image(tmp_path / "notes.png")
    assert "BytesIO" not in str(error.value)


def test_float_images_are_refused_by_mode(tmp_path):
    from splatpose.data.mad_sim import DatasetError

    Image.fromarray(np.ones((8, 8), np.float32)).save(tmp_path / "float.tif")
    with pytest.raises(DatasetError, match="float.tif: TIFF image of mode F has no RGB reading"):
        read_image(tmp_path / "float.tif")
