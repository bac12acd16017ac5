"""Generate the built-in demo image set: small pictures of 10 kinds of shapes and textures, with
train_list.txt / val_list.txt in the layout the entry scripts read. Deterministic (same
arguments -> same bytes), no download.

    python tools/make_demo_dataset.py --out data/demo
    python main_multi_gpu_pretrain.py -cfg configs/tiny_pretrain.yaml -data_path data/demo ...

Each class is a kind of pattern (circle, square, triangle, ...); colours, sizes, positions,
orientations and the noisy background are random, so the class is the shape, not a colour.

With --segmentation it writes a semantic segmentation set in ADE20K's layout instead
(images/{training,validation}/*.jpg, annotations/{training,validation}/*.png, class_names.txt):

    python tools/make_demo_dataset.py --segmentation --out data/demo_seg
    python main_multi_gpu_segmentation.py -cfg configs/tiny_segmentation.yaml \
        -data_path data/demo_seg -opts DATA.REDUCE_ZERO_LABEL True MODEL.NUM_CLASSES 5
"""
import argparse
import json
import math
import os
import sys

import numpy as np
from PIL import Image, ImageDraw

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
import classnames  # noqa: E402

CLASSES = ('circle', 'square', 'triangle', 'cross', 'ring', 'hstripes', 'vstripes',
           'checker', 'diagonal', 'dots')


def _colours(rng):
    """Two colours far enough apart to be told apart."""
    while True:
        a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        if np.abs(a.astype(int) - b.astype(int)).sum() > 200:
            return tuple(int(v) for v in a), tuple(int(v) for v in b)


def _background(rng, size, colour):
    """Colour plus smooth low-frequency noise (so no two backgrounds are alike)."""
    coarse = rng.normal(0, 25, (4, 4, 3))
    noise = np.asarray(Image.fromarray(((coarse - coarse.min()) / (np.ptp(coarse) + 1e-9) * 255)
                                       .astype(np.uint8)).resize((size, size), Image.BICUBIC),
                       dtype=np.float32) / 255.0 * 50 - 25
    img = np.clip(np.array(colour, np.float32)[None, None] + noise, 0, 255)
    return Image.fromarray(img.astype(np.uint8))


def _rotate_points(points, centre, angle):
    cx, cy = centre
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + (x - cx) * c - (y - cy) * s, cy + (x - cx) * s + (y - cy) * c)
            for x, y in points]


