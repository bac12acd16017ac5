"""Data sources: which class reads the config's data, in one table.

A source is a datasets.DataSource subclass (the contract is written there). The factory asks
the registered sources of the wanted kind, in order, for the data of the config
(`from_config`); the first that finds its data builds the dataset. A new source is a class
plus one `register(...)` line (or call), and nothing else changes: not the loaders, not the
engine, not the tasks.

Order matters: tar shards (DATA.TRAIN_SHARDS / VAL_SHARDS) and parquet files
(DATA.TRAIN_PARQUET / VAL_PARQUET), when set, replace the list files; a list file wins over
class folders.
"""
import os

import parquet_data
import seg_data
import shards
import transforms
import seg_transforms
from datasets import DataError, ImageFolderDataset, ImageListDataset

SOURCES = []  # registered DataSource classes, asked in this order

# the transform a kind of sample gets when the caller hands none
DEFAULT_TRANSFORMS = {'classification': transforms.build_transform,
                      'segmentation': seg_transforms.build_seg_transform}


def register(source, first=False):
    """Add a DataSource class to the table (first: asked before the others)."""
    if source in SOURCES:
        SOURCES.remove(source)
    SOURCES.insert(0 if first else len(SOURCES), source)
    return source


register(shards.ShardStream)
register(shards.ShardDataset)
register(parquet_data.ParquetDataset)
register(ImageListDataset)
register(ImageFolderDataset)
register(seg_data.SegmentationDataset)


def build_dataset(config, is_train, transform=None, need_labels=True,
                  kind='classification'):
    """The training or evaluation dataset of config.DATA: the first source of `kind` that finds
    its data. transform: None gives the kind's default (DEFAULT_TRANSFORMS); need_labels:
    every sample must be labelled (False: pre-training's training set). DataError naming
    DATA.DATA_PATH and what was looked for when no source finds anything."""
    d = config.DATA
    if d.DATA_PATH and not os.path.isdir(d.DATA_PATH):
        raise DataError(f'data folder not found: {d.DATA_PATH} (DATA.DATA_PATH)')
    if transform is None:
        transform = DEFAULT_TRANSFORMS[kind](is_train, config)
    candidates = [s for s in SOURCES if s.kind == kind]
    for source in candidates:
        dataset = source.from_config(config, is_train, transform, need_labels)
        if dataset is not None:
            return dataset
    if not d.DATA_PATH:
        raise DataError('no data folder: set DATA.DATA_PATH (-data_path DIR)')
    looked_for = [what for s in candidates for what in s.expected(config, is_train)]
    raise DataError(f'{d.DATA_PATH}: found neither ' + ' nor '.join(looked_for))
