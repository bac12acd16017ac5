"""Weights of another patch grid adapted at load time as mmsegmentation 1.2.2 adapts them
(BEiT's ADE20K checkpoints are trained at 640 px, 40x40 patches, and used at 512, 32x32):
relative position tables (BEiT.resize_rel_pos_embed, geometric-sequence bicubic spline),
pos_embed (MAE.resize_abs_pos_embed, bicubic), and EncoderProtocol.checkpoint_filter.

The reference is mmseg's own code. Importing mmseg takes several seconds (and needs mmcv.ops,
which mmcv-lite lacks), so the fast tests run the methods' source text, read from the installed
package, on stand-in objects; a slow test runs them on real mmseg models. mmseg calls scipy's
interp2d(kind='cubic'), which SciPy 1.14 removed: both use RectBivariateSpline in its place
(Interp2d below), which equals interp2d on a grid.
"""
import ast
import importlib.util
import os
import re
import sys
import types

import numpy as np
import paddle
import pytest
import torch  # (test-only, requirements-test.txt)
from scipy.interpolate import RectBivariateSpline

import transformer as T

TABLE = 'blocks.{}.attn.relative_position_bias_table'


class Interp2d:
    """scipy < 1.14's interp2d(x, y, z, kind) on a grid: RectBivariateSpline(y, x, z, kx=k,
    ky=k, s=0) read at the sorted points (z is (len(y), len(x))); equal to scipy 1.13's
    interp2d to ~3e-15 on mmseg's geometric grids."""

    def __init__(self, x, y, z, kind='linear', **kwargs):
        k = {'linear': 1, 'cubic': 3, 'quintic': 5}[kind]
        z = np.asarray(z)
        assert z.shape == (len(y), len(x))
        self.spline = RectBivariateSpline(np.asarray(y, float), np.asarray(x, float), z,
                                          kx=k, ky=k, s=0)

    def __call__(self, x, y):
        return self.spline(np.sort(np.asarray(y, float)), np.sort(np.asarray(x, float)))


def mmseg_root():
    """The installed mmseg package's folder (1.2.2), found without importing it."""
    spec = importlib.util.find_spec('mmseg')
    if spec is None:
        pytest.fail('mmsegmentation 1.2.2 is the reference and is not installed: '
                    'pip install -r requirements-test.txt')
    root = spec.submodule_search_locations[0]
    with open(os.path.join(root, 'version.py')) as f:
        version = re.search(r"__version__ = '([^']+)'", f.read()).group(1)
    assert version == '1.2.2', f'the reference is mmsegmentation 1.2.2, installed: {version}'
    return root


@pytest.fixture(scope='module')
def mmseg():
    """mmseg 1.2.2's BEiT.resize_rel_pos_embed / _geometric_sequence_interpolation and
    MAE.resize_abs_pos_embed, their source text compiled as it is (scipy's interpolate module
    replaced by one holding Interp2d), as functions of (self, ...)."""
    root = mmseg_root()
    space = {'np': np, 'torch': torch, 'interpolate': types.SimpleNamespace(interp2d=Interp2d)}
    wanted = {('backbones/beit.py', 'BEiT'): ('_geometric_sequence_interpolation',
                                             'resize_rel_pos_embed'),
              ('backbones/mae.py', 'MAE'): ('resize_abs_pos_embed',)}
    for (file, cls), names in wanted.items():
        path = os.path.join(root, 'models', file)
        with open(path) as f:
            tree = ast.parse(f.read())
        body = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls).body
        found = [n for n in body if isinstance(n, ast.FunctionDef) and n.name in names]
        assert sorted(n.name for n in found) == sorted(names)
        exec(compile(ast.Module(body=found, type_ignores=[]), path, 'exec'), space)
    return types.SimpleNamespace(**{n: space[n] for names in wanted.values() for n in names})


def mmseg_tables(mmseg, tables, dst_grid):
    """mmseg's resize_rel_pos_embed on a checkpoint of tables (key -> numpy) for a BEiT of a
    dst_grid x dst_grid patch grid (a stand-in object with its patch_shape and state_dict)."""
    heads = next(iter(tables.values())).shape[1]
    own = {k: torch.zeros((2 * dst_grid - 1) ** 2 + 3, heads) for k in tables}
    beit = types.SimpleNamespace(patch_shape=(dst_grid, dst_grid), state_dict=lambda: own)
    beit._geometric_sequence_interpolation = (
        lambda *a: mmseg._geometric_sequence_interpolation(beit, *a))
    out = mmseg.resize_rel_pos_embed(beit, {k: torch.from_numpy(v) for k, v in tables.items()})
    return {k: v.numpy() for k, v in out.items()}


