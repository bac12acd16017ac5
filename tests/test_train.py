"""The three entry points end to end on CPU with the tiny configs: outputs, multi-process
equivalence, exact resume after kill -9, -eval of converted official weights, user errors."""
import functools
import json
import os
import re
import signal
import subprocess
import sys
import time
import types

import numpy as np
import paddle
import pytest

import engine
from conftest import ROOT
from helpers import TINY_ARCH, kill_and_resume, log_lines, max_diff, params, run

sys.path.insert(0, os.path.join(ROOT, 'tools'))
import make_demo_dataset  # noqa: E402
import paddlefile  # noqa: E402


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    """80 train / 30 val demo images (10 classes)."""
    out = str(tmp_path_factory.mktemp('demo'))
    make_demo_dataset.make(out, train_per_class=8, val_per_class=3, size=40, log=lambda m: None)
    return out


PRETRAIN_OPTS = TINY_ARCH + ['TRAIN.NUM_EPOCHS', '2', 'TRAIN.WARMUP_EPOCHS', '1',
                             'DATA.NUM_WORKERS', '0', 'SAVE_FREQ', '1']


@pytest.fixture(scope='module')
def pretrained(data, tmp_path_factory):
    out = str(tmp_path_factory.mktemp('pretrain'))
    r = run('main_multi_gpu_pretrain.py', 'tiny_pretrain.yaml', '-data_path', data,
            '-output', out, '-batch_size', '16', opts=PRETRAIN_OPTS)
    return out, r


@pytest.mark.slow
def test_pretrain_outputs(pretrained):
    out, r = pretrained
    lines = log_lines(out)
    assert [x['epoch'] for x in lines] == [0, 1]
    assert all(np.isfinite(x['train_loss']) and x['lr'] > 0 for x in lines)
    for f in ('config.yaml', 'latest.pdparams', 'latest.pdopt', 'epoch_0.pdparams',
              'epoch_1.pdparams'):
        assert os.path.isfile(os.path.join(out, f)), f
    assert not [f for f in os.listdir(out) if f.endswith('.tmp')]
    assert 'effective batch 16' in r.stdout and '5 iterations/epoch' in r.stdout
    assert not os.path.exists(os.path.join(out, 'best.pdparams'))  # pre-training: no metric
    assert f'done: 2 epochs; last checkpoint {out}/latest.pdparams (+ .pdopt); kept: ' \
        f'epoch_0.pdparams, epoch_1.pdparams; log: {out}/log.txt' in r.stdout
    with open(os.path.join(out, 'config.yaml')) as f:
        assert 'EMBED_DIM: 48' in f.read()


@pytest.mark.slow
def test_finetune_linearprobe_and_eval(data, pretrained, tmp_path):
    ckpt = os.path.join(pretrained[0], 'latest.pdparams')
    common = TINY_ARCH[:6] + ['TRAIN.NUM_EPOCHS', '1', 'TRAIN.WARMUP_EPOCHS', '0',
                              'DATA.NUM_WORKERS', '0']
    for script, cfg in (('main_multi_gpu_finetune.py', 'tiny_finetune.yaml'),
                        ('main_multi_gpu_linearprobe.py', 'tiny_linearprobe.yaml')):
        out = str(tmp_path / cfg)
        r = run(script, cfg, '-data_path', data, '-output', out, '-batch_size', '16',
                '-pretrained', ckpt, opts=common)
        assert 'head initialised fresh' in r.stdout
        assert 'unused: [' in r.stdout and 'decoder_blocks.*' in r.stdout
        (line,) = log_lines(out)
        assert line['epoch'] == 0 and {'val_acc1', 'val_acc5', 'val_loss'} <= set(line)
        r = run(script, cfg, '-data_path', data, '-pretrained',
                os.path.join(out, 'latest.pdparams'), '-eval', opts=common)
        result = json.loads(r.stdout)  # stdout is the result alone (`-eval > r.json`)
        assert set(result) == {'val_acc1', 'val_acc5', 'val_loss', 'n'}
        assert 'eval [1/1]' in r.stderr and 'pretrained: loaded' in r.stderr  # logs: stderr
        assert os.path.isfile(os.path.join(out, 'best.pdparams'))  # one epoch: the best one
        assert result['n'] == 30
        assert result['val_acc1'] == pytest.approx(line['val_acc1'])
        assert result['val_loss'] == pytest.approx(line['val_loss'], rel=1e-5)


