"""Unit checks of transformer.py against the facts of the official MAE (DESIGN.md section 5)."""
import math
import os

import numpy as np
import paddle
import pytest

import config as cfgmod
import cpu_kernels
import optim
import tasks
import transformer as T
from conftest import ROOT

TINY = dict(img_size=32, patch_size=4, embed_dim=96, depth=2, num_heads=3, decoder_embed_dim=64,
            decoder_depth=1, decoder_num_heads=4)


def test_masking_keeps_smallest_noise_and_counts():
    paddle.seed(0)
    model = T.MaskedAutoencoderViT(**TINY)
    n, l = 3, 64
    noise = np.random.RandomState(0).rand(n, l).astype('float32')
    x = paddle.to_tensor(np.random.RandomState(1).randn(n, l, 8).astype('float32'))
    kept, mask, ids_restore = model.random_masking(x, 0.75, paddle.to_tensor(noise))
    keep = int(l * 0.25)
    order = np.argsort(noise, axis=1)
    assert kept.shape == [n, keep, 8]
    np.testing.assert_array_equal(kept.numpy(), np.take_along_axis(
        x.numpy(), order[:, :keep, None], axis=1))
    expected_mask = np.ones((n, l), 'float32')
    np.put_along_axis(expected_mask, order[:, :keep], 0, axis=1)
    np.testing.assert_array_equal(mask.numpy(), expected_mask)
    np.testing.assert_array_equal(ids_restore.numpy(), np.argsort(order, axis=1))


def test_mask_ratio_without_noise_is_random_but_counted():
    model = T.MaskedAutoencoderViT(**TINY)
    imgs = paddle.randn([2, 3, 32, 32])
    _, pred, mask = model(imgs, mask_ratio=0.6)
    assert pred.shape == [2, 64, 4 * 4 * 3]
    assert mask.numpy().sum(1).tolist() == [64 - int(64 * 0.4)] * 2
    with pytest.raises(ValueError, match=r'noise has shape \[2, 10\], expected \[2, 64\]'):
        model(imgs, noise=paddle.rand([2, 10]))


def test_patchify_layout_and_round_trip():
    model = T.MaskedAutoencoderViT(**TINY)
    imgs = np.random.RandomState(0).randn(2, 3, 32, 32).astype('float32')
    patches = model.patchify(paddle.to_tensor(imgs)).numpy()
    # patch (row 1, col 2), pixel (y 3, x 0), channel 2: index (p, q, c) in the last axis
    assert patches[1, 1 * 8 + 2, (3 * 4 + 0) * 3 + 2] == imgs[1, 2, 4 + 3, 8 + 0]
    back = model.unpatchify(paddle.to_tensor(patches)).numpy()
    np.testing.assert_array_equal(back, imgs)


def test_official_init():
    paddle.seed(1)
    m = T.MaskedAutoencoderViT(**dict(TINY, embed_dim=192, num_heads=3))
    sd = {k: v.numpy() for k, v in m.state_dict().items()}
    d = 192
    qkv = sd['blocks.0.attn.qkv.weight']  # xavier-uniform on the fused [D, 3D] matrix
    bound = math.sqrt(6 / (d + 3 * d))
    assert qkv.shape == (d, 3 * d)
    assert np.abs(qkv).max() <= bound and np.abs(qkv).max() > 0.95 * bound
    assert abs(qkv.std() - bound / math.sqrt(3)) < 0.05 * bound
    pe = sd['patch_embed.proj.weight']  # like a Linear on its [D, C*p*p] view
    b_pe = math.sqrt(6 / (d + 3 * 16))
    assert np.abs(pe).max() <= b_pe and np.abs(pe).max() > 0.95 * b_pe
    assert np.all(sd['blocks.0.mlp.fc1.bias'] == 0) and np.all(sd['decoder_pred.bias'] == 0)
    assert np.all(sd['norm.weight'] == 1) and np.all(sd['decoder_norm.bias'] == 0)
    assert abs(sd['cls_token'].std() - 0.02) < 0.006 and abs(sd['mask_token'].std() - 0.02) < 0.006
    assert m.norm._epsilon == 1e-6 and m.blocks[0].norm1._epsilon == 1e-6
    assert m.pos_embed.stop_gradient and m.decoder_pos_embed.stop_gradient
    assert not m.cls_token.stop_gradient


