"""Semantic segmentation data: the joint transforms (seg_transforms.py), SegmentationDataset and its
layouts / checks / loaders (seg_data.py), and the segmentation demo set."""
import importlib.util
import os

import numpy as np
import pytest
from PIL import Image

import helpers as H
import config
import datasets
import seg_data
import seg_transforms as A
import sources
from datasets import BadImageError, DataError

IGNORE = 255
# colours of classes 0..4 in the alignment test: far apart, so a pixel's class is its colour
CLASS_COLOURS = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0],
                          [0, 255, 255]], np.uint8)


def seg_dataset(config, is_train, transform=None):
    """The segmentation dataset the factory builds for the config."""
    return sources.build_dataset(config, is_train, transform, kind='segmentation')


def seg_config(root='', **keys):
    """Defaults + a small segmentation set-up (crop 32, images resized into (64, 32)), with
    KEY__SUB=value overrides."""
    cfg = config.get_config()
    opts = ['TRAIN.MODE', 'segmentation', 'DATA.DATA_PATH', root, 'DATA.IMAGE_SIZE', 32,
            'DATA.SEG_SCALE', [64, 32], 'MODEL.NUM_CLASSES', 5, 'DATA.BATCH_SIZE', 2,
            'DATA.BATCH_SIZE_EVAL', 2, 'DATA.NUM_WORKERS', 0]
    for k, v in keys.items():
        opts += [k.replace('__', '.'), v]
    return config.merge_opts(cfg, opts)


