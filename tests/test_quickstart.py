"""run_scripts/quickstart.sh at a smaller size (400 training images, ~4 minutes): every step runs
and reports, pre-training cuts the reconstruction loss well below its first epoch, and the
pre-trained encoder's linear probe beats a randomly initialised encoder's on held-out images."""
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow  # the quickstart scripts, minutes each


def test_quickstart_small(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path / 'out'),
               DATA=str(tmp_path / 'data'), TRAIN_PER_CLASS='40', VAL_PER_CLASS='30',
               PRETRAIN_EPOCHS='20', PRETRAIN_BATCH='32', PROBE_EPOCHS='10', PROBE_BATCH='64',
               FINETUNE_EPOCHS='1', FINETUNE_BATCH='32')
    r = subprocess.run(['bash', os.path.join(ROOT, 'run_scripts', 'quickstart.sh')],
                       capture_output=True, text=True, env=env, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = tmp_path / 'out'

    def log(name):
        with open(out / name / 'log.txt') as f:
            return [json.loads(line) for line in f if line.strip()]
    pre = log('pretrain')
    print(f"pre-train loss {pre[0]['train_loss']:.4f} -> {pre[-1]['train_loss']:.4f}")
    assert len(pre) == 20 and pre[-1]['train_loss'] < 0.7 * pre[0]['train_loss']
    for name, epochs in (('linearprobe', 10), ('linearprobe_random', 10), ('finetune', 1)):
        lines = log(name)
        assert len(lines) == epochs and 0 <= lines[-1]['val_acc1'] <= 100
    probe, random = log('linearprobe')[-1]['val_acc1'], log('linearprobe_random')[-1]['val_acc1']
    print(f'linear probe top-1: pre-trained encoder {probe:.1f} %, random encoder {random:.1f} %')
    # measured: 10 classes, 300 held-out images, 260 pre-training steps -> ~12 points apart
    assert probe >= random + 7.5
    ev = json.loads((out / 'finetune_eval.json').read_text().strip().splitlines()[-1])
    assert ev['n'] == 300 and ev['val_acc1'] == log('finetune')[-1]['val_acc1']
    assert (out / 'reconstruction.png').is_file()
    for row in ('pre-training loss', 'linear probe top-1, MAE pre-trained encoder',
                'linear probe top-1, randomly initialised encoder', 'fine-tuned top-1'):
        assert row in r.stdout


def test_quickstart_segmentation_small(tmp_path):
    """run_scripts/quickstart_segmentation.sh at a toy size, starting from a pre-training of
    its own (STOP_AFTER=pretrain of quickstart.sh): every step runs, the table and the picture
    are there, and the two runs' mIoUs are printed."""
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path / 'out'),
               DATA=str(tmp_path / 'data'), SEG_DATA=str(tmp_path / 'seg'),
               TRAIN_PER_CLASS='8', VAL_PER_CLASS='2', PRETRAIN_EPOCHS='1', PRETRAIN_BATCH='16',
               SEG_TRAIN='32', SEG_VAL='6', SEG_EPOCHS='1', SEG_BATCH='8')
    r = subprocess.run(['bash', os.path.join(ROOT, 'run_scripts', 'quickstart_segmentation.sh')],
                       capture_output=True, text=True, env=env, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = tmp_path / 'out'
    assert 'running quickstart.sh\'s pre-training' in r.stdout
    assert (out / 'pretrain' / 'latest.pdparams').is_file()
    assert not (out / 'linearprobe').exists()  # STOP_AFTER=pretrain
    for name in ('segmentation', 'segmentation_random'):
        lines = [json.loads(x) for x in (out / name / 'log.txt').read_text().splitlines()]
        assert len(lines) == 1 and 0 <= lines[0]['mIoU'] <= 100
        row = 'MAE pre-trained encoder' if name == 'segmentation' else 'random initialisation'
        assert re.search(rf"{row} +{lines[0]['mIoU']:.1f} %", r.stdout), r.stdout[-1500:]
    assert (out / 'segmentation.png').is_file()
