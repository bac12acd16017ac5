"""The segmentation task: metrics against a transcription of mmsegmentation's IoUMetric, the
loss against PyTorch's, pre-trained weights into the backbone, layer-wise lr scales."""
import os

import numpy as np
import paddle
import pytest
import torch

import config as cfgmod
import optim
import tasks
import transformer
import utils
from conftest import ROOT


def mmseg_iou_metric(pairs, num_classes, ignore_index):
    """mmsegmentation's IoUMetric.process + compute_metrics, transcribed in torch (histc over
    the non-ignored pixels; IoU = I / U, Acc = I / label area; aAcc; nanmean x 100)."""
    totals = torch.zeros(4, num_classes, dtype=torch.float64)
    for pred, label in pairs:
        pred, label = torch.from_numpy(pred), torch.from_numpy(label)
        mask = label != ignore_index
        pred, label = pred[mask], label[mask]
        inter = pred[pred == label]
        hist = [torch.histc(t.float(), bins=num_classes, min=0, max=num_classes - 1)
                for t in (inter, pred, label)]
        totals += torch.stack([hist[0], hist[1] + hist[2] - hist[0], hist[1], hist[2]]).double()
    i, u, _, t = totals
    iou, acc = (i / u).numpy(), (i / t).numpy()
    return {'aAcc': float(i.sum() / t.sum()) * 100, 'mIoU': float(np.nanmean(iou)) * 100,
            'mAcc': float(np.nanmean(acc)) * 100}, iou


def test_metrics_equal_mmsegmentation_iou_metric():
    rng = np.random.default_rng(0)
    num_classes, ignore = 7, 255
    pairs = []
    for k in range(6):
        h, w = rng.integers(5, 40, 2)
        label = rng.integers(0, 5, (h, w))          # classes 5 and 6 never in the labels
        label[rng.random((h, w)) < 0.2] = ignore    # ignored pixels
        pred = rng.integers(0, 6, (h, w))           # class 6 never predicted either: NaN IoU
        pred[label == 1] = 1 if k % 2 else pred[label == 1]  # some agreement
        pairs.append((pred, label))
    areas = sum(tasks.segmentation_areas(p, l, num_classes, ignore) for p, l in pairs)
    ours, iou, acc = tasks.segmentation_scores(areas)
    ref, ref_iou = mmseg_iou_metric(pairs, num_classes, ignore)
    for key in ('mIoU', 'mAcc', 'aAcc'):
        assert ours[key] == pytest.approx(ref[key], abs=1e-9), key
    np.testing.assert_allclose(iou, ref_iou, rtol=0, atol=1e-12)  # NaN where NaN
    assert np.isnan(iou[6]) and iou[5] == 0 and np.isnan(acc[5])  # absent vs never right


def test_loss_is_mmseg_cross_entropy_plus_weighted_auxiliary():
    """CE of logits upsampled to the labels, averaged over ALL pixels (mmseg's avg_non_ignore
    False), + AUX_WEIGHT x the auxiliary head's, against torch."""
    c = cfgmod.get_config()
    c.defrost()
    c.TRAIN.MODE, c.MODEL.NUM_CLASSES = 'segmentation', 4
    task = tasks.get_task(c)
    rng = np.random.default_rng(1)
    logits, aux = (rng.standard_normal((2, 4, 4, 5)).astype('float32') for _ in range(2))
    labels = rng.integers(0, 4, (2, 16, 20))
    labels[:, :3] = 255

    class Model:
        def __call__(self, images):
            return paddle.to_tensor(logits), paddle.to_tensor(aux)

    loss = float(task.loss(Model(), (None, paddle.to_tensor(labels), None), 0)['loss'])

    def ce(x):
        up = torch.nn.functional.interpolate(torch.from_numpy(x), size=(16, 20),
                                             mode='bilinear', align_corners=False)
        return torch.nn.functional.cross_entropy(up, torch.from_numpy(labels), ignore_index=255,
                                                 reduction='none').mean()

    assert loss == pytest.approx(float(ce(logits) + 0.4 * ce(aux)), rel=1e-5)


@pytest.mark.parametrize('ignore', [-1, 65535])
def test_loss_and_metrics_with_an_ignore_index_outside_8_bits_and_classes_above_255(ignore):
    """16-bit annotations: IGNORE_INDEX -1 / 65535 left out, class 255 of 300 counted."""
    c = cfgmod.merge_opts(cfgmod.get_config(), ['TRAIN.MODE', 'segmentation',
                                                'MODEL.NUM_CLASSES', 300,
                                                'DATA.IGNORE_INDEX', ignore])
    cfgmod.check_values(c)
    rng = np.random.default_rng(2)
    labels = rng.integers(250, 300, (2, 8, 8))
    labels[:, :2] = ignore
    logits = rng.standard_normal((2, 300, 8, 8)).astype('float32')
    loss = float(tasks.get_task(c).pixel_loss(paddle.to_tensor(logits), paddle.to_tensor(labels)))
    ref = torch.nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels),
                                            ignore_index=ignore, reduction='none').mean()
    assert loss == pytest.approx(float(ref), rel=1e-5)
    pred = labels.copy()
    pred[labels == 255] = 256  # class 255 never right: IoU 0, not ignored (NaN)
    pred[labels == ignore] = 3
    areas = sum(tasks.segmentation_areas(p, t, 300, ignore) for p, t in zip(pred, labels))
    _, iou, _ = tasks.segmentation_scores(areas)
    assert areas[3].sum() == 2 * 6 * 8 and np.isnan(iou[3])  # ignored pixels not counted
    assert areas[3][255] > 0 and iou[255] == 0 and np.nanmax(iou) == 1