def block_labels(w, h, seed, num_classes=5, block=8):
    """A label map of random blocks (block x block pixels), so most pixels are far from an
    edge between classes."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, num_classes, (-(-h // block), -(-w // block)))
    return np.kron(coarse, np.ones((block, block), np.int64))[:h, :w].astype(np.uint8)


def write_pair(root, split, name, image, labels, image_ext='.jpg'):
    """An ADE20K-layout pair: root/images/<split>/<name><ext>, root/annotations/<split>/
    <name>.png. image: PIL image or RGB array; labels: 2-D array (saved as 'L') or PIL image."""
    for sub in ('images', 'annotations'):
        os.makedirs(os.path.join(root, sub, split), exist_ok=True)
    img_path = os.path.join(root, 'images', split, name + image_ext)
    ann_path = os.path.join(root, 'annotations', split, name + '.png')
    img = image if isinstance(image, Image.Image) else Image.fromarray(image)
    img.save(img_path, quality=95) if image_ext == '.jpg' else img.save(img_path)
    ann = labels if isinstance(labels, Image.Image) else Image.fromarray(
        np.asarray(labels, np.uint8), 'L')
    ann.save(ann_path)
    return img_path, ann_path


def ade_root(tmp_path, sizes=((40, 30), (52, 36), (30, 44)), split='validation', seed=0):
    """tmp_path with an ADE20K-layout split of noise images and block labels in 1..5 (so
    reduce-zero-label gives 0..4). Returns (root, [(image path, annotation path), ...])."""
    root = str(tmp_path)
    pairs = []
    for i, (w, h) in enumerate(sizes):
        labels = block_labels(w, h, seed + i) + 1
        pairs.append(write_pair(root, split, f'img_{i}', np.asarray(H.noise_image(w, h, i)),
                                labels, '.png'))
    return root, pairs


def one_line(message, *fragments):
    assert '\n' not in message, message
    for fragment in fragments:
        assert str(fragment) in message, (fragment, message)


# ------------------------------------------------------------------------- resize geometry

def mmcv_rescale(w, h, long_edge, short_edge):
    """mmcv.rescale_size, written out: the factor that fits the long side into the long
    bound and the short side into the short bound, sizes rounded half up."""
    factor = min(long_edge / max(h, w), short_edge / min(h, w))
    return int(w * factor + 0.5), int(h * factor + 0.5)


@pytest.mark.parametrize('w,h,scale,expected', [
    (683, 512, (2048, 512), (683, 512)),     # typical ADE20K image: kept
    (2000, 1000, (2048, 512), (1024, 512)),  # short side bound
    (500, 2000, (2048, 512), (512, 2048)),   # both bounds at once (factor 1.024)
    (300, 200, (2048, 512), (768, 512)),     # enlarged
    (3000, 500, (2048, 512), (2048, 341)),   # long side bound: 341.33 -> 341
    (77, 51, (64, 32), (48, 32)),            # 48.31 -> 48
])
def test_eval_resize_size_is_mmcv_rescale_size(w, h, scale, expected):
    assert A.seg_rescale_size(w, h, scale) == expected == mmcv_rescale(w, h, *scale)
    img = Image.fromarray(np.zeros((h, w, 3), np.uint8))
    out, label = A.eval_pipeline(scale)(img, np.zeros((h, w), np.uint8))
    assert out.shape == (3, expected[1], expected[0]) and out.dtype == np.float32
    assert label.shape == (h, w) and label.dtype == np.int64  # untouched


def test_normalisation_is_mean_and_std_times_255():
    img = np.zeros((4, 6, 3), np.uint8) + np.array([10, 128, 250], np.uint8)
    out, _ = A.eval_pipeline((6, 4), mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.1))(
        img, np.zeros((4, 6), np.uint8))
    expected = [(10 - 127.5) / 51.0, (128 - 102.0) / 63.75, (250 - 76.5) / 25.5]
    assert np.allclose(out, np.array(expected)[:, None, None], atol=1e-5)


def test_eval_transform_on_random_sizes_matches_the_formula():
    rng = np.random.default_rng(0)
    transform = A.eval_pipeline((64, 32))
    for _ in range(20):
        w, h = (int(v) for v in rng.integers(5, 120, 2))
        out, label = transform(np.zeros((h, w, 3), np.uint8), np.ones((h, w), np.uint8))
        ew, eh = mmcv_rescale(w, h, 64, 32)
        assert out.shape == (3, eh, ew) and label.shape == (h, w) and (label == 1).all()


def reference_bilinear(a, new_w, new_h):
    """OpenCV INTER_LINEAR, written out in 2-D: output pixel (i, j) samples the source at
    ((i + .5) * H / h - .5, (j + .5) * W / w - .5) from its four neighbours, edges repeated."""
    h, w = a.shape[:2]
    y = (np.arange(new_h) + 0.5) * h / new_h - 0.5
    x = (np.arange(new_w) + 0.5) * w / new_w - 0.5
    out = np.zeros((new_h, new_w, a.shape[2]))
    for i, yy in enumerate(y):
        y0 = int(np.floor(yy))
        wy = yy - y0
        for j, xx in enumerate(x):
            x0 = int(np.floor(xx))
            wx = xx - x0
            acc = 0.0
            for dy, fy in ((0, 1 - wy), (1, wy)):
                for dx, fx in ((0, 1 - wx), (1, wx)):
                    yi = min(max(y0 + dy, 0), h - 1)
                    xi = min(max(x0 + dx, 0), w - 1)
                    acc = acc + fy * fx * a[yi, xi].astype(np.float64)
            out[i, j] = acc
    return out


@pytest.mark.parametrize('new_size', [(40, 30), (9, 7), (23, 17), (13, 29), (20, 15)])
def test_bilinear_is_opencv_linear_without_antialiasing(new_size):
    a = np.asarray(H.noise_image(20, 15, seed=3))
    out = A.resize_bilinear(a, new_size)
    ref = reference_bilinear(a, *new_size)
    assert out.shape == (new_size[1], new_size[0], 3) and out.dtype == np.uint8
    assert np.abs(out - ref).max() <= 0.51  # rounded to nearest
    if new_size == (20, 15):
        assert (out == a).all()  # same size: the image itself


def test_bilinear_window_equals_resize_then_crop():
    a = np.asarray(H.noise_image(37, 23, seed=4))
    full = A.resize_bilinear(a, (81, 50))
    assert (A.resize_bilinear(a, (81, 50), (7, 39, 20, 52)) == full[7:39, 20:52]).all()


def test_shrinking_samples_without_averaging_the_footprint():
    """OpenCV's INTER_LINEAR (mmcv) looks at 2x2 source pixels whatever the factor: halving
    gives the mean of each 2x2 block, quartering the mean of each 4x4 block's central 2x2
    (PIL's resize would average the whole block)."""
    a = np.asarray(H.noise_image(32, 16, seed=6)).astype(float)
    half = A.resize_bilinear(a.astype(np.uint8), (16, 8)).astype(float)
    blocks = a.reshape(8, 2, 16, 2, 3).mean(axis=(1, 3))
    assert np.abs(half - blocks).max() <= 0.51
    quarter = A.resize_bilinear(a.astype(np.uint8), (8, 4)).astype(float)
    centres = a.reshape(4, 4, 8, 4, 3)[:, 1:3, :, 1:3].mean(axis=(1, 3))
    assert np.abs(quarter - centres).max() <= 0.51


def test_nearest_mask_samples_under_pixel_centres():
    mask = block_labels(21, 13, seed=5, block=3)
    for new_w, new_h in ((42, 26), (10, 6), (33, 17)):
        out = A.resize_nearest(mask, (new_w, new_h))
        rows = [min(int((i + 0.5) * 13 / new_h), 12) for i in range(new_h)]
        cols = [min(int((j + 0.5) * 21 / new_w), 20) for j in range(new_w)]
        assert out.tolist() == [[int(mask[r, c]) for c in cols] for r in rows]


# ------------------------------------------------------------------------ training pipeline

def colour_of(labels):
    return CLASS_COLOURS[labels]


def labels_of(chw, mean, std):
    """The class each pixel's colour is nearest to, from a normalised [3, H, W] image."""
    rgb = chw.transpose(1, 2, 0) * (np.array(std) * 255) + np.array(mean) * 255
    dist = ((rgb[:, :, None, :] - CLASS_COLOURS[None, None].astype(float)) ** 2).sum(-1)
    return dist.argmin(-1)


def test_image_and_mask_stay_aligned_through_the_training_pipeline():
    """Colour encodes the class: after random resize (down and up), crop, flip and padding,
    the class read back from each image pixel is the returned label wherever the label is
    not next to another class (where bilinear mixes colours) or padding."""
    cfg = seg_config(DATA__SEG_PHOTOMETRIC=False)
    transform = A.build_seg_transform(True, cfg)
    mean, std = cfg.DATA.MEAN, cfg.DATA.STD
    checked = 0
    for seed in range(24):
        w, h = (48, 40) if seed % 2 else (70, 30)
        labels = block_labels(w, h, seed)
        np.random.seed(seed)
        out, label = transform(Image.fromarray(colour_of(labels)), labels)
        assert out.shape == (3, 32, 32) and label.shape == (32, 32)
        assert out.dtype == np.float32 and label.dtype == np.int64
        got = labels_of(out, mean, std)
        padded = np.pad(label, 1, mode='edge')
        interior = np.ones_like(label, bool)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                interior &= padded[1 + dy:33 + dy, 1 + dx:33 + dx] == label
        interior &= label != IGNORE
        assert interior.sum() > 20, seed  # (small when the resize shrank the image)
        assert (got[interior] == label[interior]).all(), seed
        checked += interior.sum()
    assert checked > 24 * 200


def test_padding_is_zero_in_the_image_and_ignore_in_the_mask():
    # 20x16 into (16, 8), ratio 1: 10x8 (mmcv formula), smaller than the 32 crop on both sides
    cfg = seg_config(DATA__SEG_SCALE=[16, 8], DATA__SEG_RATIO_RANGE=[1.0, 1.0],
                     DATA__SEG_PHOTOMETRIC=False)
    labels = block_labels(20, 16, seed=1, block=4)
    np.random.seed(0)
    out, label = A.build_seg_transform(True, cfg)(
        Image.fromarray(colour_of(labels)), labels)
    assert mmcv_rescale(20, 16, 16, 8) == (10, 8)
    assert (out[:, 8:, :] == 0).all() and (out[:, :, 10:] == 0).all()
    assert (label[8:, :] == IGNORE).all() and (label[:, 10:] == IGNORE).all()
    inside = label[:8, :10]
    resized = A.resize_nearest(labels, (10, 8))
    assert (inside == resized).all() or (inside == resized[:, ::-1]).all()  # (flip)
    assert (np.abs(out[:, :8, :10]).sum(axis=0) > 0).all()  # no hole in the picture


def mmseg_box(mask, crop, ratio):
    """mmsegmentation's RandomCrop box choice, re-written with np.unique as it has it."""
    def bbox():
        top = np.random.randint(0, max(mask.shape[0] - crop, 0) + 1)
        left = np.random.randint(0, max(mask.shape[1] - crop, 0) + 1)
        return top, left
    box = bbox()
    for _ in range(10 if ratio < 1 else 0):
        part = mask[box[0]:box[0] + crop, box[1]:box[1] + crop]
        labels, cnt = np.unique(part, return_counts=True)
        cnt = cnt[labels != IGNORE]
        if len(cnt) > 1 and np.max(cnt) / np.sum(cnt) < ratio:
            break
        box = bbox()
    return box


def test_cat_max_ratio_follows_mmsegs_retry_rule():
    """Same seed, same draws, same box as mmseg's loop; ignored pixels not counted."""
    corner = np.zeros((60, 80), np.uint8)  # class 0 almost everywhere (often all 11 draws
    corner[45:, 60:] = 1                   # fail: the last one is kept),
    corner[:10, :] = IGNORE                # an ignored band on top
    half = np.zeros((40, 40), np.uint8)    # class 1 on the right half: about 2 crops in 3
    half[:, 20:] = 1                       # mix the classes well enough
    half[:8, :] = IGNORE
    dominated = {0.75: 0, 1.0: 0}
    for seed in range(60):
        for mask in (corner, half):
            for ratio in (0.75, 1.0):
                np.random.seed(seed)
                expected = mmseg_box(mask, 24, ratio)
                np.random.seed(seed)
                top, left, ch, cw = A.random_crop_box(mask, 24, ratio, IGNORE)
                assert (top, left) == expected and (ch, cw) == (24, 24)
                if mask is half:
                    part = mask[top:top + 24, left:left + 24]
                    part = part[part != IGNORE]
                    dominated[ratio] += np.bincount(part).max() >= 0.75 * part.size
    assert dominated[1.0] >= 10        # a third of unconstrained crops are one class
    assert dominated[0.75] == 0        # the rule finds a mixed crop every time


def test_crop_of_a_one_class_image_ends_after_ten_retries():
    np.random.seed(0)
    top, left, ch, cw = A.random_crop_box(np.zeros((50, 50), np.uint8), 20, 0.75, IGNORE)
    assert (ch, cw) == (20, 20) and 0 <= top <= 30 and 0 <= left <= 30
    # 1 draw + 10 retries of 2 numbers each consumed, as mmseg's loop
    state = np.random.get_state()[2]
    np.random.seed(0)
    for _ in range(22):
        np.random.randint(0, 31)
    assert np.random.get_state()[2] == state


# ---------------------------------------------------------------------- photometric distortion

class RecordingRng:
    """Answers every randint(2) with 1 ('apply'), others with their low end; records calls."""

    def __init__(self, mode=1):
        self.calls, self.mode = [], mode

    def randint(self, *args):
        self.calls.append(('randint',) + args)
        if args == (2,):
            return self.mode if len(self.calls) == 3 else 1
        return args[0]

    def uniform(self, *args):
        self.calls.append(('uniform',) + args)
        return args[0]


@pytest.mark.parametrize('mode', [0, 1])
def test_photometric_draws_in_mmsegs_order(mode):
    rng = RecordingRng(mode)
    A.PhotoMetricDistortion()(np.full((4, 4, 3), 128, np.uint8), rng)
    contrast = [('randint', 2), ('uniform', 0.5, 1.5)]
    expected = ([('randint', 2), ('uniform', -32, 32), ('randint', 2)]
                + (contrast if mode == 1 else [])
                + [('randint', 2), ('uniform', 0.5, 1.5), ('randint', 2), ('randint', -18, 18)]
                + (contrast if mode == 0 else []))
    assert rng.calls == expected


def test_photometric_steps_values():
    p = A.PhotoMetricDistortion()
    img = np.array([[[200, 100, 50], [10, 20, 250]]], np.uint8)
    # brightness / contrast: float then truncation, clipped to 0..255
    assert p.brightness(img, 20.7).tolist() == [[[220, 120, 70], [30, 40, 255]]]
    assert p.contrast(img, 0.5).tolist() == [[[100, 50, 25], [5, 10, 125]]]
    # saturation x0: grey at the pixel's value (max channel)
    assert p.saturation(img, 0.0).tolist() == [[[200, 200, 200], [250, 250, 250]]]
    # hue +90 steps of 2 degrees: the opposite colour
    red = np.array([[[255, 0, 0]]], np.uint8)
    assert p.hue(red, 90).tolist() == [[[0, 255, 255]]]
    assert p.hue(red, 60).tolist() == [[[0, 255, 0]]]  # +120 degrees: green
    assert p.hue(red, -60).tolist() == [[[0, 0, 255]]]  # -120 degrees: blue


def test_hsv_matches_the_textbook_conversion_on_opencvs_scale():
    import colorsys
    rgb = np.asarray(H.noise_image(64, 64, seed=7)).reshape(-1, 3)
    hsv = A.rgb_to_hsv_u8(rgb).astype(float)
    ref = np.array([colorsys.rgb_to_hsv(*(c / 255.0)) for c in rgb.astype(float)])
    dh = np.abs(hsv[:, 0] - ref[:, 0] * 180)
    assert np.minimum(dh, 180 - dh).max() <= 0.61       # hue in 180 steps, rounded
    assert np.abs(hsv[:, 1] - ref[:, 1] * 255).max() <= 0.53
    assert (hsv[:, 2] == rgb.max(axis=1)).all()
    hsv_in = np.stack([np.arange(4096) % 180, np.arange(4096) % 256,
                       (np.arange(4096) * 7) % 256], axis=1).astype(np.uint8)
    back = A.hsv_to_rgb_u8(hsv_in).astype(float)
    ref = np.array([colorsys.hsv_to_rgb(h / 180, s / 255, v / 255)
                    for h, s, v in hsv_in.astype(float)]) * 255
    assert np.abs(back - ref).max() <= 0.51


def test_photometric_changes_colours_not_labels():
    cfg = seg_config(DATA__SEG_RATIO_RANGE=[1.0, 1.0], DATA__SEG_SCALE=[32, 32])
    labels = block_labels(32, 32, seed=2)
    img = Image.fromarray(colour_of(labels))
    on, off = A.build_seg_transform(True, cfg), A.build_seg_transform(
        True, seg_config(DATA__SEG_RATIO_RANGE=[1.0, 1.0], DATA__SEG_SCALE=[32, 32],
                         DATA__SEG_PHOTOMETRIC=False))
    changed = 0
    for seed in range(8):
        np.random.seed(seed)
        a_img, a_lab = on(img, labels)
        np.random.seed(seed)
        b_img, b_lab = off(img, labels)
        assert (a_lab == b_lab).all()
        assert (a_lab == labels).all() or (a_lab == labels[:, ::-1]).all()
        changed += not np.allclose(a_img, b_img)
    assert changed >= 6  # 1 - 1/16 of the draws change something


# -------------------------------------------------------------------------------- dataset

def test_reduce_zero_label_and_values_kept_without_it(tmp_path):
    raw = np.array([[0, 1, 5, 255], [2, 0, 3, 4]], np.uint8)
    write_pair(str(tmp_path), 'validation', 'a', np.zeros((2, 4, 3), np.uint8), raw, '.png')
    on = seg_dataset(seg_config(str(tmp_path), DATA__REDUCE_ZERO_LABEL=True), False)
    assert on[0][1].tolist() == [[255, 0, 4, 255], [1, 255, 2, 3]]
    off = seg_dataset(seg_config(str(tmp_path), MODEL__NUM_CLASSES=6), False)
    assert off[0][1].tolist() == raw.tolist()


def test_evaluation_samples_and_collate_through_the_loader(tmp_path):
    root, pairs = ade_root(tmp_path)
    cfg = seg_config(root, DATA__REDUCE_ZERO_LABEL=True, DATA__BATCH_SIZE_EVAL=3)
    ds = seg_dataset(cfg, False)
    assert ds.collate_fn is seg_data.collate_eval
    sizes = [(40, 30), (52, 36), (30, 44)]
    for workers in (0, 2):
        cfg.DATA.NUM_WORKERS = workers
        batches = list(datasets.build_loader(cfg, ds, False, num_replicas=1, rank=0))
        assert len(batches) == 1
        images, labels, ids = batches[0]
        assert np.asarray(ids).tolist() == [0, 1, 2]
        for (w, h), img, lab, (_, ann) in zip(sizes, images, labels, pairs):
            ew, eh = mmcv_rescale(w, h, 64, 32)
            assert tuple(np.asarray(img).shape) == (3, eh, ew), workers
            expected = np.asarray(Image.open(ann)).astype(np.int64) - 1
            assert (np.asarray(lab) == expected).all(), workers


def test_training_samples_collate_by_default_and_match_direct_indexing(tmp_path):
    root, _ = ade_root(tmp_path, split='training', sizes=[(40, 30), (52, 36)] * 3)
    cfg = seg_config(root, DATA__REDUCE_ZERO_LABEL=True, DATA__NUM_WORKERS=2)
    ds = seg_dataset(cfg, True)
    assert ds.collate_fn is None
    loader = datasets.build_loader(cfg, ds, True, num_replicas=1, rank=0)
    loader.set_epoch(3)
    batches = list(loader)
    assert len(batches) == 3
    ds.augment_seed, ds.augment_epoch = cfg.SEED, 3  # as the loader seeds each sample
    for x, y, ids in batches:
        assert list(x.shape) == [2, 3, 32, 32] and list(y.shape) == [2, 32, 32]
        assert str(y.dtype).endswith('int64')
        for k, i in enumerate(ids.numpy().tolist()):
            image, label, sid = ds[i]
            assert sid == i and (y.numpy()[k] == label).all()
            assert np.allclose(x.numpy()[k], image)


def test_per_sample_seeding(tmp_path):
    root = str(tmp_path)
    labels = block_labels(40, 30, 0) + 1
    for name in 'abc':  # one picture under three names (a list names each file once)
        write_pair(root, 'training', name, np.asarray(H.noise_image(40, 30)), labels, '.png')
    H.write_list(tmp_path / 'train_list.txt', [f'images/training/{n}.png annotations/training/'
                                               f'{n}.png' for n in 'abc'])
    ds = seg_dataset(seg_config(root, DATA__REDUCE_ZERO_LABEL=True), True)
    ds.augment_seed, ds.augment_epoch = 5, 0
    first = ds[1]
    np.random.seed(123)  # whatever the global state was: the sample reseeds
    again = ds[1]
    assert (first[0] == again[0]).all() and (first[1] == again[1]).all()
    other = ds[2]  # same picture, another sample: another augmentation
    assert not np.array_equal(first[0], other[0])
    ds.augment_epoch = 1
    assert not np.array_equal(first[0], ds[1][0])


# ------------------------------------------------------------------------ bad input files

def test_missing_annotation_in_the_ade_layout_is_found_at_construction(tmp_path):
    root, pairs = ade_root(tmp_path)
    os.remove(pairs[1][1])
    with pytest.raises(DataError) as e:
        seg_dataset(seg_config(root, DATA__ON_BAD_IMAGE='skip'), False)
    one_line(str(e.value), 'annotation not found', pairs[1][1], pairs[1][0])


def test_missing_annotation_in_a_list_names_the_line(tmp_path):
    root, pairs = ade_root(tmp_path, split='training')
    rel = [(os.path.relpath(i, root), os.path.relpath(a, root)) for i, a in pairs]
    H.write_list(tmp_path / 'train_list.txt', ['# pairs', f'{rel[0][0]} {rel[0][1]}', '',
                                               f'{rel[1][0]} annotations/nope.png'])
    with pytest.raises(DataError) as e:
        seg_dataset(seg_config(root), True)
    one_line(str(e.value), 'annotation not found', os.path.join(root, 'annotations/nope.png'),
             'train_list.txt line 4')


@pytest.mark.parametrize('case', ['size', 'rgb', 'rgba', 'value', 'value_reduced'])
def test_bad_annotations_are_one_line_errors_naming_the_file(tmp_path, case):
    root, pairs = ade_root(tmp_path)
    ann = pairs[2][1]
    reduce = case != 'value'
    if case == 'size':
        Image.new('L', (31, 44), 1).save(ann)
    elif case in ('rgb', 'rgba'):
        Image.new(case.upper(), (30, 44), (1, 1, 1) if case == 'rgb' else (1, 1, 1, 255)).save(ann)
    elif case.startswith('value'):
        labels = np.asarray(Image.open(ann)).copy()
        labels[3, 4] = 7 if case == 'value' else 9  # 9 -> 8 after reduce; classes 0..4
        Image.fromarray(labels, 'L').save(ann)
    # (files hold 1..5: classes 0..4 after reduce-zero-label, or 6 classes without it)
    cfg = seg_config(root, DATA__REDUCE_ZERO_LABEL=reduce, DATA__ON_BAD_IMAGE='skip',
                     MODEL__NUM_CLASSES=5 if reduce else 6)
    ds = seg_dataset(cfg, False)
    assert ds[0][2] == 0 and ds[1][2] == 1  # the others are fine
    with pytest.raises(DataError) as e:
        ds[2]
    message = str(e.value)
    assert not isinstance(e.value, BadImageError)  # not an unreadable image: no skipping
    fragments = {
        'size': ['is 31x44 but its image', pairs[2][0], 'is 30x44'],
        'rgb': ['is a RGB image', 'class index'],
        'rgba': ['is a RGBA image'],
        'value': ['label value 7 is neither a class', 'MODEL.NUM_CLASSES 6',
                  'DATA.REDUCE_ZERO_LABEL (False', 'DATA.IGNORE_INDEX 255'],
        'value_reduced': ['label value 8 (9 in the file)', 'MODEL.NUM_CLASSES 5',
                          'DATA.REDUCE_ZERO_LABEL (True', 'DATA.IGNORE_INDEX'],
    }[case]
    one_line(message, ann, *fragments)


def test_negative_label_in_a_32_bit_annotation_names_file_and_line(tmp_path):
    Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(tmp_path / 'a.png')
    Image.fromarray(np.full((4, 6), -3, np.int32)).save(tmp_path / 'a.tif')
    assert Image.open(tmp_path / 'a.tif').mode == 'I'
    H.write_list(tmp_path / 'val_list.txt', ['a.png a.tif'])
    ds = seg_dataset(seg_config(str(tmp_path), MODEL__NUM_CLASSES=5), False)
    with pytest.raises(DataError) as e:
        ds[0]
    one_line(str(e.value), str(tmp_path / 'a.tif'), 'val_list.txt line 1', 'label value -3')


def test_bad_annotation_inside_loader_workers_is_raised_in_the_main_process(tmp_path):
    root, pairs = ade_root(tmp_path)
    Image.new('RGB', (30, 44)).save(pairs[2][1])
    cfg = seg_config(root, DATA__NUM_WORKERS=2, DATA__REDUCE_ZERO_LABEL=True)
    loader = datasets.build_loader(cfg, seg_dataset(cfg, False), False,
                                   num_replicas=1, rank=0)
    with pytest.raises(DataError) as e:
        list(loader)
    one_line(str(e.value), pairs[2][1], 'is a RGB image')


def test_index_image_modes_that_are_accepted(tmp_path):
    root, pairs = ade_root(tmp_path, sizes=[(6, 4)] * 3)
    values = np.array([[0, 1, 2, 3, 4, 255]] * 4, np.uint8)
    pal = Image.fromarray(values, 'L').convert('P')  # palette indices = the values
    pal.putpalette([v for i in range(256) for v in (i, 255 - i, i // 2)])
    pal.save(pairs[0][1])
    Image.fromarray(values.astype(np.uint16)).save(pairs[1][1])  # 16-bit grey
    Image.fromarray(values > 2).save(pairs[2][1])  # bilevel '1'
    assert Image.open(pairs[0][1]).mode == 'P' and Image.open(pairs[1][1]).mode.startswith('I')
    ds = seg_dataset(seg_config(root), False)
    assert ds[0][1].tolist() == values.tolist()
    assert ds[1][1].tolist() == values.tolist()
    assert ds[2][1].tolist() == (values > 2).astype(int).tolist()


def test_unreadable_images_skip_or_error_and_evaluation_marks_them(tmp_path):
    root, pairs = ade_root(tmp_path)
    with open(pairs[1][0], 'wb') as f:
        f.write(b'not a PNG')
    cfg = seg_config(root, DATA__REDUCE_ZERO_LABEL=True)
    with pytest.raises(BadImageError) as e:
        seg_dataset(cfg, False)[1]
    one_line(str(e.value), pairs[1][0], f'annotation {pairs[1][1]}', 'DATA.ON_BAD_IMAGE skip')
    cfg = seg_config(root, DATA__REDUCE_ZERO_LABEL=True, DATA__ON_BAD_IMAGE='skip')
    val = seg_dataset(cfg, False)
    image, label, sid = val[1]  # replaced by image 2: left out of evaluation
    assert sid == -1 and (label == IGNORE).all() and label.shape == (44, 30)
    images, labels, ids = next(iter(datasets.build_loader(cfg, val, False, 1, 0)))
    assert np.asarray(ids).tolist() == [0, -1]
    assert val.num_skipped == 2


def test_training_replaces_an_unreadable_image_by_the_next_pair(tmp_path):
    """The replacement's own annotation comes with it: annotation 0 (another size than image
    1) would be a size error if it were paired with image 1."""
    root, pairs = ade_root(tmp_path, split='training', sizes=[(40, 30), (52, 36)])
    with open(pairs[0][0], 'wb') as f:
        f.write(b'')
    cfg = seg_config(root, DATA__REDUCE_ZERO_LABEL=True, DATA__ON_BAD_IMAGE='skip',
                     DATA__SEG_RATIO_RANGE=[1.0, 1.0], DATA__SEG_SCALE=[52, 36])
    train = seg_dataset(cfg, True)
    np.random.seed(0)
    image, label, sid = train[0]
    assert sid == 0 and train.num_skipped == 1  # the slot keeps its identity
    expected = np.asarray(Image.open(pairs[1][1])).astype(np.int64) - 1  # no resize: 52x36
    top = expected[:32]
    assert any((label == e[:, x:x + 32]).all() or (label == e[:, x:x + 32][:, ::-1]).all()
               for e in (top, expected[4:36]) for x in range(21))


# ------------------------------------------------------------------------------- layouts

def test_list_layout_wins_and_describes_its_lines(tmp_path):
    root, pairs = ade_root(tmp_path, split='training')
    rel = [(os.path.relpath(i, root), os.path.relpath(a, root)) for i, a in pairs]
    H.write_list(tmp_path / 'train_list.txt', ['# image annotation', '',
                                               f'{rel[2][0]}  {rel[2][1]}',
                                               f'  {rel[0][0]} {rel[0][1]}  '])
    ds = seg_dataset(seg_config(root, DATA__REDUCE_ZERO_LABEL=True), True)
    assert len(ds) == 2 and ds.path(0) == pairs[2][0] and ds.annotation(1) == pairs[0][1]
    assert ds.describe(0) == (f'{pairs[2][0]} (annotation {pairs[2][1]}, '
                              f'{tmp_path / "train_list.txt"} line 3)')
    ade = seg_dataset(seg_config(root, DATA__TRAIN_LIST='none.txt'), True)
    assert len(ade) == 3 and ade.describe(1) == f'{pairs[1][0]} (annotation {pairs[1][1]})'


@pytest.mark.parametrize('line', ['images/a.jpg', 'a.jpg b.png c.png'])
def test_malformed_list_lines_name_file_and_line(tmp_path, line):
    path = H.write_list(tmp_path / 'val_list.txt', ['a.jpg a.png', line])
    with pytest.raises(DataError) as e:
        seg_dataset(seg_config(str(tmp_path)), False)
    one_line(str(e.value), f'{path} line 2', "expected 'image_path annotation_path'")


def test_build_dataset_names_what_is_missing(tmp_path):
    with pytest.raises(DataError, match=r'set DATA.DATA_PATH'):
        seg_dataset(seg_config(), True)
    with pytest.raises(DataError, match='data folder not found'):
        seg_dataset(seg_config(str(tmp_path / 'nope')), True)
    with pytest.raises(DataError) as e:
        seg_dataset(seg_config(str(tmp_path)), False)
    one_line(str(e.value), 'neither the list file val_list.txt (DATA.VAL_LIST)',
             'images/validation/')


# ------------------------------------------------------------------------- names, colours

def test_class_names(tmp_path):
    names = seg_data.class_names(seg_config(MODEL__NUM_CLASSES=150,
                                            DATA__REDUCE_ZERO_LABEL=True))
    assert len(names) == len(set(names)) == 150
    assert names[:5] == ['wall', 'building', 'sky', 'floor', 'tree'] and names[-1] == 'flag'
    assert seg_data.class_names(seg_config(MODEL__NUM_CLASSES=3)) == [
        'class_0', 'class_1', 'class_2']
    (tmp_path / 'class_names.txt').write_text('sky\nroad\n\ncar\n')
    assert seg_data.class_names(seg_config(str(tmp_path), MODEL__NUM_CLASSES=3)) == [
        'sky', 'road', 'car']
    with pytest.raises(DataError) as e:
        seg_data.class_names(seg_config(str(tmp_path), MODEL__NUM_CLASSES=4))
    one_line(str(e.value), 'class_names.txt names 3 classes', 'MODEL.NUM_CLASSES is 4')
    ade_root(tmp_path)  # and the data set is refused at once, not at its first evaluation
    with pytest.raises(DataError, match='class_names.txt names 3 classes'):
        seg_dataset(seg_config(str(tmp_path), MODEL__NUM_CLASSES=4), False)


def test_palette_is_deterministic_and_well_separated():
    p = seg_data.palette(150)
    assert p.shape == (150, 3) and p.dtype == np.uint8
    assert (p == seg_data.palette(150)).all() and (seg_data.palette(10) == p[:10]).all()
    assert len({tuple(c) for c in p}) == 150
    for n, least in ((6, 120), (20, 80), (150, 30)):  # (RGB distance; 255 = a full channel)
        q = p[:n].astype(float)
        d = np.sqrt(((q[:, None] - q[None]) ** 2).sum(-1)) + np.eye(n) * 1e9
        assert d.min() >= least, n


# ------------------------------------------------------------------------------- demo set

def _demo_module():
    spec = importlib.util.spec_from_file_location(
        'make_demo_dataset', os.path.join(H.ROOT, 'tools', 'make_demo_dataset.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _files(root):
    out = {}
    for dirpath, _, names in os.walk(root):
        for n in names:
            path = os.path.join(dirpath, n)
            with open(path, 'rb') as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


def test_segmentation_demo_is_deterministic_and_loads(tmp_path, capsys):
    demo = _demo_module()
    for out in ('a', 'b'):
        assert demo.main(['--segmentation', '--out', str(tmp_path / out), '--train-count', '12',
                          '--val-count', '4', '--seed', '3']) == 0
    printed = capsys.readouterr().out
    assert 'DATA.REDUCE_ZERO_LABEL True MODEL.NUM_CLASSES 5' in printed
    a, b = _files(tmp_path / 'a'), _files(tmp_path / 'b')
    assert a == b and len(a) == 2 * 16 + 2
    names = a['class_names.txt'].decode().split()
    assert names == ['background', 'stripes', 'checker', 'dots', 'solid']
    seen = set()
    for rel in a:
        if rel.startswith('annotations'):
            ann = Image.open(tmp_path / 'a' / rel)
            img = Image.open(tmp_path / 'a' / rel.replace('annotations', 'images')
                             .replace('.png', '.jpg'))
            assert ann.mode == 'L' and ann.size == img.size and img.mode == 'RGB'
            assert 48 <= min(img.size) and max(img.size) <= 96
            values = np.unique(np.asarray(ann))
            assert values.min() >= 0 and values.max() <= len(names)
            seen |= set(values.tolist())
    assert seen == set(range(len(names) + 1))  # unlabelled, background, every shape
    cfg = seg_config(str(tmp_path / 'a'), DATA__REDUCE_ZERO_LABEL=True)
    for is_train in (True, False):
        ds = seg_dataset(cfg, is_train)
        labels = np.unique(np.concatenate([ds[i][1].ravel() for i in range(len(ds))]))
        assert set(labels.tolist()) <= set(range(5)) | {IGNORE}
    assert seg_data.class_names(cfg) == names
    other = tmp_path / 'c'
    demo.main(['--segmentation', '--out', str(other), '--train-count', '12', '--val-count',
               '4', '--seed', '4'])
    assert _files(other)['class_names.txt'] == a['class_names.txt']
    assert _files(other) != a  # the seed matters


def test_a_classification_list_is_named_as_such(tmp_path):
    """`path label` lines (a classification list) given to segmentation: one line that says so."""
    (tmp_path / 'train_list.txt').write_text('images/a.jpg 3\n')
    with pytest.raises(DataError, match=r"train_list\.txt line 1: 'images/a\.jpg 3' is an image "
                                        r"and a class label \(a classification list\)"):
        seg_data.read_pair_list(str(tmp_path / 'train_list.txt'), str(tmp_path))


# ------------------------------------------------------------- wide labels, lossless annotations

def write_16_bit(path, values):
    """values saved as a 16-bit greyscale PNG (Pillow mode 'I;16')."""
    img = Image.fromarray(np.asarray(values, np.uint16))
    img.save(path)
    assert Image.open(path).mode == 'I;16'


@pytest.mark.parametrize('ignore', [65535, -1])
def test_16_bit_annotations_keep_values_above_255(tmp_path, ignore):
    values = np.array([[0, 255, 256, 299], [298, 65535, 1, 255]])
    Image.new('RGB', (4, 2)).save(tmp_path / 'a.png')
    write_16_bit(tmp_path / 'a_ann.png', values)
    H.write_list(tmp_path / 'val_list.txt', ['a.png a_ann.png'])
    cfg = seg_config(str(tmp_path), MODEL__NUM_CLASSES=300, DATA__IGNORE_INDEX=ignore)
    config.check_values(cfg)
    ds = seg_dataset(cfg, False, A.build_seg_transform(False, cfg))
    if ignore == 65535:  # class 255 stays a class
        assert ds[0][1].tolist() == values.tolist()
    else:  # 65535 is then no class and not ignored
        with pytest.raises(DataError) as e:
            ds[0]
        one_line(str(e.value), 'a_ann.png', 'label value 65535', 'DATA.IGNORE_INDEX -1')
        write_16_bit(tmp_path / 'a_ann.png', np.where(values == 65535, 7, values))
        assert ds[0][1].tolist() == np.where(values == 65535, 7, values).tolist()


@pytest.mark.parametrize('ignore', [65535, -1])
def test_ignore_index_outside_8_bits_with_reduce_zero_label(tmp_path, ignore):
    raw = np.array([[0, 1, 5, 255], [2, 0, 3, 4]], np.uint8)
    write_pair(str(tmp_path), 'training', 'a', np.zeros((2, 4, 3), np.uint8), raw, '.png')
    cfg = seg_config(str(tmp_path), DATA__REDUCE_ZERO_LABEL=True, DATA__IGNORE_INDEX=ignore,
                     MODEL__NUM_CLASSES=255)
    ds = seg_dataset(cfg, True, A.build_seg_transform(True, cfg))
    assert ds.load_annotation(0).tolist() == [[ignore, 0, 4, 254], [1, ignore, 2, 3]]
    image, label, _ = ds[0]  # training: resized, cropped, padded with IGNORE_INDEX
    assert label.shape == (32, 32) and label.dtype == np.int64
    assert ignore in label and set(np.unique(label)) <= {ignore, 0, 1, 2, 3, 4, 254}


def test_crop_rule_with_a_negative_or_wide_ignore_index():
    for ignore in (-1, 65535):
        mask = np.zeros((40, 40), np.int64)
        mask[:, 20:] = 1
        mask[:8, :] = ignore
        np.random.seed(0)
        expected = mmseg_box(np.where(mask == ignore, IGNORE, mask).astype(np.uint8), 24, 0.75)
        np.random.seed(0)
        assert A.random_crop_box(mask, 24, 0.75, ignore)[:2] == expected


@pytest.mark.parametrize('ext', ['.jpg', '.JPEG'])
def test_jpeg_annotations_are_refused_at_construction(tmp_path, ext):
    Image.new('RGB', (4, 2)).save(tmp_path / 'a.png')
    Image.fromarray(np.zeros((2, 4), np.uint8)).save(tmp_path / f'a_ann{ext}', 'JPEG')
    H.write_list(tmp_path / 'val_list.txt', [f'a.png a_ann{ext}'])
    with pytest.raises(DataError) as e:
        seg_dataset(seg_config(str(tmp_path)), False)
    one_line(str(e.value), f'a_ann{ext}', 'val_list.txt line 1', 'must be lossless', 'PNG')


def test_jpeg_content_under_a_png_name_is_refused_when_read(tmp_path):
    root, pairs = ade_root(tmp_path, sizes=[(6, 4)])
    Image.fromarray(np.ones((4, 6), np.uint8)).save(pairs[0][1], 'JPEG')
    ds = seg_dataset(seg_config(root, DATA__REDUCE_ZERO_LABEL=True), False)
    with pytest.raises(DataError) as e:
        ds[0]
    one_line(str(e.value), pairs[0][1], 'must be lossless')
