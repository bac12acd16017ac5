"""Parquet as a data source (parquet_data.py, DATA.TRAIN_PARQUET / VAL_PARQUET) on fakes of
HuggingFace's layout (an Image struct {bytes, path}, an integer label, ClassLabel names in the
schema metadata), and ImageNet as people have it evaluated alike through every source.

The fakes use real ImageNet WordNet ids; the parquet names its classes by their words, as
ILSVRC/imagenet-1k does, which must mean the same classes as the ids."""
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import paddle
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import helpers as H
import checkpoint
import classnames
import datasets
import parquet_data
import sources
import tasks
from conftest import ROOT
from helpers import TINY_ARCH, run

WNIDS = classnames.imagenet1k_wnids()
WORDS = [words for _, words in classnames.imagenet1k()]
CLASSES = [0, 217, 512, 999]  # the fake's classes (sorted-wnid indices)
PER_CLASS = 4


def jpeg(seed, size=(40, 30)):
    buf = io.BytesIO()
    H.noise_image(*size, seed=seed).save(buf, format='JPEG', quality=90)
    return buf.getvalue()


def hf_schema(names=WORDS, image_type=None):
    image_type = image_type or pa.struct([('bytes', pa.binary()), ('path', pa.string())])
    features = {'image': {'_type': 'Image'},
                'label': {'names': list(names), '_type': 'ClassLabel'}}
    return pa.schema([('image', image_type), ('label', pa.int64())],
                     metadata={b'huggingface': json.dumps({'info': {'features': features}})})


def write_parquet(path, rows, schema=None, row_group_size=3):
    """rows: (encoded image or None, label or None); HF's column layout."""
    schema = schema or hf_schema()
    images = [None if b is None else {'bytes': b, 'path': f'{i}.jpg'}
              for i, (b, _) in enumerate(rows)]
    table = pa.table({'image': pa.array(images, schema.field('image').type),
                      'label': pa.array([lab for _, lab in rows], pa.int64())}, schema=schema)
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