def test_classifier_heads_have_official_keys():
    kw = dict(img_size=32, patch_size=4, embed_dim=96, depth=2, num_heads=3, num_classes=5)
    gp = T.VisionTransformer(global_pool=True, **kw).state_dict()
    assert 'fc_norm.weight' in gp and 'norm.weight' not in gp
    cls = T.VisionTransformer(global_pool=False, **kw).state_dict()
    assert 'norm.weight' in cls and 'fc_norm.weight' not in cls
    probe = T.add_linear_probe_head(T.VisionTransformer(global_pool=False, **kw))
    keys = {k for k in probe.state_dict() if k.startswith('head.')}
    assert keys == {'head.0._mean', 'head.0._variance', 'head.1.weight', 'head.1.bias'}
    probe.init_head(0.01)
    w = probe.head[1].weight.numpy()
    assert w.shape == (96, 5) and abs(w.std() - 0.01) < 0.004
    assert probe(paddle.randn([4, 3, 32, 32])).shape == [4, 5]


def test_build_model_follows_config():
    c = cfgmod.get_config(os.path.join(ROOT, 'configs', 'tiny_finetune.yaml'))
    c.DATA.IMAGE_SIZE = 48
    m = T.build_model(c)
    assert m.pos_embed.shape == [1, 1 + 12 * 12, c.MODEL.ENCODER.EMBED_DIM]
    assert m.head.weight.shape == [c.MODEL.ENCODER.EMBED_DIM, c.MODEL.NUM_CLASSES]
    assert m.blocks[-1].drop_path.drop_prob == pytest.approx(c.MODEL.DROP_PATH)
    assert not m.recompute
    c.MODEL.RECOMPUTE = True
    assert T.build_model(c).recompute
    c.MODEL.NAME = 'mae_vit_custom'
    with pytest.raises(ValueError, match="MODEL.NAME 'mae_vit_custom' does not fit "
                                         "TRAIN.MODE 'finetune'"):
        T.build_model(c)
    c.MODEL.NAME = 'vit_gigantic'
    with pytest.raises(ValueError, match="MODEL.NAME 'vit_gigantic' is not a known model"):
        T.build_model(c)
    p = T.build_model(cfgmod.get_config(os.path.join(ROOT, 'configs', 'tiny_pretrain.yaml')))
    assert isinstance(p, T.MaskedAutoencoderViT) and p.norm_pix_loss


def test_build_model_builds_what_each_task_trains():
    """transformer.build_model answers for every TRAIN.MODE through the builders the tasks hand
    down (tasks.py registers them; the model layer imports no task)."""
    assert set(T.MODEL_BUILDERS) == set(tasks.TASKS)
    probe = T.build_model(cfgmod.get_config(os.path.join(ROOT, 'configs',
                                                         'tiny_linearprobe.yaml')))
    assert isinstance(probe.head, paddle.nn.Sequential)  # BN + Linear, the encoder frozen
    assert [n for n, p in probe.named_parameters() if not p.stop_gradient] == \
        ['head.1.weight', 'head.1.bias']
    seg = T.build_model(cfgmod.get_config(os.path.join(ROOT, 'configs',
                                                       'tiny_segmentation.yaml')))
    assert type(seg).__name__ == 'Segmentor' and hasattr(seg, 'decode_head')


