"""Throughput benchmarks; each prints `img/s: X` as its last line.

    python tools/benchmark.py --data -cfg configs/vit_base_patch16_224_finetune.yaml [--images N]
        [--data-path DIR] [--eval-transform]
    times the data pipeline in ONE process: reading + decoding a JPEG (datasets.load_rgb) and
    the training transform of the config (build_transform(True, config)), image by image. With
    no --data-path it writes ImageNet-size JPEGs (500x375 and 375x500, quality 90) cut from the
    sample photographs of scikit-image when that is installed, else smooth synthetic images.
    A training process with DATA.NUM_WORKERS workers gets at most about NUM_WORKERS times this.

    python tools/benchmark.py --data --shards -cfg configs/vit_base_patch16_224_finetune.yaml
        [--images N] [--data-path DIR]
    the same images through the training loader (reading + decoding + the training transform
    + batching, DATA.BATCH_SIZE 16) from a list file, from local tar shards (seeked) and from
    the same shards streamed (pipe:cat), each with the work in this process (NUM_WORKERS 0)
    and in 1 and 2 worker processes; prints images/s of each and the ratios shards / list
    file (one process) and 2 workers / 1 worker. Each pass is timed from its first batch on
    (worker start-up left out); one untimed pass warms the file cache, then --rounds passes
    of every kind in turn, the median reported. Shards of 100 images.

    python tools/benchmark.py -cfg configs/vit_base_patch16_224_pretrain.yaml --batch-size 8 --steps 4
    times K full training steps (forward, backward, optimizer) of the configured model on
    synthetic input after 2 warm-up steps: the task's training loss (tasks.py: the MAE loss for
    a pre-training config, the classifier's criterion, the segmentor's pixel cross-entropy on
    random label maps), with the config's optimizer.
    Threads, MKL code path and malloc settings are set up as in the entry points
    (runtime.setup_process).

    python tools/benchmark.py -cfg configs/vit_base_patch16_224_finetune.yaml --eval
        [--batch-size 64] [--steps 4]
    times the forward pass of -eval instead (the classifier in eval mode, no gradients, AMP
    as TRAIN.AMP on GPU), on synthetic images: with --data --eval-transform, what evaluating a
    data set takes (README: ImageNet val).

    ... --reference torch
    the same measurement of the PyTorch reference: with --data, timm's create_transform for the
    config's recipe and timm's loader (PIL open + convert); otherwise the same step in PyTorch,
    as a user runs it (torch's default threads, no environment
    changes): HF transformers' ViTMAEForPreTraining for pre-training configs, timm's
    VisionTransformer (global pool) for fine-tuning ones; AdamW with the config's betas. Needs
    requirements-test.txt.
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # (sibling tools)

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

import benchmark_reference as reference  # noqa: E402  (no Paddle in it)
import config as config_lib  # noqa: E402
import runtime  # noqa: E402

JPEG_SIZES = [(500, 375), (375, 500), (500, 333)]  # typical ImageNet shapes
PHOTOS = ['astronaut.png', 'chelsea.png', 'coffee.png', 'rocket.jpg', 'motorcycle_left.png',
          'motorcycle_right.png']


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
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
    p.add_argument('--shards', action='store_true',
                   help='--data: list file vs tar shards (seeked, streamed) through the '
                        'training loader, 0 / 1 / 2 workers')
    p.add_argument('--rounds', type=int, default=3,
                   help='--data --shards: timed passes of each kind (the median is reported)')
    p.add_argument('--eval-transform', action='store_true',
                   help='--data: time the evaluation transform instead of the training one')
    p.add_argument('--eval', action='store_true',
                   help='model timing: the forward pass of -eval (no gradients) instead of a '
                        'training step')
    p.add_argument('--reference', choices=['torch'], default=None,
                   help='model step timing of the PyTorch reference instead of this code')
    p.add_argument('-opts', nargs='+', action='extend', default=[],
                   help='KEY VALUE pairs overriding the config')
    return p.parse_args(argv)


if __name__ == '__main__':
    _args = parse_args()
    if _args.reference == 'torch' and not _args.data:  # the reference's step as users run it,
        reference.run(_args, reference.bench_torch_reference)  # Paddle never loaded
        sys.exit()
    runtime.setup_process()  # as the entry points: threads, MKL path, malloc, before Paddle

import datasets  # noqa: E402
import make_shards  # noqa: E402
import optim  # noqa: E402
import paddle  # noqa: E402
import shards  # noqa: E402
import tasks  # noqa: E402
import utils  # noqa: E402


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


def timed_images(args, tmp, count=None):
    """-> (image paths, description): the files under --data-path (the first `count`), else
    JPEGs written to tmp (write_jpegs; `count` of them, or its default)."""
    if not args.data_path:
        return write_jpegs(tmp) if count is None else write_jpegs(tmp, count=count)
    paths = sorted(p for p in glob.glob(os.path.join(args.data_path, '**', '*'), recursive=True)
                   if p.lower().endswith(datasets.IMG_EXTENSIONS))[:count]
    if not paths:
        raise datasets.DataError(f'no image files under {args.data_path}')
    return paths, f'{len(paths)} images under {args.data_path}'


def bench_data(config, args):
    """Images per second of decoding + the training transform, one process: this project's
    (datasets.load_rgb + the task's build_transform) or, with --reference torch, timm's. -> float"""
    if args.reference == 'torch':
        import random
        import torch
        transform, load = reference.timm_train_transform(config)
        kind = 'timm create_transform'
        random.seed(config.SEED)
        torch.manual_seed(config.SEED)
    else:
        transform = tasks.get_task(config).build_transform(not args.eval_transform)
        load = datasets.load_rgb
        kind = 'eval' if args.eval_transform else f'train ({config.TRAIN.MODE})'
        utils.seed_everything(config.SEED, 0, 0, 0, include_paddle=False)
    with tempfile.TemporaryDirectory() as tmp:
        paths, source = timed_images(args, tmp)
        for p in paths[:10]:  # warm-up: file cache, lazy imports
            transform(load(p))
        decode = 0.0
        start = time.perf_counter()
        for i in range(args.images):
            t0 = time.perf_counter()
            img = load(paths[i % len(paths)])
            decode += time.perf_counter() - t0
            out = transform(img)
        elapsed = time.perf_counter() - start
    print(f'data: {source}')
    print(f'data: {kind} transform -> {tuple(out.shape)} {out.dtype}; {args.images} images, '
          f'{1000 * elapsed / args.images:.2f} ms each, of which decoding '
          f'{1000 * decode / args.images:.2f} ms')
    return args.images / elapsed


def bench_sources(config, args):
    """--data --shards: images per second of one training epoch over the same images from a
    list file, seeked shards and streamed shards, with 0 / 1 / 2 loader workers. -> the seeked
    shards' rate in one process."""
    with tempfile.TemporaryDirectory() as tmp:
        paths, source = timed_images(args, tmp, count=args.images)
        with open(os.path.join(tmp, 'train_list.txt'), 'w') as f:
            f.writelines(f'{os.path.abspath(p)} {i % 10}\n' for i, p in enumerate(paths))
        samples, _ = make_shards.read_source(tmp, 'train')
        written, _ = make_shards.make_shards(samples, os.path.join(tmp, 'shards'), 'train',
                                             samples_per_shard=100, log=lambda m: None)
        pattern = make_shards.pattern_of(written, tmp)
        kinds = {'list file': '', 'shards (seek)': pattern,
                 'shards (pipe:cat)': 'pipe:cat ' + os.path.join(tmp, pattern)}
        loaders = {}
        for kind, shard_pattern in kinds.items():
            for workers in (0, 1, 2):
                cfg = config.clone()
                cfg.defrost()
                cfg.DATA.DATA_PATH, cfg.DATA.TRAIN_SHARDS = tmp, shard_pattern
                cfg.DATA.NUM_WORKERS, cfg.DATA.BATCH_SIZE = workers, 16
                cfg.MODEL.NUM_CLASSES, cfg.TRAIN.ITERS_PER_EPOCH = 10, 0
                loaders[kind, workers] = datasets.build_loader(
                    cfg, tasks.get_task(cfg).build_dataset(True), True, num_replicas=1, rank=0)
        rates = {key: [] for key in loaders}
        for epoch in range(args.rounds + 1):  # epoch 0: warm-up; rounds interleave the kinds
            for key, loader in loaders.items():  # so that all see the machine's drift alike
                loader.set_epoch(epoch)
                count, start = 0, None
                for batch in loader:
                    if start is None:
                        start = time.perf_counter()
                    else:
                        count += len(batch[2])
                if epoch:
                    rates[key].append(count / (time.perf_counter() - start))
        rates = {key: float(np.median(r)) for key, r in rates.items()}
        # reading alone (no decoding): where the kinds differ
        seekable = shards.ShardDataset(shards.expand(pattern, tmp))
        reads = {'list file': lambda: [open(p, 'rb').read() for p in paths],
                 'shards (seek)': lambda: [seekable.read_bytes(i) for i in range(len(seekable))],
                 'shards (pipe:cat)': lambda: [x for src in shards.expand(kinds['shards '
                                                                               '(pipe:cat)'])
                                               for x in shards.stream_samples(src)]}
        for kind, read in reads.items():
            times = []
            for _ in range(args.rounds):
                start = time.perf_counter()
                read()
                times.append(time.perf_counter() - start)
            print(f'data: {kind:18s} bytes only: {len(paths) / np.median(times):9.0f} img/s')
        for (kind, workers), rate in rates.items():
            print(f'data: {kind:18s} {workers} worker(s): {rate:7.1f} img/s (median of '
                  f'{args.rounds})')
    print(f'data: {source}; training transform ({config.TRAIN.MODE}) -> '
          f'{tuple(batch[0].shape[1:])}, batch 16')
    for kind in list(kinds)[1:]:
        print(f'ratio: {kind} / list file, one process: '
              f'{rates[kind, 0] / rates["list file", 0]:.2f}x')
    for kind in kinds:
        print(f'ratio: {kind}, 2 workers / 1 worker: {rates[kind, 2] / rates[kind, 1]:.2f}x')
    return rates['shards (seek)', 0]


def bench_model(config, args):
    """Images per second of full training steps of this project's model: the task's loss
    (tasks.py) on synthetic images, backward, optimizer step. -> float"""
    batch = args.batch_size or config.DATA.BATCH_SIZE
    paddle.seed(config.SEED)
    task = tasks.get_task(config)
    model = task.build_model()
    model.train()
    opt = optim.build_optimizer(model, config, 1)
    size = config.DATA.IMAGE_SIZE
    data = task.synthetic_batch(batch)  # (label maps for segmentation)
    if args.eval:
        return bench_eval(config, task, model, data[0], args)

    def step():
        loss = task.loss(model, data, 0)['loss']
        loss.backward()
        opt.step()
        opt.clear_grad()
        float(loss)
    print(f'model: paddle {paddle.__version__}, {os.environ.get("OMP_NUM_THREADS")} threads, '
          f'{config.MODEL.NAME} ({task.mode}), {size}px')
    return reference.timed(step, batch, args.steps)


def bench_eval(config, task, model, images, args):
    """Images per second of -eval's forward pass (engine.evaluate_only: eval mode, no
    gradients, autocast as TRAIN.AMP) on synthetic images. -> float"""
    if task.best_metric is None:
        raise config_lib.ConfigError(f'--eval times an evaluating task; TRAIN.MODE '
                                     f'{task.mode!r} does not evaluate')
    model.eval()

    def step():
        with paddle.no_grad(), utils.amp_context(config):
            float(model(images).sum())
    print(f'eval: paddle {paddle.__version__}, {os.environ.get("OMP_NUM_THREADS")} threads, '
          f'{config.MODEL.NAME} ({task.mode}), {config.DATA.IMAGE_SIZE}px, batch '
          f'{images.shape[0]}')
    return reference.timed(step, images.shape[0], args.steps)


def measure(config, args):
    """The measurement the flags ask for -> img/s."""
    if args.data and config.TRAIN.MODE == 'segmentation':
        raise config_lib.ConfigError('--data times the image transforms of classification '
                                     'and pre-training configs, not the joint image + mask '
                                     'pipeline of a segmentation config')
    if args.data and args.shards:
        return bench_sources(config, args)
    if args.data:
        return bench_data(config, args)
    if args.reference == 'torch':
        return reference.bench_torch_reference(config, args)
    return bench_model(config, args)


def main(argv=None):
    reference.run(parse_args(argv), measure, errors=(utils.UserError,))


if __name__ == '__main__':
    main()