@pytest.mark.slow
def test_linear_probe_keeps_encoder_frozen(data, pretrained, tmp_path):
    ckpt = os.path.join(pretrained[0], 'latest.pdparams')
    out = str(tmp_path / 'probe')
    run('main_multi_gpu_linearprobe.py', 'tiny_linearprobe.yaml', '-data_path', data,
        '-output', out, '-batch_size', '16', '-pretrained', ckpt,
        opts=TINY_ARCH[:6] + ['TRAIN.NUM_EPOCHS', '1', 'DATA.NUM_WORKERS', '0',
                              'TRAIN.OPTIMIZER.NAME', 'LARS', 'TRAIN.BASE_LR', '0.1'])
    before, after = params(ckpt), params(os.path.join(out, 'latest.pdparams'))
    encoder = [k for k in after if not k.startswith('head.')]
    assert encoder and all(np.array_equal(after[k], before[k]) for k in encoder)
    assert not np.allclose(after['head.0._mean'], 0)  # BatchNorm statistics were tracked


@pytest.mark.slow
def test_two_processes_equal_one(data, tmp_path):
    opts = PRETRAIN_OPTS + ['MODEL.NORM_PIX_LOSS', 'True']
    one, two = str(tmp_path / 'one'), str(tmp_path / 'two')
    run('main_multi_gpu_pretrain.py', 'tiny_pretrain.yaml', '-data_path', data, '-output', one,
        '-batch_size', '16', opts=opts)
    run('main_multi_gpu_pretrain.py', 'tiny_pretrain.yaml', '-data_path', data, '-output', two,
        '-batch_size', '8', opts=opts, nproc=2)
    d = max_diff(params(os.path.join(one, 'latest.pdparams')),
                 params(os.path.join(two, 'latest.pdparams')))
    print(f'1 vs 2 processes: max abs param diff {d:.2e}')
    assert d < 1e-5
    l1, l2 = log_lines(one), log_lines(two)
    assert [x['epoch'] for x in l1] == [x['epoch'] for x in l2] == [0, 1]
    for a, b in zip(l1, l2):
        assert a['train_loss'] == pytest.approx(b['train_loss'], rel=1e-5)
        assert a['lr'] == pytest.approx(b['lr'])


@pytest.mark.slow
def test_kill_and_resume_auto_is_exact(data, tmp_path):
    opts = TINY_ARCH + ['TRAIN.NUM_EPOCHS', '3', 'TRAIN.WARMUP_EPOCHS', '1',
                        'DATA.NUM_WORKERS', '2', 'SAVE_FREQ_ITERS', '2', 'SAVE_FREQ', '1']
    # the same run killed -9 once it has saved mid-way through epoch 1 (after epoch_0), resumed
    _, r, (ref, killed), d = kill_and_resume(('-data_path', data, '-batch_size', '16'), opts,
                                             tmp_path)
    assert re.search(r'resumed from .*: epoch 1, iteration [1-9]', r.stdout), r.stdout  # mid-epoch
    print(f'resumed vs uninterrupted: max abs param diff {d:.2e}')
    assert d < 1e-5
    assert [x['epoch'] for x in log_lines(killed)] == [x['epoch'] for x in log_lines(ref)] == \
        [0, 1, 2]


@functools.lru_cache(maxsize=None)
def _official_finetuned(tmp):
    """A timm ViT (random weights) saved as an official fine-tuned checkpoint and converted."""
    import torch
    import timm.models.vision_transformer as timm_vit
    torch.manual_seed(0)
    ref = timm_vit.VisionTransformer(
        img_size=32, patch_size=4, embed_dim=48, depth=2, num_heads=3, num_classes=10,
        global_pool='avg', norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6)).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.5 * torch.randn(p.shape))
    src, dst = os.path.join(tmp, 'official.pth'), os.path.join(tmp, 'official.pdparams')
    torch.save({'model': ref.state_dict()}, src)
    subprocess.run([sys.executable, os.path.join(ROOT, 'port_weights', 'convert_official.py'),
                    '--src', src, '--dst', dst], check=True, capture_output=True, cwd=ROOT)
    return ref, dst


