"""Datasets: list parsing, folders, awkward and broken images in both ON_BAD_IMAGE modes."""
import os
import signal

import numpy as np
import pytest
from PIL import Image

import helpers as H
import datasets
import sources
import tasks
from datasets import BadImageError, DataError


@pytest.fixture(scope='module')
def awkward(tmp_path_factory):
    return H.write_awkward_images(str(tmp_path_factory.mktemp('awkward')))


@pytest.fixture(scope='module')
def broken(tmp_path_factory):
    return H.write_broken_images(str(tmp_path_factory.mktemp('broken')))


def make_root(tmp_path, n_good=4, bad=(), classes=3):
    """tmp_path/img/good_i.png (+ bad files) and train_list.txt / val_list.txt listing them,
    labels i % classes. Returns (root, list of relative paths in list order)."""
    os.makedirs(tmp_path / 'img', exist_ok=True)
    rel = []
    for i in range(n_good):
        H.photo('coffee.png', (40 + i, 30)).save(tmp_path / 'img' / f'good_{i}.png')
        rel.append(f'img/good_{i}.png')
    rel += list(bad)
    lines = [f'{p} {i % classes}' for i, p in enumerate(rel)]
    H.write_list(tmp_path / 'train_list.txt', lines)
    H.write_list(tmp_path / 'val_list.txt', lines)
    return str(tmp_path), rel


# ------------------------------------------------------------------------------ list files

def test_list_file_with_labels_comments_and_blank_lines(tmp_path):
    H.write_list(tmp_path / 'l.txt', ['# header', 'a/x.jpg 0', '', '  b/y.JPEG   7  ', 'c.png 3'])
    ds = datasets.ImageListDataset('/data', str(tmp_path / 'l.txt'), num_classes=10)
    assert len(ds) == 3
    assert [ds.path(i) for i in range(3)] == ['/data/a/x.jpg', '/data/b/y.JPEG', '/data/c.png']
    assert ds.labels.tolist() == [0, 7, 3]
    assert ds.describe(1) == f"/data/b/y.JPEG ({tmp_path / 'l.txt'} line 4)"


def test_unlabelled_lines_allowed_for_pretraining(tmp_path):
    H.write_list(tmp_path / 'l.txt', ['a.jpg', 'b.jpg 2'])
    ds = datasets.ImageListDataset('/d', str(tmp_path / 'l.txt'), require_labels=False)
    assert ds.labels.tolist() == [datasets.IGNORE_LABEL, 2]


@pytest.mark.parametrize('lines,bad_line,fragment', [
    (['a.jpg 0', 'b.jpg cat'], 2, "label 'cat' is not an integer"),
    (['a.jpg 0', '', 'b.jpg'], 3, 'no label after the path'),
    (['a.jpg 0', 'my file.jpg 1'], 2, 'no spaces in the path'),
    (['a.jpg -1'], 1, 'label -1 is outside 0..9'),
    (['a.jpg 0', 'b.jpg 10'], 2, 'label 10 is outside 0..9 (MODEL.NUM_CLASSES 10)'),
])
def test_malformed_lines_name_file_and_line(tmp_path, lines, bad_line, fragment):
    path = H.write_list(tmp_path / 'train_list.txt', lines)
    with pytest.raises(DataError) as e:
        datasets.ImageListDataset('/d', str(path), num_classes=10)
    assert f'{path} line {bad_line}' in str(e.value) and fragment in str(e.value)


def test_non_utf8_empty_and_missing_lists(tmp_path):
    (tmp_path / 'bin.txt').write_bytes(b'a.jpg 0\n\xff\xfe.jpg 1\n')
    with pytest.raises(DataError, match=r'bin.txt line 2: not UTF-8'):
        datasets.ImageListDataset('/d', str(tmp_path / 'bin.txt'))
    H.write_list(tmp_path / 'empty.txt', ['# nothing'])
    with pytest.raises(DataError, match=r'empty.txt: lists no images'):
        datasets.ImageListDataset('/d', str(tmp_path / 'empty.txt'))
    with pytest.raises(DataError, match=r'image list not found: .*nope.txt'):
        datasets.ImageListDataset('/d', str(tmp_path / 'nope.txt'))


