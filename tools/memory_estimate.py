"""Computed (not measured) GPU memory per process for a config: model states + the activations
the transformer blocks keep for the backward pass, at the config's per-process batch size.

    python tools/memory_estimate.py -cfg configs/vit_large_patch16_224_pretrain.yaml
    python tools/memory_estimate.py --all        # the README table: the 11 recipe configs

The count, per process (GiB = 2**30 bytes):
  - model states: weights, gradients and optimizer state, from the model's real parameter
    count (built under paddle.LazyGuard, nothing allocated). fp32: 4 B weights + 4 B
    gradients + AdamW 8 B (LARS 4 B) per trained parameter; AMP O1 adds the 2 B half-precision
    copies of the weights that autocast makes and backward keeps. AMP O2 (AdamW only): 2 B
    weights + 2 B gradients + 4 B float32 master weights + 8 B AdamW moments.
  - activations kept for backward, per block and sample: 17 L*D values (inputs of the two
    LayerNorms and four Linears, q/k/v, the attention output, GELU input and output: 1+1+3+1+1+
    1+1+4+4) plus, without flash attention (fp32), the H*L*L attention probabilities; 4 B each
    in fp32, 2 B with AMP (flash attention: no L*L term). L = tokens (pre-training: 1 + visible
    patches in the encoder, 1 + all patches in the decoder), D = width, H = heads. With
    MODEL.RECOMPUTE a block keeps only its input (L*D), plus one block's full set while it is
    recomputed. Linear probing trains the head only: nothing is kept, and the peak is one block's
    full set at a time.
  - segmentation (UperNet): the encoder's blocks on all 1 + (S/p)^2 tokens as above, plus the
    neck and heads, per sample, at the pyramid's sizes a0..a3 = (4g)^2, (2g)^2, g^2, (g/2)^2
    pixels (g = S/p): every conv / BatchNorm / activation output they keep (3 values a pixel
    and channel for a conv + BN + ReLU module), the resized and concatenated maps, and the
    logits upsampled to S x S for the loss (with their softmax), decode and auxiliary head.
Not counted: the CUDA context and library workspaces (~0.5-1 GiB), the allocator's
fragmentation, input batches, the patch embedding / head / loss tensors (small against the
blocks), and evaluation (forward only).
"""
import argparse
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import runtime  # noqa: E402

if __name__ == '__main__':
    runtime.setup_process(restart=False)  # before Paddle loads: threads, its import notices

import paddle  # noqa: E402

import config as config_lib  # noqa: E402
import tasks  # noqa: E402
import transformer  # noqa: E402

GIB = 2.0 ** 30
SETTINGS = (('fp32', '', 'O1', False), ('AMP O1', 'bfloat16', 'O1', False),  # label, AMP,
            ('AMP O2', 'bfloat16', 'O2', False),                              # level, recompute
            ('AMP O2 + recompute', 'bfloat16', 'O2', True))
OFFICIAL = [f'vit_{size}_224_{stage}' for size in transformer.SIZES
            for stage in ('pretrain', 'finetune', 'linearprobe')] + [
    f'vit_{size}_512_upernet_ade20k' for size in ('base_patch16', 'large_patch16')]


def parameter_counts(config):
    """-> (all parameters, trained parameters) of the config's model, built without memory."""
    with paddle.LazyGuard():
        model = tasks.build_model(config)  # as its task trains it (the probe: frozen)
    total = sum(math.prod(p.shape) for p in model.parameters())
    trained = sum(math.prod(p.shape) for p in model.parameters() if not p.stop_gradient)
    return total, trained


