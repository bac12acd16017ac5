"""port_weights/export_official.py: .pdparams -> official .pth / .safetensors / HF ViTMAE folder.

The .pth is written without torch; torch is used here to READ it (torch.load(weights_only=True))
and as the independent reference: timm's VisionTransformer and HF's ViTMAEForPreTraining load
the exports, and their outputs are compared with the Paddle models'.
"""
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

torch = pytest.importorskip('torch')
safetensors_torch = pytest.importorskip('safetensors.torch')
with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    import paddle

import checkpoint  # noqa: E402
import config as cfgmod  # noqa: E402
import paddlefile  # noqa: E402
import tasks  # noqa: E402
import utils  # noqa: E402
from helpers import (MAE_CASES, VIT_CASES, hf_mae, hf_to_official, make_case,  # noqa: E402
                     perturb_, timm_vit_model)
from port_weights import convert_official as C  # noqa: E402
from port_weights import export_official as E  # noqa: E402

EXPORTER = str(REPO / 'port_weights' / 'export_official.py')
QUIET = dict(log=lambda *a: None)


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def official_case(name):
    """-> (object torch.save writes as the official file, its state_dict of torch tensors)."""
    if name == 'pretrain-full-hf':  # built by torch: HF ViTMAE renamed to the official keys
        torch.manual_seed(0)
        ref = hf_mae(MAE_CASES['tiny-normpix'][0])
        perturb_(ref, seed=1)
        sd = {k: v.detach().clone().contiguous() for k, v in
              hf_to_official(ref.state_dict()).items()}
        return {'model': sd}, sd
    if name == 'finetuned-timm':  # built by torch: timm's ViT (global pool, fc_norm)
        torch.manual_seed(3)
        ref = timm_vit_model(VIT_CASES['global-pool'])
        perturb_(ref, seed=4, skip=())
        sd = {k: v.detach().clone().contiguous() for k, v in ref.state_dict().items()}
        return {'model': sd}, sd
    obj = make_case(name)[0]
    return obj, (obj['model'] if 'model' in obj else obj)


def export(*argv):
    return E.export(E.parse_args([str(a) for a in argv]), **QUIET)


def assert_same_tensors(got, ref, step_counter_zero=True):
    """Every tensor bit for bit (dtype, shape, values, contiguous); a BatchNorm step counter,
    which Paddle does not keep, comes back as 0."""
    assert sorted(got) == sorted(ref)
    for k, t in ref.items():
        g = got[k]
        assert g.dtype == t.dtype and tuple(g.shape) == tuple(t.shape), k
        assert g.is_contiguous(), k
        if k.endswith('.num_batches_tracked') and step_counter_zero:
            assert g.item() == 0, k
        else:
            assert torch.equal(g, t), k


def perturbed(model, seed):
    """Add noise to every tensor so LayerNorm gains, biases and BN buffers are not 1 / 0."""
    rng = np.random.default_rng(seed)
    sd = {}
    for k, v in model.state_dict().items():
        a = v.numpy()
        if k in ('pos_embed', 'decoder_pos_embed'):  # fixed sin-cos tables: kept
            sd[k] = a
        elif k.endswith('._variance'):
            sd[k] = (a + rng.uniform(0.5, 1.5, a.shape)).astype(a.dtype)
        else:
            sd[k] = (a + 0.02 * rng.standard_normal(a.shape)).astype(a.dtype)
    model.set_state_dict(sd)
    return model


def our_checkpoint(tmp_path, cfg_file, opts=(), seed=0):
    """A .pdparams as this project's runs write it (weights + _meta) -> (path, model, config)."""
    config = cfgmod.get_config(str(REPO / cfg_file))
    cfgmod.merge_opts(config, list(opts))
    paddle.seed(seed)
    model = perturbed(tasks.get_task(config).build_model(), seed)
    model.eval()
    path = tmp_path / f'{Path(cfg_file).stem}.pdparams'
    paddle.save(dict(model.state_dict(), **{checkpoint.META_KEY: checkpoint.run_meta(config)}),
                str(path))
    return path, model, config


