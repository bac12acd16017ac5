"""Shard faults a user meets with exit code 0 elsewhere, through the entry points: an index of a
shard rewritten in place, streams cut with the command exiting 0, make_shards re-run into its own
folder, a val folder missing a class, pipe: commands of several processes outliving the run,
and the progress lines of long steps (shards.py, tools/make_shards.py)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import paddle
import pytest

import helpers as H
import datasets
import shards
import sources
import tasks
from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, 'tools'))
import make_demo_dataset  # noqa: E402
import make_shards  # noqa: E402

TOOL = os.path.join(ROOT, 'tools', 'make_shards.py')


@pytest.fixture(scope='module')
def demo(tmp_path_factory):
    """20 val demo images (10 classes, list files) and a tiny 10-class classifier."""
    root = str(tmp_path_factory.mktemp('demo'))
    make_demo_dataset.make(root, train_per_class=1, val_per_class=2, size=24, log=lambda m: None)
    return root, _checkpoint(root, 10)


def _checkpoint(root, classes):
    cfg = H.tiny_config('finetune', DATA__DATA_PATH=root, MODEL__NUM_CLASSES=classes)
    paddle.seed(0)
    path = os.path.join(root, f'vit{classes}.pdparams')
    paddle.save(tasks.get_task(cfg).build_model().state_dict(), path)
    return path


def _tool(*args):
    return subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def _eval_cmd(root, ckpt, *opts):
    return [sys.executable, os.path.join(ROOT, 'main_multi_gpu_finetune.py'), '-cfg',
            os.path.join(ROOT, 'configs', 'tiny_finetune.yaml'), '-data_path', root,
            '-pretrained', ckpt, '-eval', '-opts', 'DATA.NUM_WORKERS', '0',
            'DATA.BATCH_SIZE_EVAL', '10', *opts]


def _eval(root, ckpt, *opts, ok=True):
    """-eval as a user types it -> (process result, its JSON line or None)."""
    r = subprocess.run(_eval_cmd(root, ckpt, *opts), capture_output=True, text=True, cwd=ROOT,
                       timeout=300)
    if ok:
        assert r.returncode == 0, r.stderr[-3000:]
        return r, json.loads([x for x in r.stdout.splitlines() if x.startswith('{')][-1])
    return r, None


def _error_line(r):
    """The one 'error: ...' line of a run that stopped on a user's mistake (exit 2)."""
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    lines = [x for x in r.stderr.splitlines() if x.startswith('error: ')]
    assert len(lines) == 1 and not any('Traceback' in x for x in r.stderr.splitlines()), r.stderr
    return lines[0]


def _good(path, n=4):
    return H.write_tar(path, [m for i in range(n) for m in ((f'g{i}.png', H.png_bytes(i)),
                                                            (f'g{i}.cls', b'%d' % i))])


def _rewrite_labels(shard, change):
    """Rewrite a shard in place (same file, same size) with each label changed."""
    with tarfile.open(shard) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar]
    members = [(name, b'%d' % change(int(data)) if name.endswith('.cls') else data)
               for name, data in members]
    H.write_tar(shard, members)


# ------------------------------------------------------------------------------- stale index

