"""Parity of the Paddle models with independent PyTorch references, through the converter.

References (code no one here wrote, installed from PyPI, see requirements-test.txt):
- HuggingFace transformers' ViTMAEForPreTraining: the MAE pre-training model (takes `noise`);
- timm's VisionTransformer: the classifier the official models_vit.py subclasses.
Each test builds the reference with random weights, rewrites its state_dict into the official
MAE key layout, saves it as an official checkpoint ({'model': state_dict}), converts it with
port_weights/convert_official.py (CLI), loads the result into the Paddle model and compares
outputs (and gradients) on the same images and masking noise. The model variants (LayerScale,
q / v biases, no absolute position embedding) compare against timm's VisionTransformer and Beit
with the weights copied across by name.
"""
import functools
import os
import re
import subprocess
import sys

import numpy as np
import paddle
import pytest

import timm.models.beit as timm_beit  # noqa: E402
import timm.models.vision_transformer as timm_vit  # noqa: E402
import timm.optim._param_groups as timm_groups  # noqa: E402
import torch  # noqa: E402  (test-only, requirements-test.txt)
from timm.layers import resample_abs_pos_embed  # noqa: E402

import config as cfgmod  # noqa: E402
import optim  # noqa: E402
import paddlefile  # noqa: E402
import transformer  # noqa: E402
from conftest import ROOT  # noqa: E402
from helpers import (MAE_CASES, VIT_CASES, from_torch_sd, hf_mae, hf_to_official,  # noqa: E402
                     perturb_, randomize_, timm_vit_model)

CONVERTER = os.path.join(ROOT, 'port_weights', 'convert_official.py')


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def save_official(state_dict, path):
    torch.save({'model': {k: v.detach().clone().contiguous() for k, v in state_dict.items()}},
               path)


def convert(src, dst):
    r = subprocess.run([sys.executable, CONVERTER, '--src', str(src), '--dst', str(dst)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    return r.stdout


def load_into(model, path):
    # the tensors (the '_meta' entry, the config the file carries, left out)
    state = {k: v for k, v in paddlefile.load(str(path)).items() if k != '_meta'}
    assert sorted(state) == sorted(model.state_dict()), 'converted keys differ from the model'
    model.set_state_dict(state)
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), np.asarray(state[k]), err_msg=k)
    return model


