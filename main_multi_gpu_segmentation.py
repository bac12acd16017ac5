"""Semantic segmentation: UperNet on a pre-trained MAE encoder (DESIGN.md 3.4), and -eval of a
segmentor by sliding window (prints {"mIoU", "mAcc", "aAcc", "n", "IoU"} as its last line).

    python main_multi_gpu_segmentation.py -cfg configs/tiny_segmentation.yaml -data_path DIR \
        -pretrained OUT_PRETRAIN/latest.pdparams -output OUT
    python -m paddle.distributed.launch --gpus 0,1,2,3,4,5,6,7 main_multi_gpu_segmentation.py \
        -cfg configs/vit_base_patch16_512_upernet_ade20k.yaml -data_path /data/ADEChallengeData2016 \
        -pretrained mae_pretrain_vit_base.pdparams
"""
import runtime

if __name__ == '__main__':
    runtime.setup_process()  # first: before anything imports Paddle

import cli  # noqa: E402

if __name__ == '__main__':
    cli.main('segmentation')
