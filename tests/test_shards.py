"""Tar shards (DATA.TRAIN_SHARDS / VAL_SHARDS, shards.py, tools/make_shards.py): the same samples
as the list files, the loaders' guarantees over 1 / 2 ranks x 0 / 2 workers, bad shards."""
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import paddle
import pytest

import helpers as H
import datasets
import sources
import shards
from config import ConfigError
from conftest import ROOT
from helpers import TINY_ARCH, kill_and_resume, run

sys.path.insert(0, os.path.join(ROOT, 'tools'))
import make_demo_dataset  # noqa: E402
import make_shards  # noqa: E402

TINY = ['MODEL.ENCODER.EMBED_DIM', '48', 'MODEL.ENCODER.DEPTH', '2', 'MODEL.ENCODER.NUM_HEADS',
        '3']


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    """30 train / 20 val demo images; train shards of 7 (7, 7, 7, 7, 2) written by the function,
    val shards of 6 (6, 6, 6, 2) by the command line."""
    out = str(tmp_path_factory.mktemp('demo'))
    make_demo_dataset.make(out, train_per_class=3, val_per_class=2, size=24, log=lambda m: None)
    samples, _ = make_shards.read_source(out, 'train')
    paths, _ = make_shards.make_shards(samples, os.path.join(out, 'shards'), 'train',
                                       samples_per_shard=7)
    train = make_shards.pattern_of(paths, out)
    r = subprocess.run([sys.executable, os.path.join(ROOT, 'tools', 'make_shards.py'),
                        '--data-path', out, '--split', 'val', '--samples-per-shard', '6'],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    key, val = r.stdout.split()[-2:]
    assert key == 'DATA.VAL_SHARDS'
    return out, train, val.strip("'")


def test_brace_expansion():
    assert shards.braceexpand('t-{0000..0002}.tar') == ['t-0000.tar', 't-0001.tar',
                                                       't-0002.tar']
    assert shards.braceexpand('{a,b}-{8..10}') == ['a-8', 'a-9', 'a-10', 'b-8', 'b-9', 'b-10']
    assert shards.braceexpand('x{y}z') == ['x{y}z']
    assert shards.expand('s/t-{0..1}.tar', '/d') == ['/d/s/t-0.tar', '/d/s/t-1.tar']
    assert shards.expand('/abs/t-{0..1}.tar', '/d') == ['/abs/t-0.tar', '/abs/t-1.tar']
    assert shards.expand('pipe:curl -s http://h/t-{0..1}.tar') == [
        'pipe:curl -s http://h/t-0.tar', 'pipe:curl -s http://h/t-1.tar']
    with pytest.raises(ConfigError, match='unbalanced'):
        shards.expand('t-{0..1.tar', '/d')


@pytest.mark.slow
def test_shards_hold_exactly_the_list_samples(data):
    root, train, val = data
    assert train == 'shards/train-{0000..0004}.tar' and val == 'shards/val-{0000..0003}.tar'
    for split, pattern in (('train', train), ('val', val)):
        srcs = shards.expand(pattern, root)
        listed = datasets.ImageListDataset(root, os.path.join(root, f'{split}_list.txt'))
        ds = shards.ShardDataset(srcs, num_classes=10)
        assert len(ds) == len(listed)
        counts = [len(shards.load_index(s)['samples']) for s in srcs]
        assert counts == ([7, 7, 7, 7, 2] if split == 'train' else [6, 6, 6, 2])
        for i in range(len(ds)):
            img, label, sid = ds[i]
            ref, ref_label, _ = listed[i]
            assert np.array_equal(np.asarray(img), np.asarray(ref))  # same decoded pixels
            assert label == ref_label and sid == i
    # a missing index is built again by scanning, the same
    first = shards.expand(train, root)[0]
    with open(shards.index_path(first)) as f:
        written = json.load(f)
    os.remove(shards.index_path(first))
    assert shards.load_index(first) == written and os.path.isfile(shards.index_path(first))


def _config(root, **keys):
    return H.tiny_config('finetune', **{'DATA__DATA_PATH': root, 'DATA__BATCH_SIZE': 4,
                                        'DATA__BATCH_SIZE_EVAL': 3, **keys})


_PIXELS = {}  # sample id -> its training image in epoch 1, over both parametrisations


@pytest.mark.slow
@pytest.mark.parametrize('workers', [0, 2])
def test_every_sample_once_over_ranks_and_workers(data, workers):
    """Training: 2 ranks see the global batches of 1 rank with twice the batch, each sample at
    most once (30 samples, batch 4: 28 / 24 used, what drop_last forces), each with the same
    augmentation, and a loader resumed mid-epoch gives the rest exactly; evaluation: every sample exactly once, whatever ranks x workers."""
    root, train, val = data
    cfg = _config(root, DATA__TRAIN_SHARDS=train, DATA__VAL_SHARDS=val,
                  DATA__NUM_WORKERS=workers)
    train_ds, val_ds = sources.build_dataset(cfg, True), sources.build_dataset(cfg, False)
    assert len(train_ds) == 30 and len(val_ds) == 20
    pixels, global_batches = _PIXELS, {}
    for ranks in (1, 2):
        loaders = [datasets.build_loader(cfg, train_ds, True, num_replicas=ranks, rank=r)
                   for r in range(ranks)]
        per_rank = []
        for loader in loaders:
            loader.set_epoch(1)
            per_rank.append([(b[0].numpy(), b[2].numpy()) for b in loader])
        got = [np.concatenate([per_rank[r][k][1] for r in range(ranks)])
               for k in range(len(per_rank[0]))]
        ids = np.concatenate(got)
        assert len(set(ids.tolist())) == len(ids) == (28 if ranks == 1 else 24)
        global_batches[ranks] = [sorted(g.tolist()) for g in got]
        for loader, full in zip(loaders, per_rank):  # resumed at batch 2: the same rest
            loader.set_epoch(1, 2)
            rest = [(b[0].numpy(), b[2].numpy()) for b in loader]
            assert len(rest) == len(full) - 2
            assert all(np.array_equal(a[1], b[1]) and np.array_equal(a[0], b[0])
                       for a, b in zip(rest, full[2:]))
        for batches in per_rank:
            for imgs, sids in batches:
                for img, sid in zip(imgs, sids):
                    if int(sid) in pixels:
                        assert np.array_equal(pixels[int(sid)], img)  # seeded by (SEED, 1, id)
                    pixels[int(sid)] = img
        seen = []
        for r in range(ranks):
            loader = datasets.build_loader(cfg, val_ds, False, num_replicas=ranks, rank=r)
            for b in loader:
                seen += b[2].numpy().tolist()
                assert b[1].numpy().tolist() == [int(val_ds.labels[i]) for i in
                                                 b[2].numpy()]
        assert sorted(seen) == list(range(20))
    # global batch k of 2 ranks x 4 = the first 8 of the 1-rank order's batches k, k+1
    one = [i for b in global_batches[1] for i in b]
    for k, g in enumerate(global_batches[2]):
        assert sorted(one[8 * k:8 * k + 8]) == g


def _piped(root, pattern):
    """The same shards as pipe: sources (streamed, not seeked)."""
    return 'pipe:cat ' + os.path.join(root, pattern)


@pytest.mark.slow
@pytest.mark.parametrize('workers', [0, 2])
def test_streamed_every_sample_once_over_ranks_and_workers(data, workers):
    """pipe: shards: per epoch each process gets T // (R*B) batches (30 samples, batch 4:
    7 x 4 with 1 rank, 3 x 4 each with 2), the used samples are distinct (only what the batch
    size forces is left out), each has the same augmentation as from the seekable shards
    (seeded by (SEED, epoch, id)), shard order and buffer differ between epochs, a loader
    resumed at batch 2 gives the rest exactly; evaluation: every sample exactly once, labels
    right, whatever ranks x workers."""
    root, train, val = data
    cfg = _config(root, DATA__TRAIN_SHARDS=_piped(root, train),
                  DATA__VAL_SHARDS=_piped(root, val), DATA__NUM_WORKERS=workers,
                  DATA__SHARD_SHUFFLE_BUFFER=5)
    train_ds, val_ds = sources.build_dataset(cfg, True), sources.build_dataset(cfg, False)
    assert isinstance(train_ds, shards.ShardStream) and (len(train_ds), len(val_ds)) == (30, 20)
    with open(os.path.join(root, shards.COUNTS_FILE)) as f:  # counted once, kept
        assert sorted(json.load(f).values()) == [2, 2, 6, 6, 6, 7, 7, 7, 7]
    seekable = shards.ShardDataset(shards.expand(train, root), transform=train_ds.transform,
                                   num_classes=10)
    seekable.augment_seed, seekable.augment_epoch = cfg.SEED, 1
    listed = datasets.ImageListDataset(root, os.path.join(root, 'val_list.txt'))
    for ranks in (1, 2):
        orders = {}
        for epoch in (1, 2):
            ids = []
            for r in range(ranks):
                loader = datasets.build_loader(cfg, train_ds, True, num_replicas=ranks, rank=r)
                loader.set_epoch(epoch)
                full = [(b[0].numpy(), b[1].numpy(), b[2].numpy()) for b in loader]
                assert len(full) == len(loader) == (7 if ranks == 1 else 3)
                assert all(len(b[2]) == 4 for b in full)
                ids += [int(i) for b in full for i in b[2]]
                if epoch == 1:
                    for imgs, labels, sids in full[:2]:
                        for img, label, sid in zip(imgs, labels, sids):
                            ref_img, ref_label, _ = seekable[int(sid)]
                            assert np.array_equal(img, ref_img) and label == ref_label
                    loader.set_epoch(1, 2)
                    rest = [(b[0].numpy(), b[2].numpy()) for b in loader]
                    assert len(rest) == len(full) - 2
                    assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[2])
                               for a, b in zip(rest, full[2:]))
            assert len(set(ids)) == len(ids) == (28 if ranks == 1 else 24)
            orders[epoch] = ids
        assert orders[1] != orders[2]
        seen = []
        for r in range(ranks):
            for b in datasets.build_loader(cfg, val_ds, False, num_replicas=ranks, rank=r):
                seen += b[2].numpy().tolist()
                assert b[1].numpy().tolist() == [int(listed.labels[i]) for i in b[2].numpy()]
        assert sorted(seen) == list(range(20))


