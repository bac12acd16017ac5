"""Generate the built-in demo image set: small pictures of 10 kinds of shapes and textures, with
train_list.txt / val_list.txt in the layout the entry scripts read. Deterministic (same
arguments -> same bytes), no download.

    python tools/make_demo_dataset.py --out data/demo
    python main_multi_gpu_pretrain.py -cfg configs/tiny_pretrain.yaml -data_path data/demo ...

Each class is a kind of pattern (circle, square, triangle, ...); colours, sizes, positions,
orientations and the noisy background are random, so the class is the shape, not a colour.
"""
import argparse
import json
import math
import os
import sys

import numpy as np
from PIL import Image, ImageDraw

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
    """Write out/{train,val}/<class>/NNNNN.png and the two list files; skip when out already
    holds a set made with the same arguments. Returns the number of images."""
    params = {'classes': list(CLASSES), 'train_per_class': train_per_class,
              'val_per_class': val_per_class, 'size': size, 'seed': seed}
    stamp = os.path.join(out, 'demo_dataset.json')
    total = len(CLASSES) * (train_per_class + val_per_class)
    if os.path.exists(stamp):
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
    with open(stamp, 'w') as f:
        json.dump(params, f)
    log(f'demo data set written to {out}: {total} images of {len(CLASSES)} classes '
        f'({train_per_class} train + {val_per_class} val each, {size}x{size} px)')
    return total


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--out', default='data/demo')
    p.add_argument('--train-per-class', type=int, default=300)
    p.add_argument('--val-per-class', type=int, default=60)
    p.add_argument('--size', type=int, default=40, help='image side in pixels')
    p.add_argument('--seed', type=int, default=0)
    a = p.parse_args(argv)
    if min(a.train_per_class, a.val_per_class, a.size) < 1 or a.size < 8:
        print('error: counts must be >= 1 and --size >= 8', file=sys.stderr)
        return 2
    make(a.out, a.train_per_class, a.val_per_class, a.size, a.seed)
    return 0


if __name__ == '__main__':
    sys.exit(main())
