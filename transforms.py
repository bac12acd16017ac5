"""Image transforms of classification: the evaluation pipeline and the official training
recipes, from the crop to RandomErasing (datasets.py only reads and deals samples).

build_transform(is_train, config, single_draw_crop) takes a config whose values
config.check_values has accepted (crop fraction, RandomResizedCrop scale, erasing
probability); only the RandAugment policy string is read here, where it is parsed.
"""
import math
import random

import numpy as np
from paddle.vision import transforms as T
from paddle.vision.transforms import functional as TF

from config import ConfigError
from randaugment import BICUBIC, rand_augment_transform


class ToCHWArray:
    """PIL RGB image -> float32 array [3, H, W] in [0, 1], torchvision ToTensor's arithmetic.

    Written here because paddle's ToTensor returns a paddle.Tensor; loader workers hand NumPy
    arrays to the collate function instead.
    """

    def __call__(self, img):
        chw = np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1),
                                   dtype=np.float32)
        chw /= np.float32(255.0)
        return chw


class ResizeCenterCrop:
    """Resize the shorter side to `resize` (bicubic), then take the centre `crop` x `crop`:
    paddle's Resize and CenterCrop, whose size and offset rounding equal torchvision's.

    For aspect ratios above 64:1 the full resize is huge (1x1000 pixels -> 256x256000), so only
    the centre band the crop keeps is resampled, through PIL's resize box; this band path is
    the one hand-written part and matches the full resize to within PIL's rounding.
    """

    MAX_ASPECT = 64

    def __init__(self, resize, crop):
        self.resize_op = T.Resize(resize, interpolation='bicubic')
        self.crop_op = T.CenterCrop(crop)
        self.resize, self.crop = resize, crop

    def __call__(self, img):
        w, h = img.size
        if max(w, h) <= self.MAX_ASPECT * min(w, h):
            return self.crop_op(self.resize_op(img))
        if w < h:
            ow, oh = self.resize, int(self.resize * h / w)
        else:
            ow, oh = int(self.resize * w / h), self.resize
        top = int(round((oh - self.crop) / 2.0))
        left = int(round((ow - self.crop) / 2.0))
        sx, sy = w / ow, h / oh
        box = (left * sx, top * sy, (left + self.crop) * sx, (top + self.crop) * sy)
        return img.resize((self.crop, self.crop), BICUBIC, box=box)


class RandomResizedCropNoRetry:
    """RandomResizedCrop of the official MAE linear probing (util/crop.py, after BYOL's TF
    code): one draw of area fraction and log-aspect, the crop clamped to the image (and to at
    least 1 pixel), no retry loop and no centre-crop fallback; then a bicubic resize to `size`.
    Paddle's RandomResizedCrop retries up to 10 times like torchvision's, hence this class.
    """

    def __init__(self, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
        self.size = (size, size)
        self.scale = scale
        self.log_ratio = (math.log(ratio[0]), math.log(ratio[1]))

    def __call__(self, img):
        width, height = img.size
        target_area = width * height * random.uniform(*self.scale)
        aspect = math.exp(random.uniform(*self.log_ratio))
        w = min(max(1, int(round(math.sqrt(target_area * aspect)))), width)
        h = min(max(1, int(round(math.sqrt(target_area / aspect)))), height)
        top = random.randint(0, height - h)
        left = random.randint(0, width - w)
        return TF.resize(TF.crop(img, top, left, h, w), self.size, 'bicubic')


class RandomErasing:
    """timm's RandomErasing on a normalised float32 [C, H, W] array, as the official MAE
    fine-tuning applies it per image after Normalize.

    With probability `prob`, erase `max_count` boxes (a random count in 1..max_count when
    max_count > 1), each covering 2 %..33 % of the image divided by the count, log-uniform
    aspect 0.3..3.33, 10 tries to fit. mode 'pixel': per-pixel standard normal values; 'rand':
    one normal value per channel; 'const': zeros. Written here because paddle's RandomErasing
    reads NumPy input as HWC, scales random values by 255 and has no box count.
    """

    def __init__(self, prob=0.25, mode='pixel', max_count=1, min_area=0.02, max_area=1 / 3,
                 min_aspect=0.3):
        if mode not in ('pixel', 'rand', 'const'):
            raise ConfigError(f"TRAIN.RANDOM_ERASE_MODE is {mode!r}; choose pixel, rand or const")
        self.prob = prob
        self.mode = mode
        self.max_count = max(1, int(max_count))
        self.area = (min_area, max_area)
        self.log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))

    def _values(self, shape):
        if self.mode == 'pixel':
            return np.random.standard_normal(shape).astype(np.float32)
        if self.mode == 'rand':
            return np.random.standard_normal((shape[0], 1, 1)).astype(np.float32)
        return np.float32(0.0)

    def __call__(self, img):
        if random.random() > self.prob:
            return img
        chans, img_h, img_w = img.shape
        count = 1 if self.max_count == 1 else random.randint(1, self.max_count)
        for _ in range(count):
            for _attempt in range(10):
                target_area = random.uniform(*self.area) * img_h * img_w / count
                aspect = math.exp(random.uniform(*self.log_aspect))
                h = int(round(math.sqrt(target_area * aspect)))
                w = int(round(math.sqrt(target_area / aspect)))
                if w < img_w and h < img_h:
                    top = random.randint(0, img_h - h)
                    left = random.randint(0, img_w - w)
                    img[:, top:top + h, left:left + w] = self._values((chans, h, w))
                    break
        return img


