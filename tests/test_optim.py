"""optim.py against independent references: timm's parameter-group rules (what the official MAE
scripts use), torch.optim.AdamW for one step, and a NumPy transcription of the official LARS."""
import functools
import os

import numpy as np
import paddle
import pytest
import timm.models.vision_transformer as timm_vit
import timm.optim._param_groups as timm_groups
import torch

import config as cfgmod
import optim
import tasks  # noqa: F401  (hands the tasks' model builders to transformer.build_model)
import transformer
from conftest import ROOT


def cfg(name, **opts):
    c = cfgmod.get_config(os.path.join(ROOT, 'configs', name + '.yaml'))
    cfgmod.merge_opts(c, [x for kv in opts.items() for x in (kv[0].replace('__', '.'), str(kv[1]))])
    return c


def timm_rules(model, weight_decay, layer_decay=None, no_decay=()):
    """name -> (lr_scale, weight_decay) from timm's group builders."""
    names = {id(p): n for n, p in model.named_parameters()}
    if layer_decay is None:
        groups = timm_groups.param_groups_weight_decay(model, weight_decay, no_decay)
    else:
        groups = timm_groups.param_groups_layer_decay(model, weight_decay, no_decay,
                                                      layer_decay=layer_decay)
    return {names[id(p)]: (g.get('lr_scale', 1.0), g['weight_decay'])
            for g in groups for p in g['params']}


@pytest.mark.slow
@pytest.mark.parametrize('size,depth,dim', [('base', 12, 768), ('large', 24, 1024)])
def test_finetune_groups_equal_timm_layer_decay(size, depth, dim):
    c = cfg(f'vit_{size}_patch16_224_finetune')
    ours = optim.param_rules(transformer.build_model(c), c)
    ref_model = timm_vit.VisionTransformer(
        patch_size=16, embed_dim=dim, depth=depth, num_heads=16, num_classes=1000,
        global_pool='avg', norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6))
    ref = timm_rules(ref_model, c.TRAIN.WEIGHT_DECAY, c.TRAIN.LAYER_DECAY,
                     no_decay=('pos_embed', 'cls_token'))
    assert set(ours) == set(ref)
    for name in ref:
        assert ours[name][0] == pytest.approx(ref[name][0], rel=1e-12), name
        assert ours[name][1] == ref[name][1], name
    ld = c.TRAIN.LAYER_DECAY  # spot checks of the official rule
    assert ours['cls_token'] == (pytest.approx(ld ** (depth + 1)), 0.0)
    assert ours['blocks.0.attn.qkv.weight'] == (pytest.approx(ld ** depth), 0.05)
    assert ours['head.weight'] == (1.0, 0.05) and ours['fc_norm.bias'] == (1.0, 0.0)


@pytest.mark.slow
def test_pretrain_groups_decay_tokens_not_1d():
    c = cfg('vit_base_patch16_224_pretrain')
    model = transformer.build_model(c)
    ours = optim.param_rules(model, c)
    assert 'pos_embed' not in ours and 'decoder_pos_embed' not in ours  # fixed, not trained
    assert ours['cls_token'] == (1.0, 0.05) and ours['mask_token'] == (1.0, 0.05)
    assert ours['blocks.3.norm1.weight'] == (1.0, 0.0) and ours['decoder_pred.bias'] == (1.0, 0.0)
    assert ours['patch_embed.proj.weight'] == (1.0, 0.05)


def test_linear_probe_trains_only_head():
    c = cfg('tiny_linearprobe')
    model = transformer.build_model(c)  # the task freezes all but the head
    assert set(optim.param_rules(model, c)) == {'head.1.weight', 'head.1.bias'}
    assert isinstance(optim.build_optimizer(model, c, 1), paddle.optimizer.AdamW)  # tiny config
    c = cfg('tiny_linearprobe', TRAIN__OPTIMIZER__NAME='LARS')  # the official recipe's
    assert isinstance(optim.build_optimizer(model, c, 1), optim.LARS)
    for key, value, message in (('TRAIN.GRAD_CLIP', '1.0', 'TRAIN.GRAD_CLIP is not supported'),
                                ('TRAIN.AMP_LEVEL', 'O2', 'TRAIN.AMP_LEVEL O2 needs')):
        bad = cfg('tiny_linearprobe', TRAIN__OPTIMIZER__NAME='LARS', TRAIN__AMP='bfloat16',
                  **{key.replace('.', '__'): value})
        with pytest.raises(cfgmod.ConfigError, match=message):
            optim.build_optimizer(model, bad, 1)