def tiny(stage, *opts):
    c = cfgmod.get_config(os.path.join(ROOT, 'configs', f'tiny_{stage}.yaml'))
    return cfgmod.merge_opts(c, list(opts))


def test_mae_pretraining_loads_into_the_backbone(tmp_path):
    """Our pre-training checkpoint -> backbone.*: pos_embed interpolated from the 8x8 grid of
    32 px to 16x16 of 64 px (cls row kept), decoder and mask token unused, relative position
    tables zero and listed as missing, neck and heads initialised, nothing else missing."""
    pre = tasks.get_task(tiny('pretrain')).build_model()
    path = str(tmp_path / 'pre.pdparams')
    paddle.save(pre.state_dict(), path)
    task = tasks.get_task(tiny('segmentation', 'DATA.IMAGE_SIZE', '64'))  # 16x16 patches
    model = task.build_model()
    logs = []
    missing, unused = task.load_pretrained(model, path, log=logs.append)
    assert all(k.startswith(('neck.', 'decode_head.', 'auxiliary_head.')) or
               k.endswith('.attn.relative_position_bias_table') for k in missing)
    assert sum(k.endswith('relative_position_bias_table') for k in missing) == 4
    assert all(k.startswith(('decoder', 'mask_token', 'norm.')) for k in unused)
    assert 'decoder_pred.weight' in unused and 'norm.weight' in unused
    own, theirs = model.state_dict(), pre.state_dict()
    np.testing.assert_array_equal(own['backbone.blocks.3.mlp.fc2.weight'].numpy(),
                                  theirs['blocks.3.mlp.fc2.weight'].numpy())
    expected = transformer.interpolate_pos_embed(theirs['pos_embed'].numpy(), 16)
    np.testing.assert_allclose(own['backbone.pos_embed'].numpy(), expected, atol=1e-6)
    assert own['backbone.pos_embed'].shape == [1, 257, 128]
    assert not own['backbone.blocks.0.attn.relative_position_bias_table'].numpy().any()
    text = '\n'.join(logs)
    assert 'interpolating pos_embed from 8^2 to 16^2' in text
    assert 'backbone.blocks.*.attn.relative_position_bias_table (4)' in text
    assert 'unused: ' in text and 'decoder_blocks.*' in text


def test_segmentor_checkpoint_loads_whole_and_eval_needs_all_of_it(tmp_path):
    task = tasks.get_task(tiny('segmentation'))
    a, b = task.build_model(), task.build_model()
    path = str(tmp_path / 'seg.pdparams')
    paddle.save(a.state_dict(), path)
    missing, unused = task.load_pretrained(b, path, log=lambda m: None, eval_only=True)
    assert missing == [] and unused == []
    for k, v in a.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), b.state_dict()[k].numpy())
    # an encoder alone is not enough to evaluate a segmentor
    enc = tasks.get_task(tiny('finetune')).build_model()
    enc_path = str(tmp_path / 'enc.pdparams')
    paddle.save(enc.state_dict(), enc_path)
    with pytest.raises(utils.UserError, match='does not fit the model of this config .-eval'):
        task.load_pretrained(b, enc_path, log=lambda m: None, eval_only=True)


def test_segmentor_lr_scales_are_the_bare_encoders_and_one_for_neck_and_heads():
    """Layer-wise decay on the wrapped encoder (backbone.*) equals the bare encoder's; neck
    and heads get 1.0; relative position tables are not decayed (BEiT)."""
    c = tiny('segmentation')
    model = tasks.get_task(c).build_model()
    rules = optim.param_rules(model, c)
    bare = transformer.build_from_config(c, features_only=True)
    bare_rules = optim.param_rules(bare, c)
    depth = 4
    for name, (scale, wd) in rules.items():
        if name.startswith('backbone.'):
            assert (scale, wd) == bare_rules[name[len('backbone.'):]], name
        else:
            assert scale == 1.0, name
    assert rules['backbone.pos_embed'][0] == pytest.approx(0.75 ** (depth + 1))
    assert rules['backbone.blocks.2.attn.qkv.weight'] == pytest.approx((0.75 ** 2, 0.05))
    assert rules['backbone.blocks.0.attn.relative_position_bias_table'][1] == 0.0
    assert rules['decode_head.fpn_bottleneck.conv.weight'] == (1.0, 0.05)
    assert rules['neck.fpn1.1.weight'] == (1.0, 0.0)
