"""Config schema checks and the official recipes held by configs/ (DESIGN.md sections 4, 5)."""
import argparse
import os

import pytest

import config as cfgmod
from conftest import ROOT

CFG = os.path.join(ROOT, 'configs')
SIZES = {'base': 'vit_base_patch16_224', 'large': 'vit_large_patch16_224',
         'huge': 'vit_huge_patch14_224'}
ARCH = {'base': (16, 768, 12, 12), 'large': (16, 1024, 24, 16), 'huge': (14, 1280, 32, 16)}


def load(name):
    return cfgmod.get_config(os.path.join(CFG, name + '.yaml'))


@pytest.mark.parametrize('size', SIZES)
def test_pretrain_recipe(size):
    c = load(SIZES[size] + '_pretrain')
    t = c.TRAIN
    assert c.MODEL.NAME == f'mae_{SIZES[size][:-4]}'
    assert (c.MODEL.ENCODER.PATCH_SIZE, c.MODEL.ENCODER.EMBED_DIM, c.MODEL.ENCODER.DEPTH,
            c.MODEL.ENCODER.NUM_HEADS) == ARCH[size]
    assert (c.MODEL.DECODER.EMBED_DIM, c.MODEL.DECODER.DEPTH, c.MODEL.DECODER.NUM_HEADS) == \
        (512, 8, 16)
    assert (t.MODE, t.WARMUP_EPOCHS, t.BASE_LR, t.WEIGHT_DECAY) == ('pretrain', 40, 1.5e-4, 0.05)
    assert c.MODEL.MASK_RATIO == 0.75 and c.MODEL.NORM_PIX_LOSS is True
    assert t.OPTIMIZER.NAME == 'AdamW' and t.OPTIMIZER.BETAS == [0.9, 0.95]
    assert t.RRC_SCALE == [0.2, 1.0]
    assert t.NUM_EPOCHS in (800, 1600)
    assert c.DATA.BATCH_SIZE * t.ACCUM_ITER * 8 == 4096  # on one 8-GPU machine


FINETUNE = {'base': (100, 5e-4, 0.65, 0.1), 'large': (50, 1e-3, 0.75, 0.2),
            'huge': (50, 1e-3, 0.75, 0.3)}


@pytest.mark.parametrize('size', SIZES)
def test_finetune_recipe(size):
    c = load(SIZES[size] + '_finetune')
    t = c.TRAIN
    assert c.MODEL.NAME == SIZES[size][:-4]
    assert (t.NUM_EPOCHS, t.BASE_LR, t.LAYER_DECAY, c.MODEL.DROP_PATH) == FINETUNE[size]
    assert (t.MODE, t.WARMUP_EPOCHS, t.WEIGHT_DECAY, t.MIN_LR) == ('finetune', 5, 0.05, 1e-6)
    assert (t.SMOOTHING, t.MIXUP_ALPHA, t.CUTMIX_ALPHA, t.MIXUP_PROB, t.MIXUP_SWITCH_PROB) == \
        (0.1, 0.8, 1.0, 1.0, 0.5)
    assert t.RAND_AUGMENT == 'rand-m9-mstd0.5-inc1'
    assert (t.RANDOM_ERASE_PROB, t.RANDOM_ERASE_MODE, t.RANDOM_ERASE_COUNT) == (0.25, 'pixel', 1)
    assert t.OPTIMIZER.BETAS == [0.9, 0.999] and c.MODEL.GLOBAL_POOL is True
    assert c.DATA.BATCH_SIZE * t.ACCUM_ITER * 8 == 1024


@pytest.mark.parametrize('size', SIZES)
def test_linearprobe_recipe(size):
    c = load(SIZES[size] + '_linearprobe')
    t = c.TRAIN
    assert (t.MODE, t.OPTIMIZER.NAME, t.BASE_LR, t.WEIGHT_DECAY, t.WARMUP_EPOCHS) == \
        ('linearprobe', 'LARS', 0.1, 0.0, 10)
    assert t.NUM_EPOCHS == (90 if size == 'base' else 50)
    assert c.MODEL.GLOBAL_POOL is False
    assert c.DATA.BATCH_SIZE * t.ACCUM_ITER * 8 == 16384


