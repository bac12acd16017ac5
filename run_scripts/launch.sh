#!/usr/bin/env bash
# Shared by the run_*.sh scripts (not run directly): launches STAGE with CFG on the GPUs given by
# the environment, choosing TRAIN.ACCUM_ITER so that the effective batch is TARGET_BATCH.
#
# Environment (all optional but DATA_PATH):
#   DATA_PATH   folder with train_list.txt / val_list.txt (or class sub-folders)
#   OUTPUT      output folder                         (default: output/<script name>)
#   GPUS        e.g. 0,1,2,3,4,5,6,7                  (default: all GPUs; empty on a CPU machine)
#   NPROC       processes on a CPU-only machine       (default 1)
#   NNODES      machines taking part                  (default 1; each runs this script)
#   MASTER      ip:port of the first machine          (needed when NNODES > 1; the same on all)
#   NODE_RANK   this machine's rank, 0 on the master  (optional; Paddle can assign it)
#   BATCH_SIZE  per-process batch                     (default: the config's DATA.BATCH_SIZE)
#   PRETRAINED  .pdparams to start from (fine-tune, linear probe, eval)
# With NNODES > 1 the launcher gets --nnodes NNODES --master MASTER [--rank NODE_RANK].
# Extra arguments go to the entry point, e.g. -resume auto or -opts KEY VALUE (these win).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# glibc's malloc thresholds (runtime.py): exported here so that the entry points need no restart
export MALLOC_MMAP_THRESHOLD_=${MALLOC_MMAP_THRESHOLD_:-4294967296}
export MALLOC_TRIM_THRESHOLD_=${MALLOC_TRIM_THRESHOLD_:-4294967296}
: "${STAGE:?}" "${CFG:?}"
DATA_PATH=${DATA_PATH:?set DATA_PATH to the data folder (train_list.txt, val_list.txt)}
OUTPUT=${OUTPUT:-output/$(basename "$CFG" .yaml)}
NNODES=${NNODES:-1}
PYTHON=${PYTHON:-python}
fail() { echo "launch: $*" >&2; exit 2; }
[[ $NNODES =~ ^[1-9][0-9]*$ ]] || fail "NNODES=$NNODES: the number of machines (1, 2, ...)"
if (( NNODES > 1 )); then
  [[ -n ${MASTER:-} ]] || fail "NNODES=$NNODES: set MASTER=ip:port of the first machine (the same on every machine)"
  if [[ -n ${NODE_RANK:-} ]] && ! { [[ $NODE_RANK =~ ^[0-9]+$ ]] && (( NODE_RANK < NNODES )); }; then
    fail "NODE_RANK=$NODE_RANK: 0 to $((NNODES - 1)), 0 on the master"
  fi
fi

# fail fast, in one line, on what would otherwise fail deep inside the launcher
cuda=$("$PYTHON" -c 'import paddle; print(int(paddle.is_compiled_with_cuda()))' 2>/dev/null) ||
  fail "$PYTHON cannot import paddle: pip install paddlepaddle-gpu (GPU) or paddlepaddle (CPU), or set PYTHON"
found=$(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null | paste -sd, || true)
if [[ -z ${GPUS+x} ]]; then
  GPUS=$found
  [[ -n $GPUS && $cuda == 0 ]] && GPUS=  # GPUs present, but this Paddle is the CPU build
fi
if [[ -n $GPUS ]]; then
  [[ $cuda == 1 ]] || fail "GPUS=$GPUS, but $PYTHON has the CPU build of Paddle: pip install paddlepaddle-gpu, or unset GPUS to run on the CPU"
  [[ -n $found ]] || fail "GPUS=$GPUS, but nvidia-smi finds no GPU on this machine: unset GPUS to run on the CPU"
fi
[[ -z $GPUS ]] && echo "launch: no GPU in use: running on the CPU with ${NPROC:-1} process(es) (NPROC)"
if [[ -n $GPUS ]]; then
  per_node=$(awk -F, '{print NF}' <<<"$GPUS")
  devices=(--gpus "$GPUS")
else
  per_node=${NPROC:-1}
  devices=(--nproc_per_node "$per_node")
fi
world=$((per_node * NNODES))
batch=${BATCH_SIZE:-$("$PYTHON" - "$CFG" <<'PY'
import sys
sys.path.insert(0, '.')
import config
try:
    print(config.get_config(sys.argv[1]).DATA.BATCH_SIZE)
except config.ConfigError as e:
    sys.exit(f'launch: {e}')
PY
)} || exit 2
accum=0
if [[ -n ${TARGET_BATCH:-} ]]; then
  accum=$(( (TARGET_BATCH + batch * world - 1) / (batch * world) ))
  (( accum < 1 )) && accum=1
  eff=$((batch * world * accum))
  echo "launch: $world process(es) x batch $batch x accum $accum = effective batch $eff" \
       "(recipe: $TARGET_BATCH)"
  (( eff != TARGET_BATCH )) && echo "launch: note: $eff is not the recipe's $TARGET_BATCH;" \
       "the lr follows the effective batch (lr = TRAIN.BASE_LR x batch / TRAIN.LR_SCALE_DIVISOR)"
fi
multi=()
if (( NNODES > 1 )); then
  multi=(--nnodes "$NNODES" --master "$MASTER")
  [[ -n ${NODE_RANK:-} ]] && multi+=(--rank "$NODE_RANK")
fi
args=(-cfg "$CFG" -data_path "$DATA_PATH" -output "$OUTPUT" -batch_size "$batch")
[[ -n ${PRETRAINED:-} ]] && args+=(-pretrained "$PRETRAINED")
opts=()
(( accum > 0 )) && opts=(-opts TRAIN.ACCUM_ITER "$accum")
set -x
exec "$PYTHON" -m paddle.distributed.launch "${devices[@]}" "${multi[@]}" \
  --log_dir "$OUTPUT/launch_logs" "main_multi_gpu_${STAGE}.py" "${args[@]}" "${opts[@]}" "$@"
