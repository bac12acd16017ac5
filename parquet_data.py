"""Parquet files as a data source (DATA.TRAIN_PARQUET / DATA.VAL_PARQUET): the layout every
HuggingFace image-classification dataset is distributed in (ILSVRC/imagenet-1k's
data/{train,validation}-*.parquet among them), read with pyarrow, an optional dependency that
only this source needs.

Layout: an image column (DATA.PARQUET_IMAGE_COLUMN, 'image') that is HF's Image struct
{bytes, path} or plain binary, holding the encoded file; an integer label column
(DATA.PARQUET_LABEL_COLUMN, 'label'), needed except for pre-training. Class names come from the
dataset's own metadata: the `huggingface` features stored in the parquet schema (ClassLabel
names), else the `dataset_info` of a README.md dataset card beside the files or above them,
else a classes.txt (classnames.py) beside the first file.

A sample id is the row's global position (file order of the expanded patterns x row order):
it seeds the sample's augmentation and its pre-training mask, so the source meets the
contract of datasets.DataSource as a map-style ImageDataset -- 1 process = N processes, exact
mid-epoch resume, evaluation counting each row once -- with every sampler and error path of
datasets.py unchanged. Labels are read whole when the source is built (one small column);
images are read by row group (parquet's unit of reading) and each process keeps the last
CACHED_GROUPS groups it read: evaluation, whose batches are contiguous rows, reads each group
about once; a shuffled training epoch reads a group for nearly every sample once the data are
larger than the cache (tar shards, shards.py, are the layout for training at ImageNet scale).

Bad rows are handled as bad images are (DATA.ON_BAD_IMAGE): a null or undecodable image is a
BadImageError naming the file and row, or skipped and counted. A null label, a label outside
0..MODEL.NUM_CLASSES-1, a missing column, a file that is not parquet: one DataError line.
"""
import collections
import glob
import io
import json
import os

import numpy as np
import yaml
from PIL import UnidentifiedImageError

try:  # optional: only this source needs it (a missing one is one line when it is used)
    import pyarrow as pa
    import pyarrow.parquet as pq
except ImportError:
    pa = pq = None

import datasets
from datasets import DataError

CACHED_GROUPS = 8  # row groups kept per process (HF writes ~100 images a group: ~10 MB each)
README = 'README.md'


def expand(pattern, root, key_name):
    """The files of a DATA.*_PARQUET value: glob patterns joined by '::', each relative to root
    (DATA.DATA_PATH) or absolute, sorted within a pattern; one that matches nothing is a
    DataError naming the key."""
    files = []
    for part in pattern.split('::'):
        part = part.strip()
        if not part:
            continue
        path = os.path.expanduser(part)
        if not os.path.isabs(path):
            if not root:
                raise DataError(f'{key_name}: the pattern {part!r} is relative but '
                                f'DATA.DATA_PATH is not set (-data_path DIR); or give an '
                                f'absolute path')
            path = os.path.join(root, path)
        found = sorted(f for f in glob.glob(path) if os.path.isfile(f))
        if not found:
            raise DataError(f'{key_name}: no file matches {path}')
        files += found
    if not files:
        raise DataError(f'{key_name}: empty pattern')
    return files


# ---------------------------------------------------------------------------- class names

def hf_feature_names(schema, label_column):
    """ClassLabel names of label_column from the `huggingface` schema metadata, or None."""
    raw = (schema.metadata or {}).get(b'huggingface')
    if not raw:
        return None
    try:
        feature = json.loads(raw).get('info', {}).get('features', {}).get(label_column, {})
    except (ValueError, AttributeError):
        return None
    names = feature.get('names') if isinstance(feature, dict) else None
    return list(names) if names else None


def card_names(path, label_column):
    """ClassLabel names of label_column from a dataset card's YAML header (`dataset_info`:
    one mapping or a list of them, one per config; features as a list of {name, dtype}), or
    None."""
    try:
        with open(path, encoding='utf-8') as f:
            text = f.read()
    except (OSError, UnicodeDecodeError):
        return None
    if not text.startswith('---'):
        return None
    head = text[3:].split('\n---', 1)[0]
    try:
        info = (yaml.safe_load(head) or {}).get('dataset_info')
    except (yaml.YAMLError, AttributeError):
        return None
    for entry in info if isinstance(info, list) else [info]:
        features = entry.get('features') if isinstance(entry, dict) else None
        for feature in features if isinstance(features, list) else []:
            if not isinstance(feature, dict) or feature.get('name') != label_column:
                continue
            dtype = feature.get('dtype')
            names = dtype.get('class_label', {}).get('names') if isinstance(dtype, dict) else None
            if isinstance(names, dict):
                return [str(names[k]) for k in sorted(names, key=int)]
            if isinstance(names, list):
                return [str(n) for n in names]
    return None


