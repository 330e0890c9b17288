"""Objects of the ``parts`` family: procedural industrial parts built with trimesh, and their materials.

Every object is centred on the origin, +z up, scaled so that 95% of its surface lies within radius 1
(``normalise``; the object units of all lengths in this family), refined so that no triangle edge is
longer than ``edge_len`` (defects deform and recolour vertices, so the refinement bounds how fine a
defect can be), and given vertex normals that are smooth within a part and split at creases sharper
than 35 degrees (so machined edges stay hard). Each part carries one feature that breaks its rotational
symmetry (a flat, a pointer, a keyway, a handle, a connector), so that its pose is recoverable.

Colours are linear RGB reflectances in [0, 1] (the path tracer's units), either per vertex or, for the
textured class, a bitmap looked up through per-vertex texture coordinates.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import trimesh
from shapely.geometry import Point, Polygon
from shapely.affinity import scale as scale_shape

CREASE_ANGLE_DEG = 35.0


@dataclass(frozen=True)
class SurfaceMesh:
    """A triangle mesh ready to render.

    vertices: [V, 3] float64, object units; faces: [F, 3] int64; normals: [V, 3] float64 unit;
    colours: [V, 3] float64 linear RGB in [0, 1]; uvs: [V, 2] float64 or None (bitmap materials only).
    """

    vertices: np.ndarray
    faces: np.ndarray
    normals: np.ndarray
    colours: np.ndarray
    uvs: np.ndarray | None = None

    def with_faces(self, keep: np.ndarray) -> "SurfaceMesh":
        """The sub-mesh of the faces where ``keep`` ([F] bool) holds, with only the vertices they use."""
        faces = self.faces[keep]
        used, inverse = np.unique(faces, return_inverse=True)
        return SurfaceMesh(self.vertices[used], inverse.reshape(-1, 3).astype(np.int64), self.normals[used],
                           self.colours[used], None if self.uvs is None else self.uvs[used])


@dataclass(frozen=True)
class Material:
    """How a surface scatters light.

    kind: "diffuse" (matte), "plastic" (diffuse base under a smooth varnish: shiny highlights) or
        "conductor" (metal; its colour tints the reflection).
    roughness: low = shiny; GGX alpha for "conductor", the principled BSDF's perceptual roughness
        (about sqrt(alpha)) for "plastic".
    texture: None (colours come from the vertices) or a linear RGB bitmap [h, w, 3] float32 read
        through the mesh's uvs.
    """

    kind: str
    roughness: float = 0.1
    texture: np.ndarray | None = field(default=None, compare=False)

    def with_colours(self, recolour: Callable[[np.ndarray], np.ndarray]) -> "Material":
        """The same material with its bitmap passed through ``recolour`` (vertex colours are the mesh's)."""
        return self if self.texture is None else replace(self, texture=recolour(self.texture).astype(np.float32))


@dataclass(frozen=True)
class PartObject:
    """One defect-free object of the family: its mesh and its material. ``description`` is for the docs."""

    mesh: SurfaceMesh
    material: Material
    description: str


# --------------------------------------------------------------------------------------------------
# Shapes (raw trimesh parts, any scale; ``build_part`` normalises them)


def _revolve(profile_rz: list[tuple[float, float]], sections: int = 96) -> trimesh.Trimesh:
    """A solid of revolution about +z from a closed profile of (radius, height) points that starts and
    ends on the axis."""
    return trimesh.creation.revolve(np.asarray(profile_rz, dtype=np.float64), sections=sections)


def _rotation(axis: str, degrees: float) -> np.ndarray:
    vector = {"x": [1, 0, 0], "y": [0, 1, 0], "z": [0, 0, 1]}[axis]
    return trimesh.transformations.rotation_matrix(np.radians(degrees), vector)


def _moved(mesh: trimesh.Trimesh, translation=(0.0, 0.0, 0.0), rotation: np.ndarray | None = None) -> trimesh.Trimesh:
    mesh = mesh.copy()
    if rotation is not None:
        mesh.apply_transform(rotation)
    mesh.apply_translation(translation)
    return mesh


def knob_shape() -> trimesh.Trimesh:
    """A lathe-turned control knob: skirt, knurl-free grip, domed top; a D-flat on one side and a pointer
    ridge on the top break its symmetry."""
    profile = [(0.0, -0.45), (0.80, -0.45), (0.80, -0.33), (0.62, -0.28), (0.60, 0.15), (0.55, 0.28),
               (0.40, 0.36), (0.0, 0.38)]
    body = _revolve(profile)
    flat_at = 0.50    # the D-flat: a plane x = 0.50 cut into the grip (above the skirt)
    v = body.vertices.copy()
    grip = v[:, 2] > -0.30
    v[grip, 0] = np.minimum(v[grip, 0], flat_at)
    body = trimesh.Trimesh(v, body.faces, process=True)
    pointer = trimesh.creation.box(extents=(0.55, 0.12, 0.10))
    pointer = _moved(pointer, translation=(-0.25, 0.0, 0.38))
    return trimesh.util.concatenate([body, pointer])


def bracket_shape() -> trimesh.Trimesh:
    """An L-shaped mounting bracket: a base plate with a round hole and a slot, an upright plate with one
    off-centre hole, and a triangular gusset on one side."""
    t = 0.12                                                     # plate thickness
    base = Polygon([(0, -0.6), (1.4, -0.6), (1.4, 0.6), (0, 0.6)],
                   holes=[_circle_ring((0.95, 0.25), 0.16), _slot_ring((0.95, -0.25), 0.28, 0.09)])
    base_mesh = trimesh.creation.extrude_polygon(base, t)
    upright = Polygon([(0, -0.6), (1.0, -0.6), (1.0, 0.6), (0, 0.6)], holes=[_circle_ring((0.62, 0.22), 0.14)])
    upright_mesh = trimesh.creation.extrude_polygon(upright, t)
    # Stand the upright on the base's x = 0 edge: its polygon x becomes height z, its thickness runs along +x.
    upright_mesh = _moved(upright_mesh, rotation=_rotation("y", -90.0), translation=(t, 0.0, 0.0))
    gusset = trimesh.creation.extrude_polygon(Polygon([(0, 0), (0.55, 0), (0, 0.55)]), 0.08)
    gusset = _moved(gusset, rotation=_rotation("x", 90.0), translation=(t, -0.42, t))
    return trimesh.util.concatenate([base_mesh, upright_mesh, gusset])


def gear_shape(n_teeth: int = 14) -> trimesh.Trimesh:
    """A spur gear with a keyed bore, two lightening holes of different sizes and a hub boss on one face."""
    angles = np.linspace(0.0, 2.0 * np.pi, 4 * n_teeth, endpoint=False)
    radii = np.tile([0.82, 1.0, 1.0, 0.82], n_teeth)             # root, tip, tip, root per tooth
    shift = np.tile([0.0, 0.08, -0.08, 0.0], n_teeth) * (2.0 * np.pi / n_teeth) / 4.0
    rim = [(r * np.cos(a + s), r * np.sin(a + s)) for r, a, s in zip(radii, angles, shift)]
    bore = [(0.16 * np.cos(a), 0.16 * np.sin(a)) for a in np.linspace(0.3, 2 * np.pi - 0.3, 24)]
    bore += [(0.22, -0.05), (0.22, 0.05)]                       # the keyway notch
    holes = [bore, _circle_ring((0.0, 0.52), 0.17), _circle_ring((-0.45, -0.26), 0.10)]
    disc = trimesh.creation.extrude_polygon(Polygon(rim, holes=holes), 0.30)
    # The hub sinks 0.01 into the disc: coplanar faces of two shells would fight over the same pixels.
    hub = trimesh.creation.extrude_polygon(Polygon(_circle_ring((0, 0), 0.34), holes=[bore]), 0.26)
    hub = _moved(hub, translation=(0.0, 0.0, 0.29))
    return trimesh.util.concatenate([disc, hub])


def bottle_shape() -> trimesh.Trimesh:
    """A jug-like bottle: body, shoulder, neck and cap turned on a lathe, with a loop handle on one side."""
    profile = [(0.0, -1.0), (0.42, -1.0), (0.48, -0.94), (0.50, 0.10), (0.44, 0.35), (0.22, 0.58),
               (0.17, 0.70), (0.20, 0.72), (0.20, 0.92), (0.0, 0.93)]
    body = _revolve(profile)
    handle = trimesh.creation.torus(major_radius=0.30, minor_radius=0.065, major_sections=48, minor_sections=16)
    handle = _moved(handle, rotation=_rotation("x", 90.0), translation=(0.52, 0.0, -0.05))
    return trimesh.util.concatenate([body, handle])


def housing_shape() -> trimesh.Trimesh:
    """A sensor housing: a capsule lying along x, a connector block on top near one end, a round port at
    the other end and a mounting foot below."""
    body = trimesh.creation.capsule(height=1.3, radius=0.42, count=(48, 48))
    body = _moved(body, rotation=_rotation("y", 90.0))
    connector = _moved(trimesh.creation.box(extents=(0.40, 0.30, 0.30)), translation=(0.35, 0.0, 0.45))
    port = trimesh.creation.cylinder(radius=0.14, height=0.30, sections=32)
    port = _moved(port, rotation=_rotation("y", 90.0), translation=(-1.0, 0.1, 0.05))
    foot = _moved(trimesh.creation.box(extents=(0.9, 0.75, 0.08)), translation=(0.1, 0.0, -0.44))
    return trimesh.util.concatenate([body, connector, port, foot])


def _circle_ring(centre: tuple[float, float], radius: float, n: int = 32) -> list[tuple[float, float]]:
    return list(Point(centre).buffer(radius, n // 4).exterior.coords)[:-1]


def _slot_ring(centre: tuple[float, float], length: float, radius: float) -> list[tuple[float, float]]:
    slot = scale_shape(Point(0, 0).buffer(1.0, 8), length / 2 + radius, radius)
    return [(x + centre[0], y + centre[1]) for x, y in list(slot.exterior.coords)[:-1]]


# --------------------------------------------------------------------------------------------------
# From a shape to a renderable object


def normalise(mesh: trimesh.Trimesh, quantile: float = 0.95) -> trimesh.Trimesh:
    """Centre the bounding box on the origin and scale so that ``quantile`` of the surface area lies
    within radius 1 (the same rule as the built-in family, so camera distances mean the same)."""
    mesh = mesh.copy()
    mesh.apply_translation(-0.5 * (mesh.bounds[0] + mesh.bounds[1]))
    # A fixed seed: the normalisation, and so every file, must not depend on global random state.
    points, _ = trimesh.sample.sample_surface(mesh, 20000, seed=0)
    mesh.apply_scale(1.0 / np.quantile(np.linalg.norm(points, axis=1), quantile))
    return mesh


def refined_with_crease_normals(mesh: trimesh.Trimesh, edge_len: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Subdivide until no edge is longer than ``edge_len``, then split vertices at creases.

    Returns vertices [V, 3], faces [F, 3] and unit normals [V, 3] (area-weighted within each smooth
    group). Vertices split at a crease share their position, so a defect that moves vertices as a
    function of position never tears the surface open.
    """
    vertices, faces = conforming_subdivision(np.asarray(mesh.vertices, dtype=np.float64),
                                             np.asarray(mesh.faces, dtype=np.int64), edge_len)
    refined = trimesh.Trimesh(vertices, faces, process=True)
    smooth = trimesh.graph.smooth_shade(refined, angle=np.radians(CREASE_ANGLE_DEG), facet_minarea=None)
    return (np.asarray(smooth.vertices, dtype=np.float64), np.asarray(smooth.faces, dtype=np.int64),
            area_weighted_normals(np.asarray(smooth.vertices, dtype=np.float64), np.asarray(smooth.faces)))


def conforming_subdivision(vertices: np.ndarray, faces: np.ndarray, max_edge: float,
                           max_rounds: int = 30) -> tuple[np.ndarray, np.ndarray]:
    """Split every edge longer than ``max_edge`` at its midpoint, in both faces that share it, until none
    is left; each face becomes 1-4 triangles by how many of its edges were split (winding kept).

    Unlike trimesh.remesh.subdivide_to_size, which splits faces one by one, this leaves no T-junction:
    a vertex in the middle of a neighbour's edge opens a crack that rays slip through (seen as single
    black pixels, rays caught inside the closed surface), and that a defect's deformation widens.

    Args: vertices [V, 3], faces [F, 3] (consistent winding). Returns the refined (vertices, faces).
    """
    for _ in range(max_rounds):
        corner_edges = np.sort(faces[:, [[0, 1], [1, 2], [2, 0]]].reshape(-1, 2), axis=1)
        edges, edge_of_corner = np.unique(corner_edges, axis=0, return_inverse=True)
        long_edge = np.linalg.norm(vertices[edges[:, 0]] - vertices[edges[:, 1]], axis=1) > max_edge
        if not long_edge.any():
            return vertices, faces
        midpoint = np.full(len(edges), -1, dtype=np.int64)
        midpoint[long_edge] = len(vertices) + np.arange(long_edge.sum())
        vertices = np.concatenate([vertices, 0.5 * (vertices[edges[long_edge, 0]] + vertices[edges[long_edge, 1]])])
        mids = midpoint[edge_of_corner.reshape(-1)].reshape(-1, 3)   # mids[f, k]: midpoint of edge (v_k, v_k+1)
        faces = np.concatenate(_split_faces(faces, mids))
    raise ValueError(f"mesh refinement to edges <= {max_edge} did not finish in {max_rounds} rounds; "
                     "raise dataset.generator.edge_len")


def _split_faces(faces: np.ndarray, mids: np.ndarray) -> list[np.ndarray]:
    """The triangles replacing each face, given the midpoints of its split edges (-1 = not split)."""
    split = mids >= 0
    count = split.sum(axis=1)
    out = [faces[count == 0]]
    a, b, c = faces.T
    m01, m12, m20 = mids.T
    full = count == 3
    out += [np.stack(t, axis=1)[full] for t in ((a, m01, m20), (m01, b, m12), (m20, m12, c), (m01, m12, m20))]
    for roll in range(3):
        # Roll each face so its one split edge is edge 0, or its one unsplit edge is edge 2.
        v = np.roll(faces, -roll, axis=1)
        m = np.roll(mids, -roll, axis=1)
        one = (count == 1) & split[:, roll]
        out += [np.stack(t, axis=1)[one] for t in ((v[:, 0], m[:, 0], v[:, 2]), (m[:, 0], v[:, 1], v[:, 2]))]
        two = (count == 2) & ~split[:, (roll + 2) % 3]
        out += [np.stack(t, axis=1)[two] for t in ((m[:, 0], v[:, 1], m[:, 1]), (v[:, 0], m[:, 0], m[:, 1]),
                                                   (v[:, 0], m[:, 1], v[:, 2]))]
    return out


def area_weighted_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Unit vertex normals [V, 3]: the sum of the (area-weighted) normals of the faces using each vertex."""
    cross = np.cross(vertices[faces[:, 1]] - vertices[faces[:, 0]], vertices[faces[:, 2]] - vertices[faces[:, 0]])
    normals = np.zeros_like(vertices)
    for corner in range(3):
        np.add.at(normals, faces[:, corner], cross)
    length = np.linalg.norm(normals, axis=1, keepdims=True)
    return normals / np.maximum(length, 1e-12)


def srgb_to_linear(srgb: np.ndarray) -> np.ndarray:
    """sRGB-encoded values in [0, 1] -> linear values (the IEC 61966-2-1 curve)."""
    srgb = np.asarray(srgb, dtype=np.float64)
    return np.where(srgb <= 0.04045, srgb / 12.92, ((srgb + 0.055) / 1.055) ** 2.4)


def _uniform(colour_srgb) -> Callable[[np.ndarray], np.ndarray]:
    def colours(vertices: np.ndarray) -> np.ndarray:
        return np.tile(srgb_to_linear(colour_srgb), (len(vertices), 1))
    return colours


def _vertical_gradient(bottom_srgb, top_srgb, sideways: float = 0.25) -> Callable[[np.ndarray], np.ndarray]:
    """A smooth gradient, mostly along z with a little along x (so it has no rotational symmetry)."""
    def colours(vertices: np.ndarray) -> np.ndarray:
        t = np.clip(0.5 + 0.5 * ((1.0 - sideways) * vertices[:, 2] + sideways * vertices[:, 0]), 0.0, 1.0)[:, None]
        return srgb_to_linear((1.0 - t) * np.asarray(bottom_srgb) + t * np.asarray(top_srgb))
    return colours


def _gear_regions(vertices: np.ndarray) -> np.ndarray:
    """Four large colour regions: toothed rim, two halves of the web (split along a tilted line), hub."""
    rim, web_a, web_b, hub = (srgb_to_linear(c) for c in ([0.78, 0.62, 0.20], [0.22, 0.42, 0.62],
                                                          [0.70, 0.72, 0.74], [0.62, 0.22, 0.18]))
    r = np.linalg.norm(vertices[:, :2], axis=1)
    out = np.where((vertices[:, 0] + 0.4 * vertices[:, 1] > 0.0)[:, None], web_a, web_b)
    out = np.where((r > 0.72)[:, None], rim, out)
    return np.where((r < 0.36)[:, None] & (vertices[:, 2] > 0.0)[:, None], hub, out)


def fine_texture(rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """A fine procedural bitmap [size, size, 3] (linear RGB float32): a cast-resin look of small speckles
    over a faint woven pattern, tileable in u (the seam of the cylindrical mapping)."""
    u, v = np.meshgrid(np.arange(size) / size, np.arange(size) / size)
    weave = 0.5 + 0.5 * np.sin(2 * np.pi * 24 * u) * np.sin(2 * np.pi * 24 * v)
    speckle = rng.random((size, size))
    base = np.array([0.30, 0.52, 0.36])
    srgb = base * (0.80 + 0.25 * weave[..., None])
    srgb = np.where((speckle > 0.93)[..., None], [0.92, 0.90, 0.78], srgb)
    srgb = np.where((speckle < 0.05)[..., None], [0.10, 0.16, 0.12], srgb)
    return srgb_to_linear(np.clip(srgb, 0.0, 1.0)).astype(np.float32)


def cylindrical_uvs(vertices: np.ndarray, faces: np.ndarray, normals: np.ndarray, axis: int = 0,
                    repeats: float = 2.0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Texture coordinates from a cylinder around ``axis`` (u: angle, v: position along the axis).

    Faces that straddle the seam (u jumping from near 1 to near 0) get copies of their low-u vertices
    with u + 1, so no face stretches the whole texture across itself (the bitmap repeats in u).
    Returns vertices, faces, normals (with the copies) and uvs [V, 2].
    """
    a, b = [i for i in range(3) if i != axis]
    u = (np.arctan2(vertices[:, b], vertices[:, a]) / (2 * np.pi) + 0.5) * repeats
    v = (vertices[:, axis] + 1.0) * 0.5 * repeats
    seam = np.ptp(u[faces], axis=1) > 0.5 * repeats
    low = np.zeros_like(faces, dtype=bool)
    low[seam] = u[faces[seam]] < 0.5 * repeats
    copies, new_index = np.unique(faces[low], return_inverse=True)
    faces = faces.copy()
    faces[low] = len(vertices) + new_index
    vertices = np.concatenate([vertices, vertices[copies]])
    normals = np.concatenate([normals, normals[copies]])
    uvs = np.stack([np.concatenate([u, u[copies] + repeats]), np.concatenate([v, v[copies]])], axis=1)
    return vertices, faces, normals, uvs


@dataclass(frozen=True)
class PartRecipe:
    """How to build one class: its raw shape, its colours and its material."""

    shape: Callable[[], trimesh.Trimesh]
    material: Material
    colours: Callable[[np.ndarray], np.ndarray]
    description: str
    textured: bool = False


# Class name -> recipe. Numbered like MAD-Sim's classes. Mostly weakly textured on purpose.
PARTS: dict[str, PartRecipe] = {
    "01Knob": PartRecipe(knob_shape, Material("diffuse"), _uniform([0.16, 0.30, 0.62]),
                         "lathe-turned knob with a D-flat and a pointer; uniform matte blue plastic"),
    "02Bracket": PartRecipe(bracket_shape, Material("conductor", roughness=0.18), _uniform([0.86, 0.84, 0.80]),
                            "L-bracket with holes, a slot and a gusset; shiny brushed-aluminium metal"),
    "03Gear": PartRecipe(gear_shape, Material("diffuse"), _gear_regions,
                         "spur gear with keyed bore, two holes, hub boss; four large matte colour regions"),
    "04Bottle": PartRecipe(bottle_shape, Material("plastic", roughness=0.3),
                           _vertical_gradient([0.10, 0.38, 0.22], [0.92, 0.80, 0.40]),
                           "jug with a loop handle; smooth green-to-sand colour gradient, satin plastic"),
    "05Housing": PartRecipe(housing_shape, Material("diffuse"), _uniform([1.0, 1.0, 1.0]),
                            "capsule sensor housing with connector, port and foot; fine speckled bitmap",
                            textured=True),
}


def build_part(class_name: str, rng: np.random.Generator, edge_len: float) -> PartObject:
    """The defect-free object of a class: normalised, refined, with crease-aware normals and colours.

    Args:
        class_name: a key of PARTS.
        rng: the class's random generator (draws the bitmap of textured classes).
        edge_len: longest triangle edge after refinement (object units).
    """
    if class_name not in PARTS:
        raise KeyError(f"no part for class {class_name!r}; classes of the parts family: {', '.join(PARTS)}")
    recipe = PARTS[class_name]
    vertices, faces, normals = refined_with_crease_normals(normalise(recipe.shape()), edge_len)
    uvs, material = None, recipe.material
    if recipe.textured:
        vertices, faces, normals, uvs = cylindrical_uvs(vertices, faces, normals)
        material = replace(material, texture=fine_texture(rng))
    mesh = SurfaceMesh(vertices, faces, normals, recipe.colours(vertices), uvs)
    return PartObject(mesh, material, recipe.description)
