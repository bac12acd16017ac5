#!/usr/bin/env bash
# MAE pre-training of ViT-H/14, official recipe (effective batch 4096).
# Usage: DATA_PATH=/data/imagenet [GPUS=0,1,2,3,4,5,6,7] [OUTPUT=...] bash run_scripts/run_pretrain_vit_h.sh [flags]
STAGE=pretrain CFG=configs/vit_huge_patch14_224_pretrain.yaml TARGET_BATCH=4096 exec bash "$(dirname "$0")/launch.sh" "$@"
