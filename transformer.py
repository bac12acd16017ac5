"""Vision Transformer building blocks, the MAE pre-training model and the ViT classifier.

Parameter names equal the official PyTorch MAE state_dict keys (which are timm's), so an official
checkpoint converts with a key table plus one rule (transpose 2-D Linear weights): see
port_weights/convert_official.py and DESIGN.md section 3.1.

Reading order, as in the official models_mae.py:
    MaskedAutoencoderViT.forward = forward_encoder -> forward_decoder -> forward_loss
    VisionTransformer.forward    = forward_features -> forward_head
"""
import math

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F
from paddle.autograd import PyLayer

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
# Blocks shared by the encoder and the decoder
# ----------------------------------------------------------------------------------------------
# Training on CPU: the Linear layers (and the attention's head reshapes around them) run as
# PyLayers whose backward passes are written out as GEMMs. Written by hand because, in Paddle's
# CPU kernels, the bias gradient (a column sum of the output gradient) is ~30x slower than the
# same sum as ones @ g, and every recorded reshape costs a full copy in backward (reshape_grad
# copies): views taken inside a PyLayer are not recorded. Numbers: benchmarks/README.md.
CPU_KERNELS = True  # False: train with Paddle's own ops everywhere (same values, slower on CPU)


def _cpu_training(layer, x):
    return (CPU_KERNELS and layer.training and paddle.in_dynamic_mode()
            and x.place.is_cpu_place())


def _gemm_backward(x2, weight, g2, need_x):
    """x2 [M, K] @ weight [K, O] + b = y2 [M, O]: -> grad_x2 (or None), grad_w, grad_b."""
    grad_x = paddle.matmul(g2, weight, transpose_y=True) if need_x else None
    grad_w = None if weight.stop_gradient else paddle.matmul(x2, g2, transpose_x=True)
    grad_b = paddle.matmul(paddle.ones([1, g2.shape[0]], g2.dtype), g2).reshape([-1])
    return grad_x, grad_w, grad_b


class _LinearGemm(PyLayer):
    """y = x @ W + b for x of any rank (a 2-D view for the GEMMs)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        y = paddle.addmm(bias.unsqueeze(0), x.reshape([-1, x.shape[-1]]), weight)
        return y.reshape(x.shape[:-1] + [weight.shape[1]])

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensor()
        gx, gw, gb = _gemm_backward(x.reshape([-1, x.shape[-1]]), weight,
                                    grad.reshape([-1, grad.shape[-1]]), not x.stop_gradient)
        return (None if gx is None else gx.reshape(x.shape)), gw, gb


class _QKVHeads(PyLayer):
    """The attention's qkv Linear, x (N, L, D) -> q * Dh**-0.5, k, v, each (N, H, L, Dh)."""

    @staticmethod
    def forward(ctx, x, weight, bias, num_heads):
        n, l, d = x.shape
        dh = d // num_heads
        ctx.save_for_backward(x, weight)
        ctx.scale = dh ** -0.5
        y = paddle.addmm(bias.unsqueeze(0), x.reshape([n * l, d]), weight)
        t = y.reshape([n, l, 3, num_heads, dh]).transpose([2, 0, 3, 1, 4])
        if hasattr(t, 'contiguous'):  # Paddle 3 may transpose as a strided view
            t = t.contiguous()
        q, k, v = paddle.unbind(t, axis=0)
        return q * ctx.scale, k, v

    @staticmethod
    def backward(ctx, gq, gk, gv):
        x, weight = ctx.saved_tensor()
        n, h, l, dh = gk.shape
        g = paddle.stack([gq * ctx.scale, gk, gv]).transpose([1, 3, 0, 2, 4])
        g2 = g.reshape([n * l, 3 * h * dh])
        gx, gw, gb = _gemm_backward(x.reshape([n * l, h * dh]), weight, g2,
                                    not x.stop_gradient)
        return (None if gx is None else gx.reshape(x.shape)), gw, gb


