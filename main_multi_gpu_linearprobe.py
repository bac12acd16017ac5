"""Linear probing of a pre-trained MAE encoder: frozen encoder, cls token, BN + Linear head, LARS.

    python main_multi_gpu_linearprobe.py -cfg configs/tiny_linearprobe.yaml -data_path DIR \
        -pretrained OUT_PRETRAIN/latest.pdparams -output OUT
"""
import runtime

if __name__ == '__main__':
    runtime.setup_process()  # first: before anything imports Paddle

import cli  # noqa: E402

if __name__ == '__main__':
    cli.main('linearprobe')