@pytest.mark.slow
def test_index_of_a_shard_rewritten_in_place_is_rebuilt(demo, tmp_path):
    """A shard rewritten in place to the same size: the seeked reader serves the new labels,
    as the stream of the same file does, and says why it indexed again; a rewrite that also
    kept the modification time is caught when the sample is read."""
    root, ckpt = demo
    out = str(tmp_path / 'shards')
    r = _tool('--data-path', root, '--split', 'val', '--samples-per-shard', '10', '--out', out)
    assert r.returncode == 0, r.stderr
    pattern = os.path.join(out, 'val-{0000..0001}.tar')
    _, before = _eval(root, ckpt, 'DATA.VAL_SHARDS', pattern)
    assert before['n'] == 20
    shard = os.path.join(out, 'val-0000.tar')
    indexed = os.stat(shard)
    _rewrite_labels(shard, lambda label: (label + 3) % 10)
    st = os.stat(shard)
    assert st.st_size == indexed.st_size  # (tar pads to 10 KiB: a size check cannot see it)
    if st.st_mtime_ns == indexed.st_mtime_ns:  # (a coarse file-system clock)
        os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
    r, seeked = _eval(root, ckpt, 'DATA.VAL_SHARDS', pattern)
    _, streamed = _eval(root, ckpt, 'DATA.VAL_SHARDS', 'pipe:cat ' + pattern)
    assert seeked == streamed and seeked['val_loss'] != before['val_loss']
    assert (f'{shard}: the file was modified after its index was made; the labels differ from '
            f'the old index: indexed again') in r.stderr, r.stderr
    # rewritten once more with size and modification time kept: the read finds the .cls changed
    with open(shards.index_path(shard)) as f:
        index = json.load(f)
    _rewrite_labels(shard, lambda label: (label + 1) % 10)
    st = os.stat(shard)
    os.utime(shard, ns=(st.st_atime_ns, index['shard_mtime_ns']))
    ds = shards.ShardDataset(shards.expand(pattern), num_classes=10)
    with pytest.raises(datasets.BadImageError) as e:
        ds[0]
    assert (f'its .cls member reads ' in str(e.value) and
            f'delete {shards.index_path(shard)} to index it again' in str(e.value)), str(e.value)


# -------------------------------------------------------------------------------- cut streams

def _cut_source(tmp_path, where):
    """A pipe: command that prints a tar of 4 samples cut off and exits 0 -> (source, the
    samples before the cut)."""
    good = _good(tmp_path / 'whole.tar')
    with tarfile.open(good) as tar:
        third = tar.getmember('g2.png').offset  # the header of sample 3
    size = {'boundary': third, 'header': third + 100}[where]
    return f'pipe:head -c {size} {good}', 2


@pytest.mark.slow
@pytest.mark.parametrize('where', ['boundary', 'header'])
def test_count_refuses_a_cut_stream(tmp_path, where):
    """make_shards.py --count: a stream cut at a member boundary or inside a header (the
    command exiting 0) is an error naming it, and its count is not kept."""
    cut, _ = _cut_source(tmp_path, where)
    good = _good(tmp_path / 'good.tar')
    r = _tool('--data-path', str(tmp_path), '--count', f'pipe:cat {good}::{cut}')
    line = _error_line(r)
    assert line.startswith(f'error: cannot count the samples of {cut}: the stream ends ')
    assert line.endswith('(a cut tar); its count is not kept'), line
    with open(tmp_path / shards.COUNTS_FILE) as f:
        assert json.load(f) == {f'pipe:cat {good}': 4}  # the whole one kept, not the cut one


@pytest.mark.slow
def test_eval_over_a_cut_stream(demo, tmp_path):
    """-eval over a stream cut at a member boundary: 'error' stops with one line naming the
    shard; 'skip' evaluates the samples before the cut (the cut one bad sample) and keeps no
    count of it; a count that no longer fits says how to count again."""
    _, ckpt = demo
    root = str(tmp_path)
    good = _good(tmp_path / 'good.tar')
    cut, before_cut = _cut_source(tmp_path, 'boundary')
    line = _error_line(_eval(root, ckpt, 'DATA.VAL_SHARDS', cut, ok=False)[0])
    assert cut in line and 'without the end-of-archive blocks of a tar (a cut tar)' in line, line
    r, result = _eval(root, ckpt, 'DATA.VAL_SHARDS', f'pipe:cat {good}::{cut}',
                      'DATA.ON_BAD_IMAGE', 'skip')
    assert result['n'] == 4 + before_cut
    assert 'not kept in' in r.stderr
    counts = os.path.join(root, shards.COUNTS_FILE)
    with open(counts) as f:
        assert json.load(f) == {f'pipe:cat {good}': 4}
    # a stored count that is too large (the shard shrank, its tar complete)
    with open(counts, 'w') as f:
        json.dump({f'pipe:cat {good}': 6}, f)
    line = _error_line(_eval(root, ckpt, 'DATA.VAL_SHARDS', f'pipe:cat {good}', ok=False)[0])
    assert (f'the stream ended after 4 of the 6 samples counted and the tar is complete: the '
            f'count may be stale; delete its entry in {counts} to count it again') in line, line