def random_table(grid, heads, seed):
    rng = np.random.RandomState(seed)
    return (rng.randn((2 * grid - 1) ** 2 + 3, heads) * 0.1).astype('float32')


def check_table(ours, theirs, table, dst):
    assert ours.dtype == theirs.dtype == np.float32
    assert ours.shape == theirs.shape == ((2 * dst - 1) ** 2 + 3, table.shape[1])
    np.testing.assert_array_equal(ours[-3:], table[-3:])  # the cls entries kept
    np.testing.assert_array_equal(theirs[-3:], table[-3:])
    d = float(np.abs(ours - theirs).max())
    assert d < 1e-5, d
    return d


# ---------------------------------------------------------------------------------------------
# relative position tables and pos_embed against mmseg
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize('src, dst, heads', [(40, 32, 3), (32, 40, 4), (14, 16, 6), (16, 14, 2),
                                             (5, 3, 2)])
def test_table_resize_equals_mmseg(mmseg, src, dst, heads):
    """40 -> 32: BEiT's 640 weights at 512; 32 -> 40 and back; 14 -> 16: MAE's 224 grid at 256."""
    table = random_table(src, heads, seed=src * 100 + dst)
    ours = T.resize_relative_position_table(table, src, dst)
    theirs = mmseg_tables(mmseg, {TABLE.format(0): table}, dst)[TABLE.format(0)]
    d = check_table(ours, theirs, table, dst)
    print(f'table {src} -> {dst}, {heads} heads: max abs diff {d:.1e}')
    # and back: the resized table resized again, from the same input as mmseg's
    back = T.resize_relative_position_table(ours, dst, src)
    theirs = mmseg_tables(mmseg, {TABLE.format(0): ours}, src)[TABLE.format(0)]
    d = check_table(back, theirs, ours, src)
    print(f'table {dst} -> {src} (back): max abs diff {d:.1e}')


def test_table_resize_contract():
    table = random_table(5, 2, seed=0)
    assert T.resize_relative_position_table(table, 5, (5, 5)) is table  # same grid: as it is
    assert T.table_grid(len(table)) == 5 and T.table_grid(66) is None and T.table_grid(2) is None
    with pytest.raises(ValueError, match='square patch grids only'):
        T.resize_relative_position_table(table, 5, (4, 6))
    with pytest.raises(ValueError, match='a 4x4 grid has 52 rows'):
        T.resize_relative_position_table(table, 4, 3)
    with pytest.raises(ValueError, match='too few offsets'):
        T.resize_relative_position_table(random_table(2, 2, seed=0), 2, 3)


@pytest.mark.parametrize('src, dst', [(40, 32), (14, 16)])
def test_pos_embed_interpolation_equals_mmseg(mmseg, src, dst):
    """interpolate_pos_embed (Paddle's bicubic) = MAE.resize_abs_pos_embed (torch's bicubic,
    align_corners False, cls row kept): the same kernel, up to float32 rounding."""
    pe = np.random.RandomState(src).randn(1, 1 + src * src, 32).astype('float32')
    mae = types.SimpleNamespace(pos_embed=torch.zeros(1, 1 + dst * dst, 32), num_patches=dst * dst)
    theirs = mmseg.resize_abs_pos_embed(mae, {'pos_embed': torch.from_numpy(pe)})['pos_embed']
    ours = T.interpolate_pos_embed(pe, dst)
    assert ours.shape == tuple(theirs.shape) == (1, 1 + dst * dst, 32)
    np.testing.assert_array_equal(ours[:, :1], pe[:, :1])
    d = float(np.abs(ours - theirs.numpy()).max())
    print(f'pos_embed {src} -> {dst}: max abs diff {d:.1e}')
    assert d < 1e-5


