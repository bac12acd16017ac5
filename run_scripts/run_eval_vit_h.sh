#!/usr/bin/env bash
# Top-1/top-5 of fine-tuned ViT-H/14 weights (e.g. converted mae_finetuned_vit_*.pth) on the val list.
# Usage: DATA_PATH=/data/imagenet PRETRAINED=mae_finetuned_vit_huge.pdparams [GPUS=0,1,2,3] bash run_scripts/run_eval_vit_h.sh
: "${PRETRAINED:?set PRETRAINED to the .pdparams to evaluate}"
STAGE=finetune CFG=configs/vit_huge_patch14_224_finetune.yaml exec bash "$(dirname "$0")/launch.sh" -eval "$@"
