"""Objects and defects of the generated dataset: real meshes shipped in pyvista's wheel, coloured with a
seeded solid texture, and the three MAD-Sim defect types (and Dents) applied to them.

Every object is centred on the origin, +z up, scaled so that 95% of its surface lies within radius 1
(``normalise``: the object units of all lengths here), and refined so that no triangle edge is longer
than ``edge_len``: colour lives on the vertices, so the refinement bounds how fine the texture can be. Each triangle carries a ``surface_id`` that survives the defects
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

from splatpose.data.mad_sim import DEFECT_TYPES
from splatpose.data.offscreen import SURFACE_ID, VERTEX_RGB


@dataclass(frozen=True)
class MeshSource:
    """A mesh shipped inside the pyvista wheel (no download) and the rotation that puts its up on +z."""

    load: Callable[[], pv.DataSet]
    # Rotations (axis, degrees) applied in order, so that the object stands upright on +z.
    rotations: tuple[tuple[str, float], ...] = ()
    # Colour pattern: None, the rich two-level texture; a number k, k large regions of muted colours
    # with no small cells (a weakly textured object: few corners for feature detectors).
    regions: int | None = None
    # The defect types of its test set (test/<type>/): MAD-Sim's three, and for some classes Dents
    # too (a defect seen through its shading only).
    defects: tuple[str, ...] = DEFECT_TYPES
    # Its look: a Phong sheen (0: matte) and photon noise on the object in every image of the clean
    # presets (electrons at white; 0: none), like a path tracer's sampling noise; the realistic preset
    # adds its own sensor noise to every class instead.
    specular: float = 0.0
    photons_at_white: float = 0.0
    # The light it is rendered under (offscreen.LIGHTINGS).
    lighting: str = "two_lights"


def mug() -> pv.PolyData:
    """A tapered mug with a ring handle, built from pyvista primitives: a body of revolution whose only
    shape asymmetries are the handle (about its axis) and the taper (top against bottom), so that
    poses turned about the axis are told apart by a small feature only (the tuning family's
    near-symmetric object; see experiments/PROTOCOL.md)."""
    profile = pv.PolyData(np.array([[0.0, 0.0, -0.5], [0.36, 0.0, -0.5], [0.46, 0.0, 0.5], [0.0, 0.0, 0.5]]),
                          lines=np.array([4, 0, 1, 2, 3]))
    body = profile.extrude_rotate(resolution=96, capping=False).triangulate()
    handle = pv.ParametricTorus(ringradius=0.26, crosssectionradius=0.06).rotate_x(90.0).translate((0.44, 0.0, 0.02))
    merged = (body + handle.triangulate()).clean()
    return pv.PolyData(merged.points, merged.faces)


def knob() -> pv.PolyData:
    """A control knob: a stepped body of revolution (a flared skirt, a plain grip, a domed cap)
    whose only asymmetry about its axis is a thin pointer ridge across the cap. In one colour, a turn
    about the axis is told by that ridge and the shading alone (the tuning family's analogue of a
    uniform turned part with one small feature; see experiments/PROTOCOL.md)."""
    profile = pv.PolyData(np.array([[0.0, 0.0, -0.5], [0.5, 0.0, -0.5], [0.5, 0.0, -0.38], [0.36, 0.0, -0.3],
                                    [0.33, 0.0, 0.3], [0.28, 0.0, 0.42], [0.0, 0.0, 0.46]]),
                          lines=np.array([7, 0, 1, 2, 3, 4, 5, 6]))
    body = profile.extrude_rotate(resolution=96, capping=False).triangulate()
    ridge = pv.Box(bounds=(-0.02, 0.3, -0.035, 0.035, 0.38, 0.5), level=2).triangulate()
    merged = (body + ridge).clean()
    return pv.PolyData(merged.points, merged.faces)


def bracket() -> pv.PolyData:
    """An angle bracket: a flat base plate and an upright plate along one of its short edges, joined by a
    triangular gusset. Flat faces under a strong sheen blow out over whole regions that run to the part's
    outline, so the white of a highlight joins the background's (the tuning analogue of the held-out family's
    bent metal bracket; see experiments/PROTOCOL.md)."""
    base = pv.Box(bounds=(-0.6, 0.6, -0.35, 0.35, -0.3, -0.24), level=3)
    upright = pv.Box(bounds=(0.54, 0.6, -0.35, 0.35, -0.24, 0.45), level=3)
    gusset = pv.PolyData(np.array([[0.54, -0.03, -0.24], [0.1, -0.03, -0.24], [0.54, -0.03, 0.2],
                                   [0.54, 0.03, -0.24], [0.1, 0.03, -0.24], [0.54, 0.03, 0.2]]),
                         faces=np.array([3, 0, 1, 2, 3, 3, 5, 4, 4, 0, 3, 4, 1, 4, 1, 4, 5, 2, 4, 2, 5, 3, 0]))
    merged = (base.triangulate() + upright.triangulate() + gusset.triangulate()).clean()
    return pv.PolyData(merged.points, merged.faces)


# Class name -> mesh. Numbered like MAD-Sim's classes. Only meshes that load offline are listed.
MESHES: dict[str, MeshSource] = {
    "01Ant": MeshSource(examples.load_ant, (("x", 90.0),)),
    "02Airplane": MeshSource(examples.load_airplane),
    "03Nut": MeshSource(examples.load_nut, (("x", 90.0),)),
    "04Globe": MeshSource(examples.load_globe),
    # weakly textured: the tuning family's stand-ins for single-colour parts (experiments/PROTOCOL.md)
    "05PlainNut": MeshSource(examples.load_nut, (("x", 90.0),), regions=2),
    "06PlainAnt": MeshSource(examples.load_ant, (("x", 90.0),), regions=3),
    # near-symmetric (turned about its axis, only the handle tells the turn): the tuning family's
    # stand-in for turned and toothed parts
    "07PlainMug": MeshSource(mug, regions=2),
    # one colour, turned, one small feature (a pointer ridge) tells the turn
    "08PlainKnob": MeshSource(knob, regions=1),
    # three muted colours and a fourth defect type, Dents, that changes only the shading: the tuning
    # family's analogue of a shading-only defect on a smooth part
    "09DentKnob": MeshSource(knob, regions=3, defects=("Burrs", "Dents", "Missing", "Stains")),
    # the same knob in one colour with a sheen and sensor noise: dents and stains under a glossy,
    # noisy look (the tuning analogue of the held-out family's path-traced plastic)
    "10GlossyKnob": MeshSource(knob, regions=1, defects=("Burrs", "Dents", "Missing", "Stains"), specular=0.5,
                               photons_at_white=1000.0),
    # the glossy knob without the noise: the sheen alone, as clean as the held-out family's path-traced
    # renders (the trait the two families share; PROTOCOL.md, tenth decision)
    "11SheenKnob": MeshSource(knob, regions=1, defects=("Burrs", "Dents", "Missing", "Stains"), specular=0.5),
    # the matte one-colour knob with dents under a soft studio light (a soft box and a dome) instead of two
    # lamps: the shading that shows a dent changes slowly, as under the held-out family's environment light
    "12SoftKnob": MeshSource(knob, regions=1, defects=("Burrs", "Dents", "Missing", "Stains"), lighting="soft"),
    # 05PlainNut with a strong sheen: at some views a flat face is blown out to the background's white, so the
    # part's own pixels cannot be told from the background by their colour, and the splats (whose colours change
    # slowly with the view) render it darker there (the tuning analogue of the held-out family's blown-out
    # metal, PROTOCOL.md twenty-third decision)
    "13ShinyNut": MeshSource(examples.load_nut, (("x", 90.0),), regions=2, specular=1.0),
    # a metal angle bracket in one colour with the same sheen: its flat plates blow out to white in regions that
    # reach the outline, where no rule built on the white's connection to the border can tell them from the
    # background (the held-out bracket's large misses, PROTOCOL.md twenty-fifth observations)
    "14ShinyBracket": MeshSource(bracket, regions=1, specular=1.0),
}


def load_object(class_name: str, rng: np.random.Generator, edge_len: float = 0.02, patch_size: float = 0.25,
                detail_size: float = 0.06) -> tuple[pv.PolyData, SolidTexture]:
    """The defect-free object of a class: normalised, refined, with normals, colours and surface ids.

    Args:
        class_name: a key of MESHES.
        rng: the class's random generator (draws the colour pattern).
        edge_len: longest triangle edge after refinement (object units, see ``normalise``).
        patch_size, detail_size: typical size of the texture's colour patches and of its small cells.
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
    mesh = normalise(mesh).subdivide_adaptive(max_edge_len=edge_len)
    # Normals once, on the whole object: they stay attached to the vertices through every defect,
    # so the shading of untouched pixels never changes. Split at creases so hard edges stay hard.
    mesh = mesh.compute_normals(cell_normals=False, split_vertices=True, feature_angle=50.0,
                                auto_orient_normals=False, consistent_normals=True)
    texture = SolidTexture.on_surface(mesh, rng, patch_size, detail_size) if source.regions is None \
        else SolidTexture.regions_on_surface(mesh, rng, source.regions)
    mesh.point_data[VERTEX_RGB] = texture(mesh.points)
    mesh.cell_data[SURFACE_ID] = np.arange(mesh.n_cells, dtype=np.int64)
    return _renderable(mesh), texture


