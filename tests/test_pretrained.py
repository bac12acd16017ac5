"""MODEL.PRETRAINED must fit: what a task initialises afresh by design may differ, nothing else;
under -eval nothing may; a PyTorch file gets the command that converts it."""
import os

import numpy as np
import paddle
import pytest

import checkpoint
import config as cfgmod
import tasks
import transformer
import utils
from conftest import ROOT


def tiny(stage, *opts):
    c = cfgmod.get_config(os.path.join(ROOT, 'configs', f'tiny_{stage}.yaml'))
    return cfgmod.merge_opts(c, list(opts))


def save(tmp_path, model, name='w.pdparams'):
    path = str(tmp_path / name)
    paddle.save(model.state_dict(), path)
    return path


def test_describe_weights_names_the_official_sizes():
    state = {'pos_embed': np.zeros([1, 197, 768]), 'patch_embed.proj.weight':
             np.zeros([768, 3, 16, 16]), 'blocks.11.norm1.weight': np.zeros([768])}
    assert checkpoint.describe_weights(state) == \
        'ViT-B/16: embed 768, 12 blocks, 14x14 patches of 16'
    state['blocks.23.norm1.weight'] = np.zeros([768])
    assert checkpoint.describe_weights(state).startswith('ViT/16: embed 768, 24 blocks')


def test_weights_of_another_size_are_an_error_not_a_random_init(tmp_path):
    other = transformer.vit_custom(img_size=32, patch_size=4, embed_dim=64, depth=2,
                                   num_heads=2, num_classes=10)
    path = save(tmp_path, other)
    task = tasks.get_task(tiny('finetune'))
    model = task.build_model()
    before = model.blocks[0].attn.qkv.weight.numpy().copy()
    with pytest.raises(utils.UserError) as e:
        task.load_pretrained(model, path, log=lambda m: None)
    msg = str(e.value)
    assert 'does not fit the model of this config' in msg
    assert 'the checkpoint is ViT/4: embed 64, 2 blocks' in msg
    assert 'the config builds ViT/4: embed 128, 4 blocks' in msg
    assert np.array_equal(model.blocks[0].attn.qkv.weight.numpy(), before)  # nothing loaded


def test_finetune_from_pretraining_reinitialises_only_head_and_fc_norm(tmp_path):
    pre = tasks.get_task(tiny('pretrain')).build_model()
    path = save(tmp_path, pre)
    task = tasks.get_task(tiny('finetune'))
    model = task.build_model()
    logs = []
    missing, unused = task.load_pretrained(model, path, log=logs.append)
    assert sorted(missing) == ['fc_norm.bias', 'fc_norm.weight', 'head.bias', 'head.weight']
    assert 'decoder_embed.weight' in unused and 'mask_token' in unused
    assert np.array_equal(model.blocks[3].mlp.fc2.weight.numpy(),
                          pre.blocks[3].mlp.fc2.weight.numpy())
    assert any('head initialised fresh (trunc-normal std 2e-05)' in m for m in logs)
    # ... but -eval of the same file is refused: its head and fc_norm would be random
    with pytest.raises(utils.UserError, match=r'-eval and export need the weights of exactly'
                                              r'.*missing there: \[.fc_norm.weight'):
        task.load_pretrained(task.build_model(), path, log=logs.append, eval_only=True)


def test_eval_of_a_cls_token_classifier_under_a_global_pool_config_is_refused(tmp_path):
    cls_token = tasks.get_task(tiny('finetune', 'MODEL.GLOBAL_POOL', 'False')).build_model()
    path = save(tmp_path, cls_token)
    task = tasks.get_task(tiny('finetune'))
    with pytest.raises(utils.UserError, match='fc_norm'):
        task.load_pretrained(task.build_model(), path, log=lambda m: None, eval_only=True)


def test_pretraining_from_encoder_only_weights_gets_a_fresh_decoder(tmp_path):
    encoder = tasks.get_task(tiny('linearprobe')).build_model()
    state = {k: v for k, v in encoder.state_dict().items() if not k.startswith('head.')}
    path = str(tmp_path / 'encoder.pdparams')
    paddle.save(state, path)
    task = tasks.get_task(tiny('pretrain'))
    model = task.build_model()
    missing, _ = task.load_pretrained(model, path, log=lambda m: None)
    assert missing and all(k.startswith(('decoder_', 'mask_token')) for k in missing)


def test_a_pytorch_file_gets_the_convert_command(tmp_path):
    import torch
    path = str(tmp_path / 'mae_pretrain_vit_base.pth')
    torch.save({'model': {'pos_embed': torch.zeros(1, 5, 8)}}, path)
    with pytest.raises(utils.UserError) as e:
        checkpoint.load_file(path, 'pretrained weights')
    assert str(e.value) == (
        f'{path} is a PyTorch checkpoint; convert it first: python '
        f'port_weights/convert_official.py --src {path} --dst {path[:-4]}.pdparams')
