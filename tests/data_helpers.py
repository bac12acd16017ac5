"""Shared by tests/test_data*.py: the repo root on sys.path, real photographs, image writers.

Real photographs come from scikit-image's wheel (skimage/data holds them; no download at test
time). The package is only located, not imported.
"""
import importlib.util
import io
import os
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import config  # noqa: E402

# RGB photographs of different sizes and aspect ratios, and a grayscale one.
PHOTOS = ['astronaut.png', 'chelsea.png', 'coffee.png', 'rocket.jpg', 'motorcycle_left.png',
          'camera.png']


def photo_dir():
    spec = importlib.util.find_spec('skimage')
    if spec is None or not spec.submodule_search_locations:
        pytest.fail('scikit-image is needed for its sample photographs: '
                    'pip install -r requirements-test.txt')
    return os.path.join(list(spec.submodule_search_locations)[0], 'data')


def photo_path(name):
    return os.path.join(photo_dir(), name)


def photo(name, size=None):
    """A sample photograph as an RGB PIL image, optionally resized to `size` (w, h)."""
    img = Image.open(photo_path(name)).convert('RGB')
    return img.resize(size, Image.BICUBIC) if size else img


def tiny_config(stage='finetune', **keys):
    """configs/tiny_<stage>.yaml with KEY.SUB=value overrides (use '__' for '.')."""
    cfg = config.get_config(os.path.join(ROOT, 'configs', f'tiny_{stage}.yaml'))
    opts = []
    for k, v in keys.items():
        opts += [k.replace('__', '.'), v]
    return config.merge_opts(cfg, opts)


def noise_image(w, h, seed=0, mode='RGB'):
    rng = np.random.default_rng(seed)
    shape = (h, w, 3) if mode == 'RGB' else (h, w)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)


def save_jpeg_with_orientation(img, path, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    img.save(path, 'JPEG', quality=95, exif=exif.tobytes())


def write_awkward_images(folder):
    """Readable but unusual files -> {name: (path, expected (w, h) after loading)}."""
    os.makedirs(folder, exist_ok=True)
    base = photo('chelsea.png', (60, 40))
    out = {}

    def keep(name, img, size, **save):
        path = os.path.join(folder, name)
        img.save(path, **save)
        out[name] = (path, size)

    keep('cmyk.jpg', base.convert('CMYK'), (60, 40), quality=95)
    gray16 = np.linspace(0, 65535, 60 * 40).reshape(40, 60).astype(np.uint16)
    keep('gray16.png', Image.fromarray(gray16), (60, 40))
    keep('gray8.png', base.convert('L'), (60, 40))
    rgba = base.convert('RGBA')
    rgba.putalpha(Image.new('L', base.size, 0))
    keep('rgba_transparent.png', rgba, (60, 40))
    keep('palette.png', base.convert('P', palette=Image.ADAPTIVE, colors=16), (60, 40))
    pal = base.convert('P', palette=Image.ADAPTIVE, colors=16)
    keep('palette_transparency.gif', pal, (60, 40), transparency=0)
    keep('one_by_one.png', noise_image(1, 1), (1, 1))
    keep('one_by_thousand.png', noise_image(1, 1000), (1, 1000))
    keep('thousand_by_one.jpg', noise_image(1000, 1), (1000, 1), quality=95)
    keep('bilevel.png', base.convert('1'), (60, 40))
    path = os.path.join(folder, 'exif_rotated.jpg')
    save_jpeg_with_orientation(base, path, 6)  # stored 60x40, shown rotated 90 degrees: 40x60
    out['exif_rotated.jpg'] = (path, (40, 60))
    return out


def write_broken_images(folder):
    """Unreadable files -> {name: path}; 'missing.jpg' is not created."""
    os.makedirs(folder, exist_ok=True)
    buf = io.BytesIO()
    photo('chelsea.png').save(buf, 'JPEG', quality=90)
    data = buf.getvalue()
    files = {'truncated.jpg': data[:len(data) // 3], 'not_an_image.jpg': b'hello, not a JPEG\n',
             'empty.png': b''}
    out = {}
    for name, content in files.items():
        out[name] = os.path.join(folder, name)
        with open(out[name], 'wb') as f:
            f.write(content)
    out['missing.jpg'] = os.path.join(folder, 'missing.jpg')
    return out


def write_list(path, lines):
    with open(path, 'w') as f:
        f.write('\n'.join(lines) + '\n')
    return path
