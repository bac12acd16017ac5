"""Data: the DataSource contract every source meets, list-file and class-folder sources, robust
RGB loading, and the training / evaluation loaders, which ask a source only what the contract
names (sources.py picks the source; the image transforms are transforms.py's).

Data folder (DESIGN.md 3.3): DATA_PATH/train_list.txt and DATA_PATH/val_list.txt, one image a
line, `relative/path [label]` (paths relative to DATA_PATH; the label is optional for
pre-training), or DATA_PATH/train/ and DATA_PATH/val/ holding one sub-folder per class.

Errors a user can cause (missing folder, malformed list line, unreadable image) raise DataError
(BadImageError for an image; both are utils.UserError) with a one-line message naming the file
and list line; utils.run_main prints it without a traceback. One raised in a loader worker is
recorded and raised by the loader in the main process, with the same class and message.

DATA.ON_BAD_IMAGE 'skip' replaces an unreadable image by the next readable one and counts it:
`dataset.num_skipped` is the count over all loader workers of this process (a shared counter),
so the training log can report it (sum it over processes with an all-reduce). Evaluation
datasets mark a replaced sample with label -1 so that evaluate() can leave it out of the
metrics and of the image count.

Randomness: the transforms draw from Python's `random` and NumPy's global RNG. The training
loader seeds both in each worker from (SEED, epoch, rank, worker id), and ImageDataset reseeds
them before transforming sample i from (SEED, epoch, i): augmentations differ between samples
and epochs, yet repeat exactly when a run is repeated or resumed mid-epoch, whatever
NUM_WORKERS or the number of processes. The sample order is a permutation drawn from
(SEED, epoch), the same on every process.

Samples are (image, label, sample id): the id is the sample's identity in its data source
(here its index in the list or folder), so that what belongs to a sample -- its augmentation
seed, its pre-training mask (tasks.masking_noise) -- follows it into any batch on any process.
"""
import codecs
import gc
import itertools
import logging
import math
import multiprocessing
import os
import signal
import traceback
from array import array

import numpy as np
import paddle
from paddle.io import DataLoader, Dataset, DistributedBatchSampler
from paddle.io.dataloader.collate import default_collate_fn
from PIL import Image, ImageOps

import classnames
import utils

logger = logging.getLogger(__name__)

IMG_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp',
                  '.gif')
MAX_BAD_IN_A_ROW = 50  # 'skip' mode: give up (DataError) after this many unreadable in a row
IGNORE_LABEL = -1      # no label (unlabelled pre-training data), or an eval sample replaced
_ERROR_BYTES = 4096    # room for a worker's error message


# ------------------------------------------------------------------------------------- errors

class DataError(utils.UserError):
    """A problem with the user's data: missing folder or list, malformed list line, unreadable
    image. str(e) is one line naming the file; utils.run_main prints it without a traceback."""


class BadImageError(DataError):
    """An image file that is missing, truncated or not an image (DATA.ON_BAD_IMAGE 'error')."""


# ------------------------------------------------------------------------------ image loading

_SIXTEEN_BIT = ('I;16', 'I;16L', 'I;16B', 'I;16N')
_ALPHA = ('RGBA', 'LA', 'PA', 'RGBa', 'La')
_EXIF_ORIENTATION = 0x0112


def load_rgb(path):
    """Read an image file as an 8-bit RGB PIL image, turned upright by its EXIF orientation.

    Handles grayscale (8- and 16-bit: 16-bit values are scaled to 0..255, not clipped as
    Image.convert does), CMYK, palette, and alpha (composited over white; Image.convert would
    drop alpha and show whatever colour the transparent pixels hold). Raises the underlying
    exception (OSError, ValueError, ...) for a missing, truncated or non-image file.
    """
    with open(path, 'rb') as f:
        return decode_image(f)


def decode_image(f):
    """load_rgb's reading and conversions from an open binary file (or io.BytesIO)."""
    img = Image.open(f)
    img.load()  # decode now, so a truncated file fails here and the file can be closed
    return _to_rgb(_upright(img))


def _upright(img):
    try:
        orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
        if orientation in (2, 3, 4, 5, 6, 7, 8):
            return ImageOps.exif_transpose(img)
    except Exception:  # unreadable EXIF block: the pixels are fine, keep them as stored
        pass
    return img


