"""Entry points for paddle.hub: the models of transformer.py, optionally with weights.

    import paddle
    model = paddle.hub.load('/path/to/this/repo', 'vit_base_patch16', source='local',
                            pretrained='mae_finetuned_vit_base.pdparams', num_classes=1000)
    mae = paddle.hub.load('/path/to/this/repo', 'mae_vit_large_patch16', source='local',
                          pretrained='mae_visualize_vit_large.pdparams')

Keyword arguments go to the factory (img_size, num_classes, global_pool, drop_path_rate, ...;
the *_custom names also take the shape: patch_size, embed_dim, depth, num_heads). `pretrained`
is a .pdparams of this project or one converted by port_weights/convert_official.py, loaded as
-pretrained is (checkpoint.load_pretrained): what the model builds must be in it, except a
classifier's head / fc_norm (initialised fresh, for a pre-trained encoder) and the MAE decoder
(for an encoder-only checkpoint); pos_embed is interpolated to img_size. Importing this file
changes nothing in the process (no thread or flag settings: those are the entry points').
"""
import os
import sys

_ROOT = os.path.dirname(os.path.abspath(__file__))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

dependencies = ['paddle', 'numpy', 'yaml', 'yacs', 'PIL']

import checkpoint  # noqa: E402
import tasks  # noqa: E402
import transformer  # noqa: E402

# what a checkpoint may lack, by model kind: what the task that trains it starts afresh
_FRESH = {task.model_prefix: task.reinit for task in (tasks.Pretrain, tasks.Finetune)}


def _entry(name):
    factory = transformer.FACTORIES[name]

    def load(pretrained=None, **kwargs):
        model = factory(**kwargs)
        if pretrained:
            checkpoint.load_pretrained(model, pretrained, log=lambda m: None,
                                       reinit=_FRESH[name[:4]])
        model.eval()
        return model
    load.__name__ = name
    load.__doc__ = (f'transformer.{name}(**kwargs) in eval mode, with the weights of the '
                    f'.pdparams `pretrained` when given (see this module\'s docstring).')
    return load


for _name in transformer.FACTORIES:
    globals()[_name] = _entry(_name)
