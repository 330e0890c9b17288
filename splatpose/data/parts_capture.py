"""The ``parts`` family as a camera on an inspection line sees it (the ``realistic`` preset of parts.py).

Built apart from the built-in family's capture_effects.py (PROTOCOL's twentieth decision): other benches,
other clutter, another light model, another sensor model and another JPEG encoder, so that the realistic
held-out read does not share the tuning family's image statistics. The light change is physical: the
path tracer renders each test view under the studio environment turned about the vertical, brighter or
dimmer and warmer or cooler (parts_render.PathTracer.scene); the part is then composited, in linear light,
over a bench lit by the same light::

    path-traced part (premultiplied linear RGB + coverage alpha, light drawn per test view)
      + (1 - alpha) x bench (a crop of the class's bench texture; clutter on test views; the part's soft
        shadow; the light's level, tint and a brightness ramp from the turned key light)
      ─► lens vignetting ─► sensor (photon noise at an exposure drawn per view + read noise, linear)
      ─► sRGB ─► 8 bits ─► JPEG through OpenCV (quality drawn per test view)

Reference (train) views: the same bench without clutter, the studio light as it is, a long exposure
(little noise) and a high JPEG quality, as a careful reference capture would be; the object masks of the
train views come from the coverage alpha. Every draw comes from a generator seeded by (seed, class,
image), so the files are a pure function of the settings, and the objects, poses and defect masks are
those of the clean preset with the same seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

BENCH_KINDS = ("perforated_steel", "kraft_paper", "cutting_mat")
BENCH_CANVAS = 3     # the class's bench texture is this many times the image's size; views see crops of it


@dataclass(frozen=True)
class ViewLight:
    """The light of one test view. turn_deg: the studio environment turned about world +z (degrees);
    gain: its level; warmth: red x (1 + warmth), blue x (1 - warmth)."""

    turn_deg: float = 0.0
    gain: float = 1.0
    warmth: float = 0.0

    @property
    def rgb(self) -> np.ndarray:
        """[3] per-channel factor of the light (level and tint)."""
        return self.gain * np.array([1.0 + self.warmth, 1.0, 1.0 - self.warmth])


def draw_test_light(rng: np.random.Generator, turn_deg: float, gain: tuple[float, float], warmth: float) -> ViewLight:
    """A test view's light: turn uniform in +-turn_deg, gain log-uniform in ``gain``, warmth in +-warmth."""
    return ViewLight(turn_deg=float(rng.uniform(-turn_deg, turn_deg)),
                     gain=float(np.exp(rng.uniform(*np.log(gain)))),
                     warmth=float(rng.uniform(-warmth, warmth)))


