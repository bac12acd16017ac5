"""Image transforms: RandAugment on PIL images (timm-style policy strings) and the pipelines.

The official MAE fine-tuning recipe uses timm's RandAugment through `create_transform(...,
auto_augment='rand-m9-mstd0.5-inc1', interpolation='bicubic')`. This module reproduces that
behaviour without PyTorch: the same operations, magnitude-to-argument mappings, "increasing"
variants, policy-string keys, fill colour (the dataset mean pixel) and bicubic resampling.
It also draws its random numbers in the same order as timm (Python's `random` for per-op
probability, magnitude noise and sign; NumPy's global RNG for the choice of ops), so seeded
runs give the same images as timm's implementation.

Policy string: `rand` followed by dash-separated sections, in any order:
    m<int>      magnitude, 0..10 (default 10)
    n<int>      number of ops applied per image (default 2)
    p<float>    probability of applying each chosen op (default 0.5)
    mstd<float> std of Gaussian noise added to the magnitude per call; > 100 means uniform in
                [0, m] (default 0: fixed magnitude)
    mmax<int>   upper clamp of the (noisy) magnitude instead of 10
    inc<0|1>    use the variants whose strength increases with magnitude (default 0)
    t<name>     op set: 'weights', '3a' or '3aw' (timm's experimental weighted sets)
Example: `rand-m9-mstd0.5-inc1` (MAE / DeiT fine-tuning).

The module also holds every other image transform of the project (datasets.py only reads and
deals samples): build_transform(is_train, config) gives the evaluation pipeline and the official
training recipes, from the crop to RandomErasing.
"""
import math
import random
import re

import numpy as np
from paddle.vision import transforms as T
from paddle.vision.transforms import functional as TF
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from config import ConfigError

MAX_LEVEL = 10.0  # magnitudes live on a 0..10 scale; an op's argument is a function of m / 10

if hasattr(Image, 'Resampling'):  # Pillow >= 9.1
    BICUBIC = Image.Resampling.BICUBIC
    AFFINE = Image.Transform.AFFINE
else:
    BICUBIC = Image.BICUBIC
    AFFINE = Image.AFFINE


# --------------------------------------------------------------------------- image operations
# Every op takes (img, *args, fill, resample); fill and resample matter only to geometric ops.

def _affine(img, matrix, fill, resample):
    return img.transform(img.size, AFFINE, matrix, resample=resample, fillcolor=fill)


def shear_x(img, factor, fill, resample):
    return _affine(img, (1, factor, 0, 0, 1, 0), fill, resample)


def shear_y(img, factor, fill, resample):
    return _affine(img, (1, 0, 0, factor, 1, 0), fill, resample)


def translate_x_abs(img, pixels, fill, resample):
    return _affine(img, (1, 0, pixels, 0, 1, 0), fill, resample)


def translate_y_abs(img, pixels, fill, resample):
    return _affine(img, (1, 0, 0, 0, 1, pixels), fill, resample)


def translate_x_rel(img, fraction, fill, resample):
    return translate_x_abs(img, fraction * img.size[0], fill, resample)


def translate_y_rel(img, fraction, fill, resample):
    return translate_y_abs(img, fraction * img.size[1], fill, resample)


def rotate(img, degrees, fill, resample):
    return img.rotate(degrees, resample=resample, fillcolor=fill)


def auto_contrast(img, fill, resample):
    return ImageOps.autocontrast(img)


def equalize(img, fill, resample):
    return ImageOps.equalize(img)


def invert(img, fill, resample):
    return ImageOps.invert(img)


def _per_band(img, table):
    return img.point(list(table) * len(img.getbands()))


def posterize(img, bits, fill, resample):
    """Keep the `bits` most significant bits of each channel; bits <= 0 gives a black image.

    Pillow >= 11 refuses bits < 1 in ImageOps.posterize; older Pillow (which timm's recipes were
    tuned with) masked every bit away, so 0 bits -- reached by PosterizeIncreasing at magnitude
    10 -- meant black. The mask is applied here directly to keep that behaviour on any Pillow.
    """
    if bits >= 8:
        return img
    keep = max(int(bits), 0)
    mask = (0xFF << (8 - keep)) & 0xFF
    return _per_band(img, (i & mask for i in range(256)))


def solarize(img, threshold, fill, resample):
    return ImageOps.solarize(img, threshold)


def solarize_add(img, add, fill, resample, threshold=128):
    if img.mode not in ('L', 'RGB'):
        return img
    return _per_band(img, (min(255, i + add) if i < threshold else i for i in range(256)))


def color(img, factor, fill, resample):
    return ImageEnhance.Color(img).enhance(factor)


def contrast(img, factor, fill, resample):
    return ImageEnhance.Contrast(img).enhance(factor)