def normalise(mesh: pv.PolyData, quantile: float = 0.95) -> pv.PolyData:
    """Centre the bounding box on the origin and scale so that ``quantile`` of the surface area lies
    within radius 1. For compact objects that is about the bounding sphere; sparse ones (the ant's
    legs, the airplane's wings) get larger, so that all classes fill similar parts of the image."""
    points = np.asarray(mesh.points, dtype=np.float64)
    centre = 0.5 * (points.min(axis=0) + points.max(axis=0))
    points -= centre
    sample = sample_surface(pv.PolyData(points, mesh.faces), np.random.default_rng(0), 20000)
    radius = np.quantile(np.linalg.norm(sample, axis=1), quantile)
    return pv.PolyData((points / radius).astype(np.float32), mesh.faces)


def sample_surface(mesh: pv.PolyData, rng: np.random.Generator, n: int) -> np.ndarray:
    """n points [n, 3] uniformly distributed over the area of a triangle mesh."""
    triangles = np.asarray(mesh.points, dtype=np.float64)[mesh.regular_faces]          # [T, 3, 3]
    areas = 0.5 * np.linalg.norm(np.cross(triangles[:, 1] - triangles[:, 0], triangles[:, 2] - triangles[:, 0]),
                                 axis=1)
    chosen = rng.choice(len(triangles), size=n, p=areas / areas.sum())
    u, v = rng.uniform(size=(2, n))
    flip = u + v > 1.0  # fold the unit square onto the triangle
    u[flip], v[flip] = 1.0 - u[flip], 1.0 - v[flip]
    t = triangles[chosen]
    return t[:, 0] + u[:, None] * (t[:, 1] - t[:, 0]) + v[:, None] * (t[:, 2] - t[:, 0])


