"""port_weights/convert_official.py on every source it reads: timm state dicts (.safetensors,
.pth under 'model' / 'state_dict' / bare), HuggingFace ViTMAE and ViT folders; each built with
random weights in its own framework, converted, loaded with checkpoint.load_model (the config
the converted file carries, no -cfg), and compared with the framework's own outputs.
"""
import functools
import json
import os
import subprocess
import sys

import numpy as np
import paddle
import pytest
import torch
import timm.models.vision_transformer as timm_vit
from safetensors.torch import save_file
from transformers import ViTConfig, ViTForImageClassification, ViTMAEForPreTraining

from helpers import ROOT, hf_mae, perturb_, randomize_

import checkpoint  # noqa: E402
import config as cfgmod  # noqa: E402
import tasks  # noqa: E402,F401  (registers the task model builders load_model uses)
from port_weights import convert_official as C  # noqa: E402
from port_weights import export_official as E  # noqa: E402
from utils import UserError  # noqa: E402


def convert(src, dst, **heads):
    lines = []
    kind, info = C.convert_file(str(src), str(dst), log=lines.append, **heads)
    return kind, info, lines


def images(n=2, size=32, seed=0):
    return np.random.RandomState(seed).randn(n, 3, size, size).astype(np.float32)


def timm_model(**kw):
    # (a file without a config does not say its heads: the tests give num_heads=2)
    args = dict(img_size=32, patch_size=8, embed_dim=128, depth=2, num_heads=2, num_classes=5,
                norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6))
    args.update(kw)
    m = timm_vit.VisionTransformer(**args).eval()
    randomize_(m, 0)
    return m


def assert_logits_match(torch_model, dst, x, tol=1e-4):
    model, config = checkpoint.load_model(str(dst))
    with torch.no_grad():
        ref = torch_model(torch.from_numpy(x)).numpy()
    got = model(paddle.to_tensor(x)).numpy()
    assert np.abs(ref - got).max() < tol, np.abs(ref - got).max()
    return config


def test_timm_layerscale_safetensors(tmp_path):
    """timm ViT with LayerScale (init_values, as MAE-JAX exports it), no qkv bias, global pool +
    fc_norm, shipped as .safetensors (timm's hub format)."""
    ref = timm_model(init_values=0.5, qkv_bias=False, global_pool='avg')
    src = tmp_path / 'model.safetensors'
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(src))
    kind, info, lines = convert(src, tmp_path / 'ls.pdparams', num_heads=2)
    assert kind == 'finetuned' and any('safetensors' in x for x in lines)
    config = assert_logits_match(ref, tmp_path / 'ls.pdparams', images())
    assert config.MODEL.LAYER_SCALE > 0 and config.MODEL.QKV_BIAS == 'none'
    assert config.MODEL.GLOBAL_POOL and config.MODEL.NUM_CLASSES == 5


@pytest.mark.parametrize('wrapper', ['model', 'state_dict', None])
def test_timm_pth_cls_token(tmp_path, wrapper):
    """timm ViT, cls-token head, torch.save'd bare or under 'model' / 'state_dict'."""
    ref = timm_model(global_pool='token')
    sd = ref.state_dict()
    src = tmp_path / 'vit.pth'
    torch.save({wrapper: sd, 'epoch': 3} if wrapper else sd, str(src))
    kind, _, lines = convert(src, tmp_path / 'vit.pdparams', num_heads=2)
    assert kind == 'finetuned'
    config = assert_logits_match(ref, tmp_path / 'vit.pdparams', images())
    assert not config.MODEL.GLOBAL_POOL and config.MODEL.QKV_BIAS == 'qkv'
    assert any('epoch' in x for x in lines) == (wrapper is not None)


