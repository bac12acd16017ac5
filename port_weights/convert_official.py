"""Convert an MAE-family checkpoint into a Paddle state dict (.pdparams) that carries its config.

    python port_weights/convert_official.py --src mae_pretrain_vit_base.pth \
        --dst mae_pretrain_vit_base.pdparams

Inputs (formats.py, read without PyTorch; pickles through a restricted unpickler): official
MAE .pth files, timm VisionTransformer state dicts (.pth / .safetensors, LayerScale included),
HuggingFace ViTMAE / ViT folders or weight files, and UperNet segmentors (mmsegmentation's
MAE / BEiT, unilm's BEiT, HF BeitForSemanticSegmentation folders). families.py renames each to
the official MAE names (segmentors: the project's segmentor names, DESIGN.md 3.4); then, kinds
detected from the keys:
    pretrain-encoder  cls_token, pos_embed, patch_embed.*, blocks.*, norm.*  (mae_pretrain_vit_*)
    pretrain-full     the above + mask_token, decoder_*                      (mae_visualize_vit_*)
    finetuned         head.* + fc_norm.* (global pool) or norm.* (cls token) (mae_finetuned_vit_*)
                      (linear probe: head.0 = BatchNorm buffers, head.1 = Linear)
    segmentor         backbone.*, neck.*, decode_head.*, auxiliary_head.*   (ADE20K UperNets)

The Paddle models in transformer.py use the official parameter names (DESIGN.md section 3.1), so
the conversion is KEY_TABLE (BatchNorm buffer names, derived buffers dropped) plus one rule:
every 2-D `.weight` is a Linear weight and is transposed (torch [out, in] -> Paddle [in, out];
conv kernels are 4-D and kept). The result is checked against the Paddle model built from the
shapes (a segmentor: by its task's builder, from the converted config): every source key used,
every target key set, every shape equal. The written file holds, under checkpoint.META_KEY, the
config that builds the model (and class names when the source has them), as training
checkpoints do.
"""
import argparse
import contextlib
import hashlib
import math
import os
import sys

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import runtime  # noqa: E402

if __name__ == '__main__':
    runtime.setup_process(restart=False)  # before Paddle loads: threads, its import notices

import paddle  # noqa: E402

import checkpoint  # noqa: E402
import classnames  # noqa: E402
import config as cfgmod  # noqa: E402
import tasks  # noqa: E402  (the task builders: the segmentor is built as its task builds it)
import torchfile  # noqa: E402
import transformer  # noqa: E402
from port_weights import families, formats  # noqa: E402

# Official release files -> leading hex digits of their md5, as the official READMEs give them.
OFFICIAL_MD5 = {
    'mae_pretrain_vit_base.pth': '8cad7c',
    'mae_pretrain_vit_large.pth': 'b8b06e',
    'mae_pretrain_vit_huge.pth': '9bdbb0',
    'mae_finetuned_vit_base.pth': '1b25e9',
    'mae_finetuned_vit_large.pth': '51f550',
    'mae_finetuned_vit_huge.pth': '2541f2',
}

# torch key suffix <-> Paddle key suffix; None = not carried over. Every other key is kept as is.
# export_official.py reads the table backwards (torch_key) and writes the step counter back.
STEP_COUNTER = '.num_batches_tracked'  # torch BatchNorm's; Paddle's BatchNorm keeps none
KEY_TABLE = (
    ('.running_mean', '._mean'),
    ('.running_var', '._variance'),
    (STEP_COUNTER, None),
    ('.relative_position_index', None),  # BEiT's: derived from the grid, rebuilt by the model
)

# num_heads is not stored in a checkpoint (no shape depends on it): the config the source
# carries says it, else --num-heads, else a named size's (its whole shape, not the width alone);
# otherwise it is unknown and the converted file carries no config (convert_file)
SHAPE_KEYS = ('patch_size', 'embed_dim', 'depth', 'mlp_ratio')
DECODER_SHAPE_KEYS = ('decoder_embed_dim', 'decoder_depth')
# a stand-in, only to build the model's shapes (which no head count changes)
OFFICIAL_NUM_HEADS = {shape['embed_dim']: shape['num_heads']
                      for _, shape in transformer.SIZES.values()}
OFFICIAL_DECODER_NUM_HEADS = {
    transformer.MAE_DECODER['decoder_embed_dim']: transformer.MAE_DECODER['decoder_num_heads']}