def test_schedule_warmup_cosine():
    c = cfg('vit_base_patch16_224_finetune')  # 100 epochs, warmup 5, min lr 1e-6
    lr = optim.peak_lr(c, world_size=8)
    assert lr == pytest.approx(5e-4 * 1024 / 256)
    assert optim.lr_at(0.0, c, lr) == 0.0
    assert optim.lr_at(2.5, c, lr) == pytest.approx(lr / 2)
    assert optim.lr_at(5.0, c, lr) == pytest.approx(lr)
    assert optim.lr_at(52.5, c, lr) == pytest.approx(1e-6 + (lr - 1e-6) / 2)
    assert optim.lr_at(100.0, c, lr) == pytest.approx(1e-6)
    assert 1e-6 < optim.lr_at(99.0, c, lr) < 1e-5


def test_poly_schedule_equals_torch_linear_warmup_times_polynomial():
    """TRAIN.LR_SCHEDULE poly (mmsegmentation's power-1 poly with linear warmup) against torch's
    ChainedScheduler(LinearLR, PolynomialLR), which multiplies the two factors as mmcv does;
    step t of 10 per epoch, 20 epochs, warmup 3."""
    c = cfg('tiny_finetune', TRAIN__LR_SCHEDULE='poly', TRAIN__NUM_EPOCHS=20,
            TRAIN__WARMUP_EPOCHS=3, TRAIN__MIN_LR=0.0)
    lr, per_epoch = 1e-4, 10
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=lr)
    sched = torch.optim.lr_scheduler.ChainedScheduler([
        torch.optim.lr_scheduler.LinearLR(opt, start_factor=1e-6, total_iters=3 * per_epoch),
        torch.optim.lr_scheduler.PolynomialLR(opt, total_iters=20 * per_epoch, power=1.0)])
    for t in range(20 * per_epoch + 1):
        ref = opt.param_groups[0]['lr']
        assert optim.lr_at(t / per_epoch, c, lr) == pytest.approx(ref, rel=1e-9, abs=1e-6 * lr), t
        opt.step()
        sched.step()
    assert optim.lr_at(20.0, c, lr) == 0.0


@pytest.mark.parametrize('name', ['AdamW', 'SGD'])
def test_steps_equal_torch_with_official_groups(name):
    """AdamW (official betas / eps) and momentum SGD (MoCo v3's probe optimizer): two steps with
    the per-parameter lr scales and weight decays of param_rules equal torch's optimizers."""
    c = cfg('tiny_finetune')
    c.TRAIN.OPTIMIZER.NAME = name
    paddle.seed(0)
    model = transformer.build_model(c)
    rules = optim.param_rules(model, c)
    opt = optim.build_optimizer(model, c, 1)
    lr = 3e-3
    opt.set_lr(lr)
    rng = np.random.RandomState(0)
    start = {n: p.numpy().copy() for n, p in model.named_parameters() if n in rules}
    grads = {n: rng.randn(*v.shape).astype('float32') for n, v in start.items()}
    for step in range(2):
        for n, p in model.named_parameters():
            if n in grads:
                p.grad_value = None
                p._set_grad_ivar(paddle.to_tensor(grads[n] * (step + 1)))
        opt.step()
        opt.clear_grad()
    # torch reference: per-group lr = lr * lr_scale and the group's weight decay
    tparams = {n: torch.tensor(v, requires_grad=True) for n, v in start.items()}
    groups = [{'params': [tparams[n]], 'lr': lr * s, 'weight_decay': wd}
              for n, (s, wd) in rules.items()]
    if name == 'AdamW':
        topt = torch.optim.AdamW(groups, lr=lr, betas=tuple(c.TRAIN.OPTIMIZER.BETAS),
                                 eps=c.TRAIN.OPTIMIZER.EPS)
    else:
        topt = torch.optim.SGD(groups, lr=lr, momentum=c.TRAIN.OPTIMIZER.MOMENTUM)
    for step in range(2):
        for n, t in tparams.items():
            t.grad = torch.from_numpy(grads[n] * (step + 1))
        topt.step()
    params = dict(model.named_parameters())
    worst = max(float(np.abs(params[n].numpy() - tparams[n].detach().numpy()).max())
                for n in tparams)
    print(f'{name} 2 steps vs torch: max abs diff {worst:.2e}')
    assert worst < 1e-5
    moved = max(float(np.abs(params[n].numpy() - start[n]).max()) for n in start)
    assert moved > 1e-3