def brightness(img, factor, fill, resample):
    return ImageEnhance.Brightness(img).enhance(factor)


def sharpness(img, factor, fill, resample):
    return ImageEnhance.Sharpness(img).enhance(factor)


def desaturate(img, amount, fill, resample):
    return ImageEnhance.Color(img).enhance(min(1.0, max(0.0, 1.0 - amount)))


def gaussian_blur(img, radius, fill, resample):
    return img.filter(ImageFilter.GaussianBlur(radius=radius))


def gaussian_blur_rand(img, strength, fill, resample):
    return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0 * strength)))


# --------------------------------------------------------------- magnitude -> op argument(s)
# level: magnitude on the 0..10 scale (after noise and clamping). Returns the op's arguments.

def _signed(value):
    """A random sign, drawn as timm draws it (one random.random() call)."""
    return -value if random.random() > 0.5 else value


def _no_args(level, hp):
    return ()


def _rotate_args(level, hp):
    return (_signed(level / MAX_LEVEL * 30.0),)          # +-30 degrees at m=10


def _shear_args(level, hp):
    return (_signed(level / MAX_LEVEL * 0.3),)           # +-0.3 at m=10


def _translate_abs_args(level, hp):
    return (_signed(level / MAX_LEVEL * float(hp['translate_const'])),)


def _translate_rel_args(level, hp):
    return (_signed(level / MAX_LEVEL * hp['translate_pct']),)  # +-45 % of the side at m=10


def _enhance_args(level, hp):
    return (level / MAX_LEVEL * 1.8 + 0.1,)              # 0.1 .. 1.9; 1.0 = unchanged at m=5


def _enhance_increasing_args(level, hp):
    return (max(0.1, 1.0 + _signed(level / MAX_LEVEL * 0.9)),)  # away from 1.0 as m grows


def _posterize_args(level, hp):
    return (int(level / MAX_LEVEL * 4),)                 # 0..4 bits kept: stronger at low m


def _posterize_increasing_args(level, hp):
    return (4 - _posterize_args(level, hp)[0],)          # 4..0 bits kept: stronger at high m


def _posterize_original_args(level, hp):
    return (_posterize_args(level, hp)[0] + 4,)          # 4..8 bits kept (AutoAugment paper)


def _solarize_args(level, hp):
    return (min(256, int(level / MAX_LEVEL * 256)),)     # threshold 0..256: stronger at low m


def _solarize_increasing_args(level, hp):
    return (256 - _solarize_args(level, hp)[0],)


def _solarize_add_args(level, hp):
    return (min(128, int(level / MAX_LEVEL * 110)),)


def _range_args(low, high):
    def args(level, hp):
        return (min(high, max(low, low + (high - low) * level / MAX_LEVEL)),)
    return args


# name -> (operation, magnitude-to-arguments); the names are timm's.
OPS = {
    'AutoContrast': (auto_contrast, _no_args),
    'Equalize': (equalize, _no_args),
    'Invert': (invert, _no_args),
    'Rotate': (rotate, _rotate_args),
    'Posterize': (posterize, _posterize_args),
    'PosterizeIncreasing': (posterize, _posterize_increasing_args),
    'PosterizeOriginal': (posterize, _posterize_original_args),
    'Solarize': (solarize, _solarize_args),
    'SolarizeIncreasing': (solarize, _solarize_increasing_args),
    'SolarizeAdd': (solarize_add, _solarize_add_args),
    'Color': (color, _enhance_args),
    'ColorIncreasing': (color, _enhance_increasing_args),
    'Contrast': (contrast, _enhance_args),
    'ContrastIncreasing': (contrast, _enhance_increasing_args),
    'Brightness': (brightness, _enhance_args),
    'BrightnessIncreasing': (brightness, _enhance_increasing_args),
    'Sharpness': (sharpness, _enhance_args),
    'SharpnessIncreasing': (sharpness, _enhance_increasing_args),
    'ShearX': (shear_x, _shear_args),
    'ShearY': (shear_y, _shear_args),
    'TranslateX': (translate_x_abs, _translate_abs_args),
    'TranslateY': (translate_y_abs, _translate_abs_args),
    'TranslateXRel': (translate_x_rel, _translate_rel_args),
    'TranslateYRel': (translate_y_rel, _translate_rel_args),
    'Desaturate': (desaturate, _range_args(0.5, 1.0)),
    'GaussianBlur': (gaussian_blur, _range_args(0.1, 2.0)),
    'GaussianBlurRand': (gaussian_blur_rand, _range_args(0.0, 1.0)),
}

# The op sets RandAugment samples from (timm's lists; Cutout is done as RandomErasing instead).
RAND_OPS = ['AutoContrast', 'Equalize', 'Invert', 'Rotate', 'Posterize', 'Solarize',
            'SolarizeAdd', 'Color', 'Contrast', 'Brightness', 'Sharpness', 'ShearX', 'ShearY',
            'TranslateXRel', 'TranslateYRel']
