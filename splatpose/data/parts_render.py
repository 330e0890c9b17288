"""The path tracer of the ``parts`` family: Mitsuba 3, studio lights, self-shadowing, white background.

Lighting is fixed in the world (so an object looks the same from every view, as a 3D model must):
a studio environment map holding a bright key soft box high on one side, a weaker fill low on the
other, and a soft sky-to-floor ambient. Lights at infinity shade and self-shadow like area lights but
never stand in a camera's view (a panel in the scene would, from some test poses). The environment is
hidden from camera rays, so the film's alpha is the object's coverage and the colour is composited onto
pure white (1, 1, 1) as in MAD-Sim.

Determinism: a box pixel filter (each sample lands in exactly one pixel, so no sums across render
blocks whose order depends on thread timing) and a fixed sampler seed per image give the same bytes on
every run with the same Mitsuba variant, scalar or JIT (tests/test_parts_dataset.py); Mitsuba's default
Gaussian filter would not (experiments/results/notes_data_io.md).

Camera: project poses are OpenGL camera-to-world (x right, y up, z back). Mitsuba's ``perspective``
sensor looks along its local +z with +y up and +x to the LEFT, so its to_world is c2w @ diag(-1, 1, -1, 1).
With ``fov_axis="x"`` and the principal point at the film centre, it is the pinhole of
``cameras.intrinsics_from_fov_x`` (tests/test_parts_dataset.py projects a sphere's centre to check).
"""

from __future__ import annotations

import glob
import logging
import os
import re
from dataclasses import dataclass

import numpy as np

from splatpose.data.parts_capture import ViewLight
from splatpose.data.parts_defects import DefectiveObject
from splatpose.data.parts_meshes import Material, PartObject, SurfaceMesh

log = logging.getLogger(__name__)

# OpenGL camera axes (x right, y up, z back) -> Mitsuba sensor axes (x left, y up, z forward).
OPENGL_TO_MITSUBA_CAMERA = np.diag([-1.0, 1.0, -1.0, 1.0])
DEFECT_SHAPE_ID = "defect"

# Dr.Jit's LLVM backend needs LLVM >= 16 (Debian 12's default 14 is refused, 15 fails to compile
# Mitsuba's kernels: "Cannot select fminimum"); it renders faster than scalar_rgb
# (experiments/results/notes_data_io.md).
_LLVM_LIBRARY_PATTERNS = ("/usr/lib/x86_64-linux-gnu/libLLVM-*.so*", "/usr/lib/llvm-*/lib/libLLVM*.so*",
                          "/usr/lib64/libLLVM*.so*", "{conda}/lib/libLLVM*.so*")
_MIN_LLVM = 16


def find_llvm_library() -> str | None:
    """Path of a libLLVM (version >= 16) that Dr.Jit's LLVM backend can use, or None.

    DRJIT_LIBLLVM_PATH wins when set; otherwise the system and conda library folders are searched and
    the newest version is taken.
    """
    if os.environ.get("DRJIT_LIBLLVM_PATH"):
        return os.environ["DRJIT_LIBLLVM_PATH"]
    candidates = []
    for pattern in _LLVM_LIBRARY_PATTERNS:
        for path in glob.glob(pattern.format(conda=os.environ.get("CONDA_PREFIX", "/nonexistent"))):
            match = re.search(r"LLVM-?(\d+)", os.path.basename(path)) or re.search(r"llvm-(\d+)", path)
            if match and int(match.group(1)) >= _MIN_LLVM:
                candidates.append((int(match.group(1)), path))
    return max(candidates)[1] if candidates else None


def choose_variant() -> str:
    """"llvm_ad_rgb" where a usable libLLVM exists (faster), else "scalar_rgb" (always works)."""
    return "llvm_ad_rgb" if find_llvm_library() else "scalar_rgb"


KEY_DIRECTION = np.array([0.45, -0.55, 0.70])     # world directions towards the lights (+z up)
FILL_DIRECTION = np.array([-0.75, 0.55, 0.20])


