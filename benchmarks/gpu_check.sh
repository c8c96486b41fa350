#!/usr/bin/env bash
# make gpu-check: everything GPU-side proved and measured in one command, within 6 minutes (6 min 30 s with CIFAR=)
# on one H100/H200-class GPU, with the torch the machine already has and no network. Each step runs under its own
# time limit (seconds, below), so one slow step cannot eat the rest; a step that fails or times out is named in the
# summary and the others still run. Every result goes into one folder, benchmarks/results/gpu_<device>_<date>/, and
# the summary table comes last (the last 40 lines of output hold every figure).
#
#   PY=python3 benchmarks/gpu_check.sh [--rehearsal] [--out DIR]
#   CIFAR=path/to/cifar-10-batches-py adds step 8 (SimCLR R18 against DoGo R18+R50 on real photos)
#   SKIP="loss demo" leaves those steps out (e.g. to rerun only the ones that failed)
#   COMPILE=1 also times the compiled device recipe in step 5 (torch.compile: its limit grows by 25 s)
#
# --rehearsal: every step at tiny sizes on the CPU (device=cpu, gloo), so that a broken step is caught on a machine
# without a GPU (tests/test_gpu_check.py runs it); the pytest step is left out there (it would run itself).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
CIFAR=${CIFAR:-}
REHEARSAL=0
OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --rehearsal) REHEARSAL=1 ;;
    --out) OUT=$2; shift ;;
    *) echo "usage: $0 [--rehearsal] [--out DIR]"; exit 2 ;;
  esac
  shift
done

# Time limits per step, seconds: 340 in all, 380 with the CIFAR photos step, which leaves 20 s of the 6 minutes
# (6 min 30 s with CIFAR=) for installing dogo into PY and the summary. Every process pays torch's import and
# the CUDA start (5-10 s on an H200 machine) before it measures anything: a step of several dogo commands runs them
# in one process (python -m dogo.in_one_process), and the environment is read by the one interpreter that looks
# for the GPU. Each step's time on the H200 and the margin expected under its limit: docs/gpu.md.
T_ENV=20 T_TRAIN=50 T_CIFAR_STEP=60 T_LOSS=30 T_RECIPE=20 T_PIPELINE=25 T_DDP=50 T_STUDY=40 T_DEMO=45 T_PYTEST=40
[ -n "${COMPILE:-}" ] && T_RECIPE=$((T_RECIPE + 25))  # the recipe's compilation (30 s in all on the H200)
if [ $REHEARSAL = 1 ]; then  # a CPU does the tiny steps at about half a GPU's pace on the full ones
  for t in T_ENV T_TRAIN T_CIFAR_STEP T_LOSS T_RECIPE T_PIPELINE T_DDP T_STUDY T_DEMO T_PYTEST; do
    declare $t=$((2 * ${!t}))
  done
fi

# Step 1, the environment, in the interpreter that also tells whether there is torch and a GPU, how many GPUs and
# the result folder's name (one import of torch instead of five): the JSON record, then "STATUS GPUS TAG".
ENV_START=$SECONDS
PREAMBLE=$(timeout $T_ENV "$PY" - 2>/dev/null <<'EOF'
import json, os, re, subprocess, time
try:
    import numpy, torch, torchvision
except ImportError:
    print("no-torch 0 none")
    raise SystemExit
gpu = torch.cuda.is_available()
name = torch.cuda.get_device_name(0) if gpu else None
env = {"torch": torch.__version__, "torchvision": torchvision.__version__, "numpy": numpy.__version__,
       "cuda": torch.version.cuda, "cpu_cores": os.cpu_count(), "gpu": name, "gpus": torch.cuda.device_count()}
try:
    env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                   capture_output=True, text=True, timeout=5).stdout.strip()
except (OSError, subprocess.TimeoutExpired):
    env["driver"] = None
tag = re.sub(r"[^a-z0-9]+", "_", (name or "cpu").lower().replace("nvidia", "")).strip("_")
print(json.dumps(env, indent=1))
print("gpu" if gpu else "no-gpu", max(1, torch.cuda.device_count()), tag + "_" + time.strftime("%Y%m%d"))
EOF
)
ENV_SECONDS=$((SECONDS - ENV_START))
read -r STATUS NGPU TAG <<< "$(tail -n 1 <<< "$PREAMBLE")"
case "${STATUS:-}" in
  no-torch) echo "gpu-check: $PY has no torch; point PY at the interpreter that has it (PY=/path/to/python3 make gpu-check)"
            exit 2 ;;
  gpu|no-gpu) ;;
  *) echo "gpu-check: $PY could not import torch and look for a GPU within $T_ENV s"; exit 2 ;;