def test_a_byte_order_mark_is_not_part_of_the_first_path(tmp_path):
    (tmp_path / 'l.txt').write_bytes(b'\xef\xbb\xbfa/x.jpg 0\nb.jpg 1\n')
    ds = datasets.ImageListDataset('/data', str(tmp_path / 'l.txt'), num_classes=2)
    assert [ds.path(i) for i in range(2)] == ['/data/a/x.jpg', '/data/b.jpg']
    (tmp_path / 'm.txt').write_bytes(b'\xef\xbb\xbf# a comment first\nb.jpg 1\n')
    assert len(datasets.ImageListDataset('/data', str(tmp_path / 'm.txt'))) == 1


def test_duplicate_paths_are_refused_with_count_and_lines(tmp_path):
    path = H.write_list(tmp_path / 'train_list.txt', [
        'a.jpg 0', 'b.jpg 1', '# c.jpg 1', 'c.jpg 1', './b.jpg 2', 'd.jpg 0', 'c.jpg 1',
        'b.jpg 1'])
    with pytest.raises(DataError) as e:
        datasets.ImageListDataset('/d', str(path), num_classes=3)
    assert str(e.value) == (f'{path}: 3 duplicate line(s), an image listed more than once; the '
                            f'first: b.jpg on lines 2 and 5. List each image once')
    assert 'ON_BAD_IMAGE' not in str(e.value)
    many = H.write_list(tmp_path / 'many.txt', [f'img/{i}.png {i % 7}' for i in range(5000)])
    assert len(datasets.ImageListDataset('/d', str(many), num_classes=7)) == 5000


@pytest.mark.parametrize('lines,fragment', [
    (['img/good_0.png 0', 'img/good_1.png 3'], 'label 3 is outside 0..2'),
    (['img/good_0.png 0', 'img/good 1.png 1'], 'no spaces in the path'),
    (['img/good_0.png 0', 'img/good_0.png 1'], 'duplicate line'),
])
def test_skip_is_offered_for_unreadable_images_only(tmp_path, lines, fragment):
    """Skipping would not help a mistake in the list: the message does not offer it."""
    root, _ = make_root(tmp_path, n_good=2)
    H.write_list(tmp_path / 'train_list.txt', lines)
    cfg = H.tiny_config('finetune', DATA__DATA_PATH=root, MODEL__NUM_CLASSES=3)
    with pytest.raises(DataError) as e:
        sources.build_dataset(cfg, True)
    assert fragment in str(e.value) and 'ON_BAD_IMAGE' not in str(e.value)
    cfg = H.tiny_config('finetune', DATA__DATA_PATH=root, DATA__TRAIN_LIST='nope.txt')
    with pytest.raises(DataError) as e:
        sources.build_dataset(cfg, True)
    assert 'nope.txt' in str(e.value) and 'ON_BAD_IMAGE' not in str(e.value)


def test_a_wrong_path_prefix_is_named_not_offered_to_skip(tmp_path):
    root, rel = make_root(tmp_path, n_good=5)
    path = H.write_list(tmp_path / 'train_list.txt', [f'data/{p} 0' for p in rel])
    cfg = H.tiny_config('finetune', DATA__DATA_PATH=root)
    ds = sources.build_dataset(cfg, True)
    with pytest.raises(DataError) as e:
        ds[2]
    assert str(e.value).startswith(f'image not found: {root}/data/img/good_2.png ({path} line 3),'
                                   f' and none of 4 other listed images tried exists either')
    assert f'do not lead to images under {root} (DATA.DATA_PATH)' in str(e.value)
    assert not isinstance(e.value, BadImageError) and 'ON_BAD_IMAGE' not in str(e.value)
    os.remove(tmp_path / 'img' / 'good_2.png')  # one image missing among others: skip offered
    H.write_list(tmp_path / 'train_list.txt', [f'{p} 0' for p in rel])
    with pytest.raises(BadImageError, match='or set DATA.ON_BAD_IMAGE skip'):
        sources.build_dataset(cfg, True)[2]


# ---------------------------------------------------------------------- folders, build_dataset

