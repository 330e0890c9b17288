"""Headless rendering of coloured meshes with pyvista/VTK at exact pinhole cameras.

Two passes per view, both rendered with VTK's own anti-aliasing off, into a window ``supersample``
times larger than the image:

- ``render_rgb``: Lambertian shading under lights fixed in the world (not attached to the camera;
  ``LIGHTINGS``: two lights, or a soft studio light),
  so a surface point looks the same from every view, as a 3DGS model with low-order colour expects
  (with ``specular`` > 0, a Phong sheen that moves with the view is added: a glossy material).
  Each output pixel is the mean of its ``supersample``² sub-pixels: anti-aliased edges, as a camera
  (and MAD-Sim's Blender renders) would give them. A splat model cannot reproduce aliased
  silhouettes from other views: with aliasing, about 90% of a 3DGS fit's held-out error sat in the
  one-pixel silhouette band.
- ``render_surface_ids``: unlit, each triangle painted with its 24-bit ``surface_id`` as RGB, read at
  the sub-pixel that sits on each pixel's centre, so that comparing two renders tells exactly which
  surface each pixel shows (for defect masks).

Camera: an OpenGL camera-to-world matrix (NeRF-Blender convention) and the horizontal field of view,
exactly what transforms.json stores; the principal point is the image centre.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np

# Without a display VTK would first try X11 and print a warning; EGL renders headless (needs the
# Debian packages libegl1 and libgl1). Respect a choice the user made.
os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")

# Mesa's software OpenGL (llvmpipe) loads the system's LLVM when the first frame renders. triton
# (installed with CUDA builds of torch, which imports it lazily) carries its own LLVM, and loading it
# *after* Mesa's crashes the process with a segfault; loading it first is fine. So load it now, in
# any process that may render. (The dataset generator also renders in a child process.)
if importlib.util.find_spec("triton") is not None:
    import triton  # noqa: F401

import pyvista as pv  # noqa: E402  (after the environment variable above)
from pyvista.plotting.themes import Theme  # noqa: E402

SURFACE_ID = "surface_id"   # cell data: int64 id of each triangle, stable across defect variants
VERTEX_RGB = "vertex_rgb"   # point data: uint8 [N, 3] albedo of each vertex
BACKGROUND_ID = 0xFFFFFF    # white in the id pass; no triangle may carry this id

# Lights fixed in world coordinates: (direction towards the light, intensity), and the ambient term.
# "two_lights": a key light from above-front, a weaker fill from below-behind so that no side of the
# object is black (every class but one). "soft": a studio's light, as a path tracer's environment gives
# it: a soft box (nine lights within 20 deg of the key's direction) and a dome of weak lights, brighter
# above than below; shading then changes slowly over a surface, and a shallow dent shows little.
_KEY = (0.4, -0.6, 1.0)


def _soft_box(direction, spread_deg: float, n: int, total: float) -> tuple:
    """n directional lights on a cone of ``spread_deg`` about ``direction`` (one on its axis)."""
    axis = np.asarray(direction, dtype=np.float64) / np.linalg.norm(direction)
    side = np.cross(axis, (0.0, 0.0, 1.0) if abs(axis[2]) < 0.9 else (1.0, 0.0, 0.0))
    side /= np.linalg.norm(side)
    up = np.cross(axis, side)
    tilt = np.tan(np.radians(spread_deg))
    turns = 2.0 * np.pi * np.arange(n - 1) / (n - 1)
    dirs = [axis] + [axis + tilt * (np.cos(t) * side + np.sin(t) * up) for t in turns]
    return tuple((tuple(d / np.linalg.norm(d)), total / n) for d in dirs)


def _dome(n: int, total: float, above: float = 0.6) -> tuple:
    """n directional lights spread evenly over the sphere (a Fibonacci lattice); a light's intensity
    grows linearly from the floor to the sky (``above``: the share of the dome's light from above)."""
    z = 1.0 - (2.0 * np.arange(n) + 1.0) / n
    phi = np.pi * (3.0 - np.sqrt(5.0)) * np.arange(n)
    r = np.sqrt(1.0 - z ** 2)
    weight = (1.0 - above) + (2.0 * above - 1.0) * (z + 1.0)
    weight *= total / weight.sum()
    return tuple(((float(r[i] * np.cos(phi[i])), float(r[i] * np.sin(phi[i])), float(z[i])), float(weight[i]))
                 for i in range(n))


LIGHTINGS = {
    "two_lights": {"ambient": 0.4, "lights": ((_KEY, 0.8), ((-0.6, 0.5, -0.5), 0.45))},
    "soft": {"ambient": 0.25, "lights": _soft_box(_KEY, 20.0, 9, 0.55) + _dome(24, 0.6)},
}
_SPECULAR_POWER = 20.0  # the highlight's tightness when a renderer is glossy (a satin sheen, not a mirror)


class OffscreenRenderer:
    """One reusable offscreen window of a fixed size (creating a GL context costs about 0.3 s)."""

    def __init__(self, width: int, height: int, camera_angle_x: float, supersample: int = 3,
                 specular: float = 0.0, lighting: str = "two_lights"):
        if supersample < 1 or supersample % 2 == 0:
            # An odd factor puts one sub-pixel exactly on each pixel's centre (for the id pass).
            raise ValueError(f"supersample must be an odd integer >= 1, got {supersample}")
        self.width, self.height = int(width), int(height)
        self.camera_angle_x = float(camera_angle_x)
        self.supersample = int(supersample)
        self.specular = float(specular)   # Phong highlight strength of render_rgb (0: matte)
        if lighting not in LIGHTINGS:
            raise ValueError(f"unknown lighting {lighting!r}; lightings: {', '.join(LIGHTINGS)}")
        self.ambient = LIGHTINGS[lighting]["ambient"]
        theme = Theme()
        theme.multi_samples = 0        # VTK's anti-aliasing off: each sub-pixel shows one surface, exactly
        theme.anti_aliasing = None
        theme.background = "white"
        window = (self.width * self.supersample, self.height * self.supersample)
        self._plotter = pv.Plotter(off_screen=True, window_size=window, theme=theme, lighting=None)
        # The first screenshot sets the window up; afterwards pyvista reads the buffer without
        # rendering, so every frame is rendered explicitly in _screenshot.
        self._plotter.screenshot(return_img=True)
        self._lights = []  # (light, its direction at turn 0)
        for direction, intensity in LIGHTINGS[lighting]["lights"]:
            light = pv.Light(position=direction, focal_point=(0.0, 0.0, 0.0), light_type="scene light",
                             intensity=intensity, positional=False)
            self._plotter.add_light(light)
            self._lights.append((light, np.asarray(direction, dtype=np.float64)))

    def turn_lights(self, turn_deg: float) -> None:
        """Turn every light about the world's vertical (+z) by ``turn_deg`` from where the lighting puts
        it (0: back there); the renders that follow are lit from there."""
        c, s = np.cos(np.radians(turn_deg)), np.sin(np.radians(turn_deg))
        turn = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
        for light, direction in self._lights:
            light.position = tuple(float(v) for v in turn @ direction)

    def close(self) -> None:
        self._plotter.close()

    def __enter__(self) -> OffscreenRenderer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def render_rgb(self, mesh: pv.PolyData, c2w_opengl: np.ndarray) -> np.ndarray:
        """Shaded colour image uint8 [H, W, 3] of a mesh with ``vertex_rgb`` point colours, on white."""
        self._clear()
        actor = self._plotter.add_mesh(mesh, scalars=VERTEX_RGB, rgb=True, preference="point",
                                       ambient=self.ambient, diffuse=1.0 - self.ambient, specular=self.specular,
                                       specular_power=_SPECULAR_POWER,
                                       show_scalar_bar=False, reset_camera=False)
        # Gouraud shading with the mesh's own point normals: they were computed once on the whole
        # object, so removing or adding cells elsewhere leaves the shading of every other pixel unchanged.
        actor.prop.interpolation = "gouraud"
        s = self.supersample
        sub = self._screenshot(c2w_opengl).reshape(self.height, s, self.width, s, 3).astype(np.float32)
        return np.rint(sub.mean(axis=(1, 3))).astype(np.uint8)

    def render_surface_ids(self, mesh: pv.PolyData, c2w_opengl: np.ndarray) -> np.ndarray:
        """Id pass int64 [H, W]: the ``surface_id`` of the triangle seen at each pixel, -1 for background."""
        centre = self.supersample // 2
        return self._sub_pixel_ids(mesh, c2w_opengl)[centre::self.supersample, centre::self.supersample]

    def render_coverage(self, mesh: pv.PolyData, c2w_opengl: np.ndarray) -> np.ndarray:
        """Object coverage float32 [H, W] in [0, 1]: the share of each pixel's ``supersample``² sub-pixels
        that show the mesh. It is the alpha of ``render_rgb`` (same sub-pixels, same averaging), so
        ``rgb = alpha * colour + (1 - alpha) * white`` holds at every edge pixel."""
        s = self.supersample
        inside = (self._sub_pixel_ids(mesh, c2w_opengl) >= 0).astype(np.float32)
        return inside.reshape(self.height, s, self.width, s).mean(axis=(1, 3))

    def _sub_pixel_ids(self, mesh: pv.PolyData, c2w_opengl: np.ndarray) -> np.ndarray:
        """int64 [H * s, W * s]: the ``surface_id`` at every sub-pixel, -1 for background."""
        ids = np.asarray(mesh.cell_data[SURFACE_ID], dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= BACKGROUND_ID):
            raise ValueError(f"surface ids must lie in [0, {BACKGROUND_ID}), got [{ids.min()}, {ids.max()}]")
        coloured = mesh.copy(deep=False)
        coloured.cell_data["id_rgb"] = np.stack([ids & 255, (ids >> 8) & 255, (ids >> 16) & 255],
                                                axis=1).astype(np.uint8)
        self._clear()
        self._plotter.add_mesh(coloured, scalars="id_rgb", rgb=True, preference="cell", lighting=False,
                               show_scalar_bar=False, reset_camera=False)
        rgb = self._screenshot(c2w_opengl).astype(np.int64)
        decoded = rgb[..., 0] | (rgb[..., 1] << 8) | (rgb[..., 2] << 16)
        return np.where(decoded == BACKGROUND_ID, -1, decoded)

    def _clear(self) -> None:
        self._plotter.clear_actors()
        # add_mesh renders the scene, with the previous camera; the frame that counts comes later.
        self._plotter.suppress_rendering = True

    def _screenshot(self, c2w_opengl: np.ndarray) -> np.ndarray:
        self._place_camera(np.asarray(c2w_opengl, dtype=np.float64))
        self._plotter.suppress_rendering = False
        self._plotter.render()
        return np.ascontiguousarray(self._plotter.screenshot(return_img=True)[..., :3])

    def _place_camera(self, c2w: np.ndarray) -> None:
        camera = self._plotter.camera
        eye, back, up = c2w[:3, 3], c2w[:3, 2], c2w[:3, 1]
        distance = float(np.linalg.norm(eye))
        camera.position = tuple(eye)
        camera.focal_point = tuple(eye - back * max(distance, 1.0))  # OpenGL cameras look along -z
        camera.up = tuple(up)
        # VTK's view angle is vertical; derive it from the horizontal one for non-square images.
        fov_y = 2.0 * np.arctan(np.tan(0.5 * self.camera_angle_x) * self.height / self.width)
        camera.view_angle = float(np.degrees(fov_y))
        # A clipping range that depends only on the camera (not on the mesh bounds, as VTK's automatic
        # one does): the defect-free and defective renders at one pose then share the same depth
        # quantisation, and differ only where the surface differs.
        camera.clipping_range = (max(0.05, distance - 3.0), distance + 3.0)
