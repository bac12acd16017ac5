"""build_transform: eval equal to torchvision's, the training recipes, RandomErasing as timm's."""
import random

import numpy as np
import pytest

import helpers as H
import config as cfgmod
import tasks
import transforms
import utils

torch = pytest.importorskip('torch')
TT = pytest.importorskip('torchvision.transforms')
TF = pytest.importorskip('torchvision.transforms.functional')

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def torchvision_eval(image_size, crop_pct):
    """The official MAE eval transform (util/datasets.py), in torchvision."""
    return TT.Compose([TT.Resize(int(image_size / crop_pct),
                                 interpolation=TT.InterpolationMode.BICUBIC),
                       TT.CenterCrop(image_size), TT.ToTensor(), TT.Normalize(MEAN, STD)])


@pytest.mark.parametrize('name', H.PHOTOS)
@pytest.mark.parametrize('image_size,crop_pct', [(224, 0.875), (32, 0.875), (384, 1.0)])
def test_eval_transform_equals_torchvision_on_photos(name, image_size, crop_pct):
    cfg = H.tiny_config(DATA__IMAGE_SIZE=image_size)
    img = H.photo(name)
    ours = transforms.build_transform(False, cfg)(img)
    ref = torchvision_eval(image_size, crop_pct)(img).numpy()
    assert ours.shape == (3, image_size, image_size) and ours.dtype == np.float32
    assert np.abs(ours - ref).max() < 1e-5


@pytest.mark.parametrize('w,h', [(1, 1), (7, 3), (3, 7), (300, 200), (225, 224), (256, 256),
                                 (500, 375), (37, 1000), (1, 1000), (1000, 1)])
def test_eval_transform_equals_torchvision_on_synthetic(w, h):
    cfg = H.tiny_config(DATA__IMAGE_SIZE=224)
    img = H.noise_image(w, h, seed=w * 7 + h)
    ours = transforms.build_transform(False, cfg)(img)
    ref = torchvision_eval(224, 0.875)(img).numpy()
    assert ours.shape == (3, 224, 224)
    assert np.abs(ours - ref).max() < 1e-5


def test_eval_crop_pct_is_one_above_224_as_official():
    assert transforms.eval_crop_pct(H.tiny_config(DATA__IMAGE_SIZE=224)) == 0.875
    assert transforms.eval_crop_pct(H.tiny_config(DATA__IMAGE_SIZE=448)) == 1.0
    transform = transforms.build_transform(False, H.tiny_config(DATA__IMAGE_SIZE=32))
    assert transform.transforms[0].resize == 36  # int(32 / 0.875)


def test_bad_crop_pct_is_a_config_error():
    with pytest.raises(cfgmod.ConfigError, match='DATA.CROP_PCT'):
        cfgmod.check_values(H.tiny_config(DATA__CROP_PCT=1.5))


def test_to_chw_array_equals_torchvision_to_tensor():
    img = H.photo('coffee.png')
    assert np.array_equal(transforms.ToCHWArray()(img), TF.to_tensor(img).numpy())


@pytest.mark.parametrize('stage', ['pretrain', 'finetune', 'linearprobe'])
def test_train_transform_recipes(stage):
    cfg = H.tiny_config(stage)
    ops = tasks.get_task(cfg).build_transform(True).transforms
    kinds = [type(op).__name__ for op in ops]
    crop = 'RandomResizedCropNoRetry' if stage == 'linearprobe' else 'RandomResizedCrop'
    expected = {
        'pretrain': [crop, 'RandomHorizontalFlip', 'ToCHWArray', 'Normalize'],
        'linearprobe': [crop, 'RandomHorizontalFlip', 'ToCHWArray', 'Normalize'],
        'finetune': [crop, 'RandomHorizontalFlip', 'RandAugment', 'ToCHWArray', 'Normalize',
                     'RandomErasing'],
    }[stage]
    assert kinds == expected
    assert tuple(ops[0].scale) == {'pretrain': (0.2, 1.0)}.get(stage, (0.08, 1.0))
    if stage != 'linearprobe':
        assert ops[0].interpolation == 'bicubic'
    if stage == 'finetune':
        ra, erase = ops[2], ops[5]
        assert ra.num_layers == 2 and ra.ops[0].magnitude == 9
        assert ra.ops[0].magnitude_std == 0.5 and ra.ops[4].name == 'PosterizeIncreasing'
        assert ra.ops[0].fill == (124, 116, 104)  # the mean pixel, as create_transform passes
        assert (erase.prob, erase.mode, erase.max_count) == (0.25, 'pixel', 1)
    for name in ('chelsea.png', 'camera.png'):
        out = tasks.get_task(cfg).build_transform(True)(H.photo(name))
        assert out.shape == (3, 32, 32) and out.dtype == np.float32
        assert np.isfinite(out).all()


