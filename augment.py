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


# -------------------------------------------- joint image + mask transforms (semantic segmentation)
# mmsegmentation's ADE20K pipelines (the MAE paper's transfer recipe, DESIGN.md 5), on NumPy:
#   training   RandomResize(SEG_SCALE x ratio, ratio ~ U(SEG_RATIO_RANGE), keep ratio)
#              -> RandomCrop(IMAGE_SIZE, cat_max_ratio SEG_CAT_MAX_RATIO) -> flip p 0.5
#              -> PhotoMetricDistortion (SEG_PHOTOMETRIC) -> normalise -> pad to IMAGE_SIZE
#   evaluation resize into SEG_SCALE (keep ratio) -> normalise; the mask is left as it is, since
#              predictions are scored at the annotation's own size.
# Every random number comes from NumPy's global RNG, drawn in the order of mmsegmentation 0.x's
# transforms (ratio; crop offsets y, x per try; flip; photometric draws), so the per-sample
# seeding of datasets.ImageDataset fixes a sample's augmentation.
# Image resampling follows OpenCV's INTER_LINEAR (what mmcv.imresize calls): pixel-centre
# aligned, edge pixels repeated, no antialiasing when shrinking (PIL's resize would average
# over the shrunk footprint and give the network softer images than the recipe trained on).
# Masks use nearest-neighbour with pixel-centre alignment (PIL's NEAREST; OpenCV's
# INTER_NEAREST_EXACT). mmcv calls OpenCV's INTER_NEAREST, which samples at the pixel's corner
# and so shifts the mask by up to half a source pixel towards the top-left of the image; the
# centred rule keeps labels on the pixels the bilinear image puts them.

def seg_rescale_size(width, height, scale):
    """(new width, new height) of mmcv's rescale_size for a (long, short) bound `scale`: the
    largest keep-ratio size within both bounds, factor = min(long / long side, short / short
    side), each side int(side * factor + 0.5) (at least 1)."""
    long_bound, short_bound = max(scale), min(scale)
    factor = min(long_bound / max(width, height), short_bound / min(width, height))
    return max(1, int(width * factor + 0.5)), max(1, int(height * factor + 0.5))