def draw(kind, rng, size):
    """One size x size RGB picture of the given kind."""
    bg, fg = _colours(rng)
    img = _background(rng, size, bg)
    d = ImageDraw.Draw(img)
    r = rng.uniform(0.22, 0.38) * size
    cx, cy = rng.uniform(r + 1, size - r - 1, 2)
    angle = rng.uniform(0, 2 * math.pi)
    box = [cx - r, cy - r, cx + r, cy + r]
    if kind == 'circle':
        d.ellipse(box, fill=fg)
    elif kind == 'ring':
        d.ellipse(box, outline=fg, width=max(2, int(r / 3)))
    elif kind == 'square':
        pts = [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
        d.polygon(_rotate_points(pts, (cx, cy), angle), fill=fg)
    elif kind == 'triangle':
        pts = [(cx + r * math.cos(angle + k * 2 * math.pi / 3),
                cy + r * math.sin(angle + k * 2 * math.pi / 3)) for k in range(3)]
        d.polygon(pts, fill=fg)
    elif kind == 'cross':
        w = max(2, int(r / 2.5))
        for a in (angle, angle + math.pi / 2):
            d.line([(cx - r * math.cos(a), cy - r * math.sin(a)),
                    (cx + r * math.cos(a), cy + r * math.sin(a))], fill=fg, width=w)
    elif kind in ('hstripes', 'vstripes', 'diagonal'):
        period = rng.uniform(5, 9)
        width = max(1, int(period / 2))
        offset = rng.uniform(0, period)
        for k in range(-2 * size, 2 * size):
            p = offset + k * period
            if kind == 'hstripes':
                d.line([(0, p), (size, p)], fill=fg, width=width)
            elif kind == 'vstripes':
                d.line([(p, 0), (p, size)], fill=fg, width=width)
            else:
                d.line([(p, 0), (p + size, size)], fill=fg, width=width)
    elif kind == 'checker':
        cell = int(rng.integers(4, 8))
        ox, oy = rng.integers(0, cell, 2)
        for i in range(-1, size // cell + 2):
            for j in range(-1, size // cell + 2):
                if (i + j) % 2 == 0:
                    x, y = ox + i * cell, oy + j * cell
                    d.rectangle([x, y, x + cell - 1, y + cell - 1], fill=fg)
    elif kind == 'dots':
        for _ in range(int(rng.integers(6, 12))):
            x, y = rng.uniform(2, size - 2, 2)
            s = rng.uniform(1.5, 3.0)
            d.ellipse([x - s, y - s, x + s, y + s], fill=fg)
    else:
        raise ValueError(kind)
    return img


def make(out, train_per_class=300, val_per_class=60, size=40, seed=0, log=print):
    """Write out/{train,val}/<class>/NNNNN.png, the two list files and classes.txt (the
    lists' labels are CLASSES' order; class folders sort by name, and -eval against a
    checkpoint relabels them by name, so both layouts mean one map); skip when out already
    holds a set made with the same arguments. Returns the number of images."""
    params = {'classes': list(CLASSES), 'train_per_class': train_per_class,
              'val_per_class': val_per_class, 'size': size, 'seed': seed}
    stamp = os.path.join(out, 'demo_dataset.json')
    total = len(CLASSES) * (train_per_class + val_per_class)
    if os.path.exists(stamp) and os.path.exists(os.path.join(out, classnames.CLASSES_FILE)):
        with open(stamp) as f:
            if json.load(f) == params:
                log(f'demo data set already in {out} ({total} images)')
                return total
    for split, count, split_id in (('train', train_per_class, 0), ('val', val_per_class, 1)):
        lines = []
        for label, kind in enumerate(CLASSES):
            os.makedirs(os.path.join(out, split, kind), exist_ok=True)
            for i in range(count):
                rng = np.random.default_rng([seed, split_id, label, i])
                rel = f'{split}/{kind}/{i:05d}.png'
                draw(kind, rng, size).save(os.path.join(out, rel))
                lines.append(f'{rel} {label}\n')
        tmp = os.path.join(out, f'{split}_list.txt.tmp')
        with open(tmp, 'w') as f:
            f.writelines(lines)
        os.replace(tmp, os.path.join(out, f'{split}_list.txt'))
    classnames.write_classes(os.path.join(out, classnames.CLASSES_FILE), CLASSES)
    with open(stamp, 'w') as f:
        json.dump(params, f)
    log(f'demo data set written to {out}: {total} images of {len(CLASSES)} classes '
        f'({train_per_class} train + {val_per_class} val each, {size}x{size} px)')
    return total


# ------------------------------------------------------------------ segmentation demo set
# Pictures of a few shapes on a textured background, with their per-pixel annotation written
# the way ADE20K's are: 0 = unlabelled (here a band along every border between two regions, as
# ADE's 'other' tends to outline objects; it also hides the JPEG ringing at the edges), 1 = the
# background, 2.. = the shapes. With DATA.REDUCE_ZERO_LABEL (0 -> ignored, v -> v - 1) the
# classes are SEG_CLASSES in this order, the lines of class_names.txt.

# The classes are textures, each filling shapes of any form (circle, square, triangle,
# rectangle) in random colours: telling them apart takes a few pixels around each pixel, which
# a tiny encoder on 4-pixel patches learns in minutes, and the quickstart's pre-training images
# hold the same kinds of texture.
SEG_CLASSES = ('background', 'stripes', 'checker', 'dots', 'solid')
SEG_TEXTURES = SEG_CLASSES[1:]
SEG_FORMS = ('circle', 'square', 'triangle', 'rectangle')
SEG_SIZES = ((64, 48), (80, 64), (96, 72), (48, 64), (72, 96), (64, 64))  # (width, height)
SEG_JPEG_QUALITY = 90


def _texture(rng, width, height, colour):
    """colour + smooth low-frequency shading + fine grain: a background no model can learn by
    its colour or flatness alone."""
    coarse = rng.normal(0, 1, (3, 4, 3))
    coarse = ((coarse - coarse.min()) / (np.ptp(coarse) + 1e-9) * 255).astype(np.uint8)
    shade = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC),
                       dtype=np.float32) / 255.0 * 60 - 30
    grain = rng.normal(0, 8, (height, width, 3))
    img = np.clip(np.array(colour, np.float32)[None, None] + shade + grain, 0, 255)
    return Image.fromarray(img.astype(np.uint8))


def _shape_mask(form, rng, width, height):
    """'L' mask (255 inside) of one shape of the given form at a random place and size."""
    mask = Image.new('L', (width, height), 0)
    d = ImageDraw.Draw(mask)
    r = rng.uniform(0.18, 0.34) * min(width, height)
    cx, cy = rng.uniform(r * 0.6, width - r * 0.6), rng.uniform(r * 0.6, height - r * 0.6)
    angle = rng.uniform(0, 2 * math.pi)
    if form == 'circle':
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif form == 'square':
        pts = [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
        d.polygon(_rotate_points(pts, (cx, cy), angle), fill=255)
    elif form == 'triangle':
        d.polygon([(cx + 1.2 * r * math.cos(angle + k * 2 * math.pi / 3),
                    cy + 1.2 * r * math.sin(angle + k * 2 * math.pi / 3)) for k in range(3)],
                  fill=255)
    elif form == 'rectangle':
        w, h = r * rng.uniform(1.4, 2.4), r * rng.uniform(1.4, 2.4)
        d.rectangle([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], fill=255)
    else:
        raise ValueError(form)
    return mask


def _fill(kind, rng, width, height, colour_a, colour_b):
    """A full-size picture of one texture class in two colours (solid: the first only)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    if kind == 'stripes':  # bands at a random angle and period
        period, angle = rng.uniform(4, 7), rng.uniform(0, math.pi)
        on = (np.floor((x * math.cos(angle) + y * math.sin(angle)) / period) % 2).astype(bool)
    elif kind == 'checker':  # axis-aligned cells of 3-5 px
        cell = rng.uniform(3, 5)
        ox, oy = rng.uniform(0, cell, 2)
        on = ((np.floor((x + ox) / cell) + np.floor((y + oy) / cell)) % 2).astype(bool)
    elif kind == 'dots':  # a jittered grid of round dots every 5-7 px
        step = rng.uniform(5, 7)
        gx, gy = (x + rng.uniform(0, step)) % step, (y + rng.uniform(0, step)) % step
        on = (gx - step / 2) ** 2 + (gy - step / 2) ** 2 <= (step * rng.uniform(0.25, 0.35)) ** 2
    elif kind == 'solid':
        on = np.ones((height, width), bool)
    else:
        raise ValueError(kind)
    img = np.where(on[..., None], np.array(colour_a, np.uint8), np.array(colour_b, np.uint8))
    return Image.fromarray(img.astype(np.uint8))


def _far_colour(rng, away_from):
    """A colour at L1 distance > 200 from each colour in away_from."""
    while True:
        c = rng.integers(0, 256, 3)
        if all(np.abs(c - np.array(a)).sum() > 200 for a in away_from):
            return tuple(int(v) for v in c)


def draw_segmentation(rng, width, height):
    """One (RGB picture, 'L' annotation) pair: 2-4 textured shapes, later ones over earlier
    ones."""
    background = tuple(int(v) for v in rng.integers(0, 256, 3))
    img = _texture(rng, width, height, background)
    labels = np.ones((height, width), np.uint8)  # 1 = background
    for _ in range(int(rng.integers(2, 5))):
        k = int(rng.integers(len(SEG_TEXTURES)))
        form = SEG_FORMS[int(rng.integers(len(SEG_FORMS)))]
        mask = _shape_mask(form, rng, width, height)
        colour = _far_colour(rng, [background])
        layer = _fill(SEG_TEXTURES[k], rng, width, height, colour, _far_colour(rng, [colour]))
        img = Image.composite(layer, img, mask)
        labels[np.asarray(mask) > 127] = 2 + k
    # unlabelled band: every pixel with a 4-neighbour of another label (both sides of a border)
    border = np.zeros_like(labels, bool)
    border[1:] |= labels[1:] != labels[:-1]
    border[:-1] |= labels[:-1] != labels[1:]
    border[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    border[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    labels[border] = 0
    return img, Image.fromarray(labels, 'L')


def make_segmentation(out, train_count=400, val_count=100, seed=0, log=print):
    """Write the segmentation demo set (ADE20K layout) into out; skip when out already holds
    one made with the same arguments. Returns the number of images."""
    params = {'classes': list(SEG_CLASSES), 'train_count': train_count,
              'val_count': val_count, 'seed': seed, 'sizes': [list(s) for s in SEG_SIZES],
              'jpeg_quality': SEG_JPEG_QUALITY}
    stamp = os.path.join(out, 'demo_segmentation.json')
    total = train_count + val_count
    if os.path.exists(stamp):
        with open(stamp) as f:
            if json.load(f) == params:
                log(f'segmentation demo set already in {out} ({total} images)')
                _print_usage(out, log)
                return total
    for split, count, split_id in (('training', train_count, 0), ('validation', val_count, 1)):
        for sub in ('images', 'annotations'):
            os.makedirs(os.path.join(out, sub, split), exist_ok=True)
        for i in range(count):
            rng = np.random.default_rng([seed, 1000 + split_id, i])  # not the class set's
            width, height = SEG_SIZES[int(rng.integers(len(SEG_SIZES)))]
            img, ann = draw_segmentation(rng, width, height)
            name = f'demo_{split}_{i:05d}'
            img.save(os.path.join(out, 'images', split, name + '.jpg'), 'JPEG',
                     quality=SEG_JPEG_QUALITY)
            ann.save(os.path.join(out, 'annotations', split, name + '.png'))
    with open(os.path.join(out, 'class_names.txt'), 'w') as f:
        f.write(''.join(name + '\n' for name in SEG_CLASSES))
    with open(stamp, 'w') as f:
        json.dump(params, f)
    log(f'segmentation demo set written to {out}: {train_count} training + {val_count} '
        f'validation images ({", ".join(f"{w}x{h}" for w, h in SEG_SIZES)} px), '
        f'images/{{training,validation}}/*.jpg with annotations/{{training,validation}}/*.png '
        f'(0 = unlabelled border band, 1 = {SEG_CLASSES[0]}, 2.. = textures), class_names.txt: '
        f'{", ".join(SEG_CLASSES)}')
    _print_usage(out, log)
    return total


def _print_usage(out, log):
    log(f'use it with: -data_path {out} -opts DATA.REDUCE_ZERO_LABEL True MODEL.NUM_CLASSES '
        f'{len(SEG_CLASSES)} (e.g. python main_multi_gpu_segmentation.py -cfg '
        f'configs/tiny_segmentation.yaml -data_path {out} -opts DATA.REDUCE_ZERO_LABEL True '
        f'MODEL.NUM_CLASSES {len(SEG_CLASSES)})')


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--out', default=None,
                   help='output folder (default data/demo; data/demo_seg with --segmentation)')
    p.add_argument('--train-per-class', type=int, default=300)
    p.add_argument('--val-per-class', type=int, default=60)
    p.add_argument('--size', type=int, default=40, help='image side in pixels')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--segmentation', action='store_true',
                   help='write the semantic segmentation demo set (ADE20K layout) instead')
    p.add_argument('--train-count', type=int, default=400,
                   help='--segmentation: training images')
    p.add_argument('--val-count', type=int, default=100,
                   help='--segmentation: validation images')
    a = p.parse_args(argv)
    if a.segmentation:
        if min(a.train_count, a.val_count) < 1:
            print('error: --train-count and --val-count must be >= 1', file=sys.stderr)
            return 2
        make_segmentation(a.out or 'data/demo_seg', a.train_count, a.val_count, a.seed)
        return 0
    if min(a.train_per_class, a.val_per_class, a.size) < 1 or a.size < 8:
        print('error: counts must be >= 1 and --size >= 8', file=sys.stderr)
        return 2
    make(a.out or 'data/demo', a.train_per_class, a.val_per_class, a.size, a.seed)
    return 0


if __name__ == '__main__':
    sys.exit(main())
