"""Semantic segmentation data (DESIGN.md 3.4): images with per-pixel class annotations.

Layouts (under DATA.DATA_PATH):
- list files DATA.TRAIN_LIST / DATA.VAL_LIST (PaddleSeg's format), one sample a line,
  `image_path annotation_path`, both relative to DATA_PATH; blank lines and lines starting
  with '#' are ignored. Used whenever the list file exists.
- ADE20K's (ADEChallengeData2016): images/{training,validation}/<name>.jpg with
  annotations/{training,validation}/<name>.png.

Annotations are single-band index images (8-bit 'L' or palette 'P' PNGs; 16/32-bit integer
ones work too, their values read as they are), the size of their image, in a lossless format:
a JPEG annotation (by its extension, at construction; by its content, when read) is a
DataError. DATA.REDUCE_ZERO_LABEL (ADE20K) maps 0 ('other') to
DATA.IGNORE_INDEX and every other value v to v - 1, the file's own IGNORE_INDEX pixels staying
ignored (mmsegmentation's reduce_zero_label). Every value must then be a class
(< MODEL.NUM_CLASSES) or IGNORE_INDEX. A missing annotation, one of another size than its image,
a colour annotation and a value out of range are DataErrors naming the annotation file (and
list line) whatever DATA.ON_BAD_IMAGE says: they are mistakes in the data set's definition,
not a damaged picture, and training around them would silently learn from wrong labels.
An annotation that exists but cannot be decoded is such an error too. DATA.ON_BAD_IMAGE governs
unreadable images, as for classification.

Samples (the joint transforms are seg_transforms.py's build_seg_transform):
- training: (image float32 [3, S, S], label map int64 [S, S], sample id int64), S =
  DATA.IMAGE_SIZE, pixels padded in labelled IGNORE_INDEX;
- evaluation: (image float32 [3, h, w] resized into DATA.SEG_SCALE and normalised, label map
  int64 [H, W] at the annotation's own size, sample id). An evaluation image replaced because
  it was unreadable (ON_BAD_IMAGE skip) has sample id -1 and an all-IGNORE_INDEX label map, so
  evaluation leaves it out. Evaluation batches are lists (sizes differ): the dataset's
  `collate_fn` (collate_eval) makes (list of images, list of label maps, ids [B]);
  training keeps Paddle's default collate (collate_fn None).

Everything else -- skipping unreadable images, errors raised cleanly out of loader workers,
the per-sample augmentation seeds -- is datasets.ImageDataset's.
"""
import os

import numpy as np
from PIL import Image, ImageDraw

import classnames
from datasets import (IGNORE_LABEL, IMG_EXTENSIONS, DataError, ImageDataset, explain,
                      list_file_of, list_lines)

SPLIT_FOLDERS = {True: 'training', False: 'validation'}  # ADE20K's split folder names
ANNOTATION_EXT = '.png'
LOSSY_EXTENSIONS = ('.jpg', '.jpeg', '.jpe', '.jfif')  # JPEG changes class values at edges
CLASS_NAMES_FILE = 'class_names.txt'

# The 150 classes of ADE20K's SceneParsing benchmark, index = label after reduce-zero-label
ADE20K_CLASSES = classnames.ade20k()

_INDEX_MODES = ('L', 'P')                    # 8-bit class indices
_WIDE_MODES = ('I', 'I;16', 'I;16L', 'I;16B', 'I;16N')  # wider integer indices


def collate_eval(batch):
    """Evaluation samples of different sizes -> (list of images, list of label maps, sample
    ids int64 [B]). A module-level function, so loader workers can pickle it."""
    images = [sample[0] for sample in batch]
    labels = [sample[1] for sample in batch]
    ids = np.array([int(sample[2]) for sample in batch], dtype=np.int64)
    return images, labels, ids


