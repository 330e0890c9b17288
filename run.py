"""Hydra entry point: compose conf/ and run the task (evaluate by default).

    python run.py                                   # built-in generated dataset, default class
    python run.py dataset=mad_sim class=01Gorilla dataset.root=/data/MAD-Sim
    python run.py -m class=01Ant,02Airplane sfm/feature=aliked,xfeat sfm/matcher=lightglue,lighterglue
"""

import sys

import hydra
from omegaconf import DictConfig

from splatpose.errors import MissingExtraError, require_extra
from splatpose.run_dirs import set_run_id

# The sweep launchers are Hydra plugins of the `sweeps` extra; without them Hydra would only say that
# the option is unknown.
LAUNCHER_PLUGINS = {"joblib": "hydra_plugins.hydra_joblib_launcher",
                    "submitit": "hydra_plugins.hydra_submitit_launcher",
                    "slurm_gpu": "hydra_plugins.hydra_submitit_launcher"}


def check_launcher(argv: list[str]) -> None:
    """Raise MissingExtraError when ``hydra/launcher=...`` names a launcher whose plugin is not installed."""
    for arg in argv:
        if arg.lstrip("+~").startswith("hydra/launcher="):
            choice = arg.split("=", 1)[1]
            for prefix, module in LAUNCHER_PLUGINS.items():
                if choice.startswith(prefix):
                    require_extra((module,), f"hydra/launcher={choice}")


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from splatpose.tasks import run_task  # imported late so that `--help` and `--cfg` stay fast

    return run_task(cfg)


if __name__ == "__main__":
    try:
        check_launcher(sys.argv[1:])
    except MissingExtraError as error:
        sys.exit(f"Error: {error}")
    set_run_id()  # before Hydra composes: conf/hydra/default.yaml names run folders with it
    main()
