"""End-to-end fine-tuning of a pre-trained MAE encoder (and -eval of a classifier).

    python main_multi_gpu_finetune.py -cfg configs/tiny_finetune.yaml -data_path DIR \
        -pretrained OUT_PRETRAIN/latest.pdparams -output OUT
    python main_multi_gpu_finetune.py -cfg configs/vit_base_patch16_224_finetune.yaml \
        -data_path /data/imagenet -pretrained mae_finetuned_vit_base.pdparams -eval
"""
import runtime

if __name__ == '__main__':
    runtime.setup_process()  # first: before anything imports Paddle

import cli  # noqa: E402

if __name__ == '__main__':
    cli.main('finetune')
