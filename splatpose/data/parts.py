"""The second dataset family, ``parts``: procedural industrial parts, path traced with light and shadow.

Used ONLY FOR EVALUATION (experiments/PROTOCOL.md): no setting of the framework is chosen by looking at
its metrics. It shares nothing with the built-in ``synthetic`` family but the cache machinery
(generated_cache): other meshes (trimesh, parts_meshes), other materials (mostly weakly textured), other
defects (parts_defects: Chip, ColourShift, Dent, Scratch), another renderer (Mitsuba 3, parts_render).

Per class, in the MAD-Sim layout (shared/MAD_SIM_FORMAT.md)::

    transforms.json        camera_angle_x + one frame per train view (OpenGL camera-to-world)
    train/good/<i>.png     views on rings of a sphere band around the object, all at one distance
    test/good/<k>.png      views at random elevations, distances, rolls and aim points (never a train pose)
    test/<Defect>/<k>.png  the same, each with one defect on a surface point facing the camera
    ground_truth/<Defect>/<k>_mask.png   pixels where the defect's own surface is visible, or where the
                                         visible surface moved (depth) or appeared/vanished (coverage),
                                         from id/depth passes of the defective and defect-free scenes
    test_poses.json        the true test poses (OpenGL camera-to-world), only to measure localization

The ``realistic`` presets add what a camera on an inspection line records (parts_capture.py: a bench,
a light that changed since the reference capture, noise, JPEG; train/masks/<i>.png), built apart from the
tuning family's capture_effects.py.

``ensure_parts_dataset(root, classes, preset=..., **overrides)`` generates what is missing into
``root/parts-<key>/`` and returns that folder; same settings and seed -> byte-identical files (with the
same Mitsuba variant, which is part of the key).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from splatpose.data import generated_cache
from splatpose.data.cameras import look_at_opengl_c2w
from splatpose.data.generated_cache import save_png, write_json
from splatpose.data.mad_sim import REFERENCE_MASKS_DIR, TEST_POSES_FILE, TRANSFORMS_FILE
from splatpose.data.parts_capture import (BENCH_CANVAS, BENCH_KINDS, ViewLight, add_line_clutter, bench_texture,
                                          bench_view, draw_test_light, photograph)

# Bump when a change to the generator changes its output: cached datasets are then regenerated.
GENERATOR_VERSION = 1
# Kept here (not imported from parts_meshes/parts_defects) so that resolving a config needs no trimesh.
PARTS_CLASSES = ("01Knob", "02Bracket", "03Gear", "04Bottle", "05Housing")
PARTS_DEFECTS = ("Chip", "ColourShift", "Dent", "Scratch")
VARIANTS = ("auto", "llvm_ad_rgb", "scalar_rgb")


@dataclass(frozen=True)
class PartsSettings:
    """Everything that determines the generated files (and therefore the cache key).

    Lengths are in object units: every object is scaled so that 95% of its surface lies within radius 1
    (parts_meshes.normalise), like the built-in family, so camera distances are comparable.
    """

    seed: int = 0
    width: int = 200
    height: int = 200
    camera_angle_x: float = 0.6911112070083618   # Blender's default 50 mm lens, as in MAD-Sim
    n_train: int = 48
    n_test_good: int = 10
    n_test_per_defect: int = 4
    train_distance: float = 3.0
    train_elevation_deg: tuple[float, float] = (-30.0, 70.0)
    test_elevation_deg: tuple[float, float] = (-20.0, 65.0)
    test_distance_factor: tuple[float, float] = (0.88, 1.15)
    test_roll_deg: float = 30.0
    test_target_jitter: float = 0.12             # the camera aims near, not exactly at, the centre
    min_gap_to_train_camera: float = 0.08        # a test camera centre is at least this far from each train one
    spp: int = 64                                # path-tracing samples per pixel of the colour images
    max_depth: int = 5
    variant: str = "auto"                        # Mitsuba variant; "auto" is resolved by make_settings
    edge_len: float = 0.03                       # mesh refinement: bounds how fine a defect can be
    defect_size: float = 0.15                    # radius of dents, chips, colour shifts (scratch: see parts_defects)
    # A defect is kept only if its mask has this many pixels (and at most this share of the object's).
    min_defect_pixels: int = 40
    max_defect_fraction: float = 0.15
    mask_depth_change: float = 0.004             # a visible surface that moved more than this is defect
    # A camera on an inspection line (parts_capture.py); all off in the clean presets, and then absent
    # from the key. Test views only where named so; train views are the careful reference capture.
    bench: bool = False                          # a bench behind the part (one kind per class), its shadow
    test_clutter: tuple[int, int] = (1, 3)       # things left on the bench in each test view (low, high)
    shadow: float = 0.35                         # darkness of the part's soft shadow on the bench
    light_turn_deg: float = 0.0                  # test views: the studio turned about the vertical by up to this
    light_gain: tuple[float, float] = (1.0, 1.0)  # test views: the light's level (log-uniform range)
    light_warmth: float = 0.0                    # test views: red x (1 + w), blue x (1 - w), |w| up to this
    vignetting: float = 0.0                      # the lens's corner falloff, every view
    reference_electrons: float = 0.0             # photon noise of train views: electrons at white (0: none)
    test_electrons: tuple[float, float] = (0.0, 0.0)  # and of test views (log-uniform range; 0: none)
    read_noise: float = 0.0                      # Gaussian read noise, std in linear units (with photon noise)
    reference_jpeg: int = 0                      # JPEG quality of train views (0: PNG only)
    test_jpeg: tuple[int, int] = (0, 0)          # and of test views (uniform range; 0: none)
    reference_masks: bool = False                # write train/masks/<i>.png (the part's coverage)

    def key(self) -> str:
        # Capture settings at their defaults are left out, so the clean presets keep their folders.
        return generated_cache.settings_key(GENERATOR_VERSION, self, CAPTURE_FIELDS)

    @property
    def realistic(self) -> bool:
        """Whether any capture effect is on (then every image goes through parts_capture.photograph)."""
        return bool(self.bench or self.light_turn_deg or self.light_gain != (1.0, 1.0) or self.light_warmth
                    or self.vignetting or self.reference_electrons or any(self.test_electrons)
                    or self.reference_jpeg or any(self.test_jpeg) or self.reference_masks)


CAPTURE_FIELDS = ("bench", "test_clutter", "shadow", "light_turn_deg", "light_gain", "light_warmth", "vignetting",
                  "reference_electrons", "test_electrons", "read_noise", "reference_jpeg", "test_jpeg",
                  "reference_masks")
# The realistic capture, fixed from what a line's camera sees before any run on it (PROTOCOL's twentieth
# decision): a light turned by up to 40 degrees, 0.8-1.25x and slightly warmer or cooler between the
# reference capture and the line; a short exposure on the line (300-1200 electrons at white) against a long
# one for the references; JPEG 75-92 on the line, 95 for the references.
_REALISTIC = {"bench": True, "light_turn_deg": 40.0, "light_gain": (0.8, 1.25), "light_warmth": 0.06,
              "vignetting": 0.15, "reference_electrons": 2000.0, "test_electrons": (300.0, 1200.0),
              "read_noise": 0.004, "reference_jpeg": 95, "test_jpeg": (75, 92), "reference_masks": True}


_TINY = {"width": 64, "height": 64, "n_train": 6, "n_test_good": 2, "n_test_per_defect": 1, "spp": 16,
         "edge_len": 0.06, "defect_size": 0.3, "min_defect_pixels": 6, "max_defect_fraction": 0.4}
PRESETS: dict[str, dict] = {
    # The CPU default: 200x200, quick enough to path-trace on a CPU (experiments/results/notes_data_io.md).
    "small": {},
    # Closer to MAD-Sim; 400x400 keeps CPU runs possible.
    "mad_sim_like": {"width": 400, "height": 400, "n_train": 120, "n_test_good": 25, "n_test_per_defect": 15,
                     "edge_len": 0.02, "min_defect_pixels": 160},
    # For tests: tiny images, a handful of views, coarse meshes.
    "tiny": _TINY,
    # "small" as a line's camera sees it (parts_capture.py): same objects, poses and defect masks.
    "realistic": _REALISTIC,
    # "tiny" as a line's camera sees it, for tests.
    "tiny_realistic": {**_TINY, **_REALISTIC},
}


def make_settings(preset: str = "small", **overrides) -> PartsSettings:
    """Settings of a preset with some fields overridden, the variant "auto" resolved to the one this
    machine runs (so the cache key names the renderer that made the files); unknown names raise a
    ValueError listing the valid ones."""
    if preset not in PRESETS:
        raise ValueError(f"unknown parts preset {preset!r}; presets: {', '.join(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(PartsSettings)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown parts generator settings {unknown}; valid settings: {', '.join(sorted(fields))}")
    values = {**PRESETS[preset], **overrides}
    # YAML gives lists where the dataclass holds tuples; tuples keep the settings hashable and the key stable.
    values = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in values.items()}
    variant = values.get("variant", "auto")
    if variant not in VARIANTS:
        raise ValueError(f"unknown Mitsuba variant {variant!r} in dataset.generator.variant; choose one of "
                         f"{', '.join(VARIANTS)}")
    if variant == "auto":
        from splatpose.data.parts_render import choose_variant  # a file search; Mitsuba is not imported
        values["variant"] = choose_variant()
    return PartsSettings(**values)


def ensure_parts_dataset(root: Path, classes: list[str] | tuple[str, ...] = PARTS_CLASSES,
                         preset: str = "small", **generator_settings) -> Path:
    """Generate the missing classes of a parts dataset (reusing finished ones) and return its root.

    Args:
        root: cache folder; the dataset lives in ``root/parts-<settings key>/``.
        classes: class names (PARTS_CLASSES).
        preset: "small" (CPU default), "mad_sim_like", "realistic", "tiny" or "tiny_realistic" (tests);
            ``generator_settings`` override its fields (see PartsSettings).
    Returns:
        The dataset root, to pass to ``mad_sim.load_class(root, class_name)``.
    """
    settings = make_settings(preset, **generator_settings)
    unknown = [c for c in classes if c not in PARTS_CLASSES]
    if unknown:
        raise ValueError(f"no part for classes {unknown}; classes of the parts family: {', '.join(PARTS_CLASSES)}")
    dataset_root = Path(root).expanduser() / f"parts-{settings.key()}"
    dataset_root.mkdir(parents=True, exist_ok=True)
    generated_cache.write_if_changed(
        dataset_root / "generator.json",
        json.dumps({"family": "parts", "generator_version": GENERATOR_VERSION,
                    "settings": dataclasses.asdict(settings)}, indent=2, sort_keys=True) + "\n")
    generated_cache.ensure_generated_classes(dataset_root, classes, "splatpose.data.parts",
                                             json.dumps(dataclasses.asdict(settings)), "parts")
    return dataset_root


# --------------------------------------------------------------------------------------------------
# Cameras


def _direction(elevation_rad: float, azimuth_rad: float) -> np.ndarray:
    """Unit vector from the origin towards a camera at this elevation (above the xy plane) and azimuth."""
    return np.array([np.cos(elevation_rad) * np.cos(azimuth_rad), np.cos(elevation_rad) * np.sin(azimuth_rad),
                     np.sin(elevation_rad)])


def train_poses(settings: PartsSettings) -> list[np.ndarray]:
    """OpenGL c2w [4, 4] of the train views: rings of constant elevation spanning train_elevation_deg,
    each holding views in proportion to its circumference, successive rings turned by a golden-ratio
    share of a step (so no two rings line up), all at train_distance, aimed at the origin, +z up."""
    n = settings.n_train
    n_rings = max(1, min(n, int(round(np.sqrt(n / 3.0)))))
    elevations = np.radians(np.linspace(*settings.train_elevation_deg, n_rings))
    counts = _split_count(n, np.cos(elevations))
    poses = []
    for ring, (elevation, count) in enumerate(zip(elevations, counts)):
        for j in range(count):
            azimuth = 2.0 * np.pi * (j + 0.618034 * ring) / count
            eye = settings.train_distance * _direction(elevation, azimuth)
            poses.append(look_at_opengl_c2w(eye, np.zeros(3), np.array([0.0, 0.0, 1.0])))
    return poses


def _split_count(total: int, weights: np.ndarray) -> list[int]:
    """Integers proportional to ``weights`` that sum to ``total`` (largest remainders get the rest)."""
    share = total * np.asarray(weights) / np.sum(weights)
    counts = np.floor(share).astype(int)
    for i in np.argsort(-(share - counts))[: total - counts.sum()]:
        counts[i] += 1
    return counts.tolist()


def sample_test_pose(settings: PartsSettings, rng: np.random.Generator, train_centres: np.ndarray) -> np.ndarray:
    """A random OpenGL c2w [4, 4] that is not a train pose: elevation uniform on the sphere band
    test_elevation_deg, any azimuth, a distance factor, a roll and an aim point near the centre; drawn
    again while its centre is within min_gap_to_train_camera of a train camera ([N, 3] train_centres)."""
    lo, hi = np.sin(np.radians(settings.test_elevation_deg))
    while True:
        elevation = np.arcsin(rng.uniform(lo, hi))
        azimuth = rng.uniform(0.0, 2.0 * np.pi)
        distance = settings.train_distance * rng.uniform(*settings.test_distance_factor)
        target = rng.uniform(-settings.test_target_jitter, settings.test_target_jitter, 3)
        roll = rng.uniform(-settings.test_roll_deg, settings.test_roll_deg)
        eye = distance * _direction(elevation, azimuth)
        if np.linalg.norm(train_centres - eye, axis=1).min() >= settings.min_gap_to_train_camera:
            return look_at_opengl_c2w(eye, target, np.array([0.0, 0.0, 1.0]), roll_deg=roll)


def image_seed(settings: PartsSettings, class_name: str, image_name: str) -> int:
    """The path tracer's sampler seed of one image: fixed by (seed, class, image), independent of order."""
    return zlib.crc32(f"{settings.seed}/{class_name}/{image_name}".encode()) & 0x7FFFFFFF