def lars_reference(p, g, mu, lr, wd, momentum=0.9, trust=0.001):
    """NumPy transcription of the official MAE util/lars.py update for one parameter."""
    if p.ndim > 1:
        g = g + wd * p
        pn, gn = np.linalg.norm(p), np.linalg.norm(g)
        q = trust * pn / gn if (pn > 0 and gn > 0) else 1.0
        g = g * q
    mu = g if mu is None else momentum * mu + g
    return p - lr * mu, mu


def test_lars_equals_numpy_reference():
    rng = np.random.RandomState(1)
    w = paddle.create_parameter([6, 4], 'float32')
    b = paddle.create_parameter([4], 'float32')
    w.set_value(rng.randn(6, 4).astype('float32'))
    b.set_value(rng.randn(4).astype('float32'))
    opt = optim.LARS([('w', w), ('b', b)], learning_rate=0.5, weight_decay=0.1)
    ref = {'w': (w.numpy().copy(), None), 'b': (b.numpy().copy(), None)}
    for step, lr in enumerate((0.5, 0.3, 0.1)):
        opt.set_lr(lr)
        gw, gb = rng.randn(6, 4).astype('float32'), rng.randn(4).astype('float32')
        w._set_grad_ivar(paddle.to_tensor(gw))
        b._set_grad_ivar(paddle.to_tensor(gb))
        opt.step()
        opt.clear_grad()
        ref['w'] = lars_reference(ref['w'][0], gw, ref['w'][1], lr, 0.1)
        ref['b'] = lars_reference(ref['b'][0], gb, ref['b'][1], lr, 0.1)
        np.testing.assert_allclose(w.numpy(), ref['w'][0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(b.numpy(), ref['b'][0], rtol=1e-5, atol=1e-6)
    state = opt.state_dict()
    opt2 = optim.LARS([('w', w), ('b', b)], learning_rate=0.0)
    opt2.set_state_dict(state)
    assert opt2.get_lr() == pytest.approx(0.1)
    np.testing.assert_allclose(opt2._mu['w'].numpy(), ref['w'][1], rtol=1e-5, atol=1e-8)


class _Wrapped(paddle.nn.Layer):
    """A model that wraps the encoder (as a segmentor does): the ViT under 'backbone.', a layer
    of its own beside it."""

    def __init__(self, encoder):
        super().__init__()
        self.backbone = encoder
        self.neck = paddle.nn.Linear(8, 8)


@pytest.mark.slow
def test_wrapped_encoder_groups_equal_the_bare_encoders_under_the_prefix():
    c = cfg('vit_base_patch16_224_finetune')
    bare = optim.param_rules(transformer.build_model(c), c)
    wrapped = optim.param_rules(_Wrapped(transformer.build_model(c)), c)
    assert set(wrapped) == {'backbone.' + n for n in bare} | {'neck.weight', 'neck.bias'}
    for name, rule in bare.items():
        assert wrapped['backbone.' + name] == rule, name
    ld, depth = c.TRAIN.LAYER_DECAY, c.MODEL.ENCODER.DEPTH
    assert wrapped['backbone.pos_embed'] == (pytest.approx(ld ** (depth + 1)), 0.0)
    assert wrapped['backbone.blocks.3.attn.qkv.weight'] == (pytest.approx(ld ** (depth - 3)),
                                                            0.05)
    assert wrapped['neck.weight'] == (1.0, 0.05) and wrapped['neck.bias'] == (1.0, 0.0)