def test_cut_streams_read(tmp_path):
    """The reader of a counted stream that turns out cut (command exiting 0): the samples
    before the cut, then bad samples, with 'error' one line; cut after all counted samples:
    'error' stops, 'skip' loses nothing."""
    good = _good(tmp_path / 'good.tar')
    with tarfile.open(good) as tar:
        end, third = tar.getmember('g3.cls').offset_data + 512, tar.getmember('g2.png').offset
    for size, n, read in ((end, 4, 4), (third, 4, 2)):
        src = f'pipe:head -c {size} {good}'
        items = list(shards.stream_samples(src, read_images=False))
        assert [x[0] for x in items[:read]] == [f'g{i}' for i in range(read)]
        assert items[-1][5] == 'cut' and len(items) == read + 1
        for mode in ('error', 'skip'):
            ds = shards.ShardStream([src], [n], on_bad_image=mode, key_name='DATA.VAL_SHARDS',
                                    num_classes=10, root=str(tmp_path))
            ds.configure(4, 0, 1, 0)
            if mode == 'error':
                with pytest.raises(datasets.DataError, match=r'pipe:head .* member <after byte '
                                                             r'\d+>: the stream ends after'):
                    list(ds)
            else:
                got = [int(label) for _, label, _ in ds]
                assert got == ([0, 1, 2, 3] if read == 4 else [0, 1, 1, 1])  # (replaced)
                assert ds.num_skipped == n - read


# ---------------------------------------------------------------------- make_shards re-runs

@pytest.mark.slow
def test_make_shards_rerun_replaces_its_own_shards_only(demo, tmp_path):
    root, _ = demo
    out = str(tmp_path / 'shards')
    args = ('--data-path', root, '--split', 'val', '--out', out)
    r = _tool(*args, '--samples-per-shard', '4')
    assert r.returncode == 0 and r.stdout.strip().endswith("val-{0000..0004}.tar'"), r.stderr
    r = _tool(*args, '--samples-per-shard', '10')
    assert r.returncode == 0 and r.stdout.strip().endswith("val-{0000..0001}.tar'"), r.stderr
    assert (f'val: removed 3 shard(s) of an earlier run from {out} (val-0002.tar, val-0003.tar, '
            f'val-0004.tar)') in r.stderr, r.stderr
    left = sorted(os.listdir(out))
    assert [f for f in left if f.endswith('.tar') or f.endswith('.index.json')] == [
        'val-0000.tar', 'val-0000.tar.index.json', 'val-0001.tar', 'val-0001.tar.index.json']
    with open(os.path.join(out, make_shards.MANIFEST)) as f:
        assert json.load(f)['shards'] == {'val': ['val-0000.tar', 'val-0001.tar']}
    assert len(shards.ShardDataset(shards.expand(os.path.join(out, 'val-{0000..0001}.tar')))) \
        == 20
    # another split into the same folder keeps these
    r = _tool('--data-path', root, '--split', 'train', '--out', out)
    assert r.returncode == 0 and 'removed' not in r.stderr, r.stderr
    assert os.path.isfile(os.path.join(out, 'val-0001.tar'))
    # a folder holding shards it did not write: refused, nothing touched
    shutil.copy(os.path.join(out, 'val-0001.tar'), os.path.join(out, 'other-0000.tar'))
    r = _tool(*args, '--samples-per-shard', '4')
    assert _error_line(r) == (f'error: {out} holds shards that make_shards.py did not write '
                              f'(other-0000.tar): give another --out, or move them away')
    assert sorted(f for f in os.listdir(out) if f.startswith('val-') and f.endswith('.tar')) \
        == ['val-0000.tar', 'val-0001.tar']


