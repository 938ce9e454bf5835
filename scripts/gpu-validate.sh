#!/usr/bin/env bash
# gpu-validate.sh -- the whole GPU validation of contsup_fast in one call (issue 10, section 2).
#
#   scripts/gpu-validate.sh             # on the lent GPU machine (one H200): about 9 minutes
#   scripts/gpu-validate.sh --dry-run   # the same plumbing on CPU at toy sizes (CI runs it)
#
# Phases (each under `timeout` with its own budget; later budgets shrink to what is left of
# the TOTAL, so the run ends in time; a phase that overruns is stopped with SIGINT and reported):
#   0. compile-report  first, in the background while 1-5 run: python -m
#                contsup_fast.kernels.compile_report for sm_90 (registers, spills, shared memory,
#                occupancy, one-wave plans of the Triton kernels at the real launches of ResNet-32
#                and ResNet-50 R1E steps, bf16/fp32, channels_last, training), so the first GPU
#                run starts from known resource figures (JSON in bench/compile_report/)
#   1. build     the extension in place for sm_90 (setup.py build_ext --inplace, no network),
#                in parallel with `data`: unpack the CIFAR-10 pack carried in .gpuval/cifar10
#   2. check     python -m contsup_fast.check (every backend vs the float64 reference), then
#      parity    python -m bench.parity --against-torch: LocalSequential training steps (ResNet-32
#                and ResNet-110, every context kind) on each fused backend and on the torch
#                backend, in fp32 (TF32 off) and bf16, each against the torch backend in float64
#                (JSON bench/parity_backends_cuda.json; no authors' code needed), while 3 runs
#   3. accuracy  in the background, the real training CLI (python -m contsup_fast.train) on
#                CIFAR-10 for ResNet-32: E2E (K=1), K=16 R0, E, R1, R1E (ce), R1E (supcon); same
#                seed and recipe, --amp bf16 --channels-last, the same EPOCHS for every row,
#                all rows at once; about 4 minutes
#   4. gpu-tests pytest -m cuda in parallel processes (pytest-xdist), while 3 runs
#   5. memcheck, racecheck   compute-sanitizer over scripts/gpuval_sanitize_step.py (every
#                native CUDA op directly, and memcheck also over LocalSequential training steps
#                through them; contiguous and channels_last; fp32/bf16/fp16), while 3 runs
#   6. train-step  python -m bench.train_step: resnet32 and resnet110, K=16, R0 and R1E, every
#                backend, against E2E eager, torch.compile and checkpointing (GPU to itself;
#                one invocation per model, each JSON and plot in bench/train_step-<model>/)
#   7. reference   the same configurations through the reference ContSup code
#                (github.com/Tab-ct/ContSup, carried in .gpuval/ContSup, never committed) on the
#                same inputs in fp32: python -m bench.reference_contsup, with the ratio to 6
#   8. transformers  python -m bench.train_step for vit_b_16 and swin_t (224x224, batch 64, bf16):
#                K=4 R0 and R1E against E2E eager and checkpointing, true peak (mem_vs_e2e) and
#                saved peak (saved_vs_e2e) against E2E; one invocation per model, JSON and plot in
#                bench/train_step-<model>/
#   9. kernels   python -m bench.kernels at batch 1024 in bf16 (two invocations: residual and
#                image_context, then image_tail, head_pool and gap; each JSON in bench/kernels-<op>/)
# Then a summary table (last lines of the output). Results: one folder packed as one tarball;
# under $OUT only gpuval-results.tar.gz and summary.txt (the device tool returns at most 8 files).
#
# ---------------------------------------------------------------------------------------------
# HOW TO RUN IT THROUGH THE DEVICE TOOL (a session whose task has a GPU; `status` first)
#   Here, in the root of the checkout the session was started in (the one the tool sends):
#     1. call the `fetch` tool with github:Tab-ct/ContSup (gives /work/.mirror/Tab-ct+ContSup/repo)
#     2. bash scripts/gpuval-prepare.sh /work/.mirror/Tab-ct+ContSup/repo
#        (copies ../shared/data/cifar10 and the reference's networks_dev/ into the git-ignored
#        .gpuval/, and checks that tree + .gpuval stay under the 64 MiB the tool carries)
#     3. bash scripts/gpu-validate.sh --dry-run   (optional: the plumbing on CPU, about a minute)
#   Then one device `run`:
#     command:   bash scripts/gpu-validate.sh
#     carry:     [".gpuval"]
#     timeout_s: 600     (the script plans for 540 s; --total S or GPUVAL_TOTAL=S changes that)
#   Results land here under the reply's files_at: gpuval-results.tar.gz and summary.txt; the
#   summary is also the end of output_tail. Give the machine back (give_back) unless you rerun.
# HOW TO COMMIT THE RESULTS (later session)
#     mkdir -p /tmp/gpuval && tar -xzf <files_at>/gpuval-results.tar.gz -C /tmp/gpuval
#     cp /tmp/gpuval/gpuval/bench/*.json bench/results/
#     for m in resnet32 resnet110 vit_b_16 swin_t; do for f in /tmp/gpuval/gpuval/bench/train_step-$m/train_step_cuda.*; do
#       cp $f bench/results/train_step_cuda_$m.${f##*.}; done; done
#     for d in /tmp/gpuval/gpuval/bench/kernels-*; do cp $d/kernels_cuda.json bench/results/kernels_cuda_${d##*-}.json; done
#     cp /tmp/gpuval/gpuval/summary.txt bench/results/gpuval_summary_h200.txt
#     git add bench/results && git commit -m "GPU validation on one H200: <date>, <summary>"
#   then README: performance table (speed_vs_e2e, vs reference, mem_vs_e2e), accuracy table
#   (protocol, JPEG-lossy copy, final accuracy per row, peak memory, s/epoch). If a row did not
#   finish its epochs, resize EPOCHS (env GPUVAL_EPOCHS) from s_per_epoch in the summary.
# ---------------------------------------------------------------------------------------------
# Options: --dry-run, --out DIR (default $OUT, else ./gpuval-out), --epochs N (default
# $GPUVAL_EPOCHS or 4), --total SECONDS (default $GPUVAL_TOTAL or 540; dry run 500).
# Dry run: toy CIFAR-layout data, ResNet-20 and K=4 for two rows (E2E, R1E supcon), CPU.
# Environment: PYTHON (default python3), CUDA_HOME (default /usr/local/cuda), GPUVAL_CARRY
# (default ./.gpuval: the carried folder holding cifar10/ and ContSup/).
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
DRY=0
OUTDIR=${OUT:-}
EPOCHS=${GPUVAL_EPOCHS:-4}
TOTAL=${GPUVAL_TOTAL:-}
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) OUTDIR=$2; shift ;;
    --epochs) EPOCHS=$2; shift ;;
    --total) TOTAL=$2; shift ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d'; exit 0 ;;
    *) echo "gpu-validate.sh: unknown argument '$1' (allowed: --dry-run, --out DIR, --epochs N, --total S)" >&2; exit 2 ;;
  esac
  shift
