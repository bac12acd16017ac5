"""main_multi_gpu_segmentation.py end to end on CPU (tiny segmentor, generated demo set): it
learns, -eval counts each image once with 1 or 2 processes, kill -9 + -resume auto ends where
an uninterrupted run ends, bad annotations stop in one line, export + predict + visualize."""
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
import tasks
from conftest import ROOT
from helpers import kill_once_saved_mid_epoch_1, log_lines, max_diff, params, run

sys.path.insert(0, os.path.join(ROOT, 'tools'))
import make_demo_dataset  # noqa: E402

pytestmark = pytest.mark.slow  # every test runs the entry point or tools as programs

SCRIPT, CFG = 'main_multi_gpu_segmentation.py', 'tiny_segmentation.yaml'
# a smaller encoder and heads than the config's, for speed; 4 blocks for the 4 taps
SMALL = ['MODEL.ENCODER.EMBED_DIM', '48', 'MODEL.ENCODER.NUM_HEADS', '3',
         'DATA.NUM_WORKERS', '2']


@pytest.fixture(scope='module')
def segdata(tmp_path_factory):
    out = str(tmp_path_factory.mktemp('demo_seg'))
    make_demo_dataset.make_segmentation(out, train_count=160, val_count=12, log=lambda m: None)
    return out


def eval_json(r, output=None):
    """The -eval result: the last JSON line of stdout or, launched with 2 processes (output
    given), of rank 0's log (Paddle 2.6's launcher logs a shutdown line after it)."""
    text = r.stdout
    if output is not None:
        with open(os.path.join(output, 'launch_logs', 'workerlog.0')) as f:
            text = f.read()
    return json.loads([x for x in text.splitlines() if x.startswith('{')][-1])


@pytest.fixture(scope='module')
def trained(segdata, tmp_path_factory):
    """The config's segmentor trained from a random initialisation (8 epochs x 25 iterations
    of batch 16), and the same model's weights before training."""
    tmp = tmp_path_factory.mktemp('seg_run')
    out = str(tmp / 'run')
    opts = ['TRAIN.NUM_EPOCHS', '8', 'VALIDATE_FREQ', '4', 'SAVE_FREQ', '4']
    run(SCRIPT, CFG, '-data_path', segdata, '-output', out, opts=opts)
    config = cfgmod.merge_opts(cfgmod.get_config(os.path.join(ROOT, 'configs', CFG)), opts)
    paddle.seed(0)
    init = str(tmp / 'init.pdparams')
    paddle.save(tasks.get_task(config).build_model().state_dict(), init)
    return out, init, opts


def test_segmentor_learns_and_eval_counts_each_image_once(segdata, trained):
    out, init, opts = trained
    lines = log_lines(out)
    assert [x['epoch'] for x in lines] == list(range(8))
    assert 'mIoU' in lines[3] and 'mIoU' not in lines[2]  # VALIDATE_FREQ 4
    assert lines[-1]['train_loss'] < 0.8 * lines[0]['train_loss']
    for x in lines:  # the task's named losses, logged apart: decode + 0.4 x auxiliary
        assert x['train_loss'] == pytest.approx(x['train_loss_decode'] + x['train_loss_aux'],
                                                rel=1e-5)
        assert x['train_loss_aux'] > 0 and x['train_loss_decode'] > 0
    assert set(lines[-1]['IoU']) == {'background', 'stripes', 'checker', 'dots', 'solid'}
    before = eval_json(run(SCRIPT, CFG, '-data_path', segdata, '-pretrained', init, '-eval',
                           opts=opts))
    weights = os.path.join(out, 'latest.pdparams')
    one = eval_json(run(SCRIPT, CFG, '-data_path', segdata, '-pretrained', weights, '-eval',
                        opts=opts))
    eval2 = os.path.join(out, 'eval2')
    two = eval_json(run(SCRIPT, CFG, '-data_path', segdata, '-pretrained', weights, '-eval',
                        '-output', eval2, opts=opts, nproc=2), eval2)
    print(f"mIoU untrained {before['mIoU']:.1f}, trained {one['mIoU']:.1f} (2 processes "
          f"{two['mIoU']:.1f}); aAcc {before['aAcc']:.1f} -> {one['aAcc']:.1f}")
    assert one['n'] == two['n'] == before['n'] == 12
    for key in ('mIoU', 'mAcc', 'aAcc'):
        assert one[key] == pytest.approx(two[key], abs=1e-9)
        assert one[key] == pytest.approx(lines[-1][key], abs=1e-9)  # as the run's last epoch
    assert one['IoU'] == two['IoU']
    assert one['mIoU'] > max(before['mIoU'] + 12, 2 * before['mIoU'])  # 11.6 -> 29.7 measured


