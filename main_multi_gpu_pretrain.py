"""MAE pre-training.

    python main_multi_gpu_pretrain.py -cfg configs/tiny_pretrain.yaml -data_path DIR -output OUT
    python -m paddle.distributed.launch --gpus 0,1,2,3,4,5,6,7 main_multi_gpu_pretrain.py \
        -cfg configs/vit_base_patch16_224_pretrain.yaml -data_path /data/imagenet -output OUT
"""
import utils  # first: sets the CPU environment before Paddle loads

import paddle.distributed as dist  # noqa: E402

import datasets  # noqa: E402
import engine  # noqa: E402
import optim  # noqa: E402
import transformer  # noqa: E402


def main():
    config, _, logger = utils.setup('pretrain')
    loader = datasets.loader_for(config, is_train=True)
    model = transformer.build_model(config)
    if config.MODEL.PRETRAINED:
        utils.load_pretrained(model, config.MODEL.PRETRAINED, config, logger.info)
    optimizer = optim.build_optimizer(model, config, dist.get_world_size())
    engine.fit(config, model, optimizer, loader, logger, scaler=engine.build_scaler(config))


if __name__ == '__main__':
    utils.run_main(main)
