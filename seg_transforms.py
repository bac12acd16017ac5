"""Joint image + mask transforms of semantic segmentation: mmsegmentation's ADE20K pipelines
(the MAE paper's transfer recipe, DESIGN.md 5) on NumPy, as steps that compose.

A step is a callable over a results dict that returns the dict:
    'img'         the image: uint8 RGB [H, W, 3]; float32 [3, H, W] once normalised
    'gt_seg_map'  the label map, integer [H, W] (int64 after Pad / ToInt64Label)
    'resize_to'   (w, h) the image is still to be resized to (set by Resize): the next step
                  that reads pixels does it (take_image), RandomCrop only for the window it
                  keeps -- a 512 crop out of a resize to 1024 x 1365 costs the crop only
A pipeline is a list of steps in a SegPipeline, the small Compose: (PIL RGB image or uint8
[H, W, 3], integer mask [H, W]) -> (results['img'], results['gt_seg_map']) after every step.

    training   Resize(SEG_SCALE x ratio, ratio ~ U(SEG_RATIO_RANGE), keep ratio)
               -> RandomCrop(IMAGE_SIZE, cat_max_ratio SEG_CAT_MAX_RATIO) -> RandomFlip(0.5)
               -> Photometric (SEG_PHOTOMETRIC) -> Normalize -> Pad to IMAGE_SIZE
    evaluation Resize into SEG_SCALE (keep ratio, image only) -> Normalize -> ToInt64Label; the
               mask is left as it is, since predictions are scored at the annotation's size.
Every random number comes from NumPy's global RNG, drawn in the order of mmsegmentation 0.x's
transforms (ratio; crop offsets y, x per try; flip; photometric draws), so the per-sample
seeding of datasets.ImageDataset fixes a sample's augmentation.
Image resampling follows OpenCV's INTER_LINEAR (what mmcv.imresize calls): pixel-centre
aligned, edge pixels repeated, no antialiasing when shrinking (PIL's resize would average
over the shrunk footprint and give the network softer images than the recipe trained on).
Masks use nearest-neighbour with pixel-centre alignment (PIL's NEAREST; OpenCV's
INTER_NEAREST_EXACT). mmcv calls OpenCV's INTER_NEAREST, which samples at the pixel's corner
and so shifts the mask by up to half a source pixel towards the top-left of the image; the
centred rule keeps labels on the pixels the bilinear image puts them.

build_seg_transform takes a config whose values config.check_values has accepted.
"""
import numpy as np


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
            values = mask[top:top + ch, left:left + cw].ravel()
            counts = np.bincount(values[values != ignore_index])  # (any ignore value: -1, 65535)
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




# ----------------------------------------------------------------------------------- steps

def take_image(results, window=None):
    """results['img'] with a pending resize ('resize_to') done: the whole image, or only
    window = (top, bottom, left, right) of the resized image. Does not store it."""
    img = results['img']
    size = results.pop('resize_to', None)
    if size is not None:
        return resize_bilinear(img, size, window)
    if window is not None:
        top, bottom, left, right = window
        return img[top:bottom, left:right]
    return img


class Resize:
    """Keep-ratio resize into the (long side, short side) bound `scale` (mmcv's rescale_size);
    with ratio_range, the bound times a ratio drawn uniformly from it, truncated to int as
    mmseg does. The mask is resized at once (nearest; resize_mask False leaves it), the image
    on demand ('resize_to')."""

    def __init__(self, scale, ratio_range=None, resize_mask=True):
        self.scale = tuple(scale)
        self.ratio_range = None if ratio_range is None else tuple(ratio_range)
        self.resize_mask = resize_mask

    def __call__(self, results):
        results['img'] = take_image(results)  # (a resize still pending from an earlier step)
        h, w = results['img'].shape[:2]
        scale = self.scale
        if self.ratio_range is not None:
            low, high = self.ratio_range
            ratio = np.random.random_sample() * (high - low) + low
            scale = (int(scale[0] * ratio), int(scale[1] * ratio))
        size = seg_rescale_size(w, h, scale)
        if size != (w, h):
            results['resize_to'] = size
            if self.resize_mask:
                results['gt_seg_map'] = resize_nearest(results['gt_seg_map'], size)
        return results

    def __repr__(self):
        return (f'Resize(scale={self.scale}, ratio_range={self.ratio_range}, '
                f'resize_mask={self.resize_mask})')


class RandomCrop:
    """mmsegmentation's RandomCrop (random_crop_box) of image and mask; the mask must have the
    image's (pending) size, so it reads the classes the crop keeps."""

    def __init__(self, crop_size, cat_max_ratio=1.0, ignore_index=255):
        self.crop_size = int(crop_size)
        self.cat_max_ratio = cat_max_ratio
        self.ignore_index = ignore_index

    def __call__(self, results):
        mask = results['gt_seg_map']
        top, left, ch, cw = random_crop_box(mask, self.crop_size, self.cat_max_ratio,
                                            self.ignore_index)
        results['gt_seg_map'] = mask[top:top + ch, left:left + cw]
        results['img'] = take_image(results, (top, top + ch, left, left + cw))
        return results

    def __repr__(self):
        return (f'RandomCrop({self.crop_size}, cat_max_ratio={self.cat_max_ratio}, '
                f'ignore_index={self.ignore_index})')