@pytest.mark.slow
@pytest.mark.parametrize('nproc', [1, 2])
def test_eval_converted_official_weights_matches_reference(tmp_path_factory, nproc):
    import torch
    import config as cfgmod
    import sources
    tmp = str(tmp_path_factory.getbasetemp())
    data = os.path.join(tmp, 'eval23')
    if not os.path.exists(os.path.join(data, 'val_list.txt')):
        make_demo_dataset.make(data, train_per_class=1, val_per_class=3, size=40,
                               log=lambda m: None)
        with open(os.path.join(data, 'val_list.txt')) as f:
            lines = f.readlines()[:23]  # an odd count, not a multiple of the batch
        with open(os.path.join(data, 'val_list.txt'), 'w') as f:
            f.writelines(lines)
    ref, weights = _official_finetuned(tmp)
    out = str(tmp_path_factory.mktemp(f'eval{nproc}'))
    r = run('main_multi_gpu_finetune.py', 'tiny_finetune.yaml', '-data_path', data,
            '-pretrained', weights, '-eval', '-output', out,
            opts=['MODEL.ENCODER.EMBED_DIM', '48', 'MODEL.ENCODER.DEPTH', '2',
                  'MODEL.ENCODER.NUM_HEADS', '3', 'DATA.BATCH_SIZE_EVAL', '4',
                  'DATA.NUM_WORKERS', '0'], nproc=nproc)
    stdout = r.stdout
    if nproc > 1:  # the JSON line comes from rank 0's log
        with open(os.path.join(out, 'launch_logs', 'workerlog.0')) as f:
            stdout = f.read()
    # the last JSON line (Paddle 2.6's launcher logs a shutdown line after it)
    result = json.loads([x for x in stdout.splitlines() if x.startswith('{')][-1])
    # reference: timm on the same eval-transformed images
    config = cfgmod.get_config(os.path.join(ROOT, 'configs', 'tiny_finetune.yaml'))
    config.DATA.DATA_PATH = data
    ds = sources.build_dataset(config, is_train=False)
    images = np.stack([ds[i][0] for i in range(len(ds))])
    labels = np.array([int(ds[i][1]) for i in range(len(ds))])
    with torch.no_grad():
        logits = ref(torch.from_numpy(images)).numpy()
    acc1 = 100.0 * (logits.argmax(1) == labels).mean()
    print(f'{nproc} process(es): acc1 {result["val_acc1"]:.3f} vs reference {acc1:.3f}')
    assert result['n'] == 23
    assert result['val_acc1'] == pytest.approx(acc1, abs=1e-9)


def _torch_file(path):
    import torch
    torch.save({'model': {'pos_embed': torch.zeros(1, 5, 8)}}, str(path))
    return str(path)


def _other_size_weights(path):
    import transformer
    model = transformer.vit_custom(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2,
                                   num_classes=10)
    paddle.save(model.state_dict(), str(path))
    return str(path)


def _three_class_folders(root):
    from PIL import Image
    for split in ('train', 'val'):
        for name in ('circle', 'square', 'triangle'):
            os.makedirs(root / split / name)
            Image.new('RGB', (8, 8)).save(root / split / name / '0.png')
    return str(root)


