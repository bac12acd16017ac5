"""A data source written here against the DataSource contract alone (datasets.py's docstring)
trains and evaluates through the factory, the loader, the task and the engine -- none of them
changed or told about it beyond one sources.register call."""
import json
import os

import numpy as np
import paddle
import pytest
from PIL import Image

from conftest import ROOT
import cli
import datasets
import paddlefile
import sources

ARRAYS = 'arrays.npz'


class ArraySource(datasets.DataSource, paddle.io.Dataset):
    """Images and labels from DATA_PATH/arrays.npz ({split}_images uint8 [N, H, W, 3],
    {split}_labels, class_names): the kind of source a user adds for data in memory."""

    def __init__(self, images, labels, names, transform):
        super().__init__(transform)
        self.images, self.labels, self.classes = images, labels, list(names)

    @classmethod
    def from_config(cls, config, is_train, transform, need_labels):
        path = os.path.join(config.DATA.DATA_PATH, ARRAYS)
        if not os.path.isfile(path):
            return None
        split = 'train' if is_train else 'val'
        with np.load(path) as f:
            return cls(f[f'{split}_images'], f[f'{split}_labels'], f['class_names'], transform)

    @classmethod
    def expected(cls, config, is_train):
        return [f'a file {ARRAYS}']

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        image = self.transformed(Image.fromarray(self.images[i]), i)
        return image, np.int64(self.labels[i]), np.int64(i)


@pytest.fixture
def array_source():
    sources.register(ArraySource, first=True)
    yield ArraySource
    sources.SOURCES.remove(ArraySource)


def _write_arrays(folder, seed=0):
    """Two classes a model can tell apart: dark and bright images."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (('train', 32), ('val', 16)):
        labels = np.arange(n) % 2
        base = np.where(labels[:, None, None, None] == 1, 200, 40)
        noise = rng.integers(-30, 30, (n, 40, 40, 3))
        arrays[f'{split}_images'] = np.clip(base + noise, 0, 255).astype(np.uint8)
        arrays[f'{split}_labels'] = labels
    os.makedirs(folder, exist_ok=True)
    np.savez(os.path.join(folder, ARRAYS), class_names=np.array(['dark', 'bright']), **arrays)


def _tiny(*extra):
    return ['-cfg', os.path.join(ROOT, 'configs', 'tiny_finetune.yaml'), '-opts',
            'MODEL.NUM_CLASSES', '2', 'TRAIN.NUM_EPOCHS', '2', 'TRAIN.WARMUP_EPOCHS', '0',
            'DATA.BATCH_SIZE', '8', 'DATA.BATCH_SIZE_EVAL', '8', 'TRAIN.MIXUP_PROB', '0.0',
            'TRAIN.CUTMIX_ALPHA', '0.0', 'TRAIN.MIXUP_ALPHA', '0.0', 'REPORT_FREQ', '2',
            *extra]


def test_factory_asks_the_registered_source_and_names_it_when_nothing_is_found(
        tmp_path, array_source):
    import config as cfgmod
    _write_arrays(str(tmp_path / 'data'))
    c = cfgmod.get_config(os.path.join(ROOT, 'configs', 'tiny_finetune.yaml'))
    c.defrost()
    c.DATA.DATA_PATH, c.MODEL.NUM_CLASSES = str(tmp_path / 'data'), 2
    ds = sources.build_dataset(c, True)
    assert isinstance(ds, ArraySource) and len(ds) == 32 and ds.classes == ['dark', 'bright']
    image, label, sid = ds[3]
    assert image.shape == (3, 32, 32) and label == 1 and sid == 3
    c.DATA.DATA_PATH = str(tmp_path)  # holds neither arrays.npz nor lists nor folders
    with pytest.raises(datasets.DataError, match=r'found neither a file arrays\.npz nor the '
                                                 r'list file train_list\.txt'):
        sources.build_dataset(c, True)


@pytest.mark.slow
def test_a_source_of_the_tests_trains_and_evaluates_through_the_engine(
        tmp_path, array_source, capsys):
    data, out = str(tmp_path / 'data'), str(tmp_path / 'out')
    _write_arrays(data)
    cli.run('finetune', ['-data_path', data, '-output', out] + _tiny())
    log = [json.loads(x) for x in open(os.path.join(out, 'log.txt'))]
    assert [x['epoch'] for x in log] == [0, 1]
    assert all(np.isfinite(x['train_loss']) for x in log)
    meta = paddlefile.load(os.path.join(out, 'latest.pdparams'))['_meta']
    assert meta['classes'] == ['dark', 'bright']  # the source's classes, saved by the engine
    capsys.readouterr()
    cli.run('finetune', ['-eval', '-pretrained', os.path.join(out, 'latest.pdparams'),
                         '-data_path', data])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result['n'] == 16 and result['val_acc1'] == pytest.approx(log[-1]['val_acc1'])