def test_class_folders(tmp_path):
    for cls, n in (('b_dog', 2), ('a_cat', 3)):
        os.makedirs(tmp_path / 'train' / cls / 'sub')
        for i in range(n):
            H.noise_image(8, 8, i).save(tmp_path / 'train' / cls / 'sub' / f'{i}.JPEG')
    (tmp_path / 'train' / 'a_cat' / 'notes.txt').write_text('not an image')
    cfg = H.tiny_config('finetune', DATA__DATA_PATH=str(tmp_path), MODEL__NUM_CLASSES=2)
    ds = sources.build_dataset(cfg, is_train=True)
    assert isinstance(ds, datasets.ImageFolderDataset)
    assert ds.classes == ['a_cat', 'b_dog'] and ds.labels.tolist() == [0, 0, 0, 1, 1]
    image, label, sample_id = ds[4]
    assert image.shape == (3, 32, 32) and image.dtype == np.float32 and label == 1
    assert sample_id == 4


def _folders(root, split, classes, n=1):
    for cls in classes:
        os.makedirs(root / split / cls, exist_ok=True)
        for i in range(n):
            H.noise_image(8, 8, i).save(root / split / cls / f'{i}.png')


def test_val_folders_get_the_training_class_map(tmp_path):
    """A val/ without one of train/'s classes must not shift the later labels; hidden folders
    (a notebook's checkpoints) are no class and hold no images."""
    _folders(tmp_path, 'train', ['circle', 'square', 'triangle', '.ipynb_checkpoints'])
    _folders(tmp_path, 'val', ['circle', 'triangle'], n=2)
    _folders(tmp_path / 'val' / 'triangle', '.ipynb_checkpoints', ['x'])
    cfg = H.tiny_config('finetune', DATA__DATA_PATH=str(tmp_path), MODEL__NUM_CLASSES=3)
    train = sources.build_dataset(cfg, is_train=True)
    val = sources.build_dataset(cfg, is_train=False)
    assert train.classes == val.classes == ['circle', 'square', 'triangle']
    assert val.labels.tolist() == [0, 0, 2, 2] and len(train) == 3


def test_class_folder_mistakes_are_errors_naming_the_folders(tmp_path):
    _folders(tmp_path, 'train', ['circle', 'square', 'triangle'])
    _folders(tmp_path, 'val', ['circle', 'hexagon'])
    cfg = H.tiny_config('finetune', DATA__DATA_PATH=str(tmp_path))  # NUM_CLASSES 10
    with pytest.raises(DataError, match=r"has 3 class folders \(circle, square, triangle\) but "
                                        r"MODEL.NUM_CLASSES is 10: set -opts MODEL.NUM_CLASSES 3"):
        sources.build_dataset(cfg, is_train=True)
    cfg = H.tiny_config('finetune', DATA__DATA_PATH=str(tmp_path), MODEL__NUM_CLASSES=3)
    with pytest.raises(DataError, match=r"val/hexagon: a class folder the training set does not "
                                        r"have \(its classes: circle, square, triangle\)"):
        sources.build_dataset(cfg, is_train=False)


def test_flat_folder_is_unlabelled_for_pretraining_only(tmp_path):
    os.makedirs(tmp_path / 'train')
    H.noise_image(8, 8).save(tmp_path / 'train' / 'x.png')
    pretrain = tasks.get_task(H.tiny_config('pretrain', DATA__DATA_PATH=str(tmp_path)))
    ds = pretrain.build_dataset(True)
    assert ds.labels.tolist() == [datasets.IGNORE_LABEL]
    with pytest.raises(DataError, match='no class sub-folders'):
        datasets.ImageFolderDataset(str(tmp_path / 'train'), require_labels=True)


def test_build_dataset_prefers_the_list_and_names_what_is_missing(tmp_path):
    root, _ = make_root(tmp_path)
    cfg = H.tiny_config('finetune', DATA__DATA_PATH=root)
    ds = sources.build_dataset(cfg, is_train=False)
    assert isinstance(ds, datasets.ImageListDataset) and ds.mark_skipped
    os.remove(os.path.join(root, 'val_list.txt'))
    with pytest.raises(DataError, match=r'neither the list file val_list.txt \(DATA.VAL_LIST\)'):
        sources.build_dataset(cfg, is_train=False)
    with pytest.raises(DataError, match='data folder not found'):
        sources.build_dataset(H.tiny_config(DATA__DATA_PATH=root + '/nope'), True)
    with pytest.raises(DataError, match='set DATA.DATA_PATH'):
        sources.build_dataset(H.tiny_config(), True)