class _HeadsLinear(PyLayer):
    """The attention's output projection on per-head outputs, o (N, H, L, Dh) -> (N, L, D')."""

    @staticmethod
    def forward(ctx, o, weight, bias):
        n, h, l, dh = o.shape
        o2 = o.transpose([0, 2, 1, 3]).reshape([n * l, h * dh])
        ctx.save_for_backward(o2, weight)
        ctx.shape = o.shape
        return paddle.addmm(bias.unsqueeze(0), o2, weight).reshape([n, l, weight.shape[1]])

    @staticmethod
    def backward(ctx, grad):
        o2, weight = ctx.saved_tensor()
        n, h, l, dh = ctx.shape
        gx, gw, gb = _gemm_backward(o2, weight, grad.reshape([n * l, grad.shape[-1]]), True)
        return gx.reshape([n, l, h, dh]).transpose([0, 2, 1, 3]), gw, gb


class _LayerNormRows(PyLayer):
    """LayerNorm over the last axis: Paddle's forward kernel; the backward pass written out with
    row sums as GEMVs, because Paddle's CPU layer_norm_grad is ~3x slower than these ops."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        ctx.save_for_backward(x, weight)
        ctx.eps = eps
        return F.layer_norm(x, x.shape[-1:], weight, bias, eps)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensor()
        d = x.shape[-1]
        x2, g2 = x.reshape([-1, d]), grad.reshape([-1, d])
        ones = paddle.ones([d, 1], x.dtype)

        def row_mean(t):
            return paddle.matmul(t, ones).scale_(1.0 / d)
        xhat = x2 - row_mean(x2)
        rstd = paddle.rsqrt(row_mean(xhat * xhat) + ctx.eps)
        xhat.multiply_(rstd)
        gw = g2 * weight
        grad_x = (gw - row_mean(gw)).subtract_(xhat * row_mean(gw * xhat)).multiply_(rstd)
        ones_m = paddle.ones([1, x2.shape[0]], x.dtype)
        grad_w = paddle.matmul(ones_m, g2 * xhat).reshape([-1])
        grad_b = paddle.matmul(ones_m, g2).reshape([-1])
        return grad_x.reshape(x.shape), grad_w, grad_b


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm (same parameters and names) that trains faster on CPU (_LayerNormRows)."""

    def forward(self, x):
        if (_cpu_training(self, x) and self.weight is not None and self.bias is not None
                and not self.weight.stop_gradient):
            return _LayerNormRows.apply(x, self.weight, self.bias, self._epsilon)
        # (not super().forward: Paddle 2.6's dy2static, used by export, cannot convert super())
        return F.layer_norm(x, self._normalized_shape, self.weight, self.bias, self._epsilon)


def _gemm_path(linear, x):
    """Whether a Linear trains through the PyLayers above (CPU training, with a bias)."""
    return (_cpu_training(linear, x) and linear.bias is not None
            and not linear.bias.stop_gradient)