def rel(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def official_grad_to_paddle(name, g):
    """Official-layout gradient (torch) -> Paddle layout (2-D Linear weights transposed)."""
    g = g.detach().numpy()
    return g.T if name.endswith('.weight') and g.ndim == 2 else g


# ---------------------------------------------------------------------------------------------
# MAE pre-training: HF ViTMAE
# ---------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def mae_pair(case, tmp_root):
    kw, batch = MAE_CASES[case]
    torch.manual_seed(0)
    ref = hf_mae(kw).eval()
    perturb_(ref, seed=1)
    official = hf_to_official(ref.state_dict())
    src = os.path.join(tmp_root, f'{case}.pth')
    dst = os.path.join(tmp_root, f'{case}.pdparams')
    save_official(official, src)
    out = convert(src, dst)
    model = load_into(transformer.MaskedAutoencoderViT(**kw), dst)
    model.eval()
    rng = np.random.RandomState(2)
    imgs = rng.randn(batch, 3, kw['img_size'], kw['img_size']).astype('float32')
    num_patches = (kw['img_size'] // kw['patch_size']) ** 2
    noise = rng.rand(batch, num_patches).astype('float32')
    return ref, model, imgs, noise, out


@pytest.fixture(scope='module')
def tmp_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp('parity'))


@pytest.mark.slow
@pytest.mark.parametrize('case', list(MAE_CASES))
def test_mae_forward_matches_hf(case, tmp_root):
    ref, model, imgs, noise, log = mae_pair(case, tmp_root)
    model.eval()
    assert 'pretrain-full' in log
    with torch.no_grad():
        r = ref(pixel_values=torch.from_numpy(imgs), noise=torch.from_numpy(noise))
    loss, pred, mask = model(paddle.to_tensor(imgs), mask_ratio=0.75,
                             noise=paddle.to_tensor(noise))
    np.testing.assert_array_equal(mask.numpy(), r.mask.numpy())
    assert mask.numpy().sum() == imgs.shape[0] * (noise.shape[1] - int(noise.shape[1] * 0.25))
    assert list(pred.shape) == list(r.logits.shape)
    pred_diff = float(np.abs(pred.numpy() - r.logits.numpy()).max())
    loss_rel = abs(float(loss) - float(r.loss)) / abs(float(r.loss))
    print(f'{case}: loss rel diff {loss_rel:.2e}, pred max abs diff {pred_diff:.2e}')
    assert pred_diff < 1e-4
    assert loss_rel < 1e-5


GRAD_NAMES = ['patch_embed.proj.weight', 'cls_token', 'blocks.0.attn.qkv.weight',
              'blocks.0.attn.qkv.bias', 'blocks.1.mlp.fc1.weight', 'norm.weight', 'mask_token',
              'decoder_embed.weight', 'decoder_blocks.0.attn.proj.weight', 'decoder_pred.weight',
              'decoder_pred.bias']


@pytest.mark.slow
@pytest.mark.parametrize('case', ['tiny-normpix', 'nondefault-size-48px-p8'])
def test_mae_gradients_match_hf(case, tmp_root):
    ref, model, imgs, noise, _ = mae_pair(case, tmp_root)
    ref.zero_grad()
    r = ref(pixel_values=torch.from_numpy(imgs), noise=torch.from_numpy(noise))
    r.loss.backward()
    ref_grads = hf_to_official({n: p.grad for n, p in ref.named_parameters()
                                if p.grad is not None})
    model.train()  # the training code path (on CPU: GEMM-only Linear backward)
    model.clear_gradients()
    loss, _, _ = model(paddle.to_tensor(imgs), noise=paddle.to_tensor(noise))
    loss.backward()
    params = dict(model.named_parameters())
    for name in GRAD_NAMES:
        g_ref = official_grad_to_paddle(name, ref_grads[name])
        g = params[name].grad.numpy()
        assert g.shape == g_ref.shape, name
        d = rel(g, g_ref)
        print(f'{case}: grad {name} rel diff {d:.2e}')
        assert d < 1e-4, name
    # the fixed position embeddings get no gradient, as in the official model
    assert params['pos_embed'].grad is None and params['decoder_pos_embed'].grad is None


def test_sincos_pos_embed_matches_hf():
    kw = MAE_CASES['nondefault-size-48px-p8'][0]
    ref = hf_mae(kw)
    model = transformer.MaskedAutoencoderViT(**kw)
    sd = ref.state_dict()
    for ours, theirs in (('pos_embed', 'vit.embeddings.position_embeddings'),
                         ('decoder_pos_embed', 'decoder.decoder_pos_embed')):
        a = model.state_dict()[ours].numpy()
        b = sd[theirs].numpy()
        assert a.shape == b.shape
        assert np.abs(a - b).max() < 1e-6, ours
        assert np.all(a[0, 0] == 0)  # cls row


# ---------------------------------------------------------------------------------------------
# Classifier (fine-tune / linear-probe model): timm VisionTransformer
# ---------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def vit_pair(case, tmp_root):
    """timm reference with perturbed random weights, saved as an official checkpoint, converted
    and loaded into our VisionTransformer -> (reference, model, converter output), both eval."""
    kw = VIT_CASES[case]
    torch.manual_seed(3)
    ref = timm_vit_model(kw).eval()
    perturb_(ref, seed=4, skip=())
    src = os.path.join(tmp_root, f'vit-{case}.pth')
    dst = os.path.join(tmp_root, f'vit-{case}.pdparams')
    save_official(ref.state_dict(), src)
    out = convert(src, dst)
    model = load_into(transformer.VisionTransformer(**kw), dst)
    model.eval()
    return ref, model, out


def vit_images(kw):
    return np.random.RandomState(5).randn(3, 3, kw['img_size'], kw['img_size']).astype('float32')


@pytest.mark.slow
@pytest.mark.parametrize('case', list(VIT_CASES))
def test_vit_logits_match_timm(case, tmp_root):
    kw = VIT_CASES[case]
    ref, model, log = vit_pair(case, tmp_root)
    sd = ref.state_dict()
    # the official global-pool model has fc_norm and no final norm, the cls-token one the reverse
    assert ('fc_norm.weight' in sd) == kw['global_pool']
    assert ('norm.weight' in sd) != kw['global_pool']
    assert 'finetuned' in log
    imgs = vit_images(kw)
    with torch.no_grad():
        r = ref(torch.from_numpy(imgs)).numpy()
    out = model(paddle.to_tensor(imgs)).numpy()
    assert out.shape == r.shape == (3, kw['num_classes'])
    d = float(np.abs(out - r).max())
    print(f'{case}: logits max abs diff {d:.2e}')
    assert d < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize('case, indices', [
    ('deep-global-pool', [0, 2, 3]), ('deep-global-pool', 2), ('deep-global-pool', [-1, 1]),
    ('cls-token', [0, -1]), ('cls-token', 3)])
def test_vit_intermediates_match_timm(case, indices, tmp_root):
    """forward_intermediates = timm's (norm=False, NCHW, intermediates only): block outputs
    before any final norm, cls token dropped, on the patch grid, in block order."""
    kw = VIT_CASES[case]
    ref, model, _ = vit_pair(case, tmp_root)
    imgs = vit_images(kw)
    with torch.no_grad():
        r = ref.forward_intermediates(torch.from_numpy(imgs), indices, norm=False,
                                      output_fmt='NCHW', intermediates_only=True)
    out = model.forward_intermediates(paddle.to_tensor(imgs), indices)
    grid = kw['img_size'] // kw['patch_size']
    assert len(out) == len(r) == (indices if isinstance(indices, int) else len(indices))
    for ours, theirs in zip(out, r):
        assert list(ours.shape) == list(theirs.shape) == [3, kw['embed_dim'], grid, grid]
        d = float(np.abs(ours.numpy() - theirs.numpy()).max())
        print(f'{case} {indices}: intermediate max abs diff {d:.2e}')
        assert d < 1e-5


def test_pos_embed_interpolation_matches_timm():
    rng = np.random.RandomState(6)
    pe = rng.randn(1, 1 + 14 * 14, 32).astype('float32')
    for new in (24, 28, 7):  # 224 -> 384 and 448 (patch 16), and down-sampling
        ours = transformer.interpolate_pos_embed(pe, new)
        theirs = resample_abs_pos_embed(torch.from_numpy(pe), new_size=[new, new],
                                        num_prefix_tokens=1, interpolation='bicubic',
                                        antialias=False).numpy()
        assert ours.shape == theirs.shape == (1, 1 + new * new, 32)
        np.testing.assert_array_equal(ours[:, :1], pe[:, :1])
        assert np.abs(ours - theirs).max() < 1e-5, new


# ---------------------------------------------------------------------------------------------
# Model variants of the MAE family (LayerScale, q/v or no qkv bias, no absolute position
# embedding): timm's VisionTransformer and Beit, weights copied across by name
# ---------------------------------------------------------------------------------------------
VARIANT = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3)
BEIT_NAMES = [(r'\.gamma_1$', '.ls1.gamma'), (r'\.gamma_2$', '.ls2.gamma')]  # timm Beit -> ours