# --------------------------------------------------------------------------------------------------
# The line's camera (the realistic presets)


class LineCamera:
    """Draws and applies the capture of one class (parts_capture.py): the class's bench, each test view's
    light, and each view's clutter, noise and JPEG quality, every draw seeded by (seed, class, image)."""

    def __init__(self, settings: PartsSettings, class_name: str):
        self.settings, self.class_name = settings, class_name
        self.bench = None
        if settings.bench:
            rng = generated_cache.class_rng(settings.seed, f"{class_name}/bench")
            kind = BENCH_KINDS[int(rng.integers(len(BENCH_KINDS)))]
            self.bench = bench_texture(kind, (settings.height * BENCH_CANVAS, settings.width * BENCH_CANVAS), rng)

    def _rng(self, name: str, stream: int) -> np.random.Generator:
        return np.random.default_rng([image_seed(self.settings, self.class_name, name), stream])

    def light(self, name: str) -> ViewLight:
        """The light an image is rendered under: a test image's own draw; train images: the studio as it is."""
        if not name.startswith("test/"):
            return ViewLight()
        s = self.settings
        return draw_test_light(self._rng(name, 1), s.light_turn_deg, s.light_gain, s.light_warmth)

    def photograph(self, out_dir: Path, name: str, premultiplied: np.ndarray, alpha: np.ndarray,
                   light: ViewLight) -> np.ndarray:
        """uint8 [H, W, 3] of a view rendered under ``light`` (render_linear's output) as the line's camera
        records it, the bench lit by the same light; for a train view with reference_masks, its object mask
        is written to train/masks/."""
        s, rng, test = self.settings, self._rng(name, 2), name.startswith("test/")
        bench = None
        if self.bench is not None:
            bench = bench_view(self.bench, alpha.shape, rng)
            if test:
                bench = add_line_clutter(bench, rng, int(rng.integers(s.test_clutter[0], s.test_clutter[1] + 1)))
        if test:
            low, high = s.test_electrons
            electrons = float(np.exp(rng.uniform(np.log(low), np.log(high)))) if low else 0.0
            jpeg = int(rng.integers(s.test_jpeg[0], s.test_jpeg[1] + 1)) if s.test_jpeg[0] else 0
        else:
            electrons, jpeg = s.reference_electrons, s.reference_jpeg
            if s.reference_masks:
                save_png(out_dir / REFERENCE_MASKS_DIR / f"{Path(name).stem}.png",
                         (alpha >= 0.5).astype(np.uint8) * 255)
        return photograph(premultiplied, alpha, bench, light, rng, s.shadow if bench is not None else 0.0,
                          s.vignetting, electrons, s.read_noise, jpeg)