class SegmentationDataset(ImageDataset):
    """Images with annotation maps -> (image, label map int64, sample id int64); see the
    module docstring for the shapes.

    images, annotations: file paths, one pair a sample (each annotation must exist).
    transform: joint callable (PIL RGB image, integer mask [H, W]) -> (image, mask), e.g.
    seg_transforms.build_seg_transform; None gives (PIL image, int64 mask).
    is_train: training samples (fixed size, default collate) or evaluation ones (replaced
    images marked with id -1, collate_eval). list_file / line_numbers: where the pairs were
    listed, for messages.

    ImageDataset's machinery is reused as it is: its `labels` are the samples' own indices, so
    its skip loop hands back which sample's image it read (the replacement's, when an image was
    skipped) and this class reads that sample's annotation; its per-sample seeding happens
    right before the joint transform, which draws from NumPy's global RNG.
    """

    def __init__(self, images, annotations, transform, num_classes, is_train,
                 ignore_index=255, reduce_zero_label=False, on_bad_image='error',
                 list_file=None, line_numbers=None):
        if len(images) != len(annotations):
            raise ValueError(f'{len(images)} images but {len(annotations)} annotations')
        super().__init__(images, np.arange(len(images)), transform=None,
                         on_bad_image=on_bad_image, mark_skipped=not is_train)
        self.joint_transform = transform
        self.is_train = is_train
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.reduce_zero_label = bool(reduce_zero_label)
        self.list_file = list_file
        # one bytes array, like ImageDataset's paths: forked workers share it untouched
        self._annotations = np.array([p.encode('utf-8') for p in annotations], dtype=np.bytes_)
        self._line_numbers = None if line_numbers is None else np.asarray(line_numbers,
                                                                          np.int64)
        self.collate_fn = None if is_train else collate_eval
        for i in range(len(self)):  # found now, not hours into training
            if not os.path.isfile(self.annotation(i)):
                raise DataError(f'annotation not found: {self._where(i)} (the annotation of '
                                f'image {self.path(i)})')
            if self.annotation(i).lower().endswith(LOSSY_EXTENSIONS):
                raise DataError(_lossy(self._where(i)))

    kind = 'segmentation'

    @classmethod
    def from_config(cls, config, is_train, transform, need_labels=True):
        """The split of config.DATA: the list file (DATA.TRAIN_LIST / VAL_LIST) when it exists,
        else the ADE20K layout, else None. DATA_PATH/class_names.txt, when there is one, is
        checked against MODEL.NUM_CLASSES now, not at evaluation."""
        d = config.DATA
        list_file, _ = list_file_of(config, is_train)
        split = SPLIT_FOLDERS[is_train]
        line_numbers = None
        if not d.DATA_PATH:
            return None
        if os.path.isfile(list_file):
            images, annotations, line_numbers = read_pair_list(list_file, d.DATA_PATH)
        elif os.path.isdir(os.path.join(d.DATA_PATH, 'images', split)):
            images, annotations = ade_layout(d.DATA_PATH, split)
            list_file = None
        else:
            return None
        dataset = cls(images, annotations, transform, config.MODEL.NUM_CLASSES, is_train,
                      ignore_index=d.IGNORE_INDEX, reduce_zero_label=d.REDUCE_ZERO_LABEL,
                      on_bad_image=d.ON_BAD_IMAGE, list_file=list_file,
                      line_numbers=line_numbers)
        dataset.classes = class_names(config)  # (saved with the checkpoints)
        return dataset

    @classmethod
    def expected(cls, config, is_train):
        list_file, key = list_file_of(config, is_train)
        split = SPLIT_FOLDERS[is_train]
        return [f'the list file {os.path.basename(list_file)} ({key})',
                f'a folder images/{split}/ with annotations/{split}/ (ADE20K layout)']

    def annotation(self, index):
        return self._annotations[index].decode('utf-8')

    def _line(self, index):
        if self.list_file is None:
            return ''
        return f'{self.list_file} line {self._line_numbers[index]}'

    def _where(self, index):
        """The annotation of sample `index`, and its list line, for messages."""
        line = self._line(index)
        return f'{self.annotation(index)} ({line})' if line else self.annotation(index)

    def describe(self, index):
        line = self._line(index)
        return f'{self.path(index)} (annotation {self.annotation(index)}' + (
            f', {line})' if line else ')')

    # ------------------------------------------------------------------------ loading

    def load_annotation(self, index, image_size=None):
        """Annotation of sample `index` as an integer array [H, W] (uint8 for 8-bit files when
        IGNORE_INDEX fits in 8 bits, else int32), reduce-zero-label applied and values checked;
        image_size (w, h): the size it must have. Raises DataError naming the file (and list
        line)."""
        where = self._where(index)
        try:
            with open(self.annotation(index), 'rb') as f:
                ann = Image.open(f)
                ann.load()
        except FileNotFoundError:
            raise DataError(f'annotation not found: {where} (the annotation of image '
                            f'{self.path(index)})') from None
        except Exception as e:
            raise DataError(f'cannot read annotation {where}: {explain(e)}') from None
        if ann.format == 'JPEG':
            raise DataError(_lossy(where))
        if image_size is not None and ann.size != tuple(image_size):
            raise DataError(
                f'annotation {where} is {ann.size[0]}x{ann.size[1]} but its image '
                f'{self.path(index)} is {image_size[0]}x{image_size[1]} (width x height, after '
                f'the image\'s EXIF orientation): an annotation must have its image\'s size')
        if ann.mode in _INDEX_MODES:
            mask = np.asarray(ann)  # 'P': the palette indices, which are the classes
        elif ann.mode == '1':
            mask = np.asarray(ann, dtype=np.uint8)
        elif ann.mode in _WIDE_MODES:
            mask = np.asarray(ann).astype(np.int32)
        else:
            raise DataError(
                f'annotation {where} is a {ann.mode} image; annotations must hold one class '
                f'index a pixel (single-band: 8-bit "L" or palette "P" PNG), not colours -- '
                f'convert colour-coded masks to class indices first')
        return self._labels_of(mask, where)

    def _labels_of(self, mask, where):
        ignore = self.ignore_index
        limits = np.iinfo(mask.dtype)
        if not limits.min <= ignore <= limits.max:  # e.g. 8-bit values, IGNORE_INDEX 65535 / -1
            mask = mask.astype(np.int32)
        if self.reduce_zero_label:
            # mmseg: 0 -> ignore, v -> v - 1; the file's own ignore value stays ignored
            unlabelled = (mask == 0) | (mask == ignore)
            mask = mask - 1
            mask[unlabelled] = ignore
        bad = ((mask >= self.num_classes) | (mask < 0)) & (mask != ignore)
        if bad.any():
            values = mask[bad]
            value = int(values.min()) if values.min() < 0 else int(values.max())
            in_file = f' ({value + 1} in the file)' if self.reduce_zero_label else ''
            raise DataError(
                f'annotation {where}: label value {value}{in_file} is neither a class '
                f'(0..{self.num_classes - 1}, MODEL.NUM_CLASSES {self.num_classes}) nor '
                f'DATA.IGNORE_INDEX {ignore}; check MODEL.NUM_CLASSES, DATA.REDUCE_ZERO_LABEL '
                f'({self.reduce_zero_label}: ADE20K-style files, 0 = unlabelled, need True) and '
                f'DATA.IGNORE_INDEX')
        return mask

    def _load_sample(self, index):
        # ImageDataset reads the image (or, skipping, the next readable one), gives its sample
        # index as the label (or IGNORE_LABEL for a replaced evaluation image) and seeds the
        # RNGs for this sample; nothing here draws from them before the joint transform.
        img, source, _ = super()._load_sample(index)
        source = int(source)
        sample_id = index
        if source == IGNORE_LABEL:  # evaluation: left out (id -1), its pixels all ignored
            mask = np.full((img.size[1], img.size[0]), self.ignore_index, np.int64)
            sample_id = -1
        else:
            mask = self.load_annotation(source, img.size)
        if self.joint_transform is None:
            return img, mask.astype(np.int64), np.int64(sample_id)
        image, label = self.joint_transform(img, mask)
        return image, label, np.int64(sample_id)

    def _placeholder(self, index):
        """Stands in (never delivered) for a sample whose loading failed inside a loader,
        shaped like a real one so the batch still collates."""
        blank = Image.new('RGB', (1, 1))
        mask = np.full((1, 1), self.ignore_index, np.int64)
        try:
            image, label = self.joint_transform(blank, mask) if self.joint_transform else (
                blank, mask.astype(np.int64))
        except Exception:
            image, label = np.zeros((3, 1, 1), np.float32), mask.astype(np.int64)
        return image, label, np.int64(-1)


