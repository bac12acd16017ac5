"""tools/: demo data set, recipe inspector, visualiser, export + predict."""
import hashlib
import json
import os
import re
import subprocess
import sys

import numpy as np
import paddle
import pytest
from PIL import Image

import config as cfgmod
import tasks  # noqa: F401  (hands the tasks' model builders to transformer.build_model)
import transformer
from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, 'tools'))
import make_demo_dataset  # noqa: E402

TINY = ['MODEL.ENCODER.EMBED_DIM', '48', 'MODEL.ENCODER.DEPTH', '2', 'MODEL.ENCODER.NUM_HEADS',
        '3', 'MODEL.DECODER.EMBED_DIM', '32', 'MODEL.DECODER.DEPTH', '1',
        'MODEL.DECODER.NUM_HEADS', '4']


def tree_digest(folder):
    h = hashlib.sha256()
    for dirpath, dirnames, files in os.walk(folder):
        dirnames.sort()
        for f in sorted(files):
            path = os.path.join(dirpath, f)
            h.update(os.path.relpath(path, folder).encode())
            with open(path, 'rb') as fh:
                h.update(fh.read())
    return h.hexdigest()


@pytest.fixture(scope='module')
def demo(tmp_path_factory):
    out = str(tmp_path_factory.mktemp('demo'))
    make_demo_dataset.make(out, train_per_class=4, val_per_class=2, size=40, log=lambda m: None)
    return out


def test_demo_dataset_is_deterministic_and_complete(demo, tmp_path):
    again = str(tmp_path / 'again')
    make_demo_dataset.make(again, train_per_class=4, val_per_class=2, size=40, log=lambda m: None)
    assert tree_digest(demo) == tree_digest(again)
    with open(os.path.join(demo, 'train_list.txt')) as f:
        lines = [ln.split() for ln in f]
    assert len(lines) == 40 and sorted({int(lab) for _, lab in lines}) == list(range(10))
    assert all(os.path.isfile(os.path.join(demo, p)) for p, _ in lines)
    with Image.open(os.path.join(demo, lines[0][0])) as im:
        assert im.size == (40, 40) and im.mode == 'RGB'
    other = str(tmp_path / 'seed1')
    make_demo_dataset.make(other, train_per_class=4, val_per_class=2, size=40, seed=1,
                           log=lambda m: None)
    assert tree_digest(other) != tree_digest(demo)


