"""What a real inspection camera adds to a clean render: a bench behind the part, light that drifts
between the reference capture and the line, sensor noise and JPEG compression.

Everything here works on one image at a time and takes its random draws from a generator the caller
seeds (per image), so the generated files stay a pure function of the settings and the seed. The
order is the physical one::

    render over white + its coverage alpha ─► composite over a background (texture + clutter)
      ─► lighting (global gain, colour temperature, smooth shading field) ─► sensor noise
      (Poisson photon noise + Gaussian read noise) ─► 8-bit quantisation ─► JPEG round trip

Images are float64 RGB in [0, 1] until ``quantise``; ``alpha`` is the object's coverage in [0, 1]
(1 = object, 0 = background) at the image's resolution.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw
from scipy.ndimage import gaussian_filter, shift, zoom

BACKGROUND_KINDS = ("wood", "concrete", "tiles")


@dataclass(frozen=True)
class Lighting:
    """One lighting state: ``gain`` multiplies every channel, ``rgb_factors`` [3] tint it (colour
    temperature: warm > 1 in red and < 1 in blue), ``shading`` [H, W] is a smooth multiplicative field
    (1 = unchanged) for light that falls off across the scene."""

    gain: float
    rgb_factors: np.ndarray
    shading: np.ndarray


def composite(on_white: np.ndarray, alpha: np.ndarray, background: np.ndarray) -> np.ndarray:
    """The render moved from white onto a background.

    A pixel rendered over white is ``a * C + (1 - a) * 1`` (its sub-pixels averaged), so over a
    background ``B`` it is that minus ``(1 - a)`` plus ``(1 - a) * B``: exact at anti-aliased edges.

    Args:
        on_white: [H, W, 3] in [0, 1]; alpha: [H, W] coverage in [0, 1]; background: [H, W, 3] in [0, 1].
    """
    return on_white + (1.0 - alpha)[..., None] * (background - 1.0)


def cast_shadow(alpha: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """[H, W] factor in [1 - strength, 1] for the bench: the part's coverage ``alpha`` [H, W] shifted by a
    few percent of the image in a random direction and blurred (a soft shadow from a light above to one
    side), darkening what lies under it."""
    h, w = alpha.shape
    angle = rng.uniform(0.0, 2.0 * np.pi)
    dy, dx = 0.05 * h * np.sin(angle), 0.05 * w * np.cos(angle)
    moved = shift(alpha.astype(np.float64), (dy, dx), order=1, mode="constant", cval=0.0)
    return 1.0 - strength * gaussian_filter(moved, sigma=0.03 * max(h, w))


def smooth_noise(shape: tuple[int, int], cells: int, rng: np.random.Generator) -> np.ndarray:
    """[H, W] value noise in [0, 1]: a ``cells`` x ``cells`` grid of uniform values, cubic-interpolated."""
    grid = rng.uniform(0.0, 1.0, (cells + 3, cells + 3))
    up = zoom(grid, ((shape[0] + 2) / grid.shape[0], (shape[1] + 2) / grid.shape[1]), order=3)
    return np.clip(up[1:shape[0] + 1, 1:shape[1] + 1], 0.0, 1.0)


def fractal_noise(shape: tuple[int, int], rng: np.random.Generator, octaves: int = 4, base_cells: int = 3) -> np.ndarray:
    """[H, W] multi-octave value noise in [0, 1] (each octave twice as fine, half as strong)."""
    total, weight_sum = np.zeros(shape), 0.0
    for octave in range(octaves):
        weight = 0.5 ** octave
        total += weight * smooth_noise(shape, base_cells * 2 ** octave, rng)
        weight_sum += weight
    return total / weight_sum


def background_texture(kind: str, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A bench-like surface [H, W, 3] in [0, 1]: "wood" (warped rings and grain), "concrete" (grey
    fractal noise with pores) or "tiles" (a grid of jittered tiles and grout), in random tones."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    if kind == "wood":
        angle = rng.uniform(0, np.pi)
        u = np.cos(angle) * xx + np.sin(angle) * yy
        warp = fractal_noise(shape, rng, octaves=3, base_cells=2)
        rings = 0.5 + 0.5 * np.sin(2 * np.pi * (rng.uniform(6, 14) * u + 3.0 * warp))
        grain = fractal_noise(shape, rng, octaves=2, base_cells=24)
        value = 0.55 + 0.3 * rings + 0.15 * grain
        tone = np.array([rng.uniform(0.55, 0.75), rng.uniform(0.38, 0.5), rng.uniform(0.2, 0.3)])
        return np.clip(value[..., None] * tone, 0, 1)
    if kind == "concrete":
        value = 0.45 + 0.35 * fractal_noise(shape, rng, octaves=5, base_cells=4)
        pores = rng.uniform(size=shape) < 0.01
        value = np.where(pores, value * 0.6, value)
        tone = rng.uniform(0.9, 1.05, 3)
        return np.clip(value[..., None] * tone, 0, 1)
    if kind == "tiles":
        n = int(rng.integers(3, 7))
        u, v = xx * n + rng.uniform(0, 1), yy * n + rng.uniform(0, 1)
        tile_ids = np.floor(u).astype(int) * 31 + np.floor(v).astype(int)
        grout = (np.abs(u - np.round(u)) < 0.04) | (np.abs(v - np.round(v)) < 0.04)
        base = rng.uniform(0.3, 0.9, 3)
        jitter = np.random.default_rng(int(rng.integers(2**31))).uniform(0.8, 1.15, (tile_ids.max() + 1, 1))
        image = base * jitter[np.clip(tile_ids, 0, None)]
        image = image * (0.9 + 0.1 * fractal_noise(shape, rng, octaves=2, base_cells=8))[..., None]
        image[grout] = rng.uniform(0.2, 0.5) * np.ones(3)
        return np.clip(image, 0, 1)
    raise ValueError(f"unknown background kind {kind!r}; kinds: {', '.join(BACKGROUND_KINDS)}")


def add_clutter(image: np.ndarray, rng: np.random.Generator, count: int) -> np.ndarray:
    """``image`` [H, W, 3] in [0, 1] with ``count`` random flat shapes (screws, tape, tools seen from
    above: discs, rectangles, triangles) of random colours drawn over it."""
    h, w = image.shape[:2]
    canvas = Image.fromarray(np.round(image * 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(count):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        r = rng.uniform(0.04, 0.12) * max(h, w)
        shape = int(rng.integers(3))
        if shape == 0:
            draw.ellipse([cx - r, cy - r * rng.uniform(0.5, 1), cx + r, cy + r], fill=colour)
        elif shape == 1:
            draw.rectangle([cx - r, cy - 0.3 * r, cx + r, cy + 0.3 * r], fill=colour)
        else:
            angles = rng.uniform(0, 2 * np.pi, 3)
            draw.polygon([(cx + r * np.cos(a), cy + r * np.sin(a)) for a in angles], fill=colour)
    return np.asarray(canvas, dtype=np.float64) / 255.0


def random_background(kind: str, shape: tuple[int, int], rng: np.random.Generator,
                      clutter: tuple[int, int]) -> np.ndarray:
    """A textured surface of ``kind`` with between clutter[0] and clutter[1] shapes on it: [H, W, 3] in [0, 1]."""
    texture = background_texture(kind, shape, rng)
    return add_clutter(texture, rng, int(rng.integers(clutter[0], clutter[1] + 1)))


def random_lighting(shape: tuple[int, int], rng: np.random.Generator, gain_range: tuple[float, float],
                    temperature_shift: float, shading_amplitude: float) -> Lighting:
    """A lighting state drawn within ranges.

    Args:
        gain_range: (low, high) global intensity factor.
        temperature_shift: up to this much warmer or cooler: red *= 1 + t, blue *= 1 - t for t drawn in
            [-shift, shift] (green unchanged).
        shading_amplitude: the shading field spans 1 +- amplitude: a linear ramp in a random direction
            (a lamp off to one side) plus one broad blob of low-frequency noise.
    """
    h, w = shape
    t = rng.uniform(-temperature_shift, temperature_shift)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w) - 0.5
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.cos(angle) * xx + np.sin(angle) * yy                     # in about [-0.7, 0.7]
    blob = smooth_noise(shape, 2, rng) - 0.5
    field = 1.0 + shading_amplitude * np.clip(ramp + blob, -1.0, 1.0)
    return Lighting(gain=float(rng.uniform(*gain_range)), rgb_factors=np.array([1 + t, 1.0, 1 - t]),
                    shading=field)


def apply_lighting(image: np.ndarray, lighting: Lighting) -> np.ndarray:
    """[H, W, 3] -> [H, W, 3]: the scene under ``lighting`` (values may exceed 1 until quantised)."""
    return image * (lighting.gain * lighting.rgb_factors)[None, None] * lighting.shading[..., None]


def sensor_noise(image: np.ndarray, rng: np.random.Generator, photons_at_white: float | None,
                 read_noise_std: float) -> np.ndarray:
    """Photon (Poisson, ``photons_at_white`` electrons for a value of 1; None: off) and read (Gaussian,
    std in [0, 1] units; 0: off) noise, per pixel and channel, clipped to [0, 1]."""
    out = np.clip(image, 0.0, 1.0)
    if photons_at_white:
        out = rng.poisson(out * photons_at_white) / float(photons_at_white)
    if read_noise_std > 0:
        out = out + rng.normal(0.0, read_noise_std, out.shape)
    return np.clip(out, 0.0, 1.0)


def quantise(image: np.ndarray) -> np.ndarray:
    """[H, W, 3] float in [0, 1] -> uint8."""
    return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


def jpeg_round_trip(pixels: np.ndarray, quality: int) -> np.ndarray:
    """uint8 [H, W, 3] after JPEG compression at ``quality`` (1-95) and decoding (4:2:0 chroma, as a
    camera writes it)."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=int(quality), subsampling=2)
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