# ---------------------------------------------------------------------------- awkward images

def test_awkward_images_load_as_upright_rgb(awkward):
    for name, (path, size) in awkward.items():
        img = datasets.load_rgb(path)
        assert img.mode == 'RGB' and img.size == size, name


def test_sixteen_bit_gray_is_scaled_not_clipped(awkward):
    a = np.asarray(datasets.load_rgb(awkward['gray16.png'][0]))
    assert a[0, 0].tolist() == [0, 0, 0] and a[-1, -1].tolist() == [255, 255, 255]
    assert 120 <= a[20, 30, 0] <= 135  # mid-grey, where convert('RGB') would give 255
    assert (a[..., 0] == a[..., 1]).all()


def test_transparent_pixels_become_white(awkward):
    assert np.asarray(datasets.load_rgb(awkward['rgba_transparent.png'][0])).min() == 255


def test_cmyk_and_palette_keep_the_colours(awkward):
    ref = np.asarray(H.photo('chelsea.png', (60, 40))).astype(int)
    for name, tol in (('cmyk.jpg', 12), ('palette.png', 40)):
        got = np.asarray(datasets.load_rgb(awkward[name][0])).astype(int)
        assert np.abs(got - ref).mean() < tol, name


def test_exif_rotation_is_applied(tmp_path):
    img = Image.new('RGB', (30, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 10, 20))  # left third red
    H.save_jpeg_with_orientation(img, tmp_path / 'r.jpg', 6)  # viewer rotates 90 degrees cw
    out = np.asarray(datasets.load_rgb(tmp_path / 'r.jpg')).astype(int)
    assert out.shape == (30, 20, 3)
    assert out[2, 10, 0] > 200 and out[2, 10, 2] < 60     # red now on top
    assert out[-3, 10, 2] > 200 and out[-3, 10, 0] < 60   # blue at the bottom


@pytest.mark.parametrize('stage', ['pretrain', 'finetune', 'linearprobe'])
def test_awkward_images_through_every_transform(awkward, stage):
    cfg = H.tiny_config(stage)
    for is_train in (True, False):
        transform = tasks.get_task(cfg).build_transform(is_train)
        for name, (path, _) in awkward.items():
            out = transform(datasets.load_rgb(path))
            assert out.shape == (3, 32, 32) and np.isfinite(out).all(), (name, is_train)


# ----------------------------------------------------------------------------- broken images

@pytest.mark.parametrize('name', ['truncated.jpg', 'not_an_image.jpg', 'empty.png',
                                  'missing.jpg'])
def test_broken_image_error_mode_names_file_and_line(tmp_path, broken, name):
    root, rel = make_root(tmp_path, n_good=2, bad=[os.path.relpath(broken[name], tmp_path)])
    ds = sources.build_dataset(H.tiny_config('finetune', DATA__DATA_PATH=root), True)
    assert ds[0][0].shape == (3, 32, 32)
    with pytest.raises(BadImageError) as e:
        ds[2]
    message = str(e.value)
    assert name in message and 'train_list.txt line 3' in message
    assert 'DATA.ON_BAD_IMAGE skip' in message and '\n' not in message


@pytest.mark.parametrize('name', ['truncated.jpg', 'not_an_image.jpg', 'empty.png',
                                  'missing.jpg'])
def test_broken_image_skip_mode_substitutes_and_counts(tmp_path, broken, name):
    root, rel = make_root(tmp_path, n_good=3, bad=[os.path.relpath(broken[name], tmp_path)])
    cfg = H.tiny_config('finetune', DATA__DATA_PATH=root, DATA__ON_BAD_IMAGE='skip')
    train = sources.build_dataset(cfg, True)
    image, label, sample_id = train[3]  # bad: replaced by the next readable one, index 0
    assert image.shape == (3, 32, 32) and label == 0 and train.num_skipped == 1
    assert sample_id == 3  # the slot keeps its identity (its seeds, its mask)
    train[3]
    assert train.num_skipped == 2
    train.reset_skip_count()
    assert train.num_skipped == 0
    val = sources.build_dataset(cfg, False)
    assert val[3][1] == datasets.IGNORE_LABEL and val[1][1] == 1 and val.num_skipped == 1