def test_train_transform_reproducible_from_seeds():
    transform = transforms.build_transform(True, H.tiny_config('finetune', DATA__IMAGE_SIZE=64))
    img = H.photo('astronaut.png')

    def run(seed):
        utils.seed_everything(seed, 0, 0, 0, include_paddle=False)
        return np.stack([transform(img) for _ in range(4)])

    assert np.array_equal(run(1), run(1))
    assert not np.array_equal(run(1), run(2))


def test_rrc_full_scale_on_square_image_is_a_plain_resize():
    """scale (1, 1) on a square image: every try needs aspect exactly 1, so torchvision's /
    paddle's RandomResizedCrop falls back to the whole image."""
    cfg = H.tiny_config('pretrain', TRAIN__RRC_SCALE=[1.0, 1.0], DATA__IMAGE_SIZE=64)
    img = H.photo('astronaut.png')
    ref = TT.Compose([TT.Resize((64, 64), interpolation=TT.InterpolationMode.BICUBIC),
                      TT.ToTensor(), TT.Normalize(MEAN, STD)])(img).numpy()
    random.seed(0)
    out = transforms.build_transform(True, cfg)(img)
    assert np.abs(out - ref).max() < 1e-5 or np.abs(out - ref[:, :, ::-1]).max() < 1e-5


def test_linear_probe_crop_clamps_instead_of_retrying(monkeypatch):
    """util/crop.py of the official MAE: area x1.0, aspect 4/3 on a 512x512 image gives
    w = 591 -> clamped to 512 and h = 443; torchvision's version would fall back to the centre."""
    crop = transforms.RandomResizedCropNoRetry(48, scale=(1.0, 1.0))
    draws = iter([1.0, np.log(4 / 3)])
    monkeypatch.setattr(transforms.random, 'uniform', lambda a, b: next(draws))
    monkeypatch.setattr(transforms.random, 'randint', lambda a, b: b)  # last valid offset
    img = H.photo('astronaut.png')
    out = np.asarray(crop(img))
    h = int(round(np.sqrt(512 * 512 * 3 / 4)))
    ref = TF.resized_crop(img, 512 - h, 0, h, 512, [48, 48],
                          interpolation=TT.InterpolationMode.BICUBIC)
    assert h == 443 and out.shape == (48, 48, 3)
    assert np.array_equal(out, np.asarray(ref))


def test_linear_probe_crop_survives_a_single_pixel():
    random.seed(0)
    out = transforms.RandomResizedCropNoRetry(16)(H.noise_image(1, 1))
    assert out.size == (16, 16)


@pytest.mark.parametrize('count', [1, 3])
def test_random_erasing_boxes_equal_timm(count):
    from timm.data.random_erasing import RandomErasing as TimmErasing
    for seed in range(10):
        ours = transforms.RandomErasing(prob=0.5, mode='const', max_count=count)
        theirs = TimmErasing(probability=0.5, mode='const', max_count=count, device='cpu')
        random.seed(seed)
        a = ours(np.ones((3, 40, 56), np.float32))
        random.seed(seed)
        b = theirs(torch.ones(3, 40, 56)).numpy()
        assert np.array_equal(a, b)


def test_random_erasing_pixel_mode_is_standard_normal_noise():
    np.random.seed(0)
    zeros = np.full((3, 224, 224), 7.0, np.float32)
    hits = []
    for seed in range(20):
        random.seed(seed)
        out = transforms.RandomErasing(prob=1.0, mode='pixel')(zeros.copy())
        hits.append(out[out != 7.0])
        assert out.dtype == np.float32
    values = np.concatenate(hits)
    assert values.size > 20 * 0.02 * 224 * 224 * 3 * 0.9  # every call erased a box
    assert abs(values.mean()) < 0.02 and abs(values.std() - 1.0) < 0.02


def test_random_erasing_prob_zero_and_bad_mode():
    x = np.ones((3, 8, 8), np.float32)
    assert np.array_equal(transforms.RandomErasing(prob=0.0)(x.copy()), x)
    with pytest.raises(cfgmod.ConfigError, match='RANDOM_ERASE_MODE'):
        transforms.RandomErasing(mode='noise')

