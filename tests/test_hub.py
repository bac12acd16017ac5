"""hubconf.py: paddle.hub lists and loads this repository's models the way Paddle users load
models, with weights."""
import numpy as np
import paddle

import transformer
from conftest import ROOT


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