done
case "$EPOCHS" in ''|*[!0-9]*|0) echo "gpu-validate.sh: --epochs must be a positive integer, got '$EPOCHS'" >&2; exit 2 ;; esac
[ -n "$TOTAL" ] || TOTAL=$([ $DRY = 1 ] && echo 500 || echo 540)
[ -n "$OUTDIR" ] || OUTDIR=$ROOT/gpuval-out
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
# dry run: several processes share a small CPU; one intra-op thread each avoids their contention
[ $DRY = 1 ] && export OMP_NUM_THREADS=1
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpuval.XXXXXX")
RES=$WORK/gpuval
mkdir -p "$OUTDIR" "$RES/logs" "$RES/bench" "$RES/accuracy"
PHASES=$RES/phases.tsv
: > "$PHASES"
T0=$(date +%s)
END=$((T0 + TOTAL))
DATA=$WORK/cifar10
CARRY=${GPUVAL_CARRY:-$ROOT/.gpuval}  # the carried folder: cifar10/ pack, ContSup/ reference
# nominal budgets in seconds (phases after the accuracy runs get what is left of TOTAL)
if [ $DRY = 1 ]; then
  B_CR=120 B_DATA=30 B_BUILD=0 B_ACC=150 B_CHECK=120 B_PAR=120 B_TESTS=120 B_MEM=0 B_RACE=0 B_SAN=120 B_STEP=60 B_REF=40 B_TFM=90 B_KER=60