def bench_texture(kind: str, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """[H, W, 3] float32 linear reflectance of a bench surface (``size`` = (H, W) of the canvas).

    perforated_steel: brushed grey sheet with a grid of dark holes; kraft_paper: brown paper with fibres;
    cutting_mat: dark green mat with a light grid, every fifth line bolder.
    """
    h, w = size
    if kind == "perforated_steel":
        streaks = cv2.GaussianBlur(rng.normal(0.0, 1.0, (h, w)).astype(np.float32), (0, 0), sigmaX=12.0, sigmaY=0.6)
        grey = 0.30 + 0.06 * streaks / max(float(streaks.std()), 1e-6)
        image = np.repeat(grey[..., None], 3, axis=-1) * np.array([0.96, 0.98, 1.0], np.float32)
        pitch = max(6, w // 40)
        for row, y in enumerate(range(pitch // 2, h, pitch)):
            for x in range(pitch // 2 + (row % 2) * pitch // 2, w, pitch):
                cv2.circle(image, (x, y), max(1, pitch // 4), (0.02, 0.02, 0.02), -1, cv2.LINE_AA)
        return np.clip(image, 0.0, 1.0)
    if kind == "kraft_paper":
        base = np.array([0.42, 0.28, 0.15], np.float32)
        image = np.empty((h, w, 3), np.float32)
        image[:] = base
        blotches = cv2.GaussianBlur(rng.normal(0.0, 1.0, (h, w)).astype(np.float32), (0, 0), sigmaX=w / 30)
        image *= (1.0 + 0.06 * blotches / max(float(blotches.std()), 1e-6))[..., None]
        for _ in range(h * w // 400):
            x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
            angle, length = rng.uniform(0, np.pi), rng.uniform(3, 12)
            shade = tuple(float(c) for c in base * rng.uniform(0.75, 1.25))
            cv2.line(image, (int(x0), int(y0)), (int(x0 + length * np.cos(angle)), int(y0 + length * np.sin(angle))),
                     shade, 1, cv2.LINE_AA)
        return np.clip(image, 0.0, 1.0)
    if kind == "cutting_mat":
        image = np.empty((h, w, 3), np.float32)
        image[:] = (0.05, 0.16, 0.09)
        pitch = max(5, w // 30)
        for i, pos in enumerate(range(0, max(h, w), pitch)):
            thickness, colour = (2, (0.45, 0.5, 0.45)) if i % 5 == 0 else (1, (0.25, 0.32, 0.27))
            cv2.line(image, (pos, 0), (pos, h - 1), colour, thickness, cv2.LINE_AA)
            cv2.line(image, (0, pos), (w - 1, pos), colour, thickness, cv2.LINE_AA)
        return image
    raise ValueError(f"unknown bench kind {kind!r}; kinds: {', '.join(BENCH_KINDS)}")


def bench_view(texture: np.ndarray, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """[H, W, 3] a crop of the bench texture as one view sees it: turned by any angle, scaled by 0.8-1.25
    and shifted, so each view sees its own patch of the bench."""
    h, w = size
    th, tw = texture.shape[:2]
    scale = float(np.exp(rng.uniform(np.log(0.8), np.log(1.25))))
    centre = (float(rng.uniform(0.35 * tw, 0.65 * tw)), float(rng.uniform(0.35 * th, 0.65 * th)))
    turn = cv2.getRotationMatrix2D(centre, float(rng.uniform(0.0, 360.0)), scale)
    turn[:, 2] += np.array([w / 2.0, h / 2.0]) - np.array(centre)
    return cv2.warpAffine(texture, turn, (w, h), flags=cv2.INTER_AREA, borderMode=cv2.BORDER_REFLECT)


def add_line_clutter(bench: np.ndarray, rng: np.random.Generator, count: int) -> np.ndarray:
    """The bench with ``count`` things left on it: cables (thick curves), hex nuts, paper labels."""
    h, w = bench.shape[:2]
    image = bench.copy()
    for _ in range(count):
        kind = rng.integers(3)
        if kind == 0:
            t = np.linspace(0.0, 1.0, 24)[:, None]
            ends = rng.uniform(0, 1, (3, 2)) * (w, h)
            curve = (1 - t) ** 2 * ends[0] + 2 * t * (1 - t) * ends[1] + t ** 2 * ends[2]
            colour = [(0.02, 0.02, 0.02), (0.5, 0.03, 0.02), (0.03, 0.08, 0.4)][rng.integers(3)]
            cv2.polylines(image, [curve.astype(np.int32)], False, colour, max(2, w // 40), cv2.LINE_AA)
        elif kind == 1:
            centre, radius = rng.uniform(0, 1, 2) * (w, h), w * rng.uniform(0.03, 0.06)
            angles = rng.uniform(0, np.pi / 3) + np.arange(6) * np.pi / 3
            corners = centre + radius * np.stack([np.cos(angles), np.sin(angles)], axis=-1)
            cv2.fillConvexPoly(image, corners.astype(np.int32), (0.55, 0.56, 0.58), cv2.LINE_AA)
            cv2.circle(image, tuple(int(c) for c in centre), max(1, int(radius * 0.5)), (0.05, 0.05, 0.05), -1,
                       cv2.LINE_AA)
        else:
            x0, y0 = rng.uniform(0, 1, 2) * (w, h)
            lw, lh = w * rng.uniform(0.12, 0.25), h * rng.uniform(0.06, 0.12)
            cv2.rectangle(image, (int(x0), int(y0)), (int(x0 + lw), int(y0 + lh)), (0.8, 0.78, 0.7), -1)
            for k in range(1, 3):
                y = int(y0 + k * lh / 3)
                cv2.line(image, (int(x0 + lw * 0.1), y), (int(x0 + lw * rng.uniform(0.5, 0.9)), y), (0.1, 0.1, 0.1), 1)
    return image


def contact_shadow(alpha: np.ndarray, turn_deg: float, strength: float) -> np.ndarray:
    """[H, W] factor in [1 - strength, 1] darkening the bench where the part's soft shadow falls: its
    coverage blurred and pushed away from the key light (down and to the side in the image; the side turns
    with the light)."""
    h, w = alpha.shape
    side = np.cos(np.radians(45.0 + turn_deg))
    shift = np.float32([[1, 0, 0.06 * w * side], [0, 1, 0.05 * h]])
    moved = cv2.warpAffine(alpha.astype(np.float32), shift, (w, h), borderValue=0.0)
    return 1.0 - strength * cv2.GaussianBlur(moved, (0, 0), sigmaX=0.03 * w)


def light_ramp(size: tuple[int, int], turn_deg: float, amplitude: float) -> np.ndarray:
    """[H, W] brightness ramp of the bench across the image (1 +- amplitude): the turned key light lights
    one side of the bench more; zero turn leaves it flat."""
    h, w = size
    x = (np.arange(w, dtype=np.float32) / max(w - 1, 1) - 0.5) * 2.0
    return np.broadcast_to(1.0 + amplitude * np.sin(np.radians(turn_deg)) * x[None, :], (h, w))


def vignetting(size: tuple[int, int], strength: float) -> np.ndarray:
    """[H, W] the lens's falloff: 1 at the centre, 1 - strength in the corners (cos^4-like)."""
    h, w = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    r2 = ((x - (w - 1) / 2) ** 2 + (y - (h - 1) / 2) ** 2) / ((w / 2) ** 2 + (h / 2) ** 2)
    return 1.0 - strength * r2 ** 2


def sensor(linear: np.ndarray, rng: np.random.Generator, electrons_at_white: float, read_noise: float) -> np.ndarray:
    """Linear light -> noisy linear light: photon noise (Poisson, ``electrons_at_white`` at value 1) and
    Gaussian read noise (std ``read_noise`` in linear units)."""
    electrons = rng.poisson(np.clip(linear, 0.0, None) * electrons_at_white)
    return electrons / electrons_at_white + rng.normal(0.0, read_noise, linear.shape)


def encode(linear: np.ndarray, jpeg_quality: int) -> np.ndarray:
    """Linear light -> uint8 sRGB [H, W, 3], through OpenCV's JPEG encoder at ``jpeg_quality`` (0: none)."""
    linear = np.clip(linear, 0.0, 1.0)
    srgb = np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1 / 2.4) - 0.055)
    pixels = np.round(srgb * 255.0).astype(np.uint8)
    if not jpeg_quality:
        return pixels
    ok, data = cv2.imencode(".jpg", pixels[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality)])
    if not ok:
        raise RuntimeError("OpenCV could not encode a JPEG")
    return cv2.imdecode(data, cv2.IMREAD_COLOR)[..., ::-1].copy()


def photograph(premultiplied: np.ndarray, alpha: np.ndarray, bench: np.ndarray | None, light: ViewLight,
               rng: np.random.Generator, shadow: float, vignette: float, electrons_at_white: float,
               read_noise: float, jpeg_quality: int) -> np.ndarray:
    """One view as the line's camera records it: uint8 [H, W, 3] sRGB.

    Args:
        premultiplied, alpha: the path tracer's part, [H, W, 3] linear RGB premultiplied by its coverage
            alpha [H, W] (already under ``light``).
        bench: [H, W, 3] linear reflectance behind the part (bench_view, clutter added), or None for white.
        light: the view's light; it lights the bench too (level, tint, a ramp from its turn).
        shadow: darkness of the part's soft shadow on the bench (0: none); vignette: corner falloff;
        electrons_at_white: photon noise (0: no sensor noise); read_noise: its std in linear units;
        jpeg_quality: 0 for none.
    """
    if bench is None:
        background = np.ones(premultiplied.shape)
    else:
        lit = light_ramp(alpha.shape, light.turn_deg, 0.15) * contact_shadow(alpha, light.turn_deg, shadow)
        background = bench * light.rgb * lit[..., None]
    linear = premultiplied + (1.0 - alpha)[..., None] * background
    linear = linear * vignetting(alpha.shape, vignette)[..., None]
    if electrons_at_white:
        linear = sensor(linear, rng, electrons_at_white, read_noise)
    return encode(linear, jpeg_quality)