# --------------------------------------------------------------------------------------------------
# One class


def generate_class(out_dir: Path, class_name: str, settings: PartsSettings) -> None:
    """Write one class in the MAD-Sim layout into ``out_dir`` (which must not exist yet)."""
    # Imported here: trimesh and Mitsuba are needed only in the generator's child process.
    from splatpose.data.parts_meshes import build_part
    from splatpose.data.parts_render import PathTracer

    rng = generated_cache.class_rng(settings.seed, class_name)
    obj = build_part(class_name, rng, settings.edge_len)
    tracer = PathTracer(settings.width, settings.height, settings.camera_angle_x, spp=settings.spp,
                        max_depth=settings.max_depth, variant=settings.variant)
    scene = tracer.scene(obj)
    train_c2w = train_poses(settings)
    train_centres = np.stack([c2w[:3, 3] for c2w in train_c2w])
    n_test = settings.n_test_good + settings.n_test_per_defect * len(PARTS_DEFECTS)
    camera = LineCamera(settings, class_name) if settings.realistic else None
    out_dir.mkdir(parents=True)

    def light_of(name: str) -> ViewLight:
        return ViewLight() if camera is None else camera.light(name)

    def image_of(name: str, view_scene, c2w: np.ndarray, light: ViewLight) -> np.ndarray:
        seed = image_seed(settings, class_name, name)
        return tracer.render_rgb(view_scene, c2w, seed) if camera is None else camera.photograph(
            out_dir, name, *tracer.render_linear(view_scene, c2w, seed), light)

    with tqdm(total=len(train_c2w) + n_test, desc=f"generating parts {class_name}", unit="img",
              leave=False) as progress:
        frames = []
        for i, c2w in enumerate(train_c2w):
            name = f"train/good/{i}.png"
            save_png(out_dir / name, image_of(name, scene, c2w, ViewLight()))
            frames.append({"file_path": name, "transform_matrix": c2w.tolist()})
            progress.update()
        write_json(out_dir / TRANSFORMS_FILE, {"camera_angle_x": settings.camera_angle_x, "frames": frames})

        test_poses = {}
        for k in range(settings.n_test_good):
            c2w = sample_test_pose(settings, rng, train_centres)
            name = f"test/good/{k:03d}.png"
            light = light_of(name)
            lit = scene if camera is None else tracer.scene(obj, light)
            save_png(out_dir / name, image_of(name, lit, c2w, light))
            test_poses[name] = c2w.tolist()
            progress.update()
        for defect in PARTS_DEFECTS:
            for k in range(settings.n_test_per_defect):
                name = f"test/{defect}/{k:03d}.png"
                light = light_of(name)
                c2w, defective_scene, mask = place_visible_defect(tracer, obj, scene, defect, settings, rng,
                                                                  train_centres, light)
                save_png(out_dir / name, image_of(name, defective_scene, c2w, light))
                save_png(out_dir / "ground_truth" / defect / f"{k:03d}_mask.png", mask.astype(np.uint8) * 255)
                test_poses[name] = c2w.tolist()
                progress.update()
    write_json(out_dir / TEST_POSES_FILE, {
        "convention": "camera-to-world, OpenGL axes (x right, y up, z back), as in transforms.json",
        "camera_angle_x": settings.camera_angle_x,
        "poses": test_poses,
    })


