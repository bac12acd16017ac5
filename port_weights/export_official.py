"""Export a Paddle checkpoint of this project back to the official PyTorch formats.

    python port_weights/export_official.py --src output/pretrain/best.pdparams \\
        --dst mae_visualize_vit_base.pth [--encoder-only] [--hf DIR]
    python port_weights/export_official.py --src finetuned.pdparams --dst model.safetensors

--src: a .pdparams written by this project (its `_meta` entry, the run's config, is read when
present) or by convert_official.py. The output has the official key names and PyTorch layouts:
the inverse of convert_official.py, with its key table and its one rule (convert_official.torch_key
and is_linear_weight): `._mean` -> `.running_mean`, `._variance` -> `.running_var`, every 2-D
`.weight` (a Linear's) transposed back to torch's [out, in]. A linear probe's BatchNorm
(head.0) gets back the `num_batches_tracked` buffer torch's BatchNorm1d has (value 0: Paddle
keeps no step counter, and with the default momentum torch never reads it). Values keep their
stored dtype (bfloat16 is widened to float32), contiguous, little-endian.

Outputs (any of them; everything is checked before anything is written, and every file is
written under a temporary name and renamed, so a failed run leaves nothing half-written):
    --dst Y.pth          {'model': state_dict} like the official files, written WITHOUT PyTorch
                         by torchfile.py (a zip in torch.save's layout: archive/data.pkl,
                         archive/data/<n>, archive/byteorder, archive/version), read by
                         torch.load(Y, weights_only=True) and by convert_official.py.
    --dst Y.safetensors  the state dict alone, metadata {'format': 'pt'} (timm reads it:
                         timm.create_model(..., pretrained=True,
                         pretrained_cfg_overlay=dict(file=Y, num_classes=N))); written by
                         torchfile.py too.
    --hf DIR             pre-training checkpoints (with the decoder) only: a HuggingFace ViTMAE
                         folder, config.json + model.safetensors, for
                         ViTMAEForPreTraining.from_pretrained(DIR). Keys as the hub's
                         facebook/vit-mae-* files (vit.encoder.layer.{i}.attention.attention.
                         query/key/value split from the fused qkv, decoder.decoder_layers.{i}.*),
                         which transformers 4 loads as they are and transformers 5 renames on
                         loading. layer_norm_eps 1e-6, qkv_bias true, shapes from the tensors,
                         num_heads / norm_pix_loss / mask_ratio from the checkpoint's config
                         (a converted official file has none: the official head count for the
                         width, --num-heads / --decoder-num-heads, --norm-pix-loss, mask ratio
                         0.75).

Layouts (kinds as convert_official.py names them; every kind it reads can be written back):
    pretrain-full     encoder + mask_token + decoder_* (as mae_visualize_vit_*.pth): what a
                      source with a decoder gives in a .pth.
    pretrain-encoder  cls_token, pos_embed, patch_embed, blocks, norm (as mae_pretrain_vit_*.pth):
                      what a source without a decoder gives, what --encoder-only makes of one
                      with a decoder, and what a .safetensors gets by default (timm's ViT filter
                      would take a mask_token for DINOv2's; --full keeps the decoder there).
    finetuned         + head.* and fc_norm.* (global pool) or norm.* (cls token); a linear probe
                      has head.0 (BatchNorm buffers) and head.1 (Linear).

Refused, with one line (exit 2): a .pth as --src (already PyTorch), a segmentation checkpoint
(backbone.*: mmsegmentation's layout, not an official MAE one), a ViT with relative position
bias (the official models have none), --hf with a checkpoint that has no decoder.
"""
import argparse
import collections
import json
import os
import re
import shutil
import sys
import tempfile

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import runtime  # noqa: E402

if __name__ == '__main__':
    runtime.setup_process(restart=False)  # before Paddle loads: threads, its import notices

import checkpoint  # noqa: E402
import config as cfgmod  # noqa: E402
import torchfile  # noqa: E402
import transformer  # noqa: E402
from port_weights import convert_official as C  # noqa: E402  (the key table and the rule)
from port_weights import families  # noqa: E402  (the HuggingFace names)
from utils import UserError, run_main  # noqa: E402

PTH_SUFFIXES = ('.pth', '.pt')
SAFETENSORS_SUFFIX = '.safetensors'
HF_FILES = ('config.json', 'model.safetensors')


