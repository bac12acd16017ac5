"""Vision Transformer building blocks, the MAE pre-training model and the ViT classifier.

Parameter names equal the official PyTorch MAE state_dict keys (which are timm's), so an official
checkpoint converts with a key table plus one rule (transpose 2-D Linear weights): see
port_weights/convert_official.py and DESIGN.md section 3.1.

Reading order, as in the official models_mae.py:
    MaskedAutoencoderViT.forward = forward_encoder -> forward_decoder -> forward_loss
    VisionTransformer.forward    = forward_features -> forward_head
"""
import math
import numbers

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

import cpu_kernels
from config import CHOICES, ConfigError, get_key
from cpu_kernels import LayerNorm, Linear  # nn.LayerNorm / nn.Linear, faster CPU training

LAYER_NORM_EPS = 1e-6

# Module-level initializers, applied once per model with model.apply(...)
zeros_ = nn.initializer.Constant(0.0)
ones_ = nn.initializer.Constant(1.0)
xavier_uniform_ = nn.initializer.XavierUniform()


def trunc_normal_(tensor, std, bound=2.0):
    """timm's trunc_normal_(std=std, a=-2, b=2): normal, truncated at +-2 ABSOLUTE (not +-2 std).

    An initializer object, so paddle.LazyGuard can defer it. Paddle 2.6's TruncatedNormal has no
    a/b (it always cuts at 2 std); there a plain normal is used, which is the same distribution
    for the stds used here (<= 0.02: the cut is >= 100 std away).
    """
    try:
        init = nn.initializer.TruncatedNormal(mean=0.0, std=std, a=-bound, b=bound)
    except TypeError:
        if std * 10 > bound:
            raise
        init = nn.initializer.Normal(mean=0.0, std=std)
    init(tensor)


def normal_(tensor, std):
    nn.initializer.Normal(mean=0.0, std=std)(tensor)


# ----------------------------------------------------------------------------------------------
# 2-D sin-cos position embeddings (fixed in pre-training) and their interpolation
# ----------------------------------------------------------------------------------------------
def get_1d_sincos_pos_embed_from_grid(embed_dim, pos):
    """pos: array of positions (M,) -> (M, embed_dim): [sin(pos * w_k) ..., cos(pos * w_k) ...]."""
    assert embed_dim % 2 == 0, 'sin-cos position embedding needs an even embed_dim'
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000 ** omega
    out = np.einsum('m,d->md', pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def get_2d_sincos_pos_embed(embed_dim, grid_size, cls_token=False):
    """-> (grid_size**2 [+1], embed_dim) float32; half the channels encode the row, half the column.

    The cls row (when cls_token) is all zeros, as in the official MAE.
    """
    coords = np.arange(grid_size, dtype=np.float32)
    grid_w, grid_h = np.meshgrid(coords, coords)  # grid_w varies along a row
    emb_h = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid_w)
    emb_w = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid_h)
    emb = np.concatenate([emb_h, emb_w], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)
    return emb.astype(np.float32)


def interpolate_pos_embed(pos_embed, new_grid_size, num_extra_tokens=1):
    """Resize a [1, extra + g*g, D] position embedding to a new square grid (bicubic, like the
    official util/pos_embed.py); the extra (cls) rows are kept as they are.

    Accepts a numpy array or a Paddle tensor; returns the same kind.
    """
    is_numpy = isinstance(pos_embed, np.ndarray)
    pe = paddle.to_tensor(pos_embed) if is_numpy else pos_embed
    extra, grid = pe[:, :num_extra_tokens], pe[:, num_extra_tokens:]
    dim = pe.shape[-1]
    old = int(round(math.sqrt(grid.shape[1])))
    if old * old != grid.shape[1]:
        raise ValueError(f'position embedding has {grid.shape[1]} grid tokens: not a square grid')
    if old != new_grid_size:
        grid = grid.reshape([1, old, old, dim]).transpose([0, 3, 1, 2])
        grid = F.interpolate(grid.astype('float32'), size=[new_grid_size, new_grid_size],
                             mode='bicubic', align_corners=False)
        grid = grid.transpose([0, 2, 3, 1]).reshape([1, new_grid_size * new_grid_size, dim])
        grid = grid.astype(pe.dtype)
    out = paddle.concat([extra, grid], axis=1)
    return out.numpy() if is_numpy else out


# ----------------------------------------------------------------------------------------------
# Relative position tables of another patch grid (mmsegmentation's BEiT loading)
# ----------------------------------------------------------------------------------------------
# mmsegmentation resamples BEiT tables with scipy's interp2d(kind='cubic'), which SciPy 1.14
# removed, and scipy is no run-time need here: the same spline is written out in numpy. On a
# grid interp2d is FITPACK's interpolating bicubic tensor-product spline (= scipy's
# RectBivariateSpline(y, x, z, kx=3, ky=3, s=0)): per axis the cubic B-spline with FITPACK's
# knots for s=0 (both ends 4-fold, interior knots x[2:-2]: not-a-knot) through the samples, read
# at the new points clamped to the samples' span (FITPACK's evaluation does so). Both axes are
# linear maps, so each is one matrix: collocation by Cox-de Boor, solved, evaluated.
def _bspline_basis(knots, points, k=3):
    """(len(points), len(knots) - k - 1): every B-spline of degree k on `knots` at `points`
    (Cox-de Boor, as FITPACK's fpbspl); points on or past the last knot read the last piece."""
    points = np.asarray(points, np.float64)
    num = len(knots) - k - 1
    span = np.clip(np.searchsorted(knots, points, side='right') - 1, k, num - 1)
    h = np.zeros((len(points), k + 1))
    h[:, 0] = 1.0
    for j in range(1, k + 1):  # h[:, i] = B_{span-j+i, j}(point)
        prev = h[:, :j].copy()
        h[:, 0] = 0.0
        for i in range(j):
            right, left = knots[span + i + 1], knots[span + i + 1 - j]
            f = prev[:, i] / (right - left)
            h[:, i] += f * (right - points)
            h[:, i + 1] = f * (points - left)
    out = np.zeros((len(points), num))
    rows = np.arange(len(points))[:, None]
    out[rows, span[:, None] - k + np.arange(k + 1)] = h
    return out