def test_named_size_fixes_the_shape():
    """A named size builds that size when the config's shape keys agree, and refuses keys that
    contradict it (naming both); the *_custom names take the shape from the config."""
    c = cfgmod.get_config(os.path.join(ROOT, 'configs', 'vit_base_patch16_224_finetune.yaml'))
    c.DATA.IMAGE_SIZE, c.MODEL.NUM_CLASSES = 32, 3  # (small: only the shape matters here)
    with paddle.LazyGuard():
        m = T.build_from_config(c)
    assert isinstance(m, T.VisionTransformer) and m.get_num_layers() == 12
    assert m.pos_embed.shape == [1, 1 + 2 * 2, 768] and m.head.weight.shape == [768, 3]
    c.MODEL.NAME = 'vit_large_patch16'
    with pytest.raises(cfgmod.ConfigError) as e:
        T.build_from_config(c)
    msg = str(e.value)
    assert "MODEL.NAME 'vit_large_patch16' is ViT-L/16" in msg
    assert 'MODEL.ENCODER.EMBED_DIM 1024' in msg and 'MODEL.ENCODER.EMBED_DIM is 768' in msg
    assert 'MODEL.NAME vit_custom' in msg and 'PATCH_SIZE' not in msg
    c.MODEL.NAME = 'vit_custom'
    with paddle.LazyGuard():
        assert T.build_from_config(c).blocks[0].attn.qkv.weight.shape == [768, 3 * 768]
    p = cfgmod.get_config(os.path.join(ROOT, 'configs', 'vit_large_patch16_224_pretrain.yaml'))
    p.MODEL.DECODER.DEPTH = 2
    with pytest.raises(cfgmod.ConfigError, match="MODEL.NAME 'mae_vit_large_patch16' is MAE "
                       r"ViT-L/16 .*\(MODEL.DECODER.DEPTH 8\) but MODEL.DECODER.DEPTH is 2: "
                       '.* MODEL.NAME mae_vit_custom'):
        T.build_from_config(p)
    p.MODEL.DECODER.DEPTH = 8
    with paddle.LazyGuard():
        m = T.build_from_config(p)
    assert isinstance(m, T.MaskedAutoencoderViT) and m.get_num_layers() == 24
    assert len(m.decoder_blocks) == 8 and m.decoder_embed.weight.shape == [1024, 512]


def test_checkpoint_at_lower_resolution_loads_after_interpolation():
    kw = dict(patch_size=4, embed_dim=96, depth=2, num_heads=3, num_classes=5)
    small = T.VisionTransformer(img_size=32, **kw)
    big = T.VisionTransformer(img_size=48, **kw)
    big.eval()  # (Paddle 2.6's eval() returns None: no chaining)
    state = {k: v.numpy() for k, v in small.state_dict().items()}
    state['pos_embed'] = T.interpolate_pos_embed(state['pos_embed'], 12)
    big.set_state_dict(state)
    np.testing.assert_array_equal(big.pos_embed.numpy(), state['pos_embed'])
    assert big(paddle.randn([2, 3, 48, 48])).shape == [2, 5]
    with pytest.raises(ValueError, match='input images are 32x32, the model expects 48x48'):
        big(paddle.randn([1, 3, 32, 32]))


def test_drop_path_is_per_sample_and_off_in_eval():
    dp = T.DropPath(0.5)
    x = paddle.ones([64, 4, 8])
    dp.train()
    y = dp(x).numpy()
    per_sample = y.reshape(64, -1)
    assert set(np.unique(per_sample).tolist()) <= {0.0, 2.0}
    assert np.all(per_sample.min(1) == per_sample.max(1))  # whole samples dropped
    assert 0 < (per_sample[:, 0] == 0).sum() < 64
    dp.eval()
    np.testing.assert_array_equal(dp(x).numpy(), x.numpy())


def tiny_loss_and_grads(which, **model_kw):
    """Loss and parameter gradients of one training step of a tiny MAE ('mae', fixed masking
    noise) or ViT classifier ('vit', cross-entropy), from fixed seeds."""
    paddle.seed(0)
    if which == 'mae':
        model = T.MaskedAutoencoderViT(**TINY, **model_kw)
        imgs = paddle.to_tensor(np.random.RandomState(0).randn(2, 3, 32, 32), 'float32')
        noise = paddle.to_tensor(np.random.RandomState(1).rand(2, 64), 'float32')
        paddle.seed(1)
        loss = model(imgs, 0.75, noise)[0]
    else:
        kw = {k: v for k, v in TINY.items() if not k.startswith('decoder')}
        model = T.VisionTransformer(**kw, num_classes=5, **model_kw)
        imgs = paddle.to_tensor(np.random.RandomState(0).randn(3, 3, 32, 32), 'float32')
        paddle.seed(1)
        loss = paddle.nn.functional.cross_entropy(model(imgs), paddle.to_tensor([0, 3, 4]))
    assert model.training
    loss.backward()
    return float(loss), {n: p.grad.numpy() for n, p in model.named_parameters()
                         if p.grad is not None}


