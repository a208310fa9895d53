#!/usr/bin/env bash
# The GPU check of issue 13 in one call (< 8 minutes on one H200): the CUDA tests, then the
# real-shape benchmark (bench/bench_real_shape.py) on ViT-B/32 x 20 experts (every method, the
# alpha x beta grid, FusionBench 0.2.33 side by side, the merge stage at N = 8, 20, 50), then
# ViT-L/14 x 20 for a subset if time is left. Tables go to bench/real_shape_<device>.md and,
# when $OUT is set, to $OUT too (with the logs).
#
#   bench/gpu.sh                       # on a GPU machine
#   bench/gpu.sh --device cpu --quick  # exercise the script anywhere (2 blocks, N = 4)
#
# Needs: python with torch, h5py, safetensors, filelock, tqdm, pyyaml ($PYTHON, else .venv/bin/python,
# else python3). Without network: open_clip_torch, ftfy and wcwidth are installed from the wheels
# in bench/peers/wheels when missing, FusionBench's files are read from bench/peers/ (carry
# bench/peers; without it the peer is skipped with a message). Fill bench/peers with:
#   pip install --no-deps --target bench/peers/fusion_bench_0.2.33 fusion-bench==0.2.33
#   pip download --no-deps --only-binary=:all: -d bench/peers/wheels open_clip_torch==3.3.0 ftfy wcwidth
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE=cuda QUICK=() BUDGET=${GPU_SH_BUDGET:-}
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=$2; shift 2 ;;
    --quick) QUICK=(--quick); shift ;;
    *) echo "usage: bench/gpu.sh [--device cuda|cpu] [--quick]" >&2; exit 2 ;;
  esac
done
# seconds for the whole script: 450 on a GPU (one call of under 8 minutes), more on a CPU
[ -z "$BUDGET" ] && { [ "$DEVICE" = cpu ] && BUDGET=1800 || BUDGET=450; }
START=$(date +%s)
left() { echo $((BUDGET - ($(date +%s) - START))); }

PY=${PYTHON:-}
[ -z "$PY" ] && { [ -x .venv/bin/python ] && PY=.venv/bin/python || PY=python3; }
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONUNBUFFERED=1
"$PY" -c "import torch, h5py, safetensors" || { echo "gpu.sh: $PY lacks torch/h5py/safetensors; set PYTHON" >&2; exit 1; }
if ! "$PY" -c "import open_clip" 2>/dev/null; then
  if ls bench/peers/wheels/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/gpu_sh_site bench/peers/wheels/*.whl \
      && export PYTHONPATH="$PYTHONPATH:/tmp/gpu_sh_site"
  fi
  "$PY" -c "import open_clip" || { echo "gpu.sh: open_clip cannot be imported (wheels in bench/peers/wheels?)" >&2; exit 1; }
fi
PEER=()
[ -d bench/peers/fusion_bench_0.2.33/fusion_bench ] || { echo "gpu.sh: bench/peers/fusion_bench_0.2.33 missing: FusionBench is skipped"; PEER=(--no-peer); }

LOGDIR=${OUT:-bench}
SUFFIX=$DEVICE${QUICK:+_quick}
TABLE=bench/real_shape_$SUFFIX.md
LOG=$LOGDIR/gpu_sh_$SUFFIX.log
: >"$LOG"
"$PY" - <<'EOF' 2>&1 | tee -a "$LOG"
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
EOF

echo "== CUDA tests ($(left) s left)" | tee -a "$LOG"
timeout $(( $(left) > 120 ? 120 : $(left) )) "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py \
  "tests/test_hogsvd.py::test_cuda_matches_cpu" "tests/test_evaldata.py::test_prepared_inputs_equal_the_dataset_path_on_cuda" \
  "tests/test_tsv_truncated.py::test_tsv_m_ritz_on_cuda_matches_the_float64_reference" \
  2>&1 | tee -a "$LOG"
TESTS_RC=${PIPESTATUS[0]}

{
  echo "# Real-shape benchmark, bench/gpu.sh --device $DEVICE ${QUICK[*]}"
  echo
  echo "Made by \`bench/gpu.sh --device $DEVICE ${QUICK[*]}\` (CUDA tests exit status $TESTS_RC; log: gpu_sh_$SUFFIX.log)."
  echo
} >"$TABLE"

bench() {  # bench <seconds> <args...>: stops the run at its share of the budget (the table is still written)
  local secs=$1; shift
  [ "$secs" -lt 30 ] && { echo "gpu.sh: no time left for: $*" | tee -a "$LOG" "$TABLE"; return; }
  echo "== bench_real_shape.py $* (${secs} s)" | tee -a "$LOG"
  timeout -s TERM "$secs" "$PY" bench/bench_real_shape.py --device "$DEVICE" "${QUICK[@]}" "${PEER[@]}" \
    --mem-cap-gib "$CAP" --out "$TABLE" "$@" 2>&1 | tee -a "$LOG" >/dev/null
}
if [ "$DEVICE" = cpu ]; then CAP=8; else CAP=0; fi  # the GPU machine: 128 GiB of RAM, no cap
if [ ${#QUICK[@]} -gt 0 ]; then
  bench "$(left)" --arch ViT-B-32 --n 4 --stage-n 4,8
else
  bench $(( $(left) - 150 )) --arch ViT-B-32 --n 20 --stage-n 8,20,50 \
    --methods ta_sb,tsv_m,ta,ties,consensus,iso_c,iso_cts,ta_lines,hogsvd,grid  # the issue's GPU targets first
  bench $(( $(left) - 10 )) --arch ViT-L-14 --n 20 --methods ta,ties,tsv_m,iso_c,ta_sb,grid --stage-n 20 --stage-distinct 5
fi
cat "$TABLE"
[ -n "${OUT:-}" ] && cp "$TABLE" "$OUT/"
echo "gpu.sh: done in $(( $(date +%s) - START )) s; table $TABLE" | tee -a "$LOG"
exit "$TESTS_RC"