def refused(argv, capsys):
    """Run as the script does (utils.run_main): exit 2, one 'error: ...' line on stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        utils.run_main(lambda: E.main([str(a) for a in argv]))
    assert e.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), lines
    return lines[0]


# ----------------------------------------------------------------------------------------------
# official -> convert_official.py -> export_official.py: every tensor back, bit for bit
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize('name', ['pretrain-encoder', 'pretrain-full', 'pretrain-full-hf',
                                  'finetuned-global-pool', 'finetuned-timm',
                                  'finetuned-cls-token', 'linear-probe'])
def test_round_trip_bit_for_bit(tmp_path, name):
    obj, ref = official_case(name)
    src, pd1, back = tmp_path / 'official.pth', tmp_path / 'mine.pdparams', tmp_path / 'back.pth'
    torch.save(obj, src)
    kind, _ = C.convert_file(str(src), str(pd1), **QUIET)
    assert export('--src', pd1, '--dst', back) == kind

    loaded = torch.load(str(back), weights_only=True)
    assert list(loaded) == ['model']
    assert_same_tensors(loaded['model'], ref)
    assert not os.path.exists(str(back) + '.tmp')
    if name == 'linear-probe':
        assert loaded['model']['head.0.num_batches_tracked'].dtype == torch.int64

    # the converter reads what the exporter writes, to the same Paddle tensors
    pd2 = tmp_path / 'again.pdparams'
    assert C.convert_file(str(back), str(pd2), **QUIET)[0] == kind
    a, b = paddlefile.load(str(pd1)), paddlefile.load(str(pd2))
    assert sorted(a) == sorted(b)
    for k in a:
        assert np.array_equal(np.asarray(a[k]), np.asarray(b[k])), k


def test_encoder_only_and_safetensors_layouts(tmp_path):
    """A source with a decoder: .pth = pretrain-full (as mae_visualize_*), --encoder-only =
    pretrain-encoder (as mae_pretrain_*), which is also the .safetensors default (--full keeps
    the decoder there); torch.load(mmap=True) maps the aligned records."""
    obj, ref = official_case('pretrain-full')
    src, pd = tmp_path / 'official.pth', tmp_path / 'mine.pdparams'
    torch.save(obj, src)
    C.convert_file(str(src), str(pd), **QUIET)
    enc_ref = {k: v for k, v in ref.items() if not (k == 'mask_token' or k.startswith('decoder_'))}
    assert len(enc_ref) < len(ref)

    export('--src', pd, '--dst', tmp_path / 'enc.pth', '--encoder-only')
    assert_same_tensors(torch.load(str(tmp_path / 'enc.pth'), weights_only=True)['model'],
                        enc_ref)
    export('--src', pd, '--dst', tmp_path / 'enc.safetensors')
    assert_same_tensors(safetensors_torch.load_file(str(tmp_path / 'enc.safetensors')), enc_ref)
    export('--src', pd, '--dst', tmp_path / 'full.safetensors', '--full')
    assert_same_tensors(safetensors_torch.load_file(str(tmp_path / 'full.safetensors')), ref)
    from safetensors import safe_open
    with safe_open(str(tmp_path / 'enc.safetensors'), 'np') as f:
        assert f.metadata() == {'format': 'pt'}
    mapped = torch.load(str(tmp_path / 'enc.pth'), weights_only=True, mmap=True)['model']
    assert_same_tensors(mapped, enc_ref)


def test_pickle_writer_types(tmp_path):
    """The hand-written pickle: nested containers, scalars, ints of every width, every dtype
    torch stores, empty and 0-d arrays -- read by torch and by the restricted reader alike."""
    arrays = {'f32': np.arange(6, dtype='float32').reshape(2, 3), 'f16': np.ones(3, 'float16'),
              'f64': np.array([1.5, -2.0]), 'i64': np.array([-(2 ** 40), 3]),
              'i32': np.arange(4, dtype='int32'), 'u8': np.arange(5, dtype='uint8'),
              'b': np.array([True, False]), 'empty': np.zeros((0, 3), 'float32'),
              'scalar': np.array(7, dtype='int64')}
    obj = {'model': arrays, 'epoch': 799, 'big': 2 ** 70, 'neg': -5, 'mid': 40000,
           'lr': 1.5e-4, 'flag': True, 'none': None, 'list': [1, 'a', (2, 3)], 'tuple': ()}
    path = tmp_path / 'x.pth'
    E.write_pth(str(path), obj)
    got = torch.load(str(path), weights_only=True)
    mine = C.load_torch_checkpoint(str(path))
    for k, a in arrays.items():
        g = got['model'][k].numpy()
        assert np.array_equal(g, a) and g.dtype == a.dtype, k
        assert np.array_equal(mine['model'][k], a) and mine['model'][k].dtype == a.dtype
    for k in ('epoch', 'big', 'neg', 'mid', 'lr', 'flag', 'none', 'tuple'):
        assert got[k] == obj[k] and mine[k] == obj[k], k
    assert got['list'] == [1, 'a', (2, 3)] == mine['list']


# ----------------------------------------------------------------------------------------------
# the exports run in the PyTorch references
# ----------------------------------------------------------------------------------------------
def test_safetensors_classifier_loads_into_timm(tmp_path):
    """timm.create_model(pretrained=True, pretrained_cfg_overlay=dict(file=...)) with the tiny
    shape as keyword overrides; its logits equal the Paddle model's."""
    import timm
    src, model, config = our_checkpoint(tmp_path, 'configs/tiny_finetune.yaml')
    assert config.MODEL.GLOBAL_POOL
    dst = tmp_path / 'tiny.safetensors'
    assert export('--src', src, '--dst', dst) == 'finetuned'
    e = config.MODEL.ENCODER
    ref = timm.create_model(
        'vit_base_patch16_224', pretrained=True, num_classes=config.MODEL.NUM_CLASSES,
        pretrained_cfg_overlay=dict(file=str(dst), num_classes=config.MODEL.NUM_CLASSES),
        img_size=config.DATA.IMAGE_SIZE, patch_size=e.PATCH_SIZE, embed_dim=e.EMBED_DIM,
        depth=e.DEPTH, num_heads=e.NUM_HEADS, global_pool='avg').eval()
    sd = safetensors_torch.load_file(str(dst))
    for k, v in ref.state_dict().items():  # every weight came from the file
        assert torch.equal(v, sd[k]), k
    imgs = np.random.RandomState(5).randn(3, 3, 32, 32).astype('float32')
    with torch.no_grad():
        r = ref(torch.from_numpy(imgs)).numpy()
    out = model(paddle.to_tensor(imgs)).numpy()
    d = float(np.abs(out - r).max())
    print(f'timm logits max abs diff {d:.2e} (|logits| max {np.abs(r).max():.2f})')
    assert out.shape == r.shape == (3, config.MODEL.NUM_CLASSES)
    assert d < 1e-5