@pytest.mark.parametrize('which', ['mae', 'vit'])
def test_recompute_gives_the_same_loss_and_gradients(which):
    """MODEL.RECOMPUTE (activation checkpointing) changes memory, not numbers: same loss and
    gradients, drop-path draws included (Paddle's recompute replays the RNG state)."""
    kw = {} if which == 'mae' else {'drop_path_rate': 0.5}
    loss0, grads0 = tiny_loss_and_grads(which, recompute=False, **kw)
    loss1, grads1 = tiny_loss_and_grads(which, recompute=True, **kw)
    assert loss1 == loss0
    assert grads0.keys() == grads1.keys() and 'blocks.0.attn.qkv.weight' in grads0
    for name in grads0:
        np.testing.assert_allclose(grads1[name], grads0[name], rtol=1e-5, atol=1e-7, err_msg=name)


@pytest.mark.parametrize('which', ['mae', 'vit'])
def test_cpu_training_kernels_equal_paddle_ops(which):
    """The hand-written CPU training path (Linear / attention / LayerNorm PyLayers) gives the
    loss and every gradient of the same model trained with Paddle's own ops."""
    kw = {'norm_pix_loss': True} if which == 'mae' else {}
    with cpu_kernels.enabled(False):
        loss_ref, grads_ref = tiny_loss_and_grads(which, **kw)
    with cpu_kernels.enabled(True):
        loss, grads = tiny_loss_and_grads(which, **kw)
    assert loss == pytest.approx(loss_ref, rel=1e-6)
    assert grads.keys() == grads_ref.keys() and len(grads) > 20
    for name in grads:
        scale = max(np.abs(grads_ref[name]).max(), 1e-12)
        assert np.abs(grads[name] - grads_ref[name]).max() / scale < 1e-5, name
    assert cpu_kernels.is_enabled()  # (the context manager restores the setting)


def test_encoder_protocol_gives_official_layer_ids():
    """get_num_layers / layer_id / no_weight_decay: the official lr_decay.py layer ids (0 before
    the blocks, i + 1 for blocks.i, depth + 1 after them) on both models; weight decay skips
    pos_embed and cls_token in fine-tuning only (official pre-training decays the tokens)."""
    kw = {k: v for k, v in TINY.items() if not k.startswith('decoder')}
    depth = kw['depth']
    vit = T.VisionTransformer(**dict(kw, depth=5), num_classes=5)
    mae = T.MaskedAutoencoderViT(**TINY)
    assert vit.get_num_layers() == 5 and mae.get_num_layers() == depth
    for name, layer in [('cls_token', 0), ('pos_embed', 0), ('patch_embed.proj.weight', 0),
                        ('blocks.0.norm1.weight', 1), ('blocks.3.attn.qkv.weight', 4),
                        ('head.weight', 6), ('fc_norm.bias', 6), ('norm.weight', 6)]:
        assert vit.layer_id(name) == layer, name
    for name, layer in [('cls_token', 0), ('blocks.1.mlp.fc2.bias', 2), ('norm.weight', 3),
                        ('mask_token', 3), ('decoder_pos_embed', 3), ('decoder_embed.weight', 3),
                        ('decoder_blocks.0.attn.qkv.weight', 3), ('decoder_pred.bias', 3)]:
        assert mae.layer_id(name) == layer, name
    params = {n for n, _ in vit.named_parameters()}
    assert vit.no_weight_decay() == {'pos_embed', 'cls_token'} <= params
    assert mae.no_weight_decay() == set()