# ---------------------------------------------------------------------------------------------
# the numpy spline against scipy
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize('my, mx', [(79, 79), (27, 31), (4, 6), (9, 5)])
def test_spline_equals_rect_bivariate_spline(my, mx):
    """bicubic_spline_resample = RectBivariateSpline(y, x, z, kx=3, ky=3, s=0) in float64, on
    uneven grids, points outside the samples' span (read at the nearest end) included."""
    rng = np.random.RandomState(my * mx)
    x = np.cumsum(rng.uniform(0.05, 2.0, mx)) - 3.0
    y = np.cumsum(rng.uniform(0.05, 2.0, my))
    z = rng.randn(2, my, mx)
    x_new = np.sort(rng.uniform(x[0] - 1, x[-1] + 1, 23))
    y_new = np.concatenate([[y[0] - 0.5, y[0]], np.sort(rng.uniform(y[0], y[-1], 15)), [y[-1]]])
    ours = T.bicubic_spline_resample(x, y, z, x_new, y_new)
    d = 0.0
    for i in range(2):
        theirs = RectBivariateSpline(y, x, z[i], kx=3, ky=3, s=0)(y_new, x_new)
        d = max(d, float(np.abs(ours[i] - theirs).max()))
    print(f'spline {my}x{mx}: max abs diff against scipy {d:.1e}')
    assert ours.dtype == np.float64 and d < 1e-10
    # through the samples themselves: the data back
    np.testing.assert_allclose(T.bicubic_spline_resample(x, y, z, x, y), z, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# checkpoint_filter
# ---------------------------------------------------------------------------------------------
KW = dict(patch_size=8, embed_dim=24, depth=2, num_heads=3, num_classes=0, rel_pos_bias=True,
          features_only=True)


def tables_state(grid, abs_pos_embed, seed):
    """A state dict of a (2-block) model of a grid x grid patch grid, random tables and
    pos_embed, plus BEiT's relative_position_index entries."""
    paddle.seed(seed)
    model = T.VisionTransformer(img_size=8 * grid, abs_pos_embed=abs_pos_embed, **KW)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    for i in range(2):
        state[TABLE.format(i)] = random_table(grid, 3, seed=seed + i)
        state[f'blocks.{i}.attn.relative_position_index'] = T.relative_position_index(
            (grid, grid))
    if abs_pos_embed:
        state['pos_embed'] = np.random.RandomState(seed).randn(1, 1 + grid * grid, 24) \
            .astype('float32')
    return state


@pytest.mark.parametrize('src, dst, abs_pos_embed', [(7, 5, False), (4, 6, True)])
def test_checkpoint_filter_resizes_tables_and_loads(mmseg, src, dst, abs_pos_embed):
    """A model built at one grid given a state dict of another: every table resized as
    resize_relative_position_table (= mmseg), pos_embed as interpolate_pos_embed, the index
    entries dropped; the result loads with matching shapes; one log line per kind."""
    state = tables_state(src, abs_pos_embed, seed=src)
    model = T.VisionTransformer(img_size=8 * dst, abs_pos_embed=abs_pos_embed, **KW)
    logs = []
    out = model.checkpoint_filter(state, log=logs.append)
    assert not any(k.endswith('relative_position_index') for k in out)
    theirs = mmseg_tables(mmseg, {k: state[k] for k in (TABLE.format(0), TABLE.format(1))}, dst)
    for i in range(2):
        key = TABLE.format(i)
        np.testing.assert_array_equal(
            out[key], T.resize_relative_position_table(state[key], src, dst))
        check_table(out[key], theirs[key], state[key], dst)
    if abs_pos_embed:
        np.testing.assert_array_equal(out['pos_embed'],
                                      T.interpolate_pos_embed(state['pos_embed'], dst))
    own = model.state_dict()
    assert set(out) == set(own)
    assert all(tuple(out[k].shape) == tuple(own[k].shape) for k in own)
    model.set_state_dict(out)
    for i in range(2):
        np.testing.assert_array_equal(
            model.blocks[i].attn.relative_position_bias_table.numpy(), out[TABLE.format(i)])
    assert (f'pretrained: resizing relative_position_bias_table of 2 blocks from {src}^2 to '
            f'{dst}^2 patches') in logs[-1]
    assert len(logs) == 1 + abs_pos_embed
    model.eval()
    assert model.forward_intermediates(paddle.randn([1, 3, 8 * dst, 8 * dst]), [1])[0].shape \
        == [1, 24, dst, dst]


def test_checkpoint_filter_under_a_prefix_with_tensors():
    """Names under `prefix` (the segmentor's backbone.), Paddle tensors as values; what fits
    already is returned as it is (the same dict)."""
    state = tables_state(7, False, seed=1)
    model = T.VisionTransformer(img_size=40, abs_pos_embed=False, **KW)
    wrapped = {'backbone.' + k: paddle.to_tensor(v) for k, v in state.items()}
    wrapped['decode_head.conv_seg.weight'] = paddle.zeros([2, 2])
    out = model.checkpoint_filter(wrapped, prefix='backbone.', log=lambda s: None)
    assert 'backbone.blocks.0.attn.relative_position_index' not in out
    assert out['decode_head.conv_seg.weight'] is wrapped['decode_head.conv_seg.weight']
    key = 'backbone.' + TABLE.format(1)
    np.testing.assert_array_equal(out[key],
                                  T.resize_relative_position_table(state[TABLE.format(1)], 7, 5))
    fitting = {k: v for k, v in out.items() if not k.startswith('decode_head.')}
    assert model.checkpoint_filter(fitting, prefix='backbone.') is fitting
    # a table of no square grid, or of other heads, is left for the loader to report
    odd = {TABLE.format(0): np.zeros([66, 3], 'float32'),  # a 4x5 grid's
           TABLE.format(1): np.zeros([172, 4], 'float32')}
    assert model.checkpoint_filter(odd) is odd


# ---------------------------------------------------------------------------------------------
# the same against mmseg imported (slow: the import takes seconds)
# ---------------------------------------------------------------------------------------------
def import_mmseg_backbones(monkeypatch):
    """mmseg's BEiT and MAE, imported; on mmcv-lite (no compiled mmcv._ext) mmcv.ops stubbed
    with the names mmseg imports at module level (none of them used here); scipy's interp2d
    replaced by Interp2d for the test."""
    mmseg_root()
    try:
        import mmcv.ops  # noqa: F401
    except ImportError:
        for name in [k for k in sys.modules if k == 'mmcv.ops' or k.startswith('mmcv.ops.')]:
            del sys.modules[name]
        ops = types.ModuleType('mmcv.ops')
        ops._is_stub = True

        def missing(name):
            def call(*args, **kwargs):
                raise NotImplementedError(f'mmcv.ops.{name} needs a compiled mmcv (stubbed)')
            return call
        for name in ('point_sample', 'sigmoid_focal_loss', 'CrissCrossAttention', 'PSAMask'):
            setattr(ops, name, missing(name))
        sys.modules['mmcv.ops'] = ops
        import mmcv
        mmcv.ops = ops
    import scipy.interpolate
    monkeypatch.setattr(scipy.interpolate, 'interp2d', Interp2d, raising=False)
    from mmseg.models.backbones import BEiT, MAE
    return BEiT, MAE


@pytest.mark.slow
def test_resizes_equal_mmseg_models(monkeypatch):
    """BEiT(img_size=640) weights loaded into BEiT(img_size=512) by mmseg's own methods on real
    models (16 heads, 2 layers), and MAE's pos_embed 224 -> 512: equal to ours."""
    BEiT, MAE = import_mmseg_backbones(monkeypatch)
    kw = dict(patch_size=16, embed_dims=64, num_layers=2, num_heads=16)
    for src, dst in ((640, 512), (512, 640), (224, 256)):
        g, h = src // 16, dst // 16
        ck = {f'layers.{i}.attn.relative_position_bias_table': torch.from_numpy(
            random_table(g, 16, seed=src + i)) for i in range(2)}
        ck['layers.0.attn.relative_position_index'] = torch.zeros(1)
        out = BEiT(img_size=dst, **kw).resize_rel_pos_embed(dict(ck))
        assert 'layers.0.attn.relative_position_index' not in out
        for i in range(2):
            key = f'layers.{i}.attn.relative_position_bias_table'
            d = check_table(T.resize_relative_position_table(ck[key].numpy(), g, h),
                            out[key].numpy(), ck[key].numpy(), h)
            print(f'mmseg BEiT {src} -> {dst}: max abs diff {d:.1e}')
    pe = torch.from_numpy(np.random.RandomState(0).randn(1, 197, 64).astype('float32'))
    theirs = MAE(img_size=512, **kw).resize_abs_pos_embed({'pos_embed': pe})['pos_embed']
    d = float(np.abs(T.interpolate_pos_embed(pe.numpy(), 32) - theirs.numpy()).max())
    print(f'mmseg MAE pos_embed 14 -> 32: max abs diff {d:.1e}')
    assert d < 1e-5