esac
if [ $REHEARSAL = 0 ] && [ "$STATUS" != gpu ]; then
  echo "gpu-check: no GPU found by $PY (torch.cuda.is_available() is false): nothing to check here; on a CPU, \`$0 --rehearsal\` runs every step at tiny sizes"
  exit 3
fi

# The project into this interpreter without its dependencies (the machine's own torch stays), unless it is there.
if ! "$PY" -c "import dogo.benchmarks, pathlib, sys; sys.exit(pathlib.Path(dogo.benchmarks.__file__).resolve().parent != pathlib.Path('benchmarks').resolve())" 2>/dev/null; then
  echo "installing dogo (editable, no dependencies) into $PY"
  "$PY" -m pip install -q --no-deps --no-build-isolation -e . || { echo "gpu-check: could not install dogo into $PY"; exit 2; }
fi
DEVICE=cuda; NPROC=$NGPU
if [ $REHEARSAL = 1 ]; then DEVICE=cpu; NPROC=2; fi
OUT=${OUT:-benchmarks/results/gpu_$TAG}
mkdir -p "$OUT"
LOG="$OUT/steps.log"
: > "$LOG"
export PYTHONUNBUFFERED=1
DOGO=("$PY" -m dogo)
ONE_PROCESS=("$PY" -m dogo.in_one_process)  # each argument one dogo command line: cmd "$@" makes one

cmd() {  # the words as one command line for dogo.in_one_process (quoted as a shell would read them)
  echo "${*@Q}"
}

kill_tree() {  # a step's process and everything it started (torchrun's ranks, DataLoader workers)
  local child
  for child in $(pgrep -P "$1"); do kill_tree "$child"; done
  kill -TERM "$1" 2>/dev/null
}

step() {  # step NAME LIMIT COMMAND...: run under its time limit, output to $OUT/NAME.log, status to steps.log
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  if [[ " ${SKIP:-} " == *" $name "* ]]; then
    printf '%s\tskipped (SKIP)\t0\n' "$name" >> "$LOG"
    return
  fi
  echo "== $name (limit ${limit}s)"
  rm -f "$OUT/.timed_out"
  "$@" > "$OUT/$name.log" 2>&1 &
  local pid=$!
  ( sleep "$limit"; touch "$OUT/.timed_out"; kill_tree "$pid"; sleep 5; kill -KILL "$pid" 2>/dev/null ) &
  local dog=$!
  wait "$pid"
  local rc=$?
  # the watchdog before its sleep: a watchdog whose sleep died first would go on to mark the step as timed out
  local naps; naps=$(pgrep -P "$dog")
  kill -TERM "$dog" 2>/dev/null
  wait "$dog" 2>/dev/null
  [ -n "$naps" ] && kill -TERM $naps 2>/dev/null
  local status=ok
  if [ -e "$OUT/.timed_out" ]; then status="timed out"; elif [ $rc != 0 ]; then status="failed ($rc)"; fi
  rm -f "$OUT/.timed_out"
  printf '%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - t0))" >> "$LOG"
  echo "   $status in $((SECONDS - t0)) s"
  [ "$status" = ok ] || tail -5 "$OUT/$name.log" | sed 's/^/   | /'
}

# 1. the environment: written by the first interpreter above
head -n -1 <<< "$PREAMBLE" > "$OUT/environment.json"
printf 'environment\tok\t%s\n' "$ENV_SECONDS" >> "$LOG"
echo "== environment (limit ${T_ENV}s)"
echo "   ok in $ENV_SECONDS s"

