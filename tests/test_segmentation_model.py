"""The segmentation model (segmentation.py, DESIGN.md 3.4) and the relative position bias of
transformer.py, against independent references.

Reference: HuggingFace transformers' BEiT modules (modeling_beit: BeitEmbeddings, BeitLayer with
its per-layer BeitRelativePositionBias, BeitFPNNeck, BeitUperHead, BeitFCNHead), which follow
mmsegmentation's UperNet. The reference forward is composed here from those modules (the taps
are the outputs of the 0-based blocks OUT_INDICES, taken explicitly), the same random weights
are copied into the Paddle segmentor by the mmseg key table, and logits are compared.
The sliding window is compared with a transcription of mmseg's slide_inference loop.
"""
import re

import numpy as np
import paddle
import pytest

import torch  # noqa: E402  (test-only, requirements-test.txt)
import torch.nn.functional as TF  # noqa: E402
from transformers import BeitConfig  # noqa: E402
from transformers.models.beit import modeling_beit as hf  # noqa: E402

import config as cfgmod
import cpu_kernels
import optim
import seg_inference
import segmentation as S
import transformer as T

IMG, PATCH, DIM, DEPTH, HEADS = 64, 8, 64, 4, 4
GRID = IMG // PATCH
OUT_INDICES = [0, 1, 2, 3]
CHANNELS, POOL_SCALES, AUX_CHANNELS, NUM_CLASSES = 32, [1, 2, 3, 6], 16, 5


# ---------------------------------------------------------------------------------------------
# the HF reference, composed from its modules
# ---------------------------------------------------------------------------------------------
def hf_config(rel_pos_bias, hidden_size=DIM):
    return BeitConfig(
        image_size=IMG, patch_size=PATCH, num_channels=3, hidden_size=hidden_size,
        num_hidden_layers=DEPTH, num_attention_heads=HEADS, intermediate_size=4 * DIM,
        hidden_act='gelu', hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        layer_norm_eps=1e-6, use_absolute_position_embeddings=True,
        use_relative_position_bias=rel_pos_bias, use_shared_relative_position_bias=False,
        layer_scale_init_value=0.0, drop_path_rate=0.0, use_mask_token=False,
        use_mean_pooling=False, out_indices=[i + 1 for i in OUT_INDICES],
        pool_scales=POOL_SCALES, use_auxiliary_head=True, auxiliary_channels=AUX_CHANNELS,
        auxiliary_num_convs=1, auxiliary_concat_input=False, num_labels=NUM_CLASSES,
        attn_implementation='eager')


class Reference(torch.nn.Module):
    """BEiT encoder + FPN neck + UperNet + FCN head, from HF's modules."""

    def __init__(self, rel_pos_bias):
        super().__init__()
        cfg = hf_config(rel_pos_bias)
        self.embeddings = hf.BeitEmbeddings(cfg)
        self.layers = torch.nn.ModuleList([hf.BeitLayer(cfg) for _ in range(DEPTH)])
        self.fpn = hf.BeitFPNNeck(cfg)
        # BeitUperHead ties its width to hidden_size; built for width CHANNELS, its
        # input-side modules are then rebuilt (from HF's own classes) for DIM-channel inputs,
        # as mmseg's UPerHead(in_channels=[DIM] * 4, channels=CHANNELS)
        head = hf.BeitUperHead(hf_config(rel_pos_bias, hidden_size=CHANNELS))
        head.in_channels = [DIM] * 4
        head.psp_modules = hf.BeitPyramidPoolingModule(POOL_SCALES, DIM, CHANNELS)
        head.psp_bottleneck = hf.BeitConvLayer(DIM + len(POOL_SCALES) * CHANNELS, CHANNELS,
                                               kernel_size=3, padding=1)
        head.lateral_convs = torch.nn.ModuleList(
            [hf.BeitConvLayer(DIM, CHANNELS, kernel_size=1) for _ in range(3)])
        self.decode_head = head
        self.auxiliary_head = hf.BeitFCNHead(cfg, in_index=2)

    def forward(self, x):
        n = x.shape[0]
        h = self.embeddings(x)
        taps = []
        for i, layer in enumerate(self.layers):
            h = layer(h, resolution=x.shape[2:])
            if i in OUT_INDICES:  # the output of block i (0-based), cls dropped, NCHW
                taps.append(h[:, 1:].transpose(1, 2).reshape(n, DIM, GRID, GRID))
        levels = self.fpn(taps)
        return self.decode_head(levels), self.auxiliary_head(levels)