def cli(tool, *args, check=True):
    r = subprocess.run([sys.executable, os.path.join(ROOT, 'tools', tool), *args],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.mark.slow
def test_inspect_recipe_json():
    r = cli('inspect_recipe.py', '-cfg', os.path.join(ROOT, 'configs',
                                                      'vit_large_patch16_224_finetune.yaml'),
            '--nranks', '8')
    d = json.loads(r.stdout.strip().splitlines()[-1])
    assert d['eff_batch'] == 32 * 4 * 8 and d['lr'] == pytest.approx(1e-3 * 1024 / 256)
    scales = {p['name']: p['lr_scale'] for p in d['params']}
    assert scales['blocks.23.mlp.fc2.weight'] == pytest.approx(0.75)
    assert scales['patch_embed.proj.weight'] == pytest.approx(0.75 ** 25)
    assert d['lr_schedule'][0] == [0.0, 0.0] and d['lr_schedule'][5][1] == pytest.approx(d['lr'])
    assert d['lr_schedule'][-1] == [50.0, pytest.approx(1e-6)]


@pytest.fixture(scope='module')
def mae_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp('mae')
    config = cfgmod.get_config(os.path.join(ROOT, 'configs', 'tiny_pretrain.yaml'))
    cfgmod.merge_opts(config, TINY)
    model = transformer.build_model(config)
    full = str(folder / 'full.pdparams')
    paddle.save(model.state_dict(), full)
    encoder = str(folder / 'encoder.pdparams')
    paddle.save({k: v for k, v in model.state_dict().items()
                 if not k.startswith(('decoder', 'mask_token'))}, encoder)
    return full, encoder


@pytest.mark.slow
@pytest.mark.parametrize('count', [1, 3])
def test_visualize_png(demo, mae_checkpoint, tmp_path, count):
    images = []
    for cls in ('circle', 'ring', 'dots')[:count]:
        images += ['--image', os.path.join(demo, 'val', cls, '00000.png')]
    out = str(tmp_path / 'rec.png')
    r = cli('visualize.py', '-cfg', os.path.join(ROOT, 'configs', 'tiny_pretrain.yaml'),
            '-pretrained', mae_checkpoint[0], '--out', out, *images, '--scale', '4',
            '-opts', *TINY)
    with Image.open(out) as im:
        # 4 columns of 32*4 px tiles + 4 px gaps; a 16 px header and footer
        assert im.size == (4 * (128 + 4) + 4, 16 + count * (128 + 4) + 4 + 16)
        assert im.mode == 'RGB'
    assert f'{count} image(s)' in r.stdout


@pytest.mark.slow
def test_visualize_refuses_encoder_only(demo, mae_checkpoint, tmp_path):
    r = cli('visualize.py', '-cfg', os.path.join(ROOT, 'configs', 'tiny_pretrain.yaml'),
            '-pretrained', mae_checkpoint[1], '--out', str(tmp_path / 'x.png'),
            '--image', os.path.join(demo, 'val', 'circle', '00000.png'), '-opts', *TINY,
            check=False)
    assert r.returncode == 2 and 'Traceback' not in r.stderr
    assert 'has no decoder' in r.stderr and 'mae_visualize_vit_' in r.stderr
    assert not os.path.exists(tmp_path / 'x.png')
    out = tmp_path / 'missing' / 'x.png'
    r = cli('visualize.py', '-cfg', os.path.join(ROOT, 'configs', 'tiny_pretrain.yaml'),
            '-pretrained', mae_checkpoint[0], '--out', str(out),
            '--image', os.path.join(demo, 'val', 'circle', '00000.png'), '-opts', *TINY,
            check=False)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == \
        f'error: --out {out}: the folder {out.parent} does not exist'


@pytest.mark.slow
def test_export_and_predict_match_dynamic_model(demo, tmp_path):
    import transforms
    import datasets
    from predict import Predictor
    config = cfgmod.get_config(os.path.join(ROOT, 'configs', 'tiny_finetune.yaml'))
    cfgmod.merge_opts(config, TINY[:6])
    paddle.seed(3)
    model = transformer.build_model(config)
    model.init_head(0.1)  # a head that says something, so the top-k order is meaningful
    weights = str(tmp_path / 'ft.pdparams')
    paddle.save(model.state_dict(), weights)
    out = str(tmp_path / 'exported')
    cli('export_model.py', '-cfg', os.path.join(ROOT, 'configs', 'tiny_finetune.yaml'),
        '-pretrained', weights, '-output', out, '-opts', *TINY[:6])
    paths = [os.path.join(demo, 'val', c, '00001.png') for c in ('square', 'cross', 'checker')]
    transform = transforms.build_transform(False, config)
    batch = np.stack([transform(datasets.load_rgb(p)) for p in paths])
    model.eval()
    expected = model(paddle.to_tensor(batch)).numpy()
    predictor = Predictor(out)
    got = predictor.logits(batch)
    d = float(np.abs(got - expected).max())
    print(f'exported vs dynamic logits: max abs diff {d:.2e}')
    assert got.shape == (3, 10) and d < 1e-4
    r = cli('predict.py', '--model', out, '--topk', '3',
            *[x for p in paths for x in ('--image', p)])
    lines = [json.loads(x) for x in r.stdout.strip().splitlines()]
    assert [x['image'] for x in lines] == paths
    for line, logits in zip(lines, expected):
        assert [c for c, _ in line['topk']] == np.argsort(-logits)[:3].tolist()
        probs = [p for _, p in line['topk']]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6


@pytest.mark.slow
def test_memory_estimate_counts_the_real_model():
    import memory_estimate as mem
    c = cfgmod.get_config(os.path.join(ROOT, 'configs', 'tiny_pretrain.yaml'))
    total, trained = mem.parameter_counts(c)
    model = transformer.build_model(c)
    assert total == sum(int(np.prod(p.shape)) for p in model.parameters())
    assert trained == sum(int(np.prod(p.shape)) for p in model.parameters()
                          if not p.stop_gradient) < total  # fixed sin-cos embeddings
    fp32 = mem.estimate(c, '', 'O1', False)
    assert fp32['states'] * 2 ** 30 == pytest.approx(4 * total + 12 * trained)
    # encoder 1 + 16 visible tokens x 128, decoder 1 + 64 tokens x 96, per block and image
    per_image = 4 * (17 * 17 * 128 + 4 * 17 ** 2) + 2 * (17 * 65 * 96 + 4 * 65 ** 2)
    assert fp32['activations'] * 2 ** 30 == pytest.approx(4 * 64 * per_image)
    o2_recompute = mem.estimate(c, 'bfloat16', 'O2', True)
    assert o2_recompute['activations'] < fp32['activations'] / 4
    r = cli('memory_estimate.py', '--all')
    rows = [ln for ln in r.stdout.splitlines() if ln.startswith('| vit_')]
    assert len(rows) == 11 and 'n/a' in rows[2]  # LARS refuses O2
    assert '| 632.0 |' in rows[7]  # ViT-H/14 with 1000 classes: 632.0 M parameters, as timm's
    seg = cfgmod.get_config(os.path.join(ROOT, 'configs',
                                         'vit_base_patch16_512_upernet_ade20k.yaml'))
    heads = mem.dense_head_values(seg)  # UperNet at 128/64/32/16 px (fpn1 alone: 768 x 128^2)
    assert 768 * 128 ** 2 < heads < 200 * 768 * 128 ** 2
    assert mem.estimate(seg, '', 'O1', False)['activations'] * 2 ** 30 == pytest.approx(
        4 * 2 * (12 * (17 * 1025 * 768 + 12 * 1025 ** 2) + heads))


@pytest.mark.slow
@pytest.mark.parametrize('args', [
    ['--data', '-cfg', 'configs/vit_base_patch16_224_finetune.yaml', '--images', '6'],
    ['--data', '-cfg', 'configs/vit_base_patch16_224_finetune.yaml', '--images', '6',
     '--reference', 'torch'],
    ['--data', '--shards', '-cfg', 'configs/vit_base_patch16_224_finetune.yaml', '--images',
     '40', '--rounds', '1'],
    ['-cfg', 'configs/tiny_pretrain.yaml', '--batch-size', '4', '--steps', '1'],
    ['-cfg', 'configs/tiny_segmentation.yaml', '--batch-size', '2', '--steps', '1'],
    ['-cfg', 'configs/tiny_finetune.yaml', '--batch-size', '4', '--steps', '1',
     '--reference', 'torch'],
    ['-cfg', 'configs/tiny_finetune.yaml', '--batch-size', '4', '--steps', '1', '--eval'],
])
def test_benchmark_modes_report_img_per_s(args):
    """Every mode runs and ends with `img/s: X` (no speed is asserted: that is not a test)."""
    r = cli('benchmark.py', *args)
    lines = r.stdout.strip().splitlines()
    assert lines[-1].startswith('img/s: ') and float(lines[-1].split()[1]) > 0
    if '--shards' in args:  # 3 kinds x (bytes only, 0 / 1 / 2 workers), the 5 ratios
        assert len(re.findall(r'^data: .* img/s', r.stdout, re.M)) == 12
        assert len(re.findall(r'^ratio: .*: \d+\.\d\dx$', r.stdout, re.M)) == 5
    if '--data' in args:
        assert '-> (3, 224, 224)' in r.stdout
    else:
        assert 'ms per step' in lines[-2]
    if '--eval' in args:
        assert lines[-3].startswith('eval: paddle ') and 'batch 4' in lines[-3]


def _run_script(name, tmp_path, **env):
    return subprocess.run(['bash', os.path.join(ROOT, 'run_scripts', name)], capture_output=True,
                          text=True, cwd=str(tmp_path), timeout=300,
                          env=dict(os.environ, DATA_PATH=str(tmp_path / 'nowhere'), **env))


@pytest.mark.slow
def test_run_scripts_fail_fast_in_one_line(tmp_path):
    r = _run_script('run_pretrain_vit_b.sh', tmp_path, PYTHON='/bin/false')
    assert r.returncode == 2 and r.stderr.strip() == (
        'launch: /bin/false cannot import paddle: pip install paddlepaddle-gpu (GPU) or '
        'paddlepaddle (CPU), or set PYTHON')
    import paddle
    if not paddle.is_compiled_with_cuda():  # CI: the CPU build
        r = _run_script('run_finetune_vit_b.sh', tmp_path, PYTHON=sys.executable, GPUS='0,1')
        assert r.returncode == 2 and r.stderr.strip() == (
            f'launch: GPUS=0,1, but {sys.executable} has the CPU build of Paddle: pip install '
            f'paddlepaddle-gpu, or unset GPUS to run on the CPU')
        env = {k: v for k, v in os.environ.items() if k != 'GPUS'}
        r = subprocess.run(['bash', os.path.join(ROOT, 'run_scripts', 'run_linearprobe_vit_b.sh')],
                           capture_output=True, text=True, cwd=str(tmp_path), timeout=300,
                           env=dict(env, PYTHON=sys.executable, BATCH_SIZE='2',
                                    DATA_PATH=str(tmp_path / 'nowhere'),
                                    OUTPUT=str(tmp_path / 'out')))
        assert 'launch: no GPU in use: running on the CPU with 1 process(es) (NPROC)' in r.stdout
        assert r.returncode != 0  # (the data folder does not exist)