def _cubic_spline_matrix(x, x_new):
    """M (len(x_new), len(x)): M @ v is FITPACK's interpolating cubic spline through (x, v)
    (x increasing, >= 4 points), read at x_new (clamped to [x[0], x[-1]])."""
    x = np.asarray(x, np.float64)
    if x.ndim != 1 or len(x) < 4 or np.any(np.diff(x) <= 0):
        raise ValueError('a cubic interpolating spline needs >= 4 increasing sample points')
    knots = np.concatenate([np.repeat(x[0], 4), x[2:-2], np.repeat(x[-1], 4)])
    at = _bspline_basis(knots, np.clip(np.asarray(x_new, np.float64), x[0], x[-1]))
    return np.linalg.solve(_bspline_basis(knots, x).T, at.T).T  # at @ inverse(collocation)


def bicubic_spline_resample(x, y, z, x_new, y_new):
    """z (..., len(y), len(x)), sampled at (y[i], x[j]) -> (..., len(y_new), len(x_new)), float64:
    the interpolating bicubic spline read on the new grid, = scipy's RectBivariateSpline(y, x, z,
    kx=3, ky=3, s=0)(y_new, x_new) and interp2d(x, y, z, kind='cubic')(x_new, y_new) (see
    above)."""
    my, mx = _cubic_spline_matrix(y, y_new), _cubic_spline_matrix(x, x_new)
    return my @ np.asarray(z, np.float64) @ mx.T