@dataclass(frozen=True)
class SolidTexture:
    """A seeded, non-repeating colour pattern defined in 3D: ``texture(points [N, 3]) -> uint8 RGB [N, 3]``.

    Two levels of Voronoi cells seeded uniformly over the object's surface: patches of random saturated
    colours, and inside them small cells of varying brightness. Cell borders and their junctions give
    feature detectors corners to latch onto everywhere on the object, and no two places look alike.
    The cells are sized in object units, a few pixels wide at the default resolution: finer detail
    would alias (there is no anti-aliasing) and change from view to view. A function of 3D position,
    so it has no seams and extends to added geometry (burrs).
    """

    patch_sites: np.ndarray   # [P, 3] centres of the colour patches
    palette: np.ndarray       # [P, 3] patch colours in [0, 1]
    detail_sites: np.ndarray  # [Q, 3] centres of the small cells
    brightness: np.ndarray    # [Q] brightness factor of each small cell

    @classmethod
    def on_surface(cls, mesh: pv.PolyData, rng: np.random.Generator, patch_size: float,
                   detail_size: float) -> SolidTexture:
        """Seed about area / size**2 cells of each level uniformly over the surface of a triangle mesh."""
        area = float(mesh.area)
        n_patches = max(8, int(round(area / patch_size**2)))
        n_details = max(8, int(round(area / detail_size**2)))
        palette = _hsv_to_rgb(rng.uniform(0.0, 1.0, n_patches), rng.uniform(0.45, 1.0, n_patches),
                              rng.uniform(0.6, 1.0, n_patches))
        return cls(patch_sites=sample_surface(mesh, rng, n_patches), palette=palette,
                   detail_sites=sample_surface(mesh, rng, n_details),
                   brightness=rng.uniform(0.45, 1.2, n_details))

    @classmethod
    def regions_on_surface(cls, mesh: pv.PolyData, rng: np.random.Generator, regions: int) -> SolidTexture:
        """``regions`` large patches of muted colours, uniform inside (one detail cell, brightness 1)."""
        palette = _hsv_to_rgb(rng.uniform(0.0, 1.0, regions), rng.uniform(0.2, 0.5, regions),
                              rng.uniform(0.55, 0.85, regions))
        return cls(patch_sites=sample_surface(mesh, rng, regions), palette=palette,
                   detail_sites=np.zeros((1, 3)), brightness=np.ones(1))

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
# Defects. Each takes the defect-free object, a surface point (a vertex index) and a size (object
# units) and returns a new mesh; the input is never modified.


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
    return _renderable(stained)


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
    return _renderable(mesh.remove_cells(np.flatnonzero(removed)))


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
                        height=height, radius=radius * rng.uniform(0.25, 0.4), resolution=8, capping=True)
        spikes.append(spike.triangulate())
    burrs = pv.merge(spikes, merge_points=False).compute_normals(cell_normals=False, split_vertices=True,
                                                                  feature_angle=50.0)
    burrs.point_data[VERTEX_RGB] = texture(np.asarray(burrs.points))
    burrs.cell_data[SURFACE_ID] = mesh.n_cells + np.arange(burrs.n_cells, dtype=np.int64)
    return _renderable(pv.merge([_renderable(mesh), _renderable(burrs)], merge_points=False))


