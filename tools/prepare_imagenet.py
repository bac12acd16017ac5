"""ImageNet-1k as people have it -> train_list.txt / val_list.txt / classes.txt in the official
class order (label = position of the WordNet id among the 1000 sorted ids, the order of every
released classifier). No image is copied: the lists name the files where they are.

    python tools/prepare_imagenet.py --src /data/imagenet --out /data/imagenet

Layouts recognised under --src:
  devkit   image-net.org's ILSVRC2012: a flat val folder (ILSVRC2012_val_*.JPEG) labelled by the
           devkit's ILSVRC2012_validation_ground_truth.txt, whose ILSVRC2012_IDs are in the
           devkit's own order (its data/meta.mat) -- NOT the official label order; the devkit as
           its folder or as ILSVRC2012_devkit_t12.tar.gz; train as train/<wnid>/ folders
  kaggle   the "ImageNet Object Localization Challenge": ILSVRC/Data/CLS-LOC/{train/<wnid>/,
           val/} with LOC_val_solution.csv and LOC_synset_mapping.txt
  folders  train/<wnid>/ and val/<wnid>/
Tars (the 1000 inner train tars, ILSVRC2012_img_val.tar) are not read: extract them first.
"""
import argparse
import csv
import io
import os
import re
import sys
import tarfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
import runtime  # noqa: E402

if __name__ == '__main__':
    runtime.setup_process(restart=False)  # (a data tool: no malloc restart needed)

import classnames  # noqa: E402
import matfile  # noqa: E402
from datasets import IMG_EXTENSIONS  # noqa: E402
from utils import UserError, run_main  # noqa: E402

GROUND_TRUTH = 'ILSVRC2012_validation_ground_truth.txt'
DEVKIT_TAR = 'ILSVRC2012_devkit_t12.tar.gz'
VAL_NAME = re.compile(r'ILSVRC2012_val_(\d{8})\.JPEG$', re.IGNORECASE)
VAL_PER_CLASS = 50


def official_wnids():
    return classnames.imagenet1k_wnids()


def images_in(folder):
    return sorted(f for f in os.listdir(folder)
                  if f.lower().endswith(IMG_EXTENSIONS) and not f.startswith('.'))


# ----------------------------------------------------------------------------------------------
# the devkit: meta.mat (ILSVRC2012_ID -> WordNet id) and the validation ground truth
# ----------------------------------------------------------------------------------------------
def _find(src, name, depth=3):
    for root, dirs, files in os.walk(src):
        if root[len(src):].count(os.sep) >= depth:
            dirs[:] = []
        if name in files:
            return os.path.join(root, name)
    return None


def devkit_files(src):
    """-> (meta.mat bytes' path or a tar member, ground truth lines), from the devkit folder or
    its tarball under src; None when src holds neither."""
    truth = _find(src, GROUND_TRUTH)
    if truth:
        meta = os.path.join(os.path.dirname(truth), 'meta.mat')
        if not os.path.isfile(meta):
            raise UserError(f'{truth} found but not meta.mat beside it: the devkit is incomplete')
        with open(truth) as f:
            return meta, f.read().split()
    tar = _find(src, DEVKIT_TAR, depth=1)
    if tar is None:
        return None
    try:
        with tarfile.open(tar) as t:
            members = {os.path.basename(m.name): m for m in t.getmembers() if m.isfile()}
            if GROUND_TRUTH not in members or 'meta.mat' not in members:
                raise UserError(f'{tar}: no {GROUND_TRUTH} / meta.mat inside')
            truth_lines = t.extractfile(members[GROUND_TRUTH]).read().decode().split()
            meta_bytes = t.extractfile(members['meta.mat']).read()
    except (tarfile.TarError, OSError, EOFError) as e:
        raise UserError(f'{tar}: cannot read the tarball ({e})') from None
    return io.BytesIO(meta_bytes), truth_lines


def devkit_id_to_wnid(meta):
    """meta.mat's synsets -> {ILSVRC2012_ID: WordNet id} for the 1000 classes (IDs 1..1000)."""
    try:
        synsets = matfile.load(meta)['synsets']
    except matfile.FormatError as e:
        raise UserError(str(e)) from None
    except KeyError:
        raise UserError('meta.mat holds no synsets') from None
    table = {int(s['ILSVRC2012_ID']): s['WNID'] for s in synsets
             if int(s['ILSVRC2012_ID']) <= 1000}
    if sorted(table) != list(range(1, 1001)):
        raise UserError(f'meta.mat: {len(table)} of the 1000 ILSVRC2012_IDs')
    return table


# ----------------------------------------------------------------------------------------------
# layouts -> [(path, wnid)] per split
# ----------------------------------------------------------------------------------------------
def wnid_folders(folder, wnids):
    """(path, wnid) of every image in folder/<wnid>/, and the sub-folders that are no wnid."""
    pairs, other = [], []
    for name in sorted(os.listdir(folder)):
        sub = os.path.join(folder, name)
        if not os.path.isdir(sub):
            continue
        if name not in wnids:
            other.append(name)
            continue
        pairs += [(os.path.join(sub, f), name) for f in images_in(sub)]
    return pairs, other