def randomize_(module, seed, table_std):
    """Random weights at a scale that keeps activations O(1) (so an error cannot hide in tiny
    logits), LayerNorm / BatchNorm affine and BN running statistics away from 1 / 0, relative
    position tables N(0, table_std)."""
    g = torch.Generator().manual_seed(seed)

    def randn(shape):
        return torch.randn(shape, generator=g)
    with torch.no_grad():
        for name, m in module.named_modules():
            if isinstance(m, (torch.nn.LayerNorm, torch.nn.BatchNorm2d)):
                m.weight.copy_(1 + 0.2 * randn(m.weight.shape))
                m.bias.copy_(0.2 * randn(m.bias.shape))
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_mean.copy_(0.2 * randn(m.running_mean.shape))
                    m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
            elif isinstance(m, torch.nn.ConvTranspose2d):  # 2x2 stride 2: fan-in = in channels
                m.weight.copy_(randn(m.weight.shape) / m.weight.shape[0] ** 0.5)
                m.bias.copy_(0.1 * randn(m.bias.shape))
            elif isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(randn(m.weight.shape) / fan_in ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(0.1 * randn(m.bias.shape))
        module.embeddings.cls_token.copy_(randn(module.embeddings.cls_token.shape))
        pos = module.embeddings.position_embeddings
        pos.copy_(0.5 * randn(pos.shape))
        for layer in module.layers:
            if layer.relative_position_bias is not None:
                table = layer.relative_position_bias.relative_position_bias_table
                table.copy_(table_std * randn(table.shape))


# HF name -> mmseg / official name (the parts that differ); applied in order
_RENAMES = [
    (r'^embeddings\.cls_token$', 'backbone.cls_token'),
    (r'^embeddings\.position_embeddings$', 'backbone.pos_embed'),
    (r'^embeddings\.patch_embeddings\.projection\.', 'backbone.patch_embed.proj.'),
    (r'^layers\.(\d+)\.relative_position_bias\.', r'backbone.blocks.\1.attn.'),
    (r'^layers\.(\d+)\.layernorm_before\.', r'backbone.blocks.\1.norm1.'),
    (r'^layers\.(\d+)\.layernorm_after\.', r'backbone.blocks.\1.norm2.'),
    (r'^layers\.(\d+)\.attention\.o_proj\.', r'backbone.blocks.\1.attn.proj.'),
    (r'^layers\.(\d+)\.mlp\.', r'backbone.blocks.\1.mlp.'),
    (r'^fpn\.fpn1\.conv_transpose1\.', 'neck.fpn1.0.'),
    (r'^fpn\.fpn1\.normalization\.', 'neck.fpn1.1.'),
    (r'^fpn\.fpn1\.conv_transpose2\.', 'neck.fpn1.3.'),
    (r'^fpn\.fpn2\.', 'neck.fpn2.0.'),
    (r'^decode_head\.psp_modules\.blocks\.(\d+)\.conv\.', r'decode_head.psp_modules.\1.1.'),
    (r'^decode_head\.psp_bottleneck\.', 'decode_head.bottleneck.'),
    (r'\.classifier\.', '.conv_seg.'),
    (r'\.convolution\.', '.conv.'),
    (r'\.normalization\.', '.bn.'),
    (r'\.running_mean$', '._mean'),
    (r'\.running_var$', '._variance'),
]


def to_paddle_state(ref, seed):
    """The reference's weights under the Paddle segmentor's names: Linear weights transposed,
    q / k / v fused into qkv. HF's key projection has no bias; the Paddle k bias gets random
    values: a bias of the keys adds the same q.b to every logit of a query row, which softmax
    ignores, so parity must hold whatever it is."""
    sd = {k: v.detach().numpy().copy() for k, v in ref.state_dict().items()
          if not k.endswith('num_batches_tracked')}
    rng = np.random.RandomState(seed)
    out = {}
    for i in range(DEPTH):
        p = f'layers.{i}.attention.'
        qw, kw, vw = (sd.pop(p + f'{t}_proj.weight') for t in 'qkv')
        qb, vb = sd.pop(p + 'q_proj.bias'), sd.pop(p + 'v_proj.bias')
        out[f'backbone.blocks.{i}.attn.qkv.weight'] = np.concatenate([qw, kw, vw]).T
        kb = rng.randn(DIM).astype('float32')
        out[f'backbone.blocks.{i}.attn.qkv.bias'] = np.concatenate([qb, kb, vb])
    for name, value in sd.items():
        new = name
        for pattern, repl in _RENAMES:
            new = re.sub(pattern, repl, new)
        if re.search(r'\.(proj|fc1|fc2)\.weight$', new) and new.startswith('backbone.blocks.'):
            value = value.T
        out[new] = value
    return out


def build_pair(rel_pos_bias, seed):
    torch.manual_seed(seed)
    ref = Reference(rel_pos_bias)
    randomize_(ref, seed, table_std=0.5)
    ref.eval()
    paddle.seed(seed)
    backbone = T.VisionTransformer(img_size=IMG, patch_size=PATCH, embed_dim=DIM, depth=DEPTH,
                                   num_heads=HEADS, rel_pos_bias=rel_pos_bias,
                                   features_only=True)
    model = S.Segmentor(backbone, NUM_CLASSES, OUT_INDICES, CHANNELS, POOL_SCALES, AUX_CHANNELS,
                        dropout=0.1)
    state = to_paddle_state(ref, seed)
    ours = model.state_dict()
    assert sorted(state) == sorted(ours)  # the key table covers every parameter and buffer
    for k, v in state.items():
        assert tuple(ours[k].shape) == v.shape, k
    model.set_state_dict(state)
    model.eval()
    return ref, model


@pytest.mark.parametrize('rel_pos_bias', [False, True])
def test_parity_with_hf_beit_upernet(rel_pos_bias):
    ref, model = build_pair(rel_pos_bias, seed=3)
    x = np.random.RandomState(4).randn(2, 3, IMG, IMG).astype('float32')
    with torch.no_grad():
        ref_logits, ref_aux = ref(torch.from_numpy(x))
        ref_full = TF.interpolate(ref_logits, size=(IMG, IMG), mode='bilinear',
                                  align_corners=False)
    ref_logits, ref_aux, ref_full = ref_logits.numpy(), ref_aux.numpy(), ref_full.numpy()
    assert ref_logits.std() > 0.3 and ref_aux.std() > 0.3  # the comparison is not vacuous

    xp = paddle.to_tensor(x)
    with paddle.no_grad():
        levels = model.extract_features(xp)
        logits = model.decode_head(levels).numpy()
        aux = model.auxiliary_head(levels).numpy()
        full = model(xp).numpy()  # eval mode: the decode logits resized to the image
    assert logits.shape == (2, NUM_CLASSES, GRID * 4, GRID * 4)
    assert aux.shape == (2, NUM_CLASSES, GRID, GRID) and full.shape == (2, NUM_CLASSES, IMG, IMG)
    assert np.abs(logits - ref_logits).max() < 1e-4
    assert np.abs(aux - ref_aux).max() < 1e-4
    assert np.abs(full - ref_full).max() < 1e-4

    if rel_pos_bias:  # the tables matter: without them the output is clearly another
        for blk in model.backbone.blocks:
            blk.attn.relative_position_bias_table.set_value(
                paddle.zeros_like(blk.attn.relative_position_bias_table))
        with paddle.no_grad():
            assert np.abs(model(xp).numpy() - ref_full).max() > 0.05

    model.train()  # training mode: (decode logits, auxiliary logits), each at its own scale
    with paddle.no_grad():
        out, out_aux = model(xp)
    assert out.shape == [2, NUM_CLASSES, GRID * 4, GRID * 4]
    assert out_aux.shape == [2, NUM_CLASSES, GRID, GRID]


# ---------------------------------------------------------------------------------------------
# relative position bias of transformer.py
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize('grid', [(4, 4), (3, 5)])
def test_relative_position_index_and_bias_as_hf(grid):
    expected = hf.BeitRelativePositionBias.generate_relative_position_index(grid).numpy()
    np.testing.assert_array_equal(T.relative_position_index(grid), expected)
    attn = T.Attention(32, num_heads=2, window_size=grid)
    n_table = (2 * grid[0] - 1) * (2 * grid[1] - 1) + 3
    assert attn.relative_position_bias_table.shape == [n_table, 2]
    table = np.random.RandomState(0).randn(n_table, 2).astype('float32')
    attn.relative_position_bias_table.set_value(table)
    bias = attn.relative_position_bias().numpy()
    np.testing.assert_array_equal(bias, table[expected].transpose(2, 0, 1))
    if grid[0] == grid[1]:
        # HF's forward for the grid of its config (image = grid x patch 1), same table. (Only
        # square: for h != w HF resamples its table through a (w, h)-shaped view even at its own
        # grid size, so it is no reference there.)
        cfg = BeitConfig(image_size=list(grid), patch_size=1, num_attention_heads=2)
        ref = hf.BeitRelativePositionBias(cfg)
        with torch.no_grad():
            ref.relative_position_bias_table.copy_(torch.from_numpy(table))
            expected_bias = ref(grid)[0].numpy()
        np.testing.assert_allclose(bias, expected_bias, atol=1e-6)


def test_attention_with_table_takes_only_its_grid():
    attn = T.Attention(32, num_heads=2, window_size=4)
    with pytest.raises(ValueError, match='4x4 grid takes 17 tokens'):
        attn(paddle.randn([1, 10, 32]))


def tiny_backbone(rel_pos_bias, **kw):
    return T.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                               rel_pos_bias=rel_pos_bias, **kw)