@pytest.mark.slow
def test_user_errors_are_one_line(data, tmp_path):
    cases = [
        (['-data_path', str(tmp_path / 'nowhere')], 'data folder not found'),
        (['-data_path', data, '-pretrained', _other_size_weights(tmp_path / 'vit64.pdparams')],
         'does not fit the model of this config: the checkpoint is ViT/4: embed 64, 2 blocks, '
         '8x8 patches of 4, the config builds ViT/4: embed 128, 4 blocks, 8x8 patches of 4'),
        (['-data_path', _three_class_folders(tmp_path / 'shapes')],
         'has 3 class folders (circle, square, triangle) but MODEL.NUM_CLASSES is 10: set -opts '
         'MODEL.NUM_CLASSES 3'),
        (['-data_path', data, '-opts', 'TRAIN.NOPE', '1'], 'unknown config key TRAIN.NOPE'),
        (['-data_path', data, '-pretrained', str(tmp_path / 'x.pdparams')],
         'pretrained weights not found'),
        (['-data_path', data, '-pretrained', _torch_file(tmp_path / 'mae.pth')],
         'is a PyTorch checkpoint; convert it first: python port_weights/convert_official.py'),
        (['-data_path', data, '-batch_size', '0'],
         'error: config key DATA.BATCH_SIZE must be >= 1, got 0'),
        (['-data_path', data, '-opts', 'TRAIN.ACCUM_ITER', '0'],
         'error: config key TRAIN.ACCUM_ITER must be >= 1, got 0'),
        (['-data_path', data, '-opts', 'DATA.NUM_WORKERS', '-1'],
         'error: config key DATA.NUM_WORKERS must be >= 0 (0: load in the training process)'),
        (['-data_path', data, '-opts', 'DATA.IMAGE_SIZE', '50'],
         'error: DATA.IMAGE_SIZE 50 is not a multiple of MODEL.ENCODER.PATCH_SIZE 4'),
        (['-data_path', data, '-opts', 'MODEL.ENCODER.NUM_HEADS', '5'],
         'error: MODEL.ENCODER.EMBED_DIM 128 is not divisible by MODEL.ENCODER.NUM_HEADS 5'),
        (['-data_path', data, '-opts', 'MODEL.NAME', 'vit_gigantic'],
         "error: MODEL.NAME 'vit_gigantic' is not a known model"),
        (['-data_path', data, '-opts', 'MODEL.NUM_CLASSES', '3'],
         'is outside 0..2 (MODEL.NUM_CLASSES 3)'),
        (['-data_path', data, '-opts', 'MODEL.NAME', 'vit_large_patch16'],
         "error: MODEL.NAME 'vit_large_patch16' is ViT-L/16 (MODEL.ENCODER.PATCH_SIZE 16, "),
    ]
    for args, message in cases:
        r = subprocess.run([sys.executable, os.path.join(ROOT, 'main_multi_gpu_finetune.py'),
                            '-cfg', os.path.join(ROOT, 'configs', 'tiny_finetune.yaml'),
                            '-output', str(tmp_path / 'o')] + args,
                           capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert r.returncode == 2, r.stderr
        assert message in r.stderr and 'Traceback' not in r.stderr, r.stderr
        assert not os.path.exists(tmp_path / 'o')  # stopped before anything was written


@pytest.mark.slow
def test_diverging_run_stops_and_keeps_last_good_checkpoint(data, tmp_path):
    out = str(tmp_path / 'diverge')
    opts = TINY_ARCH + ['TRAIN.NUM_EPOCHS', '3', 'TRAIN.WARMUP_EPOCHS', '0', 'SAVE_FREQ', '1',
                        'DATA.NUM_WORKERS', '0']
    run('main_multi_gpu_pretrain.py', 'tiny_pretrain.yaml', '-data_path', data, '-output', out,
        '-batch_size', '16', opts=opts + ['TRAIN.NUM_EPOCHS', '1'])
    good = params(os.path.join(out, 'latest.pdparams'))
    r = run('main_multi_gpu_pretrain.py', 'tiny_pretrain.yaml', '-data_path', data,
            '-output', out, '-batch_size', '16', '-resume', 'auto',
            opts=opts + ['TRAIN.BASE_LR', '1e30'], check=False)
    assert r.returncode == 2 and 'loss is' in r.stderr and 'Traceback' not in r.stderr, r.stderr
    assert max_diff(good, params(os.path.join(out, 'latest.pdparams'))) == 0
    # the resume said what it changed (the lr the NaN message advises to lower, here raised)
    assert 'resume: settings changed since the run was started: TRAIN.BASE_LR 0.002 -> 1e+30' \
        in r.stdout, r.stdout


@pytest.mark.slow
def test_a_finished_run_is_never_overwritten(data, pretrained, tmp_path):
    out = pretrained[0]
    before = {f: open(os.path.join(out, f), 'rb').read() for f in ('latest.pdparams', 'log.txt',
                                                                   'config.yaml')}
    r = run('main_multi_gpu_pretrain.py', 'tiny_pretrain.yaml', '-data_path', data,
            '-output', out, '-batch_size', '16', opts=PRETRAIN_OPTS, check=False)
    assert r.returncode == 2 and 'Traceback' not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        f'error: {out} already holds a run (config.yaml, log.txt, latest.pdparams, '
        f'latest.pdopt): continue it with -resume auto, or start a new one with another -output')
    assert {f: open(os.path.join(out, f), 'rb').read() for f in before} == before
    file = tmp_path / 'a_file'
    file.write_text('x')
    r = run('main_multi_gpu_pretrain.py', 'tiny_pretrain.yaml', '-data_path', data,
            '-output', str(file), opts=PRETRAIN_OPTS, check=False)
    assert r.returncode == 2 and f'error: -output {file} is a file, not a folder' in r.stderr