def test_hf_folder_matches_paddle_mae(tmp_path):
    """ViTMAEForPreTraining.from_pretrained(DIR): nothing missing or unexpected; with the same
    noise its mask, loss and logits equal the Paddle MAE's (norm_pix_loss on, from _meta; the
    tiny config's heads, which no guess from the widths would give)."""
    from transformers import ViTMAEForPreTraining
    src, model, config = our_checkpoint(tmp_path, 'configs/tiny_pretrain.yaml',
                                        ['MODEL.NORM_PIX_LOSS', 'True', 'MODEL.MASK_RATIO', '0.6'])
    hf_dir = tmp_path / 'hf'
    assert export('--src', src, '--hf', hf_dir) == 'pretrain-full'
    assert sorted(os.listdir(hf_dir)) == ['config.json', 'model.safetensors']
    ref, info = ViTMAEForPreTraining.from_pretrained(str(hf_dir), output_loading_info=True)
    assert not any(info[k] for k in ('missing_keys', 'unexpected_keys', 'mismatched_keys')), info
    ref.eval()
    c = ref.config
    assert (c.norm_pix_loss, c.mask_ratio, c.layer_norm_eps, c.qkv_bias) == (True, 0.6, 1e-6, True)
    assert (c.num_attention_heads, c.decoder_num_attention_heads) == \
        (config.MODEL.ENCODER.NUM_HEADS, config.MODEL.DECODER.NUM_HEADS)
    rng = np.random.RandomState(2)
    imgs = rng.randn(3, 3, 32, 32).astype('float32')
    noise = rng.rand(3, 64).astype('float32')
    with torch.no_grad():
        r = ref(pixel_values=torch.from_numpy(imgs), noise=torch.from_numpy(noise))
    loss, pred, mask = model(paddle.to_tensor(imgs), mask_ratio=0.6, noise=paddle.to_tensor(noise))
    np.testing.assert_array_equal(mask.numpy(), r.mask.numpy())
    pred_diff = float(np.abs(pred.numpy() - r.logits.numpy()).max())
    loss_diff = abs(float(loss) - float(r.loss))
    print(f'HF ViTMAE: loss {float(r.loss):.6f} abs diff {loss_diff:.2e}, '
          f'logits max abs diff {pred_diff:.2e}')
    assert pred_diff < 1e-5 and loss_diff < 1e-5