def place_visible_defect(tracer, obj, scene, defect: str, settings: PartsSettings, rng: np.random.Generator,
                         train_centres: np.ndarray, light: ViewLight = ViewLight(), max_tries: int = 40):
    """A test pose, the scene with one defect seen from it, and the defect's mask.

    The defect is centred on the surface point seen by a random object pixel whose surface faces the
    camera (for a Chip, preferably a pixel on a crease: chips break edges), oriented by the surface
    normal there (turned to face the camera), and kept only if its mask has between min_defect_pixels and max_defect_fraction of the
    object's pixels; otherwise another point, and after a few failures another pose, is drawn.

    Returns:
        c2w: [4, 4] OpenGL camera-to-world; the defective Mitsuba scene (under ``light``); mask: bool [H, W].
    """
    from splatpose.data.parts_defects import apply_defect

    for attempt in range(max_tries):
        if attempt % 5 == 0:
            c2w = sample_test_pose(settings, rng, train_centres)
            good = tracer.render_surface(scene, c2w)
            object_pixels = int((good.shape == "object").sum())
            candidates = _defect_candidates(good, defect, c2w[:3, 3])
        if len(candidates) == 0:
            continue
        row, col = candidates[rng.integers(len(candidates))]
        centre, normal = good.position[row, col], good.normal[row, col]
        if normal @ (c2w[:3, 3] - centre) < 0.0:
            normal = -normal
        defective = apply_defect(obj, defect, centre, normal, settings.defect_size, rng)
        defective_scene = tracer.scene(defective, light)
        mask = defect_mask(good, tracer.render_surface(defective_scene, c2w), settings.mask_depth_change)
        if settings.min_defect_pixels <= int(mask.sum()) <= settings.max_defect_fraction * object_pixels:
            return c2w, defective_scene, mask
    raise RuntimeError(f"could not place a visible {defect} defect of size {settings.defect_size} in {max_tries} "
                       "tries; adjust dataset.generator.defect_size, min_defect_pixels or max_defect_fraction")


