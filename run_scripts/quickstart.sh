#!/usr/bin/env bash
# The first ten minutes: on a fresh clone with Python 3 and pip, this
#   1. makes (or reuses) the virtual environment .venv and installs Paddle (CPU) + requirements.txt,
#   2. generates the built-in demo images (10 classes of shapes and textures, data/demo),
#   3. pre-trains the tiny MAE on them, 4. linear-probes the pre-trained encoder and, for
#   comparison, a randomly initialised one, 5. fine-tunes the pre-trained encoder, 6. evaluates
#   it, 7. draws MAE reconstructions of held-out images, and prints a table of the results.
# Knobs (environment): OUT (output/quickstart), DATA (data/demo), PRETRAIN_EPOCHS, PROBE_EPOCHS,
# FINETUNE_EPOCHS, PRETRAIN_BATCH, PROBE_BATCH, FINETUNE_BATCH (default: the configs'),
# TRAIN_PER_CLASS, VAL_PER_CLASS, PYTHON (skip the venv and use this Python).
# The segmentation demo, beside this one: bash run_scripts/quickstart_segmentation.sh
set -euo pipefail
# (quickstart_segmentation.sh runs this with STOP_AFTER=pretrain when it finds no pre-training)
source "$(dirname "$0")/common.sh"
OUT=${OUT:-output/quickstart}
DATA=${DATA:-data/demo}
PRETRAIN_EPOCHS=${PRETRAIN_EPOCHS:-15}
PROBE_EPOCHS=${PROBE_EPOCHS:-8}
FINETUNE_EPOCHS=${FINETUNE_EPOCHS:-10}
TRAIN_PER_CLASS=${TRAIN_PER_CLASS:-240}
VAL_PER_CLASS=${VAL_PER_CLASS:-40}

step "demo data set -> $DATA"
"$PYTHON" tools/make_demo_dataset.py --out "$DATA" --train-per-class "$TRAIN_PER_CLASS" \
  --val-per-class "$VAL_PER_CLASS"

train() { # script config output batch [flags]
  local script=$1 cfg=$2 out=$3 batch=$4; shift 4
  "$PYTHON" "main_multi_gpu_$script.py" -cfg "configs/$cfg.yaml" -data_path "$DATA" \
    -output "$out" ${batch:+-batch_size "$batch"} "$@"
}
fresh_runs "$OUT" pretrain linearprobe linearprobe_random finetune
step "pre-training the tiny MAE for $PRETRAIN_EPOCHS epochs -> $OUT/pretrain"
train pretrain tiny_pretrain "$OUT/pretrain" "${PRETRAIN_BATCH:-}" -opts TRAIN.NUM_EPOCHS "$PRETRAIN_EPOCHS"
PRE=$OUT/pretrain/latest.pdparams
[[ ${STOP_AFTER:-} == pretrain ]] && { step "pre-training done: $PRE"; exit 0; }
step "linear probe of the pre-trained encoder ($PROBE_EPOCHS epochs) -> $OUT/linearprobe"
train linearprobe tiny_linearprobe "$OUT/linearprobe" "${PROBE_BATCH:-}" -pretrained "$PRE" \
  -opts TRAIN.NUM_EPOCHS "$PROBE_EPOCHS"
step "linear probe of a randomly initialised encoder, for comparison -> $OUT/linearprobe_random"
train linearprobe tiny_linearprobe "$OUT/linearprobe_random" "${PROBE_BATCH:-}" -opts TRAIN.NUM_EPOCHS "$PROBE_EPOCHS"
step "fine-tuning the pre-trained encoder ($FINETUNE_EPOCHS epochs) -> $OUT/finetune"
# a few epochs on small pictures: lighter augmentation than the ImageNet recipe of the config
train finetune tiny_finetune "$OUT/finetune" "${FINETUNE_BATCH:-}" -pretrained "$PRE" \
  -opts TRAIN.NUM_EPOCHS "$FINETUNE_EPOCHS" TRAIN.MIXUP_ALPHA 0 TRAIN.CUTMIX_ALPHA 0 \
  TRAIN.RANDOM_ERASE_PROB 0 TRAIN.RAND_AUGMENT rand-m5-mstd0.5-inc1
step "evaluating the fine-tuned model on the held-out images"
"$PYTHON" main_multi_gpu_finetune.py -cfg configs/tiny_finetune.yaml -data_path "$DATA" \
  -pretrained "$OUT/finetune/latest.pdparams" -eval | tee "$OUT/finetune_eval.json"
step "MAE reconstructions of held-out images -> $OUT/reconstruction.png"
images=()
for cls in circle triangle ring checker dots; do images+=(--image "$DATA/val/$cls/00000.png"); done
"$PYTHON" tools/visualize.py -cfg configs/tiny_pretrain.yaml -pretrained "$PRE" "${images[@]}" \
  --out "$OUT/reconstruction.png"

step "done in $(elapsed)"
"$PYTHON" - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]
def log(name):
    with open(os.path.join(out, name, 'log.txt')) as f:
        return [json.loads(line) for line in f if line.strip()]
pre = log('pretrain')
probe, rand, ft = log('linearprobe')[-1], log('linearprobe_random')[-1], log('finetune')[-1]
with open(os.path.join(out, 'finetune_eval.json')) as f:
    ev = json.loads(f.read().strip().splitlines()[-1])
rows = [
    ('pre-training loss (norm-pix MSE), first -> last epoch',
     f"{pre[0]['train_loss']:.4f} -> {pre[-1]['train_loss']:.4f}"),
    ('linear probe top-1, MAE pre-trained encoder', f"{probe['val_acc1']:.1f} %"),
    ('linear probe top-1, randomly initialised encoder', f"{rand['val_acc1']:.1f} %"),
    ('fine-tuned top-1 (-eval of latest.pdparams)', f"{ev['val_acc1']:.1f} % on {ev['n']} images"),
]
width = max(len(r[0]) for r in rows)
print()
for name, value in rows:
    print(f'  {name:<{width}}  {value}')
print(f'\n  outputs: {out}/  (pretrain/ linearprobe/ linearprobe_random/ finetune/ '
      f'reconstruction.png); each run folder has log.txt, config.yaml and latest.pdparams')
PY