def test_default_output_folder_is_per_config(data, tmp_path, monkeypatch):
    import cli
    monkeypatch.chdir(tmp_path)
    config, _, logger = cli.setup('finetune', [
        '-cfg', os.path.join(ROOT, 'configs', 'tiny_finetune.yaml'), '-data_path', data])
    assert config.OUTPUT == os.path.join('output', 'tiny_finetune')
    assert not (tmp_path / 'output').exists()  # nothing is written before the run starts
    logger.open(config)
    logger.close()
    assert (tmp_path / 'output' / 'tiny_finetune' / 'config.yaml').is_file()


SIGNAL_OPTS = TINY_ARCH + ['TRAIN.NUM_EPOCHS', '3', 'TRAIN.WARMUP_EPOCHS', '1',
                           'DATA.NUM_WORKERS', '2', 'SAVE_FREQ', '1']


@pytest.fixture(scope='module')
def uninterrupted(data, tmp_path_factory):
    out = str(tmp_path_factory.mktemp('uninterrupted'))
    run('main_multi_gpu_pretrain.py', 'tiny_pretrain.yaml', '-data_path', data, '-batch_size',
        '16', '-output', out, opts=SIGNAL_OPTS)
    return out


def _start(data, out, opts):
    cmd = [sys.executable, os.path.join(ROOT, 'main_multi_gpu_pretrain.py'), '-cfg',
           os.path.join(ROOT, 'configs', 'tiny_pretrain.yaml'), '-data_path', data,
           '-batch_size', '16', '-output', out, '-opts', *opts, 'REPORT_FREQ', '100']
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def _wait_for(path, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not os.path.exists(path):
        time.sleep(0.02)
    assert proc.poll() is None, 'the run ended before the signal could be sent'


@pytest.mark.slow
@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_stops_cleanly_and_resume_is_exact(data, uninterrupted, tmp_path, sig):
    """SIGTERM (pre-emption) or Ctrl-C mid-run: a checkpoint at the current step, one line
    saying how to go on, exit 128 + signal; -resume auto then ends where an uninterrupted run
    ends."""
    out = str(tmp_path / 'stopped')
    proc = _start(data, out, SIGNAL_OPTS)
    try:
        _wait_for(os.path.join(out, 'epoch_0.pdparams'), proc)
        os.kill(proc.pid, sig)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + sig, stderr
    assert 'Traceback' not in stderr, stderr
    last = stderr.strip().splitlines()[-1]
    assert re.fullmatch(rf'stopped: {sig.name} at (epoch 1 iteration [1-4]|the end of epoch 1): '
                        rf'saved {re.escape(out)}/latest.pdparams; go on with the same command '
                        rf'and -resume auto', last), last
    assert len(log_lines(out)) < 3
    r = run('main_multi_gpu_pretrain.py', 'tiny_pretrain.yaml', '-data_path', data,
            '-batch_size', '16', '-output', out, '-resume', 'auto', opts=SIGNAL_OPTS)
    assert 'resumed from' in r.stdout
    d = max_diff(params(os.path.join(uninterrupted, 'latest.pdparams')),
                 params(os.path.join(out, 'latest.pdparams')))
    print(f'{sig.name} + resume vs uninterrupted: max abs param diff {d:.2e}')
    assert d < 1e-5
    assert [x['epoch'] for x in log_lines(out)] == [0, 1, 2]


def _children(pid):
    try:
        with open(f'/proc/{pid}/task/{pid}/children') as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def _alive(pid):
    try:
        with open(f'/proc/{pid}/stat') as f:
            return f.read().split(')')[-1].split()[0] != 'Z'
    except OSError:
        return False


@pytest.mark.slow
def test_no_loader_worker_outlives_a_killed_run(data, tmp_path):
    out = str(tmp_path / 'killed')
    proc = _start(data, out, TINY_ARCH + ['TRAIN.NUM_EPOCHS', '50', 'DATA.NUM_WORKERS', '2'])
    try:
        deadline = time.time() + 300
        workers = []
        while time.time() < deadline and proc.poll() is None and len(workers) < 2:
            workers = _children(proc.pid)
            time.sleep(0.05)
        assert len(workers) >= 2, 'the loader workers did not start'
        os.kill(proc.pid, signal.SIGKILL)  # the training process only, as the OOM killer does
        proc.wait()
        deadline = time.time() + 10
        while time.time() < deadline and any(_alive(w) for w in workers):
            time.sleep(0.1)
        assert not [w for w in workers if _alive(w)], 'loader workers outlived their run'
    finally:
        try:  # (whatever is left of the run's process group, also when the test failed)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.slow
def test_visualdl_steps_grow_per_tag_and_the_best_checkpoint_is_kept(data, tmp_path,
                                                                      monkeypatch):
    """A stand-in VisualDL writer records every scalar: iteration and epoch values go to tags of
    their own, each with growing steps; best.pdparams is the epoch with the best val_acc1."""
    import types
    import cli
    calls = []

    class Writer:
        def __init__(self, logdir):
            pass

        def add_scalar(self, tag, step, value):
            calls.append((tag, step))

        def close(self):
            pass
    monkeypatch.setitem(sys.modules, 'visualdl', types.SimpleNamespace(LogWriter=Writer))
    out = str(tmp_path / 'ft')
    cli.run('finetune', [
        '-cfg', os.path.join(ROOT, 'configs', 'tiny_finetune.yaml'), '-data_path', data,
        '-output', out, '-batch_size', '16', '-opts', *TINY_ARCH[:6], 'TRAIN.NUM_EPOCHS', '3',
        'TRAIN.WARMUP_EPOCHS', '0', 'DATA.NUM_WORKERS', '0', 'REPORT_FREQ', '2', 'SAVE_FREQ',
        '1', 'TRAIN.BASE_LR', '1e-2'])
    steps = {}
    for tag, step in calls:
        steps.setdefault(tag, []).append(step)
    assert {'iter/train_loss', 'iter/lr', 'epoch/train_loss', 'epoch/lr',
            'epoch/val_acc1'} <= set(steps)
    for tag, s in steps.items():
        assert s == sorted(set(s)), (tag, s)
    acc = [x['val_acc1'] for x in log_lines(out)]
    best = max(range(3), key=lambda e: (acc[e], -e))
    with open(os.path.join(out, 'best.pdparams'), 'rb') as f, \
            open(os.path.join(out, f'epoch_{best}.pdparams'), 'rb') as g:
        assert f.read() == g.read()


@pytest.mark.slow
def test_checkpoints_carry_config_and_class_names(tmp_path):
    """A run on class folders: its checkpoint evaluates and exports without -cfg, a -cfg that
    contradicts it is an error (not a resize), and predict prints the class names."""
    data = str(tmp_path / 'folders')
    make_demo_dataset.make(data, train_per_class=4, val_per_class=2, size=40, log=lambda m: None)
    for name in ('train_list.txt', 'val_list.txt'):
        os.remove(os.path.join(data, name))  # class folders only
    out = str(tmp_path / 'ft')
    opts = TINY_ARCH[:6] + ['TRAIN.NUM_EPOCHS', '1', 'DATA.NUM_WORKERS', '0']
    run('main_multi_gpu_finetune.py', 'tiny_finetune.yaml', '-data_path', data, '-output', out,
        '-batch_size', '8', opts=opts)
    weights = os.path.join(out, 'latest.pdparams')
    meta = paddlefile.load(weights)['_meta']
    assert meta['classes'] == sorted(make_demo_dataset.CLASSES)
    assert 'EMBED_DIM: 48' in meta['config']

    def main(*args):
        return subprocess.run([sys.executable, os.path.join(ROOT, 'main_multi_gpu_finetune.py'),
                               *args], capture_output=True, text=True, cwd=ROOT, timeout=300)
    r = main('-data_path', data, '-pretrained', weights, '-eval')  # no -cfg, no -opts
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)['val_acc1'] == pytest.approx(log_lines(out)[-1]['val_acc1'])
    other = tmp_path / 'other.yaml'
    other.write_text(f"BASE: ['{os.path.join(ROOT, 'configs', 'tiny_finetune.yaml')}']\n"
                     f"DATA:\n  IMAGE_SIZE: 48\n")
    r = main('-cfg', str(other), '-data_path', data, '-pretrained', weights, '-eval', '-opts',
             *TINY_ARCH[:6])
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == (
        f"error: {other} contradicts the config {weights} carries: DATA.IMAGE_SIZE 32 "
        f"-> 48 (leave -cfg out to use the checkpoint's own)")
    exported = str(tmp_path / 'exported')
    subprocess.run([sys.executable, os.path.join(ROOT, 'tools', 'export_model.py'),
                    '-pretrained', weights, '-output', exported], check=True,
                   capture_output=True, cwd=ROOT, timeout=300)
    image = os.path.join(data, 'val', 'ring', '00000.png')
    r = subprocess.run([sys.executable, os.path.join(ROOT, 'tools', 'predict.py'), '--model',
                        exported, '--image', image, '--topk', '3'], capture_output=True,
                       text=True, cwd=ROOT, timeout=300)
    line = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(line['topk']) == len(line['classes']) == 3
    assert line['classes'] == [meta['classes'][c] for c, _ in line['topk']]
    r = subprocess.run([sys.executable, os.path.join(ROOT, 'tools', 'predict.py'), '--model',
                        weights, '--image', image, '--topk', '3'], capture_output=True,
                       text=True, cwd=ROOT, timeout=300)  # the checkpoint itself, no export
    direct = json.loads(r.stdout.strip().splitlines()[-1])
    assert direct['classes'] == line['classes']
    assert [c for c, _ in direct['topk']] == [c for c, _ in line['topk']]
    assert np.allclose([p for _, p in direct['topk']], [p for _, p in line['topk']], atol=1e-5)