# sizes: full on the GPU, tiny in the rehearsal
if [ $REHEARSAL = 1 ]; then
  TRAIN_ARGS=(data.image_size=32 data.batch_size=4 data.synthetic.images=16 device=cpu --warmup 1 --steps 1 --repeats 1)
  CIFAR_ARGS=(data.batch_size=8 data.synthetic.images=32 device=cpu --warmup 1 --steps 1 --repeats 1)
  LOSS_VIEWS=(256); RECIPE_ARGS=(--size 32 --batch 8 --repeats 1 --device cpu)
  CIFAR_CONFIGS=(cifar10_simclr_r18)  # the GPU's second config runs the same commands
  PIPE_ARGS=(--size 32 --batch 8 --batches 2 --warmup 1 --repeats 1 --workers 1 --device cpu); PHOTOS=64
  RUN_ARGS=(device=cpu data.batch_size=8 data.synthetic.images=64); DEMO_STEPS=schedule.max_steps=2
  DEMO_DATA="$OUT/runs/shapes"; DEMO_DATA_ARGS=(--train-per-class 4 --val-per-class 2)  # the demo's commands, small
else
  TRAIN_ARGS=(--warmup 3 --steps 6 --repeats 2)
  # CUDA graphs at 32 px, where the host's launches set the eager step's pace; the eager step is measured beside
  CIFAR_ARGS=(data.synthetic.images=50000 precision.cuda_graphs=on --warmup 4 --steps 10 --repeats 2)
  LOSS_VIEWS=(65536); RECIPE_ARGS=(--size 224 --batch 256 --repeats 3 --device cuda)
  CIFAR_CONFIGS=(cifar10_simclr_r18 cifar10_r18_r50)
  PIPE_ARGS=(--batch 64 --batches 10 --warmup 3 --repeats 2 --device cuda); PHOTOS=1000  # 832 of the 1,000 photos a pass
  RUN_ARGS=(device=cuda data.batch_size=512 data.synthetic.images=1000000); DEMO_STEPS=
  DEMO_DATA=data/shapes64; DEMO_DATA_ARGS=()
fi

# 2. the DoGo R18+R50 step at 224 px: whole, engine only, plain-model ceiling, MFU, ops, syncs, memory
step train_r18_r50 $T_TRAIN "${DOGO[@]}" bench train configs/bench_r18_r50.yaml "${TRAIN_ARGS[@]}" \
  --json "$OUT/train_r18_r50.json"

# 3. the CIFAR-sized step (32 px, CIFAR stem, batch 256) with CUDA graphs, and eager beside it, both configs in one
# process; GPU utilisation sampled while it runs ("end NAME" after each config)
cifar_steps() {
  local smi="" marks=/dev/null lines=()
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits -lms 100 > "$OUT/gpu_util_cifar.csv" &
    smi=$! marks="$OUT/gpu_util_cifar.csv"
  fi
  local src=(data.backend=synthetic)
  [ -n "$CIFAR" ] && src=(data.path="$CIFAR")
  for cfg in "${CIFAR_CONFIGS[@]}"; do
    lines+=("$(cmd bench train configs/$cfg.yaml "${src[@]}" eval.knn_every_epochs=0 "${CIFAR_ARGS[@]}" \
      --json "$OUT/train_$cfg.json")" "$(cmd mark "$marks" end $cfg)")
  done
  "${ONE_PROCESS[@]}" "${lines[@]}"
  local rc=$?
  [ -n "$smi" ] && kill $smi
  return $rc
}
step cifar_step $T_CIFAR_STEP cifar_steps

# 4. the loss kernel against the straightforward loss, on bf16 embeddings as the training step gives it (each
# measurement in a process forked for it: one CUDA start each)
step loss $T_LOSS "${DOGO[@]}" bench loss --views "${LOSS_VIEWS[@]}" --dtype bfloat16 --device $DEVICE --repeats 2 \
  --max-seconds 8 --json "$OUT/loss_bf16.json"

# 5. the device recipe, eager (and compiled with COMPILE=1)
step recipe $T_RECIPE "${DOGO[@]}" bench recipe "${RECIPE_ARGS[@]}" ${COMPILE:+--compile} --json "$OUT/recipe.json"

# 6. the folder backend with the recipe on the device, on photos made here without network
pipeline() {
  local photos=data/gpu_check_photos$PHOTOS
  [ -d $photos/train ] || "$PY" -m dogo.benchmarks.lab.photos $photos --images $PHOTOS || return
  "${DOGO[@]}" bench pipeline --backend folder --placement device --data $photos/train "${PIPE_ARGS[@]}" \
    --json "$OUT/pipeline_folder.json"
}
step pipeline $T_PIPELINE pipeline