def test_forward_intermediates_ranges_recompute_and_early_stop():
    paddle.seed(0)
    kw = {k: v for k, v in TINY.items() if not k.startswith('decoder')}
    model = T.VisionTransformer(**dict(kw, depth=4), num_classes=5)
    model.eval()
    imgs = paddle.randn([2, 3, 32, 32])
    calls = []
    hooks = [blk.register_forward_post_hook(lambda layer, inp, out, i=i: calls.append(i))
             for i, blk in enumerate(model.blocks)]
    out = model.forward_intermediates(imgs, [1, -3])  # the same block twice: once, as timm
    assert calls == [0, 1] and len(out) == 1 and out[0].shape == [2, 96, 8, 8]
    calls.clear()
    assert len(model.forward_intermediates(imgs, 2)) == 2 and calls == [0, 1, 2, 3]
    for h in hooks:
        h.remove()
    for bad, match in [([4], r'block index 4 is out of range: .* indices -4 to 3'),
                       ([-5], 'indices -4 to 3'), (0, r'last n blocks, n from 1 to 4'),
                       (5, 'n from 1 to 4'), ([], 'indices is empty')]:
        with pytest.raises(ValueError, match=match):
            model.forward_intermediates(imgs, bad)
    # training with recompute: the same outputs and a gradient through them
    model.train()
    plain = [t.numpy() for t in model.forward_intermediates(imgs, [0, 2])]
    model.recompute = True
    again = model.forward_intermediates(imgs, [0, 2])
    for a, b in zip(again, plain):
        np.testing.assert_allclose(a.numpy(), b, rtol=1e-6, atol=1e-6)
    sum(t.mean() for t in again).backward()
    assert model.blocks[2].mlp.fc2.weight.grad is not None
    assert model.blocks[3].mlp.fc2.weight.grad is None


# ---------------------------------------------------------------------------------------------
# Model variants of the MAE family (MODEL.LAYER_SCALE / QKV_BIAS / ABS_POS_EMBED /
# LAYER_NORM_EPS): defaults are today's models, the variants add exactly their parameters
# ---------------------------------------------------------------------------------------------
def official_keys(depth, prefix='blocks'):
    """The official (timm) per-block parameter names of DESIGN.md 3.1."""
    subs = ['norm1.weight', 'norm1.bias', 'attn.qkv.weight', 'attn.qkv.bias', 'attn.proj.weight',
            'attn.proj.bias', 'norm2.weight', 'norm2.bias', 'mlp.fc1.weight', 'mlp.fc1.bias',
            'mlp.fc2.weight', 'mlp.fc2.bias']
    return {f'{prefix}.{i}.{s}' for i in range(depth) for s in subs}


def shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def layer_norm_eps(model):
    return {name: layer._epsilon for name, layer in model.named_sublayers()
            if isinstance(layer, paddle.nn.LayerNorm)}


@pytest.mark.parametrize('stage', ['finetune', 'pretrain', 'segmentation'])
def test_default_variant_keys_build_todays_models(stage):
    """With the new keys at their defaults, build_from_config gives the official state dict:
    the names of DESIGN.md 3.1 (no gamma, q_bias or v_bias), the shapes of the constructor with
    the variants off, and LayerNorm eps 1e-6 everywhere."""
    c = cfgmod.get_config(os.path.join(ROOT, 'configs', f'tiny_{stage}.yaml'))
    e, d = c.MODEL.ENCODER, c.MODEL.DECODER
    shape = dict(img_size=c.DATA.IMAGE_SIZE, patch_size=e.PATCH_SIZE, embed_dim=e.EMBED_DIM,
                 depth=e.DEPTH, num_heads=e.NUM_HEADS, mlp_ratio=e.MLP_RATIO)
    off = dict(layer_scale=0., qkv_bias='qkv', norm_eps=1e-6)
    top = {'cls_token', 'pos_embed', 'patch_embed.proj.weight', 'patch_embed.proj.bias'}
    paddle.seed(0)
    if stage == 'pretrain':
        built = T.build_from_config(c)
        ref = T.MaskedAutoencoderViT(**shape, decoder_embed_dim=d.EMBED_DIM,
                                     decoder_depth=d.DEPTH, decoder_num_heads=d.NUM_HEADS, **off)
        expected = top | official_keys(e.DEPTH) | official_keys(d.DEPTH, 'decoder_blocks') | {
            'norm.weight', 'norm.bias', 'mask_token', 'decoder_pos_embed', 'decoder_embed.weight',
            'decoder_embed.bias', 'decoder_norm.weight', 'decoder_norm.bias',
            'decoder_pred.weight', 'decoder_pred.bias'}
    else:
        features_only = stage == 'segmentation'
        built = T.build_from_config(c, features_only=features_only)
        ref = T.VisionTransformer(**shape, num_classes=c.MODEL.NUM_CLASSES,
                                  global_pool=c.MODEL.GLOBAL_POOL, features_only=features_only,
                                  rel_pos_bias=c.MODEL.REL_POS_BIAS, abs_pos_embed=True, **off)
        expected = top | official_keys(e.DEPTH) | (set() if features_only else {
            'fc_norm.weight', 'fc_norm.bias', 'head.weight', 'head.bias'})
        if c.MODEL.REL_POS_BIAS:  # (the segmentation recipe's, DESIGN.md 3.4)
            expected |= {f'blocks.{i}.attn.relative_position_bias_table' for i in range(e.DEPTH)}
    assert set(built.state_dict()) == expected
    assert shapes(built) == shapes(ref)
    assert set(layer_norm_eps(built).values()) == {T.LAYER_NORM_EPS} == {1e-6}
    assert cfgmod.get_config().MODEL.LAYER_NORM_EPS == T.LAYER_NORM_EPS