@pytest.mark.parametrize('size', ['base', 'large'])
def test_segmentation_recipe(size):
    """DESIGN.md 5, ADE20K: mmsegmentation's upernet_mae-base 512x512 160k config."""
    c = load(f'vit_{size}_patch16_512_upernet_ade20k')
    t, s = c.TRAIN, c.MODEL.SEGMENTATION
    assert (t.MODE, t.LR_SCHEDULE, t.OPTIMIZER.NAME, list(t.OPTIMIZER.BETAS)) == \
        ('segmentation', 'poly', 'AdamW', [0.9, 0.999])
    assert t.NUM_EPOCHS * t.ITERS_PER_EPOCH == 160000
    assert t.WARMUP_EPOCHS * t.ITERS_PER_EPOCH == 1500
    assert t.BASE_LR * 16 / t.LR_SCALE_DIVISOR == 1e-4  # lr 1e-4 at batch 16
    assert (t.WEIGHT_DECAY, t.MIN_LR, t.AMP) == (0.05, 0.0, 'float16')
    assert c.DATA.BATCH_SIZE * 8 == 16 and c.DATA.IMAGE_SIZE == 512
    assert (list(c.DATA.SEG_SCALE), list(c.DATA.SEG_RATIO_RANGE), c.DATA.SEG_CAT_MAX_RATIO) == \
        ([2048, 512], [0.5, 2.0], 0.75)
    assert (c.DATA.REDUCE_ZERO_LABEL, c.DATA.IGNORE_INDEX, c.MODEL.NUM_CLASSES) == (True, 255, 150)
    assert c.MODEL.REL_POS_BIAS is True
    assert (list(s.POOL_SCALES), s.AUX_CHANNELS, s.AUX_WEIGHT, s.DROPOUT, s.SLIDE_STRIDE) == \
        ([1, 2, 3, 6], 256, 0.4, 0.1, 341)
    if size == 'base':
        assert (list(s.OUT_INDICES), s.CHANNELS, t.LAYER_DECAY, c.MODEL.DROP_PATH) == \
            ([3, 5, 7, 11], 768, 0.65, 0.1)
    else:
        assert (list(s.OUT_INDICES), s.CHANNELS, c.MODEL.DROP_PATH) == ([7, 11, 15, 23], 1024, 0.2)


def test_every_config_file_loads():
    names = sorted(f[:-5] for f in os.listdir(CFG) if f.endswith('.yaml'))
    assert len(names) == 15
    for n in names:
        assert load(n).BASE == ['']


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_unknown_key_names_key_and_file(tmp_path):
    f = write(tmp_path, 'a.yaml', 'TRAIN:\n  BASE_LRR: 0.1\n')
    with pytest.raises(cfgmod.ConfigError, match=r'a\.yaml.*unknown config key TRAIN\.BASE_LRR'):
        cfgmod.get_config(f)


def test_wrong_type_names_key(tmp_path):
    f = write(tmp_path, 'a.yaml', 'DATA:\n  BATCH_SIZE: many\n')
    with pytest.raises(cfgmod.ConfigError, match=r'DATA\.BATCH_SIZE must be int'):
        cfgmod.get_config(f)
    f = write(tmp_path, 'b.yaml', 'MODEL:\n  NORM_PIX_LOSS: 1\n')
    with pytest.raises(cfgmod.ConfigError, match=r'MODEL\.NORM_PIX_LOSS must be bool'):
        cfgmod.get_config(f)


def test_choices_are_checked(tmp_path):
    f = write(tmp_path, 'a.yaml', 'TRAIN:\n  MODE: pretraining\n')
    with pytest.raises(cfgmod.ConfigError, match=r"TRAIN\.MODE is 'pretraining'"):
        cfgmod.get_config(f)


def test_yaml_exponent_without_dot_and_int_for_float(tmp_path):
    # YAML 1.1 reads 5e-4 as a string and 1 as an int: both are accepted for float keys
    f = write(tmp_path, 'a.yaml', 'TRAIN:\n  BASE_LR: 5e-4\n  MIN_LR: 0\n')
    c = cfgmod.get_config(f)
    assert c.TRAIN.BASE_LR == 5e-4 and isinstance(c.TRAIN.MIN_LR, float)


def test_base_inheritance_order_and_missing_base(tmp_path):
    write(tmp_path, 'a.yaml', 'TRAIN:\n  NUM_EPOCHS: 3\n  WARMUP_EPOCHS: 1\n')
    write(tmp_path, 'b.yaml', 'TRAIN:\n  NUM_EPOCHS: 4\n')
    f = write(tmp_path, 'c.yaml', "BASE: ['a.yaml', 'b.yaml']\nTRAIN:\n  WARMUP_EPOCHS: 2\n")
    c = cfgmod.get_config(f)
    assert (c.TRAIN.NUM_EPOCHS, c.TRAIN.WARMUP_EPOCHS) == (4, 2)
    f = write(tmp_path, 'd.yaml', "BASE: ['nope.yaml']\n")
    with pytest.raises(cfgmod.ConfigError, match=r'nope\.yaml.*a BASE of .*d\.yaml'):
        cfgmod.get_config(f)
    f = write(tmp_path, 'e.yaml', "BASE: ['e.yaml']\n")
    with pytest.raises(cfgmod.ConfigError, match='loops'):
        cfgmod.get_config(f)


def test_bad_yaml_names_line(tmp_path):
    f = write(tmp_path, 'a.yaml', 'TRAIN:\n  BASE_LR: [0.1\n')
    with pytest.raises(cfgmod.ConfigError, match=r'a\.yaml line \d+: not valid YAML'):
        cfgmod.get_config(f)


