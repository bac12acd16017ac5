"""Write tar shards in webdataset's layout from a list file or class folders, with the offset
index the training scripts read (shards.py), and print the config keys that use them.

    python tools/make_shards.py --data-path data/demo --split train --samples-per-shard 1000
    python tools/make_shards.py --data-path data/demo --split val --max-mb 512
    python main_multi_gpu_finetune.py ... -data_path data/demo \
        -opts DATA.TRAIN_SHARDS 'shards/train-{0000..0003}.tar' \
              DATA.VAL_SHARDS 'shards/val-{0000..0000}.tar'

Source: DATA_PATH/<split>_list.txt (`relative/path [label]` a line; --list names another file),
else the class folders DATA_PATH/<split>/<class>/... Samples keep the source's order, so sample
i of the shards is line i of the list. Each sample is `<key>.<ext>` with the image file's
original bytes (jpg, jpeg, png, webp; other formats are converted to PNG without loss) and
`<key>.cls` with the label (none for an unlabelled line). A shard closes after
--samples-per-shard samples or before it would pass --max-mb MB. Beside each
`<prefix>-NNNN.tar` goes `<prefix>-NNNN.tar.index.json`.

Classes: the labels of class folders are the training classes, as the scripts number them:
train/'s sorted class folders, for val/ too (a val folder missing a class keeps the others'
labels); --classes FILE (a classes.txt: one class a line, label 0 first) gives them instead,
and a val folder without train/ beside it needs it (or DATA_PATH/classes.txt). A list file's
labels are its numbers, named by --classes or DATA_PATH/classes.txt when there is one. The
names go to classes.txt in the output folder, where the shard readers find them.

The output folder belongs to this tool: it refuses a folder holding .tar files it did not write,
and a new run of a split replaces the shards of its previous run there (fewer shards: the old
last ones removed, and said). What it wrote is listed in make_shards.json in that folder.

    python tools/make_shards.py --data-path /data/in1k --count 'pipe:curl -s https://host/train-{0000..1023}.tar'

counts the samples of streamed shards once (a full read) into DATA_PATH/shard_counts.json, which
the training scripts read; without it the first run counts, in each of its processes. A stream
that does not end as a tar ends (cut) is an error, and its count is not kept.
"""
import argparse
import io
import json
import os
import re
import sys
import tarfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import runtime  # noqa: E402

if __name__ == '__main__':
    runtime.setup_process(restart=False)  # (a data tool: no malloc restart needed)

import classnames  # noqa: E402
import datasets  # noqa: E402
import shards  # noqa: E402
import utils  # noqa: E402

MANIFEST = 'make_shards.json'  # in the output folder: {'shards': {prefix: [names]}, 'classes'}


def _read_classes(path, what):
    if not os.path.isfile(path):
        raise datasets.DataError(f'{what} {path}: no such file')
    try:
        names = classnames.read_classes(path)
    except classnames.ClassFileError as e:
        raise datasets.DataError(str(e)) from None
    if not names:
        raise datasets.DataError(f'{what} {path} names no class')
    return names


def class_map(data_path, split, list_file=None, classes_file=None):
    """The class names of the split's labels (label i = names[i]), or None when unknown:
    --classes FILE; for a list file DATA_PATH/classes.txt if there is one; for class folders
    the training classes (train/'s folders, as datasets.ImageFolderDataset.from_config; for
    val/ without train/ beside it DATA_PATH/classes.txt, else DataError: its own folders would
    renumber the classes when one is missing)."""
    if classes_file:
        return _read_classes(classes_file, '--classes')
    stated = os.path.join(data_path, classnames.CLASSES_FILE)
    list_file = list_file or os.path.join(data_path, f'{split}_list.txt')
    if os.path.isfile(list_file):
        return _read_classes(stated, 'the class names') if os.path.isfile(stated) else None
    folder = os.path.join(data_path, split)
    if not os.path.isdir(folder) or not datasets.class_folders(folder):
        return None  # (no such folder: read_source says so; no class folders: no labels)
    if split == 'train':
        return datasets.class_folders(folder)
    train = os.path.join(data_path, 'train')
    if os.path.isdir(train) and datasets.class_folders(train):
        return datasets.class_folders(train)
    if os.path.isfile(stated):
        return _read_classes(stated, 'the class names')
    raise datasets.DataError(f'{folder}: its labels are the training classes, but there is no '
                             f'{train} of class folders beside it: give --classes FILE (a '
                             f'classes.txt, one class a line in label order)')