def _geometric_offsets(src_side, dst_side):
    """mmseg's BEiT._geometric_sequence_interpolation coordinates: the source table's offsets
    placed at +-(1, 1 + q, 1 + q + q^2, ...) with q bisected in [1.01, 1.5] so that the series
    reaches about dst_side // 2 (offsets near 0 keep their spacing, far ones are spread), and
    the integer target offsets -t..t. When shrinking (40 -> 32) q stops at ~1.01 and the outer
    source offsets lie beyond the targets (they only shape the spline), as in mmseg. Same
    arithmetic, stopping rule and order of operations."""
    def geometric_progression(a, r, n):
        return a * (1.0 - r ** n) / (1.0 - r)

    left, right = 1.01, 1.5
    while right - left > 1e-6:
        q = (left + right) / 2.0
        if geometric_progression(1, q, src_side // 2) > dst_side // 2:
            right = q
        else:
            left = q
    dis, cur = [], 1
    for i in range(src_side // 2):
        dis.append(cur)
        cur += q ** (i + 1)
    src = np.array([-d for d in reversed(dis)] + [0] + dis, np.float64)
    t = dst_side // 2.0
    return src, np.arange(-t, t + 0.1, 1.0)


def _square_side(grid, what):
    """grid (an int or (h, w)) -> h, for a square grid; else ValueError."""
    g = (grid, grid) if isinstance(grid, numbers.Integral) else tuple(int(v) for v in grid)
    if len(g) != 2 or g[0] != g[1] or g[0] < 1:
        raise ValueError(f'{what} {grid}: relative position tables are resized for square patch '
                         f'grids only (mmsegmentation\'s BEiT.resize_rel_pos_embed, whose '
                         f'resampling this reproduces, handles no other)')
    return g[0]


def table_grid(num_rows):
    """The square patch grid g of a BEiT relative position table of num_rows rows,
    (2g-1)^2 + 3; None when the row count fits no square grid."""
    side = int(round(math.sqrt(max(num_rows - 3, 0))))
    return (side + 1) // 2 if side % 2 == 1 and side * side == num_rows - 3 else None


def resize_relative_position_table(table, src_grid, dst_grid):
    """A BEiT relative position table ((2s-1)^2 + 3, heads) of an s x s patch grid -> the table of
    a d x d grid, as mmsegmentation 1.2.2 adapts BEiT checkpoints at load time (BEiT's ADE20K
    weights are trained at 640 px, 40x40 patches, and used at 512, 32x32):
    BEiT.resize_rel_pos_embed + _geometric_sequence_interpolation. The last 3 rows (the cls
    entries) are kept; each head's (2s-1)^2 offsets are resampled by an interpolating bicubic
    spline from geometrically spaced source coordinates onto the integer offsets (2d-1)^2.
    Computed from the float32 table and rounded to float32 as mmseg, returned in the table's
    dtype. table: numpy array (or anything np.asarray takes); grids: int or square (h, w)."""
    src, dst = _square_side(src_grid, 'source grid'), _square_side(dst_grid, 'target grid')
    table = np.asarray(table)
    src_side, dst_side = 2 * src - 1, 2 * dst - 1
    if table.ndim != 2 or table.shape[0] != src_side ** 2 + 3:
        raise ValueError(f'relative position table of shape {list(table.shape)}: a {src}x{src} '
                         f'grid has {src_side ** 2 + 3} rows ((2*{src}-1)^2 offsets + 3 cls)')
    if src == dst:
        return table
    if src < 3:
        raise ValueError(f'a {src}x{src} grid has too few offsets for a cubic spline (3x3 or more)')
    heads = table.shape[1]
    offsets, extra = table[:-3], table[-3:]
    coords, new = _geometric_offsets(src_side, dst_side)
    z = offsets.astype(np.float32).T.reshape(heads, src_side, src_side)
    out = bicubic_spline_resample(coords, coords, z, new, new).astype(np.float32)
    out = out.reshape(heads, dst_side * dst_side).T.astype(table.dtype)
    return np.concatenate([out, extra], axis=0)


# ----------------------------------------------------------------------------------------------
# Blocks shared by the encoder and the decoder
# ----------------------------------------------------------------------------------------------
class PatchEmbed(nn.Layer):
    """imgs (N, C, H, W) -> patch tokens (N, L, D), L = (H / p) * (W / p)."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f'image size {img_size} is not a multiple of patch size {patch_size}')
        self.img_size = img_size
        self.patch_size = patch_size
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size ** 2
        self.proj = nn.Conv2D(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        if x.shape[2] != self.img_size or x.shape[3] != self.img_size:
            raise ValueError(f'input images are {x.shape[2]}x{x.shape[3]}, '
                             f'the model expects {self.img_size}x{self.img_size}')
        x = self.proj(x)  # (N, D, h, w)
        return x.flatten(2).transpose([0, 2, 1])


def relative_position_index(grid):
    """BEiT's relative position index for a (h, w) patch grid plus one cls token:
    (h*w + 1, h*w + 1) int64, row = query token, column = key token (cls first).

    A patch pair (query at (y, x), key at (y', x')) reads entry
    (y - y' + h - 1) * (2w - 1) + (x - x' + w - 1) of the table; the three extra entries after
    the (2h-1)(2w-1) offsets are cls -> patch (whole first row), patch -> cls (first column) and
    cls -> cls, as BEiT / mmsegmentation / HF's BeitRelativePositionBias, so their checkpoints'
    tables mean the same here."""
    h, w = grid
    num_offsets = (2 * h - 1) * (2 * w - 1)
    ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing='ij')
    ys, xs = ys.reshape(-1), xs.reshape(-1)  # row-major: the patch tokens' order
    dy = ys[:, None] - ys[None, :] + (h - 1)
    dx = xs[:, None] - xs[None, :] + (w - 1)
    index = np.empty((h * w + 1, h * w + 1), dtype=np.int64)
    index[1:, 1:] = dy * (2 * w - 1) + dx
    index[0, :] = num_offsets      # cls -> patch
    index[:, 0] = num_offsets + 1  # patch -> cls
    index[0, 0] = num_offsets + 2  # cls -> cls
    return index


QKV_BIAS = CHOICES['MODEL.QKV_BIAS']  # 'qkv' | 'qv' | 'none': the fused qkv projection's biases


def qkv_bias_mode(qkv_bias):
    """qkv_bias as one of QKV_BIAS; True / False (timm's bool) mean 'qkv' / 'none'."""
    if isinstance(qkv_bias, bool):
        return 'qkv' if qkv_bias else 'none'
    if qkv_bias not in QKV_BIAS:
        raise ValueError(f'qkv_bias {qkv_bias!r}: choose one of {list(QKV_BIAS)} (or a bool)')
    return qkv_bias


class Attention(nn.Layer):
    """Multi-head self-attention with one fused qkv projection (official/timm layout).

    qkv_bias: 'qkv' (True) a bias on the fused projection (`qkv.bias`); 'none' (False) no bias;
    'qv' BEiT's `q_bias` and `v_bias` (zero init) and no key bias: the projection's bias is
    concat(q_bias, 0, v_bias) (effective_qkv_bias).
    window_size (h, w) (or an int for a square grid): BEiT's relative position bias, a learned
    `relative_position_bias_table` ((2h-1)(2w-1) + 3, heads), zero-initialised as BEiT's
    fine-tuning (so a model built with it starts as the one without), added to the attention
    logits. The layer then only takes h*w + 1 tokens (cls + the grid)."""

    def __init__(self, dim, num_heads=8, qkv_bias=True, window_size=None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'embed dim {dim} is not divisible by {num_heads} heads')
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        mode = qkv_bias_mode(qkv_bias)
        self.qkv = Linear(dim, dim * 3, bias_attr=None if mode == 'qkv' else False)
        self.q_bias = self.v_bias = None
        if mode == 'qv':
            self.q_bias = self.create_parameter([dim], default_initializer=zeros_)
            self.v_bias = self.create_parameter([dim], default_initializer=zeros_)
        self.proj = Linear(dim, dim)
        self.relative_position_bias_table = None
        self.window_size = None
        if window_size is not None:
            grid = ((window_size, window_size) if isinstance(window_size, numbers.Integral)
                    else tuple(int(v) for v in window_size))
            self.window_size = grid
            index = relative_position_index(grid)
            num_entries = (2 * grid[0] - 1) * (2 * grid[1] - 1) + 3  # offsets + 3 cls entries
            self.relative_position_bias_table = self.create_parameter(
                [num_entries, num_heads], default_initializer=zeros_)
            # derived from the grid, so not saved (BEiT's checkpoints carry it; loaders skip it)
            self.register_buffer('relative_position_index', paddle.to_tensor(index.reshape(-1)),
                                 persistable=False)

    def relative_position_bias(self):
        """-> (heads, L+1, L+1): the table read at every (query, key) pair."""
        n = self.window_size[0] * self.window_size[1] + 1
        bias = paddle.gather(self.relative_position_bias_table, self.relative_position_index,
                             axis=0)  # (n*n, heads)
        return bias.reshape([n, n, self.num_heads]).transpose([2, 0, 1])

    def effective_qkv_bias(self):
        """The bias of the fused qkv projection: qkv.bias ('qkv'), concat(q_bias, 0, v_bias)
        ('qv'), or None ('none')."""
        if self.q_bias is None:
            return self.qkv.bias
        return paddle.concat([self.q_bias, paddle.zeros_like(self.q_bias), self.v_bias])

    def project_qkv(self, x):
        """x (N, L, D) -> the fused q, k, v (N, L, 3D), with the effective bias."""
        if self.q_bias is None:
            return self.qkv(x)
        return F.linear(x, self.qkv.weight, self.effective_qkv_bias())

    def forward(self, x):
        bias = self.effective_qkv_bias()
        if cpu_kernels.attention_applies(self, x, bias):  # CPU training: the same, faster
            return cpu_kernels.attention(self, x, bias)
        n, l, d = x.shape
        if self.relative_position_bias_table is not None:
            return self.proj(self._attention_with_bias(x))
        # scaled_dot_product_attention (flash attention on GPU) takes (N, L, H, Dh);
        # split, not unbind: the gradient of split is a fast concat
        shape = [n, l, self.num_heads, self.head_dim]
        q, k, v = [t.reshape(shape) for t in paddle.split(self.project_qkv(x), 3, axis=-1)]
        x = F.scaled_dot_product_attention(q, k, v, training=self.training)
        return self.proj(x.reshape([n, l, d]))

    def _attention_with_bias(self, x):
        """softmax(q k^T / sqrt(Dh) + bias) v, written out: scaled_dot_product_attention's
        attn_mask differs between Paddle 2.6 and 3.x and its flash kernel takes no learned bias.
        x (N, L, D) -> (N, L, D), before the output projection."""
        n, l, d = x.shape
        expected = self.window_size[0] * self.window_size[1] + 1
        if l != expected:
            raise ValueError(f'attention with a relative position table for a '
                             f'{self.window_size[0]}x{self.window_size[1]} grid takes {expected} '
                             f'tokens (cls + grid), got {l}')
        qkv = self.project_qkv(x).reshape([n, l, 3, self.num_heads, self.head_dim])
        q, k, v = paddle.unbind(qkv.transpose([2, 0, 3, 1, 4]), axis=0)  # (N, H, L, Dh) each
        logits = paddle.matmul(q * (self.head_dim ** -0.5), k, transpose_y=True)
        # (cast: under AMP the logits may be half precision while the table stays float32)
        logits = logits + self.relative_position_bias().astype(logits.dtype).unsqueeze(0)
        out = paddle.matmul(F.softmax(logits, axis=-1), v)  # (N, H, L, Dh)
        return out.transpose([0, 2, 1, 3]).reshape([n, l, d])


class Mlp(nn.Layer):
    def __init__(self, in_features, hidden_features):
        super().__init__()
        self.fc1 = Linear(in_features, hidden_features)
        self.act = nn.GELU()  # exact (erf) GELU, as torch.nn.GELU
        self.fc2 = Linear(hidden_features, in_features)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class DropPath(nn.Layer):
    """Stochastic depth per sample (Paddle has no built-in layer for it)."""

    def __init__(self, drop_prob=0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        shape = [x.shape[0]] + [1] * (x.ndim - 1)
        mask = paddle.floor(keep + paddle.rand(shape, dtype=x.dtype))
        return x * (mask / keep)  # scale the [N, 1, 1] mask, not x (as timm)


class LayerScale(nn.Layer):
    """x * gamma, a learned per-channel scale of a residual branch (CaiT; timm's LayerScale,
    BEiT's gamma_1 / gamma_2), gamma filled with init_value."""

    def __init__(self, dim, init_value):
        super().__init__()
        self.gamma = self.create_parameter(
            [dim], default_initializer=nn.initializer.Constant(float(init_value)))

    def forward(self, x):
        return x * self.gamma


class Block(nn.Layer):
    """Pre-norm transformer block: two residual lines.

    layer_scale > 0: each branch scaled by a LayerScale (`ls1.gamma`, `ls2.gamma`, filled with
    layer_scale); 0: no scale and no parameter. qkv_bias: see Attention. norm_eps: LayerNorm eps.
    """

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, drop_path=0.0,
                 window_size=None, layer_scale=0.0, norm_eps=LAYER_NORM_EPS):
        super().__init__()
        self.norm1 = LayerNorm(dim, epsilon=norm_eps)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias,
                              window_size=window_size)
        self.ls1 = LayerScale(dim, layer_scale) if layer_scale > 0 else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = LayerNorm(dim, epsilon=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, layer_scale) if layer_scale > 0 else nn.Identity()

    def forward(self, x):
        x = x + self.drop_path(self.ls1(self.attn(self.norm1(x))))
        x = x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))
        return x