# ----------------------------------------------------------------------------------------------
# the command line, refusals
# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_pth_and_hf_without_torch(tmp_path):
    src, _, _ = our_checkpoint(tmp_path, 'configs/tiny_pretrain.yaml')
    dst, hf_dir = tmp_path / 'mae.pth', tmp_path / 'hf'
    blocker = tmp_path.parent / f'{tmp_path.name}_no_torch'
    blocker.mkdir()
    (blocker / 'torch.py').write_text('raise ImportError("torch is blocked in this test")\n')
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(blocker)] + [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p]))
    p = subprocess.run([sys.executable, EXPORTER, '--src', str(src), '--dst', str(dst), '--hf',
                        str(hf_dir)], capture_output=True, text=True, cwd=REPO, timeout=300,
                       env=env)
    assert p.returncode == 0, p.stderr
    assert p.stderr == ''
    assert 'kind: pretrain-full' in p.stdout and f'saved: {dst}' in p.stdout
    assert 'pretrain-full layout' in p.stdout and f'saved: {hf_dir}' in p.stdout
    sd = torch.load(str(dst), weights_only=True)['model']
    assert 'mask_token' in sd and 'decoder_pred.weight' in sd
    assert sorted(os.listdir(tmp_path)) == ['hf', 'mae.pth', 'tiny_pretrain.pdparams']


@pytest.mark.slow
def test_cli_refuses_segmentor(tmp_path):
    config = cfgmod.get_config(str(REPO / 'configs/tiny_segmentation.yaml'))
    model = tasks.get_task(config).build_model()
    src, dst = tmp_path / 'seg.pdparams', tmp_path / 'seg.pth'
    paddle.save(dict(model.state_dict(), **{checkpoint.META_KEY: checkpoint.run_meta(config)}),
                str(src))
    p = subprocess.run([sys.executable, EXPORTER, '--src', str(src), '--dst', str(dst)],
                       capture_output=True, text=True, cwd=REPO, timeout=300)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and 'segmentation model' in lines[0] and str(src) in lines[0]
    assert not dst.exists() and not Path(str(dst) + '.tmp').exists()