def test_hf_vitmae_folder_gives_hf_loss_and_pred(tmp_path):
    """HF ViTMAEForPreTraining saved with save_pretrained: heads, LayerNorm eps (1e-12),
    norm_pix_loss and mask_ratio come from config.json; loss, pred and mask equal HF's with the
    same noise."""
    kw = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3,
              decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4, norm_pix_loss=True)
    ref = hf_mae(kw).eval()
    perturb_(ref, 0)
    ref.save_pretrained(str(tmp_path / 'hf'))
    kind, info, _ = convert(tmp_path / 'hf', tmp_path / 'mae.pdparams')
    assert kind == 'pretrain-full'
    model, config = checkpoint.load_model(str(tmp_path / 'mae.pdparams'))
    assert config.MODEL.NORM_PIX_LOSS and config.MODEL.LAYER_NORM_EPS == ref.config.layer_norm_eps
    x = images(3)
    noise = np.random.RandomState(1).rand(3, 16).astype(np.float32)
    with torch.no_grad():
        out = ref(torch.from_numpy(x), noise=torch.from_numpy(noise))
    loss, pred, mask = model(paddle.to_tensor(x), mask_ratio=config.MODEL.MASK_RATIO,
                             noise=paddle.to_tensor(noise))
    assert abs(float(loss) - float(out.loss)) <= 1e-5 * abs(float(out.loss))
    assert np.abs(pred.numpy() - out.logits.numpy()).max() < 1e-4
    assert np.array_equal(mask.numpy(), out.mask.numpy())


def test_hf_vit_classifier_folder_carries_its_labels(tmp_path):
    labels = ['cat', 'dog', 'fox']
    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=48, num_hidden_layers=2,
                    num_attention_heads=3, intermediate_size=96, num_labels=3,
                    id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)})
    ref = ViTForImageClassification(cfg).eval()
    perturb_(ref, 0)
    ref.save_pretrained(str(tmp_path / 'hf'))
    convert(tmp_path / 'hf', tmp_path / 'vit.pdparams')
    model, _ = checkpoint.load_model(str(tmp_path / 'vit.pdparams'))
    x = images()
    with torch.no_grad():
        want = ref(torch.from_numpy(x)).logits.numpy()
    assert np.abs(model(paddle.to_tensor(x)).numpy() - want).max() < 1e-4
    assert checkpoint.saved_meta(str(tmp_path / 'vit.pdparams'))['classes'] == labels


def test_a_converted_file_needs_no_cfg_for_eval(tmp_path):
    """checkpoint.config_for (what -eval and the tools call) takes the converted file's own
    config: the same model load_model builds."""
    ref = timm_model(global_pool='avg')
    torch.save({'model': ref.state_dict()}, str(tmp_path / 'v.pth'))
    convert(tmp_path / 'v.pth', tmp_path / 'v.pdparams', num_heads=2)
    config = checkpoint.config_for(None, str(tmp_path / 'v.pdparams'), lambda c: None)
    assert config.MODEL.NUM_CLASSES == 5 and config.DATA.IMAGE_SIZE == 32
    assert config.MODEL.ENCODER.EMBED_DIM == 128 and config.TRAIN.MODE == 'finetune'


def _write_bad(kind, tmp_path):
    if kind == 'folder without config.json':
        path = tmp_path / 'hf'
        path.mkdir()
        save_file({'w': torch.zeros(2)}, str(path / 'model.safetensors'))
        return path, 'without config.json'
    if kind == 'safetensors of another model':
        path = tmp_path / 'resnet.safetensors'
        save_file({'conv1.weight': torch.zeros(8, 3, 7, 7), 'fc.weight': torch.zeros(10, 8)},
                  str(path))
        return path, 'not an MAE / ViT checkpoint'
    if kind == 'unsupported HF architecture':
        path = tmp_path / 'swin'
        path.mkdir()
        with open(path / 'config.json', 'w') as f:
            json.dump({'model_type': 'swin', 'architectures': ['SwinForImageClassification']}, f)
        save_file({'w': torch.zeros(2)}, str(path / 'model.safetensors'))
        return path, "model_type 'swin'"
    path = tmp_path / 'cut.safetensors'
    save_file(timm_model().state_dict(), str(path))
    with open(path, 'r+b') as f:
        f.truncate(os.path.getsize(path) - 100)
    return path, 'truncated'


@pytest.mark.slow
@pytest.mark.parametrize('kind', ['folder without config.json', 'safetensors of another model',
                                  'unsupported HF architecture', 'truncated safetensors'])