def run_blocks(blocks, x, recompute=False):
    """x through the blocks in turn. recompute (training only): activation checkpointing -- each
    block's activations are recomputed in the backward pass instead of kept (Paddle's recompute,
    which replays the RNG state, so drop-path draws the same samples), trading ~1/3 more compute
    for activation memory of ViT-L/H on small GPUs."""
    if recompute:
        from paddle.distributed.fleet.utils import recompute as checkpointed  # (heavy import)
    for blk in blocks:
        x = checkpointed(blk, x) if recompute and blk.training and not x.stop_gradient else blk(x)
    return x


def _init_linear_and_norm(layer, linear_init):
    if isinstance(layer, nn.Linear):
        linear_init(layer.weight)
        if layer.bias is not None:
            zeros_(layer.bias)
    elif isinstance(layer, nn.LayerNorm):
        ones_(layer.weight)
        zeros_(layer.bias)


def _init_patch_embed(proj):
    """Initialise the patch-embedding conv like an nn.Linear on its [D, C*p*p] view (official)."""
    d = proj.weight.shape[0]
    fan_in = int(np.prod(proj.weight.shape[1:]))
    bound = math.sqrt(6.0 / (fan_in + d))
    nn.initializer.Uniform(-bound, bound)(proj.weight)
    # bias keeps PyTorch's Conv2d default, U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    b = 1.0 / math.sqrt(fan_in)
    nn.initializer.Uniform(-b, b)(proj.bias)


def _fixed_param(layer, array):
    """A parameter holding a fixed array, excluded from training (official: requires_grad=False)."""
    p = layer.create_parameter(list(array.shape), dtype='float32',
                               default_initializer=nn.initializer.Assign(array))
    p.stop_gradient = True
    return p


# ----------------------------------------------------------------------------------------------
# The encoder's protocol (timm / BEiT names), shared by both models
# ----------------------------------------------------------------------------------------------
class EncoderProtocol:
    """What optimisers and dense heads ask of a ViT encoder, for a model holding `patch_embed`,
    `cls_token`, `pos_embed` (None: no absolute position embedding) and `blocks` (mixed into
    MaskedAutoencoderViT and VisionTransformer).

    Parameter names are relative to the model (`blocks.3.attn.qkv.weight`); a model that wraps
    the encoder under a prefix strips it before asking.
    """

    def get_num_layers(self):
        """Number of encoder blocks (BEiT's name)."""
        return len(self.blocks)

    def layer_id(self, name):
        """Layer id for layer-wise lr decay, the official rules (util/lr_decay.py,
        get_layer_id_for_vit): 0 for cls_token / pos_embed / patch_embed.*, i + 1 for blocks.i.*,
        get_num_layers() + 1 for everything after the blocks (norm, fc_norm, head, decoder ...)."""
        if name in ('cls_token', 'pos_embed') or name.startswith('patch_embed.'):
            return 0
        if name.startswith('blocks.'):
            return int(name.split('.')[1]) + 1
        return self.get_num_layers() + 1

    def checkpoint_filter(self, state, prefix='', log=print):
        """Weights for this encoder adapted to its patch grid at load time (timm's
        checkpoint_filter_fn habit; mmsegmentation's MAE / BEiT init_weights): a pos_embed of
        another grid interpolated bicubically (interpolate_pos_embed; fine-tuning at another
        resolution), every blocks.N.attn.relative_position_bias_table of another grid resampled
        (resize_relative_position_table; BEiT's 640 px ADE20K weights used at 512), and
        relative_position_index entries dropped (derived from the grid, never loaded).
        state: name -> array or tensor, this encoder's names under `prefix`. Returns state, or a
        new dict when something changed. What the model has no place for, or what differs in
        more than the grid (width, heads, a table of no square grid), is left for the loader to
        report."""
        out = dict(state)
        pos = prefix + 'pos_embed'
        pe = state.get(pos)
        if pe is not None and self.pos_embed is not None:
            own = self.pos_embed.shape
            if tuple(pe.shape) != tuple(own) and pe.shape[-1] == own[-1]:
                new_grid = self.patch_embed.grid_size
                log(f'pretrained: interpolating pos_embed from '
                    f'{int(round((pe.shape[1] - 1) ** 0.5))}^2 to {new_grid}^2 patches')
                out[pos] = interpolate_pos_embed(_as_array(pe), new_grid)
        resized = {}  # (source grid, target grid) -> blocks
        for i, block in enumerate(self.blocks):
            key = f'{prefix}blocks.{i}.attn.relative_position_bias_table'
            table, own = state.get(key), block.attn.relative_position_bias_table
            if (table is None or own is None or len(table.shape) != 2
                    or tuple(table.shape) == tuple(own.shape) or table.shape[1] != own.shape[1]
                    or table_grid(table.shape[0]) is None):
                continue
            src, dst = table_grid(table.shape[0]), block.attn.window_size
            out[key] = resize_relative_position_table(_as_array(table), src, dst)
            resized.setdefault((src, dst), []).append(i)
        for (src, dst), blocks in resized.items():
            log(f'pretrained: resizing relative_position_bias_table of {len(blocks)} blocks from '
                f'{src}^2 to {dst[0]}^2 patches (mmsegmentation\'s geometric-sequence spline)')
        for key in state:
            if key.startswith(prefix) and key.rsplit('.', 1)[-1] == 'relative_position_index':
                del out[key]
        return state if len(out) == len(state) and all(out[k] is state[k] for k in out) else out

    def init_missing_head(self, missing, std):
        """After a partial load (names `missing` were not in the checkpoint): initialise afresh
        what the model needs so (a classifier's head). Returns whether it did."""
        return False