@pytest.fixture(scope='module')
def imagenet(tmp_path_factory):
    """The same 16 val images as wnid class folders (with the 1000 training folders that fix
    the class map), as lists from tools/prepare_imagenet.py, as tar shards and as parquet
    (2 files, row groups of 3), all in the order of val_list.txt."""
    root = tmp_path_factory.mktemp('imagenet')
    folders, lists = root / 'folders', root / 'lists'
    for k, c in enumerate(CLASSES):
        for i in range(PER_CLASS):
            d = folders / 'val' / WNIDS[c]
            d.mkdir(parents=True, exist_ok=True)
            (d / f'ILSVRC2012_val_{k * PER_CLASS + i:08d}.JPEG').write_bytes(jpeg(k * 10 + i))
        t = folders / 'train' / WNIDS[c]
        t.mkdir(parents=True)
        (t / f'{WNIDS[c]}_1.JPEG').write_bytes(jpeg(100 + k))
    for w in WNIDS:
        (folders / 'train' / w).mkdir(exist_ok=True)
    r = subprocess.run([sys.executable, os.path.join(ROOT, 'tools', 'prepare_imagenet.py'),
                        '--src', str(folders), '--out', str(lists)],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    listed = [line.split() for line in (lists / 'val_list.txt').read_text().splitlines()]
    rows = [((lists / p).read_bytes(), int(label)) for p, label in listed]
    assert sorted(label for _, label in rows) == sorted(CLASSES * PER_CLASS)
    (root / 'shards').mkdir()
    for s, part in enumerate((rows[:9], rows[9:])):
        with tarfile.open(root / 'shards' / f'val-{s}.tar', 'w', format=tarfile.USTAR_FORMAT) \
                as tar:
            for i, (data, label) in enumerate(part):
                for ext, payload in (('jpg', data), ('cls', b'%d' % label)):
                    info = tarfile.TarInfo(f'{s:02d}{i:04d}.{ext}')
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    shutil.copytree(folders / 'val', root / 'subset' / 'val')  # 4 of the 1000, no train/
    (root / 'hf' / 'data').mkdir(parents=True)
    for s, part in enumerate((rows[:7], rows[7:])):
        write_parquet(str(root / 'hf' / 'data' / f'validation-0000{s}-of-00002.parquet'), part)
    return root, rows


def eval_config(data_path, **keys):
    return H.tiny_config(MODEL__NUM_CLASSES='1000', DATA__DATA_PATH=str(data_path), **keys)


def test_rows_are_the_list_samples_in_order(imagenet):
    """Same images and labels as the list file, row groups crossing files; the HF words name
    the ImageNet classes; evaluation samples identical to the list file's."""
    root, rows = imagenet
    cfg = eval_config(root / 'hf', DATA__VAL_PARQUET='data/validation-*.parquet')
    ds = sources.build_dataset(cfg, is_train=False)
    assert isinstance(ds, parquet_data.ParquetDataset) and len(ds) == 16
    assert [ds.read_bytes(i) for i in range(16)] == [b for b, _ in rows]
    assert ds.labels.tolist() == [lab for _, lab in rows]
    assert [ds.describe(i) for i in (6, 7)] == [
        f'{root}/hf/data/validation-00000-of-00002.parquet row 6',
        f'{root}/hf/data/validation-00001-of-00002.parquet row 0']
    assert ds.classes == WORDS and classnames.mismatch(WNIDS, ds.classes) is None
    listed = sources.build_dataset(eval_config(root / 'lists'), is_train=False)
    assert isinstance(listed, datasets.ImageListDataset)
    for i in (0, 8, 15):
        a, b = ds[i], listed[i]
        assert np.array_equal(a[0], b[0]) and a[1] == b[1] and a[2] == b[2] == i


def test_class_names_from_the_card_or_classes_txt(tmp_path):
    """Without names in the schema: a README.md dataset card above the files, else a
    classes.txt beside them; none: None."""
    data = tmp_path / 'data'
    data.mkdir()
    bare = pa.schema([('image', pa.binary()), ('label', pa.int64())])
    pq.write_table(pa.table({'image': [jpeg(0), jpeg(1)], 'label': [1, 0]}, schema=bare),
                   str(data / 'train-0.parquet'))
    cfg = H.tiny_config(MODEL__NUM_CLASSES='2', DATA__DATA_PATH=str(tmp_path),
                        DATA__TRAIN_PARQUET='data/*.parquet')
    assert sources.build_dataset(cfg, is_train=True).classes is None
    classnames.write_classes(str(data / 'classes.txt'), ['cat', 'dog'])
    assert sources.build_dataset(cfg, is_train=True).classes == ['cat', 'dog']
    (tmp_path / 'README.md').write_text(
        "---\nlicense: other\ndataset_info:\n- config_name: default\n  features:\n"
        "  - name: image\n    dtype: image\n  - name: label\n    dtype:\n      class_label:\n"
        "        names:\n          '0': tabby\n          '1': beagle\n---\n# A card\n")
    assert sources.build_dataset(cfg, is_train=True).classes == ['tabby', 'beagle']


def _error(cfg, is_train=False):
    with pytest.raises(datasets.DataError) as e:
        ds = sources.build_dataset(cfg, is_train=is_train)
        for i in range(len(ds)):
            ds._load_sample(i)
    return str(e.value)


def test_bad_rows_and_bad_files(tmp_path, monkeypatch):
    good = [(jpeg(i), i % 2) for i in range(4)]
    cfg = lambda pattern, **k: H.tiny_config(  # noqa: E731
        MODEL__NUM_CLASSES='1000', DATA__DATA_PATH=str(tmp_path), DATA__VAL_PARQUET=pattern,
        **k)
    # an undecodable image and a null one: bad images (named by file and row), or skipped
    write_parquet(str(tmp_path / 'bad.parquet'), good[:2] + [(b'not an image', 0), (None, 1)])
    msg = _error(cfg('bad.parquet'))
    assert msg.startswith(f'cannot read image {tmp_path}/bad.parquet row 2: ') and \
        'ON_BAD_IMAGE skip' in msg
    ds = sources.build_dataset(cfg('bad.parquet', DATA__ON_BAD_IMAGE='skip'), is_train=False)
    labels = [ds._load_sample(i)[1] for i in range(4)]
    # evaluation: marked, left out (row 3 is passed over twice: for sample 2 and for itself)
    assert labels == [0, 1, -1, -1] and ds.num_skipped == 3
    # the columns and the labels
    pq.write_table(pa.table({'image': [jpeg(0)], 'target': [0]}), str(tmp_path / 'nl.parquet'))
    assert _error(cfg('nl.parquet')) == (
        f"{tmp_path}/nl.parquet: no column 'label' (DATA.PARQUET_LABEL_COLUMN); its columns: "
        f"image, target")
    ds = sources.build_dataset(cfg('nl.parquet', DATA__PARQUET_LABEL_COLUMN='target'),
                               is_train=False)
    assert ds.labels.tolist() == [0]
    write_parquet(str(tmp_path / 'big.parquet'), good + [(jpeg(9), 1000)])
    assert _error(cfg('big.parquet')) == (f'{tmp_path}/big.parquet row 4: label 1000 is outside '
                                          f'0..999 (MODEL.NUM_CLASSES 1000)')
    write_parquet(str(tmp_path / 'null.parquet'), good + [(jpeg(9), None)])
    assert _error(cfg('null.parquet')) == f"{tmp_path}/null.parquet row 4: no label ('label' " \
                                          f"is null)"
    # not parquet; nothing matched; names of another size; no pyarrow
    (tmp_path / 'x.parquet').write_bytes(b'PAR1 but not really')
    assert _error(cfg('x.parquet')).startswith(f'{tmp_path}/x.parquet: not a parquet file (')
    assert _error(cfg('none-*.parquet')) == f'DATA.VAL_PARQUET: no file matches ' \
                                            f'{tmp_path}/none-*.parquet'
    assert _error(cfg('')).startswith(  # the folder holds parquet files the config does not name
        f"{tmp_path}: found neither parquet files named by DATA.VAL_PARQUET (it holds "
        f"bad.parquet ...: -opts DATA.VAL_PARQUET 'PATTERN') nor the list file")
    write_parquet(str(tmp_path / 'few.parquet'), good, schema=hf_schema(['a', 'b']))
    assert _error(cfg('few.parquet')) == (
        f'{tmp_path}/few.parquet: the dataset names 2 classes but MODEL.NUM_CLASSES is 1000: '
        f'set -opts MODEL.NUM_CLASSES 2')
    monkeypatch.setattr(parquet_data, 'pq', None)
    assert _error(cfg('bad.parquet')) == ('DATA.VAL_PARQUET: reading parquet files needs the '
                                          'pyarrow package (pip install pyarrow)')


def test_pretraining_needs_no_label_column(tmp_path):
    pq.write_table(pa.table({'img': [jpeg(0), jpeg(1), jpeg(2)]}), str(tmp_path / 'u.parquet'))
    cfg = H.tiny_config('pretrain', DATA__DATA_PATH=str(tmp_path),
                        DATA__TRAIN_PARQUET='u.parquet', DATA__PARQUET_IMAGE_COLUMN='img')
    ds = sources.build_dataset(cfg, is_train=True, need_labels=False)
    assert len(ds) == 3 and ds.labels.tolist() == [-1] * 3 and ds[2][0].shape == (3, 32, 32)


@pytest.fixture(scope='module')
def classifier(imagenet):
    """A tiny 1000-class ViT that carries the ImageNet WordNet ids as its classes."""
    root, _ = imagenet
    cfg = eval_config(root / 'lists')
    paddle.seed(0)
    model = tasks.get_task(cfg).build_model()
    ckpt = str(root / 'vit.pdparams')
    paddle.save(dict(model.state_dict(), _meta=checkpoint.run_meta(cfg, WNIDS)), ckpt)
    return ckpt


@pytest.mark.slow
def test_eval_is_the_same_through_every_source(imagenet, classifier, tmp_path):
    """-eval of one model over the same images through list files (prepare_imagenet.py), class
    folders (also just the 4 classes there are, labelled by the names the model carries), tar
    shards and parquet: the same accuracy, loss and count, with 1 and 2 processes and 0 and 2
    loader workers."""
    root, _ = imagenet
    ckpt = classifier

    def evaluate(data_path, *opts, nproc=1, workers=0):
        cmd = [sys.executable]
        if nproc > 1:
            cmd += ['-m', 'paddle.distributed.launch', '--nproc_per_node', str(nproc),
                    '--log_dir', str(tmp_path / 'launch')]
        cmd += [os.path.join(ROOT, 'main_multi_gpu_finetune.py'), '-cfg',
                os.path.join(ROOT, 'configs', 'tiny_finetune.yaml'), '-data_path',
                str(data_path), '-pretrained', ckpt, '-eval', '-opts', 'MODEL.NUM_CLASSES',
                '1000', 'DATA.BATCH_SIZE_EVAL', '5', 'DATA.NUM_WORKERS', str(workers)]
        r = subprocess.run(cmd + list(opts), capture_output=True, text=True, cwd=ROOT,
                           timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        out = r.stdout
        if nproc > 1:
            out = (tmp_path / 'launch' / 'workerlog.0').read_text()
        return json.loads([x for x in out.splitlines() if x.startswith('{')][-1])

    ref = evaluate(root / 'lists')
    assert ref['n'] == 16
    hf = ('DATA.VAL_PARQUET', 'data/validation-*.parquet')
    runs = {'folders, 2 workers': evaluate(root / 'folders', workers=2),
            'folders of 4 classes': evaluate(root / 'subset'),
            'shards': evaluate(root, 'DATA.VAL_SHARDS', 'shards/val-{0..1}.tar'),
            'parquet': evaluate(root / 'hf', *hf),
            'parquet, 2 workers': evaluate(root / 'hf', *hf, workers=2),
            'parquet, 2 processes': evaluate(root / 'hf', *hf, nproc=2),
            'lists, 2 processes x 2 workers': evaluate(root / 'lists', nproc=2, workers=2)}
    for name, got in runs.items():
        assert got['n'] == ref['n'] and got['val_acc1'] == ref['val_acc1'], name
        assert got['val_loss'] == pytest.approx(ref['val_loss'], rel=1e-5), name


@pytest.mark.slow
def test_kill_and_resume_over_parquet_is_exact(tmp_path):
    """Pre-training over parquet, 2 workers: kill -9 mid-epoch 1 + -resume auto ends with the
    parameters of an uninterrupted run."""
    for s in range(2):
        write_parquet(str(tmp_path / f'train-{s}.parquet'),
                      [(jpeg(s * 100 + i, (36, 36)), None) for i in range(15)], row_group_size=4)
    opts = TINY_ARCH + ['TRAIN.NUM_EPOCHS', '3', 'TRAIN.WARMUP_EPOCHS', '1',
                        'DATA.NUM_WORKERS', '2', 'SAVE_FREQ_ITERS', '2', 'SAVE_FREQ', '1',
                        'DATA.TRAIN_PARQUET', 'train-*.parquet']
    r, _, _, d = H.kill_and_resume(('-data_path', str(tmp_path), '-batch_size', '4'), opts,
                                   tmp_path)
    assert ' 7 iterations/epoch' in r.stdout + r.stderr  # 30 rows // 4
    print(f'parquet, resumed vs uninterrupted: max abs param diff {d:.2e}')
    assert d < 1e-5


@pytest.mark.slow
def test_user_mistakes_are_one_line(imagenet, classifier, tmp_path):
    """Through the entry point: a corrupt row, a missing label column, a file that is not
    parquet -> exit 2 (a user's mistake), one line on stderr, no traceback."""
    root, rows = imagenet
    write_parquet(str(tmp_path / 'corrupt.parquet'), rows[:2] + [(b'\xff\xd8broken', 0)])
    pq.write_table(pa.table({'image': [rows[0][0]]}), str(tmp_path / 'nolabel.parquet'))
    (tmp_path / 'text.parquet').write_text('path label\n')
    want = {'corrupt': f'cannot read image {tmp_path}/corrupt.parquet row 2: ',
            'nolabel': f"{tmp_path}/nolabel.parquet: no column 'label'",
            'text': f'{tmp_path}/text.parquet: not a parquet file ('}
    for name, start in want.items():
        r = run('main_multi_gpu_finetune.py', 'tiny_finetune.yaml', '-data_path', str(tmp_path),
                '-pretrained', classifier, '-eval', check=False,
                opts=['MODEL.NUM_CLASSES', '1000', 'DATA.NUM_WORKERS', '0',
                      'DATA.VAL_PARQUET', f'{name}.parquet'])
        lines = [x for x in r.stderr.splitlines() if x.strip()]
        assert r.returncode == 2 and 'Traceback' not in r.stderr, r.stderr
        assert any(x.startswith('error: ' + start) or x.startswith(start) for x in lines), \
            r.stderr


# ------------------------------------------------------------------------- class identity

def test_labels_are_compared_by_name(tmp_path):
    """cli.same_classes: equal names (ImageNet words = WordNet ids) go; class folders that are
    some of the checkpoint's classes are relabelled to its order; names of another order or
    spelling are one line; one side without names goes on, with a note."""
    import cli  # (the entry points' module: imported here so the data tests need no model)
    notes = []
    for name in ('zebra', 'ant'):
        d = tmp_path / 'val' / name
        d.mkdir(parents=True)
        H.noise_image(8, 8).save(d / 'a.png')
    folders = datasets.ImageFolderDataset(str(tmp_path / 'val'))
    assert folders.classes == ['ant', 'zebra'] and folders.labels.tolist() == [0, 1]
    with pytest.raises(cli.UserError) as e:  # some of 3 classes, and no names to map them
        cli.same_classes(None, folders, 'M', 'D', notes.append, num_classes=3)
    assert str(e.value) == ('D has 2 classes (ant, zebra, ...), the model 3, and M names none: '
                            'which of its classes the data hold cannot be told')
    cli.same_classes({'classes': ['zebra', 'cat', 'ant']}, folders, 'M', 'D', notes.append)
    assert folders.labels.tolist() == [2, 0] and folders.classes == ['zebra', 'cat', 'ant']
    assert notes == ['the labels of D follow the 3 classes of M']

    class Numbered:
        def __init__(self, classes):
            self.classes = classes

        def follow_classes(self, names):
            return False
    cli.same_classes({'classes': WNIDS}, Numbered(WORDS), 'M', 'D', notes.append)
    with pytest.raises(cli.UserError) as e:
        cli.same_classes({'classes': ['a', 'b', 'c']}, Numbered(['a', 'c', 'b']), 'M', 'D',
                         notes.append)
    assert str(e.value) == ("D and M do not mean the same classes: the same 3 classes in another "
                            "order: 'b' is label 1 in M but 2 in D, 'c' is label 2 in M but 1 "
                            "in D")
    cli.same_classes({'classes': None}, Numbered(['a']), 'M', 'D', notes.append)
    assert notes[-1] == 'note: M names no classes: its labels are taken to mean the classes of D'


@pytest.mark.slow
def test_eval_refuses_data_of_other_classes(imagenet, classifier, tmp_path):
    """-eval of an ImageNet classifier: a parquet whose names are in another order, and a
    folder whose class is spelt otherwise -> exit 2, one line; nothing evaluated."""
    root, rows = imagenet
    words = WORDS[:]
    words[0], words[1] = words[1], words[0]
    write_parquet(str(tmp_path / 'swapped.parquet'), rows, schema=hf_schema(words))
    for w in [WNIDS[0].upper()] + WNIDS[1:]:  # all 1000 classes, one spelt otherwise
        (tmp_path / 'folders' / 'val' / w).mkdir(parents=True)
    (tmp_path / 'folders' / 'val' / WNIDS[0].upper() / 'a.JPEG').write_bytes(rows[0][0])
    for data_path, opts, says in (
            (tmp_path, ['DATA.VAL_PARQUET', 'swapped.parquet'],
             f"the evaluation data and {classifier} do not mean the same classes: the same 1000 "
             f"classes in another order: 'n01440764' is label 0 in"),
            (tmp_path / 'folders', [],
             f"the evaluation data and {classifier} do not mean the same classes: the 1000 "
             f"class names differ: the evaluation data has 'N01440764', which {classifier} "
             f"does not; {classifier} has 'n01440764', which the evaluation data does not")):
        r = run('main_multi_gpu_finetune.py', 'tiny_finetune.yaml', '-data_path',
                str(data_path), '-pretrained', classifier, '-eval', check=False,
                opts=['MODEL.NUM_CLASSES', '1000', 'DATA.NUM_WORKERS', '0'] + opts)
        assert r.returncode == 2 and f'error: {says}' in r.stderr, r.stderr
        assert not r.stdout.strip()


@pytest.mark.slow
def test_demo_lists_and_folders_mean_one_map(tmp_path):
    """The demo set's list files number the classes in their own order, its folders sort by
    name: -eval of a model that carries the lists' names gives the same metrics on both (the
    folders are relabelled by name)."""
    sys.path.insert(0, os.path.join(ROOT, 'tools'))
    import make_demo_dataset
    demo, folders = tmp_path / 'demo', tmp_path / 'folders'
    make_demo_dataset.make(str(demo), train_per_class=1, val_per_class=2, size=32,
                           log=lambda m: None)
    assert classnames.read_classes(str(demo / 'classes.txt')) == list(make_demo_dataset.CLASSES)
    folders.mkdir()
    for split in ('train', 'val'):
        (folders / split).symlink_to(demo / split)
    cfg = H.tiny_config(DATA__DATA_PATH=str(demo))
    ds = sources.build_dataset(cfg, is_train=False)
    paddle.seed(1)
    ckpt = str(tmp_path / 'm.pdparams')
    paddle.save(dict(tasks.get_task(cfg).build_model().state_dict(),
                     _meta=checkpoint.run_meta(cfg, ds.classes)), ckpt)
    got = []
    for data_path in (demo, folders):
        r = run('main_multi_gpu_finetune.py', 'tiny_finetune.yaml', '-data_path',
                str(data_path), '-pretrained', ckpt, '-eval',
                opts=['DATA.NUM_WORKERS', '0'])
        got.append(json.loads(r.stdout.strip().splitlines()[-1]))
    assert 'follow the 10 classes' in r.stderr
    assert got[0]['n'] == got[1]['n'] == 20 and got[0]['val_acc1'] == got[1]['val_acc1']
    assert got[1]['val_loss'] == pytest.approx(got[0]['val_loss'], rel=1e-5)