RAND_INCREASING_OPS = ['AutoContrast', 'Equalize', 'Invert', 'Rotate', 'PosterizeIncreasing',
                       'SolarizeIncreasing', 'SolarizeAdd', 'ColorIncreasing',
                       'ContrastIncreasing', 'BrightnessIncreasing', 'SharpnessIncreasing',
                       'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel']
OP_SETS = {  # the 't<name>' key; a dict gives sampling weights (ops then drawn without replacement)
    '3a': ['SolarizeIncreasing', 'Desaturate', 'GaussianBlur'],
    '3aw': {'SolarizeIncreasing': 6, 'Desaturate': 6, 'GaussianBlur': 6, 'Rotate': 3,
            'ShearX': 2, 'ShearY': 2, 'PosterizeIncreasing': 1, 'AutoContrast': 1,
            'ColorIncreasing': 1, 'SharpnessIncreasing': 1, 'ContrastIncreasing': 1,
            'BrightnessIncreasing': 1, 'Equalize': 1, 'Invert': 1},
    'weights': {'Rotate': 3, 'ShearX': 2, 'ShearY': 2, 'TranslateXRel': 1, 'TranslateYRel': 1,
                'ColorIncreasing': .25, 'SharpnessIncreasing': 0.25, 'AutoContrast': 0.25,
                'SolarizeIncreasing': .05, 'SolarizeAdd': .05, 'ContrastIncreasing': .05,
                'BrightnessIncreasing': .05, 'Equalize': .05, 'PosterizeIncreasing': 0.05,
                'Invert': 0.05},
}


class AugmentOp:
    """One named op applied with probability `prob` at magnitude `magnitude` (0..10 scale).

    magnitude_std > 0 adds Gaussian noise to the magnitude on every call (inf: uniform in
    [0, magnitude]); the result is clamped to [0, magnitude_max or 10].
    fill: RGB colour of pixels uncovered by geometric ops; resample: PIL filter they use.
    translate_const: pixels at m=10 for TranslateX/Y; translate_pct: fraction at m=10 for the
    *Rel variants.
    """

    def __init__(self, name, prob=0.5, magnitude=10, magnitude_std=0.0, magnitude_max=None,
                 fill=(128, 128, 128), resample=BICUBIC, translate_const=250, translate_pct=0.45):
        if name not in OPS:
            raise ValueError(f'unknown RandAugment op {name!r}; known: {sorted(OPS)}')
        self.name = name
        self.op, self.level_to_args = OPS[name]
        self.prob = prob
        self.magnitude = magnitude
        self.magnitude_std = magnitude_std
        self.magnitude_max = magnitude_max
        self.fill = tuple(fill)
        self.resample = resample
        self.hparams = {'translate_const': translate_const, 'translate_pct': translate_pct}

    def __call__(self, img):
        if self.prob < 1.0 and random.random() > self.prob:
            return img
        level = self.magnitude
        if self.magnitude_std == float('inf'):
            level = random.uniform(0, level)
        elif self.magnitude_std > 0:
            level = random.gauss(level, self.magnitude_std)
        level = max(0.0, min(level, self.magnitude_max or MAX_LEVEL))
        args = self.level_to_args(level, self.hparams)
        return self.op(img, *args, fill=self.fill, resample=self.resample)

    def __repr__(self):
        return (f'AugmentOp({self.name}, p={self.prob}, m={self.magnitude}, '
                f'mstd={self.magnitude_std}, mmax={self.magnitude_max})')


class RandAugment:
    """Apply `num_layers` ops drawn from `ops` (with replacement, or without by `weights`)."""

    def __init__(self, ops, num_layers=2, weights=None):
        self.ops = list(ops)
        self.num_layers = num_layers
        self.weights = None if weights is None else np.asarray(weights, dtype=np.float64)

    def __call__(self, img):
        chosen = np.random.choice(len(self.ops), self.num_layers,
                                  replace=self.weights is None, p=self.weights)
        for i in chosen:
            img = self.ops[i](img)
        return img

    def __repr__(self):
        ops = ', '.join(op.name for op in self.ops)
        return f'RandAugment(n={self.num_layers}, ops=[{ops}])'