def _as_array(value):
    """A checkpoint entry (numpy array or tensor) as a numpy array."""
    return np.asarray(value.numpy() if hasattr(value, 'numpy') else value)


def take_indices(indices, num_blocks):
    """timm's feature_take_indices: block indices -> sorted 0-based list without repeats.

    indices: an int n = the last n blocks; or a list of block indices, negative ones counting
    from the end (as Python indexing); None = every block. Out of range: ValueError.
    """
    if indices is None:
        indices = num_blocks
    if isinstance(indices, numbers.Integral) and not isinstance(indices, bool):
        if not 0 < indices <= num_blocks:
            raise ValueError(f'indices {indices}: an int takes the last n blocks, n from 1 to '
                             f'{num_blocks} (the encoder has {num_blocks} blocks)')
        return list(range(num_blocks - int(indices), num_blocks))
    take = set()
    for i in indices:
        if (isinstance(i, bool) or not isinstance(i, numbers.Integral)
                or not -num_blocks <= i < num_blocks):
            raise ValueError(f'block index {i!r} is out of range: the encoder has {num_blocks} '
                             f'blocks, indices {-num_blocks} to {num_blocks - 1}')
        take.add(int(i) % num_blocks)
    if not take:
        raise ValueError(f'indices is empty: give block indices from {-num_blocks} to '
                         f'{num_blocks - 1}, or an int n for the last n blocks')
    return sorted(take)