def test_zero_table_equals_no_table_in_eval_and_cpu_training():
    """Zero-initialised tables: the model starts as the one without them, in eval mode and in
    CPU training, where the layer without a table takes cpu_kernels.attention and the one with
    a table its own explicit path (attention_applies is False for it)."""
    paddle.seed(0)
    plain = tiny_backbone(False, features_only=True)
    biased = tiny_backbone(True, features_only=True)
    state = plain.state_dict()
    tables = {k: v for k, v in biased.state_dict().items() if k not in state}
    assert set(tables) == {f'blocks.{i}.attn.relative_position_bias_table' for i in range(2)}
    biased.set_state_dict(dict(state, **tables))
    for blk in biased.blocks:
        assert np.all(blk.attn.relative_position_bias_table.numpy() == 0)
    x = paddle.randn([2, 3, 32, 32])
    for train in (False, True):
        for m in (plain, biased):
            m.train() if train else m.eval()
        a = plain.forward_intermediates(x, [0, 1])
        b = biased.forward_intermediates(x, [0, 1])
        for u, v in zip(a, b):
            assert np.abs(u.numpy() - v.numpy()).max() < 1e-5
        tokens = paddle.randn([2, 17, 32])
        assert cpu_kernels.attention_applies(plain.blocks[0].attn, tokens) == train
        assert not cpu_kernels.attention_applies(biased.blocks[0].attn, tokens)