else
  B_CR=200 B_DATA=90 B_BUILD=200 B_ACC=230 B_CHECK=90 B_PAR=120 B_TESTS=220 B_MEM=140 B_RACE=100 B_SAN=0 B_STEP=95 B_REF=40 B_TFM=60 B_KER=60
fi
B_PACK=10
POST=$((B_STEP + B_REF + B_TFM + B_KER + B_PACK))  # kept free after the accuracy phase
export DRY PY DATA CARRY RES ROWS EPOCHS

now() { echo $(( $(date +%s) - T0 )); }
say() { echo "[t+$(now)s] $*"; }

# fit NOMINAL RESERVE: the nominal budget, cut to what is left before END minus RESERVE
fit() {
  local left=$(( END - $(date +%s) - $2 ))
  [ "$left" -lt "$1" ] && echo "$left" || echo "$1"
}

record() {  # record NAME STATUS SECONDS BUDGET
  printf '%s\t%s\t%s\t%s\tlogs/%s.log\n' "$1" "$2" "$3" "$4" "$1" >> "$PHASES"
  say "phase $1: $2 (${3}s of ${4}s)"
}

skip() {  # skip NAME REASON
  echo "skipped: $2" > "$RES/logs/$1.log"
  record "$1" skipped 0 0
}

# phase NAME BUDGET CMD...: run CMD under timeout, log to logs/NAME.log, record its status
phase() {
  local name=$1 budget=$2; shift 2
  if [ "$budget" -lt 5 ]; then skip "$name" "out of time (budget ${budget}s)"; return 1; fi
  local start rc status
  start=$(date +%s)
  say "phase $name: start (budget ${budget}s)"
  if declare -F "$1" >/dev/null; then  # a function of this script: run it in a child bash
    timeout --signal=INT --kill-after=15 "$budget" bash -c '"$@"' _ "$@" > "$RES/logs/$name.log" 2>&1
  else
    timeout --signal=INT --kill-after=15 "$budget" "$@" > "$RES/logs/$name.log" 2>&1
  fi
  rc=$?
  case $rc in
    0) status=ok ;;
    124|130|137) status=timeout ;;
    *) status="failed(rc=$rc)" ;;
  esac
  record "$name" "$status" $(( $(date +%s) - start )) "$budget"
  return $rc
}

# ------------------------------------------------------------------------------ environment
{
  echo "gpu-validate.sh $([ $DRY = 1 ] && echo --dry-run) at $(date -u +%FT%TZ) on $(hostname), $(nproc) cores"
  if git -C "$ROOT" rev-parse HEAD >/dev/null 2>&1; then
    echo "commit: $(git -C "$ROOT" rev-parse HEAD), $(git -C "$ROOT" status --porcelain | wc -l) changed files"
  else
    echo "commit (recorded by gpuval-prepare.sh): $(cat "$CARRY/commit.txt" 2>/dev/null || echo unknown)"
  fi
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
  command -v nvcc >/dev/null && nvcc --version | tail -1
  command -v compute-sanitizer >/dev/null && compute-sanitizer --version | tail -1
  "$PY" - <<'PY'
import sys, torch
try:
    import triton
    tv = triton.__version__
except Exception as exc:
    tv = f"not importable ({exc})"
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), triton {tv}, "
      f"GPU: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}")
