"""port_weights/convert_official.py on the layouts of the released ADE20K segmentors:
mmsegmentation's UperNet with its MAE and BEiT backbones (built with mmsegmentation's own
modules), unilm's BEiT segmentation checkpoints (the mmseg BEiT's weights in unilm's layout),
HF BeitForSemanticSegmentation folders; each with random weights in its own framework,
converted, loaded with checkpoint.load_model (the config the converted file carries) and
compared with the framework's own decode (and auxiliary) logits.
"""
import json
import os
import re
import subprocess
import sys

import numpy as np
import paddle
import pytest
import torch
import torch.nn.functional as TF
from safetensors.torch import save_file
from transformers import BeitConfig, BeitForSemanticSegmentation

from helpers import ROOT, stub_mmcv_ops

import checkpoint  # noqa: E402
import classnames  # noqa: E402
import config as cfgmod  # noqa: E402
import tasks  # noqa: E402,F401  (registers the task model builders load_model uses)
from port_weights import convert_official as C  # noqa: E402
from port_weights import families  # noqa: E402

IMG, PATCH, DIM, HEADS, CHANNELS, AUX_CHANNELS = 64, 16, 48, 3, 32, 16
GRID = IMG // PATCH
CLASSES = ('sky', 'tree', 'road', 'grass', 'water')


def images(n=2, seed=0):
    return np.random.RandomState(seed).randn(n, 3, IMG, IMG).astype(np.float32)