def read_source(data_path, split, list_file=None, classes=None):
    """-> [(path, label or None)], a description of the source: the samples of the list file,
    else of the class folders, as the training scripts read them (datasets.py). classes:
    class_map()'s names (list labels are checked against their number; folders labelled by
    them); None: a list's numbers as they are, folders by train/'s class folders."""
    list_file = list_file or os.path.join(data_path, f'{split}_list.txt')
    if os.path.isfile(list_file):
        found, source = datasets.ImageListDataset(
            data_path, list_file, require_labels=False,
            num_classes=len(classes) if classes else None), list_file
    else:
        folder = os.path.join(data_path, split)
        if not os.path.isdir(folder):
            raise datasets.DataError(f'{data_path}: neither the list file {list_file} nor the '
                                     f'folder {folder}')
        if classes is None:
            train = os.path.join(data_path, 'train')  # its class folders number the labels
            classes = (datasets.class_folders(train) if os.path.isdir(train) else None) or None
        found, source = datasets.ImageFolderDataset(folder, require_labels=False,
                                                    classes=classes), folder
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


def read_manifest(out):
    """What this tool wrote into `out`: {'shards': {prefix: [file names]}, 'classes': [the
    prefixes whose class names classes.txt holds]} (empty for a folder it has not written)."""
    path = os.path.join(out, MANIFEST)
    if not os.path.isfile(path):
        return {'shards': {}, 'classes': []}
    try:
        with open(path) as f:
            manifest = json.load(f)
        return {'shards': dict(manifest['shards']), 'classes': list(manifest['classes'])}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise datasets.DataError(f'{path}: unreadable ({datasets.explain(e)}); it lists the '
                                 f'shards this tool wrote into {out}') from None


def write_manifest(out, manifest):
    if not shards.write_json(os.path.join(out, MANIFEST), manifest):
        raise OSError(f'cannot write {os.path.join(out, MANIFEST)}')


def check_folder(out, manifest):
    """DataError when `out` holds .tar files that this tool did not write."""
    ours = {name for names in manifest['shards'].values() for name in names}
    foreign = sorted(f for f in os.listdir(out) if f.endswith('.tar') and f not in ours)
    if foreign:
        more = f' and {len(foreign) - 2} more' if len(foreign) > 2 else ''
        raise datasets.DataError(f'{out} holds shards that make_shards.py did not write '
                                 f'({", ".join(foreign[:2])}{more}): give another --out, or '
                                 f'move them away')


def classes_plan(out, manifest, prefix, classes):
    """-> (write classes.txt, remove it): the output folder's classes.txt is shared by the
    splits written there, so it must name the same classes for all of them (DataError)."""
    path = os.path.join(out, classnames.CLASSES_FILE)
    existing = _read_classes(path, 'the class names') if os.path.isfile(path) else None
    others = [p for p in manifest['classes'] if p != prefix and manifest['shards'].get(p)]
    if classes is None:
        return False, existing is not None and not others and prefix in manifest['classes']
    if existing is None or existing == list(classes):
        return existing is None, False
    differ = classnames.mismatch(existing, classes, path, 'this split')
    if others:
        raise datasets.DataError(f'{path} holds the classes of the {others[0]} shards and {differ}'
                                 f': give --classes FILE with those, or another --out')
    if prefix not in manifest['classes']:
        raise datasets.DataError(f'{path} was not written by make_shards.py and {differ}: give '
                                 f'another --out, or move it away')
    return True, False


