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
(for an encoder-only checkpoint); pos_embed is interpolated to img_size. A classifier's head is
kept, never swapped silently: without num_classes the class count is the one of the config the
file carries; a head of another size than the model's is a UserError unless new_head=True (a
fresh head, trunc-normal std 2e-5). Importing this file
changes nothing in the process (no thread or flag settings: those are the entry points').
"""
import os
import sys

_ROOT = os.path.dirname(os.path.abspath(__file__))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

dependencies = ['paddle', 'numpy', 'yaml', 'yacs', 'PIL']

import checkpoint  # noqa: E402
import config as cfgmod  # noqa: E402
import tasks  # noqa: E402
import transformer  # noqa: E402
import utils  # noqa: E402

# what a checkpoint may lack, by model kind: what the task that trains it starts afresh
_FRESH = {task.model_prefix: task.reinit for task in (tasks.Pretrain, tasks.Finetune)}


def _entry(name):
    factory = transformer.FACTORIES[name]

    def load(pretrained=None, new_head=False, **kwargs):
        head = {}
        if pretrained and name.startswith('vit_'):
            head, classes = _saved_head(pretrained)
            if classes and 'num_classes' not in kwargs and not new_head:
                kwargs['num_classes'] = classes
        model = factory(**kwargs)
        if pretrained:
            has_head = model.state_dict().get('head.weight') is not None
            if head and has_head and not new_head:
                _check_head(pretrained, head, model)
            checkpoint.load_pretrained(model, pretrained, log=lambda m: None,
                                       reinit=_FRESH[name[:4]])
            if new_head and has_head:
                model.init_head(tasks.Finetune.head_init_std)
        model.eval()
        return model
    load.__name__ = name
    load.__doc__ = (f'transformer.{name}(**kwargs) in eval mode, with the weights of the '
                    f'.pdparams `pretrained` when given (see this module\'s docstring).')
    return load


def _check_head(path, head, model):
    """A UserError unless the head a checkpoint holds is the one the model builds."""
    own = model.state_dict()
    if all(k in own and tuple(v.shape) == tuple(own[k].shape) for k, v in head.items()):
        return
    sizes = [v.shape[-1] for k, v in head.items() if k.endswith('weight') and len(v.shape) == 2]
    size = sizes[-1] if sizes else 'N'
    if any(k not in own for k in head):  # a linear probe's head.0 BatchNorm + head.1 Linear
        raise utils.UserError(f'{path} holds a head of another kind ({", ".join(sorted(head))}) '
                              f'than the model\'s Linear: new_head=True starts a fresh head')
    raise utils.UserError(f'{path} holds a {size}-class head, the model builds '
                          f'{own["head.weight"].shape[-1]} classes: pass num_classes={size} to '
                          f'keep it, or new_head=True to start a fresh head')


def _saved_head(path):
    """-> ({name: tensor} of the classifier head a .pdparams holds, the class count of the
    config it carries (None without one, or when it holds no head))."""
    state, meta = checkpoint.split_meta(checkpoint.load_file(path, 'pretrained weights'))
    if isinstance(state, dict) and isinstance(state.get('model'), dict):
        state = state['model']
    if not isinstance(state, dict):
        return {}, None  # (load_pretrained says what the file is)
    head = {k: v for k, v in state.items() if k.startswith('head.')}
    if not head or not meta or not meta.get('config'):
        return head, None
    return head, cfgmod.from_text(meta['config'], f'the config saved in {path}').MODEL.NUM_CLASSES


for _name in transformer.FACTORIES:
    globals()[_name] = _entry(_name)
