"""The one base class of the errors a user makes and can fix (a setting, a file, a folder).

``run.py`` prints such an error as its message alone, one paragraph that names the setting or file
and the fix, and exits with status 1; any other exception is a bug and keeps its traceback.
HYDRA_FULL_ERROR=1 shows the traceback of a user error too. Light: imported before torch.
"""


class UserError(ValueError):
    """A setting, file or folder that cannot be used as it is; the message names it and the fix."""


# The optional dependencies (pyproject.toml's extras): top-level module -> (extra, pip package).
EXTRAS = {
    "pyvista": ("datasets", "pyvista"), "vtk": ("datasets", "vtk"), "mitsuba": ("datasets", "mitsuba"),
    "trimesh": ("datasets", "trimesh"), "shapely": ("datasets", "shapely"),
    "mapbox_earcut": ("datasets", "mapbox-earcut"), "wandb": ("wandb", "wandb"),
    "fastapi": ("serve", "fastapi"), "uvicorn": ("serve", "uvicorn"), "multipart": ("serve", "python-multipart"),
    "hydra_plugins.hydra_joblib_launcher": ("sweeps", "hydra-joblib-launcher"),
    "hydra_plugins.hydra_submitit_launcher": ("sweeps", "hydra-submitit-launcher"),
}


class MissingExtraError(UserError):
    """An optional dependency is not installed; the message names the extra that installs it."""


def require_extra(modules: list[str] | tuple[str, ...], needed_for: str, instead: str = "") -> None:
    """Raise :class:`MissingExtraError` (one line) if any of ``modules`` cannot be found; imports nothing.

    ``needed_for`` names the setting or command; ``instead`` an alternative that needs no extra.
    """
    from importlib.util import find_spec

    for module in modules:
        try:
            found = find_spec(module) is not None
        except (ImportError, ValueError):  # a missing parent package (hydra_plugins), a blocked module
            found = False
        if not found:
            extra, package = EXTRAS[module]
            raise MissingExtraError(f"{needed_for} needs the optional package {package}, which is not installed; "
                                    f"install it with: pip install 'splatpose[{extra}]' (or pip install {package})"
                                    + (f", or use {instead}" if instead else ""))