def eval_crop_pct(config):
    """DATA.CROP_PCT for IMAGE_SIZE <= 224; 1.0 above, as the official main_finetune does."""
    return config.DATA.CROP_PCT if config.DATA.IMAGE_SIZE <= 224 else 1.0


def build_transform(is_train, config, single_draw_crop=False):
    """A callable PIL RGB image -> float32 array [3, IMAGE_SIZE, IMAGE_SIZE].

    Evaluation: Resize(int(size / crop_pct), bicubic) on the shorter side, CenterCrop(size),
    scale to [0, 1], Normalize(MEAN, STD).
    Training: RandomResizedCrop(size, TRAIN.RRC_SCALE, bicubic) -- the official linear
    probing's single-draw variant with single_draw_crop (the task says so: tasks.LinearProbe)
    -- then horizontal flip, RandAugment (TRAIN.RAND_AUGMENT, if set), scale + Normalize,
    RandomErasing (TRAIN.RANDOM_ERASE_*, if the probability is > 0). The base configs give the
    official recipes: pre-training RRC scale (0.2, 1); fine-tuning (0.08, 1) +
    rand-m9-mstd0.5-inc1 + erasing 0.25 'pixel' x1.
    """
    d, t = config.DATA, config.TRAIN
    size = d.IMAGE_SIZE
    finish = [ToCHWArray(), T.Normalize(mean=list(d.MEAN), std=list(d.STD), data_format='CHW')]
    if not is_train:
        crop_pct = eval_crop_pct(config)
        return T.Compose([ResizeCenterCrop(int(size / crop_pct), size)] + finish)

    scale = tuple(t.RRC_SCALE)
    if single_draw_crop:
        crop = RandomResizedCropNoRetry(size, scale=scale)
    else:
        crop = T.RandomResizedCrop(size, scale=scale, interpolation='bicubic')
    ops = [crop, T.RandomHorizontalFlip()]
    if t.RAND_AUGMENT:
        try:
            ops.append(rand_augment_transform(t.RAND_AUGMENT, img_size=size, mean=d.MEAN))
        except ValueError as e:
            raise ConfigError(f'TRAIN.RAND_AUGMENT: {e}') from None
    ops += finish
    if t.RANDOM_ERASE_PROB > 0:
        ops.append(RandomErasing(t.RANDOM_ERASE_PROB, t.RANDOM_ERASE_MODE,
                                 t.RANDOM_ERASE_COUNT))
    return T.Compose(ops)