def randomize_(module, seed):
    """Every weight random at a scale that keeps activations O(1): Linear / conv weights
    N(0, 1/fan_in), norm affines and BatchNorm statistics away from (1, 0), and the tensors the
    frameworks leave at zero or one -- position embeddings, cls token, q / v biases, relative
    position tables, layer-scale gammas -- so that each of them changes the output."""
    g = torch.Generator().manual_seed(seed)

    def randn(t):
        return torch.randn(t.shape, generator=g)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (torch.nn.LayerNorm, torch.nn.BatchNorm2d)):
                m.weight.copy_(1 + 0.2 * randn(m.weight))
                m.bias.copy_(0.2 * randn(m.bias))
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_mean.copy_(0.2 * randn(m.running_mean))
                    m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
            elif isinstance(m, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
                fan_in = m.weight.shape[0] if isinstance(m, torch.nn.ConvTranspose2d) \
                    else m.weight[0].numel()
                m.weight.copy_(randn(m.weight) / fan_in ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(0.1 * randn(m.bias))
        for name, p in module.named_parameters():
            leaf = name.rpartition('.')[2]
            if leaf in ('gamma_1', 'gamma_2', 'lambda_1', 'lambda_2'):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            elif leaf in ('q_bias', 'v_bias'):
                p.copy_(0.1 * randn(p))
            elif leaf in ('pos_embed', 'position_embeddings', 'cls_token',
                          'relative_position_bias_table'):
                p.copy_(0.5 * randn(p))


def convert(src, dst):
    lines = []
    kind, info = C.convert_file(str(src), str(dst), log=lines.append)
    assert kind == 'segmentor'
    return info, lines


def paddle_outputs(dst, x):
    """-> (config, decode logits at 1/4, auxiliary logits or None, eval forward at full size)."""
    model, config = checkpoint.load_model(str(dst))
    xp = paddle.to_tensor(x)
    with paddle.no_grad():
        levels = model.extract_features(xp)
        aux = model.auxiliary_head(levels).numpy() if model.auxiliary_head is not None else None
        return config, model.decode_head(levels).numpy(), aux, model(xp).numpy()


def assert_close(got, want, tol=1e-4):
    assert want.std() > 0.3  # (the comparison is not vacuous)
    diff = float(np.abs(got - want).max())
    assert diff < tol, diff
    return diff


def full_size(logits):
    return TF.interpolate(torch.from_numpy(logits), size=(IMG, IMG), mode='bilinear',
                          align_corners=False).numpy()


# ---------------------------------------------------------------------------------------------
# mmsegmentation's own modules
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def mmseg():
    """-> build(backbone type, num_classes, out_indices, seed): an mmseg EncoderDecoder
    (UperNet + FCN auxiliary head, BN) with random weights, in eval mode, and its config."""
    stub_mmcv_ops()
    import mmseg.models  # noqa: F401  (registers the modules)
    from mmengine.registry import init_default_scope
    from mmseg.registry import MODELS
    init_default_scope('mmseg')
    bn = dict(type='BN', requires_grad=True)

    def build(backbone, num_classes, out_indices, seed):
        cfg = dict(
            type='EncoderDecoder', data_preprocessor=None,
            backbone=dict(type=backbone, img_size=(IMG, IMG), patch_size=PATCH, embed_dims=DIM,
                          num_layers=4, num_heads=HEADS, mlp_ratio=4, out_indices=out_indices,
                          norm_cfg=dict(type='LN', eps=1e-6), init_values=0.1),
            neck=dict(type='Feature2Pyramid', embed_dim=DIM, rescales=[4, 2, 1, 0.5],
                      norm_cfg=bn),
            decode_head=dict(type='UPerHead', in_channels=[DIM] * 4, in_index=[0, 1, 2, 3],
                             pool_scales=(1, 2, 3, 6), channels=CHANNELS, dropout_ratio=0.1,
                             num_classes=num_classes, norm_cfg=bn, align_corners=False),
            auxiliary_head=dict(type='FCNHead', in_channels=DIM, in_index=2,
                                channels=AUX_CHANNELS, num_convs=1, concat_input=False,
                                dropout_ratio=0.1, num_classes=num_classes, norm_cfg=bn,
                                align_corners=False,
                                loss_decode=dict(type='CrossEntropyLoss', loss_weight=0.4)),
            train_cfg=dict(),
            test_cfg=dict(mode='slide', crop_size=(IMG, IMG), stride=(40, 40)))
        torch.manual_seed(seed)
        model = MODELS.build(cfg)
        randomize_(model, seed)
        model.eval()
        return model, cfg
    return build


def pretty_text(cfg):
    """The config as mmcv / mmengine write it into a checkpoint's meta."""
    from mmengine.config import Config
    return Config(dict(model=cfg)).pretty_text


def mmseg_outputs(model, x):
    """-> (decode logits at 1/4, auxiliary logits) of mmseg's own forward."""
    with torch.no_grad():
        xt = torch.from_numpy(x)
        logits = model(xt, mode='tensor')
        aux = model.auxiliary_head(model.neck(model.backbone(xt)))
    return logits.numpy(), aux.numpy()


def test_mmseg_mae_upernet(tmp_path, mmseg):
    """mmseg's MAE backbone (qkv bias, layer scale, per-block tables, pos_embed) saved as mmseg
    0.x publishes it (meta with the config text, no class names): 150 classes -> ADE20K's."""
    model, cfg = mmseg('MAE', 150, [0, 1, 2, 3], seed=0)
    meta = {'mmseg_version': '0.24.0', 'config': pretty_text(cfg), 'iter': 160000,
            'env_info': 'sys.platform: linux'}
    torch.save({'meta': meta, 'state_dict': model.state_dict()}, str(tmp_path / 'mae.pth'))
    info, lines = convert(tmp_path / 'mae.pth', tmp_path / 'mae.pdparams')
    assert 'found: mmsegmentation segmentor, MAE backbone' in lines[1]
    x = images()
    config, logits, aux, full = paddle_outputs(tmp_path / 'mae.pdparams', x)
    want, want_aux = mmseg_outputs(model, x)
    print('mmseg MAE: decode', assert_close(logits, want), 'aux', assert_close(aux, want_aux),
          'full', assert_close(full, full_size(want)))
    m, s = config.MODEL, config.MODEL.SEGMENTATION
    assert (config.TRAIN.MODE, config.DATA.IMAGE_SIZE, m.NUM_CLASSES) == ('segmentation', 64, 150)
    assert (m.LAYER_SCALE > 0, m.QKV_BIAS, m.ABS_POS_EMBED, m.REL_POS_BIAS, m.LAYER_NORM_EPS) \
        == (True, 'qkv', True, True, 1e-6)
    assert (list(s.OUT_INDICES), s.CHANNELS, list(s.POOL_SCALES), s.AUX_CHANNELS, s.AUX_WEIGHT,
            s.SLIDE_STRIDE) == ([0, 1, 2, 3], CHANNELS, [1, 2, 3, 6], AUX_CHANNELS, 0.4, 40)
    assert checkpoint.saved_meta(str(tmp_path / 'mae.pdparams'))['classes'] == \
        list(classnames.ade20k())
    assert sum('relative_position_index' in k for k in info['dropped']) == 4

    # the usage line builds the same model from the repository's config and its -opts
    line = [x for x in lines if x.startswith('use it with: ')][-1].split()
    usage = cfgmod.get_config(os.path.join(ROOT, line[line.index('-cfg') + 1]))
    cfgmod.merge_opts(usage, line[line.index('-opts') + 1:])
    assert usage.MODEL.dump() == config.MODEL.dump() and usage.DATA.IMAGE_SIZE == IMG


@pytest.fixture(scope='module')
def beit_reference(mmseg):
    """mmseg's BEiT UperNet (q / v biases, no pos_embed, 5 classes) and its outputs."""
    model, cfg = mmseg('BEiT', len(CLASSES), [0, 1, 2, 3], seed=1)
    return model, cfg, mmseg_outputs(model, images())


def test_mmseg_beit_upernet(tmp_path, beit_reference):
    """mmseg's BEiT backbone, saved as mmengine saves it (meta: 'cfg', 'dataset_meta')."""
    model, cfg, (want, want_aux) = beit_reference
    meta = {'cfg': pretty_text(cfg), 'dataset_meta': {'classes': CLASSES,
                                                      'palette': [[0, 0, 0]] * len(CLASSES)},
            'mmengine_version': '0.10.7', 'seed': 0, 'iter': 100, 'epoch': 0}
    torch.save({'meta': meta, 'state_dict': model.state_dict()}, str(tmp_path / 'beit.pth'))
    _, lines = convert(tmp_path / 'beit.pth', tmp_path / 'beit.pdparams')
    assert 'found: mmsegmentation segmentor, BEiT backbone' in lines[1]
    config, logits, aux, full = paddle_outputs(tmp_path / 'beit.pdparams', images())
    print('mmseg BEiT: decode', assert_close(logits, want), 'aux', assert_close(aux, want_aux),
          'full', assert_close(full, full_size(want)))
    assert (config.MODEL.QKV_BIAS, config.MODEL.ABS_POS_EMBED) == ('qv', False)
    assert checkpoint.saved_meta(str(tmp_path / 'beit.pdparams'))['classes'] == list(CLASSES)


# ---------------------------------------------------------------------------------------------
# unilm's layout
# ---------------------------------------------------------------------------------------------
# mmseg BEiT name -> unilm name. unilm's code does not install here; its names, from
# microsoft/unilm beit/semantic_segmentation/backbone/beit.py: Block (norm1, attn, norm2,
# mlp.fc1 / mlp.fc2, gamma_1 / gamma_2), Attention (qkv without bias, q_bias, v_bias,
# relative_position_bias_table / _index), BEiT (patch_embed.proj, cls_token, blocks,
# rel_pos_bias = the shared RelativePositionBias, fpn1 = Sequential(ConvTranspose2d,
# SyncBatchNorm, GELU, ConvTranspose2d), fpn2 = Sequential(ConvTranspose2d)); mmseg 0.x heads.
TO_UNILM = (
    (r'^backbone\.layers\.', 'backbone.blocks.'),
    (r'\.ln1\.', '.norm1.'), (r'\.ln2\.', '.norm2.'),
    (r'\.ffn\.layers\.0\.0\.', '.mlp.fc1.'), (r'\.ffn\.layers\.1\.', '.mlp.fc2.'),
    (r'^backbone\.patch_embed\.projection\.', 'backbone.patch_embed.proj.'),
    (r'^neck\.upsample_4x\.', 'backbone.fpn1.'), (r'^neck\.upsample_2x\.', 'backbone.fpn2.'),
)
UNILM_CONFIG = f"""norm_cfg = dict(type='SyncBN', requires_grad=True)
model = dict(
    type='EncoderDecoder',
    pretrained=None,
    backbone=dict(
        type='BEiT', img_size={IMG}, patch_size={PATCH}, embed_dim={DIM}, depth=4,
        num_heads={HEADS}, mlp_ratio=4, qkv_bias=True, use_abs_pos_emb=False,
        use_rel_pos_bias=True, init_values=0.1, drop_path_rate=0.1, out_indices=[0, 1, 2, 3]),
    decode_head=dict(
        type='UPerHead', in_channels=[{DIM}, {DIM}, {DIM}, {DIM}], in_index=[0, 1, 2, 3],
        pool_scales=(1, 2, 3, 6), channels={CHANNELS}, dropout_ratio=0.1, num_classes=5,
        norm_cfg=dict(type='SyncBN', requires_grad=True), align_corners=False,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)),
    auxiliary_head=dict(
        type='FCNHead', in_channels={DIM}, in_index=2, channels={AUX_CHANNELS}, num_convs=1,
        concat_input=False, dropout_ratio=0.1, num_classes=5,
        norm_cfg=dict(type='SyncBN', requires_grad=True), align_corners=False,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=0.4)),
    train_cfg=dict(),
    test_cfg=dict(mode='slide', crop_size=({IMG}, {IMG}), stride=(42, 42)))
optimizer = dict(type='AdamW', lr=3e-05, constructor='LayerDecayOptimizerConstructor')
"""


@pytest.mark.parametrize('shared', [False, True])
def test_unilm_beit_layout(tmp_path, beit_reference, shared):
    """The mmseg BEiT reference's weights in unilm's layout, as its mmcv 1.x runner saves them;
    shared: one table for all blocks (use_shared_rel_pos_bias, backbone.rel_pos_bias), the
    reference's blocks all given that table."""
    model, _, (want, want_aux) = beit_reference
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    x = images()
    if shared:  # the reference run with every block's table = the shared one
        table = 0.5 * torch.randn(sd['backbone.layers.0.attn.relative_position_bias_table'].shape,
                                  generator=torch.Generator().manual_seed(5))
        for k in sd:
            if k.endswith('relative_position_bias_table'):
                sd[k] = table
        original = {k: v.clone() for k, v in model.state_dict().items()}
        model.load_state_dict(sd)
        want, want_aux = mmseg_outputs(model, x)
        model.load_state_dict(original)  # (the fixture is shared)
        index = sd['backbone.layers.0.attn.relative_position_index']
        sd = {k: v for k, v in sd.items() if 'relative_position' not in k}
        sd['backbone.rel_pos_bias.relative_position_bias_table'] = table
        sd['backbone.rel_pos_bias.relative_position_index'] = index
    unilm = {}
    for key, value in sd.items():
        for pattern, replacement in TO_UNILM:
            key = re.sub(pattern, replacement, key)
        unilm[key] = value
    meta = {'mmseg_version': '0.11.0', 'config': UNILM_CONFIG, 'CLASSES': CLASSES,
            'PALETTE': [[0, 0, 0]] * len(CLASSES), 'iter': 160000}
    torch.save({'meta': meta, 'state_dict': unilm}, str(tmp_path / 'unilm.pth'))
    _, lines = convert(tmp_path / 'unilm.pth', tmp_path / 'unilm.pdparams')
    assert 'found: unilm BEiT segmentor' in lines[1]
    config, logits, aux, _ = paddle_outputs(tmp_path / 'unilm.pdparams', x)
    print(f'unilm BEiT (shared {shared}): decode', assert_close(logits, want),
          'aux', assert_close(aux, want_aux))
    assert config.MODEL.SEGMENTATION.SLIDE_STRIDE == 42
    assert checkpoint.saved_meta(str(tmp_path / 'unilm.pdparams'))['classes'] == list(CLASSES)


# ---------------------------------------------------------------------------------------------
# HF BeitForSemanticSegmentation
# ---------------------------------------------------------------------------------------------
def hf_beit(shared, seed=0):
    """A tiny HF BeitForSemanticSegmentation: layer scale, q / v biases, relative position
    bias (per block or shared), no absolute position embedding, an auxiliary head; 6 blocks,
    out_indices [2, 3, 5, 6] (HF's: hidden_states[i - 1] = 0-based blocks 0, 1, 3, 4)."""
    cfg = BeitConfig(
        image_size=IMG, patch_size=PATCH, hidden_size=DIM, num_hidden_layers=6,
        num_attention_heads=HEADS, intermediate_size=4 * DIM, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, use_absolute_position_embeddings=False,
        use_relative_position_bias=not shared, use_shared_relative_position_bias=shared,
        layer_scale_init_value=0.1, use_mask_token=False, out_indices=[2, 3, 5, 6],
        pool_scales=[1, 2, 3, 6], use_auxiliary_head=True, auxiliary_channels=AUX_CHANNELS,
        num_labels=len(CLASSES), id2label=dict(enumerate(CLASSES)),
        label2id={c: i for i, c in enumerate(CLASSES)}, attn_implementation='eager')
    torch.manual_seed(seed)
    model = BeitForSemanticSegmentation(cfg)
    randomize_(model, seed)
    return model.eval()


@pytest.mark.parametrize('spelling, shared', [('file', False), ('modules', True)])
def test_hf_beit_folder(tmp_path, spelling, shared):
    """save_pretrained's folder (the hub files' names) or transformers 5.x's module names;
    decode logits against HF's own forward (at 1/4 and resized), auxiliary ones against HF's
    auxiliary head in that forward."""
    ref = hf_beit(shared)
    folder = tmp_path / 'hf'
    ref.save_pretrained(str(folder))
    if spelling == 'modules':
        os.remove(folder / 'model.safetensors')
        save_file({k: v.contiguous() for k, v in ref.state_dict().items()},
                  str(folder / 'model.safetensors'))
    x = images()
    captured = []
    hook = ref.auxiliary_head.register_forward_hook(lambda m, i, o: captured.append(o))
    with torch.no_grad():
        want = ref(pixel_values=torch.from_numpy(x)).logits.numpy()
    hook.remove()
    _, lines = convert(folder, tmp_path / 'hf.pdparams')
    assert 'found: HuggingFace BeitForSemanticSegmentation' in lines[0]
    config, logits, aux, full = paddle_outputs(tmp_path / 'hf.pdparams', x)
    print(f'HF BEiT ({spelling}, shared {shared}): decode', assert_close(logits, want),
          'aux', assert_close(aux, captured[0].numpy()), 'full', assert_close(full,
                                                                             full_size(want)))
    m = config.MODEL
    assert list(m.SEGMENTATION.OUT_INDICES) == [0, 1, 3, 4]
    assert (m.LAYER_NORM_EPS, m.QKV_BIAS, m.ABS_POS_EMBED, m.REL_POS_BIAS, m.NUM_CLASSES) == \
        (1e-12, 'qv', False, True, len(CLASSES))
    assert (m.SEGMENTATION.CHANNELS, m.SEGMENTATION.AUX_CHANNELS) == (DIM, AUX_CHANNELS)
    assert any('OUT_INDICES [0, 1, 3, 4]' in x for x in lines)
    assert checkpoint.saved_meta(str(tmp_path / 'hf.pdparams'))['classes'] == list(CLASSES)


def test_hf_beit_without_auxiliary_head(tmp_path):
    """use_auxiliary_head False: a segmentor without one (AUX_WEIGHT 0)."""
    ref = hf_beit(False)
    ref.config.use_auxiliary_head = False
    ref.auxiliary_head = None
    ref.save_pretrained(str(tmp_path / 'hf'))
    with torch.no_grad():
        want = ref(pixel_values=torch.from_numpy(images())).logits.numpy()
    convert(tmp_path / 'hf', tmp_path / 'hf.pdparams')
    config, logits, aux, _ = paddle_outputs(tmp_path / 'hf.pdparams', images())
    assert aux is None and config.MODEL.SEGMENTATION.AUX_WEIGHT == 0
    assert_close(logits, want)


# ---------------------------------------------------------------------------------------------
# what the converter reads from a config text, and what it refuses
# ---------------------------------------------------------------------------------------------
def test_config_text_is_read_not_run():
    text = ("import os\nnorm_cfg = dict(type='SyncBN')\n"
            "model = dict(type='EncoderDecoder', backbone=dict(type='MAE', out_indices=[3, 5, 7, "
            "11], norm_cfg=dict(type='LN', eps=1e-06), init=os.system('exit 3')),\n"
            "    decode_head=dict(pool_scales=(1, 2, 3, 6), norm_cfg=norm_cfg))\n")
    model = families.config_model(text)
    assert model['backbone'] == {'type': 'MAE', 'out_indices': [3, 5, 7, 11],
                                 'norm_cfg': {'type': 'LN', 'eps': 1e-6}, 'init': None}
    assert model['decode_head'] == {'pool_scales': [1, 2, 3, 6], 'norm_cfg': None}
    assert families.config_model('model = (') == {}


def _bad_source(kind, tmp_path):
    """-> (path, words the one-line error must hold)."""
    z = torch.zeros
    heads = {'decode_head.conv_seg.weight': z(5, 8, 1, 1), 'decode_head.conv_seg.bias': z(5)}
    if kind == 'mmseg Swin':
        sd = dict(heads, **{'backbone.patch_embed.projection.weight': z(8, 3, 4, 4),
                            'backbone.stages.0.blocks.0.attn.w_msa.qkv.weight': z(24, 8),
                            'backbone.norm0.weight': z(8), 'neck.lateral_convs.0.conv.weight':
                            z(8, 8, 1, 1)})
        text = "model = dict(type='EncoderDecoder', backbone=dict(type='SwinTransformer'))"
        path = tmp_path / 'swin.pth'
        torch.save({'meta': {'config': text}, 'state_dict': sd}, str(path))
        return path, ["'SwinTransformer'", 'backbone.{norm0, patch_embed, stages}']
    if kind == 'mmseg align_corners':
        sd = dict(heads, **{'backbone.layers.0.ln1.weight': z(8)})
        text = "model = dict(decode_head=dict(type='UPerHead', align_corners=True))"
        path = tmp_path / 'ac.pth'
        torch.save({'meta': {'cfg': text}, 'state_dict': sd}, str(path))
        return path, ['decode_head.align_corners True']
    folder = tmp_path / 'hf'  # HF out_indices that tap the embeddings
    folder.mkdir()
    with open(folder / 'config.json', 'w') as f:
        json.dump({'model_type': 'beit', 'out_indices': [1, 3, 5, 7]}, f)
    save_file({'beit.embeddings.cls_token': z(1, 1, 8), 'decode_head.classifier.weight':
               z(5, 8, 1, 1)}, str(folder / 'model.safetensors'))
    return folder, ['out_indices [1, 3, 5, 7]', 'embeddings']


@pytest.mark.parametrize('kind', ['mmseg Swin', 'mmseg align_corners', 'HF out_indices'])
def test_bad_segmentors_are_one_message_and_write_nothing(tmp_path, kind):
    src, words = _bad_source(kind, tmp_path)
    with pytest.raises(C.ConversionError) as e:
        C.convert_file(str(src), str(tmp_path / 'out.pdparams'), log=lambda m: None)
    message = str(e.value)
    assert '\n' not in message and str(src) in message
    assert all(w in message for w in words), message
    assert not os.path.exists(tmp_path / 'out.pdparams')


@pytest.mark.slow
def test_unknown_backbone_from_the_command_line(tmp_path):
    src, words = _bad_source('mmseg Swin', tmp_path)
    r = subprocess.run([sys.executable, os.path.join(ROOT, 'port_weights', 'convert_official.py'),
                        '--src', str(src), '--dst', str(tmp_path / 'out.pdparams')],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and 'Traceback' not in r.stderr
    errors = [x for x in r.stderr.splitlines() if x.startswith('error:')]
    assert len(errors) == 1 and all(w in errors[0] for w in words), r.stderr
    assert os.listdir(tmp_path) == [src.name]


def test_a_converted_beit_evaluates_at_another_window(tmp_path, beit_reference):
    """-eval -opts DATA.IMAGE_SIZE of a converted BEiT segmentor (as BEiT's 640 px weights are
    used at 512): the checkpoint's own config with the new size builds the segmentor, whose
    relative position tables are the checkpoint's resampled as mmsegmentation does."""
    import transformer
    model, cfg, _ = beit_reference
    torch.save({'meta': {'cfg': pretty_text(cfg)}, 'state_dict': model.state_dict()},
               str(tmp_path / 'beit.pth'))
    convert(tmp_path / 'beit.pth', tmp_path / 'beit.pdparams')
    weights = str(tmp_path / 'beit.pdparams')
    size = IMG + 2 * PATCH  # a 6x6 grid for the 4x4 one trained
    config = checkpoint.config_for(None, weights, lambda c: cfgmod.merge_opts(
        c, ['DATA.IMAGE_SIZE', str(size), 'MODEL.SEGMENTATION.SLIDE_STRIDE', str(size)]))
    net = tasks.load_trained(config, weights)
    saved = checkpoint.split_meta(checkpoint.load_file(weights, 'weights'))[0]
    key = 'backbone.blocks.2.attn.relative_position_bias_table'
    want = transformer.resize_relative_position_table(np.asarray(saved[key]), 4, 6)
    assert want.shape == (11 * 11 + 3, HEADS)
    assert np.array_equal(net.state_dict()[key].numpy(), want)
    out = net(paddle.to_tensor(np.random.RandomState(0).randn(1, 3, size, size).astype('float32')))
    assert tuple(out.shape) == (1, len(CLASSES), size, size)
