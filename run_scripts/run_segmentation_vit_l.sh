#!/usr/bin/env bash
# UperNet on MAE ViT-L/16, ADE20K 512x512, 160k iterations of effective batch 16 (accumulation
# keeps 16 on fewer than 8 GPUs). PRETRAINED: our pre-training checkpoint or a converted
# official one (port_weights/convert_official.py); -eval evaluates a segmentor checkpoint.
# Usage: DATA_PATH=/data/ADEChallengeData2016 PRETRAINED=mae_pretrain_vit_large.pdparams [GPUS=0,1,2,3,4,5,6,7] bash run_scripts/run_segmentation_vit_l.sh [flags]
STAGE=segmentation CFG=configs/vit_large_patch16_512_upernet_ade20k.yaml TARGET_BATCH=16 exec bash "$(dirname "$0")/launch.sh" "$@"
