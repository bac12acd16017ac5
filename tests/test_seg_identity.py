"""A segmentor's identity through the entry points: what its label values mean
(DATA.REDUCE_ZERO_LABEL, DATA.IGNORE_INDEX, MODEL.NUM_CLASSES) is checked like its model keys;
DATA.IGNORE_INDEX lies outside the classes; 16-bit annotations keep classes above 255; a
segmentor given where an encoder is expected says so."""
import json
import os
import subprocess
import sys

import numpy as np
import paddle
import pytest
from PIL import Image

import checkpoint
import config as cfgmod
import seg_data
import tasks
from conftest import ROOT
from helpers import log_lines, noise_image, run, write_list

sys.path.insert(0, os.path.join(ROOT, 'tools'))
import make_demo_dataset  # noqa: E402

pytestmark = pytest.mark.slow  # every test runs the entry points as programs

SEG, CFG = 'main_multi_gpu_segmentation.py', 'tiny_segmentation.yaml'
SMALL = ['MODEL.ENCODER.EMBED_DIM', '48', 'MODEL.ENCODER.NUM_HEADS', '3',
         'MODEL.SEGMENTATION.CHANNELS', '16', 'MODEL.SEGMENTATION.AUX_CHANNELS', '8',
         'DATA.NUM_WORKERS', '0']


def entry(script, *args):
    """script as a user types it (no -cfg added), in the repository."""
    return subprocess.run([sys.executable, os.path.join(ROOT, script)] + list(args),
                          capture_output=True, text=True, cwd=ROOT, timeout=300)


def refused(r, *fragments):
    """Exit 2 with one 'error: ...' line holding every fragment, no traceback."""
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr[-2000:]
    assert 'Traceback' not in r.stderr and len(lines) == 1, r.stderr[-2000:]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.fixture(scope='module')
def segmentor(tmp_path_factory):
    """(checkpoint of a tiny segmentor carrying its config, as training writes it; its demo
    data folder)."""
    tmp = tmp_path_factory.mktemp('seg_identity')
    data = str(tmp / 'data')
    make_demo_dataset.make_segmentation(data, train_count=2, val_count=3, log=lambda m: None)
    config = cfgmod.merge_opts(cfgmod.get_config(os.path.join(ROOT, 'configs', CFG)),
                               SMALL + ['DATA.DATA_PATH', data])
    paddle.seed(0)
    state = tasks.get_task(config).build_model().state_dict()
    state[checkpoint.META_KEY] = checkpoint.run_meta(config, seg_data.class_names(config))
    path = str(tmp / 'seg.pdparams')
    paddle.save(state, path)
    return path, data


def test_eval_refuses_another_meaning_of_the_label_values(segmentor, tmp_path):
    weights, data = segmentor
    ok = run(SEG, CFG, '-data_path', data, '-pretrained', weights, '-eval', opts=SMALL)
    result = json.loads([x for x in ok.stdout.splitlines() if x.startswith('{')][-1])
    assert result['n'] == 3  # the same keys: evaluated
    other = tmp_path / 'reduce.yaml'
    other.write_text(f"BASE: ['{os.path.join(ROOT, 'configs', CFG)}']\n"
                     f"DATA:\n  REDUCE_ZERO_LABEL: False\n")
    refused(entry(SEG, '-eval', '-pretrained', weights, '-cfg', str(other), '-data_path', data,
                  '-opts', *SMALL),
            f'{other} contradicts the config {weights} carries: DATA.REDUCE_ZERO_LABEL True '
            f'-> False (leave -cfg out to use the checkpoint\'s own)')
    refused(entry(SEG, '-eval', '-pretrained', weights, '-data_path', data,
                  '-opts', 'DATA.IGNORE_INDEX', '254'),
            f'-opts contradicts the config {weights} carries: DATA.IGNORE_INDEX 255 -> 254')
    refused(entry(SEG, '-eval', '-pretrained', weights, '-data_path', data,
                  '-cfg', os.path.join(ROOT, 'configs', CFG), '-opts', *SMALL,
                  'MODEL.NUM_CLASSES', '6'),
            f'contradicts the config {weights} carries: MODEL.NUM_CLASSES 5 -> 6')


def test_ignore_index_inside_the_classes_is_refused(segmentor, tmp_path):
    _, data = segmentor
    r = run(SEG, CFG, '-data_path', data, '-output', str(tmp_path / 'run'),
            opts=SMALL + ['DATA.IGNORE_INDEX', '3'], check=False)
    refused(r, 'DATA.IGNORE_INDEX 3', 'MODEL.NUM_CLASSES 5', 'outside')
    assert not os.path.exists(tmp_path / 'run')


def test_16_bit_annotations_train_and_score_classes_above_255(tmp_path):
    """Classes 255 and 299 of 300 in 'I;16' PNGs, 65535 ignored: trained and scored."""
    data = tmp_path / 'data'
    data.mkdir()
    lines = []
    for i in range(3):
        name = f'img_{i}'
        noise_image(48, 48, i).save(data / f'{name}.png')
        values = np.full((48, 48), 299, np.uint16)
        values[:, :24] = 255
        values[:4] = 65535
        values[40:, 40:] = i
        Image.fromarray(values).save(data / f'{name}_ann.png')
        assert Image.open(data / f'{name}_ann.png').mode == 'I;16'
        lines.append(f'{name}.png {name}_ann.png')
    write_list(data / 'train_list.txt', lines)
    write_list(data / 'val_list.txt', lines)
    out = str(tmp_path / 'run')
    run(SEG, CFG, '-data_path', str(data), '-output', out,
        opts=SMALL + ['MODEL.NUM_CLASSES', '300', 'DATA.IGNORE_INDEX', '65535',
                      'DATA.REDUCE_ZERO_LABEL', 'False',
                      'TRAIN.NUM_EPOCHS', '1', 'TRAIN.ITERS_PER_EPOCH', '1',
                      'DATA.BATCH_SIZE', '2', 'DATA.BATCH_SIZE_EVAL', '3', 'VALIDATE_FREQ', '1'])
    iou = log_lines(out)[-1]['IoU']
    assert len(iou) == 300 and iou['class_255'] is not None and iou['class_299'] is not None


def test_a_segmentor_where_an_encoder_is_expected_says_so(segmentor, tmp_path):
    weights, _ = segmentor
    classes = str(tmp_path / 'cls')
    make_demo_dataset.make(classes, train_per_class=1, val_per_class=1, log=lambda m: None)
    fine = os.path.join(ROOT, 'configs', 'tiny_finetune.yaml')
    message = (f'{weights} is a segmentor (UperNet on ', 'evaluate it with '
               f'main_multi_gpu_segmentation.py -eval -pretrained {weights}')
    refused(entry('main_multi_gpu_finetune.py', '-cfg', fine, '-data_path', classes,
                  '-pretrained', weights, '-output', str(tmp_path / 'run'),
                  '-opts', 'DATA.NUM_WORKERS', '0', 'DATA.BATCH_SIZE', '2'), *message)
    assert not os.path.exists(tmp_path / 'run')
    refused(entry('main_multi_gpu_finetune.py', '-eval', '-cfg', fine, '-data_path', classes,
                  '-pretrained', weights), *message)