def test_segmentor_cpu_training_gradients_match_paddle_ops():
    """Forward + backward of the segmentor in training mode with the CPU kernels on, against the
    same step with Paddle's own ops; the gradients reach the relative position tables."""
    paddle.seed(1)
    backbone = T.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=4,
                                   num_heads=2, rel_pos_bias=True, features_only=True)
    model = S.Segmentor(backbone, 3, [0, 1, 2, 3], channels=8, pool_scales=[1, 2],
                        aux_channels=8, dropout=0.0)
    rng = np.random.RandomState(2)
    for blk in backbone.blocks:  # non-zero tables, so their gradient path is exercised
        t = blk.attn.relative_position_bias_table
        t.set_value(0.3 * rng.randn(*t.shape).astype('float32'))
    x = paddle.to_tensor(rng.randn(2, 3, 32, 32).astype('float32'))
    w = paddle.to_tensor(rng.randn(2, 3, 16, 16).astype('float32'))  # stride 8 / 4
    wa = paddle.to_tensor(rng.randn(2, 3, 4, 4).astype('float32'))
    start = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    grads = []
    for kernels in (True, False):
        model.set_state_dict(start)  # (BN running stats move in training mode)
        model.train()
        model.clear_gradients()
        with cpu_kernels.enabled(kernels):
            logits, aux = model(x)
            ((logits * w).sum() + 0.4 * (aux * wa).sum()).backward()
        grads.append({n: p.grad.numpy().copy() for n, p in model.named_parameters()
                      if p.grad is not None})
    assert sorted(grads[0]) == sorted(grads[1])
    trainable = [n for n, p in model.named_parameters() if not p.stop_gradient]
    assert sorted(grads[0]) == sorted(trainable)  # everything trained gets a gradient
    for name in grads[0]:
        scale = np.abs(grads[1][name]).max() + 1e-6
        assert np.abs(grads[0][name] - grads[1][name]).max() < 1e-4 * max(scale, 1.0), name
    table_grad = grads[0]['backbone.blocks.0.attn.relative_position_bias_table']
    assert np.isfinite(table_grad).all() and np.abs(table_grad).max() > 0