# ----------------------------------------------------------------------------------------------
# MAE pre-training model
# ----------------------------------------------------------------------------------------------
class MaskedAutoencoderViT(EncoderProtocol, nn.Layer):
    """Masked Autoencoder with a ViT encoder and a light ViT decoder (He et al., 2021).

    Encoder variants (defaults: the official model): layer_scale (LayerScale init value, 0 =
    off) and qkv_bias ('qkv' | 'qv' | 'none'), see Block; the decoder stays the official one.
    norm_eps: eps of every LayerNorm, encoder and decoder. The position embeddings are the
    fixed sin-cos ones of the method (no abs_pos_embed choice here)."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=1024, depth=24,
                 num_heads=16, decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16,
                 mlp_ratio=4., norm_pix_loss=False, recompute=False, layer_scale=0.,
                 qkv_bias='qkv', norm_eps=LAYER_NORM_EPS):
        super().__init__()
        self.in_chans = in_chans
        self.recompute = recompute
        self.norm_pix_loss = norm_pix_loss

        # encoder
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        grid = self.patch_embed.grid_size
        self.cls_token = self.create_parameter([1, 1, embed_dim], default_initializer=zeros_)
        self.pos_embed = _fixed_param(self, get_2d_sincos_pos_embed(embed_dim, grid, True)[None])
        self.blocks = nn.LayerList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, layer_scale=layer_scale,
                  norm_eps=norm_eps) for _ in range(depth)])
        self.norm = LayerNorm(embed_dim, epsilon=norm_eps)

        # decoder
        self.decoder_embed = Linear(embed_dim, decoder_embed_dim)
        self.mask_token = self.create_parameter([1, 1, decoder_embed_dim],
                                                default_initializer=zeros_)
        self.decoder_pos_embed = _fixed_param(
            self, get_2d_sincos_pos_embed(decoder_embed_dim, grid, True)[None])
        self.decoder_blocks = nn.LayerList([
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, norm_eps=norm_eps)
            for _ in range(decoder_depth)])
        self.decoder_norm = LayerNorm(decoder_embed_dim, epsilon=norm_eps)
        self.decoder_pred = Linear(decoder_embed_dim, patch_size ** 2 * in_chans)

        self.initialize_weights()
        assert num_patches == self.pos_embed.shape[1] - 1

    def initialize_weights(self):
        """Official init: xavier-uniform Linear (fused qkv as one matrix), zero biases,
        patch_embed like a Linear, tokens normal(0.02), LayerNorm (1, 0); fixed sin-cos pos."""
        _init_patch_embed(self.patch_embed.proj)
        normal_(self.cls_token, 0.02)
        normal_(self.mask_token, 0.02)
        self.apply(lambda m: _init_linear_and_norm(m, xavier_uniform_))

    def no_weight_decay(self):
        """Parameter names exempt from weight decay beyond the 1-D ones: none. Official
        pre-training (main_pretrain.py) builds its groups without a skip list, so cls_token and
        mask_token ARE decayed (only 1-D parameters and biases are not); pos_embed and
        decoder_pos_embed are fixed (not trained) anyway."""
        return set()

    # -- shapes ---------------------------------------------------------------------------------
    def patchify(self, imgs):
        """imgs: (N, C, H, W) -> (N, L, p*p*C), each patch laid out (p, q, c)."""
        p = self.patch_embed.patch_size
        n, c, h_img, w_img = imgs.shape
        h, w = h_img // p, w_img // p
        x = imgs.reshape([n, c, h, p, w, p])
        x = x.transpose([0, 2, 4, 3, 5, 1])  # nchpwq -> nhwpqc
        return x.reshape([n, h * w, p * p * c])

    def unpatchify(self, x):
        """x: (N, L, p*p*C) -> imgs (N, C, H, W)."""
        p = self.patch_embed.patch_size
        c = self.in_chans
        n, l, _ = x.shape
        h = w = int(round(math.sqrt(l)))
        assert h * w == l
        x = x.reshape([n, h, w, p, p, c]).transpose([0, 5, 1, 3, 2, 4])  # nhwpqc -> nchpwq
        return x.reshape([n, c, h * p, w * p])

    # -- stages ---------------------------------------------------------------------------------
    @staticmethod
    def random_masking(x, mask_ratio, noise=None):
        """Per-sample random masking by argsort of noise (small noise = kept).

        x: (N, L, D); noise: optional (N, L) float, uniform [0, 1) if None.
        Returns x_masked (N, L_keep, D), mask (N, L) with 1 = removed, ids_restore (N, L).
        """
        n, l, d = x.shape
        len_keep = int(l * (1 - mask_ratio))
        if noise is None:
            noise = paddle.rand([n, l])
        elif list(noise.shape) != [n, l]:
            raise ValueError(f'noise has shape {list(noise.shape)}, expected {[n, l]}')
        ids_shuffle = paddle.argsort(noise, axis=1)
        ids_restore = paddle.argsort(ids_shuffle, axis=1)
        ids_keep = ids_shuffle[:, :len_keep]
        x_masked = _gather_tokens(x, ids_keep)
        mask = (ids_restore >= len_keep).astype(x.dtype)
        return x_masked, mask, ids_restore

    def forward_encoder(self, imgs, mask_ratio, noise=None):
        """imgs (N, C, H, W) -> latent (N, 1 + L_keep, D), mask (N, L), ids_restore (N, L)."""
        x = self.patch_embed(imgs)
        x = x + self.pos_embed[:, 1:, :]
        x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand([x.shape[0], -1, -1])
        x = paddle.concat([cls, x], axis=1)
        x = run_blocks(self.blocks, x, self.recompute)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, x, ids_restore):
        """latent (N, 1 + L_keep, D) -> pred (N, L, p*p*C)."""
        x = self.decoder_embed(x)
        n, l = ids_restore.shape
        mask_tokens = self.mask_token.expand([n, l + 1 - x.shape[1], -1])
        x_ = paddle.concat([x[:, 1:, :], mask_tokens], axis=1)
        x_ = _gather_tokens(x_, ids_restore)  # unshuffle
        x = paddle.concat([x[:, :1, :], x_], axis=1)
        x = x + self.decoder_pos_embed
        x = run_blocks(self.decoder_blocks, x, self.recompute)
        x = self.decoder_norm(x)
        x = self.decoder_pred(x)
        return x[:, 1:, :]

    @staticmethod
    def patch_stats(patches):
        """patches (N, L, P) -> mean and UNBIASED variance over each patch, (N, L, 1) each.
        (Written out: paddle.var mixes dtypes inside and logs a warning every run.)"""
        mean = patches.mean(axis=-1, keepdim=True)
        var = paddle.square(patches - mean).sum(axis=-1, keepdim=True) / (patches.shape[-1] - 1)
        return mean, var

    def forward_loss(self, imgs, pred, mask):
        """Mean squared error per patch, averaged over the removed patches only.

        imgs (N, C, H, W); pred (N, L, p*p*C); mask (N, L), 1 = removed. With norm_pix_loss the
        target is each patch normalised by its own mean and unbiased variance (+1e-6).
        """
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean, var = self.patch_stats(target)
            target = (target - mean) / paddle.sqrt(var + 1.e-6)
        loss = paddle.square(pred - target).mean(axis=-1)
        return (loss * mask).sum() / mask.sum()

    def forward(self, imgs, mask_ratio=0.75, noise=None):
        """-> loss (scalar), pred (N, L, p*p*C), mask (N, L)."""
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        loss = self.forward_loss(imgs, pred, mask)
        return loss, pred, mask


def _gather_tokens(x, ids):
    """x (N, L, D), ids (N, K) int64 -> x[n, ids[n, k], :] as (N, K, D), via one flat 2-D gather."""
    n, l, d = x.shape
    k = ids.shape[1]
    offsets = (paddle.arange(n, dtype=ids.dtype) * l).unsqueeze(1)
    flat = paddle.gather(x.reshape([n * l, d]), (ids + offsets).reshape([-1]), axis=0)
    return flat.reshape([n, k, d])


# ----------------------------------------------------------------------------------------------
# ViT classifier (fine-tuning / linear probing of the pre-trained encoder)
# ----------------------------------------------------------------------------------------------
class VisionTransformer(EncoderProtocol, nn.Layer):
    """ViT classifier with the official models_vit.py heads.

    global_pool=True: mean of the patch tokens (not cls) -> fc_norm -> head (no final `norm`).
    global_pool=False: norm(x)[:, 0] (cls token) -> head.
    rel_pos_bias: every block gets BEiT's relative position bias table for the patch grid
    (blocks.{i}.attn.relative_position_bias_table, zero-initialised), as the MAE ADE20K
    segmentation recipe (DESIGN.md 5).
    features_only: the encoder alone, a backbone for dense heads (segmentation.py), which read it
    through forward_intermediates: no fc_norm, norm or head (their weights would be unused).
    Variants (defaults: the official model): layer_scale (LayerScale init value, 0 = off) and
    qkv_bias ('qkv' | 'qv' | 'none'), see Block; abs_pos_embed=False: no `pos_embed` at all
    (BEiT, which has the relative position bias instead); norm_eps: eps of every LayerNorm.
    """

    def __init__(self, img_size=224, patch_size=16, in_chans=3, num_classes=1000, embed_dim=768,
                 depth=12, num_heads=12, mlp_ratio=4., drop_path_rate=0., global_pool=True,
                 recompute=False, rel_pos_bias=False, features_only=False, layer_scale=0.,
                 qkv_bias='qkv', abs_pos_embed=True, norm_eps=LAYER_NORM_EPS):
        super().__init__()
        self.global_pool = global_pool
        self.recompute = recompute
        self.num_classes = num_classes
        self.embed_dim = embed_dim
        self.features_only = features_only
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = self.create_parameter([1, 1, embed_dim], default_initializer=zeros_)
        self.pos_embed = None
        if abs_pos_embed:
            self.pos_embed = self.create_parameter([1, num_patches + 1, embed_dim],
                                                   default_initializer=zeros_)
        dpr = np.linspace(0, drop_path_rate, depth).tolist()  # stochastic depth decay rule
        grid = self.patch_embed.grid_size
        window = (grid, grid) if rel_pos_bias else None
        self.blocks = nn.LayerList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, drop_path=dpr[i],
                  window_size=window, layer_scale=layer_scale, norm_eps=norm_eps)
            for i in range(depth)])
        if not features_only:
            if global_pool:
                self.fc_norm = LayerNorm(embed_dim, epsilon=norm_eps)
            else:
                self.norm = LayerNorm(embed_dim, epsilon=norm_eps)
            self.head = Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.initialize_weights()

    def initialize_weights(self):
        """timm's ViT init, which the official models_vit.py inherits: trunc-normal(0.02) for
        pos_embed, cls_token and Linear weights, zero biases, LayerNorm (1, 0). In practice these
        are overwritten by a pre-trained checkpoint; the head is then re-initialised (init_head).
        LayerScale gammas keep their init value, BEiT's q / v biases zero."""
        if self.pos_embed is not None:
            trunc_normal_(self.pos_embed, 0.02)
        trunc_normal_(self.cls_token, 0.02)
        _init_patch_embed(self.patch_embed.proj)
        self.apply(lambda m: _init_linear_and_norm(m, lambda w: trunc_normal_(w, 0.02)))
        # (relative position tables keep their zero init, as BEiT's)

    def _no_head(self, what):
        if self.features_only:
            raise RuntimeError(f'{what}: this VisionTransformer was built with features_only=True '
                               f'(a backbone without norm or head); read it through '
                               f'forward_intermediates(imgs, indices)')

    def init_head(self, std):
        """Re-initialise the classifier head (official: std 2e-5 fine-tune, 0.01 linear probe)."""
        self._no_head('init_head')
        linear = self.head[-1] if isinstance(self.head, nn.Sequential) else self.head
        trunc_normal_(linear.weight, std)
        zeros_(linear.bias)

    def init_missing_head(self, missing, std):
        """A head whose Linear the checkpoint lacks gets trunc-normal std (a pre-trained
        encoder under a new head; the linear probe's head.0 is a BatchNorm without weights)."""
        if not any(k.startswith('head.') and not k.startswith('head.0.') for k in missing):
            return False
        self.init_head(std)
        return True

    def no_weight_decay(self):
        """Parameter names exempt from weight decay beyond the 1-D ones: timm's, which official
        fine-tuning (main_finetune.py) passes on as its skip list; plus the relative position
        tables when present (BEiT exempts them too)."""
        names = {'cls_token'} | ({'pos_embed'} if self.pos_embed is not None else set())
        for name, _ in self.named_parameters():
            if name.endswith('.attn.relative_position_bias_table'):
                names.add(name)
        return names

    def embed_tokens(self, imgs):
        """imgs (N, C, H, W) -> tokens (N, 1 + L, D): cls token first, position embedded (when
        the model has an absolute position embedding)."""
        x = self.patch_embed(imgs)
        cls = self.cls_token.expand([x.shape[0], -1, -1])
        x = paddle.concat([cls, x], axis=1)
        return x if self.pos_embed is None else x + self.pos_embed

    def forward_intermediates(self, imgs, indices=None):
        """imgs (N, C, H, W) -> [(N, D, h, w)]: the outputs of the blocks `indices` (see
        take_indices: 0-based, negative from the end, an int n = the last n blocks, None = all),
        in block order, before any final norm, cls token dropped, on the patch grid. The same
        tensors as timm's forward_intermediates(x, indices, norm=False, output_fmt='NCHW',
        intermediates_only=True). Blocks after the last one taken are not run."""
        take = take_indices(indices, self.get_num_layers())
        x = self.embed_tokens(imgs)
        n, grid, d = x.shape[0], self.patch_embed.grid_size, x.shape[-1]
        out = []
        for i in range(take[-1] + 1):
            x = run_blocks([self.blocks[i]], x, self.recompute)
            if i in take:
                out.append(x[:, 1:, :].reshape([n, grid, grid, d]).transpose([0, 3, 1, 2]))
        return out

    def forward_features(self, imgs):
        """imgs (N, C, H, W) -> pooled features (N, D)."""
        self._no_head('forward_features')
        x = run_blocks(self.blocks, self.embed_tokens(imgs), self.recompute)
        if self.global_pool:
            return self.fc_norm(x[:, 1:, :].mean(axis=1))
        return self.norm(x)[:, 0]

    def forward_head(self, feats):
        self._no_head('forward_head')
        return self.head(feats)

    def forward(self, imgs):
        """imgs (N, C, H, W) -> logits (N, num_classes)."""
        return self.forward_head(self.forward_features(imgs))


