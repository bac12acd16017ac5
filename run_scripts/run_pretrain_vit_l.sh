#!/usr/bin/env bash
# MAE pre-training of ViT-L/16, official recipe (effective batch 4096).
# Usage: DATA_PATH=/data/imagenet [GPUS=0,1,2,3,4,5,6,7] [OUTPUT=...] bash run_scripts/run_pretrain_vit_l.sh [flags]
STAGE=pretrain CFG=configs/vit_large_patch16_224_pretrain.yaml TARGET_BATCH=4096 exec bash "$(dirname "$0")/launch.sh" "$@"
