"""Write tar shards in webdataset's layout from a list file or class folders, with the offset
index the training scripts read (shards.py), and print the config keys that use them.

    python tools/make_shards.py --data-path data/demo --split train --samples-per-shard 1000
    python tools/make_shards.py --data-path data/demo --split val --max-mb 512
    python main_multi_gpu_finetune.py ... -data_path data/demo \
        -opts DATA.TRAIN_SHARDS 'shards/train-{0000..0003}.tar' \
              DATA.VAL_SHARDS 'shards/val-{0000..0000}.tar'

Source: DATA_PATH/<split>_list.txt (`relative/path [label]` a line; --list names another file),
else the class folders DATA_PATH/<split>/<class>/... (labels = the sorted training class
folders, as the scripts number them). Samples keep the source's order, so sample i of the shards
is line i of the list. Each sample is `<key>.<ext>` with the image file's original bytes (jpg,
jpeg, png, webp; other formats are converted to PNG without loss) and `<key>.cls` with the label
(none for an unlabelled line). A shard closes after --samples-per-shard samples or before it
would pass --max-mb MB. Beside each `<prefix>-NNNN.tar` goes `<prefix>-NNNN.tar.index.json`.

    python tools/make_shards.py --data-path /data/in1k --count 'pipe:curl -s https://host/train-{0000..1023}.tar'

counts the samples of streamed shards once (a full read) into DATA_PATH/shard_counts.json, which
the training scripts read; without it the first run counts, in each of its processes.
"""
import argparse
import io
import os
import sys
import tarfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import runtime  # noqa: E402

if __name__ == '__main__':
    runtime.setup_process(restart=False)  # (a data tool: no malloc restart needed)

import datasets  # noqa: E402
import shards  # noqa: E402
import utils  # noqa: E402


def read_source(data_path, split, list_file=None):
    """-> [(path, label or None)], a description of the source: the samples of the list file,
    else of the class folders, as the training scripts read them (datasets.py)."""
    list_file = list_file or os.path.join(data_path, f'{split}_list.txt')
    if os.path.isfile(list_file):
        found, source = datasets.ImageListDataset(data_path, list_file,
                                                  require_labels=False), list_file
    else:
        folder = os.path.join(data_path, split)
        if not os.path.isdir(folder):
            raise datasets.DataError(f'{data_path}: neither the list file {list_file} nor the '
                                     f'folder {folder}')
        train = os.path.join(data_path, 'train')  # its class folders number the labels
        classes = datasets.class_folders(train) if os.path.isdir(train) else None
        found, source = datasets.ImageFolderDataset(folder, require_labels=False,
                                                    classes=classes or None), folder
    return [(found.path(i), None if label == datasets.IGNORE_LABEL else int(label))
            for i, label in enumerate(found.labels)], source