def add_linear_probe_head(model):
    """Official linear probe head: BatchNorm without affine (eps 1e-6) before the Linear, so the
    state_dict keys are head.0.* and head.1.*."""
    bn = nn.BatchNorm1D(model.embed_dim, weight_attr=False, bias_attr=False, epsilon=1e-6)
    model.head = nn.Sequential(bn, model.head)
    return model


# ----------------------------------------------------------------------------------------------
# Factories, build_from_config, build_model
# ----------------------------------------------------------------------------------------------
SIZES = {  # the named sizes (official MAE / timm): label, encoder shape
    'base_patch16': ('ViT-B/16', dict(patch_size=16, embed_dim=768, depth=12, num_heads=12,
                                      mlp_ratio=4.)),
    'large_patch16': ('ViT-L/16', dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16,
                                       mlp_ratio=4.)),
    'huge_patch14': ('ViT-H/14', dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16,
                                      mlp_ratio=4.)),
}
MAE_DECODER = dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)  # every size
NAMED_SHAPES = {  # factory name -> (label, constructor keywords of the shape)
    **{f'vit_{arch}': (label, shape) for arch, (label, shape) in SIZES.items()},
    **{f'mae_vit_{arch}': (f'MAE {label}', dict(shape, **MAE_DECODER))
       for arch, (label, shape) in SIZES.items()}}

# constructor keyword <- config key, for the shape
ENCODER_KEYS = {'patch_size': 'MODEL.ENCODER.PATCH_SIZE', 'embed_dim': 'MODEL.ENCODER.EMBED_DIM',
                'depth': 'MODEL.ENCODER.DEPTH', 'num_heads': 'MODEL.ENCODER.NUM_HEADS',
                'mlp_ratio': 'MODEL.ENCODER.MLP_RATIO'}
DECODER_KEYS = {'decoder_embed_dim': 'MODEL.DECODER.EMBED_DIM',
                'decoder_depth': 'MODEL.DECODER.DEPTH',
                'decoder_num_heads': 'MODEL.DECODER.NUM_HEADS'}


def _factory(name, cls):
    """A named size: its shape, keyword overrides allowed; *_custom: the constructor's keywords."""
    shape = NAMED_SHAPES.get(name, ('', {}))[1]

    def factory(**kwargs):
        return cls(**dict(shape, **kwargs))
    factory.__name__ = name
    return factory