def test_features_only_backbone_has_no_head():
    m = tiny_backbone(False, features_only=True)
    names = set(m.state_dict())
    assert not any(n.startswith(('fc_norm.', 'norm.', 'head.')) for n in names)
    with pytest.raises(RuntimeError, match='features_only'):
        m(paddle.randn([1, 3, 32, 32]))
    full = tiny_backbone(False, num_classes=3)  # without: the classifier exactly as before
    assert names | {'fc_norm.weight', 'fc_norm.bias', 'head.weight', 'head.bias'} \
        == set(full.state_dict())
    assert full.no_weight_decay() == {'pos_embed', 'cls_token'}


# ---------------------------------------------------------------------------------------------
# the sliding window
# ---------------------------------------------------------------------------------------------
def pointwise(weight, bias, calls=None):
    """A translation-equivariant predict: a fixed 1x1 linear map of the channels."""
    def predict(windows):
        if calls is not None:
            calls.append(windows.shape)
        return (np.einsum('kc,bchw->bkhw', weight, windows) + bias[None, :, None, None]
                ).astype('float32')
    return predict


@pytest.mark.parametrize('size', [(50, 70), (20, 45)])
def test_sliding_window_pointwise_equals_whole_image(size):
    rng = np.random.RandomState(0)
    weight, bias = rng.randn(4, 3).astype('float32'), rng.randn(4).astype('float32')
    img = rng.randn(3, *size).astype('float32')
    calls = []
    out = seg_inference.sliding_window(pointwise(weight, bias, calls), img, window=32, stride=20,
                           num_classes=4, batch=4)
    whole = pointwise(weight, bias)(img[None])[0]
    assert out.shape == (4,) + size and out.dtype == np.float32
    np.testing.assert_allclose(out, whole, atol=1e-5)
    # windows of 32 every 20 pixels, the last moved back to the border; (20, 45): padded to 32
    n_windows = {(50, 70): 2 * 3, (20, 45): 1 * 2}[size]
    assert [c[0] for c in calls] == [min(4, n_windows - i) for i in range(0, n_windows, 4)]
    assert all(c[1:] == (3, 32, 32) for c in calls)


def mmseg_slide(predict, img, crop, stride, num_classes):
    """mmseg's EncoderDecoder.slide_inference, transcribed (one window at a time, torch)."""
    img = torch.from_numpy(img)[None]
    h_stride = w_stride = stride
    h_crop = w_crop = crop
    batch_size, _, h_img, w_img = img.size()
    h_grids = max(h_img - h_crop + h_stride - 1, 0) // h_stride + 1
    w_grids = max(w_img - w_crop + w_stride - 1, 0) // w_stride + 1
    preds = img.new_zeros((batch_size, num_classes, h_img, w_img))
    count_mat = img.new_zeros((batch_size, 1, h_img, w_img))
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y1 = h_idx * h_stride
            x1 = w_idx * w_stride
            y2 = min(y1 + h_crop, h_img)
            x2 = min(x1 + w_crop, w_img)
            y1 = max(y2 - h_crop, 0)
            x1 = max(x2 - w_crop, 0)
            crop_img = img[:, :, y1:y2, x1:x2]
            crop_seg_logit = torch.from_numpy(predict(crop_img.numpy()))
            preds += TF.pad(crop_seg_logit,
                            (int(x1), int(preds.shape[3] - x2), int(y1),
                             int(preds.shape[2] - y2)))
            count_mat[:, :, y1:y2, x1:x2] += 1
    assert (count_mat == 0).sum() == 0
    return (preds / count_mat)[0].numpy()