def test_variant_constructor_keywords_add_their_parameters():
    """layer_scale -> blocks.i.ls1/ls2.gamma filled with it; 'qv' -> attn.q_bias / v_bias (zero)
    and no qkv.bias; 'none' -> no qkv bias; abs_pos_embed False -> no pos_embed (forward,
    no_weight_decay, checkpoint_filter cope); norm_eps reaches every LayerNorm (MAE decoder
    too). The MAE decoder keeps the official blocks."""
    kw = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3)
    paddle.seed(0)
    vit = T.VisionTransformer(**kw, num_classes=5, layer_scale=0.25, qkv_bias='qv',
                              abs_pos_embed=False, norm_eps=1e-12)
    sd = vit.state_dict()
    base = set(T.VisionTransformer(**kw, num_classes=5).state_dict())
    added = {f'blocks.{i}.{s}' for i in range(2) for s in
             ('ls1.gamma', 'ls2.gamma', 'attn.q_bias', 'attn.v_bias')}
    assert set(sd) == (base | added) - {'pos_embed', 'blocks.0.attn.qkv.bias',
                                        'blocks.1.attn.qkv.bias'}
    for i in range(2):
        for s in ('ls1.gamma', 'ls2.gamma'):
            np.testing.assert_array_equal(sd[f'blocks.{i}.{s}'].numpy(), np.full(48, 0.25, 'f4'))
        for s in ('q_bias', 'v_bias'):
            assert sd[f'blocks.{i}.attn.{s}'].shape == [48]
            assert not sd[f'blocks.{i}.attn.{s}'].numpy().any()
    assert vit.pos_embed is None and vit.no_weight_decay() == {'cls_token'}
    assert vit.layer_id('blocks.1.ls2.gamma') == 2 and vit.layer_id('blocks.0.attn.q_bias') == 1
    assert set(layer_norm_eps(vit).values()) == {1e-12} and len(layer_norm_eps(vit)) == 5
    state = {k: v.numpy() for k, v in sd.items()}
    assert vit.checkpoint_filter(state) is state  # nothing to interpolate
    # a checkpoint with a pos_embed (of another grid) is left alone too: the model has none
    assert vit.checkpoint_filter(dict(state, pos_embed=np.zeros([1, 5, 48])))['pos_embed'].shape \
        == (1, 5, 48)
    imgs = paddle.randn([2, 3, 32, 32])
    vit.eval()
    assert vit(imgs).shape == [2, 5]
    # the effective qkv bias: q_bias, zeros, v_bias
    attn = vit.blocks[0].attn
    attn.q_bias.set_value(paddle.full([48], 2.0))
    attn.v_bias.set_value(paddle.full([48], 3.0))
    np.testing.assert_array_equal(attn.effective_qkv_bias().numpy(),
                                  np.repeat(np.array([2., 0., 3.], 'f4'), 48))
    none = T.VisionTransformer(**kw, num_classes=5, qkv_bias='none')
    assert none.blocks[0].attn.qkv.bias is None and none.blocks[0].attn.q_bias is None
    assert 'blocks.0.attn.qkv.bias' not in none.state_dict()
    assert T.VisionTransformer(**kw, qkv_bias=False).blocks[0].attn.qkv.bias is None  # timm's bool
    with pytest.raises(ValueError, match="qkv_bias 'kv'"):
        T.VisionTransformer(**kw, qkv_bias='kv')
    mae = T.MaskedAutoencoderViT(**kw, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4,
                                 layer_scale=0.1, qkv_bias='qv', norm_eps=1e-12)
    msd = mae.state_dict()
    assert 'blocks.1.ls2.gamma' in msd and 'blocks.1.attn.q_bias' in msd
    assert not any(k.startswith('decoder_blocks.') and ('gamma' in k or 'q_bias' in k)
                   for k in msd)
    assert 'decoder_blocks.0.attn.qkv.bias' in msd
    assert set(layer_norm_eps(mae).values()) == {1e-12} and 'decoder_norm' in layer_norm_eps(mae)