HEAD_KEYS = {'num_heads': 'MODEL.ENCODER.NUM_HEADS', 'decoder_num_heads': 'MODEL.DECODER.NUM_HEADS'}

# MODEL.LAYER_SCALE of a converted model with LayerScale: the gammas come from the weights, so
# the init value only has to be non-zero (timm's init_values of the MAE-JAX exports)
LAYER_SCALE_INIT = 1e-4
# architecture entry -> config key; converted_config sets those that differ from its config file
CONFIG_KEYS = {'layer_scale': 'MODEL.LAYER_SCALE', 'qkv_bias': 'MODEL.QKV_BIAS',  # variants
               'abs_pos_embed': 'MODEL.ABS_POS_EMBED', 'rel_pos_bias': 'MODEL.REL_POS_BIAS',
               'norm_eps': 'MODEL.LAYER_NORM_EPS',
               'img_size': 'DATA.IMAGE_SIZE'}
SEGMENTOR_KEYS = {'num_classes': 'MODEL.NUM_CLASSES',
                  'out_indices': 'MODEL.SEGMENTATION.OUT_INDICES',
                  'channels': 'MODEL.SEGMENTATION.CHANNELS',
                  'pool_scales': 'MODEL.SEGMENTATION.POOL_SCALES',
                  'aux_channels': 'MODEL.SEGMENTATION.AUX_CHANNELS',
                  'aux_weight': 'MODEL.SEGMENTATION.AUX_WEIGHT',  # 0: no auxiliary head
                  'dropout': 'MODEL.SEGMENTATION.DROPOUT',
                  'slide_stride': 'MODEL.SEGMENTATION.SLIDE_STRIDE'}
BACKBONE = families.BACKBONE  # the segmentor's encoder, under the official ViT names
ADE20K_CLASSES = 150

KIND_DESCRIPTIONS = {
    'pretrain-encoder': 'MAE pre-trained encoder (cls_token, pos_embed, patch_embed, blocks, norm)',
    'pretrain-full': 'MAE pre-training model with its decoder (mask_token, decoder_*)',
    'finetuned': 'ViT classifier',
    'segmentor': 'UperNet segmentor: ViT backbone, 4-scale neck, UPerHead',
}


class ConversionError(Exception):
    """A problem with the user's input; main() prints it as one line, without a traceback."""


def load_torch_checkpoint(path):
    """torchfile.load: the object a torch.save file holds, tensors as numpy arrays."""
    try:
        return torchfile.load(path)
    except torchfile.FormatError as e:
        raise ConversionError(str(e)) from None


# ----------------------------------------------------------------------------------------------
# md5 of the official release files
# ----------------------------------------------------------------------------------------------
def file_md5(path, chunk_size=1 << 22):
    h = hashlib.md5()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(chunk_size), b''):
            h.update(chunk)
    return h.hexdigest()


def identify_official(filename, md5_hex, table=OFFICIAL_MD5):
    """-> (status, message): status 'official' (md5 matches a release file, named in the
    message), 'mismatch' (named like a release file, md5 differs) or 'unofficial'."""
    name = os.path.basename(filename)
    for official, prefix in table.items():
        if md5_hex.startswith(prefix):
            also = '' if name == official else f' (renamed to {name})'
            return 'official', f'md5 {md5_hex}: the official {official}{also}'
    if name in table:
        return 'mismatch', (f'WARNING: {name} is named like the official release file, but its md5 '
                            f'{md5_hex} does not start with {table[name]}: corrupted or partial '
                            f'download? Download it again.')
    return 'unofficial', (f'md5 {md5_hex}: not an official release file '
                          f'(fine for your own checkpoints)')


# ----------------------------------------------------------------------------------------------
# Kind, architecture, conversion
# ----------------------------------------------------------------------------------------------
def detect_kind(keys):
    """-> 'segmentor' | 'pretrain-full' | 'finetuned' | 'pretrain-encoder' from a state_dict's
    keys."""
    keys = set(keys)
    if any(k.startswith('decode_head.') for k in keys):
        return 'segmentor'
    if 'mask_token' in keys or any(k.startswith('decoder_') for k in keys):
        return 'pretrain-full'
    if any(k.startswith('head.') for k in keys):
        return 'finetuned'
    if 'patch_embed.proj.weight' in keys and any(k.startswith('blocks.') for k in keys):
        return 'pretrain-encoder'
    raise ConversionError(f'not an MAE / ViT state_dict: no patch_embed.proj.weight and blocks.* '
                          f'(keys: {sorted(keys)[:8]})')