# ----------------------------------------------------------------------------------------------
# Reading the Paddle checkpoint
# ----------------------------------------------------------------------------------------------
def _to_numpy(value):
    if isinstance(value, np.ndarray):
        return value
    if 'bfloat16' in str(getattr(value, 'dtype', '')):  # numpy has no bfloat16: widen exactly
        value = value.astype('float32')
    return np.asarray(value.numpy() if hasattr(value, 'numpy') else value)


def load_source(path):
    """-> (Paddle-layout state dict {key: numpy array}, the `_meta` entry or None)."""
    if not os.path.isfile(path):
        raise UserError(f'{path}: no such file')
    if path.endswith(PTH_SUFFIXES) or checkpoint.is_torch_checkpoint(path):
        raise UserError(f'{path} is a PyTorch checkpoint already: --src takes a .pdparams of this '
                        f'project (or one written by port_weights/convert_official.py)')
    state, meta = checkpoint.split_meta(checkpoint.load_file(path, 'checkpoint'))
    if isinstance(state, dict) and isinstance(state.get('model'), dict):  # {'model': sd}
        state = state['model']
    if not isinstance(state, dict):
        raise UserError(f'{path} holds no state dict ({type(state).__name__})')
    keys = [str(k) for k in state]
    if any(k.startswith('backbone.') for k in keys):
        raise UserError(f'{path} is a segmentation model (keys backbone.*, neck.*, decode_head.*: '
                        f"mmsegmentation's layout); the official MAE formats hold ViT encoders, "
                        f'pre-training models and classifiers only')
    if 'pos_embed' not in state or 'patch_embed.proj.weight' not in state:
        raise UserError(f'{path} holds no ViT/MAE weights (no pos_embed / patch_embed.proj.weight; '
                        f'keys: {sorted(keys)[:6]})')
    rel = [k for k in keys if 'relative_position' in k]
    if rel:
        raise UserError(f'{path} is a ViT with relative position bias ({rel[0]} ...: '
                        f'MODEL.REL_POS_BIAS); the official MAE models have none, so it has no '
                        f'official layout')
    state = dict(state)
    return {k: _to_numpy(state.pop(k)) for k in list(state)}, meta  # (one copy at a time)


def _meta_config(meta, path):
    if not meta or not isinstance(meta, dict) or not meta.get('config'):
        return None
    return cfgmod.from_text(meta['config'], f'the config saved in {path}')


# ----------------------------------------------------------------------------------------------
# Paddle layout -> official layout
# ----------------------------------------------------------------------------------------------
def to_official(state):
    """Paddle-layout state dict -> (official torch-layout state dict, number transposed).
    The inverse of convert_official.convert_state_dict's loop: its key table read backwards,
    its Linear rule, and torch BatchNorm's step counter after each running_var."""
    out, transposed = collections.OrderedDict(), 0
    for key, value in state.items():
        new = C.torch_key(key)
        if C.is_linear_weight(key, value):
            value = value.T
            transposed += 1
        out[new] = np.ascontiguousarray(value)
        if new != key and new.endswith('.running_var'):
            out[new[:-len('.running_var')] + C.STEP_COUNTER] = np.array(0, dtype=np.int64)
    return out, transposed


def check_against_model(state, official):
    """The source must be exactly the transformer.py model its shapes describe (what
    convert_official.py builds, so the export converts back). -> (kind, model name, arch)."""
    try:
        kind = C.detect_kind(official)
        model_name, arch = C.infer_architecture(official, kind)
        expected = C.target_shapes(model_name, arch)
    except C.ConversionError as e:
        raise UserError(str(e)) from None
    unused, unset = set(state) - set(expected), set(expected) - set(state)
    wrong = [f'{k} {list(state[k].shape)} (needs {list(s)})' for k, s in expected.items()
             if k in state and tuple(state[k].shape) != tuple(s)]
    if unused or unset or wrong:
        msg = [f'unexpected keys {C._listing(unused)}'] if unused else []
        msg += [f'missing keys {C._listing(unset)}'] if unset else []
        msg += [f'shape mismatch: {C._listing(wrong)}'] if wrong else []
        raise UserError(f'not the {kind} {model_name} its shapes describe: ' + '; '.join(msg))
    return kind, model_name, arch