def variant_step(kernels, imgs, noise):
    """Loss, pred and gradients of one training step of a tiny MAE with BEiT's q / v biases and
    LayerScale (random q / v biases so they matter), with or without the CPU kernels."""
    paddle.seed(0)
    model = T.MaskedAutoencoderViT(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3,
                                   decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4,
                                   layer_scale=0.5, qkv_bias='qv')
    rng = np.random.RandomState(3)
    for blk in model.blocks:
        for p in (blk.attn.q_bias, blk.attn.v_bias):
            p.set_value(rng.randn(48).astype('float32'))
    applies = []
    hook = model.blocks[0].attn.register_forward_pre_hook(
        lambda layer, inp: applies.append(cpu_kernels.attention_applies(
            layer, inp[0], layer.effective_qkv_bias())))
    with cpu_kernels.enabled(kernels):
        loss, pred, _ = model(imgs, 0.75, noise)
        loss.backward()
    hook.remove()
    assert applies == [kernels]  # the path under test was taken
    return float(loss), pred.numpy(), {n: p.grad.numpy() for n, p in model.named_parameters()
                                       if p.grad is not None}


def test_qv_bias_on_the_cpu_kernels_equals_the_plain_path():
    """BEiT's q / v biases through cpu_kernels.attention (the effective bias handed to
    _QKVHeads) give the outputs and gradients (q_bias, v_bias, qkv weight ...) of Paddle's own
    ops; q_bias / v_bias do receive gradients."""
    imgs = paddle.to_tensor(np.random.RandomState(0).randn(2, 3, 32, 32), 'float32')
    noise = paddle.to_tensor(np.random.RandomState(1).rand(2, 16), 'float32')
    loss_ref, pred_ref, grads_ref = variant_step(False, imgs, noise)
    loss, pred, grads = variant_step(True, imgs, noise)
    assert abs(loss - loss_ref) < 1e-5 and np.abs(pred - pred_ref).max() < 1e-5
    assert grads.keys() == grads_ref.keys()
    for name in ('blocks.0.attn.q_bias', 'blocks.0.attn.v_bias', 'blocks.1.attn.q_bias',
                 'blocks.0.attn.qkv.weight', 'blocks.0.ls1.gamma', 'blocks.1.ls2.gamma'):
        assert np.abs(grads_ref[name]).max() > 1e-6, name  # a gradient reaches it
    worst = {n: float(np.abs(grads[n] - grads_ref[n]).max()) for n in grads}
    print('q/v bias, kernels vs plain: max grad diff', max(worst.values()))
    assert max(worst.values()) < 1e-5, worst