def class_names(first_file, schema, label_column, root):
    """The dataset's class names (see the module docstring), or None."""
    names = hf_feature_names(schema, label_column)
    if names:
        return names
    folder = os.path.dirname(os.path.abspath(first_file))
    top = os.path.abspath(root) if root else folder
    while True:
        card = os.path.join(folder, README)
        if os.path.isfile(card):
            names = card_names(card, label_column)
            if names:
                return names
        if folder == top or os.path.dirname(folder) == folder or \
                not folder.startswith(top):
            break
        folder = os.path.dirname(folder)
    return datasets.listed_classes(os.path.dirname(os.path.abspath(first_file)))


# ------------------------------------------------------------------------------ row groups

class RowGroups:
    """The image column of recently read row groups, per process (a worker opens its own
    files: pyarrow handles are not shared across fork)."""

    def __init__(self, image_column, most=CACHED_GROUPS):
        self.image_column, self.most = image_column, most
        self._files, self._groups, self._pid = {}, collections.OrderedDict(), None

    def column(self, path, group):
        if self._pid != os.getpid():
            self._files, self._groups, self._pid = {}, collections.OrderedDict(), os.getpid()
        key = (path, group)
        if key in self._groups:
            self._groups.move_to_end(key)
            return self._groups[key]
        pf = self._files.get(path)
        if pf is None:
            pf = self._files[path] = pq.ParquetFile(path)
        column = pf.read_row_group(group, columns=[self.image_column]).column(0).combine_chunks()
        self._groups[key] = column
        while len(self._groups) > self.most:
            self._groups.popitem(last=False)
        return column

    def __getstate__(self):  # a spawned worker starts with nothing open
        return {'image_column': self.image_column, 'most': self.most, '_files': {},
                '_groups': collections.OrderedDict(), '_pid': None}


def _is_binary(t):
    return pa.types.is_binary(t) or pa.types.is_large_binary(t)


def _image_type_problem(t):
    """None when an arrow type can hold encoded images (HF Image struct or binary)."""
    if _is_binary(t):
        return None
    if pa.types.is_struct(t):
        index = t.get_field_index('bytes')
        if index >= 0 and _is_binary(t.field(index).type):
            return None
    return f'{t} (expected binary, or a struct with a binary field "bytes" as HF Image)'


# --------------------------------------------------------------------------------- dataset