def _lossy(where):
    return (f'annotation {where} is a JPEG file: annotations must be lossless, e.g. PNG (JPEG '
            f'compression changes class values)')


# ---------------------------------------------------------------------------------- layouts

def read_pair_list(list_file, root):
    """`image_path annotation_path` lines -> (image paths, annotation paths, line numbers),
    paths joined to root. DataError naming the file and line for a malformed line."""
    images, annotations, line_numbers = [], [], []
    for lineno, where, line, parts in list_lines(list_file, unique=True):
        if len(parts) != 2:
            raise DataError(f"{where}: expected 'image_path annotation_path' (two paths "
                            f"relative to DATA.DATA_PATH, no spaces in them), got {line!r}")
        if parts[1].lstrip('-').isdigit():  # 'image label': a classification list
            raise DataError(f"{where}: {line!r} is an image and a class label (a "
                            f"classification list); segmentation lists hold "
                            f"'image_path annotation_path'")
        images.append(os.path.join(root, parts[0]))
        annotations.append(os.path.join(root, parts[1]))
        line_numbers.append(lineno)
    if not images:
        raise DataError(f'{list_file}: lists no images')
    return images, annotations, line_numbers


def ade_layout(root, split):
    """root/images/<split>/* (image files, sorted, hidden ones skipped) and their annotations
    root/annotations/<split>/<same name>.png. DataError naming the first missing annotation."""
    folder = os.path.join(root, 'images', split)
    names = sorted(n for n in os.listdir(folder)
                   if n.lower().endswith(IMG_EXTENSIONS) and not n.startswith('.')
                   and os.path.isfile(os.path.join(folder, n)))
    if not names:
        raise DataError(f'{folder}: no image files ({", ".join(IMG_EXTENSIONS)}) found')
    ann_folder = os.path.join(root, 'annotations', split)
    images = [os.path.join(folder, n) for n in names]
    annotations = [os.path.join(ann_folder, os.path.splitext(n)[0] + ANNOTATION_EXT)
                   for n in names]
    for img, ann in zip(images, annotations):
        if not os.path.isfile(ann):
            raise DataError(f'annotation not found: {ann} (the annotation of image {img}; '
                            f'the ADE20K layout pairs images/{split}/<name>.jpg with '
                            f'annotations/{split}/<name>.png)')
    return images, annotations


