"""randaugment.py against timm's RandAugment: op by op, policy parsing, whole policies on seeds."""
import os
import random
import sys

import numpy as np
import pytest
from PIL import Image

import helpers as H
import randaugment
import transforms
from config import ConfigError
from conftest import ROOT

AA = pytest.importorskip('timm.data.auto_augment')
sys.path.insert(0, os.path.join(ROOT, 'tools'))
from benchmark_reference import TIMM_POSTERIZE_OPS, timm_posterize_as_old_pillow  # noqa: E402

FILL = (124, 116, 104)  # ImageNet mean pixel, as timm's create_transform passes it
TIMM_HPARAMS = dict(translate_const=100, img_mean=FILL, interpolation=Image.BICUBIC)


@pytest.fixture(scope='module')
def photos():
    return [H.photo('chelsea.png', (96, 64)), H.photo('astronaut.png', (64, 64)),
            H.photo('camera.png', (50, 70))]


@pytest.mark.parametrize('name', sorted(AA.NAME_TO_OP))
def test_each_op_equals_timm(name, photos):
    for img in photos:
        for magnitude in (0, 1, 3, 5, 7.5, 9, 10):
            for seed in range(3):  # the seed decides the random sign of signed ops
                ours = randaugment.AugmentOp(name, prob=1.0, magnitude=magnitude, fill=FILL,
                                         translate_const=100)
                theirs = AA.AugmentOp(name, prob=1.0, magnitude=magnitude, hparams=TIMM_HPARAMS)
                random.seed(seed)
                a = np.asarray(ours(img))
                random.seed(seed)
                try:
                    b = np.asarray(theirs(img))
                except ValueError:  # Pillow >= 11: posterize with 0 bits
                    assert name.startswith('Posterize')
                    b = np.zeros_like(a)
                assert a.shape == b.shape and np.array_equal(a, b), (name, magnitude, seed)


def test_op_names_and_sets_are_timms():
    assert set(randaugment.OPS) == set(AA.NAME_TO_OP)
    assert randaugment.RAND_OPS == AA._RAND_TRANSFORMS
    assert randaugment.RAND_INCREASING_OPS == AA._RAND_INCREASING_TRANSFORMS
    assert randaugment.OP_SETS['3a'] == AA._RAND_3A
    assert randaugment.OP_SETS['3aw'] == AA._RAND_WEIGHTED_3A
    assert randaugment.OP_SETS['weights'] == AA._RAND_WEIGHTED_0


def test_posterize_zero_bits_is_black_and_eight_bits_unchanged(photos):
    img = photos[0]
    assert np.asarray(randaugment.posterize(img, 0, FILL, None)).max() == 0
    assert np.asarray(randaugment.posterize(img, -2, FILL, None)).max() == 0
    assert randaugment.posterize(img, 8, FILL, None) is img
    four = np.asarray(randaugment.posterize(img, 4, FILL, None))
    assert np.array_equal(four, np.asarray(img) & 0xF0)
    inc = randaugment.AugmentOp('PosterizeIncreasing', prob=1.0, magnitude=10)
    assert np.asarray(inc(img)).max() == 0  # 4 - int(10 / 10 * 4) = 0 bits


def test_geometric_ops_fill_with_the_mean_pixel(photos):
    op = randaugment.AugmentOp('Rotate', prob=1.0, magnitude=10, fill=FILL)
    out = np.asarray(op(photos[0]))
    assert tuple(out[0, 0]) == FILL and tuple(out[-1, -1]) == FILL


POLICIES = ['rand-m9-mstd0.5-inc1', 'rand-m7-n3', 'rand-m9-mstd101', 'rand-n1-m5-p0.8-mmax12',
            'rand-m10-inc0', 'rand', 'rand-tweights-m9', 'rand-t3a-n1', 'rand-m6-t3aw-inc1']


@pytest.mark.parametrize('policy', POLICIES)
def test_policy_parsing_equals_timm(policy):
    ours = randaugment.rand_augment_transform(policy, img_size=224)
    theirs = AA.rand_augment_transform(policy, dict(TIMM_HPARAMS))
    assert [op.name for op in ours.ops] == [op.name for op in theirs.ops]
    assert ours.num_layers == theirs.num_layers
    for a, b in zip(ours.ops, theirs.ops):
        assert a.prob == b.prob and a.magnitude == b.magnitude
        assert a.magnitude_std == b.magnitude_std and a.magnitude_max == b.magnitude_max
        assert a.fill == FILL and a.hparams['translate_const'] == 100
    if theirs.choice_weights is None:
        assert ours.weights is None
    else:
        assert np.allclose(ours.weights, theirs.choice_weights)


def test_policy_parsing_values():
    p = randaugment.parse_policy('rand-m9-mstd0.5-inc1')
    assert p == dict(magnitude=9, num_layers=2, prob=0.5, magnitude_std=0.5, magnitude_max=None,
                     increasing=True, op_set=None)
    assert randaugment.parse_policy('rand-mstd200')['magnitude_std'] == float('inf')


@pytest.mark.parametrize('policy,fragment', [
    ('augmix-m9', 'must start with "rand-"'), ('rand-x9', "'x9'"), ('rand-m', "'m'"),
    ('rand-mfoo', "'mfoo'"), ('rand-n2.5', "'n2.5'"), ('rand-tnope', "'nope'")])
def test_bad_policy_strings_are_named(policy, fragment):
    with pytest.raises(ValueError) as e:
        randaugment.parse_policy(policy)
    assert policy in str(e.value) and fragment in str(e.value)


def test_bad_policy_in_config_is_a_config_error():
    cfg = H.tiny_config('finetune', TRAIN__RAND_AUGMENT='rand-m9-q3')
    with pytest.raises(ConfigError, match=r"TRAIN.RAND_AUGMENT.*'q3'"):
        transforms.build_transform(True, cfg)


@pytest.mark.parametrize('policy', ['rand-m9-mstd0.5-inc1', 'rand-m9-n3-mstd101-p0.9',
                                    'rand-tweights-m7', 'rand-m10-mmax15-mstd2-inc1'])
def test_whole_policy_equals_timm_on_fixed_seeds(policy, photos, monkeypatch):
    for name in TIMM_POSTERIZE_OPS:
        monkeypatch.setitem(AA.NAME_TO_OP, name, timm_posterize_as_old_pillow)
    ours = randaugment.rand_augment_transform(policy, img_size=224)
    theirs = AA.rand_augment_transform(policy, dict(TIMM_HPARAMS))
    outputs = set()
    for seed in range(25):
        img = photos[seed % len(photos)]
        random.seed(seed)
        np.random.seed(seed)
        a = np.asarray(ours(img))
        random.seed(seed)
        np.random.seed(seed)
        b = np.asarray(theirs(img))
        assert np.array_equal(a, b), (policy, seed)
        outputs.add(a.tobytes())
    assert len(outputs) > 12  # the seeds gave different augmentations (p < 1 may skip all)