PY
  echo "epochs per accuracy row: $EPOCHS; total budget: ${TOTAL}s"
} > "$RES/logs/env.log" 2>&1
cat "$RES/logs/env.log"
if [ $DRY = 0 ] && grep -q "GPU: none" "$RES/logs/env.log"; then
  echo "gpu-validate.sh: torch sees no CUDA GPU here; run with --dry-run on a machine without one" >&2
  exit 2
fi
# contsup_fast.kernels is a link to kernels/ in a development checkout (git-ignored: it does not travel)
[ -e contsup_fast/kernels ] || ln -s ../kernels contsup_fast/kernels

# ------------------------------------------------------------------------------ 0. compile report
if [ $DRY = 1 ]; then  # the plumbing at a toy size: one eval step of ResNet-32, batch 8
  CR_ARGS=(--configs resnet32 --dtypes bf16 --layouts nhwc --modes eval --batch 8)
else
  CR_ARGS=(--configs resnet32 resnet50 --dtypes bf16 fp32 --layouts nhwc --modes train)
fi
# in the background from here to the phases with the GPU to itself (it needs no GPU)
# (without TRITON_INTERPRET, which a CPU-only caller such as the test suite may have set: the
# report compiles for the GPU and refuses to run in the interpreter)
(phase compile-report "$(fit $B_CR $POST)" env -u TRITON_INTERPRET "$PY" -m contsup_fast.kernels.compile_report \
   --arch sm_90 "${CR_ARGS[@]}" --out "$RES/bench/compile_report") &
CR_PID=$!

# ------------------------------------------------------------------------------ 1. build + data
build() {
  export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=${MAX_JOBS:-$(nproc)}
  "$PY" setup.py build_ext --inplace || return 1
  "$PY" - <<'PY'
from contsup_fast.check import extension_info
info = extension_info()
print(f"extension: loaded={info['loaded']} with_cuda={info.get('with_cuda')} archs={info.get('archs')}")
raise SystemExit(0 if info["loaded"] and info.get("with_cuda") and "sm_90" in (info.get("archs") or []) else 1)
PY
}
data() {
  if [ $DRY = 1 ]; then
    "$PY" scripts/gpuval_tools.py toy-data --out "$DATA" --per-batch 16
  elif [ -f "$CARRY/cifar10/unpack.py" ]; then
    "$PY" "$CARRY/cifar10/unpack.py" --out "$DATA"
  else
    echo "no CIFAR-10 pack at $CARRY/cifar10 (run scripts/gpuval-prepare.sh and carry .gpuval)"; return 1
  fi
}
export -f build data
phase data "$(fit $B_DATA $((POST + B_ACC)))" data &
DATA_PID=$!
if [ $DRY = 1 ]; then
  skip build "no GPU (dry run: no nvcc build; the extension already here, if any, is used)"
else
  phase build "$(fit $B_BUILD $((POST + B_ACC)))" build
fi
wait $DATA_PID
DATA_OK=$?

# ------------------------------------------------------------------------------ 3. accuracy (background)
export ROWS="e2e_K1:1:R0:ce R0_K16:16:R0:ce E_K16:16:E:ce R1_K16:16:R1:ce R1E_ce_K16:16:R1E:ce R1E_supcon_K16:16:R1E:supcon"
accuracy() {
  local budget=$1 pids=() rc=0 row name K ctx loss model
  local rows=$ROWS
  [ $DRY = 1 ] && rows="e2e_K1:1:R0:ce R1E_supcon_K16:16:R1E:supcon"
  for row in $rows; do
    IFS=: read -r name K ctx loss <<< "$row"
    model=resnet32
    local extra=(--batch-size 1024 --amp bf16 --channels-last)
    if [ $DRY = 1 ]; then
      model=resnet20; [ "$K" = 16 ] && K=4
      extra=(--batch-size 16 --amp bf16 --channels-last --threads 1 --device cpu)
    fi
    timeout --signal=INT --kill-after=15 "$budget" "$PY" -m contsup_fast.train --model $model --K "$K" \
      --context "$ctx" --loss "$loss" --epochs "$EPOCHS" --seed 0 --data-dir "$DATA" \
      --out "$RES/accuracy/$name" --no-progress --eval-every 1 --log-every 50 "${extra[@]}" \
      > "$RES/logs/acc-$name.log" 2>&1 &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p" || rc=$?; done
  return $rc
}
export -f accuracy
ACC_BUDGET=$(fit $B_ACC $POST)
ALONG=$((END - $(date +%s) - ACC_BUDGET))  # the phases alongside end with the accuracy runs
if [ $DATA_OK = 0 ]; then
  # each row stops itself (SIGINT: checkpoint, log) at ACC_BUDGET; the phase waits 20 s more
  phase accuracy $((ACC_BUDGET + 20)) accuracy "$ACC_BUDGET" &
  ACC_PID=$!