def variant_images():
    return np.random.RandomState(7).randn(2, 3, 32, 32).astype('float32')


def load_reference(model, ref, rename=()):
    """Our model with the reference's weights (names mapped, Linear weights transposed), eval;
    the two must hold the same tensors, name for name."""
    state = from_torch_sd(ref.state_dict(), rename)
    own = model.state_dict()
    assert sorted(state) == sorted(own), set(state) ^ set(own)
    for k, v in state.items():
        assert tuple(v.shape) == tuple(own[k].shape), k
    model.set_state_dict(state)
    model.eval()
    return model


def logits_diff(model, ref, imgs):
    with torch.no_grad():
        r = ref(torch.from_numpy(imgs)).numpy()
    out = model(paddle.to_tensor(imgs)).numpy()
    assert out.shape == r.shape
    return float(np.abs(out - r).max())


def assert_each_matters(model, ref, imgs, names):
    """The comparison sees each of these parameters: zeroing it in our model breaks parity."""
    params = dict(model.named_parameters())
    for name in names:
        kept = params[name].numpy().copy()
        params[name].set_value(np.zeros_like(kept))
        d = logits_diff(model, ref, imgs)
        params[name].set_value(kept)
        assert d > 1e-3, f'{name} does not change the logits ({d:.1e})'