def make_shards(samples, out, prefix, samples_per_shard=0, max_mb=0.0, log=print,
                classes=None):
    """Write the shards and their indexes into `out`, replacing those of an earlier run of
    `prefix` there (its files listed in MANIFEST); classes (label i = classes[i]) go to
    classes.txt. -> (list of shard paths, number converted)."""
    if samples_per_shard <= 0 and max_mb <= 0:
        raise ValueError('give --samples-per-shard and/or --max-mb')
    os.makedirs(out, exist_ok=True)
    manifest = read_manifest(out)
    check_folder(out, manifest)
    write_classes, remove_classes = classes_plan(out, manifest, prefix, classes)
    leftover = re.compile(re.escape(prefix) + r'-\d+\.tar\.tmp')  # of a run stopped mid-way
    for name in os.listdir(out):
        if leftover.fullmatch(name):
            os.remove(os.path.join(out, name))
    width = max(6, len(str(len(samples) - 1)))
    limit = int(max_mb * 2 ** 20) if max_mb > 0 else 0
    written, converted = [], 0
    tar, tmp, count, used = None, None, 0, 0
    progress = shards.Progress(f'{prefix}: writing shards', len(samples), log)

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
        progress(i + 1, f' samples, {len(written)} shard(s) done')
    if tar is not None:
        close()
    digits = max(4, len(str(len(written) - 1)))  # known now: the names share one width
    names = [f'{prefix}-{k:0{digits}d}.tar' for k in range(len(written))]
    before = manifest['shards'].get(prefix, [])
    manifest['shards'][prefix] = sorted(set(before) | set(names))  # (a stop from here on
    write_manifest(out, manifest)                                   # leaves no stranger)
    final = []
    for tmp, name in zip(written, names):
        path = os.path.join(out, name)
        os.replace(tmp, path)
        if not shards.write_index(path, shards.scan(path)):
            raise OSError(f'cannot write {shards.index_path(path)}')
        final.append(path)
    stale = [name for name in before if name not in names]
    for name in stale:
        for path in (os.path.join(out, name), shards.index_path(os.path.join(out, name))):
            if os.path.exists(path):
                os.remove(path)
    if stale:
        log(f'{prefix}: removed {len(stale)} shard(s) of an earlier run from {out} '
            f'({", ".join(stale[:3])}{" ..." if len(stale) > 3 else ""})')
    classes_file = os.path.join(out, classnames.CLASSES_FILE)
    if write_classes:
        classnames.write_classes(classes_file, list(classes))
    elif remove_classes:
        os.remove(classes_file)
        log(f'{prefix}: removed {classes_file} of an earlier run (no class names now)')
    manifest['shards'][prefix] = names
    manifest['classes'] = sorted((set(manifest['classes']) - {prefix}) |
                                 ({prefix} if classes is not None else set()))
    write_manifest(out, manifest)
    note = f' ({converted} converted to PNG)' if converted else ''
    named = f', {len(classes)} class names in {classes_file}' if classes is not None else ''
    log(f'{prefix}: {len(samples)} samples in {len(final)} shard(s) in {out}{note}{named}')
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
    p.add_argument('--classes', default=None, metavar='FILE',
                   help='the class names, label 0 first (a classes.txt); default: the training '
                        'class folders, or DATA_PATH/classes.txt')
    p.add_argument('--count', default=None, metavar='PATTERN',
                   help='write nothing but the sample counts of streamed shards '
                        "('pipe:curl -s https://host/train-{0000..1023}.tar') to "
                        'DATA_PATH/shard_counts.json, once, before a multi-process run')
    args = p.parse_args(argv)
    if args.samples_per_shard <= 0 and args.max_mb <= 0:
        args.samples_per_shard = 1000

    def log(message):
        print(message, file=sys.stderr, flush=True)

    def count():
        sources = shards.expand(args.count, args.data_path)
        counts = shards.source_counts(sources, args.data_path, log=log)
        print(f'{sum(counts)} samples in {len(sources)} shard(s); counts in '
              f'{shards.counts_path(args.data_path)}')

    def run():
        if args.count:
            return count()
        classes = class_map(args.data_path, args.split, args.list, args.classes)
        samples, source = read_source(args.data_path, args.split, args.list, classes)
        out = args.out or os.path.join(args.data_path, 'shards')
        log(f'{source}: {len(samples)} samples')
        paths, _ = make_shards(samples, out, args.prefix or args.split, args.samples_per_shard,
                               args.max_mb, log=log, classes=classes)
        key = 'DATA.TRAIN_SHARDS' if args.split == 'train' else 'DATA.VAL_SHARDS'
        print(f"-opts {key} '{pattern_of(paths, args.data_path)}'")

    utils.run_main(run)  # a data error: one 'error: ...' line, exit 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