class ParquetDataset(datasets.ImageDataset):
    """Rows of parquet files -> (float32 image, int64 label, int64 sample id = the row's global
    position). files: expand()'s list; need_labels: every row needs a label (else a missing
    label column gives IGNORE_LABEL); num_classes: labels must be below it; root: DATA_PATH
    (where a dataset card is looked for); key_name: the config key, for messages. The other
    arguments are ImageDataset's."""

    def __init__(self, files, transform=None, need_labels=True, num_classes=None,
                 on_bad_image='error', mark_skipped=False, image_column='image',
                 label_column='label', root='', key_name='DATA.TRAIN_PARQUET'):
        if pq is None:
            raise DataError(f'{key_name}: reading parquet files needs the pyarrow package '
                            f'(pip install pyarrow)')
        self.files = list(files)
        file_starts, group_starts, labels, schema = [0], [], [], None
        for path in self.files:
            try:
                pf = pq.ParquetFile(path)
            except (pa.ArrowException, OSError) as e:
                raise DataError(f'{path}: not a parquet file ({datasets.explain(e)}) '
                                f'({key_name})') from None
            if schema is None:
                schema = pf.schema_arrow
            labels.append(self._file_labels(pf, path, image_column, label_column,
                                            need_labels, num_classes))
            sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)]
            group_starts.append(np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64))
            file_starts.append(file_starts[-1] + pf.metadata.num_rows)
        if file_starts[-1] == 0:
            raise DataError(f'{key_name}: the parquet files ({self.files[0]} ...) hold no rows')
        self._file_starts = np.asarray(file_starts, np.int64)
        self._group_starts = group_starts
        self._groups = RowGroups(image_column)
        self.classes = class_names(self.files[0], schema, label_column, root)
        if need_labels:
            datasets.check_class_count(f'{self.files[0]}: the dataset', self.classes, num_classes)
        super().__init__([], np.concatenate(labels), transform, on_bad_image, mark_skipped)

    @staticmethod
    def _file_labels(pf, path, image_column, label_column, need_labels, num_classes):
        """One file's labels (IGNORE_LABEL without a label column), its columns checked."""
        schema = pf.schema_arrow
        columns = ', '.join(schema.names)
        if image_column not in schema.names:
            raise DataError(f'{path}: no column {image_column!r} (DATA.PARQUET_IMAGE_COLUMN); '
                            f'its columns: {columns}')
        problem = _image_type_problem(schema.field(image_column).type)
        if problem:
            raise DataError(f'{path}: the column {image_column!r} holds {problem}')
        if label_column not in schema.names:
            if need_labels:
                raise DataError(f'{path}: no column {label_column!r} '
                                f'(DATA.PARQUET_LABEL_COLUMN); its columns: {columns}')
            return np.full(pf.metadata.num_rows, datasets.IGNORE_LABEL, np.int64)
        column = pf.read(columns=[label_column]).column(0)
        if not pa.types.is_integer(column.type):
            raise DataError(f'{path}: the label column {label_column!r} holds {column.type}, '
                            f'not integers (DATA.PARQUET_LABEL_COLUMN)')
        values = column.to_numpy(zero_copy_only=False) if column.null_count == 0 else None
        if values is None:
            if need_labels:
                row = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
                raise DataError(f'{path} row {row}: no label ({label_column!r} is null)')
            values = column.fill_null(datasets.IGNORE_LABEL).to_numpy(zero_copy_only=False)
        values = values.astype(np.int64)
        if need_labels:
            bad = np.flatnonzero((values < 0) | (values >= num_classes if num_classes is not None
                                                 else False))
            if len(bad):
                top = (f'{num_classes - 1} (MODEL.NUM_CLASSES {num_classes})'
                       if num_classes is not None else 'the number of classes - 1')
                raise DataError(f'{path} row {int(bad[0])}: label {int(values[bad[0]])} is '
                                f'outside 0..{top}')
        return values

    @classmethod
    def from_config(cls, config, is_train, transform, need_labels):
        key = 'TRAIN_PARQUET' if is_train else 'VAL_PARQUET'
        d = config.DATA
        if not d[key]:
            return None
        files = expand(d[key], d.DATA_PATH, f'DATA.{key}')
        return cls(files, transform=transform, need_labels=need_labels,
                   num_classes=config.MODEL.NUM_CLASSES if need_labels else None,
                   on_bad_image=d.ON_BAD_IMAGE, mark_skipped=not is_train,
                   image_column=d.PARQUET_IMAGE_COLUMN, label_column=d.PARQUET_LABEL_COLUMN,
                   root=d.DATA_PATH, key_name=f'DATA.{key}')

    @classmethod
    def expected(cls, config, is_train):
        """Said only when the data folder holds parquet files the config does not name."""
        root = config.DATA.DATA_PATH
        found = sorted(glob.glob(os.path.join(root, '*.parquet')) +
                       glob.glob(os.path.join(root, '*', '*.parquet'))) if root else []
        if not found:
            return []
        key = 'TRAIN_PARQUET' if is_train else 'VAL_PARQUET'
        return [f'parquet files named by DATA.{key} (it holds '
                f'{os.path.relpath(found[0], root)}{" ..." if len(found) > 1 else ""}: '
                f"-opts DATA.{key} 'PATTERN')"]

    def __len__(self):
        return int(self._file_starts[-1])

    def locate(self, index):
        """Sample id -> (file number, row group, row in the group, row in the file)."""
        f = int(np.searchsorted(self._file_starts, index, 'right')) - 1
        row = int(index) - int(self._file_starts[f])
        starts = self._group_starts[f]
        g = int(np.searchsorted(starts, row, 'right')) - 1
        return f, g, row - int(starts[g]), row

    def path(self, index):
        f, _, _, row = self.locate(index)
        return f'{self.files[f]}:{row}'

    def describe(self, index):
        f, _, _, row = self.locate(index)
        return f'{self.files[f]} row {row}'

    def read_bytes(self, index):
        """Sample `index`'s encoded image, as stored. OSError for a null image."""
        f, g, r, _ = self.locate(index)
        value = self._groups.column(self.files[f], g)[r]
        if not value.is_valid:
            raise OSError('the image is null')
        if isinstance(value, pa.StructScalar):
            data = value['bytes'].as_py()
            if data is None:  # HF Image that stores a path only: relative to the file
                where = value['path'].as_py() if 'path' in value.keys() else None
                if not where:
                    raise OSError('the image has neither bytes nor a path')
                with open(os.path.join(os.path.dirname(self.files[f]), where), 'rb') as fh:
                    return fh.read()
            return data
        return value.as_py()

    def read_image(self, index):
        try:
            return datasets.decode_image(io.BytesIO(self.read_bytes(index)))
        except UnidentifiedImageError:  # (PIL's message names a BytesIO object)
            raise OSError('its bytes are not an image of a format PIL knows') from None