# 7. torchrun with SyncBN: a SIGTERM mid-run saves, the same command resumes to the end
ddp_run() {
  local runs="$OUT/runs" args=(configs/cifar10_simclr_r18.yaml data.backend=synthetic "${RUN_ARGS[@]}"
    distributed.sync_bn=true name=ddp out_dir="$OUT/runs" log.every=1 log.progress=off eval.knn_every_epochs=0
    checkpoint.every_steps=0 checkpoint.resume=auto)
  rm -rf "$runs"
  "$PY" -m torch.distributed.run --standalone --nproc_per_node=$NPROC -m dogo train "${args[@]}" \
    schedule.max_steps=100000 &
  local pid=$!
  for _ in $(seq 200); do  # until two steps are logged
    [ "$(grep -c '"step"' "$runs/ddp/metrics.jsonl" 2>/dev/null || echo 0)" -ge 2 ] && break
    sleep 0.1
  done
  kill -TERM $pid; wait $pid; local rc=$?
  grep -q '"event": "stopped"' "$runs/ddp/metrics.jsonl" || { echo "no stopped event (exit $rc)"; return 1; }
  local saved; saved=$(ls "$runs/ddp/checkpoints" | tail -1)
  local step=$((10#${saved:5:9}))
  echo "stopped by SIGTERM (exit $rc) at step $step, saved $saved; resuming to step $((step + 2))"
  "$PY" -m torch.distributed.run --standalone --nproc_per_node=$NPROC -m dogo train "${args[@]}" \
    schedule.max_steps=$((step + 2)) || return
  grep -q '"event": "resume"' "$runs/ddp/metrics.jsonl" && grep -q '"event": "done"' "$runs/ddp/metrics.jsonl" &&
    "$PY" -c "import json; print(json.dumps({'stopped_at': $step, 'resumed_to': $((step + 2)), 'ranks': $NPROC, 'exit_on_sigterm': $rc}))" \
      > "$OUT/ddp_sigterm.json"
}
step ddp_sigterm $T_DDP ddp_run

# 8. real photos: SimCLR R18 against DoGo R18+R50 at equal steps, kNN and linear probe vs random init and raw pixels,
# in one process
study() {
  local runs="$OUT/runs" steps=${STUDY_STEPS:-30} batch=256
  [ $REHEARSAL = 1 ] && steps=2 batch=16
  local common=(data.path="$CIFAR" out_dir="$runs" device=$DEVICE data.batch_size=$batch schedule.max_steps=$steps
    eval.knn_every_epochs=0 log.progress=off checkpoint.resume=none)
  "${ONE_PROCESS[@]}" "$(cmd train configs/cifar10_simclr_r18.yaml name=simclr_r18 "${common[@]}")" \
    "$(cmd train configs/cifar10_r18_r50.yaml name=dogo_r18_r50 "${common[@]}")" \
    "$(cmd eval table "$runs/simclr_r18" "$runs/dogo_r18_r50" --epochs 30 --set device=$DEVICE \
         --json "$OUT/cifar_table.json")"
}
if [ -n "$CIFAR" ]; then step cifar_study $T_STUDY study; else printf 'cifar_study\tskipped (CIFAR= not given)\t0\n' >> "$LOG"; fi

# 9. what a newcomer with a GPU sees first: make demo's training, kNN table and curves, in one process
demo() {
  [ -d "$DEMO_DATA/train" ] || "$PY" -m dogo.pipelines.shapes "$DEMO_DATA" "${DEMO_DATA_ARGS[@]}" || return
  "${ONE_PROCESS[@]}" \
    "$(cmd train configs/demo.yaml checkpoint.resume=none out_dir="$OUT/runs" device=$DEVICE $DEMO_STEPS \
         data.path="$DEMO_DATA")" \
    "$(cmd eval knn "$OUT/runs/demo" device=$DEVICE --json "$OUT/demo_knn.json")" \
    "$(cmd plot curves "$OUT/runs/demo" --out "$OUT/demo_curves.png")"
}
step demo $T_DEMO demo

# 10. the tests that need a GPU (marked gpu; they skip without one: the rest of the suite runs on CPUs, make test)
if [ $REHEARSAL = 0 ]; then
  step pytest $T_PYTEST "$PY" -m pytest -q -m gpu -n 0 -p no:cacheprovider -rs
else
  printf 'pytest\tskipped (rehearsal)\t0\n' >> "$LOG"
fi

rm -rf "$OUT/runs"  # checkpoints are not results
"$PY" -m dogo.benchmarks.gpu_summary "$OUT"