def encoder_only(official):
    return collections.OrderedDict(
        (k, v) for k, v in official.items() if not (k == 'mask_token' or k.startswith('decoder_')))


# ----------------------------------------------------------------------------------------------
# .pth, safetensors, HuggingFace ViTMAE
# ----------------------------------------------------------------------------------------------
def write_pth(path, obj):
    """torchfile.save: torch.save's zip layout, without torch."""
    try:
        torchfile.save(obj, path)
    except torchfile.FormatError as e:
        raise UserError(str(e)) from None


def write_safetensors(path, state):
    """torchfile.save_safetensors (metadata {'format': 'pt'}, as timm and HF write it)."""
    try:
        torchfile.save_safetensors(state, path, metadata={'format': 'pt'})
    except torchfile.FormatError as e:
        raise UserError(str(e)) from None


# official name -> HF ViTMAE name as the hub's files spell it (the table families.py reads back)
_HF_BLOCK = {official: hf for official, hf, _ in families.HF_BLOCK}
_HF_TOP = {official: hf for official, hf in families.HF_TOP if official != 'head'}
_HF_QKV = [hf for hf, _ in families.HF_QKV]


def hf_state_dict(official):
    """Official MAE keys (torch layout) -> HF ViTMAEForPreTraining keys, the fused qkv split
    into query / key / value (rows q, k, v, in that order)."""
    out = collections.OrderedDict()
    for key, value in official.items():
        m = re.match(r'(blocks|decoder_blocks)\.(\d+)\.(.+)\.(weight|bias)$', key)
        if m:
            base = 'vit.encoder.layer' if m[1] == 'blocks' else 'decoder.decoder_layers'
            if m[3] == 'attn.qkv':
                for name, part in zip(_HF_QKV, np.split(value, 3, axis=0)):
                    out[f'{base}.{m[2]}.{name}.{m[4]}'] = np.ascontiguousarray(part)
                continue
            if m[3] in _HF_BLOCK:
                out[f'{base}.{m[2]}.{_HF_BLOCK[m[3]]}.{m[4]}'] = value
                continue
        base, _, leaf = key.rpartition('.')
        if key in _HF_TOP:
            out[_HF_TOP[key]] = value
        elif base in _HF_TOP:
            out[f'{_HF_TOP[base]}.{leaf}'] = value
        else:
            raise UserError(f'{key}: no HuggingFace ViTMAE name for it')
    return out


def hf_config(official, arch, heads, decoder_heads, norm_pix_loss, mask_ratio):
    dtype = str(official['pos_embed'].dtype)
    return {
        'architectures': ['ViTMAEForPreTraining'], 'model_type': 'vit_mae',
        'image_size': arch['img_size'], 'patch_size': arch['patch_size'],
        'num_channels': arch['in_chans'], 'hidden_size': arch['embed_dim'],
        'num_hidden_layers': arch['depth'], 'num_attention_heads': heads,
        'intermediate_size': int(official['blocks.0.mlp.fc1.weight'].shape[0]),
        'decoder_hidden_size': arch['decoder_embed_dim'],
        'decoder_num_hidden_layers': arch['decoder_depth'],
        'decoder_num_attention_heads': decoder_heads,
        'decoder_intermediate_size': int(official['decoder_blocks.0.mlp.fc1.weight'].shape[0]),
        'hidden_act': 'gelu', 'hidden_dropout_prob': 0.0, 'attention_probs_dropout_prob': 0.0,
        'initializer_range': 0.02, 'layer_norm_eps': arch['norm_eps'],
        'qkv_bias': arch['qkv_bias'] == 'qkv',
        'mask_ratio': mask_ratio, 'norm_pix_loss': norm_pix_loss,
        'torch_dtype': dtype if dtype in ('float32', 'float16', 'float64') else 'float32',
    }