def test_skip_mode_gives_up_on_a_wrong_folder(tmp_path):
    H.write_list(tmp_path / 'train_list.txt', [f'missing_{i}.jpg 0' for i in range(60)])
    cfg = H.tiny_config('finetune', DATA__DATA_PATH=str(tmp_path), DATA__ON_BAD_IMAGE='skip')
    with pytest.raises(DataError, match='50 unreadable images in a row'):
        sources.build_dataset(cfg, True)[0]


def _loader_config(root, mode, workers=2):
    return H.tiny_config('finetune', DATA__DATA_PATH=root, DATA__ON_BAD_IMAGE=mode,
                         DATA__NUM_WORKERS=workers, DATA__BATCH_SIZE=2, DATA__BATCH_SIZE_EVAL=2)


@pytest.fixture
def no_hang():
    """Turn a hanging loader into a test failure after 60 s."""
    def alarm(signum, frame):
        raise TimeoutError('the loader hung')
    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize('workers', [0, 2])
def test_bad_image_in_loader_raises_a_clean_error_in_main_process(tmp_path, broken, workers,
                                                                  no_hang):
    root, _ = make_root(tmp_path, n_good=5,
                        bad=[os.path.relpath(broken['truncated.jpg'], tmp_path)])
    cfg = _loader_config(root, 'error', workers)
    val = sources.build_dataset(cfg, False)
    loader = datasets.build_loader(cfg, val, False)
    delivered = []
    with pytest.raises(BadImageError) as e:
        for _, y, _ in loader:
            delivered += y.numpy().tolist()
    message = str(e.value)
    assert message.startswith('cannot read image ') and 'truncated.jpg' in message
    assert 'val_list.txt line 6' in message
    assert 'Traceback' not in message and '\n' not in message
    assert datasets.IGNORE_LABEL not in delivered  # the spoiled batch was not handed out
    with pytest.raises(BadImageError):  # outside a loader, indexing raises directly again
        val[5]


class Broken:
    def __call__(self, img):
        raise ZeroDivisionError('a bug in a transform')


@pytest.mark.parametrize('workers', [0, 2])
def test_a_bug_in_the_loader_surfaces_with_its_traceback(tmp_path, workers, no_hang):
    root, _ = make_root(tmp_path, n_good=4)
    cfg = _loader_config(root, 'error', workers)
    loader = datasets.build_loader(cfg, sources.build_dataset(cfg, False, Broken()), False)
    if workers == 0:  # loaded in this thread: the exception itself
        with pytest.raises(ZeroDivisionError, match='a bug in a transform'):
            list(loader)
        return
    with pytest.raises(RuntimeError) as e:
        list(loader)
    assert 'ZeroDivisionError: a bug in a transform' in str(e.value)
    assert 'Traceback' in str(e.value) and 'in __call__' in str(e.value)


def test_skips_are_counted_across_workers(tmp_path, broken):
    bad = [os.path.relpath(broken[n], tmp_path) for n in ('truncated.jpg', 'missing.jpg',
                                                          'not_an_image.jpg')]
    root, _ = make_root(tmp_path, n_good=5, bad=bad)
    cfg = _loader_config(root, 'skip')
    val = sources.build_dataset(cfg, False)
    labels = np.concatenate([y.numpy() for _, y, _ in datasets.build_loader(cfg, val, False)])
    assert labels.tolist() == [0, 1, 2, 0, 1, -1, -1, -1]
    assert val.num_skipped == 3 + 2 + 1  # 5 -> 6 -> 7 -> 0, 6 -> 7 -> 0, 7 -> 0
    train = sources.build_dataset(cfg, True)
    loader = datasets.build_loader(cfg, train, True)
    images = [x for x, _, _ in loader]
    assert len(images) == 4 and images[0].shape == [2, 3, 32, 32]
    assert train.num_skipped == 6