def named_heads(arch):
    """-> the head count of the named size (transformer.SIZES) whose shape arch has, else None."""
    return next((shape['num_heads'] for _, shape in transformer.SIZES.values()
                 if all(arch.get(k) == shape[k] for k in SHAPE_KEYS)), None)


def named_decoder_heads(arch):
    """-> the official decoder's head count when arch's decoder has its shape, else None."""
    dec = transformer.MAE_DECODER
    return dec['decoder_num_heads'] if all(arch.get(k) == dec[k] for k in DECODER_SHAPE_KEYS) \
        else None


def given_heads(facts, num_heads=None, decoder_num_heads=None):
    """facts with the head counts of --num-heads / --decoder-num-heads added; one that
    contradicts the config the source carries is a ConversionError (the source's word wins)."""
    facts = dict(facts)
    for name, value in (('num_heads', num_heads), ('decoder_num_heads', decoder_num_heads)):
        if value is None:
            continue
        if value < 1:
            raise ConversionError(f'--{name.replace("_", "-")} {value}: not a head count')
        if facts.get(name) and facts[name] != value:
            raise ConversionError(f'--{name.replace("_", "-")} {value} contradicts the config '
                                  f'the source carries ({name} {facts[name]}); leave it out')
        facts[name] = value
    return facts


def unknown_heads(arch, facts):
    """-> the head counts of arch that neither the source / the flags (facts) nor a named size
    say: arch holds a stand-in for them, which builds the shapes but not the model."""
    known = {'num_heads': named_heads(arch), 'decoder_num_heads': named_decoder_heads(arch)}
    return [k for k in HEAD_KEYS if k in arch and not facts.get(k) and not known[k]]


def _guess_heads(dim, official):
    """A stand-in head count for building shapes: the official value for the width, else head
    dim 64 when it divides, else the largest of a few usual counts that divides."""
    if dim in official:
        return official[dim]
    if dim % 64 == 0:
        return dim // 64
    return next(h for h in (16, 12, 8, 6, 4, 3, 2, 1) if dim % h == 0)


def _depth(keys, prefix):
    ids = {int(k[len(prefix):].split('.')[0]) for k in keys
           if k.startswith(prefix) and k[len(prefix):].split('.')[0].isdigit()}
    return max(ids) + 1 if ids else 0


def _shape(sd, key, ndim, prefix=''):
    if key not in sd:
        raise ConversionError(f'key {prefix}{key} is missing, needed to infer the architecture')
    s = tuple(sd[key].shape)
    if len(s) != ndim:
        raise ConversionError(f'key {prefix}{key} has shape {list(s)}, expected {ndim} '
                              f'dimensions')
    return s