def parse_policy(policy):
    """'rand-m9-mstd0.5-inc1' -> dict(magnitude, num_layers, prob, magnitude_std,
    magnitude_max, increasing, op_set). Raises ValueError naming the policy and the section."""
    sections = policy.split('-')
    if sections[0] != 'rand':
        raise ValueError(f'RandAugment policy {policy!r} must start with "rand-" '
                         f'(e.g. rand-m9-mstd0.5-inc1)')
    out = dict(magnitude=MAX_LEVEL, num_layers=2, prob=0.5, magnitude_std=0.0,
               magnitude_max=None, increasing=False, op_set=None)
    for section in sections[1:]:
        if section.startswith('t'):
            if section[1:] not in OP_SETS:
                raise ValueError(f'RandAugment policy {policy!r}: unknown op set {section[1:]!r} '
                                 f'(t<name> takes one of {sorted(OP_SETS)})')
            out['op_set'] = section[1:]
            continue
        match = re.fullmatch(r'([a-z]+)(\d.*)', section)
        try:
            if match is None:
                raise ValueError
            key, value = match.groups()
            if key == 'm':
                out['magnitude'] = float(value)
            elif key == 'n':
                out['num_layers'] = int(value)
            elif key == 'p':
                out['prob'] = float(value)
            elif key == 'mstd':
                std = float(value)
                out['magnitude_std'] = float('inf') if std > 100 else std
            elif key == 'mmax':
                out['magnitude_max'] = int(value)
            elif key == 'inc':
                out['increasing'] = bool(int(value))
            else:
                raise ValueError
        except ValueError:
            raise ValueError(f'RandAugment policy {policy!r}: cannot read section {section!r}; '
                             f'sections are m<int>, n<int>, p<float>, mstd<float>, mmax<int>, '
                             f'inc<0|1>, t<op set>') from None
    return out


def rand_augment_transform(policy, img_size=224, mean=(0.485, 0.456, 0.406), resample=BICUBIC):
    """Build RandAugment from a policy string as timm's create_transform does for the MAE
    recipe: fill = the mean pixel in 0..255, absolute translation 45 % of img_size, the
    given resampling filter (the official fine-tuning passes bicubic)."""
    p = parse_policy(policy)
    names = OP_SETS[p['op_set']] if p['op_set'] else (
        RAND_INCREASING_OPS if p['increasing'] else RAND_OPS)
    weights = None
    if isinstance(names, dict):
        names, weights = list(names), np.array(list(names.values()), dtype=np.float64)
        weights = weights / weights.sum()
    fill = tuple(min(255, round(255 * m)) for m in mean)
    ops = [AugmentOp(name, prob=p['prob'], magnitude=p['magnitude'],
                     magnitude_std=p['magnitude_std'], magnitude_max=p['magnitude_max'],
                     fill=fill, resample=resample, translate_const=int(img_size * 0.45))
           for name in names]
    return RandAugment(ops, p['num_layers'], weights)


# ---------------------------------------------------------------------------------- transforms

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


def build_transform(is_train, config):
    """A callable PIL RGB image -> float32 array [3, IMAGE_SIZE, IMAGE_SIZE].

    Evaluation: Resize(int(size / crop_pct), bicubic) on the shorter side, CenterCrop(size),
    scale to [0, 1], Normalize(MEAN, STD).
    Training: RandomResizedCrop(size, TRAIN.RRC_SCALE, bicubic) -- the official linear
    probing's single-draw variant when the task asks for it (tasks.LinearProbe) -- then
    horizontal flip, RandAugment (TRAIN.RAND_AUGMENT, if set), scale + Normalize, RandomErasing
    (TRAIN.RANDOM_ERASE_*, if the probability is > 0). The base configs give the official
    recipes: pre-training RRC scale (0.2, 1); fine-tuning (0.08, 1) + rand-m9-mstd0.5-inc1 +
    erasing 0.25 'pixel' x1.
    """
    d, t = config.DATA, config.TRAIN
    size = d.IMAGE_SIZE
    finish = [ToCHWArray(), T.Normalize(mean=list(d.MEAN), std=list(d.STD), data_format='CHW')]
    if not is_train:
        crop_pct = eval_crop_pct(config)
        if not 0 < crop_pct <= 1:
            raise ConfigError(f'DATA.CROP_PCT must be in (0, 1], got {crop_pct}')
        return T.Compose([ResizeCenterCrop(int(size / crop_pct), size)] + finish)

    scale = tuple(t.RRC_SCALE)
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        raise ConfigError(f'TRAIN.RRC_SCALE must be [low, high] with 0 < low <= high <= 1, '
                          f'got {list(t.RRC_SCALE)}')
    import tasks  # (lazy: the task, not TRAIN.MODE strings, says which crop it trains with)
    if tasks.get_task(config).single_draw_crop:
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
        if t.RANDOM_ERASE_PROB > 1:
            raise ConfigError(f'TRAIN.RANDOM_ERASE_PROB must be in [0, 1], '
                              f'got {t.RANDOM_ERASE_PROB}')
        ops.append(RandomErasing(t.RANDOM_ERASE_PROB, t.RANDOM_ERASE_MODE,
                                 t.RANDOM_ERASE_COUNT))
    return T.Compose(ops)