# --------------------------------------------------------------------------- classes of val/

def _folders(root, split, classes, per_class):
    for c, name in enumerate(classes):
        folder = os.path.join(root, split, name)
        os.makedirs(folder)
        for i in range(per_class):
            H.noise_image(16, 16, seed=100 * c + i + (50 if split == 'val' else 0)).save(
                os.path.join(folder, f'{i}.png'))


@pytest.mark.slow
def test_val_folder_missing_a_class_keeps_the_training_labels(tmp_path):
    """make_shards.py on a val folder without one class: the labels are the training folder's
    (or --classes FILE's), its classes.txt names them, and -eval over the shards equals -eval
    over the folder; without either, a val folder is refused."""
    names = ['ant', 'bee', 'cat']
    root = str(tmp_path / 'data')
    _folders(root, 'train', names, 1)
    _folders(root, 'val', ['ant', 'cat'], 3)  # no 'bee'
    ckpt = _checkpoint(root, 3)
    r = _tool('--data-path', root, '--split', 'val')
    assert r.returncode == 0, r.stderr
    pattern = r.stdout.split()[-1].strip("'")
    shard_dir = os.path.join(root, 'shards')
    with open(os.path.join(shard_dir, 'classes.txt')) as f:
        assert f.read() == 'ant\nbee\ncat\n'
    ds = shards.ShardDataset(shards.expand(pattern, root), num_classes=3)
    assert ds.labels.tolist() == [0, 0, 0, 2, 2, 2] and ds.classes == names
    _, on_folder = _eval(root, ckpt, 'MODEL.NUM_CLASSES', '3')
    _, on_shards = _eval(root, ckpt, 'MODEL.NUM_CLASSES', '3', 'DATA.VAL_SHARDS', pattern)
    assert on_shards == on_folder and on_folder['n'] == 6
    # val/ alone: no training classes to number it by -> refused; --classes FILE gives them
    alone = str(tmp_path / 'alone')
    shutil.copytree(os.path.join(root, 'val'), os.path.join(alone, 'val'))
    line = _error_line(_tool('--data-path', alone, '--split', 'val'))
    assert line.startswith(f'error: {os.path.join(alone, "val")}: its labels are the training '
                           f'classes') and 'give --classes FILE' in line, line
    r = _tool('--data-path', alone, '--split', 'val', '--classes',
              os.path.join(shard_dir, 'classes.txt'))
    assert r.returncode == 0, r.stderr
    ds = shards.ShardDataset(shards.expand(r.stdout.split()[-1].strip("'"), alone))
    assert ds.labels.tolist() == [0, 0, 0, 2, 2, 2] and ds.classes == names
    # pipe: sources: DATA_PATH/classes.txt
    stream = sources.build_dataset(H.tiny_config(
        'finetune', DATA__DATA_PATH=shard_dir, MODEL__NUM_CLASSES=3,
        DATA__VAL_SHARDS='pipe:cat ' + shards.expand(pattern, root)[0]), False)
    assert isinstance(stream, shards.ShardStream) and stream.classes == names
    with pytest.raises(datasets.DataError, match=r'classes\.txt names 3 classes but '
                                                 r'MODEL\.NUM_CLASSES is 10'):
        shards.ShardDataset(shards.expand(pattern, root), num_classes=10)


# --------------------------------------------------------------------- commands die with runs

