"""MAE pre-training.

    python main_multi_gpu_pretrain.py -cfg configs/tiny_pretrain.yaml -data_path DIR -output OUT
    python -m paddle.distributed.launch --gpus 0,1,2,3,4,5,6,7 main_multi_gpu_pretrain.py \
        -cfg configs/vit_base_patch16_224_pretrain.yaml -data_path /data/imagenet -output OUT
"""
import runtime

if __name__ == '__main__':
    runtime.setup_process()  # first: before anything imports Paddle

import cli  # noqa: E402

if __name__ == '__main__':
    cli.main('pretrain')