def test_bad_inputs_are_one_line_and_write_nothing(tmp_path, kind):
    src, message = _write_bad(kind, tmp_path)
    dst = tmp_path / 'out.pdparams'
    r = subprocess.run([sys.executable, os.path.join(ROOT, 'port_weights', 'convert_official.py'),
                        '--src', str(src), '--dst', str(dst)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 1 and 'Traceback' not in r.stderr
    errors = [x for x in r.stderr.splitlines() if x.startswith('error:')]
    assert len(errors) == 1 and message in errors[0] and str(src) in errors[0], r.stderr
    assert sorted(os.listdir(tmp_path)) == sorted([os.path.basename(src)])


def test_a_1000_class_head_carries_imagenet_wordnet_ids(tmp_path):
    """ImageNet-1k's identity is the sorted WordNet ids: a 1000-class head without names gets
    them, and so does an HF classifier naming the classes by ImageNet's words in that order."""
    import classnames
    wnids = [w for w, _ in classnames.imagenet1k()]
    ref = timm_model(num_classes=1000, global_pool='avg')
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / 'a.safetensors'))
    convert(tmp_path / 'a.safetensors', tmp_path / 'a.pdparams', num_heads=2)
    assert checkpoint.saved_meta(str(tmp_path / 'a.pdparams'))['classes'] == wnids
    words = [names for _, names in classnames.imagenet1k()]
    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=1,
                    num_attention_heads=1, intermediate_size=64, num_labels=1000,
                    id2label=dict(enumerate(words)))
    ViTForImageClassification(cfg).save_pretrained(str(tmp_path / 'hf'))
    convert(tmp_path / 'hf', tmp_path / 'b.pdparams')
    assert checkpoint.saved_meta(str(tmp_path / 'b.pdparams'))['classes'] == wnids
    assert classnames.display(wnids[:2]) == ['tench', 'goldfish']


@pytest.mark.slow
def test_layerscale_mae_pretrains_finetunes_exports_to_timm_and_back(tmp_path):
    """A LayerScale MAE (QKV_BIAS none) through the entry points: pre-training, fine-tuning
    from it, export of the classifier as .safetensors that timm loads with init_values (same
    logits), and conversion of that file back (the same weights, the config carried)."""
    from helpers import TINY_ARCH, run
    sys.path.insert(0, os.path.join(ROOT, 'tools'))
    import make_demo_dataset
    from port_weights import export_official as E
    data = str(tmp_path / 'data')
    make_demo_dataset.make(data, train_per_class=4, val_per_class=2, size=32, log=lambda m: None)
    variant = ['MODEL.LAYER_SCALE', '0.1', 'MODEL.QKV_BIAS', 'none']
    common = TINY_ARCH + variant + ['DATA.BATCH_SIZE', '8', 'TRAIN.NUM_EPOCHS', '1',
                                    'TRAIN.WARMUP_EPOCHS', '0']
    run('main_multi_gpu_pretrain.py', 'tiny_pretrain.yaml', '-data_path', data,
        '-output', str(tmp_path / 'pre'), opts=common)
    pre = paddle_state(tmp_path / 'pre' / 'latest.pdparams')
    assert pre['blocks.0.ls1.gamma'].shape == (48,) and 'blocks.0.attn.qkv.bias' not in pre
    assert not np.allclose(pre['blocks.0.ls1.gamma'], 0.1)  # trained
    run('main_multi_gpu_finetune.py', 'tiny_finetune.yaml', '-data_path', data,
        '-output', str(tmp_path / 'ft'), '-pretrained', str(tmp_path / 'pre' / 'latest.pdparams'),
        opts=common)
    ft_path = str(tmp_path / 'ft' / 'latest.pdparams')
    E.export(E.parse_args(['--src', ft_path, '--dst', str(tmp_path / 'ft.safetensors')]),
             log=lambda *a: None)
    model, config = checkpoint.load_model(ft_path)
    ref = timm_vit.VisionTransformer(
        img_size=32, patch_size=4, embed_dim=48, depth=2, num_heads=3, num_classes=10,
        init_values=0.1, qkv_bias=False, global_pool='avg',
        norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6)).eval()
    from safetensors.torch import load_file
    ref.load_state_dict(load_file(str(tmp_path / 'ft.safetensors')), strict=True)
    x = images()
    with torch.no_grad():
        want = ref(torch.from_numpy(x)).numpy()
    assert np.abs(model(paddle.to_tensor(x)).numpy() - want).max() < 1e-4
    convert(tmp_path / 'ft.safetensors', tmp_path / 'back.pdparams', num_heads=3)
    back, cfg = checkpoint.load_model(str(tmp_path / 'back.pdparams'))
    assert cfg.MODEL.LAYER_SCALE > 0 and cfg.MODEL.QKV_BIAS == 'none'
    for k, v in model.state_dict().items():
        assert np.array_equal(v.numpy(), back.state_dict()[k].numpy()), k