def _linear_taps(n_out, n_in, start, stop):
    """Source indices (left, right) and right weight for output pixels start..stop-1 of an
    axis resized n_in -> n_out: output pixel centre (i + 0.5) maps to (i + 0.5) * n_in / n_out
    in the source, whose pixel centres sit at j + 0.5; beyond the first / last centre the edge
    pixel is repeated (both taps clamp to it)."""
    x = (np.arange(start, stop, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    left = np.floor(x)
    frac = (x - left).astype(np.float32)
    left = left.astype(np.intp)
    return np.clip(left, 0, n_in - 1), np.clip(left + 1, 0, n_in - 1), frac


def resize_bilinear(image, size, window=None):
    """uint8 [H, W, C] -> uint8 [h, w, C] resized to size = (w, h), OpenCV INTER_LINEAR rules
    (see above), rounded to the nearest integer. window = (top, bottom, left, right): only that
    part of the resized image, computed directly -- the same pixels as resizing everything and
    cropping, at the cost of the crop (a training crop of 512 out of a resize to 1024 x 1365)."""
    new_w, new_h = size
    top, bottom, left, right = window if window is not None else (0, new_h, 0, new_w)
    r0, r1, fy = _linear_taps(new_h, image.shape[0], top, bottom)
    c0, c1, fx = _linear_taps(new_w, image.shape[1], left, right)
    # rows first, then columns (the same bilinear), gathering before converting to float
    top = np.take(image, r0, axis=0).astype(np.float32)
    rows = top + (np.take(image, r1, axis=0) - top) * fy[:, None, None]
    west = np.take(rows, c0, axis=1)
    out = west + (np.take(rows, c1, axis=1) - west) * fx[None, :, None]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def resize_nearest(mask, size):
    """[H, W] label map -> [h, w] for size = (w, h): each output pixel takes the source pixel
    under its centre ((i + 0.5) * H / h, floored). Any integer dtype; values are never mixed."""
    new_w, new_h = size
    h, w = mask.shape
    rows = np.minimum(((np.arange(new_h) + 0.5) * (h / new_h)).astype(np.intp), h - 1)
    cols = np.minimum(((np.arange(new_w) + 0.5) * (w / new_w)).astype(np.intp), w - 1)
    return np.take(np.take(mask, rows, axis=0), cols, axis=1)


def random_crop_box(mask, crop_size, cat_max_ratio=1.0, ignore_index=255):
    """mmsegmentation's RandomCrop box -> (top, left, height, width), height/width =
    min(crop_size, side). Offsets uniform over the valid range (np.random.randint, y then x).
    With cat_max_ratio < 1 a box is re-drawn up to 10 times while its non-ignored pixels hold
    a single class or one class covers cat_max_ratio of them or more; the 11th draw is kept
    unchecked, as mmsegmentation keeps it (the pipeline never loops forever on an image of one
    class)."""
    h, w = mask.shape
    ch, cw = min(crop_size, h), min(crop_size, w)

    def draw():
        return np.random.randint(0, h - ch + 1), np.random.randint(0, w - cw + 1)

    top, left = draw()
    if cat_max_ratio < 1.0:
        for _ in range(10):
            counts = np.bincount(mask[top:top + ch, left:left + cw].ravel())
            if ignore_index < len(counts):
                counts[ignore_index] = 0
            counts = counts[counts > 0]
            if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
                break
            top, left = draw()
    return top, left, ch, cw


# OpenCV's 8-bit HSV (what mmcv.bgr2hsv / hsv2bgr call): hue in 0..179 (2 degrees a step),
# saturation and value in 0..255. RGB -> HSV uses OpenCV's integer arithmetic with its
# reciprocal tables (12 fractional bits, entries rounded half to even), so it gives OpenCV's
# values exactly; HSV -> RGB is OpenCV's float32 formula rounded to nearest, which OpenCV's
# scalar code does too (some OpenCV builds truncate in their SIMD path instead: up to 1 level
# lower there). PIL's own HSV would differ more: its hue has 256 steps, so mmseg's hue delta of
# 18 (36 degrees) would not be the same shift.
_HSV_SHIFT = 12
_SDIV = np.zeros(256, np.int32)
_SDIV[1:] = np.rint((255 << _HSV_SHIFT) / np.arange(1, 256, dtype=np.float64))
_HDIV = np.zeros(256, np.int32)
_HDIV[1:] = np.rint((180 << _HSV_SHIFT) / (6.0 * np.arange(1, 256, dtype=np.float64)))
# for each 60-degree sector of hue, which of (v, v(1-s), v(1-sf), v(1-s(1-f))) is r, g, b
_HSV_SECTORS = np.array([[0, 3, 1], [2, 0, 1], [1, 0, 3], [1, 2, 0], [3, 1, 0], [0, 1, 2]])


def rgb_to_hsv_u8(rgb):
    """uint8 RGB [..., 3] -> uint8 HSV [..., 3] with OpenCV's 8-bit conventions (see above)."""
    r, g, b = (rgb[..., k].astype(np.int32) for k in range(3))  # products stay < 2**31
    v = np.maximum(np.maximum(r, g), b)
    diff = v - np.minimum(np.minimum(r, g), b)
    half = 1 << (_HSV_SHIFT - 1)
    out = np.empty(rgb.shape, np.uint8)
    out[..., 1] = (diff * _SDIV[v] + half) >> _HSV_SHIFT
    h = np.where(v == r, g - b, np.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = (h * _HDIV[diff] + half) >> _HSV_SHIFT  # arithmetic shift: floor, as in OpenCV's C
    out[..., 0] = np.where(h < 0, h + 180, h)
    out[..., 2] = v
    return out


def hsv_to_rgb_u8(hsv):
    """uint8 HSV [..., 3] (OpenCV 8-bit conventions) -> uint8 RGB [..., 3]."""
    h = hsv[..., 0].astype(np.float32) * np.float32(6.0 / 180.0)
    s = hsv[..., 1].astype(np.float32) * np.float32(1.0 / 255.0)
    v = hsv[..., 2].astype(np.float32) * np.float32(1.0 / 255.0)
    h = np.mod(h, np.float32(6.0))
    sector = np.floor(h)
    f = h - sector
    sector = np.minimum(sector.astype(np.intp), 5).ravel()
    one = np.float32(1.0)
    # the four candidate values, already as output levels; each channel then picks one per
    # pixel by its sector (a flat gather: several times faster than np.choose / take_along)
    tab = np.stack([v, v * (one - s), v * (one - s * f), v * (one - s * (one - f))])
    tab = np.clip(np.rint(tab * np.float32(255.0)), 0, 255).astype(np.uint8).reshape(-1)
    n = v.size
    pixel = np.arange(n)
    out = np.empty(hsv.shape, np.uint8)
    for c in range(3):  # (grey pixels, s = 0: all four values are v, as OpenCV sets them)
        out[..., c] = tab[_HSV_SECTORS[:, c][sector] * n + pixel].reshape(v.shape)
    return out


class PhotoMetricDistortion:
    """mmsegmentation's PhotoMetricDistortion on a uint8 RGB [H, W, 3] array: brightness
    (+- brightness_delta), contrast (x contrast_range) before or after the HSV steps at random,
    saturation (x saturation_range), hue (+- hue_delta steps of 2 degrees, [-delta, delta)),
    each applied with probability 1/2. Like mmseg, each step truncates to uint8 (astype, not
    rounding) and saturation and hue each make their own round trip through HSV.
    The draws (NumPy's global RNG, or `rng` for a scripted one) are mmseg's, in its order."""

    def __init__(self, brightness_delta=32, contrast_range=(0.5, 1.5),
                 saturation_range=(0.5, 1.5), hue_delta=18):
        self.brightness_delta = brightness_delta
        self.contrast_range = tuple(contrast_range)
        self.saturation_range = tuple(saturation_range)
        self.hue_delta = hue_delta

    @staticmethod
    def convert(img, alpha=1.0, beta=0.0):
        return np.clip(img.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    def brightness(self, img, beta):
        return self.convert(img, beta=beta)

    def contrast(self, img, alpha):
        return self.convert(img, alpha=alpha)

    def saturation(self, img, alpha):
        hsv = rgb_to_hsv_u8(img)
        hsv[..., 1] = self.convert(hsv[..., 1], alpha=alpha)
        return hsv_to_rgb_u8(hsv)

    def hue(self, img, delta):
        hsv = rgb_to_hsv_u8(img)
        hsv[..., 0] = (hsv[..., 0].astype(np.int64) + delta) % 180
        return hsv_to_rgb_u8(hsv)

    def __call__(self, img, rng=np.random):
        if rng.randint(2):
            img = self.brightness(img, rng.uniform(-self.brightness_delta,
                                                   self.brightness_delta))
        contrast_first = rng.randint(2) == 1
        if contrast_first and rng.randint(2):
            img = self.contrast(img, rng.uniform(*self.contrast_range))
        if rng.randint(2):
            img = self.saturation(img, rng.uniform(*self.saturation_range))
        if rng.randint(2):
            img = self.hue(img, rng.randint(-self.hue_delta, self.hue_delta))
        if not contrast_first and rng.randint(2):
            img = self.contrast(img, rng.uniform(*self.contrast_range))
        return img

    def __repr__(self):
        return (f'PhotoMetricDistortion(brightness_delta={self.brightness_delta}, '
                f'contrast_range={self.contrast_range}, '
                f'saturation_range={self.saturation_range}, hue_delta={self.hue_delta})')


def normalize_chw(img, mean, std):
    """uint8 RGB [H, W, 3] -> float32 [3, H, W], (x - 255 mean) / (255 std): DATA.MEAN / STD
    are in [0, 1] units, mmseg's (123.675, ...) are these times 255."""
    mean = np.asarray(mean, np.float32) * np.float32(255.0)
    inv_std = np.float32(1.0) / (np.asarray(std, np.float32) * np.float32(255.0))
    out = (img.astype(np.float32) - mean) * inv_std
    return np.ascontiguousarray(out.transpose(2, 0, 1))


def _as_rgb_array(img):
    a = np.asarray(img, dtype=np.uint8)
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f'expected an RGB image, got an array of shape {a.shape}')
    return a


def _check_pair(image, mask):
    if mask.shape != image.shape[:2]:
        raise ValueError(f'mask {mask.shape[1]}x{mask.shape[0]} and image '
                         f'{image.shape[1]}x{image.shape[0]} (width x height) differ in size')


class SegTrainTransform:
    """(PIL RGB image or uint8 [H, W, 3], integer mask [H, W]) -> (float32 [3, S, S],
    int64 [S, S]), S = crop_size: mmsegmentation's ADE20K training pipeline (see above).
    Pixels padded in (crops of images smaller than S) are 0 in the normalised image and
    ignore_index in the mask."""

    def __init__(self, crop_size, scale=(2048, 512), ratio_range=(0.5, 2.0), cat_max_ratio=0.75,
                 ignore_index=255, flip_prob=0.5, photometric=True,
                 mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)):
        self.crop_size = int(crop_size)
        self.scale = tuple(scale)
        self.ratio_range = tuple(ratio_range)
        self.cat_max_ratio = cat_max_ratio
        self.ignore_index = ignore_index
        self.flip_prob = flip_prob
        self.photometric = PhotoMetricDistortion() if photometric else None
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, img, mask):
        image, mask = _as_rgb_array(img), np.asarray(mask)
        _check_pair(image, mask)
        h, w = mask.shape
        low, high = self.ratio_range
        ratio = np.random.random_sample() * (high - low) + low
        scale = (int(self.scale[0] * ratio), int(self.scale[1] * ratio))  # mmseg truncates
        new_w, new_h = seg_rescale_size(w, h, scale)
        # the mask is resized whole (cat_max_ratio looks at it), the image only where the crop
        # lands (resize_bilinear's window)
        mask = resize_nearest(mask, (new_w, new_h))
        top, left, ch, cw = random_crop_box(mask, self.crop_size, self.cat_max_ratio,
                                            self.ignore_index)
        mask = mask[top:top + ch, left:left + cw]
        image = resize_bilinear(image, (new_w, new_h), (top, top + ch, left, left + cw))
        if np.random.rand() < self.flip_prob:
            image, mask = image[:, ::-1], mask[:, ::-1]
        if self.photometric is not None:
            image = self.photometric(np.ascontiguousarray(image))
        s = self.crop_size
        out = np.zeros((3, s, s), np.float32)
        out[:, :ch, :cw] = normalize_chw(image, self.mean, self.std)
        label = np.full((s, s), self.ignore_index, np.int64)
        label[:ch, :cw] = mask
        return out, label

    def __repr__(self):
        return (f'SegTrainTransform(crop={self.crop_size}, scale={self.scale}, '
                f'ratio_range={self.ratio_range}, cat_max_ratio={self.cat_max_ratio}, '
                f'flip={self.flip_prob}, photometric={self.photometric is not None})')


class SegEvalTransform:
    """(PIL RGB image or uint8 [H, W, 3], integer mask [H, W]) -> (float32 [3, h, w], int64
    [H, W]): the image resized keep-ratio into `scale` (mmseg's test Resize, ratio 1) and
    normalised; the mask as it is (predictions are resized back to it for scoring)."""

    def __init__(self, scale=(2048, 512), mean=(0.485, 0.456, 0.406),
                 std=(0.229, 0.224, 0.225)):
        self.scale = tuple(scale)
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, img, mask):
        image, mask = _as_rgb_array(img), np.asarray(mask)
        _check_pair(image, mask)
        h, w = mask.shape
        size = seg_rescale_size(w, h, self.scale)
        if size != (w, h):
            image = resize_bilinear(image, size)
        return normalize_chw(image, self.mean, self.std), mask.astype(np.int64)

    def __repr__(self):
        return f'SegEvalTransform(scale={self.scale})'


