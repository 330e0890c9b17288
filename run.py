"""Hydra entry point: compose conf/ and run the task (evaluate by default).

    python run.py                                   # built-in generated dataset, default class
    python run.py dataset=mad_sim class=01Gorilla dataset.root=/data/MAD-Sim
    python run.py -m class=01Ant,02Airplane sfm/feature=aliked,xfeat sfm/matcher=lightglue,lighterglue
"""

import hydra
from omegaconf import DictConfig

from splatpose.run_dirs import set_run_id


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from splatpose.tasks import run_task  # imported late so that `--help` and `--cfg` stay fast

    return run_task(cfg)


if __name__ == "__main__":
    set_run_id()  # before Hydra composes: conf/hydra/default.yaml names run folders with it
    main()