def test_layer_scale_qv_mae_trains_a_step():
    """mae_vit_custom with MODEL.LAYER_SCALE 0.1 and QKV_BIAS qv from the config: one
    forward / backward / AdamW step with a finite loss; the gammas and q / v biases get
    gradients, no weight decay (1-D) and their block's layer-decay scale, and move."""
    c = cfgmod.get_config(os.path.join(ROOT, 'configs', 'tiny_pretrain.yaml'))
    cfgmod.merge_opts(c, ['MODEL.LAYER_SCALE', '0.1', 'MODEL.QKV_BIAS', 'qv',
                          'MODEL.ENCODER.EMBED_DIM', '48', 'MODEL.ENCODER.DEPTH', '2',
                          'MODEL.ENCODER.NUM_HEADS', '3', 'TRAIN.LAYER_DECAY', '0.5'])
    cfgmod.check_values(c)
    paddle.seed(0)
    model = T.build_from_config(c)
    assert isinstance(model, T.MaskedAutoencoderViT)
    rules = optim.param_rules(model, c)
    for i in range(2):
        for s in ('ls1.gamma', 'ls2.gamma', 'attn.q_bias', 'attn.v_bias'):
            assert rules[f'blocks.{i}.{s}'] == (pytest.approx(0.5 ** (2 - i)), 0.0), s
    opt = optim.build_optimizer(model, c, world_size=1)
    opt.set_lr(1e-2)
    params = dict(model.named_parameters())
    before = {n: params[n].numpy().copy() for n in ('blocks.0.ls1.gamma', 'blocks.1.attn.q_bias')}
    imgs = paddle.to_tensor(np.random.RandomState(0).randn(4, 3, 32, 32), 'float32')
    loss, _, _ = model(imgs, c.MODEL.MASK_RATIO)
    loss.backward()
    assert np.isfinite(float(loss))
    for i in range(2):
        for s in ('ls1.gamma', 'ls2.gamma', 'attn.q_bias', 'attn.v_bias'):
            g = params[f'blocks.{i}.{s}'].grad
            assert g is not None and np.isfinite(g.numpy()).all() and np.abs(g.numpy()).max() > 0
    opt.step()
    opt.clear_grad()
    for n, old in before.items():
        assert np.abs(params[n].numpy() - old).max() > 0, n


def test_variant_config_keys_are_checked_and_reach_the_models():
    """A wrong MODEL.QKV_BIAS, LAYER_SCALE < 0, LAYER_NORM_EPS <= 0, or ABS_POS_EMBED False
    with a mae_* model is a ConfigError naming the key; the keys reach the classifier and the
    segmentor's backbone (build_from_config(features_only=True))."""
    c = cfgmod.get_config(os.path.join(ROOT, 'configs', 'tiny_finetune.yaml'))
    with pytest.raises(cfgmod.ConfigError, match=r"MODEL.QKV_BIAS is 'kv'; choose one of"):
        cfgmod.merge_opts(c.clone(), ['MODEL.QKV_BIAS', 'kv'])
    for key, value, match in [('QKV_BIAS', 'kv', r"MODEL.QKV_BIAS is 'kv'"),
                              ('LAYER_SCALE', -0.1, r'MODEL.LAYER_SCALE must be >= 0'),
                              ('LAYER_NORM_EPS', 0.0, r'MODEL.LAYER_NORM_EPS must be > 0')]:
        bad = c.clone()
        bad.MODEL[key] = value
        with pytest.raises(cfgmod.ConfigError, match=match):
            cfgmod.check_values(bad)
    p = cfgmod.get_config(os.path.join(ROOT, 'configs', 'tiny_pretrain.yaml'))
    cfgmod.merge_opts(p, ['MODEL.ABS_POS_EMBED', 'False'])
    cfgmod.check_values(p)
    for build in (T.model_shape, T.build_from_config):
        with pytest.raises(cfgmod.ConfigError, match=r"MODEL.ABS_POS_EMBED False does not fit "
                                                     r"MODEL.NAME 'mae_vit_custom'"):
            build(p)
    opts = ['MODEL.LAYER_SCALE', '0.2', 'MODEL.QKV_BIAS', 'qv', 'MODEL.ABS_POS_EMBED', 'False',
            'MODEL.LAYER_NORM_EPS', '1e-12', 'MODEL.REL_POS_BIAS', 'True']
    cfgmod.merge_opts(c, opts)
    s = cfgmod.merge_opts(cfgmod.get_config(os.path.join(ROOT, 'configs',
                                                         'tiny_segmentation.yaml')), opts)
    for model in (T.build_from_config(c), T.build_model(s).backbone):
        sd = model.state_dict()
        assert 'pos_embed' not in sd and 'blocks.0.attn.qkv.bias' not in sd
        assert 'blocks.0.attn.q_bias' in sd and 'blocks.0.attn.relative_position_bias_table' in sd
        assert float(sd['blocks.3.ls2.gamma'].numpy()[0]) == pytest.approx(0.2)
        assert set(layer_norm_eps(model).values()) == {1e-12}
    seg = T.build_model(s)
    seg.eval()
    assert seg(paddle.randn([1, 3, 32, 32])).shape == [1, s.MODEL.NUM_CLASSES, 32, 32]