def _member(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # same input -> same bytes
    info.mode = 0o444
    tar.addfile(info, io.BytesIO(data))


def image_bytes(path):
    """-> (extension, bytes, converted): the file's own bytes when shards can hold its format,
    else a lossless PNG of the upright RGB image (converted True)."""
    ext = os.path.splitext(path)[1].lower().lstrip('.')
    try:
        if ext in shards.IMAGE_EXTS:
            with open(path, 'rb') as f:
                return ext, f.read(), False
        buf = io.BytesIO()
        datasets.load_rgb(path).save(buf, format='PNG')
        return 'png', buf.getvalue(), True
    except Exception as e:
        raise datasets.DataError(f'cannot read image {path}: {datasets.explain(e)}') from None


def make_shards(samples, out, prefix, samples_per_shard=0, max_mb=0.0, log=print):
    """Write the shards and their indexes; -> (list of shard paths, number converted)."""
    if samples_per_shard <= 0 and max_mb <= 0:
        raise ValueError('give --samples-per-shard and/or --max-mb')
    os.makedirs(out, exist_ok=True)
    width = max(6, len(str(len(samples) - 1)))
    limit = int(max_mb * 2 ** 20) if max_mb > 0 else 0
    written, converted = [], 0
    tar, tmp, count, used = None, None, 0, 0

    def close():
        tar.close()
        written.append(tmp)

    for i, (path, label) in enumerate(samples):
        ext, data, was_converted = image_bytes(path)
        converted += was_converted
        cls = b'' if label is None else str(label).encode()
        size = 512 + (len(data) + 511) // 512 * 512 + (1024 if label is not None else 0)
        if tar is not None and ((samples_per_shard and count >= samples_per_shard) or
                                (limit and used + size > limit - 1024)):
            close()
            tar = None
        if tar is None:
            tmp = os.path.join(out, f'{prefix}-{len(written)}.tar.tmp')
            tar = tarfile.open(tmp, 'w', format=tarfile.USTAR_FORMAT)
            count, used = 0, 0
        key = f'{i:0{width}d}'
        _member(tar, f'{key}.{ext}', data)
        if label is not None:
            _member(tar, f'{key}.cls', cls)
        count += 1
        used += size
    if tar is not None:
        close()
    digits = max(4, len(str(len(written) - 1)))  # known now: the names share one width
    final = []
    for k, tmp in enumerate(written):
        path = os.path.join(out, f'{prefix}-{k:0{digits}d}.tar')
        os.replace(tmp, path)
        if not shards.write_index(path, shards.scan(path)):
            raise OSError(f'cannot write {shards.index_path(path)}')
        final.append(path)
    log(f'{prefix}: {len(samples)} samples in {len(final)} shards')
    return final, converted


def pattern_of(paths, data_path):
    """The brace pattern of make_shards' output, relative to data_path when inside it."""
    folder = os.path.dirname(os.path.abspath(paths[0]))
    name = os.path.basename(paths[0])
    prefix = name[:name.rindex('-')]
    digits = len(name) - len(prefix) - 1 - len('.tar')
    pattern = os.path.join(folder, f'{prefix}-{{{0:0{digits}d}..{len(paths) - 1:0{digits}d}}}.tar')
    root = os.path.abspath(data_path) + os.sep if data_path else None
    if root and pattern.startswith(root):
        pattern = pattern[len(root):]
    return pattern


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--data-path', required=True, help='the data folder (DATA.DATA_PATH)')
    p.add_argument('--split', default='train', choices=('train', 'val'))
    p.add_argument('--list', default=None, help='list file (default DATA_PATH/<split>_list.txt)')
    p.add_argument('--out', default=None, help='output folder (default DATA_PATH/shards)')
    p.add_argument('--prefix', default=None, help='shard name prefix (default: the split)')
    p.add_argument('--samples-per-shard', type=int, default=0)
    p.add_argument('--max-mb', type=float, default=0.0)
    p.add_argument('--count', default=None, metavar='PATTERN',
                   help='write nothing but the sample counts of streamed shards '
                        "('pipe:curl -s https://host/train-{0000..1023}.tar') to "
                        'DATA_PATH/shard_counts.json, once, before a multi-process run')
    args = p.parse_args(argv)
    if args.samples_per_shard <= 0 and args.max_mb <= 0:
        args.samples_per_shard = 1000

    def count():
        sources = shards.expand(args.count, args.data_path)
        counts = shards.source_counts(sources, args.data_path)
        print(f'{sum(counts)} samples in {len(sources)} shard(s); counts in '
              f'{shards.counts_path(args.data_path)}')

    def run():
        if args.count:
            return count()
        samples, source = read_source(args.data_path, args.split, args.list)
        out = args.out or os.path.join(args.data_path, 'shards')
        paths, converted = make_shards(samples, out, args.prefix or args.split,
                                       args.samples_per_shard, args.max_mb,
                                       log=lambda m: None)
        note = f' ({converted} converted to PNG)' if converted else ''
        print(f'{len(samples)} samples of {source} -> {len(paths)} shard(s) in {out}{note}',
              file=sys.stderr)
        key = 'DATA.TRAIN_SHARDS' if args.split == 'train' else 'DATA.VAL_SHARDS'
        print(f"-opts {key} '{pattern_of(paths, args.data_path)}'")

    utils.run_main(run)  # a data error: one 'error: ...' line, exit 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
