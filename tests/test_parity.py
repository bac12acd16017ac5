"""Parity of the Paddle models with independent PyTorch references, through the converter.

References (code no one here wrote, installed from PyPI, see requirements-test.txt):
- HuggingFace transformers' ViTMAEForPreTraining: the MAE pre-training model (takes `noise`);
- timm's VisionTransformer: the classifier the official models_vit.py subclasses.
Each test builds the reference with random weights, rewrites its state_dict into the official
MAE key layout, saves it as an official checkpoint ({'model': state_dict}), converts it with
port_weights/convert_official.py (CLI), loads the result into the Paddle model and compares
outputs (and gradients) on the same images and masking noise.
"""
import functools
import os
import subprocess
import sys

import numpy as np
import paddle
import pytest

import torch  # noqa: E402  (test-only, requirements-test.txt)
from timm.layers import resample_abs_pos_embed  # noqa: E402

import paddlefile  # noqa: E402
import transformer  # noqa: E402
from conftest import ROOT  # noqa: E402
from helpers import (MAE_CASES, VIT_CASES, hf_mae, hf_to_official, perturb_,  # noqa: E402
                     timm_vit_model)

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
    state = paddlefile.load(str(path))
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
