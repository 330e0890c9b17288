"""What run.py runs: builds the loggers, dispatches the task, and always cleans up.

Like lightning-hydra-template's task wrapper: the loggers are always finished and the output folder
always printed, even when the job crashes. In a multirun a failing job records its error in
``failure.json`` and returns, so the rest of the sweep goes on; a single run exits non-zero: a
user error (:class:`splatpose.errors.UserError`: a setting, file or folder to fix) as one message
without a traceback (HYDRA_FULL_ERROR=1 shows it), any other exception with its traceback.

Everything that can be checked before work is checked first (:func:`preflight`): the config values
(``splatpose.config_checks``) and, for datasets on disk, every image decoded and every mask present;
a mistake there stops the run in its first seconds. A run holds a lock on its folder while it lives
(``splatpose.run_dirs``), so no two live runs write into one folder.

In a multirun a job also skips itself when its folder already holds the results of the same config
(a rerun of the sweep), and under the joblib launcher pins its worker process to one GPU
(``splatpose.sweeps``).
"""

from __future__ import annotations

import logging
import os
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from splatpose.config_checks import check_run_config
from splatpose.console import quiet_console
from splatpose.errors import UserError, require_extra
from splatpose.run_dirs import claim_run_dir
from splatpose.atomic_files import write_json_atomic
from splatpose.sweeps.gpu_leases import pin_gpu_for_job
from splatpose.sweeps.resume import clear_previous_outcome, finished_results

log = logging.getLogger(__name__)


def run_task(cfg: DictConfig) -> float | None:
    """Run ``cfg.task`` and return the pixel AUROC (what a Hydra sweeper would optimise)."""
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    finished = finished_sweep_job(cfg, out_dir)
    if finished is not None:
        return finished["metrics"].get("pixel_auroc")
    quiet_console(bool(cfg.get("verbose_libraries", False)))
    loggers: list = []
    status = "failed"
    try:
        claim_run_dir(out_dir)
        clear_previous_outcome(out_dir)
        OmegaConf.save(cfg, out_dir / "config_resolved.yaml", resolve=True)
        data = preflight(cfg)
        if _in_multirun():  # before anything touches CUDA in this process
            hydra_cfg = HydraConfig.get()
            pin_gpu_for_job(cfg.get("sweep"), hydra_cfg.launcher.get("_target_"), hydra_cfg.job.num, out_dir)
        loggers = build_loggers(cfg)
        if cfg.task == "watch":
            from splatpose.watch import watch_task
            watch_task(cfg)
            status = "ok"
            return None
        if cfg.task == "serve":
            from splatpose.service import serve_task
            serve_task(cfg)
            status = "ok"
            return None
        if cfg.task == "detect":
            from splatpose.detect.detector import detect_task
            result = detect_task(cfg)
            status = "ok"
            return None
        from splatpose.pipeline import format_metrics, run_pipeline
        results = run_pipeline(cfg, loggers, data=data)
        status = "ok"
        print(f"\nResults for {results['dataset']}/{results['class']}:\n{format_metrics(results['metrics'])}")
        if (out_dir / "report.html").is_file():
            print(f"Report: {(out_dir / 'report.html').resolve()}")
        return results["metrics"].get("pixel_auroc")
    except Exception as error:
        cause = user_error_in(error)
        hint = "" if cause is None else " (traceback in failure.json)" if _in_multirun() else \
            " (traceback in failure.json; HYDRA_FULL_ERROR=1 prints it)"
        log.error("Run failed: %s%s", error, hint)
        write_json_atomic(out_dir / "failure.json", {
            "status": "failed", "error": f"{type(error).__name__}: {error}",
            "traceback": traceback.format_exc(), "class": str(cfg.get("class"))})
        if _in_multirun():
            return None
        if cause is not None and not os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise SystemExit(1) from None  # the message above is the whole story; Hydra prints no traceback
        raise
    finally:
        finish_loggers(loggers, status)
        print(f"Outputs: {out_dir.resolve()}")


def preflight(cfg: DictConfig):
    """Check what can be checked before work: config values, then (task=evaluate, datasets on disk)
    the class folder, with every image decoded and every mask present. Returns the loaded class
    (``ClassData``) for the pipeline, or None when the data stage must make it (dataset=synthetic
    generates its images) or the task needs none.

    Raises:
        UserError: naming the setting or file and the fix.
    """
    check_run_config(cfg)
    if cfg.task == "evaluate" and cfg.dataset.get("name") == "synthetic":
        require_extra(("pyvista", "vtk"), "dataset=synthetic (the generated dataset)")
    if cfg.task != "evaluate" or cfg.dataset.get("name") == "synthetic":
        return None
    from splatpose.data.resolve import resolve_dataset  # light: numpy and Pillow only

    return resolve_dataset(cfg.dataset, str(cfg["class"]))


def user_error_in(error: BaseException) -> UserError | None:
    """The :class:`UserError` that ``error`` is or was raised from (a stage wraps what failed in it)."""
    while error is not None:
        if isinstance(error, UserError):
            return error
        error = error.__cause__
    return None


def finished_sweep_job(cfg: DictConfig, out_dir: Path) -> dict | None:
    """In a multirun, the results of this job from an earlier run of the same sweep (then skip it)."""
    if not _in_multirun() or not (cfg.get("sweep") or {}).get("skip_finished", True):
        return None
    finished = finished_results(out_dir, cfg)
    if finished is not None:
        log.info("Skipping: %s already holds the results of this config (sweep.skip_finished=false reruns)",
                 out_dir)
        print(f"Skipped (finished earlier): {out_dir.resolve()}")
    return finished


def build_loggers(cfg: DictConfig) -> list:
    """Instantiate the named loggers of ``cfg.logger`` (an empty dict means none)."""
    for node in (cfg.get("logger") or {}).values():
        if node is not None and str(node.get("_target_", "")).endswith(".WandbLogger"):
            require_extra(("wandb",), "logger=wandb", instead="logger=csv or logger=none")
    loggers = [hydra.utils.instantiate(node) for node in (cfg.get("logger") or {}).values()
               if node is not None and "_target_" in node]
    for logger in loggers:
        # Lightning's WandbLogger always hands wandb.init ``anonymous=None``, and wandb warns on every run
        # that the setting has no effect; nothing reads it.
        getattr(logger, "_wandb_init", {}).pop("anonymous", None)
    return loggers


def finish_loggers(loggers: list, status: str) -> None:
    for logger in loggers:
        try:
            logger.finalize("success" if status == "ok" else "failed")
        except Exception as error:  # a logger that fails to close must not hide the run's result
            log.warning("Could not finalize %s: %s", type(logger).__name__, error)
    if any(type(lg).__name__ == "WandbLogger" for lg in loggers):
        import wandb
        wandb.finish(exit_code=0 if status == "ok" else 1)


def _in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
