"""Faults users met, through the entry points as they type them: a full disk while saving,
SIGTERM during validation and during -eval, a folder left by a failed start, resuming a
finished run, a config key written twice, list files with a byte order mark, duplicates or a
wrong path prefix, and what the logs say about the data and the progress of an evaluation."""
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest

import checkpoint
import config as cfgmod
from conftest import ROOT
from helpers import TINY_ARCH, log_lines, max_diff, params, run

sys.path.insert(0, os.path.join(ROOT, 'tools'))
import make_demo_dataset  # noqa: E402

LONG_VAL = 4000  # images of the long validation list (about 4 s here)
EVAL_BATCH = cfgmod.get_config(os.path.join(ROOT, 'configs',
                                             'tiny_finetune.yaml')).DATA.BATCH_SIZE_EVAL
EVAL_BATCHES = -(-LONG_VAL // EVAL_BATCH)
OPTS = TINY_ARCH[:6] + ['TRAIN.NUM_EPOCHS', '3', 'TRAIN.WARMUP_EPOCHS', '1', 'SAVE_FREQ', '1',
                        'VALIDATE_FREQ', '2', 'DATA.NUM_WORKERS', '0']


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    """80 train / 30 val demo images (10 classes), and long_val.txt: LONG_VAL names (hard
    links) of the val images."""
    out = str(tmp_path_factory.mktemp('demo'))
    make_demo_dataset.make(out, train_per_class=8, val_per_class=3, size=40, log=lambda m: None)
    with open(os.path.join(out, 'val_list.txt')) as f:
        val = [line.split() for line in f if line.strip()]
    os.makedirs(os.path.join(out, 'long'))
    lines = []
    for i in range(LONG_VAL):
        path, label = val[i % len(val)]
        name = f'long/{i}.png'
        os.link(os.path.join(out, path), os.path.join(out, name))
        lines.append(f'{name} {label}\n')
    with open(os.path.join(out, 'long_val.txt'), 'w') as f:
        f.writelines(lines)
    return out


@pytest.fixture(scope='module')
def reference(data, tmp_path_factory):
    """The fine-tuning run of OPTS, uninterrupted."""
    out = str(tmp_path_factory.mktemp('reference'))
    run('main_multi_gpu_finetune.py', 'tiny_finetune.yaml', '-data_path', data, '-output', out,
        '-batch_size', '16', opts=OPTS)
    return out


def _command(script, data, out, *args, opts=()):
    return [sys.executable, os.path.join(ROOT, script), '-cfg',
            os.path.join(ROOT, 'configs', 'tiny_finetune.yaml'), '-data_path', data,
            '-output', out, *args, '-opts', *opts, 'REPORT_FREQ', '100']


def _user(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300, **kw)


def _last_line(text):
    return text.strip().splitlines()[-1]


def _temporary(out):
    return [f for f in os.listdir(out) if f.endswith(('.tmp', '.next'))]


@pytest.mark.slow
def test_disk_full_while_saving_keeps_the_last_pair_and_resume_auto_goes_on(data, reference,
                                                                            tmp_path):
    """Writes fail (EFBIG: the file size limit, as ENOSPC does on a full disk) from the moment
    epoch 0 is saved: one line, exit 2, nothing temporary left, the pair saved before loads;
    once writes work again, -resume auto ends where the uninterrupted run ends."""
    out = str(tmp_path / 'full')
    cmd = _command('main_multi_gpu_finetune.py', data, out, '-batch_size', '16', opts=OPTS)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and \
                not os.path.exists(os.path.join(out, 'epoch_0.pdparams')):
            time.sleep(0.01)
        resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (100_000, 100_000))
        stderr = proc.communicate(timeout=300)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2, stderr
    assert 'Traceback' not in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert stderr.strip() == (
        f'error: cannot save a checkpoint in {out}: File too large (disk full, quota or file '
        f'size limit); {out}/latest.pdparams (+ .pdopt) is the last whole checkpoint; free some '
        f'space, then go on with the same command and -resume auto')
    assert _temporary(out) == []
    checkpoint.load_checkpoint_pair(os.path.join(out, 'latest'))  # whole, and one pair
    assert not os.path.exists(os.path.join(out, 'epoch_2.pdparams'))
    r = run('main_multi_gpu_finetune.py', 'tiny_finetune.yaml', '-data_path', data, '-output',
            out, '-batch_size', '16', '-resume', 'auto', opts=OPTS)
    assert f'resumed from {out}/latest: epoch ' in r.stdout, r.stdout  # (not previous.*)
    d = max_diff(params(os.path.join(reference, 'latest.pdparams')),
                 params(os.path.join(out, 'latest.pdparams')))
    print(f'disk full + resume vs uninterrupted: max abs param diff {d:.2e}')
    assert d < 1e-5
    assert [x['epoch'] for x in log_lines(out)] == [0, 1, 2]
    assert _temporary(out) == []


