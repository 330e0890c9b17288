"""Sweeps over classes, matchers and seeds: GPU pinning, skipping finished jobs, result tables.

- :mod:`.gpu_leases`: one GPU per worker process under Hydra's joblib launcher
- :mod:`.resume`: a rerun of a sweep skips the jobs that finished with the same config
- :mod:`.sweep_jobs`, :mod:`.sweep_table`, :mod:`.aggregate`: the paper-style table of a sweep
  folder (``python -m splatpose.sweeps.aggregate outputs/multirun/<time>``)

Nothing here imports torch: these run before a job's process may touch CUDA.
"""