def _hf_settings(args, arch, config, src):
    """-> (heads, decoder heads, norm_pix_loss, mask_ratio, where they come from)."""
    from_config = None
    if config is not None and config.MODEL.NAME.startswith('mae_'):
        shape = transformer.model_shape(config)
        from_config = dict(num_heads=shape['num_heads'],
                           decoder_num_heads=shape['decoder_num_heads'],
                           norm_pix_loss=bool(config.MODEL.NORM_PIX_LOSS),
                           mask_ratio=float(config.MODEL.MASK_RATIO))
    flags = dict(num_heads=args.num_heads, decoder_num_heads=args.decoder_num_heads,
                 norm_pix_loss=True if args.norm_pix_loss else None)
    if from_config is not None:
        for name, value in flags.items():
            if value is not None and value != from_config[name]:
                raise UserError(f'--{name.replace("_", "-")} contradicts the config {src} was '
                                f'trained with ({name} {from_config[name]}); leave it out')
        values, where = from_config, f'the config saved in {src}'
    else:
        values = dict(num_heads=args.num_heads or arch['num_heads'],
                      decoder_num_heads=args.decoder_num_heads or arch['decoder_num_heads'],
                      norm_pix_loss=bool(args.norm_pix_loss), mask_ratio=0.75)
        where = ('flags / official defaults (the checkpoint carries no config): heads for the '
                 'width unless --num-heads / --decoder-num-heads, norm_pix_loss '
                 + ('on (--norm-pix-loss)' if args.norm_pix_loss else 'off (no --norm-pix-loss)')
                 + ', mask_ratio 0.75')
    for dim, heads in (('embed_dim', 'num_heads'), ('decoder_embed_dim', 'decoder_num_heads')):
        if values[heads] < 1 or arch[dim] % values[heads]:
            raise UserError(f'{heads} {values[heads]} does not divide {dim} {arch[dim]}')
    return (values['num_heads'], values['decoder_num_heads'], values['norm_pix_loss'],
            values['mask_ratio'], where)


# ----------------------------------------------------------------------------------------------
# Writing safely
# ----------------------------------------------------------------------------------------------
def _check_hf_dir(path):
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f'--hf {path}: exists and is not a folder')
    if os.path.isdir(path):
        other = sorted(set(os.listdir(path)) - set(HF_FILES))
        if other:
            raise UserError(f'--hf {path}: the folder holds other files '
                            f'({", ".join(other[:4])}); give a new or empty folder, or one '
                            f'holding only {" + ".join(HF_FILES)}')
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UserError(f'--hf {path}: the folder {parent} does not exist')