def paddle_state(path):
    return {k: np.asarray(v) for k, v in checkpoint.split_meta(
        checkpoint.load_file(str(path), 'weights'))[0].items()}


def test_heads_of_a_file_without_config_are_unknown_not_guessed(tmp_path):
    """Exported (.pth, no config) from a model of head dim 32 (128 wide, 4 heads) and converted
    back: the heads are 'unknown', the file carries no config (so -eval asks for one), the usage
    line leaves N to fill; --num-heads 4 gives the trained model back, logits and all."""
    config = cfgmod.get_config(os.path.join(ROOT, 'configs', 'tiny_finetune.yaml'))
    assert (config.MODEL.ENCODER.EMBED_DIM, config.MODEL.ENCODER.NUM_HEADS) == (128, 4)
    paddle.seed(0)
    model = tasks.get_task(config).build_model()
    rng = np.random.RandomState(0)
    model.set_state_dict({k: v.numpy() + 0.05 * rng.standard_normal(v.shape).astype('float32')
                          for k, v in model.state_dict().items()})
    model.eval()
    src, pth = str(tmp_path / 'run.pdparams'), str(tmp_path / 'run.pth')
    paddle.save(dict(model.state_dict(), **{checkpoint.META_KEY: checkpoint.run_meta(config)}),
                src)
    E.export(E.parse_args(['--src', src, '--dst', pth]), log=lambda *a: None)
    _, info, lines = convert(pth, tmp_path / 'guess.pdparams')
    assert info['unknown_heads'] == ['num_heads'] and info['config'] is None
    assert any(x.startswith('heads: num_heads unknown') for x in lines), lines
    assert any('MODEL.ENCODER.NUM_HEADS N ' in x for x in lines if x.startswith('use it with'))
    assert checkpoint.saved_meta(str(tmp_path / 'guess.pdparams')) is None
    with pytest.raises(UserError, match='-cfg FILE is needed'):
        checkpoint.config_for(None, str(tmp_path / 'guess.pdparams'), lambda c: None)
    _, info, lines = convert(pth, tmp_path / 'told.pdparams', num_heads=4)
    assert info['unknown_heads'] == []
    assert any(x.startswith('heads: num_heads 4 (from --num-heads') for x in lines), lines
    back, cfg = checkpoint.load_model(str(tmp_path / 'told.pdparams'))
    assert cfg.MODEL.ENCODER.NUM_HEADS == 4
    x = paddle.to_tensor(images())
    np.testing.assert_allclose(back(x).numpy(), model(x).numpy(), rtol=0, atol=1e-5)
    cfgmod.merge_opts(config, ['MODEL.ENCODER.NUM_HEADS', '2'])  # the old guess: other logits
    two = tasks.get_task(config).build_model()
    two.set_state_dict(model.state_dict())
    two.eval()
    assert np.abs(two(x).numpy() - model(x).numpy()).max() > 1e-3


def test_the_heads_a_source_carries_win_over_the_flag(tmp_path):
    """An HF folder says its heads (config.json): they are taken, and --num-heads saying
    otherwise is refused rather than hiding them."""
    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=1,
                    num_attention_heads=4, intermediate_size=64, num_labels=3)
    ViTForImageClassification(cfg).save_pretrained(str(tmp_path / 'hf'))
    _, info, lines = convert(tmp_path / 'hf', tmp_path / 'a.pdparams')
    assert info['arch']['num_heads'] == 4 and 'from the config the source carries' in ' '.join(lines)
    assert checkpoint.saved_meta(str(tmp_path / 'a.pdparams')) is not None
    with pytest.raises(C.ConversionError, match=r'--num-heads 2 contradicts .*num_heads 4'):
        convert(tmp_path / 'hf', tmp_path / 'b.pdparams', num_heads=2)
    assert not os.path.exists(tmp_path / 'b.pdparams')