def test_sliding_window_averages_overlaps_as_mmseg():
    """A predict that depends on the whole window (adds the window's per-channel mean), so
    each pixel's value depends on which windows cover it and how many."""
    rng = np.random.RandomState(1)
    weight = rng.randn(4, 3).astype('float32')

    def predict(windows):
        mean = windows.mean(axis=(2, 3), keepdims=True)
        return np.einsum('kc,bchw->bkhw', weight, windows + 3 * mean).astype('float32')
    img = rng.randn(3, 53, 77).astype('float32')
    out = seg_inference.sliding_window(predict, img, window=24, stride=16, num_classes=4, batch=3)
    expected = mmseg_slide(predict, img, crop=24, stride=16, num_classes=4)
    np.testing.assert_allclose(out, expected, atol=1e-5)
    whole = predict(img[None])[0]
    assert np.abs(out - whole).max() > 0.1  # (the windows do matter here)


# ---------------------------------------------------------------------------------------------
# build_segmentor: names, shapes, init, weight decay, config checks
# ---------------------------------------------------------------------------------------------
def seg_config(**changes):
    c = cfgmod.get_config()
    c.MODEL.NAME = 'vit_custom'
    c.TRAIN.MODE = 'segmentation'
    c.DATA.IMAGE_SIZE = 32
    c.MODEL.NUM_CLASSES = 7
    c.MODEL.REL_POS_BIAS = True
    e = c.MODEL.ENCODER
    e.PATCH_SIZE, e.EMBED_DIM, e.DEPTH, e.NUM_HEADS = 8, 32, 4, 2
    s = c.MODEL.SEGMENTATION
    s.OUT_INDICES, s.CHANNELS, s.POOL_SCALES, s.AUX_CHANNELS = [0, 1, 2, 3], 16, [1, 2, 3, 6], 8
    for key, value in changes.items():
        node = c
        *path, leaf = key.split('.')
        for part in path:
            node = node[part]
        node[leaf] = value
    return c


def test_build_segmentor_names_shapes_and_init():
    paddle.seed(0)
    model = S.build_segmentor(seg_config())
    sd = model.state_dict()
    assert all(k.split('.')[0] in ('backbone', 'neck', 'decode_head', 'auxiliary_head')
               for k in sd)
    grid, d, c, k = 4, 32, 16, 7
    shapes = {
        'backbone.blocks.0.attn.relative_position_bias_table': [(2 * grid - 1) ** 2 + 3, 2],
        'backbone.blocks.3.attn.qkv.weight': [d, 3 * d],
        'backbone.pos_embed': [1, grid * grid + 1, d],
        'neck.fpn1.0.weight': [d, d, 2, 2], 'neck.fpn1.1._variance': [d],
        'neck.fpn1.3.bias': [d], 'neck.fpn2.0.weight': [d, d, 2, 2],
        'decode_head.psp_modules.3.1.conv.weight': [c, d, 1, 1],
        'decode_head.psp_modules.0.1.bn._mean': [c],
        'decode_head.bottleneck.conv.weight': [c, d + 4 * c, 3, 3],
        'decode_head.lateral_convs.2.conv.weight': [c, d, 1, 1],
        'decode_head.fpn_convs.0.bn.weight': [c],
        'decode_head.fpn_bottleneck.conv.weight': [c, 4 * c, 3, 3],
        'decode_head.conv_seg.weight': [k, c, 1, 1], 'decode_head.conv_seg.bias': [k],
        'auxiliary_head.convs.0.conv.weight': [8, d, 3, 3],
        'auxiliary_head.convs.0.bn._variance': [8],
        'auxiliary_head.conv_seg.weight': [k, 8, 1, 1],
    }
    for name, shape in shapes.items():
        assert list(sd[name].shape) == shape, name
    assert not any(n.endswith('.conv.bias') for n in sd)  # ConvModule convs have no bias
    assert not any('relative_position_index' in n for n in sd)  # derived, not saved
    assert 'backbone.head.weight' not in sd and 'backbone.fc_norm.weight' not in sd
    for i in range(4):
        assert np.all(sd[f'backbone.blocks.{i}.attn.relative_position_bias_table'].numpy() == 0)
    # mmcv / mmseg init habits: kaiming-normal fan_out convs, BN (1, 0), conv_seg N(0, 0.01),
    # the neck's conv-transposes as PyTorch's default U(+-1/sqrt(out * 2 * 2))
    w = sd['decode_head.fpn_bottleneck.conv.weight'].numpy()
    assert abs(w.std() - np.sqrt(2 / (c * 9))) < 0.05 * np.sqrt(2 / (c * 9))
    assert np.all(sd['decode_head.bottleneck.bn.weight'].numpy() == 1)
    assert np.all(sd['decode_head.bottleneck.bn.bias'].numpy() == 0)
    assert abs(sd['decode_head.conv_seg.weight'].numpy().std() - 0.01) < 0.003
    assert np.all(sd['decode_head.conv_seg.bias'].numpy() == 0)
    for name in ('neck.fpn1.0.weight', 'neck.fpn2.0.bias'):
        v, bound = sd[name].numpy(), 1 / np.sqrt(d * 4)
        assert np.abs(v).max() <= bound and np.abs(v).max() > 0.8 * bound, name
    bn = model.decode_head.bottleneck.bn
    assert bn._epsilon == 1e-5 and bn._momentum == 0.9

    # the tables: no weight decay (BEiT), the layer id of their block
    nwd = model.backbone.no_weight_decay()
    assert nwd == {'pos_embed', 'cls_token'} | {
        f'blocks.{i}.attn.relative_position_bias_table' for i in range(4)}
    assert model.backbone.layer_id('blocks.2.attn.relative_position_bias_table') == 3
    cfg = seg_config()
    cfg.TRAIN.LAYER_DECAY = 0.5
    rules = optim.param_rules(model, cfg)
    assert rules['backbone.blocks.2.attn.relative_position_bias_table'] == (0.5 ** 2, 0.0)
    assert rules['backbone.blocks.2.attn.qkv.weight'] == (0.5 ** 2, cfg.TRAIN.WEIGHT_DECAY)
    assert rules['decode_head.conv_seg.weight'] == (1.0, cfg.TRAIN.WEIGHT_DECAY)