# ------------------------------------------------------------------------ names and colours

def class_names(config):
    """The names of the MODEL.NUM_CLASSES classes: DATA_PATH/class_names.txt when it exists
    (one name a line, blank lines ignored, exactly NUM_CLASSES names, else DataError); else
    ADE20K's 150 when NUM_CLASSES is 150 and DATA.REDUCE_ZERO_LABEL is on; else class_0, ..."""
    n = config.MODEL.NUM_CLASSES
    path = os.path.join(config.DATA.DATA_PATH, CLASS_NAMES_FILE) if config.DATA.DATA_PATH \
        else None
    if path and os.path.isfile(path):
        try:
            with open(path, encoding='utf-8') as f:
                names = [line.strip() for line in f if line.strip()]
        except UnicodeDecodeError:
            raise DataError(f'{path}: not UTF-8 text') from None
        if len(names) != n:
            raise DataError(f'{path} names {len(names)} classes but MODEL.NUM_CLASSES is {n}: '
                            f'one name a line, one line a class (label 0 first)')
        return names
    if n == len(ADE20K_CLASSES) and config.DATA.REDUCE_ZERO_LABEL:
        return list(ADE20K_CLASSES)
    return [f'class_{i}' for i in range(n)]


def palette(n):
    """n deterministic RGB colours (uint8 [n, 3]) for overlays, as far apart as a greedy
    choice makes them: each colour is the point of a grid over [32, 232]^3 (no near-black or
    near-white, which overlays use for other things) farthest from the colours already chosen,
    starting from red. palette(n)[:k] is palette(k) for n up to 729 (beyond, the grid grows
    with n)."""
    steps = max(11, int(np.ceil(n ** (1 / 3))) + 2)
    levels = np.linspace(32, 232, steps)
    grid = np.stack(np.meshgrid(levels, levels, levels, indexing='ij'), -1).reshape(-1, 3)
    out = np.zeros((n, 3), np.uint8)
    nearest = np.full(len(grid), np.inf)  # squared distance to the closest chosen colour
    pick = int(np.argmin(((grid - (232, 32, 32)) ** 2).sum(axis=1)))
    for i in range(n):
        out[i] = np.rint(grid[pick])
        nearest = np.minimum(nearest, ((grid - grid[pick]) ** 2).sum(axis=1))
        pick = int(np.argmax(nearest))
    return out


