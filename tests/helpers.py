"""Helpers shared by the test modules: paths, real photographs and image writers, tiny
configs, entry-point runs and their outputs, tiny models as official checkpoints, and the
independent PyTorch references (HF ViTMAE, timm's ViT) in the official key layout.

Real photographs come from scikit-image's wheel (skimage/data holds them; no download at test
time). The package is only located, not imported.
"""
import argparse
import functools
import importlib.util
import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
import types

import numpy as np
import paddle
import pytest
import timm.models.vision_transformer as timm_vit
import torch  # (test-only, requirements-test.txt)
from PIL import Image
from transformers import ViTMAEConfig, ViTMAEForPreTraining

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import config  # noqa: E402
import paddlefile  # noqa: E402
import transformer as T  # noqa: E402


# ----------------------------------------------------------------------------------------------
# photographs, image files, tiny configs
# ----------------------------------------------------------------------------------------------
# RGB photographs of different sizes and aspect ratios, and a grayscale one.
PHOTOS = ['astronaut.png', 'chelsea.png', 'coffee.png', 'rocket.jpg', 'motorcycle_left.png',
          'camera.png']


def photo_dir():
    spec = importlib.util.find_spec('skimage')
    if spec is None or not spec.submodule_search_locations:
        pytest.fail('scikit-image is needed for its sample photographs: '
                    'pip install -r requirements-test.txt')
    return os.path.join(list(spec.submodule_search_locations)[0], 'data')


def photo_path(name):
    return os.path.join(photo_dir(), name)


def photo(name, size=None):
    """A sample photograph as an RGB PIL image, optionally resized to `size` (w, h)."""
    img = Image.open(photo_path(name)).convert('RGB')
    return img.resize(size, Image.BICUBIC) if size else img


def tiny_config(stage='finetune', **keys):
    """configs/tiny_<stage>.yaml with KEY.SUB=value overrides (use '__' for '.')."""
    cfg = config.get_config(os.path.join(ROOT, 'configs', f'tiny_{stage}.yaml'))
    opts = []
    for k, v in keys.items():
        opts += [k.replace('__', '.'), v]
    return config.merge_opts(cfg, opts)


def noise_image(w, h, seed=0, mode='RGB'):
    rng = np.random.default_rng(seed)
    shape = (h, w, 3) if mode == 'RGB' else (h, w)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)