@pytest.mark.slow
def test_eval_over_shards_equals_eval_over_lists(data, tmp_path):
    root, _, val = data
    cfg = _config(root)
    import tasks
    paddle.seed(0)
    ckpt = str(tmp_path / 'vit.pdparams')
    paddle.save(tasks.get_task(cfg).build_model().state_dict(), ckpt)

    def evaluate(*opts, nproc=1):
        cmd = [sys.executable]
        if nproc > 1:
            cmd += ['-m', 'paddle.distributed.launch', '--nproc_per_node', str(nproc),
                    '--log_dir', str(tmp_path / 'launch')]
        cmd += [os.path.join(ROOT, 'main_multi_gpu_finetune.py'), '-cfg',
                os.path.join(ROOT, 'configs', 'tiny_finetune.yaml'), '-data_path', root,
                '-pretrained', ckpt, '-eval', '-opts', 'DATA.NUM_WORKERS', '0',
                'DATA.BATCH_SIZE_EVAL', '6'] + list(opts)
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        stdout = r.stdout
        if nproc > 1:  # the JSON line comes from rank 0's log
            with open(tmp_path / 'launch' / 'workerlog.0') as f:
                stdout = f.read()
        return json.loads([x for x in stdout.splitlines() if x.startswith('{')][-1])

    lists = evaluate()
    assert lists['n'] == 20
    assert evaluate('DATA.VAL_SHARDS', val) == lists
    for source in (val, _piped(root, val)):  # seeked, streamed
        two = evaluate('DATA.VAL_SHARDS', source, nproc=2)
        assert two['n'] == 20 and two['val_acc1'] == lists['val_acc1']
        assert two['val_loss'] == pytest.approx(lists['val_loss'], rel=1e-5)
    assert evaluate('DATA.VAL_SHARDS', _piped(root, val), 'DATA.NUM_WORKERS', '2') == lists


