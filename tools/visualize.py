"""MAE reconstructions as one PNG: original | masked | reconstruction | reconstruction + visible,
one row per image; or, for a segmentor, its predictions drawn over the images.

    python tools/visualize.py -cfg configs/vit_large_patch16_224_pretrain.yaml \
        -pretrained mae_visualize_vit_large.pdparams -opts MODEL.NORM_PIX_LOSS False \
        --image photo.jpg --out reconstruction.png

With a segmentation config (or a segmentor's checkpoint, which carries its config) it draws the
predicted classes over each image instead, one row per image, with a legend of the classes
present (the same picture tools/predict.py writes from an exported model):

    python tools/visualize.py -pretrained output/segmentation/best.pdparams \
        --image room.jpg --out segmentation.png

Reconstructions need a checkpoint WITH the decoder: a converted mae_visualize_vit_*.pth
(trained with plain pixel loss: pass MODEL.NORM_PIX_LOSS False) or a latest.pdparams of our
pre-training. With a norm-pix model the prediction of each patch is un-normalised with that
patch's own mean and variance in the original image (the model never predicts them), and the
caption says so.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import runtime  # noqa: E402

if __name__ == '__main__':
    runtime.setup_process()  # first: CPU threads and math-library paths before Paddle loads

import numpy as np  # noqa: E402
import paddle  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

import checkpoint  # noqa: E402
import config as cfgmod  # noqa: E402
import datasets  # noqa: E402
import seg_data  # noqa: E402
import seg_inference  # noqa: E402
import seg_transforms  # noqa: E402
import tasks  # noqa: E402
import transformer  # noqa: E402
import transforms  # noqa: E402
import utils  # noqa: E402

COLUMNS = ('original', 'masked', 'reconstruction', 'reconstruction + visible')


def load_mae(config, weights):
    """The MAE model of a pre-training config with weights that include the decoder."""
    model = tasks.build_model(config)
    if not isinstance(model, transformer.MaskedAutoencoderViT):
        raise utils.UserError('visualize needs a pre-training config (*_pretrain.yaml)')
    state = checkpoint.split_meta(checkpoint.load_file(weights, 'weights'))[0]
    if 'decoder_pred.weight' not in state:
        raise utils.UserError(
            f'{weights} has no decoder (an encoder-only checkpoint such as '
            f'mae_pretrain_vit_*.pth): reconstructions need the decoder. Use a converted '
            f'mae_visualize_vit_*.pth or the latest.pdparams of a pre-training run')
    missing = [k for k in model.state_dict() if k not in state]
    if missing:
        raise utils.UserError(f'{weights} does not fit the model of this config: missing '
                              f'{missing[:5]}{"..." if len(missing) > 5 else ""}')
    try:
        model.set_state_dict(state)
    except Exception as e:
        raise utils.UserError(f'{weights} does not fit the model of this config: {e}') from None
    model.eval()
    return model


@paddle.no_grad()
def reconstruct(model, images, mask_ratio, seed):
    """images (N, 3, H, W) normalised -> dict of (N, 3, H, W) arrays in normalised space."""
    x = paddle.to_tensor(images)
    n, l = x.shape[0], model.patch_embed.num_patches
    noise = paddle.to_tensor(np.random.default_rng(seed).random((n, l), dtype=np.float32))
    _, pred, mask = model(x, mask_ratio=mask_ratio, noise=noise)
    if model.norm_pix_loss:  # back to pixels with each patch's own statistics
        mean, var = model.patch_stats(model.patchify(x))
        pred = pred * paddle.sqrt(var + 1.e-6) + mean
    p = model.patch_embed.patch_size
    pixel_mask = model.unpatchify(mask.unsqueeze(-1).expand([n, l, p * p * 3]))
    recon = model.unpatchify(pred)
    return {'original': x.numpy(), 'masked': (x * (1 - pixel_mask)).numpy(),
            'mask': pixel_mask.numpy(), 'reconstruction': recon.numpy(),
            'reconstruction + visible': (x * (1 - pixel_mask) + recon * pixel_mask).numpy()}


def to_uint8(chw, mean, std):
    img = chw.transpose(1, 2, 0) * np.asarray(std) + np.asarray(mean)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def render(results, config, caption, scale):
    """Grid image: a header row with column names, one row per image, a caption line."""
    mean, std = config.DATA.MEAN, config.DATA.STD
    n = results['original'].shape[0]
    size = config.DATA.IMAGE_SIZE * scale
    pad, header, footer = 4, 16, 16
    width = len(COLUMNS) * (size + pad) + pad
    height = header + n * (size + pad) + pad + footer
    canvas = Image.new('RGB', (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for c, name in enumerate(COLUMNS):
        draw.text((pad + c * (size + pad), 2), name, fill=(0, 0, 0))
        for r in range(n):
            arr = to_uint8(results[name][r], mean, std)
            if name == 'masked':
                arr = np.where(results['mask'][r].transpose(1, 2, 0) > 0, 127, arr)
            tile = Image.fromarray(arr.astype(np.uint8)).resize((size, size), Image.NEAREST)
            canvas.paste(tile, (pad + c * (size + pad), header + pad + r * (size + pad)))
    draw.text((pad, height - footer + 2), caption, fill=(0, 0, 0))
    return canvas


def visualize(config, weights, image_paths, out, seed=0, scale=None):
    model = load_mae(config, weights)
    eval_config = config.clone()
    eval_config.defrost()
    eval_config.DATA.CROP_PCT = 1.0  # whole image: resize the shorter side, centre crop
    transform = transforms.build_transform(False, eval_config)
    images = []
    for path in image_paths:
        try:
            images.append(transform(datasets.load_rgb(path)))
        except Exception as e:
            raise utils.UserError(f'cannot read image {path}: {e}') from None
    ratio = config.MODEL.MASK_RATIO
    results = reconstruct(model, np.stack(images), ratio, seed)
    caption = f'mask ratio {ratio}, seed {seed}'
    if model.norm_pix_loss:
        caption += '; norm-pix model: patches un-normalised with their own mean/std'
    scale = scale or max(1, 224 // config.DATA.IMAGE_SIZE)
    canvas = render(results, config, caption, scale)
    tmp = out + '.tmp.png'
    canvas.save(tmp)
    os.replace(tmp, out)
    return canvas


def visualize_segmentation(config, weights, image_paths, out, scale=None):
    """Each image's predicted classes (sliding windows, as evaluation) over it, with a legend;
    one row per image, saved as out."""
    predict = seg_inference.model_predictor(tasks.load_trained(config, weights), config)
    transform = seg_transforms.build_seg_transform(False, config)
    names = (checkpoint.saved_meta(weights) or {}).get('classes') or seg_data.class_names(config)
    rows = []
    for path in image_paths:
        try:
            image = datasets.load_rgb(path)
        except Exception as e:
            raise utils.UserError(f'cannot read image {path}: {e}') from None
        pred = seg_inference.image_label_map(predict, image, config, transform)
        zoom = scale or max(1, 256 // max(image.size))
        rows.append(seg_data.overlay(image, pred, names, scale=zoom))
    pad = 4
    canvas = Image.new('RGB', (max(r.width for r in rows) + 2 * pad,
                               sum(r.height + pad for r in rows) + pad), (255, 255, 255))
    y = pad
    for r in rows:
        canvas.paste(r, (pad, y))
        y += r.height + pad
    tmp = out + '.tmp.png'
    canvas.save(tmp)
    os.replace(tmp, out)
    return canvas


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('-cfg', help='pre-training or segmentation config of the model (optional for '
                   'a checkpoint of this project: it carries its own)')
    p.add_argument('-pretrained', required=True,
                   help='.pdparams with the decoder, or a segmentor')
    p.add_argument('--image', action='append', required=True, help='image file (repeatable)')
    p.add_argument('--out', required=True, help='output PNG')
    p.add_argument('--seed', type=int, default=0, help='seed of the random mask')
    p.add_argument('--scale', type=int, default=0, help='pixel zoom (default: to ~224 px)')
    p.add_argument('-opts', nargs='+', action='extend', default=[])
    args = p.parse_args()
    folder = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(folder):
        raise utils.UserError(f'--out {args.out}: the folder {folder} does not exist')
    config = checkpoint.config_for(args.cfg, args.pretrained,
                                   lambda c: cfgmod.merge_opts(c, args.opts))
    cfgmod.check_values(config)
    paddle.set_device('cpu')
    if isinstance(tasks.get_task(config), tasks.Segmentation):
        canvas = visualize_segmentation(config, args.pretrained, args.image, args.out,
                                        args.scale)
    else:
        canvas = visualize(config, args.pretrained, args.image, args.out, args.seed, args.scale)
    print(f'wrote {args.out} ({canvas.size[0]}x{canvas.size[1]}, {len(args.image)} image(s))')


if __name__ == '__main__':
    utils.run_main(main)
