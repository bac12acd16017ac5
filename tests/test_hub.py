"""hubconf.py: paddle.hub lists and loads this repository's models the way Paddle users load
models, with weights."""
import numpy as np
import paddle
import pytest

import checkpoint
import config as cfgmod
import transformer
from conftest import ROOT
from utils import UserError

SHAPE = dict(img_size=32, patch_size=4, embed_dim=48, depth=2, num_heads=3)


def test_hub_lists_every_factory():
    assert sorted(paddle.hub.list(ROOT, source='local')) == sorted(transformer.FACTORIES)


def test_hub_load_with_weights_equals_the_model_it_saved(tmp_path):
    shape = dict(img_size=32, patch_size=4, embed_dim=48, depth=2, num_heads=3, num_classes=7)
    paddle.seed(1)
    ref = transformer.vit_custom(**shape)
    ref.eval()
    path = str(tmp_path / 'w.pdparams')
    paddle.save(ref.state_dict(), path)
    model = paddle.hub.load(ROOT, 'vit_custom', source='local', pretrained=path, **shape)
    x = paddle.randn([2, 3, 32, 32])
    assert not model.training
    np.testing.assert_array_equal(model(x).numpy(), ref(x).numpy())


def test_hub_load_of_a_pretraining_checkpoint_gives_a_fresh_head(tmp_path):
    """An MAE pre-training checkpoint into a classifier of another resolution: the encoder
    loaded, pos_embed interpolated, head and fc_norm initialised (as -pretrained does)."""
    mae = transformer.mae_vit_custom(img_size=32, patch_size=4, embed_dim=48, depth=2,
                                     num_heads=3, decoder_embed_dim=32, decoder_depth=1,
                                     decoder_num_heads=4)
    path = str(tmp_path / 'mae.pdparams')
    paddle.save(mae.state_dict(), path)
    model = paddle.hub.load(ROOT, 'vit_custom', source='local', pretrained=path, img_size=48,
                            patch_size=4, embed_dim=48, depth=2, num_heads=3, num_classes=5)
    np.testing.assert_array_equal(model.blocks[1].mlp.fc1.weight.numpy(),
                                  mae.blocks[1].mlp.fc1.weight.numpy())
    assert model.pos_embed.shape == [1, 145, 48] and model.head.weight.shape == [48, 5]
    assert float(model.head.weight.abs().max()) < 1e-3  # trunc-normal std 2e-5


def ten_class_classifier(tmp_path, meta):
    """A 10-class vit_custom saved as .pdparams (with the config it carries when meta)."""
    paddle.seed(2)
    ref = transformer.vit_custom(num_classes=10, **SHAPE)
    ref.eval()
    state = ref.state_dict()
    if meta:
        config = cfgmod.get_config()
        cfgmod.merge_opts(config, ['MODEL.NUM_CLASSES', '10'])
        state[checkpoint.META_KEY] = checkpoint.run_meta(config)
    path = str(tmp_path / 'cls10.pdparams')
    paddle.save(state, path)
    return ref, path


def test_hub_refuses_to_swap_a_trained_head_for_a_fresh_one(tmp_path):
    """A classifier's head of another size than the model's: one line naming num_classes=10
    (no silent 1000-class head); num_classes=10 keeps it, new_head=True starts afresh."""
    ref, path = ten_class_classifier(tmp_path, meta=False)
    with pytest.raises(UserError, match=r'10-class head.*1000 classes: pass num_classes=10.*'
                                        r'new_head=True') as e:
        paddle.hub.load(ROOT, 'vit_custom', source='local', pretrained=path, **SHAPE)
    assert '\n' not in str(e.value)
    with pytest.raises(UserError, match='num_classes=10'):
        paddle.hub.load(ROOT, 'vit_custom', source='local', pretrained=path, num_classes=5,
                        **SHAPE)
    x = paddle.randn([2, 3, 32, 32])
    kept = paddle.hub.load(ROOT, 'vit_custom', source='local', pretrained=path, num_classes=10,
                           **SHAPE)
    np.testing.assert_array_equal(kept(x).numpy(), ref(x).numpy())
    fresh = paddle.hub.load(ROOT, 'vit_custom', source='local', pretrained=path, new_head=True,
                            **SHAPE)
    assert fresh.head.weight.shape == [48, 1000]
    assert float(fresh.head.weight.abs().max()) < 1e-3
    np.testing.assert_array_equal(fresh.blocks[1].attn.qkv.weight.numpy(),
                                  ref.blocks[1].attn.qkv.weight.numpy())


def test_hub_takes_the_class_count_from_the_config_a_file_carries(tmp_path):
    ref, path = ten_class_classifier(tmp_path, meta=True)
    model = paddle.hub.load(ROOT, 'vit_custom', source='local', pretrained=path, **SHAPE)
    assert model.head.weight.shape == [48, 10]
    x = paddle.randn([2, 3, 32, 32])
    np.testing.assert_array_equal(model(x).numpy(), ref(x).numpy())


def test_hub_refuses_a_linear_probe_head_into_a_plain_one(tmp_path):
    probe = transformer.vit_custom(num_classes=10, **SHAPE)
    transformer.add_linear_probe_head(probe)
    path = str(tmp_path / 'probe.pdparams')
    paddle.save(probe.state_dict(), path)
    with pytest.raises(UserError, match=r'head of another kind \(head\.0\..*new_head=True'):
        paddle.hub.load(ROOT, 'vit_custom', source='local', pretrained=path, num_classes=10,
                        **SHAPE)
    model = paddle.hub.load(ROOT, 'vit_custom', source='local', pretrained=path, new_head=True,
                            **SHAPE)
    np.testing.assert_array_equal(model.blocks[0].mlp.fc2.weight.numpy(),
                                  probe.blocks[0].mlp.fc2.weight.numpy())