@pytest.mark.slow
@pytest.mark.parametrize('kind', ['seek', 'pipe'])
def test_kill_and_resume_over_shards_is_exact(data, tmp_path, kind):
    """Pre-training over shards (masks and augmentation per sample id), 2 workers: kill -9
    mid-epoch 1 + -resume auto ends with the parameters of an uninterrupted run."""
    root, train, _ = data
    pattern = _piped(root, train) if kind == 'pipe' else train
    opts = TINY_ARCH + ['TRAIN.NUM_EPOCHS', '3', 'TRAIN.WARMUP_EPOCHS', '1',
                        'DATA.NUM_WORKERS', '2', 'SAVE_FREQ_ITERS', '2', 'SAVE_FREQ', '1',
                        'DATA.TRAIN_SHARDS', pattern, 'DATA.SHARD_SHUFFLE_BUFFER', '5']
    args = ('-data_path', root, '-batch_size', '4')

    def other_plan(killed):  # resumed under another plan (no workers): said, not silent
        other = str(tmp_path / 'other')
        shutil.copytree(killed, other)
        r = run('main_multi_gpu_pretrain.py', 'tiny_pretrain.yaml', *args, '-output', other,
                '-resume', 'auto', opts=opts + ['DATA.NUM_WORKERS', '0'])
        assert re.search(r'warning: epoch 1 began with \(processes, loader workers, batch\) = '
                         r'\(1, 2, 4\) over streamed shards and goes on with \(1, 0, 4\)',
                         r.stdout + r.stderr), r.stdout
    first, r, _, d = kill_and_resume(args, opts, tmp_path,
                                     between=other_plan if kind == 'pipe' else None)
    assert ' 7 iterations/epoch' in first.stdout + first.stderr  # 30 samples // 4
    assert re.search(r'resumed from .*: epoch 1, iteration [1-9]', r.stdout), r.stdout
    assert 'planned anew' not in r.stdout + r.stderr
    print(f'{kind} shards, resumed vs uninterrupted: max abs param diff {d:.2e}')
    assert d < 1e-5