def studio_environment(width: int = 256) -> np.ndarray:
    """Linear RGB radiance [width / 2, width, 3] of the studio, laid out for Mitsuba's envmap with the
    to_world of PathTracer._studio_lights: pixel (row, col) looks along world
    (sin t sin p, sin t cos p, cos t), t = pi (row + 0.5) / height, p = 2 pi (col + 0.5) / width.

    Key: radiance 10 within ~15 degrees of KEY_DIRECTION; fill: 2.5 within ~22 degrees of
    FILL_DIRECTION; ambient 0.3 from above fading to 0.15 from below (a lit floor far away).
    """
    height = width // 2
    theta = np.pi * (np.arange(height) + 0.5) / height
    phi = 2.0 * np.pi * (np.arange(width) + 0.5) / width
    t, p = np.meshgrid(theta, phi, indexing="ij")
    direction = np.stack([np.sin(t) * np.sin(p), np.sin(t) * np.cos(p), np.cos(t)], axis=-1)

    def soft_box(towards: np.ndarray, radius_deg: float) -> np.ndarray:
        cos_angle = direction @ (towards / np.linalg.norm(towards))
        inner, outer = np.cos(np.radians(0.8 * radius_deg)), np.cos(np.radians(1.2 * radius_deg))
        return np.clip((cos_angle - outer) / (inner - outer), 0.0, 1.0)

    ambient = 0.225 + 0.075 * direction[..., 2]
    radiance = ambient + 10.0 * soft_box(KEY_DIRECTION, 15.0) + 2.5 * soft_box(FILL_DIRECTION, 22.0)
    return np.repeat(radiance[..., None], 3, axis=-1)


def mitsuba_to_world(c2w_opengl: np.ndarray) -> np.ndarray:
    """Mitsuba sensor to_world [4, 4] of a camera given as OpenGL camera-to-world [4, 4]."""
    return np.asarray(c2w_opengl, dtype=np.float64) @ OPENGL_TO_MITSUBA_CAMERA


def linear_to_srgb(linear: np.ndarray) -> np.ndarray:
    """Linear values -> sRGB-encoded values in [0, 1] (clipped; the IEC 61966-2-1 curve)."""
    linear = np.clip(linear, 0.0, 1.0)
    return np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1 / 2.4) - 0.055)


