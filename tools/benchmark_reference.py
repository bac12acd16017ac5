"""The PyTorch references of tools/benchmark.py, as a user runs them: no Paddle in the process
(importing Paddle sets OMP_NUM_THREADS and loads its math libraries) and no environment changes.

    timm_train_transform(config)           timm's fine-tuning transform + image loader
    bench_torch_reference(config, args)    a full training step of HF ViTMAE / timm ViT -> img/s
    timed(step, batch, steps)              steps per second of a step function, after warm-up

benchmark.py sends `--reference torch` model-step runs here before it imports Paddle. Needs
requirements-test.txt (torch, timm, transformers).
"""
import functools
import os
import sys
import time

from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import config as config_lib  # noqa: E402  (plain yacs: no Paddle)


TIMM_POSTERIZE_OPS = ('Posterize', 'PosterizeIncreasing', 'PosterizeOriginal')


def timm_posterize_as_old_pillow(img, bits, **_):
    """timm's posterize fails on Pillow >= 11 with 0 bits; old Pillow returned black. Put in
    timm's NAME_TO_OP for TIMM_POSTERIZE_OPS (here and by the RandAugment tests)."""
    import timm.data.auto_augment as timm_aa
    return Image.new(img.mode, img.size) if bits <= 0 else timm_aa.posterize(img, bits)


def timm_train_transform(config):
    """timm's create_transform with the config's fine-tuning recipe (the official MAE builds its
    fine-tuning transform this way), and timm's image loader (PIL open + convert RGB)."""
    import timm.data.auto_augment as timm_aa
    from timm.data import create_transform
    d, t = config.DATA, config.TRAIN
    for name in TIMM_POSTERIZE_OPS:
        timm_aa.NAME_TO_OP[name] = timm_posterize_as_old_pillow
    transform = create_transform(
        input_size=d.IMAGE_SIZE, is_training=True, scale=tuple(t.RRC_SCALE),
        auto_augment=t.RAND_AUGMENT or None, interpolation='bicubic',
        re_prob=t.RANDOM_ERASE_PROB, re_mode=t.RANDOM_ERASE_MODE, re_count=t.RANDOM_ERASE_COUNT,
        mean=tuple(d.MEAN), std=tuple(d.STD))

    def load(path):
        with open(path, 'rb') as f:
            return Image.open(f).convert('RGB')
    return transform, load


def timed(step, batch, steps, warmup=2):
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    elapsed = time.perf_counter() - start
    print(f'model: {steps} steps of batch {batch}: {1000 * elapsed / steps:.0f} ms per step')
    return batch * steps / elapsed


def bench_torch_reference(config, args):
    """The same step in PyTorch (HF ViTMAE / timm ViT), as a user would run it. -> float"""
    import torch
    batch = args.batch_size or config.DATA.BATCH_SIZE
    torch.manual_seed(config.SEED)
    e, d, size = config.MODEL.ENCODER, config.MODEL.DECODER, config.DATA.IMAGE_SIZE
    if config.TRAIN.MODE == 'segmentation':
        raise config_lib.ConfigError('--reference torch times classifiers and pre-training; '
                                     'there is no PyTorch segmentor reference here')
    if config.TRAIN.MODE == 'pretrain':
        from transformers import ViTMAEConfig, ViTMAEForPreTraining
        model = ViTMAEForPreTraining(ViTMAEConfig(
            image_size=size, patch_size=e.PATCH_SIZE, hidden_size=e.EMBED_DIM,
            num_hidden_layers=e.DEPTH, num_attention_heads=e.NUM_HEADS,
            intermediate_size=int(e.EMBED_DIM * e.MLP_RATIO), decoder_hidden_size=d.EMBED_DIM,
            decoder_num_hidden_layers=d.DEPTH, decoder_num_attention_heads=d.NUM_HEADS,
            decoder_intermediate_size=int(d.EMBED_DIM * e.MLP_RATIO),
            mask_ratio=config.MODEL.MASK_RATIO, norm_pix_loss=config.MODEL.NORM_PIX_LOSS,
            layer_norm_eps=1e-6, qkv_bias=True, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0))
        name = 'HF ViTMAEForPreTraining'
    else:
        import timm.models.vision_transformer as timm_vit
        model = timm_vit.VisionTransformer(
            img_size=size, patch_size=e.PATCH_SIZE, embed_dim=e.EMBED_DIM, depth=e.DEPTH,
            num_heads=e.NUM_HEADS, mlp_ratio=e.MLP_RATIO, num_classes=config.MODEL.NUM_CLASSES,
            global_pool='avg' if config.MODEL.GLOBAL_POOL else 'token',
            drop_path_rate=config.MODEL.DROP_PATH,
            norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6))
        name = 'timm VisionTransformer'
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4,
                            betas=tuple(config.TRAIN.OPTIMIZER.BETAS),
                            weight_decay=config.TRAIN.WEIGHT_DECAY)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, config.MODEL.NUM_CLASSES, (batch,))

    def step():
        if config.TRAIN.MODE == 'pretrain':
            loss = model(pixel_values=x).loss
        else:
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        float(loss)
    print(f'model: torch {torch.__version__}, {torch.get_num_threads()} threads, {name}, '
          f'{size}px')
    return timed(step, batch, args.steps)


def run(args, measure, errors=()):
    """The config of args (-cfg, -opts), checked; measure(config, args) -> img/s, printed as
    the last line; a ConfigError (or one of `errors`) is one line and exit status 1."""
    try:
        config = config_lib.merge_opts(config_lib.get_config(args.cfg), args.opts)
        config_lib.check_values(config)
        rate = measure(config, args)
    except (config_lib.ConfigError,) + tuple(errors) as e:
        sys.exit(f'benchmark.py: {e}')
    print(f'img/s: {rate:.1f}')