@pytest.mark.parametrize('pool', ['avg', 'token'])
def test_layer_scale_without_qkv_bias_matches_timm_vit(pool):
    """MODEL.LAYER_SCALE / QKV_BIAS 'none' = timm's VisionTransformer(init_values,
    qkv_bias=False), with global pooling and with the cls token."""
    torch.manual_seed(8)
    ref = timm_vit.VisionTransformer(
        **VARIANT, num_classes=5, mlp_ratio=4.0, qkv_bias=False, init_values=0.5,
        global_pool=pool, norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6)).eval()
    randomize_(ref, seed=9)
    model = load_reference(transformer.VisionTransformer(
        **VARIANT, num_classes=5, global_pool=pool == 'avg', layer_scale=0.5, qkv_bias='none'),
        ref)
    assert 'blocks.0.attn.qkv.bias' not in model.state_dict()
    imgs = variant_images()
    d = logits_diff(model, ref, imgs)
    print(f'layer scale, no qkv bias, {pool}: logits max abs diff {d:.2e}')
    assert d < 1e-4
    assert_each_matters(model, ref, imgs, ['blocks.0.ls1.gamma', 'blocks.1.ls2.gamma'])


def beit_pair():
    torch.manual_seed(10)
    ref = timm_beit.Beit(**VARIANT, num_classes=5, global_pool='avg', qkv_bias=True,
                         mlp_ratio=4.0, use_abs_pos_emb=False, use_rel_pos_bias=True,
                         init_values=0.1).eval()
    randomize_(ref, seed=11)
    model = transformer.VisionTransformer(
        **VARIANT, num_classes=5, global_pool=True, abs_pos_embed=False, qkv_bias='qv',
        rel_pos_bias=True, layer_scale=0.1)
    return load_reference(model, ref, BEIT_NAMES), ref


def test_beit_variant_matches_timm_beit():
    """MODEL.ABS_POS_EMBED False + QKV_BIAS 'qv' + REL_POS_BIAS + LAYER_SCALE = timm's Beit
    (no absolute position embedding, q / v biases, relative position tables, gamma_1 / 2,
    mean pooling with fc_norm)."""
    model, ref = beit_pair()
    assert model.pos_embed is None and 'pos_embed' not in model.state_dict()
    imgs = variant_images()
    d = logits_diff(model, ref, imgs)
    print(f'BEiT variant: logits max abs diff {d:.2e}')
    assert d < 1e-4
    assert_each_matters(model, ref, imgs, [
        'blocks.0.attn.q_bias', 'blocks.1.attn.v_bias', 'blocks.0.ls1.gamma',
        'blocks.1.ls2.gamma', 'blocks.0.attn.relative_position_bias_table'])


def test_beit_variant_optimizer_groups_equal_timm():
    """The optimizer's rules cover the new parameters as timm's layer-decay groups do for Beit:
    no weight decay for gammas and q / v biases (1-D), the layer id of their block."""
    model, ref = beit_pair()
    c = cfgmod.get_config()
    c.TRAIN.WEIGHT_DECAY, c.TRAIN.LAYER_DECAY = 0.05, 0.65
    ours = optim.param_rules(model, c)
    no_decay = {n for n, _ in ref.named_parameters()} & ref.no_weight_decay()
    names = {id(p): n for n, p in ref.named_parameters()}
    theirs = {}
    for g in timm_groups.param_groups_layer_decay(ref, 0.05, no_decay, layer_decay=0.65):
        for p in g['params']:
            name = names[id(p)]
            for pattern, repl in BEIT_NAMES:
                name = re.sub(pattern, repl, name)
            theirs[name] = (g['lr_scale'], g['weight_decay'])
    assert set(ours) == set(theirs)
    for name, (scale, decay) in theirs.items():
        assert ours[name][0] == pytest.approx(scale, rel=1e-12), name
        assert ours[name][1] == decay, name
    assert ours['blocks.1.ls2.gamma'] == (pytest.approx(0.65 ** 1), 0.0)
    assert ours['blocks.0.attn.q_bias'] == (pytest.approx(0.65 ** 2), 0.0)


@pytest.mark.parametrize('grid', [(4, 4), (3, 5)])
def test_relative_position_index_matches_timm_beit(grid):
    ours = transformer.relative_position_index(grid)
    theirs = timm_beit.gen_relative_position_index(grid).numpy()
    np.testing.assert_array_equal(ours, theirs)