def _defect_candidates(good, defect: str, camera_centre: np.ndarray) -> np.ndarray:
    """[K, 2] (row, col) of object pixels where a defect may be centred: the surface there faces the
    camera (within 60 degrees: a defect seen edge-on is barely visible); for a Chip, preferably the crease
    pixels (the normal turns by more than 30 degrees to a neighbour; chips break edges)."""
    on_object = good.shape == "object"
    normal = good.normal / np.maximum(np.linalg.norm(good.normal, axis=-1, keepdims=True), 1e-12)
    to_camera = camera_centre - good.position
    to_camera /= np.maximum(np.linalg.norm(to_camera, axis=-1, keepdims=True), 1e-12)
    # |cos|: the geometric normal's orientation is arbitrary (it follows the triangle's winding).
    facing = on_object & (np.abs((normal * to_camera).sum(-1)) > 0.5)
    if defect == "Chip":
        turn_right = np.abs((normal[:, 1:] * normal[:, :-1]).sum(-1)) < np.cos(np.radians(30.0))
        turn_down = np.abs((normal[1:] * normal[:-1]).sum(-1)) < np.cos(np.radians(30.0))
        crease = np.zeros_like(on_object)
        crease[:, :-1] |= turn_right & on_object[:, 1:]
        crease[:-1] |= turn_down & on_object[1:]
        crease &= on_object
        if crease.any():
            return np.argwhere(crease)
    return np.argwhere(facing if facing.any() else on_object)


def defect_mask(good, defective, depth_change: float) -> np.ndarray:
    """bool [H, W]: where the defect's own surface is visible, where coverage changed (a chip opens a view
    of the background), or where the visible surface moved by more than ``depth_change`` (object units).
    ``good`` and ``defective`` are SurfacePasses of one pose and seed."""
    hit_good, hit_defective = np.isin(good.shape, ("object", "defect")), np.isin(defective.shape, ("object", "defect"))
    moved = hit_good & hit_defective & (np.abs(good.depth - defective.depth) > depth_change)
    return (defective.shape == "defect") | (hit_good != hit_defective) | moved


if __name__ == "__main__":
    # The child process of generated_cache.generate_in_child_process: OUT_DIR CLASS_NAME SETTINGS_JSON
    _, out, name, settings_json = sys.argv
    generate_class(Path(out), name, make_settings(**json.loads(settings_json)))
