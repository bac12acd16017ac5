"""End-to-end fine-tuning of a pre-trained MAE encoder (and -eval of a classifier).

    python main_multi_gpu_finetune.py -cfg configs/tiny_finetune.yaml -data_path DIR \
        -pretrained OUT_PRETRAIN/latest.pdparams -output OUT
    python main_multi_gpu_finetune.py -cfg configs/vit_base_patch16_224_finetune.yaml \
        -data_path /data/imagenet -pretrained mae_finetuned_vit_base.pdparams -eval
"""
import utils  # first: sets the CPU environment before Paddle loads

import paddle.distributed as dist  # noqa: E402

import datasets  # noqa: E402
import engine  # noqa: E402
import mixup  # noqa: E402
import optim  # noqa: E402
import transformer  # noqa: E402


def main():
    config, args, logger = utils.setup('finetune')
    model = transformer.build_model(config)
    if config.MODEL.PRETRAINED:
        utils.load_pretrained(model, config.MODEL.PRETRAINED, config, logger.info,
                              require_head=args.eval)
    val_loader = datasets.loader_for(config, is_train=False)
    if args.eval:
        engine.evaluate_only(model, val_loader, config)
        return
    loader = datasets.loader_for(config, is_train=True)
    optimizer = optim.build_optimizer(model, config, dist.get_world_size())
    engine.fit(config, model, optimizer, loader, logger, val_loader=val_loader,
               mixup_fn=mixup.build_mixup(config), criterion=mixup.build_criterion(config),
               scaler=engine.build_scaler(config))


if __name__ == '__main__':
    utils.run_main(main)