def test_a_key_written_twice_names_file_key_and_both_lines(tmp_path):
    """A section or a key repeated in one file is an error (YAML keeps the second silently);
    the same key in a BASE and in the file inheriting from it is inheritance, not an error."""
    f = write(tmp_path, 'a.yaml', 'DATA:\n  BATCH_SIZE: 8\nTRAIN:\n  NUM_EPOCHS: 3\n'
                                  'DATA:\n  NUM_WORKERS: 0\n')
    with pytest.raises(cfgmod.ConfigError) as e:
        cfgmod.get_config(f)
    assert str(e.value) == (f'{f}: DATA is written twice (lines 1 and 5); YAML would keep only '
                            f'the second: merge them into one')
    f = write(tmp_path, 'b.yaml', 'TRAIN:\n  BASE_LR: 0.1\n  OPTIMIZER:\n    NAME: LARS\n'
                                  '  BASE_LR: 0.2\n')
    with pytest.raises(cfgmod.ConfigError, match=r'b\.yaml: TRAIN\.BASE_LR is written twice '
                                                 r'\(lines 2 and 5\)'):
        cfgmod.get_config(f)
    write(tmp_path, 'base.yaml', 'TRAIN:\n  NUM_EPOCHS: 3\n')
    f = write(tmp_path, 'c.yaml', "BASE: ['base.yaml']\nTRAIN:\n  NUM_EPOCHS: 4\n"
                                  "DATA:\n  MEAN: [0.5, 0.5, 0.5]\n  STD: [0.5, 0.5, 0.5]\n")
    assert cfgmod.get_config(f).TRAIN.NUM_EPOCHS == 4
    with pytest.raises(cfgmod.ConfigError, match=r'in the checkpoint: MODEL\.NAME is written '
                                                 r'twice \(lines 2 and 3\)'):
        cfgmod.from_text('MODEL:\n  NAME: vit_custom\n  NAME: mae_vit_custom\n',
                         'in the checkpoint')


def test_flags_and_opts():
    c = load('tiny_finetune')
    args = argparse.Namespace(data_path='/data/x', output='out', batch_size=8, pretrained=None,
                              resume='auto', amp=None,
                              opts=['TRAIN.OPTIMIZER.BETAS', '[0.8,0.9]', 'TRAIN.BASE_LR', '1e-3',
                                    'DATA.BATCH_SIZE', '16'])
    cfgmod.update_config(c, args)
    assert c.DATA.DATA_PATH == '/data/x' and c.OUTPUT == 'out' and c.MODEL.RESUME == 'auto'
    assert c.DATA.BATCH_SIZE == 16  # -opts wins over -batch_size
    assert c.TRAIN.OPTIMIZER.BETAS == [0.8, 0.9] and c.TRAIN.BASE_LR == 1e-3
    with pytest.raises(cfgmod.ConfigError, match=r'-opts.*unknown config key TRAIN\.NOPE'):
        cfgmod.merge_opts(c, ['TRAIN.NOPE', '1'])
    with pytest.raises(cfgmod.ConfigError, match='odd number'):
        cfgmod.merge_opts(c, ['TRAIN.BASE_LR'])
    # an unquoted brace pattern, expanded by the shell: the value standing for a key is named
    with pytest.raises(cfgmod.ConfigError, match=r"'s/t-1\.tar' stands where a KEY should "
                                                 r"\(after DATA\.TRAIN_SHARDS 's/t-0\.tar'\): "
                                                 r"quote"):
        cfgmod.merge_opts(c, ['DATA.TRAIN_SHARDS', 's/t-0.tar', 's/t-1.tar', 's/t-2.tar'])


def test_dump_round_trip(tmp_path):
    c = load('vit_large_patch16_224_finetune')
    path = str(tmp_path / 'config.yaml')
    cfgmod.dump_config(c, path)
    assert cfgmod.get_config(path) == c
    assert not os.path.exists(path + '.tmp')


def test_every_train_mode_is_a_task_and_each_task_has_an_entry_point():
    import tasks
    assert set(cfgmod.CHOICES['TRAIN.MODE']) == set(tasks.TASKS)
    for mode in tasks.TASKS:
        with open(os.path.join(ROOT, f'main_multi_gpu_{mode}.py')) as f:
            assert f'cli.main({mode!r})' in f.read()


def test_every_shipped_config_passes_the_value_checks_and_a_bad_value_is_named():
    names = [f[:-5] for f in os.listdir(os.path.join(ROOT, 'configs')) if f.endswith('.yaml')]
    assert len(names) >= 12
    for name in names:
        cfgmod.check_values(load(name))
    c = load('tiny_finetune')
    c.TRAIN.LAYER_DECAY = 1.5
    with pytest.raises(cfgmod.ConfigError, match=r'TRAIN\.LAYER_DECAY must be in \(0, 1\] '
                                                 r'\(1: off\), got 1\.5'):
        cfgmod.check_values(c)