def build_seg_transform(is_train, config):
    """The joint transform of semantic segmentation: a callable (PIL RGB image, integer mask
    [H, W]) -> (float32 [3, h, w], int64 mask). Training: SegTrainTransform with crop
    DATA.IMAGE_SIZE, DATA.SEG_SCALE x DATA.SEG_RATIO_RANGE, DATA.SEG_CAT_MAX_RATIO,
    DATA.SEG_PHOTOMETRIC, padding DATA.IGNORE_INDEX; evaluation: SegEvalTransform into
    DATA.SEG_SCALE. Both normalise with DATA.MEAN / STD. Masks arrive with reduce-zero-label
    already applied (seg_data reads them)."""
    d = config.DATA
    if len(d.SEG_SCALE) != 2 or min(d.SEG_SCALE) < 1:
        raise ConfigError(f'DATA.SEG_SCALE must be [long side, short side] >= 1, '
                          f'got {list(d.SEG_SCALE)}')
    if not is_train:
        return SegEvalTransform(d.SEG_SCALE, d.MEAN, d.STD)
    if len(d.SEG_RATIO_RANGE) != 2 or not 0 < d.SEG_RATIO_RANGE[0] <= d.SEG_RATIO_RANGE[1]:
        raise ConfigError(f'DATA.SEG_RATIO_RANGE must be [low, high] with 0 < low <= high, '
                          f'got {list(d.SEG_RATIO_RANGE)}')
    return SegTrainTransform(d.IMAGE_SIZE, d.SEG_SCALE, d.SEG_RATIO_RANGE, d.SEG_CAT_MAX_RATIO,
                             d.IGNORE_INDEX, 0.5, d.SEG_PHOTOMETRIC, d.MEAN, d.STD)
