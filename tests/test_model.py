"""Unit checks of transformer.py against the facts of the official MAE (DESIGN.md section 5)."""
import math
import os

import numpy as np
import paddle
import pytest

import config as cfgmod
import cpu_kernels
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