def test_segmentation_kill_and_resume_auto_is_exact(segdata, tmp_path):
    opts = SMALL + ['TRAIN.NUM_EPOCHS', '3',
                         'TRAIN.ITERS_PER_EPOCH', '6', 'TRAIN.WARMUP_EPOCHS', '1',
                         'SAVE_FREQ_ITERS', '2', 'SAVE_FREQ', '1', 'VALIDATE_FREQ', '3',
                         'DATA.SEG_PHOTOMETRIC', 'True']
    ref, killed = str(tmp_path / 'ref'), str(tmp_path / 'killed')
    args = ('-data_path', segdata, '-batch_size', '8')
    run(SCRIPT, CFG, *args, '-output', ref, opts=opts)
    cmd = [sys.executable, os.path.join(ROOT, SCRIPT), '-cfg', os.path.join(ROOT, 'configs', CFG),
           *args, '-output', killed, '-opts', *opts, 'REPORT_FREQ', '100']
    kill_once_saved_mid_epoch_1(cmd, killed)
    assert len(log_lines(killed)) < 3
    r = run(SCRIPT, CFG, *args, '-output', killed, '-resume', 'auto', opts=opts)
    assert re.search(r'resumed from .*: epoch 1, iteration [1-9]', r.stdout), r.stdout  # mid-epoch
    a, b = params(os.path.join(ref, 'latest.pdparams')), params(os.path.join(killed,
                                                                           'latest.pdparams'))
    assert any(k.endswith('bn._mean') for k in a)  # BatchNorm statistics are compared too
    d = max_diff(a, b)
    print(f'segmentation, resumed vs uninterrupted: max abs param diff {d:.2e}')
    assert d < 1e-5
    ref_lines, killed_lines = log_lines(ref), log_lines(killed)
    assert [x['epoch'] for x in killed_lines] == [x['epoch'] for x in ref_lines] == [0, 1, 2]
    assert killed_lines[-1]['mIoU'] == pytest.approx(ref_lines[-1]['mIoU'], abs=1e-6)


def _break(root, what):
    ann = os.path.join(root, 'annotations', 'validation')
    first = sorted(os.listdir(ann))[0]
    path = os.path.join(ann, first)
    if what == 'missing':
        os.remove(path)
    elif what == 'colour':
        Image.open(path).convert('RGB').save(path)
    elif what == 'size':
        Image.open(path).resize((7, 5)).save(path)
    elif what == 'label':
        a = np.asarray(Image.open(path)).copy()
        a[0, 0] = 9  # class 8 after reduce-zero-label; the demo has 5
        Image.fromarray(a).save(path)
    return path


@pytest.mark.parametrize('what,message', [
    ('missing', 'annotation not found'), ('colour', 'colour'), ('size', 'size'),
    ('label', 'MODEL.NUM_CLASSES')])
def test_bad_annotations_stop_in_one_line_naming_the_file(tmp_path, what, message):
    root = str(tmp_path / 'data')
    make_demo_dataset.make_segmentation(root, train_count=8, val_count=3, log=lambda m: None)
    path = _break(root, what)
    out = str(tmp_path / 'out')
    r = run(SCRIPT, CFG, '-data_path', root, '-output', out, opts=SMALL + [
        'TRAIN.NUM_EPOCHS', '1', 'TRAIN.ITERS_PER_EPOCH', '1', 'DATA.BATCH_SIZE', '2'],
        check=False)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr[-2000:]
    assert 'Traceback' not in r.stderr and len(lines) == 1, r.stderr
    assert os.path.basename(path) in lines[0] and message in lines[0], lines[0]
    assert not os.path.exists(os.path.join(out, 'latest.pdparams'))


def test_export_predict_and_visualize_a_segmentor(segdata, trained, tmp_path):
    out, _, opts = trained
    weights = os.path.join(out, 'latest.pdparams')
    exported = str(tmp_path / 'exported')
    tools = os.path.join(ROOT, 'tools')
    r = subprocess.run([sys.executable, os.path.join(tools, 'export_model.py'), '-pretrained',
                        weights, '-output', exported], capture_output=True, text=True, cwd=ROOT,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    with open(os.path.join(exported, 'classes.txt')) as f:
        assert f.read().split() == ['background', 'stripes', 'checker', 'dots', 'solid']
    val = os.path.join(segdata, 'images', 'validation')
    images = [os.path.join(val, f) for f in sorted(os.listdir(val))[:2]]
    pred_dir = str(tmp_path / 'pred')
    r = subprocess.run([sys.executable, os.path.join(tools, 'predict.py'), '--model', exported,
                        '--out', pred_dir] + [a for i in images for a in ('--image', i)],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [json.loads(x) for x in r.stdout.strip().splitlines()]
    assert [x['image'] for x in lines] == images
    # the label PNG equals the checkpoint's own prediction (sliding windows, as -eval), in the
    # dataset's convention (classes + 1: 0 stays 'unlabelled')
    import datasets
    import seg_inference
    import tasks
    config = cfgmod.merge_opts(cfgmod.get_config(os.path.join(ROOT, 'configs', CFG)), opts)
    predict = seg_inference.model_predictor(tasks.load_trained(config, weights), config)
    for line, path in zip(lines, images):
        image = datasets.load_rgb(path)
        label = np.asarray(Image.open(line['label_png']))
        assert label.shape == (image.height, image.width) and label.min() >= 1
        ours = seg_inference.image_label_map(predict, image, config)
        assert (label == ours + 1).mean() > 0.999  # (Paddle Inference vs dygraph rounding)
        overlay = Image.open(line['overlay_png'])
        assert overlay.height >= image.height and overlay.width > image.width  # + legend
        assert abs(sum(line['classes'].values()) - 1) < 1e-3
    picture = str(tmp_path / 'seg.png')
    r = subprocess.run([sys.executable, os.path.join(tools, 'visualize.py'), '-pretrained',
                        weights, '--image', images[0], '--image', images[1], '--out', picture],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert Image.open(picture).height > 2 * Image.open(images[0]).height