# --------------------------------------------------------------------------------- bad shards

def _good(tmp_path):
    return H.write_tar(tmp_path / 'good.tar', [
        m for i in range(3) for m in ((f'g{i}.png', H.png_bytes(i)), (f'g{i}.cls', b'%d' % i))])


def _bad_shard(tmp_path, case):
    """-> (shard path, the member the message must name)."""
    if case == 'undecodable':
        return H.write_tar(tmp_path / 'bad.tar', [
            ('a.png', H.png_bytes(0)), ('a.cls', b'0'), ('b.jpg', b'not an image at all'),
            ('b.cls', b'4'), ('c.png', H.png_bytes(1)), ('c.cls', b'5')]), 'b.jpg'
    if case == 'no_cls':
        return H.write_tar(tmp_path / 'bad.tar', [
            ('a.png', H.png_bytes(0)), ('a.cls', b'0'), ('b.png', H.png_bytes(2)),
            ('b.json', b'{}'), ('c.png', H.png_bytes(1)), ('c.cls', b'5')]), 'b.cls'
    assert case == 'truncated'
    path = H.write_tar(tmp_path / 'bad.tar', [
        ('a.png', H.png_bytes(0)), ('a.cls', b'0'), ('c.png', H.png_bytes(1)), ('c.cls', b'5'),
        ('b.png', H.png_bytes(3)), ('b.cls', b'4')])
    with tarfile.open(path) as tar:
        cut = tar.getmember('b.png').offset_data + 20
    with open(path, 'r+b') as f:
        f.truncate(cut)
    return path, 'b.png'


@pytest.mark.parametrize('case', ['truncated', 'undecodable', 'no_cls'])
@pytest.mark.parametrize('kind', ['seek', pytest.param('pipe', marks=pytest.mark.slow)])
def test_bad_shards(tmp_path, case, kind):
    good = _good(tmp_path)
    bad, member = _bad_shard(tmp_path, case)
    piped = kind == 'pipe'
    srcs = [f'pipe:cat {s}' if piped else s for s in (good, bad)]
    cfg = _config(str(tmp_path), DATA__NUM_WORKERS=2, DATA__VAL_SHARDS='::'.join(srcs))
    # 'error': one line naming shard and member (at build time, or from the loader in the
    # main thread: an image that does not decode; any problem of a streamed shard)
    with pytest.raises(datasets.DataError) as e:
        ds = sources.build_dataset(cfg, False)
        for _ in datasets.build_loader(cfg, ds, False, num_replicas=1, rank=0):
            pass
    message = str(e.value)
    assert '\n' not in message and bad in message and member in message, message
    # 'skip': the sample is left out and counted; evaluation counts the others once each
    cfg.defrost()
    cfg.DATA.ON_BAD_IMAGE = 'skip'
    ds = sources.build_dataset(cfg, False)
    assert isinstance(ds, shards.ShardStream if piped else shards.ShardDataset)
    assert len(ds) == 6
    labels = []
    for b in datasets.build_loader(cfg, ds, False, num_replicas=1, rank=0):
        labels += b[1].numpy().tolist()
    assert ds.num_skipped == 1
    assert sum(x != datasets.IGNORE_LABEL for x in labels) == 5
    # pre-training needs no labels: a sample without .cls is a sample
    if case == 'no_cls' and not piped:
        ds = shards.ShardDataset(srcs, need_labels=False)
        assert ds[4][1] == datasets.IGNORE_LABEL and np.asarray(ds[4][0]).shape == (8, 8, 3)