else
  skip accuracy "no data (see logs/data.log)"
  ACC_PID=
fi

# ------------------------------------------------------------------------------ 2, 4, 5 alongside
gpu_tests() {
  local par=()
  local what=(tests/)
  [ $DRY = 1 ] && what=(tests/test_cuda_graphs.py)  # dry run: the invocation, not every import
  "$PY" -c "import xdist" 2>/dev/null && par=(-n 4)
  "$PY" -m pytest -q -m cuda -p no:cacheprovider "${par[@]}" "${what[@]}"
}
sanitize() {
  local tool=$1 cs
  cs=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
  shift
  "$cs" --version | tail -1
  "$cs" --tool "$tool" --error-exitcode 3 --print-limit 30 "$PY" scripts/gpuval_sanitize_step.py "$@"
}
export -f gpu_tests sanitize
if [ $DRY = 1 ]; then
  PAR_ARGS=(--device cpu --dtypes fp32 --only "resnet32 K=4 R1E" --batch 2)
else
  PAR_ARGS=(--device cuda --dtypes fp32 bf16 --batch 32)
fi
if [ $DRY = 1 ]; then
  (phase check "$(fit $B_CHECK $ALONG)" "$PY" -m contsup_fast.check --no-timing
   phase parity "$(fit $B_PAR $ALONG)" "$PY" -m bench.parity --against-torch "${PAR_ARGS[@]}" --out "$RES/bench") &
  P_CHECK=$!
  (phase gpu-tests "$(fit $B_TESTS $ALONG)" gpu_tests) &
  P_TESTS=$!
  (skip memcheck "no GPU (compute-sanitizer needs one)"; skip racecheck "no GPU (compute-sanitizer needs one)"
   phase sanitize-step-cpu "$(fit $B_SAN $ALONG)" "$PY" scripts/gpuval_sanitize_step.py --device cpu --dtypes fp32) &
  P_SAN=$!
else
  (phase check "$(fit $B_CHECK $ALONG)" "$PY" -m contsup_fast.check
   phase parity "$(fit $B_PAR $ALONG)" "$PY" -m bench.parity --against-torch "${PAR_ARGS[@]}" --out "$RES/bench") &
  P_CHECK=$!
  (phase gpu-tests "$(fit $B_TESTS $ALONG)" gpu_tests) &
  P_TESTS=$!
  (phase memcheck "$(fit $B_MEM $((ALONG + 70)))" sanitize memcheck
   phase racecheck "$(fit $B_RACE $ALONG)" sanitize racecheck --ops-only) &
  P_SAN=$!
fi
wait $P_CHECK $P_TESTS $P_SAN $CR_PID
[ -n "$ACC_PID" ] && wait "$ACC_PID"

# ------------------------------------------------------------------------------ 6, 7, 8 with the GPU to itself
if [ $DRY = 1 ]; then
  STEP_MODELS=resnet32
  STEP_ARGS=(--quick --K 4 --contexts R1E --backends torch --batch 4 --steps 1 --warmup 0 --no-compile)
  # swin_t only: a ViT-B/16 step at 224x224 takes about 9 s on a 2-core CPU
  TFM_MODELS=swin_t
  TFM_ARGS=(--K 4 --contexts R1E --backends torch --batch 2 --steps 1 --warmup 0 --no-compile)
  REF_ARGS=(--models resnet32 --K 16 --contexts R0 --batch 4 --steps 1 --warmup 0 --device cpu)
  KER_ARGS=(--quick --batches 4 --dtypes fp32 --backends native)
  DEV=cpu