DENT_DEPTH = "dent_depth"   # point data of a dented mesh: how far each vertex sank (object units)


def add_dent(mesh: pv.PolyData, centre_vertex: int, radius: float, rng: np.random.Generator) -> pv.PolyData:
    """Dents: the surface sinks smoothly around a vertex, colours and triangles unchanged, so the dent
    shows only through its shading (and, seen edge-on, the outline).

    Vertices within ``radius`` of the centre (and facing its way) move along minus the centre's normal
    by ``depth * cos(pi/2 * r / radius)**2``, a bowl with zero slope at its rim; ``depth`` is drawn in
    [0.25, 0.4] x radius. The moved vertices and their neighbours get the normals of the dented surface;
    every other normal stays as it was, so pixels away from the dent keep their exact colour. Point data
    ``dent_depth`` (float32 [N], object units) records each vertex's displacement, for the mask.
    """
    points = np.asarray(mesh.points, dtype=np.float64)
    normals = np.asarray(mesh.point_data["Normals"], dtype=np.float64)
    distance = np.linalg.norm(points - points[centre_vertex], axis=1)
    inside = (distance < radius) & (normals @ normals[centre_vertex] > 0.2)
    depth = radius * rng.uniform(0.25, 0.4)
    sink = np.where(inside, depth * np.cos(0.5 * np.pi * np.minimum(distance / radius, 1.0)) ** 2, 0.0)
    dented = mesh.copy()
    dented.points = (points - sink[:, None] * normals[centre_vertex]).astype(np.float32)
    # (on the bare geometry: VTK keeps a mesh's existing normals instead of computing them)
    fresh = pv.PolyData(np.asarray(dented.points), dented.faces).compute_normals(
        cell_normals=False, split_vertices=False, auto_orient_normals=False, consistent_normals=False)
    reshaded = distance < radius * 1.2
    new_normals = np.asarray(mesh.point_data["Normals"]).copy()
    new_normals[reshaded] = np.asarray(fresh.point_data["Normals"])[reshaded]
    dented.point_data["Normals"] = new_normals
    out = _renderable(dented)
    out.point_data[DENT_DEPTH] = sink.astype(np.float32)
    return out


def _renderable(mesh: pv.PolyData) -> pv.PolyData:
    """A copy with exactly the arrays the renderer uses, and ``Normals`` marked as the normals:
    pyvista filters (remove_cells, merge) keep the array but forget that role, and VTK would then
    shade with normals of its own, changing pixels far from the defect."""
    out = pv.PolyData(np.asarray(mesh.points).copy(), np.asarray(mesh.faces).copy())
    for name in ("Normals", VERTEX_RGB):
        out.point_data[name] = np.asarray(mesh.point_data[name]).copy()
    out.cell_data[SURFACE_ID] = np.asarray(mesh.cell_data[SURFACE_ID]).copy()
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
