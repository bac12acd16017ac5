#!/usr/bin/env bash
# Fine-tuning of ViT-H/14 from MAE pre-trained weights, official recipe (effective batch 1024).
# Usage: DATA_PATH=/data/imagenet [GPUS=0,1,2,3,4,5,6,7] [OUTPUT=...] PRETRAINED=mae_pretrain.pdparams bash run_scripts/run_finetune_vit_h.sh [flags]
STAGE=finetune CFG=configs/vit_huge_patch14_224_finetune.yaml TARGET_BATCH=1024 exec bash "$(dirname "$0")/launch.sh" "$@"
