#!/usr/bin/env bash
# Fine-tuning of ViT-L/16 from MAE pre-trained weights, official recipe (effective batch 1024).
# Usage: DATA_PATH=/data/imagenet [GPUS=0,1,2,3,4,5,6,7] [OUTPUT=...] PRETRAINED=mae_pretrain.pdparams bash run_scripts/run_finetune_vit_l.sh [flags]
STAGE=finetune CFG=configs/vit_large_patch16_224_finetune.yaml TARGET_BATCH=1024 exec bash "$(dirname "$0")/launch.sh" "$@"
