"""Defects of the ``parts`` family: Scratch, Dent, Chip, ColourShift (other shapes than the built-in
family's Burrs/Missing/Stains).

A defect is applied around a surface point ``centre`` (object units) with the outward surface normal
``normal`` there. It returns the object split in two shapes: ``base``, the faces the defect leaves
exactly as they were, and ``defect``, the faces it moved or recoloured (with their own vertex copies).
The renderer gives the defect shape its own shape index, so the mask is read from an id pass.

Vertices move only as a function of their position (never of their normal), so the copies that a crease
split leaves at one position move together and the surface never tears open. Normals of moved vertices
are recomputed on the deformed surface; all other normals are kept, so untouched pixels shade as before.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from splatpose.data.parts_meshes import Material, PartObject, SurfaceMesh, area_weighted_normals

PARTS_DEFECT_TYPES = ("Chip", "ColourShift", "Dent", "Scratch")


@dataclass(frozen=True)
class DefectiveObject:
    """An object with one defect: ``base`` keeps the class material; ``defect`` is drawn with
    ``defect_material`` (the same material, its bitmap recoloured where the defect recolours)."""

    base: SurfaceMesh
    defect: SurfaceMesh
    material: Material
    defect_material: Material


def apply_defect(obj: PartObject, defect: str, centre: np.ndarray, normal: np.ndarray, size: float,
                 rng: np.random.Generator) -> DefectiveObject:
    """The object with one defect of type ``defect`` around ``centre`` (see module docstring).

    Args:
        centre: [3] a point on the surface; normal: [3] the outward unit normal there.
        size: the defect's radius (Dent, Chip, ColourShift), object units; a Scratch is 3 * size long
            and size / 6 wide.
        rng: draws the defect's orientation, depth and colour change.
    """
    makers = {"Scratch": _scratch, "Dent": _dent, "Chip": _chip, "ColourShift": _colour_shift}
    if defect not in makers:
        raise ValueError(f"unknown parts defect type {defect!r}; defect types: {', '.join(PARTS_DEFECT_TYPES)}")
    normal = np.asarray(normal, dtype=np.float64) / np.linalg.norm(normal)
    return makers[defect](obj, np.asarray(centre, dtype=np.float64), normal, size, rng)


def _split(obj: PartObject, touched_faces: np.ndarray, vertices: np.ndarray, colours: np.ndarray,
           moved: np.ndarray, defect_material: Material, fixed_normals: dict | None = None) -> DefectiveObject:
    """Split the (deformed, recoloured) object into base and defect shapes.

    touched_faces: [F] bool, the defect's faces; vertices/colours: [V, 3] after the defect; moved: [V] bool,
    vertices whose position changed (their normals are recomputed); fixed_normals: optional
    {"index": [K], "normals": [K, 3]} overriding some normals (a chip's flat facet).
    """
    mesh = obj.mesh
    normals = mesh.normals.copy()
    if moved.any():
        normals[moved] = area_weighted_normals(vertices, mesh.faces)[moved]
    if fixed_normals is not None:
        normals[fixed_normals["index"]] = fixed_normals["normals"]
    changed = SurfaceMesh(vertices, mesh.faces, normals, colours, mesh.uvs)
    return DefectiveObject(base=mesh.with_faces(~touched_faces), defect=changed.with_faces(touched_faces),
                           material=obj.material, defect_material=defect_material)


def _faces_touching(faces: np.ndarray, vertex_mask: np.ndarray) -> np.ndarray:
    return vertex_mask[faces].any(axis=1)


def _tangent(normal: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random unit vector perpendicular to ``normal``."""
    helper = np.array([1.0, 0.0, 0.0]) if abs(normal[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    a = np.cross(normal, helper)
    a /= np.linalg.norm(a)
    b = np.cross(normal, a)
    angle = rng.uniform(0.0, np.pi)
    return np.cos(angle) * a + np.sin(angle) * b


def _near_front(vertices: np.ndarray, centre: np.ndarray, normal: np.ndarray, depth: float) -> np.ndarray:
    """[V] bool: vertices within a slab of +-depth around the tangent plane at ``centre`` (keeps a defect
    on the surface it was placed on, not on the far side of a thin part)."""
    return np.abs((vertices - centre) @ normal) < depth


def _scratch(obj: PartObject, centre, normal, size, rng) -> DefectiveObject:
    """A thin straight groove: vertices within ``width`` of a segment (measured in the tangent plane)
    sink by up to ``depth`` (a parabolic profile) and darken; a line a few pixels wide."""
    mesh = obj.mesh
    half_length, width, depth = 1.5 * size, size / 6.0, size / 7.5
    direction = _tangent(normal, rng)
    offset = mesh.vertices - centre
    along = np.clip(offset @ direction, -half_length, half_length)
    across = offset - along[:, None] * direction
    across -= (across @ normal)[:, None] * normal                  # distance in the tangent plane
    distance = np.linalg.norm(across, axis=1)
    inside = (distance < width) & _near_front(mesh.vertices, centre, normal, 0.5 * size)
    profile = np.where(inside, 1.0 - (distance / width) ** 2, 0.0)
    vertices = mesh.vertices - (depth * profile)[:, None] * normal
    darkening = rng.uniform(0.25, 0.4)
    colours = mesh.colours.copy()
    touched = _faces_touching(mesh.faces, inside)
    in_defect = np.zeros(len(vertices), dtype=bool)
    in_defect[mesh.faces[touched]] = True
    colours[in_defect] *= darkening
    return _split(obj, touched, vertices, colours, inside,
                  obj.material.with_colours(lambda rgb: rgb * darkening))


def _dent(obj: PartObject, centre, normal, size, rng) -> DefectiveObject:
    """A smooth inward dent: vertices within ``size`` sink along -normal by depth * (1 - (r/size)^2)^2,
    zero with zero slope at the rim, so the dent shows only through its shading."""
    mesh = obj.mesh
    depth = rng.uniform(0.35, 0.5) * size
    r = np.linalg.norm(mesh.vertices - centre, axis=1)
    inside = (r < size) & _near_front(mesh.vertices, centre, normal, 0.6 * size)
    profile = np.where(inside, (1.0 - (r / size) ** 2) ** 2, 0.0)
    vertices = mesh.vertices - (depth * profile)[:, None] * normal
    return _split(obj, _faces_touching(mesh.faces, inside), vertices, mesh.colours, inside, obj.material)


def _chip(obj: PartObject, centre, normal, size, rng) -> DefectiveObject:
    """A piece broken off: within ``size`` of the centre, everything above a plane below the surface is
    pressed onto that plane (a flat fracture facet with a slightly jagged rim), and the fracture shows
    the lighter, duller material underneath."""
    mesh = obj.mesh
    tilt = _tangent(normal, rng) * rng.uniform(0.1, 0.35)
    plane_normal = (normal + tilt) / np.linalg.norm(normal + tilt)
    plane_point = centre - rng.uniform(0.3, 0.45) * size * plane_normal
    r = np.linalg.norm(mesh.vertices - centre, axis=1)
    # The jagged rim: the radius varies with the direction around the centre (a position-only function).
    jag = 1.0 + 0.15 * np.sin(7.0 * np.arctan2(*(mesh.vertices - centre)[:, :2].T))
    height = (mesh.vertices - plane_point) @ plane_normal
    pressed = (r < size * jag) & (height > 0.0)
    vertices = mesh.vertices.copy()
    vertices[pressed] -= height[pressed, None] * plane_normal
    touched = _faces_touching(mesh.faces, pressed)
    colours = mesh.colours.copy()
    in_defect = np.zeros(len(vertices), dtype=bool)
    in_defect[mesh.faces[touched]] = True
    colours[in_defect] = 0.45 * colours[in_defect] + 0.45         # exposed, paler material
    facet = np.flatnonzero(pressed)
    return _split(obj, touched, vertices, colours, pressed,
                  replace(obj.material.with_colours(lambda rgb: 0.45 * rgb + 0.45), kind="diffuse"),
                  fixed_normals={"index": facet, "normals": np.tile(plane_normal, (len(facet), 1))})


def _colour_shift(obj: PartObject, centre, normal, size, rng) -> DefectiveObject:
    """A discoloured patch (no change of shape): hue rotated by 60-150 degrees and brightness scaled,
    on every face within ``size`` of the centre."""
    mesh = obj.mesh
    hue_turn = rng.uniform(60.0, 150.0) * rng.choice([-1.0, 1.0])
    brightness = rng.choice([rng.uniform(0.5, 0.7), rng.uniform(1.3, 1.6)])

    def recolour(rgb: np.ndarray) -> np.ndarray:
        return np.clip(_rotate_hue(rgb, hue_turn) * brightness, 0.0, 1.0)

    inside = (np.linalg.norm(mesh.vertices - centre, axis=1) < size) & _near_front(mesh.vertices, centre, normal,
                                                                                   0.6 * size)
    touched = _faces_touching(mesh.faces, inside)
    colours = mesh.colours.copy()
    in_defect = np.zeros(len(colours), dtype=bool)
    in_defect[mesh.faces[touched]] = True
    colours[in_defect] = recolour(colours[in_defect])
    return _split(obj, touched, mesh.vertices, colours, np.zeros(len(colours), dtype=bool),
                  obj.material.with_colours(recolour))


def _rotate_hue(rgb: np.ndarray, degrees: float) -> np.ndarray:
    """Rotate colours [..., 3] about the grey axis by ``degrees`` (keeps their grey level); greys, which
    have no hue, are tinted instead so a shift is visible on every material."""
    grey = rgb.mean(axis=-1, keepdims=True)
    chroma = rgb - grey
    if np.abs(chroma).max() < 0.02:
        chroma = chroma + 0.25 * grey * np.array([1.0, -0.5, -0.5])
    axis = np.ones(3) / np.sqrt(3.0)
    a = np.radians(degrees)
    # Rodrigues' rotation of the chroma vector (perpendicular to the grey axis).
    rotated = chroma * np.cos(a) + np.cross(axis, chroma) * np.sin(a)
    return np.clip(grey + rotated, 0.0, 1.0)