def _to_rgb(img):
    mode = img.mode
    if mode == 'RGB':
        return img
    if mode in _SIXTEEN_BIT or mode in ('I', 'F'):
        a = np.asarray(img).astype(np.float64)
        if mode in _SIXTEEN_BIT or (mode == 'I' and a.max(initial=0) > 255):
            a = a / 257.0  # 0..65535 -> 0..255
        elif mode == 'F' and a.max(initial=0) <= 1.0:
            a = a * 255.0  # float images in [0, 1]
        gray = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), 'L')
        return gray.convert('RGB')
    if mode in _ALPHA or (mode == 'P' and 'transparency' in img.info) or (
            mode in ('L', 'RGB') and 'transparency' in img.info):
        rgba = img.convert('RGBA')
        background = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert('RGB')
    return img.convert('RGB')  # L, 1, P, CMYK, YCbCr, ...


def explain(exc):
    """An exception as one line for a message: 'TypeName: text'."""
    text = str(exc).replace('\n', ' ').strip()
    return f'{type(exc).__name__}: {text}' if text else type(exc).__name__


# ------------------------------------------------------------------------------------ datasets

class DataSource:
    """The contract between a data source and the loaders, the engine and the tasks: what they
    may ask of any dataset, with the defaults a plain source keeps. A new source subclasses it
    (with paddle.io.Dataset, or IterableDataset when streamed), yields (image, label, sample id)
    -- or the layout of its `kind` -- and registers in sources.py; nothing else changes.

    Asked of every source:
      kind          'classification' (image, int64 label, int64 id) or 'segmentation'
                    (image, label map, id); the task asks the factory for its kind
      len(source)   samples in one pass
      classes       class names, label i = classes[i] (saved with checkpoints), or None
      follow_classes(names)   relabel to another list of names when the labels come from the
                    names (class folders): True if done; False (the default) when the labels
                    are the data's own numbers, which only a matching list of names can confirm
      collate_fn    how a batch is made from samples; None: Paddle's default collate
      streamed      False: map-style, indexed by the loader's samplers; True: iterable, it
                    plans its own batches (configure, num_batches, set_epoch, batch_size)
      plan()        what a streamed epoch's order depends on besides (SEED, epoch), saved with
                    checkpoints and compared on resume; None for map-style sources
      num_skipped   unreadable samples replaced so far (DATA.ON_BAD_IMAGE skip)
      set_augment_seed(seed, epoch)   training: seed each sample's transform from
                    (seed, epoch, sample id)
      begin_loading() / end_loading() / loader_error()   errors inside a loader recorded and
                    raised in the calling thread (see below)
      from_config(config, is_train, transform, need_labels)   the source of the config, or None
                    when the config does not point at data of this source
      expected(config, is_train)   what from_config looks for (a list of phrases such as
                    'the list file train_list.txt (DATA.TRAIN_LIST)'), for the message when no
                    source finds its data
    What a source gets from this class to meet it: __init__(transform, on_bad_image,
    mark_skipped); transformed(img, sample_id) (the transform, seeded per sample in training);
    count_skipped(where, exc) (a replaced sample, counted over all workers); record_error(e)
    (inside __getitem__ / __iter__: the loader raises it in the main thread).
    """

    kind = 'classification'
    classes = None
    collate_fn = None
    streamed = False

    def __init__(self, transform=None, on_bad_image='error', mark_skipped=False):
        self.transform = transform
        self.on_bad_image = on_bad_image
        self.mark_skipped = mark_skipped
        self._skipped = multiprocessing.Value('q', 0)  # shared with forked/spawned workers
        self._loader_error = multiprocessing.Array('c', _ERROR_BYTES)  # see loader_error()
        self.defer_errors = False
        self.augment_seed = None  # set_augment_seed (a training EpochDataLoader)
        self.augment_epoch = 0

    @classmethod
    def from_config(cls, config, is_train, transform, need_labels):
        raise NotImplementedError

    @classmethod
    def expected(cls, config, is_train):
        return []

    def plan(self):
        return None

    def follow_classes(self, names):
        return False

    def set_augment_seed(self, seed, epoch):
        """Training: the transform of sample i draws from RNGs seeded with (seed, epoch, i)."""
        self.augment_seed, self.augment_epoch = seed, epoch

    @property
    def num_skipped(self):
        """Unreadable samples replaced so far, over all loader workers of this process."""
        return self._skipped.value

    def reset_skip_count(self):
        with self._skipped.get_lock():
            self._skipped.value = 0

    def count_skipped(self, where, exc):
        with self._skipped.get_lock():
            self._skipped.value += 1
        logger.warning('skipping unreadable image %s: %s', where, explain(exc))

    # Errors inside a loader. Paddle's DataLoader runs __getitem__ in a reader thread (also
    # with NUM_WORKERS 0) or in worker processes; an exception there leaves the main process
    # hanging (NUM_WORKERS 0, Paddle 2.6 and 3.3) or failing with a bare SystemError while the
    # real error goes to stderr as a thread traceback. So while EpochDataLoader iterates
    # (defer_errors True), a dataset records the first error in shared memory and returns a
    # placeholder sample (or ends its stream), and the loader raises the recorded error in the
    # main thread.

    def loader_error(self):
        """The first error recorded during loader iteration, as an exception to raise, or None:
        DataError / BadImageError with its one-line message; any other error (a bug) as
        RuntimeError with the traceback text from the process that hit it."""
        record = self._loader_error.value.decode('utf-8', 'replace')
        if not record:
            return None
        kind, _, message = record.partition('\t')
        if kind == BadImageError.__name__:
            return BadImageError(message)
        if kind == DataError.__name__:
            return DataError(message)
        return RuntimeError(f'data loading failed:\n{message}')

    def begin_loading(self):
        """A loader starts iterating: errors are recorded from now on (see above)."""
        self._loader_error.value = b''
        self.defer_errors = True

    def end_loading(self):
        self.defer_errors = False

    def record_error(self, e):
        """Record e (deferred mode) for the loader to raise; re-raise it otherwise."""
        if not self.defer_errors:
            raise e
        if isinstance(e, DataError):
            record = f'{type(e).__name__}\t{e}'
        else:
            record = 'Exception\t' + ''.join(traceback.format_exception(
                type(e), e, e.__traceback__))[-(_ERROR_BYTES // 2):]
        with self._loader_error.get_lock():
            if not self._loader_error.value:
                self._loader_error.value = record.encode('utf-8')[:_ERROR_BYTES - 1]

    def transformed(self, img, sample_id):
        """img through the transform, seeded per sample in training (see ImageDataset)."""
        if self.augment_seed is not None:
            utils.seed_everything(self.augment_seed, self.augment_epoch, sample_id,
                                  include_paddle=False)
        return self.transform(img) if self.transform is not None else img

    def _placeholder(self, index):
        img = Image.new('RGB', (1, 1))
        try:
            img = self.transform(img) if self.transform else img
        except Exception:
            img = np.zeros((3, 1, 1), np.float32)
        return img, np.int64(IGNORE_LABEL), np.int64(index)


class ImageDataset(DataSource, Dataset):
    """Images with integer labels (IGNORE_LABEL = none) -> (float32 [3, H, W], int64 label,
    int64 sample id = the index).

    paths: file paths; labels: ints; transform: PIL RGB image -> array (None: the PIL image).
    on_bad_image: 'error' raises BadImageError naming the file; 'skip' uses the next readable
    sample instead, counts it in `num_skipped` and logs a warning.
    mark_skipped: give a replaced sample IGNORE_LABEL (evaluation: count every image once).
    augment_seed: when not None, the random transforms of sample i in epoch augment_epoch draw
    from RNGs seeded with (augment_seed, augment_epoch, i): the same augmentation whichever
    worker or process loads it, for any NUM_WORKERS, and in a run resumed mid-epoch.
    Paths are held in one NumPy bytes array, not a list of str, so that forked workers do not
    copy them page by page as reference counts change.
    """

    def __init__(self, paths, labels, transform=None, on_bad_image='error', mark_skipped=False):
        DataSource.__init__(self, transform, on_bad_image, mark_skipped)
        self._paths = np.array([p.encode('utf-8') for p in paths], dtype=np.bytes_)
        self.labels = np.asarray(labels, dtype=np.int64)

    def __len__(self):
        return len(self._paths)

    def path(self, index):
        return self._paths[index].decode('utf-8')

    def describe(self, index):
        """Where sample `index` comes from, for messages."""
        return self.path(index)

    def read_image(self, index):
        """Sample `index`'s image as upright RGB PIL (a data source other than files, such as
        tar shards, overrides this); raises what load_rgb raises."""
        return load_rgb(self.path(index))

    def __getitem__(self, index):
        """-> (transformed image [3, H, W] float32, int64 label, int64 sample id)."""
        try:
            return self._load_sample(index)
        except Exception as e:
            self.record_error(e)
            return self._placeholder(index)

    def read_error(self, index, exc):
        """The error for sample `index` whose image could not be read (exc), under
        DATA.ON_BAD_IMAGE 'error': BadImageError offering 'skip'; a source that can tell a
        mistake skipping would hide (a wrong path prefix) gives a DataError without it."""
        return BadImageError(f'cannot read image {self.describe(index)}: {explain(exc)}. Fix or '
                             f'remove it, or set DATA.ON_BAD_IMAGE skip to skip unreadable images')

    def _load_sample(self, index):
        n = len(self)
        for attempt in range(min(n, MAX_BAD_IN_A_ROW)):
            i = (index + attempt) % n
            try:
                img = self.read_image(i)
            except Exception as e:
                if self.on_bad_image == 'error':
                    raise self.read_error(i, e) from None
                self.count_skipped(self.describe(i), e)
                continue
            label = self.labels[i]
            if attempt and self.mark_skipped:
                label = IGNORE_LABEL
            return self.transformed(img, index), np.int64(label), np.int64(index)
        raise DataError(f'{min(n, MAX_BAD_IN_A_ROW)} unreadable images in a row, starting at '
                        f'{self.describe(index)}: is DATA.DATA_PATH the right folder?')


class ImageListDataset(ImageDataset):
    """Images listed in a text file, one a line: `relative/path [label]`.

    Paths are relative to `root` and contain no whitespace; blank lines and lines starting with
    '#' are ignored. require_labels: every line needs an integer label (fine-tuning, linear
    probing, evaluation); otherwise a missing label becomes IGNORE_LABEL. num_classes: labels
    must be in [0, num_classes). A malformed line raises DataError naming the file and line, a
    path listed twice one giving the count and the lines of the first repeat (list_lines).
    """

    def __init__(self, root, list_file, transform=None, require_labels=True, num_classes=None,
                 on_bad_image='error', mark_skipped=False):
        self.root = root
        self.list_file = list_file
        paths, labels, self._line_numbers = self._read(list_file, root, require_labels,
                                                       num_classes)
        super().__init__(paths, labels, transform, on_bad_image, mark_skipped)
        self._line_numbers = np.asarray(self._line_numbers, dtype=np.int64)

    @classmethod
    def from_config(cls, config, is_train, transform, need_labels):
        list_file, _ = list_file_of(config, is_train)
        if not config.DATA.DATA_PATH or not os.path.isfile(list_file):
            return None
        dataset = cls(config.DATA.DATA_PATH, list_file,
                      **source_args(config, is_train, transform, need_labels))
        dataset.classes = listed_classes(os.path.dirname(list_file))
        return dataset

    @classmethod
    def expected(cls, config, is_train):
        list_file, key = list_file_of(config, is_train)
        return [f'the list file {os.path.basename(list_file)} ({key})']

    @staticmethod
    def _read(list_file, root, require_labels, num_classes):
        paths, labels, line_numbers = [], [], []
        for lineno, where, line, parts in list_lines(list_file, 'image list', unique=True):
            if len(parts) > 2:
                raise DataError(f"{where}: expected 'relative/path [label]' (no spaces in "
                                f"the path), got {line!r}")
            label = IGNORE_LABEL
            if len(parts) == 2:
                try:
                    label = int(parts[1])
                except ValueError:
                    raise DataError(f'{where}: the label {parts[1]!r} is not an integer '
                                    f'(line {line!r})') from None
                if label < 0 or (num_classes is not None and label >= num_classes):
                    top = f'{num_classes - 1} (MODEL.NUM_CLASSES {num_classes})' \
                        if num_classes is not None else 'the number of classes - 1'
                    raise DataError(f'{where}: label {label} is outside 0..{top}')
            elif require_labels:
                raise DataError(f'{where}: no label after the path {parts[0]!r}; '
                                f'fine-tuning, linear probing and evaluation need '
                                f"'relative/path label'")
            paths.append(os.path.join(root, parts[0]))
            labels.append(label)
            line_numbers.append(lineno)
        if not paths:
            raise DataError(f'{list_file}: lists no images')
        return paths, labels, line_numbers

    def describe(self, index):
        return f'{self.path(index)} ({self.list_file} line {self._line_numbers[index]})'

    PROBES = 16  # other listed images looked for when one is missing

    def read_error(self, index, exc):
        """A missing image while none of PROBES other listed images exists either is a list
        whose paths do not lead into DATA_PATH (a wrong prefix): skipping would skip them
        all, so no skip is offered."""
        n = len(self)
        others = [int(i) for i in np.unique(np.linspace(0, n - 1, self.PROBES + 1).astype(int))
                  if i != index][:self.PROBES]
        if not isinstance(exc, FileNotFoundError) or not others or \
                any(os.path.exists(self.path(i)) for i in others):
            return super().read_error(index, exc)
        return DataError(f'image not found: {self.describe(index)}, and none of {len(others)} '
                         f'other listed images tried exists either (e.g. '
                         f'{self.path(others[-1])}): the paths in {self.list_file} do not lead '
                         f'to images under {self.root} (DATA.DATA_PATH); is it the folder they '
                         f'are relative to, and is their prefix right?')


def list_lines(list_file, what='list file', unique=False):
    """The lines of a list file that hold something -> (line number, 'FILE line N', the line,
    its whitespace-separated parts); blank lines and '#' comments skipped, a UTF-8 byte order
    mark at the start ignored. DataError for a missing file, a line that is not UTF-8, or
    (unique, once every line was given) a first part (the path) on more than one line."""
    if not os.path.isfile(list_file):
        raise DataError(f'{what} not found: {list_file}')
    hashes, numbers = array('q'), array('q')  # of each line's path: duplicates are found after
    with open(list_file, 'rb') as f:
        for lineno, raw in enumerate(f, 1):
            where = f'{list_file} line {lineno}'
            line = _decoded(raw, lineno, where)
            if line and not line.startswith('#'):
                parts = line.split()
                if unique:
                    hashes.append(hash(os.path.normpath(parts[0])))
                    numbers.append(lineno)
                yield lineno, where, line, parts
    if unique:
        _refuse_duplicates(list_file, hashes, numbers)


def _decoded(raw, lineno, where):
    if lineno == 1 and raw.startswith(codecs.BOM_UTF8):  # (Windows editors write one)
        raw = raw[len(codecs.BOM_UTF8):]
    try:
        return raw.decode('utf-8').strip()
    except UnicodeDecodeError:
        raise DataError(f'{where}: not UTF-8 text') from None


def _refuse_duplicates(list_file, hashes, numbers):
    """DataError when a path is listed on more than one line (the count, and the line numbers
    of the first repeat): training would see those images more often, evaluation count them
    twice. Paths are compared by hash, then the lines that share one are read again."""
    h = np.frombuffer(hashes, np.int64) if len(hashes) else np.zeros(0, np.int64)
    order = np.argsort(h, kind='stable')
    same = h[order][1:] == h[order][:-1]
    if not same.any():
        return
    shared = np.zeros(len(h), bool)
    shared[order[1:][same]] = shared[order[:-1][same]] = True
    wanted = set(np.frombuffer(numbers, np.int64)[shared].tolist())
    first, repeats = {}, []
    with open(list_file, 'rb') as f:
        for lineno, raw in enumerate(f, 1):
            if lineno in wanted:
                path = os.path.normpath(_decoded(raw, lineno, '').split()[0])
                if path in first:
                    repeats.append((lineno, path))
                else:
                    first[path] = lineno
    if repeats:
        lineno, path = repeats[0]
        raise DataError(f'{list_file}: {len(repeats)} duplicate line(s), an image listed more '
                        f'than once; the first: {path} on lines {first[path]} and {lineno}. '
                        f'List each image once')


class ImageFolderDataset(ImageDataset):
    """root/<class>/**/<image>: labels are the index of the class folder's name in `classes`.

    classes: the class names that define the labels -- the training set's, so that validation
    uses the same map (a class folder of root that is not among them is a DataError naming it);
    None: root's own class folders, sorted. Hidden folders (.ipynb_checkpoints, .git ...) are
    neither classes nor searched for images. num_classes: the number of classes must equal it.
    A folder holding images and no sub-folders gives unlabelled samples (IGNORE_LABEL), unless
    require_labels. Files are recognised by extension (IMG_EXTENSIONS, any case).
    """

    @classmethod
    def from_config(cls, config, is_train, transform, need_labels):
        """DATA_PATH/train or DATA_PATH/val: one class map, the training folders' (hidden ones
        skipped), applied to val/ too."""
        root = config.DATA.DATA_PATH
        folder = os.path.join(root, 'train' if is_train else 'val')
        if not root or not os.path.isdir(folder):
            return None
        train_folder = os.path.join(root, 'train')
        classes = None  # validation: the training folders' class map, whatever val/ holds
        if not is_train and need_labels and os.path.isdir(train_folder) and \
                not os.path.isfile(list_file_of(config, True)[0]):
            classes = class_folders(train_folder) or None
        return cls(folder, classes=classes,
                   **source_args(config, is_train, transform, need_labels))

    @classmethod
    def expected(cls, config, is_train):
        return [f'a folder {"train" if is_train else "val"}/ of class sub-folders']

    def __init__(self, root, transform=None, require_labels=True, num_classes=None,
                 on_bad_image='error', mark_skipped=False, classes=None):
        if not os.path.isdir(root):
            raise DataError(f'image folder not found: {root}')
        self.root = root
        own = class_folders(root)
        self.classes = list(classes) if classes is not None else own
        unknown = [c for c in own if c not in self.classes]
        if unknown:
            raise DataError(f'{os.path.join(root, unknown[0])}: a class folder the training set '
                            f'does not have (its classes: {_names(self.classes)})')
        # evaluation may hold some of the classes: cli.same_classes labels them by name
        if self.classes and num_classes is not None and (
                len(self.classes) > num_classes or
                (len(self.classes) < num_classes and not mark_skipped)):
            raise DataError(f'{root} has {len(self.classes)} class folders '
                            f'({_names(self.classes)}) but MODEL.NUM_CLASSES is {num_classes}: '
                            f'set -opts MODEL.NUM_CLASSES {len(self.classes)}')
        paths, labels = [], []
        if own:
            for name in own:
                found = _images_under(os.path.join(root, name))
                paths += found
                labels += [self.classes.index(name)] * len(found)
        else:
            if require_labels:
                raise DataError(f'{root} has no class sub-folders; fine-tuning, linear probing '
                                f'and evaluation need root/<class>/<image> or a list file')
            paths = _images_under(root)
            labels = [IGNORE_LABEL] * len(paths)
        if not paths:
            raise DataError(f'{root}: no image files ({", ".join(IMG_EXTENSIONS)}) found')
        super().__init__(paths, labels, transform, on_bad_image, mark_skipped)


    def follow_classes(self, names):
        """The labels of the class folders as indices in `names` (a checkpoint's classes),
        when every folder is one of them (evaluating on some of a model's classes)."""
        names = list(names)
        if not self.classes or not set(self.classes) <= set(names):
            return False
        table = np.array([names.index(c) for c in self.classes], np.int64)
        known = self.labels >= 0
        self.labels[known] = table[self.labels[known]]
        self.classes = names
        return True


def listed_classes(folder):
    """The names in folder/classes.txt (classnames.py), or None without one."""
    path = os.path.join(folder, classnames.CLASSES_FILE)
    if not os.path.isfile(path):
        return None
    try:
        return classnames.read_classes(path)
    except classnames.ClassFileError as e:
        raise DataError(str(e)) from None


def check_class_count(where, names, num_classes):
    """DataError when a source names another number of classes than MODEL.NUM_CLASSES."""
    if names and num_classes is not None and len(names) != num_classes:
        raise DataError(f'{where} names {len(names)} classes but MODEL.NUM_CLASSES is '
                        f'{num_classes}: set -opts MODEL.NUM_CLASSES {len(names)}')


def class_folders(root):
    """The sorted names of root's class sub-folders, hidden ones left out."""
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith('.'))


def _names(classes, most=10):
    shown = ', '.join(classes[:most])
    return shown + (f', ... ({len(classes)} in all)' if len(classes) > most else '')


def _images_under(folder):
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith('.'))
        found += [os.path.join(dirpath, f) for f in sorted(filenames)
                  if f.lower().endswith(IMG_EXTENSIONS) and not f.startswith('.')]
    return found