def block_stacks(config):
    """-> [(blocks, tokens L, width D, heads H)] of the model's transformer stacks in training."""
    m, size = config.MODEL, config.DATA.IMAGE_SIZE
    patches = (size // m.ENCODER.PATCH_SIZE) ** 2
    enc = m.ENCODER
    if config.TRAIN.MODE == 'pretrain':
        visible = int(patches * (1 - m.MASK_RATIO))
        return [(enc.DEPTH, 1 + visible, enc.EMBED_DIM, enc.NUM_HEADS),
                (m.DECODER.DEPTH, 1 + patches, m.DECODER.EMBED_DIM, m.DECODER.NUM_HEADS)]
    return [(enc.DEPTH, 1 + patches, enc.EMBED_DIM, enc.NUM_HEADS)]


def dense_head_values(config):
    """Activation values per sample kept by the segmentor's neck and heads (see the module
    docstring); 0 for the other tasks."""
    if config.TRAIN.MODE != 'segmentation':
        return 0
    m, size = config.MODEL, config.DATA.IMAGE_SIZE
    seg, d, k = m.SEGMENTATION, m.ENCODER.EMBED_DIM, m.NUM_CLASSES
    c, ca, g = seg.CHANNELS, seg.AUX_CHANNELS, size // m.ENCODER.PATCH_SIZE
    a0, a1, a2, a3 = (4 * g) ** 2, (2 * g) ** 2, g ** 2, max(g // 2, 1) ** 2
    neck = d * (3 * a1 + a0) + d * a1 + d * a3            # fpn1 (2 convT, BN, GELU), fpn2, fpn4
    ppm = sum(3 * c * s * s for s in seg.POOL_SCALES) + len(seg.POOL_SCALES) * c * a3
    bottleneck = (d + len(seg.POOL_SCALES) * c) * a3 + 3 * c * a3
    laterals = 3 * c * (a0 + a1 + a2) + c * (a0 + a1 + a2)  # 1x1 modules, top-down resized sums
    fpn = 3 * c * (a0 + a1 + a2) + c * (a1 + a2 + a3)       # 3x3 modules, levels resized to a0
    fuse = 4 * c * a0 + 3 * c * a0 + 2 * c * a0 + k * a0    # concat, fpn_bottleneck, dropout, cls
    aux = 3 * ca * a2 + 2 * ca * a2 + k * a2
    logits = 2 * 2 * k * size * size                        # both heads: upsampled + softmax
    return neck + ppm + bottleneck + laterals + fpn + fuse + aux + logits


def estimate(config, amp, level, recompute, counts=None):
    """-> dict of GiB: states, activations, total (per process, at DATA.BATCH_SIZE)."""
    total, trained = counts or parameter_counts(config)
    adam = config.TRAIN.OPTIMIZER.NAME == 'AdamW'
    if amp and level == 'O2':
        states = 2 * total + (2 + 4 + 8) * trained
    else:
        states = (6 if amp else 4) * total + (4 + (8 if adam else 4)) * trained
    value_bytes = 2 if amp else 4
    per_sample = 0
    for depth, l, d, h in block_stacks(config):
        full = 17 * l * d + (0 if amp else h * l * l)
        if config.TRAIN.MODE == 'linearprobe':  # frozen encoder: one block at a time
            per_sample = max(per_sample, full)
        else:
            per_sample += (depth * l * d + full) if recompute else depth * full
    per_sample += dense_head_values(config)
    acts = per_sample * value_bytes * config.DATA.BATCH_SIZE
    return {'states': states / GIB, 'activations': acts / GIB, 'total': (states + acts) / GIB}


def table(names):
    head = ['config', 'batch/GPU', 'params (M)'] + [s[0] for s in SETTINGS]
    rows = []
    for name in names:
        c = config_lib.get_config(os.path.join(ROOT, 'configs', name + '.yaml'))
        counts = parameter_counts(c)
        cells = []
        for _, amp, level, recompute in SETTINGS:
            if level == 'O2' and c.TRAIN.OPTIMIZER.NAME != 'AdamW':
                cells.append('n/a')  # LARS: O2 is refused (no master weights)
            else:
                cells.append(f'{estimate(c, amp, level, recompute, counts)["total"]:.1f}')
        rows.append([name, str(c.DATA.BATCH_SIZE), f'{counts[0] / 1e6:.1f}'] + cells)
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    lines += ['| ' + ' | '.join(r) + ' |' for r in rows]
    return '\n'.join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('-cfg', help='config YAML file')
    p.add_argument('--all', action='store_true', help='table (GiB) for the 11 recipe configs')
    p.add_argument('-opts', nargs='+', action='extend', default=[],
                   help='KEY VALUE pairs overriding the config')
    args = p.parse_args(argv)
    if not args.all and not args.cfg:
        p.error('give -cfg CONFIG or --all')
    try:
        if args.all:
            print('computed GiB per GPU at the recipe batch sizes (tools/memory_estimate.py)')
            print(table(OFFICIAL))
            return
        c = config_lib.merge_opts(config_lib.get_config(args.cfg), args.opts)
        est = estimate(c, c.TRAIN.AMP, c.TRAIN.AMP_LEVEL, c.MODEL.RECOMPUTE)
    except config_lib.ConfigError as e:
        sys.exit(f'memory_estimate.py: {e}')
    total, trained = parameter_counts(c)
    amp = f'AMP {c.TRAIN.AMP_LEVEL} {c.TRAIN.AMP}' if c.TRAIN.AMP else 'fp32'
    print(f'{c.MODEL.NAME} {c.TRAIN.MODE}, batch {c.DATA.BATCH_SIZE} per process, {amp}, '
          f'recompute {c.MODEL.RECOMPUTE}: {total / 1e6:.1f} M parameters '
          f'({trained / 1e6:.1f} M trained)')
    print(f'computed GiB: model states {est["states"]:.2f}, activations '
          f'{est["activations"]:.2f}, total {est["total"]:.2f}')


if __name__ == '__main__':
    main()