class RandomFlip:
    """Horizontal flip of image and mask with probability `prob` (one np.random.rand())."""

    def __init__(self, prob=0.5):
        self.prob = prob

    def __call__(self, results):
        if np.random.rand() < self.prob:
            results['img'] = take_image(results)[:, ::-1]
            results['gt_seg_map'] = results['gt_seg_map'][:, ::-1]
        return results

    def __repr__(self):
        return f'RandomFlip({self.prob})'


class Photometric:
    """PhotoMetricDistortion of the image (NumPy's global RNG); the mask is left alone."""

    def __init__(self, distortion=None):
        self.distortion = distortion or PhotoMetricDistortion()

    def __call__(self, results):
        results['img'] = self.distortion(np.ascontiguousarray(take_image(results)))
        return results

    def __repr__(self):
        return f'Photometric({self.distortion!r})'


class Normalize:
    """uint8 RGB image -> float32 [3, H, W] (normalize_chw with DATA.MEAN / STD units)."""

    def __init__(self, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)):
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, results):
        results['img'] = normalize_chw(take_image(results), self.mean, self.std)
        return results

    def __repr__(self):
        return f'Normalize(mean={self.mean}, std={self.std})'


class Pad:
    """Normalised image and mask padded at the bottom and right to size x size: 0 in the image,
    ignore_index in the mask (then int64)."""

    def __init__(self, size, ignore_index=255):
        self.size = int(size)
        self.ignore_index = ignore_index

    def __call__(self, results):
        img, mask = results['img'], results['gt_seg_map']
        ch, cw = mask.shape
        s = self.size
        out = np.zeros((img.shape[0], s, s), np.float32)
        out[:, :ch, :cw] = img
        label = np.full((s, s), self.ignore_index, np.int64)
        label[:ch, :cw] = mask
        results['img'], results['gt_seg_map'] = out, label
        return results

    def __repr__(self):
        return f'Pad({self.size}, ignore_index={self.ignore_index})'


class ToInt64Label:
    """The label map as a new int64 array (what the loss and the metrics take)."""

    def __call__(self, results):
        results['gt_seg_map'] = results['gt_seg_map'].astype(np.int64)
        return results

    def __repr__(self):
        return 'ToInt64Label()'


class SegPipeline:
    """Steps in order over {'img', 'gt_seg_map'}: a callable (PIL RGB image or uint8
    [H, W, 3], integer mask [H, W]) -> (image, label map) as the last step leaves them."""

    def __init__(self, steps):
        self.steps = list(steps)

    def __call__(self, img, mask):
        image, mask = _as_rgb_array(img), np.asarray(mask)
        _check_pair(image, mask)
        results = {'img': image, 'gt_seg_map': mask}
        for step in self.steps:
            results = step(results)
        return take_image(results), results['gt_seg_map']

    def __repr__(self):
        return f'SegPipeline([{", ".join(repr(s) for s in self.steps)}])'


def train_pipeline(crop_size, scale=(2048, 512), ratio_range=(0.5, 2.0), cat_max_ratio=0.75,
                   ignore_index=255, flip_prob=0.5, photometric=True,
                   mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)):
    """mmsegmentation's ADE20K training pipeline -> (float32 [3, S, S], int64 [S, S]),
    S = crop_size. Pixels padded in (crops of images smaller than S) are 0 in the normalised
    image and ignore_index in the mask."""
    steps = [Resize(scale, ratio_range), RandomCrop(crop_size, cat_max_ratio, ignore_index),
             RandomFlip(flip_prob)]
    if photometric:
        steps.append(Photometric())
    steps += [Normalize(mean, std), Pad(crop_size, ignore_index)]
    return SegPipeline(steps)


def eval_pipeline(scale=(2048, 512), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)):
    """-> (float32 [3, h, w], int64 [H, W]): the image resized keep-ratio into `scale`
    (mmseg's test Resize, ratio 1) and normalised; the mask as it is (predictions are resized
    back to it for scoring)."""
    return SegPipeline([Resize(scale, resize_mask=False), Normalize(mean, std), ToInt64Label()])


def build_seg_transform(is_train, config):
    """The joint transform of semantic segmentation: a callable (PIL RGB image, integer mask
    [H, W]) -> (float32 [3, h, w], int64 mask). Training: train_pipeline with crop
    DATA.IMAGE_SIZE, DATA.SEG_SCALE x DATA.SEG_RATIO_RANGE, DATA.SEG_CAT_MAX_RATIO,
    DATA.SEG_PHOTOMETRIC, padding DATA.IGNORE_INDEX; evaluation: eval_pipeline into
    DATA.SEG_SCALE. Both normalise with DATA.MEAN / STD. Masks arrive with reduce-zero-label
    already applied (seg_data reads them)."""
    d = config.DATA
    if not is_train:
        return eval_pipeline(d.SEG_SCALE, d.MEAN, d.STD)
    return train_pipeline(d.IMAGE_SIZE, d.SEG_SCALE, d.SEG_RATIO_RANGE, d.SEG_CAT_MAX_RATIO,
                          d.IGNORE_INDEX, 0.5, d.SEG_PHOTOMETRIC, d.MEAN, d.STD)
