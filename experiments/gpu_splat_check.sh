#!/usr/bin/env bash
# The splat GPU check on a bare GPU box (the lent H100): install the carried wheels of whatever is
# missing there, then run experiments/gpu_splat_check.py with the remaining arguments.
#   bash experiments/gpu_splat_check.sh <wheel folder> --data <root> --classes 01Ant ... --out <dir>
set -euo pipefail
wheels="$1"
shift
missing=()
# import name : wheel file prefix
for spec in gsplat:gsplat hydra:hydra_core omegaconf:omegaconf antlr4:antlr4_python3_runtime plyfile:plyfile \
            jaxtyping:jaxtyping wadler_lindig:wadler_lindig rich:rich markdown_it:markdown_it_py mdurl:mdurl \
            pygments:pygments ninja:ninja pytest:pytest pluggy:pluggy iniconfig:iniconfig; do
  if ! python -c "import ${spec%%:*}" 2>/dev/null; then
    for wheel in "$wheels/${spec##*:}"-*.whl; do  # a wheel not carried is skipped
      if [[ -e "$wheel" ]]; then missing+=("$wheel"); fi
    done
  fi
done
if ((${#missing[@]})); then
  python -m pip install --quiet --no-deps --no-index "${missing[@]}"
fi
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
PYTHONPATH=. python experiments/gpu_splat_check.py "$@"
