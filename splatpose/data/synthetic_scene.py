"""Objects and defects of the generated dataset: real meshes shipped in pyvista's wheel, coloured with a
seeded solid texture, and the three MAD-Sim defect types applied to them.

Every object is normalised to its bounding sphere (centre at the origin, radius 1, +z up) and refined
so that no triangle edge is longer than ``edge_len``; colour lives on the vertices, so the refinement
sets how fine the texture is. Each triangle carries a ``surface_id`` that survives the defects
(removed triangles take theirs along, added ones get new ids), which is what the id pass of the
renderer compares to find the pixels a defect changed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import pyvista as pv
from pyvista import examples
from scipy.spatial import cKDTree

from splatpose.data.offscreen import SURFACE_ID, VERTEX_RGB


@dataclass(frozen=True)
class MeshSource:
    """A mesh shipped inside the pyvista wheel (no download) and the rotation that puts its up on +z."""

    load: Callable[[], pv.DataSet]
    # Rotations (axis, degrees) applied in order, so that the object stands upright on +z.
    rotations: tuple[tuple[str, float], ...] = ()


# Class name -> mesh. Numbered like MAD-Sim's classes. Only meshes that load offline are listed.
MESHES: dict[str, MeshSource] = {
    "01Ant": MeshSource(examples.load_ant, (("x", 90.0),)),
    "02Airplane": MeshSource(examples.load_airplane),
    "03Nut": MeshSource(examples.load_nut, (("x", 90.0),)),
    "04Globe": MeshSource(examples.load_globe),
}


def available_meshes() -> list[str]:
    return list(MESHES)


def load_object(class_name: str, edge_len: float, rng: np.random.Generator) -> tuple[pv.PolyData, SolidTexture]:
    """The defect-free object of a class: normalised, refined, with normals, colours and surface ids.

    Args:
        class_name: a key of MESHES.
        edge_len: longest triangle edge after refinement, in units of the bounding-sphere radius.
        rng: the class's random generator (draws the colour pattern).
    Returns:
        The mesh, a PolyData with point data ``Normals`` (float32 [N, 3]) and ``vertex_rgb`` (uint8
        [N, 3]) and cell data ``surface_id`` (int64 [M]), and its texture (to colour added geometry).
    """
    if class_name not in MESHES:
        raise KeyError(f"no mesh for class {class_name!r}; generated classes: {', '.join(MESHES)}")
    source = MESHES[class_name]
    mesh = source.load().extract_surface(algorithm=None).triangulate().clean()
    mesh = pv.PolyData(mesh.points, mesh.faces)  # drop the file's own arrays (e.g. texture coordinates)
    for axis, degrees in source.rotations:
        mesh = getattr(mesh, f"rotate_{axis}")(degrees, point=(0.0, 0.0, 0.0))
    points = np.asarray(mesh.points, dtype=np.float64)
    centre = 0.5 * (points.min(axis=0) + points.max(axis=0))
    radius = np.linalg.norm(points - centre, axis=1).max()
    mesh.points = ((points - centre) / radius).astype(np.float32)
    mesh = mesh.subdivide_adaptive(max_edge_len=edge_len)
    # Normals once, on the whole object: they stay attached to the vertices through every defect,
    # so the shading of untouched pixels never changes. Split at creases so hard edges stay hard.
    mesh = mesh.compute_normals(cell_normals=False, split_vertices=True, feature_angle=50.0,
                                auto_orient_normals=False, consistent_normals=True)
    texture = SolidTexture.on_surface(np.asarray(mesh.points, dtype=np.float64), rng)
    mesh.point_data[VERTEX_RGB] = texture(mesh.points)
    mesh.cell_data[SURFACE_ID] = np.arange(mesh.n_cells, dtype=np.int64)
    return _only_arrays(mesh, point=["Normals", VERTEX_RGB], cell=[SURFACE_ID]), texture


@dataclass(frozen=True)
class SolidTexture:
    """A seeded, non-repeating colour pattern defined in 3D: ``texture(points [N, 3]) -> uint8 RGB [N, 3]``.

    Two levels of Voronoi cells seeded on the object's surface: large patches of random saturated
    colours, and inside them small cells of varying brightness. Cell borders and their junctions give
    feature detectors corners to latch onto everywhere on the object, and no two places look alike.
    A function of 3D position, so it has no seams and extends to added geometry (burrs).
    """

    patch_sites: np.ndarray   # [P, 3] centres of the colour patches
    palette: np.ndarray       # [P, 3] patch colours in [0, 1]
    detail_sites: np.ndarray  # [Q, 3] centres of the small cells
    brightness: np.ndarray    # [Q] brightness factor of each small cell

    @classmethod
    def on_surface(cls, surface_points: np.ndarray, rng: np.random.Generator, n_patches: int = 300,
                   n_details: int = 3000) -> SolidTexture:
        """Seed the cells at random points of a (uniformly refined) surface [N, 3]."""
        n = len(surface_points)
        palette = _hsv_to_rgb(rng.uniform(0.0, 1.0, n_patches), rng.uniform(0.45, 1.0, n_patches),
                              rng.uniform(0.6, 1.0, n_patches))
        return cls(patch_sites=surface_points[rng.choice(n, size=min(n, n_patches), replace=False)],
                   palette=palette,
                   detail_sites=surface_points[rng.choice(n, size=min(n, n_details), replace=False)],
                   brightness=rng.uniform(0.65, 1.15, n_details))

    def __call__(self, points: np.ndarray) -> np.ndarray:
        points = np.asarray(points, dtype=np.float64)
        _, patch = cKDTree(self.patch_sites).query(points)
        _, detail = cKDTree(self.detail_sites).query(points)
        rgb = self.palette[patch] * self.brightness[detail][:, None]
        return np.clip(np.round(rgb * 255.0), 0, 255).astype(np.uint8)


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV -> RGB, all in [0, 1]: [P] x 3 -> [P, 3]."""
    i = np.floor(h * 6.0).astype(int) % 6
    f = h * 6.0 - np.floor(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    table = np.stack([np.stack(c, axis=-1) for c in
                      [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]])  # [6, P, 3]
    return table[i, np.arange(len(h))]


# --------------------------------------------------------------------------------------------------
# Defects. Each takes the defect-free object, a surface point (a vertex index) and a size (in units
# of the bounding-sphere radius) and returns a new mesh; the input is never modified.


def add_stain(mesh: pv.PolyData, centre_vertex: int, radius: float, rng: np.random.Generator) -> pv.PolyData:
    """Stains: the surface colour changes in a blotch around a vertex (geometry untouched)."""
    points = np.asarray(mesh.points, dtype=np.float64)
    normals = np.asarray(mesh.point_data["Normals"], dtype=np.float64)
    inside = _surface_patch(points, normals, centre_vertex, radius, rng)
    stain_rgb = _hsv_to_rgb(rng.uniform(0, 1, 1), rng.uniform(0.6, 1.0, 1), rng.uniform(0.05, 0.35, 1))[0]
    stained = mesh.copy()
    rgb = stained.point_data[VERTEX_RGB].astype(np.float64) / 255.0
    rgb[inside] = 0.15 * rgb[inside] + 0.85 * stain_rgb
    stained.point_data[VERTEX_RGB] = np.round(rgb * 255.0).astype(np.uint8)
    return _only_arrays(stained, point=["Normals", VERTEX_RGB], cell=[SURFACE_ID])


def remove_part(mesh: pv.PolyData, centre_vertex: int, radius: float, rng: np.random.Generator) -> pv.PolyData:
    """Missing: the triangles within a blob around a vertex are removed, opening a hole in the shell."""
    centres = np.asarray(mesh.cell_centers().points, dtype=np.float64)
    centre = np.asarray(mesh.points[centre_vertex], dtype=np.float64)
    # An irregular blob: the union of a few balls near the centre vertex.
    balls = centre + rng.normal(scale=0.35 * radius, size=(3, 3))
    radii = radius * rng.uniform(0.6, 1.0, 3)
    removed = np.zeros(mesh.n_cells, dtype=bool)
    for ball, r in zip(np.vstack([centre, balls]), np.concatenate([[radius], radii])):
        removed |= np.linalg.norm(centres - ball, axis=1) < r
    # remove_cells keeps the point arrays but forgets which one holds the normals: restore it.
    return _only_arrays(mesh.remove_cells(np.flatnonzero(removed)), point=["Normals", VERTEX_RGB],
                        cell=[SURFACE_ID])


def add_burrs(mesh: pv.PolyData, centre_vertex: int, radius: float, rng: np.random.Generator,
              texture: SolidTexture) -> pv.PolyData:
    """Burrs: a small cluster of thin spikes grown out of the surface around a vertex.

    The spikes are coloured with the object's own solid texture, as if made of the same material:
    they show as new geometry, not as paint.
    """
    points = np.asarray(mesh.points, dtype=np.float64)
    normals = np.asarray(mesh.point_data["Normals"], dtype=np.float64)
    patch = np.flatnonzero(_surface_patch(points, normals, centre_vertex, 0.6 * radius, rng))
    roots = rng.choice(patch, size=min(len(patch), int(rng.integers(3, 6))), replace=False)
    spikes = []
    for root in roots:
        direction = normals[root] + rng.normal(scale=0.35, size=3)
        direction /= np.linalg.norm(direction)
        height = radius * rng.uniform(0.7, 1.3)
        spike = pv.Cone(center=points[root] + 0.45 * height * direction, direction=direction,
                        height=height, radius=radius * rng.uniform(0.15, 0.3), resolution=8, capping=True)
        spikes.append(spike.triangulate())
    burrs = pv.merge(spikes, merge_points=False).compute_normals(cell_normals=False, split_vertices=True,
                                                                  feature_angle=50.0)
    burrs.point_data[VERTEX_RGB] = texture(np.asarray(burrs.points))
    burrs.cell_data[SURFACE_ID] = mesh.n_cells + np.arange(burrs.n_cells, dtype=np.int64)
    burrs = _only_arrays(burrs, point=["Normals", VERTEX_RGB], cell=[SURFACE_ID])
    base = _only_arrays(mesh, point=["Normals", VERTEX_RGB], cell=[SURFACE_ID])
    return _only_arrays(pv.merge([base, burrs], merge_points=False), point=["Normals", VERTEX_RGB],
                        cell=[SURFACE_ID])


def _only_arrays(mesh: pv.PolyData, point: list[str], cell: list[str]) -> pv.PolyData:
    out = pv.PolyData(mesh.points.copy(), mesh.faces.copy())
    for name in point:
        out.point_data[name] = np.asarray(mesh.point_data[name]).copy()
    for name in cell:
        out.cell_data[name] = np.asarray(mesh.cell_data[name]).copy()
    out.point_data.active_normals_name = "Normals"
    return out


def _surface_patch(points: np.ndarray, normals: np.ndarray, centre_vertex: int, radius: float,
                   rng: np.random.Generator) -> np.ndarray:
    """bool [N]: vertices near a surface point and facing its way (so a patch on a thin part does not
    leak through to the opposite side). The border wobbles, so no patch is a perfect disc."""
    offsets = points - points[centre_vertex]
    distance = np.linalg.norm(offsets, axis=1)
    wobble = 1.0 + 0.3 * np.sin(offsets @ rng.normal(size=3) * (4.0 / radius) + rng.uniform(0, 2 * np.pi))
    facing = normals @ normals[centre_vertex] > 0.2
    return (distance < radius * wobble) & facing