else
  STEP_MODELS="resnet32 resnet110"
  STEP_ARGS=(--K 16 --contexts R0 R1E --warmup 3 --steps 10)
  # the fused ops are the CNN boundaries' (token boundaries run torch code on every backend)
  TFM_MODELS="vit_b_16 swin_t"
  TFM_ARGS=(--K 4 --contexts R0 R1E --backends torch --warmup 2 --steps 5 --no-compile)
  REF_ARGS=(--models resnet32 resnet110 --K 16 --contexts R0 R1E --warmup 2 --steps 5)
  KER_ARGS=(--batches 1024 --dtypes bf16)
  DEV=cuda
fi
# train_step "MODELS" ARGS...: one invocation per model, so that a budget overrun keeps the
# first model's JSON
train_step() {
  local rc=0 model models=$1
  shift
  for model in $models; do
    "$PY" -m bench.train_step --models "$model" "$@" --out "$RES/bench/train_step-$model" || rc=$?
  done
  return $rc
}
export -f train_step
phase train-step "$(fit $B_STEP $((B_REF + B_TFM + B_KER + B_PACK)))" train_step "$STEP_MODELS" "${STEP_ARGS[@]}"
STEP_JSON=$(ls "$RES"/bench/train_step-*/train_step_*.json 2>/dev/null)
if [ -f "$CARRY/ContSup/networks_dev/resnet.py" ]; then
  phase reference "$(fit $B_REF $((B_TFM + B_KER + B_PACK)))" "$PY" -m bench.reference_contsup --ref-dir "$CARRY/ContSup" "${REF_ARGS[@]}" \
    ${STEP_JSON:+--compare $STEP_JSON} --out "$RES/bench"
else
  skip reference "reference ContSup not found at .gpuval/ContSup (run scripts/gpuval-prepare.sh and carry .gpuval)"
fi
phase transformers "$(fit $B_TFM $((B_KER + B_PACK)))" train_step "$TFM_MODELS" "${TFM_ARGS[@]}"
# two invocations, so that a budget overrun keeps the first group's JSON (bench.kernels writes at its end)
kernels() {
  local rc=0 group
  for group in "residual image_context" "image_tail head_pool gap"; do
    # shellcheck disable=SC2086
    "$PY" -m bench.kernels "$@" --ops $group --out "$RES/bench/kernels-${group%% *}" || rc=$?
  done
  return $rc
}
export -f kernels
phase kernels "$(fit $B_KER $B_PACK)" kernels "${KER_ARGS[@]}" --device $DEV

# ------------------------------------------------------------------------------ pack and summarise
"$PY" scripts/gpuval_tools.py summary "$RES" > "$RES/logs/summary.log" 2>&1 || echo "summary failed: see logs/summary.log" >&2
tar -czf "$OUTDIR/gpuval-results.tar.gz" -C "$WORK" --exclude='*.pt' gpuval
cp "$RES/summary.txt" "$OUTDIR/summary.txt" 2>/dev/null
say "results: $OUTDIR/gpuval-results.tar.gz ($(du -k "$OUTDIR/gpuval-results.tar.gz" | cut -f1) KiB), $OUTDIR/summary.txt"
echo
cat "$RES/logs/summary.log"
FAILED=$(awk -F'\t' '$2 != "ok" && $2 != "skipped"' "$PHASES" | cut -f1 | tr '\n' ' ')
rm -rf "$WORK"
if [ -n "$FAILED" ]; then
  echo "gpu-validate: phases not ok: $FAILED"
  exit 1
fi
echo "gpu-validate: all phases ok or skipped"