@pytest.mark.slow
def test_resume_of_another_models_checkpoint_is_one_line(data, pretrained):
    out = pretrained[0]
    before = {f: open(os.path.join(out, f), 'rb').read() for f in ('latest.pdparams', 'log.txt',
                                                                   'config.yaml')}
    opts = PRETRAIN_OPTS[:1] + ['96'] + PRETRAIN_OPTS[2:]  # MODEL.ENCODER.EMBED_DIM 96, not 48
    assert opts[:3] == ['MODEL.ENCODER.EMBED_DIM', '96', 'MODEL.ENCODER.DEPTH']
    r = run('main_multi_gpu_pretrain.py', 'tiny_pretrain.yaml', '-data_path', data, '-output',
            out, '-batch_size', '16', '-resume', 'auto', opts=opts, check=False)
    assert r.returncode == 2 and 'Traceback' not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(
        f'error: -resume {out}/latest: the checkpoint does not fit the model of this config: it '
        f'is ViT/4: embed 48, 2 blocks, 8x8 patches of 4, the config builds ViT/4: embed 96, 2 '
        f'blocks, 8x8 patches of 4')
    assert {f: open(os.path.join(out, f), 'rb').read() for f in before} == before


def test_evaluation_progress_lines_and_a_stop_between_batches(monkeypatch):
    """A line after the first batch, then every PROGRESS_SECONDS (and after the last one for
    -eval), with batches, images, speed and eta; a signal noted in this process ends the
    iteration after the batch in hand, and the loader's iterator is closed."""
    closed = []

    class Loader:
        def __len__(self):
            return 5

        def __iter__(self):
            try:
                for _ in range(5):
                    yield (np.zeros((4, 3)), np.zeros(4))
            finally:
                closed.append(True)
    lines = []
    logger = types.SimpleNamespace(info=lines.append)
    monkeypatch.setattr(engine, 'PROGRESS_SECONDS', 1e9)
    assert len(list(engine._Progress(Loader(), logger, 'eval'))) == 5
    assert [x.split(',')[0] for x in lines] == ['eval [1/5] 4 images', 'eval [5/5] 20 images']
    assert re.fullmatch(r'eval \[5/5\] 20 images, [\d.]+ img/s, eta 0:00:00', lines[1])
    lines.clear()
    monkeypatch.setattr(engine, 'PROGRESS_SECONDS', 0)
    list(engine._Progress(Loader(), logger, 'epoch 0 val', final=False))
    assert [x.split(' images')[0] for x in lines] == [f'epoch 0 val [{i}/5] {4 * i}'
                                                      for i in range(1, 6)]
    stop = types.SimpleNamespace(signum=0)
    seen = []
    for i, batch in enumerate(engine._Progress(Loader(), logger, 'val', stop=stop)):
        seen.append(i)
        if i == 1:
            stop.signum = signal.SIGTERM
    assert seen == [0, 1] and closed == [True] * 3
