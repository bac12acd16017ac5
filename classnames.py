"""Class names shipped with the project, in classnames/ (one class a line, label 0 first):

    imagenet1k.txt  the 1000 ImageNet-1k classes in the official order (the sorted WordNet ids,
                    the order of the released classifiers), '<wnid>\t<names>'
    ade20k.txt      the 150 classes of ADE20K's SceneParsing benchmark (label after
                    reduce-zero-label), mmsegmentation's ADE20KDataset order

A checkpoint's class identity for ImageNet is the WordNet id (what class folders are named);
display() turns such ids into the words people read.

Class identity (DESIGN.md): every data source states the names of its labels (label i =
names[i]) and every checkpoint carries the names it was trained with; `mismatch` is the one
comparison. A data set states them in a `classes.txt` (CLASSES_FILE): one class a line in label
order, `name` or `name<TAB>description` (the name is the identity; prepare_imagenet.py writes
`wnid<TAB>words`). `canonical` turns ImageNet-1k's words (HF's label names) into the WordNet
ids, so both spellings of ImageNet compare equal.
"""
import functools
import os

CLASSES_FILE = 'classes.txt'

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


def canonical(names):
    """names as the identity they stand for: when every name is the words of an ImageNet-1k
    class (the second column of imagenet1k.txt, HF's label names), the WordNet ids, in the
    names' order (the two classes both called 'crane' in the order they come); anything else
    unchanged."""
    if names is None:
        return None
    names = list(names)
    ids = {}
    for wnid, words in imagenet1k():
        ids.setdefault(words, []).append(wnid)
    seen, out = {}, []
    for name in names:
        k = seen.get(name, 0)
        if k >= len(ids.get(name, ())):
            return names
        out.append(ids[name][k])
        seen[name] = k + 1
    return out


class ClassFileError(ValueError):
    """A classes.txt that cannot be read (str: one line naming the file and line)."""


def read_classes(path):
    """A classes.txt -> the class names in label order (the text before a tab, stripped);
    blank lines and '#' comments skipped. ClassFileError naming the file for a name given
    twice or a file that is not UTF-8."""
    names, first_line = [], {}
    try:
        with open(path, encoding='utf-8-sig') as f:
            lines = list(f)
    except UnicodeDecodeError:
        raise ClassFileError(f'{path}: not UTF-8 text') from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith('#'):
            continue
        name = line.rstrip('\r\n').split('\t', 1)[0].strip()
        if name in first_line:
            raise ClassFileError(f'{path} line {lineno}: the class {name!r} again (first on '
                                 f'line {first_line[name]})')
        first_line[name] = lineno
        names.append(name)
    return names


def write_classes(path, names, descriptions=None):
    """Write a classes.txt (name, or name<TAB>description, a line), through a temporary name."""
    tmp = path + '.tmp'
    with open(tmp, 'w', encoding='utf-8') as f:
        for i, name in enumerate(names):
            extra = descriptions[i] if descriptions else ''
            f.write(f'{name}\t{extra}\n' if extra else f'{name}\n')
    os.replace(tmp, path)


def mismatch(expected, found, expected_is='the checkpoint', found_is='the data', most=3):
    """None when the two class lists mean the same labels (or one side names none);
    otherwise one line saying how they differ: another order, or the first differences."""
    expected, found = canonical(expected), canonical(found)
    if not expected or not found or list(expected) == list(found):
        return None
    a, b = list(expected), list(found)
    if sorted(a) == sorted(b):
        moved = [(i, a[i], b.index(a[i])) for i in range(len(a)) if a[i] != b[i]][:most]
        said = ', '.join(f'{name!r} is label {i} in {expected_is} but {j} in {found_is}'
                         for i, name, j in moved)
        return f'the same {len(a)} classes in another order: {said}'
    if len(a) != len(b):
        head = f'{expected_is} has {len(a)} classes, {found_is} {len(b)}'
    else:
        head = f'the {len(a)} class names differ'
    only_a = [n for n in a if n not in set(b)][:most]
    only_b = [n for n in b if n not in set(a)][:most]
    parts = []
    if only_b:
        parts.append(f'{found_is} has {", ".join(map(repr, only_b))}, which {expected_is} '
                     f'does not')
    if only_a:
        parts.append(f'{expected_is} has {", ".join(map(repr, only_a))}, which {found_is} '
                     f'does not')
    if not parts:  # the same set of names, one of them given twice
        i = next(i for i in range(min(len(a), len(b))) if a[i] != b[i])
        parts.append(f'label {i} is {a[i]!r} in {expected_is}, {b[i]!r} in {found_is}')
    return head + ': ' + '; '.join(parts)
