"""RandAugment on PIL images, from timm-style policy strings.

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
Example: `rand-m9-mstd0.5-inc1` (MAE / DeiT fine-tuning). A policy that cannot be read raises
ValueError naming the policy and the section (parse_policy).
"""
import random
import re

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

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