def _sigterm_after(cmd, stream, marker):
    """Run cmd, send SIGTERM once a line of `stream` ('stdout' | 'stderr') holds marker ->
    (the finished process, its whole stdout, its whole stderr, seconds from the signal to the
    end)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    seen = []
    try:
        for line in getattr(proc, stream):
            seen.append(line)
            if marker in line:
                break
        sent = time.time()
        proc.send_signal(signal.SIGTERM)
        out = dict(zip(('stdout', 'stderr'), proc.communicate(timeout=300)))
        took = time.time() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out[stream] = ''.join(seen) + out[stream]
    return proc, out['stdout'], out['stderr'], took


@pytest.mark.slow
def test_sigterm_during_validation_stops_it_saves_and_resume_is_exact(data, reference, tmp_path):
    """SIGTERM while validating: stopped within seconds, the trained epoch saved with its
    validation to do; -resume auto validates it first, then goes on exactly."""
    out = str(tmp_path / 'stopped')
    opts = OPTS + ['DATA.VAL_LIST', 'long_val.txt']
    cmd = _command('main_multi_gpu_finetune.py', data, out, '-batch_size', '16', opts=opts)
    # validating (after the first batch)
    proc, stdout, stderr, took = _sigterm_after(cmd, 'stdout', 'epoch 1 val [1/')
    print(f'SIGTERM during validation: stopped {took:.1f} s later')
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert took < 2.5, took  # (the whole validation takes about 4 s)
    assert 'Traceback' not in stderr and 'epoch 1 val: acc1' not in stdout
    assert _last_line(stderr) == (
        f'stopped: SIGTERM at the validation after epoch 1 (cut short: it runs again on '
        f'resume): saved {out}/latest.pdparams; go on with the same command and -resume auto')
    assert f'data: train 80 images ({data}/train_list.txt), val {LONG_VAL} images ' \
           f'({data}/long_val.txt)' in stdout
    assert re.search(rf'epoch 1 val \[1/{EVAL_BATCHES}\] {EVAL_BATCH} images, [\d.]+ img/s, '
                     rf'eta \d+:\d\d:\d\d\n', stdout), stdout
    assert [x['epoch'] for x in log_lines(out)] == [0]
    assert not os.path.exists(os.path.join(out, 'epoch_1.pdparams'))
    r = run('main_multi_gpu_finetune.py', 'tiny_finetune.yaml', '-data_path', data, '-output',
            out, '-batch_size', '16', '-resume', 'auto', opts=opts)
    assert 'resumed from' in r.stdout and 'epoch 1 val: acc1' in r.stdout
    d = max_diff(params(os.path.join(reference, 'latest.pdparams')),
                 params(os.path.join(out, 'latest.pdparams')))
    print(f'SIGTERM in validation + resume vs uninterrupted: max abs param diff {d:.2e}')
    assert d < 1e-5
    lines = log_lines(out)
    assert [x['epoch'] for x in lines] == [0, 1, 2]
    assert 'val_acc1' in lines[1] and 'val_acc1' in lines[2] and 'val_acc1' not in lines[0]
    for f in ('epoch_1.pdparams', 'epoch_2.pdparams', 'best.pdparams'):
        assert os.path.isfile(os.path.join(out, f)), f


@pytest.mark.slow
def test_sigterm_during_eval_is_one_line_and_no_stack_dump(data, reference):
    cmd = [sys.executable, os.path.join(ROOT, 'main_multi_gpu_finetune.py'), '-data_path', data,
           '-pretrained', os.path.join(reference, 'latest.pdparams'), '-eval', '-opts',
           'DATA.VAL_LIST', 'long_val.txt', 'DATA.NUM_WORKERS', '2']
    proc, stdout, stderr, _ = _sigterm_after(cmd, 'stderr', 'eval [1/')
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert stdout == '', stdout  # (no result, and none of Paddle's C++ stack dump)
    assert 'Traceback' not in stderr and 'C++' not in stderr, stderr
    assert _last_line(stderr).startswith('stopped: SIGTERM (terminated)'), stderr
    assert f'eval: {LONG_VAL} images ({data}/long_val.txt)' in stderr
    assert re.search(rf'eval \[1/{EVAL_BATCHES}\] {EVAL_BATCH} images, ', stderr), stderr


@pytest.mark.slow
def test_a_folder_left_by_a_failed_start_is_used_again(data, tmp_path):
    """A start stopped by an unreadable image leaves only config.yaml: the same command, once
    the image is fixed, trains there. (The list starts with a byte order mark.)"""
    root = tmp_path / 'mine'
    shutil.copytree(data, root, copy_function=os.link,
                    ignore=shutil.ignore_patterns('long', 'long_val.txt'))
    with open(root / 'train_list.txt', 'rb') as f:
        listed = f.read()
    (root / 'train_list.txt').write_bytes(b'\xef\xbb\xbf' + listed)
    first = listed.split()[0].decode()
    good = (root / first).read_bytes()
    (root / first).unlink()
    (root / first).write_bytes(good[:len(good) // 2])  # cut short
    out = str(tmp_path / 'out')
    cmd = _command('main_multi_gpu_finetune.py', str(root), out, '-batch_size', '16',
                   opts=OPTS[:6] + ['TRAIN.NUM_EPOCHS', '1', 'DATA.NUM_WORKERS', '0'])
    r = _user(cmd)
    assert r.returncode == 2 and 'Traceback' not in r.stderr, r.stderr
    assert _last_line(r.stderr).startswith(f'error: cannot read image {root / first} '
                                           f'({root}/train_list.txt line 1): ')
    assert sorted(os.listdir(out)) == ['config.yaml']
    (root / first).write_bytes(good)
    r = _user(cmd)
    assert r.returncode == 0, r.stderr
    assert f'note: {out} holds the config.yaml of a start that saved no checkpoint and logged ' \
           f'no epoch: starting there again' in r.stdout
    assert [x['epoch'] for x in log_lines(out)] == [0]
    r = _user(cmd)  # a run that trained is never started over
    assert r.returncode == 2 and 'already holds a run' in r.stderr


@pytest.mark.slow
def test_resuming_a_finished_run_elsewhere_says_where_its_checkpoints_are(data, reference,
                                                                         tmp_path):
    out = str(tmp_path / 'elsewhere')
    cmd = _command('main_multi_gpu_finetune.py', data, out, '-batch_size', '16', '-resume',
                   os.path.join(reference, 'latest'), opts=OPTS)
    r = _user(cmd)
    assert r.returncode == 0, r.stderr
    assert (f'nothing to train: {reference}/latest ends a finished run (3 of TRAIN.NUM_EPOCHS 3 '
            f'epochs); best val_acc1 ') in r.stdout
    assert (f'; its checkpoints in {reference}: latest.pdparams (+ .pdopt), best.pdparams, '
            f'epoch_0.pdparams, epoch_1.pdparams, epoch_2.pdparams; nothing was written to '
            f'{out} (to train longer, raise TRAIN.NUM_EPOCHS)') in r.stdout
    assert 'done:' not in r.stdout and not os.path.exists(out)


@pytest.mark.slow
def test_config_and_list_mistakes_are_one_line_without_a_skip_offer(data, tmp_path):
    """A key written twice names the file, the key and both lines; duplicates in a list, a
    wrong path prefix, a label out of range, a missing list: one line, no 'skip' offered."""
    cfg = tmp_path / 'twice.yaml'
    cfg.write_text(f"BASE: ['{os.path.join(ROOT, 'configs', 'tiny_finetune.yaml')}']\n"
                   f"DATA:\n  BATCH_SIZE: 8\nTRAIN:\n  NUM_EPOCHS: 1\nDATA:\n  NUM_WORKERS: 0\n")
    with open(os.path.join(data, 'train_list.txt')) as f:
        train = [line.strip() for line in f if line.strip()]
    root = tmp_path / 'lists'  # (no class folders: a missing list is not replaced by them)
    os.makedirs(root)
    (root / 'twice.txt').write_text('\n'.join(train + train[3:5]) + '\n')
    (root / 'prefixed.txt').write_text('\n'.join('imagenet/' + x for x in train) + '\n')
    (root / 'labels.txt').write_text('\n'.join(train[:-1] + [train[-1].split()[0] + ' 10']) +
                                     '\n')
    out = str(tmp_path / 'o')
    cases = [
        (['-cfg', str(cfg)], f'error: {cfg}: DATA is written twice (lines 2 and 6); YAML would '
                             f'keep only the second: merge them into one'),
        (['-opts', 'DATA.TRAIN_LIST', str(root / 'twice.txt')],
         f'error: {root}/twice.txt: 2 duplicate line(s), an image listed more than once; the '
         f'first: {train[3].split()[0]} on lines 4 and 81. List each image once'),
        (['-opts', 'DATA.TRAIN_LIST', str(root / 'prefixed.txt')],
         f'and none of 16 other listed images tried exists either'),
        (['-opts', 'DATA.TRAIN_LIST', str(root / 'labels.txt')],
         f'{root}/labels.txt line 80: label 10 is outside 0..9 (MODEL.NUM_CLASSES 10)'),
        (['-data_path', str(root), '-opts', 'DATA.TRAIN_LIST', 'nope.txt'],
         f'error: {root}: found neither the list file val_list.txt (DATA.VAL_LIST)'),
    ]
    for args, message in cases:
        cmd = [sys.executable, os.path.join(ROOT, 'main_multi_gpu_finetune.py'), '-cfg',
               os.path.join(ROOT, 'configs', 'tiny_finetune.yaml'), '-data_path', data,
               '-output', out, *args]
        cmd += ['DATA.NUM_WORKERS', '0'] if '-opts' in args else []
        r = _user(cmd)
        assert r.returncode == 2, r.stderr
        assert 'Traceback' not in r.stderr and message in _last_line(r.stderr), r.stderr
        assert 'ON_BAD_IMAGE' not in r.stderr, r.stderr
        shutil.rmtree(out, ignore_errors=True)
