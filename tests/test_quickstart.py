"""run_scripts/quickstart.sh at a smaller size: every step runs, and pre-training learns --
the reconstruction loss falls well below its first epoch and the pre-trained encoder's linear
probe beats a randomly initialised encoder's on held-out demo images."""
import json
import os
import subprocess
import sys

from conftest import ROOT


def test_quickstart_small_learns(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path / 'out'),
               DATA=str(tmp_path / 'data'), TRAIN_PER_CLASS='100', VAL_PER_CLASS='20',
               PRETRAIN_EPOCHS='12', PRETRAIN_BATCH='32', PROBE_EPOCHS='6', PROBE_BATCH='64',
               FINETUNE_EPOCHS='1')
    r = subprocess.run(['bash', os.path.join(ROOT, 'run_scripts', 'quickstart.sh')],
                       capture_output=True, text=True, env=env, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = tmp_path / 'out'

    def log(name):
        with open(out / name / 'log.txt') as f:
            return [json.loads(line) for line in f if line.strip()]
    pre = log('pretrain')
    probe, rand = log('linearprobe')[-1]['val_acc1'], log('linearprobe_random')[-1]['val_acc1']
    print(f"pre-train loss {pre[0]['train_loss']:.4f} -> {pre[-1]['train_loss']:.4f}; "
          f"probe top-1 {probe:.1f} (pre-trained) vs {rand:.1f} (random)")
    assert len(pre) == 12
    assert pre[-1]['train_loss'] < 0.6 * pre[0]['train_loss']
    assert probe >= rand + 5.0
    assert (out / 'reconstruction.png').is_file()
    ev = json.loads((out / 'finetune_eval.json').read_text().strip().splitlines()[-1])
    assert ev['n'] == 200
    # the closing table names every result
    for row in ('pre-training loss', 'linear probe top-1, MAE pre-trained encoder',
                'linear probe top-1, randomly initialised encoder', 'fine-tuned top-1'):
        assert row in r.stdout