class Linear(nn.Linear):
    """nn.Linear (same parameters and names) that trains faster on CPU (_LinearGemm).
    Elsewhere (GPU, eval, export) F.linear."""

    def forward(self, x):
        if _gemm_path(self, x):
            return _LinearGemm.apply(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


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


class Attention(nn.Layer):
    """Multi-head self-attention with one fused qkv projection (official/timm layout)."""

    def __init__(self, dim, num_heads=8, qkv_bias=True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'embed dim {dim} is not divisible by {num_heads} heads')
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = Linear(dim, dim * 3, bias_attr=None if qkv_bias else False)
        self.proj = Linear(dim, dim)

    def forward(self, x):
        n, l, d = x.shape
        if _gemm_path(self.qkv, x) and _gemm_path(self.proj, x):
            # CPU training: softmax((q * Dh**-0.5) k^T) v with the head layout changes inside
            # the PyLayers, so only the two matmuls and the softmax are recorded
            q, k, v = _QKVHeads.apply(x, self.qkv.weight, self.qkv.bias, self.num_heads)
            attn = F.softmax(paddle.matmul(q, k, transpose_y=True), axis=-1)
            return _HeadsLinear.apply(paddle.matmul(attn, v), self.proj.weight, self.proj.bias)
        # elsewhere scaled_dot_product_attention (flash attention on GPU), which takes
        # (N, L, H, Dh); split, not unbind: the gradient of split is a fast concat
        shape = [n, l, self.num_heads, self.head_dim]
        q, k, v = [t.reshape(shape) for t in paddle.split(self.qkv(x), 3, axis=-1)]
        x = F.scaled_dot_product_attention(q, k, v, training=self.training)
        return self.proj(x.reshape([n, l, d]))


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


class Block(nn.Layer):
    """Pre-norm transformer block: two residual lines."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, drop_path=0.0):
        super().__init__()
        self.norm1 = LayerNorm(dim, epsilon=LAYER_NORM_EPS)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = LayerNorm(dim, epsilon=LAYER_NORM_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
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
# MAE pre-training model
# ----------------------------------------------------------------------------------------------
class MaskedAutoencoderViT(nn.Layer):
    """Masked Autoencoder with a ViT encoder and a light ViT decoder (He et al., 2021)."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=1024, depth=24,
                 num_heads=16, decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16,
                 mlp_ratio=4., norm_pix_loss=False, recompute=False):
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
        self.blocks = nn.LayerList([Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = LayerNorm(embed_dim, epsilon=LAYER_NORM_EPS)

        # decoder
        self.decoder_embed = Linear(embed_dim, decoder_embed_dim)
        self.mask_token = self.create_parameter([1, 1, decoder_embed_dim],
                                                default_initializer=zeros_)
        self.decoder_pos_embed = _fixed_param(
            self, get_2d_sincos_pos_embed(decoder_embed_dim, grid, True)[None])
        self.decoder_blocks = nn.LayerList([
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio) for _ in range(decoder_depth)])
        self.decoder_norm = LayerNorm(decoder_embed_dim, epsilon=LAYER_NORM_EPS)
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
class VisionTransformer(nn.Layer):
    """ViT classifier with the official models_vit.py heads.

    global_pool=True: mean of the patch tokens (not cls) -> fc_norm -> head (no final `norm`).
    global_pool=False: norm(x)[:, 0] (cls token) -> head.
    """

    def __init__(self, img_size=224, patch_size=16, in_chans=3, num_classes=1000, embed_dim=768,
                 depth=12, num_heads=12, mlp_ratio=4., drop_path_rate=0., global_pool=True,
                 recompute=False):
        super().__init__()
        self.global_pool = global_pool
        self.recompute = recompute
        self.num_classes = num_classes
        self.embed_dim = embed_dim
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = self.create_parameter([1, 1, embed_dim], default_initializer=zeros_)
        self.pos_embed = self.create_parameter([1, num_patches + 1, embed_dim],
                                               default_initializer=zeros_)
        dpr = np.linspace(0, drop_path_rate, depth).tolist()  # stochastic depth decay rule
        self.blocks = nn.LayerList([
            Block(embed_dim, num_heads, mlp_ratio, drop_path=dpr[i]) for i in range(depth)])
        if global_pool:
            self.fc_norm = LayerNorm(embed_dim, epsilon=LAYER_NORM_EPS)
        else:
            self.norm = LayerNorm(embed_dim, epsilon=LAYER_NORM_EPS)
        self.head = Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.initialize_weights()

    def initialize_weights(self):
        """timm's ViT init, which the official models_vit.py inherits: trunc-normal(0.02) for
        pos_embed, cls_token and Linear weights, zero biases, LayerNorm (1, 0). In practice these
        are overwritten by a pre-trained checkpoint; the head is then re-initialised (init_head)."""
        trunc_normal_(self.pos_embed, 0.02)
        trunc_normal_(self.cls_token, 0.02)
        _init_patch_embed(self.patch_embed.proj)
        self.apply(lambda m: _init_linear_and_norm(m, lambda w: trunc_normal_(w, 0.02)))

    def init_head(self, std):
        """Re-initialise the classifier head (official: std 2e-5 fine-tune, 0.01 linear probe)."""
        linear = self.head[-1] if isinstance(self.head, nn.Sequential) else self.head
        trunc_normal_(linear.weight, std)
        zeros_(linear.bias)

    def no_weight_decay(self):
        return {'pos_embed', 'cls_token'}

    def forward_features(self, imgs):
        """imgs (N, C, H, W) -> pooled features (N, D)."""
        x = self.patch_embed(imgs)
        cls = self.cls_token.expand([x.shape[0], -1, -1])
        x = paddle.concat([cls, x], axis=1) + self.pos_embed
        x = run_blocks(self.blocks, x, self.recompute)
        if self.global_pool:
            return self.fc_norm(x[:, 1:, :].mean(axis=1))
        return self.norm(x)[:, 0]

    def forward_head(self, feats):
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
# Factories and build_model
# ----------------------------------------------------------------------------------------------
_ARCHS = {  # name -> (patch, embed, depth, heads, decoder embed, decoder depth, decoder heads)
    'tiny_patch4': (4, 128, 4, 4, 96, 2, 4),
    'base_patch16': (16, 768, 12, 12, 512, 8, 16),
    'large_patch16': (16, 1024, 24, 16, 512, 8, 16),
    'huge_patch14': (14, 1280, 32, 16, 512, 8, 16),
}


def _mae_factory(arch):
    p, d, depth, heads, dd, ddepth, dheads = _ARCHS[arch]

    def factory(**kwargs):
        args = dict(patch_size=p, embed_dim=d, depth=depth, num_heads=heads,
                    decoder_embed_dim=dd, decoder_depth=ddepth, decoder_num_heads=dheads,
                    mlp_ratio=4.)
        args.update(kwargs)
        return MaskedAutoencoderViT(**args)
    factory.__name__ = f'mae_vit_{arch}'
    return factory


def _vit_factory(arch):
    p, d, depth, heads = _ARCHS[arch][:4]

    def factory(**kwargs):
        args = dict(patch_size=p, embed_dim=d, depth=depth, num_heads=heads, mlp_ratio=4.)
        args.update(kwargs)
        return VisionTransformer(**args)
    factory.__name__ = f'vit_{arch}'
    return factory


mae_vit_tiny_patch4 = _mae_factory('tiny_patch4')
mae_vit_base_patch16 = _mae_factory('base_patch16')
mae_vit_large_patch16 = _mae_factory('large_patch16')
mae_vit_huge_patch14 = _mae_factory('huge_patch14')
vit_tiny_patch4 = _vit_factory('tiny_patch4')
vit_base_patch16 = _vit_factory('base_patch16')
vit_large_patch16 = _vit_factory('large_patch16')
vit_huge_patch14 = _vit_factory('huge_patch14')

FACTORIES = {f.__name__: f for f in (
    mae_vit_tiny_patch4, mae_vit_base_patch16, mae_vit_large_patch16, mae_vit_huge_patch14,
    vit_tiny_patch4, vit_base_patch16, vit_large_patch16, vit_huge_patch14)}


def build_model(config):
    """Build the model a config describes: MODEL.NAME picks the factory, MODEL.ENCODER/DECODER
    and DATA.IMAGE_SIZE give its shape, TRAIN.MODE picks the head (linear probe: BN + Linear).

    This is the only place that maps config keys to constructor keywords.
    """
    m = config.MODEL
    if m.NAME not in FACTORIES:
        raise ValueError(f'MODEL.NAME {m.NAME!r} is not a known model; '
                         f'choose one of {sorted(FACTORIES)}')
    is_mae = m.NAME.startswith('mae_')
    mode = config.TRAIN.MODE
    if is_mae != (mode == 'pretrain'):
        raise ValueError(f'MODEL.NAME {m.NAME!r} does not fit TRAIN.MODE {mode!r}: pre-training '
                         f'uses an mae_* model, fine-tuning and linear probing a vit_* model')
    enc = m.ENCODER
    kwargs = dict(img_size=config.DATA.IMAGE_SIZE, patch_size=enc.PATCH_SIZE,
                  embed_dim=enc.EMBED_DIM, depth=enc.DEPTH, num_heads=enc.NUM_HEADS,
                  mlp_ratio=enc.MLP_RATIO, recompute=m.RECOMPUTE)
    if is_mae:
        dec = m.DECODER
        kwargs.update(decoder_embed_dim=dec.EMBED_DIM, decoder_depth=dec.DEPTH,
                      decoder_num_heads=dec.NUM_HEADS, norm_pix_loss=m.NORM_PIX_LOSS)
        return FACTORIES[m.NAME](**kwargs)
    kwargs.update(num_classes=m.NUM_CLASSES, drop_path_rate=m.DROP_PATH,
                  global_pool=m.GLOBAL_POOL)
    model = FACTORIES[m.NAME](**kwargs)
    if mode == 'linearprobe':
        add_linear_probe_head(model)
    return model
