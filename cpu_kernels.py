"""Faster CPU training of the ViT layers: Linear, LayerNorm and the attention as PyLayers.

Training on CPU, the Linear layers (and the attention's head reshapes around them) run as
PyLayers whose backward passes are written out as GEMMs. Written by hand because, in Paddle's
CPU kernels, the bias gradient (a column sum of the output gradient) is ~30x slower than the
same sum as ones @ g, and every recorded reshape costs a full copy in backward (reshape_grad
copies): views taken inside a PyLayer are not recorded. Numbers: benchmarks/README.md.

Everywhere else (GPU, eval, export, or with the kernels switched off) the layers run Paddle's own
ops, with the same values: `Linear` and `LayerNorm` are nn.Linear / nn.LayerNorm with the same
parameters and names, and transformer.Attention delegates here only when `attention_applies`.

The switch (tests compare both paths on the same model):
    set_enabled(flag) -> previous flag;  is_enabled();  `with enabled(False): ...`
"""
import contextlib

import paddle
import paddle.nn as nn
import paddle.nn.functional as F
from paddle.autograd import PyLayer

_state = {'enabled': True}  # False: train with Paddle's own ops everywhere (same values, slower)


def set_enabled(flag):
    """Switch the CPU training kernels on or off for every layer; -> the previous setting."""
    previous = _state['enabled']
    _state['enabled'] = bool(flag)
    return previous


def is_enabled():
    return _state['enabled']


@contextlib.contextmanager
def enabled(flag):
    """`with enabled(False):` trains with Paddle's own ops inside the block, then restores."""
    previous = set_enabled(flag)
    try:
        yield
    finally:
        set_enabled(previous)


def _cpu_training(layer, x):
    return (_state['enabled'] and layer.training and paddle.in_dynamic_mode()
            and x.place.is_cpu_place())


def _gemm_path(linear, x):
    """Whether a Linear trains through the PyLayers below (CPU training, with a bias)."""
    return (_cpu_training(linear, x) and linear.bias is not None
            and not linear.bias.stop_gradient)


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


class Linear(nn.Linear):
    """nn.Linear (same parameters and names) that trains faster on CPU (_LinearGemm).
    Elsewhere (GPU, eval, export) F.linear."""

    def forward(self, x):
        if _gemm_path(self, x):
            return _LinearGemm.apply(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


def attention_applies(attn_layer, x, qkv_bias=None):
    """Whether transformer.Attention `attn_layer` trains through `attention` (CPU training, both
    projections with a trained bias, and no relative position bias: `attention` adds nothing to
    the logits); elsewhere the layer computes attention itself. qkv_bias: the qkv projection's
    bias when the layer assembles it (BEiT's q / v biases); None: `qkv.bias`."""
    if getattr(attn_layer, 'relative_position_bias_table', None) is not None:
        return False
    qkv = attn_layer.qkv
    bias = qkv.bias if qkv_bias is None else qkv_bias
    return (_cpu_training(qkv, x) and bias is not None and not bias.stop_gradient
            and _gemm_path(attn_layer.proj, x))


def attention(attn_layer, x, qkv_bias=None):
    """transformer.Attention's forward for CPU training, x (N, L, D) -> (N, L, D):
    softmax((q * Dh**-0.5) k^T) v with the head layout changes inside the PyLayers, so only the
    two matmuls and the softmax are recorded. qkv_bias: as attention_applies (its gradient flows
    on to the tensors it was assembled from)."""
    qkv, proj = attn_layer.qkv, attn_layer.proj
    bias = qkv.bias if qkv_bias is None else qkv_bias
    q, k, v = _QKVHeads.apply(x, qkv.weight, bias, attn_layer.num_heads)
    attn = F.softmax(paddle.matmul(q, k, transpose_y=True), axis=-1)
    return _HeadsLinear.apply(paddle.matmul(attn, v), proj.weight, proj.bias)
