#!/usr/bin/env bash
# Semantic segmentation in a few minutes, beside quickstart.sh: on a fresh clone this
#   1. makes (or reuses) the virtual environment .venv (as quickstart.sh),
#   2. pre-trains the tiny MAE as quickstart.sh does, unless $OUT/pretrain/latest.pdparams exists,
#   3. generates the built-in segmentation demo set (ADE20K layout: shapes filled with 4 kinds
#      of texture -- the classes -- on a shaded background, data/demo_seg),
#   4. fine-tunes the tiny UperNet segmentor from the MAE pre-trained encoder and, for
#      comparison, from a random initialisation, 5. draws the first's predictions over held-out
#      images, and prints both mIoUs.
# Knobs (environment): OUT (output/quickstart), SEG_DATA (data/demo_seg), SEG_EPOCHS,
# SEG_BATCH (default: the config's), SEG_TRAIN, SEG_VAL (demo images), PYTHON (skip the venv).
set -euo pipefail
source "$(dirname "$0")/common.sh"
OUT=${OUT:-output/quickstart}
SEG_DATA=${SEG_DATA:-data/demo_seg}
SEG_EPOCHS=${SEG_EPOCHS:-12}
SEG_TRAIN=${SEG_TRAIN:-100}  # few labelled images: where pre-training pays
SEG_VAL=${SEG_VAL:-100}
PRE=$OUT/pretrain/latest.pdparams

if [[ ! -f $PRE ]]; then
  step "no MAE pre-training in $OUT/pretrain yet: running quickstart.sh's pre-training"
  PYTHON=$PYTHON OUT=$OUT STOP_AFTER=pretrain bash run_scripts/quickstart.sh
fi
step "segmentation demo set -> $SEG_DATA"
"$PYTHON" tools/make_demo_dataset.py --segmentation --out "$SEG_DATA" \
  --train-count "$SEG_TRAIN" --val-count "$SEG_VAL"
fresh_runs "$OUT" segmentation segmentation_random
seg() { # output [flags]
  local out=$1; shift
  "$PYTHON" main_multi_gpu_segmentation.py -cfg configs/tiny_segmentation.yaml \
    -data_path "$SEG_DATA" -output "$out" ${SEG_BATCH:+-batch_size "$SEG_BATCH"} "$@" \
    -opts TRAIN.NUM_EPOCHS "$SEG_EPOCHS" VALIDATE_FREQ "$SEG_EPOCHS"
}
step "fine-tuning the segmentor from the MAE pre-trained encoder ($SEG_EPOCHS epochs) -> $OUT/segmentation"
seg "$OUT/segmentation" -pretrained "$PRE"
step "the same from a random initialisation, for comparison -> $OUT/segmentation_random"
seg "$OUT/segmentation_random"
step "predictions over held-out images -> $OUT/segmentation.png"
images=()
for f in $(ls "$SEG_DATA/images/validation" | head -4); do images+=(--image "$SEG_DATA/images/validation/$f"); done
"$PYTHON" tools/visualize.py -pretrained "$OUT/segmentation/latest.pdparams" "${images[@]}" \
  --out "$OUT/segmentation.png"

step "done in $(elapsed)"
"$PYTHON" - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]
def last(name):
    with open(os.path.join(out, name, 'log.txt')) as f:
        return [json.loads(line) for line in f if line.strip()][-1]
mae, rand = last('segmentation'), last('segmentation_random')
rows = [('mIoU, segmentor on the MAE pre-trained encoder', f"{mae['mIoU']:.1f} %"),
        ('mIoU, segmentor from a random initialisation', f"{rand['mIoU']:.1f} %"),
        ('pixel accuracy (aAcc), MAE / random', f"{mae['aAcc']:.1f} % / {rand['aAcc']:.1f} %")]
width = max(len(r[0]) for r in rows)
print()
for name, value in rows:
    print(f'  {name:<{width}}  {value}')
print(f'\n  outputs: {out}/  (segmentation/ segmentation_random/ segmentation.png); the '
      f'per-class IoU is in each run\'s log.txt ("IoU") and in its log lines above')
PY
