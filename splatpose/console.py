"""What a run prints: stages, progress bars, results and the warnings a user can act on; not the
libraries' chatter.

Three sources of noise, each silenced where it starts:

- COLMAP (glog, inside pycolmap) logs every reconstruction step at INFO (`I1205 01:13:39.218 ...`
  lines, 100+ per run). Its minimum level is raised to WARNING unless ``verbose_libraries=true``.
- Lightning puts its own console handler on the ``lightning`` logger and also lets its records
  propagate to the root logger, which Hydra has given a handler: every line printed twice. Its own
  handler is removed, so its lines come once, through Hydra (and land in the run's log file).
- Lightning advertises its cloud products at INFO ("💡 Tip: ... litlogger / litmodels") and lists the
  accelerators it did not find ("TPU available: False ...", "HPU available ...") and the validation
  batches it will use, for every Trainer (twice a run); there is no setting for that, so a logging
  filter drops those records ("GPU available: ..., used: ..." stays: it says where the work ran).

- matplotlib, building its font cache on a machine's first report, warns for each mathtext font that is not
  installed ("findfont: Font family ['cmti10'] not found", about 20 lines); the report's figures use none of them.
  Its font manager logs at ERROR and above unless ``verbose_libraries=true``.

Plus deprecation warnings raised inside the libraries (a user cannot fix them), e.g. torch's
``LeafSpec`` deprecation triggered by Lightning's use of ``torch.utils._pytree``.
"""

from __future__ import annotations

import logging
import os
import warnings

# glog reads its flags when pycolmap's library loads: the environment covers a pycolmap imported later
# (and worker processes), the runtime flag one that is already loaded.
GLOG_WARNING = 1
LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric")
LIGHTNING_RANK_ZERO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                               "lightning_utilities.core.rank_zero")
UNACTIONABLE_WARNINGS = (
    # torch 2.14 deprecates LeafSpec; Lightning (not this project) still uses it.
    (r".*isinstance\(treespec, LeafSpec\)` is deprecated.*", Warning),
)


class DropLightningChatter(logging.Filter):
    """Drops Lightning's records a user cannot act on: product tips, absent accelerators, batch limits."""

    PREFIXES = ("💡 Tip", "TPU available", "HPU available", "`Trainer(limit_val_batches")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(self.PREFIXES)


def quiet_console(verbose_libraries: bool = False) -> None:
    """Silence the libraries' chatter (see the module docstring); idempotent.

    Args:
        verbose_libraries: the config's ``verbose_libraries``; true keeps COLMAP's INFO lines (for
            debugging a reconstruction) and matplotlib's font warnings. Lightning's duplicates and tips go
            either way.
    """
    quiet_colmap(verbose_libraries)
    logging.getLogger("matplotlib.font_manager").setLevel(logging.NOTSET if verbose_libraries else logging.ERROR)
    log_lightning_once()
    for message, category in UNACTIONABLE_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


def quiet_colmap(verbose: bool) -> None:
    """COLMAP's glog at INFO (``verbose``) or WARNING and above."""
    level = 0 if verbose else GLOG_WARNING
    os.environ["GLOG_minloglevel"] = str(level)
    try:
        import pycolmap
    except ImportError:  # pycolmap is a dependency; without it there is nothing to quiet
        return
    pycolmap.logging.minloglevel = level
    pycolmap.logging.verbose_level = 0


def log_lightning_once() -> None:
    """Lightning's records through the root logger only (when the root has a handler, as under Hydra),
    and without its chatter (``DropLightningChatter``)."""
    import lightning  # noqa: F401  (its import adds the handlers removed here)

    root_has_handler = bool(logging.getLogger().handlers)
    for name in LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        if root_has_handler:
            for handler in list(logger.handlers):
                if type(handler) is logging.StreamHandler:
                    logger.removeHandler(handler)
            logger.propagate = True
    for name in LIGHTNING_RANK_ZERO_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropLightningChatter) for f in logger.filters):
            logger.addFilter(DropLightningChatter())