def devkit_val(folder, truth, id_to_wnid):
    """The flat val folder labelled by the ground truth (line i = ILSVRC2012_val_0000000i)."""
    pairs, unlabelled = [], []
    for f in images_in(folder):
        m = VAL_NAME.match(f)
        i = int(m.group(1)) if m else 0
        if not 1 <= i <= len(truth):
            unlabelled.append(f)
            continue
        pairs.append((os.path.join(folder, f), id_to_wnid[int(truth[i - 1])]))
    return pairs, unlabelled


def kaggle_val(folder, solution):
    """Kaggle's flat val folder labelled by LOC_val_solution.csv (ImageId, 'wnid x y x y ...')."""
    labels = {}
    with open(solution, newline='') as f:
        for row in csv.DictReader(f):
            labels[row['ImageId']] = row['PredictionString'].split()[0]
    pairs, unlabelled = [], []
    for f in images_in(folder):
        wnid = labels.get(os.path.splitext(f)[0])
        if wnid is None:
            unlabelled.append(f)
        else:
            pairs.append((os.path.join(folder, f), wnid))
    return pairs, unlabelled


def find_layout(src):
    """-> (name, {split: (pairs, problems)})."""
    wnids = set(official_wnids())
    kaggle = os.path.join(src, 'ILSVRC', 'Data', 'CLS-LOC')
    if os.path.isdir(kaggle) and os.path.isfile(os.path.join(src, 'LOC_val_solution.csv')):
        splits = {'train': wnid_folders(os.path.join(kaggle, 'train'), wnids)}
        if os.path.isdir(os.path.join(kaggle, 'val')):
            splits['val'] = kaggle_val(os.path.join(kaggle, 'val'),
                                       os.path.join(src, 'LOC_val_solution.csv'))
        return 'kaggle', splits
    splits = {}
    if os.path.isdir(os.path.join(src, 'train')):
        splits['train'] = wnid_folders(os.path.join(src, 'train'), wnids)
    val = os.path.join(src, 'val')
    if os.path.isdir(val) and any(os.path.isdir(os.path.join(val, d)) and d in wnids
                                  for d in os.listdir(val)):
        splits['val'] = wnid_folders(val, wnids)
        return 'folders', splits
    if os.path.isdir(val) and images_in(val):
        devkit = devkit_files(src)
        if devkit is None:
            raise UserError(f'{val} holds images but no class folders, and {src} has no devkit '
                            f'({GROUND_TRUTH} + meta.mat, or {DEVKIT_TAR}) to label them')
        meta, truth = devkit
        splits['val'] = devkit_val(val, truth, devkit_id_to_wnid(meta))
        return 'devkit', splits
    if not splits:
        tars = [f for f in os.listdir(src) if f.endswith('.tar')]
        hint = (f' (found {", ".join(sorted(tars)[:3])}: extract them first)' if tars else '')
        raise UserError(f'{src}: no ImageNet layout found: train/<wnid>/, val/ (class folders or '
                        f'flat with the devkit) or Kaggle\'s ILSVRC/Data/CLS-LOC{hint}')
    return 'folders', splits


def write_list(path, pairs, out, index):
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        for file, wnid in pairs:
            f.write(f'{os.path.relpath(file, out)} {index[wnid]}\n')
    os.replace(tmp, path)


def prepare(src, out, log=print):
    if not os.path.isdir(src):
        raise UserError(f'--src {src}: no such folder')
    os.makedirs(out, exist_ok=True)
    name, splits = find_layout(src)
    wnids = official_wnids()
    index = {w: i for i, w in enumerate(wnids)}
    log(f'layout: {name}')
    for split, (pairs, problems) in splits.items():
        classes = {w for _, w in pairs}
        counts = {}
        for _, w in pairs:
            counts[w] = counts.get(w, 0) + 1
        log(f'{split}: {len(pairs)} images of {len(classes)} classes')
        if problems:
            log(f'  WARNING: {len(problems)} left out (no label / not a WordNet id of the 1000): '
                f'{", ".join(problems[:5])}{" ..." if len(problems) > 5 else ""}')
        if len(classes) != 1000:
            log(f'  WARNING: {1000 - len(classes)} of the 1000 classes have no image')
        if split == 'val':
            short = sum(1 for w in wnids if counts.get(w, 0) != VAL_PER_CLASS)
            if short:
                log(f'  WARNING: {short} classes have not {VAL_PER_CLASS} val images '
                    f'(the full set: 50,000); results will not compare with published ones')
        if not pairs:
            raise UserError(f'{split}: no labelled image found under {src}')
        write_list(os.path.join(out, f'{split}_list.txt'), pairs, out, index)
    tmp = os.path.join(out, 'classes.txt.tmp')
    with open(tmp, 'w') as f:
        f.writelines(f'{w}\t{names}\n' for w, names in classnames.imagenet1k())
    os.replace(tmp, os.path.join(out, 'classes.txt'))
    log(f'written: {", ".join(f"{s}_list.txt" for s in splits)}, classes.txt in {out}')
    log(f'use it with: -data_path {out}')
    return splits


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--src', required=True, help='the ImageNet folder as you have it')
    p.add_argument('--out', required=True, help='folder for the lists (may be --src)')
    args = p.parse_args(argv)
    run_main(lambda: prepare(args.src, args.out))


if __name__ == '__main__':
    main()
