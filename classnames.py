"""Class names shipped with the project, in classnames/ (one class a line, label 0 first):

    imagenet1k.txt  the 1000 ImageNet-1k classes in the official order (the sorted WordNet ids,
                    the order of the released classifiers), '<wnid>\t<names>'
    ade20k.txt      the 150 classes of ADE20K's SceneParsing benchmark (label after
                    reduce-zero-label), mmsegmentation's ADE20KDataset order

A checkpoint's class identity for ImageNet is the WordNet id (what class folders are named);
display() turns such ids into the words people read.
"""
import functools
import os

FOLDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'classnames')


def _lines(name):
    with open(os.path.join(FOLDER, name), encoding='utf-8') as f:
        return [line.rstrip('\n') for line in f if line.strip()]


@functools.lru_cache(maxsize=None)
def imagenet1k():
    """-> ((wnid, names), ...) for the 1000 classes, in label order."""
    return tuple(tuple(line.split('\t', 1)) for line in _lines('imagenet1k.txt'))


def imagenet1k_wnids():
    return [wnid for wnid, _ in imagenet1k()]


@functools.lru_cache(maxsize=None)
def ade20k():
    """-> the 150 ADE20K class names, in label order."""
    return tuple(_lines('ade20k.txt'))


def display(classes):
    """Class names as printed: an ImageNet WordNet id becomes its first name ('n01440764' ->
    'tench'); any other name stays as it is."""
    words = {wnid: names.split(',')[0] for wnid, names in imagenet1k()}
    return [words.get(c, c) for c in classes]