def test_truncated_header_and_pipe_sources(tmp_path):
    path = H.write_tar(tmp_path / 'cut.tar', [
        ('a.png', H.png_bytes(0)), ('a.cls', b'0'), ('b.png', H.png_bytes(1)), ('b.cls', b'1')])
    with tarfile.open(path) as tar:
        cut = tar.getmember('b.png').offset + 100  # inside b.png's header
    with open(path, 'r+b') as f:
        f.truncate(cut)
    with pytest.raises(datasets.DataError, match=r'cut\.tar: .*truncated or corrupt'):
        shards.ShardDataset([path], num_classes=10)
    ds = shards.ShardDataset([path], num_classes=10, on_bad_image='skip')
    assert len(ds) == 2 and ds.labels.tolist() == [0, datasets.IGNORE_LABEL]
    with pytest.raises(ConfigError, match='pipe: sources'):
        shards.ShardDataset(['pipe:cat x.tar'])


@pytest.mark.slow
def test_failing_pipe_command(tmp_path):
    """A command that fails while counting or while training: one line with its exit code and
    what it printed."""
    good = _good(tmp_path)
    missing = f'pipe:cat {tmp_path}/missing.tar'
    with pytest.raises(datasets.DataError, match=r'missing\.tar: the command exited with code 1'
                                                 r': cat: .*missing\.tar'):
        shards.source_counts([missing], str(tmp_path))
    # counted ahead by the tool (and its error: one line, exit 2)
    tool = [sys.executable, os.path.join(ROOT, 'tools', 'make_shards.py'), '--data-path',
            str(tmp_path), '--count']
    r = subprocess.run(tool + [f'pipe:cat {good}'], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith('3 samples in 1 shard(s)'), r.stderr
    with open(os.path.join(str(tmp_path), shards.COUNTS_FILE)) as f:
        assert json.load(f) == {f'pipe:cat {good}': 3}
    r = subprocess.run(tool + [missing], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count('\n') <= 2 and 'exited with code 1' in r.stderr
    # counted while the file was there, gone at training time
    moved = str(tmp_path / 'moved.tar')
    os.link(good, moved)
    cfg = _config(str(tmp_path), DATA__TRAIN_SHARDS=f'pipe:cat {moved}', DATA__BATCH_SIZE=3)
    ds = sources.build_dataset(cfg, True)
    os.remove(moved)
    with pytest.raises(datasets.DataError) as e:
        for _ in datasets.build_loader(cfg, ds, True, num_replicas=1, rank=0):
            pass
    assert 'moved.tar' in str(e.value) and 'exited with code 1' in str(e.value), str(e.value)
    # a count that is too small (the shard grew): the epoch's plan is wrong, stop
    counts = os.path.join(str(tmp_path), shards.COUNTS_FILE)
    with open(counts, 'w') as f:
        json.dump({f'pipe:cat {good}': 2}, f)
    cfg = _config(str(tmp_path), DATA__TRAIN_SHARDS=f'pipe:cat {good}', DATA__BATCH_SIZE=2,
                  DATA__ON_BAD_IMAGE='skip')
    with pytest.raises(datasets.DataError, match=r'good\.tar holds more samples than counted '
                                                 r'\(2\): the count may be stale; delete its '
                                                 r'entry in \S+/shard_counts\.json to count'):
        for _ in datasets.build_loader(cfg, sources.build_dataset(cfg, True), True,
                                       num_replicas=1, rank=0):
            pass