def source_args(config, is_train, transform, need_labels):
    """The constructor arguments that list-file and folder sources take from the config."""
    d = config.DATA
    return dict(transform=transform, require_labels=need_labels,
                num_classes=config.MODEL.NUM_CLASSES if need_labels else None,
                on_bad_image=d.ON_BAD_IMAGE, mark_skipped=not is_train)


def list_file_of(config, is_train):
    """-> (DATA_PATH/<list file>, its config key) of the split."""
    d = config.DATA
    name, key = (d.TRAIN_LIST, 'TRAIN_LIST') if is_train else (d.VAL_LIST, 'VAL_LIST')
    return os.path.join(d.DATA_PATH, name), f'DATA.{key}'


# ------------------------------------------------------------------------------------- loaders

class TrainBatchSampler(DistributedBatchSampler):
    """Shuffled batches of one process out of `num_replicas`.

    Epoch e's order is a permutation drawn from (seed, e), identical on every process, padded
    by wrapping around to a multiple of num_replicas; process r takes positions r, r + R, ...
    of it. So global batch k (positions k*B*R to (k+1)*B*R - 1) is the batch k of one process
    with batch B*R: R processes see the same global batches as one process, and all processes
    get the same number of batches (so 1 and R processes take the same optimizer steps).
    set_epoch(e, k) fixes the epoch (a resumed run gets the same order) and makes the next pass
    start at batch k (resuming mid-epoch; len() stays the full epoch's). A full pass moves on
    to the next epoch by itself, so forgetting set_epoch does not repeat one order forever.

    samples_per_epoch (TRAIN.ITERS_PER_EPOCH: an iteration budget, mmsegmentation's habit):
    the passes' permutations (pass p drawn from (seed, p)) are laid end to end as one stream,
    and epoch e is its positions [e * S, (e + 1) * S), S = samples_per_epoch over all
    processes (a multiple of num_replicas * batch_size). 0: an epoch is one pass.
    """

    def __init__(self, dataset, batch_size, num_replicas=None, rank=None, seed=0,
                 drop_last=True, samples_per_epoch=0):
        super().__init__(dataset, batch_size, num_replicas=num_replicas, rank=rank,
                         shuffle=True, drop_last=drop_last)
        self.seed = seed
        self.start_batch = 0
        self.samples_per_epoch = samples_per_epoch
        if samples_per_epoch:
            self.total_size = samples_per_epoch
            self.num_samples = samples_per_epoch // self.nranks

    def set_epoch(self, epoch, start_batch=0):
        self.epoch = epoch
        self.start_batch = start_batch

    def indices(self):
        """This process's sample indices for the current epoch, in order."""
        n = len(self.dataset)
        if self.samples_per_epoch:
            start = self.epoch * self.samples_per_epoch
            stop = start + self.samples_per_epoch
            order = np.concatenate([utils.rng(self.seed, p, 'order').permutation(n)
                                    for p in range(start // n, (stop - 1) // n + 1)])
            order = order[start - start // n * n:][:self.samples_per_epoch]
        else:
            order = utils.rng(self.seed, self.epoch, 'order').permutation(n)
            order = np.resize(order, self.total_size)  # wrap-around padding
        return order[self.local_rank::self.nranks]

    def __iter__(self):
        mine = self.indices().tolist()
        stop = len(mine) - len(mine) % self.batch_size if self.drop_last else len(mine)
        first, self.start_batch = self.start_batch * self.batch_size, 0
        for start in range(first, stop, self.batch_size):
            yield mine[start:start + self.batch_size]
        self.epoch += 1

    def __len__(self):
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)


class EvalBatchSampler(DistributedBatchSampler):
    """Evaluation batches in which every sample is seen by exactly one process once: process
    r of R takes the contiguous shard [r*n//R, (r+1)*n//R), no padding, last batch short."""

    def __init__(self, dataset, batch_size, num_replicas=None, rank=None):
        super().__init__(dataset, batch_size, num_replicas=num_replicas, rank=rank,
                         shuffle=False, drop_last=False)
        n = len(dataset)
        self.shard = (self.local_rank * n // self.nranks, (self.local_rank + 1) * n // self.nranks)
        self.num_samples = self.shard[1] - self.shard[0]

    def set_epoch(self, epoch, start_batch=0):
        self.epoch = epoch  # evaluation is the same every epoch; kept for a uniform interface

    def __iter__(self):
        lo, hi = self.shard
        for start in range(lo, hi, self.batch_size):
            yield list(range(start, min(start + self.batch_size, hi)))

    def __len__(self):
        return math.ceil(self.num_samples / self.batch_size)


class _WorkerInit:
    """worker_init_fn of every loader. Each worker: dies with the process that owns it (after a
    `kill -9` of the training process no worker lingers), leaves Ctrl-C and SIGTERM to that
    process (which saves and stops cleanly), and -- training -- seeds its RNGs from (seed,
    sampler's epoch, rank, worker id), for datasets without per-sample seeding (ImageDataset
    reseeds per sample on top). Workers start when the loader is iterated, i.e. after
    set_epoch, so they see the epoch."""

    def __init__(self, sampler, seed, rank, train):
        self.sampler, self.seed, self.rank, self.train = sampler, seed, rank, train

    def __call__(self, worker_id):
        utils.die_with_parent()
        for sig in (signal.SIGINT, signal.SIGTERM):  # the owner stops; workers die with it
            signal.signal(sig, signal.SIG_IGN)
        if self.train:
            utils.seed_everything(self.seed, self.sampler.epoch, self.rank, worker_id,
                                  include_paddle=False)


class EpochDataLoader(DataLoader):
    """paddle.io.DataLoader with set_epoch(epoch, start_batch=0), per-sample augmentation seeds
    for training, and errors of the data raised in the calling thread.

    With NUM_WORKERS 0 the batches are loaded in the calling thread: Paddle's single-process
    loader reads in a background thread, where an exception leaves the caller waiting forever
    (Paddle 2.6 and 3.3) and whose draws from the global RNGs would race with the training
    loop's. With workers, errors are recorded by the dataset and raised here (see
    ImageDataset.loader_error).
    """

    def __init__(self, dataset, batch_sampler, num_workers, seed, rank, train):
        # batch_sampler None: an iterable dataset that plans its own batches (shards.ShardStream:
        # set_epoch, num_batches, batch_size); it then also keeps the epoch
        self._epochs = batch_sampler if batch_sampler is not None else dataset
        # a dataset of samples default_collate cannot stack (segmentation's evaluation images
        # of different sizes) names its own collate_fn
        batching = (dict(batch_sampler=batch_sampler) if batch_sampler is not None else
                    dict(batch_size=dataset.batch_size, drop_last=False))
        super().__init__(dataset, num_workers=num_workers,
                         worker_init_fn=_WorkerInit(self._epochs, seed, rank, train),
                         collate_fn=dataset.collate_fn, return_list=True,
                         **batching)
        self._seed, self._train = seed, train

    def set_epoch(self, epoch, start_batch=0):
        self._epochs.set_epoch(epoch, start_batch)

    def __len__(self):
        if self._epochs is self.dataset:
            return self.dataset.num_batches()
        return super().__len__()

    def __iter__(self):
        if self._train:  # before the workers start, so they inherit the seed
            self.dataset.set_augment_seed(self._seed, self._epochs.epoch)
        if self.num_workers == 0:
            return self._batches_in_this_thread()
        # A finished Paddle loader iterator lingers in a reference cycle. Left to the cyclic
        # garbage collector of a forked worker, its C++ destructor destroys a condition
        # variable copied from this process and the worker hangs (seen with Paddle 2.6:
        # pthread_cond_destroy under gc in _worker_loop). Collect such garbage here, first.
        gc.collect()
        self.dataset.begin_loading()
        return self._raising_recorded_errors(super().__iter__())

    def _batches_in_this_thread(self):
        if self._epochs is self.dataset:  # an iterable dataset: cut its stream into batches
            samples = iter(self.dataset)
            groups = iter(lambda: list(itertools.islice(samples, self.dataset.batch_size)), [])
        else:
            groups = ([self.dataset[i] for i in indices] for indices in self.batch_sampler)
        for group in groups:
            batch = (self.collate_fn or default_collate_fn)(group)
            yield [paddle.to_tensor(field) if isinstance(field, np.ndarray) else field
                   for field in batch]

    def _raising_recorded_errors(self, batches):
        """Yield batches; raise a recorded error before yielding the batch it spoiled."""
        finished = False
        try:
            try:
                for batch in batches:
                    self._raise_recorded_error()
                    yield batch
            except Exception:
                self._raise_recorded_error()  # the cause, rather than Paddle's SystemError
                raise
            finished = True
            self._raise_recorded_error()
        finally:
            if not finished:  # error or early exit: stop Paddle's reader thread and workers now,
                # before errors stop being deferred (Paddle 2.6 and 3.x both have this method)
                shutdown = getattr(batches, '_try_shutdown_all', None)
                if shutdown is not None:
                    shutdown()
            self.dataset.end_loading()

    def _raise_recorded_error(self):
        error = self.dataset.loader_error()
        if error is not None:
            raise error from None


def build_loader(config, dataset, is_train, num_replicas=None, rank=None):
    """Loader of `dataset` for this process (rank/num_replicas: Paddle's distributed env).

    Training: DATA.BATCH_SIZE, shuffled from (SEED, epoch), drop_last, seeded workers; call
    loader.set_epoch(epoch) before each epoch. An epoch is one pass, or TRAIN.ITERS_PER_EPOCH
    optimizer steps (x ACCUM_ITER batches) out of a stream of passes. Evaluation:
    DATA.BATCH_SIZE_EVAL, each image on exactly one process. Batches are (images float32
    [B, 3, H, W], labels int64 [B], sample ids int64 [B]).
    """
    if num_replicas is None:
        num_replicas = paddle.distributed.get_world_size()
    if rank is None:
        rank = paddle.distributed.get_rank()
    if dataset.streamed:  # an iterable source plans its own batches (DataSource)
        dataset.configure(config.DATA.BATCH_SIZE if is_train else config.DATA.BATCH_SIZE_EVAL,
                          rank, num_replicas, config.DATA.NUM_WORKERS)
        if is_train and dataset.num_batches() == 0:
            raise DataError(f'{len(dataset)} training images make no full batch of '
                            f'DATA.BATCH_SIZE {config.DATA.BATCH_SIZE} on each of '
                            f'{num_replicas} processes')
        return EpochDataLoader(dataset, None, config.DATA.NUM_WORKERS, config.SEED, rank,
                               train=is_train)
    if is_train:
        per_epoch = (config.TRAIN.ITERS_PER_EPOCH * config.TRAIN.ACCUM_ITER *
                     config.DATA.BATCH_SIZE * num_replicas)
        sampler = TrainBatchSampler(dataset, config.DATA.BATCH_SIZE, num_replicas=num_replicas,
                                    rank=rank, seed=config.SEED, drop_last=True,
                                    samples_per_epoch=per_epoch)
        if len(sampler) == 0:
            raise DataError(f'{len(dataset)} training images make no full batch of '
                            f'DATA.BATCH_SIZE {config.DATA.BATCH_SIZE} on each of '
                            f'{num_replicas} processes')
    else:
        sampler = EvalBatchSampler(dataset, config.DATA.BATCH_SIZE_EVAL,
                                   num_replicas=num_replicas, rank=rank)
    return EpochDataLoader(dataset, sampler, config.DATA.NUM_WORKERS, config.SEED, rank,
                           train=is_train)