def _processes_with(token):
    """(pid, command line) of the processes whose command line holds token."""
    found = []
    for pid in os.listdir('/proc'):
        if not pid.isdigit():
            continue
        try:
            with open(f'/proc/{pid}/cmdline', 'rb') as f:
                cmdline = f.read().replace(b'\0', b' ').decode('utf-8', 'replace')
        except OSError:
            continue
        if token in cmdline:
            found.append((int(pid), cmdline[:100]))
    return found


@pytest.mark.slow
@pytest.mark.parametrize('entry, sig', [(e, s) for e in ('count', 'eval')
                                        for s in ('SIGKILL', 'SIGINT', 'SIGTERM')] +
                         [('eval-workers', 'SIGKILL')])
def test_pipe_command_dies_with_the_run(demo, tmp_path, entry, sig):
    """A pipe: command of several processes (`cat x; sleep N`) under the counting tool, an
    -eval reading it itself or in a loader worker: killing the run (kill -9, a terminal's
    Ctrl-C to its process group, SIGTERM) leaves no process of the command behind."""
    _, ckpt = demo
    good = _good(tmp_path / 'good.tar')
    token = f'{os.getpid()}{time.time_ns() % 10 ** 9}'
    source = f'pipe:cat {good}; sleep 1000.{token}'
    if entry == 'count':
        cmd = [sys.executable, TOOL, '--data-path', str(tmp_path), '--count', source]
    else:
        with open(tmp_path / shards.COUNTS_FILE, 'w') as f:
            json.dump({source: 4}, f)  # (counted: the loader workers run the command)
        cmd = _eval_cmd(str(tmp_path), ckpt, 'DATA.VAL_SHARDS', source, 'DATA.NUM_WORKERS',
                        '2' if entry == 'eval-workers' else '0')
    run = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           start_new_session=True)
    try:
        deadline = time.time() + 120
        while not any(c.startswith('sleep ') for _, c in _processes_with(token)):
            assert run.poll() is None and time.time() < deadline, run.stderr.read()[-3000:]
            time.sleep(0.1)
        if sig == 'SIGINT':
            os.killpg(run.pid, signal.SIGINT)  # a terminal's Ctrl-C
        else:
            os.kill(run.pid, getattr(signal, sig))
        code = run.wait(timeout=60)
        assert code in {'SIGKILL': (-9,), 'SIGINT': (130,), 'SIGTERM': (-15, 143)}[sig], \
            run.stderr.read()[-3000:]
        deadline = time.time() + 5
        while _processes_with(token) and time.time() < deadline:
            time.sleep(0.1)
        assert _processes_with(token) == []
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
        for pid, _ in _processes_with(token):  # (only what this test started holds the token)
            os.kill(pid, signal.SIGKILL)
        run.stderr.close()


# ----------------------------------------------------------------------------------- progress

def test_progress_lines(demo, tmp_path, monkeypatch, capsys):
    """make_shards.py, scanning shards for their indexes and counting pipe: sources print
    progress with counts (here every step: PROGRESS_SECONDS 0)."""
    root, _ = demo
    monkeypatch.setattr(shards, 'PROGRESS_SECONDS', 0)
    out = str(tmp_path / 'shards')
    assert make_shards.main(['--data-path', root, '--split', 'val', '--out', out,
                             '--samples-per-shard', '4']) == 0
    err = capsys.readouterr().err
    assert 'val: writing shards: 5/20 samples, 1 shard(s) done' in err, err
    srcs = shards.expand(os.path.join(out, 'val-{0000..0004}.tar'))
    for s in srcs:
        os.remove(shards.index_path(s))
    assert len(shards.ShardDataset(srcs)) == 20
    err = capsys.readouterr().err
    assert 'shard indexes: 2/5 shards read, 8 samples' in err, err
    counts = shards.source_counts([f'pipe:cat {s}' for s in srcs[:3]], str(tmp_path))
    assert counts == [4, 4, 4]
    err = capsys.readouterr().err
    assert 'counting streamed shards: 2/3 shards, 8 samples' in err, err
