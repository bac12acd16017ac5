"""tools/prepare_imagenet.py and matfile.py on small fakes of each ImageNet layout, with the real
1000 WordNet ids: every list label must be the sorted-wnid index of the image's true class.

The devkit fake's meta.mat (written by SciPy, the reference reader too) numbers the classes in a
shuffled order, as the real devkit does: a tool that used those IDs as labels would fail here.
"""
import csv
import os
import random
import sys
import tarfile

import numpy as np
import pytest
import scipy.io as sio

from helpers import ROOT

import classnames  # noqa: E402
import matfile  # noqa: E402
from utils import UserError  # noqa: E402

sys.path.insert(0, os.path.join(ROOT, 'tools'))
import prepare_imagenet as P  # noqa: E402

WNIDS = classnames.imagenet1k_wnids()
RNG = random.Random(0)
VAL_CLASSES = RNG.sample(range(1000), 12)  # the classes the fake val images belong to


def tiny_image(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'wb') as f:
        f.write(b'\xff\xd8 not decoded by the tool')


def write_meta_mat(path, ids, compress):
    """A devkit meta.mat: synsets with shuffled ILSVRC2012_IDs (and a few non-leaf ones)."""
    rows = [(np.array([[i]], np.uint16), w, f'words of {w}', np.array([[0]], np.uint8))
            for w, i in zip(WNIDS, ids)]
    rows += [(np.array([[1000 + k]], np.uint16), f'n9999999{k}', 'a parent', np.array([[3]]))
             for k in range(1, 4)]
    synsets = np.zeros((len(rows), 1), dtype=[('ILSVRC2012_ID', 'O'), ('WNID', 'O'),
                                             ('words', 'O'), ('num_children', 'O')])
    for r, row in enumerate(rows):
        synsets[r, 0] = row
    sio.savemat(path, {'synsets': synsets}, do_compression=compress)


@pytest.mark.parametrize('compress', [False, True])
def test_matfile_reads_what_scipy_reads(tmp_path, compress):
    ids = list(range(1, 1001))
    RNG.shuffle(ids)
    path = str(tmp_path / 'meta.mat')
    write_meta_mat(path, ids, compress)
    got = matfile.load(path)['synsets']
    ref = sio.loadmat(path, squeeze_me=True)['synsets']
    assert len(got) == len(ref) == 1003
    for g, r in zip(got, ref):
        assert g['ILSVRC2012_ID'] == int(r['ILSVRC2012_ID']) and g['WNID'] == str(r['WNID'])
        assert g['words'] == str(r['words'])


def make_devkit(src, as_tar):
    ids = list(range(1, 1001))
    RNG.shuffle(ids)
    id_of = dict(zip(WNIDS, ids))
    truth = []
    for n, c in enumerate(VAL_CLASSES * 2, start=1):
        tiny_image(os.path.join(src, 'val', f'ILSVRC2012_val_{n:08d}.JPEG'))
        truth.append(id_of[WNIDS[c]])
    data = os.path.join(src, 'ILSVRC2012_devkit_t12', 'data')
    os.makedirs(data)
    write_meta_mat(os.path.join(data, 'meta.mat'), ids, compress=True)
    with open(os.path.join(data, P.GROUND_TRUTH), 'w') as f:
        f.writelines(f'{i}\n' for i in truth)
    if as_tar:
        with tarfile.open(os.path.join(src, P.DEVKIT_TAR), 'w:gz') as t:
            t.add(os.path.join(src, 'ILSVRC2012_devkit_t12'), 'ILSVRC2012_devkit_t12')
        import shutil
        shutil.rmtree(os.path.join(src, 'ILSVRC2012_devkit_t12'))
    for c in VAL_CLASSES[:3]:
        tiny_image(os.path.join(src, 'train', WNIDS[c], f'{WNIDS[c]}_1.JPEG'))
    return {f'val/ILSVRC2012_val_{n:08d}.JPEG': c for n, c in enumerate(VAL_CLASSES * 2, 1)}


def make_kaggle(src):
    expected = {}
    rows = []
    cls = os.path.join(src, 'ILSVRC', 'Data', 'CLS-LOC')
    for n, c in enumerate(VAL_CLASSES, start=1):
        name = f'ILSVRC2012_val_{n:08d}'
        tiny_image(os.path.join(cls, 'val', name + '.JPEG'))
        rows.append({'ImageId': name, 'PredictionString': f'{WNIDS[c]} 1 2 3 4 {WNIDS[c]} 5 6 7 8'})
        expected[f'ILSVRC/Data/CLS-LOC/val/{name}.JPEG'] = c
    with open(os.path.join(src, 'LOC_val_solution.csv'), 'w', newline='') as f:
        w = csv.DictWriter(f, ['ImageId', 'PredictionString'])
        w.writeheader()
        w.writerows(reversed(rows))
    with open(os.path.join(src, 'LOC_synset_mapping.txt'), 'w') as f:
        f.writelines(f'{w} {names}\n' for w, names in classnames.imagenet1k())
    tiny_image(os.path.join(cls, 'train', WNIDS[5], 'a.JPEG'))
    return expected


def make_folders(src):
    expected = {}
    for c in VAL_CLASSES:
        tiny_image(os.path.join(src, 'val', WNIDS[c], 'x.JPEG'))
        expected[f'val/{WNIDS[c]}/x.JPEG'] = c
    tiny_image(os.path.join(src, 'train', WNIDS[0], 'y.JPEG'))
    return expected


def read_list(path, out):
    with open(path) as f:
        return {os.path.relpath(os.path.normpath(os.path.join(out, p)), out): int(label)
                for p, label in (line.split() for line in f)}


@pytest.mark.parametrize('layout', ['devkit-folder', 'devkit-tar', 'kaggle', 'folders'])
def test_labels_are_the_sorted_wnid_index(tmp_path, layout):
    src = str(tmp_path / 'imagenet')
    os.makedirs(src)
    expected = (make_devkit(src, layout == 'devkit-tar') if layout.startswith('devkit')
                else make_kaggle(src) if layout == 'kaggle' else make_folders(src))
    lines = []
    P.prepare(src, src, log=lines.append)
    assert lines[0] == f'layout: {layout.split("-")[0]}'
    got = read_list(os.path.join(src, 'val_list.txt'), src)
    assert got == expected
    assert os.path.isfile(os.path.join(src, 'train_list.txt'))
    with open(os.path.join(src, 'classes.txt')) as f:
        assert [line.split('\t')[0] for line in f] == WNIDS
    assert any('50 val images' in x for x in lines)  # the fake is no full val set
    assert lines[-1] == f'use it with: -data_path {src}'


def test_lists_in_another_folder_point_back_to_the_images(tmp_path):
    src, out = str(tmp_path / 'in'), str(tmp_path / 'out')
    os.makedirs(src)
    expected = make_folders(src)
    P.prepare(src, out, log=lambda m: None)
    got = read_list(os.path.join(out, 'val_list.txt'), out)
    for rel, label in got.items():
        assert os.path.isfile(os.path.join(out, rel))
    assert sorted(got.values()) == sorted(expected.values())


def test_a_flat_val_folder_without_the_devkit_is_one_message(tmp_path):
    src = str(tmp_path / 'imagenet')
    tiny_image(os.path.join(src, 'val', 'ILSVRC2012_val_00000001.JPEG'))
    with pytest.raises(UserError, match='no devkit'):
        P.prepare(src, src, log=lambda m: None)
    assert not os.path.exists(os.path.join(src, 'val_list.txt'))
