#!/usr/bin/env bash
# Linear probing of ViT-H/14 MAE pre-trained weights, official recipe (effective batch 16384).
# Usage: DATA_PATH=/data/imagenet [GPUS=0,1,2,3,4,5,6,7] [OUTPUT=...] PRETRAINED=mae_pretrain.pdparams bash run_scripts/run_linearprobe_vit_h.sh [flags]
STAGE=linearprobe CFG=configs/vit_huge_patch14_224_linearprobe.yaml TARGET_BATCH=16384 exec bash "$(dirname "$0")/launch.sh" "$@"