def test_refusals(tmp_path, capsys):
    obj, _ = official_case('pretrain-encoder')
    pth, enc = tmp_path / 'official.pth', tmp_path / 'enc.pdparams'
    torch.save(obj, pth)
    C.convert_file(str(pth), str(enc), **QUIET)

    line = refused(['--src', pth, '--dst', tmp_path / 'out.pth'], capsys)
    assert 'is a PyTorch checkpoint already' in line
    line = refused(['--src', enc, '--dst', tmp_path / 'out.pth', '--hf', tmp_path / 'hf'], capsys)
    assert '--hf' in line and 'no decoder' in line
    ft_obj, _ = official_case('finetuned-cls-token')
    torch.save(ft_obj, pth)
    ft = tmp_path / 'ft.pdparams'
    C.convert_file(str(pth), str(ft), **QUIET)
    line = refused(['--src', ft, '--dst', tmp_path / 'out.pth', '--encoder-only'], capsys)
    assert '--encoder-only is for pre-training checkpoints' in line
    line = refused(['--src', ft, '--dst', tmp_path / 'out.safetensors', '--full'], capsys)
    assert '--full is for pre-training checkpoints' in line
    line = refused(['--src', enc, '--dst', tmp_path / 'out.onnx'], capsys)
    assert '.pth' in line and '.safetensors' in line
    line = refused(['--src', tmp_path / 'nothing.pdparams', '--dst', tmp_path / 'out.pth'],
                   capsys)
    assert 'no such file' in line
    (tmp_path / 'busy').mkdir()
    (tmp_path / 'busy' / 'notes.txt').write_text('x')
    full_obj, _ = official_case('pretrain-full')
    torch.save(full_obj, pth)
    full = tmp_path / 'full.pdparams'
    C.convert_file(str(pth), str(full), **QUIET)
    line = refused(['--src', full, '--dst', tmp_path / 'out.pth', '--hf', tmp_path / 'busy'],
                   capsys)
    assert 'holds other files' in line
    # nothing written by any refused run
    assert sorted(os.listdir(tmp_path)) == ['busy', 'enc.pdparams', 'ft.pdparams',
                                            'full.pdparams', 'official.pth']
    assert os.listdir(tmp_path / 'busy') == ['notes.txt']


def test_hf_without_config_uses_flags_and_official_defaults(tmp_path, capsys):
    """Weights without a config (a bare state dict): heads for the width (or the flags),
    norm_pix_loss from --norm-pix-loss; a flag that contradicts _meta is refused."""
    import json
    obj, _ = official_case('pretrain-full')  # tiny: embed 64 / 4 heads, decoder 32 / 4 heads
    pth, converted = tmp_path / 'official.pth', tmp_path / 'c.pdparams'
    pd = tmp_path / 'full.pdparams'
    torch.save(obj, pth)
    C.convert_file(str(pth), str(converted), **QUIET)
    paddle.save(checkpoint.split_meta(paddlefile.load(str(converted)))[0], str(pd))
    export('--src', pd, '--hf', tmp_path / 'hf', '--num-heads', '4', '--decoder-num-heads', '4',
           '--norm-pix-loss')
    cfg = json.loads((tmp_path / 'hf' / 'config.json').read_text())
    assert (cfg['num_attention_heads'], cfg['decoder_num_attention_heads'],
            cfg['norm_pix_loss'], cfg['mask_ratio']) == (4, 4, True, 0.75)
    export('--src', pd, '--hf', tmp_path / 'hf')  # into the same folder: replaced
    cfg = json.loads((tmp_path / 'hf' / 'config.json').read_text())
    assert (cfg['num_attention_heads'], cfg['norm_pix_loss']) == (1, False)  # 64 // 64
    line = refused(['--src', pd, '--hf', tmp_path / 'hf2', '--num-heads', '3'], capsys)
    assert 'does not divide' in line

    src, _, _ = our_checkpoint(tmp_path, 'configs/tiny_pretrain.yaml',
                               ['MODEL.NORM_PIX_LOSS', 'False'])
    line = refused(['--src', src, '--hf', tmp_path / 'hf3', '--norm-pix-loss'], capsys)
    assert 'contradicts the config' in line