def save_jpeg_with_orientation(img, path, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    img.save(path, 'JPEG', quality=95, exif=exif.tobytes())


def write_awkward_images(folder):
    """Readable but unusual files -> {name: (path, expected (w, h) after loading)}."""
    os.makedirs(folder, exist_ok=True)
    base = photo('chelsea.png', (60, 40))
    out = {}

    def keep(name, img, size, **save):
        path = os.path.join(folder, name)
        img.save(path, **save)
        out[name] = (path, size)

    keep('cmyk.jpg', base.convert('CMYK'), (60, 40), quality=95)
    gray16 = np.linspace(0, 65535, 60 * 40).reshape(40, 60).astype(np.uint16)
    keep('gray16.png', Image.fromarray(gray16), (60, 40))
    keep('gray8.png', base.convert('L'), (60, 40))
    rgba = base.convert('RGBA')
    rgba.putalpha(Image.new('L', base.size, 0))
    keep('rgba_transparent.png', rgba, (60, 40))
    keep('palette.png', base.convert('P', palette=Image.ADAPTIVE, colors=16), (60, 40))
    pal = base.convert('P', palette=Image.ADAPTIVE, colors=16)
    keep('palette_transparency.gif', pal, (60, 40), transparency=0)
    keep('one_by_one.png', noise_image(1, 1), (1, 1))
    keep('one_by_thousand.png', noise_image(1, 1000), (1, 1000))
    keep('thousand_by_one.jpg', noise_image(1000, 1), (1000, 1), quality=95)
    keep('bilevel.png', base.convert('1'), (60, 40))
    path = os.path.join(folder, 'exif_rotated.jpg')
    save_jpeg_with_orientation(base, path, 6)  # stored 60x40, shown rotated 90 degrees: 40x60
    out['exif_rotated.jpg'] = (path, (40, 60))
    return out


def write_broken_images(folder):
    """Unreadable files -> {name: path}; 'missing.jpg' is not created."""
    os.makedirs(folder, exist_ok=True)
    buf = io.BytesIO()
    photo('chelsea.png').save(buf, 'JPEG', quality=90)
    data = buf.getvalue()
    files = {'truncated.jpg': data[:len(data) // 3], 'not_an_image.jpg': b'hello, not a JPEG\n',
             'empty.png': b''}
    out = {}
    for name, content in files.items():
        out[name] = os.path.join(folder, name)
        with open(out[name], 'wb') as f:
            f.write(content)
    out['missing.jpg'] = os.path.join(folder, 'missing.jpg')
    return out


def write_tar(path, members):
    """A plain tar of (member name, bytes) pairs -> its path (str)."""
    with tarfile.open(path, 'w', format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def png_bytes(seed, size=8):
    """A noise image encoded as PNG."""
    buf = io.BytesIO()
    noise_image(size, size, seed).save(buf, format='PNG')
    return buf.getvalue()


def write_list(path, lines):
    with open(path, 'w') as f:
        f.write('\n'.join(lines) + '\n')
    return path


# ----------------------------------------------------------------------------------------------
# entry-point runs: command, log lines, parameters
# ----------------------------------------------------------------------------------------------
TINY_ARCH = ['MODEL.ENCODER.EMBED_DIM', '48', 'MODEL.ENCODER.DEPTH', '2',
             'MODEL.ENCODER.NUM_HEADS', '3', 'MODEL.DECODER.EMBED_DIM', '32',
             'MODEL.DECODER.DEPTH', '1', 'MODEL.DECODER.NUM_HEADS', '4']


def run(script, cfg, *args, opts=(), nproc=1, check=True, env=None, timeout=600):
    cmd = [sys.executable]
    if nproc > 1:
        cmd += ['-m', 'paddle.distributed.launch', '--nproc_per_node', str(nproc),
                '--log_dir', os.path.join(str(args[args.index('-output') + 1]) if '-output' in
                                          args else '/tmp', 'launch_logs')]
    cmd += [os.path.join(ROOT, script), '-cfg', os.path.join(ROOT, 'configs', cfg)] + \
        list(args) + ['-opts'] + list(opts) + ['REPORT_FREQ', '100']
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                       env=dict(os.environ, **(env or {})))
    if check:
        assert r.returncode == 0, f'{cmd}\nstdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}'
    return r


def log_lines(out):
    with open(os.path.join(out, 'log.txt')) as f:
        return [json.loads(x) for x in f if x.strip()]


def params(path):
    """The tensors of a .pdparams (its '_meta' entry -- config, class names -- left out)."""
    return {k: np.asarray(v) for k, v in paddlefile.load(path).items() if k != '_meta'}


def max_diff(a, b):
    """Largest abs difference over all parameters, except the key third of each qkv bias: its
    exact gradient is 0 (softmax ignores a constant added to every key), so AdamW turns the
    rounding noise there into lr-sized steps, in any framework."""
    assert sorted(a) == sorted(b)
    worst = 0.0
    for k in a:
        x, y = a[k].astype('float64'), b[k].astype('float64')
        if k.endswith('attn.qkv.bias'):
            third = x.shape[0] // 3
            x, y = np.delete(x, np.s_[third:2 * third]), np.delete(y, np.s_[third:2 * third])
        worst = max(worst, float(np.abs(x - y).max()))
    return worst


def kill_and_resume(args, opts, tmp_path, between=None):
    """Tiny pre-training (args, -opts opts) run uninterrupted into tmp_path/ref, and again into
    tmp_path/killed, killed -9 once it has saved mid-way through epoch 1 and resumed with
    -resume auto. between(killed folder) runs before the resume. -> (the uninterrupted run,
    the resumed run, the folders (ref, killed), max abs parameter difference)."""
    ref, killed = str(tmp_path / 'ref'), str(tmp_path / 'killed')
    first = run('main_multi_gpu_pretrain.py', 'tiny_pretrain.yaml', *args, '-output', ref,
                opts=opts)
    cmd = [sys.executable, os.path.join(ROOT, 'main_multi_gpu_pretrain.py'), '-cfg',
           os.path.join(ROOT, 'configs', 'tiny_pretrain.yaml'), *args, '-output', killed,
           '-opts', *opts, 'REPORT_FREQ', '100']
    kill_once_saved_mid_epoch_1(cmd, killed)
    assert len(log_lines(killed)) < 3
    if between is not None:
        between(killed)
    resumed = run('main_multi_gpu_pretrain.py', 'tiny_pretrain.yaml', *args, '-output', killed,
                  '-resume', 'auto', opts=opts)
    d = max_diff(params(os.path.join(ref, 'latest.pdparams')),
                 params(os.path.join(killed, 'latest.pdparams')))
    return first, resumed, (ref, killed), d


def kill_once_saved_mid_epoch_1(cmd, out):
    """Run cmd and kill -9 it (with its loader workers) once it has saved mid-way through
    epoch 1: an iteration checkpoint after epoch_0's (the save moves the pair before it to
    previous.*, so previous.pdparams is epoch_0.pdparams), and no epoch_1.pdparams yet."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    epoch_0, previous = (os.path.join(out, f'{name}.pdparams') for name in ('epoch_0',
                                                                            'previous'))
    try:
        while time.time() < deadline and proc.poll() is None:
            try:
                if os.path.samefile(previous, epoch_0) and \
                        not os.path.samefile(os.path.join(out, 'latest.pdparams'), epoch_0):
                    time.sleep(0.05)  # (the .pdopt is renamed just after the .pdparams)
                    break
            except FileNotFoundError:
                pass
            time.sleep(0.02)
        assert proc.poll() is None, 'the run ended before it could be killed'
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not os.path.exists(os.path.join(out, 'epoch_1.pdparams')), 'killed too late'


# ----------------------------------------------------------------------------------------------
# tiny Paddle models written as official (PyTorch) checkpoints
# ----------------------------------------------------------------------------------------------
TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4)
TINY_DECODER = dict(decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4)


def tiny_mae():
    return T.MaskedAutoencoderViT(**TINY, **TINY_DECODER)


def tiny_vit(global_pool=True, num_classes=10, linear_probe=False):
    m = T.VisionTransformer(**TINY, num_classes=num_classes, global_pool=global_pool)
    if linear_probe:
        T.add_linear_probe_head(m)
    return m


def paddle_numpy_sd(model):
    return {k: v.numpy().copy() for k, v in model.state_dict().items()}


def to_torch_sd(sd):
    """Paddle-layout numpy state_dict -> official torch layout: Linear weights [out, in],
    BatchNorm buffers running_mean / running_var / num_batches_tracked."""
    out = {}
    for k, v in sd.items():
        if k.endswith('._mean'):
            out[k[:-len('._mean')] + '.running_mean'] = torch.from_numpy(v)
            out[k[:-len('._mean')] + '.num_batches_tracked'] = torch.tensor(7)
        elif k.endswith('._variance'):
            out[k[:-len('._variance')] + '.running_var'] = torch.from_numpy(v)
        elif k.endswith('.weight') and v.ndim == 2:
            out[k] = torch.from_numpy(np.ascontiguousarray(v.T))
        else:
            out[k] = torch.from_numpy(v)
    return out


def encoder_only(sd):
    return {k: v for k, v in sd.items() if not (k.startswith('decoder_') or k == 'mask_token')}


def make_case(name):
    """-> (object to torch.save, expected Paddle numpy state_dict, fresh target model, kind)."""
    paddle.seed(0)
    if name == 'pretrain-encoder':
        expected = encoder_only(paddle_numpy_sd(tiny_mae()))
        return ({'model': to_torch_sd(expected)}, expected,
                tiny_vit(global_pool=False, num_classes=0), 'pretrain-encoder')
    if name == 'pretrain-full':  # an official training checkpoint: more than the weights
        expected = paddle_numpy_sd(tiny_mae())
        obj = {'model': to_torch_sd(expected), 'epoch': 799, 'scaler': {'scale': 65536.0},
               'optimizer': {'state': {0: {'exp_avg': torch.ones(3)}}, 'param_groups': []},
               'args': argparse.Namespace(model='mae_vit_tiny', blr=1.5e-4)}
        return obj, expected, tiny_mae(), 'pretrain-full'
    if name == 'finetuned-global-pool':  # bare state_dict, no {'model': ...}
        expected = paddle_numpy_sd(tiny_vit(global_pool=True))
        return to_torch_sd(expected), expected, tiny_vit(global_pool=True), 'finetuned'
    if name == 'finetuned-cls-token':
        expected = paddle_numpy_sd(tiny_vit(global_pool=False))
        return {'model': to_torch_sd(expected)}, expected, tiny_vit(global_pool=False), 'finetuned'
    if name == 'linear-probe':
        expected = paddle_numpy_sd(tiny_vit(global_pool=False, linear_probe=True))
        rng = np.random.default_rng(0)  # BN buffers that differ from their init values
        expected['head.0._mean'] = rng.normal(size=64).astype('float32')
        expected['head.0._variance'] = rng.uniform(0.5, 2, size=64).astype('float32')
        return ({'model': to_torch_sd(expected)}, expected,
                tiny_vit(global_pool=False, linear_probe=True), 'finetuned')
    raise ValueError(name)


# ----------------------------------------------------------------------------------------------
# PyTorch references in the official key layout: HF ViTMAE, timm ViT
# ----------------------------------------------------------------------------------------------
def perturb_(module, seed, skip=('position_embeddings', 'decoder_pos_embed')):
    """Add noise to every trainable tensor so LayerNorm gains and biases are not 1 / 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if any(s in name for s in skip):
                continue
            p.add_(0.02 * torch.randn(p.shape, generator=g))


_HF_BLOCK = {  # HF ViTMAE layer sub-key -> official block sub-key (q/k/v are fused separately)
    'layernorm_before': 'norm1', 'layernorm_after': 'norm2', 'attention.o_proj': 'attn.proj',
    'mlp.fc1': 'mlp.fc1', 'mlp.fc2': 'mlp.fc2',
}
_HF_TOP = {
    'vit.embeddings.cls_token': 'cls_token',
    'vit.embeddings.position_embeddings': 'pos_embed',
    'vit.embeddings.patch_embeddings.projection': 'patch_embed.proj',
    'vit.layernorm': 'norm',
    'decoder.mask_token': 'mask_token',
    'decoder.decoder_pos_embed': 'decoder_pos_embed',
    'decoder.decoder_embed': 'decoder_embed',
    'decoder.decoder_norm': 'decoder_norm',
    'decoder.decoder_pred': 'decoder_pred',
}


def hf_to_official(tensors):
    """HF ViTMAE names -> official MAE names (fusing q, k, v into qkv, in that order)."""
    out, qkv = {}, {}
    for name, t in tensors.items():
        m = re.match(r'(vit\.layers|decoder\.decoder_layers)\.(\d+)\.(.+)\.(weight|bias)$', name)
        if m:
            prefix = 'blocks' if m.group(1) == 'vit.layers' else 'decoder_blocks'
            sub, kind = m.group(3), m.group(4)
            if sub in ('attention.q_proj', 'attention.k_proj', 'attention.v_proj'):
                qkv.setdefault((prefix, m.group(2), kind), {})[sub[-6]] = t
                continue
            out[f'{prefix}.{m.group(2)}.{_HF_BLOCK[sub]}.{kind}'] = t
            continue
        base, _, kind = name.rpartition('.')
        if name in _HF_TOP:
            out[_HF_TOP[name]] = t
        elif base in _HF_TOP:
            out[f'{_HF_TOP[base]}.{kind}'] = t
        else:
            raise KeyError(f'no official name for HF key {name}')
    for (prefix, i, kind), parts in qkv.items():
        out[f'{prefix}.{i}.attn.qkv.{kind}'] = torch.cat([parts['q'], parts['k'], parts['v']], 0)
    return out


MAE_CASES = {
    # name: (paddle kwargs, batch)
    'tiny-normpix': (dict(img_size=32, patch_size=4, embed_dim=96, depth=3, num_heads=3,
                          decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4,
                          norm_pix_loss=True), 3),
    'tiny-plain': (dict(img_size=32, patch_size=4, embed_dim=96, depth=3, num_heads=3,
                        decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4,
                        norm_pix_loss=False), 3),
    'nondefault-size-48px-p8': (dict(img_size=48, patch_size=8, embed_dim=128, depth=2,
                                     num_heads=8, decoder_embed_dim=48, decoder_depth=1,
                                     decoder_num_heads=3, mlp_ratio=2.0,
                                     norm_pix_loss=True), 2),
    'vit-base-official': (dict(img_size=224, patch_size=16, embed_dim=768, depth=12,
                               num_heads=12, decoder_embed_dim=512, decoder_depth=8,
                               decoder_num_heads=16, norm_pix_loss=True), 2),
}


def hf_mae(kw):
    mlp = kw.get('mlp_ratio', 4.0)
    cfg = ViTMAEConfig(
        image_size=kw['img_size'], patch_size=kw['patch_size'], num_channels=3,
        hidden_size=kw['embed_dim'], num_hidden_layers=kw['depth'],
        num_attention_heads=kw['num_heads'], intermediate_size=int(kw['embed_dim'] * mlp),
        decoder_hidden_size=kw['decoder_embed_dim'],
        decoder_num_hidden_layers=kw['decoder_depth'],
        decoder_num_attention_heads=kw['decoder_num_heads'],
        decoder_intermediate_size=int(kw['decoder_embed_dim'] * mlp),
        norm_pix_loss=kw['norm_pix_loss'], layer_norm_eps=1e-6, qkv_bias=True,
        hidden_act='gelu', mask_ratio=0.75, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, attn_implementation='eager')
    model = ViTMAEForPreTraining(cfg)
    # transformers 5 may leave the fixed sin-cos tables at zero after construction; run its own
    # initialisers so the reference holds the official embeddings
    model.vit.embeddings.patch_embeddings.projection._is_hf_initialized = False
    model.vit.embeddings.initialize_weights()
    model.decoder.initialize_weights(model.vit.embeddings.patch_embeddings.num_patches)
    assert float(model.decoder.decoder_pos_embed.abs().sum()) > 0
    return model


VIT_CASES = {
    'global-pool': dict(img_size=32, patch_size=4, embed_dim=96, depth=3, num_heads=3,
                        num_classes=7, global_pool=True),
    'cls-token': dict(img_size=32, patch_size=4, embed_dim=96, depth=3, num_heads=3,
                      num_classes=7, global_pool=False),
    'vit-base-global-pool': dict(img_size=224, patch_size=16, embed_dim=768, depth=12,
                                 num_heads=12, num_classes=1000, global_pool=True),
    'deep-global-pool': dict(img_size=32, patch_size=4, embed_dim=96, depth=5, num_heads=3,
                             num_classes=7, global_pool=True),
}


def timm_vit_model(kw):
    return timm_vit.VisionTransformer(
        img_size=kw['img_size'], patch_size=kw['patch_size'], embed_dim=kw['embed_dim'],
        depth=kw['depth'], num_heads=kw['num_heads'], num_classes=kw['num_classes'],
        mlp_ratio=4.0, qkv_bias=True, global_pool='avg' if kw['global_pool'] else 'token',
        norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6))


def from_torch_sd(sd, rename=()):
    """A torch state_dict (official / timm layout) -> Paddle-layout numpy arrays: 2-D Linear
    weights transposed ([out, in] -> [in, out]); names rewritten by the (pattern, replacement)
    regex pairs of `rename`, in turn; buffers that name a derived index
    (relative_position_index, BEiT's k_bias) left out."""
    out = {}
    for k, v in sd.items():
        if k.endswith(('relative_position_index', '.k_bias')):
            continue
        for pattern, repl in rename:
            k = re.sub(pattern, repl, k)
        v = v.detach().numpy()
        out[k] = np.ascontiguousarray(v.T) if k.endswith('.weight') and v.ndim == 2 else v
    return out


def randomize_(module, seed, scale=0.1):
    """Add normal noise (std `scale`) to every parameter of a torch module, so LayerScale
    gammas, q / v biases and relative position tables differ from their init and each
    parameter changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


# ----------------------------------------------------------------------------------------------
# mmsegmentation (test-only reference) on mmcv-lite
# ----------------------------------------------------------------------------------------------
def stub_mmcv_ops():
    """Make mmsegmentation 1.2.2 importable on mmcv-lite, which lacks the compiled mmcv.ops:
    a stand-in module with the four names mmseg imports at module level (heads and losses the
    tests never build; calling one raises). Nothing changes where the full mmcv is installed."""
    try:
        import mmcv.ops  # noqa: F401
        return
    except ImportError:
        for name in [k for k in sys.modules if k == 'mmcv.ops' or k.startswith('mmcv.ops.')]:
            del sys.modules[name]

    def missing(name):
        def call(*args, **kwargs):
            raise NotImplementedError(f'mmcv.ops.{name} needs a compiled mmcv (stubbed)')
        return call
    ops = types.ModuleType('mmcv.ops')
    for name in ('point_sample', 'sigmoid_focal_loss', 'CrissCrossAttention', 'PSAMask'):
        setattr(ops, name, missing(name))
    sys.modules['mmcv.ops'] = ops
    import mmcv
    mmcv.ops = ops