def write_hf_dir(path, config, weights):
    """config.json + model.safetensors, built in a temporary folder beside `path` and renamed
    into place (a new folder at once; into an existing one, the weights first)."""
    parent = os.path.dirname(os.path.abspath(path))
    tmp = tempfile.mkdtemp(prefix=os.path.basename(os.path.abspath(path)) + '.', suffix='.tmp',
                           dir=parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        write_safetensors(os.path.join(tmp, 'model.safetensors'), weights)
        with open(os.path.join(tmp, 'config.json'), 'w') as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.write('\n')
        if os.path.isdir(path) and not os.listdir(path):
            os.rmdir(path)
        if not os.path.exists(path):
            os.rename(tmp, path)
        else:
            for name in ('model.safetensors', 'config.json'):
                os.replace(os.path.join(tmp, name), os.path.join(path, name))
    except OSError as e:
        raise UserError(f'--hf {path}: cannot write ({e})') from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def _describe(kind, arch):
    return C._describe_kind(kind, arch)


def export(args, log=print):
    if not args.dst and not args.hf:
        raise UserError('nothing to write: give --dst Y.pth|Y.safetensors and/or --hf DIR')
    if args.dst and not args.dst.endswith(PTH_SUFFIXES + (SAFETENSORS_SUFFIX,)):
        raise UserError(f'--dst {args.dst}: the name must end in .pth (torch.save format) or '
                        f'.safetensors')
    for out in filter(None, (args.dst, args.hf)):
        if os.path.abspath(out) == os.path.abspath(args.src):
            raise UserError(f'{out}: the output would overwrite the input')
    if args.dst and not os.path.isdir(os.path.dirname(os.path.abspath(args.dst))):
        raise UserError(f'{args.dst}: the folder {os.path.dirname(os.path.abspath(args.dst))} '
                        f'does not exist')
    if args.encoder_only and args.full:
        raise UserError('--encoder-only and --full exclude each other')

    state, meta = load_source(args.src)
    config = _meta_config(meta, args.src)
    official, transposed = to_official(state)
    try:
        kind, model_name, arch = check_against_model(state, official)
    except UserError as e:
        raise UserError(f'{args.src}: {e}') from None
    del state
    has_decoder = kind == 'pretrain-full'
    if (args.encoder_only and kind == 'finetuned') or (args.full and not has_decoder):
        flag = '--encoder-only' if args.encoder_only else '--full'
        raise UserError(f'{flag} is for pre-training checkpoints (with a decoder); {args.src} is '
                        f'a {_describe(kind, arch)}')
    if args.hf and not has_decoder:
        raise UserError(f'--hf writes a ViTMAEForPreTraining (encoder + decoder); {args.src} is '
                        f'a {_describe(kind, arch)}, with no decoder')
    if args.hf and (arch['layer_scale'] or arch['qkv_bias'] == 'qv'):
        raise UserError(f'--hf: {args.src} has LayerScale or q / v biases (MODEL.LAYER_SCALE, '
                        f'MODEL.QKV_BIAS), which HuggingFace ViTMAE does not have; --dst '
                        f'Y.safetensors writes timm\'s layout, which does')
    if args.hf:
        _check_hf_dir(args.hf)
        heads, dheads, npl, mask_ratio, where = _hf_settings(args, arch, config, args.src)
        if config is not None:
            arch['norm_eps'] = config.MODEL.LAYER_NORM_EPS
        hf_cfg = hf_config(official, arch, heads, dheads, npl, mask_ratio)
        hf_weights = hf_state_dict(official)

    origin = ('a run of this project: its config in _meta' if meta
              else 'no _meta: converted or bare weights')
    log(f'source: {args.src} ({origin})')
    log(f'kind: {_describe(kind, arch)}')
    log(f'tensors: {len(official)} ({transposed} Linear weights transposed back to [out, in]'
        + (', BatchNorm buffers renamed running_mean / running_var, num_batches_tracked 0 added'
           if any(k.endswith(C.STEP_COUNTER) for k in official) else '') + ')')
    if args.dst:
        pth = args.dst.endswith(PTH_SUFFIXES)
        full = has_decoder and (args.full or (pth and not args.encoder_only))
        layout = 'pretrain-full' if full else ('pretrain-encoder' if has_decoder else kind)
        weights = official if full or not has_decoder else encoder_only(official)
        if pth:
            C.write_atomically(args.dst, lambda p: write_pth(p, {'model': weights}), UserError)
        else:
            C.write_atomically(args.dst, lambda p: write_safetensors(p, weights), UserError)
        what = ("{'model': state_dict}, torch.save format" if pth
                else "state dict, metadata {'format': 'pt'}")
        note = ''
        if has_decoder and not full:
            note = (' (mask_token and decoder_* left out' + ('' if pth else '; --full keeps them')
                    + ')')
        log(f'saved: {args.dst} ({what}; {layout} layout, {len(weights)} tensors{note})')
    if args.hf:
        write_hf_dir(args.hf, hf_cfg, hf_weights)
        log(f'saved: {args.hf} (HuggingFace ViTMAEForPreTraining: config.json + '
            f'model.safetensors, {len(hf_weights)} tensors; heads {heads} / decoder {dheads}, '
            f'norm_pix_loss {npl}, mask_ratio {mask_ratio}: from {where})')
    return kind


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description='Export a Paddle checkpoint (.pdparams) to the official PyTorch layout '
                    '(.pth / .safetensors) and/or a HuggingFace ViTMAE folder. PyTorch is not '
                    'needed.')
    p.add_argument('--src', required=True, help='.pdparams of this project or converted')
    p.add_argument('--dst', help='output .pth ({"model": state_dict}) or .safetensors')
    p.add_argument('--hf', metavar='DIR',
                   help='also write a HuggingFace ViTMAEForPreTraining folder (needs a decoder)')
    p.add_argument('--encoder-only', action='store_true',
                   help='with a decoder in the source: write the pretrain-encoder layout (as '
                        'mae_pretrain_vit_*.pth); the .safetensors default')
    p.add_argument('--full', action='store_true',
                   help='with a decoder in the source: keep mask_token + decoder_* in a '
                        '.safetensors too (the .pth default)')
    p.add_argument('--norm-pix-loss', action='store_true',
                   help='--hf, source without a config (converted): it was trained on '
                        'normalised pixels')
    p.add_argument('--num-heads', type=int, help='--hf, source without a config: encoder heads')
    p.add_argument('--decoder-num-heads', type=int,
                   help='--hf, source without a config: decoder heads')
    return p.parse_args(argv)


def main(argv=None):
    export(parse_args(argv))


if __name__ == '__main__':
    run_main(main)