def test_build_segmentor_without_rel_pos_bias_has_no_tables():
    with paddle.LazyGuard():
        model = S.build_segmentor(seg_config(**{'MODEL.REL_POS_BIAS': False}))
    assert not any('relative_position' in n for n in model.state_dict())
    assert model.backbone.no_weight_decay() == {'pos_embed', 'cls_token'}


@pytest.mark.parametrize('changes, message', [
    ({'MODEL.SEGMENTATION.OUT_INDICES': [0, 1, 2, 4]},
     r'MODEL.SEGMENTATION.OUT_INDICES \[0, 1, 2, 4\]: .* from 0 to 3 \(the encoder has 4'),
    ({'MODEL.SEGMENTATION.OUT_INDICES': [0, 2, 1, 3]}, 'MODEL.SEGMENTATION.OUT_INDICES'),
    ({'MODEL.SEGMENTATION.OUT_INDICES': [0, 1, 1, 3]}, 'MODEL.SEGMENTATION.OUT_INDICES'),
    ({'MODEL.SEGMENTATION.OUT_INDICES': [0, 1, 2]}, 'MODEL.SEGMENTATION.OUT_INDICES'),
    ({'DATA.IMAGE_SIZE': 8}, r'DATA.IMAGE_SIZE 8 / MODEL.ENCODER.PATCH_SIZE 8 is a 1x1'),
    ({'MODEL.NAME': 'mae_vit_custom'}, "MODEL.NAME 'mae_vit_custom'"),
])
def test_build_segmentor_config_errors(changes, message):
    with pytest.raises(cfgmod.ConfigError, match=message):
        S.build_segmentor(seg_config(**changes))


def test_build_from_config_features_only_and_rel_pos_bias():
    c = seg_config()
    with paddle.LazyGuard():
        backbone = T.build_from_config(c, features_only=True)
        classifier = T.build_from_config(c)
    assert backbone.features_only and backbone.blocks[0].attn.window_size == (4, 4)
    assert 'head.weight' in classifier.state_dict()  # (features_only defaults to False)
    assert 'blocks.1.attn.relative_position_bias_table' in classifier.state_dict()
    with pytest.raises(cfgmod.ConfigError, match='vit_'):
        T.build_from_config(seg_config(**{'MODEL.NAME': 'mae_vit_custom'}),
                            features_only=True)