# ------------------------------------------------------------------------ pictures and files

def label_png(pred, config):
    """Predicted classes (H, W) -> an 'L' PNG image in the dataset's convention: with
    DATA.REDUCE_ZERO_LABEL, class c is written as c + 1 (0 stays 'unlabelled', as ADE20K's
    annotations); else c as it is."""
    values = np.asarray(pred, np.int64) + (1 if config.DATA.REDUCE_ZERO_LABEL else 0)
    if values.size and (values.min() < 0 or values.max() > 255):
        raise ValueError(f'class values {values.min()}..{values.max()} do not fit an 8-bit PNG')
    return Image.fromarray(values.astype(np.uint8), 'L')


def overlay(image, pred, names, alpha=0.5, scale=1):
    """The picture of a prediction: the RGB image with each pixel blended (alpha) with its
    class colour (palette(len(names))), beside a legend of the classes present (colour, name,
    share of the pixels), largest first. image: PIL RGB of the prediction's size; pred (H, W).
    scale: pixel zoom for small images (nearest)."""
    pred = np.asarray(pred, np.int64)
    colours = palette(len(names))
    rgb = np.asarray(image.convert('RGB'), np.float32)
    if rgb.shape[:2] != pred.shape:
        raise ValueError(f'image {rgb.shape[1]}x{rgb.shape[0]} and prediction '
                         f'{pred.shape[1]}x{pred.shape[0]} differ in size')
    blended = (1 - alpha) * rgb + alpha * colours[pred].astype(np.float32)
    picture = Image.fromarray(np.clip(blended + 0.5, 0, 255).astype(np.uint8))
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    counts = np.bincount(pred.ravel(), minlength=len(names))
    present = [c for c in np.argsort(-counts, kind='stable') if counts[c]]
    row, pad = 14, 4
    legend_w = 150
    height = max(picture.height, pad + row * len(present) + pad)
    canvas = Image.new('RGB', (picture.width + legend_w, height), (255, 255, 255))
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for k, c in enumerate(present):
        x, y = picture.width + pad, pad + k * row
        draw.rectangle([x, y + 1, x + 10, y + 11], fill=tuple(int(v) for v in colours[c]),
                       outline=(0, 0, 0))
        share = 100.0 * counts[c] / pred.size
        draw.text((x + 14, y), f'{names[c]} ' + (f'{share:.0f}%' if share >= 0.5 else '<1%'),
                  fill=(0, 0, 0))
    return canvas


def class_shares(pred, names):
    """{class name: share of the pixels} for the classes present, largest first."""
    counts = np.bincount(np.asarray(pred, np.int64).ravel(), minlength=len(names))
    order = [c for c in np.argsort(-counts, kind='stable') if counts[c]]
    return {names[c]: round(float(counts[c]) / counts.sum(), 4) for c in order}
