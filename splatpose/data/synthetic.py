"""The built-in dataset: MAD-Sim-layout classes generated from real meshes, rendered headless with VTK.

Per class (see shared/MAD_SIM_FORMAT.md for the layout it writes)::

    transforms.json        camera_angle_x + one frame per train view (OpenGL camera-to-world)
    train/good/<i>.png     views on a sphere band around the object, all at one distance
    test/good/<k>.png      views at other elevations, distances and camera rolls (never a train pose)
    test/{Burrs,Missing,Stains}/<k>.png   the same, each with one small defect facing the camera
                                          (the knobs 09-12: also test/Dents/, see synthetic_scene.MESHES)
    ground_truth/<defect>/<k>_mask.png    pixels where the defective render differs from the
                                          defect-free render at the same pose (colour or surface id;
                                          a dent: its sunk triangles, see ``defect_mask``)
    test_poses.json        the true test poses (OpenGL camera-to-world), only to measure localization
    train/masks/<i>.png    only with ``reference_masks``: the object's coverage (8-bit alpha, 255 =
                           object) in each train view, from the render's sub-pixel id pass

The ``realistic`` preset turns on what a real capture adds (``splatpose.data.capture_effects``): a
textured bench with clutter behind the object (another kind of surface behind the test views than
behind the train views, and a new draw in every view), lighting that drifts between views (gain,
colour temperature, a smooth shading field; wider ranges for the test views), Poisson and Gaussian
sensor noise, and a JPEG round trip (stored as PNG). Objects, poses and defect masks are those of the
clean preset with the same seed: the capture draws come from their own per-image random streams.

``ensure_synthetic_dataset(root, classes, preset=..., **overrides)`` generates what is missing into
``root/synthetic-<key>/`` (``key`` hashes the settings and the generator version) and returns that
folder. Each class is generated into a hidden temporary folder and renamed into place when complete,
under a file lock, so an interrupted or concurrent generation never leaves a half class that a later
run would trust. Same settings, same seed -> byte-identical files (with the same VTK and Mesa).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from splatpose.data import generated_cache
from splatpose.data.cameras import look_at_opengl_c2w
from splatpose.data.capture_effects import (BACKGROUND_KINDS, add_clutter, apply_lighting, background_texture, cast_shadow,
                                            composite, jpeg_round_trip, quantise, random_background, random_lighting,
                                            sensor_noise)
from splatpose.data.generated_cache import save_png as _save_png
from splatpose.data.generated_cache import write_json as _write_json
from splatpose.data.mad_sim import DEFECT_TYPES, REFERENCE_MASKS_DIR, TEST_POSES_FILE, TRANSFORMS_FILE
from splatpose.data.offscreen import SURFACE_ID, OffscreenRenderer
from splatpose.data.synthetic_scene import (DENT_DEPTH, MESHES, SolidTexture, add_burrs, add_dent, add_stain, load_object,
                                            remove_part)

# Bump when a change to the generator changes its output: cached datasets are then regenerated.
GENERATOR_VERSION = 5
DEFAULT_CLASSES = ("01Ant", "02Airplane", "03Nut")


@dataclass(frozen=True)
class GeneratorSettings:
    """Everything that determines the generated files (and therefore the cache key).

    Lengths are in object units: every object is scaled so that 95% of its surface lies within
    radius 1 of the origin (synthetic_scene.normalise).
    """

    seed: int = 0
    width: int = 200
    height: int = 200
    camera_angle_x: float = 0.6911112070083618   # Blender's default 50 mm lens, as in MAD-Sim
    n_train: int = 48
    n_test_good: int = 10
    n_test_per_defect: int = 5
    train_distance: float = 3.0
    train_elevation_deg: tuple[float, float] = (-45.0, 75.0)
    # Test poses differ from train poses in elevation, distance (factor of train_distance) and roll.
    test_elevation_deg: tuple[float, float] = (-35.0, 70.0)
    test_distance_factor: tuple[float, float] = (0.9, 1.15)
    test_roll_deg: float = 25.0
    test_target_jitter: float = 0.1            # the camera aims near, not exactly at, the centre
    supersample: int = 3                       # anti-aliasing of the colour pass (odd; 1 = off)
    edge_len: float = 0.02                     # mesh refinement (colours live on the vertices)
    texture_patch_size: float = 0.15           # colour patches of the texture
    texture_detail_size: float = 0.06          # its small cells: a few pixels wide at 200x200
    defect_size: float = 0.08                  # radius of stains and holes, height of burrs
    # A defect is kept only if it changes this many pixels (and at most this share of the object's).
    min_defect_pixels: int = 12
    max_defect_fraction: float = 0.05
    # Realistic capture (capture_effects.py); all off in the clean presets, and then absent from the key.
    backgrounds: bool = False                  # a textured bench with clutter behind the object, per view
    clutter_shapes: tuple[int, int] = (1, 4)   # how many clutter shapes per view (low, high)
    lighting: bool = False                     # gain, colour temperature and shading drawn per view
    reference_gain: tuple[float, float] = (0.95, 1.05)   # global gain range of the train views
    test_gain: tuple[float, float] = (0.8, 1.2)          # and of the test views
    reference_temperature_shift: float = 0.02  # red *= 1 + t, blue *= 1 - t, |t| up to this (train)
    test_temperature_shift: float = 0.08       # the same for the test views
    reference_shading: float = 0.05            # shading field amplitude (1 +- this) of the train views
    test_shading: float = 0.15                 # and of the test views
    photons_at_white: float = 0.0              # Poisson noise: electrons at value 1 (0: off)
    read_noise_std: float = 0.0                # Gaussian read noise, std in [0, 1] units (0: off)
    jpeg_quality: int = 0                      # JPEG round trip at this quality (0: off)
    reference_masks: bool = False              # write train/masks/<i>.png (object coverage)
    test_light_turn_deg: float = 0.0           # test views: the lights turned about the vertical by up to this
    shadow: float = 0.0                        # with backgrounds: darkness of the part's soft shadow on the bench
    fixed_bench: bool = False                  # with backgrounds: one bench per class behind every view (a crop of it)

    def key(self) -> str:
        # Capture settings at their defaults are left out, so the clean presets keep their folders.
        return generated_cache.settings_key(GENERATOR_VERSION, self, CAPTURE_FIELDS)

    @property
    def realistic(self) -> bool:
        """Whether any capture effect is on (then every image goes through ``capture_view``)."""
        return bool(self.backgrounds or self.lighting or self.photons_at_white or self.read_noise_std
                    or self.jpeg_quality or self.test_light_turn_deg)


CAPTURE_FIELDS = ("backgrounds", "clutter_shapes", "lighting", "reference_gain", "test_gain",
                  "reference_temperature_shift", "test_temperature_shift", "reference_shading", "test_shading",
                  "photons_at_white", "read_noise_std", "jpeg_quality", "reference_masks", "test_light_turn_deg",
                  "shadow", "fixed_bench")


def _realistic(**overrides) -> dict:
    return {"backgrounds": True, "lighting": True, "photons_at_white": 400.0, "read_noise_std": 0.01,
            "jpeg_quality": 85, "reference_masks": True, **overrides}


PRESETS: dict[str, dict] = {
    # The CPU demo: small images, few views; a class generates in a few seconds.
    "small": {},
    # Closer to MAD-Sim (about 210 train views per class at 800x800); 400x400 keeps CPU runs possible.
    "mad_sim_like": {"width": 400, "height": 400, "n_train": 200, "n_test_good": 20, "n_test_per_defect": 10,
                     "edge_len": 0.012, "texture_detail_size": 0.04},
    # For tests and smoke runs: tiny images, a handful of views, coarse meshes (a few seconds per class).
    "tiny": {"width": 64, "height": 64, "n_train": 6, "n_test_good": 2, "n_test_per_defect": 1,
             "edge_len": 0.05, "defect_size": 0.15, "min_defect_pixels": 4, "max_defect_fraction": 0.15},
    # "small" as a real capture: textured bench and clutter, drifting light, sensor noise, JPEG 85,
    # reference masks (same objects, poses and defect masks as "small").
    "realistic": _realistic(),
    # "realistic" with a light that moves between the reference capture and the line (the lights turned in the
    # renderer for each test view, so shading and highlights move) and the part's shadow on the bench.
    "realistic_moving_light": _realistic(test_light_turn_deg=30.0, shadow=0.3),
    # "realistic_moving_light" on a line's fixture: one bench per class behind the reference and the test
    # views alike (each view a crop of it at its own offset, clutter drawn per view).
    "realistic_fixture": _realistic(test_light_turn_deg=30.0, shadow=0.3, fixed_bench=True),
    # "tiny" as a real capture, for tests.
    "tiny_realistic": _realistic(width=64, height=64, n_train=6, n_test_good=2, n_test_per_defect=1,
                                 edge_len=0.05, defect_size=0.15, min_defect_pixels=4, max_defect_fraction=0.15),
}


def make_settings(preset: str = "small", **overrides) -> GeneratorSettings:
    """Settings of a preset with some fields overridden; unknown names raise a ValueError listing the valid ones."""
    if preset not in PRESETS:
        raise ValueError(f"unknown synthetic preset {preset!r}; presets: {', '.join(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(GeneratorSettings)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown generator settings {unknown}; valid settings: {', '.join(sorted(fields))}")
    values = {**PRESETS[preset], **overrides}
    # YAML gives lists where the dataclass holds tuples; tuples keep the settings hashable and the key stable.
    values = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in values.items()}
    return GeneratorSettings(**values)


def ensure_synthetic_dataset(root: Path, classes: list[str] | tuple[str, ...] = DEFAULT_CLASSES,
                             preset: str = "small", **generator_settings) -> Path:
    """Generate the missing classes of a synthetic dataset (reusing finished ones) and return its root.

    Args:
        root: cache folder; the dataset lives in ``root/synthetic-<settings key>/``.
        classes: class names, keys of ``synthetic_scene.MESHES`` ("01Ant", "02Airplane", ...).
        preset: "small" (CPU demo), "mad_sim_like" or "tiny" (tests); ``generator_settings``
            override its fields (see GeneratorSettings).
    Returns:
        The dataset root, to pass to ``mad_sim.load_class(root, class_name)``.
    """
    settings = make_settings(preset, **generator_settings)
    unknown = [c for c in classes if c not in MESHES]
    if unknown:
        raise ValueError(f"no mesh for synthetic classes {unknown}; available: {', '.join(MESHES)}")
    dataset_root = Path(root).expanduser() / f"synthetic-{settings.key()}"
    dataset_root.mkdir(parents=True, exist_ok=True)
    generated_cache.write_if_changed(
        dataset_root / "generator.json",
        json.dumps({"generator_version": GENERATOR_VERSION, "settings": dataclasses.asdict(settings)},
                   indent=2, sort_keys=True) + "\n")
    generated_cache.ensure_generated_classes(dataset_root, classes, "splatpose.data.synthetic",
                                             json.dumps(dataclasses.asdict(settings)), "synthetic")
    return dataset_root


# --------------------------------------------------------------------------------------------------
# One class


def class_rng(settings: GeneratorSettings, class_name: str) -> np.random.Generator:
    """A generator seeded by (seed, class name): classes are independent of which others are generated."""
    return generated_cache.class_rng(settings.seed, class_name)


def build_object(settings: GeneratorSettings, class_name: str):
    """The defect-free object of a class, its texture, and the class's generator, advanced past them
    (it draws the poses and defects next). Re-creates exactly the object generate_class used."""
    rng = class_rng(settings, class_name)
    mesh, texture = load_object(class_name, rng, settings.edge_len, settings.texture_patch_size,
                                settings.texture_detail_size)
    return mesh, texture, rng


def generate_class(out_dir: Path, class_name: str, settings: GeneratorSettings) -> None:
    """Write one class in the MAD-Sim layout into ``out_dir`` (which must not exist yet)."""
    mesh, texture, rng = build_object(settings, class_name)
    train_c2w = train_poses(settings)
    source = MESHES[class_name]
    defect_types = source.defects
    n_test = settings.n_test_good + settings.n_test_per_defect * len(defect_types)
    out_dir.mkdir(parents=True)

    def save(name: str, image: np.ndarray, shown, c2w: np.ndarray) -> None:
        """Write an image; a class with a noisy look (clean presets) gets photon noise on the object
        (``shown``, the mesh in the image), none on the white around it, as a path tracer composites."""
        if source.photons_at_white and not settings.realistic:
            alpha = renderer.render_coverage(shown, c2w)[..., None]
            noisy = sensor_noise(image / 255.0, class_rng(settings, f"{class_name}|noise|{name}"),
                                 source.photons_at_white, 0.0)
            image = quantise(alpha * noisy + (1.0 - alpha))
        _save_png(out_dir / name, image)

    with OffscreenRenderer(settings.width, settings.height, settings.camera_angle_x,
                           settings.supersample, specular=source.specular, lighting=source.lighting) as renderer, \
            tqdm(total=len(train_c2w) + n_test, desc=f"generating {class_name}", unit="img",
                 leave=False) as progress:
        capture = CaptureDraws(settings, class_name)
        frames = []
        for i, c2w in enumerate(train_c2w):
            name = f"train/good/{i}.png"
            image = renderer.render_rgb(mesh, c2w)
            if settings.realistic or settings.reference_masks:
                alpha = renderer.render_coverage(mesh, c2w)
                if settings.reference_masks:
                    _save_png(out_dir / REFERENCE_MASKS_DIR / f"{i}.png", np.round(alpha * 255).astype(np.uint8))
                image = capture.view(name, image, alpha, reference=True)
            save(name, image, mesh, c2w)
            frames.append({"file_path": name, "transform_matrix": c2w.tolist()})
            progress.update()
        _write_json(out_dir / TRANSFORMS_FILE, {"camera_angle_x": settings.camera_angle_x, "frames": frames})

        test_poses = {}
        for k in range(settings.n_test_good):
            c2w = test_pose(settings, rng)
            name = f"test/good/{k:03d}.png"
            capture.turn_lights(renderer, name)
            image = renderer.render_rgb(mesh, c2w)
            if settings.realistic:
                image = capture.view(name, image, renderer.render_coverage(mesh, c2w), reference=False)
            save(name, image, mesh, c2w)
            test_poses[name] = c2w.tolist()
            progress.update()
        for defect in defect_types:
            for k in range(settings.n_test_per_defect):
                name = f"test/{defect}/{k:03d}.png"
                capture.turn_lights(renderer, name)
                c2w, image, mask, defective = render_defect_view(renderer, mesh, texture, defect, settings, rng)
                if settings.realistic:
                    image = capture.view(name, image, renderer.render_coverage(defective, c2w), reference=False)
                save(name, image, defective, c2w)
                _save_png(out_dir / "ground_truth" / defect / f"{k:03d}_mask.png", mask.astype(np.uint8) * 255)
                test_poses[name] = c2w.tolist()
                progress.update()
    _write_json(out_dir / TEST_POSES_FILE, {
        "convention": "camera-to-world, OpenGL axes (x right, y up, z back), as in transforms.json",
        "camera_angle_x": settings.camera_angle_x,
        "poses": test_poses,
    })


def train_poses(settings: GeneratorSettings) -> list[np.ndarray]:
    """OpenGL c2w [4, 4] of views spread evenly (a Fibonacci lattice) over a band of elevations."""
    n = settings.n_train
    lo, hi = np.sin(np.radians(settings.train_elevation_deg))
    golden_angle = np.pi * (3.0 - np.sqrt(5.0))
    poses = []
    for i in range(n):
        z = lo + (hi - lo) * (i + 0.5) / n            # uniform in sin(elevation) = uniform on the sphere
        azimuth = i * golden_angle
        direction = np.array([np.sqrt(1 - z * z) * np.cos(azimuth), np.sqrt(1 - z * z) * np.sin(azimuth), z])
        poses.append(look_at_opengl_c2w(settings.train_distance * direction, np.zeros(3), np.array([0, 0, 1.0])))
    return poses


def test_pose(settings: GeneratorSettings, rng: np.random.Generator) -> np.ndarray:
    """A random OpenGL c2w [4, 4]: random direction, distance and roll, aimed near the centre."""
    lo, hi = np.sin(np.radians(settings.test_elevation_deg))
    z = rng.uniform(lo, hi)
    azimuth = rng.uniform(0.0, 2.0 * np.pi)
    direction = np.array([np.sqrt(1 - z * z) * np.cos(azimuth), np.sqrt(1 - z * z) * np.sin(azimuth), z])
    distance = settings.train_distance * rng.uniform(*settings.test_distance_factor)
    target = rng.uniform(-settings.test_target_jitter, settings.test_target_jitter, 3)
    roll = rng.uniform(-settings.test_roll_deg, settings.test_roll_deg)
    return look_at_opengl_c2w(distance * direction, target, np.array([0, 0, 1.0]), roll_deg=roll)


def render_defect_view(renderer: OffscreenRenderer, mesh, texture: SolidTexture, defect: str,
                       settings: GeneratorSettings, rng: np.random.Generator,
                       max_tries: int = 40) -> tuple[np.ndarray, np.ndarray, np.ndarray, object]:
    """A test pose, the defective render there, and its mask.

    The defect is placed on a surface point visible from the pose, and kept only if it changes
    between ``min_defect_pixels`` and ``max_defect_fraction`` of the object's pixels (visible but
    small, as in MAD-Sim); otherwise another point, and after a few failures another pose, is drawn.

    Returns:
        c2w: [4, 4] OpenGL camera-to-world; image: uint8 [H, W, 3]; mask: bool [H, W]; the defective
        mesh (for its coverage pass).
    """
    for attempt in range(max_tries):
        if attempt % 5 == 0:
            c2w = test_pose(settings, rng)
            good_rgb = renderer.render_rgb(mesh, c2w)
            good_ids = renderer.render_surface_ids(mesh, c2w)
            object_pixels = int((good_ids >= 0).sum())
            visible_cells = good_ids[good_ids >= 0]
        if visible_cells.size == 0:
            continue
        # A random visible pixel picks the triangle, so larger visible areas are picked more often.
        cell = int(rng.choice(visible_cells))
        vertex = int(mesh.get_cell(cell).point_ids[0])
        defective = apply_defect(mesh, texture, defect, vertex, settings.defect_size, rng)
        image = renderer.render_rgb(defective, c2w)
        mask = defect_mask(renderer, defective, c2w, image, good_rgb, good_ids)
        changed = int(mask.sum())
        if settings.min_defect_pixels <= changed <= settings.max_defect_fraction * object_pixels:
            return c2w, image, mask, defective
    raise RuntimeError(f"could not place a visible {defect} defect of size {settings.defect_size} in "
                       f"{max_tries} tries; adjust defect_size, min_defect_pixels or max_defect_fraction")


def defect_mask(renderer: OffscreenRenderer, defective, c2w: np.ndarray, image: np.ndarray, good_rgb: np.ndarray,
                good_ids: np.ndarray, min_sink: float = 0.004) -> np.ndarray:
    """bool [H, W]: the pixels a defect changed. For paint, holes and burrs, every pixel whose colour or
    surface changed. For a dent, whose smooth rim changes the shading by amounts no eye sees, the
    pixels whose surface changed or that show a triangle with a vertex sunk by more than ``min_sink``
    (object units)."""
    ids = renderer.render_surface_ids(defective, c2w)
    if DENT_DEPTH not in defective.point_data:
        return (image != good_rgb).any(axis=-1) | (ids != good_ids)
    sink = np.asarray(defective.point_data[DENT_DEPTH])
    sunk_cells = sink[defective.regular_faces].max(axis=1) > min_sink          # [M], by cell index
    surface_ids = np.asarray(defective.cell_data[SURFACE_ID])
    sunk = np.zeros(int(surface_ids.max()) + 1, dtype=bool)
    sunk[surface_ids] = sunk_cells
    return (ids != good_ids) | ((ids >= 0) & sunk[np.maximum(ids, 0)])


class CaptureDraws:
    """The realistic-capture draws of one class: which bench kind stands behind the train views (the
    test views get the other kinds; with ``fixed_bench``, one bench of that kind, twice the image's size,
    stands behind every view), and each image's own random stream, seeded by (seed, class, image name) so
    that the object, pose and defect draws of the class are those of the clean preset."""

    def __init__(self, settings: GeneratorSettings, class_name: str):
        self.settings, self.class_name = settings, class_name
        kind = int(class_rng(settings, f"{class_name}|capture").integers(len(BACKGROUND_KINDS)))
        self.reference_kind = BACKGROUND_KINDS[kind]
        self.test_kinds = tuple(k for k in BACKGROUND_KINDS if k != self.reference_kind)
        self.bench = None
        if settings.backgrounds and settings.fixed_bench:
            self.bench = background_texture(self.reference_kind, (2 * settings.height, 2 * settings.width),
                                            class_rng(settings, f"{class_name}|bench"))

    def turn_lights(self, renderer: OffscreenRenderer, name: str) -> None:
        """Turn the renderer's lights for a test image by its own draw, uniform in +-test_light_turn_deg
        (with it at 0 the renderer is left alone: the clean and realistic presets keep their bytes)."""
        limit = self.settings.test_light_turn_deg
        if limit:
            turn = class_rng(self.settings, f"{self.class_name}|light|{name}").uniform(-limit, limit)
            renderer.turn_lights(float(turn))

    def view(self, name: str, on_white: np.ndarray, alpha: np.ndarray, reference: bool) -> np.ndarray:
        """One image as the camera would record it.

        Args:
            name: the image's path in the class ("train/good/3.png"): seeds its draws.
            on_white: uint8 [H, W, 3] render over white; alpha: float [H, W] its coverage in [0, 1].
            reference: a train view (reference ranges and bench) or a test view.
        Returns: uint8 [H, W, 3].
        """
        s = self.settings
        if not s.realistic:
            return on_white
        rng = class_rng(s, f"{self.class_name}|capture|{name}")
        shape = on_white.shape[:2]
        image = on_white.astype(np.float64) / 255.0
        if s.backgrounds:
            background = self._bench(shape, rng, reference)
            if s.shadow:
                background = background * cast_shadow(alpha, rng, s.shadow)[..., None]
            image = composite(image, alpha, background)
        if s.lighting:
            image = apply_lighting(image, random_lighting(
                shape, rng, s.reference_gain if reference else s.test_gain,
                s.reference_temperature_shift if reference else s.test_temperature_shift,
                s.reference_shading if reference else s.test_shading))
        image = sensor_noise(image, rng, s.photons_at_white or None, s.read_noise_std)
        pixels = quantise(image)
        return jpeg_round_trip(pixels, s.jpeg_quality) if s.jpeg_quality else pixels

    def _bench(self, shape: tuple[int, int], rng: np.random.Generator, reference: bool) -> np.ndarray:
        """[H, W, 3] in [0, 1]: the bench behind one view, with its clutter: a crop of the class's fixed bench
        at a random offset, or a bench of its own (the reference kind, or one of the others for a test view)."""
        if self.bench is None:
            kind = self.reference_kind if reference else self.test_kinds[int(rng.integers(len(self.test_kinds)))]
            return random_background(kind, shape, rng, tuple(self.settings.clutter_shapes))
        h, w = shape
        y, x = int(rng.integers(self.bench.shape[0] - h + 1)), int(rng.integers(self.bench.shape[1] - w + 1))
        low, high = self.settings.clutter_shapes
        return add_clutter(self.bench[y:y + h, x:x + w], rng, int(rng.integers(low, high + 1)))


def apply_defect(mesh, texture: SolidTexture, defect: str, vertex: int, size: float, rng: np.random.Generator):
    """The object with one defect of the given type around a vertex (a new mesh)."""
    if defect == "Stains":
        return add_stain(mesh, vertex, size, rng)
    if defect == "Missing":
        return remove_part(mesh, vertex, size, rng)
    if defect == "Burrs":
        return add_burrs(mesh, vertex, size, rng, texture)
    if defect == "Dents":  # wider than the others: a shallow bowl a few pixels across would not show
        return add_dent(mesh, vertex, 1.5 * size, rng)
    raise ValueError(f"unknown defect type {defect!r}; defect types: {', '.join(DEFECT_TYPES + ('Dents',))}")


if __name__ == "__main__":
    # The child process of generated_cache.generate_in_child_process: OUT_DIR CLASS_NAME SETTINGS_JSON
    _, out, name, settings_json = sys.argv
    generate_class(Path(out), name, make_settings(**json.loads(settings_json)))
