"""Linear probing of a pre-trained MAE encoder: frozen encoder, cls token, BN + Linear head, LARS.

    python main_multi_gpu_linearprobe.py -cfg configs/tiny_linearprobe.yaml -data_path DIR \
        -pretrained OUT_PRETRAIN/latest.pdparams -output OUT
"""
import utils  # first: sets the CPU environment before Paddle loads

import paddle.distributed as dist  # noqa: E402

import datasets  # noqa: E402
import engine  # noqa: E402
import mixup  # noqa: E402
import optim  # noqa: E402
import transformer  # noqa: E402


def main():
    config, args, logger = utils.setup('linearprobe')
    model = transformer.build_model(config)
    if config.MODEL.PRETRAINED:
        utils.load_pretrained(model, config.MODEL.PRETRAINED, config, logger.info,
                              require_head=args.eval)
    optim.freeze_for_linear_probe(model)
    val_loader = datasets.loader_for(config, is_train=False)
    if args.eval:
        engine.evaluate_only(model, val_loader, config)
        return
    loader = datasets.loader_for(config, is_train=True)
    optimizer = optim.build_optimizer(model, config, dist.get_world_size())
    engine.fit(config, model, optimizer, loader, logger, val_loader=val_loader,
               criterion=mixup.build_criterion(config), scaler=engine.build_scaler(config))


if __name__ == '__main__':
    utils.run_main(main)