class PathTracer:
    """Renders objects of the parts family with Mitsuba 3 (one instance per process: it sets the variant).

    Args:
        width, height: image size in pixels; camera_angle_x: horizontal field of view, radians.
        spp: samples per pixel of the colour pass; max_depth: longest light path (bounces + 1).
        variant: a Mitsuba CPU variant, "llvm_ad_rgb" or "scalar_rgb" (see choose_variant).
        light_scale: multiplies every light (exposure).
    """

    def __init__(self, width: int, height: int, camera_angle_x: float, spp: int = 64, max_depth: int = 5,
                 variant: str = "scalar_rgb", light_scale: float = 1.0):
        if variant == "llvm_ad_rgb":
            library = find_llvm_library()
            if library is None:
                raise RuntimeError("the parts generator's variant llvm_ad_rgb needs libLLVM >= 16 (Debian: "
                                   "apt-get install libllvm19; or set DRJIT_LIBLLVM_PATH); or use "
                                   "dataset.generator.variant=scalar_rgb")
            os.environ["DRJIT_LIBLLVM_PATH"] = library
        import mitsuba as mi  # imported here: only the generator's child process needs Mitsuba

        mi.set_variant(variant)
        self.mi = mi
        self.width, self.height, self.spp = width, height, spp
        self.fov_deg = float(np.degrees(camera_angle_x))
        self.colour_integrator = mi.load_dict({"type": "path", "max_depth": max_depth, "hide_emitters": True})
        # One sample per pixel at a fixed seed: good and defective renders see the same rays.
        self.surface_integrator = mi.load_dict({"type": "aov",
                                                "aovs": "dd.y:depth,si:shape_index,p:position,n:geo_normal"})
        self.light_scale = light_scale

    # ----------------------------------------------------------------------------------------------
    # Scene

    def _studio_lights(self, light: ViewLight) -> dict:
        """The studio as one environment map (see studio_environment): lights at infinity cast soft
        shadows like area lights, yet no light panel can ever stand in a camera's view. ``light`` turns it
        about world +z and scales and tints it (ViewLight(): the studio as the reference views see it)."""
        radiance = studio_environment() * self.light_scale * light.rgb
        # Mitsuba's envmap has +y up in its own frame; this to_world puts that on the world's +z
        # (local x, y, z -> world x, z, -y; studio_environment is laid out for it), then turns it about +z.
        c, s = np.cos(np.radians(light.turn_deg)), np.sin(np.radians(light.turn_deg))
        turn = np.array([[c, -s, 0, 0], [s, c, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
        y_up_to_z_up = np.array([[1, 0, 0, 0], [0, 0, -1, 0], [0, 1, 0, 0], [0, 0, 0, 1]])
        to_world = turn @ y_up_to_z_up if light.turn_deg else y_up_to_z_up
        return {"studio": {"type": "envmap", "bitmap": self.mi.Bitmap(radiance.astype(np.float32)),
                           "to_world": self.mi.ScalarTransform4f(to_world.tolist())}}

    def _bsdf(self, material: Material) -> dict:
        """The material as a two-sided BSDF: a chip can fold a few faces over, and Mitsuba's one-sided
        BSDFs are black from behind (seen first as black slits in chipped knob edges)."""
        return {"type": "twosided", "bsdf": self._one_sided_bsdf(material)}

    def _one_sided_bsdf(self, material: Material) -> dict:
        colour = ({"type": "mesh_attribute", "name": "vertex_color"} if material.texture is None else
                  {"type": "bitmap", "bitmap": self.mi.Bitmap(np.ascontiguousarray(material.texture)),
                   "raw": True, "filter_type": "bilinear", "wrap_mode": "repeat"})
        if material.kind == "diffuse":
            return {"type": "diffuse", "reflectance": colour}
        if material.kind == "plastic":
            # Mitsuba's (rough)plastic needs the mean of its diffuse texture, which per-vertex colours
            # cannot give ("Texture::mean(): not implemented"); the principled BSDF with no metal is the
            # same diffuse base under a dielectric coat.
            return {"type": "principled", "base_color": colour, "roughness": material.roughness,
                    "metallic": 0.0, "specular": 0.5}
        if material.kind == "conductor":
            return {"type": "roughconductor", "material": "Al", "distribution": "ggx", "alpha": material.roughness,
                    "specular_reflectance": colour}
        raise ValueError(f"unknown material kind {material.kind!r}; kinds: diffuse, plastic, conductor")

    def _shape(self, name: str, mesh: SurfaceMesh, material: Material):
        mi = self.mi
        props = mi.Properties()
        props["bsdf"] = mi.load_dict(self._bsdf(material))
        shape = mi.Mesh(name, len(mesh.vertices), len(mesh.faces), props=props, has_vertex_normals=True,
                        has_vertex_texcoords=mesh.uvs is not None)
        params = mi.traverse(shape)
        params["vertex_positions"] = np.ravel(mesh.vertices).astype(np.float32)
        params["faces"] = np.ravel(mesh.faces).astype(np.uint32)
        params["vertex_normals"] = np.ravel(mesh.normals).astype(np.float32)
        if mesh.uvs is not None:
            params["vertex_texcoords"] = np.ravel(mesh.uvs).astype(np.float32)
        params.update()
        shape.add_attribute("vertex_color", 3, np.ravel(mesh.colours).astype(np.float32))
        return shape

    def scene(self, obj: PartObject | DefectiveObject, light: ViewLight = ViewLight()):
        """A Mitsuba scene of an object (defect-free: one shape; defective: base + "defect" shapes) under the
        studio lights (turned, scaled and tinted by ``light``)."""
        shapes = ({"object": self._shape("object", obj.mesh, obj.material)} if isinstance(obj, PartObject) else
                  {"object": self._shape("object", obj.base, obj.material),
                   DEFECT_SHAPE_ID: self._shape(DEFECT_SHAPE_ID, obj.defect, obj.defect_material)})
        return self.mi.load_dict({"type": "scene", **self._studio_lights(light), **shapes})

    def _sensor(self, c2w_opengl: np.ndarray):
        return self.mi.load_dict({
            "type": "perspective", "fov": self.fov_deg, "fov_axis": "x",
            "to_world": self.mi.ScalarTransform4f(mitsuba_to_world(c2w_opengl).tolist()),
            "film": {"type": "hdrfilm", "width": self.width, "height": self.height, "pixel_format": "rgba",
                     "rfilter": {"type": "box"}},
            # Stratified samples: less noise than independent ones at the same cost
            # (experiments/results/notes_data_io.md).
            "sampler": {"type": "multijitter"},
        })

    # ----------------------------------------------------------------------------------------------
    # Passes

    def render_rgb(self, scene, c2w_opengl: np.ndarray, seed: int) -> np.ndarray:
        """uint8 [H, W, 3] sRGB image of the scene from an OpenGL c2w [4, 4], composited onto white."""
        premultiplied, alpha = self.render_linear(scene, c2w_opengl, seed)
        linear = premultiplied + (1.0 - alpha)[..., None]
        return np.round(linear_to_srgb(linear) * 255.0).astype(np.uint8)

    def render_linear(self, scene, c2w_opengl: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """The scene from an OpenGL c2w [4, 4] before any background: linear RGB [H, W, 3] premultiplied by
        the object's coverage, and that coverage alpha [H, W] in [0, 1] (float64)."""
        sensor = self._sensor(c2w_opengl)
        rgba = np.asarray(self.mi.render(scene, sensor=sensor, integrator=self.colour_integrator, seed=seed,
                                         spp=self.spp), dtype=np.float64)
        for retry in range(1, 4):
            # One NaN sample spoils its pixel's average: seen on 03Gear's flat underside, about one pixel
            # in ten images (cause inside Mitsuba not found). Such pixels take their value from a render
            # with the next seed: the same estimator, still deterministic.
            broken = ~np.isfinite(rgba).all(axis=-1)
            if not broken.any():
                break
            again = np.asarray(self.mi.render(scene, sensor=sensor, integrator=self.colour_integrator,
                                              seed=seed + retry, spp=self.spp), dtype=np.float64)
            rgba[broken] = again[broken]
        if not np.isfinite(rgba).all():
            log.warning("path tracer kept returning non-finite pixels (seed %d); %d written as black", seed,
                        int((~np.isfinite(rgba)).any(axis=-1).sum()))
            rgba = np.nan_to_num(rgba, nan=0.0, posinf=0.0, neginf=0.0)
        # Camera rays that miss contribute 0 (hidden emitters), so rgb is premultiplied by coverage.
        return rgba[..., :3], np.clip(rgba[..., 3], 0.0, 1.0)

    def render_surface(self, scene, c2w_opengl: np.ndarray, seed: int = 0) -> "SurfacePass":
        """What each pixel sees, from one sample per pixel (at a fixed seed, renders of two scenes at one
        pose trace the same rays): see SurfacePass."""
        out = np.asarray(self.mi.render(scene, sensor=self._sensor(c2w_opengl), integrator=self.surface_integrator,
                                        seed=seed, spp=1), dtype=np.float64)
        depth, index = out[..., 0], np.round(out[..., 1]).astype(np.int64)
        names = dict(zip(self._shape_index_values(scene), (shape.id() for shape in scene.shapes())))
        names[0] = ""
        if not ((index == 0) == (depth <= 0.0)).all() or not set(np.unique(index)) <= set(names):
            raise RuntimeError("Mitsuba's aov shape_index values do not match the scene's shapes in this "
                               "Mitsuba version (see PathTracer._shape_index_values); pin mitsuba==3.9.1")
        lookup = np.array([names.get(i, "") for i in range(index.max() + 1)], dtype=object)
        return SurfacePass(depth=depth, shape=lookup[index], position=out[..., 2:5], normal=out[..., 5:8])

    def _shape_index_values(self, scene) -> list[int]:
        """The value the aov integrator's shape_index writes for each of scene.shapes(), in order (0 is
        "no hit"). With Mitsuba 3.9.1 the JIT variants write the shape's Dr.Jit registry id
        (it changes as scenes come and go), the scalar variant 1 + the shape's position."""
        if self.mi.variant().startswith("scalar"):
            return list(range(1, len(scene.shapes()) + 1))
        import drjit as dr

        return [int(i) for i in dr.reinterpret_array(self.mi.UInt32, scene.shapes_dr())]


@dataclass(frozen=True)
class SurfacePass:
    """Per-pixel surface of a render. depth: [H, W] distance from the camera (object units, 0 = no hit);
    shape: [H, W] object array, the visible shape's name ("object", "defect", a light's, "" = no hit);
    position: [H, W, 3] world point; normal: [H, W, 3] geometric normal (either orientation)."""

    depth: np.ndarray
    shape: np.ndarray
    position: np.ndarray
    normal: np.ndarray
