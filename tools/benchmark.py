"""Throughput benchmarks; each prints `img/s: X` as its last line.

    python tools/benchmark.py --data -cfg configs/vit_base_patch16_224_finetune.yaml [--images N]
        [--data-path DIR] [--eval-transform]
    times the data pipeline in ONE process: reading + decoding a JPEG (datasets.load_rgb) and
    the training transform of the config (build_transform(True, config)), image by image. With
    no --data-path it writes ImageNet-size JPEGs (500x375 and 375x500, quality 90) cut from the
    sample photographs of scikit-image when that is installed, else smooth synthetic images.
    A training process with DATA.NUM_WORKERS workers gets at most about NUM_WORKERS times this.

Model-step timing (-cfg FILE --batch-size N --steps K, DESIGN.md 3.3) is a later addition:
one more bench_* function beside bench_data and a branch in main().
"""
import argparse
import glob
import importlib.util
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

import config as config_lib  # noqa: E402
import datasets  # noqa: E402

JPEG_SIZES = [(500, 375), (375, 500), (500, 333)]  # typical ImageNet shapes
PHOTOS = ['astronaut.png', 'chelsea.png', 'coffee.png', 'rocket.jpg', 'motorcycle_left.png',
          'motorcycle_right.png']


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('-cfg', required=True, help='config YAML file')
    p.add_argument('--batch-size', type=int, default=None,
                   help='model step timing: images per step (default DATA.BATCH_SIZE)')
    p.add_argument('--steps', type=int, default=20, help='model step timing: timed steps')
    p.add_argument('--data', action='store_true',
                   help='time JPEG decoding + the training transform in one process')
    p.add_argument('--images', type=int, default=400, help='--data: images timed')
    p.add_argument('--data-path', default=None,
                   help='--data: folder whose JPEG/PNG files are timed (default: generated)')
    p.add_argument('--eval-transform', action='store_true',
                   help='--data: time the evaluation transform instead of the training one')
    p.add_argument('-opts', nargs='+', default=[], help='KEY VALUE pairs overriding the config')
    return p.parse_args(argv)


def photo_sources():
    """Real photographs shipped in scikit-image's wheel (found, not imported), or []."""
    spec = importlib.util.find_spec('skimage')
    if spec is None or not spec.submodule_search_locations:
        return []
    folder = os.path.join(list(spec.submodule_search_locations)[0], 'data')
    return [p for p in (os.path.join(folder, n) for n in PHOTOS) if os.path.isfile(p)]


def synthetic_photo(rng, w, h):
    """Smooth random colour field with some texture: JPEG-decodes about like a photograph."""
    small = rng.integers(0, 256, (h // 25 + 2, w // 25 + 2, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((w, h), Image.BICUBIC)
    grain = rng.normal(0, 12, (h, w, 3))
    return Image.fromarray(np.clip(np.asarray(img) + grain, 0, 255).astype(np.uint8))


def write_jpegs(folder, count=48, seed=0):
    """`count` ImageNet-size JPEGs in folder; returns (paths, description of the source)."""
    rng = np.random.default_rng(seed)
    sources = photo_sources()
    paths = []
    for i in range(count):
        w, h = JPEG_SIZES[i % len(JPEG_SIZES)]
        if sources:
            src = Image.open(sources[i % len(sources)]).convert('RGB')
            scale = max(w / src.width, h / src.height) * rng.uniform(1.0, 1.6)
            src = src.resize((max(w, round(src.width * scale)), max(h, round(src.height * scale))),
                             Image.BICUBIC)
            x, y = rng.integers(0, src.width - w + 1), rng.integers(0, src.height - h + 1)
            img = src.crop((x, y, x + w, y + h))
        else:
            img = synthetic_photo(rng, w, h)
        paths.append(os.path.join(folder, f'{i:03d}.jpg'))
        img.save(paths[-1], 'JPEG', quality=90)
    what = (f'{len(sources)} scikit-image photographs' if sources
            else 'synthetic images (scikit-image not installed)')
    sizes = '/'.join(f'{w}x{h}' for w, h in JPEG_SIZES)
    return paths, f'{count} generated JPEGs of {sizes} from {what}'


def bench_data(config, args):
    """Images per second of load_rgb + the configured transform, one process. -> float"""
    transform = datasets.build_transform(not args.eval_transform, config)
    with tempfile.TemporaryDirectory() as tmp:
        if args.data_path:
            paths = sorted(p for p in glob.glob(os.path.join(args.data_path, '**', '*'),
                                                recursive=True)
                           if p.lower().endswith(datasets.IMG_EXTENSIONS))
            if not paths:
                raise datasets.DataError(f'no image files under {args.data_path}')
            source = f'{len(paths)} images under {args.data_path}'
        else:
            paths, source = write_jpegs(tmp)
        datasets.seed_augmentation(config.SEED, 0, 0, 0)
        for p in paths[:10]:  # warm-up: file cache, lazy imports
            transform(datasets.load_rgb(p))
        decode = 0.0
        start = time.perf_counter()
        for i in range(args.images):
            t0 = time.perf_counter()
            img = datasets.load_rgb(paths[i % len(paths)])
            decode += time.perf_counter() - t0
            out = transform(img)
        elapsed = time.perf_counter() - start
    kind = 'eval' if args.eval_transform else f'train ({config.TRAIN.MODE})'
    print(f'data: {source}')
    print(f'data: {kind} transform -> {tuple(out.shape)} {out.dtype}; {args.images} images, '
          f'{1000 * elapsed / args.images:.2f} ms each, of which decoding '
          f'{1000 * decode / args.images:.2f} ms')
    return args.images / elapsed


def main(argv=None):
    args = parse_args(argv)
    try:
        config = config_lib.merge_opts(config_lib.get_config(args.cfg), args.opts)
        if not args.data:
            sys.exit('benchmark.py: only --data (data-pipeline throughput) exists so far; '
                     'model step timing with --batch-size/--steps is not implemented yet')
        rate = bench_data(config, args)
    except (config_lib.ConfigError, datasets.DataError) as e:
        sys.exit(f'benchmark.py: {e}')
    print(f'img/s: {rate:.1f}')


if __name__ == '__main__':
    main()