mae_vit_base_patch16 = _factory('mae_vit_base_patch16', MaskedAutoencoderViT)
mae_vit_large_patch16 = _factory('mae_vit_large_patch16', MaskedAutoencoderViT)
mae_vit_huge_patch14 = _factory('mae_vit_huge_patch14', MaskedAutoencoderViT)
mae_vit_custom = _factory('mae_vit_custom', MaskedAutoencoderViT)
vit_base_patch16 = _factory('vit_base_patch16', VisionTransformer)
vit_large_patch16 = _factory('vit_large_patch16', VisionTransformer)
vit_huge_patch14 = _factory('vit_huge_patch14', VisionTransformer)
vit_custom = _factory('vit_custom', VisionTransformer)

FACTORIES = {f.__name__: f for f in (
    mae_vit_base_patch16, mae_vit_large_patch16, mae_vit_huge_patch14, mae_vit_custom,
    vit_base_patch16, vit_large_patch16, vit_huge_patch14, vit_custom)}


def model_shape(config):
    """The shape keywords of the model MODEL.NAME names, from the config, checked: an unknown
    name, a named size that the config's shape keys contradict (config.ConfigError naming both),
    an image size that is no multiple of the patch, a width the heads do not divide, a mae_*
    name without the absolute position embedding (MODEL.ABS_POS_EMBED False)."""
    m = config.MODEL
    if m.NAME not in FACTORIES:
        raise ConfigError(f'MODEL.NAME {m.NAME!r} is not a known model; '
                          f'choose one of {sorted(FACTORIES)}')
    is_mae = m.NAME.startswith('mae_')
    if is_mae and not m.ABS_POS_EMBED:
        raise ConfigError(f'MODEL.ABS_POS_EMBED False does not fit MODEL.NAME {m.NAME!r}: MAE '
                          f'adds fixed sin-cos position embeddings (part of the method); '
                          f'only vit_* models can go without')
    keys = dict(ENCODER_KEYS, **(DECODER_KEYS if is_mae else {}))
    shape = {arg: get_key(config, key) for arg, key in keys.items()}
    if m.NAME in NAMED_SHAPES:  # the name fixes the shape: the config's keys must agree
        label, named = NAMED_SHAPES[m.NAME]
        wrong = [arg for arg in keys if shape[arg] != named[arg]]
        if wrong:
            arch = m.NAME.split('vit_', 1)[1]
            generic, sections = (('mae_vit_custom', 'MODEL.ENCODER and MODEL.DECODER') if is_mae
                                 else ('vit_custom', 'MODEL.ENCODER'))
            raise ConfigError(
                f'MODEL.NAME {m.NAME!r} is {label} ('
                + ', '.join(f'{keys[a]} {named[a]}' for a in wrong) + ') but '
                + ', '.join(f'{keys[a]} is {shape[a]}' for a in wrong)
                + f': use a vit_{arch}_224_* config (shape in configs/base/vit_{arch}_224.yaml), '
                f'or MODEL.NAME {generic} to take the shape from {sections}')
    for dim, heads in (('embed_dim', 'num_heads'), ('decoder_embed_dim', 'decoder_num_heads')):
        if dim in shape and (shape[heads] < 1 or shape[dim] % shape[heads]):
            raise ConfigError(f'{keys[dim]} {shape[dim]} is not divisible by {keys[heads]} '
                              f'{shape[heads]}')
    size, patch = config.DATA.IMAGE_SIZE, shape['patch_size']
    if patch < 1 or size < patch or size % patch:
        raise ConfigError(f'DATA.IMAGE_SIZE {size} is not a multiple of '
                          f'MODEL.ENCODER.PATCH_SIZE {patch}')
    return shape


def build_from_config(config, features_only=False):
    """The model MODEL.NAME names, built from the config: the one place that maps config keys to
    constructor keywords. DATA.IMAGE_SIZE, the shape (MODEL.ENCODER, and MODEL.DECODER for
    mae_*), MODEL.RECOMPUTE / LAYER_SCALE / QKV_BIAS / LAYER_NORM_EPS, and MODEL.NORM_PIX_LOSS
    (mae_*) or MODEL.NUM_CLASSES / DROP_PATH / GLOBAL_POOL / REL_POS_BIAS / ABS_POS_EMBED (vit_*).
    Looks neither at TRAIN.MODE nor adds the linear-probe head.
    features_only (vit_* only): the encoder without norm / head, a backbone for segmentation.py.

    A named size (vit_base_patch16 ...) fixes its shape: shape keys that contradict it raise
    config.ConfigError naming both; *_custom names take the shape from the config.
    """
    m = config.MODEL
    shape = model_shape(config)
    is_mae = m.NAME.startswith('mae_')
    if is_mae and features_only:
        raise ConfigError(f'MODEL.NAME {m.NAME!r} is a pre-training model; a backbone for dense '
                          f'heads needs a vit_* name (e.g. vit_base_patch16)')
    kwargs = dict(shape, img_size=config.DATA.IMAGE_SIZE, recompute=m.RECOMPUTE,
                  layer_scale=m.LAYER_SCALE, qkv_bias=m.QKV_BIAS, norm_eps=m.LAYER_NORM_EPS)
    if is_mae:
        kwargs.update(norm_pix_loss=m.NORM_PIX_LOSS)
    else:
        kwargs.update(num_classes=m.NUM_CLASSES, drop_path_rate=m.DROP_PATH,
                      global_pool=m.GLOBAL_POOL, rel_pos_bias=m.REL_POS_BIAS,
                      abs_pos_embed=m.ABS_POS_EMBED, features_only=features_only)
    return FACTORIES[m.NAME](**kwargs)


# Models that higher layers assemble around these networks (the linear probe's head on a frozen
# encoder, the segmentor) are built by their task: tasks.py hands each task's builder down here
# when it is imported, so that build_model answers for every TRAIN.MODE without this module
# importing any task.
MODEL_BUILDERS = {}


def register_builder(mode, build):
    """build(config) -> the model of TRAIN.MODE `mode` as its task trains it."""
    MODEL_BUILDERS[mode] = build


def build_model(config):
    """The model a config describes, as its task trains it: the builder registered for
    TRAIN.MODE (every task of tasks.py registers one), else the network of build_from_config
    (what pre-training and fine-tuning train)."""
    build = MODEL_BUILDERS.get(config.TRAIN.MODE)
    return build(config) if build is not None else build_from_config(config)