def infer_architecture(sd, kind, facts=None, prefix=''):
    """Shapes (and the source's facts: heads, LayerNorm eps) -> constructor arguments of the
    matching transformer.py model (see detect_kind), the family's variants included:
    LayerScale (ls1.gamma), the qkv bias kind (qkv.bias / BEiT's q_bias + v_bias / none), the
    absolute position embedding (pos_embed, or none with relative position tables).
    A segmentor: its backbone's, plus the heads' widths and the facts' settings
    (segmentor_architecture). prefix: where sd's keys stand in the source, for messages."""
    facts = facts or {}
    if kind == 'segmentor':
        return 'Segmentor', segmentor_architecture(sd, facts)

    def shape(key, ndim):
        return _shape(sd, key, ndim, prefix)

    dim, in_chans, p, p2 = shape('patch_embed.proj.weight', 4)
    if p != p2:
        raise ConversionError(f'{prefix}patch_embed.proj.weight has non-square patches {p}x{p2}')
    rel_table = 'blocks.0.attn.relative_position_bias_table'
    if 'pos_embed' in sd:
        tokens = shape('pos_embed', 3)[1] - 1  # + cls token
    elif rel_table in sd:  # ((2g-1)^2 + 3, heads): the grid the tables were trained on
        side = math.isqrt(max(shape(rel_table, 2)[0] - 3, 0))
        tokens = ((side + 1) // 2) ** 2 if side % 2 else -1
    elif facts.get('img_size'):  # the source's config says it
        tokens = (int(facts['img_size']) // p) ** 2
    else:
        raise ConversionError(f'neither {prefix}pos_embed nor relative position tables '
                              f'({prefix}{rel_table}) nor a config: the patch grid is unknown')
    grid = math.isqrt(max(tokens, 0))
    if tokens <= 0 or grid * grid != tokens:
        raise ConversionError(f'{tokens} patch positions: not a square grid')
    hidden = shape('blocks.0.mlp.fc1.weight', 2)[0]
    arch = dict(img_size=grid * p, patch_size=p, in_chans=in_chans, embed_dim=dim,
                depth=_depth(sd, 'blocks.'), num_heads=None, mlp_ratio=hidden / dim)
    arch['num_heads'] = (facts.get('num_heads') or named_heads(arch)
                         or _guess_heads(dim, OFFICIAL_NUM_HEADS))
    if dim % arch['num_heads']:
        raise ConversionError(f'num_heads {arch["num_heads"]} does not divide the width {dim}')
    variants = {
        'layer_scale': (LAYER_SCALE_INIT if 'blocks.0.ls1.gamma' in sd else 0.0),
        'qkv_bias': ('qv' if 'blocks.0.attn.q_bias' in sd else
                     'qkv' if 'blocks.0.attn.qkv.bias' in sd else 'none'),
        'norm_eps': float(facts.get('norm_eps', transformer.LAYER_NORM_EPS)),
    }
    arch.update(variants)
    if kind == 'pretrain-full':
        if 'pos_embed' not in sd:
            raise ConversionError('an MAE with a decoder but no pos_embed')
        ddim = shape('decoder_embed.weight', 2)[0]
        arch.update(decoder_embed_dim=ddim, decoder_depth=_depth(sd, 'decoder_blocks.'))
        arch['decoder_num_heads'] = (facts.get('decoder_num_heads') or named_decoder_heads(arch)
                                     or _guess_heads(ddim, OFFICIAL_DECODER_NUM_HEADS))
        return 'MaskedAutoencoderViT', arch
    arch.update(abs_pos_embed='pos_embed' in sd, rel_pos_bias=rel_table in sd)
    if kind == 'pretrain-encoder':
        arch.update(num_classes=0, global_pool=False)
        return 'VisionTransformer', arch
    linear_probe = any(k.startswith(('head.0.', 'head.1.')) for k in sd)
    head_key = 'head.1.weight' if linear_probe else 'head.weight'
    arch.update(num_classes=shape(head_key, 2)[0], global_pool='fc_norm.weight' in sd,
                linear_probe=linear_probe)
    return 'VisionTransformer', arch


def segmentor_architecture(sd, facts):
    """The segmentor's settings: the backbone's constructor arguments (infer_architecture of
    the backbone.* keys), the classes and head widths from the classifier convs, the settings of
    SEGMENTOR_KEYS the source states (facts), no auxiliary head (aux_weight 0) when it has none,
    the sliding-window stride 2/3 of the window unless stated (341 for 512, as the recipe)."""
    backbone = {k[len(BACKBONE):]: v for k, v in sd.items() if k.startswith(BACKBONE)}
    _, arch = infer_architecture(backbone, 'pretrain-encoder', facts, prefix=BACKBONE)
    for key in ('num_classes', 'global_pool'):  # (the encoder alone's)
        del arch[key]
    num_classes, channels = _shape(sd, 'decode_head.conv_seg.weight', 4)[:2]
    arch.update(num_classes=num_classes, channels=channels)
    for fact in SEGMENTOR_KEYS:
        if facts.get(fact) is not None:
            value = facts[fact]
            arch[fact] = [int(v) for v in value] if isinstance(value, (list, tuple)) else value
    if 'auxiliary_head.conv_seg.weight' in sd:
        arch['aux_channels'] = _shape(sd, 'auxiliary_head.conv_seg.weight', 4)[1]
    else:
        arch['aux_weight'] = 0.0
    arch.setdefault('slide_stride', arch['img_size'] * 2 // 3)
    return arch


def target_shapes(model_name, arch, facts=None):
    """Build the transformer.py model (lazily: no weights allocated) -> {key: shape}; a
    Segmentor from its converted config, by its task's builder (tasks.build_model)."""
    kwargs = {k: v for k, v in arch.items() if k != 'linear_probe'}
    guard = paddle.LazyGuard() if hasattr(paddle, 'LazyGuard') else contextlib.nullcontext()
    device = paddle.get_device()
    paddle.set_device('cpu')  # only shapes are needed: never take GPU memory for them
    try:
        with guard:
            if model_name == 'Segmentor':
                config, _ = converted_config('segmentor', arch, facts or {})
                model = tasks.build_model(config)
            else:
                model = getattr(transformer, model_name)(**kwargs)
            if arch.get('linear_probe'):
                transformer.add_linear_probe_head(model)
        return {k: tuple(v.shape) for k, v in model.state_dict().items()}
    except cfgmod.ConfigError as e:
        raise ConversionError(f'the converted model has no valid config: {e}') from None
    finally:
        paddle.set_device(device)


def convert_key(key):
    """torch key -> Paddle key (None = dropped), by KEY_TABLE."""
    for src, dst in KEY_TABLE:
        if key.endswith(src):
            return None if dst is None else key[:-len(src)] + dst
    return key


def torch_key(key):
    """Paddle key -> torch key: KEY_TABLE read backwards (the inverse of convert_key)."""
    for src, dst in KEY_TABLE:
        if dst is not None and key.endswith(dst):
            return key[:-len(dst)] + src
    return key


def is_linear_weight(key, value):
    """The one layout rule, both ways: every 2-D `.weight` is a Linear weight, torch [out, in],
    Paddle [in, out] (conv kernels, LayerNorm, tokens and biases are laid out alike)."""
    return key.endswith('.weight') and np.ndim(value) == 2


def _listing(keys, limit=12):
    keys = sorted(keys)
    more = f' ... and {len(keys) - limit} more' if len(keys) > limit else ''
    return ', '.join(keys[:limit]) + more


def convert_state_dict(sd, facts=None):
    """torch-layout state_dict {key: numpy array} under the official names -> (kind, Paddle
    state_dict, arch_info); facts: what the source says beyond its tensors (families.py).

    Floats become float32, other dtypes are kept. arch_info holds the model class, its
    constructor arguments and counts. Raises ConversionError naming any key that is not used,
    not set or of the wrong shape for the model transformer.py builds from the same shapes.
    """
    extra = {'dist_token': 'a distillation token (a DeiT-distilled ViT)',
             'head_dist.weight': 'a distillation head (a DeiT-distilled ViT)',
             'reg_token': 'register tokens (a ViT with registers)'}
    found = [f'{k}: {why}' for k, why in extra.items() if k in sd]
    if found:
        raise ConversionError(f'{"; ".join(found)}. The MAE ViT has a cls token only, so these '
                              f'weights cannot be converted for it')
    kind = detect_kind(sd)
    model_name, arch = infer_architecture(sd, kind, facts)
    expected = target_shapes(model_name, arch, facts)  # before converting: lower peak memory
    out, source_of, dropped, transposed = {}, {}, [], 0
    for key, value in sd.items():
        new = convert_key(key)
        if new is None:
            dropped.append(key)
            continue
        value = np.asarray(value)
        if is_linear_weight(key, value):  # Linear: [out, in] -> [in, out]
            value = value.T
            transposed += 1
        if np.issubdtype(value.dtype, np.floating):
            value = value.astype(np.float32, copy=False)
        out[new] = np.ascontiguousarray(value)
        source_of[new] = key

    unused = set(out) - set(expected)
    unset = set(expected) - set(out)
    if unused or unset:
        msg = []
        if unused:
            msg.append(f'unexpected keys for a {kind} {model_name}: '
                       f'{_listing(source_of[k] for k in unused)}')
        if unset:
            msg.append(f'missing keys {_listing(unset)}')
        raise ConversionError('; '.join(msg))
    wrong = [f'{source_of[k]} {list(sd[source_of[k]].shape)} (Paddle {k} needs {list(s)})'
             for k, s in expected.items() if tuple(out[k].shape) != s]
    if wrong:
        raise ConversionError(f'shape mismatch: {_listing(wrong)}')
    info = dict(model=model_name, arch=arch, num_tensors=len(out), transposed=transposed,
                dropped=dropped, renamed=sum(1 for k, v in source_of.items() if k != v))
    return kind, out, info


def _describe_kind(kind, arch):
    if kind == 'segmentor':
        aux = ' + auxiliary FCN head' if arch.get('aux_channels') else ', no auxiliary head'
        return f'{kind} ({KIND_DESCRIPTIONS[kind]}{aux})'
    if kind != 'finetuned':
        return f'{kind} ({KIND_DESCRIPTIONS[kind]})'
    head = ('linear probe: head.0 BatchNorm + head.1 Linear' if arch.get('linear_probe')
            else 'head Linear')
    pool = 'global pool: fc_norm' if arch['global_pool'] else 'cls token: norm'
    return f'{kind} ({KIND_DESCRIPTIONS[kind]}, {pool}, {head})'


def convert_file(src, dst, log=print, num_heads=None, decoder_num_heads=None):
    """Convert the checkpoint `src` (a file or an HF folder, see formats.py) to `dst`
    (.pdparams carrying the config that builds its model) -> (kind, info). num_heads /
    decoder_num_heads: the head counts, for a source that carries no config (given_heads).

    dst is written to dst + '.tmp' and renamed, so no partial file is ever left at dst.
    Raises ConversionError (message names the file and key) for any problem with the input.
    """
    dst_dir = os.path.dirname(os.path.abspath(dst))
    if not os.path.isdir(dst_dir):
        raise ConversionError(f'{dst}: the folder {dst_dir} does not exist')
    if not os.path.exists(src):
        raise ConversionError(f'{src}: no such file or folder')
    if os.path.abspath(src) == os.path.abspath(dst):
        raise ConversionError(f'{dst}: the output would overwrite the input')

    md5 = status = None
    if os.path.isfile(src):
        md5 = file_md5(src)
        status, message = identify_official(src, md5)
        if status == 'mismatch':
            print(message, file=sys.stderr)
        else:
            log(message)
    try:
        source = formats.read(src)
        family = families.recognise(source)
        official, facts = family.to_official(source)
    except torchfile.FormatError as e:
        raise ConversionError(str(e)) from None
    log(f'found: {family.describe(source)} ({source.container}, {len(source.tensors)} '
        f'tensors)')
    if source.ignored:
        log(f'ignored checkpoint entries (not model weights): {", ".join(source.ignored)}')
    said_heads = bool(facts.get('num_heads'))
    facts = given_heads(facts, num_heads, decoder_num_heads)
    try:
        kind, out, info = convert_state_dict(official, facts)
    except ConversionError as e:
        raise ConversionError(f'{src}: {e}') from None
    del source, official
    info['dropped'] = list(facts.get('unused', ())) + info['dropped']
    arch = info['arch']
    config, opts = converted_config(kind, arch, facts)
    classes, said = class_identity(arch, facts.get('classes'), kind)
    unknown = unknown_heads(arch, facts)
    if unknown:  # no config that guesses: -eval / load_model refuse the file until told
        config = None
        opts = [o if i == 0 or opts[i - 1] not in HEAD_KEYS.values() else 'N'
                for i, o in enumerate(opts)]
    info.update(md5=md5, official=status, src=src, dst=dst, config=config, classes=classes,
                unknown_heads=unknown)
    if config is not None:
        out[checkpoint.META_KEY] = checkpoint.run_meta(config, classes)

    write_atomically(dst, lambda tmp: paddle.save(out, tmp))

    log(f'kind: {_describe_kind(kind, arch)}')
    log(f'architecture: {info["model"]}(' + ', '.join(
        f'{k}={v}' for k, v in arch.items() if k != 'linear_probe') + ')')
    if kind == 'segmentor':
        seg = config.MODEL.SEGMENTATION
        log(f'segmentation: blocks {list(seg.OUT_INDICES)} (0-based) -> neck, UPerHead '
            f'{seg.CHANNELS} channels, pool scales {list(seg.POOL_SCALES)}, auxiliary head '
            + (f'{seg.AUX_CHANNELS} channels (weight {seg.AUX_WEIGHT})' if seg.AUX_WEIGHT
               else 'none')
            + f', windows of {config.DATA.IMAGE_SIZE} every {seg.SLIDE_STRIDE} pixels')
    for note in facts.get('notes', ()):
        log(f'  ({note})')
    heads = ', '.join(f'{k} {"unknown" if k in unknown else arch[k]}'
                      for k in HEAD_KEYS if k in arch)
    if unknown:
        flags = ' / '.join('--' + k.replace('_', '-') for k in unknown)
        log(f'heads: {heads} (no weight stores them and the source carries no config): the '
            f'file is written WITHOUT a config; convert again with {flags} N, or give -cfg '
            f'with the count the model was trained with')
    elif said_heads:
        log(f'heads: {heads} (from the config the source carries)')
    elif facts.get('num_heads') or facts.get('decoder_num_heads'):
        log(f'heads: {heads} (from --num-heads / --decoder-num-heads, else the named size)')
    else:
        log(f'heads: {heads} (the named size\'s: no weight stores them; if the model was trained '
            f'with others, convert again with --num-heads N)')
    log(f'tensors: {info["num_tensors"]} ({info["transposed"]} Linear weights transposed, '
        f'{info["renamed"]} BatchNorm buffers renamed, {len(info["dropped"])} dropped: '
        f'{_listing(info["dropped"]) or "none"})')
    log(f'classes: {said}')
    log(f'saved: {dst} (' + ('without a config: the head count is unknown' if unknown else
                             'with the config that builds its model') + ')')
    log(f'use it with: {usage(opts, dst)}' + (' (N: the head count it was trained with)'
                                              if unknown else ''))
    return kind, info


def class_identity(arch, names, kind=None):
    """-> (the class names a converted model carries, what the report says of them).
    A 1000-class classifier head is ImageNet-1k's, in the official order: its WordNet ids
    (classnames.py), also when the source names the classes by their words in that order; a
    150-class segmentor without names ADE20K's (classnames.ade20k, mmsegmentation's order)."""
    if kind == 'segmentor':
        if not names and arch['num_classes'] == ADE20K_CLASSES:
            return list(classnames.ade20k()), ('ADE20K, the 150 classes in mmsegmentation\'s '
                                               'order (a 150-class segmentor without names)')
        arch = dict(arch, num_classes=None)  # (a classifier's rule only)
    if arch.get('num_classes', 0) != 1000:
        if names:
            return list(names), f'{len(names)} names from the source'
        return None, 'none known (the source names no classes)'
    if names is None:
        return classnames.imagenet1k_wnids(), ('ImageNet-1k, the 1000 WordNet ids in the '
                                               'official order (a 1000-class head without names)')
    if classnames.canonical(names) != list(names):
        return classnames.canonical(names), 'ImageNet-1k: the source\'s names, as WordNet ids'
    return list(names), '1000 names from the source (not ImageNet-1k\'s in its order)'


def write_atomically(path, write, error=ConversionError):
    """write(tmp) to a temporary name beside path, then rename it to path: nothing
    half-written is left behind. An OSError becomes error('PATH: cannot write (...)')."""
    tmp = path + '.tmp'
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise error(f'{path}: cannot write ({e})') from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def converted_config(kind, arch, facts):
    """-> (the config that builds the converted model, [config file, KEY, value, ...] of the
    usage line (a pre-trained encoder's: fine-tuning's, whose head starts fresh)): a named
    size's config where the shape is one (transformer.SIZES; heads are not stored, so not
    compared; a segmentor: its vit_*_512_upernet_ade20k.yaml), MODEL.NAME *_custom with the
    shape keys otherwise, and as -opts what differs from that file: the variants (LayerScale,
    qkv bias, position embeddings, LayerNorm eps), the image size, the source's loss settings,
    a segmentor's SEGMENTOR_KEYS."""
    size = next((s for s, (_, shape) in transformer.SIZES.items()
                 if all(arch[k] == shape[k] for k in ('patch_size', 'embed_dim', 'depth'))),
                None)
    named = (size is not None and arch['mlp_ratio'] == transformer.SIZES[size][1]['mlp_ratio']
             and arch['in_chans'] == 3 and arch['num_heads'] == transformer.SIZES[size][1]
             ['num_heads'])
    stage = {'pretrain-full': 'pretrain', 'pretrain-encoder': 'finetune'}.get(kind, 'finetune')
    if kind == 'finetuned' and arch.get('linear_probe'):
        stage = 'linearprobe'
    mae = kind == 'pretrain-full'
    if mae and any(arch[k] != transformer.MAE_DECODER[k] for k in transformer.MAE_DECODER):
        named = False
    cfg_file = os.path.join('configs', f'vit_{size or "base_patch16"}_224_{stage}.yaml')
    keys = dict(CONFIG_KEYS)
    if kind == 'segmentor':
        keys.update(SEGMENTOR_KEYS)
        cfg_file = os.path.join('configs', f'vit_{size}_512_upernet_ade20k.yaml')
        if not os.path.isfile(os.path.join(REPO_ROOT, cfg_file)):  # (no size, or ViT-H)
            named = False
            cfg_file = os.path.join('configs', 'vit_base_patch16_512_upernet_ade20k.yaml')
    config = cfgmod.get_config(os.path.join(REPO_ROOT, cfg_file))
    opts = []
    if not named:
        opts += ['MODEL.NAME', 'mae_vit_custom' if mae else 'vit_custom',
                 'MODEL.ENCODER.PATCH_SIZE', arch['patch_size'],
                 'MODEL.ENCODER.EMBED_DIM', arch['embed_dim'], 'MODEL.ENCODER.DEPTH',
                 arch['depth'], 'MODEL.ENCODER.NUM_HEADS', arch['num_heads'],
                 'MODEL.ENCODER.MLP_RATIO', arch['mlp_ratio']]
        if mae:
            opts += ['MODEL.DECODER.EMBED_DIM', arch['decoder_embed_dim'],
                     'MODEL.DECODER.DEPTH', arch['decoder_depth'],
                     'MODEL.DECODER.NUM_HEADS', arch['decoder_num_heads']]
    for arg, key in keys.items():
        if arg in arch and arch[arg] != cfgmod.get_key(config, key):
            opts += [key, arch[arg]]
    if mae:
        for fact, key in (('norm_pix_loss', 'MODEL.NORM_PIX_LOSS'),
                          ('mask_ratio', 'MODEL.MASK_RATIO')):
            if fact in facts and facts[fact] != config.MODEL[key.split('.')[1]]:
                opts += [key, facts[fact]]
    if kind == 'finetuned':
        if arch['num_classes'] != config.MODEL.NUM_CLASSES:
            opts += ['MODEL.NUM_CLASSES', arch['num_classes']]
        if arch['global_pool'] != config.MODEL.GLOBAL_POOL:
            opts += ['MODEL.GLOBAL_POOL', arch['global_pool']]
    # the encoder alone (no head, the final norm kept) is what the file holds; the usage
    # line is fine-tuning's, which starts a head
    alone = ['MODEL.NUM_CLASSES', 0, 'MODEL.GLOBAL_POOL', False] if kind == 'pretrain-encoder' \
        else []
    try:
        cfgmod.merge_opts(config, [_opt_text(o) for o in opts + alone])
        transformer.model_shape(config)
    except cfgmod.ConfigError as e:
        raise ConversionError(f'the converted model has no valid config: {e}') from None
    return config, [cfg_file] + opts


def _opt_text(value):
    """An -opts value as one shell word: lists without spaces ([3,5,7,11])."""
    if isinstance(value, (list, tuple)):
        return '[' + ','.join(_opt_text(v) for v in value) + ']'
    return str(value)


def usage(opts, dst):
    """The -cfg (and -opts) line that builds the converted model from the repository."""
    line = f'-cfg {opts[0]} -pretrained {dst}'
    return line + (' -opts ' + ' '.join(_opt_text(o) for o in opts[1:]) if opts[1:] else '')


def main(argv=None):
    parser = argparse.ArgumentParser(
        description='Convert an MAE-family checkpoint (official .pth, timm, HuggingFace; '
                    'mmsegmentation / unilm / HF BEiT UperNet segmentors) to Paddle (.pdparams). '
                    'PyTorch is not needed.')
    parser.add_argument('--src', required=True,
                        help='.pth / .pt / .bin (torch.save zip), .safetensors, or a '
                             'HuggingFace folder (config.json + weights)')
    parser.add_argument('--dst', required=True, help='output .pdparams file')
    parser.add_argument('--num-heads', type=int, metavar='N',
                        help='attention heads of the encoder, for a source that carries no '
                             'config (the weights do not store it); needed unless the shape '
                             'is a named size (ViT-B/16, L/16, H/14)')
    parser.add_argument('--decoder-num-heads', type=int, metavar='N',
                        help='the same for an MAE decoder of another shape than the official')
    args = parser.parse_args(argv)
    try:
        convert_file(args.src, args.dst, num_heads=args.num_heads,
                     decoder_num_heads=args.decoder_num_heads)
    except ConversionError as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
